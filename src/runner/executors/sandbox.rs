//! The sandbox of CODE and DATA children: what a step's code can see and do.
//!
//! A sandboxed program runs three processes deep. The runner forks a child that enters new
//! user, mount, PID, IPC, UTS, cgroup and (unless the agent opted into the runner's network)
//! network namespaces between fork and
//! exec (`ChildPreparation::Namespaces` in `code`, the one place with `unsafe`), mapping only
//! the runner's own uid and gid to root inside, and execs `turbocat sandbox-exec` (the *outer
//! helper*, still in the runner's PID namespace). The helper starts `turbocat sandbox-exec
//! --init` (the *init*), which is process 1 of the new PID namespace. The init builds a new
//! root on a tmpfs holding read-only bind mounts of the system and interpreter directories,
//! a few device nodes, a fresh `/proc` of the new PID namespace and the step's work directory
//! (read-write, at the same path), pivots into it, applies Landlock (read-only everywhere but
//! the work directory, no TCP but to the egress relay, signals and abstract sockets scoped to
//! the sandbox), sets `no_new_privs`, drops every capability, and only then starts the
//! program with the step's rlimits. Because the init is process 1, everything in the sandbox
//! dies when it ends: the program's exit ends the init, and the runner kills the helper's
//! process group (helper and init) when the attempt ends; a `setsid` or double fork inside
//! does not escape that. The init reports how the program ended in a status file outside the
//! new root, and the helper ends the same way (same exit code, or the same signal).
//!
//! With the network ON without `allowPrivateNetwork`, the init also brings the namespace's
//! `lo` up and relays TCP connections to `127.0.0.1:3128` to the runner's egress proxy over a
//! Unix socket bound into the new root (`relay` here, the proxy in `egress`): the program's
//! only way out is HTTP(S) through the SSRF guard.
//!
//! Why re-executing `turbocat` instead of doing it all between fork and exec: mounting,
//! Landlock and reading paths allocate, which is unsound between fork and exec in the
//! multi-threaded runner; a fresh single-threaded process may do it safely, and the PID
//! namespace needs a first child anyway.
//!
//! Why the runner's own uid (root, when the runner runs as root) and not another one: the
//! interpreter may live where only the runner's user can walk (pyenv under `/root`), and a
//! user namespace made by another uid could not bind it. Mapped root is harmless here: it has
//! no capability, sees only the new root (read-only but for its work directory, so even the
//! owner's `chmod` fails), no other process, and Landlock on top.
//!
//! Whether this kernel allows it is probed once per process, by running the whole sandbox
//! around `turbocat sandbox-exec --probe`. Where it fails, CODE and DATA steps are refused
//! with what is missing, unless the operator started the runner with
//! `--allow-unsandboxed-code`.
//! May call: the operating system (namespaces, mounts, Landlock, rlimits, processes).

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::Signal;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::StepError;
use super::code::{ChildLimits, ChildPreparation, MemoryLimit, NamespaceEntry};
use super::egress;
use crate::proto::v1 as pb;

/// The hidden subcommand of the turbocat binary that builds the sandbox (`helper_main`).
pub const SANDBOX_SUBCOMMAND: &str = "sandbox-exec";
/// The helper exits with this status when it could not build the sandbox (the reason is on
/// stderr, prefixed with [`SANDBOX_ERROR_PREFIX`]).
pub const SANDBOX_FAILURE_EXIT_STATUS: i32 = 86;
/// Prefix of the helper's own error line on stderr.
pub const SANDBOX_ERROR_PREFIX: &str = "turbocat sandbox: ";
/// The environment variable that makes the runner act as if the kernel lacked a sandbox
/// feature (`landlock` or `user-namespaces`), to test the refusal on any machine.
pub const PRETEND_MISSING_VARIABLE: &str = "TURBOCAT_SANDBOX_PRETEND_MISSING";

/// System directories every sandbox sees read-only (those that exist).
const SYSTEM_DIRECTORIES: [&str; 7] =
    ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// What of `/etc` a program needs: the dynamic linker's cache, name resolution, certificates,
/// time zones, user names. Not the rest (keys, shadow files, the operator's configuration).
const ETC_ENTRIES: [&str; 21] = [
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/pki/tls/certs",
    "/etc/mime.types",
    "/etc/passwd",
    "/etc/group",
    "/etc/os-release",
];
/// Device nodes bound into the sandbox.
const DEVICES: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// Whether CODE and DATA steps run sandboxed on this runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxMode {
    /// Every CODE and DATA step runs in the sandbox.
    Enforced,
    /// The kernel lacks `missing`, and the operator accepted running code without a sandbox.
    Unsandboxed { missing: String },
    /// The kernel lacks `missing`: CODE and DATA steps are refused.
    Unavailable { missing: String },
}

