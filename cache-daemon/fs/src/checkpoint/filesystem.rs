//! The logic of a checkpoint volume's filesystem, apart from FUSE (the adapter is
//! [`super::fuse_adapter`]; unit tests without a mount are in `tests.rs`). Files written through it are plain files in
//! the write-back area (`<writeback-dir>/files/<path>`): writes, truncates and renames are
//! local operations, journaled by the [`Tracker`] so the [`super::uploader`] brings the store
//! along. Listings merge the local files with the store's; a file only the store has is
//! copied into the area when opened, so a restore reads local files. Writes go through the
//! kernel's write-back cache; on a kernel without it, files with no writer are read through
//! passthrough instead.

use crate::fs_core::ToErrno;
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::future::Future;
use std::pin::Pin;

use fuser::{BackingId, FileAttr, FileType, INodeNo, TimeOrNow};

use super::commit_peer::CommitPeer;
use super::error::CkptFsError;
use super::inodes::{PathInodes, ROOT};
use super::store_view::StoreView;
use super::streaming::Streams;
use super::tracker::{parent_of, Tracker, Want};
use crate::fs_core::attr::{self, Owner};
use crate::fs_core::handles::Handles;
use crate::fs_core::io_modes::{IoModes, Opened};
use crate::metrics::CheckpointMetrics;
use granary_store::target::{StoreEntry, TargetStore};

/// How long the kernel may keep attributes and entries. Short: the uploader and other nodes
/// change what the store shows.
pub const ATTR_TTL: Duration = Duration::from_secs(1);

struct OpenFile {
    file: Arc<File>,
    ino: u64,
    writable: bool,
    /// The errno of a failed write; the file's close reports it and the file is never uploaded.
    failed: AtomicI32,
}

/// An open directory: its merged listing as of the open.
pub struct OpenDir {
    entries: Vec<(String, FileType)>,
}

/// Everything a request needs, shared with the tasks that answer it.
pub struct Ctx {
    pub tracker: Arc<Tracker>,
    pub view: Arc<StoreView>,
    pub target: TargetStore,
    pub metrics: Arc<CheckpointMetrics>,
    pub part_size: u64,
    pub concurrency: usize,
    /// The commit coordinator's client, on a volume written by several nodes.
    pub peer: Option<Arc<CommitPeer>>,
    /// Uploads of files still written in order.
    pub streams: Option<Arc<Streams>>,
    inodes: PathInodes,
    files: Handles<OpenFile>,
    dirs: Handles<OpenDir>,
    io_modes: IoModes,
    /// One copy from the store per file at a time (two opens of the same file must not both
    /// fetch it); copies of different files run in parallel, as ranks restore their shards.
    fetching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Bytes of copies under way, counted against the area before they land.
    fetch_reserved: std::sync::Mutex<u64>,
    /// One take-over of an inherited handle at a time (each counts a writer once).
    adopting: std::sync::Mutex<()>,
}

/// A checkpoint volume's state and logic. Cheap to clone: the adapter hands a clone to each
/// request's task.
#[derive(Clone)]
pub struct CheckpointFs {
    ctx: Arc<Ctx>,
    /// Passthrough was asked for, and the kernel agreed at init.
    passthrough: Arc<AtomicBool>,
}

/// An answer: ready now (from local state, on the thread that asked), or a future to run on
/// the runtime (it waits for the store or for room).
pub enum Step<T> {
    Ready(Result<T, CkptFsError>),
    Pending(Pin<Box<dyn Future<Output = Result<T, CkptFsError>> + Send>>),
}

impl<T> Step<T> {
    fn later(f: impl Future<Output = Result<T, CkptFsError>> + Send + 'static) -> Self {
        Step::Pending(Box::pin(f))
    }

    /// The answer, however it comes (the adapter matches instead, to answer ready ones on
    /// the FUSE thread).
    #[cfg(test)]
    pub async fn wait(self) -> Result<T, CkptFsError> {
        match self {
            Step::Ready(r) => r,
            Step::Pending(f) => f.await,
        }
    }
}

/// What a setattr changes.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

impl SetAttr {
    fn changes_anything(&self) -> bool {
        self.size.is_some()
            || self.mode.is_some()
            || self.uid.is_some()
            || self.gid.is_some()
            || self.atime.is_some()
            || self.mtime.is_some()
    }
}

