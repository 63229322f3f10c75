//! Sub-workflow steps: a step whose agent is a WORKFLOW agent runs another workflow as a child
//! execution. The server runs these steps itself; they never reach the queue or a runner.
//!
//! The life of attempt `n` of such a step:
//! 1. `enqueue`, the one door to the ready queue, hands a QUEUED WORKFLOW step to
//!    `start_sub_workflow`: the step goes QUEUED -> ASSIGNED to the runner id `engine` with an
//!    ordinary lease (a fenced compare-and-set: one replica wins).
//! 2. `launch_child` refuses a child deeper than `--max-workflow-depth` (so a workflow that
//!    calls itself, directly or not, stops there), asks the installed `ChildWorkflows` for the
//!    child's rows (the workflow as it is now, its snapshot, owner = the parent's, priority =
//!    the parent's, a deadline no later than the parent's) and has the store move the step
//!    ASSIGNED -> RUNNING (clearing the lease) and create the child in one transaction
//!    (`Store::start_child_execution`). An attempt therefore has exactly one child, however
//!    many replicas try. The child records the attempt (`executions.parent_attempt`).
//!    A refusal (too deep, a missing workflow or agent, no valid DAG) fails the attempt
//!    without retry; a store that is unavailable leaves the step ASSIGNED for the repair below.
//! 3. When the child reaches a final status (`advance`, `finish_early`), `report_to_parent`
//!    completes the parent's attempt with the child's output, or fails it naming the child and
//!    its error: retryably for a FAILED or TIMED_OUT child (a retry starts a new child), not
//!    for a CANCELLED one. It is fenced on (step run, attempt), so repeats change nothing.
//! 4. When the parent finishes early (cancelled, timed out, failed), `stop_children` cancels
//!    its unfinished children, and theirs, through the same `finish_early`.
//!
//! Repairs, for a crash at any point: a QUEUED step is offered to `enqueue` again by the
//! reconciler; an ASSIGNED one without a child keeps its lease, which runs out, and the
//! reconciler's expired-lease sweep calls `resume_sub_workflow` (never a runner take-back);
//! a RUNNING one has no lease, and `advance` of the parent collects the result of a child that
//! finished without reporting; a child whose parent step no longer waits for it (the parent
//! finished before it could stop the child) cancels itself when it is advanced.
//!
//! Why a trait: building an execution's snapshot (agent and workflow rows to proto messages)
//! belongs to the service layer, which the engine must not call. The service layer implements
//! `ChildWorkflows` and the server installs it on the engine at start-up
//! (`Engine::install_child_workflows`); the engine keeps every state transition to itself.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::definition::ExecutionDefinition;
use super::{Engine, EngineResult};
use crate::proto::v1 as pb;
use crate::store::{
    AttemptKey, ChildExecutionStart, Completion, Execution, ExecutionFilter, ExecutionStatus,
    NewExecution, NewStepRun, OwnerScope, ParentStep, StepAssignment, StepRun, StepRunStatus,
    StepTransitionOutcome, StoreError,
};

/// The runner id of the step runs the engine itself holds (WORKFLOW steps). Runner ids are
/// UUIDs, so no runner can ever be mistaken for it.
pub const ENGINE_RUNNER_ID: &str = "engine";

/// Children read per page when looking for an execution's children.
const CHILDREN_PAGE: u32 = 100;

/// What the engine needs to build a child execution.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRequest {
    /// The parent's owner, who owns the child too; the workflow must be theirs.
    pub owner_id: Uuid,
    pub workflow_id: Uuid,
    /// The step's resolved input; `null` means the workflow's default input.
    pub input: Value,
    pub parent: ParentStep,
    /// The parent's priority.
    pub priority: i32,
    /// The latest deadline the child may have (the parent's, or the step's timeout if sooner);
    /// the workflow's own timeout may make it earlier.
    pub deadline_at: Option<DateTime<Utc>>,
}

/// The rows of a child execution, built but not stored.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildPlan {
    /// A `SubWorkflow` execution with `parent` set.
    pub execution: NewExecution,
    pub step_runs: Vec<NewStepRun>,
}

/// Why no child could be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildPlanError {
    /// The child can never start (the workflow is missing or cannot run): the text says why,
    /// and the step fails without retry.
    Refused(String),
    /// Something was unavailable (the database); the engine tries again later.
    Unavailable(String),
}

