//! Who an attached runner works for, decided at attach and decided again whenever that can
//! change: a runner's key revoked or expired, its owner deleted, demoted or stripped of the
//! right. Every replica re-checks the keys of the runners attached to it when told on the bus
//! (`topics::RUNNER_ACCESS_CHANGED`, published by the operations that change keys and roles)
//! and every `RECHECK_INTERVAL` (expiry, and a bus message lost); a runner whose key no longer
//! grants what it attached with is withdrawn (`Engine::withdraw_runner`): its steps go back to
//! the queue and its stream ends. A runner whose key still works attaches again with what the
//! key grants now.
//! May call: the store (through `crate::auth::api_keys::recheck`), the bus and the engine.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;

use crate::app::AppContext;
use crate::auth::caller::{Caller, Credential};
use crate::bus::topics;
use crate::engine::attached_runners::{RunnerGrant, RunnerOwner};
use crate::error::ServiceError;
use crate::store::ApiKeyScope;

/// How often every replica re-checks its runners' keys without being told (key expiry).
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What a runner attaching as `caller` may do: an API key with the `runner` scope is
/// required; an admin's key created `shared` serves everyone, any other key only its owner.
pub fn runner_grant(caller: &Caller) -> Result<RunnerGrant, ServiceError> {
    match &caller.credential {
        Credential::ApiKey { scopes, shared, api_key_id }
            if scopes.contains(&ApiKeyScope::Runner) =>
        {
            let owner =
                if *shared { RunnerOwner::Shared } else { RunnerOwner::User(caller.user_id) };
            // The in-process runner of `dev` carries no stored key (its id is nil).
            let api_key_id = (!api_key_id.is_nil()).then_some(*api_key_id);
            Ok(RunnerGrant { owner, api_key_id })
        }
        _ => Err(ServiceError::forbidden(
            "attaching a runner needs an API key with the runner scope",
        )),
    }
}

/// Re-checks the key of every runner attached to this replica and withdraws those whose key
/// no longer grants what they attached with. A store that cannot answer withdraws no one.
pub async fn recheck_attached_runners(context: &AppContext) {
    let now = Utc::now();
    for (runner_id, grant) in context.engine.attached_runner_grants() {
        let Some(api_key_id) = grant.api_key_id else { continue };
        let verdict =
            match crate::auth::api_keys::recheck(context.store.as_ref(), api_key_id, now).await {
                Ok(caller) => match runner_grant(&caller) {
                    Ok(current) if current == grant => continue,
                    Ok(_) => "the runner key's owner lost the right to run a shared runner",
                    Err(_) => "the runner key no longer has the runner scope",
                },
                Err(crate::auth::api_keys::STORE_UNAVAILABLE) => continue,
                Err(reason) => reason,
            };
        context.engine.withdraw_runner(&runner_id, verdict).await;
    }
}

/// Re-checks the runners here at once, and tells every other replica to (a key was revoked,
/// a role changed). The periodic re-check covers a lost message.
pub async fn announce_access_change(context: &AppContext) {
    recheck_attached_runners(context).await;
    if let Err(error) =
        context.bus.publish(topics::RUNNER_ACCESS_CHANGED, serde_json::json!({})).await
    {
        tracing::warn!(%error, "could not announce a runner access change; replicas will re-check on their own");
    }
}

/// Keeps the runners attached here honest: re-checks on every bus message and every
/// `RECHECK_INTERVAL`, until the process ends.
pub async fn keep_runner_access_current(context: std::sync::Arc<AppContext>) {
    let mut messages = match context.bus.subscribe(topics::RUNNER_ACCESS_CHANGED).await {
        Ok(stream) => Some(stream),
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe to runner access changes; re-checking on a timer only");
            None
        }
    };
    let mut ticker = tokio::time::interval(RECHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            message = async {
                match messages.as_mut() {
                    Some(stream) => stream.next().await,
                    None => std::future::pending().await,
                }
            } => {
                if message.is_none() {
                    messages = None;
                    continue;
                }
            }
        }
        recheck_attached_runners(&context).await;
    }
}
