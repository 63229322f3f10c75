//! Agents: create, read, change (every change kept as a version), soft delete, duplicate and
//! list them, each type's configuration checked field by field before anything is written.
//! May call: the store, the audit trail, the `{{…}}` template parser, the proto JSON codec and
//! the DATA executor's jq compile check (`crate::jq::check_program`).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use uuid::Uuid;

use super::audit::{self, Actor, AuditEvent};
use super::convert;
use super::validate;
use super::validate::MAX_TAG_CHARS;
use super::validate::{
    MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Validator, page_request, parse_id, sort_order,
    update_mask_fields,
};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::error::{ServiceError, ServiceResult};
use crate::mapping;
use crate::proto::json;
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    Agent, AgentChanges, AgentFilter, AgentLimits, AgentSortField, AgentStatus, AgentType,
    AgentVersion, NewAgent, StoreError,
};

/// The full proto name of an agent's configuration, as its stored JSON is written and read.
const AGENT_CONFIG_MESSAGE: &str = "turbocat.v1.AgentConfig";
/// The full proto name of an agent, for the audit trail's before/after JSON.
const AGENT_MESSAGE: &str = "turbocat.v1.Agent";

/// The largest source of a CODE agent.
pub const MAX_CODE_SOURCE_BYTES: usize = 256 * 1024;
/// The largest jq program of a DATA agent.
pub const MAX_JQ_PROGRAM_BYTES: usize = 64 * 1024;
/// The largest text template (API body, LLM prompts).
pub const MAX_TEMPLATE_BYTES: usize = 256 * 1024;
/// The longest URL or URL template.
pub const MAX_URL_CHARS: usize = 2_048;
/// The most headers an API agent sends.
pub const MAX_HEADERS: usize = 50;
/// The largest value of one header template.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// The longest API request timeout of an API agent.
pub const MAX_API_TIMEOUT_SECONDS: i64 = 3_600;
/// The largest `maxTokens` of an LLM agent.
pub const MAX_LLM_TOKENS: i32 = 1_000_000;
/// Bounds of the resource limits, inclusive.
pub const TIMEOUT_SECONDS_RANGE: (i64, i64) = (1, 86_400);
pub const MEMORY_MB_RANGE: (i32, i32) = (16, 65_536);
pub const CPU_SECONDS_RANGE: (i32, i32) = (1, 86_400);
pub const MAX_OUTPUT_BYTES_RANGE: (i32, i32) = (1, 16 * 1024 * 1024);
/// The longest search text or tag filter of the list.
const MAX_SEARCH_CHARS: usize = 200;
/// The suffix of a duplicate's default name.
const COPY_SUFFIX: &str = " (copy)";

/// The sort keys of the agents list, by their JSON names.
const AGENT_SORT_FIELDS: &[(&str, AgentSortField)] = &[
    ("name", AgentSortField::Name),
    ("createdAt", AgentSortField::CreatedAt),
    ("updatedAt", AgentSortField::UpdatedAt),
    ("type", AgentSortField::AgentType),
    ("status", AgentSortField::Status),
];

/// An editable field of an agent named by an update mask, in the order fields are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EditableField {
    Name,
    Description,
    Type,
    Config,
    Limits,
    Tags,
}

/// The fields `UpdateAgent` may change, by their JSON names, in the order they are reported.
const EDITABLE_FIELDS: &[(&str, EditableField)] = &[
    ("name", EditableField::Name),
    ("description", EditableField::Description),
    ("type", EditableField::Type),
    ("config", EditableField::Config),
    ("limits", EditableField::Limits),
    ("tags", EditableField::Tags),
];

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

fn agent_type_to_proto(agent_type: AgentType) -> pb::AgentType {
    match agent_type {
        AgentType::Code => pb::AgentType::Code,
        AgentType::Api => pb::AgentType::Api,
        AgentType::Llm => pb::AgentType::Llm,
        AgentType::Data => pb::AgentType::Data,
        AgentType::Workflow => pb::AgentType::Workflow,
    }
}

/// A proto agent type as the store knows it; `None` for `UNSPECIFIED` and unknown numbers.
fn agent_type_from_proto(number: i32) -> Option<AgentType> {
    match pb::AgentType::try_from(number).ok()? {
        pb::AgentType::Code => Some(AgentType::Code),
        pb::AgentType::Api => Some(AgentType::Api),
        pb::AgentType::Llm => Some(AgentType::Llm),
        pb::AgentType::Data => Some(AgentType::Data),
        pb::AgentType::Workflow => Some(AgentType::Workflow),
        pb::AgentType::Unspecified => None,
    }
}

fn agent_status_to_proto(status: AgentStatus) -> pb::AgentStatus {
    match status {
        AgentStatus::Idle => pb::AgentStatus::Idle,
        AgentStatus::Running => pb::AgentStatus::Running,
        AgentStatus::Paused => pb::AgentStatus::Paused,
        AgentStatus::Stopped => pb::AgentStatus::Stopped,
    }
}

fn agent_status_from_proto(number: i32) -> Option<AgentStatus> {
    match pb::AgentStatus::try_from(number).ok()? {
        pb::AgentStatus::Idle => Some(AgentStatus::Idle),
        pb::AgentStatus::Running => Some(AgentStatus::Running),
        pb::AgentStatus::Paused => Some(AgentStatus::Paused),
        pb::AgentStatus::Stopped => Some(AgentStatus::Stopped),
        pb::AgentStatus::Unspecified => None,
    }
}

/// The key of the stored configuration JSON (beside `api`/`llm`) that records which
/// administrator allowed its `allowPrivateNetwork`; not part of the API's config.
const PRIVATE_NETWORK_APPROVAL: &str = "privateNetworkApprovedBy";

/// Whether a configuration opens private networks (`allowPrivateNetwork` of an API or LLM
/// agent).
fn opens_private_network(config: Option<&pb::AgentConfig>) -> bool {
    match config.and_then(|config| config.kind.as_ref()) {
        Some(pb::agent_config::Kind::Api(api)) => api.allow_private_network,
        Some(pb::agent_config::Kind::Llm(llm)) => llm.allow_private_network,
        _ => false,
    }
}

/// The stored configuration without the approval record (what the API's config holds).
fn without_approval(stored: &Value) -> Value {
    let mut config = stored.clone();
    if let Some(fields) = config.as_object_mut() {
        fields.remove(PRIVATE_NETWORK_APPROVAL);
    }
    config
}

