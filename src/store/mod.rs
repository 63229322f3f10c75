//! Persistence: the `Store` trait, source of truth for users, resources, executions and the
//! audit trail, with one PostgreSQL and one SQLite implementation. May call: sqlx. Knows nothing
//! of proto, HTTP, the queue or the engine.
//!
//! `group_commit` batches writes of one kind that arrive together (the engine's step
//! transitions, the audit trail's rows) into one statement; it also uses tokio. `batch` binds
//! the rows of such a statement, differently on each backend, so that it takes a few texts
//! (not one per number of rows) and each connection prepares it once per text.
//! `connections` is what every statement runs on: the pool's connections, kept out of it
//! between clean uses so that the pool does not ping each one it takes back; it also uses
//! tokio.
//!
//! Each area (`identity`, `resources`, `executions`, `analytics`, `alerts`) owns its model types, its
//! sub-trait and one `macro_rules!` body that is instantiated for both backends, so the two
//! implementations cannot drift apart. Where the SQL dialects differ, the body asks the `Dialect` trait, which both
//! stores implement here; shapes every area shares (a numbered list: visibility, count, page)
//! are generic functions here too. Timestamps are made in Rust (`Utc::now()`), never by the
//! database, so both backends store and order them identically.

/// Defines a TEXT-backed enum with `as_str`, `FromStr`, `Display`, serde (as its text) and sqlx
/// Type/Encode/Decode for every database whose `str` is a type.
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$variant_meta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::store::UnknownEnumValue;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::store::UnknownEnumValue { enum_name: stringify!($name), value: text.to_owned() }),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <String as serde::Deserialize>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl<Db: sqlx::Database> sqlx::Type<Db> for $name
        where
            str: sqlx::Type<Db>,
        {
            fn type_info() -> Db::TypeInfo {
                <str as sqlx::Type<Db>>::type_info()
            }

            fn compatible(type_info: &Db::TypeInfo) -> bool {
                <str as sqlx::Type<Db>>::compatible(type_info)
            }
        }

        impl sqlx::postgres::PgHasArrayType for $name {
            fn array_type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::postgres::PgHasArrayType>::array_type_info()
            }

            fn array_compatible(type_info: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::postgres::PgHasArrayType>::array_compatible(type_info)
            }
        }

        impl<'query, Db: sqlx::Database> sqlx::Encode<'query, Db> for $name
        where
            for<'text> &'text str: sqlx::Encode<'query, Db>,
        {
            fn encode_by_ref(
                &self,
                buffer: &mut <Db as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'query, Db>>::encode_by_ref(&self.as_str(), buffer)
            }
        }

        impl<'row, Db: sqlx::Database> sqlx::Decode<'row, Db> for $name
        where
            &'row str: sqlx::Decode<'row, Db>,
        {
            fn decode(
                value: <Db as sqlx::Database>::ValueRef<'row>,
            ) -> Result<Self, sqlx::error::BoxDynError> {
                let text = <&'row str as sqlx::Decode<'row, Db>>::decode(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}

mod alerts;
mod analytics;
mod batch;
pub mod connections;
mod executions;
pub mod group_commit;
mod identity;
mod resources;
mod totals;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub use alerts::*;
pub use analytics::*;
use connections::Connections;
pub use executions::*;
pub use identity::*;
pub use resources::*;
pub use totals::KEPT_FOR as LIST_TOTALS_KEPT_FOR;
use totals::{CountKey, ListTotals, Listed};

static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Where sqlx records the applied migrations (version, description, checksum of the up script).
const MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// One migration: its version and what it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationEntry {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for MigrationEntry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:04} {}", self.version, self.description)
    }
}

/// What migrating found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The migrations applied now, oldest first.
    pub applied: Vec<MigrationEntry>,
    /// Versions the database has applied that this release does not know: a newer release
    /// migrated it (expand/contract: what it added, an older release can run beside).
    pub newer: Vec<i64>,
}

/// Whether migrating accepts a database that a newer release has migrated further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewerMigrations {
    /// Apply what this release knows and report the newer ones (`dev`, `serve`: an older
    /// replica keeps running during a rolling upgrade, and a rolled-back release starts).
    Accept,
    /// Change nothing and fail naming them (`turbocat migrate` without `--allow-newer`).
    Refuse,
}

