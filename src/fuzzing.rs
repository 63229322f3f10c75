//! The bodies of the fuzz targets: one plain function per target, taking any bytes, decoding
//! them as the code under test receives its input (JSON, text, a protobuf message) and calling
//! the real code, panicking when an invariant breaks. `fuzz/` (a cargo-fuzz crate, run by
//! `scripts/fuzz`) only calls these, and a unit test below runs each over its seed corpus
//! (`fuzz/corpus/<target>/`) and its crash inputs (`fuzz/regressions/<target>/`), so the
//! bodies compile with the library and every crash found stays a regression test.
//! May call: the code it fuzzes: `api` (the REST transcoder), `engine` (the DAG validator,
//! cron schedules, the server's side of the runner protocol), `mapping`, `proto` (the
//! messages and their JSON), `runner` (the runner's side of the protocol), `service` (the
//! webhook signature check, the deployments' cron triggers), `store` (the trigger and
//! completion types) and `error`. Nothing calls it but the fuzz crate and its test.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use prost::Message as _;
use serde_json::{Value, json};

use crate::engine::dag::{self, DagStep};
use crate::engine::schedule::{self, Schedule};
use crate::error::{ErrorCode, ServiceError};
use crate::mapping::{self, PathSegment};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{Completion, DeploymentTrigger};

/// A target's body: any bytes in, a panic when an invariant breaks.
pub type TargetBody = fn(&[u8]);

/// Every target: its name (the file `fuzz/fuzz_targets/<name>.rs`, the folders
/// `fuzz/corpus/<name>/` and `fuzz/regressions/<name>/`) and its body.
pub const TARGETS: &[(&str, TargetBody)] = &[
    ("dag", dag),
    ("mapping", mapping),
    ("rest_transcoding", rest_transcoding),
    ("cron", cron),
    ("runner_protocol", runner_protocol),
    ("webhook_signature", webhook_signature),
];

/// The body of the target `name`.
pub fn target(name: &str) -> Option<TargetBody> {
    TARGETS.iter().find(|(target, _)| *target == name).map(|(_, body)| *body)
}

// ---------------------------------------------------------------------------------------------
// dag

/// One step as a workflow's JSON gives it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonStep {
    #[serde(default)]
    key: String,
    #[serde(default)]
    depends_on: Vec<String>,
    #[serde(default)]
    input_mapping: Option<Value>,
}

/// A JSON array of steps (`[{"key": "a", "dependsOn": ["b"], "inputMapping": …}]`): the
/// validator never panics and names only steps that exist; a definition it accepts has a
/// topological order that respects every edge; running ready steps wave by wave runs every
/// step once, after its dependencies.
pub fn dag(data: &[u8]) {
    let Ok(steps) = serde_json::from_slice::<Vec<JsonStep>>(data) else { return };
    let steps: Vec<DagStep> = steps
        .into_iter()
        .map(|step| DagStep {
            key: step.key,
            depends_on: step.depends_on,
            input_mapping: step.input_mapping,
        })
        .collect();
    let errors = dag::validate(&steps);
    for error in &errors {
        let index = error
            .field
            .strip_prefix("steps[")
            .and_then(|rest| rest.split_once(']'))
            .and_then(|(number, _)| number.parse::<usize>().ok());
        assert!(index.is_some_and(|index| index < steps.len()), "{error:?} names a step");
        assert!(!error.message.is_empty(), "{error:?} says what is wrong");
    }
    let order = dag::topological_order(&steps);
    match &order {
        Some(order) => {
            let mut position = HashMap::new();
            for (at, index) in order.iter().enumerate() {
                assert!(position.insert(steps[*index].key.as_str(), at).is_none(), "once each");
            }
            assert_eq!(position.len(), steps.len(), "every step is ordered");
            for (at, index) in order.iter().enumerate() {
                for dependency in &steps[*index].depends_on {
                    assert!(position[dependency.as_str()] < at, "{dependency} comes first");
                }
            }
        }
        None => assert!(!errors.is_empty(), "no order, so something is reported"),
    }
    if !errors.is_empty() {
        return;
    }
    assert!(order.is_some(), "a valid definition has an order");
    let mut succeeded: HashSet<&str> = HashSet::new();
    for _ in 0..steps.len() {
        let ready = dag::ready_steps(&steps, &succeeded);
        if ready.is_empty() {
            break;
        }
        for step in &ready {
            assert!(
                step.depends_on.iter().all(|dependency| succeeded.contains(dependency.as_str()))
            );
        }
        succeeded.extend(ready.iter().map(|step| step.key.as_str()));
    }
    assert_eq!(succeeded.len(), steps.len(), "every step of a valid definition runs");
}

