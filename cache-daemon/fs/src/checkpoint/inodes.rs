//! Inode numbers for the paths of a read-write mount. Like the dataset mount's table, an
//! inode lives while the kernel holds lookups on it; unlike it, paths change: a rename moves
//! an inode (and everything under a directory) to new paths, and an unlinked inode keeps
//! its number but has no path, so its open files never act on a newer file of that name.
//! With a log, every change is logged, so a restarted daemon taking the kernel mount over
//! replays the table the kernel knows.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::tracker::is_under;
use crate::fs_core::op_log::OpLog;

pub const ROOT: u64 = 1;

/// References given to inodes inherited from a previous daemon: how many the kernel holds
/// is unknown, so they are kept until the mount goes away.
const INHERITED_LOOKUPS: u64 = 1 << 62;

/// One change of the table, as logged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum InodeOp {
    Add {
        ino: u64,
        path: String,
    },
    /// An inode the kernel holds that has no path any more (unlinked while open).
    Orphan {
        ino: u64,
    },
    Forget {
        ino: u64,
    },
    Unlinked {
        path: String,
    },
    Renamed {
        from: String,
        to: String,
    },
}

struct Inode {
    path: Option<String>,
    lookups: u64,
}

struct Table {
    by_ino: HashMap<u64, Inode>,
    by_path: HashMap<String, u64>,
    next: u64,
    log: Option<OpLog<InodeOp>>,
}

pub struct PathInodes {
    table: Mutex<Table>,
}

impl Default for PathInodes {
    fn default() -> Self {
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT,
            Inode {
                path: Some(String::new()),
                lookups: 1,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(String::new(), ROOT);
        PathInodes {
            table: Mutex::new(Table {
                by_ino,
                by_path,
                next: ROOT + 1,
                log: None,
            }),
        }
    }
}

impl PathInodes {
    /// A table logging its changes to `log` (a fresh mount).
    pub fn with_log(log: OpLog<InodeOp>) -> Self {
        let inodes = Self::default();
        inodes.lock().log = Some(log);
        inodes
    }

    /// The table a previous daemon logged: its inodes answer again, new ones are numbered
    /// after them, and the log goes on compacted.
    pub fn inherited(log: OpLog<InodeOp>, ops: Vec<InodeOp>) -> std::io::Result<Self> {
        let inodes = Self::default();
        {
            let mut t = inodes.lock();
            for op in ops {
                match op {
                    InodeOp::Add { ino, path } => {
                        t.by_path.insert(path.clone(), ino);
                        t.by_ino.insert(
                            ino,
                            Inode {
                                path: Some(path),
                                lookups: INHERITED_LOOKUPS,
                            },
                        );
                        t.next = t.next.max(ino + 1);
                    }
                    InodeOp::Orphan { ino } => {
                        t.by_ino.insert(
                            ino,
                            Inode {
                                path: None,
                                lookups: INHERITED_LOOKUPS,
                            },
                        );
                        t.next = t.next.max(ino + 1);
                    }
                    InodeOp::Forget { ino } => {
                        if let Some(Inode { path: Some(path), .. }) = t.by_ino.remove(&ino) {
                            if t.by_path.get(&path) == Some(&ino) {
                                t.by_path.remove(&path);
                            }
                        }
                    }
                    InodeOp::Unlinked { path } => t.unlink(&path),
                    InodeOp::Renamed { from, to } => t.rename(&from, &to),
                }
            }
            // Inherited inodes are never forgotten by count; the root is always there.
            for (ino, inode) in t.by_ino.iter_mut() {
                if *ino != ROOT {
                    inode.lookups = INHERITED_LOOKUPS;
                }
            }
            t.log = Some(log);
            t.compact()?;
        }
        Ok(inodes)
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inode of `path`, with one more kernel reference.
    pub fn remember(&self, path: &str) -> u64 {
        let mut t = self.lock();
        if let Some(&ino) = t.by_path.get(path) {
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.lookups += 1;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.append(InodeOp::Add {
            ino,
            path: path.to_string(),
        });
        t.by_path.insert(path.to_string(), ino);
        t.by_ino.insert(
            ino,
            Inode {
                path: Some(path.to_string()),
                lookups: 1,
            },
        );
        ino
    }

    pub fn path(&self, ino: u64) -> Option<String> {
        self.lock().by_ino.get(&ino).and_then(|i| i.path.clone())
    }

    pub fn peek(&self, path: &str) -> Option<u64> {
        self.lock().by_path.get(path).copied()
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
            if let Some(Inode { path: Some(path), .. }) = t.by_ino.remove(&ino) {
                if t.by_path.get(&path) == Some(&ino) {
                    t.by_path.remove(&path);
                }
            }
            t.append(InodeOp::Forget { ino });
            if t.log.as_ref().is_some_and(|l| l.wants_compaction(t.by_ino.len())) {
                if let Err(e) = t.compact() {
                    tracing::warn!(error = %e, "cannot compact the inode log");
                }
            }
        }
    }

    /// `path` was unlinked or removed.
    pub fn unlinked(&self, path: &str) {
        let mut t = self.lock();
        t.append(InodeOp::Unlinked { path: path.to_string() });
        t.unlink(path);
    }

    /// `from` (and everything under it) is now at `to`; whatever was at `to` is replaced.
    pub fn renamed(&self, from: &str, to: &str) {
        let mut t = self.lock();
        t.append(InodeOp::Renamed {
            from: from.to_string(),
            to: to.to_string(),
        });
        t.rename(from, to);
    }
}

impl Table {
    fn append(&mut self, op: InodeOp) {
        if let Some(log) = self.log.as_mut() {
            log.append(&op);
        }
    }

