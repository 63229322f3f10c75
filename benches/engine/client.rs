//! The bench's view of a server: REST calls of one account, the SSE watch of an execution as
//! a client sees it, the workflow shapes the scenarios run, and the read-only look at the
//! engine's database that tells when a batch of executions finished.
//! May call: the server over REST and SSE; the server's database (one read-only query).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

use crate::Outcome;

const FINAL_STATUSES: [&str; 4] = ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"];

/// A status as the REST edge names it, without the enum prefix.
fn short_status(value: &Value) -> &str {
    let text = value.as_str().unwrap_or_default();
    text.trim_start_matches("EXECUTION_STATUS_").trim_start_matches("STEP_RUN_STATUS_")
}

pub fn is_final(status: &str) -> bool {
    FINAL_STATUSES.contains(&status)
}

/// An RFC 3339 time of the API.
pub fn time(value: &Value) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(value.as_str()?).ok()
}

/// Milliseconds from `earlier` to `later` (API times).
pub fn milliseconds_between(earlier: &Value, later: &Value) -> Option<f64> {
    let took = time(later)? - time(earlier)?;
    Some(took.num_microseconds()? as f64 / 1000.0)
}

pub fn elapsed_ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// REST calls of one benchmark account.
#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base_url: String,
    pub token: String,
}

impl Client {
    /// Registers the account (the first of the installation, so an administrator).
    pub async fn register(base_url: &str) -> Outcome<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build()?;
        let mut client = Self { http, base_url: base_url.to_owned(), token: String::new() };
        let body = json!({ "email": "bench@example.com", "password": "benchmark-password", "fullName": "Bench" });
        let registered =
            client.call(reqwest::Method::POST, "/api/v1/auth/register", Some(body)).await?;
        client.token =
            registered["data"]["accessToken"].as_str().ok_or("no access token")?.to_owned();
        Ok(client)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Outcome<Value> {
        let mut request = self.http.request(method, format!("{}{path}", self.base_url));
        if !self.token.is_empty() {
            request = request.bearer_auth(&self.token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            return Err(format!("{path}: {status} {text}").into());
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn get(&self, path: &str) -> Outcome<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Outcome<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// A new API key with the `RUNNER` scope.
    pub async fn runner_key(&self) -> Outcome<String> {
        let created = self
            .post("/api/v1/api-keys", json!({ "name": "bench runners", "scopes": ["RUNNER"] }))
            .await?;
        Ok(created["data"]["key"].as_str().ok_or("no key")?.to_owned())
    }

    /// The runners attached now.
    pub async fn runner_count(&self) -> Outcome<usize> {
        let listed = self.get("/api/v1/runners?pageSize=100").await?;
        if let Some(total) = listed["meta"]["pagination"]["total"].as_u64() {
            return Ok(usize::try_from(total)?);
        }
        Ok(listed["data"].as_array().map_or(0, Vec::len))
    }

    /// Waits until exactly `count` runners are attached.
    pub async fn wait_for_runners(&self, count: usize, limit: Duration) -> Outcome<()> {
        let deadline = Instant::now() + limit;
        loop {
            let attached = self.runner_count().await?;
            if attached == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{attached} runners attached, expected {count}").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn create_agent(&self, body: Value) -> Outcome<String> {
        let created = self.post("/api/v1/agents", body).await?;
        Ok(created["data"]["id"].as_str().ok_or("no agent id")?.to_owned())
    }

    pub async fn workflow(&self, name: &str, steps: Value) -> Outcome<String> {
        let created =
            self.post("/api/v1/workflows", json!({ "name": name, "steps": steps })).await?;
        Ok(created["data"]["id"].as_str().ok_or("no workflow id")?.to_owned())
    }

    /// Starts an execution and returns its id.
    pub async fn execute(&self, workflow_id: &str, input: &Value) -> Outcome<String> {
        let started = self
            .post(&format!("/api/v1/workflows/{workflow_id}/execute"), json!({ "input": input }))
            .await?;
        Ok(started["data"]["id"].as_str().ok_or("no execution id")?.to_owned())
    }

    /// One execution with its step runs.
    pub async fn execution(&self, execution_id: &str) -> Outcome<Value> {
        Ok(self.get(&format!("/api/v1/executions/{execution_id}")).await?["data"].clone())
    }

    /// Every execution of a workflow (without step runs), through cursor pages.
    pub async fn executions_of(&self, workflow_id: &str) -> Outcome<Vec<Value>> {
        let mut executions = Vec::new();
        let mut cursor = String::new();
        loop {
            let mut path = format!("/api/v1/executions?workflowId={workflow_id}&pageSize=100");
            if !cursor.is_empty() {
                path.push_str(&format!("&cursor={cursor}"));
            }
            let page = self.get(&path).await?;
            executions.extend(page["data"].as_array().cloned().unwrap_or_default());
            cursor =
                page["meta"]["pagination"]["nextCursor"].as_str().unwrap_or_default().to_owned();
            if cursor.is_empty() {
                return Ok(executions);
            }
        }
    }

    /// Starts `count` executions of a workflow, `concurrency` requests at a time; returns their
    /// ids.
    pub async fn execute_many(
        &self,
        workflow_id: &str,
        count: usize,
        concurrency: usize,
    ) -> Outcome<Vec<String>> {
        let next = Arc::new(AtomicU64::new(0));
        let mut submitters = Vec::new();
        for _ in 0..concurrency.min(count).max(1) {
            let (client, next, workflow_id) = (self.clone(), next.clone(), workflow_id.to_owned());
            submitters.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                    ids.push(client.execute(&workflow_id, &json!({ "tag": "batch" })).await?);
                }
                Ok::<Vec<String>, crate::Failure>(ids)
            }));
        }
        let mut ids = Vec::with_capacity(count);
        for submitter in submitters {
            ids.extend(submitter.await??);
        }
        Ok(ids)
    }

