//! Migrations: applying them again is a no-op, a database upgraded one migration at a time
//! ends up with exactly the schema of a fresh one, every migration's down script brings back
//! exactly the schema before it (and its up script the schema after it again), and a database
//! migrated before the migrations became reversible (simple `.sql` files) keeps migrating and
//! can be reverted, on both backends.

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, Connection, SqlSafeStr};
use turbocat::store::{
    ExecutionStore as _, MigrationEntry, MigrationError, MigrationReport, NewerMigrations,
    OwnerScope, PostgresStore, SqliteStore,
};

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
         FROM pg_constraint WHERE connamespace = 'public'::regnamespace \
         AND conrelid::regclass::text <> '_sqlx_migrations'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("constraints");
    // Triggers and the functions they run (a down script restoring an older function body
    // shows here).
    let triggers: Vec<String> = sqlx::query_scalar(
        "SELECT 'trigger ' || pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal",
    )
    .fetch_all(&mut connection)
    .await
    .expect("triggers");
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT 'function ' || pg_get_functiondef(oid) FROM pg_proc \
         WHERE pronamespace = 'public'::regnamespace",
    )
    .fetch_all(&mut connection)
    .await
    .expect("functions");
    schema.extend(indexes);
    schema.extend(constraints);
    schema.extend(triggers);
    schema.extend(functions);
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
    let versions: Vec<i64> = migrator_versions("postgres").await;
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
    let versions: Vec<i64> = migrator_versions("sqlite").await;
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

