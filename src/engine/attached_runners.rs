//! The runners attached to this server process: what each can run (types, labels, owner), how
//! many slots it has free, which attempts it holds, and the channel its stream is fed from.
//! The dispatcher picks runners here; the runner stream (`RunnerService.Attach`) registers and
//! updates them.
//! May call: tokio, the proto types (`crate::proto`) and the store's `AttemptKey`; no I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::proto::v1 as pb;
use crate::store::{AttemptKey, NewExecutionLog, StepRun};

/// What the server sends down a runner's stream.
pub type RunnerSender = mpsc::Sender<Result<pb::AttachResponse, tonic::Status>>;

/// Who a runner works for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerOwner {
    /// Attached with an admin's shared key: serves every user's executions.
    Shared,
    /// Serves only this user's executions.
    User(Uuid),
}

/// What a runner was granted when it attached, kept so its right to work can be re-checked
/// whenever its key or the key's owner changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerGrant {
    pub owner: RunnerOwner,
    /// The API key it attached with; `None` for the in-process runner of `dev`, whose
    /// credential lives and dies with the process.
    pub api_key_id: Option<Uuid>,
}

/// An attempt a runner holds, whether it acknowledged the assignment yet, and whether it was
/// told to cancel it (the slot stays taken until the runner acknowledges the cancel).
#[derive(Debug, Clone)]
pub struct HeldStep {
    pub execution_id: Uuid,
    pub acknowledged: bool,
    pub cancelling: bool,
    pub assigned_at: DateTime<Utc>,
    /// The attempt must end by then; heartbeats never extend its lease past it.
    pub deadline: DateTime<Utc>,
    /// The step run as its assignment committed it (what a start is told from).
    pub assigned_row: Option<Arc<StepRun>>,
    /// When the runner said it started the attempt.
    pub started_at: Option<DateTime<Utc>>,
    /// Whether watchers were told of that start (`announce_start`).
    pub start_announced: bool,
}

/// One attached runner.
pub struct AttachedRunner {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Agent types by their short names (`CODE`, `API`, …).
    pub agent_types: HashSet<String>,
    pub capacity: usize,
    pub owner: RunnerOwner,
    /// The API key it attached with (see `RunnerGrant`).
    pub api_key_id: Option<Uuid>,
    pub version: String,
    /// Whether it sandboxes CODE and DATA steps, and what its kernel lacks if not.
    pub sandbox: pb::RunnerSandbox,
    pub sandbox_missing: String,
    pub connected_at: DateTime<Utc>,
    sender: RunnerSender,
    state: Mutex<RunnerState>,
    /// Notified once when the server withdraws the runner's right to work: its stream ends.
    withdrawn: Notify,
}

#[derive(Default)]
struct RunnerState {
    held: HashMap<AttemptKey, HeldStep>,
    /// Log lines of held attempts waiting to travel with their results (or to be flushed).
    logs: HashMap<AttemptKey, Vec<NewExecutionLog>>,
    draining: bool,
    last_heartbeat_at: Option<DateTime<Utc>>,
}

/// Whether a runner whose labels `have` looks up carries every `required` label (a required
/// label with an empty value only needs the key): how the dispatcher matches steps to runners.
pub fn labels_satisfy<'a>(
    required: &BTreeMap<String, String>,
    have: impl Fn(&str) -> Option<&'a String>,
) -> bool {
    required
        .iter()
        .all(|(key, value)| have(key).is_some_and(|have| value.is_empty() || have == value))
}

/// What the dispatcher needs to know of a queue item to place it.
pub struct Placement<'a> {
    pub owner_id: Uuid,
    pub agent_type: &'a str,
    pub required_labels: &'a BTreeMap<String, String>,
}

impl AttachedRunner {
    #[expect(clippy::too_many_arguments, reason = "one field of the hello each")]
    pub fn new(
        id: String,
        name: String,
        labels: BTreeMap<String, String>,
        agent_types: HashSet<String>,
        capacity: usize,
        grant: RunnerGrant,
        version: String,
        sender: RunnerSender,
    ) -> Self {
        Self {
            id,
            name,
            labels,
            agent_types,
            capacity,
            owner: grant.owner,
            api_key_id: grant.api_key_id,
            version,
            sandbox: pb::RunnerSandbox::Unspecified,
            sandbox_missing: String::new(),
            connected_at: Utc::now(),
            sender,
            state: Mutex::new(RunnerState::default()),
            withdrawn: Notify::new(),
        }
    }

