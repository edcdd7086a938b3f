//! The dataset filesystem's logic without FUSE or root: the calls the adapter makes, against
//! a source store in a temporary directory, read directly (no workers).

use crate::fs_core::ToErrno;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;

use fuser::FileType;
use prometheus_client::registry::Registry;

use super::filesystem::{DatasetFs, Incarnation, OpenedFile};
use super::inodes::{Inodes, ROOT};
use super::{build_fs, filesystem, DatasetMount, FsError, MountResources};
use crate::metrics::FuseMetrics;

const BLOCK: u64 = 4096;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Env {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    fs: DatasetFs,
    runtime: tokio::runtime::Runtime,
}

fn write(root: &Path, path: &str, bytes: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, bytes).expect("write");
}

/// A dataset of a few files and directories, mounted (logically) straight from the store.
fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    write(&root, "train/a.bin", &pattern(1, 10_000));
    write(&root, "train/b.bin", &pattern(2, BLOCK as usize));
    write(&root, "train/empty", b"");
    write(&root, "train/deep/c.txt", b"hello");
    write(&root, "README", b"a dataset\n");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut config = DatasetMount::new(Vec::new(), Some(format!("fs://{}", root.display())));
    config.block_size = BLOCK;
    config.passthrough = false;
    let mut registry = Registry::default();
    let resources = MountResources::new(64 << 20, Arc::new(FuseMetrics::register(&mut registry)));
    let inodes = Inodes::new(filesystem::root_info());
    let fs = build_fs(
        &config,
        &resources,
        runtime.handle().clone(),
        Incarnation::first(inodes),
    )
    .expect("build")
    .0;
    Env {
        _dir: dir,
        root,
        fs,
        runtime,
    }
}

impl Env {
    fn lookup(&self, parent: u64, name: &str) -> Result<fuser::FileAttr, FsError> {
        self.runtime
            .block_on(self.fs.lookup(parent, OsStr::new(name)))
            .map(|e| e.attr)
    }

    fn ino(&self, path: &str) -> u64 {
        let mut ino = ROOT;
        for part in path.split('/') {
            ino = self.lookup(ino, part).expect(path).ino.0;
        }
        ino
    }

    fn open(&self, ino: u64) -> Result<u64, FsError> {
        let opened = self.runtime.block_on(
            self.fs
                .open(ino, false, |_| Err(std::io::Error::other("no kernel here"))),
        )?;
        match opened {
            OpenedFile::Cached { fh, .. } => Ok(fh),
            OpenedFile::Passthrough { .. } => panic!("passthrough is off"),
        }
    }

    fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let read = self.fs.read(ino, fh, offset, size);
        self.runtime.block_on(read).map(|b| b.to_vec())
    }

    /// Every entry of a directory, read `per_reply` at a time as the kernel pages through it.
    fn list(&self, ino: u64, plus: bool, per_reply: usize) -> Vec<(String, u64, FileType, bool)> {
        let fh = self.runtime.block_on(self.fs.opendir(ino)).expect("opendir");
        let (mut out, mut offset) = (Vec::new(), 0);
        loop {
            let mut page = Vec::new();
            self.runtime
                .block_on(self.fs.readdir(ino, fh, offset, plus, |item| {
                    page.push((
                        item.name.to_string(),
                        item.ino,
                        item.kind,
                        item.attr.is_some(),
                        item.next,
                    ));
                    page.len() == per_reply
                }))
                .expect("readdir");
            let Some(last) = page.last() else { break };
            offset = last.4;
            out.extend(page.into_iter().map(|(n, i, k, a, _)| (n, i, k, a)));
        }
        self.fs.releasedir(fh);
        out
    }
}

#[test]
fn lookups_and_attributes_describe_the_store() {
    let env = env();
    let train = env.lookup(ROOT, "train").expect("train");
    assert_eq!(train.kind, FileType::Directory);
    assert_eq!(train.perm, 0o555);
    let a = env.lookup(train.ino.0, "a.bin").expect("a.bin");
    assert_eq!((a.kind, a.size, a.perm), (FileType::RegularFile, 10_000, 0o444));
    assert_eq!(
        env.lookup(train.ino.0, "a.bin").expect("again").ino,
        a.ino,
        "one path, one inode"
    );
    let got = env.runtime.block_on(env.fs.getattr(a.ino.0)).expect("getattr");
    assert_eq!(got.attr.size, 10_000);
    assert!(matches!(env.lookup(train.ino.0, "nope"), Err(FsError::NotFound(_))));
    assert!(matches!(env.lookup(999, "x"), Err(FsError::Stale(999))));
    // Forgotten by the kernel as often as it was looked up: the inode is gone.
    env.fs.forget(a.ino.0, 2);
    let gone = env.runtime.block_on(env.fs.getattr(a.ino.0));
    assert_eq!(gone.map(|_| ()).unwrap_err().errno(), fuser::Errno::ESTALE);
}

