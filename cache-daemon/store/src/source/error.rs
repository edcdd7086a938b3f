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

/// opendal's message with every cause under it: "error sending request" alone hides what a
/// user must fix (an untrusted certificate, a refused connection, a DNS name).
fn detail(err: &opendal::Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
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
                detail: detail(&err),
            },
            ErrorKind::RateLimited => SourceError::Unavailable {
                op,
                path,
                detail: detail(&err),
            },
            _ if err.is_temporary() || err.is_persistent() => SourceError::Unavailable {
                op,
                path,
                detail: detail(&err),
            },
            _ => SourceError::Failed {
                op,
                path,
                detail: detail(&err),
            },
        }
    }
}
