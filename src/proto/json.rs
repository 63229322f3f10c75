//! JSON <-> protobuf, driven by the message descriptors: the REST edge's request and response
//! bodies, and the proto-shaped JSON the store keeps (agent configs, template bodies), read and
//! written through `decode` and `encode`.
//!
//! Input is checked field by field before it is decoded, so every bad field is reported at
//! once with its lowerCamelCase path; enum values are accepted in any case and without their
//! type prefix (`code` for `AGENT_TYPE_CODE`). Output is proto3 JSON with two REST comforts:
//! enum values lose their type prefix, and absent fields appear with their default (`""`, `0`,
//! `false`, `[]`, `{}`) or `null` for an absent message.

use prost_reflect::{
    DeserializeOptions, DynamicMessage, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage, SerializeOptions,
};
use serde_json::{Map, Value};

use crate::error::FieldError;

/// The prefix every value of an enum carries by the STANDARD lint rules: `AGENT_TYPE_`.
pub fn enum_prefix(descriptor: &EnumDescriptor) -> String {
    let mut prefix = String::new();
    for (index, character) in descriptor.name().chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            prefix.push('_');
        }
        prefix.push(character.to_ascii_uppercase());
    }
    prefix.push('_');
    prefix
}

/// The REST name of an enum value: its proto name without the type prefix.
pub fn short_enum_name(descriptor: &EnumDescriptor, full_name: &str) -> String {
    let prefix = enum_prefix(descriptor);
    full_name.strip_prefix(prefix.as_str()).unwrap_or(full_name).to_owned()
}

fn is_well_known(message: &MessageDescriptor) -> bool {
    message.full_name().starts_with("google.protobuf.")
}

fn join_path(parent: &str, child: &str) -> String {
    if parent.is_empty() { child.to_owned() } else { format!("{parent}.{child}") }
}

fn find_field(message: &MessageDescriptor, key: &str) -> Option<FieldDescriptor> {
    message.get_field_by_json_name(key).or_else(|| message.get_field_by_name(key))
}

/// Decodes a JSON value into `descriptor`'s message, reporting every bad field.
pub fn message_from_json(
    descriptor: &MessageDescriptor,
    mut value: Value,
) -> Result<DynamicMessage, Vec<FieldError>> {
    let mut errors = Vec::new();
    check_message(descriptor, &mut value, "", &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(descriptor.clone(), value, &options).map_err(|error| {
        let message = error.to_string();
        vec![FieldError::new("body", message)]
    })
}

/// Reads proto3 JSON (with the REST comforts) into the generated message `T`, whose full name
/// in the contract is `full_name` (e.g. `turbocat.v1.AgentConfig`); every bad field is reported
/// with its lowerCamelCase path.
pub fn decode<T: prost::Message + Default>(
    full_name: &str,
    value: Value,
) -> Result<T, Vec<FieldError>> {
    let Some(descriptor) = crate::proto::descriptor_pool().get_message_by_name(full_name) else {
        return Err(vec![FieldError::new("body", format!("unknown message type {full_name}"))]);
    };
    let message = message_from_json(&descriptor, value)?;
    message.transcode_to::<T>().map_err(|error| vec![FieldError::new("body", error.to_string())])
}

/// Writes the generated message `T` (named `full_name` in the contract) as REST JSON: enum
/// values without their prefix, absent fields with their defaults.
pub fn encode<T: prost::Message>(full_name: &str, message: &T) -> Value {
    let Some(descriptor) = crate::proto::descriptor_pool().get_message_by_name(full_name) else {
        return Value::Null;
    };
    let mut dynamic = DynamicMessage::new(descriptor);
    match dynamic.transcode_from(message) {
        Ok(()) => message_to_json(&dynamic),
        Err(_) => Value::Null,
    }
}

fn check_message(
    descriptor: &MessageDescriptor,
    value: &mut Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    let field_name = if path.is_empty() { "body" } else { path };
    let Value::Object(object) = value else {
        if !value.is_null() {
            errors.push(FieldError::new(field_name, "must be a JSON object"));
        }
        return;
    };
    for (key, field_value) in object.iter_mut() {
        let field_path = join_path(path, key);
        let Some(field) = find_field(descriptor, key) else {
            errors.push(FieldError::new(field_path, "unknown field"));
            continue;
        };
        if field_value.is_null() {
            continue;
        }
        if field.is_list() {
            let Value::Array(items) = field_value else {
                errors.push(FieldError::new(field_path, "must be an array"));
                continue;
            };
            for (index, item) in items.iter_mut().enumerate() {
                check_single(&field, item, &format!("{field_path}[{index}]"), errors);
            }
        } else if field.is_map() {
            let Value::Object(entries) = field_value else {
                errors.push(FieldError::new(field_path, "must be a JSON object"));
                continue;
            };
            let Kind::Message(entry) = field.kind() else { continue };
            let value_field = entry.map_entry_value_field();
            for (entry_key, entry_value) in entries.iter_mut() {
                check_single(
                    &value_field,
                    entry_value,
                    &format!("{field_path}.{entry_key}"),
                    errors,
                );
            }
        } else {
            check_single(&field, field_value, &field_path, errors);
        }
    }
}

fn check_single(
    field: &FieldDescriptor,
    value: &mut Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    match field.kind() {
        Kind::Message(message) => {
            if is_well_known(&message) {
                check_well_known(&message, value, path, errors);
            } else {
                check_message(&message, value, path, errors);
            }
        }
        Kind::Enum(enumeration) => normalize_enum_input(&enumeration, value, path, errors),
        Kind::String => {
            if !value.is_string() {
                errors.push(FieldError::new(path, "must be a string"));
            }
        }
        Kind::Bool => {
            if !value.is_boolean() {
                errors.push(FieldError::new(path, "must be true or false"));
            }
        }
        Kind::Bytes => {
            if !value.is_string() {
                errors.push(FieldError::new(path, "must be a base64 string"));
            }
        }
        Kind::Double | Kind::Float => {
            let numeric =
                value.is_number() || value.as_str().is_some_and(|text| text.parse::<f64>().is_ok());
            if !numeric {
                errors.push(FieldError::new(path, "must be a number"));
            }
        }
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            check_integer(value, path, errors, i64::from(i32::MIN), i64::from(i32::MAX))
        }
        Kind::Uint32 | Kind::Fixed32 => check_integer(value, path, errors, 0, i64::from(u32::MAX)),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            check_integer(value, path, errors, i64::MIN, i64::MAX)
        }
    }
}

