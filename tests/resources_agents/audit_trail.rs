//! GET /audit-logs: administrators read the trail with filters and cursor pages; users and
//! runner keys are refused.

use serde_json::Value;
use turbocat::proto::v1::{self as pb, ListAuditLogsRequest};

use crate::harness::{Server, code_agent, on_both_backends};
use crate::support::api::{Auth, assert_error, grpc, violated_fields};

on_both_backends!(administrators_read_the_trail_and_no_one_else);

fn actions(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|row| row["action"].as_str().map(str::to_owned))
        .collect()
}

async fn administrators_read_the_trail_and_no_one_else(server: Server) {
    let api = &server.api;
    let admin = api.register("root@example.com", "Root").await;
    let alice = api.register("alice@example.com", "Alice").await;
    let agent = server.create_agent(&alice.auth(), code_agent("Audited")).await;
    let agent_id = agent["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/agents/{agent_id}");
    let (status, updated) = api
        .patch(&path, &alice.auth(), serde_json::json!({ "name": "Audited 2", "version": 1 }))
        .await;
    assert_eq!(status, 200, "{updated}");
    let update_request_id = updated["meta"]["requestId"].as_str().expect("request id").to_owned();
    let (status, _) = api.delete(&path, &alice.auth()).await;
    assert_eq!(status, 200);
    let other = server.create_agent(&admin.auth(), code_agent("Admin's")).await;

    // Everything, newest first.
    let (status, body) = api.get("/api/v1/audit-logs", &admin.auth()).await;
    assert_eq!(status, 200, "{body}");
    let all = actions(&body);
    assert_eq!(all[0], "agent.create", "newest first: {all:?}");
    assert!(all.contains(&"auth.register".to_owned()), "other areas' rows are there too: {all:?}");

    // Filters: an action prefix, an exact action, a resource, an actor, a time range.
    let (_, body) = api.get("/api/v1/audit-logs?action=agent.", &admin.auth()).await;
    assert_eq!(
        actions(&body),
        vec!["agent.create", "agent.delete", "agent.update", "agent.create"]
    );
    let (_, body) = api
        .get(&format!("/api/v1/audit-logs?resourceType=agent&resourceId={agent_id}"), &admin.auth())
        .await;
    assert_eq!(actions(&body), vec!["agent.delete", "agent.update", "agent.create"]);
    let update = &body["data"][1];
    assert_eq!(update["actorId"], alice.id.as_str());
    assert_eq!(update["actorKind"], "USER");
    assert_eq!(update["outcome"], "SUCCESS");
    assert_eq!(update["resourceType"], "agent");
    assert_eq!(update["requestId"], update_request_id.as_str());
    assert_eq!(update["changes"]["before"]["name"], "Audited");
    assert_eq!(update["changes"]["after"]["name"], "Audited 2");
    let (_, body) = api
        .get(&format!("/api/v1/audit-logs?action=agent.create&actorId={}", admin.id), &admin.auth())
        .await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["data"][0]["resourceId"], other["id"]);
    let (_, body) =
        api.get("/api/v1/audit-logs?startTime=2999-01-01T00:00:00Z", &admin.auth()).await;
    assert_eq!(actions(&body), Vec::<String>::new());
    let (_, body) = api
        .get("/api/v1/audit-logs?startTime=2000-01-01T00:00:00Z&endTime=2999-01-01T00:00:00Z&action=agent.update", &admin.auth())
        .await;
    assert_eq!(actions(&body), vec!["agent.update"]);

    // Cursor pages walk the same rows, one at a time, and end.
    let mut walked = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, body) = api
            .get(
                &format!("/api/v1/audit-logs?action=agent.&pageSize=1&cursor={cursor}"),
                &admin.auth(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["meta"]["pagination"]["pageSize"], 1);
        walked.extend(actions(&body));
        cursor = body["meta"]["pagination"]["nextCursor"].as_str().expect("cursor").to_owned();
        if cursor.is_empty() {
            break;
        }
        assert!(walked.len() <= 4, "the pages end");
    }
    assert_eq!(walked, vec!["agent.create", "agent.delete", "agent.update", "agent.create"]);

    // Bad filters are named.
    let (status, body) = api
        .get("/api/v1/audit-logs?pageSize=0&actorId=someone&startTime=2020-01-02T00:00:00Z&endTime=2020-01-01T00:00:00Z", &admin.auth())
        .await;
    assert_eq!(
        assert_error(status, &body, 400, "VALIDATION_ERROR"),
        vec!["pageSize", "actorId", "endTime"]
    );
    let (status, body) = api.get("/api/v1/audit-logs?cursor=bm90LWEtY3Vyc29y", &admin.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["cursor"]);
    let (status, body) = api.get("/api/v1/audit-logs?pageSize=101", &admin.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["pageSize"]);

    // Users and runner keys may not read it.
    let (status, body) = api.get("/api/v1/audit-logs", &alice.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (runner_key, _) = api.create_key(&admin.auth(), "runner", &["RUNNER"]).await;
    let (status, body) = api.get("/api/v1/audit-logs", &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.get("/api/v1/audit-logs", &Auth::None).await;
    assert_error(status, &body, 401, "UNAUTHORIZED");

    // gRPC: the same rows and the same refusals.
    let mut audit_logs = server.audit_logs().await;
    let listed = audit_logs
        .list_audit_logs(grpc(
            ListAuditLogsRequest {
                resource_id: agent_id.clone(),
                action: "agent.".into(),
                page_size: Some(2),
                ..Default::default()
            },
            &admin.auth(),
        ))
        .await
        .expect("list")
        .into_inner();
    let listed_actions: Vec<&str> =
        listed.audit_logs.iter().map(|row| row.action.as_str()).collect();
    assert_eq!(listed_actions, vec!["agent.delete", "agent.update"]);
    assert_eq!(listed.audit_logs[1].actor_kind, i32::from(pb::ActorKind::User));
    let next_cursor = listed.pagination.expect("pagination").next_cursor;
    assert!(!next_cursor.is_empty());
    let rest = audit_logs
        .list_audit_logs(grpc(
            ListAuditLogsRequest {
                resource_id: agent_id.clone(),
                cursor: next_cursor,
                page_size: Some(2),
                ..Default::default()
            },
            &admin.auth(),
        ))
        .await
        .expect("next page")
        .into_inner();
    let rest_actions: Vec<&str> = rest.audit_logs.iter().map(|row| row.action.as_str()).collect();
    assert_eq!(rest_actions, vec!["agent.create"]);
    assert_eq!(rest.pagination.map(|page| page.next_cursor), Some(String::new()));
    let refused = audit_logs
        .list_audit_logs(grpc(ListAuditLogsRequest::default(), &alice.auth()))
        .await
        .expect_err("a user");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let bad = audit_logs
        .list_audit_logs(grpc(
            ListAuditLogsRequest { actor_id: "x".into(), ..Default::default() },
            &admin.auth(),
        ))
        .await
        .expect_err("bad actor");
    assert_eq!(violated_fields(&bad), vec!["actorId"]);
}
