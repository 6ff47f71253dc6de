//! `evtrack backup` and `evtrack restore`: the embedded store copied while
//! the service takes events, and made the store of a new data directory.

use std::process::{Command, Output};
use std::time::Duration;

use evtrack::startup::Role;
use serde_json::json;

use crate::helpers::{Backend, TestEnv, json_of, spawn_app_with};

/// The binary run once with `args` and only the settings `env`, to its end.
fn evtrack(args: &[&std::ffi::OsStr], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_evtrack"));
    for var in evtrack::config::env_names() {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn");
    cmd.output().expect("evtrack runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The number in "backed up N events" / "restored N events".
fn events_in(out: &Output) -> u64 {
    let t = text(out);
    t.split_whitespace()
        .zip(t.split_whitespace().skip(1))
        .find(|(_, next)| next.trim_end_matches(',') == "events")
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("a count of events in {t:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_to_a_consistent_store() {
    let env = TestEnv::new(Backend::EmbeddedSqlite);
    let data = env.settings.data_dir.clone();
    let app = spawn_app_with(env, Role::All).await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("evtrack-backup.sqlite3");

    // Events keep arriving while the backup runs.
    let sender = {
        let (client, address) = (app.client.clone(), app.address.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            for round in 0..40 {
                let batch: Vec<_> = (0..250)
                    .map(|i| {
                        json!({"site_id": "shop", "event_type": "page_view",
                               "path": format!("/p{}", i % 9), "userid": format!("u{}", (round * 250 + i) % 300),
                               "timestamp": "2025-11-23T10:00:00Z"})
                    })
                    .collect();
                let r = client
                    .post(format!("{address}/events"))
                    .json(&batch)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 202);
                sent += 250;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = tokio::task::spawn_blocking({
        let (file, data) = (file.clone(), data.clone());
        move || {
            evtrack(
                &["backup".as_ref(), file.as_os_str()],
                &[("DATA_DIR", data.as_os_str())],
            )
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let in_backup = events_in(&out);
    let sent = sender.await.unwrap();
    assert!(
        in_backup > 0 && in_backup <= sent,
        "{in_backup} of {sent} events"
    );

    let dir_env = [("DATA_DIR", data.as_os_str())];
    // Never over an existing file.
    let again = evtrack(&["backup".as_ref(), file.as_os_str()], &dir_env);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("exists"), "{}", text(&again));
    // Never into a data directory that has a database.
    let over = evtrack(&["restore".as_ref(), file.as_os_str()], &dir_env);
    assert_eq!(over.status.code(), Some(1));
    assert!(text(&over).contains("move its data directory aside"));
    app.app.stop().await;

    // A file that is not a backup is refused, and leaves no database.
    let fresh = tempfile::tempdir().unwrap();
    let junk = work.path().join("junk");
    std::fs::write(&junk, b"not a database, not at all").unwrap();
    let new_env = [("DATA_DIR", fresh.path().as_os_str())];
    let refused = evtrack(&["restore".as_ref(), junk.as_os_str()], &new_env);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused).contains("is not a backup"),
        "{}",
        text(&refused)
    );

    let restored = evtrack(&["restore".as_ref(), file.as_os_str()], &new_env);
    assert!(restored.status.success(), "{}", text(&restored));
    assert_eq!(events_in(&restored), in_backup);

    // The restored store answers for exactly the events of the backup:
    // its rollups agree with its raw events.
    let mut env = TestEnv::new(Backend::EmbeddedSqlite);
    env.settings.data_dir = fresh.path().to_owned();
    let app = spawn_app_with(env, Role::All).await;
    crate::helpers::fold_all(&*app.store).await;
    assert_eq!(app.store.count_all().await.unwrap(), in_backup);
    let answer = app
        .query(
            &json!({"site_id": "shop", "metrics": ["events", "visitors"],
                       "date_range": ["2025-11-23", "2025-11-23"]}),
        )
        .await;
    assert_eq!(answer["results"][0]["metrics"][0], in_backup);
    let exported = app
        .get("/api/sites/shop/events")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(exported.lines().count() as u64, in_backup);
    json_of(app.get("/health").await, 200).await;
    app.app.stop().await;
}

/// With MongoDB the data is MongoDB's to back up.
#[test]
fn backups_are_refused_for_mongodb() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("b");
    let uri = std::ffi::OsStr::new("mongodb://127.0.0.1:1");
    let out = evtrack(
        &["backup".as_ref(), file.as_os_str()],
        &[("MONGO_URI", uri)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("mongodump"), "{}", text(&out));
    assert!(!file.exists());
}
