//! CSI calls over granary-csi's unix socket, shaped as the kubelet makes them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use granary_csi::proto::node_client::NodeClient;
pub use granary_csi::proto::volume_capability::access_mode::Mode;
use granary_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use granary_csi::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

pub fn node_client(socket: &Path) -> NodeClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://csi.local").connect_with_connector_lazy(tower::service_fn(move |_| {
        let path = path.clone();
        async move { UnixStream::connect(path).await.map(TokioIo::new) }
    }));
    NodeClient::new(channel)
}

/// A pod's target path under `kubelet_dir`, as the kubelet makes it (the parent exists).
pub fn target_path(kubelet_dir: &Path, pod_uid: &str, pv: &str) -> PathBuf {
    let dir = kubelet_dir.join(format!("pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}"));
    std::fs::create_dir_all(&dir).expect("the kubelet's pod volume dir");
    dir.join("mount")
}

/// NodePublishVolume for a PV: its handle and attributes, the pod info the kubelet adds
/// (the CSIDriver has podInfoOnMount), and the node-publish Secret's decoded data.
pub fn publish_request(
    volume_handle: &str,
    attributes: HashMap<String, String>,
    secrets: HashMap<String, String>,
    target: &Path,
    pod: (&str, &str, &str),
    mode: Mode,
) -> NodePublishVolumeRequest {
    let read_only = mode == Mode::MultiNodeReaderOnly;
    let mut context = attributes;
    let (name, namespace, uid) = pod;
    context.insert("csi.storage.k8s.io/pod.name".into(), name.into());
    context.insert("csi.storage.k8s.io/pod.namespace".into(), namespace.into());
    context.insert("csi.storage.k8s.io/pod.uid".into(), uid.into());
    context.insert("csi.storage.k8s.io/serviceAccount.name".into(), "default".into());
    context.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    NodePublishVolumeRequest {
        volume_id: volume_handle.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }),
        volume_context: context,
        secrets,
        readonly: read_only,
        ..Default::default()
    }
}

pub fn unpublish_request(volume_handle: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_handle.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}
