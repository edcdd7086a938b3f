//! The end-to-end suite's harness: the node's processes ([`processes`]), CSI calls as the
//! kubelet makes them ([`kubelet`]) and a real Prometheus ([`prometheus`]). The suite itself
//! is `tests/data_plane.rs`; `make e2e` runs it.

pub mod kubelet;
pub mod processes;
pub mod prometheus;

use std::path::Path;

/// Whether the suite can run here: root, /dev/fuse and a `prometheus` binary. Without them it
/// skips, saying why, or under `GRANARY_REQUIRE_MOUNTS=1` (CI) fails.
pub fn environment_ready() -> bool {
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    let reason = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse does not exist".to_string())
    } else if !root {
        Some("not running as root".to_string())
    } else if !prometheus::available() {
        Some("no prometheus binary (apt-get install prometheus, or set GRANARY_PROMETHEUS)".to_string())
    } else {
        None
    };
    match reason {
        None => true,
        Some(r) if std::env::var("GRANARY_REQUIRE_MOUNTS").is_ok_and(|v| v == "1") => {
            panic!("GRANARY_REQUIRE_MOUNTS=1 but the e2e suite cannot run: {r}")
        }
        Some(r) => {
            eprintln!("SKIP: the e2e suite needs root, /dev/fuse and prometheus ({r})");
            false
        }
    }
}
