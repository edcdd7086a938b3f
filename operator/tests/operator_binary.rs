//! The real `granary-operator run` binary, started as a user starts it, against an HTTPS API
//! endpoint on loopback with its CA in a kubeconfig: kube's TLS client (and the process's
//! crypto provider), leader election, watches, a Dataset reconciled into its objects, the
//! webhook's shared certificate with an IP SAN and its CA in both webhook configurations, a
//! second replica taking over when the first is stopped with SIGTERM, and clean exits.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/granary-system/leases";
const SYSTEM_SECRETS: &str = "/api/v1/namespaces/granary-system/secrets";
const MUTATING: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
const VALIDATING: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Operator {
    child: Child,
    name: &'static str,
}

impl Operator {
    fn start(name: &'static str, kubeconfig: &std::path::Path, webhook_port: u16, log: &std::path::Path) -> Self {
        let key = write_test_volume_key(log);
        let log = std::fs::File::create(log.join(format!("{name}.log"))).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_granary-operator"))
            .args([
                "run",
                &format!("--volume-key-file={}", key.display()),
                // Renewals every 4 s, checked 0.5 s after they are due: room for a loaded CI machine.
                "--lease-duration=6s",
                "--webhook-listen",
                &format!("127.0.0.1:{webhook_port}"),
                "--webhook-host=127.0.0.1",
                // Workers answer nothing here: the status probe of their stats fails fast.
                "--worker-address=127.0.0.1:9",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", "granary-system")
            .env("POD_NAME", name)
            .env("RUST_LOG", "info,kube_lease_manager=debug")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("granary-operator starts");
        Operator { child, name }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within 20 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait") {
            panic!("{} exited early: {status}", self.name);
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn eventually<T>(
    what: &str,
    logs: &std::path::Path,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            let mut text = String::new();
            for entry in std::fs::read_dir(logs).into_iter().flatten().flatten() {
                text.push_str(&format!("--- {}\n", entry.path().display()));
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
            panic!("timed out waiting for {what}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn holder(fake: &FakeApi) -> Option<String> {
    fake.get(LEASES, "granary-operator-leader")?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
}

/// One AdmissionReview over TLS to 127.0.0.1, trusting only `ca_pem` and checking the
/// certificate for the IP address, as an API server configured with a URL does.
async fn review_by_ip(port: u16, ca_pem: &[u8], object: Value) -> Value {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an IP server name");
    let tls = support::admission::connector_trusting(ca_pem)
        .connect(name, tcp)
        .await
        .expect("TLS to the webhook by IP, trusting the caBundle");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http");
    tokio::spawn(conn);
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "namespace": "ml", "operation": "CREATE",
        "userInfo": {"username": "alice"}, "object": object, "dryRun": false}});
    let request = http::Request::post("/mutate")
        .header("content-type", "application/json")
        .header("host", "127.0.0.1")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).expect("json"))))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice::<Value>(&bytes).expect("a review")["response"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_binary_starts_on_real_tls_reconciles_hands_over_and_exits_on_sigterm() {
    let fake = FakeApi::default();
    let source = tempfile::tempdir().expect("source dir");
    std::fs::write(source.path().join("sample-0.bin"), vec![7u8; 4096]).expect("sample");
    fake.put(
        DATASETS,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "imagenet", "namespace": "ml"},
            "spec": {"source": {"uri": format!("fs://{}", source.path().display())},
                     "cache": {"workers": 1, "tiers": [{"medium": "Memory", "size": "64Mi"}]},
                     "prewarm": {"policy": "None"}}}),
    );
    let webhook = |name: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
        "clientConfig": {"service": {"name": "granary-webhook", "namespace": "granary-system", "path": "/mutate"}}})
    };
    fake.put(
        MUTATING,
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "granary"}, "webhooks": [webhook("mounts.granary.dev")]}),
    );
    fake.put(
        VALIDATING,
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "granary"}, "webhooks": [webhook("validate.granary.dev")]}),
    );

    let api = support::https::serve(fake.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = api.kubeconfig(dir.path());
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs");
    let (port_a, port_b) = (free_port(), free_port());

    let mut a = Operator::start("operator-a", &kubeconfig, port_a, &logs);
    // It leads, and reconciles the Dataset into its objects over the real TLS connection.
    eventually("operator-a to lead", &logs, Duration::from_secs(30), || {
        (holder(&fake).as_deref() == Some("operator-a")).then_some(())
    })
    .await;
    eventually(
        "the Dataset's StatefulSet, PV and PVC",
        &logs,
        Duration::from_secs(30),
        || {
            let sts = fake.get(STATEFULSETS, "imagenet-worker")?;
            fake.list(PVS).into_iter().next()?;
            fake.get(PVCS, "imagenet")?;
            Some(sts)
        },
    )
    .await;
    let status = eventually("the Dataset's status", &logs, Duration::from_secs(30), || {
        let ds = fake.get(DATASETS, "imagenet")?;
        (ds["status"]["phase"] == "Pending").then(|| ds["status"].clone())
    })
    .await;
    assert_eq!(status["workersSummary"], "0/1", "{status}");

    // A watch event reaches it: the workers become ready and the Dataset Ready.
    let mut sts = fake.get(STATEFULSETS, "imagenet-worker").expect("sts");
    sts["status"] = json!({"replicas": 1, "readyReplicas": 1});
    fake.put(STATEFULSETS, sts);
    eventually(
        "the Dataset to become Ready after the StatefulSet's watch event",
        &logs,
        Duration::from_secs(30),
        || (fake.get(DATASETS, "imagenet")?["status"]["phase"] == "Ready").then_some(()),
    )
    .await;

    // The generated certificate is kept in a Secret and its CA is in both configurations;
    // it is valid for 127.0.0.1, so an API server calling the webhook by URL trusts it.
    let secret = eventually(
        "the webhook certificate's Secret",
        &logs,
        Duration::from_secs(10),
        || fake.get(SYSTEM_SECRETS, "granary-webhook-tls"),
    )
    .await;
    let cert: k8s_openapi::ByteString = serde_json::from_value(secret["data"]["tls.crt"].clone()).expect("tls.crt");
    for configuration in [MUTATING, VALIDATING] {
        let bundle = fake.get(configuration, "granary").expect("configuration")["webhooks"][0]["clientConfig"]
            ["caBundle"]
            .clone();
        let bundle: k8s_openapi::ByteString = serde_json::from_value(bundle).expect("a caBundle");
        assert_eq!(bundle.0, cert.0, "{configuration} has the served certificate's CA");
    }
    let plain_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ml"}, "spec": {"containers": [{"name": "a"}]}});
    let answer = review_by_ip(port_a, &cert.0, plain_pod.clone()).await;
    assert_eq!(answer["allowed"], true, "{answer}");

    // A second replica waits, serves the same certificate, and leads once the first stops.
    let mut b = Operator::start("operator-b", &kubeconfig, port_b, &logs);
    let answer = eventually("operator-b's webhook", &logs, Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port_b)).ok()
    })
    .await;
    drop(answer);
    let answer = review_by_ip(port_b, &cert.0, plain_pod).await;
    assert_eq!(
        answer["allowed"], true,
        "operator-b serves the shared certificate: {answer}"
    );
    // Past a renewal of operator-a's: both still run, one leads.
    tokio::time::sleep(Duration::from_secs(5)).await;
    a.assert_running();
    b.assert_running();
    assert_eq!(
        holder(&fake).as_deref(),
        Some("operator-a"),
        "one leader while both run"
    );

    let stopped = Instant::now();
    let exit = a.terminate();
    assert!(exit.success(), "operator-a exits cleanly on SIGTERM: {exit}");
    eventually("operator-b to take over", &logs, Duration::from_secs(20), || {
        (holder(&fake).as_deref() == Some("operator-b")).then_some(())
    })
    .await;
    eprintln!("takeover {:?} after SIGTERM", stopped.elapsed());

    // The Lease can no longer be renewed (the API refuses it): the leader must stop before
    // its Lease expires, so no other replica could lead alongside it.
    fake.refused.lock().expect("refused").push("/leases/".into());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(status) = b.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "operator-b kept leading without renewing its Lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_at = std::time::SystemTime::now();
    assert!(
        !exit.success(),
        "stepping down is an exit with failure, for a restart: {exit}"
    );
    let lease = fake.get(LEASES, "granary-operator-leader").expect("lease");
    let renewed: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime =
        serde_json::from_value(lease["spec"]["renewTime"].clone()).expect("renewTime");
    let expires = std::time::SystemTime::from(renewed.0) + Duration::from_secs(6);
    assert!(
        exited_at < expires,
        "operator-b exited {:?} after its Lease expired",
        exited_at.duration_since(expires).unwrap_or_default()
    );
    eprintln!(
        "stepped down {:?} before its Lease would expire",
        expires.duration_since(exited_at).unwrap_or_default()
    );
    let text = std::fs::read_to_string(logs.join("operator-b.log")).unwrap_or_default();
    assert!(text.contains("leadership lost"), "{text}");

    // Pods are only ever read by the gated label: no request lists or watches every pod.
    let pod_reads: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|(_, p, _)| p.ends_with("/pods"))
        .collect();
    assert!(
        pod_reads.iter().any(|(m, _, _)| m == "WATCH"),
        "the gated-pod watch ran: {pod_reads:?}"
    );
    for (method, path, query) in &pod_reads {
        assert!(
            query.contains("labelSelector=granary.dev%2Fprewarm-gated%3Dtrue"),
            "{method} {path}?{query} reads pods without the gated label"
        );
    }
    let text = std::fs::read_to_string(logs.join("operator-a.log")).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
}

/// Flag mistakes end the start at once, naming the flag, before any API is contacted.
#[test]
fn a_bad_webhook_host_fails_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = write_test_volume_key(dir.path());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_granary-operator"))
            .arg("run")
            .arg(format!("--volume-key-file={}", key.display()))
            .args(args)
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("granary-operator runs")
    };
    let out = run(&["--webhook-listen=127.0.0.1:0", "--webhook-host=not a host"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--webhook-host \"not a host\" is neither an IP address nor a DNS name"),
        "{stderr}"
    );
    assert!(!stderr.contains("Kubernetes API"), "checked before the API: {stderr}");
    // With a given certificate the generated one's names mean nothing: refused, not ignored.
    let out = run(&["--webhook-host=10.0.0.5", "--tls-cert=a.crt", "--tls-key=a.key"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--webhook-host") && stderr.contains("--tls-cert"),
        "{stderr}"
    );
    // A volume key too short to be one: refused before the API, with the way to make one.
    std::fs::write(&key, "short").expect("write");
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--volume-key-file") && stderr.contains("openssl rand"),
        "{stderr}"
    );
    assert!(!stderr.contains("Kubernetes API"), "checked before the API: {stderr}");
}
