//! What workers and herder itself use, measured from `/proc` when someone asks (`herder
//! status`, `/status`, `/metrics`, and the memory limit's own deadline): memory as the PSS of a
//! worker's whole process tree, CPU as clock ticks of that tree, and herder's own RSS and CPU.
//! It owns reading and parsing those files; it must never run on a timer of its own (herder
//! idle stays at zero wakeups) nor fail because a process went away while it was read.
//!
//! `parse` (pure parsers of `smaps_rollup`, `stat`, `statm`, `children`), `read` (bounded
//! reads of `/proc`), `tree` (a worker's descendants and their sum), `tracker` (the previous
//! sample per pid, for CPU % over an interval).
//!
//! Not the `procfs` crate (0.18, evaluated): it would bring `procfs-core`, `rustix`, `bitflags`
//! and `hex` (plus `chrono` and `flate2` by default) for three numbers from three files, reads
//! each file whole with `read_to_end` (unbounded, where a process shapes its own files),
//! parses every one of `stat`'s 52 fields and `smaps_rollup` into a map per sample, and opens
//! a directory fd per process. The parsers here are 100 lines and property-tested.

mod parse;
mod read;
mod tracker;
mod tree;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

pub use tracker::{HerderUsage, Tracker, WorkerUsage};
pub use tree::{tree_usage, TreeUsage};

/// herder's own usage, from `/proc/self`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnUsage {
    /// Resident set size.
    pub rss_bytes: u64,
    /// User and system CPU time (not its reaped children's: those are the workers').
    pub cpu: Duration,
}

/// herder's own RSS (`/proc/self/statm`) and CPU time (`/proc/self/stat`), as Prometheus'
/// `process_resident_memory_bytes` and `process_cpu_seconds_total` define them.
pub fn own_usage() -> Option<OwnUsage> {
    let pages = read::own_resident_pages().ok()?;
    let stat = read::stat("self").ok()?;
    Some(OwnUsage {
        rss_bytes: pages.saturating_mul(page_size()),
        cpu: tree::ticks(stat.own_ticks()),
    })
}

/// What one round of sampling measured, for `/status`, `herder status` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct PoolUsage {
    /// By worker pid; a worker that could not be measured is absent.
    pub workers: HashMap<u32, WorkerUsage>,
    pub herder: Option<HerderUsage>,
}

impl PoolUsage {
    pub fn of(&self, pid: Option<i32>) -> Option<&WorkerUsage> {
        let pid = u32::try_from(pid?).ok()?;
        self.workers.get(&pid)
    }
}

/// CPU in % of one core over a process's whole life: what `herder status` shows on the first
/// sample of a worker, before there is an interval.
pub fn percent_since_start(cpu_seconds: f64, age: Duration) -> Option<f64> {
    let age = age.as_secs_f64();
    (age > 0.0).then(|| cpu_seconds / age * 100.0)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `stat`'s CPU times (100 on every Linux; asked anyway).
pub fn clock_ticks_per_second() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf(3) has no preconditions.
    *HZ.get_or_init(|| {
        u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).map_or(100, |n| n.max(1))
    })
}

fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    // SAFETY: sysconf(3) has no preconditions.
    *PAGE.get_or_init(|| {
        u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).map_or(4096, |n| n.max(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_plausible() {
        let own = own_usage().unwrap();
        assert!(
            own.rss_bytes > 1 << 20 && own.rss_bytes < 1 << 40,
            "{own:?}"
        );
        assert_eq!(percent_since_start(1.0, Duration::from_secs(4)), Some(25.0));
        assert_eq!(percent_since_start(1.0, Duration::ZERO), None);
    }
}
