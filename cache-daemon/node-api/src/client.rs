//! A gRPC client of the node daemon over its unix socket (used by granary-csi and tests).

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

use crate::proto::node_daemon_client::NodeDaemonClient;

/// Connects to the node daemon at `socket` (a path, or `unix://` + path). The connection is
/// made on first use and remade after the daemon restarts.
pub fn connect(socket: &Path) -> Result<NodeDaemonClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = socket
        .to_str()
        .and_then(|s| s.strip_prefix("unix://"))
        .map(PathBuf::from)
        .unwrap_or_else(|| socket.to_path_buf());
    // The URI is required by the API but unused: the connector dials the socket.
    let channel =
        Endpoint::from_static("http://node.granary.local").connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }));
    Ok(NodeDaemonClient::new(channel))
}
