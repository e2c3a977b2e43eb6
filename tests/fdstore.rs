//! herder's sockets in systemd's fd store, end to end. The test plays systemd: its NOTIFY_SOCKET
//! takes every FDSTORE=1 datagram with its fds (SCM_RIGHTS) and FDNAME=, and a restart passes
//! the stored fds back the way systemd does (sd_listen_fds(3)): the socket unit's fds first, then
//! the store's in no particular order, with LISTEN_FDNAMES the names they were stored under and
//! LISTEN_PID the pid of herder itself (a launcher sets it, then execs herder).

mod common;

use std::collections::BTreeSet;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use socket2::{Domain, SockRef, Socket, Type};

use common::*;

/// Puts the fds it is given (by number, argv[1] of them) at 3, 4, …, sets LISTEN_PID to its own
/// pid and execs the rest of argv: herder then has the fds and LISTEN_PID of a socket-activated
/// service.
const LAUNCHER: &str = r#"
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

const SLEEPER: [&str; 3] = ["sh", "-c", "exec sleep 600"];

/// One datagram to the test's NOTIFY_SOCKET, with the fds it carried.
struct Datagram {
    text: String,
    fds: Vec<OwnedFd>,
}

impl Datagram {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    fn fdname(&self) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix("FDNAME="))
    }

    fn is_push(&self) -> bool {
        self.has("FDSTORE=1")
    }

    fn is_remove(&self) -> bool {
        self.has("FDSTOREREMOVE=1")
    }
}

/// systemd's side of NOTIFY_SOCKET: every datagram, in order, with its SCM_RIGHTS fds.
struct Manager {
    path: PathBuf,
    sock: UnixDatagram,
    got: Vec<Datagram>,
}

impl Manager {
    fn bind(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        Manager {
            sock: UnixDatagram::bind(&path).expect("bind the notify socket"),
            path,
            got: Vec::new(),
        }
    }

