//! Scenario 2: throughput under a backlog. A batch of executions of a 10-step DAG (a chain, and
//! a fan-out 1+8+1) is submitted at once; steps/s runs from the first execution's creation to
//! the last one's end (server timestamps), and from the first request to the moment the bench
//! saw the last one finish (client). With one runner and with four, DATA and API steps.
//! Resident memory of the server and runners is sampled throughout (scenario 5 reports it).
//! May call: the installation, the client, the measure module, the report.

use std::time::{Duration, Instant};

use crate::client::{Shape, StepKind, elapsed_ms, milliseconds_between, time};
use crate::installation::Installation;
use crate::measure::{MemorySampler, megabytes};
use crate::report::{Column, Entry, Report, Round, cost_columns, percentile, print_table};
use crate::{Mode, Outcome, Scenario, Sizes};

/// Requests to start executions in flight at once while submitting a batch.
const SUBMITTERS: usize = 32;
/// Runner processes of the "four runners" variants.
const MANY_RUNNERS: usize = 4;

pub async fn run(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let one_runner = installation.one_runner();
    for (runners, shape, kind) in plan(installation.mode, one_runner, sizes.all_variants) {
        installation.set_runners(runners).await?;
        let runners_label = installation.runners_label(runners);
        let variant = format!("{}, {} steps, {runners_label}", shape.name(), kind.name());
        let entry = run_variant(installation, sizes, shape, kind, &variant, report).await?;
        report.add(entry);
    }
    installation.set_runners(one_runner).await
}

/// The variants of a run: (runner processes, shape, step kind). Every combination of one and
/// four runners, chain and fan-out, DATA and API steps, on both modes, takes half an hour
/// with today's engine; a default run measures the ones the figures name (one runner:
/// the chain with both kinds of steps, the fan-out with API steps; four runners: the chain
/// with API steps; on `dev` its own runner, the chain) and `--all-variants` the rest.
fn plan(mode: Mode, one_runner: usize, all_variants: bool) -> Vec<(usize, Shape, StepKind)> {
    let (chain, fan_out) = (Shape::Chain(10), Shape::FanOut(8));
    if all_variants {
        let mut plan = Vec::new();
        for runners in [one_runner, MANY_RUNNERS] {
            for shape in [chain, fan_out] {
                for kind in StepKind::BOTH {
                    plan.push((runners, shape, kind));
                }
            }
        }
        return plan;
    }
    match mode {
        Mode::Serve => vec![
            (one_runner, chain, StepKind::Data),
            (one_runner, chain, StepKind::Api),
            (one_runner, fan_out, StepKind::Api),
            (MANY_RUNNERS, chain, StepKind::Api),
        ],
        Mode::Dev => vec![(one_runner, chain, StepKind::Data), (one_runner, chain, StepKind::Api)],
    }
}

async fn run_variant(
    installation: &mut Installation,
    sizes: &Sizes,
    shape: Shape,
    kind: StepKind,
    variant: &str,
    report: &mut Report,
) -> Outcome<Entry> {
    let mut entry = Entry::new(Some(installation.mode), Scenario::Throughput, variant);
    // Warm up with a small batch.
    let warm_up = installation
        .client
        .workflow(&format!("warm-up {variant}"), shape.definition(installation.agent(kind)))
        .await?;
    installation.client.execute_many(&warm_up, sizes.batch_warm_up, SUBMITTERS).await?;
    installation
        .database
        .wait_finished(&warm_up, sizes.batch_warm_up as u64, Duration::from_secs(120))
        .await?;
    let started = Instant::now();
    let mut longest_round = Duration::ZERO;
    for round_index in 0..sizes.batch_max_rounds {
        // Another round only if it would end within the variant's time budget.
        if round_index > 0 && started.elapsed() + longest_round > sizes.batch_budget {
            entry.note(&format!(
                "{round_index} of {} rounds: another would pass the variant's time budget of {} s",
                sizes.batch_max_rounds,
                sizes.batch_budget.as_secs()
            ));
            break;
        }
        let round_started = Instant::now();
        let name = format!("batch {variant} round {}", round_index + 1);
        let round =
            run_round(installation, &name, shape, kind, sizes.batch_executions, report).await?;
        entry.add_round(round);
        longest_round = longest_round.max(round_started.elapsed());
    }
    Ok(entry)
}

