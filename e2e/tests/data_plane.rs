//! The whole data plane as processes, driven as a cluster drives it:
//! - an S3-protocol server on loopback holding a dataset and receiving checkpoints;
//! - the operator's reconcile (against kube's mocked API service, the one part that cannot
//!   run here) turning a Dataset and a CheckpointPolicy into PVs, and prewarming the Dataset
//!   through three real `granary-cache worker` processes;
//! - `granary-cache node` and `granary-csi` on their sockets, called as the kubelet calls
//!   them with exactly those PVs' handles, attributes and Secrets;
//! - a training-like read over the mount while a worker is killed and the node daemon is
//!   killed and restarted (no read may fail or return wrong bytes), a checkpoint written,
//!   committed in the store, and restored through a fresh mount;
//! - a real Prometheus scraping every process, and every query of every dashboard in the
//!   chart run against it: each must parse and return series.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// The in-memory API server behind kube's mocked service, shared with the operator's tests.
#[path = "../../operator/tests/support/mod.rs"]
mod fake_api;

use fake_api::{FakeApi, DATASETS, POLICIES, PVS, SECRETS, STATEFULSETS};
use granary_e2e::kubelet::{self, Mode};
use granary_e2e::processes::{binary, free_addr, http_get, wait_for_path, wait_for_port, Launcher, Proc};
use granary_e2e::prometheus::{self, Job, Prometheus};
use granary_operator::api::{CheckpointPolicy, Dataset};
use granary_operator::controller::{checkpoint_policy, dataset, Context, WorkerAddressing};
use granary_operator::metrics::OperatorMetrics;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use serde_json::json;

const ACCESS_KEY: &str = "granary-test";
const SECRET_KEY: &str = "granary-test-secret";
const WORKERS: usize = 3;

/// Deterministic bytes, different per file.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The dataset: many small samples and a few shards, as training reads them.
fn write_dataset(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for i in 0..160u64 {
        files.insert(
            format!("samples/{:02}/{i:05}.jpg", i % 8),
            pattern(8_000 + (i as usize * 7919) % 120_000, i),
        );
    }
    for i in 0..3u64 {
        files.insert(format!("shards/shard-{i}.tar"), pattern(6 << 20, 1000 + i));
    }
    for (name, data) in &files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, data).expect("write the dataset");
    }
    files
}

/// `granary-cache worker` number `i` of the Dataset, at its fixed addresses (a restart
/// reuses them, as a StatefulSet pod keeps its name).
struct WorkerSlot {
    grpc: SocketAddr,
    metrics: SocketAddr,
    cache_dir: PathBuf,
}

/// The CSI handle of the CheckpointPolicy below (namespace ml, name llama, uid cp-uid-1).
const CHECKPOINT_HANDLE: &str = "checkpoint.ml.llama.cp-uid-1";

