//! The analytics benchmark (issue 12): loads a long execution history into a fresh PostgreSQL
//! database — by default 1,000,000 executions of 20 workflows with one step run each, 2 per
//! minute going back from now (about 347 days), 10% failing, durations spread from 50 ms to 20 s
//! — through the real tables and triggers, so the rollups are maintained exactly as the engine's
//! transitions maintain them. It then times the queries the AnalyticsService runs for the
//! overview and for one workflow's metrics over 7, 30 and 365 days, first when a tenth of the
//! history is loaded and again with all of it: the 7- and 30-day figures must not move, since
//! the newest rows are the same and the older ones are never read.
//!
//! ```text
//! cargo bench --bench analytics                         # 1,000,000 executions
//! cargo bench --bench analytics -- --executions 200000  # a shorter history
//! ```
//!
//! It needs PostgreSQL (`TURBOCAT_TEST_DATABASE_URL`, an admin URL as the tests use it; default
//! `postgres://postgres@127.0.0.1:5432/postgres`), creates `turbocat_analytics_bench_<random>`
//! and drops it at the end. Run any other way than by `cargo bench` it prints how to run it.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use sqlx::Connection;
use turbocat::store::{
    AgentLimits, AgentType, AnalyticsStore, HourRange, IdentityStore, NewAgent, NewUser,
    NewWorkflow, OwnerScope, PostgresStore, ResourceStore, RollupFilter, WorkflowRankingOrder,
};
use uuid::Uuid;

type Failure = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: cargo bench --bench analytics [-- --executions N]";
const WORKFLOWS: usize = 20;
/// Rows per load statement.
const BATCH: i64 = 50_000;
/// Executions per minute of history.
const PER_MINUTE: i64 = 2;
/// Timed repetitions of each query set.
const ROUNDS: usize = 30;

fn admin_url() -> String {
    std::env::var("TURBOCAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `admin_url` with its database replaced by `name`.
fn database_url(name: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

struct History {
    store: PostgresStore,
    owner: Uuid,
    workflows: Vec<Uuid>,
    agent: Uuid,
    started: chrono::DateTime<Utc>,
}

async fn prepare(name: &str) -> Result<History, Failure> {
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await?;
    let store = PostgresStore::connect(&database_url(name), 8).await?;
    store.migrate().await?;
    let owner = store.create_user(NewUser::new("bench@example.com", "Bench")).await?.id;
    let agent = store
        .create_agent(NewAgent {
            owner_id: owner,
            name: "bench agent".to_owned(),
            description: String::new(),
            agent_type: AgentType::Code,
            config: json!({}),
            limits: AgentLimits::default(),
            tags: Vec::new(),
        })
        .await?
        .id;
    let mut workflows = Vec::with_capacity(WORKFLOWS);
    for index in 0..WORKFLOWS {
        let workflow = store
            .create_workflow(NewWorkflow {
                owner_id: owner,
                name: format!("workflow {index}"),
                description: String::new(),
                default_input: json!({}),
                priority: 5,
                timeout_seconds: None,
                tags: Vec::new(),
                steps: Vec::new(),
            })
            .await?;
        workflows.push(workflow.workflow.id);
    }
    Ok(History { store, owner, workflows, agent, started: Utc::now() })
}

/// Loads executions `from..to` (0 is the newest): inserted RUNNING with a RUNNING step run, then
/// finished by UPDATEs, which fire the rollup triggers as the engine's transitions do.
async fn load(history: &History, from: i64, to: i64) -> Result<(), Failure> {
    let connections = history.store.connections();
    let mut next = from;
    while next < to {
        let end = (next + BATCH).min(to);
        let mut transaction = connections.begin("BEGIN").await?;
        sqlx::query(
            "CREATE TEMPORARY TABLE bench_batch ON COMMIT DROP AS \
             SELECT gen_random_uuid() AS id, gen_random_uuid() AS step_id, i, \
                    ($3::uuid[])[1 + (i % array_length($3::uuid[], 1))] AS workflow_id, \
                    $4::timestamptz - make_interval(secs => i * 60.0 / $5) AS started_at, \
                    (0.05 + (hashint4(i::int) & 1023) / 1023.0 * 20.0) AS seconds, \
                    CASE WHEN i % 10 = 3 THEN 'FAILED' ELSE 'SUCCEEDED' END AS final_status \
             FROM generate_series($1::bigint, $2::bigint - 1) AS i",
        )
        .bind(next)
        .bind(end)
        .bind(&history.workflows)
        .bind(history.started)
        .bind(PER_MINUTE as f64)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO executions (id, owner_id, workflow_id, trigger, status, priority, input, \
             definition, started_at, created_at, updated_at) \
             SELECT id, $1, workflow_id, 'MANUAL', 'RUNNING', 5, '{}', '{}', started_at, \
             started_at, started_at FROM bench_batch",
        )
        .bind(history.owner)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "INSERT INTO step_runs (id, execution_id, step_key, agent_id, status, attempt, \
             max_attempts, runner_id, started_at, created_at, updated_at) \
             SELECT step_id, id, 'only', $1, 'RUNNING', 1, 1, 'bench-runner', started_at, \
             started_at, started_at FROM bench_batch",
        )
        .bind(history.agent)
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "UPDATE step_runs s SET status = b.final_status, \
             error = CASE WHEN b.final_status = 'FAILED' THEN 'error ' || (b.i % 7) END, \
             finished_at = b.started_at + make_interval(secs => b.seconds * 0.9), \
             updated_at = b.started_at + make_interval(secs => b.seconds * 0.9) \
             FROM bench_batch b WHERE s.id = b.step_id",
        )
        .execute(&mut *transaction)
        .await?;
        sqlx::query(
            "UPDATE executions e SET status = b.final_status, \
             error = CASE WHEN b.final_status = 'FAILED' THEN 'step only failed' END, \
             finished_at = b.started_at + make_interval(secs => b.seconds), \
             updated_at = b.started_at + make_interval(secs => b.seconds) \
             FROM bench_batch b WHERE e.id = b.id",
        )
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        next = end;
        println!("  loaded {next} executions");
    }
    sqlx::query("ANALYZE").execute(connections).await?;
    Ok(())
}

