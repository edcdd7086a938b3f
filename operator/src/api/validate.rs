//! The checks the CRD's OpenAPI schema cannot express. The webhook denies with these
//! messages; the controllers report them in status, so an object that slipped past a
//! webhook that was down still tells its user what to change.

use std::str::FromStr;

use granary_store::source::build_operator;
use granary_store::units::MetadataTtl;

use super::checkpoint_policy::{CheckpointPolicySpec, LocalMedium};
use super::common::StoreRef;
use super::dataset::{DatasetSpec, Medium};

/// Longest Dataset name: its worker pods are `<name>-worker-<n>`, and pod names (hostnames
/// in the Service's DNS) must fit a 63-character DNS label.
pub const MAX_DATASET_NAME: usize = 45;
/// Option keys that are credentials and belong in the Secret named by `secretRef`.
const CREDENTIAL_KEYS: &[&str] = &[
    "access_key_id",
    "secret_access_key",
    "session_token",
    "account_key",
    "credential",
];

/// Every problem found, each naming the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("; "))]
pub struct Invalid {
    pub problems: Vec<String>,
}

fn finish(problems: Vec<String>) -> Result<(), Invalid> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid { problems })
    }
}

pub fn dataset(name: &str, spec: &DatasetSpec) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    if name.len() > MAX_DATASET_NAME {
        problems.push(format!(
            "metadata.name {name:?} is {} characters; a Dataset name can have at most {MAX_DATASET_NAME} (its worker pods are named <name>-worker-<n>)",
            name.len()
        ));
    }
    store("spec.source", &spec.source, &mut problems);
    let cache = &spec.cache;
    match cache.block_size.bytes() {
        Ok(b) if (64 << 10..=64 << 20).contains(&b) => {}
        Ok(_) => problems.push(format!(
            "spec.cache.blockSize {:?} is outside 64Ki..64Mi; 4Mi suits most datasets",
            cache.block_size.0
        )),
        Err(e) => problems.push(format!("spec.cache.blockSize: {e}")),
    }
    for medium in [Medium::Memory, Medium::Disk] {
        if cache.tiers.iter().filter(|t| t.medium == medium).count() > 1 {
            problems.push(format!(
                "spec.cache.tiers has two {medium:?} tiers; give one of each at most"
            ));
        }
    }
    for (i, tier) in cache.tiers.iter().enumerate() {
        match tier.size.bytes() {
            Ok(0) => problems.push(format!(
                "spec.cache.tiers[{i}].size is 0; give the tier a size such as 100Gi or remove it"
            )),
            Ok(_) => {}
            Err(e) => problems.push(format!("spec.cache.tiers[{i}].size: {e}")),
        }
        if tier.medium == Medium::Memory && tier.storage_class_name.is_some() {
            problems.push(format!(
                "spec.cache.tiers[{i}] is a Memory tier with a storageClassName; storage classes apply to Disk tiers only"
            ));
        }
    }
    if cache.replicas > cache.workers {
        problems.push(format!(
            "spec.cache.replicas ({}) is more than spec.cache.workers ({}); a block cannot be on more workers than there are",
            cache.replicas, cache.workers
        ));
    }
    if let Err(e) = MetadataTtl::from_str(&cache.metadata_ttl) {
        problems.push(format!("spec.cache.metadataTTL: {e}"));
    }
    if spec.prewarm.paths.is_empty() {
        problems.push("spec.prewarm.paths is empty; use [\"/\"] for everything".into());
    }
    for (i, path) in spec.prewarm.paths.iter().enumerate() {
        if path.split('/').any(|c| c == "..") {
            problems.push(format!(
                "spec.prewarm.paths[{i}] {path:?} contains `..`; give a path inside the source"
            ));
        }
    }
    finish(problems)
}

pub fn checkpoint_policy(spec: &CheckpointPolicySpec) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    store("spec.target", &spec.target, &mut problems);
    match spec.local_cache.size.bytes() {
        Ok(b) if b >= 64 << 20 => {}
        Ok(_) => problems.push(format!(
            "spec.localCache.size {:?} is below 64Mi; give room for at least a few checkpoint shards, e.g. 50Gi",
            spec.local_cache.size.0
        )),
        Err(e) => problems.push(format!("spec.localCache.size: {e}")),
    }
    if spec.local_cache.medium == LocalMedium::Memory && spec.local_cache.host_path.is_some() {
        problems.push("spec.localCache.hostPath is set with medium Memory; a Memory area lives in /dev/shm — drop hostPath or use medium Disk".into());
    }
    if let Some(retention) = &spec.retention {
        if retention.keep_last > 0 && spec.commit_marker.is_none() {
            problems.push("spec.retention.keepLast counts committed checkpoints; set spec.commitMarker too (e.g. .metadata for PyTorch DCP)".into());
        }
    }
    if let Some(upload) = &spec.upload {
        if let Some(part) = &upload.part_size {
            match part.bytes() {
                Ok(b) if (5 << 20..=5 << 30).contains(&b) => {}
                Ok(_) => problems.push(format!(
                    "spec.upload.partSize {:?} is outside 5Mi..5Gi, the multipart limits of S3; 16Mi is a good default",
                    part.0
                )),
                Err(e) => problems.push(format!("spec.upload.partSize: {e}")),
            }
        }
    }
    finish(problems)
}

