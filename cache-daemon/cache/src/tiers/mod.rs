//! The block cache tiers: memory over disk, each bounded, each with an eviction policy.

mod block_file;
mod bounded_index;
mod disk;
mod memory;

pub use block_file::CorruptBlock;
pub use bounded_index::{Admission, BoundedIndex, EvictionPolicy};
pub use disk::{read_block_file_in, read_block_file_into, DiskOpenReport, DiskRead, DiskTier, DiskWrite};
pub use memory::{InsertOutcome, MemoryTier};
