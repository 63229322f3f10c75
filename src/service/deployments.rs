//! Deployments: a workflow or an agent bound to a trigger (manual, cron, signed webhook) in an
//! environment; create, read, change, delete, start, stop and the combined log of lifecycle
//! events and execution log lines. Also what the triggers do: start one execution of the
//! deployment (`start_triggered_execution`, a single agent running as a one-step workflow),
//! the signed webhook call (`trigger_webhook`), and the agent status that follows the
//! deployments. The cron loop that fires schedules lives in `super::triggers`.
//! May call: the store, the audit trail, the executions service and the engine's schedules,
//! DAG checks and definition snapshots.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::agents;
use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::executions::{self, ExecutionStart};
use super::signing::{self, signature_matches, signed_payload};
use super::validate;
use super::validate::{
    MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Validator, page_request, parse_id, sort_order,
    update_mask_fields,
};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::engine::definition::ExecutionDefinition;
use crate::engine::schedule::{self, Schedule};
use crate::error::{ErrorCode, ServiceError, ServiceResult};
use crate::proto::json;
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    Agent, CronRunClaim, Deployment, DeploymentChanges, DeploymentEnvironment, DeploymentEvent,
    DeploymentEventKind, DeploymentFilter, DeploymentSortField, DeploymentStatus, DeploymentTarget,
    DeploymentTrigger, DeploymentTriggerType, Execution, ExecutionFilter, ExecutionLog,
    ExecutionLogFilter, ExecutionLogLevel, ExecutionTrigger, NewDeployment, NewDeploymentEvent,
    NewStepRun, OwnerScope, PageRequest, RetryPolicy, SortOrder, StepRun, StoreError,
};

/// The longest search text of a list.
const MAX_SEARCH_CHARS: usize = 200;
/// The most environment values a deployment carries.
pub const MAX_ENVIRONMENT_VALUES: usize = 100;
/// The longest environment value.
pub const MAX_ENVIRONMENT_VALUE_CHARS: usize = 4_096;
/// The largest configuration, as compact JSON.
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Random bytes in a webhook secret (shown as 64 hex digits).
/// The most entries the deployment log reads to merge one page. Past it, the log keeps the
/// lifecycle events and the lines of the newest executions that fit.
pub const MAX_MERGED_LOG_ENTRIES: usize = 20_000;
/// Rows read per store call while merging the log.
const LOG_READ_BATCH: u32 = 100;

/// The JSON name of the deployment message, for decoding and encoding stored configs.
const CONFIG_MESSAGE: &str = "turbocat.v1.DeploymentConfig";

/// The sort keys of the deployments list, by their JSON names.
const DEPLOYMENT_SORT_FIELDS: &[(&str, DeploymentSortField)] = &[
    ("name", DeploymentSortField::Name),
    ("createdAt", DeploymentSortField::CreatedAt),
    ("updatedAt", DeploymentSortField::UpdatedAt),
    ("status", DeploymentSortField::Status),
    ("environment", DeploymentSortField::Environment),
];

/// A field `UpdateDeployment` may change, named by the update mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeploymentField {
    Name,
    Description,
    WorkflowId,
    AgentId,
    Environment,
    Config,
    Trigger,
}

/// The fields `UpdateDeployment` may change, by their JSON names, in the order they are checked.
const UPDATABLE_FIELDS: &[(&str, DeploymentField)] = &[
    ("name", DeploymentField::Name),
    ("description", DeploymentField::Description),
    ("workflowId", DeploymentField::WorkflowId),
    ("agentId", DeploymentField::AgentId),
    ("environment", DeploymentField::Environment),
    ("config", DeploymentField::Config),
    ("trigger", DeploymentField::Trigger),
];

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// The path a webhook deployment is triggered at.
pub fn webhook_path(deployment_id: Uuid) -> String {
    format!("/api/v1/webhooks/{deployment_id}")
}

fn environment_to_proto(environment: DeploymentEnvironment) -> pb::DeploymentEnvironment {
    match environment {
        DeploymentEnvironment::Development => pb::DeploymentEnvironment::Development,
        DeploymentEnvironment::Staging => pb::DeploymentEnvironment::Staging,
        DeploymentEnvironment::Production => pb::DeploymentEnvironment::Production,
    }
}

/// `None` for UNSPECIFIED and unknown numbers.
fn environment_from_proto(number: i32) -> Option<DeploymentEnvironment> {
    match pb::DeploymentEnvironment::try_from(number).ok()? {
        pb::DeploymentEnvironment::Development => Some(DeploymentEnvironment::Development),
        pb::DeploymentEnvironment::Staging => Some(DeploymentEnvironment::Staging),
        pb::DeploymentEnvironment::Production => Some(DeploymentEnvironment::Production),
        pb::DeploymentEnvironment::Unspecified => None,
    }
}

fn status_to_proto(status: DeploymentStatus) -> pb::DeploymentStatus {
    match status {
        DeploymentStatus::Stopped => pb::DeploymentStatus::Stopped,
        DeploymentStatus::Running => pb::DeploymentStatus::Running,
        DeploymentStatus::Failed => pb::DeploymentStatus::Failed,
    }
}

fn status_from_proto(number: i32) -> Option<DeploymentStatus> {
    match pb::DeploymentStatus::try_from(number).ok()? {
        pb::DeploymentStatus::Stopped => Some(DeploymentStatus::Stopped),
        pb::DeploymentStatus::Running => Some(DeploymentStatus::Running),
        pb::DeploymentStatus::Failed => Some(DeploymentStatus::Failed),
        pb::DeploymentStatus::Unspecified => None,
    }
}

fn trigger_type_from_proto(number: i32) -> Option<DeploymentTriggerType> {
    match pb::TriggerType::try_from(number).ok()? {
        pb::TriggerType::Manual => Some(DeploymentTriggerType::Manual),
        pb::TriggerType::Cron => Some(DeploymentTriggerType::Cron),
        pb::TriggerType::Webhook => Some(DeploymentTriggerType::Webhook),
        pb::TriggerType::Unspecified => None,
    }
}

/// The trigger as the API shows it: the webhook secret only to the deployment's owner.
fn trigger_to_proto(deployment: &Deployment, show_secret: bool) -> pb::DeploymentTrigger {
    match &deployment.trigger {
        DeploymentTrigger::Manual => {
            pb::DeploymentTrigger { r#type: pb::TriggerType::Manual.into(), ..Default::default() }
        }
        DeploymentTrigger::Cron { expression, timezone } => pb::DeploymentTrigger {
            r#type: pb::TriggerType::Cron.into(),
            cron_expression: expression.clone(),
            timezone: timezone.clone(),
            ..Default::default()
        },
        DeploymentTrigger::Webhook { secret } => pb::DeploymentTrigger {
            r#type: pb::TriggerType::Webhook.into(),
            webhook_secret: if show_secret { secret.clone() } else { String::new() },
            webhook_path: webhook_path(deployment.id),
            ..Default::default()
        },
    }
}

/// The stored configuration as its message; a stored value that does not decode shows empty.
pub fn config_from_json(config: &Value) -> pb::DeploymentConfig {
    json::decode::<pb::DeploymentConfig>(CONFIG_MESSAGE, config.clone()).unwrap_or_default()
}

/// A deployment as the API shows it to `caller`.
pub fn deployment_to_proto(deployment: &Deployment, caller: &Caller) -> pb::Deployment {
    let show_secret = deployment.owner_id == caller.user_id;
    pb::Deployment {
        id: deployment.id.to_string(),
        owner_id: deployment.owner_id.to_string(),
        name: deployment.name.clone(),
        description: deployment.description.clone(),
        workflow_id: deployment.target.workflow_id().map(|id| id.to_string()).unwrap_or_default(),
        agent_id: deployment.target.agent_id().map(|id| id.to_string()).unwrap_or_default(),
        environment: environment_to_proto(deployment.environment).into(),
        config: Some(config_from_json(&deployment.config)),
        trigger: Some(trigger_to_proto(deployment, show_secret)),
        status: status_to_proto(deployment.status).into(),
        last_triggered_at: wkt::optional_timestamp(deployment.last_triggered_at),
        next_run_at: wkt::optional_timestamp(deployment.next_run_at),
        version: i32::try_from(deployment.version).unwrap_or(i32::MAX),
        created_at: Some(wkt::timestamp(deployment.created_at)),
        updated_at: Some(wkt::timestamp(deployment.updated_at)),
    }
}

/// What the audit trail keeps of a deployment: never the webhook secret.
fn audit_snapshot(deployment: &Deployment) -> Value {
    let trigger = match &deployment.trigger {
        DeploymentTrigger::Manual => json!({ "type": "MANUAL" }),
        DeploymentTrigger::Cron { expression, timezone } => {
            json!({ "type": "CRON", "cronExpression": expression, "timezone": timezone })
        }
        DeploymentTrigger::Webhook { .. } => json!({ "type": "WEBHOOK" }),
    };
    json!({
        "name": deployment.name,
        "description": deployment.description,
        "workflowId": deployment.target.workflow_id(),
        "agentId": deployment.target.agent_id(),
        "environment": deployment.environment.as_str(),
        "trigger": trigger,
        "status": deployment.status.as_str(),
        "version": deployment.version,
    })
}

// ---------------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------------

/// A fresh webhook secret: 32 random bytes from the operating system's generator, as hex.
fn new_webhook_secret() -> String {
    signing::new_secret()
}

fn is_environment_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
}

