//! The `turbocat` binary: `dev`, `serve`, `runner`, `migrate`, `seed`, `admin`.

use std::process::ExitCode;

use clap::Parser;
use turbocat::config::{AdminCommand, Cli, Command, LogFormat};
use turbocat::runner::executors::sandbox;
use turbocat::server;
use turbocat::store::NewerMigrations;

/// The server's hot paths allocate and free many short-lived buffers (protobuf and JSON
/// messages, SQL rows, HTTP frames): glibc's malloc took about a quarter of the server's CPU
/// under load, mimalloc much less (`docs/benchmarks.md`, eighth round).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults keep memory for later: arenas committed eagerly and freed pages handed
/// back to the system only after a second. Set before anything else runs, these make it
/// commit on demand and give freed pages back at once, which keeps the resident memory of an
/// idle server and of many idle runner streams near glibc's without losing its speed.
fn tune_allocator() {
    // `mi_option_e` in mimalloc.h (the version Cargo.lock pins); the crate names neither.
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores a value in mimalloc's option table; it is called
    // before any other thread exists.
    #[expect(unsafe_code, reason = "mimalloc's options are set through its C API")]
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
    }
}

/// How often, at most, a runtime worker going idle hands back the memory freed into its heap.
const COLLECT_FREED_MEMORY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Run by each runtime worker as it goes idle: at most every `COLLECT_FREED_MEMORY_EVERY`, it
/// has mimalloc free the pages of its heap that hold nothing live and return them. A block
/// freed by another thread (a task that moved between workers, a message built on one and
/// dropped on another) reaches its page's owner only when that owner next collects, which an
/// idle worker never does on its own: after a load the server kept about 15 MB of such pages
/// for good (`docs/benchmarks.md`, tenth round).
fn collect_freed_memory() {
    thread_local! {
        static LAST_COLLECTED: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    LAST_COLLECTED.with(|last_collected| {
        let now = std::time::Instant::now();
        if last_collected
            .get()
            .is_some_and(|at| now.duration_since(at) < COLLECT_FREED_MEMORY_EVERY)
        {
            return;
        }
        last_collected.set(Some(now));
        // SAFETY: mi_collect only walks and frees the calling thread's own heap (and purges
        // the arenas' free pages); it takes no pointer.
        #[expect(unsafe_code, reason = "mimalloc's collection is called through its C API")]
        unsafe {
            libmimalloc_sys::mi_collect(true);
        }
    });
}

fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let arguments: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if arguments.get(1).is_some_and(|command| command == sandbox::SANDBOX_SUBCOMMAND) {
        // The sandbox of a CODE or DATA step (single-threaded, no runtime, no logging).
        return sandbox::helper_main(&arguments[2..]);
    }
    let cli = Cli::parse();
    if matches!(cli.command, Command::Runner(_))
        && let Err(message) = restart_without_the_key_in_the_environment()
    {
        eprintln!("error: {message}");
        return ExitCode::FAILURE;
    }
    if matches!(cli.command, Command::JqWorker) {
        // A child of a runner: no runtime, no logging, one program after another (a warm worker
        // of the runner's pool). What it writes to stderr can reach the step's user, so a
        // panic says nothing of the build machine (the default message names source paths).
        std::panic::set_hook(Box::new(|_| eprintln!("the jq worker hit an internal error")));
        return turbocat::runner::executors::data::worker_main();
    }
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(collect_freed_memory)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    // Blocking work still running (a jq worker's pipe, a password hash) does not hold the exit
    // back past the shutdown's grace period.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!(error = %message, "turbocat stopped");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The longest key handed over (a pipe holds far more; keys are much shorter).
const MAX_HANDED_OVER_KEY_BYTES: usize = 4096;

/// A runner given its key in `TURBOCAT_API_KEY` would keep it in its environment
/// (`/proc/<pid>/environ`) for its whole life, and removing a variable is unsafe once threads
/// may run: so it executes itself again, once, without the variable, with the key on stdin
/// (a pipe written before the exec). Returns only when there is nothing to do or on failure.
fn restart_without_the_key_in_the_environment() -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    use turbocat::config::{API_KEY_ON_STDIN_VARIABLE, API_KEY_VARIABLE};
    let Some(key) = std::env::var_os(API_KEY_VARIABLE) else { return Ok(()) };
    if key.len() > MAX_HANDED_OVER_KEY_BYTES {
        return Err(format!("{API_KEY_VARIABLE} is longer than {MAX_HANDED_OVER_KEY_BYTES} bytes"));
    }
    let executable = std::env::current_exe()
        .map_err(|error| format!("cannot find the turbocat executable: {error}"))?;
    let (reader, mut writer) =
        std::io::pipe().map_err(|error| format!("cannot hand the API key over: {error}"))?;
    writer
        .write_all(key.as_encoded_bytes())
        .and_then(|()| writer.write_all(b"\n"))
        .map_err(|error| format!("cannot hand the API key over: {error}"))?;
    drop(writer);
    let mut arguments = std::env::args_os();
    let mut command = std::process::Command::new(executable);
    if let Some(program_name) = arguments.next() {
        command.arg0(program_name);
    }
    let error = command
        .args(arguments)
        .env_remove(API_KEY_VARIABLE)
        .env(API_KEY_ON_STDIN_VARIABLE, "true")
        .stdin(reader)
        .exec();
    Err(format!("cannot restart the runner without its key in the environment: {error}"))
}

