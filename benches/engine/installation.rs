//! One installation under test: `turbocat serve` on a fresh PostgreSQL database and a private
//! Redis, or `turbocat dev` on a fresh SQLite directory; its runners, its benchmark account and
//! the two no-op agents, and the probe that reads what it costs.
//! May call: the processes module, the client, the measure module.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde_json::json;

use crate::client::{Client, EngineDatabase, StepKind};
use crate::measure::{PostgresCounter, Probe, RedisCounter, StatisticsFlush};
use crate::processes::{
    RedisInstance, ScratchDatabase, Spawned, admin_database_url, start_runner,
    start_turbocat_server,
};
use crate::stub::Stub;
use crate::{Mode, Outcome};

/// Slots of every `turbocat runner` the bench starts.
pub const RUNNER_CAPACITY: u32 = 100;
/// Slots of the runner inside `turbocat dev` (fixed by the server).
pub const DEV_LOCAL_RUNNER_CAPACITY: u32 = 8;

/// Connections of the `serve` database pool (passed explicitly: the statistics flush of the
/// measure module must reach every one of them).
const SERVE_DATABASE_CONNECTIONS: usize = 20;

const JWT_SECRET: &str = "benchmark-secret-that-is-long-enough-0123456789";

enum Storage {
    Sqlite { _directory: tempfile::TempDir },
    Postgres { database: ScratchDatabase, redis: RedisInstance, key_prefix: String },
}

/// Memory figures gathered across the scenarios of a run, reported by the memory scenario.
#[derive(Debug, Default, Clone)]
pub struct MemoryFigures {
    pub server_idle_bytes: Option<u64>,
    pub runner_idle_bytes: Option<u64>,
    pub server_peak_under_load_bytes: Option<u64>,
    pub runner_peak_under_load_bytes: Option<u64>,
}

pub struct Installation {
    pub mode: Mode,
    pub server: Spawned,
    pub client: Client,
    pub database: EngineDatabase,
    pub probe: Probe,
    pub stub: Stub,
    pub runner_key: String,
    pub runners: Vec<Spawned>,
    pub data_agent: String,
    pub api_agent: String,
    pub memory: MemoryFigures,
    storage: Storage,
}

impl Installation {
    pub async fn start(mode: Mode, stub: &Stub) -> Outcome<Self> {
        let own_transactions = Arc::new(AtomicU64::new(0));
        let (server, base_url, database, probe, storage) = match mode {
            Mode::Dev => {
                let directory = tempfile::tempdir()?;
                let data_dir =
                    directory.path().to_str().ok_or("the data directory is not UTF-8")?.to_owned();
                let (server, base_url) = start_turbocat_server(
                    "dev",
                    &["dev", "--listen", "127.0.0.1:0", "--data-dir", &data_dir],
                )?;
                let database =
                    EngineDatabase::sqlite(&directory.path().join("turbocat.db")).await?;
                let probe = Probe::new(Some(server.pid()), None, None, own_transactions);
                (server, base_url, database, probe, Storage::Sqlite { _directory: directory })
            }
            Mode::Serve => {
                let scratch = ScratchDatabase::create("turbocat_bench").await?;
                let redis = RedisInstance::start().await?;
                let key_prefix = format!("turbocat-bench:{}:", uuid::Uuid::new_v4().simple());
                let rate_limit_prefix = format!("{key_prefix}ratelimit:");
                let (server, base_url) = start_turbocat_server(
                    "serve",
                    &[
                        "serve",
                        "--listen",
                        "127.0.0.1:0",
                        "--database-url",
                        &scratch.url,
                        "--redis-url",
                        &redis.url,
                        "--redis-key-prefix",
                        &key_prefix,
                        "--rate-limit-key-prefix",
                        &rate_limit_prefix,
                        "--jwt-secret",
                        JWT_SECRET,
                        "--database-max-connections",
                        &SERVE_DATABASE_CONNECTIONS.to_string(),
                    ],
                )?;
                let database =
                    EngineDatabase::postgres(&scratch.url, own_transactions.clone()).await?;
                let flush = StatisticsFlush {
                    http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
                    health_url: format!("{base_url}/health"),
                    requests: 2 * SERVE_DATABASE_CONNECTIONS,
                    own_connection: database.postgres_connection(),
                };
                let probe = Probe::new(
                    Some(server.pid()),
                    Some(RedisCounter::connect(&redis.url, redis.pid).await?),
                    Some(
                        PostgresCounter::connect(&admin_database_url(), &scratch.name, Some(flush))
                            .await?,
                    ),
                    own_transactions,
                );
                (
                    server,
                    base_url,
                    database,
                    probe,
                    Storage::Postgres { database: scratch, redis, key_prefix },
                )
            }
        };
        let client = Client::register(&base_url).await?;
        let runner_key = client.runner_key().await?;
        let data_agent = client
            .create_agent(json!({ "name": "no-op data", "type": "DATA", "config": { "data": { "jqProgram": "." } } }))
            .await?;
        let api_agent = client
            .create_agent(
                json!({ "name": "no-op api", "type": "API", "config": stub.agent_config() }),
            )
            .await?;
        Ok(Self {
            mode,
            server,
            client,
            database,
            probe,
            stub: stub.clone(),
            runner_key,
            runners: Vec::new(),
            data_agent,
            api_agent,
            memory: MemoryFigures::default(),
            storage,
        })
    }

