//! `AnalyticsService`: the overview, per-agent and per-workflow metrics with their health
//! verdicts, system health and usage per user and day. Execution and step numbers are sums of the
//! rollup rows the database keeps as runs finish (`store::AnalyticsStore`); this module checks
//! the request, picks the rows the caller may see and turns histograms into percentiles.
//! May call: the store, the engine (attached runners), the app's health probes and the auth
//! usage counter (to flush API calls before reading them). The alert rules read the agent
//! health verdict, the oldest queued step and the visible runners here.

use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::validate::{Validator, parse_id};
use super::{agents, workflows};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    self, DurationTally, HourRange, OutcomeTally, OwnerScope, RollupFilter, WorkflowRankingOrder,
};

/// The longest range a query may cover.
const MAX_RANGE_DAYS: i64 = 366;
/// The range when the caller gives no `from`.
const DEFAULT_RANGE_DAYS: i64 = 7;
/// Workflows per ranking of the overview.
const RANKING_SIZE: u32 = 5;
/// Error messages per metrics answer.
const TOP_ERRORS: u32 = 10;
/// A failure rate at or above this, with at least `FAILING_MIN_FAILURES` failures, is FAILING.
const FAILING_RATE: f64 = 0.5;
const FAILING_MIN_FAILURES: i64 = 3;
/// A failure rate at or above this (and any failure rate short of FAILING's) is DEGRADED.
const DEGRADED_RATE: f64 = 0.1;
const HOUR_SECONDS: i64 = 3_600;
const DAY_SECONDS: i64 = 86_400;

