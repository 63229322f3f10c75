//! CODE agents: a python3 or node snippet run in a child process with limits.
//!
//! The snippet convention: the snippet reads the step input as JSON on stdin and writes its
//! output as JSON on stdout. The output is the whole of stdout when it parses as JSON, else
//! its last non-empty line (so earlier prints are just log lines); empty stdout is `null`.
//! Exiting non-zero (or an uncaught exception) fails the attempt and lets the server retry it;
//! raising `NonRetryableError("why")` (a built-in the runner provides in both languages; any
//! exception class of that name works too) or exiting with status 87 fails it without retry.
//! Everything the snippet prints, stdout and stderr, arrives as log lines while it runs.
//!
//! Limits: CPU seconds (RLIMIT_CPU), memory (RLIMIT_AS; node also gets
//! `--max-old-space-size` of the same size and 1 GiB more address space, which V8 reserves
//! up front), the wall clock, and stdout of at most `maxOutputBytes`. The child runs in the
//! sandbox (`sandbox`: namespaces, a read-only root, Landlock, no capabilities; no network
//! by default, HTTP(S) through the runner's egress proxy under the SSRF guard with
//! `network: ON` (`egress`), the runner's network with `allowPrivateNetwork` too), in a fresh
//! directory (also `HOME` and `TMPDIR`) removed afterwards, with an empty environment except
//! `PATH`, `HOME`, `TMPDIR` and `LANG` (and the proxy variables with the network ON). The sandbox's helper leads a process group killed whole when the attempt ends,
//! and everything in the sandbox dies with it (also what left the group with `setsid`).
//! Where the operator allowed unsandboxed code, the interpreter itself leads that group.
//! Interpreters are looked up once on the runner's `PATH` (`python3`, `node`).
//! `ChildPreparation` is the one place with `unsafe`: what a child does between fork and exec.
//! May call: the operating system (processes, rlimits, namespaces, signals, files).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, Resource, Rlimit, Signal};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::{OnceCell, oneshot};

use super::egress::{self, EgressProxy};
use super::sandbox::{self, SandboxNetwork, SandboxSpec, StepDirectory};
use super::{LogSink, LogStream, RunContext, StepError, StepErrorKind};
use crate::proto::v1 as pb;
use crate::text::truncate_text;

/// A snippet that exits with this status fails without retry (what `NonRetryableError` does).
pub const NON_RETRYABLE_EXIT_STATUS: i32 = 87;
/// The wrappers exit with this status when the interpreter ran out of memory.
pub const MEMORY_EXHAUSTED_EXIT_STATUS: i32 = 88;
/// Address space node gets on top of the memory limit: V8 reserves ~700 MiB at start.
const NODE_ADDRESS_SPACE_OVERHEAD_MB: u64 = 1024;
/// Stderr logged at most; the rest is read and dropped.
const STDERR_LOG_LIMIT_BYTES: usize = 1 << 20;
/// The end of stderr kept for the failure message.
const STDERR_TAIL_CHARS: usize = 2000;
/// How long the pipes may stay open after the process group was killed.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long finding an interpreter may take.
const INTERPRETER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the snippet (`sys.argv[1]`) as `__main__`, provides `NonRetryableError`, and turns it
/// and `MemoryError` into the runner's exit statuses.
const PYTHON_WRAPPER: &str = r#"
import builtins, runpy, sys, traceback

class NonRetryableError(Exception):
    """Raise it to fail the step at once, without retries."""

builtins.NonRetryableError = NonRetryableError
script = sys.argv[1]
sys.argv = [script]
try:
    runpy.run_path(script, run_name="__main__")
except MemoryError:
    sys.stderr.write("MemoryError: the memory limit was exceeded\n")
    sys.stderr.flush()
    sys.exit(88)
except SystemExit:
    raise
except BaseException as error:
    sys.stdout.flush()
    if type(error).__name__ == "NonRetryableError":
        sys.stderr.write("NonRetryableError: %s\n" % (error,))
        sys.stderr.flush()
        sys.exit(87)
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename != script:
        frames = frames.tb_next
    traceback.print_exception(type(error), error, frames or error.__traceback__)
    sys.stderr.flush()
    sys.exit(1)
"#;

