//! How each inode's open files are served, kept consistent the way the kernel demands: an
//! inode is either read through the daemon (cached mode, page cache) or through one
//! passthrough backing file, never both at once, and all passthrough opens of an inode share
//! one backing file. The kernel fails an open that breaks this with EIO, so a file that
//! became complete locally while a reader had it open through the daemon is opened through
//! the daemon until every such reader has closed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fuser::BackingId;

enum Mode {
    Cached(u64),
    Passthrough(Arc<BackingId>, u64),
}

/// How an open was served.
pub enum Opened {
    Cached,
    Passthrough(Arc<BackingId>),
}

#[derive(Default)]
pub struct IoModes {
    inodes: Mutex<HashMap<u64, Mode>>,
}

impl IoModes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Mode>> {
        self.inodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides how to open `ino`: joins the mode of its other open files, or, when it has
    /// none, uses passthrough if `register` gives a backing file.
    pub fn open(&self, ino: u64, register: impl FnOnce() -> Option<BackingId>) -> Opened {
        let mut inodes = self.lock();
        match inodes.get_mut(&ino) {
            Some(Mode::Cached(n)) => {
                *n += 1;
                Opened::Cached
            }
            Some(Mode::Passthrough(id, n)) => {
                *n += 1;
                Opened::Passthrough(Arc::clone(id))
            }
            None => match register() {
                Some(id) => {
                    let id = Arc::new(id);
                    inodes.insert(ino, Mode::Passthrough(Arc::clone(&id), 1));
                    Opened::Passthrough(id)
                }
                None => {
                    inodes.insert(ino, Mode::Cached(1));
                    Opened::Cached
                }
            },
        }
    }

    /// One open file of `ino` was released.
    pub fn release(&self, ino: u64) {
        let mut inodes = self.lock();
        let last = match inodes.get_mut(&ino) {
            Some(Mode::Cached(n)) | Some(Mode::Passthrough(_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            // The backing file's registration ends here (BackingId's drop), outside no lock
            // the kernel could need.
            let gone = inodes.remove(&ino);
            drop(inodes);
            drop(gone);
        }
    }
}
