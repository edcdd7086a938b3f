//! granary-csi: the CSI node plugin of Granary (driver `granary.dev`).
//!
//! [`identity`] and [`node`] are the CSI services, served by [`server`] on the kubelet's
//! socket. Publishing asks the node daemon ([`daemon`]) for the volume's shared FUSE mount and
//! bind-mounts it into the pod ([`mounts`]); [`volume_context`] is the contract with the
//! operator (the PV's `volumeAttributes`) and [`capability`] the access modes served.
//! granary-csi also holds the node daemon's FUSE descriptors while that daemon restarts
//! (`granary_node_api::handover`), so pods keep their mounts.

pub mod capability;
pub mod daemon;
pub mod identity;
pub mod metrics;
pub mod mounts;
pub mod node;
pub mod proto;
pub mod server;
pub mod volume_context;

pub use identity::DRIVER_NAME;
pub use server::{start, CsiConfig, RunningCsi};
