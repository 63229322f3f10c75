//! What a round costs, read from outside the processes: CPU time from `/proc/<pid>/stat`
//! (utime + stime, plus the reaped children's cutime + cstime; for the server and the runners
//! also their live descendants': a runner's warm jq workers and their sandboxes), resident
//! memory from `/proc/<pid>/status`, PostgreSQL transactions from `pg_stat_database`, Redis
//! commands from `INFO commandstats`, and the whole machine's busy time from `/proc/stat`.
//! May call: /proc, PostgreSQL (the admin connection), Redis.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::Outcome;
use crate::report::Round;

/// How PostgreSQL (15+) publishes a backend's transaction counters: when the backend goes idle
/// and its previous report is at least a second old; otherwise it holds them until it next goes
/// idle a second later, or for up to ten seconds if it stays idle. So a window's transactions
/// are read after this pause, and after every connection of the server's pool ran a transaction
/// (see `StatisticsFlush`).
pub const STATISTICS_PAUSE: Duration = Duration::from_millis(1100);

/// The processes whose CPU a round reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Server,
    Runners,
    Postgres,
    Redis,
    /// The benchmark itself: its clients, the API stub, wrk and pgbench (reaped children).
    Bench,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Runners => "runners",
            Role::Postgres => "postgres",
            Role::Redis => "redis",
            Role::Bench => "bench",
        }
    }

    /// The roles that make up the system under test (the bench is not one of them).
    pub const SYSTEM: [Role; 4] = [Role::Server, Role::Runners, Role::Postgres, Role::Redis];
}

/// The fields of `/proc/<pid>/stat` we use.
struct ProcessStat {
    command: String,
    parent: u32,
    /// utime + stime, in clock ticks.
    own_ticks: u64,
    /// cutime + cstime: the children this process waited for.
    children_ticks: u64,
}

fn process_stat(pid: u32) -> Option<ProcessStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command sits in parentheses and may hold spaces: the fields follow the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let command = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text.get(close + 2..)?.split_whitespace().collect();
    // fields[0] is field 3 of proc(5) (state): field n sits at n - 3.
    let number = |field: usize| fields.get(field - 3).and_then(|value| value.parse::<u64>().ok());
    Some(ProcessStat {
        command,
        parent: u32::try_from(number(4)?).ok()?,
        own_ticks: number(14)? + number(15)?,
        children_ticks: number(16)? + number(17)?,
    })
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU ticks a process used, with the children it reaped.
fn process_ticks(pid: u32) -> u64 {
    process_stat(pid).map(|stat| stat.own_ticks + stat.children_ticks).unwrap_or(0)
}

/// CPU ticks of a process and of all its descendants: each live one's own time and what it
/// reaped (a reaped process's time is in its reaper's cutime + cstime, a live one's in no one's).
fn process_tree_ticks(pid: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return process_ticks(pid) };
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut statistics = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(process) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = process_stat(process) {
            children.entry(stat.parent).or_default().push(process);
            statistics.insert(process, stat);
        }
    }
    let mut total = 0;
    let mut pending = vec![pid];
    while let Some(process) = pending.pop() {
        if let Some(stat) = statistics.get(&process) {
            total += stat.own_ticks + stat.children_ticks;
        }
        pending.extend(children.get(&process).into_iter().flatten());
    }
    total
}

/// CPU ticks of every PostgreSQL process of the machine: each live process's own time, plus what
/// the postmaster reaped (backends that ended).
fn postgres_ticks() -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    let mut statistics = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(stat) = process_stat(pid).filter(|stat| stat.command == "postgres") {
            statistics.insert(pid, stat);
        }
    }
    statistics
        .values()
        .map(|stat| {
            let is_postmaster = !statistics.contains_key(&stat.parent);
            stat.own_ticks + if is_postmaster { stat.children_ticks } else { 0 }
        })
        .sum()
}

/// Resident memory of a process, in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kilobytes: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kilobytes * 1024)
}