/// Checks a configuration and returns it as stored JSON (`{}` when absent).
fn check_config(
    validator: &mut Validator,
    config: Option<&pb::DeploymentConfig>,
    max_depth: usize,
) -> Value {
    let Some(config) = config else {
        return json::encode(CONFIG_MESSAGE, &pb::DeploymentConfig::default());
    };
    if config.environment_values.len() > MAX_ENVIRONMENT_VALUES {
        validator.error(
            "config.environmentValues",
            format!("must hold at most {MAX_ENVIRONMENT_VALUES} values"),
        );
    }
    let mut names: Vec<&String> = config.environment_values.keys().collect();
    names.sort();
    for name in names {
        let field = format!("config.environmentValues.{name}");
        if !is_environment_name(name) || name.len() > 128 {
            validator.error(
                &field,
                "names must be letters, digits and _, not starting with a digit (at most 128)",
            );
        }
        let value = &config.environment_values[name];
        validator.max_chars(&field, value, MAX_ENVIRONMENT_VALUE_CHARS);
    }
    if let Some(defaults) = &config.input_defaults {
        validator.json_depth("config.inputDefaults", &wkt::struct_to_json(defaults), max_depth);
    }
    let stored = json::encode(CONFIG_MESSAGE, config);
    if stored.to_string().len() > MAX_CONFIG_BYTES {
        validator.error("config", format!("must be at most {MAX_CONFIG_BYTES} bytes of JSON"));
    }
    stored
}

/// What a request's trigger asks for, before a webhook secret is chosen.
pub(crate) enum RequestedTrigger {
    Manual,
    Cron { expression: String, timezone: String },
    Webhook,
}

