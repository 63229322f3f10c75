//! The event bus between server replicas: execution events for live watch, session revocations,
//! runner wake-ups. May call: redis (through `crate::redis_pool`). Knows nothing of the store,
//! the engine or proto.
//!
//! Delivery is at-most-once and best effort, by design: the database is the source of truth, and
//! a subscriber learns when it may have missed something (`BusMessage::Lagged`,
//! `BusMessage::Reconnected`) so it can re-read the state it shows from the database.
//!
//! Payloads are JSON documents: every event we carry is a small structured document, JSON
//! keeps the two implementations identical, and a JSON payload stays readable in `redis-cli
//! MONITOR`. A publisher hands over a `serde_json::Value` (`publish`) or the document already
//! encoded (`publish_json`: a hot path serializes its event straight to text, never building
//! the value tree it would only encode and drop). The in-process bus hands a value over as it
//! is and decodes a text only when the topic has subscribers; the Redis bus sends the text.
//! Subscribers get the value behind an `Arc`, so fan-out to many subscribers never copies it.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::redis_pool::RedisCommandError;

pub use self::memory::MemoryBus;
pub use self::redis::{RedisBus, RedisBusConfig};

/// Topics are short strings such as `execution:<uuid>`; longer ones are refused.
pub const MAX_TOPIC_LEN: usize = 256;
/// Messages a subscriber may fall behind by before it sees `BusMessage::Lagged`.
pub const DEFAULT_TOPIC_CAPACITY: usize = 1024;

/// Names of the topics the services use, so publishers and subscribers cannot disagree.
pub mod topics {
    use uuid::Uuid;

    /// Events of one execution, for live watch.
    pub fn execution(execution_id: Uuid) -> String {
        format!("execution:{execution_id}")
    }

    /// Refresh sessions that were revoked, so every replica drops them from its caches.
    pub const SESSIONS_REVOKED: &str = "sessions:revoked";

    /// An API key was revoked or a user's role changed: every replica re-checks the keys of
    /// the runners attached to it.
    pub const RUNNER_ACCESS_CHANGED: &str = "runners:access-changed";

    /// Runners (or the dispatcher) should look at the queue again.
    pub const RUNNER_WAKEUPS: &str = "runners:wakeups";
}

/// One item of a subscription stream.
#[derive(Debug, Clone, PartialEq)]
pub enum BusMessage {
    /// A message published on the topic after the subscription started.
    Payload(Arc<serde_json::Value>),
    /// This subscriber fell behind; the `missed` oldest messages were dropped for it.
    Lagged { missed: u64 },
    /// The connection to the broker was lost and re-established; messages published in between
    /// are lost (how many is unknown). Messages published from now on arrive again.
    Reconnected,
}

impl BusMessage {
    pub fn payload(&self) -> Option<&serde_json::Value> {
        match self {
            BusMessage::Payload(payload) => Some(payload),
            BusMessage::Lagged { .. } | BusMessage::Reconnected => None,
        }
    }

    /// Whether messages may have been lost just before this one (re-read from the database).
    pub fn is_gap(&self) -> bool {
        !matches!(self, BusMessage::Payload(_))
    }
}

/// The messages of one subscription. Dropping it unsubscribes.
pub type BusStream = BoxStream<'static, BusMessage>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid topic: {reason}")]
    InvalidTopic { reason: String },
    #[error("bus payload could not be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("subscribing to {topic} timed out")]
    SubscribeTimedOut { topic: String },
    /// The background task that owns the pub/sub connection is gone.
    #[error("bus is shut down")]
    Closed,
    #[error("bus backend unavailable")]
    Backend(#[from] RedisCommandError),
}

impl From<::redis::RedisError> for BusError {
    fn from(error: ::redis::RedisError) -> Self {
        BusError::Backend(RedisCommandError::from(error))
    }
}

pub type BusResult<T> = Result<T, BusError>;

/// The event bus seam. Services hold an `Arc<dyn Bus>`.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends the JSON document `json` to every current subscriber of `topic` (on every replica),
    /// who receive it decoded. Messages of one publisher arrive in the order they were
    /// published. No subscriber: it is dropped. A text that is not JSON reaches no subscriber
    /// (it is dropped with a warning where it is decoded).
    async fn publish_json(&self, topic: &str, json: String) -> BusResult<()>;

    /// `publish_json` of `payload`, encoded.
    async fn publish(&self, topic: &str, payload: serde_json::Value) -> BusResult<()> {
        let json = serde_json::to_string(&payload).map_err(BusError::Encode)?;
        self.publish_json(topic, json).await
    }

    /// Every message published on `topic` after this returns, until the stream is dropped.
    async fn subscribe(&self, topic: &str) -> BusResult<BusStream>;

    /// How many subscription streams of this process are open on `topic`.
    fn local_subscriber_count(&self, topic: &str) -> usize;
}

pub(crate) fn validate_topic(topic: &str) -> BusResult<()> {
    if topic.is_empty() {
        return Err(BusError::InvalidTopic { reason: "topic is empty".to_owned() });
    }
    if topic.len() > MAX_TOPIC_LEN {
        return Err(BusError::InvalidTopic {
            reason: format!("topic is longer than {MAX_TOPIC_LEN} bytes"),
        });
    }
    if topic.chars().any(char::is_control) {
        return Err(BusError::InvalidTopic {
            reason: "topic contains control characters".to_owned(),
        });
    }
    Ok(())
}
