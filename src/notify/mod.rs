//! sd_notify(3) down from the workers: every worker gets a NOTIFY_SOCKET of its own, a
//! datagram socket herder binds before the fork, so a message's worker is known from the
//! socket it arrives on, never from a sender pid that may already be gone (`systemd-notify`
//! from a shell script exits at once).
//!
//! The channel belongs to the worker. The sockets live in a directory herder creates for
//! itself (mode 0700; 0711 when workers run as another uid, each socket file then owned by
//! that uid), mode 0600: only the worker's uid and root can send, and nobody can claim a
//! name before herder binds it. Only when no directory is writable (a read-only root with
//! no `/tmp`, `/run` or `/dev/shm`) do they fall back to abstract names, random per socket and
//! retried on a collision; those anyone in the network namespace can reach, so there the
//! checks below are the only defence. Every datagram's credentials are read (SO_PASSCRED):
//! a sender in another pid namespace (pid 0), of another uid than the worker's, herder's or
//! root, or outside the worker's process tree is dropped. Passed fds are closed in every
//! case, truncated control data included. Datagrams are capped, garbage is ignored, and a
//! bounded number is read per wake-up so a flood cannot starve the event loop.
//!
//! [`place`] makes and owns the sockets; [`recv`] reads one datagram and disposes of whatever
//! came with it; this file judges the sender, parses the text and feeds the event loop.

mod place;
mod recv;

use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::pool::{WorkerId, WorkerMsg};

pub use place::{NotifySockets, WorkerSocket};
use recv::recv_one;

/// systemd's own limit for one notification datagram (NOTIFY_BUFFER_MAX = PIPE_BUF).
pub const MAX_DATAGRAM: usize = 4096;
/// Datagrams read from one worker socket before yielding to the rest of the loop.
const BUDGET: usize = 32;
/// A STATUS= longer than this is cut.
const MAX_STATUS: usize = 256;

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

/// Who may speak for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// No credentials came along (cannot happen with SO_PASSCRED; dropped all the same).
    NoCredentials,
    /// pid 0: the sender is in a pid namespace herder cannot see into.
    OtherPidNamespace,
    OtherUid(u32),
    OutsideTree(i32),
}

/// Why a sender was dropped, for the log line.
impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Accepted => write!(f, "accepted"),
            Verdict::NoCredentials => write!(f, "no credentials"),
            Verdict::OtherPidNamespace => write!(f, "sent from another pid namespace"),
            Verdict::OtherUid(uid) => write!(f, "uid {uid} is not the worker's, herder's or root"),
            Verdict::OutsideTree(pid) => write!(
                f,
                "pid {pid} is not the worker, in its process group or a descendant"
            ),
        }
    }
}

/// Judges a datagram's sender `(pid, uid)` for the worker `worker_pid` running as
/// `worker_uid`: its uid must be the worker's, herder's or root's, and it must be the worker,
/// in its process group, or a descendant — or have exited already, which cannot be checked
/// (`systemd-notify` from a script exits at once; its uid was checked).
pub fn judge(sender: Option<(i32, u32)>, worker_pid: i32, worker_uid: u32, my_uid: u32) -> Verdict {
    let Some((pid, uid)) = sender else {
        return Verdict::NoCredentials;
    };
    if pid <= 0 {
        return Verdict::OtherPidNamespace;
    }
    if uid != 0 && uid != my_uid && uid != worker_uid {
        return Verdict::OtherUid(uid);
    }
    if !in_tree(pid, worker_pid) {
        return Verdict::OutsideTree(pid);
    }
    Verdict::Accepted
}