pub(crate) fn check_trigger(
    validator: &mut Validator,
    trigger: Option<&pb::DeploymentTrigger>,
    cron_floor: std::time::Duration,
) -> Option<RequestedTrigger> {
    let Some(trigger) = trigger else {
        validator.error("trigger", "is required: MANUAL, CRON or WEBHOOK");
        return None;
    };
    let trigger_type = trigger_type_from_proto(trigger.r#type);
    if trigger_type != Some(DeploymentTriggerType::Cron) {
        if !trigger.cron_expression.trim().is_empty() {
            validator.error("trigger.cronExpression", "is only for CRON triggers");
        }
        if !trigger.timezone.trim().is_empty() {
            validator.error("trigger.timezone", "is only for CRON triggers");
        }
    }
    match trigger_type {
        None => {
            validator.error("trigger.type", "must be MANUAL, CRON or WEBHOOK");
            None
        }
        Some(DeploymentTriggerType::Manual) => Some(RequestedTrigger::Manual),
        Some(DeploymentTriggerType::Webhook) => Some(RequestedTrigger::Webhook),
        Some(DeploymentTriggerType::Cron) => {
            let (expression_problem, timezone_problem) =
                schedule::check(&trigger.cron_expression, &trigger.timezone);
            if let Some(problem) = &expression_problem {
                validator.error("trigger.cronExpression", problem.clone());
            }
            if let Some(problem) = &timezone_problem {
                validator.error("trigger.timezone", problem.clone());
            }
            if expression_problem.is_some() || timezone_problem.is_some() {
                return None;
            }
            let schedule = Schedule::parse(&trigger.cron_expression, &trigger.timezone).ok()?;
            let floor = chrono::Duration::from_std(cron_floor).unwrap_or(chrono::Duration::MAX);
            if let Some(shortest) = schedule::shortest_interval(&schedule, Utc::now())
                && shortest < floor
            {
                validator.error(
                    "trigger.cronExpression",
                    format!(
                        "fires {} s apart at the shortest; schedules here must leave at least {} s",
                        shortest.num_seconds(),
                        cron_floor.as_secs()
                    ),
                );
                return None;
            }
            Some(RequestedTrigger::Cron {
                expression: schedule.expression().to_owned(),
                timezone: schedule.timezone().to_owned(),
            })
        }
    }
}

/// The shortest interval a cron schedule the caller saves may fire at
/// (`--cron-min-interval-seconds`, lower for administrators).
fn cron_floor(context: &AppContext, caller: &Caller) -> std::time::Duration {
    if caller.is_admin() {
        context.trigger_limits.cron_admin_min_interval
    } else {
        context.trigger_limits.cron_min_interval
    }
}

/// Refuses to run one more cron deployment of `owner_id` past the per-user limit
/// (`--max-active-cron-deployments`; administrators are not limited).
async fn check_active_cron_limit(
    context: &AppContext,
    caller: &Caller,
    owner_id: Uuid,
) -> ServiceResult<()> {
    if caller.is_admin() {
        return Ok(());
    }
    let limit = context.trigger_limits.max_active_cron_deployments;
    let mut filter = DeploymentFilter::new(OwnerScope::Owner(owner_id));
    filter.status = Some(DeploymentStatus::Running);
    filter.trigger_type = Some(DeploymentTriggerType::Cron);
    filter.page = PageRequest::new(1, 1);
    let running = context
        .store
        .list_deployments(filter)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?
        .total;
    if running >= i64::from(limit) {
        return Err(ServiceError::new(
            ErrorCode::RateLimited,
            format!("{running} cron deployments already run, the most one user may run at once"),
        ));
    }
    Ok(())
}

/// The stored trigger for a request; a webhook keeps `current_secret` when it has one.
fn stored_trigger(
    requested: RequestedTrigger,
    current: Option<&DeploymentTrigger>,
) -> DeploymentTrigger {
    match requested {
        RequestedTrigger::Manual => DeploymentTrigger::Manual,
        RequestedTrigger::Cron { expression, timezone } => {
            DeploymentTrigger::Cron { expression, timezone }
        }
        RequestedTrigger::Webhook => match current {
            Some(DeploymentTrigger::Webhook { secret }) => {
                DeploymentTrigger::Webhook { secret: secret.clone() }
            }
            _ => DeploymentTrigger::Webhook { secret: new_webhook_secret() },
        },
    }
}

fn check_environment(validator: &mut Validator, number: i32) -> Option<DeploymentEnvironment> {
    if number == 0 {
        return Some(DeploymentEnvironment::Development);
    }
    let environment = environment_from_proto(number);
    if environment.is_none() {
        validator.error("environment", "must be DEVELOPMENT, STAGING or PRODUCTION");
    }
    environment
}

/// Reads the target ids: exactly one of `workflowId` and `agentId`.
fn check_target_ids(
    validator: &mut Validator,
    workflow_id: &str,
    agent_id: &str,
) -> Option<DeploymentTarget> {
    let workflow_id = workflow_id.trim();
    let agent_id = agent_id.trim();
    match (workflow_id.is_empty(), agent_id.is_empty()) {
        (true, true) => {
            validator.error("workflowId", "one of workflowId and agentId is required");
            None
        }
        (false, false) => {
            validator.error("agentId", "give either workflowId or agentId, not both");
            None
        }
        (false, true) => match Uuid::parse_str(workflow_id) {
            Ok(id) => Some(DeploymentTarget::Workflow(id)),
            Err(_) => {
                validator.error("workflowId", "is not a valid id");
                None
            }
        },
        (true, false) => match Uuid::parse_str(agent_id) {
            Ok(id) => Some(DeploymentTarget::Agent(id)),
            Err(_) => {
                validator.error("agentId", "is not a valid id");
                None
            }
        },
    }
}

/// Checks that the target is a live workflow or agent the caller may see.
async fn check_target_exists(
    context: &AppContext,
    caller: &Caller,
    target: DeploymentTarget,
) -> ServiceResult<()> {
    let scope = caller.owner_scope();
    let (found, field, what) = match target {
        DeploymentTarget::Workflow(id) => {
            (context.store.get_workflow(scope, id).await.map(|_| ()), "workflowId", "workflow")
        }
        DeploymentTarget::Agent(id) => {
            (context.store.get_agent(scope, id).await.map(|_| ()), "agentId", "agent")
        }
    };
    match found {
        Ok(()) => Ok(()),
        Err(StoreError::NotFound) => {
            Err(ServiceError::invalid_field(field, format!("names no {what} of yours")))
        }
        Err(error) => Err(ServiceError::from_store(error, what)),
    }
}

/// The store's failure to write a deployment whose target vanished meanwhile.
fn target_store_error(error: StoreError) -> ServiceError {
    match error {
        StoreError::ReferenceViolated(what) if what.contains("workflow") => {
            ServiceError::invalid_field("workflowId", "names no workflow of yours")
        }
        StoreError::ReferenceViolated(what) if what.contains("agent") => {
            ServiceError::invalid_field("agentId", "names no agent of yours")
        }
        other => ServiceError::from_store(other, "deployment"),
    }
}

async fn load_deployment(
    context: &AppContext,
    scope: OwnerScope,
    deployment_id: Uuid,
) -> ServiceResult<Deployment> {
    context
        .store
        .get_deployment(scope, deployment_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Creates a deployment, `STOPPED`, for the caller. A webhook trigger gets a new secret, shown
/// in the answer (and to the owner on every read).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_deployment(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateDeploymentRequest,
) -> ServiceResult<pb::CreateDeploymentResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(deployment) = request.deployment else {
        return Err(ServiceError::invalid_field("deployment", "is required"));
    };
    let mut validator = Validator::new();
    validator.required_text("name", &deployment.name, MAX_NAME_CHARS);
    validator.max_chars("description", &deployment.description, MAX_DESCRIPTION_CHARS);
    let target = check_target_ids(&mut validator, &deployment.workflow_id, &deployment.agent_id);
    let environment = check_environment(&mut validator, deployment.environment);
    let config = check_config(
        &mut validator,
        deployment.config.as_ref(),
        context.engine.settings().max_json_depth,
    );
    let trigger =
        check_trigger(&mut validator, deployment.trigger.as_ref(), cron_floor(context, caller));
    if deployment.status != 0 {
        validator.error("status", "is set by start and stop");
    }
    validator.finish()?;
    let (Some(target), Some(environment), Some(trigger)) = (target, environment, trigger) else {
        return Err(ServiceError::invalid_field("deployment", "is incomplete"));
    };
    check_target_exists(context, caller, target).await?;

    let created = context
        .store
        .create_deployment(NewDeployment {
            owner_id: caller.user_id,
            name: deployment.name.trim().to_owned(),
            description: deployment.description.trim().to_owned(),
            target,
            environment,
            config,
            trigger: stored_trigger(trigger, None),
        })
        .await
        .map_err(target_store_error)?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("deployment.create", "deployment", Some(created.id.to_string()))
            .with_changes(json!({ "after": audit_snapshot(&created) })),
    )
    .await;
    Ok(pb::CreateDeploymentResponse { deployment: Some(deployment_to_proto(&created, caller)) })
}

/// A deployment the caller may see.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_deployment(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetDeploymentRequest,
) -> ServiceResult<pb::GetDeploymentResponse> {
    caller.require_user_access(Access::Read)?;
    let deployment_id = parse_id("deploymentId", &request.deployment_id)?;
    let deployment = load_deployment(context, caller.owner_scope(), deployment_id).await?;
    Ok(pb::GetDeploymentResponse { deployment: Some(deployment_to_proto(&deployment, caller)) })
}

