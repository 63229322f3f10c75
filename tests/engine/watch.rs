//! Live events: `WatchExecution` over gRPC and grpc-web, and `GET /executions/:id/events` as
//! Server-Sent Events (with `?access_token=`), on `dev` and across two `serve` replicas. The
//! stream opens with a snapshot and then delivers every transition of every step in order,
//! the log lines, and the execution's end.

use std::time::{Duration, Instant};

use prost::Message;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::execution_service_client::ExecutionServiceClient;

use crate::support::api::{Api, Auth, grpc};
use crate::support::{CHROMIUM, start_dev, start_serve, start_serve_replica};
use crate::{RunnerProcess, Workbench};

const LIMIT: Duration = Duration::from_secs(90);

/// One event of a watch, the same whichever transport carried it.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Snapshot { status: String, steps: Vec<(String, String, i64)> },
    Step { key: String, status: String, attempt: i64 },
    Log { key: String, message: String },
    Execution { status: String },
}

fn short(name: &str) -> String {
    name.trim_start_matches("EXECUTION_STATUS_").trim_start_matches("STEP_RUN_STATUS_").to_owned()
}

fn number(value: &Value) -> i64 {
    value.as_i64().or_else(|| value.as_str().and_then(|text| text.parse().ok())).unwrap_or(0)
}

/// An event as REST JSON (what SSE carries): (sequence, event).
fn seen_from_json(event: &Value) -> (i64, Seen) {
    let sequence = number(&event["sequence"]);
    let step = |step: &Value| {
        (
            step["stepKey"].as_str().unwrap_or_default().to_owned(),
            short(step["status"].as_str().unwrap_or_default()),
            number(&step["attempt"]),
        )
    };
    let seen = if let Some(snapshot) = event.get("snapshot") {
        Seen::Snapshot {
            status: short(snapshot["status"].as_str().unwrap_or_default()),
            steps: snapshot["stepRuns"].as_array().into_iter().flatten().map(step).collect(),
        }
    } else if let Some(changed) = event.get("stepChanged") {
        let (key, status, attempt) = step(&changed["stepRun"]);
        Seen::Step { key, status, attempt }
    } else if let Some(log) = event.get("log") {
        Seen::Log {
            key: log["stepKey"].as_str().unwrap_or_default().to_owned(),
            message: log["message"].as_str().unwrap_or_default().to_owned(),
        }
    } else if let Some(execution) = event.get("executionChanged") {
        Seen::Execution { status: short(execution["status"].as_str().unwrap_or_default()) }
    } else {
        panic!("an event of no known kind: {event}");
    };
    (sequence, seen)
}

/// An event as the generated gRPC types carry it.
fn seen_from_proto(event: &pb::WatchExecutionResponse) -> (i64, Seen) {
    use pb::watch_execution_response::Event;
    let step = |step: &pb::StepRun| {
        (step.step_key.clone(), short(step.status().as_str_name()), i64::from(step.attempt))
    };
    let seen = match event.event.as_ref().expect("an event") {
        Event::Snapshot(snapshot) => Seen::Snapshot {
            status: short(snapshot.status().as_str_name()),
            steps: snapshot.step_runs.iter().map(step).collect(),
        },
        Event::StepChanged(changed) => {
            let (key, status, attempt) = step(changed.step_run.as_ref().expect("step run"));
            Seen::Step { key, status, attempt }
        }
        Event::Log(log) => Seen::Log { key: log.step_key.clone(), message: log.message.clone() },
        Event::ExecutionChanged(execution) => {
            Seen::Execution { status: short(execution.status().as_str_name()) }
        }
    };
    (event.sequence, seen)
}

/// Reads a Server-Sent Events stream to its end: the `data` of every `message` event.
async fn read_sse(api: &Api, path: &str) -> Vec<Value> {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", api.base_url))
        .send()
        .await
        .expect("open the event stream");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    let mut response = response;
    let (mut text, mut events) = (String::new(), Vec::new());
    let deadline = Instant::now() + LIMIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(remaining, response.chunk())
            .await
            .expect("the event stream ends once the execution finished")
            .expect("read the event stream");
        let Some(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let mut kind = "message";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    kind = if name.trim() == "error" { "error" } else { "message" };
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            assert_ne!(kind, "error", "the stream failed: {data}");
            if !data.is_empty() {
                events.push(serde_json::from_str(&data).expect("event data is JSON"));
            }
        }
    }
    events
}

