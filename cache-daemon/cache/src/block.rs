//! Blocks: the unit of caching and placement. A file of the source is cut into fixed-size
//! blocks; a block is named by (path, file version, index), so a changed file (new version)
//! never shares a name with the old one and stale bytes can never be served.

use std::fmt;
use std::ops::Range;

use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

/// Default block size: large enough to amortise a store request, small enough to spread.
pub const DEFAULT_BLOCK_SIZE: u64 = 4 << 20;

/// A block's full identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub path: String,
    pub version: String,
    pub index: u64,
}

impl BlockKey {
    pub fn name(&self) -> BlockName {
        BlockName::of(&self.path, &self.version, self.index)
    }
}

/// A fixed-size name derived from a [`BlockKey`]: the index key of the tiers and the block's
/// file name on disk. Collisions of the 128-bit hash are caught by the key stored in each
/// block file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockName {
    pub file: u128,
    pub index: u64,
}

impl BlockName {
    pub fn of(path: &str, version: &str, index: u64) -> Self {
        let mut buf = Vec::with_capacity(path.len() + version.len() + 1);
        buf.extend_from_slice(path.as_bytes());
        buf.push(0);
        buf.extend_from_slice(version.as_bytes());
        BlockName {
            file: xxh3_128(&buf),
            index,
        }
    }

    /// The block's file name in the disk tier.
    pub fn file_name(&self) -> String {
        format!("{:032x}-{}.blk", self.file, self.index)
    }

    /// The inverse of [`BlockName::file_name`]; `None` for anything else.
    pub fn parse_file_name(name: &str) -> Option<Self> {
        let stem = name.strip_suffix(".blk")?;
        let (file, index) = stem.split_once('-')?;
        if file.len() != 32 {
            return None;
        }
        Some(BlockName {
            file: u128::from_str_radix(file, 16).ok()?,
            index: index.parse().ok()?,
        })
    }

    /// Rendezvous score of this block on a worker: the highest scores own the block.
    pub fn score(&self, worker: &str) -> u64 {
        let seed = xxh3_64_with_seed(worker.as_bytes(), 0x0067_7261_6e61_7279);
        let mut buf = [0u8; 24];
        buf[..16].copy_from_slice(&self.file.to_le_bytes());
        buf[16..].copy_from_slice(&self.index.to_le_bytes());
        xxh3_64_with_seed(&buf, seed)
    }
}

impl fmt::Display for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}-{}", self.file, self.index)
    }
}

/// Number of blocks of a file of `file_size` bytes.
pub fn block_count(file_size: u64, block_size: u64) -> u64 {
    file_size.div_ceil(block_size)
}

/// The byte range of block `index` of a file.
pub fn block_range(file_size: u64, block_size: u64, index: u64) -> Range<u64> {
    let start = index.saturating_mul(block_size).min(file_size);
    let end = start.saturating_add(block_size).min(file_size);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_file_names() {
        let name = BlockName::of("train/a.jpg", "etag:abc", 7);
        assert_eq!(BlockName::parse_file_name(&name.file_name()), Some(name));
        assert_eq!(BlockName::parse_file_name("x.blk"), None);
        assert_eq!(BlockName::parse_file_name("tmp-123"), None);
    }

    #[test]
    fn a_new_version_is_a_new_name() {
        assert_ne!(BlockName::of("a", "etag:1", 0), BlockName::of("a", "etag:2", 0));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(BlockName::of("ab", "c", 0), BlockName::of("a", "bc", 0));
    }

    #[test]
    fn ranges_cover_the_file_exactly() {
        assert_eq!(block_count(0, 4), 0);
        assert_eq!(block_count(9, 4), 3);
        assert_eq!(block_range(9, 4, 0), 0..4);
        assert_eq!(block_range(9, 4, 2), 8..9);
        assert_eq!(block_range(9, 4, 3), 9..9);
    }
}
