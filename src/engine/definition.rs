//! The definition an execution runs from: the snapshot of its workflow and of the agents its
//! steps use, taken when the execution was created, so later edits never change a run.
//!
//! Stored in `executions.definition` as `{"workflow": <Workflow>, "agents": {"<agent id>":
//! <Agent>}}`, both in REST JSON (`crate::proto::json::encode`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use serde_json::{Value, json};

use crate::proto::json::{decode, encode};
use crate::proto::v1 as pb;

/// The wall-clock limit of an attempt when neither the step nor its agent sets one.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// Executions' decoded definitions, most recent first, so a step's hand-offs do not decode
/// the same JSON through reflection again: a definition never changes once its execution
/// exists, and neither do the `FixedFacts` kept beside it. Bounded: the oldest entries go
/// first; a miss decodes again.
pub struct DefinitionCache {
    entries: Mutex<DefinitionEntries>,
    capacity: usize,
}

/// What never changes about an execution once it exists, besides its definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedFacts {
    pub deadline_at: Option<DateTime<Utc>>,
    /// 0 for a top-level execution, the parent's depth + 1 for a sub-workflow.
    pub depth: i32,
    pub owner_id: Uuid,
    pub priority: i32,
    pub workflow_id: Option<Uuid>,
    pub deployment_id: Option<Uuid>,
}

impl FixedFacts {
    pub fn of(execution: &crate::store::Execution) -> Self {
        Self {
            deadline_at: execution.deadline_at,
            depth: execution.depth,
            owner_id: execution.owner_id,
            priority: execution.priority,
            workflow_id: execution.workflow_id,
            deployment_id: execution.deployment_id,
        }
    }
}

/// The largest execution input kept beside a definition (as JSON text); a larger one is read
/// from the database when needed.
const MAX_KEPT_INPUT_BYTES: usize = 16 * 1024;

struct CachedExecution {
    definition: Arc<ExecutionDefinition>,
    facts: FixedFacts,
    /// The execution's input, when it is small.
    input: Option<Arc<Value>>,
    /// Rows of steps that wait for their dependencies (PENDING, never attempted), by step key,
    /// as this process read them: a success whose successor waits only for it hands that
    /// successor on from here instead of reading its row. Taken when used.
    waiting: HashMap<String, crate::store::StepRun>,
    /// Whether `waiting` was filled (once, from the first read of the execution's steps).
    waiting_kept: bool,
}

#[derive(Default)]
struct DefinitionEntries {
    by_execution: HashMap<Uuid, CachedExecution>,
    insertion_order: VecDeque<Uuid>,
}

impl DefinitionCache {
    pub fn new(capacity: usize) -> Self {
        Self { entries: Mutex::new(DefinitionEntries::default()), capacity: capacity.max(1) }
    }

    /// The decoded definition of `execution`, decoding its stored one on a miss (and keeping
    /// its fixed facts, and its input when small, beside it).
    pub fn get_or_parse(
        &self,
        execution: &crate::store::Execution,
    ) -> Result<Arc<ExecutionDefinition>, String> {
        if let Some(found) = self.known(execution.id) {
            return Ok(found.0);
        }
        let parsed = Arc::new(ExecutionDefinition::parse(&execution.definition)?);
        self.keep(execution, parsed.clone());
        Ok(parsed)
    }

    /// Keeps `parsed`, the decoded definition of `execution`, with its fixed facts and its input
    /// when small (unless it is kept already).
    pub fn keep(&self, execution: &crate::store::Execution, parsed: Arc<ExecutionDefinition>) {
        let execution_id = execution.id;
        let facts = FixedFacts::of(execution);
        let input = serde_json::to_string(&execution.input)
            .is_ok_and(|text| text.len() <= MAX_KEPT_INPUT_BYTES)
            .then(|| Arc::new(execution.input.clone()));
        if let Ok(mut entries) = self.entries.lock()
            && !entries.by_execution.contains_key(&execution_id)
        {
            if entries.insertion_order.len() >= self.capacity
                && let Some(oldest) = entries.insertion_order.pop_front()
            {
                entries.by_execution.remove(&oldest);
            }
            let cached = CachedExecution {
                definition: parsed,
                facts,
                input,
                waiting: HashMap::new(),
                waiting_kept: false,
            };
            entries.by_execution.insert(execution_id, cached);
            entries.insertion_order.push_back(execution_id);
        }
    }

