//! DATA agents: a jq program (run by jaq, jq's standard library included) applied to the
//! step's input.
//!
//! The output is the program's single result; an array of the results when it yields several
//! (`.items[]` over three items gives a three-element array); `null` when it yields none
//! (`empty`). A program that does not compile, a run-time error (`error("…")`, `.a` on a
//! number) and `halt_error` fail without retry; `halt` ends the program with the results so
//! far. `env` and `$ENV` do not exist here: the runner's environment holds its secrets.
//! `debug` and `stderr` messages become the step's stderr log lines (at most 1,000), sent when
//! the program ends. Programs run in warm worker processes (`turbocat jq-worker`, see
//! `jq_pool`), each in the sandbox without network, serving one step after another on a
//! thread with a deep stack, with a cache of compiled programs; under the agent's CPU and
//! memory limits; results past `maxOutputBytes` stop them, the deadline and cancels kill the
//! worker. A program that recurses too deeply fails without retry and costs its worker, never
//! the runner.
//! This file holds the step's side (`run`) and the worker's (`worker_main`); the messages
//! between them are one line of JSON each way.
//! May call: `crate::jq` (compiling and running programs), `crate::text`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::rc::Rc;
use std::sync::OnceLock;

use jaq_core::{Ctx, Vars};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::jq_pool::{JqJob, JqPool};
use super::{Limits, LogStream, RunContext, StepError, StepErrorKind};
use crate::jq::{
    JqData, JqProgram, clear_program_logs, compile, json_to_val, take_program_logs, val_to_json,
};
use crate::proto::v1 as pb;
use crate::text::truncate_text;

/// Stack of the thread programs run on: deep (non-tail) recursion in jq recurses in Rust.
pub(super) const PROGRAM_STACK_BYTES: usize = 64 * 1024 * 1024;
/// Compiled programs a worker keeps at most, the least recently used dropped first. A compiled
/// program holds its own copy of the standard library's definitions (about 115 KiB for a short
/// program), and the cache lives in the worker's memory overhead ([`WORKER_OVERHEAD_BYTES`]):
/// 128 short programs take about 15 MiB of its 64.
const PROGRAM_CACHE_ENTRIES: usize = 128;
/// Program text a worker's cache holds at most (its compiled programs grow with it); a longer
/// program is compiled for each step and not kept.
const PROGRAM_CACHE_TEXT_BYTES: usize = 256 * 1024;
/// A request buffer that grew past this is given back after its request.
const KEPT_REQUEST_BUFFER_BYTES: usize = 1 << 20;

/// Runs a DATA step in a warm jq worker of the runner's pool: a program recursing too deeply
/// (a stack overflow aborts a process), spinning or allocating without end costs that worker
/// and never the runner (in `dev`, the whole server).
pub(super) async fn run(
    config: &pb::DataAgentConfig,
    input: Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let job = JqJob {
        owner_id: context.owner_id.to_owned(),
        program: config.jq_program.clone(),
        input,
        limits: context.limits,
    };
    let finished = shared_pool().run(&job, context.deadline, context.cancel).await;
    for line in &finished.logs {
        context.logs.send(LogStream::Stderr, line).await;
    }
    finished.output.map_err(|error| match error.kind {
        StepErrorKind::TimedOut => context.timed_out(),
        _ => error,
    })
}

/// The pool of jq workers of this process (the runner's, or the local runner's in `dev`).
pub fn shared_pool() -> &'static JqPool {
    static POOL: OnceLock<JqPool> = OnceLock::new();
    POOL.get_or_init(|| JqPool::new(super::jq_pool::JqPoolSettings::default()))
}

/// Why a worker died, from its exit status and what it wrote to stderr.
pub(super) fn worker_failure(status: ExitStatus, stderr: &str, limits: &Limits) -> StepError {
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

/// The subcommand of the turbocat binary that runs jq programs (`worker_main`).
pub const WORKER_SUBCOMMAND: &str = "jq-worker";
/// Memory the worker needs beside the program's own: the executable's data, the allocator, the
/// cache of compiled programs.
pub(super) const WORKER_OVERHEAD_BYTES: u64 = 64 * 1024 * 1024;

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

/// One step for a worker: one line of JSON on its stdin.
#[derive(Debug, Serialize)]
pub(super) struct WorkerRequest<'a> {
    pub program: &'a str,
    pub input: &'a Value,
    pub max_output_bytes: usize,
    /// The step's CPU budget: the worker may use this many more seconds of CPU time.
    pub cpu_seconds: u64,
}

