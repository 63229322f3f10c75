//! Moving an execution forward. `advance` looks at an execution as the database has it and
//! does what is due: start it, queue the steps whose dependencies all succeeded (resolving
//! their input), finish it when every step succeeded, fail it when a step failed for good,
//! and stop it on a cancel request or past its deadline. `complete_attempt` records a step's
//! result and decides on a retry. Both are safe to call any number of times from any replica:
//! every change is a fenced compare-and-set, so a repeated call changes nothing.
//! WORKFLOW steps and child executions hook in here; their logic lives in `subworkflow`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize as _;
use serde_json::{Value, json};
use uuid::Uuid;

use super::definition::{ExecutionDefinition, FixedFacts, execution_output, retry_backoff};
use super::{Engine, EngineResult};
use crate::bus::topics;
use crate::mapping;
use crate::proto::v1 as pb;
use crate::queue::{EnqueueOutcome, QueueItem};
use crate::store::{
    AttemptKey, Completion, CompletionOutcome, Execution, ExecutionChange, ExecutionLog,
    ExecutionStatus, FinishedAttempt, FinishingExecution, InFlightStepRun, NewExecutionLog,
    NextStep, OwnerScope, StepKeys, StepRun, StepRunState, StepRunStatus, StepTransitionOutcome,
};

/// What the commit of a result did for its caller: the step run as it ended, the steps it
/// made ready that the same commit moved on (`complete_steps_then`), and the log lines that
/// travelled with it, for its event.
pub struct Completed {
    pub step_run: StepRun,
    pub next: Vec<StepRun>,
    pub logs: Vec<ExecutionLog>,
    /// Whether the same commit finished the execution (`FinishingExecution`).
    pub finished_execution: bool,
}

/// A result handed to the group commit, with what its commit is to do when it is a success:
/// move the steps it makes ready on (`next`), or end its execution (`finishing`).
#[derive(Clone)]
pub struct Completing {
    pub result: FinishedAttempt,
    pub next: Vec<NextStep>,
    pub finishing: Option<FinishingExecution>,
}

/// The attempt a log line is about, when it names one.
pub(super) fn log_attempt(line: &ExecutionLog) -> Option<AttemptKey> {
    Some(AttemptKey { step_run_id: line.step_run_id?, attempt: line.attempt? })
}

impl crate::store::group_commit::Changed for Completed {
    type Key = AttemptKey;

    fn key(&self) -> AttemptKey {
        self.step_run.attempt_key()
    }
}

/// Splits what one commit of results did among the results: `next` are the steps those
/// results were to move on, of which `completed.next` are the ones moved.
pub(super) fn completed_per_result(
    completed: crate::store::CompletedSteps,
    next: &[NextStep],
    finishing: &[FinishingExecution],
    logs: Vec<ExecutionLog>,
) -> Vec<Completed> {
    let ended: std::collections::HashSet<AttemptKey> = finishing
        .iter()
        .filter(|finish| completed.finished.contains(&finish.execution_id))
        .map(|finish| finish.after)
        .collect();
    let after: HashMap<AttemptKey, AttemptKey> =
        next.iter().map(|step| (step.key, step.after)).collect();
    let mut moved: HashMap<AttemptKey, Vec<StepRun>> = HashMap::new();
    for row in completed.next {
        if let Some(done) = after.get(&row.attempt_key()) {
            moved.entry(*done).or_default().push(row);
        }
    }
    let mut lines: HashMap<AttemptKey, Vec<ExecutionLog>> = HashMap::new();
    for line in logs {
        if let Some(key) = log_attempt(&line) {
            lines.entry(key).or_default().push(line);
        }
    }
    completed
        .step_runs
        .into_iter()
        .map(|step_run| {
            let key = step_run.attempt_key();
            let next = moved.remove(&key).unwrap_or_default();
            let logs = lines.remove(&key).unwrap_or_default();
            let finished_execution = ended.contains(&key);
            Completed { step_run, next, logs, finished_execution }
        })
        .collect()
}

/// A completion's question where some steps of its execution stand, asked together with the
/// questions of the completions beside it (`Engine::reading_states`); `ticket` tells their
/// answers apart.
#[derive(Clone)]
pub struct StatesAsked {
    pub ticket: u64,
    pub wanted: StepKeys,
}

/// The answer to a `StatesAsked`: where the steps it asked about stand.
pub struct StatesRead {
    pub ticket: u64,
    pub states: Vec<StepRunState>,
}

impl crate::store::group_commit::Changed for StatesRead {
    type Key = u64;

    fn key(&self) -> u64 {
        self.ticket
    }
}

/// Splits the states one read found among the questions it answered.
pub(super) fn states_per_question(
    asked: &[StatesAsked],
    states: &[StepRunState],
) -> Vec<StatesRead> {
    asked
        .iter()
        .map(|question| StatesRead {
            ticket: question.ticket,
            states: states
                .iter()
                .filter(|state| {
                    state.execution_id == question.wanted.execution_id
                        && question.wanted.step_keys.contains(&state.step_key)
                })
                .cloned()
                .collect(),
        })
        .collect()
}

/// The change that ends an execution SUCCEEDED with `output` at `now` (with
/// `when_every_step_succeeded`, only if every step did and no cancel was requested).
fn succeeded_change(
    output: Value,
    now: DateTime<Utc>,
    when_every_step_succeeded: bool,
) -> ExecutionChange {
    ExecutionChange {
        output: Some(output),
        finished_at: Some(now),
        only_when_every_step_succeeded: when_every_step_succeeded,
        ..ExecutionChange::new(ExecutionStatus::Succeeded, now)
    }
}

/// The steps of `definition` that depend on `step_key`.
fn successors_of<'a>(
    definition: &'a super::definition::ExecutionDefinition,
    step_key: &str,
) -> Vec<&'a pb::WorkflowStep> {
    definition
        .workflow
        .steps
        .iter()
        .filter(|step| step.depends_on.iter().any(|key| key == step_key))
        .collect()
}

/// A successor planned to move on in its predecessor's result commit (`plan_next`).
pub(super) struct PlannedStep {
    request: NextStep,
    /// Its queue entry, for when it is QUEUED.
    item: QueueItem,
    /// The runner here whose slot is held for it, and its assignment.
    runner: Option<(
        Arc<super::attached_runners::AttachedRunner>,
        super::dispatcher::PreparedAssignment,
    )>,
}

/// The bus topic that carries cancels to the replica a runner is attached to.
pub const RUNNER_CANCELS: &str = "runners:cancels";

/// A cancel for a runner attached to another replica, as it travels on `RUNNER_CANCELS`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelayedCancel {
    pub runner_id: String,
    pub step_run_id: Uuid,
    pub attempt: i32,
    pub reason: String,
}

