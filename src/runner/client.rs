//! The runner's side of `RunnerService.Attach`: connect with an API key, say hello, run each
//! assignment with the executors (up to the announced capacity), stream its logs in batches,
//! heartbeat the attempts it holds, report results, obey cancels. A broken stream (or a server
//! asking its runners to move) is reopened on the next of the servers given, in turn, telling
//! that server which attempts are still running so it keeps them; a server that cannot be
//! reached is passed over for the next, with a pause only once every one has failed. On
//! shutdown the runner says it is draining, keeps heartbeating, finishes what it holds (or hands
//! it back when the grace period ends) and leaves.
//!
//! Every message fits the smaller of this runner's `max_message_bytes` and the one the server
//! announces: log batches are cut by size, a result whose output would not fit becomes a
//! failure that says so, so an oversized payload never breaks the stream. An attempt whose result
//! is still waiting to be sent counts as held (it is named in heartbeats and in the hello of a
//! reconnect), so a result produced while the stream was down is still accepted afterwards.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::executors::{self, LogSink, StepError, StepWork};
use crate::proto::v1::{self as pb, runner_service_client::RunnerServiceClient};

/// Lines sent in one log batch at most.
const LOG_BATCH_LINES: usize = 200;
/// How long log lines wait to be batched.
const LOG_BATCH_DELAY: Duration = Duration::from_millis(200);
/// Room left in every message for its framing and the fields around a payload.
pub(crate) const MESSAGE_OVERHEAD_BYTES: usize = 1024;
/// The deepest output a runner sends, in protobuf levels (`wkt::json_proto_depth`): with the
/// envelope (request, result, success) it stays below the decoders' limit of 100. The
/// server's own limit (`--max-json-depth`) fails outputs deeper than it with its own message.
const MAX_SENDABLE_PROTO_DEPTH: usize = 96;
/// The smallest message limit the runner works with, whatever is announced.
pub(crate) const MIN_MESSAGE_BYTES: usize = 4 * 1024;
/// The first pause once every server failed in a row; it doubles up to `MAX_BACKOFF`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How a runner connects and what it offers.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The servers' gRPC addresses in the order tried, e.g. `http://127.0.0.1:8080` (one load
    /// balancer, or each replica): the runner attaches to one at a time and moves to the next
    /// when that one ends its stream or cannot be reached. At least one.
    pub server_urls: Vec<String>,
    /// An API key with the `runner` scope (sent as `x-api-key`).
    pub api_key: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub agent_types: Vec<pb::AgentType>,
    /// How long a draining runner waits for its steps before it hands them back.
    pub drain_grace: Duration,
    pub max_message_bytes: usize,
    /// The variables LLM agents may use as API keys (`--llm-key-env`).
    pub llm_keys: Arc<super::executors::llm::LlmKeyPolicy>,
}

impl RunnerSettings {
    /// Every agent type a runner can execute itself (WORKFLOW runs on the server).
    pub fn default_agent_types() -> Vec<pb::AgentType> {
        vec![pb::AgentType::Code, pb::AgentType::Api, pb::AgentType::Llm, pb::AgentType::Data]
    }
}

/// Why the runner stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("invalid server address {0}")]
    InvalidServer(String),
    #[error("the server refused this runner: {0}")]
    Refused(String),
}

/// The attempts held here, by (step run id, attempt), with their cancel switches: running, or
/// finished with their result not yet sent.
type Running = Arc<Mutex<HashMap<(String, i32), CancellationToken>>>;

/// The largest message this runner sends now: the smaller of its own limit and the server's.
type MessageLimit = Arc<AtomicUsize>;

