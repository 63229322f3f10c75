//! Demo data (`turbocat seed`) and the built-in starter templates every installation has.
//! Agent configs are stored as the proto3 JSON of `turbocat.v1.AgentConfig`; template bodies
//! hold REST JSON as `CreateAgent`/`CreateWorkflow` accept it.
//! May call: the store, password hashing (`auth`) and `config` (the admin password secret).

use serde_json::{Value, json};
use uuid::Uuid;

use crate::auth::password;
use crate::store::{
    AgentFilter, AgentLimits, AgentType, BuiltinTemplate, NewAgent, NewUser, NewWorkflow,
    NewWorkflowStep, OwnerScope, RetryPolicy, RoleAssignment, Store, StoreError, TemplateKind,
    UserRole,
};

/// The tag every demo resource carries; seeding again skips an owner who has them.
pub const DEMO_TAG: &str = "demo";

struct StarterTemplate {
    id: u128,
    name: &'static str,
    description: &'static str,
    category: &'static str,
    kind: TemplateKind,
    body: fn() -> Value,
    parameters: fn() -> Vec<Value>,
}

fn python_greeter_source() -> &'static str {
    "import json, sys\n\
     data = json.load(sys.stdin)\n\
     name = data.get('name', 'world')\n\
     print(json.dumps({'greeting': f'Hello, {name}!', 'length': len(name)}))\n"
}

fn code_agent_body() -> Value {
    json!({
        "name": "{{params.name}}",
        "description": "Greets whoever the input names, in Python.",
        "type": "CODE",
        "config": { "code": { "language": "PYTHON", "source": python_greeter_source() } },
        "tags": ["starter"],
    })
}

fn api_agent_body() -> Value {
    json!({
        "name": "{{params.name}}",
        "description": "Fetches a GitHub repository's metadata.",
        "type": "API",
        "config": { "api": {
            "method": "GET",
            "urlTemplate": "https://api.github.com/repos/{{input.repository}}",
            "headers": { "accept": "application/vnd.github+json" },
            "timeout": "10s",
        } },
        "tags": ["starter"],
    })
}

fn llm_agent_body() -> Value {
    json!({
        "name": "{{params.name}}",
        "description": "Summarises text with an OpenAI-compatible model.",
        "type": "LLM",
        "config": { "llm": {
            "baseUrl": "https://api.openai.com/v1",
            "model": "{{params.model}}",
            "promptTemplate": "Summarise in three sentences:\n\n{{input.text}}",
            "temperature": 0.2,
            "maxTokens": 300,
            "apiKeyRef": "env:OPENAI_API_KEY",
        } },
        "tags": ["starter"],
    })
}

fn data_agent_body() -> Value {
    json!({
        "name": "{{params.name}}",
        "description": "Keeps the open issues of a list and counts them.",
        "type": "DATA",
        "config": { "data": { "jqProgram": "{open: [.issues[] | select(.state == \"open\")], count: (.issues | length)}" } },
        "tags": ["starter"],
    })
}

fn workflow_body() -> Value {
    json!({
        "agents": {
            "greeter": code_agent_body(),
            "shaper": {
                "name": "Shape greeting",
                "type": "DATA",
                "config": { "data": { "jqProgram": "{message: .greeting, characters: .length}" } },
            },
        },
        "workflow": {
            "name": "{{params.name}}",
            "description": "Greets in Python, then reshapes the answer with jq.",
            "steps": [
                { "key": "greet", "name": "Greet", "agentId": "greeter" },
                {
                    "key": "shape",
                    "name": "Shape",
                    "agentId": "shaper",
                    "dependsOn": ["greet"],
                    "inputMapping": "{{steps.greet.output}}",
                },
            ],
            "defaultInput": { "name": "Turbocat" },
        },
    })
}

fn name_parameter(default_name: &str) -> Vec<Value> {
    vec![json!({
        "name": "name",
        "description": "Name of what is created",
        "type": "STRING",
        "required": false,
        "defaultValue": default_name,
    })]
}

