//! The commit coordinator of checkpoint volumes written by several nodes at once.
//!
//! Each node's daemon writes a checkpoint volume through its own write-back area, so no node
//! alone knows when a checkpoint directory is complete in the store. Every node reports the
//! paths it has not settled yet ([`registry`]); the node holding a directory's marker asks
//! [`registry::Registry::may_commit`] before uploading it. The state is journaled
//! ([`journal`]) so a restarted coordinator never forgets a pending shard, served over gRPC
//! ([`server`]), and used by the nodes through [`client`].

pub mod client;
pub mod journal;
pub mod metrics;
pub mod proto;
pub mod registry;
pub mod server;

pub use client::{CommitClient, CommitClientError};
pub use registry::Registry;
