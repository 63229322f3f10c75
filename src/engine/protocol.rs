//! The server's side of `RunnerService.Attach`: registering a runner from its hello (keeping
//! the attempts it still holds after a reconnect when their leases are alive), and acting on
//! every message it sends. Every message about a step is fenced by (step run id, attempt): a
//! runner can only speak for attempts it holds, and the store refuses stale attempts anyway.
//!
//! One runner's messages are applied by a `RunnerInbox`: the messages about one attempt
//! (acknowledgement, started, result, cancel acknowledgement) keep their order in one of a few
//! lanes chosen by the step run, so a runner with many slots has several results committed at
//! once instead of one after another; log batches, heartbeats and draining are applied in
//! stream order before anything that follows them.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::attached_runners::{AttachedRunner, RunnerGrant, RunnerSender};
use super::dispatcher::lease_end;
use super::{Engine, EngineResult};
use crate::proto::v1 as pb;
use crate::store::{
    AttemptKey, Completion, ExecutionLogLevel, ExecutionLogSource, NewExecutionLog, StepRun,
    StepRunStatus, StoreError,
};

/// The most slots one runner may announce.
pub const MAX_RUNNER_CAPACITY: i32 = 1_000;
/// The most log lines kept from one batch.
const MAX_LOG_LINES_PER_BATCH: usize = 1_000;
/// The longest log line kept; longer ones are cut.
const MAX_LOG_LINE_CHARS: usize = 16 * 1024;

/// How long an attempt runs before its start is committed on its own (see `runner_started`).
const START_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// How long an attempt runs before watchers are told of its start on its own (a shorter one's
/// start goes out in its result's event).
const START_EVENT_DELAY: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a held attempt's log lines wait to travel with its result before they are written
/// on their own (a short step's lines share its result's commit).
const LOG_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
/// Log lines of one attempt that wait at most; more are written at once.
const MAX_WAITING_LOG_LINES: usize = 1_000;
/// How long a result the database cannot take is kept and tried again.
const RESULT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// How many of one runner's attempt messages are applied at once.
const RUNNER_LANES: usize = 8;
/// Attempt messages waiting in one lane before the stream is read no further.
const LANE_BUFFER: usize = 64;

/// Applies one attached runner's messages (see the module comment). `close` waits for what
/// is already delivered to be applied.
pub struct RunnerInbox {
    engine: Arc<Engine>,
    runner: Arc<AttachedRunner>,
    /// Started by the first message that needs one: an idle runner, which only heartbeats, has
    /// none (eight tasks and channels per runner are most of what a thousand idle runners
    /// cost otherwise).
    lanes: [Option<Lane>; RUNNER_LANES],
}

/// One lane: messages about the attempts it owns, applied in order by its task.
struct Lane {
    /// Boxed, so a channel's buffer holds pointers and not whole messages.
    sender: mpsc::Sender<Box<pb::attach_request::Message>>,
    worker: JoinHandle<()>,
}

impl RunnerInbox {
    /// Applies `message`, or queues it behind the earlier messages about the same attempt.
    pub async fn deliver(&mut self, message: pb::attach_request::Message) {
        let Some(index) = lane_of(&message) else {
            apply(&self.engine, &self.runner, message).await;
            return;
        };
        let lane = self.lanes[index % RUNNER_LANES].get_or_insert_with(|| {
            let (sender, mut receiver) =
                mpsc::channel::<Box<pb::attach_request::Message>>(LANE_BUFFER);
            let engine = self.engine.clone();
            let runner = self.runner.clone();
            let worker = tokio::spawn(async move {
                while let Some(message) = receiver.recv().await {
                    apply(&engine, &runner, *message).await;
                }
            });
            Lane { sender, worker }
        });
        if lane.sender.send(Box::new(message)).await.is_err() {
            tracing::warn!(runner_id = %self.runner.id, "a runner lane stopped; its message is dropped");
        }
    }

    /// Stops taking messages and waits until every delivered one is applied.
    pub async fn close(self) {
        for Lane { sender, worker } in self.lanes.into_iter().flatten() {
            drop(sender);
            let _ = worker.await;
        }
    }
}

