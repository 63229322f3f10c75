//! The OpenAPI 3.1 document of the REST edge (`GET /api/v1/openapi.json`) and the interactive
//! documentation page (`GET /docs`, Swagger UI vendored under `assets/swagger-ui`, no CDN).
//! The document is generated from the same binding table the REST edge routes by
//! (`rest::bindings::http_bindings`) and from the message descriptors and their proto comments,
//! so it describes exactly what the transcoder accepts and answers and cannot drift from it.
//! May call: the descriptor pool and the REST binding table. Nothing else.

use std::collections::{BTreeMap, HashMap};

use axum::Router;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, header};
use prost_reflect::{
    DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
};
use serde_json::{Map, Value, json};

use super::rest::bindings::{BodyMapping, HttpBinding, http_bindings};
use crate::error::ErrorCode;
use crate::proto::json::short_enum_name;

/// Where the document is served.
pub const DOCUMENT_PATH: &str = "/api/v1/openapi.json";
/// Where the interactive documentation page is served.
pub const DOCS_PATH: &str = "/docs";
/// Services whose operations need no credentials (they authenticate by what the body carries).
pub const PUBLIC_SERVICES: [&str; 1] = ["turbocat.v1.AuthService"];
/// The name of the security scheme for `Authorization: Bearer <access token or API key>`.
pub const BEARER_SCHEME: &str = "bearerAuth";
/// The name of the security scheme for `x-api-key: <API key>`.
pub const API_KEY_SCHEME: &str = "apiKeyAuth";
/// The Content-Security-Policy of the docs page and its assets: everything from this origin,
/// nothing from anywhere else (Swagger UI sets inline styles and uses `data:` images).
pub const DOCS_CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const EXAMPLE_ID: &str = "0190b2a4-7c1e-7d3a-9f5e-3c2b1a0d9e8f";
const EXAMPLE_TIME: &str = "2026-01-02T03:04:05.678Z";
const EXAMPLE_REQUEST_ID: &str = "5b0a8f0e-2c47-4d9e-8a51-0c1f7e6d2b3a";
/// How deep examples follow nested messages (the contract has cycles, e.g. an agent version
/// holds an agent snapshot).
const EXAMPLE_DEPTH: usize = 4;

/// Serves the document; built once, when the router is built.
pub fn router(pool: &DescriptorPool) -> Result<Router, String> {
    let document = document(pool)?;
    let body = Bytes::from(
        serde_json::to_vec(&document).map_err(|error| format!("openapi document: {error}"))?,
    );
    let handler = move || {
        let body = body.clone();
        async move {
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body)
                .into_response()
        }
    };
    Ok(Router::new().route(DOCUMENT_PATH, axum::routing::get(handler)))
}

/// One vendored file of the docs page.
struct DocsAsset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>Turbocat API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <noscript>The interactive documentation needs JavaScript; the document itself is at
    <a href="/api/v1/openapi.json">/api/v1/openapi.json</a>.</noscript>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/docs.js"></script>
</body>
</html>
"#;

/// Starts Swagger UI on the document of this server; no inline script, so the CSP can forbid it.
const DOCS_SCRIPT: &str = r##"window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/api/v1/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
  });
});
"##;

const DOCS_ASSETS: [DocsAsset; 6] = [
    DocsAsset {
        path: "/docs/assets/swagger-ui-bundle.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js"),
    },
    DocsAsset {
        path: "/docs/assets/swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui.css"),
    },
    DocsAsset {
        path: "/docs/assets/docs.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: DOCS_SCRIPT.as_bytes(),
    },
    DocsAsset {
        path: "/docs/assets/favicon-32x32.png",
        content_type: "image/png",
        bytes: include_bytes!("../../assets/swagger-ui/favicon-32x32.png"),
    },
    DocsAsset {
        path: "/docs/assets/LICENSE",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/LICENSE"),
    },
    DocsAsset {
        path: "/docs/assets/swagger-ui-bundle.js.LICENSE.txt",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js.LICENSE.txt"),
    },
];

/// The docs page and its assets, with their own security headers (a CSP that lets the page run
/// its same-origin scripts). Merge it outside the shared security-header layer, which would
/// replace this CSP with its own.
pub fn docs_router() -> Router {
    let mut router = Router::new().route(
        DOCS_PATH,
        axum::routing::get(|| async {
            docs_response("text/html; charset=utf-8", DOCS_PAGE.as_bytes())
        }),
    );
    for asset in DOCS_ASSETS {
        router = router.route(
            asset.path,
            axum::routing::get(
                move || async move { docs_response(asset.content_type, asset.bytes) },
            ),
        );
    }
    router
}

fn docs_response(content_type: &'static str, bytes: &'static [u8]) -> Response {
    let headers: [(HeaderName, HeaderValue); 6] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(DOCS_CONTENT_SECURITY_POLICY)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, Bytes::from_static(bytes)).into_response()
}

/// The OpenAPI 3.1 document of every REST route of the contract.
pub fn document(pool: &DescriptorPool) -> Result<Value, String> {
    let bindings = http_bindings(pool)?;
    let comments = Comments::of(pool);
    let mut schemas = SchemaBuilder { comments: &comments, components: BTreeMap::new() };
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut operation_ids: HashMap<String, String> = HashMap::new();
    let mut tags: BTreeMap<String, String> = BTreeMap::new();

    for binding in &bindings {
        let method = method_of(pool, binding)?;
        let service = method.parent_service();
        tags.entry(service.name().to_owned())
            .or_insert_with(|| comments.of_path(service.parent_file().name(), service.path()));
        if let Some(previous) =
            operation_ids.insert(method.name().to_owned(), binding.grpc_path.clone())
        {
            return Err(format!(
                "operation id {} is taken by {previous} and {}",
                method.name(),
                binding.grpc_path
            ));
        }
        let path = openapi_path(&binding.template);
        let operation = operation(&mut schemas, &comments, binding, &method);
        let item = paths.entry(path.clone()).or_default();
        let verb = binding.http_method.as_str().to_ascii_lowercase();
        if item.insert(verb, operation).is_some() {
            return Err(format!("two operations share {} {path}", binding.http_method));
        }
    }

    add_links(&mut paths, &bindings, pool);
    add_webhook(&mut paths)?;
    let mut components_schemas: Map<String, Value> = schemas.components.into_iter().collect();
    for (name, schema) in envelope_schemas() {
        if components_schemas.insert(name.clone(), schema).is_some() {
            return Err(format!("the schema name {name} is taken by a message of the contract"));
        }
    }
    let tag_list: Vec<Value> = tags
        .into_iter()
        .map(|(name, description)| {
            if description.is_empty() {
                json!({ "name": name })
            } else {
                json!({ "name": name, "description": description })
            }
        })
        .collect();
    Ok(json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Turbocat API",
            "version": env!("CARGO_PKG_VERSION"),
            "summary": "Agents, workflows, templates, deployments and their executions.",
            "description": INFO_DESCRIPTION,
        },
        "servers": [{ "url": "/", "description": "This server" }],
        "tags": tag_list,
        "security": [{ BEARER_SCHEME: [] }, { API_KEY_SCHEME: [] }],
        "paths": paths,
        "components": {
            "schemas": components_schemas,
            "responses": error_responses(),
            "securitySchemes": {
                BEARER_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from register, login or refresh; an API key \
                                    (`tc_…`) is accepted here too.",
                },
                API_KEY_SCHEME: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-api-key",
                    "description": "An API key made with `POST /api/v1/api-keys`.",
                },
            },
        },
    }))
}

