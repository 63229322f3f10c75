//! Graceful shutdown: SIGTERM on a `serve` replica with executions in flight, two runners
//! attached (one through a load balancer, one given both replicas with `--server A,B`) and an
//! SSE watch open; it exits within its grace period, the watch ends with a last event saying
//! why, each runner attaches to the other replica with the steps it still runs, and every
//! execution succeeds with each step run once. The same signal on `dev` with a step running and
//! a watch open. Watches are read over SSE and over gRPC.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::json;

use tokio::task::JoinHandle;
use turbocat::proto::v1::WatchExecutionRequest;
use turbocat::proto::v1::execution_service_client::ExecutionServiceClient;

use crate::proxy::TcpProxy;
use crate::support::api::{Api, Auth, grpc};
use crate::support::{TurbocatProcess, start_dev, start_serve, start_serve_replica};
use crate::{
    Bench, RunnerProcess, assert_every_step_ran_once, some_step_running, terminate, unique_prefix,
    wait_for_runner,
};

/// Reads an SSE stream to its end: the text received, and whether it ended cleanly (not broken).
async fn read_events(url: String, token: String) -> (String, bool) {
    let response = reqwest::Client::new()
        .get(url)
        .bearer_auth(token)
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("open the event stream");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            Err(_) => return (text, false),
        }
    }
    (text, true)
}

/// Reads a gRPC `WatchExecution` to its end: how many events came, and the status it ended with
/// (`None`: it ended without one).
async fn read_grpc_watch(
    api: &Api,
    auth: &Auth,
    execution_id: &str,
) -> JoinHandle<(usize, Option<tonic::Status>)> {
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let request = WatchExecutionRequest { execution_id: execution_id.to_owned() };
    let mut stream =
        client.watch_execution(grpc(request, auth)).await.expect("open the watch").into_inner();
    tokio::spawn(async move {
        let mut events = 0;
        loop {
            match stream.message().await {
                Ok(Some(_)) => events += 1,
                Ok(None) => return (events, None),
                Err(status) => return (events, Some(status)),
            }
        }
    })
}