    /// Reads one datagram if one comes within `timeout`.
    fn recv(&mut self, timeout: Duration) -> bool {
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
    fn wait(&mut self, from: usize, what: &str, pred: impl Fn(&Datagram) -> bool) -> usize {
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
    fn wait_ready(&mut self, from: usize) -> usize {
        self.wait(from, "READY=1", |d| d.has("READY=1"))
    }

    fn texts(&self, from: usize) -> Vec<&str> {
        self.got[from..].iter().map(|d| d.text.as_str()).collect()
    }

    /// The pushes in `range`: (FDNAME, a copy of the fd).
    fn pushes(&self, range: std::ops::Range<usize>) -> Vec<(String, OwnedFd)> {
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

    fn removals(&self, range: std::ops::Range<usize>) -> Vec<String> {
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
    fn push_of(&self, from: usize, name: &str) -> Option<usize> {
        (from..self.got.len())
            .find(|&i| self.got[i].is_push() && self.got[i].fdname() == Some(name))
    }

    fn removal_of(&self, from: usize, name: &str) -> Option<usize> {
        (from..self.got.len())
            .find(|&i| self.got[i].is_remove() && self.got[i].fdname() == Some(name))
    }
}

/// Starts herder with `args -- command`, NOTIFY_SOCKET at `manager`, `FDSTORE=fdstore` when
/// given, and `passed` at fds 3.. with their names in LISTEN_FDNAMES.
fn start(
    args: &[&str],
    command: &[&str],
    manager: &Manager,
    fdstore: Option<&str>,
    passed: &[(&str, BorrowedFd<'_>)],
) -> Herder {
    start_via(herder_bin(), args, command, manager, fdstore, passed)
}

/// [`start`] with `program` (herder, or something that execs herder in the same process).
fn start_via(
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
fn which(program: &str) -> String {
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

fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_ino
}

fn local(fd: BorrowedFd<'_>) -> SocketAddr {
    SockRef::from(&fd)
        .local_addr()
        .unwrap()
        .as_socket()
        .expect("an inet socket")
}

fn fd_links(pid: i32) -> Vec<(i32, String)> {
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
fn socket_inodes(pid: i32) -> Vec<(i32, u64)> {
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

fn holds(pid: i32, ino: u64) -> bool {
    socket_inodes(pid).iter().any(|&(_, i)| i == ino)
}

fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}

/// The worker of each slot, from herder's `worker S (pid P) spawned …` lines (the latest),
/// once `n` have been printed.
fn workers(h: &mut Herder, n: usize) -> Vec<(usize, i32)> {
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
fn exec_settled(pid: i32) {
    let comm = |pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    // The new comm shows a moment before the new environment does: wait for both.
    eventually("the worker to exec sleep", LONG, || {
        comm(pid).trim() == "sleep" && !environ(pid).is_empty()
    });
}

fn health_addr(h: &mut Herder) -> SocketAddr {
    let line = h.wait_line(&["health endpoint", "addr="], LONG);
    field(&line, "addr").unwrap().parse().unwrap()
}

fn valid_fdname(n: &str) -> bool {
    // sd_notify(3): at most 255 characters, no control characters, no ':'.
    !n.is_empty() && n.len() <= 255 && n.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b':')
}

/// A listening TCP socket on 127.0.0.1, optionally with SO_REUSEPORT (a socket unit's).
fn tcp_listener(reuseport: bool) -> OwnedFd {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_port(reuseport).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(128).unwrap();
    s.into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn shuffled<T>(mut v: Vec<T>) -> Vec<T> {
    // A fixed, non-trivial permutation: last first, then the rest in order.
    if v.len() > 1 {
        let last = v.len() - 1;
        v.rotate_right(1);
        v.swap(1, last);
    }
    v
}

const POOL: [&str; 7] = [
    "-l",
    "127.0.0.1:0",
    "--reuseport",
    "-w",
    "2",
    "--health",
    "127.0.0.1:0",
];

#[test]
fn every_socket_herder_binds_is_pushed_under_a_name_of_its_own() {
    let dir = TempDir::new("push");
    let mut m = Manager::bind(dir.path());
    let mut h = start(&POOL, &SLEEPER, &m, Some("16"), &[]);
    let addr = h.addr();
    let health = health_addr(&mut h);
    let ready = m.wait_ready(0);
    let pushes = m.pushes(0..ready);
    let names: Vec<&str> = pushes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        pushes.len(),
        3,
        "listen, slot 1's sibling, health: {names:?}"
    );
    let distinct: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{names:?}");
    for n in &names {
        assert!(valid_fdname(n) && n.starts_with("herder/"), "{n:?}");
    }
    // The documented scheme: a --listen socket by what it asks for, a sibling by where its
    // listener is bound.
    let find = |n: &str| {
        pushes
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("no push of {n}: {names:?}"))
            .1
            .as_fd()
    };
    let listen = find("herder/listen-tcp-127.0.0.1%3A0");
    let sibling = find(&format!("herder/slot1-tcp-127.0.0.1%3A{}", addr.port()));
    let health_fd = find("herder/health-tcp-127.0.0.1%3A0");
    assert_eq!(local(listen), addr);
    assert_eq!(local(sibling), addr);
    assert_eq!(local(health_fd), health);
    assert_ne!(inode(listen), inode(sibling));
    // They are the very sockets herder and its workers hold.
    for fd in [listen, sibling, health_fd] {
        assert!(holds(h.pid(), inode(fd)), "herder holds {}", inode(fd));
    }
    let w = workers(&mut h, 2);
    assert_eq!(w.len(), 2);
    for (slot, pid) in w {
        exec_settled(pid);
        let want = if slot == 0 { listen } else { sibling };
        eventually("the worker's fd 3", LONG, || {
            socket_inodes(pid).contains(&(3, inode(want)))
        });
        let env = environ(pid);
        assert!(
            !env.iter().any(|e| e.starts_with("FDSTORE=")),
            "FDSTORE is herder's, not the workers': {env:?}"
        );
    }
}

#[test]
fn nothing_is_pushed_without_fdstore_unless_fd_store_is_given() {
    let dir = TempDir::new("nopush");
    let mut m = Manager::bind(dir.path());
    let h = start(&POOL, &SLEEPER, &m, None, &[]);
    let ready = m.wait_ready(0);
    assert!(
        m.got[..=ready]
            .iter()
            .all(|d| d.fds.is_empty() && !d.is_push()),
        "no FDSTORE, no --fd-store: nothing pushed; got {:#?}",
        m.texts(0)
    );
    drop(h);
    // systemd 252 sets no $FDSTORE: --fd-store says the store is there.
    let mut args = POOL.to_vec();
    args.push("--fd-store");
    let mut h = start(&args, &SLEEPER, &m, None, &[]);
    let from = m.got.len();
    let addr = h.addr();
    let ready = m.wait_ready(from);
    let mut names: Vec<String> = m.pushes(from..ready).into_iter().map(|p| p.0).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "herder/health-tcp-127.0.0.1%3A0".to_string(),
            "herder/listen-tcp-127.0.0.1%3A0".into(),
            format!("herder/slot1-tcp-127.0.0.1%3A{}", addr.port()),
        ]
    );
}

/// `threads` clients, each making a new connection per request until `stop` (at most 100000
/// each): how many succeeded, how many were refused.
fn load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: usize,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Vec<std::thread::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let handles = (0..threads)
        .map(|_| {
            let (ok, refused, stop) = (ok.clone(), refused.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 100_000 {
                    n += 1;
                    match get(addr, "/") {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::SeqCst)
                        }
                        Err(_) => 0,
                    };
                }
            })
        })
        .collect();
    (ok, refused, handles)
}

#[test]
fn a_sigkilled_herder_comes_back_on_its_stored_sockets_and_refuses_no_connection() {
    let dir = TempDir::new("restart");
    let mut m = Manager::bind(dir.path());
    let mut a = start(&POOL, &[demo_bin()], &m, Some("16"), &[]);
    let addr = a.addr();
    let health = health_addr(&mut a);
    let ready = m.wait_ready(0);
    assert_eq!(m.pushes(0..ready).len(), 3, "{:#?}", m.texts(0));
    a.wait_line(&["pool ready"], LONG);
    let old_workers: Vec<i32> = workers(&mut a, 2).into_iter().map(|w| w.1).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, clients) = load(addr, stop.clone(), 4);
    eventually("the load to be served", LONG, || {
        ok.load(Ordering::SeqCst) > 20
    });
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    for pid in old_workers {
        eventually("the old workers to die with herder", LONG, || !alive(pid));
    }
    // No herder runs now: connections wait in the stored sockets' queues.
    let gap: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || get(addr, "/")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let from = m.got.len();
    let stored = m.pushes(0..ready);
    let inodes: BTreeSet<u64> = stored.iter().map(|(_, fd)| inode(fd.as_fd())).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    );
    let mut b = start(&POOL, &[demo_bin()], &m, Some("16"), &passed);
    assert_eq!(b.addr(), addr, "the same port");
    assert_eq!(health_addr(&mut b), health, "the same health port");
    for g in gap {
        let answer = g.join().unwrap();
        assert!(answer.is_ok(), "a connection made in the gap: {answer:?}");
    }
    let served = ok.load(Ordering::SeqCst);
    eventually("the load to be served again", LONG, || {
        ok.load(Ordering::SeqCst) > served + 20
    });
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    eprintln!(
        "served {} requests ({} before the restart was whole)",
        ok.load(Ordering::SeqCst),
        served
    );
    assert_eq!(refused.load(Ordering::SeqCst), 0, "no connection refused");
    get(health, "/livez").expect("the stored health socket serves");

    // Taken back, not bound again: herder and its workers hold the very sockets passed.
    let ready = m.wait_ready(from);
    for &ino in &inodes {
        assert!(holds(b.pid(), ino), "herder holds the stored socket {ino}");
    }
    for (_, pid) in workers(&mut b, 2) {
        eventually("a worker on a stored socket", LONG, || {
            socket_inodes(pid)
                .iter()
                .any(|&(fd, i)| fd == 3 && inodes.contains(&i))
        });
    }
    assert!(
        m.pushes(from..ready).is_empty() && m.removals(from..ready).is_empty(),
        "nothing new to store, nothing to remove: {:#?}",
        m.texts(from)
    );
}

