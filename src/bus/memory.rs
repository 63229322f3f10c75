//! The in-process bus of `turbocat dev`, and the per-topic fan-out that the Redis bus reuses to
//! hand messages from its one pub/sub connection to the local subscribers.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{Bus, BusMessage, BusResult, BusStream, DEFAULT_TOPIC_CAPACITY, validate_topic};

/// Called (under the fan-out lock, so calls are ordered with subscriptions) with a topic whose
/// last local subscriber just left.
pub(crate) type TopicAbandonedHook = Box<dyn Fn(&str) + Send + Sync>;

/// One `broadcast` channel per topic, created by the first subscriber and removed when the last
/// one leaves. The mutex is held only for map lookups, never across an `.await`.
pub(crate) struct TopicFanout {
    topics: Mutex<HashMap<String, broadcast::Sender<BusMessage>>>,
    topic_capacity: usize,
    on_topic_abandoned: Option<TopicAbandonedHook>,
}

impl TopicFanout {
    pub(crate) fn new(
        topic_capacity: usize,
        on_topic_abandoned: Option<TopicAbandonedHook>,
    ) -> Arc<Self> {
        Arc::new(Self {
            topics: Mutex::new(HashMap::new()),
            // `broadcast::channel` refuses a capacity of zero.
            topic_capacity: topic_capacity.max(1),
            on_topic_abandoned,
        })
    }

    fn lock_topics(&self) -> MutexGuard<'_, HashMap<String, broadcast::Sender<BusMessage>>> {
        self.topics.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn subscribe(self: &Arc<Self>, topic: &str) -> FanoutSubscription {
        let receiver = {
            let mut topics = self.lock_topics();
            match topics.get(topic) {
                Some(sender) => sender.subscribe(),
                None => {
                    let (sender, receiver) = broadcast::channel(self.topic_capacity);
                    topics.insert(topic.to_owned(), sender);
                    receiver
                }
            }
        };
        FanoutSubscription {
            messages: Some(BroadcastStream::new(receiver)),
            fanout: Arc::clone(self),
            topic: topic.to_owned(),
        }
    }

    /// Hands `message` to every local subscriber of `topic`; returns how many there were.
    pub(crate) fn deliver(&self, topic: &str, message: BusMessage) -> usize {
        let sender = self.lock_topics().get(topic).cloned();
        let Some(sender) = sender else { return 0 };
        sender.send(message).unwrap_or(0)
    }

    /// Hands `message` to every subscriber of every topic.
    pub(crate) fn deliver_to_every_topic(&self, message: &BusMessage) {
        let senders: Vec<_> = self.lock_topics().values().cloned().collect();
        for sender in senders {
            let _receivers = sender.send(message.clone());
        }
    }

    pub(crate) fn topics(&self) -> Vec<String> {
        self.lock_topics().keys().cloned().collect()
    }

    pub(crate) fn subscriber_count(&self, topic: &str) -> usize {
        self.lock_topics().get(topic).map_or(0, broadcast::Sender::receiver_count)
    }

    /// Called by a subscription after it dropped its receiver.
    fn release(&self, topic: &str) {
        let mut topics = self.lock_topics();
        let abandoned = topics.get(topic).is_some_and(|sender| sender.receiver_count() == 0);
        if !abandoned {
            return;
        }
        topics.remove(topic);
        if let Some(on_topic_abandoned) = &self.on_topic_abandoned {
            on_topic_abandoned(topic);
        }
    }
}

/// The stream of one local subscriber. Dropping it drops its receiver first, then removes the
/// topic if it was the last one.
pub(crate) struct FanoutSubscription {
    messages: Option<BroadcastStream<BusMessage>>,
    fanout: Arc<TopicFanout>,
    topic: String,
}

impl Stream for FanoutSubscription {
    type Item = BusMessage;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<BusMessage>> {
        let Some(messages) = self.messages.as_mut() else { return Poll::Ready(None) };
        let next = match ready!(messages.poll_next_unpin(context)) {
            None => None,
            Some(Ok(message)) => Some(message),
            Some(Err(BroadcastStreamRecvError::Lagged(missed))) => {
                Some(BusMessage::Lagged { missed })
            }
        };
        Poll::Ready(next)
    }
}

impl Drop for FanoutSubscription {
    fn drop(&mut self) {
        // The receiver must be gone before `release` counts the remaining ones.
        drop(self.messages.take());
        self.fanout.release(&self.topic);
    }
}

/// A bus inside one process: publish hands the value to the topic's broadcast channel.
pub struct MemoryBus {
    fanout: Arc<TopicFanout>,
}

impl MemoryBus {
    pub fn new() -> Self {
        Self::with_topic_capacity(DEFAULT_TOPIC_CAPACITY)
    }

    /// A bus whose subscribers may fall `topic_capacity` messages behind before they lag.
    pub fn with_topic_capacity(topic_capacity: usize) -> Self {
        Self { fanout: TopicFanout::new(topic_capacity, None) }
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish_json(&self, topic: &str, json: String) -> BusResult<()> {
        validate_topic(topic)?;
        if self.fanout.subscriber_count(topic) == 0 {
            return Ok(());
        }
        match serde_json::from_str::<serde_json::Value>(&json) {
            Ok(payload) => {
                let _receivers = self.fanout.deliver(topic, BusMessage::Payload(Arc::new(payload)));
            }
            Err(error) => {
                tracing::warn!(topic = %topic, error = %error, "dropping a bus message that is not json");
            }
        }
        Ok(())
    }

    /// Hands the very value over: nothing to encode or decode in one process.
    async fn publish(&self, topic: &str, payload: serde_json::Value) -> BusResult<()> {
        validate_topic(topic)?;
        let _receivers = self.fanout.deliver(topic, BusMessage::Payload(Arc::new(payload)));
        Ok(())
    }

    async fn subscribe(&self, topic: &str) -> BusResult<BusStream> {
        validate_topic(topic)?;
        Ok(self.fanout.subscribe(topic).boxed())
    }

    fn local_subscriber_count(&self, topic: &str) -> usize {
        self.fanout.subscriber_count(topic)
    }
}
