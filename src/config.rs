//! Command line and environment: every flag also reads a `TURBOCAT_*` variable. Settings are
//! validated once here, and their `Debug` never shows a secret.
//! May call: nothing with behaviour; only the settings types it builds for `auth` (external
//! identity), the `engine` and the `runner`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A secret setting (JWT key, API key). Its `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

/// A URL that may carry a password (database, Redis). `Debug`/`Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionUrl(String);

impl ConnectionUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***`, safe to log and to show in errors.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut parsed) => {
                if parsed.password().is_some() {
                    let _ = parsed.set_password(Some("***"));
                }
                parsed.to_string()
            }
            Err(_) => "<unparseable url>".to_owned(),
        }
    }

    pub fn scheme(&self) -> Option<String> {
        url::Url::parse(&self.0).ok().map(|parsed| parsed.scheme().to_owned())
    }
}

impl std::fmt::Debug for ConnectionUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted())
    }
}

impl std::fmt::Display for ConnectionUrl {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.redacted())
    }
}

impl std::str::FromStr for ConnectionUrl {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Parser)]
#[command(name = "turbocat", version, about = "Orchestrate AI agents and workflows")]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "TURBOCAT_LOG_FORMAT", value_enum, default_value = "human", global = true)]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (`info`, `turbocat=debug,info`).
    #[arg(long, env = "TURBOCAT_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run everything in one process: SQLite, in-process queue and bus. Nothing to install.
    Dev(DevArgs),
    /// Run a server replica on PostgreSQL and Redis.
    Serve(ServeArgs),
    /// Run a runner that executes steps for a server.
    Runner(RunnerArgs),
    /// Apply database migrations (or revert the newest ones with `--down N`) and exit.
    Migrate(MigrateArgs),
    /// Load demo data: an admin user, sample agents, a workflow, templates.
    Seed(SeedArgs),
    /// Administer accounts from the command line.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Internal: a warm jq worker of a runner, running DATA steps' programs one after another
    /// (a line of JSON per request on stdin, per reply on stdout), so that a program that
    /// crashes takes down only this process.
    #[command(name = "jq-worker", hide = true)]
    JqWorker,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create an administrator account (on the database `migrate` would open).
    Create(AdminCreateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AdminCreateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Email of the new administrator.
    #[arg(long)]
    pub email: String,
    /// Password of the new administrator (8 to 128 characters).
    #[arg(long, env = "TURBOCAT_ADMIN_PASSWORD")]
    pub password: Secret,
    /// Full name of the new administrator; default "Administrator".
    #[arg(long)]
    pub full_name: Option<String>,
}

/// The algorithm of the access tokens this server signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with `--jwt-secret`.
    #[default]
    #[value(name = "HS256")]
    Hs256,
    /// Ed25519 with a PEM key pair.
    #[value(name = "EdDSA")]
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256 and a PEM key pair.
    #[value(name = "RS256")]
    Rs256,
}

/// How access tokens are signed: HS256 with `--jwt-secret`, or a key pair in PEM files.
#[derive(Debug, Clone, Args)]
pub struct JwtKeyArgs {
    /// Signing algorithm of access tokens; only this one is accepted when verifying.
    #[arg(
        long,
        env = "TURBOCAT_JWT_ALGORITHM",
        value_enum,
        ignore_case = true,
        default_value = "HS256"
    )]
    pub jwt_algorithm: JwtAlgorithm,
    /// PEM private key (PKCS#8; PKCS#1 also for RS256), required with EdDSA and RS256.
    #[arg(long, env = "TURBOCAT_JWT_PRIVATE_KEY_FILE")]
    pub jwt_private_key_file: Option<PathBuf>,
    /// PEM public key (SubjectPublicKeyInfo), required with EdDSA and RS256.
    #[arg(long, env = "TURBOCAT_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
}

/// Settings of the listener, shared by `dev` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Address to listen on for REST, gRPC and grpc-web.
    #[arg(long, env = "TURBOCAT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Origins allowed to call from a browser, comma-separated.
    #[arg(long, env = "TURBOCAT_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Largest REST request body in bytes.
    #[arg(long, env = "TURBOCAT_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Proxies whose `X-Forwarded-For` is believed, comma-separated IP addresses.
    #[arg(long, env = "TURBOCAT_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Largest gRPC message in bytes.
    #[arg(long, env = "TURBOCAT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// The bearer token `GET /metrics` asks for on the main listener; without it (and without
    /// `--metrics-listen`) `/metrics` is off.
    #[arg(long, env = "TURBOCAT_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,
    /// Serve `GET /metrics` on this separate address instead (no token needed unless one is
    /// set), for a network only Prometheus reaches.
    #[arg(long, env = "TURBOCAT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// One log line per request at `info` (method, route, status, latency, request and caller
    /// ids); `false` turns it off.
    #[arg(long, env = "TURBOCAT_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// On SIGTERM or SIGINT, how long the server may take to stop: it stops accepting, ends
    /// watch streams, asks its runners to attach elsewhere and lets requests in flight finish,
    /// then exits; whatever still runs after this many seconds is cut.
    #[arg(
        long,
        env = "TURBOCAT_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub shutdown_grace_seconds: u64,
    #[command(flatten)]
    pub external_identity: ExternalIdentityArgs,
    #[command(flatten)]
    pub account_security: AccountSecurityArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub triggers: TriggerArgs,
    #[command(flatten)]
    pub alerts: AlertArgs,
}

/// How alert rules are evaluated and how their webhooks are called.
#[derive(Debug, Clone, Args)]
pub struct AlertArgs {
    /// Seconds between two evaluations of a rule's time-based condition (failures in a window,
    /// waiting steps, an agent's health). Failed executions are judged as they finish.
    #[arg(
        long,
        env = "TURBOCAT_ALERT_EVALUATION_SECONDS",
        default_value_t = 15,
        value_parser = clap::value_parser!(u64).range(1..=3_600)
    )]
    pub alert_evaluation_seconds: u64,
    /// Lets every alert rule call plain `http://` webhooks and private-network addresses
    /// (loopback, RFC 1918, link-local, …): for local testing only. Cloud metadata addresses
    /// stay refused.
    #[arg(long, env = "TURBOCAT_ALERTS_ALLOW_PRIVATE_NETWORK", default_value_t = false, action = clap::ArgAction::Set)]
    pub alerts_allow_private_network: bool,
    /// Calls per notification: the first and its retries.
    #[arg(
        long,
        env = "TURBOCAT_ALERT_DELIVERY_ATTEMPTS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u32).range(1..=10)
    )]
    pub alert_delivery_attempts: u32,
    /// Milliseconds before the first retry of a notification; each next retry waits twice as
    /// long (at most 5 minutes).
    #[arg(
        long,
        env = "TURBOCAT_ALERT_RETRY_BACKOFF_MS",
        default_value_t = 2_000,
        value_parser = clap::value_parser!(u64).range(10..=300_000)
    )]
    pub alert_retry_backoff_ms: u64,
}

