//! Worker recycling (`--max-memory`, `--max-lifetime`): a worker that grew too big or lived
//! too long is replaced the way a rolling reload replaces it — its replacement starts in the
//! same slot, and only once that one is ready does the old worker drain (`--stop-signal`,
//! SIGKILL at `--drain-timeout`; [`Pool::became_ready`](super) does it, for reloads and
//! recycles alike). One recycle at a time, never while the pool has fewer than `--min-ready`
//! ready workers, never during a reload or a stop. A recycle is not a crash: no restart is
//! counted and no backoff starts. A replacement that fails before it is ready leaves the old
//! worker serving; that slot's recycle is retried after a backoff.
//!
//! Lifetimes are staggered deterministically: slot `i` of `n` comes due only on the grid
//! `start + i·L/(2n) + k·L/2`, at the latest such moment a worker is still at most `L` old.
//! So every worker lives between L/2 and L, and two slots never come due together
//! (gunicorn's `max_requests` recycles several workers at once despite its jitter).
//!
//! Memory is the PSS of the worker's whole process tree, measured by the supervisor when the
//! core asks ([`Action::Measure`], every [`MEASURE_EVERY`]): no timer runs when no limit is set.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{fmt_dur, later, Pool};
use super::{Action, Phase, Recycle, RecycleWhy, State, StopWhy, WorkerId};
use crate::throttle::backoff;

/// How often workers' memory is measured with `--max-memory`.
pub const MEASURE_EVERY: Duration = Duration::from_secs(2);

/// When a worker of `slot` (of `slots`) spawned at `spawned` comes due under `--max-lifetime
/// life`, for a pool started at `start`: the latest moment on the slot's grid (see the module
/// documentation) that is at most `life` after `spawned`. Pure.
pub fn lifetime_due(
    start: Instant,
    life: Duration,
    slot: usize,
    slots: usize,
    spawned: Instant,
) -> Instant {
    let half = life.as_nanos() / 2;
    if half == 0 {
        return later(spawned, life);
    }
    let offset = half * slot as u128 / slots.max(1) as u128;
    // Nanoseconds from the slot's first grid point to the latest moment allowed.
    let limit = spawned.saturating_duration_since(start).as_nanos() + life.as_nanos();
    if limit < offset {
        return later(spawned, life);
    }
    let k = (limit - offset) / half;
    let at = offset + k * half;
    let at = Duration::from_nanos(u64::try_from(at).unwrap_or(u64::MAX));
    later(start, at)
}

