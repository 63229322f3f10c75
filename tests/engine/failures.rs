//! What the engine must survive or report clearly: Redis flushed and restarted mid-run (a
//! private `redis-server` per test), duplicate, stale and foreign completion reports from a
//! runner that speaks the protocol itself, payload limits (server and runner side, never a
//! broken stream), and CODE steps past their memory, CPU or output limits, on `dev` and `serve`.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::runner_service_client::RunnerServiceClient;

use crate::support::api::Api;
use crate::support::{
    RedisServer, ServeDatabase, TEST_JWT_SECRET, TurbocatProcess, create_postgres_database,
    free_port, start_dev, start_serve, start_turbocat,
};
use crate::{RunnerProcess, Workbench, step};

const LIMIT: Duration = Duration::from_secs(90);

/// Waits until `GET /runners` lists a runner named `name` and returns it.
pub async fn wait_for_runner(bench: &Workbench, name: &str) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = bench.api.get("/api/v1/runners", &bench.auth).await;
        assert_eq!(status, 200, "{body}");
        let found = body["data"]
            .as_array()
            .and_then(|runners| runners.iter().find(|runner| runner["name"] == name).cloned());
        if let Some(runner) = found {
            return runner;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "runner {name} never attached: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every log line of an execution, page by page (small pages: the limit tests shrink messages).
pub async fn logs(bench: &Workbench, execution_id: &str) -> Vec<Value> {
    let mut lines = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/api/v1/executions/{execution_id}/logs?pageSize=40&cursor={cursor}");
        let (status, body) = bench.api.get(&path, &bench.auth).await;
        assert_eq!(status, 200, "{body}");
        lines.extend(body["data"].as_array().cloned().unwrap_or_default());
        cursor = body["meta"]["pagination"]["nextCursor"].as_str().unwrap_or_default().to_owned();
        if cursor.is_empty() {
            return lines;
        }
    }
}

/// `turbocat serve` on a fresh database and the Redis at `redis_url`, with an account and a
/// runner key.
pub async fn serve_on_redis(
    redis_url: &str,
    extra: &[&str],
) -> (TurbocatProcess, ServeDatabase, Workbench, String) {
    let (url, name) = create_postgres_database().await;
    let database = ServeDatabase::new(url, name);
    let prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let mut arguments: Vec<String> = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        database.url.as_str(),
        "--redis-url",
        redis_url,
        "--jwt-secret",
        TEST_JWT_SECRET,
        "--redis-key-prefix",
        prefix.as_str(),
        "--rate-limit-key-prefix",
        prefix.as_str(),
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    let server = tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
        start_turbocat(&borrowed, &[])
    })
    .await
    .expect("start serve");
    let bench = Workbench::new(Api::new(&server), "failures@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    (server, database, bench, key)
}

