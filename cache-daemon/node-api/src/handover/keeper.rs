//! The keeper: holds the node daemon's /dev/fuse descriptors while the daemon is gone, so
//! the kernel keeps its mounts and queues their requests. granary-csi runs it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use nix::sys::socket::Shutdown;

use super::wire::{self, Conn, Message};

type Held = Arc<Mutex<BTreeMap<String, (OwnedFd, serde_json::Value)>>>;

pub struct Keeper {
    held: Held,
    socket: PathBuf,
    listener: Arc<OwnedFd>,
    conns: Arc<Mutex<Vec<Weak<Conn>>>>,
    stopped: Arc<AtomicBool>,
}

impl Keeper {
    /// Listens on `socket` and serves it on background threads for the life of the process.
    pub fn serve(socket: &Path) -> io::Result<Keeper> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = Arc::new(wire::listen(socket)?);
        let held: Held = Arc::default();
        let conns: Arc<Mutex<Vec<Weak<Conn>>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let (shared, accepting, open, stop) = (
            Arc::clone(&held),
            Arc::clone(&listener),
            Arc::clone(&conns),
            Arc::clone(&stopped),
        );
        std::thread::Builder::new()
            .name("fd-keeper".into())
            .spawn(move || loop {
                let accepted = wire::accept(&accepting);
                if stop.load(Ordering::Acquire) {
                    return;
                }
                match accepted {
                    Ok(conn) => {
                        let conn = Arc::new(conn);
                        let mut list = open.lock().unwrap_or_else(|p| p.into_inner());
                        list.retain(|c| c.strong_count() > 0);
                        list.push(Arc::downgrade(&conn));
                        let held = Arc::clone(&shared);
                        let _ = std::thread::Builder::new()
                            .name("fd-keeper-conn".into())
                            .spawn(move || serve_conn(conn, held));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the fd keeper cannot accept a connection");
                        std::thread::sleep(std::time::Duration::from_millis(200));
                    }
                }
            })?;
        tracing::info!(socket = %socket.display(), "holding the node daemon's FUSE descriptors");
        Ok(Keeper {
            held,
            socket: socket.to_path_buf(),
            listener,
            conns,
            stopped,
        })
    }

    /// The volumes whose descriptors are held.
    pub fn held(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// Stopping the keeper is what its process's death does: connections close, and the
/// descriptors are let go once the connection threads end.
impl Drop for Keeper {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), Shutdown::Both);
        for conn in self.conns.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(conn) = conn.upgrade() {
                conn.shutdown();
            }
        }
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

fn serve_conn(conn: Arc<Conn>, held: Held) {
    loop {
        let (message, fd) = match conn.recv() {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "fd keeper connection ended");
                return;
            }
        };
        let answer = handle(&conn, message, fd, &held);
        let reply = match answer {
            Ok(()) => Message::Ok,
            Err(e) => Message::Error { message: e.to_string() },
        };
        if conn.send(&reply, None).is_err() {
            return;
        }
    }
}

fn handle(conn: &Conn, message: Message, fd: Option<OwnedFd>, held: &Held) -> io::Result<()> {
    let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
    match message {
        Message::Hold { volume_id, meta } => {
            let fd = fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "Hold without a descriptor"))?;
            tracing::debug!(volume_id, "holding a FUSE descriptor");
            held.insert(volume_id, (fd, meta));
        }
        Message::Release { volume_id } => {
            held.remove(&volume_id);
        }
        Message::Keep { volume_ids } => {
            held.retain(|id, _| volume_ids.contains(id));
        }
        Message::Fetch => {
            for (volume_id, (fd, meta)) in held.iter() {
                conn.send(
                    &Message::Held {
                        volume_id: volume_id.clone(),
                        meta: meta.clone(),
                    },
                    Some(fd.as_raw_fd()),
                )?;
            }
            conn.send(&Message::End, None)?;
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the keeper does not take {other:?}"),
            ))
        }
    }
    Ok(())
}
