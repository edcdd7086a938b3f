//! The on-disk format of one cached block: a header naming the block and a CRC-32C of its
//! bytes, then the bytes. A block whose file does not match its name or checksum is corrupt
//! and is never served.
//!
//! ```text
//! magic "GRNBLK\0\x01" | crc32c(data) u32 | data_len u64 | index u64
//! | path_len u32 | version_len u32 | path | version | data
//! ```

use bytes::Bytes;

use crate::block::BlockKey;

const MAGIC: &[u8; 8] = b"GRNBLK\0\x01";
const FIXED_HEADER: usize = 8 + 4 + 8 + 8 + 4 + 4;

/// Why a block file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptBlock {
    #[error("the header is truncated or its magic is wrong")]
    BadHeader,
    #[error("the file holds another block ({path:?} version {version:?} index {index})")]
    OtherBlock { path: String, version: String, index: u64 },
    #[error("the length is {actual} bytes, the header says {expected}")]
    BadLength { expected: u64, actual: u64 },
    #[error("the checksum does not match (stored {stored:08x}, computed {computed:08x})")]
    BadChecksum { stored: u32, computed: u32 },
}

/// The header for `key` with `data`; the file is this header followed by the data.
pub fn encode_header(key: &BlockKey, data: &[u8]) -> Vec<u8> {
    let mut header = Vec::with_capacity(FIXED_HEADER + key.path.len() + key.version.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    header.extend_from_slice(&(data.len() as u64).to_le_bytes());
    header.extend_from_slice(&key.index.to_le_bytes());
    header.extend_from_slice(&(key.path.len() as u32).to_le_bytes());
    header.extend_from_slice(&(key.version.len() as u32).to_le_bytes());
    header.extend_from_slice(key.path.as_bytes());
    header.extend_from_slice(key.version.as_bytes());
    header
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Checks a whole block file against the block it should hold and returns its data as a
/// slice of `file` (no copy).
pub fn decode(file: Bytes, expected: &BlockKey) -> Result<Bytes, CorruptBlock> {
    if file.len() < FIXED_HEADER || &file[..8] != MAGIC {
        return Err(CorruptBlock::BadHeader);
    }
    let stored_crc = u32_at(&file, 8);
    let data_len = u64_at(&file, 12);
    let index = u64_at(&file, 20);
    let path_len = u32_at(&file, 28) as usize;
    let version_len = u32_at(&file, 32) as usize;
    let data_start = FIXED_HEADER + path_len + version_len;
    if file.len() < data_start {
        return Err(CorruptBlock::BadHeader);
    }
    let path = &file[FIXED_HEADER..FIXED_HEADER + path_len];
    let version = &file[FIXED_HEADER + path_len..data_start];
    if path != expected.path.as_bytes() || version != expected.version.as_bytes() || index != expected.index {
        return Err(CorruptBlock::OtherBlock {
            path: String::from_utf8_lossy(path).into_owned(),
            version: String::from_utf8_lossy(version).into_owned(),
            index,
        });
    }
    let actual = (file.len() - data_start) as u64;
    if actual != data_len {
        return Err(CorruptBlock::BadLength {
            expected: data_len,
            actual,
        });
    }
    let data = file.slice(data_start..);
    let computed = crc32c::crc32c(&data);
    if computed != stored_crc {
        return Err(CorruptBlock::BadChecksum {
            stored: stored_crc,
            computed,
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> BlockKey {
        BlockKey {
            path: "train/a.bin".into(),
            version: "etag:1".into(),
            index: 3,
        }
    }

    fn file(data: &[u8]) -> Vec<u8> {
        let mut f = encode_header(&key(), data);
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn round_trips() {
        let data = Bytes::from(file(b"some block bytes"));
        assert_eq!(&decode(data, &key()).unwrap()[..], b"some block bytes");
    }

    #[test]
    fn a_flipped_data_bit_is_caught() {
        let mut f = file(b"some block bytes");
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(matches!(
            decode(Bytes::from(f), &key()),
            Err(CorruptBlock::BadChecksum { .. })
        ));
    }

    #[test]
    fn truncation_and_wrong_blocks_are_caught() {
        let f = file(b"some block bytes");
        let short = Bytes::copy_from_slice(&f[..f.len() - 2]);
        assert!(matches!(decode(short, &key()), Err(CorruptBlock::BadLength { .. })));
        let other = BlockKey { index: 4, ..key() };
        assert!(matches!(
            decode(Bytes::from(f), &other),
            Err(CorruptBlock::OtherBlock { .. })
        ));
        assert_eq!(
            decode(Bytes::from_static(b"junk"), &key()),
            Err(CorruptBlock::BadHeader)
        );
    }
}
