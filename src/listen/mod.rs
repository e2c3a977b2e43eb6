//! Getting the listening sockets: inherit them from the service manager (`sd_listen_fds(3)`)
//! or bind what `--listen` names, and, with `--reuseport`, one sibling socket per worker slot.
//!
//! Sockets are created blocking and close-on-exec. This module must never set O_NONBLOCK on a
//! listening socket (the open file description is shared with every worker) and never accept.
//!
//! One file per concern: [`spec`] (what `--listen` says), [`mod@inherit`] (what LISTEN_* say),
//! [`mod@bind`] (binding, and `--reuseport` siblings), [`set`] (the sockets each slot gets),
//! [`queue`] (what still waits on a removed slot's socket).

mod bind;
mod inherit;
mod queue;
mod set;
mod spec;

#[cfg(test)]
mod tests;

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use socket2::SockAddr;
use thiserror::Error;

use inherit::FDNAME_MAX;

pub use bind::{bind, has_reuseport, listener, sibling};
pub use inherit::{check_no_extra_fd, inherit_fds, validate_inherited, InheritedEnv};
pub use set::{RetiredParts, SiblingChange, SocketSet, SteerParts};
pub use spec::{Addr, ListenSpec};

/// The first inherited fd, `SD_LISTEN_FDS_START`.
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("cannot bind {addr}: address already in use")]
    InUse { addr: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{path}: exists and is not a socket; refusing to remove it")]
    NotASocketFile { path: String },
    #[error("LISTEN_FDS={value}: not a number (decimal digits only)")]
    FdsNotANumber { value: String },
    #[error("LISTEN_FDS={value}: out of range (at most {max} inherited sockets)")]
    FdsOutOfRange { value: String, max: usize },
    #[error("LISTEN_PID={value}: not a number (a process id in decimal digits)")]
    PidNotANumber { value: String },
    #[error("LISTEN_FDS={count} but fd {fd} is not open")]
    FdMissing { count: usize, fd: RawFd },
    #[error(
        "LISTEN_FDS={count} but fd {fd} is also open: the count does not match the fds that exist"
    )]
    FdsMismatch { count: usize, fd: RawFd },
    #[error("inherited fd {fd} is not a socket")]
    NotASocket { fd: RawFd },
    #[error(
        "inherited fd {fd} is a stream socket that is not listening (Accept=yes is not supported)"
    )]
    NotListening { fd: RawFd },
    #[error("LISTEN_FDNAMES has {names} names but LISTEN_FDS={count}")]
    NamesCount { names: usize, count: usize },
    #[error("LISTEN_FDNAMES: name {index} of {count} is {len} bytes long (at most {FDNAME_MAX})")]
    NameTooLong {
        index: usize,
        count: usize,
        len: usize,
    },
    #[error(
        "LISTEN_FDNAMES: name {index} of {count} has a control or non-ASCII byte \
         (names are printable ASCII, sd_listen_fds_with_names(3))"
    )]
    NameInvalid { index: usize, count: usize },
    #[error("--reuseport: inherited fd {fd} ({name}) has no SO_REUSEPORT; set ReusePort=yes in the .socket unit")]
    NoReusePort { fd: RawFd, name: String },
    #[error(
        "--reuseport: inherited fd {fd} ({name}) belongs to uid {owner} but herder runs as uid \
         {euid}; SO_REUSEPORT siblings must be bound by the socket's own uid (run herder as that \
         user, or leave out --reuseport)"
    )]
    ReusePortOwner {
        fd: RawFd,
        name: String,
        owner: u32,
        euid: u32,
    },
    #[error("cannot inspect fd {fd}: {source}")]
    Inspect { fd: RawFd, source: nix::Error },
}

/// One listening socket herder holds, in the order workers see them (fd 3, 4, …).
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub name: String,
    /// What to show in logs and status: the bound address.
    pub display: String,
    /// A unix socket file herder created and removes on exit.
    pub owned_path: Option<PathBuf>,
    /// Whether a per-slot SO_REUSEPORT sibling can be bound (TCP and UDP).
    pub reusable: bool,
}

impl Listener {
    pub fn remove_owned_path(&self) {
        if let Some(p) = &self.owned_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// A socket address as logs and `/status` show it.
fn describe(addr: &SockAddr) -> String {
    if let Some(a) = addr.as_socket() {
        return a.to_string();
    }
    if let Some(p) = addr.as_pathname() {
        return format!("unix:{}", p.display());
    }
    if let Some(n) = addr.as_abstract_namespace() {
        return format!("unix:@{}", String::from_utf8_lossy(n));
    }
    "unix:(unnamed)".into()
}

fn is_socket(fd: RawFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}