async fn run_round(
    installation: &mut Installation,
    name: &str,
    shape: Shape,
    kind: StepKind,
    executions: usize,
    report: &mut Report,
) -> Outcome<Round> {
    let workflow =
        installation.client.workflow(name, shape.definition(installation.agent(kind))).await?;
    let steps = (executions * shape.steps()) as f64;
    let mut sampled = vec![installation.server.pid()];
    sampled.extend(installation.probe.runner_pids.iter().copied());
    let window = installation.probe.begin().await?;
    let sampler = MemorySampler::start(sampled);
    let stub_calls_before = installation.stub.calls();
    let sent = Instant::now();
    installation.client.execute_many(&workflow, executions, SUBMITTERS).await?;
    let submitted = Instant::now();
    // However slow the engine, at least 10 steps/s.
    let limit = Duration::from_secs(60 + (steps / 10.0) as u64);
    let succeeded =
        installation.database.wait_finished(&workflow, executions as u64, limit).await?;
    let seen_finished = Instant::now();
    let costs = installation.probe.end(window).await?;
    let peaks = sampler.stop().await;

    let mut round = Round::default();
    let listed = installation.client.executions_of(&workflow).await?;
    let first_created = listed.iter().filter_map(|execution| time(&execution["createdAt"])).min();
    let last_finished = listed.iter().filter_map(|execution| time(&execution["finishedAt"])).max();
    if let (Some(first), Some(last)) = (first_created, last_finished) {
        let span_seconds = (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6;
        round.set("steps_per_second", "steps/s", steps / span_seconds);
    }
    round.set(
        "steps_per_second_client",
        "steps/s",
        steps / (elapsed_ms(sent, seen_finished) / 1000.0),
    );
    round.set("submit_seconds", "s", elapsed_ms(sent, submitted) / 1000.0);
    let mut latencies: Vec<f64> = listed
        .iter()
        .filter_map(|execution| {
            milliseconds_between(&execution["createdAt"], &execution["finishedAt"])
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    round.set("execution_ms_p50", "ms", percentile(&latencies, 0.5));
    round.set("execution_ms_p99", "ms", percentile(&latencies, 0.99));
    let failed = executions as u64 - succeeded.min(executions as u64);
    round.set("failed_executions", "", failed as f64);
    if failed > 0 {
        report.failures.push(format!(
            "{} throughput {name}: {failed} of {executions} executions did not succeed",
            installation.mode.name()
        ));
    }
    costs.record_per(steps, "step", &mut round);
    if kind == StepKind::Api {
        let stub_calls = installation.stub.calls() - stub_calls_before;
        if stub_calls != steps as u64 {
            round.note(&format!("the stub answered {stub_calls} calls for {steps} API steps"));
        }
    }

    let server_peak = peaks.get(&installation.server.pid()).copied().unwrap_or(0);
    let runner_peak =
        installation.probe.runner_pids.iter().filter_map(|pid| peaks.get(pid)).copied().max();
    round.set("rss_mb_server_peak", "MB", megabytes(server_peak));
    let memory = &mut installation.memory;
    memory.server_peak_under_load_bytes =
        Some(memory.server_peak_under_load_bytes.unwrap_or(0).max(server_peak));
    if let Some(runner_peak) = runner_peak {
        round.set("rss_mb_runner_peak", "MB", megabytes(runner_peak));
        memory.runner_peak_under_load_bytes =
            Some(memory.runner_peak_under_load_bytes.unwrap_or(0).max(runner_peak));
    }
    Ok(round)
}

pub fn print(report: &Report, mode: Mode) {
    let entries = report.entries_of(Some(mode), Scenario::Throughput);
    let columns = vec![
        Column::new("steps_per_second", "steps/s"),
        Column::new("steps_per_second_client", "steps/s, client"),
        Column::new("execution_ms_p50", "execution p50 ms"),
        Column::new("execution_ms_p99", "p99 ms"),
        Column::new("failed_executions", "failed"),
        Column::new("rss_mb_server_peak", "server peak MB"),
    ];
    print_table(
        &format!("{} · scenario 2 · batches of executions submitted at once", mode.name()),
        &entries,
        &columns,
        false,
    );
    print_table(
        &format!("{} · scenario 2 · costs per step", mode.name()),
        &entries,
        &cost_columns("step"),
        true,
    );
}
