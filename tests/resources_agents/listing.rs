//! The agents list: page edges, filters, sort (and its allowlist), search, and who sees what.

use serde_json::{Value, json};
use turbocat::proto::v1::{self as pb, ListAgentsRequest};
use turbocat::store::{AgentStatus, OwnerScope};

use crate::harness::{Server, on_both_backends};
use crate::support::api::{assert_error, grpc, violated_fields};

on_both_backends!(pages_filters_sort_and_search);

fn names(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|agent| agent["name"].as_str().map(str::to_owned))
        .collect()
}

async fn pages_filters_sort_and_search(server: Server) {
    let api = &server.api;
    let admin = api.register("root@example.com", "Root").await;
    let alice = api.register("alice@example.com", "Alice").await;
    let bob = api.register("bob@example.com", "Bob").await;

    let specs = [
        (
            "delta",
            "CODE",
            json!({ "code": { "language": "PYTHON", "source": "print(1)" } }),
            vec!["blue"],
            "Greets people",
        ),
        ("Alpha", "DATA", json!({ "data": { "jqProgram": "." } }), vec!["blue", "red"], "plain"),
        (
            "charlie",
            "API",
            json!({ "api": { "method": "GET", "urlTemplate": "https://example.com" } }),
            vec![],
            "calls out",
        ),
        (
            "Bravo",
            "DATA",
            json!({ "data": { "jqProgram": ".a" } }),
            vec!["red"],
            "reshapes 50%_off",
        ),
        (
            "echo",
            "LLM",
            json!({ "llm": { "baseUrl": "https://x.example/v1", "model": "m", "promptTemplate": "p" } }),
            vec![],
            "summarises",
        ),
    ];
    let mut ids = Vec::new();
    for (name, agent_type, config, tags, description) in specs {
        let created = server
            .create_agent(
                &alice.auth(),
                json!({ "name": name, "type": agent_type, "config": config, "tags": tags,
                        "description": description }),
            )
            .await;
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    server
        .create_agent(
            &bob.auth(),
            json!({ "name": "Bob's", "type": "DATA", "config": { "data": { "jqProgram": "." } } }),
        )
        .await;

    // Default order: newest update first; then pages.
    let (status, body) = api.get("/api/v1/agents", &alice.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&body), vec!["echo", "Bravo", "charlie", "Alpha", "delta"]);
    assert_eq!(
        body["meta"]["pagination"],
        json!({ "page": 1, "pageSize": 20, "total": 5, "totalPages": 1, "nextCursor": "" })
    );
    let (_, body) = api.get("/api/v1/agents?pageSize=2", &alice.auth()).await;
    assert_eq!(names(&body), vec!["echo", "Bravo"]);
    assert_eq!(body["meta"]["pagination"]["totalPages"], 3);
    let (_, body) = api.get("/api/v1/agents?pageSize=2&page=3", &alice.auth()).await;
    assert_eq!(names(&body), vec!["delta"], "the last page holds the rest");
    let (_, body) = api.get("/api/v1/agents?pageSize=2&page=4", &alice.auth()).await;
    assert_eq!(names(&body), Vec::<String>::new(), "past the end is empty");
    assert_eq!(body["meta"]["pagination"]["total"], 5);
    let (_, body) = api.get("/api/v1/agents?pageSize=100", &alice.auth()).await;
    assert_eq!(names(&body).len(), 5);
    let long_search = format!("search={}", "s".repeat(201));
    for (query, expected) in [
        ("page=0", vec!["page"]),
        ("pageSize=0", vec!["pageSize"]),
        ("pageSize=101", vec!["pageSize"]),
        ("page=-1&pageSize=101&sort=owner", vec!["page", "pageSize", "sort"]),
        ("sort=-ownerId", vec!["sort"]),
        (long_search.as_str(), vec!["search"]),
    ] {
        let (status, body) = api.get(&format!("/api/v1/agents?{query}"), &alice.auth()).await;
        assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), expected, "{query}");
    }

    // Sort: the allowlist, ascending and descending, case-insensitive names.
    let (_, body) = api.get("/api/v1/agents?sort=name", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Alpha", "Bravo", "charlie", "delta", "echo"]);
    let (_, body) = api.get("/api/v1/agents?sort=-name", &alice.auth()).await;
    assert_eq!(names(&body), vec!["echo", "delta", "charlie", "Bravo", "Alpha"]);
    let (_, body) = api.get("/api/v1/agents?sort=createdAt", &alice.auth()).await;
    assert_eq!(names(&body), vec!["delta", "Alpha", "charlie", "Bravo", "echo"]);
    let (_, body) = api.get("/api/v1/agents?sort=type&pageSize=1", &alice.auth()).await;
    assert_eq!(names(&body), vec!["charlie"], "API sorts first");
    let (status, _) = api.get("/api/v1/agents?sort=-status", &alice.auth()).await;
    assert_eq!(status, 200);

    // Filters: type, tag, status, search (name and description, case-insensitive, literal %).
    let (_, body) = api.get("/api/v1/agents?type=DATA&sort=name", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Alpha", "Bravo"]);
    let (_, body) = api.get("/api/v1/agents?tag=blue&sort=name", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Alpha", "delta"]);
    let (_, body) = api.get("/api/v1/agents?tag=red&type=DATA&sort=name", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Alpha", "Bravo"]);
    let (_, body) = api.get("/api/v1/agents?tag=blu", &alice.auth()).await;
    assert_eq!(names(&body), Vec::<String>::new(), "tags match exactly");
    server
        .store
        .set_agent_status(OwnerScope::All, ids[2].parse().expect("id"), AgentStatus::Running)
        .await
        .expect("set status");
    let (_, body) = api.get("/api/v1/agents?status=RUNNING", &alice.auth()).await;
    assert_eq!(names(&body), vec!["charlie"]);
    assert_eq!(body["data"][0]["status"], "RUNNING");
    let (_, body) = api.get("/api/v1/agents?status=IDLE", &alice.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 4);
    let (_, body) = api.get("/api/v1/agents?search=ALPH", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Alpha"]);
    let (_, body) = api.get("/api/v1/agents?search=greets", &alice.auth()).await;
    assert_eq!(names(&body), vec!["delta"], "the description is searched too");
    let (_, body) = api.get("/api/v1/agents?search=50%25_", &alice.auth()).await;
    assert_eq!(names(&body), vec!["Bravo"], "% and _ match literally");
    let (_, body) = api.get("/api/v1/agents?search=nothing-like-it", &alice.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 0);

    // Who sees what: Bob his one, the admin everything.
    let (_, body) = api.get("/api/v1/agents", &bob.auth()).await;
    assert_eq!(names(&body), vec!["Bob's"]);
    let (_, body) = api.get("/api/v1/agents", &admin.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 6);

    // The same over gRPC.
    let mut agents = server.agents().await;
    let listed = agents
        .list_agents(grpc(
            ListAgentsRequest {
                page: Some(1),
                page_size: Some(1),
                sort: "-name".into(),
                r#type: pb::AgentType::Data.into(),
                tag: "red".into(),
                ..Default::default()
            },
            &alice.auth(),
        ))
        .await
        .expect("list")
        .into_inner();
    let listed_names: Vec<&str> = listed.agents.iter().map(|agent| agent.name.as_str()).collect();
    assert_eq!(listed_names, vec!["Bravo"]);
    let pagination = listed.pagination.expect("pagination");
    assert_eq!((pagination.total, pagination.total_pages), (2, 2));
    let searched = agents
        .list_agents(grpc(
            ListAgentsRequest { search: "SUMMAR".into(), ..Default::default() },
            &alice.auth(),
        ))
        .await
        .expect("search")
        .into_inner();
    assert_eq!(searched.agents.len(), 1);
    assert_eq!(searched.agents[0].r#type, i32::from(pb::AgentType::Llm));
    let bad = agents
        .list_agents(grpc(
            ListAgentsRequest { sort: "secret".into(), page_size: Some(0), ..Default::default() },
            &alice.auth(),
        ))
        .await
        .expect_err("bad sort");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&bad), vec!["pageSize", "sort"]);
}
