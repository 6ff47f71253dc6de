//! Hostile and broken clients at the HTTP level: slow headers, piles of idle
//! connections, oversized bodies, numbers out of range. The service stays up,
//! answers others promptly, and stores nothing from a refused request.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, TestApp, assert_error, json_of, spawn_app};

fn host_port(app: &TestApp) -> String {
    app.address.trim_start_matches("http://").to_owned()
}

/// `/health` answers within a second.
async fn answers_promptly(app: &TestApp) {
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), app.get("/health"))
        .await
        .expect("health answered");
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_a_byte_at_a_time_is_cut_off() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let mut slow = TcpStream::connect(host_port(&app)).await.unwrap();
    let request = b"POST /event HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let started = Instant::now();
    let mut closed_after = None;
    for byte in request.iter().cycle().take(200) {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Meanwhile everyone else is served.
        if started.elapsed().as_millis() % 2000 < 250 {
            answers_promptly(&app).await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let closed_after = match closed_after {
        Some(t) => t,
        None => {
            // Writes may still succeed into the kernel buffer: the server's
            // side shows as EOF (or a reset) on read.
            let mut buf = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
            assert!(
                matches!(read, Ok(Ok(0)) | Ok(Err(_))) || matches!(read, Ok(Ok(n)) if n > 0),
                "the server never closed the slow connection: {read:?}"
            );
            started.elapsed()
        }
    };
    let bound = evtrack::server::HEADER_TIMEOUT + Duration::from_secs(5);
    assert!(
        closed_after <= bound + Duration::from_secs(5),
        "{closed_after:?}"
    );
    answers_promptly(&app).await;
    assert_eq!(app.store.count_all().await.unwrap(), 0);
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_block_others() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let mut idle = Vec::new();
    for _ in 0..1_000 {
        idle.push(TcpStream::connect(host_port(&app)).await.unwrap());
    }
    // Half of them start a request and stop halfway.
    for conn in idle.iter_mut().step_by(2) {
        conn.write_all(b"POST /event HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
    }
    answers_promptly(&app).await;
    let r = app
        .post_event(&json!({"site_id": "idle", "event_type": "page_view"}))
        .await;
    json_of(r, 202).await;
    // The server closes them all: the silent ones after the idle timeout,
    // the half-sent requests after the header timeout.
    tokio::time::sleep(evtrack::server::IDLE_TIMEOUT + Duration::from_secs(2)).await;
    let mut closed = 0;
    for conn in idle.iter_mut() {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(20), conn.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(closed, idle.len(), "idle connections left open");
    answers_promptly(&app).await;
    assert_eq!(app.store.count_all().await.unwrap(), 1);
    app.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_and_numbers_are_refused_and_nothing_is_stored() {
    let app = spawn_app(Backend::EmbeddedSqlite).await;
    let ten_mb = format!(
        r#"[{{"site_id":"big","event_type":"t","path":"{}"}}]"#,
        "x".repeat(10 * 1024 * 1024)
    );
    for path in ["/event", "/events"] {
        let r = app.post_raw(path, "application/json", ten_mb.clone()).await;
        assert_error(&json_of(r, 413).await, "payload_too_large", None);
    }
    for body in [
        r#"{"site_id":"big","event_type":"t","timestamp":1e400}"#,
        r#"{"site_id":"big","event_type":"t","timestamp":123456789012345678901234567890}"#,
        r#"{"site_id":"big","event_type":"t","timestamp":-1e300}"#,
    ] {
        let r = app.post_raw("/event", "application/json", body).await;
        let status = r.status().as_u16();
        assert_eq!(status, 400, "{body}");
    }
    answers_promptly(&app).await;
    assert_eq!(app.store.count_all().await.unwrap(), 0);
    app.app.stop().await;
}
