//! Loading a dataset onto the node: the contract between a mount and the tool that asks it
//! to fill its node-local cache (`granary-cache load --mount`). The mount is read-only, so
//! the request is a read of an extended attribute of the file to fill, which works through
//! any view of the mount (the node's path, a pod's bind mount) and needs no socket.

/// Names and values of the attributes.
pub mod xattr {
    /// Of a file: fills the node-local cache with the whole file, answering [`COMPLETE`]
    /// (or [`EMPTY`] for an empty file) once it is there. Errors: `ENOSPC` when it does not
    /// fit beside the files loaded before it (it stays on the workers), `EOPNOTSUPP` when
    /// the mount has no node-local cache, `EISDIR` for a directory, `EIO` when a block could
    /// not be fetched or written.
    pub const FILL: &str = "user.granary.fill";
    /// Of a file: reserves its room in the node-local cache without fetching it, answering
    /// [`COMPLETE`] (there already), `reserved`, or [`EMPTY`]; `ENOSPC` as for [`FILL`]. A
    /// load reserves in path order, one file at a time, and fills several at once: which
    /// files fit does not depend on which fill ran first.
    pub const RESERVE: &str = "user.granary.reserve";
    pub const RESERVED: &[u8] = b"reserved";
    /// Of any inode: `"<used bytes> <size bytes>"` of the node-local cache; `EOPNOTSUPP`
    /// without one.
    pub const NODE_CACHE: &str = "user.granary.node-cache";
    pub const COMPLETE: &[u8] = b"complete";
    pub const EMPTY: &[u8] = b"empty";
}
