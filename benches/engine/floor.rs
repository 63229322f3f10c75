//! The floor: what the machine's PostgreSQL does with nothing of ours in the way. pgbench runs
//! a one-row INSERT per transaction (each a commit, so a WAL flush) with 1 and with 32 clients,
//! in a scratch database created for the run and dropped after it.
//! May call: pgbench, PostgreSQL, the measure module, the report.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use sqlx::Connection;

use crate::measure::{PostgresCounter, Probe};
use crate::processes::{ScratchDatabase, admin_database_url, on_path};
use crate::report::{Column, Entry, Report, Round, print_table};
use crate::{Outcome, Scenario, Sizes};

const CLIENTS: [u32; 2] = [1, 32];

pub async fn run(sizes: &Sizes, report: &mut Report) -> Outcome<()> {
    if !on_path("pgbench") {
        report.notes.push("pgbench is not installed: the floor was not measured".to_owned());
        return Ok(());
    }
    let scratch = ScratchDatabase::create("turbocat_bench_floor").await?;
    let outcome = measure(&scratch, sizes, report).await;
    scratch.drop_database().await?;
    outcome
}

async fn measure(scratch: &ScratchDatabase, sizes: &Sizes, report: &mut Report) -> Outcome<()> {
    let mut connection = sqlx::PgConnection::connect(&scratch.url).await?;
    sqlx::query("CREATE TABLE floor (id bigserial PRIMARY KEY, value integer NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")
        .execute(&mut connection)
        .await?;
    drop(connection);
    let directory = tempfile::tempdir()?;
    let script = directory.path().join("insert.sql");
    std::fs::write(&script, "INSERT INTO floor (value) VALUES (1);\n")?;
    let counter = PostgresCounter::connect(&admin_database_url(), &scratch.name, None).await?;
    let mut probe = Probe::new(None, None, Some(counter), Arc::new(AtomicU64::new(0)));
    for clients in CLIENTS {
        let variant = format!(
            "one-row INSERT per commit, {clients} client{}",
            if clients == 1 { "" } else { "s" }
        );
        let mut entry = Entry::new(None, Scenario::Floor, &variant);
        pgbench(scratch, &script, clients, 1, &[]).await?;
        for _ in 0..sizes.floor_rounds {
            let window = probe.begin().await?;
            let result = pgbench(scratch, &script, clients, sizes.floor_seconds, &[]).await?;
            let costs = probe.end(window).await?;
            let mut round = Round::default();
            round.set("commits_per_second", "commit/s", result.transactions_per_second);
            round.set("latency_ms_average", "ms", result.latency_ms_average);
            let commits = costs.postgres_commits.unwrap_or(0.0);
            round.set("commits", "", commits);
            if commits > 0.0 {
                let postgres_ms =
                    costs.cpu_ms.get(&crate::measure::Role::Postgres).copied().unwrap_or(0.0);
                round.set("cpu_ms_per_commit_postgres", "ms", postgres_ms / commits);
            }
            round.set("machine_busy_percent", "%", costs.machine_busy_percent);
            entry.add_round(round);
        }
        report.add(entry);
    }
    Ok(())
}

pub struct PgbenchResult {
    pub transactions_per_second: f64,
    pub latency_ms_average: f64,
}

/// Runs `script` with `clients` clients for `seconds` on `scratch`; `extra` goes to pgbench
/// as it is (`-M prepared`).
pub async fn pgbench(
    scratch: &ScratchDatabase,
    script: &std::path::Path,
    clients: u32,
    seconds: u32,
    extra: &[&str],
) -> Outcome<PgbenchResult> {
    let url = url::Url::parse(&scratch.url)?;
    let threads = clients.min(u32::try_from(crate::measure::cores())?.max(1));
    let mut command = tokio::process::Command::new("pgbench");
    command
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &threads.to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .args(extra)
        .arg("-f")
        .arg(script)
        .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
        .args(["-p", &url.port().unwrap_or(5432).to_string()])
        .args(["-U", if url.username().is_empty() { "postgres" } else { url.username() }])
        .arg(&scratch.name);
    if let Some(password) = url.password() {
        command.env("PGPASSWORD", password);
    }
    let output = command.output().await?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(
            format!("pgbench failed: {text}{}", String::from_utf8_lossy(&output.stderr)).into()
        );
    }
    let value_after = |prefix: &str| {
        text.lines()
            .find_map(|line| line.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<f64>().ok())
    };
    Ok(PgbenchResult {
        transactions_per_second: value_after("tps = ")
            .ok_or_else(|| format!("no tps in pgbench's output: {text}"))?,
        latency_ms_average: value_after("latency average = ").unwrap_or(f64::NAN),
    })
}

pub fn print(report: &Report) {
    let entries = report.entries_of(None, Scenario::Floor);
    let columns = vec![
        Column::new("commits_per_second", "commits/s"),
        Column::new("latency_ms_average", "latency ms"),
        Column::new("cpu_ms_per_commit_postgres", "postgres cpu ms/commit"),
        Column::new("machine_busy_percent", "busy %"),
    ];
    print_table("floor · pgbench, PostgreSQL alone", &entries, &columns, true);
}
