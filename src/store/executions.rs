//! Store area: executions. Owns executions, step runs, step attempts and execution logs: the
//! durable state the execution engine runs from (ARCHITECTURE.md principles 2 and 4).
//! May call: sqlx and `super` (the Store seam). Knows nothing of the engine, queue or bus.
//!
//! How the engine uses it:
//! - Every state change is one conditional UPDATE (a compare-and-set on status and, for step
//!   runs, on the attempt number), committed before the engine acts on it. A call whose
//!   condition does not hold changes nothing and says so (`false`, `Rejected`, `Stale`,
//!   `Duplicate`), so late, duplicate or concurrent reports are harmless.
//! - A step run's `attempt` is its fencing token. Lease loss and user retries both start a new
//!   attempt; `infra_reassignments` counts the former so they never eat the user's retry budget.
//! - A step run's current attempt is the step run itself: a transition within an attempt is
//!   one `UPDATE step_runs … RETURNING` and writes nothing else. `step_attempts` keeps the
//!   attempts that are over, one final row each, written by the transitions that start the
//!   next attempt (`schedule_retry`, `requeue_after_lease_loss`) in their transaction; readers
//!   take those rows and the step run's current attempt together (migration 13).
//! - Retry backoff: `schedule_retry` puts the step back to `PENDING` with `next_attempt_at`.
//!   `list_ready_step_runs` returns it once the backoff is over and `mark_step_queued` moves it
//!   to `QUEUED` (committed) before it is pushed to the queue. `QUEUED` therefore always means
//!   "in the queue, or to be put back there by the reconciler".
//! - Engine-side calls (transitions, ready/expired queries) are unscoped and see soft-deleted
//!   executions too: hiding an execution does not stop it (the service cancels it first).
//!   User-facing reads take an `OwnerScope` and never return soft-deleted executions.

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::batch::BatchRows;
use super::{
    CountKey, CronRunClaim, CursorPage, Dialect, Listed, OwnerScope, Page, PageRequest, PagedList,
    SortOrder, StoreError, StoreResult, fetch_page, push_visible_rows,
};

/// The largest page `list_execution_logs` returns.
pub const MAX_EXECUTION_LOG_PAGE_SIZE: u32 = 1000;

/// Rows per INSERT statement in batch inserts (well under both backends' bind limits).
const INSERT_BATCH_ROWS: usize = 500;

/// The most writes one batch statement takes: the transitions `mark_steps_queued`,
/// `assign_steps`, `mark_steps_running`… apply at once, the rows `append_audit_logs` inserts.
pub const MAX_WRITE_BATCH: usize = 64;

/// Times are stored with microsecond precision (PostgreSQL's), so both backends hold and return
/// exactly the same values.
fn stored_time(at: DateTime<Utc>) -> DateTime<Utc> {
    at.trunc_subsecs(6)
}

// ---------------------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// What started an execution.
    pub enum ExecutionTrigger {
        Manual => "MANUAL",
        Cron => "CRON",
        Webhook => "WEBHOOK",
        /// Started by a WORKFLOW-type step of a parent execution (then it has a parent).
        SubWorkflow => "SUB_WORKFLOW",
        Api => "API",
    }
}

text_enum! {
    /// The lifecycle of an execution: QUEUED -> RUNNING -> one of the four final statuses.
    pub enum ExecutionStatus {
        Queued => "QUEUED",
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
        TimedOut => "TIMED_OUT",
    }
}

impl ExecutionStatus {
    /// The statuses of an execution that has not finished yet.
    pub const UNFINISHED: &'static [ExecutionStatus] =
        &[ExecutionStatus::Queued, ExecutionStatus::Running];

    /// Whether this is a final status (nothing moves it any more).
    pub fn is_finished(self) -> bool {
        !Self::UNFINISHED.contains(&self)
    }
}

text_enum! {
    /// The lifecycle of a step run's current attempt.
    pub enum StepRunStatus {
        /// Waiting for its dependencies, or (with `next_attempt_at`) for a retry's backoff.
        Pending => "PENDING",
        /// Committed as ready: in the queue, or to be put back there by the reconciler.
        Queued => "QUEUED",
        /// Sent to a runner under a lease.
        Assigned => "ASSIGNED",
        /// The runner reported that it started.
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
        TimedOut => "TIMED_OUT",
    }
}

impl StepRunStatus {
    /// The statuses of a step run whose current attempt has not finished.
    pub const UNFINISHED: &'static [StepRunStatus] = &[
        StepRunStatus::Pending,
        StepRunStatus::Queued,
        StepRunStatus::Assigned,
        StepRunStatus::Running,
    ];

    /// Whether the current attempt reached a final status.
    pub fn is_finished(self) -> bool {
        !Self::UNFINISHED.contains(&self)
    }
}

text_enum! {
    /// The status of one attempt: a step run status, or `LeaseLost` for an attempt whose runner
    /// lost its lease (the step went on with a new attempt).
    pub enum StepAttemptStatus {
        Pending => "PENDING",
        Queued => "QUEUED",
        Assigned => "ASSIGNED",
        Running => "RUNNING",
        Succeeded => "SUCCEEDED",
        Failed => "FAILED",
        Cancelled => "CANCELLED",
        TimedOut => "TIMED_OUT",
        LeaseLost => "LEASE_LOST",
    }
}

impl From<StepRunStatus> for StepAttemptStatus {
    fn from(status: StepRunStatus) -> Self {
        match status {
            StepRunStatus::Pending => StepAttemptStatus::Pending,
            StepRunStatus::Queued => StepAttemptStatus::Queued,
            StepRunStatus::Assigned => StepAttemptStatus::Assigned,
            StepRunStatus::Running => StepAttemptStatus::Running,
            StepRunStatus::Succeeded => StepAttemptStatus::Succeeded,
            StepRunStatus::Failed => StepAttemptStatus::Failed,
            StepRunStatus::Cancelled => StepAttemptStatus::Cancelled,
            StepRunStatus::TimedOut => StepAttemptStatus::TimedOut,
        }
    }
}

text_enum! {
    /// The severity of a log line, from least to most severe.
    pub enum ExecutionLogLevel {
        Debug => "DEBUG",
        Info => "INFO",
        Warn => "WARN",
        Error => "ERROR",
    }
}

impl ExecutionLogLevel {
    /// This level and every more severe one.
    pub fn and_more_severe(self) -> &'static [ExecutionLogLevel] {
        let position = Self::ALL.iter().position(|level| *level == self).unwrap_or(0);
        &Self::ALL[position..]
    }
}

text_enum! {
    /// Where a log line came from.
    pub enum ExecutionLogSource {
        /// The engine itself (transitions, retries, timeouts).
        System => "SYSTEM",
        Stdout => "STDOUT",
        Stderr => "STDERR",
        /// The runner process (not the user's code).
        Runner => "RUNNER",
    }
}

// ---------------------------------------------------------------------------------------------
// Executions
// ---------------------------------------------------------------------------------------------

/// One run of a workflow (or of a single agent), with its definition snapshot.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Execution {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub parent_execution_id: Option<Uuid>,
    pub parent_step_run_id: Option<Uuid>,
    /// The attempt of the parent step this sub-workflow execution belongs to.
    pub parent_attempt: Option<i32>,
    /// 0 for a top-level execution, the parent's depth + 1 for a sub-workflow.
    pub depth: i32,
    pub trigger: ExecutionTrigger,
    pub status: ExecutionStatus,
    /// 1 (lowest) to 10 (highest).
    pub priority: i32,
    #[sqlx(json)]
    pub input: Value,
    #[sqlx(json(nullable))]
    pub output: Option<Value>,
    pub error: Option<String>,
    /// The workflow and agent snapshots the engine runs from (never the live workflow).
    #[sqlx(json)]
    pub definition: Value,
    pub timeout_seconds: Option<i32>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The step (and its attempt) of a parent execution that starts a sub-workflow execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentStep {
    pub execution_id: Uuid,
    pub step_run_id: Uuid,
    pub attempt: i32,
}

/// The fields of a new execution; it starts `QUEUED` (or `RUNNING`, see `running`), at depth 0
/// or its parent's depth + 1.
#[derive(Debug, Clone, PartialEq)]
pub struct NewExecution {
    /// Made by `new` (a UUIDv7), so that the engine can hold runner slots for its first steps
    /// before the creation commits.
    pub id: Uuid,
    pub owner_id: Uuid,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    /// Set exactly when `trigger` is `SubWorkflow`; the step run must belong to that execution.
    pub parent: Option<ParentStep>,
    pub trigger: ExecutionTrigger,
    /// 1 (lowest) to 10 (highest).
    pub priority: i32,
    pub input: Value,
    /// Must be a JSON object.
    pub definition: Value,
    pub timeout_seconds: Option<i32>,
    /// Decided by the caller (for example created_at + timeout, capped by the parent's deadline).
    pub deadline_at: Option<DateTime<Utc>>,
    /// The cron tick this execution fires, claimed in the transaction that creates it: the
    /// execution exists exactly when the claim won, so a replica that dies mid-tick leaves the
    /// tick to another (see `CronRunClaim`).
    pub cron_claim: Option<CronRunClaim>,
    /// Starts `RUNNING` (started at its creation) instead of `QUEUED`: the engine moves its
    /// first steps on in the same commit (`NewStepRun::start`).
    pub running: bool,
}

impl NewExecution {
    /// Default priority of executions that do not ask for one.
    pub const DEFAULT_PRIORITY: i32 = 5;

    /// A top-level execution with empty input, default priority and no timeout.
    pub fn new(owner_id: Uuid, trigger: ExecutionTrigger, definition: Value) -> Self {
        Self {
            id: Uuid::now_v7(),
            owner_id,
            workflow_id: None,
            deployment_id: None,
            parent: None,
            trigger,
            priority: Self::DEFAULT_PRIORITY,
            input: Value::Object(serde_json::Map::new()),
            definition,
            timeout_seconds: None,
            deadline_at: None,
            cron_claim: None,
            running: false,
        }
    }
}

/// The change `transition_execution` applies when the status matches. `None` fields keep their
/// value; `started_at` is only ever set once (the first start wins).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionChange {
    pub to: ExecutionStatus,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    /// The time of the change (`updated_at`).
    pub at: DateTime<Utc>,
    /// Applies only when every step run of the execution SUCCEEDED and no cancel was
    /// requested: how the engine finishes an execution without reading its steps.
    pub only_when_every_step_succeeded: bool,
}

impl ExecutionChange {
    /// A bare status change at `at`; fill the other fields with struct update syntax.
    pub fn new(to: ExecutionStatus, at: DateTime<Utc>) -> Self {
        Self {
            to,
            output: None,
            error: None,
            started_at: None,
            finished_at: None,
            deadline_at: None,
            at,
            only_when_every_step_succeeded: false,
        }
    }
}

/// What `request_cancel` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRequestOutcome {
    /// The request is now recorded (`cancel_requested_at` set, version bumped).
    Recorded,
    /// A cancel had already been requested; the first request time stands.
    AlreadyRequested,
    /// The execution had already finished with this status; nothing changed.
    AlreadyFinished(ExecutionStatus),
}

/// Filters of `list_executions`; results are always newest first (`created_at`, then `id`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionFilter {
    pub scope: OwnerScope,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
    pub status: Option<ExecutionStatus>,
    pub parent_execution_id: Option<Uuid>,
    /// Inclusive lower bound of `created_at`.
    pub created_from: Option<DateTime<Utc>>,
    /// Exclusive upper bound of `created_at`.
    pub created_before: Option<DateTime<Utc>>,
}

impl ExecutionFilter {
    /// Every execution visible in `scope`.
    pub fn new(scope: OwnerScope) -> Self {
        Self {
            scope,
            workflow_id: None,
            deployment_id: None,
            status: None,
            parent_execution_id: None,
            created_from: None,
            created_before: None,
        }
    }
}

/// A position in the newest-first execution list: the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutionCursor {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

impl ExecutionCursor {
    /// The cursor just after `execution` in the newest-first order.
    pub fn after(execution: &Execution) -> Self {
        Self { created_at: execution.created_at, id: execution.id }
    }

    /// The opaque text form handed to clients (URL-safe base64).
    pub fn encode(&self) -> String {
        let plain = format!("{}:{}", self.created_at.timestamp_micros(), self.id.simple());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
    }

    /// Parses a cursor made by `encode`; `None` when it is malformed (a client error).
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).ok()?;
        let plain = String::from_utf8(bytes).ok()?;
        let (micros, id) = plain.split_once(':')?;
        let created_at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
        let id = Uuid::parse_str(id).ok()?;
        Some(Self { created_at, id })
    }
}

// ---------------------------------------------------------------------------------------------
// Step runs and attempts
// ---------------------------------------------------------------------------------------------

/// The steps of one execution asked about by key (`list_step_run_states_by_keys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepKeys {
    pub execution_id: Uuid,
    pub step_keys: Vec<String>,
}

/// Where one step run stands (`list_step_run_states_by_keys`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StepRunState {
    pub execution_id: Uuid,
    pub step_key: String,
    pub status: StepRunStatus,
    /// A failed attempt waits for its retry (`next_attempt_at` is set).
    pub waiting_for_retry: bool,
}

/// One step of an execution, with the state of its current attempt. Serializable because the
/// engine publishes every transition's row to watchers.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct StepRun {
    pub id: Uuid,
    pub execution_id: Uuid,
    /// The step's key in the workflow definition, unique per execution.
    pub step_key: String,
    pub agent_id: Option<Uuid>,
    pub status: StepRunStatus,
    /// The current attempt (from 1): the fencing token of every transition.
    pub attempt: i32,
    /// Attempts the user's retry policy allows (infrastructure reassignments do not count).
    pub max_attempts: i32,
    /// Attempts started because a runner lost its lease.
    pub infra_reassignments: i32,
    /// Resolved when the step is queued.
    #[sqlx(json(nullable))]
    pub input: Option<Value>,
    #[sqlx(json(nullable))]
    pub output: Option<Value>,
    pub error: Option<String>,
    pub error_retryable: Option<bool>,
    pub runner_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// When a retry waiting in `PENDING` becomes ready.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub queued_at: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Bumped by every transition.
    pub version: i64,
}

