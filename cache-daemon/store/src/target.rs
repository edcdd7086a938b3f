//! The target store of a checkpoint volume, through opendal: parallel multipart uploads from
//! local files, deletes, listings, committed checkpoints (directories holding a marker), and
//! parallel downloads into the write-back area.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use opendal::{EntryMode, Operator};

use crate::source::{SourceConfigError, SourceStore, SourceTuning};

use crate::StoreError;

/// A file or directory the store has under some directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEntry {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// A committed checkpoint: a directory whose marker object exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub dir: String,
    pub modified: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("local file {path:?}: {source}")]
    Local { path: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An opendal error of the target store, named so.
fn target_error(op: &'static str, path: &str, err: opendal::Error) -> StoreError {
    StoreError::from_opendal(op, path, err).in_target()
}

/// A multipart upload fed in order as its bytes become available: parts go out as they fill,
/// and the object appears only at [`StreamingUpload::close`] (an abort, or a dropped upload,
/// leaves nothing visible).
pub struct StreamingUpload {
    writer: opendal::Writer,
    key: String,
    written: u64,
}

impl StreamingUpload {
    /// Appends `data` (parts are sent once full, several at once).
    pub async fn write(&mut self, data: Bytes) -> Result<(), StoreError> {
        let len = data.len() as u64;
        self.writer
            .write(data)
            .await
            .map_err(|e| target_error("upload", &self.key, e))?;
        self.written += len;
        Ok(())
    }

    /// Bytes handed over so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Sends the last part and completes the upload: the object is visible now.
    pub async fn close(mut self) -> Result<u64, StoreError> {
        self.writer
            .close()
            .await
            .map_err(|e| target_error("upload", &self.key, e))?;
        Ok(self.written)
    }

    /// Gives the upload up (best effort: the store drops its parts).
    pub async fn abort(mut self) {
        let _ = self.writer.abort().await;
    }
}

/// Clones share the store, credentials rotation included (see [`SourceStore::rotate`]).
#[derive(Clone)]
pub struct TargetStore {
    store: SourceStore,
}

impl TargetStore {
    pub fn open(
        uri: &str,
        options: &BTreeMap<String, String>,
        tuning: &SourceTuning,
    ) -> Result<Self, SourceConfigError> {
        let store = SourceStore::open(uri, options, tuning)?;
        Ok(TargetStore { store })
    }

    /// The operator requests go through now.
    fn operator(&self) -> Operator {
        self.store.operator()
    }

    /// Uses `options` (rotated credentials) from the next request on; see
    /// [`SourceStore::rotate`].
    pub fn rotate(&self, options: &BTreeMap<String, String>) -> Result<(), SourceConfigError> {
        self.store.rotate(options)
    }

    pub fn uri(&self) -> &str {
        self.store.uri()
    }

    /// Writes and deletes a small object, so a target that is read-only, missing or
    /// unreachable is reported when mounting rather than after a checkpoint was written.
    pub async fn probe_writable(&self) -> Result<(), StoreError> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let key = format!(".granary-write-probe-{}-{nanos}", std::process::id());
        self.operator()
            .write(&key, Bytes::from_static(b"granary write probe"))
            .await
            .map_err(|e| target_error("write", &key, e))?;
        self.operator()
            .delete(&key)
            .await
            .map_err(|e| target_error("delete", &key, e))
    }

    /// Uploads the local file at `local` as `key` with `concurrency` parts of `part_size` in
    /// flight; the object appears only when complete (multipart, or one PUT for small files).
    /// Returns the bytes uploaded.
    pub async fn upload(
        &self,
        key: &str,
        local: &Path,
        part_size: u64,
        concurrency: usize,
    ) -> Result<u64, TransferError> {
        let local_err = |source| TransferError::Local {
            path: key.to_string(),
            source,
        };
        let file = Arc::new(std::fs::File::open(local).map_err(local_err)?);
        let size = file.metadata().map_err(local_err)?.len();
        let store_err = |e| TransferError::Store(target_error("upload", key, e));
        let mut writer = self
            .operator()
            .writer_with(key)
            .chunk(part_size as usize)
            .concurrent(concurrency.max(1))
            .await
            .map_err(store_err)?;
        let mut offset = 0u64;
        let result: Result<(), TransferError> = async {
            while offset < size {
                let len = part_size.min(size - offset) as usize;
                let file = Arc::clone(&file);
                let at = offset;
                let chunk = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, at).map(|()| buf)
                })
                .await
                .map_err(|e| local_err(std::io::Error::other(e)))?
                .map_err(local_err)?;
                writer.write(chunk).await.map_err(store_err)?;
                offset += len as u64;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // Leaves no incomplete multipart upload behind (best effort).
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.close().await.map_err(store_err)?;
        Ok(size)
    }

    /// Starts a multipart upload of `key` fed part by part while its file is still written
    /// (see [`StreamingUpload`]); nothing is visible until it is closed.
    pub async fn start_streaming(
        &self,
        key: &str,
        part_size: u64,
        concurrency: usize,
    ) -> Result<StreamingUpload, StoreError> {
        let writer = self
            .operator()
            .writer_with(key)
            .chunk(part_size as usize)
            .concurrent(concurrency.max(1))
            .await
            .map_err(|e| target_error("upload", key, e))?;
        Ok(StreamingUpload {
            writer,
            key: key.to_string(),
            written: 0,
        })
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.operator()
            .delete(key)
            .await
            .map_err(|e| target_error("delete", key, e))
    }

    /// Deletes every object under `dir`, in batches where the store has a batch delete
    /// (S3's DeleteObjects: up to 1,000 keys a request).
    pub async fn delete_dir(&self, dir: &str) -> Result<(), StoreError> {
        let keys = self.keys_under(dir).await?;
        if keys.is_empty() {
            return Ok(());
        }
        self.operator()
            .delete_iter(keys)
            .await
            .map_err(|e| target_error("delete", dir, e))
    }

    /// Every object key under `dir`, at any depth.
    pub async fn keys_under(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let keys: Vec<String> = self
            .operator()
            .lister_with(&prefix)
            .recursive(true)
            .await
            .map_err(|e| target_error("list", &prefix, e))?
            .map_ok(|entry| entry.path().to_string())
            .try_collect()
            .await
            .map_err(|e| target_error("list", &prefix, e))?;
        Ok(keys
            .into_iter()
            .map(|k| k.trim_start_matches('/').to_string())
            .filter(|k| !k.ends_with('/'))
            .collect())
    }

    /// The entries directly under `dir` ("" is the root).
    pub async fn list_dir(&self, dir: &str) -> Result<Vec<StoreEntry>, StoreError> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let list_path = if prefix.is_empty() { "/" } else { prefix.as_str() };
        let mut lister = self
            .operator()
            .lister_with(list_path)
            .await
            .map_err(|e| target_error("list", &prefix, e))?;
        let mut out = Vec::new();
        while let Some(entry) = lister.next().await {
            let entry = entry.map_err(|e| target_error("list", &prefix, e))?;
            let path = entry.path().trim_start_matches('/');
            let Some(name) = path.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let name = name.trim_end_matches('/');
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let md = entry.metadata();
            out.push(StoreEntry {
                name: name.to_string(),
                is_dir: md.mode() == EntryMode::DIR,
                size: md.content_length(),
                modified: md.last_modified().map(SystemTime::from),
            });
        }
        Ok(out)
    }

    /// The committed checkpoints: directories at the top level holding a `marker` object.
    /// One listing of the top level (with a delimiter, so shards are never listed) and a
    /// stat of each directory's marker, whatever the checkpoints hold.
    pub async fn committed(&self, marker: &str) -> Result<Vec<Committed>, StoreError> {
        let dirs: Vec<String> = self
            .list_dir("")
            .await?
            .into_iter()
            .filter(|e| e.is_dir)
            .map(|e| e.name)
            .collect();
        let op = self.operator();
        let stats = futures::stream::iter(dirs)
            .map(|dir| {
                let op = op.clone();
                async move {
                    let key = format!("{dir}/{marker}");
                    match op.stat(&key).await {
                        Ok(md) => Ok(Some(Committed {
                            dir,
                            modified: md.last_modified().map(SystemTime::from),
                        })),
                        Err(e) if e.kind() == opendal::ErrorKind::NotFound => Ok(None),
                        Err(e) => Err(target_error("stat", &key, e)),
                    }
                }
            })
            .buffer_unordered(16);
        stats.try_filter_map(|c| async move { Ok(c) }).try_collect().await
    }

    /// Size of `key`, or NotFound.
    pub async fn size_of(&self, key: &str) -> Result<u64, StoreError> {
        let md = self
            .operator()
            .stat(key)
            .await
            .map_err(|e| target_error("stat", key, e))?;
        Ok(md.content_length())
    }

    /// Copies `key` (of `size` bytes) into the local file `dest`, `concurrency` ranges of
    /// `part_size` at a time.
    pub async fn download(
        &self,
        key: &str,
        dest: &Path,
        size: u64,
        part_size: u64,
        concurrency: usize,
    ) -> Result<(), TransferError> {
        let local_err = |source| TransferError::Local {
            path: dest.display().to_string(),
            source,
        };
        let file = Arc::new(std::fs::File::create(dest).map_err(local_err)?);
        file.set_len(size).map_err(local_err)?;
        let ranges: Vec<(u64, u64)> = (0..size.div_ceil(part_size.max(1)))
            .map(|i| (i * part_size, ((i + 1) * part_size).min(size)))
            .collect();
        let op = self.operator();
        let mut reads = futures::stream::iter(ranges)
            .map(|(start, end)| {
                let op = op.clone();
                async move {
                    let data = op
                        .read_with(key)
                        .range(start..end)
                        .await
                        .map_err(|e| target_error("read", key, e))?;
                    Ok::<_, StoreError>((start, data.to_bytes()))
                }
            })
            .buffer_unordered(concurrency.max(1));
        while let Some(read) = reads.next().await {
            let (start, data) = read?;
            let file = Arc::clone(&file);
            tokio::task::spawn_blocking(move || file.write_all_at(&data, start))
                .await
                .map_err(|e| local_err(std::io::Error::other(e)))?
                .map_err(local_err)?;
        }
        Ok(())
    }
}