/// A validated range.
#[derive(Debug, Clone, Copy)]
struct Range {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

impl Range {
    fn hours(self) -> HourRange {
        HourRange::covering(self.from, self.to)
    }
}

/// `from` and `to` with their defaults (the 7 days before now); `from` must be before `to`, at
/// most 366 days apart.
fn range(
    validator: &mut Validator,
    from: Option<&prost_types::Timestamp>,
    to: Option<&prost_types::Timestamp>,
) -> Range {
    let mut time = |field: &str, timestamp: Option<&prost_types::Timestamp>| {
        let timestamp = timestamp?;
        let time = wkt::time_from_timestamp(timestamp);
        if time.is_none() {
            validator.error(field, "is out of range");
        }
        time
    };
    let to_time = time("to", to).unwrap_or_else(Utc::now);
    let from_time = time("from", from).unwrap_or(to_time - Duration::days(DEFAULT_RANGE_DAYS));
    if from_time >= to_time {
        validator.error("from", "must be before to");
    } else if to_time - from_time > Duration::days(MAX_RANGE_DAYS) {
        validator.error("to", format!("must be at most {MAX_RANGE_DAYS} days after from"));
    }
    Range { from: from_time, to: to_time }
}

/// Whose numbers: the caller's own, or with `all` everyone's (administrators only).
fn scope(validator: &mut Validator, caller: &Caller, scope: &str) -> ServiceResult<OwnerScope> {
    match scope.trim() {
        "" | "own" => Ok(OwnerScope::Owner(caller.user_id)),
        "all" => {
            caller.require_admin()?;
            Ok(OwnerScope::All)
        }
        _ => {
            validator.error("scope", "must be own or all");
            Ok(OwnerScope::Owner(caller.user_id))
        }
    }
}

/// The width of the overview's buckets: `hour` or `day` (default).
fn bucket_seconds(validator: &mut Validator, bucket: &str) -> i64 {
    match bucket.trim() {
        "" | "day" => DAY_SECONDS,
        "hour" => HOUR_SECONDS,
        _ => {
            validator.error("bucket", "must be hour or day");
            DAY_SECONDS
        }
    }
}

fn store_error(error: store::StoreError) -> ServiceError {
    ServiceError::from_store(error, "analytics")
}

fn count(value: i64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

/// Adds up the tallies of every bucket by status.
fn outcome_counts<'tally>(
    tallies: impl IntoIterator<Item = &'tally OutcomeTally>,
) -> pb::OutcomeCounts {
    let mut counts = pb::OutcomeCounts::default();
    for tally in tallies {
        let number = count(tally.count);
        match tally.status.as_str() {
            "SUCCEEDED" => counts.succeeded = counts.succeeded.saturating_add(number),
            "FAILED" => counts.failed = counts.failed.saturating_add(number),
            "CANCELLED" => counts.cancelled = counts.cancelled.saturating_add(number),
            "TIMED_OUT" => counts.timed_out = counts.timed_out.saturating_add(number),
            _ => continue,
        }
        counts.total = counts.total.saturating_add(number);
    }
    counts
}

fn success_rate(counts: &pb::OutcomeCounts) -> f64 {
    if counts.total == 0 {
        return 0.0;
    }
    f64::from(counts.succeeded) / f64::from(counts.total)
}

/// The average and the percentiles of a histogram (runs that never started left out). Each
/// percentile is the upper edge of the bucket that holds it.
fn duration_stats(histogram: &[DurationTally]) -> pb::DurationStats {
    let started: Vec<&DurationTally> =
        histogram.iter().filter(|tally| tally.duration_bucket >= 0 && tally.count > 0).collect();
    let runs: i64 = started.iter().map(|tally| tally.count).sum();
    if runs == 0 {
        return pb::DurationStats::default();
    }
    let total_seconds: f64 = started.iter().map(|tally| tally.duration_seconds).sum();
    let percentile = |fraction: f64| {
        let rank = ((runs as f64) * fraction).ceil().max(1.0) as i64;
        let mut seen = 0;
        for tally in &started {
            seen += tally.count;
            if seen >= rank {
                return store::duration_bucket_upper_seconds(tally.duration_bucket);
            }
        }
        started
            .last()
            .map_or(0.0, |tally| store::duration_bucket_upper_seconds(tally.duration_bucket))
    };
    pb::DurationStats {
        average_seconds: total_seconds / runs as f64,
        p50_seconds: percentile(0.50),
        p95_seconds: percentile(0.95),
        p99_seconds: percentile(0.99),
    }
}

/// The health verdict (see the README): cancellations do not count; failures are FAILED and
/// TIMED_OUT runs.
fn health(counts: &pb::OutcomeCounts) -> (pb::HealthVerdict, String) {
    let failures = i64::from(counts.failed) + i64::from(counts.timed_out);
    let judged = failures + i64::from(counts.succeeded);
    if judged == 0 {
        return (
            pb::HealthVerdict::NoData,
            "no run succeeded, failed or timed out in the range".to_owned(),
        );
    }
    let failure_rate = failures as f64 / judged as f64;
    let percent = (failure_rate * 100.0).round();
    let observed = format!("{failures} of {judged} runs failed or timed out ({percent}%)");
    if failure_rate >= FAILING_RATE && failures >= FAILING_MIN_FAILURES {
        return (
            pb::HealthVerdict::Failing,
            format!("{observed}: at least 50% and at least 3 failures is failing"),
        );
    }
    if failure_rate >= DEGRADED_RATE {
        return (pb::HealthVerdict::Degraded, format!("{observed}: at least 10% is degraded"));
    }
    (pb::HealthVerdict::Healthy, format!("{observed}: under 10% is healthy"))
}

fn error_counts(errors: Vec<store::ErrorTally>) -> Vec<pb::ErrorCount> {
    errors
        .into_iter()
        .map(|error| pb::ErrorCount { message: error.message, count: count(error.occurrences) })
        .collect()
}

fn ranking(tallies: Vec<store::WorkflowTally>) -> Vec<pb::WorkflowRanking> {
    tallies
        .into_iter()
        .map(|tally| pb::WorkflowRanking {
            workflow_id: tally.workflow_id.to_string(),
            workflow_name: tally.name.unwrap_or_default(),
            executions: count(tally.executions),
            failed: count(tally.failed),
        })
        .collect()
}

fn epoch_timestamp(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// Runners attached to any replica in `scope`: shared ones and the owner's own, or all.
pub(crate) async fn visible_runners(context: &AppContext, scope: OwnerScope) -> Vec<pb::Runner> {
    let owner_id = scope.owner_id().map(|owner_id| owner_id.to_string());
    let mut runners: Vec<pb::Runner> = context
        .engine
        .runners_of_every_replica()
        .await
        .into_iter()
        .filter(|runner| {
            runner.owner_id.is_empty()
                || owner_id.as_ref().is_none_or(|owner_id| &runner.owner_id == owner_id)
        })
        .collect();
    runners.sort_by(|left, right| left.id.cmp(&right.id));
    runners
}

/// Totals, rates, percentiles and rankings over a range.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_overview(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetOverviewRequest,
) -> ServiceResult<pb::GetOverviewResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let range = range(&mut validator, request.from.as_ref(), request.to.as_ref());
    let bucket_seconds = bucket_seconds(&mut validator, &request.bucket);
    let scope = scope(&mut validator, caller, &request.scope)?;
    validator.finish()?;

