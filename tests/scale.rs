//! Scale-down without resets, with the real binary: under load, `herder scale` between 4 and 2
//! slots again and again (`--reuseport --balance hash`), and no connection is reset or
//! refused. A removed slot's worker is steered away first and drains only once the kernel has
//! nothing more queued on its socket (src/pool/leave.rs); before that change, the connections
//! queued there when the worker stopped accepting were reset as its socket closed.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use socket2::{Domain, Socket, Type};

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused,
    Reset,
    /// No answer in time, or not a 200.
    Failed,
}

fn classify(e: &std::io::Error) -> Outcome {
    match e.kind() {
        ErrorKind::ConnectionRefused => Outcome::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Outcome::Reset
        }
        _ => Outcome::Failed,
    }
}

/// One request on a new connection from `src`.
fn request(src: Ipv4Addr, addr: SocketAddr) -> Outcome {
    let go = || -> std::io::Result<String> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        s.connect_timeout(&addr.into(), Duration::from_secs(10))?;
        let mut s = TcpStream::from(s);
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET /sleep?ms=2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp)
    };
    match go() {
        Ok(r) if r.starts_with("HTTP/1.1 200") => Outcome::Ok,
        // An empty answer: the peer closed without a word (a reset the kernel turned into
        // an orderly EOF, or a worker that dropped the connection).
        Ok(r) if r.is_empty() => Outcome::Reset,
        Ok(_) => Outcome::Failed,
        Err(e) => classify(&e),
    }
}

/// `herder status --json` on `ctl`, parsed (`None`: no answer).
fn status(ctl: &Path) -> Option<serde_json::Value> {
    let out = std::process::Command::new(herder_bin())
        .args(["status", "--json", "--control"])
        .arg(ctl)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn scale(ctl: &Path, n: usize) {
    let out = std::process::Command::new(herder_bin())
        .args(["scale", &n.to_string(), "--control"])
        .arg(ctl)
        .output()
        .unwrap();
    assert!(out.status.success(), "herder scale {n}: {out:?}");
}

/// Until the pool has `n` slots, all ready and all receiving.
fn wait_scaled(ctl: &Path, n: usize) {
    eventually(&format!("{n} slots, all ready and receiving"), LONG, || {
        let Some(st) = status(ctl) else { return false };
        let h = &st["herder"];
        let receiving = st["steering"]["slots"]
            .as_array()
            .is_some_and(|s| s.len() == n && s.iter().all(|v| v == "receiving"));
        h["workers"] == n && h["ready_workers"] == n && receiving
    });
}

#[test]
fn scaling_4_2_4_under_load_resets_and_refuses_no_connection() {
    let dir = TempDir::new("scale-load");
    let ctl = dir.path().join("ctl");
    let mut h = Herder::start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "4",
            "--reuseport",
            "--balance",
            "hash",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &[demo_bin()],
    );
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    wait_scaled(&ctl, 4);

    // Client threads: a new connection per request, from 127.0.0.1 … 127.0.0.200.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..6u32)
        .map(|t| {
            let (stop, done, bad) = (stop.clone(), done.clone(), bad.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(SeqCst) {
                    let src = Ipv4Addr::new(127, 0, 0, 1 + (i % 200) as u8);
                    let o = request(src, addr);
                    if o == Outcome::Ok {
                        done.fetch_add(1, SeqCst);
                    } else {
                        bad.lock().unwrap().push((src, o));
                    }
                    i += 7;
                }
            })
        })
        .collect();
    eventually("the load runs", LONG, || done.load(SeqCst) > 200);

    for round in 0..5 {
        for n in [2, 4] {
            let before = done.load(SeqCst);
            scale(&ctl, n);
            wait_scaled(&ctl, n);
            // Some load went through at that size before the next change.
            eventually(&format!("round {round}: load at {n}"), LONG, || {
                done.load(SeqCst) > before + 100
            });
        }
    }
    scale(&ctl, 2);
    wait_scaled(&ctl, 2);
    let before = done.load(SeqCst);
    eventually("load after the last scale-down", LONG, || {
        done.load(SeqCst) > before + 200
    });
    stop.store(true, SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let bad = bad.lock().unwrap();
    let count = |o: Outcome| bad.iter().filter(|(_, b)| *b == o).count();
    assert!(
        bad.is_empty(),
        "{} requests served; reset {}, refused {}, failed {}: {:?}",
        done.load(SeqCst),
        count(Outcome::Reset),
        count(Outcome::Refused),
        count(Outcome::Failed),
        &bad[..bad.len().min(20)]
    );
    // The removed slots' workers left: steered away, then drained.
    assert!(h.count(&["steered away: it accepts what is queued"]) >= 10);
}

#[test]
fn a_removed_slot_whose_worker_accepts_nothing_is_left_after_at_most_a_second() {
    let dir = TempDir::new("scale-stuck");
    let ctl = dir.path().join("ctl");
    // Slot 1's worker never accepts: connections the kernel queues on its socket stay there.
    let script = format!(
        "if [ \"$HERDER_WORKER\" = 1 ]; then exec sleep 1000; fi; exec {}",
        demo_bin()
    );
    let mut h = Herder::start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--reuseport",
            "--control",
            ctl.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    let addr = h.addr();
    wait_scaled(&ctl, 2);
    // 40 connections, spread by the kernel's hash: some wait in slot 1's queue.
    let conns: Vec<TcpStream> = (1..=40u8)
        .map(|x| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, x), 0)).into())
                .unwrap();
            s.connect(&addr.into()).unwrap();
            TcpStream::from(s)
        })
        .collect();
    scale(&ctl, 1);
    h.wait_line(&["worker 1 (pid ", "steered away"], LONG);
    // herder status names it: leaving (for up to the 1 s bound).
    let st = status(&ctl).expect("status");
    let states: Vec<&str> = st["other_workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["state"].as_str())
        .collect();
    // (Unless a loaded machine took longer than that to run `herder status`.)
    let drained = h.count(&["draining it anyway"]) > 0;
    assert!(
        states.contains(&"leaving") || drained,
        "a leaving worker in {states:?}"
    );
    // The queue never empties: it drains at the bound, and what was queued is reset.
    h.wait_line(
        &[
            "worker 1 (pid ",
            "still queued on its socket after 1s: draining it anyway",
        ],
        LONG,
    );
    h.wait_line(&["worker 1 (pid ", "killed by signal 15"], LONG);
    // Once its socket has closed: the connections that waited there were reset, the others
    // are served by slot 0.
    let outcomes: Vec<Outcome> = conns
        .into_iter()
        .map(|mut c| {
            c.set_read_timeout(Some(LONG)).unwrap();
            let mut resp = String::new();
            let sent = write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
            match sent.and_then(|()| c.read_to_string(&mut resp)) {
                Ok(_) if resp.starts_with("HTTP/1.1 200") => Outcome::Ok,
                Ok(_) => Outcome::Reset,
                Err(e) => classify(&e),
            }
        })
        .collect();
    assert!(outcomes.contains(&Outcome::Reset), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Ok), "{outcomes:?}");
}
