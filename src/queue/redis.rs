//! The Redis queue of `turbocat serve`, shared by every server replica.
//!
//! Keys (all under `RedisQueueConfig::key_prefix`):
//! - `queue:ready`    sorted set, member `<step_run_id>:<attempt>`, score `ReadyRank` (queue order)
//! - `queue:inflight` sorted set, same members, score = claim deadline in Unix milliseconds
//! - `queue:items`    hash, member -> the item as JSON
//! - `queue:ranks`    hash, member -> its ready score (so `release`/`requeue` need no JSON in Lua)
//! - `queue:version`  counter, incremented whenever work becomes ready (the wake-up signal)
//!
//! Every operation that touches more than one key is a Lua script, so it is atomic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::{Script, ScriptInvocation};
use tokio::sync::watch;

use super::{
    EnqueueOutcome, MAX_BATCH, MAX_PEEK_LIMIT, Queue, QueueError, QueueItem, QueueKey, QueueResult,
    QueueStats, ReadyRank, claim_deadline_millis,
};
use crate::redis_pool::RedisPool;

/// Where the queue lives and how it behaves.
#[derive(Debug, Clone)]
pub struct RedisQueueConfig {
    /// Prefix of every key; tests use a random one so they can share one Redis.
    pub key_prefix: String,
    pub max_len: usize,
    /// How often a replica reads `queue:version` to notice work that another replica made ready.
    /// Changes made through this instance wake its subscribers immediately.
    pub wake_poll_interval: Duration,
}

impl Default for RedisQueueConfig {
    fn default() -> Self {
        Self {
            key_prefix: "turbocat:".to_owned(),
            max_len: super::DEFAULT_MAX_LEN,
            wake_poll_interval: Duration::from_millis(200),
        }
    }
}

/// A queue in Redis. Cloning shares the same state and wake-up channel.
#[derive(Clone)]
pub struct RedisQueue {
    shared: Arc<RedisQueueShared>,
}

struct RedisQueueShared {
    pool: RedisPool,
    keys: QueueKeys,
    scripts: QueueScripts,
    max_len: usize,
    wake_poll_interval: Duration,
    /// A local counter, bumped whenever work may have become ready (here or on another replica).
    ready_version: watch::Sender<u64>,
    version_tracker: Mutex<VersionTracker>,
    version_poller_started: AtomicBool,
}

/// What this replica knows of `queue:version`. The wake-up value is a local counter rather than
/// the Redis version itself, because the Redis version restarts at 0 when Redis is flushed.
#[derive(Debug, Default)]
struct VersionTracker {
    /// The last version seen; `None` until the first poll or local change.
    last_seen_redis_version: Option<u64>,
    /// Counts local changes, so a poll that overlapped one is discarded (its GET may have read
    /// a version older than the one the local change returned).
    local_observations: u64,
}

struct QueueKeys {
    ready: String,
    in_flight: String,
    items: String,
    ranks: String,
    version: String,
}

impl QueueKeys {
    fn new(prefix: &str) -> Self {
        Self {
            ready: format!("{prefix}queue:ready"),
            in_flight: format!("{prefix}queue:inflight"),
            items: format!("{prefix}queue:items"),
            ranks: format!("{prefix}queue:ranks"),
            version: format!("{prefix}queue:version"),
        }
    }
}

