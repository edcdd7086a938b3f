//! The node daemon's mounts: one FUSE mount per volume, reference counted by publisher,
//! recorded in the state directory after every change and mounted again from that record
//! when the daemon starts.
//!
//! Each volume has a lock of its own, held across its slow work (mounting probes the store
//! for up to 30 s, unmounting waits for the kernel); the table's lock is held only to read
//! and change the table and write the record. A volume whose store hangs delays only its own
//! publishes, and a restart mounts every recorded volume at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Mutex;

use super::records::{self, MountRecord};
use super::volume_spec::{self, NodeDefaults, SpecError, VolumeMount};
use granary_fs::checkpoint::{self, CheckpointMountError, MountedCheckpoint};
use granary_fs::dataset::{self, MountError, MountResources, MountedFs};
use granary_fs::metrics::CheckpointMetrics;
use granary_node_api::handover::{HandedMount, HandoverLink};
use granary_node_api::proto::MountInfo;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("volume {0:?} is mounted with different attributes; unpublish it everywhere before changing its spec")]
    Conflict(String),
    #[error("volume {0:?} is not mounted on this node")]
    NotFound(String),
    #[error("mounting volume {volume_id:?} failed: {source}")]
    Mount { volume_id: String, source: MountError },
    #[error("mounting checkpoint volume {volume_id:?} failed: {source}")]
    MountCheckpoint {
        volume_id: String,
        source: CheckpointMountError,
    },
    #[error("cannot record the mounts in {path:?}: {source}")]
    Records { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Internal(String),
}

/// A live mount of either kind.
enum Mounted {
    Dataset(MountedFs),
    Checkpoint(MountedCheckpoint),
}

struct Volume {
    record: MountRecord,
    mounted: Option<Mounted>,
    /// Why `mounted` is empty, when it is.
    error: Option<String>,
}

pub struct MountTable {
    mnt_dir: PathBuf,
    cache_dir: PathBuf,
    writeback_dir: PathBuf,
    records_path: PathBuf,
    resources: MountResources,
    checkpoint_metrics: Arc<CheckpointMetrics>,
    defaults: NodeDefaults,
    runtime: Handle,
    volumes: Mutex<BTreeMap<String, Volume>>,
    /// One lock per volume id, alive while someone holds or waits for it.
    volume_locks: std::sync::Mutex<HashMap<String, Weak<Mutex<()>>>>,
    /// The keeper of this daemon's FUSE descriptors, when there is one.
    handover: Option<HandoverLink>,
    /// Descriptors a previous daemon left with the keeper, until restore takes them.
    handed: std::sync::Mutex<BTreeMap<String, HandedMount>>,
    inode_dir: PathBuf,
}

/// Serves a recorded mount, blocking: takes over the kernel mount a previous daemon left when
/// the keeper kept its descriptor, and otherwise (or when that fails) mounts afresh at the
/// same path.
fn take_over_or_mount<M, E: std::fmt::Display>(
    volume_id: &str,
    path: &Path,
    handed: Option<HandedMount>,
    take_over: impl FnOnce(dataset::Takeover) -> Result<M, E>,
    mount: impl FnOnce() -> Result<M, E>,
) -> Result<M, E> {
    if let Some(handed) = handed {
        match take_over(takeover_of(handed)) {
            Ok(mounted) => return Ok(mounted),
            Err(e) => {
                // Nobody would answer the old mount: take it off the path (pods still bound
                // to it see it fail) and mount afresh.
                tracing::error!(volume_id, error = %e, "cannot take the mount over; mounting it afresh");
                let _ = dataset::detach(path);
            }
        }
    }
    std::fs::create_dir_all(path).ok();
    mount()
}

fn takeover_of(handed: HandedMount) -> dataset::Takeover {
    let meta: HandoverMeta = serde_json::from_value(handed.meta).unwrap_or_default();
    dataset::Takeover {
        fd: handed.fd,
        epoch: meta.epoch,
        passthrough: meta.passthrough,
    }
}

/// What the keeper holds beside a descriptor: what a successor needs to serve it.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct HandoverMeta {
    epoch: u64,
    passthrough: bool,
}

/// A directory name for a volume id: readable where the id is, unique always.
fn dir_name(volume_id: &str) -> String {
    let readable: String = volume_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if readable == volume_id && !readable.starts_with('.') {
        readable
    } else {
        format!("{readable}-{:016x}", xxhash_rust::xxh3::xxh3_64(volume_id.as_bytes()))
    }
}

