//! PostgreSQL goes away and comes back: `serve` reaches its database through a TCP proxy the test
//! cuts for a few seconds. Meanwhile requests answer 503 / UNAVAILABLE within a couple of seconds
//! (never 500, never a hang; an API key is not refused as if it were bad), the health reports say
//! the database is down, the engine's loops warn once each and go quiet, and a step that finishes
//! during the outage keeps its result. Once the proxy relays again everything recovers with no
//! one's help: the execution that was running completes with every step run once, and new work
//! runs.

use std::time::{Duration, Instant};

use serde_json::json;
use turbocat::proto::v1::workflow_service_client::WorkflowServiceClient;

use crate::proxy::{TcpProxy, postgres_address, through};
use crate::support::api::{Api, Auth, grpc};
use crate::support::{ServeDatabase, create_postgres_database, start_serve_replica};
use crate::{Bench, RunnerProcess, assert_every_step_ran_once, some_step_running, unique_prefix};

/// Longer than this for a 503 would be a hang to a caller.
const QUICKLY: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_away_requests_answer_503_quickly_and_everything_recovers_after() {
    let (url, name) = create_postgres_database().await;
    let proxy = TcpProxy::start(vec![postgres_address(&url)]).await;
    let database = ServeDatabase::new(through(&url, &proxy), name);
    let prefix = unique_prefix();
    let server = start_serve_replica(
        &database,
        &["--redis-key-prefix", &prefix, "--database-acquire-timeout-seconds", "1"],
    )
    .await;
    let bench = Bench::new(Api::new(&server), "outage@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let key_auth = Auth::key(&key);
    let _runner = RunnerProcess::start(&server.base_url(), &key, "through-it", 4, "", &[]);
    crate::wait_for_runner(&bench.api, &bench.auth, "through-it").await;

    // A step that finishes while the database is away, then one that runs after.
    let slow = bench.sleeper("slow", 2.5).await;
    let after = bench.jq("after", "{done: true}").await;
    let workflow = bench
        .workflow(
            "outage",
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

    // REST: a request that needs the database (a bearer token needs none to be checked).
    let started = Instant::now();
    let (status, body) = bench.api.get("/api/v1/workflows", &bench.auth).await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    crate::support::api::assert_error(status, &body, 503, "SERVICE_UNAVAILABLE");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("database"), "{body}");
    // A submission is refused the same way (nothing half-made).
    let started = Instant::now();
    let (status, body) = bench
        .api
        .post(&format!("/api/v1/workflows/{workflow}/execute"), &bench.auth, json!({}))
        .await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    crate::support::api::assert_error(status, &body, 503, "SERVICE_UNAVAILABLE");
    // An API key that cannot be checked is not refused as if it were bad: 503, not 401.
    let started = Instant::now();
    let (status, body, headers) =
        bench.api.call(reqwest::Method::GET, "/api/v1/workflows", &key_auth, None).await;
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    crate::support::api::assert_error(status, &body, 503, "SERVICE_UNAVAILABLE");
    assert!(headers.contains_key("retry-after"), "{headers:?}");

    // gRPC: UNAVAILABLE, as quickly.
    let mut workflows = WorkflowServiceClient::new(bench.api.channel().await);
    let started = Instant::now();
    let status = workflows
        .list_workflows(grpc(turbocat::proto::v1::ListWorkflowsRequest::default(), &bench.auth))
        .await
        .expect_err("the database is away");
    assert!(started.elapsed() < QUICKLY, "answered after {:?}", started.elapsed());
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");

    // Health says the database is down.
    let (status, body) = bench.api.get("/health", &Auth::None).await;
    assert_eq!(status, 503, "{body}");
    let components =
        body["error"]["details"][0]["components"].as_array().cloned().unwrap_or_default();
    let database_component = components.iter().find(|component| component["name"] == "database");
    assert_eq!(
        database_component.map(|component| component["status"].clone()),
        Some(json!("DOWN")),
        "{body}"
    );
    let (status, _) = bench.api.get("/health/ready", &Auth::None).await;
    assert_eq!(status, 503);

    // Five seconds away in all: the slow step finishes and reports meanwhile.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
    proxy.restore();

    // Back: nobody restarts anything.
    let execution = bench.finished(&before, Duration::from_secs(45)).await;
    assert_every_step_ran_once(&execution);
    let later = bench.execute(&workflow).await;
    let execution = bench.finished(&later, Duration::from_secs(45)).await;
    assert_every_step_ran_once(&execution);
    let (status, body) = bench.api.get("/health/ready", &Auth::None).await;
    assert_eq!(status, 200, "{body}");

    // Each loop warned once for the outage and said once that it works again; nothing was a
    // 500 (an internal error would be logged at ERROR).
    let log = crate::plain(&server.stderr_text());
    crate::assert_one_warning_per_loop(&log);
    assert!(!log.contains("internal error"), "{log}");
}
