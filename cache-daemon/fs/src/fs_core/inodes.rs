//! The inode table both filesystems keep, without its lock or its log (each filesystem adds
//! those, since they log different facts). The kernel holds a reference for each lookup it
//! was answered (lookup, create, readdirplus) and returns them with forget; an inode is dropped
//! when its count reaches zero. The root is inode 1 and is never dropped. A path can move (a
//! rename moves an inode and everything under a directory) or go (an unlinked inode keeps its
//! number but has no path, so its open files never act on a newer file of that name).

use std::collections::HashMap;

use super::paths::is_under;

pub const ROOT: u64 = 1;

/// References given to the inodes a previous daemon handed out: how many the kernel holds
/// is unknown, so they are kept until the mount goes away.
pub const INHERITED_LOOKUPS: u64 = 1 << 62;

#[derive(Debug)]
pub struct Inode<V> {
    pub path: Option<String>,
    pub lookups: u64,
    pub value: V,
}

#[derive(Debug)]
pub struct InodeTable<V> {
    by_ino: HashMap<u64, Inode<V>>,
    by_path: HashMap<String, u64>,
    next: u64,
}

impl<V> InodeTable<V> {
    /// A table holding only the root, at `root_path` ("" for a mount's root).
    pub fn new(root_path: &str, root: V) -> Self {
        let mut by_ino = HashMap::new();
        by_ino.insert(
            ROOT,
            Inode {
                path: Some(root_path.to_string()),
                lookups: 1,
                value: root,
            },
        );
        let mut by_path = HashMap::new();
        by_path.insert(root_path.to_string(), ROOT);
        InodeTable {
            by_ino,
            by_path,
            next: ROOT + 1,
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode<V>> {
        self.by_ino.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode<V>> {
        self.by_ino.get_mut(&ino)
    }

    /// The inode of a path if the kernel knows it.
    pub fn peek(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }

    /// Every inode but the root (for compacting a log).
    pub fn non_root(&self) -> impl Iterator<Item = (u64, &Inode<V>)> {
        self.by_ino
            .iter()
            .filter(|(ino, _)| **ino != ROOT)
            .map(|(i, n)| (*i, n))
    }

    /// The inode of `path` with one more kernel reference: the known one (its value then
    /// replaced by `value`), or a new one. Returns the number and whether it is new.
    pub fn remember(&mut self, path: &str, value: V) -> (u64, bool) {
        if let Some(&ino) = self.by_path.get(path) {
            if let Some(inode) = self.by_ino.get_mut(&ino) {
                inode.lookups += 1;
                inode.value = value;
                return (ino, false);
            }
        }
        let ino = self.next;
        self.next += 1;
        self.by_path.insert(path.to_string(), ino);
        self.by_ino.insert(
            ino,
            Inode {
                path: Some(path.to_string()),
                lookups: 1,
                value,
            },
        );
        (ino, true)
    }

    /// An inode a previous daemon handed out (`path` none: unlinked while open); new inodes
    /// are numbered after it.
    pub fn inherit(&mut self, ino: u64, path: Option<String>, value: V) {
        if ino == ROOT {
            return;
        }
        if let Some(path) = &path {
            self.by_path.insert(path.clone(), ino);
        }
        self.by_ino.insert(
            ino,
            Inode {
                path,
                lookups: INHERITED_LOOKUPS,
                value,
            },
        );
        self.next = self.next.max(ino + 1);
    }

    /// Gives every inode but the root the inherited count (after a replay).
    pub fn mark_inherited(&mut self) {
        for (ino, inode) in self.by_ino.iter_mut() {
            if *ino != ROOT {
                inode.lookups = INHERITED_LOOKUPS;
            }
        }
    }

    /// The kernel gave back `n` references; true when the inode is gone.
    pub fn forget(&mut self, ino: u64, n: u64) -> bool {
        if ino == ROOT {
            return false;
        }
        let gone = match self.by_ino.get_mut(&ino) {
            Some(inode) => {
                inode.lookups = inode.lookups.saturating_sub(n);
                inode.lookups == 0
            }
            None => false,
        };
        if gone {
            self.remove(ino);
        }
        gone
    }

    /// Drops `ino` whatever its count.
    pub fn remove(&mut self, ino: u64) -> Option<Inode<V>> {
        let inode = self.by_ino.remove(&ino)?;
        if let Some(path) = &inode.path {
            if self.by_path.get(path) == Some(&ino) {
                self.by_path.remove(path);
            }
        }
        Some(inode)
    }

    /// `path` was unlinked or removed: its inode keeps its number, without a path.
    pub fn unlink(&mut self, path: &str) {
        if let Some(ino) = self.by_path.remove(path) {
            if let Some(inode) = self.by_ino.get_mut(&ino) {
                inode.path = None;
            }
        }
    }

    /// `from` (and everything under it) is now at `to`; whatever was at `to` is replaced.
    pub fn rename(&mut self, from: &str, to: &str) {
        let replaced: Vec<String> = self.by_path.keys().filter(|p| is_under(p, to)).cloned().collect();
        for p in replaced {
            if let Some(ino) = self.by_path.remove(&p) {
                if let Some(inode) = self.by_ino.get_mut(&ino) {
                    inode.path = None;
                }
            }
        }
        let moving: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| is_under(p, from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moving {
            let new = format!("{to}{}", &old[from.len()..]);
            self.by_path.remove(&old);
            self.by_path.insert(new.clone(), ino);
            if let Some(inode) = self.by_ino.get_mut(&ino) {
                inode.path = Some(new);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inode_lives_until_the_kernel_forgets_every_lookup() {
        let mut t = InodeTable::new("", ());
        let (a, new) = t.remember("a", ());
        assert!(new);
        assert_eq!(t.remember("a", ()), (a, false), "one path, one inode");
        assert!(!t.forget(a, 1), "one reference left");
        assert!(t.forget(a, 1));
        assert!(t.get(a).is_none() && t.peek("a").is_none());
        assert_ne!(t.remember("a", ()).0, a, "a forgotten number is not reused");
        assert!(!t.forget(ROOT, 10));
        assert!(t.get(ROOT).is_some(), "the root stays");
    }

    #[test]
    fn renames_take_children_along_and_unlinks_keep_the_number() {
        let mut t = InodeTable::new("", ());
        let dir = t.remember("tmp", ()).0;
        let file = t.remember("tmp/a", ()).0;
        let sibling = t.remember("tmpx", ()).0;
        let replaced = t.remember("final", ()).0;
        t.rename("tmp", "final");
        assert_eq!(t.get(dir).and_then(|i| i.path.as_deref()), Some("final"));
        assert_eq!(t.get(file).and_then(|i| i.path.as_deref()), Some("final/a"));
        assert_eq!(
            t.get(sibling).and_then(|i| i.path.as_deref()),
            Some("tmpx"),
            "a common prefix is not a child"
        );
        assert_eq!(t.get(replaced).map(|i| i.path.is_none()), Some(true));
        t.unlink("final/a");
        assert!(t.get(file).is_some_and(|i| i.path.is_none()));
        assert_ne!(
            t.remember("final/a", ()).0,
            file,
            "a new file of that name is a new inode"
        );
        t.inherit(40, Some("old".into()), ());
        assert!(t.remember("new", ()).0 > 40, "numbered after inherited inodes");
        assert!(!t.forget(40, 1_000), "inherited counts are unknown, so kept");
    }
}
