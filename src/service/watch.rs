//! `WatchExecution`: one execution's live events for its owner. The stream opens with a
//! snapshot (the execution, its step runs and their attempts, as the database has them), then
//! carries every step transition, every persisted log line and every execution status change,
//! and ends after the execution finishes.
//!
//! The database stays the source of truth; the bus (Redis pub/sub in `serve`, in-process in
//! `dev`) only says what changed and when. The engine publishes each step run's committed row
//! before it acts on the transition, so the rows of one step arrive here in the order they
//! happened, whichever replica made them; a row no newer (by `version`) than the one already
//! sent is skipped. Log lines come in their event as committed (with their ids; an event
//! without them has the watcher read them back from the database by id). When the bus may have
//! lost messages (a lagging subscriber, a reconnect), after `RESYNC_INTERVAL` without any
//! event, and when the execution finishes, the watcher re-reads the execution and sends what
//! changed (never while events may be in flight, which could skip a transition). A stream
//! opened with a session's access token ends (UNAUTHENTICATED) within `SESSION_CHECK_INTERVAL`
//! of that session's logout or revocation, on whichever replica it runs. When the process shuts
//! down, every stream ends with UNAVAILABLE (an `error` event over SSE) saying so.
//! May call: the store and the bus. Never the edges.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::executions::{execution_message, log_message, step_run_message};
use super::validate::parse_id;
use crate::app::AppContext;
use crate::auth::caller::{Access, Caller};
use crate::bus::{BusMessage, BusStream, topics};
use crate::engine::scheduler::{WATCH_EXECUTION, WATCH_LOG, WATCH_STEP};
use crate::error::{ServiceError, ServiceResult};
use crate::proto::v1 as pb;
use crate::proto::wkt;
use crate::store::{
    ExecutionLog, ExecutionLogFilter, MAX_EXECUTION_LOG_PAGE_SIZE, OwnerScope, StepRun, StoreError,
};

/// How long a quiet bus is trusted before the watcher re-reads the execution.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Log ids are taken before commit on PostgreSQL, so two concurrent appends may become visible
/// out of id order: lines delivered in this window are re-read (and skipped when already sent)
/// so a line that commits late is still delivered.
const LOG_REREAD_WINDOW: Duration = Duration::from_secs(5);
/// How often a stream checks that the session it was opened with is still live (revocations
/// reach every replica's `RevokedSessions` through the bus).
const SESSION_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The last event of a stream whose server is shutting down.
pub const SHUTTING_DOWN: &str = "the server is shutting down; watch again to continue";
/// Events buffered for a slow client before the watcher waits for it.
const STREAM_BUFFER: usize = 64;

pub type WatchStream =
    Pin<Box<dyn Stream<Item = ServiceResult<pb::WatchExecutionResponse>> + Send>>;

/// Opens the live event stream of an execution the caller can see (another user's is a 404).
#[tracing::instrument(skip_all, fields(user_id = %caller.user_id))]
pub async fn watch_execution(
    context: Arc<AppContext>,
    caller: &Caller,
    request: pb::WatchExecutionRequest,
) -> ServiceResult<WatchStream> {
    caller.require_user_access(Access::Read)?;
    let execution_id = parse_id("executionId", &request.execution_id)?;
    let scope = caller.owner_scope();
    // Subscribe first, then read: nothing that happens in between is missed.
    let events =
        context.bus.subscribe(&topics::execution(execution_id)).await.map_err(|error| {
            ServiceError::new(
                crate::error::ErrorCode::ServiceUnavailable,
                format!("live events are unavailable: {error}"),
            )
        })?;
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    let mut watcher = Watcher::new(context, scope, execution_id, sender);
    watcher.session_id = match caller.credential {
        crate::auth::caller::Credential::Session { session_id } => Some(session_id),
        _ => None,
    };
    watcher.start().await?;
    let shutting_down = watcher.context.shutting_down.clone();
    tokio::spawn(async move {
        let outcome = tokio::select! {
            outcome = watcher.follow(events) => outcome,
            // The process is stopping: the stream ends cleanly, saying so (a client watches
            // again, through another replica, and starts from a fresh snapshot).
            () = shutting_down.cancelled() => Err(ServiceError::new(
                crate::error::ErrorCode::ServiceUnavailable,
                SHUTTING_DOWN,
            )),
        };
        if let Err(error) = outcome {
            let _ = watcher.sender.send(Err(error)).await;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver)))
}

