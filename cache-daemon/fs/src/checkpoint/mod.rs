//! Checkpoint volumes: a read-write directory whose writes land in a node-local write-back
//! area and reach the target store in the background.
//!
//! A byte's way: [`fuse_adapter`] takes the kernel's request to [`filesystem`], the logic
//! (unit-tested without FUSE in `tests.rs`), which writes it into a local file; at close the
//! [`tracker`] journals the file ([`journal`]) as a version to upload, in the
//! [`writeback_state`]; the [`uploader`] sends it to the target store as a parallel multipart upload, the commit marker of a checkpoint
//! directory last; after a commit, [`retention`] deletes checkpoints beyond `--keep-last`.
//! Listings merge local files with the store's ([`store_view`]).

pub mod commit_peer;
mod error;
mod filesystem;
mod fuse_adapter;
mod inodes;
pub mod journal;
pub mod retention;
mod store_view;
mod streaming;
#[cfg(test)]
mod tests;
pub mod tracker;
mod uploader;
pub mod writeback_state;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::BackgroundSession;
use tokio::runtime::Handle;
use tokio::sync::watch;

pub use commit_peer::CommitCoordination;
pub use tracker::Tracker;
pub use uploader::UploadTuning;

use crate::fs_core::op_log::OpLog;
use crate::fs_core::session::clear_dead_mount;
use crate::metrics::CheckpointMetrics;
use granary_store::source::{SourceConfigError, SourceTuning};
use granary_store::{ErrorKind, StoreError};
use inodes::PathInodes;

/// How long a closed file waits before its upload starts: a file renamed within it (DCP
/// writes `.metadata.tmp`, then renames it) is uploaded once, under its final name.
const UPLOAD_GRACE: Duration = Duration::from_millis(200);

/// What one checkpoint volume writes where.
#[derive(Debug, Clone)]
pub struct CheckpointMount {
    /// Where checkpoints must end up (s3://bucket/prefix, fs:///path).
    pub target: String,
    pub target_options: BTreeMap<String, String>,
    pub target_tuning: SourceTuning,
    /// The node-local write-back area (local NVMe, or a tmpfs for memory): files, journal.
    pub writeback_dir: PathBuf,
    pub writeback_size: u64,
    /// The file whose upload commits its directory (`.metadata`, `_COMPLETE`).
    pub commit_marker: Option<String>,
    pub upload: UploadTuning,
    /// How long listings of the store are trusted.
    pub listing_ttl: Duration,
    /// Let the kernel read files with no writer straight from the write-back area, where it
    /// offers no write-back cache (the two never combine).
    pub passthrough: bool,
    pub threads: usize,
    pub allow_other: bool,
    /// Log the inode table (in the write-back area) so that a restarted process can take
    /// the mount over ([`resume`]) from a duplicate of its descriptor.
    pub restartable: bool,
    /// The commit coordinator of a volume several nodes write: markers wait until no node
    /// has anything unsettled in their directory. Without it only this node's files count.
    pub coordinator: Option<CommitCoordination>,
}

impl CheckpointMount {
    pub fn new(target: String, writeback_dir: PathBuf, writeback_size: u64) -> Self {
        CheckpointMount {
            target,
            target_options: BTreeMap::new(),
            target_tuning: SourceTuning::default(),
            writeback_dir,
            writeback_size,
            commit_marker: None,
            upload: UploadTuning {
                concurrency: 16,
                part_size: 16 << 20,
                keep_last: 0,
            },
            listing_ttl: Duration::from_secs(5),
            passthrough: true,
            threads: 4,
            allow_other: true,
            restartable: false,
            coordinator: None,
        }
    }

