//! The sandbox of CODE and DATA steps, attacked for real: on `turbocat dev` (whose runner lives
//! in the server's own process, next to its JWT secret and database) and on `turbocat serve`
//! with a real `turbocat runner`, Python and Node snippets try to read the server's and the
//! runner's secrets (by path and through `/proc`), read and write another step's directory,
//! write outside their own, signal the runner, reach loopback ports, and outlive their step
//! with `setsid` and a double fork. Each attack must get nothing, with the execution and the
//! server unharmed; the same snippets' legitimate parts (their own directory, their input and
//! output) keep working. With the network ON, a snippet reaches an allowed server only through
//! the runner's egress proxy (loopback, private and metadata addresses refused, no raw
//! connection, no DNS of its own); with `allowPrivateNetwork` too, it reaches a loopback test
//! server directly.

#[path = "../support/mod.rs"]
mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::api::{Api, Auth};
use crate::support::{TurbocatProcess, start_dev, start_serve};

const LIMIT: Duration = Duration::from_secs(90);

/// Tries every attack it is given and reports, per attack, `denied: <error>` or what it got.
/// Its own directory, its input and its output are the positive control.
const PYTHON_ATTACKS: &str = r#"
import glob, json, os, signal, socket, sys
data = json.load(sys.stdin)
report = {}
def attempt(name, action):
    try:
        report[name] = 'GOT ' + repr(action())[:300]
    except BaseException as error:
        report[name] = 'denied: ' + type(error).__name__
def read(path):
    with open(path, 'rb') as file:
        return file.read()
def write(path):
    with open(path, 'w') as file:
        file.write('escaped')
    return 'written'
for path in data['read']:
    attempt('read ' + path, lambda path=path: read(path))
for path in data['write']:
    attempt('write ' + path, lambda path=path: write(path))
# Harmless if they worked: the same mode again, an open without a write.
for path in ['/etc/passwd', '/dev/null', '/usr/bin']:
    attempt('chmod ' + path, lambda path=path: os.chmod(path, os.stat(path).st_mode & 0o7777))
for path in ['/proc/sys/kernel/core_pattern', '/proc/sysrq-trigger', '/etc/hosts']:
    attempt('open for writing ' + path, lambda path=path: open(path, 'r+b').close())
attempt('list victims', lambda: glob.glob('/tmp/turbocat-step-*/work/*') or 1 / 0)
attempt('list data', lambda: os.listdir(data['data_directory']))
for pid in data['pids']:
    attempt('list the directory of ' + str(pid), lambda pid=pid: os.listdir('/proc/%d/cwd' % pid))
    attempt('signal ' + str(pid), lambda pid=pid: os.kill(pid, signal.SIGTERM))
attempt('connect', lambda: socket.create_connection(('127.0.0.1', data['port']), timeout=3))
report['processes'] = sorted(int(name) for name in os.listdir('/proc') if name.isdigit())
report['environment'] = sorted(os.environ)
with open('own.txt', 'w') as file:
    file.write(data['echo'])
with open(os.path.join(os.environ['TMPDIR'], 'scratch.txt'), 'w') as file:
    file.write('temporary')
report['own'] = open('own.txt').read()
print('the attacks are done')
print(json.dumps(report))
"#;

const NODE_ATTACKS: &str = r#"
const fs = require('fs');
const net = require('net');
let raw = '';
process.stdin.on('data', chunk => raw += chunk);
process.stdin.on('end', () => {
  const data = JSON.parse(raw);
  const report = {};
  const attempt = (name, action) => {
    try { report[name] = 'GOT ' + String(action()).slice(0, 300); }
    catch (error) { report[name] = 'denied: ' + error.code; }
  };
  for (const path of data.read) attempt('read ' + path, () => fs.readFileSync(path, 'latin1'));
  for (const path of data.write) attempt('write ' + path, () => fs.writeFileSync(path, 'escaped'));
  for (const pid of data.pids) attempt('signal ' + pid, () => process.kill(pid, 'SIGTERM'));
  fs.writeFileSync('own.txt', data.echo);
  report.own = fs.readFileSync('own.txt', 'utf8');
  report.environment = Object.keys(process.env).sort();
  const socket = net.connect({ host: '127.0.0.1', port: data.port });
  const finish = (outcome) => {
    report.connect = outcome;
    socket.destroy();
    console.log(JSON.stringify(report));
  };
  socket.setTimeout(3000, () => finish('denied: timeout'));
  socket.on('connect', () => finish('GOT a connection'));
  socket.on('error', (error) => finish('denied: ' + error.code));
});
"#;

