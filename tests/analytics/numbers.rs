//! The numbers of executions the test designed, on `dev` and `serve`, over REST and gRPC, and
//! the scope rules, 404s and range validation around them.

use serde_json::{Value, json};
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::analytics_service_client::AnalyticsServiceClient;

use crate::support::api::{Api, Auth, assert_error, grpc, violated_fields};
use crate::support::{TurbocatProcess, start_serve, start_turbocat};
use crate::{
    COMPLETION_TOKENS, KEY_VALUE, KEY_VARIABLE, PROMPT_TOKENS, RunnerProcess, Workbench, llm_stub,
};

/// The seconds the `sleepy` step sleeps: every duration of its workflow is at least this.
const SLEEP_SECONDS: f64 = 0.3;

/// What the test ran: 3 steady successes (a 0.3 s sleep), 3 failures (`boom`), a step that
/// fails once and succeeds on its retry, and an LLM step: 8 executions, 9 step attempts.
struct Designed {
    steady: String,
    failing: String,
    flaky_workflow: String,
    sleepy: String,
    flaky: String,
    boom: String,
}

async fn run_designed_executions(bench: &Workbench) -> Designed {
    let (stub_url, completions) = llm_stub().await;
    let sleepy = bench
        .agent(
            "sleepy",
            "CODE",
            json!({ "code": { "language": "python",
                              "source": "import time\ntime.sleep(0.3)\nprint('{}')\n" } }),
        )
        .await;
    let boom =
        bench.agent("boom", "DATA", json!({ "data": { "jqProgram": "error(\"boom\")" } })).await;
    let flaky = bench.agent("flaky", "CODE", crate::support::flaky_python_config()).await;
    let ask = bench
        .agent(
            "ask",
            "LLM",
            json!({ "llm": { "baseUrl": stub_url, "model": "gpt-analytics",
                             "promptTemplate": "hello", "apiKeyRef": format!("env:{KEY_VARIABLE}"),
                             "allowPrivateNetwork": true } }),
        )
        .await;
    let steady = bench.workflow("steady", &sleepy, 1).await;
    let failing = bench.workflow("failing", &boom, 1).await;
    let flaky_workflow = bench.workflow("flaky", &flaky, 2).await;
    let asking = bench.workflow("asking", &ask, 1).await;

    for _ in 0..3 {
        let execution = bench.run(&steady, json!({})).await;
        assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    }
    for _ in 0..3 {
        let execution = bench.run(&failing, json!({})).await;
        assert_eq!(execution["status"], "FAILED", "{execution}");
    }
    let counter = crate::support::attempt_counter().await;
    let execution = bench.run(&flaky_workflow, json!({ "counter": counter })).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let execution = bench.run(&asking, json!({})).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(completions.get(), 1, "the LLM stub was asked once");
    Designed { steady, failing, flaky_workflow, sleepy, flaky, boom }
}

/// A number of a REST answer; proto3 JSON leaves zeros out and writes 64-bit ones as text.
fn number(value: &Value) -> f64 {
    match value {
        Value::Number(number) => number.as_f64().unwrap_or_default(),
        Value::String(text) => text.parse().unwrap_or_default(),
        _ => 0.0,
    }
}

async fn get_data(bench: &Workbench, auth: &Auth, path: &str) -> Value {
    let (status, body) = bench.api.get(path, auth).await;
    assert_eq!(status, 200, "{path}: {body}");
    body["data"].clone()
}

