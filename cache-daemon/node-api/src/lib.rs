//! What the node daemon's peers need, without the daemon: its gRPC API ([`proto`], served on
//! a unix socket; [`client`] connects to it) and the fd hand-over ([`handover`]) that keeps
//! FUSE mounts alive across a restart of the daemon, whose keeper granary-csi runs; and
//! [`volume_mark`], the operator's signature on the volumes it makes, which granary-csi
//! checks before the daemon mounts anything.
//!
//! Not here: the daemon and its mounts (granary-node), which link FUSE.

pub mod client;
pub mod handover;
pub mod proto;
pub mod volume_mark;
