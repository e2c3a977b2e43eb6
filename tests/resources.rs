//! herder's own resources are herder's problem: its fd limit is raised (workers get theirs
//! back), a spawn that fails for want of fds is retried and never counted against the worker
//! command, a dead worker's leftovers are stopped, and a fork never runs with signals open.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// (soft, hard) "Max open files" from /proc/PID/limits.
fn nofile(pid: i32) -> (String, String) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

fn prlimit(nofile: &str, args: &[&str], command: &[&str]) -> Command {
    let mut c = Command::new("prlimit");
    c.arg(format!("--nofile={nofile}"))
        .arg(herder_bin())
        .args(args)
        .arg("--")
        .args(command)
        .env("HERDER_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    c
}

fn status(sock: &Path) -> serde_json::Value {
    let out = Command::new(herder_bin())
        .args(["status", "--json", "--control"])
        .arg(sock)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn scale(sock: &Path, n: &str) {
    let out = Command::new(herder_bin())
        .args(["scale", n, "--control"])
        .arg(sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn herder_raises_its_fd_limit_and_workers_get_the_original() {
    // (The previous herder kept the soft limit it was given.)
    let mut h = Herder::spawn(prlimit("256:4096", &["-w", "1"], &["sleep", "600"]));
    let pid: i32 = field(&h.wait_line(&[SPAWNED], LONG), "pid")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(nofile(h.pid()), ("4096".into(), "4096".into()), "herder");
    eventually("the worker to exec sleep", LONG, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    assert_eq!(nofile(pid), ("256".into(), "4096".into()), "the worker");
}

#[test]
fn out_of_fds_herder_keeps_running_retries_and_blames_itself() {
    // Under a hard limit of 48 fds, 45 workers cannot all start: the ones that cannot are
    // herder's failure, retried with backoff, shown in /status, and never a restart. The
    // previous herder counted them against the worker command and gave up, exit 1.
    let dir = TempDir::new("emfile");
    let sock = dir.path().join("herder.sock");
    let mut h = Herder::spawn(prlimit(
        "48:48",
        &["-w", "1", "--control", sock.to_str().unwrap()],
        &["sleep", "600"],
    ));
    h.wait_line(&["pool ready"], LONG);
    scale(&sock, "45");
    h.wait_line(
        &["herder cannot start worker ", "herder's own resources"],
        LONG,
    );
    let mut doc = serde_json::Value::Null;
    eventually("/status to name herder's shortage", LONG, || {
        doc = status(&sock);
        doc["herder"]["resource_error"]
            .as_str()
            .is_some_and(|e| e.contains("Too many open files"))
    });
    assert_eq!(doc["herder"]["restarts_total"], 0, "{doc:#}");
    let running = doc["herder"]["ready_workers"].as_u64().unwrap();
    assert!((10..45).contains(&running), "{running} workers fit");
    // It keeps trying (a retry is logged at debug; the slots stay in backoff), and lives.
    eventually("a few retry rounds", LONG, || {
        doc = status(&sock);
        doc["slots"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["state"] == "backoff"))
    });
    assert_eq!(h.count(&["giving up"]), 0);
    // Fewer workers: the shortage ends and the status line is clean again.
    scale(&sock, "4");
    eventually("4 ready workers and no shortage", LONG, || {
        doc = status(&sock);
        doc["herder"]["ready_workers"] == 4 && doc["herder"]["resource_error"].is_null()
    });
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_dead_workers_leftovers_are_stopped_then_killed() {
    // Each worker starts a child that outlives it (one that takes TERM, one that ignores it)
    // and exits. The previous herder left them running, holding the socket, until it exited.
    let script = "sleep 1000 & echo leftover $!; (trap '' TERM; exec sleep 1001) & \
                  echo stubborn $!; sleep 0.3; exit 1";
    let mut h = Herder::start(
        &["-l", "127.0.0.1:0", "-w", "1", "--drain-timeout", "2s"],
        &["sh", "-c", script],
    );
    let pid_after = |h: &mut Herder, tag: &str| -> i32 {
        let line = h.wait_line(&[tag], LONG);
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    let leftover = pid_after(&mut h, "leftover");
    let stubborn = pid_after(&mut h, "stubborn");
    h.wait_worker_exit(&[], LONG);
    eventually("the leftover to take --stop-signal", LONG, || {
        !alive(leftover)
    });
    h.wait_line(&["left processes running in its process group"], LONG);
    assert!(
        alive(stubborn),
        "it ignores TERM: only SIGKILL, at --drain-timeout"
    );
    h.wait_line(&["did not stop in time: killing them"], LONG);
    eventually("the stubborn one to be killed", LONG, || !alive(stubborn));
    h.signal(libc::SIGTERM);
    h.wait_exit(LONG);
}

#[test]
fn every_fork_runs_with_all_signals_blocked() {
    // strace shows each clone bracketed by blocking every signal and restoring the mask, so a
    // signal meant for the child can never run herder's handler in it. (The previous herder
    // forked with its mask open.)
    if Command::new("strace").arg("-V").output().is_err() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("strace is missing (.ci/run installs it)");
        }
        eprintln!("skipping: strace not installed");
        return;
    }
    let dir = TempDir::new("forkmask");
    let trace = dir.path().join("trace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-qq",
        "-e",
        "trace=rt_sigprocmask,clone,clone3,fork,vfork",
        "-o",
    ])
    .arg(&trace)
    .arg(herder_bin())
    .args(["-w", "3", "--", "sleep", "600"])
    .env("HERDER_LOG", "info");
    let mut h = Herder::spawn(cmd);
    /// Stops the traced herder however the test ends (strace detaches when it is killed, and
    /// would leave herder running).
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the herder this test started (strace's child).
            unsafe { libc::kill(self.0, libc::SIGTERM) };
        }
    }
    // strace's first child may be a probe of its own (it forks one to test ptrace features):
    // herder is the child that runs herder, once the pool is ready.
    h.wait_line(&["pool ready"], LONG);
    let mut pid = 0;
    eventually("strace's child herder", LONG, || {
        pid = children_of(h.pid())
            .into_iter()
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "herder")
            })
            .unwrap_or(0);
        pid != 0
    });
    let herder = Stop(pid);
    drop(herder); // TERM now: the trace is complete once herder has exited
    h.wait_exit(LONG);
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let forks: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            (l.starts_with("clone(") || l.starts_with("clone3(") || l.starts_with("fork("))
                && !l.contains("CLONE_THREAD")
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(forks.len(), 3, "three workers forked:\n{text}");
    for i in forks {
        let before = lines[..i]
            .iter()
            .rev()
            .find(|l| l.starts_with("rt_sigprocmask"))
            .unwrap_or(&"");
        assert!(
            before.contains("SIG_BLOCK") && before.contains("~[") && !before.contains("~[]"),
            "before fork: {before}\n{text}"
        );
        let after = lines[i + 1..]
            .iter()
            .find(|l| l.starts_with("rt_sigprocmask"))
            .unwrap_or(&"");
        assert!(after.contains("SIG_SETMASK"), "after fork: {after}\n{text}");
    }
}
