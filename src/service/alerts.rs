//! `AlertService`: alert rules (create, read, change, delete, their deliveries and incidents),
//! what makes them fire and how they are delivered.
//!
//! Evaluation (`run_alert_evaluation`, started with the engine on every replica): the executions
//! this replica finishes arrive from the engine in memory (`Engine::finished_executions`, no
//! round trip on the engine's path), gathered for a tenth of a second so that one read of an
//! owner's rules serves all of them, and are judged against the owner's EXECUTION_FAILED and
//! FAILURES_IN_WINDOW rules; the time-based conditions are evaluated by a periodic pass in which
//! every replica polls and the database hands each due rule to one of them
//! (`Store::claim_due_alert_rules`). The numbers are the analytics service's: the agent health
//! verdict, the oldest queued step, the runners of every replica and their load.
//!
//! Once per incident: a condition that starts to hold opens an incident (at most one is open per
//! rule, a unique index), and only the replica whose insert wins sends FIRING; the one whose
//! update closes it sends RESOLVED. Delivery: a JSON POST with a Slack-compatible `text`,
//! signed like the inbound webhooks (`super::signing`), to a URL the SSRF guard vets at every
//! attempt; failed attempts are retried with exponential backoff, and every attempt is recorded.
//! May call: the store, the engine (finished executions), the queue (waiting steps), the
//! analytics service, the signing scheme, the audit trail and the shared `ssrf` guard.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::analytics;
use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::signing;
use super::validate::{
    MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Validator, optional_id, page_request, parse_id,
    update_mask_fields,
};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::engine::FinishedExecution;
use crate::engine::attached_runners::labels_satisfy;
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::ssrf;
use crate::store::{
    AlertConditionType, AlertEvent, AlertIncident, AlertRule, AlertRuleDefinition, ExecutionStatus,
    FailureWindow, NewAlertDelivery, OwnerScope, StoreError,
};

/// The longest webhook URL.
const MAX_URL_CHARS: usize = 2_048;
/// Bounds of the condition's numbers.
const MAX_FAILURE_COUNT: i32 = 10_000;
const MIN_WINDOW_SECONDS: i32 = 60;
const MAX_WINDOW_SECONDS: i32 = 604_800;
const DEFAULT_HEALTH_WINDOW_SECONDS: i32 = 3_600;
const MAX_THRESHOLD_SECONDS: i32 = 86_400;
/// How long resolving a webhook's host may take when a rule is saved.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one webhook call may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);
/// How often each replica looks for rules due for a periodic evaluation.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Rules claimed per poll.
const CLAIM_BATCH: u32 = 100;
/// Finished executions judged together at most.
const JUDGE_BATCH: usize = 256;
/// How long after an execution finishes the judge waits for others to judge with it: an
/// owner's rules are read once for all of them (under load, one read a gathering instead of
/// about one an execution), and an alert goes out at most this much later.
const JUDGE_GATHERING: Duration = Duration::from_millis(100);
/// Queue entries NO_RUNNER_AVAILABLE looks at (the front of the queue).
const QUEUE_PEEK: usize = 1_000;
/// The most characters of an execution's error a notification quotes.
const MAX_QUOTED_ERROR_CHARS: usize = 300;

/// A field `UpdateAlertRule` may change, named by the update mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AlertRuleField {
    Name,
    Description,
    Disabled,
    Condition,
    Webhook,
}

const UPDATABLE_FIELDS: &[(&str, AlertRuleField)] = &[
    ("name", AlertRuleField::Name),
    ("description", AlertRuleField::Description),
    ("disabled", AlertRuleField::Disabled),
    ("condition", AlertRuleField::Condition),
    ("webhook", AlertRuleField::Webhook),
];

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

fn condition_type_to_proto(condition_type: AlertConditionType) -> pb::AlertConditionType {
    match condition_type {
        AlertConditionType::ExecutionFailed => pb::AlertConditionType::ExecutionFailed,
        AlertConditionType::FailuresInWindow => pb::AlertConditionType::FailuresInWindow,
        AlertConditionType::NoRunnerAvailable => pb::AlertConditionType::NoRunnerAvailable,
        AlertConditionType::QueuedStepTooOld => pb::AlertConditionType::QueuedStepTooOld,
        AlertConditionType::AgentFailing => pb::AlertConditionType::AgentFailing,
    }
}

fn condition_type_from_proto(number: i32) -> Option<AlertConditionType> {
    match pb::AlertConditionType::try_from(number).ok()? {
        pb::AlertConditionType::Unspecified => None,
        pb::AlertConditionType::ExecutionFailed => Some(AlertConditionType::ExecutionFailed),
        pb::AlertConditionType::FailuresInWindow => Some(AlertConditionType::FailuresInWindow),
        pb::AlertConditionType::NoRunnerAvailable => Some(AlertConditionType::NoRunnerAvailable),
        pb::AlertConditionType::QueuedStepTooOld => Some(AlertConditionType::QueuedStepTooOld),
        pb::AlertConditionType::AgentFailing => Some(AlertConditionType::AgentFailing),
    }
}

fn optional_id_text(id: Option<Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

/// A webhook URL without its path, query and credentials: incoming-webhook URLs (Slack's among
/// them) carry their token in the path.
fn redacted_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(url) => {
            let port = url.port().map(|port| format!(":{port}")).unwrap_or_default();
            format!("{}://{}{port}/…", url.scheme(), url.host_str().unwrap_or_default())
        }
        Err(_) => "…".to_owned(),
    }
}

