//! `granary-cache load --mount M [PATH]`: loads a dataset onto this node. Every file under
//! PATH of the dataset mounted at M has its room reserved, one after the other in path order
//! (`user.granary.reserve`), and is then asked for whole through `user.granary.fill`
//! (`granary_fs::dataset::node_fill`), several at once; the
//! mount fetches its blocks and writes them into its node-local cache, from which the kernel
//! reads the file itself (passthrough) at every later open. Files already there answer at
//! once, so running it again resumes. The rule for a dataset larger than the node cache:
//! files are asked for in path order, and each that fits beside the files loaded before it is
//! loaded; the others stay on the workers (exit code 3, with their count and bytes).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use granary_fs::dataset::node_fill::xattr;
use granary_store::units::ByteSize;

use super::exit::{config_error, PartialLoad};

/// Reads the extended attribute `name` of `path` (following no symlink: the mount has none).
fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let c_name = CString::new(name).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL"))?;
    let mut value = vec![0u8; 64];
    // SAFETY: both strings are NUL-terminated and outlive the call; `value` is writable for
    // the length passed.
    let n = unsafe { libc::lgetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    value.truncate(n as usize);
    Ok(value)
}

/// The filesystem type and source of the mount at exactly `path`, from /proc/self/mountinfo.
fn mount_of(path: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        if point != wanted {
            return None;
        }
        // After the optional fields, "-", the filesystem type and the source.
        let mut rest = fields.skip_while(|f| *f != "-");
        rest.next();
        Some((rest.next()?.to_string(), rest.next()?.to_string()))
    })
}

/// The files under `root` (or `root` itself), in path order, with their sizes.
fn walk(root: &Path, found: &mut Vec<(PathBuf, u64)>, on_file: &dyn Fn(usize)) -> std::io::Result<()> {
    let md = std::fs::metadata(root)?;
    if md.is_file() {
        found.push((root.to_path_buf(), md.len()));
        on_file(found.len());
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(root)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), found, on_file)?;
        } else if kind.is_file() {
            found.push((entry.path(), entry.metadata()?.len()));
            on_file(found.len());
        }
    }
    Ok(())
}

enum Filled {
    Complete,
    NoRoom,
}

/// Asks the mount for the attribute `name` of `file` (reserve, or fill): `NoRoom` for
/// `ENOSPC`; a file replaced in the store meanwhile (ESTALE) is asked for again, once.
fn ask(file: &Path, name: &str) -> std::io::Result<Filled> {
    let mut retried = false;
    loop {
        match get_xattr(file, name) {
            Ok(_) => return Ok(Filled::Complete),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(Filled::NoRoom),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) && !retried => retried = true,
            Err(e) => return Err(e),
        }
    }
}

/// Reserves `file`, then fills it when it has room.
fn fill(file: &Path, reserved: std::io::Result<Filled>) -> std::io::Result<Filled> {
    match reserved? {
        Filled::Complete => ask(file, xattr::FILL),
        Filled::NoRoom => Ok(Filled::NoRoom),
    }
}