    /// Drops what is kept of `execution_id` (it finished: nothing of it is needed any more,
    /// and a late use decodes again). Its place in the insertion order stays until it comes
    /// round, so the order never holds more than `capacity` ids.
    pub fn forget(&self, execution_id: Uuid) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.by_execution.remove(&execution_id);
        }
    }

    /// The definition and fixed facts of `execution_id` when this process keeps them.
    pub fn known(&self, execution_id: Uuid) -> Option<(Arc<ExecutionDefinition>, FixedFacts)> {
        let entries = self.entries.lock().ok()?;
        let cached = entries.by_execution.get(&execution_id)?;
        Some((cached.definition.clone(), cached.facts))
    }

    /// `known`, with the execution's input, when this process keeps all three.
    pub fn known_with_input(
        &self,
        execution_id: Uuid,
    ) -> Option<(Arc<ExecutionDefinition>, FixedFacts, Arc<Value>)> {
        let entries = self.entries.lock().ok()?;
        let cached = entries.by_execution.get(&execution_id)?;
        Some((cached.definition.clone(), cached.facts, cached.input.clone()?))
    }

    /// Keeps the rows of `steps` (read from the database) that wait for dependencies and were
    /// never attempted, for `take_waiting`; nothing when the execution is not kept here, and a
    /// step already kept (or taken) stays as it is.
    pub fn remember_waiting(&self, execution_id: Uuid, steps: &[crate::store::StepRun]) {
        let Ok(mut entries) = self.entries.lock() else { return };
        let Some(cached) = entries.by_execution.get_mut(&execution_id) else { return };
        if cached.waiting_kept {
            return;
        }
        cached.waiting_kept = true;
        for step in steps {
            let waits = cached
                .definition
                .step(&step.step_key)
                .is_some_and(|definition| !definition.depends_on.is_empty());
            if waits
                && step.status == crate::store::StepRunStatus::Pending
                && step.next_attempt_at.is_none()
            {
                cached.waiting.insert(step.step_key.clone(), step.clone());
            }
        }
    }

    /// The row of step `step_key` as it was while it waited for its dependencies (see
    /// `remember_waiting`), once: the caller acts on it with a fenced transition, which the
    /// store refuses should the step have moved on meanwhile.
    pub fn take_waiting(
        &self,
        execution_id: Uuid,
        step_key: &str,
    ) -> Option<crate::store::StepRun> {
        let mut entries = self.entries.lock().ok()?;
        entries.by_execution.get_mut(&execution_id)?.waiting.remove(step_key)
    }

    /// `take_waiting` for every one of `step_keys`, in their order, or for none of them (when
    /// one is not kept, all stay as they were).
    pub fn take_all_waiting(
        &self,
        execution_id: Uuid,
        step_keys: &[&str],
    ) -> Option<Vec<crate::store::StepRun>> {
        let mut entries = self.entries.lock().ok()?;
        let waiting = &mut entries.by_execution.get_mut(&execution_id)?.waiting;
        if !step_keys.iter().all(|key| waiting.contains_key(*key)) {
            return None;
        }
        step_keys.iter().map(|key| waiting.remove(*key)).collect()
    }
}

/// A decoded execution definition.
#[derive(Debug, Clone)]
pub struct ExecutionDefinition {
    pub workflow: pb::Workflow,
    pub agents: HashMap<String, pb::Agent>,
}

impl ExecutionDefinition {
    /// The JSON stored with an execution.
    pub fn snapshot(workflow: &pb::Workflow, agents: &[pb::Agent]) -> Value {
        let agents: serde_json::Map<String, Value> = agents
            .iter()
            .map(|agent| (agent.id.clone(), encode("turbocat.v1.Agent", agent)))
            .collect();
        json!({ "workflow": encode("turbocat.v1.Workflow", workflow), "agents": agents })
    }

