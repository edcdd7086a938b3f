//! The FUSE filesystem of a dataset: kernel requests in, answers out. Each request is
//! answered from memory when it can be, and otherwise on the async runtime, so a slow
//! fetch never holds a FUSE thread and many reads run at once.

use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use super::block_fetch::BlockFetcher;
use super::error::FsError;
use super::handles::Handles;
use super::inodes::{Inodes, ROOT};
use super::io_modes::{IoModes, Opened};
use super::metadata::{name_of, parent_of, DirListing, Metadata};
use super::readahead::Readahead;
use super::warm_ahead::WarmAhead;
use crate::metrics::dataset::{ErrnoLabel, OpLabel, OriginLabel};
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
    info: FileInfo,
    readahead: Mutex<Readahead>,
    ino: u64,
}

/// What the request tasks need of the filesystem besides its data: attributes and metrics.
struct Shared {
    ownership: Ownership,
    metrics: Arc<crate::metrics::FuseMetrics>,
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

pub struct DatasetFs {
    pub(super) runtime: Handle,
    pub(super) metadata: Arc<Metadata>,
    pub(super) fetcher: Arc<BlockFetcher>,
    warm_ahead: Arc<WarmAhead>,
    inodes: Arc<Inodes>,
    files: Arc<Handles<OpenFile>>,
    dirs: Arc<Handles<OpenDir>>,
    io_modes: Arc<IoModes>,
    shared: Arc<Shared>,
    want_passthrough: bool,
    /// Passthrough was asked for, and the kernel agreed at init.
    passthrough: Arc<AtomicBool>,
    max_readahead: u64,
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

impl DatasetFs {
    // The parts build_fs assembles, one argument each; a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        runtime: Handle,
        metadata: Arc<Metadata>,
        fetcher: Arc<BlockFetcher>,
        warm_ahead: Arc<WarmAhead>,
        ownership: Ownership,
        passthrough: bool,
        max_readahead: u64,
        incarnation: Incarnation,
    ) -> Self {
        let shared = Arc::new(Shared {
            ownership,
            metrics: Arc::clone(&fetcher.metrics),
        });
        DatasetFs {
            runtime,
            metadata,
            fetcher,
            warm_ahead,
            inodes: Arc::new(incarnation.inodes),
            files: Arc::new(Handles::with_epoch(incarnation.epoch)),
            dirs: Arc::new(Handles::with_epoch(incarnation.epoch)),
            io_modes: Arc::new(IoModes::default()),
            shared,
            want_passthrough: passthrough,
            passthrough: Arc::new(AtomicBool::new(incarnation.passthrough.unwrap_or(false))),
            max_readahead,
        }
    }

    /// Whether the kernel agreed to passthrough (shared with the mount, which hands it on).
    pub fn passthrough_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.passthrough)
    }

    fn observer(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    fn observe(&self, op: &'static str, started: Instant, result: Result<(), &FsError>) {
        self.shared.observe(op, started, result)
    }

    /// What the kernel's inode `ino` is, with attributes refreshed when they are stale.
    async fn fresh_info(metadata: &Metadata, inodes: &Inodes, ino: u64) -> Result<Arc<FileInfo>, FsError> {
        let known = inodes.get(ino).ok_or(FsError::Stale(ino))?;
        let info = metadata.stat(&known.path).await?;
        if !Arc::ptr_eq(&info, &known) {
            inodes.update(ino, Arc::clone(&info));
        }
        Ok(info)
    }
}

/// The open file behind `fh`; a handle the previous daemon gave out (before a restart) is
/// taken over from its inode.
async fn open_file_of(
    files: &Handles<OpenFile>,
    metadata: &Metadata,
    inodes: &Inodes,
    fh: u64,
    ino: u64,
    max_readahead: u64,
) -> Result<Arc<OpenFile>, FsError> {
    if let Some(file) = files.get(fh) {
        return Ok(file);
    }
    if !files.is_inherited(fh) {
        return Err(FsError::Stale(fh));
    }
    let info = DatasetFs::fresh_info(metadata, inodes, ino).await?;
    Ok(files.adopt(
        fh,
        OpenFile {
            info: (*info).clone(),
            readahead: Mutex::new(Readahead::new(info.block_size, max_readahead)),
            ino,
        },
    ))
}

/// The open directory behind `fh`, taken over like [`open_file_of`].
async fn open_dir_of(
    dirs: &Handles<OpenDir>,
    metadata: &Metadata,
    inodes: &Inodes,
    fh: u64,
    ino: u64,
) -> Result<Arc<OpenDir>, FsError> {
    if let Some(dir) = dirs.get(fh) {
        return Ok(dir);
    }
    if !dirs.is_inherited(fh) {
        return Err(FsError::Stale(fh));
    }
    let info = DatasetFs::fresh_info(metadata, inodes, ino).await?;
    Ok(dirs.adopt(
        fh,
        OpenDir {
            listing: metadata.listing(&info.path),
            path: info.path.clone(),
            ino,
        },
    ))
}

