//! Workflows: definitions (DAGs of steps, each running one of the caller's agents), validated
//! when saved; their executions are started here and listed per workflow.
//! May call: the store, the audit trail, `engine::dag` (definition checks) and
//! `service::executions` (creating and listing executions).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};
use uuid::Uuid;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::executions::{self, ExecutionListRequest, ExecutionStart};
use super::validate;
use super::validate::MAX_TAG_CHARS;
use super::validate::{
    MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Validator, page_request, parse_id, sort_order,
    update_mask_fields,
};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::engine::dag::{self, DagStep};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::json as proto_json;
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    ExecutionFilter, ExecutionTrigger, NewWorkflow, NewWorkflowStep, RetryPolicy, StoreError,
    Workflow, WorkflowChanges, WorkflowFilter, WorkflowSortField, WorkflowStep, WorkflowWithSteps,
};

/// Priority of a workflow that names none.
pub const DEFAULT_PRIORITY: i32 = 5;
/// The most steps a workflow may have.
pub const MAX_STEPS: usize = 200;
/// The longest whole-execution timeout: one week.
pub const MAX_WORKFLOW_TIMEOUT_SECONDS: i64 = 7 * 24 * 3600;
/// The longest timeout of one step attempt: one day.
pub const MAX_STEP_TIMEOUT_SECONDS: i64 = 24 * 3600;
/// The most attempts of a step, the first included.
pub const MAX_ATTEMPTS: i32 = 20;
/// The longest retry backoff: one hour.
pub const MAX_BACKOFF_MILLISECONDS: i64 = 3_600_000;
/// The largest backoff multiplier.
pub const MAX_BACKOFF_MULTIPLIER: f64 = 10.0;
/// The most required labels of a step, and their longest key and value.
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_CHARS: usize = 63;
pub const MAX_LABEL_VALUE_CHARS: usize = 253;
/// The largest default input, input mapping or execution input, as compact JSON.
pub const MAX_JSON_BYTES: usize = 1024 * 1024;
/// The longest search text of a list.
const MAX_SEARCH_CHARS: usize = 200;

/// The retry policy of a step that names none: one attempt, and if retries are asked for,
/// backing off 1 s, 2 s, 4 s … up to 60 s.
const DEFAULT_RETRY_POLICY: RetryPolicy = RetryPolicy {
    max_attempts: 1,
    initial_backoff_ms: 1_000,
    max_backoff_ms: 60_000,
    multiplier: 2.0,
};

/// The sort keys of the workflows list, by their JSON names.
const WORKFLOW_SORT_FIELDS: &[(&str, WorkflowSortField)] = &[
    ("name", WorkflowSortField::Name),
    ("createdAt", WorkflowSortField::CreatedAt),
    ("updatedAt", WorkflowSortField::UpdatedAt),
    ("priority", WorkflowSortField::Priority),
];

/// A field an update mask may name, in the order fields are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkflowField {
    Name,
    Description,
    Steps,
    DefaultInput,
    Priority,
    Timeout,
    Tags,
}

/// The fields `UpdateWorkflow` may change, by their JSON names.
const UPDATABLE_FIELDS: &[(&str, WorkflowField)] = &[
    ("name", WorkflowField::Name),
    ("description", WorkflowField::Description),
    ("steps", WorkflowField::Steps),
    ("defaultInput", WorkflowField::DefaultInput),
    ("priority", WorkflowField::Priority),
    ("timeout", WorkflowField::Timeout),
    ("tags", WorkflowField::Tags),
];

// ---------------------------------------------------------------------------------------------
// Store rows -> proto messages
// ---------------------------------------------------------------------------------------------

fn milliseconds_duration(milliseconds: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: milliseconds.div_euclid(1_000),
        nanos: i32::try_from(milliseconds.rem_euclid(1_000) * 1_000_000).unwrap_or(0),
    }
}

/// `["gpu", "region=eu"]` -> `{"gpu": "", "region": "eu"}`.
fn labels_map(labels: &[String]) -> HashMap<String, String> {
    labels
        .iter()
        .map(|label| match label.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => (label.clone(), String::new()),
        })
        .collect()
}