fn is_approved(stored: &Value) -> bool {
    stored.get(PRIVATE_NETWORK_APPROVAL).and_then(Value::as_str).is_some_and(|id| !id.is_empty())
}

/// The agent as an execution runs it: `allowPrivateNetwork` only holds when an administrator
/// allowed it (saved the config with it) or owns the agent; otherwise the runner's SSRF guard
/// applies and the step fails naming the flag.
pub(crate) async fn agent_to_run(store: &dyn crate::store::Store, agent: &Agent) -> pb::Agent {
    let mut message = agent_to_proto(agent);
    if !opens_private_network(message.config.as_ref()) || is_approved(&agent.config) {
        return message;
    }
    let owner_is_admin = store
        .get_user(agent.owner_id)
        .await
        .is_ok_and(|owner| owner.role == crate::store::UserRole::Admin);
    if owner_is_admin {
        return message;
    }
    match message.config.as_mut().and_then(|config| config.kind.as_mut()) {
        Some(pb::agent_config::Kind::Api(api)) => api.allow_private_network = false,
        Some(pb::agent_config::Kind::Llm(llm)) => llm.allow_private_network = false,
        _ => {}
    }
    message
}

/// Who may open private networks: only an administrator turns `allowPrivateNetwork` on or
/// changes a config that has it; the stored config records the approving administrator.
/// `before` is the stored config of the agent being updated.
fn approve_private_network(
    caller: &Caller,
    checked_config: &mut Value,
    before: Option<&Value>,
) -> ServiceResult<()> {
    let requested = json::decode::<pb::AgentConfig>(AGENT_CONFIG_MESSAGE, checked_config.clone())
        .ok()
        .is_some_and(|config| opens_private_network(Some(&config)));
    if !requested {
        return Ok(());
    }
    if caller.is_admin() {
        if let Some(fields) = checked_config.as_object_mut() {
            fields.insert(
                PRIVATE_NETWORK_APPROVAL.to_owned(),
                Value::String(caller.user_id.to_string()),
            );
        }
        return Ok(());
    }
    // An approved config saved again unchanged keeps its approval.
    if let Some(before) = before
        && is_approved(before)
        && without_approval(before) == *checked_config
    {
        *checked_config = before.clone();
        return Ok(());
    }
    let member = if checked_config.get("llm").is_some() { "llm" } else { "api" };
    Err(ServiceError::forbidden(format!(
        "config.{member}.allowPrivateNetwork: only an administrator may open private networks"
    ))
    .with_metadata("field", format!("config.{member}.allowPrivateNetwork")))
}

/// The stored configuration JSON as the proto message; `None` (logged) if it does not decode.
fn config_from_stored(agent_id: Uuid, stored: &Value) -> Option<pb::AgentConfig> {
    match json::decode::<pb::AgentConfig>(AGENT_CONFIG_MESSAGE, without_approval(stored)) {
        Ok(config) => Some(config),
        Err(errors) => {
            let fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
            tracing::error!(%agent_id, ?fields, "a stored agent configuration does not decode");
            None
        }
    }
}

fn limits_to_proto(limits: &AgentLimits) -> pb::ResourceLimits {
    pb::ResourceLimits {
        timeout: Some(prost_types::Duration {
            seconds: i64::from(limits.timeout_seconds),
            nanos: 0,
        }),
        memory_mb: limits.memory_mb,
        cpu_seconds: limits.cpu_seconds,
        max_output_bytes: i32::try_from(limits.max_output_bytes).unwrap_or(i32::MAX),
    }
}

/// An agent as the API shows it.
pub fn agent_to_proto(agent: &Agent) -> pb::Agent {
    pb::Agent {
        id: agent.id.to_string(),
        owner_id: agent.owner_id.to_string(),
        name: agent.name.clone(),
        description: agent.description.clone(),
        r#type: agent_type_to_proto(agent.agent_type).into(),
        config: config_from_stored(agent.id, &agent.config),
        limits: Some(limits_to_proto(&agent.limits)),
        status: agent_status_to_proto(agent.status).into(),
        tags: agent.tags.clone(),
        version: i32::try_from(agent.version).unwrap_or(i32::MAX),
        created_at: Some(wkt::timestamp(agent.created_at)),
        updated_at: Some(wkt::timestamp(agent.updated_at)),
    }
}

/// Store names of changed fields (`agent_type`) as the API names them (`type`).
fn changed_field_json_name(store_name: &str) -> String {
    match store_name {
        "agent_type" => "type".to_owned(),
        other => other.to_owned(),
    }
}

/// One history entry as the API shows it; the snapshot is the agent as it was saved.
fn agent_version_to_proto(version: &AgentVersion) -> ServiceResult<pb::AgentVersion> {
    let snapshot: Agent = serde_json::from_value(version.snapshot.clone()).map_err(|error| {
        tracing::error!(agent_id = %version.agent_id, version = version.version, "a stored agent snapshot does not decode");
        ServiceError::internal(&error)
    })?;
    Ok(pb::AgentVersion {
        agent_id: version.agent_id.to_string(),
        version: i32::try_from(version.version).unwrap_or(i32::MAX),
        snapshot: Some(agent_to_proto(&snapshot)),
        changed_fields: version
            .changed_fields
            .iter()
            .map(|name| changed_field_json_name(name))
            .collect(),
        changed_by: version.changed_by.map(|id| id.to_string()).unwrap_or_default(),
        created_at: Some(wkt::timestamp(version.created_at)),
    })
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// An agent's editable fields after their checks, normalised for the store. Only meaningful
/// when the validator that produced it holds no errors.
struct CheckedAgent {
    name: String,
    description: String,
    agent_type: AgentType,
    config: Value,
    limits: AgentLimits,
    tags: Vec<String>,
    /// A WORKFLOW agent's workflow, still to be looked up in the store.
    workflow_id: Option<Uuid>,
    /// A DATA agent's jq program, still to be compiled (off the async runtime).
    jq_program: Option<String>,
}

/// Runs every check that needs no store on `agent`, adding each problem to `validator`.
fn check_agent(validator: &mut Validator, agent: &pb::Agent) -> CheckedAgent {
    let name = agent.name.trim().to_owned();
    validator.required_text("name", &name, MAX_NAME_CHARS);
    validator.max_chars("description", &agent.description, MAX_DESCRIPTION_CHARS);
    let agent_type = match agent.r#type {
        0 => {
            validator.error("type", "is required: one of CODE, API, LLM, DATA, WORKFLOW");
            None
        }
        number => {
            let agent_type = agent_type_from_proto(number);
            if agent_type.is_none() {
                validator.error("type", "must be one of CODE, API, LLM, DATA, WORKFLOW");
            }
            agent_type
        }
    };
    let limits = check_limits(validator, agent.limits.as_ref());
    let tags = validate::tags(validator, &agent.tags);
    let (config, workflow_id) =
        check_config(validator, agent_type, agent.config.as_ref(), limits.timeout_seconds);
    let jq_program = match agent.config.as_ref().and_then(|config| config.kind.as_ref()) {
        Some(pb::agent_config::Kind::Data(data))
            if !data.jq_program.trim().is_empty()
                && data.jq_program.len() <= MAX_JQ_PROGRAM_BYTES =>
        {
            Some(data.jq_program.clone())
        }
        _ => None,
    };
    CheckedAgent {
        name,
        description: agent.description.clone(),
        agent_type: agent_type.unwrap_or(AgentType::Code),
        config,
        limits,
        tags,
        workflow_id,
        jq_program,
    }
}

