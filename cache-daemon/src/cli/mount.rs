//! `granary-cache mount`: one dataset as a read-only directory, in the foreground (or
//! `--daemon`), for use outside Kubernetes; the node daemon serves the same filesystem.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::exit::config_error;
use clap::Args;
use granary_cache::client::parse_worker_list;
use granary_fs::dataset::{self, DatasetMount, MountResources, Ownership};
use granary_fs::metrics::FuseMetrics;
use granary_store::source::SourceTuning;
use granary_store::units::{ByteSize, MetadataTtl};
use prometheus_client::registry::Registry;

use super::parse_key_value;

/// How a dataset is read: shared by `mount` and the node daemon's defaults.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Directory to mount on; it must exist.
    pub mountpoint: PathBuf,
    /// Worker addresses, comma-separated (host-0:7070,host-1:7070). Workers started with a
    /// member set answer with it, and the mount follows it (see --members-refresh), so one
    /// worker will do; otherwise all clients of a dataset must list the same workers. Without
    /// workers, reads go to --source directly.
    #[arg(long, env = "GRANARY_WORKERS", value_name = "HOST:PORT,...")]
    pub workers: Option<String>,
    /// Cache each block on this many workers, and spread reads over them.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// How often to ask the workers for their member set again (0s: only at mount).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub members_refresh: std::time::Duration,
    /// The source store (s3://bucket/prefix, fs:///path): read directly when the workers are
    /// unreachable, so readers see no error.
    #[arg(long, env = "GRANARY_SOURCE")]
    pub source: Option<String>,
    /// A source store option, repeatable: endpoint=…, region=…, access_key_id=…
    #[arg(long = "source-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub source_options: Vec<(String, String)>,
    /// How long metadata (attributes, listings, "no such file") is cached, here and in the
    /// kernel: 60s, 5m, 0s, or never (immutable snapshots).
    #[arg(long, default_value = "60s")]
    pub metadata_ttl: MetadataTtl,
    /// Node-local file cache directory (local NVMe); files complete in it are read by the
    /// kernel directly (passthrough).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Size bound of --cache-dir.
    #[arg(long)]
    pub cache_size: Option<ByteSize>,
    /// The cache directory of a worker on this node, read directly (short circuit); repeatable.
    #[arg(long = "short-circuit-dir", value_name = "DIR")]
    pub short_circuit: Vec<PathBuf>,
    /// Memory bound of this process's caches and buffers: blocks in flight, readahead,
    /// cached blocks and metadata. Readers wait rather than the process exceeding it.
    #[arg(long, default_value = "1GiB")]
    pub max_memory: ByteSize,
    #[command(flatten)]
    pub fuse: FuseTuning,
    #[command(flatten)]
    pub checkpoint: super::checkpoint_mount::CheckpointArgs,
    /// Owner shown for every file (default: the user running the mount).
    #[arg(long)]
    pub uid: Option<u32>,
    /// Group shown for every file (default: the group running the mount).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Block size of files read from the source directly; the workers' own block size wins.
    #[arg(long, default_value = "4MiB")]
    pub block_size: ByteSize,
    /// Prometheus metrics, /healthz and /readyz.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Return once mounted and keep serving in the background.
    #[arg(long)]
    pub daemon: bool,
    /// With --daemon: where the background process logs (default: discarded).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
}