async fn check_rest_numbers(bench: &Workbench, designed: &Designed) {
    let overview = get_data(bench, &bench.auth, "/api/v1/analytics/overview?bucket=hour").await;
    let executions = &overview["executions"];
    assert_eq!(number(&executions["total"]), 8.0, "{overview}");
    assert_eq!(number(&executions["succeeded"]), 5.0, "{overview}");
    assert_eq!(number(&executions["failed"]), 3.0, "{overview}");
    assert_eq!(number(&executions["cancelled"]), 0.0, "{overview}");
    assert!((number(&overview["successRate"]) - 5.0 / 8.0).abs() < 1e-9, "{overview}");
    assert_eq!(number(&overview["stepsRun"]), 9.0, "3 + 3 + 2 attempts + 1: {overview}");
    assert_eq!(number(&overview["agentCount"]), 4.0, "{overview}");
    assert_eq!(number(&overview["workflowCount"]), 4.0, "{overview}");
    assert_eq!(number(&overview["queuedExecutions"]), 0.0, "{overview}");
    assert!(number(&overview["runnerCount"]) >= 1.0, "{overview}");
    let buckets = overview["buckets"].as_array().expect("buckets");
    let bucketed: f64 = buckets.iter().map(|bucket| number(&bucket["executions"]["total"])).sum();
    assert_eq!(bucketed, 8.0, "every execution is in a bucket: {overview}");
    assert!(buckets.len() <= 2, "one hour, or two across an hour boundary: {overview}");
    let duration = &overview["duration"];
    assert!(number(&duration["p50Seconds"]) > 0.0, "{overview}");
    assert!(number(&duration["p95Seconds"]) >= number(&duration["p50Seconds"]), "{overview}");
    assert!(number(&duration["p99Seconds"]) >= number(&duration["p95Seconds"]), "{overview}");
    let busiest: Vec<&str> = overview["busiestWorkflows"]
        .as_array()
        .expect("busiest")
        .iter()
        .filter_map(|ranking| ranking["workflowId"].as_str())
        .collect();
    assert_eq!(busiest.len(), 4, "{overview}");
    let top_two = &busiest[..2];
    assert!(top_two.contains(&designed.steady.as_str()), "{overview}");
    assert!(top_two.contains(&designed.failing.as_str()), "{overview}");
    let failing = overview["mostFailingWorkflows"].as_array().expect("most failing");
    assert_eq!(failing.len(), 1, "only one workflow failed: {overview}");
    assert_eq!(failing[0]["workflowId"], designed.failing.as_str());
    assert_eq!(failing[0]["workflowName"], "failing");
    assert_eq!(number(&failing[0]["failed"]), 3.0);

    let steady = get_data(
        bench,
        &bench.auth,
        &format!("/api/v1/analytics/workflows/{}/metrics", designed.steady),
    )
    .await;
    assert_eq!(number(&steady["runs"]["succeeded"]), 3.0, "{steady}");
    assert_eq!(steady["health"], "HEALTHY", "{steady}");
    assert!(
        steady["healthReason"].as_str().is_some_and(|reason| reason.contains("0 of 3")),
        "{steady}"
    );
    let p50 = number(&steady["duration"]["p50Seconds"]);
    assert!((SLEEP_SECONDS..10.0).contains(&p50), "p50 {p50}: {steady}");
    assert!(number(&steady["duration"]["averageSeconds"]) >= SLEEP_SECONDS, "{steady}");

    let failing = get_data(
        bench,
        &bench.auth,
        &format!("/api/v1/analytics/workflows/{}/metrics", designed.failing),
    )
    .await;
    assert_eq!(number(&failing["runs"]["failed"]), 3.0, "{failing}");
    assert_eq!(number(&failing["successRate"]), 0.0, "{failing}");
    assert_eq!(failing["health"], "FAILING", "{failing}");
    let top_error = &failing["topErrors"][0];
    assert_eq!(number(&top_error["count"]), 3.0, "{failing}");
    assert!(
        top_error["message"].as_str().is_some_and(|message| message.contains("boom")),
        "{failing}"
    );

    let flaky_workflow = get_data(
        bench,
        &bench.auth,
        &format!("/api/v1/analytics/workflows/{}/metrics", designed.flaky_workflow),
    )
    .await;
    assert_eq!(number(&flaky_workflow["runs"]["succeeded"]), 1.0, "{flaky_workflow}");
    assert_eq!(number(&flaky_workflow["retries"]), 1.0, "{flaky_workflow}");

    let flaky = get_data(
        bench,
        &bench.auth,
        &format!("/api/v1/analytics/agents/{}/metrics", designed.flaky),
    )
    .await;
    assert_eq!(number(&flaky["runs"]["total"]), 2.0, "two attempts: {flaky}");
    assert_eq!(number(&flaky["runs"]["failed"]), 1.0, "{flaky}");
    assert_eq!(number(&flaky["runs"]["succeeded"]), 1.0, "{flaky}");
    assert_eq!(number(&flaky["retries"]), 1.0, "{flaky}");
    assert_eq!(flaky["health"], "DEGRADED", "half failed but only once: {flaky}");
    assert!(
        flaky["topErrors"][0]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("the snippet exited with status 1")),
        "{flaky}"
    );

    let sleepy = get_data(
        bench,
        &bench.auth,
        &format!("/api/v1/analytics/agents/{}/metrics", designed.sleepy),
    )
    .await;
    assert_eq!(number(&sleepy["runs"]["succeeded"]), 3.0, "{sleepy}");
    let step_p95 = number(&sleepy["duration"]["p95Seconds"]);
    assert!((SLEEP_SECONDS..10.0).contains(&step_p95), "p95 {step_p95}: {sleepy}");

    let usage = get_data(bench, &bench.auth, "/api/v1/analytics/usage-stats").await;
    let days = usage["days"].as_array().expect("days");
    let today = days.last().expect("a day of usage");
    assert!(days.iter().all(|day| day["userId"] == bench.user_id.as_str()), "{usage}");
    let started: f64 = days.iter().map(|day| number(&day["executionsStarted"])).sum();
    assert_eq!(started, 8.0, "{usage}");
    let prompt: f64 = days.iter().map(|day| number(&day["promptTokens"])).sum();
    let completion: f64 = days.iter().map(|day| number(&day["completionTokens"])).sum();
    assert_eq!(prompt, PROMPT_TOKENS as f64, "{usage}");
    assert_eq!(completion, COMPLETION_TOKENS as f64, "{usage}");
    let step_seconds: f64 = days.iter().map(|day| number(&day["stepSeconds"])).sum();
    assert!(step_seconds >= 3.0 * SLEEP_SECONDS, "{usage}");
    // Creating 4 agents and 4 workflows, 8 executions and polling them: well over 20 calls.
    assert!(number(&today["apiCalls"]) >= 20.0, "{usage}");
}

