//! An append-only log of operations, one JSON value per line, that a restarted daemon replays:
//! the mounts' inode tables use it, so that a daemon taking a kernel mount over answers for
//! the inodes the kernel holds.
//!
//! Written without fsync: the log must outlive the daemon process, not the machine (after a
//! reboot there is no kernel mount to serve again). A torn last line (the daemon died
//! mid-write) is dropped: what it described was never answered to the kernel.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Below this many lines a log is never compacted.
const COMPACT_MIN_LINES: u64 = 100_000;

pub struct OpLog<T> {
    file: File,
    path: PathBuf,
    lines: u64,
    /// A write failed once: warned, and restart survival is off for this mount.
    failed: bool,
    _ops: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> OpLog<T> {
    /// A new, empty log at `path` (a fresh mount).
    pub fn create(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Ok(OpLog {
            file: File::create(path)?,
            path: path.to_path_buf(),
            lines: 0,
            failed: false,
            _ops: PhantomData,
        })
    }

    /// The operations a previous daemon logged at `path` (none if there is no log), and the
    /// log to go on with. The caller compacts it with [`OpLog::rewrite`].
    pub fn resume(path: &Path) -> io::Result<(Self, Vec<T>)> {
        let mut ops = Vec::new();
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    if let Ok(op) = serde_json::from_str(&line?) {
                        ops.push(op);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let lines = ops.len() as u64;
        Ok((
            OpLog {
                file,
                path: path.to_path_buf(),
                lines,
                failed: false,
                _ops: PhantomData,
            },
            ops,
        ))
    }

    pub fn append(&mut self, op: &T) {
        if self.failed {
            return;
        }
        let mut line = serde_json::to_vec(op).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            tracing::warn!(path = %self.path.display(), error = %e,
                "cannot write the inode log; this mount will not survive a restart of the node daemon");
            self.failed = true;
        }
        self.lines += 1;
    }

    /// Whether the log has grown well past the `live` entries it describes.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.lines > COMPACT_MIN_LINES && self.lines > 4 * live as u64
    }

    /// Replaces the log with `ops` (written aside, then renamed over it).
    pub fn rewrite<'a>(&mut self, ops: impl Iterator<Item = &'a T>) -> io::Result<()>
    where
        T: 'a,
    {
        let tmp = self.path.with_extension("tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        let mut lines = 0;
        for op in ops {
            serde_json::to_writer(&mut out, op).map_err(io::Error::other)?;
            out.write_all(b"\n")?;
            lines += 1;
        }
        out.into_inner().map_err(|e| e.into_error())?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        self.lines = lines;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