/// The store calls of `GetOverview` (day buckets), concurrent as the service makes them.
async fn overview(store: &PostgresStore, owner: Uuid, range: HourRange) -> Result<(), Failure> {
    let scope = OwnerScope::Owner(owner);
    let filter = RollupFilter::scope(scope);
    tokio::try_join!(
        store.resource_counts(scope),
        store.execution_outcomes(filter, range, 86_400),
        store.execution_durations(filter, range),
        store.step_outcomes(filter, range, 86_400),
        store.rank_workflows(scope, range, WorkflowRankingOrder::MostExecutions, 5),
        store.rank_workflows(scope, range, WorkflowRankingOrder::MostFailures, 5),
    )?;
    Ok(())
}

/// The store calls of `GetWorkflowMetrics`, concurrent as the service makes them.
async fn workflow_metrics(
    store: &PostgresStore,
    workflow_id: Uuid,
    range: HourRange,
) -> Result<(), Failure> {
    let filter = RollupFilter { workflow_id: Some(workflow_id), ..RollupFilter::default() };
    store.get_workflow(OwnerScope::All, workflow_id).await?;
    tokio::try_join!(
        store.execution_outcomes(filter, range, 86_400),
        store.execution_durations(filter, range),
        store.step_outcomes(filter, range, 86_400),
        store.top_errors(workflow_id, range, 10),
    )?;
    Ok(())
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Times `ROUNDS` runs of each query set over each range and prints p50 / p95 / max.
async fn measure(history: &History, loaded: i64) -> Result<(), Failure> {
    let now = history.started;
    println!("\nwith {loaded} executions (and as many step runs) loaded:");
    println!("{:<22} {:>7} {:>9} {:>9} {:>9}", "query", "days", "p50 ms", "p95 ms", "max ms");
    for days in [7_i64, 30, 365] {
        let range = HourRange::covering(now - chrono::Duration::days(days), now);
        for (name, index) in [("overview", 0), ("workflow metrics", 1)] {
            let mut times = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                let started = Instant::now();
                if index == 0 {
                    overview(&history.store, history.owner, range).await?;
                } else {
                    workflow_metrics(&history.store, history.workflows[0], range).await?;
                }
                times.push(started.elapsed());
            }
            times.sort();
            let p50 = times[times.len() / 2];
            let p95 = times[(times.len() * 95 / 100).min(times.len() - 1)];
            let max = times[times.len() - 1];
            println!(
                "{name:<22} {days:>7} {:>9.2} {:>9.2} {:>9.2}",
                milliseconds(p50),
                milliseconds(p95),
                milliseconds(max)
            );
        }
    }
    let rows: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM execution_rollups), (SELECT COUNT(*) FROM step_rollups)",
    )
    .fetch_one(history.store.connections())
    .await?;
    println!("rollup rows: {} execution, {} step", rows.0, rows.1);
    Ok(())
}

async fn run(executions: i64) -> Result<(), Failure> {
    let name = format!("turbocat_analytics_bench_{}", Uuid::new_v4().simple());
    println!("loading {executions} executions into {name}");
    let history = prepare(&name).await?;
    let outcome = async {
        let first = (executions / 10).max(1);
        let started = Instant::now();
        load(&history, 0, first).await?;
        measure(&history, first).await?;
        load(&history, first, executions).await?;
        println!("\nloaded in {:.0} s", started.elapsed().as_secs_f64());
        measure(&history, executions).await
    }
    .await;
    history.store.close().await;
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await?;
    outcome
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if !arguments.iter().any(|argument| argument == "--bench") {
        println!("the analytics benchmark runs only with `cargo bench --bench analytics`\n{USAGE}");
        return;
    }
    let mut executions: i64 = 1_000_000;
    let mut words = arguments.iter();
    while let Some(word) = words.next() {
        if word == "--executions" {
            match words.next().and_then(|count| count.parse().ok()) {
                Some(count) if count > 0 => executions = count,
                _ => {
                    eprintln!("--executions needs a positive number\n{USAGE}");
                    std::process::exit(2);
                }
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            std::process::exit(1);
        }
    };
    if let Err(error) = runtime.block_on(run(executions)) {
        eprintln!("the analytics benchmark failed: {error}");
        std::process::exit(1);
    }
}
