//! The CSI Identity service: who the plugin is and whether it is ready.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::daemon::NodeDaemon;
use crate::proto::identity_server::Identity;
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    ProbeRequest, ProbeResponse,
};

/// The driver name: the CSIDriver object's name and every PV's `csi.driver`.
pub const DRIVER_NAME: &str = "granary.dev";

pub struct IdentityService {
    pub daemon: NodeDaemon,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    /// No capabilities: there is no Controller service (the operator creates PVs itself, so
    /// there is nothing to provision or attach), and volumes are reachable from every node.
    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    /// Ready only while the node daemon, which does all the mounting, answers.
    async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.daemon.list()).await {
            Ok(Ok(_)) => Ok(Response::new(ProbeResponse { ready: Some(true) })),
            Ok(Err(status)) => Err(Status::failed_precondition(status.message().to_string())),
            Err(_) => Err(Status::failed_precondition(
                "the node daemon did not answer within 5s; check `granary-cache node` on this node",
            )),
        }
    }
}
