//! The REST envelope: `{success, data, meta}` on success and `{success, error, meta}` on failure,
//! with `meta.timestamp` (RFC 3339) and `meta.requestId`.

use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::error::ServiceError;

/// The request id the request-id layer put on the request (or made up).
pub fn request_id_of(headers: &http::HeaderMap) -> String {
    headers
        .get(crate::auth::caller::REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default()
}

fn meta(request_id: &str) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert(
        "timestamp".into(),
        Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
    );
    meta.insert("requestId".into(), Value::String(request_id.to_owned()));
    meta
}

/// A success envelope. `pagination`, when given, lands in `meta.pagination`.
pub fn success(
    status: http::StatusCode,
    data: Value,
    pagination: Option<Value>,
    request_id: &str,
) -> Response {
    let mut meta = meta(request_id);
    if let Some(pagination) = pagination {
        meta.insert("pagination".into(), pagination);
    }
    let body = json!({ "success": true, "data": data, "meta": meta });
    (status, axum::Json(body)).into_response()
}

/// The JSON value of an error envelope (also used inside Server-Sent Events).
pub fn error_body(error: &ServiceError, request_id: &str) -> Value {
    let mut details: Vec<Value> = error
        .field_errors
        .iter()
        .map(|field_error| json!({ "field": field_error.field, "message": field_error.message }))
        .collect();
    if !error.metadata.is_empty() {
        let mut facts = Map::new();
        let mut keys: Vec<&String> = error.metadata.keys().collect();
        keys.sort();
        for key in keys {
            let raw = &error.metadata[key];
            // Numbers travel as strings in ErrorInfo metadata; give them back as numbers.
            let value =
                raw.parse::<i64>().map(Value::from).unwrap_or_else(|_| Value::String(raw.clone()));
            facts.insert(key.clone(), value);
        }
        details.push(Value::Object(facts));
    }
    json!({
        "success": false,
        "error": { "code": error.code.as_str(), "message": error.message, "details": details },
        "meta": meta(request_id),
    })
}

/// An error envelope with the status of its code (and `Retry-After` when there is one).
pub fn error(error: &ServiceError, request_id: &str) -> Response {
    let mut response =
        (error.code.http_status(), axum::Json(error_body(error, request_id))).into_response();
    if let Some(retry_after) = error.retry_after {
        let seconds = retry_after.as_secs().max(1);
        if let Ok(value) = http::HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(http::header::RETRY_AFTER, value);
        }
    }
    response
}