impl MountTable {
    pub fn new(
        state_dir: &Path,
        resources: MountResources,
        checkpoint_metrics: Arc<CheckpointMetrics>,
        defaults: NodeDefaults,
        runtime: Handle,
        handover: Option<HandoverLink>,
        handed: Vec<HandedMount>,
    ) -> io::Result<Self> {
        let mnt_dir = state_dir.join("mnt");
        let cache_dir = state_dir.join("cache");
        std::fs::create_dir_all(&mnt_dir)?;
        Ok(MountTable {
            mnt_dir,
            cache_dir,
            writeback_dir: state_dir.join("writeback"),
            records_path: state_dir.join("mounts.json"),
            resources,
            checkpoint_metrics,
            defaults,
            runtime,
            volumes: Mutex::new(BTreeMap::new()),
            volume_locks: std::sync::Mutex::new(HashMap::new()),
            handover,
            handed: std::sync::Mutex::new(handed.into_iter().map(|h| (h.volume_id.clone(), h)).collect()),
            inode_dir: state_dir.join("inodes"),
        })
    }

    /// Writes the record (fsynced) on a blocking thread, not on the runtime's.
    async fn save(&self, volumes: &BTreeMap<String, Volume>) -> Result<(), NodeError> {
        let list: Vec<MountRecord> = volumes.values().map(|v| v.record.clone()).collect();
        let path = self.records_path.clone();
        let failed = |source| NodeError::Records {
            path: self.records_path.clone(),
            source,
        };
        tokio::task::spawn_blocking(move || records::save(&path, &list))
            .await
            .map_err(|e| NodeError::Internal(format!("the record task failed: {e}")))?
            .map_err(failed)
    }

    fn spec(&self, record: &MountRecord) -> Result<VolumeMount, SpecError> {
        volume_spec::volume_mount(
            &record.attributes,
            &record.secrets,
            &self.defaults,
            self.writeback_dir.join(dir_name(&record.volume_id)),
        )
    }

    async fn mount_record(&self, record: &MountRecord) -> Result<Mounted, NodeError> {
        let mut config = match self.spec(record)? {
            VolumeMount::Dataset(config) => config,
            VolumeMount::Checkpoint(mut config) => {
                config.restartable = self.handover.is_some();
                let handed = self.take_handed(record);
                let path = record.path.clone();
                let metrics = Arc::clone(&self.checkpoint_metrics);
                let runtime = self.runtime.clone();
                let volume_id = record.volume_id.clone();
                let mounted = tokio::task::spawn_blocking(move || {
                    take_over_or_mount(
                        &volume_id,
                        &path,
                        handed,
                        |takeover| checkpoint::resume(&config, &path, takeover, Arc::clone(&metrics), runtime.clone()),
                        || checkpoint::mount(&config, &path, Arc::clone(&metrics), runtime.clone()),
                    )
                })
                .await
                .map_err(|e| NodeError::Internal(format!("the mount task failed: {e}")))?
                .map_err(|source| NodeError::MountCheckpoint {
                    volume_id: record.volume_id.clone(),
                    source,
                })?;
                self.hand_over(&record.volume_id, mounted.handover());
                return Ok(Mounted::Checkpoint(mounted));
            }
        };
        config.passthrough = self.defaults.passthrough;
        config.max_readahead = self.defaults.max_readahead;
        config.threads = self.defaults.threads;
        if self.defaults.local_cache_size > 0 {
            config.local_cache = Some((
                self.cache_dir.join(dir_name(&record.volume_id)),
                self.defaults.local_cache_size,
            ));
        }
        if self.handover.is_some() {
            config.restart_log = Some(self.inode_dir.join(format!("{}.log", dir_name(&record.volume_id))));
        }
        let handed = self.take_handed(record);
        let path = record.path.clone();
        let resources = self.resources.clone();
        let runtime = self.runtime.clone();
        let volume_id = record.volume_id.clone();
        let mounted = tokio::task::spawn_blocking(move || {
            take_over_or_mount(
                &volume_id,
                &path,
                handed,
                |takeover| dataset::resume(&config, &path, takeover, &resources, runtime.clone()),
                // A mount left by a daemon that died answers ENOTCONN; dataset::mount detaches it.
                || dataset::mount(&config, &path, &resources, runtime.clone()),
            )
        })
        .await
        .map_err(|e| NodeError::Internal(format!("the mount task failed: {e}")))?
        .map_err(|source| NodeError::Mount {
            volume_id: record.volume_id.clone(),
            source,
        })?;
        self.hand_over(&record.volume_id, mounted.handover());
        Ok(Mounted::Dataset(mounted))
    }

    /// Points a running mount's store at the credentials `record` carries now; the error
    /// says why the new ones are refused (the mount keeps the old).
    fn rotate(&self, record: &MountRecord, mounted: &Mounted) -> Result<(), String> {
        let refused = |e: &dyn std::fmt::Display| {
            format!(
                "volume {:?}: the store options with the new Secret are refused ({e}); the mount keeps the previous credentials",
                record.volume_id
            )
        };
        match (self.spec(record).map_err(|e| refused(&e))?, mounted) {
            (VolumeMount::Dataset(config), Mounted::Dataset(m)) => {
                m.rotate_source_options(&config.source_options).map_err(|e| refused(&e))
            }
            (VolumeMount::Checkpoint(config), Mounted::Checkpoint(m)) => {
                m.rotate_target_options(&config.target_options).map_err(|e| refused(&e))
            }
            _ => Err(refused(&"the volume's kind does not match its mount")),
        }
    }