fn step_message(step: &WorkflowStep) -> pb::WorkflowStep {
    pb::WorkflowStep {
        key: step.step_key.clone(),
        name: step.name.clone(),
        agent_id: step.agent_id.to_string(),
        depends_on: step.depends_on.clone(),
        input_mapping: step.input_mapping.as_ref().map(wkt::json_to_value),
        retry_policy: Some(pb::RetryPolicy {
            max_attempts: step.retry_policy.max_attempts,
            initial_backoff: Some(milliseconds_duration(step.retry_policy.initial_backoff_ms)),
            max_backoff: Some(milliseconds_duration(step.retry_policy.max_backoff_ms)),
            multiplier: step.retry_policy.multiplier,
        }),
        timeout: step.timeout_seconds.map(executions::seconds_duration),
        required_labels: labels_map(&step.required_labels),
    }
}

/// A workflow without its steps (lists show no steps; GET one for them).
fn workflow_summary(workflow: &Workflow) -> pb::Workflow {
    pb::Workflow {
        id: workflow.id.to_string(),
        owner_id: workflow.owner_id.to_string(),
        name: workflow.name.clone(),
        description: workflow.description.clone(),
        steps: Vec::new(),
        default_input: Some(wkt::json_to_value(&workflow.default_input)),
        priority: workflow.priority,
        timeout: workflow.timeout_seconds.map(executions::seconds_duration),
        tags: workflow.tags.clone(),
        version: i32::try_from(workflow.version).unwrap_or(i32::MAX),
        created_at: Some(wkt::timestamp(workflow.created_at)),
        updated_at: Some(wkt::timestamp(workflow.updated_at)),
    }
}

