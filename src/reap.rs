//! The only `waitpid(-1)` in herder. Called on every SIGCHLD, it collects every exited child —
//! workers and orphans reparented to herder (as PID 1 or child subreaper) — until none is
//! left, because signals coalesce: one SIGCHLD may stand for many exits.
//!
//! Nothing else may wait for a child (no `tokio::process`, no `Child::wait`): a second waiter
//! races this one and gets ECHILD.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::pool::ExitStatus;

/// Every child that has exited since the last call, without blocking.
pub fn reap_all() -> Vec<(i32, ExitStatus)> {
    let mut out = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), ExitStatus::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _core)) => {
                out.push((pid.as_raw(), ExitStatus::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) => break,
            Ok(_) => continue, // stopped/continued: not requested, not an exit
            Err(Errno::EINTR) => continue,
            Err(_) => break, // ECHILD: no children at all
        }
    }
    out
}