/// The caller's deployments (everyone's for an admin), a page at a time.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_deployments(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListDeploymentsRequest,
) -> ServiceResult<pb::ListDeploymentsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    let sort: Option<SortOrder<DeploymentSortField>> =
        sort_order(&mut validator, &request.sort, DEPLOYMENT_SORT_FIELDS);
    validator.max_chars("search", &request.search, MAX_SEARCH_CHARS);
    let status = match request.status {
        0 => None,
        number => {
            let status = status_from_proto(number);
            if status.is_none() {
                validator.error("status", "must be STOPPED, RUNNING or FAILED");
            }
            status
        }
    };
    let environment = match request.environment {
        0 => None,
        number => {
            let environment = environment_from_proto(number);
            if environment.is_none() {
                validator.error("environment", "must be DEVELOPMENT, STAGING or PRODUCTION");
            }
            environment
        }
    };
    let trigger_type = match request.trigger_type {
        0 => None,
        number => {
            let trigger_type = trigger_type_from_proto(number);
            if trigger_type.is_none() {
                validator.error("triggerType", "must be MANUAL, CRON or WEBHOOK");
            }
            trigger_type
        }
    };
    let workflow_id = validate::optional_id(&mut validator, "workflowId", &request.workflow_id);
    let agent_id = validate::optional_id(&mut validator, "agentId", &request.agent_id);
    validator.finish()?;
    let search = Some(request.search.trim().to_owned()).filter(|search| !search.is_empty());
    let found = context
        .store
        .list_deployments(DeploymentFilter {
            scope: caller.owner_scope(),
            page,
            sort,
            search,
            status,
            environment,
            trigger_type,
            workflow_id,
            agent_id,
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    Ok(pb::ListDeploymentsResponse {
        deployments: found
            .items
            .iter()
            .map(|deployment| deployment_to_proto(deployment, caller))
            .collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// Changes the fields the mask names, if `deployment.version` is still current. A running cron
/// deployment whose trigger changes is rescheduled; a webhook trigger keeps its secret.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_deployment(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateDeploymentRequest,
) -> ServiceResult<pb::UpdateDeploymentResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(deployment) = request.deployment else {
        return Err(ServiceError::invalid_field("deployment", "is required"));
    };
    let deployment_id = parse_id("id", &deployment.id)?;
    let mut validator = Validator::new();
    let fields = update_mask_fields(&mut validator, request.update_mask, UPDATABLE_FIELDS);
    if deployment.version < 1 {
        validator.error("version", "is required: send the version you read");
    }
    let mut changes = DeploymentChanges::default();
    let mut requested_trigger = None;
    let changes_target =
        fields.contains(&DeploymentField::WorkflowId) || fields.contains(&DeploymentField::AgentId);
    if changes_target {
        changes.target =
            check_target_ids(&mut validator, &deployment.workflow_id, &deployment.agent_id);
    }
    for field in &fields {
        match field {
            DeploymentField::Name => {
                validator.required_text("name", &deployment.name, MAX_NAME_CHARS);
                changes.name = Some(deployment.name.trim().to_owned());
            }
            DeploymentField::Description => {
                validator.max_chars("description", &deployment.description, MAX_DESCRIPTION_CHARS);
                changes.description = Some(deployment.description.trim().to_owned());
            }
            DeploymentField::WorkflowId | DeploymentField::AgentId => {}
            DeploymentField::Environment => {
                if deployment.environment == 0 {
                    validator.error("environment", "must be DEVELOPMENT, STAGING or PRODUCTION");
                } else {
                    changes.environment = check_environment(&mut validator, deployment.environment);
                }
            }
            DeploymentField::Config => {
                changes.config = Some(check_config(
                    &mut validator,
                    deployment.config.as_ref(),
                    context.engine.settings().max_json_depth,
                ));
            }
            DeploymentField::Trigger => {
                requested_trigger = check_trigger(
                    &mut validator,
                    deployment.trigger.as_ref(),
                    cron_floor(context, caller),
                );
            }
        }
    }
    validator.finish()?;

    let scope = caller.owner_scope();
    let before = load_deployment(context, scope, deployment_id).await?;
    if let Some(target) = changes.target {
        check_target_exists(context, caller, target).await?;
    }
    let trigger_changed = requested_trigger.is_some();
    let becomes_cron = matches!(requested_trigger, Some(RequestedTrigger::Cron { .. }))
        && !matches!(before.trigger, DeploymentTrigger::Cron { .. });
    if becomes_cron && before.status == DeploymentStatus::Running {
        check_active_cron_limit(context, caller, before.owner_id).await?;
    }
    if let Some(requested) = requested_trigger {
        changes.trigger = Some(stored_trigger(requested, Some(&before.trigger)));
    }
    let mut after = context
        .store
        .update_deployment(
            scope,
            deployment_id,
            i64::from(deployment.version),
            changes,
            Some(caller.user_id),
        )
        .await
        .map_err(target_store_error)?;
    if trigger_changed && after.status == DeploymentStatus::Running {
        after = reschedule(context, after).await?;
    }
    if after.target != before.target {
        sync_agent_status(context, before.target).await;
        sync_agent_status(context, after.target).await;
    }
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("deployment.update", "deployment", Some(after.id.to_string()))
            .with_changes(
                json!({ "before": audit_snapshot(&before), "after": audit_snapshot(&after) }),
            ),
    )
    .await;
    Ok(pb::UpdateDeploymentResponse { deployment: Some(deployment_to_proto(&after, caller)) })
}

/// Sets the next fire time of a cron deployment from now (and clears it for the others).
async fn reschedule(context: &AppContext, mut deployment: Deployment) -> ServiceResult<Deployment> {
    let next_run_at = next_run_time(&deployment.trigger, Utc::now());
    context
        .store
        .set_next_run(deployment.id, next_run_at, None)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    deployment.next_run_at = next_run_at;
    Ok(deployment)
}

/// When a cron trigger fires next after `now`; `None` for the other triggers.
pub fn next_run_time(trigger: &DeploymentTrigger, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let DeploymentTrigger::Cron { expression, timezone } = trigger else { return None };
    let schedule = Schedule::parse(expression, timezone).ok()?;
    schedule::next_after(&schedule, now)
}

/// Deletes a deployment (soft); `version` 0 skips the check. Its trigger stops with it (the
/// cron loop and the webhook only see live deployments) and its agent's status follows.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_deployment(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteDeploymentRequest,
) -> ServiceResult<pb::DeleteDeploymentResponse> {
    caller.require_user_access(Access::Write)?;
    let deployment_id = parse_id("deploymentId", &request.deployment_id)?;
    if request.version < 0 {
        return Err(ServiceError::invalid_field("version", "must not be negative"));
    }
    let scope = caller.owner_scope();
    let before = load_deployment(context, scope, deployment_id).await?;
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    context
        .store
        .soft_delete_deployment(scope, deployment_id, expected_version)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    sync_agent_status(context, before.target).await;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("deployment.delete", "deployment", Some(deployment_id.to_string()))
            .with_changes(json!({ "before": audit_snapshot(&before) })),
    )
    .await;
    Ok(pb::DeleteDeploymentResponse {})
}

/// Arms the trigger: the status becomes RUNNING, a cron deployment gets its next run time.
/// Starting a running deployment is a CONFLICT.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn start_deployment(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::StartDeploymentRequest,
) -> ServiceResult<pb::StartDeploymentResponse> {
    caller.require_user_access(Access::Write)?;
    let deployment_id = parse_id("deploymentId", &request.deployment_id)?;
    let scope = caller.owner_scope();
    let before = load_deployment(context, scope, deployment_id).await?;
    if before.status == DeploymentStatus::Running {
        return Err(ServiceError::conflict("deployment is already RUNNING")
            .with_metadata("status", before.status.as_str()));
    }
    if matches!(before.trigger, DeploymentTrigger::Cron { .. }) {
        check_active_cron_limit(context, caller, before.owner_id).await?;
    }
    let next_run_at = next_run_time(&before.trigger, Utc::now());
    let message = match (&before.trigger, next_run_at) {
        (DeploymentTrigger::Cron { .. }, Some(next)) => {
            format!("started; next run at {}", next.to_rfc3339())
        }
        (DeploymentTrigger::Cron { .. }, None) => "started; the schedule never fires".to_owned(),
        (DeploymentTrigger::Webhook { .. }, _) => "started; the webhook accepts calls".to_owned(),
        (DeploymentTrigger::Manual, _) => "started".to_owned(),
    };
    let started = context
        .store
        .set_deployment_status(
            scope,
            deployment_id,
            DeploymentStatus::Running,
            NewDeploymentEvent {
                kind: DeploymentEventKind::Started,
                message,
                actor_id: Some(caller.user_id),
            },
        )
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    let started = reschedule(context, started).await?;
    sync_agent_status(context, started.target).await;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("deployment.start", "deployment", Some(deployment_id.to_string()))
            .with_changes(json!({
                "before": { "status": before.status.as_str() },
                "after": { "status": started.status.as_str(), "nextRunAt": started.next_run_at },
            })),
    )
    .await;
    Ok(pb::StartDeploymentResponse { deployment: Some(deployment_to_proto(&started, caller)) })
}

/// Disarms the trigger: the status becomes STOPPED and no run is scheduled. Executions already
/// running continue. Stopping a stopped deployment is a CONFLICT.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn stop_deployment(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::StopDeploymentRequest,
) -> ServiceResult<pb::StopDeploymentResponse> {
    caller.require_user_access(Access::Write)?;
    let deployment_id = parse_id("deploymentId", &request.deployment_id)?;
    let scope = caller.owner_scope();
    let before = load_deployment(context, scope, deployment_id).await?;
    if before.status == DeploymentStatus::Stopped {
        return Err(ServiceError::conflict("deployment is already STOPPED")
            .with_metadata("status", before.status.as_str()));
    }
    let mut stopped = context
        .store
        .set_deployment_status(
            scope,
            deployment_id,
            DeploymentStatus::Stopped,
            NewDeploymentEvent {
                kind: DeploymentEventKind::Stopped,
                message: "stopped".to_owned(),
                actor_id: Some(caller.user_id),
            },
        )
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    context
        .store
        .set_next_run(deployment_id, None, None)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    stopped.next_run_at = None;
    sync_agent_status(context, stopped.target).await;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("deployment.stop", "deployment", Some(deployment_id.to_string()))
            .with_changes(json!({
                "before": { "status": before.status.as_str() },
                "after": { "status": stopped.status.as_str() },
            })),
    )
    .await;
    Ok(pb::StopDeploymentResponse { deployment: Some(deployment_to_proto(&stopped, caller)) })
}