/// A workflow with its steps, as the API shows it.
pub fn workflow_message(workflow: &WorkflowWithSteps) -> pb::Workflow {
    pb::Workflow {
        steps: workflow.steps.iter().map(step_message).collect(),
        ..workflow_summary(&workflow.workflow)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading and checking the caller's definition
// ---------------------------------------------------------------------------------------------

/// Reads a duration that must be whole seconds in `1..=max_seconds`.
fn read_seconds(
    validator: &mut Validator,
    field: &str,
    duration: Option<&prost_types::Duration>,
    max_seconds: i64,
) -> Option<i32> {
    let duration = duration?;
    if duration.nanos != 0 || duration.seconds < 1 || duration.seconds > max_seconds {
        validator
            .error(field, format!("must be a whole number of seconds from 1s to {max_seconds}s"));
        return None;
    }
    i32::try_from(duration.seconds).ok()
}

/// Reads a backoff duration in milliseconds, `0..=MAX_BACKOFF_MILLISECONDS`.
fn read_backoff(
    validator: &mut Validator,
    field: &str,
    duration: Option<&prost_types::Duration>,
    default: i64,
) -> i64 {
    let Some(duration) = duration else { return default };
    let milliseconds =
        i128::from(duration.seconds) * 1_000 + i128::from(duration.nanos) / 1_000_000;
    match i64::try_from(milliseconds) {
        Ok(milliseconds) if (0..=MAX_BACKOFF_MILLISECONDS).contains(&milliseconds) => milliseconds,
        _ => {
            validator
                .error(field, format!("must be from 0s to {}s", MAX_BACKOFF_MILLISECONDS / 1_000));
            default
        }
    }
}

fn read_retry_policy(
    validator: &mut Validator,
    field: &str,
    policy: Option<&pb::RetryPolicy>,
) -> RetryPolicy {
    let Some(policy) = policy else { return DEFAULT_RETRY_POLICY };
    let mut read = DEFAULT_RETRY_POLICY;
    if policy.max_attempts != 0 {
        if (1..=MAX_ATTEMPTS).contains(&policy.max_attempts) {
            read.max_attempts = policy.max_attempts;
        } else {
            validator.error(
                &format!("{field}.maxAttempts"),
                format!("must be between 1 and {MAX_ATTEMPTS}"),
            );
        }
    }
    read.initial_backoff_ms = read_backoff(
        validator,
        &format!("{field}.initialBackoff"),
        policy.initial_backoff.as_ref(),
        DEFAULT_RETRY_POLICY.initial_backoff_ms,
    );
    read.max_backoff_ms = read_backoff(
        validator,
        &format!("{field}.maxBackoff"),
        policy.max_backoff.as_ref(),
        DEFAULT_RETRY_POLICY.max_backoff_ms,
    );
    if read.max_backoff_ms < read.initial_backoff_ms {
        validator.error(&format!("{field}.maxBackoff"), "must not be less than initialBackoff");
    }
    if policy.multiplier != 0.0 {
        if policy.multiplier.is_finite()
            && (1.0..=MAX_BACKOFF_MULTIPLIER).contains(&policy.multiplier)
        {
            read.multiplier = policy.multiplier;
        } else {
            validator.error(
                &format!("{field}.multiplier"),
                format!("must be between 1 and {MAX_BACKOFF_MULTIPLIER}"),
            );
        }
    }
    read
}

/// Required runner labels as the store keeps them, `key` or `key=value`, sorted by key.
fn read_labels(
    validator: &mut Validator,
    field: &str,
    labels: &HashMap<String, String>,
) -> Vec<String> {
    if labels.len() > MAX_LABELS {
        validator.error(field, format!("must have at most {MAX_LABELS} labels"));
        return Vec::new();
    }
    let sorted: BTreeMap<&String, &String> = labels.iter().collect();
    let mut read = Vec::with_capacity(sorted.len());
    for (key, value) in sorted {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_CHARS
            && key.bytes().all(|byte| {
                byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b'/')
            });
        if !key_ok {
            validator.error(
                field,
                format!(
                    "label key {key:?} must be 1 to {MAX_LABEL_KEY_CHARS} letters, digits, '_', '-', '.' or '/'"
                ),
            );
            continue;
        }
        let value_ok = value.chars().count() <= MAX_LABEL_VALUE_CHARS
            && !value.chars().any(|character| character.is_control());
        if !value_ok {
            validator.error(
                field,
                format!(
                    "the value of label {key:?} must be at most {MAX_LABEL_VALUE_CHARS} printable characters"
                ),
            );
            continue;
        }
        if value.is_empty() {
            read.push(key.clone());
        } else {
            read.push(format!("{key}={value}"));
        }
    }
    read
}

/// A `google.protobuf.Value` as JSON; absent and `null` are `None`.
fn present_json(value: Option<&prost_types::Value>) -> Option<Value> {
    value.map(wkt::value_to_json).filter(|json| !json.is_null())
}

fn check_json_size(validator: &mut Validator, field: &str, value: &Value, max_depth: usize) {
    if value.to_string().len() > MAX_JSON_BYTES {
        validator.error(field, format!("must be at most {MAX_JSON_BYTES} bytes of JSON"));
    }
    validator.json_depth(field, value, max_depth);
}

/// A JSON object (absent or `null` is `{}`), for `defaultInput` and an execution's `input`.
fn read_json_object(
    validator: &mut Validator,
    field: &str,
    value: Option<&prost_types::Value>,
    max_depth: usize,
) -> Option<Value> {
    let json = present_json(value)?;
    if !json.is_object() {
        validator.error(field, "must be a JSON object");
        return None;
    }
    check_json_size(validator, field, &json, max_depth);
    Some(json)
}

fn read_priority(validator: &mut Validator, field: &str, priority: i32) -> i32 {
    if !(1..=10).contains(&priority) {
        validator.error(field, "must be between 1 and 10");
        return DEFAULT_PRIORITY;
    }
    priority
}

/// The steps as the store takes them; a malformed agent id becomes `None` (already reported).
fn read_steps(
    validator: &mut Validator,
    steps: &[pb::WorkflowStep],
    max_depth: usize,
) -> (Vec<NewWorkflowStep>, Vec<Option<Uuid>>) {
    if steps.is_empty() {
        validator.error("steps", "must have at least one step");
    }
    if steps.len() > MAX_STEPS {
        validator.error("steps", format!("must have at most {MAX_STEPS} steps"));
    }
    let mut read = Vec::with_capacity(steps.len());
    let mut agent_ids = Vec::with_capacity(steps.len());
    for (index, step) in steps.iter().enumerate() {
        let field = |name: &str| format!("steps[{index}].{name}");
        let key = step.key.trim().to_owned();
        let name = match step.name.trim() {
            "" => key.clone(),
            given => given.to_owned(),
        };
        validator.max_chars(&field("name"), &name, MAX_NAME_CHARS);
        let agent_id = if step.agent_id.trim().is_empty() {
            validator.error(&field("agentId"), "is required");
            None
        } else {
            match Uuid::parse_str(step.agent_id.trim()) {
                Ok(agent_id) => Some(agent_id),
                Err(_) => {
                    validator.error(&field("agentId"), "is not a valid id");
                    None
                }
            }
        };
        let input_mapping = present_json(step.input_mapping.as_ref());
        if let Some(mapping) = &input_mapping {
            check_json_size(validator, &field("inputMapping"), mapping, max_depth);
        }
        let retry_policy =
            read_retry_policy(validator, &field("retryPolicy"), step.retry_policy.as_ref());
        let timeout_seconds = read_seconds(
            validator,
            &field("timeout"),
            step.timeout.as_ref(),
            MAX_STEP_TIMEOUT_SECONDS,
        );
        let required_labels =
            read_labels(validator, &field("requiredLabels"), &step.required_labels);
        agent_ids.push(agent_id);
        read.push(NewWorkflowStep {
            step_key: key,
            name,
            agent_id: agent_id.unwrap_or(Uuid::nil()),
            depends_on: step.depends_on.iter().map(|key| key.trim().to_owned()).collect(),
            input_mapping,
            retry_policy,
            timeout_seconds,
            required_labels,
        });
    }
    let dag_steps: Vec<DagStep> = read.iter().map(DagStep::from).collect();
    for error in dag::validate(&dag_steps) {
        validator.error(&error.field, error.message);
    }
    (read, agent_ids)
}

/// Every step's agent must be a live agent the caller can see; each one that is not is a
/// `steps[i].agentId` error (missing, deleted and another user's agents look the same).
async fn check_step_agents(
    context: &AppContext,
    caller: &Caller,
    validator: &mut Validator,
    agent_ids: &[Option<Uuid>],
) -> ServiceResult<()> {
    let mut live: HashMap<Uuid, bool> = HashMap::new();
    for (index, agent_id) in agent_ids.iter().enumerate() {
        let Some(agent_id) = agent_id else { continue };
        let is_live = match live.get(agent_id) {
            Some(known) => *known,
            None => {
                let found = match context.store.get_agent(caller.owner_scope(), *agent_id).await {
                    Ok(_) => true,
                    Err(StoreError::NotFound) => false,
                    Err(error) => return Err(ServiceError::from_store(error, "agent")),
                };
                live.insert(*agent_id, found);
                found
            }
        };
        if !is_live {
            validator.error(&format!("steps[{index}].agentId"), "is not an agent of yours");
        }
    }
    Ok(())
}

/// The store's refusal of a definition that passed the checks (an agent deleted meanwhile).
fn definition_refused(error: StoreError) -> ServiceError {
    match error {
        StoreError::ReferenceViolated(what) if what == "agent_id" => ServiceError::invalid_field(
            "steps",
            "an agent of a step was deleted while the workflow was saved",
        ),
        StoreError::AlreadyExists(what) if what == "step_key" => {
            ServiceError::invalid_field("steps", "step keys must be unique")
        }
        other => ServiceError::from_store(other, "workflow"),
    }
}

/// The audit trail's picture of a workflow: its REST JSON, restricted to `fields` if given.
fn audit_snapshot(workflow: &WorkflowWithSteps, fields: Option<&[WorkflowField]>) -> Value {
    let encoded = proto_json::encode("turbocat.v1.Workflow", &workflow_message(workflow));
    let Some(fields) = fields else { return encoded };
    let mut snapshot = serde_json::Map::new();
    snapshot.insert("version".to_owned(), json!(workflow.workflow.version));
    for (name, _) in UPDATABLE_FIELDS.iter().filter(|(_, field)| fields.contains(field)) {
        snapshot.insert((*name).to_owned(), encoded.get(*name).cloned().unwrap_or(Value::Null));
    }
    Value::Object(snapshot)
}

pub(super) async fn load_workflow(
    context: &AppContext,
    caller: &Caller,
    workflow_id: Uuid,
) -> ServiceResult<WorkflowWithSteps> {
    context
        .store
        .get_workflow(caller.owner_scope(), workflow_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "workflow"))
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// The caller's workflows, a page at a time (without their steps).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_workflows(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListWorkflowsRequest,
) -> ServiceResult<pb::ListWorkflowsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    let sort = sort_order(&mut validator, &request.sort, WORKFLOW_SORT_FIELDS);
    validator.max_chars("search", &request.search, MAX_SEARCH_CHARS);
    validator.max_chars("tag", &request.tag, MAX_TAG_CHARS);
    validator.finish()?;
    let mut filter = WorkflowFilter::new(caller.owner_scope());
    filter.page = page;
    filter.sort = sort;
    filter.search = Some(request.search.trim().to_owned()).filter(|search| !search.is_empty());
    filter.tag = Some(request.tag.trim().to_owned()).filter(|tag| !tag.is_empty());
    let found = context
        .store
        .list_workflows(filter)
        .await
        .map_err(|error| ServiceError::from_store(error, "workflow"))?;
    Ok(pb::ListWorkflowsResponse {
        workflows: found.items.iter().map(workflow_summary).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// One workflow with its steps.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_workflow(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetWorkflowRequest,
) -> ServiceResult<pb::GetWorkflowResponse> {
    caller.require_user_access(Access::Read)?;
    let workflow_id = parse_id("workflowId", &request.workflow_id)?;
    let workflow = load_workflow(context, caller, workflow_id).await?;
    Ok(pb::GetWorkflowResponse { workflow: Some(workflow_message(&workflow)) })
}

/// Creates a workflow after checking every field, the DAG and the steps' agents.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_workflow(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateWorkflowRequest,
) -> ServiceResult<pb::CreateWorkflowResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(workflow) = request.workflow else {
        return Err(ServiceError::invalid_field("workflow", "is required"));
    };
    let mut validator = Validator::new();
    validator.required_text("name", &workflow.name, MAX_NAME_CHARS);
    validator.max_chars("description", &workflow.description, MAX_DESCRIPTION_CHARS);
    let (steps, agent_ids) =
        read_steps(&mut validator, &workflow.steps, context.engine.settings().max_json_depth);
    let default_input = read_json_object(
        &mut validator,
        "defaultInput",
        workflow.default_input.as_ref(),
        context.engine.settings().max_json_depth,
    )
    .unwrap_or_else(|| json!({}));
    let priority = match workflow.priority {
        0 => DEFAULT_PRIORITY,
        given => read_priority(&mut validator, "priority", given),
    };
    let timeout_seconds = read_seconds(
        &mut validator,
        "timeout",
        workflow.timeout.as_ref(),
        MAX_WORKFLOW_TIMEOUT_SECONDS,
    );
    let tags = validate::tags(&mut validator, &workflow.tags);
    check_step_agents(context, caller, &mut validator, &agent_ids).await?;
    validator.finish()?;

    let created = context
        .store
        .create_workflow(NewWorkflow {
            owner_id: caller.user_id,
            name: workflow.name.trim().to_owned(),
            description: workflow.description.trim().to_owned(),
            default_input,
            priority,
            timeout_seconds,
            tags,
            steps,
        })
        .await
        .map_err(definition_refused)?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("workflow.create", "workflow", Some(created.workflow.id.to_string()))
            .with_changes(json!({ "after": audit_snapshot(&created, None) })),
    )
    .await;
    Ok(pb::CreateWorkflowResponse { workflow: Some(workflow_message(&created)) })
}

