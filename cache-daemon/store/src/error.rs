//! The one error of store access, source or target: a [`ErrorKind`] every caller reads
//! (gRPC status, errno, CLI exit code), a [`Retry`] status taken from opendal's, the operation
//! and path, context pairs, and opendal's error as the source, so no cause is lost on the way.

use std::fmt;
use std::sync::Arc;

/// What went wrong, as callers decide on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The path does not exist in the store.
    NotFound,
    /// The object changed while it was being read (its version no longer matches).
    Changed,
    /// The store refused the credentials or the request.
    PermissionDenied,
    /// The store could not be reached or is overloaded; trying later may work.
    Unavailable,
    /// Anything else the store answered.
    Failed,
    /// A path that cannot name an object (refused before asking the store).
    InvalidPath,
}

impl ErrorKind {
    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Changed => "changed",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Failed => "failed",
            ErrorKind::InvalidPath => "invalid_path",
        }
    }
}

/// Whether the same request may succeed later; opendal's `ErrorStatus`, kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Will fail the same way again (a missing object, refused credentials).
    Permanent,
    /// May succeed if tried again.
    Temporary,
    /// Was temporary, and opendal's retries already gave up on it; may still succeed later.
    Persistent,
}

/// An error of a store operation. Cloneable: one failed fetch is shared by every reader
/// waiting on it.
#[derive(Debug, Clone)]
pub struct StoreError {
    kind: ErrorKind,
    retry: Retry,
    op: &'static str,
    path: String,
    detail: String,
    context: Vec<(&'static str, String)>,
    source: Option<Arc<opendal::Error>>,
    /// Which store the message names: "source" (a dataset's) or "target" (checkpoints').
    role: &'static str,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

impl StoreError {
    /// An error of `kind` for `op` on `path`, permanent unless said otherwise.
    pub fn new(kind: ErrorKind, op: &'static str, path: impl Into<String>) -> Self {
        StoreError {
            kind,
            retry: Retry::Permanent,
            op,
            path: path.into(),
            detail: String::new(),
            context: Vec::new(),
            source: None,
            role: "source",
        }
    }

    /// The error of a checkpoint volume's target store (named so in the message).
    pub fn in_target(mut self) -> Self {
        self.role = "target";
        self
    }

    pub fn not_found(path: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, "stat", path)
    }

    pub fn changed(path: impl Into<String>) -> Self {
        Self::new(ErrorKind::Changed, "read", path)
    }

    pub fn invalid_path(path: impl Into<String>, reason: &str) -> Self {
        Self::new(ErrorKind::InvalidPath, "check", path).with_detail(reason)
    }

    pub fn failed(op: &'static str, path: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(ErrorKind::Failed, op, path).with_detail(detail)
    }

    /// What a user reads after the kind's sentence: the store's message and its causes.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// A key and value that place the error (a volume, a worker, an attempt).
    pub fn with_context(mut self, key: &'static str, value: impl fmt::Display) -> Self {
        self.context.push((key, value.to_string()));
        self
    }

    /// The single mapping from opendal's errors to ours.
    pub fn from_opendal(op: &'static str, path: &str, err: opendal::Error) -> Self {
        use opendal::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound | K::IsADirectory | K::NotADirectory => ErrorKind::NotFound,
            K::ConditionNotMatch => ErrorKind::Changed,
            K::PermissionDenied => ErrorKind::PermissionDenied,
            K::RateLimited => ErrorKind::Unavailable,
            _ if err.is_temporary() || err.is_persistent() => ErrorKind::Unavailable,
            _ => ErrorKind::Failed,
        };
        let retry = if err.is_temporary() {
            Retry::Temporary
        } else if err.is_persistent() {
            Retry::Persistent
        } else {
            Retry::Permanent
        };
        let mut e = Self::new(kind, op, path).with_retry(retry).with_detail(detail(&err));
        e.source = Some(Arc::new(err));
        e
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.retry != Retry::Permanent
    }

    pub fn op(&self) -> &'static str {
        self.op
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn context(&self) -> &[(&'static str, String)] {
        &self.context
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, op, detail, role) = (&self.path, self.op, &self.detail, self.role);
        match self.kind {
            ErrorKind::NotFound => write!(f, "{path:?} does not exist in the {role} store")?,
            ErrorKind::Changed => write!(
                f,
                "{path:?} changed in the {role} store while it was being read; read it again"
            )?,
            ErrorKind::PermissionDenied => write!(
                f,
                "the {role} store refused access to {path:?} ({detail}); check the credentials and the bucket policy"
            )?,
            ErrorKind::Unavailable => write!(
                f,
                "the {role} store is unreachable ({op} {path:?}): {detail}; check the endpoint and the network"
            )?,
            ErrorKind::Failed => write!(f, "the {role} store failed {op} {path:?}: {detail}")?,
            ErrorKind::InvalidPath => write!(f, "invalid path {path:?}: {detail}")?,
        }
        for (key, value) in &self.context {
            write!(f, ", {key}: {value}")?;
        }
        Ok(())
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opendal_status_and_cause_are_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let err = opendal::Error::new(opendal::ErrorKind::Unexpected, "error sending request")
            .set_temporary()
            .set_source(io);
        let e = StoreError::from_opendal("read", "a/b", err).with_context("worker", "w-0");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.retry(), Retry::Temporary);
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(text.contains("connection refused"), "{text}");
        assert!(
            text.ends_with("check the endpoint and the network, worker: w-0"),
            "{text}"
        );
        let source = std::error::Error::source(&e).expect("opendal's error is the source");
        assert!(source.to_string().contains("error sending request"));

        let denied = opendal::Error::new(opendal::ErrorKind::PermissionDenied, "403");
        let e = StoreError::from_opendal("stat", "x", denied);
        assert_eq!((e.kind(), e.retry()), (ErrorKind::PermissionDenied, Retry::Permanent));
        assert!(!e.is_retryable());
    }
}
