//! Conformance: executions (executions and their step runs, fenced step transitions, attempts,
//! the engine's ready/expired queries, logs, lists and statistics).

use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::{Value, json};
use turbocat::store::{
    AgentLimits, AgentType, AttemptKey, CancelRequestOutcome, ChildExecutionStart, Completion,
    CompletionOutcome, DeploymentEnvironment, DeploymentTarget, DeploymentTrigger, Execution,
    ExecutionChange, ExecutionCursor, ExecutionFilter, ExecutionLogFilter, ExecutionLogLevel,
    ExecutionLogSource, ExecutionStatus, ExecutionTrigger, FinishedAttempt, FinishingExecution,
    InFlightStepRun, NewAgent, NewDeployment, NewExecution, NewExecutionLog, NewStepRun, NewUser,
    NewWorkflow, NextStep, OwnerScope, PageRequest, ParentStep, StepAssignment, StepAttemptStatus,
    StepKeys, StepRun, StepRunStatus, StepStart, StepTransitionOutcome, Store, StoreError,
};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Fixtures: users, agents, workflows and deployments come from the other areas' store methods
// ---------------------------------------------------------------------------------------------

async fn create_user(store: &Arc<dyn Store>) -> Uuid {
    let email = format!("{}@example.com", Uuid::now_v7().simple());
    store.create_user(NewUser::new(email, "Execution Tester")).await.expect("create user").id
}

async fn create_agent(store: &Arc<dyn Store>, owner_id: Uuid) -> Uuid {
    let new_agent = NewAgent {
        owner_id,
        name: format!("agent {}", Uuid::now_v7().simple()),
        description: String::new(),
        agent_type: AgentType::Code,
        config: json!({}),
        limits: AgentLimits::default(),
        tags: Vec::new(),
    };
    store.create_agent(new_agent).await.expect("create agent").id
}

async fn create_workflow(store: &Arc<dyn Store>, owner_id: Uuid) -> Uuid {
    let new_workflow = NewWorkflow {
        owner_id,
        name: format!("workflow {}", Uuid::now_v7().simple()),
        description: String::new(),
        default_input: json!({}),
        priority: 5,
        timeout_seconds: None,
        tags: Vec::new(),
        steps: Vec::new(),
    };
    store.create_workflow(new_workflow).await.expect("create workflow").workflow.id
}

async fn create_deployment(store: &Arc<dyn Store>, owner_id: Uuid, workflow_id: Uuid) -> Uuid {
    let new_deployment = NewDeployment {
        owner_id,
        name: format!("deployment {}", Uuid::now_v7().simple()),
        description: String::new(),
        target: DeploymentTarget::Workflow(workflow_id),
        environment: DeploymentEnvironment::Development,
        config: json!({}),
        trigger: DeploymentTrigger::Manual,
    };
    store.create_deployment(new_deployment).await.expect("create deployment").id
}

/// A user with an agent and a workflow, and a second user.
pub(crate) struct Fixture {
    pub owner: Uuid,
    pub other_owner: Uuid,
    pub agent: Uuid,
    pub workflow: Uuid,
}

pub(crate) async fn fixture(store: &Arc<dyn Store>) -> Fixture {
    let owner = create_user(store).await;
    let other_owner = create_user(store).await;
    let agent = create_agent(store, owner).await;
    let workflow = create_workflow(store, owner).await;
    Fixture { owner, other_owner, agent, workflow }
}

pub(crate) fn definition() -> Value {
    json!({"workflow": {"name": "demo", "steps": [{"key": "only"}]}, "agents": {}})
}

/// Now, at the precision the store keeps.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

pub(crate) fn seconds(count: i64) -> Duration {
    Duration::seconds(count)
}

/// A top-level manual execution with the given steps (each allowing `max_attempts`).
pub(crate) async fn start_execution(
    store: &Arc<dyn Store>,
    new_execution: NewExecution,
    step_keys: &[&str],
    max_attempts: i32,
    agent_id: Option<Uuid>,
) -> (Execution, Vec<StepRun>) {
    let steps = step_keys
        .iter()
        .map(|key| NewStepRun { agent_id, ..NewStepRun::new(*key, max_attempts) })
        .collect();
    store.create_execution(new_execution, steps).await.expect("create execution")
}

async fn simple_execution(
    store: &Arc<dyn Store>,
    owner: Uuid,
    step_keys: &[&str],
    max_attempts: i32,
) -> (Execution, Vec<StepRun>) {
    let new_execution = NewExecution::new(owner, ExecutionTrigger::Manual, definition());
    start_execution(store, new_execution, step_keys, max_attempts, None).await
}

fn applied(outcome: StepTransitionOutcome) -> StepRun {
    match outcome {
        StepTransitionOutcome::Applied(step_run) => step_run,
        rejected => panic!("expected the transition to apply, got {rejected:?}"),
    }
}

pub(crate) async fn queue(store: &Arc<dyn Store>, key: AttemptKey, at: DateTime<Utc>) -> StepRun {
    applied(store.mark_step_queued(key, Some(json!({"resolved": true})), at).await.expect("queue"))
}

/// A success of attempt `key` with `output`, started a second after `t0` and finished two after.
fn success_of(key: AttemptKey, output: Value, t0: DateTime<Utc>) -> FinishedAttempt {
    FinishedAttempt {
        key,
        completion: Completion::Succeeded { output },
        started_at: Some(t0 + seconds(1)),
        finished_at: t0 + seconds(2),
        logs: Vec::new(),
    }
}

/// The end of execution `execution_id` with output `{"n": 2}` that the success of `after` brings
/// two seconds after `t0`, on the condition that every step succeeded.
fn finishing_after(after: AttemptKey, execution_id: Uuid, t0: DateTime<Utc>) -> FinishingExecution {
    FinishingExecution {
        after,
        execution_id,
        change: ExecutionChange {
            output: Some(json!({"n": 2})),
            finished_at: Some(t0 + seconds(2)),
            only_when_every_step_succeeded: true,
            ..ExecutionChange::new(ExecutionStatus::Succeeded, t0 + seconds(2))
        },
    }
}

fn assignment(runner_id: &str, at: DateTime<Utc>) -> StepAssignment {
    StepAssignment {
        runner_id: runner_id.to_owned(),
        lease_expires_at: at + seconds(30),
        assigned_at: at,
    }
}

pub(crate) async fn assign(
    store: &Arc<dyn Store>,
    key: AttemptKey,
    runner_id: &str,
    at: DateTime<Utc>,
) -> StepRun {
    applied(store.assign_step(key, assignment(runner_id, at)).await.expect("assign"))
}

pub(crate) async fn run(store: &Arc<dyn Store>, key: AttemptKey, at: DateTime<Utc>) -> StepRun {
    applied(store.mark_step_running(key, at).await.expect("mark running"))
}

pub(crate) async fn complete(
    store: &Arc<dyn Store>,
    key: AttemptKey,
    completion: Completion,
    at: DateTime<Utc>,
) -> StepRun {
    match store.complete_step(key, completion, at).await.expect("complete") {
        CompletionOutcome::Applied(step_run) => step_run,
        ignored => panic!("expected the completion to apply, got {ignored:?}"),
    }
}

/// Queues, assigns, starts and completes the current attempt of a step.
async fn drive_step(
    store: &Arc<dyn Store>,
    step_run: &StepRun,
    completion: Completion,
    at: DateTime<Utc>,
) -> StepRun {
    let key = step_run.attempt_key();
    queue(store, key, at).await;
    assign(store, key, "runner-1", at).await;
    run(store, key, at).await;
    complete(store, key, completion, at).await
}

pub(crate) fn failure(retryable: bool) -> Completion {
    Completion::Failed { error: "boom".to_owned(), retryable }
}

/// QUEUED -> RUNNING at `started_at`, then RUNNING -> `status` at `finished_at`.
pub(crate) async fn finish_execution(
    store: &Arc<dyn Store>,
    execution_id: Uuid,
    status: ExecutionStatus,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
) {
    let start = ExecutionChange {
        started_at: Some(started_at),
        ..ExecutionChange::new(ExecutionStatus::Running, started_at)
    };
    assert!(
        store
            .transition_execution(execution_id, &[ExecutionStatus::Queued], start)
            .await
            .expect("start execution")
    );
    let finish = ExecutionChange {
        finished_at: Some(finished_at),
        ..ExecutionChange::new(status, finished_at)
    };
    assert!(
        store
            .transition_execution(execution_id, &[ExecutionStatus::Running], finish)
            .await
            .expect("finish execution")
    );
}

fn ids(executions: &[Execution]) -> Vec<Uuid> {
    executions.iter().map(|execution| execution.id).collect()
}

// ---------------------------------------------------------------------------------------------
// Creation
// ---------------------------------------------------------------------------------------------

