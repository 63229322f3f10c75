//! Administration of users over REST and gRPC: list, get, role changes; users and keys that
//! may not do it are refused.

use serde_json::json;
use turbocat::proto::v1::{
    GetCurrentUserRequest, GetUserRequest, ListUsersRequest, UpdateUserRoleRequest, UserRole,
};

use crate::support::api::{Api, Auth, assert_error, audit_rows, dev_store, error_reason, grpc};
use crate::support::start_dev;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_list_get_and_change_roles_over_rest_and_users_cannot() {
    let (server, data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root Admin").await;
    let carol = api.register("carol@example.com", "Carol").await;
    let dave = api.register("dave@example.com", "Dave").await;

    let (status, body) =
        api.get("/api/v1/users?page=1&pageSize=2&sort=-email", &admin.auth()).await;
    assert_eq!(status, 200, "{body}");
    let emails: Vec<&str> = body["data"]
        .as_array()
        .expect("users")
        .iter()
        .filter_map(|user| user["email"].as_str())
        .collect();
    assert_eq!(emails, vec!["root@example.com", "dave@example.com"]);
    assert_eq!(body["meta"]["pagination"]["page"], 1);
    assert_eq!(body["meta"]["pagination"]["pageSize"], 2);
    assert_eq!(body["meta"]["pagination"]["total"], 3);
    assert_eq!(body["meta"]["pagination"]["totalPages"], 2);
    let (_, body) = api.get("/api/v1/users?page=2&pageSize=2&sort=-email", &admin.auth()).await;
    assert_eq!(body["data"][0]["email"], "carol@example.com", "{body}");
    let (_, body) = api.get("/api/v1/users?search=CAROL", &admin.auth()).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["meta"]["pagination"]["pageSize"], 20, "default page size");
    let (_, body) = api.get("/api/v1/users?role=ADMIN", &admin.auth()).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["data"][0]["id"], admin.id.as_str());
    let (status, body) =
        api.get("/api/v1/users?sort=passwordHash&pageSize=101&page=-1", &admin.auth()).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["page", "pageSize", "sort"], "{body}");

    let (status, body) = api.get(&format!("/api/v1/users/{}", carol.id), &admin.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["email"], "carol@example.com");
    let missing = uuid::Uuid::new_v4();
    let (status, body) = api.get(&format!("/api/v1/users/{missing}"), &admin.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // A user may do none of it.
    let (status, body) = api.get("/api/v1/users", &carol.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.get(&format!("/api/v1/users/{}", dave.id), &carol.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", carol.id),
            &carol.auth(),
            json!({ "role": "ADMIN" }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    // Nor an admin's read key, for the write.
    let (read_key, _) = api.create_key(&admin.auth(), "reader", &["READ"]).await;
    let (status, _) = api.get("/api/v1/users", &Auth::key(&read_key)).await;
    assert_eq!(status, 200, "an admin's read key may list users");
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", carol.id),
            &Auth::key(&read_key),
            json!({ "role": "ADMIN" }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");

    // The admin promotes Carol; her old session ends, her next one is an admin's.
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", carol.id),
            &admin.auth(),
            json!({ "role": "ADMIN", "version": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["role"], "ADMIN");
    assert_eq!(body["data"]["version"], 2);
    let (status, body) = api.get("/api/v1/users/me", &carol.auth()).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let (status, body) = api.login(&carol.email, &carol.password).await;
    assert_eq!(status, 200, "{body}");
    let carol_token = body["data"]["accessToken"].as_str().expect("token").to_owned();
    let (status, body) = api.get("/api/v1/users", &Auth::bearer(&carol_token)).await;
    assert_eq!(status, 200, "{body}");

    // Stale version, own role, bad role.
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", carol.id),
            &admin.auth(),
            json!({ "role": "USER", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", admin.id),
            &admin.auth(),
            json!({ "role": "USER" }),
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", dave.id),
            &admin.auth(),
            json!({ "role": "UNSPECIFIED" }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["role"]);
    let (status, body) =
        api.patch("/api/v1/users/not-a-uuid/role", &admin.auth(), json!({ "role": "USER" })).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["userId"]);

    let store = dev_store(data_dir.path()).await;
    let rows = audit_rows(store.as_ref()).await;
    let role_changes: Vec<_> = rows.iter().filter(|row| row.action == "user.role_change").collect();
    assert_eq!(role_changes.len(), 1, "only the applied change is audited");
    let change = role_changes[0];
    assert_eq!(change.actor_id.map(|id| id.to_string()), Some(admin.id.clone()));
    assert_eq!(change.resource_id.as_deref(), Some(carol.id.as_str()));
    assert_eq!(
        change.changes,
        Some(json!({ "before": { "role": "USER" }, "after": { "role": "ADMIN" } }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_list_get_and_change_roles_over_grpc_and_users_cannot() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let erin = api.register("erin@example.com", "Erin").await;
    let frank = api.register("frank@example.com", "Frank").await;
    let mut users = api.users().await;

    let listed = users
        .list_users(grpc(
            ListUsersRequest { page_size: Some(2), sort: "email".into(), ..Default::default() },
            &admin.auth(),
        ))
        .await
        .expect("list")
        .into_inner();
    let emails: Vec<&str> = listed.users.iter().map(|user| user.email.as_str()).collect();
    assert_eq!(emails, vec!["erin@example.com", "frank@example.com"]);
    let pagination = listed.pagination.expect("pagination");
    assert_eq!(
        (pagination.page, pagination.page_size, pagination.total, pagination.total_pages),
        (1, 2, 3, 2)
    );
    let admins = users
        .list_users(grpc(
            ListUsersRequest { role: UserRole::Admin.into(), ..Default::default() },
            &admin.auth(),
        ))
        .await
        .expect("list admins")
        .into_inner();
    assert_eq!(admins.users.len(), 1);
    let bad = users
        .list_users(grpc(
            ListUsersRequest { sort: "role".into(), ..Default::default() },
            &admin.auth(),
        ))
        .await
        .expect_err("bad sort");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let fetched = users
        .get_user(grpc(GetUserRequest { user_id: frank.id.clone() }, &admin.auth()))
        .await
        .expect("get")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(fetched.email, "frank@example.com");

    for refused in [
        users.list_users(grpc(ListUsersRequest::default(), &erin.auth())).await.map(|_| ()),
        users
            .get_user(grpc(GetUserRequest { user_id: frank.id.clone() }, &erin.auth()))
            .await
            .map(|_| ()),
        users
            .update_user_role(grpc(
                UpdateUserRoleRequest {
                    user_id: erin.id.clone(),
                    role: UserRole::Admin.into(),
                    version: 0,
                },
                &erin.auth(),
            ))
            .await
            .map(|_| ()),
    ] {
        let status = refused.expect_err("a user is refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(error_reason(&status).as_deref(), Some("FORBIDDEN"));
    }

    let stale = users
        .update_user_role(grpc(
            UpdateUserRoleRequest {
                user_id: frank.id.clone(),
                role: UserRole::Admin.into(),
                version: 7,
            },
            &admin.auth(),
        ))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    let promoted = users
        .update_user_role(grpc(
            UpdateUserRoleRequest {
                user_id: frank.id.clone(),
                role: UserRole::Admin.into(),
                version: 0,
            },
            &admin.auth(),
        ))
        .await
        .expect("promote")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(promoted.role, i32::from(UserRole::Admin));
    let ended = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &frank.auth()))
        .await
        .expect_err("the old session ended");
    assert_eq!(ended.code(), tonic::Code::Unauthenticated);
    // REST sees the new role.
    let (_, body) = api.get(&format!("/api/v1/users/{}", frank.id), &admin.auth()).await;
    assert_eq!(body["data"]["role"], "ADMIN");
}
