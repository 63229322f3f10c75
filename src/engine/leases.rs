//! Runner liveness, kept off the database. Leases: how long the runner holding an attempt is
//! known to be alive. Heartbeats land here, never in the database (which keeps only the lease
//! granted at assignment): in this process's memory, and in Redis in `serve` so every
//! replica's reconciler sees the runners attached to the others. The reconciler asks
//! `expires_at` before it takes a step back from a runner whose database lease has run out.
//! The runner directory: in `serve` each replica writes the runners attached to it to Redis
//! every `DIRECTORY_REFRESH` (entries expire after `DIRECTORY_TTL`), so `ListRunners` on any
//! replica shows them all.
//!
//! Redis losing its keys (a restart, `FLUSHALL`) only costs the replicas that do not hold the
//! runner their view: the holding replica still answers from memory, and the runner's next
//! heartbeat (or the next directory refresh) writes the key again.
//! May call: redis (through `crate::redis_pool`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;

use crate::proto::v1 as pb;

use crate::redis_pool::RedisPool;
use crate::store::AttemptKey;

/// Where leases are extended and read.
pub struct LeaseBook {
    local: Mutex<HashMap<AttemptKey, DateTime<Utc>>>,
    shared: Option<SharedLeases>,
}

struct SharedLeases {
    pool: RedisPool,
    prefix: String,
}

impl LeaseBook {
    /// Leases of this process only (`dev`).
    pub fn in_memory() -> Self {
        Self { local: Mutex::new(HashMap::new()), shared: None }
    }

    /// Leases shared through Redis under `prefix` (`serve`).
    pub fn shared(pool: RedisPool, prefix: impl Into<String>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            shared: Some(SharedLeases { pool, prefix: prefix.into() }),
        }
    }

    /// Records that the holder of `key` is alive until `until` (later extensions win).
    pub async fn extend(&self, key: AttemptKey, until: DateTime<Utc>) {
        if let Ok(mut local) = self.local.lock() {
            let entry = local.entry(key).or_insert(until);
            if *entry < until {
                *entry = until;
            }
        }
        if let Some(shared) = &self.shared {
            let ttl_millis = (until - Utc::now()).num_milliseconds().max(1) + 60_000;
            let result = async {
                let mut connection = shared.pool.connection().await?;
                redis::cmd("SET")
                    .arg(shared.key(key))
                    .arg(until.timestamp_millis())
                    .arg("PX")
                    .arg(ttl_millis)
                    .query_async::<()>(&mut *connection)
                    .await
                    .map_err(crate::redis_pool::RedisCommandError::Command)
            }
            .await;
            if let Err(error) = result {
                tracing::warn!(%error, "could not share a lease extension through Redis");
            }
        }
    }

    /// The latest time the lease of `key` was extended to, here or (in `serve`) on any replica.
    pub async fn expires_at(&self, key: AttemptKey) -> Option<DateTime<Utc>> {
        let local = self.local.lock().ok().and_then(|local| local.get(&key).copied());
        let shared = match &self.shared {
            Some(shared) => shared.read(key).await,
            None => None,
        };
        local.max(shared)
    }

    /// Drops what is known of `key` (the attempt finished or moved on).
    pub async fn forget(&self, key: AttemptKey) {
        if let Ok(mut local) = self.local.lock() {
            local.remove(&key);
        }
        if let Some(shared) = &self.shared {
            let result = async {
                let mut connection = shared.pool.connection().await?;
                redis::cmd("DEL")
                    .arg(shared.key(key))
                    .query_async::<()>(&mut *connection)
                    .await
                    .map_err(crate::redis_pool::RedisCommandError::Command)
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, "could not drop a shared lease");
            }
        }
    }
}

/// How often a replica writes its attached runners to the shared directory.
pub const DIRECTORY_REFRESH: Duration = Duration::from_secs(2);
/// How long a directory entry outlives its last refresh (a replica that died drops out).
const DIRECTORY_TTL: Duration = Duration::from_secs(10);

