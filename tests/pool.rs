//! The launcher core, end to end: real herder, real workers, real sockets, real signals.

mod common;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn fd_links(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path())
                .ok()?
                .to_string_lossy()
                .to_string();
            Some((fd, target))
        })
        .collect();
    out.sort();
    out
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap()
        .trim()
        .to_string()
}

fn stat_fields(pid: i32) -> Vec<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s[s.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn workers_share_one_port() {
    let mut h = Herder::start(&["-l", "127.0.0.1:0", "-w", "3"], &[demo_bin()]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let pids = distinct_pids(addr, 3, LONG);
    assert_eq!(pids.len(), 3, "three workers answered: {pids:?}");
    let spawned: BTreeSet<i32> = h.spawned_pids().into_iter().collect();
    assert_eq!(pids, spawned);
}

#[test]
fn reuseport_gives_each_slot_its_own_socket() {
    let mut h = Herder::start(
        &["-l", "127.0.0.1:0", "-w", "3", "--reuseport"],
        &[demo_bin()],
    );
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let pids = distinct_pids(addr, 3, LONG);
    assert_eq!(pids.len(), 3, "three workers answered: {pids:?}");
    let sockets: BTreeSet<String> = pids
        .iter()
        .map(|&p| fd_links(p).into_iter().find(|(fd, _)| *fd == 3).unwrap().1)
        .collect();
    assert_eq!(
        sockets.len(),
        3,
        "each worker's fd 3 is a different socket: {sockets:?}"
    );
}

#[test]
fn a_worker_gets_exactly_the_documented_environment_and_fds() {
    let mut h = Herder::start(
        &["-l", "web=127.0.0.1:0", "-w", "2"],
        &["sh", "-c", "exec sleep 600"],
    );
    h.wait_line(&["pool ready"], LONG);
    let pids = h.spawned_pids();
    assert_eq!(pids.len(), 2);
    for (slot, &pid) in pids.iter().enumerate() {
        // Wait for the shell to exec sleep, and for the dynamic loader to close libc.
        let comm = |pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // The new comm shows a moment before the new environment does (execve sets the name,
        // then builds the stack): wait for both.
        eventually("the worker to exec sleep", LONG, || {
            comm(pid).trim() == "sleep" && !environ(pid).is_empty()
        });
        let nums = |pid| fd_links(pid).iter().map(|f| f.0).collect::<Vec<i32>>();
        eventually(
            "the worker to see fds 0 1 2 3 and nothing else",
            LONG,
            || nums(pid) == [0, 1, 2, 3],
        );
        let fds = fd_links(pid);
        assert_eq!(fds[0].1, "/dev/null", "stdin");
        assert!(
            fds[3].1.starts_with("socket:"),
            "fd 3 is the socket: {fds:?}"
        );
        let env = environ(pid);
        for want in [
            format!("LISTEN_PID={pid}"),
            "LISTEN_FDS=1".into(),
            "LISTEN_FDNAMES=web".into(),
            format!("HERDER_WORKER={slot}"),
        ] {
            assert!(env.contains(&want), "{want} missing from {env:?}");
        }
        // Its own notify socket: a file only its uid can write to, in a directory of herder's.
        let ns = env
            .iter()
            .find_map(|e| e.strip_prefix("NOTIFY_SOCKET="))
            .expect("NOTIFY_SOCKET");
        let ns = std::path::Path::new(ns);
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(ns).expect("a socket file");
        assert!(meta.file_type().is_socket(), "{ns:?}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{ns:?}");
        let dir = std::fs::metadata(ns.parent().unwrap()).unwrap();
        assert_eq!(dir.permissions().mode() & 0o777, 0o700, "{ns:?}");
        assert!(
            !env.iter().any(|e| e.starts_with("WATCHDOG_")),
            "no watchdog unless asked"
        );
        // Its own process group, a clean signal mask, nothing ignored (Rust ignores SIGPIPE).
        assert_eq!(stat_fields(pid)[2], pid.to_string(), "pgrp");
        assert_eq!(status_field(pid, "SigBlk"), "0000000000000000");
        assert_eq!(status_field(pid, "SigIgn"), "0000000000000000");
    }
    // It dies with herder (PDEATHSIG).
    h.signal(libc::SIGKILL);
    h.wait_exit(LONG);
    for pid in pids {
        eventually("worker to die with herder", LONG, || !alive(pid));
    }
}

#[test]
fn listen_pid_is_the_worker_own_pid_under_systemd_socket_activate() {
    if std::process::Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        eprintln!("skipping: systemd-socket-activate is not installed");
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = std::process::Command::new("systemd-socket-activate");
    cmd.args([
        "-l",
        &format!("127.0.0.1:{port}"),
        "--fdname=http",
        herder_bin(),
        "-w",
        "2",
        "--",
        "sh",
        "-c",
        "exec sleep 600",
    ]);
    cmd.env("HERDER_LOG", "info");
    let mut h = Herder::spawn(cmd);
    h.wait_line(&["Listening on"], LONG);
    // systemd-socket-activate waits for the first connection before it starts herder.
    let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    h.wait_line(&["pool ready"], LONG);
    for pid in h.spawned_pids() {
        let comm = |pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // The new comm shows a moment before the new environment does (execve sets the name,
        // then builds the stack): wait for both.
        eventually("the worker to exec sleep", LONG, || {
            comm(pid).trim() == "sleep" && !environ(pid).is_empty()
        });
        let env = environ(pid);
        assert!(env.contains(&format!("LISTEN_PID={pid}")), "{env:?}");
        assert!(env.contains(&"LISTEN_FDS=1".to_string()));
        assert!(env.contains(&"LISTEN_FDNAMES=http".to_string()), "{env:?}");
        eventually("fds 0 1 2 3 only", LONG, || {
            fd_links(pid).iter().map(|f| f.0).collect::<Vec<_>>() == [0, 1, 2, 3]
        });
    }
}

#[test]
fn kill_9_of_a_worker_is_replaced_and_no_connection_is_refused() {
    kill_9_under_load(&[]);
}

#[test]
fn with_reuseport_a_killed_slot_keeps_its_socket_and_no_connection_is_refused() {
    // Connections the kernel hashed to the dead slot's socket wait there for its replacement.
    kill_9_under_load(&["--reuseport"]);
}

fn kill_9_under_load(extra: &[&str]) {
    let mut args = vec!["-l", "127.0.0.1:0", "-w", "2"];
    args.extend_from_slice(extra);
    let mut h = Herder::start(&args, &[demo_bin()]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let herder_fds = fd_links(h.pid()).len();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, clients) = load(addr, stop.clone(), 4);
    for round in 1..=3 {
        let victim = h.spawned_pids().into_iter().find(|&p| alive(p)).unwrap();
        // SAFETY: kill(2) on a worker pid herder reported.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        h.wait_line(
            &[&format!("(pid {victim}) killed by signal 9 (SIGKILL)")],
            LONG,
        );
        h.wait_nth_line(&[READY], 2 + round, LONG);
    }
    let before = ok.load(Ordering::SeqCst);
    eventually("requests keep succeeding", LONG, || {
        ok.load(Ordering::SeqCst) > before + 20
    });
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(refused.load(Ordering::SeqCst), 0, "no connection refused");
    let live: Vec<i32> = h.spawned_pids().into_iter().filter(|&p| alive(p)).collect();
    assert_eq!(live.len(), 2, "the pool is whole again: {live:?}");
    assert_eq!(distinct_pids(addr, 2, LONG).len(), 2);
    assert_eq!(
        fd_links(h.pid()).len(),
        herder_fds,
        "herder leaks no fd across restarts"
    );
    let zombies: Vec<i32> = children_of(h.pid())
        .into_iter()
        .filter(|&p| !alive(p))
        .collect();
    assert!(zombies.is_empty(), "no zombies: {zombies:?}");
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_and_exits_zero() {
    let mut h = Herder::start(&["-l", "127.0.0.1:0", "-w", "1"], &[demo_bin()]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let worker = h.spawned_pids()[0];
    let sockets = |pid: i32| {
        fd_links(pid)
            .iter()
            .filter(|f| f.1.starts_with("socket:"))
            .count()
    };
    let idle = sockets(worker);
    let slow = std::thread::spawn(move || get(addr, "/sleep?ms=1500"));
    eventually("the worker to accept the slow request", LONG, || {
        sockets(worker) > idle
    });
    h.signal(libc::SIGTERM);
    let body = slow
        .join()
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(pid_of(&body), worker);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_worker_that_ignores_sigterm_is_killed_at_the_drain_timeout() {
    let mut h = Herder::start(
        &["-w", "1", "--drain-timeout", "1s"],
        &["sh", "-c", "trap '' TERM; echo trapped; exec sleep 600"],
    );
    h.wait_line(&["trapped"], LONG);
    h.wait_line(&["pool ready"], LONG);
    let start = std::time::Instant::now();
    h.signal(libc::SIGTERM);
    let status = h.wait_exit(LONG);
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "waited for the drain timeout"
    );
    assert_eq!(status.code(), Some(3), "3: workers had to be killed");
    assert_eq!(h.count(&["did not exit in time"]), 1);
}

#[test]
fn a_second_sigterm_stops_at_once() {
    let mut h = Herder::start(
        &["-w", "1", "--drain-timeout", "60s"],
        &["sh", "-c", "trap '' TERM; echo trapped; exec sleep 600"],
    );
    h.wait_line(&["trapped"], LONG);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGTERM);
    h.wait_line(&["draining the pool"], LONG);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(3));
}

#[test]
fn a_worker_that_always_fails_makes_herder_give_up_with_backoff() {
    let mut h = Herder::start(
        &["-w", "1", "--restart-limit", "3"],
        &["sh", "-c", "exit 7"],
    );
    let status = h.wait_exit(LONG);
    assert_eq!(status.code(), Some(1));
    for ms in [100, 200, 400] {
        assert_eq!(
            h.count(&[&format!("restarting in {ms} ms")]),
            1,
            "backoff of {ms} ms in the log"
        );
    }
    assert_eq!(
        h.count(&[") exited with status 7"]),
        4,
        "1 start + 3 restarts"
    );
    assert_eq!(
        h.count(&[
            "giving up: slot 0 was restarted 4 times within 60s, more than --restart-limit 3"
        ]),
        1
    );
}

#[test]
fn a_command_that_cannot_be_executed_is_reported_and_never_spins() {
    let mut h = Herder::start(
        &["-w", "2", "--restart-limit", "4"],
        &["/nonexistent/herder-test-command"],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1));
    let failures = h.count(&[
        "cannot start worker",
        "No such file or directory",
        "(exit 127)",
    ]);
    // Limit 4 per slot: a slot's 5th restart gives up; the other slot, failing at the same
    // pace, has made 4 or 5 attempts by then. Never more.
    assert!((9..=10).contains(&failures), "{failures} attempts");
    assert_eq!(h.count(&["restarting in 100 ms"]), 2, "backoff, not a spin");

    let dir = TempDir::new("noexec");
    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let mut h = Herder::start(
        &["-w", "1", "--restart-limit", "0"],
        &[script.to_str().unwrap()],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1));
    assert_eq!(
        h.count(&["cannot start worker", "Permission denied", "(exit 126)"]),
        1
    );
}

