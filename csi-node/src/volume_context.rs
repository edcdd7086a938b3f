//! The volume context a PV (or an inline `csi:` volume) carries: the contract with the
//! operator, which writes these keys into the PV's `volumeAttributes`.
//!
//! | key | kind | meaning |
//! |---|---|---|
//! | `kind` | all | `dataset` or `checkpoint` |
//! | `source` | dataset | source store URI (`s3://bucket/prefix`), read directly while the workers are down |
//! | `workers` | dataset | comma-separated worker `host:port` list |
//! | `metadataTTL` | dataset | how long metadata is cached (`60s`, `never`) |
//! | `replicas` | dataset | workers each block is cached on |
//! | `target` | checkpoint | store URI checkpoints must reach |
//! | `commitMarker` | checkpoint | file whose upload commits its directory (`.metadata`) |
//! | `keepLast` | checkpoint | committed checkpoints kept (0: all) |
//! | `writebackSize`, `uploadConcurrency`, `partSize` | checkpoint | write-back area and upload tuning |
//! | `option.<name>` | all | a store option (`option.endpoint`, `option.region`) |
//!
//! Credentials never travel here: they come from the node-publish secret (its keys are store
//! options, e.g. `access_key_id`, `secret_access_key`). The node daemon validates the keys;
//! granary-csi reads only `kind`.

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

/// Keys kubelet adds per pod (`csi.storage.k8s.io/pod.name`, `…/ephemeral`, …): they are
/// not part of the volume's spec, and two pods sharing a volume must present the same spec.
const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    Dataset,
    Checkpoint,
}

/// A volume context split into what granary-csi decides on and what the node daemon mounts.
#[derive(Debug, Clone)]
pub struct VolumeContext {
    pub kind: VolumeKind,
    /// The spec handed to the node daemon (kubelet's per-pod keys removed).
    pub attributes: BTreeMap<String, String>,
}

impl VolumeContext {
    pub fn parse(context: &HashMap<String, String>) -> Result<Self, Status> {
        let kind = match context.get("kind").map(String::as_str) {
            Some("dataset") => VolumeKind::Dataset,
            Some("checkpoint") => VolumeKind::Checkpoint,
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "volume_context kind={other:?} is not a Granary volume kind; use `dataset` or `checkpoint`"
                )))
            }
            None => {
                return Err(Status::invalid_argument(
                    "volume_context has no `kind`; a Granary PV's volumeAttributes need kind=dataset or kind=checkpoint (the operator writes them)",
                ))
            }
        };
        let attributes = context
            .iter()
            .filter(|(k, _)| !k.starts_with(KUBELET_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(VolumeContext { kind, attributes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_keys_are_dropped_and_kind_is_required() {
        let ctx: HashMap<String, String> = [
            ("kind", "dataset"),
            ("source", "s3://b/p"),
            ("csi.storage.k8s.io/pod.name", "trainer-0"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let parsed = VolumeContext::parse(&ctx).unwrap();
        assert_eq!(parsed.kind, VolumeKind::Dataset);
        assert_eq!(parsed.attributes.len(), 2, "{:?}", parsed.attributes);
        let none = VolumeContext::parse(&HashMap::new()).unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        let bad: HashMap<String, String> = [("kind".to_string(), "nfs".to_string())].into();
        assert!(VolumeContext::parse(&bad).unwrap_err().message().contains("nfs"));
    }
}
