//! LLM agents: one chat completion against an OpenAI-compatible endpoint
//! (`POST {baseUrl}/chat/completions`).
//!
//! The request carries `model`, `messages` (the system prompt when the agent has one, then the
//! user prompt; both rendered against `{"input": <step input>}`), `temperature`, and
//! `max_tokens` when the agent sets it. The API key comes from the runner, never from the
//! server: `apiKeyRef: "env:NAME"` reads the runner's environment variable `NAME` (an empty
//! `apiKeyRef` sends no key, for local models). The output is
//! `{text, model, finishReason, usage: {promptTokens, completionTokens, totalTokens}}`.
//! 429 and 5xx answers are retryable, other failures are not. The base URL passes the same
//! SSRF guard as API agents (`allowPrivateNetwork` opens private networks); redirects are not
//! followed.
//! May call: `crate::mapping`, `crate::runner::ssrf`, reqwest.

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};
use url::Url;

use super::api::{read_limited_body, ssrf_failure, status_failure, transport_failure};
use super::{RunContext, StepError};
use crate::mapping;
use crate::proto::v1 as pb;
use crate::runner::ssrf;
use crate::text::truncate_text;

/// Room for the response's envelope (ids, usage, choices) on top of the text itself.
const RESPONSE_ENVELOPE_BYTES: usize = 64 * 1024;

/// Where the API key is found: `env:NAME`, or nothing.
fn resolve_api_key(reference: &str) -> Result<Option<String>, StepError> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Ok(None);
    }
    let Some(variable) = reference.strip_prefix("env:").map(str::trim) else {
        return Err(StepError::non_retryable(
            "apiKeyRef must be `env:NAME` (an environment variable of the runner)",
        ));
    };
    match std::env::var(variable) {
        Ok(value) if !value.trim().is_empty() => Ok(Some(value.trim().to_owned())),
        _ => Err(StepError::non_retryable(format!(
            "the API key variable {variable} is not set on this runner"
        ))),
    }
}

/// The chat-completions request body.
fn request_body(config: &pb::LlmAgentConfig, input: &Value) -> Result<Value, StepError> {
    let scope = json!({ "input": input });
    let render = |field: &str, template: &str| {
        mapping::render_text(template, &scope)
            .map_err(|error| StepError::non_retryable(format!("{field}: {error}")))
    };
    let mut messages = Vec::new();
    if !config.system_prompt.trim().is_empty() {
        messages.push(json!({
            "role": "system",
            "content": render("systemPrompt", &config.system_prompt)?,
        }));
    }
    messages.push(
        json!({ "role": "user", "content": render("promptTemplate", &config.prompt_template)? }),
    );
    let mut body = json!({
        "model": config.model,
        "messages": messages,
        "temperature": config.temperature,
    });
    if config.max_tokens > 0 {
        body["max_tokens"] = json!(config.max_tokens);
    }
    Ok(body)
}

fn completions_url(base_url: &str) -> Result<Url, StepError> {
    let endpoint = format!("{}/chat/completions", base_url.trim().trim_end_matches('/'));
    Url::parse(&endpoint).map_err(|error| {
        StepError::non_retryable(format!(
            "baseUrl: `{}` is not a URL: {error}",
            truncate_text(base_url, 200)
        ))
    })
}

