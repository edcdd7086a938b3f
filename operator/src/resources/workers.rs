//! A Dataset's cache workers: the ConfigMap with their settings, the ConfigMap with their
//! member set, the headless Service that gives each a stable DNS name, and the StatefulSet
//! that runs `granary-cache worker`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapEnvSource, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::api::common::QuantityError;
use crate::api::dataset::{Eviction, Medium};
use crate::api::Dataset;

use super::names::{self, WORKER_GRPC_PORT, WORKER_METRICS_PORT};
use super::{labels, owner_ref, short_hash};

pub const DATASET_LABEL: &str = "granary.dev/dataset";
/// Hash of the worker settings on the pod template: a changed ConfigMap rolls the workers.
pub const CONFIG_HASH_ANNOTATION: &str = "granary.dev/config-hash";
const CACHE_DIR: &str = "/cache";
const SECRET_DIR: &str = "/etc/granary/source-secret";
const MEMBERS_DIR: &str = "/etc/granary/members";
const MEMBERS_KEY: &str = "members";
/// Heap and buffers of a worker beyond its memory tier.
const WORKER_OVERHEAD: u64 = 512 << 20;
/// The in-process hot tier when the only tier is a Memory one (kept on tmpfs).
const SMALL_HOT_TIER: u64 = 64 << 20;

/// Sizes of a Dataset's tiers, per worker.
struct TierPlan {
    /// Bytes of the worker's in-process memory tier.
    memory: u64,
    /// Bytes of the cache directory, and whether it is a PVC (Disk) or tmpfs (Memory only).
    dir: u64,
    dir_on_disk: bool,
    storage_class: Option<String>,
}

/// With a Disk tier, the Memory tier is the worker's in-process hot tier and the disk a PVC
/// per worker. With a Memory tier alone, the cache directory is a tmpfs emptyDir: it survives
/// a worker container's restart (its index is rebuilt at start), which process memory would not.
fn tier_plan(ds: &Dataset) -> Result<TierPlan, QuantityError> {
    let tiers = &ds.spec.cache.tiers;
    let memory = tiers.iter().find(|t| t.medium == Medium::Memory);
    let disk = tiers.iter().find(|t| t.medium == Medium::Disk);
    Ok(match (memory, disk) {
        (memory, Some(disk)) => TierPlan {
            memory: memory.map(|m| m.size.bytes()).transpose()?.unwrap_or(SMALL_HOT_TIER),
            dir: disk.size.bytes()?,
            dir_on_disk: true,
            storage_class: disk.storage_class_name.clone(),
        },
        (Some(memory), None) => TierPlan {
            memory: SMALL_HOT_TIER,
            dir: memory.size.bytes()?,
            dir_on_disk: false,
            storage_class: None,
        },
        (None, None) => TierPlan {
            memory: SMALL_HOT_TIER,
            dir: 0,
            dir_on_disk: false,
            storage_class: None,
        },
    })
}

fn meta(ds: &Dataset, name: String, component: &str) -> ObjectMeta {
    let dataset = ds.name_any();
    ObjectMeta {
        name: Some(name),
        namespace: ds.namespace(),
        labels: Some(labels(component, DATASET_LABEL, &dataset)),
        owner_references: Some(vec![owner_ref(ds)]),
        ..ObjectMeta::default()
    }
}

fn selector(ds: &Dataset) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/component".to_string(), "worker".to_string()),
        (DATASET_LABEL.to_string(), ds.name_any()),
    ])
}