    pub fn grant(&self) -> RunnerGrant {
        RunnerGrant { owner: self.owner, api_key_id: self.api_key_id }
    }

    /// Ends the runner's stream from the server's side: `status` is the last thing the runner
    /// reads, and whoever pumps its inbound stream (`withdrawn`) stops reading.
    pub fn withdraw(&self, status: tonic::Status) {
        // The stream may be full or gone; the runner then learns it when the stream closes.
        let _ = self.sender.try_send(Err(status));
        self.withdrawn.notify_one();
    }

    /// Ends the runner's stream from the server's side with `status` (UNAVAILABLE: attach again,
    /// to another replica) while its inbound stream is still read to its end, so whatever the
    /// runner sent before it read `status` is applied; the runner then closes its side and
    /// reconnects, naming the attempts it still holds. `false` when the stream had no room for
    /// `status` within `patience`.
    pub async fn ask_to_move(&self, status: tonic::Status, patience: std::time::Duration) -> bool {
        matches!(tokio::time::timeout(patience, self.sender.send(Err(status))).await, Ok(Ok(())))
    }

    /// Resolves once `withdraw` was called (at once if it was called already).
    pub async fn withdrawn(&self) {
        self.withdrawn.notified().await;
    }

    /// Sends a message without waiting for room in the stream; `false` when there was none.
    pub fn try_send(&self, message: pb::attach_response::Message) -> bool {
        self.sender.try_send(Ok(pb::AttachResponse { message: Some(message) })).is_ok()
    }

    /// Whether this runner may and can take the item (ignoring free slots).
    pub fn accepts(&self, placement: &Placement<'_>) -> bool {
        let owner_ok = match self.owner {
            RunnerOwner::Shared => true,
            RunnerOwner::User(user_id) => user_id == placement.owner_id,
        };
        owner_ok
            && self.agent_types.contains(placement.agent_type)
            && labels_satisfy(placement.required_labels, |key| self.labels.get(key))
    }

    /// Slots not taken by held attempts; none while draining.
    pub fn free_slots(&self) -> usize {
        let Ok(state) = self.state.lock() else { return 0 };
        if state.draining {
            return 0;
        }
        self.capacity.saturating_sub(state.held.len())
    }

    pub fn load(&self) -> usize {
        self.state.lock().map(|state| state.held.len()).unwrap_or(0)
    }

    pub fn is_draining(&self) -> bool {
        self.state.lock().map(|state| state.draining).unwrap_or(true)
    }

    pub fn last_heartbeat_at(&self) -> Option<DateTime<Utc>> {
        self.state.lock().ok().and_then(|state| state.last_heartbeat_at)
    }

    /// Takes a slot for `key`; `false` when no slot is free (the dispatcher raced itself) or
    /// the runner holds `key` already.
    pub fn hold(&self, key: AttemptKey, execution_id: Uuid, deadline: DateTime<Utc>) -> bool {
        self.hold_in_place_of(None, key, execution_id, deadline)
    }

    /// `hold` for a step that becomes ready with the result of `done`, an attempt this runner
    /// holds and has reported on: `done`'s slot counts as free (the runner freed it when it
    /// sent the result; the server frees it once the result is committed), so the step can
    /// take it over.
    pub fn hold_after(
        &self,
        done: AttemptKey,
        key: AttemptKey,
        execution_id: Uuid,
        deadline: DateTime<Utc>,
    ) -> bool {
        self.hold_in_place_of(Some(done), key, execution_id, deadline)
    }

