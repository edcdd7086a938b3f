//! Attributes of files the kernel sees that no local file backs (a dataset's files, a
//! checkpoint file only the store has): one time for all four, 512-byte blocks, one link per
//! file and two per directory.

use std::time::SystemTime;

use fuser::{FileAttr, FileType, INodeNo};

/// Who owns what a mount shows.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

pub fn synthetic(ino: u64, is_dir: bool, size: u64, perm: u16, owner: Owner, mtime: SystemTime) -> FileAttr {
    let (kind, nlink) = if is_dir {
        (FileType::Directory, 2)
    } else {
        (FileType::RegularFile, 1)
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid: owner.uid,
        gid: owner.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}