#[test]
fn a_changed_port_is_bound_anew_and_the_stale_sockets_are_removed() {
    let dir = TempDir::new("moved");
    let mut m = Manager::bind(dir.path());
    let args = ["-l", "127.0.0.1:0", "--reuseport", "-w", "2"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let old = a.addr();
    let ready = m.wait_ready(0);
    assert_eq!(m.pushes(0..ready).len(), 2, "{:#?}", m.texts(0));
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let from = m.got.len();
    let stored = m.pushes(0..ready);
    let stale: Vec<u64> = stored.iter().map(|(_, fd)| inode(fd.as_fd())).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    );
    let args = ["-l", &listen, "--reuseport", "-w", "2"];
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let mut removed = m.removals(from..ready);
    removed.sort();
    assert_eq!(
        removed,
        [
            "herder/listen-tcp-127.0.0.1%3A0".to_string(),
            format!("herder/slot1-tcp-127.0.0.1%3A{}", old.port()),
        ]
    );
    let mut pushed: Vec<(String, u16)> = m
        .pushes(from..ready)
        .into_iter()
        .map(|(n, fd)| (n, local(fd.as_fd()).port()))
        .collect();
    pushed.sort();
    assert_eq!(
        pushed,
        [
            (format!("herder/listen-tcp-127.0.0.1%3A{port}"), port),
            (format!("herder/slot1-tcp-127.0.0.1%3A{port}"), port),
        ]
    );
    for ino in stale {
        assert!(!holds(b.pid(), ino), "the stale socket {ino} is closed");
    }
}

