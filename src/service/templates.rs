//! Templates: reusable agents, or workflows with their agents, with declared `{{params.…}}`
//! parameters; list, read, create, change, delete and instantiate (which creates the agents and
//! the workflow for the caller through the agents and workflows services).
//! May call: the store, the audit trail, the shared `{{…}}` mappings (`crate::mapping`), the proto JSON
//! codec, and the agents and workflows services.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::audit::{self, Actor, AuditEvent};
use super::validate;
use super::validate::MAX_TAG_CHARS;
use super::validate::{
    MAX_DESCRIPTION_CHARS, MAX_NAME_CHARS, Validator, page_request, parse_id, sort_order,
    update_mask_fields,
};
use super::{agents, convert, workflows};
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller, ClientInfo};
use crate::error::{ErrorCode, FieldError, ServiceError, ServiceResult};
use crate::mapping::{self, MappingError};
use crate::proto::json;
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    NewTemplate, OwnerScope, SortOrder, Template, TemplateChanges, TemplateFilter, TemplateKind,
    TemplateSortField,
};

/// The longest search text of a list.
const MAX_SEARCH_CHARS: usize = 200;
/// The longest category.
pub const MAX_CATEGORY_CHARS: usize = 50;
/// The most parameters of a template, the longest parameter name and description.
pub const MAX_PARAMETERS: usize = 50;
pub const MAX_PARAMETER_NAME_CHARS: usize = 64;
pub const MAX_PARAMETER_DESCRIPTION_CHARS: usize = 1_000;
/// The largest body, as compact JSON.
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// The most agents a workflow template holds.
pub const MAX_TEMPLATE_AGENTS: usize = 50;

const AGENT_MESSAGE: &str = "turbocat.v1.Agent";
const WORKFLOW_MESSAGE: &str = "turbocat.v1.Workflow";
const PARAMETER_MESSAGE: &str = "turbocat.v1.TemplateParameter";

/// The sort keys of the templates list, by their JSON names.
const TEMPLATE_SORT_FIELDS: &[(&str, TemplateSortField)] = &[
    ("name", TemplateSortField::Name),
    ("createdAt", TemplateSortField::CreatedAt),
    ("updatedAt", TemplateSortField::UpdatedAt),
];

/// A field `UpdateTemplate` may change, named by the update mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TemplateField {
    Name,
    Description,
    Category,
    Tags,
    Public,
    Kind,
    Body,
    Parameters,
}

/// The fields `UpdateTemplate` may change, by their JSON names, in the order they are checked.
const UPDATABLE_FIELDS: &[(&str, TemplateField)] = &[
    ("name", TemplateField::Name),
    ("description", TemplateField::Description),
    ("category", TemplateField::Category),
    ("tags", TemplateField::Tags),
    ("public", TemplateField::Public),
    ("kind", TemplateField::Kind),
    ("body", TemplateField::Body),
    ("parameters", TemplateField::Parameters),
];

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

fn kind_to_proto(kind: TemplateKind) -> pb::TemplateKind {
    match kind {
        TemplateKind::Agent => pb::TemplateKind::Agent,
        TemplateKind::Workflow => pb::TemplateKind::Workflow,
    }
}

fn kind_from_proto(number: i32) -> Option<TemplateKind> {
    match pb::TemplateKind::try_from(number).ok()? {
        pb::TemplateKind::Agent => Some(TemplateKind::Agent),
        pb::TemplateKind::Workflow => Some(TemplateKind::Workflow),
        pb::TemplateKind::Unspecified => None,
    }
}

/// A stored parameter (the REST JSON of `TemplateParameter`) as its message.
fn parameter_from_json(parameter: &Value) -> pb::TemplateParameter {
    json::decode::<pb::TemplateParameter>(PARAMETER_MESSAGE, parameter.clone()).unwrap_or_default()
}

/// A parameter as stored: the REST JSON of `TemplateParameter`.
fn parameter_to_json(parameter: &pb::TemplateParameter) -> Value {
    json::encode(PARAMETER_MESSAGE, parameter)
}

/// A template as the API shows it.
pub fn template_to_proto(template: &Template) -> pb::Template {
    pb::Template {
        id: template.id.to_string(),
        owner_id: template.owner_id.map(|id| id.to_string()).unwrap_or_default(),
        name: template.name.clone(),
        description: template.description.clone(),
        category: template.category.clone(),
        tags: template.tags.clone(),
        public: template.is_public || template.owner_id.is_none(),
        kind: kind_to_proto(template.kind).into(),
        body: Some(wkt::json_object_to_struct(&template.body)),
        parameters: template.parameters.iter().map(parameter_from_json).collect(),
        builtin: template.owner_id.is_none(),
        version: i32::try_from(template.version).unwrap_or(i32::MAX),
        created_at: Some(wkt::timestamp(template.created_at)),
        updated_at: Some(wkt::timestamp(template.updated_at)),
    }
}

/// What the audit trail keeps of a template (not the whole body).
fn audit_snapshot(template: &Template) -> Value {
    json!({
        "name": template.name,
        "description": template.description,
        "category": template.category,
        "tags": template.tags,
        "public": template.is_public,
        "kind": template.kind.as_str(),
        "parameters": template.parameters.iter()
            .filter_map(|parameter| parameter.get("name").cloned())
            .collect::<Vec<_>>(),
        "version": template.version,
    })
}

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

