//! CPU % needs two samples: the tracker remembers, per worker pid (and for herder itself), the
//! CPU time and the moment of the previous sample, and gives the percentage over the interval
//! since. Owned by the event loop; entries are removed when a worker is reaped ([`forget`]) or
//! no longer in the pool ([`retain`]), so that worker churn does not grow it.
//!
//! [`forget`]: Tracker::forget
//! [`retain`]: Tracker::retain

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{own_usage, tree_usage, TreeUsage};

/// Samples closer together than this do not start a new interval: the percentage of the last
/// full interval is given again. (CPU time moves in clock ticks of 10 ms: a 20 ms interval
/// would read 0 % or 50 %; two clients asking at once would see noise.)
pub const MIN_INTERVAL: Duration = Duration::from_millis(250);

/// One sample of a worker's tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerUsage {
    /// PSS of the worker and its live descendants.
    pub pss_bytes: u64,
    /// CPU time of the tree (see [`TreeUsage::cpu`]).
    pub cpu_seconds_total: f64,
    /// CPU over the interval since this pid's previous sample, in % of one core (a worker
    /// busy on two cores reads 200); `None` on its first sample.
    pub cpu_percent: Option<f64>,
    /// Processes measured.
    pub processes: u32,
}

/// One sample of herder itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HerderUsage {
    /// Resident set size (`/proc/self/statm`), as `process_resident_memory_bytes`.
    pub rss_bytes: u64,
    /// User and system CPU time, as `process_cpu_seconds_total`.
    pub cpu_seconds_total: f64,
    /// As [`WorkerUsage::cpu_percent`].
    pub cpu_percent: Option<f64>,
}

/// Where an interval starts.
#[derive(Debug, Clone, Copy)]
struct Base {
    at: Instant,
    cpu: Duration,
    /// The percentage of the interval that ended here.
    percent: Option<f64>,
}

#[derive(Debug, Default)]
pub struct Tracker {
    /// Worker pid → (its slot, its last interval's start).
    workers: HashMap<u32, (u32, Base)>,
    own: Option<Base>,
}

impl Tracker {
    /// Samples the tree of the worker `pid` in `slot`; `None` (and the pid forgotten) when it
    /// cannot be measured, i.e. it is gone.
    pub fn sample(&mut self, slot: u32, pid: u32, now: Instant) -> Option<WorkerUsage> {
        match tree_usage(pid) {
            Some(t) => Some(self.record(slot, pid, now, t)),
            None => {
                self.forget(pid);
                None
            }
        }
    }

    /// The arithmetic of [`Tracker::sample`] on a measurement already taken.
    pub fn record(&mut self, slot: u32, pid: u32, now: Instant, t: TreeUsage) -> WorkerUsage {
        let mut base = match self.workers.remove(&pid) {
            Some((s, b)) if s == slot => Some(b),
            _ => None, // new, or a reused pid in another slot: a fresh start
        };
        let cpu_percent = advance(&mut base, now, t.cpu);
        if let Some(b) = base {
            self.workers.insert(pid, (slot, b));
        }
        WorkerUsage {
            pss_bytes: t.pss_bytes,
            cpu_seconds_total: t.cpu.as_secs_f64(),
            cpu_percent,
            processes: t.processes,
        }
    }

    /// Samples herder itself.
    pub fn sample_own(&mut self, now: Instant) -> Option<HerderUsage> {
        let own = own_usage()?;
        Some(HerderUsage {
            rss_bytes: own.rss_bytes,
            cpu_seconds_total: own.cpu.as_secs_f64(),
            cpu_percent: advance(&mut self.own, now, own.cpu),
        })
    }

    /// Drops what is remembered of `pid` (reaped).
    pub fn forget(&mut self, pid: u32) {
        self.workers.remove(&pid);
    }

    /// Keeps only the pids for which `keep` holds (the pool's live workers).
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        self.workers.retain(|&pid, _| keep(pid));
    }

    /// How many pids are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.workers.len()
    }
}

