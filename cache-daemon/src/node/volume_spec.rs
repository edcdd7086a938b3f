//! A volume's spec as the node daemon receives it: the PV's `volumeAttributes` (written by
//! the operator, passed on by granary-csi) plus the node-publish secret. This is the
//! contract between them; the keys are documented in the README and DESIGN.md.
//!
//! | key | meaning |
//! |---|---|
//! | `kind` | `dataset` (`checkpoint` volumes come with the checkpoint write path) |
//! | `source` | the source store URI, read directly while the workers are down |
//! | `workers` | comma-separated `host:port` of the dataset's workers |
//! | `metadataTTL` | how long metadata is cached: `60s`, `never`, … |
//! | `replicas` | blocks cached on this many workers |
//! | `option.<name>` | a store option, e.g. `option.endpoint`, `option.region` |

use std::collections::BTreeMap;
use std::str::FromStr;

use crate::client::parse_worker_list;
use crate::fuse::DatasetMount;
use crate::units::MetadataTtl;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("volume attribute `kind` is missing; set it to `dataset`")]
    MissingKind,
    #[error("volume kind {0:?} is not served by this node daemon; supported: dataset")]
    UnsupportedKind(String),
    #[error("a dataset volume needs `workers` (host:port list) or `source` (store URI), or both")]
    NothingToRead,
    #[error("volume attribute {key}={value:?} is invalid: {reason}")]
    Invalid { key: String, value: String, reason: String },
    #[error("unknown volume attribute {0:?}; store options are written option.<name>")]
    UnknownKey(String),
}

/// Node-wide settings applied to every dataset volume.
#[derive(Debug, Clone)]
pub struct NodeDefaults {
    /// Per-volume node-local cache size; 0 disables it.
    pub local_cache_size: u64,
    pub passthrough: bool,
    pub max_readahead: u64,
    pub threads: usize,
}

/// Builds the mount of a dataset volume from its attributes and secrets.
pub fn dataset_mount(
    attributes: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
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
        let secrets = attrs(&[("secret_access_key", "s")]);
        let m = dataset_mount(
            &attrs(&[
                ("kind", "dataset"),
                ("source", "s3://b/p"),
                ("workers", "w-0:7070, w-1:7070"),
                ("metadataTTL", "never"),
                ("option.region", "us-east-1"),
            ]),
            &secrets,
        )
        .unwrap();
        assert_eq!(m.workers, vec!["w-0:7070", "w-1:7070"]);
        assert_eq!(m.metadata_ttl, MetadataTtl::Never);
        assert_eq!(m.source_options.get("region").map(String::as_str), Some("us-east-1"));
        assert_eq!(m.source_options.get("secret_access_key").map(String::as_str), Some("s"));

        let err = |pairs: &[(&str, &str)]| dataset_mount(&attrs(pairs), &BTreeMap::new()).unwrap_err().to_string();
        assert!(err(&[("source", "s3://b")]).contains("`kind` is missing"));
        assert!(err(&[("kind", "dataset")]).contains("needs `workers`"));
        assert!(err(&[("kind", "dataset"), ("source", "s3://b"), ("metadataTTL", "soon")]).contains("metadataTTL"));
        assert!(err(&[("kind", "dataset"), ("source", "s3://b"), ("region", "x")]).contains("option.<name>"));
    }
}
