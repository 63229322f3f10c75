//! DeploymentService over REST and gRPC: the three triggers and their checks, start and stop
//! with their conflicts, the merged log newest first, lists, optimistic locking, ownership and
//! the audit trail (which never holds a webhook secret).

use chrono::{Duration, Utc};
use prost_types::FieldMask;
use serde_json::{Value, json};
use tonic::Code;
use turbocat::proto::v1::deployment_service_client::DeploymentServiceClient;
use turbocat::proto::v1::{
    CreateDeploymentRequest, Deployment, DeploymentStatus, DeploymentTrigger, GetDeploymentRequest,
    ListDeploymentLogsRequest, ListDeploymentsRequest, StartDeploymentRequest,
    StopDeploymentRequest, TriggerType, UpdateDeploymentRequest,
};
use turbocat::store::{
    ExecutionLogLevel, ExecutionLogSource, ExecutionTrigger, NewExecution, NewExecutionLog,
};

use crate::Installation;
use crate::support::api::{
    Account, Api, assert_error, audit_rows, error_metadata, grpc, violated_fields,
};

async fn create_agent(api: &Api, owner: &Account, name: &str) -> String {
    let (status, body) = api
        .post(
            "/api/v1/agents",
            &owner.auth(),
            json!({ "name": name, "type": "DATA", "config": { "data": { "jqProgram": "." } } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["data"]["id"].as_str().expect("agent id").to_owned()
}

async fn create_workflow(api: &Api, owner: &Account, name: &str, agent_id: &str) -> String {
    let (status, body) = api
        .post(
            "/api/v1/workflows",
            &owner.auth(),
            json!({ "name": name, "steps": [{ "key": "a", "name": "A", "agentId": agent_id }] }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["data"]["id"].as_str().expect("workflow id").to_owned()
}

fn data(body: &Value) -> &Value {
    &body["data"]
}

async fn deployments_end_to_end(installation: Installation) {
    let Installation { api, store, admin, ann, bob, .. } = &installation;
    let mut client = DeploymentServiceClient::new(api.channel().await);
    let agent_id = create_agent(api, ann, "Worker").await;
    let workflow_id = create_workflow(api, ann, "Flow", &agent_id).await;
    let bob_agent = create_agent(api, bob, "Bob's").await;
    let bob_workflow = create_workflow(api, bob, "Bob's flow", &bob_agent).await;

    // MANUAL on a workflow, over REST.
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({
                "name": "Manual flow",
                "description": "by hand",
                "workflowId": workflow_id,
                "environment": "STAGING",
                "config": { "inputDefaults": { "region": "eu" }, "environmentValues": { "API_URL": "https://x" } },
                "trigger": { "type": "MANUAL" },
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let manual = data(&body).clone();
    let manual_id = manual["id"].as_str().expect("id").to_owned();
    assert_eq!(manual["status"], "STOPPED");
    assert_eq!(manual["version"], 1);
    assert_eq!(manual["ownerId"], ann.id);
    assert_eq!(manual["environment"], "STAGING");
    assert_eq!(manual["workflowId"], workflow_id);
    assert_eq!(manual["agentId"], "");
    assert_eq!(manual["trigger"]["type"], "MANUAL");
    assert_eq!(manual["config"]["inputDefaults"]["region"], "eu");
    assert_eq!(manual["config"]["environmentValues"]["API_URL"], "https://x");
    assert!(manual["nextRunAt"].is_null(), "{manual}");

    // CRON on an agent, over gRPC.
    let cron = client
        .create_deployment(grpc(
            CreateDeploymentRequest {
                deployment: Some(Deployment {
                    name: "Every five minutes".to_owned(),
                    agent_id: agent_id.clone(),
                    environment: turbocat::proto::v1::DeploymentEnvironment::Production.into(),
                    trigger: Some(DeploymentTrigger {
                        r#type: TriggerType::Cron.into(),
                        cron_expression: "*/5 * * * *".to_owned(),
                        timezone: "Europe/Paris".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            &ann.auth(),
        ))
        .await
        .expect("create a cron deployment")
        .into_inner()
        .deployment
        .expect("deployment");
    let cron_id = cron.id.clone();
    assert_eq!(cron.status, i32::from(DeploymentStatus::Stopped));
    let cron_trigger = cron.trigger.clone().expect("trigger");
    assert_eq!(cron_trigger.timezone, "Europe/Paris");
    assert!(cron.next_run_at.is_none(), "scheduled only when started");

    // WEBHOOK: a generated secret, shown to the owner only.
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({ "name": "Hook", "agentId": agent_id, "trigger": { "type": "WEBHOOK" } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let webhook_id = data(&body)["id"].as_str().expect("id").to_owned();
    let secret = data(&body)["trigger"]["webhookSecret"].as_str().expect("secret").to_owned();
    assert_eq!(secret.len(), 64, "{body}");
    assert!(secret.chars().all(|character| character.is_ascii_hexdigit()));
    assert_eq!(data(&body)["trigger"]["webhookPath"], format!("/api/v1/webhooks/{webhook_id}"));
    assert_eq!(data(&body)["environment"], "DEVELOPMENT", "the default environment");
    let (_, body) = api.get(&format!("/api/v1/deployments/{webhook_id}"), &ann.auth()).await;
    assert_eq!(data(&body)["trigger"]["webhookSecret"], secret);
    let (status, body) = api.get(&format!("/api/v1/deployments/{webhook_id}"), &admin.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body)["trigger"]["webhookSecret"], "", "not the owner: {body}");

    // Bad input names every field and writes nothing.
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({ "name": "Bad", "agentId": agent_id,
                    "trigger": { "type": "CRON", "cronExpression": "61 * * * *", "timezone": "Mars/Base" } }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["trigger.cronExpression", "trigger.timezone"], "{body}");
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({ "name": "Bad", "agentId": agent_id, "trigger": { "type": "CRON", "cronExpression": "* * *" } }),
        )
        .await;
    assert_eq!(
        assert_error(status, &body, 400, "VALIDATION_ERROR"),
        vec!["trigger.cronExpression"]
    );
    assert!(body["error"]["message"].as_str().expect("message").contains("5 fields"), "{body}");
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({ "name": "", "agentId": agent_id, "workflowId": workflow_id,
                    "config": { "environmentValues": { "1BAD": "x" } } }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(
        fields,
        vec!["name", "agentId", "config.environmentValues.1BAD", "trigger"],
        "{body}"
    );
    let (status, body) = api
        .post(
            "/api/v1/deployments",
            &ann.auth(),
            json!({ "name": "Not mine", "workflowId": bob_workflow, "trigger": { "type": "MANUAL" } }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["workflowId"]);
    let status = client
        .create_deployment(grpc(
            CreateDeploymentRequest {
                deployment: Some(Deployment {
                    name: "Ghost".to_owned(),
                    agent_id: uuid::Uuid::new_v4().to_string(),
                    environment: 42,
                    trigger: Some(DeploymentTrigger {
                        r#type: TriggerType::Manual.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("bad environment");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), vec!["environment"]);
    let status = client
        .create_deployment(grpc(
            CreateDeploymentRequest {
                deployment: Some(Deployment {
                    name: "Ghost".to_owned(),
                    agent_id: uuid::Uuid::new_v4().to_string(),
                    trigger: Some(DeploymentTrigger {
                        r#type: TriggerType::Manual.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("no such agent");
    assert_eq!(violated_fields(&status), vec!["agentId"]);
    let (_, body) = api.get("/api/v1/deployments", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 3, "nothing was written: {body}");

    // Start and stop, with conflicts.
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{manual_id}/start"), &ann.auth(), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body)["status"], "RUNNING");
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{manual_id}/start"), &ann.auth(), json!({})).await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(body["error"]["message"].as_str().expect("message").contains("RUNNING"), "{body}");
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{manual_id}/stop"), &ann.auth(), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body)["status"], "STOPPED");
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{manual_id}/stop"), &ann.auth(), json!({})).await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(body["error"]["message"].as_str().expect("message").contains("STOPPED"), "{body}");
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{manual_id}/start"), &bob.auth(), json!({})).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    let before_start = Utc::now();
    let started = client
        .start_deployment(grpc(
            StartDeploymentRequest { deployment_id: cron_id.clone() },
            &ann.auth(),
        ))
        .await
        .expect("start the cron deployment")
        .into_inner()
        .deployment
        .expect("deployment");
    assert_eq!(started.status, i32::from(DeploymentStatus::Running));
    let next_run = started.next_run_at.expect("a next run");
    let next_run = chrono::DateTime::from_timestamp(next_run.seconds, 0).expect("time");
    assert!(
        next_run > before_start && next_run <= before_start + Duration::minutes(5),
        "{next_run}"
    );
    assert_eq!(next_run.timestamp() % 300, 0, "on a five-minute boundary: {next_run}");
    let status = client
        .start_deployment(grpc(
            StartDeploymentRequest { deployment_id: cron_id.clone() },
            &ann.auth(),
        ))
        .await
        .expect_err("already running");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_metadata(&status, "status").as_deref(), Some("RUNNING"));

    // Lists and their filters.
    let (_, body) = api.get("/api/v1/deployments?status=RUNNING", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    assert_eq!(data(&body)[0]["id"], cron_id);
    let (_, body) = api.get("/api/v1/deployments?environment=STAGING", &ann.auth()).await;
    assert_eq!(data(&body)[0]["id"], manual_id, "{body}");
    let (_, body) = api.get("/api/v1/deployments?triggerType=WEBHOOK", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    let (_, body) =
        api.get(&format!("/api/v1/deployments?agentId={agent_id}&sort=name"), &ann.auth()).await;
    let names: Vec<&str> =
        data(&body).as_array().expect("list").iter().filter_map(|d| d["name"].as_str()).collect();
    assert_eq!(names, vec!["Every five minutes", "Hook"], "{body}");
    let (_, body) =
        api.get(&format!("/api/v1/deployments?workflowId={workflow_id}"), &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    let (_, body) = api.get("/api/v1/deployments?search=HOO", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    let (_, body) =
        api.get("/api/v1/deployments?pageSize=2&page=2&sort=-createdAt", &ann.auth()).await;
    assert_eq!(data(&body).as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["meta"]["pagination"]["totalPages"], 2);
    let (status, body) = api.get("/api/v1/deployments?agentId=nope&sort=owner", &ann.auth()).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["sort", "agentId"], "{body}");
    let (_, body) = api.get("/api/v1/deployments", &bob.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 0, "{body}");
    let listed = client
        .list_deployments(grpc(
            ListDeploymentsRequest { trigger_type: TriggerType::Cron.into(), ..Default::default() },
            &ann.auth(),
        ))
        .await
        .expect("list over grpc")
        .into_inner();
    assert_eq!(listed.deployments.len(), 1);
    assert_eq!(listed.deployments[0].id, cron_id);

    // Changes with optimistic locking; a webhook keeps its secret.
    let (status, body) = api
        .patch(
            &format!("/api/v1/deployments/{webhook_id}"),
            &ann.auth(),
            json!({ "name": "Hook v2", "environment": "PRODUCTION", "version": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(data(&body)["version"], 2);
    assert_eq!(data(&body)["name"], "Hook v2");
    assert_eq!(data(&body)["environment"], "PRODUCTION");
    assert_eq!(data(&body)["trigger"]["webhookSecret"], secret, "the secret stays");
    let (status, body) = api
        .patch(
            &format!("/api/v1/deployments/{webhook_id}"),
            &ann.auth(),
            json!({ "name": "Late", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    assert!(
        body["error"]["details"]
            .as_array()
            .expect("details")
            .iter()
            .any(|d| d["currentVersion"] == 2),
        "{body}"
    );
    let (status, body) = api
        .patch(
            &format!("/api/v1/deployments/{webhook_id}"),
            &ann.auth(),
            json!({ "status": "RUNNING", "trigger": { "type": "CRON", "cronExpression": "bad" }, "version": 2 }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["status", "trigger.cronExpression"], "{body}");
    // A running deployment whose trigger becomes a cron schedule is scheduled at once.
    let updated = client
        .update_deployment(grpc(
            UpdateDeploymentRequest {
                deployment: Some(Deployment {
                    id: cron_id.clone(),
                    version: cron.version,
                    trigger: Some(DeploymentTrigger {
                        r#type: TriggerType::Cron.into(),
                        cron_expression: "0 0 12 1 1 *".to_owned(),
                        timezone: "Asia/Tokyo".to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["trigger".to_owned()] }),
            },
            &ann.auth(),
        ))
        .await
        .expect("update over grpc")
        .into_inner()
        .deployment
        .expect("deployment");
    assert_eq!(updated.version, 2);
    let next_run = updated.next_run_at.expect("rescheduled");
    let next_run = chrono::DateTime::from_timestamp(next_run.seconds, 0).expect("time");
    assert_eq!(next_run.format("%m-%d %H:%M:%S").to_string(), "01-01 03:00:00", "{next_run}");
    let status = client
        .update_deployment(grpc(
            UpdateDeploymentRequest {
                deployment: Some(Deployment {
                    id: cron_id.clone(),
                    version: 1,
                    name: "x".to_owned(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["name".to_owned()] }),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("stale");
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(error_metadata(&status, "currentVersion").as_deref(), Some("2"));
    let stopped = client
        .stop_deployment(grpc(
            StopDeploymentRequest { deployment_id: cron_id.clone() },
            &ann.auth(),
        ))
        .await
        .expect("stop")
        .into_inner()
        .deployment
        .expect("deployment");
    assert!(stopped.next_run_at.is_none(), "unscheduled");

    // The log: lifecycle events and execution lines, newest first, a page at a time.
    let owner = Installation::user_id(ann);
    let mut new_execution = NewExecution::new(owner, ExecutionTrigger::Manual, json!({}));
    new_execution.deployment_id = Some(manual_id.parse().expect("id"));
    new_execution.workflow_id = Some(workflow_id.parse().expect("id"));
    let (execution, _) =
        store.create_execution(new_execution, Vec::new()).await.expect("execution");
    let later = Utc::now() + Duration::seconds(5);
    let line = |message: &str, offset: i64, level| NewExecutionLog {
        execution_id: execution.id,
        step_run_id: None,
        attempt: None,
        level,
        source: ExecutionLogSource::System,
        message: message.to_owned(),
        fields: None,
        created_at: later + Duration::seconds(offset),
    };
    store
        .append_execution_logs(vec![
            line("first line", 0, ExecutionLogLevel::Info),
            line("second line", 1, ExecutionLogLevel::Error),
        ])
        .await
        .expect("log lines");
    let (status, body) =
        api.get(&format!("/api/v1/deployments/{manual_id}/logs"), &ann.auth()).await;
    assert_eq!(status, 200, "{body}");
    let summary: Vec<(String, String, String)> = data(&body)
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| {
            (
                entry["kind"].as_str().unwrap_or_default().to_owned(),
                entry["event"].as_str().unwrap_or_default().to_owned(),
                entry["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("EXECUTION", "", "second line"),
        ("EXECUTION", "", "first line"),
        ("LIFECYCLE", "STOPPED", "stopped"),
        ("LIFECYCLE", "STARTED", "started"),
    ]
    .iter()
    .map(|(kind, event, message)| ((*kind).to_owned(), (*event).to_owned(), (*message).to_owned()))
    .collect();
    assert_eq!(summary[..4], expected[..], "{body}");
    assert_eq!(summary.last().map(|entry| entry.1.as_str()), Some("CREATED"), "{body}");
    assert_eq!(data(&body)[0]["executionId"], execution.id.to_string());
    assert_eq!(data(&body)[0]["level"], "ERROR");
    let total = body["meta"]["pagination"]["total"].as_i64().expect("total");
    assert_eq!(total, 5, "{body}");
    let page = client
        .list_deployment_logs(grpc(
            ListDeploymentLogsRequest {
                deployment_id: manual_id.clone(),
                page: Some(2),
                page_size: Some(2),
            },
            &ann.auth(),
        ))
        .await
        .expect("logs over grpc")
        .into_inner();
    let events: Vec<&str> = page.entries.iter().map(|entry| entry.event.as_str()).collect();
    assert_eq!(events, vec!["STOPPED", "STARTED"]);
    assert_eq!(page.pagination.expect("pagination").total_pages, 3);
    let (status, body) =
        api.get(&format!("/api/v1/deployments/{manual_id}/logs"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) =
        api.get(&format!("/api/v1/deployments/{manual_id}/logs?pageSize=0"), &ann.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["pageSize"]);

    // Deleting, with the version checked; then it is gone for everyone.
    let (status, body) = api.get(&format!("/api/v1/deployments/{manual_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&format!("/api/v1/deployments/{manual_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/deployments/{webhook_id}?version=1"),
            &ann.auth(),
            None,
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/deployments/{webhook_id}?version=2"),
            &ann.auth(),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&format!("/api/v1/deployments/{webhook_id}"), &ann.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let status = client
        .get_deployment(grpc(
            GetDeploymentRequest { deployment_id: webhook_id.clone() },
            &ann.auth(),
        ))
        .await
        .expect_err("deleted");
    assert_eq!(status.code(), Code::NotFound);

    // The audit trail, without the webhook secret.
    let rows = audit_rows(store.as_ref()).await;
    let actions_on = |id: &str| -> Vec<String> {
        rows.iter()
            .filter(|row| row.resource_id.as_deref() == Some(id))
            .map(|row| row.action.clone())
            .collect()
    };
    assert_eq!(
        actions_on(&manual_id),
        vec!["deployment.create", "deployment.start", "deployment.stop"]
    );
    assert_eq!(
        actions_on(&cron_id),
        vec!["deployment.create", "deployment.start", "deployment.update", "deployment.stop"]
    );
    assert_eq!(
        actions_on(&webhook_id),
        vec!["deployment.create", "deployment.update", "deployment.delete"]
    );
    for row in &rows {
        let text = format!("{:?} {:?}", row.changes, row.metadata);
        assert!(!text.contains(&secret), "an audit row holds the secret: {text}");
    }
    let update = rows
        .iter()
        .find(|row| {
            row.action == "deployment.update"
                && row.resource_id.as_deref() == Some(webhook_id.as_str())
        })
        .expect("update row");
    let changes = update.changes.as_ref().expect("changes");
    assert_eq!(changes["before"]["name"], "Hook");
    assert_eq!(changes["after"]["name"], "Hook v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_on_dev() {
    deployments_end_to_end(Installation::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_on_serve() {
    deployments_end_to_end(Installation::serve().await).await;
}