/// `turbocat serve` on the shared test Redis, with an account and a runner key.
async fn serve_with_account(extra: &[&str]) -> (TurbocatProcess, ServeDatabase, Workbench, String) {
    let (server, database) = start_serve(extra).await;
    let bench = Workbench::new(Api::new(&server), "failures@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    (server, database, bench, key)
}

fn succeeded_count(execution: &Value, keys: &[&str]) -> usize {
    keys.iter().filter(|key| step(execution, key)["status"] == "SUCCEEDED").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_survives_redis_being_flushed_and_restarted_mid_run() {
    let mut redis = RedisServer::start(free_port()).await;
    let (server, _database, bench, key) =
        serve_on_redis(&redis.url(), &["--runner-lease-seconds", "6"]).await;
    // One slot: while one step runs, its siblings wait in the Redis queue.
    let _runner = RunnerProcess::start(&server.base_url(), &key, "steady", 1, "", &[]);
    wait_for_runner(&bench, "steady").await;
    let tick = bench
        .code(
            "tick",
            "python",
            "import json, sys, time\ndata = json.load(sys.stdin)\ntime.sleep(0.7)\nprint(json.dumps({'n': data['n'] + 1}))\n",
            json!({}),
        )
        .await;
    let sum = bench.jq("sum", "{n: (.a + .b + .c)}").await;
    let middle = ["two_a", "two_b", "two_c"];
    let mut steps = vec![json!({ "key": "one", "agentId": tick })];
    for key in middle {
        steps.push(json!({ "key": key, "agentId": tick, "dependsOn": ["one"], "inputMapping": "{{steps.one.output}}" }));
    }
    steps.push(json!({
        "key": "three",
        "agentId": sum,
        "dependsOn": middle,
        "inputMapping": { "a": "{{steps.two_a.output.n}}", "b": "{{steps.two_b.output.n}}", "c": "{{steps.two_c.output.n}}" },
    }));
    let workflow = bench.workflow("redis trouble", json!(steps), json!({})).await;
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 0 } })).await;

    // FLUSHALL while the middle steps are queued (in Redis) or running.
    bench
        .wait_for(&execution_id, LIMIT, "past the first step", |execution| {
            step(execution, "one")["status"] == "SUCCEEDED"
        })
        .await;
    redis.flush_all().await;

    // Then Redis goes away while the last middle step runs: its result arrives with Redis down
    // (the next step cannot be queued), and Redis comes back empty.
    bench
        .wait_for(&execution_id, LIMIT, "the last middle step running", |execution| {
            let done = succeeded_count(execution, &middle);
            let running = middle.iter().any(|key| step(execution, key)["status"] == "RUNNING");
            (done == 2 && running) || done == 3
        })
        .await;
    redis.kill();
    bench
        .wait_for(&execution_id, LIMIT, "all middle steps done", |execution| {
            succeeded_count(execution, &middle) == 3
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart().await;

    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "n": 6 }), "three middle steps of 1 + 1");
    assert_eq!(step(&execution, "one")["output"], json!({ "n": 1 }));
    for key in middle {
        assert_eq!(step(&execution, key)["output"], json!({ "n": 2 }), "{execution}");
        assert_eq!(step(&execution, key)["status"], "SUCCEEDED");
    }
    assert_eq!(step(&execution, "three")["input"], json!({ "a": 2, "b": 2, "c": 2 }));

    // The installation still works on the restarted Redis: a new execution runs through.
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 10 } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "n": 36 }));
}

/// A runner made of the generated gRPC client: it says hello, then acknowledges, starts and
/// reports exactly what the test tells it to.
struct ProtocolRunner {
    sender: mpsc::Sender<pb::AttachRequest>,
    inbound: tonic::Streaming<pb::AttachResponse>,
    id: String,
}

impl ProtocolRunner {
    async fn attach(
        base_url: &str,
        api_key: &str,
        name: &str,
        agent_types: &[pb::AgentType],
        labels: &[(&str, &str)],
        capacity: i32,
    ) -> Self {
        let channel = tonic::transport::Endpoint::from_shared(base_url.to_owned())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = RunnerServiceClient::new(channel);
        let (sender, receiver) = mpsc::channel(64);
        let hello = pb::RunnerHello {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            agent_types: agent_types.iter().map(|agent_type| *agent_type as i32).collect(),
            capacity,
            held_steps: Vec::new(),
            runner_version: "protocol-test".to_owned(),
            ..pb::RunnerHello::default()
        };
        let hello = pb::AttachRequest { message: Some(pb::attach_request::Message::Hello(hello)) };
        sender.send(hello).await.expect("queue hello");
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        request.metadata_mut().insert("x-api-key", api_key.parse().expect("metadata"));
        let mut inbound = client.attach(request).await.expect("attach").into_inner();
        let accepted = match inbound.message().await {
            Ok(Some(pb::AttachResponse {
                message: Some(pb::attach_response::Message::Accepted(accepted)),
            })) => accepted,
            other => panic!("expected accepted, got {other:?}"),
        };
        assert!(accepted.max_message_bytes > 0, "{accepted:?}");
        Self { sender, inbound, id: accepted.runner_id }
    }

    async fn send(&self, message: pb::attach_request::Message) {
        let request = pb::AttachRequest { message: Some(message) };
        self.sender.send(request).await.expect("the stream is open");
    }

    /// Waits for the next assignment, acknowledges it and reports it started.
    async fn take(&mut self) -> pb::StepAssignment {
        let next = tokio::time::timeout(Duration::from_secs(30), self.inbound.message())
            .await
            .expect("an assignment within 30 s");
        let assignment = match next {
            Ok(Some(pb::AttachResponse {
                message: Some(pb::attach_response::Message::Assignment(assignment)),
            })) => assignment,
            other => panic!("expected an assignment, got {other:?}"),
        };
        let step = assignment.step.clone().expect("step ref");
        let ack =
            pb::AssignmentAck { step: Some(step.clone()), accepted: true, reason: String::new() };
        self.send(pb::attach_request::Message::AssignmentAck(ack)).await;
        self.send(pb::attach_request::Message::Started(pb::StepStarted { step: Some(step) })).await;
        assignment
    }