const INFO_DESCRIPTION: &str = "REST face of the Turbocat contract (`proto/turbocat/v1`). Every \
route is transcoded to the gRPC method named in `x-grpc-method`, so REST and gRPC behave alike.\n\n\
* Success: `{\"success\": true, \"data\": …, \"meta\": {\"timestamp\", \"requestId\", \
\"pagination\"?}}`; lists carry their page in `meta.pagination`.\n\
* Failure: `{\"success\": false, \"error\": {\"code\", \"message\", \"details\": [{\"field\", \
\"message\"}…]}, \"meta\"}`; `details` names every rejected field by its JSON path.\n\
* JSON follows the proto3 mapping: lowerCamelCase names, 64-bit integers as strings, enum values \
by their short name (`CODE`, not `AGENT_TYPE_CODE`; any case is accepted on input), timestamps \
in RFC 3339, durations as `\"1.5s\"`.\n\
* Resources carry a `version`: reads answer with an `ETag`, and `If-Match` on a change or a \
delete refuses a stale version with 409 CONFLICT.\n\
* A PATCH changes exactly the fields its body names.";

fn method_of(pool: &DescriptorPool, binding: &HttpBinding) -> Result<MethodDescriptor, String> {
    let mut parts = binding.grpc_path.trim_start_matches('/').split('/');
    let service_name = parts.next().unwrap_or_default();
    let method_name = parts.next().unwrap_or_default();
    pool.get_service_by_name(service_name)
        .and_then(|service| service.methods().find(|method| method.name() == method_name))
        .ok_or_else(|| format!("no method for {}", binding.grpc_path))
}

/// The name a path variable goes by in the document: its field path joined by `_`
/// (`{agent.id}` is `{agent_id}`, like `{agent_id}` on the sibling routes).
pub fn parameter_name(field_path: &[String]) -> String {
    field_path.join("_")
}

/// The proto template in OpenAPI form: `/api/v1/agents/{agent.id}` -> `/api/v1/agents/{agent_id}`.
pub fn openapi_path(template: &str) -> String {
    let mut path = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        path.push_str(&rest[..start]);
        let Some(length) = rest[start..].find('}') else { break };
        let expression = &rest[start + 1..start + length];
        let field = expression.split('=').next().unwrap_or(expression);
        let segments: Vec<String> = field.split('.').map(str::to_owned).collect();
        path.push('{');
        path.push_str(&parameter_name(&segments));
        path.push('}');
        rest = &rest[start + length + 1..];
    }
    path.push_str(rest);
    path
}

/// Leading comments of the contract, by file and location path.
struct Comments {
    by_location: HashMap<(String, Vec<i32>), String>,
}

impl Comments {
    fn of(pool: &DescriptorPool) -> Self {
        let mut by_location = HashMap::new();
        for file in pool.files() {
            let proto = file.file_descriptor_proto();
            let Some(info) = &proto.source_code_info else { continue };
            for location in &info.location {
                let Some(text) = &location.leading_comments else { continue };
                let cleaned = clean_comment(text);
                if !cleaned.is_empty() {
                    by_location.insert((file.name().to_owned(), location.path.clone()), cleaned);
                }
            }
        }
        Self { by_location }
    }

    fn of_path(&self, file: &str, path: &[i32]) -> String {
        self.by_location.get(&(file.to_owned(), path.to_vec())).cloned().unwrap_or_default()
    }

    fn of_message(&self, message: &MessageDescriptor) -> String {
        self.of_path(message.parent_file().name(), message.path())
    }

    fn of_field(&self, field: &FieldDescriptor) -> String {
        self.of_path(field.parent_file().name(), field.path())
    }

    fn of_enum(&self, enumeration: &EnumDescriptor) -> String {
        self.of_path(enumeration.parent_file().name(), enumeration.path())
    }

    fn of_method(&self, method: &MethodDescriptor) -> String {
        self.of_path(method.parent_service().parent_file().name(), method.path())
    }
}

/// Joins comment lines into paragraphs: a blank line separates paragraphs.
fn clean_comment(text: &str) -> String {
    let mut paragraphs: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                paragraphs.push(std::mem::take(&mut current));
            }
            continue;
        }
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        paragraphs.push(current);
    }
    paragraphs.join("\n\n")
}

/// Which side of the edge a schema describes: what a client may send, or what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Everything optional, unknown fields refused, enum values without the zero value.
    Request,
    /// Every field present (with its default when unset), except unset oneof members and
    /// `optional` fields; absent messages are `null`.
    Response,
}

struct SchemaBuilder<'comments> {
    comments: &'comments Comments,
    components: BTreeMap<String, Value>,
}

fn component_name(message: &MessageDescriptor, direction: Direction) -> String {
    let package = message.package_name();
    let local = message
        .full_name()
        .strip_prefix(package)
        .map(|rest| rest.trim_start_matches('.'))
        .unwrap_or(message.full_name())
        .to_owned();
    match direction {
        Direction::Response => local,
        Direction::Request => format!("{local}Input"),
    }
}

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn nullable(schema: Value) -> Value {
    json!({ "anyOf": [schema, { "type": "null" }] })
}

