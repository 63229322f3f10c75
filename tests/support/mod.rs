//! Shared test harness: fresh real databases for every test.
//!
//! PostgreSQL tests get a brand-new database on the server named by `TURBOCAT_TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), migrated, and dropped when the guard goes
//! out of scope. SQLite tests get a fresh file in a temporary directory.
#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::sync::{Arc, Mutex};

use sqlx::Connection;
use turbocat::store::{PostgresStore, SqliteStore, Store};

pub mod api;

pub fn admin_database_url() -> String {
    std::env::var("TURBOCAT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database (or file) that lives as long as this guard.
pub struct TestDatabase {
    pub store: Arc<dyn Store>,
    pub url: String,
    postgres_name: Option<String>,
    _directory: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }
}

/// Creates an empty PostgreSQL database and returns its URL and name, unmigrated.
pub async fn create_postgres_database() -> (String, String) {
    let admin_url = admin_database_url();
    let name = format!("turbocat_test_{}", uuid::Uuid::new_v4().simple());
    let mut connection =
        sqlx::PgConnection::connect(&admin_url).await.expect("connect to postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut connection)
        .await
        .expect("create test database");
    let base = admin_url.rsplit_once('/').map(|(base, _)| base.to_owned()).expect("url has a path");
    (format!("{base}/{name}"), name)
}

pub async fn postgres() -> TestDatabase {
    let (url, name) = create_postgres_database().await;
    let store = PostgresStore::connect(&url, 5).await.expect("connect test database");
    store.migrate().await.expect("migrate test database");
    TestDatabase { store: Arc::new(store), url, postgres_name: Some(name), _directory: None }
}

pub async fn sqlite() -> TestDatabase {
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("turbocat.db");
    let store = SqliteStore::open(&path).await.expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    TestDatabase {
        store: Arc::new(store),
        url: format!("sqlite://{}", path.display()),
        postgres_name: None,
        _directory: Some(directory),
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some(name) = self.postgres_name.take() else { return };
        // Drop runs outside any async context guarantee: use a throwaway runtime on a thread.
        let admin_url = admin_database_url();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::PgConnection::connect(&admin_url).await {
                        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                            .execute(&mut connection)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

/// Instantiates each named `async fn(Arc<dyn Store>)` once per backend:
/// `conformance!(user_crud, api_key_lifecycle);` makes `postgres::user_crud` and `sqlite::user_crud`.
#[macro_export]
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let database = $crate::support::postgres().await;
                    super::$test(database.store()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let database = $crate::support::sqlite().await;
                    super::$test(database.store()).await;
                }
            )*
        }
    };
}

/// A TCP server on 127.0.0.1 that answers each connection with its number (`1`, `2`, …) until
/// the test's runtime ends; its port. A CODE step with the network on learns from it which
/// attempt it is (the sandbox keeps steps from leaving marker files anywhere else).
pub async fn attempt_counter() -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a counter");
    let port = listener.local_addr().expect("counter address").port();
    tokio::spawn(async move {
        let mut count = 0u32;
        while let Ok((mut connection, _)) = listener.accept().await {
            count += 1;
            let _ = connection.write_all(count.to_string().as_bytes()).await;
        }
    });
    port
}

/// Python that fails its first attempt (asking `attempt_counter` on the port given as
/// `counter` in its input) and outputs `{"ok": true}` on the next.
pub const FLAKY_PYTHON: &str = "import json, socket, sys\n\
    data = json.load(sys.stdin)\n\
    with socket.create_connection(('127.0.0.1', data['counter']), timeout=10) as counter:\n\
    \x20   attempt = int(counter.recv(16).decode())\n\
    if attempt == 1:\n\
    \x20   raise RuntimeError('first attempt fails')\n\
    print('second attempt here', flush=True)\n\
    print(json.dumps({'ok': True}))\n";

/// The config of a CODE agent running `FLAKY_PYTHON` (the network on, to reach the counter).
pub fn flaky_python_config() -> serde_json::Value {
    serde_json::json!({ "code": { "language": "python", "source": FLAKY_PYTHON,
                                  "network": "ON", "allowPrivateNetwork": true } })
}

/// A real `turbocat` process, killed when dropped. Its stderr is kept for assertions.
pub struct TurbocatProcess {
    child: std::process::Child,
    pub address: std::net::SocketAddr,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
}

impl TurbocatProcess {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|text| text.clone()).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TurbocatProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_reader(
    stream: impl std::io::Read + Send + 'static,
    sink: std::sync::Arc<std::sync::Mutex<String>>,
    lines: Option<std::sync::mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
            if let Ok(mut text) = sink.lock() {
                text.push_str(&line);
                text.push('\n');
            }
            if let Some(sender) = &lines {
                let _ = sender.send(line);
            }
        }
    });
}

