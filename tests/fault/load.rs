//! Full size: two `serve` replicas on one PostgreSQL (reached through a TCP proxy the test can
//! cut) and one private `redis-server`, four runners split between them, and 200 executions of
//! a 10-step fan-out/fan-in workflow (1 + 8 + 1) submitted round-robin to the two replicas. All
//! of them succeed and every step's result is recorded exactly once: undisturbed; while one
//! replica is SIGKILLed mid-run and started again; while a runner is SIGKILLed holding steps
//! (frozen first, so it surely holds some); while Redis is
//! flushed and restarted; while PostgreSQL is unreachable for five seconds (503s while it is
//! away, then everything completes with nobody's help).

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::proxy::{TcpProxy, postgres_address, through};
use crate::support::api::{Api, Auth, assert_error};
use crate::support::{
    RedisServer, ServeDatabase, TurbocatProcess, create_postgres_database, free_port,
    start_serve_replica,
};
use crate::{Bench, RunnerProcess, unique_prefix};

const EXECUTIONS: usize = 200;
/// Long enough for 2,000 steps on a busy 2-core machine, with a disruption on the way.
const FINISH_LIMIT: Duration = Duration::from_secs(300);

/// What happens to the installation while the executions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disruption {
    None,
    KillReplica,
    KillRunner,
    FlushRedis,
    CutDatabase,
}

/// Two replicas, their database proxy, their Redis and four runners.
struct Installation {
    replicas: [TurbocatProcess; 2],
    database: ServeDatabase,
    database_proxy: TcpProxy,
    redis: RedisServer,
    flags: Vec<String>,
    runners: Vec<RunnerProcess>,
}

impl Installation {
    async fn start() -> Self {
        let redis = RedisServer::start(free_port()).await;
        let (url, name) = create_postgres_database().await;
        let database_proxy = TcpProxy::start(vec![postgres_address(&url)]).await;
        let database = ServeDatabase::new(through(&url, &database_proxy), name);
        let flags: Vec<String> = [
            "--redis-url",
            &redis.url(),
            "--redis-key-prefix",
            &unique_prefix(),
            "--database-acquire-timeout-seconds",
            "1",
            "--redis-timeout-seconds",
            "1",
            // A killed runner's steps run elsewhere within seconds.
            "--runner-lease-seconds",
            "4",
        ]
        .iter()
        .map(|flag| flag.to_string())
        .collect();
        let first = Self::replica(&database, &flags, None).await;
        let second = Self::replica(&database, &flags, None).await;
        Self {
            replicas: [first, second],
            database,
            database_proxy,
            redis,
            flags,
            runners: Vec::new(),
        }
    }

    async fn replica(
        database: &ServeDatabase,
        flags: &[String],
        address: Option<std::net::SocketAddr>,
    ) -> TurbocatProcess {
        let mut extra: Vec<String> = flags.to_vec();
        if let Some(address) = address {
            extra.extend(["--listen".to_owned(), address.to_string()]);
        }
        let borrowed: Vec<&str> = extra.iter().map(String::as_str).collect();
        start_serve_replica(database, &borrowed).await
    }

    /// SIGKILLs replica `index` and starts it again on the same address.
    async fn kill_and_restart_replica(&mut self, index: usize) {
        let address = self.replicas[index].address;
        self.replicas[index].kill();
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.replicas[index] = Self::replica(&self.database, &self.flags, Some(address)).await;
    }
}

/// Every execution succeeded, and each of its steps has exactly one recorded result: one
/// SUCCEEDED attempt, any others lost with their runner or replica (never a user retry).
fn assert_each_result_recorded_once(execution: &Value) {
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let steps = execution["stepRuns"].as_array().expect("step runs");
    assert_eq!(steps.len(), 10, "{execution}");
    for step in steps {
        assert_eq!(step["status"], "SUCCEEDED", "{step}");
        let attempts = step["attempts"].as_array().expect("attempts");
        let succeeded = attempts.iter().filter(|attempt| attempt["status"] == "SUCCEEDED").count();
        assert_eq!(succeeded, 1, "one recorded result: {step}");
        assert!(
            attempts.iter().all(|attempt| ["SUCCEEDED", "LEASE_LOST"]
                .contains(&attempt["status"].as_str().unwrap_or_default())),
            "{step}"
        );
        assert_eq!(
            step["attempt"].as_i64(),
            step["infraReassignments"].as_i64().map(|lost| lost + 1),
            "no user retry: {step}"
        );
    }
}