fn with_description(mut schema: Value, description: &str) -> Value {
    if description.is_empty() {
        return schema;
    }
    if schema.get("$ref").is_some() || schema.get("anyOf").is_some() {
        // Siblings of `$ref` are allowed in 3.1, but keep the reference itself untouched.
        return json!({ "description": description, "allOf": [schema] });
    }
    if let Value::Object(object) = &mut schema {
        object.insert("description".into(), Value::String(description.to_owned()));
    }
    schema
}

fn int64_schema(direction: Direction, unsigned: bool) -> Value {
    let pattern = if unsigned { "^[0-9]+$" } else { "^-?[0-9]+$" };
    match direction {
        Direction::Response => json!({ "type": "string", "format": "int64", "pattern": pattern }),
        Direction::Request => json!({
            "type": ["string", "integer"],
            "format": "int64",
            "pattern": pattern,
            "minimum": if unsigned { 0 } else { i64::MIN },
            "maximum": i64::MAX,
        }),
    }
}

/// The JSON shape of a well-known type, or `None` for a message of the contract.
fn well_known_schema(message: &MessageDescriptor, direction: Direction) -> Option<Value> {
    let schema = match message.full_name() {
        "google.protobuf.Timestamp" => json!({
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 timestamp.",
            "examples": [EXAMPLE_TIME],
        }),
        "google.protobuf.Duration" => json!({
            "type": "string",
            "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
            "description": "Seconds with an `s` suffix, e.g. `30s` or `1.5s`.",
            "examples": ["30s"],
        }),
        "google.protobuf.FieldMask" => json!({
            "type": "string",
            "description": "Comma-separated lowerCamelCase field names.",
            "examples": ["name,description"],
        }),
        "google.protobuf.Struct" => json!({ "type": "object", "description": "Any JSON object." }),
        "google.protobuf.Value" => json!({ "description": "Any JSON value." }),
        "google.protobuf.ListValue" => json!({ "type": "array", "description": "Any JSON array." }),
        "google.protobuf.Empty" => json!({ "type": "object", "additionalProperties": false }),
        "google.protobuf.Any" => json!({
            "type": "object",
            "required": ["@type"],
            "properties": { "@type": { "type": "string" } },
        }),
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({ "type": "number" }),
        "google.protobuf.Int64Value" => int64_schema(direction, false),
        "google.protobuf.UInt64Value" => int64_schema(direction, true),
        "google.protobuf.Int32Value" => json!({ "type": "integer", "format": "int32" }),
        "google.protobuf.UInt32Value" => json!({ "type": "integer", "minimum": 0 }),
        "google.protobuf.BoolValue" => json!({ "type": "boolean" }),
        "google.protobuf.StringValue" => json!({ "type": "string" }),
        "google.protobuf.BytesValue" => json!({ "type": "string", "contentEncoding": "base64" }),
        _ => return None,
    };
    Some(schema)
}

fn enum_schema(enumeration: &EnumDescriptor, direction: Direction, description: &str) -> Value {
    let names: Vec<String> = enumeration
        .values()
        .filter(|value| direction == Direction::Response || value.number() != 0)
        .map(|value| short_enum_name(enumeration, value.name()))
        .collect();
    let mut text = description.to_owned();
    if direction == Direction::Request {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str("Any case is accepted, with or without the type prefix.");
    }
    with_description(json!({ "type": "string", "enum": names }), &text)
}

impl SchemaBuilder<'_> {
    /// A reference to the message's component (registered on first use), or the inline shape
    /// of a well-known type.
    fn message_schema(&mut self, message: &MessageDescriptor, direction: Direction) -> Value {
        if let Some(schema) = well_known_schema(message, direction) {
            return schema;
        }
        let name = component_name(message, direction);
        if !self.components.contains_key(&name) {
            // A placeholder first: messages may refer to themselves.
            self.components.insert(name.clone(), Value::Null);
            let schema = self.object_schema(message, direction, &[]);
            self.components.insert(name.clone(), schema);
        }
        reference(&name)
    }

    /// The object shape of a message, less the fields named in `omitted` (proto names).
    fn object_schema(
        &mut self,
        message: &MessageDescriptor,
        direction: Direction,
        omitted: &[&str],
    ) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in message.fields() {
            if omitted.contains(&field.name()) {
                continue;
            }
            let schema = self.field_schema(&field, direction);
            let mut description = self.comments.of_field(&field);
            if let Some(oneof) = field.containing_oneof().filter(|oneof| !oneof.is_synthetic()) {
                let members: Vec<String> =
                    oneof.fields().map(|member| format!("`{}`", member.json_name())).collect();
                if !description.is_empty() {
                    description.push(' ');
                }
                description.push_str(&format!("At most one of {}.", members.join(", ")));
            }
            properties.insert(field.json_name().to_owned(), with_description(schema, &description));
            if direction == Direction::Response && field.containing_oneof().is_none() {
                required.push(Value::String(field.json_name().to_owned()));
            }
        }
        let mut schema = Map::new();
        schema.insert("type".into(), json!("object"));
        let description = self.comments.of_message(message);
        if !description.is_empty() {
            schema.insert("description".into(), Value::String(description));
        }
        schema.insert("properties".into(), Value::Object(properties));
        if !required.is_empty() {
            schema.insert("required".into(), Value::Array(required));
        }
        schema.insert("additionalProperties".into(), Value::Bool(false));
        let oneofs: Vec<Vec<String>> = message
            .oneofs()
            .filter(|oneof| !oneof.is_synthetic())
            .map(|oneof| oneof.fields().map(|field| field.json_name().to_owned()).collect())
            .filter(|members: &Vec<String>| {
                members.len() > 1
                    && !members.iter().any(|member| {
                        message
                            .get_field_by_json_name(member)
                            .is_some_and(|field| omitted.contains(&field.name()))
                    })
            })
            .collect();
        if direction == Direction::Response && !oneofs.is_empty() {
            // At most one member of each oneof is present: never two of them together.
            let rules: Vec<Value> = oneofs
                .iter()
                .flat_map(|members| {
                    let mut pairs = Vec::new();
                    for (index, first) in members.iter().enumerate() {
                        for second in &members[index + 1..] {
                            pairs.push(json!({ "required": [first, second] }));
                        }
                    }
                    pairs
                })
                .collect();
            schema.insert("not".into(), json!({ "anyOf": rules }));
        }
        Value::Object(schema)
    }

    fn field_schema(&mut self, field: &FieldDescriptor, direction: Direction) -> Value {
        if field.is_map() {
            let Kind::Message(entry) = field.kind() else { return json!({ "type": "object" }) };
            let value_schema = self.single_schema(&entry.map_entry_value_field(), direction);
            return json!({ "type": "object", "additionalProperties": value_schema });
        }
        let single = self.single_schema(field, direction);
        if field.is_list() {
            return json!({ "type": "array", "items": single });
        }
        match field.kind() {
            Kind::Message(message)
                if field.containing_oneof().is_none()
                    && message.full_name() != "google.protobuf.Value" =>
            {
                nullable(single)
            }
            _ => single,
        }
    }

    fn single_schema(&mut self, field: &FieldDescriptor, direction: Direction) -> Value {
        match field.kind() {
            Kind::Message(message) => self.message_schema(&message, direction),
            Kind::Enum(enumeration) => {
                if enumeration.full_name() == "google.protobuf.NullValue" {
                    return json!({ "type": "null" });
                }
                let description = self.comments.of_enum(&enumeration);
                enum_schema(&enumeration, direction, &description)
            }
            Kind::String => json!({ "type": "string" }),
            Kind::Bytes => json!({ "type": "string", "contentEncoding": "base64" }),
            Kind::Bool => json!({ "type": "boolean" }),
            Kind::Double | Kind::Float => json!({ "type": "number" }),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({
                "type": "integer",
                "format": "int32",
                "minimum": i32::MIN,
                "maximum": i32::MAX,
            }),
            Kind::Uint32 | Kind::Fixed32 => {
                json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX })
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => int64_schema(direction, false),
            Kind::Uint64 | Kind::Fixed64 => int64_schema(direction, true),
        }
    }
}

