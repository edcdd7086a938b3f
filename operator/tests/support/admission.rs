//! The admission webhook over real HTTPS (rustls, a generated certificate), sent real
//! AdmissionReview bodies as the API server sends them.

use std::sync::Arc;

use granary_operator::metrics::OperatorMetrics;
use granary_operator::webhook::server::{router, WebhookServer};
use granary_operator::webhook::tls::Certificate;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

/// The image the webhook names for its node-load init containers.
pub const LOADER_IMAGE: &str = "ghcr.io/granary-dev/granary:test";

pub struct Webhook {
    addr: std::net::SocketAddr,
    connector: tokio_rustls::TlsConnector,
}

pub async fn start(fake_client: kube::Client) -> Webhook {
    start_with(fake_client, false).await
}

/// The webhook with `inline_volumes` as `--inline-volumes` sets it.
pub async fn start_with(fake_client: kube::Client, inline_volumes: bool) -> Webhook {
    let cert = Certificate::self_signed(vec!["granary-webhook.granary-system.svc".into()]).expect("cert");
    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::new(&mut registry));
    let server = WebhookServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        cert.server_config().expect("tls"),
        router(fake_client, metrics, inline_volumes, LOADER_IMAGE.into()),
    )
    .await
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    tokio::spawn(server.serve());
    // The client trusts only the generated certificate, as the API server does with the caBundle.
    Webhook {
        addr,
        connector: connector_trusting(cert.cert_pem.as_bytes()),
    }
}

/// A TLS client that trusts only `ca_pem`, as the API server trusts a webhook's caBundle.
pub fn connector_trusting(ca_pem: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

impl Webhook {
    pub async fn review(&self, kind: (&str, &str, &str), object: Value) -> Value {
        self.review_operation(kind, "CREATE", object, Value::Null).await
    }

    /// A review of `operation` (UPDATE carries the object as it was in `old`).
    pub async fn review_operation(
        &self,
        kind: (&str, &str, &str),
        operation: &str,
        object: Value,
        old: Value,
    ) -> Value {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "0f6e-1", "kind": {"group": kind.0, "version": kind.1, "kind": kind.2},
                "resource": {"group": kind.0, "version": kind.1, "resource": format!("{}s", kind.2.to_lowercase())},
                "namespace": "ml", "operation": operation, "userInfo": {"username": "alice"},
                "object": object, "oldObject": old, "dryRun": false
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

pub fn patched(object: &Value, response: &Value) -> Value {
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
