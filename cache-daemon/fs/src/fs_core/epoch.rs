//! The epoch of a mount's serving process, kept beside its inode log.
//!
//! Handle numbers carry the epoch, so two processes that served one kernel mount must never
//! share one. The keeper learns a take-over's epoch shortly after it happens; a daemon that
//! dies before telling it would leave the keeper's epoch behind, and the next daemon would
//! reuse its predecessor's numbers for other files. The epoch is therefore also recorded
//! here, before the mount is served, and a take-over uses one past both records.

use std::io;
use std::path::Path;

use granary_process::append_log::{AppendLog, Durability, LogOptions};

/// Only the process has to die, not the machine: after a reboot there is no mount to take over.
const OPTIONS: LogOptions = LogOptions::new(Durability::Process);

/// The epoch for a process taking over a mount whose keeper recorded `handed`: one past
/// both that and the one recorded at `path`, which it then records. An unreadable record is
/// an error, not epoch 0: reusing a predecessor's handle numbers would answer for other files.
pub fn next_epoch(path: &Path, handed: u64) -> io::Result<u64> {
    let recorded = AppendLog::<u64>::read(path)?.last().copied().unwrap_or(0);
    let epoch = recorded.max(handed) + 1;
    record(path, epoch)?;
    Ok(epoch)
}

/// Records `epoch` at `path` (written aside and renamed, so a reader sees one or the other).
pub fn record(path: &Path, epoch: u64) -> io::Result<()> {
    AppendLog::replace(path, OPTIONS, &[epoch]).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_the_keeper_never_learned_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.epoch");
        record(&path, 0).unwrap();
        // A take-over; its daemon dies before the keeper hears of epoch 1.
        assert_eq!(next_epoch(&path, 0).unwrap(), 1);
        // The next one is told epoch 0 by the keeper, and still moves past 1.
        assert_eq!(next_epoch(&path, 0).unwrap(), 2);
        // A keeper ahead of the record wins too.
        assert_eq!(next_epoch(&path, 7).unwrap(), 8);
        assert_eq!(next_epoch(&dir.path().join("missing"), 3).unwrap(), 4);
    }

    #[test]
    fn an_epoch_written_by_an_older_daemon_is_read_and_a_corrupt_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.epoch");
        // Older daemons wrote the number alone, without a newline.
        std::fs::write(&path, "5").unwrap();
        assert_eq!(next_epoch(&path, 0).unwrap(), 6);
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(next_epoch(&path, 0).is_err());
    }
}
