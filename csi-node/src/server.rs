//! Serves the Identity and Node services on the CSI endpoint (a unix socket), and the fd
//! keeper that holds the node daemon's mounts while it restarts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use granary_node_api::handover::Keeper;
use prometheus_client::registry::Registry;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::daemon::NodeDaemon;
use crate::identity::IdentityService;
use crate::metrics::CsiMetrics;
use crate::node::NodeService;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;
use crate::volume_context::VolumeTrust;

#[derive(Debug, Clone)]
pub struct CsiConfig {
    /// The CSI endpoint: `unix:///csi/csi.sock` or a path.
    pub endpoint: PathBuf,
    pub node_id: String,
    /// The node daemon's socket.
    pub node_daemon: PathBuf,
    /// Where to hold the node daemon's FUSE descriptors; `None` holds none.
    pub fd_keeper: Option<PathBuf>,
    /// Where to serve /metrics and /healthz; `None` serves none.
    pub metrics_listen: Option<SocketAddr>,
    /// Which volumes' attributes are taken as the operator's.
    pub trust: VolumeTrust,
}

#[derive(Debug, thiserror::Error)]
pub enum CsiStartError {
    #[error("the CSI endpoint {0:?} is not a unix socket; give unix:///path/to/csi.sock or a path")]
    Endpoint(String),
    #[error("--node-id is empty; pass the node's name (e.g. --node-id \"$NODE_NAME\" from the downward API)")]
    NodeId,
    #[error("cannot listen on {path:?}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("cannot serve the fd keeper on {path:?}: {source}")]
    Keeper { path: PathBuf, source: std::io::Error },
    #[error("cannot serve metrics on {addr}: {source}; choose a free --metrics-listen address")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("bad node daemon address {path:?}: {source}")]
    Daemon {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// `unix:///csi/csi.sock` → `/csi/csi.sock`; a bare path stays as it is.
pub fn socket_path(endpoint: &Path) -> Result<PathBuf, CsiStartError> {
    let text = endpoint.to_string_lossy();
    if let Some(path) = text.strip_prefix("unix://") {
        if path.starts_with('/') {
            return Ok(PathBuf::from(path));
        }
        return Err(CsiStartError::Endpoint(text.into_owned()));
    }
    if text.contains("://") || text.is_empty() {
        return Err(CsiStartError::Endpoint(text.into_owned()));
    }
    Ok(endpoint.to_path_buf())
}

pub struct RunningCsi {
    pub socket: PathBuf,
    pub keeper: Option<Keeper>,
    /// The bound metrics address, when metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCsi {
    pub async fn wait(self) -> anyhow::Result<()> {
        self.server.await??;
        Ok(())
    }
}

/// Starts serving; fails fast on a bad configuration.
pub async fn start(config: CsiConfig) -> Result<RunningCsi, CsiStartError> {
    if config.node_id.trim().is_empty() {
        return Err(CsiStartError::NodeId);
    }
    let socket = socket_path(&config.endpoint)?;
    let daemon = NodeDaemon::new(&config.node_daemon).map_err(|source| CsiStartError::Daemon {
        path: config.node_daemon.clone(),
        source,
    })?;
    // The keeper first: a node daemon starting now fetches its descriptors from it.
    let keeper = match &config.fd_keeper {
        Some(path) => Some(Keeper::serve(path).map_err(|source| CsiStartError::Keeper {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let listen_err = |source| CsiStartError::Listen {
        path: socket.clone(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    // A socket left by a previous run would refuse the bind.
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(listen_err)?;
    let mut registry = Registry::default();
    let metrics = Arc::new(CsiMetrics::register(&mut registry));
    let metrics_addr = match config.metrics_listen {
        Some(addr) => Some(
            granary_process::metrics_http::serve(
                addr,
                Arc::new(registry),
                Arc::new(AtomicBool::new(true)),
                std::future::pending(),
            )
            .await
            .map_err(|source| CsiStartError::Metrics { addr, source })?
            .0,
        ),
        None => None,
    };
    let identity = IdentityService { daemon: daemon.clone() };
    let node = NodeService::new(config.node_id.clone(), daemon, config.trust.clone(), metrics);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(IdentityServer::new(identity))
            .add_service(NodeServer::new(node))
            .serve_with_incoming(UnixListenerStream::new(listener)),
    );
    tracing::info!(endpoint = %socket.display(), node_id = %config.node_id, node_daemon = %config.node_daemon.display(), "granary-csi serving");
    Ok(RunningCsi {
        socket,
        keeper,
        metrics_addr,
        server,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_unix_sockets() {
        assert_eq!(
            socket_path(Path::new("unix:///csi/csi.sock")).unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path(Path::new("/csi/csi.sock")).unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        for bad in ["tcp://0.0.0.0:10000", "unix://relative.sock", ""] {
            assert!(socket_path(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
