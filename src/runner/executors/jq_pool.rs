//! The warm pool of jq workers DATA steps run in: long-lived `turbocat jq-worker` processes,
//! each in the sandbox CODE steps get (`sandbox`: namespaces, no network, an empty work
//! directory of its own, Landlock, `no_new_privs`, no capabilities, a cleared environment),
//! each serving one step after another over its stdin and stdout (one line of JSON per request
//! and per reply) and keeping the programs it compiled (`data`).
//!
//! Which worker serves a step: one started for the same owner (the agent's `ownerId`) and the
//! same memory limit, so the address space a worker may use (RLIMIT_DATA: the limit, the
//! program's stack and the worker's own needs) is exactly the step's, and no program shares a
//! process, nor its cache of compiled programs, with another user's. The CPU limit is not part
//! of the key: before each request the worker lowers its own RLIMIT_CPU to the CPU time it
//! used so far plus the step's budget, so a spinning program ends by SIGXCPU as it always did
//! (the hard limit, set by the runner at start, bounds the worker's whole life, and a worker
//! whose remaining life is shorter than a step's budget is retired instead of used). Nothing
//! of a request outlives its reply in the worker but the compiled program: jaq has no
//! globals, no file access and no environment here, and the `debug`/`stderr` messages are
//! taken per request.
//!
//! The pool starts workers when a step needs one and none is idle (so there are at most as
//! many as the runner runs DATA steps at once), keeps at most `max_idle_workers` idle ones,
//! ends those idle for `idle_timeout` (a thread of the pool, started while any is idle), and
//! retires a worker after `max_requests_per_worker` steps. A step's deadline and a cancel
//! kill its worker's process group (the sandbox with it); a worker that dies (stack overflow,
//! memory, CPU) takes only its step, which fails as a one-shot worker's did; the next step
//! gets a new worker. A worker's directory is removed once its sandbox stands (after its
//! first reply), so a runner that is killed leaves none behind; its workers end when their
//! stdin closes. The pool uses no async runtime of its own (the pipes are blocking ones, read
//! on tokio's blocking threads), so one pool serves every runtime of the process.
//! May call: the operating system (processes, signals, files), `sandbox`, `code`, `data`,
//! `crate::text`.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::code::{ChildLimits, MemoryLimit, child_command};
use super::data::{
    PROGRAM_STACK_BYTES, WORKER_OVERHEAD_BYTES, WORKER_SUBCOMMAND, WorkerReply, WorkerRequest,
    helper_executable, worker_failure,
};
use super::sandbox::{self, SandboxSpec, StepDirectory};
use super::{Limits, StepError, StepErrorKind};
use crate::text::truncate_text;

/// The CPU time a worker may use over its whole life (its hard RLIMIT_CPU): a week, more than
/// any agent's budget.
const WORKER_LIFETIME_CPU_SECONDS: u64 = 7 * 24 * 3600;
/// Idle workers a runner keeps at most, whatever its capacity: an idle worker holds about
/// 20 MiB of memory (and its cache), its sandbox's helper and init a few more; busy workers
/// are as many as DATA steps run at once.
pub const MAX_KEPT_IDLE_WORKERS: usize = 16;
/// Stderr of a dead worker kept for the failure message.
const STDERR_KEPT_BYTES: u64 = 64 * 1024;
/// How long the end of a killed worker may take before the step stops waiting for it.
const KILL_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a pool keeps its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JqPoolSettings {
    /// Idle workers kept at most (the oldest idle one ends first); a runner raises it to its
    /// capacity (`JqPool::keep_idle_at_least`).
    pub max_idle_workers: usize,
    /// A worker idle this long ends.
    pub idle_timeout: Duration,
    /// A worker ends after serving this many steps.
    pub max_requests_per_worker: u32,
}

impl Default for JqPoolSettings {
    fn default() -> Self {
        Self {
            max_idle_workers: 1,
            idle_timeout: Duration::from_secs(30),
            max_requests_per_worker: 1000,
        }
    }
}

/// What a pool did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JqPoolStatistics {
    /// Worker processes started.
    pub workers_started: u64,
    /// Steps that got a reply from their worker (a result or a jq error).
    pub requests_served: u64,
    /// Workers idle now.
    pub workers_idle: usize,
}

