//! A checkpoint volume as fuser sees it: each kernel request becomes a call of
//! [`CheckpointFs`]; an answer that is ready (local state) is sent from the FUSE thread, one
//! that waits for the store or for room runs on the async runtime. Nothing here decides what a
//! request means.

use crate::fs_core::ToErrno;
use std::ffi::OsStr;
use std::time::SystemTime;

use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;

use super::error::CkptFsError;
use super::filesystem::{Caller, CheckpointFs, SetAttr, Step, ATTR_TTL};
use crate::fs_core::io_modes::Opened;

pub struct CheckpointFuse {
    fs: CheckpointFs,
    runtime: Handle,
    want_passthrough: bool,
}

impl CheckpointFuse {
    pub fn new(fs: CheckpointFs, runtime: Handle, want_passthrough: bool) -> Self {
        CheckpointFuse {
            fs,
            runtime,
            want_passthrough,
        }
    }

    /// Sends `step`'s answer through `reply` now, or once it is ready.
    fn answer<T: Send + 'static, R: Send + 'static>(
        &self,
        op: &'static str,
        step: Step<T>,
        reply: R,
        ok: impl FnOnce(R, T) + Send + 'static,
        err: impl FnOnce(R, Errno) + Send + 'static,
    ) {
        match step {
            Step::Ready(Ok(v)) => ok(reply, v),
            Step::Ready(Err(e)) => err(reply, fail(op, &e)),
            Step::Pending(f) => {
                self.runtime.spawn(async move {
                    match f.await {
                        Ok(v) => ok(reply, v),
                        Err(e) => err(reply, fail(op, &e)),
                    }
                });
            }
        }
    }
}

/// The errno of `e`, logged unless it is an answer applications expect.
fn fail(op: &'static str, e: &CkptFsError) -> Errno {
    match e {
        CkptFsError::NotFound(_)
        | CkptFsError::Exists(_)
        | CkptFsError::NotEmpty(_)
        | CkptFsError::BadHandle(_)
        | CkptFsError::WriteFailed(_) => {}
        _ => tracing::warn!(op, error = %e, "checkpoint volume operation failed"),
    }
    e.errno()
}

fn empty(op: &'static str, reply: ReplyEmpty, result: Result<(), CkptFsError>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(fail(op, &e)),
    }
}

impl Filesystem for CheckpointFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_BIG_WRITES] {
            let _ = config.add_capabilities(flag);
        }
        // The kernel's write-back cache turns many small writes into 1 MiB requests sent
        // behind the writer: close() of a 2 GiB checkpoint went from 4.5 s to 2.0 s. The
        // kernel never combines it with passthrough, so with it, reads go through the daemon
        // (measured at local-disk speed for restores).
        let writeback_cache = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE).is_ok();
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        if self.want_passthrough && !writeback_cache {
            crate::fs_core::session::offer_passthrough(
                config,
                &self.fs.passthrough_flag(),
                "restores are read through the daemon",
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.answer(
            "lookup",
            self.fs.lookup(parent.0, name),
            reply,
            |r, attr| r.entry(&ATTR_TTL, &attr, Generation(0)),
            |r, e| r.error(e),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.answer(
            "getattr",
            self.fs.getattr(ino.0, fh.map(|fh| fh.0)),
            reply,
            |r, attr| r.attr(&ATTR_TTL, &attr),
            |r, e| r.error(e),
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        };
        self.answer(
            "setattr",
            self.fs.setattr(ino.0, fh.map(|fh| fh.0), set),
            reply,
            |r, attr| r.attr(&ATTR_TTL, &attr),
            |r, e| r.error(e),
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.fs.mkdir(parent.0, name, mode, umask, caller) {
            Ok(attr) => reply.entry(&ATTR_TTL, &attr, Generation(0)),
            Err(e) => reply.error(fail("mkdir", &e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.answer(
            "unlink",
            self.fs.unlink(parent.0, name),
            reply,
            |r, ()| r.ok(),
            |r, e| r.error(e),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.answer(
            "rmdir",
            self.fs.rmdir(parent.0, name),
            reply,
            |r, ()| r.ok(),
            |r, e| r.error(e),
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            return reply.error(CkptFsError::Unsupported("RENAME_EXCHANGE").errno());
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.answer(
            "rename",
            self.fs.rename(parent.0, name, newparent.0, newname, noreplace),
            reply,
            |r, ()| r.ok(),
            |r, e| r.error(e),
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let caller = Caller {
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.fs.create(parent.0, name, mode, umask, flags, caller) {
            Ok((attr, fh)) => reply.created(&ATTR_TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("create", &e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let writable = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let truncate = writable && flags.0 & libc::O_TRUNC != 0;
        self.runtime.spawn(async move {
            match fs
                .open(ino.0, writable, truncate, |file| reply.open_backing(file))
                .await
            {
                Ok((fh, Opened::Passthrough(id))) => reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id),
                Ok((fh, Opened::Cached)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(fail("open", &e)),
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
        match self.fs.read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fail("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.answer(
            "write",
            self.fs.write(ino.0, fh.0, offset, data),
            reply,
            |r, n| r.written(n),
            |r, e| r.error(e),
        );
    }

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        empty("flush", reply, self.fs.flush(ino.0, fh.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(ino.0, fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty("fsync", reply, self.fs.fsync(ino.0, fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.answer(
            "opendir",
            self.fs.opendir(ino.0),
            reply,
            |r, fh| r.opened(FileHandle(fh), FopenFlags::empty()),
            |r, e| r.error(e),
        );
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        let fs = self.fs.clone();
        self.answer(
            "readdir",
            self.fs.dir(ino.0, fh.0),
            reply,
            move |mut r, dir| {
                fs.fill_dir(&dir, ino.0, offset, |ino, next, kind, name| {
                    r.add(INodeNo(ino), next, kind, name)
                });
                r.ok();
            },
            |r, e| r.error(e),
        );
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, s.free, s.free, 0, 0, s.bsize, 255, s.bsize);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }
}