/// The request as the worker reads it.
#[derive(Debug, Deserialize)]
struct OwnedWorkerRequest {
    program: String,
    input: Value,
    max_output_bytes: usize,
    cpu_seconds: u64,
}

/// A worker's answer to one request: one line of JSON on its stdout.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct WorkerReply {
    pub output: Option<Value>,
    pub error: Option<WorkerError>,
    pub logs: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct WorkerError {
    message: String,
    limit_exceeded: bool,
}

impl WorkerError {
    pub(super) fn into_step_error(self) -> StepError {
        if self.limit_exceeded {
            StepError::limit_exceeded(self.message)
        } else {
            StepError::non_retryable(self.message)
        }
    }
}

/// `turbocat jq-worker`: serves requests until its stdin ends. Each request (program, input,
/// output limit, CPU budget) is a line of JSON on stdin; each reply a line of JSON on stdout.
/// Everything runs on one thread with a deep stack, which also holds the cache of compiled
/// programs. Nothing of a request outlives its reply but the compiled program: the input,
/// the results and the `debug`/`stderr` messages are per request.
pub fn worker_main() -> std::process::ExitCode {
    let worker = std::thread::Builder::new()
        .name("turbocat-jq".to_owned())
        .stack_size(PROGRAM_STACK_BYTES)
        .spawn(serve_requests);
    match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        _ => {
            eprintln!("the jq thread failed");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve_requests() -> std::process::ExitCode {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut cache = ProgramCache::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        if line.capacity() > KEPT_REQUEST_BUFFER_BYTES {
            line = Vec::new();
        }
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => return std::process::ExitCode::SUCCESS,
            Ok(_) => {}
            Err(error) => {
                eprintln!("cannot read a request: {error}");
                return std::process::ExitCode::FAILURE;
            }
        }
        let request: OwnedWorkerRequest = match serde_json::from_slice(&line) {
            Ok(request) => request,
            Err(error) => {
                eprintln!("the request is not valid: {error}");
                return std::process::ExitCode::FAILURE;
            }
        };
        if let Err(error) = limit_cpu_time(request.cpu_seconds) {
            eprintln!("cannot limit the CPU time: {error}");
            return std::process::ExitCode::FAILURE;
        }
        let reply = serve(&request, &mut cache);
        let written = serde_json::to_vec(&reply)
            .map_err(std::io::Error::from)
            .and_then(|mut bytes| {
                bytes.push(b'\n');
                stdout.write_all(&bytes)
            })
            .and_then(|()| stdout.flush());
        if let Err(error) = written {
            eprintln!("cannot write the reply: {error}");
            return std::process::ExitCode::FAILURE;
        }
    }
}

/// Lets this process use `budget_seconds` more seconds of CPU time (rounded up to the next
/// whole second): RLIMIT_CPU's soft limit, past which the kernel ends it with SIGXCPU, as it
/// ends a program past its limit everywhere else. The hard limit stays as the runner set it.
fn limit_cpu_time(budget_seconds: u64) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit};
    let used = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    let used_seconds = u64::try_from(used.tv_sec).unwrap_or(0) + u64::from(used.tv_nsec > 0);
    let current = rustix::process::getrlimit(Resource::Cpu);
    let mut soft = used_seconds.saturating_add(budget_seconds);
    if let Some(hard) = current.maximum {
        soft = soft.min(hard);
    }
    rustix::process::setrlimit(
        Resource::Cpu,
        Rlimit { current: Some(soft), maximum: current.maximum },
    )
    .map_err(|error| std::io::Error::from_raw_os_error(error.raw_os_error()))
}

fn serve(request: &OwnedWorkerRequest, cache: &mut ProgramCache) -> WorkerReply {
    clear_program_logs();
    let outcome = cache
        .get_or_compile(&request.program)
        .and_then(|filter| run_filter(&filter, &request.input, request.max_output_bytes));
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
}

