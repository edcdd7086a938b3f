//! Errors of the filesystem, and the one place they become an errno. Every variant says
//! which errno it is, so the FUSE layer never invents one.

use fuser::Errno;

pub use crate::fs_core::ToErrno;

use granary_cache::client::ClientError;
use granary_store::{ErrorKind, StoreError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("{0:?} does not exist")]
    NotFound(String),
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    #[error("{0:?} is a directory")]
    IsADirectory(String),
    #[error("the mount is read-only")]
    ReadOnly,
    #[error("unknown inode or file handle {0} (the kernel asked for something this mount never gave out)")]
    Stale(u64),
    #[error("unknown file handle {0} (not open, or already released)")]
    BadHandle(u64),
    #[error("no such extended attribute")]
    NoAttribute,
    #[error("{0:?} changed in the source store while it was open; open it again")]
    Changed(String),
    #[error("access to {path:?} was refused: {detail}")]
    PermissionDenied { path: String, detail: String },
    #[error("this mount has no node-local cache to fill; mount it with a local cache (--local-cache DIR --local-cache-size SIZE, or the node daemon's --local-cache-size)")]
    NoNodeCache,
    #[error("{0:?} does not fit in the node-local cache beside the files loaded before it; it stays on the workers")]
    NoRoom(String),
    /// The cause is logged where this is created; the reader gets EIO.
    #[error("reading {path:?} failed: {cause}")]
    Io { path: String, cause: String },
}

/// The single mapping from a filesystem error to the errno the application sees.
impl ToErrno for FsError {
    fn errno(&self) -> Errno {
        match self {
            FsError::NotFound(_) => Errno::ENOENT,
            FsError::NotADirectory(_) => Errno::ENOTDIR,
            FsError::IsADirectory(_) => Errno::EISDIR,
            FsError::ReadOnly => Errno::EROFS,
            FsError::Stale(_) => Errno::ESTALE,
            FsError::BadHandle(_) => Errno::EBADF,
            FsError::NoAttribute => Errno::NO_XATTR,
            // A file replaced under an open handle: the bytes the reader had are gone.
            FsError::Changed(_) => Errno::ESTALE,
            FsError::PermissionDenied { .. } => Errno::EACCES,
            FsError::NoNodeCache => Errno::EOPNOTSUPP,
            FsError::NoRoom(_) => Errno::ENOSPC,
            FsError::Io { .. } => Errno::EIO,
        }
    }
}

impl FsError {
    pub fn from_client(path: &str, err: ClientError) -> Self {
        match err {
            ClientError::NotFound(_) => FsError::NotFound(path.to_string()),
            ClientError::Changed(_) => FsError::Changed(path.to_string()),
            ClientError::PermissionDenied(detail) => FsError::PermissionDenied {
                path: path.to_string(),
                detail,
            },
            other => FsError::Io {
                path: path.to_string(),
                cause: other.to_string(),
            },
        }
    }

    pub fn from_source(path: &str, err: StoreError) -> Self {
        match err.kind() {
            ErrorKind::NotFound => FsError::NotFound(path.to_string()),
            ErrorKind::Changed => FsError::Changed(path.to_string()),
            ErrorKind::PermissionDenied => FsError::PermissionDenied {
                path: path.to_string(),
                detail: err.detail().to_string(),
            },
            _ => FsError::Io {
                path: path.to_string(),
                cause: err.to_string(),
            },
        }
    }
}

impl granary_cache::singleflight::FlightError for FsError {
    fn task_failed(detail: String) -> Self {
        FsError::Io {
            path: String::new(),
            cause: detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_worker_errors_map_to_the_errno_a_reader_expects() {
        let missing = FsError::from_source("a", StoreError::not_found("a"));
        assert_eq!(missing.errno(), Errno::ENOENT);
        let down = FsError::from_client(
            "a",
            ClientError::SourceUnavailable("the source store is unreachable".into()),
        );
        assert_eq!(down.errno(), Errno::EIO);
        assert!(down.to_string().contains("unreachable"), "{down}");
        assert_eq!(FsError::ReadOnly.errno(), Errno::EROFS);
    }
}
