//! The epoch of a mount's serving process, kept beside its inode log.
//!
//! Handle numbers carry the epoch, so two processes that served one kernel mount must never
//! share one. The keeper learns a take-over's epoch shortly after it happens; a daemon that
//! dies before telling it would leave the keeper's epoch behind, and the next daemon would
//! reuse its predecessor's numbers for other files. The epoch is therefore also recorded
//! here, before the mount is served, and a take-over uses one past both records.

use std::io;
use std::path::Path;

/// The epoch for a process taking over a mount whose keeper recorded `handed`: one past
/// both that and the one recorded at `path`, which it then records (no fsync: only the
/// process has to die, not the machine).
pub fn next_epoch(path: &Path, handed: u64) -> io::Result<u64> {
    let recorded = match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let epoch = recorded.max(handed) + 1;
    record(path, epoch)?;
    Ok(epoch)
}

/// Records `epoch` at `path` (written aside and renamed, so a reader sees one or the other).
pub fn record(path: &Path, epoch: u64) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("epoch-tmp");
    std::fs::write(&tmp, epoch.to_string())?;
    std::fs::rename(&tmp, path)
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
}
