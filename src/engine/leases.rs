//! Runner liveness, kept off the database. Leases: how long the runner holding an attempt is
//! known to be alive. Heartbeats land here, never in the database (which keeps only the lease
//! granted at assignment): in this process's memory, and in Redis in `serve` so every
//! replica's reconciler sees the runners attached to the others. The reconciler asks
//! `expires_at` before it takes a step back from a runner whose database lease has run out.
//!
//! The lease an assignment grants is in the database already: it is kept in memory only, so a
//! short step costs Redis nothing here.
//!
//! Redis losing its keys (a restart, `FLUSHALL`) only costs the replicas that do not hold the
//! runner their view: the holding replica still answers from memory, and the runner's next
//! heartbeat writes the key again.
//! Redis unreachable: extensions still land in memory, and the failure is warned about once per
//! outage (`crate::outage`), not once per heartbeat.
//! May call: redis (through `crate::redis_pool`) and `crate::outage`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::outage::Outage;
use crate::redis_pool::RedisPool;
use crate::store::AttemptKey;
use chrono::{DateTime, Utc};

/// Where leases are extended and read.
pub struct Leases {
    local: Mutex<HashMap<AttemptKey, LocalLease>>,
    shared: Option<SharedLeases>,
}

#[derive(Clone, Copy)]
struct LocalLease {
    until: DateTime<Utc>,
    /// Whether this process wrote the lease to Redis (so `forget` deletes it there).
    shared: bool,
}

struct SharedLeases {
    pool: RedisPool,
    prefix: String,
    /// Whether Redis refused the last extension; `outage` is locked only then (and on errors).
    failing: AtomicBool,
    outage: Mutex<Outage>,
}

impl Leases {
    /// Leases of this process only (`dev`).
    pub fn in_memory() -> Self {
        Self { local: Mutex::new(HashMap::new()), shared: None }
    }

    /// Leases shared through Redis under `prefix` (`serve`).
    pub fn shared(pool: RedisPool, prefix: impl Into<String>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            shared: Some(SharedLeases {
                pool,
                prefix: prefix.into(),
                failing: AtomicBool::new(false),
                outage: Mutex::new(Outage::new("sharing lease extensions through Redis")),
            }),
        }
    }

    /// Records the lease an assignment granted (and committed with the step run): in memory
    /// only, since every reader also looks at the database's lease.
    pub fn granted(&self, key: AttemptKey, until: DateTime<Utc>) {
        self.remember(key, until, false);
    }

    fn remember(&self, key: AttemptKey, until: DateTime<Utc>, shared: bool) {
        if let Ok(mut local) = self.local.lock() {
            let entry = local.entry(key).or_insert(LocalLease { until, shared });
            entry.until = entry.until.max(until);
            entry.shared |= shared;
        }
    }

    /// Records that the holder of `key` is alive until `until` (later extensions win).
    pub async fn extend(&self, key: AttemptKey, until: DateTime<Utc>) {
        self.remember(key, until, self.shared.is_some());
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
                    .map_err(crate::redis_pool::RedisCommandError::from)
            }
            .await;
            shared.record(result.err());
        }
    }

    /// The latest time the lease of `key` was extended to, here or (in `serve`) on any replica.
    pub async fn expires_at(&self, key: AttemptKey) -> Option<DateTime<Utc>> {
        let local =
            self.local.lock().ok().and_then(|local| local.get(&key).map(|lease| lease.until));
        let shared = match &self.shared {
            Some(shared) => shared.read(key).await,
            None => None,
        };
        local.max(shared)
    }

    /// Drops what is known of `key` (the attempt finished or moved on). A lease another
    /// replica shared expires in Redis by itself.
    pub async fn forget(&self, key: AttemptKey) {
        let was_shared = self
            .local
            .lock()
            .ok()
            .and_then(|mut local| local.remove(&key))
            .is_some_and(|lease| lease.shared);
        if let Some(shared) = self.shared.as_ref().filter(|_| was_shared) {
            let result = async {
                let mut connection = shared.pool.connection().await?;
                redis::cmd("DEL")
                    .arg(shared.key(key))
                    .query_async::<()>(&mut *connection)
                    .await
                    .map_err(crate::redis_pool::RedisCommandError::from)
            }
            .await;
            if let Err(error) = result {
                tracing::debug!(%error, "could not drop a shared lease");
            }
        }
    }
}

impl SharedLeases {
    /// Notes how an extension went: one warning when Redis starts failing, one line when it
    /// answers again.
    fn record(&self, error: Option<crate::redis_pool::RedisCommandError>) {
        match error {
            None if !self.failing.load(Ordering::Relaxed) => {}
            None => {
                self.failing.store(false, Ordering::Relaxed);
                if let Ok(mut outage) = self.outage.lock() {
                    outage.succeeded();
                }
            }
            Some(error) => {
                self.failing.store(true, Ordering::Relaxed);
                if let Ok(mut outage) = self.outage.lock() {
                    outage.failed(&error);
                }
            }
        }
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
