//! The single mapping from the worker's errors to gRPC statuses. Every status the worker
//! creates carries [`ORIGIN_KEY`], so clients can tell the worker's answers from transport
//! failures.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::client::ORIGIN_KEY;
use granary_store::{ErrorKind, StoreError};

pub fn status(code: Code, message: impl Into<String>) -> Status {
    let mut status = Status::new(code, message);
    status
        .metadata_mut()
        .insert(ORIGIN_KEY, MetadataValue::from_static("worker"));
    status
}

pub fn invalid(message: impl Into<String>) -> Status {
    status(Code::InvalidArgument, message)
}

pub fn from_source(err: &StoreError) -> Status {
    let code = match err.kind() {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Changed => Code::FailedPrecondition,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Failed => Code::Internal,
        ErrorKind::InvalidPath => Code::InvalidArgument,
    };
    status(code, err.to_string())
}