/// Runs until `shutdown` turns true (then drains) or the server refuses the credentials.
pub async fn run(
    settings: RunnerSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    protect_process();
    // Probed (and logged) now: the mode is also in every hello.
    let _ = executors::sandbox::mode().await;
    // As many warm jq workers as DATA steps may run at once stay idle between steps.
    executors::data::shared_pool().keep_idle_at_least(settings.capacity as usize);
    let mut servers = ServerRotation::new(&settings.server_urls)?;
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    let message_limit: MessageLimit =
        Arc::new(AtomicUsize::new(settings.max_message_bytes.max(MIN_MESSAGE_BYTES)));
    // Messages survive a broken stream here until the next connection sends them.
    let (outbox, mut outbox_receiver) = mpsc::channel::<pb::AttachRequest>(1024);
    let mut runner_id = String::new();
    let mut draining = *shutdown.borrow();
    loop {
        if draining && running_keys(&running).is_empty() {
            return Ok(());
        }
        let session = Session {
            settings: &settings,
            running: &running,
            outbox: &outbox,
            message_limit: &message_limit,
        };
        let outcome = session
            .connect_and_serve(
                servers.current(),
                &mut runner_id,
                &mut outbox_receiver,
                &mut shutdown,
                &mut draining,
            )
            .await;
        let left = servers.current().uri().to_string();
        let pause = match outcome {
            Ok(SessionEnd::Drained) => return Ok(()),
            Ok(SessionEnd::Broken) => {
                let pause = servers.after_stream_ended();
                if servers.len() > 1 {
                    tracing::info!(from = %left, to = %servers.current().uri(), "moving to the next server");
                }
                pause
            }
            Err(SessionError::Refused(reason)) => return Err(RunnerError::Refused(reason)),
            Err(SessionError::Unreachable(reason)) => {
                let pause = servers.after_unreachable();
                tracing::warn!(server = %left, %reason, next = %servers.current().uri(), retry_in = ?pause, "cannot reach the server");
                pause
            }
        };
        if pause.is_zero() {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = shutdown.changed() => { draining = true; }
        }
    }
}

/// The servers of `RunnerSettings::server_urls` in turn, and the pause before each attempt:
/// after a stream that was attached ends (broken, or the server asked its runners to move), the
/// next server at once; after a server that cannot be reached, the next one at once until every
/// server failed in a row, then a pause that doubles up to `MAX_BACKOFF`. With one server (a
/// load balancer), the same server again after a pause.
struct ServerRotation {
    endpoints: Vec<tonic::transport::Endpoint>,
    current: usize,
    failures_in_a_row: usize,
    backoff: Duration,
}

impl ServerRotation {
    fn new(server_urls: &[String]) -> Result<Self, RunnerError> {
        let mut endpoints = Vec::with_capacity(server_urls.len());
        for url in server_urls {
            let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|_| RunnerError::InvalidServer(url.clone()))?
                .connect_timeout(Duration::from_secs(5))
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_while_idle(true);
            endpoints.push(endpoint);
        }
        if endpoints.is_empty() {
            return Err(RunnerError::InvalidServer("(none given)".to_owned()));
        }
        Ok(Self { endpoints, current: 0, failures_in_a_row: 0, backoff: INITIAL_BACKOFF })
    }

    fn len(&self) -> usize {
        self.endpoints.len()
    }

    fn current(&self) -> &tonic::transport::Endpoint {
        &self.endpoints[self.current]
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len();
    }

    /// The stream to the current server was attached and ended: on to the next server.
    fn after_stream_ended(&mut self) -> Duration {
        self.failures_in_a_row = 0;
        self.backoff = INITIAL_BACKOFF;
        self.advance();
        if self.endpoints.len() > 1 { Duration::ZERO } else { INITIAL_BACKOFF }
    }

    /// The current server could not be reached (or would not attach): on to the next server.
    fn after_unreachable(&mut self) -> Duration {
        self.failures_in_a_row += 1;
        self.advance();
        if !self.failures_in_a_row.is_multiple_of(self.endpoints.len()) {
            return Duration::ZERO;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        pause
    }
}

/// Makes this process non-dumpable: no process of the same user can read its memory or its
/// environment (`/proc/<pid>/environ`, where the variables of LLM keys are) or attach a debugger.
/// Children get their own, normal setting on exec.
fn protect_process() {
    if let Err(error) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        tracing::warn!(%error, "cannot make the runner non-dumpable");
    }
}

enum SessionEnd {
    Drained,
    /// The stream ended after the server accepted this runner: broken, or the server asked its
    /// runners to move (it is shutting down).
    Broken,
}

enum SessionError {
    Refused(String),
    Unreachable(String),
}

