//! The Redis bus of `turbocat serve`: PUBLISH on a pooled connection; ONE dedicated pub/sub
//! connection per `RedisBus`, owned by a supervisor task that multiplexes it to the local
//! subscribers through a `TopicFanout`.
//!
//! The supervisor is the only code that touches the pub/sub connection, and the only code that
//! registers local subscribers. Subscribers talk to it through a command channel:
//! - `Subscribe`: SUBSCRIBE (unless the channel already is), wait for Redis to confirm, hand out
//!   every message that arrived before the confirmation to the *existing* subscribers, and only
//!   then register the new one. So a new subscriber gets every message published after
//!   `subscribe` returned, and nothing published before it was called (not even a message still
//!   in flight from an earlier subscription to the same topic).
//! - `Unsubscribe`: sent by the fan-out when a topic's last local subscriber leaves; skipped if
//!   the topic has gained a subscriber again in the meantime.
//!
//! When the connection dies (Redis restarted, or `CLIENT KILL`), the supervisor reconnects with
//! exponential backoff, subscribes again to every topic that still has local subscribers, and
//! then sends them `BusMessage::Reconnected`. A periodic PING finds connections that died
//! silently.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use redis::Msg;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::memory::{FanoutSubscription, TopicFanout};
use super::{
    Bus, BusError, BusMessage, BusResult, BusStream, DEFAULT_TOPIC_CAPACITY, validate_topic,
};
use crate::redis_pool::{RedisCommandError, RedisPool};

/// Where the bus lives and how patient it is.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// Prefix of every channel (`<prefix>bus:<topic>`); replicas must agree on it.
    pub key_prefix: String,
    /// Messages a local subscriber may fall behind by before it sees `BusMessage::Lagged`.
    pub topic_capacity: usize,
    /// How long `subscribe` waits for Redis to confirm (also while reconnecting).
    pub subscribe_timeout: Duration,
    /// How long connecting or a pub/sub command may take before the connection is given up.
    pub command_timeout: Duration,
    /// How often the idle pub/sub connection is PINGed to find a silently dead one.
    pub health_check_interval: Duration,
    /// Backoff between reconnection attempts: starts at `initial`, doubles up to `max`.
    pub reconnect_backoff_initial: Duration,
    pub reconnect_backoff_max: Duration,
}

impl Default for RedisBusConfig {
    fn default() -> Self {
        Self {
            key_prefix: "turbocat:".to_owned(),
            topic_capacity: DEFAULT_TOPIC_CAPACITY,
            subscribe_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            health_check_interval: Duration::from_secs(15),
            reconnect_backoff_initial: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
        }
    }
}

/// A bus over Redis pub/sub. Replicas with the same `key_prefix` see each other's messages.
pub struct RedisBus {
    pool: RedisPool,
    channel_prefix: String,
    fanout: Arc<TopicFanout>,
    commands: mpsc::UnboundedSender<PubSubCommand>,
    subscribe_timeout: Duration,
}

enum PubSubCommand {
    Subscribe { topic: String, reply: oneshot::Sender<FanoutSubscription> },
    Unsubscribe { topic: String },
}

/// A subscriber waiting for its subscription.
struct PendingSubscriber {
    topic: String,
    reply: oneshot::Sender<FanoutSubscription>,
}

impl RedisBus {
    /// Opens the pub/sub connection (an error here means Redis is unreachable) and starts the
    /// supervisor task, which lives as long as the bus or any of its subscription streams.
    pub async fn connect(pool: RedisPool, config: RedisBusConfig) -> BusResult<Self> {
        let connection = open_pubsub(&pool, config.command_timeout).await?;
        let channel_prefix = format!("{}bus:", config.key_prefix);
        let (commands, command_receiver) = mpsc::unbounded_channel();

        let unsubscribe_commands = commands.clone();
        let on_topic_abandoned = Box::new(move |topic: &str| {
            let command = PubSubCommand::Unsubscribe { topic: topic.to_owned() };
            // The supervisor is gone only when every sender is; nothing left to unsubscribe.
            let _ = unsubscribe_commands.send(command);
        });
        let fanout = TopicFanout::new(config.topic_capacity, Some(on_topic_abandoned));

        let (sink, messages) = connection.split();
        let supervisor = PubSubSupervisor {
            pool: pool.clone(),
            channel_prefix: channel_prefix.clone(),
            fanout: Arc::downgrade(&fanout),
            commands: command_receiver,
            waiting_for_connection: Vec::new(),
            config: config.clone(),
        };
        let first_link = LiveLink { sink, messages, subscribed_channels: HashSet::new() };
        tokio::spawn(supervisor.run(first_link));
        tracing::debug!(server_address = %pool.server_address(), "redis bus started");

        Ok(Self {
            pool,
            channel_prefix,
            fanout,
            commands,
            subscribe_timeout: config.subscribe_timeout,
        })
    }

