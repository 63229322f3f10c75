//! Shared test harness: fresh real databases for every test.
//!
//! PostgreSQL tests get a brand-new database on the server named by `TURBOCAT_TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), migrated, and dropped when the guard goes
//! out of scope. SQLite tests get a fresh file in a temporary directory.
#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::sync::Arc;

use sqlx::Connection;
use turbocat::store::{PostgresStore, SqliteStore, Store};

pub fn admin_database_url() -> String {
    std::env::var("TURBOCAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database (or file) that lives as long as this guard.
pub struct TestDatabase {
    pub store: Arc<dyn Store>,
    pub url: String,
    postgres_name: Option<String>,
    _directory: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}

/// Creates an empty PostgreSQL database and returns its URL and name, unmigrated.
pub async fn create_postgres_database() -> (String, String) {
    let admin_url = admin_database_url();
    let name = format!("turbocat_test_{}", uuid::Uuid::new_v4().simple());
    let mut connection =
        sqlx::PgConnection::connect(&admin_url).await.expect("connect to postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("create test database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_owned()).expect("url has a path");
    (format!("{base}/{name}"), name)
}

pub async fn postgres() -> TestDatabase {
    let (url, name) = create_postgres_database().await;
    let store = PostgresStore::connect(&url, 5).await.expect("connect test database");
    store.migrate().await.expect("migrate test database");
    TestDatabase { store: Arc::new(store), url, postgres_name: Some(name), _directory: None }
}

pub async fn sqlite() -> TestDatabase {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("turbocat.db");
    let store = SqliteStore::open(&path).await.expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    TestDatabase {
        store: Arc::new(store),
        url: format!("sqlite://{}", path.display()),
        postgres_name: None,
        _directory: Some(directory),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else { return };
        // Drop runs outside any async context guarantee: use a throwaway runtime on a thread.
        let admin_url = admin_database_url();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::PgConnection::connect(&admin_url).await {
                        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                            .execute(&mut connection)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Instantiates each named `async fn(Arc<dyn Store>)` once per backend:
/// `conformance!(user_crud, api_key_lifecycle);` makes `postgres::user_crud` and `sqlite::user_crud`.
#[macro_export]
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let database = $crate::support::postgres().await;
                    super::$test(database.store()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let database = $crate::support::sqlite().await;
                    super::$test(database.store()).await;
                }
            )*
        }
    };
}
