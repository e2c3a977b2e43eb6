//! `--balance client-ip` keeps an IPv6 client on its slot by its /64 (privacy addresses change
//! the low half), with the real binary: in a network namespace the test creates, addresses
//! `2001:db8:0:X::1`, `::2` and `::ab:cd:1234` on `lo` for 60 prefixes, each reaching the slot
//! of its /64.
//!
//! Its own file: the test re-executes itself inside `unshare -n` (a fresh network namespace:
//! root is needed to add addresses; `unshare -rn` maps an ordinary user to root in a user
//! namespace). Where no namespace can be made it says so and passes — except under `CI=true`,
//! where it must run.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::process::Command;

use common::*;
use socket2::{Domain, Socket, Type};

/// Set in the re-executed test: it runs inside the namespace.
const INSIDE: &str = "HERDER_TEST_IN_NETNS";
const TEST: &str = "client_ip_keeps_each_ipv6_slash_64_on_one_slot";
const PREFIXES: u16 = 60;

/// The addresses of prefix `x`: the same /64, different low halves.
fn addrs(x: u16) -> [Ipv6Addr; 3] {
    [
        Ipv6Addr::new(0x2001, 0xdb8, 0, x, 0, 0, 0, 1),
        Ipv6Addr::new(0x2001, 0xdb8, 0, x, 0, 0, 0, 2),
        Ipv6Addr::new(0x2001, 0xdb8, 0, x, 0, 0xab, 0xcd, 0x1234),
    ]
}

/// One `GET /` from `src`: the slot that answered.
fn ask6(src: Ipv6Addr, addr: SocketAddr) -> Option<usize> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, None).ok()?;
    s.bind(&SocketAddr::V6(SocketAddrV6::new(src, 0, 0, 0)).into())
        .ok()?;
    s.connect_timeout(&addr.into(), LONG).ok()?;
    let mut s = std::net::TcpStream::from(s);
    s.set_read_timeout(Some(LONG)).ok()?;
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    field(resp.split("\r\n\r\n").nth(1)?, "slot")?.parse().ok()
}

#[test]
fn client_ip_keeps_each_ipv6_slash_64_on_one_slot() {
    if std::env::var_os(INSIDE).is_some() {
        return inside();
    }
    let flags = if root() { "-n" } else { "-rn" };
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args([flags, "--"])
        .arg(&exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return skip(&format!("cannot run unshare: {e}")),
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("unshare failed") || text.contains("unshare: ") {
        return skip(&format!("cannot make a network namespace: {}", text.trim()));
    }
    assert!(out.status.success(), "the test in its namespace:\n{text}");
    assert!(text.contains("1 passed"), "it ran:\n{text}");
}

fn skip(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "under CI=true this test must run: {why}"
    );
    eprintln!("skipped: {why}");
}

/// The test proper, in a network namespace of its own.
fn inside() {
    let mut batch = String::from("link set lo up\n");
    for x in 1..=PREFIXES {
        for a in addrs(x) {
            batch += &format!("addr add {a}/64 dev lo nodad\n");
        }
    }
    let mut ip = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("ip");
    ip.stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(ip.wait().unwrap().success(), "ip -batch");

    let mut cmd = herder_cmd(
        &[
            "-l",
            "[::1]:0",
            "-w",
            "4",
            "--reuseport",
            "--balance",
            "client-ip",
        ],
        &[demo_bin()],
    );
    cmd.env("HERDER_LOG", "info,herder::steer=debug");
    let mut h = Herder::spawn(cmd);
    let addr = h.addr();
    h.wait_line(&["receiving slots [0, 1, 2, 3] of 4"], LONG);
    let mut per_slot = [0usize; 4];
    for x in 1..=PREFIXES {
        let slots: Vec<Option<usize>> = addrs(x)
            .iter()
            .flat_map(|&a| (0..5).map(move |_| a))
            .map(|a| ask6(a, addr))
            .collect();
        assert!(
            slots.iter().all(|s| *s == slots[0] && s.is_some()),
            "2001:db8:0:{x:x}::/64: {slots:?}"
        );
        per_slot[slots[0].unwrap()] += 1;
    }
    eprintln!("/64s per slot: {per_slot:?}");
    // The /64s spread over the slots: no slot above 1.5× its share of 15.
    assert!(per_slot.iter().all(|&n| n <= 22), "per slot: {per_slot:?}");
}