/// Who asks: the owner of what a request creates.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// The sizes `statfs` reports, in blocks of `bsize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub free: u64,
    pub bsize: u32,
}

/// What a path is, and where.
enum Found {
    Local(std::fs::Metadata),
    Store(StoreEntry),
}

fn child_path(parent: &str, name: &OsStr) -> Result<String, CkptFsError> {
    let name = name
        .to_str()
        .ok_or_else(|| CkptFsError::NotFound(name.to_string_lossy().into_owned()))?;
    Ok(if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    })
}

fn local_attr(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    let time =
        |secs: i64, nanos: i64| UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.mtime(), md.mtime_nsec()),
        kind: if md.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: (md.mode() & 0o7777) as u16,
        nlink: if md.is_dir() { 2 } else { 1 },
        uid: md.uid(),
        gid: md.gid(),
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

/// Files only the store has are shown writable by all: the pods of a job write as any user.
fn store_attr(ino: u64, e: &StoreEntry) -> FileAttr {
    let perm = if e.is_dir { 0o777 } else { 0o666 };
    let root = Owner { uid: 0, gid: 0 };
    attr::synthetic(ino, e.is_dir, e.size, perm, root, e.modified.unwrap_or(UNIX_EPOCH))
}

fn attr_of(ino: u64, found: &Found) -> FileAttr {
    match found {
        Found::Local(md) => local_attr(ino, md),
        Found::Store(e) => store_attr(ino, e),
    }
}

impl Ctx {
    /// Stops streaming `path` (and what is under it): it no longer grows in order.
    fn stop_streaming(&self, path: &str) {
        if let Some(streams) = &self.streams {
            streams.drop_under(path);
        }
    }

    /// `len` bytes landed at `offset` of `path` (an unlinked file has no path).
    fn wrote(&self, path: Option<&str>, offset: u64, len: usize) {
        if let (Some(streams), Some(path)) = (&self.streams, path) {
            streams.wrote(path, offset, len as u64);
        }
    }

    /// Opens `path` for writing in the tracker, told to the commit coordinator first on a
    /// volume several nodes write.
    async fn begin_write(&self, path: &str) -> std::io::Result<()> {
        match &self.peer {
            Some(peer) => peer.begin_write(&self.tracker, path).await,
            None => self.tracker.begin_write(path),
        }
    }

    /// [`Self::begin_write`] for requests answered on the FUSE thread.
    fn begin_write_blocking(&self, path: &str) -> std::io::Result<()> {
        match &self.peer {
            Some(peer) => peer.begin_write_blocking(&self.tracker, path),
            None => self.tracker.begin_write(path),
        }
    }

