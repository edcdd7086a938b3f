//! The coordinator's gRPC service over its journaled registry, with a bearer token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::journal::Journal;
use crate::metrics::{CoordinatorMetrics, DecisionLabel, NodeLabel};
use crate::proto::commit_coordinator_server::{CommitCoordinator, CommitCoordinatorServer};
use crate::proto::*;
use crate::registry::{Record, Registry};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the coordinator's journal in {dir:?}: {source}; give a writable --state-dir (a PVC in a cluster: losing it could commit an incomplete checkpoint)")]
    Journal { dir: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

pub struct CoordinatorService {
    state: Mutex<(Registry, Journal)>,
    /// This process's start (see ReportResponse.incarnation).
    incarnation: u64,
    started: Instant,
    /// How long after its start no commit is allowed: every live node reports within its
    /// heartbeat, sees the new incarnation and sends its whole set (a journal that missed a
    /// registration, or was lost, is made whole by then).
    resync_grace: std::time::Duration,
    token: Option<String>,
    metrics: Arc<CoordinatorMetrics>,
}

/// Compares without an early exit, so a wrong token's timing says nothing of the right one.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl CoordinatorService {
    /// Replays the journal in `state_dir`; with `token`, every request must carry it.
    pub fn open(
        state_dir: &std::path::Path,
        token: Option<String>,
        resync_grace: std::time::Duration,
        metrics: Arc<CoordinatorMetrics>,
    ) -> Result<Self, ServeError> {
        let (journal, registry) = Journal::open(state_dir, Instant::now()).map_err(|source| ServeError::Journal {
            dir: state_dir.to_path_buf(),
            source,
        })?;
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            .max(1);
        let service = CoordinatorService {
            state: Mutex::new((registry, journal)),
            incarnation,
            started: Instant::now(),
            resync_grace,
            token,
            metrics,
        };
        service.publish_gauges();
        Ok(service)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            Ok(())
        } else {
            self.metrics.unauthenticated.inc();
            Err(Status::unauthenticated(
                "the commit coordinator needs the volume's token (`authorization: Bearer …`); the node daemon gets it from granary-csi",
            ))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Registry, Journal)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauges(&self) {
        let guard = self.lock();
        for volume in guard.0.status(Instant::now()) {
            for node in volume.nodes {
                self.metrics
                    .pending_paths
                    .get_or_create(&NodeLabel {
                        volume: volume.volume.clone(),
                        node: node.node,
                    })
                    .set(node.pending as i64);
            }
        }
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("`{field}` is empty")));
    }
    Ok(())
}

#[tonic::async_trait]
impl CommitCoordinator for CoordinatorService {
    async fn report(&self, request: Request<ReportRequest>) -> Result<Response<ReportResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        required("volume", &r.volume)?;
        required("node", &r.node)?;
        self.metrics.reports.inc();
        let label = NodeLabel {
            volume: r.volume.clone(),
            node: r.node.clone(),
        };
        let now = Instant::now();
        let mut guard = self.lock();
        let (registry, journal) = &mut *guard;
        registry.seen(&r.volume, &r.node, &r.upload_refusal, now);
        let pending = if r.pending.is_empty() && r.settled.is_empty() && !r.replace {
            // A heartbeat: nothing to make durable.
            registry.pending_of(&r.volume, &r.node)
        } else {
            let record = Record::Report {
                volume: r.volume,
                node: r.node,
                pending: r.pending,
                settled: r.settled,
                replace: r.replace,
            };
            let pending = registry.apply(&record, now);
            journal.append(&record, registry).map_err(|e| {
                tracing::error!(error = %e, "cannot write the commit journal");
                Status::unavailable(format!("the coordinator cannot write its journal: {e}"))
            })?;
            pending
        };
        drop(guard);
        self.metrics.pending_paths.get_or_create(&label).set(pending as i64);
        Ok(Response::new(ReportResponse {
            pending,
            incarnation: self.incarnation,
        }))
    }

    async fn may_commit(&self, request: Request<MayCommitRequest>) -> Result<Response<MayCommitResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        required("volume", &r.volume)?;
        let blockers = self
            .lock()
            .0
            .may_commit(&r.volume, &r.node, &r.dir, &r.marker, Instant::now());
        let since_start = self.started.elapsed();
        let reason = if blockers.is_empty() && since_start < self.resync_grace {
            format!(
                "the coordinator started {}s ago and waits {}s for every node to report its unsettled files",
                since_start.as_secs(),
                self.resync_grace.as_secs()
            )
        } else {
            String::new()
        };
        let ready = blockers.is_empty() && reason.is_empty();
        self.metrics
            .decisions
            .get_or_create(&DecisionLabel {
                decision: if ready { "ready" } else { "waiting" }.into(),
            })
            .inc();
        if ready {
            tracing::info!(
                volume = r.volume,
                dir = r.dir,
                node = r.node,
                "every node has settled the checkpoint: it may be committed"
            );
        } else {
            tracing::debug!(volume = r.volume, dir = r.dir, blockers = ?blockers, "the checkpoint waits for other nodes");
        }
        Ok(Response::new(MayCommitResponse {
            ready,
            blockers,
            reason,
        }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.authorize(&request)?;
        let volumes = self.lock().0.status(Instant::now());
        Ok(Response::new(StatusResponse { volumes }))
    }

    async fn forget_node(&self, request: Request<ForgetNodeRequest>) -> Result<Response<ForgetNodeResponse>, Status> {
        self.authorize(&request)?;
        let r = request.into_inner();
        required("volume", &r.volume)?;
        required("node", &r.node)?;
        let mut guard = self.lock();
        let (registry, journal) = &mut *guard;
        let forgotten = registry.pending_of(&r.volume, &r.node);
        let record = Record::Forget {
            volume: r.volume.clone(),
            node: r.node.clone(),
        };
        registry.apply(&record, Instant::now());
        journal
            .append(&record, registry)
            .map_err(|e| Status::unavailable(format!("the coordinator cannot write its journal: {e}")))?;
        drop(guard);
        self.metrics
            .pending_paths
            .get_or_create(&NodeLabel {
                volume: r.volume.clone(),
                node: r.node.clone(),
            })
            .set(0);
        tracing::warn!(
            volume = r.volume,
            node = r.node,
            forgotten,
            "forgot a node's unsettled paths"
        );
        Ok(Response::new(ForgetNodeResponse { forgotten }))
    }
}

/// Serves `service` on `listen` until `shutdown` resolves; returns the bound address and the
/// server's task.
pub async fn serve(
    listen: SocketAddr,
    service: CoordinatorService,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>), ServeError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Listen { addr: listen, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServeError::Listen { addr: listen, source })?;
    // Accepted connections get TCP_NODELAY: a report is a small request a create() waits on.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(CommitCoordinatorServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown);
    Ok((addr, tokio::spawn(server)))
}
