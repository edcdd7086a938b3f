//! Compiles the coordinator's gRPC API with a vendored `protoc`, so a build needs nothing but crates.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts run single-threaded before any other code reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["proto/granary/commit/v1/commit.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