/// (busy, total) clock ticks of the whole machine since boot.
fn machine_ticks() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else { return (0, 0) };
    let Some(line) = text.lines().next() else { return (0, 0) };
    let values: Vec<u64> =
        line.split_whitespace().skip(1).filter_map(|value| value.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// Counts the commands a Redis server executed.
pub struct RedisCounter {
    connection: redis::aio::MultiplexedConnection,
    pub pid: Option<u32>,
}

impl RedisCounter {
    pub async fn connect(url: &str, pid: Option<u32>) -> Outcome<Self> {
        let client = redis::Client::open(url)?;
        Ok(Self { connection: client.get_multiplexed_async_connection().await?, pid })
    }

    /// Calls per command since the server started, without our own `INFO`.
    async fn calls(&mut self) -> Outcome<BTreeMap<String, u64>> {
        let text: String =
            redis::cmd("INFO").arg("commandstats").query_async(&mut self.connection).await?;
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let Some((name, fields)) =
                line.strip_prefix("cmdstat_").and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            if name == "info" {
                continue;
            }
            let count = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), count);
        }
        Ok(calls)
    }
}

/// The metrics that break Redis commands down by command: `redis_command_<name>_per_<unit>`.
pub const REDIS_COMMAND_PREFIX: &str = "redis_command_";

/// Makes PostgreSQL publish the counters the server's connections hold: once the pause has
/// passed, `GET /health` as many times as the server's pool has connections, twice over, all at
/// once (each call runs `SELECT 1`, and a backend that runs a transaction a second or more after
/// its last report reports). At once, because the store hands a statement the connection used
/// most recently (`store::connections`): calls one after another all ran on that one, and the
/// other backends reported only when PostgreSQL's idle timer (10 s) fired, into later windows
/// (rounds of one variant read 0.34-0.52 and 0.6-1.0 transactions a step for the same
/// statements). The bench's own connection is told to report with
/// `pg_stat_force_next_flush()`. Every transaction this runs is counted as the bench's own.
pub struct StatisticsFlush {
    pub http: reqwest::Client,
    pub health_url: String,
    pub requests: usize,
    pub own_connection: Option<Arc<tokio::sync::Mutex<sqlx::PgConnection>>>,
}

impl StatisticsFlush {
    /// Runs the flush; returns the transactions it ran on the database.
    async fn run(&self) -> Outcome<u64> {
        let mut transactions = 0;
        if let Some(connection) = &self.own_connection {
            sqlx::query("SELECT pg_stat_force_next_flush()")
                .execute(&mut *connection.lock().await)
                .await?;
            transactions += 1;
        }
        let calls = (0..self.requests).map(|_| async {
            self.http.get(&self.health_url).send().await?.bytes().await.map(|_| ())
        });
        futures::future::try_join_all(calls).await?;
        transactions += self.requests as u64;
        Ok(transactions)
    }
}

/// Reads a database's transaction counters from PostgreSQL's statistics.
pub struct PostgresCounter {
    admin: sqlx::PgConnection,
    database_name: String,
    flush: Option<StatisticsFlush>,
}

impl PostgresCounter {
    pub async fn connect(
        admin_url: &str,
        database_name: &str,
        flush: Option<StatisticsFlush>,
    ) -> Outcome<Self> {
        let admin = sqlx::PgConnection::connect(admin_url).await?;
        Ok(Self { admin, database_name: database_name.to_owned(), flush })
    }

    /// The PostgreSQL processes that serve this database: its backends, and the server's
    /// shared background processes (WAL writer, checkpointer, …).
    async fn own_processes(&mut self) -> Outcome<Vec<u32>> {
        let pids: Vec<(i32,)> = sqlx::query_as(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 OR backend_type <> 'client backend'",
        )
        .bind(&self.database_name)
        .fetch_all(&mut self.admin)
        .await?;
        Ok(pids.into_iter().filter_map(|(pid,)| u32::try_from(pid).ok()).collect())
    }

    /// (commits, rollbacks) of the database.
    async fn transactions(&mut self) -> Outcome<(u64, u64)> {
        let (commits, rollbacks): (i64, i64) = sqlx::query_as(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.database_name)
        .fetch_one(&mut self.admin)
        .await?;
        Ok((u64::try_from(commits)?, u64::try_from(rollbacks)?))
    }
}

