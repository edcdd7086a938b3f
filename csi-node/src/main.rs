//! `granary-csi`: the CSI node plugin binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use granary_csi::volume_context::VolumeTrust;
use granary_csi::CsiConfig;
use granary_node_api::volume_mark::VolumeKey;
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
    /// The operator's volume key (the release's volume-key Secret, mounted): only volumes
    /// whose attributes carry its mark are served, so nobody but the operator decides what
    /// the node daemon mounts, with which store options and host directories.
    #[arg(
        long,
        env = "GRANARY_VOLUME_KEY_FILE",
        required_unless_present = "accept_unmarked_volumes"
    )]
    volume_key_file: Option<PathBuf>,
    /// Serve every persistent volume of driver granary.dev, marked or not: only where
    /// nobody but cluster administrators can create PersistentVolumes (inline volumes are
    /// refused regardless).
    #[arg(long, conflicts_with = "volume_key_file")]
    accept_unmarked_volumes: bool,
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
    let trust = match &args.volume_key_file {
        Some(path) => VolumeTrust::Marked(Arc::new(VolumeKey::load(path)?)),
        None => {
            tracing::warn!("--accept-unmarked-volumes: every granary.dev PersistentVolume is served, marked or not; whoever can create PVs can direct the node daemon");
            VolumeTrust::AnyPersistentVolume
        }
    };
    let running = granary_csi::start(CsiConfig {
        endpoint: args.endpoint,
        node_id: args.node_id,
        node_daemon: args.node_daemon,
        fd_keeper,
        metrics_listen: args.metrics_listen,
        trust,
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