impl StepRun {
    /// The fence for transitions of the current attempt.
    pub fn attempt_key(&self) -> AttemptKey {
        AttemptKey { step_run_id: self.id, attempt: self.attempt }
    }

    /// Attempts that count against `max_attempts`, the current one included: lease losses are
    /// excluded. A retry is allowed while this is below `max_attempts`.
    pub fn user_attempts_used(&self) -> i32 {
        self.attempt - self.infra_reassignments
    }
}

/// A step run to create with its execution: it starts `PENDING` at attempt 1 (or as `start`
/// says).
#[derive(Debug, Clone, PartialEq)]
pub struct NewStepRun {
    /// Made by `new` (a UUIDv7: step runs made in order list in that order).
    pub id: Uuid,
    pub step_key: String,
    pub agent_id: Option<Uuid>,
    /// At least 1.
    pub max_attempts: i32,
    /// Usually `None`: the input is resolved when the step is queued.
    pub input: Option<Value>,
    /// Set by the engine for a first step it moves on in its execution's creation commit
    /// (of an execution created `running`): the step starts `QUEUED` at the creation time,
    /// or `ASSIGNED` to a runner then.
    pub start: Option<StepStart>,
}

impl NewStepRun {
    /// A step without agent or input.
    pub fn new(step_key: impl Into<String>, max_attempts: i32) -> Self {
        Self {
            id: Uuid::now_v7(),
            step_key: step_key.into(),
            agent_id: None,
            max_attempts,
            input: None,
            start: None,
        }
    }

    /// PENDING, or as `start` says.
    fn initial_status(&self) -> StepRunStatus {
        match &self.start {
            None => StepRunStatus::Pending,
            Some(StepStart { runner_id: None, .. }) => StepRunStatus::Queued,
            Some(StepStart { runner_id: Some(_), .. }) => StepRunStatus::Assigned,
        }
    }

    /// 1, or with `start` one more for each transition it stands for, as if each had been
    /// committed (2 for QUEUED, 3 for ASSIGNED).
    fn initial_version(&self) -> i64 {
        match self.initial_status() {
            StepRunStatus::Queued => 2,
            StepRunStatus::Assigned => 3,
            _ => 1,
        }
    }

    /// The runner `start` assigns it to.
    fn runner_id(&self) -> Option<&str> {
        self.start.as_ref().and_then(|start| start.runner_id.as_deref())
    }
}

/// How a step run starts when its execution's creation moves it on: with its resolved input,
/// `QUEUED`, or `ASSIGNED` to `runner_id` until `lease_expires_at` when both are set. Its
/// `queued_at` (and `assigned_at`) is the creation time, and its `version` counts the
/// transitions it stands for (2 for QUEUED, 3 for ASSIGNED), as if each had been committed.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStart {
    pub input: Option<Value>,
    pub runner_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
}

/// Identifies one attempt of one step run: the fence every step transition checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptKey {
    pub step_run_id: Uuid,
    pub attempt: i32,
}

/// The permanent record of one attempt of a step run.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StepAttempt {
    pub step_run_id: Uuid,
    pub attempt: i32,
    pub status: StepAttemptStatus,
    pub runner_id: Option<String>,
    #[sqlx(json(nullable))]
    pub input: Option<Value>,
    #[sqlx(json(nullable))]
    pub output: Option<Value>,
    pub error: Option<String>,
    pub retryable: Option<bool>,
    pub queued_at: Option<DateTime<Utc>>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The assignment of a queued step to a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepAssignment {
    pub runner_id: String,
    pub lease_expires_at: DateTime<Utc>,
    pub assigned_at: DateTime<Utc>,
}

/// The result of an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Reported by the runner; accepted from `ASSIGNED` or `RUNNING`.
    Succeeded { output: Value },
    /// Reported by the runner (or the engine, for example when reassignments are exhausted);
    /// accepted from `ASSIGNED` or `RUNNING`.
    Failed { error: String, retryable: bool },
    /// Decided by the engine; accepted from any unfinished status.
    TimedOut,
    /// Decided by the engine; accepted from any unfinished status.
    Cancelled,
}

impl Completion {
    /// The status the step run and its attempt take.
    pub fn status(&self) -> StepRunStatus {
        match self {
            Completion::Succeeded { .. } => StepRunStatus::Succeeded,
            Completion::Failed { .. } => StepRunStatus::Failed,
            Completion::TimedOut => StepRunStatus::TimedOut,
            Completion::Cancelled => StepRunStatus::Cancelled,
        }
    }
}

/// An attempt's result as `complete_steps` records it: `started_at` is when the runner said
/// it started, for a start that was not committed on its own (it is kept when it was); `logs`
/// are lines the runner sent about it that travel with the result (appended in the same
/// commit, whether or not the result is accepted).
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedAttempt {
    pub key: AttemptKey,
    pub completion: Completion,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub logs: Vec<NewExecutionLog>,
}

/// What `complete_steps` committed: the step runs it changed and the log lines it appended;
/// with `complete_steps_then`, also the steps those results made ready that it moved on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompletedSteps {
    pub step_runs: Vec<StepRun>,
    pub logs: Vec<ExecutionLog>,
    pub next: Vec<StepRun>,
    /// The executions the same commit finished (`FinishingExecution`).
    pub finished: Vec<Uuid>,
}

/// An execution that the success of attempt `after` (its last step) ends, finished with
/// `change` in that result's commit (`complete_steps_then`) as `transition_execution` from
/// QUEUED or RUNNING would finish it, and refused alike (`change` says on which condition).
#[derive(Debug, Clone, PartialEq)]
pub struct FinishingExecution {
    pub after: AttemptKey,
    pub execution_id: Uuid,
    pub change: ExecutionChange,
}

/// A step that the success of attempt `after` makes ready, moved on in that result's commit
/// (`complete_steps_then`): straight to a runner (PENDING -> ASSIGNED, as
/// `queue_and_assign_steps` moves it) when it has an `assignment`, QUEUED otherwise (as
/// `mark_steps_queued` moves it, at `at`), and refused alike.
#[derive(Debug, Clone, PartialEq)]
pub struct NextStep {
    pub after: AttemptKey,
    pub key: AttemptKey,
    pub input: Option<Value>,
    pub at: DateTime<Utc>,
    pub assignment: Option<StepAssignment>,
}

/// What `complete_step` did.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per transition and never stored; a box would only add an allocation"
)]
pub enum CompletionOutcome {
    /// The result is committed; this is the step run after the change.
    Applied(StepRun),
    /// This attempt had already finished (a repeated report, or one that lost the race with
    /// another result, a timeout or a cancel). The first final status stands; nothing changed.
    Duplicate { status: StepRunStatus },
    /// The report is for an attempt other than the current one, or the current attempt is in a
    /// status that does not accept this result (a success for a step never assigned). Ignored.
    Stale { current_attempt: i32, current_status: StepRunStatus },
}

impl CompletionOutcome {
    /// Whether the completion changed the step run.
    pub fn is_applied(&self) -> bool {
        matches!(self, CompletionOutcome::Applied(_))
    }
}

/// What a fenced step transition did.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per transition and never stored; a box would only add an allocation"
)]
pub enum StepTransitionOutcome {
    /// The compare-and-set matched and is committed; this is the step run after the change.
    Applied(StepRun),
    /// The step run was not at this attempt in an allowed status; nothing changed.
    Rejected { current_attempt: i32, current_status: StepRunStatus },
}

impl StepTransitionOutcome {
    /// Whether the transition changed the step run.
    pub fn is_applied(&self) -> bool {
        matches!(self, StepTransitionOutcome::Applied(_))
    }

    /// The step run after the change, when it was applied.
    pub fn applied(self) -> Option<StepRun> {
        match self {
            StepTransitionOutcome::Applied(step_run) => Some(step_run),
            StepTransitionOutcome::Rejected { .. } => None,
        }
    }
}

/// What `start_child_execution` did.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per transition and never stored; a box would only add an allocation"
)]
pub enum ChildExecutionStart {
    /// The parent step is RUNNING (held by the engine) and the child execution exists: both
    /// were committed together.
    Started { parent_step: StepRun, child: Execution },
    /// The parent step was not ASSIGNED at this attempt; nothing changed, no child was created.
    Rejected { current_attempt: i32, current_status: StepRunStatus },
}

/// A step run that a runner was holding when it was cancelled: send it a cancel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightStepRun {
    pub step_run_id: Uuid,
    pub attempt: i32,
    pub runner_id: String,
}

/// A step run the dispatcher may act on, with the priority of its execution.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ReadyStepRun {
    #[sqlx(flatten)]
    pub step_run: StepRun,
    pub execution_priority: i32,
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// One log line of an execution; `id` grows with insertion order and is the paging cursor.
/// Serializable because the engine publishes committed lines to watchers.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
pub struct ExecutionLog {
    pub id: i64,
    pub execution_id: Uuid,
    pub step_run_id: Option<Uuid>,
    pub attempt: Option<i32>,
    pub level: ExecutionLogLevel,
    pub source: ExecutionLogSource,
    pub message: String,
    #[sqlx(json(nullable))]
    pub fields: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// A log line to append. `created_at` is when it was produced (the runner's clock or now).
#[derive(Debug, Clone, PartialEq)]
pub struct NewExecutionLog {
    pub execution_id: Uuid,
    /// Must be a step run of `execution_id`.
    pub step_run_id: Option<Uuid>,
    /// Only with `step_run_id`.
    pub attempt: Option<i32>,
    pub level: ExecutionLogLevel,
    pub source: ExecutionLogSource,
    pub message: String,
    pub fields: Option<Value>,
    pub created_at: DateTime<Utc>,
}

/// Filters of `list_execution_logs`; results are in id (insertion) order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionLogFilter {
    pub step_run_id: Option<Uuid>,
    /// Only lines at this level or more severe.
    pub minimum_level: Option<ExecutionLogLevel>,
    /// Only lines after this id: the `next_cursor` of the previous page, parsed.
    pub after_id: Option<i64>,
    /// 1 to `MAX_EXECUTION_LOG_PAGE_SIZE` (clamped).
    pub limit: u32,
}

impl ExecutionLogFilter {
    /// The first `limit` lines of every step and level.
    pub fn first(limit: u32) -> Self {
        Self { step_run_id: None, minimum_level: None, after_id: None, limit }
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Executions per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecutionStatusCounts {
    pub queued: i64,
    pub running: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub timed_out: i64,
}

impl ExecutionStatusCounts {
    /// All executions counted.
    pub fn total(&self) -> i64 {
        self.queued + self.running + self.succeeded + self.failed + self.cancelled + self.timed_out
    }

    fn add(&mut self, status: ExecutionStatus, count: i64) {
        let slot = match status {
            ExecutionStatus::Queued => &mut self.queued,
            ExecutionStatus::Running => &mut self.running,
            ExecutionStatus::Succeeded => &mut self.succeeded,
            ExecutionStatus::Failed => &mut self.failed,
            ExecutionStatus::Cancelled => &mut self.cancelled,
            ExecutionStatus::TimedOut => &mut self.timed_out,
        };
        *slot += count;
    }
}

/// Succeeded executions of one workflow and their average wall-clock duration.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WorkflowDurationStats {
    pub workflow_id: Uuid,
    pub succeeded: i64,
    /// From `started_at` to `finished_at`, in seconds (millisecond precision).
    pub average_duration_seconds: f64,
}

/// Step runs of one agent, by final status.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentStepStats {
    pub agent_id: Uuid,
    /// Every step run of the agent, finished or not.
    pub step_runs: i64,
    pub succeeded: i64,
    /// FAILED and TIMED_OUT (cancelled steps are nobody's failure and are left out).
    pub failed: i64,
    /// succeeded / (succeeded + failed); `None` before any of them finished.
    pub success_rate: Option<f64>,
}

/// Numbers about the executions created in a time range, within a scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutionStats {
    pub status_counts: ExecutionStatusCounts,
    /// Workflows with at least one succeeded execution, ordered by workflow id.
    pub workflow_durations: Vec<WorkflowDurationStats>,
    /// Agents with at least one step run, ordered by agent id.
    pub agent_steps: Vec<AgentStepStats>,
}

// ---------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------

/// Executions, step runs, attempts and logs: the source of truth of the execution engine.
#[async_trait]
pub trait ExecutionStore: Send + Sync {
    /// Creates a `QUEUED` execution and its `PENDING` step runs (attempt 1) in one transaction:
    /// all of it or nothing; an execution created `running` starts `RUNNING`, and its step runs
    /// with a `start` start as that says. A missing parent execution is
    /// `ReferenceViolated("parent_execution_id")`; a repeated step key `AlreadyExists("step_key")`;
    /// a `cron_claim` that another claimant won first (or whose deployment stopped meanwhile)
    /// `ClaimTaken`, with nothing created.
    async fn create_execution(
        &self,
        new_execution: NewExecution,
        step_runs: Vec<NewStepRun>,
    ) -> StoreResult<(Execution, Vec<StepRun>)>;

    /// A non-deleted execution visible in `scope`.
    async fn get_execution(&self, scope: OwnerScope, execution_id: Uuid) -> StoreResult<Execution>;

    /// A non-deleted execution visible in `scope` and its step runs in creation order.
    async fn get_execution_with_steps(
        &self,
        scope: OwnerScope,
        execution_id: Uuid,
    ) -> StoreResult<(Execution, Vec<StepRun>)>;