impl SandboxMode {
    /// The mode as the runner's hello says it.
    pub fn to_proto(&self) -> (pb::RunnerSandbox, String) {
        match self {
            Self::Enforced => (pb::RunnerSandbox::Enforced, String::new()),
            Self::Unsandboxed { missing } => (pb::RunnerSandbox::Disabled, missing.clone()),
            Self::Unavailable { missing } => (pb::RunnerSandbox::Unavailable, missing.clone()),
        }
    }
}

/// What the operator decided about the sandbox, set once at start by `turbocat runner` and
/// `turbocat dev`.
#[derive(Debug, Clone, Default)]
pub struct SandboxPolicy {
    /// Run CODE and DATA steps unsandboxed where the kernel does not allow the sandbox.
    pub allow_unsandboxed: bool,
    /// Act as if the kernel lacked this feature (`landlock`, `user-namespaces`); for tests.
    pub pretend_missing: Option<String>,
    /// The one address the egress proxy lets through whatever its class; for tests.
    pub egress_test_allow: Option<std::net::SocketAddr>,
}

static POLICY: OnceLock<SandboxPolicy> = OnceLock::new();
static MODE: OnceCell<SandboxMode> = OnceCell::const_new();

/// Sets the policy; the first call wins, before the first step (later calls change nothing).
pub fn configure(policy: SandboxPolicy) {
    egress::configure_test_allowance(policy.egress_test_allow);
    let _ = POLICY.set(policy);
}

/// This runner's mode, probed once.
pub async fn mode() -> SandboxMode {
    MODE.get_or_init(probe).await.clone()
}

async fn probe() -> SandboxMode {
    let policy = POLICY.get().cloned().unwrap_or_default();
    let missing = match policy.pretend_missing.as_deref().map(str::trim) {
        Some("landlock") => Some("Landlock (pretended)".to_owned()),
        Some("user-namespaces") => Some("user namespaces (pretended)".to_owned()),
        _ => match probe_landlock() {
            Err(missing) => Some(missing),
            Ok(()) => probe_namespaces().await.err(),
        },
    };
    let mode = match missing {
        None => SandboxMode::Enforced,
        Some(missing) if policy.allow_unsandboxed => SandboxMode::Unsandboxed { missing },
        Some(missing) => SandboxMode::Unavailable { missing },
    };
    match &mode {
        SandboxMode::Enforced => {
            tracing::info!(sandbox = "enforced", "CODE and DATA steps run sandboxed");
        }
        SandboxMode::Unsandboxed { missing } => tracing::warn!(
            sandbox = "disabled",
            %missing,
            "CODE and DATA steps run WITHOUT a sandbox (--allow-unsandboxed-code)"
        ),
        SandboxMode::Unavailable { missing } => tracing::warn!(
            sandbox = "unavailable",
            %missing,
            "CODE and DATA steps are refused: the kernel does not allow the sandbox (start the \
             runner with --allow-unsandboxed-code to run them unsandboxed)"
        ),
    }
    mode
}

fn probe_landlock() -> Result<(), String> {
    let created = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|ruleset| ruleset.create());
    created.map(|_| ()).map_err(|error| format!("Landlock ({error})"))
}

/// Runs the whole sandbox around `turbocat sandbox-exec --probe`.
async fn probe_namespaces() -> Result<(), String> {
    let directory = StepDirectory::create()
        .map_err(|error| format!("a work directory for the probe ({error})"))?;
    let helper = super::data::helper_executable().map_err(|error| error.message)?;
    let spec = SandboxSpec {
        program: helper.clone(),
        arguments: vec![SANDBOX_SUBCOMMAND.into(), "--probe".into()],
        step_directory: directory.path.clone(),
        read_only_paths: read_only_paths(&[helper]),
        network: SandboxNetwork::Off,
        limits: ChildLimits { cpu_seconds: 10, memory: MemoryLimit::Data(256 << 20) },
    };
    let mut command = sandboxed_command(&spec, &[])
        .map_err(|error| format!("user namespaces ({})", error.message))?;
    command.stdin(std::process::Stdio::null()).kill_on_drop(true);
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), command.output()).await;
    directory.remove().await;
    let output = match outcome {
        Err(_) => return Err("user namespaces (the probe did not finish in time)".to_owned()),
        Ok(Err(error)) => return Err(format!("user namespaces ({error})")),
        Ok(Ok(output)) => output,
    };
    if output.status.success() && output.stdout.starts_with(b"sandboxed") {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(format!(
        "user, PID and mount namespaces ({}: {})",
        output.status,
        crate::text::truncate_text(stderr.trim(), 300)
    ))
}

