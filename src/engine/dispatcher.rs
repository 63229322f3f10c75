//! Handing queued steps to runners. The loop peeks the ready queue in order (priority, then
//! age), places each item on the least loaded attached runner that accepts it (owner, agent
//! type, labels) and has a free slot, claims it, commits the assignment with its lease, and
//! only then acknowledges the queue entry and sends the assignment. An item no runner here can
//! take stays in the queue for another replica (or a runner yet to come). A step that becomes
//! ready while a runner here has a free slot for it skips the queue (`hand_off`). An assignment
//! the runner does not acknowledge in time is taken back. An entry whose step run or execution
//! the database does not know is dropped with one warning naming it. A pass that fails (the
//! database or Redis unreachable) is retried with a growing pause, warned about once per outage.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use uuid::Uuid;

use super::attached_runners::{AttachedRunner, Placement};
use super::definition::{ExecutionDefinition, FixedFacts};
use super::scheduler::step_ref;
use super::{Engine, EngineResult};
use crate::proto::v1 as pb;
use crate::queue::QueueItem;
use crate::store::{AttemptKey, OwnerScope, StepAssignment, StepRun, StepRunStatus, StoreError};

/// What an assignment needs to know of its execution and step.
struct AssignmentFacts {
    definition: Arc<ExecutionDefinition>,
    facts: FixedFacts,
    step_key: String,
}

/// An assignment worked out before its commit (`prepare_assignment`).
pub(super) struct PreparedAssignment {
    pub(super) assignment: StepAssignment,
    agent: pb::Agent,
    deadline: chrono::DateTime<Utc>,
    depth: i32,
}

/// What became of one placement.
enum Placed {
    Assigned,
    /// The item no longer matches the database: drop it.
    Stale,
}

/// What one pass of the dispatcher saw and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchPass {
    /// Queue entries it looked at; `None` when it did not look (no runner here has a free
    /// slot).
    pub peeked: Option<usize>,
    /// Steps it assigned.
    pub assigned: usize,
}

/// The most ready items one pass looks at.
const PEEK_BATCH: usize = 256;
/// Ready items a pass looks at first per free slot of the runners here…
const PEEK_PER_FREE_SLOT: usize = 4;
/// …and at least.
const PEEK_AT_LEAST: usize = 16;
/// How many of them are being placed at once.
const PLACING_AT_ONCE: usize = 32;
/// Extra time past an attempt's deadline before the server takes it back as timed out.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(5);

