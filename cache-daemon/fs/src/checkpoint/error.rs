//! Errors of a checkpoint volume's filesystem, and the one place they become an errno.

use fuser::Errno;

pub use crate::fs_core::ToErrno;

use super::tracker::NoSpace;
use granary_store::target::TransferError;
use granary_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CkptFsError {
    #[error("{0:?} does not exist")]
    NotFound(String),
    #[error("unknown inode or handle {0}")]
    Stale(u64),
    #[error("unknown file handle {0} (not open, or already released)")]
    BadHandle(u64),
    #[error("an earlier write to this file failed (errno {0}); this version will not be uploaded")]
    WriteFailed(i32),
    #[error("{0:?} is held only in the target store; renaming it would copy it: copy and delete instead")]
    CrossStore(String),
    #[error("{0:?} is not empty")]
    NotEmpty(String),
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("{0}")]
    NoSpace(#[from] NoSpace),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("local write-back area: {0}")]
    Local(#[from] std::io::Error),
    #[error("target store: {0}")]
    Store(#[from] StoreError),
}

impl From<TransferError> for CkptFsError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Local { source, .. } => CkptFsError::Local(source),
            TransferError::Store(e) => CkptFsError::Store(e),
        }
    }
}

impl ToErrno for CkptFsError {
    fn errno(&self) -> Errno {
        match self {
            CkptFsError::NotFound(_) => Errno::ENOENT,
            CkptFsError::Stale(_) => Errno::ESTALE,
            CkptFsError::BadHandle(_) => Errno::EBADF,
            CkptFsError::WriteFailed(code) => Errno::from_i32(*code),
            CkptFsError::CrossStore(_) => Errno::EXDEV,
            CkptFsError::NotEmpty(_) => Errno::ENOTEMPTY,
            CkptFsError::Exists(_) => Errno::EEXIST,
            CkptFsError::NoSpace(_) => Errno::ENOSPC,
            CkptFsError::Unsupported(_) => Errno::ENOTSUP,
            CkptFsError::Local(e) => e.errno(),
            CkptFsError::Store(e) => e.errno(),
        }
    }
}
