//! What both filesystems are built on: the persisted state that lets a restarted daemon take
//! a kernel mount over (the operation log of inode tables, the serving epoch), and the one
//! durability rule of every local log ([`append_log`]).

pub use append_log::{AppendLog, Durability, LogOptions};

pub mod append_log;
pub mod epoch;
pub mod op_log;