/// The `kind` of the events published on an execution's topic (`bus::topics::execution`):
/// step runs changed (`stepRun` holds the committed row, after `earlier` rows the same commit
/// wrote, when there are any: the stages one commit took a step through, and the steps a
/// result moved on with it; watchers apply each by its step's `version`; `lines`, when
/// present, are log lines the same commit appended, taken before the rows), the execution
/// changed (read it back), or log lines were appended (`lines` holds them as committed; read
/// them back when it is absent).
pub const WATCH_STEP: &str = "step";
pub const WATCH_EXECUTION: &str = "execution";
pub const WATCH_LOG: &str = "log";

impl Engine {
    /// Does what is due for one execution; see the module comment.
    #[tracing::instrument(level = "debug", skip_all, fields(execution_id = %execution_id))]
    pub async fn advance(self: &Arc<Self>, execution_id: Uuid) -> EngineResult<()> {
        let (execution, steps) =
            self.store.get_execution_with_steps(OwnerScope::All, execution_id).await?;
        self.advance_created(&execution, &steps).await
    }

    /// `advance` from the execution and its steps as the database has them (as its creation
    /// just committed them, or as `advance` read them), without reading them again.
    #[tracing::instrument(level = "debug", skip_all, fields(execution_id = %execution.id))]
    pub async fn advance_created(
        self: &Arc<Self>,
        execution: &Execution,
        steps: &[StepRun],
    ) -> EngineResult<()> {
        if execution.status.is_finished() {
            return Ok(());
        }
        let now = Utc::now();
        if execution.cancel_requested_at.is_some() {
            return self
                .finish_early(execution, ExecutionStatus::Cancelled, "cancelled on request")
                .await;
        }
        if execution.parent_step_run_id.is_some() && !self.parent_still_waits(execution).await? {
            let error = "cancelled: its parent step no longer waits for it";
            return self.finish_early(execution, ExecutionStatus::Cancelled, error).await;
        }
        if execution.deadline_at.is_some_and(|deadline| deadline <= now) {
            return self
                .finish_early(
                    execution,
                    ExecutionStatus::TimedOut,
                    "the execution ran past its timeout",
                )
                .await;
        }
        let definition = match self.definition(execution) {
            Ok(definition) => definition,
            Err(problem) => {
                let error = format!("the execution's definition is unusable: {problem}");
                return self.finish_early(execution, ExecutionStatus::Failed, &error).await;
            }
        };
        self.definitions.remember_waiting(execution.id, steps);
        if execution.status == ExecutionStatus::Queued {
            let change = ExecutionChange {
                started_at: Some(now),
                ..ExecutionChange::new(ExecutionStatus::Running, now)
            };
            if self
                .store
                .transition_execution(execution.id, &[ExecutionStatus::Queued], change)
                .await?
            {
                self.publish_execution(execution.id).await;
            }
        }

        if self.collect_finished_children(execution, steps).await? {
            // Collecting completed a step, which advanced the execution with fresh state.
            return Ok(());
        }

        if let Some(failed) = steps.iter().find(|step| {
            matches!(
                step.status,
                StepRunStatus::Failed | StepRunStatus::TimedOut | StepRunStatus::Cancelled
            )
        }) {
            let what = match failed.status {
                StepRunStatus::TimedOut => "timed out",
                StepRunStatus::Cancelled => "was cancelled",
                _ => "failed",
            };
            let mut error = format!("step {} {what}", failed.step_key);
            if let Some(last_error) = failed.error.as_deref().filter(|text| !text.is_empty()) {
                error.push_str(": ");
                error.push_str(last_error);
            }
            return self.finish_early(execution, ExecutionStatus::Failed, &error).await;
        }

        let outputs: HashMap<String, Value> = steps
            .iter()
            .filter(|step| step.status == StepRunStatus::Succeeded)
            .map(|step| (step.step_key.clone(), step.output.clone().unwrap_or(Value::Null)))
            .collect();
        if outputs.len() == steps.len() {
            let output = execution_output(&definition.sink_keys(), &outputs);
            let is_child = execution.parent_step_run_id.is_some();
            let facts = FixedFacts::of(execution);
            self.finish_succeeded(execution.id, &facts, output, is_child, false).await?;
            return Ok(());
        }

        let scope = step_scope(&execution.input, &outputs);
        let mut ready = Vec::new();
        for step in steps.iter().filter(|step| step.status == StepRunStatus::Pending) {
            let Some(step_definition) = definition.step(&step.step_key) else {
                let error = format!("step {} is missing from the definition", step.step_key);
                return self.finish_early(execution, ExecutionStatus::Failed, &error).await;
            };
            let input = match step.next_attempt_at {
                // A retry: its input was resolved for the first attempt.
                Some(ready_at) if ready_at > now => {
                    self.wake_at(execution.id, ready_at);
                    continue;
                }
                Some(_) => None,
                None => {
                    let dependencies_done = step_definition
                        .depends_on
                        .iter()
                        .all(|dependency| outputs.contains_key(dependency));
                    if !dependencies_done {
                        continue;
                    }
                    match self.resolve_input(step_definition, &execution.input, &scope) {
                        Ok(input) => Some(input),
                        Err(error) => {
                            return self
                                .finish_early(execution, ExecutionStatus::Failed, &error)
                                .await;
                        }
                    }
                }
            };
            ready.push((step, input));
        }
        // Submitted together, the steps a completion made ready share one commit.
        let made_ready = ready
            .into_iter()
            .map(|(step, input)| self.make_ready(execution, &definition, step, input, now));
        for made in futures::future::join_all(made_ready).await {
            made?;
        }
        Ok(())
    }

    /// Records the execution SUCCEEDED with `output` (when it is unfinished and, with
    /// `when_every_step_succeeded`, only when all its steps did and no cancel was requested)
    /// and tells watchers, and the parent step of a child; `true` when this call finished it.
    async fn finish_succeeded(
        self: &Arc<Self>,
        execution_id: Uuid,
        facts: &FixedFacts,
        output: Value,
        is_child: bool,
        when_every_step_succeeded: bool,
    ) -> EngineResult<bool> {
        let change = succeeded_change(output, Utc::now(), when_every_step_succeeded);
        if !self
            .store
            .transition_execution(execution_id, ExecutionStatus::UNFINISHED, change)
            .await?
        {
            return Ok(false);
        }
        self.succeeded(execution_id, facts, is_child).await;
        Ok(true)
    }

    /// After the commit that ended an execution SUCCEEDED: the hook, watchers, and the parent
    /// step of a child.
    async fn succeeded(self: &Arc<Self>, execution_id: Uuid, facts: &FixedFacts, is_child: bool) {
        self.execution_finished(execution_id, facts, ExecutionStatus::Succeeded, None);
        self.publish_execution(execution_id).await;
        if is_child {
            self.child_execution_finished(execution_id).await;
        }
    }

