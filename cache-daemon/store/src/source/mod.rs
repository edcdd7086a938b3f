//! The source store: where the data really lives (S3, a NAS path, GCS, …), read through
//! opendal. Everything above this module sees paths relative to the dataset root, file
//! metadata with a version, and byte ranges.

mod uri;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{Buffer, HttpBody, HttpTransport, HttpTransporter, Metadata, OperationContext, Operator};
use prometheus_client::metrics::counter::Counter;

pub use uri::{build_operator, SourceConfigError, SourceUri, VersionScheme};

use crate::{ErrorKind, StoreError};

/// Metadata of one file or directory of the source, relative to its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// Relative path without a leading slash; "" is the root.
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
    /// "etag:…" or "mtime:<size>-<nanos>"; empty for directories.
    pub version: String,
    pub mtime: Option<SystemTime>,
}

impl FileMeta {
    pub fn mtime_unix_nanos(&self) -> i64 {
        self.mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0)
    }
}

/// How hard to try before calling the store unavailable.
#[derive(Debug, Clone)]
pub struct SourceTuning {
    pub retries: usize,
    pub timeout: Duration,
}

impl Default for SourceTuning {
    fn default() -> Self {
        SourceTuning {
            retries: 3,
            timeout: Duration::from_secs(60),
        }
    }
}

/// A configured source store. Clones share one operator, which [`SourceStore::rotate`]
/// replaces when the store's credentials change: every clone uses the new one from its next
/// request, and requests already running finish with the old.
#[derive(Clone)]
pub struct SourceStore {
    op: Arc<RwLock<Operator>>,
    uri: String,
    versions: VersionScheme,
    tuning: SourceTuning,
    /// Listing requests sent to the store, pages included.
    list_requests: Counter,
    /// Whether the store is reached over HTTP (its list requests are counted as sent).
    http: bool,
    /// The directory of a local (`fs://`) store, read directly so a read and its version
    /// check use one descriptor.
    local_root: Option<PathBuf>,
}

/// The HTTP transport of the store's requests, counting the listing requests (each page of
/// a listing is one) as they go out.
struct CountingTransport {
    inner: HttpTransporter,
    list_requests: Counter,
}

/// Whether a request lists: S3 and OSS (`list-type=2`), Azure Blob (`comp=list`), WebHDFS
/// (`op=LISTSTATUS`), GCS (`/o?…prefix=`).
fn is_list_request<B>(req: &http::Request<B>) -> bool {
    if req.method() != http::Method::GET {
        return false;
    }
    let query = req.uri().query().unwrap_or("");
    let has = |param: &str| query.split('&').any(|p| p.starts_with(param));
    has("list-type=")
        || has("comp=list")
        || has("op=LISTSTATUS")
        || (req.uri().path().ends_with("/o") && has("prefix="))
}

impl HttpTransport for CountingTransport {
    async fn fetch(&self, req: http::Request<Buffer>) -> opendal::Result<http::Response<HttpBody>> {
        if is_list_request(&req) {
            self.list_requests.inc();
        }
        self.inner.fetch(req).await
    }
}

/// The store's operator with the retry and timeout layers every request goes through, over
/// the counting transport.
fn layered(op: Operator, tuning: &SourceTuning, list_requests: &Counter) -> Operator {
    let transport = HttpTransporter::new(CountingTransport {
        inner: HttpTransporter::default(),
        list_requests: list_requests.clone(),
    });
    op.with_context(OperationContext::new().with_http_transport(transport))
        .layer(
            TimeoutLayer::new()
                .with_timeout(tuning.timeout)
                .with_io_timeout(tuning.timeout),
        )
        .layer(
            RetryLayer::new()
                .with_max_times(tuning.retries)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter(),
        )
}

impl std::fmt::Debug for SourceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceStore").field("uri", &self.uri).finish()
    }
}

/// Normalises a client path ("/train//a.jpg", "train/a.jpg/") to the store's relative form
/// ("train/a.jpg"); "" is the root.
pub fn normalize_path(path: &str) -> Result<String, StoreError> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(StoreError::invalid_path(path, "`..` is not allowed")),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