/// The percentage since `base`, which then moves to `now`; the previous one while the interval
/// is shorter than [`MIN_INTERVAL`]; `None` when there is no base yet.
fn advance(base: &mut Option<Base>, now: Instant, cpu: Duration) -> Option<f64> {
    let Some(b) = base else {
        *base = Some(Base {
            at: now,
            cpu,
            percent: None,
        });
        return None;
    };
    let wall = now.saturating_duration_since(b.at);
    if wall < MIN_INTERVAL {
        return b.percent;
    }
    // A descendant that exited unwaited takes its CPU time with it: that interval reads from
    // what is left, never below 0.
    let used = cpu.saturating_sub(b.cpu);
    let percent = used.as_secs_f64() / wall.as_secs_f64() * 100.0;
    *b = Base {
        at: now,
        cpu,
        percent: Some(percent),
    };
    Some(percent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(cpu_ms: u64) -> TreeUsage {
        TreeUsage {
            pss_bytes: 10 << 20,
            cpu: Duration::from_millis(cpu_ms),
            processes: 2,
        }
    }

    #[test]
    fn percent_over_the_interval_since_the_previous_sample() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let first = t.record(0, 100, t0, tree(5_000));
        assert_eq!(first.cpu_percent, None, "first sample");
        assert_eq!(first.cpu_seconds_total, 5.0);
        assert_eq!((first.pss_bytes, first.processes), (10 << 20, 2));
        // 500 ms of CPU in 1 s: 50 %.
        assert_eq!(
            t.record(0, 100, s(1000), tree(5_500)).cpu_percent,
            Some(50.0)
        );
        // Too soon after: the same figure, and the interval goes on from 1 s.
        assert_eq!(
            t.record(0, 100, s(1100), tree(5_600)).cpu_percent,
            Some(50.0)
        );
        // Two cores busy from 1 s to 2 s: 200 %.
        assert_eq!(
            t.record(0, 100, s(2000), tree(7_500)).cpu_percent,
            Some(200.0)
        );
        // A helper exited unwaited: CPU time went down; 0 %, not negative.
        assert_eq!(
            t.record(0, 100, s(3000), tree(1_000)).cpu_percent,
            Some(0.0)
        );
        assert_eq!(
            t.record(0, 100, s(4000), tree(1_250)).cpu_percent,
            Some(25.0)
        );
    }

    #[test]
    fn too_soon_after_the_first_is_still_none() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        t.record(0, 7, t0, tree(0));
        let u = t.record(0, 7, t0 + Duration::from_millis(10), tree(10));
        assert_eq!(u.cpu_percent, None);
    }

    #[test]
    fn pids_are_tracked_apart_and_forgotten() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        t.record(0, 100, t0, tree(0));
        t.record(1, 101, t0, tree(0));
        let close = |p: Option<f64>, want: f64| p.is_some_and(|p| (p - want).abs() < 1e-9);
        assert!(close(t.record(0, 100, t1, tree(100)).cpu_percent, 10.0));
        assert!(close(t.record(1, 101, t1, tree(300)).cpu_percent, 30.0));
        // The same pid seen in another slot is another process: a fresh start.
        assert_eq!(t.record(2, 101, t1, tree(300)).cpu_percent, None);
        t.forget(100);
        assert_eq!(t.len(), 1);
        t.record(0, 102, t1, tree(0));
        t.retain(|pid| pid == 102);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.record(1, 101, t1 + Duration::from_secs(1), tree(400))
                .cpu_percent,
            None
        );
    }

    #[test]
    fn a_clock_going_backwards_is_a_short_interval() {
        let mut t = Tracker::default();
        let t1 = Instant::now() + Duration::from_secs(5);
        t.record(0, 1, t1, tree(0));
        assert_eq!(
            t.record(0, 1, t1 - Duration::from_secs(1), tree(50))
                .cpu_percent,
            None
        );
    }

    /// What one round costs for 64 workers: `cargo test --release --bin herder -- --ignored
    /// --nocapture sample_cost` (each a `sleep`: a real server with a large heap costs more,
    /// smaps_rollup walks its page tables).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn sample_cost() {
        let mut kids: Vec<_> = (0..64)
            .map(|_| {
                std::process::Command::new("sleep")
                    .arg("60")
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut t = Tracker::default();
        let rounds = 200;
        let start = Instant::now();
        for _ in 0..rounds {
            let now = Instant::now();
            for (slot, k) in kids.iter().enumerate() {
                t.sample(slot as u32, k.id(), now).unwrap();
            }
            t.sample_own(now).unwrap();
        }
        let per = start.elapsed() / rounds;
        eprintln!(
            "one sample of 64 workers and herder: {} µs",
            per.as_micros()
        );
        for k in &mut kids {
            let _ = k.kill();
            let _ = k.wait();
        }
    }

    #[test]
    fn samples_real_processes() {
        let mut t = Tracker::default();
        let me = std::process::id();
        let now = Instant::now();
        let u = t.sample(0, me, now).expect("this test process");
        assert!(u.pss_bytes > 0 && u.processes >= 1);
        assert!(t.sample_own(now).unwrap().rss_bytes > 0);
        // A pid that does not exist: None, and nothing kept.
        assert_eq!(t.sample(1, u32::MAX - 1, now), None);
        assert_eq!(t.len(), 1);
    }
}
