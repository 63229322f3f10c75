//! Bearer tokens of an external identity provider (OIDC, Supabase Auth): verified against the
//! provider's JWKS (served by this test), mapped to one local user on first sight, refused
//! when anything is off; our own tokens still go to the local verifier.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sqlx::Row;
use turbocat::proto::v1::GetCurrentUserRequest;
use turbocat::proto::v1::user_service_client::UserServiceClient;

use crate::identity_provider::{AUDIENCE, ISSUER, JwksServer, SigningKey, claims};
use crate::support::{TurbocatProcess, run_turbocat, start_dev, start_serve};
use crate::{grpc_channel, grpc_request, http, register, sqlite_rows};

/// The current user as REST sees it with `token`: (status, body).
async fn rest_current_user(base_url: &str, token: &str) -> (u16, Value) {
    let response = http()
        .get(format!("{base_url}/api/v1/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("users/me");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// The current user as gRPC sees it with `token`.
async fn grpc_current_user(
    base_url: &str,
    token: &str,
) -> Result<turbocat::proto::v1::User, tonic::Status> {
    let mut users = UserServiceClient::new(grpc_channel(base_url).await);
    let authorization = format!("Bearer {token}");
    users
        .get_current_user(grpc_request(
            GetCurrentUserRequest {},
            &[("authorization", authorization.as_str())],
        ))
        .await
        .map(|response| response.into_inner().user.expect("user"))
}

/// The user id `token` authenticates as, checked to agree over REST and gRPC.
async fn authenticated_user(base_url: &str, token: &str) -> Value {
    let (status, body) = rest_current_user(base_url, token).await;
    assert_eq!(status, 200, "REST accepts the token: {body}");
    let user = body["data"].clone();
    assert!(user.is_object(), "{body}");
    let grpc_user = grpc_current_user(base_url, token).await.expect("gRPC accepts the token");
    assert_eq!(user["id"], grpc_user.id.as_str(), "both transports see the same user");
    assert_eq!(user["email"], grpc_user.email.as_str());
    user
}

/// Asserts `token` is refused with 401 / UNAUTHENTICATED on both transports.
async fn assert_refused(base_url: &str, token: &str, case: &str) {
    let (status, body) = rest_current_user(base_url, token).await;
    assert_eq!(status, 401, "{case}: REST refuses: {body}");
    assert_eq!(body["error"]["code"], "UNAUTHORIZED", "{case}: {body}");
    let error = grpc_current_user(base_url, token).await.expect_err(case);
    assert_eq!(error.code(), tonic::Code::Unauthenticated, "{case}: gRPC refuses");
    // The caller learns nothing about why.
    assert_eq!(error.message(), "authentication required", "{case}");
}

fn start_with_provider(provider: &JwksServer) -> (TurbocatProcess, tempfile::TempDir) {
    let flags = provider.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    start_dev(&flags)
}

/// (email, password_hash is null) of the users of `subject`.
async fn users_of_subject(data_dir: &std::path::Path) -> Vec<(String, String, bool, String)> {
    sqlite_rows(
        data_dir,
        "SELECT external_subject, email, password_hash IS NULL AS passwordless, role \
         FROM users WHERE external_issuer IS NOT NULL ORDER BY created_at",
    )
    .await
    .iter()
    .map(|row| {
        (
            row.get::<String, _>("external_subject"),
            row.get::<String, _>("email"),
            row.get::<bool, _>("passwordless"),
            row.get::<String, _>("role"),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_token_maps_to_one_local_user_created_on_first_sight() {
    let rsa_key = SigningKey::rsa("rsa-1");
    let ed_key = SigningKey::ed25519("ed-1");
    let provider = JwksServer::start(&[&rsa_key, &ed_key]).await;
    let (server, data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();

    let first_token = rsa_key.sign(&claims("subject-a", Some("Alice@IdP.test")));
    let first = authenticated_user(&base_url, &first_token).await;
    assert_eq!(first["email"], "alice@idp.test");
    assert_eq!(first["role"], "USER", "{first}");
    assert_eq!(first["fullName"], "External Person");

    // The same identity through the other key type is the same user; nothing new is created.
    let second_token = ed_key.sign(&claims("subject-a", Some("alice@idp.test")));
    let second = authenticated_user(&base_url, &second_token).await;
    assert_eq!(second["id"], first["id"]);

    // No email, or an unverified one: a placeholder address, never the claimed one.
    let no_email = authenticated_user(&base_url, &ed_key.sign(&claims("subject-b", None))).await;
    let mut unverified_claims = claims("subject-c", Some("carol@idp.test"));
    unverified_claims["email_verified"] = json!(false);
    let unverified = authenticated_user(&base_url, &rsa_key.sign(&unverified_claims)).await;
    for user in [&no_email, &unverified] {
        assert_ne!(user["id"], first["id"]);
        let email = user["email"].as_str().expect("email");
        assert!(email.ends_with("@external.invalid"), "placeholder email, got {email}");
    }
    assert_ne!(no_email["id"], unverified["id"]);

    let users = users_of_subject(data_dir.path()).await;
    assert_eq!(users.len(), 3, "one user per subject: {users:?}");
    assert_eq!(users[0].0, "subject-a");
    assert_eq!(users[0].1, "alice@idp.test");
    assert!(users.iter().all(|(_, _, passwordless, role)| *passwordless && role == "USER"));
    let issuers = sqlite_rows(
        data_dir.path(),
        "SELECT DISTINCT external_issuer FROM users WHERE external_issuer IS NOT NULL",
    )
    .await;
    assert_eq!(issuers.len(), 1);
    assert_eq!(issuers[0].get::<String, _>(0), ISSUER);
    // Every token above was checked against one cached key set.
    assert_eq!(provider.fetches(), 1, "the key set is cached");
    let logs = server.stderr_text();
    assert!(!logs.contains(&first_token) && !logs.contains(&second_token), "no token in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_of_one_identity_make_one_user() {
    let ed_key = SigningKey::ed25519("ed-1");
    let provider = JwksServer::start(&[&ed_key]).await;
    let (server, data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();
    let token = ed_key.sign(&claims("eager", Some("eager@idp.test")));
    let attempts = (0..8).map(|_| rest_current_user(&base_url, &token));
    let answers = futures::future::join_all(attempts).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "every first request is accepted: {body}");
            body["data"]["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "one user for one identity: {ids:?}");
    let users = users_of_subject(data_dir.path()).await;
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0].1, "eager@idp.test");
    // Only the request that created the user audits the creation.
    let created = sqlite_rows(
        data_dir.path(),
        "SELECT id FROM audit_logs WHERE action = 'auth.external_user_created'",
    )
    .await;
    assert_eq!(created.len(), 1, "one creation, one audit row");
}

/// `last_login_at` of the external user of `subject`, as stored.
async fn last_login_of_subject(data_dir: &std::path::Path, subject: &str) -> Option<String> {
    let rows = sqlite_rows(
        data_dir,
        "SELECT external_subject, last_login_at FROM users WHERE external_issuer IS NOT NULL",
    )
    .await;
    let row = rows
        .iter()
        .find(|row| row.get::<String, _>("external_subject") == subject)
        .expect("the user of the subject");
    row.get::<Option<String>, _>("last_login_at")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sight_is_audited_and_logins_are_stamped_at_most_once_a_minute() {
    let ed_key = SigningKey::ed25519("ed-1");
    let provider = JwksServer::start(&[&ed_key]).await;
    let (server, data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();
    let token = ed_key.sign(&claims("audited", Some("audited@idp.test")));

    let response = http()
        .get(format!("{base_url}/api/v1/users/me"))
        .bearer_auth(&token)
        .header("user-agent", "edge-audit-test/1.0")
        .header("x-request-id", "external-first-sight-1")
        .send()
        .await
        .expect("users/me");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    let user_id = body["data"]["id"].as_str().expect("id").to_owned();
    let compact_user_id = user_id.replace('-', "");

    let rows = sqlite_rows(
        data_dir.path(),
        "SELECT lower(hex(actor_id)) AS actor, actor_kind, resource_type, resource_id, outcome, \
         ip_address, user_agent, request_id, metadata \
         FROM audit_logs WHERE action = 'auth.external_user_created'",
    )
    .await;
    assert_eq!(rows.len(), 1, "the creation is audited once");
    let row = &rows[0];
    assert_eq!(row.get::<String, _>("actor"), compact_user_id, "the new user is the actor");
    assert_eq!(row.get::<String, _>("actor_kind"), "USER");
    assert_eq!(row.get::<String, _>("resource_type"), "user");
    assert_eq!(row.get::<Option<String>, _>("resource_id").as_deref(), Some(user_id.as_str()));
    assert_eq!(row.get::<String, _>("outcome"), "SUCCESS");
    assert_eq!(row.get::<Option<String>, _>("ip_address").as_deref(), Some("127.0.0.1"));
    assert_eq!(row.get::<Option<String>, _>("user_agent").as_deref(), Some("edge-audit-test/1.0"));
    assert_eq!(
        row.get::<Option<String>, _>("request_id").as_deref(),
        Some("external-first-sight-1")
    );
    let metadata: Value =
        serde_json::from_str(&row.get::<String, _>("metadata")).expect("metadata json");
    assert_eq!(metadata["issuer"], ISSUER, "{metadata}");
    assert!(!metadata.to_string().contains(&token), "no token in the audit row");

    let first_login = last_login_of_subject(data_dir.path(), "audited").await;
    assert!(first_login.is_some(), "the first sight stamps last_login_at");

    // Within the minute, further requests (either transport) neither stamp nor audit again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let same_user = authenticated_user(&base_url, &token).await;
    assert_eq!(same_user["id"], user_id.as_str());
    assert_eq!(
        last_login_of_subject(data_dir.path(), "audited").await,
        first_login,
        "last_login_at is written at most once a minute"
    );
    let audit_rows = sqlite_rows(
        data_dir.path(),
        "SELECT id FROM audit_logs WHERE action = 'auth.external_user_created'",
    )
    .await;
    assert_eq!(audit_rows.len(), 1, "a known identity is not audited as created again");

    // The stamp is per user: another identity is stamped on its own first sight.
    let other = ed_key.sign(&claims("audited-too", None));
    authenticated_user(&base_url, &other).await;
    assert!(last_login_of_subject(data_dir.path(), "audited-too").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_external_tokens_are_refused() {
    let rsa_key = SigningKey::rsa("rsa-1");
    let ed_key = SigningKey::ed25519("ed-1");
    let stranger_key = SigningKey::ed25519("ghost");
    let provider = JwksServer::start(&[&rsa_key, &ed_key]).await;
    // A symmetric key in the set must never verify anything: anyone could read it there.
    let shared_secret = "a-shared-secret-published-in-the-jwks-0123456789";
    provider.add_jwk(json!({
        "kty": "oct", "kid": "hmac", "alg": "HS256",
        "k": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, shared_secret),
    }));
    // And an encryption key is no signature key.
    let mut encryption_jwk = SigningKey::ed25519("enc-1");
    encryption_jwk.jwk["use"] = json!("enc");
    provider.add_jwk(encryption_jwk.jwk.clone());
    let (server, data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();
    // A valid token first, so the key set is cached.
    authenticated_user(&base_url, &ed_key.sign(&claims("good", None))).await;
    assert_eq!(provider.fetches(), 1);

    let now = chrono::Utc::now().timestamp();
    let with = |changes: Value| {
        let mut token_claims = claims("bad", Some("bad@idp.test"));
        for (name, value) in changes.as_object().expect("object") {
            if value.is_null() {
                token_claims.as_object_mut().expect("object").remove(name);
            } else {
                token_claims[name] = value.clone();
            }
        }
        token_claims
    };
    let valid = rsa_key.sign(&claims("bad", Some("bad@idp.test")));
    let (head, rest) = valid.split_once('.').expect("jwt");
    let (_, signature) = rest.split_once('.').expect("jwt");
    let forged_payload = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        serde_json::to_vec(&with(json!({ "sub": "good" }))).expect("json"),
    );
    let tampered = format!("{head}.{forged_payload}.{signature}");
    // Algorithm confusion: HS256 "signed" with the RSA key's public modulus, naming its kid.
    let mut hmac_header = Header::new(Algorithm::HS256);
    hmac_header.kid = Some("rsa-1".into());
    let confused = jsonwebtoken::encode(
        &hmac_header,
        &claims("bad", None),
        &EncodingKey::from_secret(rsa_key.jwk["n"].as_str().expect("n").as_bytes()),
    )
    .expect("sign");

    let mut symmetric_header = Header::new(Algorithm::HS256);
    symmetric_header.kid = Some("hmac".into());
    let symmetric = jsonwebtoken::encode(
        &symmetric_header,
        &claims("bad", None),
        &EncodingKey::from_secret(shared_secret.as_bytes()),
    )
    .expect("sign");

    let cases = [
        ("symmetric key of the set", symmetric),
        ("encryption key of the set", encryption_jwk.sign(&with(json!({})))),
        ("wrong audience", rsa_key.sign(&with(json!({ "aud": "someone-else" })))),
        ("no audience", rsa_key.sign(&with(json!({ "aud": null })))),
        ("expired", ed_key.sign(&with(json!({ "exp": now - 3600, "iat": now - 7200 })))),
        ("no expiry", ed_key.sign(&with(json!({ "exp": null })))),
        ("not yet valid", ed_key.sign(&with(json!({ "nbf": now + 3600 })))),
        ("empty subject", ed_key.sign(&with(json!({ "sub": "" })))),
        ("wrong issuer", rsa_key.sign(&with(json!({ "iss": "https://other.idp/auth/v1" })))),
        ("unknown key", stranger_key.sign(&with(json!({})))),
        ("no key id", {
            let header = Header::new(Algorithm::EdDSA);
            let token = ed_key.sign(&with(json!({})));
            let (_, rest) = token.split_once('.').expect("jwt");
            let header_json = serde_json::to_vec(&header).expect("header");
            let encoded = base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                header_json,
            );
            format!("{encoded}.{rest}")
        }),
        ("key of another algorithm", ed_key.sign_with_kid(&with(json!({})), "rsa-1")),
        ("tampered payload", tampered),
        ("hmac with the public key", confused),
        ("garbage", "eyJhbGciOi.not-a.token".to_owned()),
    ];
    for (case, token) in &cases {
        assert_refused(&base_url, token, case).await;
    }
    // Six requests with unknown key ids: without the refetch interval each would fetch the
    // key set; with it there is at most one fetch per five seconds (two if this loop was slow).
    assert!(provider.fetches() <= 3, "fetched {} times", provider.fetches());

    // An email that belongs to a local account: refused, never merged.
    register(&base_url, "taken@idp.test").await;
    let squatter = rsa_key.sign(&claims("squatter", Some("taken@idp.test")));
    assert_refused(&base_url, &squatter, "email of a local account").await;
    let taken = sqlite_rows(
        data_dir.path(),
        "SELECT external_subject FROM users WHERE email = 'taken@idp.test'",
    )
    .await;
    assert_eq!(taken.len(), 1, "still one account with that email");
    assert_eq!(taken[0].get::<Option<String>, _>(0), None, "the local account is not linked");

    let users = users_of_subject(data_dir.path()).await;
    assert_eq!(users.len(), 1, "only the good token made a user: {users:?}");
    assert_eq!(users[0].0, "good");
    let logs = server.stderr_text();
    assert!(
        logs.contains("refused an external identity whose email belongs to another account"),
        "the refusal is logged"
    );
    assert!(cases.iter().all(|(_, token)| !logs.contains(token.as_str())), "no token in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_fetched_on_first_sight_at_most_once_per_interval() {
    let old_key = SigningKey::ed25519("2026-old");
    let new_key = SigningKey::rsa("2026-new");
    let provider = JwksServer::start(&[&old_key]).await;
    let (server, _data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();

    let user = authenticated_user(&base_url, &old_key.sign(&claims("rotating", None))).await;
    assert_eq!(provider.fetches(), 1);

    // The provider rotates; right after a fetch, an unknown kid does not fetch again at once.
    provider.add_key(&new_key);
    let new_token = new_key.sign(&claims("rotating", None));
    let fetches_before = provider.fetches();
    assert_refused(&base_url, &new_token, "a kid seen within the refetch interval").await;
    assert_eq!(provider.fetches(), fetches_before, "no fetch within the interval");

    tokio::time::sleep(Duration::from_millis(5_300)).await;
    let rotated = authenticated_user(&base_url, &new_token).await;
    assert_eq!(rotated["id"], user["id"], "same subject, same user");
    assert_eq!(provider.fetches(), fetches_before + 1, "one fetch for the new kid");
    // Both keys are now cached.
    authenticated_user(&base_url, &old_key.sign(&claims("rotating", None))).await;
    authenticated_user(&base_url, &new_token).await;
    assert_eq!(provider.fetches(), fetches_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_own_tokens_still_go_to_the_local_verifier() {
    let rsa_key = SigningKey::rsa("rsa-1");
    let provider = JwksServer::start(&[&rsa_key]).await;
    let (server, _data_dir) = start_with_provider(&provider);
    let base_url = server.base_url();

    let local_token = register(&base_url, "local@example.com").await;
    let local = authenticated_user(&base_url, &local_token).await;
    assert_eq!(local["email"], "local@example.com");

    // The provider's key cannot mint a token of our issuer.
    let mut forged = claims("subject", None);
    forged["iss"] = json!("turbocat");
    forged["aud"] = json!("turbocat-api");
    forged["sub"] = local["id"].clone();
    forged["role"] = json!("ADMIN");
    forged["sid"] = json!(uuid::Uuid::new_v4().to_string());
    forged["jti"] = json!(uuid::Uuid::new_v4().to_string());
    assert_refused(&base_url, &rsa_key.sign(&forged), "our issuer, the provider's key").await;
    assert_eq!(provider.fetches(), 0, "tokens of our issuer never consult the provider");
    let _ = AUDIENCE;
}

/// (flags, environment, what the error must name).
type StartUpCase = (&'static [&'static str], &'static [(&'static str, &'static str)], &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_external_settings_are_refused_at_start_up() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8");
    let base = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
    let cases: [StartUpCase; 4] = [
        (&["--external-issuer", ISSUER], &[], "--external-jwks-url"),
        (
            &["--external-jwks-url", "https://idp.test/jwks.json", "--external-issuer", ISSUER],
            &[],
            "--external-audience",
        ),
        (
            &[],
            &[
                ("TURBOCAT_EXTERNAL_JWKS_URL", "https://idp.test/jwks.json"),
                ("TURBOCAT_EXTERNAL_AUDIENCE", "authenticated"),
            ],
            "TURBOCAT_EXTERNAL_ISSUER",
        ),
        (
            &[
                "--external-jwks-url",
                "ftp://idp.test/jwks.json",
                "--external-issuer",
                ISSUER,
                "--external-audience",
                "authenticated",
            ],
            &[],
            "unsupported scheme `ftp`",
        ),
    ];
    for (flags, environment, expected) in cases {
        let mut arguments = base.to_vec();
        arguments.extend_from_slice(flags);
        let (success, _, stderr) = run_turbocat(&arguments, environment);
        assert!(!success, "{flags:?} {environment:?} must not start");
        assert!(stderr.contains(expected), "{expected} named in: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_maps_external_tokens_on_postgres() {
    let ed_key = SigningKey::ed25519("ed-1");
    let provider = JwksServer::start(&[&ed_key]).await;
    let flags = provider.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (server, database) = start_serve(&flags).await;
    let base_url = server.base_url();

    let first =
        authenticated_user(&base_url, &ed_key.sign(&claims("pg-subject", Some("pg@idp.test"))))
            .await;
    assert_eq!(first["email"], "pg@idp.test");
    let again =
        authenticated_user(&base_url, &ed_key.sign(&claims("pg-subject", Some("pg@idp.test"))))
            .await;
    assert_eq!(again["id"], first["id"], "reused on second sight");
    let mut wrong_audience = claims("pg-subject", None);
    wrong_audience["aud"] = json!("someone-else");
    assert_refused(&base_url, &ed_key.sign(&wrong_audience), "wrong audience").await;

    // On PostgreSQL too: one creation audit row naming the user, and a stamped last login.
    use sqlx::Connection;
    let mut connection =
        sqlx::PgConnection::connect(&database.url).await.expect("open serve database");
    let audit_actors: Vec<(Option<uuid::Uuid>, serde_json::Value)> = sqlx::query_as(
        "SELECT actor_id, metadata FROM audit_logs WHERE action = 'auth.external_user_created'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("audit rows");
    let first_id: uuid::Uuid = first["id"].as_str().expect("id").parse().expect("uuid");
    assert_eq!(audit_actors.len(), 1, "{audit_actors:?}");
    assert_eq!(audit_actors[0].0, Some(first_id));
    assert_eq!(audit_actors[0].1["issuer"], ISSUER);
    let last_login: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT last_login_at FROM users WHERE id = $1")
            .bind(first_id)
            .fetch_one(&mut connection)
            .await
            .expect("last login");
    assert!(last_login.is_some(), "last_login_at is stamped");
}