/// A rule as the API shows it: the webhook secret and the URL's path only to the rule's owner
/// (an administrator sees where it points, not its token).
fn rule_to_proto(rule: &AlertRule, caller: &Caller) -> pb::AlertRule {
    let show_secret = rule.owner_id == caller.user_id;
    pb::AlertRule {
        id: rule.id.to_string(),
        owner_id: rule.owner_id.to_string(),
        name: rule.name.clone(),
        description: rule.description.clone(),
        disabled: rule.disabled,
        condition: Some(pb::AlertCondition {
            r#type: condition_type_to_proto(rule.condition_type).into(),
            workflow_id: optional_id_text(rule.workflow_id),
            deployment_id: optional_id_text(rule.deployment_id),
            agent_id: optional_id_text(rule.agent_id),
            failure_count: rule.failure_count,
            window_seconds: rule.window_seconds,
            threshold_seconds: rule.threshold_seconds,
        }),
        webhook: Some(pb::AlertWebhook {
            url: if show_secret {
                rule.webhook_url.clone()
            } else {
                redacted_url(&rule.webhook_url)
            },
            secret: if show_secret { rule.webhook_secret.clone() } else { String::new() },
            allow_private_network: rule.allow_private_network,
        }),
        state: (if rule.firing { pb::AlertState::Firing } else { pb::AlertState::Ok }).into(),
        last_fired_at: wkt::optional_timestamp(rule.last_fired_at),
        last_resolved_at: wkt::optional_timestamp(rule.last_resolved_at),
        version: i32::try_from(rule.version).unwrap_or(i32::MAX),
        created_at: Some(wkt::timestamp(rule.created_at)),
        updated_at: Some(wkt::timestamp(rule.updated_at)),
    }
}

/// What the audit trail keeps of a rule: never the webhook secret nor the URL's path.
fn audit_snapshot(rule: &AlertRule) -> Value {
    json!({
        "name": rule.name,
        "disabled": rule.disabled,
        "condition": rule.condition_type.as_str(),
        "workflowId": rule.workflow_id,
        "deploymentId": rule.deployment_id,
        "agentId": rule.agent_id,
        "webhookUrl": redacted_url(&rule.webhook_url),
        "allowPrivateNetwork": rule.allow_private_network,
    })
}

fn incident_to_proto(incident: &AlertIncident) -> pb::AlertIncident {
    pb::AlertIncident {
        id: incident.id.to_string(),
        rule_id: incident.rule_id.to_string(),
        summary: incident.summary.clone(),
        opened_at: Some(wkt::timestamp(incident.opened_at)),
        resolved_at: wkt::optional_timestamp(incident.resolved_at),
    }
}

fn delivery_to_proto(delivery: &crate::store::AlertDelivery) -> pb::AlertDelivery {
    pb::AlertDelivery {
        id: delivery.id.to_string(),
        rule_id: delivery.rule_id.to_string(),
        incident_id: delivery.incident_id.to_string(),
        event: (match delivery.event {
            AlertEvent::Firing => pb::AlertEvent::Firing,
            AlertEvent::Resolved => pb::AlertEvent::Resolved,
        })
        .into(),
        attempt: delivery.attempt,
        response_status: delivery.response_status,
        succeeded: delivery.succeeded,
        error: delivery.error.clone(),
        duration_ms: delivery.duration_ms,
        attempted_at: Some(wkt::timestamp(delivery.attempted_at)),
    }
}

fn store_error(error: StoreError) -> ServiceError {
    ServiceError::from_store(error, "alert rule")
}

// ---------------------------------------------------------------------------------------------
// Input checks
// ---------------------------------------------------------------------------------------------

/// A condition's checked parts (the definition's condition fields).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CheckedCondition {
    condition_type: AlertConditionType,
    workflow_id: Option<Uuid>,
    deployment_id: Option<Uuid>,
    agent_id: Option<Uuid>,
    failure_count: i32,
    window_seconds: i32,
    threshold_seconds: i32,
}

fn check_range(validator: &mut Validator, field: &str, value: i32, low: i32, high: i32) -> i32 {
    if !(low..=high).contains(&value) {
        validator.error(field, format!("must be from {low} to {high}"));
    }
    value
}