async fn check_grpc_numbers(bench: &Workbench, designed: &Designed) {
    let mut client = AnalyticsServiceClient::new(bench.api.channel().await);
    let overview = client
        .get_overview(grpc(pb::GetOverviewRequest::default(), &bench.auth))
        .await
        .expect("overview")
        .into_inner();
    let executions = overview.executions.expect("executions");
    assert_eq!((executions.total, executions.succeeded, executions.failed), (8, 5, 3));
    assert_eq!(overview.steps_run, 9);

    let request = pb::GetWorkflowMetricsRequest {
        workflow_id: designed.failing.clone(),
        ..Default::default()
    };
    let failing = client
        .get_workflow_metrics(grpc(request, &bench.auth))
        .await
        .expect("workflow metrics")
        .into_inner();
    assert_eq!(failing.runs.expect("runs").failed, 3);
    assert_eq!(failing.health(), pb::HealthVerdict::Failing);

    let request =
        pb::GetAgentMetricsRequest { agent_id: designed.boom.clone(), ..Default::default() };
    let boom =
        client.get_agent_metrics(grpc(request, &bench.auth)).await.expect("agent").into_inner();
    assert_eq!(boom.runs.expect("runs").failed, 3);
    assert_eq!(boom.top_errors.first().map(|error| error.count), Some(3));

    let usage = client
        .get_usage_stats(grpc(pb::GetUsageStatsRequest::default(), &bench.auth))
        .await
        .expect("usage")
        .into_inner();
    let tokens: i64 = usage.days.iter().map(|day| day.prompt_tokens).sum();
    assert_eq!(tokens, PROMPT_TOKENS);

    let health = client
        .get_system_health(grpc(pb::GetSystemHealthRequest::default(), &bench.auth))
        .await
        .expect("system health")
        .into_inner();
    assert_eq!(health.status(), pb::ComponentStatus::Up, "{health:?}");
    let database = health.components.iter().find(|component| component.name == "database");
    assert_eq!(database.map(|component| component.status()), Some(pb::ComponentStatus::Up));
    assert!(!health.runners.is_empty(), "{health:?}");
    assert!(health.queue_depth.is_empty(), "nothing waits: {health:?}");
    assert_eq!(health.oldest_queued_step_seconds, 0.0);
    assert_eq!(health.replicas_alive, 1, "{health:?}");
    // 3 of the 8 executions of the last hour failed.
    assert!((health.recent_error_rate - 3.0 / 8.0).abs() < 1e-9, "{health:?}");

    // A bad bucket is INVALID_ARGUMENT naming the field.
    let request = pb::GetOverviewRequest { bucket: "week".to_owned(), ..Default::default() };
    let error = client.get_overview(grpc(request, &bench.auth)).await.expect_err("bad bucket");
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&error), vec!["bucket".to_owned()]);
}