/// Whole seconds of a duration within `range`, or an error on `field`.
fn whole_seconds(
    validator: &mut Validator,
    field: &str,
    duration: &prost_types::Duration,
    range: (i64, i64),
) -> Option<i64> {
    if duration.nanos != 0 {
        validator.error(field, "must be a whole number of seconds");
        return None;
    }
    if !(range.0..=range.1).contains(&duration.seconds) {
        validator.error(field, format!("must be between {}s and {}s", range.0, range.1));
        return None;
    }
    Some(duration.seconds)
}

fn bounded_number(validator: &mut Validator, field: &str, value: i32, range: (i32, i32)) -> bool {
    if (range.0..=range.1).contains(&value) {
        return true;
    }
    validator.error(field, format!("must be between {} and {}", range.0, range.1));
    false
}

/// Resource limits: every absent (zero) member takes its default.
fn check_limits(validator: &mut Validator, limits: Option<&pb::ResourceLimits>) -> AgentLimits {
    let mut checked = AgentLimits::default();
    let Some(limits) = limits else { return checked };
    if let Some(timeout) = &limits.timeout
        && (timeout.seconds != 0 || timeout.nanos != 0)
        && let Some(seconds) =
            whole_seconds(validator, "limits.timeout", timeout, TIMEOUT_SECONDS_RANGE)
    {
        checked.timeout_seconds = i32::try_from(seconds).unwrap_or(checked.timeout_seconds);
    }
    if limits.memory_mb != 0
        && bounded_number(validator, "limits.memoryMb", limits.memory_mb, MEMORY_MB_RANGE)
    {
        checked.memory_mb = limits.memory_mb;
    }
    if limits.cpu_seconds != 0
        && bounded_number(validator, "limits.cpuSeconds", limits.cpu_seconds, CPU_SECONDS_RANGE)
    {
        checked.cpu_seconds = limits.cpu_seconds;
    }
    if limits.max_output_bytes != 0
        && bounded_number(
            validator,
            "limits.maxOutputBytes",
            limits.max_output_bytes,
            MAX_OUTPUT_BYTES_RANGE,
        )
    {
        checked.max_output_bytes = i64::from(limits.max_output_bytes);
    }
    checked
}

/// The name of a config member and the agent type it belongs to.
fn config_kind_name(kind: &pb::agent_config::Kind) -> (&'static str, AgentType) {
    match kind {
        pb::agent_config::Kind::Code(_) => ("code", AgentType::Code),
        pb::agent_config::Kind::Api(_) => ("api", AgentType::Api),
        pb::agent_config::Kind::Llm(_) => ("llm", AgentType::Llm),
        pb::agent_config::Kind::Data(_) => ("data", AgentType::Data),
        pb::agent_config::Kind::Workflow(_) => ("workflow", AgentType::Workflow),
    }
}

fn config_member_for(agent_type: AgentType) -> &'static str {
    match agent_type {
        AgentType::Code => "code",
        AgentType::Api => "api",
        AgentType::Llm => "llm",
        AgentType::Data => "data",
        AgentType::Workflow => "workflow",
    }
}

/// Checks the configuration against the agent's type and its own rules; returns the JSON to
/// store and, for a WORKFLOW agent, the workflow to look up.
fn check_config(
    validator: &mut Validator,
    agent_type: Option<AgentType>,
    config: Option<&pb::AgentConfig>,
    timeout_limit_seconds: i32,
) -> (Value, Option<Uuid>) {
    let Some(kind) = config.and_then(|config| config.kind.as_ref()) else {
        let expected = agent_type.map(config_member_for).unwrap_or("the member of the type");
        validator.error("config", format!("is required: give `{expected}`"));
        return (Value::Null, None);
    };
    let (given, kind_type) = config_kind_name(kind);
    if let Some(agent_type) = agent_type
        && agent_type != kind_type
    {
        validator.error(
            "config",
            format!(
                "must hold `{}` for a {} agent, not `{given}`",
                config_member_for(agent_type),
                agent_type.as_str()
            ),
        );
    }
    let mut workflow_id = None;
    let normalised = match kind {
        pb::agent_config::Kind::Code(code) => {
            pb::agent_config::Kind::Code(check_code_config(validator, code))
        }
        pb::agent_config::Kind::Api(api) => {
            pb::agent_config::Kind::Api(check_api_config(validator, api, timeout_limit_seconds))
        }
        pb::agent_config::Kind::Llm(llm) => {
            pb::agent_config::Kind::Llm(check_llm_config(validator, llm))
        }
        pb::agent_config::Kind::Data(data) => {
            pb::agent_config::Kind::Data(check_data_config(validator, data))
        }
        pb::agent_config::Kind::Workflow(workflow) => {
            let trimmed = workflow.workflow_id.trim();
            if trimmed.is_empty() {
                validator.error("config.workflow.workflowId", "is required");
            } else {
                match Uuid::parse_str(trimmed) {
                    Ok(id) => workflow_id = Some(id),
                    Err(_) => {
                        validator.error("config.workflow.workflowId", "is not a valid id");
                    }
                }
            }
            pb::agent_config::Kind::Workflow(pb::WorkflowAgentConfig {
                workflow_id: trimmed.to_owned(),
            })
        }
    };
    let stored = json::encode(AGENT_CONFIG_MESSAGE, &pb::AgentConfig { kind: Some(normalised) });
    (stored, workflow_id)
}

