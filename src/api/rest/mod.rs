//! The REST edge under `/api/v1`: a transcoder, not a second implementation. Each route is read
//! from the contract (`bindings`), turns JSON + path + query into the RPC's request message,
//! calls the very gRPC service the gRPC clients call (in process, through the same layers), and
//! turns the answer into the envelope. Server-streaming RPCs become Server-Sent Events.
//! May call: the gRPC router it is given, the descriptor pool. Nothing else.

pub mod bindings;
pub mod envelope;

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use http_body_util::BodyExt;
use prost::Message as _;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor};
use serde_json::{Map, Value};
use tower::ServiceExt;

use self::bindings::{BodyMapping, HttpBinding};
use crate::error::{ErrorCode, FieldError, ServiceError};
use crate::proto::json;

/// How deep a request message may nest (itself included) for a gRPC decoder to accept it:
/// prost refuses a message nested past 100 levels, which the call would report as an error of
/// the server.
const MAX_DECODABLE_MESSAGE_DEPTH: usize = 100;

/// A request whose message nests deeper than a decoder accepts: VALIDATION_ERROR on each
/// top-level field at fault (the services refuse values deeper than `--max-json-depth`, far
/// below, with their own message).
fn refuse_too_deep(message: &DynamicMessage) -> Result<(), ServiceError> {
    let too_deep: Vec<FieldError> = message
        .fields()
        .filter(|(_, value)| 1 + value_depth(value) > MAX_DECODABLE_MESSAGE_DEPTH)
        .map(|(field, _)| FieldError {
            field: field.json_name().to_owned(),
            message: "is nested too deeply to be carried".to_owned(),
        })
        .collect();
    if too_deep.is_empty() {
        return Ok(());
    }
    Err(ServiceError::validation(too_deep))
}

/// How many protobuf messages deep a field value nests (a map entry is a message too).
fn value_depth(value: &prost_reflect::Value) -> usize {
    match value {
        prost_reflect::Value::Message(message) => {
            1 + message.fields().map(|(_, field)| value_depth(field)).max().unwrap_or(0)
        }
        prost_reflect::Value::List(items) => items.iter().map(value_depth).max().unwrap_or(0),
        prost_reflect::Value::Map(entries) => {
            entries.values().map(|entry| 1 + value_depth(entry)).max().unwrap_or(0)
        }
        _ => 0,
    }
}

/// Headers the REST edge hands on to the gRPC service as metadata.
const FORWARDED_HEADERS: [&str; 6] =
    ["authorization", "x-api-key", "x-request-id", "user-agent", "x-forwarded-for", "x-real-ip"];

/// What the transcoder needs: the routes, the gRPC service to call, the body limit.
#[derive(Clone)]
pub struct RestEdge {
    grpc: Router,
    max_body_bytes: usize,
}

/// Builds the REST router from the annotated RPCs; `grpc` is the gRPC router (with its layers).
pub fn router(bindings: Vec<HttpBinding>, grpc: Router, max_body_bytes: usize) -> Router {
    let edge = RestEdge { grpc, max_body_bytes };
    let mut router = Router::new();
    for binding in bindings {
        let binding = Arc::new(binding);
        let edge = edge.clone();
        let method_filter = axum::routing::MethodFilter::try_from(binding.http_method.clone())
            .unwrap_or(axum::routing::MethodFilter::GET);
        let path = binding.route_path.clone();
        let handler = move |request: Request| {
            let binding = binding.clone();
            let edge = edge.clone();
            async move { edge.handle(&binding, request).await }
        };
        router = router.route(&path, axum::routing::on(method_filter, handler));
    }
    router
}

impl RestEdge {
    async fn handle(&self, binding: &HttpBinding, request: Request) -> Response {
        let request_id = envelope::request_id_of(request.headers());
        match self.transcode(binding, request).await {
            Ok(response) => response,
            Err(error) => envelope::error(&error, &request_id),
        }
    }