impl Engine {
    pub(super) async fn run_dispatcher(self: Arc<Self>) {
        let mut ready = self.queue.subscribe_ready();
        let mut outage = crate::outage::Outage::new("dispatching");
        // Ends between passes, never within one: every claim it made is acknowledged or
        // released, so a replica that stops hands its queue work back.
        while !self.stopping.is_cancelled() {
            ready.borrow_and_update();
            let capacity = self.attached_runners.capacity_changed.notified();
            tokio::pin!(capacity);
            capacity.as_mut().enable();
            // A slot freed while the queue is empty needs no pass (steps that become ready
            // then are handed to runners directly); anything queued meanwhile wakes `ready`.
            let queue_empty = match self.dispatch_once().await {
                Ok(pass) => {
                    // Only a pass that read the queue says it works again (one that had no
                    // slot to fill did not ask Redis anything).
                    if pass.peeked.is_some() {
                        outage.succeeded();
                    }
                    pass.peeked == Some(0)
                }
                Err(error) => {
                    // The database or Redis is away: pause (growing) instead of waking on
                    // every freed slot, and say so once per outage.
                    let pause = outage.failed(&error);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.stopping.cancelled() => {}
                    }
                    continue;
                }
            };
            tokio::select! {
                _ = ready.changed() => {}
                () = &mut capacity, if !queue_empty => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.stopping.cancelled() => {}
            }
        }
    }

    /// One pass over the ready queue. Up to `PLACING_AT_ONCE` items are placed at once; each
    /// takes its runner's slot before any round trip, so the placements that follow see the
    /// slot taken. `peeked` is `None` when it did not look (no runner here has a free slot).
    pub async fn dispatch_once(self: &Arc<Self>) -> EngineResult<DispatchPass> {
        // Nothing can be placed while every runner here is full (or none is attached): the
        // queue is not even read; a slot that frees wakes the loop.
        let free: usize =
            self.attached_runners.all().iter().map(|runner| runner.free_slots()).sum();
        if free == 0 {
            return Ok(DispatchPass { peeked: None, assigned: 0 });
        }
        // As many entries as the free slots can take, a few times over (some may be for
        // runners elsewhere); all of `PEEK_BATCH` when those placed none.
        let first_look = (free * PEEK_PER_FREE_SLOT).clamp(PEEK_AT_LEAST, PEEK_BATCH);
        let mut pass = self.dispatch_from(first_look).await?;
        if pass.assigned == 0 && pass.peeked == Some(first_look) && first_look < PEEK_BATCH {
            pass = self.dispatch_from(PEEK_BATCH).await?;
        }
        Ok(pass)
    }

    /// A pass over the first `limit` entries of the ready queue: it holds a runner's slot for
    /// each entry one here can take, claims them all in one round trip, places the claimed
    /// ones (`PLACING_AT_ONCE` at a time) and acknowledges the settled ones in one round trip.
    async fn dispatch_from(self: &Arc<Self>, limit: usize) -> EngineResult<DispatchPass> {
        let mut duplicates = Vec::new();
        let items = self.queue.peek(limit).await?;
        let peeked = items.len();
        // The most urgent entry left waiting for a slot of a runner here (entries come most
        // urgent first, so the first one found is it).
        let mut waiting = None;
        let mut picked = Vec::new();
        for item in items {
            let placement = Placement {
                owner_id: item.owner_id,
                agent_type: &item.agent_type,
                required_labels: &item.required_labels,
            };
            let Some(runner) = self.attached_runners.pick(&placement) else {
                if waiting.is_none() && self.attached_runners.any_accepts(&placement) {
                    waiting = Some(item.priority);
                }
                continue;
            };
            let key = attempt_of(&item);
            if runner.held(key).is_some() {
                // The runner holds this very attempt: the entry is a late duplicate (offered
                // again while the step was being assigned). Drop it rather than claim it over
                // and over while the step runs.
                duplicates.push(item.key());
                continue;
            }
            if !runner.hold(key, item.execution_id, provisional_deadline(Utc::now())) {
                // The slot went meanwhile (the runner started draining): the next pass.
                waiting.get_or_insert(item.priority);
                continue;
            }
            picked.push((runner, item));
        }
        self.waiting_priority.store(
            waiting.unwrap_or(crate::queue::MIN_PRIORITY),
            std::sync::atomic::Ordering::Relaxed,
        );
        let placed = self.place_all(picked).await;
        for duplicate in duplicates {
            self.queue.remove(duplicate).await?;
        }
        let assigned = placed?;
        Ok(DispatchPass { peeked: Some(peeked), assigned })
    }

    /// Claims the `picked` entries (each with its runner, whose slot is held for it), assigns
    /// the claimed ones and acknowledges those settled (assigned, or stale); answers how many
    /// it assigned. A slot is freed again unless its assignment was made; an entry whose
    /// assignment failed goes back to the queue.
    async fn place_all(
        self: &Arc<Self>,
        picked: Vec<(Arc<AttachedRunner>, QueueItem)>,
    ) -> EngineResult<usize> {
        if picked.is_empty() {
            return Ok(0);
        }
        let keys: Vec<_> = picked.iter().map(|(_, item)| item.key()).collect();
        let claim_timeout = self.settings.acknowledgement_timeout * 2;
        let claimed = match self.queue.claim_many(&keys, claim_timeout).await {
            Ok(claimed) => claimed,
            Err(error) => {
                for (runner, item) in &picked {
                    self.release_slot(runner, attempt_of(item));
                }
                return Err(error.into());
            }
        };
        let mut placing = FuturesUnordered::new();
        let mut settled = Vec::new();
        let mut assigned = 0;
        let mut failure = None;
        let mut tally = |(key, placed): (crate::queue::QueueKey, EngineResult<bool>)| match placed {
            Ok(made) => {
                assigned += usize::from(made);
                settled.push(key);
            }
            Err(error) => {
                failure.get_or_insert(error);
            }
        };
        for ((runner, item), claimed) in picked.into_iter().zip(claimed) {
            if !claimed {
                // Another replica took it, or it left the queue since the peek.
                self.release_slot(&runner, attempt_of(&item));
                continue;
            }
            placing.push(async move { (item.key(), self.place(runner, item).await) });
            if placing.len() >= PLACING_AT_ONCE
                && let Some(placed) = placing.next().await
            {
                tally(placed);
            }
        }
        while let Some(placed) = placing.next().await {
            tally(placed);
        }
        if !settled.is_empty() {
            self.queue.ack_many(&settled).await?;
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(assigned),
        }
    }

    /// A runner attached here that accepts `item` and has a free slot, the slot held for attempt
    /// `key` from `now` (with a provisional deadline until the assignment knows the step's own).
    pub(super) fn hold_slot(
        &self,
        item: &QueueItem,
        key: AttemptKey,
        now: chrono::DateTime<Utc>,
    ) -> Option<Arc<AttachedRunner>> {
        let placement = Placement {
            owner_id: item.owner_id,
            agent_type: &item.agent_type,
            required_labels: &item.required_labels,
        };
        let provisional = provisional_deadline(now);
        self.attached_runners
            .pick(&placement)
            .filter(|runner| runner.hold(key, item.execution_id, provisional))
    }

    /// Frees the slot `runner` held for `key`, and tells the dispatcher when that freed one.
    pub(super) fn release_slot(&self, runner: &AttachedRunner, key: AttemptKey) {
        if runner.release(key) {
            self.attached_runners.capacity_changed.notify_waiters();
        }
    }

    /// Assigns a step that has just become ready (still PENDING, with its resolved `input`)
    /// straight to a runner attached here that accepts it and has a free slot: one commit
    /// (PENDING -> ASSIGNED) and none of the ready queue's round trips. `None` when no runner
    /// here can take it now: the caller queues it. A free slot means the dispatcher found
    /// nothing older for that runner, so this does not jump the queue.
    pub(super) async fn hand_off(
        self: &Arc<Self>,
        item: &QueueItem,
        input: Option<serde_json::Value>,
    ) -> Option<EngineResult<()>> {
        let key = attempt_of(item);
        let runner = self.hold_slot(item, key, Utc::now())?;
        let placed = self.assign(&runner, item, Some(input)).await;
        if !matches!(placed, Ok(Placed::Assigned)) {
            self.release_slot(&runner, key);
        }
        // Refused (the step moved on, or its execution is ending): nothing to queue.
        Some(placed.map(|_| ()))
    }

    /// Assigns the claimed `item` to `runner` (whose slot is already held for it): `true` when
    /// made, `false` when the step moved on (cancelled, finished, another attempt), whose entry
    /// is to be dropped too. The slot is freed again unless the assignment was made; an entry
    /// whose assignment failed goes back to the queue here.
    async fn place(
        self: &Arc<Self>,
        runner: Arc<AttachedRunner>,
        item: QueueItem,
    ) -> EngineResult<bool> {
        let key = attempt_of(&item);
        match self.assign(&runner, &item, None).await {
            Ok(Placed::Assigned) => Ok(true),
            Ok(Placed::Stale) => {
                self.release_slot(&runner, key);
                Ok(false)
            }
            Err(error) => {
                self.release_slot(&runner, key);
                let _ = self.queue.release(item.key()).await;
                Err(error)
            }
        }
    }

    /// Commits the assignment of `item` to `runner` (holding its slot) and sends it. `pending`
    /// holds the input of a step that is still PENDING (`hand_off`): it is queued and assigned
    /// in one commit, and watchers hear of both transitions.
    #[tracing::instrument(
        level = "debug",
        skip_all,
        fields(execution_id = %item.execution_id, step_run_id = %item.step_run_id, attempt = item.attempt, runner_id = %runner.id)
    )]
    async fn assign(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        item: &QueueItem,
        pending: Option<Option<serde_json::Value>>,
    ) -> EngineResult<Placed> {
        let key = attempt_of(item);
        let Some(known) = self.assignment_facts(item).await? else { return Ok(Placed::Stale) };
        let Some(prepared) = self.prepare_assignment(
            runner,
            key,
            &known.definition,
            &known.facts,
            &known.step_key,
            Utc::now(),
        ) else {
            return Ok(Placed::Stale);
        };
        let handed = pending.is_some();
        let committed = match pending {
            None => self.assigning.submit(key, (key, prepared.assignment.clone())).await,
            Some(input) => {
                self.handing.submit(key, (key, input, prepared.assignment.clone())).await
            }
        };
        let assigned = match committed {
            Ok(Some(assigned)) => assigned,
            // The caller frees the slot.
            Ok(None) => return Ok(Placed::Stale),
            Err(error) => return Err(error.into()),
        };
        let earlier = if handed { vec![as_queued(&assigned)] } else { Vec::new() };
        self.publish_step_after(&earlier, &assigned).await;
        self.send_assignment(runner, item.execution_id, assigned, prepared).await;
        // A runner whose stream is gone loses the attempt when its lease runs out.
        Ok(Placed::Assigned)
    }

    /// What the assignment at `now` of attempt `key` (step `step_key`) to `runner`, whose slot
    /// is held for it, commits and sends: its deadline (set on the slot) and lease; `None` when
    /// the definition lacks the step or its agent.
    pub(super) fn prepare_assignment(
        &self,
        runner: &AttachedRunner,
        key: AttemptKey,
        definition: &ExecutionDefinition,
        facts: &FixedFacts,
        step_key: &str,
        now: chrono::DateTime<Utc>,
    ) -> Option<PreparedAssignment> {
        let step = definition.step(step_key)?;
        let agent = definition.agent_of(step).cloned()?;
        let step_timeout = chrono::Duration::from_std(definition.step_timeout(step))
            .unwrap_or_else(|_| chrono::Duration::seconds(300));
        let mut deadline = now + step_timeout;
        if let Some(execution_deadline) = facts.deadline_at {
            deadline = deadline.min(execution_deadline);
        }
        let lease_until = lease_end(now, self.settings.lease_duration, deadline);
        runner.set_deadline(key, deadline);
        let assignment = StepAssignment {
            runner_id: runner.id.clone(),
            lease_expires_at: lease_until,
            assigned_at: now,
        };
        Some(PreparedAssignment { assignment, agent, deadline, depth: facts.depth })
    }

    /// After the commit of an assignment (`assigned`, the row as committed) and after watchers
    /// were told of it: keeps the row on the runner's slot, grants the lease and sends the
    /// assignment to the runner.
    pub(super) async fn send_assignment(
        self: &Arc<Self>,
        runner: &Arc<AttachedRunner>,
        execution_id: Uuid,
        assigned: StepRun,
        prepared: PreparedAssignment,
    ) {
        let key = assigned.attempt_key();
        let assigned = Arc::new(assigned);
        runner.set_assigned_row(key, assigned.clone());
        super::metrics::step_assigned(&assigned, &prepared.agent);
        self.leases.granted(key, prepared.assignment.lease_expires_at);
        let message = pb::StepAssignment {
            step: Some(step_ref(key)),
            execution_id: execution_id.to_string(),
            step_key: assigned.step_key.clone(),
            agent: Some(prepared.agent),
            input: Some(crate::proto::wkt::json_to_value(
                assigned.input.as_ref().unwrap_or(&serde_json::Value::Null),
            )),
            deadline: Some(crate::proto::wkt::timestamp(prepared.deadline)),
            depth: prepared.depth,
        };
        if runner.send(pb::attach_response::Message::Assignment(message)).await {
            self.watch_acknowledgement(runner.clone(), key, execution_id);
        }
    }

    /// What assigning `item` needs beyond the queue entry: from memory when this process
    /// keeps the execution's definition and the entry names its step (the assignment's own
    /// compare-and-set then refuses a step or an execution that moved on); from the database
    /// otherwise. `None`: the entry is stale.
    async fn assignment_facts(
        self: &Arc<Self>,
        item: &QueueItem,
    ) -> EngineResult<Option<AssignmentFacts>> {
        if !item.step_key.is_empty()
            && let Some((definition, facts)) = self.definitions.known(item.execution_id)
        {
            return Ok(Some(AssignmentFacts {
                definition,
                facts,
                step_key: item.step_key.clone(),
            }));
        }
        let step_run = match self.store.get_step_run(item.step_run_id).await {
            Ok(step_run) => step_run,
            Err(StoreError::NotFound) => return Ok(dangling(item)),
            Err(error) => return Err(error.into()),
        };
        if step_run.attempt != item.attempt || step_run.status != StepRunStatus::Queued {
            return Ok(None);
        }
        let execution = match self.store.get_execution(OwnerScope::All, item.execution_id).await {
            Ok(execution) => execution,
            Err(StoreError::NotFound) => return Ok(dangling(item)),
            Err(error) => return Err(error.into()),
        };
        if execution.status.is_finished() || execution.cancel_requested_at.is_some() {
            return Ok(None);
        }
        let Ok(definition) = self.definition(&execution) else {
            self.advance(execution.id).await?;
            return Ok(None);
        };
        let facts = FixedFacts::of(&execution);
        Ok(Some(AssignmentFacts { definition, facts, step_key: step_run.step_key }))
    }

    /// Takes the attempt back if the runner has not acknowledged it in time.
    fn watch_acknowledgement(
        self: &Arc<Self>,
        runner: Arc<AttachedRunner>,
        key: AttemptKey,
        execution_id: Uuid,
    ) {
        let engine = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(engine.settings.acknowledgement_timeout).await;
            let unacknowledged = runner.held(key).is_some_and(|held| !held.acknowledged);
            if !unacknowledged {
                return;
            }
            tracing::warn!(runner_id = %runner.id, step_run_id = %key.step_run_id, "assignment not acknowledged in time; taking it back");
            engine
                .cancel_on_runner(&runner, key, "the assignment was not acknowledged in time")
                .await;
            if let Err(error) = engine.take_back(key).await {
                tracing::warn!(%error, %execution_id, "taking back an unacknowledged step failed; the reconciler will");
            }
        });
    }
}

