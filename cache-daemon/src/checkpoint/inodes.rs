//! Inode numbers for the paths of a read-write mount. Like the dataset mount's table, an
//! inode lives while the kernel holds lookups on it; unlike it, paths change: a rename moves
//! an inode (and everything under a directory) to new paths, and an unlinked inode keeps
//! its number but has no path, so its open files never act on a newer file of that name.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::tracker::is_under;

pub const ROOT: u64 = 1;

struct Inode {
    path: Option<String>,
    lookups: u64,
}

struct Table {
    by_ino: HashMap<u64, Inode>,
    by_path: HashMap<String, u64>,
    next: u64,
}

pub struct PathInodes {
    table: Mutex<Table>,
}

impl Default for PathInodes {
    fn default() -> Self {
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT,
            Inode {
                path: Some(String::new()),
                lookups: 1,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(String::new(), ROOT);
        PathInodes {
            table: Mutex::new(Table {
                by_ino,
                by_path,
                next: ROOT + 1,
            }),
        }
    }
}

impl PathInodes {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The inode of `path`, with one more kernel reference.
    pub fn remember(&self, path: &str) -> u64 {
        let mut t = self.lock();
        if let Some(&ino) = t.by_path.get(path) {
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.lookups += 1;
                return ino;
            }
        }
        let ino = t.next;
        t.next += 1;
        t.by_path.insert(path.to_string(), ino);
        t.by_ino.insert(
            ino,
            Inode {
                path: Some(path.to_string()),
                lookups: 1,
            },
        );
        ino
    }

    pub fn path(&self, ino: u64) -> Option<String> {
        self.lock().by_ino.get(&ino).and_then(|i| i.path.clone())
    }

    pub fn peek(&self, path: &str) -> Option<u64> {
        self.lock().by_path.get(path).copied()
    }

    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let mut t = self.lock();
        let gone = match t.by_ino.get_mut(&ino) {
            Some(inode) => {
                inode.lookups = inode.lookups.saturating_sub(n);
                inode.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(Inode { path: Some(path), .. }) = t.by_ino.remove(&ino) {
                if t.by_path.get(&path) == Some(&ino) {
                    t.by_path.remove(&path);
                }
            }
        }
    }

    /// `path` was unlinked or removed.
    pub fn unlinked(&self, path: &str) {
        let mut t = self.lock();
        if let Some(ino) = t.by_path.remove(path) {
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.path = None;
            }
        }
    }

    /// `from` (and everything under it) is now at `to`; whatever was at `to` is replaced.
    pub fn renamed(&self, from: &str, to: &str) {
        let mut t = self.lock();
        // Whatever `to` named before is gone.
        let replaced: Vec<String> = t.by_path.keys().filter(|p| is_under(p, to)).cloned().collect();
        for p in replaced {
            if let Some(ino) = t.by_path.remove(&p) {
                if let Some(inode) = t.by_ino.get_mut(&ino) {
                    inode.path = None;
                }
            }
        }
        let moving: Vec<(String, u64)> = t
            .by_path
            .iter()
            .filter(|(p, _)| is_under(p, from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moving {
            let new = format!("{to}{}", &old[from.len()..]);
            t.by_path.remove(&old);
            t.by_path.insert(new.clone(), ino);
            if let Some(inode) = t.by_ino.get_mut(&ino) {
                inode.path = Some(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_directory_takes_its_children_along() {
        let inodes = PathInodes::default();
        let dir = inodes.remember("tmp");
        let file = inodes.remember("tmp/a");
        let other = inodes.remember("tmpx");
        let old_target = inodes.remember("final");
        inodes.renamed("tmp", "final");
        assert_eq!(inodes.path(dir).as_deref(), Some("final"));
        assert_eq!(inodes.path(file).as_deref(), Some("final/a"));
        assert_eq!(
            inodes.path(other).as_deref(),
            Some("tmpx"),
            "a sibling with a common prefix stays"
        );
        assert_eq!(inodes.path(old_target), None, "the replaced inode has no path");
        inodes.unlinked("final/a");
        assert_eq!(inodes.path(file), None);
        assert_ne!(
            inodes.remember("final/a"),
            file,
            "a new file of that name is a new inode"
        );
    }
}
