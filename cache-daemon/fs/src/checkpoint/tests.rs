//! A checkpoint volume's logic without FUSE or root: the calls the adapter makes, against a
//! target store in a temporary directory and a write-back area beside it.

use crate::fs_core::ToErrno;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileType};
use prometheus_client::registry::Registry;

use super::error::CkptFsError;
use super::filesystem::{Caller, CheckpointFs, CtxParts, Incarnation, SetAttr};
use super::inodes::{PathInodes, ROOT};
use super::store_view::StoreView;
use super::tracker::Tracker;
use crate::metrics::CheckpointMetrics;
use granary_store::source::SourceTuning;
use granary_store::target::TargetStore;

const ME: Caller = Caller { uid: 0, gid: 0 };

struct Env {
    _dir: tempfile::TempDir,
    store: PathBuf,
    tracker: Arc<Tracker>,
    fs: CheckpointFs,
    runtime: tokio::runtime::Runtime,
}

/// A volume whose write-back area holds `limit` bytes, over an empty target store.
fn env(limit: u64) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let area = dir.path().join("area");
    std::fs::create_dir_all(&store).expect("store");
    std::fs::create_dir_all(area.join("files")).expect("area");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let target = TargetStore::open(
        &format!("fs://{}", store.display()),
        &Default::default(),
        &SourceTuning::default(),
    )
    .expect("target");
    let (tracker, _) = Tracker::open(
        &area.join("journal.jsonl"),
        &area.join("files"),
        limit,
        Some(".metadata".into()),
    )
    .expect("tracker");
    let tracker = Arc::new(tracker);
    let mut registry = Registry::default();
    let fs = CheckpointFs::new(CtxParts {
        incarnation: Incarnation {
            inodes: PathInodes::default(),
            epoch: 0,
            passthrough: None,
        },
        tracker: Arc::clone(&tracker),
        view: Arc::new(StoreView::new(target.clone(), Duration::ZERO)),
        target,
        metrics: Arc::new(CheckpointMetrics::register(&mut registry)),
        part_size: 5 << 20,
        concurrency: 2,
        peer: None,
        streams: None,
    });
    Env {
        _dir: dir,
        store,
        tracker,
        fs,
        runtime,
    }
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

impl Env {
    fn wait<T>(&self, step: super::filesystem::Step<T>) -> Result<T, CkptFsError> {
        self.runtime.block_on(step.wait())
    }

    /// Writes `bytes` to a new file `file` in `parent` and closes it; returns its inode.
    fn write_file(&self, parent: u64, file: &str, bytes: &[u8]) -> u64 {
        let (attr, fh) = self.fs.create(parent, name(file), 0o644, 0o022, 0, ME).expect("create");
        let ino = attr.ino.0;
        assert_eq!(
            self.wait(self.fs.write(ino, fh, 0, bytes)).expect("write"),
            bytes.len() as u32
        );
        self.fs.flush(ino, fh).expect("flush");
        self.fs.release(ino, fh);
        ino
    }

    fn put_in_store(&self, path: &str, bytes: &[u8]) {
        let p = self.store.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, bytes).expect("write");
    }

    fn list(&self, ino: u64) -> Vec<(String, FileType)> {
        let fh = self.wait(self.fs.opendir(ino)).expect("opendir");
        let dir = self.wait(self.fs.dir(ino, fh)).expect("dir");
        let mut out = Vec::new();
        self.fs.fill_dir(&dir, ino, 0, |_, _, kind, n| {
            out.push((n.to_string(), kind));
            false
        });
        self.fs.releasedir(fh);
        out
    }
}

#[test]
fn a_written_file_is_local_tracked_for_upload_and_readable() {
    let env = env(1 << 20);
    let step = env
        .fs
        .mkdir(ROOT, name("step-1"), 0o755, 0o022, ME)
        .expect("mkdir")
        .ino
        .0;
    let ino = env.write_file(step, "shard-0", b"weights");
    let attr = env.wait(env.fs.getattr(ino, None)).expect("getattr");
    assert_eq!((attr.size, attr.kind), (7, FileType::RegularFile));
    assert_eq!(
        env.wait(env.fs.lookup(step, name("shard-0"))).expect("lookup").ino.0,
        ino
    );
    let entry = env.tracker.entry("step-1/shard-0").expect("tracked");
    assert!(entry.upload_pending(), "closed, so a version to upload: {entry:?}");
    assert_eq!(env.tracker.used(), 7);
    let (fh, _) = env
        .runtime
        .block_on(
            env.fs
                .open(ino, false, false, |_| Err(std::io::Error::other("no kernel"))),
        )
        .expect("open");
    assert_eq!(env.fs.read(ino, fh, 2, 100).expect("read"), b"ights");
    assert!(matches!(env.fs.read(ino, fh + 1, 0, 1), Err(CkptFsError::BadHandle(_))));
    assert_eq!(env.fs.statfs().free, ((1 << 20) - 7) / 4096);
}