/// Bob, a user, runs one execution of his own: he sees only it, gets 404 for ann's agents and
/// workflows and may not ask for everyone's numbers. Ann, an administrator, sees her own by
/// default, everyone's with `scope=all`, and may look at Bob's workflow.
async fn check_scope(owner: &Workbench, designed: &Designed, other: &Workbench) {
    let copy = other.agent("copy", "DATA", json!({ "data": { "jqProgram": "." } })).await;
    let bobs = other.workflow("bob's", &copy, 1).await;
    let execution = other.run(&bobs, json!({})).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");

    let his = get_data(other, &other.auth, "/api/v1/analytics/overview").await;
    assert_eq!(number(&his["executions"]["total"]), 1.0, "{his}");
    assert_eq!(number(&his["agentCount"]), 1.0, "{his}");
    for path in [
        format!("/api/v1/analytics/workflows/{}/metrics", designed.steady),
        format!("/api/v1/analytics/agents/{}/metrics", designed.flaky),
    ] {
        let (status, body) = other.api.get(&path, &other.auth).await;
        assert_error(status, &body, 404, "NOT_FOUND");
    }
    let mut client = AnalyticsServiceClient::new(other.api.channel().await);
    let request = pb::GetWorkflowMetricsRequest {
        workflow_id: designed.steady.clone(),
        ..Default::default()
    };
    let error = client.get_workflow_metrics(grpc(request, &other.auth)).await.expect_err("not his");
    assert_eq!(error.code(), tonic::Code::NotFound);
    for path in ["/api/v1/analytics/overview?scope=all", "/api/v1/analytics/usage-stats?scope=all"]
    {
        let (status, body) = other.api.get(path, &other.auth).await;
        assert_error(status, &body, 403, "FORBIDDEN");
    }

    let own = get_data(owner, &owner.auth, "/api/v1/analytics/overview").await;
    assert_eq!(number(&own["executions"]["total"]), 8.0, "an admin's own by default: {own}");
    let everyone = get_data(owner, &owner.auth, "/api/v1/analytics/overview?scope=all").await;
    assert_eq!(number(&everyone["executions"]["total"]), 9.0, "{everyone}");
    assert_eq!(number(&everyone["agentCount"]), 5.0, "{everyone}");
    let usage = get_data(owner, &owner.auth, "/api/v1/analytics/usage-stats?scope=all").await;
    let users: Vec<&str> = usage["days"]
        .as_array()
        .expect("days")
        .iter()
        .filter_map(|day| day["userId"].as_str())
        .collect();
    assert!(users.contains(&owner.user_id.as_str()), "{usage}");
    assert!(users.contains(&other.user_id.as_str()), "{usage}");
    let watched =
        get_data(owner, &owner.auth, &format!("/api/v1/analytics/workflows/{bobs}/metrics")).await;
    assert_eq!(number(&watched["runs"]["succeeded"]), 1.0, "an admin sees any workflow: {watched}");
}

