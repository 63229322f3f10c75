//! Process start-up of `dev` and `serve`: opens the store (and Redis), builds the context,
//! binds the one listener and serves until SIGINT/SIGTERM.
//! May call: everything it wires together: config, store, queue, bus (and `redis_pool` under
//! them), auth, engine, service (the pieces the engine and triggers are given), app (the
//! context), api (the router), seed (starter templates) and runner (the local runner of
//! `dev`). Only `main` calls it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::api::{self, EdgeSettings};
use crate::app::{AppContext, Mode};
use crate::bus::{MemoryBus, RedisBus, RedisBusConfig};
use crate::config::{self, ConnectionUrl, DevArgs, ListenArgs, Secret, ServeArgs, SettingError};
use crate::queue::{MemoryQueue, RedisQueue, RedisQueueConfig};
use crate::redis_pool::{RedisPool, RedisPoolOptions, connect_redis_with_options};
use crate::store::{
    Backend, MigrationEntry, MigrationError, MigrationReport, NewerMigrations, PostgresStore,
    SqliteStore, Store,
};

/// A start-up failure, worded for the person who launched the process.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("cannot reach the database at {url} (--database-url / TURBOCAT_DATABASE_URL): {cause}")]
    DatabaseUnreachable { url: String, cause: String },
    #[error("cannot migrate the database: {0}")]
    Migration(String),
    #[error("cannot reach Redis at {url} (--redis-url / TURBOCAT_REDIS_URL): {cause}")]
    RedisUnreachable { url: String, cause: String },
    #[error("cannot use the data directory {path} (--data-dir / TURBOCAT_DATA_DIR): {cause}")]
    DataDirectory { path: String, cause: String },
    #[error("cannot listen on {address} (--listen / TURBOCAT_LISTEN): {cause}")]
    Listen { address: SocketAddr, cause: String },
    #[error("{0}")]
    Internal(String),
}

/// A server that is accepting connections.
pub struct RunningServer {
    pub local_addr: SocketAddr,
    context: Arc<AppContext>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The engine's loops and the local runner, stopped with the server.
    background: Vec<tokio::task::JoinHandle<()>>,
    /// How long a shutdown may take (`--shutdown-grace-seconds`).
    grace: std::time::Duration,
}

impl RunningServer {
    /// Shuts down gracefully within the grace period: stops accepting connections (and new
    /// requests on kept-alive ones), answers 503 on `/health/ready`, ends watch streams and SSE
    /// with a last UNAVAILABLE event, stops the engine's loops after their current pass (no
    /// claim left behind), asks attached runners to attach elsewhere (what they sent is applied
    /// first), lets in-flight requests finish, and returns once they have, or when the grace
    /// period ends (whatever still runs is then cut).
    pub async fn shutdown(self) -> std::io::Result<()> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.grace;
        self.context.shutting_down.cancel();
        let _ = self.shutdown.send(true);
        // Runners get at most half the grace period to close their streams: the requests in
        // flight keep the rest.
        self.context.engine.shut_down(self.grace / 2).await;
        for task in &self.background {
            task.abort();
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut task = self.task;
        let served = tokio::time::timeout(remaining, &mut task).await;
        // The API calls counted since the last flush are not lost with the process (within
        // what is left of the grace period).
        let last_flush = self.context.api_calls.flush(self.context.store.as_ref());
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left.min(std::time::Duration::from_secs(1)), last_flush).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "could not record the last api call counts"),
            Err(_) => tracing::debug!("could not record the last api call counts in time"),
        }
        match served {
            Ok(outcome) => {
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "every connection closed; stopped"
                );
                outcome.unwrap_or_else(|join_error| Err(std::io::Error::other(join_error)))
            }
            Err(_) => {
                tracing::warn!(
                    grace_seconds = self.grace.as_secs(),
                    "the shutdown grace period ended; cutting the connections still open"
                );
                task.abort();
                Ok(())
            }
        }
    }

    /// Serves until the process is asked to stop.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        wait_for_signal().await;
        tracing::info!("shutting down");
        self.shutdown().await
    }
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    wait_for_signal().await;
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// Binds the listener and serves `context` on it.
pub async fn start(
    context: Arc<AppContext>,
    listen: &ListenArgs,
    local_runner_llm_keys: crate::runner::executors::llm::LlmKeyPolicy,
) -> Result<RunningServer, StartupError> {
    crate::seed::install_starter_templates(context.store.as_ref()).await.map_err(|error| {
        StartupError::Migration(format!(
            "cannot install the starter templates: {}",
            describe_store_error(error)
        ))
    })?;
    let settings = EdgeSettings {
        max_body_bytes: listen.max_body_bytes,
        max_message_bytes: listen.max_message_bytes,
        cors_origins: listen.cors_origins.clone(),
    };
    // Installed before anything counts, so the first requests and steps are in the series.
    crate::api::metrics::recorder();
    let app = api::router(context.clone(), &settings).await.map_err(StartupError::Internal)?;
    let listener = TcpListener::bind(listen.listen).await.map_err(|error| {
        StartupError::Listen { address: listen.listen, cause: error.to_string() }
    })?;
    let local_addr =
        listener.local_addr().map_err(|error| StartupError::Internal(error.to_string()))?;
    let mut background = start_engine(&context, local_addr, local_runner_llm_keys);
    if let Some(metrics_address) = listen.metrics_listen {
        background.push(serve_metrics(context.clone(), metrics_address).await?);
    }
    let (shutdown, mut shutdown_requested) = tokio::sync::watch::channel(false);
    let service = app.into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        // Every accepted connection without Nagle's delay: a small frame (an SSE event, a
        // runner's assignment, a unary answer on a kept-alive connection) leaves at once
        // instead of waiting for the peer's delayed ACK (~40 ms).
        let listener = listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on an accepted connection");
            }
        });
        axum::serve(listener, service)
            .with_graceful_shutdown(async move {
                let _ = shutdown_requested.wait_for(|requested| *requested).await;
            })
            .await
    });
    let grace = std::time::Duration::from_secs(listen.shutdown_grace_seconds);
    Ok(RunningServer { local_addr, context, shutdown, task, background, grace })
}

