//! API agents: one HTTP request built from the agent's templates, rendered against
//! `{"input": <step input>}` (`https://api.example.com/users/{{input.id}}`).
//!
//! The output is `{status, headers, body}`: `headers` maps each lowercase name to its value
//! (repeated headers joined by ", "), `body` is the parsed JSON when the response says it is
//! JSON (`application/json`, `…+json`), else the text. A non-2xx status fails the step:
//! retryable for 5xx and 429, not retryable otherwise. Redirects (at most 5) are followed only
//! to URLs that pass the SSRF guard again; every header the agent configured is dropped when a
//! redirect leaves the origin (any of them may be a credential: `x-auth-token`). The response
//! body may not exceed the agent's `maxOutputBytes`. URLs are logged without their
//! credentials (`https://user:password@host` shows as `https://host`).
//! May call: `crate::mapping`, `crate::ssrf`, reqwest.

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use url::Url;

use super::{RunContext, StepError, StepErrorKind, positive_duration};
use crate::mapping;
use crate::proto::v1 as pb;
use crate::ssrf;
use crate::text::truncate_text;

/// Redirects followed at most.
const MAX_REDIRECTS: usize = 5;
/// Headers whose values are marked sensitive (kept out of debug output).
const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "cookie", "proxy-authorization", "x-api-key"];

/// An HTTP request ready to send.
struct PreparedRequest {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<String>,
}

pub(super) async fn run(
    config: &pb::ApiAgentConfig,
    input: &Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let request = prepare(config, input)?;
    let deadline = match config.timeout.as_ref().and_then(positive_duration) {
        Some(timeout) => context.deadline.min(Instant::now() + timeout),
        None => context.deadline,
    };
    context.logs.system(&format!("{} {}", request.method, loggable_url(&request.url))).await;
    let sending = send_following_redirects(request, config.allow_private_network, context);
    let response = match tokio::time::timeout_at(deadline, sending).await {
        Ok(response) => response?,
        Err(_) => return Err(request_timed_out(deadline, context)),
    };
    let status = response.status();
    let headers = headers_to_json(response.headers());
    let is_json = is_json_response(response.headers());
    let reading = read_limited_body(response, context.limits.max_output_bytes);
    let body_bytes = match tokio::time::timeout_at(deadline, reading).await {
        Ok(body) => body?,
        Err(_) => return Err(request_timed_out(deadline, context)),
    };
    context
        .logs
        .system(&format!("answered {} with {} bytes", status.as_u16(), body_bytes.len()))
        .await;
    let body = decode_body(&body_bytes, is_json);
    if !status.is_success() {
        return Err(status_failure(status, &body));
    }
    Ok(json!({ "status": status.as_u16(), "headers": headers, "body": body }))
}

fn request_timed_out(deadline: Instant, context: &RunContext<'_>) -> StepError {
    if deadline < context.deadline {
        StepError::new(StepErrorKind::TimedOut, "the HTTP request exceeded the agent's timeout")
    } else {
        context.timed_out()
    }
}

fn prepare(config: &pb::ApiAgentConfig, input: &Value) -> Result<PreparedRequest, StepError> {
    let scope = json!({ "input": input });
    let render = |field: &str, template: &str| {
        mapping::render_text(template, &scope)
            .map_err(|error| StepError::non_retryable(format!("{field}: {error}")))
    };
    let url_text = render("urlTemplate", &config.url_template)?;
    let url = Url::parse(url_text.trim()).map_err(|error| {
        StepError::non_retryable(format!(
            "urlTemplate: `{}` is not a URL: {error}",
            truncate_text(&url_text, 200)
        ))
    })?;
    let mut headers = HeaderMap::new();
    for (name, template) in &config.headers {
        let value = render(&format!("headers.{name}"), template)?;
        let header_name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
            StepError::non_retryable(format!("headers: `{name}` is not a header name"))
        })?;
        let mut header_value = HeaderValue::from_str(&value).map_err(|_| {
            StepError::non_retryable(format!("headers.{name}: the value is not a header value"))
        })?;
        header_value.set_sensitive(CREDENTIAL_HEADERS.contains(&header_name.as_str()));
        headers.append(header_name, header_value);
    }
    let body = if config.body_template.is_empty() {
        None
    } else {
        Some(render("bodyTemplate", &config.body_template)?)
    };
    if let Some(body) = &body
        && !headers.contains_key(CONTENT_TYPE)
        && serde_json::from_str::<Value>(body).is_ok()
    {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let method = match pb::HttpMethod::try_from(config.method).unwrap_or_default() {
        pb::HttpMethod::Unspecified | pb::HttpMethod::Get => Method::GET,
        pb::HttpMethod::Post => Method::POST,
        pb::HttpMethod::Put => Method::PUT,
        pb::HttpMethod::Patch => Method::PATCH,
        pb::HttpMethod::Delete => Method::DELETE,
    };
    Ok(PreparedRequest { method, url, headers, body })
}

/// A URL as logs show it: without the user name and password it may carry.
pub(super) fn loggable_url(url: &Url) -> String {
    if url.username().is_empty() && url.password().is_none() {
        return url.to_string();
    }
    let mut shown = url.clone();
    // Only URLs that cannot carry credentials refuse these, and they carry none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.to_string()
}

/// The SSRF verdict on a URL as a step failure.
pub(super) fn ssrf_failure(error: ssrf::SsrfError) -> StepError {
    if error.is_retryable() {
        StepError::retryable(error.to_string())
    } else {
        StepError::non_retryable(error.to_string())
    }
}