/// A worker as the StatefulSet runs it: with the member set (the operator's ConfigMap holds
/// the same addresses, as it was given them) and its own name in it.
fn start_worker(launcher: &mut Launcher, slots: &[WorkerSlot], i: usize, s3: &str) -> Proc {
    let slot = &slots[i];
    let members: Vec<String> = slots.iter().map(|s| s.grpc.to_string()).collect();
    let args: Vec<String> = [
        "worker",
        "--source",
        "s3://datasets/train",
        "--source-option",
        &format!("endpoint={s3}"),
        "--source-option",
        "region=us-east-1",
        "--source-option",
        &format!("access_key_id={ACCESS_KEY}"),
        "--source-option",
        &format!("secret_access_key={SECRET_KEY}"),
        "--listen",
        &slot.grpc.to_string(),
        "--metrics-listen",
        &slot.metrics.to_string(),
        "--cache-dir",
        &slot.cache_dir.to_string_lossy(),
        "--cache-size",
        "256MiB",
        "--memory-size",
        "16MiB",
        "--members",
        &members.join(","),
        "--advertise",
        &slot.grpc.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let proc = launcher.launch(&format!("worker-{i}"), &binary("granary-cache"), &args);
    wait_for_port(slot.grpc, "a worker");
    proc
}

fn start_node_daemon(launcher: &mut Launcher, root: &Path, metrics: SocketAddr) -> Proc {
    let socket = root.join("run/node.sock");
    let _ = std::fs::remove_file(&socket);
    let args: Vec<String> = vec![
        "node".into(),
        "--state-dir".into(),
        root.join("state").to_string_lossy().into_owned(),
        "--socket".into(),
        socket.to_string_lossy().into_owned(),
        "--metrics-listen".into(),
        metrics.to_string(),
        "--max-memory".into(),
        "256MiB".into(),
        // Smaller than the dataset: reads keep reaching the workers, some through passthrough.
        "--local-cache-size".into(),
        "8MiB".into(),
        "--checkpoint-writeback-size".into(),
        "1GiB".into(),
        "--node-name".into(),
        "node-a".into(),
    ];
    let proc = launcher.launch("node-daemon", &binary("granary-cache"), &args);
    wait_for_path(&socket, "the node daemon");
    wait_for_port(metrics, "the node daemon's metrics");
    proc
}

fn operator_context(
    client: kube::Client,
    workers: Vec<String>,
    commit_coordinator: String,
    registry: &mut Registry,
) -> Arc<Context> {
    let metrics = Arc::new(OperatorMetrics::new(registry));
    let reporter = Reporter {
        controller: "granary-operator".into(),
        instance: None,
    };
    let mut ctx = Context::new(
        client,
        reporter,
        "granary:e2e".into(),
        metrics,
        fake_api::test_volume_key(),
    );
    ctx.addressing = WorkerAddressing::Fixed(workers);
    ctx.commit_coordinator = Some(commit_coordinator);
    Arc::new(ctx)
}

async fn reconcile_dataset(fake: &FakeApi, ctx: &Arc<Context>) -> Dataset {
    let ds: Dataset = serde_json::from_value(fake.get(DATASETS, "imagenet").expect("Dataset")).expect("a Dataset");
    dataset::reconcile(Arc::new(ds), Arc::clone(ctx))
        .await
        .expect("reconcile the Dataset");
    serde_json::from_value(fake.get(DATASETS, "imagenet").expect("Dataset")).expect("a Dataset")
}

async fn reconcile_policy(fake: &FakeApi, ctx: &Arc<Context>) -> CheckpointPolicy {
    let p: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("a policy");
    checkpoint_policy::reconcile(Arc::new(p), Arc::clone(ctx))
        .await
        .expect("reconcile the CheckpointPolicy");
    serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("a policy")
}

/// What the kubelet reads off a PV: the handle, the attributes, and the node-publish Secret
/// (decoded) it names.
fn pv_publish_inputs(fake: &FakeApi, pv_name: &str) -> (String, HashMap<String, String>, HashMap<String, String>) {
    let pv = fake
        .get(PVS, pv_name)
        .unwrap_or_else(|| panic!("the operator made no PV {pv_name}"));
    let csi = &pv["spec"]["csi"];
    assert_eq!(csi["driver"], "granary.dev");
    let handle = csi["volumeHandle"].as_str().expect("volumeHandle").to_string();
    let attributes: HashMap<String, String> =
        serde_json::from_value(csi["volumeAttributes"].clone()).expect("volumeAttributes");
    let mut secrets = HashMap::new();
    if let Some(name) = csi["nodePublishSecretRef"]["name"].as_str() {
        let secret: Secret = serde_json::from_value(fake.get(SECRETS, name).expect("the Secret")).expect("a Secret");
        for (k, v) in secret.data.unwrap_or_default() {
            secrets.insert(k, String::from_utf8(v.0).expect("utf-8 secret"));
        }
    }
    (handle, attributes, secrets)
}

/// The PV names the workers' headless Service (`imagenet-workers.ml.svc:7070`); this is the
/// cluster DNS, which resolves it to a worker: the first one's loopback address. The mount
/// learns the other workers from it. The rewritten attributes are marked again with the
/// operator's key, as the operator would have marked them.
fn resolve_workers(handle: &str, attributes: &mut HashMap<String, String>, slots: &[WorkerSlot]) {
    assert_eq!(
        attributes["workers"], "imagenet-workers.ml.svc:7070",
        "the PV holds the Service, not a worker list"
    );
    attributes.insert("workers".into(), slots[0].grpc.to_string());
    let mut spec: BTreeMap<String, String> = attributes.clone().into_iter().collect();
    fake_api::test_volume_key().mark(handle, &mut spec);
    *attributes = spec.into_iter().collect();
}

/// Reads every file of the dataset through the mount in a shuffled order, checking bytes.
fn epoch(mount: &Path, files: &BTreeMap<String, Vec<u8>>, seed: u64, failures: &AtomicU64) -> u64 {
    let mut names: Vec<&String> = files.keys().collect();
    let mut x = seed | 1;
    for i in (1..names.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        names.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut bytes = 0;
    for name in names {
        match std::fs::read(mount.join(name)) {
            Ok(data) if data == files[name] => bytes += data.len() as u64,
            Ok(data) => {
                eprintln!(
                    "WRONG BYTES: {name}: {} bytes, expected {}",
                    data.len(),
                    files[name].len()
                );
                failures.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                eprintln!("FAILED READ: {name}: {e}");
                failures.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    bytes
}

/// Empties the kernel's page cache, so the next epoch's reads reach the daemon and the
/// workers instead of pages kept from the last one.
fn drop_page_cache() {
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("cannot drop the page cache ({e}); later epochs may be served from it");
    }
}

fn metric_value(addr: SocketAddr, name: &str) -> f64 {
    http_get(addr, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_data_plane_serves_training_through_restarts_and_every_dashboard_query_answers() {
    if !granary_e2e::environment_ready() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let root = root.path();
    let kubelet_dir = root.join("kubelet");
    let mut launcher = Launcher::new(root);
    let started = Instant::now();
    let step = |what: &str| eprintln!("[{:6.1}s] {what}", started.elapsed().as_secs_f64());

    // The store: an S3-protocol server with the dataset uploaded into it.
    let dataset_dir = root.join("dataset");
    let files = write_dataset(&dataset_dir);
    let s3_addr = free_addr();
    let _s3 = launcher.launch(
        "s3",
        &binary("examples/s3-test-server"),
        &[
            "--root".into(),
            root.join("s3").to_string_lossy().into_owned(),
            "--listen".into(),
            s3_addr.to_string(),
            "--bucket".into(),
            "datasets".into(),
            "--bucket".into(),
            "checkpoints".into(),
            "--upload".into(),
            format!("{}=datasets/train", dataset_dir.display()),
        ],
    );
    let s3 = format!("http://{s3_addr}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !launcher.log("s3").contains("s3 test server on") {
        assert!(
            Instant::now() < deadline,
            "the S3 server did not start: {}",
            launcher.log("s3")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    step("S3 server up, dataset uploaded");

    // Three workers, as the StatefulSet runs them.
    let slots: Vec<WorkerSlot> = (0..WORKERS)
        .map(|i| WorkerSlot {
            grpc: free_addr(),
            metrics: free_addr(),
            cache_dir: root.join(format!("worker-{i}-cache")),
        })
        .collect();
    let mut workers: Vec<Option<Proc>> = (0..WORKERS)
        .map(|i| Some(start_worker(&mut launcher, &slots, i, &s3)))
        .collect();
    step("three workers up");

    // The node: the daemon, then granary-csi (the fd keeper) on their sockets.
    let node_metrics = free_addr();
    let csi_metrics = free_addr();
    let mut node_daemon = Some(start_node_daemon(&mut launcher, root, node_metrics));
    let csi_socket = root.join("csi/csi.sock");
    let _csi = launcher.launch(
        "granary-csi",
        &binary("granary-csi"),
        &[
            "--endpoint".into(),
            format!("unix://{}", csi_socket.display()),
            "--node-id".into(),
            "node-a".into(),
            "--node-daemon".into(),
            format!("unix://{}", root.join("run/node.sock").display()),
            "--metrics-listen".into(),
            csi_metrics.to_string(),
            "--volume-key-file".into(),
            fake_api::write_test_volume_key(root).to_string_lossy().into_owned(),
        ],
    );
    wait_for_path(&csi_socket, "granary-csi");
    wait_for_port(csi_metrics, "granary-csi's metrics");
    step("node daemon and granary-csi up");

    // The CheckpointPolicy's commit coordinator, as its StatefulSet runs it, with the token
    // the operator derives for the policy's volume (granary-csi derives the same).
    let coordinator = free_addr();
    let token_file = root.join("commit-token");
    std::fs::write(&token_file, fake_api::test_volume_key().commit_token(CHECKPOINT_HANDLE)).expect("token");
    let _coordinator = launcher.launch(
        "commit-coordinator",
        &binary("granary-cache"),
        &[
            "commit-coordinator".into(),
            "--resync-grace".into(),
            "6s".into(),
            "--listen".into(),
            coordinator.to_string(),
            "--state-dir".into(),
            root.join("commit-coordinator").to_string_lossy().into_owned(),
            "--token-file".into(),
            token_file.to_string_lossy().into_owned(),
        ],
    );
    wait_for_port(coordinator, "the commit coordinator");

    // The operator's reconciles, with its metrics served for Prometheus.
    let (fake, client) = FakeApi::new();
    let mut registry = Registry::default();
    let ctx = operator_context(
        client,
        slots.iter().map(|s| s.grpc.to_string()).collect(),
        coordinator.to_string(),
        &mut registry,
    );
    let (operator_metrics, _) = granary_process::metrics_http::serve(
        "127.0.0.1:0".parse().expect("addr"),
        Arc::new(registry),
        Arc::new(AtomicBool::new(true)),
        std::future::pending(),
    )
    .await
    .expect("operator metrics");
    let credentials = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("s3-credentials".into()),
            namespace: Some("ml".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("access_key_id".to_string(), ByteString(ACCESS_KEY.into())),
            ("secret_access_key".to_string(), ByteString(SECRET_KEY.into())),
        ])),
        ..Default::default()
    };
    let mut secret_json = serde_json::to_value(&credentials).expect("Secret JSON");
    secret_json["apiVersion"] = json!("v1");
    secret_json["kind"] = json!("Secret");
    fake.put(SECRETS, secret_json);
    let store = |uri: &str| json!({"uri": uri, "options": {"endpoint": s3, "region": "us-east-1"}, "secretRef": {"name": "s3-credentials"}});
    fake.put(
        DATASETS,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": "imagenet", "namespace": "ml", "uid": "ds-uid-1"},
               "spec": {"source": store("s3://datasets/train"), "cache": {"workers": WORKERS, "metadataTTL": "10m"},
                        "prewarm": {"policy": "BeforeScheduling", "paths": ["/"]}}}),
    );
    fake.put(
        POLICIES,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml", "uid": "cp-uid-1"},
               "spec": {"target": store("s3://checkpoints/llama"), "commitMarker": ".metadata", "retention": {"keepLast": 2},
                        "localCache": {"medium": "Disk", "size": "512Mi"}}}),
    );

    // Prometheus from here on, so the rates see the whole run.
    let mut jobs = vec![Job {
        name: "granary-worker",
        targets: slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.metrics,
                    vec![
                        ("dataset", "imagenet".to_string()),
                        ("pod", format!("imagenet-worker-{i}")),
                    ],
                )
            })
            .collect(),
    }];
    jobs.push(Job {
        name: "granary-node",
        targets: vec![(node_metrics, vec![("node", "node-a".to_string())])],
    });
    jobs.push(Job {
        name: "granary-csi",
        targets: vec![(csi_metrics, vec![("node", "node-a".to_string())])],
    });
    jobs.push(Job {
        name: "granary-operator",
        targets: vec![(operator_metrics, vec![])],
    });
    let prom = Prometheus::start(&root.join("prometheus"), &jobs);
    prom.wait_all_up(WORKERS + 3);
    step("prometheus scraping 6 targets");

    // Reconcile until the workers are ready and the prewarm is done.
    // The first reconcile only adds the finalizer.
    reconcile_dataset(&fake, &ctx).await;
    let ds = reconcile_dataset(&fake, &ctx).await;
    let mut sts = fake
        .get(STATEFULSETS, "imagenet-worker")
        .unwrap_or_else(|| panic!("no StatefulSet; the Dataset's status: {:?}", ds.status));
    assert_eq!(sts["spec"]["replicas"], json!(WORKERS));
    sts["status"] = json!({"replicas": WORKERS, "readyReplicas": WORKERS});
    fake.put(STATEFULSETS, sts);
    let deadline = Instant::now() + Duration::from_secs(120);
    let prewarm = loop {
        let ds = reconcile_dataset(&fake, &ctx).await;
        if let Some(p) = ds.status.and_then(|s| s.prewarm).filter(|p| p.finished.is_some()) {
            break p;
        }
        assert!(Instant::now() < deadline, "the prewarm did not finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let total: u64 = files.values().map(|d| d.len() as u64).sum();
    assert_eq!(
        (prewarm.files_done, prewarm.bytes_done, prewarm.failures),
        (files.len() as u64, total, 0),
        "prewarm: {prewarm:?}"
    );
    step(&format!("operator prewarmed {} files, {total} bytes", files.len()));

    // The kubelet publishes the Dataset's PV into a training pod.
    let mut csi = kubelet::node_client(&csi_socket);
    let (handle, mut attributes, secrets) = pv_publish_inputs(&fake, "granary-ml-imagenet");
    assert!(!secrets.is_empty(), "the PV names the credentials Secret");
    resolve_workers(&handle, &mut attributes, &slots);
    let data_target = kubelet::target_path(&kubelet_dir, "pod-trainer-0", "granary-ml-imagenet");
    csi.node_publish_volume(kubelet::publish_request(
        &handle,
        attributes,
        secrets,
        &data_target,
        ("trainer-0", "ml", "pod-trainer-0"),
        Mode::MultiNodeReaderOnly,
    ))
    .await
    .expect("NodePublishVolume of the dataset");
    step("dataset published into the pod");

    // Training: four readers, epoch after epoch, while a worker dies and the node daemon is
    // killed and restarted. No read may fail or return other bytes.
    let files = Arc::new(files);
    let failures = Arc::new(AtomicU64::new(0));
    let epochs = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            let (files, failures, epochs, stop, mount) = (
                Arc::clone(&files),
                Arc::clone(&failures),
                Arc::clone(&epochs),
                Arc::clone(&stop),
                data_target.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut bytes = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    bytes += epoch(&mount, &files, r * 1000 + n + 1, &failures);
                    n += 1;
                    epochs.fetch_add(1, Ordering::SeqCst);
                }
                bytes
            })
        })
        .collect();
    let wait_epochs = |n: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(180);
        let target = epochs.load(Ordering::SeqCst) + n;
        while epochs.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "readers stalled {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_epochs(2, "before the disruptions");
    step("readers running; killing worker 1");
    if let Some(mut w) = workers[1].take() {
        w.kill9();
    }
    drop_page_cache();
    wait_epochs(2, "with a worker down");
    step("killing the node daemon mid-read and starting a new one");
    if let Some(mut d) = node_daemon.take() {
        d.kill9();
    }
    node_daemon = Some(start_node_daemon(&mut launcher, root, node_metrics));
    drop_page_cache();
    wait_epochs(4, "after the node daemon restart");
    step("worker 1 back (same name, same addresses)");
    workers[1] = Some(start_worker(&mut launcher, &slots, 1, &s3));
    drop_page_cache();
    wait_epochs(2, "with every worker back");
    stop.store(true, Ordering::SeqCst);
    let read: u64 = readers.into_iter().map(|h| h.join().expect("reader")).sum();
    let epochs_done = epochs.load(Ordering::SeqCst);
    step(&format!("{epochs_done} epochs, {} MiB read", read >> 20));
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "reads failed or returned wrong bytes"
    );
    assert!(
        launcher.log("node-daemon").contains("taking them over"),
        "the restarted node daemon took the mount over from granary-csi rather than mounting afresh"
    );
    assert!(node_daemon.is_some());

    // A load onto the node through the pod's view of the mount, as the init container of a
    // Dataset with `prewarm.onNodes: PodNodes` runs it. The node cache (8 MiB) is smaller
    // than the samples: what fits is loaded in path order, the rest stays on the workers.
    let passthrough_before = metric_value(node_metrics, "granary_fuse_opens_total{origin=\"passthrough\"}");
    let out = std::process::Command::new(binary("granary-cache"))
        .args(["load", "--mount"])
        .arg(&data_target)
        .args(["--allow-partial", "/samples"])
        .output()
        .expect("granary-cache load --mount");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("did not fit and stay on the workers"), "{stderr}");
    assert!(metric_value(node_metrics, "granary_fuse_node_fills_total{result=\"complete\"}") > 0.0);
    assert!(metric_value(node_metrics, "granary_fuse_node_fills_total{result=\"no_room\"}") > 0.0);
    let first = files.keys().find(|k| k.starts_with("samples/")).expect("a sample");
    drop_page_cache();
    let got = std::fs::read(data_target.join(first)).expect("read a loaded sample");
    assert!(got == files[first], "the loaded sample's bytes");
    assert_eq!(
        metric_value(node_metrics, "granary_fuse_opens_total{origin=\"passthrough\"}"),
        passthrough_before + 1.0,
        "a loaded file opens through passthrough"
    );
    step("samples loaded onto the node (granary-cache load --mount)");

    // A checkpoint: written in the pod, committed in the store, restored through a new mount.
    reconcile_policy(&fake, &ctx).await;
    reconcile_policy(&fake, &ctx).await;
    let (ck_handle, ck_attributes, ck_secrets) = pv_publish_inputs(&fake, "granary-ml-llama-checkpoint");
    let writer_target = kubelet::target_path(&kubelet_dir, "pod-trainer-0", "granary-ml-llama-checkpoint");
    csi.node_publish_volume(kubelet::publish_request(
        &ck_handle,
        ck_attributes.clone(),
        ck_secrets.clone(),
        &writer_target,
        ("trainer-0", "ml", "pod-trainer-0"),
        Mode::MultiNodeMultiWriter,
    ))
    .await
    .expect("NodePublishVolume of the checkpoint volume");
    let shards: Vec<(String, Vec<u8>)> = (0..2u64)
        .map(|r| (format!("__{r}_0.distcp"), pattern(3 << 20, 5000 + r)))
        .chain(std::iter::once((".metadata".to_string(), pattern(4096, 9000))))
        .collect();
    let step_dir = writer_target.join("step-100");
    std::fs::create_dir(&step_dir).expect("mkdir step-100 in the checkpoint volume");
    let closed = Instant::now();
    for (name, data) in &shards {
        std::fs::write(step_dir.join(name), data).expect("write a checkpoint shard");
    }
    step(&format!(
        "checkpoint written (close() took {:?} for 6 MiB)",
        closed.elapsed()
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let status = reconcile_policy(&fake, &ctx).await.status.unwrap_or_default();
        if status.latest_checkpoint.as_deref() == Some("step-100") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the checkpoint was not committed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(status.committed_count, 1);
    for (name, data) in &shards {
        let stored =
            std::fs::read(root.join("s3/checkpoints/llama/step-100").join(name)).expect("the shard in the store");
        assert!(stored == *data, "{name} differs in the store");
    }
    step("checkpoint committed in the store (the operator reports step-100)");
    csi.node_unpublish_volume(kubelet::unpublish_request(&ck_handle, &writer_target))
        .await
        .expect("NodeUnpublishVolume of the writer");
    let restore_target = kubelet::target_path(&kubelet_dir, "pod-trainer-1", "granary-ml-llama-checkpoint");
    csi.node_publish_volume(kubelet::publish_request(
        &ck_handle,
        ck_attributes,
        ck_secrets,
        &restore_target,
        ("trainer-1", "ml", "pod-trainer-1"),
        Mode::MultiNodeMultiWriter,
    ))
    .await
    .expect("NodePublishVolume for the restoring pod");
    for (name, data) in &shards {
        let restored = std::fs::read(restore_target.join("step-100").join(name)).expect("restore a shard");
        assert!(restored == *data, "{name} restored with other bytes");
    }
    step("checkpoint restored through a fresh mount");

    // Every dashboard query, against what Prometheus scraped.
    prom.wait_all_up(WORKERS + 3);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/granary/dashboards");
    let (queries, variables) = prometheus::dashboard_queries(&dashboards);
    assert!(queries.len() >= 30, "only {} dashboard queries found", queries.len());
    let mut problems = Vec::new();
    for q in &queries {
        match prom.query(&prometheus::expand_variables(&q.expr)) {
            Ok(result) if result.is_empty() => {
                problems.push(format!("{} / {}: no series: {}", q.dashboard, q.panel, q.expr))
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{} / {}: {e}: {}", q.dashboard, q.panel, q.expr)),
        }
    }
    for (board, metric, label) in &variables {
        match prom.query(&format!("count by ({label}) ({metric})")) {
            Ok(r) if !r.is_empty() => {}
            other => problems.push(format!("{board}: variable {label} from {metric}: {other:?}")),
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard queries that fail:\n{}",
        problems.join("\n")
    );
    step(&format!(
        "{} dashboard queries and {} variables answered",
        queries.len(),
        variables.len()
    ));

    // What the dashboards show is what happened.
    let ratio = prom
        .query("sum(granary_cache_hits_total) / (sum(granary_cache_hits_total) + sum(granary_cache_misses_total))")
        .expect("hit ratio");
    let ratio: f64 = ratio[0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(ratio > 0.5, "after a prewarm most block reads hit: {ratio}");
    assert!(
        metric_value(csi_metrics, "granary_csi_calls_total") >= 4.0,
        "the CSI calls are counted"
    );
    assert!(metric_value(node_metrics, "granary_checkpoint_commits_total") >= 1.0);
    eprintln!("hit ratio {ratio:.3}; logs in {}", root.display());

    csi.node_unpublish_volume(kubelet::unpublish_request(&ck_handle, &restore_target))
        .await
        .expect("unpublish the restoring pod");
    csi.node_unpublish_volume(kubelet::unpublish_request(&handle, &data_target))
        .await
        .expect("unpublish the dataset");
}
