//! What operators see of the workers' memory and CPU, with the real binary: `/status`,
//! `herder status` (the MEM and CPU columns), `/metrics`, and `herder status --watch`. Memory
//! is checked against the process tree's PSS read here from `/proc`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::*;

fn client(sock: &Path, args: &[&str]) -> Output {
    Command::new(herder_bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .unwrap()
}

fn status_json(sock: &Path) -> serde_json::Value {
    let out = client(sock, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// herder with a control socket and a health endpoint, its pool ready.
fn start(dir: &TempDir, workers: &str, command: &[&str]) -> (Herder, PathBuf, SocketAddr) {
    let sock = dir.path().join("herder.sock");
    let args = [
        "-l",
        "127.0.0.1:0",
        "-w",
        workers,
        "--health",
        "127.0.0.1:0",
        "--control",
        sock.to_str().unwrap(),
    ];
    let mut h = Herder::start(&args, command);
    let health = field(&h.wait_line(&["health endpoint"], LONG), "addr")
        .unwrap()
        .parse()
        .unwrap();
    h.wait_line(&["pool ready"], LONG);
    (h, sock, health)
}

fn get_body(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    resp.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// A `Key:  N kB` line of a /proc file, in bytes.
fn kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The PSS and RSS summed over `pid` and its descendants, and how many processes: read here,
/// independently of herder.
fn tree_from_proc(pid: i32) -> (u64, u64, usize) {
    let (mut pss, mut rss, mut n) = (0, 0, 0);
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(rollup) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        pss += kb(&rollup, "Pss:");
        rss += kb(&rollup, "Rss:");
        n += 1;
        todo.extend(children_of(p));
    }
    (pss, rss, n)
}

/// `12.3M` and the like, as the table prints them, in bytes.
fn parse_size(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.len() - 1);
    let mult = match unit {
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        _ => panic!("not a size: {s}"),
    };
    num.parse::<f64>().unwrap() * mult
}

fn within(got: f64, want: f64, fraction: f64) -> bool {
    (got - want).abs() <= want * fraction
}

/// A worker that touches 48 MiB, forks a helper that touches 24 MiB more (and shares the 48
/// copy-on-write), then both sleep.
const FORKING_WORKER: &str = "
import os, time
a = bytearray(b'\\x01') * (48 << 20)
if os.fork() == 0:
    b = bytearray(b'\\x02') * (24 << 20)
    print('helper allocated', flush=True)
    time.sleep(600)
    os._exit(0)
print('worker allocated', flush=True)
time.sleep(600)
";

#[test]
fn memory_is_the_pss_of_the_workers_whole_tree() {
    let dir = TempDir::new("usage-mem");
    let (mut h, sock, health) = start(&dir, "1", &["python3", "-c", FORKING_WORKER]);
    h.wait_line(&["worker allocated"], LONG);
    h.wait_line(&["helper allocated"], LONG);
    let pid = h.spawned_pids()[0];

    let doc: serde_json::Value = serde_json::from_str(&get_body(health, "/status")).unwrap();
    let (pss, rss, n) = tree_from_proc(pid);
    let slot = &doc["slots"][0];
    assert_eq!(slot["pid"], pid);
    assert_eq!(slot["processes"], 2, "the worker and its helper: {slot}");
    assert_eq!(n, 2);
    let mem = slot["memory_bytes"].as_f64().expect("memory_bytes");
    assert!(
        within(mem, pss as f64, 0.10),
        "/status says {mem}, /proc's PSS sum {pss}"
    );
    assert!(mem >= (72 << 20) as f64, "what the tree touched: {mem}");
    // The 48 MiB shared since the fork count once, as RSS would not.
    assert!(mem < rss as f64 - (32 << 20) as f64, "PSS {mem}, RSS {rss}");
    assert!(doc["herder"]["memory_bytes"].as_u64().unwrap() > 1 << 20);
    assert!(doc["herder"]["cpu_seconds"].as_f64().is_some());

    // The MEM column of `herder status`.
    let out = String::from_utf8(client(&sock, &["status"]).stdout).unwrap();
    let header = out.lines().find(|l| l.starts_with("SLOT")).expect(&out);
    let cols: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        cols[..6],
        ["SLOT", "PID", "STATE", "UPTIME", "MEM", "CPU"],
        "{out}"
    );
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("0 "))
        .expect(&out)
        .split_whitespace()
        .collect();
    let (pss, _, _) = tree_from_proc(pid);
    let shown = parse_size(row[4]);
    assert!(
        within(shown, pss as f64, 0.10),
        "MEM {} against /proc's {pss}",
        row[4]
    );
    assert!(row[5].ends_with('%'), "{out}");
    assert!(out.contains("herder itself: memory"), "{out}");
    // The same in `--json` (the document of /status).
    let doc = status_json(&sock);
    let mem = doc["slots"][0]["memory_bytes"].as_f64().unwrap();
    assert!(within(mem, pss as f64, 0.10), "{mem} against {pss}");

    // Sampling is on request only: asked nothing, herder sleeps (no timer of its own).
    eventually("a second in which herder never wakes up", LONG, || {
        let before = context_switches(h.pid());
        std::thread::sleep(Duration::from_secs(1));
        context_switches(h.pid()) == before
    });
}