/// How many executions of the account have succeeded (0 while the database is away or the
/// replica is restarting).
async fn succeeded(api: &Api, auth: &Auth) -> usize {
    with_status(api, auth, "SUCCEEDED").await
}

/// How many executions of the account have `status` (0 when the replica cannot say).
async fn with_status(api: &Api, auth: &Auth, status: &str) -> usize {
    let path = format!("/api/v1/executions?status={status}&pageSize=1");
    match api.try_call(Method::GET, &path, auth, None).await {
        Some((200, body, _)) => body["meta"]["pagination"]["total"].as_u64().unwrap_or(0) as usize,
        _ => 0,
    }
}

/// Freezes runner `index` (SIGSTOP) until the replica it is attached to has handed it a step
/// it cannot finish, then SIGKILLs it: it dies holding work.
async fn kill_runner_holding_steps(installation: &mut Installation, apis: &[Api; 2], auth: &Auth) {
    let index = 1;
    let pid = installation.runners[index].child.id().to_string();
    let stopped = std::process::Command::new("kill").args(["-STOP", &pid]).status();
    assert!(stopped.expect("kill -STOP").success());
    let name = format!("load-{index}");
    let started = Instant::now();
    loop {
        let (status, body) = apis[index % 2].get("/api/v1/runners", auth).await;
        assert_eq!(status, 200, "{body}");
        let load = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|runner| runner["name"] == name.as_str())
            .and_then(|runner| runner["load"].as_i64())
            .unwrap_or(0);
        if load > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{name} was handed nothing: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    installation.runners[index].kill();
}