/// Leaves a process behind in a new session (`setsid`, double fork) and ends at once.
const PYTHON_ESCAPE: &str = r#"
import json, os, sys
marker = json.load(sys.stdin)['marker']
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', marker])
    os._exit(0)
os.wait()
print(json.dumps({'left behind': marker}))
"#;

/// Leaves a detached process (a session of its own) behind and ends at once.
const NODE_ESCAPE: &str = r#"
const { spawn } = require('child_process');
let raw = '';
process.stdin.on('data', chunk => raw += chunk);
process.stdin.on('end', () => {
  const marker = JSON.parse(raw).marker;
  const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 600000)', marker],
                      { detached: true, stdio: 'ignore' });
  child.unref();
  console.log(JSON.stringify({ 'left behind': marker }));
});
"#;

/// Kills every process it may signal.
const PYTHON_KILL_ALL: &str = "import os, signal\nos.kill(-1, signal.SIGKILL)\n";

/// Sends a line to a TCP port and reports the answer.
const PYTHON_CONNECT: &str = r#"
import json, socket, sys
port = json.load(sys.stdin)['port']
with socket.create_connection(('127.0.0.1', port), timeout=5) as connection:
    connection.sendall(b'hello from the sandbox\n')
    answer = connection.recv(100).decode()
print(json.dumps({'answer': answer}))
"#;

/// Network ON without the opt-in: HTTP, HTTPS and a hand-made tunnel through the egress
/// proxy (`HTTPS_PROXY`, the relay's port) to an allowed server and to loopback, localhost,
/// private and metadata addresses; raw connections and DNS of its own.
const PYTHON_EGRESS: &str = r#"
import json, os, socket, sys, urllib.error, urllib.request
data = json.load(sys.stdin)
report = {}
def attempt(name, action):
    try:
        report[name] = 'GOT ' + str(action())[:300]
    except urllib.error.HTTPError as error:
        report[name] = 'denied: %d %s' % (error.code, error.read().decode()[:300])
    except BaseException as error:
        report[name] = 'denied: %s %s' % (type(error).__name__, str(error)[:300])