/// Serves `GET /metrics` alone on `address` (`--metrics-listen`).
async fn serve_metrics(
    context: Arc<AppContext>,
    address: SocketAddr,
) -> Result<tokio::task::JoinHandle<()>, StartupError> {
    crate::api::metrics::recorder();
    let listener = TcpListener::bind(address).await.map_err(|error| StartupError::Listen {
        address,
        cause: format!("{error} (--metrics-listen)"),
    })?;
    let router = crate::api::metrics::router(context, true);
    Ok(tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "the metrics listener stopped");
        }
    }))
}

/// Opens the `dev` SQLite database in `data_dir`, migrated.
pub async fn open_dev_store(data_dir: &Path) -> Result<SqliteStore, StartupError> {
    let store = connect_dev_store(data_dir).await?;
    log_migrations(&store.migrate().await.map_err(migration_error)?);
    Ok(store)
}

/// Opens (creating it) the `dev` SQLite database in `data_dir`, without migrating.
async fn connect_dev_store(data_dir: &Path) -> Result<SqliteStore, StartupError> {
    let data_directory_error =
        |cause: String| StartupError::DataDirectory { path: data_dir.display().to_string(), cause };
    std::fs::create_dir_all(data_dir).map_err(|error| data_directory_error(error.to_string()))?;
    SqliteStore::open(&data_dir.join("turbocat.db"))
        .await
        .map_err(|error| data_directory_error(describe_store_error(error)))
}

fn migration_error(error: MigrationError) -> StartupError {
    StartupError::Migration(error.to_string())
}

/// Logs what migrating did: each migration applied, and the newer ones a newer release applied
/// (which this one runs beside, by the expand/contract rule of docs/operations.md).
fn log_migrations(report: &MigrationReport) {
    for migration in &report.applied {
        tracing::info!(version = migration.version, description = %migration.description, "applied a migration");
    }
    if !report.newer.is_empty() {
        let versions: Vec<String> =
            report.newer.iter().map(|version| format!("{version:04}")).collect();
        tracing::warn!(
            versions = %versions.join(", "),
            "the database has migrations newer than this release (a newer release applied them); running on its schema"
        );
    }
}