    /// The run's PostgreSQL database (`serve`).
    pub fn postgres_database(&self) -> Option<&ScratchDatabase> {
        match &self.storage {
            Storage::Postgres { database, .. } => Some(database),
            Storage::Sqlite { .. } => None,
        }
    }

    pub fn agent(&self, kind: StepKind) -> &str {
        match kind {
            StepKind::Data => &self.data_agent,
            StepKind::Api => &self.api_agent,
        }
    }

    /// The `turbocat runner` processes that make "one runner": one on `serve`, none on `dev`
    /// (its own runner).
    pub fn one_runner(&self) -> usize {
        match self.mode {
            Mode::Serve => 1,
            Mode::Dev => 0,
        }
    }

    /// How the runners of a scenario are described.
    pub fn runners_label(&self, external: usize) -> String {
        let local = format!("local ×{DEV_LOCAL_RUNNER_CAPACITY}");
        match (self.mode, external) {
            (Mode::Dev, 0) => local,
            (Mode::Dev, count) => format!("{local} + {count} runners ×{RUNNER_CAPACITY}"),
            (Mode::Serve, 1) => format!("1 runner ×{RUNNER_CAPACITY}"),
            (Mode::Serve, count) => format!("{count} runners ×{RUNNER_CAPACITY}"),
        }
    }

    /// Runs exactly `count` `turbocat runner` processes (stopping or starting some) and waits
    /// until the server lists them (with `dev`'s own runner).
    pub async fn set_runners(&mut self, count: usize) -> Outcome<()> {
        self.runners.truncate(count);
        while self.runners.len() < count {
            let label = format!("{}-runner-{}", self.mode.name(), self.runners.len() + 1);
            let base_url = self.client.base_url.clone();
            self.runners.push(start_runner(&base_url, &self.runner_key, &label, RUNNER_CAPACITY)?);
        }
        let expected = count + usize::from(self.mode == Mode::Dev);
        self.client.wait_for_runners(expected, Duration::from_secs(30)).await?;
        self.probe.runner_pids = self.runners.iter().map(Spawned::pid).collect();
        Ok(())
    }

    /// Explains a failure with the last lines of the server's and runners' logs.
    pub fn logs(&self) -> String {
        let mut text = format!("server log:\n{}", self.server.log_tail());
        for runner in &self.runners {
            text.push_str(&format!("\n{} log:\n{}", runner.label, runner.log_tail()));
        }
        text
    }

    /// Stops every process and removes the run's database and Redis keys.
    pub async fn finish(self) -> Outcome<()> {
        let Self { server, runners, database, probe, storage, .. } = self;
        drop(runners);
        drop(server);
        drop(database);
        drop(probe);
        if let Storage::Postgres { database, redis, key_prefix } = storage {
            database.drop_database().await?;
            if redis.shared {
                redis.delete_prefix(&key_prefix).await?;
            }
        }
        Ok(())
    }
}
