//! What the service manager passed (`sd_listen_fds(3)`): LISTEN_PID, LISTEN_FDS and
//! LISTEN_FDNAMES, judged by a pure parser before anything is allocated or any fd touched,
//! then the fds themselves, validated and made close-on-exec.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::Socket;

use super::{describe, fd_is_open, is_socket, ListenError, Listener, LISTEN_FDS_START};

/// The most sockets herder takes through LISTEN_FDS. A service manager passes one fd per
/// `Listen*=` line of a .socket unit; thousands would already be past the default soft
/// RLIMIT_NOFILE (1024). The bound is checked before anything is allocated or any fd touched,
/// so a bogus count is one clear error, never a huge allocation or a long loop.
pub const MAX_LISTEN_FDS: usize = 4096;

/// `FDNAME_MAX` in systemd: the longest name LISTEN_FDNAMES may carry for one fd.
pub(super) const FDNAME_MAX: usize = 255;

#[derive(Debug, Default, Clone)]
pub struct InheritedEnv {
    pub listen_pid: Option<OsString>,
    pub listen_fds: Option<OsString>,
    pub listen_fdnames: Option<OsString>,
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
        tracing::debug!(
            listen_pid = pid,
            "LISTEN_FDS is not for us (LISTEN_PID={pid}); ignored"
        );
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

/// `sd_listen_fds_with_names(3)` before any fd is judged: fds 3.. with their names, each
/// checked to be open and now owned. Judging them is the caller's: the service manager's sockets
/// go through [`validate_inherited`], herder's own stored ones (src/fdstore.rs) are told apart by
/// their names first, because they need not be what a socket unit passes.
pub fn inherit_fds(env: &InheritedEnv, my_pid: u32) -> Result<Vec<(OwnedFd, String)>, ListenError> {
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
        out.push((unsafe { OwnedFd::from_raw_fd(fd) }, name));
    }
    Ok(out)
}

/// One socket the service manager passed, checked (a socket; a stream one listening) and made
/// close-on-exec.
pub fn validate_inherited(fd: OwnedFd, name: String) -> Result<Listener, ListenError> {
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