/// Checks a condition: its type and the fields that type needs; the others must be unset.
fn check_condition(
    validator: &mut Validator,
    condition: Option<&pb::AlertCondition>,
) -> Option<CheckedCondition> {
    let Some(condition) = condition else {
        validator.error("condition", "is required");
        return None;
    };
    let Some(condition_type) = condition_type_from_proto(condition.r#type) else {
        validator.error(
            "condition.type",
            "must be EXECUTION_FAILED, FAILURES_IN_WINDOW, NO_RUNNER_AVAILABLE, \
             QUEUED_STEP_TOO_OLD or AGENT_FAILING",
        );
        return None;
    };
    let workflow_id = optional_id(validator, "condition.workflowId", &condition.workflow_id);
    let deployment_id = optional_id(validator, "condition.deploymentId", &condition.deployment_id);
    let agent_id = optional_id(validator, "condition.agentId", &condition.agent_id);
    let mut checked = CheckedCondition {
        condition_type,
        workflow_id,
        deployment_id,
        agent_id,
        failure_count: 0,
        window_seconds: 0,
        threshold_seconds: 0,
    };
    let unused = |validator: &mut Validator, field: &str, set: bool| {
        if set {
            validator.error(field, format!("does not apply to {}", condition_type.as_str()));
        }
    };
    let targets_set =
        !condition.workflow_id.trim().is_empty() || !condition.deployment_id.trim().is_empty();
    match condition_type {
        AlertConditionType::ExecutionFailed | AlertConditionType::FailuresInWindow => {
            let both = !condition.workflow_id.trim().is_empty()
                && !condition.deployment_id.trim().is_empty();
            if both {
                validator.error("condition.deploymentId", "must be empty when workflowId is set");
            }
            if condition_type == AlertConditionType::ExecutionFailed && !targets_set {
                validator.error("condition.workflowId", "or deploymentId is required");
            }
            unused(validator, "condition.agentId", !condition.agent_id.trim().is_empty());
            unused(validator, "condition.thresholdSeconds", condition.threshold_seconds != 0);
            if condition_type == AlertConditionType::FailuresInWindow {
                checked.failure_count = check_range(
                    validator,
                    "condition.failureCount",
                    condition.failure_count,
                    1,
                    MAX_FAILURE_COUNT,
                );
                checked.window_seconds = check_range(
                    validator,
                    "condition.windowSeconds",
                    condition.window_seconds,
                    MIN_WINDOW_SECONDS,
                    MAX_WINDOW_SECONDS,
                );
            } else {
                unused(validator, "condition.failureCount", condition.failure_count != 0);
                unused(validator, "condition.windowSeconds", condition.window_seconds != 0);
            }
        }
        AlertConditionType::NoRunnerAvailable | AlertConditionType::QueuedStepTooOld => {
            unused(validator, "condition.workflowId", !condition.workflow_id.trim().is_empty());
            unused(validator, "condition.deploymentId", !condition.deployment_id.trim().is_empty());
            unused(validator, "condition.agentId", !condition.agent_id.trim().is_empty());
            unused(validator, "condition.failureCount", condition.failure_count != 0);
            unused(validator, "condition.windowSeconds", condition.window_seconds != 0);
            checked.threshold_seconds = check_range(
                validator,
                "condition.thresholdSeconds",
                condition.threshold_seconds,
                1,
                MAX_THRESHOLD_SECONDS,
            );
        }
        AlertConditionType::AgentFailing => {
            if condition.agent_id.trim().is_empty() {
                validator.error("condition.agentId", "is required");
            }
            unused(validator, "condition.workflowId", !condition.workflow_id.trim().is_empty());
            unused(validator, "condition.deploymentId", !condition.deployment_id.trim().is_empty());
            unused(validator, "condition.failureCount", condition.failure_count != 0);
            unused(validator, "condition.thresholdSeconds", condition.threshold_seconds != 0);
            checked.window_seconds = if condition.window_seconds == 0 {
                DEFAULT_HEALTH_WINDOW_SECONDS
            } else {
                check_range(
                    validator,
                    "condition.windowSeconds",
                    condition.window_seconds,
                    MIN_WINDOW_SECONDS,
                    MAX_WINDOW_SECONDS,
                )
            };
        }
    }
    Some(checked)
}

/// Whether a rule may reach private networks: its own opt-in or the server's.
fn private_network_allowed(context: &AppContext, rule_opt_in: bool) -> bool {
    rule_opt_in || context.alerts.allow_private_network
}

