//! Revoked sessions, known to every replica within about a second: a revocation is applied
//! locally at once, announced on the bus, and every replica also polls the store each second
//! (the bus is an accelerator; the database is the truth).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use uuid::Uuid;

use crate::bus::{Bus, topics};
use crate::store::Store;

/// How often replicas read new revocations from the store.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The set of revoked sessions whose access tokens may still be unexpired.
#[derive(Default)]
pub struct RevokedSessions {
    /// Session id -> when its last token expires at the latest (then it can be forgotten).
    revoked: RwLock<HashMap<Uuid, DateTime<Utc>>>,
}

impl RevokedSessions {
    pub fn is_revoked(&self, session_id: Uuid) -> bool {
        self.revoked.read().map(|revoked| revoked.contains_key(&session_id)).unwrap_or(true)
    }

    /// Records a revocation made here (the store already holds it).
    pub fn remember(&self, session_id: Uuid, forget_after: DateTime<Utc>) {
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.insert(session_id, forget_after);
        }
    }

    fn forget_expired(&self, now: DateTime<Utc>) {
        if let Ok(mut revoked) = self.revoked.write() {
            revoked.retain(|_, forget_after| *forget_after > now);
        }
    }

    /// Records revocations locally and tells the other replicas.
    pub async fn announce(&self, bus: &dyn Bus, session_ids: &[Uuid], forget_after: DateTime<Utc>) {
        for session_id in session_ids {
            self.remember(*session_id, forget_after);
            let message =
                serde_json::json!({ "sessionId": session_id, "forgetAfter": forget_after });
            if let Err(error) = bus.publish(topics::SESSIONS_REVOKED, message).await {
                tracing::warn!(%error, "could not announce a session revocation; replicas will poll it");
            }
        }
    }

    /// Keeps the set current: bus messages as they come, the store every `POLL_INTERVAL`.
    pub async fn keep_current(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        access_token_lifetime: Duration,
    ) {
        let lifetime = chrono::Duration::from_std(access_token_lifetime)
            .unwrap_or(chrono::Duration::minutes(15));
        let mut since = Utc::now() - lifetime;
        let mut messages = match bus.subscribe(topics::SESSIONS_REVOKED).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to session revocations; polling only");
                None
            }
        };
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        let mut outage = crate::outage::Outage::new("polling session revocations");
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let polled_at = Utc::now();
                    match store.list_revoked_sessions_since(since).await {
                        Ok(sessions) => {
                            for session in sessions {
                                self.remember(session.session_id, polled_at + lifetime);
                            }
                            // Overlap one interval so a revocation committed during the poll is seen.
                            since = polled_at - chrono::Duration::seconds(2);
                            outage.succeeded();
                        }
                        Err(error) => {
                            outage.failed(&error);
                        }
                    }
                    self.forget_expired(polled_at);
                }
                message = async {
                    match messages.as_mut() {
                        Some(stream) => stream.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(message) = message else {
                        messages = None;
                        continue;
                    };
                    let Some(payload) = message.payload() else { continue };
                    let session_id = payload.get("sessionId").and_then(|value| value.as_str()).and_then(|text| Uuid::parse_str(text).ok());
                    if let Some(session_id) = session_id {
                        self.remember(session_id, Utc::now() + lifetime);
                    }
                }
            }
        }
    }
}
