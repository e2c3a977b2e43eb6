//! Binding what `--listen` names, and the per-slot SO_REUSEPORT siblings of a socket.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};

use super::{describe, Addr, ListenError, ListenSpec, Listener};

/// Binds one `--listen` socket. `reuseport` sets SO_REUSEPORT so that per-slot siblings can
/// join it.
pub fn bind(spec: &ListenSpec, reuseport: bool) -> Result<Listener, ListenError> {
    let shown = spec.addr.to_string();
    let sock = match &spec.addr {
        Addr::Tcp(a) => bind_inet(*a, true, reuseport, &shown)?,
        Addr::Udp(a) => bind_inet(*a, false, reuseport, &shown)?,
        Addr::UnixPath(p) => {
            remove_stale(p)?;
            bind_unix(&unix_addr(p.clone(), &shown)?, &shown)?
        }
        Addr::UnixAbstract(n) => {
            // socket2 takes an abstract name as a path with a leading NUL (unix(7)).
            let raw: Vec<u8> = std::iter::once(0).chain(n.iter().copied()).collect();
            bind_unix(
                &unix_addr(PathBuf::from(OsString::from_vec(raw)), &shown)?,
                &shown,
            )?
        }
    };
    Ok(listener(spec, sock.into()))
}

/// The [`Listener`] for `spec` over a socket already bound to what it names: one [`bind`] just
/// made, or one herder kept in systemd's fd store (src/fdstore.rs checks that it matches).
pub fn listener(spec: &ListenSpec, fd: OwnedFd) -> Listener {
    let name = spec.name.clone().unwrap_or_else(|| "unknown".into());
    let shown = spec.addr.to_string();
    let bound = |fd: &OwnedFd| {
        socket2::SockRef::from(fd)
            .local_addr()
            .ok()
            .map(|l| describe(&l))
    };
    let (display, owned_path, reusable) = match &spec.addr {
        Addr::Tcp(_) => (bound(&fd).unwrap_or(shown), None, true),
        Addr::Udp(_) => (format!("udp:{}", bound(&fd).unwrap_or(shown)), None, true),
        Addr::UnixPath(p) => (shown, Some(p.clone()), false),
        Addr::UnixAbstract(_) => (shown, None, false),
    };
    Listener {
        fd,
        name,
        display,
        owned_path,
        reusable,
    }
}

/// A unix socket address for `path` (a leading NUL: the abstract namespace).
fn unix_addr(path: PathBuf, shown: &str) -> Result<SockAddr, ListenError> {
    SockAddr::unix(path).map_err(|source| ListenError::Bind {
        addr: shown.to_string(),
        source,
    })
}

fn bind_error(addr: &str, source: std::io::Error) -> ListenError {
    if source.raw_os_error() == Some(libc::EADDRINUSE) {
        ListenError::InUse {
            addr: addr.to_string(),
        }
    } else {
        ListenError::Bind {
            addr: addr.to_string(),
            source,
        }
    }
}

fn bind_inet(
    a: SocketAddr,
    stream: bool,
    reuseport: bool,
    shown: &str,
) -> Result<Socket, ListenError> {
    let ty = if stream { Type::STREAM } else { Type::DGRAM };
    let sock = Socket::new(Domain::for_address(a), ty, None).map_err(|e| bind_error(shown, e))?;
    if stream {
        // So a restarted herder can bind while old connections sit in TIME_WAIT.
        sock.set_reuse_address(true)
            .map_err(|e| bind_error(shown, e))?;
    }
    if reuseport {
        sock.set_reuse_port(true)
            .map_err(|e| bind_error(shown, e))?;
    }
    sock.bind(&a.into()).map_err(|e| bind_error(shown, e))?;
    if stream {
        sock.listen(libc::SOMAXCONN)
            .map_err(|source| ListenError::Listen {
                addr: shown.to_string(),
                source,
            })?;
    }
    Ok(sock)
}

fn bind_unix(addr: &SockAddr, shown: &str) -> Result<Socket, ListenError> {
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|e| bind_error(shown, e))?;
    sock.bind(addr).map_err(|e| bind_error(shown, e))?;
    sock.listen(libc::SOMAXCONN)
        .map_err(|source| ListenError::Listen {
            addr: shown.to_string(),
            source,
        })?;
    Ok(sock)
}

/// A socket file nobody listens on is left over from an earlier run: remove it. A live one is
/// "in use"; anything that is not a socket is not ours to delete.
fn remove_stale(path: &std::path::Path) -> Result<(), ListenError> {
    let shown = format!("unix:{}", path.display());
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocketFile {
            path: path.display().to_string(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenError::InUse { addr: shown }),
        Err(_) => std::fs::remove_file(path).map_err(|source| ListenError::Bind {
            addr: shown,
            source,
        }),
    }
}

/// A new SO_REUSEPORT socket bound to the same address as `of` (for one worker slot).
pub fn sibling(of: &Listener) -> Result<OwnedFd, ListenError> {
    let probe = socket2::SockRef::from(&of.fd);
    let local = probe.local_addr().map_err(|e| bind_error(&of.display, e))?;
    let stream = probe.r#type().map_err(|e| bind_error(&of.display, e))? == Type::STREAM;
    let a = local
        .as_socket()
        .ok_or_else(|| bind_error(&of.display, std::io::ErrorKind::Unsupported.into()))?;
    let sock = bind_inet(a, stream, true, &of.display)?;
    Ok(sock.into())
}

/// Whether an inherited socket can take per-slot siblings (systemd's ReusePort=yes).
pub fn has_reuseport(l: &Listener) -> bool {
    getsockopt(&l.fd, sockopt::ReusePort).unwrap_or(false)
}