/// How long a one-shot command (`migrate`, `seed`, `admin`) waits for a database connection.
const COMMAND_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to PostgreSQL at `url` without migrating; a query waits at most `acquire_timeout`
/// for a connection.
pub async fn connect_postgres_store(
    url: &ConnectionUrl,
    max_connections: u32,
    acquire_timeout: std::time::Duration,
) -> Result<PostgresStore, StartupError> {
    config::validate_database_url(url, true)?;
    PostgresStore::connect_with_timeout(url.expose(), max_connections, acquire_timeout)
        .await
        .map_err(|error| StartupError::DatabaseUnreachable {
            url: url.redacted(),
            cause: describe_store_error(error),
        })
}

/// The database a one-shot command names, opened but not migrated.
pub enum CommandDatabase {
    Postgres(PostgresStore),
    Sqlite(SqliteStore),
}

impl CommandDatabase {
    /// Opens `--database-url`, else the `dev` SQLite file.
    pub async fn connect(args: &config::DatabaseArgs) -> Result<Self, StartupError> {
        match &args.database_url {
            Some(url) if url.scheme().as_deref() == Some("sqlite") => {
                config::validate_database_url(url, false)?;
                let path = url.expose().trim_start_matches("sqlite://");
                let store = SqliteStore::open(Path::new(path)).await.map_err(|error| {
                    StartupError::DatabaseUnreachable {
                        url: url.redacted(),
                        cause: describe_store_error(error),
                    }
                })?;
                Ok(Self::Sqlite(store))
            }
            Some(url) => {
                Ok(Self::Postgres(connect_postgres_store(url, 5, COMMAND_ACQUIRE_TIMEOUT).await?))
            }
            None => Ok(Self::Sqlite(connect_dev_store(&args.data_dir).await?)),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies the migrations the database lacks (`NewerMigrations` decides about the ones
    /// this release does not know).
    pub async fn migrate(&self, newer: NewerMigrations) -> Result<MigrationReport, StartupError> {
        let report = match self {
            Self::Postgres(store) => store.migrate_with(newer).await,
            Self::Sqlite(store) => store.migrate_with(newer).await,
        };
        let report = report.map_err(|error| match error {
            MigrationError::NewerThanThisRelease(_) => StartupError::Migration(format!(
                "{error}; run `migrate` with that release, or pass --allow-newer to keep its \
                 migrations and apply only what this release has"
            )),
            other => migration_error(other),
        })?;
        log_migrations(&report);
        Ok(report)
    }

    /// Reverts the newest `count` applied migrations, newest first.
    pub async fn revert(&self, count: usize) -> Result<Vec<MigrationEntry>, StartupError> {
        let reverted = match self {
            Self::Postgres(store) => store.revert(count).await,
            Self::Sqlite(store) => store.revert(count).await,
        };
        let reverted = reverted.map_err(|error| match error {
            MigrationError::NewerThanThisRelease(_) => StartupError::Migration(format!(
                "{error}; revert with that release, which has their down scripts"
            )),
            other => migration_error(other),
        })?;
        for migration in &reverted {
            tracing::info!(version = migration.version, description = %migration.description, "reverted a migration");
        }
        Ok(reverted)
    }

    pub fn into_store(self) -> Arc<dyn Store> {
        match self {
            Self::Postgres(store) => Arc::new(store),
            Self::Sqlite(store) => Arc::new(store),
        }
    }
}

/// Opens the store a one-shot command names (`--database-url`, else the `dev` SQLite file),
/// migrated as a server would (newer migrations accepted).
pub async fn open_store_for_command(
    args: &config::DatabaseArgs,
) -> Result<Arc<dyn Store>, StartupError> {
    let database = CommandDatabase::connect(args).await?;
    database.migrate(NewerMigrations::Accept).await?;
    Ok(database.into_store())
}

fn describe_store_error(error: crate::store::StoreError) -> String {
    match error {
        crate::store::StoreError::Database(cause) => cause.to_string(),
        other => other.to_string(),
    }
}

/// The JWT secret of `dev`: the given one, or one generated once and kept in the data directory.
pub fn dev_jwt_secret(args: &DevArgs) -> Result<Secret, StartupError> {
    if let Some(secret) = &args.jwt_secret {
        config::validate_jwt_secret(secret)?;
        return Ok(secret.clone());
    }
    let path = args.data_dir.join("jwt-secret");
    let data_directory_error = |cause: String| StartupError::DataDirectory {
        path: args.data_dir.display().to_string(),
        cause,
    };
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let secret = Secret::new(existing.trim());
        if config::validate_jwt_secret(&secret).is_ok() {
            return Ok(secret);
        }
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|error| data_directory_error(error.to_string()))?;
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    let secret = Secret::new(hex::encode(bytes));
    write_private_file(&path, secret.expose())
        .map_err(|error| data_directory_error(error.to_string()))?;
    tracing::info!(path = %path.display(), "generated a jwt secret for dev mode");
    Ok(secret)
}

/// 32 random bytes, hex: a credential that lives as long as the process.
fn random_secret() -> Secret {
    let mut bytes = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    Secret::new(hex::encode(bytes))
}

/// Starts the engine's loops and, in `dev`, the in-process runner attached over gRPC to
/// `local_addr` like any remote runner.
fn start_engine(
    context: &Arc<AppContext>,
    local_addr: SocketAddr,
    local_runner_llm_keys: crate::runner::executors::llm::LlmKeyPolicy,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = context.engine.spawn();
    // Cron deployments: every replica polls, the database picks one per tick.
    tasks.push(tokio::spawn(crate::service::triggers::run_cron_triggers(context.clone())));
    // Alert rules: the executions this replica finishes, and the periodic conditions (every
    // replica polls, the database picks one per rule and tick).
    tasks.push(tokio::spawn(crate::service::alerts::run_alert_evaluation(context.clone())));
    // Runners whose key or owner changed are withdrawn, on every replica.
    tasks.push(tokio::spawn(crate::service::runner_access::keep_runner_access_current(
        context.clone(),
    )));
    if let Some(key) = &context.local_runner_key {
        let host = if local_addr.ip().is_unspecified() {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local_addr.port())
        } else {
            local_addr
        };
        let settings = crate::runner::client::RunnerSettings {
            server_urls: vec![format!("http://{host}")],
            api_key: key.expose().to_owned(),
            name: "local".to_owned(),
            labels: std::collections::BTreeMap::new(),
            capacity: LOCAL_RUNNER_CAPACITY,
            agent_types: crate::runner::client::RunnerSettings::default_agent_types(),
            drain_grace: std::time::Duration::from_secs(5),
            max_message_bytes: context.engine.settings().max_message_bytes,
            llm_keys: Arc::new(local_runner_llm_keys),
        };
        let (_never, shutdown) = tokio::sync::watch::channel(false);
        tasks.push(tokio::spawn(async move {
            let _keep_open = _never;
            if let Err(error) = crate::runner::client::run(settings, shutdown).await {
                tracing::error!(%error, "the local runner stopped");
            }
        }));
    }
    tasks
}

/// Steps the in-process runner of `dev` runs at once.
const LOCAL_RUNNER_CAPACITY: u32 = 8;

fn write_private_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())
}

