//! The API against its own OpenAPI document: schemathesis (from PyPI)
//! generates valid and invalid requests for every documented operation and
//! checks each answer: no server error, documented status codes, content
//! types, headers and body schemas, invalid input refused. Settings and the
//! checks turned off (with the reason) are in `tests/schemathesis.toml`.
//!
//! The seed is fixed so that a run is reproducible; set
//! `EVTRACK_SCHEMATHESIS_SEED` to explore others.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evtrack::startup::Role;

use crate::helpers::{Backend, TestEnv, json_of, spawn_app_with};

const TOKEN: &str = "schemathesis-read-token-0123";

fn schemathesis() -> PathBuf {
    let bin = std::env::var_os("EVTRACK_SCHEMATHESIS").map(PathBuf::from);
    let bin = bin.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-test/bin/schemathesis")
    });
    assert!(
        bin.exists(),
        "schemathesis not found at {} (set EVTRACK_SCHEMATHESIS); run the tests with \
         scripts/test.sh, which installs it into .venv-test",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_departure_from_the_document() {
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.stats_tokens = TOKEN.parse().unwrap();
    // The same token reads stats and exports: schemathesis sends one.
    env.settings.admin_tokens = TOKEN.parse().unwrap();
    let app = spawn_app_with(env, Role::All).await;
    let seed = std::env::var("EVTRACK_SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    // Its cache and reports go to a directory of the test's own.
    let work = tempfile::tempdir().expect("temp dir");
    let run = tokio::process::Command::new(schemathesis())
        .current_dir(work.path())
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/openapi.json", app.address))
        .args(["--max-examples", "50", "--seed", &seed, "--workers", "1"])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("schemathesis finishes within 10 minutes")
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems (seed {seed}):\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("No issues found"), "{report}");

    // The service is still up, and answered no request with a 5xx.
    json_of(app.get("/health").await, 200).await;
    let metrics = app.metrics().await;
    let counts: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("evtrack_http_request_duration_seconds_count{"))
        .collect();
    let requests: f64 = counts
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(requests > 500.0, "schemathesis sent {requests} requests");
    let server_errors = counts.iter().filter(|l| l.contains("status=\"5")).count();
    assert_eq!(server_errors, 0, "{metrics}");
}
