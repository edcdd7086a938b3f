//! The metrics endpoint every component serves: `/metrics` (Prometheus text), `/healthz`
//! (the process runs) and `/readyz` (it can serve).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone)]
struct Endpoint {
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
}

async fn metrics(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &endpoint.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("encoding metrics failed: {e}"),
        ),
    }
}

async fn ready(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    if endpoint.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds the metrics endpoint and serves it until `shutdown` resolves. Returns the bound
/// address (useful with port 0).
pub async fn serve(
    listen: SocketAddr,
    registry: Arc<Registry>,
    ready_flag: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoint {
            registry,
            ready: ready_flag,
        });
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    Ok((addr, handle))
}