/// The settings `AlertArgs` set, as the alert service reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertSettings {
    pub evaluation_interval: std::time::Duration,
    pub allow_private_network: bool,
    pub delivery_attempts: u32,
    pub retry_backoff: std::time::Duration,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            evaluation_interval: std::time::Duration::from_secs(15),
            allow_private_network: false,
            delivery_attempts: 5,
            retry_backoff: std::time::Duration::from_secs(2),
        }
    }
}

impl AlertArgs {
    pub fn settings(&self) -> AlertSettings {
        AlertSettings {
            evaluation_interval: std::time::Duration::from_secs(self.alert_evaluation_seconds),
            allow_private_network: self.alerts_allow_private_network,
            delivery_attempts: self.alert_delivery_attempts,
            retry_backoff: std::time::Duration::from_millis(self.alert_retry_backoff_ms),
        }
    }
}

/// What deployments' triggers may do: how fresh a webhook call must be, how often a cron
/// schedule may fire and how many a user may keep running.
#[derive(Debug, Clone, Args)]
pub struct TriggerArgs {
    /// Seconds a signed webhook call stays valid after its X-Turbocat-Timestamp (either way,
    /// for clock skew); older calls are refused as replays.
    #[arg(
        long,
        env = "TURBOCAT_WEBHOOK_TOLERANCE_SECONDS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(10..=3_600)
    )]
    pub webhook_tolerance_seconds: u64,
    /// Shortest interval between two fires of a user's cron deployment, in seconds.
    #[arg(
        long,
        env = "TURBOCAT_CRON_MIN_INTERVAL_SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub cron_min_interval_seconds: u64,
    /// Shortest interval between two fires of an administrator's cron deployment, in seconds.
    #[arg(
        long,
        env = "TURBOCAT_CRON_ADMIN_MIN_INTERVAL_SECONDS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub cron_admin_min_interval_seconds: u64,
    /// Running cron deployments one user may have at once (administrators are not limited).
    #[arg(long, env = "TURBOCAT_MAX_ACTIVE_CRON_DEPLOYMENTS", default_value_t = 10)]
    pub max_active_cron_deployments: u32,
}

/// The limits `TriggerArgs` set, as the services read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TriggerLimits {
    pub webhook_tolerance: std::time::Duration,
    pub cron_min_interval: std::time::Duration,
    pub cron_admin_min_interval: std::time::Duration,
    pub max_active_cron_deployments: u32,
}