/// ARGV: the bound, then (member, rank, item JSON) for each item. Returns {version, statuses}:
/// the new version (0 when nothing was added), and for each item 1 when added, 0 when its key
/// exists (or came earlier in the batch), -1 when the queue was full. Reads before it writes,
/// and writes each key once for the whole batch.
const ENQUEUE_SCRIPT: &str = r"
local ready, items, ranks, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local max_len = tonumber(ARGV[1])
local count = (#ARGV - 1) / 3
local members = {}
for index = 1, count do members[index] = ARGV[3 * index - 1] end
local existing = redis.call('HMGET', items, unpack(members))
local room = max_len - redis.call('HLEN', items)
local version_now, statuses, seen = 0, {}, {}
local item_fields, rank_fields, scored = {}, {}, {}
for index = 1, count do
  local member = members[index]
  local rank, item_json = ARGV[3 * index], ARGV[3 * index + 1]
  if existing[index] or seen[member] then
    statuses[index] = 0
  elseif room <= 0 then
    statuses[index] = -1
  else
    seen[member] = true
    room = room - 1
    statuses[index] = 1
    table.insert(item_fields, member)
    table.insert(item_fields, item_json)
    table.insert(rank_fields, member)
    table.insert(rank_fields, rank)
    table.insert(scored, rank)
    table.insert(scored, member)
  end
end
if #item_fields > 0 then
  redis.call('HSET', items, unpack(item_fields))
  redis.call('HSET', ranks, unpack(rank_fields))
  redis.call('ZADD', ready, unpack(scored))
  version_now = redis.call('INCR', version)
end
return {version_now, statuses}
";

/// Returns {member, item JSON, …} of the first ARGV[1] ready members (JSON nil if missing).
const PEEK_SCRIPT: &str = r"
local members = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #members == 0 then return {} end
local item_jsons = redis.call('HMGET', KEYS[2], unpack(members))
local result = {}
for index, member in ipairs(members) do
  result[2 * index - 1] = member
  result[2 * index] = item_jsons[index]
end
return result
";

/// A Lua function of the claim and acknowledgement scripts: given members and their scores
/// (`ZMSCORE`), 1 for each member found at its first mention and 0 for the others, and the
/// members found.
macro_rules! first_found_lua {
    () => {
        r"
local function first_found(members, scores)
  local flags, seen, found = {}, {}, {}
  for index, member in ipairs(members) do
    if scores[index] and not seen[member] then
      seen[member] = true
      flags[index] = 1
      table.insert(found, member)
    else
      flags[index] = 0
    end
  end
  return flags, found
end
"
    };
}

/// ARGV: the claim deadline, then the members. Returns, for each member, 1 when this caller
/// moved it from ready to in-flight, 0 otherwise (not ready, or mentioned earlier). One member
/// takes two commands, a batch three.
const CLAIM_SCRIPT: &str = concat!(
    first_found_lua!(),
    r"
local ready, in_flight = KEYS[1], KEYS[2]
local deadline = ARGV[1]
if #ARGV == 2 then
  if redis.call('ZREM', ready, ARGV[2]) == 0 then return {0} end
  redis.call('ZADD', in_flight, deadline, ARGV[2])
  return {1}
end
local members = {}
for index = 2, #ARGV do members[index - 1] = ARGV[index] end
local result, moving = first_found(members, redis.call('ZMSCORE', ready, unpack(members)))
local deadlines = {}
for _, member in ipairs(moving) do
  table.insert(deadlines, deadline)
  table.insert(deadlines, member)
end
if #moving > 0 then
  redis.call('ZREM', ready, unpack(moving))
  redis.call('ZADD', in_flight, unpack(deadlines))
end
return result
"
);

/// ARGV: the members. Returns, for each member, 1 when it was in flight and is now gone, 0
/// otherwise (not in flight, or mentioned earlier). One member takes three commands, a batch
/// four.
const ACK_SCRIPT: &str = concat!(
    first_found_lua!(),
    r"
local in_flight, items, ranks = KEYS[1], KEYS[2], KEYS[3]
if #ARGV == 1 then
  if redis.call('ZREM', in_flight, ARGV[1]) == 0 then return {0} end
  redis.call('HDEL', items, ARGV[1])
  redis.call('HDEL', ranks, ARGV[1])
  return {1}
end
local result, gone = first_found(ARGV, redis.call('ZMSCORE', in_flight, unpack(ARGV)))
if #gone > 0 then
  redis.call('ZREM', in_flight, unpack(gone))
  redis.call('HDEL', items, unpack(gone))
  redis.call('HDEL', ranks, unpack(gone))
end
return result
"
);

/// Returns the new version when the member went back to ready, 0 when it was not in flight.
/// Checks before writing: a script that fails halfway does not roll back its writes.
const RELEASE_SCRIPT: &str = r"
local in_flight, ready, ranks, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if not redis.call('ZSCORE', in_flight, ARGV[1]) then return 0 end
local rank = redis.call('HGET', ranks, ARGV[1])
if not rank then return redis.error_reply('queue entry ' .. ARGV[1] .. ' has no rank') end
redis.call('ZREM', in_flight, ARGV[1])
redis.call('ZADD', ready, rank, ARGV[1])
return redis.call('INCR', version)
";

/// Returns {version, member, …} of the members whose deadline is at or before ARGV[1];
/// {} when none expired. A member without a rank (impossible unless edited by hand) is dropped
/// from in-flight and returned anyway, so the reconciler notices it is no longer queued.
const REQUEUE_EXPIRED_SCRIPT: &str = r"
local in_flight, ready, ranks, version = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expired = redis.call('ZRANGEBYSCORE', in_flight, '-inf', ARGV[1])
if #expired == 0 then return {} end
for _, member in ipairs(expired) do
  redis.call('ZREM', in_flight, member)
  local rank = redis.call('HGET', ranks, member)
  if rank then redis.call('ZADD', ready, rank, member) end
end
local result = {tostring(redis.call('INCR', version))}
for _, member in ipairs(expired) do table.insert(result, member) end
return result
";

/// Returns 1 when the member existed (ready or in flight), 0 otherwise.
const REMOVE_SCRIPT: &str = r"
local existed = redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return existed
";

struct QueueScripts {
    enqueue: Script,
    peek: Script,
    claim: Script,
    ack: Script,
    release: Script,
    requeue_expired: Script,
    remove: Script,
}

impl QueueScripts {
    fn new() -> Self {
        Self {
            enqueue: Script::new(ENQUEUE_SCRIPT),
            peek: Script::new(PEEK_SCRIPT),
            claim: Script::new(CLAIM_SCRIPT),
            ack: Script::new(ACK_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            requeue_expired: Script::new(REQUEUE_EXPIRED_SCRIPT),
            remove: Script::new(REMOVE_SCRIPT),
        }
    }
}

const ENQUEUE_STATUS_ADDED: i64 = 1;
const ENQUEUE_STATUS_EXISTS: i64 = 0;

impl RedisQueue {
    /// A queue over `pool`. Nothing is spawned until the first `subscribe_ready`.
    pub fn new(pool: RedisPool, config: RedisQueueConfig) -> Self {
        let (ready_version, _initial_receiver) = watch::channel(0);
        let shared = RedisQueueShared {
            pool,
            keys: QueueKeys::new(&config.key_prefix),
            scripts: QueueScripts::new(),
            max_len: config.max_len,
            wake_poll_interval: config.wake_poll_interval,
            ready_version,
            version_tracker: Mutex::new(VersionTracker::default()),
            version_poller_started: AtomicBool::new(false),
        };
        Self { shared: Arc::new(shared) }
    }
}

impl RedisQueueShared {
    fn signal_new_work(&self) {
        self.ready_version.send_modify(|version| *version += 1);
    }

    fn lock_version_tracker(&self) -> std::sync::MutexGuard<'_, VersionTracker> {
        self.version_tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change made through this instance returned the new Redis `version`: wake up now.
    fn observe_local_change(&self, version: u64) {
        {
            let mut tracker = self.lock_version_tracker();
            tracker.last_seen_redis_version = Some(version);
            tracker.local_observations += 1;
        }
        self.signal_new_work();
    }

    /// A poll started when `local_observations_at_start` local changes had been seen read
    /// `version`. Any difference from the last version seen means another replica (or a flush)
    /// changed the queue.
    fn observe_polled_version(&self, version: u64, local_observations_at_start: u64) {
        let changed = {
            let mut tracker = self.lock_version_tracker();
            if tracker.local_observations != local_observations_at_start {
                return;
            }
            let previous = tracker.last_seen_redis_version.replace(version);
            previous.is_some_and(|previous| previous != version)
        };
        if changed {
            self.signal_new_work();
        }
    }

    async fn read_version(&self) -> QueueResult<u64> {
        let mut connection = self.pool.connection().await?;
        let version: Option<u64> =
            redis::cmd("GET").arg(&self.keys.version).query_async(&mut *connection).await?;
        Ok(version.unwrap_or(0))
    }

    fn start_version_poller(self: &Arc<Self>) {
        if self.version_poller_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime, queue wake-ups from other replicas are disabled");
            self.version_poller_started.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(poll_version(Arc::downgrade(self), self.wake_poll_interval));
    }
}

impl RedisQueueShared {
    /// Runs `script` over `keys`, one round trip a `MAX_BATCH`: its keys and leading arguments
    /// from `prepare`, then one member a key. Answers its 1/0 replies as flags, in key order.
    async fn flags_per_key(
        &self,
        script: &Script,
        keys: &[QueueKey],
        prepare: impl Fn(&mut ScriptInvocation<'_>),
    ) -> QueueResult<Vec<bool>> {
        let mut flags = Vec::with_capacity(keys.len());
        for batch in keys.chunks(MAX_BATCH) {
            let mut invocation = script.prepare_invoke();
            prepare(&mut invocation);
            for key in batch {
                invocation.arg(key.to_member());
            }
            let mut connection = self.pool.connection().await?;
            let reply: Vec<i64> = invocation.invoke_async(&mut *connection).await?;
            flags.extend(reply.iter().map(|flag| *flag == 1));
        }
        Ok(flags)
    }
}

/// Reads the shared version every `interval` while the queue exists and someone listens.
async fn poll_version(queue: Weak<RedisQueueShared>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_poll_failed = false;
    loop {
        ticker.tick().await;
        let Some(shared) = queue.upgrade() else { return };
        if shared.ready_version.receiver_count() == 0 {
            continue;
        }
        let local_observations_at_start = shared.lock_version_tracker().local_observations;
        match shared.read_version().await {
            Ok(version) => {
                if last_poll_failed {
                    tracing::info!("queue version poll recovered");
                }
                last_poll_failed = false;
                shared.observe_polled_version(version, local_observations_at_start);
            }
            Err(error) => {
                // Log the first failure of a streak only: Redis being down is reported elsewhere.
                if !last_poll_failed {
                    tracing::warn!(error = %error, "queue version poll failed");
                }
                last_poll_failed = true;
            }
        }
    }
}

fn decode_item(member: &str, item_json: &str) -> QueueResult<QueueItem> {
    serde_json::from_str(item_json)
        .map_err(|source| QueueError::CorruptEntry { member: member.to_owned(), source })
}

#[async_trait]
impl Queue for RedisQueue {
    async fn enqueue_many(&self, items: Vec<QueueItem>) -> QueueResult<Vec<EnqueueOutcome>> {
        for item in &items {
            item.validate()?;
        }
        let shared = &self.shared;
        let mut outcomes = Vec::with_capacity(items.len());
        for batch in items.chunks(MAX_BATCH) {
            let mut invocation = shared.scripts.enqueue.prepare_invoke();
            invocation
                .key(&shared.keys.ready)
                .key(&shared.keys.items)
                .key(&shared.keys.ranks)
                .key(&shared.keys.version)
                .arg(shared.max_len);
            for item in batch {
                let member = item.key().to_member();
                let item_json = serde_json::to_string(item).map_err(|source| {
                    QueueError::CorruptEntry { member: member.clone(), source }
                })?;
                invocation.arg(member).arg(ReadyRank::of(item).to_score()).arg(item_json);
            }
            let mut connection = shared.pool.connection().await?;
            let (version, statuses): (u64, Vec<i64>) =
                invocation.invoke_async(&mut *connection).await?;
            drop(connection);
            if version > 0 {
                shared.observe_local_change(version);
            }
            outcomes.extend(statuses.iter().map(|status| match *status {
                ENQUEUE_STATUS_ADDED => EnqueueOutcome::Enqueued,
                ENQUEUE_STATUS_EXISTS => EnqueueOutcome::AlreadyQueued,
                _ => EnqueueOutcome::Full,
            }));
        }
        Ok(outcomes)
    }

    async fn peek(&self, limit: usize) -> QueueResult<Vec<QueueItem>> {
        let limit = limit.min(MAX_PEEK_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let members_and_items: Vec<Option<String>> = shared
            .scripts
            .peek
            .key(&shared.keys.ready)
            .key(&shared.keys.items)
            .arg(limit)
            .invoke_async(&mut *connection)
            .await?;
        let mut items = Vec::with_capacity(members_and_items.len() / 2);
        for pair in members_and_items.chunks_exact(2) {
            let (Some(member), Some(item_json)) = (&pair[0], &pair[1]) else { continue };
            items.push(decode_item(member, item_json)?);
        }
        Ok(items)
    }

    async fn claim_many(
        &self,
        keys: &[QueueKey],
        visibility_timeout: Duration,
    ) -> QueueResult<Vec<bool>> {
        let shared = &self.shared;
        let deadline_millis = claim_deadline_millis(visibility_timeout);
        shared
            .flags_per_key(&shared.scripts.claim, keys, |invocation| {
                invocation.key(&shared.keys.ready).key(&shared.keys.in_flight).arg(deadline_millis);
            })
            .await
    }

    async fn ack_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>> {
        let shared = &self.shared;
        shared
            .flags_per_key(&shared.scripts.ack, keys, |invocation| {
                invocation
                    .key(&shared.keys.in_flight)
                    .key(&shared.keys.items)
                    .key(&shared.keys.ranks);
            })
            .await
    }

    async fn release(&self, key: QueueKey) -> QueueResult<bool> {
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let version: u64 = shared
            .scripts
            .release
            .key(&shared.keys.in_flight)
            .key(&shared.keys.ready)
            .key(&shared.keys.ranks)
            .key(&shared.keys.version)
            .arg(key.to_member())
            .invoke_async(&mut *connection)
            .await?;
        if version == 0 {
            return Ok(false);
        }
        shared.observe_local_change(version);
        Ok(true)
    }

    async fn requeue_expired(&self, now: DateTime<Utc>) -> QueueResult<Vec<QueueKey>> {
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let reply: Vec<String> = shared
            .scripts
            .requeue_expired
            .key(&shared.keys.in_flight)
            .key(&shared.keys.ready)
            .key(&shared.keys.ranks)
            .key(&shared.keys.version)
            .arg(now.timestamp_millis())
            .invoke_async(&mut *connection)
            .await?;
        let Some((version, members)) = reply.split_first() else { return Ok(Vec::new()) };
        match version.parse::<u64>() {
            Ok(version) => shared.observe_local_change(version),
            Err(_) => shared.signal_new_work(),
        }
        let mut requeued = Vec::with_capacity(members.len());
        for member in members {
            match QueueKey::from_member(member) {
                Some(key) => requeued.push(key),
                None => tracing::warn!(member = %member, "requeued a malformed queue member"),
            }
        }
        Ok(requeued)
    }

    async fn remove(&self, key: QueueKey) -> QueueResult<bool> {
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let existed: i64 = shared
            .scripts
            .remove
            .key(&shared.keys.ready)
            .key(&shared.keys.in_flight)
            .key(&shared.keys.items)
            .key(&shared.keys.ranks)
            .arg(key.to_member())
            .invoke_async(&mut *connection)
            .await?;
        Ok(existed == 1)
    }

    async fn contains(&self, key: QueueKey) -> QueueResult<bool> {
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let exists: bool = redis::cmd("HEXISTS")
            .arg(&shared.keys.items)
            .arg(key.to_member())
            .query_async(&mut *connection)
            .await?;
        Ok(exists)
    }

    async fn contains_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let mut fetch = redis::cmd("HMGET");
        fetch.arg(&shared.keys.items);
        for key in keys {
            fetch.arg(key.to_member());
        }
        let found: Vec<Option<String>> = fetch.query_async(&mut *connection).await?;
        Ok(found.iter().map(Option::is_some).collect())
    }

    async fn stats(&self) -> QueueResult<QueueStats> {
        let shared = &self.shared;
        let mut connection = shared.pool.connection().await?;
        let (ready, in_flight): (u64, u64) = redis::pipe()
            .atomic()
            .cmd("ZCARD")
            .arg(&shared.keys.ready)
            .cmd("ZCARD")
            .arg(&shared.keys.in_flight)
            .query_async(&mut *connection)
            .await?;
        Ok(QueueStats { ready, in_flight })
    }

    async fn clear(&self) -> QueueResult<()> {
        let shared = &self.shared;
        let keys = &shared.keys;
        let mut connection = shared.pool.connection().await?;
        // The version survives: it only ever grows, so wake-up values never go backward.
        let _deleted_keys: u64 = redis::cmd("DEL")
            .arg(&keys.ready)
            .arg(&keys.in_flight)
            .arg(&keys.items)
            .arg(&keys.ranks)
            .query_async(&mut *connection)
            .await?;
        Ok(())
    }

    fn max_len(&self) -> usize {
        self.shared.max_len
    }

    fn subscribe_ready(&self) -> watch::Receiver<u64> {
        self.shared.start_version_poller();
        self.shared.ready_version.subscribe()
    }
}
