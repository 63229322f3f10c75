//! Workflow definitions: create, read, update, delete and list over REST and gRPC; every DAG
//! problem named by its field; versions, ownership and the audit trail.

use serde_json::{Value, json};
use turbocat::proto::v1::workflow_service_client::WorkflowServiceClient;
use turbocat::proto::v1::{
    self as pb, CreateWorkflowRequest, DeleteWorkflowRequest, GetWorkflowRequest,
    ListWorkflowsRequest, UpdateWorkflowRequest,
};

use crate::fixture::{Fixture, Mode, item_values, items, messages_for, user_id};
use crate::support::api::{
    Auth, assert_error, audit_rows, error_metadata, error_reason, grpc, violated_fields,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_on_dev() {
    workflow_lifecycle(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_on_serve() {
    workflow_lifecycle(Mode::Serve).await;
}

async fn workflow_lifecycle(mode: Mode) {
    let fixture = Fixture::start(mode).await;
    create_read_update_delete_over_rest(&fixture).await;
    every_definition_problem_is_named(&fixture).await;
    lists_page_filter_sort_and_search(&fixture).await;
    the_same_over_grpc(&fixture).await;
}

async fn create_read_update_delete_over_rest(fixture: &Fixture) {
    let (api, alice, bob) = (&fixture.api, &fixture.alice, &fixture.bob);
    let fetcher = fixture.agent(alice, "fetcher").await;
    let shaper = fixture.agent(alice, "shaper").await;
    let (status, body) = api
        .post(
            "/api/v1/workflows",
            &alice.auth(),
            json!({
                "name": "  Fetch and shape ",
                "description": "two steps",
                "tags": ["etl", "nightly", "etl"],
                "priority": 7,
                "timeout": "600s",
                "defaultInput": { "name": "cat" },
                "steps": [
                    {
                        "key": "fetch",
                        "name": "Fetch",
                        "agentId": fetcher,
                        "retryPolicy": {
                            "maxAttempts": 3, "initialBackoff": "2s", "maxBackoff": "30s",
                            "multiplier": 3
                        },
                        "timeout": "60s",
                        "requiredLabels": { "gpu": "", "region": "eu" }
                    },
                    {
                        "key": "shape",
                        "agentId": shaper,
                        "dependsOn": ["fetch"],
                        "inputMapping": {
                            "data": "{{steps.fetch.output.items}}",
                            "who": "hello {{input.name}}"
                        }
                    }
                ]
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let workflow = body["data"].clone();
    let workflow_id = workflow["id"].as_str().expect("id").to_owned();
    let create_request_id = body["meta"]["requestId"].as_str().expect("request id").to_owned();
    assert_eq!(workflow["name"], "Fetch and shape");
    assert_eq!(workflow["ownerId"], alice.id.as_str());
    assert_eq!(workflow["tags"], json!(["etl", "nightly"]));
    assert_eq!(workflow["priority"], 7);
    assert_eq!(workflow["timeout"], "600s");
    assert_eq!(workflow["defaultInput"], json!({ "name": "cat" }));
    assert_eq!(workflow["version"], 1);
    let fetch = &workflow["steps"][0];
    assert_eq!(fetch["key"], "fetch");
    assert_eq!(fetch["name"], "Fetch");
    assert_eq!(fetch["retryPolicy"]["maxAttempts"], 3);
    assert_eq!(fetch["retryPolicy"]["initialBackoff"], "2s");
    assert_eq!(fetch["retryPolicy"]["maxBackoff"], "30s");
    assert_eq!(fetch["retryPolicy"]["multiplier"].as_f64(), Some(3.0));
    assert_eq!(fetch["timeout"], "60s");
    assert_eq!(fetch["requiredLabels"], json!({ "gpu": "", "region": "eu" }));
    let shape = &workflow["steps"][1];
    assert_eq!(shape["name"], "shape", "the name defaults to the key");
    assert_eq!(shape["dependsOn"], json!(["fetch"]));
    assert_eq!(shape["inputMapping"]["data"], "{{steps.fetch.output.items}}");
    assert_eq!(shape["retryPolicy"]["maxAttempts"], 1, "one attempt by default");
    assert_eq!(shape["retryPolicy"]["multiplier"].as_f64(), Some(2.0));
    assert_eq!(shape["timeout"], Value::Null);

    // Defaults of a minimal workflow.
    let (status, body) = api
        .post(
            "/api/v1/workflows",
            &alice.auth(),
            json!({ "name": "minimal", "steps": [{ "key": "only", "agentId": fetcher }] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["priority"], 5);
    assert_eq!(body["data"]["timeout"], Value::Null);
    assert_eq!(body["data"]["defaultInput"], json!({}));
    let minimal_id = body["data"]["id"].as_str().expect("id").to_owned();

    let path = format!("/api/v1/workflows/{workflow_id}");
    let (status, body) = api.get(&path, &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], workflow, "GET shows what POST answered");

    // Another user sees nothing of it, and cannot change it.
    let (status, body) = api.get(&path, &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) =
        api.patch(&path, &bob.auth(), json!({ "name": "mine", "version": 1 })).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&path, &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.get("/api/v1/workflows", &bob.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert!(items(&body).is_empty(), "{body}");
    let (status, body) = api.get("/api/v1/workflows/not-an-id", &alice.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["workflowId"]);

    // PATCH changes what the body names and nothing else.
    let (status, body) = api
        .patch(&path, &alice.auth(), json!({ "name": "Renamed", "priority": 2, "version": 1 }))
        .await;
    assert_eq!(status, 200, "{body}");
    let update_request_id = body["meta"]["requestId"].as_str().expect("request id").to_owned();
    assert_eq!(body["data"]["name"], "Renamed");
    assert_eq!(body["data"]["priority"], 2);
    assert_eq!(body["data"]["version"], 2);
    assert_eq!(body["data"]["description"], "two steps");
    assert_eq!(body["data"]["steps"], workflow["steps"], "steps are kept when not named");

    // A stale version is refused with the current one; nothing changes.
    let (status, body) =
        api.patch(&path, &alice.auth(), json!({ "name": "Late", "version": 1 })).await;
    assert_error(status, &body, 409, "CONFLICT");
    let details = body["error"]["details"].as_array().expect("details");
    assert!(details.iter().any(|detail| detail["currentVersion"] == 2), "{body}");
    let (_, body) = api.get(&path, &alice.auth()).await;
    assert_eq!(body["data"]["name"], "Renamed");

    // Fields that cannot change, bad values and a missing version are all named.
    let (status, body) = api
        .patch(&path, &alice.auth(), json!({ "ownerId": bob.id, "priority": 11, "timeout": "0s" }))
        .await;
    let mut fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    fields.sort();
    assert_eq!(fields, vec!["ownerId", "priority", "timeout", "version"], "{body}");

    // Steps in the mask replace every step, and are checked like on create.
    let (status, body) = api
        .patch(
            &path,
            &alice.auth(),
            json!({ "steps": [{ "key": "a", "agentId": shaper, "dependsOn": ["a"] }], "version": 2 }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["steps[0].dependsOn"]);
    let (status, body) = api
        .patch(
            &path,
            &alice.auth(),
            json!({
                "steps": [
                    { "key": "one", "agentId": shaper },
                    { "key": "two", "agentId": fetcher, "dependsOn": ["one"],
                      "inputMapping": "{{steps.one.output}}" }
                ],
                "timeout": null,
                "version": 2
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(item_keys(&body["data"]["steps"]), vec!["one", "two"]);
    assert_eq!(body["data"]["steps"][1]["inputMapping"], "{{steps.one.output}}");
    assert_eq!(body["data"]["timeout"], Value::Null, "a null timeout removes it");
    assert_eq!(body["data"]["version"], 3);

    // DELETE is soft: the workflow is gone from reads and lists, and a second delete is a 404.
    let (status, body) =
        api.delete(&format!("/api/v1/workflows/{minimal_id}"), &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    let delete_request_id = body["meta"]["requestId"].as_str().expect("request id").to_owned();
    let (status, body) = api.get(&format!("/api/v1/workflows/{minimal_id}"), &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) =
        api.delete(&format!("/api/v1/workflows/{minimal_id}"), &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (_, body) = api.get("/api/v1/workflows", &alice.auth()).await;
    assert_eq!(item_values(&body, "id"), vec![workflow_id.clone()]);

    // A read key may read but not write; a runner key may do neither.
    let (read_key, _) = api.create_key(&alice.auth(), "reader", &["READ"]).await;
    let (status, body) = api.get(&path, &Auth::key(&read_key)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        api.patch(&path, &Auth::key(&read_key), json!({ "name": "x", "version": 3 })).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (runner_key, _) = api.create_key(&alice.auth(), "runner", &["RUNNER"]).await;
    let (status, body) = api.get("/api/v1/workflows", &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.get("/api/v1/workflows", &Auth::None).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");

    // The audit trail has each change with its request id.
    let rows = audit_rows(fixture.store.as_ref()).await;
    let find = |action: &str, resource_id: &str| {
        rows.iter()
            .find(|row| row.action == action && row.resource_id.as_deref() == Some(resource_id))
            .unwrap_or_else(|| panic!("no {action} row for {resource_id}"))
            .clone()
    };
    let created = find("workflow.create", &workflow_id);
    assert_eq!(created.request_id.as_deref(), Some(create_request_id.as_str()));
    assert_eq!(created.actor_id, Some(user_id(alice)));
    let updated = find("workflow.update", &workflow_id);
    assert_eq!(updated.request_id.as_deref(), Some(update_request_id.as_str()));
    let changes = updated.changes.expect("changes");
    assert_eq!(changes["before"]["name"], "Fetch and shape");
    assert_eq!(changes["after"]["name"], "Renamed");
    assert_eq!(changes["after"]["priority"], 2);
    let deleted = find("workflow.delete", &minimal_id);
    assert_eq!(deleted.request_id.as_deref(), Some(delete_request_id.as_str()));
    let update_rows = rows
        .iter()
        .filter(|row| {
            row.action == "workflow.update" && row.resource_id.as_deref() == Some(&workflow_id)
        })
        .count();
    assert_eq!(update_rows, 2, "refused updates write no row");
}

fn item_keys(steps: &Value) -> Vec<String> {
    steps
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|step| step["key"].as_str().map(str::to_owned))
        .collect()
}

async fn every_definition_problem_is_named(fixture: &Fixture) {
    let (api, alice, bob) = (&fixture.api, &fixture.alice, &fixture.bob);
    let mine = fixture.agent(alice, "mine").await;
    let deleted = fixture.deleted_agent(alice).await;
    let bobs = fixture.agent(bob, "bob's").await;
    let missing = uuid::Uuid::new_v4().to_string();
    let (_, before) = api.get("/api/v1/workflows", &alice.auth()).await;
    let total_before = before["meta"]["pagination"]["total"].clone();
    let (status, body) = api
        .post(
            "/api/v1/workflows",
            &alice.auth(),
            json!({
                "name": "",
                "priority": 11,
                "defaultInput": [1, 2],
                "timeout": "1.5s",
                "steps": [
                    { "key": "a", "agentId": mine, "dependsOn": ["c"] },
                    { "key": "b", "agentId": mine, "dependsOn": ["a"] },
                    { "key": "c", "agentId": mine, "dependsOn": ["b"] },
                    { "key": "d", "agentId": mine, "dependsOn": ["ghost"] },
                    { "key": "a", "agentId": mine },
                    { "key": "self", "agentId": mine, "dependsOn": ["self"] },
                    { "key": "ref", "agentId": mine, "dependsOn": ["d"],
                      "inputMapping": { "url": "{{steps.self.output}}" } },
                    { "key": "bad", "agentId": mine, "inputMapping": { "x": "{{input.a" } },
                    { "key": "root", "agentId": mine, "inputMapping": "{{env.HOME}}" },
                    { "key": "missing", "agentId": missing },
                    { "key": "deleted", "agentId": deleted },
                    { "key": "other", "agentId": bobs },
                    { "key": "bad key!", "agentId": mine },
                    { "key": "retry", "agentId": mine, "retryPolicy": { "maxAttempts": 21 } },
                    { "key": "noagent", "agentId": "not-a-uuid" }
                ]
            }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    let expected = [
        ("name", "is required"),
        ("priority", "between 1 and 10"),
        ("defaultInput", "JSON object"),
        ("timeout", "whole number of seconds"),
        ("steps[0].dependsOn", "a -> b -> c -> a"),
        ("steps[3].dependsOn", "unknown step \"ghost\""),
        ("steps[4].key", "duplicates the key \"a\" of steps[0]"),
        ("steps[5].dependsOn", "itself"),
        ("steps[6].inputMapping.url", "\"self\", which this step does not depend on"),
        ("steps[7].inputMapping.x", ""),
        ("steps[8].inputMapping", "unknown root"),
        ("steps[9].agentId", "not an agent of yours"),
        ("steps[10].agentId", "not an agent of yours"),
        ("steps[11].agentId", "not an agent of yours"),
        ("steps[12].key", "letters, digits"),
        ("steps[13].retryPolicy.maxAttempts", "between 1 and 20"),
        ("steps[14].agentId", "not a valid id"),
    ];
    for (field, fragment) in expected {
        let messages = messages_for(&body, field);
        assert!(
            messages.iter().any(|message| message.contains(fragment)),
            "{field} should say {fragment:?}: {body}"
        );
    }
    assert_eq!(fields.len(), expected.len(), "exactly these problems: {body}");
    let (_, after) = api.get("/api/v1/workflows", &alice.auth()).await;
    assert_eq!(after["meta"]["pagination"]["total"], total_before, "nothing was written");

    // No steps at all, and a body without a workflow.
    let (status, body) =
        api.post("/api/v1/workflows", &alice.auth(), json!({ "name": "empty", "steps": [] })).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["steps"]);
}

async fn lists_page_filter_sort_and_search(fixture: &Fixture) {
    let (api, bob) = (&fixture.api, &fixture.bob);
    let agent = fixture.agent(bob, "lister").await;
    let definitions = [
        ("Zeta report", 3, vec!["report"], "weekly numbers"),
        ("alpha import", 9, vec!["import", "nightly"], "loads the CRM"),
        ("Beta export", 1, vec!["export", "nightly"], "pushes to S3"),
        ("gamma cleanup", 5, vec![], "removes old rows"),
        ("Delta sync", 7, vec!["import"], "mirrors the warehouse"),
    ];
    for (name, priority, tags, description) in definitions {
        let (status, body) = api
            .post(
                "/api/v1/workflows",
                &bob.auth(),
                json!({
                    "name": name, "priority": priority, "tags": tags, "description": description,
                    "steps": [{ "key": "s", "agentId": agent }]
                }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    // Default order: most recently updated first.
    let (status, body) = api.get("/api/v1/workflows", &bob.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        item_values(&body, "name"),
        vec!["Delta sync", "gamma cleanup", "Beta export", "alpha import", "Zeta report"]
    );
    assert_eq!(body["meta"]["pagination"]["total"], 5);
    assert_eq!(body["data"][0]["steps"], json!([]), "lists leave the steps out");

    let (_, body) = api.get("/api/v1/workflows?sort=name&pageSize=2", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["alpha import", "Beta export"]);
    assert_eq!(body["meta"]["pagination"]["totalPages"], 3);
    let (_, body) = api.get("/api/v1/workflows?sort=name&pageSize=2&page=3", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["Zeta report"], "the last page is short");
    let (status, body) =
        api.get("/api/v1/workflows?sort=name&pageSize=2&page=4", &bob.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert!(items(&body).is_empty(), "past the end is empty: {body}");
    assert_eq!(body["meta"]["pagination"]["total"], 5);
    let (_, body) = api.get("/api/v1/workflows?sort=-priority&pageSize=3", &bob.auth()).await;
    assert_eq!(item_values(&body, "priority"), vec!["9", "7", "5"]);
    let (_, body) = api.get("/api/v1/workflows?sort=createdAt&pageSize=1", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["Zeta report"]);
    let (_, body) = api.get("/api/v1/workflows?tag=nightly&sort=name", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["alpha import", "Beta export"]);
    let (_, body) = api.get("/api/v1/workflows?search=IMPORT", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["alpha import"]);
    let (_, body) = api.get("/api/v1/workflows?search=warehouse", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["Delta sync"], "search reads descriptions");
    let (_, body) = api.get("/api/v1/workflows?tag=import&search=crm", &bob.auth()).await;
    assert_eq!(item_values(&body, "name"), vec!["alpha import"], "filters combine");

    let (status, body) =
        api.get("/api/v1/workflows?sort=ownerId&page=0&pageSize=101", &bob.auth()).await;
    assert_eq!(
        assert_error(status, &body, 400, "VALIDATION_ERROR"),
        vec!["page", "pageSize", "sort"],
        "{body}"
    );
}

fn grpc_workflow(name: &str, steps: Vec<pb::WorkflowStep>) -> pb::Workflow {
    pb::Workflow { name: name.to_owned(), steps, ..Default::default() }
}

fn grpc_step(key: &str, agent_id: &str, depends_on: &[&str]) -> pb::WorkflowStep {
    pb::WorkflowStep {
        key: key.to_owned(),
        agent_id: agent_id.to_owned(),
        depends_on: depends_on.iter().map(|key| (*key).to_owned()).collect(),
        ..Default::default()
    }
}

async fn the_same_over_grpc(fixture: &Fixture) {
    let (alice, bob) = (&fixture.alice, &fixture.bob);
    let mut client = WorkflowServiceClient::new(fixture.api.channel().await);
    let agent = fixture.agent(alice, "grpc agent").await;
    let bobs_agent = fixture.agent(bob, "bob grpc agent").await;

    let created = client
        .create_workflow(grpc(
            CreateWorkflowRequest {
                workflow: Some(grpc_workflow(
                    "over grpc",
                    vec![grpc_step("first", &agent, &[]), grpc_step("second", &agent, &["first"])],
                )),
            },
            &alice.auth(),
        ))
        .await
        .expect("create over grpc")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(created.version, 1);
    assert_eq!(created.priority, 5);
    assert_eq!(created.steps.len(), 2);
    assert_eq!(created.steps[1].depends_on, vec!["first".to_owned()]);

    // Problems are field violations with the same paths as over REST.
    let refused = client
        .create_workflow(grpc(
            CreateWorkflowRequest {
                workflow: Some(grpc_workflow(
                    "bad",
                    vec![
                        grpc_step("x", &agent, &["y"]),
                        grpc_step("y", &agent, &["x"]),
                        grpc_step("z", &bobs_agent, &["nope"]),
                    ],
                )),
            },
            &alice.auth(),
        ))
        .await
        .expect_err("a cycle");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        violated_fields(&refused),
        vec!["steps[0].dependsOn", "steps[2].dependsOn", "steps[2].agentId"]
    );
    assert!(refused.message().contains("3 fields"), "{}", refused.message());

    let fetched = client
        .get_workflow(grpc(GetWorkflowRequest { workflow_id: created.id.clone() }, &alice.auth()))
        .await
        .expect("get")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(fetched, created);
    let hidden = client
        .get_workflow(grpc(GetWorkflowRequest { workflow_id: created.id.clone() }, &bob.auth()))
        .await
        .expect_err("another user's workflow");
    assert_eq!(hidden.code(), tonic::Code::NotFound);

    let update = |version: i32, name: &str, paths: &[&str]| UpdateWorkflowRequest {
        workflow: Some(pb::Workflow {
            id: created.id.clone(),
            version,
            name: name.to_owned(),
            tags: vec!["grpc".to_owned()],
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: paths.iter().map(|path| (*path).to_owned()).collect(),
        }),
    };
    let updated = client
        .update_workflow(grpc(update(1, "renamed over grpc", &["name", "tags"]), &alice.auth()))
        .await
        .expect("update")
        .into_inner()
        .workflow
        .expect("workflow");
    assert_eq!(updated.name, "renamed over grpc");
    assert_eq!(updated.tags, vec!["grpc".to_owned()]);
    assert_eq!(updated.version, 2);
    assert_eq!(updated.steps, created.steps, "steps outside the mask are kept");
    let stale = client
        .update_workflow(grpc(update(1, "late", &["name"]), &alice.auth()))
        .await
        .expect_err("stale version");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert_eq!(error_reason(&stale).as_deref(), Some("CONFLICT"));
    assert_eq!(error_metadata(&stale, "currentVersion").as_deref(), Some("2"));
    let masked = client
        .update_workflow(grpc(update(2, "x", &["owner_id"]), &alice.auth()))
        .await
        .expect_err("not changeable");
    assert_eq!(violated_fields(&masked), vec!["ownerId"]);

    let listed = client
        .list_workflows(grpc(
            ListWorkflowsRequest { sort: "name".to_owned(), ..Default::default() },
            &alice.auth(),
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workflows.iter().any(|workflow| workflow.id == created.id));
    assert_eq!(
        listed.pagination.expect("pagination").total,
        i32::try_from(listed.workflows.len()).expect("small")
    );

    // A stale version refuses the delete; the right one deletes.
    let stale_delete = client
        .delete_workflow(grpc(
            DeleteWorkflowRequest { workflow_id: created.id.clone(), version: 1 },
            &alice.auth(),
        ))
        .await
        .expect_err("stale delete");
    assert_eq!(stale_delete.code(), tonic::Code::Aborted);
    let not_owner = client
        .delete_workflow(grpc(
            DeleteWorkflowRequest { workflow_id: created.id.clone(), version: 0 },
            &bob.auth(),
        ))
        .await
        .expect_err("another user's workflow");
    assert_eq!(not_owner.code(), tonic::Code::NotFound);
    client
        .delete_workflow(grpc(
            DeleteWorkflowRequest { workflow_id: created.id.clone(), version: 2 },
            &alice.auth(),
        ))
        .await
        .expect("delete");
    let gone = client
        .get_workflow(grpc(GetWorkflowRequest { workflow_id: created.id.clone() }, &alice.auth()))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
}