impl Default for TriggerLimits {
    fn default() -> Self {
        Self {
            webhook_tolerance: std::time::Duration::from_secs(300),
            cron_min_interval: std::time::Duration::from_secs(60),
            cron_admin_min_interval: std::time::Duration::from_secs(1),
            max_active_cron_deployments: 10,
        }
    }
}

impl TriggerArgs {
    pub fn limits(&self) -> TriggerLimits {
        TriggerLimits {
            webhook_tolerance: std::time::Duration::from_secs(self.webhook_tolerance_seconds),
            cron_min_interval: std::time::Duration::from_secs(self.cron_min_interval_seconds),
            cron_admin_min_interval: std::time::Duration::from_secs(
                self.cron_admin_min_interval_seconds,
            ),
            max_active_cron_deployments: self.max_active_cron_deployments,
        }
    }
}

/// How the execution engine treats runners.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Seconds a runner may go without a heartbeat before its steps run elsewhere.
    #[arg(
        long,
        env = "TURBOCAT_RUNNER_LEASE_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(2..=3_600)
    )]
    pub runner_lease_seconds: u64,
    /// Seconds a runner has to acknowledge an assignment (else it is taken back and runs
    /// elsewhere) or a cancel (else its slot is freed anyway).
    #[arg(
        long,
        env = "TURBOCAT_RUNNER_ACK_SECONDS",
        default_value_t = 10,
        value_parser = clap::value_parser!(u64).range(1..=600)
    )]
    pub runner_ack_seconds: u64,
    /// Times a step may be taken back from a lost runner before it fails (not retries).
    #[arg(long, env = "TURBOCAT_MAX_RUNNER_REASSIGNMENTS", default_value_t = 3)]
    pub max_runner_reassignments: u16,
    /// Largest step input or output, in bytes of JSON.
    #[arg(long, env = "TURBOCAT_MAX_PAYLOAD_BYTES", default_value_t = 1024 * 1024)]
    pub max_payload_bytes: usize,
    /// Deepest nesting of sub-workflow executions.
    #[arg(long, env = "TURBOCAT_MAX_WORKFLOW_DEPTH", default_value_t = 5)]
    pub max_workflow_depth: u16,
    /// Deepest nesting of a JSON value that enters (inputs, outputs, configs, templates): below
    /// what gRPC decoders accept (an object level is three protobuf levels of 100).
    #[arg(
        long,
        env = "TURBOCAT_MAX_JSON_DEPTH",
        default_value_t = 32,
        value_parser = clap::value_parser!(u16).range(4..=32)
    )]
    pub max_json_depth: u16,
}

impl EngineArgs {
    pub fn settings(&self) -> crate::engine::EngineSettings {
        let lease = std::time::Duration::from_secs(self.runner_lease_seconds);
        crate::engine::EngineSettings {
            lease_duration: lease,
            // Three heartbeats per lease: one lost beat never costs a lease.
            heartbeat_interval: (lease / 3).max(std::time::Duration::from_millis(500)),
            acknowledgement_timeout: std::time::Duration::from_secs(self.runner_ack_seconds),
            max_infrastructure_reassignments: i32::from(self.max_runner_reassignments),
            max_payload_bytes: self.max_payload_bytes,
            max_workflow_depth: i32::from(self.max_workflow_depth),
            max_json_depth: usize::from(self.max_json_depth),
            ..crate::engine::EngineSettings::default()
        }
    }
}

/// Password reset links and the rate limits of the sign-in operations.
#[derive(Debug, Clone, Args)]
pub struct AccountSecurityArgs {
    /// Public base URL of this installation, used in password reset links
    /// (`<url>/reset-password?token=…`); default `http://<listen address>`.
    #[arg(long, env = "TURBOCAT_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Attempts of each sign-in operation (register, login, refresh, forgot and reset password)
    /// one client address may make per window; 0 switches the limit off.
    #[arg(long, env = "TURBOCAT_AUTH_RATE_LIMIT_PER_IP", default_value_t = 30)]
    pub auth_rate_limit_per_ip: u32,
    /// Attempts of each sign-in operation naming one account (email) per window; 0 switches the
    /// limit off.
    #[arg(long, env = "TURBOCAT_AUTH_RATE_LIMIT_PER_ACCOUNT", default_value_t = 10)]
    pub auth_rate_limit_per_account: u32,
    /// Length of a rate limit window in seconds.
    #[arg(
        long,
        env = "TURBOCAT_AUTH_RATE_LIMIT_WINDOW_SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub auth_rate_limit_window_seconds: u64,
    /// Prefix of the rate limit counters in Redis (`serve`); replicas of one installation must
    /// agree on it, installations sharing a Redis must not.
    #[arg(long, env = "TURBOCAT_RATE_LIMIT_KEY_PREFIX", default_value = "turbocat:ratelimit:")]
    pub rate_limit_key_prefix: String,
    /// SMTP server that sends password reset mail: `smtps://user:pass@host:465` (TLS) or
    /// `smtp://user:pass@host:587?tls=required` (STARTTLS); plain `smtp://host:25` is unencrypted.
    /// Unset: reset links are written to the log.
    #[arg(long, env = "TURBOCAT_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<ConnectionUrl>,
    /// Sender of that mail, e.g. `Turbocat <no-reply@example.com>`; required with --smtp-url.
    #[arg(long, env = "TURBOCAT_SMTP_FROM")]
    pub smtp_from: Option<String>,
}

