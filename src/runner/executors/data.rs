//! DATA agents: a jq program (run by jaq, jq's standard library included) applied to the
//! step's input.
//!
//! The output is the program's single result; an array of the results when it yields several
//! (`.items[]` over three items gives a three-element array); `null` when it yields none
//! (`empty`). A program that does not compile, a run-time error (`error("…")`, `.a` on a
//! number) and `halt_error` fail without retry; `halt` ends the program with the results so
//! far. `env` and `$ENV` do not exist here: the runner's environment holds its secrets.
//! `debug` and `stderr` messages become the step's stderr log lines (at most 1,000), sent when
//! the program ends. Programs run in a child process of their own (`turbocat jq-worker`, on a
//! thread with a deep stack), in the sandbox without network, under the agent's CPU and memory
//! limits; results past
//! `maxOutputBytes` stop them, the deadline and cancels kill the process. A program that
//! recurses too deeply fails without retry instead of taking the runner down.
//! May call: `crate::jq` (compiling and running programs), `crate::text`.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::OnceLock;

use jaq_core::{Ctx, Vars};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::code::{ChildLimits, MemoryLimit, Spawned, child_command, drain, spawn_fed};
use super::sandbox::{self, SandboxSpec, StepDirectory};
use super::{LogStream, RunContext, StepError, StepErrorKind};
use crate::jq::{JqData, clear_program_logs, compile, json_to_val, take_program_logs, val_to_json};
use crate::proto::v1 as pb;
use crate::text::truncate_text;

/// Stack of the thread a program runs on: deep (non-tail) recursion in jq recurses in Rust.
const PROGRAM_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Runs a DATA step in a child process (`turbocat jq-worker`), so that a program recursing
/// too deeply (a stack overflow aborts a process), spinning or allocating without end costs
/// that child and never the runner (in `dev`, the whole server): CPU seconds and memory are
/// rlimits, the wall clock and cancels kill its process group.
pub(super) async fn run(
    config: &pb::DataAgentConfig,
    input: Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let request = WorkerRequest {
        program: config.jq_program.clone(),
        input,
        max_output_bytes: context.limits.max_output_bytes,
    };
    let request_bytes = serde_json::to_vec(&request)
        .map_err(|error| StepError::non_retryable(format!("cannot encode the input: {error}")))?;
    let sandboxed = sandbox::require().await?;
    let limits = ChildLimits {
        cpu_seconds: context.limits.cpu_seconds,
        memory: MemoryLimit::Data(
            context
                .limits
                .memory_mb
                .saturating_mul(1024 * 1024)
                .saturating_add(PROGRAM_STACK_BYTES as u64 + WORKER_OVERHEAD_BYTES),
        ),
    };
    let executable = helper_executable()?;
    let environment = [("LANG", std::ffi::OsString::from("C.UTF-8"))];
    // The program reads nothing but its request; its directory stays empty.
    let directory = StepDirectory::create().map_err(|error| {
        StepError::retryable(format!("cannot create the work directory: {error}"))
    })?;
    let spec = SandboxSpec {
        program: executable.clone(),
        arguments: vec![WORKER_SUBCOMMAND.into()],
        step_directory: directory.path.clone(),
        read_only_paths: sandbox::read_only_paths(&[executable]),
        network: sandbox::SandboxNetwork::Off,
        limits,
    };
    let command = child_command(&spec, &environment, sandboxed)?;
    let outcome = run_worker(command, request_bytes, context).await;
    directory.remove().await;
    outcome
}

