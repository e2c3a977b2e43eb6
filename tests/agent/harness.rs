//! What the agent tests share: the fixtures, starting herder, probing it, reading its log
//! and /proc, and a load that counts failures.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

pub const PYTHON: &str = "/usr/bin/python3";

pub const AGENT_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/agent.py");

pub const WORKER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/worker.py");

pub const STAMP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/stamp-build-tag.py");

/// `--agent`'s value: split by herder into words, no shell.
pub fn agent_cmd() -> String {
    format!("{PYTHON} '{AGENT_PY}'")
}

pub const WORKER: [&str; 2] = [PYTHON, WORKER_PY];

/// herder with the fixture worker as its command and `env` added (the agent inherits it too).
pub fn start(args: &[&str], env: &[(&str, &str)]) -> Herder {
    let mut cmd = herder_cmd(args, &WORKER);
    cmd.envs(env.iter().copied());
    Herder::spawn(cmd)
}

/// One raw request; the status code and body (0 when there was no answer).
pub fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(LONG));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    (code, body.to_string())
}

pub fn status(health: SocketAddr) -> serde_json::Value {
    let (code, body) = probe(health, "/status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// The number after `prefix` in `line`: `num_after("agent (pid 12) ready", "(pid ")` is 12.
pub fn num_after(line: &str, prefix: &str) -> i64 {
    let start = line
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in {line}"))
        + prefix.len();
    line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in {line}"))
}

/// The pid in one of herder's `agent (pid P) …` lines.
pub fn agent_pid(line: &str) -> i32 {
    num_after(line, "agent (pid ") as i32
}

/// Waits for herder's `agent (pid P) <what>` line number `n`; the pid.
pub fn wait_agent(h: &mut Herder, what: &str, n: usize) -> i32 {
    agent_pid(&h.wait_nth_line(&["agent (pid ", &format!(") {what}")], n, LONG))
}

/// herder's own lines about workers (not the agent's, not the fixtures').
pub fn is_herder_worker_line(l: &str) -> bool {
    l.contains(" worker ") && l.contains(" (pid ") && !l.contains("fixture-")
}

pub fn is_herder_agent_line(l: &str) -> bool {
    l.contains("agent (pid ") && !l.contains("fixture-")
}

pub fn position(lines: &[String], what: &str, pred: impl Fn(&str) -> bool) -> usize {
    lines
        .iter()
        .position(|l| pred(l))
        .unwrap_or_else(|| panic!("no line {what}; saw:\n{}", lines.join("\n")))
}

/// The `mono_ns=` of a fixture's line (CLOCK_MONOTONIC: the same clock in every process).
pub fn mono_ns(line: &str) -> u64 {
    field(line, "mono_ns")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no mono_ns in {line}"))
}

/// fd number → link target (`socket:[123]`, `/dev/null`, …) of a process.
pub fn fds(pid: i32) -> BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.to_string_lossy().to_string()))
        })
        .collect()
}

pub fn control(sock: &Path, args: &[&str]) -> Output {
    Command::new(herder_bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .unwrap()
}

pub fn slot_pids(doc: &serde_json::Value) -> Vec<i64> {
    doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["pid"].as_i64())
        .collect()
}

/// An abstract unix name no other test (or run) uses.
pub fn abstract_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    format!("unix:@herder-test-{}-{tag}-{n}", std::process::id())
}

/// Clients asking the pool for `path`, one new connection a request, `pause` apart, until
/// stopped (at most 120 s and 20000 requests a thread): successes, failures, the slowest
/// request, and how many answers each agent pid gave.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    slowest_ms: Arc<AtomicU64>,
    by_agent: Arc<Mutex<BTreeMap<i32, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, path: &'static str, threads: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let slowest_ms = Arc::new(AtomicU64::new(0));
        let by_agent = Arc::new(Mutex::new(BTreeMap::new()));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let (slowest_ms, by_agent) = (slowest_ms.clone(), by_agent.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 20_000 {
                        n += 1;
                        let t = Instant::now();
                        match get(addr, path) {
                            Ok(body) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                                if let Some(rest) = body.strip_prefix("agent ") {
                                    let pid = num_after(rest, "") as i32;
                                    *by_agent.lock().unwrap().entry(pid).or_default() += 1;
                                }
                            }
                            Err(e) => {
                                eprintln!("  load {path}: {e}");
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        slowest_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::SeqCst);
                        // The pace of the load.
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            slowest_ms,
            by_agent,
            threads,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn answers_from(&self, pid: i32) -> usize {
        self.by_agent
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .unwrap_or(0)
    }

    /// (ok, failed, slowest in ms)
    pub fn finish(self) -> (usize, usize, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.slowest_ms.load(Ordering::SeqCst),
        )
    }
}

pub fn body_is_a_pid(body: &str) {
    assert!(body.starts_with("pid="), "{body}");
}

/// A copy of the herder under test at `path`, stamped with `tag` (as tests/upgrade.rs does).
pub fn install(path: &Path, tag: &str) {
    let tmp = path.with_extension("new");
    std::fs::copy(herder_bin(), &tmp).unwrap();
    let out = Command::new(PYTHON)
        .arg(STAMP)
        .arg(&tmp)
        .arg(tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, path).unwrap();
}