/// Why migrating (or reverting) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the database has migrations this release does not know ({}): a newer release migrated it",
        versions_text(.0)
    )]
    NewerThanThisRelease(Vec<i64>),
    #[error("migration {0:04} has no down script")]
    NotReversible(i64),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn versions_text(versions: &[i64]) -> String {
    versions.iter().map(|version| format!("{version:04}")).collect::<Vec<_>>().join(", ")
}

impl From<MigrationError> for StoreError {
    fn from(error: MigrationError) -> Self {
        match error {
            MigrationError::Migrate(error) => {
                StoreError::Database(sqlx::Error::Migrate(error.into()))
            }
            MigrationError::Database(error) => StoreError::from(error),
            other => StoreError::Database(sqlx::Error::Configuration(other.into())),
        }
    }
}

/// Applies the up scripts of `migrator` that the database lacks, oldest first, under the
/// migration lock, after checking that the applied ones are unchanged (their checksums).
/// sqlx's `Migrator::run`, with the newer versions reported (or refused) instead of failing.
async fn apply_migrations<C: Migrate + Send>(
    migrator: &Migrator,
    connection: &mut C,
    newer: NewerMigrations,
) -> Result<MigrationReport, MigrationError> {
    connection.lock().await?;
    let outcome = apply_migrations_locked(migrator, connection, newer).await;
    let unlocked = connection.unlock().await;
    let report = outcome?;
    unlocked?;
    Ok(report)
}

async fn apply_migrations_locked<C: Migrate + Send>(
    migrator: &Migrator,
    connection: &mut C,
    newer: NewerMigrations,
) -> Result<MigrationReport, MigrationError> {
    connection.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    if let Some(version) = connection.dirty_version(MIGRATIONS_TABLE).await? {
        return Err(MigrateError::Dirty(version).into());
    }
    let applied = connection.list_applied_migrations(MIGRATIONS_TABLE).await?;
    let newer_versions = newer_than(migrator, applied.iter().map(|migration| migration.version));
    if newer == NewerMigrations::Refuse && !newer_versions.is_empty() {
        return Err(MigrationError::NewerThanThisRelease(newer_versions));
    }
    let mut report = MigrationReport { applied: Vec::new(), newer: newer_versions };
    for migration in migrator.iter().filter(|migration| migration.migration_type.is_up_migration())
    {
        match applied.iter().find(|applied| applied.version == migration.version) {
            Some(applied) if applied.checksum != migration.checksum => {
                return Err(MigrateError::VersionMismatch(migration.version).into());
            }
            Some(_) => {}
            None => {
                connection.apply(MIGRATIONS_TABLE, migration).await?;
                report.applied.push(MigrationEntry {
                    version: migration.version,
                    description: migration.description.to_string(),
                });
            }
        }
    }
    Ok(report)
}

/// Reverts the newest `count` applied migrations (all of them, if fewer are applied), newest
/// first, each with its down script in one transaction with its bookkeeping, under the
/// migration lock. Refuses a database with migrations this release does not know: only the
/// release that applied them has their down scripts.
async fn revert_migrations<C: Migrate + Send>(
    migrator: &Migrator,
    connection: &mut C,
    count: usize,
) -> Result<Vec<MigrationEntry>, MigrationError> {
    connection.lock().await?;
    let outcome = revert_migrations_locked(migrator, connection, count).await;
    let unlocked = connection.unlock().await;
    let reverted = outcome?;
    unlocked?;
    Ok(reverted)
}