    async fn transcode(
        &self,
        binding: &HttpBinding,
        request: Request,
    ) -> Result<Response, ServiceError> {
        let (mut parts, body) = request.into_parts();
        let request_id = envelope::request_id_of(&parts.headers);
        let body_bytes = self.read_body(body).await?;
        let path_values = path_values(&mut parts).await?;
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let mut query_pairs: Vec<(String, String)> =
            url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
        if binding.server_streaming {
            // An EventSource cannot send headers: the event stream alone takes the token here.
            if let Some(position) = query_pairs.iter().position(|(key, _)| key == "access_token") {
                let (_, token) = query_pairs.remove(position);
                // URLs end up in logs and histories: a long-lived API key never travels there.
                if token.trim().starts_with(crate::auth::API_KEY_PREFIX) {
                    return Err(ServiceError::invalid_field(
                        "access_token",
                        "takes only a short-lived access token; send an API key in the \
                         x-api-key header",
                    ));
                }
                if let Ok(value) = http::HeaderValue::from_str(&format!("Bearer {token}")) {
                    parts.headers.insert(http::header::AUTHORIZATION, value);
                }
            }
        }
        let if_match = parts
            .headers
            .get(http::header::IF_MATCH)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let message = request_message(
            binding,
            &parts.headers,
            &body_bytes,
            RequestParts { path_values, query_pairs, if_match },
        )?;

        let grpc_request = grpc_request(binding, &parts, &message)?;
        let grpc_response = match self.grpc.clone().oneshot(grpc_request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (response_parts, response_body) = grpc_response.into_parts();
        if let Some(status) = tonic::Status::from_header_map(&response_parts.headers)
            && status.code() != tonic::Code::Ok
        {
            return Err(ServiceError::from_status(&status));
        }
        if binding.server_streaming {
            return Ok(
                event_stream(binding.output.clone(), response_body, request_id).into_response()
            );
        }
        let collected = response_body
            .collect()
            .await
            .map_err(|error| ServiceError::internal(&*error.into_inner()))?;
        if let Some(trailers) = collected.trailers()
            && let Some(status) = tonic::Status::from_header_map(trailers)
            && status.code() != tonic::Code::Ok
        {
            return Err(ServiceError::from_status(&status));
        }
        let mut frames = collected.to_bytes();
        let payload = next_frame(&mut frames)
            .ok_or_else(|| ServiceError::new(ErrorCode::InternalError, "internal error"))?;
        let output = DynamicMessage::decode(binding.output.clone(), payload)
            .map_err(|error| ServiceError::internal(&error))?;
        Ok(success_response(binding, &output, &request_id))
    }

    async fn read_body(&self, body: Body) -> Result<Bytes, ServiceError> {
        let limited = http_body_util::Limited::new(body, self.max_body_bytes);
        match limited.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => {
                Err(payload_too_large(self.max_body_bytes))
            }
            Err(error) => {
                Err(ServiceError::invalid_field("body", format!("could not be read: {error}")))
            }
        }
    }
}

pub fn payload_too_large(limit: usize) -> ServiceError {
    ServiceError::new(
        ErrorCode::PayloadTooLarge,
        format!("the request body exceeds the limit of {limit} bytes"),
    )
    .with_metadata("limitBytes", limit)
}

async fn path_values(
    parts: &mut http::request::Parts,
) -> Result<Vec<(String, String)>, ServiceError> {
    use axum::extract::FromRequestParts;
    let params = axum::extract::RawPathParams::from_request_parts(parts, &())
        .await
        .map_err(|rejection| ServiceError::invalid_field("path", rejection.body_text()))?;
    Ok(params.iter().map(|(name, value)| (name.to_owned(), value.to_owned())).collect())
}