/// A well-known type (`Timestamp`, `Duration`, `Struct`, …) read by prost-reflect's own proto3
/// JSON rules, one field at a time, so a bad value is reported on its field and not on the
/// whole body.
fn check_well_known(
    message: &MessageDescriptor,
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Err(error) = DynamicMessage::deserialize(message.clone(), value) {
        errors.push(FieldError::new(path, error.to_string()));
    }
}

fn check_integer(
    value: &Value,
    path: &str,
    errors: &mut Vec<FieldError>,
    minimum: i64,
    maximum: i64,
) {
    let parsed = match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.parse::<i64>().ok(),
        _ => None,
    };
    match parsed {
        Some(integer) if (minimum..=maximum).contains(&integer) => {}
        Some(_) => errors.push(FieldError::new(path, "is out of range")),
        None => errors.push(FieldError::new(path, "must be an integer")),
    }
}

fn normalize_enum_input(
    enumeration: &EnumDescriptor,
    value: &mut Value,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if enumeration.full_name() == "google.protobuf.NullValue" {
        return;
    }
    let Value::String(text) = value else {
        errors.push(FieldError::new(path, format!("must be one of {}", enum_choices(enumeration))));
        return;
    };
    let upper = text.to_ascii_uppercase();
    let prefixed = format!("{}{upper}", enum_prefix(enumeration));
    let found = enumeration
        .get_value_by_name(&prefixed)
        .or_else(|| enumeration.get_value_by_name(&upper))
        .filter(|found| found.number() != 0);
    match found {
        Some(found) => *value = Value::String(found.name().to_owned()),
        None => errors
            .push(FieldError::new(path, format!("must be one of {}", enum_choices(enumeration)))),
    }
}