/// The public base URL, checked, without a trailing slash.
pub fn validate_public_url(url: &str) -> Result<String, SettingError> {
    let error = |problem: String| SettingError {
        flag: "--public-url",
        variable: "TURBOCAT_PUBLIC_URL",
        problem,
    };
    let parsed = url::Url::parse(url.trim())
        .map_err(|parse_error| error(format!("not a URL ({parse_error})")))?;
    if !matches!(parsed.scheme(), "https" | "http") || parsed.host_str().is_none() {
        return Err(error("expected an http:// or https:// URL with a host".to_owned()));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_owned())
}

/// An external identity provider (OIDC, Supabase Auth) whose bearer tokens are accepted: all
/// three settings, or none.
#[derive(Debug, Clone, Default, Args)]
pub struct ExternalIdentityArgs {
    /// URL of the provider's JWKS, e.g. `https://<project>.supabase.co/auth/v1/.well-known/jwks.json`.
    #[arg(long, env = "TURBOCAT_EXTERNAL_JWKS_URL")]
    pub external_jwks_url: Option<String>,
    /// The exact `iss` claim of the provider's tokens.
    #[arg(long, env = "TURBOCAT_EXTERNAL_ISSUER")]
    pub external_issuer: Option<String>,
    /// The `aud` claim the provider's tokens must carry (Supabase: `authenticated`).
    #[arg(long, env = "TURBOCAT_EXTERNAL_AUDIENCE")]
    pub external_audience: Option<String>,
}

/// The external identity settings, checked: `None` when none is configured.
pub fn validate_external_identity(
    args: &ExternalIdentityArgs,
) -> Result<Option<crate::auth::external::ExternalIdentitySettings>, SettingError> {
    let non_empty = |value: &Option<String>| {
        value.as_deref().map(str::trim).filter(|text| !text.is_empty()).map(str::to_owned)
    };
    let (jwks_url, issuer, audience) = (
        non_empty(&args.external_jwks_url),
        non_empty(&args.external_issuer),
        non_empty(&args.external_audience),
    );
    let missing = |flag: &'static str, variable: &'static str| SettingError {
        flag,
        variable,
        problem: "required with the other --external-* settings".to_owned(),
    };
    let (jwks_url, issuer, audience) = match (jwks_url, issuer, audience) {
        (None, None, None) => return Ok(None),
        (Some(jwks_url), Some(issuer), Some(audience)) => (jwks_url, issuer, audience),
        (None, _, _) => {
            return Err(missing("--external-jwks-url", "TURBOCAT_EXTERNAL_JWKS_URL"));
        }
        (_, None, _) => return Err(missing("--external-issuer", "TURBOCAT_EXTERNAL_ISSUER")),
        (_, _, None) => {
            return Err(missing("--external-audience", "TURBOCAT_EXTERNAL_AUDIENCE"));
        }
    };
    let url_error = |problem: String| SettingError {
        flag: "--external-jwks-url",
        variable: "TURBOCAT_EXTERNAL_JWKS_URL",
        problem,
    };
    let parsed =
        url::Url::parse(&jwks_url).map_err(|error| url_error(format!("not a URL ({error})")))?;
    if !matches!(parsed.scheme(), "https" | "http") {
        return Err(url_error(format!(
            "unsupported scheme `{}`; expected https://",
            parsed.scheme()
        )));
    }
    Ok(Some(crate::auth::external::ExternalIdentitySettings {
        jwks_url: parsed,
        issuer,
        audience,
        cache_ttl: crate::auth::external::DEFAULT_JWKS_CACHE_TTL,
        min_refetch_interval: crate::auth::external::DEFAULT_MIN_REFETCH_INTERVAL,
    }))
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// Directory of the SQLite database and the generated JWT secret.
    #[arg(long, env = "TURBOCAT_DATA_DIR", default_value = ".turbocat")]
    pub data_dir: PathBuf,
    /// JWT signing secret (at least 32 bytes) for HS256. Generated once and kept in the data
    /// directory when not given.
    #[arg(long, env = "TURBOCAT_JWT_SECRET")]
    pub jwt_secret: Option<Secret>,
    #[command(flatten)]
    pub jwt_keys: JwtKeyArgs,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    /// What the built-in runner lends LLM agents.
    #[command(flatten)]
    pub llm_keys: LlmKeyArgs,
}

