//! Which version of each file the kernel's page cache may hold. The page cache belongs to
//! the inode, not to an open file: a handle can be given pages that another handle's reads
//! put there, without the daemon seeing the read. So a file replaced in the store must not
//! be read through pages of its old version: an open of a new version drops them (an open
//! without `FOPEN_KEEP_CACHE`), or, while handles of the old version still read through
//! them, bypasses them (`FOPEN_DIRECT_IO`); and a handle may move to a new version (see
//! `DatasetFs::adopt_new_version`) only when no page of the old one can have reached it.

use std::collections::HashMap;
use std::sync::Mutex;

/// How an open file uses the kernel's page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCacheMode {
    /// Keep the inode's cached pages: they are of this handle's version.
    Keep,
    /// Drop the inode's cached pages at this open: they may be of another version.
    Drop,
    /// Past the page cache: other open files read another version through it.
    Direct,
}

struct Pages {
    /// The version the cached pages are of.
    version: String,
    /// Open files reading through the page cache (modes `Keep` and `Drop`).
    open: u64,
    /// Whether a read through the page cache returned bytes since the pages were dropped.
    filled: bool,
}

#[derive(Default)]
pub struct KernelPages {
    inodes: Mutex<HashMap<u64, Pages>>,
}

impl KernelPages {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pages>> {
        self.inodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens `ino` at `version` through the daemon. An inode not seen before drops its pages
    /// (after a take-over the kernel may hold pages of a version this daemon never served;
    /// dropping none costs nothing).
    pub fn open(&self, ino: u64, version: &str) -> PageCacheMode {
        let mut inodes = self.lock();
        match inodes.get_mut(&ino) {
            Some(pages) if pages.version == version => {
                pages.open += 1;
                PageCacheMode::Keep
            }
            Some(pages) if pages.open > 0 => PageCacheMode::Direct,
            _ => {
                inodes.insert(
                    ino,
                    Pages {
                        version: version.to_string(),
                        open: 1,
                        filled: false,
                    },
                );
                PageCacheMode::Drop
            }
        }
    }

    /// A handle a previous daemon opened (before a take-over), now read at `version`. What
    /// it was given is unknown, so its pages count as filled.
    pub fn inherited(&self, ino: u64, version: &str) -> PageCacheMode {
        let mut inodes = self.lock();
        let pages = inodes.entry(ino).or_insert_with(|| Pages {
            version: version.to_string(),
            open: 0,
            filled: true,
        });
        if pages.version != version {
            return PageCacheMode::Direct;
        }
        pages.open += 1;
        pages.filled = true;
        PageCacheMode::Keep
    }

    /// An open file of `ino` opened in `mode` was released.
    pub fn release(&self, ino: u64, mode: PageCacheMode) {
        if mode == PageCacheMode::Direct {
            return;
        }
        if let Some(pages) = self.lock().get_mut(&ino) {
            pages.open = pages.open.saturating_sub(1);
        }
    }

    /// A read through the page cache returned bytes of `version`: the kernel may now hold them.
    pub fn filled(&self, ino: u64, mode: PageCacheMode, version: &str) {
        if mode == PageCacheMode::Direct {
            return;
        }
        if let Some(pages) = self.lock().get_mut(&ino) {
            if pages.version == version && !pages.filled {
                pages.filled = true;
            }
        }
    }

    /// Whether a handle of `ino` opened in `mode` at `old`, which has returned no byte, may
    /// read `new` instead: only when no page of `old` can have reached it, that is, it reads
    /// past the page cache, or it is the only handle reading through it and none was filled.
    /// The pages are then `new`'s.
    pub fn try_move(&self, ino: u64, mode: PageCacheMode, old: &str, new: &str) -> bool {
        if mode == PageCacheMode::Direct {
            return true;
        }
        match self.lock().get_mut(&ino) {
            Some(pages) if pages.version == old && pages.open == 1 && !pages.filled => {
                pages.version = new.to_string();
                true
            }
            _ => false,
        }
    }

    /// The kernel forgot `ino`, and its pages with it.
    pub fn forget(&self, ino: u64) {
        self.lock().remove(&ino);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PageCacheMode::*;

    #[test]
    fn a_new_version_drops_the_pages_or_reads_past_them_while_the_old_is_open() {
        let pages = KernelPages::default();
        assert_eq!(pages.open(7, "v1"), Drop, "pages of unknown origin are dropped");
        pages.filled(7, Drop, "v1");
        assert_eq!(pages.open(7, "v1"), Keep, "the same version keeps them");
        assert_eq!(pages.open(7, "v2"), Direct, "v1 is still read through them");
        pages.release(7, Drop);
        pages.release(7, Keep);
        pages.release(7, Direct);
        assert_eq!(pages.open(7, "v2"), Drop, "no v1 reader left: v2 drops them");
        assert_eq!(pages.open(7, "v2"), Keep);
        pages.forget(7);
        assert_eq!(pages.len(), 0, "a forgotten inode holds nothing");
    }

    #[test]
    fn a_handle_moves_to_a_new_version_only_if_no_old_page_can_have_reached_it() {
        let pages = KernelPages::default();
        assert_eq!(pages.open(1, "v1"), Drop);
        assert!(pages.try_move(1, Drop, "v1", "v2"), "alone and nothing filled");
        assert_eq!(pages.open(1, "v2"), Keep, "the pages are v2's now");

        pages.open(2, "v1");
        pages.filled(2, Drop, "v1");
        pages.release(2, Drop);
        let mode = pages.open(2, "v1");
        assert_eq!(mode, Keep);
        assert!(
            !pages.try_move(2, mode, "v1", "v2"),
            "v1 pages may have been read by this handle without the daemon seeing it"
        );

        pages.open(3, "v1");
        pages.open(3, "v1");
        assert!(
            !pages.try_move(3, Keep, "v1", "v2"),
            "another v1 reader would get v2 pages"
        );
        assert!(
            pages.try_move(3, Direct, "v1", "v2"),
            "a direct handle never sees pages"
        );
    }
}