pub async fn run(mount: &Path, paths: &[String], parallelism: usize, allow_partial: bool) -> anyhow::Result<()> {
    let mount = match std::fs::canonicalize(mount) {
        Ok(m) => m,
        Err(e) => config_error!(
            "--mount {}: {e}; pass the directory the dataset is mounted on",
            mount.display()
        ),
    };
    match mount_of(&mount) {
        // A Granary mount's source is "granary:<store>"; its type "fuse" or "fuse.granary".
        Some((kind, source)) if kind.starts_with("fuse") && source.starts_with("granary") => {}
        Some((kind, source)) => config_error!(
            "--mount {}: this is a {kind} mount of {source}, not a Granary dataset mount; pass the directory the dataset is mounted on",
            mount.display()
        ),
        None => config_error!(
            "--mount {}: nothing is mounted on this directory; pass the directory the dataset is mounted on (a pod's mount path, or the node daemon's <state-dir>/mnt/<volume>)",
            mount.display()
        ),
    }
    let (used, size) = match get_xattr(&mount, xattr::NODE_CACHE) {
        Ok(value) => {
            let text = String::from_utf8_lossy(&value).into_owned();
            let mut parts = text.split(' ').map(|n| n.parse::<u64>().unwrap_or(0));
            (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => config_error!(
            "--mount {}: this mount has no node-local cache to load into; mount it with --cache-dir DIR --cache-size SIZE (the node daemon: --local-cache-size)",
            mount.display()
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => config_error!(
            "--mount {}: this Granary mount does not take loads (a checkpoint volume, or a mount by an older granary-cache)",
            mount.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot ask {} for its node-local cache", mount.display())),
    };
    let targets: Vec<PathBuf> = paths
        .iter()
        .map(|path| match path.trim_start_matches('/') {
            "" => mount.clone(),
            relative => mount.join(relative),
        })
        .collect();
    let target = match targets.as_slice() {
        [one] => one.display().to_string(),
        _ => format!("{} paths of {}", targets.len(), mount.display()),
    };
    let started = Instant::now();
    let bar = super::load::bar();
    bar.set_message(format!("listing {target}"));
    let walk_bar = bar.clone();
    let files = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<(PathBuf, u64)>> {
        let mut found = Vec::new();
        for root in &targets {
            walk(root, &mut found, &|n| {
                if n % 1000 == 0 {
                    walk_bar.set_message(format!("listing: {n} files"));
                }
            })
            .with_context(|| format!("cannot list {}", root.display()))?;
        }
        // Paths given twice, or one inside another, are loaded once.
        found.sort();
        found.dedup();
        Ok(found)
    })
    .await
    .context("the listing task failed")??;
    let total: u64 = files.iter().map(|(_, size)| size).sum();
    eprintln!(
        "loading {} onto this node: {} files, {}; node cache {} of {} used",
        target,
        files.len(),
        ByteSize(total),
        ByteSize(used),
        ByteSize(size)
    );
    bar.set_length(total);
    let (mut done_files, mut done_bytes) = (0u64, 0u64);
    let (mut no_room_files, mut no_room_bytes) = (0u64, 0u64);
    let mut failures: Vec<(PathBuf, std::io::Error)> = Vec::new();
    let mut last_line = Instant::now();
    // Reservations one at a time in path order, so which files fit is the stated rule;
    // fills, which fetch, several at once behind them.
    let (reserved_tx, reserved_rx) = tokio::sync::mpsc::channel(parallelism.max(1));
    tokio::task::spawn_blocking(move || {
        for (file, size) in files {
            let reserved = ask(&file, xattr::RESERVE);
            if reserved_tx.blocking_send((file, size, reserved)).is_err() {
                return;
            }
        }
    });
    let reserved = futures::stream::unfold(reserved_rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut fills = std::pin::pin!(reserved
        .map(|(file, size, reserved)| async move {
            let asked = file.clone();
            let result = tokio::task::spawn_blocking(move || fill(&asked, reserved)).await;
            (file, size, result)
        })
        .buffered(parallelism.max(1)));
    while let Some((file, size, result)) = fills.next().await {
        match result {
            Ok(Ok(Filled::Complete)) => {
                done_files += 1;
                done_bytes += size;
            }
            Ok(Ok(Filled::NoRoom)) => {
                no_room_files += 1;
                no_room_bytes += size;
            }
            Ok(Err(e)) => {
                bar.suspend(|| eprintln!("failed: {}: {e}", file.display()));
                failures.push((file, e));
            }
            Err(e) => failures.push((file, std::io::Error::other(e.to_string()))),
        }
        bar.inc(size);
        bar.set_message(format!(
            "files {done_files} on the node, {no_room_files} left on the workers, {} failed",
            failures.len()
        ));
        if bar.is_hidden() && last_line.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "loading onto this node: {} of {}, {done_files} files on the node, {no_room_files} left on the workers, {} failed",
                ByteSize(done_bytes + no_room_bytes),
                ByteSize(total),
                failures.len()
            );
            last_line = Instant::now();
        }
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "loaded {} onto this node: {done_files} files, {} in {secs:.1}s ({}/s); {no_room_files} files ({}) did not fit and stay on the workers; {} failed",
        target,
        ByteSize(done_bytes),
        ByteSize((done_bytes as f64 / secs.max(1e-3)) as u64),
        ByteSize(no_room_bytes),
        failures.len()
    );
    if let Some((file, e)) = failures.first() {
        bail!(
            "{} files failed to load onto this node (the first: {}: {e}); the mount's log names the cause",
            failures.len(),
            file.display()
        );
    }
    if no_room_files > 0 && !allow_partial {
        return Err(anyhow::Error::new(PartialLoad(format!(
            "{no_room_files} files ({}) do not fit in the node-local cache ({} in all) beside the files loaded before them; they are read from the workers. A larger --cache-size (node daemon: --local-cache-size) holds them",
            ByteSize(no_room_bytes),
            ByteSize(size)
        ))));
    }
    Ok(())
}
