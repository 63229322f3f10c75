//! Every configuration rule of every agent type, on create (REST and gRPC) and on update: the
//! bad fields are all named by their JSON path and nothing is written.

use serde_json::{Value, json};
use turbocat::proto::v1::{self as pb, CreateAgentRequest};
use turbocat::store::{AgentFilter, OwnerScope};

use crate::harness::{Server, code_agent, on_both_backends};
use crate::support::api::{assert_error, grpc, violated_fields};

on_both_backends!(every_bad_field_is_named_and_nothing_is_written);

fn agent(agent_type: &str, config: Value) -> Value {
    json!({ "name": "Bad", "type": agent_type, "config": config })
}

fn api_config(overrides: Value) -> Value {
    let mut config = json!({ "method": "GET", "urlTemplate": "https://example.com/{{input.id}}" });
    if let (Value::Object(base), Value::Object(extra)) = (&mut config, overrides) {
        base.extend(extra);
    }
    agent("API", json!({ "api": config }))
}

fn llm_config(overrides: Value) -> Value {
    let mut config = json!({
        "baseUrl": "https://api.openai.com/v1",
        "model": "gpt-4o-mini",
        "promptTemplate": "Summarise {{input.text}}",
        "apiKeyRef": "env:OPENAI_API_KEY",
    });
    if let (Value::Object(base), Value::Object(extra)) = (&mut config, overrides) {
        base.extend(extra);
    }
    agent("LLM", json!({ "llm": config }))
}