    /// Has the keeper hold a mount's descriptor, with what a successor needs to serve it.
    fn hand_over(&self, volume_id: &str, handover: &dataset::Handover) {
        let Some(link) = &self.handover else { return };
        match handover.device() {
            Some(Ok(fd)) => {
                let meta = HandoverMeta {
                    epoch: handover.epoch(),
                    passthrough: handover.passthrough(),
                };
                link.hold(volume_id, fd, serde_json::to_value(meta).unwrap_or_default());
            }
            Some(Err(e)) => {
                tracing::warn!(volume_id, error = %e, "cannot duplicate the mount's descriptor; it will not survive a restart of this daemon")
            }
            None => {}
        }
    }

    /// The descriptor the keeper kept for `record`'s mount, if any.
    fn take_handed(&self, record: &MountRecord) -> Option<HandedMount> {
        self.handed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&record.volume_id)
    }

    /// The lock of one volume's mount and unmount, shared by everyone holding it now.
    async fn lock_volume(&self, volume_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.volume_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, lock| lock.strong_count() > 0);
            match locks.get(volume_id).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(Mutex::new(()));
                    locks.insert(volume_id.to_string(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        lock.lock_owned().await
    }

    /// Mounts every recorded volume again, at its recorded path, all at once. A volume that
    /// cannot be mounted stays recorded, with its error shown by List, and is retried by its
    /// next Mount.
    pub async fn restore(&self) -> io::Result<usize> {
        let recorded = records::load(&self.records_path)?;
        let mounts = recorded.into_iter().map(|record| async move {
            let _lock = self.lock_volume(&record.volume_id).await;
            let (mounted, error) = match self.mount_record(&record).await {
                Ok(m) => (Some(m), None),
                Err(e) => {
                    tracing::error!(volume_id = %record.volume_id, error = %e, "a recorded mount could not be restored");
                    (None, Some(e.to_string()))
                }
            };
            let restored = mounted.is_some();
            self.volumes
                .lock()
                .await
                .insert(record.volume_id.clone(), Volume { record, mounted, error });
            restored
        });
        let restored = futures::future::join_all(mounts)
            .await
            .into_iter()
            .filter(|restored| *restored)
            .count();
        // Descriptors of mounts no longer recorded are let go, and the keeper is told
        // exactly what this daemon serves now.
        self.handed.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Some(link) = &self.handover {
            link.sync();
        }
        Ok(restored)
    }

    /// Mounts `volume_id` for `publisher` (or joins its mount); returns the path and whether
    /// this call created the mount.
    pub async fn mount(
        &self,
        volume_id: &str,
        publisher: &str,
        attributes: BTreeMap<String, String>,
        secrets: BTreeMap<String, String>,
    ) -> Result<(PathBuf, bool), NodeError> {
        if volume_id.is_empty() {
            return Err(NodeError::InvalidArgument("volume_id is empty".into()));
        }
        if publisher.is_empty() {
            return Err(NodeError::InvalidArgument("publisher is empty".into()));
        }
        let _volume_lock = self.lock_volume(volume_id).await;
        let mut volumes = self.volumes.lock().await;
        if let Some(volume) = volumes.get_mut(volume_id) {
            if volume.record.attributes != attributes {
                return Err(NodeError::Conflict(volume_id.to_string()));
            }
            // Rotated credentials (the kubelet republishes every minute or so with the
            // Secret as it is then): the running mount uses them from its next request, and
            // the record keeps them for the next start. New ones that do not work as store
            // options are refused, and the mount keeps the old.
            let mut changed = false;
            if volume.record.secrets != secrets {
                let mut rotated = volume.record.clone();
                rotated.secrets = secrets;
                if let Some(mounted) = &volume.mounted {
                    self.rotate(&rotated, mounted).map_err(NodeError::InvalidArgument)?;
                    tracing::info!(volume_id, "the volume's Secret changed; the running mount uses it now");
                }
                volume.record.secrets = rotated.secrets;
                changed = true;
            }
            let mut created = false;
            if volume.mounted.is_none() {
                // Mounted without the table's lock; this volume's lock keeps its entry ours.
                let record = volume.record.clone();
                drop(volumes);
                let mounted = self.mount_record(&record).await?;
                volumes = self.volumes.lock().await;
                if let Some(again) = volumes.get_mut(volume_id) {
                    again.mounted = Some(mounted);
                    again.error = None;
                }
                created = true;
            }
            let Some(volume) = volumes.get_mut(volume_id) else {
                return Err(NodeError::Internal(format!(
                    "volume {volume_id:?} left the table while mounting"
                )));
            };
            let path = volume.record.path.clone();
            changed |= volume.record.publishers.insert(publisher.to_string());
            if changed {
                self.save(&volumes).await?;
            }
            return Ok((path, created));
        }
        drop(volumes);
        let record = MountRecord {
            volume_id: volume_id.to_string(),
            path: self.mnt_dir.join(dir_name(volume_id)),
            publishers: BTreeSet::from([publisher.to_string()]),
            attributes,
            secrets,
        };
        // Check the spec before touching anything.
        self.spec(&record)?;
        let mounted = self.mount_record(&record).await?;
        let path = record.path.clone();
        let mut volumes = self.volumes.lock().await;
        volumes.insert(
            volume_id.to_string(),
            Volume {
                record,
                mounted: Some(mounted),
                error: None,
            },
        );
        if let Err(e) = self.save(&volumes).await {
            // Unrecorded, the mount would not come back after a restart: undo it.
            if let Some(v) = volumes.remove(volume_id) {
                drop(volumes);
                self.unmount_volume(v).await;
            }
            return Err(e);
        }
        Ok((path, true))
    }

    async fn unmount_volume(&self, volume: Volume) {
        let path = volume.record.path.clone();
        if let Some(link) = &self.handover {
            link.release(&volume.record.volume_id);
        }
        match volume.mounted {
            Some(Mounted::Dataset(mounted)) => {
                let result = tokio::task::spawn_blocking(move || mounted.unmount()).await;
                if let Ok(Err(e)) = result {
                    tracing::warn!(path = %path.display(), error = %e, "unmount reported an error");
                }
                self.resources.metrics.mounts.dec();
            }
            Some(Mounted::Checkpoint(mut mounted)) => {
                if let Err(e) = mounted.close_mount().await {
                    tracing::warn!(path = %path.display(), error = %e, "unmount reported an error");
                }
                // No pod uses the volume any more, but its closed files must still reach
                // the store: the uploader finishes in the background.
                let volume_id = volume.record.volume_id.clone();
                tokio::spawn(async move {
                    while !mounted.drain(Duration::from_secs(3600)).await {
                        tracing::warn!(
                            volume_id,
                            "checkpoint uploads still pending after an hour; still trying"
                        );
                    }
                    let _ = mounted.unmount().await;
                    tracing::info!(volume_id, "checkpoint volume's uploads done");
                });
            }
            None => {}
        }
        let _ = std::fs::remove_dir(&path);
    }

    /// Drops `publisher`'s reference to `volume_id`; the last one unmounts. Returns whether
    /// the mount went away and how many publishers are left.
    pub async fn unmount(&self, volume_id: &str, publisher: &str) -> Result<(bool, u32), NodeError> {
        if volume_id.is_empty() {
            return Err(NodeError::InvalidArgument("volume_id is empty".into()));
        }
        let _volume_lock = self.lock_volume(volume_id).await;
        let mut volumes = self.volumes.lock().await;
        let volume = volumes
            .get_mut(volume_id)
            .ok_or_else(|| NodeError::NotFound(volume_id.to_string()))?;
        let removed = volume.record.publishers.remove(publisher);
        let left = volume.record.publishers.len() as u32;
        if left > 0 {
            if removed {
                self.save(&volumes).await?;
            }
            return Ok((false, left));
        }
        let Some(volume) = volumes.remove(volume_id) else {
            return Ok((false, 0));
        };
        self.save(&volumes).await?;
        drop(volumes);
        self.unmount_volume(volume).await;
        tracing::info!(volume_id, "the last publisher left; unmounted");
        Ok((true, 0))
    }

    pub async fn list(&self) -> Vec<MountInfo> {
        self.volumes
            .lock()
            .await
            .values()
            .map(|v| MountInfo {
                volume_id: v.record.volume_id.clone(),
                path: v.record.path.to_string_lossy().into_owned(),
                publishers: v.record.publishers.iter().cloned().collect(),
                attributes: v.record.attributes.clone().into_iter().collect(),
                // Not mounted, or mounted while the target refuses its uploads.
                error: v
                    .error
                    .clone()
                    .or_else(|| match &v.mounted {
                        Some(Mounted::Checkpoint(m)) => m.upload_refusal(),
                        _ => None,
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_become_safe_unique_directory_names() {
        assert_eq!(dir_name("pvc-123"), "pvc-123");
        let a = dir_name("ns/a b");
        assert!(a.starts_with("ns_a_b-") && !a.contains('/'), "{a}");
        assert_ne!(dir_name("ns/a"), dir_name("ns_a"), "sanitising must not merge ids");
        assert_ne!(dir_name(".."), "..");
    }
}
