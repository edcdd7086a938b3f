//! One AdmissionReview: parse the annotation, look the Datasets and CheckpointPolicies up,
//! and answer with a JSONPatch or a denial that names the problem.

use kube::api::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::{Api, Client};
use serde_json::Value;

use super::inject::{mutate, NodeLoad, Resolved, Target};
use super::inline;
use super::mounts::{parse, MountKind, MOUNTS_ANNOTATION};
use super::trainjob::TrainJobSchema;
use crate::api::dataset::{NodePrewarm, PrewarmPolicy};
use crate::api::{validate, CheckpointPolicy, Dataset};
use crate::metrics::OperatorMetrics;

/// What answering a review needs: the API (Datasets, CheckpointPolicies, the TrainJob CRD)
/// and the metrics.
pub struct Reviewer {
    pub client: Client,
    pub metrics: std::sync::Arc<OperatorMetrics>,
    pub trainjobs: TrainJobSchema,
    /// Whether pods may name a Dataset or CheckpointPolicy in an inline csi volume.
    pub inline_volumes: bool,
    /// The image of the init containers that load Datasets onto nodes (the operator's).
    pub loader_image: String,
}

/// Answers `review`; every failure becomes a denial (or an invalid response for a review
/// that cannot be read), never a transport error.
pub async fn answer(review: AdmissionReview<DynamicObject>, reviewer: &Reviewer) -> AdmissionReview<DynamicObject> {
    let metrics = &reviewer.metrics;
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let kind = request.kind.kind.clone();
    let response = AdmissionResponse::from(&request);
    let response = match decide(&request, reviewer).await {
        Ok(None) => {
            metrics.admission(&kind, "allowed");
            response
        }
        Ok(Some(patch)) => match response.clone().with_patch(patch) {
            Ok(r) => {
                metrics.admission(&kind, "patched");
                r
            }
            Err(e) => response.deny(format!("granary could not encode its patch: {e}")),
        },
        Err(reason) => {
            metrics.admission(&kind, "denied");
            tracing::info!(kind, name = ?request.name, namespace = ?request.namespace, %reason, "denied");
            response.deny(reason)
        }
    };
    response.into_review()
}

/// `Ok(None)`: nothing to do; `Ok(Some(patch))`: the mounts to inject; `Err`: the denial.
async fn decide(
    request: &AdmissionRequest<DynamicObject>,
    reviewer: &Reviewer,
) -> Result<Option<json_patch::Patch>, String> {
    let client = &reviewer.client;
    let Some(object) = &request.object else {
        return Ok(None);
    };
    let value = serde_json::to_value(object).map_err(|e| format!("the object could not be read: {e}"))?;
    if request.kind.group == crate::api::GROUP {
        // As the ValidatingWebhookConfiguration's matchConditions say, here too (an API
        // server without them, a configuration edited by hand): an object being deleted, or
        // an update that leaves spec alone (a finalizer removed, a status written), is never
        // refused, or a Dataset whose spec became invalid could never be deleted.
        let deleting = object.metadata.deletion_timestamp.is_some();
        let spec_unchanged = request.operation == Operation::Update
            && request
                .old_object
                .as_ref()
                .is_some_and(|old| old.data.get("spec") == object.data.get("spec"));
        if !deleting && !spec_unchanged {
            validate_resource(&request.kind.kind, &value)?;
        }
        return Ok(None);
    }
    if request.operation != Operation::Create {
        return Ok(None);
    }
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let mut resolved = Resolved {
        loader_image: reviewer.loader_image.clone(),
        ..Resolved::default()
    };
    // A pod's inline granary.dev volumes: each becomes the PVC it names, or the pod is denied.
    let inline_volumes = if request.kind.kind == "Pod" {
        inline::find(&value["spec"])?
    } else {
        Vec::new()
    };
    if let Some(first) = inline_volumes.first() {
        if !reviewer.inline_volumes {
            return Err(format!(
                "inline volume {:?}: inline granary.dev volumes are off in this installation (helm value webhook.inlineVolumes); mount the PVC {} instead, or annotate the pod with {MOUNTS_ANNOTATION}",
                first.volume,
                first.claim()
            ));
        }
        for v in &inline_volumes {
            let whence = format!("inline volume {:?}", v.volume);
            look_up(client, &namespace, v.kind, &v.name, &whence, &mut resolved).await?;
        }
    }
    let annotation = value
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(MOUNTS_ANNOTATION))
        .and_then(Value::as_str);
    if annotation.is_none() && inline_volumes.is_empty() {
        return Ok(None);
    }
    if let Some(annotation) = annotation {
        let mounts = parse(annotation)?;
        for m in &mounts {
            look_up(client, &namespace, m.kind, &m.name, MOUNTS_ANNOTATION, &mut resolved).await?;
        }
        resolved.mounts = mounts;
    }
    let target = match request.kind.kind.as_str() {
        "Pod" => Target::Pod,
        "PyTorchJob" => Target::PyTorchJob,
        "TrainJob" => Target::TrainJob(reviewer.trainjobs.layout(client, &request.kind.version).await?),
        other => {
            return Err(format!(
                "{other} objects are not mounted into; annotate a Pod, PyTorchJob or TrainJob"
            ))
        }
    };
    // Inline volumes become their claims first, so the annotation's mounts see the pod as
    // it will be.
    let inlined = (!inline_volumes.is_empty()).then(|| {
        let mut pod = value.clone();
        if let Some(spec) = pod.get_mut("spec") {
            inline::replace(spec, &inline_volumes);
        }
        pod
    });
    let mutated = mutate(target, inlined.as_ref().unwrap_or(&value), &resolved)?;
    let patch = json_patch::diff(&value, &mutated);
    Ok(if patch.0.is_empty() { None } else { Some(patch) })
}

