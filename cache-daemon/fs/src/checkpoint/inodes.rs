//! Inode numbers for the paths of a read-write mount: the shared [`InodeTable`], whose paths
//! change here (renames, unlinks). With a log, every change is logged, so a restarted daemon
//! taking the kernel mount over replays the table the kernel knows.

use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::fs_core::inodes::InodeTable;
pub use crate::fs_core::inodes::ROOT;
use crate::fs_core::op_log::OpLog;

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

struct Table {
    inodes: InodeTable<()>,
    log: Option<OpLog<InodeOp>>,
}

pub struct PathInodes {
    table: Mutex<Table>,
}

impl Default for PathInodes {
    fn default() -> Self {
        PathInodes {
            table: Mutex::new(Table {
                inodes: InodeTable::new("", ()),
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
                    InodeOp::Add { ino, path } => t.inodes.inherit(ino, Some(path), ()),
                    InodeOp::Orphan { ino } => t.inodes.inherit(ino, None, ()),
                    InodeOp::Forget { ino } => {
                        t.inodes.remove(ino);
                    }
                    InodeOp::Unlinked { path } => t.inodes.unlink(&path),
                    InodeOp::Renamed { from, to } => t.inodes.rename(&from, &to),
                }
            }
            // Inherited inodes are never forgotten by count; the root is always there.
            t.inodes.mark_inherited();
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
        let (ino, new) = t.inodes.remember(path, ());
        if new {
            t.append(InodeOp::Add {
                ino,
                path: path.to_string(),
            });
        }
        ino
    }

    pub fn path(&self, ino: u64) -> Option<String> {
        self.lock().inodes.get(ino).and_then(|i| i.path.clone())
    }

    pub fn peek(&self, path: &str) -> Option<u64> {
        self.lock().inodes.peek(path)
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let mut t = self.lock();
        if t.inodes.forget(ino, n) {
            t.append(InodeOp::Forget { ino });
            if t.log.as_ref().is_some_and(|l| l.wants_compaction(t.inodes.len())) {
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
        t.inodes.unlink(path);
    }

    /// `from` (and everything under it) is now at `to`; whatever was at `to` is replaced.
    pub fn renamed(&self, from: &str, to: &str) {
        let mut t = self.lock();
        t.append(InodeOp::Renamed {
            from: from.to_string(),
            to: to.to_string(),
        });
        t.inodes.rename(from, to);
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
            .inodes
            .non_root()
            .map(|(ino, inode)| match &inode.path {
                Some(path) => InodeOp::Add {
                    ino,
                    path: path.clone(),
                },
                None => InodeOp::Orphan { ino },
            })
            .collect();
        log.rewrite(ops.iter())
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