/// Voluntary and involuntary context switches of every thread of `pid`: each wakeup is one.
fn context_switches(pid: i32) -> u64 {
    let mut n = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        n += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    n
}

/// Slot 0 spins, slot 1 sleeps.
const BUSY_AND_IDLE: &str = "
import os, time
if os.environ['HERDER_WORKER'] == '0':
    print('spinning', flush=True)
    while True:
        pass
print('sleeping', flush=True)
time.sleep(600)
";

fn scrape(health: SocketAddr) -> (String, prometheus_parse::Scrape) {
    let body = get_body(health, "/metrics");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    (body, scrape)
}

fn sample(s: &prometheus_parse::Scrape, name: &str, slot: Option<&str>) -> Option<f64> {
    let found = s
        .samples
        .iter()
        .find(|m| m.metric == name && slot.is_none_or(|v| m.labels.get("slot") == Some(v)))?;
    match found.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(v),
        _ => None,
    }
}

#[test]
fn cpu_percent_tells_a_busy_worker_from_an_idle_one_and_metrics_carry_both() {
    let dir = TempDir::new("usage-cpu");
    let (mut h, sock, health) = start(&dir, "2", &["python3", "-c", BUSY_AND_IDLE]);
    h.wait_line(&["spinning"], LONG);
    h.wait_line(&["sleeping"], LONG);

    // Each request is a sample; CPU % is over the interval since the previous one. On a
    // loaded 2-core machine the spinner gets at least a good part of a core.
    let mut last = serde_json::Value::Null;
    eventually("slot 0 busy and slot 1 idle in /status", LONG, || {
        last = serde_json::from_str(&get_body(health, "/status")).unwrap();
        let pct = |i: usize| last["slots"][i]["cpu_percent"].as_f64().unwrap_or(-1.0);
        pct(0) > 25.0 && (0.0..2.0).contains(&pct(1))
    });
    let busy_cpu = last["slots"][0]["cpu_seconds"].as_f64().unwrap();
    assert!(last["slots"][1]["cpu_seconds"].as_f64().unwrap() < busy_cpu);

    // The table shows the same.
    eventually("the table's CPU column", LONG, || {
        let out = String::from_utf8(client(&sock, &["status"]).stdout).unwrap();
        let cpu = |slot: &str| -> f64 {
            out.lines()
                .find(|l| l.starts_with(&format!("{slot} ")))
                .and_then(|l| l.split_whitespace().nth(5))
                .and_then(|c| c.strip_suffix('%'))
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1.0)
        };
        cpu("0") > 25.0 && (0.0..2.0).contains(&cpu("1"))
    });

    // /metrics: a series per slot, labelled with the slot; herder's own process metrics.
    let (body, m) = scrape(health);
    for line in [
        "# TYPE herder_worker_memory_bytes gauge",
        "# HELP herder_worker_memory_bytes ",
        "# TYPE herder_worker_cpu_seconds counter",
        "# HELP herder_worker_cpu_seconds ",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_cpu_seconds counter",
    ] {
        assert!(body.contains(line), "no {line:?} in\n{body}");
    }
    for slot in ["0", "1"] {
        let mem = sample(&m, "herder_worker_memory_bytes", Some(slot)).expect(&body);
        assert!(mem > (1 << 20) as f64, "slot {slot}: {mem}");
    }
    assert_eq!(sample(&m, "herder_worker_memory_bytes", Some("2")), None);
    let busy = sample(&m, "herder_worker_cpu_seconds_total", Some("0")).expect(&body);
    let idle = sample(&m, "herder_worker_cpu_seconds_total", Some("1")).expect(&body);
    assert!(busy >= busy_cpu && busy > idle, "busy {busy}, idle {idle}");
    assert!(sample(&m, "process_resident_memory_bytes", None).unwrap() > (1 << 20) as f64);
    assert!(sample(&m, "process_cpu_seconds_total", None).is_some());
    let n = |m: &prometheus_parse::Scrape| {
        m.samples
            .iter()
            .filter(|s| s.metric == "herder_worker_cpu_seconds_total")
            .count()
    };
    assert_eq!(n(&m), 2);
}

