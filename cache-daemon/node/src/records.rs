//! The node daemon's record of its mounts, in `<state-dir>/mounts.json`: what a restarted
//! daemon mounts again, at the same paths. Written whole to a temporary file and renamed,
//! so a crash leaves the old record or the new one. It holds the volumes' credentials, so it
//! is readable by its owner only.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordFile {
    mounts: Vec<MountRecord>,
}

pub fn load(path: &Path) -> io::Result<Vec<MountRecord>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<RecordFile>(&bytes)
            .map(|f| f.mounts)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

pub fn save(path: &Path, mounts: &[MountRecord]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(&RecordFile {
        mounts: mounts.to_vec(),
    })
    .map_err(io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
}
