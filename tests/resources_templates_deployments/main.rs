//! Templates and deployments as a client meets them: the real `turbocat` binary, REST through
//! reqwest and gRPC through the generated clients, in `dev` (SQLite) and `serve` (PostgreSQL +
//! Redis).

#[path = "../support/mod.rs"]
mod support;

mod deployments;
mod templates;
mod triggers;

use std::sync::Arc;

use turbocat::store::Store;

use crate::support::api::{Account, Api, dev_store};
use crate::support::{ServeDatabase, TurbocatProcess, start_dev, start_serve};

/// A running server, its store opened next to it, and three accounts: an admin (the first
/// account) and two users.
pub struct Installation {
    pub api: Api,
    pub store: Arc<dyn Store>,
    pub admin: Account,
    pub ann: Account,
    pub bob: Account,
    _server: TurbocatProcess,
    _dev_data: Option<tempfile::TempDir>,
    _serve_database: Option<ServeDatabase>,
}

/// Users' cron schedules may fire every second here (the tests would wait a minute otherwise;
/// the default floor has its own test in the engine suite).
const EVERY_SECOND: [&str; 2] = ["--cron-min-interval-seconds", "1"];

impl Installation {
    /// `turbocat dev` on SQLite.
    pub async fn dev() -> Self {
        let (server, data_dir) = start_dev(&EVERY_SECOND);
        let store = dev_store(data_dir.path()).await;
        Self::with_accounts(server, store, Some(data_dir), None).await
    }

    /// `turbocat serve` on PostgreSQL and Redis.
    pub async fn serve() -> Self {
        let (server, database) = start_serve(&EVERY_SECOND).await;
        let store = turbocat::store::open(&database.url).await.expect("open the serve database");
        Self::with_accounts(server, store, None, Some(database)).await
    }

    async fn with_accounts(
        server: TurbocatProcess,
        store: Arc<dyn Store>,
        dev_data: Option<tempfile::TempDir>,
        serve_database: Option<ServeDatabase>,
    ) -> Self {
        let api = Api::new(&server);
        let admin = api.register("root@example.com", "Root").await;
        let ann = api.register("ann@example.com", "Ann").await;
        let bob = api.register("bob@example.com", "Bob").await;
        Self {
            api,
            store,
            admin,
            ann,
            bob,
            _server: server,
            _dev_data: dev_data,
            _serve_database: serve_database,
        }
    }

    pub fn user_id(account: &Account) -> uuid::Uuid {
        account.id.parse().expect("a user id")
    }
}