/// Requires the snippet (`process.argv[1]`), provides `NonRetryableError`, and turns it and
/// failed allocations into the runner's exit statuses, also for asynchronous errors.
const NODE_WRAPPER: &str = r#"
'use strict';
class NonRetryableError extends Error {
  constructor(message) { super(message); this.name = 'NonRetryableError'; }
}
globalThis.NonRetryableError = NonRetryableError;
function fail(error) {
  const name = error && (error.name === 'NonRetryableError' ? error.name
    : (error.constructor && error.constructor.name));
  if (name === 'NonRetryableError') {
    process.stderr.write('NonRetryableError: ' + error.message + '\n');
    process.exit(87);
  }
  if (error instanceof RangeError && /allocation failed/i.test(error.message)) {
    process.stderr.write('MemoryError: ' + error.message + '\n');
    process.exit(88);
  }
  process.stderr.write(((error && error.stack) || String(error)) + '\n');
  process.exit(1);
}
process.on('uncaughtException', fail);
try {
  require(require('path').resolve(process.argv[1]));
} catch (error) {
  fail(error);
}
"#;

/// Lines of stderr that mean the interpreter ran out of memory.
const MEMORY_EXHAUSTED_MARKERS: [&str; 4] = [
    "MemoryError",
    "JavaScript heap out of memory",
    "Fatal process OOM",
    "Array buffer allocation failed",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Language {
    Python,
    JavaScript,
}

impl Language {
    fn from_proto(language: i32) -> Result<Self, StepError> {
        match pb::CodeLanguage::try_from(language).unwrap_or_default() {
            pb::CodeLanguage::Python => Ok(Self::Python),
            pb::CodeLanguage::Javascript => Ok(Self::JavaScript),
            pb::CodeLanguage::Unspecified => {
                Err(StepError::invalid("the CODE agent has no language"))
            }
        }
    }

    fn script_name(self) -> &'static str {
        match self {
            Self::Python => "main.py",
            Self::JavaScript => "main.js",
        }
    }
}

static PYTHON_EXECUTABLE: OnceCell<PathBuf> = OnceCell::const_new();
static NODE_EXECUTABLE: OnceCell<PathBuf> = OnceCell::const_new();

/// The real interpreter binary (behind shims such as pyenv's, which need an environment the
/// child does not get), found once on the runner's `PATH`.
async fn interpreter(language: Language) -> Result<PathBuf, StepError> {
    let (cell, program, arguments): (_, _, &[&str]) = match language {
        Language::Python => {
            (&PYTHON_EXECUTABLE, "python3", &["-c", "import sys; print(sys.executable)"])
        }
        Language::JavaScript => (&NODE_EXECUTABLE, "node", &["-p", "process.execPath"]),
    };
    cell.get_or_try_init(|| find_executable(program, arguments)).await.cloned().map_err(|message| {
        StepError::invalid(format!("this runner cannot run {program}: {message}"))
    })
}

