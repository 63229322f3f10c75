//! Alert rules end to end on real processes: the rule CRUD over REST and gRPC with its
//! validation, 404s and SSRF refusals (`dev`); a rule firing to a webhook receiver this test
//! runs, signed, retried after a 500 with every attempt in the delivery log, once per incident
//! and resolved (`dev`); and the same incident reported exactly once by two `serve` replicas on
//! one PostgreSQL and Redis, then resolved once.

#[path = "../support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::alert_service_client::AlertServiceClient;

use crate::support::api::{Api, Auth, assert_error, grpc, violated_fields};
use crate::support::{start_dev, start_serve, start_serve_replica};

/// One call the receiver got.
#[derive(Clone)]
struct ReceivedCall {
    headers: http::HeaderMap,
    body: Vec<u8>,
    answered: u16,
}

impl std::fmt::Debug for ReceivedCall {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ReceivedCall")
            .field("event", &self.header("x-turbocat-event"))
            .field("delivery", &self.header("x-turbocat-delivery"))
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("answered", &self.answered)
            .finish()
    }
}

impl ReceivedCall {
    fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    /// Whether the signature is the HMAC-SHA256 of `<timestamp>.<delivery>.<body>` with `secret`.
    fn signature_verifies(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(self.header("x-turbocat-timestamp").as_bytes());
        mac.update(b".");
        mac.update(self.header("x-turbocat-delivery").as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        self.header("x-turbocat-signature") == expected
    }
}

/// A webhook receiver on 127.0.0.1: answers the planned statuses in order, then 200.
#[derive(Clone)]
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<ReceivedCall>>>,
}

