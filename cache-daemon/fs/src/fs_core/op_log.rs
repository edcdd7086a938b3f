//! An append-only log of operations, one JSON value per line, that a restarted daemon replays:
//! the mounts' inode tables use it, so that a daemon taking a kernel mount over answers for
//! the inodes the kernel holds.
//!
//! An [`AppendLog`] of [`Durability::Process`]: the log must outlive the daemon process, not
//! the machine (after a reboot there is no kernel mount to serve again). A torn last line (the
//! daemon died mid-write) is dropped: what it described was never answered to the kernel.

use std::io;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use granary_process::append_log::{AppendLog, Durability, LogOptions};

/// Below this many lines a log is never compacted.
const COMPACT_MIN_LINES: u64 = 100_000;

const OPTIONS: LogOptions = LogOptions::new(Durability::Process);

pub struct OpLog<T> {
    log: AppendLog<T>,
    /// A write failed once: warned, and restart survival is off for this mount.
    failed: bool,
}

impl<T: Serialize + DeserializeOwned> OpLog<T> {
    /// A new, empty log at `path` (a fresh mount).
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(OpLog {
            log: AppendLog::create(path, OPTIONS)?,
            failed: false,
        })
    }

    /// The operations a previous daemon logged at `path` (none if there is no log), and the
    /// log to go on with. The caller compacts it with [`OpLog::rewrite`].
    pub fn resume(path: &Path) -> io::Result<(Self, Vec<T>)> {
        let (log, ops) = AppendLog::open(path, OPTIONS)?;
        Ok((OpLog { log, failed: false }, ops))
    }

    pub fn append(&mut self, op: &T) {
        if self.failed {
            return;
        }
        if let Err(e) = self.log.append(op) {
            tracing::warn!(path = %self.log.path().display(), error = %e,
                "cannot write the inode log; this mount will not survive a restart of the node daemon");
            self.failed = true;
        }
    }

    /// Whether the log has grown well past the `live` entries it describes.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.log.lines() > COMPACT_MIN_LINES && self.log.lines() > 4 * live as u64
    }

    /// Replaces the log with `ops` (written aside, then renamed over it).
    pub fn rewrite<'a>(&mut self, ops: impl Iterator<Item = &'a T>) -> io::Result<()>
    where
        T: 'a,
    {
        self.log.rewrite(ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_resumed_log_replays_whole_lines_and_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.log");
        let mut log = OpLog::<(u64, String)>::create(&path).unwrap();
        log.append(&(2, "a b\n\"c\"".into()));
        log.append(&(3, "d".into()));
        drop(log);
        // A daemon killed mid-write leaves half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"[4,\"tor")
            .unwrap();
        let (mut log, ops) = OpLog::<(u64, String)>::resume(&path).unwrap();
        assert_eq!(ops, vec![(2, "a b\n\"c\"".to_string()), (3, "d".to_string())]);
        log.rewrite(ops.iter().take(1)).unwrap();
        log.append(&(5, "e".into()));
        drop(log);
        let (_, ops) = OpLog::<(u64, String)>::resume(&path).unwrap();
        assert_eq!(ops, vec![(2, "a b\n\"c\"".to_string()), (5, "e".to_string())]);
    }
}