/// A failure to get an answer at all (connection refused, reset, TLS): retryable.
pub(super) fn transport_failure(error: &reqwest::Error) -> StepError {
    let mut message = format!("the request failed: {error}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    StepError::retryable(message)
}

async fn send_following_redirects(
    mut request: PreparedRequest,
    allow_private_network: bool,
    context: &RunContext<'_>,
) -> Result<reqwest::Response, StepError> {
    for _ in 0..=MAX_REDIRECTS {
        let addresses =
            ssrf::vet_url(&request.url, allow_private_network).await.map_err(ssrf_failure)?;
        let client = ssrf::pinned_client(&request.url, &addresses).map_err(StepError::retryable)?;
        let mut builder = client
            .request(request.method.clone(), request.url.clone())
            .headers(request.headers.clone());
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let response = builder.send().await.map_err(|error| transport_failure(&error))?;
        let status = response.status();
        if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        let Some(location) = response.headers().get(LOCATION).and_then(|value| value.to_str().ok())
        else {
            return Ok(response);
        };
        let next_url = request.url.join(location).map_err(|error| {
            StepError::non_retryable(format!("redirect to an invalid location: {error}"))
        })?;
        context
            .logs
            .system(&format!("redirected ({}) to {}", status.as_u16(), loggable_url(&next_url)))
            .await;
        if next_url.origin() != request.url.origin() {
            // Another origin gets none of the agent's headers: which of them are credentials
            // only the agent knows. The body's type stays with the body.
            let content_type = request.headers.get(CONTENT_TYPE).cloned();
            request.headers.clear();
            if let Some(content_type) = content_type {
                request.headers.insert(CONTENT_TYPE, content_type);
            }
        }
        let becomes_get = status == StatusCode::SEE_OTHER
            || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
                && request.method == Method::POST);
        if becomes_get && request.method != Method::HEAD {
            request.method = Method::GET;
            request.body = None;
            request.headers.remove(CONTENT_TYPE);
        }
        request.url = next_url;
    }
    Err(StepError::non_retryable(format!("more than {MAX_REDIRECTS} redirects")))
}

/// Reads a response body, failing as soon as it grows past `max_bytes`.
pub(super) async fn read_limited_body(
    mut response: reqwest::Response,
    max_bytes: usize,
) -> Result<Vec<u8>, StepError> {
    let too_large = || {
        StepError::limit_exceeded(format!(
            "the response body exceeds the limit of {max_bytes} bytes"
        ))
    };
    if response.content_length().is_some_and(|length| length > max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|error| transport_failure(&error))? {
        if body.len() + chunk.len() > max_bytes {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn is_json_response(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let media_type = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    media_type == "application/json" || media_type.ends_with("+json")
}

fn decode_body(bytes: &[u8], is_json: bool) -> Value {
    if is_json && let Ok(parsed) = serde_json::from_slice::<Value>(bytes) {
        return parsed;
    }
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

fn headers_to_json(headers: &HeaderMap) -> Value {
    let mut fields = Map::new();
    for name in headers.keys() {
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        fields.insert(name.as_str().to_owned(), Value::String(values.join(", ")));
    }
    Value::Object(fields)
}

/// A non-2xx answer as a failure: retryable for 5xx and 429.
pub(super) fn status_failure(status: StatusCode, body: &Value) -> StepError {
    let body_text = match body {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let message = format!(
        "HTTP {}{}: {}",
        status.as_u16(),
        status.canonical_reason().map(|reason| format!(" {reason}")).unwrap_or_default(),
        truncate_text(body_text.trim(), 500)
    );
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        StepError::retryable(message)
    } else {
        StepError::non_retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_rendered_from_the_templates() {
        let config = pb::ApiAgentConfig {
            method: pb::HttpMethod::Post as i32,
            url_template: "https://api.example.com/repos/{{input.repository}}?page={{input.page}}"
                .to_owned(),
            headers: [("Authorization".to_owned(), "Bearer {{input.token}}".to_owned())].into(),
            body_template: "{\"name\": \"{{input.name}}\"}".to_owned(),
            timeout: None,
            allow_private_network: false,
        };
        let input = json!({"repository": "a/b", "page": 2, "token": "t0k", "name": "x"});
        let request = prepare(&config, &input).unwrap();
        assert_eq!(request.method, Method::POST);
        assert_eq!(request.url.as_str(), "https://api.example.com/repos/a/b?page=2");
        assert_eq!(request.headers["authorization"], "Bearer t0k");
        assert!(request.headers["authorization"].is_sensitive());
        assert_eq!(request.headers[CONTENT_TYPE], "application/json");
        assert_eq!(request.body.as_deref(), Some("{\"name\": \"x\"}"));

        let missing = prepare(&config, &json!({"page": 1})).err().unwrap();
        assert_eq!(missing.kind, StepErrorKind::NonRetryable);
        assert!(missing.message.starts_with("urlTemplate: "), "{}", missing.message);
    }

    #[test]
    fn statuses_decide_retries() {
        let body = json!({"error": "nope"});
        assert!(status_failure(StatusCode::INTERNAL_SERVER_ERROR, &body).is_retryable());
        assert!(status_failure(StatusCode::BAD_GATEWAY, &body).is_retryable());
        assert!(status_failure(StatusCode::TOO_MANY_REQUESTS, &body).is_retryable());
        assert!(!status_failure(StatusCode::NOT_FOUND, &body).is_retryable());
        assert!(!status_failure(StatusCode::UNAUTHORIZED, &body).is_retryable());
        let message = status_failure(StatusCode::NOT_FOUND, &body).message;
        assert_eq!(message, "HTTP 404 Not Found: {\"error\":\"nope\"}");
    }
}