    async fn succeed(&self, step: &pb::StepRef, output: Value) {
        let success =
            pb::StepSuccess { output: Some(turbocat::proto::wkt::json_to_value(&output)) };
        let result = pb::StepResult {
            step: Some(step.clone()),
            outcome: Some(pb::step_result::Outcome::Success(success)),
        };
        self.send(pb::attach_request::Message::Result(result)).await;
    }

    async fn fail(&self, step: &pb::StepRef, error: &str, retryable: bool) {
        let failure = pb::StepFailure {
            error: error.to_owned(),
            retryable,
            kind: pb::FailureKind::Error as i32,
        };
        let result = pb::StepResult {
            step: Some(step.clone()),
            outcome: Some(pb::step_result::Outcome::Failure(failure)),
        };
        self.send(pb::attach_request::Message::Result(result)).await;
    }
}

fn input_of(assignment: &pb::StepAssignment) -> Value {
    assignment.input.as_ref().map(turbocat::proto::wkt::value_to_json).unwrap_or(Value::Null)
}

/// Asserts that `execution_id` stays as `check` wants it for half a second (a refused report
/// must change nothing).
async fn stays(bench: &Workbench, execution_id: &str, what: &str, check: impl Fn(&Value) -> bool) {
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let execution = bench.execution(execution_id).await;
        assert!(check(&execution), "not {what}: {execution}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn duplicate_stale_and_foreign_reports_are_refused(server: &TurbocatProcess, email: &str) {
    let bench = Workbench::new(Api::new(server), email).await;
    let (key, _) = bench.api.create_key(&bench.auth, "protocol", &["RUNNER"]).await;
    let echo = bench.jq("echo", ".").await;
    // Only the runners of this test carry the label (`dev` has its own runner too).
    let labels = json!({ "protocol-test": "" });
    let workflow = bench
        .workflow(
            "reports",
            json!([
                { "key": "a", "agentId": echo, "requiredLabels": labels, "retryPolicy": { "maxAttempts": 2, "initialBackoff": "0.1s" } },
                { "key": "b", "agentId": echo, "requiredLabels": labels, "dependsOn": ["a"], "inputMapping": { "fromA": "{{steps.a.output.v}}" } },
            ]),
            json!({}),
        )
        .await;
    let url = server.base_url();
    let mut runner = ProtocolRunner::attach(
        &url,
        &key,
        "protocol",
        &[pb::AgentType::Data],
        &[("protocol-test", "")],
        2,
    )
    .await;
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 1 } })).await;

    // Attempt 1 fails (retryable) and comes back as attempt 2.
    let first = runner.take().await;
    assert_eq!(
        (first.step_key.as_str(), first.execution_id.as_str()),
        ("a", execution_id.as_str())
    );
    assert_eq!(input_of(&first), json!({ "n": 1 }));
    let first_ref = first.step.clone().expect("step");
    assert_eq!(first_ref.attempt, 1);
    runner.fail(&first_ref, "flaky", true).await;
    let second = runner.take().await;
    let second_ref = second.step.clone().expect("step");
    assert_eq!(second.step_key, "a");
    assert_eq!(
        (second_ref.step_run_id.as_str(), second_ref.attempt),
        (first_ref.step_run_id.as_str(), 2)
    );

    // A success reported for attempt 1 now is stale: attempt 2 keeps running.
    runner.succeed(&first_ref, json!({ "v": "stale" })).await;
    stays(&bench, &execution_id, "still running attempt 2", |execution| {
        let a = step(execution, "a");
        (a["status"] == "RUNNING" || a["status"] == "ASSIGNED")
            && a["attempt"] == 2
            && a["output"].is_null()
            && execution["status"] == "RUNNING"
    })
    .await;

    // The first report of attempt 2 counts; a second success and a late failure do not.
    runner.succeed(&second_ref, json!({ "v": "first" })).await;
    runner.succeed(&second_ref, json!({ "v": "second" })).await;
    runner.fail(&second_ref, "late failure", false).await;

    // The stream is healthy: the next step arrives, fed by the first report's output.
    let third = runner.take().await;
    let third_ref = third.step.clone().expect("step");
    assert_eq!((third.step_key.as_str(), third_ref.attempt), ("b", 1));
    assert_eq!(input_of(&third), json!({ "fromA": "first" }));

    // Another runner of the same owner cannot report for an attempt it does not hold.
    let intruder = ProtocolRunner::attach(
        &url,
        &key,
        "intruder",
        &[pb::AgentType::Code],
        &[("protocol-test", "")],
        2,
    )
    .await;
    intruder.succeed(&third_ref, json!({ "forged": true })).await;
    stays(&bench, &execution_id, "b still with its runner", |execution| {
        let b = step(execution, "b");
        (b["status"] == "RUNNING" || b["status"] == "ASSIGNED") && execution["status"] == "RUNNING"
    })
    .await;

    runner.succeed(&third_ref, json!({ "done": true })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "done": true }));
    let a = step(&execution, "a");
    assert_eq!((a["status"].as_str(), a["attempt"].as_i64()), (Some("SUCCEEDED"), Some(2)), "{a}");
    assert_eq!(a["output"], json!({ "v": "first" }), "{a}");
    assert_eq!(a["runnerId"], runner.id.as_str());
    let attempts = a["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{a}");
    assert_eq!(attempts[0]["status"], "FAILED", "{a}");
    assert_eq!(attempts[0]["error"], "flaky", "{a}");
    assert!(attempts[0]["output"].is_null(), "the stale success left no output: {a}");
    assert_eq!(attempts[1]["output"], json!({ "v": "first" }));
    let b = step(&execution, "b");
    assert_eq!(b["output"], json!({ "done": true }), "{b}");
    assert_eq!(b["runnerId"], runner.id.as_str(), "{b}");

    // The server said why it refused: one line per refused report (stale, two duplicates, the
    // intruder's).
    let started = Instant::now();
    loop {
        let refusals = server
            .stderr_text()
            .matches("refused a result for an attempt this runner does not hold")
            .count();
        if refusals >= 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{refusals} refusals logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Both streams are still up, holding nothing.
    let listed = wait_for_runner(&bench, "protocol").await;
    assert_eq!(
        (listed["id"].as_str(), listed["load"].as_i64()),
        (Some(runner.id.as_str()), Some(0))
    );
    assert_eq!(wait_for_runner(&bench, "intruder").await["load"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_stale_and_foreign_reports_change_nothing_on_dev() {
    let (server, _data) = start_dev(&[]);
    duplicate_stale_and_foreign_reports_are_refused(&server, "reports-dev@example.com").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_stale_and_foreign_reports_change_nothing_on_serve() {
    let (server, _database) = start_serve(&[]).await;
    duplicate_stale_and_foreign_reports_are_refused(&server, "reports-serve@example.com").await;
}

impl ProtocolRunner {
    /// The next message from the server within `limit`; `None` when none came.
    async fn next_within(&mut self, limit: Duration) -> Option<pb::attach_response::Message> {
        match tokio::time::timeout(limit, self.inbound.message()).await {
            Err(_) => None,
            Ok(Ok(Some(response))) => response.message,
            Ok(other) => panic!("the stream ended: {other:?}"),
        }
    }

    /// The next assignment, not acknowledged.
    async fn assignment(&mut self) -> pb::StepAssignment {
        match self.next_within(Duration::from_secs(30)).await {
            Some(pb::attach_response::Message::Assignment(assignment)) => assignment,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }
}

/// A runner with one slot that neither acknowledges an assignment nor (for a while) a cancel:
/// the assignment is taken back and cancelled after `--runner-ack-seconds` and runs again as
/// the next attempt; a cancel keeps the slot taken until the runner acknowledges it.
async fn acknowledgements_are_awaited(server: &TurbocatProcess, email: &str) {
    let bench = Workbench::new(Api::new(server), email).await;
    let (key, _) = bench.api.create_key(&bench.auth, "protocol", &["RUNNER"]).await;
    let echo = bench.jq("echo", ".").await;
    let labels = json!({ "ack-test": "" });
    let workflow = bench
        .workflow(
            "acks",
            json!([{ "key": "only", "agentId": echo, "requiredLabels": labels }]),
            json!({}),
        )
        .await;
    let url = server.base_url();
    let mut runner = ProtocolRunner::attach(
        &url,
        &key,
        "silent",
        &[pb::AgentType::Data],
        &[("ack-test", "")],
        1,
    )
    .await;

    // An assignment left unacknowledged is cancelled and comes back as attempt 2.
    let execution_id = bench.execute(&workflow, json!({ "input": { "v": 1 } })).await;
    let ignored = runner.assignment().await;
    let ignored_ref = ignored.step.clone().expect("step");
    assert_eq!(ignored_ref.attempt, 1);
    let sent_at = Instant::now();
    match runner.next_within(Duration::from_secs(20)).await {
        Some(pb::attach_response::Message::Cancel(cancel)) => {
            assert_eq!(cancel.step, Some(ignored_ref.clone()));
            assert!(cancel.reason.contains("not acknowledged"), "{}", cancel.reason);
        }
        other => panic!("expected the cancel of the ignored assignment, got {other:?}"),
    }
    assert!(sent_at.elapsed() >= Duration::from_millis(1900), "{:?}", sent_at.elapsed());
    // The slot is still taken by the unacknowledged cancel: nothing new arrives…
    assert!(runner.next_within(Duration::from_millis(1000)).await.is_none(), "slot reused early");
    // …until the cancel is acknowledged; then attempt 2 arrives at once.
    runner
        .send(pb::attach_request::Message::CancelAck(pb::CancelAck { step: Some(ignored_ref) }))
        .await;
    let retried = runner.take().await;
    let retried_ref = retried.step.clone().expect("step");
    assert_eq!(retried_ref.attempt, 2);
    runner.succeed(&retried_ref, json!({ "v": 2 })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let only = step(&execution, "only");
    assert_eq!((only["attempt"].as_i64(), only["infraReassignments"].as_i64()), (Some(2), Some(1)));
    assert_eq!(execution["output"], json!({ "v": 2 }));

    // A cancel never acknowledged frees the slot after the same time.
    let second = bench.execute(&workflow, json!({ "input": { "v": 3 } })).await;
    let held = runner.take().await;
    let held_ref = held.step.clone().expect("step");
    let (status, body) = bench
        .api
        .post(&format!("/api/v1/executions/{second}/cancel"), &bench.auth, json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    match runner.next_within(Duration::from_secs(10)).await {
        Some(pb::attach_response::Message::Cancel(cancel)) => {
            assert_eq!(cancel.step, Some(held_ref));
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
    let third = bench.execute(&workflow, json!({ "input": { "v": 4 } })).await;
    let cancelled_at = Instant::now();
    let freed = runner.take().await;
    assert!(cancelled_at.elapsed() >= Duration::from_millis(1700), "{:?}", cancelled_at.elapsed());
    runner.succeed(freed.step.as_ref().expect("step"), json!({ "v": 4 })).await;
    let execution = bench.finished(&third, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_are_awaited_on_dev() {
    let (server, _data) = start_dev(&["--runner-ack-seconds", "2"]);
    acknowledgements_are_awaited(&server, "acks-dev@example.com").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_are_awaited_on_serve() {
    let (server, _database) = start_serve(&["--runner-ack-seconds", "2"]).await;
    acknowledgements_are_awaited(&server, "acks-serve@example.com").await;
}

/// Server flags of the limit tests: a small payload limit and small gRPC messages.
const SMALL_LIMITS: [&str; 4] = ["--max-payload-bytes", "2048", "--max-message-bytes", "65536"];

/// Starts a one-step workflow of a python CODE agent (retries allowed) and returns the
/// execution id.
async fn run_snippet(bench: &Workbench, name: &str, source: &str, limits: Value) -> String {
    let agent = bench.code(name, "python", source, limits).await;
    let retry = json!({ "maxAttempts": 3, "initialBackoff": "0.05s" });
    let workflow = bench
        .workflow(name, json!([{ "key": name, "agentId": agent, "retryPolicy": retry }]), json!({}))
        .await;
    bench.execute(&workflow, json!({})).await
}

/// Payload limits and CODE resource limits, against a server started with `SMALL_LIMITS` whose
/// only runner is named `runner_name`.
async fn limits_fail_cleanly(bench: &Workbench, runner_name: &str) {
    let before = wait_for_runner(bench, runner_name).await;
    let snippets = [
        // Over the payload limit (2048 bytes) but small enough to send: the server refuses it.
        ("medium", "import json\nprint(json.dumps({'data': 'm' * 2500}))\n", json!({})),
        // Far over any message the server accepts: the runner refuses to send it.
        ("huge", "import json\nprint(json.dumps({'data': 'h' * 200000}))\n", json!({})),
        (
            "hungry",
            "blob = bytearray(600 * 1024 * 1024)\nprint('{}')\n",
            json!({ "memoryMb": 128 }),
        ),
        ("busy", "while True:\n    pass\n", json!({ "cpuSeconds": 1 })),
        ("flood", "while True:\n    print('x' * 1000)\n", json!({ "maxOutputBytes": 10000 })),
        // Hundreds of log lines, more than one small message holds: batched to fit, all arrive.
        (
            "chatty",
            "for i in range(300):\n    print(f'line {i} ' + 'c' * 1000)\nprint('{\"ok\": true}')\n",
            json!({}),
        ),
    ];
    let mut cases = Vec::new();
    for (name, source, limits) in snippets {
        cases.push((name.to_owned(), run_snippet(bench, name, source, limits).await));
    }
    let expected_errors = [
        ("medium", "larger than the limit of 2048 bytes"),
        ("huge", "more than the server accepts in one message"),
        ("hungry", "memory limit of 128 MiB"),
        ("busy", "CPU time limit of 1 s"),
        ("flood", "output limit of 10000 bytes"),
    ];
    for (name, execution_id) in &cases {
        let execution = bench.finished(execution_id, LIMIT).await;
        if name == "chatty" {
            assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
            assert_eq!(execution["output"], json!({ "ok": true }));
            let lines = logs(bench, execution_id).await;
            for index in [0, 150, 299] {
                let prefix = format!("line {index} ");
                assert!(
                    lines.iter().any(|line| line["message"].as_str().is_some_and(|text| text
                        .starts_with(&prefix)
                        && text.len() == prefix.len() + 1000)),
                    "line {index} missing among {} lines",
                    lines.len()
                );
            }
            continue;
        }
        let (_, expected) =
            expected_errors.iter().find(|(case, _)| case == name).expect("an expected error");
        assert_eq!(execution["status"], "FAILED", "{name}: {execution}");
        let error = execution["error"].as_str().unwrap_or_default();
        assert!(error.contains(name.as_str()) && error.contains(expected), "{name}: {error}");
        let failed = step(&execution, name);
        assert_eq!(failed["status"], "FAILED", "{failed}");
        assert_eq!(failed["attempt"], 1, "a limit is not retried: {failed}");
        assert_eq!(failed["infraReassignments"], 0, "no lost runner: {failed}");
    }

    // An input mapping that makes an oversize input fails the execution before the step runs.
    let blob = bench.jq("blob", "{blob: (\"x\" * 1500)}").await;
    let echo = bench.jq("echo", ".").await;
    let doubled = bench
        .workflow(
            "doubled",
            json!([
                { "key": "a", "agentId": blob },
                { "key": "b", "agentId": echo, "dependsOn": ["a"], "inputMapping": { "one": "{{steps.a.output.blob}}", "two": "{{steps.a.output.blob}}" } },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&doubled, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("step b") && error.contains("input") && error.contains("2048 bytes"),
        "{error}"
    );
    assert_eq!(step(&execution, "a")["status"], "SUCCEEDED");
    assert_ne!(step(&execution, "b")["status"], "SUCCEEDED");

    // The runner's stream never broke: the same connection is still attached and idle.
    let after = wait_for_runner(bench, runner_name).await;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["connectedAt"], before["connectedAt"], "the runner reconnected: {after}");
    assert_eq!(after["load"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_resource_limits_fail_cleanly_on_dev() {
    let (server, _data) = start_dev(&SMALL_LIMITS);
    let bench = Workbench::new(Api::new(&server), "limits-dev@example.com").await;
    limits_fail_cleanly(&bench, "local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_and_resource_limits_fail_cleanly_on_serve() {
    let (server, _database, bench, key) = serve_with_account(&SMALL_LIMITS).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "limited", 4, "", &[]);
    limits_fail_cleanly(&bench, "limited").await;
}
