//! The coordinator's durable state: every report, one line each, synced to disk before the
//! reply (a registration the coordinator forgets could let a checkpoint be committed without
//! that node's shard). Replayed at start; rewritten to a snapshot when it grows long.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use granary_process::append_log::{AppendLog, Durability, LogOptions};

use crate::registry::{Record, Registry};

const OPTIONS: LogOptions = LogOptions::new(Durability::Machine);

/// Records appended before the journal is rewritten to what still matters.
const COMPACT_AFTER: u64 = 50_000;

pub struct Journal {
    log: AppendLog<Record>,
}

impl Journal {
    /// Opens the journal in `state_dir`, replaying it into a registry, and compacts it.
    pub fn open(state_dir: &Path, now: Instant) -> io::Result<(Journal, Registry)> {
        std::fs::create_dir_all(state_dir)?;
        let path = Self::path_in(state_dir);
        let mut registry = Registry::default();
        for record in AppendLog::<Record>::read(&path)? {
            registry.apply(&record, now);
        }
        let log = AppendLog::replace(&path, OPTIONS, &registry.snapshot())?;
        Ok((Journal { log }, registry))
    }

    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("commit-journal.jsonl")
    }

    /// Appends `record` durably (fsync), compacting from `registry` (which already holds it)
    /// when the journal has grown long.
    pub fn append(&mut self, record: &Record, registry: &Registry) -> io::Result<()> {
        self.log.append(record)?;
        self.log.sync()?;
        if self.log.appended() > COMPACT_AFTER {
            let path = self.log.path().to_path_buf();
            self.log = AppendLog::replace(&path, OPTIONS, &registry.snapshot())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopened_journal_holds_every_unsettled_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = Instant::now();
        {
            let (mut journal, mut registry) = Journal::open(dir.path(), now).expect("open");
            for record in [
                Record::Report {
                    volume: "v".into(),
                    node: "n1".into(),
                    pending: vec!["s/a".into(), "s/b".into()],
                    settled: vec![],
                    replace: false,
                },
                Record::Report {
                    volume: "v".into(),
                    node: "n1".into(),
                    pending: vec![],
                    settled: vec!["s/a".into()],
                    replace: false,
                },
            ] {
                registry.apply(&record, now);
                journal.append(&record, &registry).expect("append");
            }
        }
        let (_journal, mut registry) = Journal::open(dir.path(), now).expect("reopen");
        let blockers = registry.may_commit("v", "n2", "s", "s/.metadata", now);
        assert_eq!(blockers.len(), 1);
        assert_eq!((blockers[0].pending, blockers[0].example.as_str()), (1, "s/b"));
    }
}