// ---------------------------------------------------------------------------------------------
// Triggers: the executions a deployment starts
// ---------------------------------------------------------------------------------------------

/// The key of the only step of the one-step workflow a single-agent deployment runs.
pub const AGENT_STEP_KEY: &str = "agent";

/// The input of an execution a deployment starts. Each layer's top-level keys replace the ones
/// before: the workflow's default input (workflow targets), the deployment's `inputDefaults`,
/// then what the trigger gives (a webhook's body; `{}` for a cron tick). When the deployment
/// has environment values, `env` is set to them last, so `{{input.env.NAME}}` always reads the
/// deployment's values.
pub fn execution_input(base: &Value, config: &pb::DeploymentConfig, given: Value) -> Value {
    let defaults = config.input_defaults.as_ref().map(wkt::struct_to_json);
    let mut input = serde_json::Map::new();
    for layer in [Some(base.clone()), defaults, Some(given)].into_iter().flatten() {
        if let Value::Object(fields) = layer {
            input.extend(fields);
        }
    }
    if !config.environment_values.is_empty() {
        let environment = config
            .environment_values
            .iter()
            .map(|(name, value)| (name.clone(), Value::String(value.clone())))
            .collect();
        input.insert("env".to_owned(), Value::Object(environment));
    }
    Value::Object(input)
}

/// Starts an execution of a single agent as a one-step workflow: the step `AGENT_STEP_KEY`
/// runs the agent on the execution input (no mapping), retried as a workflow step is by
/// default, so the execution's output is the agent's output. The definition snapshot has no
/// workflow id, and the execution none either; it belongs to the agent's owner.
pub async fn start_agent_execution(
    context: &AppContext,
    agent: &Agent,
    start: ExecutionStart,
) -> ServiceResult<(Execution, Vec<StepRun>)> {
    let retry = RetryPolicy::default();
    let milliseconds = |total: i64| prost_types::Duration {
        seconds: total / 1_000,
        nanos: i32::try_from((total % 1_000) * 1_000_000).unwrap_or(0),
    };
    let step = pb::WorkflowStep {
        key: AGENT_STEP_KEY.to_owned(),
        name: agent.name.clone(),
        agent_id: agent.id.to_string(),
        retry_policy: Some(pb::RetryPolicy {
            max_attempts: retry.max_attempts,
            initial_backoff: Some(milliseconds(retry.initial_backoff_ms)),
            max_backoff: Some(milliseconds(retry.max_backoff_ms)),
            multiplier: retry.multiplier,
        }),
        ..Default::default()
    };
    let workflow = pb::Workflow {
        owner_id: agent.owner_id.to_string(),
        name: agent.name.clone(),
        steps: vec![step],
        default_input: Some(wkt::json_to_value(&json!({}))),
        priority: start.priority,
        timeout: start.timeout_seconds.map(executions::seconds_duration),
        ..Default::default()
    };
    let runnable = agents::agent_to_run(context.store.as_ref(), agent).await;
    let definition = ExecutionDefinition::snapshot(&workflow, &[runnable]);
    let step_runs = vec![NewStepRun {
        agent_id: Some(agent.id),
        ..NewStepRun::new(AGENT_STEP_KEY, retry.max_attempts.max(1))
    }];
    executions::create_execution(context, agent.owner_id, None, definition, step_runs, start).await
}

/// Whether a failure to start means the deployment's target cannot run at all (deleted, not a
/// valid DAG, a step's agent deleted), as opposed to a passing trouble (database, overload).
fn target_cannot_run(error: &ServiceError) -> bool {
    matches!(error.code, ErrorCode::NotFound | ErrorCode::Conflict | ErrorCode::ValidationError)
}

/// What starts a live deployment's execution by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A cron tick, claimed in the transaction that creates its execution: of several
    /// replicas that saw the tick exactly one starts it, and a replica that dies before its
    /// commit leaves the tick due for another.
    Cron(CronRunClaim),
    /// A call of the deployment's webhook.
    Webhook,
}

impl Trigger {
    fn execution_trigger(self) -> ExecutionTrigger {
        match self {
            Trigger::Cron(_) => ExecutionTrigger::Cron,
            Trigger::Webhook => ExecutionTrigger::Webhook,
        }
    }

    fn cron_claim(self) -> Option<CronRunClaim> {
        match self {
            Trigger::Cron(claim) => Some(claim),
            Trigger::Webhook => None,
        }
    }
}

/// Loads the deployment's target and starts one execution of it.
async fn start_target(
    context: &AppContext,
    deployment: &Deployment,
    trigger: Trigger,
    given: Value,
) -> ServiceResult<(Execution, Vec<StepRun>)> {
    let config = config_from_json(&deployment.config);
    match deployment.target {
        DeploymentTarget::Workflow(workflow_id) => {
            let to_run =
                context.store.get_workflow_to_run(OwnerScope::All, workflow_id).await.map_err(
                    |error| ServiceError::from_store(error, "the deployment's workflow"),
                )?;
            let workflow = &to_run.workflow;
            let start = ExecutionStart {
                trigger: trigger.execution_trigger(),
                input: execution_input(&workflow.workflow.default_input, &config, given),
                priority: workflow.workflow.priority,
                timeout_seconds: workflow.workflow.timeout_seconds,
                deployment_id: Some(deployment.id),
                parent: None,
                cron_claim: trigger.cron_claim(),
            };
            executions::start_workflow_execution(context, &to_run, start).await
        }
        DeploymentTarget::Agent(agent_id) => {
            let agent = context
                .store
                .get_agent(OwnerScope::All, agent_id)
                .await
                .map_err(|error| ServiceError::from_store(error, "the deployment's agent"))?;
            let start = ExecutionStart {
                trigger: trigger.execution_trigger(),
                input: execution_input(&json!({}), &config, given),
                priority: crate::store::NewExecution::DEFAULT_PRIORITY,
                timeout_seconds: None,
                deployment_id: Some(deployment.id),
                parent: None,
                cron_claim: trigger.cron_claim(),
            };
            start_agent_execution(context, &agent, start).await
        }
    }
}

/// Starts one execution of a live deployment for a trigger, with what the trigger gives as
/// input (see `execution_input`). The execution carries the deployment's
/// id (its log lines show in the deployment's log), and a `TRIGGERED` event naming it and
/// `occasion` is appended, with `last_triggered_at`.
///
/// When the target cannot run any more (deleted, not a valid DAG, a step's agent deleted) the
/// deployment becomes `FAILED` (its trigger stops; starting it again re-arms it) with a
/// `FAILED` event saying why; a passing failure only appends the `FAILED` event. Either way the
/// error is returned. A cron tick another replica claimed first is only returned
/// (`ServiceError::is_claim_taken`): it is not a failure.
pub async fn start_triggered_execution(
    context: &AppContext,
    deployment: &Deployment,
    trigger: Trigger,
    given: Value,
    occasion: &str,
) -> ServiceResult<(Execution, Vec<StepRun>)> {
    let (execution, step_runs) = match start_target(context, deployment, trigger, given).await {
        Ok(started) => started,
        Err(error) if error.is_claim_taken() => return Err(error),
        Err(error) => {
            let message = format!("{occasion}: could not start an execution: {}", error.message);
            if target_cannot_run(&error) {
                mark_failed(context, deployment, message).await;
            } else {
                let event = NewDeploymentEvent {
                    kind: DeploymentEventKind::Failed,
                    message,
                    actor_id: None,
                };
                if let Err(store_error) =
                    context.store.append_deployment_event(deployment.id, event).await
                {
                    tracing::warn!(error = %store_error, deployment_id = %deployment.id,
                        "could not record a failed trigger");
                }
            }
            return Err(error);
        }
    };
    let event = NewDeploymentEvent {
        kind: DeploymentEventKind::Triggered,
        message: format!("{occasion}: started execution {}", execution.id),
        actor_id: None,
    };
    if let Err(error) =
        context.store.record_deployment_trigger(deployment.id, Utc::now(), event).await
    {
        // The execution exists and runs; only the bookkeeping is missing.
        tracing::warn!(%error, deployment_id = %deployment.id, execution_id = %execution.id,
            "could not record a trigger");
    }
    Ok((execution, step_runs))
}

