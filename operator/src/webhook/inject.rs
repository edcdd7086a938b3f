//! Rewriting a Pod, a PyTorchJob's replica templates or a TrainJob's runtime patches (pod
//! template overrides on Trainer 2.1) so every container mounts the annotated volumes. Works on JSON, so one code path serves
//! every kind; the webhook turns the difference into a JSONPatch.

use serde_json::{json, Map, Value};

use super::mounts::{overlaps, MountKind, MountRequest};
use super::trainjob::TrainJobLayout;
use crate::controller::gates::{GATE, GATED_LABEL, WAITS_FOR_ANNOTATION};
use crate::resources::names;

/// The mounts with what the cluster says about them.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub mounts: Vec<MountRequest>,
    /// Datasets the pods must wait for (BeforeScheduling, not loaded yet).
    pub wait_for: Vec<String>,
    /// Datasets loaded onto each pod's node before its containers start (`onNodes: PodNodes`).
    pub node_loads: Vec<NodeLoad>,
    /// The image of the init containers that load them (the operator's own).
    pub loader_image: String,
}

/// A Dataset to load onto the pod's node, and what of it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    pub dataset: String,
    pub paths: Vec<String>,
}

/// Where a node-load init container sees the Dataset.
pub const NODE_LOAD_MOUNT_ROOT: &str = "/granary/load";

pub fn node_load_container_name(dataset: &str) -> String {
    let mut name = format!("granary-load-{dataset}");
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

/// The init container that loads `load` onto the node through the pod's own volume of it:
/// the node daemon's mount, so its node-local cache is the one the pod reads.
fn node_load_container(load: &NodeLoad, image: &str) -> Value {
    let volume = volume_name(&MountRequest {
        kind: MountKind::Dataset,
        name: load.dataset.clone(),
        path: String::new(),
    });
    let path = format!("{NODE_LOAD_MOUNT_ROOT}/{}", load.dataset);
    let mut command = vec![
        "granary-cache".to_string(),
        "load".into(),
        "--mount".into(),
        path.clone(),
        // Files that do not fit on the node stay on the workers; the pod starts anyway.
        "--allow-partial".into(),
    ];
    command.extend(load.paths.iter().cloned());
    json!({
        "name": node_load_container_name(&load.dataset),
        "image": image,
        "command": command,
        "volumeMounts": [{ "name": volume, "mountPath": path, "readOnly": true }],
        "resources": { "requests": { "cpu": "100m", "memory": "64Mi" }, "limits": { "memory": "256Mi" } },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
    })
}

/// The TrainJob (Kubeflow Trainer) job its overrides target: the trainer nodes, whose
/// replicated job and trainer container are both called `node` in Kubeflow's runtimes.
pub const TRAINJOB_TARGET: &str = "node";

/// The `manager` key of granary's entry in a TrainJob's `runtimePatches` (a list-map keyed
/// by manager, so each controller owns its own entry).
pub const RUNTIME_PATCH_MANAGER: &str = "granary.dev/mounts";

pub fn volume_name(m: &MountRequest) -> String {
    let kind = match m.kind {
        MountKind::Dataset => "dataset",
        MountKind::Checkpoint => "ckpt",
    };
    let mut name = format!("granary-{kind}-{}", m.name);
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}

pub fn claim_name(m: &MountRequest) -> String {
    match m.kind {
        MountKind::Dataset => names::dataset_claim(&m.name),
        MountKind::Checkpoint => names::checkpoint_claim(&m.name),
    }
}

fn volume(m: &MountRequest) -> Value {
    json!({
        "name": volume_name(m),
        "persistentVolumeClaim": {
            "claimName": claim_name(m),
            "readOnly": m.kind == MountKind::Dataset,
        }
    })
}

fn volume_mount(m: &MountRequest) -> Value {
    json!({
        "name": volume_name(m),
        "mountPath": m.path,
        "readOnly": m.kind == MountKind::Dataset,
    })
}

/// `obj[key]` as an array, created when absent.
fn array<'a>(obj: &'a mut Value, key: &str) -> Result<&'a mut Vec<Value>, String> {
    let map = obj
        .as_object_mut()
        .ok_or_else(|| format!("expected an object holding {key}"))?;
    map.entry(key).or_insert_with(|| Value::Array(Vec::new()));
    match map.get_mut(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(Value::Null) | None => Err(format!("{key} is null")),
        Some(_) => Err(format!("{key} is not a list")),
    }
}

fn object<'a>(obj: &'a mut Value, key: &str) -> Result<&'a mut Value, String> {
    let map = obj
        .as_object_mut()
        .ok_or_else(|| format!("expected an object holding {key}"))?;
    let slot = map.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    Ok(slot)
}