/// What differs between the `dev` and `serve` contexts.
struct ContextParts<'a> {
    mode: Mode,
    store: Arc<dyn Store>,
    queue: Arc<dyn crate::queue::Queue>,
    bus: Arc<dyn crate::bus::Bus>,
    probes: Vec<Arc<dyn crate::app::HealthProbe>>,
    signing_key: crate::auth::tokens::SigningKey,
    listen: &'a ListenArgs,
    external_identity: Option<crate::auth::external::ExternalIdentitySettings>,
    /// Counters of the sign-in rate limits: in memory (`dev`) or Redis (`serve`).
    rate_limiter: Arc<dyn crate::auth::rate_limit::RateLimiter>,
    /// Runner liveness: in memory (`dev`) or shared through Redis (`serve`).
    leases: crate::engine::leases::Leases,
    /// The runners of every replica: none beyond this process (`dev`) or in Redis (`serve`).
    runner_directory: crate::engine::runner_directory::RunnerDirectory,
    /// The credential of the in-process runner (`dev` only).
    local_runner_key: Option<Secret>,
}

fn build_context(parts: ContextParts<'_>) -> Result<Arc<AppContext>, StartupError> {
    let tokens = crate::auth::tokens::TokenService::new(
        crate::auth::tokens::TokenSettings::with_signing_key(parts.signing_key),
    );
    let external_identity = match parts.external_identity {
        Some(settings) => Some(Arc::new(
            crate::auth::external::ExternalVerifier::new(settings, parts.store.clone()).map_err(
                |error| StartupError::Internal(format!("cannot build the jwks client: {error}")),
            )?,
        )),
        None => None,
    };
    let account_security = &parts.listen.account_security;
    let public_url = match &account_security.public_url {
        Some(url) => config::validate_public_url(url)?,
        None => format!("http://{}", parts.listen.listen),
    };
    let window = std::time::Duration::from_secs(account_security.auth_rate_limit_window_seconds);
    let rate_limiter = crate::auth::rate_limit::AuthRateLimits::new(
        parts.rate_limiter,
        crate::auth::rate_limit::RateRule::per_window(
            account_security.auth_rate_limit_per_ip,
            window,
        ),
        crate::auth::rate_limit::RateRule::per_window(
            account_security.auth_rate_limit_per_account,
            window,
        ),
    );
    let mailer: Arc<dyn crate::auth::mailer::Mailer> =
        match crate::auth::mailer::SmtpMailer::from_settings(
            account_security.smtp_url.as_ref(),
            account_security.smtp_from.as_deref(),
        )? {
            Some(smtp) => Arc::new(smtp),
            None => Arc::new(crate::auth::mailer::LogMailer),
        };
    let engine = crate::engine::Engine::new(crate::engine::EngineParts {
        store: parts.store.clone(),
        queue: parts.queue.clone(),
        bus: parts.bus.clone(),
        leases: parts.leases,
        runner_directory: parts.runner_directory,
        settings: crate::engine::EngineSettings {
            max_message_bytes: parts.listen.max_message_bytes,
            ..parts.listen.engine.settings()
        },
    });
    // The engine runs WORKFLOW steps; the service layer builds their child executions.
    engine.install_child_workflows(crate::service::subworkflows::ChildWorkflowBuilder::new(
        parts.store.clone(),
    ));
    let audit_store = parts.store.clone();
    let audit_trail = crate::store::group_commit::GroupCommit::start(Arc::new(move |batch| {
        let store = audit_store.clone();
        Box::pin(async move { store.append_audit_logs(&batch).await })
    }));
    Ok(Arc::new(AppContext {
        audit_trail,
        trigger_limits: parts.listen.triggers.limits(),
        alerts: parts.listen.alerts.settings(),
        api_calls: Arc::default(),
        observability: crate::app::Observability {
            metrics_token: parts.listen.metrics_token.clone(),
            separate_metrics_listener: parts.listen.metrics_listen.is_some(),
            access_log: parts.listen.access_log,
        },
        engine,
        local_runner_key: parts.local_runner_key,
        mailer,
        rate_limiter: Arc::new(rate_limiter),
        public_url,
        mode: parts.mode,
        store: parts.store,
        queue: parts.queue,
        bus: parts.bus,
        probes: parts.probes,
        tokens: Arc::new(tokens),
        revoked_sessions: Arc::new(crate::auth::revocation::RevokedSessions::default()),
        trusted_proxies: parts.listen.trusted_proxies.clone(),
        external_identity,
        started_at: Instant::now(),
        shutting_down: tokio_util::sync::CancellationToken::new(),
    }))
}