/// Checks a webhook's URL (form and scheme) and who may open private networks; returns the URL
/// and the rule's opt-in. The address itself is vetted by `vet_webhook_address`.
fn check_webhook(
    validator: &mut Validator,
    context: &AppContext,
    caller: &Caller,
    webhook: Option<&pb::AlertWebhook>,
) -> ServiceResult<Option<(url::Url, bool)>> {
    let Some(webhook) = webhook else {
        validator.error("webhook", "is required");
        return Ok(None);
    };
    if webhook.allow_private_network && !caller.is_admin() {
        return Err(ServiceError::forbidden(
            "webhook.allowPrivateNetwork: only an administrator may open private networks",
        )
        .with_metadata("field", "webhook.allowPrivateNetwork"));
    }
    if !webhook.secret.is_empty() {
        validator.error("webhook.secret", "is generated by the server");
    }
    let text = webhook.url.trim();
    if text.is_empty() {
        validator.error("webhook.url", "is required");
        return Ok(None);
    }
    if text.chars().count() > MAX_URL_CHARS {
        validator.error("webhook.url", format!("must be at most {MAX_URL_CHARS} characters"));
        return Ok(None);
    }
    let Ok(url) = url::Url::parse(text) else {
        validator.error("webhook.url", "is not a valid URL");
        return Ok(None);
    };
    let insecure_allowed = private_network_allowed(context, webhook.allow_private_network);
    match url.scheme() {
        "https" => {}
        "http" if insecure_allowed => {}
        "http" => {
            validator.error(
                "webhook.url",
                "must be https (plain http needs allowPrivateNetwork or the server's \
                 --alerts-allow-private-network)",
            );
            return Ok(None);
        }
        _ => {
            validator.error("webhook.url", "must be an https URL");
            return Ok(None);
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        validator.error("webhook.url", "has no host");
        return Ok(None);
    }
    if !url.username().is_empty() || url.password().is_some() {
        validator.error("webhook.url", "must not carry credentials");
        return Ok(None);
    }
    Ok(Some((url, webhook.allow_private_network)))
}

/// The SSRF guard on a webhook being saved: an address it refuses is a VALIDATION_ERROR on
/// `webhook.url` (so is a host that does not resolve).
async fn vet_webhook_address(
    context: &AppContext,
    url: &url::Url,
    rule_opt_in: bool,
) -> ServiceResult<()> {
    let allowed = private_network_allowed(context, rule_opt_in);
    match tokio::time::timeout(RESOLVE_TIMEOUT, ssrf::vet_url(url, allowed)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(ServiceError::invalid_field("webhook.url", error.to_string())),
        Err(_) => Err(ServiceError::invalid_field(
            "webhook.url",
            format!("its host did not resolve within {} s", RESOLVE_TIMEOUT.as_secs()),
        )),
    }
}

/// Checks that the condition's workflow, deployment or agent is a live one of the caller's.
async fn check_subject_exists(
    context: &AppContext,
    owner_id: Uuid,
    condition: &CheckedCondition,
) -> ServiceResult<()> {
    let scope = OwnerScope::Owner(owner_id);
    let store = context.store.as_ref();
    let checks = [
        (condition.workflow_id, "condition.workflowId", "workflow"),
        (condition.deployment_id, "condition.deploymentId", "deployment"),
        (condition.agent_id, "condition.agentId", "agent"),
    ];
    for (id, field, what) in checks {
        let Some(id) = id else { continue };
        let found = match what {
            "workflow" => store.get_workflow(scope, id).await.map(|_| ()),
            "deployment" => store.get_deployment(scope, id).await.map(|_| ()),
            _ => store.get_agent(scope, id).await.map(|_| ()),
        };
        match found {
            Ok(()) => {}
            Err(StoreError::NotFound) => {
                return Err(ServiceError::invalid_field(
                    field,
                    format!("names no {what} of yours"),
                ));
            }
            Err(error) => return Err(ServiceError::from_store(error, what)),
        }
    }
    Ok(())
}

fn apply_condition(definition: &mut AlertRuleDefinition, condition: CheckedCondition) {
    definition.condition_type = condition.condition_type;
    definition.workflow_id = condition.workflow_id;
    definition.deployment_id = condition.deployment_id;
    definition.agent_id = condition.agent_id;
    definition.failure_count = condition.failure_count;
    definition.window_seconds = condition.window_seconds;
    definition.threshold_seconds = condition.threshold_seconds;
}

async fn load_rule(
    context: &AppContext,
    caller: &Caller,
    rule_id: Uuid,
) -> ServiceResult<AlertRule> {
    context.store.get_alert_rule(caller.owner_scope(), rule_id).await.map_err(store_error)
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Creates a rule for the caller, with a new webhook secret (shown in the answer and to the
/// owner on every read). It is evaluated at once.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_alert_rule(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateAlertRuleRequest,
) -> ServiceResult<pb::CreateAlertRuleResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(rule) = request.alert_rule else {
        return Err(ServiceError::invalid_field("alertRule", "is required"));
    };
    let mut validator = Validator::new();
    validator.required_text("name", &rule.name, MAX_NAME_CHARS);
    validator.max_chars("description", &rule.description, MAX_DESCRIPTION_CHARS);
    let condition = check_condition(&mut validator, rule.condition.as_ref());
    let webhook = check_webhook(&mut validator, context, caller, rule.webhook.as_ref())?;
    if rule.state != 0 {
        validator.error("state", "is set by the server");
    }
    validator.finish()?;
    let (Some(condition), Some((url, allow_private_network))) = (condition, webhook) else {
        return Err(ServiceError::invalid_field("alertRule", "is incomplete"));
    };
    vet_webhook_address(context, &url, allow_private_network).await?;
    check_subject_exists(context, caller.user_id, &condition).await?;

    let mut definition = AlertRuleDefinition {
        name: rule.name.trim().to_owned(),
        description: rule.description.trim().to_owned(),
        disabled: rule.disabled,
        condition_type: condition.condition_type,
        workflow_id: None,
        deployment_id: None,
        agent_id: None,
        failure_count: 0,
        window_seconds: 0,
        threshold_seconds: 0,
        webhook_url: url.to_string(),
        webhook_secret: signing::new_secret(),
        allow_private_network,
    };
    apply_condition(&mut definition, condition);
    let created =
        context.store.create_alert_rule(caller.user_id, definition).await.map_err(store_error)?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("alert.create", "alert_rule", Some(created.id.to_string()))
            .with_changes(json!({ "after": audit_snapshot(&created) })),
    )
    .await;
    Ok(pb::CreateAlertRuleResponse { alert_rule: Some(rule_to_proto(&created, caller)) })
}

/// A rule the caller may see.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_alert_rule(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetAlertRuleRequest,
) -> ServiceResult<pb::GetAlertRuleResponse> {
    caller.require_user_access(Access::Read)?;
    let rule_id = parse_id("alertRuleId", &request.alert_rule_id)?;
    let rule = load_rule(context, caller, rule_id).await?;
    Ok(pb::GetAlertRuleResponse { alert_rule: Some(rule_to_proto(&rule, caller)) })
}

