//! The connections a store keeps out of its pool between clean uses (`store::connections`):
//! kept untested and taken again, given back to the pool after a failure or an abandoned
//! transaction (rolled back), shared with whoever waits for one, and replaced when broken.

use std::time::Duration;

use sqlx::Connection as _;
use turbocat::store::{PostgresStore, SqliteStore, Store as _};

async fn backend_pid(store: &PostgresStore) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(store.connections()).await
}

async fn postgres_store(max_connections: u32) -> (crate::support::TestDatabase, PostgresStore) {
    let database = crate::support::postgres().await;
    let store =
        PostgresStore::connect_with_timeout(&database.url, max_connections, Duration::from_secs(3))
            .await
            .expect("connect store");
    (database, store)
}

/// Waits (briefly) until the pool holds `idle` idle connections: the pool takes a connection
/// back on a task of its own, after its test.
async fn pool_idle_becomes(store: &PostgresStore, idle: usize) -> usize {
    for _ in 0..100 {
        if store.connections().pool().num_idle() == idle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.connections().pool().num_idle()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_connection_used_cleanly_is_kept_and_taken_again() {
    let (_database, store) = postgres_store(3).await;
    let first = backend_pid(&store).await.expect("first statement");
    // Kept here, not handed back to the pool (whose test would cost a round trip).
    assert_eq!(store.connections().kept(), 1);
    assert_eq!(store.connections().pool().num_idle(), 0);
    for _ in 0..5 {
        assert_eq!(backend_pid(&store).await.expect("statement"), first);
    }
    let transaction = store.connections().begin("BEGIN").await.expect("begin");
    transaction.commit().await.expect("commit");
    assert_eq!(backend_pid(&store).await.expect("statement"), first);
    let counts = store.pool_connections();
    assert_eq!((counts.open, counts.idle), (1, 1), "one connection, idle (kept)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_failed_statement_gives_its_connection_back_to_the_pool() {
    let (_database, store) = postgres_store(3).await;
    let pid = backend_pid(&store).await.expect("first statement");
    let failed = sqlx::query("SELECT 1 / 0").execute(store.connections()).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(store.connections().kept(), 0);
    assert_eq!(pool_idle_becomes(&store, 1).await, 1, "the pool tested it and took it back");
    // The pool's connection serves the next statement, and is kept after it.
    assert_eq!(backend_pid(&store).await.expect("statement"), pid);
    assert_eq!(store.connections().kept(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_abandoned_transaction_is_rolled_back() {
    let (_database, store) = postgres_store(1).await;
    sqlx::query("CREATE TABLE probe (n INTEGER)")
        .execute(store.connections())
        .await
        .expect("create table");
    {
        let mut transaction = store.connections().begin("BEGIN").await.expect("begin");
        sqlx::query("INSERT INTO probe VALUES (1)")
            .execute(&mut *transaction)
            .await
            .expect("insert");
        // Dropped open, as when a request is cancelled.
    }
    assert_eq!(store.connections().kept(), 0, "an open transaction's connection is not kept");
    let mut transaction = store.connections().begin("BEGIN").await.expect("begin");
    sqlx::query("INSERT INTO probe VALUES (2)").execute(&mut *transaction).await.expect("insert");
    transaction.commit().await.expect("commit");
    let rows: Vec<i32> = sqlx::query_scalar("SELECT n FROM probe ORDER BY n")
        .fetch_all(store.connections())
        .await
        .expect("rows");
    assert_eq!(rows, vec![2], "the abandoned insert was rolled back, the committed one kept");
    // `SAVEPOINT` is refused outside a transaction block.
    let savepoint = sqlx::raw_sql("SAVEPOINT probe").execute(store.connections()).await;
    let refused = savepoint.as_ref().err().and_then(|error| error.as_database_error());
    assert!(
        refused.is_some_and(|error| error.message().contains("transaction block")),
        "the kept connection is left inside a transaction: {savepoint:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_connection_serves_everyone_waiting_for_it() {
    // The pool never sees a kept connection come back, so whoever waits on the pool must be
    // woken by the keeping; otherwise every waiter times out (after 3 s here).
    let (_database, store) = postgres_store(1).await;
    let store = std::sync::Arc::new(store);
    let tasks = (0..8).map(|index| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut transaction = store.connections().begin("BEGIN").await?;
            let value: i32 = sqlx::query_scalar("SELECT $1::INTEGER FROM pg_sleep(0.02)")
                .bind(index)
                .fetch_one(&mut *transaction)
                .await?;
            transaction.commit().await?;
            Ok::<_, sqlx::Error>(value)
        })
    });
    let mut values = Vec::new();
    for task in futures::future::join_all(tasks).await {
        values.push(task.expect("task").expect("a transaction waiting for the one connection"));
    }
    values.sort_unstable();
    assert_eq!(values, (0..8).collect::<Vec<_>>());
    assert_eq!(store.pool_connections().open, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_busy_statements_reuse_the_same_few_connections() {
    // Waves of concurrent statements, more than the pool holds: every one is served by one of
    // at most `max_connections` backends, none opened and closed again along the way.
    let (_database, store) = postgres_store(4).await;
    let store = std::sync::Arc::new(store);
    let mut backends = std::collections::HashSet::new();
    for _ in 0..10 {
        let statements = (0..24).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid() FROM pg_sleep(0.002)")
                    .fetch_one(store.connections())
                    .await
            })
        });
        for statement in futures::future::join_all(statements).await {
            backends.insert(statement.expect("task").expect("statement"));
        }
    }
    assert!(backends.len() <= 4, "{} backends served the statements", backends.len());
    assert!(store.pool_connections().open <= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_kept_connection_that_broke_is_replaced() {
    let (_database, store) = postgres_store(2).await;
    let pid = backend_pid(&store).await.expect("first statement");
    assert_eq!(store.connections().kept(), 1);
    let mut admin =
        sqlx::PgConnection::connect(&crate::support::admin_database_url()).await.expect("admin");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .expect("terminate");
    assert!(terminated);
    // The statement that meets the broken connection fails (as with any pooled connection
    // that broke while idle); the connection is not kept, and the next statement gets a new one.
    let met = backend_pid(&store).await;
    assert!(met.is_err(), "the broken connection answered: {met:?}");
    assert_eq!(store.connections().kept(), 0);
    let replaced = backend_pid(&store).await.expect("a new connection");
    assert_ne!(replaced, pid);
    store.ping().await.expect("the store is usable again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_abandoned_transaction_is_rolled_back_and_a_committed_one_kept() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let store = SqliteStore::open(&directory.path().join("turbocat.db")).await.expect("open");
    sqlx::query("CREATE TABLE probe (n INTEGER)")
        .execute(store.connections())
        .await
        .expect("create table");
    {
        let mut transaction = store.connections().begin("BEGIN IMMEDIATE").await.expect("begin");
        sqlx::query("INSERT INTO probe VALUES (1)")
            .execute(&mut *transaction)
            .await
            .expect("insert");
    }
    let mut transaction = store.connections().begin("BEGIN IMMEDIATE").await.expect("begin");
    sqlx::query("INSERT INTO probe VALUES (2)").execute(&mut *transaction).await.expect("insert");
    transaction.commit().await.expect("commit");
    assert!(store.connections().kept() >= 1, "the committed transaction's connection is kept");
    let rows: Vec<i32> = sqlx::query_scalar("SELECT n FROM probe ORDER BY n")
        .fetch_all(store.connections())
        .await
        .expect("rows");
    assert_eq!(rows, vec![2]);
}
