//! The runner's side of `RunnerService.Attach`: connect with an API key, say hello, run each
//! assignment with the executors (up to the announced capacity), stream its logs in batches,
//! heartbeat the attempts it holds, report results, obey cancels. A broken stream is reopened
//! with backoff, telling the server which attempts are still running so it keeps them. On
//! shutdown the runner says it is draining, keeps heartbeating, finishes what it holds (or hands
//! it back when the grace period ends) and leaves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::executors::{self, LogSink, StepWork};
use crate::proto::v1::{self as pb, runner_service_client::RunnerServiceClient};

/// Lines sent in one log batch at most.
const LOG_BATCH_LINES: usize = 200;
/// How long log lines wait to be batched.
const LOG_BATCH_DELAY: Duration = Duration::from_millis(200);

/// How a runner connects and what it offers.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// The server's gRPC address, e.g. `http://127.0.0.1:8080`.
    pub server_url: String,
    /// An API key with the `runner` scope (sent as `x-api-key`).
    pub api_key: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub agent_types: Vec<pb::AgentType>,
    /// How long a draining runner waits for its steps before it hands them back.
    pub drain_grace: Duration,
    pub max_message_bytes: usize,
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

/// The attempts running here, by (step run id, attempt), with their cancel switches.
type Running = Arc<Mutex<HashMap<(String, i32), CancellationToken>>>;

/// Runs until `shutdown` turns true (then drains) or the server refuses the credentials.
pub async fn run(
    settings: RunnerSettings,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), RunnerError> {
    let endpoint = tonic::transport::Endpoint::from_shared(settings.server_url.clone())
        .map_err(|_| RunnerError::InvalidServer(settings.server_url.clone()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let running: Running = Arc::new(Mutex::new(HashMap::new()));
    // Messages survive a broken stream here until the next connection sends them.
    let (outbox, mut outbox_receiver) = mpsc::channel::<pb::AttachRequest>(1024);
    let mut runner_id = String::new();
    let mut backoff = Duration::from_millis(200);
    let mut draining = *shutdown.borrow();
    loop {
        if draining && running_keys(&running).is_empty() {
            return Ok(());
        }
        let session = Session { settings: &settings, running: &running, outbox: &outbox };
        match session
            .connect_and_serve(
                &endpoint,
                &mut runner_id,
                &mut outbox_receiver,
                &mut shutdown,
                &mut draining,
            )
            .await
        {
            Ok(SessionEnd::Drained) => return Ok(()),
            Ok(SessionEnd::Broken) => {
                backoff = Duration::from_millis(200);
            }
            Err(SessionError::Refused(reason)) => return Err(RunnerError::Refused(reason)),
            Err(SessionError::Unreachable(reason)) => {
                tracing::warn!(%reason, retry_in = ?backoff, "cannot reach the server");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => { draining = true; }
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

enum SessionEnd {
    Drained,
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
            Ok(_) => return Ok(SessionEnd::Broken),
            Err(status) => return Err(SessionError::Unreachable(status.message().to_owned())),
        };
        *runner_id = accepted.runner_id.clone();
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
        tracing::info!(runner_id = %runner_id, kept = kept.len(), "attached to the server");
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
                    let _ = stream_sender.send(request).await;
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
                    Ok(None) | Err(_) => return Ok(SessionEnd::Broken),
                },
                Some(request) = outbox_receiver.recv() => {
                    if stream_sender.send(request).await.is_err() {
                        return Ok(SessionEnd::Broken);
                    }
                }
                _ = heartbeat.tick() => {
                    let running = running_keys(self.running)
                        .into_iter()
                        .map(|(step_run_id, attempt)| pb::StepRef { step_run_id, attempt })
                        .collect();
                    let beat = message(pb::attach_request::Message::Heartbeat(pb::Heartbeat { running }));
                    if stream_sender.send(beat).await.is_err() {
                        return Ok(SessionEnd::Broken);
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
    let forwarder = tokio::spawn(async move {
        let mut batch = Vec::new();
        loop {
            let line = if batch.is_empty() {
                lines.recv().await
            } else {
                match tokio::time::timeout(LOG_BATCH_DELAY, lines.recv()).await {
                    Ok(line) => line,
                    Err(_) => {
                        send_logs(&forward_outbox, &mut batch).await;
                        continue;
                    }
                }
            };
            let Some(line) = line else { break };
            batch.push(pb::StepLogLine {
                step: Some(forward_step.clone()),
                level: line.stream.level() as i32,
                source: line.stream.source() as i32,
                message: line.text,
                time: Some(prost_types::Timestamp::from(line.time)),
            });
            if batch.len() >= LOG_BATCH_LINES {
                send_logs(&forward_outbox, &mut batch).await;
            }
        }
        send_logs(&forward_outbox, &mut batch).await;
    });
    let work = StepWork {
        agent: assignment.agent.unwrap_or_default(),
        input: assignment
            .input
            .as_ref()
            .map(crate::service::convert::value_to_json)
            .unwrap_or(serde_json::Value::Null),
        deadline: assignment.deadline.as_ref().map(StepWork::deadline_from_timestamp),
    };
    let outcome = executors::execute(work, logs, cancel.clone()).await;
    let _ = forwarder.await;
    let still_ours =
        running.lock().map(|mut running| running.remove(&key).is_some()).unwrap_or(false);
    if !still_ours {
        // The server took it back or cancelled it; it already knows the outcome.
        return;
    }
    let outcome = match outcome {
        Ok(output) => pb::step_result::Outcome::Success(pb::StepSuccess {
            output: Some(crate::service::convert::json_to_value(&output)),
        }),
        Err(error) => pb::step_result::Outcome::Failure(error.to_failure()),
    };
    let result = pb::StepResult { step: Some(step), outcome: Some(outcome) };
    let _ = outbox.send(message(pb::attach_request::Message::Result(result))).await;
}

async fn send_logs(outbox: &mpsc::Sender<pb::AttachRequest>, batch: &mut Vec<pb::StepLogLine>) {
    if batch.is_empty() {
        return;
    }
    let lines = std::mem::take(batch);
    let _ =
        outbox.send(message(pb::attach_request::Message::Logs(pb::StepLogBatch { lines }))).await;
}

fn message(message: pb::attach_request::Message) -> pb::AttachRequest {
    pb::AttachRequest { message: Some(message) }
}

fn running_keys(running: &Running) -> Vec<(String, i32)> {
    running.lock().map(|running| running.keys().cloned().collect()).unwrap_or_default()
}
