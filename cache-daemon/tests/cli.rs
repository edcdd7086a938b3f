//! The `granary-cache` binary as a user runs it: exit codes, output, the metrics endpoint.

mod support;

use std::process::{Command, Output};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn granary(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_granary-cache"))
            .args(&args)
            .env_remove("GRANARY_WORKERS")
            .output()
            .expect("run granary-cache")
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_bad_source_is_a_configuration_error_that_names_the_fix() {
    let out = granary(args(&["worker", "--source", "ftp://x/y", "--listen", "127.0.0.1:0"])).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown source scheme \"ftp\"") && stderr.contains("s3://"),
        "{stderr}"
    );

    let out = granary(args(&["worker", "--source", "s3://b/p", "--source-option", "endpoint"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected key=value"));

    let out = granary(args(&["stats", "--workers", "nohost"])).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("port is missing"));
}

#[tokio::test]
async fn a_member_set_without_its_own_name_or_with_a_bad_address_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let source = format!("fs://{}", dir.path().display());
    let base = ["worker", "--source", source.as_str(), "--listen", "127.0.0.1:0"];
    let run = |extra: &[&str]| {
        let mut all = base.to_vec();
        all.extend_from_slice(extra);
        granary(args(&all))
    };
    let out = run(&["--members", "a:7070,b:7070"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("--advertise"), "{stderr}");

    let out = run(&["--members", "a:7070,nohost", "--advertise", "a:7070"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("nohost") && stderr.contains("port is missing"),
        "{stderr}"
    );

    let missing = dir.path().join("no-such-members");
    let out = run(&[
        "--members-file",
        &missing.display().to_string(),
        "--advertise",
        "a:7070",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("no-such-members") && stderr.contains("--members-file"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_cat_and_stats_work_against_real_workers() {
    let env = s3_env().await;
    for i in 0..4 {
        env.put(&format!("ds/train/{i}.jpg"), &pattern(150_000, i)).await;
    }
    env.put("ds/bad/ok.bin", &pattern(10, 1)).await;
    env.put("ds/bad/broken.bin", &pattern(10, 2)).await;
    let mut config = env.config("ds");
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let worker = start(config).await;
    let workers = worker.addr.to_string();

    let out = granary(args(&["load", "--workers", &workers, "/train"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("loaded /train: 4 files"), "{stderr}");

    let out = granary(args(&["cat", "--workers", &workers, "/train/2.jpg"])).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == pattern(150_000, 2), "cat prints the file's bytes");

    let out = granary(args(&["cat", "--workers", &workers, "/train/none.jpg"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    let out = granary(args(&["stats", "--workers", &workers, "--json"])).await;
    assert_eq!(out.status.code(), Some(0));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows[0]["worker"], workers.as_str());
    assert_eq!(
        rows[0]["stats"]["misses"], 12,
        "4 files of 3 blocks, each fetched once: {rows}"
    );
    assert_eq!(rows[0]["stats"]["memory"]["hits"], 3, "cat of one file after the load");

    env.s3.fail_gets_containing(Some("broken.bin"));
    let out = granary(args(&["load", "--workers", &workers, "/bad"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("failed: bad/broken.bin"), "{stderr}");
    assert!(stderr.contains("1 of 2 files failed"), "{stderr}");

    // The metrics endpoint, over real HTTP.
    let metrics_addr = worker.metrics_addr.expect("metrics address");
    let body = http_get(metrics_addr, "/metrics").await;
    for name in [
        "granary_cache_hits_total{tier=\"memory\"} 3",
        // 12 blocks of /train, then one of each /bad file (the broken one failed).
        "granary_cache_misses_total 14",
        "granary_source_read_bytes_total 600010",
        "granary_cache_used_bytes{tier=\"memory\"}",
        "granary_worker_request_duration_seconds_bucket",
        "granary_prewarm_files{state=\"failed\"} 1",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    assert!(http_get(metrics_addr, "/readyz").await.starts_with("HTTP/1.1 200"));
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_mistakes_fail_at_start_with_the_fix() {
    let missing = granary(args(&["mount", "--source", "fs:///tmp", "/no/such/mountpoint"])).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist; create it first"));

    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_string_lossy().into_owned();
    let half = granary(args(&["mount", "--source", "fs:///tmp", "--cache-dir", "/tmp/x", &mnt])).await;
    assert_eq!(half.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&half.stderr).contains("--cache-dir needs --cache-size"));

    let nothing = granary(args(&["mount", &mnt])).await;
    assert_eq!(nothing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("give the workers (--workers) or the source store"));

    // Nothing answers: an error at mount time, not EIO at the first read.
    let dead = granary(args(&["mount", "--workers", "127.0.0.1:1", &mnt])).await;
    assert_eq!(dead.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&dead.stderr);
    assert!(
        stderr.contains("cannot be read") && stderr.contains("unreachable"),
        "{stderr}"
    );
}

/// An `https://` store endpoint: the binary opens TLS with the process's crypto provider (one
/// provider, ring, in the tree: without an installed default, rustls panics at the first
/// client it builds). The server's certificate is not trusted, so the handshake is refused
/// by the client, and that is what the error says: no panic, exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_store_is_reached_over_tls_and_an_untrusted_certificate_is_named() {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![generated.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hellos = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&hellos);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = std::sync::Arc::clone(&counted);
            tokio::spawn(async move {
                // The client rejects the certificate, so the handshake ends in an alert; the
                // ClientHello reached the server all the same.
                let hello =
                    tokio_rustls::LazyConfigAcceptor::new(tokio_rustls::rustls::server::Acceptor::default(), tcp).await;
                if let Ok(start) = hello {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = start.into_stream(acceptor.config().clone()).await;
                }
            });
        }
    });
    // A worker of that store, and a read through it: the worker opens TLS to the store.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_granary-cache"))
        .args([
            "worker",
            "--source",
            "s3://bucket/data/",
            "--listen",
            &listen.to_string(),
        ])
        .args([
            "--source-option",
            &format!("endpoint=https://{addr}"),
            "--source-option",
            "region=us-east-1",
        ])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let workers = listen.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let out = granary(args(&["cat", "--workers", &workers, "/train/0.jpg"])).await;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        if !stderr.contains("worker") || !stderr.contains("unreachable") || std::time::Instant::now() > deadline {
            break out;
        }
        // Not listening yet.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let _ = worker.kill();
    let worker_out = worker.wait_with_output().expect("worker output");
    let worker_stderr = String::from_utf8_lossy(&worker_out.stderr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for text in [&stderr, &worker_stderr] {
        assert!(!text.contains("panicked") && !text.contains("CryptoProvider"), "{text}");
        assert!(!text.contains("transport is not installed"), "{text}");
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot stat /train/0.jpg"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the error names the untrusted certificate: {stderr}"
    );
    assert!(
        hellos.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no TLS ClientHello reached the store: {stderr}"
    );
}

/// A worker whose store is unreachable says so at start, before any read, and keeps
/// serving: its probe is a real request (the root's stat needs none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_says_at_start_that_its_store_is_unreachable() {
    use std::io::BufRead;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_granary-cache"))
        .args(["worker", "--source", "s3://bucket/data/", "--listen", "127.0.0.1:0"])
        .args(["--source-option", &format!("endpoint=http://{closed}")])
        .args(["--source-option", "region=us-east-1", "--source-retries", "0"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test-secret")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let stderr = worker.stderr.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let done = line.contains("not reachable");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let lines = tokio::time::timeout(std::time::Duration::from_secs(60), lines)
        .await
        .expect("the worker said nothing about its store within 60 s")
        .unwrap();
    let still_running = worker.try_wait().unwrap().is_none();
    let _ = worker.kill();
    let _ = worker.wait();
    let last = lines.last().cloned().unwrap_or_default();
    assert!(
        last.contains("not reachable") && last.contains("endpoint"),
        "{}",
        lines.join("\n")
    );
    assert!(still_running, "the worker keeps serving its cache");
}
