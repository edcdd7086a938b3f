//! `granary-csi`: the CSI node plugin binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use granary_csi::CsiConfig;
use granary_process::logging::LogArgs;

/// Granary's CSI node plugin (driver granary.dev): publishes dataset and checkpoint volumes
/// into pods by bind-mounting the node daemon's shared FUSE mounts, and holds the daemon's
/// FUSE descriptors so its restarts never break a pod's mount.
#[derive(Debug, Parser)]
#[command(name = "granary-csi", version)]
struct Args {
    /// The CSI endpoint the kubelet (via node-driver-registrar) calls.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: PathBuf,
    /// This node's name, as Kubernetes knows it (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_id: String,
    /// The node daemon's socket (`granary-cache node --socket`).
    #[arg(long, default_value = "unix:///run/granary/node.sock")]
    node_daemon: PathBuf,
    /// Socket on which to hold the node daemon's FUSE descriptors across its restarts;
    /// defaults to fd-keeper.sock next to the node daemon's socket (where it looks).
    #[arg(long)]
    fd_keeper: Option<PathBuf>,
    /// Hold no descriptors: a node daemon restart then breaks the pods' mounts.
    #[arg(long, conflicts_with = "fd_keeper")]
    no_fd_keeper: bool,
    /// Serve Prometheus metrics and /healthz here, e.g. 0.0.0.0:9466.
    #[arg(long, env = "GRANARY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    logging: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    granary_store::tls::install();
    let args = Args::parse();
    args.logging.init()?;
    let fd_keeper = if args.no_fd_keeper {
        None
    } else {
        Some(
            args.fd_keeper
                .clone()
                .unwrap_or_else(|| granary_node_api::handover::default_keeper_socket(&args.node_daemon)),
        )
    };
    let running = granary_csi::start(CsiConfig {
        endpoint: args.endpoint,
        node_id: args.node_id,
        node_daemon: args.node_daemon,
        fd_keeper,
        metrics_listen: args.metrics_listen,
    })
    .await
    .context("granary-csi could not start")?;
    tokio::select! {
        result = running.wait() => result.context("the CSI server stopped"),
        _ = granary_process::shutdown::shutdown_signal() => {
            // Bind mounts belong to the kernel and the pods; nothing to undo.
            tracing::info!("stopping; published volumes stay mounted");
            Ok(())
        }
    }
}
