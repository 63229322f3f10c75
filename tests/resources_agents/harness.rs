//! One running server per test with a store opened on its database, request helpers, and
//! `on_both_backends!`, which runs a test body on `dev` and on `serve`.

use std::sync::Arc;

use serde_json::{Value, json};
use tonic::transport::Channel;
use turbocat::proto::v1::agent_service_client::AgentServiceClient;
use turbocat::proto::v1::audit_log_service_client::AuditLogServiceClient;
use turbocat::store::{
    NewWorkflow, NewWorkflowStep, PostgresStore, RetryPolicy, Store, WorkflowWithSteps,
};

use crate::support::api::{Api, Auth};
use crate::support::{ServeDatabase, TurbocatProcess, start_dev, start_serve};

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Dev,
    Serve,
}

/// A real server, the REST/gRPC client, and the server's own store (for setup and proof).
pub struct Server {
    pub api: Api,
    pub store: Arc<dyn Store>,
    _process: TurbocatProcess,
    _data_dir: Option<tempfile::TempDir>,
    _database: Option<ServeDatabase>,
}

impl Server {
    pub async fn start(backend: Backend) -> Self {
        match backend {
            Backend::Dev => {
                let (process, data_dir) = start_dev(&[]);
                let store = crate::support::api::dev_store(data_dir.path()).await;
                Self {
                    api: Api::new(&process),
                    store,
                    _process: process,
                    _data_dir: Some(data_dir),
                    _database: None,
                }
            }
            Backend::Serve => {
                let (process, database) = start_serve(&[]).await;
                let store = PostgresStore::connect(&database.url, 2)
                    .await
                    .expect("open the serve database");
                Self {
                    api: Api::new(&process),
                    store: Arc::new(store),
                    _process: process,
                    _data_dir: None,
                    _database: Some(database),
                }
            }
        }
    }

    pub async fn agents(&self) -> AgentServiceClient<Channel> {
        AgentServiceClient::new(self.api.channel().await)
    }

    pub async fn audit_logs(&self) -> AuditLogServiceClient<Channel> {
        AuditLogServiceClient::new(self.api.channel().await)
    }

    /// Creates an agent over REST, asserting 201; returns the agent's JSON.
    pub async fn create_agent(&self, auth: &Auth, body: Value) -> Value {
        let (status, response) = self.api.post("/api/v1/agents", auth, body).await;
        assert_eq!(status, 201, "{response}");
        response["data"].clone()
    }

    /// A PATCH carrying `If-Match`.
    pub async fn patch_if_match(
        &self,
        path: &str,
        auth: &Auth,
        etag: &str,
        body: Value,
    ) -> (u16, Value) {
        let Auth::Bearer(token) = auth else { panic!("a bearer token") };
        let response = reqwest::Client::new()
            .patch(format!("{}{path}", self.api.base_url))
            .bearer_auth(token)
            .header("if-match", etag)
            .json(&body)
            .send()
            .await
            .expect("patch");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json body"))
    }

    /// A workflow of `owner_id` whose one step uses `agent_id`, written straight to the store
    /// (the workflow API is not what these tests are about).
    pub async fn workflow_using(
        &self,
        owner_id: &str,
        name: &str,
        agent_id: &str,
    ) -> WorkflowWithSteps {
        self.store
            .create_workflow(NewWorkflow {
                owner_id: owner_id.parse().expect("owner id"),
                name: name.to_owned(),
                description: String::new(),
                default_input: json!({}),
                priority: 5,
                timeout_seconds: None,
                tags: Vec::new(),
                steps: vec![NewWorkflowStep {
                    step_key: "only".to_owned(),
                    name: "Only".to_owned(),
                    agent_id: agent_id.parse().expect("agent id"),
                    depends_on: Vec::new(),
                    input_mapping: None,
                    retry_policy: RetryPolicy::default(),
                    timeout_seconds: None,
                    required_labels: Vec::new(),
                }],
            })
            .await
            .expect("create a workflow")
    }

    /// Every audit row whose action is `action`, oldest first.
    pub async fn audit_rows_of(&self, action: &str) -> Vec<turbocat::store::AuditLog> {
        crate::support::api::audit_rows(self.store.as_ref())
            .await
            .into_iter()
            .filter(|row| row.action == action)
            .collect()
    }
}

/// A valid CODE agent named `name`.
pub fn code_agent(name: &str) -> Value {
    json!({
        "name": name,
        "description": format!("{name} does things"),
        "type": "CODE",
        "config": { "code": { "language": "PYTHON", "source": "print(1)" } },
    })
}

/// The details object of an error envelope that carries facts rather than a field.
pub fn error_facts(body: &Value) -> Value {
    body["error"]["details"]
        .as_array()
        .and_then(|details| details.iter().find(|detail| detail.get("field").is_none()))
        .cloned()
        .unwrap_or(Value::Null)
}

/// Instantiates each named `async fn(Server)` on `dev` and on `serve`.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod dev {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let server =
                        crate::harness::Server::start(crate::harness::Backend::Dev).await;
                    super::$test(server).await;
                }
            )*
        }
        mod serve {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let server =
                        crate::harness::Server::start(crate::harness::Backend::Serve).await;
                    super::$test(server).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
