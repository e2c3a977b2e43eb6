//! `--reuseport` steering with the real binary: new connections reach only slots whose worker
//! is ready, and `--balance client-ip` keeps each client on one slot. Clients come from many
//! addresses of 127.0.0.0/8 (the client socket is bound to 127.0.0.X before it connects).

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::*;
use socket2::{Domain, Socket, Type};

/// One `GET /` from `src`: which slot answered (`None`: no answer within `timeout`).
fn ask(src: Ipv4Addr, addr: SocketAddr, timeout: Duration) -> Option<usize> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())
        .ok()?;
    s.connect_timeout(&addr.into(), timeout).ok()?;
    let mut s = std::net::TcpStream::from(s);
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let body = resp.split("\r\n\r\n").nth(1)?;
    field(body, "slot")?.parse().ok()
}

fn client(x: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, x)
}

/// herder's log filter for these tests: steering decisions at debug.
fn steer_log(cmd: &mut std::process::Command) {
    cmd.env("HERDER_LOG", "info,herder::steer=debug");
}

/// The log line of a program change that leaves exactly `receiving` receiving.
fn receiving(slots: &[usize], of: usize) -> String {
    format!("receiving slots {slots:?} of {of}")
}

#[test]
fn client_ip_keeps_each_client_on_one_slot_and_moves_it_only_while_that_slot_cannot_serve() {
    let dir = TempDir::new("steer-ip");
    let mark = dir.path().join("slow");
    let control = dir.path().join("ctl");
    // A slot's replacement takes 8 s to get ready once the mark exists (--ready notify).
    let script = format!(
        "if [ -e {} ]; then export DEMO_READY_DELAY_MS=8000; fi; exec {}",
        mark.display(),
        demo_bin()
    );
    let mut cmd = herder_cmd(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "4",
            "--reuseport",
            "--balance",
            "client-ip",
            "--ready",
            "notify",
            "--control",
            control.to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    steer_log(&mut cmd);
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    h.wait_line(&[&receiving(&[0, 1, 2, 3], 4)], LONG);

    // 200 clients, 20 requests each: one slot per client, and an even spread.
    let home = move |x: u8| {
        let slots: Vec<Option<usize>> = (0..20).map(|_| ask(client(x), addr, LONG)).collect();
        assert!(
            slots.iter().all(|s| *s == slots[0] && s.is_some()),
            "127.0.0.{x}: {slots:?}"
        );
        slots[0].unwrap()
    };
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                (1 + 50 * t..=50 * (t + 1))
                    .map(|x| (x, home(x)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let homes: Vec<(u8, usize)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let mut per_slot = [0usize; 4];
    for &(_, s) in &homes {
        per_slot[s] += 1;
    }
    assert!(
        per_slot.iter().all(|&n| n <= 75),
        "no slot above 1.5× its share of 50: {per_slot:?}"
    );

    // kill -9 of one slot's worker: its clients go elsewhere at once, the others stay.
    let victim_slot = homes[0].1;
    let victim = h
        .lines()
        .iter()
        .filter(|l| l.contains(SPAWNED) && l.contains(&format!("slot={victim_slot}")))
        .filter_map(|l| field(l, "pid")?.parse::<i32>().ok())
        .next_back()
        .expect("the victim slot's pid");
    std::fs::write(&mark, "").unwrap();
    // SAFETY: kill(2) on a worker pid herder reported.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let others: Vec<usize> = (0..4).filter(|&s| s != victim_slot).collect();
    h.wait_line(&[&receiving(&others, 4)], LONG);
    // herder status says so: the mode, and which slot is steered away.
    let out = std::process::Command::new(herder_bin())
        .args(["status", "--control", control.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "steering: client-ip, receiving {}, steered away {victim_slot}",
        others
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(text.contains(&want), "{want:?} in\n{text}");
    let moved_at = Instant::now();
    for &(x, s) in &homes {
        let now = ask(client(x), addr, Duration::from_secs(5));
        assert!(
            moved_at.elapsed() < Duration::from_secs(7),
            "the check ran out of its window"
        );
        if s == victim_slot {
            assert!(
                matches!(now, Some(n) if n != victim_slot),
                "127.0.0.{x}: {now:?}"
            );
        } else {
            assert_eq!(now, Some(s), "127.0.0.{x} left a slot that serves");
        }
    }
    // Back home once the slot's new worker is ready.
    h.wait_nth_line(&[&receiving(&[0, 1, 2, 3], 4)], 2, LONG);
    for &(x, s) in homes.iter().filter(|(_, s)| *s == victim_slot) {
        for _ in 0..20 {
            assert_eq!(ask(client(x), addr, LONG), Some(s), "127.0.0.{x} came back");
        }
    }
}

/// The latency of `n` requests from fresh connections, one at a time (a request that got no
/// answer counts as `timeout`).
fn latencies(addr: SocketAddr, n: usize, timeout: Duration) -> Vec<Duration> {
    let mut out: Vec<Duration> = (0..n)
        .map(|i| {
            let t = Instant::now();
            match ask(client(1 + (i % 200) as u8), addr, timeout) {
                Some(_) => t.elapsed(),
                None => timeout,
            }
        })
        .collect();
    out.sort();
    out
}

#[test]
fn with_reuseport_no_request_waits_for_a_crash_looping_slot() {
    let dir = TempDir::new("steer-crash");
    let mark = dir.path().join("crash");
    // Slot 3 exits at once, in a loop, once the mark exists.
    let script = format!(
        "if [ \"$HERDER_WORKER\" = 3 ] && [ -e {} ]; then exit 1; fi; exec {}",
        mark.display(),
        demo_bin()
    );
    let mut cmd = herder_cmd(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "4",
            "--reuseport",
            "--restart-limit",
            "1000",
        ],
        &["sh", "-c", &script],
    );
    steer_log(&mut cmd);
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let timeout = Duration::from_secs(3);
    let healthy = latencies(addr, 200, timeout);

    std::fs::write(&mark, "").unwrap();
    let victim = h
        .lines()
        .iter()
        .filter(|l| l.contains(SPAWNED) && l.contains("slot=3"))
        .filter_map(|l| field(l, "pid")?.parse::<i32>().ok())
        .next_back()
        .expect("slot 3's pid");
    // SAFETY: kill(2) on a worker pid herder reported.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    // Into the backoff: the fourth failed start waits 800 ms, the next ones longer.
    h.wait_nth_line(&["worker 3 (pid ", ") exited with status"], 5, LONG);
    let looping = latencies(addr, 200, timeout);
    let worst = |l: &[Duration]| *l.last().unwrap();
    let p99 = |l: &[Duration]| l[l.len() * 99 / 100 - 1];
    assert!(
        worst(&looping) < Duration::from_secs(1),
        "a request waited {:?} with slot 3 crash-looping (p99 {:?}; healthy pool: worst {:?}, p99 {:?})",
        worst(&looping),
        p99(&looping),
        worst(&healthy),
        p99(&healthy)
    );
    assert!(
        worst(&healthy) < Duration::from_secs(1),
        "healthy: {:?}",
        worst(&healthy)
    );
}

#[test]
fn balance_without_reuseport_is_a_usage_error_that_says_why() {
    for args in [
        vec!["-l", "127.0.0.1:0", "--balance", "client-ip"],
        vec!["-l", "127.0.0.1:0", "--balance", "hash"],
    ] {
        let mut h = Herder::start(&args, &[demo_bin()]);
        let status = h.wait_exit(LONG);
        assert_eq!(status.code(), Some(2), "{args:?}");
        h.wait_line(&["--balance needs --reuseport"], LONG);
    }
    let mut cmd = herder_cmd(&["-l", "127.0.0.1:0"], &[demo_bin()]);
    cmd.env("HERDER_BALANCE", "client-ip");
    let mut h = Herder::spawn(cmd);
    assert_eq!(h.wait_exit(LONG).code(), Some(2));
    h.wait_line(
        &["HERDER_BALANCE=client-ip", "--balance needs --reuseport"],
        LONG,
    );
}

/// `herder …` against the control socket `ctl`; its stdout and whether it succeeded.
fn ctl(exe: &std::path::Path, ctl: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(exe)
        .args(args)
        .arg("--control")
        .arg(ctl)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn an_upgrade_keeps_the_kernel_order_with_a_retired_sibling_still_in_the_group() {
    // Slot 2 is removed while its worker drains a slow request (its sibling stays in the group,
    // held by that worker), then added back: the group is [slot 0, 1, old 2, new 2]. herder is
    // upgraded in place meanwhile; the new image must still send slot 2's clients to the new
    // slot 2's socket, not to the draining worker's.
    let dir = TempDir::new("steer-up");
    let exe = dir.path().join("herder");
    std::fs::copy(herder_bin(), &exe).unwrap();
    let control = dir.path().join("ctl");
    let mut cmd = std::process::Command::new(&exe);
    cmd.args([
        "-l",
        "127.0.0.1:0",
        "-w",
        "3",
        "--reuseport",
        "--balance",
        "client-ip",
    ])
    .args(["--ready", "notify", "--drain-timeout", "60s", "--control"])
    .arg(&control)
    .arg("--")
    .arg(demo_bin())
    .env_remove("NOTIFY_SOCKET")
    .env_remove("LISTEN_FDS")
    .env_remove("LISTEN_PID");
    steer_log(&mut cmd);
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    h.wait_line(&[&receiving(&[0, 1, 2], 3)], LONG);
    let homed: Vec<u8> = (1..=200u8)
        .filter(|&x| ask(client(x), addr, LONG) == Some(2))
        .take(10)
        .collect();
    assert!(!homed.is_empty(), "some clients live on slot 2");
    // A 20 s request on slot 2's worker: it keeps that worker, and its sibling, alive.
    let slow_from = homed[0];
    let (sent_tx, sent) = std::sync::mpsc::channel();
    let slow = std::thread::spawn(move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::V4(SocketAddrV4::new(client(slow_from), 0)).into())
            .unwrap();
        s.connect(&addr.into()).unwrap();
        let mut s = std::net::TcpStream::from(s);
        write!(
            s,
            "GET /sleep?ms=20000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let _ = sent_tx.send(());
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp
    });
    // Connected and sent: it is on slot 2's socket, and a slot that leaves serves its queue
    // before it drains, so its worker takes the request even if it has not accepted it yet.
    sent.recv_timeout(LONG).expect("the slow request is sent");
    assert!(ctl(&exe, &control, &["scale", "2"]).0);
    h.wait_line(&[&receiving(&[0, 1], 2)], LONG);
    assert!(ctl(&exe, &control, &["scale", "3"]).0);
    h.wait_nth_line(&[&receiving(&[0, 1, 2], 3)], 2, LONG);
    let (ok, text) = ctl(&exe, &control, &["upgrade", "--wait", "--timeout", "30s"]);
    assert!(ok, "herder upgrade: {text}");
    h.wait_line(&["took over the pool"], LONG);
    // The new image has re-attached; slot 2's clients reach the new slot 2 at once.
    for &x in &homed {
        assert_eq!(
            ask(client(x), addr, Duration::from_secs(3)),
            Some(2),
            "127.0.0.{x} after the upgrade"
        );
    }
    let resp = slow.join().unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "the drained request finished: {resp:?}"
    );
}

/// A UDP worker for the tests (herder-demo serves only HTTP): answers every datagram on fd 3
/// with its slot number, exits on SIGTERM.
const UDP_ECHO: &str = "import os, signal, socket, sys\n\
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n\
s = socket.socket(fileno=3)\n\
slot = os.environ['HERDER_WORKER'].encode()\n\
while True:\n    data, peer = s.recvfrom(512)\n    s.sendto(slot, peer)\n";

/// One datagram from `src` to `addr`: the slot that answered (`None`: no answer in `timeout`).
fn ask_udp(src: Ipv4Addr, addr: SocketAddr, timeout: Duration) -> Option<usize> {
    let s = std::net::UdpSocket::bind(SocketAddrV4::new(src, 0)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.send_to(b"?", addr).ok()?;
    let mut buf = [0u8; 16];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.parse().ok()
}

#[test]
fn udp_with_client_ip_keeps_each_client_on_one_slot_and_spreads_them_evenly() {
    let mut cmd = herder_cmd(
        &[
            "-l",
            "udp:127.0.0.1:0",
            "-w",
            "4",
            "--reuseport",
            "--balance",
            "client-ip",
        ],
        &["python3", "-c", UDP_ECHO],
    );
    steer_log(&mut cmd);
    let mut h = Herder::spawn(cmd);
    let line = h.wait_line(&["listening", "addr="], LONG);
    let addr: SocketAddr = field(&line, "addr")
        .and_then(|a| a.trim_start_matches("udp:").parse().ok())
        .unwrap_or_else(|| panic!("a UDP address in {line}"));
    h.wait_line(&[&receiving(&[0, 1, 2, 3], 4)], LONG);
    // Each worker answers before the test counts (python starts slowly; a datagram sent
    // before it reads would wait in the socket, which is fine, but it would not time out).
    for x in 1..=100u8 {
        eventually(&format!("127.0.0.{x} answered"), LONG, || {
            ask_udp(client(x), addr, Duration::from_millis(500)).is_some()
        });
    }
    let mut per_slot = [0usize; 4];
    for x in 1..=100u8 {
        let slots: Vec<Option<usize>> = (0..10)
            .map(|_| ask_udp(client(x), addr, Duration::from_secs(5)))
            .collect();
        assert!(
            slots.iter().all(|s| *s == slots[0] && s.is_some()),
            "127.0.0.{x}: {slots:?}"
        );
        per_slot[slots[0].unwrap()] += 1;
    }
    assert!(
        per_slot.iter().all(|&n| n <= 37),
        "no slot above 1.5× its share of 25: {per_slot:?}"
    );
}

/// Puts a listening SO_REUSEPORT socket at fd 3 with LISTEN_FDS=1 for the program it execs
/// (what a `.socket` unit with `ReusePort=yes` hands herder).
const REUSEPORT_LAUNCHER: &str = r#"
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", 0)); s.listen()
os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "http"
os.execvp(sys.argv[1], sys.argv[1:])
"#;

#[test]
fn an_inherited_reuseport_socket_is_steered_too() {
    // The .socket unit with ReusePort=yes: the inherited socket is the group's first, herder's
    // siblings join after it. Without a program the kernel would hash each connection by its
    // whole 4-tuple, so a client (a new source port each time) would not stay on one slot.
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", REUSEPORT_LAUNCHER, herder_bin()])
        .args([
            "-w",
            "4",
            "--reuseport",
            "--balance",
            "client-ip",
            "--ready",
            "notify",
            "--",
        ])
        .arg(demo_bin())
        .env_remove("NOTIFY_SOCKET");
    steer_log(&mut cmd);
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    h.wait_line(&[&receiving(&[0, 1, 2, 3], 4)], LONG);
    let mut used = std::collections::BTreeSet::new();
    for x in 1..=40u8 {
        let slots: Vec<Option<usize>> = (0..10).map(|_| ask(client(x), addr, LONG)).collect();
        assert!(
            slots.iter().all(|s| *s == slots[0] && s.is_some()),
            "127.0.0.{x} on one slot: {slots:?}"
        );
        used.insert(slots[0]);
    }
    assert!(
        used.len() >= 3,
        "40 clients spread over the slots: {used:?}"
    );
}