/// Builds child executions for the engine; implemented by the service layer (see the module
/// comment).
#[async_trait]
pub trait ChildWorkflows: Send + Sync {
    async fn plan_child(&self, request: ChildRequest) -> Result<ChildPlan, ChildPlanError>;
}

/// Whether `step` runs a WORKFLOW agent (the engine runs it, not a runner).
pub fn is_sub_workflow(definition: &ExecutionDefinition, step: &pb::WorkflowStep) -> bool {
    definition.agent_of(step).is_some_and(|agent| agent.r#type == pb::AgentType::Workflow as i32)
}

/// Whether the engine itself holds this step run (a running WORKFLOW step).
pub fn held_by_engine(step_run: &StepRun) -> bool {
    step_run.runner_id.as_deref() == Some(ENGINE_RUNNER_ID)
}

/// The parent attempt a child execution reports to.
fn parent_key(child: &Execution) -> Option<AttemptKey> {
    Some(AttemptKey { step_run_id: child.parent_step_run_id?, attempt: child.parent_attempt? })
}

/// A step's own wall-clock limit (the step's `timeout`, else its agent's), when one is set.
/// The default step timeout does not apply: a workflow is not one process.
fn explicit_timeout(definition: &ExecutionDefinition, step: &pb::WorkflowStep) -> Option<Duration> {
    let positive = |duration: &prost_types::Duration| {
        Duration::try_from(*duration).ok().filter(|duration| !duration.is_zero())
    };
    step.timeout.as_ref().and_then(positive).or_else(|| {
        definition
            .agent_of(step)
            .and_then(|agent| agent.limits.as_ref())
            .and_then(|limits| limits.timeout.as_ref())
            .and_then(positive)
    })
}

impl Engine {
    /// Installs the builder of child executions; the first one installed stays.
    pub fn install_child_workflows(&self, child_workflows: Arc<dyn ChildWorkflows>) {
        if self.child_workflows.set(child_workflows).is_err() {
            tracing::warn!("a builder of child executions was installed already; keeping it");
        }
    }

    /// Runs a QUEUED WORKFLOW step: takes it for the engine and starts its child.
    pub(super) async fn start_sub_workflow(
        self: &Arc<Self>,
        execution: &Execution,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
    ) -> EngineResult<()> {
        let now = Utc::now();
        let lease = chrono::Duration::from_std(self.settings.lease_duration)
            .unwrap_or_else(|_| chrono::Duration::seconds(30));
        let assignment = StepAssignment {
            runner_id: ENGINE_RUNNER_ID.to_owned(),
            lease_expires_at: now + lease,
            assigned_at: now,
        };
        let StepTransitionOutcome::Applied(assigned) =
            self.store.assign_step(step_run.attempt_key(), assignment).await?
        else {
            return Ok(());
        };
        self.publish_step(&assigned).await;
        self.launch_child(execution, definition, &assigned).await
    }

    /// An engine-held step's lease ran out (see the module comment): start the child an
    /// ASSIGNED attempt is still missing. A RUNNING one has its child already.
    pub(super) async fn resume_sub_workflow(
        self: &Arc<Self>,
        step_run: &StepRun,
    ) -> EngineResult<()> {
        if step_run.status != StepRunStatus::Assigned {
            return Ok(());
        }
        let execution = self.store.get_execution(OwnerScope::All, step_run.execution_id).await?;
        if execution.status.is_finished() || execution.cancel_requested_at.is_some() {
            return self.advance(execution.id).await;
        }
        match self.definition(&execution) {
            Ok(definition) => self.launch_child(&execution, &definition, step_run).await,
            Err(_) => self.advance(execution.id).await,
        }
    }

    /// Starts the child execution of an ASSIGNED engine-held attempt, or fails the attempt
    /// when the child can never start.
    async fn launch_child(
        self: &Arc<Self>,
        execution: &Execution,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
    ) -> EngineResult<()> {
        let key = step_run.attempt_key();
        let refused = |error: String| Completion::Failed {
            error: format!("step {}: {error}", step_run.step_key),
            retryable: false,
        };
        let request = match self.child_request(execution, definition, step_run) {
            Ok(request) => request,
            Err(error) => {
                self.complete_attempt(key, refused(error)).await?;
                return Ok(());
            }
        };
        let workflow_id = request.workflow_id;
        let Some(child_workflows) = self.child_workflows.get() else {
            let error = "this server cannot start sub-workflows".to_owned();
            self.complete_attempt(key, refused(error)).await?;
            return Ok(());
        };
        let plan = match child_workflows.plan_child(request).await {
            Ok(plan) => plan,
            Err(ChildPlanError::Refused(error)) => {
                self.complete_attempt(key, refused(error)).await?;
                return Ok(());
            }
            Err(ChildPlanError::Unavailable(error)) => {
                tracing::warn!(%error, step_run_id = %key.step_run_id, "cannot start a child execution yet; the reconciler will retry");
                return Ok(());
            }
        };
        let child = plan.execution;
        let started =
            match self.store.start_child_execution(key, child, plan.step_runs, Utc::now()).await {
                Ok(started) => started,
                // The parent execution or its step is gone (a hard delete): nothing to run.
                Err(StoreError::ReferenceViolated(_) | StoreError::NotFound) => return Ok(()),
                Err(error) => return Err(error.into()),
            };
        let ChildExecutionStart::Started { parent_step, child } = started else { return Ok(()) };
        self.publish_step(&parent_step).await;
        self.log_system(
            &parent_step,
            format!("started child execution {} of workflow {workflow_id}", child.id),
        )
        .await;
        if let Err(error) = Box::pin(self.advance(child.id)).await {
            tracing::warn!(%error, child_id = %child.id, "could not start the child execution yet; the reconciler will");
        }
        Ok(())
    }

    /// What to ask `ChildWorkflows` for, or why no child may start.
    fn child_request(
        &self,
        execution: &Execution,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
    ) -> Result<ChildRequest, String> {
        let step = definition
            .step(&step_run.step_key)
            .ok_or_else(|| "the step is missing from the definition".to_owned())?;
        let workflow_id = definition
            .agent_of(step)
            .and_then(|agent| agent.config.as_ref())
            .and_then(|config| match &config.kind {
                Some(pb::agent_config::Kind::Workflow(workflow)) => {
                    Uuid::parse_str(workflow.workflow_id.trim()).ok()
                }
                _ => None,
            })
            .ok_or_else(|| "its WORKFLOW agent names no valid workflow id".to_owned())?;
        let depth = execution.depth + 1;
        let limit = self.settings.max_workflow_depth;
        if depth > limit {
            return Err(format!(
                "workflow {workflow_id} would run at nesting depth {depth}, beyond the maximum \
                 workflow depth of {limit} (--max-workflow-depth)"
            ));
        }
        let step_deadline = explicit_timeout(definition, step)
            .and_then(|timeout| chrono::Duration::from_std(timeout).ok())
            .map(|timeout| Utc::now() + timeout);
        let deadline_at = match (execution.deadline_at, step_deadline) {
            (Some(parent), Some(step)) => Some(parent.min(step)),
            (parent, step) => parent.or(step),
        };
        Ok(ChildRequest {
            owner_id: execution.owner_id,
            workflow_id,
            input: step_run.input.clone().unwrap_or(Value::Null),
            parent: ParentStep {
                execution_id: execution.id,
                step_run_id: step_run.id,
                attempt: step_run.attempt,
            },
            priority: execution.priority,
            deadline_at,
        })
    }

    /// A finished execution that has a parent step reports to it (see `report_to_parent`).
    /// Failures are logged: the parent's `advance` collects the result later.
    pub(super) async fn child_execution_finished(self: &Arc<Self>, child_id: Uuid) {
        let reported = match self.store.get_execution(OwnerScope::All, child_id).await {
            Ok(child) => Box::pin(self.report_to_parent(&child)).await,
            Err(error) => Err(error.into()),
        };
        if let Err(error) = reported {
            tracing::warn!(%error, %child_id, "could not report a child execution's end to its parent yet");
        }
    }

    /// Completes the parent step's attempt of a finished child: with its output, or failed
    /// naming the child and its error. Fenced on (step run, attempt): repeats change nothing.
    async fn report_to_parent(self: &Arc<Self>, child: &Execution) -> EngineResult<()> {
        if !child.status.is_finished() {
            return Ok(());
        }
        let Some(key) = parent_key(child) else { return Ok(()) };
        let error = child.error.as_deref().filter(|text| !text.is_empty()).unwrap_or("no error");
        let completion = match child.status {
            ExecutionStatus::Succeeded => {
                let output = child.output.clone().unwrap_or(Value::Null);
                let size = output.to_string().len();
                if size > self.settings.max_payload_bytes {
                    Completion::Failed {
                        error: format!(
                            "child execution {}: its output is {size} bytes, larger than the \
                             limit of {} bytes",
                            child.id, self.settings.max_payload_bytes
                        ),
                        retryable: false,
                    }
                } else {
                    Completion::Succeeded { output }
                }
            }
            ExecutionStatus::TimedOut => Completion::Failed {
                error: format!("child execution {} timed out: {error}", child.id),
                retryable: true,
            },
            ExecutionStatus::Cancelled => Completion::Failed {
                error: format!("child execution {} was cancelled: {error}", child.id),
                retryable: false,
            },
            _ => Completion::Failed {
                error: format!("child execution {} failed: {error}", child.id),
                retryable: true,
            },
        };
        self.complete_attempt(key, completion).await?;
        Ok(())
    }

    /// Part of `advance` of a parent: a RUNNING engine-held step whose child finished without
    /// reporting (a crash between the two) gets its result. `true` when one was collected
    /// (the execution was advanced again meanwhile).
    pub(super) async fn collect_finished_children(
        self: &Arc<Self>,
        execution: &Execution,
        steps: &[StepRun],
    ) -> EngineResult<bool> {
        let waiting: Vec<AttemptKey> = steps
            .iter()
            .filter(|step| step.status == StepRunStatus::Running && held_by_engine(step))
            .map(StepRun::attempt_key)
            .collect();
        if waiting.is_empty() {
            return Ok(false);
        }
        let mut collected = false;
        for child in self.children_of(execution.id).await? {
            let finished_for_waiting_step = child.status.is_finished()
                && parent_key(&child).is_some_and(|key| waiting.contains(&key));
            if finished_for_waiting_step {
                Box::pin(self.report_to_parent(&child)).await?;
                collected = true;
            }
        }
        Ok(collected)
    }

    /// Part of `advance` of a child: whether its parent step still waits for it. `false` when
    /// the parent step finished or moved to another attempt (the parent stopped before it could
    /// cancel this child); the child then cancels itself.
    pub(super) async fn parent_still_waits(&self, child: &Execution) -> EngineResult<bool> {
        let Some(key) = parent_key(child) else { return Ok(true) };
        match self.store.get_step_run(key.step_run_id).await {
            Ok(step_run) => {
                Ok(step_run.attempt == key.attempt && step_run.status == StepRunStatus::Running)
            }
            Err(StoreError::NotFound) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Part of `finish_early`: cancels the unfinished children of an execution that stops
    /// (and, through their own `finish_early`, theirs).
    pub(super) async fn stop_children(
        self: &Arc<Self>,
        execution: &Execution,
        reason: &str,
    ) -> EngineResult<()> {
        let children = self.children_of(execution.id).await?;
        let reason = format!("cancelled with its parent execution {}: {reason}", execution.id);
        for child in children.iter().filter(|child| !child.status.is_finished()) {
            // Recorded first, so the reconciler finishes the cancel if this process stops.
            match self.store.request_cancel(OwnerScope::All, child.id, Utc::now()).await {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(error) => return Err(error.into()),
            }
            Box::pin(self.finish_early(child, ExecutionStatus::Cancelled, &reason)).await?;
        }
        Ok(())
    }

    /// Every (non-deleted) child execution of `execution_id`, newest first.
    async fn children_of(&self, execution_id: Uuid) -> EngineResult<Vec<Execution>> {
        let mut filter = ExecutionFilter::new(OwnerScope::All);
        filter.parent_execution_id = Some(execution_id);
        let mut children = Vec::new();
        let mut after = None;
        loop {
            let page =
                self.store.list_executions_by_cursor(filter.clone(), after, CHILDREN_PAGE).await?;
            after = page.items.last().map(crate::store::ExecutionCursor::after);
            children.extend(page.items);
            if page.next_cursor.is_none() {
                return Ok(children);
            }
        }
    }
}