    fn hold_in_place_of(
        &self,
        done: Option<AttemptKey>,
        key: AttemptKey,
        execution_id: Uuid,
        deadline: DateTime<Utc>,
    ) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        let freed = usize::from(done.is_some_and(|done| state.held.contains_key(&done)));
        if state.draining
            || state.held.len() - freed >= self.capacity
            || state.held.contains_key(&key)
        {
            return false;
        }
        let held = HeldStep {
            execution_id,
            acknowledged: false,
            cancelling: false,
            assigned_at: Utc::now(),
            deadline,
            assigned_row: None,
            started_at: None,
            start_announced: false,
        };
        state.held.insert(key, held);
        true
    }

    /// Keeps an attempt the runner still ran when it reconnected.
    pub fn keep(&self, key: AttemptKey, execution_id: Uuid, deadline: DateTime<Utc>) {
        if let Ok(mut state) = self.state.lock() {
            let held = HeldStep {
                execution_id,
                acknowledged: true,
                cancelling: false,
                assigned_at: Utc::now(),
                deadline,
                assigned_row: None,
                started_at: None,
                start_announced: false,
            };
            state.held.insert(key, held);
        }
    }

    /// Sets the deadline of a held attempt (known once its assignment is decided).
    pub fn set_deadline(&self, key: AttemptKey, deadline: DateTime<Utc>) {
        if let Ok(mut state) = self.state.lock()
            && let Some(held) = state.held.get_mut(&key)
        {
            held.deadline = deadline;
        }
    }

    /// Frees the slot of `key`; `true` when it was held.
    pub fn release(&self, key: AttemptKey) -> bool {
        self.state.lock().map(|mut state| state.held.remove(&key).is_some()).unwrap_or(false)
    }

    pub fn held(&self, key: AttemptKey) -> Option<HeldStep> {
        self.state.lock().ok().and_then(|state| state.held.get(&key).cloned())
    }

    /// Keeps the row the assignment of a held attempt committed.
    pub fn set_assigned_row(&self, key: AttemptKey, row: Arc<StepRun>) {
        if let Ok(mut state) = self.state.lock()
            && let Some(held) = state.held.get_mut(&key)
        {
            held.assigned_row = Some(row);
        }
    }

    /// Records that the runner started a held attempt (which acknowledges its assignment):
    /// the attempt as it is now, `None` when the runner does not hold it. A repeated start
    /// keeps the first time.
    pub fn record_start(&self, key: AttemptKey, at: DateTime<Utc>) -> Option<HeldStep> {
        let Ok(mut state) = self.state.lock() else { return None };
        let held = state.held.get_mut(&key)?;
        held.acknowledged = true;
        held.started_at.get_or_insert(at);
        Some(held.clone())
    }

    /// Takes the telling of watchers that the runner started attempt `key`: `true` for the
    /// first caller once the start is recorded (the delayed start event or the result that
    /// carries the start), `false` after, or when the runner does not hold `key`.
    pub fn announce_start(&self, key: AttemptKey) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        match state.held.get_mut(&key) {
            Some(held) if held.started_at.is_some() && !held.start_announced => {
                held.start_announced = true;
                true
            }
            _ => false,
        }
    }

    /// Keeps log lines of attempt `key` until its result carries them or `take_logs` flushes
    /// them: how many lines now wait and whether they are the first to wait. Lines of an
    /// attempt the runner does not hold are dropped (`None`).
    pub fn buffer_logs(
        &self,
        key: AttemptKey,
        mut lines: Vec<NewExecutionLog>,
    ) -> Option<(usize, bool)> {
        let Ok(mut state) = self.state.lock() else { return None };
        if !state.held.contains_key(&key) {
            return None;
        }
        let waiting = state.logs.entry(key).or_default();
        let first = waiting.is_empty();
        waiting.append(&mut lines);
        Some((waiting.len(), first))
    }

    /// The log lines of attempt `key` still waiting (see `buffer_logs`), taken.
    pub fn take_logs(&self, key: AttemptKey) -> Vec<NewExecutionLog> {
        self.state.lock().ok().and_then(|mut state| state.logs.remove(&key)).unwrap_or_default()
    }

    pub fn held_keys(&self) -> Vec<AttemptKey> {
        self.state.lock().map(|state| state.held.keys().copied().collect()).unwrap_or_default()
    }

    /// Marks the assignment of `key` acknowledged; `false` when the runner does not hold it.
    pub fn acknowledge(&self, key: AttemptKey) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        match state.held.get_mut(&key) {
            Some(held) => {
                held.acknowledged = true;
                true
            }
            None => false,
        }
    }

    /// Marks `key` as being cancelled; `false` when the runner does not hold it.
    pub fn start_cancel(&self, key: AttemptKey) -> bool {
        let Ok(mut state) = self.state.lock() else { return false };
        match state.held.get_mut(&key) {
            Some(held) => {
                held.cancelling = true;
                true
            }
            None => false,
        }
    }

    pub fn set_draining(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.draining = true;
        }
    }

    pub fn record_heartbeat(&self, at: DateTime<Utc>) {
        if let Ok(mut state) = self.state.lock() {
            state.last_heartbeat_at = Some(at);
        }
    }

    /// Sends a message down the runner's stream; `false` when the stream is gone.
    pub async fn send(&self, message: pb::attach_response::Message) -> bool {
        self.sender.send(Ok(pb::AttachResponse { message: Some(message) })).await.is_ok()
    }

    /// The runner as `ListRunners` shows it.
    pub fn to_proto(&self) -> pb::Runner {
        let mut agent_types: Vec<i32> = self
            .agent_types
            .iter()
            .filter_map(|name| pb::AgentType::from_str_name(&format!("AGENT_TYPE_{name}")))
            .map(|agent_type| agent_type as i32)
            .collect();
        agent_types.sort_unstable();
        pb::Runner {
            id: self.id.clone(),
            name: self.name.clone(),
            labels: self.labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect(),
            agent_types,
            capacity: i32::try_from(self.capacity).unwrap_or(i32::MAX),
            load: i32::try_from(self.load()).unwrap_or(i32::MAX),
            draining: self.is_draining(),
            owner_id: match self.owner {
                RunnerOwner::Shared => String::new(),
                RunnerOwner::User(user_id) => user_id.to_string(),
            },
            connected_at: Some(crate::proto::wkt::timestamp(self.connected_at)),
            last_heartbeat_at: self.last_heartbeat_at().map(crate::proto::wkt::timestamp),
            runner_version: self.version.clone(),
            sandbox: self.sandbox as i32,
            sandbox_missing: self.sandbox_missing.clone(),
        }
    }
}