#[test]
fn workers_see_only_the_socket_unit_fds_and_the_listen_ones() {
    let dir = TempDir::new("unit");
    let mut m = Manager::bind(dir.path());
    // A socket unit herder-app.socket with ReusePort=yes and no FileDescriptorName=: its fd is
    // named after the unit, which is not herder's reserved prefix.
    let unit_name = "herder-app.socket";
    let unit = tcp_listener(true);
    let unit_port = local(unit.as_fd()).port();
    let args = [
        "-l",
        "web=127.0.0.1:0",
        "--reuseport",
        "-w",
        "2",
        "--health",
        "127.0.0.1:0",
    ];
    let mut a = start(
        &args,
        &SLEEPER,
        &m,
        Some("16"),
        &[(unit_name, unit.as_fd())],
    );
    let line = a.wait_line(&["listening", "name=web"], LONG);
    let web: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    let ready = m.wait_ready(0);
    let stored = m.pushes(0..ready);
    let mut names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let siblings = [
        format!("herder/slot1-tcp-127.0.0.1%3A{unit_port}"),
        format!("herder/slot1-tcp-127.0.0.1%3A{}", web.port()),
    ];
    let mut want = vec![
        "herder/health-tcp-127.0.0.1%3A0",
        "herder/listen-tcp-127.0.0.1%3A0",
        &siblings[0],
        &siblings[1],
    ];
    want.sort();
    assert_eq!(
        names, want,
        "the socket unit's own socket is systemd's, its sibling herder's"
    );
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    let ino = |n: &str| inode(stored.iter().find(|(name, _)| name == n).unwrap().1.as_fd());
    let mut passed: Vec<(&str, BorrowedFd<'_>)> = vec![(unit_name, unit.as_fd())];
    passed.extend(shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    ));
    let from = m.got.len();
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    assert!(m.pushes(from..ready).is_empty(), "{:#?}", m.texts(from));
    let want = [
        (
            0,
            [inode(unit.as_fd()), ino("herder/listen-tcp-127.0.0.1%3A0")],
        ),
        (1, [ino(&siblings[0]), ino(&siblings[1])]),
    ];
    let w = workers(&mut b, 2);
    assert_eq!(w.len(), 2);
    for ((slot, pid), (want_slot, inodes)) in w.into_iter().zip(want) {
        assert_eq!(slot, want_slot);
        exec_settled(pid);
        eventually(
            "the worker to see fds 0 1 2 3 4 and nothing else",
            LONG,
            || fd_links(pid).iter().map(|f| f.0).collect::<Vec<_>>() == [0, 1, 2, 3, 4],
        );
        assert_eq!(
            socket_inodes(pid),
            [(3, inodes[0]), (4, inodes[1])],
            "slot {slot}: the socket unit's first, then --listen's"
        );
        let env = environ(pid);
        for e in [
            "LISTEN_FDS=2".to_string(),
            format!("LISTEN_FDNAMES={unit_name}:web"),
            format!("LISTEN_PID={pid}"),
        ] {
            assert!(env.contains(&e), "slot {slot}: {e} missing from {env:?}");
        }
    }
}

