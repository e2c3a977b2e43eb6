//! The `--health` endpoint, lame-duck stop and `--user`, with the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    h.wait_nth_line(&[READY], 3, LONG);
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
    // Idle connections, a huge head, garbage, a half-close.
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
    // herder accepts always (no waiting behind the idle ones for their 5 s limit): the probe
    // is answered at once. How fast, under a real flood, is the next tests' business.
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
    h.wait_worker_exit(&["worker 0 (pid"], LONG);
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

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit; returns the new limit.
fn raise_own_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// Sets another process's RLIMIT_NOFILE (prlimit(2)), soft and hard.
fn set_nofile_of(pid: i32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit(2) on our own child, with a valid new limit and no old-limit pointer.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// How many descriptors `pid` has open.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `pid`'s CPU time so far (utime + stime, /proc/PID/stat fields 14 and 15; proc(5)).
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit(')').next().unwrap();
    let fields: Vec<u64> = after_comm
        .split_whitespace()
        .skip(11) // state is field 3; utime is field 14
        .take(2)
        .map(|f| f.parse().unwrap())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((fields[0] + fields[1]) * 1000 / hz)
}

/// A TCP connection started without waiting for the handshake (so that a server that does not
/// accept cannot stall the test while it opens a thousand of them).
fn connect_nonblocking(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_nonblocking(true).unwrap();
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => panic!("connect: {e}"),
    }
    s.into()
}

/// One probe with a hard deadline: the status code (0 for none) and how long it took.
fn timed_probe(addr: SocketAddr, path: &str) -> (u16, Duration) {
    let start = Instant::now();
    let cap = Duration::from_secs(2);
    let attempt = || -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&addr, cap)?;
        s.set_read_timeout(Some(cap))?;
        s.set_write_timeout(Some(cap))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        Ok(resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0))
    };
    (attempt().unwrap_or(0), start.elapsed())
}

#[test]
fn probes_answer_within_a_second_beside_1000_idle_and_1000_slowloris_connections() {
    assert!(
        raise_own_nofile() >= 2200,
        "the test needs 2,000+ descriptors"
    );
    let mut cmd = herder_cmd(
        &["--health", "127.0.0.1:0", "-w", "1"],
        &["sh", "-c", "exec sleep 600"],
    );
    // herder as a container runtime often starts it: a soft limit of 1024 (fewer descriptors
    // than there are hostile connections), so only eviction can keep the probes answered.
    // SAFETY: setrlimit(2) is async-signal-safe; it only changes the child's own limit.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 1024;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut h = Herder::spawn(cmd);
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);

    let idle: Vec<TcpStream> = (0..1000).map(|_| connect_nonblocking(health)).collect();
    let slow: Vec<TcpStream> = (0..1000).map(|_| connect_nonblocking(health)).collect();
    // Slowloris: one more byte of a request head that never ends, every 200 ms on each.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let head = b"GET /livez HTTP/1.1\r\nX-Slow: ";
            let mut sent = vec![0usize; slow.len()];
            while !stop.load(Ordering::Relaxed) {
                for (mut s, n) in slow.iter().zip(sent.iter_mut()) {
                    let byte = head.get(*n).copied().unwrap_or(b'a');
                    if let Ok(1) = s.write(&[byte]) {
                        *n += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            slow
        })
    };
    // Let the flood land: herder accepts (and evicts) while the slowloris trickle goes on.
    std::thread::sleep(Duration::from_secs(1));
    eprintln!("herder holds {} descriptors", fd_count(h.pid()));

    let probes: Vec<(&str, u16, Duration)> = ["/livez", "/readyz"]
        .iter()
        .cycle()
        .take(10)
        .map(|&path| {
            let (code, took) = timed_probe(health, path);
            std::thread::sleep(Duration::from_millis(200));
            (path, code, took)
        })
        .collect();
    stop.store(true, Ordering::Relaxed);
    let slow = trickle.join().unwrap();
    eprintln!("probes: {probes:?}");
    for (path, code, took) in &probes {
        assert!(
            *code == 200 && *took < Duration::from_secs(1),
            "{path} answered {code} in {took:?} (a kubelet gives up after 1 s): {probes:?}"
        );
    }
    drop((idle, slow));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_full_fd_table_makes_herder_back_off_not_spin() {
    let dir = TempDir::new("emfile");
    let sock = dir.path().join("c.sock");
    let mut h = Herder::start(
        &[
            "--health",
            "127.0.0.1:0",
            "--control",
            sock.to_str().unwrap(),
            "-w",
            "1",
        ],
        &["sh", "-c", "exec sleep 600"],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    // Room for a handful of connections: they exhaust the table, the rest wait in the backlog
    // and keep both listeners readable, so every accept(2) fails with EMFILE.
    let limit = fd_count(h.pid()) as u64 + 4;
    set_nofile_of(h.pid(), limit);
    let held: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(health).unwrap())
        .collect();
    let control = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    eventually("herder's fd table to fill up", LONG, || {
        fd_count(h.pid()) as u64 >= limit
    });

    let (cpu0, t0) = (cpu_time(h.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (cpu_time(h.pid()) - cpu0, t0.elapsed());
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "herder used {cpu:?} of CPU in {wall:?} ({:.0}%)",
        share * 100.0
    );
    // Backing off (10 ms doubling to 250 ms) is a dozen failed accept(2) calls in 2 s, next to
    // nothing; 20% of a core leaves room for a debug build on a loaded box, and is far below
    // the 100% of a loop retrying at once.
    assert!(
        share < 0.2,
        "herder spins on EMFILE: {cpu:?} of CPU in {wall:?}"
    );
    for listener in ["health:", "control:"] {
        let warned = h.count(&[listener, "cannot accept connections"]);
        assert_eq!(warned, 1, "{listener} warned once, not per failed accept");
    }

    drop((held, control));
    eventually("/livez answers again", LONG, || {
        timed_probe(health, "/livez").0 == 200
    });
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(LONG)).unwrap();
    c.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(
        answer.contains("\"ok\":true"),
        "control answers again: {answer}"
    );
    // The episode is over once accepts have worked for a second (serve::EPISODE_GAP).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(timed_probe(health, "/livez").0, 200);
    h.wait_line(&["health:", "accepting connections again"], LONG);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