/// Everything a window reads at one moment.
#[derive(Clone)]
struct Reading {
    at: Instant,
    cpu_ticks: BTreeMap<Role, u64>,
    machine: (u64, u64),
    redis_calls: Option<BTreeMap<String, u64>>,
    postgres: Option<(u64, u64)>,
    /// CPU ticks of each PostgreSQL process serving this database.
    postgres_own_ticks: BTreeMap<u32, u64>,
    own_transactions: u64,
}

/// The start of a measured window.
pub struct Window {
    start: Reading,
}

/// What a window cost the machine, summed over its processes.
#[derive(Debug, Clone, Default)]
pub struct Costs {
    pub seconds: f64,
    pub cpu_ms: BTreeMap<Role, f64>,
    /// CPU of the whole machine not accounted to any role (other builds, the kernel's own work).
    pub unaccounted_cpu_ms: f64,
    /// CPU of the PostgreSQL processes serving this database alone (its backends and the
    /// shared background processes): the `postgres` figure without other databases' work.
    pub postgres_own_cpu_ms: Option<f64>,
    pub machine_busy_percent: f64,
    pub postgres_commits: Option<f64>,
    pub postgres_rollbacks: Option<f64>,
    pub redis_commands: Option<f64>,
    /// The Redis commands of the window by name, most used first.
    pub redis_top_commands: Vec<(String, u64)>,
}

impl Costs {
    pub fn system_cpu_ms(&self) -> f64 {
        Role::SYSTEM.iter().filter_map(|role| self.cpu_ms.get(role)).sum()
    }

    /// Adds the costs per `unit` (a step, an execution, a request) to a round.
    pub fn record_per(&self, units: f64, unit: &str, round: &mut Round) {
        if units <= 0.0 {
            return;
        }
        if let Some(commits) = self.postgres_commits {
            round.set(&format!("postgres_commits_per_{unit}"), "xact", commits / units);
        }
        if let Some(commands) = self.redis_commands {
            round.set(&format!("redis_commands_per_{unit}"), "cmd", commands / units);
        }
        for role in Role::SYSTEM {
            if let Some(milliseconds) = self.cpu_ms.get(&role) {
                round.set(
                    &format!("cpu_ms_per_{unit}_{}", role.name()),
                    "ms",
                    milliseconds / units,
                );
            }
        }
        round.set(&format!("cpu_ms_per_{unit}_system"), "ms", self.system_cpu_ms() / units);
        if let Some(milliseconds) = self.postgres_own_cpu_ms {
            round.set(
                &format!("cpu_ms_per_{unit}_postgres_own_database"),
                "ms",
                milliseconds / units,
            );
        }
        if let Some(milliseconds) = self.cpu_ms.get(&Role::Bench) {
            round.set(&format!("cpu_ms_per_{unit}_bench"), "ms", milliseconds / units);
        }
        round.set(&format!("cpu_ms_per_{unit}_unaccounted"), "ms", self.unaccounted_cpu_ms / units);
        round.set("machine_busy_percent", "%", self.machine_busy_percent);
        for (command, calls) in &self.redis_top_commands {
            round.set(
                &format!("{REDIS_COMMAND_PREFIX}{command}_per_{unit}"),
                "cmd",
                *calls as f64 / units,
            );
        }
    }
}

/// Reads the counters of one installation: its server, runners, PostgreSQL and Redis.
pub struct Probe {
    /// None when there is no server (the PostgreSQL floor).
    pub server_pid: Option<u32>,
    pub runner_pids: Vec<u32>,
    redis: Option<RedisCounter>,
    postgres: Option<PostgresCounter>,
    /// Transactions the bench itself ran on the database (subtracted).
    own_transactions: Arc<AtomicU64>,
    /// When the PostgreSQL counters were last known to hold everything done before.
    settled_at: Option<Instant>,
    /// Commits per second of the idle installation (its background loops), subtracted for the
    /// time a window waits for the statistics.
    idle_commits_per_second: f64,
}