/// What one stream has delivered so far.
struct Watcher {
    context: Arc<AppContext>,
    scope: OwnerScope,
    execution_id: Uuid,
    sequence: i64,
    /// The version of the execution last sent.
    execution_version: i64,
    finished: bool,
    /// The version of each step run last sent.
    step_versions: HashMap<Uuid, i64>,
    step_keys: HashMap<Uuid, String>,
    /// Every line up to this id was delivered (or will never commit).
    log_cursor: Option<i64>,
    /// Lines delivered after `log_cursor`, with when they were delivered.
    recent_logs: BTreeMap<i64, Instant>,
    sender: mpsc::Sender<ServiceResult<pb::WatchExecutionResponse>>,
    /// Events not yet handed to the client.
    pending: Vec<pb::WatchExecutionResponse>,
    /// The session the stream was opened with, if any: its revocation ends the stream.
    session_id: Option<Uuid>,
}

/// The client went away.
struct Gone;

impl Watcher {
    fn new(
        context: Arc<AppContext>,
        scope: OwnerScope,
        execution_id: Uuid,
        sender: mpsc::Sender<ServiceResult<pb::WatchExecutionResponse>>,
    ) -> Self {
        Self {
            context,
            scope,
            execution_id,
            sequence: 0,
            execution_version: 0,
            finished: false,
            step_versions: HashMap::new(),
            step_keys: HashMap::new(),
            log_cursor: None,
            recent_logs: BTreeMap::new(),
            sender,
            pending: Vec::new(),
            session_id: None,
        }
    }

    /// Reads the execution, queues the snapshot and records what it showed: the versions
    /// every later row is compared with, and the newest log line (the stream carries the
    /// lines after it; earlier ones are paged through `ListExecutionLogs`). A missing or
    /// hidden execution is a 404 here, before the stream starts.
    async fn start(&mut self) -> ServiceResult<()> {
        let (execution, steps, attempts) = self
            .context
            .store
            .get_execution_detail(self.scope, self.execution_id)
            .await
            .map_err(|error| ServiceError::from_store(error, "execution"))?;
        self.log_cursor = self
            .context
            .store
            .latest_execution_log_id(self.execution_id)
            .await
            .map_err(|error| ServiceError::from_store(error, "execution"))?;
        let mut step_runs = Vec::with_capacity(steps.len());
        for step in &steps {
            let own: Vec<_> =
                attempts.iter().filter(|attempt| attempt.step_run_id == step.id).cloned().collect();
            step_runs.push(step_run_message(step, &own));
            self.step_versions.insert(step.id, step.version);
            self.step_keys.insert(step.id, step.step_key.clone());
        }
        self.execution_version = execution.version;
        self.finished = execution.status.is_finished();
        self.send(pb::watch_execution_response::Event::Snapshot(execution_message(
            &execution, step_runs,
        )));
        Ok(())
    }

    async fn read(&self) -> ServiceResult<(crate::store::Execution, Vec<StepRun>)> {
        self.context
            .store
            .get_execution_with_steps(self.scope, self.execution_id)
            .await
            .map_err(|error| ServiceError::from_store(error, "execution"))
    }

    /// Queues an event for the client; `flush` hands it over.
    fn send(&mut self, event: pb::watch_execution_response::Event) {
        self.sequence += 1;
        let message = pb::WatchExecutionResponse {
            sequence: self.sequence,
            time: Some(wkt::timestamp(Utc::now())),
            event: Some(event),
        };
        self.pending.push(message);
    }