async fn execution_and_step_runs_are_created_atomically(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let deadline = now() + Duration::minutes(10);
    let new_execution = NewExecution {
        workflow_id: Some(fixture.workflow),
        priority: 7,
        input: json!({"question": "why"}),
        timeout_seconds: Some(600),
        deadline_at: Some(deadline),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Manual, definition())
    };
    let steps = vec![
        NewStepRun { agent_id: Some(fixture.agent), ..NewStepRun::new("fetch", 3) },
        NewStepRun::new("summarize", 1),
        NewStepRun { input: Some(json!({"fixed": true})), ..NewStepRun::new("publish", 2) },
    ];
    let (execution, step_runs) =
        store.create_execution(new_execution, steps).await.expect("create execution");
    assert_eq!(execution.status, ExecutionStatus::Queued);
    assert_eq!(execution.trigger, ExecutionTrigger::Manual);
    assert_eq!((execution.depth, execution.version, execution.priority), (0, 1, 7));
    assert_eq!(execution.owner_id, fixture.owner);
    assert_eq!(execution.workflow_id, Some(fixture.workflow));
    assert_eq!(execution.input, json!({"question": "why"}));
    assert_eq!(execution.definition, definition());
    assert_eq!(execution.deadline_at, Some(deadline));
    assert_eq!(execution.timeout_seconds, Some(600));
    assert_eq!((execution.started_at, execution.cancel_requested_at), (None, None));
    assert_eq!(execution.output, None);

    let keys: Vec<&str> = step_runs.iter().map(|step_run| step_run.step_key.as_str()).collect();
    assert_eq!(keys, ["fetch", "summarize", "publish"], "step runs come back in the given order");
    for step_run in &step_runs {
        assert_eq!(step_run.execution_id, execution.id);
        assert_eq!(step_run.status, StepRunStatus::Pending);
        assert_eq!((step_run.attempt, step_run.infra_reassignments, step_run.version), (1, 0, 1));
        assert_eq!(step_run.runner_id, None);
    }
    assert_eq!(step_runs[0].agent_id, Some(fixture.agent));
    assert_eq!(step_runs[0].max_attempts, 3);
    assert_eq!(step_runs[2].input, Some(json!({"fixed": true})));

    let (read, read_steps) = store
        .get_execution_with_steps(OwnerScope::Owner(fixture.owner), execution.id)
        .await
        .expect("read back");
    assert_eq!(read, execution);
    assert_eq!(read_steps, step_runs);
    let (detail, detail_steps, detail_attempts) = store
        .get_execution_detail(OwnerScope::Owner(fixture.owner), execution.id)
        .await
        .expect("read the detail");
    assert_eq!((detail, detail_steps), (execution.clone(), step_runs.clone()));
    let mut expected_attempts: Vec<(uuid::Uuid, i32)> =
        step_runs.iter().map(|step_run| (step_run.id, 1)).collect();
    expected_attempts.sort();
    let read_attempts: Vec<(uuid::Uuid, i32)> =
        detail_attempts.iter().map(|attempt| (attempt.step_run_id, attempt.attempt)).collect();
    assert_eq!(read_attempts, expected_attempts, "one attempt per step run, by step run");
    assert_eq!(
        store.get_execution(OwnerScope::All, execution.id).await.expect("admin get"),
        execution
    );
    let attempts = store
        .list_step_attempts(OwnerScope::Owner(fixture.owner), step_runs[2].id)
        .await
        .expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!((attempts[0].attempt, attempts[0].status), (1, StepAttemptStatus::Pending));
    assert_eq!(attempts[0].input, Some(json!({"fixed": true})));

    // A repeated step key fails the whole creation: no execution is left behind.
    let duplicate = store
        .create_execution(
            NewExecution::new(fixture.owner, ExecutionTrigger::Api, definition()),
            vec![NewStepRun::new("same", 1), NewStepRun::new("same", 1)],
        )
        .await;
    assert!(
        matches!(duplicate, Err(StoreError::AlreadyExists(ref what)) if what == "step_key"),
        "{duplicate:?}"
    );
    let listed = store
        .list_executions(
            ExecutionFilter::new(OwnerScope::Owner(fixture.owner)),
            PageRequest::default(),
        )
        .await
        .expect("list");
    assert_eq!(listed.total, 1);

    // Sub-workflows: depth follows the parent, and the parent step must belong to the parent.
    let child_request = NewExecution {
        parent: Some(ParentStep {
            execution_id: execution.id,
            step_run_id: step_runs[1].id,
            attempt: 1,
        }),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    let (child, child_steps) = start_execution(&store, child_request, &["inner"], 1, None).await;
    assert_eq!(child.depth, 1);
    assert_eq!(child.parent_execution_id, Some(execution.id));
    assert_eq!(child.parent_step_run_id, Some(step_runs[1].id));
    assert_eq!(child.parent_attempt, Some(1));
    let grandchild_request = NewExecution {
        parent: Some(ParentStep {
            execution_id: child.id,
            step_run_id: child_steps[0].id,
            attempt: 1,
        }),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    let (grandchild, _) = start_execution(&store, grandchild_request, &["deepest"], 1, None).await;
    assert_eq!(grandchild.depth, 2);
    let mismatched_parent = NewExecution {
        parent: Some(ParentStep {
            execution_id: execution.id,
            step_run_id: child_steps[0].id,
            attempt: 1,
        }),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    let mismatched = store.create_execution(mismatched_parent, Vec::new()).await;
    assert!(matches!(mismatched, Err(StoreError::ReferenceViolated(_))), "{mismatched:?}");
    let missing_parent = NewExecution {
        parent: Some(ParentStep {
            execution_id: Uuid::now_v7(),
            step_run_id: Uuid::now_v7(),
            attempt: 1,
        }),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    let missing = store.create_execution(missing_parent, Vec::new()).await;
    assert!(
        matches!(missing, Err(StoreError::ReferenceViolated(ref what)) if what == "parent_execution_id"),
        "{missing:?}"
    );
    let unknown_owner = store
        .create_execution(
            NewExecution::new(Uuid::now_v7(), ExecutionTrigger::Api, definition()),
            Vec::new(),
        )
        .await;
    assert!(matches!(unknown_owner, Err(StoreError::ReferenceViolated(_))), "{unknown_owner:?}");
}

// ---------------------------------------------------------------------------------------------
// Step transitions and fencing
// ---------------------------------------------------------------------------------------------

async fn step_transitions_in_order(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) =
        simple_execution(&store, fixture.owner, &["happy", "sad", "slow", "late"], 2).await;
    let key = steps[0].attempt_key();
    let t0 = now();

    // Out of order: nothing moves.
    let early_assign = store.assign_step(key, assignment("runner-1", t0)).await.expect("assign");
    assert_eq!(
        early_assign,
        StepTransitionOutcome::Rejected {
            current_attempt: 1,
            current_status: StepRunStatus::Pending
        }
    );
    let early_start = store.mark_step_running(key, t0).await.expect("start");
    assert!(!early_start.is_applied());
    assert_eq!(store.get_step_run(key.step_run_id).await.expect("get"), steps[0]);

    let queued =
        applied(store.mark_step_queued(key, Some(json!({"x": 1})), t0).await.expect("queue"));
    assert_eq!(queued.status, StepRunStatus::Queued);
    assert_eq!(queued.input, Some(json!({"x": 1})));
    assert_eq!((queued.queued_at, queued.version), (Some(t0), 2));
    let queued_again = store.mark_step_queued(key, None, t0).await.expect("queue again");
    assert_eq!(
        queued_again,
        StepTransitionOutcome::Rejected {
            current_attempt: 1,
            current_status: StepRunStatus::Queued
        }
    );

    let t1 = t0 + seconds(1);
    let assigned =
        applied(store.assign_step(key, assignment("runner-1", t1)).await.expect("assign"));
    assert_eq!(assigned.status, StepRunStatus::Assigned);
    assert_eq!(assigned.runner_id.as_deref(), Some("runner-1"));
    assert_eq!(assigned.lease_expires_at, Some(t1 + seconds(30)));
    assert_eq!((assigned.assigned_at, assigned.version), (Some(t1), 3));

    let t2 = t0 + seconds(2);
    let running = run(&store, key, t2).await;
    assert_eq!(
        (running.status, running.started_at, running.version),
        (StepRunStatus::Running, Some(t2), 4)
    );
    assert!(!store.mark_step_running(key, t2).await.expect("start twice").is_applied());

    let t3 = t0 + seconds(3);
    let succeeded =
        complete(&store, key, Completion::Succeeded { output: json!({"answer": 42}) }, t3).await;
    assert_eq!(succeeded.status, StepRunStatus::Succeeded);
    assert_eq!(succeeded.output, Some(json!({"answer": 42})));
    assert_eq!(
        (succeeded.finished_at, succeeded.lease_expires_at, succeeded.version),
        (Some(t3), None, 5)
    );
    assert_eq!(store.get_step_run(key.step_run_id).await.expect("get"), succeeded);
    let attempts =
        store.list_step_attempts(OwnerScope::All, key.step_run_id).await.expect("attempts");
    assert_eq!(attempts.len(), 1);
    let record = &attempts[0];
    assert_eq!((record.attempt, record.status), (1, StepAttemptStatus::Succeeded));
    assert_eq!(record.runner_id.as_deref(), Some("runner-1"));
    assert_eq!(record.input, Some(json!({"x": 1})));
    assert_eq!(record.output, Some(json!({"answer": 42})));
    assert_eq!(
        (record.queued_at, record.assigned_at, record.started_at, record.finished_at),
        (Some(t0), Some(t1), Some(t2), Some(t3))
    );

    // A failure keeps its error and whether it may be retried, on the step and on the attempt.
    let sad = drive_step(&store, &steps[1], failure(false), t3).await;
    assert_eq!(sad.status, StepRunStatus::Failed);
    assert_eq!((sad.error.as_deref(), sad.error_retryable), (Some("boom"), Some(false)));
    let sad_attempts = store.list_step_attempts(OwnerScope::All, sad.id).await.expect("attempts");
    assert_eq!(sad_attempts[0].status, StepAttemptStatus::Failed);
    assert_eq!(
        (sad_attempts[0].error.as_deref(), sad_attempts[0].retryable),
        (Some("boom"), Some(false))
    );

    // Runner results need an assignment; the engine's timeout applies to any unfinished status.
    let slow_key = steps[2].attempt_key();
    queue(&store, slow_key, t3).await;
    let unassigned_result = store
        .complete_step(slow_key, Completion::Succeeded { output: json!(1) }, t3)
        .await
        .expect("complete unassigned");
    assert_eq!(
        unassigned_result,
        CompletionOutcome::Stale { current_attempt: 1, current_status: StepRunStatus::Queued }
    );
    let timed_out = complete(&store, slow_key, Completion::TimedOut, t3).await;
    assert_eq!((timed_out.status, timed_out.version), (StepRunStatus::TimedOut, 3));
    // A verdict on an ASSIGNED attempt counts the start watchers may have been told of
    // without a commit, as a result that carries its start does.
    let late_key = steps[3].attempt_key();
    queue(&store, late_key, t3).await;
    assign(&store, late_key, "runner-1", t3).await;
    let late = complete(&store, late_key, Completion::TimedOut, t3).await;
    assert_eq!((late.status, late.version), (StepRunStatus::TimedOut, 5));

    let unknown = AttemptKey { step_run_id: Uuid::now_v7(), attempt: 1 };
    assert!(matches!(
        store.assign_step(unknown, assignment("r", t0)).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.complete_step(unknown, Completion::Cancelled, t0).await,
        Err(StoreError::NotFound)
    ));
}

async fn stale_and_duplicate_completions_are_ignored(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["fenced"], 3).await;
    let first = steps[0].attempt_key();
    let t0 = now();
    queue(&store, first, t0).await;
    assign(&store, first, "runner-old", t0).await;
    run(&store, first, t0).await;
    // The old runner vanishes; the step moves on to attempt 2.
    let requeued =
        applied(store.requeue_after_lease_loss(first, t0 + seconds(40)).await.expect("requeue"));
    assert_eq!((requeued.attempt, requeued.status), (2, StepRunStatus::Queued));
    let second = requeued.attempt_key();
    assign(&store, second, "runner-new", t0 + seconds(41)).await;
    let before = store.get_step_run(first.step_run_id).await.expect("get");

    // The old runner's late success names attempt 1: ignored, nothing changes.
    let stale = store
        .complete_step(first, Completion::Succeeded { output: json!("late") }, t0 + seconds(42))
        .await
        .expect("stale completion");
    assert_eq!(
        stale,
        CompletionOutcome::Stale { current_attempt: 2, current_status: StepRunStatus::Assigned }
    );
    assert!(!stale.is_applied());
    assert_eq!(store.get_step_run(first.step_run_id).await.expect("get"), before);
    assert!(!store.mark_step_running(first, t0).await.expect("stale start").is_applied());
    let attempts =
        store.list_step_attempts(OwnerScope::All, first.step_run_id).await.expect("attempts");
    assert_eq!(attempts[0].status, StepAttemptStatus::LeaseLost);
    assert_eq!(attempts[0].output, None, "the stale result is not recorded either");

    // The current attempt completes once; a repeated or conflicting report is a duplicate.
    let done = complete(
        &store,
        second,
        Completion::Succeeded { output: json!("first") },
        t0 + seconds(43),
    )
    .await;
    let duplicate = store
        .complete_step(second, Completion::Succeeded { output: json!("second") }, t0 + seconds(44))
        .await
        .expect("duplicate");
    assert_eq!(duplicate, CompletionOutcome::Duplicate { status: StepRunStatus::Succeeded });
    let conflicting =
        store.complete_step(second, failure(true), t0 + seconds(45)).await.expect("conflict");
    assert_eq!(conflicting, CompletionOutcome::Duplicate { status: StepRunStatus::Succeeded });
    let after = store.get_step_run(first.step_run_id).await.expect("get");
    assert_eq!(after, done);
    assert_eq!(after.output, Some(json!("first")));
    let attempts =
        store.list_step_attempts(OwnerScope::All, first.step_run_id).await.expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].output, Some(json!("first")));
    // A report for an attempt that never existed is stale too.
    let future = AttemptKey { step_run_id: first.step_run_id, attempt: 9 };
    let bogus = store.complete_step(future, Completion::Cancelled, t0).await.expect("bogus");
    assert_eq!(
        bogus,
        CompletionOutcome::Stale { current_attempt: 2, current_status: StepRunStatus::Succeeded }
    );
}

async fn concurrent_double_assignment_has_one_winner(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let keys = ["a", "b", "c", "d", "e", "f"];
    let (_, steps) = simple_execution(&store, fixture.owner, &keys, 1).await;
    let t0 = now();
    for step_run in &steps {
        queue(&store, step_run.attempt_key(), t0).await;
    }
    for step_run in &steps {
        let key = step_run.attempt_key();
        let contenders: Vec<_> = ["runner-left", "runner-right"]
            .into_iter()
            .map(|runner_id| {
                let store = store.clone();
                tokio::spawn(async move { store.assign_step(key, assignment(runner_id, t0)).await })
            })
            .collect();
        let mut winners = Vec::new();
        for contender in contenders {
            let outcome = contender.await.expect("task").expect("assign");
            match outcome {
                StepTransitionOutcome::Applied(step_run) => winners.push(step_run),
                StepTransitionOutcome::Rejected { current_attempt, current_status } => {
                    assert_eq!((current_attempt, current_status), (1, StepRunStatus::Assigned));
                }
            }
        }
        assert_eq!(winners.len(), 1, "exactly one assignment of {} wins", step_run.step_key);
        let stored = store.get_step_run(key.step_run_id).await.expect("get");
        assert_eq!(stored.runner_id, winners[0].runner_id);
        assert_eq!(stored.version, 3, "queued and assigned once each");
        let attempts =
            store.list_step_attempts(OwnerScope::All, key.step_run_id).await.expect("attempts");
        assert_eq!(attempts[0].runner_id, winners[0].runner_id);
    }
}

// ---------------------------------------------------------------------------------------------
// Retries, lease loss, cancellation
// ---------------------------------------------------------------------------------------------

