//! Granary's distributed block cache: cache workers over a source store and their client.
//!
//! A byte's way from the store to a reader: `granary_store::source` reads a block's range
//! from the store; [`worker::BlockStore`] keeps it in the [`tiers`] (memory over disk), with
//! [`singleflight`] so concurrent misses make one read; [`worker`] serves it over gRPC
//! ([`proto`]) and prewarms datasets; [`client`] finds the block's owner by rendezvous hashing
//! ([`block`] names blocks) and reads it. [`budget`] bounds bytes wherever they queue.
//!
//! Not here: filesystems (granary-fs), the node daemon (granary-node), store access
//! (granary-store).

pub mod block;
pub mod budget;
pub mod client;
pub mod metrics;
pub mod proto;
pub mod singleflight;
pub mod tiers;
pub mod worker;