fn check_code_config(validator: &mut Validator, code: &pb::CodeAgentConfig) -> pb::CodeAgentConfig {
    match pb::CodeLanguage::try_from(code.language) {
        Ok(pb::CodeLanguage::Python | pb::CodeLanguage::Javascript) => {}
        _ => {
            validator.error("config.code.language", "must be PYTHON or JAVASCRIPT");
        }
    }
    match pb::CodeNetwork::try_from(code.network) {
        Ok(pb::CodeNetwork::On) => {}
        Ok(_) if code.allow_private_network => {
            validator.error("config.code.allowPrivateNetwork", "only applies with network ON");
        }
        Ok(_) => {}
        Err(_) => {
            validator.error("config.code.network", "must be OFF or ON");
        }
    }
    if code.source.trim().is_empty() {
        validator.error("config.code.source", "is required");
    } else if code.source.len() > MAX_CODE_SOURCE_BYTES {
        validator
            .error("config.code.source", format!("must be at most {MAX_CODE_SOURCE_BYTES} bytes"));
    }
    let mut normalised = code.clone();
    // Stored explicitly (a stored zero enum value would not read back): OFF is the default.
    if normalised.network == pb::CodeNetwork::Unspecified as i32 {
        normalised.network = pb::CodeNetwork::Off as i32;
    }
    normalised
}

/// A text template's placeholders must parse; returns whether they do.
fn check_placeholders(validator: &mut Validator, field: &str, template: &str) -> bool {
    match mapping::text_references(template) {
        Ok(_) => true,
        Err(error) => {
            validator
                .error(field, format!("has a placeholder that does not parse: {}", error.message));
            false
        }
    }
}

/// `template` with every `{{…}}` placeholder replaced by a plain word, so what is left can be
/// checked as a URL.
fn without_placeholders(template: &str) -> String {
    let mut result = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        result.push_str(&rest[..start]);
        let after_open = &rest[start + 2..];
        match after_open.find("}}") {
            Some(end) => {
                result.push_str("placeholder");
                rest = &after_open[end + 2..];
            }
            None => {
                rest = "";
            }
        }
    }
    result.push_str(rest);
    result
}

/// An absolute http(s) URL with a host.
fn is_web_url(text: &str) -> bool {
    url::Url::parse(text).is_ok_and(|parsed| {
        matches!(parsed.scheme(), "http" | "https")
            && parsed.host_str().is_some_and(|host| !host.is_empty())
    })
}

fn check_api_config(
    validator: &mut Validator,
    api: &pb::ApiAgentConfig,
    timeout_limit_seconds: i32,
) -> pb::ApiAgentConfig {
    let mut normalised = api.clone();
    if !matches!(
        pb::HttpMethod::try_from(api.method),
        Ok(pb::HttpMethod::Get
            | pb::HttpMethod::Post
            | pb::HttpMethod::Put
            | pb::HttpMethod::Patch
            | pb::HttpMethod::Delete)
    ) {
        validator.error("config.api.method", "must be GET, POST, PUT, PATCH or DELETE");
    }
    let url_template = api.url_template.trim();
    normalised.url_template = url_template.to_owned();
    if url_template.is_empty() {
        validator.error("config.api.urlTemplate", "is required");
    } else if url_template.chars().count() > MAX_URL_CHARS {
        validator
            .error("config.api.urlTemplate", format!("must be at most {MAX_URL_CHARS} characters"));
    } else if check_placeholders(validator, "config.api.urlTemplate", url_template)
        && !is_web_url(&without_placeholders(url_template))
    {
        validator.error(
            "config.api.urlTemplate",
            "must be an http or https URL (placeholders aside), e.g. https://example.com/{{input.id}}",
        );
    }
    if api.headers.len() > MAX_HEADERS {
        validator.error("config.api.headers", format!("must be at most {MAX_HEADERS} headers"));
    }
    let sorted_headers: BTreeMap<&String, &String> = api.headers.iter().collect();
    for (name, value) in sorted_headers {
        let field = format!("config.api.headers.{name}");
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            validator.error(&field, "is not a valid HTTP header name");
            continue;
        }
        if value.len() > MAX_HEADER_VALUE_BYTES {
            validator.error(&field, format!("must be at most {MAX_HEADER_VALUE_BYTES} bytes"));
        } else if value.chars().any(|character| matches!(character, '\r' | '\n' | '\0')) {
            validator.error(&field, "must not contain line breaks or NUL");
        } else {
            check_placeholders(validator, &field, value);
        }
    }
    if api.body_template.len() > MAX_TEMPLATE_BYTES {
        validator.error(
            "config.api.bodyTemplate",
            format!("must be at most {MAX_TEMPLATE_BYTES} bytes"),
        );
    } else {
        check_placeholders(validator, "config.api.bodyTemplate", &api.body_template);
    }
    if let Some(timeout) = &api.timeout {
        let total_nanos = i128::from(timeout.seconds) * 1_000_000_000 + i128::from(timeout.nanos);
        let max_seconds = MAX_API_TIMEOUT_SECONDS.min(i64::from(timeout_limit_seconds));
        if timeout.nanos < 0 || total_nanos < 1_000_000 {
            validator.error("config.api.timeout", "must be at least 1ms");
        } else if total_nanos > i128::from(max_seconds) * 1_000_000_000 {
            validator.error(
                "config.api.timeout",
                format!(
                    "must be at most {max_seconds}s (at most {MAX_API_TIMEOUT_SECONDS}s and \
                     within limits.timeout)"
                ),
            );
        }
    }
    normalised
}

/// `env:NAME` with NAME an environment variable name (`[A-Z_][A-Z0-9_]*`).
fn is_environment_reference(text: &str) -> bool {
    let Some(name) = text.strip_prefix("env:") else { return false };
    let mut characters = name.chars();
    let Some(first) = characters.next() else { return false };
    (first.is_ascii_uppercase() || first == '_')
        && characters.all(|character| {
            character.is_ascii_uppercase() || character.is_ascii_digit() || character == '_'
        })
}

