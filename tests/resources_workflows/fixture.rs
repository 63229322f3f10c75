//! One running server with three accounts (an administrator, Alice and Bob, who are plain
//! users), the store of its database, and helpers to make agents and read envelopes.

use std::sync::Arc;

use serde_json::{Value, json};
use turbocat::store::{AgentLimits, AgentType, NewAgent, OwnerScope, Store};
use uuid::Uuid;

use crate::support::api::{Account, Api};
use crate::support::{TurbocatProcess, start_dev, start_serve};

pub struct Fixture {
    /// The running process, stopped when the fixture is dropped.
    _server: TurbocatProcess,
    pub api: Api,
    pub store: Arc<dyn Store>,
    pub alice: Account,
    pub bob: Account,
    /// Keeps the data alive: the temporary directory or the PostgreSQL database.
    _guard: Box<dyn std::any::Any + Send>,
}

/// Which deployment a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dev,
    Serve,
}

impl Fixture {
    pub async fn start(mode: Mode) -> Self {
        let (server, store, guard) = match mode {
            Mode::Dev => {
                let (server, directory) = start_dev(&[]);
                let store = crate::support::api::dev_store(directory.path()).await;
                (server, store, Box::new(directory) as Box<dyn std::any::Any + Send>)
            }
            Mode::Serve => {
                let (server, database) = start_serve(&[]).await;
                let store = turbocat::store::open(&database.url).await.expect("open serve store");
                (server, store, Box::new(database) as Box<dyn std::any::Any + Send>)
            }
        };
        let api = Api::new(&server);
        // The first account of an installation is its administrator; Alice and Bob are users.
        api.register("root@example.com", "Root").await;
        let alice = api.register("alice@example.com", "Alice").await;
        let bob = api.register("bob@example.com", "Bob").await;
        Self { _server: server, api, store, alice, bob, _guard: guard }
    }

    /// A DATA agent of `owner`, made through the store; returns its id.
    pub async fn agent(&self, owner: &Account, name: &str) -> String {
        let agent = self
            .store
            .create_agent(NewAgent {
                owner_id: user_id(owner),
                name: name.to_owned(),
                description: String::new(),
                agent_type: AgentType::Data,
                config: json!({ "data": { "jqProgram": "." } }),
                limits: AgentLimits::default(),
                tags: Vec::new(),
            })
            .await
            .expect("create agent");
        agent.id.to_string()
    }

    /// An agent of `owner` that is soft-deleted; returns its id.
    pub async fn deleted_agent(&self, owner: &Account) -> String {
        let agent_id = self.agent(owner, "gone").await;
        self.store
            .soft_delete_agent(OwnerScope::All, agent_id.parse().expect("uuid"), None)
            .await
            .expect("delete agent");
        agent_id
    }
}

pub fn user_id(account: &Account) -> Uuid {
    account.id.parse().expect("user id")
}

/// The `data` array of a list envelope.
pub fn items(body: &Value) -> &Vec<Value> {
    body["data"].as_array().unwrap_or_else(|| panic!("a list: {body}"))
}

/// The values of `key` in each item of a list envelope.
pub fn item_values(body: &Value, key: &str) -> Vec<String> {
    items(body)
        .iter()
        .map(|item| match &item[key] {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// The messages a REST error envelope gives for `field`.
pub fn messages_for(body: &Value, field: &str) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .map(|details| {
            details
                .iter()
                .filter(|detail| detail["field"] == field)
                .filter_map(|detail| detail["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
