//! The admission webhook over real HTTPS (rustls, a generated certificate) with real
//! AdmissionReview bodies: the JSONPatch is applied to the object and the result checked.

mod support;

use serde_json::{json, Value};
use support::admission::{patched, start, start_with};
use support::*;

fn cluster() -> (FakeApi, kube::Client) {
    let (fake, client) = FakeApi::new();
    fake.put(DATASETS, json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/imagenet/"}, "prewarm": {"policy": "BeforeScheduling"}}}));
    fake.put(POLICIES, json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"target": {"uri": "s3://ckpt/llama/"}}}));
    (fake, client)
}

fn pytorchjob(annotation: &str) -> Value {
    let replica = |n| json!({"replicas": n, "template": {"spec": {"containers": [{"name": "pytorch", "image": "train:1", "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}]}]}}});
    json!({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
           "metadata": {"name": "resnet", "namespace": "ml", "annotations": {"granary.dev/mounts": annotation}},
           "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(3)}}})
}

#[tokio::test]
async fn a_pytorchjob_gets_its_volumes_mounts_and_gate_in_every_replica() {
    let (_fake, client) = cluster();
    let hook = start(client).await;
    let job = pytorchjob("dataset/imagenet=/data,checkpoint/llama=/ckpt");
    let response = hook.review(("kubeflow.org", "v1", "PyTorchJob"), job.clone()).await;
    let out = patched(&job, &response);
    for role in ["Master", "Worker"] {
        let spec = &out["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"];
        assert_eq!(
            spec["volumes"],
            json!([
                {"name": "granary-dataset-imagenet", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": true}},
                {"name": "granary-ckpt-llama", "persistentVolumeClaim": {"claimName": "llama-checkpoint", "readOnly": false}}
            ])
        );
        let mounts = &spec["containers"][0]["volumeMounts"];
        assert_eq!(mounts[0]["mountPath"], "/dev/shm", "the container's own mounts stay");
        assert_eq!(
            mounts[1],
            json!({"name": "granary-dataset-imagenet", "mountPath": "/data", "readOnly": true})
        );
        assert_eq!(
            mounts[2],
            json!({"name": "granary-ckpt-llama", "mountPath": "/ckpt", "readOnly": false})
        );
        assert_eq!(spec["schedulingGates"], json!([{"name": "granary.dev/prewarm"}]));
        assert_eq!(
            out["spec"]["pytorchReplicaSpecs"][role]["template"]["metadata"]["annotations"]
                ["granary.dev/prewarm-datasets"],
            "imagenet"
        );
    }
}

#[tokio::test]
async fn a_pod_and_a_trainjob_are_mounted_and_an_unannotated_pod_is_left_alone() {
    let (_fake, client) = cluster();
    let hook = start(client).await;
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ml", "annotations": {"granary.dev/mounts": "checkpoint/llama=/ckpt"}},
        "spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
    let out = patched(&pod, &hook.review(("", "v1", "Pod"), pod.clone()).await);
    for c in 0..2 {
        assert_eq!(out["spec"]["containers"][c]["volumeMounts"][0]["mountPath"], "/ckpt");
    }
    assert!(
        out["spec"]["schedulingGates"].is_null(),
        "no BeforeScheduling dataset, no gate"
    );

    // Trainer v2.3 serves runtimePatches: the patch targets the trainer nodes' pod template.
    _fake.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        support::schema::kubeflow_crd("trainjobs-trainer-v2.3.0.yaml"),
    );
    let train = json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "t", "namespace": "ml", "annotations": {"granary.dev/mounts": "dataset/imagenet=/data"}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}}});
    let out = patched(
        &train,
        &hook
            .review(("trainer.kubeflow.org", "v1alpha1", "TrainJob"), train.clone())
            .await,
    );
    let p = &out["spec"]["runtimePatches"][0];
    assert_eq!(p["manager"], "granary.dev/mounts");
    let job = &p["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0];
    assert_eq!(job["name"], "node");
    let pod = &job["template"]["spec"]["template"];
    assert_eq!(
        pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "imagenet"
    );
    assert_eq!(pod["spec"]["containers"][0]["name"], "node");
    assert_eq!(pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"], "/data");
    assert_eq!(pod["spec"]["schedulingGates"], json!([{"name": "granary.dev/prewarm"}]));
    assert_eq!(pod["metadata"]["labels"]["granary.dev/prewarm-gated"], "true");
    assert!(out["spec"].get("podTemplateOverrides").is_none());

    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "namespace": "ml"}, "spec": {"containers": [{"name": "a"}]}});
    let response = hook.review(("", "v1", "Pod"), plain).await;
    assert_eq!(response["allowed"], true);
    assert!(response["patch"].is_null());
}

/// A Dataset with `prewarm.onNodes: PodNodes`: every replica gets an init container that
/// loads the prewarm paths onto its node through the pod's own volume of the Dataset (the
/// node daemon's mount), read-only, with the operator's image; a TrainJob (whose overrides
/// cannot add containers) and a Dataset without it get none.
#[tokio::test]
async fn a_dataset_loaded_onto_pod_nodes_adds_an_init_container_that_loads_it() {
    let (fake, client) = cluster();
    fake.put(DATASETS, json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "coco", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/coco/"}, "prewarm": {"paths": ["/train", "/val"], "onNodes": "PodNodes"}}}));
    let hook = start(client).await;
    let job = pytorchjob("dataset/coco=/data,dataset/imagenet=/imagenet");
    let out = patched(
        &job,
        &hook.review(("kubeflow.org", "v1", "PyTorchJob"), job.clone()).await,
    );
    for role in ["Master", "Worker"] {
        let spec = &out["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"];
        let init = spec["initContainers"].as_array().expect("init containers");
        assert_eq!(init.len(), 1, "only coco is loaded onto nodes: {init:?}");
        assert_eq!(init[0]["name"], "granary-load-coco");
        assert_eq!(init[0]["image"], support::admission::LOADER_IMAGE);
        assert_eq!(
            init[0]["command"],
            json!([
                "granary-cache",
                "load",
                "--mount",
                "/granary/load/coco",
                "--allow-partial",
                "/train",
                "/val"
            ])
        );
        assert_eq!(
            init[0]["volumeMounts"],
            json!([{"name": "granary-dataset-coco", "mountPath": "/granary/load/coco", "readOnly": true}])
        );
        assert_eq!(init[0]["securityContext"]["allowPrivilegeEscalation"], false);
        let volumes = spec["volumes"].as_array().expect("volumes");
        assert!(
            volumes.iter().any(|v| v["name"] == "granary-dataset-coco"),
            "{volumes:?}"
        );
    }

    let train = json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "t", "namespace": "ml", "annotations": {"granary.dev/mounts": "dataset/coco=/data"}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}}});
    fake.put(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        support::schema::kubeflow_crd("trainjobs-trainer-v2.3.0.yaml"),
    );
    let out = patched(
        &train,
        &hook
            .review(("trainer.kubeflow.org", "v1alpha1", "TrainJob"), train.clone())
            .await,
    );
    let pod = &out["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        ["template"]["spec"]["template"];
    assert!(pod["spec"]["initContainers"].is_null(), "{pod}");
}

#[tokio::test]
async fn unknown_resources_malformed_annotations_and_path_clashes_are_denied_by_name() {
    let (_fake, client) = cluster();
    let hook = start(client).await;
    let denied = |r: &Value| -> String {
        assert_eq!(r["allowed"], false, "{r}");
        r["status"]["message"].as_str().unwrap_or("").to_string()
    };
    let m = denied(
        &hook
            .review(
                ("kubeflow.org", "v1", "PyTorchJob"),
                pytorchjob("dataset/imagenet-21k=/data"),
            )
            .await,
    );
    assert!(
        m.contains("Dataset \"imagenet-21k\" does not exist in namespace ml"),
        "{m}"
    );
    let m = denied(
        &hook
            .review(("kubeflow.org", "v1", "PyTorchJob"), pytorchjob("checkpoint/gpt=/ckpt"))
            .await,
    );
    assert!(m.contains("CheckpointPolicy \"gpt\" does not exist"), "{m}");
    let m = denied(
        &hook
            .review(("kubeflow.org", "v1", "PyTorchJob"), pytorchjob("imagenet:/data"))
            .await,
    );
    assert!(m.contains("expected <kind>/<name>=<path>"), "{m}");
    let m = denied(
        &hook
            .review(
                ("kubeflow.org", "v1", "PyTorchJob"),
                pytorchjob("dataset/imagenet=/dev/shm/data"),
            )
            .await,
    );
    assert!(m.contains("container pytorch already mounts shm at /dev/shm"), "{m}");
}

#[tokio::test]
async fn a_dataset_the_schema_cannot_fault_is_denied_with_its_field_and_fix() {
    let (_fake, client) = cluster();
    let hook = start(client).await;
    let bad = json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "imagenet", "namespace": "ml"},
        "spec": {"source": {"uri": "s3://datasets/imagenet/", "options": {"region": "us-east-1", "secret_access_key": "oops"}},
                 "cache": {"workers": 2, "replicas": 3}}});
    let r = hook.review(("granary.dev", "v1alpha1", "Dataset"), bad.clone()).await;
    assert_eq!(r["allowed"], false, "{r}");
    let m = r["status"]["message"].as_str().unwrap_or("");
    assert!(
        m.contains("spec.source.options.secret_access_key is a credential; put it in a Secret"),
        "{m}"
    );
    assert!(
        m.contains("spec.cache.replicas (3) is more than spec.cache.workers (2)"),
        "{m}"
    );

    // The same invalid Dataset being deleted (the finalizer's removal), or updated with its
    // spec unchanged (a status write), goes through: it could never be deleted otherwise.
    let mut deleting = bad.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-12-01T10:00:00Z");
    deleting["metadata"]["finalizers"] = json!([]);
    let r = hook
        .review_operation(("granary.dev", "v1alpha1", "Dataset"), "UPDATE", deleting, bad.clone())
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    let mut relabelled = bad.clone();
    relabelled["metadata"]["labels"] = json!({"team": "ml"});
    let r = hook
        .review_operation(
            ("granary.dev", "v1alpha1", "Dataset"),
            "UPDATE",
            relabelled.clone(),
            bad.clone(),
        )
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    // A spec change is validated.
    let mut worse = relabelled;
    worse["spec"]["cache"]["replicas"] = json!(4);
    let r = hook
        .review_operation(("granary.dev", "v1alpha1", "Dataset"), "UPDATE", worse, bad.clone())
        .await;
    assert_eq!(r["allowed"], false, "{r}");

    let good = json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"target": {"uri": "s3://ckpt/llama/", "options": {"region": "us-east-1"}, "secretRef": {"name": "s3"}}}});
    let r = hook.review(("granary.dev", "v1alpha1", "CheckpointPolicy"), good).await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(r["patch"].is_null());
}

