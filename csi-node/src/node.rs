//! The CSI Node service: publish a volume into a pod (the node daemon's shared mount, bound
//! at the pod's target path), unpublish it, and report its usage.
//!
//! granary-csi keeps no state of its own: which pod paths use which volume is the node
//! daemon's record (a publisher is a target path), and what is bound where is the kernel's
//! mount table. So a restarted granary-csi carries on where it stopped, and every call can be
//! repeated with the same result, as the spec asks.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::capability;
use crate::daemon::NodeDaemon;
use crate::metrics::CsiMetrics;
use crate::mounts;
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::rpc::Type as RpcType;
use crate::proto::node_service_capability::{Rpc, Type as CapabilityType};
use crate::proto::volume_usage::Unit;
use crate::proto::*;
use crate::volume_context::{VolumeContext, VolumeTrust};
use granary_node_api::volume_mark::COMMIT_TOKEN_SECRET;

pub struct NodeService {
    pub node_id: String,
    pub daemon: NodeDaemon,
    trust: VolumeTrust,
    busy: Arc<Mutex<HashSet<PathBuf>>>,
    metrics: Arc<CsiMetrics>,
}

/// Marks a target path as having a call in progress; a second call on it is ABORTED, as the
/// spec asks, instead of racing the first.
struct InProgress {
    busy: Arc<Mutex<HashSet<PathBuf>>>,
    path: PathBuf,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.path);
    }
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

/// A pod path the kubelet gives: required, and absolute (a relative one would land wherever
/// granary-csi runs).
fn required_path(value: &str, field: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(required(value, field)?);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} {value:?} is not an absolute path"
        )));
    }
    Ok(path)
}

fn internal(what: &str, path: &Path, e: io::Error) -> Status {
    Status::internal(format!("{what} {}: {e}", path.display()))
}

/// Runs filesystem calls that may touch a FUSE mount off the async runtime, bounded: a mount
/// whose daemon is stuck must not hold a CSI call forever.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    match tokio::time::timeout(Duration::from_secs(60), tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(Status::internal(format!("{what} failed: {e}"))),
        Err(_) => Err(Status::deadline_exceeded(format!("{what} took longer than 60s"))),
    }
}

impl NodeService {
    pub fn new(node_id: String, daemon: NodeDaemon, trust: VolumeTrust, metrics: Arc<CsiMetrics>) -> Self {
        NodeService {
            node_id,
            daemon,
            trust,
            busy: Arc::default(),
            metrics,
        }
    }

    fn begin(&self, path: &Path) -> Result<InProgress, Status> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(path.to_path_buf()) {
            return Err(Status::aborted(format!(
                "an operation on {} is already in progress",
                path.display()
            )));
        }
        Ok(InProgress {
            busy: Arc::clone(&self.busy),
            path: path.to_path_buf(),
        })
    }
}

/// Binds `source` at `target`, or checks that an earlier call did exactly that.
fn bind_target(source: &Path, target: &Path, read_only: bool) -> Result<bool, Status> {
    use std::os::unix::fs::MetadataExt;
    if mounts::is_mount_point(target).map_err(|e| internal("cannot read the mount table for", target, e))? {
        let same_volume = match (std::fs::metadata(source), std::fs::metadata(target)) {
            (Ok(s), Ok(t)) => s.dev() == t.dev(),
            _ => false,
        };
        let same_mode = mounts::usage(target).map(|u| u.read_only == read_only).unwrap_or(false);
        if same_volume && same_mode {
            return Ok(false);
        }
        return Err(Status::already_exists(format!(
            "{} is already mounted with {}; unpublish it first",
            target.display(),
            if same_volume {
                "the other read-only setting"
            } else {
                "something else"
            }
        )));
    }
    std::fs::create_dir_all(target).map_err(|e| internal("cannot create the target path", target, e))?;
    mounts::bind(source, target, read_only).map_err(|e| internal("cannot bind-mount the volume at", target, e))?;
    Ok(true)
}

