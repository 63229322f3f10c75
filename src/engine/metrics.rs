//! The engine's series for operators, recorded through the `metrics` facade (`/metrics` serves
//! them): executions finished by status, and each step attempt's wait for a runner (queued ->
//! assigned) and run time (started -> finished) by agent type. One call from each place where
//! the thing measured is committed; nothing here touches the database.

use std::sync::Arc;

use super::Engine;
use super::scheduler::agent_type_name;
use crate::proto::v1 as pb;
use crate::store::{ExecutionStatus, StepRun};

fn seconds_between(
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<f64> {
    let (from, to) = (from?, to?);
    Some((to - from).num_microseconds()?.max(0) as f64 / 1_000_000.0)
}

/// An execution reached `status`.
pub(super) fn execution_finished(status: ExecutionStatus) {
    metrics::counter!("turbocat_executions_finished_total", "status" => status.as_str())
        .increment(1);
}

/// An attempt of a step of `agent` was assigned to a runner.
pub(super) fn step_assigned(step_run: &StepRun, agent: &pb::Agent) {
    if let Some(wait) = seconds_between(step_run.queued_at, step_run.assigned_at) {
        metrics::histogram!("turbocat_step_wait_seconds", "agent_type" => agent_type_name(agent.r#type()))
            .record(wait);
    }
}

impl Engine {
    /// An attempt finished: its run time, by the agent type of the definition this process
    /// keeps for the execution (`UNKNOWN` when it keeps none).
    pub(super) fn step_finished(self: &Arc<Self>, step_run: &StepRun) {
        let Some(run) = seconds_between(step_run.started_at, step_run.finished_at) else { return };
        let agent_type = self
            .definitions
            .known(step_run.execution_id)
            .and_then(|(definition, _)| {
                let step = definition.step(&step_run.step_key)?;
                definition.agent_of(step).map(|agent| agent_type_name(agent.r#type()))
            })
            .unwrap_or("UNKNOWN");
        metrics::histogram!("turbocat_step_run_seconds", "agent_type" => agent_type).record(run);
    }
}
