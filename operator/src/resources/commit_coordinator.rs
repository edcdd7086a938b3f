//! The commit coordinator of a CheckpointPolicy with a commit marker: a one-replica
//! StatefulSet (`granary-cache commit-coordinator`) whose journal lives on its own PVC, a
//! Service every node of the volume reports to, and the Secret holding its token (derived
//! from the volume key and the volume's handle, so granary-csi derives the same for the
//! nodes and no pod can).

use std::collections::BTreeMap;

use granary_node_api::volume_mark::VolumeKey;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, Secret, SecretVolumeSource, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::api::CheckpointPolicy;

use super::names::{self, COMMIT_GRPC_PORT, COMMIT_METRICS_PORT};
use super::volumes::CHECKPOINT_POLICY_LABEL;
use super::{labels, owner_ref};

const STATE_DIR: &str = "/var/lib/granary/commit";
const TOKEN_DIR: &str = "/etc/granary/commit-token";
/// The key of the token in its Secret.
pub const TOKEN_KEY: &str = "token";

fn meta(policy: &CheckpointPolicy, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: policy.namespace(),
        labels: Some(labels(
            "commit-coordinator",
            CHECKPOINT_POLICY_LABEL,
            &policy.name_any(),
        )),
        owner_references: Some(vec![owner_ref(policy)]),
        ..ObjectMeta::default()
    }
}

fn selector(policy: &CheckpointPolicy) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/component".to_string(),
            "commit-coordinator".to_string(),
        ),
        (CHECKPOINT_POLICY_LABEL.to_string(), policy.name_any()),
    ])
}

/// The coordinator's token: the volume key's for the policy's volume handle.
pub fn token(key: &VolumeKey, handle: &str) -> String {
    key.commit_token(handle)
}

pub fn secret(policy: &CheckpointPolicy, key: &VolumeKey, handle: &str) -> Secret {
    Secret {
        metadata: meta(policy, names::commit_token_secret(&policy.name_any())),
        string_data: Some(BTreeMap::from([(TOKEN_KEY.to_string(), token(key, handle))])),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

pub fn service(policy: &CheckpointPolicy) -> Service {
    Service {
        metadata: meta(policy, names::commit_coordinator(&policy.name_any())),
        spec: Some(ServiceSpec {
            selector: Some(selector(policy)),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: COMMIT_GRPC_PORT,
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: COMMIT_METRICS_PORT,
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub fn statefulset(policy: &CheckpointPolicy, image: &str) -> StatefulSet {
    let name = names::commit_coordinator(&policy.name_any());
    let quantity = |s: &str| Quantity(s.into());
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let container = Container {
        name: "coordinator".into(),
        image: Some(image.to_string()),
        command: Some(vec!["granary-cache".into()]),
        args: Some(vec![
            "commit-coordinator".into(),
            format!("--listen=0.0.0.0:{COMMIT_GRPC_PORT}"),
            format!("--state-dir={STATE_DIR}"),
            format!("--token-file={TOKEN_DIR}/{TOKEN_KEY}"),
            format!("--metrics-listen=0.0.0.0:{COMMIT_METRICS_PORT}"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: COMMIT_GRPC_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: COMMIT_METRICS_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(probe("/healthz")),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("memory".to_string(), quantity("64Mi")),
                ("cpu".to_string(), quantity("50m")),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), quantity("512Mi"))])),
            ..ResourceRequirements::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "state".into(),
                mount_path: STATE_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let mut pod_labels = labels("commit-coordinator", CHECKPOINT_POLICY_LABEL, &policy.name_any());
    pod_labels.extend(selector(policy));
    StatefulSet {
        metadata: meta(policy, name.clone()),
        spec: Some(StatefulSetSpec {
            // One writer of the journal; the StatefulSet never runs two at once.
            replicas: Some(1),
            service_name: Some(name),
            selector: LabelSelector {
                match_labels: Some(selector(policy)),
                ..LabelSelector::default()
            },
            // The journal: a coordinator that lost it could commit a checkpoint without a
            // node's shards, so it is a PVC, not an emptyDir.
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("state".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_string(), quantity("1Gi"))])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), COMMIT_METRICS_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(vec![Volume {
                        name: "token".into(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(names::commit_token_secret(&policy.name_any())),
                            default_mode: Some(0o400),
                            ..SecretVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}
