//! Scenario 5: memory, and what an idle installation costs. Resident memory of the server when
//! idle (fresh, one runner attached), at its peak under scenario 2's batches, after that load
//! (at once and after a pause), and with many idle runners attached (runner streams this bench
//! opens over gRPC, each on its own connection, saying hello and heartbeating like a real
//! runner). The CPU, transactions and Redis commands per second of the idle installation, and
//! of the installation holding the idle runners, are reported beside.
//! May call: the installation, the server's RunnerService, the measure module, the report.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use turbocat::proto::v1 as pb;
use turbocat::proto::v1::runner_service_client::RunnerServiceClient;

use crate::installation::Installation;
use crate::measure::{megabytes, resident_bytes};
use crate::report::{Column, Entry, Report, Round, cost_columns, print_table};
use crate::{Mode, Outcome, Scenario, Sizes};

/// Runner streams opened at once while attaching the idle runners.
const ATTACHING_AT_ONCE: usize = 50;

/// Measures the idle installation (called once it is up with one runner).
pub async fn measure_idle(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let costs =
        installation.probe.measure_idle(Duration::from_secs_f64(sizes.idle_seconds)).await?;
    let mut round = Round::default();
    costs.record_per(costs.seconds, "second", &mut round);
    let runners = installation.runners_label(installation.one_runner());
    let mut entry =
        Entry::new(Some(installation.mode), Scenario::Memory, &format!("idle, {runners}"));
    entry.add_round(round);
    report.add(entry);
    installation.memory.server_idle_bytes = resident_bytes(installation.server.pid());
    installation.memory.runner_idle_bytes =
        installation.runners.first().and_then(|runner| resident_bytes(runner.pid()));
    Ok(())
}