struct Session<'a> {
    settings: &'a RunnerSettings,
    running: &'a Running,
    outbox: &'a mpsc::Sender<pb::AttachRequest>,
    message_limit: &'a MessageLimit,
}

impl Session<'_> {
    async fn connect_and_serve(
        &self,
        endpoint: &tonic::transport::Endpoint,
        runner_id: &mut String,
        outbox_receiver: &mut mpsc::Receiver<pb::AttachRequest>,
        shutdown: &mut watch::Receiver<bool>,
        draining: &mut bool,
    ) -> Result<SessionEnd, SessionError> {
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| SessionError::Unreachable(error.to_string()))?;
        let mut client = RunnerServiceClient::new(channel)
            .max_decoding_message_size(self.settings.max_message_bytes)
            .max_encoding_message_size(self.settings.max_message_bytes);
        let (stream_sender, stream_receiver) = mpsc::channel::<pb::AttachRequest>(256);
        let held_steps: Vec<pb::StepRef> = running_keys(self.running)
            .into_iter()
            .map(|(step_run_id, attempt)| pb::StepRef { step_run_id, attempt })
            .collect();
        let (sandbox, sandbox_missing) = executors::sandbox::mode().await.to_proto();
        let hello = pb::RunnerHello {
            name: self.settings.name.clone(),
            labels: self.settings.labels.clone().into_iter().collect(),
            agent_types: self
                .settings
                .agent_types
                .iter()
                .map(|agent_type| *agent_type as i32)
                .collect(),
            capacity: i32::try_from(self.settings.capacity).unwrap_or(1),
            held_steps,
            runner_version: env!("CARGO_PKG_VERSION").to_owned(),
            runner_id: runner_id.clone(),
            sandbox: sandbox as i32,
            sandbox_missing,
        };
        let _ = stream_sender
            .send(pb::AttachRequest { message: Some(pb::attach_request::Message::Hello(hello)) })
            .await;
        let mut request = tonic::Request::new(ReceiverStream::new(stream_receiver));
        let key = self.settings.api_key.parse().map_err(|_| {
            SessionError::Refused("the API key is not a valid header value".to_owned())
        })?;
        request.metadata_mut().insert("x-api-key", key);
        let mut inbound = match client.attach(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                return Err(match status.code() {
                    tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied
                    | tonic::Code::InvalidArgument => {
                        SessionError::Refused(status.message().to_owned())
                    }
                    _ => SessionError::Unreachable(status.message().to_owned()),
                });
            }
        };
        let accepted = match inbound.message().await {
            Ok(Some(pb::AttachResponse {
                message: Some(pb::attach_response::Message::Accepted(accepted)),
            })) => accepted,
            Ok(_) => {
                return Err(SessionError::Unreachable(
                    "the server ended the stream before accepting this runner".to_owned(),
                ));
            }
            Err(status) => return Err(SessionError::Unreachable(status.message().to_owned())),
        };
        *runner_id = accepted.runner_id.clone();
        let limit = match usize::try_from(accepted.max_message_bytes) {
            Ok(announced) if announced > 0 => announced.min(self.settings.max_message_bytes),
            _ => self.settings.max_message_bytes,
        };
        self.message_limit.store(limit.max(MIN_MESSAGE_BYTES), Ordering::Relaxed);
        // Attempts the server did not keep are no longer ours: stop them.
        let kept: Vec<(String, i32)> = accepted
            .kept_steps
            .iter()
            .map(|step| (step.step_run_id.clone(), step.attempt))
            .collect();
        if let Ok(mut running) = self.running.lock() {
            running.retain(|key, cancel| {
                let keep = kept.contains(key);
                if !keep {
                    cancel.cancel();
                }
                keep
            });
        }
        tracing::info!(runner_id = %runner_id, server = %endpoint.uri(), kept = kept.len(), "attached to the server");
        if *draining {
            let _ = stream_sender
                .send(message(pb::attach_request::Message::Draining(pb::Draining {})))
                .await;
        }
        let heartbeat_every = accepted
            .heartbeat_interval
            .and_then(|interval| Duration::try_from(interval).ok())
            .filter(|interval| !interval.is_zero())
            .unwrap_or(Duration::from_secs(5));
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let drain_deadline = tokio::time::sleep(Duration::from_secs(u64::MAX / 4));
        tokio::pin!(drain_deadline);
        loop {
            if *draining && running_keys(self.running).is_empty() {
                // Let the last results leave before closing.
                while let Ok(request) = outbox_receiver.try_recv() {
                    if let Some(request) = release_reported(request, self.running) {
                        let _ = stream_sender.send(request).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                return Ok(SessionEnd::Drained);
            }
            tokio::select! {
                inbound_message = inbound.message() => match inbound_message {
                    Ok(Some(pb::AttachResponse { message: Some(message) })) => {
                        self.on_server_message(message, *draining, &stream_sender).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(SessionEnd::Broken),
                    Err(status) => {
                        if status.code() == tonic::Code::Unavailable {
                            // A server shutting down: attach again, to the next server (or through
                            // the balancer to another replica), with what we hold.
                            tracing::info!(reason = %status.message(), "the server ended the stream; attaching again");
                        }
                        return Ok(SessionEnd::Broken);
                    }
                },
                Some(request) = outbox_receiver.recv() => {
                    let Some(request) = release_reported(request, self.running) else { continue };
                    if stream_sender.send(request).await.is_err() {
                        return Ok(SessionEnd::Broken);
                    }
                }
                _ = heartbeat.tick() => {
                    let running: Vec<pb::StepRef> = running_keys(self.running)
                        .into_iter()
                        .map(|(step_run_id, attempt)| pb::StepRef { step_run_id, attempt })
                        .collect();
                    // Many held attempts and a small message limit: several heartbeats.
                    let per_beat = (self.message_limit.load(Ordering::Relaxed) / 128).max(1);
                    let mut beats: Vec<Vec<pb::StepRef>> =
                        running.chunks(per_beat).map(<[pb::StepRef]>::to_vec).collect();
                    if beats.is_empty() {
                        beats.push(Vec::new());
                    }
                    for running in beats {
                        let beat = message(pb::attach_request::Message::Heartbeat(pb::Heartbeat { running }));
                        if stream_sender.send(beat).await.is_err() {
                            return Ok(SessionEnd::Broken);
                        }
                    }
                }
                changed = shutdown.changed(), if !*draining => {
                    if changed.is_ok() && *shutdown.borrow() {
                        *draining = true;
                        tracing::info!("draining: finishing the steps held, taking no more");
                        let _ = stream_sender.send(message(pb::attach_request::Message::Draining(pb::Draining {}))).await;
                        drain_deadline.as_mut().reset(tokio::time::Instant::now() + self.settings.drain_grace);
                    }
                }
                () = &mut drain_deadline, if *draining => {
                    tracing::warn!("drain grace ended; handing back the steps still running");
                    let keys = running_keys(self.running);
                    if let Ok(mut running) = self.running.lock() {
                        for cancel in running.values() {
                            cancel.cancel();
                        }
                        running.clear();
                    }
                    for (step_run_id, attempt) in keys {
                        let ack = pb::AssignmentAck {
                            step: Some(pb::StepRef { step_run_id, attempt }),
                            accepted: false,
                            reason: "the runner is shutting down".to_owned(),
                        };
                        let _ = stream_sender.send(message(pb::attach_request::Message::AssignmentAck(ack))).await;
                    }
                }
            }
        }
    }

    async fn on_server_message(
        &self,
        server_message: pb::attach_response::Message,
        draining: bool,
        stream_sender: &mpsc::Sender<pb::AttachRequest>,
    ) {
        match server_message {
            pb::attach_response::Message::Accepted(_) => {}
            pb::attach_response::Message::Assignment(assignment) => {
                let Some(step) = assignment.step.clone() else { return };
                let full = running_keys(self.running).len() >= self.settings.capacity as usize;
                if draining || full {
                    let reason = if draining { "the runner is draining" } else { "no free slot" };
                    let ack = pb::AssignmentAck {
                        step: Some(step),
                        accepted: false,
                        reason: reason.to_owned(),
                    };
                    let _ = stream_sender
                        .send(message(pb::attach_request::Message::AssignmentAck(ack)))
                        .await;
                    return;
                }
                let cancel = CancellationToken::new();
                if let Ok(mut running) = self.running.lock() {
                    running.insert((step.step_run_id.clone(), step.attempt), cancel.clone());
                }
                let ack = pb::AssignmentAck {
                    step: Some(step.clone()),
                    accepted: true,
                    reason: String::new(),
                };
                let _ = stream_sender
                    .send(message(pb::attach_request::Message::AssignmentAck(ack)))
                    .await;
                tokio::spawn(run_attempt(
                    assignment,
                    cancel,
                    self.running.clone(),
                    self.outbox.clone(),
                    self.message_limit.clone(),
                    self.settings.llm_keys.clone(),
                ));
            }
            pb::attach_response::Message::Cancel(cancel) => {
                let Some(step) = cancel.step else { return };
                let token = self.running.lock().ok().and_then(|running| {
                    running.get(&(step.step_run_id.clone(), step.attempt)).cloned()
                });
                if let Some(token) = token {
                    token.cancel();
                }
                let ack = pb::CancelAck { step: Some(step) };
                let _ =
                    stream_sender.send(message(pb::attach_request::Message::CancelAck(ack))).await;
            }
        }
    }
}

/// Runs one assignment to its end and reports it through the outbox.
async fn run_attempt(
    assignment: pb::StepAssignment,
    cancel: CancellationToken,
    running: Running,
    outbox: mpsc::Sender<pb::AttachRequest>,
    message_limit: MessageLimit,
    llm_keys: Arc<super::executors::llm::LlmKeyPolicy>,
) {
    let Some(step) = assignment.step.clone() else { return };
    let key = (step.step_run_id.clone(), step.attempt);
    let _ = outbox
        .send(message(pb::attach_request::Message::Started(pb::StepStarted {
            step: Some(step.clone()),
        })))
        .await;
    let (logs, mut lines) = LogSink::channel(1024);
    let forward_step = step.clone();
    let forward_outbox = outbox.clone();
    let forward_limit = message_limit.clone();
    let forwarder = tokio::spawn(async move {
        let mut batch = LogBatch::default();
        loop {
            let line = if batch.lines.is_empty() {
                lines.recv().await
            } else {
                match tokio::time::timeout(LOG_BATCH_DELAY, lines.recv()).await {
                    Ok(line) => line,
                    Err(_) => {
                        batch.send(&forward_outbox).await;
                        continue;
                    }
                }
            };
            let Some(line) = line else { break };
            let budget =
                forward_limit.load(Ordering::Relaxed).saturating_sub(MESSAGE_OVERHEAD_BYTES);
            let mut line = pb::StepLogLine {
                step: Some(forward_step.clone()),
                level: line.stream.level() as i32,
                source: line.stream.source() as i32,
                message: line.text,
                time: Some(prost_types::Timestamp::from(line.time)),
            };
            // A line longer than a whole message is cut (the executors already cut at 16 KiB).
            let line_budget = budget / 2;
            if line.message.len() > line_budget {
                let mut end = line_budget;
                while !line.message.is_char_boundary(end) {
                    end -= 1;
                }
                line.message.truncate(end);
            }
            let line_bytes = line.encoded_len() + 8;
            if batch.bytes + line_bytes > budget {
                batch.send(&forward_outbox).await;
            }
            batch.push(line, line_bytes);
            if batch.lines.len() >= LOG_BATCH_LINES {
                batch.send(&forward_outbox).await;
            }
        }
        batch.send(&forward_outbox).await;
    });
    let work = StepWork {
        agent: assignment.agent.unwrap_or_default(),
        input: assignment
            .input
            .as_ref()
            .map(crate::proto::wkt::value_to_json)
            .unwrap_or(serde_json::Value::Null),
        deadline: assignment.deadline.as_ref().map(StepWork::deadline_from_timestamp),
        llm_keys,
    };
    let outcome = executors::execute(work, logs, cancel.clone()).await;
    let _ = forwarder.await;
    let still_ours = running.lock().map(|running| running.contains_key(&key)).unwrap_or(false);
    if !still_ours {
        // The server took it back or cancelled it; it already knows the outcome.
        return;
    }
    let outcome = match outcome {
        // Nested deeper than the server's decoder accepts, it would break the whole stream
        // (and every other step on it): the step fails here instead, saying why.
        Ok(output) if crate::proto::wkt::json_proto_depth(&output) > MAX_SENDABLE_PROTO_DEPTH => {
            let error = StepError::non_retryable(format!(
                "the output is nested {} levels deep, deeper than a runner can send",
                crate::proto::wkt::json_depth(&output)
            ));
            pb::step_result::Outcome::Failure(error.to_failure())
        }
        Ok(output) => pb::step_result::Outcome::Success(pb::StepSuccess {
            output: Some(crate::proto::wkt::json_to_value(&output)),
        }),
        Err(error) => pb::step_result::Outcome::Failure(error.to_failure()),
    };
    let result = pb::StepResult { step: Some(step), outcome: Some(outcome) };
    let result = fit_result(result, message_limit.load(Ordering::Relaxed));
    // The attempt stays held until the session hands the result to a stream.
    let _ = outbox.send(message(pb::attach_request::Message::Result(result))).await;
}

/// A result that fits in a message of `limit` bytes: an output too large to send becomes a
/// failure that says so (the stream would break on it otherwise), an overlong error is cut.
pub(crate) fn fit_result(mut result: pb::StepResult, limit: usize) -> pb::StepResult {
    let budget = limit.saturating_sub(MESSAGE_OVERHEAD_BYTES);
    let size = result.encoded_len();
    if size <= budget {
        return result;
    }
    match &mut result.outcome {
        Some(pb::step_result::Outcome::Success(_)) => {
            let error = StepError::limit_exceeded(format!(
                "the output is about {size} bytes, more than the server accepts in one message \
                 ({limit} bytes; see the server's --max-payload-bytes and --max-message-bytes)"
            ));
            result.outcome = Some(pb::step_result::Outcome::Failure(error.to_failure()));
        }
        Some(pb::step_result::Outcome::Failure(failure)) => {
            let keep = budget / 2;
            if failure.error.len() > keep {
                let mut end = keep;
                while !failure.error.is_char_boundary(end) {
                    end -= 1;
                }
                failure.error.truncate(end);
                failure.error.push('…');
            }
        }
        None => {}
    }
    result
}

/// Log lines waiting to be sent, with their encoded size.
#[derive(Default)]
struct LogBatch {
    lines: Vec<pb::StepLogLine>,
    bytes: usize,
}

impl LogBatch {
    fn push(&mut self, line: pb::StepLogLine, bytes: usize) {
        self.lines.push(line);
        self.bytes += bytes;
    }

    async fn send(&mut self, outbox: &mpsc::Sender<pb::AttachRequest>) {
        if self.lines.is_empty() {
            return;
        }
        let lines = std::mem::take(&mut self.lines);
        self.bytes = 0;
        let batch = pb::StepLogBatch { lines };
        let _ = outbox.send(message(pb::attach_request::Message::Logs(batch))).await;
    }
}

/// What the session does with a message from the outbox before sending it: a result releases
/// its attempt (it is no longer held once it leaves); a result for an attempt this runner no
/// longer holds (the server did not keep it after a reconnect) is dropped.
fn release_reported(request: pb::AttachRequest, running: &Running) -> Option<pb::AttachRequest> {
    if let Some(pb::attach_request::Message::Result(result)) = &request.message {
        let Some(step) = &result.step else { return None };
        let key = (step.step_run_id.clone(), step.attempt);
        let held =
            running.lock().map(|mut running| running.remove(&key).is_some()).unwrap_or(false);
        if !held {
            return None;
        }
    }
    Some(request)
}

fn message(message: pb::attach_request::Message) -> pb::AttachRequest {
    pb::AttachRequest { message: Some(message) }
}

fn running_keys(running: &Running) -> Vec<(String, i32)> {
    running.lock().map(|running| running.keys().cloned().collect()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> pb::StepRef {
        pb::StepRef { step_run_id: "0190f0f0-0000-7000-8000-000000000001".to_owned(), attempt: 2 }
    }

    fn success(text: &str) -> pb::StepResult {
        let output = crate::proto::wkt::json_to_value(&serde_json::json!({ "text": text }));
        pb::StepResult {
            step: Some(step()),
            outcome: Some(pb::step_result::Outcome::Success(pb::StepSuccess {
                output: Some(output),
            })),
        }
    }

    #[test]
    fn results_too_large_for_a_message_become_limit_failures() {
        let small = success("fits");
        assert_eq!(fit_result(small.clone(), 8 * 1024), small);

        let fitted = fit_result(success(&"x".repeat(10_000)), 8 * 1024);
        assert_eq!(fitted.step, Some(step()));
        let Some(pb::step_result::Outcome::Failure(failure)) = fitted.outcome else {
            panic!("expected a failure: {fitted:?}");
        };
        assert_eq!(failure.kind, pb::FailureKind::ResourceLimit as i32);
        assert!(!failure.retryable);
        assert!(failure.error.contains("8192 bytes"), "{}", failure.error);

        let long_error = pb::StepResult {
            step: Some(step()),
            outcome: Some(pb::step_result::Outcome::Failure(pb::StepFailure {
                error: "é".repeat(10_000),
                retryable: true,
                kind: pb::FailureKind::Error as i32,
            })),
        };
        let fitted = fit_result(long_error, 8 * 1024);
        assert!(fitted.encoded_len() <= 8 * 1024, "{}", fitted.encoded_len());
        let Some(pb::step_result::Outcome::Failure(failure)) = fitted.outcome else {
            panic!("still a failure");
        };
        assert!(failure.retryable && failure.error.ends_with('…'));
    }

    #[test]
    fn servers_are_tried_in_turn_with_a_pause_only_after_a_whole_round_fails() {
        let urls = ["http://a:1", "http://b:2", "http://c:3"].map(str::to_owned);
        let mut servers = ServerRotation::new(&urls).expect("valid");
        let current = |servers: &ServerRotation| servers.current().uri().to_string();
        assert_eq!(current(&servers), "http://a:1/");
        // A stream that ends moves to the next server at once, never back to the same one.
        assert_eq!(servers.after_stream_ended(), Duration::ZERO);
        assert_eq!(current(&servers), "http://b:2/");
        // Unreachable servers: the others first, then a pause that doubles.
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), INITIAL_BACKOFF);
        assert_eq!(current(&servers), "http://b:2/");
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), INITIAL_BACKOFF * 2);
        for _ in 0..30 {
            assert!(servers.after_unreachable() <= MAX_BACKOFF);
        }
        // Attached again: the pauses start over.
        servers.after_stream_ended();
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), Duration::ZERO);
        assert_eq!(servers.after_unreachable(), INITIAL_BACKOFF);

        // One server (a load balancer): the same one again, after a pause.
        let mut alone = ServerRotation::new(&["http://lb:8081".to_owned()]).expect("valid");
        assert_eq!(alone.after_stream_ended(), INITIAL_BACKOFF);
        assert_eq!(alone.after_unreachable(), INITIAL_BACKOFF);
        assert_eq!(alone.after_unreachable(), INITIAL_BACKOFF * 2);
        assert_eq!(current(&alone), "http://lb:8081/");
        assert!(ServerRotation::new(&[]).is_err());
    }

    #[test]
    fn a_result_releases_its_attempt_and_one_not_held_is_dropped() {
        let running: Running = Arc::new(Mutex::new(HashMap::new()));
        let held = (step().step_run_id, step().attempt);
        if let Ok(mut running) = running.lock() {
            running.insert(held.clone(), CancellationToken::new());
        }
        let result = message(pb::attach_request::Message::Result(success("done")));
        assert_eq!(release_reported(result.clone(), &running), Some(result.clone()));
        assert!(running_keys(&running).is_empty(), "released once sent");
        assert_eq!(release_reported(result, &running), None, "no longer held: not sent");

        let heartbeat = message(pb::attach_request::Message::Heartbeat(pb::Heartbeat::default()));
        assert_eq!(release_reported(heartbeat.clone(), &running), Some(heartbeat));
    }
}