async fn run_worker(
    command: tokio::process::Command,
    request_bytes: Vec<u8>,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let Spawned { mut child, mut group, stdout, stderr, stdin_task } =
        spawn_fed(command, request_bytes, "the jq worker")?;
    // The reply holds the output (capped by the worker) and at most 1,000 short log lines.
    let reply_limit = context.limits.max_output_bytes.saturating_mul(2) + (4 << 20);
    let stdout_task = tokio::spawn(read_capped(stdout, reply_limit));
    let stderr_task = tokio::spawn(read_capped(stderr, 64 * 1024));
    let ending = tokio::select! {
        status = child.wait() => Some(status),
        () = tokio::time::sleep_until(context.deadline) => None,
        () = context.cancel.cancelled() => None,
    };
    group.kill();
    if ending.is_none() {
        let _ = child.wait().await;
    }
    stdin_task.abort();
    let reply = drain(stdout_task).await.unwrap_or_default();
    let stderr_text = drain(stderr_task).await.unwrap_or_default();
    group.disarm();
    let status = match ending {
        Some(status) => status.map_err(|error| {
            StepError::retryable(format!("cannot wait for the jq worker: {error}"))
        })?,
        None if context.cancel.is_cancelled() => return Err(StepError::cancelled()),
        None => return Err(context.timed_out()),
    };
    if status.success() {
        let reply: WorkerReply = serde_json::from_slice(&reply).map_err(|error| {
            StepError::retryable(format!("the jq worker's reply is unreadable: {error}"))
        })?;
        for line in &reply.logs {
            context.logs.send(LogStream::Stderr, line).await;
        }
        return match reply.error {
            Some(error) => Err(error.into_step_error()),
            None => Ok(reply.output.unwrap_or(Value::Null)),
        };
    }
    Err(worker_failure(status, &String::from_utf8_lossy(&stderr_text), context))
}

/// Why the worker died, from its exit status and what it wrote to stderr.
fn worker_failure(status: ExitStatus, stderr: &str, context: &RunContext<'_>) -> StepError {
    let limits = &context.limits;
    if stderr.contains("has overflowed its stack") {
        return StepError::non_retryable(
            "the jq program recursed too deeply (stack overflow); make its recursion shallower \
             or tail-recursive",
        );
    }
    if stderr.contains("memory allocation") || stderr.contains("out of memory") {
        return StepError::limit_exceeded(format!(
            "the jq program exceeded the memory limit of {} MiB",
            limits.memory_mb
        ));
    }
    match status.signal() {
        Some(signal) if signal == Signal::XCPU.as_raw() || signal == Signal::KILL.as_raw() => {
            StepError::limit_exceeded(format!(
                "the jq program exceeded the CPU time limit of {} s",
                limits.cpu_seconds
            ))
        }
        _ => StepError::retryable(format!(
            "the jq worker ended abnormally ({status}): {}",
            truncate_text(stderr.trim(), 500)
        )),
    }
}

async fn read_capped(mut pipe: impl AsyncRead + Unpin, limit: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return bytes,
            Ok(read) => {
                if bytes.len() + read <= limit {
                    bytes.extend_from_slice(&chunk[..read]);
                }
            }
        }
    }
}

/// The subcommand of the turbocat binary that runs one jq program (`worker_main`).
pub const WORKER_SUBCOMMAND: &str = "jq-worker";
/// Memory the worker needs beside the program's own: the executable's data, the allocator.
const WORKER_OVERHEAD_BYTES: u64 = 64 * 1024 * 1024;

static WORKER_EXECUTABLE: OnceLock<PathBuf> = OnceLock::new();

/// Sets the turbocat executable that runs jq programs (`<it> jq-worker`) and builds sandboxes
/// (`<it> sandbox-exec`). By default it is the running executable, which is right for
/// `turbocat runner` and `turbocat dev`; programs that embed the executors (tests) point it at
/// a turbocat binary.
pub fn set_worker_executable(path: PathBuf) {
    let _ = WORKER_EXECUTABLE.set(path);
}