/// A queue entry whose step run or execution the database does not know (a Redis that outlived
/// its database, a restore, another installation sharing the key prefix): it is stale like any
/// other and is dropped (`Placed::Stale` acknowledges it), said once, by name, so the entries
/// behind it are dispatched instead of this one failing every pass.
fn dangling<T>(item: &QueueItem) -> Option<T> {
    tracing::warn!(
        entry = %item.key(),
        execution_id = %item.execution_id,
        "dropping a queue entry the database does not know"
    );
    None
}

/// The step run as it was between its queueing and its assignment, which one commit made.
pub(super) fn as_queued(assigned: &StepRun) -> StepRun {
    StepRun {
        status: StepRunStatus::Queued,
        runner_id: None,
        lease_expires_at: None,
        assigned_at: None,
        version: assigned.version - 1,
        ..assigned.clone()
    }
}

fn attempt_of(item: &QueueItem) -> AttemptKey {
    AttemptKey { step_run_id: item.step_run_id, attempt: item.attempt }
}

/// Counts one placement's outcome, keeping the first failure.
/// The deadline of a slot held at `now` until the assignment knows the step's own.
pub(super) fn provisional_deadline(now: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    now + chrono::Duration::seconds(30)
}

/// The end of a lease granted or extended at `now`: a lease duration later, but never past the
/// attempt's deadline plus the grace.
pub fn lease_end(
    now: chrono::DateTime<Utc>,
    lease_duration: Duration,
    deadline: chrono::DateTime<Utc>,
) -> chrono::DateTime<Utc> {
    let lease = chrono::Duration::from_std(lease_duration)
        .unwrap_or_else(|_| chrono::Duration::seconds(30));
    let grace =
        chrono::Duration::from_std(DEADLINE_GRACE).unwrap_or_else(|_| chrono::Duration::seconds(5));
    (now + lease).min(deadline + grace)
}