/// Whether a field can be given as a query parameter (as `rest::build_request_json` reads it).
fn is_query_field(field: &FieldDescriptor) -> bool {
    if field.is_map() {
        return false;
    }
    match field.kind() {
        Kind::Message(message) => matches!(
            message.full_name(),
            "google.protobuf.Timestamp" | "google.protobuf.Duration" | "google.protobuf.FieldMask"
        ),
        _ => true,
    }
}

/// The field of `message` whose number is a 32-bit `version`: the REST edge turns it into an
/// `ETag` (answers) and fills it from `If-Match` (requests).
fn has_version(message: &MessageDescriptor) -> bool {
    message.get_field_by_name("version").is_some_and(|field| {
        !field.is_list() && matches!(field.kind(), Kind::Int32 | Kind::Uint32 | Kind::Sint32)
    })
}

/// The message that becomes `data`, when `data` is one message (not a list, not a scalar).
fn data_message(binding: &HttpBinding) -> Option<MessageDescriptor> {
    match &binding.response_body {
        None => Some(binding.output.clone()),
        Some(field_name) => {
            let field = binding.output.get_field_by_name(field_name)?;
            match field.kind() {
                Kind::Message(message) if !field.is_list() && !field.is_map() => Some(message),
                _ => None,
            }
        }
    }
}

fn pagination_field(message: &MessageDescriptor) -> Option<FieldDescriptor> {
    message.fields().find(|field| field.json_name() == "pagination" && !field.is_list())
}

fn operation(
    schemas: &mut SchemaBuilder<'_>,
    comments: &Comments,
    binding: &HttpBinding,
    method: &MethodDescriptor,
) -> Value {
    let service = method.parent_service();
    let description = comments.of_method(method);
    let summary = description
        .split(". ")
        .next()
        .map(|sentence| sentence.trim_end_matches('.').to_owned())
        .filter(|sentence| !sentence.is_empty() && sentence.len() <= 120)
        .unwrap_or_else(|| humanize(method.name()));
    let is_public = PUBLIC_SERVICES.contains(&service.full_name());

    let mut operation = Map::new();
    operation.insert("operationId".into(), json!(method.name()));
    operation.insert("summary".into(), json!(summary));
    let mut text = description.clone();
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(&format!("gRPC: `{}`.", binding.grpc_path.trim_start_matches('/')));
    operation.insert("description".into(), json!(text));
    operation.insert("tags".into(), json!([service.name()]));
    operation.insert("x-grpc-method".into(), json!(binding.grpc_path));
    if is_public {
        operation.insert("security".into(), json!([]));
    }

    let parameters = parameters(schemas, binding);
    if !parameters.is_empty() {
        operation.insert("parameters".into(), Value::Array(parameters));
    }
    if let Some(body) = request_body(schemas, binding) {
        operation.insert("requestBody".into(), body);
    }
    operation.insert("responses".into(), responses(schemas, binding, is_public));
    Value::Object(operation)
}

/// `ApiKey` -> `api_key`: the name the contract gives a path variable holding its id.
fn snake_case(name: &str) -> String {
    let mut snake = String::new();
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            snake.push('_');
        }
        snake.push(character.to_ascii_lowercase());
    }
    snake
}

/// OpenAPI links from every POST that answers a resource with an `id` (a create, a duplicate,
/// an execute) to every operation whose one path variable is that resource's id
/// (`{agent_id}`), so stateful clients and fuzzers can follow a resource through its life.
fn add_links(
    paths: &mut BTreeMap<String, Map<String, Value>>,
    bindings: &[HttpBinding],
    pool: &DescriptorPool,
) {
    for source in bindings.iter().filter(|binding| binding.http_method == http::Method::POST) {
        let Some(resource) = data_message(source) else { continue };
        if resource.get_field_by_name("id").is_none() {
            continue;
        }
        let parameter = format!("{}_id", snake_case(resource.name()));
        let mut links = Map::new();
        for target in bindings {
            let names: Vec<String> = target
                .path_variables
                .iter()
                .map(|variable| parameter_name(&variable.field_path))
                .collect();
            if names != [parameter.clone()] || target.grpc_path == source.grpc_path {
                continue;
            }
            let Ok(method) = method_of(pool, target) else { continue };
            links.insert(
                method.name().to_owned(),
                json!({
                    "operationId": method.name(),
                    "parameters": { parameter.as_str(): "$response.body#/data/id" },
                    "description": format!("`data.id` of the answer is `{parameter}`."),
                }),
            );
        }
        if links.is_empty() {
            continue;
        }
        let status = source.success_status.as_u16().to_string();
        let verb = source.http_method.as_str().to_ascii_lowercase();
        if let Some(response) = paths
            .get_mut(&openapi_path(&source.template))
            .and_then(|item| item.get_mut(&verb))
            .and_then(|operation| operation.get_mut("responses"))
            .and_then(|responses| responses.get_mut(&status))
        {
            response["links"] = Value::Object(links);
        }
    }
}

