//! `granary-cache node`: the per-node daemon owning every FUSE mount of its node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use granary_node::{HostAccess, NodeConfig, NodeDefaults};
use granary_store::units::ByteSize;

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
    /// A host directory under which checkpoint volumes may put their write-back area
    /// (their `writebackDir`, from a CheckpointPolicy's localCache.hostPath). Repeatable;
    /// paths are compared after resolving `..` and symlinks. The state directory's own
    /// writeback/ is always allowed.
    #[arg(long = "writeback-root", value_name = "DIR", default_value = "/dev/shm/granary")]
    pub writeback_roots: Vec<PathBuf>,
    /// A host directory under which volumes may name `fs://` sources and targets.
    /// Repeatable; none by default, so no volume reads or writes the node's files.
    #[arg(long = "fs-store-root", value_name = "DIR")]
    pub fs_store_roots: Vec<PathBuf>,
    /// Let volumes use `credentials=auto`: the node's own instance or workload identity,
    /// with whatever buckets it reaches. Off by default: volumes bring keys in their Secret.
    #[arg(long)]
    pub allow_auto_credentials: bool,
    /// Socket of the fd keeper (served by granary-csi) that holds this daemon's FUSE
    /// descriptors, so a restart of this daemon never breaks a pod's mount; defaults to
    /// fd-keeper.sock next to --socket.
    #[arg(long)]
    pub fd_keeper: Option<PathBuf>,
    /// Hand no descriptors to a keeper: a restart then breaks the mounts pods use.
    #[arg(long, conflicts_with = "fd_keeper")]
    pub no_fd_keeper: bool,
    /// This node's name (the Kubernetes node name, from the downward API): checkpoint
    /// volumes written by several nodes report to their commit coordinator as it.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    #[command(flatten)]
    pub fuse: FuseTuning,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    check_max_memory(args.max_memory)?;
    let fd_keeper = match (args.no_fd_keeper, &args.fd_keeper) {
        (true, _) => None,
        (false, Some(path)) => Some(path.clone()),
        (false, None) => Some(granary_node_api::handover::default_keeper_socket(&args.socket)),
    };
    let running = granary_node::start(NodeConfig {
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
            access: HostAccess {
                writeback_roots: args.writeback_roots,
                fs_store_roots: args.fs_store_roots,
                allow_auto_credentials: args.allow_auto_credentials,
            },
            node_name: args.node_name.clone().filter(|n| !n.trim().is_empty()),
        },
        fd_keeper,
    })
    .await
    .context("the node daemon could not start")?;
    tokio::select! {
        result = running.wait() => result.context("the node API server stopped"),
        _ = super::shutdown_signal() => {
            // Mounts stay recorded, and the keeper holds their descriptors: the next start
            // serves the same kernel mounts. Exit without the destructors, which would
            // unmount them.
            tracing::info!("stopping; the next start takes the mounts over");
            std::process::exit(0)
        }
    }
}
