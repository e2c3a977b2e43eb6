//! sd_notify(3) up to herder's own service manager: READY=1, STATUS=, RELOADING=1,
//! STOPPING=1, WATCHDOG=1, … to the NOTIFY_SOCKET systemd gave us (read and unset in `main`),
//! and the WATCHDOG_USEC/WATCHDOG_PID that say whether systemd watches herder.
//!
//! The `sd-notify` crate formats the messages, but it connects to `$NOTIFY_SOCKET` on every
//! call and cannot reach an abstract (`@…`) address, while herder must unset that variable
//! before any thread exists; so the transport — one unbound datagram socket and a stored
//! address — is ours. Sending never blocks the loop and never fails it: systemd may be gone.
//! File descriptors for systemd's fd store go the same way, as SCM_RIGHTS (sd_notify(3)
//! `FDSTORE=1`, `FDSTOREREMOVE=1`, `FDNAME=`); what to store is src/fdstore.rs's business.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use sd_notify::NotifyState;
use thiserror::Error;
use tracing::{debug, warn};

use crate::pool::ManagerMsg;

/// The longest WATCHDOG_USEC herder takes (a larger value is treated as this): the bound of
/// every duration herder is configured with, so that no deadline computed from it overflows.
const MAX_WATCHDOG: Duration = crate::cli::MAX_DURATION;

#[derive(Debug, Error)]
pub enum ManagerError {
    #[error("NOTIFY_SOCKET={0}: not a path or an @abstract name")]
    BadAddress(String),
    #[error("cannot create a socket to notify the service manager: {0}")]
    Socket(std::io::Error),
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
pub fn parse_address(value: &str) -> Result<SocketAddr, ManagerError> {
    let bad = || ManagerError::BadAddress(value.to_string());
    if let Some(name) = value.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|_| bad())
    } else if value.starts_with('/') {
        SocketAddr::from_pathname(value).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

impl Manager {
    pub fn new(value: &str) -> Result<Manager, ManagerError> {
        let addr = parse_address(value)?;
        let sock = UnixDatagram::unbound().map_err(ManagerError::Socket)?;
        Ok(Manager {
            sock,
            addr,
            warned: false,
            mainpid: (!started_by_the_manager()).then(std::process::id),
        })
    }

    /// A second handle on the same socket and address, for the fd store (src/fdstore.rs): it
    /// logs its own failures once, and never sends MAINPID=.
    pub fn try_clone(&self) -> std::io::Result<Manager> {
        Ok(Manager {
            sock: self.sock.try_clone()?,
            addr: self.addr.clone(),
            warned: false,
            mainpid: None,
        })
    }

    /// `FDSTORE=1` + `FDNAME=name`, with `fd` as SCM_RIGHTS in the same datagram
    /// (sd_pid_notify_with_fds(3)): systemd keeps a copy of it and passes it back through
    /// LISTEN_FDS/LISTEN_FDNAMES when the service starts again. `name` must be a valid FDNAME=
    /// (at most 255 characters, no control character or ':'; systemd ignores others).
    /// Whether the datagram went out; a failure is logged once.
    pub fn store_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> bool {
        self.send_fds(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd])
    }

    /// `FDSTOREREMOVE=1` + `FDNAME=name`: systemd closes every fd it stores under `name`.
    pub fn remove_stored(&mut self, name: &str) -> bool {
        self.send_fds(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[])
    }

    fn send_fds(&mut self, text: &str, fds: &[BorrowedFd<'_>]) -> bool {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        debug!(
            fds = fds.len(),
            "fd store: sending {} with {} fd{}",
            text.trim_end().replace('\n', " "),
            fds.len(),
            if fds.len() == 1 { "" } else { "s" }
        );
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs = if raw.is_empty() { &[][..] } else { &cmsgs[..] };
        let to = match (self.addr.as_pathname(), self.addr.as_abstract_name()) {
            (Some(p), _) => UnixAddr::new(p),
            (None, Some(n)) => UnixAddr::new_abstract(n),
            (None, None) => Err(nix::Error::EDESTADDRREQ),
        };
        let sent = to.and_then(|to| {
            let iov = [IoSlice::new(text.as_bytes())];
            sendmsg(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::empty(),
                Some(&to),
            )
        });
        if let Err(e) = sent {
            if !self.warned {
                warn!("cannot send to the service manager's fd store: {e}");
                self.warned = true;
            }
            return false;
        }
        true
    }

    /// Sends one datagram. Failures are logged once and otherwise ignored: systemd may be gone.
    pub fn send(&mut self, msgs: &[ManagerMsg]) {
        let mut text = format_manager(msgs);
        if msgs.contains(&ManagerMsg::Ready) {
            if let Some(pid) = self.mainpid.take() {
                text.push_str(&format!("{}\n", NotifyState::MainPid(pid)));
            }
        }
        debug!(
            "notifying the service manager: {}",
            text.trim_end().replace('\n', " ")
        );
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

/// WATCHDOG_USEC/WATCHDOG_PID as sd_watchdog_enabled(3) reads them; a value past a year is
/// taken as a year.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(my_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec).min(MAX_WATCHDOG))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            watchdog_interval(Some("18446744073709551615"), None, 5),
            Some(MAX_WATCHDOG),
            "u64::MAX would overflow every deadline"
        );
    }

    proptest::proptest! {
        #[test]
        fn watchdog_env_never_panics_and_is_bounded(usec in ".*", pid in proptest::option::of(".*")) {
            if let Some(d) = watchdog_interval(Some(&usec), pid.as_deref(), 7) {
                proptest::prop_assert!(d > Duration::ZERO && d <= MAX_WATCHDOG);
            }
        }
    }
}
