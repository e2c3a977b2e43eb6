//! Shared harness for the integration tests: run the real `herder` binary, read its log lines
//! as they come, bind a datagram socket as its NOTIFY_SOCKET, talk HTTP to its workers.
//! Every wait has a deadline; a test that times out fails with what it saw, and herder is
//! killed (by pid) when the handle drops.

#![allow(dead_code)] // each test file uses a different part of it

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The binaries under test: this build's, or another build's from `HERDER_TEST_BIN` /
/// `HERDER_TEST_DEMO_BIN` (to show that a new test fails on an older herder).
pub fn herder_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("HERDER_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_herder").into())
    })
}

pub fn demo_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("HERDER_TEST_DEMO_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_herder-demo").into())
    })
}

/// Generous: the CI machine is a loaded 2-core box.
pub const LONG: Duration = Duration::from_secs(30);

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("herder-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What herder's line about a started worker says, after "worker S (pid P)" (the `slot=`,
/// `pid=`, `generation=` fields follow the message on stderr).
pub const SPAWNED: &str = ") spawned, generation ";
/// The same for a worker that became ready: "worker S (pid P) ready".
pub const READY: &str = ") ready";

/// Whether a line is herder's about a worker's end: "worker S (pid P) exited with status N"
/// or "worker S (pid P) killed by signal N (SIGNAME)".
pub fn is_worker_exit(line: &str) -> bool {
    line.contains(") exited with status ") || line.contains(") killed by signal ")
}

/// A running herder with its stderr (and the workers' stdout) collected line by line.
pub struct Herder {
    pub child: Child,
    rx: Receiver<String>,
    seen: Vec<String>,
    status: Option<ExitStatus>,
}

pub fn herder_cmd(args: &[&str], command: &[&str]) -> Command {
    let mut c = Command::new(herder_bin());
    c.args(args).arg("--").args(command);
    c.env("HERDER_LOG", "info");
    c.env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    c
}

impl Herder {
    pub fn start(args: &[&str], command: &[&str]) -> Herder {
        Herder::spawn(herder_cmd(args, command))
    }

    pub fn spawn(mut cmd: Command) -> Herder {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start herder");
        let (tx, rx) = channel();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("  | {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Herder {
            child,
            rx,
            seen: Vec::new(),
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for a line containing every one of `parts`, counting lines already seen.
    pub fn wait_line(&mut self, parts: &[&str], timeout: Duration) -> String {
        self.wait_nth_line(parts, 1, timeout)
    }

    /// Waits until `n` lines containing every one of `parts` have been printed in all.
    pub fn wait_nth_line(&mut self, parts: &[&str], n: usize, timeout: Duration) -> String {
        let what = format!("{parts:?}");
        self.wait_nth(&what, n, timeout, |l| parts.iter().all(|p| l.contains(p)))
    }

    /// Waits for a worker-exit line ([`is_worker_exit`]) containing every one of `parts`.
    pub fn wait_worker_exit(&mut self, parts: &[&str], timeout: Duration) -> String {
        let what = format!("a worker exit with {parts:?}");
        self.wait_nth(&what, 1, timeout, |l| {
            is_worker_exit(l) && parts.iter().all(|p| l.contains(p))
        })
    }

    /// Worker-exit lines ([`is_worker_exit`]) printed so far.
    pub fn worker_exits(&mut self) -> usize {
        self.lines().iter().filter(|l| is_worker_exit(l)).count()
    }

    fn wait_nth(
        &mut self,
        what: &str,
        n: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<&String> = self.seen.iter().filter(|l| matches(l)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "no line #{n} with {what} within {timeout:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// Everything printed so far (after draining what is queued).
    pub fn lines(&mut self) -> Vec<String> {
        while let Ok(l) = self.rx.try_recv() {
            self.seen.push(l);
        }
        self.seen.clone()
    }

    pub fn count(&mut self, parts: &[&str]) -> usize {
        self.lines()
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    /// The address from herder's `listening addr=…` line.
    pub fn addr(&mut self) -> SocketAddr {
        let line = self.wait_line(&["listening", "addr="], LONG);
        let a = field(&line, "addr").expect("addr field");
        a.parse()
            .unwrap_or_else(|_| panic!("not an address in {line}"))
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                self.status = Some(s);
                // Collect the last lines.
                while let Ok(l) = self.rx.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "herder did not exit within {timeout:?}; saw:\n{}",
                    self.lines().join("\n")
                );
            }
            // Polling a child's exit status from the test side; herder itself never polls.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pids of workers from `worker S (pid P) spawned, generation G … pid=P` lines.
    pub fn spawned_pids(&mut self) -> Vec<i32> {
        self.lines()
            .iter()
            .filter(|l| l.contains(SPAWNED))
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }
}

impl Drop for Herder {
    /// A stop as an operator would do it (TERM: drain, and herder's sweep takes whatever the
    /// workers left behind), then SIGKILL if that takes more than a few seconds.
    fn drop(&mut self) {
        if self.status.is_some() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; its workers follow by PDEATHSIG.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// `key=value` from a tracing line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    let start = line.find(&pat)? + pat.len();
    Some(line[start..].split_whitespace().next()?.to_string())
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET.
pub struct NotifySocket {
    pub path: PathBuf,
    sock: UnixDatagram,
    pub received: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket {
            path,
            sock,
            received: Vec::new(),
        }
    }

    /// Waits for a datagram satisfying `pred`; returns it. Datagrams are recorded in order.
    pub fn wait(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no notification {what} within {timeout:?}; got: {:#?}",
                    self.received
                );
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut buf = [0u8; 8192];
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    self.received.push(text.clone());
                    if pred(&text) {
                        return text;
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("notify socket: {e}"),
            }
        }
    }

    pub fn wait_for(&mut self, line: &str, timeout: Duration) -> String {
        self.wait(line, timeout, |t| t.lines().any(|l| l == line))
    }
}

/// One HTTP/1.1 GET with `Connection: close`; the response body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(LONG))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad response: {resp:?}")));
    }
    Ok(resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string())
}

/// The pid in a demo worker's `pid=P slot=S` answer.
pub fn pid_of(body: &str) -> i32 {
    field(body, "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {body:?}"))
}

/// Requests until `n` distinct worker pids have answered (or the deadline).
pub fn distinct_pids(addr: SocketAddr, n: usize, timeout: Duration) -> BTreeSet<i32> {
    let deadline = Instant::now() + timeout;
    let mut pids = BTreeSet::new();
    // Concurrent slow-ish requests spread across workers even when one worker would win
    // every accept race on an idle machine.
    while pids.len() < n && Instant::now() < deadline {
        let handles: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || get(addr, "/sleep?ms=50")))
            .collect();
        for h in handles {
            if let Ok(Ok(body)) = h.join() {
                pids.insert(pid_of(&body));
            }
        }
    }
    pids
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `pred` holds, checking every 20 ms, up to `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Children of `pid` (from /proc/PID/task/*/children).
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `threads` clients making one new connection per request until `stop` (at most 100000
/// each); counts successes and refused connections.
pub fn load(
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

/// The address of herder's `--health` endpoint, from its log line.
pub fn health_addr(h: &mut Herder) -> SocketAddr {
    let line = h.wait_line(&["health endpoint", "addr="], LONG);
    field(&line, "addr").unwrap().parse().unwrap()
}

/// A process's environment, one `NAME=value` each (empty once it is gone).
pub fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}