/// (what is wrong, the body, the fields the error must name in order).
fn bad_agents(other_users_workflow: &str) -> Vec<(&'static str, Value, Vec<&'static str>)> {
    vec![
        ("nothing", json!({}), vec!["name", "type", "config"]),
        (
            "too long and too many",
            json!({
                "name": "n".repeat(201),
                "description": "d".repeat(5001),
                "type": "DATA",
                "config": { "data": { "jqProgram": "." } },
                "tags": (0..21).map(|index| format!("t{index}")).collect::<Vec<_>>(),
            }),
            vec!["name", "description", "tags"],
        ),
        (
            "bad tags",
            json!({ "name": "T", "type": "DATA", "config": { "data": { "jqProgram": "." } },
                    "tags": ["ok", " ", "x".repeat(51)] }),
            vec!["tags[1]", "tags[2]"],
        ),
        (
            "config of another type",
            agent("CODE", json!({ "data": { "jqProgram": "." } })),
            vec!["config"],
        ),
        ("type without config", json!({ "name": "T", "type": "LLM" }), vec!["config"]),
        (
            "code without language or source",
            agent("CODE", json!({ "code": { "source": "  " } })),
            vec!["config.code.language", "config.code.source"],
        ),
        (
            "code opting in to private ranges without the network",
            agent(
                "CODE",
                json!({ "code": { "language": "PYTHON", "source": "print(1)",
                                  "allowPrivateNetwork": true } }),
            ),
            vec!["config.code.allowPrivateNetwork"],
        ),
        (
            "code too big",
            agent(
                "CODE",
                json!({ "code": { "language": "PYTHON", "source": "#".repeat(256 * 1024 + 1) } }),
            ),
            vec!["config.code.source"],
        ),
        (
            "api without method or url",
            agent("API", json!({ "api": { "urlTemplate": "" } })),
            vec!["config.api.method", "config.api.urlTemplate"],
        ),
        (
            "api url not http",
            api_config(json!({ "urlTemplate": "ftp://example.com/{{input.id}}" })),
            vec!["config.api.urlTemplate"],
        ),
        (
            "api url only a placeholder",
            api_config(json!({ "urlTemplate": "{{input.url}}" })),
            vec!["config.api.urlTemplate"],
        ),
        (
            "api url placeholder unclosed",
            api_config(json!({ "urlTemplate": "https://example.com/{{input.id" })),
            vec!["config.api.urlTemplate"],
        ),
        (
            "api headers, body and timeout",
            api_config(json!({
                "headers": { "X-Ok": "{{input.}}", "bad header": "v", "X-Fine": "Bearer {{input.token}}" },
                "bodyTemplate": "{\"a\": {{ }}}",
                "timeout": "600s",
            })),
            vec![
                "config.api.headers.X-Ok",
                "config.api.headers.bad header",
                "config.api.bodyTemplate",
                "config.api.timeout",
            ],
        ),
        (
            "llm everything wrong",
            llm_config(json!({
                "baseUrl": "not a url",
                "model": " ",
                "promptTemplate": "",
                "systemPrompt": "{{ input..x }}",
                "temperature": 2.5,
                "maxTokens": -1,
                "apiKeyRef": "sk-live-THIS-IS-A-SECRET",
            })),
            vec![
                "config.llm.baseUrl",
                "config.llm.model",
                "config.llm.promptTemplate",
                "config.llm.systemPrompt",
                "config.llm.temperature",
                "config.llm.maxTokens",
                "config.llm.apiKeyRef",
            ],
        ),
        (
            "api URL too long",
            api_config(
                json!({ "urlTemplate": format!("https://example.com/{}", "a".repeat(2_048)) }),
            ),
            vec!["config.api.urlTemplate"],
        ),
        (
            "api too many headers",
            api_config(json!({
                "headers": (0..51).map(|n| (format!("X-H{n}"), json!("v"))).collect::<serde_json::Map<_, _>>(),
            })),
            vec!["config.api.headers"],
        ),
        (
            "api header values with a line break or too long",
            api_config(json!({ "headers": { "X-A": "a\r\nb", "X-B": "b".repeat(8 * 1024 + 1) } })),
            vec!["config.api.headers.X-A", "config.api.headers.X-B"],
        ),
        (
            "api body template too big, timeout under a millisecond",
            api_config(json!({ "bodyTemplate": "x".repeat(256 * 1024 + 1), "timeout": "0s" })),
            vec!["config.api.bodyTemplate", "config.api.timeout"],
        ),
        (
            "llm base URL, prompt and system prompt too long",
            llm_config(json!({
                "baseUrl": format!("https://example.com/{}", "a".repeat(2_048)),
                "promptTemplate": "p".repeat(256 * 1024 + 1),
                "systemPrompt": "s".repeat(256 * 1024 + 1),
            })),
            vec!["config.llm.baseUrl", "config.llm.promptTemplate", "config.llm.systemPrompt"],
        ),
        (
            "llm without a base URL",
            llm_config(json!({ "baseUrl": "" })),
            vec!["config.llm.baseUrl"],
        ),
        (
            "llm key reference in lower case",
            llm_config(json!({ "apiKeyRef": "env:openai_key" })),
            vec!["config.llm.apiKeyRef"],
        ),
        (
            "llm prompt placeholder",
            llm_config(json!({ "promptTemplate": "Hi {{input.[x}}" })),
            vec!["config.llm.promptTemplate"],
        ),
        (
            "data without program",
            agent("DATA", json!({ "data": { "jqProgram": "" } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program too big",
            agent("DATA", json!({ "data": { "jqProgram": ".".repeat(64 * 1024 + 1) } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program does not compile",
            agent("DATA", json!({ "data": { "jqProgram": ".a | " } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program reads the runner's environment",
            agent("DATA", json!({ "data": { "jqProgram": "env.HOME" } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program imports a file of the runner",
            agent("DATA", json!({ "data": { "jqProgram": "import \"/etc/passwd\" as $f; $f" } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program includes a module",
            agent("DATA", json!({ "data": { "jqProgram": "include \"/etc/passwd\"; ." } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "data program too deep to compile safely",
            agent("DATA", json!({ "data": { "jqProgram": ".|".repeat(10_000) + "." } })),
            vec!["config.data.jqProgram"],
        ),
        (
            "workflow without id",
            agent("WORKFLOW", json!({ "workflow": {} })),
            vec!["config.workflow.workflowId"],
        ),
        (
            "workflow id malformed",
            agent("WORKFLOW", json!({ "workflow": { "workflowId": "nope" } })),
            vec!["config.workflow.workflowId"],
        ),
        (
            "workflow missing",
            agent(
                "WORKFLOW",
                json!({ "workflow": { "workflowId": uuid::Uuid::new_v4().to_string() } }),
            ),
            vec!["config.workflow.workflowId"],
        ),
        (
            "workflow of another user",
            agent("WORKFLOW", json!({ "workflow": { "workflowId": other_users_workflow } })),
            vec!["config.workflow.workflowId"],
        ),
        (
            "limits out of bounds",
            json!({ "name": "L", "type": "DATA", "config": { "data": { "jqProgram": "." } },
                    "limits": { "timeout": "86401s", "memoryMb": 8, "cpuSeconds": 90000, "maxOutputBytes": 16_777_217 } }),
            vec!["limits.timeout", "limits.memoryMb", "limits.cpuSeconds", "limits.maxOutputBytes"],
        ),
        (
            "fractional timeout",
            json!({ "name": "L", "type": "DATA", "config": { "data": { "jqProgram": "." } },
                    "limits": { "timeout": "1.5s" } }),
            vec!["limits.timeout"],
        ),
    ]
}

async fn every_bad_field_is_named_and_nothing_is_written(server: Server) {
    let api = &server.api;
    let admin = api.register("root@example.com", "Root").await;
    let erin = api.register("erin@example.com", "Erin").await;
    let admins_agent = server.create_agent(&admin.auth(), code_agent("Admin's")).await;
    let admins_workflow = server
        .workflow_using(&admin.id, "Admin's flow", admins_agent["id"].as_str().expect("id"))
        .await;
    let other_users_workflow = admins_workflow.workflow.id.to_string();
    let mut agents = server.agents().await;

    for (what, body, expected) in bad_agents(&other_users_workflow) {
        let (status, response) = api.post("/api/v1/agents", &erin.auth(), body.clone()).await;
        let fields = assert_error(status, &response, 400, "VALIDATION_ERROR");
        assert_eq!(fields, expected, "REST, {what}: {response}");
        assert!(
            !response.to_string().contains("THIS-IS-A-SECRET"),
            "a refused key is never echoed"
        );

        let message: pb::Agent =
            turbocat::proto::json::decode("turbocat.v1.Agent", body).expect("the body decodes");
        let status = agents
            .create_agent(grpc(CreateAgentRequest { agent: Some(message) }, &erin.auth()))
            .await
            .expect_err(what);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "gRPC, {what}");
        assert_eq!(violated_fields(&status), expected, "gRPC, {what}");
    }
    let missing = agents
        .create_agent(grpc(CreateAgentRequest { agent: None }, &erin.auth()))
        .await
        .expect_err("no agent");
    assert_eq!(violated_fields(&missing), vec!["agent"]);

    // Nothing was written: no agent of Erin's, no audit row, nothing with the refused key.
    let mine = server
        .store
        .list_agents(AgentFilter::new(OwnerScope::Owner(erin.id.parse().expect("id"))))
        .await
        .expect("list");
    assert_eq!(mine.total, 0);
    assert_eq!(server.audit_rows_of("agent.create").await.len(), 1, "only the admin's agent");
    let everything =
        server.store.list_agents(AgentFilter::new(OwnerScope::All)).await.expect("list");
    assert!(everything.items.iter().all(|agent| !agent.config.to_string().contains("SECRET")));

    // The good twins of the rules are accepted: every type, an own workflow, edge limits.
    let erins_agent = server.create_agent(&erin.auth(), code_agent("Erin's")).await;
    let erins_workflow = server
        .workflow_using(&erin.id, "Erin's flow", erins_agent["id"].as_str().expect("id"))
        .await;
    for body in [
        api_config(json!({ "method": "POST", "headers": { "X-Token": "{{input.token}}" },
                           "bodyTemplate": "{\"q\": \"{{input.q}}\"}", "timeout": "300s" })),
        llm_config(json!({ "temperature": 2.0, "maxTokens": 1 })),
        llm_config(json!({ "apiKeyRef": "" })),
        agent(
            "WORKFLOW",
            json!({ "workflow": { "workflowId": erins_workflow.workflow.id.to_string() } }),
        ),
        json!({ "name": "Edges", "type": "DATA", "config": { "data": { "jqProgram": "." } },
                "limits": { "timeout": "86400s", "memoryMb": 16, "cpuSeconds": 1, "maxOutputBytes": 16_777_216 } }),
    ] {
        server.create_agent(&erin.auth(), body).await;
    }

    // Updates are checked too, against the agent as it would be; nothing changes.
    let path = format!("/api/v1/agents/{}", erins_agent["id"].as_str().expect("id"));
    for (body, expected) in [
        (json!({ "type": "API", "version": 1 }), vec!["config"]),
        (json!({ "status": "RUNNING", "version": 1 }), vec!["status"]),
        (json!({ "name": "", "tags": [""], "version": 1 }), vec!["name", "tags[0]"]),
        (
            json!({ "type": "LLM", "config": { "llm": { "baseUrl": "https://x.example", "model": "m",
                    "promptTemplate": "p", "apiKeyRef": "sk-THIS-IS-A-SECRET" } }, "version": 1 }),
            vec!["config.llm.apiKeyRef"],
        ),
        (json!({ "limits": { "memoryMb": 70000 }, "version": 1 }), vec!["limits.memoryMb"]),
        (json!({ "name": "Fine" }), vec!["version"]),
    ] {
        let (status, response) = api.patch(&path, &erin.auth(), body.clone()).await;
        assert_eq!(assert_error(status, &response, 400, "VALIDATION_ERROR"), expected, "{body}");
    }
    let (_, body) = api.get(&path, &erin.auth()).await;
    assert_eq!(body["data"]["version"], 1, "{body}");
    assert_eq!(body["data"]["type"], "CODE");
    assert_eq!(server.audit_rows_of("agent.update").await.len(), 0);
}
