//! Conformance: resources (agents and their versions, workflows and their steps, templates,
//! deployments and their events). Every test runs against PostgreSQL and SQLite.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use turbocat::store::{
    Agent, AgentChanges, AgentFilter, AgentLimits, AgentSortField, AgentStatus, AgentType,
    BuiltinTemplate, BuiltinTemplateOutcome, CronRunClaim, Deployment, DeploymentChanges,
    DeploymentEnvironment, DeploymentEventKind, DeploymentFilter, DeploymentSortField,
    DeploymentStatus, DeploymentTarget, DeploymentTrigger, DeploymentTriggerType, ExecutionFilter,
    ExecutionTrigger, NewAgent, NewDeployment, NewDeploymentEvent, NewExecution, NewTemplate,
    NewUser, NewWorkflow, NewWorkflowStep, OwnerScope, PageRequest, ParentStep, RetryPolicy,
    SortOrder, Store, StoreError, Template, TemplateChanges, TemplateFilter, TemplateKind,
    TemplateSortField, Workflow, WorkflowChanges, WorkflowFilter, WorkflowSortField, WorkflowStep,
};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn create_owner(store: &Arc<dyn Store>, label: &str) -> Uuid {
    let email = format!("{label}-{}@example.com", Uuid::now_v7().simple());
    store.create_user(NewUser::new(email, label)).await.expect("create owner").id
}

fn new_agent(owner_id: Uuid, name: &str) -> NewAgent {
    NewAgent {
        owner_id,
        name: name.to_owned(),
        description: format!("{name} description"),
        agent_type: AgentType::Code,
        config: json!({ "language": "python", "source": "print(1)" }),
        limits: AgentLimits::default(),
        tags: vec![],
    }
}

fn new_step(step_key: &str, agent_id: Uuid, depends_on: &[&str]) -> NewWorkflowStep {
    NewWorkflowStep {
        step_key: step_key.to_owned(),
        name: format!("Step {step_key}"),
        agent_id,
        depends_on: depends_on.iter().map(|key| (*key).to_owned()).collect(),
        input_mapping: None,
        retry_policy: RetryPolicy::default(),
        timeout_seconds: None,
        required_labels: vec![],
    }
}

fn new_workflow(owner_id: Uuid, name: &str, steps: Vec<NewWorkflowStep>) -> NewWorkflow {
    NewWorkflow {
        owner_id,
        name: name.to_owned(),
        description: format!("{name} description"),
        default_input: json!({}),
        priority: 5,
        timeout_seconds: None,
        tags: vec![],
        steps,
    }
}

fn new_template(owner_id: Uuid, name: &str, is_public: bool) -> NewTemplate {
    NewTemplate {
        owner_id,
        name: name.to_owned(),
        description: format!("{name} description"),
        category: "general".to_owned(),
        tags: vec![],
        is_public,
        kind: TemplateKind::Agent,
        body: json!({ "agentType": "LLM", "config": { "prompt": "{{question}}" } }),
        parameters: vec![json!({ "name": "question", "type": "string", "required": true })],
    }
}

fn new_deployment(owner_id: Uuid, name: &str, target: DeploymentTarget) -> NewDeployment {
    NewDeployment {
        owner_id,
        name: name.to_owned(),
        description: format!("{name} description"),
        target,
        environment: DeploymentEnvironment::Development,
        config: json!({ "input": { "region": "eu" } }),
        trigger: DeploymentTrigger::Manual,
    }
}

fn cron_trigger(expression: &str) -> DeploymentTrigger {
    DeploymentTrigger::Cron {
        expression: expression.to_owned(),
        timezone: "Europe/Paris".to_owned(),
    }
}

fn event(kind: DeploymentEventKind, message: &str) -> NewDeploymentEvent {
    NewDeploymentEvent { kind, message: message.to_owned(), actor_id: None }
}

fn page(page: u32, page_size: u32) -> PageRequest {
    PageRequest::new(page, page_size)
}

fn all_rows() -> PageRequest {
    PageRequest::new(1, PageRequest::MAX_PAGE_SIZE)
}

/// The ids of `rows` as a list query must return them: by `key`, then id, both in `descending`
/// order or both ascending.
fn expected_order<T, K: Ord>(
    rows: &[T],
    key: impl Fn(&T) -> K,
    id: impl Fn(&T) -> Uuid,
    descending: bool,
) -> Vec<Uuid> {
    let mut keyed: Vec<(K, Uuid)> = rows.iter().map(|row| (key(row), id(row))).collect();
    keyed.sort();
    if descending {
        keyed.reverse();
    }
    keyed.into_iter().map(|(_, id)| id).collect()
}

fn agent_ids(agents: &[Agent]) -> Vec<Uuid> {
    agents.iter().map(|agent| agent.id).collect()
}

fn workflow_ids(workflows: &[Workflow]) -> Vec<Uuid> {
    workflows.iter().map(|workflow| workflow.id).collect()
}

fn template_ids(templates: &[Template]) -> Vec<Uuid> {
    templates.iter().map(|template| template.id).collect()
}

fn deployment_ids(deployments: &[Deployment]) -> Vec<Uuid> {
    deployments.iter().map(|deployment| deployment.id).collect()
}

fn step_keys(steps: &[WorkflowStep]) -> Vec<&str> {
    steps.iter().map(|step| step.step_key.as_str()).collect()
}

fn is_not_found<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::NotFound))
}

