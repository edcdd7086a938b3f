//! Starting a FUSE session, for either filesystem: on a fresh mount, or on the kernel mount a
//! previous process left (taken over through its descriptor, with the requests that process
//! had read resent); and what a mount hands on so that a successor can take it over.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fuser::{BackgroundSession, Config, InitFlags, KernelConfig, MountOption, Session, SessionACL};

/// What a mount (of either kind) hands to the keeper for a successor: a duplicate of its
/// /dev/fuse descriptor, what the kernel agreed to at its start, and which incarnation serves it.
pub struct Handover {
    /// Set for mounts that can be taken over.
    pub(crate) device: Option<OwnedFd>,
    pub(crate) passthrough: Arc<AtomicBool>,
    pub(crate) epoch: u64,
}

impl Handover {
    /// A new duplicate of the mount's descriptor, for mounts that can be taken over.
    pub fn device(&self) -> Option<io::Result<OwnedFd>> {
        self.device.as_ref().map(|fd| fd.try_clone())
    }

    /// Whether the kernel agreed to passthrough for this mount.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This incarnation's epoch: 0 for the process that mounted, +1 per take-over.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// What a process needs to serve a mount another one started: a duplicate of its
/// /dev/fuse descriptor and what the kernel agreed to at the mount's start.
#[derive(Debug)]
pub struct Takeover {
    pub fd: OwnedFd,
    /// The epoch of the incarnation that served it last.
    pub epoch: u64,
    pub passthrough: bool,
}

/// A path that was a FUSE mount of a process that died answers ENOTCONN; detach it so the
/// path can be mounted again.
pub fn clear_dead_mount(path: &Path) -> io::Result<bool> {
    // Open, not stat: the kernel may answer a stat from attributes it cached, while an open
    // needs the (dead) daemon.
    match std::fs::File::open(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            detach(path)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Lazily unmounts `path` (MNT_DETACH).
pub fn detach(path: &Path) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: umount2 reads a NUL-terminated path that lives across the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Starts serving `fs`: mounts it at `mountpoint`, or, given the descriptor of the kernel
/// mount a previous process left there, serves that one and asks the kernel to resend what
/// that process had taken. Returns the session and, for a mount that can be taken over
/// (`restartable`, as a taken-over one is), a duplicate of its descriptor to hand on. Both
/// kinds of mount start here.
pub fn start_session<FS: fuser::Filesystem + Send + 'static>(
    fs: FS,
    mountpoint: &Path,
    mut config: Config,
    restartable: bool,
    takeover: Option<OwnedFd>,
) -> io::Result<(BackgroundSession, Option<OwnedFd>)> {
    // A request read through a cloned descriptor dies with it (ECONNABORTED) when the daemon
    // does; one read through the shared descriptor waits in the kernel for the next daemon.
    // So a mount that can be taken over reads through the shared one only.
    config.clone_fd = !restartable;
    match takeover {
        Some(fd) => {
            let device = fd.try_clone()?;
            let acl = config.acl;
            let session = Session::from_initialized_fd(fs, fd, acl, config).spawn()?;
            if let Err(e) = ask_resend(&device) {
                tracing::warn!(error = %e, "the kernel cannot resend requests the previous daemon had taken (needs Linux 6.9+); their callers may wait forever");
            }
            Ok((session, Some(device)))
        }
        None => {
            let session = Session::new(fs, mountpoint, &config)?;
            let device = match restartable {
                true => Some(session.as_fd().try_clone_to_owned()?),
                false => None,
            };
            Ok((session.spawn()?, device))
        }
    }
}

/// FUSE_NOTIFY_RESEND: the kernel puts every request a daemon read but never answered back
/// in the queue. Its header is the whole message (`fuse_out_header`: length, notify code as
/// the error, unique 0).
fn ask_resend(device: &OwnedFd) -> io::Result<()> {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut message = [0u8; 16];
    message[0..4].copy_from_slice(&16u32.to_ne_bytes());
    message[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    use std::os::fd::AsRawFd;
    // SAFETY: writes 16 bytes from a live buffer to a descriptor this process owns.
    let written = unsafe { libc::write(device.as_raw_fd(), message.as_ptr().cast(), message.len()) };
    if written == message.len() as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The session settings both filesystems mount with: read-only or read-write, named
/// `fs_name` of type `granary`, no devices or setuid, permissions checked by the kernel.
pub fn session_config(read_only: bool, fs_name: String, allow_other: bool, threads: usize) -> Config {
    let mut config = Config::default();
    if allow_other {
        // Pods run as any user; fuser turns this into the allow_other mount option.
        config.acl = SessionACL::All;
    }
    config.mount_options = vec![
        if read_only { MountOption::RO } else { MountOption::RW },
        MountOption::FSName(fs_name),
        MountOption::Subtype("granary".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    config.n_threads = Some(threads.max(1));
    config
}

/// Asks the kernel at init for passthrough (Linux 6.9+) and records in `agreed` whether it
/// was given; `without` says, for the log, what happens when it is not.
pub fn offer_passthrough(config: &mut KernelConfig, agreed: &AtomicBool, without: &str) {
    match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
        Ok(()) => {
            let _ = config.set_max_stack_depth(1);
            agreed.store(true, std::sync::atomic::Ordering::Release);
        }
        Err(_) => tracing::info!("this kernel does not offer FUSE passthrough (Linux 6.9+); {without}"),
    }
}