fn check_llm_config(validator: &mut Validator, llm: &pb::LlmAgentConfig) -> pb::LlmAgentConfig {
    let mut normalised = llm.clone();
    let base_url = llm.base_url.trim();
    normalised.base_url = base_url.to_owned();
    if base_url.is_empty() {
        validator.error("config.llm.baseUrl", "is required, e.g. https://api.openai.com/v1");
    } else if base_url.chars().count() > MAX_URL_CHARS {
        validator
            .error("config.llm.baseUrl", format!("must be at most {MAX_URL_CHARS} characters"));
    } else if !is_web_url(base_url) {
        validator.error("config.llm.baseUrl", "must be an http or https URL");
    }
    let model = llm.model.trim();
    normalised.model = model.to_owned();
    validator.required_text("config.llm.model", model, MAX_NAME_CHARS);
    if llm.prompt_template.trim().is_empty() {
        validator.error("config.llm.promptTemplate", "is required");
    } else if llm.prompt_template.len() > MAX_TEMPLATE_BYTES {
        validator.error(
            "config.llm.promptTemplate",
            format!("must be at most {MAX_TEMPLATE_BYTES} bytes"),
        );
    } else {
        check_placeholders(validator, "config.llm.promptTemplate", &llm.prompt_template);
    }
    if llm.system_prompt.len() > MAX_TEMPLATE_BYTES {
        validator.error(
            "config.llm.systemPrompt",
            format!("must be at most {MAX_TEMPLATE_BYTES} bytes"),
        );
    } else {
        check_placeholders(validator, "config.llm.systemPrompt", &llm.system_prompt);
    }
    if !(llm.temperature.is_finite() && (0.0..=2.0).contains(&llm.temperature)) {
        validator.error("config.llm.temperature", "must be between 0 and 2");
    }
    if !(0..=MAX_LLM_TOKENS).contains(&llm.max_tokens) {
        validator.error(
            "config.llm.maxTokens",
            format!("must be more than 0 and at most {MAX_LLM_TOKENS} when given"),
        );
    }
    let api_key_ref = llm.api_key_ref.trim();
    normalised.api_key_ref = String::new();
    if !api_key_ref.is_empty() {
        if is_environment_reference(api_key_ref) {
            normalised.api_key_ref = api_key_ref.to_owned();
        } else {
            // Never echo the value: it may be a real key pasted by mistake.
            validator.error(
                "config.llm.apiKeyRef",
                "must name a runner environment variable like env:OPENAI_API_KEY; \
                 a literal key is refused (secrets stay on runners)",
            );
        }
    }
    normalised
}

fn check_data_config(validator: &mut Validator, data: &pb::DataAgentConfig) -> pb::DataAgentConfig {
    let program = &data.jq_program;
    if program.trim().is_empty() {
        validator.error("config.data.jqProgram", "is required");
    } else if program.len() > MAX_JQ_PROGRAM_BYTES {
        validator.error(
            "config.data.jqProgram",
            format!("must be at most {MAX_JQ_PROGRAM_BYTES} bytes"),
        );
    }
    data.clone()
}

/// A WORKFLOW agent's workflow must be live and visible to the caller.
async fn check_workflow_reference(
    context: &AppContext,
    caller: &Caller,
    validator: &mut Validator,
    workflow_id: Option<Uuid>,
) -> ServiceResult<()> {
    let Some(workflow_id) = workflow_id else { return Ok(()) };
    match context.store.get_workflow(caller.owner_scope(), workflow_id).await {
        Ok(_) => Ok(()),
        Err(StoreError::NotFound) => {
            validator.error("config.workflow.workflowId", "is not a workflow you can see");
            Ok(())
        }
        Err(error) => Err(ServiceError::from_store(error, "workflow")),
    }
}

/// The stack of the thread that compiles a jq program: its parser and compiler recurse once per
/// level of the syntax tree.
const JQ_CHECK_STACK_BYTES: usize = 64 * 1024 * 1024;
/// The most tokens of a jq program that can each add a level to its syntax tree (brackets,
/// operators, keywords, string interpolations). Measured: 64 MiB of stack holds about 8,000
/// levels in a debug build, so this keeps a wide margin; real programs stay far below it.
pub const MAX_JQ_STRUCTURE_TOKENS: usize = 4_000;
/// The jq keywords that open a construct (and so possibly a level of the syntax tree).
const JQ_NESTING_KEYWORDS: [&str; 13] = [
    "if", "then", "elif", "else", "reduce", "foreach", "try", "catch", "def", "as", "and", "or",
    "label",
];

/// One context of the jq scanner: code (possibly inside a string's `\(…)`) or a string.
enum JqContext {
    Code { open_parentheses: usize, interpolation: bool },
    Text,
}

/// An upper bound on the depth of a jq program's syntax tree: the tokens outside strings and
/// comments that can each add a level (every bracket, operator character and nesting keyword,
/// and every string interpolation).
fn jq_structure_tokens(program: &str) -> usize {
    let mut contexts = vec![JqContext::Code { open_parentheses: 0, interpolation: false }];
    let mut count = 0usize;
    let mut characters = program.chars().peekable();
    while let Some(character) = characters.next() {
        match contexts.last_mut() {
            Some(JqContext::Text) => match character {
                '\\' => {
                    if characters.next_if_eq(&'(').is_some() {
                        count += 1;
                        contexts.push(JqContext::Code { open_parentheses: 0, interpolation: true });
                    } else {
                        characters.next();
                    }
                }
                '"' => {
                    contexts.pop();
                }
                _ => {}
            },
            Some(JqContext::Code { open_parentheses, interpolation }) => match character {
                '#' => while characters.next_if(|next| *next != '\n').is_some() {},
                '"' => contexts.push(JqContext::Text),
                '(' => {
                    *open_parentheses += 1;
                    count += 1;
                }
                ')' => {
                    if *open_parentheses == 0 && *interpolation {
                        contexts.pop();
                    } else {
                        *open_parentheses = open_parentheses.saturating_sub(1);
                    }
                }
                '[' | '{' | '|' | ',' | '+' | '-' | '*' | '/' | '%' | '=' | '<' | '>' | '?' => {
                    count += 1;
                }
                letter if letter.is_ascii_alphabetic() || letter == '_' => {
                    let mut word = String::from(letter);
                    while let Some(next) =
                        characters.next_if(|next| next.is_ascii_alphanumeric() || *next == '_')
                    {
                        word.push(next);
                    }
                    if JQ_NESTING_KEYWORDS.contains(&word.as_str()) {
                        count += 1;
                    }
                }
                _ => {}
            },
            None => break,
        }
    }
    count
}

