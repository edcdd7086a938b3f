//! The node daemon (`granary-cache node`): one per node, owner of every FUSE mount there.
//! [`mount_table`] mounts volumes (reference counted by publisher) and records them
//! ([`records`]) so a restarted daemon mounts them again at the same paths; [`volume_spec`]
//! turns a PV's attributes into a mount, within what [`host_access`] lets a volume reach of
//! the host; [`service`] serves it all over a unix socket
//! (`granary_node_api` holds the API, its client and the hand-over to the keeper).
//!
//! Not here: the filesystems (granary-fs), the block cache (granary-cache).

pub mod host_access;
pub mod mount_table;
pub mod records;
pub mod service;
pub mod volume_spec;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

pub use host_access::HostAccess;
pub use mount_table::{MountTable, NodeError};
pub use volume_spec::NodeDefaults;

use granary_fs::dataset::MountResources;
use granary_fs::metrics::{CheckpointMetrics, FuseMetrics};
use granary_node_api::proto::node_daemon_server::NodeDaemonServer;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub max_memory: u64,
    pub defaults: NodeDefaults,
    /// The keeper (granary-csi) holding the mounts' FUSE descriptors across restarts of this
    /// daemon; `None` keeps none, and a restart breaks the mounts pods use.
    pub fd_keeper: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("cannot use the state directory {path:?}: {source}; it must be a writable local directory (a hostPath)")]
    StateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {path:?}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: std::io::Error },
}

pub struct RunningNode {
    pub table: Arc<MountTable>,
    pub restored: usize,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// Waits until the server stops.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await??;
        Ok(())
    }
}

/// Starts the daemon: mounts what the state directory records, then serves the socket.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeStartError> {
    let state_err = |source| NodeStartError::StateDir {
        path: config.state_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.state_dir).map_err(state_err)?;
    let mut registry = Registry::default();
    let metrics = Arc::new(FuseMetrics::register(&mut registry));
    let checkpoint_metrics = Arc::new(CheckpointMetrics::register(&mut registry));
    let resources = MountResources::new(config.max_memory, metrics);
    let (handover, handed) = match &config.fd_keeper {
        Some(socket) => {
            let handed = tokio::task::spawn_blocking({
                let socket = socket.clone();
                move || granary_node_api::handover::fetch(&socket)
            })
            .await
            .map_err(|e| state_err(std::io::Error::other(e)))?
            .unwrap_or_else(|e| {
                tracing::warn!(socket = %socket.display(), error = %e, "cannot fetch the mounts' descriptors from the keeper; mounting afresh");
                Vec::new()
            });
            if !handed.is_empty() {
                tracing::info!(
                    mounts = handed.len(),
                    "the keeper kept mounts of the previous daemon; taking them over"
                );
            }
            let link =
                granary_node_api::handover::HandoverLink::start(socket).map_err(|source| NodeStartError::Socket {
                    path: socket.clone(),
                    source,
                })?;
            (Some(link), handed)
        }
        None => (None, Vec::new()),
    };
    let table = Arc::new(
        MountTable::new(
            &config.state_dir,
            resources,
            checkpoint_metrics,
            config.defaults.clone(),
            tokio::runtime::Handle::current(),
            handover,
            handed,
        )
        .map_err(state_err)?,
    );
    let restored = table.restore().await.map_err(state_err)?;
    if restored > 0 {
        tracing::info!(restored, "mounted the recorded volumes again");
    }
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_listen {
        granary_process::metrics_http::serve(addr, Arc::new(registry), Arc::clone(&ready), std::future::pending())
            .await
            .map_err(|source| NodeStartError::Metrics { addr, source })?;
    }
    let socket_err = |source| NodeStartError::Socket {
        path: config.socket.clone(),
        source,
    };
    if let Some(dir) = config.socket.parent() {
        std::fs::create_dir_all(dir).map_err(socket_err)?;
    }
    // A socket file left by a previous run would refuse the bind.
    let _ = std::fs::remove_file(&config.socket);
    let listener = UnixListener::bind(&config.socket).map_err(socket_err)?;
    let service = service::NodeService {
        table: Arc::clone(&table),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeDaemonServer::new(service))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    ready.store(true, Ordering::Release);
    tracing::info!(socket = %config.socket.display(), state_dir = %config.state_dir.display(), "node daemon serving");
    Ok(RunningNode {
        table,
        restored,
        server,
    })
}
