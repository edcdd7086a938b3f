//! granary-csi's view of the node daemon: its gRPC client, with the daemon's failures turned
//! into the statuses the CSI spec asks for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use granary_node_api::proto::node_daemon_client::NodeDaemonClient;
use granary_node_api::proto::{ListMountsRequest, MountInfo, MountRequest, UnmountRequest};
use tonic::transport::Channel;
use tonic::{Code, Status};

#[derive(Clone)]
pub struct NodeDaemon {
    client: NodeDaemonClient<Channel>,
    socket: PathBuf,
}

impl NodeDaemon {
    /// A client of the daemon at `socket`; it connects on first use and again after the
    /// daemon restarts.
    pub fn new(socket: &Path) -> Result<Self, tonic::transport::Error> {
        Ok(NodeDaemon {
            client: granary_node_api::client::connect(socket)?,
            socket: socket.to_path_buf(),
        })
    }

    /// A daemon that cannot be reached is UNAVAILABLE (the CO retries); its own answers keep
    /// their codes.
    fn failed(&self, status: Status) -> Status {
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded => {
                Status::unavailable(format!(
                    "the node daemon at {} does not answer ({}); check that `granary-cache node` runs on this node",
                    self.socket.display(),
                    status.message()
                ))
            }
            _ => status,
        }
    }

    /// Mounts (or joins) the volume for `publisher`; returns the daemon's mount path.
    pub async fn mount(
        &self,
        volume_id: &str,
        publisher: &Path,
        attributes: BTreeMap<String, String>,
        secrets: BTreeMap<String, String>,
    ) -> Result<PathBuf, Status> {
        let reply = self
            .client
            .clone()
            .mount(MountRequest {
                volume_id: volume_id.to_string(),
                publisher: publisher.to_string_lossy().into_owned(),
                attributes: attributes.into_iter().collect(),
                secrets: secrets.into_iter().collect(),
            })
            .await
            .map_err(|s| self.failed(s))?;
        Ok(PathBuf::from(reply.into_inner().path))
    }

    /// Drops `publisher`'s use of the volume. Returns false when the daemon does not know
    /// the volume.
    pub async fn unmount(&self, volume_id: &str, publisher: &Path) -> Result<bool, Status> {
        let result = self
            .client
            .clone()
            .unmount(UnmountRequest {
                volume_id: volume_id.to_string(),
                publisher: publisher.to_string_lossy().into_owned(),
            })
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(self.failed(s)),
        }
    }

    pub async fn list(&self) -> Result<Vec<MountInfo>, Status> {
        let reply = self
            .client
            .clone()
            .list(ListMountsRequest {})
            .await
            .map_err(|s| self.failed(s))?;
        Ok(reply.into_inner().mounts)
    }

    /// The daemon's record of `volume_id`, if it has one.
    pub async fn find(&self, volume_id: &str) -> Result<Option<MountInfo>, Status> {
        Ok(self.list().await?.into_iter().find(|m| m.volume_id == volume_id))
    }
}
