//! The engine benchmark suite (issue 11, "the instrument"): real processes on loopback —
//! `turbocat serve` on PostgreSQL + Redis and `turbocat dev` on SQLite, with `turbocat runner`
//! processes — driven over REST, SSE and gRPC like real clients. Every scenario warms up, runs
//! several rounds, and reports the median and spread of its times beside what each step (or
//! request) cost: PostgreSQL transactions, Redis commands, and CPU of every process involved.
//! `docs/benchmarks.md` explains every figure.
//!
//! ```text
//! cargo bench --bench engine                        # everything, serve then dev
//! cargo bench --bench engine -- --quick             # a short smoke run of everything
//! cargo bench --bench engine -- serve throughput    # some modes and scenarios only
//! ```
//!
//! Scenarios: `floor` (pgbench), `sequential` (1), `throughput` (2), `first-step` (3), `api`
//! (4), `memory` (5). The JSON report goes to `target/bench/engine.json`, the processes' logs
//! to `target/bench/logs/`. Run any other way than by `cargo bench` (as `cargo test` does), it
//! prints how to run it and exits.
//! May call: every module of the bench.

mod api_load;
mod client;
mod first_step;
mod floor;
mod installation;
mod measure;
mod memory;
mod processes;
mod report;
mod sequential;
mod stub;
mod throughput;

use std::time::Duration;

use installation::Installation;
use report::Report;
use stub::Stub;

pub type Failure = Box<dyn std::error::Error + Send + Sync>;
pub type Outcome<T> = Result<T, Failure>;

const USAGE: &str = "\
usage: cargo bench --bench engine [-- [--quick] [--all-variants] [serve] [dev] [SCENARIO...]]
  --quick         a short smoke run (also TURBOCAT_BENCH_QUICK=1)
  --all-variants  also the variants a default run leaves out to stay short: scenario 2 with
                  four runners and DATA steps, or on dev; scenario 4 on dev
  serve, dev   the modes to measure (default: both)
  SCENARIO     floor, sequential (s1), throughput (s2), first-step (s3), api (s4), memory (s5)
               (default: all)";

/// How the server under test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Dev,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Serve => "serve",
            Mode::Dev => "dev",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    Floor,
    Sequential,
    Throughput,
    FirstStep,
    Api,
    Memory,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Floor,
        Scenario::Sequential,
        Scenario::Throughput,
        Scenario::FirstStep,
        Scenario::Api,
        Scenario::Memory,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Floor => "floor",
            Scenario::Sequential => "sequential",
            Scenario::Throughput => "throughput",
            Scenario::FirstStep => "first-step",
            Scenario::Api => "api",
            Scenario::Memory => "memory",
        }
    }

    fn alias(self) -> &'static str {
        match self {
            Scenario::Floor => "floor",
            Scenario::Sequential => "s1",
            Scenario::Throughput => "s2",
            Scenario::FirstStep => "s3",
            Scenario::Api => "s4",
            Scenario::Memory => "s5",
        }
    }
}