impl Probe {
    pub fn new(
        server_pid: Option<u32>,
        redis: Option<RedisCounter>,
        postgres: Option<PostgresCounter>,
        own_transactions: Arc<AtomicU64>,
    ) -> Self {
        Self {
            server_pid,
            runner_pids: Vec::new(),
            redis,
            postgres,
            own_transactions,
            settled_at: None,
            idle_commits_per_second: 0.0,
        }
    }

    async fn read(&mut self, with_postgres: bool) -> Outcome<Reading> {
        let mut cpu_ticks = BTreeMap::new();
        if let Some(pid) = self.server_pid {
            cpu_ticks.insert(Role::Server, process_tree_ticks(pid));
        }
        if !self.runner_pids.is_empty() {
            cpu_ticks.insert(
                Role::Runners,
                self.runner_pids.iter().map(|pid| process_tree_ticks(*pid)).sum(),
            );
        }
        cpu_ticks.insert(Role::Bench, process_ticks(std::process::id()));
        if self.postgres.is_some() {
            cpu_ticks.insert(Role::Postgres, postgres_ticks());
        }
        if let Some(pid) = self.redis.as_ref().and_then(|redis| redis.pid) {
            cpu_ticks.insert(Role::Redis, process_ticks(pid));
        }
        let redis_calls = match self.redis.as_mut() {
            Some(redis) => Some(redis.calls().await?),
            None => None,
        };
        let mut postgres_own_ticks = BTreeMap::new();
        if let Some(postgres) = self.postgres.as_mut() {
            for pid in postgres.own_processes().await? {
                postgres_own_ticks.insert(pid, process_stat(pid).map_or(0, |stat| stat.own_ticks));
            }
        }
        let postgres = match (with_postgres, self.postgres.as_mut()) {
            (true, Some(postgres)) => Some(postgres.transactions().await?),
            _ => None,
        };
        Ok(Reading {
            at: Instant::now(),
            cpu_ticks,
            machine: machine_ticks(),
            redis_calls,
            postgres,
            postgres_own_ticks,
            own_transactions: self.own_transactions.load(Ordering::SeqCst),
        })
    }