impl LeaseBook {
    /// Writes the runners attached to this process to the shared directory (`serve`).
    pub async fn share_runners(&self, runners: &[pb::Runner]) {
        let Some(shared) = &self.shared else { return };
        if runners.is_empty() {
            return;
        }
        let expires = Utc::now().timestamp_millis()
            + i64::try_from(DIRECTORY_TTL.as_millis()).unwrap_or(i64::MAX);
        let mut pipeline = redis::pipe();
        for runner in runners {
            pipeline
                .cmd("SET")
                .arg(shared.runner_key(&runner.id))
                .arg(runner.encode_to_vec())
                .arg("PX")
                .arg(DIRECTORY_TTL.as_millis() as u64)
                .ignore()
                .cmd("ZADD")
                .arg(shared.directory_key())
                .arg(expires)
                .arg(&runner.id)
                .ignore();
        }
        let result = async {
            let mut connection = shared.pool.connection().await?;
            pipeline
                .query_async::<()>(&mut *connection)
                .await
                .map_err(crate::redis_pool::RedisCommandError::Command)
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not share the attached runners");
        }
    }

    /// Drops a runner that detached from the shared directory at once.
    pub async fn forget_runner(&self, runner_id: &str) {
        let Some(shared) = &self.shared else { return };
        let result = async {
            let mut connection = shared.pool.connection().await?;
            redis::pipe()
                .cmd("DEL")
                .arg(shared.runner_key(runner_id))
                .ignore()
                .cmd("ZREM")
                .arg(shared.directory_key())
                .arg(runner_id)
                .ignore()
                .query_async::<()>(&mut *connection)
                .await
                .map_err(crate::redis_pool::RedisCommandError::Command)
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not drop a runner from the shared directory");
        }
    }

    /// The runners every replica shared (`serve`); empty in `dev` or when Redis cannot answer
    /// (the caller still knows its own runners).
    pub async fn shared_runners(&self) -> Vec<pb::Runner> {
        let Some(shared) = &self.shared else { return Vec::new() };
        match shared.runners().await {
            Ok(runners) => runners,
            Err(error) => {
                tracing::warn!(%error, "could not read the shared runner directory");
                Vec::new()
            }
        }
    }
}

impl SharedLeases {
    fn runner_key(&self, runner_id: &str) -> String {
        format!("{}runner:{runner_id}", self.prefix)
    }

    fn directory_key(&self) -> String {
        format!("{}runners", self.prefix)
    }

    async fn runners(&self) -> Result<Vec<pb::Runner>, crate::redis_pool::RedisCommandError> {
        let mut connection = self.pool.connection().await?;
        let now = Utc::now().timestamp_millis();
        let (ids,): (Vec<String>,) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(self.directory_key())
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("ZRANGE")
            .arg(self.directory_key())
            .arg(0)
            .arg(-1)
            .query_async(&mut *connection)
            .await
            .map_err(crate::redis_pool::RedisCommandError::Command)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.runner_key(id)).collect();
        let entries: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut *connection)
            .await
            .map_err(crate::redis_pool::RedisCommandError::Command)?;
        Ok(entries
            .into_iter()
            .flatten()
            .filter_map(|bytes| pb::Runner::decode(bytes.as_slice()).ok())
            .collect())
    }

    fn key(&self, key: AttemptKey) -> String {
        format!("{}lease:{}:{}", self.prefix, key.step_run_id, key.attempt)
    }

    async fn read(&self, key: AttemptKey) -> Option<DateTime<Utc>> {
        let mut connection = self.pool.connection().await.ok()?;
        let millis: Option<i64> =
            redis::cmd("GET").arg(self.key(key)).query_async(&mut *connection).await.ok()?;
        millis.and_then(DateTime::from_timestamp_millis)
    }
}
