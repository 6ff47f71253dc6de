use std::process::ExitCode;

use clap::Parser;
use evtrack::config::{Cli, Command};
use evtrack::startup::{Application, Role};

/// mimalloc rather than the system allocator: a request's events, their
/// rollup deltas and the store's rows are many short-lived allocations, and
/// glibc's malloc and free took a fifth of the embedded ingest's time
/// (`perf record` of `scripts/bench.sh --only visible`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Settings from `.env` fill in what the environment does not set.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("evtrack: .env: {e}");
        return ExitCode::FAILURE;
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print in full; a bad setting is one line.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("evtrack: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    evtrack::telemetry::init(cli.settings.log_format);
    let settings = &cli.settings;
    let one_shot = match &cli.command {
        None | Some(Command::Run | Command::Api | Command::Worker) => None,
        Some(Command::RebuildAggregates) => {
            Some(evtrack::startup::rebuild_aggregates(settings).await)
        }
        Some(Command::Backup { file }) => Some(evtrack::startup::backup(settings, file).await),
        Some(Command::Restore { file }) => Some(evtrack::startup::restore(settings, file).await),
        Some(Command::Erase { site_id, visitor }) => {
            Some(evtrack::startup::erase(settings, site_id, visitor).await)
        }
        Some(Command::Sites(c)) => Some(evtrack::startup::sites(settings, c).await),
        Some(Command::Tokens(c)) => Some(evtrack::startup::tokens(settings, c).await),
    };
    if let Some(result) = one_shot {
        return match result {
            Ok(done) => {
                println!("{done}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("evtrack: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let role = match cli.command {
        Some(Command::Api) => Role::Api,
        Some(Command::Worker) => Role::Worker,
        _ => Role::All,
    };
    // Registered before anything listens: a SIGTERM that arrives while the
    // service starts (a health check passed, a supervisor stopping it) is
    // a graceful shutdown, not the default kill.
    let signals = Signals::register();
    let app = match Application::build(cli.settings, role).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("evtrack: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (queue, store) = app.backends();
    match app.local_addr() {
        Some(addr) => tracing::info!(%queue, %store, "listening on http://{addr}"),
        None => tracing::info!(%queue, %store, "worker running"),
    }
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    let shutdown = app.shutdown_token();
    tokio::select! {
        stopped = app.run_until_stopped() => match stopped {
            Ok(()) => ExitCode::SUCCESS,
            // A part of the process died: exit non-zero so that the service
            // manager restarts it, rather than live on without that part.
            Err(e) => {
                eprintln!("evtrack: {e}");
                ExitCode::FAILURE
            }
        },
        // A client that never finishes its request must not keep the process
        // alive forever. Events not yet acknowledged are not lost: their
        // clients were not told 202 (embedded) or they stay in Redis.
        _ = async { shutdown.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
            tracing::error!("still busy {} s after the shutdown signal; exiting", SHUTDOWN_GRACE.as_secs());
            ExitCode::FAILURE
        }
    }
}

/// How long graceful shutdown may take before the process exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The next delivery of a signal (never, if it could not be registered).
#[cfg(unix)]
async fn recv(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// SIGINT and SIGTERM, registered at once: deliveries from then on are
/// kept until [`Signals::wait`] looks.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn register() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn wait(self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = recv(self.term) => {}
                _ = recv(self.interrupt) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