    /// The input of a step whose dependencies all succeeded: its mapping rendered against
    /// `scope` (the execution's input when it has none), within the depth and size limits. The
    /// error is the execution's error.
    pub(super) fn resolve_input(
        &self,
        step: &pb::WorkflowStep,
        execution_input: &Value,
        scope: &Value,
    ) -> Result<Value, String> {
        let input = match mapping_of(step) {
            None => execution_input.clone(),
            Some(mapping_json) => mapping::render(&mapping_json, scope)
                .map_err(|error| format!("step {}: input mapping: {error}", step.key))?,
        };
        // A mapping can nest an output deeper: never past the limit, which keeps it within
        // what a runner decodes (a message it cannot decode would break its stream for every
        // step on it).
        let depth = crate::proto::wkt::json_depth(&input);
        if depth > self.settings.max_json_depth {
            return Err(format!(
                "step {}: its input is nested {depth} levels deep, deeper than the limit of {}",
                step.key, self.settings.max_json_depth
            ));
        }
        let size = input.to_string().len();
        if size > self.settings.max_payload_bytes {
            return Err(format!(
                "step {}: its input is {size} bytes, larger than the limit of {} bytes",
                step.key, self.settings.max_payload_bytes
            ));
        }
        Ok(input)
    }

    /// `advance` after a step succeeded, reading only what that success changes: the steps
    /// that depend on it, and the rows they need (their other dependencies, the steps their
    /// mappings read) — one read of a few rows, not of the execution and all its steps, and
    /// none for a successor that waits for this step alone (see `take_waiting`). The success
    /// of a workflow's only sink finishes the execution in one fenced statement. It works
    /// from what this process keeps of the execution (definition, fixed facts, input); the
    /// full `advance` takes over whenever that is not enough: nothing kept here, a child
    /// execution, past its deadline, one of several sinks (the execution may be done), a
    /// WORKFLOW successor, an input that cannot be resolved. A cancel requested meanwhile is
    /// safe: queueing and assigning refuse the steps of an execution being cancelled, and
    /// finishing refuses an execution being cancelled.
    async fn advance_after_success(self: &Arc<Self>, done: &StepRun) -> EngineResult<()> {
        let execution_id = done.execution_id;
        let now = Utc::now();
        let Some((definition, facts, input)) = self.definitions.known_with_input(execution_id)
        else {
            return self.advance(execution_id).await;
        };
        let successors = successors_of(&definition, &done.step_key);
        let in_time = facts.deadline_at.is_none_or(|deadline| deadline > now);
        if successors.is_empty() && facts.depth == 0 && in_time {
            // The only step no other depends on comes after every other one: its success
            // ends the execution (the store checks that every step succeeded).
            if definition.sink_keys() == [done.step_key.as_str()] {
                let output = done.output.clone().unwrap_or(Value::Null);
                if self.finish_succeeded(execution_id, &facts, output, false, true).await? {
                    return Ok(());
                }
            }
            return self.advance(execution_id).await;
        }
        let simple = facts.depth == 0
            && in_time
            && !successors.is_empty()
            && successors
                .iter()
                .all(|step| !super::subworkflow::is_sub_workflow(&definition, step));
        if !simple {
            return self.advance(execution_id).await;
        }
        let mut needed: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut rows = Vec::new();
        for step in &successors {
            let read = match mapping_of(step) {
                None => Vec::new(),
                Some(mapping_json) => match referenced_steps(&mapping_json) {
                    Some(read) => read,
                    None => return self.advance(execution_id).await,
                },
            };
            // A step that waits for this one alone and reads nothing else needs no row but its
            // own, which this process may still keep from when it read the execution.
            let needs_only_done = step.depends_on.iter().all(|key| *key == done.step_key)
                && read.iter().all(|key| *key == done.step_key);
            if needs_only_done
                && let Some(waiting) = self.definitions.take_waiting(execution_id, &step.key)
            {
                rows.push(waiting);
                continue;
            }
            needed.insert(step.key.clone());
            needed.extend(step.depends_on.iter().cloned());
            needed.extend(read);
        }
        needed.remove(&done.step_key);
        let not_ready = self.not_ready_yet(execution_id, done, &successors, &rows, &needed).await?;
        let all_settled = successors.iter().all(|step| {
            not_ready.contains(&step.key) || rows.iter().any(|row| row.step_key == step.key)
        });
        if !needed.is_empty() && !all_settled {
            let keys: Vec<&str> = needed.iter().map(String::as_str).collect();
            rows.extend(self.store.list_step_runs_by_keys(execution_id, &keys).await?);
        }
        let mut outputs: HashMap<String, Value> = rows
            .iter()
            .filter(|row| row.status == StepRunStatus::Succeeded)
            .map(|row| (row.step_key.clone(), row.output.clone().unwrap_or(Value::Null)))
            .collect();
        outputs.insert(done.step_key.clone(), done.output.clone().unwrap_or(Value::Null));
        let scope = step_scope(&input, &outputs);
        let mut ready = Vec::new();
        for step in successors {
            if not_ready.contains(&step.key) {
                continue;
            }
            let Some(step_run) = rows.iter().find(|row| row.step_key == step.key) else {
                return self.advance(execution_id).await;
            };
            // Moved on already (another completion made it ready), or waiting for a retry.
            if step_run.status != StepRunStatus::Pending || step_run.next_attempt_at.is_some() {
                continue;
            }
            if !step.depends_on.iter().all(|dependency| outputs.contains_key(dependency)) {
                continue;
            }
            match self.resolve_input(step, &input, &scope) {
                Ok(step_input) => ready.push((step_run, step_input)),
                // The full advance fails the execution with it.
                Err(_) => return self.advance(execution_id).await,
            }
        }
        let made_ready = ready.into_iter().map(|(step_run, step_input)| {
            self.hand_off_or_queue(
                execution_id,
                &facts,
                &definition,
                step_run,
                Some(step_input),
                now,
            )
        });
        let mut items = Vec::new();
        let mut failure = None;
        for made in futures::future::join_all(made_ready).await {
            match made {
                Ok(Some(queued)) => {
                    let queued_at = queued.queued_at.unwrap_or(now);
                    let stage = stage(&queued);
                    items.extend(self.queue_item(
                        execution_id,
                        &facts,
                        &definition,
                        stage,
                        queued_at,
                    ));
                }
                Ok(None) => {}
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        // The ones committed QUEUED go into the queue even when another failed.
        self.enqueue_items(items).await?;
        failure.map_or(Ok(()), Err)
    }

    /// The successors of `done` (whose rows are not in `rows` already) that cannot be ready
    /// yet: a step that waits for others too is ready only once all of them succeeded. Their
    /// states are read without inputs and outputs, so that of the N completions of a fan-in
    /// only the ones that may make it ready read the rows it needs (N rows, not N²), and
    /// together with the other completions asking meanwhile (one statement for all of them,
    /// begun after each one's commit). Empty when every successor waits for `done` alone
    /// (nothing to ask).
    async fn not_ready_yet(
        &self,
        execution_id: Uuid,
        done: &StepRun,
        successors: &[&pb::WorkflowStep],
        rows: &[StepRun],
        needed: &std::collections::BTreeSet<String>,
    ) -> EngineResult<std::collections::HashSet<String>> {
        let mut not_ready = std::collections::HashSet::new();
        let waits_for_others =
            successors.iter().any(|step| step.depends_on.iter().any(|key| *key != done.step_key));
        if !waits_for_others || needed.is_empty() {
            return Ok(not_ready);
        }
        let ticket = self.state_tickets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wanted = StepKeys { execution_id, step_keys: needed.iter().cloned().collect() };
        let states: HashMap<String, StepRunState> = self
            .reading_states
            .submit(ticket, StatesAsked { ticket, wanted })
            .await?
            .map(|read| read.states)
            .unwrap_or_default()
            .into_iter()
            .map(|state| (state.step_key.clone(), state))
            .collect();
        let succeeded = |key: &String| {
            *key == done.step_key
                || states.get(key).is_some_and(|state| state.status == StepRunStatus::Succeeded)
        };
        for step in successors {
            if rows.iter().any(|row| row.step_key == step.key) {
                continue;
            }
            // A row that is missing is left to the full read (and `advance`) to explain.
            let waiting = states.get(&step.key).is_none_or(|state| {
                state.status == StepRunStatus::Pending && !state.waiting_for_retry
            });
            if !waiting || !step.depends_on.iter().all(succeeded) {
                not_ready.insert(step.key.clone());
            }
        }
        Ok(not_ready)
    }

    /// Moves a PENDING step whose time has come on: straight to a runner attached here with a
    /// free slot for it (one commit), or else QUEUED and into the ready queue.
    async fn make_ready(
        self: &Arc<Self>,
        execution: &Execution,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
        input: Option<Value>,
        now: DateTime<Utc>,
    ) -> EngineResult<()> {
        let facts = FixedFacts::of(execution);
        if let Some(queued) =
            self.hand_off_or_queue(execution.id, &facts, definition, step_run, input, now).await?
        {
            self.enqueue(execution, definition, &queued).await?;
        }
        Ok(())
    }

    /// The steps the success of `done` (its row as this process assigned it) with `output`
    /// makes ready, worked out before that success is committed so that the same commit moves
    /// them on: each goes to a runner here with a free slot for it (held from now on) or is
    /// QUEUED. Only when nothing read before the commit can change by then: every successor
    /// waits for `done` alone, reads no other step's output, and this process keeps its row
    /// from when it read the execution (`take_all_waiting`), its definition, facts and input;
    /// a top-level execution within its deadline, no WORKFLOW successor. `None` otherwise
    /// (`advance_after_success` then does it after the commit, as it does when it is the
    /// last step).
    fn plan_next(
        self: &Arc<Self>,
        done: &StepRun,
        output: &Value,
        now: DateTime<Utc>,
    ) -> Option<Vec<PlannedStep>> {
        let execution_id = done.execution_id;
        let (definition, facts, input) = self.definitions.known_with_input(execution_id)?;
        let in_time = facts.deadline_at.is_none_or(|deadline| deadline > now);
        if facts.depth != 0 || !in_time {
            return None;
        }
        let successors = successors_of(&definition, &done.step_key);
        if successors.is_empty() {
            return None;
        }
        for step in &successors {
            if super::subworkflow::is_sub_workflow(&definition, step)
                || step.depends_on.iter().any(|key| *key != done.step_key)
            {
                return None;
            }
            if let Some(mapping_json) = mapping_of(step) {
                let read = referenced_steps(&mapping_json)?;
                if read.iter().any(|key| *key != done.step_key) {
                    return None;
                }
            }
        }
        let keys: Vec<&str> = successors.iter().map(|step| step.key.as_str()).collect();
        let rows = self.definitions.take_all_waiting(execution_id, &keys)?;
        let outputs = HashMap::from([(done.step_key.clone(), output.clone())]);
        let scope = step_scope(&input, &outputs);
        let mut planned: Vec<PlannedStep> = Vec::with_capacity(rows.len());
        for (step, row) in successors.into_iter().zip(rows) {
            let step_input = self.resolve_input(step, &input, &scope).ok();
            let item = self.queue_item(execution_id, &facts, &definition, stage(&row), now);
            let (Some(step_input), Some(item)) = (step_input, item) else {
                // The full advance fails the execution (or finds what is amiss).
                self.release_planned(&planned);
                return None;
            };
            let key = row.attempt_key();
            let placement = crate::engine::attached_runners::Placement {
                owner_id: item.owner_id,
                agent_type: &item.agent_type,
                required_labels: &item.required_labels,
            };
            let provisional = super::dispatcher::provisional_deadline(now);
            let runner = self
                .hold_slot(&item, key, now)
                .or_else(|| self.take_over_slot(done, &placement, item.priority, key, provisional));
            let runner = match runner {
                None => None,
                Some(runner) => {
                    let prepared =
                        self.prepare_assignment(&runner, key, &definition, &facts, &step.key, now);
                    match prepared {
                        Some(prepared) => Some((runner, prepared)),
                        None => {
                            self.release_slot(&runner, key);
                            self.release_planned(&planned);
                            return None;
                        }
                    }
                }
            };
            let request = NextStep {
                after: done.attempt_key(),
                key,
                input: Some(step_input),
                at: now,
                assignment: runner.as_ref().map(|(_, prepared)| prepared.assignment.clone()),
            };
            planned.push(PlannedStep { request, item, runner });
        }
        Some(planned)
    }

    /// The end of the execution that the success of `done` (its row as this process assigned
    /// it) with `output` brings, worked out before that success is committed so that the same
    /// commit records it (with the facts it was decided on): when `done` is the workflow's
    /// only sink, of a top-level execution within its deadline that this process keeps. The
    /// store then finishes it only if every other step succeeded and no cancel was requested
    /// (as `advance_after_success` does after the commit otherwise).
    fn plan_finish(
        &self,
        done: &StepRun,
        output: &Value,
        now: DateTime<Utc>,
    ) -> Option<(FinishingExecution, FixedFacts)> {
        let (definition, facts) = self.definitions.known(done.execution_id)?;
        let in_time = facts.deadline_at.is_none_or(|deadline| deadline > now);
        // The only step nothing depends on (so it has no successors either).
        let last = definition.sink_keys() == [done.step_key.as_str()];
        if facts.depth != 0 || !in_time || !last {
            return None;
        }
        let change = succeeded_change(output.clone(), now, true);
        let finish = FinishingExecution {
            after: done.attempt_key(),
            execution_id: done.execution_id,
            change,
        };
        Some((finish, facts))
    }

    /// The slot of `done` on the runner that ran it, held for `key` (a step that became ready
    /// with `done`'s result) when no runner here has a free slot: the runner freed that slot
    /// when it sent the result, so an execution that is running goes on there rather than
    /// waiting behind work queued later. Not while this replica last saw the queue hold work
    /// of a higher priority than `priority`, which the freed slot goes to instead.
    fn take_over_slot(
        &self,
        done: &StepRun,
        placement: &crate::engine::attached_runners::Placement<'_>,
        priority: i32,
        key: AttemptKey,
        provisional: DateTime<Utc>,
    ) -> Option<Arc<super::attached_runners::AttachedRunner>> {
        if priority < self.waiting_priority.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let runner = self.attached_runners.get(done.runner_id.as_deref()?)?;
        let taken = runner.accepts(placement)
            && runner.hold_after(done.attempt_key(), key, done.execution_id, provisional);
        taken.then_some(runner)
    }

    /// Frees the slots held for planned steps that were not moved on.
    fn release_planned(&self, planned: &[PlannedStep]) {
        for step in planned {
            if let Some((runner, _)) = &step.runner
                && runner.release(step.request.key)
            {
                self.attached_runners.capacity_changed.notify_waiters();
            }
        }
    }

    /// After the commit of the success `done` (with the log `lines` that travelled with it,
    /// and its `start` row when watchers were not told of it) that moved on its `planned`
    /// successors (`moved`, the rows it moved): tells watchers of all of it in one event, then
    /// sends the assignments, queues the QUEUED ones, frees the slots of those it refused and,
    /// when it refused any, lets the full `advance` see why.
    async fn moved_on(
        self: &Arc<Self>,
        done: &StepRun,
        start: Vec<StepRun>,
        lines: &[ExecutionLog],
        planned: Vec<PlannedStep>,
        moved: Vec<StepRun>,
    ) -> EngineResult<()> {
        let execution_id = done.execution_id;
        let mut moved: HashMap<AttemptKey, StepRun> =
            moved.into_iter().map(|row| (row.attempt_key(), row)).collect();
        let mut refused = false;
        let mut rows = start;
        rows.push(done.clone());
        let mut assignments = Vec::new();
        let mut queued = Vec::new();
        for step in planned {
            let key = step.request.key;
            match (moved.remove(&key), step.runner) {
                (Some(row), Some((runner, prepared))) => {
                    rows.push(super::dispatcher::as_queued(&row));
                    rows.push(row.clone());
                    assignments.push((runner, row, prepared));
                }
                (Some(row), None) => {
                    let enqueued_at = row.queued_at.unwrap_or(step.item.enqueued_at);
                    queued.push(QueueItem { enqueued_at, ..step.item });
                    rows.push(row);
                }
                (None, runner) => {
                    refused = true;
                    if let Some((runner, _)) = runner
                        && runner.release(key)
                    {
                        self.attached_runners.capacity_changed.notify_waiters();
                    }
                }
            }
        }
        if let Some(last) = rows.pop() {
            self.publish_steps(lines, &rows, &last).await;
        }
        for (runner, row, prepared) in assignments {
            self.send_assignment(&runner, execution_id, row, prepared).await;
        }
        self.enqueue_items(queued).await?;
        if refused {
            self.advance(execution_id).await?;
        }
        Ok(())
    }

    /// The first part of `make_ready`: the hand-off to a runner here, or else the commit of
    /// QUEUED (published), whose row it returns for the caller to put in the queue.
    async fn hand_off_or_queue(
        self: &Arc<Self>,
        execution_id: Uuid,
        facts: &FixedFacts,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
        input: Option<Value>,
        now: DateTime<Utc>,
    ) -> EngineResult<Option<StepRun>> {
        let key = step_run.attempt_key();
        if let Some(item) = self.queue_item(execution_id, facts, definition, stage(step_run), now)
            && let Some(handed) = self.hand_off(&item, input.clone()).await
        {
            handed?;
            return Ok(None);
        }
        let Some(queued) = self.queueing.submit(key, (key, input, now)).await? else {
            return Ok(None);
        };
        self.publish_step(&queued).await;
        Ok(Some(queued))
    }

    /// Ends an execution CANCELLED with `reason` (its cancel request is already recorded);
    /// `false` when it had finished already.
    pub async fn cancel(self: &Arc<Self>, execution_id: Uuid, reason: &str) -> EngineResult<bool> {
        let execution = self.store.get_execution(OwnerScope::All, execution_id).await?;
        if execution.status.is_finished() {
            return Ok(false);
        }
        self.finish_early(&execution, ExecutionStatus::Cancelled, reason).await?;
        Ok(true)
    }

    /// Records the result of an attempt and moves the execution on. A failure that may be
    /// retried and has attempts left goes back to PENDING with its backoff; anything else is
    /// final. Duplicate and stale reports change nothing.
    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(step_run_id = %key.step_run_id, attempt = key.attempt)
    )]
    pub async fn complete_attempt(
        self: &Arc<Self>,
        key: AttemptKey,
        completion: Completion,
    ) -> EngineResult<CompletionOutcome> {
        self.complete_started_attempt(key, completion, None, Vec::new(), None, None).await
    }

