//! Executions as their owners see them: lists (numbered pages or an opaque cursor), one
//! execution with its step runs and every attempt, its persisted log lines, and cancelling.
//! Also the creation of a workflow's execution (`start_workflow_execution`, called by
//! `ExecuteWorkflow`) with the definition snapshot the engine runs from; `snapshot_workflow`
//! and `new_execution` also build the child executions of WORKFLOW steps (`subworkflows`).
//! May call: the store, the audit trail, `proto::json` and the engine (`advance` to start an
//! execution, `cancel`). Never the edges.

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::agents;
use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate;
use super::validate::{Validator, cursor_page_size, page_request, parse_id};
use super::workflows;
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::engine::dag::{self, DagStep};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    self, Agent, CancelRequestOutcome, Execution, ExecutionCursor, ExecutionFilter, ExecutionLog,
    ExecutionLogFilter, ExecutionLogLevel, ExecutionLogSource, ExecutionStatus, ExecutionTrigger,
    MAX_EXECUTION_LOG_PAGE_SIZE, NewExecution, NewExecutionLog, NewStepRun, OwnerScope,
    StepAttempt, StepAttemptStatus, StepRun, StepRunStatus, WorkflowToRun,
};

/// Log lines per page when the caller gives no page size.
const DEFAULT_LOG_PAGE_SIZE: u32 = 100;
/// The longest cancel reason.
const MAX_CANCEL_REASON_CHARS: usize = 1_000;

// ---------------------------------------------------------------------------------------------
// Creating an execution
// ---------------------------------------------------------------------------------------------

/// How an execution of a workflow starts, already validated by the caller.
#[derive(Debug, Clone)]
pub struct ExecutionStart {
    pub trigger: ExecutionTrigger,
    /// A JSON object.
    pub input: Value,
    /// 1 to 10.
    pub priority: i32,
    pub timeout_seconds: Option<i32>,
    pub deployment_id: Option<Uuid>,
    /// The step of a parent execution that starts this one as a sub-workflow (trigger
    /// `SubWorkflow`); `None` for a top-level execution.
    pub parent: Option<store::ParentStep>,
    /// The cron tick this execution fires (trigger `Cron`), claimed in the transaction that
    /// creates the execution (`store::NewExecution::cron_claim`).
    pub cron_claim: Option<store::CronRunClaim>,
}

/// Creates a QUEUED execution of `to_run`'s workflow and one PENDING step run per step, in one
/// transaction, with the definition snapshot the engine runs from. The snapshot is a JSON
/// object of this shape, so later edits of the workflow or its agents never change a run in
/// flight:
///
/// ```json
/// {
///   "workflow": { /* REST JSON of turbocat.v1.Workflow (proto::json::encode), steps included */ },
///   "agents": { "<agentId>": { /* REST JSON of turbocat.v1.Agent, config included */ } }
/// }
/// ```
///
/// `agents` holds exactly the agents the steps use, keyed by id. The execution belongs to the
/// workflow's owner, whoever started it (an administrator, a schedule). Its deadline is its
/// creation time plus `timeout_seconds` (queue time counts). Every agent must still be live
/// (ownership was checked when the workflow was saved and never changes); otherwise the
/// execution is refused with CONFLICT. `to_run` is the workflow read with its agents in one
/// statement (`Store::get_workflow_to_run`).
pub async fn start_workflow_execution(
    context: &AppContext,
    to_run: &WorkflowToRun,
    start: ExecutionStart,
) -> ServiceResult<(Execution, Vec<StepRun>)> {
    let (definition, step_runs) = snapshot_workflow(context.store.as_ref(), to_run).await?;
    let workflow = &to_run.workflow.workflow;
    create_execution(context, workflow.owner_id, Some(workflow.id), definition, step_runs, start)
        .await
}

