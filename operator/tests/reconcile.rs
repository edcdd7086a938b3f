//! The controllers against kube's mocked API service: what a Dataset and a CheckpointPolicy
//! become, idempotency, spec changes, deletion, and prewarm through a real worker on loopback.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use granary_cache::worker::{self, RunningWorker, WorkerConfig};
use granary_node::volume_spec::{checkpoint_mount, dataset_mount, NodeDefaults};
use granary_node::HostAccess;
use granary_operator::api::{CheckpointPolicy, Dataset};
use granary_operator::controller::{checkpoint_policy, dataset, Context, WorkerAddressing};
use granary_operator::metrics::OperatorMetrics;
use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use support::*;

fn context(client: kube::Client, workers: Vec<String>) -> Arc<Context> {
    let mut registry = Registry::default();
    let metrics = Arc::new(OperatorMetrics::new(&mut registry));
    let reporter = Reporter {
        controller: "granary-operator".into(),
        instance: None,
    };
    let mut ctx = Context::new(client, reporter, "granary:test".into(), metrics, test_volume_key());
    ctx.addressing = WorkerAddressing::Fixed(workers);
    ctx.store_timeout = Duration::from_secs(3);
    Arc::new(ctx)
}

fn source_dir(files: &[(&str, usize)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, size) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let bytes: Vec<u8> = (0..*size).map(|i| (i % 251) as u8).collect();
        std::fs::write(path, bytes).expect("write");
    }
    dir
}

fn put_dataset(fake: &FakeApi, name: &str, spec: Value) {
    fake.put(
        DATASETS,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "Dataset", "metadata": {"name": name, "namespace": "ml"}, "spec": spec}),
    );
}

async fn reconcile_dataset(fake: &FakeApi, ctx: &Arc<Context>, name: &str) -> Dataset {
    let value = fake.get(DATASETS, name).expect("the Dataset exists");
    let ds: Dataset = serde_json::from_value(value).expect("a Dataset");
    dataset::reconcile(Arc::new(ds), Arc::clone(ctx))
        .await
        .expect("reconcile");
    serde_json::from_value(fake.get(DATASETS, name).unwrap_or_default()).unwrap_or_else(|_| panic!("{name} readable"))
}

/// A node that lets volumes read `fs://` sources under the temporary directory, where the
/// tests keep their sources.
fn fs_sources_allowed() -> HostAccess {
    HostAccess {
        fs_store_roots: vec![std::env::temp_dir()],
        ..HostAccess::default()
    }
}

fn attributes(pv: &Value) -> BTreeMap<String, String> {
    checked_attributes(pv)
}