/// The worker's settings as `granary-cache worker` reads them from its environment.
pub fn config_map(ds: &Dataset) -> Result<ConfigMap, QuantityError> {
    let spec = &ds.spec;
    let plan = tier_plan(ds)?;
    let mut data = BTreeMap::from([
        ("GRANARY_SOURCE".to_string(), spec.source.uri.clone()),
        ("GRANARY_LISTEN".to_string(), format!("0.0.0.0:{WORKER_GRPC_PORT}")),
        (
            "GRANARY_METRICS_LISTEN".to_string(),
            format!("0.0.0.0:{WORKER_METRICS_PORT}"),
        ),
        ("GRANARY_MEMORY_SIZE".to_string(), plan.memory.to_string()),
        (
            "GRANARY_BLOCK_SIZE".to_string(),
            spec.cache.block_size.bytes()?.to_string(),
        ),
        (
            "GRANARY_EVICTION".to_string(),
            match spec.cache.eviction {
                Eviction::Lru => "lru",
                Eviction::Pin => "pin",
            }
            .to_string(),
        ),
        ("GRANARY_METADATA_TTL".to_string(), spec.cache.metadata_ttl.clone()),
        ("GRANARY_LOG_FORMAT".to_string(), "json".to_string()),
        (
            "GRANARY_MEMBERS_FILE".to_string(),
            format!("{MEMBERS_DIR}/{MEMBERS_KEY}"),
        ),
    ]);
    if plan.dir > 0 {
        data.insert("GRANARY_CACHE_DIR".into(), CACHE_DIR.into());
        data.insert("GRANARY_CACHE_SIZE".into(), plan.dir.to_string());
    }
    if !spec.source.options.is_empty() {
        let options: Vec<String> = spec.source.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // One per line: the worker splits on newlines, so a value may hold commas.
        data.insert("GRANARY_SOURCE_OPTIONS".into(), options.join("\n"));
    }
    if spec.source.secret_ref.is_some() {
        data.insert("GRANARY_SOURCE_SECRET_DIR".into(), SECRET_DIR.into());
    }
    if let Some(p) = spec.prewarm.parallelism {
        data.insert("GRANARY_LOAD_PARALLELISM".into(), p.to_string());
    }
    Ok(ConfigMap {
        metadata: meta(ds, names::worker_config(&ds.name_any()), "worker"),
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// The member set, one `host:port` per line. Kept out of the settings' ConfigMap (whose hash
/// rolls the workers): scaling rewrites this one, and the running workers re-read it from
/// their volume (the kubelet refreshes it within about a minute) and tell clients.
pub fn members_config_map(ds: &Dataset, members: &[String]) -> ConfigMap {
    ConfigMap {
        metadata: meta(ds, names::worker_members(&ds.name_any()), "worker"),
        data: Some(BTreeMap::from([(MEMBERS_KEY.to_string(), members.join("\n") + "\n")])),
        ..ConfigMap::default()
    }
}

/// Headless: each worker is addressed by its own stable name, never load-balanced, because
/// clients place blocks on workers by name.
pub fn service(ds: &Dataset) -> Service {
    Service {
        metadata: meta(ds, names::worker_service(&ds.name_any()), "worker"),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector(ds)),
            // Workers are addressed while they warm up; clients fall back to the source.
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: WORKER_GRPC_PORT,
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: WORKER_METRICS_PORT,
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn quantity(bytes: u64) -> Quantity {
    Quantity(bytes.to_string())
}

pub fn statefulset(ds: &Dataset, default_image: &str) -> Result<StatefulSet, QuantityError> {
    let spec = &ds.spec;
    let plan = tier_plan(ds)?;
    let config = config_map(ds)?;
    let config_hash = short_hash(config.data.iter().flatten().flat_map(|(k, v)| [k.as_str(), v.as_str()]));

    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut claims = None;
    if plan.dir > 0 {
        mounts.push(VolumeMount {
            name: "cache".into(),
            mount_path: CACHE_DIR.into(),
            ..VolumeMount::default()
        });
        if plan.dir_on_disk {
            claims = Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("cache".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    storage_class_name: plan.storage_class.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_string(), quantity(plan.dir))])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]);
        } else {
            volumes.push(Volume {
                name: "cache".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    medium: Some("Memory".into()),
                    size_limit: Some(quantity(plan.dir)),
                }),
                ..Volume::default()
            });
        }
    }
    volumes.push(Volume {
        name: "members".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names::worker_members(&ds.name_any()),
            optional: Some(false),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    mounts.push(VolumeMount {
        name: "members".into(),
        mount_path: MEMBERS_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    if let Some(secret) = &spec.source.secret_ref {
        volumes.push(Volume {
            name: "source-secret".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "source-secret".into(),
            mount_path: SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    // tmpfs pages count against the pod's memory, so a Memory tier is sized into the request.
    let memory_need = plan.memory + WORKER_OVERHEAD + if plan.dir_on_disk { 0 } else { plan.dir };
    let resources = spec
        .placement
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("memory".to_string(), quantity(memory_need)),
                ("cpu".to_string(), Quantity("500m".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), quantity(memory_need))])),
            ..ResourceRequirements::default()
        });
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let container = Container {
        name: "worker".into(),
        image: Some(spec.image.clone().unwrap_or_else(|| default_image.to_string())),
        command: Some(vec!["granary-cache".into()]),
        args: Some(vec!["worker".into()]),
        // The worker's own name in the member set: its pod's stable DNS name.
        env: Some(vec![
            EnvVar {
                name: "POD_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar {
                name: "GRANARY_ADVERTISE".into(),
                value: Some(format!(
                    "$(POD_NAME).{}.{}.svc:{WORKER_GRPC_PORT}",
                    names::worker_service(&ds.name_any()),
                    ds.namespace().unwrap_or_default()
                )),
                ..EnvVar::default()
            },
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: names::worker_config(&ds.name_any()),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: WORKER_GRPC_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: WORKER_METRICS_PORT,
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(Probe {
            failure_threshold: Some(6),
            ..probe("/healthz", 10)
        }),
        resources: Some(resources),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let placement = &spec.placement;
    let mut pod_labels = labels("worker", DATASET_LABEL, &ds.name_any());
    pod_labels.extend(selector(ds));
    Ok(StatefulSet {
        metadata: meta(ds, names::worker_statefulset(&ds.name_any()), "worker"),
        spec: Some(StatefulSetSpec {
            replicas: Some(spec.cache.workers),
            service_name: Some(names::worker_service(&ds.name_any())),
            // Workers are independent; waiting for each in turn only slows a cold start.
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(ds)),
                ..LabelSelector::default()
            },
            persistent_volume_claim_retention_policy: claims.as_ref().map(|_| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    // A scaled-down worker keeps its cache for when it comes back.
                    when_scaled: Some("Retain".into()),
                    when_deleted: Some("Delete".into()),
                }
            }),
            volume_claim_templates: claims,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH_ANNOTATION.to_string(), config_hash),
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), WORKER_METRICS_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector: (!placement.node_selector.is_empty()).then(|| placement.node_selector.clone()),
                    tolerations: (!placement.tolerations.is_empty()).then(|| placement.tolerations.clone()),
                    affinity: placement.affinity.clone(),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}
