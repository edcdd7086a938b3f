//! A real S3-protocol server on loopback for tests and benchmarks: s3s + s3s-fs over a local
//! directory, with a log of the requests it served (to count source reads) and switchable
//! faults (a delay on object GETs, failing GETs of chosen keys, refusing everything).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::{S3Auth, SecretKey};
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub const ACCESS_KEY: &str = "granary-test";
pub const SECRET_KEY: &str = "granary-test-secret";
pub const REGION: &str = "us-east-1";

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub query: String,
    pub range: Option<String>,
}

impl RequestRecord {
    /// A GET of an object's bytes (not a listing).
    pub fn is_object_get(&self) -> bool {
        self.method == "GET" && !self.query.contains("list-type") && !self.query.contains("prefix=")
    }
}

/// The one key pair the server accepts, which a test may rotate as a store's
/// administrator rotates credentials.
struct RotatingAuth {
    keys: Arc<Mutex<(String, String)>>,
}

#[async_trait::async_trait]
impl S3Auth for RotatingAuth {
    async fn get_secret_key(&self, access_key: &str) -> s3s::S3Result<SecretKey> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.0 == access_key {
            Ok(SecretKey::from(keys.1.clone()))
        } else {
            Err(s3s::s3_error!(
                InvalidAccessKeyId,
                "The access key is not valid (rotated?)"
            ))
        }
    }
}

#[derive(Default)]
struct Faults {
    get_delay_ms: AtomicU64,
    write_delay_ms: AtomicU64,
    fail_gets_containing: Mutex<Option<String>>,
    fail_list_continuations: AtomicBool,
    refuse_all: AtomicBool,
    print_completions: AtomicBool,
}

pub struct S3TestServer {
    pub addr: SocketAddr,
    pub endpoint: String,
    pub root: PathBuf,
    log: Arc<Mutex<Vec<RequestRecord>>>,
    /// Object writes that completed (a PUT, or the completion of a multipart upload), in
    /// the order the server finished them: when each object became visible.
    completed: Arc<Mutex<Vec<String>>>,
    faults: Arc<Faults>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    keys: Arc<Mutex<(String, String)>>,
}

impl S3TestServer {
    /// Serves the buckets under `root` (each a directory) on `addr` (port 0 for any).
    pub async fn start(root: &Path, addr: SocketAddr) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fs = s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        let keys = Arc::new(Mutex::new((ACCESS_KEY.to_string(), SECRET_KEY.to_string())));
        builder.set_auth(RotatingAuth { keys: keys.clone() });
        let s3 = builder.build();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let log: Arc<Mutex<Vec<RequestRecord>>> = Arc::default();
        let completed: Arc<Mutex<Vec<String>>> = Arc::default();
        let faults: Arc<Faults> = Arc::default();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();

