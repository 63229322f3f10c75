//! Scenario 4: the API under load. Three operations — GET an agent by id, a filtered list page
//! with its total (`type=DATA`, 20 per page), and a create — over REST and over gRPC, at 64 and
//! 256 connections, on an account holding many agents. REST load comes from wrk (closed loop,
//! one request in flight per connection); gRPC load from a tonic client loop in this process
//! (one channel, i.e. one HTTP/2 connection, per "connection", one call in flight on each).
//! Then GET by id at a constant rate (open loop, latency counted from each request's scheduled
//! time, so a stall is not hidden), over both transports, generated in this process.
//! May call: the installation, wrk, pgbench (the floor's runner of it) on the run's database, the
//! server's gRPC services, the report.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::agent_service_client::AgentServiceClient;

use crate::installation::Installation;
use crate::processes::on_path;
use crate::report::{Column, Entry, Report, Round, cost_columns, percentile, print_table};
use crate::{Mode, Outcome, Scenario, Sizes};

/// Agents a GET picks from (round robin).
const GET_TARGETS: usize = 1000;
/// Channels the constant-rate gRPC generator spreads its calls over.
const CONSTANT_RATE_CHANNELS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    GetById,
    ListPage,
    Create,
}

impl Operation {
    const ALL: [Operation; 3] = [Operation::GetById, Operation::ListPage, Operation::Create];

    fn name(self) -> &'static str {
        match self {
            Operation::GetById => "GET by id",
            Operation::ListPage => "list page + total",
            Operation::Create => "create",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Rest,
    Grpc,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Rest => "REST (wrk)",
            Transport::Grpc => "gRPC (tonic loop)",
        }
    }
}

/// What one load run measured.
#[derive(Debug, Default)]
struct Load {
    requests: u64,
    errors: u64,
    seconds: f64,
    /// Milliseconds, sorted (wrk reports percentiles only: then these are empty).
    latencies_ms: Vec<f64>,
    p50_ms: f64,
    p99_ms: f64,
}

impl Load {
    /// The round this run makes: rate, p50, p99, errors and the costs per request; errors are
    /// also reported as failures of the run.
    fn round(
        &self,
        costs: &crate::measure::Costs,
        failures: &mut Vec<String>,
        mode: Mode,
        variant: &str,
    ) -> Round {
        let mut round = Round::default();
        round.set(
            "requests_per_second",
            "req/s",
            self.requests as f64 / self.seconds.max(f64::EPSILON),
        );
        round.set("latency_ms_p50", "ms", self.p50_ms);
        round.set("latency_ms_p99", "ms", self.p99_ms);
        round.set("errors", "", self.errors as f64);
        costs.record_per(self.requests as f64, "request", &mut round);
        if self.errors > 0 {
            failures.push(format!("{} api {variant}: {} errors", mode.name(), self.errors));
        }
        round
    }

    fn from_latencies(mut latencies_ms: Vec<f64>, errors: u64, seconds: f64) -> Self {
        latencies_ms.sort_by(f64::total_cmp);
        Self {
            requests: latencies_ms.len() as u64,
            errors,
            seconds,
            p50_ms: percentile(&latencies_ms, 0.5),
            p99_ms: percentile(&latencies_ms, 0.99),
            latencies_ms,
        }
    }
}

/// Everything a load needs to address the server.
#[derive(Clone)]
struct Target {
    base_url: String,
    token: String,
    agent_ids: Arc<Vec<String>>,
}