/// A command for the `turbocat` binary under test; every test starts turbocat through it.
///
/// Under the coverage run (`scripts/coverage`: cargo-tarpaulin sets `LLVM_PROFILE_FILE` for
/// the test binary, and the binary is built with counter relocation) the child writes its
/// counters continuously (`%c`) to a profile of its own beside the test's, so a process the
/// test SIGKILLs still counts, and `%p` plus a per-spawn number keep names apart when process
/// ids are reused.
pub fn turbocat_command() -> std::process::Command {
    static SPAWNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_turbocat"));
    if let Some(pattern) = std::env::var_os("LLVM_PROFILE_FILE")
        && let Some(folder) = std::path::Path::new(&pattern).parent()
    {
        let number = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("turbocat-{}-{number}-%p%c.profraw", std::process::id());
        command.env("LLVM_PROFILE_FILE", folder.join(name));
    }
    command
}

/// Starts `turbocat <arguments>` and waits for its "listening on" line (at most 60 s).
pub fn start_turbocat(arguments: &[&str], environment: &[(&str, &str)]) -> TurbocatProcess {
    let mut command = turbocat_command();
    command
        .args(arguments)
        .env_remove("TURBOCAT_JWT_SECRET")
        .env_remove("TURBOCAT_DATABASE_URL")
        .env_remove("TURBOCAT_REDIS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (key, value) in environment {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn turbocat");
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (sender, receiver) = std::sync::mpsc::channel();
    spawn_reader(child.stdout.take().expect("stdout"), stdout.clone(), Some(sender));
    spawn_reader(child.stderr.take().expect("stderr"), stderr.clone(), None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        match receiver.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let address = rest
                        .split_whitespace()
                        .next()
                        .expect("address")
                        .parse()
                        .expect("socket address");
                    return TurbocatProcess { child, address, stderr, stdout };
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let text = stderr.lock().map(|text| text.clone()).unwrap_or_default();
                panic!("turbocat did not start: {text}");
            }
        }
    }
}

