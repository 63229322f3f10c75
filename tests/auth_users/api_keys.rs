//! API keys over REST and gRPC: shown once, listed without the secret, revoked by their owner
//! only; accepted as `x-api-key` and as a bearer token with exactly their scopes' rights.

use std::time::Duration;

use prost::Message;
use serde_json::json;
use turbocat::proto::v1::{
    ApiKeyScope, CreateApiKeyRequest, DeleteApiKeyRequest, GetCurrentUserRequest,
    GetCurrentUserResponse, ListApiKeysRequest, ListUsersRequest, UpdateCurrentUserRequest, User,
};

use crate::support::api::{Api, Auth, assert_error, dev_store, grpc, violated_fields};
use crate::support::start_dev;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_and_revoked_by_their_owner_only_over_rest() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let gina = api.register("gina@example.com", "Gina").await;
    let hank = api.register("hank@example.com", "Hank").await;

    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &gina.auth(),
            json!({ "name": "ci", "scopes": ["READ", "WRITE"] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let key = body["data"]["key"].as_str().expect("key").to_owned();
    let prefix = body["data"]["apiKey"]["prefix"].as_str().expect("prefix").to_owned();
    let key_id = body["data"]["apiKey"]["id"].as_str().expect("id").to_owned();
    assert!(key.starts_with(&format!("{prefix}_")), "{key} starts with {prefix}_");
    assert!(prefix.starts_with("tc_") && prefix.len() == 11, "{prefix}");
    assert_eq!(body["data"]["apiKey"]["scopes"], json!(["READ", "WRITE"]));
    assert_eq!(body["data"]["apiKey"]["shared"], false);
    assert!(body["data"]["apiKey"]["lastUsedAt"].is_null(), "{body}");

    let (status, body) = api.get("/api/v1/api-keys", &gina.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["data"][0]["prefix"], prefix.as_str());
    assert_eq!(body["meta"]["pagination"]["total"], 1);
    let listed = body.to_string();
    assert!(!listed.contains(&key) && !listed.contains(key.splitn(3, '_').nth(2).expect("secret")));
    assert!(!listed.contains("hash"), "{listed}");
    let (_, body) = api.get("/api/v1/api-keys", &hank.auth()).await;
    assert_eq!(body["data"], json!([]), "keys are listed for their owner only");

    // Someone else's key is not found; the owner's revocation is final.
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &hank.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &admin.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&key)).await;
    assert_eq!(status, 200, "hank's attempt did not revoke gina's key");
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &gina.auth()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&key)).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let (status, body) = api.get("/api/v1/users/me", &Auth::bearer(&key)).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let (_, body) = api.get("/api/v1/api-keys", &gina.auth()).await;
    assert_eq!(body["data"], json!([]), "revoked keys are not listed");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{key_id}"), &gina.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // Bad input names every field; a shared key needs an admin.
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &gina.auth(),
            json!({ "name": "", "scopes": [], "expiresAt": "2001-01-01T00:00:00Z" }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["name", "scopes", "expiresAt"], "{body}");
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &gina.auth(),
            json!({ "name": "n".repeat(201), "scopes": ["READ"] }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["name"]);
    let (status, body) = api
        .post("/api/v1/api-keys", &gina.auth(), json!({ "name": "x", "scopes": ["UNSPECIFIED"] }))
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["scopes[0]"]);
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &gina.auth(),
            json!({ "name": "fleet", "scopes": ["RUNNER"], "shared": true }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &admin.auth(),
            json!({ "name": "fleet", "scopes": ["RUNNER"], "shared": true }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["apiKey"]["shared"], true);
    let (_, body) = api.get("/api/v1/api-keys", &gina.auth()).await;
    assert_eq!(body["data"], json!([]), "the refused shared key was not stored");

    // Pages.
    for index in 0..3 {
        api.create_key(&hank.auth(), &format!("k{index}"), &["READ"]).await;
    }
    let (status, body) = api.get("/api/v1/api-keys?page=2&pageSize=2", &hank.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["data"][0]["name"], "k0", "newest first");
    assert_eq!(body["meta"]["pagination"]["totalPages"], 2);
    let (status, body) = api.get("/api/v1/api-keys?pageSize=0&page=0", &hank.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["page", "pageSize"]);
    let (status, body) = api.get("/api/v1/api-keys?pageSize=500", &hank.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["pageSize"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_and_revoked_by_their_owner_only_over_grpc() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let _admin = api.register("root@example.com", "Root").await;
    let ivy = api.register("ivy@example.com", "Ivy").await;
    let jack = api.register("jack@example.com", "Jack").await;
    let mut keys = api.keys().await;

    let created = keys
        .create_api_key(grpc(
            CreateApiKeyRequest {
                name: "deploy".into(),
                scopes: vec![ApiKeyScope::Write.into(), ApiKeyScope::Write.into()],
                shared: false,
                expires_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp() + 3_600,
                    nanos: 0,
                }),
            },
            &ivy.auth(),
        ))
        .await
        .expect("create")
        .into_inner();
    let api_key = created.api_key.expect("api key");
    assert!(created.key.starts_with(&format!("{}_", api_key.prefix)));
    assert_eq!(api_key.scopes, vec![i32::from(ApiKeyScope::Write)], "scopes are deduplicated");
    assert!(api_key.expires_at.is_some());

    let listed = keys
        .list_api_keys(grpc(ListApiKeysRequest::default(), &ivy.auth()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].prefix, api_key.prefix);
    assert_eq!(listed.pagination.as_ref().expect("pagination").total, 1);
    assert!(!format!("{listed:?}").contains(&created.key));

    let shared = keys
        .create_api_key(grpc(
            CreateApiKeyRequest {
                name: "fleet".into(),
                scopes: vec![ApiKeyScope::Runner.into()],
                shared: true,
                expires_at: None,
            },
            &ivy.auth(),
        ))
        .await
        .expect_err("shared needs an admin");
    assert_eq!(shared.code(), tonic::Code::PermissionDenied);
    let invalid = keys
        .create_api_key(grpc(
            CreateApiKeyRequest {
                name: "late".into(),
                scopes: vec![],
                shared: false,
                expires_at: Some(prost_types::Timestamp { seconds: 1_000, nanos: 0 }),
            },
            &ivy.auth(),
        ))
        .await
        .expect_err("invalid");
    assert_eq!(violated_fields(&invalid), vec!["scopes", "expiresAt"]);

    let foreign = keys
        .delete_api_key(grpc(DeleteApiKeyRequest { api_key_id: api_key.id.clone() }, &jack.auth()))
        .await
        .expect_err("someone else's key");
    assert_eq!(foreign.code(), tonic::Code::NotFound);
    let malformed = keys
        .delete_api_key(grpc(DeleteApiKeyRequest { api_key_id: "nope".into() }, &ivy.auth()))
        .await
        .expect_err("malformed id");
    assert_eq!(violated_fields(&malformed), vec!["apiKeyId"]);
    keys.delete_api_key(grpc(DeleteApiKeyRequest { api_key_id: api_key.id.clone() }, &ivy.auth()))
        .await
        .expect("revoke");
    let (_, body) = api.get("/api/v1/api-keys", &ivy.auth()).await;
    assert_eq!(body["data"], json!([]), "REST sees the revocation");
    let mut users = api.users().await;
    let refused = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::key(&created.key)))
        .await
        .expect_err("revoked key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_authenticate_with_exactly_their_scopes_on_both_transports() {
    let (server, data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("root@example.com", "Root").await;
    let kim = api.register("kim@example.com", "Kim").await;
    let (write_key, _) = api.create_key(&kim.auth(), "writer", &["READ", "WRITE"]).await;
    let (read_key, _) = api.create_key(&kim.auth(), "reader", &["READ"]).await;
    let (runner_key, _) = api.create_key(&kim.auth(), "runner", &["RUNNER"]).await;
    api.create_key(&kim.auth(), "unused", &["READ"]).await;
    let mut users = api.users().await;
    let mut keys = api.keys().await;

    // Both header forms, both transports.
    for auth in [Auth::key(&write_key), Auth::bearer(&write_key)] {
        let (status, body) = api.get("/api/v1/users/me", &auth).await;
        assert_eq!(status, 200, "{auth:?}: {body}");
        assert_eq!(body["data"]["id"], kim.id.as_str());
        let me = users
            .get_current_user(grpc(GetCurrentUserRequest {}, &auth))
            .await
            .expect("grpc with a key")
            .into_inner()
            .user
            .expect("user");
        assert_eq!(me.email, "kim@example.com");
    }
    // And grpc-web, as a browser sends it.
    for auth in [Auth::key(&write_key), Auth::bearer(&write_key)] {
        let (status, payload) = api
            .grpc_web(
                "/turbocat.v1.UserService/GetCurrentUser",
                GetCurrentUserRequest {}.encode_to_vec(),
                &auth,
            )
            .await;
        assert_eq!(status, "0", "{auth:?}");
        let me = GetCurrentUserResponse::decode(payload.as_slice()).expect("decode").user;
        assert_eq!(me.map(|user| user.id), Some(kim.id.clone()));
    }
    let (status, _) = api
        .grpc_web(
            "/turbocat.v1.UserService/GetCurrentUser",
            GetCurrentUserRequest {}.encode_to_vec(),
            &Auth::key(&runner_key),
        )
        .await;
    assert_eq!(status, "7", "grpc-web refuses a runner key with PERMISSION_DENIED");
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &Auth::key(&write_key),
            json!({ "fullName": "Kim K", "version": 1 }),
        )
        .await;
    assert_eq!(status, 200, "a write key writes: {body}");

    // A read key reads and does not write.
    let (status, _) = api.get("/api/v1/users/me", &Auth::bearer(&read_key)).await;
    assert_eq!(status, 200);
    let (status, body) = api
        .patch(
            "/api/v1/users/me",
            &Auth::key(&read_key),
            json!({ "fullName": "Nope", "version": 2 }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api
        .post("/api/v1/api-keys", &Auth::key(&read_key), json!({ "name": "x", "scopes": ["READ"] }))
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let refused = users
        .update_current_user(grpc(
            UpdateCurrentUserRequest {
                user: Some(User { full_name: "Nope".into(), version: 2, ..User::default() }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["full_name".into()] }),
            },
            &Auth::key(&read_key),
        ))
        .await
        .expect_err("a read key cannot write");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // A write key cannot mint a key with a scope it lacks.
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &Auth::key(&write_key),
            json!({ "name": "x", "scopes": ["RUNNER"] }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");

    // A runner-only key acts as an agent: no user routes.
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.get("/api/v1/api-keys", &Auth::bearer(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let refused = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::bearer(&runner_key)))
        .await
        .expect_err("runner key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = keys
        .list_api_keys(grpc(ListApiKeysRequest::default(), &Auth::key(&runner_key)))
        .await
        .expect_err("runner key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // A user's key is no admin's.
    let refused = users
        .list_users(grpc(ListUsersRequest::default(), &Auth::key(&write_key)))
        .await
        .expect_err("not an admin");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Unknown and malformed keys are refused like any bad credential.
    let forged = format!("{}x", &write_key[..write_key.len() - 1]);
    for auth in
        [Auth::key(&forged), Auth::bearer(&forged), Auth::key("tc_nope"), Auth::key("hello")]
    {
        let (status, body) = api.get("/api/v1/users/me", &auth).await;
        assert_error(status, &body, 401, "UNAUTHORIZED");
        let refused = users
            .get_current_user(grpc(GetCurrentUserRequest {}, &auth))
            .await
            .expect_err("bad key");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    }

    // lastUsedAt is stamped on use, not on creation.
    let (_, body) = api.get("/api/v1/api-keys?pageSize=100", &kim.auth()).await;
    let listed = body["data"].as_array().expect("keys").clone();
    let last_used = |name: &str| {
        listed
            .iter()
            .find(|key| key["name"] == name)
            .map(|key| key["lastUsedAt"].clone())
            .expect("key")
    };
    assert!(last_used("writer").is_string(), "{body}");
    assert!(last_used("reader").is_string(), "{body}");
    assert!(last_used("unused").is_null(), "{body}");
    // Used again within the minute, the stamp stays: no write per request.
    let first_stamp = last_used("writer");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&write_key)).await;
    assert_eq!(status, 200);
    let (_, body) = api.get("/api/v1/api-keys?pageSize=100", &kim.auth()).await;
    let again = body["data"]
        .as_array()
        .and_then(|keys| keys.iter().find(|key| key["name"] == "writer"))
        .map(|key| key["lastUsedAt"].clone());
    assert_eq!(again, Some(first_stamp), "{body}");

    // An expired key is refused.
    let expires_at = chrono::Utc::now() + chrono::Duration::seconds(2);
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &kim.auth(),
            json!({ "name": "brief", "scopes": ["READ"], "expiresAt": expires_at.to_rfc3339() }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let brief_key = body["data"]["key"].as_str().expect("key").to_owned();
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&brief_key)).await;
    assert_eq!(status, 200, "valid until it expires");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&brief_key)).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let refused = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::bearer(&brief_key)))
        .await
        .expect_err("expired");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // An admin's key has the admin's rights; a deleted owner's keys die with them.
    let store = dev_store(data_dir.path()).await;
    let admin_key = api.create_key(&admin.auth(), "admin-write", &["READ", "WRITE"]).await.0;
    let (status, _) = api.get("/api/v1/users", &Auth::key(&admin_key)).await;
    assert_eq!(status, 200, "an admin's key has the admin's rights");
    let kim_id = uuid::Uuid::parse_str(&kim.id).expect("uuid");
    store.soft_delete_user(kim_id, None).await.expect("delete kim");
    let (status, body) = api.get("/api/v1/users/me", &Auth::key(&write_key)).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let refused = users
        .get_current_user(grpc(GetCurrentUserRequest {}, &Auth::key(&write_key)))
        .await
        .expect_err("owner deleted");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_cannot_manage_api_keys_over_rest_or_grpc() {
    let (server, _data_dir) = start_dev(&[]);
    let api = Api::new(&server);
    let _admin = api.register("root@example.com", "Root").await;
    let lena = api.register("lena@example.com", "Lena").await;
    let (parent, parent_id) = api.create_key(&lena.auth(), "parent", &["READ", "WRITE"]).await;
    let (_, sibling_id) = api.create_key(&lena.auth(), "sibling", &["READ"]).await;

    // A key mints no key, lists none and revokes none, as x-api-key or bearer, REST or gRPC.
    for auth in [Auth::key(&parent), Auth::bearer(&parent)] {
        let (status, body) = api
            .post("/api/v1/api-keys", &auth, json!({ "name": "child", "scopes": ["READ"] }))
            .await;
        assert_error(status, &body, 403, "FORBIDDEN");
        assert!(
            body["error"]["message"].as_str().unwrap_or_default().contains("signed-in session"),
            "{body}"
        );
        let (status, body) = api.get("/api/v1/api-keys", &auth).await;
        assert_error(status, &body, 403, "FORBIDDEN");
        let (status, body) = api.delete(&format!("/api/v1/api-keys/{sibling_id}"), &auth).await;
        assert_error(status, &body, 403, "FORBIDDEN");
    }
    let mut keys = api.keys().await;
    let refused = keys
        .create_api_key(grpc(
            CreateApiKeyRequest {
                name: "child".into(),
                scopes: vec![ApiKeyScope::Read as i32],
                ..CreateApiKeyRequest::default()
            },
            &Auth::key(&parent),
        ))
        .await
        .expect_err("a key mints no key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = keys
        .delete_api_key(grpc(
            DeleteApiKeyRequest { api_key_id: sibling_id.clone() },
            &Auth::key(&parent),
        ))
        .await
        .expect_err("a key revokes no key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // The key still does what keys are for, and the session manages keys: the sibling is
    // still live, and revoking the parent leaves nothing of it working.
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&parent)).await;
    assert_eq!(status, 200);
    let (status, body) = api.get("/api/v1/api-keys", &lena.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "no child was made: {body}");
    let (status, body) = api.delete(&format!("/api/v1/api-keys/{parent_id}"), &lena.auth()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = api.get("/api/v1/users/me", &Auth::key(&parent)).await;
    assert_eq!(status, 401);
}