fn conflict_version<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> Option<i64> {
    match result {
        Err(StoreError::VersionConflict { current_version }) => Some(*current_version),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

async fn agent_crud_with_version_history(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let stranger = create_owner(&store, "stranger").await;
    let mut fields = new_agent(owner, "Summariser");
    fields.agent_type = AgentType::Llm;
    fields.tags = vec!["nlp".to_owned()];
    fields.limits = AgentLimits {
        timeout_seconds: 30,
        memory_mb: 256,
        cpu_seconds: 20,
        max_output_bytes: 65_536,
    };
    let created = store.create_agent(fields).await.expect("create agent");
    assert_eq!(created.version, 1);
    assert_eq!(created.status, AgentStatus::Idle);
    assert_eq!(created.agent_type, AgentType::Llm);
    assert_eq!(created.limits.memory_mb, 256);
    assert_eq!(created.tags, vec!["nlp".to_owned()]);
    assert_eq!(created.deleted_at, None);
    assert_eq!(created.created_at, created.updated_at);

    // Get: by the owner and an administrator, never by another owner.
    let fetched = store.get_agent(OwnerScope::Owner(owner), created.id).await.expect("get");
    assert_eq!(fetched, created);
    assert_eq!(store.get_agent(OwnerScope::All, created.id).await.expect("admin get"), created);
    assert!(is_not_found(&store.get_agent(OwnerScope::Owner(stranger), created.id).await));
    assert!(is_not_found(&store.get_agent(OwnerScope::All, Uuid::now_v7()).await));

    // Version 1 is written with the agent.
    let history = store
        .list_agent_versions(OwnerScope::Owner(owner), created.id, all_rows())
        .await
        .expect("history");
    assert_eq!(history.total, 1);
    assert_eq!(history.items[0].version, 1);
    assert_eq!(history.items[0].changed_by, Some(owner));
    assert_eq!(history.items[0].snapshot["name"], json!("Summariser"));
    assert_eq!(history.items[0].snapshot["limits"]["memory_mb"], json!(256));
    assert!(history.items[0].changed_fields.contains(&"config".to_owned()));

    // Update: only the fields that really change are recorded.
    let changes = AgentChanges {
        name: Some("Summariser v2".to_owned()),
        description: Some(created.description.clone()),
        tags: Some(vec!["nlp".to_owned(), "prod".to_owned()]),
        ..AgentChanges::default()
    };
    let updated = store
        .update_agent(OwnerScope::Owner(owner), created.id, 1, changes, owner)
        .await
        .expect("update");
    assert_eq!(updated.version, 2);
    assert_eq!(updated.name, "Summariser v2");
    assert_eq!(updated.description, created.description);
    assert_eq!(updated.config, created.config);
    assert!(updated.updated_at > created.updated_at);
    assert_eq!(updated.created_at, created.created_at);
    assert_eq!(store.get_agent(OwnerScope::Owner(owner), created.id).await.expect("get"), updated);

    let history = store
        .list_agent_versions(OwnerScope::Owner(owner), created.id, all_rows())
        .await
        .expect("history");
    assert_eq!(history.total, 2);
    assert_eq!(history.items.iter().map(|row| row.version).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(history.items[0].changed_fields, vec!["name".to_owned(), "tags".to_owned()]);
    assert_eq!(history.items[0].snapshot["name"], json!("Summariser v2"));
    assert_eq!(history.items[0].snapshot["version"], json!(2));
    assert_eq!(history.items[0].snapshot["tags"], json!(["nlp", "prod"]));
    assert_eq!(history.items[1].snapshot["name"], json!("Summariser"));

    // History pages: newest first, page 2 holds version 1.
    let second_page = store
        .list_agent_versions(OwnerScope::Owner(owner), created.id, page(2, 1))
        .await
        .expect("history page 2");
    assert_eq!(second_page.total, 2);
    assert_eq!(second_page.items.len(), 1);
    assert_eq!(second_page.items[0].version, 1);
    assert!(is_not_found(
        &store.list_agent_versions(OwnerScope::Owner(stranger), created.id, all_rows()).await
    ));

    // A stale version is a conflict naming the current version; nothing is written.
    let stale = store
        .update_agent(
            OwnerScope::Owner(owner),
            created.id,
            1,
            AgentChanges { name: Some("Lost update".to_owned()), ..AgentChanges::default() },
            owner,
        )
        .await;
    assert_eq!(conflict_version(&stale), Some(2), "{stale:?}");
    let rename = AgentChanges { name: Some("Hijacked".to_owned()), ..AgentChanges::default() };
    let foreign = store.update_agent(OwnerScope::Owner(stranger), created.id, 2, rename, stranger);
    assert!(is_not_found(&foreign.await));
    assert_eq!(
        store.get_agent(OwnerScope::All, created.id).await.expect("get").name,
        "Summariser v2"
    );

    // An update that changes nothing writes nothing.
    let same = AgentChanges { name: Some("Summariser v2".to_owned()), ..AgentChanges::default() };
    let unchanged = store
        .update_agent(OwnerScope::Owner(owner), created.id, 2, same, owner)
        .await
        .expect("no-op update");
    assert_eq!(unchanged, updated);

    // Status is engine bookkeeping: no version bump, but updated_at moves.
    let running = store
        .set_agent_status(OwnerScope::All, created.id, AgentStatus::Running)
        .await
        .expect("status");
    assert_eq!(running.status, AgentStatus::Running);
    assert_eq!(running.version, 2);
    assert!(running.updated_at > updated.updated_at);
    let status_result =
        store.set_agent_status(OwnerScope::Owner(stranger), created.id, AgentStatus::Paused).await;
    assert!(is_not_found(&status_result));

    // Soft delete: version-checked, then gone everywhere.
    let stale_delete = store.soft_delete_agent(OwnerScope::Owner(owner), created.id, Some(1)).await;
    assert_eq!(conflict_version(&stale_delete), Some(2));
    let foreign_delete = store.soft_delete_agent(OwnerScope::Owner(stranger), created.id, None);
    assert!(is_not_found(&foreign_delete.await));
    store.soft_delete_agent(OwnerScope::Owner(owner), created.id, Some(2)).await.expect("delete");
    assert!(is_not_found(&store.get_agent(OwnerScope::All, created.id).await));
    let listed = store.list_agents(AgentFilter::new(OwnerScope::All)).await.expect("list");
    assert_eq!(listed.total, 0);
    assert!(listed.items.is_empty());
    let after_delete =
        store.update_agent(OwnerScope::All, created.id, 3, AgentChanges::default(), owner);
    assert!(is_not_found(&after_delete.await));
    assert!(is_not_found(&store.soft_delete_agent(OwnerScope::All, created.id, None).await));
}

async fn agent_duplicate_is_independent_with_fresh_history(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let colleague = create_owner(&store, "colleague").await;
    let mut fields = new_agent(owner, "Scraper");
    fields.agent_type = AgentType::Api;
    fields.tags = vec!["web".to_owned()];
    let original = store.create_agent(fields).await.expect("create");
    let original = store
        .update_agent(
            OwnerScope::Owner(owner),
            original.id,
            1,
            AgentChanges {
                config: Some(json!({ "url": "https://example.com" })),
                ..Default::default()
            },
            owner,
        )
        .await
        .expect("update original");
    assert_eq!(original.version, 2);

    let copy = store
        .duplicate_agent(
            OwnerScope::Owner(owner),
            original.id,
            colleague,
            "Scraper (copy)".to_owned(),
        )
        .await
        .expect("duplicate");
    assert_ne!(copy.id, original.id);
    assert_eq!(copy.owner_id, colleague);
    assert_eq!(copy.name, "Scraper (copy)");
    assert_eq!(copy.version, 1);
    assert_eq!(copy.status, AgentStatus::Idle);
    assert_eq!(copy.agent_type, AgentType::Api);
    assert_eq!(copy.config, json!({ "url": "https://example.com" }));
    assert_eq!(copy.tags, original.tags);
    let copy_history = store
        .list_agent_versions(OwnerScope::Owner(colleague), copy.id, all_rows())
        .await
        .expect("copy history");
    assert_eq!(copy_history.total, 1);
    assert_eq!(copy_history.items[0].changed_by, Some(colleague));
    assert_eq!(copy_history.items[0].snapshot["id"], json!(copy.id));

    // Independent: changing the original leaves the copy alone, and the copy belongs to its
    // new owner only.
    store
        .update_agent(
            OwnerScope::Owner(owner),
            original.id,
            2,
            AgentChanges { name: Some("Scraper renamed".to_owned()), ..Default::default() },
            owner,
        )
        .await
        .expect("update original again");
    let copy_now = store.get_agent(OwnerScope::Owner(colleague), copy.id).await.expect("get copy");
    assert_eq!(copy_now, copy);
    assert!(is_not_found(&store.get_agent(OwnerScope::Owner(owner), copy.id).await));
    store
        .soft_delete_agent(OwnerScope::Owner(colleague), copy.id, None)
        .await
        .expect("delete copy");
    assert!(store.get_agent(OwnerScope::Owner(owner), original.id).await.is_ok());

    // Only agents in the caller's scope can be duplicated.
    let foreign = store
        .duplicate_agent(OwnerScope::Owner(colleague), original.id, colleague, "Stolen".to_owned())
        .await;
    assert!(is_not_found(&foreign));
}

async fn agent_delete_refused_while_a_live_workflow_uses_it(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let used = store.create_agent(new_agent(owner, "Used")).await.expect("agent");
    let spare = store.create_agent(new_agent(owner, "Spare")).await.expect("agent");
    let beta = store
        .create_workflow(new_workflow(owner, "Beta", vec![new_step("only", used.id, &[])]))
        .await
        .expect("beta");
    let alpha = store
        .create_workflow(new_workflow(
            owner,
            "Alpha",
            vec![new_step("first", used.id, &[]), new_step("second", used.id, &["first"])],
        ))
        .await
        .expect("alpha");
    let expected_users =
        vec![(alpha.workflow.id, "Alpha".to_owned()), (beta.workflow.id, "Beta".to_owned())];
    assert_eq!(store.workflows_using_agent(used.id).await.expect("users"), expected_users);
    assert!(store.workflows_using_agent(spare.id).await.expect("users").is_empty());

    let refused = store.soft_delete_agent(OwnerScope::Owner(owner), used.id, Some(1)).await;
    match refused {
        Err(StoreError::InUse { by }) => assert_eq!(by, expected_users),
        other => panic!("expected InUse, got {other:?}"),
    }
    // Refusal changes nothing.
    let still_there = store.get_agent(OwnerScope::Owner(owner), used.id).await.expect("get");
    assert_eq!(still_there, used);

    // A deleted workflow no longer counts.
    store
        .soft_delete_workflow(OwnerScope::Owner(owner), alpha.workflow.id, None)
        .await
        .expect("delete");
    let refused_again = store.soft_delete_agent(OwnerScope::Owner(owner), used.id, None).await;
    match refused_again {
        Err(StoreError::InUse { by }) => {
            assert_eq!(by, vec![(beta.workflow.id, "Beta".to_owned())])
        }
        other => panic!("expected InUse, got {other:?}"),
    }
    // Moving the live workflow to another agent frees it.
    store
        .update_workflow(
            OwnerScope::Owner(owner),
            beta.workflow.id,
            1,
            WorkflowChanges {
                steps: Some(vec![new_step("only", spare.id, &[])]),
                ..Default::default()
            },
        )
        .await
        .expect("repoint beta");
    assert!(store.workflows_using_agent(used.id).await.expect("users").is_empty());
    store
        .soft_delete_agent(OwnerScope::Owner(owner), used.id, Some(1))
        .await
        .expect("delete agent");
    assert!(is_not_found(&store.get_agent(OwnerScope::All, used.id).await));

    // A deleted agent cannot be used by a new or updated workflow.
    let with_deleted = store
        .create_workflow(new_workflow(owner, "Gamma", vec![new_step("a", used.id, &[])]))
        .await;
    assert!(
        matches!(with_deleted, Err(StoreError::ReferenceViolated(ref field)) if field == "agent_id"),
        "{with_deleted:?}"
    );
    let with_missing = store
        .create_workflow(new_workflow(owner, "Delta", vec![new_step("a", Uuid::now_v7(), &[])]))
        .await;
    assert!(matches!(with_missing, Err(StoreError::ReferenceViolated(_))), "{with_missing:?}");
    let total =
        store.list_workflows(WorkflowFilter::new(OwnerScope::All)).await.expect("list").total;
    assert_eq!(total, 1, "failed creations leave no workflow behind");
}

async fn agent_list_pages_filters_sorts_and_searches(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let other = create_owner(&store, "other").await;
    let specs = [
        ("100% pure", AgentType::Code, vec!["gpu"]),
        ("under_score", AgentType::Api, vec!["web"]),
        ("underXscore", AgentType::Llm, vec!["gpu", "web"]),
        ("Plain", AgentType::Data, vec![]),
        ("another", AgentType::Code, vec!["gp"]),
    ];
    let mut created = Vec::new();
    for (name, agent_type, tags) in specs {
        let mut fields = new_agent(owner, name);
        fields.agent_type = agent_type;
        fields.tags = tags.into_iter().map(str::to_owned).collect();
        created.push(store.create_agent(fields).await.expect("create"));
    }
    store.create_agent(new_agent(other, "Foreign pure")).await.expect("foreign");
    // Give updated_at an order different from created_at.
    created[1] = store
        .update_agent(
            OwnerScope::Owner(owner),
            created[1].id,
            1,
            AgentChanges { description: Some("touched".to_owned()), ..Default::default() },
            owner,
        )
        .await
        .expect("touch");
    created[0] = store
        .set_agent_status(OwnerScope::All, created[0].id, AgentStatus::Paused)
        .await
        .expect("s");
    created[3] = store
        .set_agent_status(OwnerScope::All, created[3].id, AgentStatus::Stopped)
        .await
        .expect("s");
    let scope = OwnerScope::Owner(owner);

    // Pagination: totals, page 2, the last (partial) page and past the end.
    let mut filter = AgentFilter::new(scope);
    filter.page = page(1, 2);
    let first = store.list_agents(filter.clone()).await.expect("page 1");
    assert_eq!(first.total, 5);
    assert_eq!(first.items.len(), 2);
    filter.page = page(2, 2);
    let second = store.list_agents(filter.clone()).await.expect("page 2");
    assert_eq!(second.total, 5);
    assert_eq!(second.items.len(), 2);
    filter.page = page(3, 2);
    let last = store.list_agents(filter.clone()).await.expect("page 3");
    assert_eq!(last.items.len(), 1);
    filter.page = page(4, 2);
    let beyond = store.list_agents(filter.clone()).await.expect("page 4");
    assert_eq!((beyond.total, beyond.items.len()), (5, 0));
    let mut paged_ids = agent_ids(&first.items);
    paged_ids.extend(agent_ids(&second.items));
    paged_ids.extend(agent_ids(&last.items));
    // Default order: most recently updated first.
    assert_eq!(
        paged_ids,
        expected_order(&created, |agent| agent.updated_at, |agent| agent.id, true)
    );
    let everyone = store.list_agents(AgentFilter::new(OwnerScope::All)).await.expect("all");
    assert_eq!(everyone.total, 6);

    // Filters.
    let mut by_type = AgentFilter::new(scope);
    by_type.agent_type = Some(AgentType::Code);
    let listed = store.list_agents(by_type).await.expect("by type");
    assert_eq!(listed.total, 2);
    assert!(listed.items.iter().all(|agent| agent.agent_type == AgentType::Code));
    let mut by_status = AgentFilter::new(scope);
    by_status.status = Some(AgentStatus::Paused);
    let listed = store.list_agents(by_status).await.expect("by status");
    assert_eq!(agent_ids(&listed.items), vec![created[0].id]);
    let mut by_tag = AgentFilter::new(scope);
    by_tag.tag = Some("gpu".to_owned());
    by_tag.sort = Some(SortOrder { field: AgentSortField::Name, descending: false });
    let listed = store.list_agents(by_tag).await.expect("by tag");
    assert_eq!(
        agent_ids(&listed.items),
        vec![created[0].id, created[2].id],
        "exact tag, not prefix"
    );
    let mut combined = AgentFilter::new(scope);
    combined.tag = Some("web".to_owned());
    combined.agent_type = Some(AgentType::Llm);
    assert_eq!(store.list_agents(combined).await.expect("combined").total, 1);

    // Search: case-insensitive, on name and description, wildcards taken literally.
    let search = |text: &str| {
        let mut filter = AgentFilter::new(scope);
        filter.search = Some(text.to_owned());
        filter.sort = Some(SortOrder { field: AgentSortField::Name, descending: false });
        filter
    };
    let percent = store.list_agents(search("%")).await.expect("search %");
    assert_eq!(agent_ids(&percent.items), vec![created[0].id]);
    let underscore = store.list_agents(search("r_s")).await.expect("search _");
    assert_eq!(agent_ids(&underscore.items), vec![created[1].id]);
    let insensitive = store.list_agents(search("PURE")).await.expect("search case");
    assert_eq!(insensitive.total, 1, "the other owner's 'Foreign pure' stays out of scope");
    let in_description = store.list_agents(search("TOUCHED")).await.expect("search description");
    assert_eq!(agent_ids(&in_description.items), vec![created[1].id]);
    assert_eq!(store.list_agents(search("nothing like it")).await.expect("search").total, 0);

    // Every sort field, both directions, id as the tie-breaker.
    for descending in [false, true] {
        let sorted = |field: AgentSortField| {
            let mut filter = AgentFilter::new(scope);
            filter.sort = Some(SortOrder { field, descending });
            filter
        };
        let by_name = store.list_agents(sorted(AgentSortField::Name)).await.expect("name");
        let expected = expected_order(&created, |a| a.name.to_lowercase(), |a| a.id, descending);
        assert_eq!(agent_ids(&by_name.items), expected, "name descending={descending}");
        let by_created = store.list_agents(sorted(AgentSortField::CreatedAt)).await.expect("c");
        let expected = expected_order(&created, |a| a.created_at, |a| a.id, descending);
        assert_eq!(agent_ids(&by_created.items), expected, "created_at descending={descending}");
        let by_updated = store.list_agents(sorted(AgentSortField::UpdatedAt)).await.expect("u");
        let expected = expected_order(&created, |a| a.updated_at, |a| a.id, descending);
        assert_eq!(agent_ids(&by_updated.items), expected, "updated_at descending={descending}");
        let by_type = store.list_agents(sorted(AgentSortField::AgentType)).await.expect("type");
        let expected = expected_order(&created, |a| a.agent_type.as_str(), |a| a.id, descending);
        assert_eq!(agent_ids(&by_type.items), expected, "agent_type descending={descending}");
        let by_status = store.list_agents(sorted(AgentSortField::Status)).await.expect("status");
        let expected = expected_order(&created, |a| a.status.as_str(), |a| a.id, descending);
        assert_eq!(agent_ids(&by_status.items), expected, "status descending={descending}");
    }
}

// ---------------------------------------------------------------------------------------------
// Workflows
// ---------------------------------------------------------------------------------------------

async fn workflow_crud_with_atomic_step_replacement(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let stranger = create_owner(&store, "stranger").await;
    let fetcher = store.create_agent(new_agent(owner, "Fetcher")).await.expect("agent");
    let parser = store.create_agent(new_agent(owner, "Parser")).await.expect("agent");
    let mut fetch = new_step("fetch", fetcher.id, &[]);
    fetch.retry_policy = RetryPolicy {
        max_attempts: 5,
        initial_backoff_ms: 250,
        max_backoff_ms: 8_000,
        multiplier: 1.5,
    };
    fetch.timeout_seconds = Some(45);
    fetch.required_labels = vec!["gpu".to_owned(), "region=eu".to_owned()];
    let mut parse = new_step("parse", parser.id, &["fetch"]);
    parse.input_mapping = Some(json!({ "html": "$.steps.fetch.output.body" }));
    let report = new_step("report", parser.id, &["parse", "fetch"]);
    let mut fields = new_workflow(owner, "Nightly scrape", vec![fetch, parse, report]);
    fields.priority = 8;
    fields.timeout_seconds = Some(3_600);
    fields.tags = vec!["nightly".to_owned()];
    fields.default_input = json!({ "url": "https://example.com" });
    let created = store.create_workflow(fields).await.expect("create workflow");
    let workflow = &created.workflow;
    assert_eq!(workflow.version, 1);
    assert_eq!(workflow.priority, 8);
    assert_eq!(workflow.timeout_seconds, Some(3_600));
    assert_eq!(workflow.step_count, 3);
    assert_eq!(workflow.default_input, json!({ "url": "https://example.com" }));
    assert_eq!(step_keys(&created.steps), vec!["fetch", "parse", "report"]);
    assert_eq!(created.steps.iter().map(|step| step.position).collect::<Vec<_>>(), vec![0, 1, 2]);
    let fetch_step = &created.steps[0];
    assert_eq!(fetch_step.retry_policy.max_attempts, 5);
    assert_eq!(fetch_step.retry_policy.multiplier, 1.5);
    assert_eq!(fetch_step.timeout_seconds, Some(45));
    assert_eq!(fetch_step.required_labels, vec!["gpu".to_owned(), "region=eu".to_owned()]);
    assert_eq!(fetch_step.input_mapping, None);
    assert_eq!(
        created.steps[1].input_mapping,
        Some(json!({ "html": "$.steps.fetch.output.body" }))
    );
    assert_eq!(created.steps[2].depends_on, vec!["parse".to_owned(), "fetch".to_owned()]);
    assert!(created.steps.iter().all(|step| step.workflow_id == workflow.id));

    let fetched = store.get_workflow(OwnerScope::Owner(owner), workflow.id).await.expect("get");
    assert_eq!(fetched, created);
    assert!(is_not_found(&store.get_workflow(OwnerScope::Owner(stranger), workflow.id).await));

    // Replace the steps: order follows the new list, a surviving key keeps its id, removed
    // keys are gone, new keys appear; the workflow version moves once.
    let mut new_parse = new_step("parse", fetcher.id, &[]);
    new_parse.name = "Parse again".to_owned();
    let summarise = new_step("summarise", parser.id, &["parse"]);
    let replaced = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            1,
            WorkflowChanges {
                name: Some("Nightly scrape v2".to_owned()),
                steps: Some(vec![summarise, new_parse]),
                ..Default::default()
            },
        )
        .await
        .expect("replace steps");
    assert_eq!(replaced.workflow.version, 2);
    assert_eq!(replaced.workflow.name, "Nightly scrape v2");
    assert_eq!(replaced.workflow.step_count, 2);
    assert_eq!(replaced.workflow.priority, 8, "fields not in the change keep their value");
    assert_eq!(step_keys(&replaced.steps), vec!["summarise", "parse"]);
    assert_eq!(replaced.steps.iter().map(|step| step.position).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(replaced.steps[1].id, created.steps[1].id, "a surviving key keeps its id");
    assert_eq!(replaced.steps[1].name, "Parse again");
    assert_eq!(replaced.steps[1].agent_id, fetcher.id);
    assert_eq!(replaced.steps[1].input_mapping, None);
    assert_eq!(
        store.get_workflow(OwnerScope::All, workflow.id).await.expect("get after replace"),
        replaced
    );

    // Stale version: conflict, nothing written.
    let stale = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            1,
            WorkflowChanges { steps: Some(vec![]), ..Default::default() },
        )
        .await;
    assert_eq!(conflict_version(&stale), Some(2));

    // A failing step list rolls the whole update back (name and steps unchanged).
    let duplicate_keys = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            2,
            WorkflowChanges {
                name: Some("Broken".to_owned()),
                steps: Some(vec![new_step("x", fetcher.id, &[]), new_step("x", parser.id, &[])]),
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(duplicate_keys, Err(StoreError::AlreadyExists(ref what)) if what == "step_key"),
        "{duplicate_keys:?}"
    );
    let missing_agent = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            2,
            WorkflowChanges {
                name: Some("Broken".to_owned()),
                steps: Some(vec![new_step("x", Uuid::now_v7(), &[])]),
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(missing_agent, Err(StoreError::ReferenceViolated(_))), "{missing_agent:?}");
    assert_eq!(store.get_workflow(OwnerScope::All, workflow.id).await.expect("get"), replaced);

    // Fields only: steps stay as they are; clearing the timeout works.
    let retimed = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            2,
            WorkflowChanges {
                timeout_seconds: Some(None),
                priority: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("update fields");
    assert_eq!(retimed.workflow.version, 3);
    assert_eq!(retimed.workflow.timeout_seconds, None);
    assert_eq!(retimed.workflow.priority, 1);
    assert_eq!(retimed.steps, replaced.steps);
    let foreign = store.update_workflow(
        OwnerScope::Owner(stranger),
        workflow.id,
        3,
        WorkflowChanges { priority: Some(2), ..Default::default() },
    );
    assert!(is_not_found(&foreign.await));
    let out_of_range = store
        .update_workflow(
            OwnerScope::Owner(owner),
            workflow.id,
            3,
            WorkflowChanges { priority: Some(11), ..Default::default() },
        )
        .await;
    assert!(out_of_range.is_err(), "priority is CHECKed to 1..=10");

    // Soft delete.
    let stale_delete = store.soft_delete_workflow(OwnerScope::Owner(owner), workflow.id, Some(2));
    assert_eq!(conflict_version(&stale_delete.await), Some(3));
    let foreign_delete = store.soft_delete_workflow(OwnerScope::Owner(stranger), workflow.id, None);
    assert!(is_not_found(&foreign_delete.await));
    store
        .soft_delete_workflow(OwnerScope::Owner(owner), workflow.id, Some(3))
        .await
        .expect("delete");
    assert!(is_not_found(&store.get_workflow(OwnerScope::All, workflow.id).await));
    let listed = store.list_workflows(WorkflowFilter::new(OwnerScope::Owner(owner))).await;
    assert_eq!(listed.expect("list").total, 0);
    let after = store.update_workflow(OwnerScope::All, workflow.id, 4, WorkflowChanges::default());
    assert!(is_not_found(&after.await));

    // A workflow without steps reads back with none.
    let empty = store.create_workflow(new_workflow(owner, "Empty", Vec::new())).await;
    let empty = empty.expect("create a workflow without steps");
    let fetched = store.get_workflow(OwnerScope::Owner(owner), empty.workflow.id).await;
    let fetched = fetched.expect("get a workflow without steps");
    assert_eq!((fetched.workflow.step_count, fetched.steps.len()), (0, 0));
    assert_eq!(fetched, empty);
}

/// What an execution is made from: the workflow and its steps as `get_workflow` reads them,
/// with each agent the steps use once, in the order of the first step using it.
async fn workflow_to_run_reads_each_agent_once(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let stranger = create_owner(&store, "stranger").await;
    let fetcher = store.create_agent(new_agent(owner, "Fetcher")).await.expect("agent");
    let parser = store.create_agent(new_agent(owner, "Parser")).await.expect("agent");
    let mut limited = new_agent(owner, "Limited");
    limited.agent_type = AgentType::Data;
    limited.config = json!({ "jqProgram": ".a" });
    limited.limits =
        AgentLimits { timeout_seconds: 7, memory_mb: 64, cpu_seconds: 3, max_output_bytes: 4_096 };
    limited.tags = vec!["etl".to_owned()];
    let limited = store.create_agent(limited).await.expect("agent");
    let unused = store.create_agent(new_agent(owner, "Unused")).await.expect("agent");
    let steps = vec![
        new_step("parse", parser.id, &[]),
        new_step("fetch", fetcher.id, &["parse"]),
        new_step("reparse", parser.id, &["fetch"]),
        new_step("trim", limited.id, &["reparse"]),
        new_step("refetch", fetcher.id, &["trim"]),
    ];
    let created = store.create_workflow(new_workflow(owner, "Pipeline", steps)).await;
    let created = created.expect("workflow");
    let workflow_id = created.workflow.id;

    let to_run = store.get_workflow_to_run(OwnerScope::Owner(owner), workflow_id).await;
    let to_run = to_run.expect("the workflow to run");
    assert_eq!(to_run.workflow, created);
    assert_eq!(
        to_run.workflow,
        store.get_workflow(OwnerScope::All, workflow_id).await.expect("get")
    );
    let read_alone = [
        store.get_agent(OwnerScope::All, parser.id).await.expect("parser"),
        store.get_agent(OwnerScope::All, fetcher.id).await.expect("fetcher"),
        store.get_agent(OwnerScope::All, limited.id).await.expect("limited"),
    ];
    assert_eq!(to_run.agents, read_alone, "each agent once, as it reads alone");
    assert!(!agent_ids(&to_run.agents).contains(&unused.id));

    // It reads the agents as they are now.
    let renamed = store
        .update_agent(
            OwnerScope::Owner(owner),
            limited.id,
            limited.version,
            AgentChanges { name: Some("Limited v2".to_owned()), ..Default::default() },
            owner,
        )
        .await
        .expect("rename");
    let to_run = store.get_workflow_to_run(OwnerScope::All, workflow_id).await.expect("again");
    assert_eq!(to_run.agents[2], renamed);

    // Scope, deletion and a workflow without steps.
    let foreign = store.get_workflow_to_run(OwnerScope::Owner(stranger), workflow_id).await;
    assert!(is_not_found(&foreign));
    assert!(is_not_found(&store.get_workflow_to_run(OwnerScope::All, Uuid::now_v7()).await));
    let empty = store.create_workflow(new_workflow(owner, "Empty", Vec::new())).await;
    let empty = empty.expect("a workflow without steps");
    let empty_to_run = store.get_workflow_to_run(OwnerScope::Owner(owner), empty.workflow.id).await;
    let empty_to_run = empty_to_run.expect("read a workflow without steps");
    assert_eq!((empty_to_run.workflow, empty_to_run.agents), (empty, Vec::new()));
    store.soft_delete_workflow(OwnerScope::Owner(owner), workflow_id, None).await.expect("delete");
    assert!(is_not_found(&store.get_workflow_to_run(OwnerScope::All, workflow_id).await));
}

async fn workflow_list_pages_filters_sorts_and_searches(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let other = create_owner(&store, "other").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let specs = [
        ("Ingest 50%", 3, vec!["etl"], 1),
        ("ingest_raw", 9, vec!["etl", "raw"], 2),
        ("ingestXraw", 5, vec![], 0),
        ("Zeta", 1, vec!["etl"], 3),
    ];
    let mut created = Vec::new();
    for (name, priority, tags, step_count) in specs {
        let steps =
            (0..step_count).map(|index| new_step(&format!("s{index}"), agent.id, &[])).collect();
        let mut fields = new_workflow(owner, name, steps);
        fields.priority = priority;
        fields.tags = tags.into_iter().map(str::to_owned).collect();
        created.push(store.create_workflow(fields).await.expect("create").workflow);
    }
    store.create_workflow(new_workflow(other, "Foreign", vec![])).await.expect("foreign");
    created[0] = store
        .update_workflow(
            OwnerScope::Owner(owner),
            created[0].id,
            1,
            WorkflowChanges { description: Some("touched later".to_owned()), ..Default::default() },
        )
        .await
        .expect("touch")
        .workflow;
    let scope = OwnerScope::Owner(owner);

    let mut filter = WorkflowFilter::new(scope);
    filter.page = page(1, 3);
    let first = store.list_workflows(filter.clone()).await.expect("page 1");
    assert_eq!((first.total, first.items.len()), (4, 3));
    filter.page = page(2, 3);
    let last = store.list_workflows(filter.clone()).await.expect("page 2");
    assert_eq!((last.total, last.items.len()), (4, 1));
    let mut paged = workflow_ids(&first.items);
    paged.extend(workflow_ids(&last.items));
    assert_eq!(paged, expected_order(&created, |w| w.updated_at, |w| w.id, true));
    let listed_counts: Vec<i64> = first.items.iter().map(|w| w.step_count).collect();
    let expected_counts: Vec<i64> = first
        .items
        .iter()
        .map(|w| created.iter().find(|c| c.id == w.id).map(|c| c.step_count).unwrap_or(-1))
        .collect();
    assert_eq!(listed_counts, expected_counts, "the list carries step counts");
    assert_eq!(
        store.list_workflows(WorkflowFilter::new(OwnerScope::All)).await.expect("all").total,
        5
    );

    let mut by_tag = WorkflowFilter::new(scope);
    by_tag.tag = Some("etl".to_owned());
    by_tag.sort = Some(SortOrder { field: WorkflowSortField::Priority, descending: false });
    let tagged = store.list_workflows(by_tag).await.expect("tag");
    assert_eq!(workflow_ids(&tagged.items), vec![created[3].id, created[0].id, created[1].id]);

    let search = |text: &str| {
        let mut filter = WorkflowFilter::new(scope);
        filter.search = Some(text.to_owned());
        filter
    };
    let percent = store.list_workflows(search("50%")).await.expect("search %");
    assert_eq!(workflow_ids(&percent.items), vec![created[0].id]);
    let underscore = store.list_workflows(search("t_r")).await.expect("search _");
    assert_eq!(workflow_ids(&underscore.items), vec![created[1].id]);
    let description = store.list_workflows(search("TOUCHED")).await.expect("search description");
    assert_eq!(workflow_ids(&description.items), vec![created[0].id]);

    for descending in [false, true] {
        let sorted = |field: WorkflowSortField| {
            let mut filter = WorkflowFilter::new(scope);
            filter.sort = Some(SortOrder { field, descending });
            filter
        };
        let by_name = store.list_workflows(sorted(WorkflowSortField::Name)).await.expect("n");
        let expected = expected_order(&created, |w| w.name.to_lowercase(), |w| w.id, descending);
        assert_eq!(workflow_ids(&by_name.items), expected, "name descending={descending}");
        let by_created =
            store.list_workflows(sorted(WorkflowSortField::CreatedAt)).await.expect("c");
        let expected = expected_order(&created, |w| w.created_at, |w| w.id, descending);
        assert_eq!(workflow_ids(&by_created.items), expected, "created_at descending={descending}");
        let by_updated =
            store.list_workflows(sorted(WorkflowSortField::UpdatedAt)).await.expect("u");
        let expected = expected_order(&created, |w| w.updated_at, |w| w.id, descending);
        assert_eq!(workflow_ids(&by_updated.items), expected, "updated_at descending={descending}");
        let by_priority =
            store.list_workflows(sorted(WorkflowSortField::Priority)).await.expect("p");
        let expected = expected_order(&created, |w| w.priority, |w| w.id, descending);
        assert_eq!(workflow_ids(&by_priority.items), expected, "priority descending={descending}");
    }
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

async fn template_crud_and_visibility(store: Arc<dyn Store>) {
    let author = create_owner(&store, "author").await;
    let reader = create_owner(&store, "reader").await;
    let private = store.create_template(new_template(author, "Private", false)).await.expect("t");
    let public = store.create_template(new_template(author, "Public", true)).await.expect("t");
    let own = store.create_template(new_template(reader, "Reader's own", false)).await.expect("t");
    let builtin_id = Uuid::now_v7();
    let builtin = BuiltinTemplate {
        id: builtin_id,
        name: "Starter: HTTP fetch".to_owned(),
        description: "Fetch a URL".to_owned(),
        category: "starter".to_owned(),
        tags: vec!["http".to_owned()],
        kind: TemplateKind::Workflow,
        body: json!({ "steps": [{ "key": "fetch" }] }),
        parameters: vec![json!({ "name": "url", "type": "string" })],
    };
    let outcome = store.upsert_builtin_template(builtin.clone()).await.expect("install");
    assert_eq!(outcome, BuiltinTemplateOutcome::Inserted);
    assert_eq!(private.version, 1);
    assert_eq!(private.owner_id, Some(author));
    assert_eq!(
        private.parameters,
        vec![json!({ "name": "question", "type": "string", "required": true })]
    );

    // Visibility: own, public and built-in; never another user's private template.
    let installed =
        store.get_template(OwnerScope::Owner(reader), builtin_id).await.expect("builtin");
    assert_eq!(installed.owner_id, None);
    assert_eq!(installed.kind, TemplateKind::Workflow);
    assert_eq!(installed.body, builtin.body);
    assert_eq!(
        store.get_template(OwnerScope::Owner(reader), public.id).await.expect("public"),
        public
    );
    assert!(is_not_found(&store.get_template(OwnerScope::Owner(reader), private.id).await));
    assert_eq!(
        store.get_template(OwnerScope::Owner(author), private.id).await.expect("own"),
        private
    );
    assert!(store.get_template(OwnerScope::All, private.id).await.is_ok());

    let mut visible = TemplateFilter::new(OwnerScope::Owner(reader));
    visible.sort = Some(SortOrder { field: TemplateSortField::Name, descending: false });
    let listed = store.list_templates(visible.clone()).await.expect("list");
    assert_eq!(listed.total, 3);
    assert_eq!(template_ids(&listed.items), vec![public.id, own.id, builtin_id]);
    visible.mine_only = true;
    let mine = store.list_templates(visible).await.expect("mine");
    assert_eq!(template_ids(&mine.items), vec![own.id]);
    let everything = store.list_templates(TemplateFilter::new(OwnerScope::All)).await.expect("all");
    assert_eq!(everything.total, 4);

    // Only the owner (or an administrator) writes; a visible template is not a writable one.
    let rename = TemplateChanges { name: Some("Mine now".to_owned()), ..Default::default() };
    let foreign = store.update_template(OwnerScope::Owner(reader), public.id, 1, rename.clone());
    assert!(is_not_found(&foreign.await));
    let foreign_builtin =
        store.update_template(OwnerScope::Owner(reader), builtin_id, 1, rename.clone()).await;
    assert!(is_not_found(&foreign_builtin));
    let foreign_delete = store.soft_delete_template(OwnerScope::Owner(reader), public.id, None);
    assert!(is_not_found(&foreign_delete.await));

    let hidden = store
        .update_template(
            OwnerScope::Owner(author),
            public.id,
            1,
            TemplateChanges {
                is_public: Some(false),
                tags: Some(vec!["x".to_owned()]),
                ..Default::default()
            },
        )
        .await
        .expect("author update");
    assert_eq!(hidden.version, 2);
    assert!(!hidden.is_public);
    assert_eq!(hidden.tags, vec!["x".to_owned()]);
    assert!(is_not_found(&store.get_template(OwnerScope::Owner(reader), public.id).await));
    let stale =
        store.update_template(OwnerScope::Owner(author), public.id, 1, rename.clone()).await;
    assert_eq!(conflict_version(&stale), Some(2));

    // Built-ins: an administrator may edit them; re-installing is idempotent and never
    // resurrects a deleted one.
    assert_eq!(
        store.upsert_builtin_template(builtin.clone()).await.expect("again"),
        BuiltinTemplateOutcome::Unchanged
    );
    let mut revised = builtin.clone();
    revised.description = "Fetch a URL, politely".to_owned();
    assert_eq!(
        store.upsert_builtin_template(revised.clone()).await.expect("revise"),
        BuiltinTemplateOutcome::Updated
    );
    let refreshed = store.get_template(OwnerScope::Owner(reader), builtin_id).await.expect("get");
    assert_eq!((refreshed.version, refreshed.description.as_str()), (2, "Fetch a URL, politely"));
    let admin_edit =
        store.update_template(OwnerScope::All, builtin_id, 2, rename).await.expect("admin");
    assert_eq!(admin_edit.version, 3);
    store.soft_delete_template(OwnerScope::All, builtin_id, Some(3)).await.expect("admin delete");
    assert_eq!(
        store.upsert_builtin_template(revised).await.expect("after delete"),
        BuiltinTemplateOutcome::KeptDeleted
    );
    assert!(is_not_found(&store.get_template(OwnerScope::All, builtin_id).await));
    let mut clash = builtin.clone();
    clash.id = own.id;
    assert!(matches!(
        store.upsert_builtin_template(clash).await,
        Err(StoreError::AlreadyExists(_))
    ));

    // Soft delete by the owner.
    let stale_delete = store.soft_delete_template(OwnerScope::Owner(author), public.id, Some(1));
    assert_eq!(conflict_version(&stale_delete.await), Some(2));
    store
        .soft_delete_template(OwnerScope::Owner(author), public.id, Some(2))
        .await
        .expect("delete");
    assert!(is_not_found(&store.get_template(OwnerScope::Owner(author), public.id).await));
    let remaining = store.list_templates(TemplateFilter::new(OwnerScope::All)).await.expect("list");
    assert_eq!(template_ids(&remaining.items).len(), 2);
    assert!(!template_ids(&remaining.items).contains(&public.id));
}

async fn template_list_pages_filters_sorts_and_searches(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let specs = [
        ("Alpha 10%", "ops", TemplateKind::Agent, vec!["a"]),
        ("beta_one", "ops", TemplateKind::Workflow, vec!["a", "b"]),
        ("betaXone", "data", TemplateKind::Workflow, vec![]),
        ("Gamma", "data", TemplateKind::Agent, vec!["b"]),
        ("delta", "ml", TemplateKind::Agent, vec![]),
    ];
    let mut created = Vec::new();
    for (name, category, kind, tags) in specs {
        let mut fields = new_template(owner, name, false);
        fields.category = category.to_owned();
        fields.kind = kind;
        fields.tags = tags.into_iter().map(str::to_owned).collect();
        created.push(store.create_template(fields).await.expect("create"));
    }
    created[2] = store
        .update_template(
            OwnerScope::Owner(owner),
            created[2].id,
            1,
            TemplateChanges { description: Some("edited".to_owned()), ..Default::default() },
        )
        .await
        .expect("touch");
    let viewer = OwnerScope::Owner(owner);

    let mut filter = TemplateFilter::new(viewer);
    filter.page = page(2, 2);
    let second = store.list_templates(filter.clone()).await.expect("page 2");
    assert_eq!((second.total, second.items.len()), (5, 2));
    filter.page = page(3, 2);
    let last = store.list_templates(filter).await.expect("page 3");
    assert_eq!((last.total, last.items.len()), (5, 1));
    let newest_first = expected_order(&created, |t| t.updated_at, |t| t.id, true);
    assert_eq!(template_ids(&second.items), newest_first[2..4].to_vec());
    assert_eq!(template_ids(&last.items), newest_first[4..].to_vec());

    let filtered = |configure: &dyn Fn(&mut TemplateFilter)| {
        let mut filter = TemplateFilter::new(viewer);
        filter.sort = Some(SortOrder { field: TemplateSortField::CreatedAt, descending: false });
        configure(&mut filter);
        filter
    };
    let ops = store.list_templates(filtered(&|f| f.category = Some("ops".to_owned()))).await;
    assert_eq!(template_ids(&ops.expect("category").items), vec![created[0].id, created[1].id]);
    let workflows =
        store.list_templates(filtered(&|f| f.kind = Some(TemplateKind::Workflow))).await;
    assert_eq!(template_ids(&workflows.expect("kind").items), vec![created[1].id, created[2].id]);
    let tagged = store.list_templates(filtered(&|f| f.tag = Some("b".to_owned()))).await;
    assert_eq!(template_ids(&tagged.expect("tag").items), vec![created[1].id, created[3].id]);
    let percent = store.list_templates(filtered(&|f| f.search = Some("10%".to_owned()))).await;
    assert_eq!(template_ids(&percent.expect("search %").items), vec![created[0].id]);
    let underscore = store.list_templates(filtered(&|f| f.search = Some("A_O".to_owned()))).await;
    assert_eq!(template_ids(&underscore.expect("search _").items), vec![created[1].id]);
    let described = store.list_templates(filtered(&|f| f.search = Some("EDITED".to_owned()))).await;
    assert_eq!(template_ids(&described.expect("search description").items), vec![created[2].id]);

    for descending in [false, true] {
        let sorted = |field: TemplateSortField| {
            let mut filter = TemplateFilter::new(viewer);
            filter.sort = Some(SortOrder { field, descending });
            filter
        };
        let by_name = store.list_templates(sorted(TemplateSortField::Name)).await.expect("n");
        let expected = expected_order(&created, |t| t.name.to_lowercase(), |t| t.id, descending);
        assert_eq!(template_ids(&by_name.items), expected, "name descending={descending}");
        let by_created =
            store.list_templates(sorted(TemplateSortField::CreatedAt)).await.expect("c");
        let expected = expected_order(&created, |t| t.created_at, |t| t.id, descending);
        assert_eq!(template_ids(&by_created.items), expected, "created_at descending={descending}");
        let by_updated =
            store.list_templates(sorted(TemplateSortField::UpdatedAt)).await.expect("u");
        let expected = expected_order(&created, |t| t.updated_at, |t| t.id, descending);
        assert_eq!(template_ids(&by_updated.items), expected, "updated_at descending={descending}");
    }
}

// ---------------------------------------------------------------------------------------------
// Deployments
// ---------------------------------------------------------------------------------------------

async fn deployment_crud_with_events(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let stranger = create_owner(&store, "stranger").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let workflow = store
        .create_workflow(new_workflow(owner, "Pipeline", vec![new_step("a", agent.id, &[])]))
        .await
        .expect("workflow")
        .workflow;
    let mut fields = new_deployment(owner, "Nightly", DeploymentTarget::Workflow(workflow.id));
    fields.trigger = cron_trigger("0 0 3 * * *");
    fields.environment = DeploymentEnvironment::Production;
    let created = store.create_deployment(fields).await.expect("create");
    assert_eq!(created.version, 1);
    assert_eq!(created.status, DeploymentStatus::Stopped);
    assert_eq!(created.target, DeploymentTarget::Workflow(workflow.id));
    assert_eq!(created.trigger, cron_trigger("0 0 3 * * *"));
    assert_eq!(created.config, json!({ "input": { "region": "eu" } }));
    assert_eq!((created.next_run_at, created.last_triggered_at), (None, None));

    assert_eq!(
        store.get_deployment(OwnerScope::Owner(owner), created.id).await.expect("get"),
        created
    );
    assert_eq!(store.get_deployment_unscoped(created.id).await.expect("unscoped"), created);
    assert!(is_not_found(&store.get_deployment(OwnerScope::Owner(stranger), created.id).await));

    // The trigger changes to a webhook: next_run_at is cleared, an UPDATED event is written.
    store
        .set_next_run(created.id, Some(Utc::now() + Duration::hours(1)), None)
        .await
        .expect("next");
    let webhook = DeploymentTrigger::Webhook { secret: "s3cr3t".to_owned() };
    assert!(!format!("{webhook:?}").contains("s3cr3t"), "Debug redacts the webhook secret");
    let updated = store
        .update_deployment(
            OwnerScope::Owner(owner),
            created.id,
            1,
            DeploymentChanges {
                trigger: Some(webhook.clone()),
                target: Some(DeploymentTarget::Agent(agent.id)),
                ..Default::default()
            },
            Some(owner),
        )
        .await
        .expect("update");
    assert_eq!(updated.version, 2);
    assert_eq!(updated.trigger, webhook);
    assert_eq!(updated.target, DeploymentTarget::Agent(agent.id));
    assert_eq!(updated.next_run_at, None);
    assert_eq!(updated.environment, DeploymentEnvironment::Production);
    let stale = store
        .update_deployment(
            OwnerScope::Owner(owner),
            created.id,
            1,
            DeploymentChanges { name: Some("Late".to_owned()), ..Default::default() },
            Some(owner),
        )
        .await;
    assert_eq!(conflict_version(&stale), Some(2));
    let foreign = store.update_deployment(
        OwnerScope::Owner(stranger),
        created.id,
        2,
        DeploymentChanges { name: Some("Mine".to_owned()), ..Default::default() },
        Some(stranger),
    );
    assert!(is_not_found(&foreign.await));

    // A status change appends its event atomically and does not bump the version.
    let started = store
        .set_deployment_status(
            OwnerScope::Owner(owner),
            created.id,
            DeploymentStatus::Running,
            NewDeploymentEvent {
                kind: DeploymentEventKind::Started,
                message: "started by owner".to_owned(),
                actor_id: Some(owner),
            },
        )
        .await
        .expect("start");
    assert_eq!((started.status, started.version), (DeploymentStatus::Running, 2));
    let foreign_status = store
        .set_deployment_status(
            OwnerScope::Owner(stranger),
            created.id,
            DeploymentStatus::Stopped,
            event(DeploymentEventKind::Stopped, "no"),
        )
        .await;
    assert!(is_not_found(&foreign_status));
    let triggered = store
        .append_deployment_event(created.id, event(DeploymentEventKind::Triggered, "webhook call"))
        .await
        .expect("append");
    assert_eq!((triggered.kind, triggered.actor_id), (DeploymentEventKind::Triggered, None));

    let history = store
        .list_deployment_events(OwnerScope::Owner(owner), created.id, all_rows())
        .await
        .expect("events");
    assert_eq!(history.total, 4);
    let kinds: Vec<DeploymentEventKind> = history.items.iter().map(|item| item.kind).collect();
    assert_eq!(
        kinds,
        vec![
            DeploymentEventKind::Triggered,
            DeploymentEventKind::Started,
            DeploymentEventKind::Updated,
            DeploymentEventKind::Created,
        ]
    );
    assert_eq!(history.items[1].actor_id, Some(owner));
    assert_eq!(history.items[1].message, "started by owner");
    assert!(history.items[2].message.contains("trigger"));
    let older = store
        .list_deployment_events(OwnerScope::Owner(owner), created.id, page(2, 3))
        .await
        .expect("events page 2");
    assert_eq!((older.total, older.items.len()), (4, 1));
    assert_eq!(older.items[0].kind, DeploymentEventKind::Created);
    assert!(is_not_found(
        &store.list_deployment_events(OwnerScope::Owner(stranger), created.id, all_rows()).await
    ));

    // Soft delete.
    let stale_delete = store.soft_delete_deployment(OwnerScope::Owner(owner), created.id, Some(1));
    assert_eq!(conflict_version(&stale_delete.await), Some(2));
    store
        .soft_delete_deployment(OwnerScope::Owner(owner), created.id, Some(2))
        .await
        .expect("delete");
    assert!(is_not_found(&store.get_deployment(OwnerScope::All, created.id).await));
    assert!(is_not_found(&store.get_deployment_unscoped(created.id).await));
    let listed =
        store.list_deployments(DeploymentFilter::new(OwnerScope::All)).await.expect("list");
    assert_eq!(listed.total, 0);
    let late_event =
        store.append_deployment_event(created.id, event(DeploymentEventKind::Failed, "x")).await;
    assert!(is_not_found(&late_event));
    assert!(is_not_found(&store.set_next_run(created.id, None, None).await));
}

async fn deployment_targets_exactly_one_live_resource(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let workflow = store
        .create_workflow(new_workflow(owner, "Pipeline", vec![new_step("a", agent.id, &[])]))
        .await
        .expect("workflow")
        .workflow;
    let on_agent = store
        .create_deployment(new_deployment(owner, "On agent", DeploymentTarget::Agent(agent.id)))
        .await
        .expect("agent deployment");
    assert_eq!(on_agent.target.agent_id(), Some(agent.id));
    assert_eq!(on_agent.target.workflow_id(), None);
    let on_workflow = store
        .create_deployment(new_deployment(
            owner,
            "On workflow",
            DeploymentTarget::Workflow(workflow.id),
        ))
        .await
        .expect("workflow deployment");
    assert_eq!(on_workflow.target.workflow_id(), Some(workflow.id));
    assert_eq!(on_workflow.target.agent_id(), None);

    // Missing or deleted targets are refused, naming the field, and nothing is created.
    let missing = store
        .create_deployment(new_deployment(
            owner,
            "Nowhere",
            DeploymentTarget::Agent(Uuid::now_v7()),
        ))
        .await;
    assert!(
        matches!(missing, Err(StoreError::ReferenceViolated(ref f)) if f == "agent_id"),
        "{missing:?}"
    );
    store.soft_delete_workflow(OwnerScope::Owner(owner), workflow.id, None).await.expect("delete");
    let deleted_target = store
        .create_deployment(new_deployment(owner, "Ghost", DeploymentTarget::Workflow(workflow.id)))
        .await;
    assert!(
        matches!(deleted_target, Err(StoreError::ReferenceViolated(ref f)) if f == "workflow_id"),
        "{deleted_target:?}"
    );
    let retarget = store
        .update_deployment(
            OwnerScope::Owner(owner),
            on_agent.id,
            1,
            DeploymentChanges {
                target: Some(DeploymentTarget::Workflow(workflow.id)),
                ..Default::default()
            },
            None,
        )
        .await;
    assert!(matches!(retarget, Err(StoreError::ReferenceViolated(_))), "{retarget:?}");
    let listed =
        store.list_deployments(DeploymentFilter::new(OwnerScope::All)).await.expect("list");
    assert_eq!(listed.total, 2);
    let unchanged = store.get_deployment(OwnerScope::All, on_agent.id).await.expect("get");
    assert_eq!(unchanged, on_agent);
}

async fn deployment_cron_due_query_and_claims(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let now = Utc::now();
    let past = now - Duration::minutes(5);
    let long_past = now - Duration::hours(2);
    let future = now + Duration::minutes(5);
    let target = DeploymentTarget::Agent(agent.id);

    async fn deploy(
        store: &Arc<dyn Store>,
        owner: Uuid,
        name: &str,
        trigger: DeploymentTrigger,
        running: bool,
        next_run_at: Option<DateTime<Utc>>,
        target: DeploymentTarget,
    ) -> Deployment {
        let mut fields = new_deployment(owner, name, target);
        fields.trigger = trigger;
        let created = store.create_deployment(fields).await.expect("create");
        if running {
            let started = event(DeploymentEventKind::Started, "start");
            store
                .set_deployment_status(
                    OwnerScope::All,
                    created.id,
                    DeploymentStatus::Running,
                    started,
                )
                .await
                .expect("start");
        }
        store.set_next_run(created.id, next_run_at, None).await.expect("schedule");
        store.get_deployment_unscoped(created.id).await.expect("get")
    }

    let due_late =
        deploy(&store, owner, "due late", cron_trigger("a"), true, Some(long_past), target).await;
    let due = deploy(&store, owner, "due", cron_trigger("b"), true, Some(past), target).await;
    let later = deploy(&store, owner, "later", cron_trigger("c"), true, Some(future), target).await;
    let stopped =
        deploy(&store, owner, "stopped", cron_trigger("d"), false, Some(past), target).await;
    let unscheduled =
        deploy(&store, owner, "unscheduled", cron_trigger("e"), true, None, target).await;
    let manual =
        deploy(&store, owner, "manual", DeploymentTrigger::Manual, true, None, target).await;
    let deleted =
        deploy(&store, owner, "deleted", cron_trigger("f"), true, Some(past), target).await;
    store.soft_delete_deployment(OwnerScope::All, deleted.id, None).await.expect("delete");
    assert_eq!(due.next_run_at.map(|at| at.timestamp_micros()), Some(past.timestamp_micros()));
    assert_eq!(manual.trigger.trigger_type(), DeploymentTriggerType::Manual);

    let due_now = store.list_due_cron_deployments(now, 10).await.expect("due");
    assert_eq!(
        deployment_ids(&due_now),
        vec![due_late.id, due.id],
        "earliest first, others excluded"
    );
    let limited = store.list_due_cron_deployments(now, 1).await.expect("due limited");
    assert_eq!(deployment_ids(&limited), vec![due_late.id]);
    let much_later = store.list_due_cron_deployments(future, 10).await.expect("due later");
    assert_eq!(deployment_ids(&much_later), vec![due_late.id, due.id, later.id]);
    assert!(!deployment_ids(&much_later).contains(&stopped.id));
    assert!(!deployment_ids(&much_later).contains(&unscheduled.id));

    // Claims: exactly one claimant wins a tick, in the transaction that creates its execution.
    let due_at = due.next_run_at.expect("scheduled");
    let claim = CronRunClaim {
        deployment_id: due.id,
        due_at,
        next_run_at: Some(future + Duration::hours(1)),
        triggered_at: now,
    };
    let fire = |claim: CronRunClaim| {
        let store = store.clone();
        async move {
            let new_execution = NewExecution {
                deployment_id: Some(claim.deployment_id),
                cron_claim: Some(claim),
                ..NewExecution::new(owner, ExecutionTrigger::Cron, json!({}))
            };
            store.create_execution(new_execution, Vec::new()).await
        }
    };
    let executions_of = |deployment_id: Uuid| {
        let store = store.clone();
        async move {
            let filter = ExecutionFilter {
                deployment_id: Some(deployment_id),
                ..ExecutionFilter::new(OwnerScope::All)
            };
            store.list_executions(filter, PageRequest::new(1, 100)).await.expect("list").total
        }
    };
    // A claim whose execution cannot be made is not taken either: the tick stays due.
    let unmakeable = NewExecution {
        parent: Some(ParentStep {
            execution_id: Uuid::now_v7(),
            step_run_id: Uuid::now_v7(),
            attempt: 1,
        }),
        cron_claim: Some(claim),
        ..NewExecution::new(owner, ExecutionTrigger::Cron, json!({}))
    };
    let refused = store.create_execution(unmakeable, Vec::new()).await;
    assert!(matches!(refused, Err(StoreError::ReferenceViolated(_))), "{refused:?}");
    let still_due = store.get_deployment_unscoped(due.id).await.expect("get");
    assert_eq!(
        still_due.next_run_at.map(|at| at.timestamp_micros()),
        Some(due_at.timestamp_micros())
    );
    fire(claim).await.expect("first claim");
    assert!(matches!(fire(claim).await, Err(StoreError::ClaimTaken)), "second claim");
    assert_eq!(executions_of(due.id).await, 1, "a lost claim creates no execution");
    let claimed = store.get_deployment_unscoped(due.id).await.expect("get");
    assert_eq!(
        claimed.next_run_at.map(|at| at.timestamp_micros()),
        claim.next_run_at.map(|at| at.timestamp_micros())
    );
    assert_eq!(
        claimed.last_triggered_at.map(|at| at.timestamp_micros()),
        Some(now.timestamp_micros())
    );
    assert_eq!(claimed.version, due.version, "scheduler bookkeeping does not bump the version");
    let stopped_claim = CronRunClaim { deployment_id: stopped.id, due_at: past, ..claim };
    assert!(matches!(fire(stopped_claim).await, Err(StoreError::ClaimTaken)), "stopped claim");
    assert_eq!(executions_of(stopped.id).await, 0);
    let due_after_claim = store.list_due_cron_deployments(now, 10).await.expect("due");
    assert_eq!(deployment_ids(&due_after_claim), vec![due_late.id]);

    // set_next_run keeps last_triggered_at unless given, and None unschedules.
    store.set_next_run(due_late.id, None, None).await.expect("unschedule");
    let unscheduled_now = store.get_deployment_unscoped(due_late.id).await.expect("get");
    assert_eq!((unscheduled_now.next_run_at, unscheduled_now.last_triggered_at), (None, None));
    assert!(
        store
            .list_due_cron_deployments(future, 10)
            .await
            .expect("due")
            .iter()
            .all(|d| d.id != due_late.id)
    );
    assert!(is_not_found(&store.set_next_run(Uuid::now_v7(), None, None).await));
}

async fn deployment_trigger_records_and_agent_status_sync(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let other_agent = store.create_agent(new_agent(owner, "Other")).await.expect("agent");
    let workflow = store
        .create_workflow(new_workflow(owner, "Flow", vec![new_step("a", agent.id, &[])]))
        .await
        .expect("workflow")
        .workflow;
    let direct = store
        .create_deployment(new_deployment(owner, "direct", DeploymentTarget::Agent(agent.id)))
        .await
        .expect("direct");
    let second = store
        .create_deployment(new_deployment(owner, "second", DeploymentTarget::Agent(agent.id)))
        .await
        .expect("second");
    let through_workflow = store
        .create_deployment(new_deployment(owner, "flow", DeploymentTarget::Workflow(workflow.id)))
        .await
        .expect("flow");
    let set_status = async |id: Uuid, status: DeploymentStatus| {
        store
            .set_deployment_status(
                OwnerScope::All,
                id,
                status,
                event(DeploymentEventKind::Started, "x"),
            )
            .await
            .expect("status");
    };
    let status_of =
        async |id: Uuid| store.get_agent(OwnerScope::All, id).await.expect("agent").status;

    // record_deployment_trigger: last_triggered_at and the event, next_run_at untouched.
    let next = Utc::now() + Duration::hours(1);
    store.set_next_run(direct.id, Some(next), None).await.expect("schedule");
    let triggered_at = Utc::now();
    let recorded = store
        .record_deployment_trigger(
            direct.id,
            triggered_at,
            event(DeploymentEventKind::Triggered, "webhook call: started execution x"),
        )
        .await
        .expect("record");
    assert_eq!(recorded.kind, DeploymentEventKind::Triggered);
    assert_eq!(recorded.deployment_id, direct.id);
    let after = store.get_deployment_unscoped(direct.id).await.expect("get");
    assert_eq!(
        after.last_triggered_at.map(|at| at.timestamp_micros()),
        Some(triggered_at.timestamp_micros())
    );
    assert_eq!(after.next_run_at.map(|at| at.timestamp_micros()), Some(next.timestamp_micros()));
    assert_eq!((after.version, after.updated_at), (direct.version, direct.updated_at));
    let events =
        store.list_deployment_events(OwnerScope::All, direct.id, all_rows()).await.expect("events");
    assert_eq!(events.items[0], recorded, "newest first");
    assert!(is_not_found(
        &store
            .record_deployment_trigger(
                Uuid::now_v7(),
                triggered_at,
                event(DeploymentEventKind::Triggered, "x")
            )
            .await
    ));

    // The agent's status follows its direct deployments.
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Idle
    );
    set_status(direct.id, DeploymentStatus::Running).await;
    set_status(second.id, DeploymentStatus::Running).await;
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Running
    );
    assert_eq!(status_of(agent.id).await, AgentStatus::Running);
    set_status(direct.id, DeploymentStatus::Stopped).await;
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Running,
        "the second deployment still runs"
    );
    store.soft_delete_deployment(OwnerScope::All, second.id, None).await.expect("delete");
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Idle
    );
    assert_eq!(status_of(agent.id).await, AgentStatus::Idle);
    // A FAILED deployment is not running.
    set_status(direct.id, DeploymentStatus::Failed).await;
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Idle
    );
    // A workflow deployment changes nothing for its steps' agents.
    set_status(through_workflow.id, DeploymentStatus::Running).await;
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Idle
    );
    // PAUSED and STOPPED are left alone; a missing or deleted agent is NotFound.
    set_status(direct.id, DeploymentStatus::Running).await;
    store.set_agent_status(OwnerScope::All, agent.id, AgentStatus::Paused).await.expect("pause");
    assert_eq!(
        store.sync_agent_status_with_deployments(agent.id).await.expect("sync"),
        AgentStatus::Paused
    );
    assert_eq!(status_of(agent.id).await, AgentStatus::Paused);
    assert_eq!(
        store.sync_agent_status_with_deployments(other_agent.id).await.expect("sync"),
        AgentStatus::Idle
    );
    store.soft_delete_agent(OwnerScope::All, other_agent.id, None).await.expect("delete agent");
    assert!(is_not_found(&store.sync_agent_status_with_deployments(other_agent.id).await));
    assert!(is_not_found(&store.sync_agent_status_with_deployments(Uuid::now_v7()).await));
}