fn events(fake: &FakeApi) -> Vec<(String, String)> {
    fake.list(EVENTS)
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["note"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn set_ready_workers(fake: &FakeApi, sts: &str, ready: i32) {
    let mut obj = fake.get(STATEFULSETS, sts).expect("the StatefulSet exists");
    obj["status"] = json!({"replicas": ready, "readyReplicas": ready});
    fake.put(STATEFULSETS, obj);
}

async fn start_worker(source: &std::path::Path) -> RunningWorker {
    let config = WorkerConfig::new(
        format!("fs://{}", source.display()),
        "127.0.0.1:0".parse().expect("addr"),
    );
    worker::start(config).await.expect("worker starts")
}

/// A worker with both tiers, as a Memory-only Dataset's worker has (its cache directory on a
/// tmpfs): every block it loads is in memory and in the directory.
async fn start_two_tier_worker(source: &std::path::Path, cache_dir: &std::path::Path) -> RunningWorker {
    let mut config = WorkerConfig::new(
        format!("fs://{}", source.display()),
        "127.0.0.1:0".parse().expect("addr"),
    );
    config.cache_dir = Some(cache_dir.to_path_buf());
    config.cache_size = 256 << 20;
    worker::start(config).await.expect("worker starts")
}

#[tokio::test]
async fn a_dataset_becomes_workers_and_a_volume_and_a_second_reconcile_changes_nothing() {
    let src = source_dir(&[("train/a.bin", 1000)]);
    let (fake, client) = FakeApi::new();
    let ctx = context(client, vec!["127.0.0.1:1".into()]);
    put_dataset(
        &fake,
        "imagenet",
        json!({
            "source": {"uri": format!("fs://{}", src.path().display())},
            "cache": {"workers": 2, "tiers": [{"medium": "Memory", "size": "2Gi"}, {"medium": "Disk", "size": "10Gi", "storageClassName": "fast-nvme"}], "metadataTTL": "never"},
            "prewarm": {"policy": "None"},
        }),
    );
    // The first pass adds the finalizer, the second makes the objects.
    reconcile_dataset(&fake, &ctx, "imagenet").await;
    let ds = reconcile_dataset(&fake, &ctx, "imagenet").await;
    assert_eq!(
        ds.metadata.finalizers,
        Some(vec![granary_operator::controller::VOLUME_FINALIZER.to_string()])
    );
    let uid = ds.metadata.uid.clone().expect("uid");

    let cm = fake
        .get(CONFIGMAPS, "imagenet-worker-config")
        .expect("the worker ConfigMap");
    assert_eq!(cm["data"]["GRANARY_CACHE_SIZE"], (10u64 << 30).to_string());
    assert_eq!(cm["data"]["GRANARY_MEMORY_SIZE"], (2u64 << 30).to_string());
    assert_eq!(cm["data"]["GRANARY_METADATA_TTL"], "never");
    let svc = fake.get(SERVICES, "imagenet-workers").expect("the headless Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let sts = fake.get(STATEFULSETS, "imagenet-worker").expect("the StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 2);
    assert_eq!(sts["spec"]["serviceName"], "imagenet-workers");
    assert_eq!(sts["metadata"]["ownerReferences"][0]["uid"], uid.as_str());
    let claim = &sts["spec"]["volumeClaimTemplates"][0]["spec"];
    assert_eq!(claim["storageClassName"], "fast-nvme");
    assert_eq!(claim["resources"]["requests"]["storage"], (10u64 << 30).to_string());
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["args"], json!(["worker"]));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"],
        "imagenet-worker-config"
    );
    // The member set: a ConfigMap of its own, mounted, and each worker's own name in it.
    let members = fake
        .get(CONFIGMAPS, "imagenet-worker-members")
        .expect("the member ConfigMap");
    // The addresses the operator was given (`--worker-address`); in a cluster, the pods' names.
    assert_eq!(members["data"]["members"], "127.0.0.1:1\n");
    assert_eq!(cm["data"]["GRANARY_MEMBERS_FILE"], "/etc/granary/members/members");
    let volumes = sts["spec"]["template"]["spec"]["volumes"].as_array().expect("volumes");
    assert!(
        volumes
            .iter()
            .any(|v| v["configMap"]["name"] == "imagenet-worker-members"),
        "{volumes:?}"
    );
    assert_eq!(container["env"][1]["name"], "GRANARY_ADVERTISE");
    assert_eq!(container["env"][1]["value"], "$(POD_NAME).imagenet-workers.ml.svc:7070");

    // The PV is what granary-csi hands the node daemon: the daemon's own parser accepts it.
    let pv = fake.get(PVS, "granary-ml-imagenet").expect("the PV");
    assert_eq!(pv["spec"]["csi"]["driver"], "granary.dev");
    assert_eq!(pv["spec"]["claimRef"]["name"], "imagenet");
    let mount = dataset_mount(&attributes(&pv), &BTreeMap::new(), &fs_sources_allowed())
        .expect("the node daemon accepts the attributes");
    // A seed that resolves to every worker; the mount follows the workers' member set.
    assert_eq!(mount.workers, vec!["imagenet-workers.ml.svc:7070"]);
    assert_eq!(
        mount.source.as_deref(),
        Some(format!("fs://{}", src.path().display()).as_str())
    );
    let pvc = fake.get(PVCS, "imagenet").expect("the PVC");
    assert_eq!(pvc["spec"]["volumeName"], "granary-ml-imagenet");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadOnlyMany"]));

    let status = ds.status.expect("a status");
    assert_eq!(status.workers_summary.as_deref(), Some("0/2"));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "SourceReachable" && c.status == "True"),
        "{status:?}"
    );
    assert_eq!(status.observed_generation, Some(1));

    // Level-based and idempotent: another pass creates nothing and changes nothing.
    let before = fake.snapshot();
    let requests = fake.log().len();
    reconcile_dataset(&fake, &ctx, "imagenet").await;
    assert_eq!(fake.snapshot(), before);
    let writes: Vec<_> = fake.log()[requests..]
        .iter()
        .filter(|(m, path)| (m == "POST" || path.ends_with("/status")) && !path.contains("/events"))
        .cloned()
        .collect();
    assert!(writes.is_empty(), "a second reconcile wrote {writes:?}");
}

