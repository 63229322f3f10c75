//! WORKFLOW steps: a step that runs another workflow as a child execution, on `turbocat dev`
//! (SQLite, in-process) and `turbocat serve` (PostgreSQL, Redis, a `turbocat runner` process):
//! the child's output flows on, a failing child fails the step (a retry starts a new child), a
//! missing workflow fails it for good, the depth limit stops a workflow that calls itself, and
//! cancelling the parent cancels its running child.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::Api;
use crate::support::{ServeDatabase, TurbocatProcess, start_dev, start_serve};
use crate::{RunnerProcess, Workbench, step};

const LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
enum Mode {
    Dev,
    Serve,
}

/// A running server with an account, and what must live as long as it.
struct Installation {
    bench: Workbench,
    _server: TurbocatProcess,
    _dev_data: Option<tempfile::TempDir>,
    _database: Option<ServeDatabase>,
    _runner: Option<RunnerProcess>,
}

/// `dev`, or `serve` with one runner attached; `extra` flags go to the server.
async fn install(mode: Mode, email: &str, extra: &[&str]) -> Installation {
    match mode {
        Mode::Dev => {
            let (server, data) = start_dev(extra);
            let bench = Workbench::new(Api::new(&server), email).await;
            Installation {
                bench,
                _server: server,
                _dev_data: Some(data),
                _database: None,
                _runner: None,
            }
        }
        Mode::Serve => {
            let (server, database) = start_serve(extra).await;
            let bench = Workbench::new(Api::new(&server), email).await;
            let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
            let runner = RunnerProcess::start(&server.base_url(), &key, "sub", 4, "", &[]);
            let started = Instant::now();
            loop {
                let (status, body) = bench.api.get("/api/v1/runners", &bench.auth).await;
                assert_eq!(status, 200, "{body}");
                if body["data"].as_array().is_some_and(|runners| !runners.is_empty()) {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(30), "the runner never attached");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Installation {
                bench,
                _server: server,
                _dev_data: None,
                _database: Some(database),
                _runner: Some(runner),
            }
        }
    }
}

impl Workbench {
    /// A WORKFLOW agent running `workflow_id`.
    async fn sub_workflow_agent(&self, name: &str, workflow_id: &str) -> String {
        self.agent(
            name,
            "WORKFLOW",
            json!({ "workflow": { "workflowId": workflow_id } }),
            json!({}),
        )
        .await
    }

    /// The executions of a workflow (deleted or not), newest first.
    async fn executions_of(&self, workflow_id: &str) -> Vec<Value> {
        let (status, body) = self
            .api
            .get(&format!("/api/v1/executions?workflowId={workflow_id}&pageSize=100"), &self.auth)
            .await;
        assert_eq!(status, 200, "{body}");
        body["data"].as_array().cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// A child's output flows on
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_output_flows_to_later_steps_on_dev() {
    child_output_flows_to_later_steps(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_output_flows_to_later_steps_on_serve() {
    child_output_flows_to_later_steps(Mode::Serve).await;
}

async fn child_output_flows_to_later_steps(mode: Mode) {
    let installation = install(mode, "parent@example.com", &[]).await;
    let bench = &installation.bench;
    let double = bench.jq("double", ".value * 2 | {value: .}").await;
    // The child doubles twice.
    let child = bench
        .workflow(
            "quadruple",
            json!([
                { "key": "a", "agentId": double },
                { "key": "b", "agentId": double, "dependsOn": ["a"], "inputMapping": "{{steps.a.output}}" },
            ]),
            json!({}),
        )
        .await;
    let call_child = bench.sub_workflow_agent("call quadruple", &child).await;
    let parent = bench
        .workflow(
            "parent",
            json!([
                { "key": "prep", "agentId": double },
                { "key": "sub", "agentId": call_child, "dependsOn": ["prep"], "inputMapping": { "value": "{{steps.prep.output.value}}" } },
                { "key": "after", "agentId": double, "dependsOn": ["sub"], "inputMapping": "{{steps.sub.output}}" },
            ]),
            json!({}),
        )
        .await;
    let parent_id = bench.execute(&parent, json!({ "input": { "value": 1 }, "priority": 8 })).await;
    let execution = bench.finished(&parent_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "value": 16 }), "1 * 2, * 4 in the child, * 2");
    let sub = step(&execution, "sub");
    assert_eq!(sub["output"], json!({ "value": 8 }), "{sub}");
    assert_eq!(sub["runnerId"], "engine", "the server ran the step, not a runner: {sub}");
    assert_eq!(sub["attempt"], 1);

    let children = bench.executions_of(&child).await;
    assert_eq!(children.len(), 1, "one child execution: {children:?}");
    let child_execution = &children[0];
    assert_eq!(child_execution["trigger"], "SUB_WORKFLOW", "{child_execution}");
    assert_eq!(child_execution["parentExecutionId"], parent_id.as_str());
    assert_eq!(child_execution["status"], "SUCCEEDED");
    assert_eq!(child_execution["input"], json!({ "value": 2 }), "the step's resolved input");
    assert_eq!(child_execution["output"], sub["output"], "the step completes with its output");
    assert_eq!(child_execution["priority"], 8, "the parent's priority");
    // The child is an execution of its own, readable with its steps.
    let child_detail = bench.execution(child_execution["id"].as_str().expect("child id")).await;
    assert_eq!(step(&child_detail, "b")["output"], json!({ "value": 8 }));

    // The same over gRPC: ExecuteWorkflow starts the parent, the child runs the same way.
    let started = bench.execute_over_grpc(&parent, json!({ "value": 5 })).await;
    let execution = bench.finished(&started.id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "value": 80 }));
    let children = bench.executions_of(&child).await;
    assert_eq!(children.len(), 2, "{children:?}");
    assert_eq!(children[0]["parentExecutionId"], started.id.as_str());
    assert_eq!(children[0]["output"], json!({ "value": 40 }));
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_failures_fail_the_step_on_dev() {
    child_failures_fail_the_step(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_failures_fail_the_step_on_serve() {
    child_failures_fail_the_step(Mode::Serve).await;
}

async fn child_failures_fail_the_step(mode: Mode) {
    let installation = install(mode, "failures@example.com", &[]).await;
    let bench = &installation.bench;

    // A failing child: the step fails retryably, and its retry starts a new child.
    let boom = bench.jq("boom", "error(\"kaboom\")").await;
    let failing =
        bench.workflow("failing", json!([{ "key": "explode", "agentId": boom }]), json!({})).await;
    let call_failing = bench.sub_workflow_agent("call failing", &failing).await;
    let parent = bench
        .workflow(
            "parent of failing",
            json!([{ "key": "sub", "agentId": call_failing, "retryPolicy": { "maxAttempts": 2, "initialBackoff": "1s" } }]),
            json!({}),
        )
        .await;
    let parent_id = bench.execute(&parent, json!({ "input": {} })).await;
    let execution = bench.finished(&parent_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().expect("error");
    assert!(error.starts_with("step sub failed"), "names the step: {error}");
    assert!(error.contains("child execution") && error.contains("kaboom"), "{error}");
    let sub = step(&execution, "sub");
    assert_eq!(sub["status"], "FAILED");
    assert_eq!(sub["attempt"], 2, "retried once: {sub}");
    let children = bench.executions_of(&failing).await;
    assert_eq!(children.len(), 2, "one child per attempt: {children:?}");
    for child in &children {
        assert_eq!(child["status"], "FAILED", "{child}");
        assert_eq!(child["parentExecutionId"], parent_id.as_str());
        let child_id = child["id"].as_str().expect("child id");
        assert!(
            sub["attempts"].as_array().expect("attempts").iter().any(|attempt| attempt["error"]
                .as_str()
                .is_some_and(|text| text.contains(child_id))),
            "an attempt names child {child_id}: {sub}"
        );
    }

    // A deleted workflow: the step fails at once, without retry.
    let double = bench.jq("double", ".value * 2 | {value: .}").await;
    let doomed =
        bench.workflow("doomed", json!([{ "key": "a", "agentId": double }]), json!({})).await;
    let call_doomed = bench.sub_workflow_agent("call doomed", &doomed).await;
    let orphan = bench
        .workflow(
            "parent of doomed",
            json!([{ "key": "sub", "agentId": call_doomed, "retryPolicy": { "maxAttempts": 3, "initialBackoff": "1s" } }]),
            json!({}),
        )
        .await;
    let (status, body) =
        bench.api.delete(&format!("/api/v1/workflows/{doomed}"), &bench.auth).await;
    assert!(status == 200 || status == 204, "delete: {status} {body}");
    let orphan_id = bench.execute(&orphan, json!({ "input": {} })).await;
    let execution = bench.finished(&orphan_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().expect("error");
    assert!(
        error.contains("step sub") && error.contains("does not exist or was deleted"),
        "{error}"
    );
    assert_eq!(step(&execution, "sub")["attempt"], 1, "not retried: {execution}");
    assert!(bench.executions_of(&doomed).await.is_empty(), "no child was started");
}

// ---------------------------------------------------------------------------------------------
// Depth
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_depth_limit_stops_a_workflow_calling_itself_on_dev() {
    the_depth_limit_stops_a_workflow_calling_itself(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_depth_limit_stops_a_workflow_calling_itself_on_serve() {
    the_depth_limit_stops_a_workflow_calling_itself(Mode::Serve).await;
}

async fn the_depth_limit_stops_a_workflow_calling_itself(mode: Mode) {
    let installation = install(mode, "depth@example.com", &["--max-workflow-depth", "2"]).await;
    let bench = &installation.bench;
    let double = bench.jq("double", ".value * 2 | {value: .}").await;
    let recursive =
        bench.workflow("ouroboros", json!([{ "key": "a", "agentId": double }]), json!({})).await;
    let call_itself = bench.sub_workflow_agent("call ouroboros", &recursive).await;
    let (status, body) =
        bench.api.get(&format!("/api/v1/workflows/{recursive}"), &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    let version = body["data"]["version"].clone();
    let (status, body) = bench
        .api
        .patch(
            &format!("/api/v1/workflows/{recursive}"),
            &bench.auth,
            json!({ "version": version, "steps": [{ "key": "again", "agentId": call_itself }] }),
        )
        .await;
    assert_eq!(status, 200, "make it call itself: {body}");

    let top = bench.execute(&recursive, json!({ "input": {} })).await;
    let execution = bench.finished(&top, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().expect("error");
    assert!(error.starts_with("step again failed"), "{error}");
    assert!(error.contains("maximum workflow depth of 2"), "names the limit: {error}");
    // Depths 0, 1 and 2 ran; the step of depth 2 was refused a child at depth 3.
    let executions = bench.executions_of(&recursive).await;
    assert_eq!(executions.len(), 3, "{executions:?}");
    let sub_workflows =
        executions.iter().filter(|execution| execution["trigger"] == "SUB_WORKFLOW").count();
    assert_eq!(sub_workflows, 2);
    assert!(executions.iter().all(|execution| execution["status"] == "FAILED"), "{executions:?}");
}

// ---------------------------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_parent_cancels_its_running_child_on_dev() {
    cancelling_the_parent_cancels_its_running_child(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_parent_cancels_its_running_child_on_serve() {
    cancelling_the_parent_cancels_its_running_child(Mode::Serve).await;
}

async fn cancelling_the_parent_cancels_its_running_child(mode: Mode) {
    let installation = install(mode, "cancel@example.com", &[]).await;
    let bench = &installation.bench;
    let sleeper = bench
        .code("sleeper", "python", "import time\ntime.sleep(30)\nprint('{}')\n", json!({}))
        .await;
    let slow =
        bench.workflow("slow", json!([{ "key": "nap", "agentId": sleeper }]), json!({})).await;
    let call_slow = bench.sub_workflow_agent("call slow", &slow).await;
    let parent = bench
        .workflow("parent of slow", json!([{ "key": "sub", "agentId": call_slow }]), json!({}))
        .await;
    let parent_id = bench.execute(&parent, json!({ "input": {} })).await;

    // Wait until the child's step runs on a runner.
    let started = Instant::now();
    let child_id = loop {
        let children = bench.executions_of(&slow).await;
        if let Some(child) = children.first() {
            let child_id = child["id"].as_str().expect("child id").to_owned();
            if step(&bench.execution(&child_id).await, "nap")["status"] == "RUNNING" {
                break child_id;
            }
        }
        assert!(started.elapsed() < LIMIT, "the child never ran: {children:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (status, body) = bench
        .api
        .post(
            &format!("/api/v1/executions/{parent_id}/cancel"),
            &bench.auth,
            json!({ "reason": "changed my mind" }),
        )
        .await;
    assert_eq!(status, 200, "cancel: {body}");

    let cancelled_at = Instant::now();
    let parent_execution = bench.finished(&parent_id, LIMIT).await;
    assert_eq!(parent_execution["status"], "CANCELLED", "{parent_execution}");
    assert_eq!(step(&parent_execution, "sub")["status"], "CANCELLED");
    let child = bench.finished(&child_id, LIMIT).await;
    assert_eq!(child["status"], "CANCELLED", "{child}");
    let child_error = child["error"].as_str().expect("child error");
    assert!(
        child_error.contains(&format!("cancelled with its parent execution {parent_id}"))
            && child_error.contains("changed my mind"),
        "{child_error}"
    );
    assert_eq!(step(&child, "nap")["status"], "CANCELLED", "the runner was told to stop: {child}");
    assert!(cancelled_at.elapsed() < Duration::from_secs(20), "stopped well before the sleep ends");
}

// ---------------------------------------------------------------------------------------------
// Crash repairs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_a_child_are_repaired_on_dev() {
    crashes_around_a_child_are_repaired(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_a_child_are_repaired_on_serve() {
    crashes_around_a_child_are_repaired(Mode::Serve).await;
}

/// A server on a fixed address that can be killed and started again on the same data.
struct Restartable {
    arguments: Vec<String>,
    server: Option<TurbocatProcess>,
    _dev_data: Option<tempfile::TempDir>,
    database: Option<ServeDatabase>,
    dev_data_dir: Option<std::path::PathBuf>,
}

impl Restartable {
    async fn start(mode: Mode) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("address")
            .port();
        let listen = format!("127.0.0.1:{port}");
        let (arguments, dev_data, database, dev_data_dir) = match mode {
            Mode::Dev => {
                let directory = tempfile::tempdir().expect("temporary directory");
                let path = directory.path().to_path_buf();
                let arguments = vec![
                    "dev".to_owned(),
                    "--listen".to_owned(),
                    listen,
                    "--data-dir".to_owned(),
                    path.to_str().expect("utf-8 path").to_owned(),
                ];
                (arguments, Some(directory), None, Some(path))
            }
            Mode::Serve => {
                let (url, name) = crate::support::create_postgres_database().await;
                let prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
                let arguments = vec![
                    "serve".to_owned(),
                    "--listen".to_owned(),
                    listen,
                    "--database-url".to_owned(),
                    url.clone(),
                    "--redis-url".to_owned(),
                    crate::support::redis_url(),
                    "--jwt-secret".to_owned(),
                    crate::support::TEST_JWT_SECRET.to_owned(),
                    "--redis-key-prefix".to_owned(),
                    prefix.clone(),
                    "--rate-limit-key-prefix".to_owned(),
                    format!("{prefix}ratelimit:"),
                ];
                (arguments, None, Some(ServeDatabase::new(url, name)), None)
            }
        };
        let mut restartable =
            Self { arguments, server: None, _dev_data: dev_data, database, dev_data_dir };
        restartable.boot().await;
        restartable
    }

    async fn boot(&mut self) {
        let arguments = self.arguments.clone();
        let server = tokio::task::spawn_blocking(move || {
            let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
            crate::support::start_turbocat(&borrowed, &[])
        })
        .await
        .expect("start the server");
        self.server = Some(server);
    }

    fn server(&self) -> &TurbocatProcess {
        self.server.as_ref().expect("running")
    }

    fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    /// The server's store, opened beside it (while it is stopped).
    async fn store(&self) -> std::sync::Arc<dyn turbocat::store::Store> {
        if let Some(directory) = &self.dev_data_dir {
            return crate::support::api::dev_store(directory).await;
        }
        let url = &self.database.as_ref().expect("database").url;
        std::sync::Arc::new(
            turbocat::store::PostgresStore::connect(url, 2).await.expect("connect the database"),
        )
    }
}

async fn crashes_around_a_child_are_repaired(mode: Mode) {
    use turbocat::store::{
        AttemptKey, ChildExecutionStart, ExecutionChange, ExecutionStatus, ExecutionTrigger,
        NewExecution, NewStepRun, OwnerScope, ParentStep, StepAssignment, StepTransitionOutcome,
    };

    let mut installation = Restartable::start(mode).await;
    let bench = Workbench::new(Api::new(installation.server()), "crash@example.com").await;
    let mut runner = None;
    if let Mode::Serve = mode {
        let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
        let url = installation.server().base_url();
        runner = Some(RunnerProcess::start(&url, &key, "crash", 4, "", &[]));
    }
    let double = bench.jq("double", ".value * 2 | {value: .}").await;
    let child_workflow =
        bench.workflow("child", json!([{ "key": "a", "agentId": double }]), json!({})).await;
    let call_child = bench.sub_workflow_agent("call child", &child_workflow).await;
    let parent_workflow =
        bench.workflow("parent", json!([{ "key": "sub", "agentId": call_child }]), json!({})).await;
    // One normal run gives the snapshots the crashed executions are made of.
    let normal = bench.execute(&parent_workflow, json!({ "input": { "value": 1 } })).await;
    let finished = bench.finished(&normal, LIMIT).await;
    assert_eq!(finished["output"], json!({ "value": 2 }), "{finished}");
    let normal_child =
        bench.executions_of(&child_workflow).await[0]["id"].as_str().expect("child id").to_owned();
    drop(runner);
    installation.kill();

    let store = installation.store().await;
    let parent_row = store
        .get_execution(OwnerScope::All, uuid::Uuid::parse_str(&normal).expect("id"))
        .await
        .expect("parent row");
    let child_row = store
        .get_execution(OwnerScope::All, uuid::Uuid::parse_str(&normal_child).expect("id"))
        .await
        .expect("child row");
    let agent_id = Some(uuid::Uuid::parse_str(&call_child).expect("agent id"));
    let now = chrono::Utc::now();
    // A RUNNING parent execution with input {value: n} and its PENDING step `sub`.
    let crashed_parent = |value: i64| {
        let store = store.clone();
        let parent_row = parent_row.clone();
        async move {
            let new_execution = NewExecution {
                workflow_id: parent_row.workflow_id,
                input: json!({ "value": value }),
                ..NewExecution::new(
                    parent_row.owner_id,
                    ExecutionTrigger::Manual,
                    parent_row.definition.clone(),
                )
            };
            let step = NewStepRun { agent_id, ..NewStepRun::new("sub", 1) };
            let (execution, steps) =
                store.create_execution(new_execution, vec![step]).await.expect("create");
            let running = ExecutionChange {
                started_at: Some(now),
                ..ExecutionChange::new(ExecutionStatus::Running, now)
            };
            assert!(
                store
                    .transition_execution(execution.id, &[ExecutionStatus::Queued], running)
                    .await
                    .expect("start")
            );
            let key = steps[0].attempt_key();
            let queued = store
                .mark_step_queued(key, Some(json!({ "value": value })), now)
                .await
                .expect("queue");
            assert!(queued.is_applied());
            (execution.id, key)
        }
    };
    let take_for_engine = |key: AttemptKey, lease_seconds: i64| {
        let store = store.clone();
        async move {
            let assignment = StepAssignment {
                runner_id: "engine".to_owned(),
                lease_expires_at: now + chrono::Duration::seconds(lease_seconds),
                assigned_at: now,
            };
            let assigned = store.assign_step(key, assignment).await.expect("assign");
            assert!(matches!(assigned, StepTransitionOutcome::Applied(_)));
        }
    };
    let start_child = |parent_id: uuid::Uuid, key: AttemptKey| {
        let store = store.clone();
        let child_row = child_row.clone();
        async move {
            let child = NewExecution {
                workflow_id: child_row.workflow_id,
                parent: Some(ParentStep {
                    execution_id: parent_id,
                    step_run_id: key.step_run_id,
                    attempt: key.attempt,
                }),
                input: json!({ "value": 100 }),
                ..NewExecution::new(
                    child_row.owner_id,
                    ExecutionTrigger::SubWorkflow,
                    child_row.definition.clone(),
                )
            };
            let step = NewStepRun::new("a", 1);
            match store.start_child_execution(key, child, vec![step], now).await.expect("child") {
                ChildExecutionStart::Started { child, .. } => child.id,
                rejected => panic!("{rejected:?}"),
            }
        }
    };

    // Crashed after queueing the step: it is QUEUED, and in no queue.
    let (after_queue, _) = crashed_parent(3).await;
    // Crashed after taking the step for the engine, before creating the child.
    let (after_assign, key) = crashed_parent(5).await;
    take_for_engine(key, -1).await;
    // Crashed after the child succeeded, before its parent step heard of it.
    let (after_child, key) = crashed_parent(7).await;
    take_for_engine(key, 30).await;
    let finished_child = start_child(after_child, key).await;
    for status in [ExecutionStatus::Running, ExecutionStatus::Succeeded] {
        let change = ExecutionChange {
            output: Some(json!({ "value": 42 })),
            ..ExecutionChange::new(status, now)
        };
        assert!(
            store
                .transition_execution(finished_child, ExecutionStatus::UNFINISHED, change)
                .await
                .expect("finish the child")
        );
    }
    // Crashed after cancelling the parent, before cancelling its child.
    let (cancelled_parent, key) = crashed_parent(9).await;
    take_for_engine(key, 30).await;
    let orphan = start_child(cancelled_parent, key).await;
    store.cancel_pending_steps(cancelled_parent, now).await.expect("cancel steps");
    let cancelled = ExecutionChange::new(ExecutionStatus::Cancelled, now);
    assert!(
        store
            .transition_execution(cancelled_parent, ExecutionStatus::UNFINISHED, cancelled)
            .await
            .expect("cancel parent")
    );
    drop(store);

    installation.boot().await;
    let _runner = match mode {
        Mode::Dev => None,
        Mode::Serve => {
            let (key, _) = bench.api.create_key(&bench.auth, "runner again", &["RUNNER"]).await;
            let url = installation.server().base_url();
            Some(RunnerProcess::start(&url, &key, "crash-again", 4, "", &[]))
        }
    };
    for (parent_id, expected) in [(after_queue, 6), (after_assign, 10), (after_child, 42)] {
        let execution = bench.finished(&parent_id.to_string(), LIMIT).await;
        assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
        assert_eq!(execution["output"], json!({ "value": expected }), "{execution}");
        let sub = step(&execution, "sub");
        assert_eq!((&sub["attempt"], &sub["infraReassignments"]), (&json!(1), &json!(0)), "{sub}");
        assert_eq!(sub["runnerId"], "engine", "never taken back for a runner: {sub}");
    }
    let children = bench.executions_of(&child_workflow).await;
    for parent_id in [after_queue, after_assign, after_child, cancelled_parent] {
        let of_parent = children
            .iter()
            .filter(|child| child["parentExecutionId"] == parent_id.to_string().as_str())
            .count();
        assert_eq!(of_parent, 1, "exactly one child for {parent_id}: {children:?}");
    }
    let orphan = bench.finished(&orphan.to_string(), LIMIT).await;
    assert_eq!(orphan["status"], "CANCELLED", "{orphan}");
    assert!(
        orphan["error"].as_str().is_some_and(|error| error.contains("no longer waits")),
        "{orphan}"
    );
}