async fn find_executable(program: &str, arguments: &[&str]) -> Result<PathBuf, String> {
    let mut command = Command::new(program);
    // Only what finding an interpreter needs (pyenv's shims read their own variables), never
    // the runner's secrets.
    command.env_clear();
    for name in ["PATH", "HOME", "PYENV_ROOT", "PYENV_VERSION"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.args(arguments).stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(INTERPRETER_LOOKUP_TIMEOUT, command.output())
        .await
        .map_err(|_| "it did not answer in time".to_owned())?
        .map_err(|error| format!("not found on PATH ({error})"))?;
    if !output.status.success() {
        return Err(format!("it exited with {}", output.status));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !path.is_absolute() || !path.exists() {
        return Err(format!("it reported no usable executable ({})", path.display()));
    }
    Ok(path)
}

/// The child's process group, killed whole on `kill` and on drop.
/// The process group of a child (its leader), killed whole when dropped.
pub(super) struct ProcessGroup {
    leader: Option<Pid>,
}

impl ProcessGroup {
    pub(super) fn of(child: &tokio::process::Child) -> Self {
        Self { leader: child.id().and_then(|id| Pid::from_raw(id as i32)) }
    }

    pub(super) fn kill(&mut self) {
        if let Some(leader) = self.leader {
            // Fails with ESRCH when every member is gone already.
            let _ = rustix::process::kill_process_group(leader, Signal::KILL);
        }
    }

    /// After the leader was reaped and the pipes drained: its id may be reused from now on.
    pub(super) fn disarm(&mut self) {
        self.leader = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a child does to itself between fork and exec: set its rlimits (the program itself),
/// or enter new namespaces (the sandbox's helper, see `sandbox`).
#[derive(Debug)]
pub(super) enum ChildPreparation {
    Limits(ChildLimits),
    Namespaces(NamespaceEntry),
}

impl ChildPreparation {
    /// Has `command`'s child do this to itself between fork and exec.
    pub(super) fn install(self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        #[expect(unsafe_code, reason = "rlimits and namespaces must be set between fork and exec")]
        // SAFETY: the closure runs in the forked child before exec. It only makes raw system
        // calls through rustix (setrlimit, unshare, open, write, close: async-signal-safe), on
        // data prepared before the fork (the maps' bytes, static paths); it does not allocate,
        // lock or touch state shared with the parent's other threads. `unshare` never gets
        // CLONE_FILES, so no descriptor table is split under a thread.
        unsafe {
            command.pre_exec(move || match &self {
                Self::Limits(limits) => limits.apply(),
                Self::Namespaces(entry) => {
                    rustix::thread::unshare_unsafe(entry.flags).map_err(os_error)?;
                    entry.write_maps()
                }
            });
        }
    }
}

fn os_error(error: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(error.raw_os_error())
}

/// New namespaces for the sandbox's helper: user (only the runner's uid and gid mapped, to
/// root inside), mount, PID (for its children), IPC, UTS, cgroup and, with the network off,
/// network. Prepared before the fork.
#[derive(Debug)]
pub(super) struct NamespaceEntry {
    flags: rustix::thread::UnshareFlags,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl NamespaceEntry {
    pub(super) fn new(network: bool) -> Self {
        use rustix::thread::UnshareFlags;
        let mut flags = UnshareFlags::NEWUSER
            | UnshareFlags::NEWNS
            | UnshareFlags::NEWPID
            | UnshareFlags::NEWIPC
            | UnshareFlags::NEWUTS
            | UnshareFlags::NEWCGROUP;
        if !network {
            flags |= UnshareFlags::NEWNET;
        }
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        Self {
            flags,
            uid_map: format!("0 {uid} 1\n").into_bytes(),
            gid_map: format!("0 {gid} 1\n").into_bytes(),
        }
    }

    /// Runs in the forked child, after `unshare`: maps the runner's ids (setgroups must be
    /// denied first for the gid map). Raw system calls only.
    fn write_maps(&self) -> std::io::Result<()> {
        let write = |path: &std::ffi::CStr, contents: &[u8]| -> std::io::Result<()> {
            let file =
                rustix::fs::open(path, rustix::fs::OFlags::WRONLY, rustix::fs::Mode::empty())
                    .map_err(os_error)?;
            rustix::io::write(&file, contents).map_err(os_error)?;
            Ok(())
        };
        write(c"/proc/self/setgroups", b"deny")?;
        write(c"/proc/self/uid_map", &self.uid_map)?;
        write(c"/proc/self/gid_map", &self.gid_map)
    }
}

/// The rlimits of a program: CPU seconds, and memory either as address space (interpreters)
/// or as data segment (the jq worker, whose executable maps far more address space than it
/// uses).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct ChildLimits {
    pub cpu_seconds: u64,
    pub memory: MemoryLimit,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) enum MemoryLimit {
    AddressSpace(u64),
    Data(u64),
}

impl ChildLimits {
    /// Runs in the forked child: only async-signal-safe calls (rustix's setrlimit is the raw
    /// system call; nothing here allocates).
    fn apply(self) -> std::io::Result<()> {
        let set = |resource: Resource, soft: u64, hard: u64| {
            rustix::process::setrlimit(
                resource,
                Rlimit { current: Some(soft), maximum: Some(hard) },
            )
            .map_err(os_error)
        };
        // SIGXCPU at the soft limit, SIGKILL a second later if it is caught.
        set(Resource::Cpu, self.cpu_seconds, self.cpu_seconds + 1)?;
        match self.memory {
            MemoryLimit::AddressSpace(bytes) => set(Resource::As, bytes, bytes)?,
            MemoryLimit::Data(bytes) => set(Resource::Data, bytes, bytes)?,
        }
        set(Resource::Core, 0, 0)
    }
}

/// What stdout gave.
struct StdoutSummary {
    bytes: Vec<u8>,
    exceeded: bool,
}

/// What stderr gave.
#[derive(Default)]
struct StderrSummary {
    tail: String,
    memory_exhausted: bool,
    non_retryable_message: Option<String>,
}

/// How the wait for the child ended.
enum Ending {
    Exited(std::io::Result<ExitStatus>),
    OutputTooLarge,
    TimedOut,
    Cancelled,
}

pub(super) async fn run(
    config: &pb::CodeAgentConfig,
    input: &Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let language = Language::from_proto(config.language)?;
    let network = network_of(config);
    let sandboxed = sandbox::require().await?;
    let executable = interpreter(language).await?;
    let directory = StepDirectory::create().map_err(|error| {
        StepError::retryable(format!("cannot create the work directory: {error}"))
    })?;
    let script = directory.work().join(language.script_name());
    // Lives as long as the snippet: its way out when the network is ON without the opt-in.
    let proxy = match network {
        SandboxNetwork::Proxied if sandboxed => Some(EgressProxy::start(&directory.path)),
        _ => None,
    };
    let outcome = match (tokio::fs::write(&script, &config.source).await, proxy.transpose()) {
        (Err(error), _) => Err(StepError::retryable(format!("cannot write the snippet: {error}"))),
        (_, Err(error)) => {
            Err(StepError::retryable(format!("cannot start the egress proxy: {error}")))
        }
        (Ok(()), Ok(_proxy)) => {
            let program = Program { directory: &directory, executable: &executable, language };
            match build_command(&program, network, sandboxed, context) {
                Ok(command) => run_command(command, input, context).await,
                Err(error) => Err(error),
            }
        }
    };
    directory.remove().await;
    outcome
}

/// The snippet's network: none (OFF); ON, HTTP(S) through the runner's egress proxy under the
/// SSRF guard; ON with `allowPrivateNetwork`, the runner's network (raw TCP to internal
/// services such as databases, which a proxy of HTTP requests cannot carry).
fn network_of(config: &pb::CodeAgentConfig) -> SandboxNetwork {
    match pb::CodeNetwork::try_from(config.network).unwrap_or_default() {
        pb::CodeNetwork::Unspecified | pb::CodeNetwork::Off => SandboxNetwork::Off,
        pb::CodeNetwork::On if config.allow_private_network => SandboxNetwork::Shared,
        pb::CodeNetwork::On => SandboxNetwork::Proxied,
    }
}

fn child_path(executable: &Path) -> String {
    let mut directories = Vec::new();
    if let Some(directory) = executable.parent() {
        directories.push(directory.display().to_string());
    }
    for directory in ["/usr/local/bin", "/usr/bin", "/bin"] {
        if !directories.iter().any(|present| present == directory) {
            directories.push(directory.to_owned());
        }
    }
    directories.join(":")
}

/// The snippet to start.
struct Program<'a> {
    directory: &'a StepDirectory,
    executable: &'a Path,
    language: Language,
}

/// The interpreter's arguments and its address-space limit in MiB.
fn interpreter_arguments(
    language: Language,
    script: &Path,
    memory_mb: u64,
) -> (Vec<OsString>, u64) {
    match language {
        Language::Python => {
            let mut arguments: Vec<OsString> =
                ["-I", "-u", "-B", "-c", PYTHON_WRAPPER].iter().map(OsString::from).collect();
            arguments.push(script.into());
            (arguments, memory_mb)
        }
        Language::JavaScript => (
            vec![
                format!("--max-old-space-size={memory_mb}").into(),
                "-e".into(),
                NODE_WRAPPER.into(),
                script.into(),
            ],
            memory_mb + NODE_ADDRESS_SPACE_OVERHEAD_MB,
        ),
    }
}

/// The command that runs the snippet: through the sandbox, or (where the operator allowed
/// it) directly.
fn build_command(
    program: &Program<'_>,
    network: SandboxNetwork,
    sandboxed: bool,
    context: &RunContext<'_>,
) -> Result<Command, StepError> {
    let work = program.directory.work();
    let script = work.join(program.language.script_name());
    let (arguments, address_space_mb) =
        interpreter_arguments(program.language, &script, context.limits.memory_mb);
    let limits = ChildLimits {
        cpu_seconds: context.limits.cpu_seconds,
        memory: MemoryLimit::AddressSpace(address_space_mb.saturating_mul(1024 * 1024)),
    };
    let mut environment: Vec<(&str, OsString)> = vec![
        ("PATH", child_path(program.executable).into()),
        ("HOME", work.clone().into()),
        ("TMPDIR", work.clone().into()),
        ("LANG", "C.UTF-8".into()),
    ];
    if sandboxed && network == SandboxNetwork::Proxied {
        environment.extend(egress::proxy_environment());
    }
    let spec = SandboxSpec {
        program: program.executable.to_path_buf(),
        arguments,
        step_directory: program.directory.path.clone(),
        read_only_paths: sandbox::read_only_paths(&[program.executable.to_path_buf()]),
        network,
        limits,
    };
    child_command(&spec, &environment, sandboxed)
}

/// The command of a child with piped standard streams: `spec` run through the sandbox, or
/// (where the operator allowed code to run without one) directly in its work directory, with
/// only `environment`, in a process group of its own, under `spec.limits`.
pub(super) fn child_command(
    spec: &SandboxSpec,
    environment: &[(&str, OsString)],
    sandboxed: bool,
) -> Result<Command, StepError> {
    let mut command = if sandboxed {
        sandbox::sandboxed_command(spec, environment)?
    } else {
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.arguments)
            .current_dir(spec.step_directory.join("work"))
            .env_clear()
            .envs(environment.iter().map(|(name, value)| (name, value)))
            .process_group(0);
        ChildPreparation::Limits(spec.limits).install(command.as_std_mut());
        command
    };
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    Ok(command)
}

async fn run_command(
    command: Command,
    input: &Value,
    context: &RunContext<'_>,
) -> Result<Value, StepError> {
    let input_bytes = serde_json::to_vec(input)
        .map_err(|error| StepError::non_retryable(format!("cannot encode the input: {error}")))?;

    let Spawned { mut child, mut group, stdout, stderr, stdin_task } =
        spawn_fed(command, input_bytes, "the interpreter")?;
    let (exceeded_sender, mut exceeded_receiver) = oneshot::channel();
    let stdout_task = tokio::spawn(collect_stdout(
        stdout,
        context.logs.clone(),
        context.limits.max_output_bytes,
        exceeded_sender,
    ));
    let stderr_task = tokio::spawn(collect_stderr(stderr, context.logs.clone()));

    let ending = tokio::select! {
        status = child.wait() => Ending::Exited(status),
        Ok(()) = &mut exceeded_receiver => Ending::OutputTooLarge,
        () = tokio::time::sleep_until(context.deadline) => Ending::TimedOut,
        () = context.cancel.cancelled() => Ending::Cancelled,
    };
    // Whatever happened, nothing of the snippet outlives the attempt.
    group.kill();
    if !matches!(ending, Ending::Exited(_)) {
        let _ = child.wait().await;
    }
    stdin_task.abort();
    let stdout_summary = drain(stdout_task).await;
    let stderr_summary = drain(stderr_task).await;
    group.disarm();

    let status = match ending {
        Ending::Cancelled => return Err(StepError::cancelled()),
        Ending::TimedOut => return Err(context.timed_out()),
        Ending::OutputTooLarge => return Err(output_too_large(context)),
        Ending::Exited(status) => status.map_err(|error| {
            StepError::retryable(format!("cannot wait for the snippet: {error}"))
        })?,
    };
    let stdout_summary =
        stdout_summary.unwrap_or(StdoutSummary { bytes: Vec::new(), exceeded: false });
    if stdout_summary.exceeded {
        return Err(output_too_large(context));
    }
    let stderr_summary = stderr_summary.unwrap_or_default();
    if status.success() {
        return parse_output(&stdout_summary.bytes);
    }
    Err(exit_failure(status, &stderr_summary, context))
}

/// A child started in its own process group, its stdin being fed in the background.
pub(super) struct Spawned {
    pub child: tokio::process::Child,
    pub group: ProcessGroup,
    pub stdout: tokio::process::ChildStdout,
    pub stderr: tokio::process::ChildStderr,
    pub stdin_task: tokio::task::JoinHandle<()>,
}

/// Starts `command` (with piped stdin, stdout and stderr) and writes `input` to its stdin,
/// then closes it. `what` names the program in errors.
pub(super) fn spawn_fed(
    mut command: Command,
    input: Vec<u8>,
    what: &str,
) -> Result<Spawned, StepError> {
    let mut child = command
        .spawn()
        .map_err(|error| StepError::retryable(format!("cannot start {what}: {error}")))?;
    let group = ProcessGroup::of(&child);
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(StepError::retryable(format!("the pipes of {what} are missing")));
    };
    // Writing fails with a broken pipe when the program never reads its input: that is fine.
    let stdin_task = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        let _ = stdin.shutdown().await;
    });
    Ok(Spawned { child, group, stdout, stderr, stdin_task })
}