/// Marks a running deployment whose target cannot run `FAILED`, unschedules it and lets its
/// agent's status follow. Best effort: failures are logged.
async fn mark_failed(context: &AppContext, deployment: &Deployment, message: String) {
    tracing::warn!(deployment_id = %deployment.id, %message, "the deployment failed");
    // Stopped (or deleted) meanwhile: it stays as its owner left it.
    match context.store.get_deployment_unscoped(deployment.id).await {
        Ok(current) if current.status == DeploymentStatus::Running => {}
        _ => return,
    }
    let event = NewDeploymentEvent { kind: DeploymentEventKind::Failed, message, actor_id: None };
    let marked = context
        .store
        .set_deployment_status(OwnerScope::All, deployment.id, DeploymentStatus::Failed, event)
        .await;
    let unscheduled = context.store.set_next_run(deployment.id, None, None).await;
    for result in [marked.map(|_| ()), unscheduled] {
        match result {
            Ok(()) | Err(StoreError::NotFound) => {}
            Err(error) => {
                tracing::warn!(%error, deployment_id = %deployment.id,
                    "could not mark the deployment FAILED");
            }
        }
    }
    sync_agent_status(context, deployment.target).await;
}

/// Makes the agent a deployment targets directly follow its deployments: `RUNNING` while one
/// of them runs, `IDLE` when none does (`PAUSED` and `STOPPED` are left alone). Workflow
/// deployments do not change their steps' agents. Best effort: a failure is logged, and the
/// next start or stop of one of the agent's deployments repairs it.
async fn sync_agent_status(context: &AppContext, target: DeploymentTarget) {
    let Some(agent_id) = target.agent_id() else { return };
    match context.store.sync_agent_status_with_deployments(agent_id).await {
        Ok(_) | Err(StoreError::NotFound) => {}
        Err(error) => {
            tracing::warn!(%error, %agent_id, "could not update the agent's status");
        }
    }
}

/// What a webhook call carries besides its body (its `X-Turbocat-*` headers); a header
/// that is missing is `None`.
#[derive(Debug, Clone, Default)]
pub struct WebhookCall<'a> {
    pub signature: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub delivery: Option<&'a str>,
    pub body: &'a [u8],
}

/// The longest delivery id (`X-Turbocat-Delivery`).
const MAX_DELIVERY_ID_CHARS: usize = 200;

/// A webhook body as the trigger's input: a JSON object; empty (or only whitespace) is `{}`.
pub(crate) fn webhook_input(body: &[u8], max_depth: usize) -> ServiceResult<Value> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => {
            let input = Value::Object(fields);
            let mut validator = super::validate::Validator::new();
            validator.json_depth("body", &input, max_depth);
            validator.finish()?;
            Ok(input)
        }
        Ok(_) => Err(ServiceError::invalid_field("body", "must be a JSON object")),
        Err(error) => {
            Err(ServiceError::invalid_field("body", format!("is not valid JSON: {error}")))
        }
    }
}

/// Checks a webhook call's signature, timestamp and delivery id against `secret`; UNAUTHORIZED
/// (naming the header at fault) unless all three hold and the timestamp lies within
/// `tolerance` of `now`.
pub(crate) fn verify_webhook_call(
    secret: &str,
    call: &WebhookCall<'_>,
    tolerance: std::time::Duration,
    now: DateTime<Utc>,
) -> ServiceResult<()> {
    let scheme = "sign `<X-Turbocat-Timestamp>.<X-Turbocat-Delivery>.<body>` with HMAC-SHA256 \
                  keyed with the deployment's webhook secret";
    let (Some(signature), Some(timestamp), Some(delivery)) =
        (call.signature, call.timestamp, call.delivery)
    else {
        let missing: Vec<&str> = [
            (call.signature.is_none(), "X-Turbocat-Signature"),
            (call.timestamp.is_none(), "X-Turbocat-Timestamp"),
            (call.delivery.is_none(), "X-Turbocat-Delivery"),
        ]
        .into_iter()
        .filter_map(|(absent, name)| absent.then_some(name))
        .collect();
        return Err(ServiceError::unauthorized(format!(
            "the {} header is required: {scheme}",
            missing.join(" and ")
        )));
    };
    let delivery_ok = (1..=MAX_DELIVERY_ID_CHARS).contains(&delivery.chars().count())
        && delivery
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "._:-".contains(character));
    if !delivery_ok {
        return Err(ServiceError::unauthorized(format!(
            "the X-Turbocat-Delivery header must be 1 to {MAX_DELIVERY_ID_CHARS} letters, \
             digits, `.`, `_`, `:` or `-`"
        )));
    }
    let Ok(seconds) = timestamp.trim().parse::<i64>() else {
        return Err(ServiceError::unauthorized(
            "the X-Turbocat-Timestamp header must be the Unix time in seconds",
        ));
    };
    let skew = (now.timestamp() - seconds).unsigned_abs();
    if skew > tolerance.as_secs() {
        return Err(ServiceError::unauthorized(format!(
            "the X-Turbocat-Timestamp is {skew} s away from the server's clock, more than the \
             {} s allowed (a replay, or a clock to fix)",
            tolerance.as_secs()
        )));
    }
    if !signature_matches(secret, &signed_payload(timestamp, delivery, call.body), signature) {
        return Err(ServiceError::unauthorized(format!(
            "the X-Turbocat-Signature does not match: {scheme}"
        )));
    }
    Ok(())
}

/// A signed webhook call: starts one execution of a RUNNING webhook deployment with the JSON
/// body as input (see `execution_input`), and returns its id only (the caller holds no token:
/// the deployment's environment values, in the execution's input, are not for it).
///
/// Checked in this order, so only a caller who knows the secret learns more than "not here":
/// an unknown id, a deleted deployment, a deployment that is not RUNNING or not a webhook is
/// NOT_FOUND (all alike); a missing or wrong signature, timestamp or delivery id, or a
/// timestamp outside the tolerance, is UNAUTHORIZED; a body that is not a JSON object is a
/// VALIDATION_ERROR on `body`; a delivery id seen before is a CONFLICT (a replay).
#[tracing::instrument(skip_all, fields(deployment_id = %deployment_id))]
pub async fn trigger_webhook(
    context: &AppContext,
    deployment_id: &str,
    call: WebhookCall<'_>,
) -> ServiceResult<String> {
    let not_listening =
        || ServiceError::new(ErrorCode::NotFound, "no webhook is listening at this path");
    let Ok(deployment_id) = Uuid::parse_str(deployment_id.trim()) else {
        return Err(not_listening());
    };
    let deployment = match context.store.get_deployment_unscoped(deployment_id).await {
        Ok(deployment) => deployment,
        Err(StoreError::NotFound) => return Err(not_listening()),
        Err(error) => return Err(ServiceError::from_store(error, "deployment")),
    };
    let DeploymentTrigger::Webhook { secret } = &deployment.trigger else {
        return Err(not_listening());
    };
    if deployment.status != DeploymentStatus::Running {
        return Err(not_listening());
    }
    let now = Utc::now();
    let tolerance = context.trigger_limits.webhook_tolerance;
    verify_webhook_call(secret, &call, tolerance, now)?;
    let given = webhook_input(call.body, context.engine.settings().max_json_depth)?;
    let delivery = call.delivery.unwrap_or_default();
    let horizon = now
        - chrono::Duration::from_std(tolerance * 2).unwrap_or_else(|_| chrono::Duration::hours(1));
    let first_time = context
        .store
        .record_webhook_delivery(deployment.id, delivery, now, horizon)
        .await
        .map_err(|error| ServiceError::from_store(error, "deployment"))?;
    if !first_time {
        return Err(ServiceError::conflict(
            "this X-Turbocat-Delivery was received already: a replayed call starts nothing",
        ));
    }
    let (execution, _) =
        start_triggered_execution(context, &deployment, Trigger::Webhook, given, "webhook call")
            .await?;
    Ok(execution.id.to_string())
}

