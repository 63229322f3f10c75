//! The OpenAPI document and the docs page: every REST binding of the contract is an operation
//! of the document (so it cannot drift), the shapes are those the REST edge really emits, the
//! document is valid OpenAPI 3.1 (checked by `openapi-spec-validator` from the schemathesis
//! venv), and the real `turbocat` process serves it and the docs page, in `dev` and `serve`.

#[path = "../support/mod.rs"]
mod support;

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use serde_json::{Value, json};
use turbocat::api::openapi;
use turbocat::api::rest::bindings::{BodyMapping, http_bindings};

use crate::support::api::{Api, Auth};
use crate::support::{CHROMIUM, TurbocatProcess, start_dev, start_serve};

fn document() -> Value {
    openapi::document(turbocat::proto::descriptor_pool()).expect("the document builds")
}

fn operation<'document>(document: &'document Value, method: &str, path: &str) -> &'document Value {
    let operation = &document["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is in the document");
    operation
}

/// Follows a local `$ref` (`#/components/schemas/Agent`).
fn resolve<'document>(document: &'document Value, reference: &str) -> &'document Value {
    let pointer = reference.strip_prefix('#').expect("a local reference");
    document.pointer(pointer).unwrap_or_else(|| panic!("{reference} resolves"))
}

fn schema_of<'document>(document: &'document Value, name: &str) -> &'document Value {
    let schema = &document["components"]["schemas"][name];
    assert!(schema.is_object(), "schema {name} exists");
    schema
}

fn collect_references(value: &Value, references: &mut BTreeSet<String>) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object {
                if key == "$ref"
                    && let Value::String(reference) = inner
                {
                    references.insert(reference.clone());
                }
                collect_references(inner, references);
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_references(item, references)),
        _ => {}
    }
}

/// The `{name}`s of a path, in order.
fn path_names(path: &str) -> Vec<String> {
    path.split('{').skip(1).filter_map(|rest| rest.split('}').next()).map(str::to_owned).collect()
}

#[test]
fn every_binding_is_one_operation_with_its_method_path_status_and_parameters() {
    let document = document();
    let bindings = http_bindings(turbocat::proto::descriptor_pool()).expect("bindings");
    assert!(bindings.len() > 40, "the contract has its REST routes: {}", bindings.len());
    let mut operation_ids = HashSet::new();
    for binding in &bindings {
        let path = openapi::openapi_path(&binding.template);
        let method = binding.http_method.as_str().to_ascii_lowercase();
        let operation = operation(&document, &method, &path);
        assert_eq!(operation["x-grpc-method"], binding.grpc_path.as_str(), "{method} {path}");
        let operation_id = operation["operationId"].as_str().expect("operation id");
        assert!(operation_ids.insert(operation_id.to_owned()), "{operation_id} is unique");
        assert!(
            binding.grpc_path.ends_with(&format!("/{operation_id}")),
            "{operation_id} is the rpc name"
        );
        let success = binding.success_status.as_u16().to_string();
        assert!(operation["responses"][&success].is_object(), "{operation_id} answers {success}");
        for error in ["400", "404", "409", "429", "500", "default"] {
            assert!(operation["responses"][error].is_object(), "{operation_id} documents {error}");
        }

        let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
        let declared_path: Vec<String> = parameters
            .iter()
            .filter(|parameter| parameter["in"] == "path")
            .map(|parameter| {
                assert_eq!(parameter["required"], true, "{operation_id}: path parameters");
                parameter["name"].as_str().expect("name").to_owned()
            })
            .collect();
        assert_eq!(declared_path, path_names(&path), "{operation_id}: path parameters");
        assert_eq!(declared_path.len(), binding.path_variables.len(), "{operation_id}");
        assert!(!path.contains("{p0}") && !path.contains('.'), "{path} has proper names");

        let has_body = operation["requestBody"].is_object();
        assert_eq!(has_body, binding.body != BodyMapping::None, "{operation_id}: body");
        let is_public = binding.grpc_path.starts_with("/turbocat.v1.AuthService/");
        assert_eq!(operation["security"] == json!([]), is_public, "{operation_id}: security");
        if !is_public {
            assert!(operation["responses"]["401"].is_object(), "{operation_id} documents 401");
            assert!(operation["responses"]["403"].is_object(), "{operation_id} documents 403");
        }
    }
    let documented: usize = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().expect("path item").len())
        .sum();
    // Every operation is a binding, but for the deployments' signed webhook (hand-written).
    assert_eq!(documented, bindings.len() + 1, "no operation without a binding");
    let webhook = operation(&document, "post", "/api/v1/webhooks/{deploymentId}");
    assert_eq!(webhook["security"], json!([]), "the signature authenticates the webhook");
    assert!(webhook["responses"]["202"].is_object() && webhook["responses"]["401"].is_object());
    assert_eq!(document["openapi"], "3.1.0");
}

