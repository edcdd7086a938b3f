//! Errors a client of the workers sees, classified from gRPC statuses in one place.

use tonic::{Code, Status};

/// Metadata key the worker sets on every status it creates, so a client can tell "the worker
/// answered: the source store is unavailable" from "the worker itself is unreachable".
pub const ORIGIN_KEY: &str = "x-granary-origin";

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    SourceUnavailable(String),
    #[error("worker {worker} is unreachable: {message}")]
    WorkerUnavailable { worker: String, message: String },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Changed(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("worker {worker} failed ({code:?}): {message}")]
    Other {
        worker: String,
        code: Code,
        message: String,
    },
    #[error("no worker addresses given: pass --workers host:port[,host:port...]")]
    NoWorkers,
    #[error("invalid worker address {addr:?}: {reason}")]
    BadAddress { addr: String, reason: String },
}

impl ClientError {
    /// The single mapping from a gRPC status to a client error.
    pub fn from_status(worker: &str, status: Status) -> Self {
        let from_worker = status.metadata().contains_key(ORIGIN_KEY);
        let message = status.message().to_string();
        match status.code() {
            Code::NotFound if from_worker => ClientError::NotFound(message),
            Code::Unavailable if from_worker => ClientError::SourceUnavailable(message),
            Code::PermissionDenied => ClientError::PermissionDenied(message),
            Code::FailedPrecondition => ClientError::Changed(message),
            Code::InvalidArgument => ClientError::InvalidArgument(message),
            // Anything the worker did not say itself is the transport failing to reach it.
            _ if !from_worker => ClientError::WorkerUnavailable {
                worker: worker.to_string(),
                message: if message.is_empty() {
                    format!("{:?}", status.code())
                } else {
                    message
                },
            },
            code => ClientError::Other {
                worker: worker.to_string(),
                code,
                message,
            },
        }
    }

    /// Whether another worker may succeed where this one failed.
    pub fn is_worker_failure(&self) -> bool {
        matches!(self, ClientError::WorkerUnavailable { .. })
    }
}
