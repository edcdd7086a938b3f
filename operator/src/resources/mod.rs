//! The Kubernetes objects a Dataset or CheckpointPolicy becomes, built as pure functions of
//! the resource so reconciling twice yields the same objects.

pub mod commit_coordinator;
pub mod names;
pub mod volume_attributes;
pub mod volumes;
pub mod workers;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

/// Field manager of every object the operator applies.
pub const FIELD_MANAGER: &str = "granary-operator";
pub const CSI_DRIVER: &str = "granary.dev";
/// Default image of the workers, overridable per Dataset and by `--worker-image`.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/granary-dev/granary:", env!("CARGO_PKG_VERSION"));

/// Labels on everything made for `owner`, so `kubectl get all -l granary.dev/dataset=x` finds it.
pub fn labels(component: &str, owner_label: &str, owner: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "granary".to_string()),
        ("app.kubernetes.io/component".to_string(), component.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
        (owner_label.to_string(), owner.to_string()),
    ])
}

/// A controller owner reference; namespaced children are garbage-collected with their owner.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// 16 hex digits identifying a sequence of strings (each ended by a NUL, so ("ab", "c") and
/// ("a", "bc") differ): what changed, not what it is.
pub fn short_hash<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}