    /// A non-deleted execution visible in `scope`, its step runs (as `list_step_runs` orders
    /// them) and every attempt of them (by step run, then attempt), read from one snapshot of
    /// the database, so a step run and its attempts always agree.
    async fn get_execution_detail(
        &self,
        scope: OwnerScope,
        execution_id: Uuid,
    ) -> StoreResult<(Execution, Vec<StepRun>, Vec<StepAttempt>)>;

    /// One numbered page of executions, newest first, with the total count.
    async fn list_executions(
        &self,
        filter: ExecutionFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Execution>>;

    /// Up to `limit` executions after `after`, newest first, at constant cost however deep.
    /// `next_cursor` decodes with `ExecutionCursor::decode` and is `None` on the last page.
    async fn list_executions_by_cursor(
        &self,
        filter: ExecutionFilter,
        after: Option<ExecutionCursor>,
        limit: u32,
    ) -> StoreResult<CursorPage<Execution>>;

    /// Soft-deletes an execution (optionally version-checked). It is hidden from reads but
    /// not stopped: cancel it first. Missing or outside `scope`: `NotFound`.
    async fn delete_execution(
        &self,
        scope: OwnerScope,
        execution_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// Compare-and-set on the status: applies `change` (and bumps the version) only when the
    /// execution is in one of `from`. `Ok(false)` means it was not, and nothing changed.
    async fn transition_execution(
        &self,
        execution_id: Uuid,
        from: &[ExecutionStatus],
        change: ExecutionChange,
    ) -> StoreResult<bool>;

    /// Records a user's cancel request on an unfinished execution (the engine then cancels its
    /// steps and finishes it). Idempotent: the first request time stands.
    async fn request_cancel(
        &self,
        scope: OwnerScope,
        execution_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<CancelRequestOutcome>;

    /// Unfinished (QUEUED or RUNNING) executions whose deadline is before `now`, earliest
    /// deadline first: the reconciler times them out.
    async fn list_running_executions_past_deadline(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Execution>>;

    /// PENDING -> QUEUED for this attempt, when no retry backoff is still running
    /// (`next_attempt_at` is empty or not after `at`). Sets the resolved `input` (`None` keeps
    /// the current one) and clears `next_attempt_at`. Commit this before pushing to the queue.
    /// Rejected when the execution is finished or being cancelled.
    async fn mark_step_queued(
        &self,
        key: AttemptKey,
        input: Option<Value>,
        at: DateTime<Utc>,
    ) -> StoreResult<StepTransitionOutcome>;

    /// `mark_step_queued` for many attempts in one statement (one commit): the rows it moved;
    /// an attempt left out was refused. At most `MAX_WRITE_BATCH` at once.
    async fn mark_steps_queued(
        &self,
        queued: &[(AttemptKey, Option<Value>, DateTime<Utc>)],
    ) -> StoreResult<Vec<StepRun>>;

    /// QUEUED -> ASSIGNED for this attempt only, with the runner and its lease. Of two
    /// concurrent assignments of the same attempt exactly one is applied. Rejected when the
    /// execution is finished or being cancelled, so the caller need not read it first.
    async fn assign_step(
        &self,
        key: AttemptKey,
        assignment: StepAssignment,
    ) -> StoreResult<StepTransitionOutcome>;

    /// `assign_step` for many attempts in one statement (one commit): the rows it assigned;
    /// an attempt left out was refused. At most `MAX_WRITE_BATCH` at once.
    async fn assign_steps(
        &self,
        assignments: &[(AttemptKey, StepAssignment)],
    ) -> StoreResult<Vec<StepRun>>;

    /// PENDING -> ASSIGNED in one step for attempts that become ready while a runner has a
    /// free slot for them: `mark_steps_queued` and `assign_steps` in one statement (queued and
    /// assigned at the same instant, the assignment's). Refused like both: a step not PENDING
    /// at this attempt or still in its backoff, an execution finished or being cancelled. The
    /// rows it moved; at most `MAX_WRITE_BATCH` at once.
    async fn queue_and_assign_steps(
        &self,
        handed: &[(AttemptKey, Option<Value>, StepAssignment)],
    ) -> StoreResult<Vec<StepRun>>;

    /// ASSIGNED -> RUNNING for this attempt (the runner reported that it started).
    async fn mark_step_running(
        &self,
        key: AttemptKey,
        at: DateTime<Utc>,
    ) -> StoreResult<StepTransitionOutcome>;

    /// `mark_step_running` for many attempts in one statement (one commit): the rows it
    /// moved; an attempt left out was refused. At most `MAX_WRITE_BATCH` at once.
    async fn mark_steps_running(
        &self,
        started: &[(AttemptKey, DateTime<Utc>)],
    ) -> StoreResult<Vec<StepRun>>;

    /// Starts the child execution of a sub-workflow step: ASSIGNED -> RUNNING for attempt
    /// `key` of the step (clearing its lease: the engine, not a runner, holds it) and the
    /// creation of `child` (as `create_execution` does) in one transaction, so an attempt has
    /// exactly one child however often this is called, by however many replicas.
    /// `child.parent` must name the step and attempt of `key` (otherwise `ReferenceViolated`).
    /// Rejected (and nothing created) when the step is not ASSIGNED at this attempt.
    async fn start_child_execution(
        &self,
        key: AttemptKey,
        child: NewExecution,
        step_runs: Vec<NewStepRun>,
        at: DateTime<Utc>,
    ) -> StoreResult<ChildExecutionStart>;

    /// Records the result of this attempt, idempotently: applied only when `key` is the current
    /// attempt and its status accepts the completion (see `Completion`); a repeated or late
    /// report is `Duplicate` or `Stale` and changes nothing. Clears the lease.
    async fn complete_step(
        &self,
        key: AttemptKey,
        completion: Completion,
        at: DateTime<Utc>,
    ) -> StoreResult<CompletionOutcome>;

    /// `complete_step` for many attempts in one commit, with the log lines they carry: the
    /// rows it changed and the lines it appended; an attempt left out was refused
    /// (`complete_step` explains why). At most `MAX_WRITE_BATCH` at once, each attempt
    /// once. A line the store refuses fails the whole batch.
    async fn complete_steps(&self, completions: &[FinishedAttempt]) -> StoreResult<CompletedSteps>;

    /// `complete_steps` and, in the same commit, the steps those results make ready: a
    /// `NextStep` moves only when the result of its `after` attempt is applied in this call and
    /// SUCCEEDED (so a refused or stale result moves nothing), and is refused as
    /// `queue_and_assign_steps` or `mark_steps_queued` would refuse it. One commit for a
    /// step's end and its successors' start. At most `MAX_WRITE_BATCH` completions; any
    /// number of next steps.
    async fn complete_steps_then(
        &self,
        completions: &[FinishedAttempt],
        next: &[NextStep],
        finishing: &[FinishingExecution],
    ) -> StoreResult<CompletedSteps>;

    /// Why a completion of `key` that `complete_steps` left out was refused: `Duplicate` or
    /// `Stale` as `complete_step` would say (`NotFound` for an unknown step run).
    async fn refused_completion(&self, key: AttemptKey) -> StoreResult<CompletionOutcome>;

    /// Starts attempt `key.attempt + 1` after attempt `key.attempt` FAILED or TIMED_OUT: the
    /// step goes back to PENDING with `next_attempt_at` (the backoff), and the finished attempt
    /// is kept in the step's attempt history.
    /// Rejected when the attempt is not the current one or not failed, when the user's retry
    /// budget is spent (`user_attempts_used() >= max_attempts`), or when the execution is
    /// finished or being cancelled.
    async fn schedule_retry(
        &self,
        key: AttemptKey,
        next_attempt_at: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> StoreResult<StepTransitionOutcome>;

    /// The runner holding this ASSIGNED/RUNNING attempt lost its lease: the attempt's row
    /// becomes LEASE_LOST and the step is QUEUED again at `attempt + 1` with
    /// `infra_reassignments + 1` (the new counts are in the returned step run). This does not
    /// use the user's retry budget. The caller enforces the reassignment cap: at the cap it
    /// completes the attempt with `Completion::Failed` instead of calling this.
    async fn requeue_after_lease_loss(
        &self,
        key: AttemptKey,
        at: DateTime<Utc>,
    ) -> StoreResult<StepTransitionOutcome>;

    /// Cancels every unfinished step run of an execution in one
    /// statement. Returns those a runner was holding (ASSIGNED/RUNNING) so the engine can send
    /// them a cancel; their late results will then be `Duplicate`.
    async fn cancel_pending_steps(
        &self,
        execution_id: Uuid,
        at: DateTime<Utc>,
    ) -> StoreResult<Vec<InFlightStepRun>>;

    /// Step runs the dispatcher should act on, across executions: QUEUED ones (to put in the
    /// queue if missing) and PENDING retries whose backoff ended by `now` (to `mark_step_queued`).
    /// Only unfinished executions without a cancel request. Of the `limit` longest waiting of
    /// each kind (a read bounded by `limit`, not by the backlog), the `limit` of highest
    /// execution priority, longest waiting first within a priority.
    async fn list_ready_step_runs(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ReadyStepRun>>;

    /// ASSIGNED/RUNNING step runs whose lease (as granted at assignment) ended before `now`,
    /// oldest first. Candidates only: heartbeats extend leases outside the database.
    async fn list_expired_leases(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<StepRun>>;

    /// The step runs of an execution in creation order (unscoped: for the engine).
    async fn list_step_runs(&self, execution_id: Uuid) -> StoreResult<Vec<StepRun>>;

    /// The step runs of an execution with these step keys (unscoped: for the engine), in no
    /// particular order; keys the execution lacks are left out.
    async fn list_step_runs_by_keys(
        &self,
        execution_id: Uuid,
        step_keys: &[&str],
    ) -> StoreResult<Vec<StepRun>>;

    /// Where the step runs with these keys of these executions stand, without their inputs
    /// and outputs, in one statement however many executions are asked about (unscoped: for
    /// the engine, whose completions ask together whether a step waiting for several others
    /// may be ready before they read what they need to start it). Keys an execution lacks are
    /// left out; a step asked about twice is there once.
    async fn list_step_run_states_by_keys(
        &self,
        wanted: &[StepKeys],
    ) -> StoreResult<Vec<StepRunState>>;

    /// One step run (unscoped: for the engine).
    async fn get_step_run(&self, step_run_id: Uuid) -> StoreResult<StepRun>;

    /// Every attempt of a step run, in attempt order. The step run's execution must be
    /// visible in `scope` (and not deleted), otherwise `NotFound`.
    async fn list_step_attempts(
        &self,
        scope: OwnerScope,
        step_run_id: Uuid,
    ) -> StoreResult<Vec<StepAttempt>>;

    /// Appends log lines in one transaction (multi-row inserts); returns them as stored.
    async fn append_execution_logs(
        &self,
        logs: Vec<NewExecutionLog>,
    ) -> StoreResult<Vec<ExecutionLog>>;

    /// Log lines of an execution visible in `scope`, ascending by id. `next_cursor` is the last
    /// id in decimal (pass it back as `after_id`) and `None` when no more lines exist yet.
    /// Paging a finished set has no gaps or repeats. A live tail on PostgreSQL must allow for
    /// ids being taken before commit: two concurrent appends to one execution can become
    /// visible out of id order (keep one writer per execution, or re-read a short window).
    async fn list_execution_logs(
        &self,
        scope: OwnerScope,
        execution_id: Uuid,
        filter: ExecutionLogFilter,
    ) -> StoreResult<CursorPage<ExecutionLog>>;

    /// The id of the newest log line of an execution (unscoped: for live watchers, which
    /// checked the scope already), `None` when it has none.
    async fn latest_execution_log_id(&self, execution_id: Uuid) -> StoreResult<Option<i64>>;

    /// Counts and averages over the non-deleted executions created in `[from, to)` in `scope`.
    async fn execution_stats(
        &self,
        scope: OwnerScope,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> StoreResult<ExecutionStats>;
}

// ---------------------------------------------------------------------------------------------
// Rows that are not part of the public model
// ---------------------------------------------------------------------------------------------

/// The status and attempt of a step run, to explain a rejected transition.
#[derive(sqlx::FromRow)]
struct StepRunPosition {
    status: StepRunStatus,
    attempt: i32,
}

/// A step run cancelled by `cancel_pending_steps`.
#[derive(sqlx::FromRow)]
struct CancelledStepRunRow {
    id: Uuid,
    attempt: i32,
    runner_id: Option<String>,
}

/// The state `request_cancel` looks at when its update did not apply.
#[derive(sqlx::FromRow)]
struct CancelStateRow {
    status: ExecutionStatus,
}

#[derive(sqlx::FromRow)]
struct StatusCountRow {
    status: ExecutionStatus,
    count: i64,
}

#[derive(sqlx::FromRow)]
struct AgentStepCountRow {
    agent_id: Uuid,
    step_runs: i64,
    succeeded: i64,
    failed: i64,
}

/// The condition under which a step run may move on from PENDING at the time in `at` (a column
/// of the statement's `VALUES` list `v`): it is due, and its execution is live and not being
/// cancelled.
fn pending_and_due_in_a_live_execution(at: &str) -> String {
    format!(
        "step_runs.status = 'PENDING' AND (step_runs.next_attempt_at IS NULL \
         OR step_runs.next_attempt_at <= {at}) AND EXISTS (SELECT 1 \
         FROM executions WHERE executions.id = step_runs.execution_id \
         AND executions.status IN ('QUEUED', 'RUNNING') \
         AND executions.cancel_requested_at IS NULL)"
    )
}

/// The `SET` of a result (`complete_steps`), from the row `v` of `completion_rows`: id,
/// attempt, status, output, error, retryable, finished at, started at. The end of an ASSIGNED
/// attempt counts two transitions, as a cancel does (`cancel_pending_steps`): its start may
/// have been announced to watchers at the next version without a commit (a result carries it
/// in `v.column8`; an engine's verdict may meet one announced a moment before).
const COMPLETE_SET: &str = "status = v.column3, output = v.column4, error = v.column5, \
     error_retryable = v.column6, finished_at = v.column7, \
     started_at = COALESCE(step_runs.started_at, v.column8), \
     lease_expires_at = NULL, next_attempt_at = NULL, updated_at = v.column7, \
     version = version + CASE WHEN step_runs.status = 'ASSIGNED' THEN 2 ELSE 1 END";

/// Which step runs a result applies to. Results come from a runner, which only ever holds
/// ASSIGNED/RUNNING attempts; timeouts and cancels are the engine's verdicts on any unfinished
/// attempt.
const COMPLETE_CONDITION: &str = "(step_runs.status IN ('ASSIGNED', 'RUNNING') \
     OR (v.column3 IN ('TIMED_OUT', 'CANCELLED') \
     AND step_runs.status IN ('PENDING', 'QUEUED')))";

/// The `SET` of a step put in the queue (`mark_steps_queued`), from the row `v` of
/// `queued_rows`: id, attempt, input, queued at.
const QUEUE_SET: &str = "status = 'QUEUED', input = COALESCE(v.column3, input), \
     queued_at = v.column4, next_attempt_at = NULL, updated_at = v.column4, \
     version = version + 1";

/// The `SET` of a step handed straight to a runner (`queue_and_assign_steps`), from the row
/// `v` of `handed_rows`: id, attempt, input, runner, lease, queued and assigned at.
const HAND_SET: &str = "status = 'ASSIGNED', input = COALESCE(v.column3, input), \
     queued_at = v.column6, next_attempt_at = NULL, runner_id = v.column4, \
     lease_expires_at = v.column5, assigned_at = v.column6, \
     updated_at = v.column6, version = version + 2";

/// The `SET` of an execution's change (`transition_execution`), from the row `v` of
/// `execution_change_rows`: id, status, output, error, started, finished, deadline, at.
const EXECUTION_CHANGE_SET: &str = "status = v.column2, output = COALESCE(v.column3, output), \
     error = COALESCE(v.column4, error), started_at = COALESCE(started_at, v.column5), \
     finished_at = COALESCE(v.column6, finished_at), \
     deadline_at = COALESCE(v.column7, deadline_at), updated_at = v.column8, \
     version = version + 1";

/// The condition of `ExecutionChange::only_when_every_step_succeeded` on an `UPDATE
/// executions`; `besides` excludes more step runs from the count (those the same statement
/// just made SUCCEEDED, which it still reads as they were).
fn every_step_succeeded(besides: &str) -> String {
    format!(
        "executions.cancel_requested_at IS NULL AND NOT EXISTS (SELECT 1 FROM step_runs \
         WHERE step_runs.execution_id = executions.id \
         AND step_runs.status <> 'SUCCEEDED'{besides})"
    )
}

/// Names the unique constraint an execution insert tripped over, the same on both backends.
fn name_execution_conflict(error: StoreError) -> StoreError {
    let StoreError::AlreadyExists(constraint) = error else { return error };
    if constraint.contains("step_key") {
        return StoreError::AlreadyExists("step_key".to_owned());
    }
    StoreError::AlreadyExists(constraint)
}

/// Why a fenced step transition did not apply: `Rejected`, or `NotFound` for an unknown id.
fn rejection(position: Option<StepRunPosition>) -> StoreResult<StepTransitionOutcome> {
    let Some(position) = position else { return Err(StoreError::NotFound) };
    Ok(StepTransitionOutcome::Rejected {
        current_attempt: position.attempt,
        current_status: position.status,
    })
}

/// Why a completion did not apply: `Duplicate`, `Stale`, or `NotFound` for an unknown id.
fn ignored_completion(
    key: AttemptKey,
    position: Option<StepRunPosition>,
) -> StoreResult<CompletionOutcome> {
    let Some(position) = position else { return Err(StoreError::NotFound) };
    if position.attempt == key.attempt && position.status.is_finished() {
        return Ok(CompletionOutcome::Duplicate { status: position.status });
    }
    Ok(CompletionOutcome::Stale {
        current_attempt: position.attempt,
        current_status: position.status,
    })
}

/// Cursor-page limits: at least one row, at most `maximum`.
fn clamp_limit(limit: u32, maximum: u32) -> i64 {
    i64::from(limit.clamp(1, maximum))
}

// ---------------------------------------------------------------------------------------------
// The implementation, written once for both backends
// ---------------------------------------------------------------------------------------------

macro_rules! execution_columns {
    () => {
        "id, owner_id, workflow_id, deployment_id, parent_execution_id, parent_step_run_id, \
         parent_attempt, depth, trigger, status, priority, input, output, error, definition, timeout_seconds, \
         deadline_at, started_at, finished_at, cancel_requested_at, version, created_at, \
         updated_at"
    };
}

macro_rules! step_run_columns {
    () => {
        "id, execution_id, step_key, agent_id, status, attempt, max_attempts, \
         infra_reassignments, input, output, error, error_retryable, runner_id, \
         lease_expires_at, next_attempt_at, queued_at, assigned_at, started_at, finished_at, \
         created_at, updated_at, version"
    };
    (s) => {
        "s.id, s.execution_id, s.step_key, s.agent_id, s.status, s.attempt, s.max_attempts, \
         s.infra_reassignments, s.input, s.output, s.error, s.error_retryable, s.runner_id, \
         s.lease_expires_at, s.next_attempt_at, s.queued_at, s.assigned_at, s.started_at, \
         s.finished_at, s.created_at, s.updated_at, s.version"
    };
}

macro_rules! step_attempt_columns {
    () => {
        "step_run_id, attempt, status, runner_id, input, output, error, retryable, queued_at, \
         assigned_at, started_at, finished_at, created_at, updated_at"
    };
    // The current attempt of a step run, read from the step run (the columns above, in order).
    (current) => {
        "id, attempt, status, runner_id, input, output, error, error_retryable, queued_at, \
         assigned_at, started_at, finished_at, COALESCE(attempt_created_at, created_at), \
         updated_at"
    };
}

macro_rules! execution_log_columns {
    () => {
        "id, execution_id, step_run_id, attempt, level, source, message, fields, created_at"
    };
}

macro_rules! impl_executions_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Appends the `WHERE` clause of `list_executions` for `filter`.
            fn push_execution_filter(
                builder: &mut sqlx::QueryBuilder<$db>,
                filter: &ExecutionFilter,
            ) {
                push_visible_rows(builder, filter.scope);
                if let Some(workflow_id) = filter.workflow_id {
                    builder.push(" AND workflow_id = ");
                    builder.push_bind(workflow_id);
                }
                if let Some(deployment_id) = filter.deployment_id {
                    builder.push(" AND deployment_id = ");
                    builder.push_bind(deployment_id);
                }
                if let Some(status) = filter.status {
                    builder.push(" AND status = ");
                    builder.push_bind(status);
                }
                if let Some(parent_execution_id) = filter.parent_execution_id {
                    builder.push(" AND parent_execution_id = ");
                    builder.push_bind(parent_execution_id);
                }
                if let Some(created_from) = filter.created_from {
                    builder.push(" AND created_at >= ");
                    builder.push_bind(stored_time(created_from));
                }
                if let Some(created_before) = filter.created_before {
                    builder.push(" AND created_at < ");
                    builder.push_bind(stored_time(created_before));
                }
            }

            /// Appends the scope and creation-time range of `execution_stats` (after a `WHERE`),
            /// on the executions table aliased `e`.
            fn push_execution_stats_range(
                builder: &mut sqlx::QueryBuilder<$db>,
                scope: OwnerScope,
                from: DateTime<Utc>,
                to: DateTime<Utc>,
            ) {
                builder.push(" WHERE e.deleted_at IS NULL AND e.created_at >= ");
                builder.push_bind(stored_time(from));
                builder.push(" AND e.created_at < ");
                builder.push_bind(stored_time(to));
                if let Some(owner_id) = scope.owner_id() {
                    builder.push(" AND e.owner_id = ");
                    builder.push_bind(owner_id);
                }
            }

            /// Inserts a QUEUED execution and its PENDING step runs (attempt 1, with their attempt
            /// rows) in `transaction`, created at `now`; see `create_execution`.
            async fn insert_execution(
                transaction: &mut crate::store::connections::Transaction<$db>,
                new_execution: NewExecution,
                step_runs: Vec<NewStepRun>,
                now: DateTime<Utc>,
            ) -> StoreResult<(Execution, Vec<StepRun>)> {
                debug_assert!((1..=10).contains(&new_execution.priority), "priority is 1..=10");
                debug_assert!(step_runs.iter().all(|step_run| step_run.max_attempts >= 1));
                if let Some(claim) = new_execution.cron_claim {
                    // First, so a lost claim writes nothing; the row lock it takes makes a
                    // second claimant wait for this transaction and then find the tick gone.
                    let claimed = sqlx::query::<$db>(
                        "UPDATE deployments SET next_run_at = $3, last_triggered_at = $4 \
                         WHERE id = $1 AND next_run_at = $2 AND deleted_at IS NULL \
                         AND status = 'RUNNING' AND trigger_type = 'CRON'",
                    )
                    .bind(claim.deployment_id)
                    .bind(stored_time(claim.due_at))
                    .bind(claim.next_run_at.map(stored_time))
                    .bind(stored_time(claim.triggered_at))
                    .execute(&mut **transaction)
                    .await?;
                    if claimed.rows_affected() != 1 {
                        return Err(StoreError::ClaimTaken);
                    }
                }
                let depth = match new_execution.parent {
                    None => 0,
                    Some(parent) => {
                        let parent_depth: Option<i32> = sqlx::query_scalar::<$db, i32>(
                            "SELECT depth FROM executions WHERE id = $1",
                        )
                        .bind(parent.execution_id)
                        .fetch_optional(&mut **transaction)
                        .await?;
                        let Some(parent_depth) = parent_depth else {
                            return Err(StoreError::ReferenceViolated(
                                "parent_execution_id".to_owned(),
                            ));
                        };
                        parent_depth + 1
                    }
                };
                let execution = sqlx::query_as::<$db, Execution>(concat!(
                    "INSERT INTO executions (id, owner_id, workflow_id, deployment_id, \
                     parent_execution_id, parent_step_run_id, parent_attempt, depth, trigger, \
                     status, priority, input, definition, timeout_seconds, deadline_at, \
                     started_at, created_at, updated_at, version) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $16, $10, $11, $12, $13, \
                     $14, $17, $15, $15, $18) RETURNING ",
                    execution_columns!()
                ))
                .bind(new_execution.id)
                .bind(new_execution.owner_id)
                .bind(new_execution.workflow_id)
                .bind(new_execution.deployment_id)
                .bind(new_execution.parent.map(|parent| parent.execution_id))
                .bind(new_execution.parent.map(|parent| parent.step_run_id))
                .bind(new_execution.parent.map(|parent| parent.attempt))
                .bind(depth)
                .bind(new_execution.trigger)
                .bind(new_execution.priority)
                .bind(Json(new_execution.input))
                .bind(Json(new_execution.definition))
                .bind(new_execution.timeout_seconds)
                .bind(new_execution.deadline_at.map(stored_time))
                .bind(now)
                .bind(if new_execution.running {
                    ExecutionStatus::Running
                } else {
                    ExecutionStatus::Queued
                })
                .bind(new_execution.running.then_some(now))
                // RUNNING stands for its start as if it had been committed on its own.
                .bind(if new_execution.running { 2_i64 } else { 1 })
                .fetch_one(&mut **transaction)
                .await?;

                let mut created_step_runs = Vec::with_capacity(step_runs.len());
                for chunk in step_runs.chunks(INSERT_BATCH_ROWS) {
                    let started = |step_run: &NewStepRun| step_run.start.is_some().then_some(now);
                    // v: id, step key, agent, max attempts, input, status, runner, lease,
                    // queued at, assigned at, version.
                    let mut step_insert = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO step_runs (id, execution_id, step_key, agent_id, status, \
                         attempt, max_attempts, infra_reassignments, input, runner_id, \
                         lease_expires_at, queued_at, assigned_at, created_at, updated_at, \
                         version) SELECT v.column1, ",
                    );
                    step_insert.push_bind(execution.id);
                    step_insert.push(
                        ", v.column2, v.column3, v.column6, 1, v.column4, 0, v.column5, \
                         v.column7, v.column8, v.column9, v.column10, ",
                    );
                    step_insert.push_bind(now);
                    step_insert.push(", ");
                    step_insert.push_bind(now);
                    step_insert.push(", v.column11 FROM (");
                    BatchRows::<$db>::new(chunk.len())
                        .column(chunk.iter().map(|step_run| step_run.id))
                        .column(chunk.iter().map(|step_run| step_run.step_key.as_str()))
                        .column(chunk.iter().map(|step_run| step_run.agent_id))
                        .column(chunk.iter().map(|step_run| step_run.max_attempts))
                        .column(chunk.iter().map(|step_run| {
                            step_run
                                .start
                                .as_ref()
                                .map_or(step_run.input.as_ref(), |start| start.input.as_ref())
                                .map(Json)
                        }))
                        .column(chunk.iter().map(NewStepRun::initial_status))
                        .column(chunk.iter().map(NewStepRun::runner_id))
                        .column(chunk.iter().map(|step_run| {
                            step_run
                                .start
                                .as_ref()
                                .and_then(|start| start.lease_expires_at.map(stored_time))
                        }))
                        .column(chunk.iter().map(started))
                        .column(chunk.iter().map(|step_run| step_run.runner_id().and(Some(now))))
                        .column(chunk.iter().map(NewStepRun::initial_version))
                        .push_rows(&mut step_insert);
                    step_insert.push(concat!(") AS v RETURNING ", step_run_columns!()));
                    let mut rows = step_insert
                        .build_query_as::<StepRun>()
                        .fetch_all(&mut **transaction)
                        .await
                        .map_err(|error| name_execution_conflict(error.into()))?;
                    created_step_runs.append(&mut rows);
                }
                // In the caller's order.
                let order: std::collections::HashMap<Uuid, usize> =
                    step_runs.iter().enumerate().map(|(index, step_run)| (step_run.id, index)).collect();
                created_step_runs.sort_by_key(|step_run| order.get(&step_run.id).copied());
                Ok((execution, created_step_runs))
            }

            /// The outcome of a step transition's compare-and-set: applied with the row it
            /// wrote, or rejected with where the step is now.
            async fn step_transition_outcome(
                &self,
                key: AttemptKey,
                updated: Option<StepRun>,
            ) -> StoreResult<StepTransitionOutcome> {
                match updated {
                    Some(step_run) => Ok(StepTransitionOutcome::Applied(step_run)),
                    None => rejection(self.step_run_position(key.step_run_id).await?),
                }
            }

            /// Moves many step runs in one statement: `UPDATE step_runs SET <set> FROM
            /// (<the rows of items>) AS v WHERE` the row's id and attempt are v's first two
            /// columns `AND <condition> RETURNING` the rows moved (the first `MAX_WRITE_BATCH`
            /// items). `rows` gives the columns of the items it is handed (`BatchRows`, joined
            /// as a padded table: seven statement texts for 1 to 64 items); `set` and
            /// `condition` read them as `v.column3`, …. `set` bumps `version` by one for each
            /// transition the change stands for (watchers order rows by it).
            async fn transition_step_runs<'c, T>(
                &self,
                connection: impl sqlx::Executor<'c, Database = $db>,
                items: &[T],
                set: &str,
                condition: &str,
                rows: impl for<'i> FnOnce(&'i [T]) -> BatchRows<'i, $db>,
            ) -> StoreResult<Vec<StepRun>> {
                if items.is_empty() {
                    return Ok(Vec::new());
                }
                let items = &items[..items.len().min(MAX_WRITE_BATCH)];
                let mut update = sqlx::QueryBuilder::<$db>::new("");
                <$store>::push_step_transition(&mut update, set, rows(items), condition);
                update.push(concat!(" RETURNING ", step_run_columns!()));
                let moved = update.build_query_as::<StepRun>().fetch_all(connection).await?;
                Ok(moved)
            }

            /// Appends `UPDATE step_runs SET <set> FROM (<rows>) AS v WHERE` the row's id and
            /// attempt are v's first two columns `AND <condition>` (`transition_step_runs`).
            fn push_step_transition(
                update: &mut sqlx::QueryBuilder<$db>,
                set: &str,
                rows: BatchRows<'_, $db>,
                condition: &str,
            ) {
                update.push("UPDATE step_runs SET ").push(set).push(" FROM (");
                rows.push_table(update);
                update
                    .push(
                        ") AS v WHERE step_runs.id = v.column1 AND step_runs.attempt = v.column2 \
                         AND ",
                    )
                    .push(condition);
            }

            /// Inserts log lines (one statement per `INSERT_BATCH_ROWS`) on `connection`.
            async fn insert_execution_logs(
                &self,
                connection: &mut <$db as sqlx::Database>::Connection,
                logs: &[NewExecutionLog],
            ) -> StoreResult<Vec<ExecutionLog>> {
                let mut written = Vec::with_capacity(logs.len());
                for chunk in logs.chunks(INSERT_BATCH_ROWS) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new("");
                    <$store>::push_log_insert(&mut insert, chunk);
                    let mut rows = insert
                        .build_query_as::<ExecutionLog>()
                        .fetch_all(&mut *connection)
                        .await?;
                    written.append(&mut rows);
                }
                Ok(written)
            }

            /// Appends the `INSERT … RETURNING` of `logs` (at most `INSERT_BATCH_ROWS`).
            fn push_log_insert(insert: &mut sqlx::QueryBuilder<$db>, logs: &[NewExecutionLog]) {
                insert.push(
                    "INSERT INTO execution_logs (execution_id, step_run_id, attempt, level, \
                     source, message, fields, created_at) ",
                );
                BatchRows::<$db>::new(logs.len())
                    .column(logs.iter().map(|log| log.execution_id))
                    .column(logs.iter().map(|log| log.step_run_id))
                    .column(logs.iter().map(|log| log.attempt))
                    .column(logs.iter().map(|log| log.level))
                    .column(logs.iter().map(|log| log.source))
                    .column(logs.iter().map(|log| log.message.as_str()))
                    .column(logs.iter().map(|log| log.fields.as_ref().map(Json)))
                    .column(logs.iter().map(|log| stored_time(log.created_at)))
                    .push_rows(insert);
                insert.push(concat!(" RETURNING ", execution_log_columns!()));
            }

            /// The `UPDATE` of `transition_execution` (one statement, no transaction of its
            /// own): it changes one row or none.
            fn execution_transition(
                execution_id: Uuid,
                from: &[ExecutionStatus],
                change: ExecutionChange,
            ) -> sqlx::QueryBuilder<$db> {
                let mut update = sqlx::QueryBuilder::<$db>::new("UPDATE executions SET ");
                update.push(EXECUTION_CHANGE_SET).push(" FROM (");
                <$store>::execution_change_rows(&[(execution_id, &change)]).push_table(&mut update);
                update.push(") AS v WHERE executions.id = v.column1 AND executions.status IN (");
                let mut statuses = update.separated(", ");
                for status in from {
                    statuses.push_bind(*status);
                }
                update.push(")");
                if change.only_when_every_step_succeeded {
                    update.push(" AND ").push(every_step_succeeded(""));
                }
                update
            }

            /// The rows of `EXECUTION_CHANGE_SET`: each execution's id and change.
            fn execution_change_rows<'i>(
                changes: &[(Uuid, &'i ExecutionChange)],
            ) -> BatchRows<'i, $db> {
                BatchRows::<$db>::new(changes.len())
                    .column(changes.iter().map(|&(id, _)| id))
                    .column(changes.iter().map(|&(_, change)| change.to))
                    .column(changes.iter().map(|&(_, change)| change.output.as_ref().map(Json)))
                    .column(changes.iter().map(|&(_, change)| change.error.as_deref()))
                    .column(changes.iter().map(|&(_, change)| change.started_at.map(stored_time)))
                    .column(changes.iter().map(|&(_, change)| change.finished_at.map(stored_time)))
                    .column(changes.iter().map(|&(_, change)| change.deadline_at.map(stored_time)))
                    .column(changes.iter().map(|&(_, change)| stored_time(change.at)))
            }


            /// The statement of `complete_steps`, on `connection`.
            async fn complete_steps_on(
                &self,
                connection: &mut <$db as sqlx::Database>::Connection,
                completions: &[FinishedAttempt],
            ) -> StoreResult<Vec<StepRun>> {
                self.transition_step_runs(
                    &mut *connection,
                    completions,
                    COMPLETE_SET,
                    COMPLETE_CONDITION,
                    <$store>::completion_rows,
                )
                .await
            }

            /// The rows of `COMPLETE_SET`.
            fn completion_rows(completions: &[FinishedAttempt]) -> BatchRows<'_, $db> {
                // Each completion's output, error and retryable flag, in one match.
                let parts: Vec<_> = completions
                    .iter()
                    .map(|finished| match &finished.completion {
                        Completion::Succeeded { output } => (Some(Json(output)), None, None),
                        Completion::Failed { error, retryable } => {
                            (None, Some(error.as_str()), Some(*retryable))
                        }
                        Completion::TimedOut | Completion::Cancelled => (None, None, None),
                    })
                    .collect();
                BatchRows::<$db>::new(completions.len())
                    .column(completions.iter().map(|finished| finished.key.step_run_id))
                    .column(completions.iter().map(|finished| finished.key.attempt))
                    .column(completions.iter().map(|finished| finished.completion.status()))
                    .column(parts.iter().map(|(output, _, _)| *output))
                    .column(parts.iter().map(|(_, error, _)| *error))
                    .column(parts.iter().map(|(_, _, retryable)| *retryable))
                    .column(completions.iter().map(|finished| stored_time(finished.finished_at)))
                    .column(
                        completions.iter().map(|finished| finished.started_at.map(stored_time)),
                    )
            }

            /// The statement of `mark_steps_queued`, on `connection`.
            async fn mark_steps_queued_on<'c>(
                &self,
                connection: impl sqlx::Executor<'c, Database = $db>,
                queued: &[(AttemptKey, Option<Value>, DateTime<Utc>)],
            ) -> StoreResult<Vec<StepRun>> {
                self.transition_step_runs(
                    connection,
                    queued,
                    QUEUE_SET,
                    &pending_and_due_in_a_live_execution("v.column4"),
                    <$store>::queued_rows,
                )
                .await
            }

            /// The rows of `QUEUE_SET`.
            fn queued_rows(
                queued: &[(AttemptKey, Option<Value>, DateTime<Utc>)],
            ) -> BatchRows<'_, $db> {
                BatchRows::<$db>::new(queued.len())
                    .column(queued.iter().map(|(key, _, _)| key.step_run_id))
                    .column(queued.iter().map(|(key, _, _)| key.attempt))
                    .column(queued.iter().map(|(_, input, _)| input.as_ref().map(Json)))
                    .column(queued.iter().map(|(_, _, at)| stored_time(*at)))
            }

