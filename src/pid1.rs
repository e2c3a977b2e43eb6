//! Being a good parent: as PID 1 (a container), or else as a child subreaper (prctl(2)
//! PR_SET_CHILD_SUBREAPER), orphans of the workers are reparented to herder, and the reaper
//! collects them. At exit, [`sweep`] kills and reaps whatever is still left, so nothing keeps
//! running after herder: reparented leftovers of workers and, as PID 1, every process in the
//! namespace.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

use crate::reap::reap_all;

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

/// As PID 1 the kernel reparents orphans to us anyway; otherwise ask for it.
pub fn become_subreaper() {
    if is_pid1() {
        info!("running as PID 1: reaping every orphan in this pid namespace");
        return;
    }
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        warn!("cannot become a child subreaper ({e}): orphans of workers will not be reaped by herder");
    }
}

/// Our direct children, from /proc/self/task/*/children (proc(5)).
fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// Kills and reaps everything herder still has below it: leftovers of workers were reparented
/// to herder, so they are its children now.
pub fn sweep() {
    if is_pid1() {
        // kill(2): -1 means every process we may signal, except ourselves.
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        reap_all();
        let left = children();
        if left.is_empty() || Instant::now() >= deadline {
            if !left.is_empty() {
                warn!(?left, "processes still present at exit: pids {left:?}");
            }
            return;
        }
        debug!(?left, "killing leftover processes: pids {left:?}");
        for pid in &left {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        // Waiting for the kills to land: reap again shortly (bounded by the deadline above).
        std::thread::sleep(Duration::from_millis(10));
    }
}