/// Changes the fields the mask names if `workflow.version` is still current; `steps` in the
/// mask replaces every step.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_workflow(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateWorkflowRequest,
) -> ServiceResult<pb::UpdateWorkflowResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(workflow) = request.workflow else {
        return Err(ServiceError::invalid_field("workflow", "is required"));
    };
    let workflow_id = parse_id("id", &workflow.id)?;
    let mut validator = Validator::new();
    let fields = update_mask_fields(&mut validator, request.update_mask, UPDATABLE_FIELDS);
    if workflow.version < 1 {
        validator.error("version", "is required: send the version you read");
    }
    let mut changes = WorkflowChanges::default();
    let mut agent_ids = Vec::new();
    for field in &fields {
        match field {
            WorkflowField::Name => {
                validator.required_text("name", &workflow.name, MAX_NAME_CHARS);
                changes.name = Some(workflow.name.trim().to_owned());
            }
            WorkflowField::Description => {
                validator.max_chars("description", &workflow.description, MAX_DESCRIPTION_CHARS);
                changes.description = Some(workflow.description.trim().to_owned());
            }
            WorkflowField::Steps => {
                let (steps, ids) = read_steps(
                    &mut validator,
                    &workflow.steps,
                    context.engine.settings().max_json_depth,
                );
                changes.steps = Some(steps);
                agent_ids = ids;
            }
            WorkflowField::DefaultInput => {
                changes.default_input = Some(
                    read_json_object(
                        &mut validator,
                        "defaultInput",
                        workflow.default_input.as_ref(),
                        context.engine.settings().max_json_depth,
                    )
                    .unwrap_or_else(|| json!({})),
                );
            }
            WorkflowField::Priority => {
                changes.priority =
                    Some(read_priority(&mut validator, "priority", workflow.priority));
            }
            WorkflowField::Timeout => {
                changes.timeout_seconds = Some(read_seconds(
                    &mut validator,
                    "timeout",
                    workflow.timeout.as_ref(),
                    MAX_WORKFLOW_TIMEOUT_SECONDS,
                ));
            }
            WorkflowField::Tags => {
                changes.tags = Some(validate::tags(&mut validator, &workflow.tags))
            }
        }
    }
    check_step_agents(context, caller, &mut validator, &agent_ids).await?;
    validator.finish()?;

    let before = load_workflow(context, caller, workflow_id).await?;
    let after = context
        .store
        .update_workflow(caller.owner_scope(), workflow_id, i64::from(workflow.version), changes)
        .await
        .map_err(definition_refused)?;
    if after.workflow.version != before.workflow.version {
        audit::record(
            context,
            Actor::Caller(caller),
            client,
            AuditEvent::success("workflow.update", "workflow", Some(workflow_id.to_string()))
                .with_changes(json!({
                    "before": audit_snapshot(&before, Some(&fields)),
                    "after": audit_snapshot(&after, Some(&fields)),
                })),
        )
        .await;
    }
    Ok(pb::UpdateWorkflowResponse { workflow: Some(workflow_message(&after)) })
}

