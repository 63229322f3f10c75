//! LLM agents against a local stub that speaks the OpenAI chat-completions format.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::StepErrorKind;

use crate::api::{Recorder, serve};
use crate::{LLM_KEY_VALUE, LLM_KEY_VARIABLE, SECRET_VALUE, SECRET_VARIABLE, agent, limits, run};

/// Answers like the real endpoint; the model `busy` gets a 429, `broken` a 500.
async fn completions(
    State(recorder): State<Recorder>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    recorder.record(&method, &uri, &headers, &body);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let refusal = |status: StatusCode, message: &str, kind: &str| {
        let error =
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}});
        (status, axum::Json(error)).into_response()
    };
    match model.as_str() {
        "busy" => return refusal(StatusCode::TOO_MANY_REQUESTS, "Rate limit reached", "requests"),
        "broken" => {
            return refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error",
                "server_error",
            );
        }
        "unknown" => {
            return refusal(
                StatusCode::NOT_FOUND,
                "The model `unknown` does not exist",
                "invalid_request_error",
            );
        }
        _ => {}
    }
    let prompt = request["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .cloned()
        .unwrap_or_default();
    axum::Json(json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": format!("{model}-2024-07-18"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": format!("Summary of: {}", prompt["content"].as_str().unwrap_or_default())},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30},
        "system_fingerprint": "fp_test",
    }))
    .into_response()
}

async fn stub() -> (String, Recorder) {
    let recorder = Recorder::default();
    let router =
        Router::new().route("/v1/chat/completions", post(completions)).with_state(recorder.clone());
    (serve(router).await, recorder)
}

fn llm_agent(base_url: String, model: &str, api_key_ref: &str) -> pb::Agent {
    agent(
        pb::AgentType::Llm,
        pb::agent_config::Kind::Llm(pb::LlmAgentConfig {
            base_url,
            model: model.to_owned(),
            prompt_template: "Summarise in three sentences:\n\n{{input.text}}".to_owned(),
            system_prompt: "You are terse.".to_owned(),
            temperature: 0.2,
            max_tokens: 300,
            api_key_ref: api_key_ref.to_owned(),
            allow_private_network: true,
        }),
        limits(Duration::from_secs(20), 0, 0, 0),
    )
}

#[tokio::test]
async fn a_completion_is_requested_in_the_openai_format_and_answered() {
    let (base, recorder) = stub().await;
    let key_reference = format!("env:{LLM_KEY_VARIABLE}");
    let attempt = run(
        llm_agent(format!("{base}/v1/"), "gpt-4o-mini", &key_reference),
        json!({"text": "Cats sleep a lot."}),
    )
    .await;
    assert_eq!(
        attempt.output(),
        &json!({
            "text": "Summary of: Summarise in three sentences:\n\nCats sleep a lot.",
            "model": "gpt-4o-mini-2024-07-18",
            "finishReason": "stop",
            "usage": {"promptTokens": 21, "completionTokens": 9, "totalTokens": 30},
        })
    );
    let received = recorder.all();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].method, "POST");
    assert_eq!(received[0].uri, "/v1/chat/completions");
    assert_eq!(received[0].headers["authorization"], format!("Bearer {LLM_KEY_VALUE}"));
    assert_eq!(received[0].headers["content-type"], "application/json");
    let request: Value = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(
        request,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarise in three sentences:\n\nCats sleep a lot."},
            ],
            "temperature": 0.2,
            "max_tokens": 300,
        })
    );
    for line in &attempt.logs {
        assert!(!line.text.contains(LLM_KEY_VALUE), "the key was logged: {}", line.text);
    }
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retryable_other_failures_are_not() {
    let (base, recorder) = stub().await;
    let key_reference = format!("env:{LLM_KEY_VARIABLE}");
    let busy =
        run(llm_agent(format!("{base}/v1"), "busy", &key_reference), json!({"text": "x"})).await;
    let error = busy.error();
    assert_eq!(error.kind, StepErrorKind::Retryable);
    assert_eq!(error.message, "HTTP 429 Too Many Requests: Rate limit reached");

    let broken =
        run(llm_agent(format!("{base}/v1"), "broken", &key_reference), json!({"text": "x"})).await;
    assert!(broken.error().is_retryable());

    let unknown =
        run(llm_agent(format!("{base}/v1"), "unknown", &key_reference), json!({"text": "x"})).await;
    assert_eq!(unknown.error().kind, StepErrorKind::NonRetryable);
    assert!(unknown.error().message.contains("does not exist"), "{}", unknown.error().message);

    let missing_key = run_lending(
        llm_agent(format!("{base}/v1"), "gpt", "env:NO_SUCH_KEY_VARIABLE"),
        "NO_SUCH_KEY_VARIABLE",
    )
    .await;
    let error = missing_key.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert_eq!(
        error.message,
        "the API key variable NO_SUCH_KEY_VARIABLE is not set on this runner"
    );

    let missing_input =
        run(llm_agent(format!("{base}/v1"), "gpt", &key_reference), json!({})).await;
    assert!(
        missing_input.error().message.starts_with("promptTemplate: "),
        "{}",
        missing_input.error().message
    );

    let mut private = llm_agent(format!("{base}/v1"), "gpt", &key_reference);
    if let Some(pb::agent_config::Kind::Llm(config)) =
        private.config.as_mut().and_then(|config| config.kind.as_mut())
    {
        config.allow_private_network = false;
    }
    let refused = run(private, json!({"text": "x"})).await;
    assert!(refused.error().message.contains("loopback"), "{}", refused.error().message);
    assert!(!refused.error().message.contains(LLM_KEY_VALUE));
    assert_eq!(recorder.all().len(), 3, "only busy, broken and unknown reached the stub");
}

