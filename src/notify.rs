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

use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt};
use socket2::{Domain, SockAddr, Socket, Type};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::pool::{WorkerId, WorkerMsg};

/// systemd's own limit for one notification datagram (NOTIFY_BUFFER_MAX = PIPE_BUF).
pub const MAX_DATAGRAM: usize = 4096;
/// Datagrams read from one worker socket before yielding to the rest of the loop.
const BUDGET: usize = 32;
/// A STATUS= longer than this is cut.
const MAX_STATUS: usize = 256;
/// Control-message buffer: room for credentials and SCM_MAX_FD (253) fds several times over,
/// so that what the kernel can attach fits; should it not, the fds that did arrive are still
/// found and closed.
const CMSG_BUF: usize = 4096;
/// Attempts at a fresh random name when one is taken.
const NAME_ATTEMPTS: usize = 8;
/// `sun_path` holds 108 bytes with the NUL; leave room for the socket's own name.
const MAX_DIR_LEN: usize = 80;

#[derive(Debug, Error)]
pub enum NotifyError {
    #[error("cannot create the notification socket for worker {id}: {source}")]
    Socket {
        id: WorkerId,
        source: std::io::Error,
    },
}

/// 64 random bits from the kernel (getrandom(2)): names nobody can predict.
fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is valid for writes of its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No getrandom (very old kernel): the time and our pid, still unique per herder.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 40);
    }
    u64::from_ne_bytes(b)
}

/// Where the workers' sockets live.
#[derive(Debug)]
enum Place {
    Dir(PathBuf),
    Abstract(String),
}

/// The workers' notify sockets: where they live and who may use them.
#[derive(Debug)]
pub struct NotifySockets {
    place: Place,
    /// Owner of each socket file, when workers run as another uid (`--user`).
    owner: Option<(u32, u32)>,
}

