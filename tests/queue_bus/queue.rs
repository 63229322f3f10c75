//! The Queue conformance suite.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::Barrier;
use turbocat::queue::{
    EnqueueOutcome, MAX_BATCH, Queue, QueueError, QueueItem, QueueKey, QueueStats,
};
use uuid::Uuid;

use crate::{Backend, TEST_WAKE_POLL_INTERVAL};

conformance!(
    orders_by_priority_then_age,
    enqueue_is_idempotent_on_key,
    bounded_queue_reports_full,
    peek_does_not_claim,
    concurrent_claims_have_exactly_one_winner,
    claim_ack_release_and_expiry,
    remove_contains_and_clear,
    wake_up_signals_new_work,
    invalid_items_are_refused,
    batches_answer_for_each_item_in_order,
    batches_longer_than_one_round_trip,
    racing_batch_claims_have_exactly_one_winner_per_key,
);

const CLAIM_TIMEOUT: Duration = Duration::from_secs(30);

fn base_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00.123456789Z")
        .expect("valid timestamp")
        .with_timezone(&Utc)
}

fn ready_item(priority: i32, enqueued_at: DateTime<Utc>) -> QueueItem {
    QueueItem {
        step_run_id: Uuid::now_v7(),
        attempt: 1,
        execution_id: Uuid::new_v4(),
        step_key: "step".to_owned(),
        owner_id: Uuid::new_v4(),
        priority,
        enqueued_at,
        agent_type: "code".to_owned(),
        required_labels: BTreeMap::from([
            ("region".to_owned(), "eu-west".to_owned()),
            ("gpu".to_owned(), "false".to_owned()),
        ]),
    }
}

fn keys_of(items: &[QueueItem]) -> Vec<QueueKey> {
    items.iter().map(QueueItem::key).collect()
}

async fn enqueue_all(queue: &dyn Queue, items: &[QueueItem]) {
    for item in items {
        let outcome = queue.enqueue(item.clone()).await.expect("enqueue");
        assert_eq!(outcome, EnqueueOutcome::Enqueued, "{} is new", item.key());
    }
}

async fn orders_by_priority_then_age(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let now = base_time();

    let old_low = ready_item(1, now - TimeDelta::hours(1));
    let new_high = ready_item(10, now);
    let old_high = ready_item(10, now - TimeDelta::minutes(10));
    let middle = ready_item(5, now - TimeDelta::hours(2));
    let newest_low = ready_item(1, now + TimeDelta::seconds(1));
    // Before the rank epoch (clamped to its start): still first among priority 1.
    let ancient_low = ready_item(1, now - TimeDelta::days(365 * 30));
    // One millisecond apart within priority 7: age decides, not the key.
    let mut one_ms_later = ready_item(7, now + TimeDelta::milliseconds(1));
    one_ms_later.step_run_id = Uuid::from_u128(1);
    let mut one_ms_earlier = ready_item(7, now);
    one_ms_earlier.step_run_id = Uuid::from_u128(u128::MAX);
    // Same priority and instant: ties go by step run id, then attempt (2 before 10).
    let tie_step_run_id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
    let mut tie_attempt_ten = ready_item(3, now);
    tie_attempt_ten.step_run_id = tie_step_run_id;
    tie_attempt_ten.attempt = 10;
    let mut tie_attempt_two = tie_attempt_ten.clone();
    tie_attempt_two.attempt = 2;

    let insertion_order = [
        newest_low.clone(),
        tie_attempt_ten.clone(),
        middle.clone(),
        one_ms_later.clone(),
        new_high.clone(),
        ancient_low.clone(),
        old_low.clone(),
        tie_attempt_two.clone(),
        one_ms_earlier.clone(),
        old_high.clone(),
    ];
    enqueue_all(queue, &insertion_order).await;

    let expected_order = vec![
        old_high,
        new_high,
        one_ms_earlier,
        one_ms_later,
        middle,
        tie_attempt_two,
        tie_attempt_ten,
        ancient_low,
        old_low,
        newest_low,
    ];
    let peeked = queue.peek(100).await.expect("peek all");
    assert_eq!(keys_of(&peeked), keys_of(&expected_order), "queue order");
    // The whole item survives the round trip (labels, nanosecond timestamps, ids).
    assert_eq!(peeked, expected_order);

    let first_three = queue.peek(3).await.expect("peek three");
    assert_eq!(first_three, expected_order[..3].to_vec());
    assert!(queue.peek(0).await.expect("peek none").is_empty());
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 10, in_flight: 0 });
}