/// The lane of a message about one attempt; `None` for the others.
pub(crate) fn lane_of(message: &pb::attach_request::Message) -> Option<usize> {
    use pb::attach_request::Message;
    let step = match message {
        Message::AssignmentAck(ack) => ack.step.as_ref(),
        Message::Started(started) => started.step.as_ref(),
        Message::Result(result) => result.step.as_ref(),
        Message::CancelAck(ack) => ack.step.as_ref(),
        Message::Hello(_) | Message::Logs(_) | Message::Heartbeat(_) | Message::Draining(_) => {
            return None;
        }
    };
    // A message without a usable attempt goes to the first lane, which ignores it.
    let key = step.and_then(attempt_key);
    let hash = key.map_or(0, |key| key.step_run_id.as_u128() as usize);
    Some(hash % RUNNER_LANES)
}

async fn apply(
    engine: &Arc<Engine>,
    runner: &Arc<AttachedRunner>,
    message: pb::attach_request::Message,
) {
    match engine.on_runner_message(runner, message).await {
        Ok(()) => {}
        // Every message of an outage meets it; the engine's loops warn once per outage.
        Err(error) if error.is_unavailable() => {
            tracing::debug!(%error, runner_id = %runner.id, "a runner message could not be applied now; the reconciler will repair");
        }
        Err(error) => {
            tracing::warn!(%error, runner_id = %runner.id, "a runner message could not be applied; the reconciler will repair");
        }
    }
}

/// A hello the server refuses, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct HelloError {
    pub field: &'static str,
    pub message: String,
}

impl Engine {
    /// Registers a runner from its hello and answers with what the runner needs to know.
    pub async fn attach_runner(
        self: &Arc<Self>,
        hello: pb::RunnerHello,
        grant: RunnerGrant,
        sender: RunnerSender,
    ) -> Result<(Arc<AttachedRunner>, pb::AttachAccepted), HelloError> {
        if !(1..=MAX_RUNNER_CAPACITY).contains(&hello.capacity) {
            return Err(HelloError {
                field: "hello.capacity",
                message: format!("must be between 1 and {MAX_RUNNER_CAPACITY}"),
            });
        }
        let agent_types: HashSet<String> = hello
            .agent_types
            .iter()
            .filter_map(|value| pb::AgentType::try_from(*value).ok())
            .filter(|agent_type| *agent_type != pb::AgentType::Unspecified)
            .map(|agent_type| super::scheduler::agent_type_name(agent_type).to_owned())
            .collect();
        if agent_types.is_empty() {
            return Err(HelloError {
                field: "hello.agentTypes",
                message: "must name at least one agent type".to_owned(),
            });
        }
        let name: String = hello.name.trim().chars().take(200).collect();
        let runner_id = match Uuid::parse_str(hello.runner_id.trim()) {
            Ok(previous) if self.attached_runners.get(&previous.to_string()).is_none() => {
                previous.to_string()
            }
            _ => Uuid::new_v4().to_string(),
        };
        let labels: BTreeMap<String, String> = hello.labels.into_iter().collect();
        let capacity = usize::try_from(hello.capacity).unwrap_or(1);
        let mut attached = AttachedRunner::new(
            runner_id.clone(),
            if name.is_empty() { runner_id.clone() } else { name },
            labels,
            agent_types,
            capacity,
            grant,
            hello.runner_version.chars().take(100).collect(),
            sender,
        );
        attached.sandbox = pb::RunnerSandbox::try_from(hello.sandbox).unwrap_or_default();
        attached.sandbox_missing = hello.sandbox_missing.chars().take(500).collect();
        let runner = Arc::new(attached);

        let now = Utc::now();
        let mut kept_steps = Vec::new();
        for held in hello.held_steps.iter().take(capacity) {
            let Some(key) = attempt_key(held) else { continue };
            let Ok(step_run) = self.store.get_step_run(key.step_run_id).await else { continue };
            let ours = step_run.attempt == key.attempt
                && matches!(step_run.status, StepRunStatus::Assigned | StepRunStatus::Running)
                && step_run.runner_id.as_deref() == Some(runner_id.as_str());
            let lease_alive = self.leases.expires_at(key).await.is_some_and(|until| until > now)
                || step_run.lease_expires_at.is_some_and(|until| until > now);
            if !(ours && lease_alive) {
                continue;
            }
            let deadline = step_run
                .lease_expires_at
                .into_iter()
                .chain(self.leases.expires_at(key).await)
                .max()
                .unwrap_or(now);
            runner.keep(key, step_run.execution_id, deadline);
            self.leases.extend(key, lease_end(now, self.settings.lease_duration, deadline)).await;
            kept_steps.push(held.clone());
        }
        self.attached_runners.attach(runner.clone());
        self.runner_directory.share(&[runner.to_proto()]).await;
        tracing::info!(runner_id = %runner.id, name = %runner.name, capacity, kept = kept_steps.len(), "runner attached");
        let accepted = pb::AttachAccepted {
            runner_id,
            heartbeat_interval: prost_types::Duration::try_from(self.settings.heartbeat_interval)
                .ok(),
            lease_duration: prost_types::Duration::try_from(self.settings.lease_duration).ok(),
            max_message_bytes: i32::try_from(self.settings.max_message_bytes).unwrap_or(i32::MAX),
            kept_steps,
        };
        Ok((runner, accepted))
    }