/// The definition snapshot of an execution of `to_run` (see `start_workflow_execution`)
/// and its step runs, built but not stored. A workflow whose steps are not a valid DAG (it
/// was saved, then its steps' agents changed, or it has none) and a deleted agent are a
/// CONFLICT, the latter naming the step.
pub(crate) async fn snapshot_workflow(
    store: &dyn store::Store,
    to_run: &WorkflowToRun,
) -> ServiceResult<(Value, Vec<NewStepRun>)> {
    let workflow = &to_run.workflow;
    let dag_steps: Vec<DagStep> = workflow.steps.iter().map(DagStep::from).collect();
    if workflow.steps.is_empty() || !dag::validate(&dag_steps).is_empty() {
        return Err(ServiceError::conflict(
            "the workflow's definition is not a valid DAG: fix its steps first",
        ));
    }
    let agents: BTreeMap<Uuid, &Agent> =
        to_run.agents.iter().map(|agent| (agent.id, agent)).collect();
    if let Some(step) = workflow.steps.iter().find(|step| !agents.contains_key(&step.agent_id)) {
        return Err(ServiceError::conflict(format!(
            "step {:?} uses an agent that no longer exists",
            step.step_key
        ))
        .with_metadata("stepKey", &step.step_key));
    }
    let mut agent_messages: Vec<pb::Agent> = Vec::with_capacity(agents.len());
    for agent in agents.into_values() {
        agent_messages.push(agents::agent_to_run(store, agent).await);
    }
    let definition = crate::engine::definition::ExecutionDefinition::snapshot(
        &workflows::workflow_message(workflow),
        &agent_messages,
    );
    let step_runs = workflow
        .steps
        .iter()
        .map(|step| NewStepRun {
            agent_id: Some(step.agent_id),
            ..NewStepRun::new(step.step_key.clone(), step.retry_policy.max_attempts.max(1))
        })
        .collect();
    Ok((definition, step_runs))
}

/// Creates an execution of `owner_id` with its `step_runs` and the `definition` snapshot (see
/// `start_workflow_execution`) through the engine, which starts it in the same commit (see
/// `Engine::create_execution`). The deadline is the creation time plus
/// `start.timeout_seconds` (queue time counts).
pub async fn create_execution(
    context: &AppContext,
    owner_id: Uuid,
    workflow_id: Option<Uuid>,
    definition: Value,
    step_runs: Vec<NewStepRun>,
    start: ExecutionStart,
) -> ServiceResult<(Execution, Vec<StepRun>)> {
    let new_execution = new_execution(owner_id, workflow_id, definition, start, Utc::now());
    context
        .engine
        .create_execution(new_execution, step_runs)
        .await
        .map_err(|error| ServiceError::from_store(error, "execution"))
}

/// The row of a new execution created at `now`: its deadline is `now` plus
/// `start.timeout_seconds`.
pub(crate) fn new_execution(
    owner_id: Uuid,
    workflow_id: Option<Uuid>,
    definition: Value,
    start: ExecutionStart,
    now: chrono::DateTime<Utc>,
) -> NewExecution {
    let mut new_execution = NewExecution::new(owner_id, start.trigger, definition);
    new_execution.workflow_id = workflow_id;
    new_execution.deployment_id = start.deployment_id;
    new_execution.parent = start.parent;
    new_execution.cron_claim = start.cron_claim;
    new_execution.priority = start.priority;
    new_execution.input = start.input;
    new_execution.timeout_seconds = start.timeout_seconds;
    new_execution.deadline_at =
        start.timeout_seconds.map(|seconds| now + chrono::Duration::seconds(i64::from(seconds)));
    new_execution
}

pub(super) fn seconds_duration(seconds: i32) -> prost_types::Duration {
    prost_types::Duration { seconds: i64::from(seconds), nanos: 0 }
}

// ---------------------------------------------------------------------------------------------
// Store rows -> proto messages
// ---------------------------------------------------------------------------------------------

fn execution_status(status: ExecutionStatus) -> pb::ExecutionStatus {
    match status {
        ExecutionStatus::Queued => pb::ExecutionStatus::Queued,
        ExecutionStatus::Running => pb::ExecutionStatus::Running,
        ExecutionStatus::Succeeded => pb::ExecutionStatus::Succeeded,
        ExecutionStatus::Failed => pb::ExecutionStatus::Failed,
        ExecutionStatus::Cancelled => pb::ExecutionStatus::Cancelled,
        ExecutionStatus::TimedOut => pb::ExecutionStatus::TimedOut,
    }
}

