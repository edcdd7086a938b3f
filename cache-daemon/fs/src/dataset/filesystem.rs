//! The dataset filesystem's logic: what each request means, as async functions returning
//! `Result<_, FsError>`, with no FUSE reply in sight, so every line of it runs in a unit test
//! without root or a mount. [`super::fuse_adapter`] turns kernel requests into these calls
//! and their results into replies.

use std::ffi::OsStr;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{BackingId, FileAttr, FileType};

use super::block_fetch::BlockFetcher;
use super::error::FsError;
use super::inodes::{Inodes, ROOT};
use super::kernel_pages::{KernelPages, PageCacheMode};
use super::metadata::{name_of, parent_of, DirListing, Metadata};
use super::readahead::Readahead;
use super::warm_ahead::WarmAhead;
use crate::fs_core::attr::{self, Owner};
use crate::fs_core::handles::Handles;
use crate::fs_core::io_modes::{IoModes, Opened};
use granary_cache::block::block_range;
use granary_cache::proto::FileInfo;

/// Entries fetched from a listing per readdir reply (a reply holds what fits in its buffer).
const READDIR_BATCH: usize = 512;

/// Ownership and permissions the mount shows: it is read-only, readable by everyone.
#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
}

struct OpenFile {
    /// The version this handle reads. It changes only while the handle has returned no
    /// byte (see [`DatasetFs::adopt_new_version`]).
    info: Mutex<Arc<FileInfo>>,
    /// Whether a read of this handle returned bytes (of `info`'s version).
    served: AtomicBool,
    readahead: Mutex<Readahead>,
    ino: u64,
    /// How its reads use the kernel's page cache; `None` for passthrough (the kernel reads
    /// the backing file).
    pages: Option<PageCacheMode>,
}

impl OpenFile {
    fn new(info: Arc<FileInfo>, ino: u64, max_readahead: u64, pages: Option<PageCacheMode>) -> Self {
        OpenFile {
            readahead: Mutex::new(Readahead::new(info.block_size, max_readahead)),
            info: Mutex::new(info),
            served: AtomicBool::new(false),
            ino,
            pages,
        }
    }

    fn info(&self) -> Arc<FileInfo> {
        Arc::clone(&self.info.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

struct OpenDir {
    listing: Arc<DirListing>,
    path: String,
    ino: u64,
}

/// Which incarnation of the daemon serves the mount: the first (a fresh mount) or one that
/// took it over after a restart, with the inodes its predecessor handed out.
pub struct Incarnation {
    pub inodes: Inodes,
    /// Bumped by each take-over; handle numbers carry it.
    pub epoch: u64,
    /// What the kernel agreed to at the mount's init, when this incarnation did not see it.
    pub passthrough: Option<bool>,
}

impl Incarnation {
    pub fn first(inodes: Inodes) -> Self {
        Incarnation {
            inodes,
            epoch: 0,
            passthrough: None,
        }
    }
}

/// An inode with the attributes the kernel is told, for the attribute TTL.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: FileAttr,
    pub ttl: Duration,
}

/// How an open file is read.
#[derive(Debug)]
pub enum OpenedFile {
    /// Through the daemon, using the kernel's page cache as `pages` says (blocks of a version
    /// never change, so pages of the same version may stay).
    Cached { fh: u64, pages: PageCacheMode },
    /// By the kernel from a complete local file.
    Passthrough { fh: u64, backing: Arc<BackingId> },
}

/// One entry of a directory walk, with the kernel offset that comes after it.
#[derive(Debug)]
pub struct DirItem<'a> {
    pub ino: u64,
    pub next: u64,
    pub name: &'a str,
    pub kind: FileType,
    /// The attributes, for readdirplus.
    pub attr: Option<FileAttr>,
}

/// A dataset mount's state and logic. Cheap to clone: the adapter hands a clone to each
/// request's task.
#[derive(Clone)]
pub struct DatasetFs {
    inner: Arc<Inner>,
}

struct Inner {
    metadata: Arc<Metadata>,
    fetcher: Arc<BlockFetcher>,
    warm_ahead: Arc<WarmAhead>,
    inodes: Inodes,
    files: Handles<OpenFile>,
    dirs: Handles<OpenDir>,
    io_modes: IoModes,
    kernel_pages: KernelPages,
    ownership: Ownership,
    /// Passthrough was asked for, and the kernel agreed at init.
    passthrough: Arc<AtomicBool>,
    max_readahead: u64,
    /// Tells the kernel to drop what it holds of an inode; set once the session runs.
    notifier: OnceLock<fuser::Notifier>,
}

pub(super) fn root_info() -> FileInfo {
    FileInfo {
        path: String::new(),
        is_dir: true,
        ..Default::default()
    }
}

fn child_path(parent: &str, name: &OsStr) -> Result<String, FsError> {
    let name = name
        .to_str()
        .ok_or_else(|| FsError::NotFound(name.to_string_lossy().into_owned()))?;
    Ok(if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    })
}