    /// `complete_attempt` for a result reported by the runner that said it started the attempt
    /// at `started_at` (recorded with the result when the start was not committed on its own),
    /// with the log lines about it that travel with the result (appended in the same commit).
    ///
    /// `assigned` is the attempt's row as this process assigned it, when it did: a success
    /// then moves the steps it makes ready on in the result's own commit, when this process
    /// knows enough to (`plan_next`): straight to a runner here with a free slot, QUEUED
    /// otherwise. One commit for a step's end and its successors' start.
    ///
    /// `unannounced_start` is the attempt's row as it was RUNNING when watchers were not told
    /// of its start yet: it goes out first in the result's event.
    pub async fn complete_started_attempt(
        self: &Arc<Self>,
        key: AttemptKey,
        completion: Completion,
        started_at: Option<DateTime<Utc>>,
        logs: Vec<NewExecutionLog>,
        assigned: Option<&StepRun>,
        unannounced_start: Option<StepRun>,
    ) -> EngineResult<CompletionOutcome> {
        let now = Utc::now();
        let retryable = match &completion {
            Completion::Failed { retryable, .. } => *retryable,
            Completion::TimedOut => true,
            Completion::Succeeded { .. } | Completion::Cancelled => false,
        };
        let (planned, finishing) = match (&completion, assigned) {
            (Completion::Succeeded { output }, Some(done)) if done.attempt_key() == key => {
                match self.plan_next(done, output, now) {
                    Some(planned) => (Some(planned), None),
                    None => (None, self.plan_finish(done, output, now)),
                }
            }
            _ => (None, None),
        };
        let next: Vec<NextStep> =
            planned.iter().flatten().map(|step| step.request.clone()).collect();
        let result = FinishedAttempt { key, completion, started_at, finished_at: now, logs };
        let request = Completing {
            result,
            next,
            finishing: finishing.as_ref().map(|(finish, _)| finish.clone()),
        };
        let committed = match self.completing.submit(key, request).await {
            Ok(committed) => committed,
            Err(error) => {
                self.release_planned(planned.as_deref().unwrap_or_default());
                return Err(error.into());
            }
        };
        let (outcome, moved, lines, finished_execution) = match committed {
            Some(Completed { step_run, next, logs, finished_execution }) => {
                (CompletionOutcome::Applied(step_run), next, logs, finished_execution)
            }
            None => {
                self.release_planned(planned.as_deref().unwrap_or_default());
                (self.store.refused_completion(key).await?, Vec::new(), Vec::new(), false)
            }
        };
        let CompletionOutcome::Applied(step_run) = &outcome else { return Ok(outcome) };
        self.step_finished(step_run);
        self.leases.forget(key).await;
        let start: Vec<StepRun> = unannounced_start.into_iter().collect();
        let told_with_next = planned.is_some() && step_run.status == StepRunStatus::Succeeded;
        if !told_with_next {
            self.publish_steps(&lines, &start, step_run).await;
        }
        if retryable && step_run.user_attempts_used() < step_run.max_attempts {
            let execution =
                self.store.get_execution(OwnerScope::All, step_run.execution_id).await?;
            let policy = self.definition(&execution).ok().and_then(|definition| {
                definition.step(&step_run.step_key).and_then(|step| step.retry_policy)
            });
            let ready_at = now
                + chrono::Duration::from_std(retry_backoff(policy.as_ref(), key.attempt + 1))
                    .unwrap_or_else(|_| chrono::Duration::seconds(1));
            if let StepTransitionOutcome::Applied(waiting) =
                self.store.schedule_retry(key, ready_at, now).await?
            {
                self.publish_step(&waiting).await;
                self.log_system(
                    &waiting,
                    format!(
                        "attempt {} failed; attempt {} starts at {ready_at}",
                        key.attempt, waiting.attempt
                    ),
                )
                .await;
                self.wake_at(step_run.execution_id, ready_at);
                return Ok(outcome);
            }
        }
        if step_run.status == StepRunStatus::Succeeded {
            match (planned, finishing) {
                (Some(planned), _) => {
                    self.moved_on(step_run, start, &lines, planned, moved).await?;
                }
                (None, Some((_, facts))) if finished_execution => {
                    self.succeeded(step_run.execution_id, &facts, false).await;
                }
                // Not every step succeeded after all, or a cancel came first: the full
                // advance sees what is due.
                (None, Some(_)) => self.advance(step_run.execution_id).await?,
                (None, None) => self.advance_after_success(step_run).await?,
            }
        } else {
            self.advance(step_run.execution_id).await?;
        }
        Ok(outcome)
    }

