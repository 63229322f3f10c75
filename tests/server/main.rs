//! The server as a user meets it: the real `turbocat` binary in `dev` (SQLite) and `serve`
//! (PostgreSQL + Redis) mode, called over REST, gRPC and grpc-web.

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use prost::Message;
use serde_json::Value;
use support::{TEST_JWT_SECRET, run_turbocat, start_dev, start_serve};
use turbocat::proto::v1::agent_service_client::AgentServiceClient;
use turbocat::proto::v1::analytics_service_client::AnalyticsServiceClient;
use turbocat::proto::v1::{GetOverviewRequest, ListAgentsRequest};

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

async fn get_json(url: &str) -> (reqwest::StatusCode, Value) {
    let response = http().get(url).send().await.expect("request");
    let status = response.status();
    (status, response.json().await.expect("json body"))
}

fn assert_envelope_meta(body: &Value) {
    let timestamp = body["meta"]["timestamp"].as_str().expect("meta.timestamp");
    assert!(
        chrono::DateTime::parse_from_rfc3339(timestamp).is_ok(),
        "timestamp {timestamp} is RFC 3339"
    );
    let request_id = body["meta"]["requestId"].as_str().expect("meta.requestId");
    assert!(uuid::Uuid::parse_str(request_id).is_ok(), "request id {request_id} is a uuid");
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
    assert!(body["error"]["details"].is_array(), "{body}");
    assert_envelope_meta(body);
}