    /// Watches an execution over SSE (`GET /executions/:id/events`) to its end; returns its
    /// final status and when the stream showed it.
    pub async fn watch(&self, execution_id: &str) -> Outcome<(String, Instant)> {
        let mut response = self
            .http
            .get(format!("{}/api/v1/executions/{execution_id}/events", self.base_url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(format!("watch {execution_id}: {}", response.status()).into());
        }
        let mut text = String::new();
        while let Some(chunk) = response.chunk().await? {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let block: String = text.drain(..end + 2).collect();
                let Some(event) = sse_data(&block)? else { continue };
                let arrived = Instant::now();
                // The end: an execution change to a final status, or a snapshot already final.
                let execution = event.get("executionChanged").or_else(|| event.get("snapshot"));
                let status = execution
                    .map(|execution| short_status(&execution["status"]))
                    .unwrap_or_default();
                if is_final(status) {
                    return Ok((status.to_owned(), arrived));
                }
            }
        }
        Err(format!("the event stream of {execution_id} ended before the execution").into())
    }
}

/// The `data` of one Server-Sent Events block; an `error` event is a failure.
fn sse_data(block: &str) -> Outcome<Option<Value>> {
    let mut is_error = false;
    let mut data = String::new();
    for line in block.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            is_error = name.trim() == "error";
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.trim_start());
        }
    }
    if is_error {
        return Err(format!("the event stream failed: {data}").into());
    }
    if data.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(&data)?))
}

/// What a no-op step is: a DATA step running `.`, or an API step calling the bench's stub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Data,
    Api,
}

impl StepKind {
    pub const BOTH: [StepKind; 2] = [StepKind::Data, StepKind::Api];

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Data => "DATA",
            StepKind::Api => "API",
        }
    }
}

/// A DAG of no-op steps. Steps have no input mapping: each receives the execution's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// n steps, each depending on the one before.
    Chain(usize),
    /// One root, `width` steps depending on it, one step depending on all of them.
    FanOut(usize),
}

impl Shape {
    pub fn steps(self) -> usize {
        match self {
            Shape::Chain(length) => length,
            Shape::FanOut(width) => width + 2,
        }
    }

    pub fn name(self) -> String {
        match self {
            Shape::Chain(length) => format!("chain of {length}"),
            Shape::FanOut(width) => format!("fan-out 1+{width}+1"),
        }
    }