/// A declared parameter after its checks.
#[derive(Debug, Clone)]
struct Parameter {
    name: String,
    kind: pb::ParameterType,
    required: bool,
    /// `None` when the declaration has no default (or a null one).
    default_value: Option<Value>,
}

fn type_name(kind: pb::ParameterType) -> &'static str {
    match kind {
        pb::ParameterType::String => "a string",
        pb::ParameterType::Number => "a number",
        pb::ParameterType::Boolean => "true or false",
        pb::ParameterType::Json => "any JSON value",
        pb::ParameterType::Unspecified => "typed",
    }
}

fn matches_type(kind: pb::ParameterType, value: &Value) -> bool {
    match kind {
        pb::ParameterType::String => value.is_string(),
        pb::ParameterType::Number => value.is_number(),
        pb::ParameterType::Boolean => value.is_boolean(),
        pb::ParameterType::Json => true,
        pb::ParameterType::Unspecified => false,
    }
}

/// Whole numbers come back from `google.protobuf.Value` as doubles (`3.0`): make them integers
/// again so that an integer field of an agent accepts them.
fn normalize_numbers(value: Value) -> Value {
    match value {
        Value::Number(number) => match number.as_f64() {
            Some(float)
                if number.is_f64()
                    && float.fract() == 0.0
                    && float.abs() < 9_007_199_254_740_992.0 =>
            {
                #[expect(clippy::cast_possible_truncation, reason = "checked whole and in range")]
                let whole = float as i64;
                Value::from(whole)
            }
            _ => Value::Number(number),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(normalize_numbers).collect()),
        Value::Object(object) => Value::Object(
            object.into_iter().map(|(key, item)| (key, normalize_numbers(item))).collect(),
        ),
        other => other,
    }
}

fn is_parameter_name(name: &str) -> bool {
    let mut characters = name.chars();
    characters.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && characters.all(|character| character.is_ascii_alphanumeric() || character == '_')
}

