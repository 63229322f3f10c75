//! Throughput of the execution engine, end to end: a real `turbocat dev` (SQLite, in-process
//! queue, its local runner) and optionally a real `turbocat serve` (PostgreSQL, Redis) with one
//! `turbocat runner`, driven over REST. It runs many executions of a one-step DATA workflow and
//! a few of a fan-out (1 → 50 → 1 DATA steps), all started at once, and prints executions/s,
//! steps/s and the p50/p95 end-to-end latency (an execution's `createdAt` to its `finishedAt`,
//! as the server records them); the latency of one execution at a time is measured too.
//!
//! ```text
//! cargo bench --bench engine                 # dev only
//! cargo bench --bench engine -- serve        # dev, then serve (PostgreSQL at 127.0.0.1:5432,
//!                                            # Redis at 127.0.0.1:6379, or the
//!                                            # TURBOCAT_TEST_DATABASE_URL / TURBOCAT_TEST_REDIS_URL)
//! TURBOCAT_BENCH_EXECUTIONS=1000 cargo bench --bench engine
//! ```
//!
//! It is not part of the test suite: run any other way than by `cargo bench`, it prints how to
//! run it and exits.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

/// Executions of the one-step workflow, unless `TURBOCAT_BENCH_EXECUTIONS` says otherwise.
const DEFAULT_EXECUTIONS: usize = 300;
/// Executions of the one-step workflow run one after the other (latency without a backlog).
const SEQUENTIAL_EXECUTIONS: usize = 30;
/// Executions of the fan-out workflow.
const FAN_OUT_EXECUTIONS: usize = 10;
/// Leaves of the fan-out.
const FAN_OUT_WIDTH: usize = 50;
/// Requests to start executions in flight at once.
const SUBMITTERS: usize = 16;
/// Slots of the `serve` runner (the `dev` local runner has 8).
const RUNNER_CAPACITY: &str = "8";

type Failure = Box<dyn std::error::Error + Send + Sync>;
type Outcome<T> = Result<T, Failure>;

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if !arguments.iter().any(|argument| argument == "--bench") {
        println!("the engine benchmark runs only with `cargo bench --bench engine [-- serve]`");
        return;
    }
    let executions = std::env::var("TURBOCAT_BENCH_EXECUTIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(DEFAULT_EXECUTIONS);
    let with_serve = arguments.iter().any(|argument| argument == "serve");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            std::process::exit(1);
        }
    };
    let outcome = runtime.block_on(async move {
        println!("turbocat engine benchmark: {executions} one-step executions, {FAN_OUT_EXECUTIONS} fan-outs of {FAN_OUT_WIDTH}");
        bench_dev(executions).await?;
        if with_serve {
            bench_serve(executions).await?;
        }
        Ok::<(), Failure>(())
    });
    if let Err(error) = outcome {
        eprintln!("the benchmark failed: {error}");
        std::process::exit(1);
    }
}

/// A `turbocat` process, killed when dropped.
struct Process {
    child: Child,
    base_url: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `turbocat <arguments>` and waits for its "listening on" line.
fn start(arguments: &[&str]) -> Outcome<Process> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbocat"))
        .args(arguments)
        .env("TURBOCAT_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = receiver.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        match line {
            Ok(line) => {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let base_url = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    return Ok(Process { child, base_url });
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("turbocat did not start".into());
            }
        }
    }
}

async fn bench_dev(executions: usize) -> Outcome<()> {
    let directory = tempfile::tempdir()?;
    let data_dir = directory.path().to_str().ok_or("data directory path")?.to_owned();
    let server = start(&["dev", "--listen", "127.0.0.1:0", "--data-dir", &data_dir])?;
    let client = Client::new(&server.base_url).await?;
    run_workloads("dev", &client, executions).await
}

