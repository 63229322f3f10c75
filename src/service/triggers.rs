//! The cron trigger: a loop, started with the engine on every server replica, that starts the
//! executions of `RUNNING` cron deployments when their `next_run_at` falls due.
//!
//! Replicas share the work through the database alone. Every replica polls for due deployments
//! (`POLL_INTERVAL`, aligned on the wall clock, so seconds-level schedules fire on time), and
//! fires one only after claiming its tick with a compare-and-set on `next_run_at`
//! (`CronRunClaim`) in the transaction that creates the tick's execution: of several replicas
//! that saw the same tick, exactly one wins and starts the execution, and a replica that dies
//! before its commit leaves the tick due, so another fires it at its next poll. The claim also
//! moves `next_run_at` to the first fire time after *now*, so ticks missed while no server ran
//! fire once, not as a burst.
//!
//! Stopping, deleting or failing a deployment clears its `next_run_at` (and the claim checks
//! the status), which stops its trigger.
//! May call: the store and the deployments service.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde_json::json;

use super::deployments;
use crate::app::AppContext;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{CronRunClaim, Deployment};

/// How often each replica looks for due cron deployments.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long after a poll boundary the poll runs, so the wall clock has surely passed it.
const POLL_MARGIN: Duration = Duration::from_millis(5);
/// Due deployments read per query.
const BATCH_SIZE: u32 = 100;
/// Batches fired per poll at most; the rest waits for the next poll.
const MAX_BATCHES_PER_POLL: usize = 10;
/// Deployments of one batch started at the same time.
const CONCURRENT_FIRES: usize = 8;

/// Fires due cron deployments until the task is aborted (with the server). Polls are aligned
/// on the wall clock (every `POLL_INTERVAL` from the whole second, plus `POLL_MARGIN`), so a
/// tick fires a few milliseconds after its time, and every replica polls at the same moments:
/// the claim, not luck, is what keeps them from firing a tick twice.
pub async fn run_cron_triggers(context: Arc<AppContext>) {
    let mut outage = crate::outage::Outage::new("firing due cron deployments");
    loop {
        tokio::time::sleep(until_next_poll(Utc::now()) + outage.pause()).await;
        match fire_due_cron_deployments(&context, Utc::now()).await {
            Ok(_) => outage.succeeded(),
            Err(error) => {
                outage.failed(&error);
            }
        }
    }
}

/// How long from `now` to the next poll: the next multiple of `POLL_INTERVAL` on the wall
/// clock, plus `POLL_MARGIN`.
fn until_next_poll(now: DateTime<Utc>) -> Duration {
    let interval = i64::try_from(POLL_INTERVAL.as_millis()).unwrap_or(1_000).max(1);
    let now_millis = now.timestamp_millis();
    let next = (now_millis.div_euclid(interval) + 1) * interval;
    Duration::from_millis(u64::try_from(next - now_millis).unwrap_or(0)) + POLL_MARGIN
}

/// Fires every cron deployment due at `now` whose tick this replica claims; how many
/// executions it started.
pub async fn fire_due_cron_deployments(
    context: &AppContext,
    now: DateTime<Utc>,
) -> ServiceResult<usize> {
    let mut started = 0;
    for _ in 0..MAX_BATCHES_PER_POLL {
        let due = context
            .store
            .list_due_cron_deployments(now, BATCH_SIZE)
            .await
            .map_err(|error| ServiceError::from_store(error, "deployment"))?;
        let full_batch = due.len() == usize::try_from(BATCH_SIZE).unwrap_or(usize::MAX);
        started += futures::stream::iter(due)
            .map(|deployment| fire(context, deployment, now))
            .buffer_unordered(CONCURRENT_FIRES)
            .filter(|fired| std::future::ready(*fired))
            .count()
            .await;
        // Claimed or lost, every listed row has left the due set: the next batch is new.
        if !full_batch {
            break;
        }
    }
    Ok(started)
}

/// Claims the deployment's due tick and starts its execution, both in one transaction;
/// whether one was started.
async fn fire(context: &AppContext, deployment: Deployment, now: DateTime<Utc>) -> bool {
    let Some(due_at) = deployment.next_run_at else { return false };
    let claim = CronRunClaim {
        deployment_id: deployment.id,
        due_at,
        next_run_at: deployments::next_run_time(&deployment.trigger, now),
        triggered_at: now,
    };
    let occasion = format!("cron tick {}", due_at.to_rfc3339_opts(SecondsFormat::Secs, true));
    let trigger = deployments::Trigger::Cron(claim);
    match deployments::start_triggered_execution(
        context,
        &deployment,
        trigger,
        json!({}),
        &occasion,
    )
    .await
    {
        Ok(_) => true,
        // Another replica fired this tick, or the deployment was stopped meanwhile.
        Err(error) if error.is_claim_taken() => false,
        Err(error) => {
            tracing::warn!(error = %error.message, deployment_id = %deployment.id,
                "a cron deployment could not start its execution");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_fall_on_the_wall_clock_grid() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).expect("time").to_utc();
        assert_eq!(
            until_next_poll(at("2026-01-01T10:00:00.200Z")),
            Duration::from_millis(300) + POLL_MARGIN
        );
        assert_eq!(
            until_next_poll(at("2026-01-01T10:00:00.500Z")),
            Duration::from_millis(500) + POLL_MARGIN,
            "on a boundary: the next one"
        );
        assert_eq!(
            until_next_poll(at("2026-01-01T10:00:00.999Z")),
            Duration::from_millis(1) + POLL_MARGIN
        );
    }
}