/// What a request carries besides its body: the path values by route name (`p0`, …), the
/// decoded query pairs and `If-Match`.
pub(crate) struct RequestParts {
    pub(crate) path_values: Vec<(String, String)>,
    pub(crate) query_pairs: Vec<(String, String)>,
    pub(crate) if_match: Option<String>,
}

/// The RPC's request message from the body, the path values, the query and `If-Match`; every
/// problem is a 4xx naming its field (a body that is not JSON, a wrong content type).
pub(crate) fn request_message(
    binding: &HttpBinding,
    headers: &http::HeaderMap,
    body_bytes: &Bytes,
    parts: RequestParts,
) -> Result<DynamicMessage, ServiceError> {
    let request_json = build_request_json(binding, headers, body_bytes, parts)?;
    let message =
        json::message_from_json(&binding.input, request_json).map_err(ServiceError::validation)?;
    refuse_too_deep(&message)?;
    Ok(message)
}

fn build_request_json(
    binding: &HttpBinding,
    headers: &http::HeaderMap,
    body_bytes: &Bytes,
    parts: RequestParts,
) -> Result<Value, ServiceError> {
    let mut root = Map::new();
    let mut errors = Vec::new();

    if binding.body != BodyMapping::None && !body_bytes.iter().all(u8::is_ascii_whitespace) {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let is_json = content_type
            .split(';')
            .next()
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !is_json {
            return Err(ServiceError::new(
                ErrorCode::UnsupportedMediaType,
                "the request body must be application/json",
            )
            .with_metadata("contentType", content_type));
        }
        let body: Value = serde_json::from_slice(body_bytes).map_err(|error| {
            ServiceError::invalid_field("body", format!("malformed JSON: {error}"))
        })?;
        if !body.is_object() {
            return Err(ServiceError::invalid_field("body", "must be a JSON object"));
        }
        match &binding.body {
            BodyMapping::Whole => {
                if let Value::Object(object) = body {
                    root = object;
                }
            }
            BodyMapping::Field(field_name) => {
                let key = json_name(&binding.input, field_name);
                fill_update_mask(&binding.input, field_name, &body, &mut root);
                root.insert(key, body);
            }
            BodyMapping::None => {}
        }
    }

    for (route_name, text) in &parts.path_values {
        let Some(variable) =
            binding.path_variables.iter().find(|variable| &variable.route_name == route_name)
        else {
            continue;
        };
        if let Err(error) = set_path(&binding.input, &mut root, &variable.field_path, text) {
            errors.push(error);
        }
    }

    for (key, text) in &parts.query_pairs {
        let Some(field) = binding
            .input
            .get_field_by_json_name(key)
            .or_else(|| binding.input.get_field_by_name(key))
        else {
            // A parameter without a name (`?=x`) is reported on `query`: a field error always
            // names a field (found by the rest_transcoding fuzz target).
            match key.as_str() {
                "" => errors.push(FieldError::new("query", "has a parameter without a name")),
                _ => errors.push(FieldError::new(key.clone(), "unknown query parameter")),
            }
            continue;
        };
        // The path names the resource: a query parameter may not name another one (found by
        // the rest_transcoding fuzz target: `DELETE /agents/A?agentId=B` deleted B).
        if binding.path_variables.iter().any(|variable| {
            variable.field_path.first().is_some_and(|first| first.as_str() == field.name())
        }) {
            errors.push(FieldError::new(key.clone(), "is given in the path"));
            continue;
        }
        match json::scalar_from_text(&field, text, key) {
            Ok(value) if field.is_list() => {
                let entry = root
                    .entry(field.json_name().to_owned())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(items) = entry {
                    items.push(value);
                }
            }
            Ok(value) => {
                root.insert(field.json_name().to_owned(), value);
            }
            Err(error) => errors.push(error),
        }
    }

    if let Some(if_match) = parts.if_match {
        apply_if_match(binding, &mut root, &if_match, &mut errors);
    }

    if !errors.is_empty() {
        return Err(ServiceError::validation(errors));
    }
    Ok(Value::Object(root))
}