#[test]
fn listings_merge_local_files_with_the_store_and_restores_copy_in() {
    let env = env(1 << 20);
    env.put_in_store("step-0/.metadata", b"meta");
    env.put_in_store("step-0/shard-0", b"old weights");
    let local = env
        .fs
        .mkdir(ROOT, name("step-1"), 0o755, 0o022, ME)
        .expect("mkdir")
        .ino
        .0;
    env.write_file(local, "shard-0", b"new");
    let mut names: Vec<String> = env.list(ROOT).into_iter().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(names, [".", "..", "step-0", "step-1"]);
    let step0 = env.wait(env.fs.lookup(ROOT, name("step-0"))).expect("store dir").ino.0;
    let shard = env.wait(env.fs.lookup(step0, name("shard-0"))).expect("store file");
    assert_eq!(shard.size, 11);
    // Opening a store-only file copies it into the area; it is clean (nothing to upload).
    let (fh, _) = env
        .runtime
        .block_on(
            env.fs
                .open(shard.ino.0, false, false, |_| Err(std::io::Error::other("no kernel"))),
        )
        .expect("open");
    assert_eq!(env.fs.read(shard.ino.0, fh, 0, 64).expect("read"), b"old weights");
    assert!(env.tracker.entry("step-0/shard-0").is_some_and(|e| e.is_clean()));
    assert!(matches!(
        env.wait(env.fs.lookup(step0, name("missing"))),
        Err(CkptFsError::NotFound(_))
    ));
}

#[test]
fn store_only_renames_non_empty_rmdirs_and_unlinks_answer_as_posix_says() {
    let env = env(1 << 20);
    env.put_in_store("old/shard", b"x");
    let old = env.wait(env.fs.lookup(ROOT, name("old"))).expect("old").ino.0;
    let _ = env.wait(env.fs.lookup(old, name("shard"))).expect("shard");
    let renamed = env.wait(env.fs.rename(old, name("shard"), ROOT, name("moved"), false));
    assert_eq!(renamed.map(|_| ()).unwrap_err().errno(), Errno::EXDEV);
    let rmdir = env.wait(env.fs.rmdir(ROOT, name("old")));
    assert_eq!(rmdir.unwrap_err().errno(), Errno::ENOTEMPTY);
    // Unlinking a file only the store has schedules the object's deletion.
    env.wait(env.fs.unlink(old, name("shard"))).expect("unlink");
    assert!(env.tracker.deleting("old/shard"));
    assert_eq!(
        env.wait(env.fs.unlink(old, name("shard"))).unwrap_err().errno(),
        Errno::ENOENT,
        "gone from the mount at once"
    );
    // A local rename moves the file and its pending upload.
    let ino = env.write_file(ROOT, "tmp", b"abc");
    env.wait(env.fs.rename(ROOT, name("tmp"), ROOT, name("final"), false))
        .expect("rename");
    assert!(env.tracker.entry("tmp").is_none());
    assert!(env.tracker.entry("final").is_some_and(|e| e.upload_pending()));
    assert_eq!(env.wait(env.fs.getattr(ino, None)).expect("same inode").size, 3);
    env.write_file(ROOT, "other", b"z");
    let noreplace = env.wait(env.fs.rename(ROOT, name("other"), ROOT, name("final"), true));
    assert_eq!(noreplace.unwrap_err().errno(), Errno::EEXIST);
}

#[test]
fn a_full_area_refuses_what_nothing_can_free_and_a_failed_write_sticks() {
    let env = env(16);
    let (attr, fh) = env.fs.create(ROOT, name("big"), 0o644, 0, 0, ME).expect("create");
    let ino = attr.ino.0;
    // Larger than the whole area: an error, not a wait.
    let too_large = env.wait(env.fs.write(ino, fh, 0, &[1u8; 17]));
    assert_eq!(too_large.unwrap_err().errno(), Errno::ENOSPC);
    // The handle now reports the failure on every write and at close, and the file is broken.
    assert_eq!(
        env.wait(env.fs.write(ino, fh, 0, b"ok")).unwrap_err().errno(),
        Errno::ENOSPC
    );
    assert_eq!(env.fs.flush(ino, fh).unwrap_err().errno(), Errno::ENOSPC);
    env.fs.release(ino, fh);
    assert!(
        !env.tracker.entry("big").is_some_and(|e| e.upload_pending()),
        "never uploaded"
    );
    // Room held by a file still open for writing cannot be freed by uploads: ENOSPC.
    let (a, afh) = env.fs.create(ROOT, name("a"), 0o644, 0, 0, ME).expect("create a");
    env.wait(env.fs.write(a.ino.0, afh, 0, &[2u8; 12])).expect("fits");
    let (b, bfh) = env.fs.create(ROOT, name("b"), 0o644, 0, 0, ME).expect("create b");
    let full = env.wait(env.fs.write(b.ino.0, bfh, 0, &[3u8; 8]));
    assert_eq!(full.unwrap_err().errno(), Errno::ENOSPC);
    // A truncate by path is a whole new version.
    let set = SetAttr {
        size: Some(4),
        ..Default::default()
    };
    env.fs.release(a.ino.0, afh);
    assert_eq!(env.wait(env.fs.setattr(a.ino.0, None, set)).expect("truncate").size, 4);
    assert!(env
        .tracker
        .entry("a")
        .is_some_and(|e| e.upload_pending() && e.size == 4));
}

#[test]
fn unknown_inodes_and_handles_are_refused() {
    let env = env(1 << 20);
    assert!(matches!(
        env.wait(env.fs.getattr(4242, None)),
        Err(CkptFsError::Stale(4242))
    ));
    assert!(matches!(
        env.wait(env.fs.write(ROOT, 77, 0, b"x")),
        Err(CkptFsError::BadHandle(77))
    ));
    assert!(matches!(env.fs.fsync(ROOT, 77, true), Err(CkptFsError::BadHandle(77))));
    assert!(matches!(
        env.wait(env.fs.dir(ROOT, 78)),
        Err(CkptFsError::BadHandle(78))
    ));
}