async fn enqueue_is_idempotent_on_key(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let item = ready_item(4, base_time());

    assert_eq!(queue.enqueue(item.clone()).await.expect("first"), EnqueueOutcome::Enqueued);
    assert_eq!(queue.enqueue(item.clone()).await.expect("second"), EnqueueOutcome::AlreadyQueued);
    let mut same_key_other_fields = item.clone();
    same_key_other_fields.priority = 9;
    same_key_other_fields.agent_type = "llm".to_owned();
    let outcome = queue.enqueue(same_key_other_fields).await.expect("third");
    assert_eq!(outcome, EnqueueOutcome::AlreadyQueued);
    assert_eq!(queue.peek(10).await.expect("peek"), vec![item.clone()], "first entry kept as is");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 1, in_flight: 0 });

    // The next attempt of the same step run is a different entry.
    let mut next_attempt = item.clone();
    next_attempt.attempt = 2;
    assert_eq!(queue.enqueue(next_attempt.clone()).await.expect("next"), EnqueueOutcome::Enqueued);
    assert_eq!(queue.stats().await.expect("stats").ready, 2);

    // An in-flight entry is not put back to ready by a duplicate enqueue.
    assert!(queue.claim(item.key(), CLAIM_TIMEOUT).await.expect("claim"));
    let outcome = queue.enqueue(item.clone()).await.expect("enqueue in flight");
    assert_eq!(outcome, EnqueueOutcome::AlreadyQueued);
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 1, in_flight: 1 });
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), vec![next_attempt.key()]);
}

async fn bounded_queue_reports_full(backend: Backend) {
    let harness = backend.queue(3).await;
    let queue = harness.queue.as_ref();
    assert_eq!(queue.max_len(), 3);
    let now = base_time();
    let items: Vec<QueueItem> =
        (0..3).map(|index| ready_item(5, now + TimeDelta::seconds(index))).collect();
    enqueue_all(queue, &items).await;

    let overflow = ready_item(10, now);
    let refused = queue.enqueue(overflow.clone()).await;
    assert!(matches!(refused, Err(QueueError::Full { max_len: 3 })), "got {refused:?}");
    assert!(!queue.contains(overflow.key()).await.expect("contains"));
    // Idempotency wins over the bound: a known key is not an overflow.
    let duplicate = queue.enqueue(items[0].clone()).await.expect("duplicate");
    assert_eq!(duplicate, EnqueueOutcome::AlreadyQueued);

    // In-flight items still count toward the bound.
    assert!(queue.claim(items[0].key(), CLAIM_TIMEOUT).await.expect("claim"));
    let still_refused = queue.enqueue(overflow.clone()).await;
    assert!(matches!(still_refused, Err(QueueError::Full { .. })), "got {still_refused:?}");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 2, in_flight: 1 });

    // Acknowledging frees a slot.
    assert!(queue.ack(items[0].key()).await.expect("ack"));
    assert_eq!(queue.enqueue(overflow.clone()).await.expect("fits"), EnqueueOutcome::Enqueued);
    assert_eq!(queue.stats().await.expect("stats").total(), 3);
    let error = queue.enqueue(ready_item(1, now)).await.expect_err("full again");
    assert_eq!(error.to_string(), "queue is full (3 items)");
}

async fn peek_does_not_claim(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let now = base_time();
    let items: Vec<QueueItem> =
        (0..3).map(|index| ready_item(5, now + TimeDelta::seconds(index))).collect();
    enqueue_all(queue, &items).await;

    let first_look = queue.peek(10).await.expect("peek");
    let second_look = queue.peek(10).await.expect("peek again");
    assert_eq!(first_look, items);
    assert_eq!(second_look, items, "peeking twice sees the same items");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 3, in_flight: 0 });

    assert!(queue.claim(items[0].key(), CLAIM_TIMEOUT).await.expect("claim peeked item"));
    assert_eq!(queue.peek(10).await.expect("peek after claim"), items[1..].to_vec());
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 2, in_flight: 1 });
    assert!(queue.contains(items[0].key()).await.expect("claimed item is still held"));
}