async fn bench_serve(executions: usize) -> Outcome<()> {
    let admin_url = std::env::var("TURBOCAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let redis_url = std::env::var("TURBOCAT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let name = format!("turbocat_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    let base = admin_url.rsplit_once('/').map(|(base, _)| base).ok_or("database url")?;
    let database_url = format!("{base}/{name}");
    let prefix = format!("turbocat-bench:{}:", uuid::Uuid::new_v4().simple());
    let outcome = async {
        let server = start(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &database_url,
            "--redis-url",
            &redis_url,
            "--redis-key-prefix",
            &prefix,
            "--rate-limit-key-prefix",
            &prefix,
            "--jwt-secret",
            "benchmark-secret-that-is-long-enough-0123456789",
        ])?;
        let client = Client::new(&server.base_url).await?;
        let key = client.runner_key().await?;
        let runner = Process {
            child: Command::new(env!("CARGO_BIN_EXE_turbocat"))
                .args(["runner", "--server", &server.base_url, "--name", "bench"])
                .args(["--capacity", RUNNER_CAPACITY])
                .env("TURBOCAT_API_KEY", key)
                .env("TURBOCAT_LOG_LEVEL", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
            base_url: String::new(),
        };
        client.wait_for_runner().await?;
        let outcome = run_workloads("serve", &client, executions).await;
        drop(runner);
        drop(server);
        outcome
    }
    .await;
    let drop_statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    let _ = sqlx::query(sqlx::AssertSqlSafe(drop_statement)).execute(&mut admin).await;
    outcome
}

async fn run_workloads(mode: &str, client: &Client, executions: usize) -> Outcome<()> {
    let agent = client.jq_agent(".n + 1 | {n: .}").await?;
    let sum = client.jq_agent("{n: ([.[]] | add)}").await?;
    let single = client.workflow("single", json!([{ "key": "only", "agentId": agent }])).await?;
    let mut steps = vec![json!({ "key": "root", "agentId": agent })];
    let mut gather = serde_json::Map::new();
    for index in 0..FAN_OUT_WIDTH {
        let key = format!("leaf{index}");
        steps.push(json!({ "key": key, "agentId": agent, "dependsOn": ["root"], "inputMapping": "{{steps.root.output}}" }));
        gather.insert(key.clone(), json!(format!("{{{{steps.{key}.output.n}}}}")));
    }
    let leaves: Vec<String> = (0..FAN_OUT_WIDTH).map(|index| format!("leaf{index}")).collect();
    steps.push(
        json!({ "key": "join", "agentId": sum, "dependsOn": leaves, "inputMapping": gather }),
    );
    let fan = client.workflow("fan-out", json!(steps)).await?;

    // Warm up (interpreter-free, but the first requests open connections and prepare queries).
    client.run_all(&single, 10).await?;
    // Latency without a backlog: one execution at a time.
    let mut alone = Figures { executions: 0, wall: Duration::ZERO, latencies_ms: Vec::new() };
    for _ in 0..SEQUENTIAL_EXECUTIONS {
        let one = client.run_all(&single, 1).await?;
        alone.executions += 1;
        alone.wall += one.wall;
        alone.latencies_ms.extend(one.latencies_ms);
    }
    alone.latencies_ms.sort_by(f64::total_cmp);
    alone.print(mode, "1 DATA step, one at a time", 1);
    let figures = client.run_all(&single, executions).await?;
    figures.print(mode, "1 DATA step", 1);
    let figures = client.run_all(&fan, FAN_OUT_EXECUTIONS).await?;
    figures.print(mode, &format!("fan-out 1+{FAN_OUT_WIDTH}+1 DATA steps"), FAN_OUT_WIDTH + 2);
    Ok(())
}

/// What one batch of executions measured.
struct Figures {
    executions: usize,
    /// From the first execution's creation to the last one's end.
    wall: Duration,
    latencies_ms: Vec<f64>,
}

impl Figures {
    fn print(&self, mode: &str, workload: &str, steps_per_execution: usize) {
        let seconds = self.wall.as_secs_f64().max(f64::EPSILON);
        let per_second = self.executions as f64 / seconds;
        let percentile = |fraction: f64| {
            let index = ((self.latencies_ms.len() as f64 - 1.0) * fraction).round() as usize;
            self.latencies_ms.get(index).copied().unwrap_or(f64::NAN)
        };
        println!(
            "{mode:<5} {workload:<30} {:>5} executions in {seconds:>6.2} s: {per_second:>7.1} executions/s, {:>8.1} steps/s, latency p50 {:>7.1} ms, p95 {:>7.1} ms",
            self.executions,
            per_second * steps_per_execution as f64,
            percentile(0.5),
            percentile(0.95),
        );
    }
}

/// REST calls of one benchmark account.
struct Client {
    http: reqwest::Client,
    base_url: String,
    token: String,
}

impl Client {
    async fn new(base_url: &str) -> Outcome<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let mut client = Self { http, base_url: base_url.to_owned(), token: String::new() };
        let body = client
            .call(
                reqwest::Method::POST,
                "/api/v1/auth/register",
                Some(json!({ "email": "bench@example.com", "password": "benchmark-password", "fullName": "Bench" })),
            )
            .await?;
        client.token = body["data"]["accessToken"].as_str().ok_or("no access token")?.to_owned();
        Ok(client)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Outcome<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base_url));
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {body}").into());
        }
        Ok(body)
    }

    async fn runner_key(&self) -> Outcome<String> {
        let body = json!({ "name": "bench runner", "scopes": ["RUNNER"] });
        let created = self.call(reqwest::Method::POST, "/api/v1/api-keys", Some(body)).await?;
        Ok(created["data"]["key"].as_str().ok_or("no key")?.to_owned())
    }

    async fn wait_for_runner(&self) -> Outcome<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let runners = self.call(reqwest::Method::GET, "/api/v1/runners", None).await?;
            if runners["data"].as_array().is_some_and(|runners| !runners.is_empty()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("the runner never attached".into())
    }

    async fn jq_agent(&self, program: &str) -> Outcome<String> {
        let body = json!({ "name": program, "type": "DATA", "config": { "data": { "jqProgram": program } } });
        let created = self.call(reqwest::Method::POST, "/api/v1/agents", Some(body)).await?;
        Ok(created["data"]["id"].as_str().ok_or("no agent id")?.to_owned())
    }

    async fn workflow(&self, name: &str, steps: Value) -> Outcome<String> {
        let body = json!({ "name": name, "steps": steps });
        let created = self.call(reqwest::Method::POST, "/api/v1/workflows", Some(body)).await?;
        Ok(created["data"]["id"].as_str().ok_or("no workflow id")?.to_owned())
    }

    /// Starts `count` executions of `workflow` and waits until all finished; every one must
    /// succeed.
    async fn run_all(&self, workflow: &str, count: usize) -> Outcome<Figures> {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut submitters = Vec::new();
        for _ in 0..SUBMITTERS.min(count) {
            let next = next.clone();
            let path = format!("/api/v1/workflows/{workflow}/execute");
            let (http, base_url, token) =
                (self.http.clone(), self.base_url.clone(), self.token.clone());
            submitters.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    let response = http
                        .post(format!("{base_url}{path}"))
                        .bearer_auth(&token)
                        .json(&json!({ "input": { "n": 1 } }))
                        .send()
                        .await?;
                    let body: Value = response.json().await?;
                    let id = body["data"]["id"].as_str().ok_or_else(|| format!("{body}"))?;
                    ids.push(id.to_owned());
                }
                Ok::<Vec<String>, Failure>(ids)
            }));
        }
        let mut ids = Vec::new();
        for submitter in submitters {
            ids.extend(submitter.await??);
        }
        let mut finished = Vec::new();
        for id in &ids {
            loop {
                let body = self
                    .call(reqwest::Method::GET, &format!("/api/v1/executions/{id}"), None)
                    .await?;
                let status = body["data"]["status"].as_str().unwrap_or_default().to_owned();
                match status.as_str() {
                    "SUCCEEDED" => {
                        finished.push(body["data"].clone());
                        break;
                    }
                    "FAILED" | "CANCELLED" | "TIMED_OUT" => {
                        return Err(format!(
                            "execution {id} ended {status}: {}",
                            body["data"]["error"]
                        )
                        .into());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        let time = |execution: &Value, field: &str| {
            chrono::DateTime::parse_from_rfc3339(execution[field].as_str()?).ok()
        };
        let mut latencies_ms: Vec<f64> = finished
            .iter()
            .filter_map(|execution| {
                let took = time(execution, "finishedAt")? - time(execution, "createdAt")?;
                Some(took.num_microseconds()? as f64 / 1000.0)
            })
            .collect();
        latencies_ms.sort_by(f64::total_cmp);
        // From the first execution created to the last one finished, as the server saw them.
        let first = finished.iter().filter_map(|execution| time(execution, "createdAt")).min();
        let last = finished.iter().filter_map(|execution| time(execution, "finishedAt")).max();
        let span = match (first, last) {
            (Some(first), Some(last)) => (last - first).to_std()?,
            _ => return Err("no timestamps".into()),
        };
        Ok(Figures { executions: count, wall: span, latencies_ms })
    }
}
