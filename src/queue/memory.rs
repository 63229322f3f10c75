//! The in-process queue of `turbocat dev`: ordered sets behind one std mutex, which is never held
//! across an `.await` (every operation is a short synchronous critical section).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::{
    EnqueueOutcome, MAX_PEEK_LIMIT, Queue, QueueItem, QueueKey, QueueResult, QueueStats, ReadyRank,
    claim_deadline_millis,
};

/// A bounded in-process queue. Its wake-up counter changes on every enqueue, release and
/// requeue; all of them happen in this process, so no polling is needed.
pub struct MemoryQueue {
    state: Mutex<MemoryQueueState>,
    max_len: usize,
    ready_version: watch::Sender<u64>,
}

#[derive(Default)]
struct MemoryQueueState {
    entries: HashMap<QueueKey, MemoryEntry>,
    ready: BTreeSet<(ReadyRank, QueueKey)>,
    /// (deadline in Unix milliseconds, key): the same resolution the Redis queue uses.
    in_flight: BTreeSet<(i64, QueueKey)>,
}

struct MemoryEntry {
    item: QueueItem,
    rank: ReadyRank,
    placement: Placement,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Ready,
    InFlight { deadline_millis: i64 },
}

impl MemoryQueue {
    pub fn new(max_len: usize) -> Self {
        let (ready_version, _initial_receiver) = watch::channel(0);
        Self { state: Mutex::new(MemoryQueueState::default()), max_len, ready_version }
    }

    fn lock_state(&self) -> MutexGuard<'_, MemoryQueueState> {
        // A panic while holding the lock cannot leave the sets half-updated in a way that
        // matters more than losing the queue, which the reconciler rebuilds anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signal_new_work(&self) {
        self.ready_version.send_modify(|version| *version += 1);
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new(super::DEFAULT_MAX_LEN)
    }
}

impl MemoryQueueState {
    fn move_to_ready(&mut self, key: QueueKey) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        if let Placement::InFlight { deadline_millis } = entry.placement {
            self.in_flight.remove(&(deadline_millis, key));
        }
        entry.placement = Placement::Ready;
        self.ready.insert((entry.rank, key));
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn enqueue_many(&self, items: Vec<QueueItem>) -> QueueResult<Vec<EnqueueOutcome>> {
        for item in &items {
            item.validate()?;
        }
        let mut outcomes = Vec::with_capacity(items.len());
        {
            let mut state = self.lock_state();
            for item in items {
                let key = item.key();
                let outcome = if state.entries.contains_key(&key) {
                    EnqueueOutcome::AlreadyQueued
                } else if state.entries.len() >= self.max_len {
                    EnqueueOutcome::Full
                } else {
                    let rank = ReadyRank::of(&item);
                    state.ready.insert((rank, key));
                    let entry = MemoryEntry { item, rank, placement: Placement::Ready };
                    state.entries.insert(key, entry);
                    EnqueueOutcome::Enqueued
                };
                outcomes.push(outcome);
            }
        }
        if outcomes.contains(&EnqueueOutcome::Enqueued) {
            self.signal_new_work();
        }
        Ok(outcomes)
    }

    async fn peek(&self, limit: usize) -> QueueResult<Vec<QueueItem>> {
        let state = self.lock_state();
        let items = state
            .ready
            .iter()
            .take(limit.min(MAX_PEEK_LIMIT))
            .filter_map(|(_rank, key)| state.entries.get(key))
            .map(|entry| entry.item.clone())
            .collect();
        Ok(items)
    }

    async fn claim_many(
        &self,
        keys: &[QueueKey],
        visibility_timeout: Duration,
    ) -> QueueResult<Vec<bool>> {
        let deadline_millis = claim_deadline_millis(visibility_timeout);
        let mut state = self.lock_state();
        let MemoryQueueState { entries, ready, in_flight } = &mut *state;
        let claimed = keys
            .iter()
            .map(|key| {
                let Some(entry) = entries.get_mut(key) else { return false };
                if entry.placement != Placement::Ready {
                    return false;
                }
                ready.remove(&(entry.rank, *key));
                in_flight.insert((deadline_millis, *key));
                entry.placement = Placement::InFlight { deadline_millis };
                true
            })
            .collect();
        Ok(claimed)
    }

    async fn ack_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>> {
        let mut state = self.lock_state();
        let acknowledged = keys
            .iter()
            .map(|key| {
                let Some(entry) = state.entries.get(key) else { return false };
                let Placement::InFlight { deadline_millis } = entry.placement else {
                    return false;
                };
                state.in_flight.remove(&(deadline_millis, *key));
                state.entries.remove(key);
                true
            })
            .collect();
        Ok(acknowledged)
    }

    async fn release(&self, key: QueueKey) -> QueueResult<bool> {
        {
            let mut state = self.lock_state();
            let Some(entry) = state.entries.get(&key) else { return Ok(false) };
            if entry.placement == Placement::Ready {
                return Ok(false);
            }
            state.move_to_ready(key);
        }
        self.signal_new_work();
        Ok(true)
    }

    async fn requeue_expired(&self, now: DateTime<Utc>) -> QueueResult<Vec<QueueKey>> {
        let now_millis = now.timestamp_millis();
        let expired: Vec<QueueKey> = {
            let mut state = self.lock_state();
            let expired: Vec<QueueKey> = state
                .in_flight
                .iter()
                .take_while(|(deadline_millis, _key)| *deadline_millis <= now_millis)
                .map(|(_deadline_millis, key)| *key)
                .collect();
            for key in &expired {
                state.move_to_ready(*key);
            }
            expired
        };
        if !expired.is_empty() {
            self.signal_new_work();
        }
        Ok(expired)
    }

    async fn remove(&self, key: QueueKey) -> QueueResult<bool> {
        let mut state = self.lock_state();
        let Some(entry) = state.entries.remove(&key) else { return Ok(false) };
        match entry.placement {
            Placement::Ready => state.ready.remove(&(entry.rank, key)),
            Placement::InFlight { deadline_millis } => {
                state.in_flight.remove(&(deadline_millis, key))
            }
        };
        Ok(true)
    }

    async fn contains(&self, key: QueueKey) -> QueueResult<bool> {
        Ok(self.lock_state().entries.contains_key(&key))
    }

    async fn contains_many(&self, keys: &[QueueKey]) -> QueueResult<Vec<bool>> {
        let state = self.lock_state();
        Ok(keys.iter().map(|key| state.entries.contains_key(key)).collect())
    }

    async fn stats(&self) -> QueueResult<QueueStats> {
        let state = self.lock_state();
        debug_assert_eq!(state.ready.len() + state.in_flight.len(), state.entries.len());
        Ok(QueueStats { ready: state.ready.len() as u64, in_flight: state.in_flight.len() as u64 })
    }

    async fn clear(&self) -> QueueResult<()> {
        *self.lock_state() = MemoryQueueState::default();
        Ok(())
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn subscribe_ready(&self) -> watch::Receiver<u64> {
        self.ready_version.subscribe()
    }
}