    /// Ends an unfinished execution early: cancels its unfinished steps (telling the runners
    /// that hold them) and its child executions, records `status` with `error`, and reports
    /// to the parent step when it is a child.
    #[tracing::instrument(level = "debug", skip_all, fields(execution_id = %execution.id, status = %status))]
    pub(super) async fn finish_early(
        self: &Arc<Self>,
        execution: &Execution,
        status: ExecutionStatus,
        error: &str,
    ) -> EngineResult<()> {
        let now = Utc::now();
        let in_flight = self.store.cancel_pending_steps(execution.id, now).await?;
        for held in &in_flight {
            // A WORKFLOW step has no runner: its child execution is stopped below.
            if held.runner_id != super::subworkflow::ENGINE_RUNNER_ID {
                self.send_cancel(held, error).await;
            }
        }
        for step in self.store.list_step_runs(execution.id).await? {
            if step.status == StepRunStatus::Cancelled {
                let _ = self.queue.remove(crate::queue::QueueKey::new(step.id, step.attempt)).await;
                self.publish_step(&step).await;
            }
        }
        self.stop_children(execution, error).await?;
        let change = ExecutionChange {
            error: Some(error.to_owned()),
            finished_at: Some(now),
            ..ExecutionChange::new(status, now)
        };
        if self
            .store
            .transition_execution(execution.id, ExecutionStatus::UNFINISHED, change)
            .await?
        {
            self.execution_finished(execution.id, &FixedFacts::of(execution), status, Some(error));
            self.publish_execution(execution.id).await;
            if execution.parent_step_run_id.is_some() {
                self.child_execution_finished(execution.id).await;
            }
        }
        Ok(())
    }