impl NotifySockets {
    /// Chooses the place: a fresh private directory in the first of `$RUNTIME_DIRECTORY`,
    /// `$XDG_RUNTIME_DIR`, `/run`, `$TMPDIR`, `/tmp` and `/dev/shm` (a tmpfs in containers,
    /// even `FROM scratch` ones) where one can be made; else abstract names. `worker` is the
    /// uid and gid workers run as. Called during setup.
    pub fn new(worker: (u32, u32)) -> NotifySockets {
        let me = nix::unistd::geteuid().as_raw();
        let owner = (worker.0 != me).then_some(worker);
        let mut bases: Vec<PathBuf> = Vec::new();
        for var in ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"] {
            if let Some(v) = std::env::var_os(var) {
                bases.extend(std::env::split_paths(&v).next());
            }
        }
        bases.push("/run".into());
        bases.extend(std::env::var_os("TMPDIR").map(PathBuf::from));
        bases.push("/tmp".into());
        bases.push("/dev/shm".into());
        for base in bases.iter().filter(|b| b.is_absolute()) {
            if let Some(dir) = private_dir(base, owner.is_some()) {
                info!(dir = %dir.display(), "worker notify sockets");
                return NotifySockets {
                    place: Place::Dir(dir),
                    owner,
                };
            }
        }
        let prefix = format!("{}-{:016x}", std::process::id(), random_u64());
        warn!(
            "no writable directory for the worker notify sockets: using abstract sockets \
             (reachable from this network namespace; senders are checked by uid, pid \
             namespace and process tree)"
        );
        NotifySockets {
            place: Place::Abstract(prefix),
            owner,
        }
    }

    /// Binds worker `id`'s socket, with SO_PASSCRED set before any datagram can arrive.
    pub fn bind(&self, id: WorkerId) -> Result<WorkerSocket, NotifyError> {
        let err = |source| NotifyError::Socket { id, source };
        let sock =
            Socket::new(Domain::UNIX, Type::DGRAM.nonblocking().cloexec(), None).map_err(err)?;
        // SCM_CREDENTIALS on every datagram, sent with them or not (unix(7) SO_PASSCRED).
        socket::setsockopt(&sock, sockopt::PassCred, &true).map_err(|e| err(e.into()))?;
        match &self.place {
            Place::Dir(dir) => {
                let path = dir.join(id.to_string());
                // Ours alone: a file of that name can only be a leftover of our own.
                let _ = std::fs::remove_file(&path);
                let addr = SockAddr::unix(&path).map_err(err)?;
                // 0600 from the start (umask), so no other uid can ever send to it. herder's
                // loop is single-threaded: no file is created concurrently under this umask,
                // and workers are forked after it is restored.
                let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                let bound = sock.bind(&addr);
                nix::sys::stat::umask(old);
                bound.map_err(err)?;
                let guard = PathGuard(path.clone());
                if let Some((uid, gid)) = self.owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(err)?;
                }
                Ok(WorkerSocket {
                    fd: sock.into(),
                    address: path.display().to_string(),
                    _path: Some(guard),
                })
            }
            Place::Abstract(prefix) => {
                let mut last = None;
                for _ in 0..NAME_ATTEMPTS {
                    let name = format!("herder/{prefix}/{id}-{:016x}", random_u64());
                    let raw: Vec<u8> = std::iter::once(0).chain(name.bytes()).collect();
                    let addr =
                        SockAddr::unix(PathBuf::from(OsString::from_vec(raw))).map_err(err)?;
                    match sock.bind(&addr) {
                        Ok(()) => {
                            return Ok(WorkerSocket {
                                fd: sock.into(),
                                address: format!("@{name}"),
                                _path: None,
                            })
                        }
                        // Taken (by chance, or by someone who wants it): another name.
                        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                            warn!(name, "notify socket name taken: trying another");
                            last = Some(e);
                        }
                        Err(e) => return Err(err(e)),
                    }
                }
                Err(err(
                    last.unwrap_or_else(|| std::io::Error::other("no free name"))
                ))
            }
        }
    }

    /// Removes the directory (at exit; the sockets in it are gone with their workers).
    pub fn remove(&self) {
        if let Place::Dir(dir) = &self.place {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Makes `base/herder-<pid>-<random>`, exclusively (a name someone else made is skipped).
fn private_dir(base: &Path, other_uid: bool) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !base.is_dir() || base.as_os_str().len() > MAX_DIR_LEN - 40 {
        return None;
    }
    for _ in 0..NAME_ATTEMPTS {
        let dir = base.join(format!(
            "herder-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // Workers of another uid need to reach their socket: search, not list.
                let mode = if other_uid { 0o711 } else { 0o700 };
                if std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).is_err() {
                    let _ = std::fs::remove_dir(&dir);
                    return None;
                }
                return Some(dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Unlinks a socket file when its socket goes.
#[derive(Debug)]
struct PathGuard(PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A worker's private NOTIFY_SOCKET, bound before its fork.
#[derive(Debug)]
pub struct WorkerSocket {
    fd: OwnedFd,
    /// What the worker gets as NOTIFY_SOCKET: a path, or `@name`.
    pub address: String,
    _path: Option<PathGuard>,
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
                            warn!(pid, ?verdict, "dropping notifications from a sender that may not speak for the worker (logged once)");
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
    /// (pid, uid) from SCM_CREDENTIALS.
    sender: Option<(i32, u32)>,
    truncated: bool,
}

/// Control-message buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF]);

/// One non-blocking recvmsg(2): `Ok(None)` when the queue is empty. Every fd that came along
/// (SCM_RIGHTS) is closed, also when the control data was truncated (MSG_CTRUNC: the kernel
/// installed the fds that fit and dropped the rest). Written against libc, not nix's
/// `cmsgs()`, because that refuses to walk truncated control data — which is exactly when
/// fds must still be found and closed.
fn recv_one(fd: RawFd) -> std::io::Result<Option<Datagram>> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = CmsgBuf([0u8; CMSG_BUF]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_BUF as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC;
    // SAFETY: `msg` points at live buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of `cmsg`; CMSG_FIRSTHDR/NXTHDR stay
    // within them, and every header they return is checked against the buffer's end.
    let sender = unsafe { walk_cmsgs(&msg) };
    let len = n as usize;
    let truncated = msg.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_DATAGRAM;
    buf.truncate(len.min(MAX_DATAGRAM));
    Ok(Some(Datagram {
        data: buf,
        sender,
        truncated,
    }))
}

/// Closes every passed fd and returns the credentials, from the control data of `msg`.
unsafe fn walk_cmsgs(msg: &libc::msghdr) -> Option<(i32, u32)> {
    let start = msg.msg_control as usize;
    // (socklen_t on musl, size_t on glibc.)
    #[allow(clippy::unnecessary_cast)]
    let end = start + (msg.msg_controllen as usize).min(CMSG_BUF);
    let mut sender = None;
    let mut c = libc::CMSG_FIRSTHDR(msg);
    while !c.is_null() {
        let data = libc::CMSG_DATA(c) as usize;
        // The payload, as far as it lies inside what the kernel wrote.
        let avail = (c as usize + (*c).cmsg_len as usize)
            .min(end)
            .saturating_sub(data);
        match ((*c).cmsg_level, (*c).cmsg_type) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                let count = avail / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let p = (data as *const RawFd).add(i);
                    let fd = std::ptr::read_unaligned(p);
                    if fd >= 0 {
                        // SAFETY: the kernel just installed this fd for us; nobody else owns it.
                        drop(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
                if avail >= std::mem::size_of::<libc::ucred>() =>
            {
                let cred = std::ptr::read_unaligned(data as *const libc::ucred);
                sender = Some((cred.pid, cred.uid));
            }
            _ => {}
        }
        c = libc::CMSG_NXTHDR(msg, c);
    }
    sender
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

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

    fn fds_open() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    /// Sends `n` fds of /dev/null in one datagram (the kernel takes up to SCM_MAX_FD, 253).
    fn send_fds(to: &UnixDatagram, n: usize) -> std::io::Result<usize> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let null = std::fs::File::open("/dev/null").unwrap();
        let fds: Vec<RawFd> = vec![null.as_raw_fd(); n];
        let iov = [std::io::IoSlice::new(b"READY=1")];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(to.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(Into::into)
    }

    #[test]
    fn passed_fds_are_closed_even_when_the_control_data_is_truncated() {
        let (a, b) = UnixDatagram::pair().unwrap();
        socket::setsockopt(&b, sockopt::PassCred, &true).unwrap();
        b.set_nonblocking(true).unwrap();
        let before = fds_open();
        for n in [1, 16, 17, 200, 253] {
            send_fds(&a, n).unwrap();
            let d = recv_one(b.as_raw_fd()).unwrap().expect("a datagram");
            assert_eq!(d.data, b"READY=1");
            assert!(d.sender.is_some(), "credentials with {n} fds");
            assert_eq!(fds_open(), before, "{n} fds came and went");
        }
        assert!(recv_one(b.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn a_truncating_control_buffer_still_closes_the_fds_that_arrived() {
        // Receive with a deliberately small buffer: MSG_CTRUNC, some fds installed.
        let (a, b) = UnixDatagram::pair().unwrap();
        let before = fds_open();
        send_fds(&a, 100).unwrap();
        let mut buf = [0u8; 64];
        let mut small = CmsgBuf([0u8; CMSG_BUF]);
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as in recv_one, with a control length of 64 bytes.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = small.0.as_mut_ptr().cast();
            msg.msg_controllen = 64;
            assert!(libc::recvmsg(b.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) > 0);
            assert!(msg.msg_flags & libc::MSG_CTRUNC != 0);
            assert!(fds_open() > before, "the kernel installed some");
            walk_cmsgs(&msg);
        }
        assert_eq!(fds_open(), before);
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