#[test]
fn reads_return_the_store_bytes_across_block_edges() {
    let env = env();
    let ino = env.ino("train/a.bin");
    let fh = env.open(ino).expect("open");
    let want = pattern(1, 10_000);
    for (offset, size) in [(0u64, 10_000u32), (4090, 20), (4096, 4096), (8000, 5000), (9_999, 1)] {
        let got = env.read(ino, fh, offset, size).expect("read");
        let end = (offset + size as u64).min(10_000) as usize;
        assert_eq!(got, want[offset as usize..end], "offset {offset} size {size}");
    }
    assert!(env.read(ino, fh, 10_000, 100).expect("at the end").is_empty());
    env.fs.release(fh);
    assert!(
        matches!(env.read(ino, fh, 0, 10), Err(FsError::BadHandle(_))),
        "a released handle"
    );
    let empty = env.ino("train/empty");
    let fh = env.open(empty).expect("open empty");
    assert!(env.read(empty, fh, 0, 4096).expect("read empty").is_empty());
}

#[test]
fn opens_refuse_writes_and_directories() {
    let env = env();
    let ino = env.ino("README");
    let write = env
        .runtime
        .block_on(env.fs.open(ino, true, |_| Err(std::io::Error::other("unused"))));
    assert_eq!(write.map(|_| ()).unwrap_err().errno(), fuser::Errno::EROFS);
    let dir = env.ino("train");
    let open_dir = env
        .runtime
        .block_on(env.fs.open(dir, false, |_| Err(std::io::Error::other("unused"))));
    assert_eq!(open_dir.map(|_| ()).unwrap_err().errno(), fuser::Errno::EISDIR);
    let not_dir = env.runtime.block_on(env.fs.opendir(ino));
    assert_eq!(not_dir.unwrap_err().errno(), fuser::Errno::ENOTDIR);
    assert_eq!(env.fs.access(true).unwrap_err().errno(), fuser::Errno::EROFS);
    assert!(env.fs.access(false).is_ok());
}

#[test]
fn a_directory_lists_whole_in_pages_with_dot_entries() {
    let env = env();
    let train = env.ino("train");
    for plus in [false, true] {
        for per_reply in [1, 2, 100] {
            let listed = env.list(train, plus, per_reply);
            let names: Vec<&str> = listed.iter().map(|(n, ..)| n.as_str()).collect();
            assert_eq!(names[..2], [".", ".."], "plus {plus}, {per_reply} per reply");
            let mut rest: Vec<&str> = names[2..].to_vec();
            rest.sort();
            assert_eq!(
                rest,
                ["a.bin", "b.bin", "deep", "empty"],
                "plus {plus}, {per_reply} per reply"
            );
            assert_eq!(listed[0].1, train, "\".\" is the directory itself");
            assert_eq!(listed[1].1, ROOT, "\"..\" is its parent");
            let deep = listed.iter().find(|(n, ..)| n == "deep").expect("deep");
            assert_eq!(deep.2, FileType::Directory);
            assert!(
                listed.iter().all(|(.., attr)| *attr == plus),
                "attributes with readdirplus only"
            );
        }
    }
    // readdirplus took references: the entries are known inodes now, the same a lookup gives.
    let listed = env.list(train, true, 100);
    let a = listed.iter().find(|(n, ..)| n == "a.bin").expect("a.bin");
    assert_eq!(env.lookup(train, "a.bin").expect("lookup").ino.0, a.1);
}

#[test]
fn a_file_replaced_under_a_handle_that_returned_bytes_is_stale_not_mixed() {
    let env = env();
    let ino = env.ino("train/a.bin");
    let fh = env.open(ino).expect("open");
    assert_eq!(env.read(ino, fh, 0, 16).expect("read"), pattern(1, 16));
    // Another writer replaces the file in the store (new size and mtime: a new version).
    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&env.root, "train/a.bin", &pattern(9, 3 * BLOCK as usize));
    // Block 2 was never fetched: only the new version is left to read it from.
    let err = env.read(ino, fh, 2 * BLOCK, 16).expect_err("the old version is gone");
    assert_eq!(err.errno(), fuser::Errno::ESTALE, "{err}");
}

/// A DataLoader stats (or lists) its files, another writer replaces one, the loader opens it:
/// the mount's cached metadata names a version the store no longer has. The first read
/// finds that out and the handle reads the new version; ESTALE here killed the loader.
#[test]
fn a_file_changed_after_its_metadata_was_cached_opens_with_the_new_bytes() {
    let env = env();
    let ino = env.ino("train/b.bin");
    env.lookup(ROOT, "train").expect("lookup");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let new = pattern(7, 2 * BLOCK as usize + 100);
    write(&env.root, "train/b.bin", &new);
    let fh = env.open(ino).expect("open");
    assert_eq!(
        env.read(ino, fh, 0, new.len() as u32).expect("the new version is read"),
        new
    );
    let attr = env.runtime.block_on(env.fs.getattr(ino)).expect("getattr").attr;
    assert_eq!(attr.size, new.len() as u64, "the inode shows the new size");
    // A second handle opens the new version straight away.
    let again = env.open(ino).expect("open");
    assert_eq!(
        env.read(ino, again, BLOCK, 16).expect("read"),
        new[BLOCK as usize..][..16]
    );
}