/// Waits for a pipe reader; gives up when something escaped the group and holds the pipe.
pub(super) async fn drain<T>(task: tokio::task::JoinHandle<T>) -> Option<T> {
    let abort = task.abort_handle();
    match tokio::time::timeout(PIPE_DRAIN_TIMEOUT, task).await {
        Ok(Ok(summary)) => Some(summary),
        _ => {
            abort.abort();
            None
        }
    }
}

fn output_too_large(context: &RunContext<'_>) -> StepError {
    StepError::limit_exceeded(format!(
        "the snippet wrote more than the output limit of {} bytes to stdout",
        context.limits.max_output_bytes
    ))
}

fn exit_failure(status: ExitStatus, stderr: &StderrSummary, context: &RunContext<'_>) -> StepError {
    let limits = &context.limits;
    let memory_exceeded = || {
        StepError::limit_exceeded(format!(
            "the snippet exceeded the memory limit of {} MiB",
            limits.memory_mb
        ))
    };
    let detail = if stderr.tail.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", stderr.tail.trim())
    };
    if let Some(signal) = status.signal() {
        if signal == Signal::XCPU.as_raw() {
            return StepError::limit_exceeded(format!(
                "the snippet exceeded the CPU time limit of {} s",
                limits.cpu_seconds
            ));
        }
        if stderr.memory_exhausted {
            return memory_exceeded();
        }
        if signal == Signal::KILL.as_raw() {
            return StepError::limit_exceeded(format!(
                "the snippet was killed (SIGKILL): it probably exceeded its CPU ({} s) or memory \
                 ({} MiB) limit{detail}",
                limits.cpu_seconds, limits.memory_mb
            ));
        }
        return StepError::retryable(format!("the snippet was killed by signal {signal}{detail}"));
    }
    let code = status.code().unwrap_or(-1);
    if code == NON_RETRYABLE_EXIT_STATUS {
        let message = stderr
            .non_retryable_message
            .clone()
            .unwrap_or_else(|| format!("the snippet exited with status {code}{detail}"));
        return StepError::non_retryable(message);
    }
    if code == MEMORY_EXHAUSTED_EXIT_STATUS || stderr.memory_exhausted {
        return memory_exceeded();
    }
    StepError::new(
        StepErrorKind::Retryable,
        format!("the snippet exited with status {code}{detail}"),
    )
}

