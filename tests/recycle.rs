//! Worker recycling with the real binary: a worker that leaks memory under load
//! (`--max-memory`) and workers that reach `--max-lifetime` are replaced first and drained
//! after, one at a time, with no failed request and never fewer ready workers than
//! `--min-ready`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// New connections, one request each, `pause` apart, until stopped; and a prober that reads
/// `/status` meanwhile and records the fewest ready workers it saw.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    fewest_ready: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, health: SocketAddr, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let fewest_ready = Arc::new(AtomicUsize::new(usize::MAX));
        let mut threads: Vec<_> = (0..2)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        match get(addr, "/") {
                            Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                eprintln!("  load: {e}");
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                        // The pace of the load (the leak per request makes it matter).
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        let (s, fewest) = (stop.clone(), fewest_ready.clone());
        threads.push(std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Ok(body) = get(health, "/status") {
                    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    if let Some(n) = doc["herder"]["ready_workers"].as_u64() {
                        fewest.fetch_min(n as usize, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
        Load {
            stop,
            ok,
            failed,
            fewest_ready,
            threads,
        }
    }

    /// (ok, failed, the fewest ready workers /status reported)
    fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.fewest_ready.load(Ordering::SeqCst),
        )
    }
}

/// herder's own log, in order: each recycle begins ("recycling worker") and ends ("recycle
/// of worker … done") before the next begins. Returns how many there were.
fn one_at_a_time(lines: &[String]) -> usize {
    let mut open = false;
    let mut n = 0;
    for l in lines {
        if l.contains("recycling worker") {
            assert!(!open, "a recycle began while another was under way:\n{l}");
            open = true;
            n += 1;
        } else if l.contains("recycle of worker") && l.contains("done") {
            open = false;
        }
    }
    n
}

#[test]
fn a_worker_that_leaks_memory_is_recycled_with_no_failed_request() {
    let mut cmd = herder_cmd(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--ready",
            "notify",
            "--max-memory",
            "64M",
        ],
        &[demo_bin()],
    );
    cmd.env("DEMO_LEAK_KB", "2048"); // 2 MiB kept per request
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    let load = Load::start(addr, health, Duration::from_millis(20));
    h.wait_nth_line(&["recycle of worker", "done"], 2, Duration::from_secs(90));
    let (ok, failed, fewest) = load.finish();
    let lines = h.lines();
    let recycles = one_at_a_time(&lines);
    let why = lines
        .iter()
        .find(|l| l.contains("more than --max-memory 64M"))
        .expect("the log says which limit and the value");
    eprintln!("{ok} ok, {failed} failed, {recycles} recycles, fewest ready {fewest}: {why}");
    assert_eq!(failed, 0, "no request failed across {recycles} recycles");
    assert!(ok > 50);
    assert_eq!(
        fewest, 2,
        "never fewer ready workers than --min-ready (all: 2)"
    );
    let metrics = get(health, "/metrics").unwrap();
    assert!(
        metrics.contains("herder_recycles_total{reason=\"memory\"} "),
        "{metrics}"
    );
    let doc: serde_json::Value = serde_json::from_str(&get(health, "/status").unwrap()).unwrap();
    assert_eq!(
        doc["herder"]["restarts_total"], 0,
        "a recycle is not a restart: {doc}"
    );
    assert!(
        doc["herder"]["recycles_total"]["memory"].as_u64() >= Some(2),
        "{doc}"
    );
}

#[test]
fn workers_reach_max_lifetime_one_at_a_time() {
    let mut h = Herder::start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "--workers",
            "4",
            "--ready",
            "notify",
            "--max-lifetime",
            "3s",
        ],
        &[demo_bin()],
    );
    let addr = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    let t = Instant::now();
    let load = Load::start(addr, health, Duration::from_millis(5));
    // 20 s of lives of at most 3 s: every slot is recycled several times.
    let deadline = t + Duration::from_secs(20);
    while Instant::now() < deadline {
        h.lines();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, failed, fewest) = load.finish();
    let lines = h.lines();
    let recycles = one_at_a_time(&lines);
    eprintln!("{ok} ok, {failed} failed, {recycles} recycles in 20 s, fewest ready {fewest}");
    assert!(
        recycles >= 8,
        "4 workers living 1.5-3 s over 20 s: {recycles}"
    );
    assert_eq!(failed, 0);
    assert_eq!(
        fewest, 4,
        "never fewer ready workers than --min-ready (all: 4)"
    );
    let doc: serde_json::Value = serde_json::from_str(&get(health, "/status").unwrap()).unwrap();
    assert_eq!(doc["herder"]["restarts_total"], 0, "{doc}");
}