fn json_name(message: &MessageDescriptor, field_name: &str) -> String {
    message
        .get_field_by_name(field_name)
        .map(|field| field.json_name().to_owned())
        .unwrap_or_else(|| field_name.to_owned())
}

/// A PATCH names what it changes by the keys it sends: when the request has an `update_mask`
/// and the client gave none, the mask is the body's keys (less `id` and `version`).
fn fill_update_mask(
    input: &MessageDescriptor,
    body_field: &str,
    body: &Value,
    root: &mut Map<String, Value>,
) {
    let Some(mask_field) = input.get_field_by_name("update_mask") else { return };
    let Some(resource_field) = input.get_field_by_name(body_field) else { return };
    let Kind::Message(resource) = resource_field.kind() else { return };
    let Value::Object(object) = body else { return };
    let mut paths = Vec::new();
    for key in object.keys() {
        let Some(field) =
            resource.get_field_by_json_name(key).or_else(|| resource.get_field_by_name(key))
        else {
            continue;
        };
        if matches!(field.name(), "id" | "version") {
            continue;
        }
        paths.push(field.json_name().to_owned());
    }
    root.entry(mask_field.json_name().to_owned()).or_insert_with(|| Value::String(paths.join(",")));
}

fn set_path(
    input: &MessageDescriptor,
    root: &mut Map<String, Value>,
    field_path: &[String],
    text: &str,
) -> Result<(), FieldError> {
    let mut current_message = input.clone();
    let mut current_object = root;
    for (index, name) in field_path.iter().enumerate() {
        let field = current_message
            .get_field_by_name(name)
            .ok_or_else(|| FieldError::new(name.clone(), "unknown path field"))?;
        let key = field.json_name().to_owned();
        if index + 1 == field_path.len() {
            let value = json::scalar_from_text(&field, text, &key)?;
            current_object.insert(key, value);
            return Ok(());
        }
        let Kind::Message(next_message) = field.kind() else {
            return Err(FieldError::new(key, "is not an object"));
        };
        let entry = current_object.entry(key.clone()).or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next_object) = entry else { unreachable!("just made an object") };
        current_object = next_object;
        current_message = next_message;
    }
    Ok(())
}

/// `If-Match: "3"` stands for `version: 3` wherever the request carries a version.
fn apply_if_match(
    binding: &HttpBinding,
    root: &mut Map<String, Value>,
    if_match: &str,
    errors: &mut Vec<FieldError>,
) {
    let trimmed = if_match.trim().trim_start_matches("W/").trim_matches('"');
    let Ok(version) = trimmed.parse::<i64>() else {
        errors.push(FieldError::new("If-Match", "must be an ETag this API gave out"));
        return;
    };
    if binding.input.get_field_by_name("version").is_some() {
        root.entry("version").or_insert(Value::from(version));
        return;
    }
    if let BodyMapping::Field(field_name) = &binding.body {
        let key = json_name(&binding.input, field_name);
        if let Some(Value::Object(resource)) = root.get_mut(&key) {
            resource.entry("version").or_insert(Value::from(version));
        }
    }
}

fn grpc_request(
    binding: &HttpBinding,
    parts: &http::request::Parts,
    message: &DynamicMessage,
) -> Result<http::Request<Body>, ServiceError> {
    let encoded = message.encode_to_vec();
    let length = u32::try_from(encoded.len()).map_err(|_| payload_too_large(u32::MAX as usize))?;
    let mut framed = BytesMut::with_capacity(encoded.len() + 5);
    framed.put_u8(0);
    framed.put_u32(length);
    framed.extend_from_slice(&encoded);

    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(binding.grpc_path.as_str())
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers");
    for name in FORWARDED_HEADERS {
        for value in parts.headers.get_all(name) {
            builder = builder.header(name, value);
        }
    }
    let mut request = builder
        .body(Body::from(framed.freeze()))
        .map_err(|error| ServiceError::internal(&error))?;
    *request.extensions_mut() = parts.extensions.clone();
    Ok(request)
}

