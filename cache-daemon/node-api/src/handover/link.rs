//! The node daemon's side of the keeper: fetch the descriptors at start, then keep the
//! keeper holding exactly the current mounts, pushing them again whenever the keeper
//! (granary-csi) restarts.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::wire::{Conn, Message};

/// A mount's descriptor as the keeper held it.
#[derive(Debug)]
pub struct HandedMount {
    pub volume_id: String,
    pub fd: OwnedFd,
    pub meta: serde_json::Value,
}

/// The descriptors the keeper at `socket` holds. No keeper (nothing listening) is no
/// descriptors: the daemon then mounts afresh.
pub fn fetch(socket: &Path) -> io::Result<Vec<HandedMount>> {
    let conn = match Conn::connect(socket) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    conn.set_timeout(Duration::from_secs(10))?;
    conn.send(&Message::Fetch, None)?;
    let mut handed = Vec::new();
    loop {
        match conn.recv()? {
            Some((Message::Held { volume_id, meta }, Some(fd))) => handed.push(HandedMount { volume_id, fd, meta }),
            Some((Message::End, _)) => break,
            Some((other, _)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected keeper answer {other:?}"),
                ))
            }
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the keeper closed the connection",
                ))
            }
        }
    }
    // The keeper answers Ok after the last Held.
    let _ = conn.recv();
    Ok(handed)
}

struct Inner {
    socket: PathBuf,
    mounts: Mutex<BTreeMap<String, (OwnedFd, serde_json::Value)>>,
    /// Bumped on every change; the pusher sends everything again when it moved.
    generation: AtomicU64,
    pushed: AtomicU64,
    connected: AtomicBool,
}

#[derive(Clone)]
pub struct HandoverLink {
    inner: Arc<Inner>,
}