/// How big each scenario is: the full run, or the `--quick` smoke run.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub quick: bool,
    /// Run the variants a default run leaves out (see `USAGE`).
    pub all_variants: bool,
    pub idle_seconds: f64,
    pub sequential_rounds: usize,
    pub long_chain_per_round: usize,
    pub short_chain_per_round: usize,
    pub batch_executions: usize,
    pub batch_warm_up: usize,
    pub batch_max_rounds: usize,
    /// A variant of the throughput scenario starts no further round after this long.
    pub batch_budget: Duration,
    pub first_step_executions: usize,
    pub first_step_rounds: usize,
    /// Executions a second the first-step scenario sends.
    pub first_step_rate: f64,
    pub api_seed_agents: usize,
    pub api_rounds: usize,
    pub api_round_seconds: u64,
    pub api_connections: Vec<usize>,
    pub constant_rate: f64,
    pub constant_rate_seconds: f64,
    pub idle_runners: usize,
    pub pause_after_load_seconds: f64,
    pub floor_rounds: usize,
    pub floor_seconds: u32,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        let full = Self {
            quick,
            all_variants: false,
            idle_seconds: 3.0,
            sequential_rounds: 3,
            long_chain_per_round: 2,
            short_chain_per_round: 5,
            batch_executions: 500,
            batch_warm_up: 20,
            batch_max_rounds: 3,
            batch_budget: Duration::from_secs(20),
            first_step_executions: 1000,
            first_step_rounds: 4,
            first_step_rate: 50.0,
            api_seed_agents: 10_000,
            api_rounds: 2,
            api_round_seconds: 1,
            api_connections: vec![64, 256],
            constant_rate: 3000.0,
            constant_rate_seconds: 3.0,
            idle_runners: 1000,
            pause_after_load_seconds: 60.0,
            floor_rounds: 2,
            floor_seconds: 3,
        };
        if !quick {
            return full;
        }
        Self {
            idle_seconds: 1.0,
            sequential_rounds: 2,
            long_chain_per_round: 1,
            short_chain_per_round: 2,
            batch_executions: 30,
            batch_warm_up: 5,
            batch_max_rounds: 1,
            batch_budget: Duration::ZERO,
            first_step_executions: 40,
            first_step_rounds: 2,
            api_seed_agents: 300,
            api_rounds: 1,
            api_round_seconds: 1,
            api_connections: vec![64],
            constant_rate_seconds: 1.0,
            idle_runners: 100,
            pause_after_load_seconds: 2.0,
            floor_rounds: 1,
            floor_seconds: 1,
            ..full
        }
    }

    fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let value = serde_json::json!({
            "quick": self.quick,
            "allVariants": self.all_variants,
            "sequentialRounds": self.sequential_rounds,
            "longChainExecutionsPerRound": self.long_chain_per_round,
            "shortChainExecutionsPerRound": self.short_chain_per_round,
            "batchExecutions": self.batch_executions,
            "batchWarmUp": self.batch_warm_up,
            "batchMaxRounds": self.batch_max_rounds,
            "batchBudgetSeconds": self.batch_budget.as_secs_f64(),
            "firstStepExecutions": self.first_step_executions,
            "firstStepRate": self.first_step_rate,
            "apiSeedAgents": self.api_seed_agents,
            "apiRounds": self.api_rounds,
            "apiRoundSeconds": self.api_round_seconds,
            "apiConnections": self.api_connections,
            "constantRate": self.constant_rate,
            "constantRateSeconds": self.constant_rate_seconds,
            "idleRunners": self.idle_runners,
            "pauseAfterLoadSeconds": self.pause_after_load_seconds,
            "floorRounds": self.floor_rounds,
            "floorSeconds": self.floor_seconds,
        });
        match value {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// What the command line asked for.
struct Options {
    modes: Vec<Mode>,
    scenarios: Vec<Scenario>,
    /// Whether the command line named the scenarios (then each runs in every mode named).
    named_scenarios: bool,
    floor: bool,
    sizes: Sizes,
}

impl Options {
    fn parse(arguments: &[String]) -> Result<Self, String> {
        let mut quick = std::env::var("TURBOCAT_BENCH_QUICK")
            .is_ok_and(|value| !value.is_empty() && value != "0");
        let mut all_variants = false;
        let mut modes = Vec::new();
        let mut scenarios = Vec::new();
        for argument in arguments {
            match argument.as_str() {
                "--bench" => {}
                "--quick" => quick = true,
                "--all-variants" => all_variants = true,
                "serve" => modes.push(Mode::Serve),
                "dev" => modes.push(Mode::Dev),
                other => {
                    let scenario = Scenario::ALL
                        .into_iter()
                        .find(|scenario| scenario.name() == other || scenario.alias() == other)
                        .ok_or_else(|| format!("unknown argument `{other}`"))?;
                    scenarios.push(scenario);
                }
            }
        }
        let named_scenarios = !scenarios.is_empty();
        if modes.is_empty() {
            modes = vec![Mode::Serve, Mode::Dev];
        }
        if scenarios.is_empty() {
            scenarios = Scenario::ALL.to_vec();
        }
        // The floor is PostgreSQL's: measured when asked, or with `serve` in a default run.
        let floor = scenarios.contains(&Scenario::Floor)
            && (named_scenarios || modes.contains(&Mode::Serve));
        scenarios.retain(|scenario| *scenario != Scenario::Floor);
        let sizes = Sizes { all_variants, ..Sizes::new(quick) };
        Ok(Self { modes, scenarios, named_scenarios, floor, sizes })
    }
}

/// The target directory this bench was built in (`…/target/release/deps/engine-…`).
pub fn target_directory() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|executable| Some(executable.parent()?.parent()?.parent()?.to_path_buf()))
        .filter(|directory| directory.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if !arguments.iter().any(|argument| argument == "--bench") {
        println!("the engine benchmark runs only with `cargo bench --bench engine`\n{USAGE}");
        return;
    }
    let options = match Options::parse(&arguments) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("{error}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start a runtime: {error}");
            std::process::exit(1);
        }
    };
    let failed = runtime.block_on(run(options));
    // Dropping the runtime would wait for the stub's and the load generators' tasks.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if failed {
        std::process::exit(1);
    }
}

