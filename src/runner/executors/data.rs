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
//! thread with a deep stack) under the agent's CPU and memory limits; results past
//! `maxOutputBytes` stop them, the deadline and cancels kill the process. A program that
//! recurses too deeply fails without retry instead of taking the runner down.
//! May call: jaq.

use std::cell::RefCell;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;

use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::native::{self, Fun};
use jaq_core::{Compiler, Ctx, RunPtr, ValT as _, Vars, data::JustLut};
use jaq_json::Val;
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::code::{ChildLimits, MemoryLimit, Spawned, drain, spawn_fed};
use super::{LogStream, RunContext, StepError, StepErrorKind, truncate_text};
use crate::proto::v1 as pb;

type JqData = JustLut<Val>;
type JqProgram = jaq_core::Filter<JqData>;

/// Native jq filters of the standard library a DATA program may not use.
const FORBIDDEN_FILTERS: [&str; 3] = [
    // The runner's environment variables, API keys included.
    "env",
    // Replaced by `captured_log_filters`: the standard ones write to the runner's own log.
    "debug_empty",
    "stderr_empty",
];

/// `debug` and `stderr` messages kept at most per run.
const MAX_PROGRAM_LOG_LINES: usize = 1000;

thread_local! {
    /// The `debug`/`stderr` messages of the program running on this thread.
    static PROGRAM_LOGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

fn capture_log_line(line: String) {
    PROGRAM_LOGS.with(|logs| {
        let mut logs = logs.borrow_mut();
        if logs.len() < MAX_PROGRAM_LOG_LINES {
            logs.push(truncate_text(&line, 2000));
        }
    });
}

/// `debug` (as jq prints it: `["DEBUG:",<value>]`) and `stderr` (strings raw), kept for the
/// step's log instead of the runner's.
fn captured_log_filters() -> impl Iterator<Item = Fun<JqData>> {
    let debug: RunPtr<JqData> = |(_, value)| {
        capture_log_line(format!("[\"DEBUG:\",{value}]"));
        Box::new(core::iter::empty())
    };
    let stderr: RunPtr<JqData> = |(_, value)| {
        capture_log_line(match &value {
            Val::TStr(bytes) | Val::BStr(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            other => other.to_string(),
        });
        Box::new(core::iter::empty())
    };
    let filters: [native::Filter<RunPtr<JqData>>; 2] =
        [("debug_empty", native::v(0), debug), ("stderr_empty", native::v(0), stderr)];
    filters.into_iter().map(native::run::<JqData>)
}

/// Stack of the thread a program runs on: deep (non-tail) recursion in jq recurses in Rust.
const PROGRAM_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Checks that a jq program compiles; the error says what is wrong and where.
pub fn check_program(program: &str) -> Result<(), String> {
    compile(program).map(|_| ())
}

fn compile(program: &str) -> Result<JqProgram, String> {
    let definitions = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
    let functions = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs())
        .filter(|(name, _, _)| !FORBIDDEN_FILTERS.contains(name))
        .chain(captured_log_filters());
    let loader = Loader::new(definitions);
    let arena = Arena::default();
    let modules = loader
        .load(&arena, File { code: program, path: () })
        .map_err(|errors| describe_load_errors(program, errors))?;
    Compiler::default().with_funs(functions).compile(modules).map_err(|errors| {
        let described: Vec<String> = errors
            .into_iter()
            .flat_map(|(_file, undefined)| undefined)
            .map(|(name, undefined)| {
                format!(
                    "undefined {} `{name}` at character {}",
                    undefined.as_str(),
                    position(program, name)
                )
            })
            .collect();
        described.join("; ")
    })
}

fn describe_load_errors(program: &str, errors: load::Errors<&str, ()>) -> String {
    let mut described = Vec::new();
    for (_file, error) in errors {
        match error {
            load::Error::Io(failures) => {
                for (path, message) in failures {
                    described.push(format!("cannot load module `{path}`: {message}"));
                }
            }
            load::Error::Lex(failures) => {
                for (expected, found) in failures {
                    let expected = match expected {
                        load::lex::Expect::Digit => "a digit",
                        load::lex::Expect::Ident => "an identifier",
                        load::lex::Expect::Delim("(") => "a closing parenthesis",
                        load::lex::Expect::Delim("[") => "a closing bracket",
                        load::lex::Expect::Delim("{") => "a closing brace",
                        load::lex::Expect::Delim("\"") => "a closing quote",
                        load::lex::Expect::Escape => "a string escape sequence",
                        load::lex::Expect::Unicode => "a 4-digit hexadecimal code point",
                        _ => "a token",
                    };
                    described.push(format!(
                        "expected {expected} at character {}",
                        position(program, found)
                    ));
                }
            }
            load::Error::Parse(failures) => {
                for (expected, found) in failures {
                    let found_text = if found.is_empty() {
                        "the end of the program".to_owned()
                    } else {
                        format!("`{}`", truncate_text(found, 20))
                    };
                    described.push(format!(
                        "expected {} at character {}, found {found_text}",
                        expected.as_str(),
                        position(program, found)
                    ));
                }
            }
        }
    }
    if described.is_empty() {
        return "the program does not parse".to_owned();
    }
    described.join("; ")
}

/// Where `part` (a slice of `program`) starts, counted in characters from 1.
fn position(program: &str, part: &str) -> usize {
    let program_start = program.as_ptr() as usize;
    let part_start = part.as_ptr() as usize;
    if part_start < program_start || part_start > program_start + program.len() {
        return 0;
    }
    program[..part_start - program_start].chars().count() + 1
}

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
    let mut command = tokio::process::Command::new(worker_executable()?);
    command
        .arg(WORKER_SUBCOMMAND)
        .env_clear()
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
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
    limits.install(&mut command);
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

/// Sets the executable that runs jq programs (`<it> jq-worker`). By default it is the running
/// executable, which is right for `turbocat runner` and `turbocat dev`; programs that embed the
/// executors (tests) point it at a turbocat binary.
pub fn set_worker_executable(path: PathBuf) {
    let _ = WORKER_EXECUTABLE.set(path);
}

fn worker_executable() -> Result<PathBuf, StepError> {
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
            PROGRAM_LOGS.with(|logs| logs.borrow_mut().clear());
            let outcome = run_program(&request.program, &request.input, request.max_output_bytes);
            let logs = PROGRAM_LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()));
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