/// Fails a CODE or DATA step that may not run here, else says whether to sandbox it.
pub(super) async fn require() -> Result<bool, StepError> {
    match mode().await {
        SandboxMode::Enforced => Ok(true),
        SandboxMode::Unsandboxed { .. } => Ok(false),
        SandboxMode::Unavailable { missing } => Err(StepError::invalid(format!(
            "this runner cannot sandbox CODE and DATA steps: the kernel lacks {missing}; the \
             operator may start it with --allow-unsandboxed-code to run them without a sandbox"
        ))),
    }
}

/// Tries to remove a step's directory, and the pause between them.
const REMOVAL_ATTEMPTS: u32 = 50;
const REMOVAL_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(40);

/// A step's directory: `work` (the program's working directory, `HOME` and `TMPDIR`) and
/// `root` (where the sandbox's root is built), removed when the attempt ends (also when the
/// attempt is dropped).
pub(super) struct StepDirectory {
    pub path: PathBuf,
    removed: bool,
}

impl StepDirectory {
    pub fn create() -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path =
            std::env::temp_dir().join(format!("turbocat-step-{}", uuid::Uuid::new_v4().simple()));
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        builder.create(&path)?;
        let directory = Self { path, removed: false };
        builder.create(directory.work())?;
        builder.create(directory.path.join("root"))?;
        Ok(directory)
    }

    pub fn work(&self) -> PathBuf {
        self.path.join("work")
    }

    /// Removes the directory. The last processes of a killed sandbox may still be dying and
    /// writing into it for a moment, so a failed removal is tried again a few times.
    pub async fn remove(mut self) {
        self.removed = true;
        for _ in 0..REMOVAL_ATTEMPTS {
            let path = self.path.clone();
            let removal = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&path)).await;
            match removal {
                Ok(Ok(())) => return,
                Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => return,
                _ => tokio::time::sleep(REMOVAL_RETRY_DELAY).await,
            }
        }
        tracing::warn!(path = %self.path.display(), "cannot remove a step's directory");
    }

    /// For a directory removed already: nothing to do when dropped.
    pub fn forget(mut self) {
        self.removed = true;
    }

    /// [`Self::remove`] for a thread that may block (it sleeps between attempts).
    pub fn remove_blocking(mut self) {
        self.removed = true;
        for _ in 0..REMOVAL_ATTEMPTS {
            match std::fs::remove_dir_all(&self.path) {
                Ok(()) => return,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(REMOVAL_RETRY_DELAY),
            }
        }
        tracing::warn!(path = %self.path.display(), "cannot remove a step's directory");
    }
}

impl Drop for StepDirectory {
    fn drop(&mut self) {
        if !self.removed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What one sandbox runs, handed to `turbocat sandbox-exec` as its JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SandboxSpec {
    pub program: PathBuf,
    pub arguments: Vec<OsString>,
    /// Holds `work` and `root` (see [`StepDirectory`]).
    pub step_directory: PathBuf,
    /// Seen read-only inside (besides the work directory, `/proc` and a few devices).
    pub read_only_paths: Vec<PathBuf>,
    pub network: SandboxNetwork,
    pub limits: ChildLimits,
}

/// The network a sandboxed program has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum SandboxNetwork {
    /// A network namespace with nothing in it.
    Off,
    /// Its own empty network namespace, with `lo` up and the init relaying TCP connections to
    /// `127.0.0.1:`[`egress::RELAY_PORT`] to the runner's egress proxy (see `egress`); no other
    /// TCP connection (Landlock).
    Proxied,
    /// The runner's network (`allowPrivateNetwork`).
    Shared,
}

/// The system directories, the needed part of `/etc`, and the directories (`<prefix>` of
/// `<prefix>/bin/<program>`, or the file itself) of `programs`.
pub(super) fn read_only_paths(programs: &[PathBuf]) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = SYSTEM_DIRECTORIES.iter().map(PathBuf::from).collect();
    paths.extend(ETC_ENTRIES.iter().map(PathBuf::from));
    for program in programs {
        let mut candidates = vec![program.clone()];
        if let Ok(canonical) = std::fs::canonicalize(program) {
            candidates.push(canonical);
        }
        for candidate in candidates {
            let directory = candidate.parent().filter(|parent| parent.ends_with("bin"));
            let wanted = match directory.and_then(Path::parent) {
                Some(prefix) if prefix != Path::new("/") => prefix.to_path_buf(),
                _ => candidate,
            };
            if !paths.iter().any(|present| wanted.starts_with(present)) {
                paths.push(wanted);
            }
        }
    }
    paths
}

