//! The Redis rate limiter fails open: when Redis cannot be reached the sign-in operations are
//! let through (logged), never refused and never a panic. Redis is reached through a TCP relay
//! this test owns, so it can make Redis vanish without touching the shared server.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use turbocat::auth::caller::ClientInfo;
use turbocat::auth::rate_limit::{
    AuthAction, AuthRateLimits, RateDecision, RateLimiter, RateRule, RedisRateLimiter,
};
use turbocat::redis_pool::{RedisPoolOptions, connect_redis_with_options};

use crate::support::redis_url;
use crate::unique_email;

/// Relays TCP connections to Redis until `cut` is called; then every relayed connection is
/// closed and new ones are refused (the listening socket is gone).
struct RedisRelay {
    address: std::net::SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl RedisRelay {
    async fn start() -> Self {
        let redis = url::Url::parse(&redis_url()).expect("redis url");
        let upstream =
            format!("{}:{}", redis.host_str().expect("redis host"), redis.port().unwrap_or(6379));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let address = listener.local_addr().expect("relay address");
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let connection_tasks = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let relay = tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(upstream).await.expect("reach redis");
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                connection_tasks.lock().expect("relay tasks").push(relay.abort_handle());
            }
        });
        tasks.lock().expect("relay tasks").push(accept.abort_handle());
        Self { address, tasks }
    }

    fn url(&self) -> String {
        let redis = url::Url::parse(&redis_url()).expect("redis url");
        let mut relayed = redis.clone();
        relayed.set_port(Some(self.address.port())).expect("port");
        relayed.set_host(Some("127.0.0.1")).expect("host");
        relayed.to_string()
    }

    /// Redis becomes unreachable: the listener and every relayed connection are dropped.
    async fn cut(&self) {
        for task in self.tasks.lock().expect("relay tasks").drain(..) {
            task.abort();
        }
        // Let the aborted tasks drop their sockets.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_rate_limiter_lets_sign_ins_through_when_redis_is_unreachable() {
    let relay = RedisRelay::start().await;
    let options =
        RedisPoolOptions { max_connections: 2, connection_timeout: Duration::from_millis(500) };
    let pool = connect_redis_with_options(&relay.url(), options).await.expect("redis via relay");
    let prefix = format!("turbocat:test:outage:{}:", uuid::Uuid::new_v4().simple());
    let limiter = Arc::new(RedisRateLimiter::new(pool, prefix));
    let one_a_minute = RateRule::per_window(1, Duration::from_secs(60));
    let limits = AuthRateLimits::new(limiter.clone(), one_a_minute, one_a_minute);
    let client = ClientInfo {
        ip_address: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
        user_agent: Some("outage-test".to_owned()),
        request_id: None,
    };
    let email = unique_email("outage");

    // While Redis answers, the counters are real: the second login attempt is over the limit.
    limits.check(AuthAction::Login, &client, Some(&email)).await.expect("first attempt");
    let refused = limits
        .check(AuthAction::Login, &client, Some(&email))
        .await
        .expect_err("the second attempt is over a limit of one");
    assert_eq!(refused.code.as_str(), "RATE_LIMITED", "{refused:?}");

    relay.cut().await;

    // The counters cannot be reached: the limiter itself says so …
    let started = Instant::now();
    let error = limiter
        .hit("login:ip:192.0.2.7", one_a_minute)
        .await
        .expect_err("redis is unreachable through the cut relay");
    assert!(!error.to_string().is_empty());
    // … and the policy lets every attempt through instead of refusing or panicking, although
    // the same client and account are over their limits.
    for attempt in 0..3 {
        limits
            .check(AuthAction::Login, &client, Some(&email))
            .await
            .unwrap_or_else(|error| panic!("attempt {attempt} is let through: {error:?}"));
    }
    for action in [AuthAction::Register, AuthAction::Refresh, AuthAction::ResetPassword] {
        limits.check(action, &client, Some(&email)).await.expect("let through");
    }
    // Failing open is bounded by the pool's connection timeout, not a hang.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());

    // A limiter that cannot count never claims a decision.
    assert!(
        !matches!(
            limiter.hit("login:ip:192.0.2.8", one_a_minute).await,
            Ok(RateDecision::Limited { .. })
        ),
        "no refusal without counters"
    );
}
