//! A no-op server for the wrk comparison (`tally noop-server`): the same tokio runtime,
//! axum and connection loop (`serve::serve`) as `tally serve`, and a handler on the debit
//! route that does nothing but answer 201 with a small JSON body.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

async fn noop() -> (StatusCode, Json<Value>) {
    (StatusCode::CREATED, Json(json!({"ok": true})))
}

/// Binds `listen` and serves the no-op router until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    on_bound(listener.local_addr()?);
    let app = Router::new().route("/v1/agents/{id}/debits", post(noop));
    crate::serve::serve(listener, app, shutdown).await?;
    Ok(())
}