async fn deployment_list_pages_filters_sorts_and_searches(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let other = create_owner(&store, "other").await;
    let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
    let workflow = store
        .create_workflow(new_workflow(owner, "Pipeline", vec![new_step("a", agent.id, &[])]))
        .await
        .expect("workflow")
        .workflow;
    let specs = [
        ("api 99%", DeploymentEnvironment::Production, DeploymentTrigger::Manual, true, true),
        ("api_v2", DeploymentEnvironment::Staging, cron_trigger("x"), false, false),
        ("apiXv2", DeploymentEnvironment::Development, DeploymentTrigger::Manual, true, false),
        (
            "Batch",
            DeploymentEnvironment::Production,
            DeploymentTrigger::Webhook { secret: "k".to_owned() },
            false,
            true,
        ),
    ];
    let mut created = Vec::new();
    for (name, environment, trigger, on_workflow, running) in specs {
        let target = if on_workflow {
            DeploymentTarget::Workflow(workflow.id)
        } else {
            DeploymentTarget::Agent(agent.id)
        };
        let mut fields = new_deployment(owner, name, target);
        fields.environment = environment;
        fields.trigger = trigger;
        let mut deployment = store.create_deployment(fields).await.expect("create");
        if running {
            deployment = store
                .set_deployment_status(
                    OwnerScope::All,
                    deployment.id,
                    DeploymentStatus::Running,
                    event(DeploymentEventKind::Started, "go"),
                )
                .await
                .expect("start");
        }
        created.push(deployment);
    }
    let foreign_agent = store.create_agent(new_agent(other, "Theirs")).await.expect("agent");
    store
        .create_deployment(new_deployment(
            other,
            "api foreign",
            DeploymentTarget::Agent(foreign_agent.id),
        ))
        .await
        .expect("foreign");
    let scope = OwnerScope::Owner(owner);

    let mut filter = DeploymentFilter::new(scope);
    filter.page = page(1, 3);
    let first = store.list_deployments(filter.clone()).await.expect("page 1");
    assert_eq!((first.total, first.items.len()), (4, 3));
    filter.page = page(2, 3);
    let last = store.list_deployments(filter).await.expect("page 2");
    assert_eq!((last.total, last.items.len()), (4, 1));
    let mut paged = deployment_ids(&first.items);
    paged.extend(deployment_ids(&last.items));
    assert_eq!(paged, expected_order(&created, |d| d.updated_at, |d| d.id, true));
    assert_eq!(
        store.list_deployments(DeploymentFilter::new(OwnerScope::All)).await.expect("all").total,
        5
    );

    let filtered = |configure: &dyn Fn(&mut DeploymentFilter)| {
        let mut filter = DeploymentFilter::new(scope);
        filter.sort = Some(SortOrder { field: DeploymentSortField::CreatedAt, descending: false });
        configure(&mut filter);
        filter
    };
    let ids_of = |created: &[Deployment], indexes: &[usize]| -> Vec<Uuid> {
        indexes.iter().map(|index| created[*index].id).collect()
    };
    let running =
        store.list_deployments(filtered(&|f| f.status = Some(DeploymentStatus::Running))).await;
    assert_eq!(deployment_ids(&running.expect("status").items), ids_of(&created, &[0, 3]));
    let production = store
        .list_deployments(filtered(&|f| f.environment = Some(DeploymentEnvironment::Production)))
        .await;
    assert_eq!(deployment_ids(&production.expect("environment").items), ids_of(&created, &[0, 3]));
    let manual = store
        .list_deployments(filtered(&|f| f.trigger_type = Some(DeploymentTriggerType::Manual)))
        .await;
    assert_eq!(deployment_ids(&manual.expect("trigger").items), ids_of(&created, &[0, 2]));
    let cron = store
        .list_deployments(filtered(&|f| f.trigger_type = Some(DeploymentTriggerType::Cron)))
        .await;
    assert_eq!(deployment_ids(&cron.expect("trigger").items), ids_of(&created, &[1]));
    let on_workflow =
        store.list_deployments(filtered(&|f| f.workflow_id = Some(workflow.id))).await;
    assert_eq!(deployment_ids(&on_workflow.expect("workflow").items), ids_of(&created, &[0, 2]));
    let on_agent = store.list_deployments(filtered(&|f| f.agent_id = Some(agent.id))).await;
    assert_eq!(deployment_ids(&on_agent.expect("agent").items), ids_of(&created, &[1, 3]));
    let percent = store.list_deployments(filtered(&|f| f.search = Some("99%".to_owned()))).await;
    assert_eq!(deployment_ids(&percent.expect("search %").items), ids_of(&created, &[0]));
    let underscore = store.list_deployments(filtered(&|f| f.search = Some("I_V".to_owned()))).await;
    assert_eq!(deployment_ids(&underscore.expect("search _").items), ids_of(&created, &[1]));
    let everything_api =
        store.list_deployments(filtered(&|f| f.search = Some("api".to_owned()))).await;
    assert_eq!(
        deployment_ids(&everything_api.expect("search").items),
        ids_of(&created, &[0, 1, 2])
    );

    for descending in [false, true] {
        let sorted = |field: DeploymentSortField| {
            let mut filter = DeploymentFilter::new(scope);
            filter.sort = Some(SortOrder { field, descending });
            filter
        };
        let by_name = store.list_deployments(sorted(DeploymentSortField::Name)).await.expect("n");
        let expected = expected_order(&created, |d| d.name.to_lowercase(), |d| d.id, descending);
        assert_eq!(deployment_ids(&by_name.items), expected, "name descending={descending}");
        let by_created =
            store.list_deployments(sorted(DeploymentSortField::CreatedAt)).await.expect("c");
        let expected = expected_order(&created, |d| d.created_at, |d| d.id, descending);
        assert_eq!(
            deployment_ids(&by_created.items),
            expected,
            "created_at descending={descending}"
        );
        let by_updated =
            store.list_deployments(sorted(DeploymentSortField::UpdatedAt)).await.expect("u");
        let expected = expected_order(&created, |d| d.updated_at, |d| d.id, descending);
        assert_eq!(
            deployment_ids(&by_updated.items),
            expected,
            "updated_at descending={descending}"
        );
        let by_status =
            store.list_deployments(sorted(DeploymentSortField::Status)).await.expect("s");
        let expected = expected_order(&created, |d| d.status.as_str(), |d| d.id, descending);
        assert_eq!(deployment_ids(&by_status.items), expected, "status descending={descending}");
        let by_environment =
            store.list_deployments(sorted(DeploymentSortField::Environment)).await.expect("e");
        let expected = expected_order(&created, |d| d.environment.as_str(), |d| d.id, descending);
        assert_eq!(
            deployment_ids(&by_environment.items),
            expected,
            "environment descending={descending}"
        );
    }
}

