//! Scenario 3: from the execute request to the first step started. Executions of a one-step
//! workflow are sent at a steady rate (open loop: each request leaves at its scheduled time
//! whatever happened to the ones before), and the start of each one's step is timed by the
//! server (the step's `startedAt` minus the execution's `createdAt`) and, for an API step, by
//! the client (from sending the execute request to the step's call reaching the bench's stub).
//! May call: the installation, the client, the stub, the report.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::client::{Shape, StepKind, elapsed_ms, milliseconds_between};
use crate::installation::Installation;
use crate::report::{Column, Entry, Report, Round, cost_columns, percentile, print_table};
use crate::{Mode, Outcome, Scenario, Sizes};

const START_LIMIT: Duration = Duration::from_secs(60);

pub async fn run(
    installation: &mut Installation,
    sizes: &Sizes,
    report: &mut Report,
) -> Outcome<()> {
    let one_runner = installation.one_runner();
    installation.set_runners(one_runner).await?;
    let runners = installation.runners_label(one_runner);
    // On `dev` a default run measures the API step alone (the client sees its start).
    let kinds: &[StepKind] = if installation.mode == Mode::Dev && !sizes.all_variants {
        &[StepKind::Api]
    } else {
        &StepKind::BOTH
    };
    for kind in kinds.iter().copied() {
        let variant =
            format!("1 {} step at {} executions/s, {runners}", kind.name(), sizes.first_step_rate);
        let warm_up = installation
            .client
            .workflow(
                &format!("first step warm-up {variant}"),
                Shape::Chain(1).definition(installation.agent(kind)),
            )
            .await?;
        send_at_rate(installation, &warm_up, kind, 20, sizes.first_step_rate).await?;
        let rounds = sizes.first_step_rounds.max(1);
        let per_round = (sizes.first_step_executions / rounds).max(1);
        let mut entry = Entry::new(Some(installation.mode), Scenario::FirstStep, &variant);
        let mut all_client_ms = Vec::new();
        let mut all_server_ms = Vec::new();
        for round_index in 0..rounds {
            let name = format!("first step {variant} round {}", round_index + 1);
            let workflow = installation
                .client
                .workflow(&name, Shape::Chain(1).definition(installation.agent(kind)))
                .await?;
            let window = installation.probe.begin().await?;
            let sent =
                send_at_rate(installation, &workflow, kind, per_round, sizes.first_step_rate)
                    .await?;
            let costs = installation.probe.end(window).await?;
            let mut round = Round::default();
            let mut client_ms: Vec<f64> =
                sent.iter().filter_map(|execution| execution.client_ms).collect();
            client_ms.sort_by(f64::total_cmp);
            if !client_ms.is_empty() {
                round.set("client_ms_p50", "ms", percentile(&client_ms, 0.5));
                round.set("client_ms_p99", "ms", percentile(&client_ms, 0.99));
            }
            costs.record_per(per_round as f64, "execution", &mut round);
            let mut server_ms = Vec::with_capacity(per_round);
            for execution in &sent {
                let read = installation.client.execution(&execution.id).await?;
                let step = &read["stepRuns"][0];
                if let Some(milliseconds) =
                    milliseconds_between(&read["createdAt"], &step["startedAt"])
                {
                    server_ms.push(milliseconds);
                }
            }
            server_ms.sort_by(f64::total_cmp);
            round.set("server_ms_p50", "ms", percentile(&server_ms, 0.5));
            round.set("server_ms_p99", "ms", percentile(&server_ms, 0.99));
            entry.add_round(round);
            all_client_ms.extend(client_ms);
            all_server_ms.extend(server_ms);
        }
        all_client_ms.sort_by(f64::total_cmp);
        all_server_ms.sort_by(f64::total_cmp);
        let mut over_all = format!(
            "over all {} executions: server p50 {:.2} ms, p99 {:.2} ms",
            all_server_ms.len(),
            percentile(&all_server_ms, 0.5),
            percentile(&all_server_ms, 0.99),
        );
        if !all_client_ms.is_empty() {
            over_all.push_str(&format!(
                "; client p50 {:.2} ms, p99 {:.2} ms",
                percentile(&all_client_ms, 0.5),
                percentile(&all_client_ms, 0.99)
            ));
        }
        entry.note(&over_all);
        report.add(entry);
    }
    Ok(())
}

/// One execution sent: its id and, for an API step, the milliseconds from its request to the
/// step's call at the stub.
struct Sent {
    id: String,
    client_ms: Option<f64>,
}

/// Sends `count` executions of `workflow` at `rate` a second and waits until every one's step
/// started (API: the stub was called) or the execution finished (DATA).
async fn send_at_rate(
    installation: &Installation,
    workflow: &str,
    kind: StepKind,
    count: usize,
    rate: f64,
) -> Outcome<Vec<Sent>> {
    let started = Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let due = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let client = installation.client.clone();
        let (workflow, stub) = (workflow.to_owned(), installation.stub.clone());
        tasks.push(tokio::spawn(async move {
            let tag = uuid::Uuid::new_v4().simple().to_string();
            let called = (kind == StepKind::Api).then(|| stub.expect(&tag));
            let sent = Instant::now();
            let id = client.execute(&workflow, &json!({ "tag": tag })).await?;
            let Some(called) = called else {
                return Ok::<Sent, crate::Failure>(Sent { id, client_ms: None });
            };
            let arrived = tokio::time::timeout(START_LIMIT, called).await.map_err(|_| {
                format!("the step of {id} did not call the stub within {START_LIMIT:?}")
            })??;
            Ok(Sent { id, client_ms: Some(elapsed_ms(sent, arrived)) })
        }));
    }
    let mut sent = Vec::with_capacity(count);
    for task in tasks {
        sent.push(task.await??);
    }
    let succeeded =
        installation.database.wait_finished(workflow, count as u64, START_LIMIT).await?;
    if succeeded != count as u64 {
        return Err(format!("{succeeded} of {count} executions succeeded").into());
    }
    Ok(sent)
}

pub fn print(report: &Report, mode: Mode) {
    let entries = report.entries_of(Some(mode), Scenario::FirstStep);
    let columns = vec![
        Column::new("server_ms_p50", "server p50 ms"),
        Column::new("server_ms_p99", "server p99 ms"),
        Column::new("client_ms_p50", "client p50 ms"),
        Column::new("client_ms_p99", "client p99 ms"),
    ];
    print_table(
        &format!(
            "{} · scenario 3 · execute → first step started (per round; median (min–max) over rounds)",
            mode.name()
        ),
        &entries,
        &columns,
        true,
    );
    print_table(
        &format!("{} · scenario 3 · costs per execution", mode.name()),
        &entries,
        &cost_columns("execution"),
        false,
    );
}
