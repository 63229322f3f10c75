//! Store area: resources. Owns agents and their version history, workflows and their steps,
//! templates, deployments and their event log. May call: sqlx and `super` (the Store seam).
//!
//! Every user-owned row is soft-deleted and optimistically locked (see `src/store/mod.rs`). The
//! SQL is written once in `impl_resource_store!`; the few dialect differences (how a write
//! transaction starts, row locks, JSON array containment) live in `super::Dialect`.

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{
    CountKey, Dialect, Listed, OwnerScope, Page, PageRequest, PagedList, SortField, SortOrder,
    StoreError, StoreResult, fetch_page, push_visible_rows, sql_order,
};

/// The current time at the precision both backends store (microseconds), so a value written
/// and read back compares equal on PostgreSQL and SQLite alike.
fn current_time() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A caller-supplied time at the stored precision.
fn stored_time(time: DateTime<Utc>) -> DateTime<Utc> {
    time.trunc_subsecs(6)
}

/// A stored row broke an invariant the schema guarantees; reported like any database error.
fn corrupt_row(message: &str) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(message.to_owned().into()))
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// What an agent runs: code in a sandbox, an HTTP API call, an LLM prompt, a data
    /// transformation or a whole sub-workflow.
    pub enum AgentType {
        Code => "CODE",
        Api => "API",
        Llm => "LLM",
        Data => "DATA",
        Workflow => "WORKFLOW",
    }
}

text_enum! {
    /// Run state of an agent, maintained by the engine.
    pub enum AgentStatus {
        Idle => "IDLE",
        Running => "RUNNING",
        Paused => "PAUSED",
        Stopped => "STOPPED",
    }
}

/// Resource limits a runner enforces on every run of an agent. Stored as four typed columns
/// (not JSON): the set is fixed, every runner needs all four, and the database refuses values
/// that are not positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentLimits {
    pub timeout_seconds: i32,
    pub memory_mb: i32,
    pub cpu_seconds: i32,
    pub max_output_bytes: i64,
}

impl Default for AgentLimits {
    /// Five minutes of wall clock and CPU, 512 MiB of memory, 1 MiB of output.
    fn default() -> Self {
        Self { timeout_seconds: 300, memory_mb: 512, cpu_seconds: 300, max_output_bytes: 1 << 20 }
    }
}

/// An agent definition. `config` is type-specific and validated by the service layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Agent {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub agent_type: AgentType,
    #[sqlx(json)]
    pub config: Value,
    #[sqlx(flatten)]
    pub limits: AgentLimits,
    pub status: AgentStatus,
    #[sqlx(json)]
    pub tags: Vec<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The fields of a new agent; it starts `IDLE` at version 1.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAgent {
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub agent_type: AgentType,
    pub config: Value,
    pub limits: AgentLimits,
    pub tags: Vec<String>,
}

/// A partial update of an agent: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub agent_type: Option<AgentType>,
    pub config: Option<Value>,
    pub limits: Option<AgentLimits>,
    pub tags: Option<Vec<String>>,
}

/// Field names recorded in `changed_fields` (version 1 lists all of them).
const AGENT_EDITABLE_FIELDS: [&str; 6] =
    ["name", "description", "agent_type", "config", "limits", "tags"];

/// One saved state of an agent: the whole agent as JSON and the fields that changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AgentVersion {
    pub id: Uuid,
    pub agent_id: Uuid,
    pub version: i64,
    /// The serialized `Agent` after this version was saved.
    #[sqlx(json)]
    pub snapshot: Value,
    #[sqlx(json)]
    pub changed_fields: Vec<String>,
    /// `None` once the user who made the change is purged.
    pub changed_by: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// Sort keys `list_agents` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSortField {
    Name,
    CreatedAt,
    UpdatedAt,
    AgentType,
    Status,
}

impl SortField for AgentSortField {
    const DEFAULT_ORDER: SortOrder<Self> =
        SortOrder { field: AgentSortField::UpdatedAt, descending: true };

    fn expression(self) -> &'static str {
        match self {
            AgentSortField::Name => "LOWER(name)",
            AgentSortField::CreatedAt => "created_at",
            AgentSortField::UpdatedAt => "updated_at",
            AgentSortField::AgentType => "agent_type",
            AgentSortField::Status => "status",
        }
    }
}

/// What `list_agents` returns: scope, page, sort (default newest update first) and filters.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentFilter {
    pub scope: OwnerScope,
    pub page: PageRequest,
    pub sort: Option<SortOrder<AgentSortField>>,
    /// Case-insensitive substring of the name or description; `%` and `_` match literally.
    pub search: Option<String>,
    pub agent_type: Option<AgentType>,
    pub status: Option<AgentStatus>,
    /// Only agents carrying this exact tag.
    pub tag: Option<String>,
}

impl AgentFilter {
    /// The first page of every agent in `scope`, newest update first.
    pub fn new(scope: OwnerScope) -> Self {
        Self {
            scope,
            page: PageRequest::default(),
            sort: None,
            search: None,
            agent_type: None,
            status: None,
            tag: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Workflows
// ---------------------------------------------------------------------------------------------

/// How a failed step is retried; stored as four typed columns of the step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct RetryPolicy {
    /// Total attempts including the first, so 1 means "never retry".
    #[sqlx(rename = "retry_max_attempts")]
    pub max_attempts: i32,
    #[sqlx(rename = "retry_initial_backoff_ms")]
    pub initial_backoff_ms: i64,
    #[sqlx(rename = "retry_max_backoff_ms")]
    pub max_backoff_ms: i64,
    #[sqlx(rename = "retry_multiplier")]
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    /// Three attempts, backing off 1 s, 2 s, … up to 60 s.
    fn default() -> Self {
        Self { max_attempts: 3, initial_backoff_ms: 1_000, max_backoff_ms: 60_000, multiplier: 2.0 }
    }
}

/// One step of a workflow definition. Its id is kept across updates while its `step_key` stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct WorkflowStep {
    pub id: Uuid,
    pub workflow_id: Uuid,
    pub step_key: String,
    pub name: String,
    pub agent_id: Uuid,
    /// Keys of the steps this one waits for.
    #[sqlx(json)]
    pub depends_on: Vec<String>,
    /// `None`: the step receives the execution input.
    #[sqlx(json(nullable))]
    pub input_mapping: Option<Value>,
    #[sqlx(flatten)]
    pub retry_policy: RetryPolicy,
    pub timeout_seconds: Option<i32>,
    /// Runner labels the step needs, each `"key"` or `"key=value"`.
    #[sqlx(json)]
    pub required_labels: Vec<String>,
    /// Order in the definition, from 0.
    pub position: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A step as the caller defines it; the store assigns ids and positions (list order).
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorkflowStep {
    pub step_key: String,
    pub name: String,
    pub agent_id: Uuid,
    pub depends_on: Vec<String>,
    pub input_mapping: Option<Value>,
    pub retry_policy: RetryPolicy,
    pub timeout_seconds: Option<i32>,
    pub required_labels: Vec<String>,
}

/// A workflow without its steps; `step_count` says how many it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Workflow {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    /// Input an execution starts with when its caller gives none.
    #[sqlx(json)]
    pub default_input: Value,
    /// 1 (lowest) to 10 (highest).
    pub priority: i32,
    /// Whole-execution timeout; `None` means only the step timeouts apply.
    pub timeout_seconds: Option<i32>,
    #[sqlx(json)]
    pub tags: Vec<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub step_count: i64,
}

/// A workflow with its steps in definition order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowWithSteps {
    pub workflow: Workflow,
    pub steps: Vec<WorkflowStep>,
}

/// What an execution of a workflow is made from: the workflow with its steps and the live
/// agents those steps use (each once, in the order of the first step using it), all as of one
/// moment. A step whose agent was deleted has no agent here.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowToRun {
    pub workflow: WorkflowWithSteps,
    pub agents: Vec<Agent>,
}

/// The fields of a new workflow and its steps, written in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct NewWorkflow {
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub default_input: Value,
    pub priority: i32,
    pub timeout_seconds: Option<i32>,
    pub tags: Vec<String>,
    pub steps: Vec<NewWorkflowStep>,
}

/// A partial update of a workflow. `steps: Some(..)` replaces the whole step list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkflowChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub default_input: Option<Value>,
    pub priority: Option<i32>,
    /// `Some(None)` removes the timeout.
    pub timeout_seconds: Option<Option<i32>>,
    pub tags: Option<Vec<String>>,
    pub steps: Option<Vec<NewWorkflowStep>>,
}

/// Sort keys `list_workflows` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkflowSortField {
    Name,
    CreatedAt,
    UpdatedAt,
    Priority,
}

impl SortField for WorkflowSortField {
    const DEFAULT_ORDER: SortOrder<Self> =
        SortOrder { field: WorkflowSortField::UpdatedAt, descending: true };

    fn expression(self) -> &'static str {
        match self {
            WorkflowSortField::Name => "LOWER(name)",
            WorkflowSortField::CreatedAt => "created_at",
            WorkflowSortField::UpdatedAt => "updated_at",
            WorkflowSortField::Priority => "priority",
        }
    }
}

/// What `list_workflows` returns (workflows with their step count, not their steps).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowFilter {
    pub scope: OwnerScope,
    pub page: PageRequest,
    pub sort: Option<SortOrder<WorkflowSortField>>,
    pub search: Option<String>,
    pub tag: Option<String>,
}

impl WorkflowFilter {
    /// The first page of every workflow in `scope`, newest update first.
    pub fn new(scope: OwnerScope) -> Self {
        Self { scope, page: PageRequest::default(), sort: None, search: None, tag: None }
    }
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// What a template instantiates.
    pub enum TemplateKind {
        Agent => "AGENT",
        Workflow => "WORKFLOW",
    }
}

/// A reusable agent or workflow definition. `owner_id: None` marks a built-in starter template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Template {
    pub id: Uuid,
    pub owner_id: Option<Uuid>,
    pub name: String,
    pub description: String,
    pub category: String,
    #[sqlx(json)]
    pub tags: Vec<String>,
    pub is_public: bool,
    pub kind: TemplateKind,
    /// The definition, with parameter placeholders.
    #[sqlx(json)]
    pub body: Value,
    /// Declared parameters, one JSON object each.
    #[sqlx(json)]
    pub parameters: Vec<Value>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The fields of a new user template.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTemplate {
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub category: String,
    pub tags: Vec<String>,
    pub is_public: bool,
    pub kind: TemplateKind,
    pub body: Value,
    pub parameters: Vec<Value>,
}

/// A partial update of a template: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub category: Option<String>,
    pub tags: Option<Vec<String>>,
    pub is_public: Option<bool>,
    pub kind: Option<TemplateKind>,
    pub body: Option<Value>,
    pub parameters: Option<Vec<Value>>,
}

/// A built-in starter template, installed under a stable id at start-up.
#[derive(Debug, Clone, PartialEq)]
pub struct BuiltinTemplate {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub category: String,
    pub tags: Vec<String>,
    pub kind: TemplateKind,
    pub body: Value,
    pub parameters: Vec<Value>,
}

/// What `upsert_builtin_template` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinTemplateOutcome {
    Inserted,
    /// The stored copy differed and was overwritten (its version went up).
    Updated,
    Unchanged,
    /// An administrator deleted it; it stays deleted.
    KeptDeleted,
}

/// Sort keys `list_templates` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateSortField {
    Name,
    CreatedAt,
    UpdatedAt,
}

impl SortField for TemplateSortField {
    const DEFAULT_ORDER: SortOrder<Self> =
        SortOrder { field: TemplateSortField::UpdatedAt, descending: true };

