//! The node daemon as a real process on its real unix socket: shared, reference-counted
//! mounts, and mounts served again at the same paths after kill -9 and a restart.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use granary_node_api::client::connect;
use granary_node_api::proto::{ListMountsRequest, MountRequest, UnmountRequest};
use support::{fuse_possible, is_mounted, mounts_at, pattern, s3_env, start, BUCKET};
use tonic::Code;

struct NodeProcess {
    child: Child,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node(state_dir: &Path, socket: &Path) -> NodeProcess {
    start_node_with(state_dir, socket, &[])
}

fn start_node_with(state_dir: &Path, socket: &Path, extra: &[String]) -> NodeProcess {
    // The socket file of a killed daemon stays; wait for the new one.
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_granary-cache"))
        .args(["node", "--max-memory", "128MiB", "--state-dir"])
        .arg(state_dir)
        .arg("--socket")
        .arg(socket)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start granary-cache node");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the node daemon did not create its socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    NodeProcess { child }
}

fn leave(publisher: &str) -> UnmountRequest {
    UnmountRequest {
        volume_id: "pvc-imagenet".into(),
        publisher: publisher.into(),
    }
}

/// Splits the S3 server's settings as the operator does: endpoint and region as
/// `option.*` attributes, the keys as node-publish secrets (returned).
fn store_access(env: &support::S3Env, attributes: &mut HashMap<String, String>) -> HashMap<String, String> {
    let mut secrets = HashMap::new();
    for (k, v) in env.s3.options() {
        if k.contains("key") {
            secrets.insert(k, v);
        } else {
            attributes.insert(format!("option.{k}"), v);
        }
    }
    secrets
}

async fn read(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishers_share_one_mount_that_survives_a_killed_daemon() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let data = pattern(300_000, 5);
    env.put("node/train/a.bin", &data).await;
    let worker = start(env.config("node")).await;
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("run/node.sock");
    let mut node = start_node(&state.path().join("state"), &socket);
    let mut client = connect(&socket).unwrap();

    let mut attributes: HashMap<String, String> = HashMap::from([
        ("kind".into(), "dataset".into()),
        ("source".into(), format!("s3://{BUCKET}/node")),
        ("workers".into(), worker.addr.to_string()),
        ("metadataTTL".into(), "60s".into()),
    ]);
    let secrets = store_access(&env, &mut attributes);
    let request = |publisher: &str| MountRequest {
        volume_id: "pvc-imagenet".into(),
        publisher: publisher.into(),
        attributes: attributes.clone(),
        secrets: secrets.clone(),
    };

    let first = client.mount(request("/pods/a/vol")).await.unwrap().into_inner();
    assert!(first.created);
    let path = PathBuf::from(&first.path);
    assert!(path.starts_with(state.path().join("state/mnt")), "{}", first.path);
    let second = client.mount(request("/pods/b/vol")).await.unwrap().into_inner();
    assert_eq!(second.path, first.path, "one mount per volume");
    assert!(!second.created);
    // Mounting again for the same publisher is idempotent.
    client.mount(request("/pods/b/vol")).await.unwrap();
    assert_eq!(read(path.join("train/a.bin")).await.unwrap(), data);
    assert_eq!(mounts_at(&path), 1, "two publishers, one FUSE mount");

    // One publisher leaves: the mount stays for the other.
    let left = client.unmount(leave("/pods/a/vol")).await.unwrap().into_inner();
    assert!(!left.unmounted);
    assert_eq!(left.publishers_left, 1);
    assert_eq!(read(path.join("train/a.bin")).await.unwrap(), data);

    // kill -9: the kernel mount loses its daemon. A restart serves it again at the same path.
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    let dead = read(path.join("train/a.bin")).await.unwrap_err();
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    let _node = start_node(&state.path().join("state"), &socket);
    let mut client = connect(&socket).unwrap();
    let listed = client.list(ListMountsRequest {}).await.unwrap().into_inner().mounts;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].path, first.path);
    assert_eq!(listed[0].publishers, vec!["/pods/b/vol".to_string()]);
    assert!(listed[0].error.is_empty(), "{}", listed[0].error);
    assert_eq!(read(path.join("train/a.bin")).await.unwrap(), data);

    // The last publisher leaves: unmounted and gone from the record.
    let gone = client.unmount(leave("/pods/b/vol")).await.unwrap().into_inner();
    assert!(gone.unmounted);
    assert!(!is_mounted(&path));
    assert!(client
        .list(ListMountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mounts
        .is_empty());
    let unknown = client.unmount(leave("/pods/b/vol")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_volume_spec_is_refused_with_what_to_fix() {
    if !fuse_possible() {
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("node.sock");
    let _node = start_node(&state.path().join("state"), &socket);
    let mut client = connect(&socket).unwrap();
    let refused = |attributes: &[(&str, &str)]| MountRequest {
        volume_id: "v".into(),
        publisher: "p".into(),
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        secrets: HashMap::new(),
    };
    let err = client.mount(refused(&[("source", "s3://b/p")])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("`kind` is missing"), "{}", err.message());
    let err = client
        .mount(refused(&[("kind", "dataset"), ("source", "nfs://x/y")]))
        .await
        .unwrap_err();
    assert!(err.message().contains("nfs"), "{}", err.message());
    let err = client
        .mount(refused(&[("kind", "dataset"), ("workers", "host-without-port")]))
        .await
        .unwrap_err();
    assert!(err.message().contains("port"), "{}", err.message());
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a bad address is the caller's to fix"
    );
    assert!(client
        .list(ListMountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mounts
        .is_empty());
}

/// The host is the node's: a volume gets a host directory, an `fs://` store or the node's
/// cloud identity only where the node's flags allow it, and a refused one leaves nothing
/// behind on the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_reaches_only_the_host_paths_and_identity_the_node_allows() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let dir = tempfile::tempdir().unwrap();
    let nvme = dir.path().join("nvme");
    let host = dir.path().join("host-etc");
    std::fs::create_dir_all(&nvme).unwrap();
    std::fs::create_dir_all(&host).unwrap();
    std::os::unix::fs::symlink(&host, nvme.join("escape")).unwrap();
    let socket = dir.path().join("node.sock");
    let _node = start_node_with(
        &dir.path().join("state"),
        &socket,
        &[format!("--writeback-root={}", nvme.display())],
    );
    let mut client = connect(&socket).unwrap();
    let mut base: HashMap<String, String> = HashMap::from([
        ("kind".into(), "checkpoint".into()),
        ("target".into(), format!("s3://{BUCKET}/ckpt-host")),
        ("writebackSize".into(), "64MiB".into()),
    ]);
    let secrets = store_access(&env, &mut base);
    let request = |extra: &[(&str, String)]| {
        let mut attributes = base.clone();
        attributes.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        MountRequest {
            volume_id: "pvc-ckpt".into(),
            publisher: "/pods/a/vol".into(),
            attributes,
            secrets: secrets.clone(),
        }
    };
    for (what, extra, rule) in [
        ("/etc", vec![("writebackDir", "/etc".to_string())], "--writeback-root"),
        (
            "`..` out of an allowed root",
            vec![("writebackDir", format!("{}/../host-etc", nvme.display()))],
            "--writeback-root",
        ),
        (
            "a symlink out of an allowed root",
            vec![("writebackDir", format!("{}/escape", nvme.display()))],
            "--writeback-root",
        ),
        (
            "the node's identity",
            vec![("option.credentials", "auto".to_string())],
            "--allow-auto-credentials",
        ),
    ] {
        let err = client.mount(request(&extra)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().contains("refused by this node") && err.message().contains(rule),
            "{what}: {}",
            err.message()
        );
    }
    assert!(!Path::new("/etc/pvc-ckpt").exists(), "a refused volume wrote into /etc");
    assert_eq!(
        std::fs::read_dir(&host).unwrap().count(),
        0,
        "a refused volume wrote through the symlink"
    );
    assert_eq!(
        std::fs::read_dir(&nvme).unwrap().count(),
        1,
        "only the symlink is there"
    );
    let err = client
        .mount(MountRequest {
            volume_id: "pvc-host".into(),
            publisher: "/pods/a/vol".into(),
            attributes: HashMap::from([("kind".into(), "dataset".into()), ("source".into(), "fs:///etc".into())]),
            secrets: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("--fs-store-root"), "{}", err.message());
    assert!(client
        .list(ListMountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mounts
        .is_empty());

    // Under the allowed root (a `..` that stays inside is fine), the volume mounts there.
    let (path, _) = {
        let reply = client
            .mount(request(&[("writebackDir", format!("{}/x/../granary", nvme.display()))]))
            .await
            .expect("an allowed writebackDir")
            .into_inner();
        (reply.path, reply.created)
    };
    std::fs::write(Path::new(&path).join("probe"), b"x").unwrap();
    assert!(
        nvme.canonicalize().unwrap().join("granary/pvc-ckpt").is_dir(),
        "the write-back area is under the allowed root"
    );
    client
        .unmount(UnmountRequest {
            volume_id: "pvc-ckpt".into(),
            publisher: "/pods/a/vol".into(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_volume_uploads_through_the_node_daemon_even_after_its_last_pod_leaves() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("run/node.sock");
    let _node = start_node(&state.path().join("state"), &socket);
    let mut client = connect(&socket).unwrap();
    let mut attributes: HashMap<String, String> = HashMap::from([
        ("kind".into(), "checkpoint".into()),
        ("target".into(), format!("s3://{BUCKET}/ckpt")),
        ("commitMarker".into(), "_COMPLETE".into()),
        ("writebackSize".into(), "256MiB".into()),
        ("partSize".into(), "5MiB".into()),
    ]);
    let secrets = store_access(&env, &mut attributes);
    let request = MountRequest {
        volume_id: "pvc-llama-ckpt".into(),
        publisher: "/pods/trainer/ckpt".into(),
        attributes,
        secrets,
    };
    let mounted = client.mount(request).await.unwrap().into_inner();
    let path = PathBuf::from(&mounted.path);
    let shard = pattern(12 << 20, 77);
    {
        let (path, shard) = (path.clone(), shard.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(path.join("step_100")).unwrap();
            std::fs::write(path.join("step_100/model.safetensors"), &shard).unwrap();
            std::fs::write(path.join("step_100/_COMPLETE"), b"").unwrap();
        })
        .await
        .unwrap();
    }
    // The pod goes away at once; the node daemon still delivers the checkpoint.
    let left = client
        .unmount(UnmountRequest {
            volume_id: "pvc-llama-ckpt".into(),
            publisher: "/pods/trainer/ckpt".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.unmounted);
    assert!(!is_mounted(&path));
    let marker = env.s3.root.join(BUCKET).join("ckpt/step_100/_COMPLETE");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the checkpoint never reached the store");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = std::fs::read(env.s3.root.join(BUCKET).join("ckpt/step_100/model.safetensors")).unwrap();
    assert!(stored == shard, "the shard differs in the store");

    // A checkpoint spec without a target is refused with the spec's message.
    let err = client
        .mount(MountRequest {
            volume_id: "pvc-bad".into(),
            publisher: "/pods/x".into(),
            attributes: HashMap::from([("kind".into(), "checkpoint".into())]),
            secrets: HashMap::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("needs `target`"), "{}", err.message());
}

/// A Secret rotated at the store: uploads with the old keys are refused, which the volume's
/// condition (List's error) and the metrics say; the kubelet's next publish with the new
/// Secret reaches the running mount, and the waiting files go up without a remount.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_credentials_reach_the_running_mount_and_refusals_are_surfaced() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let _node = start_node_with(
        &dir.path().join("state"),
        &socket,
        &[format!("--metrics-listen={metrics_addr}")],
    );
    let mut client = connect(&socket).unwrap();
    let mut attributes: HashMap<String, String> = HashMap::from([
        ("kind".into(), "checkpoint".into()),
        ("target".into(), format!("s3://{BUCKET}/ckpt-rotate")),
        ("writebackSize".into(), "64MiB".into()),
    ]);
    let old_secrets = store_access(&env, &mut attributes);
    let publish = |secrets: HashMap<String, String>| MountRequest {
        volume_id: "pvc-rotate".into(),
        publisher: "/pods/a/vol".into(),
        attributes: attributes.clone(),
        secrets,
    };
    let path = PathBuf::from(
        client
            .mount(publish(old_secrets.clone()))
            .await
            .unwrap()
            .into_inner()
            .path,
    );

    // The store's keys are rotated; the mount still has the old ones.
    env.s3.rotate_credentials("granary-rotated", "granary-rotated-secret");
    let new_secrets = store_access(&env, &mut HashMap::new());
    assert_ne!(new_secrets, old_secrets);
    let data = pattern(300_000, 9);
    std::fs::write(path.join("step-1.bin"), &data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let refusal = loop {
        let error = volume_condition(&client, "pvc-rotate").await;
        if !error.is_empty() {
            break error;
        }
        assert!(
            Instant::now() < deadline,
            "a refused upload never showed in the volume's condition"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        refusal.contains("refused") && refusal.contains("Secret"),
        "the condition says what to fix: {refusal}"
    );
    let scrape = scrape_metrics(metrics_addr).await;
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("granary_checkpoint_upload_failures_total")
                && l.contains("reason=\"permission_denied\"")),
        "the refusal is counted by reason:\n{scrape}"
    );
    assert!(!env.s3.completed_writes().iter().any(|w| w.ends_with("step-1.bin")));

    // The kubelet republishes with the rotated Secret: no remount, the file goes up.
    let reply = client.mount(publish(new_secrets.clone())).await.unwrap().into_inner();
    assert!(!reply.created, "the running mount is kept");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !env
        .s3
        .completed_writes()
        .iter()
        .any(|w| w.ends_with("ckpt-rotate/step-1.bin"))
    {
        assert!(
            Instant::now() < deadline,
            "the waiting upload never used the rotated credentials: {:?}",
            env.s3.completed_writes()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !volume_condition(&client, "pvc-rotate").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the condition stayed abnormal after uploads resumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The env's own store client still has the old keys: the bytes are read off the server's disk.
    let on_disk = std::fs::read(env.s3.root.join(BUCKET).join("ckpt-rotate/step-1.bin")).unwrap();
    assert_eq!(on_disk, data);
    client
        .unmount(UnmountRequest {
            volume_id: "pvc-rotate".into(),
            publisher: "/pods/a/vol".into(),
        })
        .await
        .unwrap();
}

/// What List says is wrong with a volume ("" when nothing is).
async fn volume_condition(
    client: &granary_node_api::proto::node_daemon_client::NodeDaemonClient<tonic::transport::Channel>,
    volume_id: &str,
) -> String {
    client
        .clone()
        .list(ListMountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .mounts
        .into_iter()
        .find(|m| m.volume_id == volume_id)
        .map(|m| m.error)
        .unwrap_or_default()
}

/// GET /metrics over a plain TCP socket (HTTP/1.0, no client library).
async fn scrape_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// One volume's workers hang (they accept connections and never answer): its publish waits
/// for the mount's probe, and another volume's publish on the same node does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_whose_store_hangs_does_not_hold_up_another_volumes_publish() {
    if !fuse_possible() {
        return;
    }
    let env = s3_env().await;
    let data = pattern(100_000, 9);
    env.put("quick/a.bin", &data).await;
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = hanging.accept().await {
            held.push(stream);
        }
    });
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("run/node.sock");
    let _node = start_node(&state.path().join("state"), &socket);

    let volume = |id: &str, prefix: &str, workers: Option<String>| {
        let mut attributes: HashMap<String, String> = HashMap::from([
            ("kind".into(), "dataset".into()),
            ("source".into(), format!("s3://{BUCKET}/{prefix}")),
            ("metadataTTL".into(), "60s".into()),
        ]);
        let secrets = store_access(&env, &mut attributes);
        if let Some(workers) = workers {
            attributes.insert("workers".into(), workers);
        }
        MountRequest {
            volume_id: id.into(),
            publisher: format!("/pods/{id}/vol"),
            attributes,
            secrets,
        }
    };
    let mut slow_client = connect(&socket).unwrap();
    let slow_request = volume("pvc-hanging", "hang", Some(hanging_addr.to_string()));
    let slow = tokio::spawn(async move { slow_client.mount(slow_request).await });
    // Let the hanging publish take the daemon first.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let mut client = connect(&socket).unwrap();
    let quick = client
        .mount(volume("pvc-quick", "quick", None))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    if slow.is_finished() {
        panic!("the hanging store's publish ended: {:?}", slow.await);
    }
    println!("a volume published in {took:?} while another volume's workers hang");
    assert!(
        took < Duration::from_secs(10),
        "the publish waited {took:?} for the other volume"
    );
    assert_eq!(read(PathBuf::from(&quick.path).join("a.bin")).await.unwrap(), data);
    let left = client
        .unmount(UnmountRequest {
            volume_id: "pvc-quick".into(),
            publisher: "/pods/pvc-quick/vol".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(left.unmounted);
    slow.abort();
    held.abort();
}