/// Whether `sender` is the worker `worker_pid`, in its process group, or a descendant (or is
/// gone before it could be looked at).
fn in_tree(sender: i32, worker_pid: i32) -> bool {
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

/// Reads a worker's socket until the task is aborted (when the worker is reaped); the socket
/// (and its file) go with the task.
pub async fn serve_worker(
    sock: WorkerSocket,
    id: WorkerId,
    pid: i32,
    worker_uid: u32,
    tx: mpsc::Sender<Incoming>,
) {
    let WorkerSocket { fd, _path, .. } = sock;
    // SAFETY: an OwnedFd stays open and refers to the same socket for as long as the AsyncFd
    // owns it (register_with_interest's contract).
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) else {
        return;
    };
    let mut foreign_logged = false;
    let my_uid = nix::unistd::geteuid().as_raw();
    loop {
        let Ok(mut guard) = fd.readable().await else {
            return;
        };
        for _ in 0..BUDGET {
            match recv_one(fd.get_ref().as_raw_fd()) {
                Ok(Some(d)) => {
                    let verdict = judge(d.sender, pid, worker_uid, my_uid);
                    if verdict != Verdict::Accepted {
                        if !foreign_logged {
                            warn!(
                                pid,
                                ?verdict,
                                "dropping notifications to the worker with pid {pid} from a \
                                 sender that may not speak for the worker: {verdict} (logged once)"
                            );
                            foreign_logged = true;
                        }
                        continue;
                    }
                    if d.truncated {
                        warn!(
                            pid,
                            "dropping an oversized notification to the worker with pid {pid} \
                             (over {MAX_DATAGRAM} bytes)"
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
                    debug!(
                        pid,
                        "notify socket of the worker with pid {pid}: read failed: {e}"
                    );
                    guard.clear_ready();
                    break;
                }
            }
        }
        tokio::task::yield_now().await;
    }
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
                assert_eq!(s.chars().count(), MAX_STATUS);
                assert!(!s.contains('\x1b'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn senders_are_judged_by_namespace_uid_and_tree() {
        let me = std::process::id() as i32;
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(judge(Some((me, uid)), me, uid, uid), Verdict::Accepted);
        assert_eq!(judge(None, me, uid, uid), Verdict::NoCredentials);
        assert_eq!(
            judge(Some((0, 0)), me, uid, uid),
            Verdict::OtherPidNamespace
        );
        assert_eq!(
            judge(Some((me, 4242)), me, 1000, 1001),
            Verdict::OtherUid(4242)
        );
        // Our parent is not in our tree.
        let parent = nix::unistd::getppid().as_raw();
        if parent > 1 {
            assert_eq!(
                judge(Some((parent, uid)), me, uid, uid),
                Verdict::OutsideTree(parent)
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_datagram_parses_without_panic_and_statuses_are_clean(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..MAX_DATAGRAM)
        ) {
            for m in parse_worker(&data) {
                if let WorkerMsg::Status(s) = m {
                    proptest::prop_assert!(s.chars().count() <= MAX_STATUS);
                    proptest::prop_assert!(!s.chars().any(char::is_control));
                }
            }
        }

        #[test]
        fn known_lines_round_trip(msgs in proptest::collection::vec(0u8..6, 0..20), status in "[ -~]{0,300}", errno in 0i32..10_000) {
            let mut text = String::new();
            let mut expect = Vec::new();
            for m in msgs {
                let (line, msg) = match m {
                    0 => ("READY=1".to_string(), WorkerMsg::Ready),
                    1 => ("STOPPING=1".to_string(), WorkerMsg::Stopping),
                    2 => ("WATCHDOG=1".to_string(), WorkerMsg::Watchdog),
                    3 => ("WATCHDOG=trigger".to_string(), WorkerMsg::WatchdogTrigger),
                    4 => (format!("STATUS={status}"), WorkerMsg::Status(status.chars().take(MAX_STATUS).collect())),
                    _ => (format!("ERRNO={errno}"), WorkerMsg::Errno(errno)),
                };
                text.push_str(&line);
                text.push('\n');
                expect.push(msg);
            }
            proptest::prop_assert_eq!(parse_worker(text.as_bytes()), expect);
        }
    }
}
