//! The test's side of systemd: a NOTIFY_SOCKET that takes every FDSTORE=1 datagram with its
//! fds, a launcher that passes stored fds back at 3, 4, … with LISTEN_PID, and the /proc
//! readers the tests check herder and its workers with.
#![allow(dead_code)]

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use socket2::{Domain, SockRef, Socket, Type};

use crate::common::*;

/// Puts the fds it is given (by number, argv[1] of them) at 3, 4, …, sets LISTEN_PID to its own
/// pid and execs the rest of argv: herder then has the fds and LISTEN_PID of a socket-activated
/// service.
pub const LAUNCHER: &str = r#"
import os, sys
n = int(sys.argv[1])
srcs = [int(a) for a in sys.argv[2:2 + n]]
for i, fd in enumerate(srcs):
    os.dup2(fd, 3 + i)
for fd in srcs:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2 + n], sys.argv[2 + n:])
"#;

pub const SLEEPER: [&str; 3] = ["sh", "-c", "exec sleep 600"];

/// One datagram to the test's NOTIFY_SOCKET, with the fds it carried.
pub struct Datagram {
    pub text: String,
    pub fds: Vec<OwnedFd>,
}

impl Datagram {
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    pub fn fdname(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("FDNAME="))
    }

    pub fn is_push(&self) -> bool {
        self.has("FDSTORE=1")
    }

    pub fn is_remove(&self) -> bool {
        self.has("FDSTOREREMOVE=1")
    }
}

/// systemd's side of NOTIFY_SOCKET: every datagram, in order, with its SCM_RIGHTS fds.
pub struct Manager {
    pub path: PathBuf,
    pub sock: UnixDatagram,
    pub got: Vec<Datagram>,
}

impl Manager {
    pub fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        Manager {
            sock: UnixDatagram::bind(&path).expect("bind the notify socket"),
            path,
            got: Vec::new(),
        }
    }

    /// Reads one datagram if one comes within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> bool {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = vec![0u8; 65536];
        // Room for SCM_MAX_FD (253) fds: whatever herder sends, nothing is cut off.
        let mut cmsg = nix::cmsg_space!([RawFd; 253]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        // Close-on-exec at once: no herder another test starts may inherit them.
        let msg = match recvmsg::<UnixAddr>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => return false,
            Err(e) => panic!("recvmsg: {e}"),
        };
        assert!(
            !msg.flags.contains(MsgFlags::MSG_CTRUNC),
            "control data cut off"
        );
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds for us; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        eprintln!("  notify: {:?} with {} fd(s)", text, fds.len());
        self.got.push(Datagram { text, fds });
        true
    }

    /// Waits for a datagram at index `from` or later that satisfies `pred`; its index.
    pub fn wait(&mut self, from: usize, what: &str, pred: impl Fn(&Datagram) -> bool) -> usize {
        let deadline = Instant::now() + LONG;
        let mut i = from;
        loop {
            while i < self.got.len() {
                if pred(&self.got[i]) {
                    return i;
                }
                i += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no datagram {what} within {LONG:?}; got: {:#?}",
                self.texts(from)
            );
            self.recv(left);
        }
    }

    /// READY=1 at `from` or later. herder pushes at setup, before its workers start, over the
    /// same socket: when READY=1 is here, every push of that setup is here too.
    pub fn wait_ready(&mut self, from: usize) -> usize {
        self.wait(from, "READY=1", |d| d.has("READY=1"))
    }

    pub fn texts(&self, from: usize) -> Vec<&str> {
        self.got[from..].iter().map(|d| d.text.as_str()).collect()
    }

    /// The pushes in `range`: (FDNAME, a copy of the fd).
    pub fn pushes(&self, range: std::ops::Range<usize>) -> Vec<(String, OwnedFd)> {
        self.got[range]
            .iter()
            .filter(|d| d.is_push())
            .map(|d| {
                assert_eq!(d.fds.len(), 1, "one fd per push: {:?}", d.text);
                let fd = d.fds[0].try_clone().unwrap();
                (d.fdname().expect("FDNAME=").to_string(), fd)
            })
            .collect()
    }

    pub fn removals(&self, range: std::ops::Range<usize>) -> Vec<String> {
        self.got[range]
            .iter()
            .filter(|d| d.is_remove())
            .map(|d| {
                assert!(d.fds.is_empty(), "FDSTOREREMOVE=1 carries no fd");
                d.fdname().expect("FDNAME=").to_string()
            })
            .collect()
    }

    /// Index of the push of `name` at `from` or later.
    pub fn push_of(&self, from: usize, name: &str) -> Option<usize> {
        (from..self.got.len())
            .find(|&i| self.got[i].is_push() && self.got[i].fdname() == Some(name))
    }

    pub fn removal_of(&self, from: usize, name: &str) -> Option<usize> {
        (from..self.got.len())
            .find(|&i| self.got[i].is_remove() && self.got[i].fdname() == Some(name))
    }
}