        let accept = {
            let (log, faults, tasks) = (log.clone(), faults.clone(), tasks.clone());
            let completed = completed.clone();
            let root = root.to_path_buf();
            tokio::spawn(async move {
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        continue;
                    };
                    let s3 = s3.clone();
                    let (log, faults, root) = (log.clone(), faults.clone(), root.clone());
                    let completed = completed.clone();
                    let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let record = RequestRecord {
                            method: req.method().to_string(),
                            path: req.uri().path().to_string(),
                            query: req.uri().query().unwrap_or("").to_string(),
                            range: req
                                .headers()
                                .get("range")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string),
                        };
                        let delay = faults.get_delay_ms.load(Ordering::Relaxed);
                        let fail = record.is_object_get()
                            && faults
                                .fail_gets_containing
                                .lock()
                                .unwrap()
                                .as_deref()
                                .is_some_and(|s| record.path.contains(s));
                        let refuse = faults.refuse_all.load(Ordering::Relaxed)
                            || (faults.fail_list_continuations.load(Ordering::Relaxed)
                                && record.query.contains("continuation-token"));
                        let object_get = record.is_object_get();
                        let listing = record.method == "GET" && record.query.contains("list-type");
                        let listed_bucket = record.path.trim_matches('/').to_string();
                        // s3s-fs ignores If-Match on GET; S3 answers 412 when the object's
                        // ETag differs, and readers of a version depend on that.
                        let if_match = req
                            .headers()
                            .get("if-match")
                            .and_then(|v| v.to_str().ok())
                            .filter(|_| object_get)
                            .map(str::to_string);
                        // A PUT of a whole object (not a part), or a multipart completion.
                        let completes_object = (record.method == "PUT" && !record.query.contains("partNumber"))
                            || (record.method == "POST" && record.query.contains("uploadId"));
                        let object_path = record.path.clone();
                        let write_delay = faults.write_delay_ms.load(Ordering::Relaxed);
                        let completed = completed.clone();
                        let print_completions = faults.print_completions.load(Ordering::Relaxed);
                        let received = std::time::Instant::now();
                        // s3s-fs answers a GET or HEAD of a key that is a directory on its disk
                        // with 500; S3 answers 404 (there is no such object), so do that.
                        let directory_key = (record.method == "GET" || record.method == "HEAD")
                            && record.query.is_empty()
                            && record.path.trim_matches('/').contains('/')
                            && root.join(record.path.trim_start_matches('/')).is_dir();
                        log.lock().unwrap().push(record);
                        let s3 = s3.clone();
                        let root = root.clone();
                        async move {
                            if object_get && delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            if directory_key && !refuse {
                                let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>no such key</Message></Error>";
                                return Ok(http::Response::builder()
                                    .status(404)
                                    .body(s3s::Body::from(body.to_string()))
                                    .expect("static response"));
                            }
                            if fail || refuse {
                                let body = "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected fault</Message></Error>";
                                return Ok(http::Response::builder()
                                    .status(500)
                                    .body(s3s::Body::from(body.to_string()))
                                    .expect("static response"));
                            }
                            if write_delay > 0 && (record_is_write(&req)) {
                                tokio::time::sleep(Duration::from_millis(write_delay)).await;
                            }
                            let response = Service::call(&s3, req).await;
                            let response = match response {
                                Ok(r) if listing && r.status().is_success() => {
                                    Ok(with_listed_etags(r, &root, &listed_bucket).await)
                                }
                                other => other,
                            };
                            if let (Some(wanted), Ok(r)) = (&if_match, &response) {
                                let etag = r.headers().get("etag").and_then(|v| v.to_str().ok());
                                if r.status().is_success() && etag != Some(wanted.as_str()) {
                                    let body = "<?xml version=\"1.0\"?><Error><Code>PreconditionFailed</Code><Message>At least one of the pre-conditions you specified did not hold</Message></Error>";
                                    return Ok(http::Response::builder()
                                        .status(412)
                                        .body(s3s::Body::from(body.to_string()))
                                        .expect("static response"));
                                }
                            }
                            if completes_object {
                                if let Ok(r) = &response {
                                    if r.status().is_success() {
                                        if print_completions {
                                            println!(
                                                "object complete: {object_path} (the request took {:.3}s)",
                                                received.elapsed().as_secs_f64()
                                            );
                                        }
                                        completed.lock().unwrap().push(object_path);
                                    }
                                }
                            }
                            response
                        }
                    });
                    let conn = tokio::spawn(async move {
                        let _ = ConnBuilder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(socket), service)
                            .await;
                    });
                    let mut tasks = tasks.lock().unwrap();
                    tasks.retain(|t| !t.is_finished());
                    tasks.push(conn);
                }
            })
        };
        tasks.lock().unwrap().push(accept);
        Ok(S3TestServer {
            addr,
            endpoint: format!("http://{addr}"),
            root: root.to_path_buf(),
            log,
            completed,
            faults,
            tasks,
            keys,
        })
    }

    /// Creates a bucket (a directory under the root).
    pub fn create_bucket(&self, bucket: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(self.root.join(bucket))
    }

    /// The `--source-option`s a worker needs for this server.
    pub fn options(&self) -> Vec<(String, String)> {
        let (access_key, secret_key) = self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone();
        vec![
            ("endpoint".into(), self.endpoint.clone()),
            ("region".into(), REGION.into()),
            ("access_key_id".into(), access_key),
            ("secret_access_key".into(), secret_key),
        ]
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.log.lock().unwrap().clone()
    }

    /// GETs of object bytes whose path contains `needle`.
    pub fn object_gets(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.is_object_get() && r.path.contains(needle))
            .count()
    }

    /// Paths (`/bucket/key`) of the objects written, in the order they became visible.
    pub fn completed_writes(&self) -> Vec<String> {
        self.completed.lock().unwrap().clone()
    }

    /// Delays every PUT and POST (uploads) by `delay`, as a slow link does.
    pub fn set_write_delay(&self, delay: Duration) {
        self.faults
            .write_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    pub fn set_get_delay(&self, delay: Duration) {
        self.faults
            .get_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn fail_gets_containing(&self, needle: Option<&str>) {
        *self.faults.fail_gets_containing.lock().unwrap() = needle.map(str::to_string);
    }

    /// Fails the second and later pages of every listing (an outage in the middle of a list).
    pub fn fail_list_continuations(&self, fail: bool) {
        self.faults.fail_list_continuations.store(fail, Ordering::Relaxed);
    }

    /// Prints a line for every object that becomes visible, with the time its completing
    /// request took (s3s-fs assembles multipart uploads by copying every part).
    pub fn print_completions(&self, on: bool) {
        self.faults.print_completions.store(on, Ordering::Relaxed);
    }

    /// Answers every request with 500, as a store in an outage does.
    /// Accepts only this key pair from now on (the old one is refused, as after a rotation).
    pub fn rotate_credentials(&self, access_key: &str, secret_key: &str) {
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = (access_key.to_string(), secret_key.to_string());
    }

    pub fn set_outage(&self, down: bool) {
        self.faults.refuse_all.store(down, Ordering::Relaxed);
    }

    /// Stops serving: the port is closed and open connections are dropped.
    pub fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

fn record_is_write<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::PUT || req.method() == http::Method::POST
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// s3s-fs lists objects without their ETags; S3 lists them with, and a client that gets none
/// has to stat every entry (20,000 HEADs for a 20,000-file walk). This adds each entry's ETag,
/// from the metadata file s3s-fs keeps per object (`.bucket-<b64>.object-<b64>.internal.json`
/// in the root, `e_tag`); an entry without one is left as it was.
async fn with_listed_etags(
    response: http::Response<s3s::Body>,
    root: &Path,
    bucket: &str,
) -> http::Response<s3s::Body> {
    use base64::Engine;
    let (parts, mut body) = response.into_parts();
    let Ok(xml) = body.store_all_limited(64 << 20).await else {
        return http::Response::from_parts(parts, body);
    };
    let Ok(xml) = std::str::from_utf8(&xml) else {
        return http::Response::from_parts(parts, body);
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let mut out = String::with_capacity(xml.len() + xml.len() / 4);
    let mut rest = xml;
    while let Some(at) = rest.find("</Key>") {
        let (head, tail) = rest.split_at(at + "</Key>".len());
        out.push_str(head);
        rest = tail;
        let Some(open) = head.rfind("<Key>") else { continue };
        let in_contents = head[..open].rfind("<Contents>") > head[..open].rfind("</Contents>");
        if !in_contents || tail.trim_start().starts_with("<ETag>") {
            continue;
        }
        let key = unescape_xml(&head[open + "<Key>".len()..at]);
        let info = root.join(format!(".bucket-{}.object-{}.internal.json", b64(bucket), b64(&key)));
        let etag = std::fs::read(&info)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("e_tag").and_then(|e| e.as_str()).map(str::to_string));
        if let Some(etag) = etag {
            out.push_str(&format!("<ETag>&quot;{etag}&quot;</ETag>"));
        }
    }
    out.push_str(rest);
    let mut parts = parts;
    parts.headers.remove(http::header::CONTENT_LENGTH);
    http::Response::from_parts(parts, s3s::Body::from(out))
}

fn unescape_xml(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}