fn enum_choices(enumeration: &EnumDescriptor) -> String {
    enumeration
        .values()
        .filter(|value| value.number() != 0)
        .map(|value| short_enum_name(enumeration, value.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Encodes a message as REST JSON.
pub fn message_to_json(message: &DynamicMessage) -> Value {
    let options = SerializeOptions::new().skip_default_fields(true).stringify_64_bit_integers(true);
    let mut value = message
        .serialize_with_options(serde_json::value::Serializer, &options)
        .unwrap_or(Value::Null);
    present_message(&message.descriptor(), &mut value);
    value
}

fn present_message(descriptor: &MessageDescriptor, value: &mut Value) {
    let Value::Object(object) = value else { return };
    for field in descriptor.fields() {
        let key = field.json_name();
        match object.get_mut(key) {
            Some(field_value) => present_field(&field, field_value),
            None => {
                if field.containing_oneof().is_none() {
                    object.insert(key.to_owned(), default_json(&field));
                }
            }
        }
    }
}

fn present_field(field: &FieldDescriptor, value: &mut Value) {
    if field.is_list() {
        if let Value::Array(items) = value {
            for item in items {
                present_single(field, item);
            }
        }
    } else if field.is_map() {
        let Kind::Message(entry) = field.kind() else { return };
        let value_field = entry.map_entry_value_field();
        if let Value::Object(entries) = value {
            for entry_value in entries.values_mut() {
                present_single(&value_field, entry_value);
            }
        }
    } else {
        present_single(field, value);
    }
}

fn present_single(field: &FieldDescriptor, value: &mut Value) {
    match field.kind() {
        Kind::Message(message) if is_json_value(&message) => integral_numbers_as_integers(value),
        Kind::Message(message) if !is_well_known(&message) => present_message(&message, value),
        Kind::Enum(enumeration) => {
            if let Value::String(name) = value {
                *name = short_enum_name(&enumeration, name);
            }
        }
        _ => {}
    }
}

fn is_json_value(message: &MessageDescriptor) -> bool {
    matches!(
        message.full_name(),
        "google.protobuf.Value" | "google.protobuf.Struct" | "google.protobuf.ListValue"
    )
}

/// `google.protobuf.Value` keeps every number as a double; JSON written by people has `50`,
/// not `50.0`, so whole numbers within the exact range of a double go back to integers.
fn integral_numbers_as_integers(value: &mut Value) {
    const EXACT_LIMIT: f64 = 9_007_199_254_740_992.0;
    match value {
        Value::Number(number) => {
            if let Some(float) = number.as_f64()
                && number.as_i64().is_none()
                && float.fract() == 0.0
                && float.abs() < EXACT_LIMIT
            {
                #[expect(
                    clippy::cast_possible_truncation,
                    reason = "checked integral and in range"
                )]
                let integer = float as i64;
                *value = Value::from(integer);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        Value::Object(object) => object.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

fn default_json(field: &FieldDescriptor) -> Value {
    if field.is_list() {
        return Value::Array(Vec::new());
    }
    if field.is_map() {
        return Value::Object(Map::new());
    }
    match field.kind() {
        Kind::Message(_) => Value::Null,
        Kind::Enum(enumeration) => {
            let zero = enumeration.default_value();
            Value::String(short_enum_name(&enumeration, zero.name()))
        }
        Kind::String | Kind::Bytes => Value::String(String::new()),
        Kind::Bool => Value::Bool(false),
        Kind::Double | Kind::Float => Value::from(0.0),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            Value::String("0".into())
        }
        _ => Value::from(0),
    }
}

/// Converts one query-string or path value to the JSON the field expects.
pub fn scalar_from_text(
    field: &FieldDescriptor,
    text: &str,
    path: &str,
) -> Result<Value, FieldError> {
    let value = match field.kind() {
        Kind::Bool => match text.to_ascii_lowercase().as_str() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(FieldError::new(path, "must be true or false")),
        },
        Kind::Double | Kind::Float => text
            .parse::<f64>()
            .map(Value::from)
            .map_err(|_| FieldError::new(path, "must be a number"))?,
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => text
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| FieldError::new(path, "must be an integer"))?,
        Kind::Message(message) if !is_well_known(&message) => {
            return Err(FieldError::new(path, "cannot be given in the URL"));
        }
        _ => Value::String(text.to_owned()),
    };
    Ok(value)
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_messages_round_trip_through_rest_json() {
        use crate::proto::v1 as pb;
        let config: pb::AgentConfig = super::decode(
            "turbocat.v1.AgentConfig",
            serde_json::json!({ "code": { "language": "python", "source": "print(1)" } }),
        )
        .expect("decodes");
        let Some(pb::agent_config::Kind::Code(code)) = &config.kind else {
            panic!("a code config: {config:?}");
        };
        assert_eq!(code.source, "print(1)");
        let json = super::encode("turbocat.v1.AgentConfig", &config);
        assert_eq!(json["code"]["language"], "PYTHON");
        let errors = super::decode::<pb::AgentConfig>(
            "turbocat.v1.AgentConfig",
            serde_json::json!({ "code": { "language": "cobol", "sourc": 1 } }),
        )
        .expect_err("two bad fields");
        let fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        assert!(fields.contains(&"code.language") && fields.contains(&"code.sourc"), "{fields:?}");
    }

    use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, Value as ReflectValue};
    use serde_json::json;

    use super::{message_from_json, message_to_json};

    fn descriptor(name: &str) -> MessageDescriptor {
        let pool = DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).expect("pool");
        pool.get_message_by_name(name).expect("message")
    }

    #[test]
    fn enum_input_is_accepted_in_any_case_with_or_without_prefix() {
        let agent = descriptor("turbocat.v1.Agent");
        for spelling in ["code", "CODE", "Code", "AGENT_TYPE_CODE", "agent_type_code"] {
            let message = message_from_json(&agent, json!({ "type": spelling })).expect(spelling);
            let value = message.get_field_by_name("type").expect("type");
            assert_eq!(value.as_enum_number(), Some(1), "{spelling} is AGENT_TYPE_CODE");
        }
        let errors =
            message_from_json(&agent, json!({ "type": "robot" })).expect_err("unknown value");
        assert_eq!(errors[0].field, "type");
        assert_eq!(errors[0].message, "must be one of CODE, API, LLM, DATA, WORKFLOW");
        let errors =
            message_from_json(&agent, json!({ "type": "unspecified" })).expect_err("zero value");
        assert_eq!(errors[0].field, "type");
    }

    /// Found by `api::rest::properties`: a well-known type of the wrong shape was reported on
    /// `body`, not on its field.
    #[test]
    fn a_bad_well_known_value_is_reported_on_its_field() {
        let deployment = descriptor("turbocat.v1.Deployment");
        let errors = message_from_json(&deployment, json!({ "lastTriggeredAt": false }))
            .expect_err("not a timestamp");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "lastTriggeredAt");
        assert!(errors[0].message.contains("timestamp"), "{errors:?}");
        let errors = message_from_json(
            &deployment,
            json!({ "lastTriggeredAt": "2026-13-45T99:00:00Z", "name": 3 }),
        )
        .expect_err("no such time");
        let mut fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(fields, vec!["lastTriggeredAt", "name"]);
        let accepted =
            message_from_json(&deployment, json!({ "lastTriggeredAt": "2026-01-01T00:00:00Z" }));
        assert!(accepted.is_ok(), "{accepted:?}");
    }

    #[test]
    fn every_bad_field_is_reported_with_its_path() {
        let agent = descriptor("turbocat.v1.Agent");
        let errors = message_from_json(
            &agent,
            json!({
                "name": 7,
                "tags": "not-a-list",
                "version": 9_999_999_999_i64,
                "config": { "code": { "language": "cobol", "sauce": "x" } },
                "limits": { "memoryMb": "lots" },
                "colour": "blue",
            }),
        )
        .expect_err("invalid");
        let mut fields: Vec<&str> = errors.iter().map(|error| error.field.as_str()).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            vec![
                "colour",
                "config.code.language",
                "config.code.sauce",
                "limits.memoryMb",
                "name",
                "tags",
                "version"
            ]
        );
        let version_error = errors.iter().find(|error| error.field == "version").expect("version");
        assert_eq!(version_error.message, "is out of range");
    }

    #[test]
    fn well_known_types_follow_proto3_json() {
        let step = descriptor("turbocat.v1.WorkflowStep");
        let message = message_from_json(
            &step,
            json!({ "key": "a", "timeout": "1.5s", "inputMapping": {"x": "{{input.y}}", "n": [1, true]} }),
        )
        .expect("valid");
        let output = message_to_json(&message);
        assert_eq!(output["timeout"], "1.500s");
        assert_eq!(output["inputMapping"], json!({"x": "{{input.y}}", "n": [1, true]}));
        let fractional =
            message_from_json(&step, json!({ "inputMapping": {"f": 2.5} })).expect("valid");
        assert_eq!(message_to_json(&fractional)["inputMapping"], json!({"f": 2.5}));
        let errors =
            message_from_json(&step, json!({ "timeout": "soon" })).expect_err("bad duration");
        assert!(errors[0].message.contains("duration") || errors[0].field == "body", "{errors:?}");
    }

    #[test]
    fn output_strips_enum_prefixes_and_shows_defaults() {
        let agent = descriptor("turbocat.v1.Agent");
        let mut message = DynamicMessage::new(agent.clone());
        message.set_field_by_name("name", ReflectValue::String("scraper".into()));
        message.set_field_by_name("type", ReflectValue::EnumNumber(3));
        message.set_field_by_name("status", ReflectValue::EnumNumber(2));
        let output = message_to_json(&message);
        assert_eq!(output["type"], "LLM");
        assert_eq!(output["status"], "RUNNING");
        assert_eq!(output["description"], "");
        assert_eq!(output["tags"], json!([]));
        assert_eq!(output["version"], 0);
        assert_eq!(output["createdAt"], serde_json::Value::Null);
        let created =
            message_from_json(&agent, json!({"createdAt": "2026-01-02T03:04:05Z"})).expect("time");
        assert_eq!(message_to_json(&created)["createdAt"], "2026-01-02T03:04:05Z");
    }
}