/// Takes the next length-prefixed gRPC message off `buffer`.
fn next_frame(buffer: &mut Bytes) -> Option<Bytes> {
    if buffer.len() < 5 {
        return None;
    }
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + length {
        return None;
    }
    buffer.advance(5);
    Some(buffer.split_to(length))
}

fn success_response(binding: &HttpBinding, output: &DynamicMessage, request_id: &str) -> Response {
    let mut value = json::message_to_json(output);
    let mut pagination = None;
    if let Value::Object(object) = &mut value {
        pagination = object.remove("pagination").filter(|pagination| !pagination.is_null());
    }
    let data = match &binding.response_body {
        Some(field_name) => {
            let key = json_name(&binding.output, field_name);
            match &mut value {
                Value::Object(object) => object.remove(&key).unwrap_or(Value::Null),
                _ => Value::Null,
            }
        }
        None => value,
    };
    let etag = data.get("version").and_then(Value::as_i64).map(|version| format!("\"{version}\""));
    let mut response = envelope::success(binding.success_status, data, pagination, request_id);
    if let Some(etag) = etag
        && let Ok(value) = http::HeaderValue::from_str(&etag)
    {
        response.headers_mut().insert(http::header::ETAG, value);
    }
    response
}

/// Relays a server stream as Server-Sent Events: one `message` event per response, and an
/// `error` event (the error envelope) if the stream ends with a failure.
fn event_stream(
    output: MessageDescriptor,
    body: Body,
    request_id: String,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = futures::stream::unfold(
        (body, BytesMut::new(), false),
        move |(mut body, mut buffer, finished)| {
            let output = output.clone();
            let request_id = request_id.clone();
            async move {
                if finished {
                    return None;
                }
                loop {
                    let mut frozen = buffer.clone().freeze();
                    if let Some(payload) = next_frame(&mut frozen) {
                        let consumed = buffer.len() - frozen.len();
                        buffer.advance(consumed);
                        let event = match DynamicMessage::decode(output.clone(), payload) {
                            Ok(message) => Event::default()
                                .event("message")
                                .data(json::message_to_json(&message).to_string()),
                            Err(error) => error_event(&ServiceError::internal(&error), &request_id),
                        };
                        return Some((Ok(event), (body, buffer, false)));
                    }
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Some(data) = frame.data_ref() {
                                buffer.extend_from_slice(data);
                                continue;
                            }
                            if let Some(trailers) = frame.trailers_ref()
                                && let Some(status) = tonic::Status::from_header_map(trailers)
                                && status.code() != tonic::Code::Ok
                            {
                                let error = ServiceError::from_status(&status);
                                return Some((
                                    Ok(error_event(&error, &request_id)),
                                    (body, buffer, true),
                                ));
                            }
                        }
                        Some(Err(error)) => {
                            let error = ServiceError::new(
                                ErrorCode::ServiceUnavailable,
                                format!("stream broken: {error}"),
                            );
                            return Some((
                                Ok(error_event(&error, &request_id)),
                                (body, buffer, true),
                            ));
                        }
                        None => return None,
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn error_event(error: &ServiceError, request_id: &str) -> Event {
    Event::default().event("error").data(envelope::error_body(error, request_id).to_string())
}

#[cfg(test)]
mod tests {
    use super::bindings::http_bindings;
    use super::{RequestParts, request_message};
    use crate::error::ErrorCode;

    /// Found by the rest_transcoding fuzz target: a query parameter named like the path's field
    /// replaced the path value, so `DELETE /api/v1/agents/A?agentId=B` deleted B.
    #[test]
    fn a_query_parameter_cannot_replace_the_path_value() {
        let bindings = http_bindings(crate::proto::descriptor_pool()).expect("routes");
        let delete_agent = bindings
            .iter()
            .find(|binding| binding.grpc_path == "/turbocat.v1.AgentService/DeleteAgent")
            .expect("DeleteAgent");
        let parts = |name: &str, value: &str| RequestParts {
            path_values: vec![("p0".to_owned(), "a".to_owned())],
            query_pairs: vec![(name.to_owned(), value.to_owned())],
            if_match: None,
        };
        for name in ["agentId", "agent_id"] {
            let error = request_message(
                delete_agent,
                &http::HeaderMap::new(),
                &bytes::Bytes::new(),
                parts(name, "b"),
            )
            .expect_err("refused");
            assert_eq!(error.code, ErrorCode::ValidationError);
            assert_eq!(error.field_errors[0].field, name);
            assert_eq!(error.field_errors[0].message, "is given in the path");
        }
        let message = request_message(
            delete_agent,
            &http::HeaderMap::new(),
            &bytes::Bytes::new(),
            parts("version", "3"),
        )
        .expect("other parameters still work");
        let agent_id = message.get_field_by_name("agent_id").expect("set");
        assert_eq!(agent_id.as_str(), Some("a"));
    }

    /// Found by the rest_transcoding fuzz target: `?=x` was refused on a field named "".
    #[test]
    fn a_query_parameter_without_a_name_is_refused_on_the_query() {
        let bindings = http_bindings(crate::proto::descriptor_pool()).expect("routes");
        let list_agents = bindings
            .iter()
            .find(|binding| binding.grpc_path == "/turbocat.v1.AgentService/ListAgents")
            .expect("ListAgents");
        let parts = RequestParts {
            path_values: Vec::new(),
            query_pairs: vec![(String::new(), "x".to_owned())],
            if_match: None,
        };
        let error =
            request_message(list_agents, &http::HeaderMap::new(), &bytes::Bytes::new(), parts)
                .expect_err("refused");
        assert_eq!(error.field_errors.len(), 1);
        assert_eq!(error.field_errors[0].field, "query");
        assert_eq!(error.field_errors[0].message, "has a parameter without a name");
    }
}

/// Properties of the transcoder over every route of the contract: any body, query string or
/// path value becomes the request message or a 4xx naming a field at fault, never a panic or
/// a 500; a path value lands in its field unchanged.
#[cfg(test)]
mod properties {
    use std::collections::BTreeSet;
    use std::sync::LazyLock;

    use proptest::prelude::*;
    use prost_reflect::{DynamicMessage, ReflectMessage};
    use serde_json::{Map, Value};

    use super::bindings::{BodyMapping, HttpBinding, http_bindings};
    use super::{RequestParts, request_message};
    use crate::error::{ErrorCode, ServiceError};

    static BINDINGS: LazyLock<Vec<HttpBinding>> = LazyLock::new(|| {
        http_bindings(crate::proto::descriptor_pool()).expect("the contract's routes")
    });

    /// The JSON name of every field of every message in the contract: keys a generated body
    /// uses, so bodies reach nested fields instead of stopping at "unknown field".
    static FIELD_NAMES: LazyLock<Vec<String>> = LazyLock::new(|| {
        let names: BTreeSet<String> = crate::proto::descriptor_pool()
            .all_messages()
            .flat_map(|message| {
                message.fields().map(|field| field.json_name().to_owned()).collect::<Vec<_>>()
            })
            .collect();
        names.into_iter().collect()
    });

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(FIELD_NAMES.clone()),
            1 => "[a-zA-Z_]{1,8}",
        ]
    }

    /// Strings shaped like what fields expect, and not.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,12}",
            "[0-9]{1,20}",
            "-?[0-9]{1,3}\\.[0-9]{1,3}",
            proptest::sample::select(vec![
                "code",
                "AGENT_TYPE_CODE",
                "http",
                "RUNNING",
                "true",
                "NaN",
                "Infinity",
                "2026-01-01T00:00:00Z",
                "2026-13-45T99:00:00Z",
                "3.5s",
                "1",
                "aGVsbG8=",
                "0190f0f0-0000-7000-8000-000000000001",
                "name,description",
                "",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let scalar = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        scalar.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(key(), inner, 0..5)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn json_headers() -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        headers
    }

    fn no_parts() -> RequestParts {
        RequestParts { path_values: Vec::new(), query_pairs: Vec::new(), if_match: None }
    }

    /// The JSON names of the fields a body of `binding` fills (of the body field's message when
    /// the body is one field), so generated bodies mostly name real fields.
    fn body_field_names(binding: &HttpBinding) -> Vec<String> {
        let message = match &binding.body {
            BodyMapping::Field(name) => {
                match binding.input.get_field_by_name(name).map(|field| field.kind()) {
                    Some(prost_reflect::Kind::Message(message)) => message,
                    _ => binding.input.clone(),
                }
            }
            _ => binding.input.clone(),
        };
        message.fields().map(|field| field.json_name().to_owned()).collect()
    }

    /// A route with a body, and a body for it: mostly its own fields, any values.
    fn route_and_body()
    -> impl Strategy<Value = (&'static HttpBinding, std::collections::BTreeMap<String, Value>)>
    {
        let with_body: Vec<&'static HttpBinding> =
            BINDINGS.iter().filter(|binding| binding.body != BodyMapping::None).collect();
        proptest::sample::select(with_body).prop_flat_map(|binding| {
            let mut own = body_field_names(binding);
            if own.is_empty() {
                own.push("unknown".to_owned());
            }
            let name = prop_oneof![3 => proptest::sample::select(own), 1 => key()];
            (Just(binding), proptest::collection::btree_map(name, json_value(), 0..6))
        })
    }

    fn route(
        pick: proptest::sample::Index,
        keep: impl Fn(&HttpBinding) -> bool,
    ) -> Option<&'static HttpBinding> {
        let matching: Vec<&HttpBinding> = BINDINGS.iter().filter(|binding| keep(binding)).collect();
        (!matching.is_empty()).then(|| *pick.get(&matching))
    }

    /// A refusal is a 400 with at least one field error, each naming a field and a reason.
    fn assert_names_fields(error: &ServiceError) -> Result<(), TestCaseError> {
        prop_assert_eq!(error.code, ErrorCode::ValidationError, "{:?}", error);
        prop_assert_eq!(error.code.http_status(), http::StatusCode::BAD_REQUEST);
        prop_assert!(!error.field_errors.is_empty(), "{:?}", error);
        for field_error in &error.field_errors {
            prop_assert!(
                !field_error.field.is_empty() && !field_error.message.is_empty(),
                "{:?}",
                error
            );
        }
        Ok(())
    }

    /// The top-level key of a field error's path: `agent` for `agent.config.code[0]`.
    fn top_key(field: &str) -> &str {
        field.split(['.', '[']).next().unwrap_or(field)
    }

    proptest! {
        #[test]
        fn any_json_body_decodes_or_names_the_fields_at_fault((binding, fields) in route_and_body()) {
            let body = Value::Object(fields.clone().into_iter().collect::<Map<_, _>>());
            let bytes = bytes::Bytes::from(body.to_string());
            let Err(error) = request_message(binding, &json_headers(), &bytes, no_parts()) else {
                return Ok(());
            };
            assert_names_fields(&error)?;
            let body_key = match &binding.body {
                BodyMapping::Field(name) => super::json_name(&binding.input, name),
                _ => String::new(),
            };
            for field_error in &error.field_errors {
                let top = top_key(&field_error.field);
                prop_assert!(
                    fields.contains_key(top) || top == body_key,
                    "{} {:?} names a field the body does not have: {:?}",
                    binding.template, field_error, body
                );
            }
        }

        #[test]
        fn any_bytes_as_a_body_are_refused_on_the_body_or_decode(
            pick in any::<proptest::sample::Index>(),
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                json_value().prop_map(|value| value.to_string().into_bytes()),
            ],
        ) {
            let Some(binding) = route(pick, |binding| binding.body != BodyMapping::None) else {
                return Ok(());
            };
            let body = bytes::Bytes::from(bytes);
            let parsed = serde_json::from_slice::<Value>(&body);
            match request_message(binding, &json_headers(), &body, no_parts()) {
                Ok(_) => prop_assert!(
                    body.iter().all(u8::is_ascii_whitespace) || parsed.is_ok_and(|value| value.is_object()),
                    "only an object or nothing decodes"
                ),
                Err(error) => {
                    assert_names_fields(&error)?;
                    if !parsed.as_ref().is_ok_and(Value::is_object) {
                        prop_assert_eq!(&error.field_errors[0].field, "body");
                    }
                }
            }
            let mut text_plain = http::HeaderMap::new();
            text_plain.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
            if let Err(error) = request_message(binding, &text_plain, &body, no_parts()) {
                prop_assert!(matches!(error.code, ErrorCode::UnsupportedMediaType | ErrorCode::ValidationError), "{:?}", error);
            }
        }

        #[test]
        fn any_query_string_decodes_or_names_the_parameters_at_fault(
            pick in any::<proptest::sample::Index>(),
            query in proptest::collection::vec((key(), text()), 0..6),
        ) {
            let Some(binding) = route(pick, |binding| binding.http_method == http::Method::GET) else {
                return Ok(());
            };
            let raw: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(&query).finish();
            let query_pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw.as_bytes()).into_owned().collect();
            prop_assert_eq!(&query_pairs, &query, "the query string round-trips");
            let parts = RequestParts { query_pairs, ..no_parts() };
            let known = |name: &str| {
                binding.input.get_field_by_json_name(name).or_else(|| binding.input.get_field_by_name(name)).is_some()
            };
            match request_message(binding, &http::HeaderMap::new(), &bytes::Bytes::new(), parts) {
                Ok(_) => prop_assert!(query.iter().all(|(name, _)| known(name))),
                Err(error) => {
                    assert_names_fields(&error)?;
                    for (name, _) in query.iter().filter(|(name, _)| !known(name)) {
                        prop_assert!(error.field_errors.iter().any(|field_error| &field_error.field == name), "{name} is named");
                    }
                }
            }
        }

        #[test]
        fn a_path_value_lands_in_its_field_unchanged(
            pick in any::<proptest::sample::Index>(),
            value in ".{1,40}",
        ) {
            let Some(binding) = route(pick, |binding| !binding.path_variables.is_empty()) else {
                return Ok(());
            };
            let path_values = binding
                .path_variables
                .iter()
                .map(|variable| (variable.route_name.clone(), value.clone()))
                .collect();
            let parts = RequestParts { path_values, ..no_parts() };
            let message = match request_message(binding, &http::HeaderMap::new(), &bytes::Bytes::new(), parts) {
                Ok(message) => message,
                Err(error) => {
                    // Only a path field that is not text can refuse a value.
                    assert_names_fields(&error)?;
                    return Ok(());
                }
            };
            for variable in &binding.path_variables {
                let mut current: DynamicMessage = message.clone();
                let (last, parents) = variable.field_path.split_last().expect("a field");
                for name in parents {
                    let next = current.get_field_by_name(name).and_then(|field| field.as_message().cloned());
                    prop_assert!(next.is_some(), "{} sets {}", binding.template, name);
                    current = next.expect("checked");
                }
                let field = current.descriptor().get_field_by_name(last).expect("a field of the path");
                if matches!(field.kind(), prost_reflect::Kind::String) {
                    let stored = current.get_field(&field);
                    prop_assert_eq!(stored.as_str(), Some(value.as_str()));
                }
            }
        }
    }
}
