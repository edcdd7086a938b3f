//! The PV `volumeAttributes` granary-csi hands the node daemon: the contract defined by
//! `granary_node::volume_spec` (README, "Volume attributes"). A test parses what is
//! built here with the node daemon's own parser.

use std::collections::BTreeMap;

use crate::api::checkpoint_policy::LocalMedium;
use crate::api::common::QuantityError;
use crate::api::{CheckpointPolicy, Dataset};

use super::names;

/// The host directory of Memory write-back areas (the host's tmpfs).
pub const MEMORY_WRITEBACK_DIR: &str = "/dev/shm/granary";

pub fn dataset(ds: &Dataset, namespace: &str) -> BTreeMap<String, String> {
    let name = kube::ResourceExt::name_any(ds);
    let spec = &ds.spec;
    let mut attrs = BTreeMap::from([
        ("kind".to_string(), "dataset".to_string()),
        ("source".to_string(), spec.source.uri.clone()),
        // A seed, not the member set: the mount learns the set from the workers and follows
        // it, so scaling changes no PV.
        ("workers".to_string(), names::worker_seed(&name, namespace)),
        ("metadataTTL".to_string(), spec.cache.metadata_ttl.clone()),
        ("replicas".to_string(), spec.cache.replicas.to_string()),
    ]);
    for (key, value) in &spec.source.options {
        attrs.insert(format!("option.{key}"), value.clone());
    }
    attrs
}

/// `coordinator`: where the volume's nodes reach its commit coordinator (the policy's
/// Service unless the operator was told otherwise).
pub fn checkpoint(policy: &CheckpointPolicy, coordinator: &str) -> Result<BTreeMap<String, String>, QuantityError> {
    let spec = &policy.spec;
    let mut attrs = BTreeMap::from([
        ("kind".to_string(), "checkpoint".to_string()),
        ("target".to_string(), spec.target.uri.clone()),
        ("writebackSize".to_string(), spec.local_cache.size.bytes()?.to_string()),
    ]);
    let dir = match (spec.local_cache.medium, &spec.local_cache.host_path) {
        (LocalMedium::Memory, _) => Some(MEMORY_WRITEBACK_DIR.to_string()),
        (LocalMedium::Disk, path) => path.clone(),
    };
    if let Some(dir) = dir {
        attrs.insert("writebackDir".into(), dir);
    }
    if let Some(marker) = &spec.commit_marker {
        attrs.insert("commitMarker".into(), marker.clone());
        // Several nodes write the volume: every one reports to the policy's coordinator.
        attrs.insert("commitCoordinator".into(), coordinator.to_string());
    }
    if let Some(retention) = &spec.retention {
        attrs.insert("keepLast".into(), retention.keep_last.max(0).to_string());
    }
    if let Some(upload) = &spec.upload {
        if let Some(c) = upload.concurrency {
            attrs.insert("uploadConcurrency".into(), c.to_string());
        }
        if let Some(part) = &upload.part_size {
            attrs.insert("partSize".into(), part.bytes()?.to_string());
        }
    }
    for (key, value) in &spec.target.options {
        attrs.insert(format!("option.{key}"), value.clone());
    }
    Ok(attrs)
}
