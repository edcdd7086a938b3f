//! The node daemon's gRPC service, and the one mapping from its errors to gRPC statuses.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::mount_table::{MountTable, NodeError};
use granary_node_api::proto::node_daemon_server::NodeDaemon;
use granary_node_api::proto::{
    ListMountsRequest, ListMountsResponse, MountRequest, MountResponse, UnmountRequest, UnmountResponse,
};

pub struct NodeService {
    pub table: Arc<MountTable>,
}

fn status(err: NodeError) -> Status {
    let message = err.to_string();
    match err {
        NodeError::InvalidArgument(_) | NodeError::Spec(_) => Status::invalid_argument(message),
        NodeError::Mount { ref source, .. } if source.is_config() => Status::invalid_argument(message),
        NodeError::MountCheckpoint { ref source, .. } if source.is_config() => Status::invalid_argument(message),
        NodeError::Conflict(_) => Status::failed_precondition(message),
        NodeError::NotFound(_) => Status::not_found(message),
        NodeError::Mount { .. }
        | NodeError::MountCheckpoint { .. }
        | NodeError::Records { .. }
        | NodeError::Internal(_) => Status::internal(message),
    }
}

#[tonic::async_trait]
impl NodeDaemon for NodeService {
    async fn mount(&self, request: Request<MountRequest>) -> Result<Response<MountResponse>, Status> {
        let req = request.into_inner();
        let (path, created) = self
            .table
            .mount(
                &req.volume_id,
                &req.publisher,
                req.attributes.into_iter().collect(),
                req.secrets.into_iter().collect(),
            )
            .await
            .map_err(status)?;
        Ok(Response::new(MountResponse {
            path: path.to_string_lossy().into_owned(),
            created,
        }))
    }

    async fn unmount(&self, request: Request<UnmountRequest>) -> Result<Response<UnmountResponse>, Status> {
        let req = request.into_inner();
        let (unmounted, publishers_left) = self
            .table
            .unmount(&req.volume_id, &req.publisher)
            .await
            .map_err(status)?;
        Ok(Response::new(UnmountResponse {
            unmounted,
            publishers_left,
        }))
    }

    async fn list(&self, _request: Request<ListMountsRequest>) -> Result<Response<ListMountsResponse>, Status> {
        Ok(Response::new(ListMountsResponse {
            mounts: self.table.list().await,
        }))
    }
}