/// Properties of what the runner sends: a step's output crosses the wire (protobuf `Value`,
/// encoded and decoded) as the JSON it was; a result always fits the message limit, and one
/// that fits already is sent as it is.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use prost::Message as _;

    use super::*;
    use crate::proto::wkt;

    /// JSON as a step produces it: integers a double holds exactly, finite fractions.
    fn output() -> impl Strategy<Value = serde_json::Value> {
        const EXACT: i64 = 1 << 53;
        let scalar = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            (-EXACT + 1..EXACT).prop_map(serde_json::Value::from),
            (-1e12f64..1e12)
                .prop_filter("a fraction", |number| number.fract() != 0.0)
                .prop_map(serde_json::Value::from),
            ".{0,16}".prop_map(serde_json::Value::from),
        ];
        scalar.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn step() -> impl Strategy<Value = pb::StepRef> {
        (any::<u128>(), 0i32..10).prop_map(|(id, attempt)| pb::StepRef {
            step_run_id: uuid::Uuid::from_u128(id).to_string(),
            attempt,
        })
    }

    fn result() -> impl Strategy<Value = pb::StepResult> {
        let outcome = prop_oneof![
            prop_oneof![
                output(),
                (3_000usize..40_000).prop_map(|length| serde_json::Value::from("x".repeat(length))),
            ]
            .prop_map(|output| pb::step_result::Outcome::Success(pb::StepSuccess {
                output: Some(wkt::json_to_value(&output)),
            })),
            (".{0,64}|[a-zé€😀]{2000,12000}", any::<bool>()).prop_map(|(error, retryable)| {
                pb::step_result::Outcome::Failure(pb::StepFailure {
                    error,
                    retryable,
                    kind: pb::FailureKind::Error as i32,
                })
            }),
        ];
        (step(), outcome)
            .prop_map(|(step, outcome)| pb::StepResult { step: Some(step), outcome: Some(outcome) })
    }

    proptest! {
        #[test]
        fn an_output_crosses_the_wire_as_the_json_it_was(output in output(), step in step()) {
            let result = pb::StepResult {
                step: Some(step),
                outcome: Some(pb::step_result::Outcome::Success(pb::StepSuccess {
                    output: Some(wkt::json_to_value(&output)),
                })),
            };
            let sent = message(pb::attach_request::Message::Result(result)).encode_to_vec();
            let received = pb::AttachRequest::decode(sent.as_slice()).expect("decodes");
            let Some(pb::attach_request::Message::Result(pb::StepResult {
                outcome: Some(pb::step_result::Outcome::Success(success)),
                ..
            })) = received.message
            else {
                return Err(TestCaseError::fail("a result with a success"));
            };
            let value = success.output.expect("an output");
            prop_assert_eq!(wkt::value_to_json(&value), output);
        }

        #[test]
        fn a_result_always_fits_and_one_that_fits_is_unchanged(result in result(), limit in MIN_MESSAGE_BYTES..20_000) {
            let fitted = fit_result(result.clone(), limit);
            let budget = limit - MESSAGE_OVERHEAD_BYTES;
            prop_assert!(fitted.encoded_len() <= budget, "{} > {budget}", fitted.encoded_len());
            prop_assert_eq!(&fitted.step, &result.step, "the attempt it reports is kept");
            if result.encoded_len() <= budget {
                prop_assert_eq!(&fitted, &result);
                return Ok(());
            }
            match (&result.outcome, &fitted.outcome) {
                (Some(pb::step_result::Outcome::Success(_)), Some(pb::step_result::Outcome::Failure(failure))) => {
                    prop_assert!(!failure.retryable, "the same output would not fit again");
                    prop_assert!(failure.error.contains("bytes"), "{}", failure.error);
                }
                (Some(pb::step_result::Outcome::Failure(original)), Some(pb::step_result::Outcome::Failure(cut))) => {
                    let kept = cut.error.strip_suffix('…').expect("a cut error ends with …");
                    prop_assert!(original.error.starts_with(kept));
                    prop_assert_eq!(cut.retryable, original.retryable);
                }
                other => return Err(TestCaseError::fail(format!("unexpected outcome {other:?}"))),
            }
        }
    }
}