#[tokio::test]
async fn a_spec_change_rolls_the_workers_and_deletion_removes_the_pv_before_the_finalizer() {
    let src = source_dir(&[("a.bin", 10)]);
    let (fake, client) = FakeApi::new();
    let ctx = context(client.clone(), vec!["127.0.0.1:1".into()]);
    let spec = json!({"source": {"uri": format!("fs://{}", src.path().display())}, "prewarm": {"policy": "None"}});
    put_dataset(&fake, "ds", spec.clone());
    reconcile_dataset(&fake, &ctx, "ds").await;
    reconcile_dataset(&fake, &ctx, "ds").await;
    let sts = fake.get(STATEFULSETS, "ds-worker").expect("sts");
    let hash = sts["spec"]["template"]["metadata"]["annotations"]["granary.dev/config-hash"].clone();
    assert_eq!(sts["spec"]["replicas"], 1);
    // Memory alone: a sized tmpfs emptyDir as the cache directory.
    let volume = &sts["spec"]["template"]["spec"]["volumes"][0];
    assert_eq!(volume["emptyDir"]["medium"], "Memory");

    let pv = fake.get(PVS, "granary-ml-ds").expect("the PV");
    let mut obj = fake.get(DATASETS, "ds").expect("ds");
    obj["spec"]["cache"] = json!({"workers": 3, "blockSize": "8Mi"});
    obj["metadata"]["generation"] = json!(2);
    fake.put(DATASETS, obj);
    let ds = reconcile_dataset(&fake, &ctx, "ds").await;
    // Scaling rewrites the member set and leaves the volume alone: running mounts follow.
    assert_eq!(fake.get(PVS, "granary-ml-ds").expect("the PV"), pv);
    assert!(
        !events(&fake).iter().any(|(r, _)| r == "VolumeOutdated"),
        "scaling needs no new volume: {:?}",
        events(&fake)
    );
    let sts = fake.get(STATEFULSETS, "ds-worker").expect("sts");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_ne!(
        sts["spec"]["template"]["metadata"]["annotations"]["granary.dev/config-hash"], hash,
        "a changed config rolls the pods"
    );
    assert_eq!(
        fake.get(CONFIGMAPS, "ds-worker-config").expect("cm")["data"]["GRANARY_BLOCK_SIZE"],
        (8u64 << 20).to_string()
    );
    assert_eq!(ds.status.expect("status").observed_generation, Some(2));
    // A new source is a new volume: its attributes cannot change in place; the user is told.
    let other = source_dir(&[("b.bin", 10)]);
    let mut obj = fake.get(DATASETS, "ds").expect("ds");
    obj["spec"]["source"]["uri"] = json!(format!("fs://{}", other.path().display()));
    obj["metadata"]["generation"] = json!(3);
    fake.put(DATASETS, obj);
    reconcile_dataset(&fake, &ctx, "ds").await;
    assert!(
        events(&fake)
            .iter()
            .any(|(r, n)| r == "VolumeOutdated" && n.contains("delete the PVC ds")),
        "{:?}",
        events(&fake)
    );

    let api: kube::Api<Dataset> = kube::Api::namespaced(client, "ml");
    api.delete("ds", &Default::default()).await.expect("delete");
    assert!(fake.get(DATASETS, "ds").is_some(), "held by the finalizer");
    let held: Dataset = serde_json::from_value(fake.get(DATASETS, "ds").expect("ds")).expect("parse");
    dataset::reconcile(Arc::new(held), Arc::clone(&ctx))
        .await
        .expect("cleanup");
    assert!(fake.get(PVS, "granary-ml-ds").is_none(), "the PV is removed");
    assert!(
        fake.get(DATASETS, "ds").is_none(),
        "then the finalizer, and the Dataset goes"
    );
}