/// A DATA agent's jq program must compile. Its structure is bounded first (a deep enough
/// syntax tree would overflow any stack); compiling is CPU work, so it runs on its own thread
/// with a large stack, never on the async runtime.
async fn check_jq_program(validator: &mut Validator, program: Option<String>) -> ServiceResult<()> {
    let Some(program) = program else { return Ok(()) };
    if jq_structure_tokens(&program) > MAX_JQ_STRUCTURE_TOKENS {
        validator.error(
            "config.data.jqProgram",
            format!(
                "is too complex: at most {MAX_JQ_STRUCTURE_TOKENS} brackets, operators and \
                 keywords"
            ),
        );
        return Ok(());
    }
    if crate::jq::known_to_compile(&program) {
        return Ok(());
    }
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("jq-check".to_owned())
        .stack_size(JQ_CHECK_STACK_BYTES)
        .spawn(move || {
            let _ = sender.send(crate::jq::check_program(&program));
        })
        .map_err(|error| ServiceError::internal(&error))?;
    let outcome = receiver.await.map_err(|error| ServiceError::internal(&error))?;
    if let Err(message) = outcome {
        validator.error("config.data.jqProgram", format!("does not compile: {message}"));
    }
    Ok(())
}

/// The checks that need the store or real work: a WORKFLOW agent's workflow (only when
/// `look_up_workflow`) and a DATA agent's jq program.
async fn check_agent_further(
    context: &AppContext,
    caller: &Caller,
    validator: &mut Validator,
    checked: &CheckedAgent,
    look_up_workflow: bool,
) -> ServiceResult<()> {
    if look_up_workflow {
        check_workflow_reference(context, caller, validator, checked.workflow_id).await?;
    }
    check_jq_program(validator, checked.jq_program.clone()).await
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

pub(super) async fn load_agent(
    context: &AppContext,
    caller: &Caller,
    agent_id: Uuid,
) -> ServiceResult<Agent> {
    context
        .store
        .get_agent(caller.owner_scope(), agent_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))
}

/// The caller's agents (an admin sees all), filtered, sorted and a page at a time.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_agents(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAgentsRequest,
) -> ServiceResult<pb::ListAgentsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    let sort = sort_order(&mut validator, &request.sort, AGENT_SORT_FIELDS);
    validator.max_chars("search", &request.search, MAX_SEARCH_CHARS);
    validator.max_chars("tag", &request.tag, MAX_TAG_CHARS);
    let agent_type = match request.r#type {
        0 => None,
        number => {
            let agent_type = agent_type_from_proto(number);
            if agent_type.is_none() {
                validator.error("type", "must be one of CODE, API, LLM, DATA, WORKFLOW");
            }
            agent_type
        }
    };
    let status = match request.status {
        0 => None,
        number => {
            let status = agent_status_from_proto(number);
            if status.is_none() {
                validator.error("status", "must be one of IDLE, RUNNING, PAUSED, STOPPED");
            }
            status
        }
    };
    validator.finish()?;
    let mut filter = AgentFilter::new(caller.owner_scope());
    filter.page = page;
    filter.sort = sort;
    filter.search = Some(request.search.trim().to_owned()).filter(|search| !search.is_empty());
    filter.tag = Some(request.tag.trim().to_owned()).filter(|tag| !tag.is_empty());
    filter.agent_type = agent_type;
    filter.status = status;
    let found = context
        .store
        .list_agents(filter)
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))?;
    Ok(pb::ListAgentsResponse {
        agents: found.items.iter().map(agent_to_proto).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// One agent the caller can see.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_agent(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetAgentRequest,
) -> ServiceResult<pb::GetAgentResponse> {
    caller.require_user_access(Access::Read)?;
    let agent_id = parse_id("agentId", &request.agent_id)?;
    let agent = load_agent(context, caller, agent_id).await?;
    Ok(pb::GetAgentResponse { agent: Some(agent_to_proto(&agent)) })
}

/// Creates an agent owned by the caller, at version 1.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_agent(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateAgentRequest,
) -> ServiceResult<pb::CreateAgentResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(agent) = request.agent else {
        return Err(ServiceError::invalid_field("agent", "is required"));
    };
    let mut validator = Validator::new();
    let mut checked = check_agent(&mut validator, &agent);
    check_agent_further(context, caller, &mut validator, &checked, true).await?;
    validator.finish()?;
    approve_private_network(caller, &mut checked.config, None)?;
    let created = context
        .store
        .create_agent(NewAgent {
            owner_id: caller.user_id,
            name: checked.name,
            description: checked.description,
            agent_type: checked.agent_type,
            config: checked.config,
            limits: checked.limits,
            tags: checked.tags,
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("agent.create", "agent", Some(created.id.to_string()))
            .with_metadata(json!({ "name": created.name, "type": created.agent_type.as_str() })),
    )
    .await;
    Ok(pb::CreateAgentResponse { agent: Some(agent_to_proto(&created)) })
}

/// The named fields of an agent's REST JSON, for the audit trail.
fn fields_of(agent_json: &Value, fields: &[&str]) -> Value {
    let mut selected = serde_json::Map::new();
    for field in fields {
        selected
            .insert((*field).to_owned(), agent_json.get(*field).cloned().unwrap_or(Value::Null));
    }
    Value::Object(selected)
}

