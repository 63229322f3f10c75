//! CODE agents: real python3 and node processes.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use turbocat::proto::v1 as pb;
use turbocat::runner::executors::{LogStream, StepErrorKind};

use crate::{SECRET_VALUE, SECRET_VARIABLE, agent, limits, run, run_with};

fn python(source: &str, limits: pb::ResourceLimits) -> pb::Agent {
    code_agent(pb::CodeLanguage::Python, source, limits)
}

fn node(source: &str, limits: pb::ResourceLimits) -> pb::Agent {
    code_agent(pb::CodeLanguage::Javascript, source, limits)
}

fn code_agent(language: pb::CodeLanguage, source: &str, limits: pb::ResourceLimits) -> pb::Agent {
    agent(
        pb::AgentType::Code,
        pb::agent_config::Kind::Code(pb::CodeAgentConfig {
            language: language as i32,
            source: source.to_owned(),
            ..pb::CodeAgentConfig::default()
        }),
        limits,
    )
}

fn generous() -> pb::ResourceLimits {
    limits(Duration::from_secs(30), 512, 30, 1 << 20)
}

/// A process of this machine (not a zombie) with `marker` on its command line: the snippets
/// run in a PID namespace of their own, so the pids they print mean nothing out here.
fn process_with_argument(marker: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'))
        });
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) {
            return Some(pid);
        }
    }
    None
}