/// The versions of the migrations (each has an up and a down script), oldest first.
async fn migrator_versions(backend: &str) -> Vec<i64> {
    migrator(backend)
        .await
        .iter()
        .filter(|migration| migration.migration_type.is_up_migration())
        .map(|migration| migration.version)
        .collect()
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

/// The definitions of the executions of `BEFORE_PARENT_ATTEMPT`, as compact JSON text.
const DEFINITIONS: &str = "SELECT CAST(definition AS TEXT) FROM executions \
     ORDER BY parent_execution_id IS NULL DESC";

/// The child as the engine writes it since 0005: the attempt in its column only.
const WRITTEN_TODAY: &str = "UPDATE executions SET definition = '{}', parent_attempt = 3 \
     WHERE parent_execution_id IS NOT NULL";

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

    // And back: 0005's down script puts the attempt (as the engine writes it today: in the
    // column only) into the definition again, where the releases before it look, and its up
    // script into the column once more.
    sqlx::query(WRITTEN_TODAY).execute(&mut connection).await.expect("write as today");
    migrator.undo(&mut connection, 4).await.expect("revert to 4");
    let definitions: Vec<String> =
        sqlx::query_scalar(DEFINITIONS).fetch_all(&mut connection).await.expect("read");
    let definitions: Vec<serde_json::Value> =
        definitions.iter().map(|text| serde_json::from_str(text).expect("json")).collect();
    assert_eq!(definitions, [serde_json::json!({}), serde_json::json!({ "parentAttempt": 3 })]);
    migrator.run(&mut connection).await.expect("migrate again");
    let attempts: Vec<Option<i32>> =
        sqlx::query_scalar(PARENT_ATTEMPTS).fetch_all(&mut connection).await.expect("read");
    assert_eq!(attempts, [None, Some(3)]);
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

    // And back: 0005's down script puts the attempt (as the engine writes it today: in the
    // column only) into the definition again, where the releases before it look, and its up
    // script into the column once more.
    sqlx::query(WRITTEN_TODAY).execute(&mut connection).await.expect("write as today");
    migrator.undo(&mut connection, 4).await.expect("revert to 4");
    let definitions: Vec<String> =
        sqlx::query_scalar(DEFINITIONS).fetch_all(&mut connection).await.expect("read");
    let definitions: Vec<serde_json::Value> =
        definitions.iter().map(|text| serde_json::from_str(text).expect("json")).collect();
    assert_eq!(definitions, [serde_json::json!({}), serde_json::json!({ "parentAttempt": 3 })]);
    migrator.run(&mut connection).await.expect("migrate again");
    let attempts: Vec<Option<i32>> =
        sqlx::query_scalar(PARENT_ATTEMPTS).fetch_all(&mut connection).await.expect("read");
    assert_eq!(attempts, [None, Some(3)]);
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

/// After migration 13 a step run's current attempt is the step run itself: the history of
/// `BEFORE_ROLLUPS` (attempt 1 FAILED, attempt 2 SUCCEEDED and current) keeps attempt 1 as its
/// one row, the step run keeps when attempt 2 began, and the store still lists both attempts.
/// 13's down script writes attempt 2's row again. One body for both backends: `$connection`
/// is a connection to a fresh database, `$store` opens the store on it.
macro_rules! current_attempts_move_and_back {
    ($backend:literal, $connection:expr, $store:expr) => {{
        let migrator = migrator($backend).await;
        let mut connection = $connection;
        migrator.run_to(12, &mut connection).await.expect("migrate to 12");
        let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
        for statement in BEFORE_ROLLUPS {
            let mut query = sqlx::query(statement);
            for id in ids.iter().take(highest_parameter(statement)) {
                query = query.bind(*id);
            }
            query.execute(&mut connection).await.expect(statement);
        }
        migrator.run_to(13, &mut connection).await.expect("migrate to 13");
        let rows: Vec<i32> =
            sqlx::query_scalar(ATTEMPT_ROWS).fetch_all(&mut connection).await.expect("read");
        assert_eq!(rows, [1], "the finished attempt alone keeps its row");
        let attempts =
            $store.list_step_attempts(OwnerScope::All, ids[2]).await.expect("list attempts");
        let listed: Vec<(i32, &str, String)> = attempts
            .iter()
            .map(|attempt| {
                (attempt.attempt, attempt.status.as_str(), attempt.created_at.to_rfc3339())
            })
            .collect();
        assert_eq!(
            listed,
            [
                (1, "FAILED", "2026-01-01T10:00:00+00:00".to_owned()),
                (2, "SUCCEEDED", "2026-01-01T10:00:02+00:00".to_owned())
            ]
        );
        migrator.undo(&mut connection, 12).await.expect("revert to 12");
        let rows: Vec<i32> =
            sqlx::query_scalar(ATTEMPT_ROWS).fetch_all(&mut connection).await.expect("read");
        assert_eq!(rows, [1, 2]);
        let began: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(SECOND_ATTEMPT_BEGAN)
            .fetch_one(&mut connection)
            .await
            .expect("read");
        assert_eq!(began.to_rfc3339(), "2026-01-01T10:00:02+00:00");
    }};
}

const ATTEMPT_ROWS: &str = "SELECT attempt FROM step_attempts ORDER BY attempt";
const SECOND_ATTEMPT_BEGAN: &str = "SELECT created_at FROM step_attempts WHERE attempt = 2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_current_attempts_move_to_their_step_runs_and_back() {
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    current_attempts_move_and_back!(
        "postgres",
        sqlx::PgConnection::connect(&url).await.expect("connect"),
        PostgresStore::connect(&url, 2).await.expect("connect the store")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_current_attempts_move_to_their_step_runs_and_back() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("old.db");
    std::fs::File::create(&path).expect("create file");
    current_attempts_move_and_back!(
        "sqlite",
        sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("connect"),
        SqliteStore::open(&path).await.expect("open the store")
    );
}

/// The migrations as the releases before reversible migrations embedded them: one simple
/// `NNNN_name.sql` file each, with the text that is now `NNNN_name.up.sql` (what
/// `_sqlx_migrations` records of them: version, description and the checksum of the text).
async fn simple_migrator(backend: &str) -> Migrator {
    let migrations = migrator(backend)
        .await
        .iter()
        .filter(|migration| migration.migration_type.is_up_migration())
        .map(|migration| {
            Migration::new(
                migration.version,
                migration.description.clone(),
                MigrationType::Simple,
                AssertSqlSafe(migration.sql.as_str().to_owned()).into_sql_str(),
                migration.no_tx,
            )
        })
        .collect();
    Migrator::with_migrations(migrations)
}

/// Walks every migration of a database migrated to the newest one: from the newest down, its
/// down script (`revert(1)`, what `turbocat migrate --down 1` does) must bring back the schema
/// of a database migrated only up to the one before, and its up script (`migrate()`) the
/// schema with it; then reverting all of them leaves an empty schema and applying all of them
/// again the full one. `schema_at[i]` is the schema with the first `i` migrations.
async fn walk_down_and_up<Revert, Apply, Dump>(
    versions: &[i64],
    schema_at: &[Vec<String>],
    revert: Revert,
    apply_one: Apply,
    dump: Dump,
) where
    Revert: AsyncFn(usize) -> Vec<MigrationEntry>,
    Apply: AsyncFn(i64),
    Dump: AsyncFn() -> Vec<String>,
{
    assert_eq!(dump().await, schema_at[versions.len()], "migrated to the newest");
    for (index, version) in versions.iter().enumerate().rev() {
        let reverted = revert(1).await;
        assert_eq!(
            reverted.iter().map(|migration| migration.version).collect::<Vec<_>>(),
            [*version],
            "reverts the newest applied"
        );
        assert_eq!(dump().await, schema_at[index], "the schema before {version} after its down");
        apply_one(*version).await;
        assert_eq!(dump().await, schema_at[index + 1], "the schema of {version} re-applied");
        revert(1).await;
    }
    assert_eq!(dump().await, schema_at[0], "everything reverted");
    assert!(revert(1).await.is_empty(), "nothing left to revert");
    apply_one(*versions.last().expect("migrations")).await;
    assert_eq!(dump().await, schema_at[versions.len()], "everything applied again");
    let reverted = revert(versions.len() + 5).await;
    assert_eq!(reverted.len(), versions.len(), "revert more than there are: all of them");
    assert_eq!(dump().await, schema_at[0], "everything reverted at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_migration_reverts_to_the_schema_before_it_and_reapplies() {
    let migrator = migrator("postgres").await;
    let versions = migrator_versions("postgres").await;
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut schema_at = vec![postgres_schema(&url).await];
    for version in &versions {
        migrator.run_to(*version, &mut connection).await.expect("upgrade one step");
        schema_at.push(postgres_schema(&url).await);
    }
    let store = PostgresStore::connect(&url, 2).await.expect("connect the store");
    walk_down_and_up(
        &versions,
        &schema_at,
        async |count| store.revert(count).await.expect("revert"),
        async |version| {
            let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
            migrator.run_to(version, &mut connection).await.expect("apply");
        },
        async || postgres_schema(&url).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_migration_reverts_to_the_schema_before_it_and_reapplies() {
    let migrator = migrator("sqlite").await;
    let versions = migrator_versions("sqlite").await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("walk.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let url = format!("sqlite://{}", path.display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("connect");
    let mut schema_at = vec![sqlite_schema(&path).await];
    for version in &versions {
        migrator.run_to(*version, &mut connection).await.expect("upgrade one step");
        schema_at.push(sqlite_schema(&path).await);
    }
    walk_down_and_up(
        &versions,
        &schema_at,
        async |count| store.revert(count).await.expect("revert"),
        async |version| {
            let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("connect");
            migrator.run_to(version, &mut connection).await.expect("apply");
        },
        async || sqlite_schema(&path).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_installation_migrated_with_simple_files_keeps_migrating_and_reverts() {
    let versions = migrator_versions("postgres").await;
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
    let older = simple_migrator("postgres").await;
    let newest_but_one = versions[versions.len() - 2];
    older.run_to(newest_but_one, &mut connection).await.expect("migrate the old way");

    let store = PostgresStore::connect(&url, 2).await.expect("connect the store");
    let report = store.migrate().await.expect("the reversible migrations accept it");
    let newest = *versions.last().expect("migrations");
    assert_eq!(
        report.applied.iter().map(|migration| migration.version).collect::<Vec<_>>(),
        [newest]
    );
    assert!(report.newer.is_empty());
    assert_eq!(store.migrate().await.expect("again"), MigrationReport::default());
    let reverted = store.revert(2).await.expect("revert what the old files applied too");
    assert_eq!(
        reverted.iter().map(|migration| migration.version).collect::<Vec<_>>(),
        [newest, newest_but_one]
    );
    store.migrate().await.expect("and apply them again");
    let fresh = fresh_postgres_schema().await;
    assert_eq!(postgres_schema(&url).await, fresh, "the same schema as a fresh installation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_installation_migrated_with_simple_files_keeps_migrating_and_reverts() {
    let versions = migrator_versions("sqlite").await;
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("old.db");
    let store = SqliteStore::open(&path).await.expect("open");
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let older = simple_migrator("sqlite").await;
    let newest_but_one = versions[versions.len() - 2];
    older.run_to(newest_but_one, &mut connection).await.expect("migrate the old way");

    let report = store.migrate().await.expect("the reversible migrations accept it");
    let newest = *versions.last().expect("migrations");
    assert_eq!(
        report.applied.iter().map(|migration| migration.version).collect::<Vec<_>>(),
        [newest]
    );
    assert_eq!(store.migrate().await.expect("again"), MigrationReport::default());
    let reverted = store.revert(2).await.expect("revert what the old files applied too");
    assert_eq!(
        reverted.iter().map(|migration| migration.version).collect::<Vec<_>>(),
        [newest, newest_but_one]
    );
    store.migrate().await.expect("and apply them again");
    let fresh_path = directory.path().join("fresh.db");
    SqliteStore::open(&fresh_path).await.expect("open").migrate().await.expect("migrate");
    assert_eq!(sqlite_schema(&path).await, sqlite_schema(&fresh_path).await);
}

async fn fresh_postgres_schema() -> Vec<String> {
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let store = PostgresStore::connect(&url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let schema = postgres_schema(&url).await;
    store.close().await;
    schema
}

/// A migration a newer release has (additive, as the expand/contract rule wants).
fn newer_migration(sql: &str) -> Migration {
    Migration::new(
        9_999,
        "a newer release".into(),
        MigrationType::ReversibleUp,
        AssertSqlSafe(sql.to_owned()).into_sql_str(),
        false,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_database_a_newer_release_migrated_is_accepted_or_refused_as_asked() {
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    let store = PostgresStore::connect(&url, 2).await.expect("connect");
    store.migrate().await.expect("migrate");
    let mut newer: Vec<Migration> = migrator("postgres").await.iter().cloned().collect();
    newer.push(newer_migration("ALTER TABLE executions ADD COLUMN newer_note text"));
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
    Migrator::with_migrations(newer).run(&mut connection).await.expect("the newer release");

    let report = store.migrate().await.expect("accepted");
    assert_eq!(report, MigrationReport { applied: vec![], newer: vec![9_999] });
    let refused = store.migrate_with(NewerMigrations::Refuse).await.expect_err("refused");
    assert!(
        matches!(refused, MigrationError::NewerThanThisRelease(ref versions) if versions == &[9_999]),
        "{refused}"
    );
    assert!(refused.to_string().contains("9999"), "{refused}");
    let refused = store.revert(1).await.expect_err("not reverted: its down script is not here");
    assert!(matches!(refused, MigrationError::NewerThanThisRelease(_)), "{refused}");
    let columns: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns WHERE column_name = 'newer_note'",
    )
    .fetch_one(&mut connection)
    .await
    .expect("count");
    assert_eq!(columns, 1, "nothing reverted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_database_a_newer_release_migrated_is_accepted_or_refused_as_asked() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("newer.db");
    let store = SqliteStore::open(&path).await.expect("open");
    store.migrate().await.expect("migrate");
    let mut newer: Vec<Migration> = migrator("sqlite").await.iter().cloned().collect();
    newer.push(newer_migration("ALTER TABLE executions ADD COLUMN newer_note TEXT"));
    let mut connection = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    Migrator::with_migrations(newer).run(&mut connection).await.expect("the newer release");

    let report = store.migrate().await.expect("accepted");
    assert_eq!(report, MigrationReport { applied: vec![], newer: vec![9_999] });
    let refused = store.migrate_with(NewerMigrations::Refuse).await.expect_err("refused");
    assert!(
        matches!(refused, MigrationError::NewerThanThisRelease(ref versions) if versions == &[9_999]),
        "{refused}"
    );
    let refused = store.revert(1).await.expect_err("not reverted: its down script is not here");
    assert!(matches!(refused, MigrationError::NewerThanThisRelease(_)), "{refused}");
}

/// The checksums (SHA-384 of the up script's text) that installations recorded in
/// `_sqlx_migrations` for the migrations released so far. An up script whose text changes no
/// longer matches, and those installations stop at start ("migration N was previously applied
/// but has been modified"): append a line per new migration, never edit one.
const RELEASED: &[(&str, i64, &str)] = &[
    (
        "postgres",
        1,
        "3cc2aa721d68b6a9802afff2e03b3eddd86e8326e5bb6ffd\
      a17c2e075a42345a5308c13d56c90a3f654362b7bc809814",
    ),
    (
        "postgres",
        2,
        "da7781b40583ffa174d971c44b208d090e40b1a5f37b9d16\
      ba870fd856063664507610bc57be4be33a3242594aadfe65",
    ),
    (
        "postgres",
        3,
        "acbf9974f1bfb8cee7b7d8c57ffc95de180ffa1615800ac2\
      34b164b19d1419136c7068f82d87ceae8716dfd0861dc729",
    ),
    (
        "postgres",
        4,
        "e3b35d59fa4f948855c07370af2173ea29a0ba2a0b829213\
      98f281bd23252419c1e4cce8439391886c76fef988026110",
    ),
    (
        "postgres",
        5,
        "d3daabce7530a8af9de83bb5c836183d0b7bdb9b257015ee\
      f1f5d49e7690d3e9bc61102739c776c107dd42a54460f1f9",
    ),
    (
        "postgres",
        6,
        "23af492bf2b106547623fd46dabd8c710a1bce3605f07a61\
      91536b904bb64fd62b6b7a2174671459dd0826fec16719bb",
    ),
    (
        "postgres",
        7,
        "2010b107f4b54856bde21c14f479ad4dba0aede57f95ad01\
      cdf1dbf4f68f3d7e8da16f7b15e0f748f83a9ae11e43e404",
    ),
    (
        "postgres",
        8,
        "94a2961fbe89c6d922bba51440f4011b4f3e142ed01b31e2\
      9e951e02c21f9ec15778ecc850de680fefda21b4296b0828",
    ),
    (
        "postgres",
        9,
        "3fc6688a2f54c815511f1e86a9d779a0fae4154227acdfd2\
      2e359caa093f9f55100bd84b5879630c68da09c74a3390bc",
    ),
    (
        "postgres",
        10,
        "34658f2d3e7536e2da3bed4c1ef7eb6f275cb36fff6144e3\
      caca3ec65e8bc54037c8b5eeffd1d401f0b7046636bd9691",
    ),
    (
        "postgres",
        11,
        "0556522606f28071216f7571e373bf4233b8c58807f7d653\
      7ef1743ffdfcfbf728c60afa53653b897e8bf4da871c844f",
    ),
    (
        "sqlite",
        1,
        "477ed46f428bbee793b00b2124a20394c052d258bdd9f1af\
      a0e2e593dfdebff747274d0e38d900f7d8a884de0a5169dc",
    ),
    (
        "sqlite",
        2,
        "b9cf0be4c9591e8f3ea62130834f24e06bae7ab454f267b3\
      1fc1dc0ac400d8dd39683fa286eac00c10742c8719829224",
    ),
    (
        "sqlite",
        3,
        "0d76ad72f9fd42c3fcafcd13eeeff3dcb79c8f60d1b45b29\
      8f0cc7c4540bb97f6f2059d70ab8bcd9eb52ace7210fadc4",
    ),
    (
        "sqlite",
        4,
        "cdb8577c3fae65f5bae4bb33a471357978b158d057cc7e88\
      3c0faa355830238c01ad805be2e032ad461c2a81eaf1cc42",
    ),
    (
        "sqlite",
        5,
        "7a13cdc1bbe132b506ffe44bb2eccda7aa9fe5999dfe0259\
      884fcfd9b1f43181205aa5ca1b609004bbe4b69088b1719c",
    ),
    (
        "sqlite",
        6,
        "d73ae57c868c179cfa00a86d2cdec61b8b203a27b56b6d11\
      aed6a02d8c154ce580665f810bb10b55b4f77b46b96df9a0",
    ),
    (
        "sqlite",
        7,
        "b1e7a2be0ff57c37e09c368b8cf44d0352cf36e8eb1aef20\
      6e81fd12362ab28f0dd9cc23b422574b7ec8f117560d303e",
    ),
    (
        "sqlite",
        8,
        "27f2fcf06881dc3f89a007326615e13e3402d8d64bf7375b\
      03bb735898d0c48b3a4b431be90533448f3eaa86bc943754",
    ),
    (
        "sqlite",
        9,
        "19d8d3401ec88fb1c88d2559d364ff599f0c8c7e003d96e0\
      88257efb658ed6be1499b59be3aebd128e0f8b92dc29291d",
    ),
    (
        "sqlite",
        10,
        "b441f10319accaa6b9c7f9a39177bb557b9700ebf001f3e6\
      60215781a0147fccf1d2357ad7a21b180c762f6f651cbc0d",
    ),
    (
        "sqlite",
        11,
        "052fe60470ff6c76340e45499afbcfb22e76652344145c05\
      c696718f5f8d843c84fdf6618626f0b6f667cee359837330",
    ),
    (
        "postgres",
        12,
        "b43f813fb384a109b8862d4c056196cee3f86e3a91300763\
      4bc7082f906b3be5c134e73c0940a541169df2ce479ec724",
    ),
    (
        "sqlite",
        12,
        "44bc988442b62bc25220c555ba0535c37ad83c87fb148f18\
      6fde379d0eb3d662cde70ae4c0aa1cd89eed03246a511c12",
    ),
    (
        "postgres",
        13,
        "a755d53814a3aeda82597db10ab9ca5e98195c11c6e7fa8c\
      edc090b6723edbf89cd4fe7ec1476ff756de126c72a14eab",
    ),
    (
        "sqlite",
        13,
        "2a0c6f2fdf2a3e6d9af1cac82a6b60facecd542920c22b49\
      8820c8c2611007622d90803b9dc9b22e3124774931df629e",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_up_scripts_keep_the_checksums_installations_recorded() {
    for backend in ["postgres", "sqlite"] {
        let migrator = migrator(backend).await;
        for (_, version, recorded) in RELEASED.iter().filter(|(name, _, _)| *name == backend) {
            let up = migrator
                .iter()
                .find(|migration| {
                    migration.version == *version && migration.migration_type.is_up_migration()
                })
                .unwrap_or_else(|| panic!("{backend} {version} is still there"));
            let checksum: String = up.checksum.iter().map(|byte| format!("{byte:02x}")).collect();
            assert_eq!(checksum, *recorded, "{backend} {version} as released");
        }
    }
}