/// Runs `turbocat <arguments>` to completion: (success, stdout, stderr).
pub fn run_turbocat(arguments: &[&str], environment: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = turbocat_command();
    command
        .args(arguments)
        .env_remove("TURBOCAT_JWT_SECRET")
        .env_remove("TURBOCAT_DATABASE_URL")
        .env_remove("TURBOCAT_REDIS_URL")
        .stdin(std::process::Stdio::null());
    for (key, value) in environment {
        command.env(key, value);
    }
    let output = command.output().expect("run turbocat");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

pub const TEST_JWT_SECRET: &str = "test-secret-that-is-long-enough-0123456789";

pub fn redis_url() -> String {
    std::env::var("TURBOCAT_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// `turbocat dev` on a fresh data directory and a free port.
pub fn start_dev(extra: &[&str]) -> (TurbocatProcess, tempfile::TempDir) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let data_dir = directory.path().to_str().expect("utf-8 path").to_owned();
    let mut arguments = vec!["dev", "--listen", "127.0.0.1:0", "--data-dir", data_dir.as_str()];
    arguments.extend_from_slice(extra);
    (start_turbocat(&arguments, &[]), directory)
}

/// A fresh PostgreSQL database (dropped with the guard) for a `serve` process.
pub struct ServeDatabase {
    pub url: String,
    name: String,
}

impl Drop for ServeDatabase {
    fn drop(&mut self) {
        let admin_url = admin_database_url();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build()
            {
                runtime.block_on(async move {
                    if let Ok(mut connection) = sqlx::PgConnection::connect(&admin_url).await {
                        let statement = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                            .execute(&mut connection)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

impl ServeDatabase {
    pub fn new(url: String, name: String) -> Self {
        Self { url, name }
    }
}

/// `turbocat serve` on a fresh PostgreSQL database, the local Redis and a free port.
pub async fn start_serve(extra: &[&str]) -> (TurbocatProcess, ServeDatabase) {
    let (url, name) = create_postgres_database().await;
    let database = ServeDatabase { url, name };
    let redis = redis_url();
    let rate_limit_prefix = format!("turbocat-test:{}:ratelimit:", uuid::Uuid::new_v4().simple());
    let mut arguments = vec!["serve"];
    // A caller may choose the address (a server restarted on the same port).
    if !extra.contains(&"--listen") {
        arguments.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    arguments.extend_from_slice(&[
        "--database-url",
        database.url.as_str(),
        "--redis-url",
        redis.as_str(),
        "--jwt-secret",
        TEST_JWT_SECRET,
    ]);
    // Rate-limit counters, the queue and the events live in the shared Redis: keep each
    // server's apart (replicas of one installation pass the same prefixes).
    if !extra.contains(&"--rate-limit-key-prefix") {
        arguments.extend_from_slice(&["--rate-limit-key-prefix", rate_limit_prefix.as_str()]);
    }
    let redis_prefix = format!("turbocat-test:{}:", uuid::Uuid::new_v4().simple());
    if !extra.contains(&"--redis-key-prefix") {
        arguments.extend_from_slice(&["--redis-key-prefix", redis_prefix.as_str()]);
    }
    arguments.extend_from_slice(extra);
    let process = tokio::task::spawn_blocking({
        let arguments: Vec<String> =
            arguments.iter().map(|argument| argument.to_string()).collect();
        move || {
            let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
            start_turbocat(&borrowed, &[])
        }
    })
    .await
    .expect("start serve");
    (process, database)
}

/// Another `serve` replica of an installation: the same database, Redis and `extra` flags
/// (pass the first replica's `--redis-key-prefix` so they share the queue and the events).
/// `extra` may choose the address (`--listen`: a replica restarted on the same port) and the
/// Redis (`--redis-url`: a private one).
pub async fn start_serve_replica(database: &ServeDatabase, extra: &[&str]) -> TurbocatProcess {
    let redis = redis_url();
    let mut arguments: Vec<String> = vec!["serve".to_owned()];
    if !extra.contains(&"--listen") {
        arguments.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
    }
    if !extra.contains(&"--redis-url") {
        arguments.extend(["--redis-url".to_owned(), redis]);
    }
    arguments.extend(
        ["--database-url", database.url.as_str(), "--jwt-secret", TEST_JWT_SECRET]
            .iter()
            .map(|argument| argument.to_string()),
    );
    arguments.extend(extra.iter().map(|argument| argument.to_string()));
    tokio::task::spawn_blocking(move || {
        let borrowed: Vec<&str> = arguments.iter().map(String::as_str).collect();
        start_turbocat(&borrowed, &[])
    })
    .await
    .expect("start a replica")
}

/// A `turbocat runner` process with its labels and extra environment, killed (SIGKILL) when
/// dropped. Its stderr (the runner's log) is kept.
pub struct RunnerProcess {
    pub child: std::process::Child,
    stderr: Arc<Mutex<String>>,
}

impl RunnerProcess {
    /// `server_url` is what `--server` takes: one URL, or several comma-separated.
    pub fn start(
        server_url: &str,
        api_key: &str,
        name: &str,
        capacity: u32,
        labels: &str,
        environment: &[(&str, &str)],
    ) -> Self {
        let capacity = capacity.to_string();
        let mut command = turbocat_command();
        command
            .args(["runner", "--server", server_url, "--name", name, "--capacity", &capacity])
            .env("TURBOCAT_API_KEY", api_key)
            .env("TURBOCAT_RUNNER_LABELS", labels)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (key, value) in environment {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn runner");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("runner stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut text) = sink.lock() {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        });
        Self { child, stderr }
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().map(|text| text.clone()).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address")
        .port()
}

/// A private `redis-server` on a port of its own, so flushing or restarting it disturbs no
/// other test. Killed when dropped.
pub struct RedisServer {
    child: Option<std::process::Child>,
    port: u16,
}

impl RedisServer {
    pub async fn start(port: u16) -> Self {
        let mut server = Self { child: None, port };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on the PATH");
        self.child = Some(child);
        let started = std::time::Instant::now();
        loop {
            if self.command("PING").await.is_ok() {
                return;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "redis-server did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn command(&self, name: &str) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd(name).query_async(&mut connection).await
    }

    /// Empties Redis and checks it is empty, in one MULTI/EXEC: the running server writes
    /// keys again at any moment, so a DBSIZE sent after the flush may already count them.
    pub async fn flush_all(&self) {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut connection =
            client.get_multiplexed_async_connection().await.expect("connect to redis");
        let (_flushed, keys): (redis::Value, i64) = redis::pipe()
            .atomic()
            .cmd("FLUSHALL")
            .cmd("DBSIZE")
            .query_async(&mut connection)
            .await
            .expect("FLUSHALL and DBSIZE");
        assert_eq!(keys, 0, "flushed");
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Debian's `chromium`, which `.ci/run` installs.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Whether Chromium is missing, so a browser test cannot run: on a developer's machine the test
/// says so and passes; under CI (`CI` set, as `.ci/run` sets it) a missing Chromium fails it.
pub fn chromium_missing() -> bool {
    if std::path::Path::new(CHROMIUM).exists() {
        return false;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must install chromium (.ci/run does)");
    eprintln!("skipped: no {CHROMIUM}");
    true
}
