//! The agent (issue 14): one singleton process supervised beside the pool, reachable by the
//! workers at `HERDER_AGENT_SOCKET`, with the real binary. The agent and the workers are the
//! Python fixtures in tests/agent/: the agent answers a line on its socket with its pid and a
//! counter ("state=starting" before its READY=1), the workers ask it at start-up, on
//! `GET /agent`, and once more while they drain; both log what they saw to stderr, which is
//! the same pipe as herder's log, so the order of the lines is the order of the events.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const PYTHON: &str = "/usr/bin/python3";
const AGENT_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/agent.py");
const WORKER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/worker.py");
const STAMP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/stamp-build-tag.py");

/// `--agent`'s value: split by herder into words, no shell.
fn agent_cmd() -> String {
    format!("{PYTHON} '{AGENT_PY}'")
}

const WORKER: [&str; 2] = [PYTHON, WORKER_PY];

/// herder with the fixture worker as its command and `env` added (the agent inherits it too).
fn start(args: &[&str], env: &[(&str, &str)]) -> Herder {
    let mut cmd = herder_cmd(args, &WORKER);
    cmd.envs(env.iter().copied());
    Herder::spawn(cmd)
}

fn health_addr(h: &mut Herder) -> SocketAddr {
    let line = h.wait_line(&["health endpoint", "addr="], LONG);
    field(&line, "addr").unwrap().parse().unwrap()
}

/// One raw request; the status code and body (0 when there was no answer).
fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
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

