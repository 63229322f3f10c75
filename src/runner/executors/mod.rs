//! Executes one attempt of one step: the agent snapshot of a step assignment applied to its
//! resolved input, under the agent's limits, with log lines streamed as they happen.
//! `code` runs python3/node snippets in a limited child process, `api` sends templated HTTP
//! requests, `llm` asks an OpenAI-compatible chat completion, `data` runs a jq program in a
//! warm worker of `jq_pool`; `sandbox` is the box CODE and DATA children run in, `egress` the
//! proxy that is a CODE step's only way out with the network ON.
//! WORKFLOW agents are run by the server, never here.
//! May call: `crate::mapping` (templates), `crate::ssrf`, the generated proto
//! types. Never the store, the queue or the service layer.

pub mod api;
pub mod code;
pub mod data;
pub mod egress;
pub mod jq_pool;
pub mod llm;
pub mod sandbox;

use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proto::v1 as pb;

/// Wall-clock limit when the agent sets none (the store's default too).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Address-space limit of a CODE process when the agent sets none, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// CPU-time limit of a CODE process when the agent sets none, in seconds.
pub const DEFAULT_CPU_SECONDS: u64 = 300;
/// Largest output when the agent sets none, in bytes.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;

/// One attempt to run: what the runner got in a `StepAssignment`, decoded.
#[derive(Debug, Clone)]
pub struct StepWork {
    /// The agent as of the execution: type, config and limits.
    pub agent: pb::Agent,
    /// The step's resolved input.
    pub input: Value,
    /// The attempt must end by then (the assignment's deadline); `None` leaves only the agent's
    /// own timeout.
    pub deadline: Option<Instant>,
    /// The runner's variables LLM agents may use as API keys.
    pub llm_keys: std::sync::Arc<llm::LlmKeyPolicy>,
}

/// The furthest ahead an assignment's deadline is taken to be: a year, as good as none.
const MAX_DEADLINE_AHEAD: Duration = Duration::from_secs(365 * 24 * 3600);

impl StepWork {
    /// The deadline of an assignment (wall-clock time) as a monotonic instant; a deadline in the
    /// past becomes "now", one further ahead than `MAX_DEADLINE_AHEAD` (or past what a clock
    /// holds) that far, and nanoseconds out of range count as none. Never panics, whatever the
    /// timestamp (found while writing the runner_protocol fuzz target: a deadline near the end
    /// of time with 2 s of nanoseconds overflowed the clock).
    pub fn deadline_from_timestamp(deadline: &prost_types::Timestamp) -> Instant {
        let now = Instant::now();
        let seconds = u64::try_from(deadline.seconds).unwrap_or(0);
        let nanos =
            u32::try_from(deadline.nanos).ok().filter(|nanos| *nanos < 1_000_000_000).unwrap_or(0);
        let remaining = match SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos)) {
            Some(wall) => wall.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
            None => MAX_DEADLINE_AHEAD,
        };
        now.checked_add(remaining.min(MAX_DEADLINE_AHEAD)).unwrap_or(now)
    }
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The CODE process's standard output.
    Stdout,
    /// The CODE process's standard error.
    Stderr,
    /// The runner, about the step (what it sends, what it got back).
    System,
}

impl LogStream {
    /// The proto source of a line from this stream.
    pub fn source(self) -> pb::LogSource {
        match self {
            Self::Stdout => pb::LogSource::Stdout,
            Self::Stderr => pb::LogSource::Stderr,
            Self::System => pb::LogSource::Runner,
        }
    }

    /// The proto level of a line from this stream.
    pub fn level(self) -> pb::LogLevel {
        match self {
            Self::Stdout | Self::System => pb::LogLevel::Info,
            Self::Stderr => pb::LogLevel::Warn,
        }
    }
}

/// One line of a step's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    /// The line without its line break; at most [`MAX_LOG_LINE_BYTES`] bytes (longer output is
    /// split over several lines).
    pub text: String,
    pub time: SystemTime,
}

/// Longest log line; longer output arrives as several lines.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Sends a step's log lines to a bounded channel. Sending waits while the channel is full (so a
/// chatty process slows down instead of filling memory); lines sent after the receiver is gone
/// are dropped.
#[derive(Debug, Clone)]
pub struct LogSink {
    sender: Option<mpsc::Sender<LogLine>>,
}

