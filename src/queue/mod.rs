//! The ready queue of step runs: order (priority, then age), bounds, claims with a visibility
//! timeout, and wake-ups for the dispatcher. May call: redis (through `crate::redis_pool`).
//! Knows nothing of the store, the engine or proto.
//!
//! The database is the source of truth; this queue is an accelerator that a reconciler can rebuild
//! from it (`clear` + `enqueue`), so an item's order derives only from its own fields, never from
//! when it happened to be inserted. "Never drop a queue entry before the assignment is durable":
//! `claim` moves an item to in-flight with a deadline, and only `ack` (after the assignment is
//! committed) removes it; `release` and `requeue_expired` put in-flight items back.
//!
//! Both implementations rank items with the same integer (`ReadyRank`) and break ties by the same
//! key order, so they agree on the order of every item, which the conformance suite checks.

pub mod memory;
pub mod redis;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use crate::redis_pool::RedisCommandError;

pub use self::memory::MemoryQueue;
pub use self::redis::{RedisQueue, RedisQueueConfig};

/// The most urgent priority; items with a higher priority are handed out first.
pub const MAX_PRIORITY: i32 = 10;
/// The least urgent priority.
pub const MIN_PRIORITY: i32 = 1;
/// `peek` returns at most this many items per call, whatever limit it is asked for.
pub const MAX_PEEK_LIMIT: usize = 1000;
/// The bound of a queue built with default settings.
pub const DEFAULT_MAX_LEN: usize = 100_000;

/// What identifies a queue entry: one attempt of one step run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueKey {
    pub step_run_id: Uuid,
    pub attempt: i32,
}

impl QueueKey {
    pub fn new(step_run_id: Uuid, attempt: i32) -> Self {
        Self { step_run_id, attempt }
    }

    /// The Redis member string: `<uuid>:<attempt, ten digits>`. Lowercase hyphenated UUIDs and
    /// zero-padded non-negative attempts sort as strings exactly like `QueueKey` sorts, so Redis
    /// breaks rank ties in the same order as the in-process queue. A negative attempt (refused
    /// by `enqueue`, so never stored) still gets a distinct member, which simply is not found.
    pub(crate) fn to_member(self) -> String {
        format!("{}:{:010}", self.step_run_id.hyphenated(), self.attempt)
    }

    pub(crate) fn from_member(member: &str) -> Option<Self> {
        let (step_run_id, attempt) = member.split_once(':')?;
        Some(Self { step_run_id: step_run_id.parse().ok()?, attempt: attempt.parse().ok()? })
    }
}

impl fmt::Display for QueueKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}#{}", self.step_run_id, self.attempt)
    }
}

/// A step run that is ready to be assigned to a runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueItem {
    pub step_run_id: Uuid,
    pub attempt: i32,
    pub execution_id: Uuid,
    /// The step's key in its workflow (empty in entries queued before items carried it).
    #[serde(default)]
    pub step_key: String,
    pub owner_id: Uuid,
    /// `MIN_PRIORITY..=MAX_PRIORITY`, higher first.
    pub priority: i32,
    /// When the step run became ready (from the database); older first within a priority.
    pub enqueued_at: DateTime<Utc>,
    pub agent_type: String,
    /// Labels a runner must carry (all of them, with these values) to take the item.
    pub required_labels: BTreeMap<String, String>,
}

impl QueueItem {
    pub fn key(&self) -> QueueKey {
        QueueKey { step_run_id: self.step_run_id, attempt: self.attempt }
    }

    /// Refuses items a backend could not rank: out-of-range priority, negative attempt.
    pub(crate) fn validate(&self) -> QueueResult<()> {
        if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&self.priority) {
            return Err(QueueError::InvalidItem {
                reason: format!(
                    "priority {} is outside {MIN_PRIORITY}..={MAX_PRIORITY}",
                    self.priority
                ),
            });
        }
        if self.attempt < 0 {
            return Err(QueueError::InvalidItem {
                reason: format!("attempt {} is negative", self.attempt),
            });
        }
        Ok(())
    }
}

