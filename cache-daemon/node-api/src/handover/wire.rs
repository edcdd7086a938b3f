//! The keeper protocol: one JSON message per SOCK_SEQPACKET packet, a descriptor riding
//! along as SCM_RIGHTS where the message says so.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use serde::{Deserialize, Serialize};

/// Largest message: a Keep of many volume ids still fits.
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Message {
    /// Daemon → keeper, with a descriptor: hold it for `volume_id` (replacing any before).
    Hold {
        volume_id: String,
        meta: serde_json::Value,
    },
    /// Daemon → keeper: close what is held for `volume_id`.
    Release {
        volume_id: String,
    },
    /// Daemon → keeper: close everything not named here.
    Keep {
        volume_ids: Vec<String>,
    },
    /// Daemon → keeper: send back every descriptor held (they stay held).
    Fetch,
    /// Keeper → daemon, with a descriptor: one answer to Fetch.
    Held {
        volume_id: String,
        meta: serde_json::Value,
    },
    /// Keeper → daemon: the last answer to Fetch.
    End,
    Ok,
    Error {
        message: String,
    },
}

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A connected keeper-protocol socket.
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    pub fn connect(path: &Path) -> io::Result<Conn> {
        let fd =
            socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(nix_err)?;
        let addr = UnixAddr::new(path).map_err(nix_err)?;
        socket::connect(fd.as_raw_fd(), &addr).map_err(nix_err)?;
        Ok(Conn { fd })
    }

    /// Ends the connection for both sides (the peer reads end-of-file).
    pub fn shutdown(&self) {
        let _ = socket::shutdown(self.fd.as_raw_fd(), socket::Shutdown::Both);
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sets how long a receive may wait.
    pub fn set_timeout(&self, timeout: std::time::Duration) -> io::Result<()> {
        let tv = nix::sys::time::TimeVal::new(timeout.as_secs() as i64, timeout.subsec_micros() as i64);
        socket::setsockopt(&self.fd, socket::sockopt::ReceiveTimeout, &tv).map_err(nix_err)
    }

    pub fn send(&self, message: &Message, fd: Option<RawFd>) -> io::Result<()> {
        let body = serde_json::to_vec(message).map_err(io::Error::other)?;
        let iov = [IoSlice::new(&body)];
        let fds = fd.map(|f| [f]);
        let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        socket::sendmsg::<UnixAddr>(self.fd.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)
            .map_err(nix_err)?;
        Ok(())
    }

    /// The next message and the descriptor it carried; `None` when the peer closed.
    pub fn recv(&self) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<UnixAddr>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(nix_err)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(nix_err)? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: SCM_RIGHTS installed these descriptors in this process just now,
                    // and nothing else owns them.
                    fds.extend(received.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            (msg.bytes, fds)
        };
        if len == 0 {
            return Ok(None);
        }
        let message = serde_json::from_slice(&buf[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad keeper message: {e}")))?;
        Ok(Some((message, fds.into_iter().next())))
    }

    /// Sends `message` and waits for Ok.
    pub fn call(&self, message: &Message, fd: Option<RawFd>) -> io::Result<()> {
        self.send(message, fd)?;
        match self.recv()? {
            Some((Message::Ok, _)) => Ok(()),
            Some((Message::Error { message }, _)) => Err(io::Error::other(message)),
            Some((other, _)) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected keeper answer {other:?}"),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the keeper closed the connection",
            )),
        }
    }
}

/// A listening keeper socket.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(nix_err)?;
    // A socket file left by a previous run would refuse the bind.
    let _ = std::fs::remove_file(path);
    let addr = UnixAddr::new(path).map_err(nix_err)?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(nix_err)?;
    socket::listen(&fd, Backlog::new(16).map_err(nix_err)?).map_err(nix_err)?;
    Ok(fd)
}

pub fn accept(listener: &OwnedFd) -> io::Result<Conn> {
    let fd = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(nix_err)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(Conn {
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
    })
}