pub async fn run(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let agent_ids = seed(installation, sizes.api_seed_agents).await?;
    // Without statistics of the 10,000 new rows the planner sorts every DATA agent for a page
    // (4 ms) instead of reading 40 in index order (0.1 ms).
    installation.database.analyze().await?;
    let target = Target {
        base_url: installation.client.base_url.clone(),
        token: installation.client.token.clone(),
        agent_ids: Arc::new(agent_ids.into_iter().take(GET_TARGETS).collect()),
    };
    let has_wrk = on_path("wrk");
    if !has_wrk {
        report.notes.push(
            "wrk is not installed (`apt-get install -y wrk`): the REST load runs were skipped"
                .to_owned(),
        );
    }
    let scripts = tempfile::tempdir()?;
    for operation in Operation::ALL {
        for transport in [Transport::Rest, Transport::Grpc] {
            if transport == Transport::Rest && !has_wrk {
                continue;
            }
            for connections in &sizes.api_connections {
                let variant = format!(
                    "{}, {}, {connections} connections",
                    operation.name(),
                    transport.name()
                );
                let mut entry = Entry::new(Some(installation.mode), Scenario::Api, &variant);
                // Warm up (connections, caches, prepared statements) before the first count.
                if Some(connections) == sizes.api_connections.first() {
                    let warm_up = Duration::from_secs(1);
                    run_load(&target, operation, transport, *connections, warm_up, scripts.path())
                        .await?;
                }
                for _ in 0..sizes.api_rounds {
                    let duration = Duration::from_secs(sizes.api_round_seconds);
                    let window = installation.probe.begin().await?;
                    let load = run_load(
                        &target,
                        operation,
                        transport,
                        *connections,
                        duration,
                        scripts.path(),
                    )
                    .await?;
                    let costs = installation.probe.end(window).await?;
                    let round =
                        load.round(&costs, &mut report.failures, installation.mode, &variant);
                    entry.add_round(round);
                }
                report.add(entry);
            }
        }
    }
    for transport in [Transport::Rest, Transport::Grpc] {
        let variant = format!(
            "GET by id at {} req/s, {}",
            sizes.constant_rate,
            match transport {
                Transport::Rest => "REST (reqwest, open loop)",
                Transport::Grpc => "gRPC (tonic, open loop)",
            }
        );
        let mut entry = Entry::new(Some(installation.mode), Scenario::Api, &variant);
        let duration = Duration::from_secs_f64(sizes.constant_rate_seconds);
        let generator = RateGenerator::new(&target, transport).await?;
        generator.run(&target, sizes.constant_rate, Duration::from_secs(1)).await;
        let window = installation.probe.begin().await?;
        let load = generator.run(&target, sizes.constant_rate, duration).await;
        let costs = installation.probe.end(window).await?;
        let mut round = load.round(&costs, &mut report.failures, installation.mode, &variant);
        round.set("latency_ms_p999", "ms", percentile(&load.latencies_ms, 0.999));
        round.set("latency_ms_max", "ms", load.latencies_ms.last().copied().unwrap_or(f64::NAN));
        entry.add_round(round);
        report.add(entry);
    }
    // Last, so that what pgbench leaves behind (dirty pages, autovacuum) does not weigh on the
    // API's runs.
    if let Some(database) = installation.postgres_database() {
        if on_path("pgbench") {
            same_sql_in_pgbench(database, &target, sizes, report).await?;
        } else {
            report
                .notes
                .push("pgbench is not installed: the API's SQL was not run in pgbench".to_owned());
        }
    }
    Ok(())
}

/// The columns the server reads for an agent (`agent_columns!` in the store).
const AGENT_COLUMNS: &str = "id, owner_id, name, description, agent_type, config, \
     timeout_seconds, memory_mb, cpu_seconds, max_output_bytes, status, tags, version, \
     created_at, updated_at, deleted_at";

/// pgbench clients for the same SQL: the load's connections, but no more than PostgreSQL's
/// default `max_connections` (100) leaves room for beside the server's pool.
const PGBENCH_CLIENTS: u32 = 64;

