//! Executions: starting one records it (QUEUED, a PENDING step run per step, the definition
//! snapshot); lists by page and by cursor; one with its attempts; logs; cancel; ownership and
//! the audit trail, over REST and gRPC.

use std::collections::HashSet;

use chrono::Utc;
use serde_json::{Value, json};
use turbocat::proto::v1::execution_service_client::ExecutionServiceClient;
use turbocat::proto::v1::workflow_service_client::WorkflowServiceClient;
use turbocat::proto::v1::{
    self as pb, CancelExecutionRequest, ExecuteWorkflowRequest, GetExecutionRequest,
    ListExecutionLogsRequest, ListExecutionsRequest,
};
use turbocat::store::{ExecutionLogLevel, ExecutionLogSource, NewExecutionLog, OwnerScope};

use crate::fixture::{Fixture, Mode, item_values, items};
use crate::support::api::{Auth, assert_error, audit_rows, error_metadata, grpc, violated_fields};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_on_dev() {
    execution_lifecycle(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executions_on_serve() {
    execution_lifecycle(Mode::Serve).await;
}

/// Alice's two-step workflow (priority 3, a default input, a 600 s timeout); its id.
async fn two_step_workflow(fixture: &Fixture, fetcher: &str, shaper: &str) -> String {
    let (status, body) = fixture
        .api
        .post(
            "/api/v1/workflows",
            &fixture.alice.auth(),
            json!({
                "name": "Fetch and shape",
                "priority": 3,
                "timeout": "600s",
                "defaultInput": { "name": "cat" },
                "steps": [
                    { "key": "fetch", "agentId": fetcher, "retryPolicy": { "maxAttempts": 4 },
                      // No runner has this label: the executions stay unfinished here (the
                      // engine's own tests run them).
                      "requiredLabels": { "nowhere": "" } },
                    { "key": "shape", "agentId": shaper, "dependsOn": ["fetch"],
                      "inputMapping": "{{steps.fetch.output}}" }
                ]
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["data"]["id"].as_str().expect("id").to_owned()
}

async fn execution_lifecycle(mode: Mode) {
    let fixture = Fixture::start(mode).await;
    let (api, alice, bob) = (&fixture.api, &fixture.alice, &fixture.bob);
    let fetcher = fixture.agent(alice, "fetcher").await;
    let shaper = fixture.agent(alice, "shaper").await;
    let workflow_id = two_step_workflow(&fixture, &fetcher, &shaper).await;
    let execute_path = format!("/api/v1/workflows/{workflow_id}/execute");

    // Without overrides: the workflow's input, priority and timeout.
    let (status, body) = api.post(&execute_path, &alice.auth(), json!({})).await;
    assert_eq!(status, 202, "{body}");
    let first = body["data"].clone();
    let first_id = first["id"].as_str().expect("id").to_owned();
    let execute_request_id = body["meta"]["requestId"].as_str().expect("request id").to_owned();
    // Started in the commit that created it: RUNNING, its first step QUEUED (no runner has
    // its label), the one after it waiting.
    assert_eq!(first["status"], "RUNNING");
    assert_eq!(first["startedAt"], first["createdAt"]);
    assert_eq!(first["trigger"], "MANUAL");
    assert_eq!(first["workflowId"], workflow_id.as_str());
    assert_eq!(first["ownerId"], alice.id.as_str());
    assert_eq!(first["priority"], 3);
    assert_eq!(first["input"], json!({ "name": "cat" }));
    assert_eq!(first["timeout"], "600s");
    let step_runs = first["stepRuns"].as_array().expect("step runs");
    assert_eq!(step_runs.len(), 2);
    assert_eq!(step_runs[0]["stepKey"], "fetch");
    assert_eq!(step_runs[0]["status"], "QUEUED");
    assert_eq!(step_runs[0]["queuedAt"], first["createdAt"]);
    assert_eq!(step_runs[0]["input"], json!({ "name": "cat" }));
    assert_eq!(step_runs[0]["attempt"], 1);
    assert_eq!(step_runs[0]["maxAttempts"], 4);
    assert_eq!(step_runs[0]["agentId"], fetcher.as_str());
    assert_eq!(step_runs[1]["stepKey"], "shape");
    assert_eq!(step_runs[1]["status"], "PENDING");
    assert_eq!(step_runs[1]["maxAttempts"], 1);

    // With overrides.
    let (status, body) = api
        .post(
            &execute_path,
            &alice.auth(),
            json!({ "input": { "name": "dog", "n": 2 }, "priority": 9, "timeout": "30s" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let second_id = body["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(body["data"]["priority"], 9);
    assert_eq!(body["data"]["input"], json!({ "name": "dog", "n": 2 }));
    assert_eq!(body["data"]["timeout"], "30s");

    // The definition snapshot: the workflow and its agents as the API shows them.
    let stored = fixture
        .store
        .get_execution(OwnerScope::All, first_id.parse().expect("uuid"))
        .await
        .expect("stored execution");
    let definition = &stored.definition;
    assert_eq!(definition["workflow"]["id"], workflow_id.as_str());
    assert_eq!(definition["workflow"]["steps"][1]["dependsOn"], json!(["fetch"]));
    assert_eq!(definition["workflow"]["steps"][1]["inputMapping"], "{{steps.fetch.output}}");
    assert_eq!(definition["agents"][fetcher.as_str()]["name"], "fetcher");
    assert_eq!(definition["agents"][shaper.as_str()]["type"], "DATA");
    assert_eq!(definition["agents"][shaper.as_str()]["config"]["data"]["jqProgram"], ".");
    assert_eq!(definition["agents"].as_object().map(|agents| agents.len()), Some(2));
    assert!(stored.deadline_at.is_some(), "a timeout sets a deadline");

    // Bad input is refused and nothing is written.
    let (status, body) = api
        .post(
            &execute_path,
            &alice.auth(),
            json!({ "input": [1], "priority": 11, "timeout": "0s" }),
        )
        .await;
    let mut fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    fields.sort();
    assert_eq!(fields, vec!["input", "priority", "timeout"]);
    let (status, body) = api.post(&execute_path, &bob.auth(), json!({})).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // GET shows the step runs with their attempts.
    let (status, body) = api.get(&format!("/api/v1/executions/{first_id}"), &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["id"], first_id.as_str());
    let fetched_runs = body["data"]["stepRuns"].as_array().expect("step runs");
    assert_eq!(fetched_runs.len(), 2);
    assert_eq!(fetched_runs[0]["attempts"][0]["attempt"], 1);
    assert!(fetched_runs[0]["attempts"][0]["status"].is_string(), "the engine moves it on");
    assert_eq!(fetched_runs[1]["attempts"].as_array().map(Vec::len), Some(1));
    let (status, body) = api.get(&format!("/api/v1/executions/{first_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // Over gRPC too; three more executions make five.
    let mut workflows = WorkflowServiceClient::new(api.channel().await);
    let mut executions = ExecutionServiceClient::new(api.channel().await);
    let mut all_ids = vec![first_id.clone(), second_id.clone()];
    for priority in [4, 5, 6] {
        let execution = workflows
            .execute_workflow(grpc(
                ExecuteWorkflowRequest {
                    workflow_id: workflow_id.clone(),
                    priority,
                    input: Some(prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                            fields: [(
                                "n".to_owned(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::NumberValue(f64::from(
                                        priority,
                                    ))),
                                },
                            )]
                            .into(),
                        })),
                    }),
                    timeout: None,
                },
                &alice.auth(),
            ))
            .await
            .expect("execute over grpc")
            .into_inner()
            .execution
            .expect("execution");
        assert_eq!(execution.priority, priority);
        assert_eq!(execution.status, pb::ExecutionStatus::Running as i32);
        assert_eq!(execution.step_runs[0].status, pb::StepRunStatus::Queued as i32);
        assert_eq!(execution.step_runs.len(), 2);
        all_ids.push(execution.id);
    }
    let refused = workflows
        .execute_workflow(grpc(
            ExecuteWorkflowRequest {
                workflow_id: workflow_id.clone(),
                input: Some(prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue("text".to_owned())),
                }),
                ..Default::default()
            },
            &alice.auth(),
        ))
        .await
        .expect_err("input must be an object");
    assert_eq!(violated_fields(&refused), vec!["input"]);
    all_ids.reverse(); // newest first

    // Numbered pages, with a cursor to go on from; then cursor pages to the end.
    let (status, body) = api.get("/api/v1/executions?pageSize=2", &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(item_values(&body, "id"), all_ids[..2].to_vec());
    assert_eq!(body["meta"]["pagination"]["total"], 5);
    assert_eq!(body["meta"]["pagination"]["totalPages"], 3);
    assert_eq!(body["data"][0]["stepRuns"], json!([]), "lists leave the step runs out");
    let mut cursor = body["meta"]["pagination"]["nextCursor"].as_str().expect("cursor").to_owned();
    assert!(!cursor.is_empty());
    let mut seen = item_values(&body, "id");
    while !cursor.is_empty() {
        let (status, body) =
            api.get(&format!("/api/v1/executions?pageSize=2&cursor={cursor}"), &alice.auth()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["meta"]["pagination"]["page"], 0);
        seen.extend(item_values(&body, "id"));
        cursor = body["meta"]["pagination"]["nextCursor"].as_str().unwrap_or_default().to_owned();
    }
    assert_eq!(seen, all_ids, "cursor pages continue without gaps or repeats");
    let (_, body) = api.get("/api/v1/executions?page=3&pageSize=2", &alice.auth()).await;
    assert_eq!(item_values(&body, "id"), all_ids[4..].to_vec());
    assert_eq!(body["meta"]["pagination"]["nextCursor"], "", "the last page has no cursor");
    let (status, body) =
        api.get("/api/v1/executions?cursor=not-a-cursor&page=2", &alice.auth()).await;
    let mut fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    fields.sort();
    assert_eq!(fields, vec!["cursor", "page"]);
    let (status, body) =
        api.get("/api/v1/executions?workflowId=nope&pageSize=0", &alice.auth()).await;
    let mut fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    fields.sort();
    assert_eq!(fields, vec!["pageSize", "workflowId"]);

    // Filters, and the workflow's own list.
    let (_, body) =
        api.get(&format!("/api/v1/executions?workflowId={workflow_id}"), &alice.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 5);
    let (_, body) = api
        .get(&format!("/api/v1/executions?workflowId={}", uuid::Uuid::new_v4()), &alice.auth())
        .await;
    assert!(items(&body).is_empty(), "{body}");
    let (_, body) = api.get("/api/v1/executions?status=SUCCEEDED", &alice.auth()).await;
    assert!(items(&body).is_empty(), "{body}");
    let (status, body) = api
        .get(&format!("/api/v1/workflows/{workflow_id}/executions?pageSize=3"), &alice.auth())
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(item_values(&body, "id"), all_ids[..3].to_vec());
    let (status, body) =
        api.get(&format!("/api/v1/workflows/{workflow_id}/executions"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (_, body) = api.get("/api/v1/executions", &bob.auth()).await;
    assert!(items(&body).is_empty(), "another user's executions are not listed: {body}");
    let page = executions
        .list_executions(grpc(
            ListExecutionsRequest {
                page_size: Some(10),
                status: pb::ExecutionStatus::Running as i32,
                ..Default::default()
            },
            &alice.auth(),
        ))
        .await
        .expect("list over grpc")
        .into_inner();
    let grpc_ids: Vec<String> =
        page.executions.iter().map(|execution| execution.id.clone()).collect();
    assert_eq!(grpc_ids, all_ids);

    cancel_and_logs(&fixture, &first_id, &second_id, &mut executions).await;

    // The audit trail has the starts and the cancel with their request ids.
    let rows = audit_rows(fixture.store.as_ref()).await;
    let started = rows
        .iter()
        .find(|row| {
            row.action == "workflow.execute" && row.resource_id.as_deref() == Some(&first_id)
        })
        .expect("execute row");
    assert_eq!(started.request_id.as_deref(), Some(execute_request_id.as_str()));
    assert_eq!(started.metadata["workflowId"], workflow_id.as_str());
    assert_eq!(rows.iter().filter(|row| row.action == "workflow.execute").count(), 5);
    let cancels: Vec<_> = rows.iter().filter(|row| row.action == "execution.cancel").collect();
    assert_eq!(cancels.len(), 2, "one row per recorded cancel, none for refused ones");
    assert!(cancels.iter().all(|row| row.request_id.is_some()));
    assert_eq!(cancels[0].resource_id.as_deref(), Some(first_id.as_str()));
    assert_eq!(cancels[0].metadata["reason"], "no longer needed");
}

async fn cancel_and_logs(
    fixture: &Fixture,
    first_id: &str,
    second_id: &str,
    executions: &mut ExecutionServiceClient<tonic::transport::Channel>,
) {
    let (api, alice, bob) = (&fixture.api, &fixture.alice, &fixture.bob);
    let cancel_path = format!("/api/v1/executions/{first_id}/cancel");
    let (status, body) = api.post(&cancel_path, &bob.auth(), json!({})).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) =
        api.post(&cancel_path, &alice.auth(), json!({ "reason": "no longer needed" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["status"], "CANCELLED");
    assert!(
        body["data"]["error"].as_str().is_some_and(|error| error.contains("no longer needed")),
        "{body}"
    );
    assert!(body["data"]["finishedAt"].is_string(), "{body}");
    let runs = body["data"]["stepRuns"].as_array().expect("step runs");
    assert!(runs.iter().all(|run| run["status"] == "CANCELLED"), "{body}");
    assert!(runs.iter().all(|run| run["attempts"][0]["status"] == "CANCELLED"), "{body}");

    // A finished execution cannot be cancelled again.
    let (status, body) = api.post(&cancel_path, &alice.auth(), json!({})).await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(
        body["error"]["message"].as_str().is_some_and(|text| text.contains("CANCELLED")),
        "{body}"
    );
    let (_, body) = api.get("/api/v1/executions?status=CANCELLED", &alice.auth()).await;
    assert_eq!(item_values(&body, "id"), vec![first_id.to_owned()]);

    // Over gRPC: cancel the second; again is a conflict naming its status.
    let cancelled = executions
        .cancel_execution(grpc(
            CancelExecutionRequest { execution_id: second_id.to_owned(), reason: String::new() },
            &alice.auth(),
        ))
        .await
        .expect("cancel over grpc")
        .into_inner()
        .execution
        .expect("execution");
    assert_eq!(cancelled.status, pb::ExecutionStatus::Cancelled as i32);
    let again = executions
        .cancel_execution(grpc(
            CancelExecutionRequest { execution_id: second_id.to_owned(), reason: String::new() },
            &alice.auth(),
        ))
        .await
        .expect_err("already finished");
    assert_eq!(again.code(), tonic::Code::Aborted);
    assert_eq!(error_metadata(&again, "status").as_deref(), Some("CANCELLED"));
    let hidden = executions
        .get_execution(grpc(
            GetExecutionRequest { execution_id: second_id.to_owned() },
            &bob.auth(),
        ))
        .await
        .expect_err("another user's execution");
    assert_eq!(hidden.code(), tonic::Code::NotFound);

    // Logs: the cancel line, then lines of a step, cursor-paged oldest first.
    let execution_id: uuid::Uuid = first_id.parse().expect("uuid");
    let step_run = fixture
        .store
        .list_step_runs(execution_id)
        .await
        .expect("step runs")
        .into_iter()
        .next()
        .expect("a step run");
    let lines: Vec<NewExecutionLog> = (0..5)
        .map(|number| NewExecutionLog {
            execution_id,
            step_run_id: Some(step_run.id),
            attempt: Some(1),
            level: if number % 2 == 0 { ExecutionLogLevel::Info } else { ExecutionLogLevel::Error },
            source: ExecutionLogSource::Stdout,
            message: format!("line {number}"),
            fields: Some(json!({ "number": number })),
            created_at: Utc::now(),
        })
        .collect();
    fixture.store.append_execution_logs(lines).await.expect("append logs");
    let logs_path = format!("/api/v1/executions/{first_id}/logs");
    let mut messages = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) =
            api.get(&format!("{logs_path}?pageSize=2&cursor={cursor}"), &alice.auth()).await;
        assert_eq!(status, 200, "{body}");
        messages.extend(item_values(&body, "message"));
        cursor = body["meta"]["pagination"]["nextCursor"].as_str().unwrap_or_default().to_owned();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(messages.len(), 6, "{messages:?}");
    assert!(messages[0].contains("no longer needed"), "{messages:?}");
    assert_eq!(messages[1..], ["line 0", "line 1", "line 2", "line 3", "line 4"]);
    let (_, body) = api.get(&format!("{logs_path}?minLevel=ERROR"), &alice.auth()).await;
    assert_eq!(item_values(&body, "message"), vec!["line 1", "line 3"]);
    assert_eq!(body["data"][0]["stepKey"], "fetch");
    assert_eq!(body["data"][0]["source"], "STDOUT");
    let (status, body) = api.get(&format!("{logs_path}?cursor=abc"), &alice.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["cursor"]);
    let (status, body) = api.get(&logs_path, &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.get(&logs_path, &Auth::None).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");
    let by_step = executions
        .list_execution_logs(grpc(
            ListExecutionLogsRequest {
                execution_id: first_id.to_owned(),
                step_run_id: step_run.id.to_string(),
                page_size: Some(1000),
                ..Default::default()
            },
            &alice.auth(),
        ))
        .await
        .expect("logs over grpc")
        .into_inner();
    assert_eq!(by_step.logs.len(), 5, "only the step's lines");
    assert!(by_step.pagination.expect("pagination").next_cursor.is_empty());
    let distinct: HashSet<i64> = by_step.logs.iter().map(|log| log.id).collect();
    assert_eq!(distinct.len(), 5);
    let fields_value: Value = by_step.logs[4]
        .fields
        .as_ref()
        .map(|fields| json!(fields.fields.len()))
        .unwrap_or(Value::Null);
    assert_eq!(fields_value, json!(1));
}