/// The snippet's output: all of stdout as JSON, else its last non-empty line; `null` when
/// stdout is empty.
fn parse_output(stdout: &[u8]) -> Result<Value, StepError> {
    let text = String::from_utf8_lossy(stdout);
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Value::Null);
    }
    if let Ok(output) = serde_json::from_str(trimmed) {
        return Ok(output);
    }
    let last_line =
        trimmed.lines().map(str::trim).rfind(|line| !line.is_empty()).unwrap_or_default();
    serde_json::from_str(last_line).map_err(|_| {
        StepError::non_retryable(format!(
            "the snippet's output must be JSON on stdout (its last line), but the last line is \
             `{}`",
            truncate_text(last_line, 200)
        ))
    })
}

/// Reads stdout: kept for the output (at most `max_bytes`, past which `exceeded` fires and
/// reading stops) and sent line by line to the log.
async fn collect_stdout(
    mut pipe: impl AsyncRead + Unpin,
    logs: LogSink,
    max_bytes: usize,
    exceeded: oneshot::Sender<()>,
) -> StdoutSummary {
    let mut collected = Vec::new();
    let mut line_start = 0;
    let mut buffer = vec![0u8; 8192];
    loop {
        let read = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if collected.len() + read > max_bytes {
            let _ = exceeded.send(());
            return StdoutSummary { bytes: collected, exceeded: true };
        }
        collected.extend_from_slice(&buffer[..read]);
        while let Some(offset) = collected[line_start..].iter().position(|byte| *byte == b'\n') {
            let line = String::from_utf8_lossy(&collected[line_start..line_start + offset]);
            logs.send(LogStream::Stdout, line.trim_end_matches('\r')).await;
            line_start += offset + 1;
        }
    }
    if line_start < collected.len() {
        logs.send(LogStream::Stdout, &String::from_utf8_lossy(&collected[line_start..])).await;
    }
    StdoutSummary { bytes: collected, exceeded: false }
}

