//! Logging: `tracing` to stderr, human-readable or JSON (`LOG_FORMAT=json`).
//! The level comes from `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr is gone (the log reader exited), a failed write would be
        // reported with `eprintln!`, which panics: the task that logged would
        // die — the signal handler included, so SIGTERM would no longer stop
        // the process. Lost log lines are better than that.
        .log_internal_errors(false);
    // `try_init`: a second call (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
