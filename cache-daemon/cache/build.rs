//! Compiles the worker's gRPC API with a vendored `protoc`, so a build needs nothing but crates.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts run single-threaded before any other code reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        // Block payloads stay `Bytes` end to end: slices, not copies.
        .bytes(".granary.worker.v1.BlockChunk.data")
        // `granary-cache stats --json` prints these as they are.
        .type_attribute(".granary.worker.v1.StatsResponse", "#[derive(serde::Serialize)]")
        .type_attribute(".granary.worker.v1.TierStats", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/granary/worker/v1/worker.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