    /// The inbox that applies `runner`'s messages from now on.
    pub fn runner_inbox(self: &Arc<Self>, runner: Arc<AttachedRunner>) -> RunnerInbox {
        RunnerInbox { engine: self.clone(), runner, lanes: std::array::from_fn(|_| None) }
    }

    /// Forgets a runner whose stream ended. Its attempts keep their leases until they run out,
    /// so a runner that reconnects in time keeps them.
    pub async fn detach_runner(&self, runner: &AttachedRunner) {
        // A runner withdrawn earlier may already be attached again under the same id.
        if !self.attached_runners.detach_this(runner) {
            return;
        }
        self.runner_directory.forget(&runner.id).await;
        tracing::info!(runner_id = %runner.id, held = runner.load(), "runner detached");
    }

    /// The runners attached to this process, with what each was granted at attach: what
    /// `withdraw_runner` is decided on.
    pub fn attached_runner_grants(&self) -> Vec<(String, RunnerGrant)> {
        self.attached_runners
            .all()
            .iter()
            .map(|runner| (runner.id.clone(), runner.grant()))
            .collect()
    }

    /// Detaches a runner whose right to work was withdrawn (its key revoked or expired, its
    /// owner deleted or demoted): it takes no further step, is told to cancel the ones it holds,
    /// which go back to the queue at once (not when their leases run out), and its stream ends
    /// with PERMISSION_DENIED and `reason`. A runner that is no longer attached here is left.
    pub async fn withdraw_runner(self: &Arc<Self>, runner_id: &str, reason: &str) {
        let Some(runner) = self.attached_runners.detach(runner_id) else { return };
        // No assignment racing this one finds a slot any more.
        runner.set_draining();
        self.runner_directory.forget(&runner.id).await;
        let held = runner.held_keys();
        for key in &held {
            let cancel = pb::CancelStep {
                step: Some(super::scheduler::step_ref(*key)),
                reason: reason.to_owned(),
            };
            runner.try_send(pb::attach_response::Message::Cancel(cancel));
            runner.release(*key);
            if let Err(error) = self.take_back(*key).await {
                tracing::warn!(%error, step_run_id = %key.step_run_id, "could not take a step back from a withdrawn runner; the reconciler will when its lease ends");
            }
        }
        runner.withdraw(tonic::Status::permission_denied(reason.to_owned()));
        tracing::warn!(runner_id = %runner.id, reason, taken_back = held.len(), "runner withdrawn");
    }