fn status(health: SocketAddr) -> serde_json::Value {
    let (code, body) = probe(health, "/status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// The number after `prefix` in `line`: `num_after("agent (pid 12) ready", "(pid ")` is 12.
fn num_after(line: &str, prefix: &str) -> i64 {
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
fn agent_pid(line: &str) -> i32 {
    num_after(line, "agent (pid ") as i32
}

/// Waits for herder's `agent (pid P) <what>` line number `n`; the pid.
fn wait_agent(h: &mut Herder, what: &str, n: usize) -> i32 {
    agent_pid(&h.wait_nth_line(&["agent (pid ", &format!(") {what}")], n, LONG))
}

/// herder's own lines about workers (not the agent's, not the fixtures').
fn is_herder_worker_line(l: &str) -> bool {
    l.contains(" worker ") && l.contains(" (pid ") && !l.contains("fixture-")
}

fn is_herder_agent_line(l: &str) -> bool {
    l.contains("agent (pid ") && !l.contains("fixture-")
}

fn position(lines: &[String], what: &str, pred: impl Fn(&str) -> bool) -> usize {
    lines
        .iter()
        .position(|l| pred(l))
        .unwrap_or_else(|| panic!("no line {what}; saw:\n{}", lines.join("\n")))
}

/// The `mono_ns=` of a fixture's line (CLOCK_MONOTONIC: the same clock in every process).
fn mono_ns(line: &str) -> u64 {
    field(line, "mono_ns")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no mono_ns in {line}"))
}

fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// fd number → link target (`socket:[123]`, `/dev/null`, …) of a process.
fn fds(pid: i32) -> BTreeMap<i32, String> {
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

fn control(sock: &Path, args: &[&str]) -> Output {
    Command::new(herder_bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .unwrap()
}

fn slot_pids(doc: &serde_json::Value) -> Vec<i64> {
    doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["pid"].as_i64())
        .collect()
}

/// An abstract unix name no other test (or run) uses.
fn abstract_name(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    format!("unix:@herder-test-{}-{tag}-{n}", std::process::id())
}

#[test]
fn the_agent_is_ready_before_any_worker_starts() {
    let dir = TempDir::new("agent-order");
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix:{}", sock.display());
    let systemd = NotifySocket::bind(dir.path());
    let agent = agent_cmd();
    let mut cmd = herder_cmd(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "3",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
            "--agent-ready",
            "notify",
        ],
        &WORKER,
    );
    // Slow to become ready: a herder that started the workers at the agent's exec, not at
    // its READY=1, would have workers whose start-up request is answered "state=starting".
    cmd.env("AGENT_READY_DELAY_MS", "1500")
        .env("NOTIFY_SOCKET", &systemd.path);
    let mut systemd = systemd;
    let mut h = Herder::spawn(cmd);
    let pool = h.addr();
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    // Each worker asks the agent before its READY=1, so all three have by now.
    h.wait_nth_line(&["fixture-worker[", "start-up agent"], 3, LONG);
    let lines = h.lines();

    let starting_agent = position(&lines, "starting the agent", |l| {
        l.contains("starting the agent")
    });
    let starting_pool = position(&lines, "starting the pool", |l| {
        l.contains("starting the pool")
    });
    assert!(starting_agent < starting_pool, "{}", lines.join("\n"));
    let spawned = position(&lines, "agent (pid P) spawned", |l| {
        is_herder_agent_line(l) && l.contains(") spawned")
    });
    assert_eq!(agent_pid(&lines[spawned]), pid);
    let ready = position(&lines, "agent (pid P) ready", |l| {
        is_herder_agent_line(l) && l.contains(") ready")
    });
    let first_worker = position(&lines, "worker S (pid P) spawned", |l| {
        is_herder_worker_line(l) && l.contains(SPAWNED)
    });
    assert!(
        spawned < ready && ready < first_worker,
        "the agent ready before any worker spawned:\n{}",
        lines.join("\n")
    );

    // The processes' own clocks say the same: every worker started after the agent was ready.
    let agent_ready_ns = mono_ns(
        &lines[position(&lines, "the agent's ready", |l| {
            l.contains(&format!("fixture-agent[{pid}] ready mono_ns="))
        })],
    );
    let worker_starts: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.contains(" started mono_ns="))
        .map(|l| mono_ns(l))
        .collect();
    assert_eq!(worker_starts.len(), 3, "{}", lines.join("\n"));
    for t in &worker_starts {
        assert!(
            *t > agent_ready_ns,
            "a worker started at {t} ns, before the agent's READY=1 at {agent_ready_ns} ns"
        );
    }

    // Every worker was told the socket and reached the agent, ready, at start-up.
    let told = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.ends_with(&format!("agent socket {addr}")))
        .count();
    assert_eq!(told, 3, "HERDER_AGENT_SOCKET={addr}:\n{}", lines.join("\n"));
    let replies: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("start-up agent"))
        .collect();
    assert_eq!(replies.len(), 3);
    for r in &replies {
        assert!(
            r.contains(&format!("start-up agent reply: agent {pid} "))
                && r.ends_with("state=ready"),
            "{r}"
        );
    }

    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o660,
        "the agent's unix socket: the workers' uid and group only"
    );

    // The pool reaches the agent; herder says so everywhere.
    let body = get(pool, "/agent").expect("GET /agent");
    assert!(body.starts_with(&format!("agent {pid} ")), "{body}");
    assert_eq!(probe(health, "/readyz").0, 200);
    let doc = status(health);
    let a = &doc["agent"];
    assert_eq!(a["pid"], pid, "{a}");
    assert_eq!(a["state"], "ready", "{a}");
    assert_eq!(a["socket"], addr.as_str(), "{a}");
    assert_eq!(a["required"], false, "{a}");
    assert_eq!(a["restarts"], 0, "{a}");
    systemd.wait_for("READY=1", LONG);
    let says_agent_ready = |d: &str| {
        d.lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("agent ready"))
    };
    if !systemd.received.iter().any(|d| says_agent_ready(d)) {
        systemd.wait(
            "a STATUS= saying the agent is ready",
            LONG,
            says_agent_ready,
        );
    }

    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert!(!sock.exists(), "the agent's unix socket is removed at exit");
}

