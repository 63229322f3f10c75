//! Two `serve` replicas on one PostgreSQL database and one Redis: revocations made on one are
//! refused on the other within a second, and rate limit counters are shared.

use std::time::{Duration, Instant};

use crate::support::{ServeDatabase, TurbocatProcess, redis_url, start_serve, start_serve_replica};
use crate::{
    Client, NEW_PASSWORD, PASSWORD, TRANSPORTS, assert_unauthorized, audit_rows,
    reset_token_from_log, unique_email,
};

/// Starts a second replica on `database`.
async fn second_replica(database: &ServeDatabase, extra: &[String]) -> TurbocatProcess {
    let borrowed: Vec<&str> = extra.iter().map(String::as_str).collect();
    start_serve_replica(database, &borrowed).await
}

/// Two replicas with their own rate limit counters (so tests sharing the Redis do not meet),
/// and the counters' key prefix.
async fn two_replicas(extra: &[&str]) -> (TurbocatProcess, TurbocatProcess, ServeDatabase, String) {
    let prefix = format!("turbocat:ratelimit:test-{}:", uuid::Uuid::new_v4().simple());
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let mut arguments: Vec<String> = vec![
        "--rate-limit-key-prefix".to_owned(),
        prefix.clone(),
        "--redis-key-prefix".to_owned(),
        redis_prefix,
    ];
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let (first, database) = start_serve(&borrowed).await;
    let second = second_replica(&database, &arguments).await;
    (first, second, database, prefix)
}

