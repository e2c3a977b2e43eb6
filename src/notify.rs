//! sd_notify(3) in both directions.
//!
//! Up: [`Manager`] sends herder's own READY=1, STATUS=, RELOADING=1, … to the NOTIFY_SOCKET
//! systemd gave us (read and unset in `main`). The `sd-notify` crate formats the messages, but
//! it connects to `$NOTIFY_SOCKET` on every call and cannot reach an abstract (`@…`) address,
//! while herder must unset that variable before any thread exists; so the transport — one
//! unbound datagram socket and a stored address — is ours.
//!
//! Down: every worker gets a NOTIFY_SOCKET of its own, an abstract datagram socket herder binds
//! before the fork, so a message's slot is known from the socket it arrives on, never from a
//! sender pid that may already be gone (`systemd-notify` from a shell script exits at once).
//! Input is untrusted: a size limit, garbage ignored, passed fds closed at once, and a bounded
//! number of datagrams per wake-up so a flood cannot starve the event loop.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags};
use sd_notify::NotifyState;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::pool::{ManagerMsg, WorkerId, WorkerMsg};

/// systemd's own limit for one notification datagram (NOTIFY_BUFFER_MAX = PIPE_BUF).
pub const MAX_DATAGRAM: usize = 4096;
/// Datagrams read from one worker socket before yielding to the rest of the loop.
const BUDGET: usize = 32;
/// A STATUS= longer than this is cut.
const MAX_STATUS: usize = 256;

#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0}: not a path or an @abstract name")]
    BadAddress(String),
    #[error("cannot create the notification socket for worker {id}: {source}")]
    Socket {
        id: WorkerId,
        source: std::io::Error,
    },
}

/// herder's own service manager (systemd), if any.
pub struct Manager {
    sock: UnixDatagram,
    addr: SocketAddr,
    warned: bool,
    /// Our pid, to send as MAINPID= with the first READY=1, when the manager may not know that
    /// herder is its service's main process.
    mainpid: Option<u32>,
}

/// Whether our parent is the service manager (systemd as PID 1, or a `systemd --user`), so
/// that systemd already tracks herder as the main process and MAINPID= would say nothing new.
/// Otherwise (a wrapper script that did not `exec`) herder says MAINPID= itself; with
/// NotifyAccess=all that makes systemd track the right process (sd_notify(3)).
fn started_by_the_manager() -> bool {
    let ppid = nix::unistd::getppid().as_raw();
    ppid == 1
        || std::fs::read_to_string(format!("/proc/{ppid}/comm"))
            .is_ok_and(|c| c.trim() == "systemd")
}

/// Parses a NOTIFY_SOCKET value: `/path` or `@abstract`.
pub fn parse_address(value: &str) -> Result<SocketAddr, NotifyError> {
    let bad = || NotifyError::BadAddress(value.to_string());
    if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

impl Manager {
    pub fn new(value: &str) -> Result<Manager, NotifyError> {
        let addr = parse_address(value)?;
        let sock =
            UnixDatagram::unbound().map_err(|source| NotifyError::Socket { id: 0, source })?;
        Ok(Manager {
            sock,
            addr,
            warned: false,
            mainpid: (!started_by_the_manager()).then(std::process::id),
        })
    }

    /// Sends one datagram. Failures are logged once and otherwise ignored: systemd may be gone.
    pub fn send(&mut self, msgs: &[ManagerMsg]) {
        let mut text = format_manager(msgs);
        if msgs.contains(&ManagerMsg::Ready) {
            if let Some(pid) = self.mainpid.take() {
                text.push_str(&format!("{}\n", NotifyState::MainPid(pid)));
            }
        }
        debug!(message = %text.trim_end().replace('\n', " "), "notifying the service manager");
        if let Err(e) = self.sock.send_to_addr(text.as_bytes(), &self.addr) {
            if !self.warned {
                warn!("cannot notify the service manager: {e}");
                self.warned = true;
            }
        }
    }
}

/// The datagram text for `msgs`; RELOADING=1 gets the MONOTONIC_USEC= that systemd ≥ 253
/// requires with it.
pub fn format_manager(msgs: &[ManagerMsg]) -> String {
    let mut out = String::new();
    let mut push = |s: NotifyState<'_>| {
        out.push_str(&s.to_string());
        out.push('\n');
    };
    for m in msgs {
        match m {
            ManagerMsg::Ready => push(NotifyState::Ready),
            ManagerMsg::Reloading => {
                push(NotifyState::Reloading);
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    push(now);
                }
            }
            ManagerMsg::Stopping => push(NotifyState::Stopping),
            ManagerMsg::Status(s) => push(NotifyState::Status(s)),
            ManagerMsg::Watchdog => push(NotifyState::Watchdog),
            ManagerMsg::ExtendTimeout(d) => push(NotifyState::ExtendTimeoutUsec(
                d.as_micros().min(u32::MAX as u128) as u32,
            )),
            ManagerMsg::Errno(e) => push(NotifyState::Errno((*e).max(0) as u32)),
        }
    }
    out
}