    /// Tells the runner holding an attempt to stop it: directly when it is attached here,
    /// through the bus otherwise.
    pub(super) async fn send_cancel(self: &Arc<Self>, held: &InFlightStepRun, reason: &str) {
        let key = AttemptKey { step_run_id: held.step_run_id, attempt: held.attempt };
        self.leases.forget(key).await;
        if let Some(runner) = self.attached_runners.get(&held.runner_id) {
            self.cancel_on_runner(&runner, key, reason).await;
            return;
        }
        let cancel = RelayedCancel {
            runner_id: held.runner_id.clone(),
            step_run_id: held.step_run_id,
            attempt: held.attempt,
            reason: reason.to_owned(),
        };
        let message = match serde_json::to_value(&cancel) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "could not encode a cancel for another replica");
                return;
            }
        };
        if let Err(error) = self.bus.publish(RUNNER_CANCELS, message).await {
            tracing::warn!(%error, "could not relay a cancel to another replica");
        }
    }

    /// Tells a runner attached here to stop an attempt. Its slot stays taken until the runner
    /// acknowledges the cancel (the attempt may still be winding down there); a cancel not
    /// acknowledged in time frees the slot anyway, so a silent runner cannot keep it forever.
    pub(super) async fn cancel_on_runner(
        self: &Arc<Self>,
        runner: &Arc<super::attached_runners::AttachedRunner>,
        key: AttemptKey,
        reason: &str,
    ) {
        let held = runner.start_cancel(key);
        let cancel = pb::CancelStep { step: Some(step_ref(key)), reason: reason.to_owned() };
        let sent = runner.send(pb::attach_response::Message::Cancel(cancel)).await;
        if !held {
            return;
        }
        if !sent {
            self.release_slot(runner, key);
            return;
        }
        let engine = self.clone();
        let runner = runner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(engine.settings.acknowledgement_timeout).await;
            if runner.held(key).is_some_and(|held| held.cancelling) && runner.release(key) {
                tracing::warn!(runner_id = %runner.id, step_run_id = %key.step_run_id, "cancel not acknowledged in time; freeing its slot");
                engine.attached_runners.capacity_changed.notify_waiters();
            }
        });
    }

    /// Forwards cancels published by other replicas to the runners attached here.
    pub(super) async fn relay_cancels(self: Arc<Self>) {
        let mut outage = crate::outage::Outage::new("subscribing to runner cancels");
        loop {
            let mut stream = match self.bus.subscribe(RUNNER_CANCELS).await {
                Ok(stream) => {
                    outage.succeeded();
                    stream
                }
                Err(error) => {
                    let pause = outage.failed(&error);
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            while let Some(message) = futures::StreamExt::next(&mut stream).await {
                let Some(payload) = message.payload() else { continue };
                let cancel = match RelayedCancel::deserialize(payload) {
                    Ok(cancel) => cancel,
                    Err(error) => {
                        tracing::warn!(%error, "ignoring a malformed relayed cancel");
                        continue;
                    }
                };
                let Some(runner) = self.attached_runners.get(&cancel.runner_id) else { continue };
                let key = AttemptKey { step_run_id: cancel.step_run_id, attempt: cancel.attempt };
                self.cancel_on_runner(&runner, key, &cancel.reason).await;
            }
        }
    }

    /// Hands a QUEUED step run to a runner attached here with a free slot for it, or else
    /// puts it in the ready queue. A full queue leaves it QUEUED in the database; the
    /// reconciler offers it again later. WORKFLOW steps never reach the queue:
    /// the engine runs them itself (`subworkflow`).
    pub(super) async fn enqueue(
        self: &Arc<Self>,
        execution: &Execution,
        definition: &ExecutionDefinition,
        step_run: &StepRun,
    ) -> EngineResult<()> {
        let Some(step) = definition.step(&step_run.step_key) else { return Ok(()) };
        if super::subworkflow::is_sub_workflow(definition, step) {
            return Box::pin(self.start_sub_workflow(execution, definition, step_run)).await;
        }
        let queued_at = step_run.queued_at.unwrap_or_else(Utc::now);
        let facts = FixedFacts::of(execution);
        match self.queue_item(execution.id, &facts, definition, stage(step_run), queued_at) {
            Some(item) => self.enqueue_items(vec![item]).await,
            None => Ok(()),
        }
    }

    /// Puts entries in the ready queue, in one round trip; see `enqueue`.
    pub(super) async fn enqueue_items(&self, items: Vec<QueueItem>) -> EngineResult<()> {
        let Some(most_urgent) = items.iter().map(|item| item.priority).max() else {
            return Ok(());
        };
        self.waiting_priority.fetch_max(most_urgent, std::sync::atomic::Ordering::Relaxed);
        let step_run_ids: Vec<Uuid> = items.iter().map(|item| item.step_run_id).collect();
        let outcomes = self.queue.enqueue_many(items).await?;
        for (step_run_id, outcome) in step_run_ids.iter().zip(outcomes) {
            if outcome == EnqueueOutcome::Full {
                let max_len = self.queue.max_len();
                tracing::warn!(max_len, %step_run_id, "the queue is full; the reconciler will offer the step again");
            }
        }
        Ok(())
    }

    /// The queue entry of a step run that runners execute (`None` for a WORKFLOW step, which
    /// the engine runs itself, and for a step the definition lacks).
    pub(super) fn queue_item(
        &self,
        execution_id: Uuid,
        facts: &FixedFacts,
        definition: &ExecutionDefinition,
        (key, step_key): (AttemptKey, &str),
        enqueued_at: DateTime<Utc>,
    ) -> Option<QueueItem> {
        let step = definition.step(step_key)?;
        if super::subworkflow::is_sub_workflow(definition, step) {
            return None;
        }
        let agent_type = definition
            .agent_of(step)
            .and_then(|agent| pb::AgentType::try_from(agent.r#type).ok())
            .map(|agent_type| agent_type_name(agent_type).to_owned())
            .unwrap_or_default();
        Some(QueueItem {
            step_run_id: key.step_run_id,
            attempt: key.attempt,
            execution_id,
            step_key: step_key.to_owned(),
            owner_id: facts.owner_id,
            priority: facts.priority.clamp(crate::queue::MIN_PRIORITY, crate::queue::MAX_PRIORITY),
            enqueued_at,
            agent_type,
            required_labels: ExecutionDefinition::required_labels(step),
        })
    }

    /// Advances the execution again at `at` (a retry's backoff ends). The reconciler does the
    /// same if this process stops before then.
    pub(super) fn wake_at(self: &Arc<Self>, execution_id: Uuid, at: DateTime<Utc>) {
        let engine = self.clone();
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Err(error) = engine.advance(execution_id).await {
                tracing::warn!(%error, %execution_id, "advancing after a backoff failed; the reconciler will retry");
            }
        });
    }

    /// Tells watchers that a step run changed, with the row as committed. Call it after the
    /// commit and before acting on the transition (sending to a runner, queueing), so that
    /// watchers receive the transitions of a step in the order they happened, whichever
    /// replica made them.
    pub(super) async fn publish_step(&self, step_run: &StepRun) {
        self.publish_step_after(&[], step_run).await;
    }

    /// `publish_step` for a commit that wrote several rows (`earlier`, oldest first: the
    /// stages it took the step through, and rows of other steps of the same execution it
    /// moved), in one event.
    pub(super) async fn publish_step_after(&self, earlier: &[StepRun], step_run: &StepRun) {
        self.publish_steps(&[], earlier, step_run).await;
    }

    /// `publish_step_after` with the log `lines` the same commit appended (of this execution),
    /// which watchers take before the rows.
    pub(super) async fn publish_steps(
        &self,
        lines: &[ExecutionLog],
        earlier: &[StepRun],
        step_run: &StepRun,
    ) {
        let event = StepEvent { kind: WATCH_STEP, step_run, earlier, lines };
        // Encoded straight to text; one that does not encode goes out without its rows, and
        // watchers read them back.
        let json = serde_json::to_string(&event)
            .unwrap_or_else(|_| json!({ "kind": WATCH_STEP }).to_string());
        publish_on(self.bus.as_ref(), step_run.execution_id, json).await;
    }

    /// Tells watchers that the execution changed status (they read it back).
    pub(super) async fn publish_execution(&self, execution_id: Uuid) {
        self.publish(execution_id, json!({ "kind": WATCH_EXECUTION })).await;
    }

    /// Publishes `event` as it is: the in-process bus hands the value over without encoding it.
    pub(super) async fn publish(&self, execution_id: Uuid, event: Value) {
        let published = self.bus.publish(&topics::execution(execution_id), event).await;
        report_unpublished(published);
    }

    /// Writes a log line of the engine's own about a step.
    pub(super) async fn log_system(&self, step_run: &StepRun, message: String) {
        let line = crate::store::NewExecutionLog {
            execution_id: step_run.execution_id,
            step_run_id: Some(step_run.id),
            attempt: Some(step_run.attempt),
            level: crate::store::ExecutionLogLevel::Info,
            source: crate::store::ExecutionLogSource::System,
            message,
            fields: None,
            created_at: Utc::now(),
        };
        match self.store.append_execution_logs(vec![line]).await {
            Ok(written) => publish_logs(self.bus.as_ref(), written).await,
            Err(error) => tracing::warn!(%error, "could not write an engine log line"),
        }
    }
}

/// Tells the watchers of each execution about its log lines, as committed.
pub(super) async fn publish_logs(bus: &dyn crate::bus::Bus, logs: Vec<ExecutionLog>) {
    let mut by_execution: HashMap<Uuid, Vec<ExecutionLog>> = HashMap::new();
    for line in logs {
        by_execution.entry(line.execution_id).or_default().push(line);
    }
    for (execution_id, lines) in by_execution {
        let event = LogEvent { kind: WATCH_LOG, lines: &lines };
        // One that does not encode goes out without its lines, which watchers read back.
        let json = serde_json::to_string(&event)
            .unwrap_or_else(|_| json!({ "kind": WATCH_LOG }).to_string());
        publish_on(bus, execution_id, json).await;
    }
}

/// A `step` event as watchers read it (`service::watch`): the row, the rows of the same commit
/// that came before it, and the log lines that commit appended.
#[derive(serde::Serialize)]
struct StepEvent<'a> {
    kind: &'static str,
    #[serde(rename = "stepRun")]
    step_run: &'a StepRun,
    #[serde(skip_serializing_if = "<[StepRun]>::is_empty")]
    earlier: &'a [StepRun],
    #[serde(skip_serializing_if = "<[ExecutionLog]>::is_empty")]
    lines: &'a [ExecutionLog],
}

