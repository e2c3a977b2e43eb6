//! The loop's side of resource usage: sampling every worker of the pool (and herder itself)
//! when a status or metrics request asks, never on a timer. The [`Tracker`] lives here, in the
//! loop's state, so that CPU % spans the interval between two requests and so that the
//! memory limit can sample through the same one.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::pool::Pool;
use crate::usage::{PoolUsage, Tracker};

/// Requests closer together than this share one sample: a client hammering `/status` or
/// `/metrics` costs at most four rounds of `/proc` reads a second.
pub const REUSE: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
pub struct Meter {
    pub tracker: Tracker,
    last: Option<(Instant, PoolUsage)>,
}

impl Meter {
    /// Usage for a status or metrics answer: a fresh sample, or the last one if it is younger
    /// than [`REUSE`].
    pub fn report(&mut self, pool: &Pool, now: Instant) -> &PoolUsage {
        let last = match self.last.take() {
            Some((at, u)) if now.saturating_duration_since(at) < REUSE => (at, u),
            _ => (now, sample(&mut self.tracker, pool, now)),
        };
        &self.last.insert(last).1
    }
}

/// Samples every live worker of `pool` (every generation, every state) and herder itself,
/// and forgets the pids that are no longer in the pool.
pub fn sample(tracker: &mut Tracker, pool: &Pool, now: Instant) -> PoolUsage {
    let mut usage = PoolUsage {
        herder: tracker.sample_own(now),
        ..PoolUsage::default()
    };
    // The agent's processes count under no slot (u32::MAX).
    let agent = pool.agent.iter().flat_map(|a| a.procs.values());
    let live: Vec<(u32, u32)> = pool
        .workers
        .values()
        .map(|w| (w, u32::try_from(w.slot).unwrap_or(u32::MAX)))
        .chain(agent.map(|w| (w, u32::MAX)))
        .filter_map(|(w, slot)| Some((slot, u32::try_from(w.pid?).ok()?)))
        .collect();
    for &(slot, pid) in &live {
        if let Some(u) = tracker.sample(slot, pid, now) {
            usage.workers.insert(pid, u);
        }
    }
    let live: HashSet<u32> = live.into_iter().map(|(_, pid)| pid).collect();
    tracker.retain(|pid| live.contains(&pid));
    usage
}