async fn concurrent_claims_have_exactly_one_winner(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = Arc::clone(&harness.queue);
    let now = base_time();
    let items: Vec<QueueItem> =
        (0..25).map(|index| ready_item(5, now + TimeDelta::milliseconds(index))).collect();
    enqueue_all(queue.as_ref(), &items).await;
    let keys = keys_of(&items);

    // Two claimers walk the same keys at the same time.
    let start = Arc::new(Barrier::new(2));
    let claimers: Vec<_> = (0..2)
        .map(|_| {
            let queue = Arc::clone(&queue);
            let start = Arc::clone(&start);
            let keys = keys.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut won = Vec::new();
                for key in keys {
                    if queue.claim(key, CLAIM_TIMEOUT).await.expect("claim") {
                        won.push(key);
                    }
                }
                won
            })
        })
        .collect();
    let mut winners_per_claimer = Vec::new();
    for claimer in claimers {
        winners_per_claimer.push(claimer.await.expect("claimer task"));
    }
    let first: HashSet<QueueKey> = winners_per_claimer[0].iter().copied().collect();
    let second: HashSet<QueueKey> = winners_per_claimer[1].iter().copied().collect();
    assert!(first.is_disjoint(&second), "a key was claimed twice");
    assert_eq!(first.len() + second.len(), keys.len(), "every key was claimed once");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 0, in_flight: 25 });

    // Eight tasks race for one key: exactly one wins.
    let contested = ready_item(8, now);
    queue.enqueue(contested.clone()).await.expect("enqueue contested");
    let start = Arc::new(Barrier::new(8));
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let queue = Arc::clone(&queue);
            let start = Arc::clone(&start);
            let key = contested.key();
            tokio::spawn(async move {
                start.wait().await;
                queue.claim(key, CLAIM_TIMEOUT).await.expect("claim")
            })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        if racer.await.expect("racer task") {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert!(!queue.claim(contested.key(), CLAIM_TIMEOUT).await.expect("late claim"));
}

async fn claim_ack_release_and_expiry(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let now = base_time();
    let first = ready_item(5, now - TimeDelta::minutes(1));
    let second = ready_item(5, now);
    enqueue_all(queue, &[first.clone(), second.clone()]).await;

    // Ack and release only act on in-flight items.
    assert!(!queue.ack(first.key()).await.expect("ack of a ready item"));
    assert!(!queue.release(first.key()).await.expect("release of a ready item"));
    assert!(queue.contains(first.key()).await.expect("still queued"));

    assert!(queue.claim(first.key(), CLAIM_TIMEOUT).await.expect("claim"));
    assert!(!queue.claim(first.key(), CLAIM_TIMEOUT).await.expect("claim twice"));
    let not_yet = queue.requeue_expired(Utc::now()).await.expect("requeue before deadline");
    assert!(not_yet.is_empty(), "deadline is 30s away, got {not_yet:?}");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 1, in_flight: 1 });

    // Release puts it back in its own place (it is older than `second`).
    assert!(queue.release(first.key()).await.expect("release"));
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), vec![first.key(), second.key()]);
    assert!(!queue.release(first.key()).await.expect("release twice"));

    // Ack drops it for good.
    assert!(queue.claim(first.key(), CLAIM_TIMEOUT).await.expect("claim again"));
    assert!(queue.ack(first.key()).await.expect("ack"));
    assert!(!queue.contains(first.key()).await.expect("contains after ack"));
    assert!(!queue.ack(first.key()).await.expect("ack twice"));
    assert!(!queue.claim(first.key(), CLAIM_TIMEOUT).await.expect("claim after ack"));
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 1, in_flight: 0 });

    // Expired claims come back, earliest deadline first, and can be claimed again.
    let third = ready_item(5, now + TimeDelta::seconds(1));
    queue.enqueue(third.clone()).await.expect("enqueue third");
    assert!(queue.claim(second.key(), Duration::from_secs(5)).await.expect("claim second"));
    assert!(queue.claim(third.key(), Duration::from_secs(2)).await.expect("claim third"));
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 0, in_flight: 2 });
    let in_three_seconds = Utc::now() + TimeDelta::seconds(3);
    let expired_first = queue.requeue_expired(in_three_seconds).await.expect("requeue third");
    assert_eq!(expired_first, vec![third.key()], "only the 2s claim has expired");
    let later = Utc::now() + TimeDelta::seconds(60);
    assert_eq!(queue.requeue_expired(later).await.expect("requeue second"), vec![second.key()]);
    assert!(queue.requeue_expired(later).await.expect("requeue again").is_empty());
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 2, in_flight: 0 });
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), vec![second.key(), third.key()]);
    assert!(queue.claim(second.key(), CLAIM_TIMEOUT).await.expect("reclaim after expiry"));
    assert!(!queue.release(third.key()).await.expect("requeued item is not in flight"));
}

