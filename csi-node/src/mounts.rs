//! Bind mounts into pods and what the kernel says about mount points: the only code of
//! granary-csi that changes the mount table.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Undoes the escaping of `/proc/self/mountinfo` (space, tab, newline and backslash are
/// written as three octal digits after a backslash).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The mount points of this mount namespace, from `/proc/self/mountinfo`.
fn mount_points() -> io::Result<Vec<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape)
        .collect())
}

/// Whether `path` is a mount point. Read from the mount table rather than by stat, which
/// hangs or fails on a mount whose daemon is gone.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let points = mount_points()?;
    Ok(points.iter().any(|p| p == path))
}

/// Bind-mounts `source` at `target`, read-only when asked; never with devices or setuid.
pub fn bind(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    let (src, dst) = (c_path(source)?, c_path(target)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the calls; a bind mount
    // reads no filesystem type or data.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    // Bind mounts ignore flags on creation; a remount applies them.
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: as above.
    let remounted = check(unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    });
    if let Err(e) = remounted {
        // A writable bind of a volume that must be read-only is worse than none.
        let _ = unmount(target);
        return Err(e);
    }
    Ok(())
}

/// Unmounts `target`; lazily when it is busy (a pod's process still in it), so the pod's
/// teardown never waits on one. A path that is not a mount point is fine.
pub fn unmount(target: &Path) -> io::Result<()> {
    let dst = c_path(target)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    match check(unsafe { libc::umount2(dst.as_ptr(), 0) }) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // SAFETY: as above.
            check(unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) })
        }
        Err(e) => Err(e),
    }
}

/// What `statvfs` says about a mounted volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub read_only: bool,
}

pub fn usage(path: &Path) -> io::Result<Usage> {
    let p = c_path(path)?;
    // SAFETY: statvfs is plain data, so all zeroes is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a pointer to a statvfs that outlive the call.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    let frsize = st.f_frsize as u64;
    let total_bytes = st.f_blocks as u64 * frsize;
    Ok(Usage {
        total_bytes,
        available_bytes: st.f_bavail as u64 * frsize,
        used_bytes: total_bytes.saturating_sub(st.f_bfree as u64 * frsize),
        total_inodes: st.f_files as u64,
        free_inodes: st.f_ffree as u64,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), PathBuf::from("/a b\tc\\d"));
        assert_eq!(unescape("/plain/path"), PathBuf::from("/plain/path"));
        assert_eq!(unescape("/trailing\\04"), PathBuf::from("/trailing\\04"));
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()).unwrap());
    }
}
