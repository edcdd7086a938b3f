//! The dataset filesystem as fuser sees it: each kernel request becomes a call of
//! [`DatasetFs`] on the async runtime (so a slow fetch never holds a FUSE thread and many
//! reads run at once), its result a reply, and every answer a metric. Nothing here decides
//! what a request means.

use crate::fs_core::ToErrno;
use std::ffi::OsStr;
use std::time::Instant;

use fuser::{
    AccessFlags, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;

use super::error::FsError;
use super::filesystem::{DatasetFs, OpenedFile};
use super::kernel_pages::PageCacheMode;
use super::node_fill::xattr as granary_xattr;
use crate::metrics::dataset::{ErrnoLabel, OpLabel, OriginLabel};

pub struct DatasetFuse {
    fs: DatasetFs,
    runtime: Handle,
    want_passthrough: bool,
}

impl DatasetFuse {
    pub fn new(fs: DatasetFs, runtime: Handle, want_passthrough: bool) -> Self {
        DatasetFuse {
            fs,
            runtime,
            want_passthrough,
        }
    }
}

/// Counts an answer and its time, and logs the errors an operator must see.
fn observe(fs: &DatasetFs, op: &'static str, started: Instant, result: Result<(), &FsError>) {
    let m = fs.metrics();
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

impl Filesystem for DatasetFuse {
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
            crate::fs_core::session::offer_passthrough(
                config,
                &self.fs.passthrough_flag(),
                "locally cached files are read through the daemon",
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let started = Instant::now();
        let (fs, name) = (self.fs.clone(), name.to_owned());
        self.runtime.spawn(async move {
            match fs.lookup(parent.0, &name).await {
                Ok(entry) => {
                    reply.entry(&entry.ttl, &entry.attr, Generation(0));
                    observe(&fs, "lookup", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "lookup", started, Err(&e));
                }
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let started = Instant::now();
        let fs = self.fs.clone();
        self.runtime.spawn(async move {
            match fs.getattr(ino.0).await {
                Ok(entry) => {
                    reply.attr(&entry.ttl, &entry.attr);
                    observe(&fs, "getattr", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "getattr", started, Err(&e));
                }
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        let fs = self.fs.clone();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        self.runtime.spawn(async move {
            match fs.open(ino.0, write, |file| reply.open_backing(file)).await {
                Ok(opened) => {
                    // Counted before the reply: a reader (or a test) that sees the open done
                    // sees it counted.
                    let how = match opened {
                        OpenedFile::Passthrough { .. } => "passthrough",
                        OpenedFile::Cached { .. } => "fuse",
                    };
                    fs.metrics().opens.get_or_create(&OriginLabel { origin: how }).inc();
                    match opened {
                        OpenedFile::Passthrough { fh, backing } => {
                            // No FOPEN_KEEP_CACHE: the kernel refuses it on a passthrough open.
                            reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing);
                        }
                        OpenedFile::Cached { fh, pages } => {
                            let flags = match pages {
                                PageCacheMode::Keep => FopenFlags::FOPEN_KEEP_CACHE,
                                // The kernel drops the inode's pages at an open without KEEP_CACHE.
                                PageCacheMode::Drop => FopenFlags::empty(),
                                PageCacheMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
                            };
                            reply.opened(FileHandle(fh), flags);
                        }
                    }
                    observe(&fs, "open", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "open", started, Err(&e));
                }
            }
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
        let fs = self.fs.clone();
        // Called here, on the FUSE thread: readahead is decided in the kernel's order.
        let read = self.fs.read(ino.0, fh.0, offset, size);
        self.runtime.spawn(async move {
            match read.await {
                Ok(data) => {
                    reply.data(&data);
                    observe(&fs, "read", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "read", started, Err(&e));
                }
            }
        });
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
        let started = Instant::now();
        self.fs.release(fh.0);
        reply.ok();
        observe(&self.fs, "release", started, Ok(()));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let started = Instant::now();
        let fs = self.fs.clone();
        self.runtime.spawn(async move {
            match fs.opendir(ino.0).await {
                Ok(fh) => {
                    reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                    );
                    observe(&fs, "opendir", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "opendir", started, Err(&e));
                }
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let started = Instant::now();
        let fs = self.fs.clone();
        self.runtime.spawn(async move {
            let walked = fs
                .readdir(ino.0, fh.0, offset, false, |item| {
                    reply.add(INodeNo(item.ino), item.next, item.kind, item.name)
                })
                .await;
            match walked {
                Ok(()) => {
                    reply.ok();
                    observe(&fs, "readdir", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "readdir", started, Err(&e));
                }
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let started = Instant::now();
        let fs = self.fs.clone();
        let ttl = self.fs.kernel_ttl();
        self.runtime.spawn(async move {
            let walked = fs
                .readdir(ino.0, fh.0, offset, true, |item| match &item.attr {
                    Some(attr) => reply.add(INodeNo(item.ino), item.next, item.name, &ttl, attr, Generation(0)),
                    None => false,
                })
                .await;
            match walked {
                Ok(()) => {
                    reply.ok();
                    observe(&fs, "readdirplus", started, Ok(()));
                }
                Err(e) => {
                    reply.error(e.errno());
                    observe(&fs, "readdirplus", started, Err(&e));
                }
            }
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A dataset is a window on a store, not a disk that fills: as Mountpoint for S3 does,
        // it reports nothing used and a nominal 1 PiB (and 2^32 inodes) free, so the
        // kubelet's volume stats never trip a "volume filling up" alert. Writes are refused
        // with EROFS regardless.
        const NOMINAL_BLOCKS: u64 = 1 << 38;
        const NOMINAL_FREE_INODES: u64 = 1 << 32;
        let bsize = 4096u32;
        let files = self.fs.inode_count().saturating_add(NOMINAL_FREE_INODES);
        reply.statfs(
            NOMINAL_BLOCKS,
            NOMINAL_BLOCKS,
            NOMINAL_BLOCKS,
            files,
            NOMINAL_FREE_INODES,
            bsize,
            255,
            bsize,
        );
    }

    /// Attributes of the mount's own, asked for by `granary-cache load --mount` (the
    /// mount is read-only, so they are read, not set): `user.granary.reserve` of a file
    /// reserves its room in the node-local cache, `user.granary.fill` fills it and answers
    /// when it is complete; `user.granary.node-cache` of any inode is "<used bytes> <size
    /// bytes>" of that cache (`node_fill::xattr`).
    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let started = Instant::now();
        let fs = self.fs.clone();
        let name = name.to_owned();
        self.runtime.spawn(async move {
            let value = match name.to_str() {
                Some(granary_xattr::FILL) => fs.fill_node(ino.0).await.map(|complete| {
                    if complete {
                        granary_xattr::COMPLETE.to_vec()
                    } else {
                        granary_xattr::EMPTY.to_vec()
                    }
                }),
                Some(granary_xattr::RESERVE) => fs.reserve_node(ino.0).await.map(|found| match found {
                    Some(true) => granary_xattr::COMPLETE.to_vec(),
                    Some(false) => granary_xattr::RESERVED.to_vec(),
                    None => granary_xattr::EMPTY.to_vec(),
                }),
                Some(granary_xattr::NODE_CACHE) => match fs.node_cache_usage() {
                    Some((used, size)) => Ok(format!("{used} {size}").into_bytes()),
                    None => Err(FsError::NoNodeCache),
                },
                _ => Err(FsError::NoAttribute),
            };
            match value {
                Ok(value) if size == 0 => reply.size(value.len() as u32),
                Ok(value) if value.len() > size as usize => reply.error(fuser::Errno::ERANGE),
                Ok(value) => reply.data(&value),
                Err(e) => {
                    reply.error(e.errno());
                    if !matches!(e, FsError::NoAttribute) {
                        observe(&fs, "getxattr", started, Err(&e));
                    }
                    return;
                }
            }
            observe(&fs, "getxattr", started, Ok(()));
        });
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.fs.access(mask.contains(AccessFlags::W_OK)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }
}