// ---------------------------------------------------------------------------------------------
// mapping

/// The scope a text template is rendered against when the input is not a JSON
/// `{"template": …, "scope": …}` object.
fn mapping_scope() -> Value {
    json!({
        "input": { "name": "Ada", "count": 3, "tags": ["x", "y"], "nested": { "ok": true }, "none": null },
        "steps": { "fetch": { "output": { "items": [{ "id": 7 }, { "id": 8 }], "0": "zero" } } },
        "params": { "size": 2 },
    })
}

/// The path of a placeholder written back as text: names joined by dots, positions in
/// brackets (a leading position as a plain number: brackets need a name before them).
fn path_text(segments: &[PathSegment]) -> String {
    let mut text = String::new();
    for (position, segment) in segments.iter().enumerate() {
        match segment {
            PathSegment::Key(key) => {
                if position > 0 {
                    text.push('.');
                }
                text.push_str(key);
            }
            PathSegment::Index(index) if position == 0 => text.push_str(&index.to_string()),
            PathSegment::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// A `{{…}}` template: either a JSON object `{"template": <any JSON>, "scope": <any JSON>}`, or
/// any text rendered as a text template against a fixed scope. Parsing and rendering never
/// panic and agree with each other; every placeholder's path round-trips through its text; a
/// whole placeholder renders as the value its path names; a render fails exactly when a path
/// names nothing; a template without placeholders renders unchanged.
pub fn mapping(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text)
        && let Some(template) = object.remove("template")
    {
        let scope = object.remove("scope").unwrap_or_else(mapping_scope);
        check_json_template(&template, &scope);
        return;
    }
    check_text_template(text, &mapping_scope());
}

fn check_text_template(text: &str, scope: &Value) {
    let parsed = mapping::text_references(text);
    let rendered = mapping::render_text(text, scope);
    let references = match parsed {
        Err(error) => {
            assert!(!error.message.is_empty());
            assert_eq!(rendered.as_ref().err(), Some(&error), "render reports the parse error");
            return;
        }
        Ok(references) => references,
    };
    for reference in &references {
        assert!(!reference.segments.is_empty(), "{reference:?} has a path");
        let again =
            mapping::text_references(&format!("{{{{{}}}}}", path_text(&reference.segments)))
                .unwrap_or_else(|error| {
                    panic!("{reference:?} written back does not parse: {error}")
                });
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].segments, reference.segments, "the path round-trips");
        let as_given = mapping::text_references(&format!("{{{{{}}}}}", reference.text))
            .unwrap_or_else(|error| panic!("{reference:?} as given does not parse: {error}"));
        assert_eq!(as_given[0].segments, reference.segments, "its text parses to it");
    }
    let all_resolve =
        references.iter().all(|reference| mapping::lookup(scope, &reference.segments).is_some());
    match &rendered {
        Ok(output) => {
            assert!(all_resolve, "rendered although a path names nothing");
            if references.is_empty() {
                assert_eq!(output, text, "no placeholders: unchanged");
            }
        }
        Err(error) => {
            assert!(!all_resolve, "every path names something, yet: {error}");
            assert!(error.message.contains("names nothing"), "{error}");
        }
    }
    let whole = mapping::render(&Value::String(text.to_owned()), scope);
    match (&whole, &rendered) {
        (Ok(_), Ok(_)) | (Err(_), Err(_)) => {}
        _ => panic!("render and render_text disagree: {whole:?} {rendered:?}"),
    }
    // Exactly one placeholder and nothing around it.
    if let ([reference], Ok(value)) = (references.as_slice(), &whole)
        && text.starts_with("{{")
        && text.find("}}").is_some_and(|end| end + 2 == text.len())
    {
        assert_eq!(Some(value), mapping::lookup(scope, &reference.segments), "type kept");
    }
}

