//! Uploads that start while a file is still being written. A file created (or truncated to
//! nothing) and then written strictly in order is followed: each time a whole part is
//! written, it goes to a multipart upload, so at close only the last part remains. Anything
//! else — a write that is not an append, a truncate, a rename, an unlink, a reopen — drops
//! the stream (its parts are aborted) and the file is uploaded after close as always. The
//! object becomes visible only when the uploader finishes the stream for the closed version
//! (`finish`), so nothing torn is ever seen, and the marker's order is kept.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use granary_store::target::{StreamingUpload, TargetStore, TransferError};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use super::tracker::is_under;

/// Ranges beyond a gap a stream keeps before it decides the writer is not sequential.
const MAX_RANGES: usize = 256;

enum Msg {
    /// The bytes below this offset are written and final: send them.
    Upto(u64),
    /// The version is closed at `size`: send the rest and complete the upload.
    Finish {
        size: u64,
        done: oneshot::Sender<Result<u64, TransferError>>,
    },
}

struct Stream {
    file: Arc<File>,
    /// Bytes written without a gap from offset 0.
    written: u64,
    /// Ranges written beyond a gap (start → end), joined to `written` when the gap fills.
    ahead: BTreeMap<u64, u64>,
    /// Bytes the task was told to send.
    handed: u64,
    /// The task's queue, once the first part is full (small files never start one).
    tx: Option<mpsc::UnboundedSender<Msg>>,
}

pub struct Streams {
    target: TargetStore,
    part_size: u64,
    concurrency: usize,
    runtime: Handle,
    active: Mutex<HashMap<String, Stream>>,
}

impl Streams {
    pub fn new(target: TargetStore, part_size: u64, concurrency: usize, runtime: Handle) -> Self {
        Streams {
            target,
            part_size: part_size.max(1),
            concurrency,
            runtime,
            active: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stream>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `path` is a new, empty version written through `file`: follow its appends.
    pub fn begin(&self, path: &str, file: Arc<File>) {
        self.lock().insert(
            path.to_string(),
            Stream {
                file,
                written: 0,
                ahead: BTreeMap::new(),
                handed: 0,
                tx: None,
            },
        );
    }

    /// `len` bytes were written at `offset` of `path`. FUSE threads hand writes over out of
    /// order, so the written ranges are merged; what matters is that nothing already sent is
    /// written again.
    pub fn wrote(&self, path: &str, offset: u64, len: u64) {
        let mut active = self.lock();
        let Some(stream) = active.get_mut(path) else { return };
        if offset < stream.handed || stream.ahead.len() >= MAX_RANGES {
            // A rewrite of bytes already sent, or not a sequential writer: give it up.
            active.remove(path);
            return;
        }
        let end = offset + len;
        if offset <= stream.written {
            stream.written = stream.written.max(end);
        } else {
            let e = stream.ahead.entry(offset).or_insert(end);
            *e = (*e).max(end);
        }
        // Ranges now joined to the written prefix.
        while let Some((&start, &stop)) = stream.ahead.first_key_value() {
            if start > stream.written {
                break;
            }
            stream.ahead.remove(&start);
            stream.written = stream.written.max(stop);
        }
        let full = stream.written / self.part_size * self.part_size;
        if full <= stream.handed {
            return;
        }
        stream.handed = full;
        let tx = stream.tx.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.runtime.spawn(run(
                self.target.clone(),
                path.to_string(),
                self.part_size,
                self.concurrency,
                Arc::clone(&stream.file),
                rx,
            ));
            tx
        });
        let _ = tx.send(Msg::Upto(full));
    }

    /// Stops following `path` (and anything under it): it is truncated, renamed, removed or
    /// reopened.
    pub fn drop_under(&self, path: &str) {
        self.lock().retain(|p, _| !is_under(p, path));
    }

    /// Completes the stream of `path` closed at `size`, if one followed every byte of it;
    /// `None` means the file must be uploaded whole.
    pub async fn finish(&self, path: &str, size: u64) -> Option<Result<u64, TransferError>> {
        let stream = self.lock().remove(path)?;
        if stream.written != size || !stream.ahead.is_empty() {
            return None;
        }
        let tx = stream.tx?;
        let (done, result) = oneshot::channel();
        tx.send(Msg::Finish { size, done }).ok()?;
        result.await.ok()
    }
}

/// Sends `[from, to)` of `file` to `upload` in parts (the last one may be short).
async fn send(
    upload: &mut StreamingUpload,
    file: &Arc<File>,
    from: u64,
    to: u64,
    part_size: u64,
    key: &str,
) -> Result<(), TransferError> {
    let local_err = |source| TransferError::Local {
        path: key.to_string(),
        source,
    };
    let mut at = from;
    while at < to {
        let len = part_size.min(to - at) as usize;
        let file = Arc::clone(file);
        let offset = at;
        let chunk = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| local_err(std::io::Error::other(e)))?
        .map_err(local_err)?;
        upload.write(Bytes::from(chunk)).await?;
        at += len as u64;
    }
    Ok(())
}

async fn run(
    target: TargetStore,
    key: String,
    part_size: u64,
    concurrency: usize,
    file: Arc<File>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let mut upload = match target.start_streaming(&key, part_size, concurrency).await {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::debug!(path = key, error = %e, "cannot start a streaming upload; the file is uploaded after close");
            None
        }
    };
    let mut failed: Option<TransferError> = None;
    let mut sent = 0u64;
    while let Some(msg) = rx.recv().await {
        let (upto, done) = match msg {
            Msg::Upto(n) => (n, None),
            Msg::Finish { size, done } => (size, Some(done)),
        };
        if let (Some(u), None) = (upload.as_mut(), &failed) {
            match send(u, &file, sent, upto, part_size, &key).await {
                Ok(()) => sent = upto,
                Err(e) => failed = Some(e),
            }
        }
        if let Some(done) = done {
            let result = match (upload.take(), failed.take()) {
                (Some(u), None) => u.close().await.map_err(TransferError::from),
                (Some(u), Some(e)) => {
                    u.abort().await;
                    Err(e)
                }
                (None, Some(e)) => Err(e),
                // The upload never started: the uploader uploads the file whole.
                (None, None) => Err(TransferError::Local {
                    path: key.clone(),
                    source: std::io::Error::other("the streaming upload did not start"),
                }),
            };
            let _ = done.send(result);
            return;
        }
    }
    // Given up (not an append, a rename, …): the parts go.
    if let Some(u) = upload {
        u.abort().await;
    }
}