    /// Waits for the pause, then has PostgreSQL publish what the connections hold.
    async fn settle_statistics(&mut self) -> Outcome<()> {
        tokio::time::sleep(STATISTICS_PAUSE).await;
        let flush = self.postgres.as_ref().and_then(|postgres| postgres.flush.as_ref());
        if let Some(flush) = flush {
            let transactions = flush.run().await?;
            self.own_transactions.fetch_add(transactions, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Starts a window (once PostgreSQL's counters hold the work done before).
    pub async fn begin(&mut self) -> Outcome<Window> {
        let settled_recently =
            self.settled_at.is_some_and(|settled| settled.elapsed() < Duration::from_millis(200));
        if self.postgres.is_some() && !settled_recently {
            self.settle_statistics().await?;
        }
        Ok(Window { start: self.read(true).await? })
    }

    /// Ends a window: CPU and Redis as of now, PostgreSQL once its counters hold the window.
    pub async fn end(&mut self, window: Window) -> Outcome<Costs> {
        let mut end = self.read(false).await?;
        if self.postgres.is_some() {
            let settle_started = Instant::now();
            self.settle_statistics().await?;
            let settled = self.read(true).await?;
            self.settled_at = Some(Instant::now());
            end.postgres = settled.postgres;
            end.own_transactions = settled.own_transactions;
            let settle_seconds = settle_started.elapsed().as_secs_f64();
            return Ok(self.costs(&window.start, &end, settle_seconds));
        }
        Ok(self.costs(&window.start, &end, 0.0))
    }

    fn costs(&self, start: &Reading, end: &Reading, settle_seconds: f64) -> Costs {
        let seconds = end.at.duration_since(start.at).as_secs_f64();
        let milliseconds_per_tick = 1000.0 / clock_ticks_per_second();
        let mut cpu_ms = BTreeMap::new();
        let mut accounted_ticks = 0u64;
        for (role, ticks) in &end.cpu_ticks {
            let before = start.cpu_ticks.get(role).copied().unwrap_or(0);
            let used = ticks.saturating_sub(before);
            accounted_ticks += used;
            cpu_ms.insert(*role, used as f64 * milliseconds_per_tick);
        }
        // Processes that ended within the window are missed; those that began count whole.
        let postgres_own_ticks: u64 = end
            .postgres_own_ticks
            .iter()
            .map(|(pid, ticks)| {
                ticks.saturating_sub(start.postgres_own_ticks.get(pid).copied().unwrap_or(0))
            })
            .sum();
        let postgres_own_cpu_ms = (!end.postgres_own_ticks.is_empty())
            .then_some(postgres_own_ticks as f64 * milliseconds_per_tick);
        let busy = end.machine.0.saturating_sub(start.machine.0);
        let total = end.machine.1.saturating_sub(start.machine.1).max(1);
        let unaccounted_cpu_ms = (busy as f64 - accounted_ticks as f64) * milliseconds_per_tick;
        let own = end.own_transactions.saturating_sub(start.own_transactions) as f64;
        let (postgres_commits, postgres_rollbacks) = match (start.postgres, end.postgres) {
            (Some((commits_before, rollbacks_before)), Some((commits_after, rollbacks_after))) => {
                let commits = commits_after.saturating_sub(commits_before) as f64
                    - own
                    - self.idle_commits_per_second * settle_seconds;
                let rollbacks = rollbacks_after.saturating_sub(rollbacks_before) as f64;
                (Some(commits.max(0.0)), Some(rollbacks))
            }
            _ => (None, None),
        };
        let (redis_commands, redis_top_commands) = match (&start.redis_calls, &end.redis_calls) {
            (Some(before), Some(after)) => {
                let mut by_command: Vec<(String, u64)> = after
                    .iter()
                    .map(|(name, calls)| {
                        (name.clone(), calls.saturating_sub(before.get(name).copied().unwrap_or(0)))
                    })
                    .filter(|(_, calls)| *calls > 0)
                    .collect();
                by_command.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
                let total_calls: u64 = by_command.iter().map(|(_, calls)| calls).sum();
                (Some(total_calls as f64), by_command)
            }
            _ => (None, Vec::new()),
        };
        Costs {
            seconds,
            cpu_ms,
            unaccounted_cpu_ms,
            postgres_own_cpu_ms,
            machine_busy_percent: 100.0 * busy as f64 / total as f64,
            postgres_commits,
            postgres_rollbacks,
            redis_commands,
            redis_top_commands,
        }
    }

    /// Measures the idle installation for `duration`: its background loops' rates, kept to
    /// correct later windows and returned for the report.
    pub async fn measure_idle(&mut self, duration: Duration) -> Outcome<Costs> {
        let window = self.begin().await?;
        tokio::time::sleep(duration).await;
        let mut end = self.read(false).await?;
        let mut costs = self.costs(&window.start, &end, 0.0);
        if self.postgres.is_some() {
            self.settle_statistics().await?;
            end = self.read(true).await?;
            self.settled_at = Some(Instant::now());
            let whole = self.costs(&window.start, &end, 0.0);
            let seconds = whole.seconds.max(f64::EPSILON);
            self.idle_commits_per_second = whole.postgres_commits.unwrap_or(0.0) / seconds;
            costs.postgres_commits =
                whole.postgres_commits.map(|commits| commits / seconds * costs.seconds);
            costs.postgres_rollbacks = whole.postgres_rollbacks;
        }
        Ok(costs)
    }
}

/// Samples the resident memory of some processes until stopped; keeps the peak of each.
pub struct MemorySampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<u32, u64>>,
}

impl MemorySampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut peaks = BTreeMap::new();
            loop {
                for pid in &pids {
                    let resident = resident_bytes(*pid).unwrap_or(0);
                    let peak = peaks.entry(*pid).or_insert(0u64);
                    *peak = (*peak).max(resident);
                }
                if stopped.load(Ordering::SeqCst) {
                    return peaks;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { stop, task }
    }

    /// The peak resident bytes of each process.
    pub async fn stop(self) -> BTreeMap<u32, u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap_or_default()
    }
}

pub fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
