//! A rolling upgrade across a migration: replica A serves with a runner attached; a newer
//! release's `turbocat migrate` applies a migration A does not know (additive, as the
//! expand/contract rule of docs/operations.md wants: a new table, new nullable columns on the
//! hot tables, an index); A keeps answering requests and running executions on the expanded
//! schema, restarts on it (it starts, saying the database is newer), and a replica B started
//! beside it serves too. The newer release is played by a migrator holding this release's
//! migrations plus the test's; A and B are this release, the one that must survive.

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, Connection, SqlSafeStr};

use crate::support::api::Api;
use crate::support::{ServeDatabase, TurbocatProcess, start_serve, start_serve_replica};
use crate::{Bench, RunnerProcess, assert_every_step_ran_once, terminate, unique_prefix};

/// The newer release's migration: only additions an older replica does not see.
const ADDITIVE: &str = "\
    CREATE TABLE upgrade_notes (id uuid PRIMARY KEY, note text NOT NULL);\n\
    ALTER TABLE executions ADD COLUMN upgrade_note text;\n\
    ALTER TABLE step_runs ADD COLUMN upgrade_note text;\n\
    CREATE INDEX executions_upgrade_note ON executions (upgrade_note) WHERE upgrade_note IS NOT NULL;\n";

const NEWER: &str = "the database has migrations newer than this release";

/// Migrates the database as a release with one more migration (9999) would.
async fn migrate_as_a_newer_release(database: &ServeDatabase) {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    let mut migrations: Vec<Migration> =
        Migrator::new(directory).await.expect("read migrations").iter().cloned().collect();
    migrations.push(Migration::new(
        9_999,
        "upgrade notes".into(),
        MigrationType::ReversibleUp,
        AssertSqlSafe(ADDITIVE).into_sql_str(),
        false,
    ));
    let mut connection = sqlx::PgConnection::connect(&database.url).await.expect("connect");
    Migrator::with_migrations(migrations).run(&mut connection).await.expect("the newer migrate");
}

/// Runs the workflow through `bench` and checks each step ran once.
async fn run_once(bench: &Bench, workflow: &str) {
    let execution_id = bench.execute(workflow).await;
    let execution = bench.finished(&execution_id, Duration::from_secs(30)).await;
    assert_every_step_ran_once(&execution);
    let two = execution["stepRuns"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["stepKey"] == "two"))
        .expect("step two");
    assert_eq!(two["output"]["n"], 84, "{execution}");
}

/// Lists agents and creates one: reads and writes of the resources answer.
async fn serves_requests(bench: &Bench, name: &str) {
    let (status, body) = bench.api.get("/api/v1/agents", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    bench.jq(name, ".").await;
}

async fn stopped(process: &mut TurbocatProcess) {
    let started = Instant::now();
    while process.is_running() {
        assert!(started.elapsed() < Duration::from_secs(30), "A did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_across_an_additive_migration_keeps_both_replicas_serving() {
    // A fixed port, so the runner finds A again where it left it after the restart.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let prefix = unique_prefix();
    let flags = ["--listen", listen.as_str(), "--redis-key-prefix", prefix.as_str()];
    let (mut a, database) = start_serve(&flags).await;
    let bench = Bench::new(Api::new(&a), "upgrade@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let _runner = RunnerProcess::start(&a.base_url(), &key, "upgraded", 2, "", &[]);
    crate::wait_for_runner(&bench.api, &bench.auth, "upgraded").await;
    let double = bench.jq("double", "{n: (.n * 2)}").await;
    let workflow = bench
        .workflow(
            "upgrade",
            json!([
                { "key": "one", "agentId": double, "inputMapping": { "n": 21 } },
                { "key": "two", "agentId": double, "dependsOn": ["one"],
                  "inputMapping": "{{steps.one.output}}" },
            ]),
        )
        .await;
    run_once(&bench, &workflow).await;

    migrate_as_a_newer_release(&database).await;

    // A, running, on the expanded schema.
    serves_requests(&bench, "during").await;
    run_once(&bench, &workflow).await;

    // A restarted (SIGTERM, as a deployment does) starts on it and says so.
    terminate(a.pid());
    stopped(&mut a).await;
    let a = start_serve_replica(&database, &flags).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = crate::plain(&a.stderr_text());
    assert!(log.contains(NEWER) && log.contains("9999"), "A says the database is newer:\n{log}");
    crate::wait_for_runner(&bench.api, &bench.auth, "upgraded").await;
    serves_requests(&bench, "restarted").await;
    run_once(&bench, &workflow).await;

    // B beside it: both serve, and work submitted through B runs on A's runner.
    let b = start_serve_replica(&database, &["--redis-key-prefix", &prefix]).await;
    let through_b = Bench {
        api: Api::new(&b),
        auth: bench.auth.clone(),
        user_id: bench.user_id.clone(),
        token: bench.token.clone(),
    };
    serves_requests(&through_b, "beside").await;
    run_once(&through_b, &workflow).await;
    serves_requests(&bench, "still").await;
    run_once(&bench, &workflow).await;
    drop(b);
}