fn store(field: &str, store: &StoreRef, problems: &mut Vec<String>) {
    for key in store.options.keys() {
        if CREDENTIAL_KEYS.contains(&key.as_str()) {
            problems.push(format!(
                "{field}.options.{key} is a credential; put it in a Secret and name the Secret in {field}.secretRef"
            ));
        }
    }
    // Builds the store client without touching the network: a malformed URI, an unknown
    // scheme or option is reported here. Credentials come from the Secret, which is read
    // (and reported on) by the controller; stand-ins take their place here.
    let mut options = store.options.clone();
    if store.secret_ref.is_some() && store.uri.starts_with("s3://") {
        for key in ["access_key_id", "secret_access_key"] {
            options.entry(key.to_string()).or_insert_with(|| "from-secret".into());
        }
    }
    if let Err(e) = build_operator(&store.uri, &options) {
        problems.push(format!("{field}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::ByteQuantity;
    use super::super::dataset::{CacheTier, PrewarmSpec};
    use super::*;

    fn spec() -> DatasetSpec {
        serde_json::from_value(serde_json::json!({
            "source": {"uri": "s3://datasets/imagenet/", "options": {"region": "us-east-1"}, "secretRef": {"name": "s3"}},
        }))
        .expect("a minimal Dataset")
    }

    #[test]
    fn a_minimal_dataset_passes_with_its_defaults() {
        let s = spec();
        assert_eq!(s.cache.workers, 1);
        assert_eq!(s.cache.block_size.bytes(), Ok(4 << 20));
        assert_eq!(s.prewarm.paths, vec!["/"]);
        dataset("imagenet", &s).expect("valid");
    }

    #[test]
    fn every_problem_is_named_with_its_field_and_fix() {
        let mut s = spec();
        s.source.uri = "s3:/datasets".into();
        s.source.options.insert("secret_access_key".into(), "x".into());
        s.cache.block_size = ByteQuantity::new("1Gi");
        s.cache.tiers.push(CacheTier {
            medium: crate::api::dataset::Medium::Memory,
            size: ByteQuantity::new("0"),
            storage_class_name: Some("fast".into()),
        });
        s.cache.replicas = 3;
        s.cache.metadata_ttl = "soon".into();
        s.prewarm = PrewarmSpec {
            paths: vec!["/a/../b".into()],
            ..PrewarmSpec::default()
        };
        let long = "x".repeat(46);
        let err = dataset(&long, &s).unwrap_err();
        let all = err.to_string();
        for expected in [
            "at most 45",
            "spec.source.options.secret_access_key is a credential; put it in a Secret",
            "spec.source:",
            "spec.cache.blockSize \"1Gi\" is outside 64Ki..64Mi",
            "two Memory tiers",
            "tiers[1].size is 0",
            "storage classes apply to Disk tiers only",
            "replicas (3) is more than spec.cache.workers (1)",
            "spec.cache.metadataTTL",
            "contains `..`",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in {all}");
        }
        assert_eq!(err.problems.len(), 10, "{all}");
    }

    #[test]
    fn checkpoint_policy_mistakes_are_named() {
        let mut p: CheckpointPolicySpec = serde_json::from_value(serde_json::json!({
            "target": {"uri": "s3://ckpt/llama/", "options": {"region": "us-east-1"}, "secretRef": {"name": "s3"}},
            "commitMarker": ".metadata",
            "retention": {"keepLast": 3},
        }))
        .expect("a CheckpointPolicy");
        checkpoint_policy(&p).expect("valid");
        p.commit_marker = None;
        p.local_cache.size = ByteQuantity::new("1Mi");
        p.local_cache.medium = LocalMedium::Memory;
        p.local_cache.host_path = Some("/mnt/nvme".into());
        p.upload = Some(super::super::checkpoint_policy::UploadSpec {
            concurrency: None,
            part_size: Some(ByteQuantity::new("1Mi")),
        });
        let all = checkpoint_policy(&p).unwrap_err().to_string();
        for expected in [
            "set spec.commitMarker",
            "below 64Mi",
            "drop hostPath",
            "outside 5Mi..5Gi",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in {all}");
        }
    }
}