/// `turbocat migrate`: applies (or with `--down N` reverts) migrations and says which.
async fn migrate(args: &turbocat::config::MigrateArgs) -> Result<(), server::StartupError> {
    let database = server::CommandDatabase::connect(&args.database).await?;
    let backend = database.backend();
    if let Some(count) = args.down {
        let reverted = database.revert(count as usize).await?;
        for migration in &reverted {
            println!("reverted {migration}");
        }
        println!("migrations reverted ({})", backend.as_str());
        return Ok(());
    }
    let newer = if args.allow_newer { NewerMigrations::Accept } else { NewerMigrations::Refuse };
    let report = database.migrate(newer).await?;
    for migration in &report.applied {
        println!("applied {migration}");
    }
    for version in &report.newer {
        println!("kept {version:04} (applied by a newer release)");
    }
    println!("migrations applied ({})", backend.as_str());
    Ok(())
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Dev(args) => {
            sandbox::configure(args.sandbox.policy());
            let running = server::start_dev(&args).await.map_err(|error| error.to_string())?;
            announce("dev", running.local_addr);
            let outcome = running.run_until_signal().await.map_err(|error| error.to_string());
            close_jq_workers().await;
            outcome
        }
        Command::Serve(args) => {
            let running = server::start_serve(&args).await.map_err(|error| error.to_string())?;
            announce("serve", running.local_addr);
            running.run_until_signal().await.map_err(|error| error.to_string())
        }
        Command::Migrate(args) => migrate(&args).await.map_err(|error| error.to_string()),
        Command::Seed(args) => {
            let store = server::open_store_for_command(&args.database)
                .await
                .map_err(|error| error.to_string())?;
            let options = turbocat::seed::SeedOptions {
                admin_email: args.admin_email.clone(),
                admin_password: args.admin_password.clone(),
            };
            let report = turbocat::seed::seed(store.as_ref(), options)
                .await
                .map_err(|error| error.to_string())?;
            if report.admin_created {
                println!("created admin {}", report.admin_email);
            } else {
                println!("admin {} already exists", report.admin_email);
            }
            if let Some(password) = &report.generated_password {
                println!("generated admin password (shown once): {password}");
            }
            println!(
                "seeded {} agents and {} workflows; {} starter templates written",
                report.agents_created, report.workflows_created, report.templates_written
            );
            Ok(())
        }
        Command::Admin(AdminCommand::Create(args)) => {
            let store = server::open_store_for_command(&args.database)
                .await
                .map_err(|error| error.to_string())?;
            let new_administrator = turbocat::service::users::NewAdministrator {
                email: args.email.clone(),
                password: args.password.expose().to_owned(),
                full_name: args.full_name.clone(),
            };
            let user =
                turbocat::service::users::create_administrator(store.as_ref(), new_administrator)
                    .await
                    .map_err(|error| describe_service_error(&error))?;
            println!("created admin {} ({})", user.email, user.id);
            Ok(())
        }
        Command::JqWorker => Err("jq-worker runs without the async runtime".to_owned()),
        Command::Runner(args) => {
            sandbox::configure(args.sandbox.policy());
            let settings = args.settings().map_err(|error| error.to_string())?;
            let (shutdown, shutdown_requested) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                server::shutdown_signal().await;
                let _ = shutdown.send(true);
            });
            println!(
                "turbocat runner {} attaching to {} (capacity {})",
                settings.name,
                settings.server_urls.join(","),
                settings.capacity
            );
            let outcome = turbocat::runner::client::run(settings, shutdown_requested)
                .await
                .map_err(|error| error.to_string());
            close_jq_workers().await;
            outcome
        }
    }
}

/// Ends the warm jq workers of the (local) runner at once, instead of when the process ends.
async fn close_jq_workers() {
    let closing = tokio::task::spawn_blocking(|| {
        turbocat::runner::executors::data::shared_pool().close();
    });
    let _ = closing.await;
}

/// A service error for a terminal: the message and every rejected field.
fn describe_service_error(error: &turbocat::error::ServiceError) -> String {
    let mut text = error.message.clone();
    if error.field_errors.len() > 1 {
        for field_error in &error.field_errors {
            text.push_str(&format!("\n  {}: {}", field_error.field, field_error.message));
        }
    }
    text
}

/// The one line a person (or a test) reads to find the server.
fn announce(mode: &str, address: std::net::SocketAddr) {
    tracing::info!(%address, mode, "turbocat is listening");
    println!("turbocat {mode} listening on http://{address} (REST /api/v1, gRPC, grpc-web)");
}