/// The position of an item in the ready order: smaller comes first. Ties are broken by
/// `QueueKey` (in Redis: by the member string, which sorts the same way).
///
/// Encoding: `(MAX_PRIORITY - priority) * 2^42 + age_millis`, where `age_millis` is
/// `enqueued_at` in milliseconds since 2020-01-01T00:00:00Z, clamped to `0..2^42` (2^42 ms is
/// about 139 years, so until 2159). The largest rank is below `10 * 2^42 < 2^46`, far inside the
/// 2^53 integers that a Redis sorted-set score (an IEEE double) holds exactly, so ranks never
/// collide or reorder through float rounding. The price is millisecond granularity: two items
/// of one priority enqueued within the same millisecond are ordered by key (step run ids are
/// UUIDv7, so that is still creation order in practice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ReadyRank(u64);

const AGE_BITS: u32 = 42;

impl ReadyRank {
    pub(crate) fn of(item: &QueueItem) -> Self {
        debug_assert!((MIN_PRIORITY..=MAX_PRIORITY).contains(&item.priority));
        let priority_slot = u64::try_from(MAX_PRIORITY - item.priority).unwrap_or(0);
        let rank = (priority_slot << AGE_BITS) + age_millis(item.enqueued_at);
        debug_assert!(rank < (1_u64 << 53), "ranks must stay exact as f64 scores");
        Self(rank)
    }

    /// The decimal score Redis stores; an integer, so no float formatting is involved.
    pub(crate) fn to_score(self) -> String {
        self.0.to_string()
    }
}

/// 2020-01-01T00:00:00Z in milliseconds since the Unix epoch.
const RANK_EPOCH_UNIX_MILLIS: i64 = 1_577_836_800_000;

fn age_millis(enqueued_at: DateTime<Utc>) -> u64 {
    let millis = enqueued_at.timestamp_millis().saturating_sub(RANK_EPOCH_UNIX_MILLIS);
    let largest_age = (1_i64 << AGE_BITS) - 1;
    u64::try_from(millis.clamp(0, largest_age)).unwrap_or(0)
}

/// The in-flight deadline of a claim made now, in milliseconds since the Unix epoch.
pub(crate) fn claim_deadline_millis(visibility_timeout: Duration) -> i64 {
    let timeout_millis = i64::try_from(visibility_timeout.as_millis()).unwrap_or(i64::MAX);
    Utc::now().timestamp_millis().saturating_add(timeout_millis)
}

/// What `enqueue` did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnqueueOutcome {
    Enqueued,
    /// An entry with the same key is already ready or in flight (or came earlier in the same
    /// batch); it was left untouched.
    AlreadyQueued,
    /// The queue held `max_len` items, so this one was not added. Only `enqueue_many` answers
    /// it; `enqueue` answers `QueueError::Full` instead.
    Full,
}

/// The most items one `enqueue_many`, `claim_many` or `ack_many` round trip carries; longer
/// batches are split (a Lua script unpacks its arguments onto a bounded stack).
pub const MAX_BATCH: usize = 256;

/// How many items wait (`ready`) and how many are claimed but not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub ready: u64,
    pub in_flight: u64,
}