/// The SQL the server runs for GET by id and for a list page, run by pgbench (prepared
/// statements, as sqlx runs them) on the same database, `PGBENCH_CLIENTS` clients: what
/// PostgreSQL alone does with it, the figure the API's rate is held against. The GET picks its
/// agent from the same 1,000 (through a 1,000-row table of their ids: one more index lookup
/// than the server's statement). The list page is shown twice: its page query alone (what the
/// server runs per request while the total is kept) and with the `COUNT(*)` a total costs when
/// it is counted.
async fn same_sql_in_pgbench(
    database: &crate::processes::ScratchDatabase,
    target: &Target,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(&database.url).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_get_targets (n integer PRIMARY KEY, id uuid NOT NULL)",
    )
    .execute(&mut connection)
    .await?;
    for (n, id) in target.agent_ids.iter().enumerate() {
        sqlx::query(
            "INSERT INTO bench_get_targets (n, id) VALUES ($1, $2::uuid) ON CONFLICT DO NOTHING",
        )
        .bind(i32::try_from(n)?)
        .bind(id)
        .execute(&mut connection)
        .await?;
    }
    sqlx::query("VACUUM ANALYZE bench_get_targets").execute(&mut connection).await?;
    drop(connection);
    let page = format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE deleted_at IS NULL AND agent_type = 'DATA' \
         ORDER BY updated_at DESC, id DESC LIMIT 20 OFFSET 0;\n"
    );
    let count = "SELECT COUNT(*) FROM agents WHERE deleted_at IS NULL AND agent_type = 'DATA';\n";
    let scripts = [
        (
            "GET by id",
            format!(
                "\\set n random(0, {})\nSELECT a.{} FROM bench_get_targets t JOIN agents a ON a.id = t.id \
                 WHERE t.n = :n AND a.deleted_at IS NULL;\n",
                target.agent_ids.len().saturating_sub(1),
                AGENT_COLUMNS.replace(", ", ", a.")
            ),
        ),
        ("list page, page query alone", page.clone()),
        ("list page + total, COUNT(*) and page query", format!("{count}{page}")),
    ];
    let directory = tempfile::tempdir()?;
    for (name, sql) in scripts {
        let script = directory.path().join("same.sql");
        std::fs::write(&script, sql)?;
        let variant = format!("pgbench, SQL of {name}, {PGBENCH_CLIENTS} clients");
        let mut entry = Entry::new(Some(Mode::Serve), Scenario::Api, &variant);
        let prepared = ["-M", "prepared"];
        crate::floor::pgbench(database, &script, PGBENCH_CLIENTS, 1, &prepared).await?;
        for _ in 0..sizes.api_rounds {
            let seconds = u32::try_from(sizes.api_round_seconds)?.max(1);
            let result =
                crate::floor::pgbench(database, &script, PGBENCH_CLIENTS, seconds, &prepared)
                    .await?;
            let mut round = Round::default();
            round.set("requests_per_second", "req/s", result.transactions_per_second);
            round.set("latency_ms_average", "ms", result.latency_ms_average);
            entry.add_round(round);
        }
        report.add(entry);
    }
    Ok(())
}

/// Creates `count` agents (every other one DATA, the rest API) and returns their ids.
async fn seed(installation: &Installation, count: usize) -> Outcome<Vec<String>> {
    let next = Arc::new(AtomicU64::new(0));
    let mut creators = Vec::new();
    for _ in 0..32 {
        let (client, next, stub_config) =
            (installation.client.clone(), next.clone(), installation.stub.agent_config());
        creators.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count as u64 {
                    return Ok::<Vec<String>, crate::Failure>(ids);
                }
                let body = if index % 2 == 0 {
                    json!({ "name": format!("seed {index}"), "type": "DATA", "tags": ["seed"], "config": { "data": { "jqProgram": "." } } })
                } else {
                    json!({ "name": format!("seed {index}"), "type": "API", "tags": ["seed"], "config": stub_config })
                };
                ids.push(client.create_agent(body).await?);
            }
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for creator in creators {
        ids.extend(creator.await??);
    }
    Ok(ids)
}

async fn run_load(
    target: &Target,
    operation: Operation,
    transport: Transport,
    connections: usize,
    duration: Duration,
    scripts: &std::path::Path,
) -> Outcome<Load> {
    match transport {
        Transport::Rest => wrk(target, operation, connections, duration, scripts).await,
        Transport::Grpc => grpc_closed_loop(target, operation, connections, duration).await,
    }
}

/// One wrk run: two threads (the machine's cores), `connections` connections.
async fn wrk(
    target: &Target,
    operation: Operation,
    connections: usize,
    duration: Duration,
    scripts: &std::path::Path,
) -> Outcome<Load> {
    let script_path = scripts.join("load.lua");
    let mut script = format!("wrk.headers[\"Authorization\"] = \"Bearer {}\"\n", target.token);
    let url = match operation {
        Operation::GetById => {
            let paths: Vec<String> =
                target.agent_ids.iter().map(|id| format!("\"/api/v1/agents/{id}\"")).collect();
            script.push_str(&format!(
                "local paths = {{{}}}\nlocal counter = 0\nrequest = function()\n  counter = counter + 1\n  return wrk.format(\"GET\", paths[(counter % #paths) + 1])\nend\n",
                paths.join(",")
            ));
            format!("{}/api/v1/agents", target.base_url)
        }
        Operation::ListPage => format!("{}/api/v1/agents?type=DATA&pageSize=20", target.base_url),
        Operation::Create => {
            script.push_str(
                "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n",
            );
            script.push_str("wrk.body = '{\"name\": \"load\", \"type\": \"DATA\", \"config\": {\"data\": {\"jqProgram\": \".\"}}}'\n");
            format!("{}/api/v1/agents", target.base_url)
        }
    };
    std::fs::write(&script_path, script)?;
    let seconds = duration.as_secs().max(1);
    let output = tokio::process::Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--latency",
            "--timeout",
            "10s",
        ])
        .arg("-s")
        .arg(&script_path)
        .arg(&url)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr)).into());
    }
    parse_wrk(&text)
}

