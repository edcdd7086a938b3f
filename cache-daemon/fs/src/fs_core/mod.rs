//! What both filesystems are built on: the persisted state that lets a restarted daemon take
//! a kernel mount over (the operation log of inode tables, the serving epoch).

pub mod epoch;
pub mod op_log;