async fn revert_migrations_locked<C: Migrate + Send>(
    migrator: &Migrator,
    connection: &mut C,
    count: usize,
) -> Result<Vec<MigrationEntry>, MigrationError> {
    connection.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    if let Some(version) = connection.dirty_version(MIGRATIONS_TABLE).await? {
        return Err(MigrateError::Dirty(version).into());
    }
    let mut applied: Vec<i64> = connection
        .list_applied_migrations(MIGRATIONS_TABLE)
        .await?
        .into_iter()
        .map(|migration| migration.version)
        .collect();
    let newer_versions = newer_than(migrator, applied.iter().copied());
    if !newer_versions.is_empty() {
        return Err(MigrationError::NewerThanThisRelease(newer_versions));
    }
    applied.sort_unstable();
    let mut reverted = Vec::new();
    for version in applied.into_iter().rev().take(count) {
        let down = migrator
            .iter()
            .find(|migration| {
                migration.version == version && migration.migration_type.is_down_migration()
            })
            .ok_or(MigrationError::NotReversible(version))?;
        connection.revert(MIGRATIONS_TABLE, down).await?;
        reverted.push(MigrationEntry { version, description: down.description.to_string() });
    }
    Ok(reverted)
}

/// The `applied` versions `migrator` does not know, in order.
fn newer_than(migrator: &Migrator, applied: impl Iterator<Item = i64>) -> Vec<i64> {
    let mut newer: Vec<i64> =
        applied.filter(|version| !migrator.version_exists(*version)).collect();
    newer.sort_unstable();
    newer
}

/// Every failure a store operation can report. Database errors stay opaque to callers: the
/// service layer logs them and answers a generic internal error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// Optimistic locking failed: the row exists but has moved on to `current_version`.
    #[error("version conflict, current version is {current_version}")]
    VersionConflict { current_version: i64 },
    /// A unique constraint refused the row; the payload names what was duplicated.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// A foreign key refused the change (a referenced row is missing, or a row is still in use).
    #[error("reference violated: {0}")]
    ReferenceViolated(String),
    /// The row is still used by the live rows listed (id and name), so it cannot be removed.
    #[error("in use by {} other resources", by.len())]
    InUse { by: Vec<(uuid::Uuid, String)> },
    /// A list cursor that this store did not hand out (or that was altered).
    #[error("invalid cursor")]
    InvalidCursor,
    /// The database refused a value (a check constraint, or text it cannot store such as a NUL
    /// character): bad input that validation did not catch, never a server fault.
    #[error("value refused: {0}")]
    ValueRefused(String),
    /// A claim (a cron tick: `CronRunClaim`) was won by another claimant first, or what it
    /// claims is no longer there to claim; nothing was written.
    #[error("claimed by another")]
    ClaimTaken,
    #[error("database error")]
    Database(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        if matches!(error, sqlx::Error::RowNotFound) {
            return StoreError::NotFound;
        }
        if let Some(database_error) = error.as_database_error() {
            let constraint = database_error
                .constraint()
                .map(str::to_owned)
                .unwrap_or_else(|| database_error.message().to_owned());
            match database_error.kind() {
                sqlx::error::ErrorKind::UniqueViolation => {
                    return StoreError::AlreadyExists(constraint);
                }
                sqlx::error::ErrorKind::ForeignKeyViolation => {
                    return StoreError::ReferenceViolated(constraint);
                }
                sqlx::error::ErrorKind::CheckViolation => {
                    return StoreError::ValueRefused(constraint);
                }
                _ => {}
            }
            // PostgreSQL: text it cannot store (NUL, bad encoding).
            if matches!(database_error.code().as_deref(), Some("22021" | "22P05" | "22P02")) {
                return StoreError::ValueRefused(database_error.message().to_owned());
            }
        }
        StoreError::Database(error)
    }
}

impl StoreError {
    /// Whether the database could not be reached (no connection within the pool's acquire
    /// timeout, a connection that broke, the pool closed): a passing outage, not a fault of
    /// the request, which is worth trying again.
    pub fn is_unavailable(&self) -> bool {
        let StoreError::Database(error) = self else { return false };
        match error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL going down: admin shutdown, crash shutdown, cannot connect now, and
            // the connection exceptions (class 08).
            sqlx::Error::Database(database_error) => database_error.code().is_some_and(|code| {
                matches!(&*code, "57P01" | "57P02" | "57P03") || code.starts_with("08")
            }),
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A stored enum column held a value this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {enum_name} value {value:?}")]
pub struct UnknownEnumValue {
    pub enum_name: &'static str,
    pub value: String,
}

/// One page of a numbered-page list: `page` counts from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub page: u32,
    pub page_size: u32,
}

impl PageRequest {
    pub const DEFAULT_PAGE_SIZE: u32 = 20;
    pub const MAX_PAGE_SIZE: u32 = 100;

