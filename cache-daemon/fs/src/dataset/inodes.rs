//! The dataset mount's inode table: the shared [`InodeTable`] holding each inode's
//! attributes, and with an [`InodeLog`] every number handed out is logged, so a restarted
//! daemon can serve the same kernel mount.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::inode_log::{InodeLog, LoggedInode};
use crate::fs_core::inodes::InodeTable;
pub use crate::fs_core::inodes::ROOT;
use granary_cache::proto::FileInfo;

struct Table {
    inodes: InodeTable<Arc<FileInfo>>,
    log: Option<InodeLog>,
}

pub struct Inodes {
    table: Mutex<Table>,
}

fn logged(info: &FileInfo) -> LoggedInode {
    LoggedInode {
        path: info.path.clone(),
        is_dir: info.is_dir,
    }
}

impl Inodes {
    pub fn new(root: FileInfo) -> Self {
        Self::with_log(root, None)
    }

    /// A table logging every inode it hands out to `log`.
    pub fn with_log(root: FileInfo, log: Option<InodeLog>) -> Self {
        let path = root.path.clone();
        Inodes {
            table: Mutex::new(Table {
                inodes: InodeTable::new(&path, Arc::new(root)),
                log,
            }),
        }
    }

    /// The table a previous daemon left in `log`: its inodes answer again (their attributes
    /// are fetched on first use) and new ones are numbered after them.
    pub fn inherited(root: FileInfo, log: InodeLog, live: BTreeMap<u64, LoggedInode>) -> Self {
        let inodes = Self::with_log(root, Some(log));
        {
            let mut t = inodes.lock();
            for (ino, inode) in live {
                let info = Arc::new(FileInfo {
                    path: inode.path.clone(),
                    is_dir: inode.is_dir,
                    ..Default::default()
                });
                t.inodes.inherit(ino, Some(inode.path), info);
            }
        }
        inodes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The inode of `info.path` (made if new) with one more kernel reference, and its
    /// attributes updated to `info`.
    pub fn remember(&self, info: Arc<FileInfo>) -> u64 {
        let mut t = self.lock();
        let (ino, new) = t.inodes.remember(&info.path, Arc::clone(&info));
        if new {
            if let Some(log) = t.log.as_mut() {
                log.added(ino, &logged(&info));
            }
        }
        ino
    }

    /// The inode of a path if the kernel knows it (for plain readdir, which takes no reference).
    pub fn peek(&self, path: &str) -> Option<u64> {
        self.lock().inodes.peek(path)
    }

    pub fn get(&self, ino: u64) -> Option<Arc<FileInfo>> {
        self.lock().inodes.get(ino).map(|i| Arc::clone(&i.value))
    }

    /// Replaces the attributes of `ino` after a refresh.
    pub fn update(&self, ino: u64, info: Arc<FileInfo>) {
        if let Some(inode) = self.lock().inodes.get_mut(ino) {
            inode.value = info;
        }
    }

    /// Takes `n` kernel references off `ino`; says whether that was the last (it is gone).
    pub fn forget(&self, ino: u64, n: u64) -> bool {
        let mut t = self.lock();
        if !t.inodes.forget(ino, n) {
            return false;
        }
        let live = t.inodes.len();
        let Table { log, inodes } = &mut *t;
        if let Some(log) = log.as_mut() {
            log.forgotten(ino);
            if log.wants_compaction(live) {
                let entries = inodes.non_root().map(|(i, inode)| (i, logged(&inode.value)));
                if let Err(e) = log.rewrite(entries) {
                    tracing::warn!(error = %e, "cannot compact the inode log");
                }
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.lock().inodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str) -> Arc<FileInfo> {
        Arc::new(FileInfo {
            path: path.into(),
            ..Default::default()
        })
    }

    #[test]
    fn an_inode_lives_until_the_kernel_forgets_every_lookup() {
        let inodes = Inodes::new(FileInfo {
            is_dir: true,
            ..Default::default()
        });
        let a = inodes.remember(info("a"));
        assert_eq!(inodes.remember(info("a")), a, "one path, one inode");
        inodes.forget(a, 1);
        assert!(inodes.get(a).is_some(), "one reference left");
        inodes.forget(a, 1);
        assert!(inodes.get(a).is_none());
        assert_ne!(inodes.remember(info("a")), a, "a forgotten number is not reused");
        inodes.forget(ROOT, 10);
        assert!(inodes.get(ROOT).is_some(), "the root stays");
    }
}
