//! The execution engine end to end: real `turbocat dev` (with its in-process runner) and real
//! `turbocat serve` with real `turbocat runner` processes, workflows executed over REST and
//! gRPC, and their executions read back until they finish.

#[path = "../support/mod.rs"]
mod support;

mod agent_types;
mod dev;
mod failures;
mod runners;
mod subworkflows;
mod tenants;
mod watch;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::{Api, Auth};

/// An account with helpers to build and run workflows over REST.
pub struct Workbench {
    pub api: Api,
    pub auth: Auth,
}

impl Workbench {
    pub async fn new(api: Api, email: &str) -> Self {
        let account = api.register(email, "Engine Tester").await;
        Self { auth: account.auth(), api }
    }

    /// Creates an agent and returns its id.
    pub async fn agent(
        &self,
        name: &str,
        agent_type: &str,
        config: Value,
        limits: Value,
    ) -> String {
        let (status, body) = self
            .api
            .post(
                "/api/v1/agents",
                &self.auth,
                json!({ "name": name, "type": agent_type, "config": config, "limits": limits }),
            )
            .await;
        assert_eq!(status, 201, "create agent {name}: {body}");
        body["data"]["id"].as_str().expect("agent id").to_owned()
    }

    /// A DATA agent running `program`.
    pub async fn jq(&self, name: &str, program: &str) -> String {
        self.agent(name, "DATA", json!({ "data": { "jqProgram": program } }), json!({})).await
    }

    /// A CODE agent in `language` (`python` or `javascript`).
    pub async fn code(&self, name: &str, language: &str, source: &str, limits: Value) -> String {
        self.agent(
            name,
            "CODE",
            json!({ "code": { "language": language, "source": source } }),
            limits,
        )
        .await
    }

    /// Creates a workflow and returns its id.
    pub async fn workflow(&self, name: &str, steps: Value, extra: Value) -> String {
        let mut body = json!({ "name": name, "steps": steps });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        let (status, response) = self.api.post("/api/v1/workflows", &self.auth, body).await;
        assert_eq!(status, 201, "create workflow {name}: {response}");
        response["data"]["id"].as_str().expect("workflow id").to_owned()
    }

    /// Starts an execution over REST and returns its id.
    pub async fn execute(&self, workflow_id: &str, body: Value) -> String {
        let (status, response) = self
            .api
            .post(&format!("/api/v1/workflows/{workflow_id}/execute"), &self.auth, body)
            .await;
        assert_eq!(status, 202, "execute: {response}");
        response["data"]["id"].as_str().expect("execution id").to_owned()
    }

    /// Starts an execution over gRPC (`ExecuteWorkflow`) and returns it as the answer has it.
    pub async fn execute_over_grpc(
        &self,
        workflow_id: &str,
        input: Value,
    ) -> turbocat::proto::v1::Execution {
        let mut workflows =
            turbocat::proto::v1::workflow_service_client::WorkflowServiceClient::new(
                self.api.channel().await,
            );
        let request = turbocat::proto::v1::ExecuteWorkflowRequest {
            workflow_id: workflow_id.to_owned(),
            input: Some(turbocat::proto::wkt::json_to_value(&input)),
            ..Default::default()
        };
        workflows
            .execute_workflow(crate::support::api::grpc(request, &self.auth))
            .await
            .expect("ExecuteWorkflow")
            .into_inner()
            .execution
            .expect("execution")
    }

    pub async fn execution(&self, execution_id: &str) -> Value {
        let (status, body) =
            self.api.get(&format!("/api/v1/executions/{execution_id}"), &self.auth).await;
        assert_eq!(status, 200, "get execution: {body}");
        body["data"].clone()
    }

    /// Polls the execution until it reaches a final status (or `limit` passes).
    pub async fn finished(&self, execution_id: &str, limit: Duration) -> Value {
        let started = Instant::now();
        loop {
            let execution = self.execution(execution_id).await;
            let status = execution["status"].as_str().unwrap_or_default();
            if ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&status) {
                return execution;
            }
            assert!(started.elapsed() < limit, "still {status} after {limit:?}: {execution}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until `predicate` holds for the execution.
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
}

pub type Time = chrono::DateTime<chrono::FixedOffset>;

/// An RFC 3339 time of the API, as a time: as text they do not sort (`…08.44Z` and
/// `…08.4401Z` carry different numbers of digits).
pub fn time(value: &Value) -> Time {
    chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a time")).expect("RFC 3339")
}

/// The step run of `key` in an execution as GET /executions/:id shows it.
pub fn step<'a>(execution: &'a Value, key: &str) -> &'a Value {
    execution["stepRuns"]
        .as_array()
        .and_then(|steps| steps.iter().find(|step| step["stepKey"] == key))
        .unwrap_or_else(|| panic!("no step {key} in {execution}"))
}

pub use crate::support::RunnerProcess;
