//! Every agent type a runner executes, for real through the engine, on `dev` and `serve`: an API
//! step calling a local HTTP server, an LLM step against a local server speaking the OpenAI
//! chat-completions format (its API key read from the runner's environment, never stored), a
//! DATA step and a node CODE step, chained so each one's output feeds the next. The SSRF guard
//! refuses the same loopback server unless the agent allows private networks.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::failures::{logs, wait_for_runner};
use crate::support::api::Api;
use crate::support::{TurbocatProcess, start_serve, start_turbocat};
use crate::{RunnerProcess, Workbench, step};

const LIMIT: Duration = Duration::from_secs(60);
/// The runner's variable holding the LLM key, lent to agents with `--llm-key-env`; the test
/// process itself never sets it.
const KEY_VARIABLE: &str = "E2E_LLM_KEY";
const KEY_VALUE: &str = "sk-e2e-5b2d7c1e9f04-do-not-store";

/// One request the stub received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Received>>>);

impl Recorder {
    fn record(&self, path: String, headers: HeaderMap, body: &Bytes) {
        let body = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Ok(mut received) = self.0.lock() {
            received.push(Received { path, headers, body });
        }
    }

    fn received(&self, path_start: &str) -> Vec<Received> {
        self.0
            .lock()
            .map(|received| {
                received.iter().filter(|one| one.path.starts_with(path_start)).cloned().collect()
            })
            .unwrap_or_default()
    }
}

/// `POST /items/{id}`: a small JSON API that creates an item.
async fn create_item(
    State(recorder): State<Recorder>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    recorder.record(format!("/items/{id}"), headers.clone(), &body);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let item = json!({
        "id": id,
        "name": request["name"],
        "tags": ["red", "round", "ripe"],
        "tag": headers.get("x-tag").and_then(|value| value.to_str().ok()),
    });
    (StatusCode::CREATED, [("x-item-id", id)], axum::Json(item))
}

/// `POST /v1/chat/completions` as OpenAI answers it.
async fn completions(
    State(recorder): State<Recorder>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    recorder.record("/v1/chat/completions".to_owned(), headers, &body);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prompt = request["messages"]
        .as_array()
        .and_then(|messages| messages.last())
        .and_then(|message| message["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    axum::Json(json!({
        "id": "chatcmpl-e2e",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": format!("{}-2024-07-18", request["model"].as_str().unwrap_or_default()),
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": format!("In short: {prompt}") },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": { "prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22 },
        "system_fingerprint": "fp_e2e",
    }))
}

/// Starts the stub on a free loopback port; returns its base URL.
async fn stub() -> (String, Recorder) {
    let recorder = Recorder::default();
    let router = Router::new()
        .route("/items/{id}", post(create_item))
        .route("/v1/chat/completions", post(completions))
        .with_state(recorder.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the stub");
    let address = listener.local_addr().expect("stub address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{address}"), recorder)
}