/// A handshake with 127.0.0.1:`port` trusting only `ca_pem`: whether it succeeds.
async fn trusted_by(addr: std::net::SocketAddr, ca_pem: &str) -> bool {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("granary-webhook.granary-system.svc").expect("name");
    support::admission::connector_trusting(ca_pem.as_bytes())
        .connect(name, tcp)
        .await
        .is_ok()
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    use granary_operator::webhook::tls::{Certificate, ServingCertificate};
    let names = vec!["granary-webhook.granary-system.svc".to_string()];
    let first = Certificate::self_signed(names.clone()).expect("cert");
    let dir = tempfile::tempdir().expect("dir");
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, &first.cert_pem).expect("write");
    std::fs::write(&key_file, &first.key_pem).expect("write");

    let serving =
        ServingCertificate::new(&Certificate::from_files(&cert_file, &key_file).expect("read")).expect("serving");
    let (_fake, client) = FakeApi::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = std::sync::Arc::new(granary_operator::metrics::OperatorMetrics::new(&mut registry));
    let server = granary_operator::webhook::server::WebhookServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        serving.server_config().expect("tls"),
        granary_operator::webhook::server::router(client, metrics, false, "granary:test".into()),
    )
    .await
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.serve());
    tokio::spawn(std::sync::Arc::clone(&serving).reload_from(
        first.clone(),
        cert_file.clone(),
        key_file.clone(),
        std::time::Duration::from_millis(50),
    ));
    assert!(trusted_by(addr, &first.cert_pem).await);

    // cert-manager renews: the next handshakes get the new certificate.
    let second = Certificate::self_signed(names).expect("cert");
    std::fs::write(&key_file, &second.key_pem).expect("write");
    std::fs::write(&cert_file, &second.cert_pem).expect("write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !trusted_by(addr, &second.cert_pem).await {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        !trusted_by(addr, &first.cert_pem).await,
        "the old certificate is no longer served"
    );

    // A half-written renewal (a key that does not match) is not served: the current one stays.
    std::fs::write(&key_file, &first.key_pem).expect("write");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        trusted_by(addr, &second.cert_pem).await,
        "a mismatched pair must not replace the served certificate"
    );
}