    /// Acts on one message of an attached runner.
    pub async fn on_runner_message(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        message: pb::attach_request::Message,
    ) -> EngineResult<()> {
        use pb::attach_request::Message;
        let now = Utc::now();
        match message {
            Message::Hello(_) => {
                tracing::debug!(runner_id = %runner.id, "a second hello is ignored");
            }
            Message::AssignmentAck(ack) => {
                let Some(key) = ack.step.as_ref().and_then(attempt_key) else { return Ok(()) };
                if ack.accepted {
                    runner.acknowledge(key);
                } else if runner.release(key) {
                    self.attached_runners.capacity_changed.notify_waiters();
                    tracing::info!(runner_id = %runner.id, reason = %ack.reason, "assignment handed back");
                    self.take_back(key).await?;
                }
            }
            Message::Started(started) => {
                let Some(key) = started.step.as_ref().and_then(attempt_key) else { return Ok(()) };
                // At the precision the database keeps, so the event and the stored row agree.
                let at = chrono::SubsecRound::trunc_subsecs(now, 6);
                let Some(held) = runner.record_start(key, at) else { return Ok(()) };
                if held.started_at == Some(at) {
                    self.runner_started(runner, key, held.assigned_row, at).await?;
                }
            }
            Message::Logs(batch) => self.record_logs(runner, batch).await?,
            Message::Heartbeat(heartbeat) => {
                runner.record_heartbeat(now);
                for step in &heartbeat.running {
                    let Some(key) = attempt_key(step) else { continue };
                    if let Some(held) = runner.held(key) {
                        let until = lease_end(now, self.settings.lease_duration, held.deadline);
                        self.leases.extend(key, until).await;
                    }
                }
            }
            Message::Result(result) => {
                let Some(key) = result.step.as_ref().and_then(attempt_key) else { return Ok(()) };
                // Only the runner holding the attempt speaks for it: a report for an attempt it
                // no longer holds (taken back, cancelled, already reported) or never held
                // (another runner's, a stale attempt number) is refused here; the store's
                // fence on (step run id, attempt) refuses the rest.
                let Some(held) = runner.held(key) else {
                    tracing::info!(runner_id = %runner.id, step_run_id = %key.step_run_id, attempt = key.attempt, "refused a result for an attempt this runner does not hold");
                    return Ok(());
                };
                let completion = self.completion_of(result.outcome.as_ref());
                let logs = runner.take_logs(key);
                // A start watchers were not told of yet goes out with the result.
                let unannounced_start = match (&held.assigned_row, held.started_at) {
                    (Some(assigned_row), Some(at)) if runner.announce_start(key) => {
                        Some(running_row(assigned_row, at))
                    }
                    _ => None,
                };
                // Free the slot only once the result is committed, so the attempt's end is
                // recorded before the next assignment to this slot starts.
                let mut outcome = self
                    .complete_started_attempt(
                        key,
                        completion,
                        held.started_at,
                        logs.clone(),
                        held.assigned_row.as_deref(),
                        unannounced_start,
                    )
                    .await;
                if let Err(error) = &outcome
                    && error.is_unavailable()
                {
                    // The runner sent its only copy: keep it until the database is back (made
                    // again from the message, so the usual path copies no output).
                    let completion = self.completion_of(result.outcome.as_ref());
                    let engine = self.clone();
                    let runner = runner.clone();
                    tokio::spawn(async move {
                        engine
                            .record_result_when_possible(&runner, key, completion, held, logs)
                            .await;
                    });
                    return Ok(());
                }
                if outcome.is_err() && !logs.is_empty() {
                    // The lines did not commit with the result: on their own, then.
                    match self.store.append_execution_logs(logs).await {
                        Ok(written) => {
                            super::scheduler::publish_logs(self.bus.as_ref(), written).await;
                        }
                        Err(error) => {
                            tracing::warn!(%error, step_run_id = %key.step_run_id, "could not write a step's log lines");
                        }
                    }
                }
                if let Err(super::EngineError::Store(StoreError::ValueRefused(reason))) = &outcome {
                    // The store cannot keep what the runner reported: the attempt fails once,
                    // with that as its own error (never retried as if its runner were lost).
                    let error = format!(
                        "the server cannot store this step's result: {}",
                        without_nul(reason)
                    );
                    tracing::info!(runner_id = %runner.id, step_run_id = %key.step_run_id, "a step result the store refuses fails its step");
                    outcome = self
                        .complete_attempt(key, Completion::Failed { error, retryable: false })
                        .await;
                }
                // A step that took the slot over (`take_over_slot`) leaves none free: the
                // dispatcher need not look.
                if runner.release(key) && runner.free_slots() > 0 {
                    self.attached_runners.capacity_changed.notify_waiters();
                }
                outcome?;
            }
            Message::CancelAck(ack) => {
                if let Some(key) = ack.step.as_ref().and_then(attempt_key)
                    && runner.release(key)
                {
                    self.attached_runners.capacity_changed.notify_waiters();
                }
            }
            Message::Draining(_) => {
                runner.set_draining();
                tracing::info!(runner_id = %runner.id, "runner draining");
            }
        }
        Ok(())
    }

