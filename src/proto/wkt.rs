//! Protobuf well-known types <-> Rust and JSON values: `Timestamp` <-> `chrono`, `Struct` and
//! `Value` <-> `serde_json`. Pure code that every layer may use (server, engine, runner).
//! May call: nothing but prost-types, chrono and serde_json.

use chrono::{DateTime, Utc};

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn optional_timestamp(time: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    time.map(timestamp)
}

/// A JSON object as a protobuf `Struct` (anything else becomes an empty struct).
pub fn json_object_to_struct(value: &serde_json::Value) -> prost_types::Struct {
    let mut fields = std::collections::BTreeMap::new();
    if let serde_json::Value::Object(object) = value {
        for (key, item) in object {
            fields.insert(key.clone(), json_to_value(item));
        }
    }
    prost_types::Struct { fields }
}

pub fn json_to_value(value: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(flag) => Kind::BoolValue(*flag),
        serde_json::Value::Number(number) => Kind::NumberValue(number.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(text) => Kind::StringValue(text.clone()),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_value).collect(),
        }),
        serde_json::Value::Object(_) => Kind::StructValue(json_object_to_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn struct_to_json(value: &prost_types::Struct) -> serde_json::Value {
    serde_json::Value::Object(
        value.fields.iter().map(|(key, item)| (key.clone(), value_to_json(item))).collect(),
    )
}

pub fn value_to_json(value: &prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(flag)) => serde_json::Value::Bool(*flag),
        Some(Kind::NumberValue(number)) => number_to_json(*number),
        Some(Kind::StringValue(text)) => serde_json::Value::String(text.clone()),
        Some(Kind::ListValue(list)) => {
            serde_json::Value::Array(list.values.iter().map(value_to_json).collect())
        }
        Some(Kind::StructValue(object)) => struct_to_json(object),
    }
}

/// A protobuf number (always a double) as JSON: whole numbers that a double holds exactly come
/// back as integers (`4`, not `4.0`), so code that reads them sees the integer it was given.
pub fn number_to_json(number: f64) -> serde_json::Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if number.fract() == 0.0 && number.abs() < EXACT {
        #[expect(clippy::cast_possible_truncation, reason = "whole and below 2^53: exact")]
        return serde_json::Value::from(number as i64);
    }
    serde_json::Number::from_f64(number)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// How deep a JSON value nests: a scalar is 1, `[1]` is 2, `{"a": [1]}` is 3. Each level is
/// two levels of protobuf messages (`Value` holding a `Struct` or a `ListValue`), and gRPC
/// decoders refuse messages nested past 100: what crosses the transport must stay well below.
pub fn json_depth(value: &serde_json::Value) -> usize {
    nesting(value, 1, 1)
}

/// How many protobuf messages deep a JSON value becomes as a `google.protobuf.Value`: a
/// scalar is 1, a list adds 2 (`Value`, `ListValue`), an object 3 (`Value`, `Struct`, the map
/// entry). gRPC decoders refuse a message nested past 100, whatever carries it.
pub fn json_proto_depth(value: &serde_json::Value) -> usize {
    nesting(value, 2, 3)
}

/// The depth of `value` when a scalar counts 1 and each list and object level adds `per_list`
/// and `per_object`. Iterative: a value deep enough to matter here must not exhaust the stack.
fn nesting(value: &serde_json::Value, per_list: usize, per_object: usize) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 1usize)];
    while let Some((item, depth)) = pending.pop() {
        deepest = deepest.max(depth);
        match item {
            serde_json::Value::Array(items) => {
                pending.extend(items.iter().map(|child| (child, depth + per_list)));
            }
            serde_json::Value::Object(fields) => {
                pending.extend(fields.values().map(|child| (child, depth + per_object)));
            }
            _ => {}
        }
    }
    deepest
}

/// Whether any string or key of a JSON value holds a NUL character, which PostgreSQL cannot
/// store in text or JSON.
pub fn json_contains_nul(value: &serde_json::Value) -> bool {
    let mut pending = vec![value];
    while let Some(item) = pending.pop() {
        match item {
            serde_json::Value::String(text) if text.contains('\0') => return true,
            serde_json::Value::Array(items) => pending.extend(items.iter()),
            serde_json::Value::Object(fields) => {
                if fields.keys().any(|key| key.contains('\0')) {
                    return true;
                }
                pending.extend(fields.values());
            }
            _ => {}
        }
    }
    false
}

/// A protobuf timestamp as a time, `None` when it is out of range.
pub fn time_from_timestamp(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_and_nul_characters_of_json_values() {
        assert_eq!(json_depth(&serde_json::json!(1)), 1);
        assert_eq!(json_depth(&serde_json::json!([])), 1);
        assert_eq!(json_depth(&serde_json::json!({"a": [1], "b": 2})), 3);
        let mut deep = serde_json::json!(0);
        for _ in 0..1_000 {
            deep = serde_json::json!([deep]);
        }
        assert_eq!(json_depth(&deep), 1_001);
        assert_eq!(json_proto_depth(&deep), 2_001);
        assert_eq!(json_proto_depth(&serde_json::json!({"a": [1]})), 6);
        assert!(json_contains_nul(&serde_json::json!({"a": ["x\0y"]})));
        assert!(json_contains_nul(&serde_json::json!({"k\0": 1})));
        assert!(!json_contains_nul(&serde_json::json!({"a": ["xy", 1, null]})));
    }
}