def fetch(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()
def tunnel(port):
    proxy = os.environ['HTTPS_PROXY'].rsplit(':', 1)
    with socket.create_connection(('127.0.0.1', int(proxy[1])), timeout=10) as connection:
        connection.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n' % port)
        head = b''
        while b'\r\n\r\n' not in head:
            chunk = connection.recv(1000)
            if not chunk:
                break
            head += chunk
        status, _, body = head.decode().partition('\r\n\r\n')
        if ' 200 ' not in status.split('\r\n')[0]:
            raise PermissionError(status.split('\r\n')[0] + ' ' + body)
        connection.sendall(b'GET /tunnelled HTTP/1.1\r\nHost: x\r\n\r\n')
        answer = b''
        while True:
            chunk = connection.recv(1000)
            if not chunk:
                break
            answer += chunk
        return answer.decode().partition('\r\n\r\n')[2]
allowed, forbidden = data['allowed_port'], data['forbidden_port']
attempt('fetch allowed', lambda: fetch('http://127.0.0.1:%d/allowed?x=1' % allowed))
attempt('tunnel allowed', lambda: tunnel(allowed))
attempt('fetch loopback', lambda: fetch('http://127.0.0.1:%d/' % forbidden))
attempt('fetch localhost', lambda: fetch('http://localhost:%d/' % forbidden))
attempt('fetch private', lambda: fetch('http://10.1.2.3:%d/' % forbidden))
attempt('fetch metadata', lambda: fetch('http://169.254.169.254/latest/meta-data/'))
attempt('https loopback', lambda: fetch('https://127.0.0.1:%d/' % forbidden))
attempt('tunnel loopback', lambda: tunnel(forbidden))
attempt('raw connect loopback', lambda: socket.create_connection(('127.0.0.1', forbidden), timeout=3))
attempt('raw connect allowed', lambda: socket.create_connection(('127.0.0.1', allowed), timeout=3))
attempt('raw connect public', lambda: socket.create_connection(('1.1.1.1', 443), timeout=3))
attempt('dns', lambda: socket.getaddrinfo('example.com', 443))
report['proxy'] = os.environ.get('HTTPS_PROXY')
print(json.dumps(report))
"#;

/// Network ON without the opt-in, from Node 20 (whose `http` ignores the proxy variables):
/// plain HTTP requests sent to the proxy named by `HTTP_PROXY`, allowed and refused.
const NODE_EGRESS: &str = r#"
const http = require('http');
let raw = '';
process.stdin.on('data', chunk => raw += chunk);
process.stdin.on('end', async () => {
  const data = JSON.parse(raw);
  const proxy = new URL(process.env.HTTP_PROXY);
  const get = (url) => new Promise((resolve) => {
    const request = http.get({ host: proxy.hostname, port: proxy.port, path: url }, (response) => {
      let body = '';
      response.on('data', chunk => body += chunk);
      response.on('end', () => resolve(response.statusCode + ' ' + body.trim()));
    });
    request.on('error', error => resolve('error ' + error.code));
  });
  const report = {
    allowed: await get('http://127.0.0.1:' + data.allowed_port + '/from-node'),
    loopback: await get('http://127.0.0.1:' + data.forbidden_port + '/'),
  };
  console.log(JSON.stringify(report));
});
"#;

/// The egress proxy's destinations: a small HTTP server the runner was told to let through
/// (standing in for a public one: everything on this machine is loopback or private), and a
/// loopback listener nothing may reach.
struct EgressTargets {
    allowed: std::net::SocketAddr,
    allowed_server: tokio::task::JoinHandle<()>,
    forbidden: std::net::TcpListener,
}

impl EgressTargets {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let allowed = listener.local_addr().unwrap();
        // Answers every request with its request line and Host header.
        let allowed_server = tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            loop {
                let Ok((mut connection, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let (reader, mut writer) = connection.split();
                    let mut reader = tokio::io::BufReader::new(reader);
                    let mut request_line = String::new();
                    let _ = reader.read_line(&mut request_line).await;
                    let mut host = String::new();
                    let mut header = String::new();
                    while reader.read_line(&mut header).await.is_ok_and(|read| read > 2) {
                        if let Some(value) = header.strip_prefix("Host:") {
                            host = value.trim().to_owned();
                        }
                        header.clear();
                    }
                    let body = format!("reached: {} at {host}", request_line.trim_end());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = writer.write_all(response.as_bytes()).await;
                    let _ = writer.shutdown().await;
                });
            }
        });
        let forbidden = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        forbidden.set_nonblocking(true).unwrap();
        Self { allowed, allowed_server, forbidden }
    }

    fn input(&self) -> Value {
        json!({
            "allowed_port": self.allowed.port(),
            "forbidden_port": self.forbidden.local_addr().unwrap().port(),
        })
    }
}

impl Drop for EgressTargets {
    fn drop(&mut self) {
        self.allowed_server.abort();
    }
}