impl SourceStore {
    /// Builds the store from its URI and options; every configuration mistake is reported here.
    pub fn open(
        uri: &str,
        options: &BTreeMap<String, String>,
        tuning: &SourceTuning,
    ) -> Result<Self, SourceConfigError> {
        // Without opendal's auto-registration, its HTTP transport must be installed once.
        opendal::install_default();
        let (op, versions) = build_operator(uri, options)?;
        let list_requests = Counter::default();
        let local_root = match SourceUri::parse(uri)? {
            parsed if matches!(parsed.scheme.as_str(), "fs" | "file") => Some(PathBuf::from(parsed.root)),
            _ => None,
        };
        Ok(SourceStore {
            op: Arc::new(RwLock::new(layered(op, tuning, &list_requests))),
            uri: uri.to_string(),
            versions,
            tuning: tuning.clone(),
            list_requests,
            http: local_root.is_none(),
            local_root,
        })
    }

    /// The count of listing requests sent to the store (each page of a listing is one; a
    /// local directory's listing is one), shared with every clone: register it as a metric.
    pub fn list_requests(&self) -> Counter {
        self.list_requests.clone()
    }

    /// Uses `options` (rotated credentials, typically) from the next request on, in this
    /// store and all its clones. A configuration mistake in them leaves the store as it was.
    pub fn rotate(&self, options: &BTreeMap<String, String>) -> Result<(), SourceConfigError> {
        let (op, _) = build_operator(&self.uri, options)?;
        *self.op.write().unwrap_or_else(|p| p.into_inner()) = layered(op, &self.tuning, &self.list_requests);
        Ok(())
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The operator requests go through now (a cheap handle; rotation replaces it).
    pub fn operator(&self) -> Operator {
        self.op.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Converts store metadata into ours; `None` when the store did not give enough to derive
    /// the version this store's scheme needs (e.g. a list entry without an ETag).
    fn meta_from(&self, path: &str, md: &Metadata) -> Option<FileMeta> {
        let path = path.trim_end_matches('/').to_string();
        let mtime = md.last_modified().map(SystemTime::from);
        if md.is_dir() {
            return Some(FileMeta {
                path,
                is_dir: true,
                size: 0,
                version: String::new(),
                mtime,
            });
        }
        let size = md.content_length();
        let version = match self.versions {
            VersionScheme::ETag => format!("etag:{}", md.etag()?.trim_matches('"')),
            VersionScheme::SizeAndMtime => size_mtime_version(size, mtime?)?,
        };
        Some(FileMeta {
            path,
            is_dir: false,
            size,
            version,
            mtime,
        })
    }

    /// Metadata of a file or directory. Object stores have no real directories: a path that is
    /// no object but a prefix of some is a directory.
    pub async fn stat(&self, path: &str) -> Result<FileMeta, StoreError> {
        let path = normalize_path(path)?;
        if path.is_empty() {
            return Ok(FileMeta {
                path,
                is_dir: true,
                size: 0,
                version: String::new(),
                mtime: None,
            });
        }
        let file_err = match self.operator().stat(&path).await {
            Ok(md) if md.is_file() => {
                return self.meta_from(&path, &md).ok_or_else(|| {
                    StoreError::failed(
                        "stat",
                        path.clone(),
                        "the store gave no ETag or modification time, so the file cannot be versioned",
                    )
                })
            }
            Ok(md) => return self.meta_from(&path, &md).ok_or_else(|| StoreError::not_found(path)),
            Err(e) => StoreError::from_opendal("stat", &path, e),
        };
        // Some S3 servers answer a HEAD of a "directory" key with an error rather than 404.
        if matches!(file_err.kind(), ErrorKind::Unavailable | ErrorKind::PermissionDenied) {
            return Err(file_err);
        }
        let dir = format!("{path}/");
        let mut lister = self
            .operator()
            .lister_with(&dir)
            .limit(1)
            .await
            .map_err(|e| StoreError::from_opendal("list", &dir, e))?;
        match lister.next().await {
            Some(Ok(_)) => Ok(FileMeta {
                path,
                is_dir: true,
                size: 0,
                version: String::new(),
                mtime: None,
            }),
            Some(Err(e)) => Err(StoreError::from_opendal("list", &dir, e)),
            None => Err(file_err),
        }
    }

    /// Entries of a directory (recursively when asked), as a stream: a directory of millions of
    /// entries is never held whole. Entries whose version the listing cannot tell are given
    /// as `needs_stat` so the caller can stat them.
    pub async fn list(
        &self,
        path: &str,
        recursive: bool,
    ) -> Result<impl Stream<Item = Result<ListedEntry, StoreError>> + Send + 'static, StoreError> {
        let path = normalize_path(path)?;
        let dir = if path.is_empty() {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        let lister = self
            .operator()
            .lister_with(&dir)
            .recursive(recursive)
            .await
            .map_err(|e| StoreError::from_opendal("list", &dir, e))?;
        if !self.http {
            self.list_requests.inc();
        }
        let store = self.clone();
        Ok(lister.filter_map(move |entry| {
            let store = store.clone();
            let dir = dir.clone();
            async move {
                match entry {
                    Err(e) => Some(Err(StoreError::from_opendal("list", &dir, e))),
                    Ok(entry) => {
                        let entry_path = entry.path().trim_end_matches('/');
                        // The directory itself is listed by some stores.
                        if entry_path == dir.trim_matches('/') || entry_path.is_empty() {
                            return None;
                        }
                        let md = entry.metadata();
                        Some(Ok(match store.meta_from(entry_path, md) {
                            Some(meta) => ListedEntry::Known(meta),
                            None => ListedEntry::NeedsStat(entry_path.to_string()),
                        }))
                    }
                }
            }
        }))
    }

    /// Reads `range` of a file at exactly `version`: an ETag version is checked by the store
    /// (If-Match); a local file's by `fstat` of the descriptor the bytes are read from;
    /// another size+mtime version by a fresh stat before and after the read.
    pub async fn read_range(&self, path: &str, version: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let expected_len = range.end - range.start;
        if let Some(root) = &self.local_root {
            return read_local_range(root, path, version, range).await;
        }
        let data = if let Some(etag) = version.strip_prefix("etag:") {
            self.operator()
                .read_with(path)
                .range(range)
                .if_match(&format!("\"{etag}\""))
                .await
                .map_err(|e| StoreError::from_opendal("read", path, e))?
        } else {
            self.check_version(path, version).await?;
            let data = self
                .operator()
                .read_with(path)
                .range(range)
                .await
                .map_err(|e| StoreError::from_opendal("read", path, e))?;
            self.check_version(path, version).await?;
            data
        };
        if data.len() as u64 != expected_len {
            return Err(StoreError::changed(path));
        }
        Ok(data.to_bytes())
    }

    async fn check_version(&self, path: &str, version: &str) -> Result<(), StoreError> {
        let md = self
            .operator()
            .stat(path)
            .await
            .map_err(|e| StoreError::from_opendal("stat", path, e))?;
        match self.meta_from(path, &md) {
            Some(meta) if meta.version == version => Ok(()),
            _ => Err(StoreError::changed(path)),
        }
    }
}

/// The version of a file of a store without ETags: "mtime:<size>-<nanos>".
fn size_mtime_version(size: u64, mtime: SystemTime) -> Option<String> {
    let nanos = mtime.duration_since(UNIX_EPOCH).ok()?.as_nanos();
    Some(format!("mtime:{size}-{nanos}"))
}

/// The size+mtime version of a local file from its metadata, as [`SourceStore::stat`] names it.
fn local_version(md: &std::fs::Metadata) -> Option<String> {
    size_mtime_version(md.len(), md.modified().ok()?)
}

/// Reads `range` of the local file `path` under `root` at exactly `version`. The version is
/// checked on the descriptor the bytes come from, before and after the read: a file renamed
/// over it is another file (the descriptor keeps the old one), and a write into it moves its
/// mtime. A path checked and then opened could be two files.
async fn read_local_range(root: &Path, path: &str, version: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
    let relative = normalize_path(path)?;
    let full = root.join(&relative);
    let version = version.to_string();
    let read = tokio::task::spawn_blocking(move || -> Result<Bytes, StoreError> {
        use std::os::unix::fs::FileExt;
        let io_error = |op: &'static str, e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::changed(relative.clone()),
            std::io::ErrorKind::PermissionDenied => {
                StoreError::new(ErrorKind::PermissionDenied, op, relative.clone()).with_detail(e.to_string())
            }
            _ => StoreError::failed(op, relative.clone(), e.to_string()),
        };
        let file = std::fs::File::open(&full).map_err(|e| io_error("read", e))?;
        let same_version = |file: &std::fs::File| -> Result<bool, StoreError> {
            let md = file.metadata().map_err(|e| io_error("stat", e))?;
            Ok(local_version(&md).as_deref() == Some(version.as_str()))
        };
        if !same_version(&file)? {
            return Err(StoreError::changed(relative.clone()));
        }
        let mut data = vec![0; (range.end - range.start) as usize];
        file.read_exact_at(&mut data, range.start).map_err(|e| match e.kind() {
            // Shorter than the version's size: it changed under the read.
            std::io::ErrorKind::UnexpectedEof => StoreError::changed(relative.clone()),
            _ => io_error("read", e),
        })?;
        if !same_version(&file)? {
            return Err(StoreError::changed(relative.clone()));
        }
        Ok(Bytes::from(data))
    });
    read.await
        .map_err(|e| StoreError::failed("read", path.to_string(), format!("the read task failed: {e}")))?
}

/// One entry of a listing.
#[derive(Debug, Clone)]
pub enum ListedEntry {
    Known(FileMeta),
    /// The listing did not carry what the version needs; stat this path.
    NeedsStat(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_dotdot_is_refused() {
        assert_eq!(normalize_path("/train//a.jpg").unwrap(), "train/a.jpg");
        assert_eq!(normalize_path("train/./a/").unwrap(), "train/a");
        assert_eq!(normalize_path("/").unwrap(), "");
        assert!(normalize_path("/a/../b").is_err());
    }

    #[tokio::test]
    async fn fs_store_stats_lists_and_reads_with_versions() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("train")).unwrap();
        std::fs::write(dir.path().join("train/a.bin"), b"hello world").unwrap();
        let uri = format!("fs://{}", dir.path().display());
        let store = SourceStore::open(&uri, &BTreeMap::new(), &SourceTuning::default()).unwrap();

