//! TemplateService over REST and gRPC: visibility (own, public, built-in, others' private),
//! built-ins that cannot be changed, body and parameter checks, optimistic locking, and
//! instantiation that creates the caller's agents and workflows or nothing at all.

use prost_types::FieldMask;
use serde_json::{Value, json};
use tonic::Code;
use turbocat::proto::v1::template_service_client::TemplateServiceClient;
use turbocat::proto::v1::{
    GetTemplateRequest, InstantiateTemplateRequest, ListTemplatesRequest, Template,
    UpdateTemplateRequest,
};
use turbocat::proto::wkt::json_object_to_struct;
use turbocat::store::{AgentFilter, OwnerScope};

use crate::Installation;
use crate::support::api::{Auth, assert_error, audit_rows, error_metadata, grpc, violated_fields};

/// The id of the built-in "Open issues filter" (an AGENT template).
const BUILTIN_AGENT_TEMPLATE: &str = "01930000-0000-7000-8000-000000000004";
/// The id of the built-in "Greet and shape" (a WORKFLOW template).
const BUILTIN_WORKFLOW_TEMPLATE: &str = "01930000-0000-7000-8000-000000000005";

fn echo_template() -> Value {
    json!({
        "name": "Echo",
        "description": "Runs a jq program",
        "category": "data",
        "tags": ["util", "jq"],
        "public": true,
        "kind": "AGENT",
        "parameters": [
            { "name": "name", "type": "STRING", "required": true, "description": "Agent name" },
            { "name": "program", "type": "STRING", "defaultValue": "." },
        ],
        "body": {
            "name": "{{params.name}}",
            "description": "echo of {{input.what}} via {{params.program}}",
            "type": "DATA",
            "config": { "data": { "jqProgram": "{{params.program}}" } },
        },
    })
}

fn pipeline_template() -> Value {
    json!({
        "name": "Pipeline",
        "category": "workflow",
        "kind": "WORKFLOW",
        "parameters": [
            { "name": "title", "type": "STRING", "defaultValue": "Pipeline" },
            { "name": "priority", "type": "NUMBER", "defaultValue": 7 },
        ],
        "body": {
            "agents": {
                "first": { "name": "First of {{params.title}}", "type": "DATA",
                           "config": { "data": { "jqProgram": "." } } },
                "second": { "name": "Second", "type": "DATA",
                            "config": { "data": { "jqProgram": ".x" } } },
            },
            "workflow": {
                "name": "{{params.title}}",
                "priority": "{{params.priority}}",
                "steps": [
                    { "key": "one", "name": "One", "agentId": "first" },
                    { "key": "two", "name": "Two", "agentId": "second", "dependsOn": ["one"],
                      "inputMapping": "{{steps.one.output}}" },
                ],
            },
        },
    })
}

async fn live_agent_count(
    installation: &Installation,
    account: &crate::support::api::Account,
) -> i64 {
    let owner = OwnerScope::Owner(Installation::user_id(account));
    installation.store.list_agents(AgentFilter::new(owner)).await.expect("agents").total
}