/// Every runner attached to this process.
#[derive(Default)]
pub struct AttachedRunners {
    runners: RwLock<HashMap<String, Arc<AttachedRunner>>>,
    /// Woken when capacity may have appeared: a runner attached or a slot was freed.
    pub capacity_changed: Notify,
}

impl AttachedRunners {
    pub fn attach(&self, runner: Arc<AttachedRunner>) {
        if let Ok(mut runners) = self.runners.write() {
            runners.insert(runner.id.clone(), runner);
        }
        self.capacity_changed.notify_waiters();
    }

    /// Removes a runner whose stream ended; returns it with the attempts it still held.
    pub fn detach(&self, runner_id: &str) -> Option<Arc<AttachedRunner>> {
        self.runners.write().ok().and_then(|mut runners| runners.remove(runner_id))
    }

    /// Removes `runner` itself, not a later attachment under its id; `true` when it was here.
    pub fn detach_this(&self, runner: &AttachedRunner) -> bool {
        let Ok(mut runners) = self.runners.write() else { return false };
        let same =
            runners.get(&runner.id).is_some_and(|attached| std::ptr::eq(attached.as_ref(), runner));
        if same {
            runners.remove(&runner.id);
        }
        same
    }

    pub fn get(&self, runner_id: &str) -> Option<Arc<AttachedRunner>> {
        self.runners.read().ok().and_then(|runners| runners.get(runner_id).cloned())
    }

    pub fn all(&self) -> Vec<Arc<AttachedRunner>> {
        let mut runners: Vec<Arc<AttachedRunner>> = self
            .runners
            .read()
            .map(|runners| runners.values().cloned().collect())
            .unwrap_or_default();
        runners.sort_by_key(|runner| runner.connected_at);
        runners
    }

    /// The least loaded runner that accepts the placement and has a free slot.
    pub fn pick(&self, placement: &Placement<'_>) -> Option<Arc<AttachedRunner>> {
        self.all()
            .into_iter()
            .filter(|runner| runner.accepts(placement))
            .filter_map(|runner| {
                let free = runner.free_slots();
                (free > 0).then_some((free, runner))
            })
            .max_by_key(|(free, _)| *free)
            .map(|(_, runner)| runner)
    }