/// Soft-deletes a workflow (its executions stay readable). `version` 0 skips the check.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_workflow(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteWorkflowRequest,
) -> ServiceResult<pb::DeleteWorkflowResponse> {
    caller.require_user_access(Access::Write)?;
    let workflow_id = parse_id("workflowId", &request.workflow_id)?;
    if request.version < 0 {
        return Err(ServiceError::invalid_field("version", "must not be negative"));
    }
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    context
        .store
        .soft_delete_workflow(caller.owner_scope(), workflow_id, expected_version)
        .await
        .map_err(|error| ServiceError::from_store(error, "workflow"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("workflow.delete", "workflow", Some(workflow_id.to_string())),
    )
    .await;
    Ok(pb::DeleteWorkflowResponse {})
}

/// Starts an execution: committed (QUEUED, its steps PENDING) before this answers.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn execute_workflow(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::ExecuteWorkflowRequest,
) -> ServiceResult<pb::ExecuteWorkflowResponse> {
    caller.require_user_access(Access::Write)?;
    let workflow_id = parse_id("workflowId", &request.workflow_id)?;
    let mut validator = Validator::new();
    let input = read_json_object(
        &mut validator,
        "input",
        request.input.as_ref(),
        context.engine.settings().max_json_depth,
    );
    let priority = match request.priority {
        0 => None,
        given => Some(read_priority(&mut validator, "priority", given)),
    };
    let timeout_seconds = read_seconds(
        &mut validator,
        "timeout",
        request.timeout.as_ref(),
        MAX_WORKFLOW_TIMEOUT_SECONDS,
    );
    validator.finish()?;

    let to_run = context
        .store
        .get_workflow_to_run(caller.owner_scope(), workflow_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "workflow"))?;
    let workflow = &to_run.workflow;
    let start = ExecutionStart {
        trigger: ExecutionTrigger::Manual,
        input: input.unwrap_or_else(|| workflow.workflow.default_input.clone()),
        priority: priority.unwrap_or(workflow.workflow.priority),
        timeout_seconds: timeout_seconds.or(workflow.workflow.timeout_seconds),
        deployment_id: None,
        parent: None,
        cron_claim: None,
    };
    let (execution, step_runs) =
        executions::start_workflow_execution(context, &to_run, start).await?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("workflow.execute", "execution", Some(execution.id.to_string()))
            .with_metadata(json!({
                "workflowId": workflow_id,
                "workflowVersion": workflow.workflow.version,
                "priority": execution.priority,
            })),
    )
    .await;
    Ok(pb::ExecuteWorkflowResponse {
        execution: Some(executions::execution_with_step_runs(&execution, &step_runs)),
    })
}

