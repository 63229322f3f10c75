//! The Bus conformance suite.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use turbocat::bus::{BusError, BusMessage, BusStream, topics};
use uuid::Uuid;

use crate::Backend;

conformance!(
    subscribe_then_publish_delivers_in_order,
    every_subscriber_gets_every_message,
    topics_do_not_leak,
    dropping_subscriptions_cleans_up,
    lagging_subscriber_gets_a_lagged_marker,
    invalid_topics_are_refused,
    encoded_documents_arrive_decoded_in_order,
);

const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

async fn next_message(stream: &mut BusStream) -> BusMessage {
    tokio::time::timeout(RECEIVE_TIMEOUT, stream.next())
        .await
        .expect("a message within the timeout")
        .expect("the stream is still open")
}

async fn next_payload(stream: &mut BusStream) -> serde_json::Value {
    match next_message(stream).await {
        BusMessage::Payload(payload) => (*payload).clone(),
        other => panic!("expected a payload, got {other:?}"),
    }
}

async fn assert_silent(stream: &mut BusStream) {
    let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(next.is_err(), "expected no message, got {next:?}");
}

fn numbered(index: usize) -> serde_json::Value {
    json!({ "sequence": index, "kind": "step_completed" })
}

async fn subscribe_then_publish_delivers_in_order(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let topic = topics::execution(Uuid::new_v4());

    bus.publish(&topic, json!({ "before": "subscription" })).await.expect("publish early");
    let mut subscription = bus.subscribe(&topic).await.expect("subscribe");
    assert_eq!(bus.local_subscriber_count(&topic), 1);
    for index in 0..50 {
        bus.publish(&topic, numbered(index)).await.expect("publish");
    }
    for index in 0..50 {
        assert_eq!(next_payload(&mut subscription).await, numbered(index), "message {index}");
    }
    assert_silent(&mut subscription).await;

    // Any JSON value goes through unchanged.
    let nested = json!({ "text": "é ✓ \"quoted\"", "list": [1, 2.5, null, true], "empty": {} });
    bus.publish(&topic, nested.clone()).await.expect("publish nested");
    bus.publish(&topic, json!("just a string")).await.expect("publish string");
    let message = next_message(&mut subscription).await;
    assert_eq!(message.payload(), Some(&nested));
    assert!(!message.is_gap());
    assert_eq!(next_payload(&mut subscription).await, json!("just a string"));
}

async fn every_subscriber_gets_every_message(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let topic = topics::SESSIONS_REVOKED;
    let mut first = bus.subscribe(topic).await.expect("subscribe first");
    let mut second = bus.subscribe(topic).await.expect("subscribe second");
    assert_eq!(bus.local_subscriber_count(topic), 2);

    for index in 0..20 {
        bus.publish(topic, numbered(index)).await.expect("publish");
    }
    for index in 0..20 {
        assert_eq!(next_payload(&mut first).await, numbered(index), "first, message {index}");
    }
    for index in 0..20 {
        assert_eq!(next_payload(&mut second).await, numbered(index), "second, message {index}");
    }

    // A subscriber that joins later gets only what is published after it joined.
    let mut late = bus.subscribe(topic).await.expect("subscribe late");
    bus.publish(topic, numbered(20)).await.expect("publish");
    assert_eq!(next_payload(&mut late).await, numbered(20));
    assert_eq!(next_payload(&mut first).await, numbered(20));
    assert_eq!(next_payload(&mut second).await, numbered(20));
    assert_silent(&mut late).await;
}

async fn topics_do_not_leak(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let execution_a = topics::execution(Uuid::new_v4());
    let execution_b = topics::execution(Uuid::new_v4());
    let mut on_a = bus.subscribe(&execution_a).await.expect("subscribe a");
    let mut on_b = bus.subscribe(&execution_b).await.expect("subscribe b");
    // A topic that is a prefix of another is still another topic.
    let mut on_prefix = bus.subscribe("execution:").await.expect("subscribe prefix");

    bus.publish(&execution_a, json!({ "for": "a" })).await.expect("publish a");
    bus.publish(&execution_b, json!({ "for": "b" })).await.expect("publish b");
    bus.publish(topics::RUNNER_WAKEUPS, json!({ "for": "nobody" })).await.expect("publish");

    assert_eq!(next_payload(&mut on_a).await, json!({ "for": "a" }));
    assert_eq!(next_payload(&mut on_b).await, json!({ "for": "b" }));
    assert_silent(&mut on_a).await;
    assert_silent(&mut on_b).await;
    assert_silent(&mut on_prefix).await;
    assert_eq!(bus.local_subscriber_count(topics::RUNNER_WAKEUPS), 0);
}