pub(super) async fn run(
    config: &pb::LlmAgentConfig,
    input: &Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let url = completions_url(&config.base_url)?;
    let body = request_body(config, input)?;
    let api_key = resolve_api_key(&config.api_key_ref)?;
    let addresses =
        ssrf::vet_url(&url, config.allow_private_network).await.map_err(ssrf_failure)?;
    let client = ssrf::pinned_client(&url, &addresses).map_err(StepError::retryable)?;
    let mut request = client.post(url.clone()).json(&body);
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            StepError::non_retryable("the API key holds characters a header cannot carry")
        })?;
        value.set_sensitive(true);
        request = request.header(AUTHORIZATION, value);
    }
    context.logs.system(&format!("POST {url} (model {})", config.model)).await;
    let response = request.send().await.map_err(|error| transport_failure(&error))?;
    let status = response.status();
    let max_response_bytes =
        context.limits.max_output_bytes.saturating_add(RESPONSE_ENVELOPE_BYTES);
    let response_bytes = read_limited_body(response, max_response_bytes).await?;
    let parsed: Option<Value> = serde_json::from_slice(&response_bytes).ok();
    if !status.is_success() {
        let detail = parsed
            .as_ref()
            .and_then(|answer| answer.pointer("/error/message"))
            .cloned()
            .unwrap_or_else(|| {
                Value::String(String::from_utf8_lossy(&response_bytes).into_owned())
            });
        return Err(status_failure(status, &detail));
    }
    let Some(answer) = parsed else {
        return Err(StepError::retryable("the endpoint answered something that is not JSON"));
    };
    let output = completion_output(&answer)?;
    context
        .logs
        .system(&format!(
            "completion: finish reason {}, {} tokens",
            output["finishReason"].as_str().unwrap_or("unknown"),
            output["usage"]["totalTokens"]
        ))
        .await;
    Ok(output)
}

/// The step output from a chat-completions answer.
fn completion_output(answer: &Value) -> Result<Value, StepError> {
    let Some(choice) = answer.pointer("/choices/0") else {
        return Err(StepError::retryable("the completion has no choices"));
    };
    let text = choice.pointer("/message/content").and_then(Value::as_str).unwrap_or_default();
    let token_count =
        |name: &str| answer.pointer(&format!("/usage/{name}")).and_then(Value::as_u64).unwrap_or(0);
    Ok(json!({
        "text": text,
        "model": answer.get("model").cloned().unwrap_or(Value::Null),
        "finishReason": choice.get("finish_reason").cloned().unwrap_or(Value::Null),
        "usage": {
            "promptTokens": token_count("prompt_tokens"),
            "completionTokens": token_count("completion_tokens"),
            "totalTokens": token_count("total_tokens"),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_body_follows_the_chat_completions_format() {
        let config = pb::LlmAgentConfig {
            base_url: "https://api.example.com/v1/".to_owned(),
            model: "gpt-test".to_owned(),
            prompt_template: "Summarise: {{input.text}}".to_owned(),
            system_prompt: "Be brief.".to_owned(),
            temperature: 0.5,
            max_tokens: 0,
            api_key_ref: String::new(),
            allow_private_network: false,
        };
        let body = request_body(&config, &json!({"text": "cats"})).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "gpt-test",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Summarise: cats"},
                ],
                "temperature": 0.5,
            })
        );
        assert_eq!(
            completions_url(&config.base_url).unwrap().as_str(),
            "https://api.example.com/v1/chat/completions"
        );
    }

    #[test]
    fn api_key_references_resolve_from_the_environment_only() {
        assert_eq!(resolve_api_key(""), Ok(None));
        let missing = resolve_api_key("env:TURBOCAT_TEST_SURELY_UNSET_KEY").unwrap_err();
        assert!(missing.message.contains("TURBOCAT_TEST_SURELY_UNSET_KEY"));
        assert!(!missing.is_retryable());
        assert!(resolve_api_key("sk-literal-key").is_err());
    }

    #[test]
    fn completions_become_outputs() {
        let answer = json!({
            "id": "chatcmpl-1",
            "model": "gpt-test-0613",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        });
        assert_eq!(
            completion_output(&answer).unwrap(),
            json!({
                "text": "Hi.",
                "model": "gpt-test-0613",
                "finishReason": "stop",
                "usage": {"promptTokens": 5, "completionTokens": 2, "totalTokens": 7},
            })
        );
        assert!(completion_output(&json!({"choices": []})).is_err());
    }
}
