//! LLM agents: one chat completion against an OpenAI-compatible endpoint
//! (`POST {baseUrl}/chat/completions`).
//!
//! The request carries `model`, `messages` (the system prompt when the agent has one, then the
//! user prompt; both rendered against `{"input": <step input>}`), `temperature`, and
//! `max_tokens` when the agent sets it. The API key comes from the runner, never from the
//! server: `apiKeyRef: "env:NAME"` reads the runner's environment variable `NAME` when the
//! runner's operator lends it to agents (`LlmKeyPolicy`, `--llm-key-env`), for any base URL or
//! only for the hosts named there; never a `TURBOCAT_*` setting (an empty `apiKeyRef` sends no
//! key, for local models). The output is
//! `{text, model, finishReason, usage: {promptTokens, completionTokens, totalTokens}}`.
//! 429 and 5xx answers are retryable, other failures are not. The base URL passes the same
//! SSRF guard as API agents (`allowPrivateNetwork` opens private networks); redirects are not
//! followed.
//! May call: `crate::mapping`, `crate::ssrf`, reqwest.

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};
use url::Url;

use super::api::{
    loggable_url, read_limited_body, ssrf_failure, status_failure, transport_failure,
};
use super::{RunContext, StepError};
use crate::mapping;
use crate::proto::v1 as pb;
use crate::ssrf;
use crate::text::truncate_text;

/// Room for the response's envelope (ids, usage, choices) on top of the text itself.
const RESPONSE_ENVELOPE_BYTES: usize = 64 * 1024;

/// The runner's environment variables that LLM agents may name in `apiKeyRef: "env:NAME"`,
/// each for any base URL or only for some hosts (`--llm-key-env
/// OPENAI_API_KEY@api.openai.com,ANTHROPIC_API_KEY`). Empty by default: an agent reads no
/// variable the operator did not lend it, and never a `TURBOCAT_*` setting of the runner.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlmKeyPolicy {
    /// Variable name -> the hosts it may be sent to (`None`: any host).
    lent: std::collections::BTreeMap<String, Option<Vec<String>>>,
}

/// The prefix of the runner's own settings, which no agent may read.
const RUNNER_SETTING_PREFIX: &str = "TURBOCAT_";

impl LlmKeyPolicy {
    /// Reads `NAME` or `NAME@host` entries (one per item; a name may repeat with other hosts).
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut policy = Self::default();
        for entry in entries.into_iter().map(str::trim).filter(|entry| !entry.is_empty()) {
            let (name, host) = match entry.split_once('@') {
                Some((name, host)) => (name.trim(), Some(host.trim().to_ascii_lowercase())),
                None => (entry, None),
            };
            let well_formed = name
                .chars()
                .next()
                .is_some_and(|first| first.is_ascii_uppercase() || first == '_')
                && name.chars().all(|character| {
                    character.is_ascii_uppercase() || character.is_ascii_digit() || character == '_'
                });
            if !well_formed {
                return Err(format!("{entry:?} is not NAME or NAME@host (NAME in A-Z, 0-9, _)"));
            }
            if name.starts_with(RUNNER_SETTING_PREFIX) {
                return Err(format!(
                    "{name} is a setting of the runner and is never lent to agents"
                ));
            }
            match host {
                Some(host) if host.is_empty() => {
                    return Err(format!("{entry:?} names no host after @"));
                }
                Some(host) => {
                    let hosts =
                        policy.lent.entry(name.to_owned()).or_insert_with(|| Some(Vec::new()));
                    // A variable lent for any host stays so.
                    if let Some(hosts) = hosts {
                        hosts.push(host);
                    }
                }
                None => {
                    policy.lent.insert(name.to_owned(), None);
                }
            }
        }
        Ok(policy)
    }
}

/// Where the API key is found: `env:NAME` of a variable the runner lends for `url`'s host, or
/// nothing.
fn resolve_api_key(
    reference: &str,
    url: &Url,
    policy: &LlmKeyPolicy,
) -> Result<Option<String>, StepError> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Ok(None);
    }
    let Some(variable) = reference.strip_prefix("env:").map(str::trim) else {
        return Err(StepError::non_retryable(
            "apiKeyRef must be `env:NAME` (an environment variable of the runner)",
        ));
    };
    if variable.starts_with(RUNNER_SETTING_PREFIX) {
        return Err(StepError::non_retryable(format!(
            "apiKeyRef: {variable} is a setting of the runner; agents never read it"
        )));
    }
    let Some(lent_for) = policy.lent.get(variable) else {
        return Err(StepError::non_retryable(format!(
            "apiKeyRef: this runner does not lend {variable} to agents (its operator lends \
             variables with --llm-key-env)"
        )));
    };
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if let Some(hosts) = lent_for
        && !hosts.contains(&host)
    {
        return Err(StepError::non_retryable(format!(
            "apiKeyRef: this runner lends {variable} only for {}, not for {}",
            hosts.join(", "),
            truncate_text(&host, 200)
        )));
    }
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
    let api_key = resolve_api_key(&config.api_key_ref, &url, context.llm_keys)?;
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
    context.logs.system(&format!("POST {} (model {})", loggable_url(&url), config.model)).await;
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
    fn api_key_references_resolve_only_from_variables_the_runner_lends() {
        let url = Url::parse("https://api.example.com/v1/chat/completions").unwrap();
        let elsewhere = Url::parse("https://attacker.example.net/v1/chat/completions").unwrap();
        let policy = LlmKeyPolicy::parse([
            "TEST_SURELY_UNSET_KEY",
            "PATH@API.example.com",
            "PATH@other.example.com",
        ])
        .unwrap();
        assert_eq!(resolve_api_key("", &url, &policy), Ok(None));
        let missing = resolve_api_key("env:TEST_SURELY_UNSET_KEY", &url, &policy).unwrap_err();
        assert!(missing.message.contains("TEST_SURELY_UNSET_KEY"));
        assert!(!missing.is_retryable());
        assert!(resolve_api_key("sk-literal-key", &url, &policy).is_err());
        // The runner's own settings, and variables it does not lend, are refused by name.
        let own = resolve_api_key("env:TURBOCAT_API_KEY", &url, &policy).unwrap_err();
        assert!(own.message.contains("TURBOCAT_API_KEY is a setting of the runner"), "{own:?}");
        let unlent = resolve_api_key("env:HOME", &url, &policy).unwrap_err();
        assert!(unlent.message.contains("does not lend HOME"), "{unlent:?}");
        // Tied to hosts: only there.
        assert!(resolve_api_key("env:PATH", &url, &policy).is_ok_and(|key| key.is_some()));
        let wrong_host = resolve_api_key("env:PATH", &elsewhere, &policy).unwrap_err();
        assert!(wrong_host.message.contains("only for api.example.com"), "{wrong_host:?}");
        let anywhere = LlmKeyPolicy::parse(["PATH@api.example.com", "PATH"]).unwrap();
        assert!(resolve_api_key("env:PATH", &elsewhere, &anywhere).is_ok(), "lent for any host");
        assert!(resolve_api_key("env:PATH", &url, &LlmKeyPolicy::default()).is_err(), "lends none");

        for bad in
            ["TURBOCAT_API_KEY", "TURBOCAT_JWT_SECRET@api.example.com", "lower", "A-B", "KEY@"]
        {
            assert!(LlmKeyPolicy::parse([bad]).is_err(), "{bad}");
        }
        assert_eq!(LlmKeyPolicy::parse(["", " "]), Ok(LlmKeyPolicy::default()));
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