    /// Hands queued events to the client, waiting while its buffer is full.
    async fn flush(&mut self) -> Result<(), Gone> {
        for message in self.pending.drain(..) {
            self.sender.send(Ok(message)).await.map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// Relays events until the execution finishes or the client goes away.
    async fn follow(&mut self, mut events: BusStream) -> ServiceResult<()> {
        if self.flush().await.is_err() || self.finished {
            return Ok(());
        }
        // Subscribed before the snapshot was read: every later change is in `events`. Re-reading
        // the database while events are in flight could jump over a transition, so that only
        // happens when the bus says it lost messages, at the end, and after a quiet spell.
        let mut result = Ok(true);
        let mut session_check = tokio::time::interval(SESSION_CHECK_INTERVAL);
        while result.as_ref().is_ok_and(|carry_on| *carry_on) {
            result = tokio::select! {
                biased;
                _ = session_check.tick(), if self.session_id.is_some() => self.session_live(),
                message = events.next() => match message {
                    Some(message) => self.on_message(message).await,
                    // The bus closed the subscription: fall back to reading on the timer.
                    None => {
                        events = futures::stream::pending().boxed();
                        Ok(true)
                    }
                },
                () = tokio::time::sleep(RESYNC_INTERVAL) => self.resync().await,
            };
            if self.flush().await.is_err() {
                return Ok(());
            }
        }
        result.map(|_| ())
    }

    /// `Ok(true)` while the stream's session is live; UNAUTHENTICATED once it was revoked
    /// (a logout, an administrator, a password reset).
    fn session_live(&self) -> ServiceResult<bool> {
        match self.session_id {
            Some(session_id) if self.context.revoked_sessions.is_revoked(session_id) => {
                Err(ServiceError::unauthorized("the session of this stream has ended"))
            }
            _ => Ok(true),
        }
    }

    /// Acts on one bus message; `Ok(false)` once the stream should end.
    async fn on_message(&mut self, message: BusMessage) -> ServiceResult<bool> {
        let payload = match &message {
            BusMessage::Payload(payload) => payload,
            BusMessage::Lagged { .. } | BusMessage::Reconnected => return self.resync().await,
        };
        match payload["kind"].as_str() {
            Some(WATCH_STEP) => {
                // Lines the same commit appended come first, as they happened first.
                if let Some(lines) = payload.get("lines") {
                    match serde_json::from_value::<Vec<ExecutionLog>>(lines.clone()) {
                        Ok(lines) => self.logs_appended(&lines),
                        Err(_) => self.relay_logs().await?,
                    }
                }
                let earlier = match payload.get("earlier") {
                    None => Ok(Vec::new()),
                    Some(rows) => serde_json::from_value::<Vec<StepRun>>(rows.clone()),
                };
                match (earlier, serde_json::from_value::<StepRun>(payload["stepRun"].clone())) {
                    (Ok(earlier), Ok(step_run)) => {
                        for row in earlier.iter().chain([&step_run]) {
                            self.step_changed(row);
                        }
                    }
                    _ => return self.resync().await,
                }
                Ok(true)
            }
            Some(WATCH_LOG) => {
                match serde_json::from_value::<Vec<ExecutionLog>>(payload["lines"].clone()) {
                    Ok(lines) => self.logs_appended(&lines),
                    // Published without its lines: read them back.
                    Err(_) => self.relay_logs().await?,
                }
                Ok(true)
            }
            Some(WATCH_EXECUTION) => self.execution_changed().await,
            _ => Ok(true),
        }
    }

    /// Sends a step run's row when it is newer than the one last sent.
    fn step_changed(&mut self, step_run: &StepRun) {
        if step_run.execution_id != self.execution_id {
            return;
        }
        let last = self.step_versions.get(&step_run.id).copied().unwrap_or(0);
        if step_run.version <= last {
            return;
        }
        self.step_versions.insert(step_run.id, step_run.version);
        self.step_keys.entry(step_run.id).or_insert_with(|| step_run.step_key.clone());
        let transition = pb::StepRunTransition { step_run: Some(step_run_message(step_run, &[])) };
        self.send(pb::watch_execution_response::Event::StepChanged(transition));
    }

    /// The execution changed status: sends it. Once it finished, every step event was
    /// published before this one; a last full read (`resync`) covers lost messages and ends.
    async fn execution_changed(&mut self) -> ServiceResult<bool> {
        let execution = match self.context.store.get_execution(self.scope, self.execution_id).await
        {
            Ok(execution) => execution,
            Err(StoreError::NotFound) => return Ok(false),
            Err(error) => return Err(ServiceError::from_store(error, "execution")),
        };
        if execution.status.is_finished() {
            return self.resync().await;
        }
        self.execution_changed_to(&execution);
        Ok(true)
    }

    /// Sends the execution (without step runs) when it is newer than the one last sent.
    fn execution_changed_to(&mut self, execution: &crate::store::Execution) {
        if execution.version > self.execution_version {
            self.execution_version = execution.version;
            let message = execution_message(execution, Vec::new());
            self.send(pb::watch_execution_response::Event::ExecutionChanged(message));
        }
    }

    /// Re-reads the execution and sends whatever changed since it was last sent: step rows,
    /// log lines, then the execution itself. `Ok(false)` once it has finished.
    async fn resync(&mut self) -> ServiceResult<bool> {
        let (execution, steps) = match self.read().await {
            Ok(read) => read,
            // Deleted while watched: the stream ends.
            Err(error) if error.code == crate::error::ErrorCode::NotFound => return Ok(false),
            Err(error) => return Err(error),
        };
        for step in &steps {
            self.step_changed(step);
        }
        self.relay_logs().await?;
        self.execution_changed_to(&execution);
        self.finished = execution.status.is_finished();
        Ok(!self.finished)
    }

    /// Sends the lines of a log event (as committed) not sent yet.
    fn logs_appended(&mut self, lines: &[ExecutionLog]) {
        self.settle_logs();
        let now = Instant::now();
        for line in lines {
            let sent_before = self.log_cursor.is_some_and(|cursor| line.id <= cursor)
                || self.recent_logs.contains_key(&line.id);
            if line.execution_id != self.execution_id || sent_before {
                continue;
            }
            self.recent_logs.insert(line.id, now);
            let message = log_message(line, &self.step_keys);
            self.send(pb::watch_execution_response::Event::Log(message));
        }
    }

    /// Moves the log cursor past the lines delivered long enough ago to be settled.
    fn settle_logs(&mut self) {
        let settled_before = Instant::now().checked_sub(LOG_REREAD_WINDOW);
        let settled: Vec<i64> = self
            .recent_logs
            .iter()
            .filter(|(_, delivered)| settled_before.is_some_and(|limit| **delivered <= limit))
            .map(|(id, _)| *id)
            .collect();
        if let Some(newest_settled) = settled.iter().max() {
            self.log_cursor =
                Some(self.log_cursor.map_or(*newest_settled, |cursor| cursor.max(*newest_settled)));
            self.recent_logs.retain(|id, _| *id > *newest_settled);
        }
    }

    /// Sends the log lines persisted since the last ones sent.
    async fn relay_logs(&mut self) -> ServiceResult<()> {
        self.settle_logs();
        let mut after_id = self.log_cursor;
        loop {
            let page = match self
                .context
                .store
                .list_execution_logs(
                    self.scope,
                    self.execution_id,
                    ExecutionLogFilter {
                        step_run_id: None,
                        minimum_level: None,
                        after_id,
                        limit: MAX_EXECUTION_LOG_PAGE_SIZE,
                    },
                )
                .await
            {
                Ok(page) => page,
                Err(StoreError::NotFound) => return Ok(()),
                Err(error) => return Err(ServiceError::from_store(error, "execution")),
            };
            let now = Instant::now();
            for line in &page.items {
                after_id = Some(line.id);
                if self.recent_logs.contains_key(&line.id) {
                    continue;
                }
                self.recent_logs.insert(line.id, now);
                let message = log_message(line, &self.step_keys);
                self.send(pb::watch_execution_response::Event::Log(message));
            }
            if page.next_cursor.is_none() || page.items.is_empty() {
                return Ok(());
            }
        }
    }
}