async fn grpc_health(base_url: &str) -> i32 {
    let channel = tonic::transport::Endpoint::from_shared(base_url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc connect");
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let response = client
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .expect("health check");
    response.into_inner().status
}

/// A unary grpc-web call over HTTP/1.1, as a browser makes it.
async fn grpc_web_call(base_url: &str, path: &str, request: Vec<u8>) -> (Option<Vec<u8>>, String) {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(request.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&request);
    let response = http()
        .post(format!("{base_url}{path}"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(framed)
        .send()
        .await
        .expect("grpc-web request");
    assert_eq!(response.status(), 200);
    let header_status = response
        .headers()
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await.expect("grpc-web body").to_vec();
    let mut message = None;
    let mut trailers = String::new();
    let mut offset = 0;
    while offset + 5 <= body.len() {
        let flag = body[offset];
        let length = u32::from_be_bytes([
            body[offset + 1],
            body[offset + 2],
            body[offset + 3],
            body[offset + 4],
        ]) as usize;
        let payload = body[offset + 5..offset + 5 + length].to_vec();
        if flag & 0x80 == 0 {
            message = Some(payload);
        } else {
            trailers = String::from_utf8_lossy(&payload).into_owned();
        }
        offset += 5 + length;
    }
    let status = trailers
        .lines()
        .find_map(|line| line.strip_prefix("grpc-status:").map(|value| value.trim().to_owned()))
        .or(header_status)
        .unwrap_or_default();
    (message, status)
}

async fn reflection_services(base_url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(base_url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.message().await.expect("reflection answer").expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|service| service.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_rest_grpc_and_grpc_web_on_one_port() {
    let (server, data_dir) = start_dev(&[]);
    let base_url = server.base_url();
    assert!(data_dir.path().join("turbocat.db").exists(), "dev creates its SQLite file");
    assert!(data_dir.path().join("jwt-secret").exists(), "dev keeps a generated JWT secret");

    let (status, body) = get_json(&format!("{base_url}/health")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    assert_eq!(body["data"]["mode"], "dev");
    assert_eq!(body["data"]["components"][0]["name"], "database");
    assert_eq!(body["data"]["components"][0]["backend"], "sqlite");
    assert_eq!(body["data"]["components"][0]["status"], "UP");
    assert_envelope_meta(&body);
    let (ready_status, _) = get_json(&format!("{base_url}/health/ready")).await;
    assert_eq!(ready_status, 200);

    assert_eq!(grpc_health(&base_url).await, 1, "gRPC health answers SERVING");
    let (message, grpc_status) = grpc_web_call(
        &base_url,
        "/grpc.health.v1.Health/Check",
        tonic_health::pb::HealthCheckRequest { service: String::new() }.encode_to_vec(),
    )
    .await;
    assert_eq!(grpc_status, "0");
    let answer =
        tonic_health::pb::HealthCheckResponse::decode(message.expect("a message").as_slice())
            .expect("decode");
    assert_eq!(answer.status, 1, "grpc-web health answers SERVING");

    let services = reflection_services(&base_url).await;
    for expected in [
        "turbocat.v1.AuthService",
        "turbocat.v1.AgentService",
        "turbocat.v1.WorkflowService",
        "turbocat.v1.ExecutionService",
        "turbocat.v1.RunnerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.iter().any(|service| service == expected),
            "reflection lists {expected}: {services:?}"
        );
    }

    // Every service answers on every transport: analytics without credentials is refused the
    // same way over gRPC, grpc-web and REST.
    let mut analytics = AnalyticsServiceClient::connect(base_url.clone()).await.expect("connect");
    let error = analytics
        .get_overview(GetOverviewRequest::default())
        .await
        .expect_err("credentials are required");
    assert_eq!(error.code(), tonic::Code::Unauthenticated);
    let (web_message, web_status) = grpc_web_call(
        &base_url,
        "/turbocat.v1.AnalyticsService/GetOverview",
        GetOverviewRequest::default().encode_to_vec(),
    )
    .await;
    assert!(web_message.is_none());
    assert_eq!(web_status, "16", "grpc-web answers UNAUTHENTICATED");
    let (status, body) = get_json(&format!("{base_url}/api/v1/analytics/overview")).await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_postgres_and_redis_and_reports_a_lost_database() {
    let (server, database) = start_serve(&[]).await;
    let base_url = server.base_url();
    let (status, body) = get_json(&format!("{base_url}/health")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["mode"], "serve");
    let components = body["data"]["components"].as_array().expect("components");
    let backend_of = |name: &str| {
        components.iter().find(|component| component["name"] == name).map(|component| {
            (
                component["backend"].as_str().unwrap_or_default().to_owned(),
                component["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
    };
    assert_eq!(backend_of("database"), Some(("postgres".into(), "UP".into())));
    assert_eq!(backend_of("redis"), Some(("redis".into(), "UP".into())));
    assert_eq!(grpc_health(&base_url).await, 1);

    // Take the database away under the running server.
    let admin_url = support::admin_database_url();
    let name = database.url.rsplit('/').next().expect("name").to_owned();
    let mut admin =
        <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await.expect("admin");
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&mut admin)
        .await
        .expect("drop database");

    let (status, body) = get_json(&format!("{base_url}/health")).await;
    assert_eq!(status, 503, "{body}");
    assert_error(&body, "SERVICE_UNAVAILABLE");
    let (ready_status, _) = get_json(&format!("{base_url}/health/ready")).await;
    assert_eq!(ready_status, 503);
    let mut serving = 1;
    for _ in 0..30 {
        serving = grpc_health(&base_url).await;
        if serving != 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(serving, 2, "gRPC health turns NOT_SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rest_input_gets_the_error_envelope() {
    let (server, _data_dir) = start_dev(&["--max-body-bytes", "1024"]);
    let base_url = server.base_url();
    let register = format!("{base_url}/api/v1/auth/register");

    let response = http()
        .post(&register)
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_error(&body, "VALIDATION_ERROR");
    assert_eq!(body["error"]["details"][0]["field"], "body");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("malformed JSON"));

    let response = http()
        .post(&register)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 415);
    assert_error(&response.json().await.expect("json"), "UNSUPPORTED_MEDIA_TYPE");

    let response = http()
        .post(&register)
        .header("content-type", "application/json")
        .body(format!("{{\"fullName\": \"{}\"}}", "x".repeat(4096)))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 413);
    assert_error(&response.json().await.expect("json"), "PAYLOAD_TOO_LARGE");

    let response = http()
        .post(&register)
        .json(&serde_json::json!({"email": 42, "password": "long enough", "nickname": "x"}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("json");
    assert_error(&body, "VALIDATION_ERROR");
    let fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|detail| detail["field"].as_str())
        .collect();
    assert!(fields.contains(&"email"), "names the mistyped field: {body}");
    assert!(fields.contains(&"nickname"), "names the unknown field: {body}");

    let response =
        http().post(&register).json(&serde_json::json!([1, 2])).send().await.expect("send");
    assert_eq!(response.status(), 400);
    assert_error(&response.json().await.expect("json"), "VALIDATION_ERROR");

    let (status, body) =
        get_json(&format!("{base_url}/api/v1/agents?pageSize=ten&color=red")).await;
    assert_eq!(status, 400);
    assert_error(&body, "VALIDATION_ERROR");
    let fields: Vec<&str> = body["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|detail| detail["field"].as_str())
        .collect();
    assert_eq!(fields, vec!["pageSize", "color"]);

    let (status, body) = get_json(&format!("{base_url}/api/v1/no-such-thing")).await;
    assert_eq!(status, 404);
    assert_error(&body, "NOT_FOUND");
    // `/` is the console (tests/console); a file it does not have is still the envelope's 404.
    let (status, body) = get_json(&format!("{base_url}/favicon.ico")).await;
    assert_eq!(status, 404);
    assert_error(&body, "NOT_FOUND");

    let response = http().put(format!("{base_url}/api/v1/agents")).send().await.expect("send");
    assert_eq!(response.status(), 405);
    assert_error(&response.json().await.expect("json"), "METHOD_NOT_ALLOWED");

    // A gRPC caller of a method that does not exist gets a gRPC status, not a web page.
    let channel = tonic::transport::Endpoint::from_shared(base_url.clone())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<ListAgentsRequest, ListAgentsRequest>::default();
    let path = http::uri::PathAndQuery::from_static("/turbocat.v1.NoSuchService/Nothing");
    let error = client
        .unary(tonic::Request::new(ListAgentsRequest::default()), path, codec)
        .await
        .expect_err("unknown method");
    assert_eq!(error.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_taken_or_made_on_both_transports() {
    let (server, _data_dir) = start_dev(&[]);
    let base_url = server.base_url();
    let response = http()
        .get(format!("{base_url}/health"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .expect("send");
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["meta"]["requestId"], "trace-me-42");

    let response = http().get(format!("{base_url}/api/v1/agents")).send().await.expect("send");
    let made = response.headers()["x-request-id"].to_str().expect("ascii").to_owned();
    assert!(uuid::Uuid::parse_str(&made).is_ok());
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        body["meta"]["requestId"],
        made.as_str(),
        "the envelope carries the id of the response header"
    );

    let mut agents = AgentServiceClient::connect(base_url.clone()).await.expect("connect");
    let mut request = tonic::Request::new(ListAgentsRequest::default());
    request.metadata_mut().insert("x-request-id", "grpc-trace-7".parse().expect("metadata"));
    let status = agents.list_agents(request).await.expect_err("unimplemented");
    assert_eq!(
        status.metadata().get("x-request-id").and_then(|value| value.to_str().ok()),
        Some("grpc-trace-7")
    );
    let status = agents.list_agents(ListAgentsRequest::default()).await.expect_err("unimplemented");
    let made = status
        .metadata()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .expect("a made-up id");
    assert!(uuid::Uuid::parse_str(made).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_configured_origins() {
    let (server, _data_dir) = start_dev(&["--cors-origins", "http://console.example"]);
    let base_url = server.base_url();
    let preflight = |origin: &'static str| {
        http()
            .request(
                reqwest::Method::OPTIONS,
                format!("{base_url}/turbocat.v1.AgentService/ListAgents"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .send()
    };
    let allowed = preflight("http://console.example").await.expect("preflight");
    assert_eq!(
        allowed.headers().get("access-control-allow-origin").and_then(|value| value.to_str().ok()),
        Some("http://console.example")
    );
    let refused = preflight("http://evil.example").await.expect("preflight");
    assert!(refused.headers().get("access-control-allow-origin").is_none());
    let simple = http()
        .get(format!("{base_url}/health"))
        .header("origin", "http://console.example")
        .send()
        .await
        .expect("get");
    let exposed = simple
        .headers()
        .get("access-control-expose-headers")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    for header in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.contains(header), "exposes {header}: {exposed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_bad_configuration_naming_the_setting() {
    let redis = support::redis_url();
    let (database_url, database_name) = support::create_postgres_database().await;
    let database = support::ServeDatabase::new(database_url.clone(), database_name);
    let good_database = database.url.as_str();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["serve", "--database-url", good_database, "--redis-url", &redis], "--jwt-secret"),
        (
            vec![
                "serve",
                "--database-url",
                good_database,
                "--redis-url",
                &redis,
                "--jwt-secret",
                "short",
            ],
            "--jwt-secret",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "not a url",
                "--redis-url",
                &redis,
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--database-url",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "mysql://db/x",
                "--redis-url",
                &redis,
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--database-url",
        ),
        (
            vec![
                "serve",
                "--database-url",
                "postgres://admin:hunter2-secret@127.0.0.1:1/x",
                "--redis-url",
                &redis,
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--database-url",
        ),
        (
            vec![
                "serve",
                "--database-url",
                good_database,
                "--redis-url",
                "redis://:hunter2-secret@127.0.0.1:1",
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--redis-url",
        ),
        (
            vec![
                "serve",
                "--database-url",
                good_database,
                "--redis-url",
                "http://redis",
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--redis-url",
        ),
        (
            vec![
                "serve",
                "--listen",
                "not-an-address",
                "--database-url",
                good_database,
                "--redis-url",
                &redis,
                "--jwt-secret",
                TEST_JWT_SECRET,
            ],
            "--listen",
        ),
        (vec!["dev", "--listen", "127.0.0.1:0", "--jwt-secret", "short"], "--jwt-secret"),
    ];
    for (arguments, setting) in cases {
        let (success, _stdout, stderr) = tokio::task::spawn_blocking({
            let arguments: Vec<String> =
                arguments.iter().map(|argument| argument.to_string()).collect();
            move || {
                let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
                run_turbocat(&borrowed, &[])
            }
        })
        .await
        .expect("join");
        assert!(!success, "{arguments:?} must fail");
        assert!(stderr.contains(setting), "{arguments:?}: the error names {setting}: {stderr}");
        assert!(!stderr.contains("hunter2-secret"), "{arguments:?}: a password leaked: {stderr}");
    }
    // Nothing was migrated by the attempts that failed on Redis.
    let mut connection =
        <sqlx::PgConnection as sqlx::Connection>::connect(good_database).await.expect("connect");
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut connection)
    .await
    .expect("count tables");
    assert_eq!(tables, 0, "a failed start-up leaves the database untouched");
    // The variables work like the flags.
    let (success, _stdout, stderr) = run_turbocat(
        &["serve"],
        &[
            ("TURBOCAT_DATABASE_URL", good_database),
            ("TURBOCAT_REDIS_URL", redis.as_str()),
            ("TURBOCAT_JWT_SECRET", "short"),
        ],
    );
    assert!(!success);
    assert!(stderr.contains("TURBOCAT_JWT_SECRET"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_never_carry_secrets() {
    let secret = "a-jwt-secret-nobody-may-ever-see-0123456789";
    let (server, _data_dir) =
        start_dev(&["--log-format", "json", "--jwt-secret", secret, "--log-level", "debug"]);
    let base_url = server.base_url();
    let response = http()
        .get(format!("{base_url}/api/v1/agents"))
        .header("authorization", format!("Bearer {secret}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 401, "the secret is not a token");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = server.stderr_text();
    assert!(logs.lines().count() >= 2, "logs were written: {logs}");
    for line in logs.lines() {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "every log line is JSON: {line}");
    }
    assert!(!logs.contains(secret), "the secret leaked into the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_once_and_again_is_a_no_op() {
    let (url, name) = support::create_postgres_database().await;
    let _guard = support::ServeDatabase::new(url.clone(), name);
    for _ in 0..2 {
        let (success, stdout, stderr) = tokio::task::spawn_blocking({
            let url = url.clone();
            move || run_turbocat(&["migrate", "--database-url", &url], &[])
        })
        .await
        .expect("join");
        assert!(success, "{stderr}");
        assert!(stdout.contains("migrations applied (postgres)"), "{stdout}");
    }
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8").to_owned();
    for _ in 0..2 {
        let (success, stdout, stderr) = run_turbocat(&["migrate", "--data-dir", &data_dir], &[]);
        assert!(success, "{stderr}");
        assert!(stdout.contains("migrations applied (sqlite)"), "{stdout}");
    }
    assert!(directory.path().join("turbocat.db").exists());
}

/// Runs `turbocat migrate <extra> --database-url <url>` off the runtime: (success, stdout,
/// stderr).
async fn migrate_command(url: &str, extra: &[&str]) -> (bool, String, String) {
    let mut arguments = vec!["migrate".to_owned()];
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    arguments.extend(["--database-url".to_owned(), url.to_owned()]);
    tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
        run_turbocat(&borrowed, &[])
    })
    .await
    .expect("join")
}

/// The `migrate` command on `url` (`backend` its name): applies everything saying what,
/// `--down 2` reverts the two newest saying which (their tables go), and `migrate` applies
/// them again; a database a newer release migrated (`newer` applies such a migration, 9999) is
/// refused unless `--allow-newer`, and never reverted.
async fn assert_migrate_command(url: &str, backend: &str, newer: impl AsyncFn()) {
    let (success, stdout, stderr) = migrate_command(url, &[]).await;
    assert!(success, "{stderr}");
    assert!(stdout.contains("applied 0001 users\n"), "{stdout}");
    assert!(stdout.contains("applied 0014 executions started shard per connection\n"), "{stdout}");
    assert!(stdout.contains(&format!("migrations applied ({backend})")), "{stdout}");

    let (success, stdout, stderr) = migrate_command(url, &["--down", "2"]).await;
    assert!(success, "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "reverted 0014 executions started shard per connection\n\
             reverted 0013 current attempt on step run\nmigrations reverted ({backend})\n"
        )
    );
    let (success, stdout, stderr) = migrate_command(url, &[]).await;
    assert!(success, "{stderr}");
    assert!(
        stdout.starts_with(
            "applied 0013 current attempt on step run\n\
             applied 0014 executions started shard per connection\n"
        ),
        "{stdout}"
    );
    let (success, stdout, _) = migrate_command(url, &["--down", "0"]).await;
    assert!(!success, "--down 0 is refused: {stdout}");

    newer().await;
    let (success, stdout, stderr) = migrate_command(url, &[]).await;
    assert!(!success, "an older release's migrate refuses: {stdout}");
    assert!(stderr.contains("9999") && stderr.contains("--allow-newer"), "{stderr}");
    let (success, stdout, stderr) = migrate_command(url, &["--allow-newer"]).await;
    assert!(success, "{stderr}");
    assert!(stdout.contains("kept 9999 (applied by a newer release)"), "{stdout}");
    let (success, stdout, stderr) = migrate_command(url, &["--down", "1"]).await;
    assert!(!success, "not reverted: {stdout}");
    assert!(stderr.contains("9999"), "{stderr}");
}

/// A migration of a newer release (9999), applied with sqlx as that release's `migrate` would.
async fn newer_release_migrator(backend: &str) -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr as _;
    let directory =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations").join(backend);
    let mut migrations: Vec<sqlx::migrate::Migration> = sqlx::migrate::Migrator::new(directory)
        .await
        .expect("read migrations")
        .iter()
        .cloned()
        .collect();
    migrations.push(sqlx::migrate::Migration::new(
        9_999,
        "a newer release".into(),
        sqlx::migrate::MigrationType::ReversibleUp,
        sqlx::AssertSqlSafe("CREATE TABLE newer_release (id INTEGER PRIMARY KEY)").into_sql_str(),
        false,
    ));
    sqlx::migrate::Migrator::with_migrations(migrations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_down_reverts_the_newest_and_refuses_a_newer_database_on_postgres() {
    use sqlx::Connection as _;
    let (url, name) = support::create_postgres_database().await;
    let _guard = support::ServeDatabase::new(url.clone(), name);
    assert_migrate_command(&url, "postgres", async || {
        let mut connection = sqlx::PgConnection::connect(&url).await.expect("connect");
        newer_release_migrator("postgres").await.run(&mut connection).await.expect("newer");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_down_reverts_the_newest_and_refuses_a_newer_database_on_sqlite() {
    use sqlx::Connection as _;
    let directory = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite://{}", directory.path().join("turbocat.db").display());
    assert_migrate_command(&url, "sqlite", async || {
        let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("connect");
        newer_release_migrator("sqlite").await.run(&mut connection).await.expect("newer");
    })
    .await;
    // `dev` on that data directory starts, saying the database is newer.
    let data_dir = directory.path().to_str().expect("utf-8").to_owned();
    let dev = tokio::task::spawn_blocking(move || {
        support::start_turbocat(&["dev", "--listen", "127.0.0.1:0", "--data-dir", &data_dir], &[])
    })
    .await
    .expect("dev starts on a database a newer release migrated");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = dev.stderr_text();
    assert!(log.contains("newer than this release") && log.contains("9999"), "{log}");
    let health = reqwest::get(format!("{}/health", dev.base_url())).await.expect("health");
    assert_eq!(health.status(), 200);
}

async fn assert_seeded(store: std::sync::Arc<dyn turbocat::store::Store>) {
    use turbocat::store::{AgentFilter, AgentType, OwnerScope, TemplateFilter, WorkflowFilter};
    let admin = store.get_user_by_email("demo-admin@example.com").await.expect("admin exists");
    assert_eq!(admin.role, turbocat::store::UserRole::Admin);
    let hash = admin.password_hash.clone().expect("a password hash");
    assert!(
        turbocat::auth::password::verify_password("demo-password-1".into(), hash)
            .await
            .expect("verify")
    );
    let agents =
        store.list_agents(AgentFilter::new(OwnerScope::Owner(admin.id))).await.expect("agents");
    assert_eq!(agents.total, 6, "one agent of every type, plus a second CODE agent");
    for agent_type in AgentType::ALL {
        assert!(
            agents.items.iter().any(|agent| agent.agent_type == *agent_type),
            "a {agent_type} agent"
        );
    }
    let workflows = store
        .list_workflows(WorkflowFilter::new(OwnerScope::Owner(admin.id)))
        .await
        .expect("workflows");
    assert_eq!(workflows.total, 1);
    let templates = store
        .list_templates(TemplateFilter::new(OwnerScope::Owner(admin.id)))
        .await
        .expect("templates");
    assert_eq!(
        templates.items.iter().filter(|template| template.owner_id.is_none()).count(),
        5,
        "the starter templates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_loads_demo_data_once_on_both_backends() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8").to_owned();
    let (url, name) = support::create_postgres_database().await;
    let _database = support::ServeDatabase::new(url.clone(), name);
    for target in [vec!["--data-dir", data_dir.as_str()], vec!["--database-url", url.as_str()]] {
        for round in 0..2 {
            let mut arguments = vec![
                "seed",
                "--admin-email",
                "Demo-Admin@example.com",
                "--admin-password",
                "demo-password-1",
            ];
            arguments.extend_from_slice(&target);
            let (success, stdout, stderr) = tokio::task::spawn_blocking({
                let arguments: Vec<String> =
                    arguments.iter().map(|argument| argument.to_string()).collect();
                move || {
                    let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
                    run_turbocat(&borrowed, &[])
                }
            })
            .await
            .expect("join");
            assert!(success, "{stderr}");
            if round == 0 {
                assert!(stdout.contains("created admin demo-admin@example.com"), "{stdout}");
                assert!(stdout.contains("seeded 6 agents and 1 workflows"), "{stdout}");
            } else {
                assert!(stdout.contains("already exists"), "{stdout}");
                assert!(stdout.contains("seeded 0 agents and 0 workflows"), "{stdout}");
            }
            assert!(
                !stdout.contains("demo-password-1") && !stderr.contains("demo-password-1"),
                "the password is never printed"
            );
        }
    }
    let sqlite = turbocat::store::SqliteStore::open(&directory.path().join("turbocat.db"))
        .await
        .expect("open");
    assert_seeded(std::sync::Arc::new(sqlite)).await;
    let postgres = turbocat::store::PostgresStore::connect(&url, 2).await.expect("connect");
    assert_seeded(std::sync::Arc::new(postgres)).await;
}

/// Executes a new one-step workflow (an echo) of the account's; the execution's id.
async fn execute_one_step(api: &support::api::Api, auth: &support::api::Auth) -> String {
    let (_, workflow_id) = api.one_step_workflow(auth, "echo", ".", "One").await;
    let (status, body) = api
        .post(&format!("/api/v1/workflows/{workflow_id}/execute"), auth, serde_json::json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    body["data"]["id"].as_str().expect("execution id").to_owned()
}

/// A GET with `Accept-Encoding: gzip`: (status, content-encoding, the body decompressed).
async fn get_accepting_gzip(url: &str, token: &str) -> (u16, Option<String>, Vec<u8>) {
    let response = http()
        .get(url)
        .bearer_auth(token)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let encoding = response
        .headers()
        .get("content-encoding")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let bytes = response.bytes().await.expect("body").to_vec();
    let body = if encoding.as_deref() == Some("gzip") {
        use std::io::Read;
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut plain).expect("gunzip");
        plain
    } else {
        bytes
    };
    (status, encoding, body)
}

/// Large REST answers go out gzipped when the client asks for it, and the same as without;
/// small ones and streams (SSE, grpc-web) never are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_are_gzipped_when_asked_and_small_ones_and_streams_never() {
    let (server, _data_dir) = start_dev(&[]);
    let base_url = server.base_url();
    let api = support::api::Api::new(&server);
    let account = api.register("gzip@example.com", "Gzip").await;
    let auth = account.auth();
    let mut agent_id = String::new();
    for index in 0..20 {
        let (status, body) = api
            .post(
                "/api/v1/agents",
                &auth,
                serde_json::json!({
                    "name": format!("Agent {index}"),
                    "description": "an agent with a description long enough to fill a page",
                    "type": "DATA",
                    "config": { "data": { "jqProgram": "{ ok: true }" } }
                }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        agent_id = body["data"]["id"].as_str().expect("id").to_owned();
    }

    // A page of 20 agents: gzipped, and the same agents as without compression.
    let list_url = format!("{base_url}/api/v1/agents?pageSize=50");
    let (status, encoding, body) = get_accepting_gzip(&list_url, &account.token).await;
    assert_eq!((status, encoding.as_deref()), (200, Some("gzip")));
    let gzipped: Value = serde_json::from_slice(&body).expect("json");
    let plain_response =
        http().get(&list_url).bearer_auth(&account.token).send().await.expect("get");
    assert!(
        plain_response.headers().get("content-encoding").is_none(),
        "not asked, not compressed"
    );
    let plain: Value = plain_response.json().await.expect("json");
    assert_eq!(gzipped["data"], plain["data"]);
    assert_eq!(gzipped["data"].as_array().map(Vec::len), Some(20));
    // The OpenAPI document too.
    let (status, encoding, _) =
        get_accepting_gzip(&format!("{base_url}/api/v1/openapi.json"), &account.token).await;
    assert_eq!((status, encoding.as_deref()), (200, Some("gzip")));

    // One agent is small: it goes out as it is.
    let (status, encoding, body) =
        get_accepting_gzip(&format!("{base_url}/api/v1/agents/{agent_id}"), &account.token).await;
    assert_eq!((status, encoding), (200, None));
    assert!(body.len() < usize::from(turbocat::api::MIN_COMPRESSED_BYTES), "{}", body.len());

    // grpc-web, even a large answer asked with gzip: a grpc-web response may be a stream.
    let mut framed = vec![0u8];
    let request = ListAgentsRequest { page_size: Some(50), ..Default::default() }.encode_to_vec();
    framed.extend_from_slice(&u32::try_from(request.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(&request);
    let response = http()
        .post(format!("{base_url}/turbocat.v1.AgentService/ListAgents"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("accept-encoding", "gzip")
        .bearer_auth(&account.token)
        .body(framed)
        .send()
        .await
        .expect("grpc-web request");
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-encoding").is_none(), "{:?}", response.headers());
    let body = response.bytes().await.expect("body");
    assert!(body.len() > usize::from(turbocat::api::MIN_COMPRESSED_BYTES), "{}", body.len());
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let answer = turbocat::proto::v1::ListAgentsResponse::decode(&body[5..5 + length])
        .expect("an uncompressed message");
    assert_eq!(answer.agents.len(), 20);

    // SSE: a watch is never compressed (its events must leave at once).
    let execution_id = execute_one_step(&api, &auth).await;
    let events = http()
        .get(format!("{base_url}/api/v1/executions/{execution_id}/events"))
        .bearer_auth(&account.token)
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), 200);
    assert!(events.headers().get("content-encoding").is_none(), "{:?}", events.headers());
}

/// A duplicate of the server process's descriptor for its end of the loopback TCP connection
/// whose client end is on `client_port` (found through `/proc`, taken with `pidfd_getfd`), to
/// read the socket options the server set.
fn server_end_of(server_pid: u32, server_port: u16, client_port: u16) -> std::os::fd::OwnedFd {
    let table =
        std::fs::read_to_string(format!("/proc/{server_pid}/net/tcp")).expect("the tcp table");
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
    let inode = table
        .lines()
        .skip(1)
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let ours = port(fields.get(1)?)? == server_port && port(fields.get(2)?)? == client_port;
            ours.then(|| fields.get(9).map(|inode| (*inode).to_owned())).flatten()
        })
        .expect("the server's end of the connection");
    let wanted = format!("socket:[{inode}]");
    let descriptor = std::fs::read_dir(format!("/proc/{server_pid}/fd"))
        .expect("the server's descriptors")
        .filter_map(Result::ok)
        .find_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            (target.to_string_lossy() == wanted)
                .then(|| entry.file_name().to_string_lossy().parse::<i32>().ok())
                .flatten()
        })
        .expect("its descriptor");
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(server_pid).expect("a pid")).expect("a pid");
    let pidfd =
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).expect("pidfd_open");
    rustix::process::pidfd_getfd(&pidfd, descriptor, rustix::process::PidfdGetfdFlags::empty())
        .expect("pidfd_getfd")
}

/// Sends a request on a raw connection and reads until the end of the response's headers.
async fn send_and_read_head(stream: &mut tokio::net::TcpStream, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        let read = stream.read(&mut buffer).await.expect("read");
        assert!(read > 0, "closed: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Every accepted connection has Nagle's algorithm off (TCP_NODELAY), read from the server's
/// own sockets: a kept-alive connection and an SSE watch, whose small frames would otherwise
/// wait for the client's delayed ACK (~40 ms) before leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_send_small_frames_at_once() {
    let (server, _data_dir) = start_dev(&[]);
    let api = support::api::Api::new(&server);
    let account = api.register("nodelay@example.com", "No Delay").await;
    let auth = account.auth();
    let execution_id = execute_one_step(&api, &auth).await;

    let host = server.address;
    // A kept-alive connection: two requests on it.
    let mut kept = tokio::net::TcpStream::connect(host).await.expect("connect");
    let health = format!("GET /health/ready HTTP/1.1\r\nHost: {host}\r\n\r\n");
    assert!(send_and_read_head(&mut kept, &health).await.starts_with("HTTP/1.1 200"));
    // The reading tells the two apart: the test's own socket has Nagle's algorithm on.
    assert!(!rustix::net::sockopt::tcp_nodelay(&kept).expect("client option"));
    let client_port = kept.local_addr().expect("client address").port();
    let server_end = server_end_of(server.pid(), host.port(), client_port);
    assert!(rustix::net::sockopt::tcp_nodelay(&server_end).expect("server option"));

    // An SSE watch.
    let mut watch = tokio::net::TcpStream::connect(host).await.expect("connect");
    let events = format!(
        "GET /api/v1/executions/{execution_id}/events HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        account.token
    );
    let head = send_and_read_head(&mut watch, &events).await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");
    let client_port = watch.local_addr().expect("client address").port();
    let server_end = server_end_of(server.pid(), host.port(), client_port);
    assert!(rustix::net::sockopt::tcp_nodelay(&server_end).expect("server option"));
}