async fn remove_contains_and_clear(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let now = base_time();
    let ready_one = ready_item(5, now);
    let claimed_one = ready_item(5, now + TimeDelta::seconds(1));
    let kept_one = ready_item(5, now + TimeDelta::seconds(2));
    enqueue_all(queue, &[ready_one.clone(), claimed_one.clone(), kept_one.clone()]).await;
    assert!(queue.claim(claimed_one.key(), Duration::from_secs(1)).await.expect("claim"));
    for item in [&ready_one, &claimed_one, &kept_one] {
        assert!(queue.contains(item.key()).await.expect("contains"), "{} is held", item.key());
    }

    assert!(queue.remove(ready_one.key()).await.expect("remove ready"));
    assert!(queue.remove(claimed_one.key()).await.expect("remove in flight"));
    assert!(!queue.remove(ready_one.key()).await.expect("remove twice"));
    let unknown = QueueKey::new(Uuid::now_v7(), 1);
    assert!(!queue.remove(unknown).await.expect("remove unknown"));
    assert!(!queue.contains(unknown).await.expect("contains unknown"));
    assert!(!queue.contains(ready_one.key()).await.expect("contains removed"));
    assert!(!queue.contains(claimed_one.key()).await.expect("contains removed in flight"));
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 1, in_flight: 0 });
    let asked = [kept_one.key(), unknown, ready_one.key(), kept_one.key()];
    assert_eq!(
        queue.contains_many(&asked).await.expect("contains many"),
        vec![true, false, false, true],
        "answered in the order asked"
    );
    assert!(queue.contains_many(&[]).await.expect("contains none").is_empty());
    // A removed in-flight item is gone from every list.
    assert!(!queue.ack(claimed_one.key()).await.expect("ack removed"));
    let far_future = Utc::now() + TimeDelta::hours(1);
    assert!(queue.requeue_expired(far_future).await.expect("requeue").is_empty());
    assert_eq!(queue.peek(10).await.expect("peek"), vec![kept_one.clone()]);

    queue.clear().await.expect("clear");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats::default());
    assert!(!queue.contains(kept_one.key()).await.expect("contains after clear"));
    assert!(queue.peek(10).await.expect("peek after clear").is_empty());
    assert_eq!(queue.enqueue(kept_one).await.expect("enqueue again"), EnqueueOutcome::Enqueued);
}

async fn wake_up_signals_new_work(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = Arc::clone(&harness.queue);
    let mut ready = queue.subscribe_ready();
    let initial_version = *ready.borrow_and_update();

    // A dispatcher blocked on the signal is woken by an enqueue.
    let mut waiting_dispatcher = queue.subscribe_ready();
    waiting_dispatcher.borrow_and_update();
    let dispatcher = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), waiting_dispatcher.changed()).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let item = ready_item(5, base_time());
    queue.enqueue(item.clone()).await.expect("enqueue");
    let woken = dispatcher.await.expect("dispatcher task");
    assert!(matches!(woken, Ok(Ok(()))), "dispatcher was not woken: {woken:?}");
    assert!(ready.has_changed().expect("sender alive"), "enqueue signals");
    let after_enqueue = *ready.borrow_and_update();
    assert!(after_enqueue > initial_version);

    // Operations that make no new work ready stay silent.
    assert_eq!(queue.enqueue(item.clone()).await.expect("dup"), EnqueueOutcome::AlreadyQueued);
    queue.peek(10).await.expect("peek");
    assert!(queue.claim(item.key(), CLAIM_TIMEOUT).await.expect("claim"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!ready.has_changed().expect("sender alive"), "duplicate, peek and claim are silent");

    // Release and requeue make work ready again.
    assert!(queue.release(item.key()).await.expect("release"));
    assert!(ready.has_changed().expect("sender alive"), "release signals");
    let after_release = *ready.borrow_and_update();
    assert!(after_release > after_enqueue);
    assert!(queue.claim(item.key(), Duration::from_secs(1)).await.expect("claim again"));
    let far_future = Utc::now() + TimeDelta::hours(1);
    assert_eq!(queue.requeue_expired(far_future).await.expect("requeue"), vec![item.key()]);
    assert!(ready.has_changed().expect("sender alive"), "requeue signals");
    assert!(*ready.borrow_and_update() > after_release);
    assert!(queue.requeue_expired(far_future).await.expect("requeue nothing").is_empty());
    assert!(!ready.has_changed().expect("sender alive"), "an empty requeue is silent");
}

