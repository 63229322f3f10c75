//! Bad input on the public auth operations (register, login, refresh, forgot and reset
//! password) through the real `turbocat` binary, over REST and gRPC: every bad field is a
//! VALIDATION_ERROR naming it (REST `error.details[].field`, gRPC `google.rpc.BadRequest`
//! field violations) and nothing is written. Also duplicate registrations and who is admin.

#[path = "../support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::transport::Channel;
use tonic_types::StatusExt;
use turbocat::error::ServiceError;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;

use support::{TurbocatProcess, start_dev};

const PASSWORD: &str = "correct horse battery staple";
/// The existing account the cases name, so a bad request could have touched it.
const EXISTING_EMAIL: &str = "existing@example.com";

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

/// A `dev` server whose rate limits are off, so only validation decides.
fn start() -> (TurbocatProcess, tempfile::TempDir) {
    start_dev(&["--auth-rate-limit-per-ip", "0", "--auth-rate-limit-per-account", "0"])
}

async fn auth_client(base_url: &str) -> AuthServiceClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(base_url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc connect");
    AuthServiceClient::new(channel)
}

/// POSTs `body` (raw JSON text) to `/api/v1/auth/<path>`: (status, response body).
async fn rest_post(base_url: &str, path: &str, body: String) -> (u16, Value) {
    let response = http()
        .post(format!("{base_url}/api/v1/auth/{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// The tables an auth operation writes to.
const WRITTEN_TABLES: [&str; 5] =
    ["users", "sessions", "refresh_tokens", "password_reset_tokens", "audit_logs"];

/// Where a server keeps its rows.
#[derive(Clone, Copy)]
enum Database<'a> {
    /// The `dev` SQLite file in this data directory.
    Sqlite(&'a std::path::Path),
    /// The `serve` PostgreSQL database at this URL.
    Postgres(&'a str),
}

/// Rows of every table an auth operation writes to.
async fn written_rows(database: Database<'_>) -> Vec<(&'static str, i64)> {
    use sqlx::{Connection, Row};
    let mut counts = Vec::new();
    for table in WRITTEN_TABLES {
        let statement = format!("SELECT COUNT(*) FROM {table}");
        let count = match database {
            Database::Sqlite(data_dir) => {
                let url = format!("sqlite://{}?mode=ro", data_dir.join("turbocat.db").display());
                let mut connection =
                    sqlx::SqliteConnection::connect(&url).await.expect("open dev database");
                let row = sqlx::query(sqlx::AssertSqlSafe(statement))
                    .fetch_one(&mut connection)
                    .await
                    .expect("count rows");
                row.get::<i64, _>(0)
            }
            Database::Postgres(url) => {
                let mut connection =
                    sqlx::PgConnection::connect(url).await.expect("open serve database");
                let row = sqlx::query(sqlx::AssertSqlSafe(statement))
                    .fetch_one(&mut connection)
                    .await
                    .expect("count rows");
                row.get::<i64, _>(0)
            }
        };
        counts.push((table, count));
    }
    counts
}

/// Registers `email` over REST and returns the user.
async fn register_over_rest(base_url: &str, email: &str) -> Value {
    let body = json!({ "email": email, "password": PASSWORD, "fullName": "Some Person" });
    let (status, answer) = rest_post(base_url, "register", body.to_string()).await;
    assert_eq!(status, 201, "register {email}: {answer}");
    answer["data"]["user"].clone()
}

fn fields(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn long_email() -> String {
    format!("{}@example.com", "a".repeat(250))
}

fn long_password() -> String {
    "p".repeat(129)
}

fn long_name() -> String {
    "n".repeat(201)
}

/// One bad REST request: the path, the raw JSON body, the fields it must name.
struct RestCase {
    name: &'static str,
    path: &'static str,
    body: String,
    fields: BTreeSet<String>,
}

fn rest_case(name: &'static str, path: &'static str, body: Value, names: &[&str]) -> RestCase {
    RestCase { name, path, body: body.to_string(), fields: fields(names) }
}

fn rest_cases() -> Vec<RestCase> {
    let good = PASSWORD;
    vec![
        // Missing fields.
        rest_case("register empty", "register", json!({}), &["email", "password", "fullName"]),
        rest_case(
            "register without name",
            "register",
            json!({ "email": "new@example.com", "password": good }),
            &["fullName"],
        ),
        rest_case("login empty", "login", json!({}), &["email", "password"]),
        rest_case(
            "login without password",
            "login",
            json!({ "email": EXISTING_EMAIL }),
            &["password"],
        ),
        rest_case("refresh empty", "refresh", json!({}), &["refreshToken"]),
        rest_case("forgot empty", "forgot-password", json!({}), &["email"]),
        rest_case("reset empty", "reset-password", json!({}), &["token", "newPassword"]),
        // Wrong JSON types.
        rest_case(
            "register with a numeric email",
            "register",
            json!({ "email": 123, "password": good, "fullName": "N" }),
            &["email"],
        ),
        rest_case(
            "register with an object name",
            "register",
            json!({ "email": "new@example.com", "password": good, "fullName": { "first": "N" } }),
            &["fullName"],
        ),
        rest_case(
            "login with an array email",
            "login",
            json!({ "email": [EXISTING_EMAIL], "password": good }),
            &["email"],
        ),
        rest_case(
            "login with a boolean password",
            "login",
            json!({ "email": EXISTING_EMAIL, "password": true }),
            &["password"],
        ),
        rest_case(
            "refresh with a number",
            "refresh",
            json!({ "refreshToken": 42 }),
            &["refreshToken"],
        ),
        rest_case(
            "forgot with a boolean",
            "forgot-password",
            json!({ "email": false }),
            &["email"],
        ),
        rest_case(
            "reset with a numeric token",
            "reset-password",
            json!({ "token": 5, "newPassword": good }),
            &["token"],
        ),
        // Over-long strings.
        rest_case(
            "register over-long",
            "register",
            json!({ "email": long_email(), "password": long_password(), "fullName": long_name() }),
            &["email", "password", "fullName"],
        ),
        rest_case(
            "login over-long",
            "login",
            json!({ "email": long_email(), "password": long_password() }),
            &["email", "password"],
        ),
        rest_case(
            "refresh over-long",
            "refresh",
            json!({ "refreshToken": "r".repeat(10_000) }),
            &["refreshToken"],
        ),
        rest_case(
            "forgot over-long",
            "forgot-password",
            json!({ "email": long_email() }),
            &["email"],
        ),
        rest_case(
            "reset over-long",
            "reset-password",
            json!({ "token": "t".repeat(10_000), "newPassword": long_password() }),
            &["token", "newPassword"],
        ),
        // Invalid emails.
        rest_case(
            "register with an invalid email",
            "register",
            json!({ "email": "not-an-email", "password": good, "fullName": "N" }),
            &["email"],
        ),
        rest_case(
            "register with a spaced email",
            "register",
            json!({ "email": "a b@example.com", "password": good, "fullName": "N" }),
            &["email"],
        ),
        rest_case(
            "forgot with an invalid email",
            "forgot-password",
            json!({ "email": "a@b" }),
            &["email"],
        ),
        // Unknown fields (no mass assignment of a role).
        rest_case(
            "register asking to be admin",
            "register",
            json!({ "email": "sneaky@example.com", "password": good, "fullName": "N", "role": "ADMIN" }),
            &["role"],
        ),
        rest_case(
            "login with an extra field",
            "login",
            json!({ "email": EXISTING_EMAIL, "password": good, "rememberMe": true }),
            &["rememberMe"],
        ),
        rest_case(
            "refresh with an extra field",
            "refresh",
            json!({ "refreshToken": "whatever", "userId": "someone" }),
            &["userId"],
        ),
        rest_case(
            "forgot with an extra field",
            "forgot-password",
            json!({ "email": EXISTING_EMAIL, "redirectTo": "https://evil.test" }),
            &["redirectTo"],
        ),
        rest_case(
            "reset with an extra field",
            "reset-password",
            json!({ "token": "whatever", "newPassword": good, "email": EXISTING_EMAIL }),
            &["email"],
        ),
        // A too short new password.
        rest_case(
            "reset with a short password",
            "reset-password",
            json!({ "token": "whatever", "newPassword": "short" }),
            &["newPassword"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rest_input_is_a_validation_error_naming_each_field_and_writes_nothing() {
    let (server, data_dir) = start();
    let base_url = server.base_url();
    register_over_rest(&base_url, EXISTING_EMAIL).await;
    let before = written_rows(Database::Sqlite(data_dir.path())).await;
    assert!(before.iter().all(|(table, count)| *count > 0 || table.starts_with("password")));

    for case in rest_cases() {
        let (status, body) = rest_post(&base_url, case.path, case.body.clone()).await;
        assert_eq!(status, 400, "{}: {body}", case.name);
        assert_eq!(body["success"], false, "{}", case.name);
        assert_eq!(body["error"]["code"], "VALIDATION_ERROR", "{}: {body}", case.name);
        let named: BTreeSet<String> = body["error"]["details"]
            .as_array()
            .expect("details")
            .iter()
            .map(|detail| detail["field"].as_str().expect("field name").to_owned())
            .collect();
        assert_eq!(named, case.fields, "{}: {body}", case.name);
        assert!(body.get("data").is_none_or(Value::is_null), "{}: no data: {body}", case.name);
    }
    // Not JSON at all, and a JSON value that is not an object.
    for (name, raw) in [("malformed", "{\"email\": "), ("an array", "[]"), ("a string", "\"x\"")] {
        let (status, body) = rest_post(&base_url, "register", raw.to_owned()).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["code"], "VALIDATION_ERROR", "{name}: {body}");
    }

    assert_eq!(
        written_rows(Database::Sqlite(data_dir.path())).await,
        before,
        "bad input writes nothing"
    );
    // The secret of a rejected request is not echoed or logged.
    let logs = server.stderr_text();
    assert!(!logs.contains(&long_password()), "no password in the logs");
}

/// What gRPC answered: the status code and the fields its BadRequest names.
fn grpc_violations(status: &tonic::Status) -> BTreeSet<String> {
    let details = status.get_error_details();
    let bad_request = details.bad_request().expect("a google.rpc.BadRequest detail");
    bad_request.field_violations.iter().map(|violation| violation.field.clone()).collect()
}

fn assert_grpc_invalid<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    expected: &[&str],
    case: &str,
) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{case}: {status:?}");
    assert_eq!(ServiceError::from_status(&status).code.as_str(), "VALIDATION_ERROR", "{case}");
    assert_eq!(grpc_violations(&status), fields(expected), "{case}: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_is_invalid_argument_with_field_violations_and_writes_nothing() {
    let (server, data_dir) = start();
    let base_url = server.base_url();
    register_over_rest(&base_url, EXISTING_EMAIL).await;
    let before = written_rows(Database::Sqlite(data_dir.path())).await;
    let mut auth = auth_client(&base_url).await;
    let register = |email: String, password: String, full_name: String| pb::RegisterRequest {
        email,
        password,
        full_name,
    };
    let text = str::to_owned;

    // Register: missing, over-long, invalid.
    let cases = [
        (
            "register empty",
            register(text(""), text(""), text("")),
            vec!["email", "password", "fullName"],
        ),
        (
            "register blank name",
            register(text("new@example.com"), text(PASSWORD), text("  ")),
            vec!["fullName"],
        ),
        (
            "register over-long",
            register(long_email(), long_password(), long_name()),
            vec!["email", "password", "fullName"],
        ),
        (
            "register invalid email",
            register(text("@example.com"), text(PASSWORD), text("N")),
            vec!["email"],
        ),
        (
            "register short password",
            register(text("new@example.com"), text("short"), text("N")),
            vec!["password"],
        ),
    ];
    for (case, request, expected) in cases {
        assert_grpc_invalid(auth.register(request).await, &expected, case);
    }

    // Login.
    let login = |email: String, password: String| pb::LoginRequest { email, password };
    let cases = [
        ("login empty", login(text(""), text("")), vec!["email", "password"]),
        ("login without password", login(text(EXISTING_EMAIL), text("")), vec!["password"]),
        ("login over-long", login(long_email(), long_password()), vec!["email", "password"]),
    ];
    for (case, request, expected) in cases {
        assert_grpc_invalid(auth.login(request).await, &expected, case);
    }

    // Refresh.
    for (case, token) in
        [("refresh empty", String::new()), ("refresh over-long", "r".repeat(10_000))]
    {
        let request = pb::RefreshTokenRequest { refresh_token: token };
        assert_grpc_invalid(auth.refresh_token(request).await, &["refreshToken"], case);
    }

    // Forgot password.
    for (case, email) in [
        ("forgot empty", String::new()),
        ("forgot over-long", long_email()),
        ("forgot invalid", text("not-an-email")),
    ] {
        let request = pb::ForgotPasswordRequest { email };
        assert_grpc_invalid(auth.forgot_password(request).await, &["email"], case);
    }

    // Reset password.
    let reset =
        |token: String, new_password: String| pb::ResetPasswordRequest { token, new_password };
    let cases = [
        ("reset empty", reset(text(""), text("")), vec!["token", "newPassword"]),
        (
            "reset over-long",
            reset("t".repeat(10_000), long_password()),
            vec!["token", "newPassword"],
        ),
        ("reset short password", reset(text("whatever"), text("short")), vec!["newPassword"]),
    ];
    for (case, request, expected) in cases {
        assert_grpc_invalid(auth.reset_password(request).await, &expected, case);
    }

    assert_eq!(
        written_rows(Database::Sqlite(data_dir.path())).await,
        before,
        "bad input writes nothing"
    );
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Rest,
    Grpc,
}

/// Registers over `transport`: Ok(role) or Err((our error code, REST status if REST)).
async fn register_over(
    transport: Transport,
    base_url: &str,
    email: &str,
) -> Result<String, (String, Option<u16>)> {
    match transport {
        Transport::Rest => {
            let body = json!({ "email": email, "password": PASSWORD, "fullName": "Some Person" });
            let (status, answer) = rest_post(base_url, "register", body.to_string()).await;
            if status == 201 {
                return Ok(answer["data"]["user"]["role"].as_str().expect("role").to_owned());
            }
            let code = answer["error"]["code"].as_str().expect("error code").to_owned();
            Err((code, Some(status)))
        }
        Transport::Grpc => {
            let mut auth = auth_client(base_url).await;
            let request = pb::RegisterRequest {
                email: email.to_owned(),
                password: PASSWORD.to_owned(),
                full_name: "Some Person".to_owned(),
            };
            match auth.register(request).await {
                Ok(response) => {
                    let user = response.into_inner().user.expect("user");
                    let role = pb::UserRole::try_from(user.role).expect("known role");
                    Ok(role.as_str_name().trim_start_matches("USER_ROLE_").to_owned())
                }
                Err(status) => {
                    Err((ServiceError::from_status(&status).code.as_str().to_owned(), None))
                }
            }
        }
    }
}

/// On a fresh server: the first account is ADMIN, the next USER, and a duplicate email in any
/// case is CONFLICT (REST 409) that writes nothing.
async fn assert_first_admin_and_duplicates(
    transport: Transport,
    base_url: &str,
    database: Database<'_>,
) {
    let first = register_over(transport, base_url, "First.Person@Example.com").await;
    assert_eq!(first.as_deref(), Ok("ADMIN"), "{transport:?}: the first account is an admin");
    let second = register_over(transport, base_url, "second@example.com").await;
    assert_eq!(second.as_deref(), Ok("USER"), "{transport:?}: later accounts are users");

    let before = written_rows(database).await;
    for duplicate in
        ["first.person@example.com", "FIRST.PERSON@EXAMPLE.COM", " SECOND@example.com "]
    {
        let answer = register_over(transport, base_url, duplicate).await;
        let (code, status) = answer.expect_err(duplicate);
        assert_eq!(code, "CONFLICT", "{transport:?}: {duplicate}");
        if let Transport::Rest = transport {
            assert_eq!(status, Some(409), "{duplicate}");
        }
    }
    // Bad input is refused before anything is written here too.
    let invalid = register_over(transport, base_url, "not-an-email").await;
    assert_eq!(invalid.expect_err("invalid email").0, "VALIDATION_ERROR", "{transport:?}");
    assert_eq!(
        written_rows(database).await,
        before,
        "{transport:?}: a refused registration writes nothing"
    );
    // A third distinct account is still a plain user: the refusals did not change anything.
    let third = register_over(transport, base_url, "third@example.com").await;
    assert_eq!(third.as_deref(), Ok("USER"), "{transport:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_makes_the_first_account_admin_and_refuses_duplicate_emails_in_any_case() {
    for transport in [Transport::Rest, Transport::Grpc] {
        let (server, data_dir) = start();
        let database = Database::Sqlite(data_dir.path());
        assert_first_admin_and_duplicates(transport, &server.base_url(), database).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_makes_the_first_account_admin_and_refuses_duplicate_emails_in_any_case() {
    for transport in [Transport::Rest, Transport::Grpc] {
        let (server, database) = support::start_serve(&[]).await;
        let database_url = database.url.clone();
        let rows = Database::Postgres(&database_url);
        assert_first_admin_and_duplicates(transport, &server.base_url(), rows).await;
    }
}
