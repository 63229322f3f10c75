//! The edge as a client meets it: security headers on REST (not gRPC), client addresses behind
//! trusted and untrusted proxies, and bearer tokens of an external identity provider verified
//! against a JWKS this test serves itself. The real `turbocat` binary in `dev` (and `serve`).

#[path = "../support/mod.rs"]
mod support;

mod external;
mod headers;
mod identity_provider;
mod proxies;

use std::time::Duration;

use serde_json::Value;

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

pub async fn grpc_channel(base_url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(base_url.to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("grpc connect")
}

/// A gRPC request carrying `metadata`.
pub fn grpc_request<T>(message: T, metadata: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().expect("ascii metadata"));
    }
    request
}

/// Registers a local account over REST and returns its access token.
pub async fn register(base_url: &str, email: &str) -> String {
    let response = http()
        .post(format!("{base_url}/api/v1/auth/register"))
        .json(&serde_json::json!({
            "email": email,
            "password": "correct horse battery",
            "fullName": "Local Person",
        }))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201, "register {email}");
    let body: Value = response.json().await.expect("json");
    body["data"]["accessToken"].as_str().expect("access token").to_owned()
}

/// Rows of the `dev` SQLite database in `data_dir`.
pub async fn sqlite_rows(
    data_dir: &std::path::Path,
    sql: &'static str,
) -> Vec<sqlx::sqlite::SqliteRow> {
    use sqlx::Connection;
    let url = format!("sqlite://{}?mode=ro", data_dir.join("turbocat.db").display());
    let mut connection = sqlx::SqliteConnection::connect(&url).await.expect("open dev database");
    sqlx::query(sql).fetch_all(&mut connection).await.expect("query dev database")
}