/// Reads `WatchExecution` over gRPC to its end.
async fn read_grpc(api: &Api, auth: &Auth, execution_id: &str) -> Vec<pb::WatchExecutionResponse> {
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let request = pb::WatchExecutionRequest { execution_id: execution_id.to_owned() };
    let mut stream = client.watch_execution(grpc(request, auth)).await.expect("watch").into_inner();
    let mut events = Vec::new();
    let deadline = Instant::now() + LIMIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(remaining, stream.message())
            .await
            .expect("the watch ends once the execution finished")
            .expect("a healthy stream");
        match next {
            Some(event) => events.push(event),
            None => return events,
        }
    }
}

/// When the server sent an event (its `time`), as REST JSON carries it.
fn sent_at_json(event: &Value) -> chrono::DateTime<chrono::Utc> {
    event["time"].as_str().and_then(|time| time.parse().ok()).expect("every event has its time")
}

/// When the server sent an event, as the generated gRPC types carry it.
fn sent_at_proto(event: &pb::WatchExecutionResponse) -> chrono::DateTime<chrono::Utc> {
    let time = event.time.expect("every event has its time");
    chrono::DateTime::from_timestamp(time.seconds, u32::try_from(time.nanos).expect("nanos"))
        .expect("a valid time")
}

/// A line a step prints before it sleeps four seconds reaches the watcher while the step runs:
/// more than a second before the step's end (a short step's lines travel with its result; a
/// long one's must not wait for it).
fn check_live_log(events: &[(chrono::DateTime<chrono::Utc>, Seen)]) {
    let sent = |wanted: &dyn Fn(&Seen) -> bool| {
        events
            .iter()
            .find(|(_, seen)| wanted(seen))
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("an event is missing: {events:#?}"))
    };
    let line = sent(
        &|seen| matches!(seen, Seen::Log { key, message } if key == "warm" && message.contains("warming up")),
    );
    let end = sent(
        &|seen| matches!(seen, Seen::Step { key, status, .. } if key == "warm" && status == "SUCCEEDED"),
    );
    assert!(
        end - line > chrono::Duration::seconds(1),
        "the line came at {line}, the step's end at {end}: {events:#?}"
    );
}

/// The order every attempt of a step goes through.
const LIFECYCLE: [&str; 5] = ["PENDING", "QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"];

/// Checks a watch of the two-step workflow of `flaky_chain`: sequences without gaps, a
/// snapshot first, the execution's end last; `warm` (which the snapshot may catch at any point
/// of its life) moving forward through its lifecycle one transition at a time; `flaky` (still
/// PENDING in the snapshot, as `warm` sleeps four seconds first: long enough for a browser
/// on a busy machine to open its watch) showing every transition of both of its
/// attempts in order; and the log line its second attempt printed.
fn check_story(events: &[(i64, Seen)]) {
    let sequences: Vec<i64> = events.iter().map(|(sequence, _)| *sequence).collect();
    let expected: Vec<i64> = (1..=i64::try_from(events.len()).expect("few")).collect();
    assert_eq!(sequences, expected, "sequence numbers run from 1 without gaps: {events:#?}");
    let Some((_, Seen::Snapshot { steps, .. })) = events.first() else {
        panic!("the first event is the snapshot: {events:#?}")
    };
    assert_eq!(
        events.last().map(|(_, seen)| seen.clone()),
        Some(Seen::Execution { status: "SUCCEEDED".into() }),
        "the last event is the execution's end: {events:#?}"
    );
    let in_snapshot = |key: &str| {
        steps.iter().find(|(step_key, _, _)| step_key == key).cloned().expect("step in snapshot")
    };
    let transitions = |key: &str| -> Vec<(String, i64)> {
        events
            .iter()
            .filter_map(|(_, seen)| match seen {
                Seen::Step { key: step_key, status, attempt } if step_key == key => {
                    Some((status.clone(), *attempt))
                }
                _ => None,
            })
            .collect()
    };

    let (_, warm_start, _) = in_snapshot("warm");
    let mut warm_path = vec![warm_start];
    warm_path.extend(transitions("warm").into_iter().map(|(status, _)| status));
    let first = LIFECYCLE.iter().position(|status| *status == warm_path[0]).expect("known status");
    assert_eq!(warm_path, LIFECYCLE[first..].to_vec(), "warm, one transition at a time");

    let (_, flaky_start, flaky_attempt) = in_snapshot("flaky");
    assert_eq!((flaky_start.as_str(), flaky_attempt), ("PENDING", 1), "{events:#?}");
    let expected_flaky: Vec<(String, i64)> = [
        ("QUEUED", 1),
        ("ASSIGNED", 1),
        ("RUNNING", 1),
        ("FAILED", 1),
        ("PENDING", 2),
        ("QUEUED", 2),
        ("ASSIGNED", 2),
        ("RUNNING", 2),
        ("SUCCEEDED", 2),
    ]
    .iter()
    .map(|(status, attempt)| ((*status).to_owned(), *attempt))
    .collect();
    assert_eq!(transitions("flaky"), expected_flaky, "every transition of flaky, in order");

    assert!(
        events.iter().any(|(_, seen)| matches!(
            seen,
            Seen::Log { key, message } if key == "flaky" && message.contains("second attempt here")
        )),
        "the line printed by the second attempt arrives: {events:#?}"
    );
}