/// A `log` event: lines appended to one execution.
#[derive(serde::Serialize)]
struct LogEvent<'a> {
    kind: &'static str,
    lines: &'a [ExecutionLog],
}

/// Publishes the event `json` on the topic of execution `execution_id` (best effort: watchers
/// re-read the database when the bus loses messages).
async fn publish_on(bus: &dyn crate::bus::Bus, execution_id: Uuid, json: String) {
    report_unpublished(bus.publish_json(&topics::execution(execution_id), json).await);
}

/// An execution event the bus did not take is only worth a debug line: watchers re-read.
fn report_unpublished(published: crate::bus::BusResult<()>) {
    if let Err(error) = published {
        tracing::debug!(%error, "could not publish an execution event");
    }
}

/// The steps whose outputs a mapping reads (`steps.<key>.output…`); `None` when it does not
/// parse or reads `steps` as a whole.
fn referenced_steps(mapping_json: &Value) -> Option<Vec<String>> {
    let references = mapping::references(mapping_json).ok()?;
    references
        .iter()
        .filter(|(_, reference)| reference.root() == Some("steps"))
        .map(|(_, reference)| match reference.segments.get(1) {
            Some(mapping::PathSegment::Key(key)) => Some(key.clone()),
            Some(mapping::PathSegment::Index(index)) => Some(index.to_string()),
            // `steps` as a whole reads every output: only a full read will do.
            None => None,
        })
        .collect()
}