/// The caller's rules (everyone's for an admin), oldest first, a page at a time.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_alert_rules(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAlertRulesRequest,
) -> ServiceResult<pb::ListAlertRulesResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let found =
        context.store.list_alert_rules(caller.owner_scope(), page).await.map_err(store_error)?;
    Ok(pb::ListAlertRulesResponse {
        alert_rules: found.items.iter().map(|rule| rule_to_proto(rule, caller)).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// Changes the fields the mask names, if `rule.version` is still current; a changed webhook
/// keeps its secret. The rule is evaluated again at once.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_alert_rule(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateAlertRuleRequest,
) -> ServiceResult<pb::UpdateAlertRuleResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(rule) = request.alert_rule else {
        return Err(ServiceError::invalid_field("alertRule", "is required"));
    };
    let rule_id = parse_id("id", &rule.id)?;
    let mut validator = Validator::new();
    let fields = update_mask_fields(&mut validator, request.update_mask, UPDATABLE_FIELDS);
    if rule.version < 1 {
        validator.error("version", "is required: send the version you read");
    }
    let mut condition = None;
    let mut webhook = None;
    for field in &fields {
        match field {
            AlertRuleField::Name => {
                validator.required_text("name", &rule.name, MAX_NAME_CHARS);
            }
            AlertRuleField::Description => {
                validator.max_chars("description", &rule.description, MAX_DESCRIPTION_CHARS);
            }
            AlertRuleField::Disabled => {}
            AlertRuleField::Condition => {
                condition = check_condition(&mut validator, rule.condition.as_ref());
            }
            AlertRuleField::Webhook => {
                webhook = check_webhook(&mut validator, context, caller, rule.webhook.as_ref())?;
            }
        }
    }
    validator.finish()?;
    let before = load_rule(context, caller, rule_id).await?;
    let mut definition = before.definition();
    for field in &fields {
        match field {
            AlertRuleField::Name => definition.name = rule.name.trim().to_owned(),
            AlertRuleField::Description => {
                definition.description = rule.description.trim().to_owned();
            }
            AlertRuleField::Disabled => definition.disabled = rule.disabled,
            AlertRuleField::Condition => {
                let Some(condition) = condition else {
                    return Err(ServiceError::invalid_field("condition", "is incomplete"));
                };
                // The subject must be the rule owner's (an administrator edits for the owner).
                check_subject_exists(context, before.owner_id, &condition).await?;
                apply_condition(&mut definition, condition);
            }
            AlertRuleField::Webhook => {
                let Some((url, allow_private_network)) = webhook.clone() else {
                    return Err(ServiceError::invalid_field("webhook", "is incomplete"));
                };
                vet_webhook_address(context, &url, allow_private_network).await?;
                definition.webhook_url = url.to_string();
                definition.allow_private_network = allow_private_network;
            }
        }
    }
    let after = context
        .store
        .update_alert_rule(caller.owner_scope(), rule_id, i64::from(rule.version), definition)
        .await
        .map_err(store_error)?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("alert.update", "alert_rule", Some(after.id.to_string())).with_changes(
            json!({ "before": audit_snapshot(&before), "after": audit_snapshot(&after) }),
        ),
    )
    .await;
    Ok(pb::UpdateAlertRuleResponse { alert_rule: Some(rule_to_proto(&after, caller)) })
}

/// Deletes a rule (soft); `version` 0 skips the check. Its open incident is never resolved.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_alert_rule(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteAlertRuleRequest,
) -> ServiceResult<pb::DeleteAlertRuleResponse> {
    caller.require_user_access(Access::Write)?;
    let rule_id = parse_id("alertRuleId", &request.alert_rule_id)?;
    if request.version < 0 {
        return Err(ServiceError::invalid_field("version", "must not be negative"));
    }
    let before = load_rule(context, caller, rule_id).await?;
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    context
        .store
        .soft_delete_alert_rule(caller.owner_scope(), rule_id, expected_version)
        .await
        .map_err(store_error)?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("alert.delete", "alert_rule", Some(rule_id.to_string()))
            .with_changes(json!({ "before": audit_snapshot(&before) })),
    )
    .await;
    Ok(pb::DeleteAlertRuleResponse {})
}

