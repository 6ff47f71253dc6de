//! The ceiling references: the least an ingest endpoint can do.
//!
//! `POST /event` reads the body, parses it into a `serde_json::Value` (no
//! validation, no typed struct) and answers 202 `{"success":true}`. With a
//! Redis URL it first XADDs the body (field `e`) to a stream over one
//! multiplexed connection, as a queueing API must. Same runtime (tokio,
//! multi-thread) and HTTP stack (axum/hyper) as evtrack, so the difference
//! measured is the service's own work.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use redis::aio::MultiplexedConnection;

#[derive(Clone)]
struct Ceiling {
    redis: Option<(MultiplexedConnection, String)>,
}

const ACCEPTED: &str = r#"{"success":true}"#;

pub async fn serve(
    port: u16,
    redis_url: Option<String>,
    stream: Option<String>,
) -> anyhow::Result<()> {
    let redis = match redis_url {
        None => None,
        Some(url) => {
            let client = redis::Client::open(url.as_str()).context("redis url")?;
            let conn = client
                .get_multiplexed_async_connection()
                .await
                .context("cannot connect to redis")?;
            Some((
                conn,
                stream.context("--stream is required with --redis-url")?,
            ))
        }
    };
    let app = Router::new()
        .route("/event", post(event))
        .route("/health", get(|| async { "ok" }))
        .with_state(Ceiling { redis });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind {addr}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("server")?;
    Ok(())
}

async fn event(State(state): State<Ceiling>, body: Bytes) -> Response {
    if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return (StatusCode::BAD_REQUEST, r#"{"success":false}"#).into_response();
    }
    if let Some((conn, stream)) = &state.redis {
        let mut conn = conn.clone();
        let added: redis::RedisResult<String> = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("e")
            .arg(&body[..])
            .query_async(&mut conn)
            .await;
        if added.is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, r#"{"success":false}"#).into_response();
        }
    }
    (
        StatusCode::ACCEPTED,
        [(header::CONTENT_TYPE, "application/json")],
        ACCEPTED,
    )
        .into_response()
}