/// The workflow's executions, newest first (numbered pages or a cursor).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_workflow_executions(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListWorkflowExecutionsRequest,
) -> ServiceResult<pb::ListWorkflowExecutionsResponse> {
    caller.require_user_access(Access::Read)?;
    let workflow_id = parse_id("workflowId", &request.workflow_id)?;
    let mut validator = Validator::new();
    let paging = executions::read_paging(
        &mut validator,
        &ExecutionListRequest {
            page: request.page,
            page_size: request.page_size,
            cursor: &request.cursor,
        },
    );
    let status = executions::read_status_filter(&mut validator, request.status);
    validator.finish()?;
    // A deleted or another user's workflow is a 404, not an empty list.
    load_workflow(context, caller, workflow_id).await?;
    let mut filter = ExecutionFilter::new(caller.owner_scope());
    filter.workflow_id = Some(workflow_id);
    filter.status = status;
    let (executions, pagination) = executions::list_page(context, filter, paging).await?;
    Ok(pb::ListWorkflowExecutionsResponse { executions, pagination: Some(pagination) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(validator: &mut Validator) -> Vec<String> {
        match validator.finish() {
            Ok(()) => Vec::new(),
            Err(error) => error.field_errors.into_iter().map(|field| field.field).collect(),
        }
    }

    #[test]
    fn retry_policies_default_and_refuse_out_of_range_values() {
        let mut validator = Validator::new();
        assert_eq!(read_retry_policy(&mut validator, "p", None), DEFAULT_RETRY_POLICY);
        let given = pb::RetryPolicy {
            max_attempts: 4,
            initial_backoff: Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 }),
            max_backoff: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
            multiplier: 1.5,
        };
        assert_eq!(
            read_retry_policy(&mut validator, "p", Some(&given)),
            RetryPolicy {
                max_attempts: 4,
                initial_backoff_ms: 500,
                max_backoff_ms: 30_000,
                multiplier: 1.5
            }
        );
        assert!(errors_of(&mut validator).is_empty());
        let bad = pb::RetryPolicy {
            max_attempts: MAX_ATTEMPTS + 1,
            initial_backoff: Some(prost_types::Duration { seconds: 10, nanos: 0 }),
            max_backoff: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
            multiplier: 0.5,
        };
        read_retry_policy(&mut validator, "p", Some(&bad));
        assert_eq!(
            errors_of(&mut validator),
            vec!["p.maxAttempts", "p.maxBackoff", "p.multiplier"]
        );
        let negative = pb::RetryPolicy {
            max_attempts: -1,
            initial_backoff: Some(prost_types::Duration { seconds: -1, nanos: 0 }),
            max_backoff: Some(prost_types::Duration { seconds: 7_200, nanos: 0 }),
            multiplier: f64::NAN,
        };
        read_retry_policy(&mut validator, "p", Some(&negative));
        assert_eq!(
            errors_of(&mut validator),
            vec!["p.maxAttempts", "p.initialBackoff", "p.maxBackoff", "p.multiplier"]
        );
    }

    #[test]
    fn labels_round_trip_and_bad_ones_are_refused() {
        let mut validator = Validator::new();
        let labels = HashMap::from([
            ("region".to_owned(), "eu".to_owned()),
            ("gpu".to_owned(), String::new()),
        ]);
        let read = read_labels(&mut validator, "l", &labels);
        assert_eq!(read, vec!["gpu".to_owned(), "region=eu".to_owned()]);
        assert_eq!(labels_map(&read), labels);
        assert!(errors_of(&mut validator).is_empty());
        let bad = HashMap::from([("a=b".to_owned(), String::new())]);
        read_labels(&mut validator, "l", &bad);
        let bad_value = HashMap::from([("k".to_owned(), "line\nbreak".to_owned())]);
        read_labels(&mut validator, "l", &bad_value);
        assert_eq!(errors_of(&mut validator), vec!["l", "l"]);
    }

    #[test]
    fn durations_are_whole_seconds_within_bounds() {
        let mut validator = Validator::new();
        let seconds = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(read_seconds(&mut validator, "t", None, 10), None);
        assert_eq!(read_seconds(&mut validator, "t", Some(&seconds(10, 0)), 10), Some(10));
        assert!(errors_of(&mut validator).is_empty());
        for bad in [seconds(0, 0), seconds(11, 0), seconds(1, 5), seconds(-3, 0)] {
            read_seconds(&mut validator, "t", Some(&bad), 10);
            assert_eq!(errors_of(&mut validator), vec!["t"], "{bad:?}");
        }
        assert_eq!(milliseconds_duration(1_500), seconds(1, 500_000_000));
    }
}
