//! The `--health` endpoint, lame-duck stop and `--user`, with the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// One raw request; the status code and body.
fn probe(addr: SocketAddr, path: &str) -> (u16, String) {
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}

fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to health");
    s.set_read_timeout(Some(LONG)).unwrap();
    let _ = s.write_all(request);
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let code = resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        resp.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    )
}

fn health_addr(h: &mut Herder) -> SocketAddr {
    let line = h.wait_line(&["health endpoint", "addr="], LONG);
    field(&line, "addr").unwrap().parse().unwrap()
}

#[test]
fn readyz_follows_the_pool_and_status_matches_it() {
    let dir = TempDir::new("health");
    let gate = dir.path().join("gate");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; exec {}",
        gate.display(),
        demo_bin()
    );
    let mut h = Herder::start(
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
        &["sh", "-c", &script],
    );
    let health = health_addr(&mut h);
    assert_eq!(probe(health, "/livez").0, 200);
    let (code, body) = probe(health, "/readyz");
    assert_eq!((code, body.as_str()), (503, "not ready: starting\n"));
    std::fs::write(&gate, "").unwrap();
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(probe(health, "/readyz").0, 200);

    let (code, body) = probe(health, "/status");
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
    assert_eq!(doc["herder"]["state"], "ready");
    assert_eq!(doc["herder"]["pid"], h.pid());
    assert_eq!(doc["herder"]["ready_workers"], 2);
    let mut pids: Vec<i64> = doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_i64().unwrap())
        .collect();
    pids.sort();
    let mut spawned: Vec<i64> = h.spawned_pids().into_iter().map(i64::from).collect();
    spawned.sort();
    assert_eq!(pids, spawned, "/status lists the live workers");
    assert!(doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["state"] == "ready" && s["restarts"] == 0));
    assert_eq!(doc["sockets"][0]["fd"], 3);

    // A crash shows up as a restart and a last exit.
    // SAFETY: kill(2) on a worker pid herder reported.
    unsafe { libc::kill(spawned[0] as i32, libc::SIGKILL) };
    h.wait_nth_line(&["worker ready"], 3, LONG);
    let doc: serde_json::Value = serde_json::from_str(&probe(health, "/status").1).unwrap();
    let crashed = doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["restarts"] == 1)
        .expect("one slot restarted");
    assert_eq!(crashed["last_exit"], "killed by SIGKILL");
    assert_eq!(doc["herder"]["restarts_total"], 1);

    let (code, metrics) = probe(health, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("herder_restarts_total 1"), "{metrics}");
    assert!(
        metrics.contains("herder_workers{state=\"ready\"} 2"),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"));
}

#[test]
fn lame_duck_turns_readyz_503_while_still_serving_then_drains() {
    let mut h = Herder::start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--shutdown-delay",
            "2s",
        ],
        &[demo_bin()],
    );
    let addr = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(probe(health, "/readyz").0, 200);
    let start = std::time::Instant::now();
    h.signal(libc::SIGTERM);
    h.wait_line(&["lame duck"], LONG);
    let (code, body) = probe(health, "/readyz");
    assert_eq!((code, body.as_str()), (503, "not ready: lame-duck\n"));
    // Still serving during the delay.
    while start.elapsed() < Duration::from_millis(1500) {
        get(addr, "/").expect("served during the shutdown delay");
    }
    assert_eq!(
        h.count(&["draining the pool"]),
        0,
        "no drain before the delay is over"
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert!(start.elapsed() >= Duration::from_secs(2));
}

