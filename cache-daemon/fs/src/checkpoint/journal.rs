//! The write-back journal: an [`AppendLog`] of [`Durability::Machine`], one record per line, appended for every change the target
//! store must eventually see. Appends are plain writes (they survive the daemon's death in the
//! page cache); `sync` makes them survive the machine's, and runs on every fsync of a file.
//! Replay applies the same records in the same order, so state after a restart equals state
//! before it. At open the journal is rewritten to the records that still matter.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fs_core::{AppendLog, Durability, LogOptions};

/// One change. `seq` numbers every version of every file, increasing over the versions the
/// journal refers to (after a compaction, numbers no record holds any more may be reused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Record {
    /// Opened for writing: the local bytes are in flux, nothing is uploaded yet.
    Writing { path: String, seq: u64 },
    /// Closed after writing: this version must reach the store.
    Closed { path: String, seq: u64 },
    /// The store holds version `seq`.
    Uploaded { path: String, seq: u64 },
    /// A write failed (the write-back area was full, the disk failed): this version must never
    /// reach the store.
    Broken { path: String, seq: u64 },
    /// Removed from the mount; `store` says an object is to be deleted from the store.
    Removed { path: String, seq: u64, store: bool },
    /// The store's object at `path` is gone.
    StoreDeleted { path: String, seq: u64 },
    /// Renamed: the new path is a new version to upload; with `store`, the old object is
    /// to be deleted.
    Moved {
        from: String,
        to: String,
        seq: u64,
        store: bool,
    },
    /// The local copy was dropped; the store keeps the file.
    Evicted { path: String },
    /// Copied from the store: the local bytes equal the store's.
    Fetched { path: String, seq: u64 },
}

impl Record {
    pub fn seq(&self) -> u64 {
        match self {
            Record::Writing { seq, .. }
            | Record::Closed { seq, .. }
            | Record::Uploaded { seq, .. }
            | Record::Broken { seq, .. }
            | Record::Removed { seq, .. }
            | Record::StoreDeleted { seq, .. }
            | Record::Moved { seq, .. }
            | Record::Fetched { seq, .. } => *seq,
            Record::Evicted { .. } => 0,
        }
    }
}

/// Survives the machine: a version the journal forgets would never be uploaded.
const OPTIONS: LogOptions = LogOptions::new(Durability::Machine);

pub struct Journal {
    log: AppendLog<Record>,
}

impl Journal {
    /// Reads every record of the journal at `path` (none if it does not exist). A torn last
    /// line (the daemon died mid-append) is dropped; a bad line elsewhere is an error.
    pub fn read(path: &Path) -> io::Result<Vec<Record>> {
        AppendLog::read(path)
    }

    /// Replaces the journal at `path` with `records` atomically (write, fsync, rename) and
    /// opens it for appending.
    pub fn rewrite(path: &Path, records: &[Record]) -> io::Result<Journal> {
        Ok(Journal {
            log: AppendLog::replace(path, OPTIONS, records)?,
        })
    }

    /// Appends one record with a single write, so a crash leaves whole records or a torn last one.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        self.log.append(record)
    }

    /// Records appended since the journal was last rewritten.
    pub fn appended(&self) -> u64 {
        self.log.appended()
    }

    pub fn sync(&self) -> io::Result<()> {
        self.log.sync()
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::Write;

    #[test]
    fn records_survive_a_rewrite_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let records = vec![
            Record::Closed {
                path: "a/b".into(),
                seq: 1,
            },
            Record::Moved {
                from: "a/b".into(),
                to: "a/c".into(),
                seq: 2,
                store: true,
            },
        ];
        let mut journal = Journal::rewrite(&path, &records).expect("rewrite");
        journal
            .append(&Record::Uploaded {
                path: "a/c".into(),
                seq: 2,
            })
            .expect("append");
        drop(journal);
        // A half-written record, as a kill during append leaves it.
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"{\"op\":\"closed\",\"pa").expect("write");
        let read = Journal::read(&path).expect("read");
        assert_eq!(read.len(), 3);
        assert_eq!(read[1], records[1]);
        // A bad record that is not the last one is corruption, not a crash.
        f.write_all(b"\n{\"op\":\"evicted\",\"path\":\"x\"}\n").expect("write");
        assert!(Journal::read(&path).is_err());
    }
}