async fn templates_end_to_end(installation: Installation) {
    let Installation { api, store, admin, ann, bob, .. } = &installation;
    let mut client = TemplateServiceClient::new(api.channel().await);

    // Built-ins are there for everyone.
    let (status, body) = api.get("/api/v1/templates", &ann.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["meta"]["pagination"]["total"], 5, "{body}");
    for template in body["data"].as_array().expect("templates") {
        assert_eq!(template["builtin"], true, "{template}");
        assert_eq!(template["public"], true);
        assert_eq!(template["ownerId"], "");
    }

    // Create over REST and gRPC.
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), echo_template()).await;
    assert_eq!(status, 201, "{body}");
    let echo = body["data"].clone();
    let echo_id = echo["id"].as_str().expect("id").to_owned();
    assert_eq!(echo["ownerId"], ann.id);
    assert_eq!(echo["version"], 1);
    assert_eq!(echo["builtin"], false);
    assert_eq!(echo["kind"], "AGENT");
    assert_eq!(echo["parameters"][1]["defaultValue"], ".");
    assert_eq!(echo["tags"], json!(["util", "jq"]));

    let pipeline_message: Template =
        turbocat::proto::json::decode("turbocat.v1.Template", pipeline_template())
            .expect("decodes");
    let created = client
        .create_template(grpc(
            turbocat::proto::v1::CreateTemplateRequest { template: Some(pipeline_message) },
            &ann.auth(),
        ))
        .await
        .expect("create over grpc")
        .into_inner()
        .template
        .expect("template");
    let pipeline_id = created.id.clone();
    assert!(!created.public);
    assert_eq!(created.owner_id, ann.id);

    let (status, body) = api
        .post(
            "/api/v1/templates",
            &bob.auth(),
            json!({ "name": "Bob private", "kind": "AGENT", "category": "misc",
                    "body": { "name": "b", "type": "DATA", "config": { "data": { "jqProgram": "." } } } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let bob_private_id = body["data"]["id"].as_str().expect("id").to_owned();

    // Visibility: own, public, built-in; others' private ones are missing.
    let (_, body) = api.get("/api/v1/templates", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 7, "5 built-in + 2 own: {body}");
    let (_, body) = api.get("/api/v1/templates", &bob.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 7, "5 built-in + ann's public + own: {body}");
    let (_, body) = api.get("/api/v1/templates?mineOnly=true", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 2, "{body}");
    let (_, body) = api.get("/api/v1/templates?kind=WORKFLOW&sort=name", &ann.auth()).await;
    let names: Vec<&str> =
        body["data"].as_array().expect("list").iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, vec!["Greet and shape", "Pipeline"], "{body}");
    let (_, body) = api.get("/api/v1/templates?tag=util&category=data", &bob.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    assert_eq!(body["data"][0]["id"], echo_id);
    let (_, body) = api.get("/api/v1/templates?search=ECH", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 1, "{body}");
    let (_, body) = api.get("/api/v1/templates?pageSize=3&page=3&sort=-name", &ann.auth()).await;
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["meta"]["pagination"]["totalPages"], 3);
    let (status, body) = api.get("/api/v1/templates?sort=secret", &ann.auth()).await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["sort"]);
    let (status, body) = api.get(&format!("/api/v1/templates/{pipeline_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let status = client
        .get_template(grpc(GetTemplateRequest { template_id: bob_private_id.clone() }, &ann.auth()))
        .await
        .expect_err("another user's private template");
    assert_eq!(status.code(), Code::NotFound);
    let (status, _) = api.get(&format!("/api/v1/templates/{echo_id}"), &bob.auth()).await;
    assert_eq!(status, 200, "a public template is visible");
    let (status, body) =
        api.get(&format!("/api/v1/templates/{bob_private_id}"), &admin.auth()).await;
    assert_eq!(status, 200, "an admin sees everything: {body}");
    let listed = client
        .list_templates(grpc(
            ListTemplatesRequest { mine_only: true, ..Default::default() },
            &bob.auth(),
        ))
        .await
        .expect("list over grpc")
        .into_inner();
    assert_eq!(listed.templates.len(), 1);
    assert_eq!(listed.pagination.expect("pagination").total, 1);

    // Built-ins and others' templates cannot be changed.
    let (status, body) = api
        .patch(
            &format!("/api/v1/templates/{BUILTIN_AGENT_TEMPLATE}"),
            &ann.auth(),
            json!({ "name": "Mine now", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) =
        api.delete(&format!("/api/v1/templates/{BUILTIN_AGENT_TEMPLATE}"), &ann.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let status = client
        .update_template(grpc(
            UpdateTemplateRequest {
                template: Some(Template {
                    id: BUILTIN_WORKFLOW_TEMPLATE.to_owned(),
                    name: "x".to_owned(),
                    version: 1,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["name".to_owned()] }),
            },
            &admin.auth(),
        ))
        .await
        .expect_err("not even an admin changes a built-in");
    assert_eq!(status.code(), Code::PermissionDenied);
    let (status, body) = api
        .patch(
            &format!("/api/v1/templates/{echo_id}"),
            &bob.auth(),
            json!({ "name": "Bob's now", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body) = api
        .patch(
            &format!("/api/v1/templates/{pipeline_id}"),
            &bob.auth(),
            json!({ "name": "Bob's now", "version": 1 }),
        )
        .await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (_, body) =
        api.get(&format!("/api/v1/templates/{BUILTIN_AGENT_TEMPLATE}"), &ann.auth()).await;
    assert_eq!(body["data"]["name"], "Open issues filter");

    // Bodies and parameters are checked; nothing bad is written.
    let mut undeclared = echo_template();
    undeclared["body"]["name"] = json!("{{params.nope}}");
    undeclared["body"]["colour"] = json!("red");
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), undeclared).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["body.name"], "{body}");
    let mut unknown_field = echo_template();
    unknown_field["body"]["colour"] = json!("red");
    unknown_field["body"]["type"] = json!("TELEPATHY");
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), unknown_field).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert!(fields.contains(&"body.colour".to_owned()), "{body}");
    assert!(fields.contains(&"body.type".to_owned()), "{body}");
    let mut bad_parameters = echo_template();
    bad_parameters["parameters"] = json!([
        { "name": "name", "type": "STRING" },
        { "name": "name", "type": "NUMBER" },
        { "name": "program", "type": "BOOLEAN", "defaultValue": "yes" },
        { "name": "9lives", "type": "STRING" },
    ]);
    bad_parameters["name"] = json!("");
    bad_parameters.as_object_mut().expect("object").remove("kind");
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), bad_parameters).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    for expected in
        ["name", "kind", "parameters[1].name", "parameters[2].defaultValue", "parameters[3].name"]
    {
        assert!(fields.contains(&expected.to_owned()), "{expected}: {body}");
    }
    let mut ghost_step = pipeline_template();
    ghost_step["body"]["workflow"]["steps"][1]["agentId"] = json!("ghost");
    ghost_step["body"]["extra"] = json!(1);
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), ghost_step).await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["body.extra", "body.workflow.steps[1].agentId"], "{body}");
    let mut no_agents = pipeline_template();
    no_agents["body"] = json!({ "workflow": { "name": "w", "steps": [] } });
    let message: Template =
        turbocat::proto::json::decode("turbocat.v1.Template", no_agents).expect("decodes");
    let status = client
        .create_template(grpc(
            turbocat::proto::v1::CreateTemplateRequest { template: Some(message) },
            &ann.auth(),
        ))
        .await
        .expect_err("no agents");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), vec!["body.agents", "body.workflow.steps"]);
    let (_, body) = api.get("/api/v1/templates?mineOnly=true", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 2, "nothing was written: {body}");

    // Changes with optimistic locking, over REST and gRPC.
    let (status, body) = api
        .patch(
            &format!("/api/v1/templates/{echo_id}"),
            &ann.auth(),
            json!({ "description": "Runs any jq program", "version": 1 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["version"], 2);
    assert_eq!(body["data"]["name"], "Echo", "only the named field changes");
    let (status, body) = api
        .patch(
            &format!("/api/v1/templates/{echo_id}"),
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
            &format!("/api/v1/templates/{echo_id}"),
            &ann.auth(),
            json!({ "parameters": [{ "name": "program", "type": "STRING" }], "version": 2 }),
        )
        .await;
    assert_eq!(
        assert_error(status, &body, 400, "VALIDATION_ERROR"),
        vec!["body.name"],
        "the body still uses params.name: {body}"
    );
    let updated = client
        .update_template(grpc(
            UpdateTemplateRequest {
                template: Some(Template {
                    id: echo_id.clone(),
                    tags: vec!["jq".to_owned()],
                    version: 2,
                    ..Default::default()
                }),
                update_mask: Some(FieldMask { paths: vec!["tags".to_owned()] }),
            },
            &ann.auth(),
        ))
        .await
        .expect("update over grpc")
        .into_inner()
        .template
        .expect("template");
    assert_eq!(updated.version, 3);
    assert_eq!(updated.tags, vec!["jq"]);
    let status = client
        .update_template(grpc(
            UpdateTemplateRequest {
                template: Some(Template { id: echo_id.clone(), version: 2, ..Default::default() }),
                update_mask: Some(FieldMask { paths: vec!["tags".to_owned()] }),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("stale");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(error_metadata(&status, "currentVersion").as_deref(), Some("3"));

    // Instantiating an AGENT template makes an agent of the caller's.
    let agents_before = live_agent_count(&installation, ann).await;
    let (status, body) = api
        .post(
            &format!("/api/v1/templates/{echo_id}/instantiate"),
            &ann.auth(),
            json!({ "parameters": { "name": "My echo" } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let agent_ids = body["data"]["agentIds"].as_array().expect("ids").clone();
    assert_eq!(agent_ids.len(), 1);
    assert_eq!(body["data"]["workflowId"], "");
    let agent_id = agent_ids[0].as_str().expect("id");
    let (status, body) = api.get(&format!("/api/v1/agents/{agent_id}"), &ann.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], "My echo");
    assert_eq!(body["data"]["ownerId"], ann.id);
    assert_eq!(body["data"]["config"]["data"]["jqProgram"], ".", "the default applies");
    assert_eq!(
        body["data"]["description"], "echo of {{input.what}} via .",
        "run-time placeholders stay"
    );
    let (status, _) = api.get(&format!("/api/v1/agents/{agent_id}"), &bob.auth()).await;
    assert_eq!(status, 404);
    assert_eq!(live_agent_count(&installation, ann).await, agents_before + 1);

    // Bob instantiates Ann's public template: the agent is Bob's.
    let response = client
        .instantiate_template(grpc(
            InstantiateTemplateRequest {
                template_id: echo_id.clone(),
                parameters: Some(json_object_to_struct(
                    &json!({ "name": "Bob's echo", "program": ".a" }),
                )),
                name: String::new(),
            },
            &bob.auth(),
        ))
        .await
        .expect("instantiate over grpc")
        .into_inner();
    let bob_agent = store
        .get_agent(
            OwnerScope::Owner(Installation::user_id(bob)),
            response.agent_ids[0].parse().expect("id"),
        )
        .await
        .expect("bob's agent");
    assert_eq!(bob_agent.name, "Bob's echo");

    // A WORKFLOW template: its agents first, then the workflow whose steps use them.
    let response = client
        .instantiate_template(grpc(
            InstantiateTemplateRequest {
                template_id: pipeline_id.clone(),
                parameters: Some(json_object_to_struct(&json!({ "title": "Nightly" }))),
                name: String::new(),
            },
            &ann.auth(),
        ))
        .await
        .expect("instantiate a workflow template")
        .into_inner();
    assert_eq!(response.agent_ids.len(), 2);
    let workflow = store
        .get_workflow(
            OwnerScope::Owner(Installation::user_id(ann)),
            response.workflow_id.parse().expect("id"),
        )
        .await
        .expect("ann's workflow");
    assert_eq!(workflow.workflow.name, "Nightly");
    assert_eq!(workflow.workflow.priority, 7);
    assert_eq!(workflow.steps.len(), 2);
    for step in &workflow.steps {
        assert!(response.agent_ids.contains(&step.agent_id.to_string()), "{step:?}");
    }
    assert_eq!(workflow.steps[1].input_mapping, Some(json!("{{steps.one.output}}")));
    let first = store
        .get_agent(OwnerScope::Owner(Installation::user_id(ann)), workflow.steps[0].agent_id)
        .await
        .expect("agent");
    assert_eq!(first.name, "First of Nightly");

    // The built-in starters instantiate too, with a chosen name.
    let (status, body) = api
        .post(
            &format!("/api/v1/templates/{BUILTIN_WORKFLOW_TEMPLATE}/instantiate"),
            &bob.auth(),
            json!({ "name": "Bob's greeting" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let workflow_id = body["data"]["workflowId"].as_str().expect("id");
    let (status, body) = api.get(&format!("/api/v1/workflows/{workflow_id}"), &bob.auth()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], "Bob's greeting");
    let (status, body) = api
        .post(
            &format!("/api/v1/templates/{BUILTIN_AGENT_TEMPLATE}/instantiate"),
            &bob.auth(),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Missing or mistyped parameters create nothing.
    let agents_before = live_agent_count(&installation, ann).await;
    let (status, body) = api
        .post(
            &format!("/api/v1/templates/{echo_id}/instantiate"),
            &ann.auth(),
            json!({ "parameters": {} }),
        )
        .await;
    assert_eq!(assert_error(status, &body, 400, "VALIDATION_ERROR"), vec!["parameters.name"]);
    let (status, body) = api
        .post(
            &format!("/api/v1/templates/{echo_id}/instantiate"),
            &ann.auth(),
            json!({ "parameters": { "name": 5, "program": true, "other": 1 } }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["parameters.other", "parameters.name", "parameters.program"], "{body}");
    let status = client
        .instantiate_template(grpc(
            InstantiateTemplateRequest {
                template_id: pipeline_id.clone(),
                parameters: Some(json_object_to_struct(&json!({ "priority": "high" }))),
                name: String::new(),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("mistyped");
    assert_eq!(violated_fields(&status), vec!["parameters.priority"]);
    // A workflow the workflows service refuses (priority out of range) leaves no agents behind.
    let status = client
        .instantiate_template(grpc(
            InstantiateTemplateRequest {
                template_id: pipeline_id.clone(),
                parameters: Some(json_object_to_struct(&json!({ "priority": 99 }))),
                name: String::new(),
            },
            &ann.auth(),
        ))
        .await
        .expect_err("priority out of range");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), vec!["body.workflow.priority"]);
    assert_eq!(live_agent_count(&installation, ann).await, agents_before, "nothing half-made");
    let (status, body) = api
        .post(&format!("/api/v1/templates/{bob_private_id}/instantiate"), &ann.auth(), json!({}))
        .await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // Deleting, with the version checked.
    let (status, body, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/templates/{echo_id}?version=1"),
            &ann.auth(),
            None,
        )
        .await;
    assert_error(status, &body, 409, "CONFLICT");
    let (status, body) = api.delete(&format!("/api/v1/templates/{echo_id}"), &bob.auth()).await;
    assert_error(status, &body, 403, "FORBIDDEN");
    let (status, body, _) = api
        .call(
            reqwest::Method::DELETE,
            &format!("/api/v1/templates/{echo_id}?version=3"),
            &ann.auth(),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.get(&format!("/api/v1/templates/{echo_id}"), &ann.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.get(&format!("/api/v1/templates/{echo_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");
    let (status, body) = api.delete(&format!("/api/v1/templates/{pipeline_id}"), &bob.auth()).await;
    assert_error(status, &body, 404, "NOT_FOUND");

    // A runner key cannot touch templates.
    let (runner_key, _) = api.create_key(&ann.auth(), "runner", &["RUNNER"]).await;
    let (status, body) = api.get("/api/v1/templates", &Auth::key(&runner_key)).await;
    assert_error(status, &body, 403, "FORBIDDEN");

    // The audit trail.
    let rows = audit_rows(store.as_ref()).await;
    let actions_on = |id: &str| -> Vec<String> {
        rows.iter()
            .filter(|row| row.resource_id.as_deref() == Some(id))
            .map(|row| row.action.clone())
            .collect()
    };
    assert_eq!(
        actions_on(&echo_id),
        vec![
            "template.create",
            "template.update",
            "template.update",
            "template.instantiate",
            "template.instantiate",
            "template.delete"
        ]
    );
    let instantiation = rows
        .iter()
        .find(|row| {
            row.action == "template.instantiate"
                && row.resource_id.as_deref() == Some(pipeline_id.as_str())
        })
        .expect("instantiation row");
    assert_eq!(instantiation.actor_id, Some(Installation::user_id(ann)));
    assert_eq!(instantiation.metadata["workflowId"], json!(response.workflow_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_on_dev() {
    templates_end_to_end(Installation::dev().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_on_serve() {
    templates_end_to_end(Installation::serve().await).await;
}

/// A workflow template's body is checked part by part, each fault on its own field, over REST
/// and gRPC; parameters of every type get a sample value for the check and are type-checked
/// when the template is instantiated. Nothing bad is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_template_bodies_and_typed_parameters_are_checked_field_by_field() {
    let installation = Installation::dev().await;
    let Installation { api, ann, .. } = &installation;
    let mut client = TemplateServiceClient::new(api.channel().await);

    let many_agents: serde_json::Map<String, Value> = (0..51)
        .map(|number| {
            let agent = json!({ "name": format!("A{number}"), "type": "DATA",
                                "config": { "data": { "jqProgram": "." } } });
            (format!("a{number}"), agent)
        })
        .collect();
    /// A change that spoils a good template.
    type Spoil = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Spoil, &str)> = vec![
        ("no agents", Box::new(|t| t["body"]["agents"] = json!({})), "body.agents"),
        (
            "too many agents",
            Box::new(move |t| t["body"]["agents"] = Value::Object(many_agents.clone())),
            "body.agents",
        ),
        (
            "an agent of no known type",
            Box::new(|t| t["body"]["agents"]["second"]["type"] = json!("TELEPATHY")),
            "body.agents.second.type",
        ),
        (
            "no workflow",
            Box::new(|t| {
                t["body"].as_object_mut().expect("body").remove("workflow");
            }),
            "body.workflow",
        ),
        (
            "a workflow field that does not exist",
            Box::new(|t| t["body"]["workflow"]["colour"] = json!("red")),
            "body.workflow.colour",
        ),
        (
            "a reference to all parameters at once",
            Box::new(|t| t["body"]["workflow"]["name"] = json!("{{params}}")),
            "body.workflow.name",
        ),
    ];
    for (case, change, field) in &cases {
        let mut template = pipeline_template();
        change(&mut template);
        let (status, body) = api.post("/api/v1/templates", &ann.auth(), template.clone()).await;
        let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
        assert!(fields.contains(&(*field).to_owned()), "{case}: {body}");
        let message: Template =
            turbocat::proto::json::decode("turbocat.v1.Template", template).expect("decodes");
        let status = client
            .create_template(grpc(
                turbocat::proto::v1::CreateTemplateRequest { template: Some(message) },
                &ann.auth(),
            ))
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::InvalidArgument, "{case}");
        assert!(violated_fields(&status).contains(&(*field).to_owned()), "{case}: {status:?}");
    }
    let (_, body) = api.get("/api/v1/templates?mineOnly=true", &ann.auth()).await;
    assert_eq!(body["meta"]["pagination"]["total"], 0, "nothing was written: {body}");

    // Parameters of every type, none with a default: the body's shape is checked with a
    // sample of each type, and instantiation checks every value's type.
    let mut typed = pipeline_template();
    typed["parameters"] = json!([
        { "name": "title", "type": "STRING", "required": true },
        { "name": "priority", "type": "NUMBER", "required": true },
        { "name": "loud", "type": "BOOLEAN" },
        { "name": "extra", "type": "JSON" },
    ]);
    typed["body"]["agents"]["second"]["description"] = json!("loud: {{params.loud}}");
    typed["body"]["workflow"]["description"] = json!("extra: {{params.extra}}");
    let (status, body) = api.post("/api/v1/templates", &ann.auth(), typed).await;
    assert_eq!(status, 201, "{body}");
    let typed_id = body["data"]["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/templates/{typed_id}/instantiate");
    let (status, body) = api
        .post(
            &path,
            &ann.auth(),
            json!({ "parameters": { "title": "T", "priority": 3, "loud": "yes",
                                    "extra": { "any": ["json"] } } }),
        )
        .await;
    let fields = assert_error(status, &body, 400, "VALIDATION_ERROR");
    assert_eq!(fields, vec!["parameters.loud"], "{body}");
    assert!(body.to_string().contains("must be true or false"), "{body}");
    let (status, body) = api
        .post(
            &path,
            &ann.auth(),
            json!({ "parameters": { "title": "T", "priority": 3, "loud": true,
                                    "extra": [1, 2] } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}