    /// A runner started an attempt it holds. Watchers hear of it when the attempt still runs
    /// `START_EVENT_DELAY` later, or else in its result's event (one event a short step instead
    /// of two: the row as it was RUNNING comes first among the event's rows); the database only
    /// if the attempt still runs `START_COMMIT_DELAY` later: a shorter attempt records its
    /// start with its result, which saves a commit a step (and whose `version` then counts the
    /// start it stands for, so watchers order the rows as if it had been committed). A watcher
    /// that opens within those first moments may see such a step go from ASSIGNED to its end.
    /// Were this process to stop before either, only the start time is lost: the lease brings
    /// the attempt back as before. An attempt this process did not assign (kept across a
    /// reconnect) commits its start now.
    async fn runner_started(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        key: AttemptKey,
        assigned_row: Option<Arc<StepRun>>,
        at: chrono::DateTime<Utc>,
    ) -> EngineResult<()> {
        let Some(assigned_row) = assigned_row else {
            if let Some(running) = self.starting.submit(key, (key, at)).await? {
                self.publish_step(&running).await;
            }
            return Ok(());
        };
        let engine = self.clone();
        let runner = runner.clone();
        tokio::spawn(async move {
            tokio::time::sleep(START_EVENT_DELAY).await;
            if runner.announce_start(key) {
                engine.publish_step(&running_row(&assigned_row, at)).await;
            }
            tokio::time::sleep(START_COMMIT_DELAY.saturating_sub(START_EVENT_DELAY)).await;
            if runner.held(key).is_none() {
                return;
            }
            match engine.starting.submit(key, (key, at)).await {
                // The same row as the one published above (same version): a watcher that saw
                // that one skips this; one whose snapshot read the step still ASSIGNED needs it.
                Ok(Some(running)) => engine.publish_step(&running).await,
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%error, step_run_id = %key.step_run_id, "could not record a start; the result will carry it");
                }
            }
        });
        Ok(())
    }

    /// A result the database could not take (it is unreachable): tried again with a growing
    /// pause, the attempt's lease kept alive meanwhile (the runner no longer heartbeats an
    /// attempt it reported), so that once the database is back the result is recorded and the
    /// step is not run a second time. The slot is freed when it is recorded (or given up, after
    /// `RESULT_PATIENCE`, when the lease takes over as for a lost runner).
    async fn record_result_when_possible(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        key: AttemptKey,
        completion: Completion,
        held: super::attached_runners::HeldStep,
        logs: Vec<NewExecutionLog>,
    ) {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(250);
        loop {
            let until = lease_end(Utc::now(), self.settings.lease_duration, held.deadline);
            self.leases.extend(key, until).await;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(crate::outage::MAX_PAUSE);
            let outcome = self
                .complete_started_attempt(
                    key,
                    completion.clone(),
                    held.started_at,
                    logs.clone(),
                    None,
                    None,
                )
                .await;
            let unavailable = matches!(&outcome, Err(error) if error.is_unavailable());
            if unavailable && started.elapsed() < RESULT_PATIENCE {
                tracing::debug!(step_run_id = %key.step_run_id, "still cannot record a step result");
                continue;
            }
            if let Err(error) = outcome {
                tracing::warn!(%error, step_run_id = %key.step_run_id, attempt = key.attempt, "could not record a step result; its lease decides");
            }
            self.release_slot(runner, key);
            return;
        }
    }

    fn completion_of(&self, outcome: Option<&pb::step_result::Outcome>) -> Completion {
        completion(outcome, self.settings.max_json_depth, self.settings.max_payload_bytes)
    }

    async fn record_logs(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        batch: pb::StepLogBatch,
    ) -> EngineResult<()> {
        let mut lines = Vec::new();
        for line in batch.lines.into_iter().take(MAX_LOG_LINES_PER_BATCH) {
            let Some(key) = line.step.as_ref().and_then(attempt_key) else { continue };
            let Some(held) = runner.held(key) else { continue };
            let level = match pb::LogLevel::try_from(line.level) {
                Ok(pb::LogLevel::Debug) => ExecutionLogLevel::Debug,
                Ok(pb::LogLevel::Warn) => ExecutionLogLevel::Warn,
                Ok(pb::LogLevel::Error) => ExecutionLogLevel::Error,
                _ => ExecutionLogLevel::Info,
            };
            let source = match pb::LogSource::try_from(line.source) {
                Ok(pb::LogSource::Stdout) => ExecutionLogSource::Stdout,
                Ok(pb::LogSource::Stderr) => ExecutionLogSource::Stderr,
                _ => ExecutionLogSource::Runner,
            };
            let created_at = line
                .time
                .as_ref()
                .and_then(crate::proto::wkt::time_from_timestamp)
                .unwrap_or_else(Utc::now);
            lines.push((
                key,
                NewExecutionLog {
                    execution_id: held.execution_id,
                    step_run_id: Some(key.step_run_id),
                    attempt: Some(key.attempt),
                    level,
                    source,
                    message: without_nul(
                        &line.message.chars().take(MAX_LOG_LINE_CHARS).collect::<String>(),
                    ),
                    fields: None,
                    created_at,
                },
            ));
        }
        let mut by_attempt: std::collections::HashMap<AttemptKey, Vec<NewExecutionLog>> =
            std::collections::HashMap::new();
        for (key, line) in lines {
            by_attempt.entry(key).or_default().push(line);
        }
        for (key, lines) in by_attempt {
            match runner.buffer_logs(key, lines) {
                Some((waiting, _)) if waiting >= MAX_WAITING_LOG_LINES => {
                    self.flush_logs(runner, key).await?;
                }
                Some((_, true)) => {
                    let (engine, runner) = (self.clone(), runner.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(LOG_COMMIT_DELAY).await;
                        if let Err(error) = engine.flush_logs(&runner, key).await {
                            tracing::warn!(%error, step_run_id = %key.step_run_id, "could not write a step's log lines");
                        }
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Appends the log lines of attempt `key` still waiting on `runner` and tells watchers.
    async fn flush_logs(
        self: &Arc<Self>,
        runner: &AttachedRunner,
        key: AttemptKey,
    ) -> EngineResult<()> {
        let lines = runner.take_logs(key);
        if lines.is_empty() {
            return Ok(());
        }
        let written = self.store.append_execution_logs(lines).await?;
        super::scheduler::publish_logs(self.bus.as_ref(), written).await;
        Ok(())
    }
}

/// What a runner's reported outcome means for its attempt: an output that cannot be stored (a
/// NUL character, nested deeper than `max_json_depth`, larger than `max_payload_bytes` as
/// JSON) fails the attempt for good; an error is cut to `MAX_LOG_LINE_CHARS` without NULs.
pub(crate) fn completion(
    outcome: Option<&pb::step_result::Outcome>,
    max_json_depth: usize,
    max_payload_bytes: usize,
) -> Completion {
    use pb::step_result::Outcome;
    match outcome {
        Some(Outcome::Success(success)) => {
            let output = success
                .output
                .as_ref()
                .map(crate::proto::wkt::value_to_json)
                .unwrap_or(serde_json::Value::Null);
            if crate::proto::wkt::json_contains_nul(&output) {
                return Completion::Failed {
                    error: "the output contains a NUL character (\\u0000), which cannot be \
                            stored"
                        .to_owned(),
                    retryable: false,
                };
            }
            let depth = crate::proto::wkt::json_depth(&output);
            if depth > max_json_depth {
                return Completion::Failed {
                    error: format!(
                        "the output is nested {depth} levels deep, deeper than the limit of \
                         {max_json_depth}"
                    ),
                    retryable: false,
                };
            }
            let size = output.to_string().len();
            if size > max_payload_bytes {
                return Completion::Failed {
                    error: format!(
                        "the output is {size} bytes, larger than the limit of {max_payload_bytes} \
                         bytes"
                    ),
                    retryable: false,
                };
            }
            Completion::Succeeded { output }
        }
        Some(Outcome::Failure(failure)) => {
            let kind = pb::FailureKind::try_from(failure.kind).unwrap_or(pb::FailureKind::Error);
            let error =
                without_nul(&failure.error.chars().take(MAX_LOG_LINE_CHARS).collect::<String>());
            match kind {
                pb::FailureKind::Timeout => Completion::TimedOut,
                pb::FailureKind::Invalid => Completion::Failed { error, retryable: false },
                _ => Completion::Failed { error, retryable: failure.retryable },
            }
        }
        None => Completion::Failed {
            error: "the runner reported a result without an outcome".to_owned(),
            retryable: true,
        },
    }
}

/// `text` with every NUL character (which PostgreSQL cannot store) replaced by U+FFFD.
/// The row of a step its runner started at `at`, as watchers are told of it before (or
/// without) its own commit: the assigned row one version on.
fn running_row(assigned_row: &StepRun, at: chrono::DateTime<Utc>) -> StepRun {
    StepRun {
        status: StepRunStatus::Running,
        started_at: Some(at),
        updated_at: at,
        version: assigned_row.version + 1,
        ..assigned_row.clone()
    }
}

fn without_nul(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn attempt_key(step: &pb::StepRef) -> Option<AttemptKey> {
    let step_run_id = Uuid::parse_str(step.step_run_id.trim()).ok()?;
    Some(AttemptKey { step_run_id, attempt: step.attempt })
}

/// Property: the messages about one attempt share one lane, so they are applied in the order
/// the runner sent them; the other messages take none.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn messages_about_one_attempt_share_a_lane(id in any::<u128>(), attempt in any::<i32>(), text in ".{0,40}") {
            use pb::attach_request::Message;
            let step = Some(pb::StepRef { step_run_id: Uuid::from_u128(id).to_string(), attempt });
            let about_the_attempt = [
                Message::AssignmentAck(pb::AssignmentAck { step: step.clone(), accepted: true, reason: String::new() }),
                Message::Started(pb::StepStarted { step: step.clone() }),
                Message::Result(pb::StepResult { step: step.clone(), outcome: None }),
                Message::CancelAck(pb::CancelAck { step: step.clone() }),
            ];
            let lanes: Vec<Option<usize>> = about_the_attempt.iter().map(lane_of).collect();
            prop_assert!(lanes[0].is_some_and(|lane| lane < RUNNER_LANES));
            prop_assert!(lanes.iter().all(|lane| *lane == lanes[0]), "{lanes:?}");
            // A step run id that does not parse goes to the first lane, which ignores it.
            let garbled = Message::Started(pb::StepStarted {
                step: Some(pb::StepRef { step_run_id: text.clone(), attempt }),
            });
            if Uuid::parse_str(text.trim()).is_err() {
                prop_assert_eq!(lane_of(&garbled), Some(0));
            }
            prop_assert_eq!(lane_of(&Message::Heartbeat(pb::Heartbeat { running: vec![] })), None);
            prop_assert_eq!(lane_of(&Message::Draining(pb::Draining {})), None);
        }
    }
}
