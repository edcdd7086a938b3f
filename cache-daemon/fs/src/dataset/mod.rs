//! A dataset as a read-only POSIX directory over FUSE.
//!
//! A read's way: [`fuse_adapter`] takes the kernel's request and calls [`filesystem`], the
//! logic (unit-tested without FUSE in `tests.rs`); [`metadata`] answers lookups and
//! listings (cached for the dataset's TTL); [`block_fetch`] finds the block in memory
//! ([`block_cache`]), the node-local file cache ([`local_files`], whose complete files the
//! kernel reads directly through passthrough), a co-located worker's files (short circuit),
//! or from the workers and, while they are down, the source store ([`remote`]).
//! [`readahead`] fetches ahead of sequential readers; [`memory_budget`] bounds it all.

mod block_buffers;
mod block_cache;
mod block_fetch;
pub mod error;
mod filesystem;
mod fuse_adapter;
pub(crate) mod inode_log;
mod inodes;
mod kernel_pages;
pub(crate) mod local_files;
pub mod memory_budget;
mod metadata;
pub mod node_fill;
mod readahead;
mod remote;
#[cfg(test)]
mod tests;
mod warm_ahead;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config};
use tokio::runtime::Handle;

pub use error::FsError;
use filesystem::Incarnation;
pub use filesystem::Ownership;
use inode_log::InodeLog;
use inodes::Inodes;
pub use memory_budget::MemoryBudget;

use crate::fs_core::session::start_session;
pub use crate::fs_core::session::{clear_dead_mount, detach, Handover, Takeover};
use crate::metrics::FuseMetrics;
use granary_cache::block::DEFAULT_BLOCK_SIZE;
use granary_cache::client::{ClientError, WorkerPool};
use granary_store::source::{SourceConfigError, SourceStore, SourceTuning};
use granary_store::units::MetadataTtl;

/// What one dataset mount serves and how.
#[derive(Debug, Clone)]
pub struct DatasetMount {
    /// Worker addresses (`host:port`); empty reads the source directly. Workers with a
    /// member set replace this list with theirs.
    pub workers: Vec<String>,
    pub replicas: usize,
    /// How often the workers' member set is asked again, so a scaled or replaced worker set
    /// reaches a running mount; `None` asks once, at mount.
    pub members_refresh: Option<std::time::Duration>,
    /// The source store, for reads while the workers are unreachable (or always, without
    /// workers).
    pub source: Option<String>,
    pub source_options: BTreeMap<String, String>,
    pub source_tuning: SourceTuning,
    pub metadata_ttl: MetadataTtl,
    /// Block size for files described by the source directly.
    pub block_size: u64,
    /// The node-local file cache: directory and size.
    pub local_cache: Option<(PathBuf, u64)>,
    /// Cache directories of workers running on this node, read directly.
    pub short_circuit: Vec<PathBuf>,
    /// Let the kernel read locally complete files itself (Linux 6.9+).
    pub passthrough: bool,
    /// Largest readahead window of one sequential reader.
    pub max_readahead: u64,
    /// FUSE threads reading requests from the kernel.
    pub threads: usize,
    pub allow_other: bool,
    pub ownership: Ownership,
    /// Where to log the inodes handed to the kernel. Set, the mount can be taken over by a
    /// restarted process ([`resume`]) from a duplicate of its descriptor ([`MountedFs::handover`]).
    pub restart_log: Option<PathBuf>,
}

impl DatasetMount {
    pub fn new(workers: Vec<String>, source: Option<String>) -> Self {
        DatasetMount {
            workers,
            replicas: 1,
            members_refresh: Some(std::time::Duration::from_secs(10)),
            source,
            source_options: BTreeMap::new(),
            source_tuning: SourceTuning::default(),
            metadata_ttl: MetadataTtl::Expires(std::time::Duration::from_secs(60)),
            block_size: DEFAULT_BLOCK_SIZE,
            local_cache: None,
            short_circuit: Vec::new(),
            passthrough: true,
            max_readahead: 64 << 20,
            threads: 4,
            allow_other: true,
            ownership: Ownership { uid: 0, gid: 0 },
            restart_log: None,
        }
    }

