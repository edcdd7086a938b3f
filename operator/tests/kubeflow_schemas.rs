//! The webhook's patches against the schemas they meet on a cluster: the published CRDs of
//! PyTorchJob (training-operator 1.9) and TrainJob (Trainer v2.1, v2.2, v2.3). Each patch is
//! applied to a sample object, which is then pruned with the CRD's structural schema as the
//! API server prunes it: the volumes, the mounts, the gate and the gated label must survive.

mod support;

use serde_json::{json, Value};
use support::admission::{patched, start};
use support::schema::{all_values, kubeflow_crd, missing_required, prune, schema_of};
use support::*;

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

fn cluster_with(trainjob_crd: Option<Value>) -> (FakeApi, kube::Client) {
    let (fake, client) = FakeApi::new();
    fake.put(DATASETS, json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/imagenet/"}, "prewarm": {"policy": "BeforeScheduling"}}}));
    fake.put(POLICIES, json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"target": {"uri": "s3://ckpt/llama/"}}}));
    if let Some(crd) = trainjob_crd {
        fake.put(CRDS, crd);
    }
    (fake, client)
}

const MOUNTS: &str = "dataset/imagenet=/data,checkpoint/llama=/ckpt";

/// What must be left of the webhook's work after pruning, wherever the layout put it.
fn assert_mounts_survive(pruned: &Value, what: &str) {
    let values = all_values(pruned);
    for claim in ["imagenet", "llama-checkpoint"] {
        assert!(
            values.iter().any(|v| v["persistentVolumeClaim"]["claimName"] == claim),
            "{what}: the volume of {claim} was pruned: {pruned:#}"
        );
    }
    for (volume, path) in [("granary-dataset-imagenet", "/data"), ("granary-ckpt-llama", "/ckpt")] {
        assert!(
            values.iter().any(|v| v["name"] == volume && v["mountPath"] == path),
            "{what}: the mount {path} was pruned: {pruned:#}"
        );
    }
    assert!(
        values.iter().any(|v| v["schedulingGates"]
            .as_array()
            .is_some_and(|g| g.contains(&json!({"name": "granary.dev/prewarm"})))),
        "{what}: the scheduling gate was pruned: {pruned:#}"
    );
    assert!(
        values
            .iter()
            .any(|v| v["labels"]["granary.dev/prewarm-gated"] == "true"),
        "{what}: the gated label (how the operator finds gated pods) was pruned: {pruned:#}"
    );
    assert!(
        values
            .iter()
            .any(|v| v["annotations"]["granary.dev/prewarm-datasets"] == "imagenet"),
        "{what}: the waited-for Datasets annotation was pruned: {pruned:#}"
    );
}

fn trainjob() -> Value {
    json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "llama-sft", "namespace": "ml", "annotations": {"granary.dev/mounts": MOUNTS}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 2}}})
}