async fn dropping_subscriptions_cleans_up(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let topic = topics::execution(Uuid::new_v4());
    let first = bus.subscribe(&topic).await.expect("subscribe first");
    let mut second = bus.subscribe(&topic).await.expect("subscribe second");
    assert_eq!(bus.local_subscriber_count(&topic), 2);

    drop(first);
    assert_eq!(bus.local_subscriber_count(&topic), 1);
    bus.publish(&topic, numbered(1)).await.expect("publish with one subscriber left");
    assert_eq!(next_payload(&mut second).await, numbered(1));

    drop(second);
    assert_eq!(bus.local_subscriber_count(&topic), 0);
    bus.publish(&topic, numbered(2)).await.expect("publish with nobody listening");

    // The topic can be subscribed again and only sees what comes next.
    let mut again = bus.subscribe(&topic).await.expect("subscribe again");
    assert_eq!(bus.local_subscriber_count(&topic), 1);
    bus.publish(&topic, numbered(3)).await.expect("publish");
    assert_eq!(next_payload(&mut again).await, numbered(3));
    assert_silent(&mut again).await;
}

/// The harness gives this bus a capacity of 4 per topic.
async fn lagging_subscriber_gets_a_lagged_marker(backend: Backend) {
    let harness = backend.bus(4).await;
    let bus = harness.bus.as_ref();
    let topic = topics::execution(Uuid::new_v4());
    let mut slow = bus.subscribe(&topic).await.expect("subscribe slow");
    // Messages of one publisher arrive in order across topics too, so once the sentinel is
    // through, all ten messages on `topic` have been handed to the slow subscriber's buffer.
    let mut sentinel = bus.subscribe("sentinel").await.expect("subscribe sentinel");

    for index in 0..10 {
        bus.publish(&topic, numbered(index)).await.expect("publish");
    }
    bus.publish("sentinel", json!("done")).await.expect("publish sentinel");
    assert_eq!(next_payload(&mut sentinel).await, json!("done"));

    let marker = next_message(&mut slow).await;
    assert_eq!(marker, BusMessage::Lagged { missed: 6 });
    assert!(marker.is_gap());
    assert_eq!(marker.payload(), None);
    for index in 6..10 {
        assert_eq!(next_payload(&mut slow).await, numbered(index), "kept message {index}");
    }
    // After catching up the subscriber is an ordinary one again.
    bus.publish(&topic, numbered(10)).await.expect("publish");
    assert_eq!(next_payload(&mut slow).await, numbered(10));
}

async fn invalid_topics_are_refused(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let too_long = "x".repeat(257);
    for invalid in ["", too_long.as_str(), "line\nbreak"] {
        let published = bus.publish(invalid, json!(1)).await;
        assert!(matches!(published, Err(BusError::InvalidTopic { .. })), "got {published:?}");
        let subscribed = bus.subscribe(invalid).await;
        assert!(
            matches!(subscribed, Err(BusError::InvalidTopic { .. })),
            "subscribe accepted an invalid topic"
        );
        assert_eq!(bus.local_subscriber_count(invalid), 0);
    }
    let longest_allowed = "y".repeat(256);
    let mut subscription = bus.subscribe(&longest_allowed).await.expect("256 bytes is fine");
    bus.publish(&longest_allowed, json!(1)).await.expect("publish");
    assert_eq!(next_payload(&mut subscription).await, json!(1));
}

mod redis_only {
    use super::*;
    use crate::{
        RedisPrefixGuard, admin_connection, random_prefix, redis_bus, redis_pool, redis_url,
    };
    use turbocat::bus::Bus;
    use turbocat::redis_pool::connect_redis;

