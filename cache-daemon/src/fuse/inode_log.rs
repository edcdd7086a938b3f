//! The inode table's log: which inode number the kernel knows for which path, kept in the
//! node daemon's state directory so that a restarted daemon serving the same kernel mount
//! (handed back by the fd keeper) answers for the inodes and open files the kernel holds.
//!
//! One line per change: `+<ino> <d|f> <path as a JSON string>` when the kernel is given an
//! inode, `-<ino>` when it forgets it. Written without fsync: the log must outlive the daemon
//! process, not the machine (after a reboot there is no kernel mount to serve again). Rewritten
//! with only the live inodes when it grows well past them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// Below this many lines the log is never compacted.
const COMPACT_MIN_LINES: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedInode {
    pub path: String,
    pub is_dir: bool,
}

pub struct InodeLog {
    file: File,
    path: PathBuf,
    lines: u64,
    /// A write failed once: warned, and restart survival is off for this mount.
    failed: bool,
}

fn line_of(ino: u64, inode: &LoggedInode) -> String {
    let path = serde_json::to_string(&inode.path).unwrap_or_else(|_| "\"\"".into());
    format!("+{ino} {} {path}\n", if inode.is_dir { 'd' } else { 'f' })
}

impl InodeLog {
    /// A new, empty log at `path` (a fresh mount).
    pub fn create(path: &Path) -> io::Result<InodeLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = File::create(path)?;
        Ok(InodeLog {
            file,
            path: path.to_path_buf(),
            lines: 0,
            failed: false,
        })
    }

    /// Reads the log a previous daemon left and continues it (compacted). A torn last line
    /// (the daemon died mid-write) is dropped: its inode was never handed to the kernel.
    pub fn resume(path: &Path) -> io::Result<(InodeLog, BTreeMap<u64, LoggedInode>)> {
        let mut live = BTreeMap::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line?;
                    if let Some(rest) = line.strip_prefix('+') {
                        let mut parts = rest.splitn(3, ' ');
                        let (Some(ino), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                            continue;
                        };
                        let (Ok(ino), Ok(path)) = (ino.parse::<u64>(), serde_json::from_str::<String>(name)) else {
                            continue;
                        };
                        live.insert(
                            ino,
                            LoggedInode {
                                path,
                                is_dir: kind == "d",
                            },
                        );
                    } else if let Some(ino) = line.strip_prefix('-').and_then(|i| i.parse::<u64>().ok()) {
                        live.remove(&ino);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut log = InodeLog::create(path)?;
        log.rewrite(live.iter().map(|(ino, inode)| (*ino, inode)))?;
        Ok((log, live))
    }

    fn append(&mut self, line: &str) {
        if self.failed {
            return;
        }
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot write the inode log; this mount will not survive a restart of the node daemon");
            self.failed = true;
        }
        self.lines += 1;
    }

    pub fn added(&mut self, ino: u64, inode: &LoggedInode) {
        self.append(&line_of(ino, inode));
    }

    pub fn forgotten(&mut self, ino: u64) {
        self.append(&format!("-{ino}\n"));
    }

    /// Whether the log has grown well past the `live` inodes it describes.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.lines > COMPACT_MIN_LINES && self.lines > 4 * live as u64
    }

    /// Replaces the log with one line per live inode (written aside, then renamed).
    pub fn rewrite<'a>(&mut self, live: impl Iterator<Item = (u64, &'a LoggedInode)>) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        let mut lines = 0;
        for (ino, inode) in live {
            out.write_all(line_of(ino, inode).as_bytes())?;
            lines += 1;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        drop(file);
        self.lines = lines;
        Ok(())
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
    fn a_resumed_log_has_the_live_inodes_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.inodes");
        let mut log = InodeLog::create(&path).unwrap();
        log.added(2, &inode("train", true));
        log.added(3, &inode("train/a b\n\"c\".jpg", false));
        log.added(4, &inode("train/gone", false));
        log.forgotten(4);
        drop(log);
        // A daemon killed mid-write leaves half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"+5 f \"train/ha")
            .unwrap();
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