/// A proto status filter as the store knows it: `Ok(None)` for UNSPECIFIED (no filter),
/// `Err(())` for a number the contract does not define.
fn execution_status_filter(number: i32) -> Result<Option<ExecutionStatus>, ()> {
    match pb::ExecutionStatus::try_from(number).map_err(|_| ())? {
        pb::ExecutionStatus::Unspecified => Ok(None),
        pb::ExecutionStatus::Queued => Ok(Some(ExecutionStatus::Queued)),
        pb::ExecutionStatus::Running => Ok(Some(ExecutionStatus::Running)),
        pb::ExecutionStatus::Succeeded => Ok(Some(ExecutionStatus::Succeeded)),
        pb::ExecutionStatus::Failed => Ok(Some(ExecutionStatus::Failed)),
        pb::ExecutionStatus::Cancelled => Ok(Some(ExecutionStatus::Cancelled)),
        pb::ExecutionStatus::TimedOut => Ok(Some(ExecutionStatus::TimedOut)),
    }
}

fn execution_trigger(trigger: ExecutionTrigger) -> pb::ExecutionTrigger {
    match trigger {
        ExecutionTrigger::Manual | ExecutionTrigger::Api => pb::ExecutionTrigger::Manual,
        ExecutionTrigger::Cron => pb::ExecutionTrigger::Cron,
        ExecutionTrigger::Webhook => pb::ExecutionTrigger::Webhook,
        ExecutionTrigger::SubWorkflow => pb::ExecutionTrigger::SubWorkflow,
    }
}

fn step_run_status(status: StepRunStatus) -> pb::StepRunStatus {
    match status {
        StepRunStatus::Pending => pb::StepRunStatus::Pending,
        StepRunStatus::Queued => pb::StepRunStatus::Queued,
        StepRunStatus::Assigned => pb::StepRunStatus::Assigned,
        StepRunStatus::Running => pb::StepRunStatus::Running,
        StepRunStatus::Succeeded => pb::StepRunStatus::Succeeded,
        StepRunStatus::Failed => pb::StepRunStatus::Failed,
        StepRunStatus::Cancelled => pb::StepRunStatus::Cancelled,
        StepRunStatus::TimedOut => pb::StepRunStatus::TimedOut,
    }
}

/// An attempt's status; an attempt whose runner lost its lease shows as FAILED (its error
/// says why, and the step went on with the next attempt).
fn step_attempt_status(status: StepAttemptStatus) -> pb::StepRunStatus {
    match status {
        StepAttemptStatus::Pending => pb::StepRunStatus::Pending,
        StepAttemptStatus::Queued => pb::StepRunStatus::Queued,
        StepAttemptStatus::Assigned => pb::StepRunStatus::Assigned,
        StepAttemptStatus::Running => pb::StepRunStatus::Running,
        StepAttemptStatus::Succeeded => pb::StepRunStatus::Succeeded,
        StepAttemptStatus::Failed => pb::StepRunStatus::Failed,
        StepAttemptStatus::LeaseLost => pb::StepRunStatus::LeaseLost,
        StepAttemptStatus::Cancelled => pb::StepRunStatus::Cancelled,
        StepAttemptStatus::TimedOut => pb::StepRunStatus::TimedOut,
    }
}

fn optional_value(value: Option<&Value>) -> Option<prost_types::Value> {
    value.map(wkt::json_to_value)
}

