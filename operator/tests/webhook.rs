//! The admission webhook over real HTTPS (rustls, a generated certificate) with real
//! AdmissionReview bodies: the JSONPatch is applied to the object and the result checked.

mod support;

use std::sync::Arc;

use granary_operator::metrics::OperatorMetrics;
use granary_operator::webhook::server::{router, WebhookServer};
use granary_operator::webhook::tls::Certificate;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use support::*;

struct Webhook {
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
}

async fn start(fake_client: kube::Client) -> Webhook {
    let cert = Certificate::self_signed(vec!["granary-webhook.granary-system.svc".into()]).expect("cert");
    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::new(&mut registry));
    let server = WebhookServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        cert.server_config().expect("tls"),
        router(fake_client, metrics),
    )
    .await
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.serve());
    // The client trusts only the generated certificate, as the API server does with the caBundle.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut cert.cert_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Webhook {
        addr,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
    }
}

impl Webhook {
    async fn review(&self, kind: (&str, &str, &str), object: Value) -> Value {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "0f6e-1", "kind": {"group": kind.0, "version": kind.1, "kind": kind.2},
                "resource": {"group": kind.0, "version": kind.1, "resource": format!("{}s", kind.2.to_lowercase())},
                "namespace": "ml", "operation": "CREATE", "userInfo": {"username": "alice"},
                "object": object, "dryRun": false
            }
        });
        let tcp = tokio::net::TcpStream::connect(self.addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("granary-webhook.granary-system.svc").expect("name");
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the generated certificate");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http");
        tokio::spawn(conn);
        let request = http::Request::post("/mutate")
            .header("content-type", "application/json")
            .header("host", "granary-webhook")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("json"))))
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        let review: Value = serde_json::from_slice(&bytes).expect("an AdmissionReview");
        assert_eq!(review["response"]["uid"], "0f6e-1");
        review["response"].clone()
    }
}

fn patched(object: &Value, response: &Value) -> Value {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch");
    let patch_bytes = serde_json::from_value::<k8s_openapi::ByteString>(response["patch"].clone())
        .unwrap_or_else(|e| panic!("a base64 patch in {response}: {e}"))
        .0;
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes).expect("a JSONPatch");
    let mut out = object.clone();
    json_patch::patch(&mut out, &patch).expect("the patch applies");
    out
}

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

    let train = json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": "t", "namespace": "ml", "annotations": {"granary.dev/mounts": "dataset/imagenet=/data"}},
        "spec": {"runtimeRef": {"name": "torch-distributed"}}});
    let out = patched(
        &train,
        &hook
            .review(("trainer.kubeflow.org", "v1alpha1", "TrainJob"), train.clone())
            .await,
    );
    let o = &out["spec"]["podTemplateOverrides"][0];
    assert_eq!(o["targetJobs"], json!([{"name": "node"}]));
    assert_eq!(
        o["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "imagenet"
    );
    assert_eq!(o["spec"]["containers"][0]["volumeMounts"][0]["mountPath"], "/data");
    assert_eq!(o["spec"]["schedulingGates"], json!([{"name": "granary.dev/prewarm"}]));

    let plain = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "q", "namespace": "ml"}, "spec": {"containers": [{"name": "a"}]}});
    let response = hook.review(("", "v1", "Pod"), plain).await;
    assert_eq!(response["allowed"], true);
    assert!(response["patch"].is_null());
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
    let r = hook.review(("granary.dev", "v1alpha1", "Dataset"), bad).await;
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

    let good = json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml"},
        "spec": {"target": {"uri": "s3://ckpt/llama/", "options": {"region": "us-east-1"}, "secretRef": {"name": "s3"}}}});
    let r = hook.review(("granary.dev", "v1alpha1", "CheckpointPolicy"), good).await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(r["patch"].is_null());
}