#[test]
fn scaling_down_removes_the_slot_sibling_from_the_store() {
    let dir = TempDir::new("scale");
    let mut m = Manager::bind(dir.path());
    let args = ["-l", "127.0.0.1:0", "--reuseport", "-w", "3"];
    let mut h = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let addr = h.addr();
    let ready = m.wait_ready(0);
    let slot2 = format!("herder/slot2-tcp-127.0.0.1%3A{}", addr.port());
    let first = m.push_of(0, &slot2).expect("slot 2's sibling pushed");
    let first_ino = inode(m.got[first].fds[0].as_fd());
    assert_eq!(m.pushes(0..ready).len(), 3);

    h.signal(libc::SIGTTOU);
    let removed = m.wait(ready, "FDSTOREREMOVE=1 of slot 2", |d| {
        d.is_remove() && d.fdname() == Some(slot2.as_str())
    });
    assert_eq!(
        m.removals(ready..removed + 1),
        std::slice::from_ref(&slot2),
        "slot 2's only"
    );

    h.signal(libc::SIGTTIN);
    let again = m.wait(removed, "slot 2's new sibling", |d| {
        d.is_push() && d.fdname() == Some(slot2.as_str())
    });
    let fd = m.got[again].fds[0].as_fd();
    assert_eq!(local(fd), addr);
    assert_ne!(inode(fd), first_ino, "a new socket");
    assert!(m.removal_of(0, "herder/listen-tcp-127.0.0.1%3A0").is_none());
}