/// The gRPC watch ended with UNAVAILABLE saying the server is shutting down, after its snapshot.
async fn assert_grpc_watch_ended_saying_why(watch: JoinHandle<(usize, Option<tonic::Status>)>) {
    let (events, status) =
        tokio::time::timeout(Duration::from_secs(2), watch).await.expect("ended").expect("read");
    assert!(events >= 1, "the snapshot came first");
    let status = status.expect("an UNAVAILABLE status");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

/// Waits for the process to exit; how long it took from `since`.
async fn exited(process: &mut TurbocatProcess, since: Instant, limit: Duration) -> Duration {
    loop {
        if !process.is_running() {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "still running {limit:?} after SIGTERM:\n{}",
            process.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream ended cleanly with the snapshot first and a last `error` event saying the server
/// is shutting down.
fn assert_ended_saying_why(events: &str, clean: bool) {
    assert!(clean, "the stream broke instead of ending: {events}");
    assert!(events.contains("event: message"), "the snapshot came first: {events}");
    let last_event = events.rsplit("event: ").next().unwrap_or_default();
    assert!(last_event.starts_with("error"), "{events}");
    assert!(last_event.contains("SERVICE_UNAVAILABLE"), "{events}");
    assert!(last_event.contains("shutting down"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_exits_in_time_and_its_runner_carries_on_elsewhere() {
    let prefix = unique_prefix();
    let (mut leaving, database) =
        start_serve(&["--redis-key-prefix", &prefix, "--shutdown-grace-seconds", "10"]).await;
    let staying = start_serve_replica(&database, &["--redis-key-prefix", &prefix]).await;
    // The load balancer: each new connection goes to the first replica that accepts it.
    let balancer = TcpProxy::start(vec![leaving.address, staying.address]).await;
    let bench = Bench::new(Api::new(&leaving), "draining@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let balanced =
        RunnerProcess::start(&format!("http://{}", balancer.address), &key, "balanced", 2, "", &[]);
    // The other is given both replicas, the leaving one first: it must not go back to it.
    let servers = format!("{},{}", leaving.base_url(), staying.base_url());
    let listed = RunnerProcess::start(&servers, &key, "listed", 2, "", &[]);
    wait_for_runner(&bench.api, &bench.auth, "balanced").await;
    wait_for_runner(&bench.api, &bench.auth, "listed").await;
    crate::runners::wait_for_attach_line(&leaving, "listed").await;

    // Fan-out of four naps and a join; three executions keep the runners' four slots busy.
    let nap = bench.sleeper("nap", 2.5).await;
    let join = bench.jq("join", "{joined: true}").await;
    let mut steps: Vec<serde_json::Value> =
        (0..4).map(|index| json!({ "key": format!("nap{index}"), "agentId": nap })).collect();
    steps.push(
        json!({ "key": "join", "agentId": join, "dependsOn": ["nap0", "nap1", "nap2", "nap3"] }),
    );
    let workflow = bench.workflow("fan", json!(steps)).await;
    let mut executions = Vec::new();
    for _ in 0..3 {
        executions.push(bench.execute(&workflow).await);
    }
    bench.wait_for(&executions[0], Duration::from_secs(30), "running", some_step_running).await;
    wait_until_steps_run(&bench, &executions, 4).await;

    let watch = tokio::spawn(read_events(
        format!("{}/api/v1/executions/{}/events", leaving.base_url(), executions[0]),
        bench.token.clone(),
    ));
    let grpc_watch = read_grpc_watch(&bench.api, &bench.auth, &executions[1]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    terminate(leaving.pid());
    let took = exited(&mut leaving, signalled, Duration::from_secs(12)).await;
    assert!(took < Duration::from_secs(11), "took {took:?}");
    let (events, clean) =
        tokio::time::timeout(Duration::from_secs(2), watch).await.expect("ended").expect("read");
    assert_ended_saying_why(&events, clean);
    assert_grpc_watch_ended_saying_why(grpc_watch).await;

    // The other replica carries on: the runners moved there (same processes, same names), and
    // every execution succeeds with each step run once, nothing lost, nothing doubled.
    let other = Bench {
        api: Api::new(&staying),
        auth: bench.auth.clone(),
        user_id: bench.user_id.clone(),
        token: bench.token.clone(),
    };
    for execution_id in &executions {
        let execution = other.finished(execution_id, Duration::from_secs(45)).await;
        assert_every_step_ran_once(&execution);
    }

    // Each kept the steps it was running when it moved: they finished on it, reported through
    // the other replica.
    for name in ["balanced", "listed"] {
        let attached = crate::runners::wait_for_attach_line(&staying, name).await;
        assert!(!attached.contains("kept=0"), "{attached}");
    }
    let log = crate::plain(&leaving.stderr_text());
    assert!(log.contains("runners asked to attach elsewhere"), "{log}");
    assert!(log.contains("moved=2") && log.contains("cut=0"), "{log}");
    for runner in [&balanced, &listed] {
        let runner_log = crate::plain(&runner.stderr_text());
        assert!(
            runner_log.contains("the server ended the stream; attaching again"),
            "{runner_log}"
        );
    }
    // The listed runner went to the next server of its list, not back to the leaving one.
    let listed_log = crate::plain(&listed.stderr_text());
    let moved = listed_log
        .lines()
        .find(|line| line.contains("moving to the next server"))
        .unwrap_or_else(|| panic!("{listed_log}"));
    assert!(moved.contains(&format!("to={}", staying.base_url())), "{moved}");
    assert!(!listed_log.contains("cannot reach the server"), "{listed_log}");
}

/// Waits until the executions together have `count` steps RUNNING (every runner slot busy).
async fn wait_until_steps_run(bench: &Bench, executions: &[String], count: usize) {
    let started = Instant::now();
    loop {
        let mut running = 0;
        for execution_id in executions {
            let execution = bench.execution(execution_id).await;
            running += execution["stepRuns"]
                .as_array()
                .map_or(0, |steps| steps.iter().filter(|step| step["status"] == "RUNNING").count());
        }
        if running >= count {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{running} steps running, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_stopped_with_sigterm_ends_its_watches_and_exits_in_time() {
    let (mut dev, _directory) = start_dev(&["--shutdown-grace-seconds", "5"]);
    let bench = Bench::new(Api::new(&dev), "dev-stop@example.com").await;
    let long = bench.sleeper("long", 60.0).await;
    let workflow = bench.workflow("long", json!([{ "key": "long", "agentId": long }])).await;
    let execution_id = bench.execute(&workflow).await;
    bench.wait_for(&execution_id, Duration::from_secs(30), "running", some_step_running).await;
    let watch = tokio::spawn(read_events(
        format!("{}/api/v1/executions/{execution_id}/events", dev.base_url()),
        bench.token.clone(),
    ));
    let grpc_watch = read_grpc_watch(&bench.api, &bench.auth, &execution_id).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let signalled = Instant::now();
    terminate(dev.pid());
    let took = exited(&mut dev, signalled, Duration::from_secs(7)).await;
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let (events, clean) =
        tokio::time::timeout(Duration::from_secs(2), watch).await.expect("ended").expect("read");
    assert_ended_saying_why(&events, clean);
    assert_grpc_watch_ended_saying_why(grpc_watch).await;
}
