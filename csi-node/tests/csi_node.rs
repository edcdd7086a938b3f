//! granary-csi and the node daemon as real processes on their real sockets, driven by CSI
//! calls as the kubelet makes them: real FUSE mounts, real bind mounts, real kill -9.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use granary_csi::proto::identity_client::IdentityClient;
use granary_csi::proto::node_client::NodeClient;
use granary_csi::proto::volume_capability::access_mode::Mode;
use granary_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use granary_csi::proto::*;
use granary_node_api::volume_mark::{VolumeKey, MARK_ATTRIBUTE};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

// The node's processes are started as the e2e suite starts them: from a launcher shell that
// holds no FUSE files (see `granary_e2e::processes::Launcher`).
use granary_e2e::processes::{binary, wait_for_path, Launcher, Proc};

/// One node: the state directory, the sockets, and the two processes.
struct Node {
    root: tempfile::TempDir,
    launcher: Launcher,
    daemon: Option<Proc>,
    csi: Option<Proc>,
}

/// A failed test must not leave mounts behind: the processes go, then every mount under the
/// node's directory (pods' bind mounts first).
impl Drop for Node {
    fn drop(&mut self) {
        self.csi.take();
        self.daemon.take();
        let root = self.root.path().to_string_lossy().into_owned();
        let mut points: Vec<String> = mount_table()
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .map(String::from)
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

impl Node {
    fn new() -> Node {
        let root = tempfile::tempdir().unwrap();
        let launcher = Launcher::new(root.path());
        Node {
            root,
            launcher,
            daemon: None,
            csi: None,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    fn start_daemon(&mut self) {
        let socket = self.path("run/node.sock");
        let _ = std::fs::remove_file(&socket);
        let args: Vec<String> = vec![
            "node".into(),
            "--max-memory".into(),
            "128MiB".into(),
            "--state-dir".into(),
            self.path("state").to_string_lossy().into_owned(),
            "--socket".into(),
            socket.to_string_lossy().into_owned(),
            // The tests' sources and targets are directories under the temporary directory.
            "--fs-store-root".into(),
            std::env::temp_dir().to_string_lossy().into_owned(),
        ];
        self.daemon = Some(self.launcher.launch("node-daemon", &binary("granary-cache"), &args));
        wait_for_path(&socket, "the node daemon");
    }

    fn start_csi(&mut self) {
        let socket = self.path("csi/csi.sock");
        let _ = std::fs::remove_file(&socket);
        let args: Vec<String> = vec![
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--node-id".into(),
            "node-a".into(),
            "--node-daemon".into(),
            format!("unix://{}", self.path("run/node.sock").display()),
            "--volume-key-file".into(),
            self.key_file().to_string_lossy().into_owned(),
        ];
        self.csi = Some(
            self.launcher
                .launch("granary-csi", Path::new(env!("CARGO_BIN_EXE_granary-csi")), &args),
        );
        wait_for_path(&socket, "granary-csi");
    }

    /// The operator's volume key, where the chart mounts its Secret.
    fn key_file(&self) -> PathBuf {
        let path = self.path("volume.key");
        std::fs::write(&path, VOLUME_KEY).unwrap();
        path
    }

    fn channel(&self) -> Channel {
        let path = self.path("csi/csi.sock");
        Endpoint::from_static("http://csi.local").connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }

    /// A pod's target path, as the kubelet makes it (the parent exists, the path does not).
    fn target(&self, pod: &str) -> PathBuf {
        let dir = self.path(&format!("kubelet/pods/{pod}/volumes/kubernetes.io~csi/data"));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("mount")
    }
}

fn capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn dataset_context(source: &Path) -> HashMap<String, String> {
    [
        ("kind".to_string(), "dataset".to_string()),
        ("source".to_string(), format!("fs://{}", source.display())),
        ("metadataTTL".to_string(), "60s".to_string()),
    ]
    .into()
}

/// The key the operator marks PVs with (the chart makes a random one per release).
const VOLUME_KEY: &[u8; 32] = b"granary-test-volume-key-32-bytes";

/// `context` with the operator's mark for `volume_id`, as a PV the operator made has it.
fn marked(volume_id: &str, context: HashMap<String, String>) -> HashMap<String, String> {
    let key = VolumeKey::new(VOLUME_KEY).unwrap();
    let mut spec: BTreeMap<String, String> = context.into_iter().collect();
    spec.remove(MARK_ATTRIBUTE);
    key.mark(volume_id, &mut spec);
    spec.into_iter().collect()
}

/// NodePublishVolume of an operator-made PV with these attributes.
fn publish(volume_id: &str, target: &Path, context: HashMap<String, String>, mode: Mode) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(capability(mode)),
        volume_context: marked(volume_id, context),
        ..Default::default()
    }
}

/// `request` after its attributes were edited, marked again (to test what the node checks
/// beyond the mark).
fn remarked(mut request: NodePublishVolumeRequest) -> NodePublishVolumeRequest {
    request.volume_context = marked(&request.volume_id, std::mem::take(&mut request.volume_context));
    request
}

fn unpublish(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8)
        .collect()
}

fn mount_table() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

fn is_mount_point(path: &Path) -> bool {
    let p = path.to_string_lossy();
    mount_table().lines().any(|l| l.split(' ').nth(4) == Some(&*p))
}

/// A source directory with a few files.
fn source_with(files: &[(&str, Vec<u8>)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_mount_serves_two_pods_and_every_call_is_idempotent() {
    if !granary_e2e::mounts_possible("CSI mount tests") {
        return;
    }
    let data = pattern(3_000_000, 3);
    let source = source_with(&[("train/a.bin", data.clone()), ("train/b.txt", b"hello".to_vec())]);
    let mut node = Node::new();
    node.start_daemon();
    node.start_csi();

    let mut identity = IdentityClient::new(node.channel());
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "granary.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty(), "no controller service: {caps:?}");
    let mut csi = node.node();
    let node_info = csi.node_get_info(NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(node_info.node_id, "node-a");

    let (a, b) = (node.target("pod-a"), node.target("pod-b"));
    let mut context = dataset_context(source.path());
    // kubelet's per-pod keys differ between the pods and must not split the volume.
    context.insert("csi.storage.k8s.io/pod.name".into(), "pod-a".into());
    csi.node_publish_volume(publish("ds-imagenet", &a, context.clone(), Mode::MultiNodeReaderOnly))
        .await
        .unwrap();
    context.insert("csi.storage.k8s.io/pod.name".into(), "pod-b".into());
    csi.node_publish_volume(publish("ds-imagenet", &b, context.clone(), Mode::MultiNodeReaderOnly))
        .await
        .unwrap();
    // The kubelet retries a publish it is unsure of: the same answer, nothing doubled.
    csi.node_publish_volume(publish("ds-imagenet", &b, context.clone(), Mode::MultiNodeReaderOnly))
        .await
        .unwrap();
    assert_eq!(std::fs::read(a.join("train/a.bin")).unwrap(), data);
    assert_eq!(std::fs::read(b.join("train/b.txt")).unwrap(), b"hello");
    // One FUSE mount (the daemon's) plus a bind mount per pod.
    let root = node.root.path().to_string_lossy().into_owned();
    let ours = || {
        mount_table()
            .lines()
            .filter(|l| l.contains(" - fuse granary:") && l.contains(&root))
            .count()
    };
    assert_eq!(ours(), 3, "{}", mount_table());
    let state_mounts = mount_table()
        .lines()
        .filter(|l| l.contains(" - fuse granary:") && l.contains(&*node.path("state/mnt").to_string_lossy()))
        .count();
    assert_eq!(state_mounts, 1, "one shared mount in the daemon's state dir");
    // A dataset is read-only in the pod.
    let err = std::fs::File::create(a.join("train/new.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // The same target with the other read-only setting is a different publication.
    let clash = csi
        .node_publish_volume(publish(
            "ds-imagenet",
            &a,
            dataset_context(source.path()),
            Mode::SingleNodeWriter,
        ))
        .await;
    assert!(
        clash.is_ok(),
        "a dataset is always read-only, so this is the same publication: {clash:?}"
    );

    // Usage of a published path; NotFound elsewhere.
    let stats = csi
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "ds-imagenet".into(),
            volume_path: a.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A dataset never fills: nothing used, everything available (bytes and inodes), so
    // KubePersistentVolumeFillingUp and its inode twin stay quiet.
    for unit in [volume_usage::Unit::Bytes, volume_usage::Unit::Inodes] {
        let u = stats
            .usage
            .iter()
            .find(|u| u.unit == unit as i32)
            .unwrap_or_else(|| panic!("no {unit:?} usage: {stats:?}"));
        assert!(u.total > 0 && u.available > 0, "{unit:?}: {u:?}");
        assert!(u.available as f64 / u.total as f64 > 0.99, "{unit:?} looks full: {u:?}");
        if unit == volume_usage::Unit::Bytes {
            assert_eq!(u.used, 0, "{u:?}");
        }
    }
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));
    for (volume, path) in [("ds-imagenet", node.path("nowhere")), ("ds-unknown", a.clone())] {
        let err = csi
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{volume} at {}: {err:?}", path.display());
    }

    // Unpublish one pod: the other still reads; twice is still success.
    csi.node_unpublish_volume(unpublish("ds-imagenet", &a)).await.unwrap();
    assert!(!a.exists(), "the target path is removed");
    assert_eq!(std::fs::read(b.join("train/a.bin")).unwrap(), data);
    csi.node_unpublish_volume(unpublish("ds-imagenet", &a)).await.unwrap();
    csi.node_unpublish_volume(unpublish("ds-imagenet", &b)).await.unwrap();
    csi.node_unpublish_volume(unpublish("ds-imagenet", &b)).await.unwrap();
    assert_eq!(ours(), 0, "the last unpublish unmounts the volume:\n{}", mount_table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_fields_and_unservable_requests_get_the_codes_the_spec_names() {
    if !granary_e2e::mounts_possible("CSI mount tests") {
        return;
    }
    let source = source_with(&[("a.txt", b"a".to_vec())]);
    let mut node = Node::new();
    node.start_daemon();
    node.start_csi();
    let mut csi = node.node();
    let target = node.target("pod-x");
    let good = publish("ds", &target, dataset_context(source.path()), Mode::MultiNodeReaderOnly);

    let mut cases: Vec<(&str, NodePublishVolumeRequest, Code)> = Vec::new();
    let mut r = good.clone();
    r.volume_id.clear();
    cases.push(("no volume_id", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.target_path.clear();
    cases.push(("no target_path", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.target_path = "relative/mount".into();
    cases.push(("a relative target_path", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability = None;
    cases.push(("no volume_capability", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_context.remove("kind");
    cases.push(("no kind", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability = Some(VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeReaderOnly as i32,
        }),
    });
    cases.push(("a block volume", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_capability = Some(capability(Mode::MultiNodeMultiWriter));
    cases.push(("a writable dataset", r, Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_context.remove("source");
    cases.push(("a dataset with nothing to read", remarked(r), Code::InvalidArgument));
    let mut r = good.clone();
    r.volume_context = [("kind".to_string(), "checkpoint".to_string())].into();
    r.volume_capability = Some(capability(Mode::SingleNodeWriter));
    cases.push((
        "a checkpoint volume without a target",
        remarked(r),
        Code::InvalidArgument,
    ));
    // What the operator did not write is refused before the node daemon sees it: a PV
    // without the mark, another handle with a copied mark, an attribute added after marking,
    // and any inline volume.
    let mut r = good.clone();
    r.volume_context.remove(MARK_ATTRIBUTE);
    cases.push(("an unmarked PV", r, Code::PermissionDenied));
    let mut r = good.clone();
    r.volume_id = "csi-0f3a9c".into();
    cases.push(("a mark copied to another volume", r, Code::PermissionDenied));
    let mut r = good.clone();
    r.volume_context
        .insert("option.endpoint".into(), "http://169.254.169.254".into());
    cases.push(("an attribute added after marking", r, Code::PermissionDenied));
    let mut r = good.clone();
    r.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    cases.push(("an inline volume", r, Code::PermissionDenied));
    for (what, request, code) in cases {
        let err = csi.node_publish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!is_mount_point(&target), "{what}: nothing may be mounted");
    }

    for (what, request) in [
        ("no volume_id", unpublish("", &target)),
        ("no target_path", unpublish("ds", Path::new(""))),
    ] {
        let err = csi.node_unpublish_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "unpublish with {what}: {err:?}");
    }
    for (what, volume, path) in [
        ("no volume_id", "", target.clone()),
        ("no volume_path", "ds", PathBuf::new()),
    ] {
        let err = csi
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "stats with {what}: {err:?}");
    }
    // csi-sanity's order: a volume this node does not know, or a path it is not published
    // at (a relative one too), is NOT_FOUND.
    for (what, volume, path) in [
        ("an unknown volume", "ds-never", target.to_string_lossy().into_owned()),
        ("a relative path", "ds-never", "some/where".to_string()),
    ] {
        let err = csi
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: volume.into(),
                volume_path: path,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "stats of {what}: {err:?}");
    }
    // An unknown volume at a path that holds nothing of it: NotFound; the empty directory
    // is cleaned, so the kubelet's retry succeeds.
    std::fs::create_dir_all(&target).unwrap();
    let err = csi
        .node_unpublish_volume(unpublish("ds-never", &target))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    csi.node_unpublish_volume(unpublish("ds-never", &target)).await.unwrap();

    // A target already holding something else is ALREADY_EXISTS, and is left alone.
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(&target).unwrap();
    let rc = Command::new("mount")
        .args(["--bind"])
        .arg(other.path())
        .arg(&target)
        .status()
        .unwrap();
    assert!(rc.success());
    let err = csi.node_publish_volume(good.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(is_mount_point(&target));
    // Refused before anything was mounted for it.
    let mut daemon = granary_node_api::client::connect(&node.path("run/node.sock")).unwrap();
    let mounts = daemon
        .list(granary_node_api::proto::ListMountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert!(mounts.is_empty(), "a refused publish left a mount: {mounts:?}");
    let _ = Command::new("umount").arg(&target).status();
    // With the path free, the same request works.
    csi.node_publish_volume(good).await.unwrap();
    assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"a");
    let relative = csi
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "ds".into(),
            volume_path: "kubelet/pods/pod-x/volumes/kubernetes.io~csi/data/mount".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        relative.code(),
        Code::NotFound,
        "a published volume at a relative path: {relative:?}"
    );
    csi.node_unpublish_volume(unpublish("ds", &target)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_volume_is_writable_in_the_pod_and_reaches_its_store() {
    if !granary_e2e::mounts_possible("CSI mount tests") {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let mut node = Node::new();
    node.start_daemon();
    node.start_csi();
    let mut csi = node.node();
    let target = node.target("trainer-0");
    let context: HashMap<String, String> = [
        ("kind".to_string(), "checkpoint".to_string()),
        ("target".to_string(), format!("fs://{}", store.path().display())),
        ("commitMarker".to_string(), ".metadata".to_string()),
        ("writebackSize".to_string(), "64MiB".to_string()),
    ]
    .into();
    csi.node_publish_volume(publish("ckpt-llama", &target, context, Mode::SingleNodeWriter))
        .await
        .unwrap();
    let shard = pattern(5_000_000, 9);
    std::fs::create_dir_all(target.join("step-10")).unwrap();
    let mut f = std::fs::File::create(target.join("step-10/shard-0.distcp")).unwrap();
    f.write_all(&shard).unwrap();
    drop(f);
    std::fs::write(target.join("step-10/.metadata"), b"meta").unwrap();
    // A checkpoint volume's size is its write-back area: what a "filling up" alert should
    // watch, since a full area makes writers wait for uploads.
    let stats = csi
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "ckpt-llama".into(),
            volume_path: target.to_string_lossy().into_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .expect("byte usage");
    assert_eq!(bytes.total, 64 << 20, "{bytes:?}");
    assert!(bytes.available < bytes.total, "{bytes:?}");
    csi.node_unpublish_volume(unpublish("ckpt-llama", &target))
        .await
        .unwrap();
    // The uploads finish after the pod has gone.
    let marker = store.path().join("step-10/.metadata");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the checkpoint was not committed to the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        std::fs::read(store.path().join("step-10/shard-0.distcp")).unwrap(),
        shard
    );
}

/// Waits until `counter` has moved `n` further, failing with `stuck` after a minute.
fn wait_progress(counter: &AtomicU64, n: u64, stuck: &str) {
    let target = counter.load(Ordering::Acquire) + n;
    let deadline = Instant::now() + Duration::from_secs(60);
    while counter.load(Ordering::Acquire) < target {
        assert!(Instant::now() < deadline, "{stuck}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A pod's readers: reads of an open file at moving offsets (its pages dropped first, so each
/// read reaches the daemon) and whole files opened by path, each checked against the source.
struct Reader {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    /// Longest single read, in microseconds, since the last reset.
    longest_us: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// Starts `threads` readers sharing the counts: several reads in flight make it likely
    /// that a kill lands while the daemon holds some.
    fn start(mount: PathBuf, big: Vec<u8>, small: Vec<Vec<u8>>, threads: usize) -> Reader {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let reads = Arc::new(AtomicU64::new(0));
        let longest_us = Arc::new(AtomicU64::new(0));
        let (big, small) = (Arc::new(big), Arc::new(small));
        let threads = (0..threads)
            .map(|n| {
                let (s, f, r, l) = (stop.clone(), failures.clone(), reads.clone(), longest_us.clone());
                let (mount, big, small) = (mount.clone(), Arc::clone(&big), Arc::clone(&small));
                std::thread::spawn(move || {
                    use std::os::fd::AsRawFd;
                    let file = std::fs::File::open(mount.join("train/big.bin")).expect("open the big file");
                    let chunk = 256 * 1024;
                    let mut i = n * 1009;
                    while !s.load(Ordering::Acquire) {
                        let started = Instant::now();
                        let ok = if i % 4 == 3 {
                            let k = (i / 4) % small.len();
                            std::fs::read(mount.join(format!("train/small-{k}.bin"))).is_ok_and(|d| d == small[k])
                        } else {
                            let offset = (i * chunk * 7) % (big.len() - chunk);
                            // SAFETY: advice on a descriptor this thread owns; no memory is touched.
                            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                            let mut buf = vec![0u8; chunk];
                            file.read_exact_at(&mut buf, offset as u64).is_ok() && buf == big[offset..offset + chunk]
                        };
                        let took = started.elapsed().as_micros() as u64;
                        l.fetch_max(took, Ordering::AcqRel);
                        r.fetch_add(1, Ordering::AcqRel);
                        if !ok {
                            f.fetch_add(1, Ordering::AcqRel);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        Reader {
            stop,
            failures,
            reads,
            longest_us,
            threads,
        }
    }

    /// Waits until the reader has done `n` more reads (it is alive and served).
    fn wait_reads(&self, n: u64) {
        wait_progress(&self.reads, n, "the reader is stuck");
    }

    fn take_longest(&self) -> Duration {
        Duration::from_micros(self.longest_us.swap(0, Ordering::AcqRel))
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().expect("the reader panicked");
        }
        (
            self.reads.load(Ordering::Acquire),
            self.failures.load(Ordering::Acquire),
        )
    }
}

/// A pod's checkpoint writer: appends 1 MiB chunks to one open file (fsync every 8), the way
/// torch.save streams a shard, until stopped; then closes it and writes the commit marker.
struct Writer {
    stop: Arc<AtomicBool>,
    chunks: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

fn chunk(i: u64) -> Vec<u8> {
    pattern(1 << 20, (i % 251) as u8)
}

impl Writer {
    fn start(dir: PathBuf) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let chunks = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), chunks.clone());
        let thread = std::thread::spawn(move || -> Result<u64, String> {
            std::fs::create_dir_all(dir.join("step-1")).map_err(|e| format!("mkdir: {e}"))?;
            let mut file = std::fs::File::create(dir.join("step-1/shard-0.pt")).map_err(|e| format!("create: {e}"))?;
            let mut i = 0u64;
            while !s.load(Ordering::Acquire) {
                file.write_all(&chunk(i)).map_err(|e| format!("write {i}: {e}"))?;
                if i % 8 == 7 {
                    file.sync_all().map_err(|e| format!("fsync {i}: {e}"))?;
                }
                i += 1;
                c.store(i, Ordering::Release);
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(file);
            std::fs::write(dir.join("step-1/.metadata"), i.to_le_bytes()).map_err(|e| format!("marker: {e}"))?;
            Ok(i)
        });
        Writer {
            stop,
            chunks,
            thread: Some(thread),
        }
    }

    fn wait_chunks(&self, n: u64) {
        wait_progress(&self.chunks, n, "the writer is stuck or failed");
    }

    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .map(|t| t.join().expect("the writer panicked"))
            .unwrap_or(Ok(0))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarts_of_either_process_never_fail_a_reader() {
    if !granary_e2e::mounts_possible("CSI mount tests") {
        return;
    }
    let big = pattern(16 << 20, 5);
    let small: Vec<Vec<u8>> = (0..20).map(|k| pattern(50_000 + k * 1000, k as u8)).collect();
    let mut files = vec![("train/big.bin".to_string(), big.clone())];
    for (k, data) in small.iter().enumerate() {
        files.push((format!("train/small-{k}.bin"), data.clone()));
    }
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
    let source = source_with(&refs);
    let mut node = Node::new();
    node.start_csi();
    node.start_daemon();
    let mut csi = node.node();
    let target = node.target("trainer-0");
    csi.node_publish_volume(publish(
        "ds",
        &target,
        dataset_context(source.path()),
        Mode::MultiNodeReaderOnly,
    ))
    .await
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let ckpt_target = node.target("trainer-0-ckpt");
    let ckpt_context: HashMap<String, String> = [
        ("kind".to_string(), "checkpoint".to_string()),
        ("target".to_string(), format!("fs://{}", store.path().display())),
        ("commitMarker".to_string(), ".metadata".to_string()),
        ("writebackSize".to_string(), "1GiB".to_string()),
    ]
    .into();
    csi.node_publish_volume(publish("ckpt", &ckpt_target, ckpt_context, Mode::SingleNodeWriter))
        .await
        .unwrap();
    let reader = tokio::task::spawn_blocking({
        let target = target.clone();
        move || Reader::start(target, big, small, 4)
    })
    .await
    .unwrap();
    let writer = Writer::start(ckpt_target.clone());
    reader.wait_reads(50);
    writer.wait_chunks(8);
    reader.take_longest();

    // granary-csi killed and restarted: it never touches a mount.
    node.csi.as_mut().unwrap().kill9();
    reader.wait_reads(20);
    node.start_csi();
    reader.wait_reads(20);
    println!(
        "granary-csi kill -9 + restart: longest read {:?}",
        reader.take_longest()
    );
    // Give the daemon a moment to hand its descriptors to the new keeper.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The node daemon killed mid-read, twice (the second restart takes over a mount that was
    // itself taken over), down for 1 s each time.
    for round in 1..=2 {
        node.daemon.as_mut().unwrap().kill9();
        let killed = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        node.start_daemon();
        let restarted = killed.elapsed();
        reader.wait_reads(50);
        writer.wait_chunks(16);
        // The new daemon handed its descriptors back to the keeper, marked with its epoch
        // (handle numbers of each incarnation differ, so none is mistaken for another's).
        let keeper = node.path("run/fd-keeper.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = granary_node_api::handover::fetch(&keeper).unwrap();
            if held.len() == 2 && held.iter().all(|h| h.meta["epoch"] == round) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the keeper holds {held:?} after restart {round}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "node daemon kill -9 #{round}: down {:?} until the new daemon served, longest read {:?}",
            restarted,
            reader.take_longest()
        );
    }
    let (reads, failures) = tokio::task::spawn_blocking(move || reader.finish()).await.unwrap();
    println!("{reads} reads, {failures} failed");
    assert_eq!(failures, 0, "reads failed across the restarts");
    let written = tokio::task::spawn_blocking(move || writer.finish()).await.unwrap();
    let written = written.unwrap_or_else(|e| panic!("the checkpoint writer failed across the restarts: {e}"));
    println!("checkpoint writer: {written} MiB written and closed without an error");
    csi.node_unpublish_volume(unpublish("ckpt", &ckpt_target))
        .await
        .unwrap();
    // The shard reaches the store whole, before its marker.
    let marker = store.path().join("step-1/.metadata");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the checkpoint was not committed after the restarts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = std::fs::read(store.path().join("step-1/shard-0.pt")).unwrap();
    assert_eq!(stored.len() as u64, written << 20);
    for i in 0..written {
        let at = (i << 20) as usize;
        assert!(
            stored[at..at + (1 << 20)] == chunk(i)[..],
            "chunk {i} differs in the store"
        );
    }
    // The restarted daemon still does everything: a new file, and unpublishing.
    std::fs::write(source.path().join("train/after.txt"), b"after").unwrap();
    assert_eq!(std::fs::read(target.join("train/after.txt")).unwrap(), b"after");
    let mut csi = node.node();
    csi.node_unpublish_volume(unpublish("ds", &target)).await.unwrap();
    let root = node.root.path().to_string_lossy().into_owned();
    assert!(
        !mount_table().lines().any(|l| l.contains(&root)),
        "the last unpublish unmounts the volume:\n{}",
        mount_table()
    );
}