async fn invalid_items_are_refused(backend: Backend) {
    let harness = backend.queue(100).await;
    let queue = harness.queue.as_ref();
    let now = base_time();
    let too_low = ready_item(0, now);
    let too_high = ready_item(11, now);
    let mut negative_attempt = ready_item(5, now);
    negative_attempt.attempt = -1;

    for invalid in [too_low.clone(), too_high, negative_attempt] {
        let key = invalid.key();
        let refused = queue.enqueue(invalid).await;
        assert!(matches!(refused, Err(QueueError::InvalidItem { .. })), "got {refused:?}");
        assert!(!queue.contains(key).await.expect("contains"));
    }
    let message = queue.enqueue(too_low).await.expect_err("refused").to_string();
    assert_eq!(message, "invalid queue item: priority 0 is outside 1..=10");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats::default());
}

async fn batches_answer_for_each_item_in_order(backend: Backend) {
    let harness = backend.queue(4).await;
    let queue = Arc::clone(&harness.queue);
    let mut ready = queue.subscribe_ready();
    ready.borrow_and_update();
    let now = base_time();
    let queued = ready_item(5, now);
    enqueue_all(queue.as_ref(), std::slice::from_ref(&queued)).await;
    ready.borrow_and_update();

    // Known keys (queued before, or earlier in the batch) are kept; new ones fill the bound
    // of four in their order, and the rest are refused as full.
    let (urgent, old, young, late) = (
        ready_item(9, now),
        ready_item(5, now - TimeDelta::seconds(1)),
        ready_item(5, now + TimeDelta::seconds(1)),
        ready_item(10, now),
    );
    let batch = vec![
        young.clone(),
        queued.clone(),
        urgent.clone(),
        young.clone(),
        old.clone(),
        late.clone(),
    ];
    let outcomes = queue.enqueue_many(batch).await.expect("enqueue many");
    use EnqueueOutcome::{AlreadyQueued, Enqueued, Full};
    assert_eq!(outcomes, vec![Enqueued, AlreadyQueued, Enqueued, AlreadyQueued, Enqueued, Full]);
    assert!(ready.has_changed().expect("sender alive"), "a batch that adds signals");
    ready.borrow_and_update();
    let in_order = vec![urgent.key(), old.key(), queued.key(), young.key()];
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), in_order);
    assert!(!queue.contains(late.key()).await.expect("contains"), "the full one is not kept");

    // A batch that adds nothing is silent, and a batch with an invalid item adds nothing.
    let outcomes = queue.enqueue_many(vec![old.clone(), late.clone()]).await.expect("again");
    assert_eq!(outcomes, vec![AlreadyQueued, Full]);
    assert!(!ready.has_changed().expect("sender alive"), "a batch that adds nothing is silent");
    assert!(queue.enqueue_many(Vec::new()).await.expect("empty batch").is_empty());
    let mut invalid = ready_item(5, now);
    invalid.attempt = -1;
    let refused = queue.enqueue_many(vec![invalid]).await;
    assert!(matches!(refused, Err(QueueError::InvalidItem { .. })), "got {refused:?}");

    // Claims answer per key: a ready key once (its second mention loses), an unknown key never.
    let unknown = ready_item(5, now).key();
    let asked = [old.key(), unknown, old.key(), urgent.key()];
    let claimed = queue.claim_many(&asked, CLAIM_TIMEOUT).await.expect("claim many");
    assert_eq!(claimed, vec![true, false, false, true]);
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 2, in_flight: 2 });
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), vec![queued.key(), young.key()]);
    assert!(!queue.claim(old.key(), CLAIM_TIMEOUT).await.expect("claimed already"));
    assert!(queue.claim_many(&[], CLAIM_TIMEOUT).await.expect("empty claim").is_empty());

    // Acks answer per key: in flight once; ready, unknown or repeated keys are left alone.
    let asked = [queued.key(), old.key(), unknown, old.key(), urgent.key()];
    let acknowledged = queue.ack_many(&asked).await.expect("ack many");
    assert_eq!(acknowledged, vec![false, true, false, false, true]);
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 2, in_flight: 0 });
    assert!(!queue.contains(old.key()).await.expect("gone after ack"));
    assert!(queue.contains(queued.key()).await.expect("a ready key stays"));
    assert!(queue.ack_many(&[]).await.expect("empty ack").is_empty());

    // The acknowledged items freed room for new ones.
    let outcomes = queue.enqueue_many(vec![late.clone(), old.clone()]).await.expect("room");
    assert_eq!(outcomes, vec![Enqueued, Enqueued]);
    let in_order = vec![late.key(), old.key(), queued.key(), young.key()];
    assert_eq!(keys_of(&queue.peek(10).await.expect("peek")), in_order);
}

