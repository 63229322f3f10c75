//! Tenants cannot reach each other through runners: a runner's right to work is re-checked
//! when its key or the key's owner changes, on every replica.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::runners::{runner_id, wait_for_runners};
use crate::support::api::{Api, Auth};
use crate::support::{start_serve, start_serve_replica};
use crate::{RunnerProcess, Workbench, step};

const LIMIT: Duration = Duration::from_secs(90);

/// The runners `auth` sees, by name: (id, ownerId).
async fn listed_runners(api: &Api, auth: &Auth) -> Vec<(String, String, String)> {
    let (status, body) = api.get("/api/v1/runners", auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .map(|runners| {
            runners
                .iter()
                .map(|runner| {
                    let text = |field: &str| runner[field].as_str().unwrap_or_default().to_owned();
                    (text("name"), text("id"), text("ownerId"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Logs in again (a role change ends every session) and returns the new credentials.
async fn log_in(api: &Api, email: &str, password: &str) -> Auth {
    let (status, body) = api.login(email, password).await;
    assert_eq!(status, 200, "{body}");
    Auth::bearer(body["data"]["accessToken"].as_str().expect("access token"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_key_is_demoted_or_revoked_is_withdrawn_on_every_replica() {
    // A lease far longer than the test waits: steps come back by withdrawal, not by expiry.
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    let flags = ["--redis-key-prefix", redis_prefix.as_str(), "--runner-lease-seconds", "120"];
    let (first, database) = start_serve(&flags).await;
    let second = start_serve_replica(&database, &flags).await;
    let api = Api::new(&first);
    let root = api.register("root@example.com", "Root").await;
    let fleet = api.register("fleet@example.com", "Fleet Admin").await;
    let (status, body) = api
        .patch(
            &format!("/api/v1/users/{}/role", fleet.id),
            &root.auth(),
            json!({ "role": "ADMIN" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let fleet_auth = log_in(&api, &fleet.email, &fleet.password).await;
    let (status, body) = api
        .post(
            "/api/v1/api-keys",
            &fleet_auth,
            json!({ "name": "fleet", "scopes": ["RUNNER"], "shared": true }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let shared_key = body["data"]["key"].as_str().expect("key").to_owned();
    let shared_key_id = body["data"]["apiKey"]["id"].as_str().expect("key id").to_owned();

    // The shared runner attaches to the second replica and serves another user, bob.
    let mut shared_runner =
        RunnerProcess::start(&second.base_url(), &shared_key, "fleet-box", 2, "", &[]);
    let bob = Workbench::new(Api::new(&first), "bob@example.com").await;
    let listed = wait_for_runners(&bob.api, &bob.auth, &["fleet-box"]).await;
    let fleet_box = runner_id(&listed, "fleet-box");
    let nap = bob
        .code(
            "nap",
            "python",
            "import json, time\ntime.sleep(4)\nprint(json.dumps({'rested': True}))\n",
            json!({}),
        )
        .await;
    let workflow = bob.workflow("rest", json!([{ "key": "nap", "agentId": nap }]), json!({})).await;
    let served = bob.execute(&workflow, json!({})).await;
    let execution = bob.finished(&served, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "a valid shared key serves bob: {execution}");
    assert_eq!(step(&execution, "nap")["runnerId"], fleet_box.as_str());

    // Bob's next step is running on it when its key's owner is demoted (on the first replica).
    let execution_id = bob.execute(&workflow, json!({})).await;
    bob.wait_for(&execution_id, LIMIT, "running on the shared runner", |execution| {
        step(execution, "nap")["status"] == "RUNNING"
    })
    .await;
    let (status, body) = api
        .patch(&format!("/api/v1/users/{}/role", fleet.id), &root.auth(), json!({ "role": "USER" }))
        .await;
    assert_eq!(status, 200, "{body}");
    // The step comes back to the queue at once (the lease has two minutes to go) and waits:
    // no runner serves bob any more.
    let requeued = bob
        .wait_for(&execution_id, Duration::from_secs(30), "taken back", |execution| {
            step(execution, "nap")["attempt"] == 2
        })
        .await;
    let nap_step = step(&requeued, "nap");
    assert_eq!(nap_step["status"], "QUEUED", "{nap_step}");
    assert_eq!(nap_step["attempts"][0]["runnerId"], fleet_box.as_str(), "{nap_step}");
    assert_eq!(nap_step["attempts"][0]["status"], "LEASE_LOST", "{nap_step}");

    // The runner attached again with what its key grants now: its owner's runner only.
    let started = Instant::now();
    loop {
        let everyone = listed_runners(&api, &root.auth()).await;
        let fleet_runners: Vec<&(String, String, String)> =
            everyone.iter().filter(|(name, _, _)| name == "fleet-box").collect();
        if fleet_runners.len() == 1 && fleet_runners[0].2 == fleet.id {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not re-attached as fleet's own: {everyone:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        listed_runners(&bob.api, &bob.auth).await.is_empty(),
        "bob sees no runner of another user"
    );
    let waiting = bob.execution(&execution_id).await;
    assert_eq!(
        step(&waiting, "nap")["status"],
        "QUEUED",
        "not run by fleet's own runner: {waiting}"
    );

    // Its key revoked, the runner is detached and refused: it exits.
    let fleet_auth = log_in(&api, &fleet.email, &fleet.password).await;
    let (status, body) =
        api.delete(&format!("/api/v1/api-keys/{shared_key_id}"), &fleet_auth).await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    while shared_runner.child.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the runner of a revoked key still runs: {}",
            shared_runner.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other_replica = Api::new(&second);
    let started = Instant::now();
    while !listed_runners(&other_replica, &root.auth()).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "a revoked runner is still listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A runner with a valid key of bob's still takes bob's step.
    let (bob_key, _) = bob.api.create_key(&bob.auth, "bob runner", &["RUNNER"]).await;
    let _bob_runner = RunnerProcess::start(&first.base_url(), &bob_key, "bob-box", 1, "", &[]);
    let execution = bob.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    let nap_step: &Value = step(&execution, "nap");
    assert_eq!(nap_step["attempt"], 2, "{nap_step}");
    assert_ne!(nap_step["runnerId"], fleet_box.as_str(), "{nap_step}");
}

/// A loopback HTTP server that counts its requests; returns its base URL and the count.
async fn private_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let router = axum::Router::new().route(
        "/internal",
        axum::routing::get(move || {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({ "secret": "internal" }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (format!("http://{address}"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_administrator_opens_private_networks() {
    use std::sync::atomic::Ordering;
    let (server, data) = crate::support::start_dev(&[]);
    let api = Api::new(&server);
    let admin = api.register("ssrf-admin@example.com", "Admin").await;
    let user = Workbench::new(Api::new(&server), "ssrf-user@example.com").await;
    let (base, hits) = private_server().await;
    let open = |url: &str| json!({ "api": { "method": "GET", "urlTemplate": url, "allowPrivateNetwork": true } });
    let url = format!("{base}/internal");

    // A user cannot turn the guard off, over REST or gRPC, creating or updating.
    let (status, body) = api
        .post(
            "/api/v1/agents",
            &user.auth,
            json!({ "name": "probe", "type": "API", "config": open(&url) }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("config.api.allowPrivateNetwork"), "{body}");
    let mut agents =
        turbocat::proto::v1::agent_service_client::AgentServiceClient::new(api.channel().await);
    let refused = agents
        .create_agent(crate::support::api::grpc(
            turbocat::proto::v1::CreateAgentRequest {
                agent: Some(turbocat::proto::v1::Agent {
                    name: "probe".into(),
                    r#type: turbocat::proto::v1::AgentType::Llm as i32,
                    config: Some(turbocat::proto::v1::AgentConfig {
                        kind: Some(turbocat::proto::v1::agent_config::Kind::Llm(
                            turbocat::proto::v1::LlmAgentConfig {
                                base_url: format!("{base}/v1"),
                                model: "m".into(),
                                prompt_template: "hi".into(),
                                allow_private_network: true,
                                ..Default::default()
                            },
                        )),
                    }),
                    ..Default::default()
                }),
            },
            &user.auth,
        ))
        .await
        .expect_err("a user opens no private network");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let guarded = user
        .agent(
            "guarded",
            "API",
            json!({ "api": { "method": "GET", "urlTemplate": url } }),
            json!({}),
        )
        .await;
    let (status, body) = api
        .patch(
            &format!("/api/v1/agents/{guarded}"),
            &user.auth,
            json!({ "config": open(&url), "version": 1 }),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    // An agent that got the flag before this rule (written straight to the store) runs with
    // the guard on: refused, nothing sent.
    let store = crate::support::api::dev_store(data.path()).await;
    let agent_id: uuid::Uuid = guarded.parse().expect("id");
    let old = store
        .update_agent(
            turbocat::store::OwnerScope::All,
            agent_id,
            1,
            turbocat::store::AgentChanges { config: Some(open(&url)), ..Default::default() },
            uuid::Uuid::parse_str(&user_id(&user).await).expect("user id"),
        )
        .await
        .expect("an old flagged config");
    assert_eq!(old.version, 2);
    let workflow =
        user.workflow("probe", json!([{ "key": "probe", "agentId": guarded }]), json!({})).await;
    let execution_id = user.execute(&workflow, json!({})).await;
    let execution = user.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "FAILED", "{execution}");
    let error = execution["error"].as_str().unwrap_or_default();
    assert!(error.contains("loopback") && error.contains("allowPrivateNetwork"), "{error}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the private server was reached");

    // An administrator approves it (saves the config with the flag): it reaches its server,
    // and the user may save it unchanged, but not point it elsewhere.
    let (status, body) = api
        .patch(
            &format!("/api/v1/agents/{guarded}"),
            &admin.auth(),
            json!({ "config": open(&url), "version": 2 }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let execution_id = user.execute(&workflow, json!({})).await;
    let execution = user.finished(&execution_id, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(step(&execution, "probe")["output"]["body"]["secret"], "internal");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let (status, body) = api
        .patch(
            &format!("/api/v1/agents/{guarded}"),
            &user.auth,
            json!({ "config": open(&url), "name": "renamed", "version": 3 }),
        )
        .await;
    assert_eq!(status, 200, "an approved config saved unchanged: {body}");
    let elsewhere = format!("{base}/internal?other=1");
    let (status, body) = api
        .patch(
            &format!("/api/v1/agents/{guarded}"),
            &user.auth,
            json!({ "config": open(&elsewhere), "version": 4 }),
        )
        .await;
    assert_eq!(status, 403, "a changed config needs approval again: {body}");
}

async fn user_id(bench: &Workbench) -> String {
    let (status, body) = bench.api.get("/api/v1/users/me", &bench.auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"]["id"].as_str().expect("id").to_owned()
}

/// `{"v": {"v": … 1 …}}` nested `depth` levels deep (a scalar is one level).
fn nested(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 1..depth {
        value = json!({ "v": value });
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_payloads_fail_their_own_step_once_and_never_the_runner() {
    let (server, _database) = start_serve(&[]).await;
    let bench = Workbench::new(Api::new(&server), "poison@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let runner = RunnerProcess::start(&server.base_url(), &key, "sturdy", 2, "", &[]);
    let listed = wait_for_runners(&bench.api, &bench.auth, &["sturdy"]).await;
    let sturdy = runner_id(&listed, "sturdy");

    // Inputs nested too deep are refused at the edge, naming the field: 400, never a 500.
    let echo = bench.jq("echo", ".").await;
    let workflow =
        bench.workflow("echo", json!([{ "key": "echo", "agentId": echo }]), json!({})).await;
    for depth in [33, 49, 60] {
        let (status, body) = bench
            .api
            .post(
                &format!("/api/v1/workflows/{workflow}/execute"),
                &bench.auth,
                json!({ "input": { "deep": nested(depth) } }),
            )
            .await;
        let fields = crate::support::api::assert_error(status, &body, 400, "VALIDATION_ERROR");
        // Past what protobuf decoders take at all, the JSON does not even become a message:
        // the field it would have filled is named all the same.
        assert_eq!(fields, vec!["input"], "depth {depth}: {body}");
    }
    let mut client = turbocat::proto::v1::workflow_service_client::WorkflowServiceClient::new(
        bench.api.channel().await,
    );
    let refused = client
        .execute_workflow(crate::support::api::grpc(
            turbocat::proto::v1::ExecuteWorkflowRequest {
                workflow_id: workflow.clone(),
                input: Some(turbocat::proto::wkt::json_to_value(&json!({ "deep": nested(33) }))),
                ..Default::default()
            },
            &bench.auth,
        ))
        .await
        .expect_err("too deep");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    // Too deep for the server's decoder itself: still the caller's fault, not INTERNAL.
    let refused = client
        .execute_workflow(crate::support::api::grpc(
            turbocat::proto::v1::ExecuteWorkflowRequest {
                workflow_id: workflow.clone(),
                input: Some(turbocat::proto::wkt::json_to_value(&json!({ "deep": nested(60) }))),
                ..Default::default()
            },
            &bench.auth,
        ))
        .await
        .expect_err("undecodable");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let fine = bench.execute(&workflow, json!({ "input": { "deep": nested(30) } })).await;
    assert_eq!(bench.finished(&fine, LIMIT).await["status"], "SUCCEEDED");

    // Outputs the server cannot keep (a NUL character, PostgreSQL refuses it), nested deeper
    // than the limit, or deeper than a runner sends: each fails its step once, as its own
    // error, and the runner keeps its stream.
    let python = |expression: &str| {
        format!(
            "import json\ndef nest(n, wrap):\n    v = 1\n    for _ in range(n - 1):\n        v = wrap(v)\n    return v\nprint(json.dumps({expression}))\n"
        )
    };
    let cases = [
        ("nul", python("{'text': 'a\\u0000b'}"), "NUL character"),
        (
            "deep",
            python("nest(40, lambda v: [v])"),
            "nested 40 levels deep, deeper than the limit of 32",
        ),
        (
            "deeper",
            python("nest(60, lambda v: {'v': v})"),
            "nested 60 levels deep, deeper than a runner can send",
        ),
    ];
    for (name, source, expected) in cases {
        let agent = bench.code(name, "python", &source, json!({})).await;
        let poisoned = bench
            .workflow(
                name,
                json!([{ "key": "poison", "agentId": agent, "retryPolicy": { "maxAttempts": 3, "initialBackoff": "0.1s" } }]),
                json!({}),
            )
            .await;
        let execution_id = bench.execute(&poisoned, json!({})).await;
        let execution = bench.finished(&execution_id, LIMIT).await;
        assert_eq!(execution["status"], "FAILED", "{name}: {execution}");
        let poison = step(&execution, "poison");
        assert_eq!(poison["attempt"], 1, "{name}: not retried: {poison}");
        assert_eq!(poison["infraReassignments"], 0, "{name}: {poison}");
        assert_eq!(poison["runnerId"], sturdy.as_str(), "{name}: {poison}");
        let error = poison["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{name}: {error}");
    }
    // The same runner, never reconnected, still takes steps.
    let after = bench.execute(&workflow, json!({ "input": { "ok": true } })).await;
    let execution = bench.finished(&after, LIMIT).await;
    assert_eq!(execution["status"], "SUCCEEDED", "{execution}");
    assert_eq!(step(&execution, "echo")["runnerId"], sturdy.as_str());
    let runner_log = runner.stderr_text();
    assert_eq!(runner_log.matches("attached to the server").count(), 1, "{runner_log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_schedules_have_a_floor_and_users_a_limit_of_running_ones() {
    let (server, _data) = crate::support::start_dev(&["--max-active-cron-deployments", "2"]);
    let api = Api::new(&server);
    let admin = api.register("cron-admin@example.com", "Admin").await;
    let user = Workbench::new(Api::new(&server), "cron-user@example.com").await;
    let echo = user.jq("echo", ".").await;
    let cron = |name: &str, expression: &str| {
        json!({
            "name": name,
            "agentId": echo,
            "trigger": { "type": "CRON", "cronExpression": expression },
        })
    };

    // A user's schedule may not fire more often than once a minute (the default floor).
    for expression in ["* * * * * *", "*/30 * * * * *", "0,30 * * * * *"] {
        let (status, body) =
            api.post("/api/v1/deployments", &user.auth, cron("fast", expression)).await;
        let fields = crate::support::api::assert_error(status, &body, 400, "VALIDATION_ERROR");
        assert_eq!(fields, vec!["trigger.cronExpression"], "{expression}: {body}");
    }
    // Every minute is fine; an administrator may go down to every second.
    let mut running = Vec::new();
    for name in ["one", "two", "three"] {
        let (status, body) =
            api.post("/api/v1/deployments", &user.auth, cron(name, "0 * * * * *")).await;
        assert_eq!(status, 201, "{body}");
        running.push(body["data"]["id"].as_str().expect("id").to_owned());
    }
    let (status, body) =
        api.post("/api/v1/deployments", &admin.auth(), cron("admin fast", "* * * * * *")).await;
    assert_eq!(status, 201, "{body}");

    // At most two of the user's cron deployments run at once.
    let start = async |id: &str, auth: &Auth| {
        api.post(&format!("/api/v1/deployments/{id}/start"), auth, json!({})).await
    };
    for id in &running[..2] {
        let (status, body) = start(id, &user.auth).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = start(&running[2], &user.auth).await;
    crate::support::api::assert_error(status, &body, 429, "RATE_LIMITED");
    let (status, body) =
        api.post(&format!("/api/v1/deployments/{}/stop", running[0]), &user.auth, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = start(&running[2], &user.auth).await;
    assert_eq!(status, 200, "one stopped, another starts: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_whose_key_expires_is_detached_within_seconds() {
    let (server, _data) = crate::support::start_dev(&[]);
    let api = Api::new(&server);
    let _admin = api.register("expiry-admin@example.com", "Admin").await;
    let user = api.register("expiry-user@example.com", "User").await;
    let soon = (chrono::Utc::now() + chrono::Duration::seconds(6)).to_rfc3339();
    let create = async |name: &str, expires_at: Option<&str>| {
        let mut body = json!({ "name": name, "scopes": ["RUNNER"] });
        if let Some(expires_at) = expires_at {
            body["expiresAt"] = json!(expires_at);
        }
        let (status, answer) = api.post("/api/v1/api-keys", &user.auth(), body).await;
        assert_eq!(status, 201, "{answer}");
        answer["data"]["key"].as_str().expect("key").to_owned()
    };
    let expiring = create("expiring", Some(&soon)).await;
    let lasting = create("lasting", None).await;
    let mut doomed = RunnerProcess::start(&server.base_url(), &expiring, "doomed", 1, "", &[]);
    let _steady = RunnerProcess::start(&server.base_url(), &lasting, "steady", 1, "", &[]);
    // Both attach while the key is valid (this fails after 30 s otherwise).
    wait_for_runners(&api, &user.auth(), &["doomed", "steady"]).await;
    // Nothing but the clock changes: the periodic re-check detaches it, and it is refused.
    let started = Instant::now();
    while doomed.child.try_wait().expect("wait").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a runner of an expired key still runs: {}",
            doomed.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    loop {
        let names: Vec<String> =
            listed_runners(&api, &user.auth()).await.into_iter().map(|(name, _, _)| name).collect();
        // `local` is the shared runner `dev` starts in its own process.
        if names.contains(&"steady".to_owned()) && !names.contains(&"doomed".to_owned()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{names:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