#[test]
fn a_tcp_agent_socket_on_port_0_is_bound_once_and_told_to_every_worker() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    h.wait_nth_line(&["fixture-worker[", "start-up agent"], 2, LONG);
    let doc = status(health);
    let addr = doc["agent"]["socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no agent socket in {doc}"))
        .to_string();
    let bound: SocketAddr = addr.parse().expect("HOST:PORT");
    assert!(bound.ip().is_loopback() && bound.port() != 0, "{addr}");
    let pid = doc["agent"]["pid"].as_i64().unwrap() as i32;

    let lines = h.lines();
    let spawned = position(&lines, "agent (pid P) spawned", |l| {
        is_herder_agent_line(l) && l.contains(") spawned")
    });
    assert_eq!(agent_pid(&lines[spawned]), pid);
    let first_worker = position(&lines, "worker S (pid P) spawned", |l| {
        is_herder_worker_line(l) && l.contains(SPAWNED)
    });
    assert!(spawned < first_worker, "{}", lines.join("\n"));
    let told = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.ends_with(&format!("agent socket {addr}")))
        .count();
    assert_eq!(told, 2, "HERDER_AGENT_SOCKET={addr}:\n{}", lines.join("\n"));
    // --agent-ready defaults to --ready (exec): the workers may connect before the agent
    // accepts, but herder bound the socket first, so the kernel queues them.
    for r in lines.iter().filter(|l| l.contains("start-up agent")) {
        assert!(
            r.contains(&format!("start-up agent reply: agent {pid} ")),
            "{r}"
        );
    }
    // Reachable directly too, at the address herder printed.
    let mut s = TcpStream::connect_timeout(&bound, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(b"hello from the test\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with(&format!("agent {pid} ")), "{answer}");
    let body = get(pool, "/agent").expect("GET /agent");
    assert!(body.starts_with(&format!("agent {pid} ")), "{body}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

/// Clients asking the pool for `path`, one new connection a request, `pause` apart, until
/// stopped (at most 120 s and 20000 requests a thread): successes, failures, the slowest
/// request, and how many answers each agent pid gave.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    slowest_ms: Arc<AtomicU64>,
    by_agent: Arc<Mutex<BTreeMap<i32, usize>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, path: &'static str, threads: usize, pause: Duration) -> Load {
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

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn answers_from(&self, pid: i32) -> usize {
        self.by_agent
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .unwrap_or(0)
    }

    /// (ok, failed, slowest in ms)
    fn finish(self) -> (usize, usize, u64) {
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

#[test]
fn killing_the_agent_under_load_fails_no_request() {
    let dir = TempDir::new("agent-kill");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    // Created before the kill: the replacement then accepts nothing for its first second,
    // so requests certainly wait in the socket's queue (which herder holds) meanwhile.
    let slow = dir.path().join("slow-start");
    // A connection the agent has accepted dies with it; the claim is about those waiting in
    // the queue. So the agent is told to stop accepting first (and says when what it had
    // accepted is answered), and is killed while the load keeps queueing.
    let pause_dir = dir.path();
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        &[
            ("AGENT_SLOW_START_FILE", slow.to_str().unwrap()),
            ("AGENT_PAUSE_DIR", pause_dir.to_str().unwrap()),
        ],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    let ready_at = Instant::now();
    h.wait_line(&["pool ready"], LONG);
    let to_agent = Load::start(pool, "/agent", 4, Duration::from_millis(2));
    let to_pool = Load::start(pool, "/", 1, Duration::from_millis(10));
    // Past a second of serving: the agent is restarted at once, not after a backoff.
    eventually("the agent serving the load for over a second", LONG, || {
        to_agent.answers_from(old) >= 20 && ready_at.elapsed() > Duration::from_millis(1200)
    });
    std::fs::write(&slow, "").unwrap();
    std::fs::write(pause_dir.join(format!("pause-{old}")), "").unwrap();
    h.wait_line(&[&format!("fixture-agent[{old}] paused")], LONG);
    // SAFETY: kill(2) on the agent pid herder reported.
    unsafe { libc::kill(old, libc::SIGKILL) };
    h.wait_line(
        &[&format!("agent (pid {old}) killed by signal 9 (SIGKILL)")],
        LONG,
    );
    let pool_ok_at_kill = to_pool.ok();
    h.wait_line(&["agent restarting"], LONG);
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    let pool_ok_at_ready = to_pool.ok();
    eventually("the new agent answering the load", LONG, || {
        to_agent.answers_from(new) >= 20
    });
    let (agent_ok, agent_failed, slowest) = to_agent.finish();
    let (pool_ok, pool_failed, _) = to_pool.finish();
    eprintln!(
        "GET /agent: {agent_ok} ok, {agent_failed} failed, slowest {slowest} ms; \
         GET /: {pool_ok} ok, {pool_failed} failed, {} while the agent was down",
        pool_ok_at_ready - pool_ok_at_kill
    );
    assert_eq!(agent_failed, 0, "no request to the agent failed");
    assert_eq!(pool_failed, 0, "no request to the pool failed");
    assert!(
        slowest >= 500,
        "some requests waited in the queue for the replacement ({slowest} ms)"
    );
    assert!(
        pool_ok_at_ready > pool_ok_at_kill,
        "the pool kept serving GET / while the agent was down"
    );
    assert!(
        h.count(&["agent restarting at once"]) == 1,
        "it had served for over a second: {:?}",
        h.lines()
            .iter()
            .filter(|l| l.contains("agent restarting"))
            .collect::<Vec<_>>()
    );

    let doc = status(health);
    let a = &doc["agent"];
    assert_eq!(a["pid"], new, "{a}");
    assert_eq!(a["state"], "ready", "{a}");
    assert_eq!(a["restarts"], 1, "{a}");
    assert!(
        a["last_exit"].as_str().unwrap_or("").contains("SIGKILL"),
        "{a}"
    );
    assert_eq!(
        doc["herder"]["restarts_total"], 0,
        "the agent's restarts are its own: {doc}"
    );
    let (_, metrics) = probe(health, "/metrics");
    assert!(
        metrics.contains("herder_agent_restarts_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herder_agent_ready 1"), "{metrics}");
    assert_eq!(
        h.lines()
            .iter()
            .filter(|l| is_herder_worker_line(l) && is_worker_exit(l))
            .count(),
        0,
        "no worker was restarted"
    );
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn an_agent_that_always_fails_does_not_stop_the_pool() {
    let dir = TempDir::new("agent-fail");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    let agent = agent_cmd();
    // --restart-limit 2, and the agent fails far more often: without --agent-required herder
    // never gives up because of it.
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--restart-limit",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        // The workers' start-up request waits for no agent for long.
        &[("AGENT_FAIL", "1"), ("WORKER_AGENT_TIMEOUT_MS", "500")],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    h.wait_nth_line(&["agent restarting in "], 4, LONG);
    body_is_a_pid(&get(pool, "/").expect("the pool serves"));
    assert_eq!(probe(health, "/readyz").0, 200, "not required: ready");

    let doc = status(health);
    let a = &doc["agent"];
    let state = a["state"].as_str().unwrap_or_default();
    assert!(state == "backoff" || state == "starting", "{a}");
    assert!(
        a["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("status 1")),
        "{a}"
    );
    let restarts = a["restarts"].as_u64().unwrap();
    assert!(restarts >= 3, "{a}");
    h.wait_nth_line(&["agent restarting in "], 5, LONG);
    eventually("the agent's restarts counted", LONG, || {
        status(health)["agent"]["restarts"].as_u64().unwrap() > restarts
    });

    let delays: Vec<i64> = h
        .lines()
        .iter()
        .filter(|l| l.contains("agent restarting in "))
        .map(|l| num_after(l, "agent restarting in "))
        .collect();
    let doubling: Vec<i64> = (0..delays.len() as u32)
        .map(|i| (100 * 2i64.pow(i)).min(5000))
        .collect();
    assert_eq!(
        delays, doubling,
        "the backoff: 100 ms, doubling, at most 5 s"
    );
    assert!(
        h.lines()
            .iter()
            .filter(|l| l.contains("fixture-agent[") && l.contains("failing on purpose"))
            .count()
            >= 5
    );
    assert_eq!(h.count(&["giving up"]), 0);
    assert!(h.child.try_wait().unwrap().is_none(), "herder still runs");
    body_is_a_pid(&get(pool, "/").expect("the pool still serves"));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

fn body_is_a_pid(body: &str) {
    assert!(body.starts_with("pid="), "{body}");
}

#[test]
fn a_required_agent_that_always_fails_makes_herder_give_up_before_any_worker() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--agent-required",
            "--agent-ready",
            "notify",
            "--restart-limit",
            "3",
        ],
        &[("AGENT_FAIL", "1")],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1), "gave up");
    let lines = h.lines();
    let exits = lines
        .iter()
        .filter(|l| is_herder_agent_line(l) && l.contains(") exited with status 1"))
        .count();
    assert_eq!(exits, 4, "1 start + 3 restarts, like a worker's slot");
    for ms in [100, 200, 400] {
        assert_eq!(
            h.count(&[&format!("agent restarting in {ms} ms")]),
            1,
            "backoff of {ms} ms"
        );
    }
    assert_eq!(h.count(&["giving up", "agent"]), 1, "{}", lines.join("\n"));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("fixture-worker[")
                || (is_herder_worker_line(l) && l.contains(SPAWNED))),
        "no worker was ever started:\n{}",
        lines.join("\n")
    );
}

#[test]
fn a_stop_drains_the_workers_before_the_agent() {
    let dir = TempDir::new("agent-stop");
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix:{}", sock.display());
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "3",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        &[],
    );
    let pool = h.addr();
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {pid} ")));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    let lines = h.lines();
    let worker_exits: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_herder_worker_line(l) && is_worker_exit(l))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(worker_exits.len(), 3, "{}", lines.join("\n"));
    let agent_exit = position(&lines, "the agent's exit", |l| {
        is_herder_agent_line(l) && is_worker_exit(l)
    });
    assert!(
        lines[agent_exit].contains(&format!("agent (pid {pid}) exited with status 0")),
        "it exits 0 on SIGTERM: {}",
        lines[agent_exit]
    );
    let drained = position(&lines, "pool drained: stopping the agent", |l| {
        l.contains("pool drained: stopping the agent")
    });
    let agent_termed = position(&lines, "the agent's SIGTERM", |l| {
        l.contains(&format!("fixture-agent[{pid}] got SIGTERM"))
    });
    let last_worker = *worker_exits.last().unwrap();
    assert!(
        last_worker < drained && drained < agent_termed && agent_termed < agent_exit,
        "every worker's exit, then the agent's stop:\n{}",
        lines.join("\n")
    );
    // Each worker's last request, made during its drain, reached the agent.
    let last: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.contains(" last agent "))
        .collect();
    assert_eq!(last.len(), 3, "{}", lines.join("\n"));
    for l in last {
        assert!(
            l.contains(&format!("last agent reply: agent {pid} ")),
            "{l}"
        );
    }
    assert!(!sock.exists(), "the agent's unix socket is removed at exit");
}