/// The runner's command for `spec`: `turbocat sandbox-exec <spec>` entering new namespaces,
/// with an environment of exactly `environment`.
pub(super) fn sandboxed_command(
    spec: &SandboxSpec,
    environment: &[(&str, OsString)],
) -> Result<tokio::process::Command, StepError> {
    let encoded = serde_json::to_string(spec)
        .map_err(|error| StepError::retryable(format!("cannot encode the sandbox: {error}")))?;
    let mut command = tokio::process::Command::new(super::data::helper_executable()?);
    command
        .arg(SANDBOX_SUBCOMMAND)
        .arg(encoded)
        .env_clear()
        .envs(environment.iter().map(|(name, value)| (name, value)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    ChildPreparation::Namespaces(NamespaceEntry::new(spec.network == SandboxNetwork::Shared))
        .install(command.as_std_mut());
    Ok(command)
}

/// `turbocat sandbox-exec <spec>`: the outer helper; `--init <spec>`: process 1 of the
/// sandbox; `--probe`: what the probe runs inside.
pub fn helper_main(arguments: &[OsString]) -> ExitCode {
    let texts: Vec<&str> = arguments.iter().filter_map(|argument| argument.to_str()).collect();
    match texts.as_slice() {
        ["--probe"] => {
            // Inside: process 1 is the init, and nothing of the runner is visible.
            let pid_one_is_ours = std::fs::read_to_string("/proc/1/cmdline")
                .is_ok_and(|cmdline| cmdline.contains(SANDBOX_SUBCOMMAND));
            let isolated = pid_one_is_ours && !Path::new("/proc/self/cwd/../root").exists();
            // Written without panicking when the runner is gone already.
            let answer: &[u8] = if isolated { b"sandboxed\n" } else { b"not isolated\n" };
            let _ = std::io::stdout().write_all(answer);
            if isolated { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        // Never mount or pivot in namespaces the runner did not make for this sandbox (the
        // outer helper only starts the init).
        ["--init", _] if !(in_own_user_namespace() && rustix::process::getpid().is_init()) => {
            fail("the init must be process 1 of a sandbox's namespaces")
        }
        ["--init", spec] => match decode(spec).and_then(|spec| init_main(&spec)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => fail(&message),
        },
        [spec] => match decode(spec).and_then(|spec| outer_main(&spec)) {
            Ok(code) => code,
            Err(message) => fail(&message),
        },
        _ => fail("usage: turbocat sandbox-exec <spec>"),
    }
}

/// Whether this process is in a user namespace that maps a single id (the runner's), as the
/// runner's child preparation makes it.
fn in_own_user_namespace() -> bool {
    let Ok(map) = std::fs::read_to_string("/proc/self/uid_map") else { return false };
    let lines: Vec<Vec<&str>> = map.lines().map(|line| line.split_whitespace().collect()).collect();
    matches!(lines.as_slice(), [fields] if fields.len() == 3 && fields[2] == "1")
}

fn decode(spec: &str) -> Result<SandboxSpec, String> {
    serde_json::from_str(spec).map_err(|error| format!("the sandbox spec is invalid: {error}"))
}

fn fail(message: &str) -> ExitCode {
    eprintln!("{SANDBOX_ERROR_PREFIX}{message}");
    ExitCode::from(SANDBOX_FAILURE_EXIT_STATUS as u8)
}

fn status_file(spec: &SandboxSpec) -> PathBuf {
    spec.step_directory.join("status")
}

/// The outer helper: starts the init (process 1 of the new PID namespace), waits for it, and
/// ends as the program ended.
fn outer_main(spec: &SandboxSpec) -> Result<ExitCode, String> {
    let executable = std::env::current_exe()
        .map_err(|error| format!("cannot find the turbocat executable: {error}"))?;
    let encoded = serde_json::to_string(spec).map_err(|error| error.to_string())?;
    // Opened before the init pivots the shared mount namespace (and this process's root with
    // it) into the sandbox's root, where the file is out of sight.
    let mut status_reader = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(status_file(spec))
        .map_err(|error| format!("cannot create the status file: {error}"))?;
    let init_status = std::process::Command::new(executable)
        .args([SANDBOX_SUBCOMMAND, "--init"])
        .arg(encoded)
        .status()
        .map_err(|error| format!("cannot start the sandbox's init: {error}"))?;
    let mut report = String::new();
    let _ = std::io::Read::read_to_string(&mut status_reader, &mut report);
    let mut words = report.split_whitespace();
    match (words.next(), words.next().and_then(|number| number.parse::<i32>().ok())) {
        (Some("exit"), Some(code)) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        (Some("signal"), Some(number)) => {
            // End by the same signal, without a core file.
            let _ = rustix::process::setrlimit(
                rustix::process::Resource::Core,
                rustix::process::Rlimit { current: Some(0), maximum: Some(0) },
            );
            if let Some(signal) = Signal::from_named_raw(number) {
                let _ = rustix::process::kill_process(rustix::process::getpid(), signal);
            }
            Ok(ExitCode::from(u8::try_from(128 + number).unwrap_or(255)))
        }
        _ => {
            if init_status.success() {
                return Err("the sandbox's init reported nothing".to_owned());
            }
            // The init wrote its reason on stderr.
            Ok(ExitCode::from(
                init_status
                    .code()
                    .and_then(|code| u8::try_from(code).ok())
                    .unwrap_or(SANDBOX_FAILURE_EXIT_STATUS as u8),
            ))
        }
    }
}

/// Process 1 of the sandbox: builds the root, locks itself down, runs the program and
/// writes how it ended to the status file.
fn init_main(spec: &SandboxSpec) -> Result<(), String> {
    // Should the helper die, so does the sandbox.
    let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
    // The program may not trace the init nor open what it holds (the status file).
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    let mut status = File::options()
        .write(true)
        .open(status_file(spec))
        .map_err(|error| format!("cannot open the status file: {error}"))?;
    let work = spec.step_directory.join("work");
    build_root(spec, &work)?;
    let relay_listener = match spec.network {
        SandboxNetwork::Proxied => Some(relay::listen()?),
        SandboxNetwork::Off | SandboxNetwork::Shared => None,
    };
    restrict(spec, &work)?;
    // Started after Landlock, so its threads are under it too.
    if let Some(listener) = relay_listener {
        relay::start(listener)?;
    }
    let mut command = std::process::Command::new(&spec.program);
    command.args(&spec.arguments).current_dir(&work);
    ChildPreparation::Limits(spec.limits).install(&mut command);
    let child = command
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", spec.program.display()))?;
    let program = rustix::process::Pid::from_raw(child.id() as i32);
    drop(child);
    // Process 1 adopts every orphan of the sandbox: reap them all until the program ends.
    let ending = loop {
        match rustix::process::wait(rustix::process::WaitOptions::empty()) {
            Ok(Some((pid, wait_status))) if Some(pid) == program => break wait_status,
            Ok(_) | Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(format!("cannot wait for the program: {error}")),
        }
    };
    let ended = std::process::ExitStatus::from_raw(ending.as_raw() as i32);
    let line = match (ended.code(), ended.signal()) {
        (Some(code), _) => format!("exit {code}\n"),
        (None, Some(signal)) => format!("signal {signal}\n"),
        _ => "exit 1\n".to_owned(),
    };
    status.write_all(line.as_bytes()).map_err(|error| error.to_string())?;
    Ok(())
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> String {
    let place = path.display().to_string();
    let what = what.to_owned();
    move |error| format!("{what} {place}: {error}")
}

/// Mounts the new root (read-only binds, devices, `/proc`, the work directory) and pivots
/// into it.
fn build_root(spec: &SandboxSpec, work: &Path) -> Result<(), String> {
    let root = spec.step_directory.join("root");
    rustix::mount::mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .map_err(io_error("cannot make private", Path::new("/")))?;
    rustix::mount::mount(
        "tmpfs",
        &root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=0755,size=1m",
    )
    .map_err(io_error("cannot mount a tmpfs on", &root))?;
    for path in &spec.read_only_paths {
        bind_read_only(&root, path)?;
    }
    for device in DEVICES {
        let device = Path::new(device);
        let target = inside(&root, device);
        create_file(&target)?;
        rustix::mount::mount_bind(device, &target).map_err(io_error("cannot bind", device))?;
        // Read-only still lets the device be written; it keeps its inode's mode unchangeable.
        remount_read_only(device, &target, MountFlags::empty())?;
    }
    let work_target = inside(&root, work);
    std::fs::create_dir_all(&work_target).map_err(|error| error.to_string())?;
    rustix::mount::mount_bind(work, &work_target).map_err(io_error("cannot bind", work))?;
    remount(work, &work_target, MountFlags::NODEV)?;
    if spec.network == SandboxNetwork::Proxied {
        let sockets = egress::socket_directory(&spec.step_directory);
        let sockets_target = inside(&root, Path::new(egress::SANDBOX_SOCKET_DIRECTORY));
        std::fs::create_dir_all(&sockets_target).map_err(|error| error.to_string())?;
        rustix::mount::mount_bind(&sockets, &sockets_target)
            .map_err(io_error("cannot bind", &sockets))?;
        // Connecting to a socket on a read-only mount works; replacing it does not.
        remount(
            &sockets,
            &sockets_target,
            MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOEXEC,
        )?;
    }
    let proc_target = root.join("proc");
    std::fs::create_dir_all(&proc_target).map_err(|error| error.to_string())?;
    rustix::mount::mount(
        "proc",
        &proc_target,
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::RDONLY,
        None,
    )
    .map_err(io_error("cannot mount a fresh /proc on", &proc_target))?;
    std::env::set_current_dir(&root).map_err(|error| error.to_string())?;
    rustix::process::pivot_root(".", ".").map_err(io_error("cannot pivot into", &root))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)
        .map_err(io_error("cannot detach the old root", Path::new("/")))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(io_error("cannot make read-only", Path::new("/")))?;
    std::env::set_current_dir(work).map_err(|error| error.to_string())?;
    Ok(())
}

fn inside(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

fn create_file(path: &Path) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
    }
    File::create(path).map(drop).map_err(|error| format!("{}: {error}", path.display()))
}

/// Binds `path` at the same place under `root`, read-only (a symbolic link outside `/etc`
/// is copied as a link, so `/bin -> usr/bin` stays one).
fn bind_read_only(root: &Path, path: &Path) -> Result<(), String> {
    let Ok(link_metadata) = std::fs::symlink_metadata(path) else { return Ok(()) };
    let target = inside(root, path);
    if link_metadata.file_type().is_symlink() && !path.starts_with("/etc") {
        let destination = std::fs::read_link(path).map_err(|error| error.to_string())?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
        }
        return rustix::fs::symlink(&destination, &target).map_err(io_error("cannot link", path));
    }
    let Ok(metadata) = std::fs::metadata(path) else { return Ok(()) };
    if metadata.is_dir() {
        std::fs::create_dir_all(&target).map_err(|error| error.to_string())?;
    } else {
        create_file(&target)?;
    }
    rustix::mount::mount_bind_recursive(path, &target).map_err(io_error("cannot bind", path))?;
    remount_read_only(path, &target, MountFlags::NODEV)
}

/// Makes the bind mount at `target` (of `source`) read-only (see [`remount`]).
fn remount_read_only(source: &Path, target: &Path, extra: MountFlags) -> Result<(), String> {
    remount(source, target, MountFlags::RDONLY | extra)
}

/// Remounts the bind mount at `target` (of `source`) with `flags`, without set-user-id
/// programs, keeping the flags the kernel locked on the original mount (a remount that drops
/// them fails).
fn remount(source: &Path, target: &Path, extra: MountFlags) -> Result<(), String> {
    let kept = rustix::fs::statvfs(source)
        .map(|stats| stats.f_flag)
        .unwrap_or(rustix::fs::StatVfsMountFlags::empty());
    let mut flags = MountFlags::BIND | MountFlags::NOSUID | extra;
    for (statvfs_flag, mount_flag) in [
        (rustix::fs::StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (rustix::fs::StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (rustix::fs::StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (rustix::fs::StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (rustix::fs::StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ] {
        if kept.contains(statvfs_flag) {
            flags |= mount_flag;
        }
    }
    rustix::mount::mount_remount(target, flags, "").map_err(io_error("cannot remount", source))
}

/// Landlock, `no_new_privs` and no capabilities, for the init and everything it starts.
fn restrict(spec: &SandboxSpec, work: &Path) -> Result<(), String> {
    let abi = ABI::V6;
    let read = AccessFs::from_read(abi);
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|ruleset| ruleset.scope(Scope::from_all(abi)))
        .map_err(|error| format!("Landlock: {error}"))?;
    if spec.network != SandboxNetwork::Shared {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(|error| format!("Landlock: {error}"))?;
    }
    let mut created = ruleset.create().map_err(|error| format!("Landlock: {error}"))?;
    if spec.network == SandboxNetwork::Proxied {
        // The one TCP connection allowed: to the relay.
        created = created
            .add_rule(landlock::NetPort::new(egress::RELAY_PORT, AccessNet::ConnectTcp))
            .map_err(|error| format!("Landlock: {error}"))?;
    }
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = spec
        .read_only_paths
        .iter()
        .filter(|path| path.exists())
        .map(|path| (path.clone(), read))
        .collect();
    rules.push((PathBuf::from("/proc"), read));
    rules.push((work.to_path_buf(), AccessFs::from_all(abi)));
    for device in DEVICES {
        rules.push((PathBuf::from(device), AccessFs::ReadFile | AccessFs::WriteFile));
    }
    for (path, access) in rules {
        let descriptor = PathFd::new(&path)
            .map_err(|error| format!("Landlock: cannot open {}: {error}", path.display()))?;
        created = created
            .add_rule(PathBeneath::new(descriptor, access))
            .map_err(|error| format!("Landlock: {}: {error}", path.display()))?;
    }
    let restricted = created.restrict_self().map_err(|error| format!("Landlock: {error}"))?;
    if restricted.ruleset == RulesetStatus::NotEnforced {
        return Err("Landlock is not enforced by this kernel".to_owned());
    }
    rustix::thread::set_no_new_privs(true).map_err(|error| format!("no_new_privs: {error}"))?;
    // Root inside the namespace, but without any capability, also after exec.
    rustix::thread::set_capabilities_secure_bits(
        rustix::thread::CapabilitiesSecureBits::NO_ROOT
            | rustix::thread::CapabilitiesSecureBits::NO_ROOT_LOCKED
            | rustix::thread::CapabilitiesSecureBits::NO_SETUID_FIXUP
            | rustix::thread::CapabilitiesSecureBits::NO_SETUID_FIXUP_LOCKED,
    )
    .map_err(|error| format!("cannot set the secure bits: {error}"))?;
    let none = rustix::thread::CapabilitySet::empty();
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets { effective: none, permitted: none, inheritable: none },
    )
    .map_err(|error| format!("cannot drop the capabilities: {error}"))?;
    Ok(())
}

/// The init's relay (network ON without `allowPrivateNetwork`): each TCP connection to
/// `127.0.0.1:`[`egress::RELAY_PORT`] in the step's network namespace is carried to the
/// runner's egress proxy over its Unix socket, byte for byte, by two threads.
mod relay {
    use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::egress;

    /// Connections relayed at once; more are closed at once.
    const MAX_RELAYED_CONNECTIONS: usize = 64;
    /// The relay's threads only copy bytes.
    const THREAD_STACK_BYTES: usize = 64 * 1024;

    /// Brings `lo` up in the step's network namespace and listens on the relay port (before
    /// Landlock, which forbids binding).
    pub(super) fn listen() -> Result<TcpListener, String> {
        bring_loopback_up().map_err(|error| format!("cannot bring the loopback up: {error}"))?;
        TcpListener::bind((Ipv4Addr::LOCALHOST, egress::RELAY_PORT))
            .map_err(|error| format!("cannot listen on the relay port: {error}"))
    }

    /// Relays in the background, for as long as the init lives.
    pub(super) fn start(listener: TcpListener) -> Result<(), String> {
        let socket = Path::new(egress::SANDBOX_SOCKET_DIRECTORY).join(egress::SOCKET_NAME);
        std::thread::Builder::new()
            .stack_size(THREAD_STACK_BYTES)
            .spawn(move || accept_loop(&listener, &socket))
            .map(drop)
            .map_err(|error| format!("cannot start the relay: {error}"))
    }

    /// A relayed connection's place in the count, given back when both directions ended.
    struct Slot(Arc<AtomicUsize>);

    impl Drop for Slot {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn accept_loop(listener: &TcpListener, socket: &Path) {
        let open = Arc::new(AtomicUsize::new(0));
        for incoming in listener.incoming() {
            let Ok(client) = incoming else {
                // Out of descriptors, say: wait instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            };
            if open.load(Ordering::SeqCst) >= MAX_RELAYED_CONNECTIONS {
                continue;
            }
            let Ok(proxy) = UnixStream::connect(socket) else { continue };
            open.fetch_add(1, Ordering::SeqCst);
            relay(client, proxy, Arc::new(Slot(open.clone())));
        }
    }

    fn relay(client: TcpStream, proxy: UnixStream, slot: Arc<Slot>) {
        let (Ok(client_writer), Ok(proxy_writer)) = (client.try_clone(), proxy.try_clone()) else {
            return;
        };
        let upstream_slot = slot.clone();
        let spawn = |work: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().stack_size(THREAD_STACK_BYTES).spawn(work).is_ok()
        };
        let upstream = spawn(Box::new(move || {
            let _slot = upstream_slot;
            pipe(client, proxy_writer);
        }));
        if upstream {
            spawn(Box::new(move || {
                let _slot = slot;
                pipe(proxy, client_writer);
            }));
        }
    }

    /// Copies until `from` ends, then half-closes `to`; on an error both are closed, so the
    /// other direction ends too.
    fn pipe<R, W>(mut from: R, mut to: W)
    where
        R: std::io::Read + ShutdownSocket,
        W: std::io::Write + ShutdownSocket,
    {
        match std::io::copy(&mut from, &mut to) {
            Ok(_) => to.shutdown_socket(Shutdown::Write),
            Err(_) => {
                to.shutdown_socket(Shutdown::Both);
                from.shutdown_socket(Shutdown::Both);
            }
        }
    }

    trait ShutdownSocket {
        fn shutdown_socket(&self, how: Shutdown);
    }

    impl ShutdownSocket for TcpStream {
        fn shutdown_socket(&self, how: Shutdown) {
            let _ = self.shutdown(how);
        }
    }

    impl ShutdownSocket for UnixStream {
        fn shutdown_socket(&self, how: Shutdown) {
            let _ = self.shutdown(how);
        }
    }

    /// `ip link set lo up`, over rtnetlink: one `RTM_NEWLINK` asking for `IFF_UP`, and its
    /// acknowledgement.
    fn bring_loopback_up() -> Result<(), String> {
        use rustix::net::{
            AddressFamily, RecvFlags, SendFlags, SocketType, netlink, recv, sendto, socket,
        };
        const RTM_NEWLINK: u16 = 16;
        const NLMSG_ERROR: u16 = 2;
        const NLM_F_REQUEST: u16 = 1;
        const NLM_F_ACK: u16 = 4;
        const IFF_UP: u32 = 1;
        let to_text = |error: rustix::io::Errno| error.to_string();
        let inet = socket(AddressFamily::INET, SocketType::DGRAM, None).map_err(to_text)?;
        let index = rustix::net::netdevice::name_to_index(&inet, "lo").map_err(to_text)?;
        let index = i32::try_from(index).map_err(|error| error.to_string())?;
        let mut message = Vec::with_capacity(32);
        message.extend_from_slice(&32u32.to_ne_bytes());
        message.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        message.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        message.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        message.extend_from_slice(&[0, 0]); // family AF_UNSPEC, padding
        message.extend_from_slice(&0u16.to_ne_bytes()); // device type
        message.extend_from_slice(&index.to_ne_bytes());
        message.extend_from_slice(&IFF_UP.to_ne_bytes()); // flags
        message.extend_from_slice(&IFF_UP.to_ne_bytes()); // change mask
        // Protocol 0 of netlink is NETLINK_ROUTE.
        let route = socket(AddressFamily::NETLINK, SocketType::RAW, None).map_err(to_text)?;
        sendto(&route, &message, SendFlags::empty(), &netlink::SocketAddrNetlink::new(0, 0))
            .map_err(to_text)?;
        let mut answer = [0u8; 1024];
        let (length, _) = recv(&route, &mut answer, RecvFlags::empty()).map_err(to_text)?;
        let field = |range: std::ops::Range<usize>| answer.get(range).filter(|_| length >= 20);
        let kind = field(4..6).map(|bytes| u16::from_ne_bytes([bytes[0], bytes[1]]));
        let code =
            field(16..20).map(|bytes| i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]));
        match (kind, code) {
            (Some(NLMSG_ERROR), Some(0)) => Ok(()),
            (Some(NLMSG_ERROR), Some(code)) => {
                Err(rustix::io::Errno::from_raw_os_error(-code).to_string())
            }
            _ => Err("no acknowledgement from the kernel".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreters_bring_their_prefix_and_other_programs_themselves() {
        let paths = read_only_paths(&[
            PathBuf::from("/opt/python/3.11/bin/python3"),
            PathBuf::from("/usr/bin/node"),
            PathBuf::from("/srv/turbocat/turbocat"),
        ]);
        assert!(paths.contains(&PathBuf::from("/opt/python/3.11")), "{paths:?}");
        assert!(paths.contains(&PathBuf::from("/srv/turbocat/turbocat")), "{paths:?}");
        assert!(!paths.iter().any(|path| path == Path::new("/usr/bin")), "under /usr already");
        assert!(paths.contains(&PathBuf::from("/etc/ld.so.cache")));
        assert!(!paths.iter().any(|path| path == Path::new("/etc")), "never all of /etc");
    }

    #[test]
    fn the_init_refuses_to_mount_outside_a_sandbox() {
        // A test process is not process 1 of a sandbox's namespaces.
        assert!(!rustix::process::getpid().is_init());
        let arguments: Vec<OsString> =
            ["--init", r#"{"program":"/bin/true"}"#].into_iter().map(OsString::from).collect();
        assert_eq!(helper_main(&arguments), ExitCode::from(SANDBOX_FAILURE_EXIT_STATUS as u8));
    }
}