fn file_type(info: &FileInfo) -> FileType {
    if info.is_dir {
        FileType::Directory
    } else {
        FileType::RegularFile
    }
}

/// An inode number for an entry the kernel holds no reference to, outside the range the
/// inode table hands out.
fn stand_in_ino(path: &str) -> u64 {
    (1 << 63) | (xxhash_rust::xxh3::xxh3_64(path.as_bytes()) >> 1)
}

impl DatasetFs {
    pub fn new(
        metadata: Arc<Metadata>,
        fetcher: Arc<BlockFetcher>,
        warm_ahead: Arc<WarmAhead>,
        ownership: Ownership,
        max_readahead: u64,
        incarnation: Incarnation,
    ) -> Self {
        DatasetFs {
            inner: Arc::new(Inner {
                metadata,
                fetcher,
                warm_ahead,
                inodes: incarnation.inodes,
                files: Handles::with_epoch(incarnation.epoch),
                dirs: Handles::with_epoch(incarnation.epoch),
                io_modes: IoModes::default(),
                kernel_pages: KernelPages::default(),
                ownership,
                passthrough: Arc::new(AtomicBool::new(incarnation.passthrough.unwrap_or(false))),
                max_readahead,
                notifier: OnceLock::new(),
            }),
        }
    }

    /// Gives the filesystem the session's notifier (once the session runs).
    pub fn set_notifier(&self, notifier: fuser::Notifier) {
        let _ = self.inner.notifier.set(notifier);
    }

