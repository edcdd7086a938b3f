//! The disk tier: one file per block under `<cache-dir>/blocks/`, bounded by a byte budget
//! that is never exceeded (blocks are accounted in whole 4 KiB allocation units, and room is
//! made before a block is written). At start the tier indexes what is already on disk, so a
//! restarted worker is warm.
//!
//! Concurrency: reservations, evictions and publications (rename into place) take the
//! admission lock, so the files on disk never outgrow the budget; reads and writes of block
//! bytes run outside every lock.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

use super::block_file::{self, CorruptBlock};
use super::bounded_index::{Admission, BoundedIndex, EvictionPolicy};
use crate::block::{BlockKey, BlockName};

/// Files are accounted in allocation units, so the budget holds for `du` as well.
const ALLOCATION_UNIT: u64 = 4096;

fn on_disk_size(len: u64) -> u64 {
    len.div_ceil(ALLOCATION_UNIT) * ALLOCATION_UNIT
}

#[derive(Debug, Clone, Copy)]
struct DiskSlot {
    /// The file is in place; until then the bytes are reserved but not readable.
    ready: bool,
}

pub enum DiskRead {
    Hit(Bytes),
    Miss,
    /// The file was there but did not hold the block intact; it has been removed.
    Corrupt(CorruptBlock),
    /// The disk failed; the block has been dropped from the index.
    Failed(io::Error),
}

pub enum DiskWrite {
    Stored {
        evicted: usize,
    },
    /// The policy (pin, full) or the block's size kept it out.
    Rejected,
    Failed(io::Error),
}

/// What was found on disk at start.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskOpenReport {
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks dropped because they did not fit a smaller budget.
    pub dropped: u64,
}

