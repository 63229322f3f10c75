//! What the services, the engine's hosts and the edges share in one process: the
//! `AppContext` (store, queue, bus, engine, auth pieces and settings), how the process was
//! started (`Mode`), and the dependency probes health reports read. Built by `server`, read by
//! the service layer and the edges; it sits below both.
//! May call: the store, queue, bus, auth, engine and config types it holds (no logic of its own).

use std::sync::Arc;
use std::time::Instant;

use crate::store::Store;

/// How the process was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `turbocat dev`: SQLite, in-process queue and bus.
    Dev,
    /// `turbocat serve`: PostgreSQL and Redis.
    Serve,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dev => "dev",
            Mode::Serve => "serve",
        }
    }
}

/// What every edge handler and service can reach.
pub struct AppContext {
    pub mode: Mode,
    pub store: Arc<dyn Store>,
    /// Ready step runs: Redis in `serve`, in-process in `dev`.
    pub queue: Arc<dyn crate::queue::Queue>,
    /// Events between replicas: Redis pub/sub in `serve`, in-process in `dev`.
    pub bus: Arc<dyn crate::bus::Bus>,
    /// Signs and verifies access tokens.
    pub tokens: Arc<crate::auth::tokens::TokenService>,
    /// Sessions revoked anywhere, known here within a second.
    pub revoked_sessions: Arc<crate::auth::revocation::RevokedSessions>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// The external identity provider (OIDC, Supabase Auth), when configured.
    pub external_identity: Option<Arc<crate::auth::external::ExternalVerifier>>,
    /// Sends password reset links (to the log until SMTP exists).
    pub mailer: Arc<dyn crate::auth::mailer::Mailer>,
    /// Limits of the sign-in operations: in memory in `dev`, in Redis in `serve`.
    pub rate_limiter: Arc<crate::auth::rate_limit::AuthRateLimits>,
    /// Base of the links the product mails, without a trailing slash.
    pub public_url: String,
    pub probes: Vec<Arc<dyn HealthProbe>>,
    pub started_at: Instant,
    /// Audit rows, committed in groups (`service::audit` appends through it).
    pub audit_trail:
        crate::store::group_commit::GroupCommit<crate::store::NewAuditLog, crate::store::AuditLog>,
    /// Runs executions: schedules steps, hands them to attached runners, repairs what is lost.
    pub engine: Arc<crate::engine::Engine>,
    /// The credential of the runner `turbocat dev` starts in-process: random per process,
    /// never stored, acting as a shared runner. `None` in `serve`.
    pub local_runner_key: Option<crate::config::Secret>,
    /// Webhook freshness and cron floors (`--webhook-tolerance-seconds`, …).
    pub trigger_limits: crate::config::TriggerLimits,
    /// How alert rules are evaluated and delivered (`--alert-evaluation-seconds`, …).
    pub alerts: crate::config::AlertSettings,
    /// API calls per user and day not yet in the store (see `auth::usage`).
    pub api_calls: Arc<crate::auth::usage::ApiCallCounter>,
    /// Who may read `GET /metrics`, and whether requests are logged.
    pub observability: Observability,
    /// Cancelled when the process starts shutting down: `/health/ready` answers 503, watch
    /// streams end, runners are asked to attach elsewhere.
    pub shutting_down: tokio_util::sync::CancellationToken,
}

/// How operators watch the server (`--metrics-token`, `--metrics-listen`, `--access-log`).
#[derive(Debug, Clone, Default)]
pub struct Observability {
    /// The bearer token `/metrics` asks for; `None`: no token is asked on the metrics
    /// listener, and `/metrics` is off on the main listener.
    pub metrics_token: Option<crate::config::Secret>,
    /// `/metrics` is served on its own listener (`--metrics-listen`), not on the main one.
    pub separate_metrics_listener: bool,
    /// One `info` line per request.
    pub access_log: bool,
}

/// Something the server depends on and can ping: the database, Redis.
#[async_trait::async_trait]
pub trait HealthProbe: Send + Sync {
    /// `database`, `redis`.
    fn component(&self) -> &'static str;
    /// `postgres`, `sqlite`, `redis`.
    fn backend(&self) -> &'static str;
    /// Whether the server cannot do anything useful without it.
    fn critical(&self) -> bool;
    async fn ping(&self) -> Result<(), String>;
}