/// Checks the declared parameters; returns them (only those whose name and type are sound).
fn check_parameters(
    validator: &mut Validator,
    declared: &[pb::TemplateParameter],
) -> Vec<Parameter> {
    if declared.len() > MAX_PARAMETERS {
        validator.error("parameters", format!("must hold at most {MAX_PARAMETERS} parameters"));
    }
    let mut seen = BTreeSet::new();
    let mut parameters = Vec::new();
    for (index, parameter) in declared.iter().enumerate() {
        let field = |name: &str| format!("parameters[{index}].{name}");
        let name = parameter.name.trim();
        let mut sound = true;
        if !is_parameter_name(name) || name.chars().count() > MAX_PARAMETER_NAME_CHARS {
            validator.error(
                &field("name"),
                format!(
                    "must be letters, digits and _, not starting with a digit (at most \
                     {MAX_PARAMETER_NAME_CHARS})"
                ),
            );
            sound = false;
        } else if !seen.insert(name.to_owned()) {
            validator.error(&field("name"), format!("{name:?} is declared twice"));
            sound = false;
        }
        validator.max_chars(
            &field("description"),
            &parameter.description,
            MAX_PARAMETER_DESCRIPTION_CHARS,
        );
        let kind =
            pb::ParameterType::try_from(parameter.r#type).unwrap_or(pb::ParameterType::Unspecified);
        if kind == pb::ParameterType::Unspecified {
            validator.error(&field("type"), "must be STRING, NUMBER, BOOLEAN or JSON");
            sound = false;
        }
        let default_value = parameter
            .default_value
            .as_ref()
            .map(wkt::value_to_json)
            .filter(|value| !value.is_null())
            .map(normalize_numbers);
        if let Some(value) = &default_value
            && kind != pb::ParameterType::Unspecified
            && !matches_type(kind, value)
        {
            validator.error(&field("defaultValue"), format!("must be {}", type_name(kind)));
            sound = false;
        }
        if sound {
            parameters.push(Parameter {
                name: name.to_owned(),
                kind,
                required: parameter.required,
                default_value,
            });
        }
    }
    parameters
}

/// The parameters of a stored template.
fn stored_parameters(template: &Template) -> Vec<Parameter> {
    let declared: Vec<pb::TemplateParameter> =
        template.parameters.iter().map(parameter_from_json).collect();
    let mut validator = Validator::new();
    check_parameters(&mut validator, &declared)
}

/// A value of each parameter's type, to check a body's shape before real values exist.
fn sample_scope(parameters: &[Parameter]) -> Value {
    let mut values = Map::new();
    for parameter in parameters {
        let value = parameter.default_value.clone().unwrap_or_else(|| match parameter.kind {
            pb::ParameterType::String => Value::from("text"),
            pb::ParameterType::Number => Value::from(1),
            pb::ParameterType::Boolean => Value::from(true),
            pb::ParameterType::Json | pb::ParameterType::Unspecified => Value::Null,
        });
        values.insert(parameter.name.clone(), value);
    }
    json!({ "params": values })
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

fn join_field(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (_, true) => prefix.to_owned(),
        _ => format!("{prefix}.{field}"),
    }
}

/// A location inside the body (`agents.a.name`, `steps[0]`) as a request field.
fn body_field(location: &str) -> String {
    if location.is_empty() {
        "body".to_owned()
    } else if location.starts_with('[') {
        format!("body{location}")
    } else {
        format!("body.{location}")
    }
}

/// Renders only the `{{params.…}}` placeholders of a JSON template; every other placeholder
/// (`{{input.…}}`, `{{steps.…}}`) stays as it is, for the engine to render at run time.
fn render_parameters(template: &Value, scope: &Value) -> Result<Value, MappingError> {
    render_parameters_at(template, scope, "")
}

fn render_parameters_at(
    template: &Value,
    scope: &Value,
    location: &str,
) -> Result<Value, MappingError> {
    match template {
        Value::String(text) => render_parameter_text(text, scope, location),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| render_parameters_at(item, scope, &format!("{location}[{index}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(object) => {
            let mut rendered = Map::with_capacity(object.len());
            for (key, value) in object {
                let child =
                    if location.is_empty() { key.clone() } else { format!("{location}.{key}") };
                rendered.insert(key.clone(), render_parameters_at(value, scope, &child)?);
            }
            Ok(Value::Object(rendered))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(template.clone()),
    }
}

fn render_parameter_text(text: &str, scope: &Value, location: &str) -> Result<Value, MappingError> {
    let located = |error: MappingError| MappingError { location: location.to_owned(), ..error };
    let references = mapping::text_references(text).map_err(located)?;
    let is_parameter = |reference: &mapping::Reference| reference.root() == Some("params");
    if !references.iter().any(is_parameter) {
        return Ok(Value::String(text.to_owned()));
    }
    if references.iter().all(is_parameter) {
        return mapping::render(&Value::String(text.to_owned()), scope).map_err(located);
    }
    // Parameters mixed with run-time placeholders: render the parameters as text in place.
    let mut rendered = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        rendered.push_str(&rest[..start]);
        let after_open = &rest[start + 2..];
        let Some(end) = after_open.find("}}") else { break };
        let placeholder = &rest[start..start + 2 + end + 2];
        let placeholder_references = mapping::text_references(placeholder).map_err(located)?;
        if placeholder_references.iter().all(is_parameter) {
            rendered.push_str(&mapping::render_text(placeholder, scope).map_err(located)?);
        } else {
            rendered.push_str(placeholder);
        }
        rest = &after_open[end + 2..];
    }
    rendered.push_str(rest);
    Ok(Value::String(rendered))
}

/// Every `{{params.x}}` of the body must name a declared parameter.
fn check_parameter_references(validator: &mut Validator, body: &Value, declared: &BTreeSet<&str>) {
    let references = match mapping::references(body) {
        Ok(references) => references,
        Err(error) => {
            validator.error(&body_field(&error.location), error.message);
            return;
        }
    };
    for (location, reference) in references {
        if reference.root() != Some("params") {
            continue;
        }
        match reference.key_at(1) {
            Some(name) if declared.contains(name) => {}
            Some(name) => {
                validator.error(
                    &body_field(&location),
                    format!("{{{{{}}}}}: {name:?} is not a declared parameter", reference.text),
                );
            }
            None => {
                validator.error(
                    &body_field(&location),
                    format!("{{{{{}}}}} must name one parameter", reference.text),
                );
            }
        }
    }
}

/// Reports a message's decode errors under `prefix`.
fn report_decode_errors(validator: &mut Validator, prefix: &str, errors: Vec<FieldError>) {
    for error in errors {
        let field = if error.field == "body" { String::new() } else { error.field };
        validator.error(&join_field(prefix, &field), error.message);
    }
}

/// Checks that the body, with sample values for the parameters, has the shape its kind needs:
/// an agent, or `{"agents": {ref: agent}, "workflow": workflow}` whose steps name the refs.
fn check_body_shape(validator: &mut Validator, kind: TemplateKind, rendered: Value) {
    match kind {
        TemplateKind::Agent => {
            if let Err(errors) = json::decode::<pb::Agent>(AGENT_MESSAGE, rendered) {
                report_decode_errors(validator, "body", errors);
            }
        }
        TemplateKind::Workflow => {
            let Value::Object(mut object) = rendered else {
                validator.error("body", "must be an object with agents and workflow");
                return;
            };
            for key in object.keys() {
                if key != "agents" && key != "workflow" {
                    validator
                        .error(&format!("body.{key}"), "unknown field: use agents and workflow");
                }
            }
            let agent_refs: BTreeSet<String> = match object.remove("agents") {
                Some(Value::Object(agents)) => {
                    if agents.is_empty() {
                        validator.error("body.agents", "must hold at least one agent");
                    }
                    if agents.len() > MAX_TEMPLATE_AGENTS {
                        validator.error(
                            "body.agents",
                            format!("must hold at most {MAX_TEMPLATE_AGENTS} agents"),
                        );
                    }
                    for (reference, agent) in &agents {
                        if let Err(errors) = json::decode::<pb::Agent>(AGENT_MESSAGE, agent.clone())
                        {
                            report_decode_errors(
                                validator,
                                &format!("body.agents.{reference}"),
                                errors,
                            );
                        }
                    }
                    agents.keys().cloned().collect()
                }
                _ => {
                    validator.error("body.agents", "is required: an object of agents by ref");
                    BTreeSet::new()
                }
            };
            let Some(workflow) = object.remove("workflow").filter(Value::is_object) else {
                validator.error("body.workflow", "is required: a workflow object");
                return;
            };
            match json::decode::<pb::Workflow>(WORKFLOW_MESSAGE, workflow) {
                Err(errors) => report_decode_errors(validator, "body.workflow", errors),
                Ok(workflow) => {
                    if workflow.steps.is_empty() {
                        validator.error("body.workflow.steps", "must hold at least one step");
                    }
                    for (index, step) in workflow.steps.iter().enumerate() {
                        if !agent_refs.contains(step.agent_id.trim()) {
                            validator.error(
                                &format!("body.workflow.steps[{index}].agentId"),
                                format!("{:?} names no agent of body.agents", step.agent_id),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Checks a body against its kind and parameters; returns it as stored JSON.
fn check_body(
    validator: &mut Validator,
    kind: Option<TemplateKind>,
    body: Option<&prost_types::Struct>,
    parameters: &[Parameter],
    max_depth: usize,
) -> Value {
    let Some(body) = body.filter(|body| !body.fields.is_empty()) else {
        validator.error("body", "is required");
        return json!({});
    };
    let body = normalize_numbers(wkt::struct_to_json(body));
    if body.to_string().len() > MAX_BODY_BYTES {
        validator.error("body", format!("must be at most {MAX_BODY_BYTES} bytes of JSON"));
        return body;
    }
    if crate::proto::wkt::json_depth(&body) > max_depth {
        validator.json_depth("body", &body, max_depth);
        return body;
    }
    let declared: BTreeSet<&str> =
        parameters.iter().map(|parameter| parameter.name.as_str()).collect();
    let mut references_validator = Validator::new();
    check_parameter_references(&mut references_validator, &body, &declared);
    if let Err(error) = references_validator.finish() {
        for field_error in error.field_errors {
            validator.error(&field_error.field, field_error.message);
        }
        return body;
    }
    let Some(kind) = kind else { return body };
    match render_parameters(&body, &sample_scope(parameters)) {
        Ok(rendered) => check_body_shape(validator, kind, normalize_numbers(rendered)),
        Err(error) => {
            validator.error(&body_field(&error.location), error.message);
        }
    }
    body
}

fn check_category(validator: &mut Validator, category: &str) {
    let category = category.trim();
    validator.max_chars("category", category, MAX_CATEGORY_CHARS);
    if !category
        .chars()
        .all(|character| character.is_alphanumeric() || matches!(character, '-' | '_' | ' '))
    {
        validator.error("category", "may hold only letters, digits, spaces, - and _");
    }
}

fn check_kind(validator: &mut Validator, number: i32) -> Option<TemplateKind> {
    let kind = kind_from_proto(number);
    if kind.is_none() {
        validator.error("kind", "must be AGENT or WORKFLOW");
    }
    kind
}

async fn load_template(
    context: &AppContext,
    caller: &Caller,
    template_id: Uuid,
) -> ServiceResult<Template> {
    context
        .store
        .get_template(caller.owner_scope(), template_id)
        .await
        .map_err(|error| ServiceError::from_store(error, "template"))
}

/// A template the caller may see but not change is FORBIDDEN: built-ins (for everyone) and
/// other users' public templates (for everyone but an admin). Others' private templates are
/// not visible at all, hence NOT_FOUND before this check.
fn require_changeable(
    caller: &Caller,
    template: &Template,
    builtin_message: &str,
) -> ServiceResult<()> {
    match template.owner_id {
        None => Err(ServiceError::forbidden(builtin_message)),
        Some(owner_id) if owner_id != caller.user_id && !caller.is_admin() => {
            Err(ServiceError::forbidden("only its owner can change this template"))
        }
        Some(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// The caller's templates, the public ones and the built-ins (everything for an admin).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn list_templates(
    context: &AppContext,
    caller: &Caller,
    request: pb::ListTemplatesRequest,
) -> ServiceResult<pb::ListTemplatesResponse> {
    caller.require_user_access(Access::Read)?;
    let mut validator = Validator::new();
    let page = page_request(&mut validator, request.page, request.page_size);
    let sort: Option<SortOrder<TemplateSortField>> =
        sort_order(&mut validator, &request.sort, TEMPLATE_SORT_FIELDS);
    validator.max_chars("search", &request.search, MAX_SEARCH_CHARS);
    validator.max_chars("category", &request.category, MAX_CATEGORY_CHARS);
    validator.max_chars("tag", &request.tag, MAX_TAG_CHARS);
    let kind = match request.kind {
        0 => None,
        number => check_kind(&mut validator, number),
    };
    validator.finish()?;
    let text = |value: &str| Some(value.trim().to_owned()).filter(|value| !value.is_empty());
    // `mineOnly` means the caller's own, for an admin too.
    let viewer =
        if request.mine_only { OwnerScope::Owner(caller.user_id) } else { caller.owner_scope() };
    let found = context
        .store
        .list_templates(TemplateFilter {
            viewer,
            page,
            sort,
            search: text(&request.search),
            category: text(&request.category),
            kind,
            tag: text(&request.tag),
            mine_only: request.mine_only,
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "template"))?;
    Ok(pb::ListTemplatesResponse {
        templates: found.items.iter().map(template_to_proto).collect(),
        pagination: Some(convert::pagination(page, found.total)),
    })
}

/// A template the caller may see.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn get_template(
    context: &AppContext,
    caller: &Caller,
    request: pb::GetTemplateRequest,
) -> ServiceResult<pb::GetTemplateResponse> {
    caller.require_user_access(Access::Read)?;
    let template_id = parse_id("templateId", &request.template_id)?;
    let template = load_template(context, caller, template_id).await?;
    Ok(pb::GetTemplateResponse { template: Some(template_to_proto(&template)) })
}

/// Creates a template owned by the caller after checking its parameters and its body.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn create_template(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::CreateTemplateRequest,
) -> ServiceResult<pb::CreateTemplateResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(template) = request.template else {
        return Err(ServiceError::invalid_field("template", "is required"));
    };
    let mut validator = Validator::new();
    validator.required_text("name", &template.name, MAX_NAME_CHARS);
    validator.max_chars("description", &template.description, MAX_DESCRIPTION_CHARS);
    check_category(&mut validator, &template.category);
    let tags = validate::tags(&mut validator, &template.tags);
    let kind = check_kind(&mut validator, template.kind);
    let parameters = check_parameters(&mut validator, &template.parameters);
    let body = check_body(
        &mut validator,
        kind,
        template.body.as_ref(),
        &parameters,
        context.engine.settings().max_json_depth,
    );
    if template.builtin {
        validator.error("builtin", "only the installation ships built-in templates");
    }
    validator.finish()?;
    let Some(kind) = kind else {
        return Err(ServiceError::invalid_field("kind", "must be AGENT or WORKFLOW"));
    };
    let created = context
        .store
        .create_template(NewTemplate {
            owner_id: caller.user_id,
            name: template.name.trim().to_owned(),
            description: template.description.trim().to_owned(),
            category: template.category.trim().to_owned(),
            tags,
            is_public: template.public,
            kind,
            body,
            parameters: template.parameters.iter().map(parameter_to_json).collect(),
        })
        .await
        .map_err(|error| ServiceError::from_store(error, "template"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("template.create", "template", Some(created.id.to_string()))
            .with_changes(json!({ "after": audit_snapshot(&created) })),
    )
    .await;
    Ok(pb::CreateTemplateResponse { template: Some(template_to_proto(&created)) })
}

/// Changes the fields the mask names if `template.version` is still current. The body is
/// checked again whenever the kind, the body or the parameters change.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn update_template(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::UpdateTemplateRequest,
) -> ServiceResult<pb::UpdateTemplateResponse> {
    caller.require_user_access(Access::Write)?;
    let Some(template) = request.template else {
        return Err(ServiceError::invalid_field("template", "is required"));
    };
    let template_id = parse_id("id", &template.id)?;
    let mut validator = Validator::new();
    let fields = update_mask_fields(&mut validator, request.update_mask, UPDATABLE_FIELDS);
    if template.version < 1 {
        validator.error("version", "is required: send the version you read");
    }
    let before = load_template(context, caller, template_id).await?;
    require_changeable(caller, &before, "built-in templates cannot be changed")?;

    let mut changes = TemplateChanges::default();
    let mut new_kind = None;
    let mut new_parameters = None;
    for field in &fields {
        match field {
            TemplateField::Name => {
                validator.required_text("name", &template.name, MAX_NAME_CHARS);
                changes.name = Some(template.name.trim().to_owned());
            }
            TemplateField::Description => {
                validator.max_chars("description", &template.description, MAX_DESCRIPTION_CHARS);
                changes.description = Some(template.description.trim().to_owned());
            }
            TemplateField::Category => {
                check_category(&mut validator, &template.category);
                changes.category = Some(template.category.trim().to_owned());
            }
            TemplateField::Tags => {
                changes.tags = Some(validate::tags(&mut validator, &template.tags))
            }
            TemplateField::Public => changes.is_public = Some(template.public),
            TemplateField::Kind => {
                new_kind = check_kind(&mut validator, template.kind);
                changes.kind = new_kind;
            }
            TemplateField::Body => {}
            TemplateField::Parameters => {
                new_parameters = Some(check_parameters(&mut validator, &template.parameters));
                changes.parameters =
                    Some(template.parameters.iter().map(parameter_to_json).collect());
            }
        }
    }
    let shape_changes = [TemplateField::Kind, TemplateField::Body, TemplateField::Parameters];
    if fields.iter().any(|field| shape_changes.contains(field)) {
        let kind = if fields.contains(&TemplateField::Kind) { new_kind } else { Some(before.kind) };
        let parameters = new_parameters.unwrap_or_else(|| stored_parameters(&before));
        let body_struct;
        let body = if fields.contains(&TemplateField::Body) {
            template.body.as_ref()
        } else {
            body_struct = wkt::json_object_to_struct(&before.body);
            Some(&body_struct)
        };
        let checked_body = check_body(
            &mut validator,
            kind,
            body,
            &parameters,
            context.engine.settings().max_json_depth,
        );
        if fields.contains(&TemplateField::Body) {
            changes.body = Some(checked_body);
        }
    }
    validator.finish()?;

    let after = context
        .store
        .update_template(caller.owner_scope(), template_id, i64::from(template.version), changes)
        .await
        .map_err(|error| ServiceError::from_store(error, "template"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("template.update", "template", Some(after.id.to_string()))
            .with_changes(
                json!({ "before": audit_snapshot(&before), "after": audit_snapshot(&after) }),
            ),
    )
    .await;
    Ok(pb::UpdateTemplateResponse { template: Some(template_to_proto(&after)) })
}

/// Deletes a template (soft); `version` 0 skips the check. Built-ins are refused, except to an
/// admin (a deleted built-in stays deleted across restarts).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn delete_template(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::DeleteTemplateRequest,
) -> ServiceResult<pb::DeleteTemplateResponse> {
    caller.require_user_access(Access::Write)?;
    let template_id = parse_id("templateId", &request.template_id)?;
    if request.version < 0 {
        return Err(ServiceError::invalid_field("version", "must not be negative"));
    }
    let before = load_template(context, caller, template_id).await?;
    if !(before.owner_id.is_none() && caller.is_admin()) {
        require_changeable(caller, &before, "built-in templates cannot be deleted")?;
    }
    let expected_version = (request.version > 0).then_some(i64::from(request.version));
    context
        .store
        .soft_delete_template(caller.owner_scope(), template_id, expected_version)
        .await
        .map_err(|error| ServiceError::from_store(error, "template"))?;
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("template.delete", "template", Some(template_id.to_string()))
            .with_changes(json!({ "before": audit_snapshot(&before) })),
    )
    .await;
    Ok(pb::DeleteTemplateResponse {})
}

// ---------------------------------------------------------------------------------------------
// Instantiation
// ---------------------------------------------------------------------------------------------

/// The parameter values of an instantiation: given ones checked against their types, defaults
/// for the rest, `null` for optional ones without a default.
fn parameter_values(
    validator: &mut Validator,
    parameters: &[Parameter],
    given: Option<&prost_types::Struct>,
) -> Map<String, Value> {
    let given: BTreeMap<String, Value> = given
        .map(|values| {
            values
                .fields
                .iter()
                .map(|(name, value)| (name.clone(), normalize_numbers(wkt::value_to_json(value))))
                .collect()
        })
        .unwrap_or_default();
    for name in given.keys() {
        if !parameters.iter().any(|parameter| &parameter.name == name) {
            validator.error(&format!("parameters.{name}"), "is not a parameter of this template");
        }
    }
    let mut values = Map::new();
    for parameter in parameters {
        let field = format!("parameters.{}", parameter.name);
        let value = match given.get(&parameter.name).filter(|value| !value.is_null()) {
            Some(value) => {
                if !matches_type(parameter.kind, value) {
                    validator.error(&field, format!("must be {}", type_name(parameter.kind)));
                }
                value.clone()
            }
            None => match &parameter.default_value {
                Some(default_value) => default_value.clone(),
                None if parameter.required => {
                    validator.error(&field, "is required");
                    Value::Null
                }
                None => Value::Null,
            },
        };
        values.insert(parameter.name.clone(), value);
    }
    values
}

/// Field errors of a creation made from the rendered body, placed under `prefix`.
fn under_body(error: ServiceError, prefix: &str) -> ServiceError {
    if error.code != ErrorCode::ValidationError {
        return error;
    }
    let field_errors: Vec<FieldError> = error
        .field_errors
        .into_iter()
        .map(|field_error| {
            FieldError::new(join_field(prefix, &field_error.field), field_error.message)
        })
        .collect();
    if field_errors.is_empty() {
        return ServiceError::invalid_field(prefix, error.message);
    }
    ServiceError::validation(field_errors)
}

fn rendered_error(error: MappingError) -> ServiceError {
    ServiceError::invalid_field(body_field(&error.location), error.message)
}

/// Names what an instantiation creates: the caller's `requested` name, else the name the body
/// gives, else the template's name.
fn apply_name(mut object: Value, requested: &str, template_name: &str) -> Value {
    if let Value::Object(map) = &mut object {
        let body_name_is_empty =
            map.get("name").and_then(Value::as_str).is_none_or(|text| text.trim().is_empty());
        if !requested.is_empty() {
            map.insert("name".to_owned(), Value::from(requested));
        } else if body_name_is_empty {
            map.insert("name".to_owned(), Value::from(template_name));
        }
    }
    object
}

/// Creates one agent from its rendered JSON.
async fn create_agent_from(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    agent_json: Value,
    prefix: &str,
) -> ServiceResult<String> {
    let agent = json::decode::<pb::Agent>(AGENT_MESSAGE, agent_json).map_err(|errors| {
        let mut validator = Validator::new();
        report_decode_errors(&mut validator, prefix, errors);
        validator
            .finish()
            .err()
            .unwrap_or_else(|| ServiceError::invalid_field(prefix, "is invalid"))
    })?;
    let created = agents::create_agent(
        context,
        caller,
        client,
        pb::CreateAgentRequest { agent: Some(agent) },
    )
    .await
    .map_err(|error| under_body(error, prefix))?;
    Ok(created.agent.map(|agent| agent.id).unwrap_or_default())
}

/// Deletes what an instantiation created before a later creation failed.
async fn undo_agents(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    agent_ids: &[String],
) {
    for agent_id in agent_ids.iter().rev() {
        let request = pb::DeleteAgentRequest { agent_id: agent_id.clone(), version: 0 };
        if let Err(error) = agents::delete_agent(context, caller, client, request).await {
            tracing::error!(%agent_id, error = %error, "could not remove an agent of a failed instantiation");
        }
    }
}

/// Creates the template's agent, or its agents and workflow, for the caller with the parameters
/// filled in. Nothing is left half-made: when a later creation fails, the earlier ones are
/// deleted again.
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn instantiate_template(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    request: pb::InstantiateTemplateRequest,
) -> ServiceResult<pb::InstantiateTemplateResponse> {
    caller.require_user_access(Access::Write)?;
    let template_id = parse_id("templateId", &request.template_id)?;
    let mut validator = Validator::new();
    validator.max_chars("name", &request.name, MAX_NAME_CHARS);
    let template = load_template(context, caller, template_id).await?;
    let parameters = stored_parameters(&template);
    let values = parameter_values(&mut validator, &parameters, request.parameters.as_ref());
    validator.finish()?;
    let scope = json!({ "params": Value::Object(values) });
    let rendered =
        normalize_numbers(render_parameters(&template.body, &scope).map_err(rendered_error)?);
    let name = request.name.trim();

    let response = match template.kind {
        TemplateKind::Agent => {
            let agent_json = apply_name(rendered, name, &template.name);
            let agent_id = create_agent_from(context, caller, client, agent_json, "body").await?;
            pb::InstantiateTemplateResponse {
                agent_ids: vec![agent_id],
                workflow_id: String::new(),
            }
        }
        TemplateKind::Workflow => {
            instantiate_workflow(context, caller, client, rendered, name, &template.name).await?
        }
    };
    audit::record(
        context,
        Actor::Caller(caller),
        client,
        AuditEvent::success("template.instantiate", "template", Some(template_id.to_string()))
            .with_metadata(json!({
                "agentIds": response.agent_ids,
                "workflowId": response.workflow_id,
                "parameters": parameters.iter().map(|parameter| parameter.name.clone()).collect::<Vec<_>>(),
            })),
    )
    .await;
    Ok(response)
}

async fn instantiate_workflow(
    context: &AppContext,
    caller: &Caller,
    client: &ClientInfo,
    rendered: Value,
    name: &str,
    template_name: &str,
) -> ServiceResult<pb::InstantiateTemplateResponse> {
    let Value::Object(mut body) = rendered else {
        return Err(ServiceError::invalid_field(
            "body",
            "must be an object with agents and workflow",
        ));
    };
    let Some(Value::Object(agent_bodies)) = body.remove("agents") else {
        return Err(ServiceError::invalid_field("body.agents", "is required"));
    };
    let Some(mut workflow_json) = body.remove("workflow").filter(Value::is_object) else {
        return Err(ServiceError::invalid_field("body.workflow", "is required"));
    };
    let mut created_ids: Vec<String> = Vec::new();
    let mut id_by_reference = BTreeMap::new();
    for (reference, agent_json) in agent_bodies {
        let prefix = format!("body.agents.{reference}");
        match create_agent_from(context, caller, client, agent_json, &prefix).await {
            Ok(agent_id) => {
                id_by_reference.insert(reference, agent_id.clone());
                created_ids.push(agent_id);
            }
            Err(error) => {
                undo_agents(context, caller, client, &created_ids).await;
                return Err(error);
            }
        }
    }
    if let Some(Value::Array(steps)) = workflow_json.get_mut("steps") {
        for step in steps {
            if let Some(agent_id) = step.get_mut("agentId")
                && let Some(new_id) =
                    agent_id.as_str().and_then(|text| id_by_reference.get(text.trim()))
            {
                *agent_id = Value::from(new_id.clone());
            }
        }
    }
    let workflow_json = apply_name(workflow_json, name, template_name);
    let workflow = match json::decode::<pb::Workflow>(WORKFLOW_MESSAGE, workflow_json) {
        Ok(workflow) => workflow,
        Err(errors) => {
            undo_agents(context, caller, client, &created_ids).await;
            let mut validator = Validator::new();
            report_decode_errors(&mut validator, "body.workflow", errors);
            return Err(validator
                .finish()
                .err()
                .unwrap_or_else(|| ServiceError::invalid_field("body.workflow", "is invalid")));
        }
    };
    let created = workflows::create_workflow(
        context,
        caller,
        client,
        pb::CreateWorkflowRequest { workflow: Some(workflow) },
    )
    .await;
    match created {
        Ok(created) => Ok(pb::InstantiateTemplateResponse {
            agent_ids: created_ids,
            workflow_id: created.workflow.map(|workflow| workflow.id).unwrap_or_default(),
        }),
        Err(error) => {
            undo_agents(context, caller, client, &created_ids).await;
            Err(under_body(error, "body.workflow"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameter(name: &str, kind: pb::ParameterType, default_value: Option<Value>) -> Parameter {
        Parameter { name: name.to_owned(), kind, required: default_value.is_none(), default_value }
    }

    #[test]
    fn only_parameter_placeholders_are_rendered() {
        let scope = json!({ "params": { "name": "Ada", "size": 3, "flags": { "on": true } } });
        let rendered = render_parameters(
            &json!({
                "name": "{{params.name}}",
                "size": "{{ params.size }}",
                "flags": "{{params.flags}}",
                "url": "https://x/{{input.id}}?who={{params.name}}&n={{params.size}}",
                "later": "{{steps.a.output}}",
                "list": ["{{params.name}} and {{input.x}}"],
            }),
            &scope,
        )
        .expect("renders");
        assert_eq!(
            rendered,
            json!({
                "name": "Ada",
                "size": 3,
                "flags": { "on": true },
                "url": "https://x/{{input.id}}?who=Ada&n=3",
                "later": "{{steps.a.output}}",
                "list": ["Ada and {{input.x}}"],
            })
        );
        let error = render_parameters(&json!({ "a": ["{{params.missing}}"] }), &scope)
            .expect_err("missing");
        assert_eq!(error.location, "a[0]");
    }

    #[test]
    fn parameters_are_checked_one_by_one() {
        let declared = vec![
            pb::TemplateParameter {
                name: "ok".to_owned(),
                r#type: pb::ParameterType::Number.into(),
                default_value: Some(wkt::json_to_value(&json!(2))),
                ..Default::default()
            },
            pb::TemplateParameter {
                name: "ok".to_owned(),
                r#type: pb::ParameterType::String.into(),
                ..Default::default()
            },
            pb::TemplateParameter { name: "1bad".to_owned(), ..Default::default() },
            pb::TemplateParameter {
                name: "flag".to_owned(),
                r#type: pb::ParameterType::Boolean.into(),
                default_value: Some(wkt::json_to_value(&json!("yes"))),
                ..Default::default()
            },
        ];
        let mut validator = Validator::new();
        let parameters = check_parameters(&mut validator, &declared);
        assert_eq!(parameters.len(), 1);
        assert_eq!(parameters[0].default_value, Some(json!(2)), "whole numbers become integers");
        let error = validator.finish().expect_err("three bad");
        let fields: Vec<&str> =
            error.field_errors.iter().map(|error| error.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "parameters[1].name",
                "parameters[2].name",
                "parameters[2].type",
                "parameters[3].defaultValue"
            ]
        );
    }

    #[test]
    fn instantiation_values_follow_types_defaults_and_requirements() {
        let parameters = vec![
            parameter("name", pb::ParameterType::String, Some(json!("Default"))),
            parameter("count", pb::ParameterType::Number, None),
            parameter("extra", pb::ParameterType::Json, None),
        ];
        let given = wkt::json_object_to_struct(&json!({ "count": 4 }));
        let mut validator = Validator::new();
        let values = parameter_values(&mut validator, &parameters, Some(&given));
        assert!(validator.finish().is_err(), "extra is required");
        assert_eq!(values["name"], json!("Default"));
        assert_eq!(values["count"], json!(4));

        let given = wkt::json_object_to_struct(&json!({ "count": "four", "unknown": 1 }));
        let mut validator = Validator::new();
        parameter_values(&mut validator, &parameters[..2], Some(&given));
        let error = validator.finish().expect_err("bad");
        let fields: Vec<&str> =
            error.field_errors.iter().map(|error| error.field.as_str()).collect();
        assert_eq!(fields, vec!["parameters.unknown", "parameters.count"]);
    }

    #[test]
    fn bodies_are_checked_against_their_kind() {
        let parameters = vec![parameter("name", pb::ParameterType::String, Some(json!("x")))];
        let good_agent = wkt::json_object_to_struct(&json!({
            "name": "{{params.name}}", "type": "DATA",
            "config": { "data": { "jqProgram": "." } },
        }));
        let mut validator = Validator::new();
        check_body(&mut validator, Some(TemplateKind::Agent), Some(&good_agent), &parameters, 32);
        assert!(validator.finish().is_ok());

        let bad_agent = wkt::json_object_to_struct(&json!({
            "name": "{{params.nope}}", "type": "DATA", "colour": "red",
        }));
        let mut validator = Validator::new();
        check_body(&mut validator, Some(TemplateKind::Agent), Some(&bad_agent), &parameters, 32);
        let error = validator.finish().expect_err("undeclared parameter");
        assert_eq!(error.field_errors[0].field, "body.name");

        let unknown_field = wkt::json_object_to_struct(&json!({ "name": "x", "colour": "red" }));
        let mut validator = Validator::new();
        check_body(
            &mut validator,
            Some(TemplateKind::Agent),
            Some(&unknown_field),
            &parameters,
            32,
        );
        let error = validator.finish().expect_err("unknown field");
        assert_eq!(error.field_errors[0].field, "body.colour");

        let workflow = wkt::json_object_to_struct(&json!({
            "agents": { "a": { "name": "A", "type": "DATA" } },
            "workflow": { "name": "W", "steps": [
                { "key": "one", "name": "One", "agentId": "a" },
                { "key": "two", "name": "Two", "agentId": "b" },
            ] },
        }));
        let mut validator = Validator::new();
        check_body(&mut validator, Some(TemplateKind::Workflow), Some(&workflow), &parameters, 32);
        let error = validator.finish().expect_err("unknown ref");
        assert_eq!(error.field_errors[0].field, "body.workflow.steps[1].agentId");
    }
}
