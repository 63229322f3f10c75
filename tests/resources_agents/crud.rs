//! Create, read, change, version history, duplicate and delete; optimistic locking by body
//! version and by `If-Match`; another user's agent is a 404; a runner key is refused.

use serde_json::{Value, json};
use turbocat::proto::v1::{
    self as pb, CreateAgentRequest, DeleteAgentRequest, DuplicateAgentRequest, GetAgentRequest,
    ListAgentVersionsRequest, UpdateAgentRequest,
};

use crate::harness::{Server, code_agent, error_facts, on_both_backends};
use crate::support::api::{Auth, assert_error, error_metadata, error_reason, grpc};

on_both_backends!(crud_history_and_locking_over_rest, crud_history_and_locking_over_grpc);

async fn crud_history_and_locking_over_rest(server: Server) {
    let api = &server.api;
    let _admin = api.register("root@example.com", "Root").await;
    let alice = api.register("alice@example.com", "Alice").await;
    let bob = api.register("bob@example.com", "Bob").await;

    // Create: server-set fields, defaults for the limits, the ETag.
    let (status, body, headers) = api
        .call(
            reqwest::Method::POST,
            "/api/v1/agents",
            &alice.auth(),
            Some(json!({
                "name": "  Greeter ",
                "description": "says hi",
                "type": "CODE",
                "config": { "code": { "language": "PYTHON", "source": "print('hi')" } },
                "tags": ["a", "b"],
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let created = body["data"].clone();
    let agent_id = created["id"].as_str().expect("id").to_owned();
    assert_eq!(created["name"], "Greeter", "the name is trimmed");
    assert_eq!(created["ownerId"], alice.id.as_str());
    assert_eq!(created["version"], 1);
    assert_eq!(created["status"], "IDLE");
    assert_eq!(created["type"], "CODE");
    assert_eq!(created["tags"], json!(["a", "b"]));
    assert_eq!(created["config"]["code"]["language"], "PYTHON");
    assert_eq!(created["config"]["code"]["source"], "print('hi')");
    assert_eq!(
        created["limits"],
        json!({ "timeout": "300s", "memoryMb": 512, "cpuSeconds": 300, "maxOutputBytes": 1_048_576 })
    );
    assert_eq!(headers.get("etag").and_then(|value| value.to_str().ok()), Some("\"1\""));
    let create_request_id = body["meta"]["requestId"].as_str().expect("request id").to_owned();

    let path = format!("/api/v1/agents/{agent_id}");
    let (status, body) = api.get(&path, &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], "Greeter");

    // Two updates: by body version, then by If-Match.
    let (status, body) = api
        .patch(&path, &alice.auth(), json!({ "name": "Greeter 2", "tags": ["x"], "version": 1 }))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["version"], 2);
    assert_eq!(body["data"]["name"], "Greeter 2");
    assert_eq!(body["data"]["description"], "says hi", "fields outside the mask stay");
    let (status, body) = server
        .patch_if_match(
            &path,
            &alice.auth(),
            "\"2\"",
            json!({ "config": { "code": { "language": "JAVASCRIPT", "source": "console.log(1)" } },
                    "limits": { "memoryMb": 1024 } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["version"], 3);
    assert_eq!(body["data"]["config"]["code"]["language"], "JAVASCRIPT");
    assert_eq!(body["data"]["limits"]["memoryMb"], 1024);
    assert_eq!(body["data"]["limits"]["cpuSeconds"], 300, "absent limits take their defaults");

    // Stale versions: 409 with the current version; nothing changes.
    let (status, body) =
        api.patch(&path, &alice.auth(), json!({ "name": "Late", "version": 1 })).await;
    assert_error(status, &body, 409, "CONFLICT");
    assert_eq!(error_facts(&body)["currentVersion"], 3, "{body}");
    let (status, body) =
        server.patch_if_match(&path, &alice.auth(), "\"2\"", json!({ "name": "Late" })).await;
    assert_error(status, &body, 409, "CONFLICT");
    assert_eq!(error_facts(&body)["currentVersion"], 3, "{body}");
    let (status, body) = api.patch(&path, &alice.auth(), json!({ "name": "No version" })).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["version"]);
    let (_, body) = api.get(&path, &alice.auth()).await;
    assert_eq!(
        (body["data"]["name"].clone(), body["data"]["version"].clone()),
        (json!("Greeter 2"), json!(3))
    );

    // History: newest first, with what changed and who changed it.
    let (status, body) = api.get(&format!("{path}/versions"), &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    let versions = body["data"].as_array().expect("versions");
    let numbers: Vec<i64> =
        versions.iter().filter_map(|version| version["version"].as_i64()).collect();
    assert_eq!(numbers, vec![3, 2, 1]);
    assert_eq!(versions[0]["changedFields"], json!(["config", "limits"]));
    assert_eq!(versions[1]["changedFields"], json!(["name", "tags"]));
    assert_eq!(
        versions[2]["changedFields"],
        json!(["name", "description", "type", "config", "limits", "tags"])
    );
    assert_eq!(versions[0]["changedBy"], alice.id.as_str());
    assert_eq!(versions[0]["snapshot"]["config"]["code"]["language"], "JAVASCRIPT");
    assert_eq!(versions[1]["snapshot"]["name"], "Greeter 2");
    assert_eq!(versions[1]["snapshot"]["config"]["code"]["language"], "PYTHON");
    assert_eq!(versions[2]["snapshot"]["name"], "Greeter");
    assert_eq!(versions[2]["snapshot"]["tags"], json!(["a", "b"]));
    assert_eq!(body["meta"]["pagination"]["total"], 3);
    let (_, body) = api.get(&format!("{path}/versions?page=2&pageSize=2"), &alice.auth()).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["data"][0]["version"], 1);
    assert_eq!(body["meta"]["pagination"]["totalPages"], 2);
    let (status, body) = api.get(&format!("{path}/versions?pageSize=0"), &alice.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["pageSize"]);

    // Duplicate: a fresh agent at version 1 with its own history.
    let (status, body) = api.post(&format!("{path}/duplicate"), &alice.auth(), json!({})).await;
    assert_eq!(status, 201, "{body}");
    let copy = body["data"].clone();
    assert_eq!(copy["name"], "Greeter 2 (copy)");
    assert_eq!(copy["version"], 1);
    assert_ne!(copy["id"], created["id"]);
    assert_eq!(
        copy["config"],
        json!({ "code": { "language": "JAVASCRIPT", "source": "console.log(1)",
                          "network": "OFF", "allowPrivateNetwork": false } })
    );
    assert_eq!(copy["tags"], json!(["x"]));
    let copy_id = copy["id"].as_str().expect("copy id").to_owned();
    let (_, body) = api.get(&format!("/api/v1/agents/{copy_id}/versions"), &alice.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    let (status, body) = api
        .post(&format!("{path}/duplicate"), &alice.auth(), json!({ "name": "Named copy" }))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["name"], "Named copy");
    let (status, body) = api
        .post(&format!("{path}/duplicate"), &alice.auth(), json!({ "name": "n".repeat(201) }))
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["name"]);

    // Bob sees none of it; the admin sees everything.
    for (method, suffix, body) in [
        (reqwest::Method::GET, "", None),
        (reqwest::Method::PATCH, "", Some(json!({ "name": "Mine", "version": 3 }))),
        (reqwest::Method::DELETE, "", None),
        (reqwest::Method::POST, "/duplicate", Some(json!({}))),
        (reqwest::Method::GET, "/versions", None),
    ] {
        let (status, response, _) =
            api.call(method.clone(), &format!("{path}{suffix}"), &bob.auth(), body).await;
        assert_error(status, &response, 404, "NOT_FOUND");
        assert!(!response.to_string().contains("Greeter"), "{method} {suffix}: {response}");
    }
    let (_, body) = api.get("/api/v1/agents", &bob.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 0, "{body}");

    // Keys: a runner-only key may not touch agents; a read key may only read.
    let (runner_key, _) = api.create_key(&alice.auth(), "runner", &["RUNNER"]).await;
    let (status, body) = api.get("/api/v1/agents", &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.get(&path, &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api.post("/api/v1/agents", &Auth::key(&runner_key), code_agent("K")).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (read_key, _) = api.create_key(&alice.auth(), "reader", &["READ"]).await;
    let (status, _) = api.get(&path, &Auth::key(&read_key)).await;
    assert_eq!(status, 200);
    let (status, body) = api.delete(&path, &Auth::key(&read_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");

    // Delete: gone from reads, lists and history; a second delete is a 404.
    let (status, body) = api.delete(&path, &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&path, &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.get(&format!("{path}/versions"), &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) =
        api.patch(&path, &alice.auth(), json!({ "name": "Zombie", "version": 3 })).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&path, &alice.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (_, body) = api.get("/api/v1/agents", &alice.auth()).await;
    let names: Vec<&str> = body["data"]
        .as_array()
        .expect("agents")
        .iter()
        .filter_map(|agent| agent["name"].as_str())
        .collect();
    assert!(!names.contains(&"Greeter 2") && names.len() == 2, "{names:?}");
    let (status, body) = api.get("/api/v1/agents/not-a-uuid", &alice.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["agentId"]);

    // The audit trail: one row per change, with the request id and only what changed.
    let creates = server.audit_rows_of("agent.create").await;
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0].resource_id.as_deref(), Some(agent_id.as_str()));
    assert_eq!(creates[0].actor_id.map(|id| id.to_string()), Some(alice.id.clone()));
    assert_eq!(creates[0].request_id.as_deref(), Some(create_request_id.as_str()));
    let updates = server.audit_rows_of("agent.update").await;
    assert_eq!(updates.len(), 2, "refused updates are not audited");
    assert_eq!(
        updates[0].changes,
        Some(json!({
            "before": { "name": "Greeter", "tags": ["a", "b"] },
            "after": { "name": "Greeter 2", "tags": ["x"] },
        }))
    );
    let second: &Value = updates[1].changes.as_ref().expect("changes");
    let changed: Vec<&String> = second["after"].as_object().expect("after").keys().collect();
    assert_eq!(changed, vec!["config", "limits"]);
    assert_eq!(second["before"]["config"]["code"]["language"], "PYTHON");
    assert_eq!(second["before"]["limits"]["memoryMb"], 512);
    assert!(updates.iter().all(|row| row.request_id.as_deref().is_some_and(|id| !id.is_empty())));
    let duplicates = server.audit_rows_of("agent.duplicate").await;
    assert_eq!(duplicates.len(), 2);
    assert_eq!(duplicates[0].resource_id.as_deref(), Some(copy_id.as_str()));
    assert_eq!(duplicates[0].metadata["sourceAgentId"], agent_id.as_str());
    let deletes = server.audit_rows_of("agent.delete").await;
    assert_eq!(deletes.len(), 1, "only the delete that happened");
    assert_eq!(deletes[0].resource_id.as_deref(), Some(agent_id.as_str()));
}

fn data_agent(name: &str, program: &str) -> pb::Agent {
    pb::Agent {
        name: name.to_owned(),
        r#type: pb::AgentType::Data.into(),
        config: Some(pb::AgentConfig {
            kind: Some(pb::agent_config::Kind::Data(pb::DataAgentConfig {
                jq_program: program.to_owned(),
            })),
        }),
        tags: vec!["t".to_owned()],
        ..Default::default()
    }
}

async fn crud_history_and_locking_over_grpc(server: Server) {
    let api = &server.api;
    let _admin = api.register("root@example.com", "Root").await;
    let carol = api.register("carol@example.com", "Carol").await;
    let dave = api.register("dave@example.com", "Dave").await;
    let mut agents = server.agents().await;

    let created = agents
        .create_agent(grpc(
            CreateAgentRequest { agent: Some(data_agent("Shaper", ".a")) },
            &carol.auth(),
        ))
        .await
        .expect("create")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(created.version, 1);
    assert_eq!(created.status, i32::from(pb::AgentStatus::Idle));
    assert_eq!(created.owner_id, carol.id);
    assert_eq!(created.limits.as_ref().map(|limits| limits.memory_mb), Some(512));
    let fetched = agents
        .get_agent(grpc(GetAgentRequest { agent_id: created.id.clone() }, &carol.auth()))
        .await
        .expect("get")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(fetched, created);

    // Update by mask: only the named field changes, even though others are sent.
    let mut change = data_agent("Ignored name", ".b");
    change.id = created.id.clone();
    change.version = 1;
    let updated = agents
        .update_agent(grpc(
            UpdateAgentRequest {
                agent: Some(change.clone()),
                update_mask: Some(prost_types::FieldMask { paths: vec!["config".into()] }),
            },
            &carol.auth(),
        ))
        .await
        .expect("update")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(updated.version, 2);
    assert_eq!(updated.name, "Shaper");
    assert_eq!(updated.config, change.config);
    let mut rename = change.clone();
    rename.name = "Shaper 2".into();
    rename.version = 2;
    let renamed = agents
        .update_agent(grpc(
            UpdateAgentRequest {
                agent: Some(rename.clone()),
                update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
            },
            &carol.auth(),
        ))
        .await
        .expect("rename")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(renamed.version, 3);

    // A stale version: ABORTED with CONFLICT and the current version.
    let stale = agents
        .update_agent(grpc(
            UpdateAgentRequest {
                agent: Some(rename.clone()),
                update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
            },
            &carol.auth(),
        ))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), tonic::Code::Aborted);
    assert_eq!(error_reason(&stale).as_deref(), Some("CONFLICT"));
    assert_eq!(error_metadata(&stale, "currentVersion").as_deref(), Some("3"));
    let bad_mask = agents
        .update_agent(grpc(
            UpdateAgentRequest {
                agent: Some(rename.clone()),
                update_mask: Some(prost_types::FieldMask { paths: vec!["ownerId".into()] }),
            },
            &carol.auth(),
        ))
        .await
        .expect_err("read-only field");
    assert_eq!(bad_mask.code(), tonic::Code::InvalidArgument);
    assert_eq!(crate::support::api::violated_fields(&bad_mask), vec!["ownerId"]);

    let history = agents
        .list_agent_versions(grpc(
            ListAgentVersionsRequest { agent_id: created.id.clone(), ..Default::default() },
            &carol.auth(),
        ))
        .await
        .expect("versions")
        .into_inner();
    let summary: Vec<(i32, Vec<String>)> = history
        .versions
        .iter()
        .map(|version| (version.version, version.changed_fields.clone()))
        .collect();
    assert_eq!(summary[0], (3, vec!["name".to_owned()]));
    assert_eq!(summary[1], (2, vec!["config".to_owned()]));
    assert_eq!(summary.len(), 3);
    assert_eq!(
        history.versions[1].snapshot.as_ref().map(|agent| agent.name.as_str()),
        Some("Shaper")
    );
    assert_eq!(history.pagination.map(|page| page.total), Some(3));

    let copy = agents
        .duplicate_agent(grpc(
            DuplicateAgentRequest { agent_id: created.id.clone(), name: String::new() },
            &carol.auth(),
        ))
        .await
        .expect("duplicate")
        .into_inner()
        .agent
        .expect("copy");
    assert_eq!((copy.name.as_str(), copy.version), ("Shaper 2 (copy)", 1));
    assert_eq!(copy.config, change.config);

    // Dave gets NOT_FOUND for every operation on Carol's agent.
    let id = created.id.clone();
    let outcomes = [
        agents
            .get_agent(grpc(GetAgentRequest { agent_id: id.clone() }, &dave.auth()))
            .await
            .map(|_| ()),
        agents
            .update_agent(grpc(
                UpdateAgentRequest {
                    agent: Some(pb::Agent { version: 3, ..rename.clone() }),
                    update_mask: Some(prost_types::FieldMask { paths: vec!["name".into()] }),
                },
                &dave.auth(),
            ))
            .await
            .map(|_| ()),
        agents
            .delete_agent(grpc(
                DeleteAgentRequest { agent_id: id.clone(), version: 0 },
                &dave.auth(),
            ))
            .await
            .map(|_| ()),
        agents
            .duplicate_agent(grpc(
                DuplicateAgentRequest { agent_id: id.clone(), name: String::new() },
                &dave.auth(),
            ))
            .await
            .map(|_| ()),
        agents
            .list_agent_versions(grpc(
                ListAgentVersionsRequest { agent_id: id.clone(), ..Default::default() },
                &dave.auth(),
            ))
            .await
            .map(|_| ()),
    ];
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let status = outcome.expect_err("not found");
        assert_eq!(status.code(), tonic::Code::NotFound, "operation {index}: {status:?}");
    }

    let (runner_key, _) = api.create_key(&carol.auth(), "runner", &["RUNNER"]).await;
    let refused = agents
        .get_agent(grpc(GetAgentRequest { agent_id: id.clone() }, &Auth::key(&runner_key)))
        .await
        .expect_err("runner key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let refused = agents
        .create_agent(grpc(
            CreateAgentRequest { agent: Some(data_agent("K", ".")) },
            &Auth::key(&runner_key),
        ))
        .await
        .expect_err("runner key");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Delete with a stale version is refused; with the current one it works.
    let stale_delete = agents
        .delete_agent(grpc(DeleteAgentRequest { agent_id: id.clone(), version: 2 }, &carol.auth()))
        .await
        .expect_err("stale delete");
    assert_eq!(stale_delete.code(), tonic::Code::Aborted);
    assert_eq!(error_metadata(&stale_delete, "currentVersion").as_deref(), Some("3"));
    agents
        .delete_agent(grpc(DeleteAgentRequest { agent_id: id.clone(), version: 3 }, &carol.auth()))
        .await
        .expect("delete");
    let gone = agents
        .get_agent(grpc(GetAgentRequest { agent_id: id.clone() }, &carol.auth()))
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);

    assert_eq!(server.audit_rows_of("agent.create").await.len(), 1);
    assert_eq!(server.audit_rows_of("agent.update").await.len(), 2);
    assert_eq!(server.audit_rows_of("agent.duplicate").await.len(), 1);
    assert_eq!(server.audit_rows_of("agent.delete").await.len(), 1);
}
