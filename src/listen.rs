//! Getting the listening sockets: inherit them from the service manager (`sd_listen_fds(3)`)
//! or bind what `--listen` names, and, with `--reuseport`, one sibling socket per worker slot.
//!
//! Sockets are created blocking and close-on-exec. This module must never set O_NONBLOCK on a
//! listening socket (the open file description is shared with every worker) and never accept.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::str::FromStr;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;

/// The first inherited fd, `SD_LISTEN_FDS_START`.
const LISTEN_FDS_START: RawFd = 3;

/// The most sockets herder takes through LISTEN_FDS. A service manager passes one fd per
/// `Listen*=` line of a .socket unit; thousands would already be past the default soft
/// RLIMIT_NOFILE (1024). The bound is checked before anything is allocated or any fd touched,
/// so a bogus count is one clear error, never a huge allocation or a long loop.
pub const MAX_LISTEN_FDS: usize = 4096;

/// `FDNAME_MAX` in systemd: the longest name LISTEN_FDNAMES may carry for one fd.
const FDNAME_MAX: usize = 255;

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

impl fmt::Display for ListenSpec {
    /// The `--listen` form, `[NAME=]ADDR`: parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.name {
            write!(f, "{n}=")?;
        }
        write!(f, "{}", self.addr)
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

/// An environment value as it may appear in a one-line error: lossy UTF-8, control
/// characters escaped, cut after 40 characters (the value itself may be megabytes).
fn shown(value: &OsStr) -> String {
    const SHOWN: usize = 40;
    let text = value.to_string_lossy();
    let mut out = String::new();
    for c in text.chars().take(SHOWN) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().nth(SHOWN).is_some() {
        out.push('…');
    }
    out
}

/// What a LISTEN_PID or LISTEN_FDS value says.
enum Number {
    Is(u64),
    /// Decimal digits, but more than u64 holds.
    TooBig,
    Garbage,
}

/// A number as service managers write it (`%u`): ASCII digits only — no sign, no whitespace,
/// no `0x`. (systemd's own `sd_listen_fds()` also skips leading whitespace and takes a sign;
/// no manager writes either, so herder refuses them with a clear error rather than guess.)
fn decimal(value: &OsStr) -> Number {
    let b = value.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return Number::Garbage;
    }
    // All ASCII digits, so valid UTF-8; the only possible failure left is overflow.
    match std::str::from_utf8(b).map(str::parse) {
        Ok(Ok(n)) => Number::Is(n),
        _ => Number::TooBig,
    }
}

/// The names in LISTEN_FDNAMES, checked against the count (already bounded by
/// [`MAX_LISTEN_FDS`]) before the list is built, each as `fdname_is_valid()` in systemd
/// checks it: at most 255 bytes of printable ASCII (empty is allowed).
fn parse_fdnames(value: &OsStr, count: usize) -> Result<Vec<String>, ListenError> {
    let bytes = value.as_bytes();
    let names = bytes.iter().filter(|&&b| b == b':').count() + 1;
    if names != count {
        return Err(ListenError::NamesCount { names, count });
    }
    let mut out = Vec::with_capacity(count);
    for (i, name) in bytes.split(|&b| b == b':').enumerate() {
        let index = i + 1;
        if name.len() > FDNAME_MAX {
            return Err(ListenError::NameTooLong {
                index,
                count,
                len: name.len(),
            });
        }
        match std::str::from_utf8(name) {
            Ok(n) if n.bytes().all(|b| (b' '..=b'~').contains(&b)) => out.push(n.to_string()),
            _ => return Err(ListenError::NameInvalid { index, count }),
        }
    }
    Ok(out)
}