async fn batches_longer_than_one_round_trip(backend: Backend) {
    let harness = backend.queue(10_000).await;
    let queue = harness.queue.as_ref();
    let now = base_time();
    let count = MAX_BATCH * 2 + 3;
    let items: Vec<QueueItem> = (0..count)
        .map(|index| {
            let offset = i64::try_from(index).expect("small index");
            ready_item(5, now + TimeDelta::milliseconds(offset))
        })
        .collect();
    let outcomes = queue.enqueue_many(items.clone()).await.expect("enqueue many");
    assert_eq!(outcomes, vec![EnqueueOutcome::Enqueued; count]);
    let again = queue.enqueue_many(items.clone()).await.expect("enqueue again");
    assert_eq!(again, vec![EnqueueOutcome::AlreadyQueued; count]);
    assert_eq!(queue.peek(count).await.expect("peek"), items);

    let keys = keys_of(&items);
    assert_eq!(queue.claim_many(&keys, CLAIM_TIMEOUT).await.expect("claim"), vec![true; count]);
    let stats = queue.stats().await.expect("stats");
    assert_eq!(stats, QueueStats { ready: 0, in_flight: u64::try_from(count).expect("count") });
    assert_eq!(queue.ack_many(&keys).await.expect("ack"), vec![true; count]);
    assert_eq!(queue.stats().await.expect("stats"), QueueStats::default());
}

async fn racing_batch_claims_have_exactly_one_winner_per_key(backend: Backend) {
    let harness = backend.queue(1_000).await;
    let queue = Arc::clone(&harness.queue);
    let now = base_time();
    let items: Vec<QueueItem> =
        (0..40).map(|index| ready_item(5, now + TimeDelta::milliseconds(index))).collect();
    enqueue_all(queue.as_ref(), &items).await;
    let keys = keys_of(&items);

    // Four claimers ask for all of them at once, each in its own order.
    let start = Arc::new(Barrier::new(4));
    let claimers: Vec<_> = (0..4_usize)
        .map(|claimer| {
            let queue = Arc::clone(&queue);
            let start = Arc::clone(&start);
            let mut keys = keys.clone();
            keys.rotate_left(claimer * 10);
            tokio::spawn(async move {
                start.wait().await;
                let claimed = queue.claim_many(&keys, CLAIM_TIMEOUT).await.expect("claim many");
                keys.into_iter().zip(claimed).filter_map(|(key, won)| won.then_some(key)).collect()
            })
        })
        .collect();
    let mut won: Vec<QueueKey> = Vec::new();
    for claimer in claimers {
        let claimed: Vec<QueueKey> = claimer.await.expect("claimer task");
        won.extend(claimed);
    }
    let distinct: HashSet<QueueKey> = won.iter().copied().collect();
    assert_eq!(won.len(), keys.len(), "every key was claimed once: {won:?}");
    assert_eq!(distinct.len(), keys.len(), "no key was claimed twice");
    assert_eq!(queue.stats().await.expect("stats"), QueueStats { ready: 0, in_flight: 40 });
}