async fn webhook_deliveries_are_recorded_once_and_forgotten_when_old(store: Arc<dyn Store>) {
    let owner = create_owner(&store, "owner").await;
    let agent = store.create_agent(new_agent(owner, "Hooked")).await.expect("agent");
    let first = store
        .create_deployment(new_deployment(owner, "one", DeploymentTarget::Agent(agent.id)))
        .await
        .expect("one");
    let second = store
        .create_deployment(new_deployment(owner, "two", DeploymentTarget::Agent(agent.id)))
        .await
        .expect("two");
    let now = Utc::now();
    let long_ago = now - Duration::minutes(30);
    let horizon = now - Duration::minutes(10);
    let record = async |deployment: Uuid, id: &str, at: DateTime<Utc>| {
        store.record_webhook_delivery(deployment, id, at, horizon).await.expect("record")
    };
    assert!(record(first.id, "evt_1", long_ago).await, "first time");
    assert!(record(first.id, "evt_2", now).await, "another id");
    assert!(!record(first.id, "evt_2", now).await, "a replay");
    assert!(record(second.id, "evt_2", now).await, "ids are per deployment");
    // evt_1 is older than the horizon: purged by the calls above, it records again.
    assert!(record(first.id, "evt_1", now).await, "forgotten once old");
    assert!(!record(first.id, "evt_1", now).await);
    assert!(
        store.record_webhook_delivery(Uuid::now_v7(), "evt_3", now, horizon).await.is_err(),
        "an unknown deployment"
    );
}

