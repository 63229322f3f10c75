//! The shared runner directory: in `serve` each replica writes the runners attached to it to
//! Redis every `DIRECTORY_REFRESH` (entries expire after `DIRECTORY_TTL`), so `ListRunners` on
//! any replica shows them all; it announces itself the same way, so system health can count
//! the replicas alive. In `dev` there is one process and the directory is empty (the
//! engine answers from its attached runners). Redis losing its keys costs the other replicas
//! their view until the next refresh.
//! May call: redis (through `crate::redis_pool`).

use std::time::Duration;

use chrono::Utc;
use prost::Message;

use crate::proto::v1 as pb;
use crate::redis_pool::RedisPool;

/// The runners attached to every replica, as last shared.
pub struct RunnerDirectory {
    shared: Option<SharedDirectory>,
}

struct SharedDirectory {
    pool: RedisPool,
    prefix: String,
}

impl RunnerDirectory {
    /// No directory beyond this process (`dev`).
    pub fn in_memory() -> Self {
        Self { shared: None }
    }

    /// A directory shared through Redis under `prefix` (`serve`).
    pub fn shared(pool: RedisPool, prefix: impl Into<String>) -> Self {
        Self { shared: Some(SharedDirectory { pool, prefix: prefix.into() }) }
    }
}

/// How often a replica writes its attached runners to the shared directory.
pub const DIRECTORY_REFRESH: Duration = Duration::from_secs(2);
/// How long a directory entry outlives its last refresh (a replica that died drops out).
const DIRECTORY_TTL: Duration = Duration::from_secs(10);

impl RunnerDirectory {
    /// Writes the runners attached to this process to the shared directory (`serve`).
    pub async fn share(&self, runners: &[pb::Runner]) {
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
                .map_err(crate::redis_pool::RedisCommandError::from)
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not share the attached runners");
        }
    }

    /// Drops a runner that detached from the shared directory at once.
    pub async fn forget(&self, runner_id: &str) {
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
                .map_err(crate::redis_pool::RedisCommandError::from)
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not drop a runner from the shared directory");
        }
    }

    /// Says the replica `replica_id` is alive for the next `DIRECTORY_TTL` (`serve`).
    pub async fn announce_replica(&self, replica_id: &str) {
        let Some(shared) = &self.shared else { return };
        let expires = Utc::now().timestamp_millis()
            + i64::try_from(DIRECTORY_TTL.as_millis()).unwrap_or(i64::MAX);
        let result = async {
            let mut connection = shared.pool.connection().await?;
            redis::cmd("ZADD")
                .arg(shared.replicas_key())
                .arg(expires)
                .arg(replica_id)
                .query_async::<()>(&mut *connection)
                .await
                .map_err(crate::redis_pool::RedisCommandError::from)
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not announce this replica");
        }
    }

    /// The replicas that announced themselves within `DIRECTORY_TTL`: 1 in `dev` (this
    /// process), `None` when Redis cannot answer.
    pub async fn replicas_alive(&self) -> Option<usize> {
        let Some(shared) = &self.shared else { return Some(1) };
        let result = async {
            let mut connection = shared.pool.connection().await?;
            let (count,): (usize,) = redis::pipe()
                .cmd("ZREMRANGEBYSCORE")
                .arg(shared.replicas_key())
                .arg("-inf")
                .arg(Utc::now().timestamp_millis())
                .ignore()
                .cmd("ZCARD")
                .arg(shared.replicas_key())
                .query_async(&mut *connection)
                .await
                .map_err(crate::redis_pool::RedisCommandError::from)?;
            Ok::<usize, crate::redis_pool::RedisCommandError>(count)
        }
        .await;
        match result {
            Ok(count) => Some(count),
            Err(error) => {
                tracing::debug!(%error, "could not count the replicas");
                None
            }
        }
    }

    /// The runners every replica shared (`serve`); empty in `dev` or when Redis cannot answer
    /// (the caller still knows its own runners).
    pub async fn list(&self) -> Vec<pb::Runner> {
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

impl SharedDirectory {
    fn runner_key(&self, runner_id: &str) -> String {
        format!("{}runner:{runner_id}", self.prefix)
    }

    fn directory_key(&self) -> String {
        format!("{}runners", self.prefix)
    }

    fn replicas_key(&self) -> String {
        format!("{}replicas", self.prefix)
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
            .map_err(crate::redis_pool::RedisCommandError::from)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.runner_key(id)).collect();
        let entries: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut *connection)
            .await
            .map_err(crate::redis_pool::RedisCommandError::from)?;
        Ok(entries
            .into_iter()
            .flatten()
            .filter_map(|bytes| pb::Runner::decode(bytes.as_slice()).ok())
            .collect())
    }
}