mod redis_only {
    use super::*;
    use crate::{RedisPrefixGuard, admin_connection, random_prefix, redis_pool, redis_queue};
    use turbocat::redis_pool::{RedisConnectError, connect_redis};

    /// Two replicas (separate pools, one prefix) share one queue, wake each other, and race
    /// for claims with exactly one winner per item.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_one_queue() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let replica_a = Arc::new(redis_queue(redis_pool().await, &prefix, 100));
        let replica_b = Arc::new(redis_queue(redis_pool().await, &prefix, 100));
        let mut ready_on_b = replica_b.subscribe_ready();
        ready_on_b.borrow_and_update();

        let now = base_time();
        let items: Vec<QueueItem> =
            (0..10).map(|index| ready_item(5, now + TimeDelta::seconds(index))).collect();
        enqueue_all(replica_a.as_ref(), &items).await;
        let woken = tokio::time::timeout(Duration::from_secs(2), ready_on_b.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "replica b was not woken: {woken:?}");
        assert_eq!(replica_b.peek(100).await.expect("peek on b"), items);
        assert!(replica_b.contains(items[3].key()).await.expect("contains on b"));
        let duplicate = replica_b.enqueue(items[0].clone()).await.expect("enqueue on b");
        assert_eq!(duplicate, EnqueueOutcome::AlreadyQueued);

        let start = Arc::new(Barrier::new(2));
        let claimers: Vec<_> = [Arc::clone(&replica_a), Arc::clone(&replica_b)]
            .into_iter()
            .map(|replica| {
                let start = Arc::clone(&start);
                let keys = keys_of(&items);
                tokio::spawn(async move {
                    start.wait().await;
                    let mut won = 0;
                    for key in keys {
                        if replica.claim(key, CLAIM_TIMEOUT).await.expect("claim") {
                            won += 1;
                        }
                    }
                    won
                })
            })
            .collect();
        let mut total_wins = 0;
        for claimer in claimers {
            total_wins += claimer.await.expect("claimer task");
        }
        assert_eq!(total_wins, items.len());
        assert_eq!(replica_a.stats().await.expect("stats"), QueueStats { ready: 0, in_flight: 10 });