/// Adds the volumes to a pod spec and a mount to each container (or, with `only`, to the
/// containers of that name); already-injected volumes are left as they are.
fn inject_spec(spec: &mut Value, r: &Resolved, where_: &str) -> Result<(), String> {
    for m in &r.mounts {
        let name = volume_name(m);
        let volumes = array(spec, "volumes")?;
        match volumes.iter().find(|v| v["name"] == name.as_str()) {
            Some(v) if v["persistentVolumeClaim"]["claimName"] == claim_name(m).as_str() => {}
            Some(_) => {
                return Err(format!(
                    "{where_}: a volume named {name} already exists and is not the claim {}; rename it",
                    claim_name(m)
                ))
            }
            None => volumes.push(volume(m)),
        }
    }
    let containers = array(spec, "containers")?;
    if containers.is_empty() {
        return Err(format!("{where_}: no containers to mount into"));
    }
    for container in containers.iter_mut() {
        let cname = container["name"].as_str().unwrap_or("?").to_string();
        let mounts = array(container, "volumeMounts")?;
        for m in &r.mounts {
            let name = volume_name(m);
            if mounts
                .iter()
                .any(|x| x["name"] == name.as_str() && x["mountPath"] == m.path.as_str())
            {
                continue;
            }
            if let Some(clash) = mounts
                .iter()
                .find(|x| x["mountPath"].as_str().is_some_and(|p| overlaps(p, &m.path)))
            {
                return Err(format!(
                    "{where_}: container {cname} already mounts {} at {}, which clashes with {} from granary.dev/mounts; choose another path",
                    clash["name"].as_str().unwrap_or("a volume"),
                    clash["mountPath"].as_str().unwrap_or("?"),
                    m.path
                ));
            }
            mounts.push(volume_mount(m));
        }
    }
    for load in &r.node_loads {
        let name = node_load_container_name(&load.dataset);
        let init = array(spec, "initContainers")?;
        if !init.iter().any(|c| c["name"] == name.as_str()) {
            init.push(node_load_container(load, &r.loader_image));
        }
    }
    if !r.wait_for.is_empty() {
        let gates = array(spec, "schedulingGates")?;
        if !gates.iter().any(|g| g["name"] == GATE) {
            gates.push(json!({ "name": GATE }));
        }
    }
    Ok(())
}

/// A gated pod says which Datasets it waits for (annotation), and carries a label so the
/// operator finds gated pods with a label selector instead of listing every pod.
fn annotate(metadata: &mut Value, r: &Resolved) -> Result<(), String> {
    if r.wait_for.is_empty() {
        return Ok(());
    }
    let annotations = object(metadata, "annotations")?;
    annotations[WAITS_FOR_ANNOTATION] = Value::String(r.wait_for.join(","));
    let labels = object(metadata, "labels")?;
    labels[GATED_LABEL] = Value::String("true".into());
    Ok(())
}

/// What the webhook mounts into: the kinds its rules send, a TrainJob with the layout its
/// served CRD has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Pod,
    PyTorchJob,
    TrainJob(TrainJobLayout),
}

/// The object with the mounts injected.
pub fn mutate(target: Target, obj: &Value, r: &Resolved) -> Result<Value, String> {
    let mut out = obj.clone();
    match target {
        Target::Pod => {
            let spec = object(&mut out, "spec")?;
            inject_spec(spec, r, "the pod")?;
            annotate(object(&mut out, "metadata")?, r)?;
        }
        Target::PyTorchJob => {
            let spec = object(&mut out, "spec")?;
            let replicas = object(spec, "pytorchReplicaSpecs")?
                .as_object_mut()
                .ok_or("spec.pytorchReplicaSpecs is not an object")?;
            if replicas.is_empty() {
                return Err("spec.pytorchReplicaSpecs has no replica types".into());
            }
            for (role, replica) in replicas.iter_mut() {
                let template = object(replica, "template")?;
                inject_spec(object(template, "spec")?, r, &format!("pytorchReplicaSpecs.{role}"))?;
                annotate(object(template, "metadata")?, r)?;
            }
        }
        Target::TrainJob(layout) => {
            // The runtime's templates are not in the TrainJob; a patch targeting the trainer
            // nodes carries the volumes and the mounts of their `node` container.
            let mut spec = json!({ "containers": [{ "name": TRAINJOB_TARGET }] });
            // Trainer's overrides cannot add containers: a TrainJob's nodes are not loaded
            // (its pods read over the workers, and keep what their reads copy).
            let without_loads = Resolved {
                node_loads: Vec::new(),
                ..r.clone()
            };
            inject_spec(&mut spec, &without_loads, "the TrainJob")?;
            let mut metadata = json!({});
            annotate(&mut metadata, r)?;
            let mut template = json!({ "spec": spec });
            if metadata.as_object().is_some_and(|m| !m.is_empty()) {
                template["metadata"] = metadata;
            }
            let job_spec = object(&mut out, "spec")?;
            match layout {
                TrainJobLayout::RuntimePatches => {
                    let patch = json!({
                        "manager": RUNTIME_PATCH_MANAGER,
                        "trainingRuntimeSpec": { "template": { "spec": { "replicatedJobs": [{
                            "name": TRAINJOB_TARGET,
                            "template": { "spec": { "template": template } },
                        }]}}},
                    });
                    let patches = array(job_spec, "runtimePatches")?;
                    // One entry per manager: granary's own is replaced, others are kept.
                    patches.retain(|p| p["manager"] != RUNTIME_PATCH_MANAGER);
                    patches.push(patch);
                }
                TrainJobLayout::PodTemplateOverrides => {
                    let mut override_ = template;
                    override_["targetJobs"] = json!([{ "name": TRAINJOB_TARGET }]);
                    let overrides = array(job_spec, "podTemplateOverrides")?;
                    if !overrides.contains(&override_) {
                        overrides.push(override_);
                    }
                }
            }
        }
    }
    Ok(out)
}
