//! HTTPS serving of `POST /mutate` and `POST /validate` (AdmissionReview v1) with rustls; the
//! certificate is resolved per handshake, so a renewed one is served without a restart.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use kube::api::DynamicObject;
use kube::core::admission::AdmissionReview;
use kube::Client;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::review::Reviewer;
use super::trainjob::TrainJobSchema;
use crate::metrics::OperatorMetrics;

async fn review(
    State(reviewer): State<Arc<Reviewer>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<serde_json::Value> {
    let answer = super::review::answer(review, &reviewer).await;
    Json(super::review::to_wire(&answer))
}

/// `/mutate` (the MutatingWebhookConfiguration: mounts) and `/validate` (the
/// ValidatingWebhookConfiguration: Datasets and CheckpointPolicies) answer from one decision;
/// a granary.dev object never gets a patch, so the validating answer never carries one.
/// `inline_volumes`: pods may name a Dataset or CheckpointPolicy in an inline csi volume
/// (turned into its PVC); otherwise such a pod is denied. `loader_image`: the image of the
/// init containers that load Datasets onto nodes (the operator's own).
pub fn router(client: Client, metrics: Arc<OperatorMetrics>, inline_volumes: bool, loader_image: String) -> Router {
    let reviewer = Arc::new(Reviewer {
        client,
        metrics,
        trainjobs: TrainJobSchema::default(),
        inline_volumes,
        loader_image,
    });
    Router::new()
        .route("/mutate", post(review))
        .route("/validate", post(review))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(reviewer)
}

/// A bound webhook listener; `serve` runs until the process ends.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: Router,
}

impl WebhookServer {
    pub async fn bind(addr: SocketAddr, tls: Arc<rustls::ServerConfig>, router: Router) -> std::io::Result<Self> {
        Ok(WebhookServer {
            listener: TcpListener::bind(addr).await?,
            acceptor: TlsAcceptor::from(tls),
            router,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self) {
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let acceptor = self.acceptor.clone();
            let service = TowerToHyperService::new(self.router.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                };
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "webhook connection ended");
                }
            });
        }
    }
}
