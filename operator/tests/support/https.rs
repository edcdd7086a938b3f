//! The FakeApi on a real HTTPS socket (rustls, a certificate for 127.0.0.1 whose CA goes into
//! a kubeconfig), with watches streamed as the API server streams them, so the real
//! `granary-operator` binary runs against it exactly as against a cluster: kube's TLS
//! client, its crypto provider, its watchers and every request it makes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::{query_param, split_path, FakeApi};

pub struct HttpsApi {
    pub addr: SocketAddr,
    /// The CA (here: the self-signed serving certificate) a client must trust.
    pub ca_pem: String,
}

impl HttpsApi {
    /// A kubeconfig for this API (CA data, a bearer token, `default` namespace).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let ca = serde_json::to_value(k8s_openapi::ByteString(self.ca_pem.clone().into_bytes())).expect("base64");
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": format!("https://{}", self.addr), "certificate-authority-data": ca}}],
            "users": [{"name": "tester", "user": {"token": "a-test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester", "namespace": "default"}}],
            "current-context": "fake",
        });
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("kubeconfig");
        path
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(code: u16, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap_or_default())).boxed())
        .expect("a response")
}

/// A watch: every change after `resourceVersion`, one JSON event a line, until the client
/// goes away or `timeoutSeconds` pass.
fn watch(fake: FakeApi, path: &str, query: Option<&str>) -> Response<Body> {
    let (collection, _, _) = split_path(path);
    let mut since: u64 = query_param(query, "resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = query_param(query, "labelSelector").unwrap_or_default();
    let timeout = query_param(query, "timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(60u64);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        while tokio::time::Instant::now() < deadline {
            for (version, type_, object) in fake.changes_since(&collection, since, &selector) {
                since = version;
                let mut line = serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(tokio_stream_from(rx)).boxed())
        .expect("a response")
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn answer(fake: FakeApi, request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().map(str::to_string);
    let path = parts.uri.path().to_string();
    let bearer = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if bearer != Some("Bearer a-test-token") {
        return Ok(full(
            401,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Unauthorized", "code": 401}),
        ));
    }
    let refused = fake
        .refused
        .lock()
        .expect("refused")
        .iter()
        .any(|r| path.contains(r.as_str()));
    if refused {
        return Ok(full(
            503,
            &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "ServiceUnavailable", "message": "refused by the test", "code": 503}),
        ));
    }
    let is_watch = matches!(query_param(query.as_deref(), "watch").as_deref(), Some("true" | "1"));
    if parts.method == http::Method::GET && is_watch {
        let mut store = fake.store.lock().expect("store");
        store.log.push(("WATCH".into(), path.clone()));
        store
            .requests
            .push(("WATCH".into(), path.clone(), query.clone().unwrap_or_default()));
        drop(store);
        return Ok(watch(fake, &path, query.as_deref()));
    }
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let (code, value) = fake.handle_request(&parts, &bytes);
    Ok(full(code, &value))
}

/// Serves `fake` on 127.0.0.1 over TLS until the test ends.
pub async fn serve(fake: FakeApi) -> HttpsApi {
    granary_store::tls::install();
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("a certificate");
    let cert_pem = generated.cert.pem();
    let certs = vec![generated.cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der()).expect("a key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let fake = fake.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |r| answer(fake.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    HttpsApi { addr, ca_pem: cert_pem }
}