/// The one route that is not transcoded from the contract: a deployment's signed webhook
/// (`api::webhooks`), whose signature covers the exact body bytes.
fn add_webhook(paths: &mut BTreeMap<String, Map<String, Value>>) -> Result<(), String> {
    let accepted = json!({
        "type": "object",
        "required": ["executionId"],
        "properties": { "executionId": { "type": "string", "format": "uuid" } },
        "additionalProperties": false,
    });
    let mut responses = Map::new();
    responses.insert(
        "202".into(),
        json!({
            "description": "Accepted: the id of the execution the call started, and nothing \
                            else (its input holds the deployment's environment values).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["success", "data", "meta"],
                        "properties": {
                            "success": { "const": true },
                            "data": accepted,
                            "meta": reference("Meta"),
                        },
                        "additionalProperties": false,
                    }
                }
            },
        }),
    );
    for (status, name) in [
        ("400", "BadRequest"),
        ("401", "Unauthorized"),
        ("404", "NotFound"),
        ("409", "Conflict"),
        ("413", "PayloadTooLarge"),
        ("500", "InternalError"),
        ("503", "ServiceUnavailable"),
    ] {
        responses
            .insert(status.to_owned(), json!({ "$ref": format!("#/components/responses/{name}") }));
    }
    responses.insert("default".into(), json!({ "$ref": "#/components/responses/OtherError" }));
    let operation = json!({
        "operationId": "ReceiveWebhook",
        "tags": ["DeploymentService"],
        "summary": "Start an execution of a webhook deployment",
        "description": "Starts one execution of a RUNNING deployment with a WEBHOOK trigger. The \
                        JSON object body becomes the input (over the workflow's default input \
                        and the deployment's `inputDefaults`); an empty body is `{}`. No token: \
                        the call is authenticated by `X-Turbocat-Signature`, the hex \
                        HMAC-SHA256 (optionally prefixed `sha256=`), keyed with the deployment's \
                        webhook secret, of `<X-Turbocat-Timestamp>.<X-Turbocat-Delivery>.<body>` \
                        (the exact body bytes). A missing or wrong signature, or a timestamp \
                        more than the tolerance (5 minutes by default) from the server's clock, \
                        is 401; a delivery id received before is 409 (a replay); an unknown, \
                        stopped or non-webhook deployment is 404.",
        "security": [],
        "parameters": [
            {
                "name": "deploymentId",
                "in": "path",
                "required": true,
                "schema": { "type": "string", "format": "uuid" },
            },
            {
                "name": "X-Turbocat-Signature",
                "in": "header",
                "required": true,
                "schema": { "type": "string" },
                "example": "sha256=5d5b09f6dcb2d53a5fffc60c4ac0d55fabdf556069d6631545f42aa6e3500f2e",
            },
            {
                "name": "X-Turbocat-Timestamp",
                "in": "header",
                "required": true,
                "description": "When the call was sent, in Unix seconds (signed).",
                "schema": { "type": "string", "pattern": "^[0-9]+$" },
                "example": "1767225600",
            },
            {
                "name": "X-Turbocat-Delivery",
                "in": "header",
                "required": true,
                "description": "The sender's unique id of this call (signed); a repeat is 409.",
                "schema": { "type": "string", "pattern": "^[A-Za-z0-9._:-]{1,200}$" },
                "example": "evt_01J9Z3Q2W8",
            },
        ],
        "requestBody": {
            "required": false,
            "content": { "application/json": { "schema": { "type": "object" } } },
        },
        "responses": responses,
    });
    let item = paths.entry("/api/v1/webhooks/{deploymentId}".to_owned()).or_default();
    if item.insert("post".into(), operation).is_some() {
        return Err("two operations share POST /api/v1/webhooks/{deploymentId}".into());
    }
    Ok(())
}

fn humanize(name: &str) -> String {
    let mut words = String::new();
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            words.push(' ');
            words.push(character.to_ascii_lowercase());
        } else {
            words.push(character);
        }
    }
    words
}

fn path_top_fields(binding: &HttpBinding) -> Vec<&str> {
    binding
        .path_variables
        .iter()
        .filter(|variable| variable.field_path.len() == 1)
        .map(|variable| variable.field_path[0].as_str())
        .collect()
}

fn parameters(schemas: &mut SchemaBuilder<'_>, binding: &HttpBinding) -> Vec<Value> {
    let mut parameters = Vec::new();
    for variable in &binding.path_variables {
        let mut schema = json!({ "type": "string" });
        let mut description = format!("Fills `{}` of the request.", variable.field_path.join("."));
        if let Some(field) = field_at(&binding.input, &variable.field_path) {
            schema = schemas.single_schema(&field, Direction::Request);
            let comment = schemas.comments.of_field(&field);
            if !comment.is_empty() {
                description = format!("{comment} {description}");
            }
        }
        let example = if variable.field_path.last().is_some_and(|name| name.ends_with("id")) {
            json!(EXAMPLE_ID)
        } else {
            Value::Null
        };
        let mut parameter = json!({
            "name": parameter_name(&variable.field_path),
            "in": "path",
            "required": true,
            "description": description,
            "schema": schema,
        });
        if !example.is_null() {
            parameter["example"] = example;
        }
        parameters.push(parameter);
    }

    // A whole-message body leaves nothing for the query string to carry.
    let skipped: Vec<&str> = match &binding.body {
        BodyMapping::Whole => return finish_parameters(parameters, binding),
        BodyMapping::Field(name) => vec![name.as_str()],
        BodyMapping::None => Vec::new(),
    };
    let path_fields = path_top_fields(binding);
    for field in binding.input.fields() {
        let name = field.name();
        if skipped.contains(&name) || path_fields.contains(&name) || !is_query_field(&field) {
            continue;
        }
        if matches!(&binding.body, BodyMapping::Field(_)) && name == "update_mask" {
            // Filled from the body's keys; a query value would only override that.
            continue;
        }
        let single = schemas.single_schema(&field, Direction::Request);
        let schema =
            if field.is_list() { json!({ "type": "array", "items": single }) } else { single };
        let mut parameter = json!({
            "name": field.json_name(),
            "in": "query",
            "required": false,
            "schema": schema,
        });
        let comment = schemas.comments.of_field(&field);
        if !comment.is_empty() {
            parameter["description"] = json!(comment);
        }
        if field.is_list() {
            parameter["style"] = json!("form");
            parameter["explode"] = json!(true);
        }
        parameters.push(parameter);
    }

    finish_parameters(parameters, binding)
}