#[test]
fn stored_fds_that_are_not_what_their_names_say_are_removed_and_closed() {
    let dir = TempDir::new("bad");
    let mut m = Manager::bind(dir.path());
    let file_path = dir.path().join("not-a-socket");
    let file = OwnedFd::from(std::fs::File::create(&file_path).unwrap());
    let bogus = tcp_listener(false);
    let udp: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
    let passed = [
        ("herder/listen-tcp-127.0.0.1%3A0", file.as_fd()),
        ("herder/bogus", bogus.as_fd()),
        ("herder/health-tcp-127.0.0.1%3A0", udp.as_fd()),
    ];
    let args = ["-l", "127.0.0.1:0", "-w", "1", "--health", "127.0.0.1:0"];
    let mut h = start(&args, &[demo_bin()], &m, Some("16"), &passed);
    let addr = h.addr();
    let health = health_addr(&mut h);
    let ready = m.wait_ready(0);
    get(addr, "/").expect("herder serves on a socket of its own");
    get(health, "/livez").expect("and health on another");
    h.wait_line(&["not a socket"], LONG);
    h.wait_line(&["not a name herder writes", "herder/bogus"], LONG);
    h.wait_line(&["a socket of another type"], LONG);
    let mut removed = m.removals(0..ready);
    removed.sort();
    assert_eq!(
        removed,
        [
            "herder/bogus",
            "herder/health-tcp-127.0.0.1%3A0",
            "herder/listen-tcp-127.0.0.1%3A0"
        ]
    );
    // Removed before the new socket of that name is stored.
    for n in [
        "herder/listen-tcp-127.0.0.1%3A0",
        "herder/health-tcp-127.0.0.1%3A0",
    ] {
        let (r, p) = (m.removal_of(0, n).unwrap(), m.push_of(0, n).unwrap());
        assert!(r < p, "{n}: removal, then the new push");
    }
    let links = fd_links(h.pid());
    assert!(
        !links.iter().any(|(_, t)| Path::new(t) == file_path),
        "the file is closed: {links:?}"
    );
    for fd in [bogus.as_fd(), udp.as_fd()] {
        assert!(!holds(h.pid(), inode(fd)), "closed");
    }
    let (_, worker) = workers(&mut h, 1)[0];
    let listen = m.push_of(0, "herder/listen-tcp-127.0.0.1%3A0").unwrap();
    let listen_ino = inode(m.got[listen].fds[0].as_fd());
    eventually(
        "the worker's only socket is herder's --listen",
        LONG,
        || {
            environ(worker).contains(&"LISTEN_FDS=1".to_string())
                && socket_inodes(worker).first() == Some(&(3, listen_ino))
        },
    );
    assert!(!holds(worker, inode(bogus.as_fd())));
}