/// `sd_listen_fds_with_names(3)` without the fds: what LISTEN_PID, LISTEN_FDS and
/// LISTEN_FDNAMES say, validated. `Ok(None)`: nothing for us (a variable is missing,
/// LISTEN_PID names another process, or LISTEN_FDS=0). `Ok(Some((count, names)))`: fds
/// 3..3+count, `names.len() == count`, `count <= MAX_LISTEN_FDS`. Pure: it reads no fd and
/// allocates only in proportion to a count it has checked.
pub fn parse_env(
    env: &InheritedEnv,
    my_pid: u32,
) -> Result<Option<(usize, Vec<String>)>, ListenError> {
    let (Some(pid), Some(fds)) = (&env.listen_pid, &env.listen_fds) else {
        return Ok(None);
    };
    let pid = match decimal(pid) {
        Number::Is(p) if p > 0 && p <= u64::from(u32::MAX) => p,
        _ => return Err(ListenError::PidNotANumber { value: shown(pid) }),
    };
    if pid != u64::from(my_pid) {
        // Meant for another process (sd_listen_fds(3) ignores them too).
        tracing::debug!(listen_pid = pid, "LISTEN_FDS is not for us; ignored");
        return Ok(None);
    }
    let count = match decimal(fds) {
        Number::Is(n) if n <= MAX_LISTEN_FDS as u64 => n as usize,
        Number::Is(_) | Number::TooBig => {
            return Err(ListenError::FdsOutOfRange {
                value: shown(fds),
                max: MAX_LISTEN_FDS,
            })
        }
        Number::Garbage => return Err(ListenError::FdsNotANumber { value: shown(fds) }),
    };
    if count == 0 {
        return Ok(None);
    }
    let names = match &env.listen_fdnames {
        Some(n) => parse_fdnames(n, count)?,
        None => vec!["unknown".to_string(); count],
    };
    Ok(Some((count, names)))
}