/// Every attempt to call the rule's webhook, newest first.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_alert_deliveries(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAlertDeliveriesRequest,
) -> ServiceResult<pb::ListAlertDeliveriesResponse> {
    caller.require_user_access(Access::Read)?;
    let rule_id = parse_id("alertRuleId", &request.alert_rule_id)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let rule = load_rule(context, caller, rule_id).await?;
    let found = context.store.list_alert_deliveries(rule.id, page).await.map_err(store_error)?;
    Ok(pb::ListAlertDeliveriesResponse {
        deliveries: found.items.iter().map(delivery_to_proto).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// The rule's incidents, newest first.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_alert_incidents(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAlertIncidentsRequest,
) -> ServiceResult<pb::ListAlertIncidentsResponse> {
    caller.require_user_access(Access::Read)?;
    let rule_id = parse_id("alertRuleId", &request.alert_rule_id)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let rule = load_rule(context, caller, rule_id).await?;
    let found = context.store.list_alert_incidents(rule.id, page).await.map_err(store_error)?;
    Ok(pb::ListAlertIncidentsResponse {
        incidents: found.items.iter().map(incident_to_proto).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// Judges the executions this replica finishes and the periodic conditions, until the task is
/// aborted (with the server).
pub async fn run_alert_evaluation(context: Arc<AppContext>) {
    let finished = context.engine.finished_executions();
    let listener = tokio::spawn(judge_finished_executions(context.clone(), finished));
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        if let Err(error) = evaluate_due_rules(&context).await {
            tracing::warn!(error = %error.message, "could not evaluate the due alert rules");
        }
        if listener.is_finished() {
            tracing::warn!("the alert listener of finished executions stopped");
            return;
        }
    }
}

async fn judge_finished_executions(
    context: Arc<AppContext>,
    mut finished: tokio::sync::broadcast::Receiver<FinishedExecution>,
) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        let first = match finished.recv().await {
            Ok(execution) => execution,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "the alert rules missed finished executions");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        // What finishes meanwhile is judged with it: one read of the rules per owner.
        tokio::time::sleep(JUDGE_GATHERING).await;
        let mut batch = vec![first];
        while batch.len() < JUDGE_BATCH {
            match finished.try_recv() {
                Ok(execution) => batch.push(execution),
                Err(TryRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "the alert rules missed finished executions");
                }
                Err(_) => break,
            }
        }
        judge_finished_executions_of(&context, &batch).await;
    }
}

/// Judges a batch of finished executions, reading each owner's execution rules once; a failure
/// is logged and costs that owner's executions of the batch only.
async fn judge_finished_executions_of(context: &Arc<AppContext>, batch: &[FinishedExecution]) {
    let judged: Vec<&FinishedExecution> = batch
        .iter()
        .filter(|execution| {
            !execution.is_child
                && (is_failure(execution.status) || execution.status == ExecutionStatus::Succeeded)
        })
        .collect();
    let owners: std::collections::BTreeSet<Uuid> =
        judged.iter().map(|execution| execution.owner_id).collect();
    for owner_id in owners {
        let rules = match context.store.execution_alert_rules(owner_id).await {
            Ok(rules) => rules,
            Err(error) => {
                tracing::warn!(%error, %owner_id, "could not read the alert rules of an owner");
                continue;
            }
        };
        if rules.is_empty() {
            continue;
        }
        for execution in judged.iter().filter(|execution| execution.owner_id == owner_id) {
            if let Err(error) = judge_finished_execution(context, execution, &rules).await {
                tracing::warn!(
                    error = %error.message,
                    execution_id = %execution.execution_id,
                    "could not judge a finished execution against the alert rules"
                );
            }
        }
    }
}

fn is_failure(status: ExecutionStatus) -> bool {
    matches!(status, ExecutionStatus::Failed | ExecutionStatus::TimedOut)
}

/// Whether a rule about a workflow or a deployment (or, with neither, all the owner's
/// executions) covers the execution.
fn covers(rule: &AlertRule, execution: &FinishedExecution) -> bool {
    match (rule.workflow_id, rule.deployment_id) {
        (Some(workflow_id), _) => execution.workflow_id == Some(workflow_id),
        (None, Some(deployment_id)) => execution.deployment_id == Some(deployment_id),
        (None, None) => true,
    }
}

fn subject_of(rule: &AlertRule) -> String {
    match (rule.workflow_id, rule.deployment_id) {
        (Some(workflow_id), _) => format!("workflow {workflow_id}"),
        (None, Some(deployment_id)) => format!("deployment {deployment_id}"),
        (None, None) => "any workflow".to_owned(),
    }
}

/// One finished top-level execution against its owner's execution rules.
async fn judge_finished_execution(
    context: &Arc<AppContext>,
    execution: &FinishedExecution,
    rules: &[AlertRule],
) -> ServiceResult<()> {
    let failed = is_failure(execution.status);
    for rule in rules.iter().filter(|rule| covers(rule, execution)) {
        match rule.condition_type {
            AlertConditionType::ExecutionFailed if failed => {
                let mut error = execution.error.clone().unwrap_or_default();
                if error.chars().count() > MAX_QUOTED_ERROR_CHARS {
                    error = error.chars().take(MAX_QUOTED_ERROR_CHARS).collect::<String>() + "…";
                }
                let summary = format!(
                    "execution {} of {} ended {}: {error}",
                    execution.execution_id,
                    subject_of(rule),
                    execution.status.as_str()
                );
                fire(context, rule, &summary).await?;
            }
            AlertConditionType::ExecutionFailed => {
                let note = format!(
                    "execution {} of {} succeeded",
                    execution.execution_id,
                    subject_of(rule)
                );
                resolve(context, rule, &note).await?;
            }
            AlertConditionType::FailuresInWindow if failed && !rule.firing => {
                if let Some(summary) = failures_in_window(context, rule).await? {
                    fire(context, rule, &summary).await?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Claims the rules due now and evaluates each.
async fn evaluate_due_rules(context: &Arc<AppContext>) -> ServiceResult<()> {
    let now = Utc::now();
    let interval = chrono::Duration::from_std(context.alerts.evaluation_interval)
        .unwrap_or(chrono::Duration::seconds(15));
    let claimed = context
        .store
        .claim_due_alert_rules(now, now + interval, CLAIM_BATCH)
        .await
        .map_err(store_error)?;
    for rule_id in claimed {
        let rule = match context.store.get_alert_rule(OwnerScope::All, rule_id).await {
            Ok(rule) => rule,
            Err(StoreError::NotFound) => continue,
            Err(error) => return Err(store_error(error)),
        };
        if let Err(error) = evaluate_rule(context, &rule).await {
            tracing::warn!(error = %error.message, rule_id = %rule.id, "could not evaluate an alert rule");
        }
    }
    Ok(())
}

/// Evaluates a periodic rule: fires when its condition holds, resolves when it no longer does.
async fn evaluate_rule(context: &Arc<AppContext>, rule: &AlertRule) -> ServiceResult<()> {
    let holds = match rule.condition_type {
        AlertConditionType::ExecutionFailed => return Ok(()),
        AlertConditionType::FailuresInWindow => failures_in_window(context, rule).await?,
        AlertConditionType::QueuedStepTooOld => queued_step_too_old(context, rule).await?,
        AlertConditionType::NoRunnerAvailable => no_runner_available(context, rule).await?,
        AlertConditionType::AgentFailing => agent_failing(context, rule).await?,
    };
    match holds {
        Some(summary) if !rule.firing => fire(context, rule, &summary).await,
        None if rule.firing => resolve(context, rule, "the condition no longer holds").await,
        _ => Ok(()),
    }
}

/// FAILURES_IN_WINDOW: `Some(summary)` when at least `failure_count` failures are in the window.
async fn failures_in_window(
    context: &AppContext,
    rule: &AlertRule,
) -> ServiceResult<Option<String>> {
    let window = chrono::Duration::seconds(i64::from(rule.window_seconds));
    let failures = context
        .store
        .count_failed_executions(FailureWindow {
            owner_id: rule.owner_id,
            workflow_id: rule.workflow_id,
            deployment_id: rule.deployment_id,
            since: Utc::now() - window,
        })
        .await
        .map_err(store_error)?;
    Ok((failures >= i64::from(rule.failure_count)).then(|| {
        format!(
            "{failures} executions of {} failed or timed out in the last {} s (the rule fires at {})",
            subject_of(rule),
            rule.window_seconds,
            rule.failure_count
        )
    }))
}

/// QUEUED_STEP_TOO_OLD: the owner's oldest queued step, as the system health reports it.
async fn queued_step_too_old(
    context: &AppContext,
    rule: &AlertRule,
) -> ServiceResult<Option<String>> {
    let waited =
        analytics::oldest_queued_step_seconds(context, OwnerScope::Owner(rule.owner_id)).await?;
    Ok((waited >= f64::from(rule.threshold_seconds)).then(|| {
        format!(
            "the oldest queued step has waited {waited:.0} s (the rule fires at {} s)",
            rule.threshold_seconds
        )
    }))
}

/// Whether a runner as the system health shows it accepts an item (its owner is already
/// checked by `analytics::visible_runners`) and has a free slot: the dispatcher's rule
/// (`engine::attached_runners::AttachedRunner::accepts`, whose label match it shares, and
/// `free_slots`) on the shared view.
fn runner_can_take(
    runner: &pb::Runner,
    agent_type: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    let type_number = pb::AgentType::from_str_name(&format!("AGENT_TYPE_{agent_type}"))
        .map(|agent_type| agent_type as i32);
    let has_type = type_number.is_some_and(|number| runner.agent_types.contains(&number));
    let has_labels = labels_satisfy(labels, |key| runner.labels.get(key));
    has_type && has_labels && !runner.draining && runner.load < runner.capacity
}

/// NO_RUNNER_AVAILABLE: a step of the owner's at the front of the queue that has waited the
/// threshold and that no runner of any replica can take now.
async fn no_runner_available(
    context: &AppContext,
    rule: &AlertRule,
) -> ServiceResult<Option<String>> {
    let threshold = chrono::Duration::seconds(i64::from(rule.threshold_seconds));
    let now = Utc::now();
    let items = context.queue.peek(QUEUE_PEEK).await.map_err(|error| {
        tracing::warn!(%error, "could not read the queue for an alert rule");
        ServiceError::internal(&error)
    })?;
    let waiting: Vec<_> = items
        .into_iter()
        .filter(|item| item.owner_id == rule.owner_id && now - item.enqueued_at >= threshold)
        .collect();
    if waiting.is_empty() {
        return Ok(None);
    }
    let runners = analytics::visible_runners(context, OwnerScope::Owner(rule.owner_id)).await;
    for item in &waiting {
        if runners
            .iter()
            .any(|runner| runner_can_take(runner, &item.agent_type, &item.required_labels))
        {
            continue;
        }
        let waited = (now - item.enqueued_at).num_seconds();
        return Ok(Some(format!(
            "step {} of execution {} ({} agent, labels {:?}) has waited {waited} s and none of \
             the {} runners it may use can take it",
            item.step_key,
            item.execution_id,
            item.agent_type,
            item.required_labels,
            runners.len()
        )));
    }
    Ok(None)
}

/// AGENT_FAILING: the agent's health verdict over the window, as its metrics report it.
async fn agent_failing(context: &AppContext, rule: &AlertRule) -> ServiceResult<Option<String>> {
    let Some(agent_id) = rule.agent_id else { return Ok(None) };
    let now = Utc::now();
    let from = now - chrono::Duration::seconds(i64::from(rule.window_seconds));
    let (verdict, reason) = analytics::agent_health_verdict(context, agent_id, from, now).await?;
    Ok((verdict == pb::HealthVerdict::Failing)
        .then(|| format!("agent {agent_id} is FAILING: {reason}")))
}

// ---------------------------------------------------------------------------------------------
// Incidents and delivery
// ---------------------------------------------------------------------------------------------

/// Opens an incident unless one is open; the replica that opens it sends FIRING.
async fn fire(context: &Arc<AppContext>, rule: &AlertRule, summary: &str) -> ServiceResult<()> {
    let Some(incident) =
        context.store.open_alert_incident(rule.id, summary).await.map_err(store_error)?
    else {
        return Ok(());
    };
    tracing::info!(rule_id = %rule.id, incident_id = %incident.id, "alert firing");
    spawn_delivery(context.clone(), rule.clone(), incident, AlertEvent::Firing, String::new());
    Ok(())
}

/// Resolves the open incident; the replica that resolves it sends RESOLVED.
async fn resolve(context: &Arc<AppContext>, rule: &AlertRule, note: &str) -> ServiceResult<()> {
    let Some(incident) =
        context.store.resolve_alert_incident(rule.id).await.map_err(store_error)?
    else {
        return Ok(());
    };
    tracing::info!(rule_id = %rule.id, incident_id = %incident.id, "alert resolved");
    spawn_delivery(context.clone(), rule.clone(), incident, AlertEvent::Resolved, note.to_owned());
    Ok(())
}

/// The notification's JSON: `text` for Slack-compatible receivers, the details for others.
fn notification_body(
    rule: &AlertRule,
    incident: &AlertIncident,
    event: AlertEvent,
    note: &str,
) -> Value {
    let text = match event {
        AlertEvent::Firing => format!("[FIRING] {}: {}", rule.name, incident.summary),
        AlertEvent::Resolved => {
            format!("[RESOLVED] {}: {} (was: {})", rule.name, note, incident.summary)
        }
    };
    json!({
        "text": text,
        "event": event.as_str(),
        "rule": {
            "id": rule.id,
            "name": rule.name,
            "condition": rule.condition_type.as_str(),
        },
        "incident": {
            "id": incident.id,
            "summary": incident.summary,
            "openedAt": incident.opened_at,
            "resolvedAt": incident.resolved_at,
        },
    })
}

fn spawn_delivery(
    context: Arc<AppContext>,
    rule: AlertRule,
    incident: AlertIncident,
    event: AlertEvent,
    note: String,
) {
    tokio::spawn(async move {
        deliver(&context, &rule, &incident, event, &note).await;
    });
}

/// What one call of the webhook came to.
struct AttemptOutcome {
    response_status: i32,
    succeeded: bool,
    error: String,
    /// Whether calling again may help (not for an address the SSRF guard refuses).
    retryable: bool,
}

/// Calls the webhook until it answers 2xx or the attempts run out, waiting `retry_backoff`,
/// then twice as long each time; every attempt is recorded.
async fn deliver(
    context: &AppContext,
    rule: &AlertRule,
    incident: &AlertIncident,
    event: AlertEvent,
    note: &str,
) {
    let body = notification_body(rule, incident, event, note).to_string();
    // The same delivery id on every attempt, so a receiver can drop a repeat.
    let delivery_id = format!("{}:{}", incident.id, event.as_str().to_lowercase());
    let attempts = context.alerts.delivery_attempts.max(1);
    let mut backoff = context.alerts.retry_backoff;
    for attempt in 1..=attempts {
        let started = Instant::now();
        let outcome = call_webhook(context, rule, &delivery_id, event, &body).await;
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let recorded = context
            .store
            .record_alert_delivery(NewAlertDelivery {
                rule_id: rule.id,
                incident_id: incident.id,
                event,
                attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
                response_status: outcome.response_status,
                succeeded: outcome.succeeded,
                error: outcome.error.clone(),
                duration_ms,
            })
            .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, rule_id = %rule.id, "could not record an alert delivery");
        }
        if outcome.succeeded {
            return;
        }
        tracing::warn!(
            rule_id = %rule.id,
            attempt,
            error = %outcome.error,
            "an alert webhook call failed"
        );
        if !outcome.retryable || attempt == attempts {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
    }
}

/// One signed POST to the rule's webhook, at the addresses the SSRF guard vetted just now.
async fn call_webhook(
    context: &AppContext,
    rule: &AlertRule,
    delivery_id: &str,
    event: AlertEvent,
    body: &str,
) -> AttemptOutcome {
    let failure = |error: String, retryable: bool| AttemptOutcome {
        response_status: 0,
        succeeded: false,
        error,
        retryable,
    };
    let url = match url::Url::parse(&rule.webhook_url) {
        Ok(url) => url,
        Err(error) => return failure(format!("the webhook URL is invalid: {error}"), false),
    };
    let allowed = private_network_allowed(context, rule.allow_private_network);
    if url.scheme() == "http" && !allowed {
        return failure("plain http is no longer allowed for this rule".to_owned(), false);
    }
    let addresses = match ssrf::vet_url(&url, allowed).await {
        Ok(addresses) => addresses,
        Err(error) => {
            let retryable = error.is_retryable();
            return failure(error.to_string(), retryable);
        }
    };
    let user_agent = concat!("turbocat-alerts/", env!("CARGO_PKG_VERSION"));
    let client = match ssrf::pinned_client_as(&url, &addresses, user_agent) {
        Ok(client) => client,
        Err(error) => return failure(error, true),
    };
    let timestamp = Utc::now().timestamp().to_string();
    let signature = signing::sign(
        &rule.webhook_secret,
        &signing::signed_payload(&timestamp, delivery_id, body.as_bytes()),
    );
    let sent = client
        .post(url)
        .timeout(DELIVERY_TIMEOUT)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(signing::TIMESTAMP_HEADER, &timestamp)
        .header(signing::DELIVERY_HEADER, delivery_id)
        .header(signing::SIGNATURE_HEADER, signature)
        .header("x-turbocat-event", event.as_str())
        .body(body.to_owned())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status();
            AttemptOutcome {
                response_status: i32::from(status.as_u16()),
                succeeded: status.is_success(),
                error: if status.is_success() {
                    String::new()
                } else {
                    format!("the webhook answered {status}")
                },
                retryable: true,
            }
        }
        // Without the URL: it may carry a token in its path.
        Err(error) => failure(format!("the call failed: {}", error.without_url()), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(labels: &[(&str, &str)], load: i32, capacity: i32) -> pb::Runner {
        pb::Runner {
            labels: labels
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            agent_types: vec![pb::AgentType::Code as i32],
            capacity,
            load,
            ..Default::default()
        }
    }

    #[test]
    fn a_redacted_url_keeps_the_origin_only() {
        assert_eq!(
            redacted_url("https://hooks.slack.com/services/T000/B000/XXXX?x=1"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(redacted_url("http://127.0.0.1:8080/hook"), "http://127.0.0.1:8080/…");
        assert_eq!(redacted_url("not a url"), "…");
    }

    #[test]
    fn a_runner_can_take_a_step_of_its_type_and_labels_with_a_free_slot() {
        let gpu: BTreeMap<String, String> = [("gpu".to_owned(), "a100".to_owned())].into();
        assert!(runner_can_take(&runner(&[("gpu", "a100")], 0, 1), "CODE", &gpu));
        assert!(!runner_can_take(&runner(&[("gpu", "a100")], 1, 1), "CODE", &gpu), "full");
        assert!(!runner_can_take(&runner(&[("gpu", "t4")], 0, 1), "CODE", &gpu), "label value");
        assert!(!runner_can_take(&runner(&[], 0, 1), "CODE", &gpu), "label missing");
        assert!(!runner_can_take(&runner(&[("gpu", "a100")], 0, 1), "LLM", &gpu), "type");
        assert!(runner_can_take(&runner(&[], 0, 4), "CODE", &BTreeMap::new()));
    }
}