crate::conformance!(
    webhook_deliveries_are_recorded_once_and_forgotten_when_old,
    agent_crud_with_version_history,
    agent_duplicate_is_independent_with_fresh_history,
    agent_delete_refused_while_a_live_workflow_uses_it,
    agent_list_pages_filters_sorts_and_searches,
    workflow_crud_with_atomic_step_replacement,
    workflow_to_run_reads_each_agent_once,
    workflow_list_pages_filters_sorts_and_searches,
    template_crud_and_visibility,
    template_list_pages_filters_sorts_and_searches,
    deployment_crud_with_events,
    deployment_targets_exactly_one_live_resource,
    deployment_cron_due_query_and_claims,
    deployment_trigger_records_and_agent_status_sync,
    deployment_list_pages_filters_sorts_and_searches,
);

// ---------------------------------------------------------------------------------------------
// Schema constraints the Rust API cannot even express, checked with raw SQL on both backends
// ---------------------------------------------------------------------------------------------

mod schema_constraints {
    use sqlx::Connection;

    use super::*;

    /// Inserts deployments with both targets and with none: both must be refused by the CHECK.
    async fn assert_exactly_one_target_checked<C: Connection>(
        connection: &mut C,
        owner: Uuid,
        agent_id: Uuid,
        workflow_id: Uuid,
    ) where
        for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
        for<'q> Uuid: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> Option<Uuid>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> <C::Database as sqlx::Database>::Arguments: sqlx::IntoArguments<C::Database>,
    {
        let cases = [
            (Some(workflow_id), Some(agent_id), false),
            (None, None, false),
            (None, Some(agent_id), true),
            (Some(workflow_id), None, true),
        ];
        for (workflow, agent, allowed) in cases {
            let result = sqlx::query::<C::Database>(
                "INSERT INTO deployments (id, owner_id, name, description, workflow_id, agent_id, \
                 environment, config, trigger_type, status, version, created_at, updated_at) \
                 VALUES ($1, $2, 'raw', '', $3, $4, 'DEVELOPMENT', '{}', 'MANUAL', 'STOPPED', 1, \
                 $5, $5)",
            )
            .bind(Uuid::now_v7())
            .bind(owner)
            .bind(workflow)
            .bind(agent)
            .bind(Utc::now())
            .execute(&mut *connection)
            .await;
            match result {
                Ok(_) => assert!(allowed, "{workflow:?} / {agent:?} must be refused"),
                Err(error) => {
                    assert!(!allowed, "{workflow:?} / {agent:?} must be accepted: {error}");
                    let message = error.to_string();
                    assert!(
                        message.contains("deployments_exactly_one_target"),
                        "refused for another reason: {message}"
                    );
                }
            }
        }
    }

