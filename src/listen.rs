//! Getting the listening sockets: inherit them from the service manager (`sd_listen_fds(3)`)
//! or bind what `--listen` names, and, with `--reuseport`, one sibling socket per worker slot.
//!
//! Sockets are created blocking and close-on-exec. This module must never set O_NONBLOCK on a
//! listening socket (the open file description is shared with every worker) and never accept.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;

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
    #[error("LISTEN_FDS={value}: not a number")]
    FdsNotANumber { value: String },
    #[error("LISTEN_PID={value}: not a number")]
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
    #[error("--reuseport: inherited fd {fd} ({name}) has no SO_REUSEPORT; set ReusePort=yes in the .socket unit")]
    NoReusePort { fd: RawFd, name: String },
    #[error("cannot inspect fd {fd}: {source}")]
    Inspect { fd: RawFd, source: nix::Error },
}

/// One `--listen` argument: `[NAME=]ADDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    pub name: Option<String>,
    pub addr: Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    UnixPath(PathBuf),
    UnixAbstract(Vec<u8>),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Udp(a) => write!(f, "udp:{a}"),
            Addr::UnixPath(p) => write!(f, "unix:{}", p.display()),
            Addr::UnixAbstract(n) => write!(f, "unix:@{}", String::from_utf8_lossy(n)),
        }
    }
}

fn valid_fdname(name: &str) -> bool {
    // sd_pid_notify_with_fds(3): FDNAME= may not contain control characters or ':'.
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

fn parse_inet(s: &str) -> Option<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Some(a);
    }
    // `localhost:PORT` and `*:PORT` / `:PORT` are common enough to accept; no name resolution.
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        "" | "*" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("invalid address '{s}': expected HOST:PORT, [V6]:PORT, udp:HOST:PORT, unix:/path or unix:@name")
        };
        let (name, rest) = match s.split_once('=') {
            Some((n, r)) if !n.contains(':') && !n.contains('/') => {
                if !valid_fdname(n) {
                    return Err(format!(
                        "invalid socket name '{n}': printable ASCII, no ':'"
                    ));
                }
                (Some(n.to_string()), r)
            }
            _ => (None, s),
        };
        let addr = if let Some(u) = rest.strip_prefix("unix:") {
            if let Some(a) = u.strip_prefix('@') {
                if a.is_empty() || a.len() > 107 {
                    return Err(bad());
                }
                Addr::UnixAbstract(a.as_bytes().to_vec())
            } else if u.starts_with('/') && u.len() < 108 {
                Addr::UnixPath(PathBuf::from(u))
            } else {
                return Err(bad());
            }
        } else if let Some(u) = rest.strip_prefix("udp:") {
            Addr::Udp(parse_inet(u).ok_or_else(bad)?)
        } else {
            Addr::Tcp(parse_inet(rest.strip_prefix("tcp:").unwrap_or(rest)).ok_or_else(bad)?)
        };
        Ok(ListenSpec { name, addr })
    }
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

