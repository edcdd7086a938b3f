//! The PV (cluster-scoped, CSI driver `granary.dev`) and the PVC bound to it that users
//! mount, for a Dataset and for a CheckpointPolicy.

use std::collections::BTreeMap;

use granary_node_api::volume_mark::VolumeKey;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec, SecretReference, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::api::common::{QuantityError, StoreRef};
use crate::api::{CheckpointPolicy, Dataset};

use super::workers::DATASET_LABEL;
use super::{labels, names, owner_ref, volume_attributes, CSI_DRIVER};

pub const CHECKPOINT_POLICY_LABEL: &str = "granary.dev/checkpoint-policy";

/// What one volume is made of, for either resource.
struct VolumePlan {
    pv_name: String,
    claim_name: String,
    namespace: String,
    handle: String,
    attributes: BTreeMap<String, String>,
    access_mode: &'static str,
    capacity: u64,
    labels: BTreeMap<String, String>,
    store: StoreRef,
}

fn pv(plan: &VolumePlan, key: &VolumeKey) -> PersistentVolume {
    // Marked: the nodes serve only attributes the operator wrote, for this handle.
    let mut attributes = plan.attributes.clone();
    key.mark(&plan.handle, &mut attributes);
    let storage = BTreeMap::from([("storage".to_string(), Quantity(plan.capacity.to_string()))]);
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(plan.pv_name.clone()),
            labels: Some(plan.labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec![plan.access_mode.into()]),
            capacity: Some(storage),
            // Pre-bound to its claim, so no other claim can take it.
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                name: Some(plan.claim_name.clone()),
                namespace: Some(plan.namespace.clone()),
                ..ObjectReference::default()
            }),
            // Removed by the operator's finalizer, never by a provisioner.
            persistent_volume_reclaim_policy: Some("Retain".into()),
            storage_class_name: Some(String::new()),
            csi: Some(CSIPersistentVolumeSource {
                driver: CSI_DRIVER.into(),
                volume_handle: plan.handle.clone(),
                volume_attributes: Some(attributes),
                node_publish_secret_ref: plan.store.secret_ref.as_ref().map(|s| SecretReference {
                    name: Some(s.name.clone()),
                    namespace: Some(plan.namespace.clone()),
                }),
                read_only: None,
                ..CSIPersistentVolumeSource::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        ..PersistentVolume::default()
    }
}

fn pvc<K: kube::Resource<DynamicType = ()>>(plan: &VolumePlan, owner: &K) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(plan.claim_name.clone()),
            namespace: Some(plan.namespace.clone()),
            labels: Some(plan.labels.clone()),
            owner_references: Some(vec![owner_ref(owner)]),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec![plan.access_mode.into()]),
            storage_class_name: Some(String::new()),
            volume_name: Some(plan.pv_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(plan.capacity.to_string()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn dataset_plan(ds: &Dataset) -> Result<VolumePlan, QuantityError> {
    let namespace = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let mut capacity = 0u64;
    for tier in &ds.spec.cache.tiers {
        capacity = capacity.saturating_add(tier.size.bytes()?);
    }
    Ok(VolumePlan {
        pv_name: names::dataset_pv(&namespace, &name),
        claim_name: names::dataset_claim(&name),
        handle: format!("dataset.{namespace}.{name}.{}", ds.uid().unwrap_or_default()),
        attributes: volume_attributes::dataset(ds, &namespace),
        access_mode: "ReadOnlyMany",
        capacity: capacity.saturating_mul(ds.spec.cache.workers.max(1) as u64),
        labels: labels("volume", DATASET_LABEL, &name),
        store: ds.spec.source.clone(),
        namespace,
    })
}

fn checkpoint_plan(policy: &CheckpointPolicy, coordinator: &str) -> Result<VolumePlan, QuantityError> {
    let namespace = policy.namespace().unwrap_or_default();
    let name = policy.name_any();
    Ok(VolumePlan {
        pv_name: names::checkpoint_pv(&namespace, &name),
        claim_name: names::checkpoint_claim(&name),
        handle: checkpoint_handle(policy),
        attributes: volume_attributes::checkpoint(policy, coordinator)?,
        access_mode: "ReadWriteMany",
        capacity: policy.spec.local_cache.size.bytes()?,
        labels: labels("volume", CHECKPOINT_POLICY_LABEL, &name),
        store: policy.spec.target.clone(),
        namespace,
    })
}

/// The CSI volume handle of a CheckpointPolicy's PV (its commit token is derived from it).
pub fn checkpoint_handle(policy: &CheckpointPolicy) -> String {
    format!(
        "checkpoint.{}.{}.{}",
        policy.namespace().unwrap_or_default(),
        policy.name_any(),
        policy.uid().unwrap_or_default()
    )
}

pub fn dataset_volume(
    ds: &Dataset,
    key: &VolumeKey,
) -> Result<(PersistentVolume, PersistentVolumeClaim), QuantityError> {
    let plan = dataset_plan(ds)?;
    Ok((pv(&plan, key), pvc(&plan, ds)))
}

pub fn checkpoint_volume(
    policy: &CheckpointPolicy,
    key: &VolumeKey,
    coordinator: &str,
) -> Result<(PersistentVolume, PersistentVolumeClaim), QuantityError> {
    let plan = checkpoint_plan(policy, coordinator)?;
    Ok((pv(&plan, key), pvc(&plan, policy)))
}
