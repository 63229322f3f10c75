//! An agent a live workflow uses cannot be deleted (409 naming the workflows); once the
//! workflow is gone it can. WORKFLOW agents point at a workflow their owner can see.

use serde_json::json;
use turbocat::proto::v1::DeleteAgentRequest;
use turbocat::store::OwnerScope;

use crate::harness::{Server, code_agent, error_facts, on_both_backends};
use crate::support::api::{assert_error, grpc};

on_both_backends!(an_agent_in_use_is_not_deleted);

async fn an_agent_in_use_is_not_deleted(server: Server) {
    let api = &server.api;
    let _admin = api.register("root@example.com", "Root").await;
    let alice = api.register("alice@example.com", "Alice").await;
    let agent = server.create_agent(&alice.auth(), code_agent("Worker")).await;
    let agent_id = agent["id"].as_str().expect("id").to_owned();
    let nightly = server.workflow_using(&alice.id, "Nightly report", &agent_id).await;
    let weekly = server.workflow_using(&alice.id, "Weekly digest", &agent_id).await;
    let path = format!("/api/v1/agents/{agent_id}");

    let (status, body) = api.delete(&path, &alice.auth()).await;
    assert_error(status, &body, 409, "CONFLICT");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("Nightly report") && message.contains("Weekly digest"), "{message}");
    let used_by = error_facts(&body)["usedBy"].as_str().expect("usedBy").to_owned();
    assert!(used_by.contains(&nightly.workflow.id.to_string()), "{body}");
    assert!(used_by.contains(&weekly.workflow.id.to_string()), "{body}");

    let mut agents = server.agents().await;
    let refused = agents
        .delete_agent(grpc(
            DeleteAgentRequest { agent_id: agent_id.clone(), version: 1 },
            &alice.auth(),
        ))
        .await
        .expect_err("in use");
    assert_eq!(refused.code(), tonic::Code::Aborted);
    assert!(refused.message().contains("Nightly report"), "{refused:?}");
    let (status, body) = api.get(&path, &alice.auth()).await;
    assert_eq!(status, 200, "the agent is still there: {body}");
    assert!(server.audit_rows_of("agent.delete").await.is_empty());

    // A WORKFLOW agent may point at Alice's own live workflow.
    let (status, body) = api
        .post(
            "/api/v1/agents",
            &alice.auth(),
            json!({ "name": "Sub-flow", "type": "WORKFLOW",
                    "config": { "workflow": { "workflowId": nightly.workflow.id.to_string() } } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["config"]["workflow"]["workflowId"], nightly.workflow.id.to_string());

    // Once no live workflow uses it, the agent goes.
    for workflow in [&nightly, &weekly] {
        server
            .store
            .soft_delete_workflow(OwnerScope::All, workflow.workflow.id, None)
            .await
            .expect("delete workflow");
    }
    let (status, body) = api
        .post(
            "/api/v1/agents",
            &alice.auth(),
            json!({ "name": "Dangling", "type": "WORKFLOW",
                    "config": { "workflow": { "workflowId": nightly.workflow.id.to_string() } } }),
        )
        .await;
    assert_eq!(
        assert_error(status, &body, 400, "VALIDATION_ERROR"),
        vec!["config.workflow.workflowId"],
        "a deleted workflow cannot be referenced"
    );
    agents
        .delete_agent(grpc(
            DeleteAgentRequest { agent_id: agent_id.clone(), version: 1 },
            &alice.auth(),
        ))
        .await
        .expect("delete once unused");
    let (status, body) = api.get(&path, &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    assert_eq!(server.audit_rows_of("agent.delete").await.len(), 1);
}