impl QueueStats {
    /// Everything the queue holds, which is what its bound limits.
    pub fn total(&self) -> u64 {
        self.ready + self.in_flight
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The queue holds `max_len` items; the API answers RESOURCE_EXHAUSTED / 429.
    #[error("queue is full ({max_len} items)")]
    Full { max_len: usize },
    #[error("invalid queue item: {reason}")]
    InvalidItem { reason: String },
    /// A stored entry could not be decoded (written by an incompatible version, or by hand).
    #[error("corrupt queue entry {member}")]
    CorruptEntry {
        member: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("queue backend unavailable")]
    Backend(#[from] RedisCommandError),
}

impl From<::redis::RedisError> for QueueError {
    fn from(error: ::redis::RedisError) -> Self {
        QueueError::Backend(RedisCommandError::from(error))
    }
}

pub type QueueResult<T> = Result<T, QueueError>;

/// The ready queue seam. Services hold an `Arc<dyn Queue>`.
///
/// A dispatcher loop looks like this (race-free: a change that lands between `peek` and
/// `changed` is remembered by the watch receiver):
///
/// ```text
/// let mut ready = queue.subscribe_ready();
/// loop {
///     ready.borrow_and_update();
///     for item in queue.peek(64).await? { /* match labels/capacity, claim, persist, ack */ }
///     let _ = tokio::time::timeout(Duration::from_secs(5), ready.changed()).await;
/// }
/// ```
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Adds ready items, in one round trip per `MAX_BATCH`, and answers what became of each, in
    /// their order. Idempotent on `item.key()`: an existing entry (ready or in flight, or one
    /// earlier in the batch) is kept as it is and is `AlreadyQueued`, even when the queue is
    /// full; a new one is `Full` once the queue holds `max_len` items. A batch with an invalid
    /// item is refused whole (`InvalidItem`), before anything is added.
    async fn enqueue_many(&self, items: Vec<QueueItem>) -> QueueResult<Vec<EnqueueOutcome>>;

    /// Adds a ready item (`enqueue_many` of one). Idempotent on `item.key()`: an existing entry
    /// (ready or in flight) is kept as it is and `AlreadyQueued` is returned, even when the
    /// queue is full; a new one fails with `Full` when the queue holds `max_len` items.
    async fn enqueue(&self, item: QueueItem) -> QueueResult<EnqueueOutcome> {
        match self.enqueue_many(vec![item]).await?.first() {
            Some(EnqueueOutcome::Full) | None => Err(QueueError::Full { max_len: self.max_len() }),
            Some(outcome) => Ok(*outcome),
        }
    }

    /// The first `limit` ready items in queue order (at most `MAX_PEEK_LIMIT`), not claimed.
    async fn peek(&self, limit: usize) -> QueueResult<Vec<QueueItem>>;

    /// Atomically moves ready items to in-flight until now + `visibility_timeout`, in one round
    /// trip per `MAX_BATCH`, and answers for each key, in their order, whether this caller
    /// claimed it. Exactly one of several racing claimers (in this process or another replica)
    /// gets `true` for a key; a key given twice is claimed by its first mention.
    async fn claim_many(
        &self,
        keys: &[QueueKey],
        visibility_timeout: Duration,
    ) -> QueueResult<Vec<bool>>;

    /// `claim_many` of one key.
    async fn claim(&self, key: QueueKey, visibility_timeout: Duration) -> QueueResult<bool> {
        Ok(self.claim_many(&[key], visibility_timeout).await?.first() == Some(&true))
    }

    /// Drops in-flight items once their assignments are durable, in one round trip per
    /// `MAX_BATCH`, and answers for each key, in their order, whether it was in flight (`false`:
    /// never claimed, its claim expired and it went back to ready, or mentioned earlier).
    async fn ack_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>>;

    /// `ack_many` of one key.
    async fn ack(&self, key: QueueKey) -> QueueResult<bool> {
        Ok(self.ack_many(&[key]).await?.first() == Some(&true))
    }

    /// Puts an in-flight item back in its place among the ready items (a runner refused it).
    /// `false` when the item is not in flight.
    async fn release(&self, key: QueueKey) -> QueueResult<bool>;

    /// Moves every in-flight item whose deadline is at or before `now` back to ready and returns
    /// their keys, earliest deadline first.
    async fn requeue_expired(&self, now: DateTime<Utc>) -> QueueResult<Vec<QueueKey>>;

    /// Drops an item wherever it is (cancellation). `false` when there was no such item.
    async fn remove(&self, key: QueueKey) -> QueueResult<bool>;

    /// Whether an item with this key is ready or in flight (the reconciler's question).
    async fn contains(&self, key: QueueKey) -> QueueResult<bool>;

    /// `contains` for many keys in one round trip, answered in their order.
    async fn contains_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>>;

    async fn stats(&self) -> QueueResult<QueueStats>;

    /// Drops every item (tests, and the reconciler before a rebuild).
    async fn clear(&self) -> QueueResult<()>;

    /// The bound: `enqueue` of a new key fails with `Full` when `stats().total()` reaches it.
    fn max_len(&self) -> usize;

    /// A receiver whose value changes whenever new work may be ready: an item was enqueued,
    /// released or requeued. The value is opaque and only increases; a spurious change is
    /// harmless (the dispatcher peeks and finds nothing). For the Redis queue this includes
    /// changes made by other replicas, noticed within `RedisQueueConfig::wake_poll_interval`.
    fn subscribe_ready(&self) -> watch::Receiver<u64>;
}