impl HandoverLink {
    /// Starts keeping the keeper at `socket` in step with this daemon's mounts.
    pub fn start(socket: &Path) -> io::Result<HandoverLink> {
        let inner = Arc::new(Inner {
            socket: socket.to_path_buf(),
            mounts: Mutex::default(),
            // Nothing is pushed before the first change or sync: a restarting daemon first
            // takes its mounts over, then tells the keeper what to keep.
            generation: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("fd-handover".into())
            .spawn(move || push_loop(weak))?;
        Ok(HandoverLink { inner })
    }

    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// Has the keeper hold `fd` for `volume_id`.
    pub fn hold(&self, volume_id: &str, fd: OwnedFd, meta: serde_json::Value) {
        self.lock().insert(volume_id.to_string(), (fd, meta));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Has the keeper let go of `volume_id`'s descriptor.
    pub fn release(&self, volume_id: &str) {
        self.lock().remove(volume_id);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Has the keeper hold exactly the current mounts (letting go of any others).
    pub fn sync(&self) {
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the keeper holds exactly the current mounts.
    pub fn in_step(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire)
            && self.inner.pushed.load(Ordering::Acquire) == self.inner.generation.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (OwnedFd, serde_json::Value)>> {
        self.inner.mounts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends every held descriptor and then the list to keep; returns the generation sent.
fn push_all(inner: &Inner, conn: &Conn) -> io::Result<u64> {
    let generation = inner.generation.load(Ordering::Acquire);
    let mounts = inner.mounts.lock().unwrap_or_else(|p| p.into_inner());
    for (volume_id, (fd, meta)) in mounts.iter() {
        conn.call(
            &Message::Hold {
                volume_id: volume_id.clone(),
                meta: meta.clone(),
            },
            Some(fd.as_raw_fd()),
        )?;
    }
    conn.call(
        &Message::Keep {
            volume_ids: mounts.keys().cloned().collect(),
        },
        None,
    )?;
    Ok(generation)
}

fn push_loop(inner: std::sync::Weak<Inner>) {
    let mut warned = false;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let conn = match Conn::connect(&strong.socket).and_then(|c| c.set_timeout(Duration::from_secs(10)).map(|_| c)) {
            Ok(c) => c,
            Err(e) => {
                if !warned {
                    tracing::warn!(socket = %strong.socket.display(), error = %e,
                        "cannot reach the fd keeper (granary-csi); mounts will not survive a restart of this daemon until it is back");
                    warned = true;
                }
                drop(strong);
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        warned = false;
        strong.connected.store(true, Ordering::Release);
        drop(strong);
        // Connected: push whenever something changed, until the keeper goes away.
        loop {
            let Some(strong) = inner.upgrade() else { return };
            if strong.pushed.load(Ordering::Acquire) != strong.generation.load(Ordering::Acquire) {
                match push_all(&strong, &conn) {
                    Ok(generation) => strong.pushed.store(generation, Ordering::Release),
                    Err(e) => {
                        tracing::warn!(error = %e, "handing the FUSE descriptors to the keeper failed; reconnecting");
                        break;
                    }
                }
            }
            let mut fds = [PollFd::new(conn_fd(&conn), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                // The keeper only ever speaks when asked: readable means it hung up.
                Ok(n) if n > 0 => {
                    tracing::info!("the fd keeper went away; handing the descriptors again when it is back");
                    break;
                }
                _ => {}
            }
        }
        if let Some(strong) = inner.upgrade() {
            strong.connected.store(false, Ordering::Release);
            // Whatever the new keeper holds must be sent again.
            strong.pushed.store(0, Ordering::Release);
        }
    }
}

fn conn_fd(conn: &Conn) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `conn`, which outlives the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(conn.raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::Keeper;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn descriptors_survive_the_daemon_and_are_pushed_again_to_a_new_keeper() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("keeper.sock");
        let keeper = Keeper::serve(&socket).unwrap();
        // A file stands in for /dev/fuse: the same descriptor must come back.
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"fuse connection").unwrap();
        let link = HandoverLink::start(&socket).unwrap();
        link.hold(
            "vol-a",
            file.as_fd().try_clone_to_owned().unwrap(),
            serde_json::json!({"epoch": 3}),
        );
        link.hold(
            "vol-b",
            file.as_fd().try_clone_to_owned().unwrap(),
            serde_json::json!({}),
        );
        wait_until("the push", || link.in_step());
        assert_eq!(keeper.held(), vec!["vol-a".to_string(), "vol-b".to_string()]);
        link.release("vol-b");
        wait_until("the release", || keeper.held() == vec!["vol-a".to_string()]);
        // The daemon dies: the keeper still holds its descriptors; a new daemon fetches them.
        drop(link);
        drop(file);
        let handed = fetch(&socket).unwrap();
        assert_eq!(handed.len(), 1);
        assert_eq!(handed[0].volume_id, "vol-a");
        assert_eq!(handed[0].meta["epoch"], 3);
        let mut back = std::fs::File::from(handed.into_iter().next().unwrap().fd);
        back.rewind().unwrap();
        let mut text = String::new();
        back.read_to_string(&mut text).unwrap();
        assert_eq!(text, "fuse connection");
        assert_eq!(keeper.held(), vec!["vol-a".to_string()], "fetching keeps them held");
        // The keeper restarts (a new one on the same socket): the link pushes everything again.
        let link = HandoverLink::start(&socket).unwrap();
        link.hold(
            "vol-c",
            back.as_fd().try_clone_to_owned().unwrap(),
            serde_json::json!({}),
        );
        wait_until("the first push", || keeper.held() == vec!["vol-c".to_string()]);
        drop(keeper);
        let second = Keeper::serve(&socket).unwrap();
        wait_until("the push to the new keeper", || {
            second.held() == vec!["vol-c".to_string()]
        });
    }

    #[test]
    fn no_keeper_means_no_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(fetch(&dir.path().join("absent.sock")).unwrap().is_empty());
    }
}