/// Starts herder with `args -- command`, NOTIFY_SOCKET at `manager`, `FDSTORE=fdstore` when
/// given, and `passed` at fds 3.. with their names in LISTEN_FDNAMES.
pub fn start(
    args: &[&str],
    command: &[&str],
    manager: &Manager,
    fdstore: Option<&str>,
    passed: &[(&str, BorrowedFd<'_>)],
) -> Herder {
    start_via(herder_bin(), args, command, manager, fdstore, passed)
}

/// [`start`] with `program` (herder, or something that execs herder in the same process).
pub fn start_via(
    program: &str,
    args: &[&str],
    command: &[&str],
    manager: &Manager,
    fdstore: Option<&str>,
    passed: &[(&str, BorrowedFd<'_>)],
) -> Herder {
    // Copies far above 3.., close-on-exec in this process (which starts other herders at the
    // same time); only the launcher's child gets them, and moves them to 3.., in order.
    let high: Vec<OwnedFd> = passed
        .iter()
        .map(|(_, fd)| {
            // SAFETY: F_DUPFD_CLOEXEC on an fd we hold; the new fd is ours.
            let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
            assert!(n >= 100, "dup: {}", std::io::Error::last_os_error());
            // SAFETY: just created, owned by nobody else.
            unsafe { OwnedFd::from_raw_fd(n) }
        })
        .collect();
    let raw: Vec<RawFd> = high.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = if passed.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("python3");
        c.args(["-c", LAUNCHER, &raw.len().to_string()])
            .args(raw.iter().map(|r| r.to_string()))
            .arg(which(program));
        let names: Vec<&str> = passed.iter().map(|(n, _)| *n).collect();
        c.env("LISTEN_FDS", passed.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let fds = raw.clone();
        // SAFETY: only fcntl(2), async-signal-safe, on fds that are open; no allocation.
        unsafe {
            c.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        c
    };
    cmd.args(args).arg("--").args(command);
    cmd.env("HERDER_LOG", "info")
        .env("NOTIFY_SOCKET", &manager.path)
        .env_remove("LISTEN_PID")
        .env_remove("FDSTORE");
    if passed.is_empty() {
        cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
    }
    if let Some(n) = fdstore {
        cmd.env("FDSTORE", n);
    }
    let h = Herder::spawn(cmd);
    drop(high);
    h
}

/// `program` as a path (the launcher's execv does not search PATH).
pub fn which(program: &str) -> String {
    if program.contains('/') {
        return program.into();
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} is not installed"))
        .to_string_lossy()
        .to_string()
}

pub fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino
}

pub fn local(fd: BorrowedFd<'_>) -> SocketAddr {
    SockRef::from(&fd)
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an inet socket")
}

pub fn fd_links(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The socket inodes a process holds, by fd.
pub fn socket_inodes(pid: i32) -> Vec<(i32, u64)> {
    fd_links(pid)
        .into_iter()
        .filter_map(|(fd, t)| {
            let ino = t
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, ino))
        })
        .collect()
}

pub fn holds(pid: i32, ino: u64) -> bool {
    socket_inodes(pid).iter().any(|&(_, i)| i == ino)
}

/// The worker of each slot, from herder's `worker S (pid P) spawned …` lines (the latest),
/// once `n` have been printed.
pub fn workers(h: &mut Herder, n: usize) -> Vec<(usize, i32)> {
    h.wait_nth_line(&[SPAWNED], n, LONG);
    let mut by_slot = std::collections::BTreeMap::new();
    for l in h.lines().iter().filter(|l| l.contains(SPAWNED)) {
        let slot = field(l, "slot").and_then(|s| s.parse().ok());
        let pid = field(l, "pid").and_then(|s| s.parse().ok());
        if let (Some(s), Some(p)) = (slot, pid) {
            by_slot.insert(s, p);
        }
    }
    by_slot.into_iter().collect()
}

/// Waits until a `sh -c 'exec sleep 600'` worker runs sleep with its final environment.
pub fn exec_settled(pid: i32) {
    let comm = |pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // The new comm shows a moment before the new environment does: wait for both.
    eventually("the worker to exec sleep", LONG, || {
        comm(pid).trim() == "sleep" && !environ(pid).is_empty()
    });
}

pub fn valid_fdname(n: &str) -> bool {
    // sd_notify(3): at most 255 characters, no control characters, no ':'.
    !n.is_empty() && n.len() <= 255 && n.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':')
}

/// A listening TCP socket on 127.0.0.1, optionally with SO_REUSEPORT (a socket unit's).
pub fn tcp_listener(reuseport: bool) -> OwnedFd {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_port(reuseport).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(128).unwrap();
    s.into()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn shuffled<T>(mut v: Vec<T>) -> Vec<T> {
    // A fixed, non-trivial permutation: last first, then the rest in order.
    if v.len() > 1 {
        let last = v.len() - 1;
        v.rotate_right(1);
        v.swap(1, last);
    }
    v
}

pub const POOL: [&str; 7] = [
    "-l",
    "127.0.0.1:0",
    "--reuseport",
    "-w",
    "2",
    "--health",
    "127.0.0.1:0",
];