    fn expression(self) -> &'static str {
        match self {
            TemplateSortField::Name => "LOWER(name)",
            TemplateSortField::CreatedAt => "created_at",
            TemplateSortField::UpdatedAt => "updated_at",
        }
    }
}

/// What `list_templates` returns. With `viewer: Owner(user)` the user sees their own templates,
/// public ones and built-ins; `mine_only` narrows that to their own. `All` sees everything.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateFilter {
    pub viewer: OwnerScope,
    pub page: PageRequest,
    pub sort: Option<SortOrder<TemplateSortField>>,
    pub search: Option<String>,
    pub category: Option<String>,
    pub kind: Option<TemplateKind>,
    pub tag: Option<String>,
    pub mine_only: bool,
}

impl TemplateFilter {
    /// The first page of every template `viewer` may see, newest update first.
    pub fn new(viewer: OwnerScope) -> Self {
        Self {
            viewer,
            page: PageRequest::default(),
            sort: None,
            search: None,
            category: None,
            kind: None,
            tag: None,
            mine_only: false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deployments
// ---------------------------------------------------------------------------------------------

text_enum! {
    /// Which environment a deployment serves.
    pub enum DeploymentEnvironment {
        Development => "DEVELOPMENT",
        Staging => "STAGING",
        Production => "PRODUCTION",
    }
}

text_enum! {
    /// How a deployment is triggered (the tag of `DeploymentTrigger`, used in filters).
    pub enum DeploymentTriggerType {
        Manual => "MANUAL",
        Cron => "CRON",
        Webhook => "WEBHOOK",
    }
}

text_enum! {
    /// Whether a deployment accepts triggers.
    pub enum DeploymentStatus {
        Stopped => "STOPPED",
        Running => "RUNNING",
        Failed => "FAILED",
    }
}

text_enum! {
    /// What happened to a deployment.
    pub enum DeploymentEventKind {
        Created => "CREATED",
        Started => "STARTED",
        Stopped => "STOPPED",
        Triggered => "TRIGGERED",
        Failed => "FAILED",
        Updated => "UPDATED",
    }
}

/// What a deployment runs: exactly one workflow or one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentTarget {
    Workflow(Uuid),
    Agent(Uuid),
}

impl DeploymentTarget {
    /// The workflow id, when the target is a workflow.
    pub fn workflow_id(self) -> Option<Uuid> {
        match self {
            DeploymentTarget::Workflow(workflow_id) => Some(workflow_id),
            DeploymentTarget::Agent(_) => None,
        }
    }

    /// The agent id, when the target is an agent.
    pub fn agent_id(self) -> Option<Uuid> {
        match self {
            DeploymentTarget::Agent(agent_id) => Some(agent_id),
            DeploymentTarget::Workflow(_) => None,
        }
    }
}

/// How a deployment is triggered. `Debug` never prints the webhook secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentTrigger {
    Manual,
    /// A cron expression read in an IANA time zone.
    Cron {
        expression: String,
        timezone: String,
    },
    /// An HTTP endpoint; requests are signed with HMAC using `secret`.
    Webhook {
        secret: String,
    },
}

impl DeploymentTrigger {
    /// The trigger's type tag.
    pub fn trigger_type(&self) -> DeploymentTriggerType {
        match self {
            DeploymentTrigger::Manual => DeploymentTriggerType::Manual,
            DeploymentTrigger::Cron { .. } => DeploymentTriggerType::Cron,
            DeploymentTrigger::Webhook { .. } => DeploymentTriggerType::Webhook,
        }
    }

    fn cron_expression(&self) -> Option<&str> {
        match self {
            DeploymentTrigger::Cron { expression, .. } => Some(expression),
            _ => None,
        }
    }

    fn timezone(&self) -> Option<&str> {
        match self {
            DeploymentTrigger::Cron { timezone, .. } => Some(timezone),
            _ => None,
        }
    }

    fn webhook_secret(&self) -> Option<&str> {
        match self {
            DeploymentTrigger::Webhook { secret } => Some(secret),
            _ => None,
        }
    }
}

impl std::fmt::Debug for DeploymentTrigger {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeploymentTrigger::Manual => formatter.write_str("Manual"),
            DeploymentTrigger::Cron { expression, timezone } => formatter
                .debug_struct("Cron")
                .field("expression", expression)
                .field("timezone", timezone)
                .finish(),
            DeploymentTrigger::Webhook { .. } => {
                formatter.debug_struct("Webhook").field("secret", &"<redacted>").finish()
            }
        }
    }
}

/// A workflow or agent bound to a trigger in an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub target: DeploymentTarget,
    pub environment: DeploymentEnvironment,
    /// Input defaults and environment values handed to every triggered execution.
    pub config: Value,
    pub trigger: DeploymentTrigger,
    pub status: DeploymentStatus,
    pub last_triggered_at: Option<DateTime<Utc>>,
    /// Next cron fire time; `None` when not scheduled.
    pub next_run_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// A deployment row as stored; `Deployment` folds the target and trigger columns into enums.
#[derive(sqlx::FromRow)]
struct DeploymentRow {
    id: Uuid,
    owner_id: Uuid,
    name: String,
    description: String,
    workflow_id: Option<Uuid>,
    agent_id: Option<Uuid>,
    environment: DeploymentEnvironment,
    #[sqlx(json)]
    config: Value,
    trigger_type: DeploymentTriggerType,
    cron_expression: Option<String>,
    timezone: Option<String>,
    webhook_secret: Option<String>,
    status: DeploymentStatus,
    last_triggered_at: Option<DateTime<Utc>>,
    next_run_at: Option<DateTime<Utc>>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
}

impl TryFrom<DeploymentRow> for Deployment {
    type Error = StoreError;

    fn try_from(row: DeploymentRow) -> Result<Self, Self::Error> {
        let target = match (row.workflow_id, row.agent_id) {
            (Some(workflow_id), None) => DeploymentTarget::Workflow(workflow_id),
            (None, Some(agent_id)) => DeploymentTarget::Agent(agent_id),
            _ => return Err(corrupt_row("deployment without exactly one target")),
        };
        let trigger = match row.trigger_type {
            DeploymentTriggerType::Manual => DeploymentTrigger::Manual,
            DeploymentTriggerType::Cron => DeploymentTrigger::Cron {
                expression: row
                    .cron_expression
                    .ok_or_else(|| corrupt_row("cron deployment without an expression"))?,
                timezone: row.timezone.unwrap_or_else(|| "UTC".to_owned()),
            },
            DeploymentTriggerType::Webhook => DeploymentTrigger::Webhook {
                secret: row
                    .webhook_secret
                    .ok_or_else(|| corrupt_row("webhook deployment without a secret"))?,
            },
        };
        Ok(Deployment {
            id: row.id,
            owner_id: row.owner_id,
            name: row.name,
            description: row.description,
            target,
            environment: row.environment,
            config: row.config,
            trigger,
            status: row.status,
            last_triggered_at: row.last_triggered_at,
            next_run_at: row.next_run_at,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            deleted_at: row.deleted_at,
        })
    }
}

fn deployments_from_rows(rows: Vec<DeploymentRow>) -> StoreResult<Vec<Deployment>> {
    rows.into_iter().map(Deployment::try_from).collect()
}

/// The fields of a new deployment; it starts `STOPPED` with a `CREATED` event.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDeployment {
    pub owner_id: Uuid,
    pub name: String,
    pub description: String,
    pub target: DeploymentTarget,
    pub environment: DeploymentEnvironment,
    pub config: Value,
    pub trigger: DeploymentTrigger,
}

/// A partial update of a deployment. Changing the trigger clears `next_run_at`: the caller
/// computes the next fire time and sets it with `set_next_run`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeploymentChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    pub target: Option<DeploymentTarget>,
    pub environment: Option<DeploymentEnvironment>,
    pub config: Option<Value>,
    pub trigger: Option<DeploymentTrigger>,
}

/// Sort keys `list_deployments` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeploymentSortField {
    Name,
    CreatedAt,
    UpdatedAt,
    Status,
    Environment,
}

impl SortField for DeploymentSortField {
    const DEFAULT_ORDER: SortOrder<Self> =
        SortOrder { field: DeploymentSortField::UpdatedAt, descending: true };

    fn expression(self) -> &'static str {
        match self {
            DeploymentSortField::Name => "LOWER(name)",
            DeploymentSortField::CreatedAt => "created_at",
            DeploymentSortField::UpdatedAt => "updated_at",
            DeploymentSortField::Status => "status",
            DeploymentSortField::Environment => "environment",
        }
    }
}

/// What `list_deployments` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentFilter {
    pub scope: OwnerScope,
    pub page: PageRequest,
    pub sort: Option<SortOrder<DeploymentSortField>>,
    pub search: Option<String>,
    pub status: Option<DeploymentStatus>,
    pub environment: Option<DeploymentEnvironment>,
    pub trigger_type: Option<DeploymentTriggerType>,
    pub workflow_id: Option<Uuid>,
    pub agent_id: Option<Uuid>,
}

impl DeploymentFilter {
    /// The first page of every deployment in `scope`, newest update first.
    pub fn new(scope: OwnerScope) -> Self {
        Self {
            scope,
            page: PageRequest::default(),
            sort: None,
            search: None,
            status: None,
            environment: None,
            trigger_type: None,
            workflow_id: None,
            agent_id: None,
        }
    }
}

/// One entry of a deployment's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct DeploymentEvent {
    pub id: Uuid,
    pub deployment_id: Uuid,
    pub kind: DeploymentEventKind,
    pub message: String,
    /// `None` for the scheduler and webhooks.
    pub actor_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// An event to append to a deployment's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeploymentEvent {
    pub kind: DeploymentEventKind,
    pub message: String,
    pub actor_id: Option<Uuid>,
}

/// A scheduler's claim of one cron fire: it succeeds only while `next_run_at` still equals
/// `due_at`, so of several server replicas exactly one fires each tick. It moves `next_run_at`
/// on and sets `last_triggered_at`, in the transaction that creates the tick's execution
/// (`NewExecution::cron_claim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CronRunClaim {
    pub deployment_id: Uuid,
    pub due_at: DateTime<Utc>,
    pub next_run_at: Option<DateTime<Utc>>,
    pub triggered_at: DateTime<Utc>,
}

// ---------------------------------------------------------------------------------------------
// The trait
// ---------------------------------------------------------------------------------------------

/// Agents, workflows, templates and deployments.
#[async_trait]
pub trait ResourceStore: Send + Sync {
    /// Creates an agent and its version 1 history row in one transaction.
    async fn create_agent(&self, new_agent: NewAgent) -> StoreResult<Agent>;

    /// A live agent in scope.
    async fn get_agent(&self, scope: OwnerScope, agent_id: Uuid) -> StoreResult<Agent>;

    /// Applies `changes` and writes the next version row (full snapshot and changed field
    /// names) in one transaction. Changes that alter nothing write nothing.
    async fn update_agent(
        &self,
        scope: OwnerScope,
        agent_id: Uuid,
        expected_version: i64,
        changes: AgentChanges,
        changed_by: Uuid,
    ) -> StoreResult<Agent>;

    /// Sets the run state without a version check or a version bump (engine bookkeeping).
    async fn set_agent_status(
        &self,
        scope: OwnerScope,
        agent_id: Uuid,
        status: AgentStatus,
    ) -> StoreResult<Agent>;