            /// The statement of `queue_and_assign_steps`, on `connection`.
            async fn queue_and_assign_steps_on<'c>(
                &self,
                connection: impl sqlx::Executor<'c, Database = $db>,
                handed: &[(AttemptKey, Option<Value>, StepAssignment)],
            ) -> StoreResult<Vec<StepRun>> {
                self.transition_step_runs(
                    connection,
                    handed,
                    HAND_SET,
                    &pending_and_due_in_a_live_execution("v.column6"),
                    <$store>::handed_rows,
                )
                .await
            }

            /// The rows of `HAND_SET`.
            fn handed_rows(
                handed: &[(AttemptKey, Option<Value>, StepAssignment)],
            ) -> BatchRows<'_, $db> {
                BatchRows::<$db>::new(handed.len())
                    .column(handed.iter().map(|(key, _, _)| key.step_run_id))
                    .column(handed.iter().map(|(key, _, _)| key.attempt))
                    .column(handed.iter().map(|(_, input, _)| input.as_ref().map(Json)))
                    .column(handed.iter().map(|(_, _, handed)| handed.runner_id.as_str()))
                    .column(handed.iter().map(|(_, _, handed)| stored_time(handed.lease_expires_at)))
                    .column(handed.iter().map(|(_, _, handed)| stored_time(handed.assigned_at)))
            }

            /// `complete_steps_then` (and `complete_steps` with log lines) for at most
            /// `MAX_WRITE_BATCH` results, next steps and finishing executions and
            /// `INSERT_BATCH_ROWS` log lines (`logs`: those the results carry), in one statement
            /// where the database can write several tables in one
            /// (`Dialect::DATA_MODIFYING_WITH`): one round trip and one
            /// commit instead of `BEGIN`, a statement for each part and `COMMIT`. Every part of
            /// it reads the rows as they were before the statement, so a next step or a
            /// finishing execution asks whether its `after` is among the results the statement
            /// applied (`done`), "every step succeeded" counts those as succeeded, and a step the
            /// results finished (a timeout of a PENDING step) is not moved on as well. Its
            /// tables are padded to one size: seven statement texts, and seven more for results
            /// that move nothing on.
            async fn complete_steps_then_together(
                &self,
                completions: &[FinishedAttempt],
                logs: &[NewExecutionLog],
                next: &[NextStep],
                finishing: &[FinishingExecution],
            ) -> StoreResult<CompletedSteps> {
                use sqlx::{FromRow as _, Row as _};
                let completions = &completions[..completions.len().min(MAX_WRITE_BATCH)];
                let (handed, queued): (Vec<&NextStep>, Vec<&NextStep>) =
                    next.iter().partition(|step| step.assignment.is_some());
                let handed_after: Vec<AttemptKey> = handed.iter().map(|step| step.after).collect();
                let handed: Vec<_> = handed
                    .iter()
                    .filter_map(|step| Some((step.key, step.input.clone(), step.assignment.clone()?)))
                    .collect();
                let queued_after: Vec<AttemptKey> = queued.iter().map(|step| step.after).collect();
                let queued: Vec<_> =
                    queued.iter().map(|step| (step.key, step.input.clone(), step.at)).collect();
                let changes: Vec<(Uuid, &ExecutionChange)> =
                    finishing.iter().map(|finish| (finish.execution_id, &finish.change)).collect();
                let rows = completions.len().max(handed.len()).max(queued.len()).max(changes.len());
                let after_succeeded = |id: &str, attempt: &str| {
                    format!(
                        " AND EXISTS (SELECT 1 FROM done WHERE done.id = {id} \
                         AND done.attempt = {attempt} AND done.status = 'SUCCEEDED')"
                    )
                };
                let not_done = " AND step_runs.id NOT IN (SELECT id FROM done)";
                // Results alone (with their log lines) leave the parts that move on out: their
                // tables, padded to the results' size, would be rows of NULLs to plan and join.
                let moves_on = !next.is_empty() || !finishing.is_empty();
                let mut statement = sqlx::QueryBuilder::<$db>::new("WITH done AS (");
                <$store>::push_step_transition(
                    &mut statement,
                    COMPLETE_SET,
                    <$store>::completion_rows(completions).padded_to(rows),
                    COMPLETE_CONDITION,
                );
                statement.push(concat!(" RETURNING ", step_run_columns!(), ")"));
                if moves_on {
                    statement.push(", queued AS (");
                    <$store>::push_step_transition(
                        &mut statement,
                        QUEUE_SET,
                        <$store>::queued_rows(&queued)
                            .column(queued_after.iter().map(|after| after.step_run_id))
                            .column(queued_after.iter().map(|after| after.attempt))
                            .padded_to(rows),
                        &(pending_and_due_in_a_live_execution("v.column4")
                            + &after_succeeded("v.column5", "v.column6")
                            + not_done),
                    );
                    statement.push(concat!(" RETURNING ", step_run_columns!(), "), handed AS ("));
                    <$store>::push_step_transition(
                        &mut statement,
                        HAND_SET,
                        <$store>::handed_rows(&handed)
                            .column(handed_after.iter().map(|after| after.step_run_id))
                            .column(handed_after.iter().map(|after| after.attempt))
                            .padded_to(rows),
                        &(pending_and_due_in_a_live_execution("v.column6")
                            + &after_succeeded("v.column7", "v.column8")
                            + not_done),
                    );
                    statement.push(concat!(
                        " RETURNING ",
                        step_run_columns!(),
                        "), finished AS (UPDATE executions SET "
                    ));
                    statement.push(EXECUTION_CHANGE_SET).push(" FROM (");
                    <$store>::execution_change_rows(&changes)
                        .column(finishing.iter().map(|finish| finish.after.step_run_id))
                        .column(finishing.iter().map(|finish| finish.after.attempt))
                        .column(
                            finishing
                                .iter()
                                .map(|finish| finish.change.only_when_every_step_succeeded),
                        )
                        .padded_to(rows)
                        .push_table(&mut statement);
                    statement
                        .push(") AS v WHERE executions.id = v.column1 AND executions.status IN (");
                    let mut statuses = statement.separated(", ");
                    for status in ExecutionStatus::UNFINISHED {
                        statuses.push_bind(*status);
                    }
                    statement
                        .push(")")
                        .push(after_succeeded("v.column9", "v.column10"))
                        .push(" AND (v.column11 IS NOT TRUE OR ")
                        .push(every_step_succeeded(
                            " AND step_runs.id NOT IN (SELECT id FROM done \
                             WHERE done.status = 'SUCCEEDED')",
                        ))
                        .push(") RETURNING executions.id)");
                }
                statement.push(", logs AS (");
                <$store>::push_log_insert(&mut statement, logs);
                // Rows of four kinds, told apart by `part`: a step run (a result or a step
                // moved on) in the step run's columns, a finished execution's id in `id`, a
                // log line as JSON in `log`.
                let nulls = |columns: usize| ", NULL".repeat(columns);
                let step_run_columns = step_run_columns!().split(',').count();
                statement.push(concat!(
                    ") SELECT 0 AS part, ",
                    step_run_columns!(),
                    ", NULL::jsonb AS log FROM done"
                ));
                if moves_on {
                    statement
                        .push(concat!(
                            " UNION ALL SELECT 1, ",
                            step_run_columns!(),
                            ", NULL FROM queued UNION ALL SELECT 1, ",
                            step_run_columns!(),
                            ", NULL FROM handed UNION ALL SELECT 2, id"
                        ))
                        .push(nulls(step_run_columns))
                        .push(" FROM finished");
                }
                statement
                    .push(" UNION ALL SELECT 3")
                    .push(nulls(step_run_columns))
                    .push(", to_jsonb(line) FROM logs AS line");
                let mut completed = CompletedSteps::default();
                for row in statement.build().fetch_all(&self.connections).await? {
                    match row.try_get::<i32, _>("part")? {
                        0 => completed.step_runs.push(StepRun::from_row(&row)?),
                        1 => completed.next.push(StepRun::from_row(&row)?),
                        2 => completed.finished.push(row.try_get("id")?),
                        _ => {
                            let Json(line) = row.try_get::<Json<ExecutionLog>, _>("log")?;
                            completed.logs.push(line);
                        }
                    }
                }
                if !completed.finished.is_empty() {
                    self.totals.changed(Listed::Executions);
                }
                Ok(completed)
            }

            /// Writes the current attempt `key` of a step run, if the step run is at it and
            /// matches `condition`, into `step_attempts` as a finished attempt, and holds the
            /// step run until `transaction` ends; the caller then starts the next attempt.
            /// `lease_lost_at`: the attempt ends LEASE_LOST at that time, not as it stands.
            /// False (nothing written) when the step run is not at that attempt or does not
            /// match `condition`.
            async fn archive_attempt(
                transaction: &mut crate::store::connections::Transaction<$db>,
                key: AttemptKey,
                condition: &str,
                lease_lost_at: Option<DateTime<Utc>>,
            ) -> StoreResult<bool> {
                let mut archive = sqlx::QueryBuilder::<$db>::new(concat!(
                    "INSERT INTO step_attempts (",
                    step_attempt_columns!(),
                    ") SELECT "
                ));
                match lease_lost_at {
                    Some(at) => {
                        archive.push(
                            "id, attempt, 'LEASE_LOST', runner_id, input, output, error, \
                             error_retryable, queued_at, assigned_at, started_at, ",
                        );
                        archive.push_bind(at);
                        archive.push(", COALESCE(attempt_created_at, created_at), ");
                        archive.push_bind(at);
                    }
                    None => {
                        archive.push(step_attempt_columns!(current));
                    }
                }
                archive.push(" FROM step_runs WHERE id = ");
                archive.push_bind(key.step_run_id);
                archive.push(" AND attempt = ");
                archive.push_bind(key.attempt);
                archive.push(" AND ");
                archive.push(condition);
                archive.push(<$store as Dialect>::UPDATE_ROW_LOCK);
                let written = archive.build().execute(&mut **transaction).await?;
                Ok(written.rows_affected() == 1)
            }

            /// The status and attempt of a step run (to explain a rejected transition).
            async fn step_run_position(
                &self,
                step_run_id: Uuid,
            ) -> StoreResult<Option<StepRunPosition>> {
                let position = sqlx::query_as::<$db, StepRunPosition>(
                    "SELECT status, attempt FROM step_runs WHERE id = $1",
                )
                .bind(step_run_id)
                .fetch_optional(&self.connections)
                .await?;
                Ok(position)
            }

            /// Whether a non-deleted execution is visible in `scope`.
            async fn execution_is_visible(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
            ) -> StoreResult<bool> {
                let found: Option<Uuid> = sqlx::query_scalar::<$db, Uuid>(
                    "SELECT id FROM executions \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)",
                )
                .bind(execution_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?;
                Ok(found.is_some())
            }
        }

        #[async_trait]
        impl ExecutionStore for $store {
            async fn create_execution(
                &self,
                new_execution: NewExecution,
                step_runs: Vec<NewStepRun>,
            ) -> StoreResult<(Execution, Vec<StepRun>)> {
                let now = stored_time(Utc::now());
                let mut transaction = self.begin_write_transaction().await?;
                let created =
                    <$store>::insert_execution(&mut transaction, new_execution, step_runs, now)
                        .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Executions);
                Ok(created)
            }

            async fn get_execution(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
            ) -> StoreResult<Execution> {
                let execution = sqlx::query_as::<$db, Execution>(concat!(
                    "SELECT ",
                    execution_columns!(),
                    " FROM executions \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(execution_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?;
                execution.ok_or(StoreError::NotFound)
            }

            async fn get_execution_with_steps(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
            ) -> StoreResult<(Execution, Vec<StepRun>)> {
                let execution = self.get_execution(scope, execution_id).await?;
                let step_runs = self.list_step_runs(execution_id).await?;
                Ok((execution, step_runs))
            }

            async fn get_execution_detail(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
            ) -> StoreResult<(Execution, Vec<StepRun>, Vec<StepAttempt>)> {
                let mut transaction = self.begin_snapshot_read().await?;
                let execution = sqlx::query_as::<$db, Execution>(concat!(
                    "SELECT ",
                    execution_columns!(),
                    " FROM executions \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(execution_id)
                .bind(scope.owner_id())
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(StoreError::NotFound)?;
                let step_runs = sqlx::query_as::<$db, StepRun>(concat!(
                    "SELECT ",
                    step_run_columns!(),
                    " FROM step_runs WHERE execution_id = $1 ORDER BY id"
                ))
                .bind(execution_id)
                .fetch_all(&mut *transaction)
                .await?;
                let attempts = sqlx::query_as::<$db, StepAttempt>(concat!(
                    "SELECT ",
                    step_attempt_columns!(),
                    " FROM step_attempts WHERE step_run_id IN \
                     (SELECT id FROM step_runs WHERE execution_id = $1) \
                     UNION ALL SELECT ",
                    step_attempt_columns!(current),
                    " FROM step_runs WHERE execution_id = $1 \
                     ORDER BY step_run_id, attempt"
                ))
                .bind(execution_id)
                .fetch_all(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok((execution, step_runs, attempts))
            }

            async fn list_executions(
                &self,
                filter: ExecutionFilter,
                page: PageRequest,
            ) -> StoreResult<Page<Execution>> {
                let list = PagedList {
                    counted: Some(CountKey::new(Listed::Executions, &filter)),
                    count_statement: "SELECT COUNT(*) FROM executions",
                    rows_statement: concat!("SELECT ", execution_columns!(), " FROM executions"),
                    order: SortOrder { field: "created_at", descending: true },
                    page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    <$store>::push_execution_filter(builder, &filter)
                })
                .await
            }

            async fn list_executions_by_cursor(
                &self,
                filter: ExecutionFilter,
                after: Option<ExecutionCursor>,
                limit: u32,
            ) -> StoreResult<CursorPage<Execution>> {
                let limit = clamp_limit(limit, PageRequest::MAX_PAGE_SIZE);
                let mut list_query = sqlx::QueryBuilder::<$db>::new(concat!(
                    "SELECT ",
                    execution_columns!(),
                    " FROM executions"
                ));
                <$store>::push_execution_filter(&mut list_query, &filter);
                if let Some(cursor) = after {
                    <$store as Dialect>::push_before_cursor(
                        &mut list_query,
                        cursor.created_at,
                        cursor.id,
                    );
                }
                list_query.push(" ORDER BY created_at DESC, id DESC LIMIT ");
                // One row more than asked tells whether another page exists.
                list_query.push_bind(limit + 1);
                let mut items =
                    list_query.build_query_as::<Execution>().fetch_all(&self.connections).await?;
                let has_more = i64::try_from(items.len()).unwrap_or(i64::MAX) > limit;
                if has_more {
                    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                }
                let next_cursor = match items.last() {
                    Some(last) if has_more => Some(ExecutionCursor::after(last).encode()),
                    _ => None,
                };
                Ok(CursorPage { items, next_cursor })
            }

            async fn delete_execution(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let now = stored_time(Utc::now());
                let deleted = sqlx::query::<$db>(
                    "UPDATE executions \
                     SET deleted_at = $1, updated_at = $1, version = version + 1 \
                     WHERE id = $2 AND deleted_at IS NULL AND ($3 IS NULL OR owner_id = $3) \
                     AND ($4 IS NULL OR version = $4)",
                )
                .bind(now)
                .bind(execution_id)
                .bind(scope.owner_id())
                .bind(expected_version)
                .execute(&self.connections)
                .await?;
                if deleted.rows_affected() == 1 {
                    self.totals.changed(Listed::Executions);
                    return Ok(());
                }
                let current_version: Option<i64> = sqlx::query_scalar::<$db, i64>(
                    "SELECT version FROM executions \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)",
                )
                .bind(execution_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?;
                match current_version {
                    None => Err(StoreError::NotFound),
                    Some(current_version) => Err(StoreError::VersionConflict { current_version }),
                }
            }

            async fn transition_execution(
                &self,
                execution_id: Uuid,
                from: &[ExecutionStatus],
                change: ExecutionChange,
            ) -> StoreResult<bool> {
                debug_assert!(!from.is_empty(), "a transition needs at least one from-status");
                if from.is_empty() {
                    return Ok(false);
                }
                let mut update = <$store>::execution_transition(execution_id, from, change);
                let updated = update.build().execute(&self.connections).await?;
                if updated.rows_affected() == 1 {
                    self.totals.changed(Listed::Executions);
                    return Ok(true);
                }
                let exists: Option<Uuid> =
                    sqlx::query_scalar::<$db, Uuid>("SELECT id FROM executions WHERE id = $1")
                        .bind(execution_id)
                        .fetch_optional(&self.connections)
                        .await?;
                match exists {
                    None => Err(StoreError::NotFound),
                    Some(_) => Ok(false),
                }
            }

            async fn request_cancel(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
                at: DateTime<Utc>,
            ) -> StoreResult<CancelRequestOutcome> {
                let updated = sqlx::query::<$db>(
                    "UPDATE executions \
                     SET cancel_requested_at = $1, updated_at = $1, version = version + 1 \
                     WHERE id = $2 AND deleted_at IS NULL AND ($3 IS NULL OR owner_id = $3) \
                     AND status IN ('QUEUED', 'RUNNING') AND cancel_requested_at IS NULL",
                )
                .bind(stored_time(at))
                .bind(execution_id)
                .bind(scope.owner_id())
                .execute(&self.connections)
                .await?;
                if updated.rows_affected() == 1 {
                    return Ok(CancelRequestOutcome::Recorded);
                }
                let state = sqlx::query_as::<$db, CancelStateRow>(
                    "SELECT status FROM executions \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)",
                )
                .bind(execution_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?;
                let Some(state) = state else { return Err(StoreError::NotFound) };
                if state.status.is_finished() {
                    return Ok(CancelRequestOutcome::AlreadyFinished(state.status));
                }
                Ok(CancelRequestOutcome::AlreadyRequested)
            }

            async fn list_running_executions_past_deadline(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<Execution>> {
                // The condition repeats the partial index's predicate word for word, which is
                // what lets SQLite use it.
                let executions = sqlx::query_as::<$db, Execution>(concat!(
                    "SELECT ",
                    execution_columns!(),
                    " FROM executions \
                     WHERE deadline_at IS NOT NULL AND status IN ('QUEUED', 'RUNNING') \
                     AND deadline_at < $1 ORDER BY deadline_at, id LIMIT $2"
                ))
                .bind(stored_time(now))
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                Ok(executions)
            }

            async fn mark_step_queued(
                &self,
                key: AttemptKey,
                input: Option<Value>,
                at: DateTime<Utc>,
            ) -> StoreResult<StepTransitionOutcome> {
                let queued = self.mark_steps_queued(&[(key, input, at)]).await?.pop();
                self.step_transition_outcome(key, queued).await
            }

            async fn mark_steps_queued(
                &self,
                queued: &[(AttemptKey, Option<Value>, DateTime<Utc>)],
            ) -> StoreResult<Vec<StepRun>> {
                self.mark_steps_queued_on(self.connections(), queued).await
            }

            async fn assign_step(
                &self,
                key: AttemptKey,
                assignment: StepAssignment,
            ) -> StoreResult<StepTransitionOutcome> {
                let assigned = self.assign_steps(&[(key, assignment)]).await?.pop();
                self.step_transition_outcome(key, assigned).await
            }

            async fn assign_steps(
                &self,
                assignments: &[(AttemptKey, StepAssignment)],
            ) -> StoreResult<Vec<StepRun>> {
                // v: id, attempt, runner, lease, assigned at.
                self.transition_step_runs(
                    self.connections(),
                    assignments,
                    "status = 'ASSIGNED', runner_id = v.column3, lease_expires_at = v.column4, \
                     assigned_at = v.column5, updated_at = v.column5, version = version + 1",
                    "step_runs.status = 'QUEUED' AND EXISTS (SELECT 1 FROM executions \
                     WHERE executions.id = step_runs.execution_id \
                     AND executions.status IN ('QUEUED', 'RUNNING') \
                     AND executions.cancel_requested_at IS NULL)",
                    |assignments| {
                        BatchRows::<$db>::new(assignments.len())
                            .column(assignments.iter().map(|(key, _)| key.step_run_id))
                            .column(assignments.iter().map(|(key, _)| key.attempt))
                            .column(assignments.iter().map(|(_, to)| to.runner_id.as_str()))
                            .column(assignments.iter().map(|(_, to)| stored_time(to.lease_expires_at)))
                            .column(assignments.iter().map(|(_, to)| stored_time(to.assigned_at)))
                    },
                )
                .await
            }

            async fn queue_and_assign_steps(
                &self,
                handed: &[(AttemptKey, Option<Value>, StepAssignment)],
            ) -> StoreResult<Vec<StepRun>> {
                self.queue_and_assign_steps_on(self.connections(), handed).await
            }

            async fn mark_step_running(
                &self,
                key: AttemptKey,
                at: DateTime<Utc>,
            ) -> StoreResult<StepTransitionOutcome> {
                let running = self.mark_steps_running(&[(key, at)]).await?.pop();
                self.step_transition_outcome(key, running).await
            }

            async fn mark_steps_running(
                &self,
                started: &[(AttemptKey, DateTime<Utc>)],
            ) -> StoreResult<Vec<StepRun>> {
                // v: id, attempt, started at.
                self.transition_step_runs(
                    self.connections(),
                    started,
                    "status = 'RUNNING', started_at = v.column3, updated_at = v.column3, \
                     version = version + 1",
                    "step_runs.status = 'ASSIGNED'",
                    |started| {
                        BatchRows::<$db>::new(started.len())
                            .column(started.iter().map(|(key, _)| key.step_run_id))
                            .column(started.iter().map(|(key, _)| key.attempt))
                            .column(started.iter().map(|(_, at)| stored_time(*at)))
                    },
                )
                .await
            }

            async fn start_child_execution(
                &self,
                key: AttemptKey,
                child: NewExecution,
                step_runs: Vec<NewStepRun>,
                at: DateTime<Utc>,
            ) -> StoreResult<ChildExecutionStart> {
                if child.parent.map(|parent| parent.step_run_id) != Some(key.step_run_id) {
                    return Err(StoreError::ReferenceViolated("parent_step_run_id".to_owned()));
                }
                if child.parent.map(|parent| parent.attempt) != Some(key.attempt) {
                    return Err(StoreError::ReferenceViolated("parent_attempt".to_owned()));
                }
                let at = stored_time(at);
                let mut transaction = self.begin_write_transaction().await?;
                // The compare-and-set on the parent step is what makes the child unique: of
                // two concurrent calls, the second waits for the first's row lock (PostgreSQL)
                // or write lock (SQLite) and then finds the step RUNNING.
                let step_run = sqlx::query_as::<$db, StepRun>(concat!(
                    "UPDATE step_runs SET status = 'RUNNING', started_at = $3, \
                     lease_expires_at = NULL, updated_at = $3, version = version + 1 \
                     WHERE id = $1 AND attempt = $2 AND status = 'ASSIGNED' RETURNING ",
                    step_run_columns!()
                ))
                .bind(key.step_run_id)
                .bind(key.attempt)
                .bind(at)
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(step_run) = step_run else {
                    transaction.rollback().await?;
                    return match rejection(self.step_run_position(key.step_run_id).await?)? {
                        StepTransitionOutcome::Rejected { current_attempt, current_status } => {
                            Ok(ChildExecutionStart::Rejected { current_attempt, current_status })
                        }
                        StepTransitionOutcome::Applied(_) => Err(StoreError::NotFound),
                    };
                };
                let (child, _) =
                    <$store>::insert_execution(&mut transaction, child, step_runs, at).await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Executions);
                Ok(ChildExecutionStart::Started { parent_step: step_run, child })
            }

            async fn complete_step(
                &self,
                key: AttemptKey,
                completion: Completion,
                at: DateTime<Utc>,
            ) -> StoreResult<CompletionOutcome> {
                let finished =
                    FinishedAttempt {
                        key,
                        completion,
                        started_at: None,
                        finished_at: at,
                        logs: Vec::new(),
                    };
                match self.complete_steps(&[finished]).await?.step_runs.pop() {
                    Some(step_run) => Ok(CompletionOutcome::Applied(step_run)),
                    None => self.refused_completion(key).await,
                }
            }

            async fn refused_completion(&self, key: AttemptKey) -> StoreResult<CompletionOutcome> {
                ignored_completion(key, self.step_run_position(key.step_run_id).await?)
            }

            async fn complete_steps(
                &self,
                completions: &[FinishedAttempt],
            ) -> StoreResult<CompletedSteps> {
                let logs: Vec<NewExecutionLog> = completions
                    .iter()
                    .take(MAX_WRITE_BATCH)
                    .flat_map(|finished| finished.logs.iter().cloned())
                    .collect();
                if logs.is_empty() {
                    // One statement, atomic by itself: no transaction around it.
                    let mut connection = self.connections().acquire().await?;
                    let step_runs = self.complete_steps_on(&mut connection, completions).await;
                    let step_runs = connection.kept_if_ok(step_runs)?;
                    return Ok(CompletedSteps {
                        step_runs,
                        logs: Vec::new(),
                        next: Vec::new(),
                        finished: Vec::new(),
                    });
                }
                if <$store as Dialect>::DATA_MODIFYING_WITH && logs.len() <= INSERT_BATCH_ROWS {
                    return self.complete_steps_then_together(completions, &logs, &[], &[]).await;
                }
                let mut transaction = self.begin_write_transaction().await?;
                let step_runs = self.complete_steps_on(&mut transaction, completions).await?;
                let logs = self.insert_execution_logs(&mut transaction, &logs).await?;
                transaction.commit().await?;
                Ok(CompletedSteps { step_runs, logs, next: Vec::new(), finished: Vec::new() })
            }

            async fn complete_steps_then(
                &self,
                completions: &[FinishedAttempt],
                next: &[NextStep],
                finishing: &[FinishingExecution],
            ) -> StoreResult<CompletedSteps> {
                if next.is_empty() && finishing.is_empty() {
                    return self.complete_steps(completions).await;
                }
                let completions = &completions[..completions.len().min(MAX_WRITE_BATCH)];
                let logs: Vec<NewExecutionLog> =
                    completions.iter().flat_map(|finished| finished.logs.iter().cloned()).collect();
                if <$store as Dialect>::DATA_MODIFYING_WITH
                    && logs.len() <= INSERT_BATCH_ROWS
                    && next.len() <= MAX_WRITE_BATCH
                    && finishing.len() <= MAX_WRITE_BATCH
                {
                    return self
                        .complete_steps_then_together(completions, &logs, next, finishing)
                        .await;
                }
                let mut transaction = self.begin_write_transaction().await?;
                let step_runs = self.complete_steps_on(&mut transaction, completions).await?;
                let succeeded: std::collections::HashSet<AttemptKey> = step_runs
                    .iter()
                    .filter(|step_run| step_run.status == StepRunStatus::Succeeded)
                    .map(StepRun::attempt_key)
                    .collect();
                let mut handed = Vec::new();
                let mut queued = Vec::new();
                for step in next.iter().filter(|step| succeeded.contains(&step.after)) {
                    match &step.assignment {
                        Some(assignment) => {
                            handed.push((step.key, step.input.clone(), assignment.clone()));
                        }
                        None => queued.push((step.key, step.input.clone(), step.at)),
                    }
                }
                let mut moved = Vec::new();
                for chunk in handed.chunks(MAX_WRITE_BATCH) {
                    moved.extend(self.queue_and_assign_steps_on(&mut *transaction, chunk).await?);
                }
                for chunk in queued.chunks(MAX_WRITE_BATCH) {
                    moved.extend(self.mark_steps_queued_on(&mut *transaction, chunk).await?);
                }
                let mut finished = Vec::new();
                for finish in finishing.iter().filter(|finish| succeeded.contains(&finish.after)) {
                    let mut update = <$store>::execution_transition(
                        finish.execution_id,
                        ExecutionStatus::UNFINISHED,
                        finish.change.clone(),
                    );
                    if update.build().execute(&mut *transaction).await?.rows_affected() == 1 {
                        finished.push(finish.execution_id);
                    }
                }
                let logs = if logs.is_empty() {
                    Vec::new()
                } else {
                    self.insert_execution_logs(&mut transaction, &logs).await?
                };
                transaction.commit().await?;
                if !finished.is_empty() {
                    self.totals.changed(Listed::Executions);
                }
                Ok(CompletedSteps { step_runs, logs, next: moved, finished })
            }

            async fn schedule_retry(
                &self,
                key: AttemptKey,
                next_attempt_at: DateTime<Utc>,
                at: DateTime<Utc>,
            ) -> StoreResult<StepTransitionOutcome> {
                let at = stored_time(at);
                let mut transaction = self.begin_write_transaction().await?;
                let condition = "status IN ('FAILED', 'TIMED_OUT') \
                     AND attempt - infra_reassignments < max_attempts \
                     AND EXISTS (SELECT 1 FROM executions WHERE executions.id = \
                     step_runs.execution_id AND executions.status IN ('QUEUED', 'RUNNING') \
                     AND executions.cancel_requested_at IS NULL)";
                if !Self::archive_attempt(&mut transaction, key, condition, None).await? {
                    transaction.rollback().await?;
                    return rejection(self.step_run_position(key.step_run_id).await?);
                }
                let step_run = sqlx::query_as::<$db, StepRun>(concat!(
                    "UPDATE step_runs SET attempt = attempt + 1, status = 'PENDING', \
                     next_attempt_at = $3, output = NULL, error = NULL, error_retryable = NULL, \
                     runner_id = NULL, lease_expires_at = NULL, queued_at = NULL, \
                     assigned_at = NULL, started_at = NULL, finished_at = NULL, \
                     attempt_created_at = $4, updated_at = $4, version = version + 1 \
                     WHERE id = $1 AND attempt = $2 RETURNING ",
                    step_run_columns!()
                ))
                .bind(key.step_run_id)
                .bind(key.attempt)
                .bind(stored_time(next_attempt_at))
                .bind(at)
                .fetch_one(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(StepTransitionOutcome::Applied(step_run))
            }

            async fn requeue_after_lease_loss(
                &self,
                key: AttemptKey,
                at: DateTime<Utc>,
            ) -> StoreResult<StepTransitionOutcome> {
                let at = stored_time(at);
                let mut transaction = self.begin_write_transaction().await?;
                let condition = "status IN ('ASSIGNED', 'RUNNING')";
                if !Self::archive_attempt(&mut transaction, key, condition, Some(at)).await? {
                    transaction.rollback().await?;
                    return rejection(self.step_run_position(key.step_run_id).await?);
                }
                let step_run = sqlx::query_as::<$db, StepRun>(concat!(
                    "UPDATE step_runs SET attempt = attempt + 1, \
                     infra_reassignments = infra_reassignments + 1, status = 'QUEUED', \
                     queued_at = $3, runner_id = NULL, lease_expires_at = NULL, \
                     assigned_at = NULL, started_at = NULL, next_attempt_at = NULL, \
                     attempt_created_at = $3, updated_at = $3, version = version + 1 \
                     WHERE id = $1 AND attempt = $2 RETURNING ",
                    step_run_columns!()
                ))
                .bind(key.step_run_id)
                .bind(key.attempt)
                .bind(at)
                .fetch_one(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(StepTransitionOutcome::Applied(step_run))
            }

            async fn cancel_pending_steps(
                &self,
                execution_id: Uuid,
                at: DateTime<Utc>,
            ) -> StoreResult<Vec<InFlightStepRun>> {
                let at = stored_time(at);
                // One statement, so no step can slip from QUEUED to ASSIGNED in between. Only
                // ASSIGNED/RUNNING step runs carry a runner_id (it is cleared on requeue/retry).
                // An ASSIGNED step may have started on its runner, and watchers may have heard
                // of it at the next version before the start is committed (the engine records a
                // short attempt's start with its result): its cancel counts that stage too, so
                // it is newer than the start watchers saw.
                let cancelled = sqlx::query_as::<$db, CancelledStepRunRow>(
                    "UPDATE step_runs SET status = 'CANCELLED', finished_at = $2, \
                     lease_expires_at = NULL, next_attempt_at = NULL, updated_at = $2, \
                     version = version + CASE WHEN status = 'ASSIGNED' THEN 2 ELSE 1 END \
                     WHERE execution_id = $1 \
                     AND status IN ('PENDING', 'QUEUED', 'ASSIGNED', 'RUNNING') \
                     RETURNING id, attempt, runner_id",
                )
                .bind(execution_id)
                .bind(at)
                .fetch_all(self.connections())
                .await?;
                let in_flight = cancelled
                    .into_iter()
                    .filter_map(|row| {
                        row.runner_id.map(|runner_id| InFlightStepRun {
                            step_run_id: row.id,
                            attempt: row.attempt,
                            runner_id,
                        })
                    })
                    .collect();
                Ok(in_flight)
            }

            async fn list_ready_step_runs(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<ReadyStepRun>> {
                // Each kind in the order of its partial index (`step_runs_queued`,
                // `step_runs_retries_due`), so a read stops at `limit` rows however long
                // the backlog; the two are then ordered by priority. The execution is looked
                // up for each step the scan meets (scalar sub-selects, which PostgreSQL never
                // turns into a join): as a join, a planner that believed the executions few
                // (a table younger than its statistics) walked the index of every QUEUED step
                // once per unfinished execution, 392,000 entries and 25-50 ms a pass behind a
                // backlog of 1,120 steps in 350 executions.
                macro_rules! ready_of_one_kind {
                    ($condition:literal, $order:literal, $limit:literal) => {
                        concat!(
                            "SELECT ",
                            step_run_columns!(s),
                            ", (SELECT e.priority FROM executions e WHERE e.id = s.execution_id) \
                             AS execution_priority FROM step_runs s WHERE ",
                            $condition,
                            " AND (SELECT e.status IN ('QUEUED', 'RUNNING') \
                             AND e.cancel_requested_at IS NULL \
                             FROM executions e WHERE e.id = s.execution_id) ORDER BY ",
                            $order,
                            ", s.id LIMIT ",
                            $limit
                        )
                    };
                }
                let mut ready = sqlx::query_as::<$db, ReadyStepRun>(ready_of_one_kind!(
                    "s.status = 'QUEUED'",
                    "s.queued_at",
                    "$1"
                ))
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                let retries = sqlx::query_as::<$db, ReadyStepRun>(ready_of_one_kind!(
                    "s.status = 'PENDING' AND s.next_attempt_at IS NOT NULL \
                     AND s.next_attempt_at <= $1",
                    "s.next_attempt_at",
                    "$2"
                ))
                .bind(stored_time(now))
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                ready.extend(retries);
                ready.sort_by(|a, b| {
                    let waiting = |ready: &ReadyStepRun| {
                        ready.step_run.queued_at.or(ready.step_run.next_attempt_at)
                    };
                    b.execution_priority
                        .cmp(&a.execution_priority)
                        .then_with(|| waiting(a).cmp(&waiting(b)))
                        .then_with(|| a.step_run.id.cmp(&b.step_run.id))
                });
                ready.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                Ok(ready)
            }

            async fn list_expired_leases(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<StepRun>> {
                let expired = sqlx::query_as::<$db, StepRun>(concat!(
                    "SELECT ",
                    step_run_columns!(),
                    " FROM step_runs WHERE status IN ('ASSIGNED', 'RUNNING') \
                     AND lease_expires_at < $1 ORDER BY lease_expires_at, id LIMIT $2"
                ))
                .bind(stored_time(now))
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                Ok(expired)
            }

            async fn list_step_runs(&self, execution_id: Uuid) -> StoreResult<Vec<StepRun>> {
                let step_runs = sqlx::query_as::<$db, StepRun>(concat!(
                    "SELECT ",
                    step_run_columns!(),
                    " FROM step_runs WHERE execution_id = $1 ORDER BY id"
                ))
                .bind(execution_id)
                .fetch_all(&self.connections)
                .await?;
                Ok(step_runs)
            }

            async fn list_step_runs_by_keys(
                &self,
                execution_id: Uuid,
                step_keys: &[&str],
            ) -> StoreResult<Vec<StepRun>> {
                if step_keys.is_empty() {
                    return Ok(Vec::new());
                }
                let mut select = sqlx::QueryBuilder::<$db>::new(concat!(
                    "SELECT ",
                    step_run_columns!(),
                    " FROM step_runs WHERE execution_id = "
                ));
                select.push_bind(execution_id).push(" AND step_key IN (");
                let mut keys = select.separated(", ");
                for step_key in step_keys {
                    keys.push_bind(step_key.to_string());
                }
                select.push(")");
                let step_runs = select.build_query_as::<StepRun>().fetch_all(&self.connections).await?;
                Ok(step_runs)
            }

            async fn list_step_run_states_by_keys(
                &self,
                wanted: &[StepKeys],
            ) -> StoreResult<Vec<StepRunState>> {
                let pairs: std::collections::BTreeSet<(Uuid, &str)> = wanted
                    .iter()
                    .flat_map(|asked| {
                        asked.step_keys.iter().map(|key| (asked.execution_id, key.as_str()))
                    })
                    .collect();
                if pairs.is_empty() {
                    return Ok(Vec::new());
                }
                let mut select = sqlx::QueryBuilder::<$db>::new(
                    "SELECT step_runs.execution_id, step_runs.step_key, step_runs.status, \
                     step_runs.next_attempt_at IS NOT NULL AS waiting_for_retry FROM (",
                );
                BatchRows::<$db>::new(pairs.len())
                    .column(pairs.iter().map(|(execution_id, _)| *execution_id))
                    .column(pairs.iter().map(|(_, step_key)| *step_key))
                    .push_table(&mut select);
                select.push(
                    ") AS v JOIN step_runs ON step_runs.execution_id = v.column1 \
                     AND step_runs.step_key = v.column2",
                );
                let states =
                    select.build_query_as::<StepRunState>().fetch_all(&self.connections).await?;
                Ok(states)
            }

            async fn get_step_run(&self, step_run_id: Uuid) -> StoreResult<StepRun> {
                let step_run = sqlx::query_as::<$db, StepRun>(concat!(
                    "SELECT ",
                    step_run_columns!(),
                    " FROM step_runs WHERE id = $1"
                ))
                .bind(step_run_id)
                .fetch_optional(&self.connections)
                .await?;
                step_run.ok_or(StoreError::NotFound)
            }

            async fn list_step_attempts(
                &self,
                scope: OwnerScope,
                step_run_id: Uuid,
            ) -> StoreResult<Vec<StepAttempt>> {
                let visible: Option<Uuid> = sqlx::query_scalar::<$db, Uuid>(
                    "SELECT s.id FROM step_runs s JOIN executions e ON e.id = s.execution_id \
                     WHERE s.id = $1 AND e.deleted_at IS NULL \
                     AND ($2 IS NULL OR e.owner_id = $2)",
                )
                .bind(step_run_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?;
                if visible.is_none() {
                    return Err(StoreError::NotFound);
                }
                let attempts = sqlx::query_as::<$db, StepAttempt>(concat!(
                    "SELECT ",
                    step_attempt_columns!(),
                    " FROM step_attempts WHERE step_run_id = $1 UNION ALL SELECT ",
                    step_attempt_columns!(current),
                    " FROM step_runs WHERE id = $1 ORDER BY attempt"
                ))
                .bind(step_run_id)
                .fetch_all(&self.connections)
                .await?;
                Ok(attempts)
            }

            async fn append_execution_logs(
                &self,
                logs: Vec<NewExecutionLog>,
            ) -> StoreResult<Vec<ExecutionLog>> {
                if logs.is_empty() {
                    return Ok(Vec::new());
                }
                // One chunk is one statement, atomic by itself: no transaction around it (two
                // round trips fewer for the usual batch of a few lines).
                if logs.len() <= INSERT_BATCH_ROWS {
                    let mut connection = self.connections().acquire().await?;
                    let written = self.insert_execution_logs(&mut connection, &logs).await;
                    return connection.kept_if_ok(written);
                }
                let mut transaction = self.begin_write_transaction().await?;
                let written = self.insert_execution_logs(&mut transaction, &logs).await?;
                transaction.commit().await?;
                Ok(written)
            }

            async fn list_execution_logs(
                &self,
                scope: OwnerScope,
                execution_id: Uuid,
                filter: ExecutionLogFilter,
            ) -> StoreResult<CursorPage<ExecutionLog>> {
                if !self.execution_is_visible(scope, execution_id).await? {
                    return Err(StoreError::NotFound);
                }
                let limit = clamp_limit(filter.limit, MAX_EXECUTION_LOG_PAGE_SIZE);
                let mut query = sqlx::QueryBuilder::<$db>::new(concat!(
                    "SELECT ",
                    execution_log_columns!(),
                    " FROM execution_logs WHERE execution_id = "
                ));
                query.push_bind(execution_id);
                if let Some(step_run_id) = filter.step_run_id {
                    query.push(" AND step_run_id = ");
                    query.push_bind(step_run_id);
                }
                if let Some(minimum_level) = filter.minimum_level {
                    query.push(" AND level IN (");
                    let mut levels = query.separated(", ");
                    for level in minimum_level.and_more_severe() {
                        levels.push_bind(*level);
                    }
                    query.push(")");
                }
                if let Some(after_id) = filter.after_id {
                    query.push(" AND id > ");
                    query.push_bind(after_id);
                }
                query.push(" ORDER BY id LIMIT ");
                query.push_bind(limit + 1);
                let mut items = query.build_query_as::<ExecutionLog>().fetch_all(&self.connections).await?;
                let has_more = i64::try_from(items.len()).unwrap_or(i64::MAX) > limit;
                if has_more {
                    items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
                }
                let next_cursor = match items.last() {
                    Some(last) if has_more => Some(last.id.to_string()),
                    _ => None,
                };
                Ok(CursorPage { items, next_cursor })
            }

            async fn latest_execution_log_id(&self, execution_id: Uuid) -> StoreResult<Option<i64>> {
                let latest: Option<i64> =
                    sqlx::query_scalar("SELECT max(id) FROM execution_logs WHERE execution_id = $1")
                        .bind(execution_id)
                        .fetch_one(&self.connections)
                        .await?;
                Ok(latest)
            }

            async fn execution_stats(
                &self,
                scope: OwnerScope,
                from: DateTime<Utc>,
                to: DateTime<Utc>,
            ) -> StoreResult<ExecutionStats> {
                let mut status_query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT e.status AS status, COUNT(*) AS count FROM executions e",
                );
                <$store>::push_execution_stats_range(&mut status_query, scope, from, to);
                status_query.push(" GROUP BY e.status");
                let status_rows =
                    status_query.build_query_as::<StatusCountRow>().fetch_all(&self.connections).await?;
                let mut status_counts = ExecutionStatusCounts::default();
                for row in status_rows {
                    status_counts.add(row.status, row.count);
                }

                let mut duration_query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT e.workflow_id AS workflow_id, COUNT(*) AS succeeded, AVG(",
                );
                duration_query.push(<$store as Dialect>::EXECUTION_DURATION_SECONDS);
                duration_query.push(") AS average_duration_seconds FROM executions e");
                <$store>::push_execution_stats_range(&mut duration_query, scope, from, to);
                duration_query.push(
                    " AND e.status = 'SUCCEEDED' AND e.workflow_id IS NOT NULL \
                     AND e.started_at IS NOT NULL AND e.finished_at IS NOT NULL \
                     GROUP BY e.workflow_id ORDER BY e.workflow_id",
                );
                let workflow_durations = duration_query
                    .build_query_as::<WorkflowDurationStats>()
                    .fetch_all(&self.connections)
                    .await?;

                let mut agent_query = sqlx::QueryBuilder::<$db>::new(
                    "SELECT s.agent_id AS agent_id, COUNT(*) AS step_runs, \
                     COUNT(*) FILTER (WHERE s.status = 'SUCCEEDED') AS succeeded, \
                     COUNT(*) FILTER (WHERE s.status IN ('FAILED', 'TIMED_OUT')) AS failed \
                     FROM step_runs s JOIN executions e ON e.id = s.execution_id",
                );
                <$store>::push_execution_stats_range(&mut agent_query, scope, from, to);
                agent_query.push(
                    " AND s.agent_id IS NOT NULL GROUP BY s.agent_id ORDER BY s.agent_id",
                );
                let agent_rows =
                    agent_query.build_query_as::<AgentStepCountRow>().fetch_all(&self.connections).await?;
                let agent_steps = agent_rows
                    .into_iter()
                    .map(|row| {
                        let judged = row.succeeded + row.failed;
                        let success_rate = if judged == 0 {
                            None
                        } else {
                            Some(row.succeeded as f64 / judged as f64)
                        };
                        AgentStepStats {
                            agent_id: row.agent_id,
                            step_runs: row.step_runs,
                            succeeded: row.succeeded,
                            failed: row.failed,
                            success_rate,
                        }
                    })
                    .collect();
                Ok(ExecutionStats { status_counts, workflow_durations, agent_steps })
            }
        }
    };
}

impl_executions_store!(super::PostgresStore, sqlx::Postgres);
impl_executions_store!(super::SqliteStore, sqlx::Sqlite);
