//! The connection loop: HTTP/1.1 over hyper with a read buffer large enough that an
//! oversized header section reaches the router, which answers it with a 431 problem,
//! instead of hyper refusing it with a bare 431 and no body; graceful shutdown as
//! `axum::serve` does it (stop accepting, let every connection finish).

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::problem::Problem;

/// The most a request's header fields may take, names and values counted, in bytes.
/// Past it: 431 `headers-too-large`. A tally request needs well under 2 KiB (a token is
/// at most `limits.auth_header_bytes_max`); 64 KiB is Envoy's default, in round figures.
pub const HEADER_BYTES_MAX: usize = 64 * 1024;

/// hyper's read buffer per connection, the longest request head it reads before it
/// answers a bare 431 itself. Far above [`HEADER_BYTES_MAX`] so that heads a client may
/// really send (1 MiB of header, say) get the problem answer from the router; the cost
/// is up to this much memory for a connection while such a head is read.
pub const HEADER_READ_BYTES_MAX: usize = 2 * 1024 * 1024;

const _: () = assert!(HEADER_READ_BYTES_MAX >= 16 * HEADER_BYTES_MAX);

/// How long to wait after an accept error that is not about one connection (out of file
/// descriptors, say) before accepting again, as `axum::serve` does.
const ACCEPT_ERROR_PAUSE_MS: u64 = 1_000;

/// Middleware: 431 problem for a request whose header fields exceed [`HEADER_BYTES_MAX`].
pub async fn limit_header_bytes(req: Request, next: Next) -> Response {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > HEADER_BYTES_MAX {
        return Problem::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers-too-large",
            "Request header fields too large",
            format!(
                "the request's header fields take {header_bytes} bytes; at most \
                 {HEADER_BYTES_MAX} are accepted"
            ),
        )
        .field("header_bytes_max", HEADER_BYTES_MAX)
        .into_response();
    }
    next.run(req).await
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and
/// returns once every open connection has finished its in-flight request.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // Dropping the receiver tells every connection to shut down gracefully.
    let (signal_tx, signal_rx) = watch::channel(());
    tokio::spawn(async move {
        shutdown.await;
        drop(signal_rx);
    });
    // Each connection task holds a receiver; the sender's `closed` waits for all of them.
    let (close_tx, close_rx) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    pause_after_accept_error(e).await;
                    continue;
                }
            },
            _ = signal_tx.closed() => break,
        };
        // A streamed answer goes out as a head and then body frames; with Nagle on, each
        // small write after the first waits for the client's delayed ACK (~40 ms).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        // The peer's address, for handlers that pass it on (the proxy's X-Forwarded-For).
        let service = TowerToHyperService::new(tower::util::MapRequest::new(
            app.clone(),
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                req
            },
        ));
        let signal_tx = signal_tx.clone();
        let close_rx = close_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.max_buf_size(HEADER_READ_BYTES_MAX);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(stream), service));
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = signal_tx.closed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(close_rx);
        });
    }
    drop(close_rx);
    drop(listener);
    close_tx.closed().await;
    Ok(())
}

/// Errors about one connection are skipped at once; others (out of file descriptors)
/// would fail again immediately, so they are logged and the loop pauses.
async fn pause_after_accept_error(e: io::Error) {
    use io::ErrorKind as K;
    if matches!(
        e.kind(),
        K::ConnectionRefused | K::ConnectionAborted | K::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_PAUSE_MS)).await;
}
