//! The execution engine: workflow definitions as DAGs (`dag`), the snapshot an execution runs from
//! (`definition`), the cron schedules of deployments (`schedule`), and the machinery that runs
//! executions: `start` (creating an execution and moving its first steps on in that one
//! commit), `scheduler` (moving an execution forward, retries, timeouts, cancellation),
//! `dispatcher` (handing queued steps to attached runners), `reconciler` (repairing what the queue
//! or a crash lost, from the database), `attached_runners` (the runners attached to this process),
//! `leases` (runner liveness, kept off the database), `runner_directory` (the runners attached to
//! every replica, shared through Redis) and `subworkflow` (WORKFLOW steps, which the engine runs
//! itself as child executions); steps becoming ready, assignments, starts and results that
//! arrive together share one commit (the store's `group_commit`); `metrics` records the operators' series,
//! `Engine::finished_executions` tells listeners in memory (the alert rules) which executions
//! ended, and `shutdown` stops the loops and moves the attached runners away when the process
//! stops. The `{{…}}` mappings it renders are `crate::mapping`, shared with the runner.
//!
//! The database is the source of truth: every transition is committed (as a fenced
//! compare-and-set on the attempt) before the queue or a runner hears of it, so any replica may
//! act on any execution and a crash at any point is repaired by the reconciler.
//! May call: the store, the queue, the bus, `crate::redis_pool` (leases and the runner
//! directory), and the shared pure modules (`proto`, `mapping`, `error`, `outage`). Never the
//! edges, the service layer (which builds child executions for it through the
//! `subworkflow::ChildWorkflows` it installs) or the runner program. Callers reach it through
//! the methods below, never its parts.

pub mod attached_runners;
pub mod dag;
pub mod definition;
pub mod dispatcher;
pub mod leases;
mod metrics;
pub mod protocol;
pub mod reconciler;
pub mod runner_directory;
pub mod schedule;
pub mod scheduler;
pub mod shutdown;
mod start;
pub mod subworkflow;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::bus::Bus;
use crate::queue::{Queue, QueueError};
use crate::store::group_commit::GroupCommit;
use crate::store::{Store, StoreError};

use self::attached_runners::AttachedRunners;
use self::leases::Leases;
use self::runner_directory::RunnerDirectory;

/// The engine's knobs; the defaults suit a laptop and a small cluster alike.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// How long a runner may go without a heartbeat before its attempts are taken back.
    pub lease_duration: Duration,
    /// How often runners are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// How long a runner has to acknowledge an assignment or a cancel.
    pub acknowledgement_timeout: Duration,
    /// Times a step may be taken back from a lost runner before it fails; these do not use the
    /// user's retry budget.
    pub max_infrastructure_reassignments: i32,
    /// How often the reconciler looks for lost work.
    pub reconcile_interval: Duration,
    /// Largest step input or output, as JSON.
    pub max_payload_bytes: usize,
    /// Largest gRPC message this server accepts or sends (`--max-message-bytes`): announced
    /// to runners, who keep every message within it.
    pub max_message_bytes: usize,
    /// Deepest nesting of sub-workflow executions.
    pub max_workflow_depth: i32,
    /// Deepest nesting of a JSON value that enters (`--max-json-depth`): inputs and configs
    /// at the edge, step outputs here.
    pub max_json_depth: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            acknowledgement_timeout: Duration::from_secs(10),
            max_infrastructure_reassignments: 3,
            reconcile_interval: Duration::from_secs(2),
            max_payload_bytes: 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            max_workflow_depth: 5,
            max_json_depth: 32,
        }
    }
}

/// Why an engine operation could not be carried out (it will be retried by the reconciler).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl EngineError {
    /// Whether the database or Redis could not be reached: a passing outage, not a fault.
    pub fn is_unavailable(&self) -> bool {
        match self {
            EngineError::Store(error) => error.is_unavailable(),
            EngineError::Queue(error) => matches!(error, QueueError::Backend(_)),
        }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// How many decoded execution definitions one process keeps.
const DEFINITION_CACHE_CAPACITY: usize = 4096;

/// What an engine is built from.
pub struct EngineParts {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn Queue>,
    pub bus: Arc<dyn Bus>,
    /// Runner liveness: in memory (`dev`) or shared through Redis (`serve`).
    pub leases: Leases,
    /// The runners of every replica: empty (`dev`) or shared through Redis (`serve`).
    pub runner_directory: RunnerDirectory,
    pub settings: EngineSettings,
}

/// An execution that reached a final state on this replica, told in memory (no round trip)
/// after its commit to whoever listens (`Engine::finished_executions`): the alert rules.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedExecution {
    pub execution_id: uuid::Uuid,
    pub owner_id: uuid::Uuid,
    pub workflow_id: Option<uuid::Uuid>,
    pub deployment_id: Option<uuid::Uuid>,
    /// A sub-workflow's execution (its parent's step reports it).
    pub is_child: bool,
    pub status: crate::store::ExecutionStatus,
    pub error: Option<String>,
}