/// Adds the parameters that do not come from request fields: the event stream's token and
/// `If-Match`.
fn finish_parameters(mut parameters: Vec<Value>, binding: &HttpBinding) -> Vec<Value> {
    if binding.server_streaming {
        parameters.push(json!({
            "name": "access_token",
            "in": "query",
            "required": false,
            "description": "An access token, for clients that cannot send headers (a browser's \
                            EventSource). Only event streams read it.",
            "schema": { "type": "string" },
        }));
    }
    if takes_if_match(binding) {
        parameters.push(json!({
            "name": "If-Match",
            "in": "header",
            "required": false,
            "description": "The `ETag` of the version read (`\"3\"`): a change to a newer \
                            version is refused with 409 CONFLICT.",
            "schema": { "type": "string", "pattern": "^(W/)?\"?[0-9]+\"?$" },
            "example": "\"3\"",
        }));
    }
    parameters
}

fn field_at(message: &MessageDescriptor, path: &[String]) -> Option<FieldDescriptor> {
    let (last, parents) = path.split_last()?;
    let mut current = message.clone();
    for name in parents {
        let Kind::Message(next) = current.get_field_by_name(name)?.kind() else { return None };
        current = next;
    }
    current.get_field_by_name(last)
}

/// Whether `If-Match` reaches a `version` of the request (as `rest::apply_if_match` does).
pub fn takes_if_match(binding: &HttpBinding) -> bool {
    if has_version(&binding.input) {
        return true;
    }
    let BodyMapping::Field(field_name) = &binding.body else { return false };
    binding.input.get_field_by_name(field_name).is_some_and(|field| match field.kind() {
        Kind::Message(message) => has_version(&message),
        _ => false,
    })
}

fn request_body(schemas: &mut SchemaBuilder<'_>, binding: &HttpBinding) -> Option<Value> {
    let (schema, example) = match &binding.body {
        BodyMapping::None => return None,
        BodyMapping::Whole => {
            let omitted = path_top_fields(binding);
            let schema = schemas.object_schema(&binding.input, Direction::Request, &omitted);
            let example = message_example(&binding.input, Direction::Request, &omitted, 0);
            (schema, example)
        }
        BodyMapping::Field(field_name) => {
            let field = binding.input.get_field_by_name(field_name)?;
            let schema = match field.kind() {
                Kind::Message(message) => schemas.message_schema(&message, Direction::Request),
                _ => schemas.field_schema(&field, Direction::Request),
            };
            let example = match field.kind() {
                Kind::Message(message) => {
                    // The path already names the resource (`agent.id`): leave it out.
                    let omitted: Vec<&str> = binding
                        .path_variables
                        .iter()
                        .filter(|variable| {
                            variable.field_path.len() == 2 && &variable.field_path[0] == field_name
                        })
                        .map(|variable| variable.field_path[1].as_str())
                        .collect();
                    message_example(&message, Direction::Request, &omitted, 0)
                }
                _ => single_example(&field, Direction::Request, 0),
            };
            (schema, example)
        }
    };
    Some(json!({
        "required": true,
        "content": { "application/json": { "schema": schema, "example": example } },
    }))
}

fn responses(schemas: &mut SchemaBuilder<'_>, binding: &HttpBinding, is_public: bool) -> Value {
    let mut responses = Map::new();
    let status = binding.success_status.as_u16().to_string();
    if binding.server_streaming {
        let event_schema = schemas.message_schema(&binding.output, Direction::Response);
        let event_example = message_example(&binding.output, Direction::Response, &[], 0);
        responses.insert(
            status,
            json!({
                "description": "Server-Sent Events: one `message` event per update, its data the \
                                JSON of the schema in `x-event-schema`; an `error` event (the \
                                error envelope) if the stream fails.",
                "content": {
                    "text/event-stream": {
                        "schema": { "type": "string" },
                        "example": format!("event: message\ndata: {event_example}\n\n"),
                        "x-event-schema": event_schema,
                    }
                },
            }),
        );
    } else {
        let (data_schema, data_example) = data_shape(schemas, binding);
        let mut meta_example =
            json!({ "timestamp": EXAMPLE_TIME, "requestId": EXAMPLE_REQUEST_ID });
        let pagination_message =
            pagination_field(&binding.output).and_then(|field| match field.kind() {
                Kind::Message(message) => Some(message),
                _ => None,
            });
        let meta_schema = match pagination_message {
            Some(pagination) => {
                let pagination_schema = schemas.message_schema(&pagination, Direction::Response);
                meta_example["pagination"] =
                    message_example(&pagination, Direction::Response, &[], 0);
                json!({
                    "type": "object",
                    "required": ["timestamp", "requestId"],
                    "properties": {
                        "timestamp": { "type": "string", "format": "date-time" },
                        "requestId": { "type": "string" },
                        "pagination": pagination_schema,
                    },
                    "additionalProperties": false,
                })
            }
            None => reference("Meta"),
        };
        let mut success = json!({
            "description": humanize_status(binding.success_status),
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["success", "data", "meta"],
                        "properties": {
                            "success": { "const": true },
                            "data": data_schema,
                            "meta": meta_schema,
                        },
                        "additionalProperties": false,
                    },
                    "example": { "success": true, "data": data_example, "meta": meta_example },
                }
            },
        });
        if data_message(binding).is_some_and(|message| has_version(&message)) {
            success["headers"] = json!({
                "ETag": {
                    "description": "The resource's `version` as an entity tag; send it back in \
                                    `If-Match`.",
                    "schema": { "type": "string" },
                    "example": "\"3\"",
                }
            });
        }
        responses.insert(status, success);
    }

    let mut errors = vec![("400", "BadRequest")];
    if !is_public || binding.body != BodyMapping::None {
        errors.push(("401", "Unauthorized"));
    }
    if !is_public {
        errors.push(("403", "Forbidden"));
    }
    errors.push(("404", "NotFound"));
    errors.push(("409", "Conflict"));
    if binding.body != BodyMapping::None {
        errors.push(("413", "PayloadTooLarge"));
        errors.push(("415", "UnsupportedMediaType"));
    }
    errors.extend([
        ("429", "RateLimited"),
        ("500", "InternalError"),
        ("503", "ServiceUnavailable"),
    ]);
    for (status, name) in errors {
        responses
            .insert(status.to_owned(), json!({ "$ref": format!("#/components/responses/{name}") }));
    }
    responses.insert("default".into(), json!({ "$ref": "#/components/responses/OtherError" }));
    Value::Object(responses)
}