/// Reads wrk's summary: requests, duration, latency percentiles, non-2xx and socket errors.
fn parse_wrk(text: &str) -> Outcome<Load> {
    let mut load = Load::default();
    let mut in_distribution = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            match line.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["50%", value] => load.p50_ms = wrk_duration_ms(value).unwrap_or(f64::NAN),
                ["99%", value] => load.p99_ms = wrk_duration_ms(value).unwrap_or(f64::NAN),
                [percent, _] if percent.ends_with('%') => {}
                _ => in_distribution = false,
            }
        }
        if let Some((requests, rest)) = line.split_once(" requests in ") {
            load.requests = requests.trim().parse()?;
            let elapsed = rest.split(',').next().unwrap_or_default();
            load.seconds = wrk_duration_ms(elapsed).ok_or("wrk: no duration")? / 1000.0;
        }
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            load.errors += count.trim().parse::<u64>()?;
        }
        if let Some(errors) = line.strip_prefix("Socket errors:") {
            for part in errors.split(',') {
                load.errors += part
                    .split_whitespace()
                    .last()
                    .and_then(|value| value.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    if load.seconds <= 0.0 {
        return Err(format!("cannot read wrk's output: {text}").into());
    }
    Ok(load)
}

/// A wrk duration (`850.00us`, `4.90ms`, `1.20s`, `2.00m`) in milliseconds.
fn wrk_duration_ms(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text.find(|character: char| character.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    match unit {
        "us" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        "m" => Some(value * 60_000.0),
        "h" => Some(value * 3_600_000.0),
        _ => None,
    }
}

async fn connect(base_url: &str) -> Outcome<AgentServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(base_url.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(AgentServiceClient::new(channel))
}

/// One gRPC call of `operation`; whether it succeeded.
async fn grpc_call(
    client: &mut AgentServiceClient<Channel>,
    target: &Target,
    operation: Operation,
    index: usize,
) -> bool {
    let authorization: MetadataValue<_> = match format!("Bearer {}", target.token).parse() {
        Ok(value) => value,
        Err(_) => return false,
    };
    fn with_auth<T>(
        message: T,
        authorization: &MetadataValue<tonic::metadata::Ascii>,
    ) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", authorization.clone());
        request
    }
    match operation {
        Operation::GetById => {
            let agent_id = target.agent_ids[index % target.agent_ids.len()].clone();
            client
                .get_agent(with_auth(pb::GetAgentRequest { agent_id }, &authorization))
                .await
                .is_ok()
        }
        Operation::ListPage => {
            let request = pb::ListAgentsRequest {
                page_size: Some(20),
                r#type: pb::AgentType::Data as i32,
                ..Default::default()
            };
            client.list_agents(with_auth(request, &authorization)).await.is_ok()
        }
        Operation::Create => {
            let agent = pb::Agent {
                name: "load".to_owned(),
                r#type: pb::AgentType::Data as i32,
                config: Some(pb::AgentConfig {
                    kind: Some(pb::agent_config::Kind::Data(pb::DataAgentConfig {
                        jq_program: ".".to_owned(),
                    })),
                }),
                ..Default::default()
            };
            client
                .create_agent(with_auth(
                    pb::CreateAgentRequest { agent: Some(agent) },
                    &authorization,
                ))
                .await
                .is_ok()
        }
    }
}

/// `connections` HTTP/2 connections, each with one call in flight, for `duration`.
async fn grpc_closed_loop(
    target: &Target,
    operation: Operation,
    connections: usize,
    duration: Duration,
) -> Outcome<Load> {
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(connect(&target.base_url).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(connections);
    for (offset, mut client) in clients.into_iter().enumerate() {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let (mut latencies_ms, mut errors) = (Vec::new(), 0u64);
            let mut index = offset * 7919;
            while Instant::now() < deadline {
                let sent = Instant::now();
                if grpc_call(&mut client, &target, operation, index).await {
                    latencies_ms.push(sent.elapsed().as_secs_f64() * 1000.0);
                } else {
                    errors += 1;
                }
                index += 1;
            }
            (latencies_ms, errors)
        }));
    }
    let (mut latencies_ms, mut errors) = (Vec::new(), 0u64);
    for task in tasks {
        let (task_latencies, task_errors) = task.await?;
        latencies_ms.extend(task_latencies);
        errors += task_errors;
    }
    Ok(Load::from_latencies(latencies_ms, errors, started.elapsed().as_secs_f64()))
}

