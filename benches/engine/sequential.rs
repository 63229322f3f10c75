//! Scenario 1: latency without a backlog. One runner, one execution at a time: a workflow of
//! 40 sequential no-op steps, and the 10-step chain alone, each with DATA and API steps. Each
//! execution is timed as a client watching its SSE stream sees it (from sending the execute
//! request to the event that says it finished) and from the server's timestamps (its
//! `createdAt` to its `finishedAt`).
//! May call: the installation, the client, the report.

use std::time::Instant;

use serde_json::json;

use crate::client::{Shape, StepKind, elapsed_ms, milliseconds_between};
use crate::installation::Installation;
use crate::report::{Column, Entry, Report, Round, cost_columns, print_table, summarize};
use crate::{Mode, Outcome, Scenario, Sizes};

pub async fn run(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let one_runner = installation.one_runner();
    installation.set_runners(one_runner).await?;
    let runners = installation.runners_label(one_runner);
    let shapes = [
        (Shape::Chain(40), sizes.long_chain_per_round),
        (Shape::Chain(10), sizes.short_chain_per_round),
    ];
    for (shape, per_round) in shapes {
        for kind in StepKind::BOTH {
            let variant = format!("{}, {} steps, {runners}", shape.name(), kind.name());
            let entry = run_variant(installation, sizes, shape, kind, per_round, &variant).await?;
            report.add(entry);
        }
    }
    Ok(())
}

async fn run_variant(
    installation: &mut Installation,
    sizes: &Sizes,
    shape: Shape,
    kind: StepKind,
    per_round: usize,
    variant: &str,
) -> Outcome<Entry> {
    let name = format!("sequential {variant}");
    let workflow =
        installation.client.workflow(&name, shape.definition(installation.agent(kind))).await?;
    let input = json!({ "tag": "sequential" });
    // Warm up: connections, prepared statements, the runner's first processes.
    for _ in 0..2 {
        run_one(installation, &workflow, &input).await?;
    }
    let mut rounds = Vec::new();
    let mut executions_by_round = Vec::new();
    for _ in 0..sizes.sequential_rounds {
        let window = installation.probe.begin().await?;
        let mut watched_ms = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..per_round {
            let (id, milliseconds) = run_one(installation, &workflow, &input).await?;
            watched_ms.push(milliseconds);
            ids.push(id);
        }
        let costs = installation.probe.end(window).await?;
        let mut round = Round::default();
        if let Some(summary) = summarize(&watched_ms) {
            round.set("latency_ms_sse", "ms", summary.median);
        }
        costs.record_per((per_round * shape.steps()) as f64, "step", &mut round);
        rounds.push(round);
        executions_by_round.push(ids);
    }
    // The server's timestamps, read after the measured windows.
    for (round, ids) in rounds.iter_mut().zip(&executions_by_round) {
        let mut server_ms = Vec::new();
        for id in ids {
            let execution = installation.client.execution(id).await?;
            if let Some(milliseconds) =
                milliseconds_between(&execution["createdAt"], &execution["finishedAt"])
            {
                server_ms.push(milliseconds);
            }
        }
        if let Some(summary) = summarize(&server_ms) {
            round.set("latency_ms_server", "ms", summary.median);
            round.set("ms_per_step_server", "ms", summary.median / shape.steps() as f64);
        }
    }
    let mut entry = Entry::new(Some(installation.mode), Scenario::Sequential, variant);
    for round in rounds {
        entry.add_round(round);
    }
    Ok(entry)
}

/// Starts one execution and watches it to its end; returns its id and the latency the
/// watching client saw.
async fn run_one(
    installation: &Installation,
    workflow: &str,
    input: &serde_json::Value,
) -> Outcome<(String, f64)> {
    let sent = Instant::now();
    let id = installation.client.execute(workflow, input).await?;
    let (status, finished) = installation.client.watch(&id).await?;
    if status != "SUCCEEDED" {
        let execution = installation.client.execution(&id).await?;
        return Err(format!("execution {id} ended {status}: {}", execution["error"]).into());
    }
    Ok((id, elapsed_ms(sent, finished)))
}

pub fn print(report: &Report, mode: Mode) {
    let entries = report.entries_of(Some(mode), Scenario::Sequential);
    let columns = vec![
        Column::new("latency_ms_sse", "ms, SSE watcher"),
        Column::new("latency_ms_server", "ms, server"),
        Column::new("ms_per_step_server", "ms/step, server"),
    ];
    print_table(
        &format!(
            "{} · scenario 1 · one execution at a time (median of each round; median (min–max) over rounds)",
            mode.name()
        ),
        &entries,
        &columns,
        false,
    );
    print_table(
        &format!("{} · scenario 1 · costs per step", mode.name()),
        &entries,
        &cost_columns("step"),
        true,
    );
}