    /// Reads a stored definition; the error says what is wrong with it.
    pub fn parse(definition: &Value) -> Result<Self, String> {
        let describe = |errors: Vec<crate::error::FieldError>| {
            errors
                .into_iter()
                .map(|error| format!("{}: {}", error.field, error.message))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let workflow_json =
            definition.get("workflow").cloned().ok_or("the definition has no workflow")?;
        let workflow: pb::Workflow =
            decode("turbocat.v1.Workflow", workflow_json).map_err(describe)?;
        let mut agents = HashMap::new();
        if let Some(Value::Object(stored)) = definition.get("agents") {
            for (agent_id, agent_json) in stored {
                let agent: pb::Agent =
                    decode("turbocat.v1.Agent", agent_json.clone()).map_err(describe)?;
                agents.insert(agent_id.clone(), agent);
            }
        }
        Ok(Self { workflow, agents })
    }

    pub fn step(&self, key: &str) -> Option<&pb::WorkflowStep> {
        self.workflow.steps.iter().find(|step| step.key == key)
    }

    /// The agent snapshot a step runs.
    pub fn agent_of(&self, step: &pb::WorkflowStep) -> Option<&pb::Agent> {
        self.agents.get(&step.agent_id)
    }

    /// Keys of the steps no other step depends on: their outputs make the execution's output.
    pub fn sink_keys(&self) -> Vec<&str> {
        self.workflow
            .steps
            .iter()
            .filter(|step| {
                !self.workflow.steps.iter().any(|other| other.depends_on.contains(&step.key))
            })
            .map(|step| step.key.as_str())
            .collect()
    }

    /// The wall-clock limit of one attempt of `step`: the step's, else its agent's, else
    /// `DEFAULT_STEP_TIMEOUT`.
    pub fn step_timeout(&self, step: &pb::WorkflowStep) -> Duration {
        step.timeout
            .as_ref()
            .and_then(positive_duration)
            .or_else(|| {
                self.agent_of(step)
                    .and_then(|agent| agent.limits.as_ref())
                    .and_then(|limits| limits.timeout.as_ref())
                    .and_then(positive_duration)
            })
            .unwrap_or(DEFAULT_STEP_TIMEOUT)
    }

    /// Runner labels the step needs.
    pub fn required_labels(step: &pb::WorkflowStep) -> BTreeMap<String, String> {
        step.required_labels.iter().map(|(key, value)| (key.clone(), value.clone())).collect()
    }
}

/// The execution's output: the single sink step's output, or an object of every sink's output
/// by step key when there are several.
pub fn execution_output(sinks: &[&str], outputs: &HashMap<String, Value>) -> Value {
    match sinks {
        [only] => outputs.get(*only).cloned().unwrap_or(Value::Null),
        _ => Value::Object(
            sinks
                .iter()
                .map(|key| ((*key).to_owned(), outputs.get(*key).cloned().unwrap_or(Value::Null)))
                .collect(),
        ),
    }
}

/// The delay before attempt `next_attempt` (2 or more) of a step: `initial * multiplier^(n-2)`
/// capped at `max`, with up to 20% random jitter taken off so retries of many steps spread.
pub fn retry_backoff(policy: Option<&pb::RetryPolicy>, next_attempt: i32) -> Duration {
    let initial = policy
        .and_then(|policy| policy.initial_backoff.as_ref())
        .and_then(positive_duration)
        .unwrap_or(Duration::from_secs(1));
    let max = policy
        .and_then(|policy| policy.max_backoff.as_ref())
        .and_then(positive_duration)
        .unwrap_or(Duration::from_secs(60))
        .max(initial);
    let multiplier = policy
        .map(|policy| policy.multiplier)
        .filter(|multiplier| multiplier.is_finite() && *multiplier >= 1.0)
        .unwrap_or(2.0);
    let exponent = next_attempt.saturating_sub(2).clamp(0, 64);
    let uncapped = initial.as_secs_f64() * multiplier.powi(exponent);
    let capped = uncapped.min(max.as_secs_f64());
    let jitter = 1.0 - rand::random::<f64>() * 0.2;
    Duration::from_secs_f64((capped * jitter).max(0.0))
}

fn positive_duration(duration: &prost_types::Duration) -> Option<Duration> {
    let total = Duration::try_from(*duration).ok()?;
    (!total.is_zero()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workflow() -> pb::Workflow {
        pb::Workflow {
            id: "w".into(),
            steps: vec![
                pb::WorkflowStep {
                    key: "a".into(),
                    agent_id: "agent-1".into(),
                    ..Default::default()
                },
                pb::WorkflowStep {
                    key: "b".into(),
                    agent_id: "agent-1".into(),
                    depends_on: vec!["a".into()],
                    timeout: Some(prost_types::Duration { seconds: 7, nanos: 0 }),
                    ..Default::default()
                },
                pb::WorkflowStep {
                    key: "c".into(),
                    agent_id: "agent-1".into(),
                    depends_on: vec!["a".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_round_trips() {
        let agent = pb::Agent {
            id: "agent-1".into(),
            r#type: pb::AgentType::Data as i32,
            status: pb::AgentStatus::Idle as i32,
            limits: Some(pb::ResourceLimits {
                timeout: Some(prost_types::Duration { seconds: 30, nanos: 0 }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stored = ExecutionDefinition::snapshot(&workflow(), &[agent]);
        let definition = ExecutionDefinition::parse(&stored).expect("parses");
        assert_eq!(definition.workflow.steps.len(), 3);
        let b = definition.step("b").expect("b");
        assert_eq!(definition.step_timeout(b), Duration::from_secs(7), "the step's own limit");
        let c = definition.step("c").expect("c");
        assert_eq!(definition.step_timeout(c), Duration::from_secs(30), "the agent's limit");
        assert_eq!(definition.sink_keys(), vec!["b", "c"]);
        assert!(ExecutionDefinition::parse(&json!({})).is_err());
    }

    fn execution(definition: Value) -> crate::store::Execution {
        let now = chrono::Utc::now();
        crate::store::Execution {
            id: Uuid::now_v7(),
            owner_id: Uuid::now_v7(),
            workflow_id: None,
            deployment_id: None,
            parent_execution_id: None,
            parent_step_run_id: None,
            parent_attempt: None,
            depth: 0,
            trigger: crate::store::ExecutionTrigger::Manual,
            status: crate::store::ExecutionStatus::Running,
            priority: 5,
            input: json!({ "n": 1 }),
            output: None,
            error: None,
            definition,
            timeout_seconds: None,
            deadline_at: None,
            started_at: Some(now),
            finished_at: None,
            cancel_requested_at: None,
            version: 1,
            created_at: now,
            updated_at: now,
        }
    }

    /// A finished execution's definition is let go at once, not when 4,096 newer ones pushed
    /// it out; a late use decodes it again, and the capacity still bounds what is kept.
    #[test]
    fn a_forgotten_execution_is_decoded_again_and_the_capacity_holds() {
        let cache = DefinitionCache::new(2);
        let stored = ExecutionDefinition::snapshot(&workflow(), &[]);
        let first = execution(stored.clone());
        cache.get_or_parse(&first).expect("parses");
        assert!(cache.known_with_input(first.id).is_some());
        cache.forget(first.id);
        assert!(cache.known(first.id).is_none(), "forgotten");
        cache.get_or_parse(&first).expect("decodes again");
        assert!(cache.known(first.id).is_some(), "kept again");
        let others: Vec<_> = (0..3).map(|_| execution(stored.clone())).collect();
        for other in &others {
            cache.get_or_parse(other).expect("parses");
        }
        let kept = std::iter::once(&first)
            .chain(&others)
            .filter(|execution| cache.known(execution.id).is_some())
            .count();
        assert!(kept <= 2, "{kept} kept with a capacity of 2");
        assert!(cache.known(others[2].id).is_some(), "the newest is kept");
    }

    #[test]
    fn outputs_and_backoff() {
        let outputs: HashMap<String, Value> =
            [("b".to_owned(), json!(1)), ("c".to_owned(), json!({ "x": 2 }))].into();
        assert_eq!(execution_output(&["b"], &outputs), json!(1));
        assert_eq!(execution_output(&["b", "c"], &outputs), json!({ "b": 1, "c": { "x": 2 } }));
        let policy = pb::RetryPolicy {
            max_attempts: 5,
            initial_backoff: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            max_backoff: Some(prost_types::Duration { seconds: 3, nanos: 0 }),
            multiplier: 2.0,
        };
        let second = retry_backoff(Some(&policy), 2);
        assert!(second <= Duration::from_secs(1) && second >= Duration::from_millis(800));
        let third = retry_backoff(Some(&policy), 3);
        assert!(third <= Duration::from_secs(2) && third >= Duration::from_millis(1600));
        let tenth = retry_backoff(Some(&policy), 10);
        assert!(tenth <= Duration::from_secs(3), "capped: {tenth:?}");
    }
}
