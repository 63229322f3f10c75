//! Rate limits of the sign-in operations in `dev` (in-memory counters), over both transports.

use std::time::Duration;

use crate::support::{run_turbocat, start_dev};
use crate::{Client, Failure, PASSWORD, TRANSPORTS, Transport, unique_email};

fn assert_rate_limited(
    result: Result<impl std::fmt::Debug, Failure>,
    max_seconds: u64,
    context: &str,
) -> u64 {
    let failure = result.expect_err(context);
    assert_eq!(failure.code, "RATE_LIMITED", "{context}: {failure:?}");
    let retry_after = failure.retry_after_seconds.expect("a retry delay");
    assert!((1..=max_seconds).contains(&retry_after), "{context}: retry after {retry_after}");
    retry_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_brute_force_on_one_account_is_stopped_with_retry_after() {
    let (server, _directory) =
        start_dev(&["--auth-rate-limit-per-account", "3", "--auth-rate-limit-window-seconds", "3"]);
    for transport in TRANSPORTS {
        let client = Client::new(transport, &server.base_url()).await;
        let victim = unique_email("victim");
        let bystander = unique_email("bystander");
        client.register(&victim, PASSWORD).await.expect("register victim");
        client.register(&bystander, PASSWORD).await.expect("register bystander");

        for attempt in 1..=3 {
            let failure =
                client.login(&victim, &format!("guess {attempt} pw")).await.expect_err("guess");
            assert_eq!(failure.code, "UNAUTHORIZED", "attempt {attempt}: {failure:?}");
        }
        assert_rate_limited(client.login(&victim, "guess 4 pw").await, 3, "fourth guess");
        // Over the limit even the right password waits: the limit is on attempts.
        let retry_after =
            assert_rate_limited(client.login(&victim, PASSWORD).await, 3, "right password");
        // The limit is per account: another one from the same address is unaffected.
        client.login(&bystander, PASSWORD).await.expect("another account logs in");
        // A differently cased email is the same account.
        assert_rate_limited(client.login(&victim.to_uppercase(), PASSWORD).await, 3, "case");

        tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(200)).await;
        client.login(&victim, PASSWORD).await.expect("after Retry-After the login works");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sign_in_operation_is_limited_per_client_address() {
    let (server, _directory) = start_dev(&["--auth-rate-limit-per-ip", "4"]);
    let rest = Client::new(Transport::Rest, &server.base_url()).await;
    let grpc = Client::new(Transport::Grpc, &server.base_url()).await;
    let clients = [&rest, &grpc];

    // Four calls of each operation pass, alternating transports (one counter for both).
    let registered = rest.register(&unique_email("ip"), PASSWORD).await.expect("register 1");
    for index in 1..4 {
        clients[index % 2].register(&unique_email("ip"), PASSWORD).await.expect("register");
    }
    for index in 0..4 {
        let client = clients[index % 2];
        client.login(&unique_email("nobody"), PASSWORD).await.expect_err("unknown account");
        client.forgot_password(&unique_email("nobody")).await.expect("forgot");
        client.refresh(&format!("unknown-{index}")).await.expect_err("refresh");
        client.reset_password(&format!("unknown-{index}"), PASSWORD).await.expect_err("reset");
    }
    for client in clients {
        let transport = client.transport;
        let context = format!("{transport:?}");
        assert_rate_limited(client.register(&unique_email("ip"), PASSWORD).await, 60, &context);
        assert_rate_limited(client.login(&unique_email("ip"), PASSWORD).await, 60, &context);
        assert_rate_limited(client.forgot_password(&unique_email("ip")).await, 60, &context);
        assert_rate_limited(client.refresh(&registered.refresh_token).await, 60, &context);
        assert_rate_limited(client.reset_password("unknown", PASSWORD).await, 60, &context);
    }
    // Authenticated calls and logout are not sign-in attempts: they are not limited.
    assert_eq!(rest.me(&registered.access_token).await.expect("me"), registered.user_id);
    rest.logout(&registered.refresh_token).await.expect("logout is not limited");

    // REST: 429 with a Retry-After header and the error envelope.
    let (status, retry_after, envelope) = rest
        .post_raw(
            "/api/v1/auth/login",
            serde_json::json!({ "email": "a@example.com", "password": "x" }),
        )
        .await;
    assert_eq!(status, 429, "{envelope}");
    assert!(retry_after.is_some_and(|seconds| (1..=60).contains(&seconds)), "{retry_after:?}");
    assert_eq!(envelope["error"]["code"], "RATE_LIMITED");
}

#[test]
fn bad_account_security_settings_stop_the_start_naming_the_flag() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8 path");
    let base = ["dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir];
    let (started, _, stderr) =
        run_turbocat(&[&base[..], &["--public-url", "ftp://files.example.com"]].concat(), &[]);
    assert!(!started);
    assert!(stderr.contains("--public-url") && stderr.contains("TURBOCAT_PUBLIC_URL"), "{stderr}");
    let (started, _, stderr) =
        run_turbocat(&base, &[("TURBOCAT_AUTH_RATE_LIMIT_WINDOW_SECONDS", "0")]);
    assert!(!started);
    assert!(stderr.contains("auth-rate-limit-window-seconds"), "{stderr}");
}