fn optional_id(id: Option<Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

/// An execution as the API shows it, with the given step runs (empty in lists).
pub fn execution_message(execution: &Execution, step_runs: Vec<pb::StepRun>) -> pb::Execution {
    pb::Execution {
        id: execution.id.to_string(),
        owner_id: execution.owner_id.to_string(),
        workflow_id: optional_id(execution.workflow_id),
        deployment_id: optional_id(execution.deployment_id),
        parent_execution_id: optional_id(execution.parent_execution_id),
        status: execution_status(execution.status).into(),
        trigger: execution_trigger(execution.trigger).into(),
        priority: execution.priority,
        input: Some(wkt::json_to_value(&execution.input)),
        output: optional_value(execution.output.as_ref()),
        error: execution.error.clone().unwrap_or_default(),
        timeout: execution.timeout_seconds.map(seconds_duration),
        created_at: Some(wkt::timestamp(execution.created_at)),
        started_at: wkt::optional_timestamp(execution.started_at),
        finished_at: wkt::optional_timestamp(execution.finished_at),
        updated_at: Some(wkt::timestamp(execution.updated_at)),
        step_runs,
    }
}

pub(super) fn step_run_message(step_run: &StepRun, attempts: &[StepAttempt]) -> pb::StepRun {
    pb::StepRun {
        id: step_run.id.to_string(),
        execution_id: step_run.execution_id.to_string(),
        step_key: step_run.step_key.clone(),
        agent_id: optional_id(step_run.agent_id),
        status: step_run_status(step_run.status).into(),
        attempt: step_run.attempt,
        max_attempts: step_run.max_attempts,
        infra_reassignments: step_run.infra_reassignments,
        input: optional_value(step_run.input.as_ref()),
        output: optional_value(step_run.output.as_ref()),
        error: step_run.error.clone().unwrap_or_default(),
        runner_id: step_run.runner_id.clone().unwrap_or_default(),
        queued_at: wkt::optional_timestamp(step_run.queued_at),
        started_at: wkt::optional_timestamp(step_run.started_at),
        finished_at: wkt::optional_timestamp(step_run.finished_at),
        updated_at: Some(wkt::timestamp(step_run.updated_at)),
        attempts: attempts.iter().map(attempt_message).collect(),
    }
}

fn attempt_message(attempt: &StepAttempt) -> pb::StepAttempt {
    pb::StepAttempt {
        attempt: attempt.attempt,
        status: step_attempt_status(attempt.status).into(),
        runner_id: attempt.runner_id.clone().unwrap_or_default(),
        input: optional_value(attempt.input.as_ref()),
        output: optional_value(attempt.output.as_ref()),
        error: attempt.error.clone().unwrap_or_default(),
        retryable: attempt.retryable.unwrap_or(false),
        queued_at: wkt::optional_timestamp(attempt.queued_at),
        assigned_at: wkt::optional_timestamp(attempt.assigned_at),
        started_at: wkt::optional_timestamp(attempt.started_at),
        finished_at: wkt::optional_timestamp(attempt.finished_at),
    }
}

/// An execution with its step runs but without their attempts (what creation returns).
pub fn execution_with_step_runs(execution: &Execution, step_runs: &[StepRun]) -> pb::Execution {
    let step_runs = step_runs.iter().map(|step_run| step_run_message(step_run, &[])).collect();
    execution_message(execution, step_runs)
}

fn log_level(level: ExecutionLogLevel) -> pb::LogLevel {
    match level {
        ExecutionLogLevel::Debug => pb::LogLevel::Debug,
        ExecutionLogLevel::Info => pb::LogLevel::Info,
        ExecutionLogLevel::Warn => pb::LogLevel::Warn,
        ExecutionLogLevel::Error => pb::LogLevel::Error,
    }
}

fn log_source(source: ExecutionLogSource) -> pb::LogSource {
    match source {
        ExecutionLogSource::System => pb::LogSource::System,
        ExecutionLogSource::Stdout => pb::LogSource::Stdout,
        ExecutionLogSource::Stderr => pb::LogSource::Stderr,
        ExecutionLogSource::Runner => pb::LogSource::Runner,
    }
}

pub(super) fn log_message(
    log: &ExecutionLog,
    step_keys: &HashMap<Uuid, String>,
) -> pb::ExecutionLog {
    pb::ExecutionLog {
        id: log.id,
        execution_id: log.execution_id.to_string(),
        step_run_id: optional_id(log.step_run_id),
        step_key: log
            .step_run_id
            .and_then(|step_run_id| step_keys.get(&step_run_id).cloned())
            .unwrap_or_default(),
        attempt: log.attempt.unwrap_or(0),
        level: log_level(log.level).into(),
        source: log_source(log.source).into(),
        message: log.message.clone(),
        fields: log.fields.as_ref().map(wkt::json_object_to_struct),
        created_at: Some(wkt::timestamp(log.created_at)),
    }
}

// ---------------------------------------------------------------------------------------------
// Listing
// ---------------------------------------------------------------------------------------------

/// The paging fields of an execution list request: numbered pages, or the rows after
/// `cursor` when it is given (`page` must then be absent).
pub(super) struct ExecutionListRequest<'a> {
    pub page: Option<i32>,
    pub page_size: Option<i32>,
    pub cursor: &'a str,
}