    /// Soft-deletes an agent; `InUse` lists the live workflows whose steps still use it.
    async fn soft_delete_agent(
        &self,
        scope: OwnerScope,
        agent_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// A page of live agents matching the filter.
    async fn list_agents(&self, filter: AgentFilter) -> StoreResult<Page<Agent>>;

    /// The version history of an agent in scope, newest first.
    async fn list_agent_versions(
        &self,
        scope: OwnerScope,
        agent_id: Uuid,
        page: PageRequest,
    ) -> StoreResult<Page<AgentVersion>>;

    /// Copies an agent in scope to a new, independent agent with its own history (version 1).
    async fn duplicate_agent(
        &self,
        scope: OwnerScope,
        agent_id: Uuid,
        new_owner_id: Uuid,
        new_name: String,
    ) -> StoreResult<Agent>;

    /// Live workflows (id, name) with a step that uses the agent, by name.
    async fn workflows_using_agent(&self, agent_id: Uuid) -> StoreResult<Vec<(Uuid, String)>>;

    /// Creates a workflow and its steps in one transaction. Every step's agent must be live
    /// (`ReferenceViolated("agent_id")`) and step keys unique (`AlreadyExists("step_key")`).
    async fn create_workflow(&self, new_workflow: NewWorkflow) -> StoreResult<WorkflowWithSteps>;

    /// A live workflow in scope with its steps in definition order.
    async fn get_workflow(
        &self,
        scope: OwnerScope,
        workflow_id: Uuid,
    ) -> StoreResult<WorkflowWithSteps>;

    /// A live workflow in scope with its steps and the live agents they use, whoever owns
    /// them, in one statement (one round trip, one moment): what an execution snapshots.
    async fn get_workflow_to_run(
        &self,
        scope: OwnerScope,
        workflow_id: Uuid,
    ) -> StoreResult<WorkflowToRun>;

    /// Applies `changes`; `steps: Some(..)` replaces the steps in the same transaction (a step
    /// whose key survives keeps its id). Changes that alter nothing write nothing.
    async fn update_workflow(
        &self,
        scope: OwnerScope,
        workflow_id: Uuid,
        expected_version: i64,
        changes: WorkflowChanges,
    ) -> StoreResult<WorkflowWithSteps>;

    /// Soft-deletes a workflow (its steps stay with it).
    async fn soft_delete_workflow(
        &self,
        scope: OwnerScope,
        workflow_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// A page of live workflows (with step counts, without steps) matching the filter.
    async fn list_workflows(&self, filter: WorkflowFilter) -> StoreResult<Page<Workflow>>;

    /// Creates a user template.
    async fn create_template(&self, new_template: NewTemplate) -> StoreResult<Template>;

    /// A live template the viewer may see: their own, public or built-in (everything for `All`).
    async fn get_template(&self, viewer: OwnerScope, template_id: Uuid) -> StoreResult<Template>;

    /// Updates a template the scope owns (built-ins only with `All`); others' are `NotFound`.
    /// Changes that alter nothing write nothing.
    async fn update_template(
        &self,
        scope: OwnerScope,
        template_id: Uuid,
        expected_version: i64,
        changes: TemplateChanges,
    ) -> StoreResult<Template>;

    /// Soft-deletes a template the scope owns (built-ins only with `All`).
    async fn soft_delete_template(
        &self,
        scope: OwnerScope,
        template_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// A page of live templates the viewer may see, matching the filter.
    async fn list_templates(&self, filter: TemplateFilter) -> StoreResult<Page<Template>>;

    /// Installs or refreshes a built-in template under its stable id; idempotent.
    async fn upsert_builtin_template(
        &self,
        template: BuiltinTemplate,
    ) -> StoreResult<BuiltinTemplateOutcome>;

    /// Creates a deployment (`STOPPED`) and its `CREATED` event in one transaction. The target
    /// must be live (`ReferenceViolated("workflow_id" | "agent_id")`).
    async fn create_deployment(&self, new_deployment: NewDeployment) -> StoreResult<Deployment>;

    /// A live deployment in scope.
    async fn get_deployment(
        &self,
        scope: OwnerScope,
        deployment_id: Uuid,
    ) -> StoreResult<Deployment>;

    /// A live deployment whoever owns it, for webhook and cron triggers.
    async fn get_deployment_unscoped(&self, deployment_id: Uuid) -> StoreResult<Deployment>;

    /// Applies `changes` and appends an `UPDATED` event (actor `actor_id`) in one transaction.
    /// Changes that alter nothing write nothing.
    async fn update_deployment(
        &self,
        scope: OwnerScope,
        deployment_id: Uuid,
        expected_version: i64,
        changes: DeploymentChanges,
        actor_id: Option<Uuid>,
    ) -> StoreResult<Deployment>;

    /// Soft-deletes a deployment.
    async fn soft_delete_deployment(
        &self,
        scope: OwnerScope,
        deployment_id: Uuid,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// A page of live deployments matching the filter.
    async fn list_deployments(&self, filter: DeploymentFilter) -> StoreResult<Page<Deployment>>;

    /// Sets the status (no version check or bump) and appends `event` in one transaction.
    async fn set_deployment_status(
        &self,
        scope: OwnerScope,
        deployment_id: Uuid,
        status: DeploymentStatus,
        event: NewDeploymentEvent,
    ) -> StoreResult<Deployment>;

    /// Appends an event to a live deployment's history.
    async fn append_deployment_event(
        &self,
        deployment_id: Uuid,
        event: NewDeploymentEvent,
    ) -> StoreResult<DeploymentEvent>;

    /// A page of a deployment's history (the deployment must be live and in scope), newest
    /// first.
    async fn list_deployment_events(
        &self,
        scope: OwnerScope,
        deployment_id: Uuid,
        page: PageRequest,
    ) -> StoreResult<Page<DeploymentEvent>>;

    /// Live `RUNNING` cron deployments with `next_run_at <= now`, earliest first, at most
    /// `limit`.
    async fn list_due_cron_deployments(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<Deployment>>;

    /// Sets the next fire time (`None` unschedules) and, when given, the last trigger time.
    /// Scheduler bookkeeping: no version bump, `updated_at` untouched.
    async fn set_next_run(
        &self,
        deployment_id: Uuid,
        next_run_at: Option<DateTime<Utc>>,
        last_triggered_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()>;

    /// Records that a trigger started a run of a live deployment: sets `last_triggered_at`
    /// (scheduler bookkeeping: no version bump, `updated_at` untouched) and appends `event`, in
    /// one transaction. `next_run_at` is left alone.
    async fn record_deployment_trigger(
        &self,
        deployment_id: Uuid,
        triggered_at: DateTime<Utc>,
        event: NewDeploymentEvent,
    ) -> StoreResult<DeploymentEvent>;

    /// Makes a live agent's status follow its deployments: `RUNNING` while at least one live
    /// `RUNNING` deployment targets the agent directly, `IDLE` otherwise. `PAUSED` and `STOPPED`
    /// are left as they are. The agent row is locked while its deployments are counted, so
    /// concurrent starts and stops, each followed by this call, end on the right status.
    /// Returns the status after; `NotFound` for a missing or deleted agent.
    async fn sync_agent_status_with_deployments(&self, agent_id: Uuid) -> StoreResult<AgentStatus>;

    /// Records a webhook delivery of a deployment (`delivery_id` as its sender names it):
    /// `Ok(true)` the first time the id is seen, `Ok(false)` for a replay. Deliveries of the
    /// deployment received before `forget_before` are purged on the way (the caller refuses
    /// calls that old by their signed timestamp anyway).
    async fn record_webhook_delivery(
        &self,
        deployment_id: Uuid,
        delivery_id: &str,
        received_at: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<bool>;
}

// ---------------------------------------------------------------------------------------------
// SQL shared by both backends
// ---------------------------------------------------------------------------------------------

macro_rules! agent_columns {
    () => {
        "id, owner_id, name, description, agent_type, config, timeout_seconds, memory_mb, \
         cpu_seconds, max_output_bytes, status, tags, version, created_at, updated_at, deleted_at"
    };
}

macro_rules! agent_version_columns {
    () => {
        "id, agent_id, version, snapshot, changed_fields, changed_by, created_at"
    };
}

macro_rules! workflow_columns {
    () => {
        "id, owner_id, name, description, default_input, priority, timeout_seconds, tags, \
         version, created_at, updated_at, deleted_at, \
         (SELECT COUNT(*) FROM workflow_steps WHERE workflow_steps.workflow_id = workflows.id) \
         AS step_count"
    };
}

/// A workflow's columns as `resources_load_workflow` reads them beside its steps' (named
/// `workflow_…`, so that neither set's names hide the other's; its step count is the rows').
macro_rules! workflow_columns_beside_steps {
    () => {
        "workflows.id AS workflow_id_, workflows.owner_id AS workflow_owner_id, \
         workflows.name AS workflow_name, workflows.description AS workflow_description, \
         workflows.default_input AS workflow_default_input, \
         workflows.priority AS workflow_priority, \
         workflows.timeout_seconds AS workflow_timeout_seconds, workflows.tags AS workflow_tags, \
         workflows.version AS workflow_version, workflows.created_at AS workflow_created_at, \
         workflows.updated_at AS workflow_updated_at, workflows.deleted_at AS workflow_deleted_at"
    };
}

/// What `resources_load_workflow` reads from, binding the workflow's id to `$1` and the
/// scope's owner to `$2`: a live workflow joined to its steps, in definition order; with
/// `agents`, each step joined to its live agent too (as `agent`).
macro_rules! workflow_with_steps_from {
    () => {
        workflow_with_steps_from!("")
    };
    (agents) => {
        workflow_with_steps_from!(
            " LEFT JOIN agents AS agent ON agent.id = step.agent_id AND agent.deleted_at IS NULL"
        )
    };
    ($agents:literal) => {
        concat!(
            " FROM workflows LEFT JOIN workflow_steps AS step ON step.workflow_id = workflows.id",
            $agents,
            " WHERE workflows.id = $1 AND workflows.deleted_at IS NULL \
             AND ($2 IS NULL OR workflows.owner_id = $2) \
             ORDER BY step.position, step.id"
        )
    };
}

/// An agent's columns beside the step that uses it (named `agent_…`; its id `agent_id_` and
/// its type `agent_type_`, the step's `agent_id` and no column of a step being hidden).
macro_rules! agent_columns_beside_steps {
    () => {
        "agent.id AS agent_id_, agent.owner_id AS agent_owner_id, agent.name AS agent_name, \
         agent.description AS agent_description, agent.agent_type AS agent_type_, \
         agent.config AS agent_config, agent.timeout_seconds AS agent_timeout_seconds, \
         agent.memory_mb AS agent_memory_mb, agent.cpu_seconds AS agent_cpu_seconds, \
         agent.max_output_bytes AS agent_max_output_bytes, agent.status AS agent_status, \
         agent.tags AS agent_tags, agent.version AS agent_version, \
         agent.created_at AS agent_created_at, agent.updated_at AS agent_updated_at, \
         agent.deleted_at AS agent_deleted_at"
    };
}

/// A step's columns, qualified by the alias `step` (read beside its workflow's).
macro_rules! workflow_step_columns {
    (step) => {
        "step.id, step.workflow_id, step.step_key, step.name, step.agent_id, step.depends_on, \
         step.input_mapping, step.retry_max_attempts, step.retry_initial_backoff_ms, \
         step.retry_max_backoff_ms, step.retry_multiplier, step.timeout_seconds, \
         step.required_labels, step.position, step.created_at, step.updated_at"
    };
}

macro_rules! template_columns {
    () => {
        "id, owner_id, name, description, category, tags, is_public, kind, body, parameters, \
         version, created_at, updated_at, deleted_at"
    };
}

macro_rules! deployment_columns {
    () => {
        "id, owner_id, name, description, workflow_id, agent_id, environment, config, \
         trigger_type, cron_expression, timezone, webhook_secret, status, last_triggered_at, \
         next_run_at, version, created_at, updated_at, deleted_at"
    };
}

macro_rules! deployment_event_columns {
    () => {
        "id, deployment_id, kind, message, actor_id, created_at"
    };
}

/// `$1` id, `$2` owner (NULL = any), `$3` expected version (NULL = any), `$4` now.
macro_rules! soft_delete_statement {
    ($table:literal) => {
        concat!(
            "UPDATE ",
            $table,
            " SET deleted_at = $4, updated_at = $4, version = version + 1 \
             WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2) \
             AND ($3 IS NULL OR version = $3)"
        )
    };
}

/// `$1` id, `$2` owner (NULL = any): the version of a live row in scope.
macro_rules! live_version_statement {
    ($table:literal) => {
        concat!(
            "SELECT version FROM ",
            $table,
            " WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2)"
        )
    };
}

/// ` AND (name or description contains the text, case-insensitively, wildcards literal)`.
fn push_search_filter<Database: sqlx::Database>(
    builder: &mut sqlx::QueryBuilder<Database>,
    search: &str,
) where
    for<'query> String: sqlx::Encode<'query, Database> + sqlx::Type<Database>,
{
    let pattern = super::like_pattern(search);
    builder
        .push(" AND (LOWER(name) LIKE ")
        .push_bind(pattern.clone())
        .push(" ESCAPE '\\' OR LOWER(description) LIKE ")
        .push_bind(pattern)
        .push(" ESCAPE '\\')");
}

/// Step keys must be unique within a workflow; checked up front so both backends answer alike.
fn ensure_unique_step_keys(steps: &[NewWorkflowStep]) -> StoreResult<()> {
    let mut seen = std::collections::HashSet::with_capacity(steps.len());
    for step in steps {
        if !seen.insert(step.step_key.as_str()) {
            return Err(StoreError::AlreadyExists("step_key".to_owned()));
        }
    }
    Ok(())
}

/// Applies `changes` to a copy of `current` and names the fields that really changed.
fn merge_agent_changes(current: &Agent, changes: AgentChanges) -> (Agent, Vec<String>) {
    let mut merged = current.clone();
    let mut changed_fields = Vec::new();
    if let Some(name) = changes.name.filter(|name| *name != merged.name) {
        merged.name = name;
        changed_fields.push("name".to_owned());
    }
    if let Some(description) = changes.description.filter(|text| *text != merged.description) {
        merged.description = description;
        changed_fields.push("description".to_owned());
    }
    if let Some(agent_type) = changes.agent_type.filter(|kind| *kind != merged.agent_type) {
        merged.agent_type = agent_type;
        changed_fields.push("agent_type".to_owned());
    }
    if let Some(config) = changes.config.filter(|config| *config != merged.config) {
        merged.config = config;
        changed_fields.push("config".to_owned());
    }
    if let Some(limits) = changes.limits.filter(|limits| *limits != merged.limits) {
        merged.limits = limits;
        changed_fields.push("limits".to_owned());
    }
    if let Some(tags) = changes.tags.filter(|tags| *tags != merged.tags) {
        merged.tags = tags;
        changed_fields.push("tags".to_owned());
    }
    (merged, changed_fields)
}

/// Applies `changes` to a copy of `current`; `true` when any workflow column changed.
fn merge_workflow_changes(current: &Workflow, changes: &WorkflowChanges) -> (Workflow, bool) {
    let mut merged = current.clone();
    if let Some(name) = &changes.name {
        merged.name.clone_from(name);
    }
    if let Some(description) = &changes.description {
        merged.description.clone_from(description);
    }
    if let Some(default_input) = &changes.default_input {
        merged.default_input = default_input.clone();
    }
    if let Some(priority) = changes.priority {
        merged.priority = priority;
    }
    if let Some(timeout_seconds) = changes.timeout_seconds {
        merged.timeout_seconds = timeout_seconds;
    }
    if let Some(tags) = &changes.tags {
        merged.tags.clone_from(tags);
    }
    let changed = merged != *current;
    (merged, changed)
}

/// Applies `changes` to a copy of `current`; `true` when anything changed.
fn merge_template_changes(current: &Template, changes: TemplateChanges) -> (Template, bool) {
    let mut merged = current.clone();
    if let Some(name) = changes.name {
        merged.name = name;
    }
    if let Some(description) = changes.description {
        merged.description = description;
    }
    if let Some(category) = changes.category {
        merged.category = category;
    }
    if let Some(tags) = changes.tags {
        merged.tags = tags;
    }
    if let Some(is_public) = changes.is_public {
        merged.is_public = is_public;
    }
    if let Some(kind) = changes.kind {
        merged.kind = kind;
    }
    if let Some(body) = changes.body {
        merged.body = body;
    }
    if let Some(parameters) = changes.parameters {
        merged.parameters = parameters;
    }
    let changed = merged != *current;
    (merged, changed)
}

/// Applies `changes` to a copy of `current` and names the fields that really changed.
fn merge_deployment_changes(
    current: &Deployment,
    changes: DeploymentChanges,
) -> (Deployment, Vec<&'static str>) {
    let mut merged = current.clone();
    let mut changed_fields = Vec::new();
    if let Some(name) = changes.name.filter(|name| *name != merged.name) {
        merged.name = name;
        changed_fields.push("name");
    }
    if let Some(description) = changes.description.filter(|text| *text != merged.description) {
        merged.description = description;
        changed_fields.push("description");
    }
    if let Some(target) = changes.target.filter(|target| *target != merged.target) {
        merged.target = target;
        changed_fields.push("target");
    }
    if let Some(environment) = changes.environment.filter(|value| *value != merged.environment) {
        merged.environment = environment;
        changed_fields.push("environment");
    }
    if let Some(config) = changes.config.filter(|config| *config != merged.config) {
        merged.config = config;
        changed_fields.push("config");
    }
    if let Some(trigger) = changes.trigger.filter(|trigger| *trigger != merged.trigger) {
        merged.trigger = trigger;
        merged.next_run_at = None;
        changed_fields.push("trigger");
    }
    (merged, changed_fields)
}

/// Built-in content equal to what is stored (so the upsert has nothing to do)?
fn builtin_template_matches(stored: &Template, builtin: &BuiltinTemplate) -> bool {
    stored.name == builtin.name
        && stored.description == builtin.description
        && stored.category == builtin.category
        && stored.tags == builtin.tags
        && stored.kind == builtin.kind
        && stored.body == builtin.body
        && stored.parameters == builtin.parameters
        && stored.is_public
}

// ---------------------------------------------------------------------------------------------
// The implementation, written once for both backends
// ---------------------------------------------------------------------------------------------

macro_rules! impl_resource_store {
    ($store:ty, $db:ty) => {
        /// Multi-statement helpers, called fully qualified inside the transactions below.
        impl $store {
            /// `NotFound` when no live row in scope has `id`, otherwise the version conflict.
            async fn resources_missing_or_conflict(
                connection: &mut <$db as sqlx::Database>::Connection,
                live_version_statement: &'static str,
                row_id: Uuid,
                scope: OwnerScope,
            ) -> StoreError {
                let current_version: Result<Option<i64>, sqlx::Error> =
                    sqlx::query_scalar::<$db, i64>(live_version_statement)
                        .bind(row_id)
                        .bind(scope.owner_id())
                        .fetch_optional(&mut *connection)
                        .await;
                match current_version {
                    Ok(Some(current_version)) => StoreError::VersionConflict { current_version },
                    Ok(None) => StoreError::NotFound,
                    Err(error) => error.into(),
                }
            }

            /// Soft-deletes one row of a simple table, with the usual scope and version rules.
            async fn resources_soft_delete(
                connection: &mut <$db as sqlx::Database>::Connection,
                statements: (&'static str, &'static str),
                row_id: Uuid,
                scope: OwnerScope,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let (soft_delete_statement, live_version_statement) = statements;
                let result = sqlx::query::<$db>(soft_delete_statement)
                    .bind(row_id)
                    .bind(scope.owner_id())
                    .bind(expected_version)
                    .bind(current_time())
                    .execute(&mut *connection)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(Self::resources_missing_or_conflict(
                        connection,
                        live_version_statement,
                        row_id,
                        scope,
                    )
                    .await);
                }
                Ok(())
            }

            /// Inserts an agent and its version 1 row.
            async fn resources_insert_agent(
                connection: &mut <$db as sqlx::Database>::Connection,
                new_agent: NewAgent,
            ) -> StoreResult<Agent> {
                let now = current_time();
                let agent = sqlx::query_as::<$db, Agent>(concat!(
                    "INSERT INTO agents (id, owner_id, name, description, agent_type, config, \
                     timeout_seconds, memory_mb, cpu_seconds, max_output_bytes, status, tags, \
                     version, created_at, updated_at, deleted_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 1, $13, $13, NULL) \
                     RETURNING ",
                    agent_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(new_agent.owner_id)
                .bind(new_agent.name)
                .bind(new_agent.description)
                .bind(new_agent.agent_type)
                .bind(Json(new_agent.config))
                .bind(new_agent.limits.timeout_seconds)
                .bind(new_agent.limits.memory_mb)
                .bind(new_agent.limits.cpu_seconds)
                .bind(new_agent.limits.max_output_bytes)
                .bind(AgentStatus::Idle)
                .bind(Json(new_agent.tags))
                .bind(now)
                .fetch_one(&mut *connection)
                .await?;
                let all_fields: Vec<String> =
                    AGENT_EDITABLE_FIELDS.iter().map(|field| (*field).to_owned()).collect();
                Self::resources_insert_agent_version(
                    connection,
                    &agent,
                    all_fields,
                    Some(agent.owner_id),
                )
                .await?;
                Ok(agent)
            }

            /// Records `agent` (already at its new version) in its history.
            async fn resources_insert_agent_version(
                connection: &mut <$db as sqlx::Database>::Connection,
                agent: &Agent,
                changed_fields: Vec<String>,
                changed_by: Option<Uuid>,
            ) -> StoreResult<()> {
                let snapshot = serde_json::to_value(agent)
                    .map_err(|error| StoreError::Database(sqlx::Error::Encode(error.into())))?;
                sqlx::query::<$db>(
                    "INSERT INTO agent_versions (id, agent_id, version, snapshot, changed_fields, \
                     changed_by, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                )
                .bind(Uuid::now_v7())
                .bind(agent.id)
                .bind(agent.version)
                .bind(Json(snapshot))
                .bind(Json(changed_fields))
                .bind(changed_by)
                .bind(agent.updated_at)
                .execute(&mut *connection)
                .await?;
                Ok(())
            }

            /// Checks every agent the steps use is live and, on PostgreSQL, holds them against a
            /// concurrent soft delete until commit.
            async fn resources_ensure_step_agents_live(
                connection: &mut <$db as sqlx::Database>::Connection,
                steps: &[NewWorkflowStep],
            ) -> StoreResult<()> {
                let mut agent_ids: Vec<Uuid> = steps.iter().map(|step| step.agent_id).collect();
                agent_ids.sort_unstable();
                agent_ids.dedup();
                if agent_ids.is_empty() {
                    return Ok(());
                }
                let mut builder = sqlx::QueryBuilder::<$db>::new(
                    "SELECT id FROM agents WHERE deleted_at IS NULL AND id IN (",
                );
                let mut separated = builder.separated(", ");
                for agent_id in &agent_ids {
                    separated.push_bind(*agent_id);
                }
                builder.push(")");
                builder.push(<$store as Dialect>::SHARE_ROW_LOCK);
                let live_agent_ids: Vec<Uuid> =
                    builder.build_query_scalar().fetch_all(&mut *connection).await?;
                if live_agent_ids.len() != agent_ids.len() {
                    return Err(StoreError::ReferenceViolated("agent_id".to_owned()));
                }
                Ok(())
            }

            /// Makes the workflow's steps exactly `steps`, in order: a step whose key already
            /// exists is updated in place (its id survives), new keys are inserted, keys no
            /// longer present are deleted.
            async fn resources_write_workflow_steps(
                connection: &mut <$db as sqlx::Database>::Connection,
                workflow_id: Uuid,
                steps: Vec<NewWorkflowStep>,
                now: DateTime<Utc>,
            ) -> StoreResult<()> {
                ensure_unique_step_keys(&steps)?;
                Self::resources_ensure_step_agents_live(connection, &steps).await?;
                let existing_steps: Vec<(Uuid, String)> = sqlx::query_as::<$db, (Uuid, String)>(
                    "SELECT id, step_key FROM workflow_steps WHERE workflow_id = $1",
                )
                .bind(workflow_id)
                .fetch_all(&mut *connection)
                .await?;
                let kept_keys: std::collections::HashSet<&str> =
                    steps.iter().map(|step| step.step_key.as_str()).collect();
                for (step_id, step_key) in &existing_steps {
                    if kept_keys.contains(step_key.as_str()) {
                        continue;
                    }
                    sqlx::query::<$db>("DELETE FROM workflow_steps WHERE id = $1")
                        .bind(*step_id)
                        .execute(&mut *connection)
                        .await?;
                }
                for (index, step) in steps.into_iter().enumerate() {
                    let position = i32::try_from(index)
                        .map_err(|_| StoreError::ReferenceViolated("position".to_owned()))?;
                    let existing_step_id = existing_steps
                        .iter()
                        .find(|(_, step_key)| *step_key == step.step_key)
                        .map(|(step_id, _)| *step_id);
                    let statement = match existing_step_id {
                        Some(_) => {
                            "UPDATE workflow_steps SET name = $3, agent_id = $4, depends_on = $5, \
                             input_mapping = $6, retry_max_attempts = $7, \
                             retry_initial_backoff_ms = $8, retry_max_backoff_ms = $9, \
                             retry_multiplier = $10, timeout_seconds = $11, \
                             required_labels = $12, position = $13, updated_at = $15 \
                             WHERE id = $1 AND workflow_id = $2 AND step_key = $14"
                        }
                        None => {
                            "INSERT INTO workflow_steps (id, workflow_id, name, agent_id, \
                             depends_on, input_mapping, retry_max_attempts, \
                             retry_initial_backoff_ms, retry_max_backoff_ms, retry_multiplier, \
                             timeout_seconds, required_labels, position, step_key, created_at, \
                             updated_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                             $15, $15)"
                        }
                    };
                    let input_mapping = step.input_mapping.filter(|mapping| !mapping.is_null());
                    sqlx::query::<$db>(statement)
                        .bind(existing_step_id.unwrap_or_else(Uuid::now_v7))
                        .bind(workflow_id)
                        .bind(step.name)
                        .bind(step.agent_id)
                        .bind(Json(step.depends_on))
                        .bind(input_mapping.map(Json))
                        .bind(step.retry_policy.max_attempts)
                        .bind(step.retry_policy.initial_backoff_ms)
                        .bind(step.retry_policy.max_backoff_ms)
                        .bind(step.retry_policy.multiplier)
                        .bind(step.timeout_seconds)
                        .bind(Json(step.required_labels))
                        .bind(position)
                        .bind(step.step_key)
                        .bind(now)
                        .execute(&mut *connection)
                        .await?;
                }
                Ok(())
            }

            /// A live workflow in scope and its steps in definition order, in one statement
            /// (one round trip, and the workflow and its steps as of one moment): a row per
            /// step, each with the workflow's columns beside it; one row of NULL steps when it
            /// has none.
            async fn resources_load_workflow(
                connection: &mut <$db as sqlx::Database>::Connection,
                scope: OwnerScope,
                workflow_id: Uuid,
            ) -> StoreResult<WorkflowWithSteps> {
                let rows = sqlx::query::<$db>(concat!(
                    "SELECT ",
                    workflow_columns_beside_steps!(),
                    ", ",
                    workflow_step_columns!(step),
                    workflow_with_steps_from!()
                ))
                .bind(workflow_id)
                .bind(scope.owner_id())
                .fetch_all(&mut *connection)
                .await?;
                Self::resources_workflow_from_rows(&rows)
            }

            /// `resources_load_workflow`'s rows with each step's agent beside it (NULL when
            /// it was deleted), decoded as `WorkflowToRun`.
            async fn resources_load_workflow_to_run(
                connection: &mut <$db as sqlx::Database>::Connection,
                scope: OwnerScope,
                workflow_id: Uuid,
            ) -> StoreResult<WorkflowToRun> {
                use sqlx::Row as _;
                let rows = sqlx::query::<$db>(concat!(
                    "SELECT ",
                    workflow_columns_beside_steps!(),
                    ", ",
                    workflow_step_columns!(step),
                    ", ",
                    agent_columns_beside_steps!(),
                    workflow_with_steps_from!(agents),
                ))
                .bind(workflow_id)
                .bind(scope.owner_id())
                .fetch_all(&mut *connection)
                .await?;
                let workflow = Self::resources_workflow_from_rows(&rows)?;
                let mut agents: Vec<Agent> = Vec::new();
                for row in &rows {
                    let Some(agent_id) = row.try_get::<Option<Uuid>, _>("agent_id_")? else {
                        continue;
                    };
                    if agents.iter().any(|agent| agent.id == agent_id) {
                        continue;
                    }
                    agents.push(Agent {
                        id: agent_id,
                        owner_id: row.try_get("agent_owner_id")?,
                        name: row.try_get("agent_name")?,
                        description: row.try_get("agent_description")?,
                        agent_type: row.try_get("agent_type_")?,
                        config: row.try_get::<Json<Value>, _>("agent_config")?.0,
                        limits: AgentLimits {
                            timeout_seconds: row.try_get("agent_timeout_seconds")?,
                            memory_mb: row.try_get("agent_memory_mb")?,
                            cpu_seconds: row.try_get("agent_cpu_seconds")?,
                            max_output_bytes: row.try_get("agent_max_output_bytes")?,
                        },
                        status: row.try_get("agent_status")?,
                        tags: row.try_get::<Json<Vec<String>>, _>("agent_tags")?.0,
                        version: row.try_get("agent_version")?,
                        created_at: row.try_get("agent_created_at")?,
                        updated_at: row.try_get("agent_updated_at")?,
                        deleted_at: row.try_get("agent_deleted_at")?,
                    });
                }
                Ok(WorkflowToRun { workflow, agents })
            }

            /// A workflow and its steps from `workflow_with_steps_from!`'s rows: the
            /// workflow's columns (`workflow_…`) from the first, a step from each row with
            /// one. No row is `NotFound`.
            fn resources_workflow_from_rows(
                rows: &[<$db as sqlx::Database>::Row],
            ) -> StoreResult<WorkflowWithSteps> {
                use sqlx::{FromRow as _, Row as _};
                let first = rows.first().ok_or(StoreError::NotFound)?;
                let mut steps = Vec::with_capacity(rows.len());
                for row in rows {
                    if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
                        steps.push(WorkflowStep::from_row(row)?);
                    }
                }
                let workflow = Workflow {
                    id: first.try_get("workflow_id_")?,
                    owner_id: first.try_get("workflow_owner_id")?,
                    name: first.try_get("workflow_name")?,
                    description: first.try_get("workflow_description")?,
                    default_input: first.try_get::<Json<Value>, _>("workflow_default_input")?.0,
                    priority: first.try_get("workflow_priority")?,
                    timeout_seconds: first.try_get("workflow_timeout_seconds")?,
                    tags: first.try_get::<Json<Vec<String>>, _>("workflow_tags")?.0,
                    version: first.try_get("workflow_version")?,
                    created_at: first.try_get("workflow_created_at")?,
                    updated_at: first.try_get("workflow_updated_at")?,
                    deleted_at: first.try_get("workflow_deleted_at")?,
                    step_count: i64::try_from(steps.len()).unwrap_or(i64::MAX),
                };
                Ok(WorkflowWithSteps { workflow, steps })
            }

            /// `ReferenceViolated` unless the deployment target is a live workflow or agent.
            async fn resources_ensure_target_live(
                connection: &mut <$db as sqlx::Database>::Connection,
                target: DeploymentTarget,
            ) -> StoreResult<()> {
                let (statement, target_id, field) = match target {
                    DeploymentTarget::Workflow(workflow_id) => (
                        "SELECT id FROM workflows WHERE id = $1 AND deleted_at IS NULL",
                        workflow_id,
                        "workflow_id",
                    ),
                    DeploymentTarget::Agent(agent_id) => (
                        "SELECT id FROM agents WHERE id = $1 AND deleted_at IS NULL",
                        agent_id,
                        "agent_id",
                    ),
                };
                let live_target: Option<Uuid> = sqlx::query_scalar::<$db, Uuid>(statement)
                    .bind(target_id)
                    .fetch_optional(&mut *connection)
                    .await?;
                if live_target.is_none() {
                    return Err(StoreError::ReferenceViolated(field.to_owned()));
                }
                Ok(())
            }

            /// Appends one event to a deployment's history.
            async fn resources_insert_deployment_event(
                connection: &mut <$db as sqlx::Database>::Connection,
                deployment_id: Uuid,
                event: NewDeploymentEvent,
                now: DateTime<Utc>,
            ) -> StoreResult<DeploymentEvent> {
                let event = sqlx::query_as::<$db, DeploymentEvent>(concat!(
                    "INSERT INTO deployment_events (id, deployment_id, kind, message, actor_id, \
                     created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING ",
                    deployment_event_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(deployment_id)
                .bind(event.kind)
                .bind(event.message)
                .bind(event.actor_id)
                .bind(now)
                .fetch_one(&mut *connection)
                .await?;
                Ok(event)
            }

            /// A live deployment in scope, read inside a transaction.
            async fn resources_load_deployment(
                connection: &mut <$db as sqlx::Database>::Connection,
                scope: OwnerScope,
                deployment_id: Uuid,
            ) -> StoreResult<Deployment> {
                let row = sqlx::query_as::<$db, DeploymentRow>(concat!(
                    "SELECT ",
                    deployment_columns!(),
                    " FROM deployments WHERE id = $1 AND deleted_at IS NULL \
                     AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(deployment_id)
                .bind(scope.owner_id())
                .fetch_optional(&mut *connection)
                .await?
                .ok_or(StoreError::NotFound)?;
                Deployment::try_from(row)
            }
        }

        #[async_trait]
        impl ResourceStore for $store {
            // ----- agents -----

            async fn create_agent(&self, new_agent: NewAgent) -> StoreResult<Agent> {
                let mut transaction = self.begin_write_transaction().await?;
                let agent = Self::resources_insert_agent(&mut transaction, new_agent).await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Agents);
                Ok(agent)
            }

            async fn get_agent(&self, scope: OwnerScope, agent_id: Uuid) -> StoreResult<Agent> {
                sqlx::query_as::<$db, Agent>(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents WHERE id = $1 AND deleted_at IS NULL \
                     AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(agent_id)
                .bind(scope.owner_id())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn update_agent(
                &self,
                scope: OwnerScope,
                agent_id: Uuid,
                expected_version: i64,
                changes: AgentChanges,
                changed_by: Uuid,
            ) -> StoreResult<Agent> {
                let mut transaction = self.begin_write_transaction().await?;
                let current = sqlx::query_as::<$db, Agent>(concat!(
                    "SELECT ",
                    agent_columns!(),
                    " FROM agents WHERE id = $1 AND deleted_at IS NULL \
                     AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(agent_id)
                .bind(scope.owner_id())
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(StoreError::NotFound)?;
                if current.version != expected_version {
                    return Err(StoreError::VersionConflict { current_version: current.version });
                }
                let (merged, changed_fields) = merge_agent_changes(&current, changes);
                if changed_fields.is_empty() {
                    return Ok(current);
                }
                let updated = sqlx::query_as::<$db, Agent>(concat!(
                    "UPDATE agents SET name = $3, description = $4, agent_type = $5, config = $6, \
                     timeout_seconds = $7, memory_mb = $8, cpu_seconds = $9, \
                     max_output_bytes = $10, tags = $11, updated_at = $12, version = version + 1 \
                     WHERE id = $1 AND version = $2 AND deleted_at IS NULL RETURNING ",
                    agent_columns!()
                ))
                .bind(agent_id)
                .bind(expected_version)
                .bind(merged.name)
                .bind(merged.description)
                .bind(merged.agent_type)
                .bind(Json(merged.config))
                .bind(merged.limits.timeout_seconds)
                .bind(merged.limits.memory_mb)
                .bind(merged.limits.cpu_seconds)
                .bind(merged.limits.max_output_bytes)
                .bind(Json(merged.tags))
                .bind(current_time())
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(updated) = updated else {
                    return Err(Self::resources_missing_or_conflict(
                        &mut transaction,
                        live_version_statement!("agents"),
                        agent_id,
                        scope,
                    )
                    .await);
                };
                Self::resources_insert_agent_version(
                    &mut transaction,
                    &updated,
                    changed_fields,
                    Some(changed_by),
                )
                .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Agents);
                Ok(updated)
            }

            async fn set_agent_status(
                &self,
                scope: OwnerScope,
                agent_id: Uuid,
                status: AgentStatus,
            ) -> StoreResult<Agent> {
                let agent = sqlx::query_as::<$db, Agent>(concat!(
                    "UPDATE agents SET status = $3, updated_at = $4 \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2) \
                     RETURNING ",
                    agent_columns!()
                ))
                .bind(agent_id)
                .bind(scope.owner_id())
                .bind(status)
                .bind(current_time())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)?;
                self.totals.changed(Listed::Agents);
                Ok(agent)
            }

            async fn soft_delete_agent(
                &self,
                scope: OwnerScope,
                agent_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let mut transaction = self.begin_write_transaction().await?;
                // Delete first: the row lock this takes on PostgreSQL makes a concurrent
                // workflow write that references the agent (`FOR SHARE`) wait for our outcome,
                // and a workflow committed before it is visible to the check below.
                Self::resources_soft_delete(
                    &mut transaction,
                    (soft_delete_statement!("agents"), live_version_statement!("agents")),
                    agent_id,
                    scope,
                    expected_version,
                )
                .await?;
                let using_workflows = sqlx::query_as::<$db, (Uuid, String)>(
                    "SELECT DISTINCT workflows.id, workflows.name FROM workflows \
                     JOIN workflow_steps ON workflow_steps.workflow_id = workflows.id \
                     WHERE workflow_steps.agent_id = $1 AND workflows.deleted_at IS NULL \
                     ORDER BY workflows.name, workflows.id",
                )
                .bind(agent_id)
                .fetch_all(&mut *transaction)
                .await?;
                if !using_workflows.is_empty() {
                    transaction.rollback().await?;
                    return Err(StoreError::InUse { by: using_workflows });
                }
                transaction.commit().await?;
                self.totals.changed(Listed::Agents);
                Ok(())
            }

            async fn list_agents(&self, filter: AgentFilter) -> StoreResult<Page<Agent>> {
                fn push_conditions(builder: &mut sqlx::QueryBuilder<$db>, filter: &AgentFilter) {
                    push_visible_rows(builder, filter.scope);
                    if let Some(search) = &filter.search {
                        push_search_filter(builder, search);
                    }
                    if let Some(agent_type) = filter.agent_type {
                        builder.push(" AND agent_type = ").push_bind(agent_type);
                    }
                    if let Some(status) = filter.status {
                        builder.push(" AND status = ").push_bind(status);
                    }
                    if let Some(tag) = &filter.tag {
                        <$store as Dialect>::push_tag_filter(builder, tag);
                    }
                }
                let list = PagedList {
                    counted: Some(CountKey::new(
                        Listed::Agents,
                        &(
                            filter.scope,
                            &filter.search,
                            filter.agent_type,
                            filter.status,
                            &filter.tag,
                        ),
                    )),
                    count_statement: "SELECT COUNT(*) FROM agents",
                    rows_statement: concat!("SELECT ", agent_columns!(), " FROM agents"),
                    order: sql_order(filter.sort),
                    page: filter.page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    push_conditions(builder, &filter)
                })
                .await
            }

            async fn list_agent_versions(
                &self,
                scope: OwnerScope,
                agent_id: Uuid,
                page: PageRequest,
            ) -> StoreResult<Page<AgentVersion>> {
                let visible: Option<i64> =
                    sqlx::query_scalar::<$db, i64>(live_version_statement!("agents"))
                        .bind(agent_id)
                        .bind(scope.owner_id())
                        .fetch_optional(&self.connections)
                        .await?;
                if visible.is_none() {
                    return Err(StoreError::NotFound);
                }
                let total: i64 = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM agent_versions WHERE agent_id = $1",
                )
                .bind(agent_id)
                .fetch_one(&self.connections)
                .await?;
                let items = sqlx::query_as::<$db, AgentVersion>(concat!(
                    "SELECT ",
                    agent_version_columns!(),
                    " FROM agent_versions WHERE agent_id = $1 ORDER BY version DESC \
                     LIMIT $2 OFFSET $3"
                ))
                .bind(agent_id)
                .bind(page.limit())
                .bind(page.offset())
                .fetch_all(&self.connections)
                .await?;
                Ok(Page { items, total })
            }

            async fn duplicate_agent(
                &self,
                scope: OwnerScope,
                agent_id: Uuid,
                new_owner_id: Uuid,
                new_name: String,
            ) -> StoreResult<Agent> {
                let source = self.get_agent(scope, agent_id).await?;
                self.create_agent(NewAgent {
                    owner_id: new_owner_id,
                    name: new_name,
                    description: source.description,
                    agent_type: source.agent_type,
                    config: source.config,
                    limits: source.limits,
                    tags: source.tags,
                })
                .await
            }

            async fn workflows_using_agent(
                &self,
                agent_id: Uuid,
            ) -> StoreResult<Vec<(Uuid, String)>> {
                let workflows = sqlx::query_as::<$db, (Uuid, String)>(
                    "SELECT DISTINCT workflows.id, workflows.name FROM workflows \
                     JOIN workflow_steps ON workflow_steps.workflow_id = workflows.id \
                     WHERE workflow_steps.agent_id = $1 AND workflows.deleted_at IS NULL \
                     ORDER BY workflows.name, workflows.id",
                )
                .bind(agent_id)
                .fetch_all(&self.connections)
                .await?;
                Ok(workflows)
            }

            // ----- workflows -----

            async fn create_workflow(
                &self,
                new_workflow: NewWorkflow,
            ) -> StoreResult<WorkflowWithSteps> {
                let mut transaction = self.begin_write_transaction().await?;
                let workflow_id = Uuid::now_v7();
                let now = current_time();
                sqlx::query::<$db>(
                    "INSERT INTO workflows (id, owner_id, name, description, default_input, \
                     priority, timeout_seconds, tags, version, created_at, updated_at, deleted_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9, NULL)",
                )
                .bind(workflow_id)
                .bind(new_workflow.owner_id)
                .bind(new_workflow.name)
                .bind(new_workflow.description)
                .bind(Json(new_workflow.default_input))
                .bind(new_workflow.priority)
                .bind(new_workflow.timeout_seconds)
                .bind(Json(new_workflow.tags))
                .bind(now)
                .execute(&mut *transaction)
                .await?;
                Self::resources_write_workflow_steps(
                    &mut transaction,
                    workflow_id,
                    new_workflow.steps,
                    now,
                )
                .await?;
                let created =
                    Self::resources_load_workflow(&mut transaction, OwnerScope::All, workflow_id)
                        .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Workflows);
                Ok(created)
            }

            async fn get_workflow(
                &self,
                scope: OwnerScope,
                workflow_id: Uuid,
            ) -> StoreResult<WorkflowWithSteps> {
                let mut connection = self.connections.acquire().await?;
                let workflow = Self::resources_load_workflow(&mut connection, scope, workflow_id).await;
                connection.kept_if_ok(workflow)
            }

            async fn get_workflow_to_run(
                &self,
                scope: OwnerScope,
                workflow_id: Uuid,
            ) -> StoreResult<WorkflowToRun> {
                let mut connection = self.connections.acquire().await?;
                let workflow =
                    Self::resources_load_workflow_to_run(&mut connection, scope, workflow_id).await;
                connection.kept_if_ok(workflow)
            }

            async fn update_workflow(
                &self,
                scope: OwnerScope,
                workflow_id: Uuid,
                expected_version: i64,
                changes: WorkflowChanges,
            ) -> StoreResult<WorkflowWithSteps> {
                let mut transaction = self.begin_write_transaction().await?;
                let current =
                    Self::resources_load_workflow(&mut transaction, scope, workflow_id).await?;
                if current.workflow.version != expected_version {
                    return Err(StoreError::VersionConflict {
                        current_version: current.workflow.version,
                    });
                }
                let (merged, workflow_changed) =
                    merge_workflow_changes(&current.workflow, &changes);
                if !workflow_changed && changes.steps.is_none() {
                    return Ok(current);
                }
                let now = current_time();
                let result = sqlx::query::<$db>(
                    "UPDATE workflows SET name = $3, description = $4, default_input = $5, \
                     priority = $6, timeout_seconds = $7, tags = $8, updated_at = $9, \
                     version = version + 1 \
                     WHERE id = $1 AND version = $2 AND deleted_at IS NULL",
                )
                .bind(workflow_id)
                .bind(expected_version)
                .bind(merged.name)
                .bind(merged.description)
                .bind(Json(merged.default_input))
                .bind(merged.priority)
                .bind(merged.timeout_seconds)
                .bind(Json(merged.tags))
                .bind(now)
                .execute(&mut *transaction)
                .await?;
                if result.rows_affected() == 0 {
                    return Err(Self::resources_missing_or_conflict(
                        &mut transaction,
                        live_version_statement!("workflows"),
                        workflow_id,
                        scope,
                    )
                    .await);
                }
                if let Some(steps) = changes.steps {
                    Self::resources_write_workflow_steps(&mut transaction, workflow_id, steps, now)
                        .await?;
                }
                let updated =
                    Self::resources_load_workflow(&mut transaction, OwnerScope::All, workflow_id)
                        .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Workflows);
                Ok(updated)
            }

            async fn soft_delete_workflow(
                &self,
                scope: OwnerScope,
                workflow_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let mut connection = self.connections.acquire().await?;
                let deleted = Self::resources_soft_delete(
                    &mut connection,
                    (soft_delete_statement!("workflows"), live_version_statement!("workflows")),
                    workflow_id,
                    scope,
                    expected_version,
                )
                .await;
                self.totals.changed(Listed::Workflows);
                deleted
            }

            async fn list_workflows(&self, filter: WorkflowFilter) -> StoreResult<Page<Workflow>> {
                fn push_conditions(builder: &mut sqlx::QueryBuilder<$db>, filter: &WorkflowFilter) {
                    push_visible_rows(builder, filter.scope);
                    if let Some(search) = &filter.search {
                        push_search_filter(builder, search);
                    }
                    if let Some(tag) = &filter.tag {
                        <$store as Dialect>::push_tag_filter(builder, tag);
                    }
                }
                let list = PagedList {
                    counted: Some(CountKey::new(
                        Listed::Workflows,
                        &(filter.scope, &filter.search, &filter.tag),
                    )),
                    count_statement: "SELECT COUNT(*) FROM workflows",
                    rows_statement: concat!("SELECT ", workflow_columns!(), " FROM workflows"),
                    order: sql_order(filter.sort),
                    page: filter.page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    push_conditions(builder, &filter)
                })
                .await
            }

            // ----- templates -----

            async fn create_template(&self, new_template: NewTemplate) -> StoreResult<Template> {
                let template = sqlx::query_as::<$db, Template>(concat!(
                    "INSERT INTO templates (id, owner_id, name, description, category, tags, \
                     is_public, kind, body, parameters, version, created_at, updated_at, \
                     deleted_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 1, $11, $11, NULL) RETURNING ",
                    template_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(new_template.owner_id)
                .bind(new_template.name)
                .bind(new_template.description)
                .bind(new_template.category)
                .bind(Json(new_template.tags))
                .bind(new_template.is_public)
                .bind(new_template.kind)
                .bind(Json(new_template.body))
                .bind(Json(new_template.parameters))
                .bind(current_time())
                .fetch_one(&self.connections)
                .await?;
                self.totals.changed(Listed::Templates);
                Ok(template)
            }

            async fn get_template(
                &self,
                viewer: OwnerScope,
                template_id: Uuid,
            ) -> StoreResult<Template> {
                sqlx::query_as::<$db, Template>(concat!(
                    "SELECT ",
                    template_columns!(),
                    " FROM templates WHERE id = $1 AND deleted_at IS NULL \
                     AND ($2 IS NULL OR owner_id = $2 OR owner_id IS NULL OR is_public)"
                ))
                .bind(template_id)
                .bind(viewer.owner_id())
                .fetch_optional(&self.connections)
                .await?
                .ok_or(StoreError::NotFound)
            }

            async fn update_template(
                &self,
                scope: OwnerScope,
                template_id: Uuid,
                expected_version: i64,
                changes: TemplateChanges,
            ) -> StoreResult<Template> {
                let mut transaction = self.begin_write_transaction().await?;
                // Only the owner (or an administrator) may write: the strict owner condition.
                let current = sqlx::query_as::<$db, Template>(concat!(
                    "SELECT ",
                    template_columns!(),
                    " FROM templates WHERE id = $1 AND deleted_at IS NULL \
                     AND ($2 IS NULL OR owner_id = $2)"
                ))
                .bind(template_id)
                .bind(scope.owner_id())
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(StoreError::NotFound)?;
                if current.version != expected_version {
                    return Err(StoreError::VersionConflict { current_version: current.version });
                }
                let (merged, changed) = merge_template_changes(&current, changes);
                if !changed {
                    return Ok(current);
                }
                let updated = sqlx::query_as::<$db, Template>(concat!(
                    "UPDATE templates SET name = $3, description = $4, category = $5, tags = $6, \
                     is_public = $7, kind = $8, body = $9, parameters = $10, updated_at = $11, \
                     version = version + 1 \
                     WHERE id = $1 AND version = $2 AND deleted_at IS NULL RETURNING ",
                    template_columns!()
                ))
                .bind(template_id)
                .bind(expected_version)
                .bind(merged.name)
                .bind(merged.description)
                .bind(merged.category)
                .bind(Json(merged.tags))
                .bind(merged.is_public)
                .bind(merged.kind)
                .bind(Json(merged.body))
                .bind(Json(merged.parameters))
                .bind(current_time())
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(updated) = updated else {
                    return Err(Self::resources_missing_or_conflict(
                        &mut transaction,
                        live_version_statement!("templates"),
                        template_id,
                        scope,
                    )
                    .await);
                };
                transaction.commit().await?;
                self.totals.changed(Listed::Templates);
                Ok(updated)
            }

            async fn soft_delete_template(
                &self,
                scope: OwnerScope,
                template_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let mut connection = self.connections.acquire().await?;
                let deleted = Self::resources_soft_delete(
                    &mut connection,
                    (soft_delete_statement!("templates"), live_version_statement!("templates")),
                    template_id,
                    scope,
                    expected_version,
                )
                .await;
                self.totals.changed(Listed::Templates);
                deleted
            }

            async fn list_templates(&self, filter: TemplateFilter) -> StoreResult<Page<Template>> {
                fn push_conditions(builder: &mut sqlx::QueryBuilder<$db>, filter: &TemplateFilter) {
                    builder.push(" WHERE deleted_at IS NULL");
                    if let Some(viewer_id) = filter.viewer.owner_id() {
                        if filter.mine_only {
                            builder.push(" AND owner_id = ").push_bind(viewer_id);
                        } else {
                            builder
                                .push(" AND (owner_id = ")
                                .push_bind(viewer_id)
                                .push(" OR owner_id IS NULL OR is_public)");
                        }
                    }
                    if let Some(search) = &filter.search {
                        push_search_filter(builder, search);
                    }
                    if let Some(category) = &filter.category {
                        builder.push(" AND category = ").push_bind(category.clone());
                    }
                    if let Some(kind) = filter.kind {
                        builder.push(" AND kind = ").push_bind(kind);
                    }
                    if let Some(tag) = &filter.tag {
                        <$store as Dialect>::push_tag_filter(builder, tag);
                    }
                }
                let list = PagedList {
                    counted: Some(CountKey::new(
                        Listed::Templates,
                        &(
                            filter.viewer,
                            &filter.search,
                            &filter.category,
                            filter.kind,
                            &filter.tag,
                            filter.mine_only,
                        ),
                    )),
                    count_statement: "SELECT COUNT(*) FROM templates",
                    rows_statement: concat!("SELECT ", template_columns!(), " FROM templates"),
                    order: sql_order(filter.sort),
                    page: filter.page,
                };
                fetch_page(&self.connections, &self.totals, list, |builder| {
                    push_conditions(builder, &filter)
                })
                .await
            }

            async fn upsert_builtin_template(
                &self,
                template: BuiltinTemplate,
            ) -> StoreResult<BuiltinTemplateOutcome> {
                let mut transaction = self.begin_write_transaction().await?;
                let stored = sqlx::query_as::<$db, Template>(concat!(
                    "SELECT ",
                    template_columns!(),
                    " FROM templates WHERE id = $1"
                ))
                .bind(template.id)
                .fetch_optional(&mut *transaction)
                .await?;
                let now = current_time();
                let outcome = match stored {
                    None => {
                        sqlx::query::<$db>(
                            "INSERT INTO templates (id, owner_id, name, description, category, \
                             tags, is_public, kind, body, parameters, version, created_at, \
                             updated_at, deleted_at) \
                             VALUES ($1, NULL, $2, $3, $4, $5, TRUE, $6, $7, $8, 1, $9, $9, NULL)",
                        )
                        .bind(template.id)
                        .bind(template.name)
                        .bind(template.description)
                        .bind(template.category)
                        .bind(Json(template.tags))
                        .bind(template.kind)
                        .bind(Json(template.body))
                        .bind(Json(template.parameters))
                        .bind(now)
                        .execute(&mut *transaction)
                        .await?;
                        BuiltinTemplateOutcome::Inserted
                    }
                    Some(stored) if stored.owner_id.is_some() => {
                        return Err(StoreError::AlreadyExists("template id".to_owned()));
                    }
                    Some(stored) if stored.deleted_at.is_some() => {
                        BuiltinTemplateOutcome::KeptDeleted
                    }
                    Some(stored) if builtin_template_matches(&stored, &template) => {
                        BuiltinTemplateOutcome::Unchanged
                    }
                    Some(_) => {
                        sqlx::query::<$db>(
                            "UPDATE templates SET name = $2, description = $3, category = $4, \
                             tags = $5, is_public = TRUE, kind = $6, body = $7, parameters = $8, \
                             updated_at = $9, version = version + 1 WHERE id = $1",
                        )
                        .bind(template.id)
                        .bind(template.name)
                        .bind(template.description)
                        .bind(template.category)
                        .bind(Json(template.tags))
                        .bind(template.kind)
                        .bind(Json(template.body))
                        .bind(Json(template.parameters))
                        .bind(now)
                        .execute(&mut *transaction)
                        .await?;
                        BuiltinTemplateOutcome::Updated
                    }
                };
                transaction.commit().await?;
                self.totals.changed(Listed::Templates);
                Ok(outcome)
            }

            // ----- deployments -----

            async fn create_deployment(
                &self,
                new_deployment: NewDeployment,
            ) -> StoreResult<Deployment> {
                let mut transaction = self.begin_write_transaction().await?;
                Self::resources_ensure_target_live(&mut transaction, new_deployment.target).await?;
                let now = current_time();
                let trigger = &new_deployment.trigger;
                let row = sqlx::query_as::<$db, DeploymentRow>(concat!(
                    "INSERT INTO deployments (id, owner_id, name, description, workflow_id, \
                     agent_id, environment, config, trigger_type, cron_expression, timezone, \
                     webhook_secret, status, last_triggered_at, next_run_at, version, created_at, \
                     updated_at, deleted_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, NULL, NULL, 1, \
                     $14, $14, NULL) RETURNING ",
                    deployment_columns!()
                ))
                .bind(Uuid::now_v7())
                .bind(new_deployment.owner_id)
                .bind(new_deployment.name)
                .bind(new_deployment.description)
                .bind(new_deployment.target.workflow_id())
                .bind(new_deployment.target.agent_id())
                .bind(new_deployment.environment)
                .bind(Json(new_deployment.config))
                .bind(trigger.trigger_type())
                .bind(trigger.cron_expression())
                .bind(trigger.timezone())
                .bind(trigger.webhook_secret())
                .bind(DeploymentStatus::Stopped)
                .bind(now)
                .fetch_one(&mut *transaction)
                .await?;
                let deployment = Deployment::try_from(row)?;
                Self::resources_insert_deployment_event(
                    &mut transaction,
                    deployment.id,
                    NewDeploymentEvent {
                        kind: DeploymentEventKind::Created,
                        message: "deployment created".to_owned(),
                        actor_id: Some(deployment.owner_id),
                    },
                    now,
                )
                .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Deployments);
                Ok(deployment)
            }

            async fn get_deployment(
                &self,
                scope: OwnerScope,
                deployment_id: Uuid,
            ) -> StoreResult<Deployment> {
                let mut connection = self.connections.acquire().await?;
                let deployment =
                    Self::resources_load_deployment(&mut connection, scope, deployment_id).await;
                connection.kept_if_ok(deployment)
            }

            async fn get_deployment_unscoped(&self, deployment_id: Uuid) -> StoreResult<Deployment> {
                self.get_deployment(OwnerScope::All, deployment_id).await
            }

            async fn update_deployment(
                &self,
                scope: OwnerScope,
                deployment_id: Uuid,
                expected_version: i64,
                changes: DeploymentChanges,
                actor_id: Option<Uuid>,
            ) -> StoreResult<Deployment> {
                let mut transaction = self.begin_write_transaction().await?;
                let current =
                    Self::resources_load_deployment(&mut transaction, scope, deployment_id).await?;
                if current.version != expected_version {
                    return Err(StoreError::VersionConflict { current_version: current.version });
                }
                let (merged, changed_fields) = merge_deployment_changes(&current, changes);
                if changed_fields.is_empty() {
                    return Ok(current);
                }
                if merged.target != current.target {
                    Self::resources_ensure_target_live(&mut transaction, merged.target).await?;
                }
                let now = current_time();
                let row = sqlx::query_as::<$db, DeploymentRow>(concat!(
                    "UPDATE deployments SET name = $3, description = $4, workflow_id = $5, \
                     agent_id = $6, environment = $7, config = $8, trigger_type = $9, \
                     cron_expression = $10, timezone = $11, webhook_secret = $12, \
                     next_run_at = $13, updated_at = $14, version = version + 1 \
                     WHERE id = $1 AND version = $2 AND deleted_at IS NULL RETURNING ",
                    deployment_columns!()
                ))
                .bind(deployment_id)
                .bind(expected_version)
                .bind(&merged.name)
                .bind(&merged.description)
                .bind(merged.target.workflow_id())
                .bind(merged.target.agent_id())
                .bind(merged.environment)
                .bind(Json(&merged.config))
                .bind(merged.trigger.trigger_type())
                .bind(merged.trigger.cron_expression())
                .bind(merged.trigger.timezone())
                .bind(merged.trigger.webhook_secret())
                .bind(merged.next_run_at)
                .bind(now)
                .fetch_optional(&mut *transaction)
                .await?;
                let Some(row) = row else {
                    return Err(Self::resources_missing_or_conflict(
                        &mut transaction,
                        live_version_statement!("deployments"),
                        deployment_id,
                        scope,
                    )
                    .await);
                };
                let updated = Deployment::try_from(row)?;
                Self::resources_insert_deployment_event(
                    &mut transaction,
                    deployment_id,
                    NewDeploymentEvent {
                        kind: DeploymentEventKind::Updated,
                        message: format!("updated {}", changed_fields.join(", ")),
                        actor_id,
                    },
                    now,
                )
                .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Deployments);
                Ok(updated)
            }

            async fn soft_delete_deployment(
                &self,
                scope: OwnerScope,
                deployment_id: Uuid,
                expected_version: Option<i64>,
            ) -> StoreResult<()> {
                let mut connection = self.connections.acquire().await?;
                let deleted = Self::resources_soft_delete(
                    &mut connection,
                    (soft_delete_statement!("deployments"), live_version_statement!("deployments")),
                    deployment_id,
                    scope,
                    expected_version,
                )
                .await;
                self.totals.changed(Listed::Deployments);
                deleted
            }

            async fn list_deployments(
                &self,
                filter: DeploymentFilter,
            ) -> StoreResult<Page<Deployment>> {
                fn push_conditions(
                    builder: &mut sqlx::QueryBuilder<$db>,
                    filter: &DeploymentFilter,
                ) {
                    push_visible_rows(builder, filter.scope);
                    if let Some(search) = &filter.search {
                        push_search_filter(builder, search);
                    }
                    if let Some(status) = filter.status {
                        builder.push(" AND status = ").push_bind(status);
                    }
                    if let Some(environment) = filter.environment {
                        builder.push(" AND environment = ").push_bind(environment);
                    }
                    if let Some(trigger_type) = filter.trigger_type {
                        builder.push(" AND trigger_type = ").push_bind(trigger_type);
                    }
                    if let Some(workflow_id) = filter.workflow_id {
                        builder.push(" AND workflow_id = ").push_bind(workflow_id);
                    }
                    if let Some(agent_id) = filter.agent_id {
                        builder.push(" AND agent_id = ").push_bind(agent_id);
                    }
                }
                let list = PagedList {
                    counted: Some(CountKey::new(
                        Listed::Deployments,
                        &(
                            filter.scope,
                            &filter.search,
                            filter.status,
                            filter.environment,
                            filter.trigger_type,
                            filter.workflow_id,
                            filter.agent_id,
                        ),
                    )),
                    count_statement: "SELECT COUNT(*) FROM deployments",
                    rows_statement: concat!("SELECT ", deployment_columns!(), " FROM deployments"),
                    order: sql_order(filter.sort),
                    page: filter.page,
                };
                let rows: Page<DeploymentRow> =
                    fetch_page(&self.connections, &self.totals, list, |builder| {
                        push_conditions(builder, &filter)
                    })
                    .await?;
                Ok(Page { items: deployments_from_rows(rows.items)?, total: rows.total })
            }

            async fn set_deployment_status(
                &self,
                scope: OwnerScope,
                deployment_id: Uuid,
                status: DeploymentStatus,
                event: NewDeploymentEvent,
            ) -> StoreResult<Deployment> {
                let mut transaction = self.begin_write_transaction().await?;
                let now = current_time();
                let row = sqlx::query_as::<$db, DeploymentRow>(concat!(
                    "UPDATE deployments SET status = $3, updated_at = $4 \
                     WHERE id = $1 AND deleted_at IS NULL AND ($2 IS NULL OR owner_id = $2) \
                     RETURNING ",
                    deployment_columns!()
                ))
                .bind(deployment_id)
                .bind(scope.owner_id())
                .bind(status)
                .bind(now)
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(StoreError::NotFound)?;
                let deployment = Deployment::try_from(row)?;
                Self::resources_insert_deployment_event(
                    &mut transaction,
                    deployment_id,
                    event,
                    now,
                )
                .await?;
                transaction.commit().await?;
                self.totals.changed(Listed::Deployments);
                Ok(deployment)
            }

            async fn append_deployment_event(
                &self,
                deployment_id: Uuid,
                event: NewDeploymentEvent,
            ) -> StoreResult<DeploymentEvent> {
                let mut transaction = self.begin_write_transaction().await?;
                let live: Option<i64> =
                    sqlx::query_scalar::<$db, i64>(live_version_statement!("deployments"))
                        .bind(deployment_id)
                        .bind(None::<Uuid>)
                        .fetch_optional(&mut *transaction)
                        .await?;
                if live.is_none() {
                    return Err(StoreError::NotFound);
                }
                let appended = Self::resources_insert_deployment_event(
                    &mut transaction,
                    deployment_id,
                    event,
                    current_time(),
                )
                .await?;
                transaction.commit().await?;
                Ok(appended)
            }

            async fn list_deployment_events(
                &self,
                scope: OwnerScope,
                deployment_id: Uuid,
                page: PageRequest,
            ) -> StoreResult<Page<DeploymentEvent>> {
                let visible: Option<i64> =
                    sqlx::query_scalar::<$db, i64>(live_version_statement!("deployments"))
                        .bind(deployment_id)
                        .bind(scope.owner_id())
                        .fetch_optional(&self.connections)
                        .await?;
                if visible.is_none() {
                    return Err(StoreError::NotFound);
                }
                let total: i64 = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM deployment_events WHERE deployment_id = $1",
                )
                .bind(deployment_id)
                .fetch_one(&self.connections)
                .await?;
                let items = sqlx::query_as::<$db, DeploymentEvent>(concat!(
                    "SELECT ",
                    deployment_event_columns!(),
                    " FROM deployment_events WHERE deployment_id = $1 \
                     ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
                ))
                .bind(deployment_id)
                .bind(page.limit())
                .bind(page.offset())
                .fetch_all(&self.connections)
                .await?;
                Ok(Page { items, total })
            }

            async fn list_due_cron_deployments(
                &self,
                now: DateTime<Utc>,
                limit: u32,
            ) -> StoreResult<Vec<Deployment>> {
                let rows = sqlx::query_as::<$db, DeploymentRow>(concat!(
                    "SELECT ",
                    deployment_columns!(),
                    " FROM deployments WHERE deleted_at IS NULL AND status = 'RUNNING' \
                     AND trigger_type = 'CRON' AND next_run_at IS NOT NULL AND next_run_at <= $1 \
                     ORDER BY next_run_at, id LIMIT $2"
                ))
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
                deployments_from_rows(rows)
            }

            async fn set_next_run(
                &self,
                deployment_id: Uuid,
                next_run_at: Option<DateTime<Utc>>,
                last_triggered_at: Option<DateTime<Utc>>,
            ) -> StoreResult<()> {
                let result = sqlx::query::<$db>(
                    "UPDATE deployments SET next_run_at = $2, \
                     last_triggered_at = COALESCE($3, last_triggered_at) \
                     WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(deployment_id)
                .bind(next_run_at.map(stored_time))
                .bind(last_triggered_at.map(stored_time))
                .execute(&self.connections)
                .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            }

            async fn record_deployment_trigger(
                &self,
                deployment_id: Uuid,
                triggered_at: DateTime<Utc>,
                event: NewDeploymentEvent,
            ) -> StoreResult<DeploymentEvent> {
                let mut transaction = self.begin_write_transaction().await?;
                let result = sqlx::query::<$db>(
                    "UPDATE deployments SET last_triggered_at = $2 \
                     WHERE id = $1 AND deleted_at IS NULL",
                )
                .bind(deployment_id)
                .bind(stored_time(triggered_at))
                .execute(&mut *transaction)
                .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                let appended = Self::resources_insert_deployment_event(
                    &mut transaction,
                    deployment_id,
                    event,
                    current_time(),
                )
                .await?;
                transaction.commit().await?;
                Ok(appended)
            }

            async fn record_webhook_delivery(
                &self,
                deployment_id: Uuid,
                delivery_id: &str,
                received_at: DateTime<Utc>,
                forget_before: DateTime<Utc>,
            ) -> StoreResult<bool> {
                let mut transaction = self.begin_write_transaction().await?;
                sqlx::query::<$db>(
                    "DELETE FROM webhook_deliveries WHERE deployment_id = $1 AND received_at < $2",
                )
                .bind(deployment_id)
                .bind(stored_time(forget_before))
                .execute(&mut *transaction)
                .await?;
                let inserted = sqlx::query::<$db>(
                    "INSERT INTO webhook_deliveries (deployment_id, delivery_id, received_at) \
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                )
                .bind(deployment_id)
                .bind(delivery_id.to_owned())
                .bind(stored_time(received_at))
                .execute(&mut *transaction)
                .await?;
                transaction.commit().await?;
                Ok(inserted.rows_affected() == 1)
            }

            async fn sync_agent_status_with_deployments(
                &self,
                agent_id: Uuid,
            ) -> StoreResult<AgentStatus> {
                let mut transaction = self.begin_write_transaction().await?;
                let current: AgentStatus = sqlx::query_scalar::<$db, AgentStatus>(
                    <$store as Dialect>::LOCK_AGENT_STATUS,
                )
                .bind(agent_id)
                .fetch_optional(&mut *transaction)
                .await?
                .ok_or(StoreError::NotFound)?;
                if !matches!(current, AgentStatus::Idle | AgentStatus::Running) {
                    return Ok(current);
                }
                // Read after the lock: sees every deployment change committed before it.
                let running: i64 = sqlx::query_scalar::<$db, i64>(
                    "SELECT COUNT(*) FROM deployments WHERE agent_id = $1 \
                     AND status = 'RUNNING' AND deleted_at IS NULL",
                )
                .bind(agent_id)
                .fetch_one(&mut *transaction)
                .await?;
                let wanted = if running > 0 { AgentStatus::Running } else { AgentStatus::Idle };
                if wanted != current {
                    sqlx::query::<$db>("UPDATE agents SET status = $2, updated_at = $3 WHERE id = $1")
                        .bind(agent_id)
                        .bind(wanted)
                        .bind(current_time())
                        .execute(&mut *transaction)
                        .await?;
                }
                transaction.commit().await?;
                self.totals.changed(Listed::Agents);
                Ok(wanted)
            }
        }
    };
}

impl_resource_store!(super::PostgresStore, sqlx::Postgres);
impl_resource_store!(super::SqliteStore, sqlx::Sqlite);