    /// Whether the kernel agreed to passthrough (shared with the mount, which hands it on).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.inner.passthrough)
    }

    /// How long the kernel may keep attributes and entries.
    pub fn kernel_ttl(&self) -> Duration {
        self.inner.metadata.kernel_ttl()
    }

    pub(super) fn metrics(&self) -> &Arc<crate::metrics::FuseMetrics> {
        &self.inner.fetcher.metrics
    }

    fn attr(&self, ino: u64, info: &FileInfo) -> FileAttr {
        let mtime = UNIX_EPOCH + Duration::from_nanos(info.mtime_unix_nanos.max(0) as u64);
        let perm = if info.is_dir { 0o555 } else { 0o444 };
        let owner = Owner {
            uid: self.inner.ownership.uid,
            gid: self.inner.ownership.gid,
        };
        attr::synthetic(ino, info.is_dir, info.size, perm, owner, mtime)
    }

    /// What the kernel's inode `ino` is, with attributes refreshed when they are stale.
    async fn fresh_info(&self, ino: u64) -> Result<Arc<FileInfo>, FsError> {
        let inner = &self.inner;
        let known = inner.inodes.get(ino).ok_or(FsError::Stale(ino))?;
        let info = inner.metadata.stat(&known.path).await?;
        if !Arc::ptr_eq(&info, &known) {
            inner.inodes.update(ino, Arc::clone(&info));
        }
        Ok(info)
    }

    /// `name` in the directory `parent`, with one more kernel reference on its inode.
    pub async fn lookup(&self, parent: u64, name: &OsStr) -> Result<Entry, FsError> {
        let inner = &self.inner;
        let parent_info = inner.inodes.get(parent).ok_or(FsError::Stale(parent))?;
        let path = child_path(&parent_info.path, name)?;
        let info = inner.metadata.stat(&path).await?;
        let ino = inner.inodes.remember(Arc::clone(&info));
        Ok(Entry {
            attr: self.attr(ino, &info),
            ttl: inner.metadata.kernel_ttl(),
        })
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        if self.inner.inodes.forget(ino, nlookup) {
            self.inner.kernel_pages.forget(ino);
        }
    }

    pub async fn getattr(&self, ino: u64) -> Result<Entry, FsError> {
        let info = self.fresh_info(ino).await?;
        Ok(Entry {
            attr: self.attr(ino, &info),
            ttl: self.inner.metadata.kernel_ttl(),
        })
    }

    /// Opens `ino` for reading. A file wholly in the node-local cache is handed to the kernel
    /// to read itself when `backing` registers it (passthrough); `write` is refused.
    pub async fn open(
        &self,
        ino: u64,
        write: bool,
        backing: impl FnOnce(&File) -> std::io::Result<BackingId>,
    ) -> Result<OpenedFile, FsError> {
        if write {
            return Err(FsError::ReadOnly);
        }
        let inner = &self.inner;
        let info = self.fresh_info(ino).await?;
        if info.is_dir {
            return Err(FsError::IsADirectory(info.path.clone()));
        }
        let local_file = if inner.passthrough.load(Ordering::Acquire) {
            self.local_file_for_passthrough(&info).await
        } else {
            None
        };
        // A small file not on this node: its directory's other files are likely next (an
        // epoch). One on the node says nothing of the others, and asking the workers for a
        // loaded directory's files would only cost them requests.
        if info.size <= info.block_size && local_file.is_none() {
            let dir = parent_of(&info.path);
            inner.warm_ahead.opened(dir, || inner.metadata.listing(dir));
        }
        let opened = inner.io_modes.open(ino, || {
            let file = local_file?;
            match backing(&file) {
                Ok(id) => Some(id),
                Err(e) => {
                    tracing::warn!(path = %info.path, error = %e, "the kernel refused a passthrough backing file; reading through the daemon");
                    None
                }
            }
        });
        let new = |pages| OpenFile::new(Arc::clone(&info), ino, inner.max_readahead, pages);
        Ok(match opened {
            Opened::Passthrough(backing) => OpenedFile::Passthrough {
                fh: inner.files.insert(new(None)),
                backing,
            },
            Opened::Cached => {
                let pages = inner.kernel_pages.open(ino, &info.version);
                OpenedFile::Cached {
                    fh: inner.files.insert(new(Some(pages))),
                    pages,
                }
            }
        })
    }

    /// The node-local copy of `info` for the kernel to read, when it is complete. A file of
    /// one block that is on this node already (in memory, or a co-located worker's block
    /// file: the state after a prewarm) is copied there first: one local write, and its reads
    /// then never enter the daemon, as in a warm epoch.
    async fn local_file_for_passthrough(&self, info: &FileInfo) -> Option<File> {
        let fetcher = &self.inner.fetcher;
        let local = fetcher.local.as_ref()?;
        if let Some(file) = local.open_complete(info) {
            return Some(file);
        }
        if info.size == 0 || info.size > info.block_size {
            return None;
        }
        let data = fetcher.block_on_node(info, 0).await?;
        if data.len() as u64 != info.size || !local.write_now(info, 0, data).await {
            return None;
        }
        local.open_complete(info)
    }

    /// The open file behind `fh`; a handle the previous daemon gave out (before a restart)
    /// is taken over from its inode.
    async fn open_file(&self, fh: u64, ino: u64) -> Result<Arc<OpenFile>, FsError> {
        let inner = &self.inner;
        if let Some(file) = inner.files.get(fh) {
            return Ok(file);
        }
        if !inner.files.is_inherited(fh) {
            return Err(FsError::BadHandle(fh));
        }
        let info = self.fresh_info(ino).await?;
        // What the previous daemon served through this handle is unknown: it counts as read.
        let pages = inner.kernel_pages.inherited(ino, &info.version);
        let file = OpenFile::new(info, ino, inner.max_readahead, Some(pages));
        file.served.store(true, Ordering::Relaxed);
        Ok(inner.files.adopt(fh, file))
    }

    /// Reads `size` bytes at `offset` of the open file `fh`. The readahead decision is made
    /// when this is called, in the kernel's order, before the reads run concurrently; the
    /// returned future fetches. Call it on the thread that received the request.
    pub fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> impl std::future::Future<Output = Result<Bytes, FsError>> + Send + 'static {
        let fs = self.clone();
        let known = self.inner.files.get(fh).map(|file| {
            let planned = plan_read(&file, offset, size);
            (file, planned)
        });
        async move {
            let (file, planned) = match known {
                Some(known) => known,
                // Opened before this daemon took the mount over: rebuild the handle first.
                None => {
                    let file = fs.open_file(fh, ino).await?;
                    let planned = plan_read(&file, offset, size);
                    (file, planned)
                }
            };
            let (info, Some(ahead)) = planned else {
                return Ok(Bytes::new());
            };
            match fs.serve_read(&info, offset, size, ahead.clone()).await {
                Ok(data) => {
                    fs.served(&file, &info);
                    Ok(data)
                }
                Err(FsError::Changed(_)) if !file.served.load(Ordering::Relaxed) => {
                    // Opened from metadata cached before the file changed in the store:
                    // nothing of the old version was returned, so the handle reads the new.
                    let info = fs.adopt_new_version(&file, &info).await?;
                    let data = fs.serve_read(&info, offset, size, ahead).await?;
                    fs.served(&file, &info);
                    Ok(data)
                }
                Err(FsError::Changed(path)) => {
                    // ESTALE for this handle; the next open reads the new version.
                    fs.learn_new_version(file.ino, &info).await;
                    Err(FsError::Changed(path))
                }
                Err(e) => Err(e),
            }
        }
    }

    /// A read of `file` returned bytes of `info`'s version. Only its first bytes are news to
    /// the page-cache record: while this handle is open, its version's pages stay filled.
    fn served(&self, file: &OpenFile, info: &FileInfo) {
        if file.served.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Some(pages) = file.pages {
            self.inner.kernel_pages.filled(file.ino, pages, &info.version);
        }
    }

    /// Asks for `path`'s metadata afresh (past this mount's and the workers' caches) as the
    /// inode `ino`'s, and has the kernel drop the attributes it holds (the size may differ).
    async fn refresh_inode(&self, ino: u64, path: &str) -> Result<Arc<FileInfo>, FsError> {
        let current = self.inner.metadata.refresh(path).await?;
        if !current.is_dir {
            self.inner.inodes.update(ino, Arc::clone(&current));
            self.drop_kernel_attributes(ino);
        }
        Ok(current)
    }

    /// Moves a handle that has returned no byte from `old`, a version the store no longer
    /// has, to the store's current one: its metadata is asked for afresh (past the mount's
    /// and the workers' caches) and the kernel is told to drop the attributes it holds (the
    /// size may differ). A version that did not change, or is no longer a file, stays
    /// `Changed` (ESTALE): a handle that returned bytes never mixes two versions. So does a
    /// handle that may have been given pages of `old` by the kernel without asking the
    /// daemon (see [`KernelPages::try_move`]).
    async fn adopt_new_version(&self, file: &OpenFile, old: &Arc<FileInfo>) -> Result<Arc<FileInfo>, FsError> {
        let inner = &self.inner;
        let changed = || FsError::Changed(old.path.clone());
        let current = match self.refresh_inode(file.ino, &old.path).await {
            Ok(info) if !info.is_dir && info.version != old.version => info,
            Ok(_) | Err(FsError::NotFound(_)) => return Err(changed()),
            Err(e) => return Err(e),
        };
        let movable = match file.pages {
            Some(pages) => inner
                .kernel_pages
                .try_move(file.ino, pages, &old.version, &current.version),
            None => true,
        };
        if !movable {
            tracing::info!(path = %current.path, old = %old.version, new = %current.version, "the file changed in the store while the kernel may hold pages of the old version; ESTALE for this handle, the next open reads the new version");
            return Err(changed());
        }
        {
            let mut held = file.info.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if Arc::ptr_eq(&held, old) {
                *held = Arc::clone(&current);
            }
        }
        inner.fetcher.metrics.reopened_changed.inc();
        tracing::info!(path = %current.path, old = %old.version, new = %current.version, "the file changed in the store before its first read; reading the new version");
        Ok(current)
    }

    /// After a handle of `old` got ESTALE: asks for the file's metadata afresh, once per
    /// change (the inode still names `old`), so the next open reads the new version.
    async fn learn_new_version(&self, ino: u64, old: &FileInfo) {
        let inner = &self.inner;
        if inner.inodes.get(ino).is_none_or(|known| known.version != old.version) {
            return;
        }
        if let Err(e) = self.refresh_inode(ino, &old.path).await {
            tracing::debug!(path = %old.path, error = %e, "cannot ask for a changed file's metadata");
        }
    }

    /// Tells the kernel to drop the attributes it holds of `ino` (the size may differ).
    fn drop_kernel_attributes(&self, ino: u64) {
        if let Some(notifier) = self.inner.notifier.get() {
            // Attributes only (offset -1): the kernel takes no page lock for it, so it is
            // safe while a read's pages wait for the reply. It lands before the reply, so
            // the reader's next read past the old end asks for the new size.
            if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), -1, 0) {
                tracing::debug!(ino, error = %e, "the kernel did not take an attribute invalidation");
            }
        }
    }

    async fn serve_read(
        &self,
        info: &FileInfo,
        offset: u64,
        size: u32,
        ahead: super::readahead::Ahead,
    ) -> Result<Bytes, FsError> {
        let fetcher = &self.inner.fetcher;
        let end = offset.saturating_add(size as u64).min(info.size);
        let fetch = ahead.fetch.start..ahead.fetch.end.min(info.size);
        if !fetch.is_empty() {
            let bs = info.block_size.max(1);
            for index in (fetch.start / bs)..=((fetch.end - 1) / bs) {
                fetcher.prefetch(info, index);
            }
        }
        let data = read_range(fetcher, info, offset, end).await.inspect_err(|e| {
            tracing::warn!(path = %info.path, offset, error = %e, "read failed");
        })?;
        if ahead.streaming {
            drop_behind(fetcher, info, end);
        }
        fetcher.metrics.reply_bytes.inc_by(data.len() as u64);
        Ok(data)
    }

    pub fn release(&self, fh: u64) {
        if let Some(file) = self.inner.files.remove(fh) {
            self.inner.io_modes.release(file.ino);
            if let Some(pages) = file.pages {
                self.inner.kernel_pages.release(file.ino, pages);
            }
        }
    }

    pub async fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let info = self.fresh_info(ino).await?;
        if !info.is_dir {
            return Err(FsError::NotADirectory(info.path.clone()));
        }
        let listing = self.inner.metadata.listing(&info.path);
        Ok(self.inner.dirs.insert(OpenDir {
            listing,
            path: info.path.clone(),
            ino,
        }))
    }

    /// The open directory behind `fh`, taken over like [`Self::open_file`].
    async fn open_dir(&self, fh: u64, ino: u64) -> Result<Arc<OpenDir>, FsError> {
        let inner = &self.inner;
        if let Some(dir) = inner.dirs.get(fh) {
            return Ok(dir);
        }
        if !inner.dirs.is_inherited(fh) {
            return Err(FsError::Stale(fh));
        }
        let info = self.fresh_info(ino).await?;
        Ok(inner.dirs.adopt(
            fh,
            OpenDir {
                listing: inner.metadata.listing(&info.path),
                path: info.path.clone(),
                ino,
            },
        ))
    }

    /// Walks the open directory `fh` from the kernel's `offset`, giving `add` each entry until
    /// it says the reply is full. Offsets: 1 is ".", 2 is "..", 3 + i is entry i of the
    /// listing, which is waited for while it streams in. With `plus`, entries carry their
    /// attributes and take a kernel reference (one that did not fit is given back).
    pub async fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(DirItem<'_>) -> bool,
    ) -> Result<(), FsError> {
        let inodes = &self.inner.inodes;
        let dir = self.open_dir(fh, ino).await?;
        let parent = inodes.peek(parent_of(&dir.path)).unwrap_or(ROOT);
        // "." and ".." carry attributes but take no reference.
        if offset == 0 {
            // With readdirplus, "." is left out if its inode is gone.
            let attr = match plus {
                true => inodes.get(dir.ino).map(|info| Some(self.attr(dir.ino, &info))),
                false => Some(None),
            };
            if let Some(attr) = attr {
                let item = DirItem {
                    ino: dir.ino,
                    next: 1,
                    name: ".",
                    kind: FileType::Directory,
                    attr,
                };
                if add(item) {
                    return Ok(());
                }
            }
        }
        if offset <= 1 {
            let attr = plus.then(|| {
                let info = inodes.get(parent).unwrap_or_else(|| Arc::new(root_info()));
                self.attr(parent, &info)
            });
            let item = DirItem {
                ino: parent,
                next: 2,
                name: "..",
                kind: FileType::Directory,
                attr,
            };
            if add(item) {
                return Ok(());
            }
        }
        let mut index = offset.saturating_sub(2) as usize;
        loop {
            let batch = dir.listing.entries_from(index, READDIR_BATCH).await?;
            if batch.is_empty() {
                return Ok(());
            }
            for info in batch {
                index += 1;
                let (ino, attr) = if plus {
                    let ino = inodes.remember(Arc::clone(&info));
                    (ino, Some(self.attr(ino, &info)))
                } else {
                    // Plain readdir takes no inode reference: known inodes keep their number,
                    // others get a stand-in from the path's hash.
                    (
                        inodes.peek(&info.path).unwrap_or_else(|| stand_in_ino(&info.path)),
                        None,
                    )
                };
                let item = DirItem {
                    ino,
                    next: index as u64 + 2,
                    name: name_of(&info.path),
                    kind: file_type(&info),
                    attr,
                };
                if add(item) {
                    // It did not fit: the kernel got no reference to it.
                    if plus && inodes.forget(ino, 1) {
                        self.inner.kernel_pages.forget(ino);
                    }
                    return Ok(());
                }
            }
        }
    }

    pub fn releasedir(&self, fh: u64) {
        self.inner.dirs.remove(fh);
    }

    /// Fills the node-local cache with the whole file `ino` (a load onto the node, asked
    /// for through the `user.granary.fill` attribute), so its next open is passthrough.
    /// Says whether it is complete here (an empty file never is: there is nothing to read).
    pub async fn fill_node(&self, ino: u64) -> Result<bool, FsError> {
        let info = self.fresh_info(ino).await?;
        if info.is_dir {
            return Err(FsError::IsADirectory(info.path.clone()));
        }
        let result = match self.inner.fetcher.fill_local(&info).await {
            // A version gone from the store: fill the current one.
            Err(FsError::Changed(_)) => match self.refresh_inode(ino, &info.path).await? {
                current if current.is_dir => Err(FsError::IsADirectory(current.path.clone())),
                current => self.inner.fetcher.fill_local(&current).await,
            },
            other => other,
        };
        let label = match &result {
            Ok(_) => "complete",
            Err(FsError::NoRoom(_)) => "no_room",
            Err(_) => "failed",
        };
        self.count_node_fill(label);
        if let Err(e @ FsError::Io { .. }) = &result {
            tracing::warn!(path = %info.path, error = %e, "a load onto the node failed");
        }
        result
    }

    /// Reserves room for the whole file `ino` in the node-local cache (`user.granary.reserve`,
    /// a load's first step): `Some(true)` when it is there already, `Some(false)` reserved,
    /// `None` for an empty file; `NoRoom` when it does not fit.
    pub async fn reserve_node(&self, ino: u64) -> Result<Option<bool>, FsError> {
        let info = self.fresh_info(ino).await?;
        if info.is_dir {
            return Err(FsError::IsADirectory(info.path.clone()));
        }
        let result = self.inner.fetcher.reserve_local(&info);
        if let Err(FsError::NoRoom(_)) = &result {
            self.count_node_fill("no_room");
        }
        Ok(result?.map(|slot| slot == super::local_files::LoadSlot::Complete))
    }

    fn count_node_fill(&self, result: &'static str) {
        self.inner
            .fetcher
            .metrics
            .node_fills
            .get_or_create(&crate::metrics::dataset::ResultLabel { result })
            .inc();
    }

    /// Bytes the node-local cache holds and its size; `None` without one.
    pub fn node_cache_usage(&self) -> Option<(u64, u64)> {
        self.inner.fetcher.local.as_ref().map(|local| local.usage())
    }

    /// Inodes the kernel holds (for statfs).
    pub fn inode_count(&self) -> u64 {
        self.inner.inodes.len() as u64
    }

    /// `access`: everything may be read, nothing written.
    pub fn access(&self, write: bool) -> Result<(), FsError> {
        if write {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }
}