fn json_to_val(value: &Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(boolean) => Val::from(*boolean),
        Value::Number(number) => {
            match number.as_i64().and_then(|integer| isize::try_from(integer).ok()) {
                Some(integer) => Val::from(integer),
                None => Val::from(number.as_f64().unwrap_or(f64::NAN)),
            }
        }
        Value::String(text) => Val::from(text.clone()),
        Value::Array(items) => items.iter().map(json_to_val).collect(),
        Value::Object(fields) => {
            let pairs =
                fields.iter().map(|(key, field)| (Val::from(key.clone()), json_to_val(field)));
            // Building an object from string keys cannot fail.
            Val::from_map(pairs).unwrap_or(Val::Null)
        }
    }
}

fn val_to_json(value: &Val) -> Value {
    match value {
        Val::Null => Value::Null,
        Val::Bool(boolean) => Value::Bool(*boolean),
        // Integers, big integers, floats and decimals print as JSON numbers; NaN and infinities
        // do not parse and become null, as in jq.
        Val::Num(_) => serde_json::from_str(&value.to_string()).unwrap_or(Value::Null),
        Val::TStr(bytes) | Val::BStr(bytes) => {
            Value::String(String::from_utf8_lossy(bytes).into_owned())
        }
        Val::Arr(items) => Value::Array(items.iter().map(val_to_json).collect()),
        Val::Obj(fields) => Value::Object(
            fields
                .iter()
                .map(|(key, field)| {
                    let key_text = match key {
                        Val::TStr(bytes) | Val::BStr(bytes) => {
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        other => other.to_string(),
                    };
                    (key_text, val_to_json(field))
                })
                .collect(),
        ),
    }
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
    fn compile_errors_say_where() {
        let message = check_program(".a | ").unwrap_err();
        assert!(message.contains("expected"), "{message}");
        let message = check_program("nosuchfilter(1)").unwrap_err();
        assert!(message.contains("undefined filter `nosuchfilter`"), "{message}");
        let message = check_program("env.HOME").unwrap_err();
        assert!(message.contains("`env`"), "{message}");
        assert_eq!(check_program("{open: [.issues[] | select(.state == \"open\")]}"), Ok(()));
    }

    #[test]
    fn halt_ends_the_program_and_halt_error_fails_it() {
        assert_eq!(run_now("1, halt, 2", json!(null)), Ok(json!(1)));
        let error = run_now("\"bad\" | halt_error(3)", json!(null)).unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable);
    }
}
