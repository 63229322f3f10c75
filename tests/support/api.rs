//! Calls against a real `turbocat` process, shared by the end-to-end test binaries: REST through
//! reqwest, grpc-web as a browser sends it, and gRPC through the generated clients, each with a
//! bearer token, an API key, or nothing.

use std::time::Duration;

use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use turbocat::proto::v1::api_key_service_client::ApiKeyServiceClient;
use turbocat::proto::v1::user_service_client::UserServiceClient;

use super::TurbocatProcess;

/// The credentials a call carries.
#[derive(Debug, Clone)]
pub enum Auth {
    None,
    /// `Authorization: Bearer <token>` (an access token or an API key).
    Bearer(String),
    /// `x-api-key: <key>`.
    ApiKey(String),
}

impl Auth {
    pub fn bearer(token: &str) -> Self {
        Auth::Bearer(token.to_owned())
    }

    pub fn key(key: &str) -> Self {
        Auth::ApiKey(key.to_owned())
    }
}

/// A signed-up account.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: String,
    pub email: String,
    pub password: String,
    pub token: String,
}

impl Account {
    pub fn auth(&self) -> Auth {
        Auth::bearer(&self.token)
    }
}

#[derive(Clone)]
pub struct Api {
    pub base_url: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(server: &TurbocatProcess) -> Self {
        Self {
            base_url: server.base_url(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
        }
    }

    /// A REST call: (status, body, headers).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        self.try_call(method, path, auth, body).await.expect("rest request")
    }

    /// A REST call that may find nobody answering (a server killed or restarting): `None`
    /// then.
    pub async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Auth,
        body: Option<Value>,
    ) -> Option<(u16, Value, reqwest::header::HeaderMap)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base_url));
        request = match auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::ApiKey(key) => request.header("x-api-key", key),
        };
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.ok()?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Some((status, body, headers))
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> (u16, Value) {
        let (status, body, _) = self.call(reqwest::Method::GET, path, auth, None).await;
        (status, body)
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: Value) -> (u16, Value) {
        let (status, body, _) = self.call(reqwest::Method::POST, path, auth, Some(body)).await;
        (status, body)
    }

    pub async fn patch(&self, path: &str, auth: &Auth, body: Value) -> (u16, Value) {
        let (status, body, _) = self.call(reqwest::Method::PATCH, path, auth, Some(body)).await;
        (status, body)
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> (u16, Value) {
        let (status, body, _) = self.call(reqwest::Method::DELETE, path, auth, None).await;
        (status, body)
    }

    /// Registers an account over REST (the first one of an installation is the admin).
    pub async fn register(&self, email: &str, full_name: &str) -> Account {
        let password = format!("pw-{email}-long-enough");
        let (status, body) = self
            .post(
                "/api/v1/auth/register",
                &Auth::None,
                json!({ "email": email, "password": password, "fullName": full_name }),
            )
            .await;
        assert_eq!(status, 201, "register {email}: {body}");
        Account {
            id: body["data"]["user"]["id"].as_str().expect("user id").to_owned(),
            email: email.to_owned(),
            password,
            token: body["data"]["accessToken"].as_str().expect("access token").to_owned(),
        }
    }

    /// Logs in over REST: (status, body).
    pub async fn login(&self, email: &str, password: &str) -> (u16, Value) {
        self.post(
            "/api/v1/auth/login",
            &Auth::None,
            json!({ "email": email, "password": password }),
        )
        .await
    }

    /// Creates a DATA agent named `agent` running `jq_program` and a workflow named `workflow` of
    /// one step (keyed `agent`) running it, over REST: (agent id, workflow id).
    pub async fn one_step_workflow(
        &self,
        owner: &Auth,
        agent: &str,
        jq_program: &str,
        workflow: &str,
    ) -> (String, String) {
        let config = json!({ "data": { "jqProgram": jq_program } });
        let (status, body) = self
            .post(
                "/api/v1/agents",
                owner,
                json!({ "name": agent, "type": "DATA", "config": config }),
            )
            .await;
        assert_eq!(status, 201, "create agent {agent}: {body}");
        let agent_id = body["data"]["id"].as_str().expect("agent id").to_owned();
        let steps = json!([{ "key": agent, "agentId": agent_id }]);
        let (status, body) = self
            .post("/api/v1/workflows", owner, json!({ "name": workflow, "steps": steps }))
            .await;
        assert_eq!(status, 201, "create workflow {workflow}: {body}");
        let workflow_id = body["data"]["id"].as_str().expect("workflow id").to_owned();
        (agent_id, workflow_id)
    }

    /// Creates an API key over REST and returns (key, id).
    pub async fn create_key(&self, owner: &Auth, name: &str, scopes: &[&str]) -> (String, String) {
        let (status, body) =
            self.post("/api/v1/api-keys", owner, json!({ "name": name, "scopes": scopes })).await;
        assert_eq!(status, 201, "create key {name}: {body}");
        (
            body["data"]["key"].as_str().expect("key").to_owned(),
            body["data"]["apiKey"]["id"].as_str().expect("key id").to_owned(),
        )
    }

    /// A unary grpc-web call as a browser makes it: (grpc-status, response message bytes).
    pub async fn grpc_web(&self, path: &str, message: Vec<u8>, auth: &Auth) -> (String, Vec<u8>) {
        let (status, mut messages) = self.grpc_web_stream(path, message, auth).await;
        (status, messages.pop().unwrap_or_default())
    }

    /// A grpc-web call read to its end: (grpc-status, every response message's bytes).
    pub async fn grpc_web_stream(
        &self,
        path: &str,
        message: Vec<u8>,
        auth: &Auth,
    ) -> (String, Vec<Vec<u8>>) {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
        framed.extend_from_slice(&message);
        let mut request = self
            .http
            .post(format!("{}{path}", self.base_url))
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .body(framed);
        request = match auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::ApiKey(key) => request.header("x-api-key", key),
        };
        let response = request.send().await.expect("grpc-web request");
        let header_status = response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.expect("grpc-web body").to_vec();
        let (mut messages, mut trailers, mut offset) = (Vec::new(), String::new(), 0);
        while offset + 5 <= body.len() {
            let length = u32::from_be_bytes([
                body[offset + 1],
                body[offset + 2],
                body[offset + 3],
                body[offset + 4],
            ]) as usize;
            let frame = &body[offset + 5..offset + 5 + length];
            if body[offset] & 0x80 == 0 {
                messages.push(frame.to_vec());
            } else {
                trailers = String::from_utf8_lossy(frame).into_owned();
            }
            offset += 5 + length;
        }
        let status = trailers
            .lines()
            .find_map(|line| line.strip_prefix("grpc-status:").map(|value| value.trim().to_owned()))
            .or(header_status)
            .unwrap_or_default();
        (status, messages)
    }

    /// A gRPC channel to the server, for any generated client.
    pub async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(self.base_url.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("grpc connect")
    }

    pub async fn users(&self) -> UserServiceClient<Channel> {
        UserServiceClient::new(self.channel().await)
    }

    pub async fn keys(&self) -> ApiKeyServiceClient<Channel> {
        ApiKeyServiceClient::new(self.channel().await)
    }
}

