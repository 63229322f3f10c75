//! DATA agents: jq programs run by jaq, in the warm workers of a pool.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use turbocat::jq::check_program;
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::jq_pool::{JqFinished, JqJob, JqPool, JqPoolSettings};
use turbocat::runner::executors::{Limits, LogStream, StepErrorKind};

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

/// A step of `owner` for a pool: `limits` as the agent's, the deadline its timeout.
async fn pooled(
    pool: &JqPool,
    owner: &str,
    program: &str,
    input: Value,
    limits: Limits,
) -> JqFinished {
    pooled_with(pool, owner, program, input, limits, &CancellationToken::new()).await
}

async fn pooled_with(
    pool: &JqPool,
    owner: &str,
    program: &str,
    input: Value,
    limits: Limits,
    cancel: &CancellationToken,
) -> JqFinished {
    crate::setup();
    let job = JqJob { owner_id: owner.to_owned(), program: program.to_owned(), input, limits };
    pool.run(&job, Instant::now() + limits.timeout, cancel).await
}

fn pool_limits(timeout_seconds: u64, memory_mb: u64, cpu_seconds: u64) -> Limits {
    Limits {
        timeout: Duration::from_secs(timeout_seconds),
        memory_mb,
        cpu_seconds,
        max_output_bytes: 1 << 20,
    }
}

#[tokio::test]
async fn a_pool_reuses_its_workers_and_replaces_the_ones_that_die() {
    let pool = JqPool::new(JqPoolSettings { max_idle_workers: 4, ..JqPoolSettings::default() });
    let usual = pool_limits(30, 256, 60);
    for number in 0..30 {
        let program = format!(".n * {number} + {}", number % 3);
        let finished = pooled(&pool, "alice", &program, json!({"n": 2}), usual).await;
        assert_eq!(finished.output, Ok(json!(2 * number + number % 3)), "{program}");
    }
    let statistics = pool.statistics();
    assert_eq!(statistics.workers_started, 1, "{statistics:?}");
    assert_eq!(statistics.requests_served, 30);
    assert_eq!(statistics.workers_idle, 1);

    // Deep recursion kills its worker only; the step fails as it always did, the next one
    // gets a new worker.
    let deep = pooled(&pool, "alice", "def f: 1 + f; f", json!(null), usual).await;
    let error = deep.output.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::NonRetryable, "{error:?}");
    assert!(error.message.contains("recursed too deeply"), "{}", error.message);
    assert_eq!(pool.statistics().workers_idle, 0);
    let next = pooled(&pool, "alice", ".a + 1", json!({"a": 1}), usual).await;
    assert_eq!(next.output, Ok(json!(2)));
    assert_eq!(pool.statistics().workers_started, 2);

    // A spinning program stops at its CPU budget (1 s here, on a worker that already served
    // steps), with the message of a one-shot worker, long before its deadline.
    let warm = pooled(&pool, "alice", ".", json!(1), usual).await;
    assert_eq!(warm.output, Ok(json!(1)));
    let started = Instant::now();
    let spinning =
        pooled(&pool, "alice", "last(repeat(1))", json!(null), pool_limits(30, 256, 1)).await;
    let error = spinning.output.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded, "{error:?}");
    assert_eq!(error.message, "the jq program exceeded the CPU time limit of 1 s");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let next = pooled(&pool, "alice", "[.[] * 2]", json!([1, 2]), usual).await;
    assert_eq!(next.output, Ok(json!([2, 4])));
    assert_eq!(pool.statistics().workers_started, 3);

    // The wall clock and a cancel kill the worker too.
    let started = Instant::now();
    let late =
        pooled(&pool, "alice", "last(repeat(1))", json!(null), pool_limits(1, 256, 60)).await;
    assert_eq!(late.output.unwrap_err().kind, StepErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(pooled(&pool, "alice", ".", json!("ok"), usual).await.output, Ok(json!("ok")));
    assert_eq!(pool.statistics().workers_started, 4);
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        canceller.cancel();
    });
    let cancelled =
        pooled_with(&pool, "alice", "last(repeat(1))", json!(null), usual, &cancel).await;
    assert_eq!(cancelled.output.unwrap_err().kind, StepErrorKind::Cancelled);
    assert_eq!(pooled(&pool, "alice", ".", json!("ok"), usual).await.output, Ok(json!("ok")));
    assert_eq!(pool.statistics().workers_started, 5);
    assert_eq!(pool.statistics().workers_idle, 1);

    // Another owner, or another memory limit, never gets alice's worker; alice keeps hers.
    assert_eq!(pooled(&pool, "bob", ".", json!(1), usual).await.output, Ok(json!(1)));
    assert_eq!(pool.statistics().workers_started, 6);
    let roomier = pool_limits(30, 512, 60);
    assert_eq!(pooled(&pool, "alice", ".", json!(1), roomier).await.output, Ok(json!(1)));
    assert_eq!(pool.statistics().workers_started, 7);
    assert_eq!(pooled(&pool, "alice", ".", json!(2), usual).await.output, Ok(json!(2)));
    assert_eq!(pooled(&pool, "bob", ".", json!(3), usual).await.output, Ok(json!(3)));
    let statistics = pool.statistics();
    assert_eq!(statistics.workers_started, 7, "{statistics:?}");
    assert_eq!(statistics.workers_idle, 3);

    // Past the idle limit, the longest idle worker ends (alice's roomier one).
    pool.keep_idle_at_least(2);
    assert_eq!(pooled(&pool, "alice", ".", json!(4), usual).await.output, Ok(json!(4)));
    assert_eq!(pool.statistics().workers_idle, 3, "keep_idle_at_least never lowers the limit");
    let small = JqPool::new(JqPoolSettings { max_idle_workers: 1, ..JqPoolSettings::default() });
    assert_eq!(pooled(&small, "alice", ".", json!(1), usual).await.output, Ok(json!(1)));
    assert_eq!(pooled(&small, "alice", ".", json!(1), roomier).await.output, Ok(json!(1)));
    assert_eq!(small.statistics().workers_idle, 1);
    assert_eq!(pooled(&small, "alice", ".", json!(1), roomier).await.output, Ok(json!(1)));
    assert_eq!(small.statistics().workers_started, 2, "the roomier worker stayed");
    assert_eq!(pooled(&small, "alice", ".", json!(1), usual).await.output, Ok(json!(1)));
    assert_eq!(small.statistics().workers_started, 3, "the first worker was ended");
    small.close();
    assert_eq!(small.statistics().workers_idle, 0);
    assert_eq!(pooled(&small, "alice", ".", json!(5), usual).await.output, Ok(json!(5)));
    assert_eq!(small.statistics().workers_idle, 0, "a closed pool keeps no worker");
}