    let store = context.store.as_ref();
    let hours = range.hours();
    let filter = RollupFilter::scope(scope);
    // Independent reads: run them at once (each is one rollup scan).
    let (resources, outcomes, durations, steps, busiest, most_failing) = tokio::try_join!(
        store.resource_counts(scope),
        store.execution_outcomes(filter, hours, bucket_seconds),
        store.execution_durations(filter, hours),
        store.step_outcomes(filter, hours, DAY_SECONDS),
        store.rank_workflows(scope, hours, WorkflowRankingOrder::MostExecutions, RANKING_SIZE),
        store.rank_workflows(scope, hours, WorkflowRankingOrder::MostFailures, RANKING_SIZE),
    )
    .map_err(store_error)?;

    let mut buckets: Vec<pb::OutcomeBucket> = Vec::new();
    for tally in &outcomes {
        let same_bucket = buckets.last().is_some_and(|bucket| {
            bucket.start.is_some_and(|start| start.seconds == tally.bucket_start)
        });
        if !same_bucket {
            buckets.push(pb::OutcomeBucket {
                start: epoch_timestamp(tally.bucket_start),
                executions: Some(pb::OutcomeCounts::default()),
            });
        }
        if let Some(bucket) = buckets.last_mut() {
            let added = outcome_counts([tally]);
            let counts = bucket.executions.get_or_insert_with(Default::default);
            counts.total += added.total;
            counts.succeeded += added.succeeded;
            counts.failed += added.failed;
            counts.cancelled += added.cancelled;
            counts.timed_out += added.timed_out;
        }
    }
    let executions = outcome_counts(&outcomes);
    let runners = visible_runners(context, scope).await;
    Ok(pb::GetOverviewResponse {
        from: Some(wkt::timestamp(range.from)),
        to: Some(wkt::timestamp(range.to)),
        agent_count: count(resources.agents),
        workflow_count: count(resources.workflows),
        deployment_count: count(resources.deployments),
        runner_count: count(i64::try_from(runners.len()).unwrap_or(i64::MAX)),
        success_rate: success_rate(&executions),
        executions: Some(executions),
        queued_executions: count(resources.queued_executions),
        running_executions: count(resources.running_executions),
        duration: Some(duration_stats(&durations)),
        steps_run: outcome_counts(&steps).total,
        buckets,
        busiest_workflows: ranking(busiest),
        most_failing_workflows: ranking(most_failing),
    })
}

/// The health verdict of an agent over `[from, to)` (whole hours), as its metrics report it:
/// the alert rules' AGENT_FAILING reads it here.
pub(crate) async fn agent_health_verdict(
    context: &AppContext,
    agent_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> ServiceResult<(pb::HealthVerdict, String)> {
    let filter = RollupFilter { agent_id: Some(agent_id), ..RollupFilter::default() };
    let outcomes = context
        .store
        .step_outcomes(filter, Range { from, to }.hours(), DAY_SECONDS)
        .await
        .map_err(store_error)?;
    Ok(health(&outcome_counts(&outcomes)))
}

/// Seconds the oldest QUEUED step in `scope` has waited (0 when none waits), as the system
/// health reports it; the alert rules' QUEUED_STEP_TOO_OLD reads it here.
pub(crate) async fn oldest_queued_step_seconds(
    context: &AppContext,
    scope: OwnerScope,
) -> ServiceResult<f64> {
    let depth = context.store.queue_depth(scope).await.map_err(store_error)?;
    Ok(oldest_wait_seconds(&depth, Utc::now()))
}

fn oldest_wait_seconds(depth: &[store::QueueDepthTally], now: DateTime<Utc>) -> f64 {
    let oldest = depth.iter().filter_map(|tally| tally.oldest_queued_at).min();
    oldest.map_or(0.0, |queued_at| (now - queued_at).num_milliseconds().max(0) as f64 / 1000.0)
}

/// The runs of one agent: every attempt of a step that used it.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_agent_metrics(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetAgentMetricsRequest,
) -> ServiceResult<pb::GetAgentMetricsResponse> {
    caller.require_user_access(Access::Read)?;
    let agent_id = parse_id("agentId", &request.agent_id)?;
    let mut validator = Validator::new();
    let range = range(&mut validator, request.from.as_ref(), request.to.as_ref());
    validator.finish()?;
    let agent = agents::load_agent(context, caller, agent_id).await?;

    let store = context.store.as_ref();
    let hours = range.hours();
    let filter = RollupFilter { agent_id: Some(agent.id), ..RollupFilter::default() };
    let (outcomes, durations, errors) = tokio::try_join!(
        store.step_outcomes(filter, hours, DAY_SECONDS),
        store.step_durations(filter, hours),
        store.top_errors(agent.id, hours, TOP_ERRORS),
    )
    .map_err(store_error)?;
    let runs = outcome_counts(&outcomes);
    let (verdict, reason) = health(&runs);
    Ok(pb::GetAgentMetricsResponse {
        agent_id: agent.id.to_string(),
        from: Some(wkt::timestamp(range.from)),
        to: Some(wkt::timestamp(range.to)),
        success_rate: success_rate(&runs),
        retries: count(outcomes.iter().map(|tally| tally.retries).sum()),
        timeouts: runs.timed_out,
        runs: Some(runs),
        duration: Some(duration_stats(&durations)),
        top_errors: error_counts(errors),
        health: verdict.into(),
        health_reason: reason,
    })
}