/// Checks that the Dataset or CheckpointPolicy `name` (asked for by `whence`) exists in
/// `namespace`; a Dataset prewarmed before scheduling and not loaded yet is added to
/// `wait_for`, one loaded onto the pods' nodes to `node_loads`.
async fn look_up(
    client: &Client,
    namespace: &str,
    kind: MountKind,
    name: &str,
    whence: &str,
    resolved: &mut Resolved,
) -> Result<(), String> {
    let wait_for = &mut resolved.wait_for;
    match kind {
        MountKind::Dataset => {
            let api: Api<Dataset> = Api::namespaced(client.clone(), namespace);
            let ds = api
                .get_opt(name)
                .await
                .map_err(|e| format!("looking up the Dataset {name}: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "{whence}: the Dataset {name:?} does not exist in namespace {namespace}; create it first or fix the name (kubectl get datasets -n {namespace})"
                    )
                })?;
            let loaded = ds
                .status
                .as_ref()
                .and_then(|s| s.prewarm.as_ref())
                .is_some_and(|p| p.finished.is_some());
            if ds.spec.prewarm.policy == PrewarmPolicy::BeforeScheduling
                && !loaded
                && !wait_for.iter().any(|w| w == name)
            {
                wait_for.push(name.to_string());
            }
            if ds.spec.prewarm.on_nodes == NodePrewarm::PodNodes
                && !resolved.node_loads.iter().any(|l| l.dataset == name)
            {
                resolved.node_loads.push(NodeLoad {
                    dataset: name.to_string(),
                    paths: ds.spec.prewarm.paths.clone(),
                });
            }
        }
        MountKind::Checkpoint => {
            let api: Api<CheckpointPolicy> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name)
                .await
                .map_err(|e| format!("looking up the CheckpointPolicy {name}: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "{whence}: the CheckpointPolicy {name:?} does not exist in namespace {namespace}; create it first or fix the name (kubectl get checkpointpolicies -n {namespace})"
                    )
                })?;
        }
    }
    Ok(())
}

/// A Dataset or CheckpointPolicy being created or changed: what its schema cannot check.
fn validate_resource(kind: &str, value: &Value) -> Result<(), String> {
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let result = match kind {
        "Dataset" => {
            let ds: Dataset =
                serde_json::from_value(value.clone()).map_err(|e| format!("the Dataset does not parse: {e}"))?;
            validate::dataset(name, &ds.spec)
        }
        "CheckpointPolicy" => {
            let p: CheckpointPolicy = serde_json::from_value(value.clone())
                .map_err(|e| format!("the CheckpointPolicy does not parse: {e}"))?;
            validate::checkpoint_policy(&p.spec)
        }
        _ => Ok(()),
    };
    result.map_err(|invalid| format!("{kind} {name}: {invalid}"))
}

/// The review as the API server reads it. kube serializes the patch as a JSON array of
/// numbers, but the API server (Go's `[]byte`) only takes base64 text, and would reject the
/// response; the patch is re-encoded here.
pub fn to_wire(review: &AdmissionReview<DynamicObject>) -> Value {
    let mut value = serde_json::to_value(review).unwrap_or(Value::Null);
    if let Some(patch) = value.pointer_mut("/response/patch") {
        if let Some(numbers) = patch.as_array() {
            let bytes: Vec<u8> = numbers.iter().filter_map(|n| n.as_u64()).map(|n| n as u8).collect();
            *patch = serde_json::to_value(k8s_openapi::ByteString(bytes)).unwrap_or(Value::Null);
        }
    }
    value
}
