//! The one way an error becomes the errno an application sees: [`ToErrno`], implemented by
//! each filesystem's error and by the causes they carry, so neither adapter invents one.

use fuser::Errno;
use granary_store::{ErrorKind, StoreError};

pub trait ToErrno {
    fn errno(&self) -> Errno;
}

/// A local file operation's own errno (EIO when it has none).
impl ToErrno for std::io::Error {
    fn errno(&self) -> Errno {
        match self.raw_os_error() {
            Some(code) if code > 0 => Errno::from_i32(code),
            _ => Errno::EIO,
        }
    }
}

/// A store's answer: a missing object, refused access, or an I/O error for the rest (a
/// reader cannot act on the difference between an outage and a failure).
impl ToErrno for StoreError {
    fn errno(&self) -> Errno {
        match self.kind() {
            ErrorKind::NotFound => Errno::ENOENT,
            ErrorKind::PermissionDenied => Errno::EACCES,
            _ => Errno::EIO,
        }
    }
}