    pub fn new(page: u32, page_size: u32) -> Self {
        debug_assert!(page >= 1, "pages count from 1");
        debug_assert!((1..=Self::MAX_PAGE_SIZE).contains(&page_size));
        Self { page, page_size }
    }

    pub fn limit(&self) -> i64 {
        i64::from(self.page_size)
    }

    pub fn offset(&self) -> i64 {
        i64::from(self.page.saturating_sub(1)) * i64::from(self.page_size)
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self { page: 1, page_size: Self::DEFAULT_PAGE_SIZE }
    }
}

/// A page of rows and the total number of rows that match the filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
}

/// A sort key from a resource's allowlist, ascending unless `descending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortOrder<F> {
    pub field: F,
    pub descending: bool,
}

/// A sort key of a numbered list, as the store orders by it.
pub(crate) trait SortField: Copy {
    /// The order of a list whose caller names none.
    const DEFAULT_ORDER: SortOrder<Self>;

    /// The SQL expression the key orders by.
    fn expression(self) -> &'static str;
}

/// The order `sort` asks for (the key's default when `None`), as SQL.
pub(crate) fn sql_order<F: SortField>(sort: Option<SortOrder<F>>) -> SortOrder<&'static str> {
    let order = sort.unwrap_or(F::DEFAULT_ORDER);
    SortOrder { field: order.field.expression(), descending: order.descending }
}

/// A page of a cursor-paged list (executions, logs): constant cost however deep.
/// `next_cursor` is opaque to callers and `None` on the last page.
#[derive(Debug, Clone, PartialEq)]
pub struct CursorPage<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Whose rows a query may see: one owner's, or everyone's (an admin).
/// A row outside the scope behaves exactly like a missing row (`StoreError::NotFound`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerScope {
    All,
    Owner(uuid::Uuid),
}

