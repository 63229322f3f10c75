//! Analytics and metrics end to end: real `turbocat dev` (SQLite, its in-process runner) and
//! real `turbocat serve` (PostgreSQL, Redis, a `turbocat runner` process) run executions the
//! test designs — steps that sleep a known time, fail, fail once then succeed, ask an LLM stub
//! that reports `usage` — and the AnalyticsService must count exactly those, over REST and gRPC,
//! within the caller's scope (`numbers`); `/metrics` must show them to operators (`metrics`).

#[path = "../support/mod.rs"]
mod support;

mod metrics;
mod numbers;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};

use crate::support::api::{Api, Auth};

/// How long one execution may take.
pub const LIMIT: Duration = Duration::from_secs(60);
/// The runner's variable holding the LLM key (lent to agents with `--llm-key-env`).
pub const KEY_VARIABLE: &str = "ANALYTICS_LLM_KEY";
pub const KEY_VALUE: &str = "sk-analytics-test-key";
/// What the LLM stub reports as used, per call.
pub const PROMPT_TOKENS: i64 = 17;
pub const COMPLETION_TOKENS: i64 = 5;

/// An account that builds and runs workflows over REST.
pub struct Workbench {
    pub api: Api,
    pub auth: Auth,
    pub user_id: String,
    token: String,
}

impl Workbench {
    pub async fn new(api: Api, email: &str) -> Self {
        let account = api.register(email, "Analytics Tester").await;
        Self {
            auth: account.auth(),
            user_id: account.id.clone(),
            token: account.token.clone(),
            api,
        }
    }

    /// The account's access token (to check it never reaches a log).
    pub fn auth_token(&self) -> String {
        self.token.clone()
    }

    /// Creates an agent and returns its id.
    pub async fn agent(&self, name: &str, agent_type: &str, config: Value) -> String {
        let (status, body) = self
            .api
            .post(
                "/api/v1/agents",
                &self.auth,
                json!({ "name": name, "type": agent_type, "config": config, "limits": {} }),
            )
            .await;
        assert_eq!(status, 201, "create agent {name}: {body}");
        body["data"]["id"].as_str().expect("agent id").to_owned()
    }

    /// A one-step workflow running `agent_id` with `retry_attempts` attempts at most.
    pub async fn workflow(&self, name: &str, agent_id: &str, retry_attempts: u32) -> String {
        let steps = json!([{ "key": "only", "agentId": agent_id,
            "retryPolicy": { "maxAttempts": retry_attempts, "initialBackoff": "0.05s" } }]);
        let (status, body) = self
            .api
            .post("/api/v1/workflows", &self.auth, json!({ "name": name, "steps": steps }))
            .await;
        assert_eq!(status, 201, "create workflow {name}: {body}");
        body["data"]["id"].as_str().expect("workflow id").to_owned()
    }

    /// Runs the workflow to its end and returns the execution.
    pub async fn run(&self, workflow_id: &str, input: Value) -> Value {
        let (status, body) = self
            .api
            .post(
                &format!("/api/v1/workflows/{workflow_id}/execute"),
                &self.auth,
                json!({ "input": input }),
            )
            .await;
        assert_eq!(status, 202, "execute: {body}");
        let execution_id = body["data"]["id"].as_str().expect("execution id").to_owned();
        let started = Instant::now();
        loop {
            let (status, body) =
                self.api.get(&format!("/api/v1/executions/{execution_id}"), &self.auth).await;
            assert_eq!(status, 200, "{body}");
            let state = body["data"]["status"].as_str().unwrap_or_default();
            if ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&state) {
                return body["data"].clone();
            }
            assert!(started.elapsed() < LIMIT, "still {state}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a runner named `name` is attached.
    pub async fn wait_for_runner(&self, name: &str) {
        let started = Instant::now();
        loop {
            let (status, body) = self.api.get("/api/v1/runners", &self.auth).await;
            assert_eq!(status, 200, "{body}");
            let runners = body["data"].as_array().cloned().unwrap_or_default();
            if runners.iter().any(|runner| runner["name"] == name) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no runner {name}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many chat completions the stub answered.
#[derive(Clone, Default)]
pub struct CompletionCount(Arc<Mutex<u32>>);

impl CompletionCount {
    pub fn get(&self) -> u32 {
        self.0.lock().map(|count| *count).unwrap_or_default()
    }
}

/// A server speaking OpenAI's `POST /v1/chat/completions`, reporting `usage` as OpenAI does;
/// its base URL.
pub async fn llm_stub() -> (String, CompletionCount) {
    let count = CompletionCount::default();
    let counted = count.clone();
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let counted = counted.clone();
            async move {
                if let Ok(mut count) = counted.0.lock() {
                    *count += 1;
                }
                axum::Json(json!({
                    "id": "chatcmpl-analytics",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": "gpt-analytics",
                    "choices": [{
                        "index": 0,
                        "message": { "role": "assistant", "content": "fine" },
                        "finish_reason": "stop",
                    }],
                    "usage": {
                        "prompt_tokens": PROMPT_TOKENS,
                        "completion_tokens": COMPLETION_TOKENS,
                        "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                    },
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stub");
    let address = listener.local_addr().expect("stub address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{address}/v1"), count)
}

/// A `turbocat runner` process, killed when dropped.
pub struct RunnerProcess(std::process::Child);

impl RunnerProcess {
    pub fn start(server_url: &str, api_key: &str, name: &str) -> Self {
        let child = support::turbocat_command()
            .args(["runner", "--server", server_url, "--name", name, "--capacity", "4"])
            .env("TURBOCAT_API_KEY", api_key)
            .env("TURBOCAT_LLM_KEY_ENV", KEY_VARIABLE)
            .env(KEY_VARIABLE, KEY_VALUE)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn runner");
        Self(child)
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