/// How one page of an execution list is read: a numbered page (answered with the total, and
/// a cursor to continue from when more rows exist) or the rows after a cursor (answered with
/// `page` 0 and no total: the cursor mode never counts, so it costs the same however deep).
pub(super) enum ExecutionPaging {
    Numbered(store::PageRequest),
    Cursor { after: Option<ExecutionCursor>, limit: u32 },
}

/// Reads the paging of an execution list, adding bad fields to `validator`; run the page
/// with `list_page` once the validator finished clean.
pub(super) fn read_paging(
    validator: &mut Validator,
    request: &ExecutionListRequest<'_>,
) -> ExecutionPaging {
    let cursor = request.cursor.trim();
    if cursor.is_empty() {
        return ExecutionPaging::Numbered(page_request(validator, request.page, request.page_size));
    }
    if request.page.is_some() {
        validator.error("page", "cannot be combined with cursor");
    }
    let limit =
        cursor_page_size(validator, request.page_size, store::PageRequest::DEFAULT_PAGE_SIZE);
    let after = ExecutionCursor::decode(cursor);
    if after.is_none() {
        validator.error("cursor", "is not a cursor this API gave out");
    }
    ExecutionPaging::Cursor { after, limit }
}

/// Reads an execution status filter into `validator`.
pub(super) fn read_status_filter(
    validator: &mut Validator,
    number: i32,
) -> Option<ExecutionStatus> {
    match execution_status_filter(number) {
        Ok(status) => status,
        Err(()) => {
            validator.error(
                "status",
                "must be QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED or TIMED_OUT",
            );
            None
        }
    }
}

/// Runs a validated execution list.
pub(super) async fn list_page(
    context: &AppContext,
    filter: ExecutionFilter,
    paging: ExecutionPaging,
) -> ServiceResult<(Vec<pb::Execution>, pb::Pagination)> {
    match paging {
        ExecutionPaging::Numbered(page) => {
            let found = context
                .store
                .list_executions(filter, page)
                .await
                .map_err(|error| ServiceError::from_store(error, "execution"))?;
            let mut pagination = convert::pagination(page, found.total);
            let shown = i64::from(page.page) * i64::from(page.page_size);
            if let Some(last) = found.items.last().filter(|_| shown < found.total) {
                pagination.next_cursor = ExecutionCursor::after(last).encode();
            }
            let executions = found
                .items
                .iter()
                .map(|execution| execution_message(execution, Vec::new()))
                .collect();
            Ok((executions, pagination))
        }
        ExecutionPaging::Cursor { after, limit } => {
            let found = context
                .store
                .list_executions_by_cursor(filter, after, limit)
                .await
                .map_err(|error| ServiceError::from_store(error, "execution"))?;
            let pagination = pb::Pagination {
                page: 0,
                page_size: i32::try_from(limit).unwrap_or(i32::MAX),
                total: 0,
                total_pages: 0,
                next_cursor: found.next_cursor.unwrap_or_default(),
            };
            let executions = found
                .items
                .iter()
                .map(|execution| execution_message(execution, Vec::new()))
                .collect();
            Ok((executions, pagination))
        }
    }
}