async fn retry_scheduling_creates_attempt_rows(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (execution, steps) = simple_execution(&store, fixture.owner, &["flaky", "doomed"], 2).await;
    let t0 = now();
    let failed = drive_step(&store, &steps[0], failure(true), t0).await;
    let first = failed.attempt_key();
    let backoff_over = t0 + seconds(60);

    let retried =
        applied(store.schedule_retry(first, backoff_over, t0 + seconds(1)).await.expect("retry"));
    assert_eq!((retried.attempt, retried.status), (2, StepRunStatus::Pending));
    assert_eq!(retried.next_attempt_at, Some(backoff_over));
    assert_eq!(
        (retried.error.clone(), retried.error_retryable, retried.runner_id.clone()),
        (None, None, None)
    );
    assert_eq!(retried.input, failed.input, "the resolved input is kept for the retry");
    assert_eq!(retried.user_attempts_used(), 2);
    // Its state says it waits for its retry, without reading its input or output.
    assert_eq!(
        states_of(&store, execution.id, &["flaky", "doomed", "nope"]).await,
        [
            ("doomed".to_owned(), StepRunStatus::Pending, false),
            ("flaky".to_owned(), StepRunStatus::Pending, true)
        ]
    );
    // Scheduling the same retry twice does nothing.
    let again =
        store.schedule_retry(first, backoff_over, t0 + seconds(1)).await.expect("retry twice");
    assert_eq!(
        again,
        StepTransitionOutcome::Rejected {
            current_attempt: 2,
            current_status: StepRunStatus::Pending
        }
    );

    let second = retried.attempt_key();
    let too_early =
        store.mark_step_queued(second, None, t0 + seconds(30)).await.expect("too early");
    assert!(!too_early.is_applied(), "the backoff is not over");
    let requeued =
        applied(store.mark_step_queued(second, None, backoff_over).await.expect("queue retry"));
    assert_eq!((requeued.status, requeued.next_attempt_at), (StepRunStatus::Queued, None));
    let flaky = states_of(&store, execution.id, &["flaky"]).await;
    assert_eq!(flaky, [("flaky".to_owned(), StepRunStatus::Queued, false)]);
    assign(&store, second, "runner-2", backoff_over).await;
    complete(&store, second, failure(true), backoff_over + seconds(1)).await;
    let exhausted = store
        .schedule_retry(second, backoff_over + seconds(90), backoff_over)
        .await
        .expect("no budget");
    assert_eq!(
        exhausted,
        StepTransitionOutcome::Rejected {
            current_attempt: 2,
            current_status: StepRunStatus::Failed
        },
        "max_attempts is 2"
    );

    let attempts = store
        .list_step_attempts(OwnerScope::Owner(fixture.owner), first.step_run_id)
        .await
        .expect("attempts");
    let summary: Vec<(i32, StepAttemptStatus, Option<&str>)> = attempts
        .iter()
        .map(|attempt| (attempt.attempt, attempt.status, attempt.runner_id.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, StepAttemptStatus::Failed, Some("runner-1")),
            (2, StepAttemptStatus::Failed, Some("runner-2"))
        ]
    );
    assert_eq!(attempts[0].retryable, Some(true));
    assert_eq!(attempts[1].queued_at, Some(backoff_over));
    assert_eq!(attempts[1].created_at, t0 + seconds(1));

    // No retry once the execution is being cancelled.
    let doomed = drive_step(&store, &steps[1], failure(true), t0).await;
    assert_eq!(
        store
            .request_cancel(OwnerScope::Owner(fixture.owner), execution.id, t0)
            .await
            .expect("cancel"),
        CancelRequestOutcome::Recorded
    );
    let refused =
        store.schedule_retry(doomed.attempt_key(), t0, t0).await.expect("retry after cancel");
    assert!(!refused.is_applied());
    assert_eq!(
        store.list_step_attempts(OwnerScope::All, doomed.id).await.expect("attempts").len(),
        1
    );
}

async fn lease_loss_is_counted_apart_from_retries(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["wandering"], 2).await;
    let t0 = now();
    let first = steps[0].attempt_key();
    queue(&store, first, t0).await;
    // Lease loss is only for attempts a runner holds.
    let not_held = store.requeue_after_lease_loss(first, t0).await.expect("requeue queued");
    assert_eq!(
        not_held,
        StepTransitionOutcome::Rejected {
            current_attempt: 1,
            current_status: StepRunStatus::Queued
        }
    );
    assign(&store, first, "runner-a", t0).await;
    let second =
        applied(store.requeue_after_lease_loss(first, t0 + seconds(31)).await.expect("requeue"));
    assert_eq!((second.attempt, second.infra_reassignments), (2, 1));
    assert_eq!(
        (second.status, second.runner_id.clone(), second.queued_at),
        (StepRunStatus::Queued, None, Some(t0 + seconds(31)))
    );
    assert_eq!(second.user_attempts_used(), 1, "lease loss does not use the retry budget");
    assert!(!store.requeue_after_lease_loss(first, t0).await.expect("stale requeue").is_applied());

    assign(&store, second.attempt_key(), "runner-b", t0 + seconds(32)).await;
    run(&store, second.attempt_key(), t0 + seconds(33)).await;
    let third = applied(
        store
            .requeue_after_lease_loss(second.attempt_key(), t0 + seconds(70))
            .await
            .expect("requeue"),
    );
    assert_eq!((third.attempt, third.infra_reassignments, third.user_attempts_used()), (3, 2, 1));

    // A user-visible failure after two reassignments still has its one retry (max_attempts 2).
    assign(&store, third.attempt_key(), "runner-c", t0 + seconds(71)).await;
    complete(&store, third.attempt_key(), failure(true), t0 + seconds(72)).await;
    let fourth = applied(
        store
            .schedule_retry(third.attempt_key(), t0 + seconds(80), t0 + seconds(72))
            .await
            .expect("retry"),
    );
    assert_eq!(
        (fourth.attempt, fourth.infra_reassignments, fourth.user_attempts_used()),
        (4, 2, 2)
    );

    let attempts = store.list_step_attempts(OwnerScope::All, steps[0].id).await.expect("attempts");
    let summary: Vec<(i32, StepAttemptStatus, Option<&str>)> = attempts
        .iter()
        .map(|attempt| (attempt.attempt, attempt.status, attempt.runner_id.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, StepAttemptStatus::LeaseLost, Some("runner-a")),
            (2, StepAttemptStatus::LeaseLost, Some("runner-b")),
            (3, StepAttemptStatus::Failed, Some("runner-c")),
            (4, StepAttemptStatus::Pending, None),
        ]
    );
    assert_eq!(attempts[0].finished_at, Some(t0 + seconds(31)));
    assert_eq!(attempts[1].queued_at, Some(t0 + seconds(31)));
    assert_eq!(attempts[1].input, Some(json!({"resolved": true})));
}

async fn cancel_pending_steps_reports_in_flight_work(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let keys = ["pending", "queued", "assigned", "running", "done"];
    let (execution, steps) = simple_execution(&store, fixture.owner, &keys, 1).await;
    let (_, bystander) = simple_execution(&store, fixture.owner, &["elsewhere"], 1).await;
    let t0 = now();
    queue(&store, steps[1].attempt_key(), t0).await;
    queue(&store, steps[2].attempt_key(), t0).await;
    assign(&store, steps[2].attempt_key(), "runner-a", t0).await;
    queue(&store, steps[3].attempt_key(), t0).await;
    assign(&store, steps[3].attempt_key(), "runner-b", t0).await;
    run(&store, steps[3].attempt_key(), t0).await;
    let done =
        drive_step(&store, &steps[4], Completion::Succeeded { output: json!(true) }, t0).await;
    queue(&store, bystander[0].attempt_key(), t0).await;

    let before = store.list_step_runs(execution.id).await.expect("list");
    let t1 = t0 + seconds(5);
    let mut in_flight = store.cancel_pending_steps(execution.id, t1).await.expect("cancel");
    in_flight.sort_by(|left, right| left.runner_id.cmp(&right.runner_id));
    assert_eq!(
        in_flight,
        [
            InFlightStepRun {
                step_run_id: steps[2].id,
                attempt: 1,
                runner_id: "runner-a".to_owned()
            },
            InFlightStepRun {
                step_run_id: steps[3].id,
                attempt: 1,
                runner_id: "runner-b".to_owned()
            },
        ]
    );
    let after = store.list_step_runs(execution.id).await.expect("list");
    let statuses: Vec<StepRunStatus> = after.iter().map(|step_run| step_run.status).collect();
    assert_eq!(
        statuses,
        [
            StepRunStatus::Cancelled,
            StepRunStatus::Cancelled,
            StepRunStatus::Cancelled,
            StepRunStatus::Cancelled,
            StepRunStatus::Succeeded,
        ]
    );
    assert!(after[..4].iter().all(|step_run| step_run.finished_at == Some(t1)));
    // An ASSIGNED step's start may have been announced at the next version before it was
    // committed: its cancel counts that stage too, so watchers see it as newer.
    let bumps: Vec<i64> =
        before.iter().zip(&after).map(|(old, new)| new.version - old.version).collect();
    assert_eq!(bumps, [1, 1, 2, 1, 0], "{before:?}");
    assert_eq!(after[4], done, "finished steps are left alone");
    for step_run in &after[..4] {
        let attempts =
            store.list_step_attempts(OwnerScope::All, step_run.id).await.expect("attempts");
        assert_eq!(attempts[0].status, StepAttemptStatus::Cancelled);
        assert_eq!(attempts[0].finished_at, Some(t1));
    }
    assert_eq!(
        store.get_step_run(bystander[0].id).await.expect("bystander").status,
        StepRunStatus::Queued,
        "other executions are untouched"
    );
    // The runner's late result after the cancel is a duplicate; a second cancel finds nothing.
    let late = store
        .complete_step(steps[3].attempt_key(), Completion::Succeeded { output: json!(1) }, t1)
        .await
        .expect("late");
    assert_eq!(late, CompletionOutcome::Duplicate { status: StepRunStatus::Cancelled });
    assert!(store.cancel_pending_steps(execution.id, t1).await.expect("cancel again").is_empty());
}

// ---------------------------------------------------------------------------------------------
// The engine's queries
// ---------------------------------------------------------------------------------------------

async fn ready_step_runs_by_priority_and_backoff(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let low = NewExecution {
        priority: 3,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Cron, definition())
    };
    let (_, low_steps) = start_execution(&store, low, &["a", "b", "waiting"], 1, None).await;
    let high = NewExecution {
        priority: 8,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Api, definition())
    };
    let (_, high_steps) = start_execution(&store, high, &["c", "d"], 2, None).await;
    let cancelled = NewExecution {
        priority: 10,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Api, definition())
    };
    let (cancelled, cancelled_steps) = start_execution(&store, cancelled, &["e"], 1, None).await;

    let t0 = now() - seconds(600);
    queue(&store, low_steps[1].attempt_key(), t0 + seconds(1)).await;
    queue(&store, low_steps[0].attempt_key(), t0).await;
    queue(&store, high_steps[0].attempt_key(), t0 + seconds(2)).await;
    queue(&store, cancelled_steps[0].attempt_key(), t0).await;
    store.request_cancel(OwnerScope::All, cancelled.id, t0).await.expect("cancel");
    let failed = drive_step(&store, &high_steps[1], failure(true), t0).await;
    store.schedule_retry(failed.attempt_key(), t0 + seconds(60), t0).await.expect("retry");

    let ready_keys =
        |ready: Vec<turbocat::store::ReadyStepRun>| -> Vec<(String, StepRunStatus, i32)> {
            ready
                .into_iter()
                .map(|ready| {
                    (ready.step_run.step_key, ready.step_run.status, ready.execution_priority)
                })
                .collect()
        };
    let before_backoff = store.list_ready_step_runs(t0 + seconds(10), 10).await.expect("ready");
    assert_eq!(
        ready_keys(before_backoff),
        [
            ("c".to_owned(), StepRunStatus::Queued, 8),
            ("a".to_owned(), StepRunStatus::Queued, 3),
            ("b".to_owned(), StepRunStatus::Queued, 3),
        ],
        "priority first, then the longest waiting; not the cancelled execution nor the backoff"
    );
    let after_backoff = store.list_ready_step_runs(t0 + seconds(60), 10).await.expect("ready");
    assert_eq!(
        ready_keys(after_backoff),
        [
            ("c".to_owned(), StepRunStatus::Queued, 8),
            ("d".to_owned(), StepRunStatus::Pending, 8),
            ("a".to_owned(), StepRunStatus::Queued, 3),
            ("b".to_owned(), StepRunStatus::Queued, 3),
        ]
    );
    // A read bounded by the limit, not by the backlog: the `limit` longest waiting of each
    // kind (QUEUED a and b, the retry d), then the `limit` of highest priority among them.
    let limited = store.list_ready_step_runs(t0 + seconds(60), 2).await.expect("ready");
    assert_eq!(limited[0].step_run.attempt, 2, "the retry");
    assert_eq!(
        ready_keys(limited),
        [("d".to_owned(), StepRunStatus::Pending, 8), ("a".to_owned(), StepRunStatus::Queued, 3)]
    );
    // Once assigned, a step is no longer ready.
    assign(&store, high_steps[0].attempt_key(), "runner", t0 + seconds(61)).await;
    let remaining = store.list_ready_step_runs(t0 + seconds(60), 10).await.expect("ready");
    assert_eq!(remaining.len(), 3);
    assert!(remaining.iter().all(|ready| ready.step_run.step_key != "c"));
}

/// What PostgreSQL's statistics say the reads of a store's one backend have done so far: scans
/// of the QUEUED steps' index and entries they read, and rows of `executions` read (by any
/// scan). The store's backend reports its counts first.
async fn postgres_reads(store: &turbocat::store::PostgresStore) -> (i64, i64, i64) {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(store.connections())
        .await
        .expect("report statistics");
    sqlx::query_as(
        "SELECT i.idx_scan, i.idx_tup_read, \
         t.seq_tup_read + COALESCE(t.idx_tup_fetch, 0) \
         FROM pg_stat_user_indexes i, pg_stat_user_tables t \
         WHERE i.indexrelname = 'step_runs_queued' AND t.relname = 'executions'",
    )
    .fetch_one(store.connections())
    .await
    .expect("statistics")
}

