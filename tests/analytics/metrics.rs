//! `GET /metrics` for operators: protected by `--metrics-token` on the main listener or served
//! apart on `--metrics-listen`, with the series the issue names moving as the test makes
//! requests and runs a workflow; the access log line per request, switchable off; and the
//! UNIMPLEMENTED answer to an unknown method not logged as an error.

use std::time::{Duration, Instant};

use serde_json::json;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::analytics_service_client::AnalyticsServiceClient;

use crate::Workbench;
use crate::support::api::{Api, grpc};
use crate::support::{TurbocatProcess, start_dev, start_serve};

const TOKEN: &str = "metrics-token-3b1f9a2c";

async fn scrape(url: &str, token: Option<&str>) -> (u16, String) {
    let client = reqwest::Client::new();
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("scrape");
    let status = response.status().as_u16();
    (status, response.text().await.expect("metrics text"))
}

/// The value of the series whose line starts with `name{` and carries every label given, or 0.
fn value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next().and_then(|number| number.parse::<f64>().ok()))
        .sum()
}

/// `text` without the terminal colours of the human log format.
fn plain(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut characters = text.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            for skipped in characters.by_ref() {
                if skipped.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        plain.push(character);
    }
    plain
}

/// Waits until the server's log holds a line containing every needle (the access log line is
/// written after the answer leaves).
fn wait_for_log_line(server: &TurbocatProcess, needles: &[&str]) -> String {
    let started = Instant::now();
    loop {
        let log = plain(&server.stderr_text());
        if let Some(line) =
            log.lines().find(|line| needles.iter().all(|needle| line.contains(needle)))
        {
            return line.to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no line with {needles:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_their_token_and_move_with_requests_and_runs() {
    let (server, _data) = start_dev(&["--metrics-token", TOKEN]);
    let metrics_url = format!("{}/metrics", server.base_url());
    assert_eq!(scrape(&metrics_url, None).await.0, 401);
    assert_eq!(scrape(&metrics_url, Some("not-the-token")).await.0, 401);
    let (status, before) = scrape(&metrics_url, Some(TOKEN)).await;
    assert_eq!(status, 200, "{before}");

    let bench = Workbench::new(Api::new(&server), "metrics@example.com").await;
    let copy = bench.agent("copy", "DATA", json!({ "data": { "jqProgram": "." } })).await;
    let workflow = bench.workflow("copy", &copy, 1).await;
    let execution = bench.run(&workflow, json!({ "n": 1 })).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    for _ in 0..3 {
        let (status, body) = bench.api.get("/api/v1/agents", &bench.auth).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = bench.api.get("/api/v1/agents/not-an-id", &bench.auth).await;
    assert_eq!(status, 400, "{body}");
    let mut analytics = AnalyticsServiceClient::new(bench.api.channel().await);
    analytics
        .get_overview(grpc(pb::GetOverviewRequest::default(), &bench.auth))
        .await
        .expect("overview over grpc");

    let (status, after) = scrape(&metrics_url, Some(TOKEN)).await;
    assert_eq!(status, 200, "{after}");
    let agents_listed = |text: &str| {
        value(
            text,
            "turbocat_requests_total",
            &["route=\"/api/v1/agents\"", "method=\"GET\"", "status_class=\"2xx\""],
        )
    };
    assert_eq!(agents_listed(&after) - agents_listed(&before), 3.0, "{after}");
    assert_eq!(
        value(
            &after,
            "turbocat_requests_total",
            &["route=\"/api/v1/agents/{agent_id}\"", "status_class=\"4xx\""]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            "turbocat_requests_total",
            &[
                "route=\"/turbocat.v1.AnalyticsService/GetOverview\"",
                "transport=\"grpc\"",
                "status_class=\"2xx\"",
            ]
        ),
        1.0,
        "{after}"
    );
    assert!(
        value(
            &after,
            "turbocat_request_duration_seconds_count",
            &["route=\"/api/v1/workflows/{workflow_id}/execute\""]
        ) >= 1.0,
        "{after}"
    );
    assert!(after.contains("turbocat_request_duration_seconds_bucket{"), "a histogram: {after}");
    assert_eq!(
        value(&after, "turbocat_executions_finished_total", &["status=\"SUCCEEDED\""])
            - value(&before, "turbocat_executions_finished_total", &["status=\"SUCCEEDED\""]),
        1.0,
        "{after}"
    );
    // One wait per assignment: a step handed back after a lost lease (a slow machine) waits
    // again, and its row counts that.
    let step = &execution["stepRuns"][0];
    let assignments = step["infraReassignments"].as_i64().expect("infraReassignments") + 1;
    assert_eq!(
        value(&after, "turbocat_step_wait_seconds_count", &["agent_type=\"DATA\""]),
        assignments as f64,
        "{step}\n{after}"
    );
    assert_eq!(
        value(&after, "turbocat_step_run_seconds_count", &["agent_type=\"DATA\""]),
        1.0,
        "{after}"
    );
    assert_eq!(value(&after, "turbocat_runners_connected", &[]), 1.0, "dev's own runner: {after}");
    for series in [
        "turbocat_queue_depth{state=\"ready\"}",
        "turbocat_database_connections{state=\"in_use\"}",
        "turbocat_redis_errors_total",
    ] {
        assert!(after.contains(series), "{series} in {after}");
    }

    // One access line per request, with its request id and caller, never the token.
    let (status, _, _) =
        bench.api.call(reqwest::Method::GET, "/api/v1/users/me", &bench.auth, None).await;
    assert_eq!(status, 200);
    let line = wait_for_log_line(&server, &["turbocat::access", "/api/v1/users/me"]);
    assert!(line.contains(&bench.user_id), "the caller: {line}");
    assert!(line.contains("status=200"), "{line}");
    assert!(line.contains("request_id="), "{line}");

    // A method nobody implements is answered UNIMPLEMENTED (HTTP 200 over gRPC, 501 over
    // HTTP/1) and is not an error of the server's.
    let (status, _) =
        bench.api.post("/turbocat.v1.NoSuchService/Nothing", &bench.auth, json!({})).await;
    assert!(status >= 400, "{status}");
    wait_for_log_line(&server, &["turbocat::access", "NoSuchService"]);
    let log = plain(&server.stderr_text());
    assert!(
        !log.lines().any(|line| line.contains("ERROR") && line.contains("NoSuchService")),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the metrics token is in the log");
    assert!(!log.contains(&bench.auth_token()), "an access token is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_on_the_main_listener_without_a_token() {
    let (server, _data) = start_dev(&[]);
    let (status, _) = scrape(&format!("{}/metrics", server.base_url()), None).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_serves_them_apart_and_the_access_log_switches_off() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let address = format!("127.0.0.1:{port}");
    let (server, _database) =
        start_serve(&["--metrics-listen", address.as_str(), "--access-log", "false"]).await;
    let (status, _) = scrape(&format!("{}/metrics", server.base_url()), Some("anything")).await;
    assert_eq!(status, 404, "not on the main listener");
    let bench = Workbench::new(Api::new(&server), "apart@example.com").await;
    let (status, body) = bench.api.get("/api/v1/agents", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let text = loop {
        let (status, text) = scrape(&format!("http://{address}/metrics"), None).await;
        assert_eq!(status, 200, "{text}");
        if text.contains("route=\"/api/v1/agents\"") || started.elapsed() > Duration::from_secs(5) {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        value(
            &text,
            "turbocat_requests_total",
            &["route=\"/api/v1/agents\"", "status_class=\"2xx\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(value(&text, "turbocat_redis_errors_total", &[]), 0.0, "{text}");
    assert!(text.contains("turbocat_database_connections{state=\"idle\"}"), "{text}");
    assert!(!server.stderr_text().contains("turbocat::access"), "the access log is off");
}