/// Polls `probe` until it is refused; how long that took.
async fn time_until_refused(client: &Client, access_token: &str) -> Duration {
    let started = Instant::now();
    loop {
        match client.me(access_token).await {
            Err(failure) => {
                assert_eq!(failure.code, "UNAUTHORIZED", "{failure:?}");
                return started.elapsed();
            }
            Ok(_) => {
                assert!(started.elapsed() < Duration::from_secs(5), "never refused");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_is_refused_on_the_other_within_a_second() {
    let (first, second, database, _prefix) = two_replicas(&[]).await;
    for transport in TRANSPORTS {
        let on_first = Client::new(transport, &first.base_url()).await;
        let on_second = Client::new(transport, &second.base_url()).await;
        let email = unique_email("replica");

        // Logout on the first replica.
        let pair = on_first.register(&email, PASSWORD).await.expect("register");
        assert_eq!(on_second.me(&pair.access_token).await.expect("seen by B"), pair.user_id);
        on_first.logout(&pair.refresh_token).await.expect("logout on A");
        let delay = time_until_refused(&on_second, &pair.access_token).await;
        assert!(delay < Duration::from_millis(1200), "{transport:?}: refused after {delay:?}");
        assert_unauthorized(on_first.me(&pair.access_token).await, "refused on A at once");

        // Refresh on the second replica, replay the rotated token on the first.
        let session = on_first.login(&email, PASSWORD).await.expect("login on A");
        let rotated = on_second.refresh(&session.refresh_token).await.expect("refresh on B");
        assert_eq!(on_first.me(&rotated.access_token).await.expect("B's token on A"), pair.user_id);
        assert_unauthorized(on_first.refresh(&session.refresh_token).await, "reuse on A");
        let delay = time_until_refused(&on_second, &rotated.access_token).await;
        assert!(delay < Duration::from_millis(1200), "{transport:?}: refused after {delay:?}");
        assert_unauthorized(on_second.refresh(&rotated.refresh_token).await, "family dead on B");
    }
    let store = turbocat::store::PostgresStore::connect(&database.url, 2).await.expect("connect");
    let rows = audit_rows(&store).await;
    assert_eq!(rows.iter().filter(|row| row.action == "auth.logout").count(), 2, "{rows:?}");
    assert_eq!(rows.iter().filter(|row| row.action == "auth.refresh_reuse").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_reset_on_one_replica_ends_the_sessions_on_the_other() {
    let (first, second, database, _prefix) =
        two_replicas(&["--public-url", "https://turbocat.example.com/"]).await;
    for transport in TRANSPORTS {
        let on_first = Client::new(transport, &first.base_url()).await;
        let on_second = Client::new(transport, &second.base_url()).await;
        let email = unique_email("serve-reset");
        let pair = on_first.register(&email, PASSWORD).await.expect("register");
        let other = on_second.login(&email, PASSWORD).await.expect("login on B");

        on_second.forgot_password(&email).await.expect("forgot on B");
        let token = reset_token_from_log(&second, &email, 1).await;
        assert!(
            second.stderr_text().contains("https://turbocat.example.com/reset-password?token="),
            "the link is built on --public-url"
        );
        on_first.reset_password(&token, NEW_PASSWORD).await.expect("reset on A");
        let delay = time_until_refused(&on_second, &other.access_token).await;
        assert!(delay < Duration::from_millis(1200), "{transport:?}: refused after {delay:?}");
        assert_unauthorized(on_second.me(&pair.access_token).await, "first session on B");
        assert_unauthorized(on_second.reset_password(&token, NEW_PASSWORD).await, "used on B");
        assert_unauthorized(on_second.login(&email, PASSWORD).await, "old password on B");
        on_second.login(&email, NEW_PASSWORD).await.expect("new password on B");
    }
    let store = turbocat::store::PostgresStore::connect(&database.url, 2).await.expect("connect");
    let rows = audit_rows(&store).await;
    let count = |action: &str| rows.iter().filter(|row| row.action == action).count();
    assert_eq!(count("auth.password_reset_request"), 2, "{rows:?}");
    assert_eq!(count("auth.password_reset"), 4, "a reset and a refused reuse each: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_their_rate_limit_counters() {
    let (first, second, _database, prefix) =
        two_replicas(&["--auth-rate-limit-per-account", "3", "--auth-rate-limit-per-ip", "8"])
            .await;
    for transport in TRANSPORTS {
        let on_first = Client::new(transport, &first.base_url()).await;
        let on_second = Client::new(transport, &second.base_url()).await;
        let email = unique_email("shared");
        on_first.register(&email, PASSWORD).await.expect("register");
        assert_unauthorized(on_first.login(&email, "guess one pw").await, "guess 1 on A");
        assert_unauthorized(on_second.login(&email, "guess two pw").await, "guess 2 on B");
        assert_unauthorized(on_first.login(&email, "guess three pw").await, "guess 3 on A");
        for client in [&on_second, &on_first] {
            let failure = client.login(&email, PASSWORD).await.expect_err("over the limit");
            assert_eq!(failure.code, "RATE_LIMITED", "{failure:?}");
            assert!(failure.retry_after_seconds.is_some_and(|seconds| (1..=60).contains(&seconds)));
        }
    }
    // Per address too: 2 transports x 6 logins so far > 8, on either replica.
    let failure = Client::new(crate::Transport::Rest, &second.base_url())
        .await
        .login(&unique_email("fresh"), PASSWORD)
        .await
        .expect_err("address over its limit");
    assert_eq!(failure.code, "RATE_LIMITED", "{failure:?}");

    // The counters are Redis keys under the prefix, each expiring with its window, and no key
    // names an email.
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut connection = client.get_multiplexed_async_connection().await.expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .expect("keys");
    assert!(
        keys.iter().any(|key| key.starts_with(&format!("{prefix}login:ip:127.0.0.1"))),
        "{keys:?}"
    );
    assert!(keys.iter().any(|key| key.starts_with(&format!("{prefix}login:account:"))), "{keys:?}");
    assert!(keys.iter().all(|key| !key.contains('@')), "{keys:?}");
    for key in &keys {
        let remaining: i64 =
            redis::cmd("PTTL").arg(key).query_async(&mut connection).await.expect("pttl");
        assert!((1..=60_000).contains(&remaining), "{key} expires in {remaining} ms");
    }
}
