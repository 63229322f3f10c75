//! A queue entry the database does not know (a Redis that outlived its database, a restore, an
//! earlier installation on the same prefix) is dropped with one warning naming it, and the work
//! queued behind it runs. `serve` only: `dev`'s queue lives in its process and is rebuilt from
//! its own database, so it cannot hold such an entry.

use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use turbocat::queue::{Queue, QueueItem, RedisQueue, RedisQueueConfig};

use crate::support::api::Api;
use crate::support::{redis_url, start_serve};
use crate::{Bench, RunnerProcess, assert_every_step_ran_once, unique_prefix};

const DROPPED: &str = "dropping a queue entry the database does not know";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_entry_the_database_does_not_know_is_dropped_once_and_work_behind_it_runs() {
    let prefix = unique_prefix();
    let (server, _database) = start_serve(&["--redis-key-prefix", &prefix]).await;
    let bench = Bench::new(Api::new(&server), "dangling@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;

    // An entry of an earlier installation, first in line (most urgent, oldest), for a step
    // this user's runner could take.
    let pool = turbocat::redis_pool::connect_redis(&redis_url()).await.expect("redis");
    let queue = RedisQueue::new(
        pool,
        RedisQueueConfig { key_prefix: prefix.clone(), ..Default::default() },
    );
    let dangling = QueueItem {
        step_run_id: uuid::Uuid::now_v7(),
        attempt: 1,
        execution_id: uuid::Uuid::now_v7(),
        step_key: "gone".to_owned(),
        owner_id: bench.user_id.parse().expect("user id"),
        priority: turbocat::queue::MAX_PRIORITY,
        enqueued_at: Utc::now() - chrono::Duration::hours(1),
        agent_type: "DATA".to_owned(),
        required_labels: Default::default(),
    };
    queue.enqueue(dangling.clone()).await.expect("enqueue the dangling entry");

    // Real work queued behind it before any runner is there (so it goes through the queue).
    let double = bench.jq("double", "{n: (.n * 2)}").await;
    let workflow = bench
        .workflow(
            "behind",
            json!([{ "key": "double", "agentId": double, "inputMapping": { "n": 21 } }]),
        )
        .await;
    let first = bench.execute(&workflow).await;
    let second = bench.execute(&workflow).await;

    // One slot: while the dangling entry held it, nothing behind it could ever run.
    let runner = RunnerProcess::start(&server.base_url(), &key, "one-slot", 1, "", &[]);
    for execution_id in [&first, &second] {
        let execution = bench.finished(execution_id, Duration::from_secs(30)).await;
        assert_every_step_ran_once(&execution);
        assert_eq!(execution["stepRuns"][0]["output"]["n"], 42, "{execution}");
    }

    assert!(!queue.contains(dangling.key()).await.expect("contains"), "the entry was dropped");
    let log = crate::plain(&server.stderr_text());
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains(DROPPED)).collect();
    assert_eq!(warnings.len(), 1, "one warning for the entry:\n{log}");
    assert!(
        warnings[0].contains(&dangling.key().to_string()),
        "it names the entry: {}",
        warnings[0]
    );
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        !log.contains("a background task is failing"),
        "a dropped entry is not a failure of the dispatcher:\n{log}"
    );
    drop(runner);
}
