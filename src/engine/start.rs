//! Starting an execution in the commit that creates it. A top-level execution is created
//! RUNNING with its first steps (those that wait for nothing) already moved on: ASSIGNED to a
//! runner attached here with a free slot for them (held before the commit), or else QUEUED;
//! after the commit the assignments go out and the QUEUED steps enter the ready queue. That is
//! one commit before a first step reaches its runner, where creating the execution QUEUED,
//! marking it RUNNING and handing its first step off took three.
//!
//! What cannot be decided before the commit takes the usual way (created QUEUED, then
//! `advance_created`): an execution already past its deadline, a definition that does not
//! decode or lacks a step, a first step that runs a sub-workflow, an input mapping that cannot
//! be resolved (the usual way fails the execution with its error), and a child execution
//! (which `subworkflow` creates apart, with its parent step; never through here).
//!
//! Nobody can watch an execution before its creation is answered (its id is new), so the
//! transitions the creation stands for are not published; a watch starts from a snapshot.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::Engine;
use super::attached_runners::AttachedRunner;
use super::definition::{ExecutionDefinition, FixedFacts};
use super::dispatcher::PreparedAssignment;
use super::scheduler::step_scope;
use crate::queue::QueueItem;
use crate::store::{
    AttemptKey, Execution, NewExecution, NewStepRun, StepRun, StepStart, StoreError,
};

/// A first step moved on in its execution's creation commit.
struct FirstStep {
    key: AttemptKey,
    item: QueueItem,
    /// The runner whose slot is held for it, and its assignment; `None`: it is QUEUED.
    runner: Option<(Arc<AttachedRunner>, PreparedAssignment)>,
}

/// What `plan_start` decided for an execution about to be created.
struct StartPlan {
    definition: Arc<ExecutionDefinition>,
    first_steps: Vec<FirstStep>,
}

impl Engine {
    /// Creates an execution with its step runs (see `ExecutionStore::create_execution`) and
    /// starts it: in the same commit when it can (see the module comment), or else right after
    /// it. A failure to start is logged: the reconciler starts the execution later. The error
    /// is the creation's.
    #[tracing::instrument(level = "debug", skip_all, fields(execution_id = %new_execution.id))]
    pub async fn create_execution(
        self: &Arc<Self>,
        mut new_execution: NewExecution,
        mut step_runs: Vec<NewStepRun>,
    ) -> Result<(Execution, Vec<StepRun>), StoreError> {
        let plan = self.plan_start(&mut new_execution, &mut step_runs, Utc::now());
        let (execution, rows) = match self.store.create_execution(new_execution, step_runs).await {
            Ok(created) => created,
            Err(error) => {
                if let Some(plan) = &plan {
                    self.release_first_steps(&plan.first_steps);
                }
                return Err(error);
            }
        };
        let started = match plan {
            Some(plan) => self.started(&execution, &rows, plan).await,
            None => self.advance_created(&execution, &rows).await,
        };
        if let Err(error) = started {
            tracing::warn!(%error, execution_id = %execution.id, "could not start the execution yet");
        }
        Ok((execution, rows))
    }

    /// Decides how the first steps of `new_execution` start in its creation commit, holding a
    /// runner's slot for each that one here can take, and marks the execution and those steps
    /// accordingly; `None` (nothing marked, nothing held) when the usual way must start it.
    fn plan_start(
        &self,
        new_execution: &mut NewExecution,
        step_runs: &mut [NewStepRun],
        now: DateTime<Utc>,
    ) -> Option<StartPlan> {
        let in_time = new_execution.deadline_at.is_none_or(|deadline| deadline > now);
        if new_execution.parent.is_some() || !in_time {
            return None;
        }
        let definition = Arc::new(ExecutionDefinition::parse(&new_execution.definition).ok()?);
        let facts = FixedFacts {
            deadline_at: new_execution.deadline_at,
            depth: 0,
            owner_id: new_execution.owner_id,
            priority: new_execution.priority,
            workflow_id: new_execution.workflow_id,
            deployment_id: new_execution.deployment_id,
        };
        let scope = step_scope(&new_execution.input, &Default::default());
        let mut first_steps: Vec<FirstStep> = Vec::new();
        let mut inputs: Vec<(usize, Value)> = Vec::new();
        for (index, step_run) in step_runs.iter().enumerate() {
            let Some(step) = definition.step(&step_run.step_key) else {
                self.release_first_steps(&first_steps);
                return None;
            };
            if !step.depends_on.is_empty() {
                continue;
            }
            let key = AttemptKey { step_run_id: step_run.id, attempt: 1 };
            let item = self.queue_item(
                new_execution.id,
                &facts,
                &definition,
                (key, &step_run.step_key),
                now,
            );
            let input = self.resolve_input(step, &new_execution.input, &scope).ok();
            // A sub-workflow (no queue item) or an input that cannot be resolved.
            let (Some(item), Some(input)) = (item, input) else {
                self.release_first_steps(&first_steps);
                return None;
            };
            let runner = self.hold_slot(&item, key, now).and_then(|runner| {
                let prepared = self.prepare_assignment(
                    &runner,
                    key,
                    &definition,
                    &facts,
                    &step_run.step_key,
                    now,
                );
                match prepared {
                    Some(prepared) => Some((runner, prepared)),
                    None => {
                        self.release_slot(&runner, key);
                        None
                    }
                }
            });
            inputs.push((index, input));
            first_steps.push(FirstStep { key, item, runner });
        }
        if first_steps.is_empty() {
            return None;
        }
        for ((index, input), first) in inputs.into_iter().zip(&first_steps) {
            let assignment = first.runner.as_ref().map(|(_, prepared)| &prepared.assignment);
            step_runs[index].start = Some(StepStart {
                input: Some(input),
                runner_id: assignment.map(|assignment| assignment.runner_id.clone()),
                lease_expires_at: assignment.map(|assignment| assignment.lease_expires_at),
            });
        }
        new_execution.running = true;
        Some(StartPlan { definition, first_steps })
    }

    fn release_first_steps(&self, first_steps: &[FirstStep]) {
        for first in first_steps {
            if let Some((runner, _)) = &first.runner {
                self.release_slot(runner, first.key);
            }
        }
    }

    /// After the commit that created `execution` (with its step `rows`) as `plan` says: keeps
    /// its definition and the rows of the steps that wait, sends the assignments, and queues
    /// the first steps no runner here took.
    async fn started(
        self: &Arc<Self>,
        execution: &Execution,
        rows: &[StepRun],
        plan: StartPlan,
    ) -> super::EngineResult<()> {
        self.definitions.keep(execution, plan.definition);
        self.definitions.remember_waiting(execution.id, rows);
        let mut queued = Vec::new();
        for first in plan.first_steps {
            let Some(row) = rows.iter().find(|row| row.attempt_key() == first.key) else {
                // Not created as planned (cannot happen: the creation is all or nothing).
                self.release_first_steps(std::slice::from_ref(&first));
                continue;
            };
            match first.runner {
                Some((runner, prepared)) => {
                    self.send_assignment(&runner, execution.id, row.clone(), prepared).await;
                }
                None => queued.push(QueueItem {
                    enqueued_at: row.queued_at.unwrap_or(first.item.enqueued_at),
                    ..first.item
                }),
            }
        }
        self.enqueue_items(queued).await?;
        Ok(())
    }
}
