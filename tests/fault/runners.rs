//! Runners given several servers (`--server A,B`): the replica a runner is attached to is
//! SIGKILLed while the runner runs a step; the runner moves to the next server, keeps the step
//! (it finishes there and is recorded once) and takes new work there. A `--server` list with a
//! bad URL is refused at start, naming the flag.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::api::{Api, Auth};
use crate::support::{TurbocatProcess, run_turbocat, start_serve, start_serve_replica};
use crate::{
    Bench, RunnerProcess, assert_every_step_ran_once, plain, some_step_running, unique_prefix,
    wait_for_runner,
};

/// Waits until a line of `process`'s log says the runner `name` attached there, and returns
/// that line.
pub async fn wait_for_attach_line(process: &TurbocatProcess, name: &str) -> String {
    let started = Instant::now();
    loop {
        let log = plain(&process.stderr_text());
        let attached = log.lines().find(|line| {
            line.contains("runner attached") && line.contains(&format!("name={name}"))
        });
        if let Some(line) = attached {
            return line.to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{name} never attached here:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id `GET /runners` gives the runner named `name`.
async fn runner_id(api: &Api, auth: &Auth, name: &str) -> String {
    let (status, body) = api.get("/api/v1/runners", auth).await;
    assert_eq!(status, 200, "{body}");
    let runners = body["data"].as_array().expect("runners");
    let runner = runners.iter().find(|runner| runner["name"] == name).expect("listed");
    runner["id"].as_str().expect("runner id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_moves_to_the_next_server_when_its_replica_is_killed_and_keeps_its_step() {
    let prefix = unique_prefix();
    // A short lease: a runner that did not come back with its step within it would lose it
    // (a second attempt), which the test would see.
    let flags = ["--redis-key-prefix", prefix.as_str(), "--runner-lease-seconds", "6"];
    let (mut killed, database) = start_serve(&flags).await;
    let surviving = start_serve_replica(&database, &flags).await;
    let bench = Bench::new(Api::new(&surviving), "killed-replica@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let servers = format!("{},{}", killed.base_url(), surviving.base_url());
    let runner = RunnerProcess::start(&servers, &key, "listed", 2, "", &[]);
    wait_for_runner(&bench.api, &bench.auth, "listed").await;
    // It took the first server of its list.
    wait_for_attach_line(&killed, "listed").await;
    let listed_id = runner_id(&bench.api, &bench.auth, "listed").await;

    let nap = bench.sleeper("nap", 4.0).await;
    let workflow = bench.workflow("nap", json!([{ "key": "nap", "agentId": nap }])).await;
    let first = bench.execute(&workflow).await;
    bench.wait_for(&first, Duration::from_secs(30), "running", some_step_running).await;
    killed.kill();

    // The step runs on, on the same runner, and is reported once through the other replica.
    let execution = bench.finished(&first, Duration::from_secs(45)).await;
    assert_every_step_ran_once(&execution);
    let step = &execution["stepRuns"][0];
    assert_eq!(step["runnerId"], listed_id.as_str(), "{step}");
    assert_eq!(step["output"]["slept"].as_f64(), Some(4.0), "{step}");
    let attached = wait_for_attach_line(&surviving, "listed").await;
    assert!(attached.contains("kept=1"), "it kept its step: {attached}");
    let runner_log = plain(&runner.stderr_text());
    let moved = runner_log
        .lines()
        .find(|line| line.contains("moving to the next server"))
        .unwrap_or_else(|| panic!("{runner_log}"));
    assert!(moved.contains(&format!("to={}", surviving.base_url())), "{moved}");
    assert!(!runner_log.contains("cannot reach the server"), "went straight there: {runner_log}");

    // New work submitted to the surviving replica runs on the runner that moved.
    let second = bench.execute(&workflow).await;
    let execution = bench.finished(&second, Duration::from_secs(45)).await;
    assert_every_step_ran_once(&execution);
    assert_eq!(execution["stepRuns"][0]["runnerId"], listed_id.as_str(), "{execution}");
}

#[test]
fn a_bad_server_list_is_refused_at_start_naming_the_flag() {
    for (servers, culprit) in [
        ("http://ok:1,not a url", "not a url"),
        ("http://ok:1,ftp://files.example.com", "ftp"),
        ("http://ok:1,,http://ok:2", "empty"),
    ] {
        let started = Instant::now();
        let (success, _, stderr) = run_turbocat(
            &["runner", "--server", servers, "--name", "bad"],
            &[("TURBOCAT_API_KEY", "tc_whatever")],
        );
        assert!(!success, "{servers}: {stderr}");
        assert!(stderr.contains("invalid --server (TURBOCAT_SERVER)"), "{servers}: {stderr}");
        assert!(stderr.contains(culprit), "{servers}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "refused at once: {servers}");
    }
    // The variable is read the same way.
    let (success, _, stderr) = run_turbocat(
        &["runner", "--name", "bad"],
        &[("TURBOCAT_API_KEY", "tc_whatever"), ("TURBOCAT_SERVER", "http://ok:1, not a url")],
    );
    assert!(!success, "{stderr}");
    assert!(stderr.contains("--server") && stderr.contains("not a url"), "{stderr}");
}