/// A gRPC request carrying `auth` as metadata.
pub fn grpc<T>(message: T, auth: &Auth) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    match auth {
        Auth::None => {}
        Auth::Bearer(token) => {
            let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("metadata");
            request.metadata_mut().insert("authorization", value);
        }
        Auth::ApiKey(key) => {
            request.metadata_mut().insert("x-api-key", key.parse().expect("metadata"));
        }
    }
    request
}

/// Asserts a REST error envelope with `code` and returns the fields its details name.
pub fn assert_error(status: u16, body: &Value, expected_status: u16, code: &str) -> Vec<String> {
    assert_eq!(status, expected_status, "{body}");
    assert_eq!(body["success"], false, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["details"]
        .as_array()
        .expect("details")
        .iter()
        .filter_map(|detail| detail["field"].as_str().map(str::to_owned))
        .collect()
}

/// The field names of a gRPC status's `BadRequest` details.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|bad_request| {
            bad_request.field_violations.iter().map(|violation| violation.field.clone()).collect()
        })
        .unwrap_or_default()
}

/// A value of a gRPC status's `ErrorInfo` metadata.
pub fn error_metadata(status: &tonic::Status, key: &str) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().and_then(|info| info.metadata.get(key).cloned())
}

/// The `ErrorInfo` reason of a gRPC status (our error code, e.g. `FORBIDDEN`).
pub fn error_reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status.get_error_details().error_info().map(|info| info.reason.clone())
}

/// The SQLite store of a `dev` data directory, opened next to the running server.
pub async fn dev_store(data_dir: &std::path::Path) -> std::sync::Arc<dyn turbocat::store::Store> {
    let store = turbocat::store::SqliteStore::open(&data_dir.join("turbocat.db"))
        .await
        .expect("open the dev database");
    std::sync::Arc::new(store)
}

/// Every audit row of a store, oldest first.
pub async fn audit_rows(store: &dyn turbocat::store::Store) -> Vec<turbocat::store::AuditLog> {
    let mut rows = Vec::new();
    let mut filter = turbocat::store::AuditLogFilter { limit: 100, ..Default::default() };
    loop {
        let page = store.list_audit_logs(filter.clone()).await.expect("audit rows");
        rows.extend(page.items);
        match page.next_cursor {
            Some(cursor) => filter.cursor = Some(cursor),
            None => break,
        }
    }
    rows.reverse();
    rows
}