/// Finished executions a slow listener may fall behind by before it misses some.
const FINISHED_EXECUTIONS_CAPACITY: usize = 1024;

/// One engine per server process; every replica runs one over the shared store and queue.
pub struct Engine {
    store: Arc<dyn Store>,
    queue: Arc<dyn Queue>,
    bus: Arc<dyn Bus>,
    settings: EngineSettings,
    /// The runners attached to this process.
    attached_runners: AttachedRunners,
    /// How long the holder of each attempt is known to be alive.
    leases: Leases,
    /// The runners attached to every replica.
    runner_directory: RunnerDirectory,
    /// Builds the child executions of WORKFLOW steps; installed once at start-up.
    child_workflows: OnceLock<Arc<dyn subworkflow::ChildWorkflows>>,
    /// Decoded definitions of the executions this process moved recently.
    definitions: definition::DefinitionCache,
    /// Steps that became ready (PENDING -> QUEUED), committed in groups.
    queueing: GroupCommit<(
        crate::store::AttemptKey,
        Option<serde_json::Value>,
        chrono::DateTime<chrono::Utc>,
    )>,
    /// Assignments, committed in groups.
    assigning: GroupCommit<(crate::store::AttemptKey, crate::store::StepAssignment)>,
    /// Starts reported by runners (ASSIGNED -> RUNNING), committed in groups.
    starting: GroupCommit<(crate::store::AttemptKey, chrono::DateTime<chrono::Utc>)>,
    /// Steps that become ready while a runner here has a slot for them (PENDING -> ASSIGNED
    /// at once), committed in groups.
    handing: GroupCommit<(
        crate::store::AttemptKey,
        Option<serde_json::Value>,
        crate::store::StepAssignment,
    )>,
    /// Results of attempts, with the steps they make ready or the execution they end,
    /// committed in groups.
    completing: GroupCommit<scheduler::Completing, scheduler::Completed>,
    /// Completions' questions where the steps a successor waits for stand, read in groups
    /// (`scheduler::StatesAsked`); `state_tickets` numbers them.
    reading_states: GroupCommit<scheduler::StatesAsked, scheduler::StatesRead>,
    state_tickets: std::sync::atomic::AtomicU64,
    /// The highest priority of queue entries this replica last saw waiting for a slot (as
    /// of the dispatcher's last pass and its own enqueues since): a step only takes over the
    /// slot its predecessor freed when it is at least as urgent (`take_over_slot`).
    waiting_priority: std::sync::atomic::AtomicI32,
    /// Cancelled when the process shuts down: the loops end after their current pass.
    stopping: tokio_util::sync::CancellationToken,
    /// Executions this process finished, for `finished_executions`.
    finished: tokio::sync::broadcast::Sender<FinishedExecution>,
}

