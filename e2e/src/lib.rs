//! The end-to-end suite's harness: the node's processes ([`processes`]), CSI calls as the
//! kubelet makes them ([`kubelet`]) and a real Prometheus ([`prometheus`]). The suite itself
//! is `tests/data_plane.rs`; `make e2e` runs it.

pub mod kubelet;
pub mod processes;
pub mod prometheus;

use std::path::Path;

/// Why FUSE and bind mounts cannot be made here, if they cannot.
fn mount_obstacle() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse does not exist".into());
    }
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    None
}

/// `true` when `obstacle` is none; otherwise a skip saying why, or under
/// `GRANARY_REQUIRE_MOUNTS=1` (CI) a failure.
fn can_run(what: &str, obstacle: Option<String>) -> bool {
    match obstacle {
        None => true,
        Some(r) if std::env::var("GRANARY_REQUIRE_MOUNTS").is_ok_and(|v| v == "1") => {
            panic!("GRANARY_REQUIRE_MOUNTS=1 but {what} cannot run: {r}")
        }
        Some(r) => {
            eprintln!("SKIP: {what} cannot run here: {r}");
            false
        }
    }
}

/// Whether FUSE and bind mounts can be made here (root and /dev/fuse), for `what`.
pub fn mounts_possible(what: &str) -> bool {
    can_run(what, mount_obstacle())
}

/// Whether the e2e suite can run here: mounts, and a `prometheus` binary.
pub fn environment_ready() -> bool {
    let obstacle = mount_obstacle().or_else(|| {
        (!prometheus::available())
            .then(|| "no prometheus binary (apt-get install prometheus, or set GRANARY_PROMETHEUS)".to_string())
    });
    can_run("the e2e suite", obstacle)
}
