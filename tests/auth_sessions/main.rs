//! The session lifecycle as a user meets it, through the real `turbocat` binary over REST and
//! gRPC: refresh with rotation and reuse detection, logout, password reset, rate limits, email
//! enumeration, secrets kept out of logs and audit rows, crafted access tokens, and two `serve`
//! replicas sharing revocations and rate limit counters.

#[path = "../support/mod.rs"]
mod support;

mod flows;
mod limits;
mod redis_outage;
mod replicas;
mod tokens;

use std::time::Duration;

use serde_json::{Value, json};
use tonic::transport::Channel;
use turbocat::error::ServiceError;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::auth_service_client::AuthServiceClient;
use turbocat::proto::v1::user_service_client::UserServiceClient;

pub const PASSWORD: &str = "correct horse battery staple";
pub const NEW_PASSWORD: &str = "a brand new passphrase 42";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Rest,
    Grpc,
}

pub const TRANSPORTS: [Transport; 2] = [Transport::Rest, Transport::Grpc];

/// What a refused call said, normalised across transports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Our error code name (`UNAUTHORIZED`, `RATE_LIMITED`, …).
    pub code: String,
    pub message: String,
    pub retry_after_seconds: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct TokenPair {
    pub user_id: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

/// A client of one server over one transport.
pub struct Client {
    pub transport: Transport,
    pub base_url: String,
    http: reqwest::Client,
    channel: Option<Channel>,
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("http client")
}

fn failure_of_status(status: &tonic::Status) -> Failure {
    let error = ServiceError::from_status(status);
    Failure {
        code: error.code.as_str().to_owned(),
        message: error.message,
        retry_after_seconds: error.retry_after.map(|delay| delay.as_secs()),
    }
}

fn with_bearer<T>(message: T, access_token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {access_token}").parse().expect("ascii metadata"));
    request
}

fn pair_of(user: Option<pb::User>, access: String, refresh: String, expires_in: i32) -> TokenPair {
    TokenPair {
        user_id: user.map(|user| user.id).unwrap_or_default(),
        access_token: access,
        refresh_token: refresh,
        expires_in: i64::from(expires_in),
    }
}

impl Client {
    pub async fn new(transport: Transport, base_url: &str) -> Self {
        let channel = match transport {
            Transport::Rest => None,
            Transport::Grpc => Some(
                tonic::transport::Endpoint::from_shared(base_url.to_owned())
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("grpc connect"),
            ),
        };
        Self { transport, base_url: base_url.to_owned(), http: http_client(), channel }
    }

    fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel.clone().expect("grpc channel"))
    }

    /// POSTs `body` to `path`: (HTTP status, Retry-After seconds, envelope).
    pub async fn post_raw(&self, path: &str, body: Value) -> (u16, Option<u64>, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(&body)
            .send()
            .await
            .expect("rest request");
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok())
            .and_then(|text| text.parse().ok());
        let envelope: Value = response.json().await.expect("json envelope");
        (status, retry_after, envelope)
    }

    async fn post(&self, path: &str, body: Value, success_status: u16) -> Result<Value, Failure> {
        let (status, retry_after, envelope) = self.post_raw(path, body).await;
        if envelope["success"] == true {
            assert_eq!(status, success_status, "{path}: {envelope}");
            return Ok(envelope["data"].clone());
        }
        let code = envelope["error"]["code"].as_str().expect("error code").to_owned();
        let expected_status = turbocat::error::ErrorCode::from_name(&code)
            .expect("a known code")
            .http_status()
            .as_u16();
        assert_eq!(status, expected_status, "{path}: {envelope}");
        Err(Failure {
            code,
            message: envelope["error"]["message"].as_str().unwrap_or_default().to_owned(),
            retry_after_seconds: retry_after,
        })
    }

    fn rest_pair(data: &Value) -> TokenPair {
        TokenPair {
            user_id: data["user"]["id"].as_str().unwrap_or_default().to_owned(),
            access_token: data["accessToken"].as_str().expect("accessToken").to_owned(),
            refresh_token: data["refreshToken"].as_str().expect("refreshToken").to_owned(),
            expires_in: data["expiresIn"].as_i64().expect("expiresIn"),
        }
    }

    pub async fn register(&self, email: &str, password: &str) -> Result<TokenPair, Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "email": email, "password": password, "fullName": "Tess" });
                let data = self.post("/api/v1/auth/register", body, 201).await?;
                Ok(Self::rest_pair(&data))
            }
            Transport::Grpc => {
                let request = pb::RegisterRequest {
                    email: email.to_owned(),
                    password: password.to_owned(),
                    full_name: "Tess".to_owned(),
                };
                let response = self
                    .auth()
                    .register(request)
                    .await
                    .map_err(|status| failure_of_status(&status))?
                    .into_inner();
                Ok(pair_of(
                    response.user,
                    response.access_token,
                    response.refresh_token,
                    response.expires_in,
                ))
            }
        }
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<TokenPair, Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "email": email, "password": password });
                let data = self.post("/api/v1/auth/login", body, 200).await?;
                Ok(Self::rest_pair(&data))
            }
            Transport::Grpc => {
                let request =
                    pb::LoginRequest { email: email.to_owned(), password: password.to_owned() };
                let response = self
                    .auth()
                    .login(request)
                    .await
                    .map_err(|status| failure_of_status(&status))?
                    .into_inner();
                Ok(pair_of(
                    response.user,
                    response.access_token,
                    response.refresh_token,
                    response.expires_in,
                ))
            }
        }
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "refreshToken": refresh_token });
                let data = self.post("/api/v1/auth/refresh", body, 200).await?;
                Ok(Self::rest_pair(&data))
            }
            Transport::Grpc => {
                let request = pb::RefreshTokenRequest { refresh_token: refresh_token.to_owned() };
                let response = self
                    .auth()
                    .refresh_token(request)
                    .await
                    .map_err(|status| failure_of_status(&status))?
                    .into_inner();
                Ok(pair_of(
                    response.user,
                    response.access_token,
                    response.refresh_token,
                    response.expires_in,
                ))
            }
        }
    }

    pub async fn logout(&self, refresh_token: &str) -> Result<(), Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "refreshToken": refresh_token });
                let data = self.post("/api/v1/auth/logout", body, 200).await?;
                assert_eq!(data, json!({}));
                Ok(())
            }
            Transport::Grpc => {
                let request = pb::LogoutRequest { refresh_token: refresh_token.to_owned() };
                self.auth().logout(request).await.map_err(|status| failure_of_status(&status))?;
                Ok(())
            }
        }
    }

    pub async fn forgot_password(&self, email: &str) -> Result<(), Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "email": email });
                let data = self.post("/api/v1/auth/forgot-password", body, 202).await?;
                assert_eq!(data, json!({}));
                Ok(())
            }
            Transport::Grpc => {
                let request = pb::ForgotPasswordRequest { email: email.to_owned() };
                self.auth()
                    .forgot_password(request)
                    .await
                    .map_err(|status| failure_of_status(&status))?;
                Ok(())
            }
        }
    }

    pub async fn reset_password(&self, token: &str, new_password: &str) -> Result<(), Failure> {
        match self.transport {
            Transport::Rest => {
                let body = json!({ "token": token, "newPassword": new_password });
                let data = self.post("/api/v1/auth/reset-password", body, 200).await?;
                assert_eq!(data, json!({}));
                Ok(())
            }
            Transport::Grpc => {
                let request = pb::ResetPasswordRequest {
                    token: token.to_owned(),
                    new_password: new_password.to_owned(),
                };
                self.auth()
                    .reset_password(request)
                    .await
                    .map_err(|status| failure_of_status(&status))?;
                Ok(())
            }
        }
    }

    /// The authenticated probe: `UserService.GetCurrentUser`; the caller's user id.
    pub async fn me(&self, access_token: &str) -> Result<String, Failure> {
        match self.transport {
            Transport::Rest => {
                let response = self
                    .http
                    .get(format!("{}/api/v1/users/me", self.base_url))
                    .bearer_auth(access_token)
                    .send()
                    .await
                    .expect("rest request");
                let status = response.status().as_u16();
                let envelope: Value = response.json().await.expect("json envelope");
                if envelope["success"] == true {
                    assert_eq!(status, 200, "{envelope}");
                    return Ok(envelope["data"]["id"].as_str().expect("user id").to_owned());
                }
                let code = envelope["error"]["code"].as_str().expect("code").to_owned();
                Err(Failure {
                    code,
                    message: envelope["error"]["message"].as_str().unwrap_or_default().to_owned(),
                    retry_after_seconds: None,
                })
            }
            Transport::Grpc => {
                let mut users = UserServiceClient::new(self.channel.clone().expect("channel"));
                let response = users
                    .get_current_user(with_bearer(pb::GetCurrentUserRequest {}, access_token))
                    .await
                    .map_err(|status| failure_of_status(&status))?;
                Ok(response.into_inner().user.expect("user").id)
            }
        }
    }
}

