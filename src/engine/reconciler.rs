//! Repairing, from the database, what the queue or a crash lost. Every pass: claims of a
//! dispatcher that died go back to the queue; QUEUED steps missing from the queue (Redis
//! flushed or restarted, a crash between commit and enqueue) are enqueued again; retries whose
//! backoff ended are queued; attempts whose runner stopped renewing its lease are taken back
//! (as the next attempt, counted as an infrastructure reassignment, capped) or timed out when
//! they ran past their deadline; executions past their deadline time out; and unfinished
//! executions are advanced, so a crash between a step's result and the next step is repaired.
//! A WORKFLOW step the engine itself holds is never taken back: its expired lease means its
//! child execution is still to be started (`subworkflow::resume_sub_workflow`).

use std::collections::HashSet;
use std::sync::Arc;

use chrono::Utc;
use uuid::Uuid;

use super::{Engine, EngineResult};
use crate::store::{
    AttemptKey, Completion, ExecutionFilter, ExecutionStatus, OwnerScope, StepRunStatus,
    StepTransitionOutcome,
};

/// Rows one pass looks at, per kind.
const BATCH: u32 = 500;
/// How long after a step was queued the reconciler leaves it to the replica that queued it.
const RECENTLY_QUEUED: chrono::TimeDelta = chrono::TimeDelta::seconds(2);
/// Every how many passes the unfinished executions are all advanced (with the default 2 s
/// interval: every 30 s, and on the first pass after a start).
const SWEEP_EVERY_PASSES: u64 = 15;

/// What one reconciler pass did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    pub requeued_claims: usize,
    pub reenqueued: usize,
    pub leases_taken_back: usize,
    pub advanced: usize,
}