impl Engine {
    /// Builds the engine; call it inside the runtime (its group commits start tasks).
    pub fn new(parts: EngineParts) -> Arc<Self> {
        let store = parts.store.clone();
        let queueing = GroupCommit::start(Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move { store.mark_steps_queued(&batch).await })
        }));
        let store = parts.store.clone();
        let assigning = GroupCommit::start(Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move { store.assign_steps(&batch).await })
        }));
        let store = parts.store.clone();
        let starting = GroupCommit::start(Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move { store.mark_steps_running(&batch).await })
        }));
        let store = parts.store.clone();
        let handing = GroupCommit::start(Arc::new(move |batch| {
            let store = store.clone();
            Box::pin(async move { store.queue_and_assign_steps(&batch).await })
        }));
        let store = parts.store.clone();
        let bus = parts.bus.clone();
        let completing = GroupCommit::start(Arc::new(move |batch: Vec<scheduler::Completing>| {
            let (store, bus) = (store.clone(), bus.clone());
            Box::pin(async move {
                let mut finished = Vec::with_capacity(batch.len());
                let mut next = Vec::new();
                let mut finishing = Vec::new();
                for completing in batch {
                    finished.push(completing.result);
                    next.extend(completing.next);
                    finishing.extend(completing.finishing);
                }
                let mut completed = store.complete_steps_then(&finished, &next, &finishing).await?;
                // The lines that travelled with a result reach watchers in its event; those
                // of a result the store refused, now.
                let applied: std::collections::HashSet<crate::store::AttemptKey> =
                    completed.step_runs.iter().map(crate::store::StepRun::attempt_key).collect();
                let (with_results, alone): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut completed.logs).into_iter().partition(|line| {
                        scheduler::log_attempt(line).is_some_and(|key| applied.contains(&key))
                    });
                scheduler::publish_logs(bus.as_ref(), alone).await;
                Ok(scheduler::completed_per_result(completed, &next, &finishing, with_results))
            })
        }));
        let store = parts.store.clone();
        let reading_states =
            GroupCommit::start(Arc::new(move |batch: Vec<scheduler::StatesAsked>| {
                let store = store.clone();
                Box::pin(async move {
                    let wanted: Vec<crate::store::StepKeys> =
                        batch.iter().map(|asked| asked.wanted.clone()).collect();
                    let states = store.list_step_run_states_by_keys(&wanted).await?;
                    Ok(scheduler::states_per_question(&batch, &states))
                })
            }));
        Arc::new(Self {
            handing,
            completing,
            reading_states,
            state_tickets: std::sync::atomic::AtomicU64::new(0),
            queueing,
            assigning,
            starting,
            store: parts.store,
            queue: parts.queue,
            bus: parts.bus,
            settings: parts.settings,
            attached_runners: AttachedRunners::default(),
            leases: parts.leases,
            runner_directory: parts.runner_directory,
            child_workflows: OnceLock::new(),
            definitions: definition::DefinitionCache::new(DEFINITION_CACHE_CAPACITY),
            waiting_priority: std::sync::atomic::AtomicI32::new(crate::queue::MIN_PRIORITY),
            stopping: tokio_util::sync::CancellationToken::new(),
            finished: tokio::sync::broadcast::channel(FINISHED_EXECUTIONS_CAPACITY).0,
        })
    }

    /// The executions this process finishes from now on (a listener that falls more than
    /// 1024 behind is told how many it missed).
    pub fn finished_executions(&self) -> tokio::sync::broadcast::Receiver<FinishedExecution> {
        self.finished.subscribe()
    }

    /// The one hook where an execution reached `status` (after the commit): the metrics, the
    /// listeners if there are any, and its kept definition let go. No I/O.
    fn execution_finished(
        &self,
        execution_id: uuid::Uuid,
        facts: &definition::FixedFacts,
        status: crate::store::ExecutionStatus,
        error: Option<&str>,
    ) {
        metrics::execution_finished(status);
        self.definitions.forget(execution_id);
        if self.finished.receiver_count() == 0 {
            return;
        }
        // No listener left meanwhile is the only failure: nothing to tell.
        let _ = self.finished.send(FinishedExecution {
            execution_id,
            owner_id: facts.owner_id,
            workflow_id: facts.workflow_id,
            deployment_id: facts.deployment_id,
            is_child: facts.depth > 0,
            status,
            error: error.map(str::to_owned),
        });
    }

    /// The decoded definition of an execution (decoded once, then kept while it is recent).
    fn definition(
        &self,
        execution: &crate::store::Execution,
    ) -> Result<Arc<definition::ExecutionDefinition>, String> {
        self.definitions.get_or_parse(execution)
    }

    /// The knobs this engine runs with.
    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The runners attached to any replica, unordered: this replica's own as they are now,
    /// the others' as their replicas last shared them (at most a couple of seconds old).
    pub async fn runners_of_every_replica(&self) -> Vec<crate::proto::v1::Runner> {
        let mut runners: std::collections::BTreeMap<String, crate::proto::v1::Runner> = self
            .runner_directory
            .list()
            .await
            .into_iter()
            .map(|runner| (runner.id.clone(), runner))
            .collect();
        for runner in self.attached_runners.all() {
            runners.insert(runner.id.clone(), runner.to_proto());
        }
        runners.into_values().collect()
    }

    /// How many server replicas are alive (announced within the last 10 s; 1 in `dev`), `None`
    /// when Redis cannot say.
    pub async fn replicas_alive(&self) -> Option<usize> {
        self.runner_directory.replicas_alive().await
    }

    /// Starts the dispatcher, the reconciler and the cancel relay; the dispatcher and the
    /// reconciler end after their current pass once `shut_down` is called, the others run until
    /// the returned handles are aborted.
    pub fn spawn(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().run_dispatcher()),
            tokio::spawn(self.clone().run_reconciler()),
            tokio::spawn(self.clone().relay_cancels()),
            tokio::spawn(self.clone().share_runners()),
        ]
    }
}