/// `turbocat dev`: SQLite in the data directory, everything in one process.
pub async fn start_dev(args: &DevArgs) -> Result<RunningServer, StartupError> {
    let local_runner_llm_keys = args.llm_keys.policy()?;
    let jwt_keys = &args.jwt_keys;
    config::reject_unused_jwt_secret(jwt_keys.jwt_algorithm, args.jwt_secret.as_ref())?;
    let signing_key = crate::auth::tokens::signing_key_from_settings(
        jwt_keys.jwt_algorithm,
        jwt_keys.jwt_private_key_file.as_deref(),
        jwt_keys.jwt_public_key_file.as_deref(),
        || dev_jwt_secret(args),
    )?;
    let external_identity = config::validate_external_identity(&args.listen.external_identity)?;
    let store: Arc<dyn Store> = Arc::new(open_dev_store(&args.data_dir).await?);
    let context = build_context(ContextParts {
        mode: Mode::Dev,
        probes: vec![Arc::new(api::health::StoreProbe(store.clone()))],
        store,
        queue: Arc::new(MemoryQueue::new(crate::queue::DEFAULT_MAX_LEN)),
        bus: Arc::new(MemoryBus::new()),
        signing_key,
        listen: &args.listen,
        external_identity,
        rate_limiter: Arc::new(crate::auth::rate_limit::MemoryRateLimiter::new()),
        leases: crate::engine::leases::Leases::in_memory(),
        runner_directory: crate::engine::runner_directory::RunnerDirectory::in_memory(),
        local_runner_key: Some(random_secret()),
    })?;
    start(context, &args.listen, local_runner_llm_keys).await
}

