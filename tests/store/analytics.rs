//! Conformance: analytics rollups. The database keeps them as executions and step attempts
//! finish (triggers of migration 0008), and `AnalyticsStore` sums them over whole hours; both
//! backends must count, bucket and scope the same runs the same way.

use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use turbocat::store::{
    ApiCallCount, Completion, ExecutionStatus, ExecutionTrigger, HourRange, NewExecution,
    OwnerScope, RollupFilter, Store, WorkflowRankingOrder, duration_bucket_upper_seconds,
};

use crate::executions::{
    assign, complete, definition, failure, finish_execution, fixture, queue, run, seconds,
    start_execution,
};

/// A whole hour in the past: every run below finishes at a known offset from it.
fn base() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).single().expect("a time")
}

/// Sums `(status, count)` of outcome tallies for one bucket.
fn counts(tallies: &[turbocat::store::OutcomeTally], bucket_start: i64) -> Vec<(String, i64)> {
    tallies
        .iter()
        .filter(|tally| tally.bucket_start == bucket_start)
        .map(|tally| (tally.status.clone(), tally.count))
        .collect()
}

async fn rollups_follow_finished_runs(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let base = base();
    let hour = base.timestamp();
    let of = |workflow_id| NewExecution {
        workflow_id,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Manual, definition())
    };

    // A success of 10 s whose step ran 2 s.
    let (first, steps) =
        start_execution(&store, of(Some(fixture.workflow)), &["s"], 1, Some(fixture.agent)).await;
    let key = steps[0].attempt_key();
    queue(&store, key, base).await;
    assign(&store, key, "runner-1", base).await;
    run(&store, key, base).await;
    complete(&store, key, Completion::Succeeded { output: json!({}) }, base + seconds(2)).await;
    finish_execution(&store, first.id, ExecutionStatus::Succeeded, base, base + seconds(10)).await;

    // A failure of 5 s: its step failed once (retryable), was retried, and failed for good.
    let (second, steps) =
        start_execution(&store, of(Some(fixture.workflow)), &["s"], 2, Some(fixture.agent)).await;
    let key = steps[0].attempt_key();
    queue(&store, key, base).await;
    assign(&store, key, "runner-1", base).await;
    run(&store, key, base).await;
    complete(&store, key, failure(true), base + seconds(1)).await;
    let retried =
        store.schedule_retry(key, base + seconds(1), base + seconds(1)).await.expect("retry");
    let retried = match retried {
        turbocat::store::StepTransitionOutcome::Applied(step_run) => step_run,
        other => panic!("retry refused: {other:?}"),
    };
    let key = retried.attempt_key();
    queue(&store, key, base + seconds(2)).await;
    assign(&store, key, "runner-1", base + seconds(2)).await;
    run(&store, key, base + seconds(2)).await;
    complete(&store, key, failure(false), base + seconds(3)).await;
    finish_execution(&store, second.id, ExecutionStatus::Failed, base, base + seconds(5)).await;

    // A success of 100 s in the next hour, and another owner's success without a workflow.
    let (third, _) = start_execution(&store, of(Some(fixture.workflow)), &[], 1, None).await;
    let next_hour = base + seconds(3600);
    finish_execution(
        &store,
        third.id,
        ExecutionStatus::Succeeded,
        next_hour,
        next_hour + seconds(100),
    )
    .await;
    let theirs = NewExecution::new(fixture.other_owner, ExecutionTrigger::Manual, definition());
    let (theirs, _) = start_execution(&store, theirs, &[], 1, None).await;
    finish_execution(&store, theirs.id, ExecutionStatus::Succeeded, base, base + seconds(1)).await;

    let two_hours = HourRange { from_hour: hour, to_hour: hour + 7200 };
    let mine = RollupFilter::scope(OwnerScope::Owner(fixture.owner));
    let hourly = store.execution_outcomes(mine, two_hours, 3600).await.expect("outcomes");
    assert_eq!(counts(&hourly, hour), vec![("FAILED".into(), 1), ("SUCCEEDED".into(), 1)]);
    assert_eq!(counts(&hourly, hour + 3600), vec![("SUCCEEDED".into(), 1)]);
    let daily = store.execution_outcomes(mine, two_hours, 86_400).await.expect("outcomes");
    let day = hour - hour % 86_400;
    assert_eq!(counts(&daily, day), vec![("FAILED".into(), 1), ("SUCCEEDED".into(), 2)]);
    let first_hour = HourRange { from_hour: hour, to_hour: hour + 3600 };
    let everyone = store
        .execution_outcomes(RollupFilter::scope(OwnerScope::All), first_hour, 3600)
        .await
        .expect("outcomes");
    assert_eq!(counts(&everyone, hour), vec![("FAILED".into(), 1), ("SUCCEEDED".into(), 2)]);
    let earlier = HourRange { from_hour: hour - 7200, to_hour: hour };
    assert!(store.execution_outcomes(mine, earlier, 3600).await.expect("outcomes").is_empty());

    // Durations: 10 s, 5 s and 100 s, each in the bucket whose edges hold it.
    let workflow = RollupFilter { workflow_id: Some(fixture.workflow), ..RollupFilter::default() };
    let histogram = store.execution_durations(workflow, two_hours).await.expect("durations");
    assert_eq!(histogram.iter().map(|tally| tally.count).sum::<i64>(), 3);
    let total: f64 = histogram.iter().map(|tally| tally.duration_seconds).sum();
    assert!((total - 115.0).abs() < 0.01, "{histogram:?}");
    for tally in &histogram {
        let upper = duration_bucket_upper_seconds(tally.duration_bucket);
        let lower = duration_bucket_upper_seconds(tally.duration_bucket - 1);
        let seconds = tally.duration_seconds / tally.count as f64;
        assert!(lower < seconds && seconds <= upper, "{seconds} in ({lower}, {upper}]");
    }

    // Step attempts of the agent: one success, two failures, one of them a retry.
    let agent = RollupFilter { agent_id: Some(fixture.agent), ..RollupFilter::default() };
    let steps = store.step_outcomes(agent, two_hours, 86_400).await.expect("step outcomes");
    assert_eq!(counts(&steps, day), vec![("FAILED".into(), 2), ("SUCCEEDED".into(), 1)]);
    assert_eq!(steps.iter().map(|tally| tally.retries).sum::<i64>(), 1);
    let step_histogram = store.step_durations(agent, two_hours).await.expect("step durations");
    let step_seconds: f64 = step_histogram.iter().map(|tally| tally.duration_seconds).sum();
    assert!((step_seconds - 4.0).abs() < 0.01, "2 + 1 + 1 seconds: {step_histogram:?}");

    let agent_errors = store.top_errors(fixture.agent, two_hours, 10).await.expect("errors");
    assert_eq!(agent_errors.len(), 1);
    assert_eq!((agent_errors[0].message.as_str(), agent_errors[0].occurrences), ("boom", 2));
    let workflow_errors = store.top_errors(fixture.workflow, two_hours, 10).await.expect("errors");
    assert_eq!(workflow_errors.len(), 1, "{workflow_errors:?}");
    assert_eq!(workflow_errors[0].occurrences, 1);

    let ranked = store
        .rank_workflows(
            OwnerScope::Owner(fixture.owner),
            two_hours,
            WorkflowRankingOrder::MostFailures,
            5,
        )
        .await
        .expect("ranking");
    assert_eq!(ranked.len(), 1);
    assert_eq!(
        (ranked[0].workflow_id, ranked[0].executions, ranked[0].failed),
        (fixture.workflow, 3, 1)
    );
    assert!(ranked[0].name.is_some());

    // Usage: executions count on the day they were created (now); API calls add up.
    let today = Utc::now().timestamp() - Utc::now().timestamp() % 86_400;
    let call = ApiCallCount { user_id: fixture.owner, day_start: today, calls: 3 };
    store.add_api_calls(&[call]).await.expect("calls");
    store.add_api_calls(&[ApiCallCount { calls: 4, ..call }]).await.expect("calls");
    let usage =
        store.usage(OwnerScope::Owner(fixture.owner), today, today + 86_400).await.expect("usage");
    assert_eq!(usage.len(), 1, "{usage:?}");
    assert_eq!((usage[0].executions_started, usage[0].api_calls), (3, 7));
    let all_usage = store.usage(OwnerScope::All, today, today + 86_400).await.expect("usage");
    assert_eq!(all_usage.len(), 2, "{all_usage:?}");
    let step_day =
        store.usage(OwnerScope::Owner(fixture.owner), day, day + 86_400).await.expect("usage");
    assert!((step_day[0].step_seconds - 4.0).abs() < 0.01, "{step_day:?}");

    // Live counts: one agent, one workflow; a queued step shows in the queue depth.
    let (waiting, steps) =
        start_execution(&store, of(Some(fixture.workflow)), &["w"], 1, Some(fixture.agent)).await;
    queue(&store, steps[0].attempt_key(), base).await;
    let resources = store.resource_counts(OwnerScope::Owner(fixture.owner)).await.expect("counts");
    assert_eq!((resources.agents, resources.workflows, resources.queued_executions), (1, 1, 1));
    let depth = store.queue_depth(OwnerScope::Owner(fixture.owner)).await.expect("depth");
    assert_eq!(depth.len(), 1);
    assert_eq!((depth[0].priority, depth[0].queued_steps), (waiting.priority, 1));
    assert_eq!(depth[0].oldest_queued_at, Some(base));
    let theirs = store.queue_depth(OwnerScope::Owner(fixture.other_owner)).await.expect("depth");
    assert!(theirs.is_empty());
}

#[test]
fn hour_ranges_cover_their_times() {
    let range = HourRange::covering(base() + seconds(59), base() + seconds(3601));
    assert_eq!((range.from_hour, range.to_hour), (base().timestamp(), base().timestamp() + 7200));
    let exact = HourRange::covering(base(), base() + seconds(3600));
    assert_eq!(exact.to_hour - exact.from_hour, 3600);
}

crate::conformance!(rollups_follow_finished_runs);
