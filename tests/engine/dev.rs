//! `turbocat dev`: SQLite, the in-process queue and bus, and the runner it starts itself.

use std::time::Duration;

use serde_json::json;

use crate::support::api::Api;
use crate::support::start_dev;
use crate::{Workbench, step, time};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_diamonds_and_fan_out_run_with_outputs_flowing_to_dependents() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "dags@example.com").await;
    let double = bench.jq("double", ".value * 2 | {value: .}").await;
    let sum = bench.jq("sum", "{value: (.left + .right)}").await;

    // Chain: the input flows a -> b -> c, each doubling.
    let chain = bench
        .workflow(
            "chain",
            json!([
                { "key": "a", "agentId": double },
                { "key": "b", "agentId": double, "dependsOn": ["a"], "inputMapping": "{{steps.a.output}}" },
                { "key": "c", "agentId": double, "dependsOn": ["b"], "inputMapping": { "value": "{{steps.b.output.value}}" } },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&chain, json!({ "input": { "value": 3 } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "value": 24 }), "3 doubled three times");
    assert_eq!(step(&execution, "b")["input"], json!({ "value": 6 }));

    // Diamond: a feeds b and c, d joins them; text placeholders become text.
    let diamond = bench
        .workflow(
            "diamond",
            json!([
                { "key": "a", "agentId": double },
                { "key": "b", "agentId": double, "dependsOn": ["a"], "inputMapping": { "value": "{{steps.a.output.value}}" } },
                { "key": "c", "agentId": double, "dependsOn": ["a"], "inputMapping": { "value": "{{input.bonus}}" } },
                { "key": "d", "agentId": sum, "dependsOn": ["b", "c"], "inputMapping": { "left": "{{steps.b.output.value}}", "right": "{{steps.c.output.value}}" } },
            ]),
            json!({}),
        )
        .await;
    let execution_id =
        bench.execute(&diamond, json!({ "input": { "value": 1, "bonus": 10 } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "value": 24 }), "(1*2*2) + (10*2)");
    let d = step(&execution, "d");
    for dependency in ["b", "c"] {
        let finished = time(&step(&execution, dependency)["finishedAt"]);
        assert!(finished <= time(&d["startedAt"]), "d waits for {dependency}");
    }

    // Fan-out of 100 independent steps and a fan-in over all of them.
    let mut steps = vec![json!({ "key": "root", "agentId": double })];
    let mut gather = serde_json::Map::new();
    for index in 0..100 {
        let key = format!("leaf{index}");
        steps.push(json!({ "key": key, "agentId": double, "dependsOn": ["root"], "inputMapping": { "value": "{{steps.root.output.value}}" } }));
        gather.insert(key.clone(), json!(format!("{{{{steps.{key}.output.value}}}}")));
    }
    let collect = bench.jq("collect", "{value: ([.[]] | add)}").await;
    let keys: Vec<String> = (0..100).map(|index| format!("leaf{index}")).collect();
    steps.push(
        json!({ "key": "join", "agentId": collect, "dependsOn": keys, "inputMapping": gather }),
    );
    let fan = bench.workflow("fan", json!(steps), json!({})).await;
    let execution_id = bench.execute(&fan, json!({ "input": { "value": 1 } })).await;
    let execution = bench.finished(&execution_id, Duration::from_secs(120)).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "value": 400 }), "100 leaves of (1*2)*2");
    assert_eq!(execution["stepRuns"].as_array().map(Vec::len), Some(102));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_steps_run_python_and_node_with_logs_retries_and_failures() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "code@example.com").await;
    let python = bench
        .code(
            "py",
            "python",
            "import json, sys\ndata = json.load(sys.stdin)\nprint('working on', data['n'])\nprint(json.dumps({'n': data['n'] + 1}))\n",
            json!({}),
        )
        .await;
    let node = bench
        .code(
            "js",
            "javascript",
            "let raw='';process.stdin.on('data',c=>raw+=c);process.stdin.on('end',()=>{const d=JSON.parse(raw);console.error('node says hi');console.log(JSON.stringify({n:d.n*10}));});",
            json!({}),
        )
        .await;
    let workflow = bench
        .workflow(
            "py then node",
            json!([
                { "key": "py", "agentId": python },
                { "key": "js", "agentId": node, "dependsOn": ["py"], "inputMapping": "{{steps.py.output}}" },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&workflow, json!({ "input": { "n": 4 } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(execution["output"], json!({ "n": 50 }));
    let (status, logs) = bench
        .api
        .get(&format!("/api/v1/executions/{execution_id}/logs?pageSize=100"), &bench.auth)
        .await;
    assert_eq!(status, 200, "{logs}");
    let lines: Vec<String> = logs["data"]
        .as_array()
        .expect("log lines")
        .iter()
        .map(|line| {
            format!(
                "{} {}",
                line["source"].as_str().unwrap_or(""),
                line["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert!(lines.iter().any(|line| line == "STDOUT working on 4"), "{lines:?}");
    assert!(lines.iter().any(|line| line == "STDERR node says hi"), "{lines:?}");

    // Fails on the first attempt (a counter on the test's side tells), succeeds on the second.
    let counter = crate::support::attempt_counter().await;
    let flaky =
        bench.agent("flaky", "CODE", crate::support::flaky_python_config(), json!({})).await;
    let retrying = bench
        .workflow(
            "retry then success",
            json!([{ "key": "flaky", "agentId": flaky, "retryPolicy": { "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "0.2s" } }]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&retrying, json!({ "input": { "counter": counter } })).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let flaky_step = step(&execution, "flaky");
    assert_eq!(flaky_step["attempt"], 2, "{flaky_step}");
    let attempts = flaky_step["attempts"].as_array().expect("attempts");
    assert_eq!(attempts[0]["status"], "FAILED");
    assert!(
        attempts[0]["error"].as_str().unwrap_or("").contains("first attempt fails"),
        "{flaky_step}"
    );
    assert_eq!(attempts[1]["status"], "SUCCEEDED");

    // Always fails: three attempts, then the execution fails naming the step and the error.
    let failing =
        bench.code("failing", "python", "raise RuntimeError('always broken')\n", json!({})).await;
    let exhausted = bench
        .workflow(
            "retries exhausted",
            json!([{ "key": "broken", "agentId": failing, "retryPolicy": { "maxAttempts": 3, "initialBackoff": "0.05s" } }]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&exhausted, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().unwrap_or_default();
    assert!(error.contains("broken") && error.contains("always broken"), "{error}");
    assert_eq!(step(&execution, "broken")["attempt"], 3);

    // A non-retryable failure stops at once, whatever the policy allows.
    let fatal =
        bench.code("fatal", "python", "raise NonRetryableError('bad input')\n", json!({})).await;
    let after = bench.jq("after", ".").await;
    let stopping = bench
        .workflow(
            "non-retryable",
            json!([
                { "key": "fatal", "agentId": fatal, "retryPolicy": { "maxAttempts": 5, "initialBackoff": "0.05s" } },
                { "key": "after", "agentId": after, "dependsOn": ["fatal"] },
            ]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&stopping, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    assert_eq!(step(&execution, "fatal")["attempt"], 1, "no retry");
    assert_eq!(step(&execution, "after")["status"], "CANCELLED", "its dependent never runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_cancellation_stop_steps_and_executions() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "time@example.com").await;
    let sleeper = bench
        .code(
            "sleeper",
            "python",
            "import time\ntime.sleep(30)\nprint('{}')\n",
            json!({ "timeout": "1s" }),
        )
        .await;

    // Step timeout: each attempt ends TIMED_OUT and counts as a retryable failure.
    let step_timeout = bench
        .workflow(
            "step timeout",
            json!([{ "key": "slow", "agentId": sleeper, "retryPolicy": { "maxAttempts": 2, "initialBackoff": "0.05s" } }]),
            json!({}),
        )
        .await;
    let execution_id = bench.execute(&step_timeout, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let slow = step(&execution, "slow");
    assert_eq!(slow["status"], "TIMED_OUT", "{slow}");
    assert_eq!(slow["attempt"], 2, "the timeout was retried once");
    assert!(execution["error"].as_str().unwrap_or("").contains("slow"), "{execution}");

    // Execution timeout: the whole run ends TIMED_OUT and its running step is cancelled.
    let long = bench
        .code(
            "long",
            "python",
            "import time\ntime.sleep(30)\nprint('{}')\n",
            json!({ "timeout": "60s" }),
        )
        .await;
    let execution_timeout = bench
        .workflow(
            "execution timeout",
            json!([{ "key": "long", "agentId": long }]),
            json!({ "timeout": "2s" }),
        )
        .await;
    let execution_id = bench.execute(&execution_timeout, json!({})).await;
    let execution = bench.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "TIMED_OUT", "{execution}");
    // The attempt's deadline is the execution's: the runner stops it as timed out, or the
    // engine cancels it first.
    let long_status = step(&execution, "long")["status"].as_str().unwrap_or_default().to_owned();
    assert!(["TIMED_OUT", "CANCELLED"].contains(&long_status.as_str()), "{execution}");
    let time = |field: &str| {
        chrono::DateTime::parse_from_rfc3339(execution[field].as_str().expect("time"))
            .expect("rfc3339")
    };
    let took = time("finishedAt") - time("createdAt");
    assert!(
        took < chrono::Duration::seconds(10),
        "stopped at its 2 s timeout, not after 30 s: {took}"
    );

    // Cancel: a running step is stopped and the execution ends CANCELLED.
    let cancellable =
        bench.workflow("cancel me", json!([{ "key": "long", "agentId": long }]), json!({})).await;
    let execution_id = bench.execute(&cancellable, json!({})).await;
    bench
        .wait_for(&execution_id, LIMIT, "running", |execution| {
            step(execution, "long")["status"] == "RUNNING"
        })
        .await;
    let (status, body) = bench
        .api
        .post(&format!("/api/v1/executions/{execution_id}/cancel"), &bench.auth, json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let execution = bench.finished(&execution_id, Duration::from_secs(15)).await;
    assert_eq!(execution["status"], "CANCELLED", "{execution}");
    assert_eq!(step(&execution, "long")["status"], "CANCELLED");
}

/// The step logs of an execution, as `step_key source message`.
async fn step_log_lines(bench: &Workbench, execution_id: &str) -> Vec<String> {
    let (status, logs) = bench
        .api
        .get(&format!("/api/v1/executions/{execution_id}/logs?pageSize=100"), &bench.auth)
        .await;
    assert_eq!(status, 200, "{logs}");
    logs["data"]
        .as_array()
        .expect("log lines")
        .iter()
        .filter(|line| line["source"] == "STDERR")
        .map(|line| {
            format!(
                "{} {}",
                line["stepKey"].as_str().unwrap_or(""),
                line["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_steps_in_warm_workers_keep_to_themselves_and_outlive_crashes() {
    let (server, _data) = start_dev(&[]);
    let bench = Workbench::new(Api::new(&server), "warm-jq@example.com").await;
    let keeper = bench.jq("keeper", "debug | {kept: .secret}").await;
    let looker = bench.jq("looker", "debug(\"looker\") | {seen: .}").await;
    let chain = bench
        .workflow(
            "keeper then looker",
            json!([
                { "key": "a", "agentId": keeper },
                { "key": "b", "agentId": looker, "dependsOn": ["a"], "inputMapping": { "n": 1 } },
                { "key": "c", "agentId": keeper, "dependsOn": ["b"], "inputMapping": { "secret": "{{input.other}}" } },
            ]),
            json!({}),
        )
        .await;
    let run_chain = |secret: &'static str, other: &'static str| {
        let bench = &bench;
        let chain = &chain;
        async move {
            let input = json!({ "input": { "secret": secret, "other": other } });
            let execution_id = bench.execute(chain, input).await;
            let execution = bench.finished(&execution_id, LIMIT).await;
            assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
            (execution, step_log_lines(bench, &execution_id).await)
        }
    };
    let (execution, lines) = run_chain("alpha", "beta").await;
    // Each step sees its own input and writes only its own messages.
    assert_eq!(step(&execution, "a")["output"], json!({ "kept": "alpha" }));
    assert_eq!(step(&execution, "b")["output"], json!({ "seen": { "n": 1 } }));
    assert_eq!(step(&execution, "c")["output"], json!({ "kept": "beta" }));
    assert_eq!(
        lines,
        vec![
            "a [\"DEBUG:\",{\"other\":\"beta\",\"secret\":\"alpha\"}]",
            "b [\"DEBUG:\",\"looker\"]",
            "c [\"DEBUG:\",{\"secret\":\"beta\"}]",
        ]
    );

    // A program that overflows its worker's stack, and one that spins past its CPU limit,
    // fail their step as ever; the steps after them run.
    let deep = bench.jq("deep", "def f: 1 + f; f").await;
    let spinning = bench
        .agent(
            "spinning",
            "DATA",
            json!({ "data": { "jqProgram": "last(repeat(1))" } }),
            json!({ "cpuSeconds": 1, "timeout": "30s" }),
        )
        .await;
    for (agent, expected) in [
        (&deep, "the jq program recursed too deeply"),
        (&spinning, "the jq program exceeded the CPU time limit of 1 s"),
    ] {
        let workflow = bench
            .workflow(
                &format!("fails {agent}"),
                json!([{ "key": "x", "agentId": agent }]),
                json!({}),
            )
            .await;
        let execution_id = bench.execute(&workflow, json!({ "input": {} })).await;
        let execution = bench.finished(&execution_id, LIMIT).await;
        assert_eq!(execution["status"], "FAILED", "{execution}");
        let error = step(&execution, "x")["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.starts_with(expected), "{error}");
        assert_eq!(step(&execution, "x")["attempt"], 1, "not retried: {execution}");
    }
    let (execution, lines) = run_chain("gamma", "delta").await;
    assert_eq!(step(&execution, "c")["output"], json!({ "kept": "delta" }));
    assert!(!lines.iter().any(|line| line.contains("alpha") || line.contains("beta")), "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
}