/// `sd_listen_fds_with_names(3)`: the inherited sockets, validated and made close-on-exec.
pub fn inherit(env: &InheritedEnv, my_pid: u32) -> Result<Vec<Listener>, ListenError> {
    let Some((count, names)) = parse_env(env, my_pid)? else {
        return Ok(Vec::new());
    };
    // count <= MAX_LISTEN_FDS, so these fd numbers cannot overflow.
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
    let Some(next) = RawFd::try_from(count)
        .ok()
        .and_then(|c| LISTEN_FDS_START.checked_add(c))
    else {
        return Ok(());
    };
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

/// The kernel lets a socket join a SO_REUSEPORT group only if it is bound by the same
/// effective uid as the group's sockets (socket(7)); otherwise `bind` says EADDRINUSE, which
/// reads like a port clash. A socket's uid is its sockfs inode's owner (`fstat(2)` st_uid): the
/// uid that created it, e.g. root for systemd's sockets while herder runs as a DynamicUser.
fn check_owner(l: &Listener) -> Result<(), ListenError> {
    let fd = l.fd.as_raw_fd();
    let owner = nix::sys::stat::fstat(fd)
        .map_err(|source| ListenError::Inspect { fd, source })?
        .st_uid;
    let euid = nix::unistd::geteuid().as_raw();
    if owner != euid {
        return Err(ListenError::ReusePortOwner {
            fd,
            name: l.name.clone(),
            owner,
            euid,
        });
    }
    Ok(())
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
                check_owner(l)?;
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
    use proptest::prelude::*;

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

    #[test]
    fn a_spec_displays_as_it_is_written() {
        for text in [
            "127.0.0.1:8080",
            "web=[::1]:80",
            "dns=udp:0.0.0.0:53",
            "unix:/run/app.sock",
            "ctl=unix:@app",
        ] {
            assert_eq!(text.parse::<ListenSpec>().unwrap().to_string(), text);
        }
    }

    fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> InheritedEnv {
        InheritedEnv {
            listen_pid: pid.map(OsString::from),
            listen_fds: fds.map(OsString::from),
            listen_fdnames: names.map(OsString::from),
        }
    }

    const ME: u32 = 4242;

    fn parsed(fds: &str, names: Option<&str>) -> Result<Option<(usize, Vec<String>)>, String> {
        parse_env(&env(Some("4242"), Some(fds), names), ME).map_err(|e| e.to_string())
    }

    #[test]
    fn listen_env_for_us() {
        assert_eq!(parsed("2", None), Ok(Some((2, vec!["unknown".into(); 2]))));
        assert_eq!(
            parsed("2", Some("web:")),
            Ok(Some((2, vec!["web".into(), String::new()])))
        );
        assert_eq!(parsed("0", Some("anything")), Ok(None));
        assert_eq!(parsed("0004", None).unwrap().unwrap().0, 4);
        let longest = "n".repeat(FDNAME_MAX);
        assert_eq!(parsed("1", Some(&longest)), Ok(Some((1, vec![longest]))));
        let max = MAX_LISTEN_FDS.to_string();
        assert_eq!(parsed(&max, None).unwrap().unwrap().1.len(), MAX_LISTEN_FDS);
    }

    #[test]
    fn listen_env_not_for_us() {
        assert!(parse_env(&env(None, Some("1"), None), ME)
            .unwrap()
            .is_none());
        assert!(parse_env(&env(Some("4242"), None, None), ME)
            .unwrap()
            .is_none());
        // Another process's values are not ours to judge, however odd.
        let other = env(Some("4243"), Some("4611686018427387904"), Some("\n"));
        assert!(parse_env(&other, ME).unwrap().is_none());
    }

    #[test]
    fn listen_env_refused() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("three", None, "LISTEN_FDS=three: not a number"),
            ("-1", None, "LISTEN_FDS=-1: not a number"),
            ("+1", None, "LISTEN_FDS=+1: not a number"),
            (" 1", None, "LISTEN_FDS= 1: not a number"),
            ("1\n", None, "LISTEN_FDS=1\\n: not a number"),
            ("", None, "LISTEN_FDS=: not a number"),
            ("4097", None, "LISTEN_FDS=4097: out of range (at most 4096"),
            ("2147483648", None, "LISTEN_FDS=2147483648: out of range"),
            ("4611686018427387904", None, "out of range"),
            ("99999999999999999999999", None, "out of range"),
            (
                "1",
                Some("a:b"),
                "LISTEN_FDNAMES has 2 names but LISTEN_FDS=1",
            ),
            (
                "2",
                Some("a"),
                "LISTEN_FDNAMES has 1 names but LISTEN_FDS=2",
            ),
            (
                "2",
                Some("a:b\tc"),
                "name 2 of 2 has a control or non-ASCII byte",
            ),
            (
                "1",
                Some("café"),
                "name 1 of 1 has a control or non-ASCII byte",
            ),
        ];
        for &(fds, names, expect) in cases {
            let e = parsed(fds, names).unwrap_err();
            assert!(
                e.contains(expect),
                "LISTEN_FDS={fds:?}: {e:?} lacks {expect:?}"
            );
        }
        let long = "n".repeat(FDNAME_MAX + 1);
        let e = parsed("1", Some(&long)).unwrap_err();
        assert_eq!(
            e,
            "LISTEN_FDNAMES: name 1 of 1 is 256 bytes long (at most 255)"
        );
        let junk = OsString::from_vec(vec![b'a', 0xff]);
        let e = parse_env(
            &InheritedEnv {
                listen_fdnames: Some(junk),
                ..env(Some("4242"), Some("1"), None)
            },
            ME,
        );
        assert!(matches!(
            e,
            Err(ListenError::NameInvalid { index: 1, count: 1 })
        ));
        for pid in ["0", "x", "-4242", "+4242", " 4242", "4294967296"] {
            let e = parse_env(&env(Some(pid), Some("1"), None), ME).unwrap_err();
            assert!(e
                .to_string()
                .starts_with(&format!("LISTEN_PID={pid}: not a number")));
        }
    }

    #[test]
    fn a_huge_value_is_shown_cut_short() {
        let e = parsed(&"9".repeat(100_000), None).unwrap_err();
        assert!(e.len() < 120, "{e}");
        assert!(e.contains("9999…: out of range"), "{e}");
    }

    /// Bytes allocated on this thread: the property tests below check that parsing LISTEN_*
    /// allocates in proportion to the input's length or to a checked count, never to a number
    /// it read. (A counting wrapper around the system allocator, for this test binary only.)
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        pub struct Counting;

        thread_local! {
            static ALLOCATED: Cell<usize> = const { Cell::new(0) };
        }

        // SAFETY: every call is forwarded unchanged to `System`; the counter is a
        // const-initialized thread-local without a destructor, which never allocates.
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                let _ = ALLOCATED.try_with(|a| a.set(a.get().saturating_add(layout.size())));
                // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
                unsafe { System.alloc(layout) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: `ptr` came from `System.alloc` with this layout.
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;

        /// What `f` allocated (in bytes, frees not subtracted) and its result.
        pub fn allocated<T>(f: impl FnOnce() -> T) -> (usize, T) {
            let before = ALLOCATED.with(Cell::get);
            let out = f();
            (ALLOCATED.with(Cell::get) - before, out)
        }
    }

    /// The most `parse_env` may allocate for an input of `len` bytes: the names it copies (and
    /// their list), a message quoting at most 40 characters, and the default names for the
    /// largest count it accepts.
    fn allocation_bound(len: usize) -> usize {
        let list = MAX_LISTEN_FDS * (std::mem::size_of::<String>() + "unknown".len());
        2 * len + list + 1024
    }

    fn env_value() -> impl Strategy<Value = Option<OsString>> {
        let bytes = prop::collection::vec(any::<u8>(), 0..300).prop_map(OsString::from_vec);
        let digits = "[0-9]{1,30}".prop_map(OsString::from);
        let near = prop_oneof![Just("4242"), Just("1"), Just("4096"), Just("4097")];
        prop::option::of(prop_oneof![bytes, digits, near.prop_map(OsString::from)])
    }

    fn names_value() -> impl Strategy<Value = Option<OsString>> {
        let name = prop_oneof!["[ -9;-~]{0,8}", "[\\x00-\\x7f]{0,300}"];
        let joined = prop::collection::vec(name, 0..10).prop_map(|n| OsString::from(n.join(":")));
        let bytes = prop::collection::vec(any::<u8>(), 0..600).prop_map(OsString::from_vec);
        prop::option::of(prop_oneof![joined, bytes])
    }

    /// A `--listen` spec its parser can produce: names are printable ASCII without `:` (the
    /// address separator), `=` (the name separator) and `/` (what tells a path from a name).
    fn valid_spec() -> impl Strategy<Value = ListenSpec> {
        let name = prop::option::of("[!-~&&[^:=/]]{1,40}");
        let ip = prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ];
        let inet = (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port));
        let addr = prop_oneof![
            inet.clone().prop_map(Addr::Tcp),
            inet.prop_map(Addr::Udp),
            "/[^\\x00]{0,60}"
                .prop_filter("sun_path holds 107 bytes", |p| p.len() < 108)
                .prop_map(|p| Addr::UnixPath(PathBuf::from(p))),
            "[^\\x00]{1,60}"
                .prop_filter("sun_path holds 107 bytes", |n| n.len() <= 107)
                .prop_map(|n| Addr::UnixAbstract(n.into_bytes())),
        ];
        (name, addr).prop_map(|(name, addr)| ListenSpec { name, addr })
    }

    proptest! {
        #[test]
        fn the_listen_env_parser_never_panics_nor_allocates_from_a_number(
            pid in prop_oneof![Just(Some(OsString::from("4242"))), env_value()],
            fds in env_value(),
            names in names_value(),
        ) {
            let len = [&pid, &fds, &names]
                .iter()
                .map(|v| v.as_ref().map_or(0, |v| v.len()))
                .sum();
            let env = InheritedEnv { listen_pid: pid, listen_fds: fds, listen_fdnames: names };
            let (bytes, out) = counting::allocated(|| parse_env(&env, ME).map_err(|e| e.to_string()));
            prop_assert!(bytes <= allocation_bound(len), "{bytes} bytes for {len}: {out:?}");
            if let Ok(Some((count, names))) = out {
                prop_assert!((1..=MAX_LISTEN_FDS).contains(&count));
                prop_assert_eq!(names.len(), count);
            }
        }

        #[test]
        fn listen_spec_parsing_never_panics(
            s in prop_oneof![any::<String>(), "[0-9a-z:@=/\\[\\]%.*]{0,40}"]
        ) {
            if let Ok(spec) = s.parse::<ListenSpec>() {
                prop_assert_eq!(spec.to_string().parse::<ListenSpec>(), Ok(spec));
            }
        }

        #[test]
        fn listen_specs_round_trip_through_display(spec in valid_spec()) {
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<ListenSpec>(), Ok(spec), "{}", text);
        }
    }

    #[test]
    fn an_absurd_count_allocates_nothing_much() {
        for fds in [
            "4611686018427387904",
            "2147483648",
            "18446744073709551615",
            "4097",
        ] {
            let env = env(Some("4242"), Some(fds), None);
            let (bytes, out) = counting::allocated(|| parse_env(&env, ME));
            assert!(out.is_err());
            assert!(bytes < 1024, "LISTEN_FDS={fds}: {bytes} bytes");
        }
    }
}
