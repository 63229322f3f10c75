//! Deployments come alive: cron schedules start executions (once per tick across `serve`
//! replicas) and stop with the deployment, signed webhooks start one execution per call, a
//! single-agent deployment runs its agent as a one-step workflow, and the agent's status
//! follows its deployments. `dev` runs the steps on its in-process runner; `serve` gets a real
//! `turbocat runner` process.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use turbocat::proto::v1::deployment_service_client::DeploymentServiceClient;
use turbocat::proto::v1::{StartDeploymentRequest, StopDeploymentRequest};

use crate::Installation;
use crate::support::api::{Account, Api, Auth, assert_error, grpc};
use crate::support::{start_serve, start_serve_replica, turbocat_command};

/// How long an execution may take to finish.
const FINISH_LIMIT: Duration = Duration::from_secs(60);

/// A `turbocat runner` process working for `owner` (its key's owner), killed when dropped.
struct RunnerProcess {
    child: std::process::Child,
}

impl RunnerProcess {
    async fn start(api: &Api, owner: &Account) -> Self {
        let (key, _) = api.create_key(&owner.auth(), "runner", &["RUNNER"]).await;
        let mut command = turbocat_command();
        command
            .args(["runner", "--server", &api.base_url, "--name", "triggers", "--capacity", "4"])
            .env("TURBOCAT_API_KEY", key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let runner = Self { child: command.spawn().expect("spawn runner") };
        let started = Instant::now();
        loop {
            let (status, body) = api.get("/api/v1/runners", &owner.auth()).await;
            assert_eq!(status, 200, "{body}");
            if body["data"].as_array().is_some_and(|runners| !runners.is_empty()) {
                return runner;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the runner never attached");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A runner for Ann's steps on `serve` (`dev` runs them in process).
async fn with_runner(installation: &Installation, serve: bool) -> Option<RunnerProcess> {
    if serve {
        Some(RunnerProcess::start(&installation.api, &installation.ann).await)
    } else {
        None
    }
}

/// The signature of a webhook call as the README documents it: the hex HMAC-SHA256 of
/// `<timestamp>.<delivery>.<body>` keyed with the deployment's secret.
fn sign(secret: &str, timestamp: &str, delivery: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp}.{delivery}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The three headers of a call signed now, with a fresh delivery id.
fn signed_headers(secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let delivery = format!("evt_{}", uuid::Uuid::new_v4().simple());
    vec![
        ("X-Turbocat-Signature", format!("sha256={}", sign(secret, &timestamp, &delivery, body))),
        ("X-Turbocat-Timestamp", timestamp),
        ("X-Turbocat-Delivery", delivery),
    ]
}

/// A webhook call signed now with `secret`: (status, body).
async fn post_signed(api: &Api, deployment_id: &str, secret: &str, body: &[u8]) -> (u16, Value) {
    post_webhook(api, deployment_id, &signed_headers(secret, body), body).await
}

/// A raw webhook call with exactly `headers`: (status, body).
async fn post_webhook(
    api: &Api,
    deployment_id: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/v1/webhooks/{deployment_id}", api.base_url))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("webhook call");
    let status = response.status().as_u16();
    let text = response.text().await.expect("webhook answer");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn create(api: &Api, auth: &Auth, path: &str, body: Value) -> Value {
    let (status, answer) = api.post(path, auth, body).await;
    assert_eq!(status, 201, "POST {path}: {answer}");
    answer["data"].clone()
}

async fn jq_agent(api: &Api, auth: &Auth, name: &str, program: &str) -> String {
    let agent = create(
        api,
        auth,
        "/api/v1/agents",
        json!({ "name": name, "type": "DATA", "config": { "data": { "jqProgram": program } } }),
    )
    .await;
    agent["id"].as_str().expect("agent id").to_owned()
}

async fn post_ok(api: &Api, auth: &Auth, path: &str) -> Value {
    let (status, body) = api.post(path, auth, json!({})).await;
    assert_eq!(status, 200, "POST {path}: {body}");
    body["data"].clone()
}

async fn agent_status(api: &Api, auth: &Auth, agent_id: &str) -> String {
    let (status, body) = api.get(&format!("/api/v1/agents/{agent_id}"), auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"]["status"].as_str().expect("status").to_owned()
}

/// The deployment's executions, oldest first.
async fn executions_of(api: &Api, auth: &Auth, deployment_id: &str) -> Vec<Value> {
    let (status, body) = api
        .get(&format!("/api/v1/executions?deploymentId={deployment_id}&pageSize=100"), auth)
        .await;
    assert_eq!(status, 200, "{body}");
    let mut executions = body["data"].as_array().expect("executions").clone();
    executions.reverse();
    executions
}

async fn finished(api: &Api, auth: &Auth, execution_id: &str) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = api.get(&format!("/api/v1/executions/{execution_id}"), auth).await;
        assert_eq!(status, 200, "{body}");
        let execution = body["data"].clone();
        let state = execution["status"].as_str().unwrap_or_default();
        if ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&state) {
            return execution;
        }
        assert!(started.elapsed() < FINISH_LIMIT, "still {state}: {execution}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lifecycle events of the deployment's log, newest first: (event, message).
async fn lifecycle(api: &Api, auth: &Auth, deployment_id: &str) -> Vec<(String, String)> {
    let (status, body) =
        api.get(&format!("/api/v1/deployments/{deployment_id}/logs?pageSize=100"), auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|entry| entry["kind"] == "LIFECYCLE")
        .map(|entry| {
            (
                entry["event"].as_str().unwrap_or_default().to_owned(),
                entry["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// The tick times named by the deployment's TRIGGERED events.
async fn fired_ticks(api: &Api, auth: &Auth, deployment_id: &str) -> Vec<String> {
    lifecycle(api, auth, deployment_id)
        .await
        .into_iter()
        .filter(|(event, _)| event == "TRIGGERED")
        .map(|(_, message)| {
            message
                .strip_prefix("cron tick ")
                .and_then(|rest| rest.split_once(": started execution "))
                .map(|(tick, _)| tick.to_owned())
                .unwrap_or_else(|| panic!("not a cron trigger: {message}"))
        })
        .collect()
}

async fn wait_until(what: &str, limit: Duration, mut probe: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !probe().await {
        assert!(started.elapsed() < limit, "not {what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Cron
// ---------------------------------------------------------------------------------------------

/// A seconds-level schedule on a workflow starts executions that succeed with the deployment's
/// input; stopping it (over gRPC) stops them.
async fn cron_runs_on_schedule_and_stops(installation: Installation, serve: bool) {
    let _runner = with_runner(&installation, serve).await;
    let Installation { api, ann, .. } = &installation;
    let auth = ann.auth();
    let agent_id =
        jq_agent(api, &auth, "Ticker", "{ tick: true, region: .region, env: .env.STAGE }").await;
    let workflow = create(
        api,
        &auth,
        "/api/v1/workflows",
        json!({ "name": "Ticks", "steps": [{ "key": "tick", "name": "Tick", "agentId": agent_id }] }),
    )
    .await;
    let workflow_id = workflow["id"].as_str().expect("workflow id");
    let deployment = create(
        api,
        &auth,
        "/api/v1/deployments",
        json!({
            "name": "Every second",
            "workflowId": workflow_id,
            "config": { "inputDefaults": { "region": "eu" }, "environmentValues": { "STAGE": "prod" } },
            "trigger": { "type": "CRON", "cronExpression": "* * * * * *", "timezone": "Asia/Tokyo" },
        }),
    )
    .await;
    let deployment_id = deployment["id"].as_str().expect("deployment id").to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(executions_of(api, &auth, &deployment_id).await.is_empty(), "STOPPED fires nothing");

    let mut client = DeploymentServiceClient::new(api.channel().await);
    let started = client
        .start_deployment(grpc(
            StartDeploymentRequest { deployment_id: deployment_id.clone() },
            &auth,
        ))
        .await
        .expect("start")
        .into_inner()
        .deployment
        .expect("deployment");
    assert!(started.next_run_at.is_some(), "{started:?}");
    wait_until("fired twice", Duration::from_secs(20), async || {
        executions_of(api, &auth, &deployment_id).await.len() >= 2
    })
    .await;
    let fired = executions_of(api, &auth, &deployment_id).await;
    for execution in fired.iter().take(2) {
        assert_eq!(execution["trigger"], "CRON", "{execution}");
        assert_eq!(execution["deploymentId"], deployment_id);
        assert_eq!(execution["workflowId"], workflow_id);
        let id = execution["id"].as_str().expect("execution id");
        let done = finished(api, &auth, id).await;
        assert_eq!(done["status"], "SUCCEEDED", "{done}");
        assert_eq!(done["input"], json!({ "region": "eu", "env": { "STAGE": "prod" } }));
        assert_eq!(done["output"], json!({ "tick": true, "region": "eu", "env": "prod" }));
    }
    let (_, body) = api.get(&format!("/api/v1/deployments/{deployment_id}"), &auth).await;
    assert!(body["data"]["lastTriggeredAt"].is_string(), "{body}");
    let ticks = fired_ticks(api, &auth, &deployment_id).await;
    assert!(ticks.len() >= 2, "{ticks:?}");
    assert_eq!(
        ticks.iter().collect::<BTreeSet<_>>().len(),
        ticks.len(),
        "each tick once: {ticks:?}"
    );

    let stopped = client
        .stop_deployment(grpc(
            StopDeploymentRequest { deployment_id: deployment_id.clone() },
            &auth,
        ))
        .await
        .expect("stop")
        .into_inner()
        .deployment
        .expect("deployment");
    assert!(stopped.next_run_at.is_none());
    // A tick claimed just before the stop may still be starting: let it land, then count.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after_stop = executions_of(api, &auth, &deployment_id).await.len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(executions_of(api, &auth, &deployment_id).await.len(), after_stop, "stopped");
    let (_, body) = api.get(&format!("/api/v1/deployments/{deployment_id}"), &auth).await;
    assert!(body["data"]["nextRunAt"].is_null(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_runs_on_schedule_and_stops_on_dev() {
    cron_runs_on_schedule_and_stops(Installation::dev().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_runs_on_schedule_and_stops_on_serve() {
    cron_runs_on_schedule_and_stops(Installation::serve().await, true).await;
}

/// Ticks missed while no server ran (here: a yearly `next_run_at` three years old, as a server
/// down that long leaves it) fire once, and the schedule goes on from now.
async fn missed_ticks_fire_once(installation: Installation) {
    let Installation { api, ann, store, .. } = &installation;
    let auth = ann.auth();
    let agent_id = jq_agent(api, &auth, "Yearly", ".").await;
    let deployment = create(
        api,
        &auth,
        "/api/v1/deployments",
        json!({
            "name": "New year",
            "agentId": agent_id,
            "trigger": { "type": "CRON", "cronExpression": "0 0 1 1 *" },
        }),
    )
    .await;
    let deployment_id = deployment["id"].as_str().expect("id").to_owned();
    let started = post_ok(api, &auth, &format!("/api/v1/deployments/{deployment_id}/start")).await;
    let next_run_at = started["nextRunAt"].as_str().expect("next run").to_owned();
    let id: uuid::Uuid = deployment_id.parse().expect("uuid");
    let long_ago = chrono::Utc::now() - chrono::Duration::days(3 * 366);
    store.set_next_run(id, Some(long_ago), None).await.expect("backdate the schedule");

    wait_until("fired", Duration::from_secs(10), async || {
        !executions_of(api, &auth, &deployment_id).await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let executions = executions_of(api, &auth, &deployment_id).await;
    assert_eq!(executions.len(), 1, "once, not a burst of three years of ticks");
    assert_eq!(executions[0]["trigger"], "CRON");
    let (_, body) = api.get(&format!("/api/v1/deployments/{deployment_id}"), &auth).await;
    assert_eq!(body["data"]["nextRunAt"], next_run_at, "the next new year: {body}");
    assert_eq!(fired_ticks(api, &auth, &deployment_id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_fire_once_on_dev() {
    missed_ticks_fire_once(Installation::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_ticks_fire_once_on_serve() {
    missed_ticks_fire_once(Installation::serve().await).await;
}

/// Two replicas poll the same schedule: every tick fires once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_replicas_fire_each_tick_once() {
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let (first, database) = start_serve(&["--redis-key-prefix", redis_prefix.as_str()]).await;
    let second =
        start_serve_replica(&database, &["--redis-key-prefix", redis_prefix.as_str()]).await;
    let api = Api::new(&first);
    let admin = api.register("replicas@example.com", "Replicas").await;
    let auth = admin.auth();
    let _runner = RunnerProcess::start(&api, &admin).await;
    let agent_id = jq_agent(&api, &auth, "Echo", "{ ok: true }").await;
    let deployment = create(
        &api,
        &auth,
        "/api/v1/deployments",
        json!({
            "name": "Busy",
            "agentId": agent_id,
            "trigger": { "type": "CRON", "cronExpression": "* * * * * *" },
        }),
    )
    .await;
    let deployment_id = deployment["id"].as_str().expect("id").to_owned();
    // Started on one replica, stopped on the other.
    post_ok(&api, &auth, &format!("/api/v1/deployments/{deployment_id}/start")).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let on_second = Api::new(&second);
    post_ok(&on_second, &auth, &format!("/api/v1/deployments/{deployment_id}/stop")).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_millis(700)).await;

    let executions = executions_of(&api, &auth, &deployment_id).await;
    let ticks = fired_ticks(&api, &auth, &deployment_id).await;
    let distinct: BTreeSet<&String> = ticks.iter().collect();
    assert_eq!(distinct.len(), ticks.len(), "a tick fired twice: {ticks:?}");
    assert_eq!(executions.len(), ticks.len(), "one execution per fired tick");
    let seconds = usize::try_from(elapsed.as_secs()).expect("small");
    assert!(
        executions.len() >= 3 && executions.len() <= seconds + 1,
        "{} executions in {elapsed:?}: {ticks:?}",
        executions.len()
    );
    for execution in &executions {
        let id = execution["id"].as_str().expect("id");
        let done = finished(&api, &auth, id).await;
        assert_eq!(done["status"], "SUCCEEDED", "{done}");
        assert_eq!(done["output"], json!({ "ok": true }));
    }
}

// ---------------------------------------------------------------------------------------------
// Webhooks, single agents and the agent's status
// ---------------------------------------------------------------------------------------------

/// A single-agent webhook deployment: signed calls start executions of the agent as a one-step
/// workflow; bad, missing and stale calls are refused and start nothing; the agent is RUNNING
/// while one of its deployments runs.
async fn webhooks_start_single_agent_executions(installation: Installation, serve: bool) {
    let _runner = with_runner(&installation, serve).await;
    let Installation { api, ann, bob, .. } = &installation;
    let auth = ann.auth();
    let agent_id =
        jq_agent(api, &auth, "Greeter", "{ greeting: (\"hello \" + .name), env: .env.REGION }")
            .await;
    let deployment = create(
        api,
        &auth,
        "/api/v1/deployments",
        json!({
            "name": "Hook",
            "agentId": agent_id,
            "config": { "inputDefaults": { "name": "nobody" }, "environmentValues": { "REGION": "eu" } },
            "trigger": { "type": "WEBHOOK" },
        }),
    )
    .await;
    let deployment_id = deployment["id"].as_str().expect("id").to_owned();
    let secret = deployment["trigger"]["webhookSecret"].as_str().expect("secret").to_owned();
    let body = br#"{"name":"Ada","extra":[1,2]}"#;

    // Not started: nothing listens.
    let (status, answer) = post_signed(api, &deployment_id, &secret, body).await;
    assert_error(status, &answer, 404, "NOT_FOUND");
    assert_eq!(agent_status(api, &auth, &agent_id).await, "IDLE");

    post_ok(api, &auth, &format!("/api/v1/deployments/{deployment_id}/start")).await;
    assert_eq!(agent_status(api, &auth, &agent_id).await, "RUNNING");

    // A good signature: 202 with the execution's id only (its input holds the deployment's
    // environment values, which the caller has no right to read), and an execution of the
    // agent with the body as input.
    let headers = signed_headers(&secret, body);
    let (status, answer) = post_webhook(api, &deployment_id, &headers, body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["success"], true);
    let data = answer["data"].as_object().expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), vec!["executionId"], "{answer}");
    assert!(!answer.to_string().contains("REGION"), "{answer}");
    let execution_id = answer["data"]["executionId"].as_str().expect("id").to_owned();
    let (status, shown) = api.get(&format!("/api/v1/executions/{execution_id}"), &auth).await;
    assert_eq!(status, 200, "{shown}");
    let execution = shown["data"].clone();
    assert_eq!(execution["trigger"], "WEBHOOK", "{execution}");
    assert_eq!(execution["deploymentId"], deployment_id);
    assert_eq!(execution["workflowId"], "", "a single agent has no workflow");
    assert_eq!(
        execution["input"],
        json!({ "name": "Ada", "extra": [1, 2], "env": { "REGION": "eu" } })
    );
    let done = finished(api, &auth, &execution_id).await;
    assert_eq!(done["status"], "SUCCEEDED", "{done}");
    assert_eq!(done["output"], json!({ "greeting": "hello Ada", "env": "eu" }));
    let step_runs = done["stepRuns"].as_array().expect("step runs");
    assert_eq!(step_runs.len(), 1, "{done}");
    assert_eq!(step_runs[0]["stepKey"], "agent");
    assert_eq!(step_runs[0]["agentId"], agent_id);
    assert_eq!(step_runs[0]["output"], done["output"], "the execution's output is the agent's");

    // The same call again is a replay: refused, nothing started.
    let (status, answer) = post_webhook(api, &deployment_id, &headers, body).await;
    assert_error(status, &answer, 409, "CONFLICT");

    // A bare hex signature is accepted too; an empty body is `{}` under the input defaults.
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let bare = vec![
        ("X-Turbocat-Signature", sign(&secret, &timestamp, "evt-empty", b"")),
        ("X-Turbocat-Timestamp", timestamp.clone()),
        ("X-Turbocat-Delivery", "evt-empty".to_owned()),
    ];
    let (status, answer) = post_webhook(api, &deployment_id, &bare, b"").await;
    assert_eq!(status, 202, "{answer}");
    let done = finished(api, &auth, answer["data"]["executionId"].as_str().expect("id")).await;
    assert_eq!(done["output"], json!({ "greeting": "hello nobody", "env": "eu" }), "{done}");
    let count = executions_of(api, &auth, &deployment_id).await.len();
    assert_eq!(count, 2);

    // Refused calls start nothing: another body under a signature, a call signed ten minutes
    // ago (a replay outside the window), a missing header, another secret, no hex at all.
    let tampered = br#"{"name":"Eve","extra":[1,2]}"#;
    let (status, answer) = post_webhook(api, &deployment_id, &headers, tampered).await;
    assert_error(status, &answer, 401, "UNAUTHORIZED");
    let stale = (chrono::Utc::now() - chrono::Duration::minutes(10)).timestamp().to_string();
    let old_call = vec![
        ("X-Turbocat-Signature", sign(&secret, &stale, "evt-old", body)),
        ("X-Turbocat-Timestamp", stale),
        ("X-Turbocat-Delivery", "evt-old".to_owned()),
    ];
    let (status, answer) = post_webhook(api, &deployment_id, &old_call, body).await;
    assert_error(status, &answer, 401, "UNAUTHORIZED");
    assert!(answer["error"]["message"].as_str().expect("message").contains("X-Turbocat-Timestamp"));
    for missing in ["X-Turbocat-Signature", "X-Turbocat-Timestamp", "X-Turbocat-Delivery"] {
        let partial: Vec<(&str, String)> = signed_headers(&secret, body)
            .into_iter()
            .filter(|(name, _)| *name != missing)
            .collect();
        let (status, answer) = post_webhook(api, &deployment_id, &partial, body).await;
        assert_error(status, &answer, 401, "UNAUTHORIZED");
        assert!(answer["error"]["message"].as_str().expect("message").contains(missing));
    }
    let (status, answer) = post_signed(api, &deployment_id, "not the secret", body).await;
    assert_error(status, &answer, 401, "UNAUTHORIZED");
    let mut not_hex = signed_headers(&secret, body);
    not_hex[0].1 = "zz-not-hex".to_owned();
    let (status, answer) = post_webhook(api, &deployment_id, &not_hex, body).await;
    assert_error(status, &answer, 401, "UNAUTHORIZED");
    for bad_body in [&b"not json"[..], &b"[1, 2]"[..], &b"\"text\""[..]] {
        let (status, answer) = post_signed(api, &deployment_id, &secret, bad_body).await;
        let fields = assert_error(status, &answer, 400, "VALIDATION_ERROR");
        assert_eq!(fields, vec!["body"], "{answer}");
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let (status, answer) = post_signed(api, &unknown, &secret, body).await;
    assert_error(status, &answer, 404, "NOT_FOUND");
    let (status, answer) = post_signed(api, "not-an-id", &secret, body).await;
    assert_error(status, &answer, 404, "NOT_FOUND");
    assert_eq!(executions_of(api, &auth, &deployment_id).await.len(), count, "nothing started");

    // The triggers are in the deployment's log; someone else's token changes nothing.
    let events = lifecycle(api, &auth, &deployment_id).await;
    let triggered = events.iter().filter(|(event, _)| event == "TRIGGERED").count();
    assert_eq!(triggered, 2, "{events:?}");
    let (_, body_of_get) = api.get(&format!("/api/v1/deployments/{deployment_id}"), &auth).await;
    assert!(body_of_get["data"]["lastTriggeredAt"].is_string(), "{body_of_get}");
    let (status, _) = api
        .post(&format!("/api/v1/deployments/{deployment_id}/stop"), &bob.auth(), json!({}))
        .await;
    assert_eq!(status, 404);

    // A second deployment of the same agent: the agent runs until both are stopped or gone.
    let second = create(
        api,
        &auth,
        "/api/v1/deployments",
        json!({ "name": "Hook 2", "agentId": agent_id, "trigger": { "type": "MANUAL" } }),
    )
    .await;
    let second_id = second["id"].as_str().expect("id").to_owned();
    post_ok(api, &auth, &format!("/api/v1/deployments/{second_id}/start")).await;
    post_ok(api, &auth, &format!("/api/v1/deployments/{deployment_id}/stop")).await;
    assert_eq!(agent_status(api, &auth, &agent_id).await, "RUNNING", "Hook 2 still runs");
    let (status, answer) = post_signed(api, &deployment_id, &secret, body).await;
    assert_error(status, &answer, 404, "NOT_FOUND");
    assert_eq!(executions_of(api, &auth, &deployment_id).await.len(), count, "stopped");
    let (status, answer) = api.delete(&format!("/api/v1/deployments/{second_id}"), &auth).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(agent_status(api, &auth, &agent_id).await, "IDLE", "no deployment runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_start_single_agent_executions_on_dev() {
    webhooks_start_single_agent_executions(Installation::dev().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_start_single_agent_executions_on_serve() {
    webhooks_start_single_agent_executions(Installation::serve().await, true).await;
}

/// A running webhook deployment whose workflow was deleted cannot run any more: the call says
/// why and the deployment becomes FAILED, so its trigger stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_whose_workflow_is_gone_fails() {
    let installation = Installation::dev().await;
    let Installation { api, ann, .. } = &installation;
    let auth = ann.auth();
    let agent_id = jq_agent(api, &auth, "Doomed", ".").await;
    let workflow = create(
        api,
        &auth,
        "/api/v1/workflows",
        json!({ "name": "Doomed", "steps": [{ "key": "a", "name": "A", "agentId": agent_id }] }),
    )
    .await;
    let workflow_id = workflow["id"].as_str().expect("id");
    let deployment = create(
        api,
        &auth,
        "/api/v1/deployments",
        json!({ "name": "Doomed hook", "workflowId": workflow_id, "trigger": { "type": "WEBHOOK" } }),
    )
    .await;
    let deployment_id = deployment["id"].as_str().expect("id").to_owned();
    let secret = deployment["trigger"]["webhookSecret"].as_str().expect("secret").to_owned();
    post_ok(api, &auth, &format!("/api/v1/deployments/{deployment_id}/start")).await;
    assert_eq!(agent_status(api, &auth, &agent_id).await, "IDLE", "only direct targets run");
    let (status, answer) = api.delete(&format!("/api/v1/workflows/{workflow_id}"), &auth).await;
    assert_eq!(status, 200, "{answer}");

    let body = b"{}";
    let (status, answer) = post_signed(api, &deployment_id, &secret, body).await;
    assert_error(status, &answer, 404, "NOT_FOUND");
    assert!(answer["error"]["message"].as_str().expect("message").contains("workflow"), "{answer}");
    let (_, got) = api.get(&format!("/api/v1/deployments/{deployment_id}"), &auth).await;
    assert_eq!(got["data"]["status"], "FAILED", "{got}");
    let events = lifecycle(api, &auth, &deployment_id).await;
    assert_eq!(events[0].0, "FAILED", "{events:?}");
    assert!(events[0].1.contains("webhook call"), "{events:?}");
    assert!(executions_of(api, &auth, &deployment_id).await.is_empty());
}