/// Runs an LLM agent on a runner that lends exactly `lent` (`--llm-key-env`).
async fn run_lending(
    agent: pb::Agent,
    lent: &str,
) -> Result<Value, turbocat::runner::executors::StepError> {
    crate::setup();
    let policy =
        turbocat::runner::executors::llm::LlmKeyPolicy::parse(lent.split(',')).expect("policy");
    turbocat::runner::executors::execute(
        turbocat::runner::executors::StepWork {
            agent,
            input: json!({"text": "x"}),
            deadline: None,
            llm_keys: std::sync::Arc::new(policy),
        },
        turbocat::runner::executors::LogSink::discard(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
}

#[tokio::test]
async fn agents_read_only_the_variables_the_runner_lends_never_its_own_settings() {
    let (base, recorder) = stub().await;
    // The runner's own settings (its API key is one) are refused whatever it lends, and so is
    // any variable it does not lend: nothing reaches the agent's base URL.
    let own_setting = format!("env:{SECRET_VARIABLE}");
    for (reference, lent, expected) in [
        (own_setting.as_str(), LLM_KEY_VARIABLE, "is a setting of the runner"),
        ("env:HOME", LLM_KEY_VARIABLE, "does not lend HOME"),
        ("env:PATH", "", "does not lend PATH"),
    ] {
        let error =
            run_lending(llm_agent(format!("{base}/v1"), "gpt", reference), lent).await.unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable, "{reference}");
        assert!(error.message.starts_with("apiKeyRef: "), "{reference}: {}", error.message);
        assert!(error.message.contains(expected), "{reference}: {}", error.message);
        assert!(!error.message.contains(SECRET_VALUE));
    }
    // Tied to a host, a lent key goes only there (127.0.0.1 is not `localhost`).
    let tied = format!("{LLM_KEY_VARIABLE}@localhost");
    let reference = format!("env:{LLM_KEY_VARIABLE}");
    let error =
        run_lending(llm_agent(format!("{base}/v1"), "gpt", &reference), &tied).await.unwrap_err();
    assert!(error.message.contains("only for localhost"), "{}", error.message);
    assert!(recorder.all().is_empty(), "nothing was sent: {:?}", recorder.all().len());

    // The lent key reaches the endpoint, on its host or on any.
    let tied = format!("{LLM_KEY_VARIABLE}@127.0.0.1");
    for lent in [tied.as_str(), LLM_KEY_VARIABLE] {
        let output = run_lending(llm_agent(format!("{base}/v1"), "gpt", &reference), lent)
            .await
            .expect("a lent key works");
        assert_eq!(output["finishReason"], "stop");
    }
    let received = recorder.all();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.headers["authorization"], format!("Bearer {LLM_KEY_VALUE}"));
    }
}
