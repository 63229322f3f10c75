//! Migrations: applying them again is a no-op, and a database upgraded one migration at a time
//! ends up with exactly the schema of a fresh one, on both backends.

use sqlx::Connection;
use sqlx::migrate::Migrator;

use crate::support;

async fn migrator(backend: &str) -> Migrator {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend);
    Migrator::new(path).await.expect("read migrations")
}

async fn postgres_schema(url: &str) -> Vec<String> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    let mut schema: Vec<String> = sqlx::query_scalar(
        "SELECT table_name || '.' || column_name || ' ' || data_type || ' null=' || is_nullable \
         || ' default=' || COALESCE(column_default, '') \
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("columns");
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("indexes");
    let constraints: Vec<String> = sqlx::query_scalar(
        "SELECT conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid) \
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
    )
    .fetch_all(&mut connection)
    .await
    .expect("constraints");
    schema.extend(indexes);
    schema.extend(constraints);
    schema.sort();
    schema
}

async fn sqlite_schema(path: &std::path::Path) -> Vec<String> {
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let mut schema: Vec<String> = sqlx::query_scalar(
        "SELECT type || ' ' || name || ' ' || COALESCE(sql, '') FROM sqlite_master \
         WHERE name NOT LIKE '_sqlx_migrations%' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("schema");
    schema.sort();
    schema
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrations_are_idempotent_and_upgrades_match_fresh_installs() {
    let migrator = migrator("postgres").await;
    let versions: Vec<i64> = migrator.iter().map(|migration| migration.version).collect();
    assert!(versions.len() >= 4, "the schema has its migrations: {versions:?}");

    let (fresh_url, fresh_name) = support::create_postgres_database().await;
    let _fresh = support::ServeDatabase::new(fresh_url.clone(), fresh_name);
    let mut fresh = sqlx::PgConnection::connect(&fresh_url).await.expect("connect");
    migrator.run(&mut fresh).await.expect("migrate");
    let fresh_schema = postgres_schema(&fresh_url).await;
    assert!(fresh_schema.iter().any(|line| line.starts_with("users.email ")), "users table exists");
    assert!(
        fresh_schema.iter().any(|line| line.starts_with("step_runs.attempt ")),
        "step_runs table exists"
    );

    migrator.run(&mut fresh).await.expect("migrate again");
    assert_eq!(postgres_schema(&fresh_url).await, fresh_schema, "a second run changes nothing");
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(&mut fresh)
        .await
        .expect("count");
    assert_eq!(applied, versions.len() as i64);

    let (upgraded_url, upgraded_name) = support::create_postgres_database().await;
    let _upgraded = support::ServeDatabase::new(upgraded_url.clone(), upgraded_name);
    let mut upgraded = sqlx::PgConnection::connect(&upgraded_url).await.expect("connect");
    for version in &versions {
        migrator.run_to(*version, &mut upgraded).await.expect("upgrade one step");
    }
    assert_eq!(postgres_schema(&upgraded_url).await, fresh_schema, "upgraded equals fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_migrations_are_idempotent_and_upgrades_match_fresh_installs() {
    let migrator = migrator("sqlite").await;
    let versions: Vec<i64> = migrator.iter().map(|migration| migration.version).collect();
    let postgres_versions: Vec<i64> = migrator_versions("postgres").await;
    assert_eq!(versions, postgres_versions, "both backends have the same migrations");

    let directory = tempfile::tempdir().expect("temporary directory");
    let fresh_path = directory.path().join("fresh.db");
    let upgraded_path = directory.path().join("upgraded.db");
    for path in [&fresh_path, &upgraded_path] {
        std::fs::File::create(path).expect("create file");
    }
    let mut fresh = sqlx::SqliteConnection::connect(&format!("sqlite://{}", fresh_path.display()))
        .await
        .expect("connect");
    migrator.run(&mut fresh).await.expect("migrate");
    let fresh_schema = sqlite_schema(&fresh_path).await;
    assert!(fresh_schema.iter().any(|line| line.starts_with("table users ")), "users table exists");
    migrator.run(&mut fresh).await.expect("migrate again");
    assert_eq!(sqlite_schema(&fresh_path).await, fresh_schema);

    let mut upgraded =
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", upgraded_path.display()))
            .await
            .expect("connect");
    for version in &versions {
        migrator.run_to(*version, &mut upgraded).await.expect("upgrade one step");
    }
    assert_eq!(sqlite_schema(&upgraded_path).await, fresh_schema, "upgraded equals fresh");
}

async fn migrator_versions(backend: &str) -> Vec<i64> {
    migrator(backend).await.iter().map(|migration| migration.version).collect()
}

/// Rows as the engine wrote them before migration 5: a parent execution, its step run at
/// attempt 2, and a sub-workflow child recording that attempt in its definition only.
const BEFORE_PARENT_ATTEMPT: [&str; 4] = [
    "INSERT INTO users (id, email, full_name, role, created_at, updated_at) \
     VALUES ($1, 'old@example.com', 'Old', 'USER', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
    "INSERT INTO executions (id, owner_id, trigger, status, priority, input, definition, \
     created_at, updated_at) VALUES ($2, $1, 'MANUAL', 'RUNNING', 5, '{}', '{}', \
     '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
    "INSERT INTO step_runs (id, execution_id, step_key, status, attempt, max_attempts, \
     created_at, updated_at) VALUES ($3, $2, 'sub', 'PENDING', 2, 3, '2026-01-01T00:00:00Z', \
     '2026-01-01T00:00:00Z')",
    "INSERT INTO executions (id, owner_id, parent_execution_id, parent_step_run_id, depth, \
     trigger, status, priority, input, definition, created_at, updated_at) \
     VALUES ($4, $1, $2, $3, 1, 'SUB_WORKFLOW', 'QUEUED', 5, '{}', '{\"parentAttempt\": 2}', \
     '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')",
];

const PARENT_ATTEMPTS: &str =
    "SELECT parent_attempt FROM executions ORDER BY parent_execution_id IS NULL DESC";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parent_attempts_move_from_the_definition_to_their_column() {
    let migrator = migrator("postgres").await;
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
    migrator.run_to(4, &mut connection).await.expect("migrate to 4");
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    for statement in BEFORE_PARENT_ATTEMPT {
        let mut query = sqlx::query(statement);
        for id in &ids {
            query = query.bind(*id);
        }
        query.execute(&mut connection).await.expect(statement);
    }
    migrator.run(&mut connection).await.expect("migrate");
    let attempts: Vec<Option<i32>> =
        sqlx::query_scalar(PARENT_ATTEMPTS).fetch_all(&mut connection).await.expect("read");
    assert_eq!(attempts, [None, Some(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_parent_attempts_move_from_the_definition_to_their_column() {
    let migrator = migrator("sqlite").await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("old.db");
    std::fs::File::create(&path).expect("create file");
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    migrator.run_to(4, &mut connection).await.expect("migrate to 4");
    let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
    for statement in BEFORE_PARENT_ATTEMPT {
        let mut query = sqlx::query(statement);
        for id in &ids {
            query = query.bind(*id);
        }
        query.execute(&mut connection).await.expect(statement);
    }
    migrator.run(&mut connection).await.expect("migrate");
    let attempts: Vec<Option<i32>> =
        sqlx::query_scalar(PARENT_ATTEMPTS).fetch_all(&mut connection).await.expect("read");
    assert_eq!(attempts, [None, Some(2)]);
}

/// Runs finished before migration 8: a failed execution whose one step failed its first
/// attempt (1 s) and succeeded its second (2 s).
const BEFORE_ROLLUPS: [&str; 5] = [
    "INSERT INTO users (id, email, full_name, role, created_at, updated_at) \
     VALUES ($1, 'history@example.com', 'History', 'USER', '2026-01-01T00:00:00Z', \
     '2026-01-01T00:00:00Z')",
    "INSERT INTO executions (id, owner_id, trigger, status, priority, input, definition, error, \
     started_at, finished_at, created_at, updated_at) VALUES ($2, $1, 'MANUAL', 'FAILED', 5, \
     '{}', '{}', 'step x failed', '2026-01-01T10:00:00Z', '2026-01-01T10:00:05Z', \
     '2026-01-01T10:00:00Z', '2026-01-01T10:00:05Z')",
    "INSERT INTO step_runs (id, execution_id, step_key, status, attempt, max_attempts, \
     created_at, updated_at) VALUES ($3, $2, 'x', 'SUCCEEDED', 2, 2, '2026-01-01T10:00:00Z', \
     '2026-01-01T10:00:04Z')",
    "INSERT INTO step_attempts (step_run_id, attempt, status, error, started_at, finished_at, \
     created_at, updated_at) VALUES ($3, 1, 'FAILED', 'boom', '2026-01-01T10:00:00Z', \
     '2026-01-01T10:00:01Z', '2026-01-01T10:00:00Z', '2026-01-01T10:00:01Z')",
    "INSERT INTO step_attempts (step_run_id, attempt, status, started_at, finished_at, \
     created_at, updated_at) VALUES ($3, 2, 'SUCCEEDED', '2026-01-01T10:00:02Z', \
     '2026-01-01T10:00:04Z', '2026-01-01T10:00:02Z', '2026-01-01T10:00:04Z')",
];

/// The highest `$n` of a statement: how many ids it binds.
fn highest_parameter(statement: &str) -> usize {
    statement
        .split('$')
        .skip(1)
        .filter_map(|rest| rest.chars().next().and_then(|digit| digit.to_digit(10)))
        .max()
        .map_or(0, |highest| highest as usize)
}

/// (executions, failed executions, attempts, retries, executions started) after migration 8.
const ROLLED_UP: &str = "SELECT \
     (SELECT CAST(SUM(executions) AS BIGINT) FROM execution_rollups), \
     (SELECT CAST(SUM(executions) AS BIGINT) FROM execution_rollups WHERE status = 'FAILED'), \
     (SELECT CAST(SUM(attempts) AS BIGINT) FROM step_rollups), \
     (SELECT CAST(SUM(retries) AS BIGINT) FROM step_rollups), \
     (SELECT CAST(SUM(executions_started) AS BIGINT) FROM usage_rollups)";
const ROLLED_UP_SECONDS: &str = "SELECT (SELECT SUM(duration_seconds) FROM step_rollups), (SELECT SUM(step_seconds) FROM usage_rollups)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rollups_start_with_the_history_of_an_upgraded_installation() {
    let migrator = migrator("postgres").await;
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
    migrator.run_to(7, &mut connection).await.expect("migrate to 7");
    let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    for statement in BEFORE_ROLLUPS {
        let mut query = sqlx::query(statement);
        for id in ids.iter().take(highest_parameter(statement)) {
            query = query.bind(*id);
        }
        query.execute(&mut connection).await.expect(statement);
    }
    migrator.run(&mut connection).await.expect("migrate");
    let counts: (i64, i64, i64, i64, i64) =
        sqlx::query_as(ROLLED_UP).fetch_one(&mut connection).await.expect("read");
    assert_eq!(counts, (1, 1, 2, 1, 1));
    let seconds: (f64, f64) =
        sqlx::query_as(ROLLED_UP_SECONDS).fetch_one(&mut connection).await.expect("read");
    assert!((seconds.0 - 3.0).abs() < 0.01 && (seconds.1 - 3.0).abs() < 0.01, "{seconds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rollups_start_with_the_history_of_an_upgraded_installation() {
    let migrator = migrator("sqlite").await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("old.db");
    std::fs::File::create(&path).expect("create file");
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    migrator.run_to(7, &mut connection).await.expect("migrate to 7");
    let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
    for statement in BEFORE_ROLLUPS {
        let mut query = sqlx::query(statement);
        for id in ids.iter().take(highest_parameter(statement)) {
            query = query.bind(*id);
        }
        query.execute(&mut connection).await.expect(statement);
    }
    migrator.run(&mut connection).await.expect("migrate");
    let counts: (i64, i64, i64, i64, i64) =
        sqlx::query_as(ROLLED_UP).fetch_one(&mut connection).await.expect("read");
    assert_eq!(counts, (1, 1, 2, 1, 1));
    let seconds: (f64, f64) =
        sqlx::query_as(ROLLED_UP_SECONDS).fetch_one(&mut connection).await.expect("read");
    assert!((seconds.0 - 3.0).abs() < 0.01 && (seconds.1 - 3.0).abs() < 0.01, "{seconds:?}");
}