/// One DATA step for the pool.
#[derive(Debug, Clone)]
pub struct JqJob {
    /// The agent's owner: workers serve one owner only.
    pub owner_id: String,
    pub program: String,
    pub input: Value,
    pub limits: Limits,
}

/// How a step went: its output or failure, and the program's `debug`/`stderr` messages.
#[derive(Debug, Clone, PartialEq)]
pub struct JqFinished {
    /// A failure of kind `TimedOut` means the deadline passed.
    pub output: Result<Value, StepError>,
    pub logs: Vec<String>,
}

impl JqFinished {
    fn failed(error: StepError) -> Self {
        Self { output: Err(error), logs: Vec::new() }
    }
}

/// Warm jq workers, by owner and memory limit.
pub struct JqPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: JqPoolSettings,
    max_idle_workers: AtomicUsize,
    closed: AtomicBool,
    idle: Mutex<IdleWorkers>,
    workers_started: AtomicU64,
    requests_served: AtomicU64,
}

#[derive(Default)]
struct IdleWorkers {
    /// The longest idle first.
    workers: Vec<Worker>,
    reaper_running: bool,
}

/// Which steps a worker may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WorkerKey {
    owner_id: String,
    /// The worker's RLIMIT_DATA.
    memory_bytes: u64,
}

impl WorkerKey {
    fn of(job: &JqJob) -> Self {
        Self {
            owner_id: job.owner_id.clone(),
            memory_bytes: job
                .limits
                .memory_mb
                .saturating_mul(1024 * 1024)
                .saturating_add(PROGRAM_STACK_BYTES as u64 + WORKER_OVERHEAD_BYTES),
        }
    }
}

