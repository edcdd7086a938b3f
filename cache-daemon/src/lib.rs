//! Granary's data plane core: cache workers over any source store, their client library, and
//! the pieces both are made of.
//!
//! A byte's way from the store to a reader: [`source`] reads a block's range from the store;
//! [`worker::BlockStore`] keeps it in the [`cache`] tiers (memory over disk), with
//! [`singleflight`] so concurrent misses make one read; [`worker`] serves it over gRPC
//! ([`proto`]); [`client`] finds the block's owner by rendezvous hashing and reads it.

pub mod block;
pub mod cache;
pub mod checkpoint;
pub mod client;
pub mod fuse;
pub mod handover;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod proto;
pub mod shutdown;
pub mod singleflight;
pub mod source;
pub mod tls;
pub mod units;
pub mod worker;