/// How a runner (also `dev`'s own) treats the sandbox of CODE and DATA steps.
#[derive(Debug, Clone, Default, Args)]
pub struct SandboxArgs {
    /// Run CODE and DATA steps WITHOUT a sandbox where the kernel does not allow one (no
    /// Landlock, no user namespaces) instead of refusing them. Only for code you trust.
    #[arg(long, env = "TURBOCAT_ALLOW_UNSANDBOXED_CODE")]
    pub allow_unsandboxed_code: bool,
    /// For tests: act as if the kernel lacked `landlock` or `user-namespaces`.
    #[arg(long, env = "TURBOCAT_SANDBOX_PRETEND_MISSING", hide = true)]
    pub sandbox_pretend_missing: Option<String>,
    /// For tests: the one `ip:port` the egress proxy of CODE steps lets through whatever its
    /// address class (a loopback test server standing in for a public one).
    #[arg(long, env = "TURBOCAT_EGRESS_TEST_ALLOW", hide = true)]
    pub egress_test_allow: Option<std::net::SocketAddr>,
}

impl SandboxArgs {
    pub fn policy(&self) -> crate::runner::executors::sandbox::SandboxPolicy {
        crate::runner::executors::sandbox::SandboxPolicy {
            allow_unsandboxed: self.allow_unsandboxed_code,
            pretend_missing: self.sandbox_pretend_missing.clone(),
            egress_test_allow: self.egress_test_allow,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub listen: ListenArgs,
    /// PostgreSQL URL, e.g. `postgres://turbocat:secret@db:5432/turbocat`.
    #[arg(long, env = "TURBOCAT_DATABASE_URL")]
    pub database_url: ConnectionUrl,
    /// Largest number of database connections of this replica.
    #[arg(long, env = "TURBOCAT_DATABASE_MAX_CONNECTIONS", default_value_t = 20)]
    pub database_max_connections: u32,
    /// How long a request or a background task waits for a database connection (opening one
    /// included) before it gives up: a request then answers 503 SERVICE_UNAVAILABLE.
    #[arg(
        long,
        env = "TURBOCAT_DATABASE_ACQUIRE_TIMEOUT_SECONDS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub database_acquire_timeout_seconds: u64,
    /// Redis URL, e.g. `redis://redis:6379`.
    #[arg(long, env = "TURBOCAT_REDIS_URL")]
    pub redis_url: ConnectionUrl,
    /// Prefix of the queue, event and lease keys in Redis; replicas of one installation must
    /// agree on it, installations sharing a Redis must not.
    #[arg(long, env = "TURBOCAT_REDIS_KEY_PREFIX", default_value = "turbocat:")]
    pub redis_key_prefix: String,
    /// How long a Redis command waits for a connection (opening one included) and for its
    /// answer before it gives up; the dispatcher then pauses instead of stalling.
    #[arg(
        long,
        env = "TURBOCAT_REDIS_TIMEOUT_SECONDS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub redis_timeout_seconds: u64,
    /// JWT signing secret, at least 32 bytes; required with HS256 (the default algorithm).
    #[arg(long, env = "TURBOCAT_JWT_SECRET")]
    pub jwt_secret: Option<Secret>,
    #[command(flatten)]
    pub jwt_keys: JwtKeyArgs,
}

/// Which database a one-shot command works on: `--database-url`, or the `dev` SQLite file.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL (or `sqlite://path`); default: the SQLite file of `--data-dir`.
    #[arg(long, env = "TURBOCAT_DATABASE_URL")]
    pub database_url: Option<ConnectionUrl>,
    /// Directory of the `dev` SQLite database.
    #[arg(long, env = "TURBOCAT_DATA_DIR", default_value = ".turbocat")]
    pub data_dir: PathBuf,
}

/// `turbocat migrate`: apply every migration this release has, or revert the newest ones.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Revert the newest N applied migrations (newest first) with their down scripts, instead
    /// of applying. Refused on a database a newer release migrated: revert with that release.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub down: Option<u32>,
    /// Succeed on a database a newer release has migrated further (its migrations are kept and
    /// listed), as `serve` and `dev` do; without it `migrate` refuses such a database, since
    /// running an older release's `migrate` there is usually a mistake.
    #[arg(long, conflicts_with = "down")]
    pub allow_newer: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Email of the demo admin.
    #[arg(long, env = "TURBOCAT_ADMIN_EMAIL", default_value = "admin@turbocat.local")]
    pub admin_email: String,
    /// Password of the demo admin (8 to 128 characters); generated and printed once if unset.
    #[arg(long, env = "TURBOCAT_ADMIN_PASSWORD")]
    pub admin_password: Option<Secret>,
}

