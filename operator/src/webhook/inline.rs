//! Inline `csi:` volumes of driver `granary.dev` in a Pod. The node plugin never serves one
//! (its attributes are the pod author's), so when the installation allows them
//! (`--inline-volumes`, helm `webhook.inlineVolumes`) the webhook turns each into the PVC of
//! the Dataset or CheckpointPolicy it names in the pod's own namespace — the operator's
//! volume, with the operator's attributes. An inline volume may carry only that name:
//! `volumeAttributes: {dataset: imagenet}` or `{checkpointPolicy: llama}`.

use serde_json::{json, Value};

use super::mounts::MountKind;
use crate::resources::names;
use crate::resources::CSI_DRIVER;

/// One inline granary.dev volume of a pod spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InlineVolume {
    /// Its index in `spec.volumes`.
    pub index: usize,
    /// Its name in the pod (what the containers' volumeMounts say).
    pub volume: String,
    pub kind: MountKind,
    pub name: String,
}

impl InlineVolume {
    pub fn claim(&self) -> String {
        match self.kind {
            MountKind::Dataset => names::dataset_claim(&self.name),
            MountKind::Checkpoint => names::checkpoint_claim(&self.name),
        }
    }
}

/// The granary.dev inline volumes of `spec` (a pod spec); an error names one that carries
/// anything but the name of a Dataset or CheckpointPolicy.
pub fn find(spec: &Value) -> Result<Vec<InlineVolume>, String> {
    let Some(volumes) = spec.get("volumes").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for (index, v) in volumes.iter().enumerate() {
        let Some(csi) = v.get("csi") else { continue };
        if csi.get("driver").and_then(Value::as_str) != Some(CSI_DRIVER) {
            continue;
        }
        let volume = v.get("name").and_then(Value::as_str).unwrap_or("?").to_string();
        let refuse = |what: &str| {
            format!(
                "inline volume {volume:?}: {what}; an inline granary.dev volume only names a Dataset or CheckpointPolicy of this namespace (volumeAttributes: {{dataset: <name>}} or {{checkpointPolicy: <name>}}), whose own store, credentials and host paths the operator applies"
            )
        };
        if csi.get("nodePublishSecretRef").is_some() {
            return Err(refuse(
                "nodePublishSecretRef is not taken (the Dataset's or CheckpointPolicy's secretRef is)",
            ));
        }
        let empty = serde_json::Map::new();
        let attributes = csi.get("volumeAttributes").and_then(Value::as_object).unwrap_or(&empty);
        let mut named = None;
        for (key, value) in attributes {
            let kind = match key.as_str() {
                "dataset" => MountKind::Dataset,
                "checkpointPolicy" => MountKind::Checkpoint,
                other => return Err(refuse(&format!("attribute {other:?} is not allowed"))),
            };
            let name = value
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| refuse(&format!("{key} must be a name")))?;
            if named.is_some() {
                return Err(refuse("it names more than one resource"));
            }
            named = Some((kind, name.to_string()));
        }
        let (kind, name) = named.ok_or_else(|| refuse("it names nothing"))?;
        found.push(InlineVolume {
            index,
            volume,
            kind,
            name,
        });
    }
    Ok(found)
}

/// Replaces each inline volume of `spec` by the PVC it names (read-only for a Dataset, and
/// for a CheckpointPolicy when the inline volume said so).
pub fn replace(spec: &mut Value, found: &[InlineVolume]) {
    let Some(volumes) = spec.get_mut("volumes").and_then(Value::as_array_mut) else {
        return;
    };
    for v in found {
        let Some(slot) = volumes.get_mut(v.index) else { continue };
        let read_only = v.kind == MountKind::Dataset || slot["csi"]["readOnly"].as_bool() == Some(true);
        *slot = json!({
            "name": v.volume,
            "persistentVolumeClaim": { "claimName": v.claim(), "readOnly": read_only },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_inline_volume_becomes_its_claim_and_anything_else_is_refused() {
        let mut spec = json!({"volumes": [
            {"name": "scratch", "emptyDir": {}},
            {"name": "data", "csi": {"driver": "granary.dev", "volumeAttributes": {"dataset": "imagenet"}}},
            {"name": "ckpt", "csi": {"driver": "granary.dev", "volumeAttributes": {"checkpointPolicy": "llama"}}},
            {"name": "other", "csi": {"driver": "other.csi.example", "volumeAttributes": {"x": "y"}}},
        ]});
        let found = find(&spec).expect("two named volumes");
        assert_eq!(found.len(), 2);
        replace(&mut spec, &found);
        assert_eq!(
            spec["volumes"][1],
            json!({"name": "data", "persistentVolumeClaim": {"claimName": names::dataset_claim("imagenet"), "readOnly": true}})
        );
        assert_eq!(
            spec["volumes"][2],
            json!({"name": "ckpt", "persistentVolumeClaim": {"claimName": names::checkpoint_claim("llama"), "readOnly": false}})
        );
        assert_eq!(
            spec["volumes"][3]["csi"]["driver"], "other.csi.example",
            "other drivers are left alone"
        );

        for (what, csi) in [
            (
                "an endpoint",
                json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "d", "option.endpoint": "http://169.254.169.254"}}),
            ),
            (
                "a host path",
                json!({"driver": "granary.dev", "volumeAttributes": {"checkpointPolicy": "p", "writebackDir": "/etc"}}),
            ),
            (
                "raw attributes",
                json!({"driver": "granary.dev", "volumeAttributes": {"kind": "checkpoint", "target": "s3://b"}}),
            ),
            (
                "a secret",
                json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "d"}, "nodePublishSecretRef": {"name": "s"}}),
            ),
            (
                "two names",
                json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "d", "checkpointPolicy": "p"}}),
            ),
            ("no name", json!({"driver": "granary.dev"})),
        ] {
            let err = find(&json!({"volumes": [{"name": "v", "csi": csi}]})).unwrap_err();
            assert!(
                err.contains("only names a Dataset or CheckpointPolicy"),
                "{what}: {err}"
            );
        }
    }
}
