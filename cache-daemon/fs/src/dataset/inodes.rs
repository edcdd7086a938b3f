//! Inode numbers for paths. The kernel holds a reference for each lookup it was answered
//! (lookup, create, readdirplus) and returns them with forget; an inode is dropped when its
//! count reaches zero. The root is inode 1 and is never dropped. With an [`InodeLog`], every
//! number handed out is logged, so a restarted daemon can serve the same kernel mount.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::inode_log::{InodeLog, LoggedInode};
use granary_cache::proto::FileInfo;

pub const ROOT: u64 = 1;

/// References given to the inodes a previous daemon handed out: how many the kernel holds
/// is unknown, so they are kept until the mount goes away.
const INHERITED_LOOKUPS: u64 = 1 << 62;

struct Inode {
    lookups: u64,
    info: Arc<FileInfo>,
}

struct Table {
    by_ino: HashMap<u64, Inode>,
    by_path: HashMap<String, u64>,
    next: u64,
    log: Option<InodeLog>,
}

pub struct Inodes {
    table: Mutex<Table>,
}

impl Inodes {
    pub fn new(root: FileInfo) -> Self {
        Self::with_log(root, None)
    }

    /// A table logging every inode it hands out to `log`.
    pub fn with_log(root: FileInfo, log: Option<InodeLog>) -> Self {
        let mut by_ino = HashMap::new();
        let mut by_path = HashMap::new();
        by_path.insert(root.path.clone(), ROOT);
        by_ino.insert(
            ROOT,
            Inode {
                lookups: 1,
                info: Arc::new(root),
            },
        );
        Inodes {
            table: Mutex::new(Table {
                by_ino,
                by_path,
                next: ROOT + 1,
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
                if ino == ROOT {
                    continue;
                }
                t.by_path.insert(inode.path.clone(), ino);
                t.by_ino.insert(
                    ino,
                    Inode {
                        lookups: INHERITED_LOOKUPS,
                        info: Arc::new(FileInfo {
                            path: inode.path,
                            is_dir: inode.is_dir,
                            ..Default::default()
                        }),
                    },
                );
                t.next = t.next.max(ino + 1);
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
        if let Some(&ino) = t.by_path.get(&info.path) {
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.lookups += 1;
                inode.info = info;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        if let Some(log) = t.log.as_mut() {
            log.added(
                ino,
                &LoggedInode {
                    path: info.path.clone(),
                    is_dir: info.is_dir,
                },
            );
        }
        t.by_path.insert(info.path.clone(), ino);
        t.by_ino.insert(ino, Inode { lookups: 1, info });
        ino
    }

    /// The inode of a path if the kernel knows it (for plain readdir, which takes no reference).
    pub fn peek(&self, path: &str) -> Option<u64> {
        self.lock().by_path.get(path).copied()
    }

    pub fn get(&self, ino: u64) -> Option<Arc<FileInfo>> {
        self.lock().by_ino.get(&ino).map(|i| Arc::clone(&i.info))
    }

    /// Replaces the attributes of `ino` after a refresh.
    pub fn update(&self, ino: u64, info: Arc<FileInfo>) {
        if let Some(inode) = self.lock().by_ino.get_mut(&ino) {
            inode.info = info;
        }
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.lock();
        let gone = match t.by_ino.get_mut(&ino) {
            Some(inode) => {
                inode.lookups = inode.lookups.saturating_sub(n);
                inode.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(inode) = t.by_ino.remove(&ino) {
                if t.by_path.get(&inode.info.path) == Some(&ino) {
                    t.by_path.remove(&inode.info.path);
                }
            }
            let live = t.by_ino.len();
            let Table { log, by_ino, .. } = &mut *t;
            if let Some(log) = log.as_mut() {
                log.forgotten(ino);
                if log.wants_compaction(live) {
                    let entries = by_ino.iter().filter(|(i, _)| **i != ROOT).map(|(i, inode)| {
                        (
                            *i,
                            LoggedInode {
                                path: inode.info.path.clone(),
                                is_dir: inode.info.is_dir,
                            },
                        )
                    });
                    if let Err(e) = log.rewrite(entries) {
                        tracing::warn!(error = %e, "cannot compact the inode log");
                    }
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_ino.len()
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
