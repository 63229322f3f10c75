//! Fault tolerance, end to end with real processes: a cron deployment on two replicas killed in
//! turn (`cron`), a queue entry the database does not know
//! (`dangling`), PostgreSQL unreachable for a while behind a TCP proxy the test cuts and restores
//! (`database`), SIGTERM on `serve` and `dev` with work in flight, runners attached and an
//! SSE watch open (`shutdown`), a runner given several servers moving to the next when its
//! replica is killed (`runners`), and 200 fan-out executions on two replicas and four runners,
//! undisturbed and while a replica, a runner, Redis or PostgreSQL goes away (`load`); and a
//! rolling upgrade of two replicas across a migration the older one does not know (`upgrade`).

#[path = "../support/mod.rs"]
mod support;

mod cron;
mod dangling;
mod database;
mod load;
mod proxy;
mod redis;
mod runners;
mod shutdown;
mod upgrade;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::{Api, Auth};

/// An account that builds and runs workflows over REST.
pub struct Bench {
    pub api: Api,
    pub auth: Auth,
    pub user_id: String,
    /// The access token of `auth`.
    pub token: String,
}

impl Bench {
    pub async fn new(api: Api, email: &str) -> Self {
        let account = api.register(email, "Fault Tester").await;
        Self {
            auth: account.auth(),
            user_id: account.id.clone(),
            token: account.token.clone(),
            api,
        }
    }

    /// Creates an agent and returns its id.
    pub async fn agent(&self, name: &str, agent_type: &str, config: Value) -> String {
        let (status, body) = self
            .api
            .post(
                "/api/v1/agents",
                &self.auth,
                json!({ "name": name, "type": agent_type, "config": config }),
            )
            .await;
        assert_eq!(status, 201, "create agent {name}: {body}");
        body["data"]["id"].as_str().expect("agent id").to_owned()
    }

    /// A DATA agent running `program`.
    pub async fn jq(&self, name: &str, program: &str) -> String {
        self.agent(name, "DATA", json!({ "data": { "jqProgram": program } })).await
    }

    /// A python CODE agent that sleeps `seconds` and outputs `{"slept": seconds}`.
    pub async fn sleeper(&self, name: &str, seconds: f64) -> String {
        let source = format!(
            "import json, time\ntime.sleep({seconds})\nprint(json.dumps({{'slept': {seconds}}}))\n"
        );
        self.agent(name, "CODE", json!({ "code": { "language": "python", "source": source } }))
            .await
    }

    /// Creates a workflow and returns its id.
    pub async fn workflow(&self, name: &str, steps: Value) -> String {
        let (status, body) = self
            .api
            .post("/api/v1/workflows", &self.auth, json!({ "name": name, "steps": steps }))
            .await;
        assert_eq!(status, 201, "create workflow {name}: {body}");
        body["data"]["id"].as_str().expect("workflow id").to_owned()
    }

    /// Starts an execution and returns its id.
    pub async fn execute(&self, workflow_id: &str) -> String {
        let (status, body) = self
            .api
            .post(&format!("/api/v1/workflows/{workflow_id}/execute"), &self.auth, json!({}))
            .await;
        assert_eq!(status, 202, "execute: {body}");
        body["data"]["id"].as_str().expect("execution id").to_owned()
    }

    pub async fn execution(&self, execution_id: &str) -> Value {
        let (status, body) =
            self.api.get(&format!("/api/v1/executions/{execution_id}"), &self.auth).await;
        assert_eq!(status, 200, "get execution: {body}");
        body["data"].clone()
    }

    /// Polls until `predicate` holds for the execution (or `limit` passes).
    pub async fn wait_for(
        &self,
        execution_id: &str,
        limit: Duration,
        what: &str,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let execution = self.execution(execution_id).await;
            if predicate(&execution) {
                return execution;
            }
            assert!(started.elapsed() < limit, "not {what} after {limit:?}: {execution}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until the execution reaches a final status.
    pub async fn finished(&self, execution_id: &str, limit: Duration) -> Value {
        self.wait_for(execution_id, limit, "finished", |execution| {
            ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"]
                .contains(&execution["status"].as_str().unwrap_or_default())
        })
        .await
    }
}

/// Every step run of an execution ran once and succeeded: attempt 1, one attempt recorded.
pub fn assert_every_step_ran_once(execution: &Value) {
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let steps = execution["stepRuns"].as_array().expect("step runs");
    assert!(!steps.is_empty(), "{execution}");
    for step in steps {
        assert_eq!(step["status"], "SUCCEEDED", "{step}");
        assert_eq!(step["attempt"], 1, "run again: {step}");
        let attempts = step["attempts"].as_array().map_or(0, Vec::len);
        assert_eq!(attempts, 1, "one recorded attempt: {step}");
    }
}

/// Whether any step of the execution is RUNNING.
pub fn some_step_running(execution: &Value) -> bool {
    execution["stepRuns"]
        .as_array()
        .is_some_and(|steps| steps.iter().any(|step| step["status"] == "RUNNING"))
}

pub use crate::support::RunnerProcess;

/// Waits until `GET /runners` on `api` lists a runner named `name`.
pub async fn wait_for_runner(api: &Api, auth: &Auth, name: &str) {
    let started = Instant::now();
    loop {
        let (status, body) = api.get("/api/v1/runners", auth).await;
        if status == 200
            && body["data"]
                .as_array()
                .is_some_and(|runners| runners.iter().any(|runner| runner["name"] == name))
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "runner {name} never attached: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A prefix for one installation's keys in the shared Redis.
pub fn unique_prefix() -> String {
    format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple())
}

/// Sends SIGTERM to a process.
pub fn terminate(pid: u32) {
    let signalled = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    assert!(signalled.expect("kill").success());
}

/// A log without its terminal colours (the server colours its log even into a pipe).
pub fn plain(log: &str) -> String {
    let mut text = String::with_capacity(log.len());
    let mut characters = log.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            // An escape sequence: `ESC [ … letter`.
            for inner in characters.by_ref() {
                if inner.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        text.push(character);
    }
    text
}

/// The outage was noticed, each background loop warned about it once (not once per pass), and
/// they said they work again.
pub fn assert_one_warning_per_loop(log: &str) {
    let mut failing: Vec<String> = log
        .lines()
        .filter(|line| line.contains("a background task is failing"))
        .map(|line| {
            let value = line.split("activity=\"").nth(1).unwrap_or_default();
            value.split('"').next().unwrap_or_default().to_owned()
        })
        .collect();
    assert!(!failing.is_empty(), "the outage was noticed:\n{log}");
    let noticed = failing.len();
    failing.sort();
    failing.dedup();
    assert_eq!(failing.len(), noticed, "one warning per loop and outage:\n{log}");
    assert!(log.contains("a background task works again"), "{log}");
}