    pub fn fs_name(&self) -> String {
        format!("granary-checkpoint:{}", self.target)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointMountError {
    #[error(transparent)]
    Target(#[from] SourceConfigError),
    #[error("the target store cannot be written: {0}; check the URI, that the bucket exists, and that the credentials may write")]
    TargetNotWritable(StoreError),
    #[error("the target store did not answer a test write within 30s; check the endpoint and the network")]
    TargetTimeout,
    #[error("cannot use the write-back directory {path:?}: {source}; give a writable local directory")]
    WritebackDir { path: PathBuf, source: io::Error },
    #[error("--writeback-size {size} is larger than the {available} bytes free in {path:?}; lower it or free space")]
    WritebackTooBig { path: PathBuf, size: u64, available: u64 },
    #[error("the write-back directory {0:?} is in use by another process; each checkpoint volume needs its own --writeback-dir")]
    WritebackInUse(PathBuf),
    #[error("--part-size {0} is out of range: S3 needs parts of 5MiB to 5GiB")]
    PartSize(u64),
    #[error("the write-back journal {path:?} cannot be replayed: {source}")]
    Journal { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Coordinator(#[from] commit_peer::CommitPeerError),
    #[error("the commit coordinator at {address} did not take this node's unsettled files: {reason}; start it (`granary-cache commit-coordinator`, or check the CheckpointPolicy's coordinator pod) and mount again")]
    CoordinatorUnreachable { address: String, reason: String },
    #[error("mountpoint {0:?} does not exist; create it first (mkdir -p)")]
    MountpointMissing(PathBuf),
    #[error("mountpoint {0:?} is not a directory")]
    MountpointNotADirectory(PathBuf),
    #[error("mounting at {path:?} failed: {source}; FUSE needs /dev/fuse and root (or CAP_SYS_ADMIN)")]
    Mount { path: PathBuf, source: io::Error },
}

impl CheckpointMountError {
    /// Whether the configuration is at fault (fix the input) rather than the machine or the
    /// store (retry later).
    pub fn is_config(&self) -> bool {
        match self {
            CheckpointMountError::Mount { .. }
            | CheckpointMountError::CoordinatorUnreachable { .. }
            | CheckpointMountError::TargetTimeout
            | CheckpointMountError::Journal { .. } => false,
            CheckpointMountError::TargetNotWritable(e) => e.kind() != ErrorKind::Unavailable,
            _ => true,
        }
    }
}

/// A live checkpoint mount and its uploader.
pub struct MountedCheckpoint {
    session: Option<BackgroundSession>,
    handover: crate::fs_core::session::Handover,
    /// Where a taken-over mount is mounted (its session did not mount it, so cannot unmount).
    taken_over_at: Option<PathBuf>,
    /// Held while this process owns the write-back area (released when dropped).
    _lock: std::fs::File,
    tracker: Arc<Tracker>,
    stop: watch::Sender<bool>,
    uploader: tokio::task::JoinHandle<()>,
    /// The target store, shared with the uploader and the filesystem.
    target: granary_store::target::TargetStore,
    health: Arc<uploader::UploadHealth>,
}

impl MountedCheckpoint {
    /// Writes to the target with `options` (rotated credentials) from the next request on;
    /// uploads that failed for the old ones retry with the new within their backoff (30 s
    /// at most).
    pub fn rotate_target_options(
        &self,
        options: &BTreeMap<String, String>,
    ) -> Result<(), granary_store::source::SourceConfigError> {
        self.target.rotate(options)
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Why the target refuses this volume's uploads, while it does (see [`uploader::UploadHealth`]).
    pub fn upload_refusal(&self) -> Option<String> {
        self.health.refusal()
    }

    /// What a successor process needs to take this mount over.
    pub fn handover(&self) -> &crate::fs_core::session::Handover {
        &self.handover
    }

    /// Waits until every closed file is in the store (or `timeout` passes); true if so.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.tracker.idle() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Whether the kernel mount is still served (someone may have unmounted it).
    pub fn is_serving(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts (no new writes) and ends the FUSE session; the uploader keeps running.
    pub async fn close_mount(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        let taken_over_at = self.taken_over_at.clone();
        let ended = tokio::task::spawn_blocking(move || {
            if session.guard.is_finished() {
                session.join()
            } else if let Some(path) = taken_over_at {
                crate::fs_core::session::detach(&path)?;
                session.join()
            } else {
                session.umount_and_join()
            }
        })
        .await
        .map_err(io::Error::other)?;
        match ended {
            // Someone unmounted it first.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }

    /// Unmounts and stops the uploader once its running uploads end; what is still pending
    /// stays in the journal for the next mount of the same write-back directory.
    pub async fn unmount(mut self) -> io::Result<()> {
        let closed = self.close_mount().await;
        let _ = self.stop.send(true);
        let _ = (&mut self.uploader).await;
        closed
    }
}

fn writeback_err(path: &Path) -> impl FnOnce(io::Error) -> CheckpointMountError + '_ {
    move |source| CheckpointMountError::WritebackDir {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes the write-back area's lock (released by the kernel when the process dies).
fn lock_writeback(dir: &Path) -> Result<std::fs::File, CheckpointMountError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(writeback_err(dir))?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open across the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            CheckpointMountError::WritebackInUse(dir.to_path_buf())
        } else {
            CheckpointMountError::WritebackDir {
                path: dir.to_path_buf(),
                source: err,
            }
        });
    }
    Ok(file)
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
fn available_bytes(dir: &Path) -> io::Result<u64> {
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statvfs writes into the zeroed struct we own and reads a NUL-terminated path
    // that lives across the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Mounts a checkpoint volume at `mountpoint`: checks the target can be written, replays the
/// write-back journal (uploads left by a previous run resume), and starts the uploader on
/// `runtime`. Blocking; call it off the async runtime.
pub fn mount(
    config: &CheckpointMount,
    mountpoint: &Path,
    metrics: Arc<CheckpointMetrics>,
    runtime: Handle,
) -> Result<MountedCheckpoint, CheckpointMountError> {
    let _ = clear_dead_mount(mountpoint);
    match std::fs::metadata(mountpoint) {
        Err(_) => return Err(CheckpointMountError::MountpointMissing(mountpoint.to_path_buf())),
        Ok(md) if !md.is_dir() => return Err(CheckpointMountError::MountpointNotADirectory(mountpoint.to_path_buf())),
        Ok(_) => {}
    }
    start(config, mountpoint, metrics, runtime, None)
}

/// Serves, in this process, the checkpoint mount at `mountpoint` that a previous process
/// started and left (its descriptor kept alive elsewhere): the same kernel mount, so writers
/// holding files open carry on. The journal is replayed as at any start, and the inode table
/// from the write-back area's inode log. Never touches the mountpoint (nobody answers it yet).
pub fn resume(
    config: &CheckpointMount,
    mountpoint: &Path,
    takeover: crate::fs_core::session::Takeover,
    metrics: Arc<CheckpointMetrics>,
    runtime: Handle,
) -> Result<MountedCheckpoint, CheckpointMountError> {
    start(config, mountpoint, metrics, runtime, Some(takeover))
}

fn start(
    config: &CheckpointMount,
    mountpoint: &Path,
    metrics: Arc<CheckpointMetrics>,
    runtime: Handle,
    takeover: Option<crate::fs_core::session::Takeover>,
) -> Result<MountedCheckpoint, CheckpointMountError> {
    let part = config.upload.part_size;
    if !((5 << 20)..=(5 << 30)).contains(&part) {
        return Err(CheckpointMountError::PartSize(part));
    }
    let target =
        granary_store::target::TargetStore::open(&config.target, &config.target_options, &config.target_tuning)?;

    let dir = &config.writeback_dir;
    let files_root = dir.join("files");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&files_root).map_err(writeback_err(dir))?;
    // Two processes sharing a journal would corrupt it: one owner per area.
    let lock = lock_writeback(dir)?;
    // Half-done copies from the store of a previous run.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(writeback_err(dir))?;

    let journal_path = dir.join("journal.jsonl");
    let (tracker, recovery) = Tracker::open(
        &journal_path,
        &files_root,
        config.writeback_size,
        config.commit_marker.clone(),
    )
    .map_err(|source| CheckpointMountError::Journal {
        path: journal_path.clone(),
        source,
    })?;
    let available = available_bytes(dir).map_err(writeback_err(dir))?;
    if config.writeback_size > available + tracker.used() {
        return Err(CheckpointMountError::WritebackTooBig {
            path: dir.clone(),
            size: config.writeback_size,
            available: available + tracker.used(),
        });
    }
    let probe =
        runtime.block_on(async { tokio::time::timeout(Duration::from_secs(30), target.probe_writable()).await });
    match probe {
        Ok(Ok(())) => {}
        // Writers are waiting on the taken-over mount; uploads retry until the store is back.
        _ if takeover.is_some() => {
            tracing::warn!(
                target = config.target,
                "the checkpoint target cannot be written right now; serving the taken-over mount anyway"
            )
        }
        Ok(Err(e)) => return Err(CheckpointMountError::TargetNotWritable(e)),
        Err(_) => return Err(CheckpointMountError::TargetTimeout),
    }
    if recovery.pending_uploads + recovery.pending_deletes > 0 || !recovery.untracked.is_empty() {
        tracing::info!(
            uploads = recovery.pending_uploads,
            deletes = recovery.pending_deletes,
            untracked = recovery.untracked.len(),
            "resuming the uploads of a previous run"
        );
    }
    for path in &recovery.unfinished_writes {
        tracing::warn!(
            path,
            "this file was open for writing when the previous run stopped; it stays local and is uploaded once written and closed again"
        );
    }
    for path in &recovery.lost {
        tracing::error!(
            path,
            "a closed file vanished from the write-back area before its upload"
        );
    }

    tracker.set_upload_grace(UPLOAD_GRACE);
    let tracker = Arc::new(tracker);
    let health = Arc::new(uploader::UploadHealth::default());
    let peer = match &config.coordinator {
        None => None,
        Some(coordination) => {
            let peer = Arc::new(commit_peer::CommitPeer::new(
                coordination,
                &config.target,
                runtime.clone(),
                Arc::clone(&health),
            )?);
            tracker.set_coordinated(true);
            // The coordinator learns this node's whole unsettled set (its journal's) before a
            // writer can open anything.
            match runtime.block_on(peer.sync(&tracker)) {
                Ok(()) => {}
                Err(e) if takeover.is_some() => {
                    tracing::warn!(coordinator = peer.address(), error = %e, "the commit coordinator cannot be reached; serving the taken-over mount anyway, markers wait for it")
                }
                Err(e) => {
                    return Err(CheckpointMountError::CoordinatorUnreachable {
                        address: peer.address().to_string(),
                        reason: e.to_string(),
                    })
                }
            }
            Some(peer)
        }
    };
    let view = Arc::new(store_view::StoreView::new(target.clone(), config.listing_ttl));
    let streams = Arc::new(streaming::Streams::new(
        target.clone(),
        config.upload.part_size,
        config.upload.parts_per_file(),
        runtime.clone(),
    ));
    let uploader = Arc::new(uploader::Uploader {
        streams: Some(Arc::clone(&streams)),
        tracker: Arc::clone(&tracker),
        target: target.clone(),
        view: Arc::clone(&view),
        tuning: config.upload.clone(),
        metrics: Arc::clone(&metrics),
        health: Arc::clone(&health),
    });
    let inode_log = dir.join("inodes.log");
    let log_err = |source| CheckpointMountError::WritebackDir {
        path: inode_log.clone(),
        source,
    };
    let epoch_path = dir.join("epoch");
    let (inodes, epoch) = match (&takeover, config.restartable) {
        (Some(t), _) => {
            let (log, ops) = OpLog::resume(&inode_log).map_err(log_err)?;
            let inodes = PathInodes::inherited(log, ops).map_err(log_err)?;
            (
                inodes,
                crate::fs_core::epoch::next_epoch(&epoch_path, t.epoch).map_err(log_err)?,
            )
        }
        (None, true) => {
            crate::fs_core::epoch::record(&epoch_path, 0).map_err(log_err)?;
            (PathInodes::with_log(OpLog::create(&inode_log).map_err(log_err)?), 0)
        }
        (None, false) => (PathInodes::default(), 0),
    };
    // Started last: every early return above leaves nothing running.
    let (stop, stopped) = watch::channel(false);
    if let Some(peer) = &peer {
        runtime.spawn(Arc::clone(peer).run(Arc::clone(&tracker), stopped.clone()));
    }
    let uploader = runtime.spawn(uploader.run(stopped));
    let fs = filesystem::CheckpointFs::new(filesystem::CtxParts {
        incarnation: filesystem::Incarnation {
            inodes,
            epoch,
            passthrough: takeover.as_ref().map(|t| t.passthrough),
        },
        tracker: Arc::clone(&tracker),
        view,
        target: target.clone(),
        metrics,
        part_size: config.upload.part_size,
        concurrency: config.upload.concurrency,
        peer,
        streams: Some(streams),
    });
    let passthrough = fs.passthrough_flag();
    let fs = fuse_adapter::CheckpointFuse::new(fs, runtime.clone(), config.passthrough);
    let session_config =
        crate::fs_core::session::session_config(false, config.fs_name(), config.allow_other, config.threads);
    let started = crate::fs_core::session::start_session(
        fs,
        mountpoint,
        session_config,
        config.restartable,
        takeover.map(|t| t.fd),
    );
    let (session, device) = match started {
        Ok(s) => s,
        Err(source) => {
            let _ = stop.send(true);
            return Err(CheckpointMountError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            });
        }
    };
    tracing::info!(mountpoint = %mountpoint.display(), target = config.target, writeback = %dir.display(), epoch, "checkpoint volume mounted");
    Ok(MountedCheckpoint {
        session: Some(session),
        handover: crate::fs_core::session::Handover {
            device,
            passthrough,
            epoch,
        },
        taken_over_at: (epoch > 0).then(|| mountpoint.to_path_buf()),
        _lock: lock,
        tracker,
        stop,
        uploader,
        target,
        health,
    })
}