/// The runner's API key, when it comes from the environment.
pub const API_KEY_VARIABLE: &str = "TURBOCAT_API_KEY";
/// Set (to `true`) by the runner when it restarts itself with its key on stdin.
pub const API_KEY_ON_STDIN_VARIABLE: &str = "TURBOCAT_API_KEY_ON_STDIN";

#[derive(Debug, Clone, Args)]
pub struct RunnerArgs {
    /// Servers to attach to, comma-separated, e.g. `https://turbocat.example.com` (a load
    /// balancer) or `http://replica-1:8080,http://replica-2:8080`: the runner attaches to the
    /// first and moves to the next when its stream breaks, its server asks it to move, or the
    /// server cannot be reached.
    #[arg(
        long,
        env = "TURBOCAT_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: Vec<String>,
    /// API key with the `runner` scope, from the environment only (`TURBOCAT_API_KEY`): a
    /// command line is readable by every process of the machine.
    #[arg(skip = std::env::var("TURBOCAT_API_KEY").ok().map(Secret::new))]
    pub api_key: Option<Secret>,
    /// File holding the API key (its first line), read at start; instead of
    /// `TURBOCAT_API_KEY`.
    #[arg(long, env = "TURBOCAT_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Read the API key from the first line of stdin: how the runner hands `TURBOCAT_API_KEY`
    /// over to itself when it restarts without it in its environment (see `main`).
    #[arg(long, env = API_KEY_ON_STDIN_VARIABLE, hide = true)]
    pub api_key_on_stdin: bool,
    /// Name shown in `GET /api/v1/runners`.
    #[arg(long, env = "TURBOCAT_RUNNER_NAME")]
    pub name: Option<String>,
    /// Steps run at once.
    #[arg(long, env = "TURBOCAT_RUNNER_CAPACITY", default_value_t = 4)]
    pub capacity: u32,
    /// Labels, comma-separated: `gpu,region=eu`.
    #[arg(long, env = "TURBOCAT_RUNNER_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// On SIGTERM, how long to finish the steps held before handing them back.
    #[arg(long, env = "TURBOCAT_RUNNER_DRAIN_SECONDS", default_value_t = 30)]
    pub drain_seconds: u64,
    /// Largest gRPC message, in bytes.
    #[arg(long, env = "TURBOCAT_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
    #[command(flatten)]
    pub llm_keys: LlmKeyArgs,
}

/// Which of the runner's environment variables LLM agents may use as API keys.
#[derive(Debug, Clone, Default, Args)]
pub struct LlmKeyArgs {
    /// Variables LLM agents may name in `apiKeyRef: env:NAME`, comma-separated, each for any
    /// base URL or only one host: `OPENAI_API_KEY@api.openai.com,ANTHROPIC_API_KEY`. None by
    /// default; `TURBOCAT_*` settings never.
    #[arg(long, env = "TURBOCAT_LLM_KEY_ENV", value_delimiter = ',')]
    pub llm_key_env: Vec<String>,
}

impl LlmKeyArgs {
    /// The policy the LLM executor applies, or the flag at fault.
    pub fn policy(&self) -> Result<crate::runner::executors::llm::LlmKeyPolicy, SettingError> {
        crate::runner::executors::llm::LlmKeyPolicy::parse(
            self.llm_key_env.iter().map(String::as_str),
        )
        .map_err(|problem| SettingError {
            flag: "--llm-key-env",
            variable: "TURBOCAT_LLM_KEY_ENV",
            problem,
        })
    }
}

impl RunnerArgs {
    /// The API key: from `--api-key-file`, else from stdin (handed over), else from
    /// `TURBOCAT_API_KEY`.
    fn read_api_key(&self) -> Result<Secret, SettingError> {
        if self.api_key_file.is_none() && self.api_key_on_stdin {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            let key = line.trim();
            if !key.is_empty() {
                return Ok(Secret::new(key));
            }
        }
        let Some(path) = &self.api_key_file else {
            return self.api_key.clone().ok_or(SettingError {
                flag: "--api-key-file",
                variable: "TURBOCAT_API_KEY",
                problem: "required: an API key with the runner scope, in the variable or a file"
                    .to_owned(),
            });
        };
        let file_error = |problem: String| SettingError {
            flag: "--api-key-file",
            variable: "TURBOCAT_API_KEY_FILE",
            problem,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| file_error(format!("cannot read {}: {error}", path.display())))?;
        let key = text.lines().next().unwrap_or_default().trim();
        if key.is_empty() {
            return Err(file_error(format!("{} holds no key", path.display())));
        }
        Ok(Secret::new(key))
    }