/// A fresh email for one test.
pub fn unique_email(label: &str) -> String {
    format!("{label}-{}@example.com", uuid::Uuid::new_v4().simple())
}

pub fn assert_unauthorized(
    result: Result<impl std::fmt::Debug, Failure>,
    context: &str,
) -> Failure {
    let failure = result.expect_err(context);
    assert_eq!(failure.code, "UNAUTHORIZED", "{context}: {failure:?}");
    failure
}

/// Waits for the log mailer's line for `email` (the `expected_count`-th) and returns its token.
pub async fn reset_token_from_log(
    process: &support::TurbocatProcess,
    email: &str,
    expected_count: usize,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = process.stderr_text();
        let tokens: Vec<String> = log
            .lines()
            .filter(|line| line.contains("reset_link") && line.contains(email))
            .filter_map(|line| {
                let rest = line.split("token=").nth(1)?;
                let token: String = rest
                    .chars()
                    .take_while(|character| {
                        character.is_ascii_alphanumeric() || *character == '-' || *character == '_'
                    })
                    .collect();
                Some(token)
            })
            .collect();
        if tokens.len() >= expected_count {
            let token = tokens[expected_count - 1].clone();
            assert_eq!(token.len(), 43, "a 256-bit base64url token: {token}");
            return token;
        }
        assert!(std::time::Instant::now() < deadline, "no reset link for {email} in: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every audit row of a store, oldest first.
pub async fn audit_rows(store: &dyn turbocat::store::Store) -> Vec<turbocat::store::AuditLog> {
    let mut rows = Vec::new();
    let mut cursor = None;
    loop {
        let filter = turbocat::store::AuditLogFilter {
            limit: 100,
            cursor: cursor.take(),
            ..turbocat::store::AuditLogFilter::default()
        };
        let page = store.list_audit_logs(filter).await.expect("audit rows");
        rows.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    rows.reverse();
    rows
}

/// Opens the SQLite store of a `dev` data directory (the server keeps running).
pub async fn dev_store(data_dir: &std::path::Path) -> std::sync::Arc<dyn turbocat::store::Store> {
    let store = turbocat::store::SqliteStore::open(&data_dir.join("turbocat.db"))
        .await
        .expect("open the dev database");
    std::sync::Arc::new(store)
}