/// The executions of one workflow.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_workflow_metrics(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetWorkflowMetricsRequest,
) -> ServiceResult<pb::GetWorkflowMetricsResponse> {
    caller.require_user_access(Access::Read)?;
    let workflow_id = parse_id("workflowId", &request.workflow_id)?;
    let mut validator = Validator::new();
    let range = range(&mut validator, request.from.as_ref(), request.to.as_ref());
    validator.finish()?;
    let workflow = workflows::load_workflow(context, caller, workflow_id).await?;
    let workflow_id: Uuid = workflow.workflow.id;

    let store = context.store.as_ref();
    let hours = range.hours();
    let filter = RollupFilter { workflow_id: Some(workflow_id), ..RollupFilter::default() };
    let (outcomes, durations, steps, errors) = tokio::try_join!(
        store.execution_outcomes(filter, hours, DAY_SECONDS),
        store.execution_durations(filter, hours),
        store.step_outcomes(filter, hours, DAY_SECONDS),
        store.top_errors(workflow_id, hours, TOP_ERRORS),
    )
    .map_err(store_error)?;
    let runs = outcome_counts(&outcomes);
    let (verdict, reason) = health(&runs);
    Ok(pb::GetWorkflowMetricsResponse {
        workflow_id: workflow_id.to_string(),
        from: Some(wkt::timestamp(range.from)),
        to: Some(wkt::timestamp(range.to)),
        success_rate: success_rate(&runs),
        retries: count(steps.iter().map(|tally| tally.retries).sum()),
        timeouts: runs.timed_out,
        runs: Some(runs),
        duration: Some(duration_stats(&durations)),
        top_errors: error_counts(errors),
        health: verdict.into(),
        health_reason: reason,
    })
}

/// Database and Redis round trips, the queue, runners and the recent error rate.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_system_health(
    context: &AppContext,
    caller: &Caller,
    _request: pb::GetSystemHealthRequest,
) -> ServiceResult<pb::GetSystemHealthResponse> {
    caller.require_user_access(Access::Read)?;
    let mut components = Vec::with_capacity(context.probes.len());
    let mut status = pb::ComponentStatus::Up;
    for probe in &context.probes {
        let started = Instant::now();
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(3), probe.ping()).await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let (component_status, message) = match outcome {
            Ok(Ok(())) => (pb::ComponentStatus::Up, String::new()),
            Ok(Err(message)) => (pb::ComponentStatus::Down, message),
            Err(_) => (pb::ComponentStatus::Down, "no answer within 3s".to_owned()),
        };
        if component_status == pb::ComponentStatus::Down {
            status = if probe.critical() {
                pb::ComponentStatus::Down
            } else if status == pb::ComponentStatus::Up {
                pb::ComponentStatus::Degraded
            } else {
                status
            };
        }
        components.push(pb::ComponentHealth {
            name: probe.component().to_owned(),
            status: component_status.into(),
            backend: probe.backend().to_owned(),
            latency_ms,
            message,
        });
    }

    let scope = caller.owner_scope();
    let store = context.store.as_ref();
    let now = Utc::now();
    let depth = store.queue_depth(scope).await.map_err(store_error)?;
    let recent = HourRange::covering(now - Duration::hours(1), now);
    let recent_outcomes = store
        .execution_outcomes(RollupFilter::scope(scope), recent, DAY_SECONDS)
        .await
        .map_err(store_error)?;
    let recent_counts = outcome_counts(&recent_outcomes);
    let recent_failures = recent_counts.failed + recent_counts.timed_out;
    Ok(pb::GetSystemHealthResponse {
        status: status.into(),
        components,
        queue_depth: depth
            .iter()
            .map(|tally| pb::QueueDepth {
                priority: tally.priority,
                queued_steps: count(tally.queued_steps),
            })
            .collect(),
        oldest_queued_step_seconds: oldest_wait_seconds(&depth, now),
        runners: visible_runners(context, scope).await,
        recent_error_rate: if recent_counts.total == 0 {
            0.0
        } else {
            f64::from(recent_failures) / f64::from(recent_counts.total)
        },
        version: env!("CARGO_PKG_VERSION").to_owned(),
        mode: context.mode.as_str().to_owned(),
        uptime_seconds: context.started_at.elapsed().as_secs_f64(),
        replicas_alive: context
            .engine
            .replicas_alive()
            .await
            .map_or(0, |count| i32::try_from(count).unwrap_or(i32::MAX)),
    })
}