pub(super) fn helper_executable() -> Result<PathBuf, StepError> {
    match WORKER_EXECUTABLE.get() {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe().map_err(|error| {
            StepError::retryable(format!("cannot find the turbocat executable: {error}"))
        }),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkerRequest {
    program: String,
    input: Value,
    max_output_bytes: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkerReply {
    output: Option<Value>,
    error: Option<WorkerError>,
    logs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WorkerError {
    message: String,
    limit_exceeded: bool,
}

impl WorkerError {
    fn into_step_error(self) -> StepError {
        if self.limit_exceeded {
            StepError::limit_exceeded(self.message)
        } else {
            StepError::non_retryable(self.message)
        }
    }
}

/// `turbocat jq-worker`: reads a request (program, input, output limit) as JSON on stdin, runs
/// the program on a thread with a deep stack and writes the reply as JSON on stdout.
pub fn worker_main() -> std::process::ExitCode {
    use std::io::{Read, Write};
    let mut request_bytes = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut request_bytes) {
        eprintln!("cannot read the request: {error}");
        return std::process::ExitCode::FAILURE;
    }
    let request: WorkerRequest = match serde_json::from_slice(&request_bytes) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("the request is not valid: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let worker = std::thread::Builder::new()
        .name("turbocat-jq".to_owned())
        .stack_size(PROGRAM_STACK_BYTES)
        .spawn(move || {
            clear_program_logs();
            let outcome = run_program(&request.program, &request.input, request.max_output_bytes);
            let logs = take_program_logs();
            match outcome {
                Ok(output) => WorkerReply { output: Some(output), error: None, logs },
                Err(error) => WorkerReply {
                    output: None,
                    error: Some(WorkerError {
                        limit_exceeded: error.kind == StepErrorKind::LimitExceeded,
                        message: error.message,
                    }),
                    logs,
                },
            }
        });
    let reply = match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(reply)) => reply,
        _ => {
            eprintln!("the jq thread failed");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let written = serde_json::to_writer(&mut stdout, &reply)
        .map_err(std::io::Error::from)
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cannot write the reply: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_program(program: &str, input: &Value, max_output_bytes: usize) -> Result<Value, StepError> {
    let filter = compile(program).map_err(|message| {
        StepError::non_retryable(format!("the jq program does not compile: {message}"))
    })?;
    let context = Ctx::<JqData>::new(&filter.lut, Vars::new([]));
    let mut results = Vec::new();
    let mut output_bytes = 0usize;
    for result in filter.id.run((context, json_to_val(input))) {
        let value = match result {
            Ok(value) => val_to_json(&value),
            Err(exception) => match exception.get_err() {
                Ok(error) => {
                    return Err(StepError::non_retryable(format!(
                        "the jq program failed: {}",
                        truncate_text(&error.to_string(), 1000)
                    )));
                }
                Err(other) => match other.get_halt() {
                    Ok(0) => break,
                    Ok(code) => {
                        return Err(StepError::non_retryable(format!(
                            "the jq program halted with exit code {code}"
                        )));
                    }
                    Err(_) => return Err(StepError::non_retryable("the jq program failed")),
                },
            },
        };
        output_bytes += serde_json::to_vec(&value).map(|bytes| bytes.len()).unwrap_or(0) + 1;
        if output_bytes > max_output_bytes {
            return Err(StepError::new(
                StepErrorKind::LimitExceeded,
                format!("the jq program's results exceed the limit of {max_output_bytes} bytes"),
            ));
        }
        results.push(value);
    }
    Ok(match results.len() {
        0 => Value::Null,
        1 => results.pop().unwrap_or(Value::Null),
        _ => Value::Array(results),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run_now(program: &str, input: Value) -> Result<Value, StepError> {
        run_program(program, &input, 1 << 20)
    }

    #[test]
    fn values_survive_the_round_trip_through_jaq() {
        let input = json!({"a": [1, -2, 3.5, "x", null, true, {"b": 12345678901234i64}]});
        assert_eq!(run_now(".", input.clone()), Ok(input));
        assert_eq!(run_now("1 / 3 | . * 3", json!(null)), Ok(json!(1.0)));
        assert_eq!(run_now("nan", json!(null)), Ok(Value::Null));
    }

    #[test]
    fn halt_ends_the_program_and_halt_error_fails_it() {
        assert_eq!(run_now("1, halt, 2", json!(null)), Ok(json!(1)));
        let error = run_now("\"bad\" | halt_error(3)", json!(null)).unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable);
    }
}