#[test]
fn of_several_stored_sockets_under_one_name_the_first_that_fits_is_kept() {
    let dir = TempDir::new("dup");
    let mut m = Manager::bind(dir.path());
    let name = "herder/listen-tcp-127.0.0.1%3A0";
    let udp: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
    let (first, second) = (tcp_listener(false), tcp_listener(false));
    let passed = [
        (name, udp.as_fd()),
        (name, first.as_fd()),
        (name, second.as_fd()),
    ];
    let mut h = start(
        &["-l", "127.0.0.1:0", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    assert_eq!(h.addr(), local(first.as_fd()), "the first that fits");
    let ready = m.wait_ready(0);
    // The store is made to hold that one only: all of the name removed, that one stored again.
    let removed = m.removal_of(0, name).expect("removed");
    let pushed = m.push_of(removed, name).expect("stored again");
    assert!(pushed < ready);
    assert_eq!(inode(m.got[pushed].fds[0].as_fd()), inode(first.as_fd()));
    assert_eq!(m.pushes(0..ready).len(), 1);
    assert!(holds(h.pid(), inode(first.as_fd())));
    for fd in [udp.as_fd(), second.as_fd()] {
        assert!(!holds(h.pid(), inode(fd)), "the others are closed");
    }
}

#[test]
fn a_stored_socket_bound_elsewhere_than_its_name_says_is_not_used() {
    let dir = TempDir::new("forged");
    let mut m = Manager::bind(dir.path());
    let port = free_port();
    let name = format!("herder/listen-tcp-127.0.0.1%3A{port}");
    let elsewhere = tcp_listener(false);
    let listen = format!("127.0.0.1:{port}");
    let mut h = start(
        &["-l", &listen, "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &[(&name, elsewhere.as_fd())],
    );
    assert_eq!(h.addr().port(), port);
    let ready = m.wait_ready(0);
    h.wait_line(&["stored socket", "not used:", "bound to 127.0.0.1:"], LONG);
    let removed = m.removal_of(0, &name).expect("removed");
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_eq!(local(m.got[pushed].fds[0].as_fd()).port(), port);
    assert!(!holds(h.pid(), inode(elsewhere.as_fd())), "closed");
}

#[test]
fn a_unix_socket_is_taken_back_while_its_file_is_there_and_bound_anew_when_it_is_gone() {
    let dir = TempDir::new("unix");
    let mut m = Manager::bind(dir.path());
    let path = dir.path().join("app.sock");
    let listen = format!("unix:{}", path.display());
    let name = format!("herder/listen-unix-{}", path.display());
    let args = ["-l", &listen, "-w", "1"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let stored = m.pushes(0..ready);
    assert_eq!(
        stored.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [name.as_str()]
    );
    let ino = inode(stored[0].1.as_fd());
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    // SIGKILLed, herder left its socket file: the stored socket is still reachable there.
    let from = m.got.len();
    let passed = [(name.as_str(), stored[0].1.as_fd())];
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    assert!(holds(b.pid(), ino), "taken back");
    assert!(m.pushes(from..ready).is_empty() && m.removals(from..ready).is_empty());
    std::os::unix::net::UnixStream::connect(&path).expect("the file leads to it");
    // A clean stop removes the file: the stored socket can no longer be reached.
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(LONG).success());
    assert!(!path.exists());

    let from = m.got.len();
    let mut c = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    c.wait_line(
        &["stored socket", "not used:", "its socket file is gone"],
        LONG,
    );
    let removed = m.removal_of(from, &name).expect("removed");
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_ne!(inode(m.got[pushed].fds[0].as_fd()), ino);
    assert!(!holds(c.pid(), ino));
    std::os::unix::net::UnixStream::connect(&path).expect("bound anew");
}

#[test]
fn a_socket_that_must_be_bound_anew_waits_for_systemd_to_drop_the_old_one() {
    let dir = TempDir::new("rebind");
    let mut m = Manager::bind(dir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let name = format!("herder/listen-tcp-127.0.0.1%3A{port}");
    let mut a = start(&["-l", &listen, "-w", "1"], &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let worker = workers(&mut a, 1)[0].1;
    assert_eq!(m.pushes(0..ready).len(), 1);
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    eventually("the old worker to die with herder", LONG, || !alive(worker));

    // Now with --reuseport: the stored socket has no SO_REUSEPORT and cannot be used, and
    // while the store holds it, the port is taken.
    let stored = m.pushes(0..ready);
    let old = inode(stored[0].1.as_fd());
    let passed = [(name.as_str(), stored[0].1.as_fd())];
    let from = m.got.len();
    let mut b = start(
        &["-l", &listen, "--reuseport", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    drop(stored);
    let removed = m.wait(from, "FDSTOREREMOVE=1", |d| d.is_remove());
    assert_eq!(m.got[removed].fdname(), Some(name.as_str()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(b.pid()), "herder waits for the store to let go");
    // What systemd does with FDSTOREREMOVE=1: close its copies.
    for d in &mut m.got {
        if d.fdname() == Some(name.as_str()) {
            d.fds.clear();
        }
    }
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_ne!(inode(m.got[pushed].fds[0].as_fd()), old);
}

#[test]
fn a_push_that_fails_is_logged_once_and_herder_serves_on() {
    let dir = TempDir::new("nomanager");
    // A NOTIFY_SOCKET nobody listens on: every datagram to it fails.
    let gone = Manager::bind(dir.path());
    drop(gone.sock);
    std::fs::remove_file(&gone.path).unwrap();
    let m = Manager {
        path: gone.path,
        sock: UnixDatagram::unbound().unwrap(),
        got: Vec::new(),
    };
    let mut h = start(&POOL, &[demo_bin()], &m, Some("16"), &[]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    get(addr, "/").expect("herder serves");
    h.wait_line(&["cannot send to the service manager's fd store"], LONG);
    // Scaling adds a sibling to push: still one line.
    h.signal(libc::SIGTTIN);
    h.wait_nth_line(&["worker 2 (pid", SPAWNED], 1, LONG);
    get(addr, "/").expect("herder still serves");
    assert_eq!(
        h.count(&["cannot send to the service manager's fd store"]),
        1,
        "logged once"
    );
}

#[test]
fn more_sockets_than_fdstore_allows_is_a_warning() {
    let dir = TempDir::new("over");
    let mut m = Manager::bind(dir.path());
    let mut h = start(&POOL, &SLEEPER, &m, Some("2"), &[]);
    let ready = m.wait_ready(0);
    h.wait_line(&["more than FDSTORE=2", "FileDescriptorStoreMax="], LONG);
    // systemd decides what it keeps; herder offers every socket.
    assert_eq!(m.pushes(0..ready).len(), 3);
}

#[test]
fn a_socket_stored_beside_a_non_socket_of_its_name_is_kept_and_stored_again_alone() {
    let dir = TempDir::new("dirty");
    let mut m = Manager::bind(dir.path());
    let name = "herder/listen-tcp-127.0.0.1%3A0";
    let file = OwnedFd::from(std::fs::File::create(dir.path().join("file")).unwrap());
    let sock = tcp_listener(false);
    let passed = [(name, file.as_fd()), (name, sock.as_fd())];
    let mut h = start(
        &["-l", "127.0.0.1:0", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    assert_eq!(h.addr(), local(sock.as_fd()), "the socket is taken back");
    let ready = m.wait_ready(0);
    // FDSTOREREMOVE=1 drops everything under the name, the socket too: it is stored again.
    let removed = m.removal_of(0, name).expect("removed");
    let pushed = m.push_of(removed, name).expect("stored again");
    assert!(pushed < ready);
    assert_eq!(inode(m.got[pushed].fds[0].as_fd()), inode(sock.as_fd()));
    assert_eq!(m.removals(0..ready).len(), 1);
}

#[test]
fn sockets_stored_by_another_uid_are_removed_before_reuseport_binds_anew() {
    if !root() {
        eprintln!("skipped: needs root to run herder as another uid");
        return;
    }
    // A DynamicUser= that got another uid this time: the kernel lets no socket of the new uid
    // into the old sockets' SO_REUSEPORT group, so none of them can be used, and until every
    // one is gone the port is taken.
    let dir = TempDir::new("uid");
    let mut m = Manager::bind(dir.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&m.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["-l", &listen, "--reuseport", "-w", "2"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let old_workers: Vec<i32> = workers(&mut a, 2).into_iter().map(|w| w.1).collect();
    assert_eq!(m.pushes(0..ready).len(), 2);
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    for pid in old_workers {
        eventually("the old workers to die with herder", LONG, || !alive(pid));
    }

    let stored = m.pushes(0..ready);
    let names: BTreeSet<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = stored
        .iter()
        .map(|(n, fd)| (n.as_str(), fd.as_fd()))
        .collect();
    let from = m.got.len();
    let mut as_nobody = vec!["--reuid=65534", "--regid=65534", "--clear-groups"];
    as_nobody.push(herder_bin());
    as_nobody.extend(args);
    // The launcher execs setpriv, which execs herder: one pid, LISTEN_PID stays right.
    let mut b = start_via("setpriv", &as_nobody, &SLEEPER, &m, Some("16"), &passed);
    drop(stored);
    let mut removed = BTreeSet::new();
    let mut i = from;
    while removed != names {
        i = m.wait(i, "FDSTOREREMOVE=1", |d| d.is_remove()) + 1;
        removed.insert(m.got[i - 1].fdname().unwrap().to_string());
    }
    // Both removed before herder binds; now systemd lets go of them.
    for d in &mut m.got[..from] {
        d.fds.clear();
    }
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let pushed: BTreeSet<String> = m.pushes(from..ready).into_iter().map(|p| p.0).collect();
    assert_eq!(pushed, names, "bound anew, stored anew");
}
