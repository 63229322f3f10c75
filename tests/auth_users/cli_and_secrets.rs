//! `turbocat admin create`, and secrets kept out of logs, responses and the audit trail; the
//! key lifecycle once more on PostgreSQL and Redis.

use serde_json::json;
use turbocat::proto::v1::{GetCurrentUserRequest, ListUsersRequest};
use turbocat::store::AuditActorKind;

use crate::support::api::{Api, Auth, assert_error, audit_rows, dev_store, grpc};
use crate::support::{run_turbocat, start_serve, start_turbocat};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_create_makes_an_admin_who_can_log_in() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let data_path = data_dir.path().to_str().expect("utf-8").to_owned();
    let password = "boss-password-123";
    let (ok, stdout, stderr) = run_turbocat(
        &[
            "admin",
            "create",
            "--data-dir",
            &data_path,
            "--email",
            "Boss@Example.com",
            "--password",
            password,
            "--full-name",
            "The Boss",
        ],
        &[],
    );
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("created admin boss@example.com"), "{stdout}");
    assert!(!stdout.contains(password) && !stderr.contains(password), "{stdout}{stderr}");

    let (ok, stdout, stderr) = run_turbocat(
        &[
            "admin",
            "create",
            "--data-dir",
            &data_path,
            "--email",
            "boss@example.com",
            "--password",
            password,
        ],
        &[],
    );
    assert!(!ok, "a second account with the email is refused: {stdout}");
    assert!(stderr.contains("already exists"), "{stderr}");
    let (ok, _, stderr) = run_turbocat(
        &[
            "admin",
            "create",
            "--data-dir",
            &data_path,
            "--email",
            "not-an-email",
            "--password",
            "short",
        ],
        &[],
    );
    assert!(!ok);
    assert!(stderr.contains("email") && stderr.contains("password"), "{stderr}");
    assert!(!stderr.contains("short"), "the refused password is not echoed: {stderr}");

    let server = start_turbocat(&["dev", "--listen", "127.0.0.1:0", "--data-dir", &data_path], &[]);
    let api = Api::new(&server);
    let (status, body) = api.login("boss@example.com", password).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["user"]["role"], "ADMIN");
    assert_eq!(body["data"]["user"]["fullName"], "The Boss");
    let token = body["data"]["accessToken"].as_str().expect("token").to_owned();
    let mut users = api.users().await;
    let listed = users
        .list_users(grpc(ListUsersRequest::default(), &Auth::bearer(&token)))
        .await
        .expect("the created admin lists users over gRPC")
        .into_inner();
    assert_eq!(listed.users.len(), 1);
    // The next account to register is not the first one: a plain user.
    let next = api.register("newbie@example.com", "Newbie").await;
    let (_, body) = api.get("/api/v1/users/me", &next.auth()).await;
    assert_eq!(body["data"]["role"], "USER");

    let store = dev_store(data_dir.path()).await;
    let rows = audit_rows(store.as_ref()).await;
    let created = rows.iter().find(|row| row.action == "user.create").expect("user.create row");
    assert_eq!(created.actor_kind, AuditActorKind::System);
    assert!(!format!("{rows:?}").contains(password));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_and_audit_rows() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let data_path = data_dir.path().to_str().expect("utf-8").to_owned();
    let server = start_turbocat(
        &["dev", "--listen", "127.0.0.1:0", "--data-dir", &data_path, "--log-level", "debug"],
        &[],
    );
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let (key, key_id) = api.create_key(&admin.auth(), "automation", &["READ", "WRITE"]).await;
    // tc_<prefix>_<secret>: the secret itself may contain '_'.
    let secret = key.splitn(3, '_').nth(2).expect("secret part").to_owned();

    // The key acts; the trail says it was the key.
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &Auth::key(&key),
            json!({ "fullName": "Root Two", "version": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut users = api.users().await;
    users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::bearer(&key)))
        .await
        .expect("grpc with the key");
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&format!("{key}0"))).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let (status, _) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &admin.auth()).await;
    assert_eq!(status, 200);
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&key)).await;
    assert_eq!(status, 401);

    let store = dev_store(data_dir.path()).await;
    let rows = audit_rows(store.as_ref()).await;
    let actions: Vec<&str> = rows.iter().map(|row| row.action.as_str()).collect();
    for expected in ["api_key.create", "user.update", "api_key.revoke"] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    let created = rows.iter().find(|row| row.action == "api_key.create").expect("create row");
    assert_eq!(created.resource_id.as_deref(), Some(key_id.as_str()));
    assert_eq!(created.metadata["name"], "automation");
    assert!(created.metadata["prefix"].as_str().is_some_and(|prefix| key.starts_with(prefix)));
    let update = rows.iter().find(|row| row.action == "user.update").expect("update row");
    assert_eq!(update.actor_kind, AuditActorKind::ApiKey);
    assert_eq!(update.metadata["apiKeyId"], key_id.as_str());
    assert_eq!(
        update.changes.as_ref().map(|changes| changes["after"]["fullName"].clone()),
        Some(json!("Root Two"))
    );
    let trail = format!("{rows:?}");
    assert!(!trail.contains(&secret), "the audit trail never holds the secret");
    assert!(!trail.contains(&admin.password) && !trail.contains(&admin.token));

    let logs = server.stderr_text();
    assert!(logs.contains("DEBUG") || logs.contains("debug"), "debug logging is on");
    assert!(!logs.contains(&secret), "the logs never hold the key");
    assert!(!logs.contains(&admin.password) && !logs.contains(&admin.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_users_and_keys_on_postgres_and_redis() {
    let (server, database) = start_serve(&[]).await;
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let user = api.register("lou@example.com", "Lou").await;
    let (status, body) = api.get("/api/v1/users?sort=email", &admin.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["meta"]["pagination"]["total"], 2);
    let (status, body) = api.get("/api/v1/users", &user.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");

    let (key, key_id) = api.create_key(&user.auth(), "script", &["READ"]).await;
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&key)).await;
    assert_eq!(status, 200, "{body}");
    let mut users = api.users().await;
    users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::bearer(&key)))
        .await
        .expect("grpc with the key on postgres");
    let (status, body) = api
        .patch("/api/v1/users/me", &Auth::key(&key), json!({ "fullName": "X", "version": 1 }))
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (_, body) = api.get("/api/v1/api-keys", &user.auth()).await;
    assert!(body["data"][0]["lastUsedAt"].is_string(), "{body}");
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &admin.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, _) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &user.auth()).await;
    assert_eq!(status, 200);
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&key)).await;
    assert_eq!(status, 401);

    let password = "second-admin-password";
    let (ok, stdout, stderr) = run_turbocat(
        &[
            "admin",
            "create",
            "--database-url",
            &database.url,
            "--email",
            "ops@example.com",
            "--password",
            password,
        ],
        &[],
    );
    assert!(ok, "{stdout}{stderr}");
    let (status, body) = api.login("ops@example.com", password).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["user"]["role"], "ADMIN");
    assert_eq!(body["data"]["user"]["fullName"], "Administrator");
}