/// `herder status --watch` with stdout into a pipe, its lines as they come.
struct Watch {
    child: std::process::Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Watch {
    fn start(sock: &Path, extra: &[&str]) -> Watch {
        let mut child = Command::new(herder_bin())
            .args(["status", "--watch"])
            .args(extra)
            .arg("--control")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watch {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits until `n` lines satisfy `pred`.
    fn wait(&mut self, n: usize, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + LONG;
        while self.seen.iter().filter(|l| pred(l)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("only saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(1)) {
                    self.seen.push(l);
                }
                return (st, err);
            }
            assert!(Instant::now() < deadline, "watch did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn watch_redraws_until_sigint_and_says_when_herder_goes_away() {
    let dir = TempDir::new("usage-watch");
    let (mut h, sock, _) = start(&dir, "2", &[demo_bin()]);

    // Into a pipe: whole tables one after another, a blank line between.
    let mut w = Watch::start(&sock, &[]);
    w.wait(2, |l| l.starts_with("SLOT"));
    w.signal(libc::SIGINT);
    let (st, err) = w.wait_exit();
    assert_eq!(st.code(), Some(0), "{err}");
    let tables = w.seen.split(|l| l.is_empty()).collect::<Vec<_>>();
    assert!(tables.len() >= 2, "{:?}", w.seen);
    for t in &tables {
        assert!(t[0].starts_with("herder "), "{t:?}");
        let rows = t.iter().skip_while(|l| !l.starts_with("SLOT")).count();
        assert_eq!(rows, 3, "a header and both slots, never cut: {t:?}");
    }
    assert!(
        !w.seen.iter().any(|l| l.contains('\x1b')),
        "no ANSI into a pipe"
    );

    // --json: one document per line.
    let mut w = Watch::start(&sock, &["--json"]);
    w.wait(2, |l| l.starts_with('{'));
    w.signal(libc::SIGINT);
    let (st, err) = w.wait_exit();
    assert_eq!(st.code(), Some(0), "{err}");
    for l in &w.seen {
        let doc: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
        assert_eq!(doc["slots"].as_array().unwrap().len(), 2);
        assert!(doc["slots"][0]["memory_bytes"].as_u64().is_some(), "{l}");
    }

    // herder stops under a running watch: it says so and exits 2.
    let mut w = Watch::start(&sock, &[]);
    w.wait(1, |l| l.starts_with("SLOT"));
    assert!(client(&sock, &["stop"]).status.success());
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    let (st, err) = w.wait_exit();
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("herder went away"), "{err}");
}