#[test]
fn hostile_health_clients_do_not_stop_the_probes() {
    let mut h = Herder::start(
        &["--health", "127.0.0.1:0", "-w", "1"],
        &["sh", "-c", "exec sleep 600"],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    // More idle connections than herder serves at once, a huge head, garbage, a half-close.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(health).unwrap())
        .collect();
    let (code, _) = raw(health, &vec![b'x'; 64 * 1024]);
    assert!(
        code == 431 || code == 0,
        "oversized request refused ({code})"
    );
    let mut s = TcpStream::connect(health).unwrap();
    s.write_all(b"\x00\xff\xfegarbage\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.set_read_timeout(Some(LONG)).unwrap();
    let _ = s.read_to_string(&mut resp);
    let mut half = TcpStream::connect(health).unwrap();
    half.write_all(b"GET /livez HTTP/1.1\r\n").unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    // The probes get through once the idle ones time out (bounded by herder's 5 s limit).
    eventually("a /livez answer despite the idle connections", LONG, || {
        probe(health, "/livez").0 == 200
    });
    drop(idle);
    assert_eq!(probe(health, "/readyz").0, 200);
    assert_eq!(probe(health, "/nope").0, 404);
    assert_eq!(raw(health, b"DELETE /livez HTTP/1.1\r\n\r\n").0, 405);
    // herder itself is fine.
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

/// Everything the server sent until it closed.
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(request).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read to EOF");
    resp
}

#[test]
fn head_gets_the_status_line_and_headers_of_get_and_no_body() {
    let mut h = Herder::start(
        &["--health", "127.0.0.1:0", "-w", "1"],
        &["sh", "-c", "exec sleep 600"],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    for path in ["/livez", "/readyz", "/nope"] {
        let get = exchange(health, format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes());
        let head = exchange(health, format!("HEAD {path} HTTP/1.1\r\n\r\n").as_bytes());
        let (get_head, body) = get.split_once("\r\n\r\n").expect("a head");
        assert!(!body.is_empty(), "GET {path} has a body");
        assert!(
            get_head.contains(&format!("Content-Length: {}", body.len())),
            "{get}"
        );
        assert_eq!(
            head,
            format!("{get_head}\r\n\r\n"),
            "HEAD {path}: GET's status line and headers, Content-Length included, no body"
        );
    }
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn user_nobody_workers_serve_a_port_below_1024() {
    if !root() {
        eprintln!("skipping: --user needs root");
        return;
    }
    let port = (700..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let listen = format!("127.0.0.1:{port}");
    let mut h = Herder::start(
        &["-l", &listen, "-w", "2", "--user", "nobody"],
        &[demo_bin()],
    );
    h.wait_line(&["pool ready"], LONG);
    let addr: SocketAddr = listen.parse().unwrap();
    for pid in distinct_pids(addr, 2, LONG) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65534"),
            "worker {pid} runs as nobody: {uid}"
        );
        let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert!(
            !groups.split_whitespace().skip(1).any(|g| g == "0"),
            "no root group: {groups}"
        );
    }
}

#[test]
fn user_nobody_workers_still_die_with_herder() {
    if !root() {
        eprintln!("skipping: --user needs root");
        return;
    }
    // A credential change clears PDEATHSIG: herder must set it after dropping privileges.
    let mut h = Herder::start(
        &["-w", "2", "--user", "nobody"],
        &["sh", "-c", "exec sleep 600"],
    );
    h.wait_line(&["pool ready"], LONG);
    let pids = h.spawned_pids();
    h.signal(libc::SIGKILL);
    h.wait_exit(LONG);
    for pid in pids {
        eventually("a nobody worker to die with herder", LONG, || !alive(pid));
    }
}

#[test]
fn status_answers_during_a_drain_after_some_workers_are_gone() {
    let script = "if [ $HERDER_WORKER = 1 ]; then trap '' TERM; echo trapped; fi; exec sleep 600";
    let mut h = Herder::start(
        &[
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--drain-timeout",
            "20s",
        ],
        &["sh", "-c", script],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    h.wait_line(&["trapped"], LONG);
    h.signal(libc::SIGTERM);
    h.wait_line(&["worker exited", "slot=0"], LONG);
    let (code, body) = probe(health, "/status");
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["herder"]["state"], "draining");
    assert_eq!(
        doc["slots"][0]["pid"],
        serde_json::Value::Null,
        "slot 0's worker is gone"
    );
    assert_eq!(doc["slots"][1]["state"], "draining");
    assert_eq!(probe(health, "/readyz").0, 503);
    assert_eq!(probe(health, "/metrics").0, 200);
    h.signal(libc::SIGQUIT);
    assert_eq!(h.wait_exit(LONG).code(), Some(3));
}
