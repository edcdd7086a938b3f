//! Retention: keep the newest N committed checkpoints in the target store. Older ones are
//! deleted only after a newer one is committed (this runs after each commit), marker first,
//! so a half-deleted checkpoint is never shown as committed.

use super::tracker::Tracker;
use granary_store::retention::{oldest_first, to_delete};
use granary_store::target::TargetStore;
use granary_store::StoreError;

/// Lists the committed checkpoints and deletes all but the newest `keep_last`, in the store
/// and locally. Returns the directories deleted.
pub async fn enforce(
    target: &TargetStore,
    tracker: &Tracker,
    marker: &str,
    keep_last: usize,
) -> Result<Vec<String>, StoreError> {
    let committed = target.committed(marker).await?;
    if let Some(newest) = oldest_first(committed.clone()).pop() {
        tracker.set_latest_commit(Some(newest.dir));
    }
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let mut deleted = Vec::new();
    for old in to_delete(committed, keep_last) {
        if !tracker.settled_under(&old.dir) {
            tracing::info!(
                dir = old.dir,
                "retention skips a checkpoint with local changes not yet uploaded"
            );
            continue;
        }
        let marker_key = format!("{}/{marker}", old.dir);
        target.delete(&marker_key).await?;
        target.delete_dir(&old.dir).await?;
        if let Err(e) = tracker.forget_under(&old.dir) {
            tracing::warn!(dir = old.dir, error = %e, "cannot record the local removal of a deleted checkpoint");
        }
        let local = tracker.local_path(&old.dir);
        if let Err(e) = std::fs::remove_dir_all(&local) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %local.display(), error = %e, "cannot remove the local copy of a deleted checkpoint");
            }
        }
        tracing::info!(dir = old.dir, keep_last, "retention deleted an old checkpoint");
        deleted.push(old.dir);
    }
    Ok(deleted)
}