impl Shared {
    fn attr(&self, ino: u64, info: &FileInfo) -> FileAttr {
        let mtime = UNIX_EPOCH + Duration::from_nanos(info.mtime_unix_nanos.max(0) as u64);
        let (kind, perm, nlink) = if info.is_dir {
            (FileType::Directory, 0o555, 2)
        } else {
            (FileType::RegularFile, 0o444, 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: info.size,
            blocks: info.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.ownership.uid,
            gid: self.ownership.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        }
    }

    fn observe(&self, op: &'static str, started: Instant, result: Result<(), &FsError>) {
        let m = &self.metrics;
        m.ops.get_or_create(&OpLabel { op }).inc();
        m.op_duration
            .get_or_create(&OpLabel { op })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            if let FsError::Io { .. } | FsError::PermissionDenied { .. } = e {
                tracing::warn!(op, error = %e, "answering with an error");
            }
            m.op_errors
                .get_or_create(&ErrnoLabel {
                    op,
                    errno: e.errno().code(),
                })
                .inc();
        }
    }
}

/// A sequential reader that has read a block to its end will not read it again (and the
/// kernel's page cache serves any re-read): free its memory for the blocks ahead, which
/// least-recently-used order would otherwise evict first.
fn drop_behind(fetcher: &BlockFetcher, info: &FileInfo, end: u64) {
    let bs = info.block_size.max(1);
    let index = (end - 1) / bs;
    if block_range(info.size, bs, index).end == end {
        fetcher
            .cache
            .remove(&granary_cache::block::BlockName::of(&info.path, &info.version, index));
    }
}

