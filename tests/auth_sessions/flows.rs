//! Refresh, reuse detection, logout and password reset end to end in `dev`, over both
//! transports; email enumeration; secrets kept out of the log and the audit trail.

use base64::Engine;
use serde_json::Value;
use turbocat::store::AuditOutcome;

use crate::support::start_dev;
use crate::{
    Client, NEW_PASSWORD, PASSWORD, TRANSPORTS, Transport, assert_unauthorized, audit_rows,
    dev_store, reset_token_from_log, unique_email,
};

/// The claims of a JWT, read without verifying it.
pub fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a jwt has a payload");
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url");
    serde_json::from_slice(&bytes).expect("json claims")
}

fn session_of(token: &str) -> String {
    claims_of(token)["sid"].as_str().expect("sid").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_the_pair_and_keeps_the_session_working() {
    let (server, _directory) = start_dev(&[]);
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let email = unique_email("rotate");
        let first = client.register(&email, PASSWORD).await.expect("register");
        assert_eq!(client.me(&first.access_token).await.expect("me"), first.user_id);

        let second = client.refresh(&first.refresh_token).await.expect("refresh");
        assert_eq!(second.user_id, first.user_id, "{transport:?}");
        assert_eq!(second.expires_in, 900);
        assert_ne!(second.refresh_token, first.refresh_token, "the refresh token rotates");
        assert_ne!(second.access_token, first.access_token);
        assert_eq!(session_of(&second.access_token), session_of(&first.access_token));
        assert_eq!(client.me(&second.access_token).await.expect("new access"), first.user_id);
        // Refreshing does not end the session: its earlier access token is still good.
        assert_eq!(client.me(&first.access_token).await.expect("old access"), first.user_id);

        let third = client.refresh(&second.refresh_token).await.expect("refresh again");
        assert_eq!(client.me(&third.access_token).await.expect("third access"), first.user_id);

        let unknown = assert_unauthorized(client.refresh("not-a-real-token").await, "unknown");
        assert_eq!(unknown.message, "invalid or expired refresh token");
        let empty = client.refresh("  ").await.expect_err("empty token");
        assert_eq!(empty.code, "VALIDATION_ERROR", "{empty:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_refresh_token_revokes_the_whole_family() {
    let (server, directory) = start_dev(&[]);
    let store = dev_store(directory.path()).await;
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let email = unique_email("reuse");
        let first = client.register(&email, PASSWORD).await.expect("register");
        let other_session = client.login(&email, PASSWORD).await.expect("second session");
        let second = client.refresh(&first.refresh_token).await.expect("refresh");

        // The rotated token comes back: the family is presumed stolen.
        let reused = assert_unauthorized(client.refresh(&first.refresh_token).await, "reuse");
        assert_eq!(reused.message, "invalid or expired refresh token", "same as unknown");
        assert_unauthorized(client.refresh(&second.refresh_token).await, "newest is dead too");
        assert_unauthorized(client.me(&second.access_token).await, "new access refused");
        assert_unauthorized(client.me(&first.access_token).await, "old access refused");
        // Only that family: the user's other session lives on.
        assert_eq!(client.me(&other_session.access_token).await.expect("other"), first.user_id);
        client.refresh(&other_session.refresh_token).await.expect("other session refreshes");

        let session_id = session_of(&first.access_token);
        let rows = audit_rows(store.as_ref()).await;
        let reuse_rows: Vec<_> = rows
            .iter()
            .filter(|row| {
                row.action == "auth.refresh_reuse"
                    && row.resource_id.as_deref() == Some(session_id.as_str())
            })
            .collect();
        assert_eq!(reuse_rows.len(), 1, "{transport:?}: {rows:?}");
        assert_eq!(reuse_rows[0].outcome, AuditOutcome::Failure);
        assert_eq!(reuse_rows[0].actor_id.map(|id| id.to_string()), Some(first.user_id.clone()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_refuses_the_sessions_tokens_and_nothing_else() {
    let (server, directory) = start_dev(&[]);
    let store = dev_store(directory.path()).await;
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let email = unique_email("logout");
        let first = client.register(&email, PASSWORD).await.expect("register");
        let other = client.login(&email, PASSWORD).await.expect("other session");
        let rotated = client.refresh(&first.refresh_token).await.expect("refresh");
        assert_eq!(client.me(&rotated.access_token).await.expect("before"), first.user_id);

        client.logout(&rotated.refresh_token).await.expect("logout");
        assert_unauthorized(client.me(&rotated.access_token).await, "logged-out access token");
        assert_unauthorized(client.me(&first.access_token).await, "earlier token of the session");
        assert_unauthorized(client.refresh(&rotated.refresh_token).await, "logged-out refresh");
        assert_eq!(client.me(&other.access_token).await.expect("other session"), first.user_id);

        // Idempotent, and silent about tokens it does not know (RFC 7009).
        client.logout(&rotated.refresh_token).await.expect("second logout");
        client.logout("never-issued-token").await.expect("unknown token");
        let empty = client.logout("").await.expect_err("empty token");
        assert_eq!(empty.code, "VALIDATION_ERROR", "{empty:?}");

        let session_id = session_of(&first.access_token);
        let rows = audit_rows(store.as_ref()).await;
        let logouts: Vec<_> =
            rows.iter().filter(|row| row.action == "auth.logout").collect::<Vec<_>>();
        let mine: Vec<_> = logouts
            .iter()
            .filter(|row| row.resource_id.as_deref() == Some(session_id.as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "one row for the one revocation: {logouts:?}");
        assert_eq!(mine[0].outcome, AuditOutcome::Success);
        assert_eq!(mine[0].resource_type, "session");
    }
}

/// Moves a reset token's expiry into the past, as 30 minutes passing would.
async fn expire_reset_token(data_dir: &std::path::Path, token: &str) {
    use sqlx::Connection;
    let url = format!("sqlite://{}", data_dir.join("turbocat.db").display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("open sqlite");
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    let updated =
        sqlx::query("UPDATE password_reset_tokens SET expires_at = $1 WHERE token_hash = $2")
            .bind(past)
            .bind(turbocat::auth::tokens::hash_opaque_token(token))
            .execute(&mut connection)
            .await
            .expect("expire the token");
    assert_eq!(updated.rows_affected(), 1, "the token is stored hashed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_reset_is_single_use_expires_and_ends_every_session() {
    let (server, directory) = start_dev(&[]);
    let store = dev_store(directory.path()).await;
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let email = unique_email("reset");
        let first = client.register(&email, PASSWORD).await.expect("register");
        let second = client.login(&email, PASSWORD).await.expect("second session");

        client.forgot_password(&email).await.expect("forgot");
        let token = reset_token_from_log(&server, &email, 1).await;
        let link_line = server
            .stderr_text()
            .lines()
            .find(|line| line.contains(&token))
            .map(str::to_owned)
            .expect("the link line");
        assert!(link_line.contains("/reset-password?token="), "{link_line}");
        assert!(link_line.contains("INFO"), "{link_line}");

        let short = client.reset_password(&token, "short").await.expect_err("short password");
        assert_eq!(short.code, "VALIDATION_ERROR", "{short:?}");
        client.reset_password(&token, NEW_PASSWORD).await.expect("reset");

        // Every session of the user ends, on every token.
        assert_unauthorized(client.me(&first.access_token).await, "first session");
        assert_unauthorized(client.me(&second.access_token).await, "second session");
        assert_unauthorized(client.refresh(&second.refresh_token).await, "refresh after reset");
        assert_unauthorized(client.login(&email, PASSWORD).await, "old password");
        let fresh = client.login(&email, NEW_PASSWORD).await.expect("new password works");
        assert_eq!(client.me(&fresh.access_token).await.expect("fresh session"), first.user_id);

        // Single use; an unknown token gets the very same answer.
        let again =
            assert_unauthorized(client.reset_password(&token, "yet another pw 1").await, "reuse");
        assert_eq!(again.message, "invalid or expired reset token");
        let unknown = assert_unauthorized(
            client.reset_password("no-such-token", "yet another pw 1").await,
            "unknown",
        );
        assert_eq!(unknown.message, again.message);

        // Expired: a second link, aged past its 30 minutes in the database.
        client.forgot_password(&email).await.expect("forgot again");
        let late_token = reset_token_from_log(&server, &email, 2).await;
        assert_ne!(late_token, token);
        expire_reset_token(directory.path(), &late_token).await;
        let late = assert_unauthorized(
            client.reset_password(&late_token, "late password 1").await,
            "late",
        );
        assert_eq!(late.message, again.message);
        client.login(&email, NEW_PASSWORD).await.expect("a late token changed nothing");

        let rows = audit_rows(store.as_ref()).await;
        let user_rows = |action: &str| {
            rows.iter()
                .filter(|row| {
                    row.action == action
                        && row.resource_id.as_deref() == Some(first.user_id.as_str())
                })
                .count()
        };
        assert_eq!(user_rows("auth.password_reset_request"), 2, "{transport:?}");
        assert_eq!(user_rows("auth.password_reset"), 1, "{transport:?}");
        let reasons: Vec<String> = rows
            .iter()
            .filter(|row| {
                row.action == "auth.password_reset" && row.outcome == AuditOutcome::Failure
            })
            .filter_map(|row| row.metadata["reason"].as_str().map(str::to_owned))
            .collect();
        for reason in ["already used", "unknown", "expired"] {
            assert!(reasons.iter().any(|seen| seen == reason), "{reason} in {reasons:?}");
        }
    }
}

/// Two answers with the envelope's `meta` removed.
fn without_meta(mut envelope: Value) -> Value {
    if let Some(object) = envelope.as_object_mut() {
        object.remove("meta");
    }
    envelope
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_and_unknown_emails_get_identical_answers() {
    let (server, _directory) = start_dev(&[]);
    let rest = Client::new(Transport::Rest, &server.base_url()).await;
    let grpc = Client::new(Transport::Grpc, &server.base_url()).await;
    let known = unique_email("known");
    rest.register(&known, PASSWORD).await.expect("register");
    let unknown = unique_email("unknown");

    let forgot_known =
        rest.post_raw("/api/v1/auth/forgot-password", serde_json::json!({ "email": known })).await;
    let forgot_unknown = rest
        .post_raw("/api/v1/auth/forgot-password", serde_json::json!({ "email": unknown }))
        .await;
    assert_eq!(forgot_known.0, 202);
    assert_eq!(forgot_unknown.0, forgot_known.0);
    assert_eq!(without_meta(forgot_unknown.2.clone()), without_meta(forgot_known.2.clone()));
    assert_eq!(without_meta(forgot_known.2), serde_json::json!({ "success": true, "data": {} }));
    grpc.forgot_password(&known).await.expect("grpc known");
    grpc.forgot_password(&unknown).await.expect("grpc unknown answers alike");
    // Only the known account got mail.
    reset_token_from_log(&server, &known, 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!server.stderr_text().contains(&unknown), "no mail, no log line for an unknown email");

    let wrong_password = rest
        .post_raw(
            "/api/v1/auth/login",
            serde_json::json!({ "email": known, "password": "wrong password 1" }),
        )
        .await;
    let unknown_email = rest
        .post_raw(
            "/api/v1/auth/login",
            serde_json::json!({ "email": unknown, "password": "wrong password 1" }),
        )
        .await;
    assert_eq!(wrong_password.0, 401);
    assert_eq!(unknown_email.0, wrong_password.0);
    assert_eq!(without_meta(unknown_email.2), without_meta(wrong_password.2));
    let grpc_wrong = grpc.login(&known, "wrong password 1").await.expect_err("wrong");
    let grpc_unknown = grpc.login(&unknown, "wrong password 1").await.expect_err("unknown");
    assert_eq!(grpc_wrong, grpc_unknown);
    assert_eq!(grpc_wrong.code, "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tokens_never_reach_the_log_or_the_audit_trail() {
    let (server, directory) = start_dev(&["--log-level", "debug"]);
    let store = dev_store(directory.path()).await;
    let mut secrets: Vec<String> = vec![PASSWORD.to_owned(), NEW_PASSWORD.to_owned()];
    let mut reset_tokens = Vec::new();
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let email = unique_email("secret");
        let wrong = format!("wrong-{}", uuid::Uuid::new_v4().simple());
        secrets.push(wrong.clone());
        let registered = client.register(&email, PASSWORD).await.expect("register");
        client.login(&email, &wrong).await.expect_err("wrong password");
        let logged_in = client.login(&email, PASSWORD).await.expect("login");
        let rotated = client.refresh(&logged_in.refresh_token).await.expect("refresh");
        client.refresh(&logged_in.refresh_token).await.expect_err("reuse");
        client.logout(&registered.refresh_token).await.expect("logout");
        client.forgot_password(&email).await.expect("forgot");
        let token = reset_token_from_log(&server, &email, 1).await;
        client.reset_password(&token, NEW_PASSWORD).await.expect("reset");
        for pair in [&registered, &logged_in, &rotated] {
            secrets.push(pair.access_token.clone());
            secrets.push(pair.refresh_token.clone());
            secrets.push(turbocat::auth::tokens::hash_opaque_token(&pair.refresh_token));
        }
        secrets.push(turbocat::auth::tokens::hash_opaque_token(&token));
        reset_tokens.push(token);
    }

    let log = server.stderr_text();
    assert!(log.contains("DEBUG"), "debug logging is on, so the check covers it");
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "the log holds a secret: {secret}");
    }
    for token in &reset_tokens {
        for line in log.lines().filter(|line| line.contains(token.as_str())) {
            assert!(line.contains("reset_link"), "a reset token outside its mail line: {line}");
        }
    }

    let rows = audit_rows(store.as_ref()).await;
    let text = format!("{rows:?}");
    for secret in secrets.iter().chain(reset_tokens.iter()) {
        assert!(!text.contains(secret.as_str()), "an audit row holds a secret: {secret}");
    }
    for action in [
        "auth.register",
        "auth.login",
        "auth.refresh_reuse",
        "auth.logout",
        "auth.password_reset_request",
        "auth.password_reset",
    ] {
        assert!(rows.iter().any(|row| row.action == action), "an {action} row: {rows:?}");
    }
    assert!(
        rows.iter().any(|row| row.action == "auth.login" && row.outcome == AuditOutcome::Failure),
        "failed logins are audited"
    );
    assert!(rows.iter().all(|row| row.ip_address.as_deref() == Some("127.0.0.1")), "{rows:?}");
}