impl NodeService {
    async fn publish(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?.to_string();
        let target = required_path(&req.target_path, "target_path")?;
        if req.volume_capability.is_none() {
            return Err(Status::invalid_argument("volume_capability is required"));
        }
        let context = VolumeContext::parse(&volume_id, &req.volume_context, &self.trust)?;
        let read_only = capability::check(req.volume_capability.as_ref(), context.kind)? || req.readonly;
        let _in_progress = self.begin(&target)?;
        // Something already mounted at the target that the daemon does not know as this
        // volume's is refused before the daemon mounts anything for it.
        let occupied = {
            let target = target.clone();
            blocking("reading the mount table", move || {
                mounts::is_mount_point(&target).map_err(|e| internal("cannot read the mount table for", &target, e))
            })
            .await?
        };
        if occupied {
            let target_str = target.to_string_lossy();
            let ours = self
                .daemon
                .find(&volume_id)
                .await?
                .is_some_and(|m| m.publishers.iter().any(|p| *p == target_str));
            if !ours {
                return Err(Status::already_exists(format!(
                    "{} is already mounted with something else; unpublish it first",
                    target.display()
                )));
            }
        }
        let mut secrets: BTreeMap<String, String> = req.secrets.into_iter().collect();
        // A pod's Secret must not choose the node's coordinator token.
        secrets.remove(COMMIT_TOKEN_SECRET);
        if let VolumeTrust::Marked(key) = &self.trust {
            if context.attributes.contains_key("commitCoordinator") {
                secrets.insert(COMMIT_TOKEN_SECRET.to_string(), key.commit_token(&volume_id));
            }
        }
        let source = self
            .daemon
            .mount(&volume_id, &target, context.attributes, secrets)
            .await?;
        let bound = {
            let (source, target) = (source.clone(), target.clone());
            blocking("binding the volume", move || bind_target(&source, &target, read_only)).await
        };
        match bound {
            Ok(true) => {
                tracing::info!(volume_id, target = %target.display(), read_only, "published");
                Ok(Response::new(NodePublishVolumeResponse {}))
            }
            // The CSIDriver has requiresRepublish: the kubelet repeats this call every
            // minute or so, with the Secret as it is now, so rotated credentials reach the
            // running mount (the node daemon applies them).
            Ok(false) => {
                tracing::debug!(volume_id, target = %target.display(), "published again");
                Ok(Response::new(NodePublishVolumeResponse {}))
            }
            Err(status) => {
                if status.code() != tonic::Code::AlreadyExists {
                    // Not bound: the daemon's reference for this path would keep the volume
                    // mounted for nobody.
                    let _ = self.daemon.unmount(&volume_id, &target).await;
                }
                Err(status)
            }
        }
    }

    async fn unpublish(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        let volume_id = required(&req.volume_id, "volume_id")?.to_string();
        let target = required_path(&req.target_path, "target_path")?;
        let _in_progress = self.begin(&target)?;
        let (was_mounted, existed) = {
            let target = target.clone();
            blocking("unmounting the target path", move || {
                let mounted = mounts::is_mount_point(&target)
                    .map_err(|e| internal("cannot read the mount table for", &target, e))?;
                if mounted {
                    mounts::unmount(&target).map_err(|e| internal("cannot unmount", &target, e))?;
                }
                // The spec: the plugin deletes what it created at the target path.
                let existed = match std::fs::remove_dir(&target) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                    Err(e) => return Err(internal("cannot remove the target path", &target, e)),
                };
                Ok((mounted, existed))
            })
            .await?
        };
        let known = self.daemon.unmount(&volume_id, &target).await?;
        if !known && !was_mounted && existed {
            // Nothing of this volume was there; the empty directory is gone, so a retry succeeds.
            return Err(Status::not_found(format!(
                "volume {volume_id:?} is not published on this node (nothing was mounted at {})",
                target.display()
            )));
        }
        tracing::info!(volume_id, target = %target.display(), was_mounted, "unpublished");
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        // The order csi-sanity checks: a missing argument is INVALID_ARGUMENT; an unknown
        // volume, or a path it is not published at (a relative one included), NOT_FOUND.
        let volume_id = required(&req.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&req.volume_path, "volume_path")?);
        let info = self
            .daemon
            .find(&volume_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {volume_id:?} is not published on this node")))?;
        let path_str = path.to_string_lossy();
        if !info.publishers.iter().any(|p| *p == path_str) {
            return Err(Status::not_found(format!(
                "volume {volume_id:?} is not published at {}",
                path.display()
            )));
        }
        let usage = {
            let path = path.clone();
            blocking("reading the volume's usage", move || {
                if !path.exists() {
                    return Err(Status::not_found(format!("{} does not exist", path.display())));
                }
                Ok(mounts::usage(&path))
            })
            .await?
        };
        let (usage, condition) = match usage {
            Ok(u) => (
                vec![
                    VolumeUsage {
                        available: u.available_bytes as i64,
                        total: u.total_bytes as i64,
                        used: u.used_bytes as i64,
                        unit: Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: u.free_inodes as i64,
                        total: u.total_inodes as i64,
                        used: u.total_inodes.saturating_sub(u.free_inodes) as i64,
                        unit: Unit::Inodes as i32,
                    },
                ],
                VolumeCondition {
                    abnormal: !info.error.is_empty(),
                    message: if info.error.is_empty() {
                        "served".into()
                    } else {
                        info.error.clone()
                    },
                },
            ),
            Err(e) => (
                Vec::new(),
                VolumeCondition {
                    abnormal: true,
                    message: format!("the mount does not answer: {e}"),
                },
            ),
        };
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "granary-csi does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "granary-csi does not stage volumes (no STAGE_UNSTAGE_VOLUME capability)",
        ))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.metrics.timed("NodePublishVolume", self.publish(request)).await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.metrics.timed("NodeUnpublishVolume", self.unpublish(request)).await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        self.metrics
            .timed("NodeGetVolumeStats", self.volume_stats(request))
            .await
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "Granary volumes are not expanded (no EXPAND_VOLUME capability)",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: RpcType| NodeServiceCapability {
            r#type: Some(CapabilityType::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![rpc(RpcType::GetVolumeStats), rpc(RpcType::VolumeCondition)],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
