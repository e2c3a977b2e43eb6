//! Storms that must not take herder down, and the give-up that must still come when the code
//! is broken: every worker killed at once (an OOM kill of the cgroup), a worker that says
//! STOPPING=1 the moment it starts, a command that always fails in a large pool, and anyone
//! requesting the demo's crash route.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn killing_every_worker_of_a_healthy_pool_of_16_once_does_not_give_up() {
    // The previous herder counted restarts across the pool: 16 > --restart-limit 10, give up.
    let mut h = Herder::start(&["-l", "127.0.0.1:0", "-w", "16"], &[demo_bin()]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let first = h.spawned_pids();
    assert_eq!(first.len(), 16);
    // Served a while (a second is enough): these are healthy workers, not a crash loop.
    let ready_at = Instant::now();
    eventually("the pool to have served a second", LONG, || {
        get(addr, "/").is_ok() && ready_at.elapsed() >= Duration::from_millis(1100)
    });
    for &pid in &first {
        // SAFETY: kill(2) on a worker of the herder this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    h.wait_nth_line(&[READY], 32, LONG);
    assert_eq!(
        h.count(&["restarting at once"]),
        16,
        "each replaced with no delay"
    );
    assert_eq!(h.count(&["giving up"]), 0);
    assert!(get(addr, "/").is_ok(), "serving");
    assert!(distinct_pids(addr, 2, LONG).len() >= 2);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_command_that_always_fails_in_a_pool_of_16_still_gives_up_within_the_window() {
    let started = Instant::now();
    let mut h = Herder::start(
        &[
            "-w",
            "16",
            "--restart-limit",
            "3",
            "--restart-window",
            "60s",
        ],
        &["sh", "-c", "exit 7"],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(h.count(&["giving up: slot"]), 1);
}

#[test]
fn a_worker_that_says_stopping_as_it_starts_is_a_failed_start_not_a_fork_storm() {
    if std::process::Command::new("systemd-notify")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: systemd-notify is not installed");
        return;
    }
    // The previous herder started a replacement at once for every STOPPING=1, unbounded: 160
    // live workers in 1.5 s with -w 1, and 0 restarts counted.
    let mut h = Herder::start(
        &["-w", "1", "--restart-limit", "3", "--drain-timeout", "2s"],
        &["sh", "-c", "systemd-notify STOPPING=1; exec sleep 30"],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1), "a failed start, 4 times");
    assert_eq!(h.count(&[SPAWNED]), 4, "1 start and 3 restarts");
    assert_eq!(h.count(&["before it had served: a failed start"]), 4);
    for ms in [100, 200, 400] {
        assert_eq!(h.count(&[&format!("restarting in {ms} ms")]), 1);
    }
}

#[test]
fn the_demo_serves_no_crash_route_unless_asked() {
    // The shipped image runs herder-demo on a public port: the previous one had GET /crash,
    // and 11 requests from anyone within a minute made herder give up.
    let mut h = Herder::start(&["-l", "127.0.0.1:0", "-w", "1"], &[demo_bin()]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let pid = h.spawned_pids()[0];
    for _ in 0..12 {
        assert!(get(addr, "/crash").is_err(), "404, not a crash");
    }
    assert!(alive(pid));
    assert_eq!(h.worker_exits(), 0);
    // With --crash-route (tests only) it is there.
    let mut h = Herder::start(
        &["-l", "127.0.0.1:0", "-w", "1", "--restart-limit", "5"],
        &[demo_bin(), "--crash-route"],
    );
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    let _ = get(addr, "/crash");
    h.wait_line(&["worker 0 (pid", ") exited with status 3"], LONG);
}