/// What the egress snippet got: the allowed server through the proxy (HTTP and a tunnel), a
/// 403 naming the class for everything else, nothing without the proxy.
fn assert_egress_is_guarded(report: &Value, targets: &EgressTargets) {
    let outcome = |name: &str| report[name].as_str().unwrap_or_default().to_owned();
    let allowed = targets.allowed;
    let reached = format!("GOT reached: GET /allowed?x=1 HTTP/1.1 at {allowed}");
    assert_eq!(outcome("fetch allowed"), reached, "{report}");
    assert_eq!(outcome("tunnel allowed"), "GOT reached: GET /tunnelled HTTP/1.1 at x", "{report}");
    for (name, class) in [
        ("fetch loopback", "a loopback address"),
        ("fetch localhost", "a loopback address"),
        ("fetch private", "a private address"),
        ("fetch metadata", "a cloud metadata address"),
        ("https loopback", "403"),
        ("tunnel loopback", "a loopback address"),
    ] {
        let got = outcome(name);
        assert!(got.starts_with("denied") && got.contains("403"), "{name}: {report}");
        assert!(got.contains(class), "{name} should name `{class}`: {report}");
    }
    for name in ["raw connect loopback", "raw connect allowed", "raw connect public", "dns"] {
        assert!(outcome(name).starts_with("denied"), "{name}: {report}");
    }
    assert_eq!(report["proxy"], "http://127.0.0.1:3128", "{report}");
    // The refused loopback listener never saw a connection.
    let accepted = targets.forbidden.accept();
    assert!(
        matches!(&accepted, Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
        "the forbidden listener was reached: {accepted:?}"
    );
}

/// An account with the helpers to run one-step workflows over REST.
struct Bench {
    api: Api,
    auth: Auth,
}

impl Bench {
    async fn new(server: &TurbocatProcess, email: &str) -> Self {
        let api = Api::new(server);
        let account = api.register(email, "Sandbox Tester").await;
        Self { auth: account.auth(), api }
    }

    /// Runs `config` as the only step of a new workflow on `input`; the finished execution.
    async fn run(&self, name: &str, config: Value, input: Value) -> Value {
        let agent_type = if config.get("data").is_some() { "DATA" } else { "CODE" };
        let (status, body) = self
            .api
            .post(
                "/api/v1/agents",
                &self.auth,
                json!({ "name": name, "type": agent_type, "config": config,
                        "limits": { "timeout": "60s", "memoryMb": 256, "cpuSeconds": 30 } }),
            )
            .await;
        assert_eq!(status, 201, "create agent {name}: {body}");
        let agent_id = body["data"]["id"].as_str().expect("agent id").to_owned();
        let (status, body) = self
            .api
            .post(
                "/api/v1/workflows",
                &self.auth,
                json!({ "name": name, "steps": [{ "key": "only", "agentId": agent_id }] }),
            )
            .await;
        assert_eq!(status, 201, "create workflow {name}: {body}");
        let workflow_id = body["data"]["id"].as_str().expect("workflow id").to_owned();
        let (status, body) = self
            .api
            .post(
                &format!("/api/v1/workflows/{workflow_id}/execute"),
                &self.auth,
                json!({ "input": input }),
            )
            .await;
        assert_eq!(status, 202, "execute {name}: {body}");
        let execution_id = body["data"]["id"].as_str().expect("execution id").to_owned();
        let started = Instant::now();
        loop {
            let (status, body) =
                self.api.get(&format!("/api/v1/executions/{execution_id}"), &self.auth).await;
            assert_eq!(status, 200, "get execution: {body}");
            let execution = body["data"].clone();
            let state = execution["status"].as_str().unwrap_or_default();
            if ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&state) {
                return execution;
            }
            assert!(started.elapsed() < LIMIT, "{name} still {state}: {execution}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn runners(&self) -> Vec<Value> {
        let (status, body) = self.api.get("/api/v1/runners", &self.auth).await;
        assert_eq!(status, 200, "list runners: {body}");
        body["data"].as_array().cloned().unwrap_or_default()
    }
}

fn python(source: &str) -> Value {
    json!({ "code": { "language": "PYTHON", "source": source } })
}

fn node(source: &str) -> Value {
    json!({ "code": { "language": "JAVASCRIPT", "source": source } })
}

fn only_step(execution: &Value) -> &Value {
    &execution["stepRuns"][0]
}

/// What the installation under attack holds: the processes and files to reach, the secrets
/// that must never show up in a step's output or error.
struct Target {
    server_pid: u32,
    runner_pid: u32,
    port: u16,
    data_directory: PathBuf,
    secret_files: Vec<PathBuf>,
    secrets: Vec<String>,
}

/// A directory shaped like another running step's (`turbocat-step-*/work`), with a secret.
struct Victim {
    directory: PathBuf,
    secret: String,
}

impl Victim {
    fn create() -> Self {
        use std::os::unix::fs::DirBuilderExt;
        let directory = std::env::temp_dir()
            .join(format!("turbocat-step-{}", uuid::Uuid::new_v4().simple()))
            .join("work");
        std::fs::DirBuilder::new().mode(0o700).recursive(true).create(&directory).unwrap();
        let secret = format!("victim-{}", uuid::Uuid::new_v4().simple());
        std::fs::write(directory.join("secret.txt"), &secret).unwrap();
        Self { directory, secret }
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if let Some(parent) = self.directory.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

fn attack_input(target: &Target, victim: &Victim, escape_directory: &Path) -> Value {
    let mut read: Vec<String> =
        target.secret_files.iter().map(|path| path.display().to_string()).collect();
    for pid in [target.server_pid, target.runner_pid] {
        read.push(format!("/proc/{pid}/cmdline"));
        read.push(format!("/proc/{pid}/environ"));
        for path in &target.secret_files {
            read.push(format!("/proc/{pid}/root{}", path.display()));
        }
    }
    read.push(victim.directory.join("secret.txt").display().to_string());
    read.push("/etc/shadow".to_owned());
    let write = vec![
        escape_directory.join("escaped.txt").display().to_string(),
        target.data_directory.join("escaped.txt").display().to_string(),
        victim.directory.join("escaped.txt").display().to_string(),
        "/usr/escaped.txt".to_owned(),
    ];
    json!({
        "read": read,
        "write": write,
        "pids": [target.server_pid, target.runner_pid],
        "port": target.port,
        "data_directory": target.data_directory,
        "echo": "my own file",
    })
}

/// Every attack of a report got nothing; the snippet's own work is there.
fn assert_report_denies_everything(language: &str, report: &Value, target: &Target) {
    let entries = report.as_object().unwrap_or_else(|| panic!("{language}: {report}"));
    let text = report.to_string();
    for secret in &target.secrets {
        assert!(!text.contains(secret.as_str()), "{language} got a secret: {report}");
    }
    let attacks: Vec<(&String, &Value)> = entries
        .iter()
        .filter(|(name, _)| !["processes", "environment", "own"].contains(&name.as_str()))
        .collect();
    assert!(attacks.len() >= 10, "{language}: {report}");
    for (name, outcome) in attacks {
        let outcome = outcome.as_str().unwrap_or_default();
        assert!(outcome.starts_with("denied"), "{language}: `{name}` got {outcome}: {report}");
    }
    // Under the coverage run (scripts/coverage) LLVM's profile runtime adds this variable to the
    // instrumented sandbox helper's own environment, which the snippet inherits; a plain
    // `cargo test` build has no such runtime.
    let environment: Vec<&Value> = report["environment"]
        .as_array()
        .map(|names| names.iter().filter(|name| *name != "__LLVM_PROFILE_RT_INIT_ONCE").collect())
        .unwrap_or_default();
    assert_eq!(
        environment,
        [&json!("HOME"), &json!("LANG"), &json!("PATH"), &json!("TMPDIR")],
        "{language}: {report}"
    );
    assert_eq!(report["own"], "my own file", "{language}");
}

/// Whether any process of this machine has `marker` on its command line.
fn process_with_argument(marker: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(mut file) = std::fs::File::open(entry.path().join("cmdline")) else { continue };
        let mut cmdline = Vec::new();
        if file.read_to_end(&mut cmdline).is_ok()
            && String::from_utf8_lossy(&cmdline).contains(marker)
        {
            return Some(pid);
        }
    }
    None
}

async fn gone(marker: &str) -> bool {
    for _ in 0..50 {
        if process_with_argument(marker).is_none() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Every attack against one installation, and the positive controls.
async fn attack(bench: &Bench, target: &Target, egress: &EgressTargets) {
    let victim = Victim::create();
    let escape_directory = tempfile::tempdir().unwrap();
    let input = attack_input(target, &victim, escape_directory.path());
    let marker = format!("turbocat-escapee-{}", uuid::Uuid::new_v4().simple());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (mut connection, _) = listener.accept().await.unwrap();
        let (reader, mut writer) = connection.split();
        let mut line = String::new();
        tokio::io::BufReader::new(reader).read_line(&mut line).await.unwrap();
        writer.write_all(b"welcome").await.unwrap();
        line
    });

    let node_marker = format!("turbocat-escapee-{}", uuid::Uuid::new_v4().simple());
    let (
        python_run,
        node_run,
        escape,
        node_escape,
        kill_all,
        network_closed,
        node_network,
        network_open,
        data,
    ) =
        tokio::join!(
        bench.run("python attacks", python(PYTHON_ATTACKS), input.clone()),
        bench.run("node attacks", node(NODE_ATTACKS), input.clone()),
        bench.run("escape", python(PYTHON_ESCAPE), json!({ "marker": marker })),
        bench.run("node escape", node(NODE_ESCAPE), json!({ "marker": node_marker })),
        bench.run("kill all", python(PYTHON_KILL_ALL), json!({})),
        bench.run(
            "network on, no opt-in",
            json!({ "code": { "language": "PYTHON", "source": PYTHON_EGRESS, "network": "ON" } }),
            egress.input(),
        ),
        bench.run(
            "node network on, no opt-in",
            json!({ "code": { "language": "JAVASCRIPT", "source": NODE_EGRESS, "network": "ON" } }),
            egress.input(),
        ),
        bench.run(
            "network on, opted in",
            json!({ "code": { "language": "PYTHON", "source": PYTHON_CONNECT, "network": "ON",
                              "allowPrivateNetwork": true } }),
            json!({ "port": open_port }),
        ),
        bench.run("jq", json!({ "data": { "jqProgram": "{sum: (.values | add)}" } }),
            json!({ "values": [1, 2, 3] })),
    );

    assert_eq!(python_run["status"], "SUCCEEDED", "{python_run}");
    assert_report_denies_everything("python", &only_step(&python_run)["output"], target);
    let processes = &only_step(&python_run)["output"]["processes"];
    assert_eq!(processes, &json!([1, 2]), "only the sandbox's init and the snippet are visible");
    assert_eq!(node_run["status"], "SUCCEEDED", "{node_run}");
    assert_report_denies_everything("node", &only_step(&node_run)["output"], target);
    assert!(!escape_directory.path().join("escaped.txt").exists());
    assert!(!target.data_directory.join("escaped.txt").exists());
    assert!(!victim.directory.join("escaped.txt").exists());
    assert!(!Path::new("/usr/escaped.txt").exists());
    assert_eq!(
        std::fs::read_to_string(victim.directory.join("secret.txt")).unwrap(),
        victim.secret
    );

    // The process left behind in its own session died with the step.
    assert_eq!(escape["status"], "SUCCEEDED", "{escape}");
    assert_eq!(only_step(&escape)["output"]["left behind"], marker.as_str());
    assert!(gone(&marker).await, "the escapee outlived its step");
    assert_eq!(node_escape["status"], "SUCCEEDED", "{node_escape}");
    assert_eq!(only_step(&node_escape)["output"]["left behind"], node_marker.as_str());
    assert!(gone(&node_marker).await, "the detached node process outlived its step");

    // Killing everything it may signal finds nothing to kill (its init is spared, so is it);
    // the server and the runner live on (checked by the callers).
    assert_eq!(kill_all["status"], "FAILED", "{kill_all}");
    let error = only_step(&kill_all)["error"].as_str().unwrap_or_default();
    assert!(error.contains("ProcessLookupError"), "{error}");

    // The network: on without the opt-in goes through the guarded proxy only; with it, the
    // test server is reached directly.
    assert_eq!(network_closed["status"], "SUCCEEDED", "{network_closed}");
    assert_egress_is_guarded(&only_step(&network_closed)["output"], egress);
    assert_eq!(node_network["status"], "SUCCEEDED", "{node_network}");
    let node_report = &only_step(&node_network)["output"];
    // The proxy named the destination in Host (Node named the proxy).
    let reached = format!("200 reached: GET /from-node HTTP/1.1 at {}", egress.allowed);
    assert_eq!(node_report["allowed"], reached, "{node_report}");
    let refused = node_report["loopback"].as_str().unwrap_or_default();
    assert!(refused.starts_with("403 ") && refused.contains("loopback"), "{node_report}");
    assert_eq!(network_open["status"], "SUCCEEDED", "{network_open}");
    assert_eq!(only_step(&network_open)["output"], json!({ "answer": "welcome" }));
    assert_eq!(server.await.unwrap(), "hello from the sandbox\n");

    assert_eq!(data["status"], "SUCCEEDED", "{data}");
    assert_eq!(only_step(&data)["output"], json!({ "sum": 6 }));

    // The runner says it sandboxes.
    let runners = bench.runners().await;
    assert!(
        runners.iter().any(|runner| runner["sandbox"] == "ENFORCED"),
        "no runner reports its sandbox: {runners:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_steps_cannot_reach_the_servers_secret_or_database() {
    let egress = EgressTargets::start().await;
    let allowed = egress.allowed.to_string();
    let (mut server, data) = start_dev(&["--egress-test-allow", &allowed]);
    let bench = Bench::new(&server, "sandbox-dev@example.com").await;
    let secret_file = data.path().join("jwt-secret");
    let jwt_secret = std::fs::read_to_string(&secret_file).expect("dev writes its secret");
    let target = Target {
        server_pid: server.pid(),
        runner_pid: server.pid(),
        port: server.address.port(),
        data_directory: data.path().to_path_buf(),
        secret_files: vec![secret_file, data.path().join("turbocat.db")],
        secrets: vec![jwt_secret.trim().to_owned(), "SQLite format".to_owned()],
    };
    attack(&bench, &target, &egress).await;
    assert!(server.is_running(), "the server survived: {}", server.stderr_text());
    // And it still serves.
    let (status, _) = bench.api.get("/api/v1/agents", &bench.auth).await;
    assert_eq!(status, 200);
}

/// A `turbocat runner` process, killed when dropped.
struct Runner {
    child: std::process::Child,
}

/// Where a runner finds its key.
enum KeySource<'a> {
    File(&'a Path),
    Environment(&'a str),
}

impl Runner {
    fn start(
        server: &TurbocatProcess,
        key: KeySource<'_>,
        name: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut command = support::turbocat_command();
        command
            .args(["runner", "--server", &server.base_url(), "--name", name, "--capacity", "8"])
            .env_remove("TURBOCAT_API_KEY")
            .env_remove("TURBOCAT_API_KEY_ON_STDIN");
        match key {
            KeySource::File(path) => command.arg("--api-key-file").arg(path),
            KeySource::Environment(key) => command.env("TURBOCAT_API_KEY", key),
        };
        command
            .env("TURBOCAT_TEST_LLM_KEY", "sk-llm-key-of-the-runner")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (name, value) in extra {
            command.env(name, value);
        }
        Self { child: command.spawn().expect("start a runner") }
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn attached(bench: &Bench, name: &str) -> Value {
    let started = Instant::now();
    loop {
        if let Some(runner) =
            bench.runners().await.into_iter().find(|runner| runner["name"] == name)
        {
            return runner;
        }
        assert!(started.elapsed() < LIMIT, "runner {name} did not attach");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_steps_cannot_reach_the_runners_key_nor_the_servers_secrets() {
    let (mut server, _database) = start_serve(&[]).await;
    let bench = Bench::new(&server, "sandbox-serve@example.com").await;
    let (key, _) = bench.api.create_key(&bench.auth, "runner", &["RUNNER"]).await;
    let key_directory = tempfile::tempdir().unwrap();
    let key_file = key_directory.path().join("runner-key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();

    let egress = EgressTargets::start().await;
    let allowed = egress.allowed.to_string();
    let mut runner = Runner::start(
        &server,
        KeySource::File(&key_file),
        "boxed",
        &[("TURBOCAT_EGRESS_TEST_ALLOW", &allowed)],
    );
    let listed = attached(&bench, "boxed").await;
    assert_eq!(listed["sandbox"], "ENFORCED", "{listed}");
    // The key is not on the runner's command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", runner.child.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&key));

    // Given in the environment, the key leaves it: the runner restarts itself without the
    // variable (same process id), takes the key from a pipe, and attaches with it.
    let from_environment =
        Runner::start(&server, KeySource::Environment(&key), "key in environment", &[]);
    let listed = attached(&bench, "key in environment").await;
    assert_eq!(listed["sandbox"], "ENFORCED", "{listed}");
    let pid = from_environment.child.id();
    let environment = std::fs::read(format!("/proc/{pid}/environ"));
    match environment {
        // Readable here (the tests run as root, and root reads a non-dumpable process's).
        Ok(environment) => {
            let text = String::from_utf8_lossy(&environment);
            assert!(!text.contains(&key), "the key is still in the runner's environment");
            assert!(!text.contains("TURBOCAT_API_KEY="), "{text}");
        }
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied),
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&key));
    drop(from_environment);

    let target = Target {
        server_pid: server.pid(),
        runner_pid: runner.child.id(),
        port: server.address.port(),
        data_directory: key_directory.path().to_path_buf(),
        secret_files: vec![key_file.clone()],
        secrets: vec![
            key.clone(),
            crate::support::TEST_JWT_SECRET.to_owned(),
            "sk-llm-key-of-the-runner".to_owned(),
        ],
    };
    attack(&bench, &target, &egress).await;
    assert!(runner.is_running(), "the runner survived");
    assert!(server.is_running(), "the server survived: {}", server.stderr_text());
    drop(runner);

    // A kernel without the sandbox: CODE and DATA steps are refused, saying what is missing,
    // and the runner says so in ListRunners.
    let refusing = Runner::start(
        &server,
        KeySource::File(&key_file),
        "refusing",
        &[("TURBOCAT_SANDBOX_PRETEND_MISSING", "landlock")],
    );
    let listed = attached(&bench, "refusing").await;
    assert_eq!(listed["sandbox"], "UNAVAILABLE", "{listed}");
    assert!(listed["sandboxMissing"].as_str().unwrap_or_default().contains("Landlock"));
    let refused = bench.run("refused", python("print('{}')\n"), json!({})).await;
    assert_eq!(refused["status"], "FAILED", "{refused}");
    let error = only_step(&refused)["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("Landlock") && error.contains("--allow-unsandboxed-code"), "{error}");
    let refused = bench.run("refused jq", json!({ "data": { "jqProgram": "." } }), json!({})).await;
    assert_eq!(refused["status"], "FAILED", "{refused}");
    drop(refusing);

    // Unless the operator accepts running code unsandboxed.
    let _unsandboxed = Runner::start(
        &server,
        KeySource::File(&key_file),
        "unsandboxed",
        &[
            ("TURBOCAT_SANDBOX_PRETEND_MISSING", "user-namespaces"),
            ("TURBOCAT_ALLOW_UNSANDBOXED_CODE", "true"),
        ],
    );
    let listed = attached(&bench, "unsandboxed").await;
    assert_eq!(listed["sandbox"], "DISABLED", "{listed}");
    let allowed = bench.run("allowed", python("print('{\"ran\": true}')\n"), json!({})).await;
    assert_eq!(allowed["status"], "SUCCEEDED", "{allowed}");
    assert_eq!(only_step(&allowed)["output"], json!({ "ran": true }));
}
