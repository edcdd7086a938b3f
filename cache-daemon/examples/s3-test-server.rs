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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.root)?;
    let server = s3::S3TestServer::start(&args.root, args.listen).await?;
    for bucket in &args.buckets {
        server.create_bucket(bucket)?;
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