/// An inline granary.dev volume reaches no node: off (the default), the pod is denied with
/// the PVC to use; on, one that names a Dataset or CheckpointPolicy of the pod's namespace
/// becomes that PVC, and one that carries anything else (an endpoint, a host path, raw
/// attributes) is denied by the rule.
#[tokio::test]
async fn inline_volumes_only_name_what_the_namespace_has() {
    let pod = |csi: Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "trainer-0", "namespace": "ml"},
               "spec": {"containers": [{"name": "pytorch", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                        "volumes": [{"name": "data", "csi": csi}]}})
    };
    let named = pod(json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "imagenet"}}));
    let denied = |r: &Value| -> String {
        assert_eq!(r["allowed"], false, "{r}");
        r["status"]["message"].as_str().unwrap_or("").to_string()
    };

    let (_fake, client) = cluster();
    let off = start(client).await;
    let m = denied(&off.review(("", "v1", "Pod"), named.clone()).await);
    assert!(
        m.contains("inline granary.dev volumes are off") && m.contains("PVC imagenet"),
        "{m}"
    );

    let (_fake, client) = cluster();
    let on = start_with(client, true).await;
    let response = on.review(("", "v1", "Pod"), named.clone()).await;
    let out = patched(&named, &response);
    assert_eq!(
        out["spec"]["volumes"],
        json!([{"name": "data", "persistentVolumeClaim": {"claimName": "imagenet", "readOnly": true}}])
    );
    assert_eq!(
        out["spec"]["containers"][0]["volumeMounts"],
        named["spec"]["containers"][0]["volumeMounts"]
    );
    // The Dataset is prewarmed before scheduling: the pod waits for it, as an annotated one does.
    assert_eq!(out["spec"]["schedulingGates"], json!([{"name": "granary.dev/prewarm"}]));
    let ckpt = pod(json!({"driver": "granary.dev", "volumeAttributes": {"checkpointPolicy": "llama"}}));
    let out = patched(&ckpt, &on.review(("", "v1", "Pod"), ckpt.clone()).await);
    assert_eq!(
        out["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "llama-checkpoint"
    );

    for (what, csi, expect) in [
        (
            "an endpoint",
            json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "imagenet", "option.endpoint": "http://169.254.169.254"}}),
            "option.endpoint",
        ),
        (
            "the node's identity",
            json!({"driver": "granary.dev", "volumeAttributes": {"kind": "dataset", "source": "s3://b", "option.credentials": "auto"}}),
            "only names a Dataset or CheckpointPolicy",
        ),
        (
            "a host path",
            json!({"driver": "granary.dev", "volumeAttributes": {"checkpointPolicy": "llama", "writebackDir": "/etc"}}),
            "writebackDir",
        ),
        (
            "another namespace's Dataset",
            json!({"driver": "granary.dev", "volumeAttributes": {"dataset": "secret-data"}}),
            "does not exist in namespace ml",
        ),
    ] {
        let m = denied(&on.review(("", "v1", "Pod"), pod(csi)).await);
        assert!(m.contains(expect), "{what}: {m}");
    }
}