impl JqPool {
    pub fn new(settings: JqPoolSettings) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                settings,
                max_idle_workers: AtomicUsize::new(settings.max_idle_workers),
                closed: AtomicBool::new(false),
                idle: Mutex::new(IdleWorkers::default()),
                workers_started: AtomicU64::new(0),
                requests_served: AtomicU64::new(0),
            }),
        }
    }

    /// Keeps up to `count` idle workers, at most [`MAX_KEPT_IDLE_WORKERS`] (never fewer than
    /// before): a runner calls it with its capacity.
    pub fn keep_idle_at_least(&self, count: usize) {
        let count = count.min(MAX_KEPT_IDLE_WORKERS);
        self.inner.max_idle_workers.fetch_max(count, Ordering::SeqCst);
    }

    /// Ends the idle workers and every worker that finishes a step from now on (blocking: a
    /// few milliseconds per worker). `turbocat runner` and `turbocat dev` call it when they
    /// stop. (Workers end by themselves too when the process ends: their stdin closes.)
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let retired = std::mem::take(&mut self.inner.lock_idle().workers);
        for worker in retired {
            worker.retire();
        }
    }

    pub fn statistics(&self) -> JqPoolStatistics {
        JqPoolStatistics {
            workers_started: self.inner.workers_started.load(Ordering::SeqCst),
            requests_served: self.inner.requests_served.load(Ordering::SeqCst),
            workers_idle: self.inner.lock_idle().workers.len(),
        }
    }

    /// Runs `job` in a worker of the pool (started when none is idle) until it ends, the
    /// deadline passes or `cancel` fires; the last two kill the worker.
    pub async fn run(
        &self,
        job: &JqJob,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> JqFinished {
        let limits = job.limits;
        let budget = limits.cpu_seconds.clamp(1, WORKER_LIFETIME_CPU_SECONDS - 1);
        let request = WorkerRequest {
            program: &job.program,
            input: &job.input,
            max_output_bytes: limits.max_output_bytes,
            cpu_seconds: budget,
        };
        let mut request_line = match serde_json::to_vec(&request) {
            Ok(bytes) => bytes,
            Err(error) => {
                return JqFinished::failed(StepError::non_retryable(format!(
                    "cannot encode the input: {error}"
                )));
            }
        };
        request_line.push(b'\n');
        let key = WorkerKey::of(job);
        let mut worker = match self.inner.take_idle(&key, budget) {
            Some(worker) => worker,
            None => match self.start_worker(key).await {
                Ok(worker) => worker,
                Err(error) => return JqFinished::failed(error),
            },
        };
        worker.cpu_seconds_granted += budget + 1;
        // The reply holds the output (capped by the worker) and at most 1,000 short log lines.
        let reply_limit = limits.max_output_bytes.saturating_mul(2) + (4 << 20);
        let mut killer = GroupKiller { leader: Some(worker.leader) };
        let mut exchange = tokio::task::spawn_blocking(move || {
            let outcome = worker.exchange(&request_line, reply_limit);
            (worker, outcome)
        });
        let ending = tokio::select! {
            biased;
            joined = &mut exchange => Ending::Joined(joined),
            () = tokio::time::sleep_until(deadline) => {
                Ending::Stopped(StepError::new(StepErrorKind::TimedOut, "the deadline passed"))
            }
            () = cancel.cancelled() => Ending::Stopped(StepError::cancelled()),
        };
        let joined = match ending {
            Ending::Joined(joined) => joined,
            Ending::Stopped(error) => return stop(killer, exchange, error).await,
        };
        // The exchange is over: its worker is alive and waiting, or dead and reaped.
        killer.disarm();
        match joined {
            Ok((worker, outcome)) => self.finish(worker, outcome, &limits),
            Err(error) => JqFinished::failed(StepError::retryable(format!(
                "the jq worker's thread failed: {error}"
            ))),
        }
    }

    /// What a step's exchange gave: the reply (its worker goes back to the pool), or why its
    /// worker died.
    fn finish(&self, worker: Worker, outcome: Exchange, limits: &Limits) -> JqFinished {
        match outcome {
            Exchange::Replied(reply_bytes) => {
                let reply: WorkerReply = match serde_json::from_slice(&reply_bytes) {
                    Ok(reply) => reply,
                    Err(error) => {
                        retire_in_background(worker);
                        return JqFinished::failed(StepError::retryable(format!(
                            "the jq worker's reply is unreadable: {error}"
                        )));
                    }
                };
                self.inner.requests_served.fetch_add(1, Ordering::SeqCst);
                self.inner.give_back(worker);
                let output = match reply.error {
                    Some(error) => Err(error.into_step_error()),
                    None => Ok(reply.output.unwrap_or(Value::Null)),
                };
                JqFinished { output, logs: reply.logs }
            }
            Exchange::Died(death) => JqFinished::failed(match death.status {
                Some(status) => worker_failure(status, &death.stderr, limits),
                None => StepError::retryable(format!(
                    "the jq worker ended abnormally: {}",
                    truncate_text(death.stderr.trim(), 500)
                )),
            }),
        }
    }

    /// Starts a worker in the sandbox (or, where the operator allowed it, without one) in a
    /// directory of its own, under the memory limit of `key`.
    async fn start_worker(&self, key: WorkerKey) -> Result<Worker, StepError> {
        let sandboxed = sandbox::require().await?;
        let executable = helper_executable()?;
        // The programs read nothing but their requests; the directory stays empty.
        let directory = StepDirectory::create().map_err(|error| {
            StepError::retryable(format!("cannot create the work directory: {error}"))
        })?;
        let spec = SandboxSpec {
            program: executable.clone(),
            arguments: vec![WORKER_SUBCOMMAND.into()],
            step_directory: directory.path.clone(),
            read_only_paths: sandbox::read_only_paths(&[executable]),
            network: sandbox::SandboxNetwork::Off,
            limits: ChildLimits {
                cpu_seconds: WORKER_LIFETIME_CPU_SECONDS,
                memory: MemoryLimit::Data(key.memory_bytes),
            },
        };
        // The allocator (mimalloc) takes address space in small steps: with its default
        // (1 GiB arenas) a worker under a small RLIMIT_DATA (64 MiB for the program) ended
        // with "the jq thread failed" instead of the program's out-of-memory failure
        // (`tests/runner_executors`, `runaway_programs_fail_alone…`).
        let environment = [
            ("LANG", std::ffi::OsString::from("C.UTF-8")),
            ("MIMALLOC_ARENA_RESERVE", std::ffi::OsString::from("4MiB")),
        ];
        let mut command = child_command(&spec, &environment, sandboxed)?;
        let mut child = command.as_std_mut().spawn().map_err(|error| {
            StepError::retryable(format!("cannot start the jq worker: {error}"))
        })?;
        let leader = Pid::from_raw(child.id() as i32);
        let (Some(stdin), Some(stdout), Some(stderr), Some(leader)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take(), leader)
        else {
            if let Some(leader) = leader {
                kill_group(leader);
            }
            let _ = child.wait();
            return Err(StepError::retryable("the pipes of the jq worker are missing"));
        };
        self.inner.workers_started.fetch_add(1, Ordering::SeqCst);
        Ok(Worker {
            key,
            child,
            leader,
            stdin,
            stdout: BufReader::new(stdout),
            stderr,
            directory: Some(directory),
            requests: 0,
            cpu_seconds_granted: 0,
            idle_since: std::time::Instant::now(),
            reaped: false,
        })
    }
}