/// Bad ranges, buckets, scopes and ids are 400 VALIDATION_ERROR naming the field.
async fn check_validation(bench: &Workbench) {
    let cases = [
        ("/api/v1/analytics/overview?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "from"),
        ("/api/v1/analytics/overview?from=2024-01-01T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("/api/v1/analytics/overview?bucket=week", "bucket"),
        ("/api/v1/analytics/overview?scope=everyone", "scope"),
        ("/api/v1/analytics/usage-stats?from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "from"),
        ("/api/v1/analytics/workflows/not-an-id/metrics", "workflowId"),
        ("/api/v1/analytics/agents/not-an-id/metrics", "agentId"),
    ];
    for (path, field) in cases {
        let (status, body) = bench.api.get(path, &bench.auth).await;
        let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
        assert_eq!(fields, vec![field.to_owned()], "{path}: {body}");
    }
    // A range given explicitly is echoed back, and one without the runs counts none.
    let earlier = get_data(
        bench,
        &bench.auth,
        "/api/v1/analytics/overview?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
    )
    .await;
    assert_eq!(earlier["from"], "2026-01-01T00:00:00Z", "{earlier}");
    assert_eq!(number(&earlier["executions"]["total"]), 0.0, "{earlier}");
}

/// Runs the designed executions as ann (the first account, so an administrator: only they may
/// let agents reach the loopback stubs) and checks every number, the scope rules and the
/// validation.
async fn check_everything(server: &TurbocatProcess, domain: &str, with_runner: bool) {
    let owner = Workbench::new(Api::new(server), &format!("ann@{domain}")).await;
    let other = Workbench::new(Api::new(server), &format!("bob@{domain}")).await;
    // `serve` has no runner of its own: ann attaches one with a shared runner key.
    let _runner = if with_runner {
        let (status, body) = owner
            .api
            .post(
                "/api/v1/api-keys",
                &owner.auth,
                json!({ "name": "runner", "scopes": ["RUNNER"], "shared": true }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let key = body["data"]["key"].as_str().expect("key");
        let runner = RunnerProcess::start(&server.base_url(), key, "analytics-runner");
        owner.wait_for_runner("analytics-runner").await;
        Some(runner)
    } else {
        None
    };
    let designed = run_designed_executions(&owner).await;
    check_rest_numbers(&owner, &designed).await;
    check_grpc_numbers(&owner, &designed).await;
    check_scope(&owner, &designed, &other).await;
    check_validation(&owner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_count_the_designed_executions_on_dev() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8 path").to_owned();
    let server = start_turbocat(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.as_str(),
            "--llm-key-env",
            KEY_VARIABLE,
        ],
        &[(KEY_VARIABLE, KEY_VALUE)],
    );
    check_everything(&server, "dev.example.com", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_count_the_designed_executions_on_serve() {
    let (server, _database) = start_serve(&[]).await;
    check_everything(&server, "serve.example.com", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_health_counts_the_replicas_of_an_installation() {
    let prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let shared = ["--redis-key-prefix", prefix.as_str()];
    let (first, database) = start_serve(&shared).await;
    let bench = Workbench::new(Api::new(&first), "replicas@example.com").await;
    let replicas = || async {
        let health = get_data(&bench, &bench.auth, "/api/v1/analytics/system-health").await;
        number(&health["replicasAlive"])
    };
    assert_eq!(replicas().await, 1.0);
    let second = crate::support::start_serve_replica(&database, &shared).await;
    let started = std::time::Instant::now();
    while replicas().await < 2.0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the second never counted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // A replica that stops drops out once its announcement expires (10 s).
    drop(second);
    let stopped = std::time::Instant::now();
    while replicas().await > 1.0 {
        assert!(stopped.elapsed() < std::time::Duration::from_secs(20), "the stopped one stays");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