/// WATCHDOG_USEC/WATCHDOG_PID as sd_watchdog_enabled(3) reads them.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(my_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Parses one worker datagram; unknown or malformed lines are ignored.
pub fn parse_worker(buf: &[u8]) -> Vec<WorkerMsg> {
    let mut out = Vec::new();
    for line in buf.split(|&b| b == b'\n') {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let msg = match (key, value) {
            ("READY", "1") => WorkerMsg::Ready,
            ("STOPPING", "1") => WorkerMsg::Stopping,
            ("WATCHDOG", "1") => WorkerMsg::Watchdog,
            ("WATCHDOG", "trigger") => WorkerMsg::WatchdogTrigger,
            ("STATUS", s) => {
                let clean: String = s
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(MAX_STATUS)
                    .collect();
                WorkerMsg::Status(clean)
            }
            ("ERRNO", e) => match e.trim().parse::<i32>() {
                Ok(n) if n >= 0 => WorkerMsg::Errno(n),
                _ => continue,
            },
            _ => continue,
        };
        out.push(msg);
    }
    out
}

/// A worker's private NOTIFY_SOCKET, bound before its fork.
pub struct WorkerSocket {
    fd: OwnedFd,
    pub address: String,
}

impl WorkerSocket {
    /// Binds `@herder/<prefix>/<id>`; `prefix` must be unique among herders that share the
    /// network namespace (see [`socket_prefix`]).
    pub fn bind(prefix: &str, id: WorkerId) -> Result<WorkerSocket, NotifyError> {
        let err = |source| NotifyError::Socket { id, source };
        let name = format!("herder/{prefix}/{id}");
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(err)?;
        let sock = UnixDatagram::bind_addr(&addr).map_err(err)?;
        sock.set_nonblocking(true).map_err(err)?;
        // SCM_CREDENTIALS on every datagram: who sent it (unix(7) SO_PASSCRED).
        socket::setsockopt(&sock, sockopt::PassCred, &true).map_err(|e| err(e.into()))?;
        Ok(WorkerSocket {
            fd: sock.into(),
            address: format!("@{name}"),
        })
    }
}

/// A prefix for this herder's worker sockets. Abstract names are shared by the whole network
/// namespace, and the pid alone is not unique there: every herder that is PID 1 of its own pid
/// namespace is pid 1 (two containers of one pod). So: the pid, for people reading
/// /proc/net/unix, and 64 random bits from the OS (std's per-process hasher seed).
pub fn socket_prefix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{}-{random:016x}", std::process::id())
}

/// Whether a datagram's sender may speak for the worker `worker_pid`: the worker itself, a
/// process in its process group, or a descendant. A sender that has already exited cannot be
/// checked; it is accepted, since the address was handed only to that worker's tree.
pub fn sender_allowed(sender: i32, worker_pid: i32) -> bool {
    let mut pid = sender;
    for _ in 0..64 {
        if pid == worker_pid {
            return true;
        }
        let Some((ppid, pgrp)) = proc_stat(pid) else {
            return pid == sender; // gone before we could look
        };
        if pgrp == worker_pid {
            return true;
        }
        if ppid <= 1 {
            return false;
        }
        pid = ppid;
    }
    false
}