/// How the FUSE side runs: shared by `mount` and `node`.
#[derive(Debug, Args)]
pub struct FuseTuning {
    /// Largest readahead window of a sequential reader.
    #[arg(long, default_value = "64MiB")]
    pub max_readahead: ByteSize,
    /// Read locally complete files through the daemon even where the kernel offers passthrough.
    #[arg(long)]
    pub no_passthrough: bool,
    /// Threads reading FUSE requests, per mount (1–64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

/// Smallest --max-memory that leaves room for a few blocks in flight.
const MIN_MEMORY: u64 = 64 << 20;

/// Refuses a `--max-memory` too small to hold a few blocks in flight.
pub fn check_max_memory(max_memory: ByteSize) -> anyhow::Result<()> {
    if max_memory.0 < MIN_MEMORY {
        config_error!("--max-memory {max_memory} is too small; give at least 64MiB");
    }
    Ok(())
}

pub fn dataset_mount(args: &MountArgs) -> anyhow::Result<DatasetMount> {
    let workers = args.workers.as_deref().map(parse_worker_list).unwrap_or_default();
    let mut config = DatasetMount::new(workers, args.source.clone());
    config.replicas = args.replicas;
    config.members_refresh = (!args.members_refresh.is_zero()).then_some(args.members_refresh);
    config.source_options = args.source_options.iter().cloned().collect();
    config.source_tuning = SourceTuning::default();
    config.metadata_ttl = args.metadata_ttl;
    config.block_size = args.block_size.0;
    config.local_cache = match (&args.cache_dir, args.cache_size) {
        (Some(dir), Some(size)) => Some((dir.clone(), size.0)),
        (Some(_), None) => config_error!("--cache-dir needs --cache-size, e.g. --cache-size 100GiB"),
        (None, Some(_)) => config_error!("--cache-size needs --cache-dir"),
        (None, None) => None,
    };
    config.short_circuit = args.short_circuit.clone();
    config.passthrough = !args.fuse.no_passthrough;
    config.max_readahead = args.fuse.max_readahead.0;
    config.threads = args.fuse.threads.into();
    // SAFETY: geteuid/getegid only read the process's credentials.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    config.ownership = Ownership {
        uid: args.uid.unwrap_or(uid),
        gid: args.gid.unwrap_or(gid),
    };
    config.allow_other = uid == 0;
    check_max_memory(args.max_memory)?;
    Ok(config)
}

pub async fn run(args: MountArgs) -> anyhow::Result<()> {
    if args.checkpoint.checkpoint {
        return super::checkpoint_mount::run(args).await;
    }
    args.checkpoint.refuse_without_checkpoint()?;
    let config = dataset_mount(&args)?;
    if args.daemon {
        return daemonize(&args.mountpoint, args.log_file.as_deref());
    }
    let mut registry = Registry::default();
    let metrics = Arc::new(FuseMetrics::register(&mut registry));
    let resources = MountResources::new(args.max_memory.0, metrics);
    let ready = Arc::new(AtomicBool::new(false));
    serve_metrics(args.metrics_listen, registry, &ready).await?;
    let runtime = tokio::runtime::Handle::current();
    let mountpoint = args.mountpoint.clone();
    let mounted = tokio::task::spawn_blocking(move || dataset::mount(&config, &mountpoint, &resources, runtime))
        .await
        .context("the mount task failed")??;
    ready.store(true, std::sync::atomic::Ordering::Release);
    println!("mounted {}", args.mountpoint.display());
    // Serve until someone unmounts the path; a signal unmounts it.
    let mut serving = tokio::task::spawn_blocking(move || mounted.wait());
    tokio::select! {
        served = &mut serving => {
            tracing::info!("the mount went away; exiting");
            served.context("the mount task failed")?.context("the FUSE session failed")
        }
        _ = super::shutdown_signal() => {
            tracing::info!("unmounting");
            dataset::detach(&args.mountpoint).with_context(|| format!("cannot unmount {}", args.mountpoint.display()))?;
            serving.await.context("the mount task failed")?.context("the FUSE session failed")
        }
    }
}

/// Serves the mount's metrics, /healthz and /readyz on `listen` for as long as the process
/// runs (readiness follows `ready`).
pub async fn serve_metrics(
    listen: Option<SocketAddr>,
    registry: Registry,
    ready: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let Some(listen) = listen else { return Ok(()) };
    let (addr, _) = granary_process::metrics_http::serve(listen, Arc::new(registry), Arc::clone(ready), async {
        std::future::pending::<()>().await
    })
    .await
    .with_context(|| format!("cannot serve metrics on {listen}"))?;
    tracing::info!(%addr, "metrics endpoint");
    Ok(())
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = canonical.to_string_lossy().replace(' ', "\\040");
    info.lines().any(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
}

/// Starts this same command without --daemon in the background and returns once the
/// mount is there, or with the child's failure.
pub fn daemonize(mountpoint: &Path, log_file: Option<&Path>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--daemon").collect();
    let log = match log_file {
        Some(path) => std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open --log-file {}", path.display()))?,
        ),
        None => std::process::Stdio::null(),
    };
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("cannot start the background mount process")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("the background mount process exited with {status} before mounting; run without --daemon to see why");
        }
        if is_mounted(mountpoint) {
            println!("mounted {} (pid {})", mountpoint.display(), child.id());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("the background mount process did not mount within 60s")
}
