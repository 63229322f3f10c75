//! The Queue and Bus conformance suites: every conformance test runs against the in-process
//! implementation and against Redis (`TURBOCAT_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each Redis test works under a fresh random key prefix, so tests run
//! in parallel on one server, and deletes its keys when it ends. Tests that only make sense for
//! Redis (two replicas, a killed pub/sub connection) live in each file's `redis_only` module.

use std::sync::Arc;
use std::time::Duration;

use turbocat::bus::{Bus, MemoryBus, RedisBus, RedisBusConfig};
use turbocat::queue::{MemoryQueue, Queue, RedisQueue, RedisQueueConfig};
use turbocat::redis_pool::{RedisPool, connect_redis};

/// Instantiates each named `async fn(Backend)` once per implementation:
/// `conformance!(queue_order);` makes `memory::queue_order` and `redis::queue_order`.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(crate::Backend::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(crate::Backend::Redis).await;
                }
            )*
        }
    };
}

mod bus;
mod queue;

pub fn redis_url() -> String {
    std::env::var("TURBOCAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test uses.
pub fn random_prefix() -> String {
    format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple())
}

pub async fn redis_pool() -> RedisPool {
    connect_redis(&redis_url()).await.expect("connect to the test redis")
}

/// A plain async connection for assertions about what Redis itself holds.
pub async fn admin_connection() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(redis_url()).expect("parse the test redis url");
    client.get_multiplexed_async_connection().await.expect("connect to the test redis")
}

/// Deletes every key under `prefix` when dropped (also when the test panics).
pub struct RedisPrefixGuard {
    pub prefix: String,
}

impl Drop for RedisPrefixGuard {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(redis_url()) else { return };
        let Ok(mut connection) = client.get_connection() else { return };
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(&pattern).query(&mut connection).unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<u64> = redis::cmd("DEL").arg(&keys).query(&mut connection);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
}

/// A queue and whatever must live as long as it.
pub struct QueueUnderTest {
    pub queue: Arc<dyn Queue>,
    pub redis_prefix: Option<String>,
    _keys: Option<RedisPrefixGuard>,
}

/// A bus and whatever must live as long as it.
pub struct BusUnderTest {
    pub bus: Arc<dyn Bus>,
    _keys: Option<RedisPrefixGuard>,
}

/// How often a Redis queue under test polls for other replicas' work.
pub const TEST_WAKE_POLL_INTERVAL: Duration = Duration::from_millis(50);

impl Backend {
    pub async fn queue(self, max_len: usize) -> QueueUnderTest {
        match self {
            Backend::Memory => QueueUnderTest {
                queue: Arc::new(MemoryQueue::new(max_len)),
                redis_prefix: None,
                _keys: None,
            },
            Backend::Redis => {
                let prefix = random_prefix();
                let queue = redis_queue(redis_pool().await, &prefix, max_len);
                QueueUnderTest {
                    queue: Arc::new(queue),
                    redis_prefix: Some(prefix.clone()),
                    _keys: Some(RedisPrefixGuard { prefix }),
                }
            }
        }
    }

    pub async fn bus(self, topic_capacity: usize) -> BusUnderTest {
        match self {
            Backend::Memory => BusUnderTest {
                bus: Arc::new(MemoryBus::with_topic_capacity(topic_capacity)),
                _keys: None,
            },
            Backend::Redis => {
                let prefix = random_prefix();
                let bus = redis_bus(redis_pool().await, &prefix, topic_capacity).await;
                BusUnderTest { bus: Arc::new(bus), _keys: Some(RedisPrefixGuard { prefix }) }
            }
        }
    }
}

pub fn redis_queue(pool: RedisPool, prefix: &str, max_len: usize) -> RedisQueue {
    let config = RedisQueueConfig {
        key_prefix: prefix.to_owned(),
        max_len,
        wake_poll_interval: TEST_WAKE_POLL_INTERVAL,
    };
    RedisQueue::new(pool, config)
}

pub fn redis_bus_config(prefix: &str, topic_capacity: usize) -> RedisBusConfig {
    RedisBusConfig {
        key_prefix: prefix.to_owned(),
        topic_capacity,
        reconnect_backoff_initial: Duration::from_millis(20),
        // Frequent PINGs: every Redis bus test also checks the health check never disturbs a
        // live connection (a failed PING would show up as an unexpected `Reconnected`).
        health_check_interval: Duration::from_millis(100),
        ..RedisBusConfig::default()
    }
}

pub async fn redis_bus(pool: RedisPool, prefix: &str, topic_capacity: usize) -> RedisBus {
    RedisBus::connect(pool, redis_bus_config(prefix, topic_capacity))
        .await
        .expect("start the redis bus")
}