#[tokio::test]
async fn workers_retire_after_their_requests_and_end_when_idle() {
    let pool = JqPool::new(JqPoolSettings {
        max_idle_workers: 4,
        idle_timeout: Duration::from_millis(300),
        max_requests_per_worker: 3,
    });
    let usual = pool_limits(30, 256, 60);
    for number in 0..7 {
        let finished = pooled(&pool, "carol", ". + 1", json!(number), usual).await;
        assert_eq!(finished.output, Ok(json!(number + 1)));
    }
    let statistics = pool.statistics();
    assert_eq!(statistics.workers_started, 3, "{statistics:?}");
    assert_eq!(statistics.requests_served, 7);
    assert_eq!(statistics.workers_idle, 1);

    let waited = Instant::now();
    while pool.statistics().workers_idle > 0 && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.statistics().workers_idle, 0, "the idle worker was not ended");
    assert!(waited.elapsed() >= Duration::from_millis(200), "{:?}", waited.elapsed());
    // A step after that starts a worker again.
    assert_eq!(pooled(&pool, "carol", ".", json!(0), usual).await.output, Ok(json!(0)));
    assert_eq!(pool.statistics().workers_started, 4);
}

#[tokio::test]
async fn consecutive_steps_on_one_worker_see_nothing_of_each_other() {
    let pool = JqPool::new(JqPoolSettings::default());
    let usual = pool_limits(30, 256, 60);
    let first = pooled(
        &pool,
        "dave",
        "debug | .secret | stderr | {kept: .}",
        json!({"secret": "first-step-secret"}),
        usual,
    )
    .await;
    assert_eq!(first.output, Ok(json!({"kept": "first-step-secret"})));
    assert_eq!(
        first.logs,
        vec!["[\"DEBUG:\",{\"secret\":\"first-step-secret\"}]", "first-step-secret"]
    );

    // The same worker, another program: its input and messages only.
    let second =
        pooled(&pool, "dave", "debug(\"second\") | [., now > 0]", json!({"n": 2}), usual).await;
    assert_eq!(second.output, Ok(json!([{"n": 2}, true])));
    assert_eq!(second.logs, vec!["[\"DEBUG:\",\"second\"]"]);

    // The first program again (cached, compiled once): the new input, nothing of the old.
    let third = pooled(
        &pool,
        "dave",
        "debug | .secret | stderr | {kept: .}",
        json!({"secret": "third"}),
        usual,
    )
    .await;
    assert_eq!(third.output, Ok(json!({"kept": "third"})));
    assert_eq!(third.logs, vec!["[\"DEBUG:\",{\"secret\":\"third\"}]", "third"]);

    // A program that fails after writing messages leaves none behind.
    let failing =
        pooled(&pool, "dave", "debug(\"doomed\") | error(\"stop\")", json!(1), usual).await;
    assert!(failing.output.unwrap_err().message.contains("stop"));
    assert_eq!(failing.logs, vec!["[\"DEBUG:\",\"doomed\"]"]);
    let quiet = pooled(&pool, "dave", ".", json!(null), usual).await;
    assert_eq!(quiet.output, Ok(Value::Null));
    assert!(quiet.logs.is_empty(), "{:?}", quiet.logs);

    // What a program could use to find a former one is not there.
    for probe in ["input", "[inputs]", "$__loc__", "input_filename", "$ENV", "env"] {
        let finished = pooled(&pool, "dave", probe, json!(null), usual).await;
        let error = finished.output.unwrap_err();
        assert!(error.message.contains("does not compile"), "{probe}: {}", error.message);
    }
    let statistics = pool.statistics();
    assert_eq!(statistics.workers_started, 1, "{statistics:?}");
}

#[tokio::test]
async fn a_spinning_program_stops_at_its_cpu_limit_and_the_next_step_runs() {
    let spinning = agent(
        pb::AgentType::Data,
        pb::agent_config::Kind::Data(pb::DataAgentConfig {
            jq_program: "last(repeat(1))".to_owned(),
        }),
        limits(Duration::from_secs(30), 0, 1, 0),
    );
    let attempt = run(spinning, json!(null)).await;
    assert_eq!(attempt.error().kind, StepErrorKind::LimitExceeded, "{:?}", attempt.error());
    assert_eq!(attempt.error().message, "the jq program exceeded the CPU time limit of 1 s");
    assert!(attempt.elapsed < Duration::from_secs(10), "{:?}", attempt.elapsed);

    let attempt = run(jq("debug | .a"), json!({"a": "after"})).await;
    assert_eq!(attempt.output(), &json!("after"));
    assert_eq!(attempt.log_texts(Some(LogStream::Stderr)), vec!["[\"DEBUG:\",{\"a\":\"after\"}]"]);
}