/// The caller's executions, newest first.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_executions(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListExecutionsRequest,
) -> ServiceResult<pb::ListExecutionsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let paging = read_paging(
        &mut validator,
        &ExecutionListRequest {
            page: request.page,
            page_size: request.page_size,
            cursor: &request.cursor,
        },
    );
    let mut filter = ExecutionFilter::new(caller.owner_scope());
    filter.status = read_status_filter(&mut validator, request.status);
    filter.workflow_id = validate::optional_id(&mut validator, "workflowId", &request.workflow_id);
    filter.deployment_id =
        validate::optional_id(&mut validator, "deploymentId", &request.deployment_id);
    if let Some(after) = &request.created_after {
        filter.created_from = wkt::time_from_timestamp(after);
        if filter.created_from.is_none() {
            validator.error("createdAfter", "is out of range");
        }
    }
    if let Some(before) = &request.created_before {
        filter.created_before = wkt::time_from_timestamp(before);
        if filter.created_before.is_none() {
            validator.error("createdBefore", "is out of range");
        }
    }
    validator.finish()?;
    let (executions, pagination) = list_page(context, filter, paging).await?;
    Ok(pb::ListExecutionsResponse { executions, pagination: Some(pagination) })
}

// ---------------------------------------------------------------------------------------------
// One execution
// ---------------------------------------------------------------------------------------------

/// An execution with its step runs, each with every attempt.
async fn load_execution_detail(
    context: &AppContext,
    scope: OwnerScope,
    execution_id: Uuid,
) -> ServiceResult<pb::Execution> {
    let (execution, step_runs, attempts) = context
        .store
        .get_execution_detail(scope, execution_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "execution"))?;
    let mut by_step: HashMap<Uuid, Vec<StepAttempt>> = HashMap::new();
    for attempt in attempts {
        by_step.entry(attempt.step_run_id).or_default().push(attempt);
    }
    let messages = step_runs
        .iter()
        .map(|step_run| {
            step_run_message(step_run, by_step.get(&step_run.id).map_or(&[][..], Vec::as_slice))
        })
        .collect();
    Ok(execution_message(&execution, messages))
}

/// One execution with its step runs and their attempts.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_execution(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetExecutionRequest,
) -> ServiceResult<pb::GetExecutionResponse> {
    caller.require_user_access(Access::Read)?;
    let execution_id = parse_id("executionId", &request.execution_id)?;
    let execution = load_execution_detail(context, caller.owner_scope(), execution_id).await?;
    Ok(pb::GetExecutionResponse { execution: Some(execution) })
}

/// Persisted log lines of an execution, oldest first; the cursor is the last line's id.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_execution_logs(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListExecutionLogsRequest,
) -> ServiceResult<pb::ListExecutionLogsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let execution_id = validate::optional_id(&mut validator, "executionId", &request.execution_id);
    if request.execution_id.trim().is_empty() {
        validator.error("executionId", "is required");
    }
    let step_run_id = validate::optional_id(&mut validator, "stepRunId", &request.step_run_id);
    let limit = match request.page_size {
        None => DEFAULT_LOG_PAGE_SIZE,
        Some(size) => match u32::try_from(size) {
            Ok(size) if (1..=MAX_EXECUTION_LOG_PAGE_SIZE).contains(&size) => size,
            _ => {
                validator.error(
                    "pageSize",
                    format!("must be between 1 and {MAX_EXECUTION_LOG_PAGE_SIZE}"),
                );
                DEFAULT_LOG_PAGE_SIZE
            }
        },
    };
    let minimum_level = match pb::LogLevel::try_from(request.min_level) {
        Ok(pb::LogLevel::Unspecified) => None,
        Ok(pb::LogLevel::Debug) => Some(ExecutionLogLevel::Debug),
        Ok(pb::LogLevel::Info) => Some(ExecutionLogLevel::Info),
        Ok(pb::LogLevel::Warn) => Some(ExecutionLogLevel::Warn),
        Ok(pb::LogLevel::Error) => Some(ExecutionLogLevel::Error),
        Err(_) => {
            validator.error("minLevel", "must be DEBUG, INFO, WARN or ERROR");
            None
        }
    };
    let cursor = request.cursor.trim();
    let after_id = if cursor.is_empty() {
        None
    } else {
        match cursor.parse::<i64>() {
            Ok(id) if id >= 0 => Some(id),
            _ => {
                validator.error("cursor", "is not a cursor this API gave out");
                None
            }
        }
    };
    validator.finish()?;
    let Some(execution_id) = execution_id else {
        return Err(ServiceError::invalid_field("executionId", "is required"));
    };
    let scope = caller.owner_scope();
    let (_, step_runs) = context
        .store
        .get_execution_with_steps(scope, execution_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "execution"))?;
    let step_keys: HashMap<Uuid, String> =
        step_runs.into_iter().map(|step_run| (step_run.id, step_run.step_key)).collect();
    let found = context
        .store
        .list_execution_logs(
            scope,
            execution_id,
            ExecutionLogFilter { step_run_id, minimum_level, after_id, limit },
        )
        .await
        .map_err(|error| ServiceError::from_store(error, "execution"))?;
    Ok(pb::ListExecutionLogsResponse {
        logs: found.items.iter().map(|log| log_message(log, &step_keys)).collect(),
        pagination: Some(pb::Pagination {
            page: 0,
            page_size: i32::try_from(limit).unwrap_or(i32::MAX),
            total: 0,
            total_pages: 0,
            next_cursor: found.next_cursor.unwrap_or_default(),
        }),
    })
}