    /// Rewrites the log as the table is now.
    fn compact(&mut self) -> std::io::Result<()> {
        let Some(log) = self.log.as_mut() else { return Ok(()) };
        let ops: Vec<InodeOp> = self
            .by_ino
            .iter()
            .filter(|(ino, _)| **ino != ROOT)
            .map(|(ino, inode)| match &inode.path {
                Some(path) => InodeOp::Add {
                    ino: *ino,
                    path: path.clone(),
                },
                None => InodeOp::Orphan { ino: *ino },
            })
            .collect();
        log.rewrite(ops.iter())
    }

    fn unlink(&mut self, path: &str) {
        if let Some(ino) = self.by_path.remove(path) {
            if let Some(inode) = self.by_ino.get_mut(&ino) {
                inode.path = None;
            }
        }
    }

    fn rename(&mut self, from: &str, to: &str) {
        let t = self;

        // Whatever `to` named before is gone.
        let replaced: Vec<String> = t.by_path.keys().filter(|p| is_under(p, to)).cloned().collect();
        for p in replaced {
            if let Some(ino) = t.by_path.remove(&p) {
                if let Some(inode) = t.by_ino.get_mut(&ino) {
                    inode.path = None;
                }
            }
        }
        let moving: Vec<(String, u64)> = t
            .by_path
            .iter()
            .filter(|(p, _)| is_under(p, from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moving {
            let new = format!("{to}{}", &old[from.len()..]);
            t.by_path.remove(&old);
            t.by_path.insert(new.clone(), ino);
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.path = Some(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_directory_takes_its_children_along() {
        let inodes = PathInodes::default();
        let dir = inodes.remember("tmp");
        let file = inodes.remember("tmp/a");
        let other = inodes.remember("tmpx");
        let old_target = inodes.remember("final");
        inodes.renamed("tmp", "final");
        assert_eq!(inodes.path(dir).as_deref(), Some("final"));
        assert_eq!(inodes.path(file).as_deref(), Some("final/a"));
        assert_eq!(
            inodes.path(other).as_deref(),
            Some("tmpx"),
            "a sibling with a common prefix stays"
        );
        assert_eq!(inodes.path(old_target), None, "the replaced inode has no path");
        inodes.unlinked("final/a");
        assert_eq!(inodes.path(file), None);
        assert_ne!(
            inodes.remember("final/a"),
            file,
            "a new file of that name is a new inode"
        );
    }

    #[test]
    fn a_logged_table_is_inherited_as_the_kernel_knows_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inodes.log");
        let inodes = PathInodes::with_log(OpLog::create(&path).unwrap());
        let tmp = inodes.remember("step-1.tmp");
        let shard = inodes.remember("step-1.tmp/shard-0");
        let gone = inodes.remember("old");
        let open_unlinked = inodes.remember("scratch");
        inodes.forget(gone, 1);
        inodes.renamed("step-1.tmp", "step-1");
        inodes.unlinked("scratch");
        drop(inodes);
        let (log, ops) = OpLog::resume(&path).unwrap();
        let inherited = PathInodes::inherited(log, ops).unwrap();
        assert_eq!(inherited.path(tmp).as_deref(), Some("step-1"));
        assert_eq!(inherited.path(shard).as_deref(), Some("step-1/shard-0"));
        assert_eq!(inherited.peek("old"), None);
        assert_eq!(inherited.path(open_unlinked), None, "unlinked while open: no path");
        let new = inherited.remember("step-2");
        assert!(new > open_unlinked, "new inodes are numbered after the inherited ones");
        // Inherited inodes survive the kernel's forgets (their counts are unknown).
        inherited.forget(shard, 1);
        assert_eq!(inherited.path(shard).as_deref(), Some("step-1/shard-0"));
        // The compacted log says the same.
        drop(inherited);
        let (log, ops) = OpLog::resume(&path).unwrap();
        let again = PathInodes::inherited(log, ops).unwrap();
        assert_eq!(again.path(shard).as_deref(), Some("step-1/shard-0"));
        assert_eq!(again.path(new).as_deref(), Some("step-2"));
    }
}