#[tokio::test]
async fn pytorchjob_patches_survive_the_training_operator_schema() {
    let (_fake, client) = cluster_with(None);
    let hook = start(client).await;
    let replica = |n| json!({"replicas": n, "restartPolicy": "OnFailure", "template": {"spec": {"containers": [{"name": "pytorch", "image": "train:1"}]}}});
    let job = json!({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": "resnet", "namespace": "ml", "annotations": {"granary.dev/mounts": MOUNTS}},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(3)}}});
    let mut out = patched(
        &job,
        &hook.review(("kubeflow.org", "v1", "PyTorchJob"), job.clone()).await,
    );
    let crd = kubeflow_crd("pytorchjobs-training-operator-1.9.yaml");
    let schema = schema_of(&crd, "v1");
    prune(&mut out, schema);
    assert_eq!(missing_required(&out, schema), Vec::<String>::new());
    for role in ["Master", "Worker"] {
        assert_mounts_survive(&out["spec"]["pytorchReplicaSpecs"][role], &format!("PyTorchJob {role}"));
    }
}

#[tokio::test]
async fn trainjob_patches_survive_every_published_trainer_schema() {
    for file in [
        "trainjobs-trainer-v2.1.0.yaml",
        "trainjobs-trainer-v2.2.0.yaml",
        "trainjobs-trainer-v2.3.0.yaml",
    ] {
        let crd = kubeflow_crd(file);
        let (_fake, client) = cluster_with(Some(crd.clone()));
        let hook = start(client).await;
        let job = trainjob();
        let response = hook
            .review(("trainer.kubeflow.org", "v1alpha1", "TrainJob"), job.clone())
            .await;
        let mut out = patched(&job, &response);
        let schema = schema_of(&crd, "v1alpha1");
        prune(&mut out, schema);
        assert_eq!(missing_required(&out, schema), Vec::<String>::new(), "{file}");
        assert_mounts_survive(&out, file);
        // The trainer's own fields are untouched.
        assert_eq!(out["spec"]["runtimeRef"]["name"], "torch-distributed", "{file}");
    }
}

/// The check above would have caught the patch the webhook wrote before runtimePatches: on
/// Trainer v2.2 and v2.3 the API server prunes `podTemplateOverrides` away, and with it every
/// volume, mount and gate.
#[test]
fn the_podtemplateoverrides_patch_is_pruned_on_trainer_2_2_and_later() {
    let legacy_override = json!({
        "targetJobs": [{"name": "node"}],
        "metadata": {"labels": {"granary.dev/prewarm-gated": "true"}, "annotations": {"granary.dev/prewarm-datasets": "imagenet"}},
        "spec": {
            "volumes": [
                {"name": "granary-dataset-imagenet", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": true}},
                {"name": "granary-ckpt-llama", "persistentVolumeClaim": {"claimName": "llama-checkpoint", "readOnly": false}}],
            "containers": [{"name": "node", "volumeMounts": [
                {"name": "granary-dataset-imagenet", "mountPath": "/data", "readOnly": true},
                {"name": "granary-ckpt-llama", "mountPath": "/ckpt", "readOnly": false}]}],
            "schedulingGates": [{"name": "granary.dev/prewarm"}],
        },
    });
    let mut job = trainjob();
    job["spec"]["podTemplateOverrides"] = json!([legacy_override]);
    let v21 = kubeflow_crd("trainjobs-trainer-v2.1.0.yaml");
    let mut on_21 = job.clone();
    prune(&mut on_21, schema_of(&v21, "v1alpha1"));
    assert_mounts_survive(&on_21, "podTemplateOverrides on v2.1");
    for file in ["trainjobs-trainer-v2.2.0.yaml", "trainjobs-trainer-v2.3.0.yaml"] {
        let crd = kubeflow_crd(file);
        let mut pruned = job.clone();
        prune(&mut pruned, schema_of(&crd, "v1alpha1"));
        assert!(
            pruned["spec"].get("podTemplateOverrides").is_none(),
            "{file}: {pruned:#}"
        );
        assert!(
            !all_values(&pruned).iter().any(|v| v["mountPath"] == "/data"),
            "{file}: the mounts would have been lost"
        );
    }
}

#[tokio::test]
async fn a_trainjob_the_webhook_cannot_mount_into_is_denied_not_patched_into_nothing() {
    // A Trainer whose CRD has neither field.
    let mut crd = kubeflow_crd("trainjobs-trainer-v2.3.0.yaml");
    let spec = crd
        .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties")
        .and_then(Value::as_object_mut)
        .expect("spec properties");
    spec.remove("runtimePatches");
    // And no TrainJob CRD readable at all (Trainer not installed, or no RBAC to read it).
    for (crd, reason) in [
        (Some(crd), "declares neither spec.runtimePatches"),
        (None, "reading the CRD trainjobs.trainer.kubeflow.org"),
    ] {
        let (_fake, client) = cluster_with(crd);
        let hook = start(client).await;
        let r = hook
            .review(("trainer.kubeflow.org", "v1alpha1", "TrainJob"), trainjob())
            .await;
        assert_eq!(r["allowed"], false, "{r}");
        let m = r["status"]["message"].as_str().unwrap_or("");
        assert!(m.contains(reason), "{m}");
    }
}

/// The examples a user applies are valid for the published schemas (nothing pruned, nothing
/// required missing), and are mounted through them.
#[tokio::test]
async fn the_examples_are_valid_for_the_published_schemas_and_keep_their_mounts() {
    let example = |file: &str| -> Value {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file);
        let mut value: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).expect("example")).expect("yaml");
        value["metadata"]["namespace"] = json!("ml");
        value
    };
    for (file, crd_file, version, kind) in [
        (
            "pytorchjob.yaml",
            "pytorchjobs-training-operator-1.9.yaml",
            "v1",
            ("kubeflow.org", "v1", "PyTorchJob"),
        ),
        (
            "trainjob.yaml",
            "trainjobs-trainer-v2.3.0.yaml",
            "v1alpha1",
            ("trainer.kubeflow.org", "v1alpha1", "TrainJob"),
        ),
    ] {
        let crd = kubeflow_crd(crd_file);
        let schema = schema_of(&crd, version);
        let job = example(file);
        let mut pruned = job.clone();
        prune(&mut pruned, schema);
        assert_eq!(pruned, job, "{file}: the API server would drop part of it");
        assert_eq!(missing_required(&job, schema), Vec::<String>::new(), "{file}");
        let (_fake, client) = cluster_with(Some(kubeflow_crd("trainjobs-trainer-v2.3.0.yaml")));
        let hook = start(client).await;
        let mut out = patched(&job, &hook.review(kind, job.clone()).await);
        prune(&mut out, schema);
        assert_mounts_survive(&out, file);
    }
}