    /// The servers of `--server`, each checked: at least one, every one an `http://` or
    /// `https://` URL with a host.
    fn server_urls(&self) -> Result<Vec<String>, SettingError> {
        let error = |problem: String| SettingError {
            flag: "--server",
            variable: "TURBOCAT_SERVER",
            problem,
        };
        let mut urls = Vec::with_capacity(self.server.len());
        for given in self.server.iter().map(|url| url.trim()) {
            if given.is_empty() {
                return Err(error(
                    "an empty URL in the list; expected http://host:port, comma-separated"
                        .to_owned(),
                ));
            }
            let parsed = url::Url::parse(given).map_err(|parse_error| {
                error(format!("{given:?} is not a URL ({parse_error}); expected http://host:port or https://host"))
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(error(format!(
                    "{given:?} has the scheme `{}`; expected http:// or https://",
                    parsed.scheme()
                )));
            }
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(error(format!("{given:?} names no host")));
            }
            let url = given.trim_end_matches('/').to_owned();
            if !urls.contains(&url) {
                urls.push(url);
            }
        }
        if urls.is_empty() {
            return Err(error("required: at least one server URL".to_owned()));
        }
        Ok(urls)
    }

    /// The runner's settings, or the flag at fault.
    pub fn settings(&self) -> Result<crate::runner::client::RunnerSettings, SettingError> {
        let server_urls = self.server_urls()?;
        let api_key = self.read_api_key()?;
        if !(1..=1000).contains(&self.capacity) {
            return Err(SettingError {
                flag: "--capacity",
                variable: "TURBOCAT_RUNNER_CAPACITY",
                problem: "must be between 1 and 1000".to_owned(),
            });
        }
        let mut labels = std::collections::BTreeMap::new();
        for label in self.labels.iter().map(|label| label.trim()).filter(|label| !label.is_empty())
        {
            let (key, value) = label.split_once('=').unwrap_or((label, ""));
            if key.trim().is_empty() {
                return Err(SettingError {
                    flag: "--labels",
                    variable: "TURBOCAT_RUNNER_LABELS",
                    problem: format!("{label:?} has no name before ="),
                });
            }
            labels.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        let name = self.name.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|host| !host.is_empty())
                .unwrap_or_else(|| "runner".to_owned())
        });
        Ok(crate::runner::client::RunnerSettings {
            server_urls,
            api_key: api_key.expose().to_owned(),
            name,
            labels,
            capacity: self.capacity,
            agent_types: crate::runner::client::RunnerSettings::default_agent_types(),
            drain_grace: std::time::Duration::from_secs(self.drain_seconds),
            max_message_bytes: self.max_message_bytes,
            llm_keys: std::sync::Arc::new(self.llm_keys.policy()?),
        })
    }
}

/// A setting that failed validation: names the flag and its variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} ({variable}): {problem}")]
pub struct SettingError {
    pub flag: &'static str,
    pub variable: &'static str,
    pub problem: String,
}

pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Checks a JWT secret's length.
pub fn validate_jwt_secret(secret: &Secret) -> Result<(), SettingError> {
    if secret.expose().len() < MIN_JWT_SECRET_BYTES {
        return Err(SettingError {
            flag: "--jwt-secret",
            variable: "TURBOCAT_JWT_SECRET",
            problem: format!("must be at least {MIN_JWT_SECRET_BYTES} bytes"),
        });
    }
    Ok(())
}

/// The HS256 secret of `serve`: required, and long enough.
pub fn required_jwt_secret(secret: Option<&Secret>) -> Result<Secret, SettingError> {
    let secret = secret.ok_or(SettingError {
        flag: "--jwt-secret",
        variable: "TURBOCAT_JWT_SECRET",
        problem: "required with --jwt-algorithm HS256 (the default)".to_owned(),
    })?;
    validate_jwt_secret(secret)?;
    Ok(secret.clone())
}

