//! DATA agents: jq programs run by jaq.

use std::time::Duration;

use serde_json::{Value, json};
use turbocat::jq::check_program;
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::{LogStream, StepErrorKind};

use crate::{agent, limits, run};

fn jq(program: &str) -> pb::Agent {
    jq_limited(program, 0)
}

fn jq_limited(program: &str, max_output_bytes: i32) -> pb::Agent {
    agent(
        pb::AgentType::Data,
        pb::agent_config::Kind::Data(pb::DataAgentConfig { jq_program: program.to_owned() }),
        limits(Duration::from_secs(10), 0, 0, max_output_bytes),
    )
}

#[tokio::test]
async fn programs_give_one_result_an_array_of_several_or_null_for_none() {
    let issues = json!({"issues": [
        {"id": 1, "state": "open"}, {"id": 2, "state": "closed"}, {"id": 3, "state": "open"},
    ]});
    let starter = "{open: [.issues[] | select(.state == \"open\")], count: (.issues | length)}";
    let attempt = run(jq(starter), issues.clone()).await;
    assert_eq!(
        attempt.output(),
        &json!({"open": [{"id": 1, "state": "open"}, {"id": 3, "state": "open"}], "count": 3})
    );
    assert_eq!(run(jq(".issues[].id"), issues.clone()).await.output(), &json!([1, 2, 3]));
    assert_eq!(run(jq(".issues[] | select(.id > 5)"), issues.clone()).await.output(), &Value::Null);
    assert_eq!(run(jq("[.issues[] | .id * 2] | add"), issues.clone()).await.output(), &json!(12));
    assert_eq!(
        run(
            jq("map_values(length) | to_entries | map(\"\\(.key)=\\(.value)\") | join(\",\")"),
            issues
        )
        .await
        .output(),
        &json!("issues=3")
    );
    assert_eq!(
        run(
            jq("{message: .greeting, characters: .length}"),
            json!({"greeting": "Hi", "length": 2})
        )
        .await
        .output(),
        &json!({"message": "Hi", "characters": 2})
    );
}

#[tokio::test]
async fn debug_and_stderr_messages_become_step_logs() {
    let attempt =
        run(jq(".a | debug | stderr | debug(\"twice: \\(. * 2)\") | . + 1"), json!({"a": 20}))
            .await;
    assert_eq!(attempt.output(), &json!(21));
    assert_eq!(
        attempt.log_texts(Some(LogStream::Stderr)),
        vec!["[\"DEBUG:\",20]", "20", "[\"DEBUG:\",\"twice: 40\"]"]
    );
}

#[tokio::test]
async fn bad_programs_and_run_time_errors_fail_without_retry() {
    let attempt = run(jq(".a | | .b"), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert!(error.message.starts_with("the jq program does not compile: "), "{}", error.message);
    assert!(check_program(".a | | .b").is_err());
    assert!(check_program("{a: .b}").is_ok());

    let attempt = run(jq("error(\"no id\")"), json!({})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::NonRetryable);
    assert!(attempt.error().message.contains("no id"), "{}", attempt.error().message);

    let attempt = run(jq(".a.b"), json!({"a": 5})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::NonRetryable);

    // The runner's environment (API keys) is out of reach.
    let attempt = run(jq("env"), json!({})).await;
    assert!(
        attempt.error().message.contains("undefined filter `env`"),
        "{}",
        attempt.error().message
    );
    let attempt = run(jq("$ENV"), json!({})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::NonRetryable);
}

#[tokio::test]
async fn endless_and_oversized_results_stop_at_the_output_limit() {
    let attempt = run(jq_limited("repeat(\"spam\")", 10_000), json!(null)).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded);
    assert!(error.message.contains("10000 bytes"), "{}", error.message);
    assert!(attempt.elapsed < Duration::from_secs(5));

    let attempt = run(jq_limited("[range(100000)]", 10_000), json!(null)).await;
    assert_eq!(attempt.error().kind, StepErrorKind::LimitExceeded);
}

#[tokio::test]
async fn runaway_programs_fail_alone_without_taking_the_runner_down() {
    // Deep non-tail recursion overflows the worker's stack: it dies, the runner does not.
    let deep = run(jq("def f: 1 + f; f"), json!(null)).await;
    assert_eq!(deep.error().kind, StepErrorKind::NonRetryable, "{:?}", deep.error());
    assert!(deep.error().message.contains("recursed too deeply"), "{}", deep.error().message);

    // An endless loop runs into the wall clock (1 s here) and is killed.
    let spinning = agent(
        pb::AgentType::Data,
        pb::agent_config::Kind::Data(pb::DataAgentConfig {
            jq_program: "last(repeat(1))".to_owned(),
        }),
        limits(Duration::from_secs(1), 0, 0, 0),
    );
    let attempt = run(spinning, json!(null)).await;
    assert_eq!(attempt.error().kind, StepErrorKind::TimedOut, "{:?}", attempt.error());
    assert!(attempt.elapsed < Duration::from_secs(5), "{:?}", attempt.elapsed);

    // Memory past the agent's limit (64 MiB) ends the program with a limit failure.
    let hungry = agent(
        pb::AgentType::Data,
        pb::agent_config::Kind::Data(pb::DataAgentConfig {
            jq_program: "[range(100000000)] | length".to_owned(),
        }),
        limits(Duration::from_secs(30), 64, 0, 0),
    );
    let attempt = run(hungry, json!(null)).await;
    assert_eq!(attempt.error().kind, StepErrorKind::LimitExceeded, "{:?}", attempt.error());
    assert!(attempt.error().message.contains("memory"), "{}", attempt.error().message);

    // And the runner goes on: the next program runs as ever.
    assert_eq!(run(jq(".a + 1"), json!({"a": 41})).await.output(), &json!(42));
}