/// Runs what the options ask for; returns whether anything failed.
async fn run(options: Options) -> bool {
    let started = chrono::Utc::now();
    let sizes = &options.sizes;
    let mut report = Report { settings: sizes.to_json(), ..Report::default() };
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_average = load_average.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    report.settings.insert("loadAverageAtStart".into(), load_average.clone().into());
    println!(
        "turbocat engine benchmark{}: {} cores, load average {load_average}; modes {}",
        if sizes.quick { " (quick)" } else { "" },
        measure::cores(),
        options.modes.iter().map(|mode| mode.name()).collect::<Vec<_>>().join(", "),
    );
    let stub = match Stub::start().await {
        Ok(stub) => stub,
        Err(error) => {
            eprintln!("cannot start the API stub: {error}");
            return true;
        }
    };
    if options.floor {
        if let Err(error) = floor::run(sizes, &mut report).await {
            report.failures.push(format!("floor: {error}"));
            eprintln!("the floor failed: {error}");
        }
        floor::print(&report);
    }
    for mode in &options.modes {
        run_mode(*mode, &options, &stub, &mut report).await;
    }
    let path = target_directory().join("bench").join("engine.json");
    match report.write_json(&path, started) {
        Ok(()) => println!("\nreport: {}", path.display()),
        Err(error) => report.failures.push(format!("cannot write {}: {error}", path.display())),
    }
    let elapsed = (chrono::Utc::now() - started).num_seconds();
    println!("finished in {elapsed} s");
    for failure in &report.failures {
        eprintln!("FAILED: {failure}");
    }
    !report.failures.is_empty()
}

async fn run_mode(mode: Mode, options: &Options, stub: &Stub, report: &mut Report) {
    let sizes = &options.sizes;
    println!("\n== {} ==", mode.name());
    let mut installation = match Installation::start(mode, stub).await {
        Ok(installation) => installation,
        Err(error) => {
            report.failures.push(format!("{}: cannot start: {error}", mode.name()));
            eprintln!("{}: cannot start: {error}", mode.name());
            return;
        }
    };
    let one_runner = installation.one_runner();
    if let Err(error) = async {
        installation.set_runners(one_runner).await?;
        memory::measure_idle(&mut installation, sizes, report).await
    }
    .await
    {
        report.failures.push(format!("{}: idle: {error}\n{}", mode.name(), installation.logs()));
    }
    // Order: the latency scenarios on a young database first, the memory scenario after the
    // load, the API (which adds many agents) last.
    let order = [
        Scenario::Sequential,
        Scenario::FirstStep,
        Scenario::Throughput,
        Scenario::Memory,
        Scenario::Api,
    ];
    for scenario in order {
        if !options.scenarios.contains(&scenario) {
            continue;
        }
        // The API load on SQLite only when asked for: a default run stays short.
        let asked_for = options.named_scenarios || sizes.all_variants;
        if scenario == Scenario::Api && mode == Mode::Dev && !asked_for {
            report.notes.push(
                "dev: scenario 4 (api) left out; `-- dev api` or `--all-variants` runs it"
                    .to_owned(),
            );
            continue;
        }
        let scenario_started = std::time::Instant::now();
        let outcome = match scenario {
            Scenario::Sequential => sequential::run(&mut installation, sizes, report).await,
            Scenario::FirstStep => first_step::run(&mut installation, sizes, report).await,
            Scenario::Throughput => throughput::run(&mut installation, sizes, report).await,
            Scenario::Memory => memory::run(&mut installation, sizes, report).await,
            Scenario::Api => api_load::run(&mut installation, sizes, report).await,
            Scenario::Floor => Ok(()),
        };
        if let Err(error) = outcome {
            let failure =
                format!("{} {}: {error}\n{}", mode.name(), scenario.name(), installation.logs());
            eprintln!("{failure}");
            report.failures.push(failure);
        }
        match scenario {
            Scenario::Sequential => sequential::print(report, mode),
            Scenario::FirstStep => first_step::print(report, mode),
            Scenario::Throughput => throughput::print(report, mode),
            Scenario::Memory => memory::print(report, mode),
            Scenario::Api => api_load::print(report, mode),
            Scenario::Floor => {}
        }
        println!(
            "  ({} {} took {:.0} s)",
            mode.name(),
            scenario.name(),
            scenario_started.elapsed().as_secs_f64()
        );
    }
    if let Err(error) = installation.finish().await {
        report.failures.push(format!("{}: cleaning up: {error}", mode.name()));
    }
}