/// Refuses a `--jwt-secret` that the chosen algorithm would silently ignore: with a key pair,
/// a forgotten secret in the environment must not look like it protects anything.
pub fn reject_unused_jwt_secret(
    algorithm: JwtAlgorithm,
    secret: Option<&Secret>,
) -> Result<(), SettingError> {
    if algorithm == JwtAlgorithm::Hs256 || secret.is_none() {
        return Ok(());
    }
    Err(SettingError {
        flag: "--jwt-secret",
        variable: "TURBOCAT_JWT_SECRET",
        problem: "is not used with --jwt-algorithm EdDSA or RS256 (tokens are signed with the key \
                  files); remove it"
            .to_owned(),
    })
}

/// Checks that a database URL is one Turbocat can open.
pub fn validate_database_url(url: &ConnectionUrl, postgres_only: bool) -> Result<(), SettingError> {
    let error = |problem: String| SettingError {
        flag: "--database-url",
        variable: "TURBOCAT_DATABASE_URL",
        problem,
    };
    let parsed = url::Url::parse(url.expose()).map_err(|parse_error| {
        error(format!(
            "not a URL ({parse_error}); expected postgres://user:password@host:5432/database"
        ))
    })?;
    match parsed.scheme() {
        "postgres" | "postgresql" => {
            if parsed.host_str().is_none_or(str::is_empty) {
                return Err(error("the URL names no host".into()));
            }
            Ok(())
        }
        "sqlite" if !postgres_only => Ok(()),
        other => Err(error(format!(
            "unsupported scheme `{other}`; expected postgres://{}",
            if postgres_only { "" } else { " or sqlite://" }
        ))),
    }
}

/// Checks that a Redis URL parses.
pub fn validate_redis_url(url: &ConnectionUrl) -> Result<(), SettingError> {
    let error = |problem: String| SettingError {
        flag: "--redis-url",
        variable: "TURBOCAT_REDIS_URL",
        problem,
    };
    let parsed = url::Url::parse(url.expose()).map_err(|parse_error| {
        error(format!("not a URL ({parse_error}); expected redis://host:6379"))
    })?;
    match parsed.scheme() {
        "redis" | "rediss" => Ok(()),
        other => {
            Err(error(format!("unsupported scheme `{other}`; expected redis:// or rediss://")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner_args(arguments: &[&str]) -> RunnerArgs {
        let mut full = vec!["turbocat", "runner"];
        full.extend_from_slice(arguments);
        match Cli::parse_from(full).command {
            Command::Runner(args) => args,
            other => panic!("not a runner: {other:?}"),
        }
    }

    #[test]
    fn the_runner_key_comes_from_a_file_never_from_the_command_line() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let key_file = directory.path().join("key");
        std::fs::write(&key_file, "tc_runner_key\nignored\n").expect("write the key");
        let path = key_file.to_str().expect("utf-8 path");
        let settings = runner_args(&["--api-key-file", path]).settings().expect("settings");
        assert_eq!(settings.api_key, "tc_runner_key");

        std::fs::write(&key_file, "  \n").expect("write an empty key");
        let error = runner_args(&["--api-key-file", path]).settings().expect_err("empty");
        assert_eq!(error.flag, "--api-key-file");
        let missing = directory.path().join("missing");
        let error = runner_args(&["--api-key-file", missing.to_str().expect("utf-8")])
            .settings()
            .expect_err("missing");
        assert!(error.problem.contains("cannot read"), "{error}");

        // There is no flag that would put the key on the command line.
        let refused = Cli::try_parse_from(["turbocat", "runner", "--api-key", "tc_visible"]);
        assert!(refused.is_err());
    }

    #[test]
    fn the_runner_takes_several_servers_and_checks_each() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let key_file = directory.path().join("key");
        std::fs::write(&key_file, "tc_runner_key\n").expect("write the key");
        let key = key_file.to_str().expect("utf-8 path");
        let settings = runner_args(&["--api-key-file", key]).settings().expect("the default");
        assert_eq!(settings.server_urls, ["http://127.0.0.1:8080"]);
        let settings = runner_args(&[
            "--api-key-file",
            key,
            "--server",
            " http://a.internal:8080/, https://b.internal,http://a.internal:8080",
        ])
        .settings()
        .expect("a list");
        assert_eq!(settings.server_urls, ["http://a.internal:8080", "https://b.internal"]);

        for bad in ["http://ok:1,not a url", "http://ok:1,,http://ok:2", "ftp://files", "http://"] {
            let error =
                runner_args(&["--api-key-file", key, "--server", bad]).settings().expect_err(bad);
            assert_eq!(error.flag, "--server", "{bad}");
            assert_eq!(error.variable, "TURBOCAT_SERVER", "{bad}");
        }
        let error = runner_args(&["--api-key-file", key, "--server", "http://ok:1,not a url"])
            .settings()
            .expect_err("not a url");
        assert!(error.problem.contains("\"not a url\" is not a URL"), "{error}");
    }
}