        // Work that replica a makes ready again also wakes replica b.
        ready_on_b.borrow_and_update();
        assert!(replica_a.release(items[0].key()).await.expect("release on a"));
        let woken = tokio::time::timeout(Duration::from_secs(2), ready_on_b.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "release on a did not wake b: {woken:?}");
        assert!(replica_b.ack(items[1].key()).await.expect("ack on b of a's claim"));
    }

    /// Every key lives under the prefix, and another prefix is another queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_stay_under_the_prefix() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let queue = redis_queue(redis_pool().await, &prefix, 100);
        let item = ready_item(5, base_time());
        queue.enqueue(item.clone()).await.expect("enqueue");
        queue.enqueue(ready_item(5, base_time())).await.expect("enqueue another");
        assert!(queue.claim(item.key(), CLAIM_TIMEOUT).await.expect("claim"));

        let mut admin = admin_connection().await;
        let mut stored: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut admin)
            .await
            .expect("list keys");
        stored.sort();
        let expected: Vec<String> = ["queue:inflight", "queue:items", "queue:ranks", "queue:ready"]
            .iter()
            .chain(["queue:version"].iter())
            .map(|suffix| format!("{prefix}{suffix}"))
            .collect();
        assert_eq!(stored, expected);

        let other_prefix = random_prefix();
        let _other_keys = RedisPrefixGuard { prefix: other_prefix.clone() };
        let other_queue = redis_queue(redis_pool().await, &other_prefix, 100);
        assert_eq!(other_queue.stats().await.expect("stats"), QueueStats::default());
        assert!(!other_queue.contains(item.key()).await.expect("contains"));

        queue.clear().await.expect("clear");
        let remaining: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut admin)
            .await
            .expect("list keys");
        assert_eq!(remaining, vec![format!("{prefix}queue:version")], "only the version stays");
    }

    /// After Redis is flushed the version counter starts again at 0; other replicas must still
    /// be woken by the next enqueue (the reconciler refills the queue then).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wake_ups_survive_a_flush() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let replica_a = redis_queue(redis_pool().await, &prefix, 100);
        let replica_b = redis_queue(redis_pool().await, &prefix, 100);
        let mut ready_on_b = replica_b.subscribe_ready();
        // b wakes on a version different from the one its first poll saw: let that poll happen
        // before a enqueues (under load the poller's first tick can come late).
        tokio::time::sleep(TEST_WAKE_POLL_INTERVAL * 3).await;
        ready_on_b.borrow_and_update();
        let now = base_time();
        let items: Vec<QueueItem> =
            (0..5).map(|index| ready_item(5, now + TimeDelta::seconds(index))).collect();
        enqueue_all(&replica_a, &items).await;
        let woken = tokio::time::timeout(Duration::from_secs(2), ready_on_b.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "replica b was not woken: {woken:?}");

        let mut admin = admin_connection().await;
        let stored: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut admin)
            .await
            .expect("list keys");
        let _deleted: u64 =
            ::redis::cmd("DEL").arg(&stored).query_async(&mut admin).await.expect("flush");
        assert_eq!(replica_b.stats().await.expect("stats"), QueueStats::default());
        // Let b notice the flush (a harmless spurious wake-up), then wait for real work.
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready_on_b.borrow_and_update();

        let refilled = ready_item(9, now);
        replica_a.enqueue(refilled.clone()).await.expect("enqueue after flush");
        let woken = tokio::time::timeout(Duration::from_secs(2), ready_on_b.changed()).await;
        assert!(matches!(woken, Ok(Ok(()))), "no wake-up after the flush: {woken:?}");
        assert_eq!(replica_b.peek(10).await.expect("peek"), vec![refilled]);
    }

    /// An entry that does not decode is reported with its member, not silently skipped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_entries_are_reported() {
        let prefix = random_prefix();
        let _keys = RedisPrefixGuard { prefix: prefix.clone() };
        let queue = redis_queue(redis_pool().await, &prefix, 100);
        let item = ready_item(5, base_time());
        queue.enqueue(item.clone()).await.expect("enqueue");
        let mut admin = admin_connection().await;
        let member = format!("{}:{:010}", item.step_run_id, item.attempt);
        let _replaced: u64 = ::redis::cmd("HSET")
            .arg(format!("{prefix}queue:items"))
            .arg(&member)
            .arg("{not json")
            .query_async(&mut admin)
            .await
            .expect("corrupt the entry");

        let peeked = queue.peek(10).await;
        let Err(QueueError::CorruptEntry { member: reported, .. }) = peeked else {
            panic!("expected a corrupt entry error, got {peeked:?}");
        };
        assert_eq!(reported, member);
        // The key operations still work on it, so it can be removed.
        assert!(queue.contains(item.key()).await.expect("contains"));
        assert!(queue.remove(item.key()).await.expect("remove"));
        assert!(queue.peek(10).await.expect("peek after remove").is_empty());
    }

    /// A connection failure names host and port, never the password in the URL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connect_errors_name_the_host_but_not_the_password() {
        let password = "hunter2-do-not-print";
        let refused = connect_redis(&format!("redis://someone:{password}@127.0.0.1:1/"))
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(refused, RedisConnectError::Unreachable { .. }), "got {refused:?}");
        assert_eq!(refused.to_string(), "cannot connect to redis at 127.0.0.1:1");
        assert_no_secret(&refused, password);

        let wrong_password = connect_redis(&format!(
            "redis://nobody-{}:{password}@127.0.0.1:6379/",
            Uuid::new_v4().simple()
        ))
        .await
        .expect_err("unknown user");
        assert!(wrong_password.to_string().contains("127.0.0.1:6379"), "{wrong_password}");
        assert_no_secret(&wrong_password, password);

        let unparseable = connect_redis(&format!("redis://someone:{password}@127.0.0.1:notaport/"))
            .await
            .expect_err("bad port");
        assert!(matches!(unparseable, RedisConnectError::InvalidUrl { .. }), "got {unparseable:?}");
        assert_no_secret(&unparseable, password);
    }

    fn assert_no_secret(error: &RedisConnectError, secret: &str) {
        let mut rendered = format!("{error} / {error:?}");
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            rendered.push_str(&format!(" / {cause} / {cause:?}"));
            source = cause.source();
        }
        assert!(!rendered.contains(secret), "secret leaked: {rendered}");
    }
}
