//! A node's (or the operator's) connection to the commit coordinator of a volume.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::proto::commit_coordinator_client::CommitCoordinatorClient;
use crate::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum CommitClientError {
    #[error("commit coordinator address {address:?} is not valid: {reason}; give host:port or http://host:port")]
    Address { address: String, reason: String },
    #[error("the commit coordinator token is not valid in a header (it must be printable ASCII)")]
    Token,
    #[error("the commit coordinator at {address} refused the request: {status}")]
    Refused { address: String, status: Status },
    #[error("the commit coordinator at {address} cannot be reached: {status}; checkpoints wait for it to commit")]
    Unreachable { address: String, status: Status },
}

impl CommitClientError {
    /// Whether retrying can help (the coordinator is down or restarting).
    pub fn is_transient(&self) -> bool {
        matches!(self, CommitClientError::Unreachable { .. })
    }
}

#[derive(Clone)]
struct Token(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Clones share the connection.
#[derive(Clone)]
pub struct CommitClient {
    client: CommitCoordinatorClient<InterceptedService<Channel, Token>>,
    address: String,
}

impl CommitClient {
    /// Connects lazily to `address` (`host:port` or `http://host:port`); requests carry
    /// `token` when given and fail after `timeout`.
    pub fn new(address: &str, token: Option<&str>, timeout: Duration) -> Result<Self, CommitClientError> {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let bad = |reason: String| CommitClientError::Address {
            address: address.to_string(),
            reason,
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| bad(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .timeout(timeout);
        let token = token
            .map(|t| MetadataValue::try_from(format!("Bearer {}", t.trim())).map_err(|_| CommitClientError::Token))
            .transpose()?;
        let channel = endpoint.connect_lazy();
        Ok(CommitClient {
            client: CommitCoordinatorClient::with_interceptor(channel, Token(token)),
            address: address.to_string(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn error(&self, status: Status) -> CommitClientError {
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => {
                CommitClientError::Unreachable {
                    address: self.address.clone(),
                    status,
                }
            }
            _ => CommitClientError::Refused {
                address: self.address.clone(),
                status,
            },
        }
    }

    pub async fn report(&self, request: ReportRequest) -> Result<ReportResponse, CommitClientError> {
        let mut client = self.client.clone();
        client
            .report(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.error(s))
    }

    pub async fn may_commit(&self, request: MayCommitRequest) -> Result<MayCommitResponse, CommitClientError> {
        let mut client = self.client.clone();
        client
            .may_commit(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.error(s))
    }

    pub async fn status(&self) -> Result<StatusResponse, CommitClientError> {
        let mut client = self.client.clone();
        client
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.error(s))
    }

    pub async fn forget_node(&self, volume: &str, node: &str) -> Result<u64, CommitClientError> {
        let mut client = self.client.clone();
        client
            .forget_node(ForgetNodeRequest {
                volume: volume.into(),
                node: node.into(),
            })
            .await
            .map(|r| r.into_inner().forgotten)
            .map_err(|s| self.error(s))
    }
}