/// How waiting for a worker's reply ended.
enum Ending {
    Joined(Result<(Worker, Exchange), tokio::task::JoinError>),
    Stopped(StepError),
}

/// Kills the worker of a step that is stopped, waits (a little) until it is gone, and fails
/// the step with `error`.
async fn stop(
    mut killer: GroupKiller,
    exchange: tokio::task::JoinHandle<(Worker, Exchange)>,
    error: StepError,
) -> JqFinished {
    killer.kill();
    // Killed once is enough: the exchange sees its pipes close, reaps the worker and removes
    // its directory, whenever it returns.
    killer.disarm();
    let _ = tokio::time::timeout(KILL_DRAIN_TIMEOUT, exchange).await;
    JqFinished::failed(error)
}

impl PoolInner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, IdleWorkers> {
        // A panic while holding the lock leaves a consistent list (pushes and removals only).
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The most recently idle worker for `key` that may still spend `budget` CPU seconds.
    fn take_idle(&self, key: &WorkerKey, budget: u64) -> Option<Worker> {
        let mut idle = self.lock_idle();
        let position = idle.workers.iter().rposition(|worker| &worker.key == key)?;
        let worker = idle.workers.remove(position);
        drop(idle);
        if worker.cpu_seconds_granted + budget + 1 > WORKER_LIFETIME_CPU_SECONDS {
            retire_in_background(worker);
            return None;
        }
        Some(worker)
    }

    /// A worker that served its step: kept idle, or retired when it served enough steps or
    /// too many are idle (or the pool is closed).
    fn give_back(self: &Arc<Self>, mut worker: Worker) {
        if worker.requests >= self.settings.max_requests_per_worker
            || self.closed.load(Ordering::SeqCst)
        {
            retire_in_background(worker);
            return;
        }
        worker.idle_since = std::time::Instant::now();
        let max_idle = self.max_idle_workers.load(Ordering::SeqCst);
        let mut idle = self.lock_idle();
        idle.workers.push(worker);
        let surplus = idle.workers.len().saturating_sub(max_idle);
        let retired: Vec<Worker> = idle.workers.drain(..surplus).collect();
        let start_reaper = !idle.reaper_running && !idle.workers.is_empty();
        if start_reaper {
            idle.reaper_running = true;
        }
        drop(idle);
        for worker in retired {
            retire_in_background(worker);
        }
        if start_reaper {
            let pool = Arc::downgrade(self);
            let started = std::thread::Builder::new()
                .name("turbocat-jq-reaper".to_owned())
                .stack_size(256 * 1024)
                .spawn(move || reap_idle_workers(&pool));
            if started.is_err() {
                self.lock_idle().reaper_running = false;
            }
        }
    }
}

/// Ends the workers idle past the timeout, until none is idle (or the pool is gone).
fn reap_idle_workers(pool: &Weak<PoolInner>) {
    loop {
        let Some(inner) = pool.upgrade() else { return };
        let timeout = inner.settings.idle_timeout;
        let pause = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        drop(inner);
        std::thread::sleep(pause);
        let Some(inner) = pool.upgrade() else { return };
        let mut idle = inner.lock_idle();
        let now = std::time::Instant::now();
        let expired = idle
            .workers
            .iter()
            .take_while(|worker| now.duration_since(worker.idle_since) >= timeout)
            .count();
        let retired: Vec<Worker> = idle.workers.drain(..expired).collect();
        let done = idle.workers.is_empty();
        if done {
            idle.reaper_running = false;
        }
        drop(idle);
        drop(inner);
        for worker in retired {
            worker.retire();
        }
        if done {
            return;
        }
    }
}