impl LogSink {
    /// A sink and the receiver of its lines, holding at most `capacity` unread lines.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<LogLine>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        (Self { sender: Some(sender) }, receiver)
    }

    /// A sink that drops every line.
    pub fn discard() -> Self {
        Self { sender: None }
    }

    /// Sends one line (split when longer than [`MAX_LOG_LINE_BYTES`]).
    pub async fn send(&self, stream: LogStream, text: &str) {
        let Some(sender) = &self.sender else { return };
        for piece in split_at_char_boundaries(text, MAX_LOG_LINE_BYTES) {
            let line = LogLine { stream, text: piece.to_owned(), time: SystemTime::now() };
            if sender.send(line).await.is_err() {
                return;
            }
        }
    }

    /// Sends a line written by the runner about the step.
    pub async fn system(&self, text: &str) {
        self.send(LogStream::System, text).await;
    }
}

fn split_at_char_boundaries(text: &str, max_bytes: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > max_bytes {
        let mut end = max_bytes;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

/// How an attempt failed; mirrors the proto's `FailureKind` plus the retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepErrorKind {
    /// The agent failed in a way that may pass next time (a 5xx, a crash, a network error).
    Retryable,
    /// The agent failed and will fail again with the same input (a 4xx, `NonRetryableError`,
    /// a template or jq error): retries stop at once.
    NonRetryable,
    /// The wall-clock limit or the assignment's deadline passed. Retryable.
    TimedOut,
    /// A memory, CPU or output limit was exceeded. Not retryable.
    LimitExceeded,
    /// The server asked to cancel the attempt.
    Cancelled,
    /// This runner cannot execute the agent (WORKFLOW type, missing config, no interpreter).
    Invalid,
}

/// Why an attempt failed, in words a user can act on (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    pub kind: StepErrorKind,
    pub message: String,
}

impl StepError {
    pub fn new(kind: StepErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::Retryable, message)
    }

    pub fn non_retryable(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::NonRetryable, message)
    }

    pub fn limit_exceeded(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::LimitExceeded, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StepErrorKind::Invalid, message)
    }

    pub fn cancelled() -> Self {
        Self::new(StepErrorKind::Cancelled, "cancelled")
    }

    /// Whether the server may run the step again.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, StepErrorKind::Retryable | StepErrorKind::TimedOut)
    }

    /// The proto kind of this failure.
    pub fn failure_kind(&self) -> pb::FailureKind {
        match self.kind {
            StepErrorKind::Retryable | StepErrorKind::NonRetryable => pb::FailureKind::Error,
            StepErrorKind::TimedOut => pb::FailureKind::Timeout,
            StepErrorKind::LimitExceeded => pb::FailureKind::ResourceLimit,
            StepErrorKind::Cancelled => pb::FailureKind::Cancelled,
            StepErrorKind::Invalid => pb::FailureKind::Invalid,
        }
    }

    /// The failure as the runner reports it.
    pub fn to_failure(&self) -> pb::StepFailure {
        pb::StepFailure {
            error: self.message.clone(),
            retryable: self.is_retryable(),
            kind: self.failure_kind() as i32,
        }
    }
}

/// The limits of one attempt, with the defaults filled in for what the agent leaves at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_mb: u64,
    pub cpu_seconds: u64,
    pub max_output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            memory_mb: DEFAULT_MEMORY_MB,
            cpu_seconds: DEFAULT_CPU_SECONDS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
        }
    }
}

impl Limits {
    /// The agent's limits; a missing, zero or negative value takes the default.
    pub fn from_proto(limits: Option<&pb::ResourceLimits>) -> Self {
        let defaults = Self::default();
        let Some(limits) = limits else { return defaults };
        let positive = |value: i32| u64::try_from(value).ok().filter(|value| *value > 0);
        Self {
            timeout: limits
                .timeout
                .as_ref()
                .and_then(positive_duration)
                .unwrap_or(defaults.timeout),
            memory_mb: positive(limits.memory_mb).unwrap_or(defaults.memory_mb),
            cpu_seconds: positive(limits.cpu_seconds).unwrap_or(defaults.cpu_seconds),
            max_output_bytes: positive(limits.max_output_bytes)
                .and_then(|bytes| usize::try_from(bytes).ok())
                .unwrap_or(defaults.max_output_bytes),
        }
    }
}

/// A proto duration that is longer than zero.
pub(crate) fn positive_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let seconds = u64::try_from(duration.seconds).ok()?;
    let nanos = u32::try_from(duration.nanos).ok()?;
    Some(Duration::new(seconds, nanos)).filter(|duration| !duration.is_zero())
}