impl Engine {
    pub(super) async fn run_reconciler(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.settings.reconcile_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pass: u64 = 0;
        let mut outage = crate::outage::Outage::new("reconciling");
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = self.stopping.cancelled() => return,
            }
            // After an outage the next pass sweeps every unfinished execution: whatever failed
            // to move on while the database was away moves on now.
            let sweep = pass.is_multiple_of(SWEEP_EVERY_PASSES) || outage.is_failing();
            pass = pass.wrapping_add(1);
            match self.reconcile_once(sweep).await {
                Ok(report) => {
                    outage.succeeded();
                    if report != ReconcileReport::default() {
                        tracing::debug!(?report, "reconciled");
                    }
                }
                Err(error) => {
                    let pause = outage.failed(&error);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.stopping.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One pass; see the module comment. `sweep` also advances every unfinished execution
    /// (the repair of a crash between a result and the next step), which reads every one of
    /// them, so the loop does it only every `SWEEP_EVERY_PASSES` passes.
    pub async fn reconcile_once(self: &Arc<Self>, sweep: bool) -> EngineResult<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let now = Utc::now();
        report.requeued_claims = self.queue.requeue_expired(now).await?.len();

        let mut to_advance: HashSet<Uuid> = HashSet::new();
        let mut queued = Vec::new();
        for ready in self.store.list_ready_step_runs(now, BATCH).await? {
            let step_run = ready.step_run;
            match step_run.status {
                // Queued a moment ago: the replica that queued it is still on its way to the
                // queue or to a runner of its own (offering it now would race the assignment
                // and leave a duplicate).
                StepRunStatus::Queued
                    if step_run.queued_at.is_some_and(|at| now - at < RECENTLY_QUEUED) => {}
                StepRunStatus::Queued => queued.push(step_run),
                _ => {
                    to_advance.insert(step_run.execution_id);
                }
            }
        }
        // Which of them the queue holds, asked in one round trip however long the backlog.
        let keys: Vec<crate::queue::QueueKey> = queued
            .iter()
            .map(|step_run| crate::queue::QueueKey::new(step_run.id, step_run.attempt))
            .collect();
        let held = self.queue.contains_many(&keys).await?;
        for (step_run, held) in queued.iter().zip(held) {
            if held {
                continue;
            }
            let execution =
                self.store.get_execution(OwnerScope::All, step_run.execution_id).await?;
            match self.definition(&execution) {
                Ok(definition) => {
                    self.enqueue(&execution, &definition, step_run).await?;
                    report.reenqueued += 1;
                }
                Err(_) => {
                    to_advance.insert(execution.id);
                }
            }
        }

        for step_run in self.store.list_expired_leases(now, BATCH).await? {
            let key = step_run.attempt_key();
            if self.leases.expires_at(key).await.is_some_and(|until| until > now) {
                continue;
            }
            self.lease_lost(key).await?;
            report.leases_taken_back += 1;
        }

        for execution in self.store.list_running_executions_past_deadline(now, BATCH).await? {
            to_advance.insert(execution.id);
        }
        if sweep {
            let mut filter = ExecutionFilter::new(OwnerScope::All);
            for status in [ExecutionStatus::Queued, ExecutionStatus::Running] {
                filter.status = Some(status);
                let page =
                    self.store.list_executions_by_cursor(filter.clone(), None, BATCH).await?;
                to_advance.extend(page.items.iter().map(|execution| execution.id));
            }
        }
        for execution_id in to_advance {
            self.advance(execution_id).await?;
            report.advanced += 1;
        }
        Ok(report)
    }

    /// The runner holding `key` stopped renewing its lease (or never acknowledged it): time
    /// the attempt out when it ran past its deadline, otherwise run it again as the next
    /// attempt, unless the step was taken back too often already.
    pub(super) async fn lease_lost(self: &Arc<Self>, key: AttemptKey) -> EngineResult<()> {
        let step_run = self.store.get_step_run(key.step_run_id).await?;
        if step_run.attempt != key.attempt
            || !matches!(step_run.status, StepRunStatus::Assigned | StepRunStatus::Running)
        {
            return Ok(());
        }
        if super::subworkflow::held_by_engine(&step_run) {
            return self.resume_sub_workflow(&step_run).await;
        }
        let execution = self.store.get_execution(OwnerScope::All, step_run.execution_id).await?;
        let timeout = self.definition(&execution).ok().and_then(|definition| {
            definition.step(&step_run.step_key).map(|step| definition.step_timeout(step))
        });
        let ran_past_deadline = match (step_run.assigned_at, timeout) {
            (Some(assigned_at), Some(timeout)) => {
                let deadline = assigned_at
                    + chrono::Duration::from_std(timeout + super::dispatcher::DEADLINE_GRACE)
                        .unwrap_or_else(|_| chrono::Duration::seconds(300));
                deadline <= Utc::now()
            }
            _ => false,
        };
        if let Some(runner_id) = &step_run.runner_id {
            let held = crate::store::InFlightStepRun {
                step_run_id: key.step_run_id,
                attempt: key.attempt,
                runner_id: runner_id.clone(),
            };
            self.send_cancel(&held, "the server took this attempt back").await;
        }
        if ran_past_deadline {
            self.complete_attempt(key, Completion::TimedOut).await?;
            return Ok(());
        }
        if step_run.infra_reassignments >= self.settings.max_infrastructure_reassignments {
            let error = format!(
                "the step's runner was lost {} times (the limit); giving up",
                step_run.infra_reassignments + 1
            );
            self.complete_attempt(key, Completion::Failed { error, retryable: false }).await?;
            return Ok(());
        }
        self.take_back(key).await
    }

    /// Runs the attempt again as the next attempt (an infrastructure reassignment).
    pub(super) async fn take_back(self: &Arc<Self>, key: AttemptKey) -> EngineResult<()> {
        self.leases.forget(key).await;
        let StepTransitionOutcome::Applied(requeued) =
            self.store.requeue_after_lease_loss(key, Utc::now()).await?
        else {
            return Ok(());
        };
        self.publish_step(&requeued).await;
        self.log_system(
            &requeued,
            format!(
                "attempt {} lost its runner; running it again as attempt {}",
                key.attempt, requeued.attempt
            ),
        )
        .await;
        let execution = self.store.get_execution(OwnerScope::All, requeued.execution_id).await?;
        if let Ok(definition) = self.definition(&execution) {
            self.enqueue(&execution, &definition, &requeued).await?;
        }
        Ok(())
    }
}