/// Usage per user and day over a range (whole days, UTC).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_usage_stats(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetUsageStatsRequest,
) -> ServiceResult<pb::GetUsageStatsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let range = range(&mut validator, request.from.as_ref(), request.to.as_ref());
    let scope = scope(&mut validator, caller, &request.scope)?;
    validator.finish()?;
    // This replica's latest counts first, so a caller sees their own calls at once.
    if let Err(error) = context.api_calls.flush(context.store.as_ref()).await {
        tracing::warn!(%error, "could not record api call counts before reading usage");
    }
    let from_day = range.from.timestamp().div_euclid(DAY_SECONDS) * DAY_SECONDS;
    let to_day = (range.to.timestamp() + DAY_SECONDS - 1).div_euclid(DAY_SECONDS) * DAY_SECONDS;
    let tallies = context.store.usage(scope, from_day, to_day).await.map_err(store_error)?;
    Ok(pb::GetUsageStatsResponse {
        days: tallies
            .into_iter()
            .map(|tally| pb::UsageDay {
                user_id: tally.user_id.to_string(),
                day: epoch_timestamp(tally.day_start),
                api_calls: tally.api_calls,
                executions_started: count(tally.executions_started),
                step_seconds: tally.step_seconds,
                prompt_tokens: tally.prompt_tokens,
                completion_tokens: tally.completion_tokens,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(succeeded: i32, failed: i32, timed_out: i32, cancelled: i32) -> pb::OutcomeCounts {
        pb::OutcomeCounts {
            total: succeeded + failed + timed_out + cancelled,
            succeeded,
            failed,
            cancelled,
            timed_out,
        }
    }

    #[test]
    fn the_health_rule_has_four_outcomes() {
        assert_eq!(health(&counts(0, 0, 0, 4)).0, pb::HealthVerdict::NoData);
        assert_eq!(health(&counts(95, 4, 0, 0)).0, pb::HealthVerdict::Healthy);
        assert_eq!(health(&counts(9, 1, 0, 0)).0, pb::HealthVerdict::Degraded);
        // Half failing but only two failures: degraded, not failing.
        assert_eq!(health(&counts(2, 1, 1, 0)).0, pb::HealthVerdict::Degraded);
        assert_eq!(health(&counts(3, 2, 1, 9)).0, pb::HealthVerdict::Failing);
    }

    #[test]
    fn percentiles_are_the_upper_edge_of_their_bucket() {
        let histogram = vec![
            DurationTally { duration_bucket: -1, count: 7, duration_seconds: 0.0 },
            DurationTally { duration_bucket: 10, count: 50, duration_seconds: 0.4 },
            DurationTally { duration_bucket: 20, count: 49, duration_seconds: 3.0 },
            DurationTally { duration_bucket: 30, count: 1, duration_seconds: 0.8 },
        ];
        let stats = duration_stats(&histogram);
        assert_eq!(stats.p50_seconds, store::duration_bucket_upper_seconds(10));
        assert_eq!(stats.p95_seconds, store::duration_bucket_upper_seconds(20));
        assert_eq!(stats.p99_seconds, store::duration_bucket_upper_seconds(20));
        assert!((stats.average_seconds - 0.042).abs() < 1e-9);
        assert_eq!(duration_stats(&[]), pb::DurationStats::default());
    }
}
