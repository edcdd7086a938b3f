//! The dataset mount's inode log: which inode number the kernel was given for which path,
//! so a restarted daemon taking the kernel mount over answers for them ([`OpLog`]).

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fs_core::op_log::OpLog;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedInode {
    pub path: String,
    pub is_dir: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum InodeOp {
    /// The kernel was given `ino` for this path.
    Add { ino: u64, inode: LoggedInode },
    /// The kernel forgot `ino`.
    Forget { ino: u64 },
}

pub struct InodeLog(OpLog<InodeOp>);

impl InodeLog {
    /// A new, empty log at `path` (a fresh mount).
    pub fn create(path: &Path) -> io::Result<InodeLog> {
        OpLog::create(path).map(InodeLog)
    }

    /// The inodes a previous daemon left in the log at `path`; the log goes on, compacted.
    pub fn resume(path: &Path) -> io::Result<(InodeLog, BTreeMap<u64, LoggedInode>)> {
        let (log, ops) = OpLog::resume(path)?;
        let mut live = BTreeMap::new();
        for op in ops {
            match op {
                InodeOp::Add { ino, inode } => {
                    live.insert(ino, inode);
                }
                InodeOp::Forget { ino } => {
                    live.remove(&ino);
                }
            }
        }
        let mut log = InodeLog(log);
        log.rewrite(live.iter().map(|(ino, inode)| (*ino, inode.clone())))?;
        Ok((log, live))
    }

    pub fn added(&mut self, ino: u64, inode: &LoggedInode) {
        self.0.append(&InodeOp::Add {
            ino,
            inode: inode.clone(),
        });
    }

    pub fn forgotten(&mut self, ino: u64) {
        self.0.append(&InodeOp::Forget { ino });
    }

    pub fn wants_compaction(&self, live: usize) -> bool {
        self.0.wants_compaction(live)
    }

    /// Replaces the log with one entry per live inode.
    pub fn rewrite(&mut self, live: impl Iterator<Item = (u64, LoggedInode)>) -> io::Result<()> {
        let ops: Vec<InodeOp> = live.map(|(ino, inode)| InodeOp::Add { ino, inode }).collect();
        self.0.rewrite(ops.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(path: &str, is_dir: bool) -> LoggedInode {
        LoggedInode {
            path: path.into(),
            is_dir,
        }
    }

    #[test]
    fn a_resumed_log_has_the_live_inodes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.log");
        let mut log = InodeLog::create(&path).unwrap();
        log.added(2, &inode("train", true));
        log.added(3, &inode("train/a b\n\"c\".jpg", false));
        log.added(4, &inode("train/gone", false));
        log.forgotten(4);
        drop(log);
        let (mut log, live) = InodeLog::resume(&path).unwrap();
        assert_eq!(live.len(), 2, "{live:?}");
        assert_eq!(live[&2], inode("train", true));
        assert_eq!(live[&3], inode("train/a b\n\"c\".jpg", false));
        // The resumed log is compacted and goes on.
        log.added(6, &inode("val", true));
        drop(log);
        let (_, live) = InodeLog::resume(&path).unwrap();
        assert_eq!(live.keys().copied().collect::<Vec<_>>(), vec![2, 3, 6]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }
}
