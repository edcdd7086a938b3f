//! A volume's spec as the node daemon receives it: the PV's `volumeAttributes` (written by
//! the operator, passed on by granary-csi) plus the node-publish secret. This is the
//! contract between them; the keys are documented in the README and DESIGN.md.
//!
//! | key | meaning |
//! |---|---|
//! | `kind` | `dataset` or `checkpoint` |
//! | `source` | dataset: the source store URI, read directly while the workers are down |
//! | `workers` | dataset: comma-separated `host:port` of the dataset's workers |
//! | `metadataTTL` | dataset: how long metadata is cached: `60s`, `never`, … |
//! | `replicas` | dataset: blocks cached on this many workers |
//! | `target` | checkpoint: the store URI checkpoints must reach |
//! | `commitMarker` | checkpoint: the file committing its directory (`.metadata`) |
//! | `keepLast` | checkpoint: committed checkpoints kept in the store (0: all) |
//! | `writebackSize` | checkpoint: size of the node-local write-back area (default: the node's) |
//! | `writebackDir` | checkpoint: host directory holding the write-back area (an NVMe mount, `/dev/shm/…`; default: the node's state dir) |
//! | `uploadConcurrency` | checkpoint: multipart parts in flight |
//! | `partSize` | checkpoint: multipart part size (`16MiB`) |
//! | `commitCoordinator` | checkpoint: `host:port` of the commit coordinator every node of the volume reports to (the CheckpointPolicy's Service) |
//! | `option.<name>` | a store option, e.g. `option.endpoint`, `option.region` |
//!
//! What a volume may reach of the host (`writebackDir`, `fs://` stores, `credentials=auto`)
//! is the node's decision, checked here by [`crate::host_access`] before anything is made.

use std::collections::BTreeMap;
use std::str::FromStr;

use std::path::PathBuf;

use granary_cache::client::parse_worker_list;
use granary_fs::checkpoint::{CheckpointMount, CommitCoordination};
use granary_fs::dataset::DatasetMount;
use granary_node_api::volume_mark::COMMIT_TOKEN_SECRET;
use granary_store::units::{ByteSize, MetadataTtl};

use crate::host_access::{AccessError, HostAccess};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("volume attribute `kind` is missing; set it to `dataset` or `checkpoint`")]
    MissingKind,
    #[error("volume kind {0:?} is not served by this node daemon; supported: dataset, checkpoint")]
    UnsupportedKind(String),
    #[error("the volume has a commit coordinator, but this node daemon has no --node-name; run it with --node-name \"$NODE_NAME\" (the downward API's spec.nodeName)")]
    NoNodeName,
    #[error("a checkpoint volume needs `target` (the store URI checkpoints must reach)")]
    NoTarget,
    #[error("a dataset volume needs `workers` (host:port list) or `source` (store URI), or both")]
    NothingToRead,
    #[error("volume attribute {key}={value:?} is invalid: {reason}")]
    Invalid { key: String, value: String, reason: String },
    #[error("unknown volume attribute {0:?}; store options are written option.<name>")]
    UnknownKey(String),
    #[error("refused by this node: {0}")]
    Access(#[from] AccessError),
}

/// Node-wide settings applied to every dataset volume.
#[derive(Debug, Clone)]
pub struct NodeDefaults {
    /// Per-volume node-local cache size; 0 disables it.
    pub local_cache_size: u64,
    pub passthrough: bool,
    pub max_readahead: u64,
    pub threads: usize,
    /// Write-back area of each checkpoint volume unless its `writebackSize` says otherwise.
    pub writeback_size: u64,
    /// What of the host volumes may reach.
    pub access: HostAccess,
    /// This node's name, as checkpoint volumes' commit coordinators know it.
    pub node_name: Option<String>,
}

/// What a volume's attributes ask for.
#[derive(Debug, Clone)]
pub enum VolumeMount {
    Dataset(Box<DatasetMount>),
    Checkpoint(Box<CheckpointMount>),
}

/// Builds the mount of any volume kind; `writeback_dir` is where a checkpoint volume keeps
/// its write-back area.
pub fn volume_mount(
    attributes: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
    defaults: &NodeDefaults,
    writeback_dir: PathBuf,
) -> Result<VolumeMount, SpecError> {
    match attributes.get("kind").map(String::as_str) {
        Some("checkpoint") => {
            checkpoint_mount(attributes, secrets, defaults, writeback_dir).map(|c| VolumeMount::Checkpoint(Box::new(c)))
        }
        _ => dataset_mount(attributes, secrets, &defaults.access).map(|d| VolumeMount::Dataset(Box::new(d))),
    }
}