impl OwnerScope {
    /// The owner id to filter on, or `None` when every owner is visible.
    pub fn owner_id(self) -> Option<uuid::Uuid> {
        match self {
            OwnerScope::All => None,
            OwnerScope::Owner(owner_id) => Some(owner_id),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// The whole persistence seam. Services hold an `Arc<dyn Store>`.
#[async_trait]
pub trait Store:
    IdentityStore + ResourceStore + ExecutionStore + AnalyticsStore + AlertStore + Send + Sync + 'static
{
    fn backend(&self) -> Backend;

    /// A round trip to the database, for health checks.
    async fn ping(&self) -> StoreResult<()>;

    /// The connections the pool holds now, for the metrics.
    fn pool_connections(&self) -> PoolConnections;
}

/// Open connections of a store's pool and how many of them are idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConnections {
    pub open: u32,
    pub idle: u32,
}

/// PostgreSQL: the source of truth in `serve` mode.
#[derive(Clone)]
pub struct PostgresStore {
    /// Every statement runs on these (see `connections`).
    connections: Connections<sqlx::Postgres>,
    /// The database's kept list totals (see `totals`).
    totals: Arc<ListTotals>,
}

/// The connections of a SQLite store's pool.
const SQLITE_CONNECTIONS: u32 = 8;

/// SQLite in WAL mode: the embedded default of `turbocat dev`.
#[derive(Clone)]
pub struct SqliteStore {
    /// Every statement runs on these (see `connections`).
    connections: Connections<sqlx::Sqlite>,
    /// The database's kept list totals (see `totals`).
    totals: Arc<ListTotals>,
}

impl PostgresStore {
    /// Connects without migrating (waiting up to 5 s for a connection); `migrate` applies the
    /// embedded migrations.
    pub async fn connect(database_url: &str, max_connections: u32) -> StoreResult<Self> {
        Self::connect_with_timeout(database_url, max_connections, Duration::from_secs(5)).await
    }

    /// `connect`, where a query waits at most `acquire_timeout` for a connection (opening one
    /// included): with the database away, callers learn it within that time
    /// (`StoreError::is_unavailable`) instead of hanging.
    pub async fn connect_with_timeout(
        database_url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(database_url)?;
        let totals = ListTotals::of_database(&format!(
            "postgres://{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or_default()
        ));
        // No ping before each checkout (a round trip per query): a connection that broke is
        // closed by the error of the query that met it, and the pool opens a new one.
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        let connections = Connections::new(pool, max_connections as usize);
        Ok(Self { connections, totals })
    }

    /// Applies the embedded migrations the database lacks, accepting newer ones (reported).
    pub async fn migrate(&self) -> Result<MigrationReport, MigrationError> {
        self.migrate_with(NewerMigrations::Accept).await
    }

    /// Applies the embedded migrations the database lacks.
    pub async fn migrate_with(
        &self,
        newer: NewerMigrations,
    ) -> Result<MigrationReport, MigrationError> {
        let mut connection = self.connections.acquire().await?;
        apply_migrations(&POSTGRES_MIGRATOR, &mut *connection, newer).await
    }

    /// Reverts the newest `count` applied migrations with their down scripts, newest first.
    pub async fn revert(&self, count: usize) -> Result<Vec<MigrationEntry>, MigrationError> {
        let mut connection = self.connections.acquire().await?;
        revert_migrations(&POSTGRES_MIGRATOR, &mut *connection, count).await
    }

    /// The connections the store's statements run on (an executor, as a pool is).
    pub fn connections(&self) -> &Connections<sqlx::Postgres> {
        &self.connections
    }

    /// Closes the store's connections.
    pub async fn close(&self) {
        self.connections.close().await;
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` in WAL mode with foreign keys on.
    pub async fn open(path: &std::path::Path) -> StoreResult<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let totals = ListTotals::of_database(&format!(
            "sqlite://{}",
            std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()).display()
        ));
        let pool = SqlitePoolOptions::new()
            .max_connections(SQLITE_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        let connections = Connections::new(pool, SQLITE_CONNECTIONS as usize);
        Ok(Self { connections, totals })
    }

    /// Applies the embedded migrations the database lacks, accepting newer ones (reported).
    pub async fn migrate(&self) -> Result<MigrationReport, MigrationError> {
        self.migrate_with(NewerMigrations::Accept).await
    }

    /// Applies the embedded migrations the database lacks.
    pub async fn migrate_with(
        &self,
        newer: NewerMigrations,
    ) -> Result<MigrationReport, MigrationError> {
        let mut connection = self.connections.acquire().await?;
        apply_migrations(&SQLITE_MIGRATOR, &mut *connection, newer).await
    }

    /// Reverts the newest `count` applied migrations with their down scripts, newest first.
    pub async fn revert(&self, count: usize) -> Result<Vec<MigrationEntry>, MigrationError> {
        let mut connection = self.connections.acquire().await?;
        revert_migrations(&SQLITE_MIGRATOR, &mut *connection, count).await
    }

    /// The connections the store's statements run on (an executor, as a pool is).
    pub fn connections(&self) -> &Connections<sqlx::Sqlite> {
        &self.connections
    }

    /// Closes the store's connections.
    pub async fn close(&self) {
        self.connections.close().await;
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.connections).await?;
        Ok(())
    }

    fn pool_connections(&self) -> PoolConnections {
        pool_connections(&self.connections)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.connections).await?;
        Ok(())
    }

    fn pool_connections(&self) -> PoolConnections {
        pool_connections(&self.connections)
    }
}

/// Opens the store a database URL names (`postgres://…` or `sqlite://path`), migrated.
pub async fn open(database_url: &str) -> StoreResult<Arc<dyn Store>> {
    if let Some(path) = database_url.strip_prefix("sqlite://") {
        let store = SqliteStore::open(std::path::Path::new(path)).await?;
        store.migrate().await?;
        return Ok(Arc::new(store));
    }
    let store = PostgresStore::connect(database_url, 20).await?;
    store.migrate().await?;
    Ok(Arc::new(store))
}

/// Escapes `%`, `_` and `\` so user text can sit inside a `LIKE … ESCAPE '\'` pattern.
pub(crate) fn like_pattern(search: &str) -> String {
    let mut pattern = String::with_capacity(search.len() + 2);
    pattern.push('%');
    for character in search.to_lowercase().chars() {
        if matches!(character, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(character);
    }
    pattern.push('%');
    pattern
}

/// The pool's open connections, and how many of them are idle (in the pool or kept).
fn pool_connections<DB: sqlx::Database>(connections: &Connections<DB>) -> PoolConnections {
    PoolConnections {
        open: connections.pool().size(),
        idle: u32::try_from(connections.idle()).unwrap_or(u32::MAX),
    }
}

// ---------------------------------------------------------------------------------------------
// The dialect seam
// ---------------------------------------------------------------------------------------------

/// Everything that differs between the SQL of PostgreSQL and SQLite, in one place. Each area's
/// `macro_rules!` body is written once and calls these as `<$store as Dialect>::…` (or as
/// methods) where the backends cannot share a statement; no other code branches on the backend.
/// A transaction that owns its pooled connection.
type Transaction<Database> = connections::Transaction<Database>;

pub(crate) trait Dialect {
    type Database: sqlx::Database;

    /// Starts a transaction that will write after reading.
    const BEGIN_WRITE_TRANSACTION: &'static str;

    /// Starts a read-only transaction whose statements all see one snapshot.
    const BEGIN_SNAPSHOT_READ: &'static str;

    /// Appended to a `SELECT` to hold rows against a concurrent soft delete until commit.
    const SHARE_ROW_LOCK: &'static str;

    /// Appended to a `SELECT` to hold rows against any concurrent write until commit.
    const UPDATE_ROW_LOCK: &'static str;

    /// `$1` agent id: a live agent's status, its row locked until commit (the write lock of
    /// `BEGIN_WRITE_TRANSACTION` does that on SQLite).
    const LOCK_AGENT_STATUS: &'static str;

    /// `$1` lock key: serialises user creations that depend on the user count, until the
    /// transaction ends; `None` where `BEGIN_WRITE_TRANSACTION` already serialises every writer.
    const LOCK_USER_CREATION: Option<&'static str>;

    /// The wall-clock seconds from `started_at` to `finished_at` of an execution row.
    const EXECUTION_DURATION_SECONDS: &'static str;

    /// Whether several writes can share one statement, `WITH done AS (UPDATE …) UPDATE …`
    /// (PostgreSQL's data-modifying `WITH`; SQLite has none, and prepares and runs statements
    /// in process, so a transaction of several costs it no round trips).
    const DATA_MODIFYING_WITH: bool;

    /// The connections every statement of the store runs on.
    fn connections(&self) -> &Connections<Self::Database>;

    /// ` AND <the row's tags contain tag>`.
    fn push_tag_filter(builder: &mut sqlx::QueryBuilder<Self::Database>, tag: &str);

    /// ` AND <(created_at, id) before the cursor position>`: the rows after a page of a
    /// newest-first list ordered by `created_at DESC, id DESC`.
    fn push_before_cursor(
        builder: &mut sqlx::QueryBuilder<Self::Database>,
        created_at: chrono::DateTime<chrono::Utc>,
        id: uuid::Uuid,
    );

    /// A transaction begun with `BEGIN_WRITE_TRANSACTION`.
    fn begin_write_transaction(
        &self,
    ) -> impl Future<Output = Result<Transaction<Self::Database>, sqlx::Error>> + Send {
        self.connections().begin(Self::BEGIN_WRITE_TRANSACTION)
    }

    /// A transaction begun with `BEGIN_SNAPSHOT_READ`.
    fn begin_snapshot_read(
        &self,
    ) -> impl Future<Output = Result<Transaction<Self::Database>, sqlx::Error>> + Send {
        self.connections().begin(Self::BEGIN_SNAPSHOT_READ)
    }
}

impl Dialect for PostgresStore {
    type Database = sqlx::Postgres;

    // Row locks do the serialising on PostgreSQL.
    const BEGIN_WRITE_TRANSACTION: &'static str = "BEGIN";

    const BEGIN_SNAPSHOT_READ: &'static str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";

    // Conflicts with the row lock an UPDATE takes, so a step that references an agent and the
    // agent's soft delete serialise: whichever commits second sees the first.
    const SHARE_ROW_LOCK: &'static str = " FOR SHARE";

    const UPDATE_ROW_LOCK: &'static str = " FOR UPDATE";

    const LOCK_AGENT_STATUS: &'static str =
        "SELECT status FROM agents WHERE id = $1 AND deleted_at IS NULL FOR UPDATE";

    const LOCK_USER_CREATION: Option<&'static str> = Some("SELECT pg_advisory_xact_lock($1)");

    const EXECUTION_DURATION_SECONDS: &'static str =
        "EXTRACT(EPOCH FROM (finished_at - started_at))::DOUBLE PRECISION";

    const DATA_MODIFYING_WITH: bool = true;

    fn connections(&self) -> &Connections<sqlx::Postgres> {
        &self.connections
    }

    fn push_tag_filter(builder: &mut sqlx::QueryBuilder<sqlx::Postgres>, tag: &str) {
        // `@>` is served by the GIN (jsonb_path_ops) index on tags.
        builder.push(" AND tags @> ").push_bind(sqlx::types::Json(vec![tag.to_owned()]));
    }

    fn push_before_cursor(
        builder: &mut sqlx::QueryBuilder<sqlx::Postgres>,
        created_at: chrono::DateTime<chrono::Utc>,
        id: uuid::Uuid,
    ) {
        // A row comparison PostgreSQL turns into an index bound.
        builder.push(" AND (created_at, id) < (");
        builder.push_bind(created_at);
        builder.push(", ");
        builder.push_bind(id);
        builder.push(")");
    }
}

impl Dialect for SqliteStore {
    type Database = sqlx::Sqlite;

    // Takes the database write lock up front, so a read-then-write transaction never fails
    // halfway with a busy snapshot, and writers are serialised (no row locks needed).
    const BEGIN_WRITE_TRANSACTION: &'static str = "BEGIN IMMEDIATE";

    // The reads of one SQLite transaction see one snapshot.
    const BEGIN_SNAPSHOT_READ: &'static str = "BEGIN";

    const SHARE_ROW_LOCK: &'static str = "";

    const UPDATE_ROW_LOCK: &'static str = "";

    const LOCK_AGENT_STATUS: &'static str =
        "SELECT status FROM agents WHERE id = $1 AND deleted_at IS NULL";

    const LOCK_USER_CREATION: Option<&'static str> = None;

    const EXECUTION_DURATION_SECONDS: &'static str =
        "((julianday(finished_at) - julianday(started_at)) * 86400.0)";

    const DATA_MODIFYING_WITH: bool = false;

    fn connections(&self) -> &Connections<sqlx::Sqlite> {
        &self.connections
    }

    fn push_tag_filter(builder: &mut sqlx::QueryBuilder<sqlx::Sqlite>, tag: &str) {
        builder
            .push(" AND EXISTS (SELECT 1 FROM json_each(tags) WHERE json_each.value = ")
            .push_bind(tag.to_owned())
            .push(")");
    }

    fn push_before_cursor(
        builder: &mut sqlx::QueryBuilder<sqlx::Sqlite>,
        created_at: chrono::DateTime<chrono::Utc>,
        id: uuid::Uuid,
    ) {
        // Spelled without row values; the redundant `created_at <=` bound lets SQLite seek the
        // `(created_at, id)` index instead of scanning from the newest row.
        builder.push(" AND created_at <= ");
        builder.push_bind(created_at);
        builder.push(" AND (created_at < ");
        builder.push_bind(created_at);
        builder.push(" OR (created_at = ");
        builder.push_bind(created_at);
        builder.push(" AND id < ");
        builder.push_bind(id);
        builder.push("))");
    }
}

// ---------------------------------------------------------------------------------------------
// The shape every numbered list shares
// ---------------------------------------------------------------------------------------------

/// One numbered-page list: the rows of one table that the list's conditions keep, counted, then
/// read one page at a time in `order`. Both statements are static SQL that the conditions
/// continue (`SELECT COUNT(*) FROM agents` / `SELECT <columns> FROM agents`).
pub(crate) struct PagedList {
    /// Which rows the total counts, when it may be kept (see `totals`); `None` counts on every
    /// request.
    pub counted: Option<CountKey>,
    pub count_statement: &'static str,
    pub rows_statement: &'static str,
    /// The sort expression and its direction (see `sql_order`); `id` in the same direction
    /// breaks ties, so pages are stable.
    pub order: SortOrder<&'static str>,
    pub page: PageRequest,
}

/// Reads the requested page of the rows a list keeps, and their total: from the page itself
/// when it is the last, else the one kept in `totals` when it agrees with the page, else
/// counted (and kept). `push_conditions` appends the visibility check (see
/// `push_visible_rows`) and the filters to both statements.
pub(crate) async fn fetch_page<Database, Row>(
    connections: &Connections<Database>,
    totals: &ListTotals,
    list: PagedList,
    push_conditions: impl Fn(&mut sqlx::QueryBuilder<Database>),
) -> StoreResult<Page<Row>>
where
    Database: sqlx::Database,
    Database::Arguments: sqlx::IntoArguments<Database>,
    for<'connection> &'connection mut Database::Connection:
        sqlx::Executor<'connection, Database = Database>,
    for<'query> i64: sqlx::Encode<'query, Database> + sqlx::Type<Database>,
    (i64,): for<'row> sqlx::FromRow<'row, Database::Row>,
    Row: for<'row> sqlx::FromRow<'row, Database::Row> + Send + Unpin,
{
    let generation = list.counted.as_ref().map(|key| totals.generation(key.table()));
    let mut rows_query = sqlx::QueryBuilder::<Database>::new(list.rows_statement);
    push_conditions(&mut rows_query);
    let direction = if list.order.descending { "DESC" } else { "ASC" };
    rows_query.push(format_args!(" ORDER BY {} {direction}, id {direction}", list.order.field));
    let (limit, offset) = (list.page.limit(), list.page.offset());
    rows_query.push(" LIMIT ").push_bind(limit);
    rows_query.push(" OFFSET ").push_bind(offset);
    let items = rows_query.build_query_as::<Row>().fetch_all(connections).await?;

    let shown = i64::try_from(items.len()).unwrap_or(i64::MAX);
    // A page that is not full is the list's last: its rows say the total (an empty one only
    // on the first page), and nothing is counted.
    if shown < limit && (shown > 0 || offset == 0) {
        let total = offset + shown;
        if let (Some(key), Some(generation)) = (list.counted, generation) {
            totals.keep(key, generation, total);
        }
        return Ok(Page { items, total });
    }
    // A kept total is used only if it agrees with the page: at least its rows, or (past the
    // end) at most its offset.
    let kept = list
        .counted
        .as_ref()
        .and_then(|key| totals.get(key))
        .filter(|&kept| if shown > 0 { kept >= offset + shown } else { kept <= offset });
    let total = match kept {
        Some(total) => total,
        None => {
            let mut count_query = sqlx::QueryBuilder::<Database>::new(list.count_statement);
            push_conditions(&mut count_query);
            let total: i64 = count_query.build_query_scalar().fetch_one(connections).await?;
            if let (Some(key), Some(generation)) = (list.counted, generation) {
                totals.keep(key, generation, total);
            }
            total
        }
    };
    Ok(Page { items, total })
}

/// ` WHERE deleted_at IS NULL`, and ` AND owner_id = <owner>` for one owner's scope: the rows of
/// a soft-deleted, owned table that `scope` may see.
pub(crate) fn push_visible_rows<Database>(
    builder: &mut sqlx::QueryBuilder<Database>,
    scope: OwnerScope,
) where
    Database: sqlx::Database,
    for<'query> uuid::Uuid: sqlx::Encode<'query, Database> + sqlx::Type<Database>,
{
    builder.push(" WHERE deleted_at IS NULL");
    if let Some(owner_id) = scope.owner_id() {
        builder.push(" AND owner_id = ").push_bind(owner_id);
    }
}
