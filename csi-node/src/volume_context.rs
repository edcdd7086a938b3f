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
//! | `granary.dev/mark` | all | the operator's mark on the handle and the other attributes |
//!
//! Credentials never travel here: they come from the node-publish secret (its keys are store
//! options, e.g. `access_key_id`, `secret_access_key`). The node daemon validates the keys;
//! granary-csi reads `kind`, checks the mark, and refuses inline volumes.
//!
//! Who may write these attributes decides what a pod can make the privileged node daemon do,
//! so granary-csi serves a volume only when its attributes are the operator's: marked with
//! the installation's volume key (`granary_node_api::volume_mark`), and never an inline
//! (`Ephemeral`) volume, whose attributes any pod author writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use granary_node_api::volume_mark::{VolumeKey, KUBELET_PREFIX, MARK_ATTRIBUTE};
use tonic::Status;

/// The key the kubelet sets to "true" in the context of an inline volume (the CSIDriver has
/// podInfoOnMount, so the kubelet always sets it, over what the pod says).
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// Which volumes' attributes granary-csi takes as the operator's.
#[derive(Debug, Clone)]
pub enum VolumeTrust {
    /// Only those carrying a valid mark under this key (the default).
    Marked(Arc<VolumeKey>),
    /// Every persistent volume's: for clusters where only administrators create PVs and
    /// some write Granary PVs by hand (`--accept-unmarked-volumes`).
    AnyPersistentVolume,
}

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
    /// Reads the context of `volume_id`, refusing what the operator did not write.
    pub fn parse(volume_id: &str, context: &HashMap<String, String>, trust: &VolumeTrust) -> Result<Self, Status> {
        if context.get(EPHEMERAL_KEY).map(String::as_str) == Some("true") {
            return Err(Status::permission_denied(format!(
                "volume {volume_id:?} is an inline csi volume; granary.dev serves only the PVCs the operator makes, because an inline volume's attributes are the pod author's and would reach the node daemon's privileges: mount the Dataset's or CheckpointPolicy's PVC (or annotate the pod with granary.dev/mounts)"
            )));
        }
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
        let mut attributes: BTreeMap<String, String> = context
            .iter()
            .filter(|(k, _)| !k.starts_with(KUBELET_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let VolumeTrust::Marked(key) = trust {
            key.verify(volume_id, &attributes)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
        }
        // Checked; the node daemon takes only the spec.
        attributes.remove(MARK_ATTRIBUTE);
        Ok(VolumeContext { kind, attributes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn kubelet_keys_are_dropped_and_kind_is_required() {
        let any = VolumeTrust::AnyPersistentVolume;
        let ctx = context(&[
            ("kind", "dataset"),
            ("source", "s3://b/p"),
            ("csi.storage.k8s.io/pod.name", "trainer-0"),
            ("csi.storage.k8s.io/ephemeral", "false"),
        ]);
        let parsed = VolumeContext::parse("v", &ctx, &any).unwrap();
        assert_eq!(parsed.kind, VolumeKind::Dataset);
        assert_eq!(parsed.attributes.len(), 2, "{:?}", parsed.attributes);
        let none = VolumeContext::parse("v", &HashMap::new(), &any).unwrap_err();
        assert_eq!(none.code(), tonic::Code::InvalidArgument);
        let bad = context(&[("kind", "nfs")]);
        assert!(VolumeContext::parse("v", &bad, &any)
            .unwrap_err()
            .message()
            .contains("nfs"));
    }

    #[test]
    fn only_marked_persistent_volumes_are_served() {
        let key = Arc::new(VolumeKey::new(&[3; 32]).expect("a key"));
        let trust = VolumeTrust::Marked(Arc::clone(&key));
        let mut spec: BTreeMap<String, String> = [("kind", "checkpoint"), ("target", "s3://c/p")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        key.mark("checkpoint.ml.llama.uid", &mut spec);
        let mut ctx: HashMap<String, String> = spec.clone().into_iter().collect();
        ctx.insert("csi.storage.k8s.io/pod.name".into(), "trainer-0".into());
        let parsed = VolumeContext::parse("checkpoint.ml.llama.uid", &ctx, &trust).expect("the operator's PV");
        assert!(!parsed.attributes.contains_key(MARK_ATTRIBUTE), "the mark stays here");
        assert_eq!(parsed.attributes.len(), 2);

        // The same attributes under another handle, or one more attribute: refused.
        let copied = VolumeContext::parse("csi-0a1b", &ctx, &trust).unwrap_err();
        assert_eq!(copied.code(), tonic::Code::PermissionDenied);
        let mut widened = ctx.clone();
        widened.insert("writebackDir".into(), "/etc".into());
        let err = VolumeContext::parse("checkpoint.ml.llama.uid", &widened, &trust).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("not written by this installation's operator"),
            "{}",
            err.message()
        );

        // An inline volume is refused whatever it carries, even with trust in every PV.
        let mut inline = ctx.clone();
        inline.insert(EPHEMERAL_KEY.into(), "true".into());
        for trust in [trust, VolumeTrust::AnyPersistentVolume] {
            let err = VolumeContext::parse("csi-0a1b", &inline, &trust).unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied);
            assert!(err.message().contains("inline csi volume"), "{}", err.message());
        }
    }
}