/// What the service manager passed, read (and removed from the environment) in `main`.
#[derive(Debug, Default, Clone)]
pub struct InheritedEnv {
    pub listen_pid: Option<OsString>,
    pub listen_fds: Option<OsString>,
    pub listen_fdnames: Option<OsString>,
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`; no memory is involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// A number from the environment, or the error `bad` makes of the text.
fn env_number<T: FromStr>(
    value: &OsString,
    bad: impl FnOnce(String) -> ListenError,
) -> Result<T, ListenError> {
    let text = value.to_string_lossy();
    text.trim().parse().map_err(|_| bad(text.to_string()))
}

/// `sd_listen_fds_with_names(3)`: the inherited sockets, validated and made close-on-exec.
pub fn inherit(env: &InheritedEnv, my_pid: u32) -> Result<Vec<Listener>, ListenError> {
    let (Some(pid), Some(fds)) = (&env.listen_pid, &env.listen_fds) else {
        return Ok(Vec::new());
    };
    let pid: u32 = env_number(pid, |value| ListenError::PidNotANumber { value })?;
    if pid != my_pid {
        // Meant for another process (sd_listen_fds(3) ignores them too).
        tracing::debug!(listen_pid = pid, "LISTEN_FDS is not for us; ignored");
        return Ok(Vec::new());
    }
    let count: usize = env_number(fds, |value| ListenError::FdsNotANumber { value })?;
    let names: Vec<String> = match &env.listen_fdnames {
        Some(n) => n.to_string_lossy().split(':').map(str::to_string).collect(),
        None => vec!["unknown".to_string(); count],
    };
    if names.len() != count {
        return Err(ListenError::NamesCount {
            names: names.len(),
            count,
        });
    }
    let end = LISTEN_FDS_START + count as RawFd;
    for fd in LISTEN_FDS_START..end {
        if !fd_is_open(fd) {
            return Err(ListenError::FdMissing { count, fd });
        }
    }
    let mut out = Vec::with_capacity(count);
    for (i, name) in names.into_iter().enumerate() {
        let fd = LISTEN_FDS_START + i as RawFd;
        // SAFETY: the fd is open (checked above) and, per the LISTEN_FDS protocol, ours alone.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = validate_inherited(owned, name)?;
        out.push(listener);
    }
    Ok(out)
}

fn validate_inherited(fd: OwnedFd, name: String) -> Result<Listener, ListenError> {
    let raw = fd.as_raw_fd();
    let stat =
        nix::sys::stat::fstat(raw).map_err(|source| ListenError::Inspect { fd: raw, source })?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(ListenError::NotASocket { fd: raw });
    }
    let ty = getsockopt(&fd, sockopt::SockType)
        .map_err(|source| ListenError::Inspect { fd: raw, source })?;
    let stream = matches!(
        ty,
        nix::sys::socket::SockType::Stream | nix::sys::socket::SockType::SeqPacket
    );
    if stream && !getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(ListenError::NotListening { fd: raw });
    }
    nix::fcntl::fcntl(
        raw,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|source| ListenError::Inspect { fd: raw, source })?;
    let sock = Socket::from(fd);
    let local = sock.local_addr().ok();
    let display = local
        .as_ref()
        .map(describe)
        .unwrap_or_else(|| format!("fd {raw}"));
    let reusable = local.as_ref().is_some_and(|a| a.as_socket().is_some());
    Ok(Listener {
        fd: sock.into(),
        name,
        display: format!("{display} (fd {raw})"),
        owned_path: None,
        reusable,
    })
}

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

/// After `--listen` sockets are bound: no inherited fd may stray past the count (a hint that
/// LISTEN_FDS does not match what the manager really passed).
pub fn check_no_extra_fd(count: usize) -> Result<(), ListenError> {
    let next = LISTEN_FDS_START + count as RawFd;
    if count > 0 && fd_is_open(next) && is_socket(next) {
        return Err(ListenError::FdsMismatch { count, fd: next });
    }
    Ok(())
}

fn is_socket(fd: RawFd) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// Binds one `--listen` socket. `reuseport` sets SO_REUSEPORT so that per-slot siblings can
/// join it.
pub fn bind(spec: &ListenSpec, reuseport: bool) -> Result<Listener, ListenError> {
    let name = spec.name.clone().unwrap_or_else(|| "unknown".into());
    let shown = spec.addr.to_string();
    match &spec.addr {
        Addr::Tcp(a) | Addr::Udp(a) => {
            let stream = matches!(spec.addr, Addr::Tcp(_));
            let sock = bind_inet(*a, stream, reuseport, &shown)?;
            let display = sock
                .local_addr()
                .ok()
                .map(|l| describe(&l))
                .unwrap_or(shown);
            let display = if stream {
                display
            } else {
                format!("udp:{display}")
            };
            Ok(Listener {
                fd: sock.into(),
                name,
                display,
                owned_path: None,
                reusable: true,
            })
        }
        Addr::UnixPath(p) => {
            remove_stale(p)?;
            unix_listener(p.clone(), Some(p.clone()), name, shown)
        }
        Addr::UnixAbstract(n) => {
            // socket2 takes an abstract name as a path with a leading NUL (unix(7)).
            let raw: Vec<u8> = std::iter::once(0).chain(n.iter().copied()).collect();
            unix_listener(PathBuf::from(OsString::from_vec(raw)), None, name, shown)
        }
    }
}

/// A listening unix stream socket at `path` (a leading NUL: the abstract namespace).
fn unix_listener(
    path: PathBuf,
    owned_path: Option<PathBuf>,
    name: String,
    shown: String,
) -> Result<Listener, ListenError> {
    let addr = SockAddr::unix(&path).map_err(|source| ListenError::Bind {
        addr: shown.clone(),
        source,
    })?;
    let sock = bind_unix(&addr, &shown)?;
    Ok(Listener {
        fd: sock.into(),
        name,
        display: shown,
        owned_path,
        reusable: false,
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

impl Listener {
    pub fn remove_owned_path(&self) {
        if let Some(p) = &self.owned_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The sockets workers get, and with `--reuseport` one sibling set per slot (slot 0 uses the
/// originals, so no socket in a SO_REUSEPORT group is ever left without an accepting worker).
pub struct SocketSet {
    pub listeners: Vec<Listener>,
    reuseport: bool,
    per_slot: Vec<Option<Vec<OwnedFd>>>,
    fdnames: String,
}

impl SocketSet {
    pub fn new(listeners: Vec<Listener>, reuseport: bool) -> Result<SocketSet, ListenError> {
        if reuseport {
            for l in listeners
                .iter()
                .filter(|l| l.reusable && l.owned_path.is_none())
            {
                if !has_reuseport(l) {
                    return Err(ListenError::NoReusePort {
                        fd: l.fd.as_raw_fd(),
                        name: l.name.clone(),
                    });
                }
            }
        }
        let fdnames = listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":");
        Ok(SocketSet {
            listeners,
            reuseport,
            per_slot: Vec::new(),
            fdnames,
        })
    }

    pub fn fdnames(&self) -> &str {
        &self.fdnames
    }

    /// Binds the siblings for slots `1..n` now, so that setup errors surface before any worker.
    pub fn prepare(&mut self, slots: usize) -> Result<(), ListenError> {
        for slot in 1..slots {
            self.fds_for(slot)?;
        }
        Ok(())
    }

    /// The fds a worker of `slot` gets at 3, 4, … (in `--listen`/LISTEN_FDS order).
    pub fn fds_for(&mut self, slot: usize) -> Result<Vec<RawFd>, ListenError> {
        let shared = |l: &Listener| l.fd.as_raw_fd();
        if !self.reuseport || slot == 0 {
            return Ok(self.listeners.iter().map(shared).collect());
        }
        if self.per_slot.len() <= slot {
            self.per_slot.resize_with(slot + 1, || None);
        }
        if self.per_slot[slot].is_none() {
            let mut set = Vec::new();
            for l in self.listeners.iter().filter(|l| l.reusable) {
                set.push(sibling(l)?);
            }
            self.per_slot[slot] = Some(set);
        }
        let mut siblings = self.per_slot[slot].as_ref().expect("just filled").iter();
        Ok(self
            .listeners
            .iter()
            .map(|l| {
                if l.reusable {
                    siblings.next().map_or(shared(l), |s| s.as_raw_fd())
                } else {
                    shared(l)
                }
            })
            .collect())
    }

    /// Closes a removed slot's siblings (herder's copies; a draining worker keeps its own).
    pub fn release(&mut self, slot: usize) {
        if let Some(s) = self.per_slot.get_mut(slot) {
            *s = None;
        }
    }

    pub fn remove_owned_paths(&self) {
        for l in &self.listeners {
            l.remove_owned_path();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let s: ListenSpec = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(s.addr, Addr::Tcp("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(s.name, None);
        let s: ListenSpec = "web=[::1]:80".parse().unwrap();
        assert_eq!(s.name.as_deref(), Some("web"));
        assert_eq!(s.addr, Addr::Tcp("[::1]:80".parse().unwrap()));
        let s: ListenSpec = "udp:0.0.0.0:53".parse().unwrap();
        assert_eq!(s.addr, Addr::Udp("0.0.0.0:53".parse().unwrap()));
        let s: ListenSpec = "unix:/run/app.sock".parse().unwrap();
        assert_eq!(s.addr, Addr::UnixPath("/run/app.sock".into()));
        let s: ListenSpec = "ctl=unix:@app".parse().unwrap();
        assert_eq!(s.addr, Addr::UnixAbstract(b"app".to_vec()));
        let s: ListenSpec = "localhost:9".parse().unwrap();
        assert_eq!(s.addr, Addr::Tcp("127.0.0.1:9".parse().unwrap()));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "8080",
            "host:port",
            "1.2.3.4",
            "unix:",
            "unix:relative",
            "udp:x",
            "bad:name=1.2.3.4:1",
        ] {
            assert!(bad.parse::<ListenSpec>().is_err(), "{bad} should not parse");
        }
    }
}