#[test]
fn shapes_follow_what_the_rest_edge_accepts_and_answers() {
    let document = document();
    let mut references = BTreeSet::new();
    collect_references(&document, &mut references);
    assert!(references.len() > 20, "{references:?}");
    for reference in &references {
        resolve(&document, reference);
    }

    // Path names come from the proto template; creates answer 201, actions that start work 202.
    let get_agent = operation(&document, "get", "/api/v1/agents/{agent_id}");
    assert!(get_agent["responses"]["200"]["headers"]["ETag"].is_object(), "{get_agent}");
    assert!(get_agent["description"].as_str().expect("text").contains("AgentService/GetAgent"));
    let update_agent = operation(&document, "patch", "/api/v1/agents/{agent_id}");
    let if_match: Vec<&Value> = update_agent["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|parameter| parameter["in"] == "header" && parameter["name"] == "If-Match")
        .collect();
    assert_eq!(if_match.len(), 1, "{update_agent}");
    let update_body = &update_agent["requestBody"]["content"]["application/json"];
    assert_eq!(update_body["schema"]["$ref"], "#/components/schemas/AgentInput");
    assert!(update_body["example"].get("id").is_none(), "the path names the agent");
    let created = &operation(&document, "post", "/api/v1/agents")["responses"]["201"];
    assert_eq!(
        created["links"]["GetAgent"]["parameters"]["agent_id"], "$response.body#/data/id",
        "a create links to the operations on what it made: {created}"
    );
    assert!(
        created["links"]["UpdateAgent"].is_object() && created["links"]["DeleteAgent"].is_object()
    );
    let execute = operation(&document, "post", "/api/v1/workflows/{workflow_id}/execute");
    assert!(execute["responses"]["202"].is_object());
    assert!(operation(&document, "post", "/api/v1/auth/register")["responses"]["201"].is_object());

    // The success envelope, with the data named by response_body and the page in meta.
    let list_agents = operation(&document, "get", "/api/v1/agents");
    assert!(
        list_agents["description"].as_str().expect("text").contains("The caller's agents"),
        "proto comments become descriptions"
    );
    let envelope = &list_agents["responses"]["200"]["content"]["application/json"]["schema"];
    assert_eq!(envelope["required"], json!(["success", "data", "meta"]));
    assert_eq!(envelope["properties"]["success"]["const"], true);
    assert_eq!(envelope["properties"]["data"]["type"], "array");
    assert_eq!(envelope["properties"]["data"]["items"]["$ref"], "#/components/schemas/Agent");
    assert_eq!(
        envelope["properties"]["meta"]["properties"]["pagination"]["$ref"],
        "#/components/schemas/Pagination"
    );
    let example = &list_agents["responses"]["200"]["content"]["application/json"]["example"];
    assert!(example["meta"]["pagination"]["pageSize"].is_number(), "{example}");
    let query: BTreeSet<&str> = list_agents["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .filter(|parameter| parameter["in"] == "query")
        .map(|parameter| parameter["name"].as_str().expect("name"))
        .collect();
    let expected: BTreeSet<&str> =
        ["page", "pageSize", "sort", "search", "type", "status", "tag"].into_iter().collect();
    assert_eq!(query, expected);
    let get_user = operation(&document, "get", "/api/v1/users/me");
    let meta = &get_user["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
        ["meta"];
    assert_eq!(meta["$ref"], "#/components/schemas/Meta", "no pagination outside lists");

    // Messages in the proto3 JSON mapping as the edge writes them.
    let agent = schema_of(&document, "Agent");
    assert_eq!(agent["additionalProperties"], false);
    let required: BTreeSet<&str> =
        agent["required"].as_array().expect("required").iter().filter_map(Value::as_str).collect();
    assert!(required.contains("createdAt") && required.contains("tags"), "{agent}");
    let agent_type = &agent["properties"]["type"];
    let type_names =
        agent_type["enum"].as_array().or_else(|| agent_type["allOf"][0]["enum"].as_array());
    let type_names: Vec<&str> =
        type_names.expect("enum").iter().filter_map(Value::as_str).collect();
    assert!(type_names.contains(&"CODE") && type_names.contains(&"UNSPECIFIED"), "{type_names:?}");
    let input_type = &schema_of(&document, "AgentInput")["properties"]["type"];
    let input_names = input_type["enum"].as_array().expect("enum");
    assert!(!input_names.contains(&json!("UNSPECIFIED")), "the zero value is refused on input");
    assert!(schema_of(&document, "AgentInput").get("required").is_none(), "input is optional");
    let created_at = &agent["properties"]["createdAt"]["anyOf"];
    assert_eq!(created_at[0]["format"], "date-time", "{agent}");
    assert_eq!(created_at[1]["type"], "null");
    assert_eq!(agent["properties"]["version"]["type"], "integer");
    let config = schema_of(&document, "AgentConfig");
    assert!(config.get("required").is_none(), "oneof members are optional: {config}");
    assert!(config["not"]["anyOf"].as_array().is_some_and(|rules| !rules.is_empty()));
    let event = schema_of(&document, "WatchExecutionResponse");
    assert_eq!(event["properties"]["sequence"]["type"], "string", "int64 is a string");
    let list_request_page = list_agents["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .find(|parameter| parameter["name"] == "pageSize")
        .expect("pageSize");
    assert_eq!(list_request_page["schema"]["type"], "integer");

    // The event stream, the errors and the security schemes.
    let events = operation(&document, "get", "/api/v1/executions/{execution_id}/events");
    let stream = &events["responses"]["200"]["content"]["text/event-stream"];
    assert_eq!(stream["x-event-schema"]["$ref"], "#/components/schemas/WatchExecutionResponse");
    assert!(
        events["parameters"]
            .as_array()
            .expect("parameters")
            .iter()
            .any(|p| p["name"] == "access_token")
    );
    let bad_request = &document["components"]["responses"]["BadRequest"];
    let example = &bad_request["content"]["application/json"]["example"];
    assert_eq!(example["error"]["code"], "VALIDATION_ERROR");
    assert!(example["error"]["details"][0]["field"].is_string());
    let codes = &schema_of(&document, "Error")["properties"]["code"]["enum"];
    for code in ["VALIDATION_ERROR", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "CONFLICT"] {
        assert!(codes.as_array().expect("codes").contains(&json!(code)), "{code}");
    }
    let rate_limited = &document["components"]["responses"]["RateLimited"];
    assert!(rate_limited["headers"]["Retry-After"].is_object());
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
    assert_eq!(schemes["apiKeyAuth"]["name"], "x-api-key");
    assert_eq!(document["security"], json!([{ "bearerAuth": [] }, { "apiKeyAuth": [] }]));
}

/// The Python of the schemathesis venv (`scripts/schemathesis --install` makes it).
fn venv_python() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("TURBOCAT_OPENAPI_PYTHON") {
        return Some(PathBuf::from(path));
    }
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/schemathesis-venv/bin/python");
    path.exists().then_some(path)
}

/// Validates the document as OpenAPI 3.1 and every example against the schema beside it.
const VALIDATE_SCRIPT: &str = r##"
import json, sys, urllib.parse
from openapi_spec_validator import validate
import jsonschema_rs

document = json.load(open(sys.argv[1]))
validate(document)

def escape(key):
    return key.replace("~", "~0").replace("/", "~1")

checked = 0
problems = []
def walk(node, pointer):
    global checked
    if isinstance(node, dict):
        if "schema" in node and "example" in node and isinstance(node["schema"], dict):
            root = dict(document)
            root["$ref"] = "#" + urllib.parse.quote(pointer + "/schema", safe="/~")
            validator = jsonschema_rs.Draft202012Validator(root)
            errors = [str(error) for error in validator.iter_errors(node["example"])]
            if errors:
                problems.append(pointer + ": " + "; ".join(errors[:3]))
            checked += 1
        for key, value in node.items():
            walk(value, pointer + "/" + escape(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            walk(value, pointer + "/" + str(index))

walk(document, "")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"valid; {checked} examples match their schemas")
"##;

#[test]
fn the_document_is_valid_openapi_3_1_and_its_examples_match_their_schemas() {
    let Some(python) = venv_python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the validator: scripts/schemathesis --install"
        );
        eprintln!("skipped: no schemathesis venv (scripts/schemathesis --install makes it)");
        return;
    };
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("openapi.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&document()).expect("json")).expect("write");
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(VALIDATE_SCRIPT)
        .arg(&path)
        .output()
        .expect("run the validator");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "invalid document:\n{stdout}\n{stderr}");
    assert!(stdout.contains("examples match"), "{stdout}");
    let checked: usize = stdout
        .split("; ")
        .nth(1)
        .and_then(|text| text.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .expect("a count");
    assert!(checked > 100, "examples were checked: {stdout}");

    // The validator does refuse a broken document.
    let mut broken = document();
    broken["paths"]["/api/v1/agents"]["get"]["responses"] = json!("none");
    std::fs::write(&path, serde_json::to_vec(&broken).expect("json")).expect("write");
    let output = std::process::Command::new(&python)
        .arg("-c")
        .arg(VALIDATE_SCRIPT)
        .arg(&path)
        .output()
        .expect("run the validator");
    assert!(!output.status.success(), "a broken document is refused");
}

fn header<'headers>(headers: &'headers reqwest::header::HeaderMap, name: &str) -> &'headers str {
    headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default()
}

async fn served_document_and_docs_page(server: &TurbocatProcess) {
    let api = Api::new(server);
    let client = reqwest::Client::new();

    // The document, without credentials, exactly as generated.
    let (status, body, headers) =
        api.call(reqwest::Method::GET, openapi::DOCUMENT_PATH, &Auth::None, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(header(&headers, "content-type").starts_with("application/json"));
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    assert_eq!(body, document());

    // A live answer has exactly the documented fields.
    let account = api.register("docs@example.com", "Docs Reader").await;
    let (status, me) = api.get("/api/v1/users/me", &account.auth()).await;
    assert_eq!(status, 200, "{me}");
    let user = schema_of(&body, "User");
    let documented: BTreeSet<&str> =
        user["required"].as_array().expect("required").iter().filter_map(Value::as_str).collect();
    let answered: BTreeSet<&str> =
        me["data"].as_object().expect("data").keys().map(String::as_str).collect();
    assert_eq!(answered, documented);
    let meta: BTreeSet<&str> =
        me["meta"].as_object().expect("meta").keys().map(String::as_str).collect();
    assert_eq!(meta, ["requestId", "timestamp"].into_iter().collect());

    // The page, with a CSP that allows only this origin, and its assets.
    let response = client
        .get(format!("{}{}", server.base_url(), openapi::DOCS_PATH))
        .send()
        .await
        .expect("docs");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "content-security-policy"), openapi::DOCS_CONTENT_SECURITY_POLICY);
    assert_eq!(header(&headers, "x-frame-options"), "DENY");
    assert!(!header(&headers, "x-request-id").is_empty(), "the shared layers still apply");
    let page = response.text().await.expect("page");
    assert!(page.contains(r#"<script src="/docs/assets/swagger-ui-bundle.js">"#), "{page}");
    assert!(!page.contains("http://") && !page.contains("https://"), "no CDN: {page}");
    let assets_directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/swagger-ui");
    for (asset, content_type, file) in [
        ("swagger-ui-bundle.js", "text/javascript; charset=utf-8", Some("swagger-ui-bundle.js")),
        ("swagger-ui.css", "text/css; charset=utf-8", Some("swagger-ui.css")),
        ("docs.js", "text/javascript; charset=utf-8", None),
        ("favicon-32x32.png", "image/png", Some("favicon-32x32.png")),
        ("LICENSE", "text/plain; charset=utf-8", Some("LICENSE")),
    ] {
        let response = client
            .get(format!("{}/docs/assets/{asset}", server.base_url()))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), 200, "{asset}");
        assert_eq!(header(response.headers(), "content-type"), content_type, "{asset}");
        assert_eq!(header(response.headers(), "x-content-type-options"), "nosniff");
        let bytes = response.bytes().await.expect("asset bytes");
        match file {
            Some(file) => {
                let expected = std::fs::read(assets_directory.join(file)).expect("vendored file");
                assert!(bytes.as_ref() == expected.as_slice(), "{asset} is the vendored file");
            }
            None => {
                let script = String::from_utf8_lossy(&bytes);
                assert!(script.contains(openapi::DOCUMENT_PATH), "{script}");
            }
        }
    }
    let (status, body, _) =
        api.call(reqwest::Method::GET, "/docs/assets/nothing.js", &Auth::None, None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_the_document_and_the_docs_page() {
    let (server, _directory) = start_dev(&[]);
    served_document_and_docs_page(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_serves_the_document_and_the_docs_page() {
    let (server, _database) = start_serve(&[]).await;
    served_document_and_docs_page(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_lists_every_operation_in_a_headless_browser() {
    if crate::support::chromium_missing() {
        return;
    }
    let (server, _directory) = start_dev(&[]);
    let url = format!("{}{}", server.base_url(), openapi::DOCS_PATH);
    let profile = tempfile::tempdir().expect("profile directory");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--virtual-time-budget=15000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url)
            .output()
    })
    .await
    .expect("join")
    .expect("run chromium");
    let dom = String::from_utf8_lossy(&output.stdout);
    let document = document();
    let mut missing = Vec::new();
    let mut count = 0;
    for (_, item) in document["paths"].as_object().expect("paths") {
        for (_, operation) in item.as_object().expect("path item") {
            count += 1;
            let tag = operation["tags"][0].as_str().expect("tag");
            let operation_id = operation["operationId"].as_str().expect("operation id");
            // Swagger UI renders each operation as a link to `#/<tag>/<operationId>`.
            if !dom.contains(&format!("href=\"#/{tag}/{operation_id}\"")) {
                missing.push(operation_id.to_owned());
            }
        }
    }
    assert!(count > 40, "{count} operations");
    assert!(
        missing.is_empty(),
        "the page shows every operation; missing {missing:?}\n{}",
        &dom[..dom.len().min(2000)]
    );
}