fn check_json_template(template: &Value, scope: &Value) {
    let listed = mapping::references(template);
    let rendered = mapping::render(template, scope);
    match (&listed, &rendered) {
        (Err(parse_error), Err(render_error)) => {
            assert!(!parse_error.message.is_empty());
            assert!(!render_error.message.is_empty());
        }
        (Err(parse_error), Ok(_)) => panic!("rendered although it does not parse: {parse_error}"),
        (Ok(references), Ok(output)) => {
            for (_, reference) in references {
                assert!(mapping::lookup(scope, &reference.segments).is_some(), "{reference:?}");
            }
            if references.is_empty() {
                assert_eq!(output, template, "no placeholders: unchanged");
            }
        }
        (Ok(references), Err(error)) => {
            let missing = references.iter().any(|(location, reference)| {
                *location == error.location && mapping::lookup(scope, &reference.segments).is_none()
            });
            assert!(missing, "{error} at {:?} names no missing path", error.location);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// rest_transcoding

/// An HTTP request as text: `METHOD /api/v1/path?query` on the first line, `name: value`
/// header lines, an empty line, then the body. The route is found as the REST router finds it
/// (a static segment before a variable). The transcoder never panics; a refusal is a 4xx, and
/// a 400 names every field at fault; a message it builds survives the protobuf encoding the
/// gRPC call carries it in, unchanged; a text path value lands in its field unchanged.
pub fn rest_transcoding(data: &[u8]) {
    use crate::api::rest::bindings::{HttpBinding, http_bindings};
    use crate::api::rest::{RequestParts, request_message};
    use std::sync::LazyLock;

    static BINDINGS: LazyLock<Vec<HttpBinding>> = LazyLock::new(|| {
        http_bindings(crate::proto::descriptor_pool()).unwrap_or_else(|error| panic!("{error}"))
    });

    let (head, body) = match find(data, b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let Ok(head) = std::str::from_utf8(head) else { return };
    let mut lines = head.lines();
    let Some((method, target)) = lines.next().and_then(|line| line.trim().split_once(' ')) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let (path, query) = target.trim().split_once('?').unwrap_or((target.trim(), ""));
    let Some((binding, raw_values)) = BINDINGS
        .iter()
        .filter(|binding| binding.http_method == method)
        .filter_map(|binding| {
            match_route(&binding.route_path, path).map(|values| (binding, values))
        })
        .min_by_key(|(binding, _)| binding.path_variables.len())
    else {
        return;
    };
    // As axum's path extractor: percent-decoded, refused when not UTF-8.
    let mut path_values = Vec::new();
    for (name, raw) in raw_values {
        let Some(value) = percent_decode(raw) else { return };
        path_values.push((name, value));
    }
    let query_pairs: Vec<(String, String)> =
        url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let if_match = headers
        .get(http::header::IF_MATCH)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = bytes::Bytes::copy_from_slice(body);
    let parts = RequestParts { path_values: path_values.clone(), query_pairs, if_match };
    match request_message(binding, &headers, &body, parts) {
        Err(error) => check_refusal(&error),
        Ok(message) => {
            let encoded = message.encode_to_vec();
            let decoded =
                prost_reflect::DynamicMessage::decode(binding.input.clone(), &encoded[..])
                    .unwrap_or_else(|error| {
                        panic!("{}: the gRPC side cannot decode it: {error}", binding.template)
                    });
            // Compared as JSON too: a NaN is not equal to itself.
            let json = crate::proto::json::message_to_json(&message);
            assert!(
                decoded == message || crate::proto::json::message_to_json(&decoded) == json,
                "{}: the message survives its encoding",
                binding.template
            );
            for (name, value) in &path_values {
                let Some(variable) =
                    binding.path_variables.iter().find(|variable| &variable.route_name == name)
                else {
                    continue;
                };
                check_path_value(&message, &variable.field_path, value);
            }
        }
    }
}

fn check_refusal(error: &ServiceError) {
    assert!(error.code.http_status().is_client_error(), "a refusal is a 4xx: {error:?}");
    assert!(!error.message.is_empty(), "{error:?}");
    if error.code == ErrorCode::ValidationError {
        assert!(!error.field_errors.is_empty(), "a 400 names its fields: {error:?}");
        for field_error in &error.field_errors {
            assert!(!field_error.field.is_empty() && !field_error.message.is_empty(), "{error:?}");
        }
    }
}

fn check_path_value(message: &prost_reflect::DynamicMessage, field_path: &[String], value: &str) {
    let Some((last, parents)) = field_path.split_last() else { return };
    let mut current = message.clone();
    for name in parents {
        let Some(next) =
            current.get_field_by_name(name).and_then(|field| field.as_message().cloned())
        else {
            panic!("the path field {name} is set");
        };
        current = next;
    }
    let Some(field) = prost_reflect::ReflectMessage::descriptor(&current).get_field_by_name(last)
    else {
        panic!("{last} is a field");
    };
    if matches!(field.kind(), prost_reflect::Kind::String) {
        assert_eq!(current.get_field(&field).as_str(), Some(value), "the path value lands as is");
    }
}

/// The path values of `path` under an axum route (`/api/v1/agents/{p0}`), raw.
fn match_route<'a>(route: &str, path: &'a str) -> Option<Vec<(String, &'a str)>> {
    let route_segments: Vec<&str> = route.split('/').collect();
    let path_segments: Vec<&str> = path.split('/').collect();
    if route_segments.len() != path_segments.len() {
        return None;
    }
    let mut values = Vec::new();
    for (pattern, segment) in route_segments.iter().zip(&path_segments) {
        match pattern.strip_prefix('{').and_then(|rest| rest.strip_suffix('}')) {
            Some(name) if !segment.is_empty() => values.push((name.to_owned(), *segment)),
            Some(_) => return None,
            None if pattern == segment => {}
            None => return None,
        }
    }
    Some(values)
}

fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |at: usize| bytes.get(at).and_then(|byte| (*byte as char).to_digit(16));
        match (bytes[index], hex(index + 1), hex(index + 2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push(u8::try_from(high * 16 + low).ok()?);
                index += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------------
// cron

/// Where the cron target starts looking for fire times when its input names no instant.
const CRON_FROM: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

/// Lines: a cron expression, a time zone (may be empty), optionally an instant in Unix seconds
/// (kept within 1970 to 2100). Checking a deployment's trigger never panics; a trigger it
/// accepts is stored as an expression and a zone that parse again to the same schedule and
/// fire again; the next fire is a whole second strictly after the instant, and nothing fires
/// in between.
pub fn cron(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let expression = lines.next().unwrap_or_default();
    let timezone = lines.next().unwrap_or_default();
    let from_seconds = lines
        .next()
        .and_then(|line| line.trim().parse::<i64>().ok())
        .map_or(CRON_FROM, |seconds| seconds.rem_euclid(4_102_444_800));
    let Some(from) = Utc.timestamp_opt(from_seconds, 0).single() else { return };

    let (expression_problem, timezone_problem) = schedule::check(expression, timezone);
    for problem in [&expression_problem, &timezone_problem].into_iter().flatten() {
        assert!(!problem.is_empty());
    }
    let parsed = Schedule::parse(expression, timezone);
    match &parsed {
        Ok(schedule) => {
            assert_eq!(schedule.expression(), expression.trim());
            assert!(timezone_problem.is_none(), "parsed with a bad zone");
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
    if parsed.is_err() {
        assert!(expression_problem.is_some() || timezone_problem.is_some(), "refused silently");
    }

    // The deployments' own check, as a create or update request runs it.
    let trigger = pb::DeploymentTrigger {
        r#type: pb::TriggerType::Cron as i32,
        cron_expression: expression.to_owned(),
        timezone: timezone.to_owned(),
        ..Default::default()
    };
    let mut validator = crate::service::validate::Validator::new();
    let requested = crate::service::deployments::check_trigger(
        &mut validator,
        Some(&trigger),
        std::time::Duration::from_secs(60),
    );
    let refused = validator.finish().is_err();
    match requested {
        Some(crate::service::deployments::RequestedTrigger::Cron { expression, timezone }) => {
            assert!(!refused, "accepted and refused at once");
            let stored = Schedule::parse(&expression, &timezone)
                .unwrap_or_else(|error| panic!("{expression:?} {timezone:?} as stored: {error}"));
            assert_eq!(stored.expression(), expression);
            assert_eq!(stored.timezone(), timezone);
            let stored_trigger = DeploymentTrigger::Cron { expression, timezone };
            let next = crate::service::deployments::next_run_time(&stored_trigger, Utc::now());
            assert!(next.is_some(), "an accepted schedule fires");
        }
        Some(_) => panic!("a CRON trigger came back as another type"),
        None => assert!(refused, "refused without saying why"),
    }

    // Only a schedule that fires is ever asked for its next fire (croner searches to the year
    // 5000 for one that does not).
    let (Ok(schedule), None) = (parsed, expression_problem) else { return };
    let Some(next) = schedule::next_after(&schedule, from) else { return };
    check_next_fire(&schedule, from, next);
    if let Some(after) = schedule::next_after(&schedule, next) {
        check_next_fire(&schedule, next, after);
    }
}

fn check_next_fire(schedule: &Schedule, from: DateTime<Utc>, next: DateTime<Utc>) {
    use chrono::Timelike;
    assert!(next > from, "{next} after {from}");
    assert_eq!(next.nanosecond(), 0, "a whole second");
    let between = from + (next - from) / 2;
    assert_eq!(schedule::next_after(schedule, between), Some(next), "nothing fires between");
    assert_eq!(
        schedule::next_after(schedule, next - chrono::Duration::milliseconds(1)),
        Some(next),
        "a moment before"
    );
}

// ---------------------------------------------------------------------------------------------
// runner_protocol

/// The limits the runner protocol target applies to outputs (the engine's defaults).
const FUZZ_MAX_JSON_DEPTH: usize = 32;
const FUZZ_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// A protobuf message off the runner stream, read both ways: as an `AttachRequest` (runner to
/// server) and as an `AttachResponse` (server to runner). Decoding, and what each side makes
/// of a message before it touches the store or runs a step, never panics: the messages about
/// one attempt share a lane; an outcome becomes a completion the store can keep (no NUL, within
/// the depth and size limits); an output crosses as the JSON it was; a result is fitted to the
/// message limit keeping its attempt; any deadline becomes an instant.
pub fn runner_protocol(data: &[u8]) {
    if let Ok(request) = pb::AttachRequest::decode(data)
        && let Some(message) = request.message
    {
        server_side(message);
    }
    if let Ok(response) = pb::AttachResponse::decode(data)
        && let Some(message) = response.message
    {
        runner_side(message);
    }
}

fn server_side(message: pb::attach_request::Message) {
    use crate::engine::protocol::{completion, lane_of};
    use pb::attach_request::Message;
    let lane = lane_of(&message);
    let step = match &message {
        Message::AssignmentAck(ack) => ack.step.clone(),
        Message::Started(started) => started.step.clone(),
        Message::Result(result) => result.step.clone(),
        Message::CancelAck(ack) => ack.step.clone(),
        Message::Hello(_) | Message::Logs(_) | Message::Heartbeat(_) | Message::Draining(_) => {
            assert_eq!(lane, None, "only messages about an attempt take a lane");
            None
        }
    };
    if lane.is_some() {
        let others = [
            Message::Started(pb::StepStarted { step: step.clone() }),
            Message::CancelAck(pb::CancelAck { step: step.clone() }),
            Message::Result(pb::StepResult { step: step.clone(), outcome: None }),
        ];
        for other in &others {
            assert_eq!(lane_of(other), lane, "one attempt, one lane");
        }
    }
    match message {
        Message::Result(result) => {
            match completion(result.outcome.as_ref(), FUZZ_MAX_JSON_DEPTH, FUZZ_MAX_PAYLOAD_BYTES) {
                Completion::Succeeded { output } => {
                    assert!(!wkt::json_contains_nul(&output));
                    assert!(wkt::json_depth(&output) <= FUZZ_MAX_JSON_DEPTH);
                    assert!(output.to_string().len() <= FUZZ_MAX_PAYLOAD_BYTES);
                    // What is stored reads back as itself through the wire form.
                    assert_eq!(wkt::value_to_json(&wkt::json_to_value(&output)), output);
                }
                Completion::Failed { error, .. } => {
                    assert!(!error.contains('\0'), "a NUL in a stored error");
                }
                Completion::TimedOut | Completion::Cancelled => {}
            }
            let limit = crate::runner::client::MIN_MESSAGE_BYTES
                + result
                    .step
                    .as_ref()
                    .map_or(0, |step| step.attempt.unsigned_abs() as usize % 20_000);
            check_fit(result, limit);
        }
        Message::Logs(batch) => {
            for line in &batch.lines {
                if let Some(time) = &line.time {
                    let _ = wkt::time_from_timestamp(time);
                }
            }
        }
        _ => {}
    }
}

fn check_fit(result: pb::StepResult, limit: usize) {
    let fitted = crate::runner::client::fit_result(result.clone(), limit);
    let budget = limit - crate::runner::client::MESSAGE_OVERHEAD_BYTES;
    assert_eq!(fitted.step, result.step, "the attempt it reports is kept");
    if result.encoded_len() <= budget {
        // Compared encoded: a NaN in an output is not equal to itself.
        assert_eq!(
            fitted.encode_to_vec(),
            result.encode_to_vec(),
            "a result that fits is unchanged"
        );
    } else if matches!(result.outcome, Some(pb::step_result::Outcome::Success(_)))
        // The attempt's reference is the server's (a UUID): only the outcome can be too big.
        && result.step.as_ref().is_none_or(|step| step.encoded_len() < 100)
    {
        assert!(fitted.encoded_len() <= budget, "{} > {budget}", fitted.encoded_len());
    }
}

fn runner_side(message: pb::attach_response::Message) {
    use pb::attach_response::Message;
    match message {
        Message::Assignment(assignment) => {
            if let Some(input) = &assignment.input {
                let json = wkt::value_to_json(input);
                let again = wkt::value_to_json(&wkt::json_to_value(&json));
                assert_eq!(again, json, "an input reads the same after one round");
            }
            if let Some(deadline) = &assignment.deadline {
                let _ = crate::runner::executors::StepWork::deadline_from_timestamp(deadline);
            }
        }
        Message::Accepted(_) | Message::Cancel(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// webhook_signature

/// "Now" for the webhook target: timestamps are judged against it.
const WEBHOOK_NOW: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
/// The tolerance deployments allow by default.
const WEBHOOK_TOLERANCE: std::time::Duration = std::time::Duration::from_secs(300);

/// Lines: the secret, `X-Turbocat-Timestamp`, `X-Turbocat-Delivery`, `X-Turbocat-Signature`
/// (`*` for the right signature, `-` for a missing header), then the body (the rest). A call is
/// accepted only with the signature made with the secret over exactly its timestamp, delivery
/// id and body, within the tolerance; no other split of the same signed bytes is accepted; a
/// changed byte or another secret is refused; the checks never panic.
pub fn webhook_signature(data: &[u8]) {
    use crate::service::deployments::{WebhookCall, verify_webhook_call, webhook_input};
    use crate::service::signing::{
        SIGNATURE_PREFIX, payload_readings, sign, signature_matches, signed_payload,
    };

    let mut fields = data.splitn(5, |byte| *byte == b'\n');
    let mut next_text = || fields.next().map(|field| std::str::from_utf8(field).ok());
    let (Some(Some(secret)), Some(Some(timestamp)), Some(Some(delivery)), Some(Some(given))) =
        (next_text(), next_text(), next_text(), next_text())
    else {
        return;
    };
    let body = data.splitn(5, |byte| *byte == b'\n').nth(4).unwrap_or_default();
    let Some(now) = Utc.timestamp_opt(WEBHOOK_NOW, 0).single() else { return };

    let payload = signed_payload(timestamp, delivery, body);
    let right = sign(secret, &payload);
    assert!(right.starts_with(SIGNATURE_PREFIX) && right.len() == SIGNATURE_PREFIX.len() + 64);
    let signature = if given == "*" { right.clone() } else { given.to_owned() };

    // The primitive: a signature matches exactly when it is the right one, in any spelling.
    let trimmed = signature.trim();
    let normalized = trimmed.strip_prefix(SIGNATURE_PREFIX).unwrap_or(trimmed).to_ascii_lowercase();
    let matches = signature_matches(secret, &payload, &signature);
    assert_eq!(matches, normalized == right[SIGNATURE_PREFIX.len()..], "{signature:?}");
    if matches {
        assert!(!signature_matches(&format!("{secret}x"), &payload, &signature), "another secret");
        let mut extended = payload.clone();
        extended.push(b' ');
        assert!(!signature_matches(secret, &extended, &signature), "a byte appended");
        if let Some(last) = payload.len().checked_sub(1) {
            let mut changed = payload.clone();
            changed[last] ^= 1;
            assert!(!signature_matches(secret, &changed, &signature), "a byte changed");
        }
    }

    // The whole check of a call.
    let absent = |text: &str| text == "-";
    let call = WebhookCall {
        signature: (!absent(given)).then_some(signature.as_str()),
        timestamp: (!absent(timestamp)).then_some(timestamp),
        delivery: (!absent(delivery)).then_some(delivery),
        body,
    };
    let accepted = |call: &WebhookCall<'_>| {
        verify_webhook_call(secret, call, WEBHOOK_TOLERANCE, now).is_ok()
            && webhook_input(call.body, 32).is_ok()
    };
    let verified = verify_webhook_call(secret, &call, WEBHOOK_TOLERANCE, now);
    if let Err(error) = &verified {
        assert_eq!(error.code, ErrorCode::Unauthorized, "{error:?}");
        return;
    }
    assert!(matches, "accepted with a signature that does not match");
    let seconds = timestamp.trim().parse::<i64>().unwrap_or_else(|_| panic!("{timestamp:?}"));
    assert!((WEBHOOK_NOW - seconds).unsigned_abs() <= WEBHOOK_TOLERANCE.as_secs());
    if !accepted(&call) {
        return;
    }
    // No other split of the signed bytes into timestamp, delivery id and body passes.
    for (other_timestamp, other_delivery, other_body) in payload_readings(&payload, 64) {
        if (other_timestamp, other_delivery, other_body) == (timestamp, delivery, body) {
            continue;
        }
        let other = WebhookCall {
            signature: Some(signature.as_str()),
            timestamp: Some(other_timestamp),
            delivery: Some(other_delivery),
            body: other_body,
        };
        assert!(
            !accepted(&other),
            "{other_timestamp:?} {other_delivery:?} passes as {timestamp:?} {delivery:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::TARGETS;

    fn fuzz_directory() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
    }

    fn files_in(directory: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(directory) else { return Vec::new() };
        let mut files: Vec<PathBuf> = entries
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.is_file())
            .filter(|path| path.file_name().is_some_and(|name| name != ".gitkeep"))
            .collect();
        files.sort();
        files
    }

    /// Every file of `directory` through `body`; the files whose run panicked, with the
    /// message.
    fn failures(body: fn(&[u8]), directory: &Path) -> Vec<String> {
        let mut failed = Vec::new();
        for file in files_in(directory) {
            let data = std::fs::read(&file).expect("read an input");
            if let Err(panic) = std::panic::catch_unwind(|| body(&data)) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                failed.push(format!("{}: {message}", file.display()));
            }
        }
        failed
    }

    /// The seed corpus and every crash input kept as a regression pass every target's body.
    #[test]
    fn every_seed_and_every_kept_crash_passes_its_target() {
        let root = fuzz_directory();
        let mut failed = Vec::new();
        for (name, body) in TARGETS {
            let seeds = root.join("corpus").join(name);
            assert!(!files_in(&seeds).is_empty(), "{name} has seeds in {}", seeds.display());
            failed.extend(failures(*body, &seeds));
            failed.extend(failures(*body, &root.join("regressions").join(name)));
        }
        assert!(failed.is_empty(), "inputs that break their target:\n{}", failed.join("\n"));
    }

    /// Every target has its cargo-fuzz file, and every file there is a target.
    #[test]
    fn every_target_has_its_fuzz_target_file() {
        let root = fuzz_directory();
        let mut files: Vec<String> = files_in(&root.join("fuzz_targets"))
            .iter()
            .filter_map(|path| path.file_stem().map(|stem| stem.to_string_lossy().into_owned()))
            .collect();
        files.sort();
        let mut names: Vec<String> = TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect();
        names.sort();
        assert_eq!(files, names);
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        for name in &names {
            let source =
                std::fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs")))
                    .expect("the target's file");
            assert!(
                source.contains(&format!("turbocat::fuzzing::{name}(")),
                "fuzz_targets/{name}.rs calls turbocat::fuzzing::{name}"
            );
            assert!(manifest.contains(&format!("name = \"{name}\"")), "fuzz/Cargo.toml has {name}");
        }
    }

    /// A body that panics fails the run, naming the file.
    #[test]
    fn a_panicking_input_is_reported_with_its_file() {
        let directory = tempfile::tempdir().expect("a temporary directory");
        std::fs::write(directory.path().join("crash-1"), b"boom").expect("write");
        std::fs::write(directory.path().join("fine"), b"ok").expect("write");
        fn body(data: &[u8]) {
            assert!(data != b"boom", "the crash");
        }
        let failed = failures(body, directory.path());
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("crash-1") && failed[0].contains("the crash"), "{failed:?}");
    }
}