/// A step's input mapping as JSON; `None` when it has none (absent, or JSON null): the step
/// then receives the execution input.
fn mapping_of(step: &pb::WorkflowStep) -> Option<Value> {
    step.input_mapping
        .as_ref()
        .map(crate::proto::wkt::value_to_json)
        .filter(|mapping_json| !mapping_json.is_null())
}

/// A step run's attempt and step key, as `queue_item` takes them.
fn stage(step_run: &StepRun) -> (AttemptKey, &str) {
    (step_run.attempt_key(), &step_run.step_key)
}

/// The scope step input mappings render against.
pub(super) fn step_scope(input: &Value, outputs: &HashMap<String, Value>) -> Value {
    let steps: serde_json::Map<String, Value> =
        outputs.iter().map(|(key, output)| (key.clone(), json!({ "output": output }))).collect();
    json!({ "input": input, "steps": steps })
}

/// `CODE`, `API`, … as queue items and runner hellos name agent types.
pub fn agent_type_name(agent_type: pb::AgentType) -> &'static str {
    let name = agent_type.as_str_name();
    name.strip_prefix("AGENT_TYPE_").unwrap_or(name)
}

pub(super) fn step_ref(key: AttemptKey) -> pb::StepRef {
    pb::StepRef { step_run_id: key.step_run_id.to_string(), attempt: key.attempt }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(execution_id: Uuid, step_key: &str, status: StepRunStatus) -> StepRunState {
        StepRunState {
            execution_id,
            step_key: step_key.to_owned(),
            status,
            waiting_for_retry: false,
        }
    }

    /// An answer as (execution, step key, status) triples.
    type Found<'a> = Vec<(Uuid, &'a str, StepRunStatus)>;

    fn asked(ticket: u64, execution_id: Uuid, step_keys: &[&str]) -> StatesAsked {
        let step_keys = step_keys.iter().map(|key| (*key).to_owned()).collect();
        StatesAsked { ticket, wanted: StepKeys { execution_id, step_keys } }
    }

    #[test]
    fn a_group_read_answers_each_question_with_its_own_steps() {
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let states = [
            state(first, "a", StepRunStatus::Succeeded),
            state(first, "join", StepRunStatus::Pending),
            state(second, "a", StepRunStatus::Running),
            state(second, "b", StepRunStatus::Succeeded),
        ];
        let questions = [
            asked(7, first, &["a", "join"]),
            asked(8, second, &["a"]),
            asked(9, first, &["a", "missing"]),
        ];
        let answers = states_per_question(&questions, &states);
        let summary: Vec<(u64, Found<'_>)> = answers
            .iter()
            .map(|read| {
                let found = read
                    .states
                    .iter()
                    .map(|state| (state.execution_id, state.step_key.as_str(), state.status))
                    .collect();
                (read.ticket, found)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    7,
                    vec![
                        (first, "a", StepRunStatus::Succeeded),
                        (first, "join", StepRunStatus::Pending)
                    ]
                ),
                (8, vec![(second, "a", StepRunStatus::Running)]),
                (9, vec![(first, "a", StepRunStatus::Succeeded)]),
            ]
        );
    }
}