async fn wait_until_gone(marker: &str) -> bool {
    for _ in 0..50 {
        if process_with_argument(marker).is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A snippet line that starts a python process sleeping 300 s with `marker` in its arguments.
fn start_sleeper(marker: &str) -> String {
    format!(
        "import subprocess, sys\nchild = subprocess.Popen([sys.executable, '-c', \
         'import time; time.sleep(300)', '{marker}'])\nprint('started', flush=True)\n"
    )
}

fn new_marker() -> String {
    format!("turbocat-test-sleeper-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn python_snippets_read_stdin_and_write_stdout_with_prints_as_logs() {
    let greeter = "import json, sys\n\
                   data = json.load(sys.stdin)\n\
                   print('working on', data['name'])\n\
                   print('a warning', file=sys.stderr)\n\
                   name = data.get('name', 'world')\n\
                   print(json.dumps({'greeting': f'Hello, {name}!', 'length': len(name)}))\n";
    let attempt = run(python(greeter, generous()), json!({"name": "Turbocat"})).await;
    assert_eq!(attempt.output(), &json!({"greeting": "Hello, Turbocat!", "length": 8}));
    let stdout = attempt.log_texts(Some(LogStream::Stdout));
    assert_eq!(stdout[0], "working on Turbocat");
    assert_eq!(stdout.len(), 2, "{stdout:?}");
    assert_eq!(attempt.log_texts(Some(LogStream::Stderr)), vec!["a warning"]);

    // The starter template's snippet as seeded, verbatim.
    let seeded = "import json, sys\n\
                  data = json.load(sys.stdin)\n\
                  name = data.get('name', 'world')\n\
                  print(json.dumps({'greeting': f'Hello, {name}!', 'length': len(name)}))\n";
    let attempt = run(python(seeded, generous()), json!({})).await;
    assert_eq!(attempt.output()["greeting"], "Hello, world!");

    // Nothing on stdout is a null output; a pretty-printed document is one output.
    assert_eq!(run(python("pass\n", generous()), json!({})).await.output(), &Value::Null);
    let pretty = "import json\nprint(json.dumps({'a': [1, 2]}, indent=2))\n";
    assert_eq!(run(python(pretty, generous()), json!({})).await.output(), &json!({"a": [1, 2]}));
}

#[tokio::test]
async fn node_snippets_read_stdin_and_write_stdout_with_logs_streamed() {
    let echo = "let text = '';\n\
                process.stdin.on('data', chunk => text += chunk);\n\
                process.stdin.on('end', () => {\n\
                  console.error('got', text.length, 'characters');\n\
                  console.log('about to answer');\n\
                  console.log(JSON.stringify({ echo: JSON.parse(text) }));\n\
                });\n";
    let input = json!({"numbers": [1, 2, 3], "nested": {"ok": true}});
    let attempt = run(node(echo, generous()), input.clone()).await;
    assert_eq!(attempt.output(), &json!({ "echo": input }));
    assert_eq!(attempt.log_texts(Some(LogStream::Stdout))[0], "about to answer");
    let stderr = attempt.log_texts(Some(LogStream::Stderr));
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(stderr[0].starts_with("got "), "{stderr:?}");
}

#[tokio::test]
async fn failures_are_retryable_unless_the_snippet_says_otherwise() {
    let raising = "raise ValueError('the input is odd')\n";
    let error = run(python(raising, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::Retryable);
    assert!(error.message.contains("ValueError: the input is odd"), "{}", error.message);
    assert!(!error.message.contains("runpy"), "the wrapper's frames are hidden: {}", error.message);

    let refusing = "import json, sys\n\
                    data = json.load(sys.stdin)\n\
                    if 'id' not in data:\n    raise NonRetryableError('the input has no id')\n";
    let error = run(python(refusing, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert_eq!(error.message, "the input has no id");
    assert!(!error.is_retryable());

    let own_class = "class NonRetryableError(Exception): pass\nraise NonRetryableError('mine')\n";
    let error = run(python(own_class, generous()), json!({})).await.result.unwrap_err();
    assert_eq!((error.kind, error.message.as_str()), (StepErrorKind::NonRetryable, "mine"));

    let exit_status = "import sys\nsys.exit(3)\n";
    let error = run(python(exit_status, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::Retryable);
    assert!(error.message.contains("status 3"), "{}", error.message);

    let not_json = "print({'single': 'quotes'})\n";
    let error = run(python(not_json, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
    assert!(error.message.contains("must be JSON"), "{}", error.message);

    let node_async = "setTimeout(() => { throw new NonRetryableError('no such user'); }, 10);\n";
    let error = run(node(node_async, generous()), json!({})).await.result.unwrap_err();
    assert_eq!((error.kind, error.message.as_str()), (StepErrorKind::NonRetryable, "no such user"));

    let node_throw = "throw new TypeError('wrong type');\n";
    let error = run(node(node_throw, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::Retryable);
    assert!(error.message.contains("TypeError: wrong type"), "{}", error.message);

    let node_exit = "process.exitCode = 87;\n";
    let error = run(node(node_exit, generous()), json!({})).await.result.unwrap_err();
    assert_eq!(error.kind, StepErrorKind::NonRetryable);
}

#[tokio::test]
async fn memory_limits_stop_hungry_snippets() {
    let hungry_python = "blob = bytearray(600 * 1024 * 1024)\nprint('{}')\n";
    let attempt =
        run(python(hungry_python, limits(Duration::from_secs(30), 128, 30, 4096)), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded, "{error:?}");
    assert!(error.message.contains("memory limit of 128 MiB"), "{}", error.message);
    assert_eq!(error.to_failure().kind, pb::FailureKind::ResourceLimit as i32);

    // The same snippet fits a bigger limit.
    let fits =
        run(python(hungry_python, limits(Duration::from_secs(30), 1024, 30, 4096)), json!({}))
            .await;
    assert_eq!(fits.output(), &json!({}));

    let hungry_node =
        "const kept = [];\nwhile (true) { kept.push(new Array(100000).fill(1.5)); }\n";
    let attempt =
        run(node(hungry_node, limits(Duration::from_secs(30), 128, 30, 4096)), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded, "{error:?}");
    assert!(error.message.contains("memory limit of 128 MiB"), "{}", error.message);
}

#[tokio::test]
async fn cpu_limits_stop_busy_snippets() {
    let busy = "while True:\n    pass\n";
    let attempt = run(python(busy, limits(Duration::from_secs(30), 256, 1, 4096)), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded, "{error:?}");
    assert!(error.message.contains("CPU time limit of 1 s"), "{}", error.message);
    assert!(attempt.elapsed < Duration::from_secs(10), "{:?}", attempt.elapsed);
}

#[tokio::test]
async fn the_wall_clock_limit_kills_the_whole_process_group() {
    let marker = new_marker();
    let spawner = format!("{}import time\ntime.sleep(300)\n", start_sleeper(&marker));
    let attempt =
        run(python(&spawner, limits(Duration::from_secs(2), 256, 30, 4096)), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::TimedOut, "{error:?}");
    assert_eq!(error.message, "the step exceeded its time limit of 2s");
    assert!(error.is_retryable());
    assert!(attempt.elapsed < Duration::from_secs(6), "{:?}", attempt.elapsed);
    assert_eq!(attempt.log_texts(Some(LogStream::Stdout)), vec!["started"]);
    assert!(wait_until_gone(&marker).await, "the grandchild survived");

    // A background process left behind by a snippet that succeeded does not survive either.
    let marker = new_marker();
    let leaver = format!("{}print('{{\"done\": true}}')\n", start_sleeper(&marker));
    let attempt = run(python(&leaver, generous()), json!({})).await;
    assert_eq!(attempt.output(), &json!({"done": true}));
    assert!(wait_until_gone(&marker).await, "the background process survived");
}

#[tokio::test]
async fn cancelling_stops_the_snippet_at_once() {
    let marker = new_marker();
    let sleeper = format!("{}child.wait()\n", start_sleeper(&marker));
    let attempt =
        run_with(python(&sleeper, generous()), json!({}), Some(Duration::from_millis(700))).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::Cancelled);
    assert_eq!(error.to_failure().kind, pb::FailureKind::Cancelled as i32);
    assert!(attempt.elapsed < Duration::from_secs(5), "{:?}", attempt.elapsed);
    assert_eq!(attempt.log_texts(Some(LogStream::Stdout)), vec!["started"]);
    assert!(wait_until_gone(&marker).await, "the snippet's process survived the cancel");
}

#[tokio::test]
async fn too_much_output_fails_and_stops_the_snippet() {
    let flood = "while True:\n    print('x' * 1000)\n";
    let attempt =
        run(python(flood, limits(Duration::from_secs(30), 256, 30, 10_000)), json!({})).await;
    let error = attempt.error();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded, "{error:?}");
    assert!(error.message.contains("10000 bytes"), "{}", error.message);
    assert!(attempt.elapsed < Duration::from_secs(10), "{:?}", attempt.elapsed);

    let big_answer = "import json\nprint(json.dumps({'data': 'y' * 5000}))\n";
    let error = run(python(big_answer, limits(Duration::from_secs(30), 256, 30, 1000)), json!({}))
        .await
        .result
        .unwrap_err();
    assert_eq!(error.kind, StepErrorKind::LimitExceeded);
}

/// Under the coverage run (scripts/coverage) LLVM's profile runtime adds this variable to the
/// instrumented sandbox helper's own environment, which a snippet inherits; a plain `cargo test`
/// build has no such runtime.
fn is_coverage_runtime(name: &str) -> bool {
    name == "__LLVM_PROFILE_RT_INIT_ONCE"
}

#[tokio::test]
async fn snippets_get_a_bare_environment_and_a_fresh_directory_that_is_removed() {
    crate::setup();
    assert_eq!(std::env::var(SECRET_VARIABLE).as_deref(), Ok(SECRET_VALUE));
    let inspector = "import json, os\n\
                     open('scratch.txt', 'w').write('temporary')\n\
                     print(json.dumps({'environment': dict(os.environ), 'directory': os.getcwd(), \
                     'files': sorted(os.listdir('.'))}))\n";
    let attempt = run(python(inspector, generous()), json!({})).await;
    let output = attempt.output();
    let environment = output["environment"].as_object().unwrap();
    let mut names: Vec<&str> =
        environment.keys().map(String::as_str).filter(|name| !is_coverage_runtime(name)).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["HOME", "LANG", "PATH", "TMPDIR"], "{environment:?}");
    assert!(!output.to_string().contains(SECRET_VALUE));
    let directory = output["directory"].as_str().unwrap();
    assert_eq!(environment["HOME"], directory);
    assert!(directory.contains("turbocat-step-"), "{directory}");
    assert_eq!(output["files"], json!(["main.py", "scratch.txt"]));
    // The step's directory (the work directory's parent) is gone, not just the work directory.
    let step_directory = Path::new(directory).parent().unwrap();
    assert!(!step_directory.exists(), "{directory} was not removed");

    let node_inspector = "console.log(JSON.stringify({ keys: Object.keys(process.env).sort(), \
                          directory: process.cwd() }));\n";
    let attempt = run(node(node_inspector, generous()), json!({})).await;
    let keys: Vec<&str> = attempt.output()["keys"]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(Value::as_str)
                .filter(|name| !is_coverage_runtime(name))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(keys, ["HOME", "LANG", "PATH", "TMPDIR"], "{}", attempt.output());
    assert!(!Path::new(attempt.output()["directory"].as_str().unwrap()).exists());

    // The directory goes away after a timeout too.
    let slow = "import os, time\nprint('cwd=' + os.getcwd(), flush=True)\ntime.sleep(60)\n";
    let attempt = run(python(slow, limits(Duration::from_secs(1), 256, 30, 4096)), json!({})).await;
    assert_eq!(attempt.error().kind, StepErrorKind::TimedOut);
    let stdout = attempt.log_texts(Some(LogStream::Stdout));
    let directory = stdout.iter().find_map(|line| line.strip_prefix("cwd=")).unwrap();
    let step_directory = Path::new(directory).parent().unwrap();
    assert!(!step_directory.exists(), "{directory} was not removed after the timeout");
}
