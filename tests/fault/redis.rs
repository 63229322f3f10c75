//! Redis goes away and comes back: `serve` reaches Redis through a TCP proxy the test cuts for a
//! few seconds (the shared Redis itself is never touched). The API keeps answering what needs only
//! the database, quickly (`--redis-timeout-seconds`), sign-ins are let through, health says Redis
//! is down, work submitted meanwhile is not lost, the engine's loops warn once each, and once the
//! proxy relays again every execution completes with each step run once.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::proxy::{TcpProxy, through};
use crate::support::api::{Api, Auth};
use crate::support::{
    ServeDatabase, TurbocatProcess, create_postgres_database, redis_url, start_serve_replica,
};
use crate::{Bench, RunnerProcess, assert_every_step_ran_once, some_step_running, unique_prefix};

const QUICKLY: Duration = Duration::from_secs(4);

/// `serve` on `database` with Redis at `redis`.
async fn serve_with_redis(database: &ServeDatabase, redis: String) -> TurbocatProcess {
    let (prefix, rate_limit_prefix) = (unique_prefix(), unique_prefix());
    let extra = [
        "--redis-url",
        redis.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
        "--rate-limit-key-prefix",
        rate_limit_prefix.as_str(),
        "--redis-timeout-seconds",
        "1",
    ];
    start_serve_replica(database, &extra).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_away_the_api_answers_and_work_runs_once_it_is_back() {
    let redis = url::Url::parse(&redis_url()).expect("redis url");
    let redis_address = format!(
        "{}:{}",
        redis
            .host_str()
            .map(|host| if host == "localhost" { "127.0.0.1" } else { host })
            .expect("host"),
        redis.port().unwrap_or(6379)
    )
    .parse()
    .expect("redis address");
    let proxy = TcpProxy::start(vec![redis_address]).await;
    let (url, name) = create_postgres_database().await;
    let database = ServeDatabase::new(url, name);
    let server = serve_with_redis(&database, through(&redis_url(), &proxy)).await;
    let bench = Bench::new(Api::new(&server), "redis-outage@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "redis-less", 2, "", &[]);
    crate::wait_for_runner(&bench.api, &bench.auth, "redis-less").await;

    let slow = bench.sleeper("slow", 2.5).await;
    let after = bench.jq("after", "{done: true}").await;
    let workflow = bench
        .workflow(
            "redis-outage",
            json!([
                { "key": "slow", "agentId": slow },
                { "key": "after", "agentId": after, "dependsOn": ["slow"] }
            ]),
        )
        .await;
    let before = bench.execute(&workflow).await;
    bench.wait_for(&before, Duration::from_secs(30), "running", some_step_running).await;

    proxy.cut().await;
    let cut_at = Instant::now();

    // What needs only the database answers, quickly.
    let started = Instant::now();
    let (status, body) = bench.api.get("/api/v1/workflows", &bench.auth).await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    assert_eq!(status, 200, "{body}");
    // Signing in is let through (the rate limit counters fail open).
    let started = Instant::now();
    let account_password = "pw-redis-outage@example.com-long-enough";
    let (status, body) = bench.api.login("redis-outage@example.com", account_password).await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    assert_eq!(status, 200, "{body}");
    // Work submitted now is accepted and not lost.
    let started = Instant::now();
    let during = bench.execute(&workflow).await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    // Health: alive (the database answers), not ready, Redis down.
    let (status, body) = bench.api.get("/health", &Auth::None).await;
    assert_eq!(status, 200, "{body}");
    let components = body["data"]["components"].as_array().cloned().unwrap_or_default();
    let redis_component = components.iter().find(|component| component["name"] == "redis");
    assert_eq!(
        redis_component.map(|component| component["status"].clone()),
        Some(json!("DOWN")),
        "{body}"
    );
    let (status, _) = bench.api.get("/health/ready", &Auth::None).await;
    assert_eq!(status, 503);

    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
    proxy.restore();

    for execution_id in [&before, &during] {
        let execution = bench.finished(execution_id, Duration::from_secs(45)).await;
        assert_every_step_ran_once(&execution);
    }
    let after_outage = bench.execute(&workflow).await;
    let execution = bench.finished(&after_outage, Duration::from_secs(45)).await;
    assert_every_step_ran_once(&execution);
    let ready_by = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = bench.api.get("/health/ready", &Auth::None).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < ready_by, "never ready again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let log = crate::plain(&server.stderr_text());
    crate::assert_one_warning_per_loop(&log);
}