    fn channel_of(&self, topic: &str) -> String {
        format!("{}{topic}", self.channel_prefix)
    }
}

async fn open_pubsub(pool: &RedisPool, timeout: Duration) -> BusResult<redis::aio::PubSub> {
    match tokio::time::timeout(timeout, pool.client().get_async_pubsub()).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(BusError::from(error)),
        Err(_elapsed) => Err(BusError::Backend(RedisCommandError::PoolTimedOut {
            server_address: pool.server_address().to_owned(),
        })),
    }
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish_json(&self, topic: &str, json: String) -> BusResult<()> {
        validate_topic(topic)?;
        let mut connection = self.pool.connection().await?;
        let _receiving_connections: u64 = redis::cmd("PUBLISH")
            .arg(self.channel_of(topic))
            .arg(json)
            .query_async(&mut *connection)
            .await?;
        Ok(())
    }

    async fn subscribe(&self, topic: &str) -> BusResult<BusStream> {
        validate_topic(topic)?;
        // If this future is dropped while waiting, the supervisor's reply fails, the
        // subscription it made is dropped, and that sends the matching Unsubscribe.
        let (reply, response) = oneshot::channel();
        let command = PubSubCommand::Subscribe { topic: topic.to_owned(), reply };
        if self.commands.send(command).is_err() {
            return Err(BusError::Closed);
        }
        match tokio::time::timeout(self.subscribe_timeout, response).await {
            Ok(Ok(subscription)) => Ok(subscription.boxed()),
            Ok(Err(_supervisor_gone)) => Err(BusError::Closed),
            Err(_elapsed) => Err(BusError::SubscribeTimedOut { topic: topic.to_owned() }),
        }
    }

    fn local_subscriber_count(&self, topic: &str) -> usize {
        self.fanout.subscriber_count(topic)
    }
}

/// The pub/sub connection while it works.
struct LiveLink {
    sink: PubSubSink,
    messages: PubSubStream,
    /// Channels Redis confirmed on this connection.
    subscribed_channels: HashSet<String>,
}

enum LinkEnd {
    /// Every command sender is gone: the bus and all its subscriptions were dropped.
    CommandsClosed,
    ConnectionLost,
}

enum ReconnectOutcome {
    Connected(LiveLink),
    Failed,
    CommandsClosed,
}

struct PubSubSupervisor {
    pool: RedisPool,
    channel_prefix: String,
    /// Weak: the fan-out holds a command sender (its unsubscribe hook), so a strong reference
    /// here would keep this task alive forever.
    fanout: Weak<TopicFanout>,
    commands: mpsc::UnboundedReceiver<PubSubCommand>,
    /// Subscribers that asked while the connection was down; answered after resubscribing.
    waiting_for_connection: Vec<PendingSubscriber>,
    config: RedisBusConfig,
}

impl PubSubSupervisor {
    async fn run(mut self, first_link: LiveLink) {
        let mut live_link = Some(first_link);
        let mut failed_attempts: u32 = 0;
        loop {
            let Some(mut link) = live_link.take() else {
                match self.reconnect(failed_attempts).await {
                    ReconnectOutcome::Connected(link) => {
                        live_link = Some(link);
                        failed_attempts = 0;
                    }
                    ReconnectOutcome::Failed => failed_attempts = failed_attempts.saturating_add(1),
                    ReconnectOutcome::CommandsClosed => break,
                }
                continue;
            };
            match self.serve(&mut link).await {
                LinkEnd::CommandsClosed => break,
                LinkEnd::ConnectionLost => {
                    tracing::warn!(
                        server_address = %self.pool.server_address(),
                        "redis pub/sub connection lost, reconnecting"
                    );
                }
            }
        }
        tracing::debug!("redis bus supervisor stopped");
    }

