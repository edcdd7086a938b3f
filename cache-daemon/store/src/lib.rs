//! Granary's access to the stores that hold the data: the *source* a dataset is read from and
//! the *target* checkpoints are written to, both over opendal (S3, a NAS path, GCS, Azure
//! Blob, OSS, WebHDFS). Here: store URIs and options, reads of a range at an exact version,
//! streamed listings, uploads and deletes, the order of committed checkpoints, the quantities
//! Granary's flags take, and the TLS provider that every HTTP store client uses.
//!
//! Not here: caching of any kind (granary-cache), filesystems (granary-fs).

pub mod error;
pub mod retention;
pub mod source;
pub mod target;
pub mod tls;
pub mod units;

pub use error::{ErrorKind, Retry, StoreError};