const STARTER_TEMPLATES: [StarterTemplate; 5] = [
    StarterTemplate {
        id: 0x0193_0000_0000_7000_8000_0000_0000_0001,
        name: "Python greeter",
        description: "A CODE agent: a Python snippet that reads JSON and writes JSON.",
        category: "code",
        kind: TemplateKind::Agent,
        body: code_agent_body,
        parameters: || name_parameter("Python greeter"),
    },
    StarterTemplate {
        id: 0x0193_0000_0000_7000_8000_0000_0000_0002,
        name: "GitHub repository lookup",
        description: "An API agent: an HTTP GET built from the input.",
        category: "integration",
        kind: TemplateKind::Agent,
        body: api_agent_body,
        parameters: || name_parameter("GitHub repository lookup"),
    },
    StarterTemplate {
        id: 0x0193_0000_0000_7000_8000_0000_0000_0003,
        name: "Text summariser",
        description: "An LLM agent for any OpenAI-compatible endpoint.",
        category: "ai",
        kind: TemplateKind::Agent,
        body: llm_agent_body,
        parameters: || {
            let mut parameters = name_parameter("Text summariser");
            parameters.push(json!({
                "name": "model",
                "description": "Model name",
                "type": "STRING",
                "required": false,
                "defaultValue": "gpt-4o-mini",
            }));
            parameters
        },
    },
    StarterTemplate {
        id: 0x0193_0000_0000_7000_8000_0000_0000_0004,
        name: "Open issues filter",
        description: "A DATA agent: a jq program over the input.",
        category: "data",
        kind: TemplateKind::Agent,
        body: data_agent_body,
        parameters: || name_parameter("Open issues filter"),
    },
    StarterTemplate {
        id: 0x0193_0000_0000_7000_8000_0000_0000_0005,
        name: "Greet and shape",
        description: "A two-step workflow: a Python step feeding a jq step.",
        category: "workflow",
        kind: TemplateKind::Workflow,
        body: workflow_body,
        parameters: || name_parameter("Greet and shape"),
    },
];

/// Installs (or refreshes) the built-in starter templates; returns how many were written.
pub async fn install_starter_templates(store: &dyn Store) -> Result<usize, StoreError> {
    let mut written = 0;
    for starter in &STARTER_TEMPLATES {
        let outcome = store
            .upsert_builtin_template(BuiltinTemplate {
                id: Uuid::from_u128(starter.id),
                name: starter.name.to_owned(),
                description: starter.description.to_owned(),
                category: starter.category.to_owned(),
                tags: vec!["starter".to_owned()],
                kind: starter.kind,
                body: (starter.body)(),
                parameters: (starter.parameters)(),
            })
            .await?;
        if matches!(
            outcome,
            crate::store::BuiltinTemplateOutcome::Inserted
                | crate::store::BuiltinTemplateOutcome::Updated
        ) {
            written += 1;
        }
    }
    Ok(written)
}

/// What `turbocat seed` creates for.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    pub admin_email: String,
    /// `None`: a password is generated and reported once.
    pub admin_password: Option<crate::config::Secret>,
}

/// What `turbocat seed` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedReport {
    pub admin_email: String,
    pub admin_created: bool,
    /// The generated admin password, shown once when the admin was created without one.
    pub generated_password: Option<String>,
    pub agents_created: usize,
    pub workflows_created: usize,
    pub templates_written: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("the store refused: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Password(#[from] password::PasswordError),
    #[error("invalid --admin-password: {0}")]
    InvalidPassword(String),
}

fn demo_agent(
    owner_id: Uuid,
    name: &str,
    description: &str,
    agent_type: AgentType,
    config: Value,
) -> NewAgent {
    NewAgent {
        owner_id,
        name: name.to_owned(),
        description: description.to_owned(),
        agent_type,
        config,
        limits: AgentLimits::default(),
        tags: vec![DEMO_TAG.to_owned()],
    }
}

fn demo_step(
    key: &str,
    agent_id: Uuid,
    depends_on: &[&str],
    input_mapping: Option<Value>,
) -> NewWorkflowStep {
    NewWorkflowStep {
        step_key: key.to_owned(),
        name: key.to_owned(),
        agent_id,
        depends_on: depends_on.iter().map(|key| (*key).to_owned()).collect(),
        input_mapping,
        retry_policy: RetryPolicy { max_attempts: 2, ..RetryPolicy::default() },
        timeout_seconds: Some(60),
        required_labels: Vec::new(),
    }
}