fn humanize_status(status: http::StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or("Success"))
}

/// The schema and example of `data`: the response field named by `response_body`, or the whole
/// response less its `pagination` (which the REST edge moves to `meta`).
fn data_shape(schemas: &mut SchemaBuilder<'_>, binding: &HttpBinding) -> (Value, Value) {
    let pagination_name = pagination_field(&binding.output).map(|field| field.name().to_owned());
    let pagination: Vec<&str> = pagination_name.iter().map(String::as_str).collect();
    match &binding.response_body {
        None => {
            let schema = if pagination.is_empty() {
                schemas.message_schema(&binding.output, Direction::Response)
            } else {
                schemas.object_schema(&binding.output, Direction::Response, &pagination)
            };
            let example = message_example(&binding.output, Direction::Response, &pagination, 0);
            (schema, example)
        }
        Some(field_name) => match binding.output.get_field_by_name(field_name) {
            Some(field) => (
                schemas.field_schema(&field, Direction::Response),
                field_example(&field, Direction::Response, 0),
            ),
            None => (json!({}), Value::Null),
        },
    }
}

fn meta_schema() -> Value {
    json!({
        "type": "object",
        "required": ["timestamp", "requestId"],
        "properties": {
            "timestamp": { "type": "string", "format": "date-time", "description": "When the answer was made." },
            "requestId": { "type": "string", "description": "The `x-request-id` of the request (made up when absent)." },
        },
        "additionalProperties": false,
    })
}

/// The schemas of the envelope that are not messages of the contract.
fn envelope_schemas() -> Vec<(String, Value)> {
    let codes: Vec<&str> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
    vec![
        ("Meta".to_owned(), meta_schema()),
        (
            "FieldViolation".to_owned(),
            json!({
                "type": "object",
                "description": "One rejected field, by its lowerCamelCase JSON path (`steps[2].dependsOn`).",
                "required": ["field", "message"],
                "properties": { "field": { "type": "string" }, "message": { "type": "string" } },
                "additionalProperties": false,
            }),
        ),
        (
            "ErrorFacts".to_owned(),
            json!({
                "type": "object",
                "description": "Machine-readable facts about the error, e.g. `currentVersion` on a \
                                version conflict or `limitBytes` on a too large body.",
                "additionalProperties": { "type": ["string", "integer"] },
            }),
        ),
        (
            "Error".to_owned(),
            json!({
                "type": "object",
                "required": ["code", "message", "details"],
                "properties": {
                    "code": { "type": "string", "enum": codes },
                    "message": { "type": "string" },
                    "details": {
                        "type": "array",
                        "items": { "anyOf": [reference("FieldViolation"), reference("ErrorFacts")] },
                    },
                },
                "additionalProperties": false,
            }),
        ),
        (
            "ErrorEnvelope".to_owned(),
            json!({
                "type": "object",
                "required": ["success", "error", "meta"],
                "properties": {
                    "success": { "const": false },
                    "error": reference("Error"),
                    "meta": reference("Meta"),
                },
                "additionalProperties": false,
            }),
        ),
    ]
}

fn error_example(code: ErrorCode, message: &str, details: Value) -> Value {
    json!({
        "success": false,
        "error": { "code": code.as_str(), "message": message, "details": details },
        "meta": { "timestamp": EXAMPLE_TIME, "requestId": EXAMPLE_REQUEST_ID },
    })
}

fn error_responses() -> Value {
    let entries = [
        (
            "BadRequest",
            "VALIDATION_ERROR: the request is invalid; `details` names every rejected field.",
            error_example(
                ErrorCode::ValidationError,
                "2 fields are invalid",
                json!([
                    { "field": "name", "message": "is required" },
                    { "field": "steps[2].dependsOn", "message": "names an unknown step" },
                ]),
            ),
        ),
        (
            "Unauthorized",
            "UNAUTHORIZED: no credentials, or credentials that are invalid, expired or revoked.",
            error_example(ErrorCode::Unauthorized, "authentication required", json!([])),
        ),
        (
            "Forbidden",
            "FORBIDDEN: the caller may not do this (an admin route, or an API key without the scope).",
            error_example(ErrorCode::Forbidden, "admin role required", json!([])),
        ),
        (
            "NotFound",
            "NOT_FOUND: no such resource, or one that belongs to someone else.",
            error_example(ErrorCode::NotFound, "agent not found", json!([])),
        ),
        (
            "Conflict",
            "CONFLICT: a stale version, a duplicate, or a resource still in use.",
            error_example(
                ErrorCode::Conflict,
                "agent was changed by someone else: the current version is 4",
                json!([{ "currentVersion": 4 }]),
            ),
        ),
        (
            "PayloadTooLarge",
            "PAYLOAD_TOO_LARGE: the body exceeds the server's limit.",
            error_example(
                ErrorCode::PayloadTooLarge,
                "the request body exceeds the limit of 1048576 bytes",
                json!([{ "limitBytes": 1_048_576 }]),
            ),
        ),
        (
            "UnsupportedMediaType",
            "UNSUPPORTED_MEDIA_TYPE: the body is not `application/json`.",
            error_example(
                ErrorCode::UnsupportedMediaType,
                "the request body must be application/json",
                json!([{ "contentType": "text/plain" }]),
            ),
        ),
        (
            "RateLimited",
            "RATE_LIMITED: too many requests; retry after `Retry-After` seconds.",
            error_example(ErrorCode::RateLimited, "too many attempts, try again later", json!([])),
        ),
        (
            "InternalError",
            "INTERNAL_ERROR: a failure on the server's side; the cause is logged, never shown.",
            error_example(ErrorCode::InternalError, "internal error", json!([])),
        ),
        (
            "ServiceUnavailable",
            "SERVICE_UNAVAILABLE: a dependency (database, Redis) is unreachable; retry later.",
            error_example(ErrorCode::ServiceUnavailable, "the store is unavailable", json!([])),
        ),
        (
            "OtherError",
            "Any other failure, in the same envelope (e.g. 501 NOT_IMPLEMENTED).",
            error_example(
                ErrorCode::NotImplemented,
                "this operation is not implemented yet",
                json!([]),
            ),
        ),
    ];
    let mut responses = Map::new();
    for (name, description, example) in entries {
        let mut response = json!({
            "description": description,
            "content": {
                "application/json": { "schema": reference("ErrorEnvelope"), "example": example }
            },
        });
        if name == "RateLimited" {
            response["headers"] = json!({
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "schema": { "type": "string", "pattern": "^[0-9]+$" },
                }
            });
        }
        responses.insert(name.to_owned(), response);
    }
    Value::Object(responses)
}

