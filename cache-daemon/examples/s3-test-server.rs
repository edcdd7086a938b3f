//! A real S3-protocol server over a local directory, for the demo and the benchmarks:
//! `cargo run --release --example s3-test-server -- --root DIR --listen 127.0.0.1:9000`.
//! Credentials: granary-test / granary-test-secret, region us-east-1.

#[path = "../tests/support/s3.rs"]
mod s3;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Directory holding the buckets (one subdirectory each).
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Buckets to create at start.
    #[arg(long = "bucket")]
    buckets: Vec<String>,
    /// Upload a local directory's files through the S3 protocol at start, so they carry
    /// ETags like any uploaded object: LOCAL_DIR=BUCKET[/PREFIX]. Repeatable.
    #[arg(long = "upload", value_name = "DIR=BUCKET/PREFIX")]
    uploads: Vec<String>,
    /// Print a line whenever an object becomes visible (a PUT, or a multipart completion),
    /// with how long that request took.
    #[arg(long)]
    print_completions: bool,
}

/// PUTs every file under `dir` to `bucket/prefix` on this server, in parallel.
async fn upload(server: &s3::S3TestServer, dir: &std::path::Path, target: &str) -> anyhow::Result<u64> {
    use futures::StreamExt;
    let options = server.options().into_iter().collect();
    let store = granary_store::source::SourceStore::open(
        &format!("s3://{target}"),
        &options,
        &granary_store::source::SourceTuning::default(),
    )?;
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    let count = files.len() as u64;
    let op = store.operator().clone();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(files)
        .map(|path| {
            let op = op.clone();
            let key = path.strip_prefix(dir).map(|p| p.to_string_lossy().into_owned());
            async move {
                let key = key?;
                let size = std::fs::metadata(&path)?.len();
                if size <= 64 << 20 {
                    op.write(&key, std::fs::read(&path)?).await?;
                } else {
                    // Large files go up as multipart, 64 MiB at a time.
                    use std::io::Read;
                    let mut writer = op.writer_with(&key).chunk(64 << 20).await?;
                    let mut f = std::fs::File::open(&path)?;
                    let mut buf = vec![0u8; 64 << 20];
                    loop {
                        let n = f.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        writer.write(buf[..n].to_vec()).await?;
                    }
                    writer.close().await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(count)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.root)?;
    let server = s3::S3TestServer::start(&args.root, args.listen).await?;
    server.print_completions(args.print_completions);
    for bucket in &args.buckets {
        server.create_bucket(bucket)?;
    }
    for spec in &args.uploads {
        let (dir, target) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--upload expects DIR=BUCKET/PREFIX, got {spec:?}"))?;
        let started = std::time::Instant::now();
        let n = upload(&server, std::path::Path::new(dir), target).await?;
        println!(
            "uploaded {n} files from {dir} to {target} in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    println!(
        "s3 test server on {} (access key {}, secret {}, region {})",
        server.endpoint,
        s3::ACCESS_KEY,
        s3::SECRET_KEY,
        s3::REGION
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