/// Compiled programs by their text, the least recently used dropped first past
/// [`PROGRAM_CACHE_ENTRIES`] entries or [`PROGRAM_CACHE_TEXT_BYTES`] of text. Programs that do
/// not compile are not kept.
#[derive(Default)]
struct ProgramCache {
    entries: HashMap<String, CachedProgram>,
    text_bytes: usize,
    uses: u64,
}

struct CachedProgram {
    program: Rc<JqProgram>,
    last_use: u64,
}

impl ProgramCache {
    fn get_or_compile(&mut self, text: &str) -> Result<Rc<JqProgram>, StepError> {
        self.uses += 1;
        if let Some(cached) = self.entries.get_mut(text) {
            cached.last_use = self.uses;
            return Ok(cached.program.clone());
        }
        let program = Rc::new(compile(text).map_err(|message| {
            StepError::non_retryable(format!("the jq program does not compile: {message}"))
        })?);
        if text.len() > PROGRAM_CACHE_TEXT_BYTES {
            return Ok(program);
        }
        while self.entries.len() >= PROGRAM_CACHE_ENTRIES
            || self.text_bytes + text.len() > PROGRAM_CACHE_TEXT_BYTES
        {
            if !self.evict_least_recently_used() {
                break;
            }
        }
        self.text_bytes += text.len();
        self.entries.insert(
            text.to_owned(),
            CachedProgram { program: program.clone(), last_use: self.uses },
        );
        Ok(program)
    }

    fn evict_least_recently_used(&mut self) -> bool {
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, cached)| cached.last_use)
            .map(|(text, _)| text.clone());
        let Some(text) = oldest else { return false };
        self.entries.remove(&text);
        self.text_bytes -= text.len();
        true
    }
}

#[cfg(test)]
fn run_program(program: &str, input: &Value, max_output_bytes: usize) -> Result<Value, StepError> {
    let filter = compile(program).map_err(|message| {
        StepError::non_retryable(format!("the jq program does not compile: {message}"))
    })?;
    run_filter(&filter, input, max_output_bytes)
}

fn run_filter(
    filter: &JqProgram,
    input: &Value,
    max_output_bytes: usize,
) -> Result<Value, StepError> {
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
    fn the_program_cache_keeps_the_most_recently_used_programs() {
        let mut cache = ProgramCache::default();
        let first = cache.get_or_compile(".a").expect("compiles");
        assert!(Rc::ptr_eq(&first, &cache.get_or_compile(".a").expect("cached")));
        for number in 0..PROGRAM_CACHE_ENTRIES {
            cache.get_or_compile(&format!(".a + {number}")).expect("compiles");
            // `.a` stays the most recently used until the last round.
            if number + 2 < PROGRAM_CACHE_ENTRIES {
                cache.get_or_compile(".a").expect("cached");
            }
        }
        assert_eq!(cache.entries.len(), PROGRAM_CACHE_ENTRIES);
        assert!(cache.entries.contains_key(".a"), "the recently used program was dropped");
        assert!(!cache.entries.contains_key(".a + 0"), "the least recently used one stayed");
        assert_eq!(cache.text_bytes, cache.entries.keys().map(String::len).sum::<usize>());

        // Programs that do not compile are not kept; long ones bound the cache by their text.
        assert!(cache.get_or_compile(".a | | .b").is_err());
        assert!(!cache.entries.contains_key(".a | | .b"));
        let long = format!("{}.", " ".repeat(PROGRAM_CACHE_TEXT_BYTES / 2));
        cache.get_or_compile(&long).expect("compiles");
        let longer = format!("{} .", " ".repeat(PROGRAM_CACHE_TEXT_BYTES / 2));
        cache.get_or_compile(&longer).expect("compiles");
        assert!(cache.text_bytes <= PROGRAM_CACHE_TEXT_BYTES, "{}", cache.text_bytes);
        assert!(cache.entries.contains_key(&longer) && !cache.entries.contains_key(&long));
    }

    #[test]
    fn halt_ends_the_program_and_halt_error_fails_it() {
        assert_eq!(run_now("1, halt, 2", json!(null)), Ok(json!(1)));
        let error = run_now("\"bad\" | halt_error(3)", json!(null)).unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable);
    }
}