    /// A name for `mount` and `/proc/mounts`.
    pub fn fs_name(&self) -> String {
        match (&self.source, self.workers.first()) {
            (Some(source), _) => format!("granary:{source}"),
            (None, Some(worker)) => format!("granary:{worker}"),
            (None, None) => "granary".into(),
        }
    }
}

/// What every mount of one process shares: the memory budget and the metrics.
#[derive(Clone)]
pub struct MountResources {
    pub budget: Arc<MemoryBudget>,
    pub metrics: Arc<FuseMetrics>,
    /// Bytes of metadata each mount may cache.
    pub metadata_bytes: u64,
}

impl MountResources {
    /// Splits `max_memory`: an eighth for metadata, the rest for blocks in flight and cached.
    pub fn new(max_memory: u64, metrics: Arc<FuseMetrics>) -> Self {
        let metadata_bytes = max_memory / 8;
        let budget = MemoryBudget::new(
            max_memory - metadata_bytes,
            metrics.memory_used_bytes.clone(),
            &metrics.memory_limit_bytes,
            metrics.memory_waits.clone(),
        );
        MountResources {
            budget,
            metrics,
            metadata_bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Source(#[from] SourceConfigError),
    #[error(transparent)]
    Workers(#[from] ClientError),
    #[error("nothing to read from: give the workers (--workers) or the source store (--source), or both")]
    NothingToRead,
    #[error("mountpoint {0:?} does not exist; create it first (mkdir -p)")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0:?} is not a directory")]
    MountpointNotADirectory(PathBuf),
    #[error("cannot open the local cache at {path:?}: {source}; check that it is a writable local directory")]
    LocalCache { path: PathBuf, source: io::Error },
    #[error("the dataset cannot be read: {0}")]
    Unreachable(FsError),
    #[error("mounting at {path:?} failed: {source}; FUSE needs /dev/fuse and root (or CAP_SYS_ADMIN), or fusermount3 installed")]
    Mount { path: PathBuf, source: io::Error },
    #[error("cannot use the inode log {path:?}: {source}; the state directory must be writable")]
    RestartLog { path: PathBuf, source: io::Error },
    #[error("taking over the mount at {path:?} failed: {source}")]
    Takeover { path: PathBuf, source: io::Error },
}

impl MountError {
    /// Whether the mount's configuration is at fault (fix the input), rather than the
    /// machine or the store (retry later).
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            MountError::Mount { .. }
                | MountError::Unreachable(_)
                | MountError::LocalCache { .. }
                | MountError::RestartLog { .. }
                | MountError::Takeover { .. }
        )
    }
}

/// A live mount. Dropping it without [`MountedFs::unmount`] or [`MountedFs::wait`] unmounts
/// (a taken-over mount is left to whoever holds its descriptor).
pub struct MountedFs {
    session: BackgroundSession,
    handover: Handover,
    /// Where a taken-over mount is mounted (its session did not mount it, so cannot unmount).
    taken_over_at: Option<PathBuf>,
    /// The source store the mount reads while the workers cannot serve (shared with it).
    source: Option<SourceStore>,
}

impl MountedFs {
    /// Reads the source store with `options` (rotated credentials) from the next request on.
    pub fn rotate_source_options(&self, options: &BTreeMap<String, String>) -> Result<(), SourceConfigError> {
        match &self.source {
            Some(source) => source.rotate(options),
            None => Ok(()),
        }
    }

    /// Unmounts (lazily, so readers holding files finish) and waits for the session to end.
    pub fn unmount(self) -> io::Result<()> {
        match self.taken_over_at {
            Some(path) => {
                detach(&path)?;
                self.session.join()
            }
            None => self.session.umount_and_join(),
        }
    }

    /// What a successor process needs to take this mount over.
    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// Serves until the mount goes away (someone unmounts it, e.g. [`detach`]). Blocking.
    pub fn wait(self) -> io::Result<()> {
        self.session.join()
    }
}

/// The kernel reads ahead of a FUSE file 128 KiB at a time by default, one request each;
/// 1 MiB requests (the most one FUSE request carries) cut the per-request work eightfold.
/// Best effort: without /sys (or as non-root) the default stays.
fn raise_kernel_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else { return };
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, "1024") {
        tracing::debug!(knob, error = %e, "cannot raise the kernel's readahead for the mount");
    }
}

