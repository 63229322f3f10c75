//! API agents against a real HTTP server on 127.0.0.1.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use axum::routing::{any, get};
use serde_json::json;
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::{LogStream, StepErrorKind};

use crate::{agent, limits, run};

/// One request the server got.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub uri: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

#[derive(Clone, Default)]
pub struct Recorder {
    pub requests: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    pub fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) {
        let headers = headers
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
            })
            .collect();
        self.requests.lock().unwrap().push(Received {
            method: method.to_string(),
            uri: uri.to_string(),
            headers,
            body: String::from_utf8_lossy(body).into_owned(),
        });
    }

    pub fn all(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves `router` on 127.0.0.1 for the rest of the test; returns its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}")
}

async fn echo(
    State(recorder): State<Recorder>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    recorder.record(&method, &uri, &headers, &body);
    let answer = json!({
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "body": String::from_utf8_lossy(&body),
    });
    let repeated = AppendHeaders([("x-served-by", "test"), ("x-served-by", "twice")]);
    (repeated, axum::Json(answer)).into_response()
}

async fn status(State(recorder): State<Recorder>, Path(code): Path<u16>, uri: Uri) -> Response {
    recorder.record(&Method::GET, &uri, &HeaderMap::new(), &Bytes::new());
    let status = StatusCode::from_u16(code).unwrap();
    (status, format!("status {code} on purpose")).into_response()
}

async fn api_server() -> (String, Recorder) {
    let recorder = Recorder::default();
    let router = Router::new()
        .route("/echo/{*rest}", any(echo))
        .route("/text", get(|| async { ([("content-type", "text/plain")], "plain words") }))
        .route("/status/{code}", get(status))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "late"
            }),
        )
        .route("/big", get(|| async { "z".repeat(100_000) }))
        .route("/moved", any(|| async { Redirect::to("/echo/after-redirect") }))
        .route("/other", any(|| async { Redirect::to("/echo/after-303") }))
        .with_state(recorder.clone());
    (serve(router).await, recorder)
}

fn api_agent(config: pb::ApiAgentConfig) -> pb::Agent {
    agent(
        pb::AgentType::Api,
        pb::agent_config::Kind::Api(config),
        limits(Duration::from_secs(20), 0, 0, 50_000),
    )
}

fn get_config(url_template: String) -> pb::ApiAgentConfig {
    pb::ApiAgentConfig {
        method: pb::HttpMethod::Get as i32,
        url_template,
        allow_private_network: true,
        ..pb::ApiAgentConfig::default()
    }
}

#[tokio::test]
async fn requests_are_rendered_and_json_and_text_answers_become_outputs() {
    let (base, recorder) = api_server().await;
    let config = pb::ApiAgentConfig {
        method: pb::HttpMethod::Post as i32,
        url_template: format!(
            "{base}/echo/users/{{{{input.user.id}}}}?verbose={{{{input.verbose}}}}"
        ),
        headers: [
            ("X-Request-Name".to_owned(), "for {{input.user.name}}".to_owned()),
            ("Authorization".to_owned(), "Bearer abc".to_owned()),
        ]
        .into(),
        body_template: "{\"name\": \"{{input.user.name}}\", \"tags\": {{input.tags}}}".to_owned(),
        timeout: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
        allow_private_network: true,
    };
    let input = json!({"user": {"id": 42, "name": "Ada"}, "verbose": true, "tags": ["a", "b"]});
    let attempt = run(api_agent(config), input).await;
    let output = attempt.output();
    assert_eq!(output["status"], 200);
    assert_eq!(output["headers"]["content-type"], "application/json");
    assert_eq!(output["headers"]["x-served-by"], "test, twice");
    assert_eq!(output["body"]["method"], "POST");
    assert_eq!(output["body"]["path"], "/echo/users/42");
    assert_eq!(output["body"]["query"], "verbose=true");
    assert_eq!(output["body"]["body"], "{\"name\": \"Ada\", \"tags\": [\"a\",\"b\"]}");

    let received = recorder.all();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].headers["x-request-name"], "for Ada");
    assert_eq!(received[0].headers["authorization"], "Bearer abc");
    assert_eq!(received[0].headers["content-type"], "application/json");
    let system = attempt.log_texts(Some(LogStream::System));
    assert!(system[0].starts_with("POST http://127.0.0.1:"), "{system:?}");
    assert!(system.iter().any(|line| line.starts_with("answered 200")), "{system:?}");

    let text = run(api_agent(get_config(format!("{base}/text"))), json!({})).await;
    assert_eq!(text.output()["body"], "plain words");
    assert_eq!(text.output()["status"], 200);

    let missing =
        run(api_agent(get_config(format!("{base}/echo/{{{{input.absent}}}}"))), json!({})).await;
    let error = missing.error();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert!(error.message.starts_with("urlTemplate: "), "{}", error.message);
}