/// Changes the fields the mask names, if `agent.version` is still current; the store keeps the
/// new state as the next version.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_agent(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateAgentRequest,
) -> ServiceResult<pb::UpdateAgentResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(requested) = request.agent else {
        return Err(ServiceError::invalid_field("agent", "is required"));
    };
    let agent_id = parse_id("id", &requested.id)?;
    let mut validator = Validator::new();
    let fields = update_mask_fields(&mut validator, request.update_mask, EDITABLE_FIELDS);
    if requested.version < 1 {
        validator.error("version", "is required: send the version you read (or If-Match)");
    }
    validator.finish()?;

    let before = load_agent(context, caller, agent_id).await?;
    // The agent as it would be: the stored one with the masked fields replaced, checked whole
    // (so a type change without a matching config is caught).
    let mut candidate = agent_to_proto(&before);
    for field in &fields {
        match field {
            EditableField::Name => candidate.name.clone_from(&requested.name),
            EditableField::Description => candidate.description.clone_from(&requested.description),
            EditableField::Type => candidate.r#type = requested.r#type,
            EditableField::Config => candidate.config.clone_from(&requested.config),
            EditableField::Limits => candidate.limits.clone_from(&requested.limits),
            EditableField::Tags => candidate.tags.clone_from(&requested.tags),
        }
    }
    let mut checked = check_agent(&mut validator, &candidate);
    // A stored workflow reference is only looked up again when it is being changed.
    let config_changes =
        fields.iter().any(|field| matches!(field, EditableField::Type | EditableField::Config));
    check_agent_further(context, caller, &mut validator, &checked, config_changes).await?;
    validator.finish()?;
    if config_changes {
        approve_private_network(caller, &mut checked.config, Some(&before.config))?;
    }

    let mut changes = AgentChanges::default();
    for field in &fields {
        match field {
            EditableField::Name => changes.name = Some(checked.name.clone()),
            EditableField::Description => changes.description = Some(checked.description.clone()),
            EditableField::Type => changes.agent_type = Some(checked.agent_type),
            EditableField::Config => changes.config = Some(checked.config.clone()),
            EditableField::Limits => changes.limits = Some(checked.limits),
            EditableField::Tags => changes.tags = Some(checked.tags.clone()),
        }
    }
    let after = context
        .store
        .update_agent(
            caller.owner_scope(),
            agent_id,
            i64::from(requested.version),
            changes,
            caller.user_id,
        )
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))?;
    if after.version != before.version {
        let before_json = json::encode(AGENT_MESSAGE, &agent_to_proto(&before));
        let after_json = json::encode(AGENT_MESSAGE, &agent_to_proto(&after));
        let changed: Vec<&str> = EDITABLE_FIELDS
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| before_json.get(*name) != after_json.get(*name))
            .collect();
        audit::record(
            context,
            Actor::Caller(caller),
            client,
            AuditEvent::success("agent.update", "agent", Some(after.id.to_string()))
                .with_changes(json!({
                    "before": fields_of(&before_json, &changed),
                    "after": fields_of(&after_json, &changed),
                }))
                .with_metadata(json!({ "version": after.version })),
        )
        .await;
    }
    Ok(pb::UpdateAgentResponse { agent: Some(agent_to_proto(&after)) })
}

/// Soft-deletes an agent, refused while a live workflow uses it.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_agent(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteAgentRequest,
) -> ServiceResult<pb::DeleteAgentResponse> {
    caller.require_user_access(Access::Write)?;
    let agent_id = parse_id("agentId", &request.agent_id)?;
    if request.version < 0 {
        return Err(ServiceError::invalid_field("version", "must not be negative"));
    }
    let agent = load_agent(context, caller, agent_id).await?;
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    context
        .store
        .soft_delete_agent(caller.owner_scope(), agent_id, expected_version)
        .await
        .map_err(|error| match error {
            StoreError::InUse { by } => {
                let names: Vec<String> = by.iter().map(|(_, name)| format!("\"{name}\"")).collect();
                let ids: Vec<String> = by.iter().map(|(id, _)| id.to_string()).collect();
                ServiceError::conflict(format!(
                    "agent is used by the workflow{} {}; remove it from them first",
                    if by.len() == 1 { "" } else { "s" },
                    names.join(", ")
                ))
                .with_metadata("usedBy", ids.join(","))
            }
            other => ServiceError::from_store(other, "agent"),
        })?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("agent.delete", "agent", Some(agent_id.to_string()))
            .with_metadata(json!({ "name": agent.name, "version": agent.version })),
    )
    .await;
    Ok(pb::DeleteAgentResponse {})
}

/// The default name of a copy: `<name> (copy)`, the original shortened to stay within
/// `MAX_NAME_CHARS`.
fn copy_name(name: &str) -> String {
    let room = MAX_NAME_CHARS - COPY_SUFFIX.chars().count();
    let base: String = name.chars().take(room).collect();
    format!("{}{COPY_SUFFIX}", base.trim_end())
}

/// Copies an agent as a new agent of the caller's with a fresh history (version 1).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn duplicate_agent(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DuplicateAgentRequest,
) -> ServiceResult<pb::DuplicateAgentResponse> {
    caller.require_user_access(Access::Write)?;
    let agent_id = parse_id("agentId", &request.agent_id)?;
    let requested_name = request.name.trim();
    if !requested_name.is_empty() {
        Validator::new().max_chars("name", requested_name, MAX_NAME_CHARS).finish()?;
    }
    let source = load_agent(context, caller, agent_id).await?;
    let name =
        if requested_name.is_empty() { copy_name(&source.name) } else { requested_name.to_owned() };
    let copy = context
        .store
        .duplicate_agent(caller.owner_scope(), agent_id, caller.user_id, name)
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("agent.duplicate", "agent", Some(copy.id.to_string()))
            .with_metadata(json!({ "sourceAgentId": agent_id.to_string(), "name": copy.name })),
    )
    .await;
    Ok(pb::DuplicateAgentResponse { agent: Some(agent_to_proto(&copy)) })
}

