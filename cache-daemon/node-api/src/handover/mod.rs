//! Keeping FUSE mounts alive across a restart of the node daemon.
//!
//! A FUSE mount lives as long as some process holds its /dev/fuse descriptor. The node
//! daemon hands a duplicate of each mount's descriptor to a keeper ([`keeper`], run by
//! granary-csi, whose restarts are independent of the daemon's) over a unix socket
//! (SCM_RIGHTS, [`wire`]). When the daemon dies, the kernel holds the readers' requests
//! instead of failing them; the restarted daemon fetches the descriptors back ([`link`]) and
//! serves the same kernel mounts, so the pods' bind mounts never notice.

pub mod keeper;
pub mod link;
pub mod wire;

use std::path::{Path, PathBuf};

pub use keeper::Keeper;
pub use link::{fetch, HandedMount, HandoverLink};

/// The keeper's socket when none is given: next to the node daemon's.
pub fn default_keeper_socket(node_socket: &Path) -> PathBuf {
    let path = node_socket
        .to_str()
        .and_then(|s| s.strip_prefix("unix://"))
        .map(PathBuf::from)
        .unwrap_or_else(|| node_socket.to_path_buf());
    path.parent().unwrap_or_else(|| Path::new("/")).join("fd-keeper.sock")
}