/// Builds the mount of a checkpoint volume from its attributes and secrets.
pub fn checkpoint_mount(
    attributes: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
    defaults: &NodeDefaults,
    writeback_dir: PathBuf,
) -> Result<CheckpointMount, SpecError> {
    let target = attributes
        .get("target")
        .filter(|t| !t.is_empty())
        .ok_or(SpecError::NoTarget)?;
    let mut mount = CheckpointMount::new(target.clone(), writeback_dir, defaults.writeback_size);
    mount.passthrough = defaults.passthrough;
    mount.threads = defaults.threads;
    for (key, value) in attributes {
        let invalid = |reason: &str| SpecError::Invalid {
            key: key.clone(),
            value: value.clone(),
            reason: reason.to_string(),
        };
        let size = || {
            value
                .parse::<ByteSize>()
                .map(|b| b.0)
                .map_err(|_| invalid("expected a size such as 16MiB or 100GiB"))
        };
        match key.as_str() {
            "kind" | "target" => {}
            "commitMarker" => {
                if value.is_empty() || value.contains('/') {
                    return Err(invalid("expected a file name such as .metadata"));
                }
                mount.commit_marker = Some(value.clone());
            }
            "keepLast" => {
                mount.upload.keep_last = value
                    .parse()
                    .map_err(|_| invalid("expected a whole number (0 keeps all)"))?;
            }
            "writebackSize" => mount.writeback_size = size()?,
            "writebackDir" => {
                if !value.starts_with('/') {
                    return Err(invalid("expected an absolute host path such as /mnt/nvme0/granary"));
                }
                let host_dir = defaults.access.writeback_dir(value)?;
                // The volume's own directory name is kept, so volumes sharing the host
                // directory never share an area and a restarted daemon finds it again.
                let own = mount.writeback_dir.file_name().map(PathBuf::from).unwrap_or_default();
                mount.writeback_dir = host_dir.join(own);
            }
            "partSize" => mount.upload.part_size = size()?,
            "commitCoordinator" => {
                let Some(node) = defaults.node_name.clone() else {
                    return Err(SpecError::NoNodeName);
                };
                let token = secrets.get(COMMIT_TOKEN_SECRET).cloned();
                mount.coordinator = Some(CommitCoordination {
                    address: value.clone(),
                    token,
                    node,
                });
            }
            "uploadConcurrency" => {
                mount.upload.concurrency = value
                    .parse::<usize>()
                    .ok()
                    .filter(|c| (1..=256).contains(c))
                    .ok_or_else(|| invalid("expected a number from 1 to 256"))?;
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            k => match k.strip_prefix("option.") {
                Some(option) if !option.is_empty() => {
                    mount.target_options.insert(option.to_string(), value.clone());
                }
                _ => return Err(SpecError::UnknownKey(key.clone())),
            },
        }
    }
    if mount.upload.keep_last > 0 && mount.commit_marker.is_none() {
        return Err(SpecError::Invalid {
            key: "keepLast".into(),
            value: mount.upload.keep_last.to_string(),
            reason: "retention counts committed checkpoints: set commitMarker too".into(),
        });
    }
    if mount.coordinator.is_some() && mount.commit_marker.is_none() {
        return Err(SpecError::Invalid {
            key: "commitCoordinator".into(),
            value: attributes.get("commitCoordinator").cloned().unwrap_or_default(),
            reason: "the coordinator gates commits, which commitMarker defines: set commitMarker too".into(),
        });
    }
    // The coordinator's token is the node's, not a store option.
    for (key, value) in secrets.iter().filter(|(k, _)| k.as_str() != COMMIT_TOKEN_SECRET) {
        mount.target_options.insert(key.clone(), value.clone());
    }
    defaults.access.store(&mount.target, &mount.target_options)?;
    Ok(mount)
}

/// Builds the mount of a dataset volume from its attributes and secrets.
pub fn dataset_mount(
    attributes: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
    access: &HostAccess,
) -> Result<DatasetMount, SpecError> {
    let kind = attributes.get("kind").ok_or(SpecError::MissingKind)?;
    if kind != "dataset" {
        return Err(SpecError::UnsupportedKind(kind.clone()));
    }
    let workers = attributes
        .get("workers")
        .map(|w| parse_worker_list(w))
        .unwrap_or_default();
    let source = attributes.get("source").cloned().filter(|s| !s.is_empty());
    if workers.is_empty() && source.is_none() {
        return Err(SpecError::NothingToRead);
    }
    let mut mount = DatasetMount::new(workers, source);
    for (key, value) in attributes {
        let invalid = |reason: String| SpecError::Invalid {
            key: key.clone(),
            value: value.clone(),
            reason,
        };
        match key.as_str() {
            "kind" | "source" | "workers" => {}
            "metadataTTL" => {
                mount.metadata_ttl = MetadataTtl::from_str(value).map_err(|e| invalid(e.to_string()))?;
            }
            "replicas" => {
                mount.replicas = value
                    .parse::<usize>()
                    .ok()
                    .filter(|r| *r >= 1)
                    .ok_or_else(|| invalid("expected a whole number of at least 1".into()))?;
            }
            // Kubernetes adds these for pods that ask for pod info on mount.
            k if k.starts_with("csi.storage.k8s.io/") => {}
            k => match k.strip_prefix("option.") {
                Some(option) if !option.is_empty() => {
                    mount.source_options.insert(option.to_string(), value.clone());
                }
                _ => return Err(SpecError::UnknownKey(key.clone())),
            },
        }
    }
    for (key, value) in secrets {
        mount.source_options.insert(key.clone(), value.clone());
    }
    if let Some(source) = &mount.source {
        access.store(source, &mount.source_options)?;
    }
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_dataset_spec_becomes_a_mount_and_mistakes_are_named() {
        let secrets = attrs(&[("access_key_id", "k"), ("secret_access_key", "s")]);
        let access = HostAccess::default();
        let m = dataset_mount(
            &attrs(&[
                ("kind", "dataset"),
                ("source", "s3://b/p"),
                ("workers", "w-0:7070, w-1:7070"),
                ("metadataTTL", "never"),
                ("option.region", "us-east-1"),
            ]),
            &secrets,
            &access,
        )
        .unwrap();
        assert_eq!(m.workers, vec!["w-0:7070", "w-1:7070"]);
        assert_eq!(m.metadata_ttl, MetadataTtl::Never);
        assert_eq!(m.source_options.get("region").map(String::as_str), Some("us-east-1"));
        assert_eq!(m.source_options.get("secret_access_key").map(String::as_str), Some("s"));

        let err = |pairs: &[(&str, &str)]| {
            dataset_mount(&attrs(pairs), &BTreeMap::new(), &access)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[("source", "s3://b")]).contains("`kind` is missing"));
        assert!(err(&[("kind", "dataset")]).contains("needs `workers`"));
        assert!(err(&[("kind", "dataset"), ("source", "s3://b"), ("metadataTTL", "soon")]).contains("metadataTTL"));
        assert!(err(&[("kind", "dataset"), ("source", "s3://b"), ("region", "x")]).contains("option.<name>"));
        // The node's identity and its directories are not a volume's to take.
        assert!(err(&[
            ("kind", "dataset"),
            ("source", "s3://b"),
            ("option.credentials", "auto")
        ])
        .contains("--allow-auto-credentials"));
        assert!(err(&[("kind", "dataset"), ("source", "fs:///etc")]).contains("--fs-store-root"));
    }

    #[test]
    fn a_checkpoint_spec_becomes_a_mount_and_mistakes_are_named() {
        let defaults = NodeDefaults {
            local_cache_size: 0,
            passthrough: true,
            max_readahead: 1 << 20,
            threads: 2,
            writeback_size: 10 << 30,
            access: HostAccess {
                writeback_roots: vec!["/mnt/nvme0".into()],
                ..HostAccess::default()
            },
            node_name: Some("node-a".into()),
        };
        let build = |pairs: &[(&str, &str)]| {
            volume_mount(
                &attrs(pairs),
                &attrs(&[("access_key_id", "k"), ("secret_access_key", "s")]),
                &defaults,
                "/wb/vol-1".into(),
            )
        };
        let Ok(VolumeMount::Checkpoint(m)) = build(&[
            ("kind", "checkpoint"),
            ("target", "s3://ckpt/llama"),
            ("commitMarker", ".metadata"),
            ("keepLast", "3"),
            ("writebackSize", "200GiB"),
            ("option.region", "us-east-1"),
        ]) else {
            panic!("a checkpoint volume")
        };
        assert_eq!(m.target, "s3://ckpt/llama");
        assert_eq!(m.commit_marker.as_deref(), Some(".metadata"));
        assert_eq!(m.upload.keep_last, 3);
        assert_eq!(m.writeback_size, 200 << 30);
        assert_eq!(m.target_options.get("secret_access_key").map(String::as_str), Some("s"));
        assert_eq!(m.writeback_dir, PathBuf::from("/wb/vol-1"));
        let Ok(VolumeMount::Checkpoint(nvme)) = build(&[
            ("kind", "checkpoint"),
            ("target", "s3://c"),
            ("writebackDir", "/mnt/nvme0/granary"),
        ]) else {
            panic!("a checkpoint volume")
        };
        assert_eq!(nvme.writeback_dir, PathBuf::from("/mnt/nvme0/granary/vol-1"));
        let err = |pairs: &[(&str, &str)]| build(pairs).map(|_| ()).unwrap_err().to_string();
        for outside in ["/etc", "/mnt/nvme0/../../etc", "/mnt/nvme0x"] {
            let e = err(&[("kind", "checkpoint"), ("target", "s3://c"), ("writebackDir", outside)]);
            assert!(
                e.contains("refused by this node") && e.contains("--writeback-root"),
                "{outside}: {e}"
            );
        }
        let e = err(&[
            ("kind", "checkpoint"),
            ("target", "s3://c"),
            ("option.credentials", "auto"),
        ]);
        assert!(e.contains("--allow-auto-credentials"), "{e}");
        assert!(err(&[("kind", "checkpoint")]).contains("needs `target`"));
        assert!(err(&[("kind", "checkpoint"), ("target", "s3://c"), ("keepLast", "2")]).contains("commitMarker"));
        assert!(err(&[("kind", "checkpoint"), ("target", "s3://c"), ("partSize", "big")]).contains("partSize"));
        assert!(err(&[("kind", "blob")]).contains("supported: dataset, checkpoint"));
        assert!(err(&[("kind", "checkpoint"), ("target", "s3://c"), ("writebackDir", "nvme")]).contains("absolute"));
    }
}