pub struct DiskTier {
    blocks_dir: PathBuf,
    tmp_dir: PathBuf,
    index: Mutex<BoundedIndex<BlockName, DiskSlot>>,
    admission: tokio::sync::Mutex<()>,
    tmp_counter: AtomicU64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

impl DiskTier {
    /// Opens (creating) the tier in `dir` and indexes the blocks already there. Blocking.
    pub fn open(dir: &Path, capacity: u64, policy: EvictionPolicy) -> io::Result<(Self, DiskOpenReport)> {
        let blocks_dir = dir.join("blocks");
        let tmp_dir = dir.join("tmp");
        std::fs::create_dir_all(&blocks_dir)?;
        match std::fs::remove_dir_all(&tmp_dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&tmp_dir)?;
        // Fail at start, not on the first miss, when the directory is not writable.
        let probe = tmp_dir.join("write-probe");
        std::fs::write(&probe, b"granary")?;
        std::fs::remove_file(&probe)?;

        let mut found: Vec<(SystemTime, BlockName, u64, PathBuf)> = Vec::new();
        for shard in std::fs::read_dir(&blocks_dir)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(shard.path())? {
                let entry = entry?;
                let file_name = entry.file_name();
                let Some(name) = file_name.to_str().and_then(BlockName::parse_file_name) else {
                    tracing::warn!(path = %entry.path().display(), "ignoring a file that is not a cached block");
                    continue;
                };
                let md = entry.metadata()?;
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, name, on_disk_size(md.len()), entry.path()));
            }
        }
        // Oldest first, so the most recently written blocks are the most recently used.
        found.sort_by_key(|(mtime, ..)| *mtime);
        let mut index = BoundedIndex::new(capacity, policy);
        let mut report = DiskOpenReport::default();
        for (_, name, size, path) in found {
            match index.insert(name, DiskSlot { ready: true }, size) {
                Admission::Admitted { evicted } => {
                    for (victim, _, _) in evicted {
                        std::fs::remove_file(block_path(&blocks_dir, &victim))?;
                        report.dropped += 1;
                    }
                }
                Admission::Rejected => {
                    std::fs::remove_file(&path)?;
                    report.dropped += 1;
                }
            }
        }
        report.blocks = index.len() as u64;
        report.bytes = index.used();
        Ok((
            DiskTier {
                blocks_dir,
                tmp_dir,
                index: Mutex::new(index),
                admission: tokio::sync::Mutex::new(()),
                tmp_counter: AtomicU64::new(0),
            },
            report,
        ))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BoundedIndex<BlockName, DiskSlot>> {
        self.index.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn block_path(&self, name: &BlockName) -> PathBuf {
        block_path(&self.blocks_dir, name)
    }

    /// Reads and verifies a block.
    pub async fn read(&self, name: BlockName, key: &BlockKey) -> DiskRead {
        match self.lock().get(&name) {
            Some(slot) if slot.ready => {}
            _ => return DiskRead::Miss,
        }
        let path = self.block_path(&name);
        match blocking(move || std::fs::read(path)).await {
            Ok(file) => match block_file::decode(Bytes::from(file), key) {
                Ok(data) => DiskRead::Hit(data),
                Err(corrupt) => {
                    self.discard(name).await;
                    DiskRead::Corrupt(corrupt)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.discard(name).await;
                DiskRead::Miss
            }
            Err(e) => {
                self.discard(name).await;
                DiskRead::Failed(e)
            }
        }
    }

    /// Drops a block from the index and the disk.
    pub async fn discard(&self, name: BlockName) {
        let _admission = self.admission.lock().await;
        let path = self.block_path(&name);
        if let Err(e) = blocking(move || std::fs::remove_file(path)).await {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(block = %name, error = %e, "could not remove a block file");
            }
        }
        self.lock().remove(&name);
    }

    /// Stores a block: reserves room (evicting by the policy), writes a temporary file, and
    /// renames it into place.
    pub async fn write(&self, name: BlockName, key: &BlockKey, data: Bytes) -> DiskWrite {
        let header = block_file::encode_header(key, &data);
        let size = on_disk_size((header.len() + data.len()) as u64);
        let evicted = {
            let _admission = self.admission.lock().await;
            if self.lock().contains(&name) {
                return DiskWrite::Stored { evicted: 0 };
            }
            // A block still being written is never a victim: its file would outlive its bytes
            // in the budget.
            let admission = self
                .lock()
                .insert_evicting(name, DiskSlot { ready: false }, size, |slot| slot.ready);
            let victims = match admission {
                Admission::Rejected => return DiskWrite::Rejected,
                Admission::Admitted { evicted } => evicted,
            };
            let paths: Vec<PathBuf> = victims.iter().map(|(n, _, _)| self.block_path(n)).collect();
            let removed = blocking(move || {
                for path in paths {
                    match std::fs::remove_file(&path) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            })
            .await;
            if let Err(e) = removed {
                self.lock().remove(&name);
                return DiskWrite::Failed(e);
            }
            victims.len()
        };

        let tmp = self
            .tmp_dir
            .join(format!("{name}.{}", self.tmp_counter.fetch_add(1, Ordering::Relaxed)));
        let tmp_for_write = tmp.clone();
        let written = blocking(move || {
            let mut file = std::fs::File::create(&tmp_for_write)?;
            file.write_all(&header)?;
            file.write_all(&data)?;
            Ok(())
        })
        .await;
        let final_path = self.block_path(&name);
        let _admission = self.admission.lock().await;
        let still_reserved = self.lock().contains(&name);
        let published = match written {
            Ok(()) if still_reserved => {
                blocking(move || {
                    if let Some(parent) = final_path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::rename(&tmp, &final_path)
                })
                .await
            }
            Ok(()) => {
                // Evicted while being written (a tiny cache under heavy load): drop it.
                let _ = blocking(move || std::fs::remove_file(tmp)).await;
                return DiskWrite::Rejected;
            }
            Err(e) => {
                let _ = blocking(move || std::fs::remove_file(tmp)).await;
                Err(e)
            }
        };
        match published {
            Ok(()) => {
                if let Some(slot) = self.lock().get(&name) {
                    slot.ready = true;
                }
                DiskWrite::Stored { evicted }
            }
            Err(e) => {
                self.lock().remove(&name);
                DiskWrite::Failed(e)
            }
        }
    }

    /// (used bytes, capacity, blocks)
    pub fn usage(&self) -> (u64, u64, u64) {
        let index = self.lock();
        (index.used(), index.capacity(), index.len() as u64)
    }
}

/// Reads block `key` straight from the cache directory of a worker on this node, without the
/// worker: the short circuit. `None` when the block is not there or its file does not verify
/// (it may be mid-write or evicted; the caller asks the worker instead).
pub fn read_block_file_in(cache_dir: &Path, key: &BlockKey) -> Option<Bytes> {
    read_block_file_into(cache_dir, key, Vec::new())
}

/// [`read_block_file_in`], reading the file into `buffer` (a reused one saves the page
/// faults of a fresh allocation); the block is a view of it.
pub fn read_block_file_into<B>(cache_dir: &Path, key: &BlockKey, mut buffer: B) -> Option<Bytes>
where
    B: AsRef<[u8]> + AsMut<Vec<u8>> + Send + 'static,
{
    use std::io::Read;
    let path = block_path(&cache_dir.join("blocks"), &key.name());
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len() as usize;
    let bytes = buffer.as_mut();
    bytes.clear();
    bytes.reserve(len);
    file.read_to_end(bytes).ok()?;
    block_file::decode(Bytes::from_owner(buffer), key).ok()
}

fn block_path(blocks_dir: &Path, name: &BlockName) -> PathBuf {
    let file_name = name.file_name();
    blocks_dir.join(&file_name[..2]).join(file_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> BlockKey {
        BlockKey {
            path: "f".into(),
            version: "v".into(),
            index: i,
        }
    }

    #[tokio::test]
    async fn blocks_survive_reopening_and_corruption_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let (tier, _) = DiskTier::open(dir.path(), 1 << 20, EvictionPolicy::Lru).unwrap();
        let data = Bytes::from(vec![7u8; 10_000]);
        assert!(matches!(
            tier.write(key(0).name(), &key(0), data.clone()).await,
            DiskWrite::Stored { .. }
        ));
        drop(tier);

        let (tier, report) = DiskTier::open(dir.path(), 1 << 20, EvictionPolicy::Lru).unwrap();
        assert_eq!(report.blocks, 1);
        assert_eq!(report.bytes, 12288);
        match tier.read(key(0).name(), &key(0)).await {
            DiskRead::Hit(got) => assert_eq!(got, data),
            _ => panic!("expected a hit after reopening"),
        }

        let path = tier.block_path(&key(0).name());
        let mut raw = std::fs::read(&path).unwrap();
        raw[200] ^= 0xff;
        std::fs::write(&path, raw).unwrap();
        assert!(matches!(tier.read(key(0).name(), &key(0)).await, DiskRead::Corrupt(_)));
        assert!(!path.exists(), "a corrupt block file is removed");
        assert!(matches!(tier.read(key(0).name(), &key(0)).await, DiskRead::Miss));
    }

    #[tokio::test]
    async fn a_smaller_budget_at_start_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (tier, _) = DiskTier::open(dir.path(), 1 << 20, EvictionPolicy::Lru).unwrap();
        for i in 0..4 {
            tier.write(key(i).name(), &key(i), Bytes::from(vec![1u8; 4000])).await;
        }
        drop(tier);
        let (tier, report) = DiskTier::open(dir.path(), 2 * 4096, EvictionPolicy::Lru).unwrap();
        assert_eq!(report.blocks, 2);
        assert_eq!(report.dropped, 2);
        assert_eq!(tier.usage().0, 2 * 4096);
    }
}