/// A store on `database` with one connection (one backend: its statistics and its process
/// id are those of every statement the store runs).
async fn one_connection(
    database: &crate::support::TestDatabase,
) -> (turbocat::store::PostgresStore, Arc<dyn Store>) {
    let postgres = turbocat::store::PostgresStore::connect_with_timeout(
        &database.url,
        1,
        std::time::Duration::from_secs(3),
    )
    .await
    .expect("connect");
    let store: Arc<dyn Store> = Arc::new(postgres.clone());
    (postgres, store)
}

/// PostgreSQL: the reconciler's read of the ready steps scans the QUEUED steps' index once and
/// looks up each one's execution once, however many executions are unfinished. Read as a join,
/// it had plans, on tables younger than their statistics, that scanned the index once per
/// unfinished execution or every execution once per QUEUED step (executions x queued steps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ready_steps_read_each_queued_step_once() {
    const EXECUTIONS: i64 = 120;
    let database = crate::support::postgres().await;
    // One connection: the statistics it reports are those of every read below.
    let (postgres, store) = one_connection(&database).await;
    let fixture = fixture(&store).await;
    let t0 = now() - seconds(600);
    for index in 0..EXECUTIONS {
        let (_, steps) = simple_execution(&store, fixture.owner, &["first", "second"], 1).await;
        queue(&store, steps[0].attempt_key(), t0 + seconds(index)).await;
    }
    let before = postgres_reads(&postgres).await;
    let ready = store.list_ready_step_runs(now(), 500).await.expect("ready");
    assert_eq!(ready.len() as i64, EXECUTIONS, "every execution's queued step");
    let after = postgres_reads(&postgres).await;
    let (scans, entries, execution_rows) =
        (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert!(scans <= 1, "{scans} scans of the QUEUED steps' index");
    assert!(entries <= EXECUTIONS, "{entries} index entries read for {EXECUTIONS} queued steps");
    assert!(
        execution_rows <= 2 * EXECUTIONS,
        "{execution_rows} rows of executions read for {EXECUTIONS} queued steps"
    );
}

/// PostgreSQL: the executions a user starts count in the shard of the connection that commits
/// their creation (8 plus its backend's process id modulo 64, migration 0014), so creations
/// committed on different connections never wait for one row, and one connection's land on
/// one row whatever their ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_executions_started_count_in_the_committing_connections_shard() {
    const EXECUTIONS: i64 = 12;
    let database = crate::support::postgres().await;
    let (postgres, store) = one_connection(&database).await;
    let fixture = fixture(&store).await;
    for _ in 0..EXECUTIONS {
        simple_execution(&store, fixture.owner, &["only"], 1).await;
    }
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(postgres.connections())
        .await
        .expect("the connection's process id");
    let counted: Vec<(i16, i64)> = sqlx::query_as(
        "SELECT shard, executions_started FROM usage_rollups \
         WHERE user_id = $1 AND executions_started > 0",
    )
    .bind(fixture.owner)
    .fetch_all(postgres.connections())
    .await
    .expect("usage rows");
    let shard = i16::try_from(8 + backend % 64).expect("a shard");
    assert_eq!(counted, [(shard, EXECUTIONS)], "one row, the connection's own");
}

async fn expired_leases_oldest_first(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["f", "g", "h", "queued"], 1).await;
    let t0 = now();
    // Leases of 30 seconds from each assignment time.
    for (step_run, assigned_at) in steps.iter().zip([t0 - seconds(40), t0 - seconds(50), t0]) {
        if step_run.step_key == "queued" {
            continue;
        }
        queue(&store, step_run.attempt_key(), assigned_at).await;
        assign(&store, step_run.attempt_key(), "runner", assigned_at).await;
    }
    run(&store, steps[1].attempt_key(), t0 - seconds(45)).await;
    queue(&store, steps[3].attempt_key(), t0).await;

    let expired = store.list_expired_leases(t0, 10).await.expect("expired");
    let keys: Vec<&str> = expired.iter().map(|step_run| step_run.step_key.as_str()).collect();
    assert_eq!(keys, ["g", "f"], "RUNNING and ASSIGNED past their lease, oldest lease first");
    assert_eq!(expired[0].lease_expires_at, Some(t0 - seconds(20)));
    assert_eq!(store.list_expired_leases(t0, 1).await.expect("expired").len(), 1);
    assert!(store.list_expired_leases(t0 - seconds(60), 10).await.expect("expired").is_empty());
    assert_eq!(store.list_expired_leases(t0 + seconds(31), 10).await.expect("expired").len(), 3);

    complete(&store, steps[1].attempt_key(), Completion::Succeeded { output: json!(null) }, t0)
        .await;
    store.requeue_after_lease_loss(steps[0].attempt_key(), t0).await.expect("requeue");
    assert!(store.list_expired_leases(t0, 10).await.expect("expired").is_empty());
}

/// Sub-workflows: the parent step goes ASSIGNED -> RUNNING and the child is created in one
/// transaction, so an attempt has exactly one child.
async fn child_executions_start_with_their_parent_step(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (parent, steps) = simple_execution(&store, fixture.owner, &["sub", "other"], 2).await;
    let key = steps[0].attempt_key();
    let parent_step = ParentStep { execution_id: parent.id, step_run_id: steps[0].id, attempt: 1 };
    let child_request = |parent_step: ParentStep| NewExecution {
        parent: Some(parent_step),
        priority: 7,
        input: json!({"x": 1}),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    let inner = || vec![NewStepRun::new("inner", 1), NewStepRun::new("deeper", 3)];
    let children_of_parent = || {
        let store = store.clone();
        async move {
            let mut filter = ExecutionFilter::new(OwnerScope::All);
            filter.parent_execution_id = Some(parent.id);
            store.list_executions(filter, PageRequest::default()).await.expect("children").items
        }
    };
    let t0 = now();

    // Not ASSIGNED: rejected, and nothing is created.
    let early = store
        .start_child_execution(key, child_request(parent_step), inner(), t0)
        .await
        .expect("early start");
    assert_eq!(
        early,
        ChildExecutionStart::Rejected {
            current_attempt: 1,
            current_status: StepRunStatus::Pending
        }
    );
    queue(&store, key, t0).await;
    let assigned = assign(&store, key, "engine", t0).await;
    assert_eq!(assigned.lease_expires_at, Some(t0 + seconds(30)));

    // The parent must be the step being started.
    let other_step = ParentStep { execution_id: parent.id, step_run_id: steps[1].id, attempt: 1 };
    let mismatched = store.start_child_execution(key, child_request(other_step), inner(), t0).await;
    assert!(matches!(mismatched, Err(StoreError::ReferenceViolated(_))), "{mismatched:?}");
    // …and its attempt the one being started.
    let other_attempt = ParentStep { attempt: 2, ..parent_step };
    let mismatched =
        store.start_child_execution(key, child_request(other_attempt), inner(), t0).await;
    assert!(
        matches!(mismatched, Err(StoreError::ReferenceViolated(ref what)) if what == "parent_attempt"),
        "{mismatched:?}"
    );
    // A child that cannot be created leaves the step as it was.
    let duplicate_keys = vec![NewStepRun::new("same", 1), NewStepRun::new("same", 1)];
    let refused =
        store.start_child_execution(key, child_request(parent_step), duplicate_keys, t0).await;
    assert!(matches!(refused, Err(StoreError::AlreadyExists(_))), "{refused:?}");
    let still = store.get_step_run(key.step_run_id).await.expect("step");
    assert_eq!((still.status, still.version), (StepRunStatus::Assigned, assigned.version));
    assert!(children_of_parent().await.is_empty());

    // Concurrent starts of one attempt: exactly one child.
    let t1 = t0 + seconds(1);
    let contenders: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let request = child_request(parent_step);
            tokio::spawn(
                async move { store.start_child_execution(key, request, inner(), t1).await },
            )
        })
        .collect();
    let mut started = Vec::new();
    for contender in contenders {
        match contender.await.expect("task").expect("start child") {
            ChildExecutionStart::Started { parent_step, child } => {
                started.push((parent_step, child))
            }
            ChildExecutionStart::Rejected { current_attempt, current_status } => {
                assert_eq!((current_attempt, current_status), (1, StepRunStatus::Running));
            }
        }
    }
    assert_eq!(started.len(), 1, "one child per attempt");
    let (running, child) = started.remove(0);
    assert_eq!(running.status, StepRunStatus::Running);
    assert_eq!(running.runner_id.as_deref(), Some("engine"));
    assert_eq!(running.lease_expires_at, None, "an engine-held step has no lease to run out");
    assert_eq!(running.started_at, Some(t1));
    assert_eq!(running.version, assigned.version + 1);
    assert_eq!(child.status, ExecutionStatus::Queued);
    assert_eq!(child.trigger, ExecutionTrigger::SubWorkflow);
    assert_eq!(
        (child.parent_execution_id, child.parent_step_run_id),
        (Some(parent.id), Some(key.step_run_id))
    );
    assert_eq!((child.depth, child.priority, child.created_at), (1, 7, t1));
    assert_eq!(child.input, json!({"x": 1}));
    assert_eq!(child.parent_attempt, Some(1));
    let child_steps = store.list_step_runs(child.id).await.expect("child steps");
    let keys: Vec<&str> = child_steps.iter().map(|step_run| step_run.step_key.as_str()).collect();
    assert_eq!(keys, ["inner", "deeper"]);
    assert!(child_steps.iter().all(|step_run| step_run.status == StepRunStatus::Pending));
    assert_eq!(child_steps[1].max_attempts, 3);
    let attempts =
        store.list_step_attempts(OwnerScope::All, key.step_run_id).await.expect("attempts");
    assert_eq!(
        (attempts[0].status, attempts[0].started_at),
        (StepAttemptStatus::Running, Some(t1))
    );
    assert!(
        store.list_expired_leases(t1 + seconds(3600), 10).await.expect("expired").is_empty(),
        "never taken back as a lost lease"
    );
    assert_eq!(ids(&children_of_parent().await), vec![child.id]);

    // Once the attempt is over, a late start is rejected.
    complete(&store, key, Completion::Succeeded { output: json!({"done": true}) }, t1).await;
    let late = store
        .start_child_execution(key, child_request(parent_step), inner(), t1)
        .await
        .expect("late start");
    assert_eq!(
        late,
        ChildExecutionStart::Rejected {
            current_attempt: 1,
            current_status: StepRunStatus::Succeeded
        }
    );
    assert_eq!(children_of_parent().await.len(), 1);
}