/// Loads the demo data: an admin, one agent of every type, a workflow, the starter templates.
/// Running it again creates nothing twice.
pub async fn seed(store: &dyn Store, options: SeedOptions) -> Result<SeedReport, SeedError> {
    let email = options.admin_email.trim().to_lowercase();
    let mut report = SeedReport {
        admin_email: email.clone(),
        admin_created: false,
        generated_password: None,
        agents_created: 0,
        workflows_created: 0,
        templates_written: install_starter_templates(store).await?,
    };
    let admin = match store.get_user_by_email(&email).await {
        Ok(existing) => existing,
        Err(StoreError::NotFound) => {
            let password_text = match &options.admin_password {
                Some(given) => given.expose().to_owned(),
                None => {
                    let mut bytes = [0u8; 12];
                    rand::Rng::fill(&mut rand::rng(), &mut bytes);
                    let generated = hex::encode(bytes);
                    report.generated_password = Some(generated.clone());
                    generated
                }
            };
            let length = password_text.chars().count();
            if !(password::MIN_PASSWORD_CHARS..=password::MAX_PASSWORD_CHARS).contains(&length) {
                return Err(SeedError::InvalidPassword(format!(
                    "must be {} to {} characters",
                    password::MIN_PASSWORD_CHARS,
                    password::MAX_PASSWORD_CHARS
                )));
            }
            let mut new_user = NewUser::new(email.clone(), "Turbocat Admin");
            new_user.password_hash = Some(password::hash_password(password_text).await?);
            new_user.role = RoleAssignment::Exactly(UserRole::Admin);
            report.admin_created = true;
            store.create_user(new_user).await?
        }
        Err(other) => return Err(other.into()),
    };

    let mut existing_demo = AgentFilter::new(OwnerScope::Owner(admin.id));
    existing_demo.tag = Some(DEMO_TAG.to_owned());
    if store.list_agents(existing_demo).await?.total > 0 {
        return Ok(report);
    }

    let greeter = store
        .create_agent(demo_agent(
            admin.id,
            "Python greeter",
            "Greets whoever the input names.",
            AgentType::Code,
            json!({ "code": { "language": "CODE_LANGUAGE_PYTHON", "source": python_greeter_source() } }),
        ))
        .await?;
    let shaper = store
        .create_agent(demo_agent(
            admin.id,
            "Shape greeting",
            "Reshapes the greeting with jq.",
            AgentType::Data,
            json!({ "data": { "jqProgram": "{message: .greeting, characters: .length}" } }),
        ))
        .await?;
    store
        .create_agent(demo_agent(
            admin.id,
            "Node echo",
            "Echoes its input back, in JavaScript.",
            AgentType::Code,
            json!({ "code": { "language": "CODE_LANGUAGE_JAVASCRIPT", "source":
                "let text = '';\nprocess.stdin.on('data', chunk => text += chunk);\nprocess.stdin.on('end', () => console.log(JSON.stringify({ echo: JSON.parse(text) })));\n" } }),
        ))
        .await?;
    store
        .create_agent(demo_agent(
            admin.id,
            "GitHub repository lookup",
            "Fetches a repository's metadata.",
            AgentType::Api,
            json!({ "api": { "method": "HTTP_METHOD_GET", "urlTemplate": "https://api.github.com/repos/{{input.repository}}", "timeout": "10s" } }),
        ))
        .await?;
    store
        .create_agent(demo_agent(
            admin.id,
            "Text summariser",
            "Summarises text with an OpenAI-compatible model.",
            AgentType::Llm,
            json!({ "llm": { "baseUrl": "https://api.openai.com/v1", "model": "gpt-4o-mini", "promptTemplate": "Summarise: {{input.text}}", "temperature": 0.2, "maxTokens": 300, "apiKeyRef": "env:OPENAI_API_KEY" } }),
        ))
        .await?;
    report.agents_created = 5;

    let workflow = store
        .create_workflow(NewWorkflow {
            owner_id: admin.id,
            name: "Greet and shape".to_owned(),
            description: "A Python step feeding a jq step.".to_owned(),
            default_input: json!({ "name": "Turbocat" }),
            priority: 5,
            timeout_seconds: Some(300),
            tags: vec![DEMO_TAG.to_owned()],
            steps: vec![
                demo_step("greet", greeter.id, &[], None),
                demo_step("shape", shaper.id, &["greet"], Some(json!("{{steps.greet.output}}"))),
            ],
        })
        .await?;
    report.workflows_created = 1;

    store
        .create_agent(demo_agent(
            admin.id,
            "Greet and shape, as a step",
            "Runs the demo workflow as a child execution.",
            AgentType::Workflow,
            json!({ "workflow": { "workflowId": workflow.workflow.id.to_string() } }),
        ))
        .await?;
    report.agents_created += 1;
    Ok(report)
}
