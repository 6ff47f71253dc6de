//! The HTTP server loop: hyper's connection builder with the limits that
//! `axum::serve` does not set.
//!
//! - **Header timeout**: a client has [`HEADER_TIMEOUT`] to send a request's
//!   headers, or the connection is closed — a slow client sending a byte at a
//!   time (slowloris) cannot hold a connection. (Bodies have
//!   their own limit in the ingest handlers.)
//! - **Idle timeout**: a connection silent in both directions for
//!   [`IDLE_TIMEOUT`] while none of its requests is being answered is
//!   closed, including one that never sent a byte.
//! - **Connection cap**: at most [`MAX_CONNECTIONS`] open at once; beyond it a
//!   new connection is closed at once instead of taking memory and a task.
//! - **HTTP/1 only**: cleartext HTTP/2 is refused (see [`serve`]), so the
//!   limits above are the only ones a client meets.
//! - **Graceful shutdown**: on `stop`, the listener closes, idle connections
//!   close, and requests in flight are finished.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Time to send a request's headers, counted from their first byte.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 10_000;

pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    // HTTP/1 only. Behind TLS a reverse proxy speaks HTTP/2 to browsers and
    // HTTP/1.1 to evtrack; browsers never send cleartext HTTP/2. Accepting
    // h2c (prior knowledge) would need its own header and idle limits (a
    // stream's headers can trickle in over a connection kept busy by pings),
    // so it is refused: such a connection is answered as HTTP/1 and closed.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than
                    // spin, and keep serving the connections already open.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let busy = Arc::new(AtomicUsize::new(0));
        let io = IdleTimeout::new(stream, Arc::clone(&busy));
        let app = app.clone();
        // Handlers find the peer's address as axum's `ConnectInfo`, as with
        // `into_make_service_with_connect_info`; `busy` counts the requests
        // being answered, during which the connection is not idle.
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                let handling = Busy::start(&busy);
                let answer = app.clone().oneshot(request);
                async move {
                    let response = answer.await;
                    drop(handling);
                    response
                }
            },
        ));
        let conn = builder.serve_connection(TokioIo::new(io), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout, bad request
            // line): hyper has answered what could be answered.
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection on which nothing was read or written for this long, and no
/// request is being answered, is closed: a client that connects and stays
/// silent, or keeps a keep-alive connection open without using it, gives its
/// slot back. A slow answer (stats over a large MongoDB collection) is not
/// idleness: the clock restarts while a request is in a handler.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Marks one request of a connection as being answered, until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn start(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream whose reads fail with `TimedOut` once neither a read nor a write
/// has made progress for [`IDLE_TIMEOUT`] while no request is being answered
/// (`busy` is 0). hyper's header timeout starts only with a request's first
/// byte, so it does not cover silent connections.
struct IdleTimeout<T> {
    inner: T,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    busy: Arc<AtomicUsize>,
}

impl<T> IdleTimeout<T> {
    fn new(inner: T, busy: Arc<AtomicUsize>) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            busy,
        }
    }

    fn touch(&mut self) {
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for IdleTimeout<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                match self.deadline.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    // Answering a request: wait another period (the loop
                    // polls the new deadline, so its wake-up is registered).
                    Poll::Ready(()) if self.busy.load(Ordering::Relaxed) > 0 => self.touch(),
                    Poll::Ready(()) => {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "connection idle",
                        )));
                    }
                }
            },
        }
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(_))) {
            self.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_unless_a_request_is_being_answered() {
        let (client, server) = tokio::io::duplex(64);
        let busy = Arc::new(AtomicUsize::new(0));
        let mut conn = IdleTimeout::new(server, Arc::clone(&busy));
        let mut buf = [0u8; 8];

        // A request in a handler for three idle periods: no timeout.
        let handling = Busy::start(&busy);
        let read = tokio::time::timeout(IDLE_TIMEOUT * 3, conn.read(&mut buf)).await;
        assert!(read.is_err(), "the read must still be waiting: {read:?}");
        drop(handling);

        // Traffic restarts the clock.
        let mut client = client;
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(conn.read(&mut buf).await.unwrap(), 1);

        // Then nothing, and no request: closed after one idle period.
        let started = tokio::time::Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
    }
}