#[tokio::test]
async fn error_statuses_fail_retryably_only_for_5xx_and_429() {
    let (base, _recorder) = api_server().await;
    for (code, retryable) in [(500, true), (503, true), (429, true), (404, false), (400, false)] {
        let attempt = run(api_agent(get_config(format!("{base}/status/{code}"))), json!({})).await;
        let error = attempt.error();
        assert_eq!(error.is_retryable(), retryable, "{code}: {error:?}");
        assert!(error.message.starts_with(&format!("HTTP {code} ")), "{}", error.message);
        assert!(error.message.contains("on purpose"), "{}", error.message);
        assert_eq!(error.to_failure().kind, pb::FailureKind::Error as i32);
    }
}

#[tokio::test]
async fn slow_servers_time_out_and_big_answers_are_refused() {
    let (base, _recorder) = api_server().await;
    let mut config = get_config(format!("{base}/slow"));
    config.timeout = Some(prost_types::Duration { seconds: 0, nanos: 500_000_000 });
    let attempt = run(api_agent(config), json!({})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::TimedOut);
    assert!(attempt.error().is_retryable());
    assert!(attempt.elapsed < Duration::from_secs(3), "{:?}", attempt.elapsed);

    // Without its own timeout the agent's limit applies.
    let slow = agent(
        pb::AgentType::Api,
        pb::agent_config::Kind::Api(get_config(format!("{base}/slow"))),
        limits(Duration::from_secs(1), 0, 0, 0),
    );
    let attempt = run(slow, json!({})).await;
    assert_eq!(attempt.error().message, "the step exceeded its time limit of 1s");

    let attempt = run(api_agent(get_config(format!("{base}/big"))), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded);
    assert!(error.message.contains("50000 bytes"), "{}", error.message);
}

#[tokio::test]
async fn redirects_are_followed_and_vetted_again() {
    let (base, recorder) = api_server().await;
    let attempt = run(api_agent(get_config(format!("{base}/moved"))), json!({})).await;
    assert_eq!(attempt.output()["body"]["path"], "/echo/after-redirect");
    let system = attempt.log_texts(Some(LogStream::System));
    assert!(system.iter().any(|line| line.starts_with("redirected (303)")), "{system:?}");

    let mut post = get_config(format!("{base}/other"));
    post.method = pb::HttpMethod::Post as i32;
    post.body_template = "{\"x\": 1}".to_owned();
    let attempt = run(api_agent(post), json!({})).await;
    assert_eq!(attempt.output()["body"]["method"], "GET", "303 turns a POST into a GET");
    assert_eq!(attempt.output()["body"]["body"], "");
    assert_eq!(recorder.all().len(), 2);
}