/// Sends `rate` requests a second for `duration`, each at its scheduled time whatever the
/// server's answers; a request's latency counts from when it was due.
async fn open_loop<Call, Answer>(rate: f64, duration: Duration, call: Call) -> Load
where
    Call: Fn(usize) -> Answer,
    Answer: Future<Output = bool> + Send + 'static,
{
    let total = (rate * duration.as_secs_f64()) as usize;
    let started = Instant::now() + Duration::from_millis(20);
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..total {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (answer, errors) = (call(index), errors.clone());
        tasks.spawn(async move {
            if answer.await {
                Some(due.elapsed().as_secs_f64() * 1000.0)
            } else {
                errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        });
    }
    let mut latencies_ms = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(latency)) => latencies_ms.push(latency),
            Ok(None) => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Load::from_latencies(
        latencies_ms,
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

/// The client side of a constant-rate run, kept between its warm-up and its measured run so
/// that the measured run starts with open connections.
enum RateGenerator {
    Rest(reqwest::Client),
    Grpc(Vec<AgentServiceClient<Channel>>),
}

impl RateGenerator {
    async fn new(target: &Target, transport: Transport) -> Outcome<Self> {
        match transport {
            Transport::Rest => Ok(Self::Rest(
                reqwest::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .tcp_nodelay(true)
                    .build()?,
            )),
            Transport::Grpc => {
                let mut clients = Vec::with_capacity(CONSTANT_RATE_CHANNELS);
                for _ in 0..CONSTANT_RATE_CHANNELS {
                    clients.push(connect(&target.base_url).await?);
                }
                Ok(Self::Grpc(clients))
            }
        }
    }

    /// GET by id at `rate` requests a second for `duration`.
    async fn run(&self, target: &Target, rate: f64, duration: Duration) -> Load {
        let target = target.clone();
        match self {
            Self::Rest(http) => {
                let http = http.clone();
                open_loop(rate, duration, move |index| {
                    let agent_id = &target.agent_ids[index % target.agent_ids.len()];
                    let url = format!("{}/api/v1/agents/{agent_id}", target.base_url);
                    let request = http.get(url).bearer_auth(&target.token);
                    async move {
                        match request.send().await {
                            Ok(response) => {
                                response.status().is_success() && response.bytes().await.is_ok()
                            }
                            Err(_) => false,
                        }
                    }
                })
                .await
            }
            Self::Grpc(clients) => {
                let clients = clients.clone();
                open_loop(rate, duration, move |index| {
                    let mut client = clients[index % clients.len()].clone();
                    let target = target.clone();
                    async move { grpc_call(&mut client, &target, Operation::GetById, index).await }
                })
                .await
            }
        }
    }
}

pub fn print(report: &Report, mode: Mode) {
    let entries = report.entries_of(Some(mode), Scenario::Api);
    let columns = vec![
        Column::new("requests_per_second", "req/s"),
        Column::new("latency_ms_p50", "p50 ms"),
        Column::new("latency_ms_p99", "p99 ms"),
        Column::new("latency_ms_p999", "p99.9 ms"),
        Column::new("latency_ms_average", "mean ms"),
        Column::new("errors", "errors"),
    ];
    print_table(&format!("{} · scenario 4 · API load", mode.name()), &entries, &columns, false);
    print_table(
        &format!("{} · scenario 4 · costs per request", mode.name()),
        &entries,
        &cost_columns("request"),
        true,
    );
}
