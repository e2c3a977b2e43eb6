//! Whether a socket back from the fd store is what herder asks for now: the facts about an fd
//! (fstat, SO_TYPE, SO_ACCEPTCONN, SO_REUSEPORT, getsockname), read once, then judged by a pure
//! function. A name says what a socket was stored as; only these facts say what it is.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt, SockType};
use socket2::SockRef;

use crate::listen::Addr;

/// What an fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub socket: bool,
    pub ty: Option<SockType>,
    pub listening: bool,
    pub reuseport: bool,
    /// The uid that created it (its sockfs inode's owner, as `listen::set` reads it too).
    pub owner: u32,
    /// Where it is bound (inet addresses as `Tcp`/`Udp` by SO_TYPE).
    pub local: Option<Addr>,
    /// For a socket bound to a path: whether a socket file is still there.
    pub file: bool,
}

/// What herder wants a stored socket to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want<'a> {
    /// What `--listen` (or `--health`, with `reuseport` false) asks for; port 0 takes any port.
    Asked { addr: &'a Addr, reuseport: bool },
    /// A SO_REUSEPORT sibling of a listener bound to exactly `addr`.
    SiblingOf { addr: &'a Addr },
}

/// Why a stored socket is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    NotASocket,
    Type,
    NotListening,
    Address { found: Option<String> },
    ReusePort { want: bool },
    Owner { owner: u32 },
    FileGone,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::NotASocket => write!(f, "not a socket"),
            Mismatch::Type => write!(f, "a socket of another type"),
            Mismatch::NotListening => write!(f, "a stream socket that is not listening"),
            Mismatch::Address { found: Some(a) } => write!(f, "bound to {a} instead"),
            Mismatch::Address { found: None } => write!(f, "not bound to an address"),
            Mismatch::ReusePort { want: true } => write!(f, "without SO_REUSEPORT"),
            Mismatch::ReusePort { want: false } => write!(f, "with SO_REUSEPORT"),
            Mismatch::Owner { owner } => write!(f, "created by uid {owner}, not herder's"),
            Mismatch::FileGone => write!(f, "its socket file is gone"),
        }
    }
}

/// Reads the facts about `fd`; nothing on it changes.
pub fn inspect(fd: BorrowedFd<'_>) -> Facts {
    let stat = nix::sys::stat::fstat(fd.as_raw_fd()).ok();
    let socket = stat.is_some_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK);
    let owner = stat.map_or(u32::MAX, |s| s.st_uid);
    if !socket {
        return Facts {
            socket,
            ty: None,
            listening: false,
            reuseport: false,
            owner,
            local: None,
            file: false,
        };
    }
    let ty = getsockopt(&fd, sockopt::SockType).ok();
    let local = SockRef::from(&fd)
        .local_addr()
        .ok()
        .and_then(|a| match (a.as_socket(), ty) {
            (Some(s), Some(SockType::Stream)) => Some(Addr::Tcp(s)),
            (Some(s), Some(SockType::Datagram)) => Some(Addr::Udp(s)),
            (Some(_), _) => None,
            (None, _) => a
                .as_pathname()
                .map(|p| Addr::UnixPath(p.to_path_buf()))
                .or_else(|| {
                    a.as_abstract_namespace()
                        .map(|n| Addr::UnixAbstract(n.to_vec()))
                }),
        });
    let file = match &local {
        Some(Addr::UnixPath(p)) => is_socket_file(p),
        _ => false,
    };
    Facts {
        socket,
        ty,
        listening: getsockopt(&fd.as_fd(), sockopt::AcceptConn).unwrap_or(false),
        reuseport: getsockopt(&fd.as_fd(), sockopt::ReusePort).unwrap_or(false),
        owner,
        local,
        file,
    }
}

fn is_socket_file(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether a socket with these facts can serve as `want` for a herder running as `euid`.
pub fn judge(want: &Want<'_>, facts: &Facts, euid: u32) -> Result<(), Mismatch> {
    if !facts.socket {
        return Err(Mismatch::NotASocket);
    }
    let (addr, reuseport) = match want {
        Want::Asked { addr, reuseport } => (*addr, *reuseport),
        Want::SiblingOf { addr } => (*addr, true),
    };
    let ty = match addr {
        Addr::Udp(_) => SockType::Datagram,
        Addr::Tcp(_) | Addr::UnixPath(_) | Addr::UnixAbstract(_) => SockType::Stream,
    };
    if facts.ty != Some(ty) {
        return Err(Mismatch::Type);
    }
    if ty == SockType::Stream && !facts.listening {
        return Err(Mismatch::NotListening);
    }
    let exact = matches!(want, Want::SiblingOf { .. });
    if !facts.local.as_ref().is_some_and(|l| same(addr, l, exact)) {
        return Err(Mismatch::Address {
            found: facts.local.as_ref().map(ToString::to_string),
        });
    }
    // Only an inet socket can have siblings; SO_REUSEPORT on one says whether others may join.
    let inet = matches!(addr, Addr::Tcp(_) | Addr::Udp(_));
    if inet && facts.reuseport != reuseport {
        return Err(Mismatch::ReusePort { want: reuseport });
    }
    // The kernel lets only a socket's own uid bind into its SO_REUSEPORT group (socket(7)):
    // one made by another uid (a DynamicUser= that got another uid this time) could never get
    // siblings. Without SO_REUSEPORT, who made it does not matter.
    if inet && reuseport && facts.owner != euid {
        return Err(Mismatch::Owner { owner: facts.owner });
    }
    if matches!(addr, Addr::UnixPath(_)) && !facts.file {
        // Bound to a path nobody can connect to any more.
        return Err(Mismatch::FileGone);
    }
    Ok(())
}

/// Whether a socket bound to `found` is bound to what `want` names (`exact`: the port too,
/// even when `want` says 0).
fn same(want: &Addr, found: &Addr, exact: bool) -> bool {
    match (want, found) {
        (Addr::Tcp(w), Addr::Tcp(f)) | (Addr::Udp(w), Addr::Udp(f)) => {
            let port = f.port() == w.port() || (!exact && w.port() == 0);
            let scope = match (w, f) {
                (std::net::SocketAddr::V6(w), std::net::SocketAddr::V6(f)) => {
                    w.scope_id() == f.scope_id()
                }
                _ => true,
            };
            w.ip() == f.ip() && port && scope
        }
        (Addr::UnixPath(w), Addr::UnixPath(f)) => w == f,
        (Addr::UnixAbstract(w), Addr::UnixAbstract(f)) => w == f,
        _ => false,
    }
}