// ---------------------------------------------------------------------------------------------
// The combined log
// ---------------------------------------------------------------------------------------------

/// One entry of the merged log with what orders it: time, then the source's own sequence.
struct MergedEntry {
    time: DateTime<Utc>,
    /// Within one time: execution lines by id, lifecycle events after them.
    sequence: (u8, i64),
    entry: pb::DeploymentLogEntry,
}

fn lifecycle_entry(event: &DeploymentEvent, position: i64) -> MergedEntry {
    let level = match event.kind {
        DeploymentEventKind::Failed => pb::LogLevel::Error,
        _ => pb::LogLevel::Info,
    };
    MergedEntry {
        time: event.created_at,
        sequence: (1, position),
        entry: pb::DeploymentLogEntry {
            kind: pb::DeploymentLogKind::Lifecycle.into(),
            time: Some(wkt::timestamp(event.created_at)),
            event: event.kind.as_str().to_owned(),
            message: event.message.clone(),
            execution_id: String::new(),
            level: level.into(),
        },
    }
}

fn execution_entry(line: &ExecutionLog) -> MergedEntry {
    let level = match line.level {
        ExecutionLogLevel::Debug => pb::LogLevel::Debug,
        ExecutionLogLevel::Info => pb::LogLevel::Info,
        ExecutionLogLevel::Warn => pb::LogLevel::Warn,
        ExecutionLogLevel::Error => pb::LogLevel::Error,
    };
    MergedEntry {
        time: line.created_at,
        sequence: (0, line.id),
        entry: pb::DeploymentLogEntry {
            kind: pb::DeploymentLogKind::Execution.into(),
            time: Some(wkt::timestamp(line.created_at)),
            event: String::new(),
            message: line.message.clone(),
            execution_id: line.execution_id.to_string(),
            level: level.into(),
        },
    }
}