    /// The open file behind `fh`. A handle the previous daemon gave out (before a restart)
    /// is rebuilt from its inode's local file; it counts as a writer when `writing` says so
    /// (a write), or, when that is unknown, while the file is still being written.
    fn open_file(&self, fh: u64, ino: u64, writing: Option<bool>) -> Option<Arc<OpenFile>> {
        if let Some(open) = self.files.get(fh) {
            return Some(open);
        }
        if !self.files.is_inherited(fh) {
            return None;
        }
        let _one_at_a_time = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = self.files.get(fh) {
            return Some(open);
        }
        let path = self.inodes.path(ino)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.tracker.local_path(&path))
            .ok()?;
        let writable = writing.unwrap_or_else(|| self.tracker.entry(&path).is_some_and(|e| e.want == Want::Writing));
        if writable {
            self.tracker.begin_write(&path).ok()?;
        }
        self.io_modes.open(ino, || None);
        Some(self.files.adopt(
            fh,
            OpenFile {
                file: Arc::new(file),
                ino,
                writable,
                failed: AtomicI32::new(0),
            },
        ))
    }

    fn path_of(&self, ino: INodeNo) -> Result<String, CkptFsError> {
        self.inodes.path(ino.0).ok_or(CkptFsError::Stale(ino.0))
    }

    /// The path of `name` in the directory `parent`.
    fn child_of(&self, parent: INodeNo, name: &OsStr) -> Result<String, CkptFsError> {
        child_path(&self.path_of(parent)?, name)
    }

    fn local_md(&self, path: &str) -> Option<std::fs::Metadata> {
        std::fs::symlink_metadata(self.tracker.local_path(path)).ok()
    }

    /// The local file, or else the store's entry (unless it is being deleted).
    async fn find(&self, path: &str) -> Result<Found, CkptFsError> {
        if let Some(md) = self.local_md(path) {
            return Ok(Found::Local(md));
        }
        if self.tracker.deleting(path) {
            return Err(CkptFsError::NotFound(path.to_string()));
        }
        match self.view.lookup(path).await {
            Ok(Some(e)) => Ok(Found::Store(e)),
            Ok(None) => Err(CkptFsError::NotFound(path.to_string())),
            // While the store is down, writers must keep writing: a name that is not local
            // is new. (A file only the store has cannot be read then anyway.)
            Err(e) => {
                tracing::warn!(path, error = %e, "cannot list the target store; treating the name as new");
                Err(CkptFsError::NotFound(path.to_string()))
            }
        }
    }

    /// Whether the store (as last listed) has an object at `path`.
    async fn in_store(&self, path: &str) -> bool {
        matches!(self.view.lookup(path).await, Ok(Some(e)) if !e.is_dir)
    }

    /// Makes room for `bytes` more in the area: drops uploaded copies, and while uploads are
    /// running waits for them (backpressure). Fails only when nothing could ever free room.
    async fn make_room(&self, mut fits: impl FnMut() -> Result<bool, CkptFsError>) -> Result<(), CkptFsError> {
        let mut waited = false;
        loop {
            if fits()? {
                return Ok(());
            }
            let mut freed = false;
            for (path, _) in self.tracker.eviction_candidates() {
                let bytes = self.tracker.evict(&path)?;
                if bytes > 0 {
                    self.metrics.evicted_bytes.inc_by(bytes);
                    self.view.invalidate_parent(&path);
                    freed = true;
                    break;
                }
            }
            if freed {
                continue;
            }
            if !self.tracker.uploads_outstanding() {
                return Err(CkptFsError::NoSpace(super::tracker::NoSpace::Full {
                    limit: self.tracker.limit(),
                }));
            }
            if !waited {
                waited = true;
                self.metrics.write_waits.inc();
                tracing::info!(
                    used = self.tracker.used(),
                    limit = self.tracker.limit(),
                    "the write-back area is full; writes wait for uploads"
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tracker.space_freed.notified()).await;
        }
    }

    /// Copies `path` from the store into the area unless it is there. Returns false when
    /// neither has it.
    async fn ensure_local(&self, path: &str) -> Result<bool, CkptFsError> {
        if self.local_md(path).is_some() {
            return Ok(true);
        }
        let lock = Arc::clone(
            self.fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(path.to_string())
                .or_default(),
        );
        let fetched = {
            let _one = lock.lock().await;
            self.fetch_once(path).await
        };
        self.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(path);
        fetched
    }

    /// [`Self::ensure_local`]'s copy, under the file's lock.
    async fn fetch_once(&self, path: &str) -> Result<bool, CkptFsError> {
        if self.local_md(path).is_some() {
            return Ok(true);
        }
        if self.tracker.deleting(path) {
            return Ok(false);
        }
        // A stat, not the (possibly stale) listing: the copy needs the object's size now.
        let size = match self.target.size_of(path).await {
            Ok(size) => size,
            Err(e) if e.kind() == granary_store::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        if size > self.tracker.limit() {
            return Err(CkptFsError::NoSpace(super::tracker::NoSpace::TooLarge {
                path: path.to_string(),
                needed: size,
                limit: self.tracker.limit(),
            }));
        }
        let tracker = Arc::clone(&self.tracker);
        self.make_room(|| {
            let mut reserved = self.fetch_reserved.lock().unwrap_or_else(|p| p.into_inner());
            let fits = tracker.used() + *reserved + size <= tracker.limit();
            if fits {
                *reserved += size;
            }
            Ok(fits)
        })
        .await?;
        let downloaded = async {
            let tmp_dir = self.tracker.files_root().with_file_name("tmp");
            std::fs::create_dir_all(&tmp_dir)?;
            let tmp = tmp_dir.join(format!("fetch-{}", xxhash_rust::xxh3::xxh3_64(path.as_bytes())));
            self.target
                .download(path, &tmp, size, self.part_size, self.concurrency)
                .await?;
            Ok::<_, CkptFsError>(tmp)
        }
        .await;
        *self.fetch_reserved.lock().unwrap_or_else(|p| p.into_inner()) -= size;
        let tmp = downloaded?;
        let local = self.tracker.local_path(path);
        if let Some(dir) = local.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::rename(&tmp, &local)?;
        self.tracker.fetched(path, size)?;
        self.metrics.fetched_bytes.inc_by(size);
        tracing::debug!(path, size, "copied from the target store");
        Ok(true)
    }

    /// Creates the local directories above `path` (they may exist only in the store).
    fn local_parents(&self, path: &str) -> Result<(), CkptFsError> {
        let local = self.tracker.local_path(parent_of(path));
        std::fs::create_dir_all(local)?;
        Ok(())
    }

    /// The merged listing of `dir`: local entries, then the store's that are not local and
    /// not being deleted. A store that cannot be listed leaves the local entries (logged).
    async fn list(&self, dir: &str) -> Result<Vec<(String, FileType)>, CkptFsError> {
        let mut merged: BTreeMap<String, FileType> = BTreeMap::new();
        let local_dir = self.tracker.local_path(dir);
        let local_exists = local_dir.is_dir();
        if local_exists {
            for entry in std::fs::read_dir(&local_dir)? {
                let entry = entry?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let kind = if entry.file_type()?.is_dir() {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                merged.insert(name, kind);
            }
        }
        match self.view.listing(dir).await {
            Ok(listing) => {
                for (name, e) in listing.iter() {
                    let path = if dir.is_empty() {
                        name.clone()
                    } else {
                        format!("{dir}/{name}")
                    };
                    if merged.contains_key(name) || (!e.is_dir && self.tracker.deleting(&path)) {
                        continue;
                    }
                    let kind = if e.is_dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    merged.insert(name.clone(), kind);
                }
            }
            Err(e) if local_exists => {
                tracing::warn!(dir, error = %e, "cannot list the target store; showing local files only");
            }
            Err(e) => return Err(e.into()),
        }
        Ok(merged.into_iter().collect())
    }
}

impl CheckpointFs {
    pub fn new(parts: CtxParts) -> Self {
        let incarnation = parts.incarnation;
        let ctx = Arc::new(Ctx {
            tracker: parts.tracker,
            view: parts.view,
            target: parts.target,
            metrics: parts.metrics,
            part_size: parts.part_size,
            concurrency: parts.concurrency,
            peer: parts.peer,
            streams: parts.streams,
            inodes: incarnation.inodes,
            files: Handles::with_epoch(incarnation.epoch),
            dirs: Handles::with_epoch(incarnation.epoch),
            io_modes: IoModes::default(),
            fetching: std::sync::Mutex::new(HashMap::new()),
            fetch_reserved: std::sync::Mutex::new(0),
            adopting: std::sync::Mutex::new(()),
        });
        CheckpointFs {
            ctx,
            passthrough: Arc::new(AtomicBool::new(incarnation.passthrough.unwrap_or(false))),
        }
    }

    /// Whether the kernel agreed to passthrough (shared with the mount, which hands it on).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.passthrough)
    }

    /// `name` in `parent`: answered at once for a local file, after a store lookup otherwise.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Step<FileAttr> {
        let ctx = Arc::clone(&self.ctx);
        let path = match ctx.child_of(INodeNo(parent), name) {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        if let Some(md) = ctx.local_md(&path) {
            let ino = ctx.inodes.remember(&path);
            return Step::Ready(Ok(local_attr(ino, &md)));
        }
        Step::later(async move {
            let found = ctx.find(&path).await?;
            let ino = ctx.inodes.remember(&path);
            Ok(attr_of(ino, &found))
        })
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.ctx.inodes.forget(ino, nlookup);
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Step<FileAttr> {
        let ctx = Arc::clone(&self.ctx);
        // An open file answers for itself, even after an unlink.
        if let Some(open) = fh.and_then(|fh| ctx.open_file(fh, ino, None)) {
            return Step::Ready(
                open.file
                    .metadata()
                    .map(|md| local_attr(ino, &md))
                    .map_err(CkptFsError::Local),
            );
        }
        let path = match ctx.path_of(INodeNo(ino)) {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        if let Some(md) = ctx.local_md(&path) {
            return Step::Ready(Ok(local_attr(ino, &md)));
        }
        Step::later(async move { Ok(attr_of(ino, &ctx.find(&path).await?)) })
    }

    pub fn setattr(&self, ino: u64, fh: Option<u64>, set: SetAttr) -> Step<FileAttr> {
        let ctx = Arc::clone(&self.ctx);
        let open = fh.and_then(|fh| ctx.open_file(fh, ino, None));
        Step::later(async move {
            let path = ctx.path_of(INodeNo(ino))?;
            if set.changes_anything() && !ctx.ensure_local(&path).await? {
                return Err(CkptFsError::NotFound(path.clone()));
            }
            let local = ctx.tracker.local_path(&path);
            if let Some(size) = set.size {
                let writer = open.as_ref().filter(|o| o.writable);
                ctx.stop_streaming(&path);
                if writer.is_none() {
                    ctx.begin_write(&path).await?;
                }
                let tracker = Arc::clone(&ctx.tracker);
                let grown = ctx.make_room(|| Ok(tracker.try_grow(&path, size)?)).await;
                let truncated = grown.and_then(|()| {
                    let file = match writer {
                        Some(o) => Arc::clone(&o.file),
                        None => Arc::new(OpenOptions::new().write(true).open(&local)?),
                    };
                    file.set_len(size)?;
                    Ok(())
                });
                ctx.tracker.set_size(&path, size);
                if writer.is_none() {
                    // A truncate by path is a whole change: upload it as one version.
                    match &truncated {
                        Ok(()) => ctx.tracker.closed(&path, size)?,
                        Err(_) => ctx.tracker.broken(&path)?,
                    }
                    ctx.tracker.end_write(&path);
                }
                truncated?;
            }
            if let Some(mode) = set.mode {
                std::fs::set_permissions(&local, std::fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if set.uid.is_some() || set.gid.is_some() {
                std::os::unix::fs::lchown(&local, set.uid, set.gid)?;
            }
            if set.atime.is_some() || set.mtime.is_some() {
                let file = File::open(&local)?;
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = set.atime {
                    times = times.set_accessed(system_time(t));
                }
                if let Some(t) = set.mtime {
                    times = times.set_modified(system_time(t));
                }
                file.set_times(times)?;
            }
            match ctx.local_md(&path) {
                Some(md) => Ok(local_attr(ino, &md)),
                None => Ok(attr_of(ino, &ctx.find(&path).await?)),
            }
        })
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: Caller,
    ) -> Result<FileAttr, CkptFsError> {
        let ctx = &self.ctx;
        let path = ctx.child_of(INodeNo(parent), name)?;
        ctx.local_parents(&path)?;
        let local = ctx.tracker.local_path(&path);
        std::fs::create_dir(&local)?;
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(mode & !umask & 0o7777))?;
        std::os::unix::fs::lchown(&local, Some(caller.uid), Some(caller.gid))?;
        // The kernel asked because the name was not found, so the store has nothing there.
        ctx.view.known_empty(&path);
        let md = std::fs::symlink_metadata(&local)?;
        Ok(local_attr(ctx.inodes.remember(&path), &md))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Step<()> {
        let ctx = Arc::clone(&self.ctx);
        let path = match ctx.child_of(INodeNo(parent), name) {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        Step::later(async move {
            let in_store = ctx.in_store(&path).await && !ctx.tracker.deleting(&path);
            let local_removed = match std::fs::remove_file(ctx.tracker.local_path(&path)) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e.into()),
            };
            if !local_removed && !in_store {
                return Err(CkptFsError::NotFound(path.clone()));
            }
            ctx.stop_streaming(&path);
            ctx.tracker.removed(&path, in_store)?;
            ctx.inodes.unlinked(&path);
            Ok(())
        })
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Step<()> {
        let ctx = Arc::clone(&self.ctx);
        let path = match ctx.child_of(INodeNo(parent), name) {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        Step::later(async move {
            if !ctx.list(&path).await?.is_empty() {
                return Err(CkptFsError::NotEmpty(path.clone()));
            }
            match std::fs::remove_dir(ctx.tracker.local_path(&path)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            ctx.inodes.unlinked(&path);
            ctx.view.invalidate_tree(&path);
            Ok(())
        })
    }

    /// Renames `name` in `parent` to `newname` in `newparent`; with `noreplace`, an existing
    /// target is an error (RENAME_NOREPLACE).
    pub fn rename(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, noreplace: bool) -> Step<()> {
        let ctx = Arc::clone(&self.ctx);
        let paths = ctx
            .child_of(INodeNo(parent), name)
            .and_then(|from| Ok((from, ctx.child_of(INodeNo(newparent), newname)?)));
        let (from, to) = match paths {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        Step::later(async move {
            let local_from = ctx.tracker.local_path(&from);
            let Some(md) = ctx.local_md(&from) else {
                // Only the store has it: an object store cannot rename, and copying a
                // checkpoint silently inside rename() would not be atomic.
                ctx.find(&from).await?;
                return Err(CkptFsError::CrossStore(from.clone()));
            };
            if md.is_dir() {
                // Objects this mount uploaded from the directory move with it (the new
                // names are uploaded, the old deleted); objects only the store has cannot.
                let keys = ctx.target.keys_under(&from).await?;
                let store_only = keys
                    .iter()
                    .any(|k| ctx.local_md(k).is_none() && !ctx.tracker.deleting(k));
                if store_only {
                    return Err(CkptFsError::CrossStore(from.clone()));
                }
            }
            if noreplace && ctx.find(&to).await.is_ok() {
                return Err(CkptFsError::Exists(to.clone()));
            }
            ctx.local_parents(&to)?;
            ctx.stop_streaming(&from);
            ctx.stop_streaming(&to);
            std::fs::rename(&local_from, ctx.tracker.local_path(&to))?;
            ctx.tracker.moved(&from, &to)?;
            if let Some(peer) = &ctx.peer {
                // The new name is unsettled now: say so before rename() returns (best
                // effort; the next round says it anyway, the old name holds meanwhile).
                if let Err(e) = peer.sync(&ctx.tracker).await {
                    tracing::debug!(error = %e, "the commit coordinator did not take a rename yet");
                }
            }
            ctx.inodes.renamed(&from, &to);
            ctx.view.invalidate_parent(&from);
            ctx.view.invalidate_parent(&to);
            Ok(())
        })
    }

    /// Creates and opens `name` in `parent` for writing (`flags`: the open's O_EXCL, O_TRUNC).
    /// Returns the attributes and the handle.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(FileAttr, u64), CkptFsError> {
        let ctx = &self.ctx;
        let path = ctx.child_of(INodeNo(parent), name)?;
        ctx.local_parents(&path)?;
        let local = ctx.tracker.local_path(&path);
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).mode(mode & !umask & 0o7777);
        if flags & libc::O_EXCL != 0 {
            options.create_new(true);
        }
        if flags & libc::O_TRUNC != 0 {
            options.truncate(true);
        }
        let file = options.open(&local)?;
        std::os::unix::fs::lchown(&local, Some(caller.uid), Some(caller.gid))?;
        ctx.begin_write_blocking(&path)?;
        let md = file.metadata()?;
        ctx.tracker.set_size(&path, md.len());
        let file = Arc::new(file);
        match &ctx.streams {
            // A new, empty version: its parts may go up as they fill.
            Some(streams) if md.len() == 0 => streams.begin(&path, Arc::clone(&file)),
            _ => ctx.stop_streaming(&path),
        }
        let ino = ctx.inodes.remember(&path);
        ctx.io_modes.open(ino, || None);
        let fh = ctx.files.insert(OpenFile {
            file,
            ino,
            writable: true,
            failed: AtomicI32::new(0),
        });
        Ok((local_attr(ino, &md), fh))
    }

    /// Opens `ino` (copying it from the store when only the store has it). A file nobody
    /// writes is handed to the kernel to read itself when `backing` registers it.
    pub async fn open(
        &self,
        ino: u64,
        writable: bool,
        truncate: bool,
        backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<(u64, Opened), CkptFsError> {
        let ctx = &self.ctx;
        let passthrough = self.passthrough.load(Ordering::Acquire);
        let path = ctx.path_of(INodeNo(ino))?;
        if truncate && ctx.local_md(&path).is_none() {
            // Replacing a store-only file: nothing to copy.
            ctx.find(&path).await?;
            ctx.local_parents(&path)?;
        } else if !ctx.ensure_local(&path).await? {
            return Err(CkptFsError::NotFound(path.clone()));
        }
        let local = ctx.tracker.local_path(&path);
        // Read-write even for readers: a passthrough backing file is shared by
        // every open of the inode, writers included.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(truncate)
            .truncate(truncate)
            .open(&local)?;
        let file = Arc::new(file);
        if writable {
            ctx.begin_write(&path).await?;
            if truncate {
                ctx.tracker.set_size(&path, 0);
            }
            match &ctx.streams {
                Some(streams) if truncate => streams.begin(&path, Arc::clone(&file)),
                // Written again in place: whatever was streamed may change.
                _ => ctx.stop_streaming(&path),
            }
        }
        let busy_writing = ctx.tracker.entry(&path).is_some_and(|e| e.writers > 0);
        let mode = ctx.io_modes.open(ino, || {
            if !passthrough || writable || busy_writing {
                return None;
            }
            match backing(&file) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(path, error = %e, "the kernel refused a passthrough backing file");
                    None
                }
            }
        });
        let fh = ctx.files.insert(OpenFile {
            file,
            ino,
            writable,
            failed: AtomicI32::new(0),
        });
        Ok((fh, mode))
    }

    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, CkptFsError> {
        let open = self.ctx.open_file(fh, ino, None).ok_or(CkptFsError::BadHandle(fh))?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match open.file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CkptFsError::Local(e)),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    /// Writes `data` at `offset`: at once when the area has room, else after uploads or
    /// evictions free it (backpressure, off the thread that asked).
    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Step<u32> {
        let ctx = &self.ctx;
        let Some(open) = ctx.open_file(fh, ino, Some(true)) else {
            return Step::Ready(Err(CkptFsError::BadHandle(fh)));
        };
        let failed = open.failed.load(Ordering::Relaxed);
        if failed != 0 {
            return Step::Ready(Err(CkptFsError::WriteFailed(failed)));
        }
        let end = offset + data.len() as u64;
        // An unlinked file has no path: its bytes go nowhere, so they need no room.
        let path = ctx.inodes.path(ino);
        let room = match &path {
            Some(path) => ctx.tracker.try_grow(path, end),
            None => Ok(true),
        };
        match room {
            Ok(true) => Step::Ready(match open.file.write_all_at(data, offset) {
                Ok(()) => {
                    ctx.wrote(path.as_deref(), offset, data.len());
                    Ok(data.len() as u32)
                }
                Err(e) => {
                    let e = CkptFsError::Local(e);
                    write_failed(ctx, &open, path.as_deref(), &e);
                    Err(e)
                }
            }),
            Err(e) => {
                let e = CkptFsError::from(e);
                write_failed(ctx, &open, path.as_deref(), &e);
                Step::Ready(Err(e))
            }
            Ok(false) => {
                let data = data.to_vec();
                let ctx = Arc::clone(&self.ctx);
                let path = path.unwrap_or_default();
                Step::later(async move {
                    let tracker = Arc::clone(&ctx.tracker);
                    let written = ctx
                        .make_room(|| Ok(tracker.try_grow(&path, end)?))
                        .await
                        .and_then(|()| Ok(open.file.write_all_at(&data, offset)?));
                    match written {
                        Ok(()) => {
                            ctx.wrote(Some(&path), offset, data.len());
                            Ok(data.len() as u32)
                        }
                        Err(e) => {
                            write_failed(&ctx, &open, Some(&path), &e);
                            Err(e)
                        }
                    }
                })
            }
        }
    }

    /// A close of a file descriptor: a written file's bytes so far are a version to upload.
    pub fn flush(&self, ino: u64, fh: u64) -> Result<(), CkptFsError> {
        let ctx = &self.ctx;
        let open = ctx.open_file(fh, ino, None).ok_or(CkptFsError::BadHandle(fh))?;
        if !open.writable {
            return Ok(());
        }
        let failed = open.failed.load(Ordering::Relaxed);
        if failed != 0 {
            // The application learns at close() too that this file is not whole.
            return Err(CkptFsError::WriteFailed(failed));
        }
        let Some(path) = ctx.inodes.path(ino) else {
            return Ok(());
        };
        let md = open.file.metadata()?;
        Ok(ctx.tracker.closed(&path, md.len())?)
    }

    pub fn release(&self, ino: u64, fh: u64) {
        let ctx = &self.ctx;
        if let Some(open) = ctx.files.remove(fh) {
            if open.writable {
                if let Some(path) = ctx.inodes.path(open.ino) {
                    ctx.tracker.end_write(&path);
                }
            }
            ctx.io_modes.release(ino);
        }
    }

    pub fn fsync(&self, ino: u64, fh: u64, datasync: bool) -> Result<(), CkptFsError> {
        let open = self.ctx.open_file(fh, ino, None).ok_or(CkptFsError::BadHandle(fh))?;
        if datasync {
            open.file.sync_data()?;
        } else {
            open.file.sync_all()?;
        }
        Ok(self.ctx.tracker.sync_journal()?)
    }

    /// Opens the directory `ino`: its merged listing, local and store, as of now.
    pub fn opendir(&self, ino: u64) -> Step<u64> {
        let ctx = Arc::clone(&self.ctx);
        let path = match ctx.path_of(INodeNo(ino)) {
            Ok(p) => p,
            Err(e) => return Step::Ready(Err(e)),
        };
        Step::later(async move {
            let entries = ctx.list(&path).await?;
            Ok(ctx.dirs.insert(OpenDir { entries }))
        })
    }

    /// The open directory `fh`; one opened before this daemon took the mount over is listed again.
    pub fn dir(&self, ino: u64, fh: u64) -> Step<Arc<OpenDir>> {
        let ctx = Arc::clone(&self.ctx);
        if let Some(dir) = ctx.dirs.get(fh) {
            return Step::Ready(Ok(dir));
        }
        if !ctx.dirs.is_inherited(fh) {
            return Step::Ready(Err(CkptFsError::BadHandle(fh)));
        }
        Step::later(async move {
            let path = ctx.path_of(INodeNo(ino))?;
            let entries = ctx.list(&path).await?;
            Ok(ctx.dirs.adopt(fh, OpenDir { entries }))
        })
    }

    /// Gives `add` the entries of an open directory from the kernel's `offset` (inode, the
    /// offset after it, kind, name) until it says the reply is full.
    pub fn fill_dir(
        &self,
        dir: &OpenDir,
        ino: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &str) -> bool,
    ) {
        let ctx = &self.ctx;
        let dir_path = ctx.inodes.path(ino).unwrap_or_default();
        let dots = [
            (".".to_string(), FileType::Directory),
            ("..".to_string(), FileType::Directory),
        ];
        for (i, (name, kind)) in dots.iter().chain(dir.entries.iter()).enumerate().skip(offset as usize) {
            let child = if dir_path.is_empty() {
                name.clone()
            } else {
                format!("{dir_path}/{name}")
            };
            // Numbers here are informational; lookups assign the real ones.
            let child_ino = match name.as_str() {
                "." => ino,
                ".." => ROOT,
                _ => ctx
                    .inodes
                    .peek(&child)
                    .unwrap_or_else(|| xxhash_rust::xxh3::xxh3_64(child.as_bytes()) | (1 << 63)),
            };
            if add(child_ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.ctx.dirs.remove(fh);
    }

    /// The write-back area's size and free room.
    pub fn statfs(&self) -> Statfs {
        let bsize = 4096u64;
        let limit = self.ctx.tracker.limit();
        let free = limit.saturating_sub(self.ctx.tracker.used());
        Statfs {
            blocks: limit / bsize,
            free: free / bsize,
            bsize: bsize as u32,
        }
    }
}

/// Which incarnation of the daemon serves the mount: the first, or one that took it over
/// after a restart with the inode table its predecessor logged.
pub struct Incarnation {
    pub inodes: PathInodes,
    /// Bumped by each take-over; handle numbers carry it.
    pub epoch: u64,
    /// What the kernel agreed to at the mount's init, when this incarnation did not see it.
    pub passthrough: Option<bool>,
}

/// What [`CheckpointFs::new`] is built from.
pub struct CtxParts {
    pub incarnation: Incarnation,
    pub tracker: Arc<Tracker>,
    pub view: Arc<StoreView>,
    pub target: TargetStore,
    pub metrics: Arc<CheckpointMetrics>,
    pub part_size: u64,
    pub concurrency: usize,
    pub peer: Option<Arc<CommitPeer>>,
    pub streams: Option<Arc<Streams>>,
}

fn system_time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Marks a write as failed: the handle reports it on every later write and at close, and
/// this version of the file never reaches the store.
fn write_failed(ctx: &Ctx, open: &OpenFile, path: Option<&str>, e: &CkptFsError) {
    let errno = e.errno().code();
    if open.failed.swap(errno, Ordering::Relaxed) == 0 {
        ctx.metrics.broken_files.inc();
        tracing::error!(path, error = %e, "a write to a checkpoint volume failed; the file will not be uploaded");
        if let Some(path) = path {
            if let Err(e) = ctx.tracker.broken(path) {
                tracing::error!(path, error = %e, "cannot write the journal");
            }
        }
    }
}
