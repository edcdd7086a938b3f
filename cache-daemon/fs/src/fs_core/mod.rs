//! What both filesystems are built on: the persisted state that lets a restarted daemon take
//! a kernel mount over (the operation log of inode tables, the serving epoch), the one
//! durability rule of every local log ([`AppendLog`], in granary-process), file handles that carry the serving
//! epoch ([`handles`]), passthrough or daemon reads per inode ([`io_modes`]), and starting or
//! taking over a FUSE session ([`session`]), the inode table ([`inodes`]), attributes ([`attr`]) and the paths in a
//! mount ([`paths`]).

pub use errno::ToErrno;
pub use granary_process::append_log::{AppendLog, Durability, LogOptions};

pub mod attr;
pub mod epoch;
pub mod errno;
pub mod handles;
pub mod inodes;
pub mod io_modes;
pub mod op_log;
pub mod paths;
pub mod session;
