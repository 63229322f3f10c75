//! The processes a benchmark installation is made of: `turbocat serve` or `turbocat dev`,
//! `turbocat runner` processes, a private `redis-server`, and the scratch PostgreSQL database a
//! `serve` run lives in. Every process is killed when its handle is dropped.
//! May call: the `turbocat` binary Cargo built for this bench, `redis-server`, PostgreSQL.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::Outcome;

/// How long a process may take to say it is listening.
const START_LIMIT: Duration = Duration::from_secs(60);

/// A child process, killed (SIGKILL) and reaped when dropped. Its stderr goes to a log file.
pub struct Spawned {
    child: Child,
    pub label: String,
    log_path: PathBuf,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the process's log, to explain a failure.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.len().saturating_sub(20);
        lines[first..].join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the logs of the processes of this run go: `target/bench/logs`.
pub fn log_directory() -> PathBuf {
    crate::target_directory().join("bench").join("logs")
}

fn log_file(label: &str) -> Outcome<(std::fs::File, PathBuf)> {
    let directory = log_directory();
    std::fs::create_dir_all(&directory)?;
    let path = directory.join(format!("{label}.log"));
    Ok((std::fs::File::create(&path)?, path))
}

/// Starts `turbocat <arguments>` with its stdout watched for the "listening on" line; returns
/// the process and its base URL (`http://127.0.0.1:port`).
pub fn start_turbocat_server(label: &str, arguments: &[&str]) -> Outcome<(Spawned, String)> {
    let (log, log_path) = log_file(label)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_turbocat"))
        .args(arguments)
        .env("TURBOCAT_LOG_LEVEL", "warn")
        .env_remove("TURBOCAT_JWT_SECRET")
        .env_remove("TURBOCAT_DATABASE_URL")
        .env_remove("TURBOCAT_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("the server has no stdout")?;
    let spawned = Spawned { child, label: label.to_owned(), log_path };
    let (sender, receiver) = std::sync::mpsc::channel();
    // Keeps reading after the start so that the server never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = receiver.recv_timeout(remaining) else {
            return Err(format!("{label} did not start: {}", spawned.log_tail()).into());
        };
        let Some(rest) = line.split("listening on ").nth(1) else { continue };
        let base_url = rest.split_whitespace().next().unwrap_or_default().to_owned();
        return Ok((spawned, base_url));
    }
}

/// Starts a `turbocat runner` attached to `server_url`.
pub fn start_runner(
    server_url: &str,
    api_key: &str,
    label: &str,
    capacity: u32,
) -> Outcome<Spawned> {
    let (log, log_path) = log_file(label)?;
    let child = Command::new(env!("CARGO_BIN_EXE_turbocat"))
        .args(["runner", "--server", server_url, "--name", label])
        .args(["--capacity", &capacity.to_string()])
        .env("TURBOCAT_API_KEY", api_key)
        .env("TURBOCAT_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Spawned { child, label: label.to_owned(), log_path })
}

/// The Redis a `serve` run uses: a private `redis-server` started for the run (so that its
/// command statistics and CPU are ours alone), or the one `TURBOCAT_BENCH_REDIS_URL` names.
pub struct RedisInstance {
    pub url: String,
    pub pid: Option<u32>,
    /// Whether other clients may share it (then its command counts are the whole instance's).
    pub shared: bool,
    _process: Option<Spawned>,
}

impl RedisInstance {
    pub async fn start() -> Outcome<Self> {
        if let Ok(url) = std::env::var("TURBOCAT_BENCH_REDIS_URL") {
            let pid = redis_process_id(&url).await.ok();
            return Ok(Self { url, pid, shared: true, _process: None });
        }
        let port = free_loopback_port()?;
        let (log, log_path) = log_file("redis-server")?;
        let port_text = port.to_string();
        // The same persistence settings as the machine's Redis: none.
        let child = Command::new("redis-server")
            .args(["--port", &port_text, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot start redis-server ({error}); set TURBOCAT_BENCH_REDIS_URL to use a running Redis"))?;
        let process = Spawned { child, label: "redis-server".to_owned(), log_path };
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(pid) = redis_process_id(&url).await {
                return Ok(Self { url, pid: Some(pid), shared: false, _process: Some(process) });
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server did not start: {}", process.log_tail()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes the keys under `prefix` (a shared Redis keeps no trace of the run).
    pub async fn delete_prefix(&self, prefix: &str) -> Outcome<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let pattern = format!("{prefix}*");
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut connection).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

async fn redis_process_id(url: &str) -> Outcome<u32> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("server").query_async(&mut connection).await?;
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or("redis INFO names no process_id")?;
    Ok(pid)
}

fn free_loopback_port() -> Outcome<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The PostgreSQL server of the machine: `TURBOCAT_TEST_DATABASE_URL` (an admin URL, as the
/// test suite uses it), else `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn admin_database_url() -> String {
    std::env::var("TURBOCAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database created for one run and dropped at its end (or when the handle is dropped).
pub struct ScratchDatabase {
    pub name: String,
    pub url: String,
    dropped: bool,
}

impl ScratchDatabase {
    pub async fn create(prefix: &str) -> Outcome<Self> {
        let admin_url = admin_database_url();
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
        let statement = format!("CREATE DATABASE {name}");
        sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await?;
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .ok_or("the database URL has no path")?;
        let url = format!("{base}/{name}");
        Ok(Self { name, url, dropped: false })
    }

    /// Drops the database now.
    pub async fn drop_database(mut self) -> Outcome<()> {
        self.dropped = true;
        drop_database_named(&self.name).await
    }
}

async fn drop_database_named(name: &str) -> Outcome<()> {
    let mut admin = sqlx::PgConnection::connect(&admin_database_url()).await?;
    let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    sqlx::query(sqlx::AssertSqlSafe(statement)).execute(&mut admin).await?;
    Ok(())
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // A failed run: drop it from a throwaway runtime on its own thread.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build()
            else {
                return;
            };
            let _ = runtime.block_on(drop_database_named(&name));
        })
        .join();
    }
}

/// Whether `program` can be found on `PATH`.
pub fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else { return false };
    std::env::split_paths(&path).any(|directory| is_executable(&directory.join(program)))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
}
