//! A cron deployment on two `serve` replicas fires exactly once per tick over a minute, while
//! each replica in turn is killed (SIGKILL) and started again: the claim of a tick and the
//! start of its execution are one transaction, so a replica that dies mid-tick leaves the tick
//! to the other, and no tick is fired twice or lost.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::support::api::{Api, Auth};
use crate::support::{start_serve, start_serve_replica};
use crate::{Bench, unique_prefix};

/// Seconds between ticks: long enough that a tick fired late (a replica killed in its
/// transaction, the other polling 0.5 s later) still falls in its own period.
const PERIOD_SECONDS: i64 = 3;

/// The executions of a deployment, as (created at, id).
async fn executions_of(
    api: &Api,
    auth: &Auth,
    deployment_id: &str,
) -> Vec<(DateTime<Utc>, String)> {
    let (status, body) = api
        .get(&format!("/api/v1/executions?deploymentId={deployment_id}&pageSize=100"), auth)
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|execution| {
            let created = execution["createdAt"].as_str().expect("createdAt");
            let created = DateTime::parse_from_rfc3339(created).expect("a time").to_utc();
            (created, execution["id"].as_str().expect("id").to_owned())
        })
        .collect()
}

/// The ticks named by the deployment's TRIGGERED events.
async fn triggered_ticks(api: &Api, auth: &Auth, deployment_id: &str) -> Vec<DateTime<Utc>> {
    let (status, body) =
        api.get(&format!("/api/v1/deployments/{deployment_id}/logs?pageSize=100"), auth).await;
    assert_eq!(status, 200, "{body}");
    body["data"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|entry| entry["kind"] == "LIFECYCLE" && entry["event"] == "TRIGGERED")
        .map(|entry| {
            let message = entry["message"].as_str().unwrap_or_default();
            let tick = message
                .strip_prefix("cron tick ")
                .and_then(|rest| rest.split_once(": started execution").map(|(tick, _)| tick))
                .unwrap_or_else(|| panic!("not a cron trigger: {message}"));
            DateTime::parse_from_rfc3339(tick).expect("a tick").to_utc()
        })
        .collect()
}

/// The period a time falls in (ticks fall on multiples of `PERIOD_SECONDS`).
fn period_of(at: DateTime<Utc>) -> i64 {
    at.timestamp().div_euclid(PERIOD_SECONDS)
}

async fn post_ok(api: &Api, auth: &Auth, path: &str) {
    let (status, body) = api.post(path, auth, json!({})).await;
    assert_eq!(status, 200, "{path}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_fires_once_per_tick_across_replica_kills() {
    let prefix = unique_prefix();
    let (mut first, database) = start_serve(&["--redis-key-prefix", &prefix]).await;
    let mut second = start_serve_replica(&database, &["--redis-key-prefix", &prefix]).await;
    let bench = Bench::new(Api::new(&first), "cron-kills@example.com").await;
    // No runner: the executions only have to exist, one per tick.
    let agent_id = bench.jq("tick", "{ tick: true }").await;
    let (status, body) = bench
        .api
        .post(
            "/api/v1/deployments",
            &bench.auth,
            json!({
                "name": "Every three seconds",
                "agentId": agent_id,
                "trigger": { "type": "CRON", "cronExpression": format!("*/{PERIOD_SECONDS} * * * * *") },
            }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let deployment_id = body["data"]["id"].as_str().expect("id").to_owned();
    post_ok(&bench.api, &bench.auth, &format!("/api/v1/deployments/{deployment_id}/start")).await;
    let started_at = Utc::now();

    // A minute: each replica in turn is killed for ten seconds; one of them is always up, and
    // one of the two kills hits the replica that fired the ticks before it.
    tokio::time::sleep(Duration::from_secs(12)).await;
    first.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let _first_again = start_serve_replica(&database, &["--redis-key-prefix", &prefix]).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    second.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let second_again = start_serve_replica(&database, &["--redis-key-prefix", &prefix]).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let api = Api::new(&second_again);
    post_ok(&api, &bench.auth, &format!("/api/v1/deployments/{deployment_id}/stop")).await;
    let stopped_at = Utc::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One execution in every period between the start and the stop, never two.
    let executions = executions_of(&api, &bench.auth, &deployment_id).await;
    let mut per_period: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for (created_at, id) in &executions {
        per_period.entry(period_of(*created_at)).or_default().push(id);
    }
    let doubled: Vec<_> = per_period.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(doubled.is_empty(), "a tick fired twice: {doubled:?}");
    let first_period = period_of(started_at) + 1;
    let last_period = period_of(stopped_at) - 1;
    let missed: Vec<i64> =
        (first_period..=last_period).filter(|period| !per_period.contains_key(period)).collect();
    assert!(missed.is_empty(), "ticks lost (periods {missed:?}): {per_period:?}");
    assert!(executions.len() >= 18, "a minute of ticks: {}", executions.len());

    // The bookkeeping agrees: every TRIGGERED event names a distinct tick that has its
    // execution. (The event is written just after the execution's commit, so a replica killed
    // in between may leave one execution without its event, never an event without one.)
    let ticks = triggered_ticks(&api, &bench.auth, &deployment_id).await;
    let mut distinct = ticks.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ticks.len(), "a tick recorded twice: {ticks:?}");
    assert!(ticks.len() <= executions.len() && ticks.len() + 2 >= executions.len(), "{ticks:?}");
    for tick in &ticks {
        assert!(per_period.contains_key(&period_of(*tick)), "{tick} has no execution");
    }
}