/// `512M`, `1.5G`: bytes as an operator reads them (binary units, like `--max-memory`).
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: &[(u64, &str)] = &[(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for &(size, unit) in UNITS {
        if b >= size {
            let v = b as f64 / size as f64;
            return if b % size == 0 {
                format!("{}{unit}", b / size)
            } else {
                format!("{v:.1}{unit}")
            };
        }
    }
    format!("{b}B")
}

impl Pool {
    fn recycling_enabled(&self) -> bool {
        self.cfg.max_memory.is_some() || self.cfg.max_lifetime.is_some()
    }

    /// A slot's current worker, if it is ready and nothing else is replacing it: one a
    /// recycle may take.
    fn recyclable(&self, slot: usize) -> Option<WorkerId> {
        let s = self.slots.get(slot)?;
        let id = s.current?;
        let w = self.workers.get(&id)?;
        let busy = s.next.is_some() || self.recycle.is_some_and(|r| r.slot == slot);
        (w.state == State::Ready && !busy).then_some(id)
    }

    fn queued(&self, slot: usize) -> bool {
        self.recycle_queue.iter().any(|&(s, _, _)| s == slot)
    }

    /// When the slot's current worker comes due for its lifetime (`None`: no limit, or it is
    /// not one a recycle may take, or it is already queued).
    fn slot_lifetime_due(&self, slot: usize) -> Option<Instant> {
        let life = self.cfg.max_lifetime?;
        let id = self.recyclable(slot)?;
        if self.queued(slot) {
            return None;
        }
        let w = &self.workers[&id];
        let due = lifetime_due(self.started_at, life, slot, self.slots.len(), w.spawned_at);
        Some(match self.slots[slot].recycle_after {
            Some(t) => due.max(t),
            None => due,
        })
    }

    /// The next moment recycling has something to do: a measurement or a lifetime.
    pub(super) fn recycle_deadline(&self) -> Option<Instant> {
        if !self.recycling_enabled() || self.phase != Phase::Running {
            return None;
        }
        let lifetimes = (0..self.slots.len()).filter_map(|s| self.slot_lifetime_due(s));
        lifetimes.chain(self.next_measure).min()
    }

    /// What [`Action::Measure`] found.
    pub(super) fn measured(&mut self, batch: Vec<(WorkerId, u64)>, now: Instant) {
        let Some(max) = self.cfg.max_memory else {
            return;
        };
        for (id, bytes) in batch {
            let Some(w) = self.workers.get(&id) else {
                continue;
            };
            let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
            if bytes <= max || self.recyclable(slot) != Some(id) || self.queued(slot) {
                continue;
            }
            if self.slots[slot].recycle_after.is_some_and(|t| t > now) {
                continue;
            }
            warn!(
                slot,
                pid,
                memory = bytes,
                "worker {slot} (pid {pid}) uses {} of memory, more than --max-memory {}: \
                 recycling it",
                fmt_bytes(bytes),
                fmt_bytes(max)
            );
            self.recycle_queue
                .push((slot, id, RecycleWhy::Memory(bytes)));
        }
    }

    /// Run after every event: finish the recycle under way, queue what came due, start the
    /// next one when the pool allows, and ask for a measurement when one is due.
    pub(super) fn advance_recycle(&mut self, now: Instant) {
        if !self.recycling_enabled() {
            return;
        }
        if self.phase != Phase::Running {
            self.recycle = None;
            self.recycle_queue.clear();
            self.next_measure = None;
            return;
        }
        if let Some(r) = self.recycle {
            let s = self.slots.get(r.slot);
            let current = s.and_then(|s| s.current);
            let in_slot = s.is_some_and(|s| s.current == Some(r.new) || s.next == Some(r.new));
            let new_ready = self
                .workers
                .get(&r.new)
                .is_some_and(|w| w.state == State::Ready);
            if !in_slot {
                // Scaled away, or its replacement is gone: that was handled where it happened.
                self.recycle = None;
            } else if current == Some(r.new) && new_ready && !self.workers.contains_key(&r.old) {
                info!(
                    slot = r.slot,
                    "recycle of worker {} done: its replacement serves and the old one has exited",
                    r.slot
                );
                self.slots[r.slot].recycle_failures = 0;
                self.recycle = None;
            }
        }
        for slot in 0..self.slots.len() {
            if self.slot_lifetime_due(slot).is_some_and(|t| now >= t) {
                let id = self.slots[slot].current.unwrap_or_default();
                self.recycle_queue.push((slot, id, RecycleWhy::Lifetime));
            }
        }
        while self.recycle.is_none()
            && !self.reloading
            && self.is_ready()
            && !self.recycle_queue.is_empty()
        {
            let (slot, old, why) = self.recycle_queue.remove(0);
            if self.recyclable(slot) == Some(old) {
                self.start_recycle(slot, old, why, now);
            }
        }
        if self.cfg.max_memory.is_some() {
            let due = self.next_measure.is_none_or(|t| now >= t);
            if due {
                self.next_measure = Some(later(now, MEASURE_EVERY));
                let workers: Vec<(WorkerId, i32)> = (0..self.slots.len())
                    .filter_map(|s| self.recyclable(s))
                    .filter_map(|id| self.workers[&id].pid.map(|pid| (id, pid)))
                    .collect();
                if !workers.is_empty() {
                    self.out.push(Action::Measure(workers));
                }
            }
        }
    }

    fn start_recycle(&mut self, slot: usize, old: WorkerId, why: RecycleWhy, now: Instant) {
        let w = &self.workers[&old];
        let (pid, age) = (
            w.pid.unwrap_or(0),
            now.saturating_duration_since(w.spawned_at),
        );
        let because = match why {
            RecycleWhy::Memory(b) => format!(
                "it uses {}, more than --max-memory {}",
                fmt_bytes(b),
                fmt_bytes(self.cfg.max_memory.unwrap_or(0))
            ),
            RecycleWhy::Lifetime => format!(
                "it is {} old (--max-lifetime {})",
                fmt_dur(Duration::from_millis(age.as_millis() as u64)),
                fmt_dur(self.cfg.max_lifetime.unwrap_or_default())
            ),
        };
        info!(
            slot,
            pid,
            reason = why.name(),
            "recycling worker {slot} (pid {pid}): {because}; its replacement starts first"
        );
        *self.counters.recycles.entry(why.name()).or_default() += 1;
        let new = self.spawn(slot, now);
        self.recycle = Some(Recycle {
            slot,
            old,
            new,
            why,
        });
    }

    /// A replacement that died or said STOPPING=1 before it was ready: a failed recycle when
    /// a recycle started it, else a failed reload.
    pub(super) fn replacement_failed(&mut self, slot: usize, why: String, now: Instant) {
        if self.recycle.is_none_or(|r| r.slot != slot) {
            return self.reload_failed(why);
        }
        self.recycle = None;
        if let Some(next) = self.slots[slot].next.take() {
            self.kill(next, StopWhy::Superseded);
        }
        let s = &mut self.slots[slot];
        s.recycle_failures = s.recycle_failures.saturating_add(1);
        // Slower than a crash loop's backoff: the old worker still serves.
        let delay = (backoff(s.recycle_failures) * 10).min(Duration::from_secs(60));
        s.recycle_after = Some(later(now, delay));
        warn!(
            slot,
            "recycle of worker {slot} failed: {why}; the old worker keeps serving; retrying in {}",
            fmt_dur(delay)
        );
    }

    /// A reload replaces every worker: what recycling had queued or begun is moot.
    pub(super) fn recycle_superseded(&mut self) {
        self.recycle = None;
        self.recycle_queue.clear();
    }
}