    /// Runs the live connection until it dies or the bus is gone.
    async fn serve(&mut self, link: &mut LiveLink) -> LinkEnd {
        let period = self.config.health_check_interval;
        let mut health_check = tokio::time::interval_at(Instant::now() + period, period);
        health_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(command) = command else { return LinkEnd::CommandsClosed };
                    if let Err(error) = self.apply_command(link, command).await {
                        tracing::warn!(error = %error, "redis pub/sub command failed");
                        return LinkEnd::ConnectionLost;
                    }
                }
                message = link.messages.next() => {
                    let Some(message) = message else { return LinkEnd::ConnectionLost };
                    self.dispatch(&message);
                }
                _ = health_check.tick() => {
                    let ping = link.sink.ping::<redis::Value>();
                    match tokio::time::timeout(self.config.command_timeout, ping).await {
                        Ok(Ok(_pong)) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(error = %error, "redis pub/sub ping failed");
                            return LinkEnd::ConnectionLost;
                        }
                        Err(_elapsed) => {
                            tracing::warn!("redis pub/sub ping timed out");
                            return LinkEnd::ConnectionLost;
                        }
                    }
                }
            }
        }
    }

    async fn apply_command(
        &mut self,
        link: &mut LiveLink,
        command: PubSubCommand,
    ) -> Result<(), redis::RedisError> {
        match command {
            PubSubCommand::Subscribe { topic, reply } => {
                self.subscribe_on_link(link, PendingSubscriber { topic, reply }).await
            }
            PubSubCommand::Unsubscribe { topic } => self.unsubscribe_on_link(link, &topic).await,
        }
    }

    async fn subscribe_on_link(
        &mut self,
        link: &mut LiveLink,
        subscriber: PendingSubscriber,
    ) -> Result<(), redis::RedisError> {
        let channel = self.channel_of(&subscriber.topic);
        if !link.subscribed_channels.contains(&channel) {
            let timeout = self.config.command_timeout;
            if let Err(error) = with_timeout(timeout, link.sink.subscribe(&channel)).await {
                // Answered once the connection is back and every live topic resubscribed.
                self.waiting_for_connection.push(subscriber);
                return Err(error);
            }
            link.subscribed_channels.insert(channel);
        }
        // Everything that arrived before the confirmation was published before this subscriber
        // asked: it goes to the subscribers that were already there, not to the new one.
        if !self.dispatch_buffered_messages(link) {
            self.waiting_for_connection.push(subscriber);
            return Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "redis pub/sub connection closed",
            )));
        }
        self.register(subscriber);
        Ok(())
    }

    async fn unsubscribe_on_link(
        &mut self,
        link: &mut LiveLink,
        topic: &str,
    ) -> Result<(), redis::RedisError> {
        let resubscribed_meanwhile =
            self.fanout.upgrade().is_some_and(|fanout| fanout.subscriber_count(topic) > 0);
        if resubscribed_meanwhile {
            return Ok(());
        }
        let channel = self.channel_of(topic);
        if !link.subscribed_channels.remove(&channel) {
            return Ok(());
        }
        with_timeout(self.config.command_timeout, link.sink.unsubscribe(&channel)).await
    }

    /// Dispatches the messages already received; `false` when the connection turned out closed.
    fn dispatch_buffered_messages(&self, link: &mut LiveLink) -> bool {
        loop {
            match link.messages.next().now_or_never() {
                None => return true,
                Some(None) => return false,
                Some(Some(message)) => self.dispatch(&message),
            }
        }
    }

    /// Registers the subscriber in the fan-out and hands its stream over. A subscriber that
    /// gave up waiting drops the reply; the subscription is then dropped and unsubscribes.
    fn register(&self, subscriber: PendingSubscriber) {
        let Some(fanout) = self.fanout.upgrade() else { return };
        let subscription = fanout.subscribe(&subscriber.topic);
        let _ = subscriber.reply.send(subscription);
    }

    fn channel_of(&self, topic: &str) -> String {
        format!("{}{topic}", self.channel_prefix)
    }

    fn dispatch(&self, message: &Msg) {
        let Some(fanout) = self.fanout.upgrade() else { return };
        let channel = message.get_channel_name();
        let Some(topic) = channel.strip_prefix(&self.channel_prefix) else {
            tracing::debug!(channel = %channel, "ignoring message from a foreign channel");
            return;
        };
        match serde_json::from_slice::<serde_json::Value>(message.get_payload_bytes()) {
            Ok(payload) => {
                let _receivers = fanout.deliver(topic, BusMessage::Payload(Arc::new(payload)));
            }
            Err(error) => {
                tracing::warn!(topic = %topic, error = %error, "dropping a bus message that is not json");
            }
        }
    }

    /// Waits out the backoff (still taking commands), opens a new connection and subscribes to
    /// every topic that has local subscribers.
    async fn reconnect(&mut self, failed_attempts: u32) -> ReconnectOutcome {
        let delay = self.backoff_delay(failed_attempts);
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                command = self.commands.recv() => match command {
                    None => return ReconnectOutcome::CommandsClosed,
                    Some(PubSubCommand::Subscribe { topic, reply }) => {
                        self.waiting_for_connection.push(PendingSubscriber { topic, reply });
                    }
                    // Not subscribed on any connection right now; the new one will not be either.
                    Some(PubSubCommand::Unsubscribe { .. }) => {}
                },
                () = &mut sleep => break,
            }
        }

        let connection = match open_pubsub(&self.pool, self.config.command_timeout).await {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(
                    server_address = %self.pool.server_address(),
                    attempt = failed_attempts + 1,
                    error = %error,
                    "redis pub/sub reconnect failed"
                );
                return ReconnectOutcome::Failed;
            }
        };
        let (mut sink, messages) = connection.split();
        let Some(fanout) = self.fanout.upgrade() else {
            return ReconnectOutcome::CommandsClosed;
        };
        let mut topics: HashSet<String> = fanout.topics().into_iter().collect();
        topics.extend(self.waiting_for_connection.iter().map(|waiting| waiting.topic.clone()));
        let channels: Vec<String> = topics.iter().map(|topic| self.channel_of(topic)).collect();
        if !channels.is_empty() {
            let resubscribed =
                with_timeout(self.config.command_timeout, sink.subscribe(&channels)).await;
            if let Err(error) = resubscribed {
                tracing::warn!(error = %error, "redis pub/sub resubscribe failed");
                return ReconnectOutcome::Failed;
            }
        }

        // Existing subscribers learn about the gap; those that waited start after it.
        fanout.deliver_to_every_topic(&BusMessage::Reconnected);
        for subscriber in std::mem::take(&mut self.waiting_for_connection) {
            self.register(subscriber);
        }
        tracing::info!(
            server_address = %self.pool.server_address(),
            topics = channels.len(),
            "redis pub/sub reconnected"
        );
        let subscribed_channels = channels.into_iter().collect();
        ReconnectOutcome::Connected(LiveLink { sink, messages, subscribed_channels })
    }

    fn backoff_delay(&self, failed_attempts: u32) -> Duration {
        let initial = self.config.reconnect_backoff_initial;
        let factor = 2_u32.saturating_pow(failed_attempts.min(16));
        initial.saturating_mul(factor).min(self.config.reconnect_backoff_max)
    }
}

/// A pub/sub command that gives up after `timeout` (a dead peer may never answer).
async fn with_timeout(
    timeout: Duration,
    command: impl Future<Output = Result<(), redis::RedisError>>,
) -> Result<(), redis::RedisError> {
    match tokio::time::timeout(timeout, command).await {
        Ok(result) => result,
        Err(_elapsed) => Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "redis pub/sub command timed out",
        ))),
    }
}