/// Builds the filesystem's parts from the configuration; fails on configuration mistakes.
fn build_fs(
    config: &DatasetMount,
    resources: &MountResources,
    runtime: Handle,
    incarnation: Incarnation,
) -> Result<(filesystem::DatasetFs, Option<SourceStore>), MountError> {
    if config.workers.is_empty() && config.source.is_none() {
        return Err(MountError::NothingToRead);
    }
    // A take-over serves at once: readers are already waiting on the kernel mount.
    let takeover = incarnation.epoch > 0;
    let workers = if config.workers.is_empty() {
        None
    } else {
        let pool = WorkerPool::new(&config.workers, config.replicas)?;
        // Place blocks over the workers' own member set from the first read on; workers
        // without one (or unreachable now) leave the list as configured. A take-over asks
        // in the background and reads over the configured list meanwhile (workers fill
        // what they do not own from its owner).
        let ask = {
            let pool = pool.clone();
            async move {
                let asked = tokio::time::timeout(std::time::Duration::from_secs(5), pool.refresh_members()).await;
                if !matches!(asked, Ok(Ok(_))) {
                    tracing::debug!("no member set from the workers at mount; placing over the configured list");
                }
            }
        };
        if takeover {
            runtime.spawn(ask);
        } else {
            runtime.block_on(ask);
        }
        if let Some(period) = config.members_refresh {
            let _runtime = runtime.enter();
            pool.follow_members(period);
        }
        Some(pool)
    };
    let source = match &config.source {
        Some(uri) => Some(SourceStore::open(uri, &config.source_options, &config.source_tuning)?),
        None => None,
    };
    let metrics = Arc::clone(&resources.metrics);
    let shared_source = source.clone();
    let remote = Arc::new(remote::Remote::new(
        workers,
        source,
        config.block_size,
        Arc::clone(&metrics),
    ));
    let local = match &config.local_cache {
        Some((dir, size)) => Some(Arc::new(
            local_files::LocalFileCache::open(dir, *size, metrics.local_cache_used_bytes.clone()).map_err(
                |source| MountError::LocalCache {
                    path: dir.clone(),
                    source,
                },
            )?,
        )),
        None => None,
    };
    // Fail at mount time, not at the first read, when nothing can serve the dataset's root.
    // A take-over serves regardless: readers are already waiting on the kernel mount, and
    // an error per request beats a mount nobody answers.
    let probe =
        runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), remote.stat("")).await });
    match probe {
        _ if takeover => {
            if !matches!(probe, Ok(Ok(_))) {
                tracing::warn!("the dataset's root cannot be read right now; serving the taken-over mount anyway");
            }
        }
        Ok(Ok(root)) if root.is_dir => {}
        Ok(Ok(root)) => {
            return Err(MountError::Unreachable(FsError::NotADirectory(root.path)));
        }
        Ok(Err(e)) => return Err(MountError::Unreachable(e)),
        Err(_) => {
            return Err(MountError::Unreachable(FsError::Io {
                path: String::new(),
                cause: "no answer within 30s from the workers or the store".into(),
            }))
        }
    }
    let metadata = metadata::Metadata::new(
        Arc::clone(&remote),
        config.metadata_ttl,
        resources.metadata_bytes,
        Arc::clone(&metrics),
    );
    let warm_ahead = Arc::new(warm_ahead::WarmAhead::new(Arc::clone(&remote)));
    let fetcher = Arc::new(block_fetch::BlockFetcher::new(
        remote,
        Arc::clone(&resources.budget),
        local,
        config.short_circuit.clone(),
        metrics,
    ));
    let fs = filesystem::DatasetFs::new(
        metadata,
        fetcher,
        warm_ahead,
        config.ownership,
        config.max_readahead,
        incarnation,
    );
    Ok((fs, shared_source))
}