/// Reads stderr: sent line by line to the log (up to [`STDERR_LOG_LIMIT_BYTES`]), its end kept
/// for the failure message, and watched for out-of-memory reports and `NonRetryableError`.
async fn collect_stderr(pipe: impl AsyncRead + Unpin, logs: LogSink) -> StderrSummary {
    let mut reader = tokio::io::BufReader::new(pipe);
    let mut summary = StderrSummary::default();
    let mut tail_lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut tail_chars = 0;
    let mut logged_bytes = 0;
    let mut line_bytes = Vec::new();
    loop {
        line_bytes.clear();
        // Lines longer than the log limit are cut by `take`, the rest read as further lines.
        let read = match (&mut reader)
            .take(STDERR_LOG_LIMIT_BYTES as u64)
            .read_until(b'\n', &mut line_bytes)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let line = String::from_utf8_lossy(&line_bytes);
        let line = line.trim_end_matches(['\n', '\r']);
        if MEMORY_EXHAUSTED_MARKERS.iter().any(|marker| line.contains(marker)) {
            summary.memory_exhausted = true;
        }
        if let Some(message) = line.strip_prefix("NonRetryableError: ") {
            summary.non_retryable_message = Some(truncate_text(message, 2000));
        }
        if logged_bytes < STDERR_LOG_LIMIT_BYTES {
            logged_bytes += read;
            logs.send(LogStream::Stderr, line).await;
            if logged_bytes >= STDERR_LOG_LIMIT_BYTES {
                logs.system("stderr is longer than 1 MiB: the rest is not logged").await;
            }
        }
        let kept = truncate_text(line, STDERR_TAIL_CHARS);
        tail_chars += kept.chars().count() + 1;
        tail_lines.push_back(kept);
        while tail_chars > STDERR_TAIL_CHARS && tail_lines.len() > 1 {
            if let Some(dropped) = tail_lines.pop_front() {
                tail_chars -= dropped.chars().count() + 1;
            }
        }
    }
    summary.tail = Vec::from(tail_lines).join("\n");
    summary
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn output_is_all_of_stdout_or_its_last_line() {
        assert_eq!(parse_output(b"{\"a\": 1}\n"), Ok(json!({"a": 1})));
        assert_eq!(parse_output(b"{\n  \"a\": [1,\n 2]\n}\n"), Ok(json!({"a": [1, 2]})));
        assert_eq!(parse_output(b"working...\nstill working\n[1, 2]\n\n"), Ok(json!([1, 2])));
        assert_eq!(parse_output(b"  \n"), Ok(Value::Null));
        let error = parse_output(b"{'a': 1}\n").unwrap_err();
        assert_eq!(error.kind, StepErrorKind::NonRetryable);
        assert!(error.message.contains("{'a': 1}"), "{}", error.message);
    }

    #[test]
    fn the_child_path_starts_with_the_interpreter_directory() {
        assert_eq!(
            child_path(Path::new("/opt/python/bin/python3")),
            "/opt/python/bin:/usr/local/bin:/usr/bin:/bin"
        );
        assert_eq!(child_path(Path::new("/usr/bin/node")), "/usr/bin:/usr/local/bin:/bin");
    }
}