/// Answers one read of an open file: decides readahead in the kernel's order, then fetches on
/// the runtime.
#[allow(clippy::too_many_arguments)]
fn serve_read(
    file: Arc<OpenFile>,
    offset: u64,
    size: u32,
    fetcher: Arc<BlockFetcher>,
    this: Arc<Shared>,
    runtime: &Handle,
    reply: ReplyData,
    started: Instant,
) {
    let info = &file.info;
    let end = offset.saturating_add(size as u64).min(info.size);
    if offset >= end {
        reply.data(&[]);
        return;
    }
    // Decided here, in the kernel's order, before the requests run concurrently.
    let ahead = file
        .readahead
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .on_read(offset, end - offset);
    runtime.spawn(async move {
        let info = &file.info;
        let fetch = ahead.fetch.start..ahead.fetch.end.min(info.size);
        if !fetch.is_empty() {
            let bs = info.block_size.max(1);
            for index in (fetch.start / bs)..=((fetch.end - 1) / bs) {
                fetcher.prefetch(info, index);
            }
        }
        match read_range(&fetcher, info, offset, end).await {
            Ok(data) => {
                reply.data(&data);
                if ahead.streaming {
                    drop_behind(&fetcher, info, end);
                }
                this.metrics.reply_bytes.inc_by(data.len() as u64);
                this.observe("read", started, Ok(()));
            }
            Err(e) => {
                tracing::warn!(path = %info.path, offset, error = %e, "read failed");
                reply.error(e.errno());
                this.observe("read", started, Err(&e));
            }
        }
    });
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

impl Filesystem for DatasetFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if let Err(missing) = config.add_capabilities(flag) {
                tracing::debug!(?missing, "the kernel does not offer a FUSE capability");
            }
        }
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if self.want_passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    let _ = config.set_max_stack_depth(1);
                    self.passthrough.store(true, Ordering::Release);
                }
                Err(_) => tracing::info!(
                    "this kernel does not offer FUSE passthrough (Linux 6.9+); locally cached files are read through the daemon"
                ),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let started = Instant::now();
        let Some(parent_info) = self.inodes.get(parent.0) else {
            reply.error(Errno::ESTALE);
            return;
        };
        let path = match child_path(&parent_info.path, name) {
            Ok(p) => p,
            Err(e) => {
                reply.error(e.errno());
                return;
            }
        };
        let metadata = Arc::clone(&self.metadata);
        let inodes = Arc::clone(&self.inodes);
        let this = self.observer();
        let ttl = metadata.kernel_ttl();
        self.runtime.spawn(async move {
            match metadata.stat(&path).await {
                Ok(info) => {
                    let ino = inodes.remember(Arc::clone(&info));
                    reply.entry(&ttl, &this.attr(ino, &info), Generation(0));
                    this.observe("lookup", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("lookup", started, Err(&e));
                }
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let started = Instant::now();
        let metadata = Arc::clone(&self.metadata);
        let inodes = Arc::clone(&self.inodes);
        let this = self.observer();
        self.runtime.spawn(async move {
            match DatasetFs::fresh_info(&metadata, &inodes, ino.0).await {
                Ok(info) => {
                    reply.attr(&metadata.kernel_ttl(), &this.attr(ino.0, &info));
                    this.observe("getattr", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("getattr", started, Err(&e));
                }
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            reply.error(FsError::ReadOnly.errno());
            self.observe("open", started, Err(&FsError::ReadOnly));
            return;
        }
        let metadata = Arc::clone(&self.metadata);
        let inodes = Arc::clone(&self.inodes);
        let files = Arc::clone(&self.files);
        let io_modes = Arc::clone(&self.io_modes);
        let this = self.observer();
        let passthrough = self.passthrough.load(Ordering::Acquire);
        let max_ra = self.max_readahead;
        let local = self.fetcher.local.clone();
        let warm_ahead = Arc::clone(&self.warm_ahead);
        self.runtime.spawn(async move {
            let info = match DatasetFs::fresh_info(&metadata, &inodes, ino.0).await {
                Ok(info) if info.is_dir => Err(FsError::IsADirectory(info.path.clone())),
                other => other,
            };
            let info = match info {
                Ok(info) => info,
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("open", started, Err(&e));
                    return;
                }
            };
            if info.size <= info.block_size {
                let dir = parent_of(&info.path);
                warm_ahead.opened(dir, || metadata.listing(dir));
            }
            // A file wholly in the node-local cache is read by the kernel from that file.
            let local_file = if passthrough {
                local.as_ref().and_then(|l| l.open_complete(&info))
            } else {
                None
            };
            let opened = io_modes.open(ino.0, || {
                let file = local_file?;
                match reply.open_backing(&file) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::warn!(path = %info.path, error = %e, "the kernel refused a passthrough backing file; reading through the daemon");
                        None
                    }
                }
            });
            let fh = files.insert(OpenFile {
                info: (*info).clone(),
                readahead: Mutex::new(Readahead::new(info.block_size, max_ra)),
                ino: ino.0,
            });
            let how = match opened {
                Opened::Passthrough(id) => {
                    // No FOPEN_KEEP_CACHE: the kernel refuses it on a passthrough open.
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                    "passthrough"
                }
                Opened::Cached => {
                    // Blocks of a version never change, so the page cache may outlive this open.
                    reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
                    "fuse"
                }
            };
            this.metrics.opens.get_or_create(&OriginLabel { origin: how }).inc();
            this.observe("open", started, Ok(()));
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let started = Instant::now();
        let Some(file) = self.files.get(fh.0) else {
            if !self.files.is_inherited(fh.0) {
                reply.error(Errno::EBADF);
                return;
            }
            // Opened before this daemon took the mount over: rebuild the handle first.
            let (files, metadata, inodes) = (
                Arc::clone(&self.files),
                Arc::clone(&self.metadata),
                Arc::clone(&self.inodes),
            );
            let (fetcher, this, max_ra) = (Arc::clone(&self.fetcher), self.observer(), self.max_readahead);
            let runtime = self.runtime.clone();
            self.runtime.spawn(async move {
                match open_file_of(&files, &metadata, &inodes, fh.0, ino.0, max_ra).await {
                    Ok(file) => serve_read(file, offset, size, fetcher, this, &runtime, reply, started),
                    Err(e) => {
                        reply.error(e.errno());
                        this.observe("read", started, Err(&e));
                    }
                }
            });
            return;
        };
        serve_read(
            file,
            offset,
            size,
            Arc::clone(&self.fetcher),
            self.observer(),
            &self.runtime,
            reply,
            started,
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(file) = self.files.remove(fh.0) {
            self.io_modes.release(file.ino);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        let metadata = Arc::clone(&self.metadata);
        let inodes = Arc::clone(&self.inodes);
        let dirs = Arc::clone(&self.dirs);
        let this = self.observer();
        self.runtime.spawn(async move {
            let info = match DatasetFs::fresh_info(&metadata, &inodes, ino.0).await {
                Ok(info) if !info.is_dir => Err(FsError::NotADirectory(info.path.clone())),
                other => other,
            };
            match info {
                Ok(info) => {
                    let listing = metadata.listing(&info.path);
                    let fh = dirs.insert(OpenDir {
                        listing,
                        path: info.path.clone(),
                        ino: ino.0,
                    });
                    reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                    );
                    this.observe("opendir", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("opendir", started, Err(&e));
                }
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let started = Instant::now();
        let (dirs, metadata) = (Arc::clone(&self.dirs), Arc::clone(&self.metadata));
        let inodes = Arc::clone(&self.inodes);
        let this = self.observer();
        self.runtime.spawn(async move {
            let dir = match open_dir_of(&dirs, &metadata, &inodes, fh.0, ino.0).await {
                Ok(dir) => dir,
                Err(e) => {
                    reply.error(e.errno());
                    return;
                }
            };
            let parent = inodes.peek(parent_of(&dir.path)).unwrap_or(ROOT);
            let walked = walk_dir(&dir, offset, |entry, next| match entry {
                DirEntry::Dot => reply.add(INodeNo(dir.ino), next, FileType::Directory, "."),
                DirEntry::DotDot => reply.add(INodeNo(parent), next, FileType::Directory, ".."),
                DirEntry::Listed(info) => {
                    // Plain readdir takes no inode reference: known inodes keep their number,
                    // others get a stand-in from the path's hash.
                    let ino = inodes.peek(&info.path).unwrap_or_else(|| stand_in_ino(&info.path));
                    reply.add(INodeNo(ino), next, file_type(&info), name_of(&info.path))
                }
            })
            .await;
            match walked {
                Ok(()) => {
                    reply.ok();
                    this.observe("readdir", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("readdir", started, Err(&e));
                }
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let started = Instant::now();
        let (dirs, metadata) = (Arc::clone(&self.dirs), Arc::clone(&self.metadata));
        let inodes = Arc::clone(&self.inodes);
        let ttl = self.metadata.kernel_ttl();
        let this = self.observer();
        self.runtime.spawn(async move {
            let dir = match open_dir_of(&dirs, &metadata, &inodes, fh.0, ino.0).await {
                Ok(dir) => dir,
                Err(e) => {
                    reply.error(e.errno());
                    return;
                }
            };
            let parent = inodes.peek(parent_of(&dir.path)).unwrap_or(ROOT);
            let walked = walk_dir(&dir, offset, |entry, next| match entry {
                // "." and ".." carry attributes but take no reference.
                DirEntry::Dot => match inodes.get(dir.ino) {
                    Some(info) => reply.add(
                        INodeNo(dir.ino),
                        next,
                        ".",
                        &ttl,
                        &this.attr(dir.ino, &info),
                        Generation(0),
                    ),
                    None => false,
                },
                DirEntry::DotDot => {
                    let info = inodes.get(parent).unwrap_or_else(|| Arc::new(root_info()));
                    reply.add(
                        INodeNo(parent),
                        next,
                        "..",
                        &ttl,
                        &this.attr(parent, &info),
                        Generation(0),
                    )
                }
                DirEntry::Listed(info) => {
                    let ino = inodes.remember(Arc::clone(&info));
                    let full = reply.add(
                        INodeNo(ino),
                        next,
                        name_of(&info.path),
                        &ttl,
                        &this.attr(ino, &info),
                        Generation(0),
                    );
                    if full {
                        // It did not fit: the kernel got no reference to it.
                        inodes.forget(ino, 1);
                    }
                    full
                }
            })
            .await;
            match walked {
                Ok(()) => {
                    reply.ok();
                    this.observe("readdirplus", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    this.observe("readdirplus", started, Err(&e));
                }
            }
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.remove(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A dataset has no free space (it is read-only); the sizes are nominal so `df` shows it.
        let bsize = 4096u32;
        reply.statfs(1 << 38, 0, 0, self.inodes.len() as u64, 0, bsize, 255, bsize);
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(FsError::NoAttribute.errno());
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            reply.error(FsError::ReadOnly.errno());
        } else {
            reply.ok();
        }
    }
}

/// An entry as readdir hands it out.
enum DirEntry {
    Dot,
    DotDot,
    Listed(Arc<FileInfo>),
}

fn file_type(info: &FileInfo) -> FileType {
    if info.is_dir {
        FileType::Directory
    } else {
        FileType::RegularFile
    }
}

/// Walks an open directory from the kernel's `offset`, giving `add` each entry with the
/// offset that comes after it, until `add` says the reply is full. Offsets: 1 is ".", 2 is
/// "..", 3 + i is entry i of the listing, which is waited for while it streams in.
async fn walk_dir(dir: &OpenDir, offset: u64, mut add: impl FnMut(DirEntry, u64) -> bool) -> Result<(), FsError> {
    if offset == 0 && add(DirEntry::Dot, 1) {
        return Ok(());
    }
    if offset <= 1 && add(DirEntry::DotDot, 2) {
        return Ok(());
    }
    let mut index = offset.saturating_sub(2) as usize;
    loop {
        let batch = dir.listing.entries_from(index, READDIR_BATCH).await?;
        if batch.is_empty() {
            return Ok(());
        }
        for info in batch {
            index += 1;
            if add(DirEntry::Listed(info), index as u64 + 2) {
                return Ok(());
            }
        }
    }
}

/// An inode number for an entry the kernel holds no reference to, outside the range the
/// inode table hands out.
fn stand_in_ino(path: &str) -> u64 {
    (1 << 63) | (xxhash_rust::xxh3::xxh3_64(path.as_bytes()) >> 1)
}
