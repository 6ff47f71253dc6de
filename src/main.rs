use std::process::ExitCode;

use clap::Parser;
use evtrack::config::{Cli, Command};
use evtrack::startup::{Application, Role};

#[tokio::main]
async fn main() -> ExitCode {
    // Settings from `.env` fill in what the environment does not set.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("evtrack: .env: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    evtrack::telemetry::init(cli.settings.log_format);
    let role = match cli.command {
        None | Some(Command::Run) => Role::All,
        Some(Command::Api) => Role::Api,
        Some(Command::Worker) => Role::Worker,
        Some(Command::RebuildAggregates) => {
            return match evtrack::startup::rebuild_aggregates(&cli.settings).await {
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
    };
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
        wait_for_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    app.run_until_stopped().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
