//! API calls per user and day, counted in memory as the auth layer meets each authenticated
//! request and added to the store's usage rollups (`usage_rollups.api_calls`) every few seconds
//! and whenever someone reads usage. Counting in memory keeps a database write off every request;
//! a replica that dies loses at most its last few seconds of counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use crate::store::{ApiCallCount, Store, StoreResult};

/// How often the counts go to the store.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// The calls counted since the last flush, by user and day (epoch seconds of midnight UTC).
#[derive(Default)]
pub struct ApiCallCounter {
    pending: Mutex<HashMap<(Uuid, i64), i64>>,
}

impl ApiCallCounter {
    /// Counts one call of `user_id` now.
    pub fn record(&self, user_id: Uuid) {
        let day_start = chrono::Utc::now().timestamp().div_euclid(86_400) * 86_400;
        let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending.entry((user_id, day_start)).or_insert(0) += 1;
    }

    /// Adds the pending counts to the store; on failure they are kept for the next flush.
    pub async fn flush(&self, store: &dyn Store) -> StoreResult<()> {
        let taken: Vec<ApiCallCount> = {
            let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            pending
                .drain()
                .map(|((user_id, day_start), calls)| ApiCallCount { user_id, day_start, calls })
                .collect()
        };
        if let Err(error) = store.add_api_calls(&taken).await {
            let mut pending = self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for count in taken {
                *pending.entry((count.user_id, count.day_start)).or_insert(0) += count.calls;
            }
            return Err(error);
        }
        Ok(())
    }

    /// Flushes every `FLUSH_INTERVAL` until the process ends.
    pub async fn keep_flushing(self: Arc<Self>, store: Arc<dyn Store>) {
        let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outage = crate::outage::Outage::new("recording api call counts");
        loop {
            ticker.tick().await;
            match self.flush(store.as_ref()).await {
                Ok(()) => outage.succeeded(),
                Err(error) => {
                    outage.failed(&error);
                }
            }
        }
    }
}