/// `turbocat serve`: PostgreSQL and Redis.
pub async fn start_serve(args: &ServeArgs) -> Result<RunningServer, StartupError> {
    let jwt_keys = &args.jwt_keys;
    config::reject_unused_jwt_secret(jwt_keys.jwt_algorithm, args.jwt_secret.as_ref())?;
    let signing_key = crate::auth::tokens::signing_key_from_settings(
        jwt_keys.jwt_algorithm,
        jwt_keys.jwt_private_key_file.as_deref(),
        jwt_keys.jwt_public_key_file.as_deref(),
        || config::required_jwt_secret(args.jwt_secret.as_ref()),
    )?;
    crate::auth::mailer::SmtpMailer::from_settings(
        args.listen.account_security.smtp_url.as_ref(),
        args.listen.account_security.smtp_from.as_deref(),
    )?;
    config::validate_database_url(&args.database_url, true)?;
    config::validate_redis_url(&args.redis_url)?;
    let external_identity = config::validate_external_identity(&args.listen.external_identity)?;
    if let Some(public_url) = &args.listen.account_security.public_url {
        config::validate_public_url(public_url)?;
    }
    // Reach every dependency before changing anything: a bad Redis URL must not migrate.
    let postgres = connect_postgres_store(
        &args.database_url,
        args.database_max_connections,
        std::time::Duration::from_secs(args.database_acquire_timeout_seconds),
    )
    .await?;
    let redis_unreachable =
        |cause: String| StartupError::RedisUnreachable { url: args.redis_url.redacted(), cause };
    let redis_options = RedisPoolOptions {
        connection_timeout: std::time::Duration::from_secs(args.redis_timeout_seconds),
        ..RedisPoolOptions::default()
    };
    let redis = connect_redis_with_options(args.redis_url.expose(), redis_options)
        .await
        .map_err(|error| redis_unreachable(error.to_string()))?;
    let bus_config = RedisBusConfig {
        key_prefix: args.redis_key_prefix.clone(),
        subscribe_timeout: redis_options.connection_timeout,
        command_timeout: redis_options.connection_timeout,
        ..RedisBusConfig::default()
    };
    let bus = RedisBus::connect(redis.clone(), bus_config)
        .await
        .map_err(|error| redis_unreachable(error.to_string()))?;
    log_migrations(&postgres.migrate().await.map_err(migration_error)?);
    let store: Arc<dyn Store> = Arc::new(postgres);
    let context = build_context(ContextParts {
        mode: Mode::Serve,
        probes: vec![
            Arc::new(api::health::StoreProbe(store.clone())),
            Arc::new(RedisProbe(redis.clone())),
        ],
        store,
        rate_limiter: Arc::new(crate::auth::rate_limit::RedisRateLimiter::new(
            redis.clone(),
            args.listen.account_security.rate_limit_key_prefix.clone(),
        )),
        leases: crate::engine::leases::Leases::shared(
            redis.clone(),
            format!("{}engine:", args.redis_key_prefix),
        ),
        runner_directory: crate::engine::runner_directory::RunnerDirectory::shared(
            redis.clone(),
            format!("{}engine:", args.redis_key_prefix),
        ),
        local_runner_key: None,
        queue: Arc::new(RedisQueue::new(
            redis,
            RedisQueueConfig {
                key_prefix: args.redis_key_prefix.clone(),
                ..RedisQueueConfig::default()
            },
        )),
        bus: Arc::new(bus),
        signing_key,
        listen: &args.listen,
        external_identity,
    })?;
    start(context, &args.listen, crate::runner::executors::llm::LlmKeyPolicy::default()).await
}

/// Redis as a health probe (not critical: the database is the source of truth).
pub struct RedisProbe(pub RedisPool);

#[async_trait::async_trait]
impl crate::app::HealthProbe for RedisProbe {
    fn component(&self) -> &'static str {
        "redis"
    }

    fn backend(&self) -> &'static str {
        "redis"
    }

    fn critical(&self) -> bool {
        false
    }

    async fn ping(&self) -> Result<(), String> {
        let mut connection = self.0.connection().await.map_err(|error| error.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut *connection)
            .await
            .map(|_| ())
            .map_err(|error| error.to_string())
    }
}
