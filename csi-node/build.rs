//! Compiles the vendored CSI spec (proto/csi/v1/csi.proto) with the vendored `protoc`, so a
//! build needs nothing but crates.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts run single-threaded before any other code reads the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let google = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        // Only the Identity and Node services are served; the client is for tests and tools.
        .compile_protos(
            &[std::path::PathBuf::from("proto/csi/v1/csi.proto")],
            &[std::path::PathBuf::from("proto"), google],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