// ---------------------------------------------------------------------------------------------
// Cancelling
// ---------------------------------------------------------------------------------------------

/// Records a cancel request. An execution with no step held by a runner is finished here:
/// its unfinished steps are CANCELLED and it ends CANCELLED with the reason as its error. One
/// with a step on a runner is left to the engine, which cancels that step and finishes it.
/// An execution that already finished is a CONFLICT naming its status.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn cancel_execution(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CancelExecutionRequest,
) -> ServiceResult<pb::CancelExecutionResponse> {
    caller.require_user_access(Access::Write)?;
    let mut validator = Validator::new();
    let execution_id = validate::optional_id(&mut validator, "executionId", &request.execution_id);
    if request.execution_id.trim().is_empty() {
        validator.error("executionId", "is required");
    }
    validator.max_chars("reason", &request.reason, MAX_CANCEL_REASON_CHARS);
    validator.finish()?;
    let Some(execution_id) = execution_id else {
        return Err(ServiceError::invalid_field("executionId", "is required"));
    };
    let scope = caller.owner_scope();
    let now = Utc::now();
    let outcome = context
        .store
        .request_cancel(scope, execution_id, now)
        .await
        .map_err(|error| ServiceError::from_store(error, "execution"))?;
    if let CancelRequestOutcome::AlreadyFinished(status) = outcome {
        return Err(ServiceError::conflict(format!(
            "the execution already finished: its status is {}",
            status.as_str()
        ))
        .with_metadata("status", status.as_str()));
    }
    let reason = match request.reason.trim() {
        "" => "cancelled by the user".to_owned(),
        given => format!("cancelled by the user: {given}"),
    };
    // The engine cancels the unfinished steps, tells the runners holding any, and ends the
    // execution CANCELLED; if this fails the reconciler finishes it from the recorded request.
    let finished_here = match context.engine.cancel(execution_id, &reason).await {
        Ok(finished) => finished,
        Err(error) => {
            tracing::warn!(%error, %execution_id, "cancel recorded; the reconciler will finish it");
            false
        }
    };
    if outcome == CancelRequestOutcome::Recorded {
        write_cancel_log(context, execution_id, &reason, finished_here).await;
        audit::record(
            context,
            Actor::Caller(caller),
            client,
            AuditEvent::success("execution.cancel", "execution", Some(execution_id.to_string()))
                .with_metadata(
                    json!({ "reason": request.reason.trim(), "finished": finished_here }),
                ),
        )
        .await;
    }
    let execution = load_execution_detail(context, scope, execution_id).await?;
    Ok(pb::CancelExecutionResponse { execution: Some(execution) })
}

async fn write_cancel_log(context: &AppContext, execution_id: Uuid, reason: &str, finished: bool) {
    let message = if finished {
        format!("execution {reason}")
    } else {
        format!("cancel requested ({reason}); waiting for the running steps to stop")
    };
    let line = NewExecutionLog {
        execution_id,
        step_run_id: None,
        attempt: None,
        level: ExecutionLogLevel::Info,
        source: ExecutionLogSource::System,
        message,
        fields: None,
        created_at: Utc::now(),
    };
    if let Err(error) = context.store.append_execution_logs(vec![line]).await {
        tracing::error!(%error, %execution_id, "could not write the cancel log line");
    }
}