/// Mounts `config` at `mountpoint`. Blocking (the kernel handshake); call it off the async
/// runtime, whose `runtime` handle the filesystem's requests run on.
pub fn mount(
    config: &DatasetMount,
    mountpoint: &Path,
    resources: &MountResources,
    runtime: Handle,
) -> Result<MountedFs, MountError> {
    let _ = clear_dead_mount(mountpoint);
    match std::fs::metadata(mountpoint) {
        Err(_) => return Err(MountError::MountpointMissing(mountpoint.to_path_buf())),
        Ok(md) if !md.is_dir() => return Err(MountError::MountpointNotADirectory(mountpoint.to_path_buf())),
        Ok(_) => {}
    }
    let inodes = match &config.restart_log {
        Some(path) => {
            let failed = |source| MountError::RestartLog {
                path: path.clone(),
                source,
            };
            crate::fs_core::epoch::record(&path.with_extension("epoch"), 0).map_err(failed)?;
            Inodes::with_log(filesystem::root_info(), Some(InodeLog::create(path).map_err(failed)?))
        }
        None => Inodes::new(filesystem::root_info()),
    };
    let (fs, source) = build_fs(config, resources, runtime.clone(), Incarnation::first(inodes))?;
    let passthrough = fs.passthrough_flag();
    let (session, device) = start_session(
        fuse_adapter::DatasetFuse::new(fs.clone(), runtime, config.passthrough),
        mountpoint,
        session_config(config),
        config.restart_log.is_some(),
        None,
    )
    .map_err(|source| MountError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    fs.set_notifier(session.notifier());
    raise_kernel_readahead(mountpoint);
    resources.metrics.mounts.inc();
    tracing::info!(mountpoint = %mountpoint.display(), source = ?config.source, workers = ?config.workers, "mounted");
    Ok(MountedFs {
        session,
        handover: Handover {
            device,
            passthrough,
            epoch: 0,
        },
        taken_over_at: None,
        source,
    })
}

fn session_config(config: &DatasetMount) -> Config {
    crate::fs_core::session::session_config(true, config.fs_name(), config.allow_other, config.threads)
}

/// Serves, in this process, the mount at `mountpoint` that a previous process started and
/// left (its descriptor kept alive elsewhere): the same kernel mount, so every process using
/// it, through any bind mount, carries on. Requests the previous process had read but not
/// answered are asked for again where the kernel can (Linux 6.9+).
pub fn resume(
    config: &DatasetMount,
    mountpoint: &Path,
    takeover: Takeover,
    resources: &MountResources,
    runtime: Handle,
) -> Result<MountedFs, MountError> {
    let log_path = config.restart_log.clone().ok_or_else(|| MountError::Takeover {
        path: mountpoint.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            "a mount without an inode log cannot be taken over",
        ),
    })?;
    let (log, live) = InodeLog::resume(&log_path).map_err(|source| MountError::RestartLog {
        path: log_path.clone(),
        source,
    })?;
    let inherited = live.len();
    let epoch =
        crate::fs_core::epoch::next_epoch(&log_path.with_extension("epoch"), takeover.epoch).map_err(|source| {
            MountError::RestartLog {
                path: log_path.clone(),
                source,
            }
        })?;
    let incarnation = Incarnation {
        inodes: Inodes::inherited(filesystem::root_info(), log, live),
        epoch,
        passthrough: Some(takeover.passthrough),
    };
    let (fs, source) = build_fs(config, resources, runtime.clone(), incarnation)?;
    let passthrough = fs.passthrough_flag();
    let fuse = fuse_adapter::DatasetFuse::new(fs.clone(), runtime, config.passthrough);
    let (session, device) =
        start_session(fuse, mountpoint, session_config(config), true, Some(takeover.fd)).map_err(|source| {
            MountError::Takeover {
                path: mountpoint.to_path_buf(),
                source,
            }
        })?;
    fs.set_notifier(session.notifier());
    resources.metrics.mounts.inc();
    tracing::info!(mountpoint = %mountpoint.display(), epoch, inherited, "took the mount over");
    Ok(MountedFs {
        session,
        handover: Handover {
            device,
            passthrough,
            epoch,
        },
        taken_over_at: Some(mountpoint.to_path_buf()),
        source,
    })
}