    pub fn definition(self, agent_id: &str) -> Value {
        let step = |key: String, depends_on: Vec<String>| json!({ "key": key, "agentId": agent_id, "dependsOn": depends_on });
        match self {
            Shape::Chain(length) => Value::Array(
                (0..length)
                    .map(|index| {
                        let depends_on =
                            if index == 0 { vec![] } else { vec![format!("s{}", index - 1)] };
                        step(format!("s{index}"), depends_on)
                    })
                    .collect(),
            ),
            Shape::FanOut(width) => {
                let leaves: Vec<String> = (0..width).map(|index| format!("leaf{index}")).collect();
                let mut steps = vec![step("root".to_owned(), vec![])];
                steps.extend(leaves.iter().map(|leaf| step(leaf.clone(), vec!["root".to_owned()])));
                steps.push(step("join".to_owned(), leaves));
                Value::Array(steps)
            }
        }
    }
}

/// The engine's own database, read by the bench to learn when a batch finished without asking
/// the server (whose work the bench measures). Every query is one transaction, counted so that
/// it can be subtracted from the database's figures.
pub enum EngineDatabase {
    Postgres {
        connection: Arc<tokio::sync::Mutex<sqlx::PgConnection>>,
        own_transactions: Arc<AtomicU64>,
    },
    Sqlite {
        connection: tokio::sync::Mutex<sqlx::SqliteConnection>,
    },
}

impl EngineDatabase {
    pub async fn postgres(url: &str, own_transactions: Arc<AtomicU64>) -> Outcome<Self> {
        let connection = sqlx::PgConnection::connect(url).await?;
        Ok(Self::Postgres {
            connection: Arc::new(tokio::sync::Mutex::new(connection)),
            own_transactions,
        })
    }

    pub async fn sqlite(path: &std::path::Path) -> Outcome<Self> {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true);
        let connection = sqlx::SqliteConnection::connect_with(&options).await?;
        Ok(Self::Sqlite { connection: tokio::sync::Mutex::new(connection) })
    }

    /// The connection the bench reads the `serve` database through.
    pub fn postgres_connection(&self) -> Option<Arc<tokio::sync::Mutex<sqlx::PgConnection>>> {
        match self {
            Self::Postgres { connection, .. } => Some(connection.clone()),
            Self::Sqlite { .. } => None,
        }
    }

    /// Gives PostgreSQL's planner statistics of what the bench just wrote (`ANALYZE`), as
    /// autovacuum does within a minute on a live installation; SQLite keeps none to give.
    pub async fn analyze(&self) -> Outcome<()> {
        if let Self::Postgres { connection, own_transactions } = self {
            own_transactions.fetch_add(1, Ordering::SeqCst);
            sqlx::query("ANALYZE").execute(&mut *connection.lock().await).await?;
        }
        Ok(())
    }

    /// (finished, succeeded) executions of a workflow.
    pub async fn finished(&self, workflow_id: &str) -> Outcome<(u64, u64)> {
        let workflow_id = uuid::Uuid::parse_str(workflow_id)?;
        let (finished, succeeded): (i64, i64) = match self {
            Self::Postgres { connection, own_transactions } => {
                own_transactions.fetch_add(1, Ordering::SeqCst);
                sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')), \
                     count(*) FILTER (WHERE status = 'SUCCEEDED') FROM executions WHERE workflow_id = $1",
                )
                .bind(workflow_id)
                .fetch_one(&mut *connection.lock().await)
                .await?
            }
            Self::Sqlite { connection } => {
                sqlx::query_as(
                    "SELECT coalesce(sum(status IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT')), 0), \
                     coalesce(sum(status = 'SUCCEEDED'), 0) FROM executions WHERE workflow_id = ?",
                )
                .bind(workflow_id)
                .fetch_one(&mut *connection.lock().await)
                .await?
            }
        };
        Ok((u64::try_from(finished)?, u64::try_from(succeeded)?))
    }

    /// Waits until `expected` executions of the workflow finished; returns how many succeeded.
    pub async fn wait_finished(
        &self,
        workflow_id: &str,
        expected: u64,
        limit: Duration,
    ) -> Outcome<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let (finished, succeeded) = self.finished(workflow_id).await?;
            if finished >= expected {
                return Ok(succeeded);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{finished} of {expected} executions finished after {limit:?}"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