/// What every executor gets besides its config and input.
pub(crate) struct RunContext<'run> {
    /// The agent's owner (DATA workers serve one owner each).
    pub owner_id: &'run str,
    pub limits: Limits,
    /// When the attempt must be over: the earlier of the agent's timeout and the assignment's
    /// deadline.
    pub deadline: Instant,
    /// How the deadline was set, for the timeout message.
    pub timeout_description: String,
    pub logs: &'run LogSink,
    pub cancel: &'run CancellationToken,
    pub llm_keys: &'run llm::LlmKeyPolicy,
}

impl RunContext<'_> {
    fn timed_out(&self) -> StepError {
        StepError::new(
            StepErrorKind::TimedOut,
            format!("the step exceeded {}", self.timeout_description),
        )
    }

    /// Runs `work` until it ends, the deadline passes or the attempt is cancelled.
    async fn guard<T>(
        &self,
        work: impl Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        tokio::select! {
            outcome = work => outcome,
            () = tokio::time::sleep_until(self.deadline) => Err(self.timed_out()),
            () = self.cancel.cancelled() => Err(StepError::cancelled()),
        }
    }
}

/// Runs one attempt of a step: the agent's config applied to the input, under its limits.
///
/// Returns the step's output, or why it failed. Log lines go to `logs` while it runs;
/// cancelling `cancel` stops it (a CODE process group is killed) and fails it as
/// [`StepErrorKind::Cancelled`]. Every output larger than the agent's `maxOutputBytes` (as
/// compact JSON) fails as [`StepErrorKind::LimitExceeded`].
pub async fn execute(
    work: StepWork,
    logs: LogSink,
    cancel: CancellationToken,
) -> Result<Value, StepError> {
    let limits = Limits::from_proto(work.agent.limits.as_ref());
    let own_deadline = Instant::now() + limits.timeout;
    let (deadline, timeout_description) = match work.deadline {
        Some(assigned) if assigned < own_deadline => {
            (assigned, "the deadline of its assignment".to_owned())
        }
        _ => (own_deadline, format!("its time limit of {}", describe_duration(limits.timeout))),
    };
    let llm_keys = work.llm_keys.clone();
    let owner_id = work.agent.owner_id.clone();
    let context = RunContext {
        owner_id: &owner_id,
        limits,
        deadline,
        timeout_description,
        logs: &logs,
        cancel: &cancel,
        llm_keys: &llm_keys,
    };
    if cancel.is_cancelled() {
        return Err(StepError::cancelled());
    }
    let kind = work
        .agent
        .config
        .and_then(|config| config.kind)
        .ok_or_else(|| StepError::invalid("the agent has no config"))?;
    check_type_matches(work.agent.r#type, &kind)?;
    let output = match kind {
        pb::agent_config::Kind::Code(config) => code::run(&config, &work.input, &context).await,
        pb::agent_config::Kind::Api(config) => {
            context.guard(api::run(&config, &work.input, &context)).await
        }
        pb::agent_config::Kind::Llm(config) => {
            context.guard(llm::run(&config, &work.input, &context)).await
        }
        pb::agent_config::Kind::Data(config) => data::run(&config, work.input, &context).await,
        pb::agent_config::Kind::Workflow(_) => Err(StepError::invalid(
            "WORKFLOW agents are run by the server as child executions, not by a runner",
        )),
    }?;
    check_output_size(&output, limits.max_output_bytes)?;
    Ok(output)
}

fn check_type_matches(agent_type: i32, kind: &pb::agent_config::Kind) -> Result<(), StepError> {
    let config_type = match kind {
        pb::agent_config::Kind::Code(_) => pb::AgentType::Code,
        pb::agent_config::Kind::Api(_) => pb::AgentType::Api,
        pb::agent_config::Kind::Llm(_) => pb::AgentType::Llm,
        pb::agent_config::Kind::Data(_) => pb::AgentType::Data,
        pb::agent_config::Kind::Workflow(_) => pb::AgentType::Workflow,
    };
    if agent_type == pb::AgentType::Unspecified as i32 || agent_type == config_type as i32 {
        return Ok(());
    }
    Err(StepError::invalid(format!(
        "the agent's type does not match its config (a {} config)",
        config_type.as_str_name().trim_start_matches("AGENT_TYPE_")
    )))
}

fn check_output_size(output: &Value, max_output_bytes: usize) -> Result<(), StepError> {
    let size = serde_json::to_vec(output).map(|bytes| bytes.len()).unwrap_or(usize::MAX);
    if size > max_output_bytes {
        return Err(StepError::limit_exceeded(format!(
            "the output is {size} bytes, more than the limit of {max_output_bytes} bytes"
        )));
    }
    Ok(())
}

/// `90s` → "1m30s", `2s` → "2s", `1500ms` → "1.5s".
pub(crate) fn describe_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if duration.subsec_millis() != 0 {
        return format!("{}s", duration.as_secs_f64());
    }
    match (seconds / 60, seconds % 60) {
        (0, seconds) => format!("{seconds}s"),
        (minutes, 0) => format!("{minutes}m"),
        (minutes, seconds) => format!("{minutes}m{seconds}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::truncate_text;

    /// Found while writing the runner_protocol fuzz target: any timestamp becomes an instant
    /// without a panic (it used to overflow the clock near the end of time).
    #[test]
    fn any_deadline_becomes_an_instant() {
        let now = Instant::now();
        let year = MAX_DEADLINE_AHEAD;
        for (seconds, nanos) in [
            (i64::MAX, i32::MAX),
            (i64::MAX, 999_999_999),
            (i64::MAX, -1),
            (i64::MIN, i32::MIN),
            (0, i32::MAX),
            (-1, 0),
        ] {
            let deadline =
                StepWork::deadline_from_timestamp(&prost_types::Timestamp { seconds, nanos });
            assert!(deadline >= now, "{seconds} {nanos}");
            assert!(deadline <= Instant::now() + year, "{seconds} {nanos}");
        }
        let far = StepWork::deadline_from_timestamp(&prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: i32::MAX,
        });
        assert!(far >= now + year, "the end of time is as good as no deadline");
        let in_a_minute = SystemTime::now() + Duration::from_secs(60);
        let since_epoch = in_a_minute.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970");
        let deadline = StepWork::deadline_from_timestamp(&prost_types::Timestamp {
            seconds: i64::try_from(since_epoch.as_secs()).expect("fits"),
            nanos: 0,
        });
        let ahead = deadline - now;
        assert!(ahead > Duration::from_secs(55) && ahead <= Duration::from_secs(61), "{ahead:?}");
    }

    #[test]
    fn limits_take_defaults_for_zero_and_missing_values() {
        assert_eq!(Limits::from_proto(None), Limits::default());
        let limits = Limits::from_proto(Some(&pb::ResourceLimits {
            timeout: Some(prost_types::Duration { seconds: 2, nanos: 0 }),
            memory_mb: 0,
            cpu_seconds: -3,
            max_output_bytes: 100,
        }));
        assert_eq!(limits.timeout, Duration::from_secs(2));
        assert_eq!(limits.memory_mb, DEFAULT_MEMORY_MB);
        assert_eq!(limits.cpu_seconds, DEFAULT_CPU_SECONDS);
        assert_eq!(limits.max_output_bytes, 100);
    }

    #[test]
    fn failures_map_to_proto_kinds_and_retry_decisions() {
        let cases = [
            (StepErrorKind::Retryable, pb::FailureKind::Error, true),
            (StepErrorKind::NonRetryable, pb::FailureKind::Error, false),
            (StepErrorKind::TimedOut, pb::FailureKind::Timeout, true),
            (StepErrorKind::LimitExceeded, pb::FailureKind::ResourceLimit, false),
            (StepErrorKind::Cancelled, pb::FailureKind::Cancelled, false),
            (StepErrorKind::Invalid, pb::FailureKind::Invalid, false),
        ];
        for (kind, proto_kind, retryable) in cases {
            let failure = StepError::new(kind, "boom").to_failure();
            assert_eq!(failure.kind, proto_kind as i32, "{kind:?}");
            assert_eq!(failure.retryable, retryable, "{kind:?}");
            assert_eq!(failure.error, "boom");
        }
    }

    #[test]
    fn long_log_lines_split_on_character_boundaries() {
        let text = "é".repeat(MAX_LOG_LINE_BYTES); // two bytes each
        let pieces = split_at_char_boundaries(&text, MAX_LOG_LINE_BYTES);
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|piece| piece.len() <= MAX_LOG_LINE_BYTES));
        assert_eq!(pieces.concat(), text);
        assert_eq!(split_at_char_boundaries("", 4), vec![""]);
    }

    #[test]
    fn durations_and_texts_are_described_briefly() {
        assert_eq!(describe_duration(Duration::from_secs(2)), "2s");
        assert_eq!(describe_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(describe_duration(Duration::from_secs(300)), "5m");
        assert_eq!(describe_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(truncate_text("abcdef", 3), "abc…");
        assert_eq!(truncate_text("abc", 3), "abc");
    }
}