    async fn seed(store: &Arc<dyn Store>) -> (Uuid, Uuid, Uuid) {
        let owner = create_owner(store, "owner").await;
        let agent = store.create_agent(new_agent(owner, "Worker")).await.expect("agent");
        let workflow = store
            .create_workflow(new_workflow(owner, "Pipeline", vec![new_step("a", agent.id, &[])]))
            .await
            .expect("workflow");
        (owner, agent.id, workflow.workflow.id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_deployment_needs_exactly_one_target() {
        let database = crate::support::postgres().await;
        let (owner, agent_id, workflow_id) = seed(&database.store()).await;
        let mut connection = sqlx::PgConnection::connect(&database.url).await.expect("connect");
        assert_exactly_one_target_checked(&mut connection, owner, agent_id, workflow_id).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_deployment_needs_exactly_one_target() {
        let database = crate::support::sqlite().await;
        let (owner, agent_id, workflow_id) = seed(&database.store()).await;
        let mut connection = sqlx::SqliteConnection::connect(&database.url).await.expect("connect");
        assert_exactly_one_target_checked(&mut connection, owner, agent_id, workflow_id).await;
    }
}

// ---------------------------------------------------------------------------------------------
// A step whose agent was deleted behind the store's back (its own deletion refuses an agent in
// use): the workflow to run has no agent for it, which the service refuses to start
// ---------------------------------------------------------------------------------------------

mod deleted_agent {
    use sqlx::Connection;

    use super::*;

    async fn delete_behind_the_store<C: Connection>(connection: &mut C, agent_id: Uuid)
    where
        for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
        for<'q> Uuid: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> <C::Database as sqlx::Database>::Arguments: sqlx::IntoArguments<C::Database>,
    {
        sqlx::query::<C::Database>("UPDATE agents SET deleted_at = $1 WHERE id = $2")
            .bind(Utc::now())
            .bind(agent_id)
            .execute(&mut *connection)
            .await
            .expect("delete the agent");
    }

    async fn seed(store: &Arc<dyn Store>) -> (Uuid, Uuid, Uuid) {
        let owner = create_owner(store, "owner").await;
        let kept = store.create_agent(new_agent(owner, "Kept")).await.expect("agent");
        let gone = store.create_agent(new_agent(owner, "Gone")).await.expect("agent");
        let steps = vec![new_step("a", kept.id, &[]), new_step("b", gone.id, &["a"])];
        let workflow = store.create_workflow(new_workflow(owner, "Pipeline", steps)).await;
        (kept.id, gone.id, workflow.expect("workflow").workflow.id)
    }

    async fn assert_read_without(store: &Arc<dyn Store>, kept: Uuid, workflow_id: Uuid) {
        let to_run = store.get_workflow_to_run(OwnerScope::All, workflow_id).await;
        let to_run = to_run.expect("the workflow to run");
        assert_eq!(step_keys(&to_run.workflow.steps), vec!["a", "b"]);
        assert_eq!(agent_ids(&to_run.agents), vec![kept]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_workflow_to_run_leaves_a_deleted_agent_out() {
        let database = crate::support::postgres().await;
        let store = database.store();
        let (kept, gone, workflow_id) = seed(&store).await;
        let mut connection = sqlx::PgConnection::connect(&database.url).await.expect("connect");
        delete_behind_the_store(&mut connection, gone).await;
        assert_read_without(&store, kept, workflow_id).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_workflow_to_run_leaves_a_deleted_agent_out() {
        let database = crate::support::sqlite().await;
        let store = database.store();
        let (kept, gone, workflow_id) = seed(&store).await;
        let mut connection = sqlx::SqliteConnection::connect(&database.url).await.expect("connect");
        delete_behind_the_store(&mut connection, gone).await;
        assert_read_without(&store, kept, workflow_id).await;
    }
}

// ---------------------------------------------------------------------------------------------
// List totals: kept between requests, seen at once after this process's writes, within
// `LIST_TOTALS_KEPT_FOR` after another process's
// ---------------------------------------------------------------------------------------------

mod list_totals {
    use sqlx::Connection;
    use turbocat::store::LIST_TOTALS_KEPT_FOR;

    use super::*;

    /// The total of `owner`'s DATA agents, as a list of `page_size` a page reports it.
    async fn data_agents(store: &Arc<dyn Store>, owner: Uuid, page_size: u32) -> i64 {
        let mut filter = AgentFilter::new(OwnerScope::Owner(owner));
        filter.agent_type = Some(AgentType::Data);
        filter.page = page(1, page_size);
        store.list_agents(filter).await.expect("list").total
    }

    fn data_agent(owner: Uuid, name: &str) -> NewAgent {
        NewAgent { agent_type: AgentType::Data, ..new_agent(owner, name) }
    }

    /// `store` and `same_database` are two stores of this process on one database; `insert`
    /// writes a DATA agent of `owner` past both, as another replica would. Pages of one row are
    /// full (the total is kept or counted); a page of 20 is the last (its rows are the total).
    async fn totals_follow_writes<F, Fut>(
        store: Arc<dyn Store>,
        same_database: Arc<dyn Store>,
        insert: F,
    ) where
        F: Fn(Uuid) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let owner = create_owner(&store, "owner").await;
        let first = store.create_agent(data_agent(owner, "one")).await.expect("create");
        store.create_agent(data_agent(owner, "two")).await.expect("create");
        store.create_agent(new_agent(owner, "code")).await.expect("create");
        assert_eq!(data_agents(&store, owner, 1).await, 2);

        // Another process's write: a full page uses the kept total until it is `KEPT_FOR`
        // old; a last page says the exact total at once (and keeps it).
        insert(owner).await;
        assert_eq!(data_agents(&store, owner, 1).await, 2, "the total was counted again");
        assert_eq!(data_agents(&store, owner, 20).await, 3, "the last page's rows");
        assert_eq!(data_agents(&store, owner, 1).await, 3, "the last page's total was kept");
        insert(owner).await;
        assert_eq!(data_agents(&store, owner, 1).await, 3, "the total was counted again");
        tokio::time::sleep(LIST_TOTALS_KEPT_FOR + std::time::Duration::from_millis(100)).await;
        assert_eq!(data_agents(&store, owner, 1).await, 4);

        // This process's writes, through either store, are seen at once.
        store.create_agent(data_agent(owner, "five")).await.expect("create");
        assert_eq!(data_agents(&store, owner, 1).await, 5);
        same_database.create_agent(data_agent(owner, "six")).await.expect("create");
        assert_eq!(data_agents(&store, owner, 1).await, 6);
        store.soft_delete_agent(OwnerScope::Owner(owner), first.id, None).await.expect("delete");
        assert_eq!(data_agents(&same_database, owner, 1).await, 5);
        let mut stopped = AgentFilter::new(OwnerScope::Owner(owner));
        stopped.status = Some(AgentStatus::Stopped);
        stopped.page = page(1, 1);
        assert_eq!(store.list_agents(stopped.clone()).await.expect("list").total, 0);
        for agent in store
            .list_agents(AgentFilter::new(OwnerScope::Owner(owner)))
            .await
            .expect("list")
            .items
            .iter()
            .take(2)
        {
            store
                .set_agent_status(OwnerScope::All, agent.id, AgentStatus::Stopped)
                .await
                .expect("stop");
        }
        assert_eq!(store.list_agents(stopped.clone()).await.expect("list").total, 2);

        // Past the end: an empty page still says the total.
        stopped.page = page(3, 1);
        let past = store.list_agents(stopped).await.expect("list");
        assert!(past.items.is_empty());
        assert_eq!(past.total, 2);
    }

    const RAW_AGENT: &str = "INSERT INTO agents (id, owner_id, name, agent_type, timeout_seconds, \
         memory_mb, cpu_seconds, max_output_bytes, created_at, updated_at) \
         VALUES ($1, $2, 'raw', 'DATA', 30, 256, 30, 1048576, $3, $3)";

    /// Another process's write: a DATA agent of `owner`, inserted on a connection of its own.
    async fn insert_raw_agent<C: Connection>(url: String, owner: Uuid)
    where
        for<'c> &'c mut C: sqlx::Executor<'c, Database = C::Database>,
        for<'q> Uuid: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> DateTime<Utc>: sqlx::Encode<'q, C::Database> + sqlx::Type<C::Database>,
        for<'q> <C::Database as sqlx::Database>::Arguments: sqlx::IntoArguments<C::Database>,
    {
        let mut connection = C::connect(&url).await.expect("connect");
        sqlx::query::<C::Database>(RAW_AGENT)
            .bind(Uuid::now_v7())
            .bind(owner)
            .bind(Utc::now())
            .execute(&mut connection)
            .await
            .expect("raw insert");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_list_totals_follow_writes() {
        let database = crate::support::postgres().await;
        let same_database =
            turbocat::store::PostgresStore::connect(&database.url, 2).await.expect("second store");
        totals_follow_writes(database.store(), Arc::new(same_database), |owner| {
            insert_raw_agent::<sqlx::PgConnection>(database.url.clone(), owner)
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_list_totals_follow_writes() {
        let database = crate::support::sqlite().await;
        let path = database.url.trim_start_matches("sqlite://");
        let same_database = turbocat::store::SqliteStore::open(std::path::Path::new(path))
            .await
            .expect("second store");
        totals_follow_writes(database.store(), Arc::new(same_database), |owner| {
            insert_raw_agent::<sqlx::SqliteConnection>(database.url.clone(), owner)
        })
        .await;
    }
}