    async fn redis_subscriber_count(channel: &str) -> u64 {
        let mut admin = admin_connection().await;
        let counts: (String, u64) = ::redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut admin)
            .await
            .expect("pubsub numsub");
        counts.1
    }

    /// Two buses on separate pools and pub/sub connections (two replicas) with one prefix
    /// deliver to each other; a third with another prefix hears nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_deliver_to_each_other() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let replica_a = redis_bus(redis_pool().await, &prefix, 64).await;
        let replica_b = redis_bus(redis_pool().await, &prefix, 64).await;
        let other_prefix = random_prefix();
        let other_deployment = redis_bus(redis_pool().await, &other_prefix, 64).await;
        let topic = topics::execution(Uuid::new_v4());

        let mut on_a = replica_a.subscribe(&topic).await.expect("subscribe on a");
        let mut on_b = replica_b.subscribe(&topic).await.expect("subscribe on b");
        let mut on_other = other_deployment.subscribe(&topic).await.expect("subscribe other");
        assert_eq!(redis_subscriber_count(&format!("{prefix}bus:{topic}")).await, 2);

        for index in 0..10 {
            replica_a.publish(&topic, numbered(index)).await.expect("publish on a");
        }
        for index in 0..10 {
            assert_eq!(next_payload(&mut on_b).await, numbered(index), "b hears a");
            assert_eq!(next_payload(&mut on_a).await, numbered(index), "a hears itself");
        }
        replica_b.publish(&topic, json!({ "from": "b" })).await.expect("publish on b");
        assert_eq!(next_payload(&mut on_a).await, json!({ "from": "b" }));
        assert_eq!(next_payload(&mut on_b).await, json!({ "from": "b" }));
        assert_silent(&mut on_other).await;
        assert_eq!(replica_a.local_subscriber_count(&topic), 1);
    }

    /// The Redis subscription follows the local ones: one SUBSCRIBE however many local
    /// subscribers, UNSUBSCRIBE when the last one leaves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unsubscribes_when_the_last_local_subscriber_leaves() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let bus = redis_bus(redis_pool().await, &prefix, 64).await;
        let topic = topics::execution(Uuid::new_v4());
        let channel = format!("{prefix}bus:{topic}");
        assert_eq!(redis_subscriber_count(&channel).await, 0);

        let first = bus.subscribe(&topic).await.expect("subscribe first");
        let second = bus.subscribe(&topic).await.expect("subscribe second");
        assert_eq!(redis_subscriber_count(&channel).await, 1, "one connection per process");
        drop(first);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(redis_subscriber_count(&channel).await, 1, "a local subscriber remains");
        drop(second);
        let unsubscribed =
            wait_until(|| async { redis_subscriber_count(&channel).await == 0 }).await;
        assert!(unsubscribed, "redis still has a subscriber on {channel}");

        // Subscribing again subscribes in Redis again.
        let mut again = bus.subscribe(&topic).await.expect("subscribe again");
        assert_eq!(redis_subscriber_count(&channel).await, 1);
        bus.publish(&topic, numbered(7)).await.expect("publish");
        assert_eq!(next_payload(&mut again).await, numbered(7));
    }

    /// A bus whose pub/sub connection is killed reconnects, subscribes again to every live
    /// topic, tells its subscribers (`Reconnected`), and delivers what is published afterwards.
    /// The bus logs in as a throwaway ACL user so `CLIENT KILL TYPE pubsub USER …` hits only
    /// its connection, not the other tests running in parallel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pubsub_recovers_after_client_kill() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let user = AclUserGuard::create().await;
        let pool = connect_redis(&user.url).await.expect("connect as the test user");
        assert!(!format!("{pool:?}").contains(&user.password), "pool debug shows the password");
        let bus = redis_bus(pool, &prefix, 64).await;
        let execution_topic = topics::execution(Uuid::new_v4());
        let mut executions = bus.subscribe(&execution_topic).await.expect("subscribe executions");
        let mut revocations =
            bus.subscribe(topics::SESSIONS_REVOKED).await.expect("subscribe revocations");
        bus.publish(&execution_topic, numbered(1)).await.expect("publish before kill");
        assert_eq!(next_payload(&mut executions).await, numbered(1));

        let mut admin = admin_connection().await;
        let killed: u64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .arg("USER")
            .arg(&user.name)
            .query_async(&mut admin)
            .await
            .expect("client kill");
        assert_eq!(killed, 1, "exactly the bus's pub/sub connection");

        assert_eq!(next_message(&mut executions).await, BusMessage::Reconnected);
        assert_eq!(next_message(&mut revocations).await, BusMessage::Reconnected);
        assert_eq!(redis_subscriber_count(&format!("{prefix}bus:{execution_topic}")).await, 1);

        for index in 2..6 {
            bus.publish(&execution_topic, numbered(index)).await.expect("publish after kill");
        }
        bus.publish(topics::SESSIONS_REVOKED, json!({ "session": "s1" })).await.expect("publish");
        for index in 2..6 {
            assert_eq!(next_payload(&mut executions).await, numbered(index), "after recovery");
        }
        assert_eq!(next_payload(&mut revocations).await, json!({ "session": "s1" }));

        // New topics work on the new connection too.
        let mut wakeups = bus.subscribe(topics::RUNNER_WAKEUPS).await.expect("subscribe new");
        bus.publish(topics::RUNNER_WAKEUPS, json!({ "runner": "r1" })).await.expect("publish");
        assert_eq!(next_payload(&mut wakeups).await, json!({ "runner": "r1" }));
        assert_silent(&mut executions).await;
    }

    async fn wait_until<F, Fut>(mut condition: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        for _ in 0..50 {
            if condition().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A Redis ACL user with every permission, deleted (with its connections) when dropped.
    struct AclUserGuard {
        name: String,
        password: String,
        url: String,
    }

    impl AclUserGuard {
        async fn create() -> Self {
            let name = format!("turbocat-test-{}", Uuid::new_v4().simple());
            let password = format!("secret-{}", Uuid::new_v4().simple());
            let mut admin = admin_connection().await;
            let () = ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg(&name)
                .arg("on")
                .arg(format!(">{password}"))
                .arg("~*")
                .arg("&*")
                .arg("+@all")
                .query_async(&mut admin)
                .await
                .expect("create acl user");
            let mut url = url::Url::parse(&redis_url()).expect("parse redis url");
            url.set_username(&name).expect("set username");
            url.set_password(Some(&password)).expect("set password");
            Self { name, password, url: url.to_string() }
        }
    }

    impl Drop for AclUserGuard {
        fn drop(&mut self) {
            let Ok(client) = ::redis::Client::open(redis_url()) else { return };
            let Ok(mut connection) = client.get_connection() else { return };
            let _: ::redis::RedisResult<u64> =
                ::redis::cmd("ACL").arg("DELUSER").arg(&self.name).query(&mut connection);
        }
    }
}

async fn encoded_documents_arrive_decoded_in_order(backend: Backend) {
    let harness = backend.bus(64).await;
    let bus = harness.bus.as_ref();
    let topic = topics::execution(Uuid::new_v4());
    let mut subscription = bus.subscribe(&topic).await.expect("subscribe");

    // Text and values from one publisher keep their order; the text arrives as its value.
    let encoded = r#"{"kind":"step","stepRun":{"id":"a","version":3},"lines":[{"message":"é"}]}"#;
    bus.publish(&topic, numbered(1)).await.expect("publish a value");
    bus.publish_json(&topic, encoded.to_owned()).await.expect("publish text");
    bus.publish_json(&topic, numbered(2).to_string()).await.expect("publish text");
    assert_eq!(next_payload(&mut subscription).await, numbered(1));
    let decoded: serde_json::Value = serde_json::from_str(encoded).expect("valid json");
    assert_eq!(next_payload(&mut subscription).await, decoded);
    assert_eq!(next_payload(&mut subscription).await, numbered(2));

    // A text that is not JSON reaches nobody, and what follows still does.
    bus.publish_json(&topic, "{not json".to_owned()).await.expect("publish is best effort");
    bus.publish_json(&topic, numbered(3).to_string()).await.expect("publish after");
    assert_eq!(next_payload(&mut subscription).await, numbered(3));
    assert_silent(&mut subscription).await;

    let refused = bus.publish_json("", "{}".to_owned()).await;
    assert!(matches!(refused, Err(BusError::InvalidTopic { .. })), "got {refused:?}");
}