/// The version a read is for, and its readahead decision (none when it is past the end).
fn plan_read(file: &OpenFile, offset: u64, size: u32) -> (Arc<FileInfo>, Option<super::readahead::Ahead>) {
    let info = file.info();
    let end = offset.saturating_add(size as u64).min(info.size);
    if offset >= end {
        return (info, None);
    }
    let ahead = file
        .readahead
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .on_read(offset, end - offset);
    (info, Some(ahead))
}

/// A sequential reader that has read a block to its end will not read it again (and the
/// kernel's page cache serves any re-read): its memory goes first to the blocks ahead, which
/// least-recently-used order would otherwise evict first. It is demoted, not dropped: the
/// kernel's reads of one stream run concurrently, and one for an earlier part of the block
/// may arrive after this one (dropping it made that read fetch the block again).
fn drop_behind(fetcher: &BlockFetcher, info: &FileInfo, end: u64) {
    let bs = info.block_size.max(1);
    let index = (end - 1) / bs;
    if block_range(info.size, bs, index).end == end {
        fetcher
            .cache
            .demote(&granary_cache::block::BlockName::of(&info.path, &info.version, index));
    }
}

/// Copies `range` of a file out of its blocks, fetching them concurrently.
async fn read_range(fetcher: &Arc<BlockFetcher>, info: &FileInfo, start: u64, end: u64) -> Result<Bytes, FsError> {
    let bs = info.block_size.max(1);
    let first = start / bs;
    let last = (end - 1) / bs;
    if first == last {
        let block = fetcher.block(info, first).await?;
        let base = block_range(info.size, bs, first).start;
        let (from, to) = ((start - base) as usize, (end - base) as usize);
        if to > block.len() {
            return Err(FsError::Io {
                path: info.path.clone(),
                cause: format!("block {first} is {} bytes, expected at least {to}", block.len()),
            });
        }
        return Ok(block.slice(from..to));
    }
    let blocks = futures::future::try_join_all((first..=last).map(|i| fetcher.block(info, i))).await?;
    let mut out = Vec::with_capacity((end - start) as usize);
    for (i, block) in (first..=last).zip(blocks) {
        let r = block_range(info.size, bs, i);
        let from = start.max(r.start) - r.start;
        let to = end.min(r.end) - r.start;
        if to as usize > block.len() {
            return Err(FsError::Io {
                path: info.path.clone(),
                cause: format!("block {i} is {} bytes, expected {}", block.len(), r.end - r.start),
            });
        }
        out.extend_from_slice(&block[from as usize..to as usize]);
    }
    Ok(Bytes::from(out))
}