/// Runs the API → DATA → LLM → CODE (node) chain and checks every hop, the stub's view of the
/// requests, and the SSRF refusal.
async fn every_agent_type_runs(bench: &Workbench) -> String {
    let (stub_url, recorder) = stub().await;
    let fetch = bench
        .agent(
            "fetch",
            "API",
            json!({ "api": {
                "method": "POST",
                "urlTemplate": format!("{stub_url}/items/{{{{input.id}}}}"),
                "headers": { "X-Tag": "{{input.tag}}" },
                "bodyTemplate": "{\"name\": \"{{input.name}}\"}",
                "timeout": "5s",
                "allowPrivateNetwork": true,
            } }),
            json!({}),
        )
        .await;
    let shape = bench
        .jq(
            "shape",
            "{text: (.body.name + \" has \" + (.body.tags | length | tostring) + \" tags\"), status: .status, tag: .body.tag}",
        )
        .await;
    let ask = bench
        .agent(
            "ask",
            "LLM",
            json!({ "llm": {
                "baseUrl": format!("{stub_url}/v1"),
                "model": "gpt-e2e",
                "systemPrompt": "Be brief.",
                "promptTemplate": "Summarise: {{input.text}}",
                "temperature": 0.2,
                "maxTokens": 64,
                "apiKeyRef": format!("env:{KEY_VARIABLE}"),
                "allowPrivateNetwork": true,
            } }),
            json!({}),
        )
        .await;
    let count = bench
        .code(
            "count",
            "javascript",
            "let raw='';process.stdin.on('data',c=>raw+=c);process.stdin.on('end',()=>{const d=JSON.parse(raw);console.log(JSON.stringify({length:d.text.length,tokens:d.tokens}));});",
            json!({}),
        )
        .await;
    let workflow = bench
        .workflow(
            "every type",
            json!([
                { "key": "fetch", "agentId": fetch },
                { "key": "shape", "agentId": shape, "dependsOn": ["fetch"], "inputMapping": "{{steps.fetch.output}}" },
                { "key": "ask", "agentId": ask, "dependsOn": ["shape"], "inputMapping": "{{steps.shape.output}}" },
                { "key": "count", "agentId": count, "dependsOn": ["ask"], "inputMapping": { "text": "{{steps.ask.output.text}}", "tokens": "{{steps.ask.output.usage.totalTokens}}" } },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench
        .execute(
            &workflow,
            json!({ "input": { "id": "apple-7", "name": "apple", "tag": "fruit" } }),
        )
        .await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");

    let fetched = step(&execution, "fetch")["output"].clone();
    assert_eq!(fetched["status"], 201, "{fetched}");
    assert_eq!(fetched["headers"]["x-item-id"], "apple-7", "{fetched}");
    assert_eq!(
        fetched["body"],
        json!({ "id": "apple-7", "name": "apple", "tags": ["red", "round", "ripe"], "tag": "fruit" })
    );
    let items = recorder.received("/items/");
    assert_eq!(items.len(), 1, "one request: {items:?}");
    assert_eq!(items[0].path, "/items/apple-7");
    assert_eq!(items[0].body, json!({ "name": "apple" }));
    assert_eq!(items[0].headers["content-type"], "application/json");

    assert_eq!(
        step(&execution, "shape")["output"],
        json!({ "text": "apple has 3 tags", "status": 201, "tag": "fruit" })
    );

    let answer = step(&execution, "ask")["output"].clone();
    assert_eq!(
        answer,
        json!({
            "text": "In short: Summarise: apple has 3 tags",
            "model": "gpt-e2e-2024-07-18",
            "finishReason": "stop",
            "usage": { "promptTokens": 17, "completionTokens": 5, "totalTokens": 22 },
        })
    );
    let asked = recorder.received("/v1/chat/completions");
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].headers["authorization"], format!("Bearer {KEY_VALUE}").as_str());
    assert_eq!(
        asked[0].body,
        json!({
            "model": "gpt-e2e",
            "messages": [
                { "role": "system", "content": "Be brief." },
                { "role": "user", "content": "Summarise: apple has 3 tags" },
            ],
            "temperature": 0.2,
            "max_tokens": 64,
        })
    );

    let text_length = "In short: Summarise: apple has 3 tags".len();
    assert_eq!(execution["output"], json!({ "length": text_length, "tokens": 22 }));
    // Every step's start is recorded, also where it travelled with the result (a step that
    // ends within 250 ms commits no RUNNING of its own), on the step and on its attempt.
    for step_run in execution["stepRuns"].as_array().expect("step runs") {
        let time = |field: &str| {
            let text = step_run[field].as_str().unwrap_or_default();
            chrono::DateTime::parse_from_rfc3339(text)
                .unwrap_or_else(|_| panic!("{field}: {step_run}"))
        };
        assert!(time("startedAt") <= time("finishedAt"), "{step_run}");
        assert_eq!(step_run["attempts"][0]["startedAt"], step_run["startedAt"], "{step_run}");
    }

    // The same server without `allowPrivateNetwork`: refused before any request is made.
    let guarded = bench
        .agent(
            "guarded",
            "API",
            json!({ "api": { "method": "GET", "urlTemplate": format!("{stub_url}/items/x") } }),
            json!({}),
        )
        .await;
    let refused =
        bench.workflow("ssrf", json!([{ "key": "guarded", "agentId": guarded }]), json!({})).await;
    let refused_id = bench.execute(&refused, json!({})).await;
    let refused_execution = bench.finished(&refused_id, LIMIT).await;
    assert_eq!(refused_execution["status"], "FAILED", "{refused_execution}");
    let error = refused_execution["error"].as_str().unwrap_or_default();
    assert!(error.contains("guarded") && error.contains("loopback"), "{error}");
    assert_eq!(step(&refused_execution, "guarded")["attempt"], 1, "not retried");
    assert_eq!(recorder.received("/items/").len(), 1, "the guarded request never left");

    // Nothing the API shows of the execution carries the key.
    let shown = format!("{execution}{}", json!(logs(bench, &execution_id).await));
    assert!(!shown.contains(KEY_VALUE), "the key leaked into the execution or its logs");
    execution_id
}

/// Every byte of the `dev` data directory (the SQLite database and its journal).
fn data_directory_contains(directory: &Path, needle: &str) -> bool {
    std::fs::read_dir(directory).expect("data directory").flatten().any(|entry| {
        std::fs::read(entry.path()).is_ok_and(|bytes| {
            bytes.windows(needle.len()).any(|window| window == needle.as_bytes())
        })
    })
}

/// Whether any row of any table of a PostgreSQL database, as text, contains `needle`.
async fn postgres_contains(url: &str, needle: &str) -> bool {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut connection)
    .await
    .expect("tables");
    assert!(tables.iter().any(|table| table == "executions"), "{tables:?}");
    for table in tables {
        let statement = format!("SELECT CAST(t AS text) FROM public.\"{table}\" t");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
            .fetch_all(&mut connection)
            .await
            .expect("rows");
        if rows.iter().any(|row| row.contains(needle)) {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_type_runs_through_the_engine_on_dev() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8 path").to_owned();
    // The in-process runner reads the server's environment.
    let server: TurbocatProcess = start_turbocat(
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.as_str(),
            "--llm-key-env",
            KEY_VARIABLE,
        ],
        &[(KEY_VARIABLE, KEY_VALUE)],
    );
    let bench = Workbench::new(Api::new(&server), "types-dev@example.com").await;
    every_agent_type_runs(&bench).await;
    // The scan sees what the execution stored (the LLM's answer), but not the key.
    assert!(data_directory_contains(directory.path(), "In short: Summarise: apple has 3 tags"));
    assert!(!data_directory_contains(directory.path(), KEY_VALUE), "the key is in the database");
    assert!(!server.stderr_text().contains(KEY_VALUE), "the key is in the server's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_type_runs_through_the_engine_on_serve() {
    let (server, database) = start_serve(&[]).await;
    let bench = Workbench::new(Api::new(&server), "types-serve@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    // The key lives only in the runner's environment, not the server's.
    let runner = RunnerProcess::start(
        &server.base_url(),
        &key,
        "typed",
        2,
        "",
        &[(KEY_VARIABLE, KEY_VALUE), ("TURBOCAT_LLM_KEY_ENV", KEY_VARIABLE)],
    );
    wait_for_runner(&bench, "typed").await;
    every_agent_type_runs(&bench).await;
    // The scan sees what the execution stored (the LLM's answer), but not the key.
    assert!(postgres_contains(&database.url, "In short: Summarise: apple has 3 tags").await);
    assert!(!postgres_contains(&database.url, KEY_VALUE).await, "the key is in the database");
    assert!(!server.stderr_text().contains(KEY_VALUE), "the key is in the server's log");
    assert!(!runner.stderr_text().contains(KEY_VALUE), "the key is in the runner's log");
}
