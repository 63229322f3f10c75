//! `turbocat serve` (PostgreSQL, Redis) with `turbocat runner` processes: label routing,
//! capacity, a runner killed mid-step, the server killed and restarted mid-execution (and, on
//! `dev` with its own runner, an execution started in its creation commit).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::{Api, Auth};
use crate::support::{
    ServeDatabase, TurbocatProcess, start_serve, start_serve_replica, start_turbocat,
};
use crate::{RunnerProcess, Time, Workbench, step, time};

const LIMIT: Duration = Duration::from_secs(90);

/// Waits until `GET /runners` lists runners named `names`; returns their ids by name.
pub async fn wait_for_runners(api: &Api, auth: &Auth, names: &[&str]) -> Vec<(String, String)> {
    let started = Instant::now();
    loop {
        let (status, body) = api.get("/api/v1/runners", auth).await;
        assert_eq!(status, 200, "{body}");
        let listed: Vec<(String, String)> = body["data"]
            .as_array()
            .map(|runners| {
                runners
                    .iter()
                    .map(|runner| {
                        (
                            runner["name"].as_str().unwrap_or_default().to_owned(),
                            runner["id"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if names.iter().all(|name| listed.iter().any(|(listed_name, _)| listed_name == name)) {
            return listed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "runners {names:?} never attached: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn runner_id(runners: &[(String, String)], name: &str) -> String {
    runners.iter().find(|(listed, _)| listed == name).map(|(_, id)| id.clone()).expect("runner")
}

async fn serve_with_account(extra: &[&str]) -> (TurbocatProcess, ServeDatabase, Workbench, String) {
    let (server, database) = start_serve(extra).await;
    let api = Api::new(&server);
    let bench = Workbench::new(api, "runners@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    (server, database, bench, key)
}

/// Executes `workflow` with input `{"n": n}` over REST; the answer says the execution started
/// in its creation (RUNNING, started when created). Returns it and its creation time.
async fn execute_started(bench: &Workbench, workflow: &str, n: i64) -> (Value, Time) {
    let (status, body) = bench
        .api
        .post(
            &format!("/api/v1/workflows/{workflow}/execute"),
            &bench.auth,
            json!({ "input": { "n": n } }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let created = body["data"].clone();
    assert_eq!(created["status"], "RUNNING", "{created}");
    let created_at = time(&created["createdAt"]);
    assert_eq!(time(&created["startedAt"]), created_at, "{created}");
    (created, created_at)
}

/// `[startedAt, finishedAt]` of a step run's last attempt.
fn interval(step_run: &Value) -> (Time, Time) {
    (time(&step_run["startedAt"]), time(&step_run["finishedAt"]))
}

/// Starts a workflow of one python step (`slow`) that sleeps 3 s and waits until it runs;
/// returns the workflow and the execution.
async fn slow_step_running(bench: &Workbench, name: &str) -> (String, String) {
    let slow = bench
        .code(
            "slow",
            "python",
            "import json, time\ntime.sleep(3)\nprint(json.dumps({'done': True}))\n",
            json!({}),
        )
        .await;
    let workflow =
        bench.workflow(name, json!([{ "key": "slow", "agentId": slow }]), json!({})).await;
    let execution_id = bench.execute(&workflow, json!({})).await;
    bench
        .wait_for(&execution_id, LIMIT, "running the slow step", |execution| {
            step(execution, "slow")["status"] == "RUNNING"
        })
        .await;
    (workflow, execution_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_go_to_runners_with_their_labels_and_never_beyond_capacity() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let url = server.base_url();
    let _gpu = RunnerProcess::start(&url, &key, "gpu-box", 1, "gpu,region=eu", &[]);
    let _plain = RunnerProcess::start(&url, &key, "plain-box", 2, "region=us", &[]);
    let runners = wait_for_runners(&bench.api, &bench.auth, &["gpu-box", "plain-box"]).await;
    let (status, body) = bench.api.get("/api/v1/runners", &bench.auth).await;
    assert_eq!(status, 200);
    let gpu_listed = body["data"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == "gpu-box"))
        .cloned()
        .expect("gpu runner");
    assert_eq!(gpu_listed["capacity"], 1);
    assert_eq!(gpu_listed["labels"]["region"], "eu");

    let nap = bench
        .code(
            "nap",
            "python",
            "import json, sys, time\ntime.sleep(1)\nprint(json.dumps({'ok': True}))\n",
            json!({}),
        )
        .await;
    let mut steps = Vec::new();
    for index in 0..3 {
        steps.push(json!({ "key": format!("gpu{index}"), "agentId": nap, "requiredLabels": { "gpu": "" } }));
        steps.push(json!({ "key": format!("us{index}"), "agentId": nap, "requiredLabels": { "region": "us" } }));
    }
    let workflow = bench.workflow("routing", json!(steps), json!({})).await;
    let execution_id = bench.execute(&workflow, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");

    let gpu_id = runner_id(&runners, "gpu-box");
    let plain_id = runner_id(&runners, "plain-box");
    let mut gpu_intervals = Vec::new();
    let mut plain_intervals = Vec::new();
    for index in 0..3 {
        let gpu_step = step(&execution, &format!("gpu{index}"));
        assert_eq!(gpu_step["runnerId"], gpu_id.as_str(), "{gpu_step}");
        gpu_intervals.push(interval(gpu_step));
        let plain_step = step(&execution, &format!("us{index}"));
        assert_eq!(plain_step["runnerId"], plain_id.as_str(), "{plain_step}");
        plain_intervals.push(interval(plain_step));
    }
    // Capacity 1: the gpu steps never overlap. Capacity 2: never three plain ones at once.
    gpu_intervals.sort();
    for pair in gpu_intervals.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "gpu steps overlapped: {pair:?}");
    }
    // The third plain step may start only once one of the first two has finished (whichever
    // did: two steps of one second each can finish in either order).
    plain_intervals.sort();
    let first_free_slot = plain_intervals[0].1.min(plain_intervals[1].1);
    assert!(
        first_free_slot <= plain_intervals[2].0,
        "three plain steps at once: {plain_intervals:?}"
    );
}

/// A success and the steps it makes ready share one commit when a runner attached to the same
/// server has room for them: the successor is queued and assigned at the very instant its
/// predecessor finished (two commits would give it a later time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_hands_its_successors_on_in_its_own_commit() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "chain-box", 4, "", &[]);
    wait_for_runners(&bench.api, &bench.auth, &["chain-box"]).await;
    let identity = bench.jq("identity", ".").await;
    let steps = json!([
        { "key": "a", "agentId": identity },
        { "key": "b", "agentId": identity, "dependsOn": ["a"] },
        { "key": "c", "agentId": identity, "dependsOn": ["b"] },
        { "key": "d", "agentId": identity, "dependsOn": ["b"], "inputMapping": "{{steps.b.output}}" },
    ]);
    let workflow = bench.workflow("one commit a step", steps, json!({})).await;
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 1 } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    for (before, after) in [("a", "b"), ("b", "c"), ("b", "d")] {
        let finished = time(&step(&execution, before)["finishedAt"]);
        let successor = step(&execution, after);
        assert_eq!(time(&successor["queuedAt"]), finished, "{after} after {before}: {successor}");
        assert_eq!(
            time(&successor["attempts"][0]["assignedAt"]),
            finished,
            "{after} after {before}: {successor}"
        );
    }
    assert_eq!(step(&execution, "d")["output"], json!({ "n": 1 }));
}

/// An execution is created RUNNING with its first steps already moved on, in the commit that
/// creates it: handed to a runner attached with a free slot (with their input resolved), or
/// QUEUED when no runner here takes them, and then dispatched through the queue. The execute
/// answer shows it so, over REST and gRPC alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_starts_in_the_commit_that_creates_it() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let url = server.base_url();
    let _runner = RunnerProcess::start(&url, &key, "start-box", 4, "", &[]);
    let listed = wait_for_runners(&bench.api, &bench.auth, &["start-box"]).await;
    let start_box = runner_id(&listed, "start-box");
    let identity = bench.jq("identity", ".").await;
    let steps = json!([
        { "key": "a", "agentId": identity },
        { "key": "b", "agentId": identity, "inputMapping": { "m": "{{input.n}}" } },
        { "key": "moon", "agentId": identity, "requiredLabels": { "zone": "moon" } },
        { "key": "c", "agentId": identity, "dependsOn": ["a", "b", "moon"] },
    ]);
    let workflow = bench.workflow("started at creation", steps, json!({})).await;

    let (created, created_at) = execute_started(&bench, &workflow, 7).await;
    let created = &created;
    for key in ["a", "b"] {
        let first = step(created, key);
        assert_eq!(first["status"], "ASSIGNED", "{first}");
        assert_eq!(first["runnerId"], start_box.as_str(), "{first}");
        assert_eq!(time(&first["queuedAt"]), created_at, "{first}");
    }
    assert_eq!(step(created, "b")["input"], json!({ "m": 7 }), "{created}");
    let moon = step(created, "moon");
    assert_eq!(moon["status"], "QUEUED", "{moon}");
    assert_eq!(time(&moon["queuedAt"]), created_at, "{moon}");
    assert_eq!(moon["runnerId"], "", "{moon}");
    assert_eq!(step(created, "c")["status"], "PENDING", "{created}");
    let rest_execution = created["id"].as_str().expect("id").to_owned();

    let over_grpc = bench.execute_over_grpc(&workflow, json!({ "n": 8 })).await;
    use turbocat::proto::v1::{ExecutionStatus, StepRunStatus};
    assert_eq!(over_grpc.status(), ExecutionStatus::Running, "{over_grpc:?}");
    assert_eq!(over_grpc.started_at, over_grpc.created_at, "{over_grpc:?}");
    let status_of = |key: &str| {
        let found = over_grpc.step_runs.iter().find(|step_run| step_run.step_key == key);
        found.map(|step_run| (step_run.status(), step_run.runner_id.clone()))
    };
    assert_eq!(status_of("a"), Some((StepRunStatus::Assigned, start_box.clone())));
    assert_eq!(status_of("b"), Some((StepRunStatus::Assigned, start_box.clone())));
    assert_eq!(status_of("moon"), Some((StepRunStatus::Queued, String::new())));
    assert_eq!(status_of("c"), Some((StepRunStatus::Pending, String::new())));

    // The QUEUED first steps go out through the queue once a runner that takes them attaches.
    let _moon_box = RunnerProcess::start(&url, &key, "moon-box", 2, "zone=moon", &[]);
    for (execution_id, n) in [(rest_execution, 7), (over_grpc.id.clone(), 8)] {
        let execution = bench.finished(&execution_id, LIMIT).await;
        assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
        assert_eq!(step(&execution, "b")["output"], json!({ "m": n }), "{execution}");
        assert_ne!(step(&execution, "moon")["runnerId"], start_box.as_str(), "{execution}");
    }
}

/// `dev` (SQLite, its own runner) starts an execution in its creation commit too: its first
/// steps come back ASSIGNED to the in-process runner, over REST and gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_starts_in_the_commit_that_creates_it_on_dev() {
    let (server, _data) = crate::support::start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "dev-start@example.com").await;
    let identity = bench.jq("identity", ".").await;
    // Once an execution has finished, the in-process runner is attached.
    let warm_up =
        bench.workflow("warm-up", json!([{ "key": "a", "agentId": identity }]), json!({})).await;
    let warm_up = bench.execute(&warm_up, json!({ "input": {} })).await;
    assert_eq!(bench.finished(&warm_up, LIMIT).await["status"], "SUCCEEDED");

    let steps = json!([
        { "key": "a", "agentId": identity },
        { "key": "b", "agentId": identity, "inputMapping": { "m": "{{input.n}}" } },
        { "key": "c", "agentId": identity, "dependsOn": ["a", "b"] },
    ]);
    let workflow = bench.workflow("started at creation on dev", steps, json!({})).await;
    let (created, created_at) = execute_started(&bench, &workflow, 5).await;
    let created = &created;
    let local_runner = step(created, "a")["runnerId"].as_str().unwrap_or_default().to_owned();
    assert!(!local_runner.is_empty(), "{created}");
    for key in ["a", "b"] {
        let first = step(created, key);
        assert_eq!(first["status"], "ASSIGNED", "{first}");
        assert_eq!(first["runnerId"], local_runner.as_str(), "{first}");
        assert_eq!(time(&first["queuedAt"]), created_at, "{first}");
    }
    assert_eq!(step(created, "b")["input"], json!({ "m": 5 }), "{created}");
    assert_eq!(step(created, "c")["status"], "PENDING", "{created}");
    let rest_execution = created["id"].as_str().expect("id").to_owned();

    let over_grpc = bench.execute_over_grpc(&workflow, json!({ "n": 6 })).await;
    use turbocat::proto::v1::{ExecutionStatus, StepRunStatus};
    assert_eq!(over_grpc.status(), ExecutionStatus::Running, "{over_grpc:?}");
    assert_eq!(over_grpc.started_at, over_grpc.created_at, "{over_grpc:?}");
    for key in ["a", "b"] {
        let first = over_grpc.step_runs.iter().find(|step_run| step_run.step_key == key);
        let first = first.map(|step_run| (step_run.status(), step_run.runner_id.clone()));
        assert_eq!(first, Some((StepRunStatus::Assigned, local_runner.clone())), "{over_grpc:?}");
    }

    for (execution_id, n) in [(rest_execution, 5), (over_grpc.id.clone(), 6)] {
        let execution = bench.finished(&execution_id, LIMIT).await;
        assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
        assert_eq!(step(&execution, "b")["output"], json!({ "m": n }), "{execution}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_runner_is_killed_runs_again_on_another_runner() {
    let (server, _database, bench, key) =
        serve_with_account(&["--runner-lease-seconds", "3"]).await;
    let url = server.base_url();
    let mut doomed = RunnerProcess::start(&url, &key, "doomed", 1, "", &[]);
    let runners = wait_for_runners(&bench.api, &bench.auth, &["doomed"]).await;
    let doomed_id = runner_id(&runners, "doomed");
    let (_, execution_id) = slow_step_running(&bench, "survivor").await;
    doomed.kill();
    let _survivor = RunnerProcess::start(&url, &key, "survivor", 1, "", &[]);
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let slow_step = step(&execution, "slow");
    assert_eq!(slow_step["attempt"], 2, "{slow_step}");
    assert_eq!(slow_step["infraReassignments"], 1, "not a user retry: {slow_step}");
    assert_ne!(slow_step["runnerId"], doomed_id.as_str());
    let attempts = slow_step["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["runnerId"], doomed_id.as_str());
    assert_eq!(attempts[0]["status"], "LEASE_LOST", "{slow_step}");
    assert_eq!(attempts[1]["status"], "SUCCEEDED", "{slow_step}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_survives_the_server_being_killed_and_restarted() {
    // A fixed port, so the runner finds the restarted server where it left it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let flags = [
        "--listen",
        listen.as_str(),
        "--redis-key-prefix",
        prefix.as_str(),
        "--runner-lease-seconds",
        "6",
    ];
    let (mut server, database, bench, key) = serve_with_account(&flags).await;
    let url = server.base_url();
    let _runner = RunnerProcess::start(&url, &key, "steady", 2, "", &[]);
    wait_for_runners(&bench.api, &bench.auth, &["steady"]).await;
    let step_agent = bench
        .code("tick", "python", "import json, sys, time\ndata = json.load(sys.stdin)\ntime.sleep(2)\nprint(json.dumps({'n': data['n'] + 1}))\n", json!({}))
        .await;
    let workflow = bench
        .workflow(
            "restart",
            json!([
                { "key": "one", "agentId": step_agent },
                { "key": "two", "agentId": step_agent, "dependsOn": ["one"], "inputMapping": "{{steps.one.output}}" },
                { "key": "three", "agentId": step_agent, "dependsOn": ["two"], "inputMapping": "{{steps.two.output}}" },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 0 } })).await;
    // The server goes down while the runner holds step two.
    bench
        .wait_for(&execution_id, LIMIT, "running the second step", |execution| {
            step(execution, "two")["status"] == "RUNNING"
        })
        .await;
    server.kill();
    let restarted = {
        let arguments: Vec<String> = [
            "serve",
            "--listen",
            listen.as_str(),
            "--database-url",
            database.url.as_str(),
            "--redis-url",
            crate::support::redis_url().as_str(),
            "--jwt-secret",
            crate::support::TEST_JWT_SECRET,
            "--redis-key-prefix",
            prefix.as_str(),
            "--runner-lease-seconds",
            "6",
        ]
        .iter()
        .map(|argument| argument.to_string())
        .collect();
        tokio::task::spawn_blocking(move || {
            let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
            start_turbocat(&borrowed, &[])
        })
        .await
        .expect("restart")
    };
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "n": 3 }));
    // The runner reconnected within its lease and said it still held step two: it kept it.
    let two = step(&execution, "two");
    assert_eq!(
        (two["attempt"].as_i64(), two["infraReassignments"].as_i64()),
        (Some(1), Some(0)),
        "{two}"
    );
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_lists_the_runners_attached_to_any_of_them() {
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let shared = ["--redis-key-prefix", redis_prefix.as_str()];
    let (first, database) = start_serve(&shared).await;
    let second = start_serve_replica(&database, &shared).await;
    let bench = Workbench::new(Api::new(&first), "directory@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let mut runner = RunnerProcess::start(&first.base_url(), &key, "on-first", 3, "gpu", &[]);
    wait_for_runners(&bench.api, &bench.auth, &["on-first"]).await;

    // The other replica lists it too, over REST and gRPC, with its labels and capacity.
    let other = Api::new(&second);
    let listed = wait_for_runners(&other, &bench.auth, &["on-first"]).await;
    let (status, body) = other.get("/api/v1/runners", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    let entry = body["data"]
        .as_array()
        .and_then(|runners| runners.iter().find(|runner| runner["name"] == "on-first"))
        .cloned()
        .expect("listed");
    assert_eq!(entry["capacity"], 3, "{entry}");
    assert_eq!(entry["labels"]["gpu"], "", "{entry}");
    assert_eq!(entry["id"], runner_id(&listed, "on-first").as_str());
    let mut client =
        turbocat::proto::v1::runner_service_client::RunnerServiceClient::new(other.channel().await);
    let response = client
        .list_runners(crate::support::api::grpc(
            turbocat::proto::v1::ListRunnersRequest::default(),
            &bench.auth,
        ))
        .await
        .expect("list runners over gRPC")
        .into_inner();
    assert!(response.runners.iter().any(|runner| runner.name == "on-first"), "{response:?}");

    // Another user sees no private runner of this one: runner keys make owner-only runners.
    let stranger = Workbench::new(Api::new(&second), "directory-stranger@example.com").await;
    let (status, body) = other.get("/api/v1/runners", &stranger.auth).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!([]), "{body}");

    // Once it is gone, it leaves both lists.
    runner.kill();
    let started = Instant::now();
    loop {
        let (_, body) = other.get("/api/v1/runners", &bench.auth).await;
        let (_, own) = bench.api.get("/api/v1/runners", &bench.auth).await;
        if body["data"] == json!([]) && own["data"] == json!([]) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still listed: {body} {own}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_steps_go_out_by_priority_then_age() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let echo = bench.jq("echo", ".").await;
    let workflow =
        bench.workflow("prioritized", json!([{ "key": "only", "agentId": echo }]), json!({})).await;
    // No runner yet: everything waits in the queue.
    let mut executions = Vec::new();
    for (label, priority) in [("low", 3), ("high-first", 9), ("middle", 5), ("high-second", 9)] {
        let id = bench
            .execute(&workflow, json!({ "input": { "label": label }, "priority": priority }))
            .await;
        executions.push((label, id));
        // Distinct creation times, so age breaks the tie between the two of priority 9.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _runner = RunnerProcess::start(&server.base_url(), &key, "single-slot", 1, "", &[]);
    let mut started = Vec::new();
    for (label, id) in &executions {
        let execution = bench.finished(id, LIMIT).await;
        assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
        started.push((time(&step(&execution, "only")["attempts"][0]["assignedAt"]), *label));
    }
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, label)| *label).collect();
    assert_eq!(order, ["high-first", "high-second", "middle", "low"]);
}

/// A full runner that reports a success has the successor take over the slot it freed, in the
/// result's commit: a running execution goes on before one queued after it starts. Not when the
/// queue holds a step of a higher priority: the freed slot goes to that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_its_predecessors_slot_unless_more_urgent_work_waits() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "one-slot", 1, "", &[]);
    wait_for_runners(&bench.api, &bench.auth, &["one-slot"]).await;
    let slow = bench
        .code(
            "slow-first",
            "python",
            "import json, sys, time\ndata = json.load(sys.stdin)\ntime.sleep(1)\nprint(json.dumps(data))\n",
            json!({}),
        )
        .await;
    let echo = bench.jq("then", ".").await;
    let workflow = bench
        .workflow(
            "two steps",
            json!([
                { "key": "first", "agentId": slow },
                { "key": "second", "agentId": echo, "dependsOn": ["first"] },
            ]),
            json!({}),
        )
        .await;
    for later_priority in [5, 9] {
        let running = bench.execute(&workflow, json!({ "priority": 5 })).await;
        bench
            .wait_for(&running, LIMIT, "running its first step", |execution| {
                step(execution, "first")["status"] == "RUNNING"
            })
            .await;
        let later = bench.execute(&workflow, json!({ "priority": later_priority })).await;
        let running = bench.finished(&running, LIMIT).await;
        let later = bench.finished(&later, LIMIT).await;
        assert_eq!(
            (&running["status"], &later["status"]),
            (&json!("SUCCEEDED"), &json!("SUCCEEDED"))
        );
        let finished = time(&step(&running, "first")["finishedAt"]);
        let second = step(&running, "second");
        let second_assigned = time(&second["attempts"][0]["assignedAt"]);
        let later_assigned = time(&step(&later, "first")["attempts"][0]["assignedAt"]);
        if later_priority == 5 {
            assert_eq!(
                second_assigned, finished,
                "took the slot over in the result's commit: {second}"
            );
            assert!(second_assigned < later_assigned, "{running} {later}");
        } else {
            assert!(
                later_assigned < second_assigned,
                "the more urgent step first: {running} {later}"
            );
            assert_eq!(time(&second["queuedAt"]), finished, "queued with the result: {second}");
            assert!(second_assigned > finished, "then waited for the slot: {second}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_told_to_stop_finishes_its_step_and_takes_no_more() {
    let (server, _database, bench, key) = serve_with_account(&[]).await;
    let url = server.base_url();
    let mut leaving = RunnerProcess::start(&url, &key, "leaving", 2, "", &[]);
    let runners = wait_for_runners(&bench.api, &bench.auth, &["leaving"]).await;
    let leaving_id = runner_id(&runners, "leaving");
    let (workflow, first) = slow_step_running(&bench, "drained").await;
    let pid = leaving.child.id().to_string();
    let signalled = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    assert!(signalled.expect("kill").success());

    // While it drains it has a free slot but takes nothing new: this waits for another runner.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = bench.execute(&workflow, json!({})).await;
    let execution = bench.finished(&first, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let slow_step = step(&execution, "slow");
    assert_eq!(slow_step["runnerId"], leaving_id.as_str(), "{slow_step}");
    assert_eq!(slow_step["attempt"], 1, "finished where it ran: {slow_step}");
    let waiting = bench.execution(&second).await;
    assert_eq!(step(&waiting, "slow")["status"], "QUEUED", "{waiting}");

    // The drained runner exits on its own, cleanly.
    let exited = Instant::now();
    let status = loop {
        if let Some(status) = leaving.child.try_wait().expect("wait") {
            break status;
        }
        assert!(exited.elapsed() < Duration::from_secs(20), "the runner never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}");

    let _stayer = RunnerProcess::start(&url, &key, "stayer", 1, "", &[]);
    let execution = bench.finished(&second, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_keeps_losing_its_runner_fails_at_the_reassignment_cap() {
    let (server, _database, bench, key) =
        serve_with_account(&["--runner-lease-seconds", "2", "--max-runner-reassignments", "1"])
            .await;
    let url = server.base_url();
    let stuck = bench
        .code(
            "stuck",
            "python",
            "import json, time\ntime.sleep(60)\nprint(json.dumps({}))\n",
            json!({}),
        )
        .await;
    let workflow = bench
        .workflow(
            "unlucky",
            json!([{ "key": "stuck", "agentId": stuck, "retryPolicy": { "maxAttempts": 5, "initialBackoff": "0.1s" } }]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&workflow, json!({})).await;
    for (round, name) in ["first-victim", "second-victim"].iter().enumerate() {
        let mut victim = RunnerProcess::start(&url, &key, name, 1, "", &[]);
        let attempt = i64::try_from(round).expect("small") + 1;
        bench
            .wait_for(&execution_id, LIMIT, "running on the victim", |execution| {
                let stuck = step(execution, "stuck");
                stuck["status"] == "RUNNING" && stuck["attempt"] == attempt
            })
            .await;
        victim.kill();
    }
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let stuck_step = step(&execution, "stuck");
    assert_eq!(stuck_step["infraReassignments"], 1, "{stuck_step}");
    assert_eq!(stuck_step["attempt"], 2, "the user's retries were not used: {stuck_step}");
    let error = execution["error"].as_str().unwrap_or_default();
    assert!(error.contains("stuck") && error.contains("runner was lost"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_lease_alive_without_writing_the_database() {
    // A 2 s lease (a heartbeat every 0.67 s) and a step of 3 s: only heartbeats keep it.
    let (server, _database, bench, key) =
        serve_with_account(&["--runner-lease-seconds", "2"]).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "beating", 1, "", &[]);
    wait_for_runners(&bench.api, &bench.auth, &["beating"]).await;
    let (_, execution_id) = slow_step_running(&bench, "heartbeats").await;
    let before = bench.execution(&execution_id).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let later = bench.execution(&execution_id).await;
    let (running, still) = (step(&before, "slow"), step(&later, "slow"));
    assert_eq!(still["status"], "RUNNING", "{still}");
    // Several heartbeats came in between; the row did not change.
    assert_eq!(running["updatedAt"], still["updatedAt"], "{running} {still}");
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let slow = step(&execution, "slow");
    assert_eq!((slow["attempt"].as_i64(), slow["infraReassignments"].as_i64()), (Some(1), Some(0)));
}
