//! `granary-cache node`: the per-node daemon owning every FUSE mount of its node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use granary_cache::node::{self, NodeConfig, NodeDefaults};
use granary_cache::units::ByteSize;

use super::mount::{check_max_memory, FuseTuning};

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// State directory (a hostPath): mounts live under <state-dir>/mnt/, their record in
    /// <state-dir>/mounts.json, node-local caches under <state-dir>/cache/.
    #[arg(long, default_value = "/var/lib/granary")]
    pub state_dir: PathBuf,
    /// Unix socket to serve the node API on (granary-csi connects here).
    #[arg(long, default_value = "/run/granary/node.sock")]
    pub socket: PathBuf,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Memory bound of all mounts' caches and buffers together.
    #[arg(long, default_value = "2GiB")]
    pub max_memory: ByteSize,
    /// Node-local file cache of each dataset volume, under the state dir; 0 disables it.
    #[arg(long, default_value = "0")]
    pub local_cache_size: ByteSize,
    /// Write-back area of each checkpoint volume (under <state-dir>/writeback/) unless the
    /// volume's `writebackSize` attribute says otherwise.
    #[arg(long, default_value = "50GiB")]
    pub checkpoint_writeback_size: ByteSize,
    #[command(flatten)]
    pub fuse: FuseTuning,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    check_max_memory(args.max_memory)?;
    let running = node::start(NodeConfig {
        state_dir: args.state_dir,
        socket: args.socket,
        metrics_listen: args.metrics_listen,
        max_memory: args.max_memory.0,
        defaults: NodeDefaults {
            local_cache_size: args.local_cache_size.0,
            passthrough: !args.fuse.no_passthrough,
            max_readahead: args.fuse.max_readahead.0,
            threads: args.fuse.threads.into(),
            writeback_size: args.checkpoint_writeback_size.0,
        },
    })
    .await
    .context("the node daemon could not start")?;
    tokio::select! {
        result = running.wait() => result.context("the node API server stopped"),
        _ = super::shutdown_signal() => {
            // Mounts stay recorded; the next start serves them again at the same paths.
            tracing::info!("stopping; recorded mounts are served again by the next start");
            Ok(())
        }
    }
}