    /// Whether any runner here could ever take the placement (free slots or not).
    pub fn any_accepts(&self, placement: &Placement<'_>) -> bool {
        self.all().iter().any(|runner| runner.accepts(placement))
    }
}

impl super::Engine {
    /// Keeps this replica's runners in the shared directory (a no-op in `dev`).
    pub(super) async fn share_runners(self: Arc<Self>) {
        let replica_id = Uuid::new_v4().to_string();
        loop {
            self.runner_directory.announce_replica(&replica_id).await;
            let runners: Vec<pb::Runner> =
                self.attached_runners.all().iter().map(|runner| runner.to_proto()).collect();
            self.runner_directory.share(&runners).await;
            tokio::time::sleep(super::runner_directory::DIRECTORY_REFRESH).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(
        id: &str,
        owner: RunnerOwner,
        labels: &[(&str, &str)],
        capacity: usize,
    ) -> AttachedRunner {
        let (sender, _receiver) = mpsc::channel(1);
        AttachedRunner::new(
            id.into(),
            id.into(),
            labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect(),
            ["CODE".to_owned()].into(),
            capacity,
            RunnerGrant { owner, api_key_id: None },
            "test".into(),
            sender,
        )
    }

    #[test]
    fn placement_follows_owner_labels_types_and_slots() {
        let user = Uuid::new_v4();
        let registry = AttachedRunners::default();
        registry.attach(Arc::new(runner("mine", RunnerOwner::User(user), &[("region", "eu")], 1)));
        registry.attach(Arc::new(runner("shared", RunnerOwner::Shared, &[("gpu", "")], 2)));
        let none = BTreeMap::new();
        let gpu: BTreeMap<String, String> = [("gpu".to_owned(), String::new())].into();
        let eu: BTreeMap<String, String> = [("region".to_owned(), "eu".to_owned())].into();
        let us: BTreeMap<String, String> = [("region".to_owned(), "us".to_owned())].into();
        let place = |owner_id, agent_type, labels| Placement {
            owner_id,
            agent_type,
            required_labels: labels,
        };
        assert_eq!(
            registry.pick(&place(user, "CODE", &gpu)).map(|r| r.id.clone()),
            Some("shared".into())
        );
        assert_eq!(
            registry.pick(&place(user, "CODE", &eu)).map(|r| r.id.clone()),
            Some("mine".into())
        );
        assert!(registry.pick(&place(Uuid::new_v4(), "CODE", &eu)).is_none(), "not the owner");
        assert!(registry.pick(&place(user, "CODE", &us)).is_none(), "label value differs");
        assert!(registry.pick(&place(user, "LLM", &none)).is_none(), "type not supported");

        let mine = registry.get("mine").expect("mine");
        let key = AttemptKey { step_run_id: Uuid::new_v4(), attempt: 1 };
        assert!(mine.hold(key, Uuid::new_v4(), Utc::now()));
        assert!(
            !mine.hold(
                AttemptKey { step_run_id: Uuid::new_v4(), attempt: 1 },
                Uuid::new_v4(),
                Utc::now()
            ),
            "capacity 1"
        );
        assert!(registry.pick(&place(user, "CODE", &eu)).is_none(), "no free slot");
        assert!(registry.any_accepts(&place(user, "CODE", &eu)));
        let next = AttemptKey { step_run_id: Uuid::new_v4(), attempt: 1 };
        let stranger = AttemptKey { step_run_id: Uuid::new_v4(), attempt: 1 };
        assert!(
            !mine.hold_after(stranger, next, Uuid::new_v4(), Utc::now()),
            "an attempt it does not hold frees no slot"
        );
        assert!(
            mine.hold_after(key, next, Uuid::new_v4(), Utc::now()),
            "the slot of the attempt it reported on"
        );
        assert!(
            !mine.hold_after(key, stranger, Uuid::new_v4(), Utc::now()),
            "that slot is taken over once"
        );
        assert!(mine.release(key));
        assert_eq!(mine.free_slots(), 0, "the step that took the slot over holds it");
        assert!(mine.release(next));
        assert_eq!(mine.free_slots(), 1);
        mine.set_draining();
        assert_eq!(mine.free_slots(), 0, "a draining runner takes nothing");
    }
}