async fn execution_transitions_cancel_requests_and_deadlines(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let t0 = now();
    let timed = NewExecution {
        deadline_at: Some(t0 - seconds(1)),
        timeout_seconds: Some(60),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Webhook, definition())
    };
    let (execution, _) = start_execution(&store, timed, &["x"], 1, None).await;
    let later = NewExecution {
        deadline_at: Some(t0 + seconds(3600)),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Webhook, definition())
    };
    let (later, _) = start_execution(&store, later, &["x"], 1, None).await;

    let past_deadline =
        store.list_running_executions_past_deadline(t0, 10).await.expect("deadlines");
    assert_eq!(ids(&past_deadline), [execution.id], "queued executions count as unfinished");

    let wrong_from = ExecutionChange::new(ExecutionStatus::Succeeded, t0);
    assert!(
        !store
            .transition_execution(execution.id, &[ExecutionStatus::Running], wrong_from)
            .await
            .expect("cas")
    );
    assert_eq!(store.get_execution(OwnerScope::All, execution.id).await.expect("get"), execution);

    let start = ExecutionChange {
        started_at: Some(t0),
        ..ExecutionChange::new(ExecutionStatus::Running, t0)
    };
    assert!(
        store
            .transition_execution(execution.id, &[ExecutionStatus::Queued], start.clone())
            .await
            .expect("start")
    );
    assert!(
        !store
            .transition_execution(execution.id, &[ExecutionStatus::Queued], start)
            .await
            .expect("start twice")
    );
    let running = store.get_execution(OwnerScope::All, execution.id).await.expect("get");
    assert_eq!(
        (running.status, running.started_at, running.version),
        (ExecutionStatus::Running, Some(t0), 2)
    );

    let unknown = store
        .transition_execution(
            Uuid::now_v7(),
            &[ExecutionStatus::Queued],
            ExecutionChange::new(ExecutionStatus::Running, t0),
        )
        .await;
    assert!(matches!(unknown, Err(StoreError::NotFound)), "{unknown:?}");

    // Cancel requests: recorded once, scoped to the owner.
    let other = OwnerScope::Owner(fixture.other_owner);
    assert!(matches!(
        store.request_cancel(other, execution.id, t0).await,
        Err(StoreError::NotFound)
    ));
    let mine = OwnerScope::Owner(fixture.owner);
    let t1 = t0 + seconds(1);
    assert_eq!(
        store.request_cancel(mine, execution.id, t1).await.expect("cancel"),
        CancelRequestOutcome::Recorded
    );
    assert_eq!(
        store.request_cancel(mine, execution.id, t1 + seconds(1)).await.expect("cancel again"),
        CancelRequestOutcome::AlreadyRequested
    );
    let requested = store.get_execution(mine, execution.id).await.expect("get");
    assert_eq!((requested.cancel_requested_at, requested.version), (Some(t1), 3));

    let t2 = t0 + seconds(2);
    let cancel = ExecutionChange {
        error: Some("cancelled by user".to_owned()),
        finished_at: Some(t2),
        ..ExecutionChange::new(ExecutionStatus::Cancelled, t2)
    };
    assert!(
        store
            .transition_execution(execution.id, ExecutionStatus::UNFINISHED, cancel)
            .await
            .expect("finish")
    );
    let finished = store.get_execution(mine, execution.id).await.expect("get");
    assert_eq!(finished.status, ExecutionStatus::Cancelled);
    assert_eq!(
        (finished.finished_at, finished.started_at, finished.updated_at),
        (Some(t2), Some(t0), t2)
    );
    assert_eq!(finished.error.as_deref(), Some("cancelled by user"));
    assert_eq!(
        store.request_cancel(mine, execution.id, t2).await.expect("cancel finished"),
        CancelRequestOutcome::AlreadyFinished(ExecutionStatus::Cancelled)
    );
    assert!(
        store.list_running_executions_past_deadline(t0, 10).await.expect("deadlines").is_empty()
    );

    // Success with an output, and a deadline set when it starts.
    let start_later = ExecutionChange {
        started_at: Some(t0),
        deadline_at: Some(t0 + seconds(5)),
        ..ExecutionChange::new(ExecutionStatus::Running, t0)
    };
    assert!(
        store
            .transition_execution(later.id, &[ExecutionStatus::Queued], start_later)
            .await
            .expect("start")
    );
    let overdue =
        store.list_running_executions_past_deadline(t0 + seconds(6), 10).await.expect("deadlines");
    assert_eq!(ids(&overdue), [later.id]);
    let succeed = ExecutionChange {
        output: Some(json!({"result": "ok"})),
        finished_at: Some(t2),
        ..ExecutionChange::new(ExecutionStatus::Succeeded, t2)
    };
    assert!(
        store
            .transition_execution(later.id, &[ExecutionStatus::Running], succeed)
            .await
            .expect("succeed")
    );
    let succeeded = store.get_execution(mine, later.id).await.expect("get");
    assert_eq!(succeeded.output, Some(json!({"result": "ok"})));
    assert_eq!(succeeded.deadline_at, Some(t0 + seconds(5)));
    assert!(
        store
            .list_running_executions_past_deadline(t0 + seconds(6), 10)
            .await
            .expect("deadlines")
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

async fn logs_batch_insert_and_cursor_paging(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (execution, steps) = simple_execution(&store, fixture.owner, &["talker", "quiet"], 1).await;
    let (other_execution, other_steps) = simple_execution(&store, fixture.owner, &["x"], 1).await;
    let t0 = now();
    let levels = [
        ExecutionLogLevel::Debug,
        ExecutionLogLevel::Info,
        ExecutionLogLevel::Warn,
        ExecutionLogLevel::Error,
    ];
    let logs: Vec<NewExecutionLog> = (0..25)
        .map(|index| NewExecutionLog {
            execution_id: execution.id,
            step_run_id: if index % 2 == 0 { Some(steps[0].id) } else { None },
            attempt: if index % 2 == 0 { Some(1) } else { None },
            level: levels[index % 4],
            source: if index % 2 == 0 {
                ExecutionLogSource::Stdout
            } else {
                ExecutionLogSource::System
            },
            message: format!("line {index}"),
            fields: if index == 3 { Some(json!({"key": "value"})) } else { None },
            created_at: t0 + seconds(i64::try_from(index).expect("small")),
        })
        .collect();
    let written = store.append_execution_logs(logs.clone()).await.expect("append");
    assert_eq!(
        written.iter().map(|line| line.message.clone()).collect::<Vec<_>>(),
        logs.iter().map(|line| line.message.clone()).collect::<Vec<_>>(),
        "the lines come back as stored, in order"
    );
    assert!(written.windows(2).all(|pair| pair[0].id < pair[1].id), "ids grow: {written:?}");
    assert_eq!(written[3].fields, Some(json!({"key": "value"})));
    assert!(store.append_execution_logs(Vec::new()).await.expect("append nothing").is_empty());
    let noise = NewExecutionLog {
        execution_id: other_execution.id,
        step_run_id: Some(other_steps[0].id),
        attempt: Some(1),
        level: ExecutionLogLevel::Error,
        source: ExecutionLogSource::Stderr,
        message: "elsewhere".to_owned(),
        fields: None,
        created_at: t0,
    };
    assert_eq!(store.append_execution_logs(vec![noise.clone()]).await.expect("append").len(), 1);

    // Pages of 10: 10, 10, 5, no gaps and no duplicates, in insertion order.
    let mine = OwnerScope::Owner(fixture.owner);
    let mut seen = Vec::new();
    let mut filter = ExecutionLogFilter::first(10);
    let mut page_sizes = Vec::new();
    loop {
        let page =
            store.list_execution_logs(mine, execution.id, filter.clone()).await.expect("logs");
        page_sizes.push(page.items.len());
        seen.extend(page.items);
        let Some(cursor) = page.next_cursor else { break };
        filter.after_id = Some(cursor.parse().expect("log cursors are ids"));
    }
    assert_eq!(page_sizes, [10, 10, 5]);
    let messages: Vec<String> = seen.iter().map(|log| log.message.clone()).collect();
    let expected: Vec<String> = (0..25).map(|index| format!("line {index}")).collect();
    assert_eq!(messages, expected);
    assert!(seen.windows(2).all(|pair| pair[0].id < pair[1].id));
    assert_eq!(seen[3].fields, Some(json!({"key": "value"})));
    assert_eq!(
        (seen[3].level, seen[3].source),
        (ExecutionLogLevel::Error, ExecutionLogSource::System)
    );
    assert_eq!(
        (seen[4].step_run_id, seen[4].attempt, seen[4].created_at),
        (Some(steps[0].id), Some(1), t0 + seconds(4))
    );

    let step_only =
        ExecutionLogFilter { step_run_id: Some(steps[0].id), ..ExecutionLogFilter::first(100) };
    let step_page =
        store.list_execution_logs(mine, execution.id, step_only).await.expect("step logs");
    assert_eq!(step_page.items.len(), 13);
    assert_eq!(step_page.next_cursor, None);
    let quiet_only =
        ExecutionLogFilter { step_run_id: Some(steps[1].id), ..ExecutionLogFilter::first(100) };
    assert!(
        store
            .list_execution_logs(mine, execution.id, quiet_only)
            .await
            .expect("quiet")
            .items
            .is_empty()
    );
    let warnings = ExecutionLogFilter {
        minimum_level: Some(ExecutionLogLevel::Warn),
        ..ExecutionLogFilter::first(100)
    };
    let severe = store.list_execution_logs(mine, execution.id, warnings).await.expect("warnings");
    assert_eq!(severe.items.len(), 12, "WARN and ERROR lines: 6 + 6");
    assert!(
        severe.items.iter().all(
            |log| log.level != ExecutionLogLevel::Debug && log.level != ExecutionLogLevel::Info
        )
    );
    let tail = ExecutionLogFilter { after_id: Some(seen[22].id), ..ExecutionLogFilter::first(100) };
    let tail_page = store.list_execution_logs(mine, execution.id, tail).await.expect("tail");
    assert_eq!(tail_page.items, seen[23..].to_vec());

    let foreign = store
        .list_execution_logs(
            OwnerScope::Owner(fixture.other_owner),
            execution.id,
            ExecutionLogFilter::first(10),
        )
        .await;
    assert!(matches!(foreign, Err(StoreError::NotFound)), "{foreign:?}");
    // A log line must name a step run of its own execution; a failed batch writes nothing.
    let misplaced = NewExecutionLog { execution_id: execution.id, ..noise.clone() };
    let batch = vec![
        NewExecutionLog {
            message: "fine".to_owned(),
            step_run_id: None,
            attempt: None,
            ..misplaced.clone()
        },
        misplaced,
    ];
    let refused = store.append_execution_logs(batch).await;
    assert!(matches!(refused, Err(StoreError::ReferenceViolated(_))), "{refused:?}");
    let all = store
        .list_execution_logs(OwnerScope::All, execution.id, ExecutionLogFilter::first(1000))
        .await
        .expect("all");
    assert_eq!(all.items.len(), 25);
}

// ---------------------------------------------------------------------------------------------
// Lists, scope, deletion
// ---------------------------------------------------------------------------------------------

async fn list_executions_filters_pages_and_cursors(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let second_workflow = create_workflow(&store, fixture.owner).await;
    let deployment = create_deployment(&store, fixture.owner, fixture.workflow).await;
    let with = |workflow_id: Option<Uuid>, deployment_id: Option<Uuid>| NewExecution {
        workflow_id,
        deployment_id,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Manual, definition())
    };
    let mut created = Vec::new();
    for (workflow_id, deployment_id) in [
        (Some(fixture.workflow), Some(deployment)),
        (Some(fixture.workflow), None),
        (Some(second_workflow), None),
        (Some(fixture.workflow), Some(deployment)),
        (None, None),
        (Some(second_workflow), None),
    ] {
        created.push(
            start_execution(&store, with(workflow_id, deployment_id), &["only"], 1, None).await,
        );
    }
    let child_request = NewExecution {
        parent: Some(ParentStep {
            execution_id: created[0].0.id,
            step_run_id: created[0].1[0].id,
            attempt: 1,
        }),
        ..NewExecution::new(fixture.owner, ExecutionTrigger::SubWorkflow, definition())
    };
    created.push(start_execution(&store, child_request, &["only"], 1, None).await);
    for _ in 0..2 {
        simple_execution(&store, fixture.other_owner, &["theirs"], 1).await;
    }
    let executions: Vec<Execution> = created.into_iter().map(|(execution, _)| execution).collect();
    let t0 = now();
    for index in [1, 3] {
        let start = ExecutionChange {
            started_at: Some(t0),
            ..ExecutionChange::new(ExecutionStatus::Running, t0)
        };
        assert!(
            store
                .transition_execution(executions[index].id, &[ExecutionStatus::Queued], start)
                .await
                .expect("start")
        );
    }
    let newest_first = |indexes: &[usize]| -> Vec<Uuid> {
        indexes.iter().map(|index| executions[*index].id).collect()
    };
    let mine = OwnerScope::Owner(fixture.owner);

    // Numbered pages.
    let mut pages = Vec::new();
    for page in 1..=4 {
        let listed = store
            .list_executions(ExecutionFilter::new(mine), PageRequest::new(page, 3))
            .await
            .expect("page");
        assert_eq!(listed.total, 7);
        pages.push(ids(&listed.items));
    }
    assert_eq!(
        pages,
        [newest_first(&[6, 5, 4]), newest_first(&[3, 2, 1]), newest_first(&[0]), Vec::new()]
    );

    // Cursor pages walk the same order and stop with no cursor.
    let mut walked = Vec::new();
    let mut cursor = None;
    let mut page_count = 0;
    loop {
        let page = store
            .list_executions_by_cursor(ExecutionFilter::new(mine), cursor, 3)
            .await
            .expect("cursor page");
        page_count += 1;
        walked.extend(ids(&page.items));
        let Some(next) = page.next_cursor else { break };
        let decoded = ExecutionCursor::decode(&next).expect("cursor decodes");
        assert_eq!(decoded, ExecutionCursor::after(page.items.last().expect("a full page")));
        cursor = Some(decoded);
    }
    assert_eq!(page_count, 3);
    assert_eq!(walked, newest_first(&[6, 5, 4, 3, 2, 1, 0]));
    assert_eq!(ExecutionCursor::decode("not a cursor"), None);
    assert_eq!(ExecutionCursor::decode(""), None);

    // Each filter, and two combined.
    let list = |filter: ExecutionFilter| {
        let store = store.clone();
        async move { store.list_executions(filter, PageRequest::new(1, 100)).await.expect("list") }
    };
    let workflow_filter =
        ExecutionFilter { workflow_id: Some(fixture.workflow), ..ExecutionFilter::new(mine) };
    assert_eq!(ids(&list(workflow_filter.clone()).await.items), newest_first(&[3, 1, 0]));
    let deployment_filter =
        ExecutionFilter { deployment_id: Some(deployment), ..ExecutionFilter::new(mine) };
    assert_eq!(ids(&list(deployment_filter).await.items), newest_first(&[3, 0]));
    let running_filter =
        ExecutionFilter { status: Some(ExecutionStatus::Running), ..ExecutionFilter::new(mine) };
    let running = list(running_filter).await;
    assert_eq!((ids(&running.items), running.total), (newest_first(&[3, 1]), 2));
    let parent_filter = ExecutionFilter {
        parent_execution_id: Some(executions[0].id),
        ..ExecutionFilter::new(mine)
    };
    assert_eq!(ids(&list(parent_filter).await.items), newest_first(&[6]));
    let range_filter = ExecutionFilter {
        created_from: Some(executions[2].created_at),
        created_before: Some(executions[5].created_at),
        ..ExecutionFilter::new(mine)
    };
    assert_eq!(ids(&list(range_filter).await.items), newest_first(&[4, 3, 2]));
    let queued_of_workflow =
        ExecutionFilter { status: Some(ExecutionStatus::Queued), ..workflow_filter.clone() };
    assert_eq!(ids(&list(queued_of_workflow).await.items), newest_first(&[0]));

    // Cursor paging respects filters.
    let first_page =
        store.list_executions_by_cursor(workflow_filter.clone(), None, 2).await.expect("cursor");
    assert_eq!(ids(&first_page.items), newest_first(&[3, 1]));
    let next =
        first_page.next_cursor.as_deref().and_then(ExecutionCursor::decode).expect("next cursor");
    let last_page =
        store.list_executions_by_cursor(workflow_filter, Some(next), 2).await.expect("cursor");
    assert_eq!((ids(&last_page.items), last_page.next_cursor), (newest_first(&[0]), None));

    // Scopes.
    assert_eq!(list(ExecutionFilter::new(OwnerScope::All)).await.total, 9);
    let theirs = list(ExecutionFilter::new(OwnerScope::Owner(fixture.other_owner))).await;
    assert_eq!(theirs.total, 2);
    assert!(theirs.items.iter().all(|execution| execution.owner_id == fixture.other_owner));
}