/// Fields a client does not send: the server sets them.
fn is_server_set(field: &FieldDescriptor) -> bool {
    matches!(field.name(), "id" | "owner_id" | "version" | "created_at" | "updated_at")
        || (field.name().ends_with("_at")
            && matches!(field.kind(), Kind::Message(message) if message.full_name() == "google.protobuf.Timestamp"))
}

/// An example of the message as it crosses the edge in `direction`.
fn message_example(
    message: &MessageDescriptor,
    direction: Direction,
    omitted: &[&str],
    depth: usize,
) -> Value {
    if let Some(example) = well_known_example(message) {
        return example;
    }
    let mut object = Map::new();
    let mut oneofs_seen: Vec<String> = Vec::new();
    for field in message.fields() {
        if omitted.contains(&field.name()) {
            continue;
        }
        if direction == Direction::Request && is_server_set(&field) {
            continue;
        }
        if let Some(oneof) = field.containing_oneof() {
            // One member of each oneof; `optional` fields are left out of requests.
            if oneof.is_synthetic() && direction == Direction::Request {
                continue;
            }
            if !oneof.is_synthetic() {
                if oneofs_seen.contains(&oneof.name().to_owned()) {
                    continue;
                }
                if depth + 1 >= EXAMPLE_DEPTH && matches!(field.kind(), Kind::Message(_)) {
                    continue;
                }
                oneofs_seen.push(oneof.name().to_owned());
            }
        }
        if direction == Direction::Request
            && matches!(field.kind(), Kind::Message(inner) if inner.full_name() == "google.protobuf.FieldMask")
        {
            continue;
        }
        object.insert(field.json_name().to_owned(), field_example(&field, direction, depth));
    }
    Value::Object(object)
}

fn well_known_example(message: &MessageDescriptor) -> Option<Value> {
    let example = match message.full_name() {
        "google.protobuf.Timestamp" => json!(EXAMPLE_TIME),
        "google.protobuf.Duration" => json!("30s"),
        "google.protobuf.FieldMask" => json!("name,description"),
        "google.protobuf.Struct" | "google.protobuf.Value" => json!({ "city": "Lisbon" }),
        "google.protobuf.ListValue" => json!([]),
        "google.protobuf.Empty" => json!({}),
        name if name.starts_with("google.protobuf.") => Value::Null,
        _ => return None,
    };
    Some(example)
}

fn field_example(field: &FieldDescriptor, direction: Direction, depth: usize) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else { return json!({}) };
        let value = single_example(&entry.map_entry_value_field(), direction, depth);
        return json!({ "key": value });
    }
    let single = single_example(field, direction, depth);
    if field.is_list() {
        return if single.is_null() { json!([]) } else { json!([single]) };
    }
    single
}

fn single_example(field: &FieldDescriptor, direction: Direction, depth: usize) -> Value {
    let name = field.name();
    match field.kind() {
        Kind::Message(message) => {
            if let Some(example) = well_known_example(&message) {
                return example;
            }
            if depth + 1 >= EXAMPLE_DEPTH {
                return Value::Null;
            }
            message_example(&message, direction, &[], depth + 1)
        }
        Kind::Enum(enumeration) => {
            if enumeration.full_name() == "google.protobuf.NullValue" {
                return Value::Null;
            }
            enumeration
                .values()
                .find(|value| value.number() != 0)
                .map(|value| json!(short_enum_name(&enumeration, value.name())))
                .unwrap_or_else(|| {
                    json!(short_enum_name(&enumeration, enumeration.default_value().name()))
                })
        }
        Kind::String => json!(string_example(name)),
        Kind::Bytes => json!("aGVsbG8="),
        Kind::Bool => json!(false),
        Kind::Double | Kind::Float => json!(0.5),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => {
            json!(integer_example(name))
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!(integer_example(name).to_string())
        }
    }
}

fn integer_example(name: &str) -> i64 {
    if name == "page_size" { 20 } else { 1 }
}

fn string_example(name: &str) -> String {
    let example = match name {
        "email" => "ada@example.com",
        "password" | "new_password" => "correct-horse-battery",
        "full_name" => "Ada Lovelace",
        "name" => "example",
        "description" => "What it is for.",
        "sort" => "-updatedAt",
        "search" | "tag" => "demo",
        "cursor" | "next_cursor" => "",
        "url" | "base_url" | "url_template" => "https://example.com/api",
        "access_token" | "refresh_token" | "token" => "eyJhbGciOi…",
        "key" | "step_key" => "fetch",
        "message" | "error" => "…",
        name if name == "id" || name.ends_with("_id") => EXAMPLE_ID,
        _ => "string",
    };
    example.to_owned()
}