/// (ppid, pgrp) from /proc/PID/stat (proc(5)); the command name may contain spaces and ')'.
fn proc_stat(pid: i32) -> Option<(i32, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let _state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// What one worker said, tagged with the worker.
pub type Incoming = (WorkerId, WorkerMsg);

/// Reads a worker's socket until the task is aborted (when the worker is reaped).
pub async fn serve_worker(
    sock: WorkerSocket,
    id: WorkerId,
    pid: i32,
    uid: u32,
    tx: mpsc::Sender<Incoming>,
) {
    // SAFETY: an OwnedFd stays open and refers to the same socket for as long as the AsyncFd
    // owns it (register_with_interest's contract).
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(sock.fd, Interest::READABLE) }) else {
        return;
    };
    let mut foreign_logged = false;
    let my_uid = nix::unistd::getuid().as_raw();
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        for _ in 0..BUDGET {
            match recv_one(fd.get_ref().as_raw_fd()) {
                Ok(Some(d)) => {
                    let allowed = d.sender.is_some_and(|(spid, suid)| {
                        (suid == 0 || suid == my_uid || suid == uid) && sender_allowed(spid, pid)
                    });
                    if !allowed {
                        if !foreign_logged {
                            warn!(pid, sender = ?d.sender.map(|s| s.0), "dropping notifications from a process outside the worker's tree (logged once)");
                            foreign_logged = true;
                        }
                        continue;
                    }
                    if d.truncated {
                        warn!(
                            pid,
                            "dropping an oversized notification (over {MAX_DATAGRAM} bytes)"
                        );
                        continue;
                    }
                    for msg in parse_worker(&d.data) {
                        if tx.send((id, msg)).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    guard.clear_ready();
                    break;
                }
                Err(e) => {
                    debug!(pid, "notify socket read failed: {e}");
                    guard.clear_ready();
                    break;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

struct Datagram {
    data: Vec<u8>,
    sender: Option<(i32, u32)>,
    truncated: bool,
}

/// One non-blocking recvmsg: `Ok(None)` when the queue is empty. Any fds that came along
/// (SCM_RIGHTS) are closed at once.
fn recv_one(fd: RawFd) -> std::io::Result<Option<Datagram>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_TRUNC;
    let msg = match socket::recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), flags) {
        Ok(m) => m,
        Err(nix::errno::Errno::EAGAIN) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut sender = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => {
                    sender = Some((cred.pid(), cred.uid()))
                }
                ControlMessageOwned::ScmRights(fds) => {
                    for fd in fds {
                        // SAFETY: the kernel just installed these fds for us; nobody else owns them.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
                _ => {}
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.bytes > MAX_DATAGRAM;
    let len = msg.bytes.min(MAX_DATAGRAM);
    buf.truncate(len);
    Ok(Some(Datagram {
        data: buf,
        sender,
        truncated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_counts_and_ignores_the_rest() {
        let msgs = parse_worker(b"READY=1\nSTATUS=serving 3 clients\nWATCHDOG=1\nGARBAGE\n\xff\xfe=1\nMAINPID=7\nERRNO=2\nERRNO=x\n");
        assert_eq!(
            msgs,
            vec![
                WorkerMsg::Ready,
                WorkerMsg::Status("serving 3 clients".into()),
                WorkerMsg::Watchdog,
                WorkerMsg::Errno(2)
            ]
        );
        assert_eq!(
            parse_worker(b"WATCHDOG=trigger\nSTOPPING=1"),
            vec![WorkerMsg::WatchdogTrigger, WorkerMsg::Stopping]
        );
        assert!(parse_worker(b"READY=0\nSTOPPING=yes").is_empty());
    }

    #[test]
    fn status_is_cleaned_and_bounded() {
        let long = format!("STATUS={}\x1b[31m", "x".repeat(1000));
        match &parse_worker(long.as_bytes())[0] {
            WorkerMsg::Status(s) => {
                assert_eq!(s.len(), MAX_STATUS);
                assert!(!s.contains('\x1b'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn manager_reloading_carries_monotonic_usec() {
        let text = format_manager(&[ManagerMsg::Reloading]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        assert!(lines[1].starts_with("MONOTONIC_USEC="));
        let text = format_manager(&[ManagerMsg::Ready, ManagerMsg::Status("2/2 ready".into())]);
        assert_eq!(text, "READY=1\nSTATUS=2/2 ready\n");
    }

    #[test]
    fn addresses() {
        assert!(parse_address("/run/systemd/notify").is_ok());
        assert!(parse_address("@herder/1/2").is_ok());
        assert!(parse_address("relative").is_err());
        assert!(parse_address("vsock:2:3").is_err());
    }

    #[test]
    fn watchdog_env() {
        assert_eq!(
            watchdog_interval(Some("2000000"), None, 5),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("5"), 5),
            Some(Duration::from_secs(2))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("6"), 5), None);
        assert_eq!(watchdog_interval(Some("0"), None, 5), None);
        assert_eq!(watchdog_interval(None, None, 5), None);
    }

    #[test]
    fn the_worker_itself_and_its_children_are_allowed() {
        let me = std::process::id() as i32;
        assert!(sender_allowed(me, me));
        // Our parent is not in our tree.
        let parent = nix::unistd::getppid().as_raw();
        assert!(!sender_allowed(parent, me) || parent == me);
    }
}