async fn ownership_scope_and_soft_delete(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (execution, steps) = simple_execution(&store, fixture.owner, &["only"], 1).await;
    let mine = OwnerScope::Owner(fixture.owner);
    let theirs = OwnerScope::Owner(fixture.other_owner);
    assert!(matches!(store.get_execution(theirs, execution.id).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.get_execution_with_steps(theirs, execution.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.get_execution_detail(theirs, execution.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.list_step_attempts(theirs, steps[0].id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_execution(theirs, execution.id, None).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(store.get_execution(mine, Uuid::now_v7()).await, Err(StoreError::NotFound)));
    assert_eq!(
        store
            .list_executions(ExecutionFilter::new(theirs), PageRequest::default())
            .await
            .expect("list")
            .total,
        0
    );

    let stale = store.delete_execution(mine, execution.id, Some(7)).await;
    assert!(matches!(stale, Err(StoreError::VersionConflict { current_version: 1 })), "{stale:?}");
    store.delete_execution(mine, execution.id, Some(1)).await.expect("delete");
    assert!(matches!(store.get_execution(mine, execution.id).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.get_execution(OwnerScope::All, execution.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(store.list_step_attempts(mine, steps[0].id).await, Err(StoreError::NotFound)));
    assert!(matches!(
        store.list_execution_logs(mine, execution.id, ExecutionLogFilter::first(10)).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.delete_execution(mine, execution.id, None).await,
        Err(StoreError::NotFound)
    ));
    let listed = store
        .list_executions(ExecutionFilter::new(OwnerScope::All), PageRequest::default())
        .await
        .expect("list");
    assert_eq!(listed.total, 0);
    let cursor_page = store
        .list_executions_by_cursor(ExecutionFilter::new(mine), None, 10)
        .await
        .expect("cursor");
    assert!(cursor_page.items.is_empty());
    // Hidden is not stopped: the engine still drives the execution's steps.
    let queued = store.mark_step_queued(steps[0].attempt_key(), None, now()).await.expect("queue");
    assert!(queued.is_applied());
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

async fn execution_stats_on_a_known_data_set(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let second_workflow = create_workflow(&store, fixture.owner).await;
    let second_agent = create_agent(&store, fixture.owner).await;
    let idle_agent = create_agent(&store, fixture.owner).await;
    let range_start = now() - seconds(1);
    let base = now() - seconds(3600);
    let of = |workflow_id: Option<Uuid>| NewExecution {
        workflow_id,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Manual, definition())
    };
    let first_workflow = Some(fixture.workflow);
    let agent = Some(fixture.agent);

    // Workflow 1: two successes of 10 s and 20 s. Workflow 2: one success of 30 s, one failure.
    for duration in [10, 20] {
        let (execution, steps) =
            start_execution(&store, of(first_workflow), &["s"], 1, agent).await;
        drive_step(&store, &steps[0], Completion::Succeeded { output: json!(1) }, base).await;
        finish_execution(
            &store,
            execution.id,
            ExecutionStatus::Succeeded,
            base,
            base + seconds(duration),
        )
        .await;
    }
    let (success, steps) =
        start_execution(&store, of(Some(second_workflow)), &["s1", "s2"], 1, Some(second_agent))
            .await;
    drive_step(&store, &steps[0], Completion::Succeeded { output: json!(1) }, base).await;
    complete(&store, steps[1].attempt_key(), Completion::Cancelled, base).await;
    finish_execution(&store, success.id, ExecutionStatus::Succeeded, base, base + seconds(30))
        .await;
    let (failure_execution, steps) =
        start_execution(&store, of(Some(second_workflow)), &["s"], 1, agent).await;
    drive_step(&store, &steps[0], failure(false), base).await;
    finish_execution(
        &store,
        failure_execution.id,
        ExecutionStatus::Failed,
        base,
        base + seconds(5),
    )
    .await;
    // Still running, still queued, cancelled, timed out.
    let (running, steps) = start_execution(&store, of(first_workflow), &["s"], 1, agent).await;
    let key = steps[0].attempt_key();
    queue(&store, key, base).await;
    assign(&store, key, "runner", base).await;
    let start = ExecutionChange {
        started_at: Some(base),
        ..ExecutionChange::new(ExecutionStatus::Running, base)
    };
    assert!(
        store
            .transition_execution(running.id, &[ExecutionStatus::Queued], start)
            .await
            .expect("start")
    );
    start_execution(&store, of(None), &["s"], 1, Some(idle_agent)).await;
    let (cancelled, _) = start_execution(&store, of(first_workflow), &[], 1, None).await;
    finish_execution(&store, cancelled.id, ExecutionStatus::Cancelled, base, base + seconds(1))
        .await;
    let (timed_out, steps) = start_execution(&store, of(first_workflow), &["s"], 1, agent).await;
    complete(&store, steps[0].attempt_key(), Completion::TimedOut, base).await;
    finish_execution(&store, timed_out.id, ExecutionStatus::TimedOut, base, base + seconds(99))
        .await;
    // Another owner's success.
    let (theirs, _) = simple_execution(&store, fixture.other_owner, &[], 1).await;
    finish_execution(&store, theirs.id, ExecutionStatus::Succeeded, base, base + seconds(1000))
        .await;

    let range_end = now() + seconds(3600);
    let mine = OwnerScope::Owner(fixture.owner);
    let stats = store.execution_stats(mine, range_start, range_end).await.expect("stats");
    let counts = stats.status_counts;
    assert_eq!(
        (
            counts.queued,
            counts.running,
            counts.succeeded,
            counts.failed,
            counts.cancelled,
            counts.timed_out
        ),
        (1, 1, 3, 1, 1, 1)
    );
    assert_eq!(counts.total(), 8);

    let durations: Vec<(Uuid, i64)> =
        stats.workflow_durations.iter().map(|entry| (entry.workflow_id, entry.succeeded)).collect();
    assert_eq!(durations, [(fixture.workflow, 2), (second_workflow, 1)]);
    assert!(
        (stats.workflow_durations[0].average_duration_seconds - 15.0).abs() < 0.01,
        "{stats:?}"
    );
    assert!(
        (stats.workflow_durations[1].average_duration_seconds - 30.0).abs() < 0.01,
        "{stats:?}"
    );

    let agents: Vec<(Uuid, i64, i64, i64, Option<f64>)> = stats
        .agent_steps
        .iter()
        .map(|entry| {
            (entry.agent_id, entry.step_runs, entry.succeeded, entry.failed, entry.success_rate)
        })
        .collect();
    assert_eq!(
        agents,
        [
            (fixture.agent, 5, 2, 2, Some(0.5)),
            (second_agent, 2, 1, 0, Some(1.0)),
            (idle_agent, 1, 0, 0, None),
        ]
    );

    let everyone =
        store.execution_stats(OwnerScope::All, range_start, range_end).await.expect("stats");
    assert_eq!((everyone.status_counts.succeeded, everyone.status_counts.total()), (4, 9));
    let long_ago = store
        .execution_stats(mine, range_start - seconds(86_400 * 2), range_start - seconds(86_400))
        .await
        .expect("stats");
    assert_eq!(long_ago.status_counts.total(), 0);
    assert!(long_ago.workflow_durations.is_empty() && long_ago.agent_steps.is_empty());
    // Deleted executions are left out.
    store.delete_execution(mine, cancelled.id, None).await.expect("delete");
    let after_delete = store.execution_stats(mine, range_start, range_end).await.expect("stats");
    assert_eq!((after_delete.status_counts.cancelled, after_delete.status_counts.total()), (0, 7));
}

/// The batched transitions (group commit) move every row the one-row transition would, in one
/// statement, each with its own values, and leave out the rows it refuses.
async fn batched_transitions_move_each_row_or_leave_it_out(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["a", "b", "c"], 1).await;
    let t0 = now();
    let keys: Vec<AttemptKey> = steps.iter().map(StepRun::attempt_key).collect();
    let stale = AttemptKey { step_run_id: keys[2].step_run_id, attempt: 9 };

    let queued = store
        .mark_steps_queued(&[
            (keys[0], Some(json!({"for": "a"})), t0),
            (keys[1], None, t0 + seconds(1)),
            (stale, Some(json!({"for": "nobody"})), t0),
        ])
        .await
        .expect("queue");
    let mut queued_ids: Vec<Uuid> = queued.iter().map(|row| row.id).collect();
    queued_ids.sort();
    let mut expected = vec![keys[0].step_run_id, keys[1].step_run_id];
    expected.sort();
    assert_eq!(queued_ids, expected, "the stale attempt is left out");
    let a = store.get_step_run(keys[0].step_run_id).await.expect("a");
    assert_eq!((a.status, a.input), (StepRunStatus::Queued, Some(json!({"for": "a"}))));
    let b = store.get_step_run(keys[1].step_run_id).await.expect("b");
    assert_eq!((b.status, b.queued_at), (StepRunStatus::Queued, Some(t0 + seconds(1))));
    let c = store.get_step_run(keys[2].step_run_id).await.expect("c");
    assert_eq!(c.status, StepRunStatus::Pending);

    // c is not queued: its assignment is refused, the others take their own runners.
    let assigned = store
        .assign_steps(&[
            (keys[0], assignment("runner-a", t0)),
            (keys[1], assignment("runner-b", t0)),
            (keys[2], assignment("runner-c", t0)),
        ])
        .await
        .expect("assign");
    assert_eq!(assigned.len(), 2);
    for row in &assigned {
        let runner = if row.id == keys[0].step_run_id { "runner-a" } else { "runner-b" };
        assert_eq!((row.status, row.runner_id.as_deref()), (StepRunStatus::Assigned, Some(runner)));
    }

    let running = store
        .mark_steps_running(&[(keys[0], t0 + seconds(2)), (keys[2], t0 + seconds(2))])
        .await
        .expect("run");
    assert_eq!(running.len(), 1);
    assert_eq!(
        (running[0].id, running[0].status, running[0].started_at),
        (keys[0].step_run_id, StepRunStatus::Running, Some(t0 + seconds(2)))
    );
    let attempts =
        store.list_step_attempts(OwnerScope::All, keys[0].step_run_id).await.expect("attempts");
    assert_eq!(attempts[0].status, StepAttemptStatus::Running, "the attempt row follows");
}

/// The transitions that stand for two stages at once: a step handed straight to a runner
/// (PENDING -> ASSIGNED, queued at the same instant) and a result that brings the start time
/// of a start never committed on its own. Each bumps `version` once per stage it stands for,
/// the attempt row mirrors every stage, and what either refuses is left out.
async fn merged_transitions_record_every_stage(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["a", "b", "c"], 1).await;
    let t0 = now();
    let keys: Vec<AttemptKey> = steps.iter().map(StepRun::attempt_key).collect();
    let pending_version = steps[0].version;

    // c is queued already: handing it over is refused (it goes through assign_steps).
    queue(&store, keys[2], t0).await;
    let handed = store
        .queue_and_assign_steps(&[
            (keys[0], Some(json!({"for": "a"})), assignment("runner-a", t0)),
            (keys[1], None, assignment("runner-b", t0 + seconds(1))),
            (keys[2], None, assignment("runner-c", t0)),
        ])
        .await
        .expect("hand over");
    assert_eq!(handed.len(), 2, "{handed:?}");
    let a = handed.iter().find(|row| row.id == keys[0].step_run_id).expect("a handed");
    assert_eq!(
        (a.status, a.runner_id.as_deref(), a.input.clone(), a.queued_at, a.assigned_at),
        (StepRunStatus::Assigned, Some("runner-a"), Some(json!({"for": "a"})), Some(t0), Some(t0))
    );
    assert_eq!(a.version, pending_version + 2, "queued and assigned: two versions");
    let b = handed.iter().find(|row| row.id == keys[1].step_run_id).expect("b handed");
    assert_eq!((b.queued_at, b.assigned_at), (Some(t0 + seconds(1)), Some(t0 + seconds(1))));
    let attempts =
        store.list_step_attempts(OwnerScope::All, keys[0].step_run_id).await.expect("attempts");
    assert_eq!(
        (attempts[0].status, attempts[0].runner_id.as_deref(), attempts[0].queued_at),
        (StepAttemptStatus::Assigned, Some("runner-a"), Some(t0)),
        "the attempt row mirrors both stages"
    );
    assert_eq!(attempts[0].input, Some(json!({"for": "a"})));

    // a finishes straight from ASSIGNED with the start the runner reported; b's start was
    // committed on its own and is kept.
    run(&store, keys[1], t0 + seconds(2)).await;
    let b_running = store.get_step_run(keys[1].step_run_id).await.expect("b");
    let execution_id = steps[0].execution_id;
    let line = |key: AttemptKey, message: &str| NewExecutionLog {
        execution_id,
        step_run_id: Some(key.step_run_id),
        attempt: Some(key.attempt),
        level: ExecutionLogLevel::Info,
        source: ExecutionLogSource::Stdout,
        message: message.to_owned(),
        fields: None,
        created_at: t0 + seconds(3),
    };
    let stale = AttemptKey { step_run_id: keys[2].step_run_id, attempt: 7 };
    let completions = [
        FinishedAttempt {
            key: keys[0],
            completion: Completion::Succeeded { output: json!("a") },
            started_at: Some(t0 + seconds(3)),
            finished_at: t0 + seconds(4),
            logs: vec![line(keys[0], "a says hello"), line(keys[0], "a says bye")],
        },
        FinishedAttempt {
            key: keys[1],
            completion: Completion::Succeeded { output: json!("b") },
            started_at: Some(t0 + seconds(9)),
            finished_at: t0 + seconds(4),
            logs: Vec::new(),
        },
        FinishedAttempt {
            key: stale,
            completion: Completion::Succeeded { output: json!("stale") },
            started_at: None,
            finished_at: t0 + seconds(4),
            logs: vec![line(stale, "a stale attempt's line is kept")],
        },
    ];
    // A line the store refuses (it names another execution's step) fails the whole batch:
    // neither the results nor the lines are committed.
    let (_, elsewhere) = simple_execution(&store, fixture.owner, &["x"], 1).await;
    let mut refused = completions.clone();
    refused[1].logs =
        vec![NewExecutionLog { step_run_id: Some(elsewhere[0].id), ..line(keys[1], "misplaced") }];
    let refusal = store.complete_steps(&refused).await;
    assert!(matches!(refusal, Err(StoreError::ReferenceViolated(_))), "{refusal:?}");
    assert_eq!(
        store.get_step_run(keys[0].step_run_id).await.expect("a").status,
        StepRunStatus::Assigned,
        "nothing of a refused batch is committed"
    );
    let completed = store.complete_steps(&completions).await.expect("complete");
    let finished = completed.step_runs;
    assert_eq!(finished.len(), 2, "the stale attempt is left out: {finished:?}");
    let mut messages: Vec<String> =
        completed.logs.iter().map(|line| line.message.clone()).collect();
    messages.sort();
    assert_eq!(messages, ["a says bye", "a says hello", "a stale attempt's line is kept"]);
    let stored = store
        .list_execution_logs(OwnerScope::All, execution_id, ExecutionLogFilter::first(100))
        .await
        .expect("logs");
    assert_eq!(stored.items, completed.logs, "the lines are committed with the results");
    let a = finished.iter().find(|row| row.id == keys[0].step_run_id).expect("a finished");
    assert_eq!(
        (a.status, a.started_at, a.finished_at, a.output.clone()),
        (StepRunStatus::Succeeded, Some(t0 + seconds(3)), Some(t0 + seconds(4)), Some(json!("a")))
    );
    assert_eq!(a.version, pending_version + 4, "started and finished: two more versions");
    let b = finished.iter().find(|row| row.id == keys[1].step_run_id).expect("b finished");
    assert_eq!(b.started_at, Some(t0 + seconds(2)), "a committed start is kept");
    assert_eq!(b.version, b_running.version + 1);
    let attempts =
        store.list_step_attempts(OwnerScope::All, keys[0].step_run_id).await.expect("attempts");
    assert_eq!(
        (attempts[0].status, attempts[0].started_at, attempts[0].finished_at),
        (StepAttemptStatus::Succeeded, Some(t0 + seconds(3)), Some(t0 + seconds(4))),
        "the attempt row gets the start with the result"
    );
    assert!(matches!(
        store.refused_completion(keys[0]).await.expect("explain"),
        CompletionOutcome::Duplicate { status: StepRunStatus::Succeeded }
    ));

    // Only the rows asked for, by key.
    let mut by_keys: Vec<String> = store
        .list_step_runs_by_keys(a.execution_id, &["a", "c", "nope"])
        .await
        .expect("by keys")
        .into_iter()
        .map(|row| row.step_key)
        .collect();
    by_keys.sort();
    assert_eq!(by_keys, ["a", "c"]);
    let states = states_of(&store, a.execution_id, &["a", "nope"]).await;
    assert_eq!(states, [("a".to_owned(), StepRunStatus::Succeeded, false)]);

    // Several executions asked about in one read: each keeps to its own steps, and a step
    // asked about twice is there once.
    let (other, _) = simple_execution(&store, fixture.owner, &["a", "x"], 1).await;
    let wanted = [
        StepKeys { execution_id, step_keys: vec!["a".to_owned(), "b".to_owned()] },
        StepKeys { execution_id: other.id, step_keys: vec!["x".to_owned(), "b".to_owned()] },
        StepKeys { execution_id, step_keys: vec!["a".to_owned()] },
    ];
    let mut together: Vec<(Uuid, String, StepRunStatus)> = store
        .list_step_run_states_by_keys(&wanted)
        .await
        .expect("states of two executions")
        .into_iter()
        .map(|state| (state.execution_id, state.step_key, state.status))
        .collect();
    together.sort_by(|left, right| (left.0, &left.1).cmp(&(right.0, &right.1)));
    let mut expected = vec![
        (execution_id, "a".to_owned(), StepRunStatus::Succeeded),
        (execution_id, "b".to_owned(), StepRunStatus::Succeeded),
        (other.id, "x".to_owned(), StepRunStatus::Pending),
    ];
    expected.sort_by(|left, right| (left.0, &left.1).cmp(&(right.0, &right.1)));
    assert_eq!(together, expected);
    assert!(store.list_step_run_states_by_keys(&[]).await.expect("nothing asked").is_empty());
}

/// `list_step_run_states_by_keys`, sorted by key, as (key, status, waiting for a retry).
async fn states_of(
    store: &Arc<dyn Store>,
    execution_id: Uuid,
    keys: &[&str],
) -> Vec<(String, StepRunStatus, bool)> {
    let step_keys = keys.iter().map(|key| (*key).to_owned()).collect();
    let mut states: Vec<_> = store
        .list_step_run_states_by_keys(&[StepKeys { execution_id, step_keys }])
        .await
        .expect("states by keys")
        .into_iter()
        .map(|state| (state.step_key, state.status, state.waiting_for_retry))
        .collect();
    states.sort_by(|left, right| left.0.cmp(&right.0));
    states
}

/// Steps of an execution being cancelled are neither queued nor handed to a runner.
async fn no_step_of_a_cancelling_execution_is_queued(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (execution, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let t0 = now();
    let requested = store.request_cancel(OwnerScope::All, execution.id, t0).await.expect("cancel");
    assert_eq!(requested, CancelRequestOutcome::Recorded);
    let queued =
        store.mark_steps_queued(&[(steps[0].attempt_key(), None, t0)]).await.expect("queue");
    assert!(queued.is_empty(), "{queued:?}");
    let handed = store
        .queue_and_assign_steps(&[(steps[1].attempt_key(), None, assignment("runner-1", t0))])
        .await
        .expect("hand over");
    assert!(handed.is_empty(), "{handed:?}");
}

/// A success that ends the execution only when every step succeeded and no cancel was asked.
async fn finishing_when_every_step_succeeded(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let t0 = now();
    let when_done = || ExecutionChange {
        output: Some(json!("done")),
        finished_at: Some(t0),
        only_when_every_step_succeeded: true,
        ..ExecutionChange::new(ExecutionStatus::Succeeded, t0)
    };
    let finish = |execution_id| {
        let store = store.clone();
        async move {
            store
                .transition_execution(execution_id, ExecutionStatus::UNFINISHED, when_done())
                .await
                .expect("transition")
        }
    };
    let (execution, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let succeeded = || Completion::Succeeded { output: json!(1) };
    drive_step(&store, &steps[0], succeeded(), t0).await;
    assert!(!finish(execution.id).await, "b has not succeeded yet");
    drive_step(&store, &steps[1], succeeded(), t0).await;
    assert!(finish(execution.id).await, "every step succeeded");
    let finished = store.get_execution(OwnerScope::All, execution.id).await.expect("read");
    assert_eq!(
        (finished.status, finished.output),
        (ExecutionStatus::Succeeded, Some(json!("done")))
    );
    assert!(!finish(execution.id).await, "finished already");

    let (cancelled, steps) = simple_execution(&store, fixture.owner, &["a"], 1).await;
    drive_step(&store, &steps[0], succeeded(), t0).await;
    store.request_cancel(OwnerScope::All, cancelled.id, t0).await.expect("cancel");
    assert!(!finish(cancelled.id).await, "a cancel was requested");
}

/// A result and the steps it makes ready in one commit (`complete_steps_then`): a success moves
/// its next steps on (handed to a runner, or QUEUED) as the one-step transitions would, each
/// refused as they refuse it; a result that is refused or not a success moves none of them.
async fn a_result_moves_its_next_steps_in_its_own_commit(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let (_, steps) = simple_execution(&store, fixture.owner, &["a", "b", "c", "d"], 1).await;
    let t0 = now();
    let keys: Vec<AttemptKey> = steps.iter().map(StepRun::attempt_key).collect();
    queue(&store, keys[0], t0).await;
    assign(&store, keys[0], "runner-1", t0).await;
    let succeeded = |key: AttemptKey| FinishedAttempt {
        key,
        completion: Completion::Succeeded { output: json!({"from": "a"}) },
        started_at: Some(t0 + seconds(1)),
        finished_at: t0 + seconds(2),
        logs: Vec::new(),
    };
    let next = |after: AttemptKey, key: AttemptKey, runner: Option<&str>| NextStep {
        after,
        key,
        input: Some(json!({"for": key.step_run_id})),
        at: t0 + seconds(2),
        assignment: runner.map(|runner| assignment(runner, t0 + seconds(2))),
    };
    let stale_d = AttemptKey { step_run_id: keys[3].step_run_id, attempt: 5 };
    let completed = store
        .complete_steps_then(
            &[succeeded(keys[0])],
            &[
                next(keys[0], keys[1], Some("runner-b")),
                next(keys[0], keys[2], None),
                next(keys[0], stale_d, Some("runner-d")),
            ],
            &[],
        )
        .await
        .expect("complete and move on");
    assert_eq!(completed.step_runs.len(), 1);
    assert_eq!(completed.step_runs[0].status, StepRunStatus::Succeeded);
    assert_eq!(completed.next.len(), 2, "the stale attempt is left out: {:?}", completed.next);
    let b = completed.next.iter().find(|row| row.id == keys[1].step_run_id).expect("b moved");
    assert_eq!(
        (b.status, b.runner_id.as_deref(), b.queued_at, b.assigned_at, b.version),
        (
            StepRunStatus::Assigned,
            Some("runner-b"),
            Some(t0 + seconds(2)),
            Some(t0 + seconds(2)),
            steps[1].version + 2
        )
    );
    assert_eq!(b.input, Some(json!({"for": keys[1].step_run_id})));
    let c = store.get_step_run(keys[2].step_run_id).await.expect("c");
    assert_eq!(
        (c.status, c.runner_id, c.queued_at, c.version),
        (StepRunStatus::Queued, None, Some(t0 + seconds(2)), steps[2].version + 1)
    );
    assert_eq!(c.input, Some(json!({"for": keys[2].step_run_id})));
    let attempts =
        store.list_step_attempts(OwnerScope::All, keys[1].step_run_id).await.expect("attempts");
    assert_eq!(
        (attempts[0].status, attempts[0].runner_id.as_deref()),
        (StepAttemptStatus::Assigned, Some("runner-b")),
        "the attempt row follows"
    );

    // The same result again is refused: the next step it names stays where it is.
    let again = store
        .complete_steps_then(&[succeeded(keys[0])], &[next(keys[0], keys[3], None)], &[])
        .await
        .expect("complete again");
    assert!(again.step_runs.is_empty() && again.next.is_empty(), "{again:?}");
    let d = store.get_step_run(keys[3].step_run_id).await.expect("d");
    assert_eq!(d.status, StepRunStatus::Pending);

    // A failure moves nothing, nor does a next step tied to another attempt's result.
    let (_, other) = simple_execution(&store, fixture.owner, &["x", "y"], 1).await;
    let (x, y) = (other[0].attempt_key(), other[1].attempt_key());
    queue(&store, x, t0).await;
    assign(&store, x, "runner-1", t0).await;
    let failed = FinishedAttempt { completion: failure(false), ..succeeded(x) };
    let completed = store
        .complete_steps_then(
            &[failed],
            &[next(x, y, Some("runner-y")), next(keys[0], keys[3], None)],
            &[],
        )
        .await
        .expect("fail");
    assert_eq!(completed.step_runs.len(), 1);
    assert_eq!(completed.step_runs[0].status, StepRunStatus::Failed);
    assert!(completed.next.is_empty(), "{:?}", completed.next);
    for key in [y, keys[3]] {
        let row = store.get_step_run(key.step_run_id).await.expect("row");
        assert_eq!(row.status, StepRunStatus::Pending);
    }

    // A next step of an execution being cancelled is refused; the result stands.
    let (cancelling, steps) = simple_execution(&store, fixture.owner, &["p", "q"], 1).await;
    let (p, q) = (steps[0].attempt_key(), steps[1].attempt_key());
    queue(&store, p, t0).await;
    assign(&store, p, "runner-1", t0).await;
    store.request_cancel(OwnerScope::All, cancelling.id, t0).await.expect("cancel");
    let completed = store
        .complete_steps_then(&[succeeded(p)], &[next(p, q, Some("runner-q"))], &[])
        .await
        .expect("complete");
    assert_eq!(completed.step_runs.len(), 1);
    assert!(completed.next.is_empty(), "{:?}", completed.next);
}

/// The last step's success and the end of its execution in one commit (`complete_steps_then`
/// with a `FinishingExecution`): finished as `transition_execution` finishes it when every
/// step succeeded, and refused alike: not when the result is refused or not a success, not
/// while another step has not succeeded, not when a cancel was requested.
async fn the_last_result_finishes_its_execution_in_its_own_commit(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let t0 = now();
    let succeeded = |key: AttemptKey| success_of(key, json!({"n": 2}), t0);
    let finishing =
        |after: AttemptKey, execution_id: Uuid| finishing_after(after, execution_id, t0);
    let running = |key: AttemptKey| {
        let store = store.clone();
        async move {
            queue(&store, key, t0).await;
            assign(&store, key, "runner-1", t0).await;
        }
    };

    // b is not done yet: a's success finishes nothing.
    let (waiting, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let (a, b) = (steps[0].attempt_key(), steps[1].attempt_key());
    running(a).await;
    let completed = store
        .complete_steps_then(&[succeeded(a)], &[], &[finishing(a, waiting.id)])
        .await
        .expect("complete a");
    assert_eq!(completed.step_runs.len(), 1);
    assert!(completed.finished.is_empty(), "{:?}", completed.finished);
    running(b).await;
    // A failure of b finishes nothing either (the engine fails the execution its own way).
    let failed = FinishedAttempt { completion: failure(false), ..succeeded(b) };
    let completed = store
        .complete_steps_then(&[failed], &[], &[finishing(b, waiting.id)])
        .await
        .expect("fail b");
    assert_eq!(completed.step_runs[0].status, StepRunStatus::Failed);
    assert!(completed.finished.is_empty());
    let unfinished = store.get_execution(OwnerScope::All, waiting.id).await.expect("read");
    assert!(!unfinished.status.is_finished(), "{:?}", unfinished.status);

    // The last success ends its execution with the output, in the same commit.
    let (done, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let (a, b) = (steps[0].attempt_key(), steps[1].attempt_key());
    running(a).await;
    store.complete_steps_then(&[succeeded(a)], &[], &[]).await.expect("a");
    running(b).await;
    let completed = store
        .complete_steps_then(&[succeeded(b)], &[], &[finishing(b, done.id)])
        .await
        .expect("complete b");
    assert_eq!(completed.finished, vec![done.id]);
    let finished = store.get_execution(OwnerScope::All, done.id).await.expect("read");
    assert_eq!(
        (finished.status, finished.output, finished.finished_at),
        (ExecutionStatus::Succeeded, Some(json!({"n": 2})), Some(t0 + seconds(2)))
    );
    // The same result again is refused, and so is the end it names.
    let again = store
        .complete_steps_then(&[succeeded(b)], &[], &[finishing(b, done.id)])
        .await
        .expect("again");
    assert!(again.step_runs.is_empty() && again.finished.is_empty(), "{again:?}");

    // A cancel requested before the last result: the result stands, the end waits for the
    // engine to cancel the execution.
    let (cancelling, steps) = simple_execution(&store, fixture.owner, &["p"], 1).await;
    let p = steps[0].attempt_key();
    running(p).await;
    store.request_cancel(OwnerScope::All, cancelling.id, t0).await.expect("cancel");
    let completed = store
        .complete_steps_then(&[succeeded(p)], &[], &[finishing(p, cancelling.id)])
        .await
        .expect("complete p");
    assert_eq!(completed.step_runs[0].status, StepRunStatus::Succeeded);
    assert!(completed.finished.is_empty());
}

/// Results that share one `complete_steps_then` see each other as a commit after them would:
/// two last steps that succeed together end their execution (each counts the other as
/// succeeded), one of them failing ends nothing, and a step a verdict of the same batch finished
/// (a timeout of a PENDING step) is not moved on by a next step naming it.
async fn results_of_one_batch_count_each_other(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let t0 = now();
    let succeeded = |key: AttemptKey| success_of(key, json!({"k": key.step_run_id}), t0);
    let finishing =
        |after: AttemptKey, execution_id: Uuid| finishing_after(after, execution_id, t0);
    let running = |keys: Vec<AttemptKey>| {
        let store = store.clone();
        async move {
            for key in keys {
                queue(&store, key, t0).await;
                assign(&store, key, "runner-1", t0).await;
            }
        }
    };

    // a and b, the last two, succeed together: the execution ends.
    let (both, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let (a, b) = (steps[0].attempt_key(), steps[1].attempt_key());
    running(vec![a, b]).await;
    let completed = store
        .complete_steps_then(&[succeeded(a), succeeded(b)], &[], &[finishing(b, both.id)])
        .await
        .expect("complete a and b");
    assert_eq!(completed.step_runs.len(), 2);
    assert_eq!(completed.finished, vec![both.id]);
    let finished = store.get_execution(OwnerScope::All, both.id).await.expect("read");
    assert_eq!(finished.status, ExecutionStatus::Succeeded);

    // a fails while b succeeds: nothing ends.
    let (failing, steps) = simple_execution(&store, fixture.owner, &["a", "b"], 1).await;
    let (a, b) = (steps[0].attempt_key(), steps[1].attempt_key());
    running(vec![a, b]).await;
    let failed = FinishedAttempt { completion: failure(false), ..succeeded(a) };
    let completed = store
        .complete_steps_then(&[failed, succeeded(b)], &[], &[finishing(b, failing.id)])
        .await
        .expect("fail a, complete b");
    assert_eq!(completed.step_runs.len(), 2);
    assert!(completed.finished.is_empty(), "{:?}", completed.finished);
    let unfinished = store.get_execution(OwnerScope::All, failing.id).await.expect("read");
    assert!(!unfinished.status.is_finished(), "{:?}", unfinished.status);

    // c times out while PENDING in the batch whose other result names it as a next step: it
    // stays TIMED_OUT, and the result stands.
    let (timing_out, steps) = simple_execution(&store, fixture.owner, &["x", "c"], 1).await;
    let (x, c) = (steps[0].attempt_key(), steps[1].attempt_key());
    running(vec![x]).await;
    let timed_out = FinishedAttempt {
        key: c,
        completion: Completion::TimedOut,
        started_at: None,
        finished_at: t0 + seconds(2),
        logs: Vec::new(),
    };
    let next = NextStep {
        after: x,
        key: c,
        input: None,
        at: t0 + seconds(2),
        assignment: Some(assignment("runner-c", t0 + seconds(2))),
    };
    let completed = store
        .complete_steps_then(&[succeeded(x), timed_out], &[next], &[])
        .await
        .expect("complete x, time c out");
    assert_eq!(completed.step_runs.len(), 2);
    assert!(completed.next.is_empty(), "{:?}", completed.next);
    let row = store.get_step_run(c.step_run_id).await.expect("c");
    assert_eq!((row.status, row.runner_id), (StepRunStatus::TimedOut, None));
    assert_eq!(row.version, steps[1].version + 1, "one transition, counted once");
    let execution = store.get_execution(OwnerScope::All, timing_out.id).await.expect("read");
    assert!(!execution.status.is_finished());
}

/// An execution created `running` starts RUNNING (started at its creation, its version
/// counting that start), with the step runs given a `start` QUEUED or ASSIGNED at that time
/// with their input, runner and lease, their versions counting each stage; the others PENDING.
/// The rows come back in the order given, and read back the same.
async fn an_execution_created_running_starts_its_first_steps(store: Arc<dyn Store>) {
    let fixture = fixture(&store).await;
    let lease = now() + seconds(30);
    let started = |runner: Option<&str>| StepStart {
        input: Some(json!({"for": runner})),
        runner_id: runner.map(str::to_owned),
        lease_expires_at: runner.map(|_| lease),
    };
    let new_execution = NewExecution {
        running: true,
        ..NewExecution::new(fixture.owner, ExecutionTrigger::Manual, definition())
    };
    let steps = vec![
        NewStepRun { start: Some(started(Some("runner-a"))), ..NewStepRun::new("a", 2) },
        NewStepRun::new("later", 1),
        NewStepRun { start: Some(started(None)), ..NewStepRun::new("b", 1) },
    ];
    let ids: Vec<Uuid> = steps.iter().map(|step| step.id).collect();
    let (execution, step_runs) =
        store.create_execution(new_execution, steps).await.expect("create execution");
    assert_eq!((execution.status, execution.version), (ExecutionStatus::Running, 2));
    assert_eq!(execution.started_at, Some(execution.created_at));
    let created_at = execution.created_at;
    let read_ids: Vec<Uuid> = step_runs.iter().map(|step_run| step_run.id).collect();
    assert_eq!(read_ids, ids, "the ids given, in the order given");

    let (a, later, b) = (&step_runs[0], &step_runs[1], &step_runs[2]);
    assert_eq!((a.status, a.version, a.attempt), (StepRunStatus::Assigned, 3, 1));
    assert_eq!(a.runner_id.as_deref(), Some("runner-a"));
    assert_eq!(a.lease_expires_at, Some(lease));
    assert_eq!((a.queued_at, a.assigned_at), (Some(created_at), Some(created_at)));
    assert_eq!(a.input, Some(json!({"for": "runner-a"})));
    assert_eq!((b.status, b.version), (StepRunStatus::Queued, 2));
    assert_eq!(
        (b.queued_at, b.assigned_at, b.runner_id.as_deref()),
        (Some(created_at), None, None)
    );
    assert_eq!(b.input, Some(json!({"for": null})));
    assert_eq!((later.status, later.version, later.queued_at), (StepRunStatus::Pending, 1, None));

    let (read, read_steps) = store
        .get_execution_with_steps(OwnerScope::Owner(fixture.owner), execution.id)
        .await
        .expect("read back");
    assert_eq!((read, read_steps), (execution, step_runs.clone()));
    // The assigned one moves on from there like any other: its runner's result is taken.
    let completed = store
        .complete_steps(&[FinishedAttempt {
            key: a.attempt_key(),
            completion: Completion::Succeeded { output: json!({"done": true}) },
            started_at: Some(created_at + seconds(1)),
            finished_at: created_at + seconds(2),
            logs: Vec::new(),
        }])
        .await
        .expect("complete a");
    assert_eq!(completed.step_runs.len(), 1, "{completed:?}");
    assert_eq!(completed.step_runs[0].status, StepRunStatus::Succeeded);
}

crate::conformance!(
    a_result_moves_its_next_steps_in_its_own_commit,
    an_execution_created_running_starts_its_first_steps,
    the_last_result_finishes_its_execution_in_its_own_commit,
    results_of_one_batch_count_each_other,
    execution_and_step_runs_are_created_atomically,
    finishing_when_every_step_succeeded,
    merged_transitions_record_every_stage,
    no_step_of_a_cancelling_execution_is_queued,
    step_transitions_in_order,
    stale_and_duplicate_completions_are_ignored,
    concurrent_double_assignment_has_one_winner,
    batched_transitions_move_each_row_or_leave_it_out,
    retry_scheduling_creates_attempt_rows,
    lease_loss_is_counted_apart_from_retries,
    cancel_pending_steps_reports_in_flight_work,
    ready_step_runs_by_priority_and_backoff,
    expired_leases_oldest_first,
    child_executions_start_with_their_parent_step,
    execution_transitions_cancel_requests_and_deadlines,
    logs_batch_insert_and_cursor_paging,
    list_executions_filters_pages_and_cursors,
    ownership_scope_and_soft_delete,
    execution_stats_on_a_known_data_set,
);