async fn run(disruption: Disruption) {
    let mut installation = Installation::start().await;
    let apis = [Api::new(&installation.replicas[0]), Api::new(&installation.replicas[1])];
    let email = format!("load-{disruption:?}@example.com").to_lowercase();
    let bench = Bench::new(apis[0].clone(), &email).await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    for index in 0..4 {
        let replica = &installation.replicas[index % 2];
        let name = format!("load-{index}");
        installation.runners.push(RunnerProcess::start(
            &replica.base_url(),
            &key,
            &name,
            25,
            "",
            &[],
        ));
        crate::wait_for_runner(&apis[index % 2], &bench.auth, &name).await;
    }

    let split = bench.jq("split", "{ n: 8 }").await;
    let branch = bench.jq("branch", "{ branch: true }").await;
    let join = bench.jq("join", "{ joined: true }").await;
    let mut steps = vec![json!({ "key": "split", "agentId": split })];
    let branches: Vec<String> = (0..8).map(|index| format!("b{index}")).collect();
    for key in &branches {
        steps.push(json!({ "key": key, "agentId": branch, "dependsOn": ["split"] }));
    }
    steps.push(json!({ "key": "join", "agentId": join, "dependsOn": branches }));
    let workflow = bench.workflow("fan", json!(steps)).await;

    let mut executions = Vec::with_capacity(EXECUTIONS);
    for index in 0..EXECUTIONS {
        let api = &apis[index % 2];
        let (status, body) = api
            .post(&format!("/api/v1/workflows/{workflow}/execute"), &bench.auth, json!({}))
            .await;
        assert_eq!(status, 202, "execute: {body}");
        executions.push(body["data"]["id"].as_str().expect("execution id").to_owned());
    }

    // Disturb once the run is under way (a tenth done).
    let started = Instant::now();
    while succeeded(&apis[1], &bench.auth).await < EXECUTIONS / 10 {
        assert!(started.elapsed() < FINISH_LIMIT, "the run never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    match disruption {
        Disruption::None => {}
        Disruption::KillReplica => installation.kill_and_restart_replica(0).await,
        Disruption::KillRunner => {
            kill_runner_holding_steps(&mut installation, &apis, &bench.auth).await;
        }
        Disruption::FlushRedis => {
            installation.redis.flush_all().await;
            installation.redis.restart().await;
        }
        Disruption::CutDatabase => {
            installation.database_proxy.cut().await;
            let cut_at = Instant::now();
            let (status, body) = apis[0].get("/api/v1/workflows", &bench.auth).await;
            assert_error(status, &body, 503, "SERVICE_UNAVAILABLE");
            let (status, body) = apis[1]
                .post(&format!("/api/v1/workflows/{workflow}/execute"), &bench.auth, json!({}))
                .await;
            assert_error(status, &body, 503, "SERVICE_UNAVAILABLE");
            tokio::time::sleep(Duration::from_secs(5).saturating_sub(cut_at.elapsed())).await;
            installation.database_proxy.restore();
        }
    }

    // Everything completes with nobody's help.
    while succeeded(&apis[0], &bench.auth).await < EXECUTIONS {
        assert!(
            started.elapsed() < FINISH_LIMIT,
            "{disruption:?}: {} of {EXECUTIONS} succeeded after {FINISH_LIMIT:?}",
            succeeded(&apis[0], &bench.auth).await
        );
        for status in ["FAILED", "TIMED_OUT", "CANCELLED"] {
            assert_eq!(
                with_status(&apis[0], &bench.auth, status).await,
                0,
                "{disruption:?}: {status}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut taken_back = 0;
    for (index, execution_id) in executions.iter().enumerate() {
        let (status, body) =
            apis[index % 2].get(&format!("/api/v1/executions/{execution_id}"), &bench.auth).await;
        assert_eq!(status, 200, "{body}");
        assert_each_result_recorded_once(&body["data"]);
        let steps = body["data"]["stepRuns"].as_array().cloned().unwrap_or_default();
        taken_back += steps.iter().filter(|step| step["infraReassignments"] != 0).count();
    }
    // Steps taken back from a lost runner (the killed one, if it still held its steps when it
    // died: an assignment it was handed while frozen may also be taken back before that).
    println!("{disruption:?}: {taken_back} steps ran again after losing their runner");
    let (status, body) = apis[0].get("/api/v1/executions?pageSize=1", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["meta"]["pagination"]["total"], json!(EXECUTIONS), "nothing extra: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_fan_outs_on_two_replicas_and_four_runners_each_step_recorded_once() {
    run(Disruption::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_while_a_replica_is_killed_and_restarted() {
    run(Disruption::KillReplica).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_while_a_runner_is_killed() {
    run(Disruption::KillRunner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_while_redis_is_flushed_and_restarted() {
    run(Disruption::FlushRedis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_while_postgres_is_unreachable_for_five_seconds() {
    run(Disruption::CutDatabase).await;
}

/// Steady load with random kills for `TURBOCAT_SOAK_SECONDS` (20 in the suite; run it for ten
/// minutes on demand: `TURBOCAT_SOAK_SECONDS=600 cargo test --test fault soak -- --nocapture`):
/// an execution submitted every 100 ms to either replica, and every few seconds one of: a
/// replica SIGKILLed and started again, a runner SIGKILLed and replaced, Redis flushed and
/// restarted. Then it drains and prints executions completed, lost (must be 0) and completed
/// twice (a step with two recorded results; must be 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_under_steady_load_with_random_kills() {
    let seconds: u64 = std::env::var("TURBOCAT_SOAK_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20);
    let mut installation = Installation::start().await;
    let apis = [Api::new(&installation.replicas[0]), Api::new(&installation.replicas[1])];
    let bench = Bench::new(apis[0].clone(), "soak@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    for index in 0..4 {
        let name = format!("soak-{index}");
        let url = installation.replicas[index % 2].base_url();
        installation.runners.push(RunnerProcess::start(&url, &key, &name, 25, "", &[]));
        crate::wait_for_runner(&apis[index % 2], &bench.auth, &name).await;
    }
    let first = bench.jq("first", "{ a: 1 }").await;
    let second = bench.jq("second", "{ b: 2 }").await;
    let workflow = bench
        .workflow(
            "soak",
            json!([
                { "key": "first", "agentId": first },
                { "key": "second", "agentId": second, "dependsOn": ["first"] }
            ]),
        )
        .await;

    // The load: accepted ids; a call the replica could not answer (killed, or the database
    // away) is not counted, and the final listing shows whether it created anything.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = tokio::spawn({
        let (apis, auth, stop) = (apis.clone(), bench.auth.clone(), stop.clone());
        async move {
            let mut accepted = Vec::new();
            let mut index = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let path = format!("/api/v1/workflows/{workflow}/execute");
                let answer =
                    apis[index % 2].try_call(Method::POST, &path, &auth, Some(json!({}))).await;
                if let Some((202, body, _)) = answer {
                    accepted.push(body["data"]["id"].as_str().unwrap_or_default().to_owned());
                }
                index += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            accepted
        }
    });

    let mut random = seed();
    println!("soak: {seconds} s, seed {random}");
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(2_000 + next(&mut random) % 3_000)).await;
        match next(&mut random) % 3 {
            0 => {
                let index = usize::try_from(next(&mut random) % 2).unwrap_or(0);
                println!("soak: killing replica {index}");
                installation.kill_and_restart_replica(index).await;
            }
            1 => {
                let index = usize::try_from(next(&mut random) % 4).unwrap_or(0);
                println!("soak: killing runner {index}");
                installation.runners[index].kill();
                let url = installation.replicas[index % 2].base_url();
                let name = format!("soak-{index}");
                installation.runners[index] = RunnerProcess::start(&url, &key, &name, 25, "", &[]);
            }
            _ => {
                println!("soak: flushing and restarting Redis");
                installation.redis.flush_all().await;
                installation.redis.restart().await;
            }
        }
        kills += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let accepted = load.await.expect("the load");

    // Drain, then count.
    let (status, body) = apis[0].get("/api/v1/executions?pageSize=1", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    let created = body["meta"]["pagination"]["total"].as_u64().unwrap_or(0) as usize;
    let drained = Instant::now();
    while succeeded(&apis[0], &bench.auth).await < created && drained.elapsed() < FINISH_LIMIT {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut completed = 0;
    let mut lost = Vec::new();
    let mut twice = Vec::new();
    for execution_id in &accepted {
        let (status, body) =
            apis[0].get(&format!("/api/v1/executions/{execution_id}"), &bench.auth).await;
        assert_eq!(status, 200, "{body}");
        let execution = &body["data"];
        if execution["status"] != "SUCCEEDED" {
            lost.push(execution_id.clone());
            continue;
        }
        completed += 1;
        let recorded_twice = execution["stepRuns"].as_array().into_iter().flatten().any(|step| {
            let attempts = step["attempts"].as_array().map(Vec::as_slice).unwrap_or_default();
            attempts.iter().filter(|attempt| attempt["status"] == "SUCCEEDED").count() != 1
        });
        if recorded_twice {
            twice.push(execution_id.clone());
        }
    }
    println!(
        "soak: {seconds} s, {kills} disruptions, {} accepted ({created} created), \
         {completed} completed, {} lost, {} completed twice",
        accepted.len(),
        lost.len(),
        twice.len()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(twice.is_empty(), "completed twice: {twice:?}");
    assert!(completed >= 10 && created >= accepted.len(), "{completed} {created}");
    assert_eq!(succeeded(&apis[0], &bench.auth).await, created, "every execution created ran");
}

/// A seed for the soak's choices, printed so a run can be told apart.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(1);
    u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(1) | 1
}

/// xorshift64: enough randomness to pick what to kill.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