#[test]
fn ttin_and_ttou_scale_the_pool_but_never_below_one() {
    let mut h = Herder::start(&["-w", "1"], &["sh", "-c", "exec sleep 600"]);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGTTIN);
    h.wait_line(&["worker 1 (pid", READY], LONG);
    h.signal(libc::SIGTTOU);
    h.wait_line(&["scaling down", "slot=1"], LONG);
    h.wait_worker_exit(&["worker 1 (pid"], LONG);
    h.signal(libc::SIGTTOU);
    h.signal(libc::SIGTTIN);
    h.wait_nth_line(&["worker 1 (pid", READY], 2, LONG);
    assert_eq!(
        h.count(&["scaling down", "slot=0"]),
        0,
        "never below one worker"
    );
}

#[test]
fn usr1_is_forwarded_to_every_worker() {
    let script = "trap 'echo got USR1 in $HERDER_WORKER' USR1; echo armed $HERDER_WORKER; while :; do sleep 1 & wait $!; done";
    let mut h = Herder::start(&["-w", "2"], &["sh", "-c", script]);
    h.wait_line(&["armed 0"], LONG);
    h.wait_line(&["armed 1"], LONG);
    h.signal(libc::SIGUSR1);
    h.wait_line(&["got USR1 in 0"], LONG);
    h.wait_line(&["got USR1 in 1"], LONG);
}

#[test]
fn orphans_of_workers_are_reaped_by_the_subreaper() {
    // Each worker leaves a short-lived orphan behind: reparented to herder, it must be reaped.
    let script = "(sleep 0.3 & echo orphan $!); exec sleep 600";
    let mut h = Herder::start(&["-w", "2"], &["sh", "-c", script]);
    let orphans: Vec<i32> = (1..=2)
        .map(|n| {
            field(
                &h.wait_nth_line(&["orphan"], n, LONG)
                    .replace("orphan ", "orphan="),
                "orphan",
            )
            .unwrap()
            .parse()
            .unwrap()
        })
        .collect();
    for pid in orphans {
        eventually("the orphan to be reaped (gone, not a zombie)", LONG, || {
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
        });
    }
}