/// An agent's history, newest first, a page at a time.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_agent_versions(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListAgentVersionsRequest,
) -> ServiceResult<pb::ListAgentVersionsResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let agent_id = match parse_id("agentId", &request.agent_id) {
        Ok(agent_id) => Some(agent_id),
        Err(_) => {
            validator.error("agentId", "is not a valid id");
            None
        }
    };
    let page = page_request(&mut validator, request.page, request.page_size);
    validator.finish()?;
    let Some(agent_id) = agent_id else {
        return Err(ServiceError::invalid_field("agentId", "is not a valid id"));
    };
    let found = context
        .store
        .list_agent_versions(caller.owner_scope(), agent_id, page)
        .await
        .map_err(|error| ServiceError::from_store(error, "agent"))?;
    let versions =
        found.items.iter().map(agent_version_to_proto).collect::<ServiceResult<Vec<_>>>()?;
    Ok(pb::ListAgentVersionsResponse {
        versions,
        pagination: Some(convert::pagination(page, found.total)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(validator: &mut Validator) -> Vec<String> {
        match validator.finish() {
            Ok(()) => Vec::new(),
            Err(error) => error.field_errors.into_iter().map(|field| field.field).collect(),
        }
    }

    #[test]
    fn environment_references_and_nothing_else_name_api_keys() {
        for good in ["env:OPENAI_API_KEY", "env:_X", "env:K2"] {
            assert!(is_environment_reference(good), "{good}");
        }
        for bad in
            ["sk-abc123", "env:", "env:lower", "env:1ABC", "ENV:KEY", "env:KEY-2", "env:KEY "]
        {
            assert!(!is_environment_reference(bad), "{bad}");
        }
    }

    #[test]
    fn url_templates_are_urls_once_placeholders_are_set_aside() {
        assert_eq!(
            without_placeholders("https://{{input.host}}/a/{{ input.id }}?q=1"),
            "https://placeholder/a/placeholder?q=1"
        );
        assert!(is_web_url(&without_placeholders("https://{{input.host}}/x")));
        assert!(!is_web_url(&without_placeholders("{{input.url}}")));
        assert!(!is_web_url(&without_placeholders("ftp://example.com/{{input.x}}")));
    }

    #[test]
    fn limits_default_when_absent_and_are_bounded() {
        let mut validator = Validator::new();
        assert_eq!(check_limits(&mut validator, None), AgentLimits::default());
        let partial = pb::ResourceLimits { memory_mb: 1024, ..Default::default() };
        let checked = check_limits(&mut validator, Some(&partial));
        assert_eq!(checked.memory_mb, 1024);
        assert_eq!(checked.timeout_seconds, AgentLimits::default().timeout_seconds);
        assert!(fields(&mut validator).is_empty());
        let bad = pb::ResourceLimits {
            timeout: Some(prost_types::Duration { seconds: 86_401, nanos: 0 }),
            memory_mb: 8,
            cpu_seconds: -1,
            max_output_bytes: 16 * 1024 * 1024 + 1,
        };
        check_limits(&mut validator, Some(&bad));
        assert_eq!(
            fields(&mut validator),
            vec!["limits.timeout", "limits.memoryMb", "limits.cpuSeconds", "limits.maxOutputBytes"]
        );
        let fractional = pb::ResourceLimits {
            timeout: Some(prost_types::Duration { seconds: 1, nanos: 5 }),
            ..Default::default()
        };
        check_limits(&mut validator, Some(&fractional));
        assert_eq!(fields(&mut validator), vec!["limits.timeout"]);
    }

    #[test]
    fn a_copy_name_stays_within_the_name_limit() {
        assert_eq!(copy_name("Greeter"), "Greeter (copy)");
        let long = "x".repeat(MAX_NAME_CHARS);
        let copied = copy_name(&long);
        assert_eq!(copied.chars().count(), MAX_NAME_CHARS);
        assert!(copied.ends_with(" (copy)"));
    }

    #[tokio::test]
    async fn jq_programs_must_compile_even_when_deeply_nested() {
        let mut validator = Validator::new();
        check_jq_program(&mut validator, Some("{a: .b | length}".into())).await.expect("checked");
        assert!(fields(&mut validator).is_empty());
        check_jq_program(&mut validator, Some(".a | ".into())).await.expect("checked");
        assert_eq!(fields(&mut validator), vec!["config.data.jqProgram"]);
        // Deep trees are refused before they reach the compiler, whatever builds them.
        for deep in [
            format!("{}.{}", "(".repeat(30_000), ")".repeat(30_000)),
            ".|".repeat(10_000) + ".",
            "1+".repeat(10_000) + "1",
            "-".repeat(60_000) + "1",
            "if . then ".repeat(5_000) + "." + &" else . end".repeat(5_000),
            format!("\"{}\"", "\\(\"".repeat(10_000)),
        ] {
            check_jq_program(&mut validator, Some(deep)).await.expect("checked");
            assert_eq!(fields(&mut validator), vec!["config.data.jqProgram"]);
        }
        // Just below the bound compiles fine (and does not overflow the checking thread).
        let chain = ".|".repeat(MAX_JQ_STRUCTURE_TOKENS) + ".";
        check_jq_program(&mut validator, Some(chain)).await.expect("checked");
        assert!(fields(&mut validator).is_empty());
        let nested = format!(
            "{}.{}",
            "(".repeat(MAX_JQ_STRUCTURE_TOKENS),
            ")".repeat(MAX_JQ_STRUCTURE_TOKENS)
        );
        check_jq_program(&mut validator, Some(nested)).await.expect("checked");
        assert!(fields(&mut validator).is_empty());
    }

    #[test]
    fn jq_structure_skips_strings_and_comments_but_not_interpolations() {
        assert_eq!(jq_structure_tokens(".a.b.c"), 0);
        assert_eq!(jq_structure_tokens(".a | .b"), 1);
        assert_eq!(jq_structure_tokens("\"((((|||\" # ((((\n| ."), 1);
        assert_eq!(jq_structure_tokens("\"a\\\"(\\(.x | .y)b\""), 2);
        assert_eq!(jq_structure_tokens("if .a then .b else .c end"), 3);
        assert_eq!(jq_structure_tokens("{a: [1, 2]}"), 3);
        assert_eq!(jq_structure_tokens("\"\\(\"\\(1)\")\" | ."), 3);
    }

    #[test]
    fn the_config_member_must_match_the_type() {
        let mut validator = Validator::new();
        let config = pb::AgentConfig {
            kind: Some(pb::agent_config::Kind::Data(pb::DataAgentConfig {
                jq_program: ".a".into(),
            })),
        };
        let (stored, _) = check_config(&mut validator, Some(AgentType::Code), Some(&config), 300);
        assert_eq!(fields(&mut validator), vec!["config"]);
        assert_eq!(stored, json!({ "data": { "jqProgram": ".a" } }));
        check_config(&mut validator, Some(AgentType::Data), None, 300);
        assert_eq!(fields(&mut validator), vec!["config"]);
        check_config(&mut validator, Some(AgentType::Data), Some(&config), 300);
        assert!(fields(&mut validator).is_empty());
    }
}