#[tokio::test]
async fn private_addresses_are_refused_without_the_flag_and_nothing_is_sent() {
    let (base, recorder) = api_server().await;
    let mut config = get_config(format!("{base}/echo/secret"));
    config.allow_private_network = false;
    let attempt = run(api_agent(config), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert!(
        error.message.contains("refused: 127.0.0.1 is 127.0.0.1, a loopback address"),
        "{}",
        error.message
    );
    assert!(error.message.contains("allowPrivateNetwork"), "{}", error.message);

    let port = base.rsplit(':').next().unwrap();
    let localhost = get_config(format!("http://localhost:{port}/echo/secret"));
    let attempt =
        run(api_agent(pb::ApiAgentConfig { allow_private_network: false, ..localhost }), json!({}))
            .await;
    assert!(attempt.error().message.contains("loopback"), "{}", attempt.error().message);

    let metadata = get_config("http://169.254.169.254/latest/meta-data/".to_owned());
    let attempt = run(api_agent(metadata), json!({})).await;
    assert!(attempt.error().message.contains("cloud metadata"), "{}", attempt.error().message);

    let scheme = get_config("file:///etc/passwd".to_owned());
    let attempt = run(api_agent(scheme), json!({})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::NonRetryable);
    assert!(recorder.all().is_empty(), "the server got {:?}", recorder.all());

    // A redirect from an allowed server to a refused address is refused: every hop is vetted.
    let bouncer = Router::new().route(
        "/",
        get(|| async { Redirect::temporary("http://169.254.169.254/latest/meta-data/") }),
    );
    let bouncer_base = serve(bouncer).await;
    let attempt = run(api_agent(get_config(format!("{bouncer_base}/"))), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert!(error.message.contains("cloud metadata"), "{}", error.message);
    let system = attempt.log_texts(Some(LogStream::System));
    assert!(system.iter().any(|line| line.starts_with("redirected (307)")), "{system:?}");
}

#[tokio::test]
async fn configured_headers_never_follow_a_redirect_to_another_origin() {
    let (base, recorder) = api_server().await;
    let port = base.rsplit(':').next().unwrap();
    // Another origin (`localhost` is not `127.0.0.1`) bounces back to the echo server.
    let target = format!("http://localhost:{port}/echo/landed");
    let bouncer = Router::new().route(
        "/",
        any(move || {
            let target = target.clone();
            async move { Redirect::temporary(&target) }
        }),
    );
    let bouncer_base = serve(bouncer).await;
    let with_headers = |url: String| pb::ApiAgentConfig {
        method: pb::HttpMethod::Post as i32,
        headers: [
            ("x-auth-token".to_owned(), "token-7f2a".to_owned()),
            ("Authorization".to_owned(), "Bearer abc".to_owned()),
            ("x-tenant".to_owned(), "alpha".to_owned()),
        ]
        .into(),
        body_template: "{\"x\": 1}".to_owned(),
        ..get_config(url)
    };
    let attempt = run(api_agent(with_headers(format!("{bouncer_base}/"))), json!({})).await;
    assert_eq!(attempt.output()["body"]["path"], "/echo/landed");
    assert_eq!(attempt.output()["body"]["body"], "{\"x\": 1}", "a 307 keeps the body");
    let received = recorder.all();
    assert_eq!(received.len(), 1);
    for header in ["x-auth-token", "authorization", "x-tenant"] {
        assert!(!received[0].headers.contains_key(header), "{header} followed: {received:?}");
    }
    assert_eq!(received[0].headers["content-type"], "application/json");

    // Within one origin the headers follow.
    let attempt = run(api_agent(with_headers(format!("{base}/moved"))), json!({})).await;
    assert_eq!(attempt.output()["body"]["path"], "/echo/after-redirect");
    let received = recorder.all();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].headers["x-auth-token"], "token-7f2a");
}

#[tokio::test]
async fn credentials_in_urls_are_used_but_never_logged() {
    let (base, recorder) = api_server().await;
    let with_credentials = base.replacen("http://", "http://alice:hunter2@", 1);
    let attempt =
        run(api_agent(get_config(format!("{with_credentials}/echo/private"))), json!({})).await;
    assert_eq!(attempt.output()["body"]["path"], "/echo/private");
    // The server got them (as basic authentication), the step's log did not.
    let received = recorder.all();
    assert!(received[0].headers["authorization"].starts_with("Basic "), "{received:?}");
    let system = attempt.log_texts(Some(LogStream::System));
    assert!(system[0].starts_with(&format!("GET {base}/echo/private")), "{system:?}");
    for line in &attempt.logs {
        assert!(
            !line.text.contains("hunter2") && !line.text.contains("alice"),
            "logged: {}",
            line.text
        );
    }
}