/// Lifecycle events and the log lines of the deployment's executions, newest first.
///
/// The store has no combined query: this reads the events and the executions' lines (newest
/// executions first, up to `MAX_MERGED_LOG_ENTRIES` entries), merges them in memory and cuts
/// the page. Adequate for the deployment histories the product expects; a deployment with
/// more lines than the bound shows the lines of its newest executions.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_deployment_logs(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListDeploymentLogsRequest,
) -> ServiceResult<pb::ListDeploymentLogsResponse> {
    caller.require_user_access(Access::Read)?;
    let deployment_id = parse_id("deploymentId", &request.deployment_id)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let scope = caller.owner_scope();
    load_deployment(context, scope, deployment_id).await?;
    let to_service_error = |error| ServiceError::from_store(error, "deployment");

    let mut merged = Vec::new();
    let mut event_page = 1;
    loop {
        let events = context
            .store
            .list_deployment_events(
                scope,
                deployment_id,
                PageRequest::new(event_page, PageRequest::MAX_PAGE_SIZE),
            )
            .await
            .map_err(to_service_error)?;
        let count = events.items.len();
        for event in &events.items {
            // Newest first from the store: a larger position is older.
            let position = -i64::try_from(merged.len()).unwrap_or(i64::MAX);
            merged.push(lifecycle_entry(event, position));
        }
        let seen = u64::from(event_page) * u64::from(PageRequest::MAX_PAGE_SIZE);
        if count == 0 || seen >= u64::try_from(events.total).unwrap_or(0) {
            break;
        }
        if merged.len() >= MAX_MERGED_LOG_ENTRIES {
            break;
        }
        event_page += 1;
    }

    let mut executions_filter = ExecutionFilter::new(scope);
    executions_filter.deployment_id = Some(deployment_id);
    let mut execution_page = 1;
    'executions: loop {
        let executions = context
            .store
            .list_executions(
                executions_filter.clone(),
                PageRequest::new(execution_page, PageRequest::MAX_PAGE_SIZE),
            )
            .await
            .map_err(to_service_error)?;
        for execution in &executions.items {
            let mut log_filter = ExecutionLogFilter::first(LOG_READ_BATCH * 10);
            loop {
                let lines = match context
                    .store
                    .list_execution_logs(scope, execution.id, log_filter.clone())
                    .await
                {
                    Ok(lines) => lines,
                    // Deleted meanwhile: its lines are gone with it.
                    Err(StoreError::NotFound) => break,
                    Err(error) => return Err(to_service_error(error)),
                };
                merged.extend(lines.items.iter().map(execution_entry));
                match lines.next_cursor.and_then(|cursor| cursor.parse::<i64>().ok()) {
                    Some(after_id) => log_filter.after_id = Some(after_id),
                    None => break,
                }
            }
            if merged.len() >= MAX_MERGED_LOG_ENTRIES {
                break 'executions;
            }
        }
        let seen = u64::from(execution_page) * u64::from(PageRequest::MAX_PAGE_SIZE);
        if executions.items.is_empty() || seen >= u64::try_from(executions.total).unwrap_or(0) {
            break;
        }
        execution_page += 1;
    }

    merged.sort_by(|left, right| {
        right.time.cmp(&left.time).then_with(|| right.sequence.cmp(&left.sequence))
    });
    let total = i64::try_from(merged.len()).unwrap_or(i64::MAX);
    let offset = usize::try_from(page.offset()).unwrap_or(usize::MAX);
    let entries = merged
        .into_iter()
        .skip(offset)
        .take(usize::try_from(page.page_size).unwrap_or(usize::MAX))
        .map(|merged_entry| merged_entry.entry)
        .collect();
    Ok(pb::ListDeploymentLogsResponse {
        entries,
        pagination: Some(convert::pagination(page, total)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    #[test]
    fn webhook_secrets_are_long_random_hex() {
        let first = new_webhook_secret();
        let second = new_webhook_secret();
        assert_eq!(first.len(), 64);
        assert!(first.chars().all(|character| character.is_ascii_hexdigit()));
        assert_ne!(first, second);
    }

    #[test]
    fn the_secret_never_reaches_the_audit_snapshot_or_debug_output() {
        let secret = new_webhook_secret();
        let now = Utc::now();
        let deployment = Deployment {
            id: Uuid::new_v4(),
            owner_id: Uuid::new_v4(),
            name: "hook".to_owned(),
            description: String::new(),
            target: DeploymentTarget::Agent(Uuid::new_v4()),
            environment: DeploymentEnvironment::Staging,
            config: json!({}),
            trigger: DeploymentTrigger::Webhook { secret: secret.clone() },
            status: DeploymentStatus::Stopped,
            last_triggered_at: None,
            next_run_at: None,
            version: 1,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        };
        assert!(!audit_snapshot(&deployment).to_string().contains(&secret));
        assert!(!format!("{deployment:?}").contains(&secret));
    }

    #[test]
    fn signatures_are_the_hex_hmac_of_the_exact_body() {
        let secret = "0123456789abcdef";
        let body = br#"{"name":"Ada"}"#;
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any length");
        mac.update(body);
        let good = hex::encode(mac.finalize().into_bytes());
        assert!(signature_matches(secret, body, &good));
        assert!(signature_matches(secret, body, &format!("sha256={good}")));
        assert!(signature_matches(secret, body, &format!(" {} ", good.to_uppercase())));
        assert!(!signature_matches(secret, br#"{"name":"Eve"}"#, &good), "another body");
        assert!(!signature_matches("another secret", body, &good), "another secret");
        assert!(!signature_matches(secret, body, &good[..62]), "truncated");
        assert!(!signature_matches(secret, body, ""), "empty");
        assert!(!signature_matches(secret, body, "sha1=00"), "not hex after an unknown prefix");
        assert!(!signature_matches(secret, body, &format!("{good}00")), "too long");
    }

    #[test]
    fn webhook_calls_are_signed_fresh_and_complete() {
        let secret = "0123456789abcdef";
        let body = br#"{"name":"Ada"}"#;
        let now = Utc::now();
        let tolerance = std::time::Duration::from_secs(300);
        let sign = |timestamp: &str, delivery: &str| {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any length");
            mac.update(&signed_payload(timestamp, delivery, body));
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        };
        let verify = |signature: &str, timestamp: Option<&str>, delivery: &str| {
            let call = WebhookCall {
                signature: Some(signature),
                timestamp,
                delivery: Some(delivery),
                body,
            };
            verify_webhook_call(secret, &call, tolerance, now)
        };
        let fresh = now.timestamp().to_string();
        let signature = sign(&fresh, "evt_1");
        assert!(verify(&signature, Some(&fresh), "evt_1").is_ok());
        let missing = verify(&signature, None, "evt_1").expect_err("no timestamp");
        assert!(missing.message.contains("X-Turbocat-Timestamp"), "{}", missing.message);
        let stale = (now - chrono::Duration::seconds(301)).timestamp().to_string();
        let stale_signature = sign(&stale, "evt_1");
        let old = verify(&stale_signature, Some(&stale), "evt_1").expect_err("signed but old");
        assert!(old.message.contains("301 s"), "{}", old.message);
        // The timestamp and the delivery id are signed: neither can be swapped.
        let moved = verify(&stale_signature, Some(&fresh), "evt_1").expect_err("moved");
        assert!(moved.message.contains("does not match"), "{}", moved.message);
        assert!(verify(&signature, Some(&fresh), "evt_2").is_err(), "another id");
        assert!(verify(&signature, Some(&fresh), "bad id").is_err(), "a malformed id");
    }

    #[test]
    fn webhook_bodies_are_json_objects_and_empty_means_nothing() {
        assert_eq!(webhook_input(b"", 32).expect("empty"), json!({}));
        assert_eq!(webhook_input(b" \n", 32).expect("blank"), json!({}));
        assert_eq!(webhook_input(br#"{"a":[1]}"#, 32).expect("object"), json!({ "a": [1] }));
        for bad in [&b"[1]"[..], b"3", b"null", b"{", b"not json", br#"{"a":[[[1]]]}"#] {
            let error = webhook_input(bad, 3).expect_err("refused");
            assert_eq!(error.field_errors[0].field, "body");
        }
    }

    #[test]
    fn the_input_layers_defaults_the_given_input_and_the_environment() {
        let config: pb::DeploymentConfig = json::decode(
            CONFIG_MESSAGE,
            json!({
                "inputDefaults": { "region": "eu", "size": 1 },
                "environmentValues": { "API_URL": "https://x" },
            }),
        )
        .expect("a config");
        let input = execution_input(
            &json!({ "size": 0, "from": "workflow" }),
            &config,
            json!({ "size": 3, "env": "mine" }),
        );
        assert_eq!(
            input,
            json!({ "from": "workflow", "region": "eu", "size": 3, "env": { "API_URL": "https://x" } })
        );
        let bare = execution_input(&json!({}), &pb::DeploymentConfig::default(), json!({ "a": 1 }));
        assert_eq!(bare, json!({ "a": 1 }), "no env without environment values");
    }

    #[test]
    fn the_next_run_is_read_in_the_deployment_time_zone() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).expect("time").to_utc();
        let nine_in_tokyo = DeploymentTrigger::Cron {
            expression: "0 9 * * *".to_owned(),
            timezone: "Asia/Tokyo".to_owned(),
        };
        // 09:00 in Tokyo (UTC+9, no daylight saving) is 00:00 UTC.
        assert_eq!(
            next_run_time(&nine_in_tokyo, at("2026-06-01T01:00:00Z")),
            Some(at("2026-06-02T00:00:00Z"))
        );
        let every_second = DeploymentTrigger::Cron {
            expression: "* * * * * *".to_owned(),
            timezone: String::new(),
        };
        assert_eq!(
            next_run_time(&every_second, at("2026-06-01T01:00:00.400Z")),
            Some(at("2026-06-01T01:00:01Z"))
        );
        assert_eq!(next_run_time(&DeploymentTrigger::Manual, at("2026-06-01T01:00:00Z")), None);
    }

    #[test]
    fn environment_names_are_shell_like() {
        for good in ["API_URL", "_x", "a1"] {
            assert!(is_environment_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "É"] {
            assert!(!is_environment_name(bad), "{bad}");
        }
    }
}

/// Property: the signed bytes `<timestamp>.<delivery id>.<body>` name one call. Delivery ids
/// and bodies may hold dots, so the same bytes split elsewhere would carry the same signature;
/// every such other split must be refused by the header checks or by the body check.
#[cfg(test)]
mod webhook_properties {
    use hmac::{Hmac, Mac};
    use proptest::prelude::*;
    use sha2::Sha256;

    use super::*;

    fn body() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[ \n]{1,3}",
            ("[ \n]{0,2}", proptest::collection::btree_map("[a-z.]{1,5}", "[a-z0-9.]{0,5}", 0..3))
                .prop_map(|(space, fields)| format!("{space}{}", json!(fields))),
        ]
    }

    proptest! {
        #[test]
        fn no_other_accepted_call_has_the_same_signed_bytes(
            delivery in "[A-Za-z0-9._:-]{1,16}",
            body in body(),
            age in 0i64..300,
        ) {
            let secret = "0123456789abcdef";
            let now = Utc::now();
            let tolerance = std::time::Duration::from_secs(300);
            let timestamp = (now.timestamp() - age).to_string();
            let payload = signed_payload(&timestamp, &delivery, body.as_bytes());
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any length");
            mac.update(&payload);
            let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
            let accepted = |timestamp: &str, delivery: &str, body: &[u8]| {
                let call = WebhookCall {
                    signature: Some(signature.as_str()),
                    timestamp: Some(timestamp),
                    delivery: Some(delivery),
                    body,
                };
                verify_webhook_call(secret, &call, tolerance, now).is_ok()
                    && webhook_input(body, 32).is_ok()
            };
            prop_assert!(accepted(&timestamp, &delivery, body.as_bytes()), "the call itself");
            for (other_timestamp, other_delivery, other_body) in signing::payload_readings(&payload, usize::MAX) {
                if (other_timestamp, other_delivery, other_body)
                    == (timestamp.as_str(), delivery.as_str(), body.as_bytes())
                {
                    continue;
                }
                prop_assert!(
                    !accepted(other_timestamp, other_delivery, other_body),
                    "{other_timestamp:?} {other_delivery:?} {:?} passes as {timestamp:?} {delivery:?} {body:?}",
                    String::from_utf8_lossy(other_body)
                );
            }
        }
    }
}