/// Retires `worker` on a thread of its own (reaping may wait a moment). Should no thread
/// start, the closure and the worker in it are dropped here: `Worker::drop` ends it.
fn retire_in_background(worker: Worker) {
    let _ = std::thread::Builder::new()
        .name("turbocat-jq-retire".to_owned())
        .stack_size(256 * 1024)
        .spawn(move || worker.retire());
}

/// One worker process (the sandbox's helper leads its process group) and its pipes.
struct Worker {
    key: WorkerKey,
    child: Child,
    leader: Pid,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: ChildStderr,
    directory: Option<StepDirectory>,
    /// Steps served.
    requests: u32,
    /// The CPU seconds granted to its steps so far (each may use one more than its budget).
    cpu_seconds_granted: u64,
    idle_since: std::time::Instant,
    reaped: bool,
}

/// How one request went.
enum Exchange {
    /// The reply line (with its line break).
    Replied(Vec<u8>),
    /// The worker is gone (it died, was killed, or its reply was too long and it was killed).
    Died(Death),
}

struct Death {
    /// The sandbox helper's exit status (the program's, mirrored), when it could be read.
    status: Option<ExitStatus>,
    stderr: String,
}

impl Worker {
    /// Sends one request and reads its reply (blocking). When the worker dies or is killed
    /// meanwhile, it is reaped here and its directory removed.
    fn exchange(&mut self, request_line: &[u8], reply_limit: usize) -> Exchange {
        let written = self.stdin.write_all(request_line).and_then(|()| self.stdin.flush());
        if written.is_ok() {
            let mut reply = Vec::new();
            let read =
                (&mut self.stdout).take(reply_limit as u64 + 1).read_until(b'\n', &mut reply);
            if read.is_ok() && reply.last() == Some(&b'\n') {
                self.requests += 1;
                self.remove_directory_once_inside();
                return Exchange::Replied(reply);
            }
        }
        // End of file (every process of the sandbox holds the pipes, so all of them ended),
        // a broken pipe (likewise), or a reply past the limit (the worker still writes).
        Exchange::Died(self.end())
    }

    /// After the first reply the sandbox stands (its root is built and pivoted into, the work
    /// directory bound in, the status file open): the directory is removed from the runner's
    /// side at once, so that nothing of the worker stays behind should the runner be killed
    /// outright. Where it cannot be removed yet, it is removed when the worker ends.
    fn remove_directory_once_inside(&mut self) {
        let Some(directory) = &self.directory else { return };
        if std::fs::remove_dir_all(&directory.path).is_ok()
            && let Some(directory) = self.directory.take()
        {
            directory.forget();
        }
    }

    /// Kills the process group (the leader, not reaped yet, keeps its id ours), reads what
    /// stderr holds, reaps the leader and removes the directory.
    fn end(&mut self) -> Death {
        if self.reaped {
            return Death { status: None, stderr: String::new() };
        }
        kill_group(self.leader);
        let mut stderr_bytes = Vec::new();
        let _ = (&mut self.stderr).take(STDERR_KEPT_BYTES).read_to_end(&mut stderr_bytes);
        let _ = std::io::copy(&mut self.stderr, &mut std::io::sink());
        let status = self.child.wait().ok();
        self.reaped = true;
        if let Some(directory) = self.directory.take() {
            directory.remove_blocking();
        }
        Death { status, stderr: String::from_utf8_lossy(&stderr_bytes).into_owned() }
    }

    /// Ends a healthy worker (blocking; for a thread that may wait).
    fn retire(mut self) {
        self.end();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if !self.reaped {
            kill_group(self.leader);
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

fn kill_group(leader: Pid) {
    // Fails with ESRCH when every member is gone already.
    let _ = rustix::process::kill_process_group(leader, Signal::KILL);
}

/// Kills the process group of a worker whose step is stopped, or dropped while its exchange
/// runs; disarmed once the exchange returned (the worker is then reaped or alive and idle).
struct GroupKiller {
    leader: Option<Pid>,
}

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(leader) = self.leader {
            kill_group(leader);
        }
    }

    fn disarm(&mut self) {
        self.leader = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}