        let meta = store.stat("/train/a.bin").await.unwrap();
        assert_eq!(meta.size, 11);
        assert!(meta.version.starts_with("mtime:11-"), "{}", meta.version);
        assert!(store.stat("train").await.unwrap().is_dir);
        assert!(matches!(
            store.stat("train/nope").await.map_err(|e| e.kind()),
            Err(ErrorKind::NotFound)
        ));

        let got = store.read_range("train/a.bin", &meta.version, 6..11).await.unwrap();
        assert_eq!(&got[..], b"world");

        let entries: Vec<_> = store.list("/", true).await.unwrap().collect().await;
        let files: Vec<_> = entries
            .into_iter()
            .filter_map(|e| match e.unwrap() {
                ListedEntry::Known(m) if !m.is_dir => Some(m.path),
                _ => None,
            })
            .collect();
        assert_eq!(files, vec!["train/a.bin".to_string()]);

        // A rewrite changes the version, and a read at the old version is refused.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(dir.path().join("train/a.bin"), b"HELLO WORLD!").unwrap();
        assert!(matches!(
            store
                .read_range("train/a.bin", &meta.version, 0..5)
                .await
                .map_err(|e| e.kind()),
            Err(ErrorKind::Changed)
        ));
        assert_ne!(store.stat("train/a.bin").await.unwrap().version, meta.version);
    }
}