impl Receiver {
    async fn start(planned: &[u16]) -> Self {
        let calls: Arc<Mutex<Vec<ReceivedCall>>> = Arc::default();
        let plan: Arc<Mutex<VecDeque<u16>>> =
            Arc::new(Mutex::new(planned.iter().copied().collect()));
        let recorded = calls.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: http::HeaderMap, body: axum::body::Bytes| {
                let recorded = recorded.clone();
                let plan = plan.clone();
                async move {
                    let status = plan.lock().expect("plan").pop_front().unwrap_or(200);
                    recorded.lock().expect("calls").push(ReceivedCall {
                        headers,
                        body: body.to_vec(),
                        answered: status,
                    });
                    http::StatusCode::from_u16(status).expect("a status")
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self { url: format!("http://{address}/hook"), calls }
    }

    fn calls(&self) -> Vec<ReceivedCall> {
        self.calls.lock().expect("calls").clone()
    }

    /// The calls carrying `event`.
    fn calls_of(&self, event: &str) -> Vec<ReceivedCall> {
        self.calls().into_iter().filter(|call| call.header("x-turbocat-event") == event).collect()
    }

    /// The calls about one rule carrying `event`.
    fn calls_about(&self, rule_id: &str, event: &str) -> Vec<ReceivedCall> {
        self.calls_of(event)
            .into_iter()
            .filter(|call| call.json()["rule"]["id"] == rule_id)
            .collect()
    }

    /// Waits until a call about `rule_id` carrying `event` arrived (at most 30 s).
    async fn wait_about(&self, rule_id: &str, event: &str) -> ReceivedCall {
        let started = Instant::now();
        loop {
            if let Some(call) = self.calls_about(rule_id, event).pop() {
                return call;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no {event} call about {rule_id}: {:?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `count` calls of `event` arrived (at most 30 s).
    async fn wait_for(&self, event: &str, count: usize) -> Vec<ReceivedCall> {
        let started = Instant::now();
        loop {
            let calls = self.calls_of(event);
            if calls.len() >= count {
                return calls;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{} of {count} {event} calls arrived: {:?}",
                calls.len(),
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A DATA agent that fails when its input says `fail`, and a one-step workflow running it.
async fn failable_workflow(api: &Api, auth: &Auth) -> String {
    let (status, body) = api
        .post(
            "/api/v1/agents",
            auth,
            json!({ "name": "failable", "type": "DATA", "limits": {},
                    "config": { "data": { "jqProgram": "if .fail then error(\"boom\") else {ok: true} end" } } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let agent_id = body["data"]["id"].as_str().expect("agent id").to_owned();
    let steps =
        json!([{ "key": "only", "agentId": agent_id, "retryPolicy": { "maxAttempts": 1 } }]);
    let (status, body) =
        api.post("/api/v1/workflows", auth, json!({ "name": "watched", "steps": steps })).await;
    assert_eq!(status, 201, "{body}");
    body["data"]["id"].as_str().expect("workflow id").to_owned()
}

/// Starts an execution and returns its id.
async fn execute(api: &Api, auth: &Auth, workflow_id: &str, input: Value) -> String {
    let (status, body) = api
        .post(&format!("/api/v1/workflows/{workflow_id}/execute"), auth, json!({ "input": input }))
        .await;
    assert_eq!(status, 202, "{body}");
    body["data"]["id"].as_str().expect("execution id").to_owned()
}

/// Runs an execution to its end and returns its status.
async fn run(api: &Api, auth: &Auth, workflow_id: &str, input: Value) -> String {
    let execution_id = execute(api, auth, workflow_id, input).await;
    let started = Instant::now();
    loop {
        let (status, body) = api.get(&format!("/api/v1/executions/{execution_id}"), auth).await;
        assert_eq!(status, 200, "{body}");
        let state = body["data"]["status"].as_str().unwrap_or_default().to_owned();
        if ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&state.as_str()) {
            return state;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "still {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rule_data(api: &Api, auth: &Auth, rule_id: &str) -> Value {
    let (status, body) = api.get(&format!("/api/v1/alerts/{rule_id}"), auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

async fn list_data(api: &Api, auth: &Auth, path: &str) -> Vec<Value> {
    let (status, body) = api.get(path, auth).await;
    assert_eq!(status, 200, "{path}: {body}");
    body["data"].as_array().cloned().unwrap_or_default()
}

fn queued_step_rule(url: &str) -> pb::AlertRule {
    pb::AlertRule {
        name: "queue watch".to_owned(),
        condition: Some(pb::AlertCondition {
            r#type: pb::AlertConditionType::QueuedStepTooOld.into(),
            threshold_seconds: 3_600,
            ..Default::default()
        }),
        webhook: Some(pb::AlertWebhook { url: url.to_owned(), ..Default::default() }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_are_owned_validated_and_served_on_both_transports() {
    let (server, _directory) = dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("alerts-admin@example.com", "Admin").await.auth();
    let other = api.register("alerts-other@example.com", "Other").await.auth();
    let workflow_id = failable_workflow(&api, &admin).await;
    let receiver = Receiver::start(&[]).await;

    // Every bad field is named.
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &other,
            json!({ "name": "", "condition": { "type": "FAILURES_IN_WINDOW", "failureCount": 0,
                    "windowSeconds": 5, "agentId": "not-an-id" },
                    "webhook": { "url": "ftp://example.com/hook" } }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    for field in [
        "name",
        "condition.failureCount",
        "condition.windowSeconds",
        "condition.agentId",
        "webhook.url",
    ] {
        assert!(fields.contains(&field.to_owned()), "{field} in {fields:?}");
    }
    // A loopback address is refused by the SSRF guard, plain http by the scheme rule, and only
    // an administrator may open private networks.
    let loopback = receiver.url.replace("http://", "https://");
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &other,
            json!({ "name": "inside", "condition": { "type": "EXECUTION_FAILED", "workflowId": workflow_id },
                    "webhook": { "url": loopback } }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["webhook.url"]);
    assert!(body["error"]["details"].to_string().contains("loopback"), "{body}");
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &other,
            json!({ "name": "plain", "condition": { "type": "QUEUED_STEP_TOO_OLD", "thresholdSeconds": 60 },
                    "webhook": { "url": receiver.url } }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["webhook.url"]);
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &other,
            json!({ "name": "opened", "condition": { "type": "QUEUED_STEP_TOO_OLD", "thresholdSeconds": 60 },
                    "webhook": { "url": receiver.url, "allowPrivateNetwork": true } }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    // Another user's workflow is not a subject.
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &other,
            json!({ "name": "theirs", "condition": { "type": "EXECUTION_FAILED", "workflowId": workflow_id },
                    "webhook": { "url": "https://8.8.8.8/hook" } }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["condition.workflowId"]);

    // The administrator opens private networks for a rule: created, with a secret.
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &admin,
            json!({ "name": "watched failed", "condition": { "type": "EXECUTION_FAILED", "workflowId": workflow_id },
                    "webhook": { "url": receiver.url, "allowPrivateNetwork": true } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let rule = &body["data"];
    let rule_id = rule["id"].as_str().expect("rule id").to_owned();
    assert_eq!(rule["state"], "OK", "{rule}");
    assert_eq!(rule["condition"]["type"], "EXECUTION_FAILED", "{rule}");
    assert_eq!(rule["webhook"]["secret"].as_str().map(str::len), Some(64), "{rule}");

    // Another user: 404 on every operation, nothing listed.
    for path in [
        format!("/api/v1/alerts/{rule_id}"),
        format!("/api/v1/alerts/{rule_id}/deliveries"),
        format!("/api/v1/alerts/{rule_id}/incidents"),
    ] {
        let (status, body) = api.get(&path, &other).await;
        assert_error(status, &body, 404, "NOT_FOUND");
    }
    let (status, body) = api
        .patch(
            &format!("/api/v1/alerts/{rule_id}"),
            &other,
            json!({ "name": "mine", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&format!("/api/v1/alerts/{rule_id}"), &other).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert!(list_data(&api, &other, "/api/v1/alerts").await.is_empty());

    // gRPC: the same rules, the same rules of validation and ownership.
    let mut client = AlertServiceClient::new(api.channel().await);
    let got = client
        .get_alert_rule(grpc(pb::GetAlertRuleRequest { alert_rule_id: rule_id.clone() }, &admin))
        .await
        .expect("get over grpc")
        .into_inner()
        .alert_rule
        .expect("rule");
    assert_eq!(got.name, "watched failed");
    assert_eq!(got.condition.expect("condition").workflow_id, workflow_id);
    let refused = client
        .get_alert_rule(grpc(pb::GetAlertRuleRequest { alert_rule_id: rule_id.clone() }, &other))
        .await
        .expect_err("another user's rule");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    let mut bad = queued_step_rule("https://8.8.8.8/hook");
    bad.condition = Some(pb::AlertCondition {
        r#type: pb::AlertConditionType::QueuedStepTooOld.into(),
        threshold_seconds: 0,
        ..Default::default()
    });
    let refused = client
        .create_alert_rule(grpc(pb::CreateAlertRuleRequest { alert_rule: Some(bad) }, &other))
        .await
        .expect_err("a zero threshold");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), vec!["condition.thresholdSeconds"]);
    let created = client
        .create_alert_rule(grpc(
            pb::CreateAlertRuleRequest {
                alert_rule: Some(queued_step_rule("https://8.8.8.8/hook")),
            },
            &other,
        ))
        .await
        .expect("create over grpc")
        .into_inner()
        .alert_rule
        .expect("rule");
    assert_eq!(created.state, pb::AlertState::Ok as i32);
    // An administrator sees another user's rule, but neither its secret nor its URL's path.
    let seen = rule_data(&api, &admin, &created.id).await;
    assert_eq!(seen["webhook"]["url"], "https://8.8.8.8/…", "{seen}");
    assert!(seen["webhook"]["secret"].as_str().unwrap_or_default().is_empty(), "{seen}");
    let own = rule_data(&api, &other, &created.id).await;
    assert_eq!(own["webhook"]["url"], "https://8.8.8.8/hook", "{own}");
    let updated = client
        .update_alert_rule(grpc(
            pb::UpdateAlertRuleRequest {
                alert_rule: Some(pb::AlertRule {
                    id: created.id.clone(),
                    name: "queue watch, renamed".to_owned(),
                    version: created.version,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths: vec!["name".to_owned()] }),
            },
            &other,
        ))
        .await
        .expect("update over grpc")
        .into_inner()
        .alert_rule
        .expect("rule");
    assert_eq!(updated.name, "queue watch, renamed");
    assert_eq!(updated.version, created.version + 1);
    assert_eq!(updated.webhook.expect("webhook").secret, created.webhook.expect("webhook").secret);
    let listed = list_data(&api, &other, "/api/v1/alerts").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "queue watch, renamed");
    let listed = client
        .list_alert_rules(grpc(pb::ListAlertRulesRequest::default(), &other))
        .await
        .expect("list over grpc")
        .into_inner();
    assert_eq!(
        listed.alert_rules.iter().map(|rule| rule.id.as_str()).collect::<Vec<_>>(),
        vec![created.id.as_str()]
    );
    assert_eq!(listed.pagination.expect("pagination").total, 1);
    let refused = client
        .delete_alert_rule(grpc(
            pb::DeleteAlertRuleRequest { alert_rule_id: rule_id.clone(), version: 0 },
            &other,
        ))
        .await
        .expect_err("another user's rule");
    assert_eq!(refused.code(), tonic::Code::NotFound);
    // A stale version is a conflict; the current one deletes.
    let (status, body) = api
        .patch(
            &format!("/api/v1/alerts/{}", created.id),
            &other,
            json!({ "disabled": true, "version": 1 }),
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body) = api.delete(&format!("/api/v1/alerts/{}", created.id), &other).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&format!("/api/v1/alerts/{}", created.id), &other).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert!(receiver.calls().is_empty(), "nothing fired: {:?}", receiver.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_execution_fires_once_retries_and_resolves_on_dev() {
    let (server, _directory) = dev(&["--alert-retry-backoff-ms", "200"]);
    let api = Api::new(&server);
    let admin = api.register("alerts-dev@example.com", "Admin").await.auth();
    let workflow_id = failable_workflow(&api, &admin).await;
    let receiver = Receiver::start(&[500]).await;
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            &admin,
            json!({ "name": "watched failed", "condition": { "type": "EXECUTION_FAILED", "workflowId": workflow_id },
                    "webhook": { "url": receiver.url, "allowPrivateNetwork": true } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let rule_id = body["data"]["id"].as_str().expect("rule id").to_owned();
    let secret = body["data"]["webhook"]["secret"].as_str().expect("secret").to_owned();

    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": true })).await, "FAILED");
    // The first call answered 500; the retry got through.
    let firing = receiver.wait_for("FIRING", 2).await;
    assert_eq!(firing[0].answered, 500);
    assert_eq!(firing[1].answered, 200);
    for call in &firing {
        assert!(call.signature_verifies(&secret), "signed: {call:?}");
        assert!(!call.signature_verifies("another secret"));
        assert_eq!(call.header("content-type"), "application/json");
    }
    assert_eq!(
        firing[0].header("x-turbocat-delivery"),
        firing[1].header("x-turbocat-delivery"),
        "a retry carries the same delivery id"
    );
    let payload = firing[1].json();
    let text = payload["text"].as_str().expect("a Slack-compatible text");
    assert!(text.starts_with("[FIRING] watched failed"), "{text}");
    assert!(text.contains("boom"), "{text}");
    assert_eq!(payload["event"], "FIRING");
    assert_eq!(payload["rule"]["id"], rule_id.as_str());

    let deliveries = list_data(&api, &admin, &format!("/api/v1/alerts/{rule_id}/deliveries")).await;
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    let first = deliveries.iter().find(|delivery| delivery["attempt"] == 1).expect("attempt 1");
    let second = deliveries.iter().find(|delivery| delivery["attempt"] == 2).expect("attempt 2");
    assert_eq!(first["responseStatus"], 500, "{first}");
    assert!(first["succeeded"].as_bool() != Some(true), "{first}");
    assert!(first["error"].as_str().unwrap_or_default().contains("500"), "{first}");
    assert_eq!(second["responseStatus"], 200, "{second}");
    assert_eq!(second["succeeded"], true, "{second}");
    assert_eq!(second["event"], "FIRING");
    assert_eq!(rule_data(&api, &admin, &rule_id).await["state"], "FIRING");

    // Another failure within the same incident is not reported again.
    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": true })).await, "FAILED");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(receiver.calls_of("FIRING").len(), 2, "{:?}", receiver.calls());

    // A success resolves it, once.
    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": false })).await, "SUCCEEDED");
    let resolved = receiver.wait_for("RESOLVED", 1).await;
    assert!(resolved[0].signature_verifies(&secret));
    let text = resolved[0].json()["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.starts_with("[RESOLVED] watched failed"), "{text}");
    let incidents = list_data(&api, &admin, &format!("/api/v1/alerts/{rule_id}/incidents")).await;
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert!(incidents[0]["resolvedAt"].is_string(), "{incidents:?}");
    let rule = rule_data(&api, &admin, &rule_id).await;
    assert_eq!(rule["state"], "OK", "{rule}");
    assert!(rule["lastResolvedAt"].is_string(), "{rule}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.calls().len(), 3, "{:?}", receiver.calls());
}

/// Creates a rule over REST and returns its id.
async fn create_rule(api: &Api, auth: &Auth, name: &str, condition: Value, url: &str) -> String {
    let (status, body) = api
        .post(
            "/api/v1/alerts",
            auth,
            json!({ "name": name, "condition": condition,
                    "webhook": { "url": url, "allowPrivateNetwork": true } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["data"]["id"].as_str().expect("rule id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_in_a_window_a_failing_agent_and_a_step_no_runner_takes_fire_on_dev() {
    let (server, _directory) = dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("alerts-conditions@example.com", "Admin").await.auth();
    let workflow_id = failable_workflow(&api, &admin).await;
    let (status, body) = api.get(&format!("/api/v1/workflows/{workflow_id}"), &admin).await;
    assert_eq!(status, 200, "{body}");
    let agent_id = body["data"]["steps"][0]["agentId"].as_str().expect("agent id").to_owned();
    let receiver = Receiver::start(&[]).await;
    let window = create_rule(
        &api,
        &admin,
        "two failures",
        json!({ "type": "FAILURES_IN_WINDOW", "workflowId": workflow_id,
                "failureCount": 2, "windowSeconds": 600 }),
        &receiver.url,
    )
    .await;
    let failing_agent = create_rule(
        &api,
        &admin,
        "agent failing",
        json!({ "type": "AGENT_FAILING", "agentId": agent_id }),
        &receiver.url,
    )
    .await;

    // One failure is not two; the second fires as it finishes.
    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": true })).await, "FAILED");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(receiver.calls_about(&window, "FIRING").is_empty(), "{:?}", receiver.calls());
    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": true })).await, "FAILED");
    let fired = receiver.wait_about(&window, "FIRING").await;
    let text = fired.json()["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.contains("2 executions of workflow"), "{text}");
    // Two failures of two runs is not yet FAILING (three are needed); the third is.
    assert!(receiver.calls_about(&failing_agent, "FIRING").is_empty(), "{:?}", receiver.calls());
    assert_eq!(run(&api, &admin, &workflow_id, json!({ "fail": true })).await, "FAILED");
    let fired = receiver.wait_about(&failing_agent, "FIRING").await;
    let text = fired.json()["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.contains("is FAILING: 3 of 3 runs failed"), "{text}");
    assert_eq!(receiver.calls_about(&window, "FIRING").len(), 1, "{:?}", receiver.calls());

    // A step that needs a label the local runner lacks waits with no runner to take it.
    let steps = json!([{ "key": "gpu", "agentId": agent_id, "requiredLabels": { "gpu": "a100" } }]);
    let (status, body) = api
        .post("/api/v1/workflows", &admin, json!({ "name": "needs a gpu", "steps": steps }))
        .await;
    assert_eq!(status, 201, "{body}");
    let gpu_workflow = body["data"]["id"].as_str().expect("workflow id").to_owned();
    let no_runner = create_rule(
        &api,
        &admin,
        "no runner",
        json!({ "type": "NO_RUNNER_AVAILABLE", "thresholdSeconds": 1 }),
        &receiver.url,
    )
    .await;
    let execution_id = execute(&api, &admin, &gpu_workflow, json!({})).await;
    let fired = receiver.wait_about(&no_runner, "FIRING").await;
    let text = fired.json()["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.contains(&format!("step gpu of execution {execution_id}")), "{text}");
    assert!(text.contains("none of the 1 runners"), "{text}");
    let (status, body) =
        api.post(&format!("/api/v1/executions/{execution_id}/cancel"), &admin, json!({})).await;
    assert!(status == 200 || status == 202, "{status}: {body}");
    receiver.wait_about(&no_runner, "RESOLVED").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_replicas_report_an_incident_once_and_resolve_it_once() {
    let prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let flags = [
        "--alerts-allow-private-network",
        "true",
        "--alert-evaluation-seconds",
        "1",
        "--alert-retry-backoff-ms",
        "200",
        "--redis-key-prefix",
        prefix.as_str(),
    ];
    let (first, database) = start_serve(&flags).await;
    let second = start_serve_replica(&database, &flags).await;
    let first_api = Api::new(&first);
    let second_api = Api::new(&second);
    first_api.register("alerts-serve-admin@example.com", "Admin").await;
    let user = first_api.register("alerts-serve@example.com", "User").await.auth();
    let receiver = Receiver::start(&[500]).await;

    // The server's opt-in lets a user's rule call the local receiver over plain http.
    let (status, body) = second_api
        .post(
            "/api/v1/alerts",
            &user,
            json!({ "name": "stuck queue", "condition": { "type": "QUEUED_STEP_TOO_OLD", "thresholdSeconds": 1 },
                    "webhook": { "url": receiver.url } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let rule_id = body["data"]["id"].as_str().expect("rule id").to_owned();
    let secret = body["data"]["webhook"]["secret"].as_str().expect("secret").to_owned();

    // No runner is attached: the step waits in the queue.
    let workflow_id = failable_workflow(&first_api, &user).await;
    let execution_id = execute(&first_api, &user, &workflow_id, json!({})).await;
    // The first call answers 500; the replica that opened the incident calls again.
    let firing = receiver.wait_for("FIRING", 2).await;
    assert_eq!((firing[0].answered, firing[1].answered), (500, 200), "{firing:?}");
    assert_eq!(firing[0].header("x-turbocat-delivery"), firing[1].header("x-turbocat-delivery"));
    assert!(firing.iter().all(|call| call.signature_verifies(&secret)), "{firing:?}");
    let text = firing[1].json()["text"].as_str().unwrap_or_default().to_owned();
    assert!(text.starts_with("[FIRING] stuck queue: the oldest queued step has waited"), "{text}");
    // Both replicas keep evaluating every second; the incident stays reported once.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.calls_of("FIRING").len(), 2, "{:?}", receiver.calls());
    assert_eq!(rule_data(&second_api, &user, &rule_id).await["state"], "FIRING");

    let (status, body) = second_api
        .post(&format!("/api/v1/executions/{execution_id}/cancel"), &user, json!({}))
        .await;
    assert!(status == 200 || status == 202, "{status}: {body}");
    let resolved = receiver.wait_for("RESOLVED", 1).await;
    assert!(resolved[0].signature_verifies(&secret));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.calls_of("RESOLVED").len(), 1, "{:?}", receiver.calls());
    assert_eq!(receiver.calls().len(), 3, "{:?}", receiver.calls());

    let mut client = AlertServiceClient::new(first_api.channel().await);
    let incidents = client
        .list_alert_incidents(grpc(
            pb::ListAlertIncidentsRequest { alert_rule_id: rule_id.clone(), ..Default::default() },
            &user,
        ))
        .await
        .expect("incidents over grpc")
        .into_inner()
        .incidents;
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert!(incidents[0].resolved_at.is_some());
    let deliveries = client
        .list_alert_deliveries(grpc(
            pb::ListAlertDeliveriesRequest { alert_rule_id: rule_id, ..Default::default() },
            &user,
        ))
        .await
        .expect("deliveries over grpc")
        .into_inner()
        .deliveries;
    let mut attempts: Vec<(i32, i32, i32, bool)> = deliveries
        .iter()
        .map(|delivery| {
            (delivery.event, delivery.attempt, delivery.response_status, delivery.succeeded)
        })
        .collect();
    attempts.sort_unstable();
    let (firing, resolved) = (pb::AlertEvent::Firing as i32, pb::AlertEvent::Resolved as i32);
    assert_eq!(
        attempts,
        vec![(firing, 1, 500, false), (firing, 2, 200, true), (resolved, 1, 200, true)],
        "{deliveries:?}"
    );
}

/// `turbocat dev` evaluating alert rules every second.
fn dev(extra: &[&str]) -> (support::TurbocatProcess, tempfile::TempDir) {
    let mut flags = vec!["--alert-evaluation-seconds", "1"];
    flags.extend_from_slice(extra);
    start_dev(&flags)
}

/// Each fault of a rule's webhook and of an AGENT_FAILING condition is named on its own field,
/// over REST and gRPC, and nothing is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webhook_and_agent_condition_fault_is_named_on_both_transports() {
    let (server, _directory) = dev(&[]);
    let api = Api::new(&server);
    let owner = api.register("alerts-faults@example.com", "Owner").await.auth();
    let mut client = AlertServiceClient::new(api.channel().await);
    let queued = json!({ "type": "QUEUED_STEP_TOO_OLD", "thresholdSeconds": 60 });
    let long_url = format!("https://example.com/{}", "a".repeat(2_048));
    let cases = [
        ("no webhook", json!({ "name": "n", "condition": queued }), vec!["webhook"]),
        (
            "a secret chosen by the caller",
            json!({ "name": "n", "condition": queued,
                    "webhook": { "url": "https://8.8.8.8/hook", "secret": "mine" } }),
            vec!["webhook.secret"],
        ),
        (
            "no URL",
            json!({ "name": "n", "condition": queued, "webhook": { "url": "  " } }),
            vec!["webhook.url"],
        ),
        (
            "a URL too long",
            json!({ "name": "n", "condition": queued, "webhook": { "url": long_url } }),
            vec!["webhook.url"],
        ),
        (
            "not a URL",
            json!({ "name": "n", "condition": queued, "webhook": { "url": "hook me" } }),
            vec!["webhook.url"],
        ),
        (
            "credentials in the URL",
            json!({ "name": "n", "condition": queued,
                    "webhook": { "url": "https://user:password@8.8.8.8/hook" } }),
            vec!["webhook.url"],
        ),
        (
            "an agent condition without its agent, with fields of other conditions",
            json!({ "name": "n",
                    "condition": { "type": "AGENT_FAILING", "workflowId": "x", "failureCount": 2,
                                   "thresholdSeconds": 60, "windowSeconds": 1 },
                    "webhook": { "url": "https://8.8.8.8/hook" } }),
            vec![
                "condition.agentId",
                "condition.workflowId",
                "condition.failureCount",
                "condition.thresholdSeconds",
                "condition.windowSeconds",
            ],
        ),
    ];
    for (case, rule, expected) in cases {
        let (status, body) = api.post("/api/v1/alerts", &owner, rule.clone()).await;
        let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
        for field in &expected {
            assert!(fields.contains(&(*field).to_owned()), "{case}: {field} in {body}");
        }
        let message: pb::AlertRule =
            turbocat::proto::json::decode("turbocat.v1.AlertRule", rule).expect("decodes");
        let status = client
            .create_alert_rule(grpc(
                pb::CreateAlertRuleRequest { alert_rule: Some(message) },
                &owner,
            ))
            .await
            .expect_err(case);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{case}");
        let fields = violated_fields(&status);
        for field in &expected {
            assert!(fields.contains(&(*field).to_owned()), "{case}: {field} in {fields:?}");
        }
    }
    assert!(list_data(&api, &owner, "/api/v1/alerts").await.is_empty(), "nothing was saved");
}