pub async fn run(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let server_pid = installation.server.pid();
    let memory = installation.memory.clone();
    let mut round = Round::default();
    let set_megabytes = |round: &mut Round, name: &str, bytes: Option<u64>| {
        if let Some(bytes) = bytes {
            round.set(name, "MB", megabytes(bytes));
        }
    };
    set_megabytes(&mut round, "rss_mb_server_idle", memory.server_idle_bytes);
    set_megabytes(&mut round, "rss_mb_runner_idle", memory.runner_idle_bytes);
    set_megabytes(&mut round, "rss_mb_server_peak_under_load", memory.server_peak_under_load_bytes);
    set_megabytes(&mut round, "rss_mb_runner_peak_under_load", memory.runner_peak_under_load_bytes);
    set_megabytes(&mut round, "rss_mb_server_after_load", resident_bytes(server_pid));
    // Read every second of the pause: whether the server gives memory back, and when.
    let pause = Duration::from_secs_f64(sizes.pause_after_load_seconds);
    let paused = std::time::Instant::now();
    let mut after_5_seconds = None;
    while paused.elapsed() < pause {
        tokio::time::sleep(Duration::from_secs(1).min(pause.saturating_sub(paused.elapsed())))
            .await;
        if after_5_seconds.is_none() && paused.elapsed() >= Duration::from_secs(5) {
            after_5_seconds = resident_bytes(server_pid);
        }
    }
    set_megabytes(&mut round, "rss_mb_server_after_5_seconds", after_5_seconds);
    set_megabytes(&mut round, "rss_mb_server_after_pause", resident_bytes(server_pid));
    round.note(&format!(
        "\"after load\" is read when this scenario starts (after scenarios 1-3 when they ran), \"after 5 s\" and \"after pause\" 5 and {} s later",
        sizes.pause_after_load_seconds
    ));

    let attached_before = installation.client.runner_count().await?;
    let before_bytes = resident_bytes(server_pid);
    let idle_runners = attach_idle_runners(
        &installation.client.base_url,
        &installation.runner_key,
        sizes.idle_runners,
    )
    .await?;
    installation
        .client
        .wait_for_runners(attached_before + sizes.idle_runners, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let costs =
        installation.probe.measure_idle(Duration::from_secs_f64(sizes.idle_seconds)).await?;
    let with_bytes = resident_bytes(server_pid);
    set_megabytes(&mut round, "rss_mb_server_with_idle_runners", with_bytes);
    if let (Some(before), Some(with)) = (before_bytes, with_bytes) {
        round.set("rss_mb_added_by_idle_runners", "MB", megabytes(with.saturating_sub(before)));
    }
    round.set("idle_runners", "", sizes.idle_runners as f64);
    let mut entry = Entry::new(Some(installation.mode), Scenario::Memory, "resident memory");
    entry.add_round(round);
    report.add(entry);

    let mut idle_round = Round::default();
    costs.record_per(costs.seconds, "second", &mut idle_round);
    let variant = format!("idle, {} idle runner streams attached", sizes.idle_runners);
    let mut idle_entry = Entry::new(Some(installation.mode), Scenario::Memory, &variant);
    idle_entry.add_round(idle_round);
    report.add(idle_entry);

    for runner in idle_runners {
        runner.abort();
    }
    installation.client.wait_for_runners(attached_before, Duration::from_secs(60)).await
}

/// Opens `count` runner streams, each on its own connection: hello, then heartbeats at the
/// interval the server asks for, until the task is aborted.
async fn attach_idle_runners(
    base_url: &str,
    api_key: &str,
    count: usize,
) -> Outcome<Vec<tokio::task::JoinHandle<()>>> {
    let attaching = futures::stream::iter(0..count)
        .map(|index| attach_one(base_url.to_owned(), api_key.to_owned(), index))
        .buffer_unordered(ATTACHING_AT_ONCE);
    let attached: Vec<Outcome<tokio::task::JoinHandle<()>>> = attaching.collect().await;
    attached.into_iter().collect()
}

async fn attach_one(
    base_url: String,
    api_key: String,
    index: usize,
) -> Outcome<tokio::task::JoinHandle<()>> {
    let channel = tonic::transport::Endpoint::from_shared(base_url)?.connect().await?;
    let mut client = RunnerServiceClient::new(channel);
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let hello = pb::RunnerHello {
        name: format!("idle-{index}"),
        labels: HashMap::from([("bench".to_owned(), "idle".to_owned())]),
        agent_types: vec![pb::AgentType::Data as i32],
        capacity: 1,
        runner_version: "bench".to_owned(),
        ..Default::default()
    };
    sender
        .send(pb::AttachRequest { message: Some(pb::attach_request::Message::Hello(hello)) })
        .await
        .map_err(|_| "the runner stream closed")?;
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    request.metadata_mut().insert("x-api-key", api_key.parse()?);
    let mut responses = client.attach(request).await?.into_inner();
    let accepted = match responses.message().await?.and_then(|response| response.message) {
        Some(pb::attach_response::Message::Accepted(accepted)) => accepted,
        other => return Err(format!("the server answered hello with {other:?}").into()),
    };
    let interval = accepted
        .heartbeat_interval
        .and_then(|interval| u64::try_from(interval.seconds).ok())
        .filter(|seconds| *seconds > 0)
        .map_or(Duration::from_secs(5), Duration::from_secs);
    Ok(tokio::spawn(async move {
        let _client = client;
        let mut heartbeat = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let beat = pb::AttachRequest { message: Some(pb::attach_request::Message::Heartbeat(pb::Heartbeat::default())) };
                    if sender.send(beat).await.is_err() {
                        return;
                    }
                }
                message = responses.message() => {
                    if !matches!(message, Ok(Some(_))) {
                        return;
                    }
                }
            }
        }
    }))
}

pub fn print(report: &Report, mode: Mode) {
    let entries = report.entries_of(Some(mode), Scenario::Memory);
    let memory: Vec<_> =
        entries.iter().copied().filter(|entry| entry.variant == "resident memory").collect();
    let idle: Vec<_> =
        entries.iter().copied().filter(|entry| entry.variant != "resident memory").collect();
    let columns = vec![
        Column::new("rss_mb_server_idle", "server idle MB"),
        Column::new("rss_mb_server_peak_under_load", "peak under s2"),
        Column::new("rss_mb_server_after_load", "after load"),
        Column::new("rss_mb_server_after_5_seconds", "after 5 s"),
        Column::new("rss_mb_server_after_pause", "after pause"),
        Column::new("rss_mb_added_by_idle_runners", "+ idle runners"),
        Column::new("rss_mb_runner_idle", "runner idle MB"),
        Column::new("rss_mb_runner_peak_under_load", "runner peak"),
    ];
    print_table(
        &format!("{} · scenario 5 · resident memory (MB)", mode.name()),
        &memory,
        &columns,
        true,
    );
    print_table(
        &format!("{} · idle installation · costs per second", mode.name()),
        &idle,
        &cost_columns("second"),
        false,
    );
}
