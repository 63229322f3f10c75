//! The runner's executors run for real: python3 and node child processes with their limits,
//! HTTP requests to local servers (an API server and a chat-completions stub on 127.0.0.1),
//! and jq programs. The executors are library code, called directly.

mod api;
mod code;
mod data;
mod llm;

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::{self, LogLine, LogSink, LogStream, StepError, StepWork};

/// A variable of the test process that no step may see; LLM tests use it as the API key.
pub const SECRET_VARIABLE: &str = "TURBOCAT_RUNNER_TEST_SECRET";
pub const SECRET_VALUE: &str = "sk-test-4f1c9a-secret";

/// The variable LLM tests lend their agents as an API key (through `llm_keys`).
pub const LLM_KEY_VARIABLE: &str = "RUNNER_TEST_LLM_KEY";
pub const LLM_KEY_VALUE: &str = "sk-test-llm-7d2e0b";

/// What the runner of these tests lends LLM agents: the test key, for any host.
pub fn llm_keys() -> std::sync::Arc<executors::llm::LlmKeyPolicy> {
    std::sync::Arc::new(executors::llm::LlmKeyPolicy::parse([LLM_KEY_VARIABLE]).expect("policy"))
}

/// Sets the secret once, before any test starts a process or a lookup (every test calls it
/// first, and the `Once` holds the others back until it is set).
pub fn setup() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        // SAFETY: every test calls `setup` before anything else, so no other thread of this
        // process reads the environment while it is written.
        unsafe { std::env::set_var(SECRET_VARIABLE, SECRET_VALUE) };
        // SAFETY: as above.
        unsafe { std::env::set_var(LLM_KEY_VARIABLE, LLM_KEY_VALUE) };
        // DATA steps run in `turbocat jq-worker`; this test binary is not turbocat.
        executors::data::set_worker_executable(env!("CARGO_BIN_EXE_turbocat").into());
    });
}

pub fn limits(
    timeout: Duration,
    memory_mb: i32,
    cpu_seconds: i32,
    max_output_bytes: i32,
) -> pb::ResourceLimits {
    pb::ResourceLimits {
        timeout: Some(prost_types::Duration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
        memory_mb,
        cpu_seconds,
        max_output_bytes,
    }
}

pub fn agent(
    agent_type: pb::AgentType,
    kind: pb::agent_config::Kind,
    limits: pb::ResourceLimits,
) -> pb::Agent {
    pb::Agent {
        r#type: agent_type as i32,
        config: Some(pb::AgentConfig { kind: Some(kind) }),
        limits: Some(limits),
        ..pb::Agent::default()
    }
}

/// What one attempt gave: its result, its log lines and how long it took.
pub struct Attempt {
    pub result: Result<Value, StepError>,
    pub logs: Vec<LogLine>,
    pub elapsed: Duration,
}

impl Attempt {
    pub fn output(&self) -> &Value {
        match &self.result {
            Ok(output) => output,
            Err(error) => panic!("the attempt failed: {error:?}; logs: {:?}", self.log_texts(None)),
        }
    }

    pub fn error(&self) -> &StepError {
        match &self.result {
            Ok(output) => panic!("the attempt succeeded with {output}"),
            Err(error) => error,
        }
    }

    pub fn log_texts(&self, stream: Option<LogStream>) -> Vec<&str> {
        self.logs
            .iter()
            .filter(|line| stream.is_none_or(|wanted| line.stream == wanted))
            .map(|line| line.text.as_str())
            .collect()
    }
}

/// Runs one attempt, collecting its log lines while it runs; `cancel_after` cancels it.
pub async fn run_with(agent: pb::Agent, input: Value, cancel_after: Option<Duration>) -> Attempt {
    setup();
    let (sink, mut receiver) = LogSink::channel(64);
    let collector = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(line) = receiver.recv().await {
            lines.push(line);
        }
        lines
    });
    let cancel = CancellationToken::new();
    if let Some(delay) = cancel_after {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            cancel.cancel();
        });
    }
    let started = Instant::now();
    let result = executors::execute(
        StepWork { agent, input, deadline: None, llm_keys: llm_keys() },
        sink,
        cancel,
    )
    .await;
    let elapsed = started.elapsed();
    let logs = collector.await.expect("the log collector ends when the sink is dropped");
    Attempt { result, logs, elapsed }
}

pub async fn run(agent: pb::Agent, input: Value) -> Attempt {
    run_with(agent, input, None).await
}

#[tokio::test]
async fn workflow_agents_and_missing_configs_are_refused_as_invalid() {
    setup();
    let workflow = agent(
        pb::AgentType::Workflow,
        pb::agent_config::Kind::Workflow(pb::WorkflowAgentConfig { workflow_id: "w".to_owned() }),
        pb::ResourceLimits::default(),
    );
    let attempt = run(workflow, Value::Null).await;
    let error = attempt.error();
    assert_eq!(error.kind, executors::StepErrorKind::Invalid);
    assert!(error.message.contains("WORKFLOW"), "{}", error.message);
    assert_eq!(error.to_failure().kind, pb::FailureKind::Invalid as i32);
    assert!(!error.to_failure().retryable);

    let empty = pb::Agent { r#type: pb::AgentType::Code as i32, ..pb::Agent::default() };
    assert_eq!(run(empty, Value::Null).await.error().kind, executors::StepErrorKind::Invalid);

    let mismatched = agent(
        pb::AgentType::Api,
        pb::agent_config::Kind::Data(pb::DataAgentConfig { jq_program: ".".to_owned() }),
        pb::ResourceLimits::default(),
    );
    let error = run(mismatched, Value::Null).await.result.unwrap_err();
    assert_eq!(error.kind, executors::StepErrorKind::Invalid);
    assert!(error.message.contains("does not match"), "{}", error.message);
}

#[tokio::test]
async fn a_step_past_its_assignment_deadline_times_out() {
    setup();
    let sleeper = agent(
        pb::AgentType::Code,
        pb::agent_config::Kind::Code(pb::CodeAgentConfig {
            language: pb::CodeLanguage::Python as i32,
            source: "import time\ntime.sleep(30)\n".to_owned(),
            ..pb::CodeAgentConfig::default()
        }),
        limits(Duration::from_secs(60), 0, 0, 0),
    );
    let started = Instant::now();
    let deadline = Some(Instant::now() + Duration::from_millis(800));
    let result = executors::execute(
        StepWork { agent: sleeper, input: Value::Null, deadline, llm_keys: llm_keys() },
        LogSink::discard(),
        CancellationToken::new(),
    )
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.kind, executors::StepErrorKind::TimedOut);
    assert!(error.message.contains("deadline"), "{}", error.message);
    assert!(error.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
