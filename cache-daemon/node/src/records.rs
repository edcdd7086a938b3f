//! The node daemon's record of its mounts, in `<state-dir>/mounts.json`: what a restarted
//! daemon mounts again, at the same paths. An `AppendLog` of one record per mount, written
//! whole aside and renamed (fsynced), so a crash leaves the old records or the new ones. It
//! holds the volumes' credentials, so it is readable by its owner only.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use granary_fs::fs_core::{AppendLog, Durability, LogOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub volume_id: String,
    pub path: PathBuf,
    pub publishers: BTreeSet<String>,
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

/// What daemons before the one-record-per-line format wrote: one JSON object.
#[derive(Debug, Default, Deserialize)]
struct LegacyRecordFile {
    mounts: Vec<MountRecord>,
}

/// Survives the machine, readable by its owner only: it holds the volumes' secrets.
const OPTIONS: LogOptions = LogOptions::new(Durability::Machine).mode(0o600);

pub fn load(path: &Path) -> io::Result<Vec<MountRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<LegacyRecordFile>(&bytes) {
            Ok(legacy) => Ok(legacy.mounts),
            Err(_) => AppendLog::read(path),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

pub fn save(path: &Path, mounts: &[MountRecord]) -> io::Result<()> {
    AppendLog::replace(path, OPTIONS, mounts).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mounts.json");
        assert!(load(&path).unwrap().is_empty());
        let record = MountRecord {
            volume_id: "v".into(),
            path: dir.path().join("mnt/v"),
            publishers: ["/pods/a".to_string()].into(),
            attributes: [("kind".to_string(), "dataset".to_string())].into(),
            secrets: BTreeMap::new(),
        };
        save(&path, std::slice::from_ref(&record)).unwrap();
        assert_eq!(load(&path).unwrap(), vec![record]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn records_of_an_older_daemon_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mounts.json");
        let legacy = r#"{
  "mounts": [
    { "volume_id": "v", "path": "/mnt/v", "publishers": ["/pods/a"], "attributes": {} }
  ]
}"#;
        std::fs::write(&path, legacy).unwrap();
        let mounts = load(&path).unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].volume_id, "v");
        save(&path, &mounts).unwrap();
        assert_eq!(load(&path).unwrap(), mounts);
    }
}
