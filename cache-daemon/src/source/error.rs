//! Errors of the source store, classified once from opendal's error kinds so every caller
//! (gRPC status, CLI exit code, retry decisions) reads a kind rather than a string.

/// What went wrong talking to the source store. Cloneable: one failed fetch is shared by every
/// reader waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("{path:?} does not exist in the source store")]
    NotFound { path: String },
    #[error("{path:?} changed in the source store while it was being read; read it again")]
    Changed { path: String },
    #[error("the source store refused access to {path:?} ({detail}); check the credentials and the bucket policy")]
    PermissionDenied { path: String, detail: String },
    #[error("the source store is unreachable ({op} {path:?}): {detail}; check the endpoint and the network")]
    Unavailable {
        op: &'static str,
        path: String,
        detail: String,
    },
    #[error("the source store failed {op} {path:?}: {detail}")]
    Failed {
        op: &'static str,
        path: String,
        detail: String,
    },
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
}

impl SourceError {
    /// The single mapping from opendal's error kinds to ours.
    pub fn from_opendal(op: &'static str, path: &str, err: opendal::Error) -> Self {
        use opendal::ErrorKind;
        let path = path.to_string();
        match err.kind() {
            ErrorKind::NotFound | ErrorKind::IsADirectory | ErrorKind::NotADirectory => SourceError::NotFound { path },
            ErrorKind::ConditionNotMatch => SourceError::Changed { path },
            ErrorKind::PermissionDenied => SourceError::PermissionDenied {
                path,
                detail: err.to_string(),
            },
            ErrorKind::RateLimited => SourceError::Unavailable {
                op,
                path,
                detail: err.to_string(),
            },
            _ if err.is_temporary() || err.is_persistent() => SourceError::Unavailable {
                op,
                path,
                detail: err.to_string(),
            },
            _ => SourceError::Failed {
                op,
                path,
                detail: err.to_string(),
            },
        }
    }
}
