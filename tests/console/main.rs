//! The web console: the real `turbocat` serves it at `/` (embedded files, the page for client
//! routes, content types and cache headers; the API's paths keep their answers), and the
//! product's journeys run in headless Chromium against it (`tests/browser/console.mjs`, one
//! test per journey): the page talks grpc-web only, logs no console error, and leaves a
//! screenshot of every page under `<target>/console-screenshots`. The README's Rust client
//! example (`examples/list_workflows.rs`) runs against it too.

#[path = "../support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::Duration;

use crate::support::api::Api;
use crate::support::{
    CHROMIUM, RunnerProcess, TurbocatProcess, chromium_missing, start_dev, start_serve,
};

/// Chromium is heavy on a small machine: one journey at a time.
static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn screenshot_folder() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|target| target.join("console-screenshots"))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots"))
}

/// Runs one journey of `tests/browser/console.mjs` against `server`; panics with the script's
/// report when it fails.
async fn journey(server: &TurbocatProcess, name: &str, environment: &[(&str, &str)]) {
    let _one_at_a_time = ONE_BROWSER_AT_A_TIME.lock().await;
    let folder = screenshot_folder();
    let mut command = tokio::process::Command::new("node");
    command
        .args(["tests/browser/console.mjs", &server.base_url(), name])
        .arg(&folder)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("TURBOCAT_CHROMIUM", CHROMIUM)
        .kill_on_drop(true);
    for (key, value) in environment {
        command.env(key, value);
    }
    let output = tokio::time::timeout(Duration::from_secs(300), command.output())
        .await
        .expect("the journey ends within 5 minutes")
        .expect("run node (npm ci installs playwright-core)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "journey {name}: {stderr}\n--- server log ---\n{}",
        server.stderr_text()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("a JSON report");
    assert_eq!(report["ok"], true, "{report}");
    assert!(report["grpcWebCalls"].as_u64().unwrap_or_default() > 0, "{report}");
    assert!(report["screenshots"].as_u64().unwrap_or_default() > 0, "{report}");
    let methods: Vec<&str> = report["methods"]
        .as_array()
        .expect("methods")
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(methods.iter().all(|method| method.starts_with("/turbocat.v1.")), "{report}");
    eprintln!("journey {name}: {report}; screenshots in {}", folder.display());
}

async fn get(base_url: &str, path: &str, accept: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base_url}{path}"))
        .header("accept", accept)
        .send()
        .await
        .expect("send")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_the_console_and_the_api_keeps_its_paths() {
    let (server, _data) = start_dev(&[]);
    let base_url = server.base_url();
    const HTML: &str = "text/html,application/xhtml+xml";

    let page = get(&base_url, "/", HTML).await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    let policy = headers["content-security-policy"].to_str().expect("ascii");
    assert!(
        policy.contains("script-src 'self'") && policy.contains("connect-src 'self'"),
        "{policy}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    let etag = headers["etag"].to_str().expect("ascii").to_owned();
    let index = page.text().await.expect("body");
    assert!(index.contains("<div id=\"app\">"), "{index}");

    // The same page for every client route (a reload of /workflows/…), revalidated by ETag.
    for route in ["/workflows", "/executions/0190f2b4-0000-7000-8000-000000000000", "/api-keys"] {
        let response = get(&base_url, route, HTML).await;
        assert_eq!(response.status(), 200, "{route}");
        assert_eq!(response.text().await.expect("body"), index, "{route}");
    }
    let unchanged = reqwest::Client::new()
        .get(format!("{base_url}/agents"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("send");
    assert_eq!(unchanged.status(), 304);

    // The bundle's files: their content type, cached for good (their names carry their hash).
    let script = index
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page names its script")
        .to_owned();
    assert!(script.starts_with("/assets/index-") && script.ends_with(".js"), "{script}");
    let response = get(&base_url, &script, "*/*").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(response.headers()["cache-control"], "public, max-age=31536000, immutable");
    let stylesheet = index
        .split("href=\"")
        .find_map(|rest| rest.split('"').next().filter(|href| href.ends_with(".css")))
        .expect("the page names its stylesheet")
        .to_owned();
    let response = get(&base_url, &stylesheet, "text/css").await;
    assert_eq!(response.headers()["content-type"], "text/css; charset=utf-8");

    // The API's paths keep their answers; a missing file is a 404, not the page.
    let (status, body) =
        Api::new(&server).get("/api/v1/no-such-thing", &support::api::Auth::None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND", "{body}");
    let response = get(&base_url, "/api/v1/no-such-thing", HTML).await;
    assert_eq!(response.status(), 404);
    assert!(
        response.headers()["content-type"].to_str().expect("ascii").starts_with("application/json")
    );
    assert_eq!(get(&base_url, "/assets/missing.js", "*/*").await.status(), 404);
    assert_eq!(get(&base_url, "/health", HTML).await.status(), 200);
    let docs = get(&base_url, "/docs", HTML).await;
    assert!(docs.text().await.expect("body").contains("swagger-ui"));
    let document = get(&base_url, "/api/v1/openapi.json", "application/json").await;
    assert_eq!(document.status(), 200);
    let posted = reqwest::Client::new()
        .post(format!("{base_url}/workflows"))
        .header("accept", HTML)
        .send()
        .await
        .expect("send");
    assert_eq!(posted.status(), 404, "only GET gets the page");
}

/// `cargo test` builds the examples next to the tests: `<target>/<profile>/examples/…`.
fn example_binary(name: &str) -> PathBuf {
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let profile_dir = std::env::current_exe()
        .ok()
        .and_then(|test| test.parent().and_then(|deps| deps.parent()).map(PathBuf::from))
        .unwrap_or_else(|| target.join("../debug"));
    profile_dir.join("examples").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_rust_example_lists_workflows_with_an_api_key() {
    let binary = example_binary("list_workflows");
    assert!(
        binary.exists(),
        "{} is missing: cargo test builds it (or cargo build --example list_workflows)",
        binary.display()
    );
    let (server, _data) = start_dev(&[]);
    let api = Api::new(&server);
    let account = api.register("example@example.com", "Example").await;
    api.one_step_workflow(&account.auth(), "echo", ".", "listed by the example").await;
    let (key, _) = api.create_key(&account.auth(), "example", &["READ"]).await;
    let run = |api_key: String| {
        let binary = binary.clone();
        let base_url = server.base_url();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary)
                .arg(base_url)
                .env("TURBOCAT_API_KEY", api_key)
                .output()
                .expect("run the example")
        })
    };
    let output = run(key).await.expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("listed by the example (version 1)"), "{stdout}");
    let refused = run("not-a-key".to_owned()).await.expect("join");
    assert!(!refused.status.success(), "a wrong key is refused");
}

/// Runs journey `name` against a fresh `turbocat dev` (see `chromium_missing`).
async fn dev_journey(name: &str) {
    if chromium_missing() {
        return;
    }
    let (server, _data) = start_dev(&[]);
    journey(&server, name, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_1_register_sign_out_and_sign_in() {
    dev_journey("sign_in").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_2_agents_of_each_type_and_a_workflow_drawn_as_a_dag() {
    dev_journey("agents_and_workflow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_3_an_execution_watched_live() {
    dev_journey("live_execution").await;
}

/// `serve` runs no runner of its own: the steps can only run on the separate `turbocat runner`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_3_in_serve_with_a_separate_runner() {
    if chromium_missing() {
        return;
    }
    let (server, _database) = start_serve(&[]).await;
    let api = Api::new(&server);
    let account = api.register("console-serve@example.com", "Console Tester").await;
    let (key, _) = api.create_key(&account.auth(), "runner", &["RUNNER"]).await;
    let _runner = RunnerProcess::start(&server.base_url(), &key, "console-runner", 2, "", &[]);
    journey(
        &server,
        "live_execution",
        &[
            ("TURBOCAT_CONSOLE_EMAIL", account.email.as_str()),
            ("TURBOCAT_CONSOLE_PASSWORD", account.password.as_str()),
            ("TURBOCAT_CONSOLE_SCREENSHOT_PREFIX", "serve-live_execution"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_4_a_failing_step_shows_its_attempts_and_errors() {
    dev_journey("retried_failure").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_5_a_long_execution_cancelled_from_the_page() {
    dev_journey("cancel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_6_an_api_key_shown_once_used_and_revoked() {
    dev_journey("api_key").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_7_the_dashboard_shows_the_executions_run() {
    dev_journey("dashboard").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_8_every_main_page_fits_a_phone() {
    dev_journey("phone").await;
}

/// The account and its workflow come from the API; the browser then uses only the keyboard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_9_sign_in_and_execute_with_the_keyboard_only() {
    if chromium_missing() {
        return;
    }
    let (server, _data) = start_dev(&[]);
    let api = Api::new(&server);
    let account = api.register("keyboard@example.com", "Keyboard User").await;
    api.one_step_workflow(&account.auth(), "double", "{value: (.value * 2)}", "by keyboard").await;
    journey(
        &server,
        "keyboard",
        &[
            ("TURBOCAT_CONSOLE_EMAIL", account.email.as_str()),
            ("TURBOCAT_CONSOLE_PASSWORD", account.password.as_str()),
        ],
    )
    .await;
}