#[tokio::test]
async fn prewarm_runs_through_the_workers_records_progress_and_lifts_the_gate() {
    let files: Vec<(String, usize)> = (0..12)
        .map(|i| (format!("train/{i:03}.bin"), 300_000 + i * 1000))
        .collect();
    let refs: Vec<(&str, usize)> = files.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let src = source_dir(&refs);
    let total: usize = files.iter().map(|(_, s)| s).sum();
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let worker = start_two_tier_worker(src.path(), cache_dir.path()).await;
    let (fake, client) = FakeApi::new();
    let ctx = context(client, vec![worker.addr.to_string()]);
    put_dataset(
        &fake,
        "imagenet",
        json!({"source": {"uri": format!("fs://{}", src.path().display())}, "prewarm": {"policy": "BeforeScheduling", "paths": ["/train"]}}),
    );
    fake.put(
        PODS,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "trainer-0", "namespace": "ml", "labels": {"granary.dev/prewarm-gated": "true"}, "annotations": {"granary.dev/prewarm-datasets": "imagenet"}},
               "spec": {"containers": [{"name": "t", "image": "x"}], "schedulingGates": [{"name": "granary.dev/prewarm"}, {"name": "other/gate"}]}}),
    );
    reconcile_dataset(&fake, &ctx, "imagenet").await;
    let ds = reconcile_dataset(&fake, &ctx, "imagenet").await;
    assert_eq!(
        ds.status.as_ref().and_then(|s| s.phase),
        Some(granary_operator::api::dataset::DatasetPhase::Pending)
    );
    set_ready_workers(&fake, "imagenet-worker", 1);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let ds = reconcile_dataset(&fake, &ctx, "imagenet").await;
        let status = ds.status.expect("status");
        if status.prewarm.as_ref().is_some_and(|p| p.finished.is_some()) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prewarm did not finish: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let prewarm = status.prewarm.clone().expect("prewarm");
    assert_eq!(prewarm.files_total, 12);
    assert_eq!(prewarm.files_done, 12);
    assert_eq!(prewarm.bytes_total, total as u64);
    assert_eq!(prewarm.bytes_done, total as u64);
    assert_eq!(prewarm.failures, 0);
    assert_eq!(prewarm.attempts, 1);
    assert_eq!(status.phase, Some(granary_operator::api::dataset::DatasetPhase::Ready));
    assert_eq!(status.total_bytes, Some(total as u64));
    assert!(status
        .conditions
        .iter()
        .any(|c| c.type_ == "Prewarmed" && c.status == "True"));
    // Each block once, though it is in both tiers (counting both doubled it).
    let cached = status.cached_bytes.unwrap_or(0);
    assert!(
        cached >= total as u64 && cached < total as u64 * 3 / 2,
        "cached {cached} of {total}: {status:?}"
    );

    let pod = fake.get(PODS, "trainer-0").expect("pod");
    assert_eq!(
        pod["spec"]["schedulingGates"],
        json!([{"name": "other/gate"}]),
        "only granary's gate is lifted"
    );
    assert!(
        pod["metadata"]["labels"].get("granary.dev/prewarm-gated").is_none(),
        "{pod}"
    );
    let reasons: Vec<String> = events(&fake).into_iter().map(|(r, _)| r).collect();
    for expected in ["PrewarmStarted", "Prewarmed", "PhaseChanged"] {
        assert!(
            reasons.iter().any(|r| r == expected),
            "no {expected} event in {reasons:?}"
        );
    }
    let notes: Vec<String> = events(&fake).into_iter().map(|(_, n)| n).collect();
    assert!(
        notes.iter().any(|n| n == "New -> Pending"),
        "phases read as they are spelled: {notes:?}"
    );

    // The requests of a reconcile of a loaded Dataset, in order, in the manner of kube-rs
    // controller-rs's ApiServerVerifier: a new call (a list of every pod, a second read of
    // the Secret, a write that changes nothing) fails here. The namespace holds 10,000 other
    // pods, which cost no request; three new gated pods waiting for this Dataset cost one
    // read of it and a patch each.
    for i in 0..10_000 {
        fake.put(
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("web-{i}"), "namespace": "ml", "labels": {"app": "web"}},
                   "spec": {"containers": [{"name": "web", "image": "nginx"}]}}),
        );
    }
    for i in 1..=3 {
        fake.put(
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": format!("trainer-{i}"), "namespace": "ml", "labels": {"granary.dev/prewarm-gated": "true"}, "annotations": {"granary.dev/prewarm-datasets": "imagenet"}},
                   "spec": {"containers": [{"name": "t", "image": "x"}], "schedulingGates": [{"name": "granary.dev/prewarm"}]}}),
        );
    }
    let from = fake.requests().len();
    reconcile_dataset(&fake, &ctx, "imagenet").await;
    let calls: Vec<String> = fake.requests()[from..]
        .iter()
        .filter(|(_, path, _)| !path.contains("/events"))
        .map(|(method, path, query)| match query.as_str() {
            "" => format!("{method} {path}"),
            q => format!("{method} {path}?{q}"),
        })
        .collect();
    let apply = "force=true&fieldManager=granary-operator";
    assert_eq!(
        calls,
        vec![
            format!("PATCH {CONFIGMAPS}/imagenet-worker-config?&{apply}"),
            format!("PATCH {CONFIGMAPS}/imagenet-worker-members?&{apply}"),
            format!("PATCH {SERVICES}/imagenet-workers?&{apply}"),
            format!("PATCH {STATEFULSETS}/imagenet-worker?&{apply}"),
            format!("GET {PVS}/granary-ml-imagenet"),
            format!("GET {PVCS}/imagenet"),
            // Gated pods only; the one lifted above has left the set.
            format!("GET {PODS}?&labelSelector=granary.dev%2Fprewarm-gated%3Dtrue"),
            format!("GET {DATASETS}/imagenet"),
            format!("PATCH {PODS}/trainer-1"),
            format!("PATCH {PODS}/trainer-2"),
            format!("PATCH {PODS}/trainer-3"),
        ],
        "the requests of one reconcile"
    );
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_interrupted_prewarm_is_resumed_by_the_next_operator_and_says_so() {
    let src = source_dir(&[("a.bin", 50_000), ("b.bin", 60_000)]);
    let (fake, client) = FakeApi::new();
    // Nothing listens here: the first attempt fails.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let ctx = context(client.clone(), vec![dead]);
    put_dataset(
        &fake,
        "ds",
        json!({"source": {"uri": format!("fs://{}", src.path().display())}}),
    );
    reconcile_dataset(&fake, &ctx, "ds").await;
    reconcile_dataset(&fake, &ctx, "ds").await;
    set_ready_workers(&fake, "ds-worker", 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ds = reconcile_dataset(&fake, &ctx, "ds").await;
        if ds
            .status
            .and_then(|s| s.prewarm)
            .is_some_and(|p| p.last_error.is_some())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the failed attempt was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        events(&fake).iter().any(|(r, _)| r == "PrewarmInterrupted"),
        "{:?}",
        events(&fake)
    );

    // A new operator (say, after a leader change) with reachable workers picks it up.
    let worker = start_worker(src.path()).await;
    let ctx = context(client, vec![worker.addr.to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let prewarm = loop {
        let ds = reconcile_dataset(&fake, &ctx, "ds").await;
        if let Some(p) = ds.status.and_then(|s| s.prewarm).filter(|p| p.finished.is_some()) {
            break p;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed prewarm did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(prewarm.attempts >= 2, "{prewarm:?}");
    assert_eq!(prewarm.bytes_done, 110_000);
    assert!(
        events(&fake)
            .iter()
            .any(|(r, n)| r == "PrewarmResumed" && n.contains("attempt 2")),
        "{:?}",
        events(&fake)
    );
    worker.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_missing_secret_and_an_invalid_spec_are_reported_in_status_and_events() {
    let (fake, client) = FakeApi::new();
    let ctx = context(client, vec!["127.0.0.1:1".into()]);
    put_dataset(
        &fake,
        "s3data",
        json!({"source": {"uri": "s3://bucket/prefix/", "options": {"endpoint": "http://127.0.0.1:1", "region": "us-east-1"}, "secretRef": {"name": "creds"}}}),
    );
    reconcile_dataset(&fake, &ctx, "s3data").await;
    let ds = reconcile_dataset(&fake, &ctx, "s3data").await;
    let status = ds.status.expect("status");
    let reachable = status
        .conditions
        .iter()
        .find(|c| c.type_ == "SourceReachable")
        .expect("condition");
    assert_eq!(reachable.status, "False");
    assert!(
        reachable.message.contains("the Secret \"creds\"") && reachable.message.contains("kubectl create secret"),
        "{}",
        reachable.message
    );
    assert!(events(&fake).iter().any(|(r, _)| r == "SourceUnreachable"));

    put_dataset(
        &fake,
        "bad",
        json!({"source": {"uri": "s3:/nope"}, "cache": {"blockSize": "1Gi"}}),
    );
    reconcile_dataset(&fake, &ctx, "bad").await;
    let ds = reconcile_dataset(&fake, &ctx, "bad").await;
    let status = ds.status.expect("status");
    assert_eq!(status.phase, Some(granary_operator::api::dataset::DatasetPhase::Failed));
    assert!(
        fake.get(STATEFULSETS, "bad-worker").is_none(),
        "nothing is made for an invalid spec"
    );
    assert!(
        events(&fake)
            .iter()
            .any(|(r, n)| r == "InvalidSpec" && n.contains("blockSize")),
        "{:?}",
        events(&fake)
    );
}

#[tokio::test]
async fn a_checkpoint_policy_becomes_a_volume_and_reports_the_latest_committed_checkpoint() {
    let target = tempfile::tempdir().expect("tempdir");
    for (dir, marker) in [("step-9", true), ("step-10", true), ("step-11", false)] {
        std::fs::create_dir_all(target.path().join(dir)).expect("mkdir");
        std::fs::write(target.path().join(dir).join("shard-0.distcp"), b"weights").expect("write");
        if marker {
            std::fs::write(target.path().join(dir).join(".metadata"), b"m").expect("write");
        }
    }
    let (fake, client) = FakeApi::new();
    let ctx = context(client, vec![]);
    fake.put(
        POLICIES,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml"},
               "spec": {"target": {"uri": format!("fs://{}", target.path().display())}, "commitMarker": ".metadata",
                        "retention": {"keepLast": 3}, "localCache": {"medium": "Disk", "size": "100Gi", "hostPath": "/mnt/nvme0/granary"},
                        "upload": {"concurrency": 8, "partSize": "32Mi"}}}),
    );
    let reconcile = || async {
        let p: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("parse");
        checkpoint_policy::reconcile(Arc::new(p), Arc::clone(&ctx))
            .await
            .expect("reconcile");
    };
    reconcile().await;
    reconcile().await;
    let pv = fake.get(PVS, "granary-ml-llama-checkpoint").expect("the PV");
    let defaults = NodeDefaults {
        local_cache_size: 0,
        passthrough: false,
        max_readahead: 1 << 20,
        threads: 1,
        writeback_size: 1 << 30,
        // The node allows the NVMe mount the policy names (node.extraHostPaths).
        access: HostAccess {
            writeback_roots: vec!["/mnt/nvme0".into()],
            ..fs_sources_allowed()
        },
        node_name: Some("node-a".into()),
    };
    let mount = checkpoint_mount(
        &attributes(&pv),
        &BTreeMap::new(),
        &defaults,
        "/var/lib/granary/writeback/vol".into(),
    )
    .expect("the node daemon accepts the attributes");
    assert_eq!(mount.commit_marker.as_deref(), Some(".metadata"));
    assert_eq!(mount.upload.keep_last, 3);
    assert_eq!(mount.upload.concurrency, 8);
    assert_eq!(mount.upload.part_size, 32 << 20);
    assert_eq!(mount.writeback_size, 100 << 30);
    assert_eq!(mount.writeback_dir, std::path::PathBuf::from("/mnt/nvme0/granary/vol"));
    let pvc = fake.get(PVCS, "llama-checkpoint").expect("the PVC");
    assert_eq!(pvc["spec"]["accessModes"], json!(["ReadWriteMany"]));
    // Several nodes write the volume: each reports to the policy's commit coordinator, as
    // the node it is, with the token the operator gave the coordinator.
    let coordination = mount.coordinator.as_ref().expect("a coordinated volume");
    assert_eq!(coordination.address, "llama-commit.ml.svc:7071");
    assert_eq!(coordination.node, "node-a");
    let sts = fake
        .get(STATEFULSETS, "llama-commit")
        .expect("the coordinator's StatefulSet");
    assert_eq!(sts["spec"]["replicas"], json!(1));
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
        json!("state"),
        "its journal is on a PVC"
    );
    let args = sts["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    assert_eq!(args[0], json!("commit-coordinator"));
    assert!(
        fake.get(SERVICES, "llama-commit").is_some(),
        "the coordinator's Service"
    );
    let secret = fake.get(SECRETS, "llama-commit-token").expect("the token Secret");
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().expect("handle").to_string();
    assert_eq!(
        secret["stringData"]["token"]
            .as_str()
            .or(secret["data"]["token"].as_str())
            .map(str::to_string),
        Some(test_volume_key().commit_token(&handle)),
        "the token granary-csi derives for the nodes"
    );

    let policy: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("parse");
    let status = policy.status.expect("status");
    assert_eq!(status.committed_count, 2, "step-11 has no marker yet");
    assert_eq!(
        status.latest_checkpoint.as_deref(),
        Some("step-10"),
        "natural order: 10 is after 9"
    );
    assert!(status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True"));
    assert!(events(&fake)
        .iter()
        .any(|(r, n)| r == "CheckpointCommitted" && n.contains("step-10")));
}

/// The policy's status tells what only its commit coordinator knows: the checkpoint whose
/// marker waits, on which node and file, that node gone silent, and a node whose uploads
/// the target refuses. A real coordinator on loopback, reached with the derived token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_waiting_on_a_silent_node_and_refused_uploads_are_on_the_policy() {
    use granary_commit::proto::{MayCommitRequest, ReportRequest};
    let target = tempfile::tempdir().expect("tempdir");
    let (fake, client) = FakeApi::new();
    fake.put(
        POLICIES,
        json!({"apiVersion": "granary.dev/v1alpha1", "kind": "CheckpointPolicy", "metadata": {"name": "llama", "namespace": "ml", "uid": "u-1"},
               "spec": {"target": {"uri": format!("fs://{}", target.path().display())}, "commitMarker": ".metadata"}}),
    );
    let policy: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("parse");
    let token = test_volume_key().commit_token(&granary_operator::resources::volumes::checkpoint_handle(&policy));
    let state = tempfile::tempdir().expect("state");
    let metrics = Arc::new(granary_commit::metrics::CoordinatorMetrics::register(
        &mut Registry::default(),
    ));
    let service =
        granary_commit::server::CoordinatorService::open(state.path(), Some(token.clone()), Duration::ZERO, metrics)
            .expect("open");
    let (addr, _server) =
        granary_commit::server::serve("127.0.0.1:0".parse().expect("addr"), service, std::future::pending())
            .await
            .expect("serve");
    let nodes =
        granary_commit::CommitClient::new(&addr.to_string(), Some(&token), Duration::from_secs(5)).expect("client");
    let volume = policy.spec.target.uri.clone();
    let report = |node: &str, pending: &[&str], refusal: &str| ReportRequest {
        volume: volume.clone(),
        node: node.into(),
        pending: pending.iter().map(|p| p.to_string()).collect(),
        settled: vec![],
        replace: true,
        upload_refusal: refusal.into(),
    };
    nodes
        .report(report("node-a", &["step-5/.metadata"], ""))
        .await
        .expect("report a");
    nodes
        .report(report(
            "node-b",
            &["step-5/__1_0.distcp"],
            "uploads to s3://x are refused: access denied",
        ))
        .await
        .expect("report b");
    let answer = nodes
        .may_commit(MayCommitRequest {
            volume: volume.clone(),
            node: "node-a".into(),
            dir: "step-5".into(),
            marker: "step-5/.metadata".into(),
        })
        .await
        .expect("may commit");
    assert!(!answer.ready, "node-b's shard is pending");

    let mut registry = Registry::default();
    let mut ctx = Context::new(
        client,
        Reporter {
            controller: "granary-operator".into(),
            instance: None,
        },
        "granary:test".into(),
        Arc::new(OperatorMetrics::new(&mut registry)),
        test_volume_key(),
    );
    ctx.commit_coordinator = Some(addr.to_string());
    ctx.node_silent_after = Duration::ZERO;
    ctx.store_timeout = Duration::from_secs(3);
    let ctx = Arc::new(ctx);
    // The first reconcile adds the finalizer, the second does the work.
    for _ in 0..2 {
        let p: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("parse");
        checkpoint_policy::reconcile(Arc::new(p), Arc::clone(&ctx))
            .await
            .expect("reconcile");
    }
    drop(policy);
    let policy: CheckpointPolicy = serde_json::from_value(fake.get(POLICIES, "llama").expect("policy")).expect("parse");
    let status = policy.status.expect("status");
    assert_eq!(status.incomplete.len(), 1, "{status:?}");
    assert_eq!(status.incomplete[0].dir, "step-5");
    let waiting: Vec<(&str, &str)> = status.incomplete[0]
        .waiting_for
        .iter()
        .map(|n| (n.node.as_str(), n.example.as_str()))
        .collect();
    assert_eq!(
        waiting,
        vec![("node-b", "step-5/__1_0.distcp")],
        "the marker is not its own blocker"
    );
    let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned().expect(t);
    let flowing = condition("CommitsFlowing");
    assert_eq!(flowing.status, "False");
    assert!(
        flowing.message.contains("step-5") && flowing.message.contains("node-b"),
        "{}",
        flowing.message
    );
    let uploads = condition("UploadsAccepted");
    assert_eq!(uploads.status, "False");
    assert!(uploads.message.contains("access denied"), "{}", uploads.message);
    let events = events(&fake);
    assert!(events
        .iter()
        .any(|(r, n)| r == "CheckpointIncomplete" && n.contains("forget-node")));
    assert!(events
        .iter()
        .any(|(r, n)| r == "UploadsRefused" && n.contains("node-b")));
}

/// A PV an older Granary made carries no mark, which every node refuses; the operator
/// cannot change its attributes, so it says what to do.
#[tokio::test]
async fn a_pv_without_the_mark_is_reported_outdated() {
    let src = source_dir(&[("a.bin", 10)]);
    let (fake, client) = FakeApi::new();
    let ctx = context(client.clone(), vec!["127.0.0.1:1".into()]);
    let spec = json!({"source": {"uri": format!("fs://{}", src.path().display())}, "prewarm": {"policy": "None"}});
    put_dataset(&fake, "ds", spec);
    // The first reconcile adds the finalizer, the second makes the objects.
    reconcile_dataset(&fake, &ctx, "ds").await;
    reconcile_dataset(&fake, &ctx, "ds").await;
    assert!(
        !events(&fake).iter().any(|(r, _)| r == "VolumeOutdated"),
        "a PV it made itself is current"
    );
    let mut pv = fake.get(PVS, "granary-ml-ds").expect("the PV");
    let attributes = pv["spec"]["csi"]["volumeAttributes"]
        .as_object_mut()
        .expect("attributes");
    assert!(attributes.remove("granary.dev/mark").is_some());
    fake.put(PVS, pv);
    reconcile_dataset(&fake, &ctx, "ds").await;
    assert!(
        events(&fake)
            .iter()
            .any(|(r, n)| r == "VolumeOutdated" && n.contains("no valid mark") && n.contains("delete the PVC ds")),
        "{:?}",
        events(&fake)
    );
}