#[test]
fn the_agent_gets_its_socket_and_environment_and_none_of_the_pools_sockets() {
    let dir = TempDir::new("agent-env");
    let control_sock = dir.path().join("herder.sock");
    let pool_unix = format!("unix:{}", dir.path().join("pool.sock").display());
    let addr = abstract_name("env");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-l",
            &pool_unix,
            "--health",
            "127.0.0.1:0",
            "--control",
            control_sock.to_str().unwrap(),
            "-w",
            "1",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        &[],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.wait_line(&["fixture-worker[", "start-up agent reply: agent"], LONG);
    let worker = slot_pids(&status(health))[0] as i32;

    let env = environ(pid);
    for want in [
        "HERDER_AGENT=1".to_string(),
        "LISTEN_FDS=1".to_string(),
        format!("LISTEN_PID={pid}"),
        "LISTEN_FDNAMES=agent".to_string(),
        format!("HERDER_AGENT_SOCKET={addr}"),
    ] {
        assert!(env.contains(&want), "the agent has {want}: {env:?}");
    }
    assert!(
        env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|v| v.starts_with("HERDER_WORKER=")),
        "{env:?}"
    );
    let wenv = environ(worker);
    assert!(
        wenv.contains(&format!("HERDER_AGENT_SOCKET={addr}")),
        "{wenv:?}"
    );
    assert!(wenv.contains(&"HERDER_WORKER=0".to_string()), "{wenv:?}");
    assert!(!wenv.contains(&"HERDER_AGENT=1".to_string()), "{wenv:?}");

    // Its socket at fd 3, and nothing of the pool's: the worker's fds 3 and 4 are the pool's.
    let afds = fds(pid);
    let wfds = fds(worker);
    let pool_sockets: Vec<&String> = [3, 4].iter().map(|n| &wfds[n]).collect();
    assert!(afds[&3].starts_with("socket:"), "{afds:?}");
    for s in &pool_sockets {
        assert!(s.starts_with("socket:"), "{wfds:?}");
        assert!(
            !afds.values().any(|v| v == *s),
            "the agent holds the pool's {s}: {afds:?}"
        );
    }
    assert!(
        !wfds.values().any(|v| *v == afds[&3]),
        "a worker holds the agent's socket: {wfds:?}"
    );
    assert_eq!(afds[&0], "/dev/null", "{afds:?}");
    assert_eq!(
        afds.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "no other fd: {afds:?}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let pgrp: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, pid, "its own process group");

    // USR1 reaches the agent too.
    h.signal(libc::SIGUSR1);
    h.wait_line(&[&format!("fixture-agent[{pid}] got SIGUSR1")], LONG);

    // `herder status`: one row for the agent; /status says the rest.
    let out = control(&control_sock, &["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("agent"))
        .unwrap_or_else(|| panic!("no agent row:\n{table}"));
    assert!(row.contains(&pid.to_string()), "{row}");
    assert!(
        table
            .lines()
            .any(|l| l.trim() == format!("agent socket: {addr}")),
        "{table}"
    );
    let doc = status(health);
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(doc["agent"]["pid"], pid, "{doc}");
    let json = control(&control_sock, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["agent"]["pid"], pid, "{json}");

    // A reload without --agent-reload rolls the pool and leaves the agent alone.
    let out = control(&control_sock, &["reload", "--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{out:?}");
    let doc = status(health);
    assert_ne!(slot_pids(&doc)[0] as i32, worker, "the pool rolled");
    assert_eq!(doc["agent"]["pid"], pid, "the agent did not: {doc}");
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {pid} ")));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn agent_options_without_an_agent_are_a_usage_error() {
    let agent = agent_cmd();
    let cases: [&[&str]; 6] = [
        &["--agent-listen", "127.0.0.1:0"],
        &["--agent-required"],
        &["--agent-reload"],
        &["--agent-ready", "notify"],
        &["--agent", ""],
        &["--agent", &agent, "--agent-listen", "udp:127.0.0.1:0"],
    ];
    for args in cases {
        let mut h = Herder::spawn(herder_cmd(args, &["sh", "-c", "echo WORKER RAN"]));
        let code = h.wait_exit(Duration::from_secs(10)).code();
        let lines = h.lines();
        assert_eq!(code, Some(2), "{args:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{args:?}: one line: {lines:?}");
        assert!(lines[0].starts_with("herder: "), "{args:?}: {lines:?}");
        assert!(lines[0].contains("--agent"), "{args:?}: {lines:?}");
    }
    // And without any agent option, /status says there is none.
    let mut h = Herder::start(
        &["--health", "127.0.0.1:0", "-w", "1"],
        &["sh", "-c", "exec sleep 600"],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    let doc = status(health);
    assert!(doc.get("agent").is_some_and(|a| a.is_null()), "{doc}");
}

#[test]
fn agent_reload_replaces_the_agent_once_the_pool_has_rolled() {
    let dir = TempDir::new("agent-reload");
    let control_sock = dir.path().join("herder.sock");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "--control",
            control_sock.to_str().unwrap(),
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "[::1]:0",
            "--agent-reload",
        ],
        &[],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    let old_socket = fds(old)[&3].clone();
    let addr = status(health)["agent"]["socket"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        addr.starts_with("[::1]:") && !addr.ends_with(":0"),
        "{addr}"
    );
    h.wait_nth_line(&["fixture-worker[", "start-up agent reply: agent"], 2, LONG);
    let out = control(&control_sock, &["reload", "--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{out:?}");
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    assert_eq!(fds(new)[&3], old_socket, "the same socket at fd 3");
    h.wait_line(&[&format!("agent (pid {old}) exited with status 0")], LONG);
    let lines = h.lines();
    // The pool's second generation ready, then the new agent, then the old one's stop.
    let last_worker_ready = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_herder_worker_line(l) && l.contains(READY))
        .map(|(i, _)| i)
        .nth(3)
        .unwrap_or_else(|| panic!("4 worker ready lines:\n{}", lines.join("\n")));
    let new_spawned = position(&lines, "the new agent spawned", |l| {
        l.contains(&format!("agent (pid {new}) spawned"))
    });
    let new_ready = position(&lines, "the new agent ready", |l| {
        l.contains(&format!("agent (pid {new}) ready"))
    });
    let old_termed = position(&lines, "the old agent's SIGTERM", |l| {
        l.contains(&format!("fixture-agent[{old}] got SIGTERM"))
    });
    assert!(
        last_worker_ready < new_spawned && new_ready < old_termed,
        "the pool rolled, then a new agent, then the old one stopped:\n{}",
        lines.join("\n")
    );
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {new} ")));
    let doc = status(health);
    assert_eq!(doc["agent"]["pid"], new, "{doc}");
    assert_eq!(doc["agent"]["state"], "ready", "{doc}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

/// A copy of the herder under test at `path`, stamped with `tag` (as tests/upgrade.rs does).
fn install(path: &Path, tag: &str) {
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

#[test]
fn an_upgrade_keeps_the_agent() {
    let dir = TempDir::new("agent-upgrade");
    let exe: PathBuf = dir.path().join("herder");
    install(&exe, "one");
    let control_sock = dir.path().join("herder.sock");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    let agent = agent_cmd();
    let mut cmd = Command::new(&exe);
    cmd.args(["-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--control"])
        .arg(&control_sock)
        .args(["-w", "2", "--ready", "notify", "--agent", &agent])
        .args(["--agent-listen", &addr, "--"])
        .args(WORKER)
        .env("HERDER_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    let mut h = Herder::spawn(cmd);
    let pool = h.addr();
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    let before = get(pool, "/agent").unwrap();
    assert!(before.starts_with(&format!("agent {pid} ")), "{before}");
    let counter_before = num_after(&before, &format!("agent {pid} "));
    let socket_before = fds(pid)[&3].clone();
    let workers = slot_pids(&status(health));

    install(&exe, "two");
    let out = control(&control_sock, &["upgrade", "--wait", "--timeout", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = status(health);
    assert!(
        doc["herder"]["version"].as_str().unwrap().ends_with("+two"),
        "{doc}"
    );
    assert_eq!(doc["agent"]["pid"], pid, "the same agent: {doc}");
    assert_eq!(doc["agent"]["restarts"], 0, "{doc}");
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(slot_pids(&doc), workers);
    assert!(alive(pid));
    assert_eq!(fds(pid)[&3], socket_before);
    // The same process, counting on: not a new agent with the same pid by chance.
    let after = get(pool, "/agent").unwrap();
    assert!(after.starts_with(&format!("agent {pid} ")), "{after}");
    assert!(num_after(&after, &format!("agent {pid} ")) > counter_before);
    let agent_exits = h
        .lines()
        .iter()
        .filter(|l| is_herder_agent_line(l) && is_worker_exit(l))
        .count();
    assert_eq!(agent_exits, 0, "the agent was neither stopped nor killed");
    // The new image knows it is the agent: a stop still ends it after the workers.
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    let lines = h.lines();
    let agent_exit = position(&lines, "the agent's exit", |l| {
        l.contains(&format!("agent (pid {pid}) exited with status 0"))
    });
    let last_worker_exit = lines
        .iter()
        .rposition(|l| is_herder_worker_line(l) && is_worker_exit(l))
        .expect("worker exits");
    assert!(last_worker_exit < agent_exit, "{}", lines.join("\n"));
}

#[test]
fn a_required_agent_gates_the_workers_and_readyz_configured_from_the_environment() {
    let dir = TempDir::new("agent-required");
    let gate = dir.path().join("gate");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
        ],
        &[
            ("HERDER_AGENT_COMMAND", &agent),
            ("HERDER_AGENT_LISTEN", &addr),
            ("HERDER_AGENT_REQUIRED", "true"),
            ("AGENT_READY_GATE", gate.to_str().unwrap()),
        ],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let first = wait_agent(&mut h, "spawned", 1);
    h.wait_line(&[&format!("fixture-agent[{first}] waiting for")], LONG);
    let (code, body) = probe(health, "/readyz");
    assert_eq!(code, 503, "{body}");
    let doc = status(health);
    assert_eq!(doc["agent"]["state"], "starting", "{doc}");
    assert_eq!(doc["agent"]["required"], true, "{doc}");
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(
        h.lines()
            .iter()
            .filter(|l| is_herder_worker_line(l) && l.contains(SPAWNED))
            .count(),
        0,
        "no worker before a required agent's READY=1"
    );
    std::fs::write(&gate, "").unwrap();
    assert_eq!(wait_agent(&mut h, "ready", 1), first);
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(probe(health, "/readyz").0, 200);

    // Down again: /readyz says so at once, while the pool keeps serving.
    std::fs::remove_file(&gate).unwrap();
    // SAFETY: kill(2) on the agent pid herder reported.
    unsafe { libc::kill(first, libc::SIGKILL) };
    h.wait_line(&[&format!("agent (pid {first}) killed by signal 9")], LONG);
    let second = wait_agent(&mut h, "spawned", 2);
    h.wait_line(&[&format!("fixture-agent[{second}] waiting for")], LONG);
    let (code, body) = probe(health, "/readyz");
    assert_eq!(code, 503, "a required agent that is not ready: {body}");
    assert!(body.contains("agent"), "says why: {body}");
    body_is_a_pid(&get(pool, "/").expect("the pool serves meanwhile"));
    std::fs::write(&gate, "").unwrap();
    assert_eq!(wait_agent(&mut h, "ready", 2), second);
    eventually("/readyz 200 again", LONG, || {
        probe(health, "/readyz").0 == 200
    });
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn the_agent_gets_its_stop_signal_after_the_pool_and_sigkill_at_its_drain_timeout() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--agent-stop-signal",
            "USR2",
            "--agent-drain-timeout",
            "1s",
        ],
        &[],
    );
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGTERM);
    // USR2 makes the fixture log and carry on: herder must SIGKILL it, a second later.
    h.wait_line(&[&format!("fixture-agent[{pid}] got SIGUSR2")], LONG);
    let asked = Instant::now();
    let code = h.wait_exit(LONG).code();
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "--agent-drain-timeout 1s: {:?}",
        asked.elapsed()
    );
    let lines = h.lines();
    let last_worker_exit = lines
        .iter()
        .rposition(|l| is_herder_worker_line(l) && is_worker_exit(l))
        .expect("worker exits");
    let usr2 = position(&lines, "the agent's USR2", |l| {
        l.contains(&format!("fixture-agent[{pid}] got SIGUSR2"))
    });
    let killed = position(&lines, "the agent killed", |l| {
        l.contains(&format!("agent (pid {pid}) killed by signal 9 (SIGKILL)"))
    });
    assert!(
        last_worker_exit < usr2 && usr2 < killed,
        "{}",
        lines.join("\n")
    );
    assert_eq!(h.count(&["fixture-agent[", "got SIGTERM"]), 0);
    assert_eq!(
        code,
        Some(3),
        "3, as when a worker had to be SIGKILLed at its drain timeout"
    );
}

#[test]
fn quit_kills_the_agent_with_the_pool_at_once() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "60s",
        ],
        &[],
    );
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGQUIT);
    let code = h.wait_exit(LONG).code();
    assert_eq!(code, Some(3), "a forced stop");
    assert_eq!(
        h.count(&[&format!("agent (pid {pid}) killed by signal 9 (SIGKILL)")]),
        1
    );
    assert_eq!(h.count(&["pool drained: stopping the agent"]), 0);
    assert_eq!(h.count(&["fixture-agent[", "got SIGTERM"]), 0);
    assert!(!alive(pid));
}

#[test]
fn an_agent_that_says_stopping_is_replaced_at_once() {
    let dir = TempDir::new("agent-retire");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "1",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
        ],
        &[("AGENT_RETIRE_DIR", dir.path().to_str().unwrap())],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    let ready_at = Instant::now();
    h.wait_line(&["pool ready"], LONG);
    // STOPPING=1 counts once the agent has served (a second ready).
    eventually("the agent ready for over a second", LONG, || {
        ready_at.elapsed() > Duration::from_millis(1200)
    });
    // Forwarded to the agent, whose answer is STOPPING=1; it then waits to be released.
    h.signal(libc::SIGUSR1);
    h.wait_line(&[&format!("fixture-agent[{old}] retiring")], LONG);
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    assert!(alive(old), "replaced while the old one still runs");
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {new} ")));
    std::fs::write(dir.path().join(format!("retire-{old}")), "").unwrap();
    h.wait_line(&[&format!("agent (pid {old}) exited with status 0")], LONG);
    assert_eq!(h.count(&["agent restarting in"]), 0, "no backoff");
    let doc = status(health);
    assert_eq!(doc["agent"]["pid"], new, "{doc}");
    assert_eq!(doc["agent"]["state"], "ready", "{doc}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
