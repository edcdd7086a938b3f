//! `granary-cache mount --checkpoint`: a checkpoint volume (write-back to local disk,
//! uploaded in the background) in the foreground or with `--daemon`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use granary_fs::checkpoint::{self, CheckpointMount, UploadTuning};
use granary_fs::metrics::CheckpointMetrics;
use granary_store::source::SourceTuning;
use granary_store::units::ByteSize;
use prometheus_client::registry::Registry;

use super::exit::config_error;
use super::mount::MountArgs;
use super::parse_key_value;

/// Flags of checkpoint volumes (with --checkpoint).
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// Mount a read-write checkpoint volume instead of a dataset.
    #[arg(long)]
    pub checkpoint: bool,
    /// Where checkpoints must end up (s3://bucket/prefix, fs:///path).
    #[arg(long, env = "GRANARY_TARGET")]
    pub target: Option<String>,
    /// A target store option, repeatable: endpoint=…, region=…, access_key_id=…
    #[arg(long = "target-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub target_options: Vec<(String, String)>,
    /// Node-local directory for files not yet uploaded and the journal (local NVMe, or a
    /// tmpfs for memory speed). Keep it across restarts: uploads resume from it.
    #[arg(long)]
    pub writeback_dir: Option<PathBuf>,
    /// Size bound of --writeback-dir; writes wait for uploads when it is full.
    #[arg(long)]
    pub writeback_size: Option<ByteSize>,
    /// The file that commits its directory, uploaded after every other file there
    /// (`.metadata` for PyTorch DCP, `_COMPLETE`, …).
    #[arg(long)]
    pub commit_marker: Option<String>,
    /// Committed checkpoints to keep in the target store (0: all); needs --commit-marker.
    #[arg(long, default_value_t = 0)]
    pub keep_last: usize,
    /// Parts uploaded at once, over all files.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub upload_concurrency: u16,
    /// Multipart part size (5MiB–5GiB).
    #[arg(long, default_value = "16MiB")]
    pub part_size: ByteSize,
    /// How long to wait at shutdown for pending uploads (they resume at the next mount anyway).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// The commit coordinator (host:port) of a volume several nodes write: a marker is
    /// uploaded only once every node's files of its directory are in the store.
    #[arg(long, env = "GRANARY_COMMIT_COORDINATOR")]
    pub commit_coordinator: Option<String>,
    /// This node's name among the volume's writers (with --commit-coordinator).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// File holding the coordinator's token (with --commit-coordinator).
    #[arg(long, env = "GRANARY_COMMIT_TOKEN_FILE")]
    pub commit_token_file: Option<PathBuf>,
}

impl CheckpointArgs {
    /// Checkpoint flags on a dataset mount are a mistake worth naming.
    pub fn refuse_without_checkpoint(&self) -> anyhow::Result<()> {
        if self.target.is_some() || self.writeback_dir.is_some() || self.commit_marker.is_some() {
            config_error!("--target, --writeback-dir and --commit-marker are for checkpoint volumes: add --checkpoint");
        }
        if self.commit_coordinator.is_some() {
            config_error!("--commit-coordinator is for checkpoint volumes: add --checkpoint");
        }
        Ok(())
    }
}

pub fn checkpoint_mount(args: &MountArgs) -> anyhow::Result<CheckpointMount> {
    let c = &args.checkpoint;
    if args.source.is_some() || args.workers.is_some() {
        config_error!("a checkpoint volume writes to --target; --source and --workers are for datasets");
    }
    if !args.source_options.is_empty() {
        config_error!("--source-option is for datasets; a checkpoint volume takes its store's options as --target-option KEY=VALUE");
    }
    let Some(target) = c.target.clone() else {
        config_error!("--checkpoint needs --target, e.g. --target s3://bucket/checkpoints/run-1");
    };
    let (Some(dir), Some(size)) = (c.writeback_dir.clone(), c.writeback_size) else {
        config_error!("--checkpoint needs --writeback-dir and --writeback-size, e.g. --writeback-dir /nvme/granary --writeback-size 200GiB");
    };
    if c.keep_last > 0 && c.commit_marker.is_none() {
        config_error!("--keep-last counts committed checkpoints, which --commit-marker defines: add e.g. --commit-marker .metadata");
    }
    if let Some(marker) = &c.commit_marker {
        if marker.is_empty() || marker.contains('/') {
            config_error!("--commit-marker {marker:?} must be a file name, e.g. .metadata");
        }
    }
    if size.0 == 0 {
        config_error!("--writeback-size must be above 0");
    }
    let coordinator = match &c.commit_coordinator {
        None => {
            if c.commit_token_file.is_some() {
                config_error!("--commit-token-file needs --commit-coordinator");
            }
            None
        }
        Some(address) => {
            if c.commit_marker.is_none() {
                config_error!("--commit-coordinator coordinates commits, which --commit-marker defines: add e.g. --commit-marker .metadata");
            }
            let Some(node) = c.node_name.clone().filter(|n| !n.trim().is_empty()) else {
                config_error!("--commit-coordinator needs --node-name (unique among the nodes writing this volume; NODE_NAME from the downward API)");
            };
            let token = c
                .commit_token_file
                .as_deref()
                .map(super::commit_coordinator::read_token)
                .transpose()?;
            Some(checkpoint::CommitCoordination {
                address: address.clone(),
                token,
                node,
            })
        }
    };
    let mut config = CheckpointMount::new(target, dir, size.0);
    config.coordinator = coordinator;
    config.target_options = c.target_options.iter().cloned().collect();
    config.target_tuning = SourceTuning::default();
    config.commit_marker = c.commit_marker.clone();
    config.upload = UploadTuning {
        concurrency: c.upload_concurrency.into(),
        part_size: c.part_size.0,
        keep_last: c.keep_last,
    };
    config.passthrough = !args.fuse.no_passthrough;
    config.threads = args.fuse.threads.into();
    // SAFETY: geteuid only reads the process's credentials.
    config.allow_other = unsafe { libc::geteuid() } == 0;
    Ok(config)
}

pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    let config = checkpoint_mount(&args)?;
    if args.daemon {
        return super::mount::daemonize(&args.mountpoint, args.log_file.as_deref());
    }
    let mut registry = Registry::default();
    let metrics = Arc::new(CheckpointMetrics::register(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    super::mount::serve_metrics(args.metrics_listen, registry, &ready).await?;
    let runtime = tokio::runtime::Handle::current();
    let mountpoint = args.mountpoint.clone();
    let mounted = tokio::task::spawn_blocking(move || checkpoint::mount(&config, &mountpoint, metrics, runtime))
        .await
        .context("the mount task failed")??;
    ready.store(true, std::sync::atomic::Ordering::Release);
    println!("mounted {}", args.mountpoint.display());
    let mut mounted = mounted;
    let signalled = super::shutdown_signal();
    tokio::pin!(signalled);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut signalled => {
                tracing::info!("unmounting; pending uploads continue until done or --drain-timeout");
                mounted
                    .close_mount()
                    .await
                    .with_context(|| format!("cannot unmount {}", args.mountpoint.display()))?;
                break;
            }
            _ = tick.tick() => {
                if !mounted.is_serving() {
                    tracing::info!("the mount went away");
                    break;
                }
            }
        }
    }
    if !mounted.drain(args.checkpoint.drain_timeout).await {
        tracing::warn!(
            pending = mounted.tracker().pending().files,
            "uploads still pending at exit; they resume at the next mount of this --writeback-dir"
        );
    }
    mounted.unmount().await.context("stopping the checkpoint volume")?;
    Ok(())
}