/// A workflow whose `flaky` step runs after `warm` (which sleeps, so a watch opened right
/// after the execute sees `flaky` PENDING), fails its first attempt and succeeds on retry.
async fn flaky_chain(bench: &Workbench) -> String {
    let warm = bench
        .code(
            "warm",
            "python",
            "import json, time\nprint('warming up', flush=True)\ntime.sleep(4)\nprint(json.dumps({'warm': True}))\n",
            json!({}),
        )
        .await;
    let flaky =
        bench.agent("flaky", "CODE", crate::support::flaky_python_config(), json!({})).await;
    let counter = crate::support::attempt_counter().await;
    let workflow = bench
        .workflow(
            "watched",
            json!([
                { "key": "warm", "agentId": warm },
                { "key": "flaky", "agentId": flaky, "dependsOn": ["warm"],
                  "inputMapping": { "counter": counter },
                  "retryPolicy": { "maxAttempts": 2, "initialBackoff": "0.2s", "maxBackoff": "0.2s" } },
            ]),
            json!({}),
        )
        .await;
    bench.execute(&workflow, json!({})).await
}

fn access_token(auth: &Auth) -> String {
    match auth {
        Auth::Bearer(token) => token.clone(),
        _ => panic!("a bearer token"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_sse_with_an_access_token_delivers_every_transition_in_order() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "watch-sse@example.com").await;
    let execution_id = flaky_chain(&bench).await;
    let path = format!(
        "/api/v1/executions/{execution_id}/events?access_token={}",
        access_token(&bench.auth)
    );
    let read = read_sse(&bench.api, &path).await;
    let events: Vec<(i64, Seen)> = read.iter().map(seen_from_json).collect();
    check_story(&events);
    check_live_log(
        &read
            .iter()
            .map(|event| (sent_at_json(event), seen_from_json(event).1))
            .collect::<Vec<_>>(),
    );

    // Watching a finished execution: its snapshot, then the stream ends.
    let again: Vec<(i64, Seen)> =
        read_sse(&bench.api, &path).await.iter().map(seen_from_json).collect();
    assert_eq!(again.len(), 1, "{again:#?}");
    assert!(matches!(&again[0], (1, Seen::Snapshot { status, .. }) if status == "SUCCEEDED"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_grpc_and_grpc_web_watch_the_same_story() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "watch-grpc@example.com").await;
    let execution_id = flaky_chain(&bench).await;
    let read = read_grpc(&bench.api, &bench.auth, &execution_id).await;
    let events: Vec<(i64, Seen)> = read.iter().map(seen_from_proto).collect();
    check_story(&events);
    check_live_log(
        &read
            .iter()
            .map(|event| (sent_at_proto(event), seen_from_proto(event).1))
            .collect::<Vec<_>>(),
    );

    // grpc-web (what a browser speaks): a second run, watched from its start to its end.
    let second = flaky_chain(&bench).await;
    let request = pb::WatchExecutionRequest { execution_id: second }.encode_to_vec();
    let (status, messages) = bench
        .api
        .grpc_web_stream("/turbocat.v1.ExecutionService/WatchExecution", request, &bench.auth)
        .await;
    assert_eq!(status, "0");
    let events: Vec<(i64, Seen)> = messages
        .iter()
        .map(|bytes| {
            seen_from_proto(&pb::WatchExecutionResponse::decode(&bytes[..]).expect("decode"))
        })
        .collect();
    check_story(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_watch_on_another_replica_sees_the_runner_of_the_first() {
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let shared = ["--redis-key-prefix", redis_prefix.as_str()];
    let (first, database) = start_serve(&shared).await;
    let second = start_serve_replica(&database, &shared).await;
    let bench = Workbench::new(Api::new(&first), "watch-replicas@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let runner = RunnerProcess::start(&first.base_url(), &key, "watch-runner", 2, "", &[]);
    let execution_id = flaky_chain(&bench).await;

    let watcher = Api::new(&second);
    let events_path = format!(
        "/api/v1/executions/{execution_id}/events?access_token={}",
        access_token(&bench.auth)
    );
    let (grpc_events, sse_events) = tokio::join!(
        read_grpc(&watcher, &bench.auth, &execution_id),
        read_sse(&watcher, &events_path),
    );
    drop(runner);
    check_story(&grpc_events.iter().map(seen_from_proto).collect::<Vec<_>>());
    check_story(&sse_events.iter().map(seen_from_json).collect::<Vec<_>>());
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_is_for_the_owner_with_valid_credentials() {
    let (server, _data) = start_dev(&[]);
    let api = Api::new(&server);
    let owner = Workbench::new(Api::new(&server), "watch-owner@example.com").await;
    let stranger = Workbench::new(Api::new(&server), "watch-stranger@example.com").await;
    let idle = owner.jq("idle", ".").await;
    let workflow = owner
        .workflow(
            "parked",
            json!([{ "key": "parked", "agentId": idle, "requiredLabels": { "nowhere": "" } }]),
            json!({}),
        )
        .await;
    let execution_id = owner.execute(&workflow, json!({})).await;
    let events = format!("/api/v1/executions/{execution_id}/events");

    // Another user's execution is a 404 on both transports, as is an unknown one.
    let (status, body) = api.get(&events, &stranger.auth).await;
    assert_eq!(status, 404, "{body}");
    let unknown = format!("/api/v1/executions/{}/events", uuid::Uuid::new_v4());
    assert_eq!(api.get(&unknown, &owner.auth).await.0, 404);
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let refused = client
        .watch_execution(grpc(
            pb::WatchExecutionRequest { execution_id: execution_id.clone() },
            &stranger.auth,
        ))
        .await
        .expect_err("another user's execution");
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // A malformed id names the field.
    let (status, body) = api.get("/api/v1/executions/not-an-id/events", &owner.auth).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("executionId"), "{body}");

    // No credentials, or a wrong token in the query: 401 and nothing streamed.
    assert_eq!(api.get(&events, &Auth::None).await.0, 401);
    let forged = format!("{events}?access_token=not.a.token");
    assert_eq!(api.get(&forged, &Auth::None).await.0, 401);
    // The query token is for the event stream only: elsewhere it is an unknown parameter.
    let token = access_token(&owner.auth);
    let plain = format!("/api/v1/executions/{execution_id}?access_token={token}");
    let (status, body) = api.get(&plain, &Auth::None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("access_token"), "{body}");

    // The owner's stream opens with the snapshot, and a cancel ends it.
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let mut stream = client
        .watch_execution(grpc(
            pb::WatchExecutionRequest { execution_id: execution_id.clone() },
            &owner.auth,
        ))
        .await
        .expect("watch")
        .into_inner();
    let first = stream.message().await.expect("healthy").expect("snapshot");
    assert!(
        matches!(seen_from_proto(&first).1, Seen::Snapshot { ref status, .. } if status == "RUNNING" || status == "QUEUED")
    );
    let (status, body) = owner
        .api
        .post(&format!("/api/v1/executions/{execution_id}/cancel"), &owner.auth, json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut rest = Vec::new();
    while let Some(event) = tokio::time::timeout(LIMIT, stream.message())
        .await
        .expect("the stream ends after the cancel")
        .expect("healthy")
    {
        rest.push(seen_from_proto(&event).1);
    }
    assert!(
        rest.contains(&Seen::Step { key: "parked".into(), status: "CANCELLED".into(), attempt: 1 }),
        "{rest:#?}"
    );
    assert_eq!(rest.last(), Some(&Seen::Execution { status: "CANCELLED".into() }), "{rest:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_event_source_follows_an_execution_to_its_end() {
    if crate::support::chromium_missing() {
        return;
    }
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "watch-browser@example.com").await;
    // The page loads first (Chromium takes seconds to start), then the execution starts, so
    // the browser watches it from its beginning.
    let mut browser = tokio::process::Command::new("node")
        .args(["tests/browser/watch-events.mjs", &server.base_url(), &access_token(&bench.auth)])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TURBOCAT_CHROMIUM", CHROMIUM)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node (npm ci installs playwright-core)");
    let mut stdout = tokio::io::BufReader::new(browser.stdout.take().expect("stdout")).lines();
    let ready = tokio::time::timeout(LIMIT, stdout.next_line()).await.expect("page loads");
    assert_eq!(ready.expect("read").as_deref(), Some("ready"));
    let execution_id = flaky_chain(&bench).await;
    let mut stdin = browser.stdin.take().expect("stdin");
    stdin.write_all(format!("{execution_id}\n").as_bytes()).await.expect("send the id");
    let line = tokio::time::timeout(LIMIT, stdout.next_line())
        .await
        .expect("the browser reports")
        .expect("read")
        .expect("a line of events");
    let status = browser.wait().await.expect("node exits");
    assert!(status.success(), "{status}");
    let events: Vec<Value> = serde_json::from_str(&line).expect("a JSON array");
    check_story(&events.iter().map(seen_from_json).collect::<Vec<_>>());
}

/// Reads an event stream until it ends; returns its raw text (events and error events).
async fn read_sse_text(response: reqwest::Response) -> String {
    let mut response = response;
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(LIMIT, response.chunk())
        .await
        .expect("the event stream ends")
        .expect("read the event stream")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_end_with_their_session_and_query_tokens_are_never_api_keys() {
    let (server, _data) = start_dev(&[]);
    let api = Api::new(&server);
    let owner = Workbench::new(Api::new(&server), "watch-session@example.com").await;
    let idle = owner.jq("idle", ".").await;
    let workflow = owner
        .workflow(
            "parked",
            json!([{ "key": "parked", "agentId": idle, "requiredLabels": { "nowhere": "" } }]),
            json!({}),
        )
        .await;
    let execution_id = owner.execute(&workflow, json!({})).await;
    let events = format!("/api/v1/executions/{execution_id}/events");

    // An API key never travels in a URL: refused, naming the parameter; in a header it works.
    let (key, _) = api.create_key(&owner.auth, "reader", &["READ"]).await;
    let (status, body) = api.get(&format!("{events}?access_token={key}"), &Auth::None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("access_token"), "{body}");
    let by_header = reqwest::Client::new()
        .get(format!("{}{events}", api.base_url))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("open");
    assert_eq!(by_header.status(), 200);
    drop(by_header);

    // A second session watches over SSE (query token) and gRPC; it logs out.
    let (status, login) =
        api.login("watch-session@example.com", "pw-watch-session@example.com-long-enough").await;
    assert_eq!(status, 200, "{login}");
    let token = login["data"]["accessToken"].as_str().expect("access token").to_owned();
    let refresh = login["data"]["refreshToken"].as_str().expect("refresh token").to_owned();
    let sse = reqwest::Client::new()
        .get(format!("{}{events}?access_token={token}", api.base_url))
        .send()
        .await
        .expect("open the event stream");
    assert_eq!(sse.status(), 200);
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let mut stream = client
        .watch_execution(grpc(
            pb::WatchExecutionRequest { execution_id: execution_id.clone() },
            &Auth::bearer(&token),
        ))
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("healthy").expect("snapshot");
    let (status, body) =
        api.post("/api/v1/auth/logout", &Auth::None, json!({ "refreshToken": refresh })).await;
    assert_eq!(status, 200, "{body}");

    // Both streams end, as unauthenticated, while the execution still waits.
    let ended = loop {
        match tokio::time::timeout(LIMIT, stream.message()).await.expect("the stream ends") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    let text = read_sse_text(sse).await;
    assert!(text.contains("event:") && text.contains("UNAUTHORIZED"), "{text}");
    let still = owner.execution(&execution_id).await;
    assert_eq!(still["stepRuns"][0]["status"], "QUEUED", "{still}");

    // The other session's watch is untouched by it.
    let mut client = ExecutionServiceClient::new(api.channel().await);
    let mut stream = client
        .watch_execution(grpc(
            pb::WatchExecutionRequest { execution_id: execution_id.clone() },
            &owner.auth,
        ))
        .await
        .expect("watch")
        .into_inner();
    stream.message().await.expect("healthy").expect("snapshot");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), stream.message()).await.is_err(),
        "a live session's stream stays open"
    );
}
