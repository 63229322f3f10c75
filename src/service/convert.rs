//! Store rows -> proto messages (and the few conversions back).

use chrono::{DateTime, Utc};

use crate::proto::v1 as pb;
use crate::store;

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub fn optional_timestamp(time: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    time.map(timestamp)
}

pub fn user_role(role: store::UserRole) -> pb::UserRole {
    match role {
        store::UserRole::Admin => pb::UserRole::Admin,
        store::UserRole::User => pb::UserRole::User,
        store::UserRole::Agent => pb::UserRole::Agent,
    }
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

/// A user as the API shows it: never the password hash.
pub fn user(user: &store::User) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        full_name: user.full_name.clone(),
        avatar_url: user.avatar_url.clone().unwrap_or_default(),
        role: user_role(user.role).into(),
        preferences: Some(json_object_to_struct(&user.preferences)),
        last_login_at: optional_timestamp(user.last_login_at),
        created_at: Some(timestamp(user.created_at)),
        updated_at: Some(timestamp(user.updated_at)),
        version: i32::try_from(user.version).unwrap_or(i32::MAX),
    }
}

/// A proto role as the store knows it; `None` for `UNSPECIFIED` and unknown numbers.
pub fn user_role_from_proto(role: i32) -> Option<store::UserRole> {
    match pb::UserRole::try_from(role).ok()? {
        pb::UserRole::Admin => Some(store::UserRole::Admin),
        pb::UserRole::User => Some(store::UserRole::User),
        pb::UserRole::Agent => Some(store::UserRole::Agent),
        pb::UserRole::Unspecified => None,
    }
}

pub fn api_key_scope(scope: store::ApiKeyScope) -> pb::ApiKeyScope {
    match scope {
        store::ApiKeyScope::Runner => pb::ApiKeyScope::Runner,
        store::ApiKeyScope::Read => pb::ApiKeyScope::Read,
        store::ApiKeyScope::Write => pb::ApiKeyScope::Write,
    }
}

/// A proto scope as the store knows it; `None` for `UNSPECIFIED` and unknown numbers.
pub fn api_key_scope_from_proto(scope: i32) -> Option<store::ApiKeyScope> {
    match pb::ApiKeyScope::try_from(scope).ok()? {
        pb::ApiKeyScope::Runner => Some(store::ApiKeyScope::Runner),
        pb::ApiKeyScope::Read => Some(store::ApiKeyScope::Read),
        pb::ApiKeyScope::Write => Some(store::ApiKeyScope::Write),
        pb::ApiKeyScope::Unspecified => None,
    }
}

/// An API key as the API shows it: its prefix, never its hash or secret.
pub fn api_key(api_key: &store::ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: api_key.id.to_string(),
        name: api_key.name.clone(),
        prefix: api_key.key_prefix.clone(),
        scopes: api_key.scopes.iter().map(|scope| api_key_scope(*scope).into()).collect(),
        shared: api_key.shared,
        expires_at: optional_timestamp(api_key.expires_at),
        last_used_at: optional_timestamp(api_key.last_used_at),
        created_at: Some(timestamp(api_key.created_at)),
    }
}

/// The position of a numbered page among `total` matching rows.
pub fn pagination(page: store::PageRequest, total: i64) -> pb::Pagination {
    let page_size = i64::from(page.page_size.max(1));
    let total_pages = (total.max(0) + page_size - 1) / page_size;
    pb::Pagination {
        page: i32::try_from(page.page).unwrap_or(i32::MAX),
        page_size: i32::try_from(page.page_size).unwrap_or(i32::MAX),
        total: i32::try_from(total).unwrap_or(i32::MAX),
        total_pages: i32::try_from(total_pages).unwrap_or(i32::MAX),
        next_cursor: String::new(),
    }
}

/// A protobuf timestamp as a time, `None` when it is out of range.
pub fn time_from_timestamp(timestamp: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    DateTime::from_timestamp(timestamp.seconds, nanos)
}
