//! GetCurrentUser and UpdateCurrentUser over REST and gRPC: optimistic locking, validation that
//! names every bad field and writes nothing.

use prost_types::FieldMask;
use serde_json::json;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;
use turbocat::proto::v1::{GetCurrentUserRequest, RegisterRequest, UpdateCurrentUserRequest, User};

use crate::support::api::{
    Api, Auth, assert_error, error_metadata, error_reason, grpc, violated_fields,
};
use crate::support::start_dev;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_is_read_and_updated_with_optimistic_locking_over_rest() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let user = api.register("ann@example.com", "Ann").await;

    let (status, body) = api.get("/api/v1/users/me", &user.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["email"], "ann@example.com");
    assert_eq!(body["data"]["role"], "USER");
    assert_eq!(body["data"]["version"], 1);
    assert!(body["data"].get("passwordHash").is_none(), "{body}");
    assert!(body["data"]["lastLoginAt"].is_string(), "registering signs in: {body}");
    let (_, admin_body) = api.get("/api/v1/users/me", &admin.auth()).await;
    assert_eq!(admin_body["data"]["role"], "ADMIN", "the first account is the admin");
    let (status, body) = api.get("/api/v1/users/me", &Auth::None).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");

    let (status, body, headers) = api
        .call(
            reqwest::Method::PATCH,
            "/api/v1/users/me",
            &user.auth(),
            Some(json!({
                "fullName": "Ann Smith",
                "avatarUrl": "https://cdn.example.com/ann.png",
                "preferences": { "theme": "dark", "pageSize": 50 },
                "version": 1,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["fullName"], "Ann Smith");
    assert_eq!(body["data"]["avatarUrl"], "https://cdn.example.com/ann.png");
    assert_eq!(body["data"]["preferences"]["theme"], "dark");
    assert_eq!(body["data"]["version"], 2);
    assert_eq!(headers.get("etag").and_then(|value| value.to_str().ok()), Some("\"2\""));

    // Only the named field changes.
    let (status, body) = api
        .patch("/api/v1/users/me", &user.auth(), json!({ "fullName": "Ann S.", "version": 2 }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["fullName"], "Ann S.");
    assert_eq!(body["data"]["avatarUrl"], "https://cdn.example.com/ann.png");
    // `google.protobuf.Struct` numbers are doubles.
    assert_eq!(body["data"]["preferences"]["pageSize"].as_f64(), Some(50.0));
    assert_eq!(body["data"]["version"], 3);

    // A stale version is refused with the current one.
    let (status, body) = api
        .patch("/api/v1/users/me", &user.auth(), json!({ "fullName": "Late", "version": 2 }))
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let details = body["error"]["details"].as_array().expect("details");
    assert!(details.iter().any(|detail| detail["currentVersion"] == 3), "{body}");

    // Every bad field is named, and nothing is written.
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &user.auth(),
            json!({ "fullName": "x".repeat(201), "avatarUrl": "ftp://example.com/a.png", "version": 3 }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["fullName", "avatarUrl"], "{body}");
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &user.auth(),
            json!({ "email": "evil@example.com", "role": "ADMIN", "version": 3 }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert!(fields.contains(&"email".to_owned()) && fields.contains(&"role".to_owned()), "{body}");
    let (status, body) =
        api.patch("/api/v1/users/me", &user.auth(), json!({ "fullName": "No version" })).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["version"]);
    let (status, body) = api.patch("/api/v1/users/me", &user.auth(), json!({ "version": 3 })).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["updateMask"]);
    let avatar_too_long = format!("https://example.com/{}", "a".repeat(2048));
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &user.auth(),
            json!({ "avatarUrl": avatar_too_long, "version": 3 }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["avatarUrl"]);

    let (_, body) = api.get("/api/v1/users/me", &user.auth()).await;
    assert_eq!(body["data"]["version"], 3, "nothing was written: {body}");
    assert_eq!(body["data"]["fullName"], "Ann S.");
    assert_eq!(body["data"]["email"], "ann@example.com");
    assert_eq!(body["data"]["role"], "USER");

    // An empty avatar removes it.
    let (status, body) =
        api.patch("/api/v1/users/me", &user.auth(), json!({ "avatarUrl": "", "version": 3 })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["avatarUrl"], "");
    assert_eq!(body["data"]["version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_is_read_and_updated_with_optimistic_locking_over_grpc() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let _admin = api.register("root@example.com", "Root").await;
    let user = api.register("bob@example.com", "Bob").await;
    let mut users = api.users().await;

    let status = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::None))
        .await
        .expect_err("anonymous");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let me = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &user.auth()))
        .await
        .expect("get me")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(me.email, "bob@example.com");
    assert_eq!(me.id, user.id);
    assert!(me.last_login_at.is_some(), "registering signs in");
    let registered = AuthServiceClient::new(api.channel().await)
        .register(RegisterRequest {
            email: "cat@example.com".to_owned(),
            password: "a-long-enough-password".to_owned(),
            full_name: "Cat".to_owned(),
        })
        .await
        .expect("register over gRPC")
        .into_inner();
    assert!(registered.user.expect("user").last_login_at.is_some(), "registering signs in");
    assert_eq!(me.version, 1);

    let mut preferences = prost_types::Struct::default();
    preferences.fields.insert(
        "language".into(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("fr".into())) },
    );
    let update = |profile: User, paths: &[&str]| UpdateCurrentUserRequest {
        user: Some(profile),
        update_mask: Some(FieldMask { paths: paths.iter().map(|path| path.to_string()).collect() }),
    };
    let updated = users
        .update_current_user(grpc(
            update(
                User {
                    full_name: "Robert".into(),
                    email: "ignored@example.com".into(),
                    preferences: Some(preferences),
                    version: 1,
                    ..User::default()
                },
                &["full_name", "preferences"],
            ),
            &user.auth(),
        ))
        .await
        .expect("update")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(updated.full_name, "Robert");
    assert_eq!(updated.email, "bob@example.com", "fields outside the mask stay");
    assert_eq!(updated.version, 2);
    assert!(updated.preferences.expect("preferences").fields.contains_key("language"));

    let stale = users
        .update_current_user(grpc(
            update(User { full_name: "Late".into(), version: 1, ..User::default() }, &["fullName"]),
            &user.auth(),
        ))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert_eq!(error_reason(&stale).as_deref(), Some("CONFLICT"));
    assert_eq!(error_metadata(&stale, "currentVersion").as_deref(), Some("2"));

    let invalid = users
        .update_current_user(grpc(
            update(
                User {
                    full_name: " ".into(),
                    avatar_url: "javascript:alert(1)".into(),
                    version: 2,
                    ..User::default()
                },
                &["full_name", "avatar_url", "role", "last_login_at"],
            ),
            &user.auth(),
        ))
        .await
        .expect_err("invalid");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    let fields = violated_fields(&invalid);
    for expected in ["role", "lastLoginAt", "fullName", "avatarUrl"] {
        assert!(fields.contains(&expected.to_owned()), "{expected} in {fields:?}");
    }
    let no_mask = users
        .update_current_user(grpc(
            UpdateCurrentUserRequest {
                user: Some(User { full_name: "X".into(), version: 2, ..User::default() }),
                update_mask: None,
            },
            &user.auth(),
        ))
        .await
        .expect_err("no mask");
    assert_eq!(violated_fields(&no_mask), vec!["updateMask"]);

    let after = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &user.auth()))
        .await
        .expect("get me")
        .into_inner()
        .user
        .expect("user");
    assert_eq!(after.version, 2, "refused updates wrote nothing");
    assert_eq!(after.full_name, "Robert");
    // REST sees what gRPC wrote.
    let (_, body) = api.get("/api/v1/users/me", &user.auth()).await;
    assert_eq!(body["data"]["preferences"]["language"], "fr");
}
