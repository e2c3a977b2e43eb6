//! herder as PID 1 of a fresh pid namespace (`unshare --pid --fork --mount-proc`), as in a
//! container: orphans reparented to it are reaped. The negative control runs the same orphans
//! under a PID 1 that does not reap (`sleep`), and the same check must see the zombies — so
//! the check can fail.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Each worker leaves three orphans that live three seconds; then it sleeps.
const ORPHANS: &str = "for i in 1 2 3; do (sleep 3 &); done; echo orphans-made; exec sleep 600";

fn unshare_available() -> bool {
    if !root() {
        eprintln!("skipping: unshare --pid needs root");
        return false;
    }
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipping: unshare --pid --fork --mount-proc does not work here");
    }
    ok
}

fn unshare(cmd: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--kill-child", "--mount-proc"])
        .args(cmd);
    c.env("HERDER_LOG", "info");
    c
}

fn zombies(children: &[i32]) -> usize {
    children
        .iter()
        .filter(|&&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        })
        .count()
}

/// The namespace's PID 1, seen from outside: the only child of `unshare`.
fn pid1_of(unshare_pid: i32) -> i32 {
    let mut found = 0;
    eventually("unshare to fork PID 1", LONG, || {
        found = children_of(unshare_pid).first().copied().unwrap_or(0);
        found != 0
    });
    found
}

#[test]
fn as_pid1_herder_reaps_orphans() {
    if !unshare_available() {
        return;
    }
    let mut h = Herder::spawn(unshare(&[
        herder_bin(),
        "-w",
        "1",
        "--",
        "sh",
        "-c",
        ORPHANS,
    ]));
    h.wait_line(&["running as PID 1"], LONG);
    h.wait_line(&["orphans-made"], LONG);
    let pid1 = pid1_of(h.pid());
    // The orphans were reparented to herder (PID 1 of the namespace)...
    assert!(
        children_of(pid1).len() > 1,
        "orphans are herder's children now: {:?}",
        children_of(pid1)
    );
    // ...and once they exit, herder reaps them: only the worker is left, and no zombie.
    eventually("only the worker to be left, no zombie", LONG, || {
        let c = children_of(pid1);
        c.len() == 1 && zombies(&c) == 0
    });
    // TERM drains; the namespace's exit status is herder's. (unshare itself ignores TERM.)
    // SAFETY: kill(2) on herder's pid as seen from here.
    unsafe { libc::kill(pid1, libc::SIGTERM) };
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn negative_control_a_pid1_that_does_not_reap_leaves_zombies() {
    if !unshare_available() {
        return;
    }
    let mut h = Herder::spawn(unshare(&["sh", "-c", ORPHANS]));
    h.wait_line(&["orphans-made"], LONG);
    let pid1 = pid1_of(h.pid());
    // The same check as above sees the zombies this time.
    eventually("three zombies under a non-reaping PID 1", LONG, || {
        zombies(&children_of(pid1)) == 3
    });
}

#[test]
fn as_pid1_nothing_is_left_running_when_herder_exits() {
    if !unshare_available() {
        return;
    }
    // The worker starts a daemon that escapes its process group and ignores TERM.
    let script = "setsid sh -c 'trap \"\" TERM; exec sleep 600' & echo daemon $!; exec sleep 600";
    let mut h = Herder::spawn(unshare(&[
        herder_bin(),
        "-w",
        "1",
        "--drain-timeout",
        "2s",
        "--",
        "sh",
        "-c",
        script,
    ]));
    h.wait_line(&["daemon"], LONG);
    let pid1 = pid1_of(h.pid());
    h.wait_line(&["pool ready"], LONG);
    let all_before = descendants(pid1);
    assert!(all_before.len() >= 2, "{all_before:?}");
    // SAFETY: kill(2) on herder's pid as seen from here.
    unsafe { libc::kill(pid1, libc::SIGTERM) };
    h.wait_exit(LONG);
    for p in all_before {
        eventually(
            "every process of the namespace to be gone",
            Duration::from_secs(10),
            || !alive(p),
        );
    }
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}
