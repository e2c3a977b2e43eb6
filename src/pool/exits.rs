//! What a worker's end means for its slot: a batch of reaped exits, a failed spawn,
//! `STOPPING=1`, a missed watchdog. The answer is one of: nothing (it was expected), a
//! replacement at once (it served), one after a backoff (a start-up crash loop), a failed
//! reload (it was a replacement), a retry that costs the worker nothing (herder lacked
//! resources), or giving up (one slot restarted more than `--restart-limit` times within
//! `--restart-window`: the code is broken).
//!
//! Why per slot: killing every worker of a healthy pool once (an OOM kill of the cgroup) is
//! one restart per slot, whatever the pool size, and must not look like a crash loop; a
//! command that always fails makes every slot fail at the same pace, so it still gives up
//! within the window.

use std::time::Instant;

use tracing::{debug, error, info, warn};

use super::stop::abort_proc;
use super::{fmt_dur, later, process_mut, Pool};
use super::{Action, Blame, Reaped, State, StopWhy, WorkerId};
use crate::throttle::{backoff, restart_delay, served};

impl Pool {
    /// Every exit one SIGCHLD collected. All pids are forgotten first, so that deciding about
    /// one exit can never signal another process of the same batch.
    pub(super) fn reaped(&mut self, batch: Vec<Reaped>, now: Instant) {
        let mut ours = Vec::with_capacity(batch.len());
        for r in batch {
            match self.pids.remove(&r.pid) {
                Some(id) => {
                    let agent = self.agent.as_mut().and_then(|a| a.procs.get_mut(&id));
                    if let Some(w) = self.workers.get_mut(&id).or(agent) {
                        w.pid = None;
                    }
                    ours.push((id, r));
                }
                None => {
                    let pid = r.pid;
                    debug!(
                        pid,
                        status = %r.status,
                        "reaped pid {pid} (not a worker): {}",
                        r.status.phrase()
                    )
                }
            }
        }
        for (id, r) in ours {
            let Some(w) = self.workers.get(&id) else {
                self.agent_reaped(id, r, now);
                continue;
            };
            let (slot, pid, status) = (w.slot, r.pid, r.status);
            let expected = matches!(
                w.state,
                State::Stopping {
                    why: StopWhy::Drain | StopWhy::Retiring,
                    ..
                }
            );
            let what = status.phrase();
            if expected {
                info!(slot, pid, %status, "worker {slot} (pid {pid}) {what}");
            } else {
                warn!(slot, pid, %status, "worker {slot} (pid {pid}) {what}");
            }
            if r.group_left {
                self.stop_leftovers(&format!("worker {slot}"), pid, now);
            }
            self.gone(id, status.to_string(), now);
        }
    }

    /// Processes a worker started outlived it, still in its process group (they hold the
    /// listening socket): `--stop-signal` now, SIGKILL after `--drain-timeout`.
    pub(super) fn stop_leftovers(&mut self, who: &str, pgid: i32, now: Instant) {
        info!(
            pgid,
            "{who} (pid {pgid}) left processes running in its process group: sending \
             them {}, SIGKILL in {}",
            self.cfg.stop_signal.as_str(),
            fmt_dur(self.cfg.drain_timeout)
        );
        self.out.push(Action::SignalGroup {
            pgid,
            signal: self.cfg.stop_signal,
        });
        self.leftovers
            .insert(pgid, later(now, self.cfg.drain_timeout));
    }

    pub(super) fn spawn_failed(
        &mut self,
        id: WorkerId,
        code: i32,
        reason: String,
        blame: Blame,
        now: Instant,
    ) {
        let Some(w) = self.workers.get(&id) else {
            return self.agent_spawn_failed(id, code, reason, blame, now);
        };
        match blame {
            Blame::Command => {
                let slot = w.slot;
                error!(
                    slot,
                    code, "cannot start worker {slot}: {reason} (exit {code})"
                );
                self.gone(id, format!("failed to start: {reason} (exit {code})"), now);
            }
            Blame::Herder => self.short_of_resources(id, reason, now),
        }
    }

    /// A spawn failed for want of herder's own resources: not the worker's failure. The slot
    /// retries after a backoff of its own; nothing counts toward the give-up.
    fn short_of_resources(&mut self, id: WorkerId, reason: String, now: Instant) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        self.counters.resource_failures += 1;
        let slot = w.slot;
        if let Some(s) = self.slots.get_mut(slot) {
            if s.current == Some(id) {
                s.current = None;
            }
            if s.next == Some(id) {
                s.next = None;
            }
        }
        if !self.phase.serving() {
            self.finish_if_empty(now);
            return;
        }
        let s = &mut self.slots[slot];
        s.resource_failures = s.resource_failures.saturating_add(1);
        let delay = backoff(s.resource_failures);
        s.backoff_until = Some(later(now, delay));
        if self.resource_error.is_none() {
            warn!(
                slot,
                "herder cannot start worker {slot}: {reason} (herder's own resources, not \
                 the worker's fault); retrying in {}",
                fmt_dur(delay)
            );
        } else {
            debug!(slot, "still cannot start worker {slot}: {reason}");
        }
        self.resource_error = Some(reason);
    }

    /// A worker no longer exists: decide what its absence means.
    pub(super) fn gone(&mut self, id: WorkerId, desc: String, now: Instant) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        if let Some(pid) = w.pid {
            self.pids.remove(&pid);
        }
        *self
            .counters
            .exits
            .entry(super::exit_reason(w.state))
            .or_default() += 1;
        let slot = w.slot;
        let (is_current, is_next) = match self.slots.get(slot) {
            Some(s) => (s.current == Some(id), s.next == Some(id)),
            None => (false, false),
        };
        if !self.phase.serving() {
            // Stopping: nothing is replaced; only forget it, so no slot names a gone worker.
            if let Some(s) = self.slots.get_mut(slot) {
                if is_current {
                    s.current = None;
                }
                if is_next {
                    s.next = None;
                }
            }
            self.finish_if_empty(now);
            return;
        }
        if is_next {
            let why = match w.state {
                State::Stopping {
                    why: StopWhy::ReadyTimeout,
                    ..
                } => format!(
                    "slot {slot}: not ready within {}",
                    fmt_dur(self.cfg.ready_timeout)
                ),
                _ => format!("slot {slot}: new worker {desc} before it was ready"),
            };
            self.slots[slot].next = None;
            // (A superseded replacement left `next` before it was killed: it never gets here.)
            self.replacement_failed(slot, why, now);
            return;
        }
        if is_current {
            self.replace_current(slot, w.spawned_at, w.ready_at, desc, now);
        }
        // Otherwise an old generation, a retiring or a removed worker: nothing to replace.
    }

    /// The slot's current worker is gone (or said STOPPING=1 before it served): count a
    /// restart, give up past the limit, else replace it — at once if it served, after the
    /// backoff if not, or by promoting the replacement a reload has already started.
    fn replace_current(
        &mut self,
        slot: usize,
        spawned_at: Instant,
        ready_at: Option<Instant>,
        desc: String,
        now: Instant,
    ) {
        let s = &mut self.slots[slot];
        s.current = None;
        s.last_exit = Some(desc.clone());
        s.restarts = s.restarts.saturating_add(1);
        self.counters.restarts += 1;
        if !s.throttle.allow(now) {
            let why = format!(
                "slot {slot} was restarted {} times within {}, more than --restart-limit {}; \
                 last: {desc}",
                s.throttle.recent(now),
                fmt_dur(s.throttle.window()),
                s.throttle.limit(),
            );
            self.give_up(why, now);
            return;
        }
        let (failures, delay) = restart_delay(s.failures, spawned_at, ready_at, now);
        s.failures = failures;
        if let Some(next) = s.next.take() {
            // A reload's replacement is already starting: it takes over the slot.
            s.current = Some(next);
            info!(
                slot,
                "worker {slot}: its replacement from the reload takes over the slot"
            );
        } else if delay.is_zero() {
            info!(slot, "worker {slot} restarting at once (it had served)");
            self.spawn(slot, now);
        } else {
            s.backoff_until = Some(later(now, delay));
            warn!(
                slot,
                delay_ms = delay.as_millis() as u64,
                "worker {slot} restarting in {} ms (backoff after {failures} failed start{})",
                delay.as_millis(),
                if failures == 1 { "" } else { "s" }
            );
        }
    }

    /// STOPPING=1 from a worker: it is about to exit on its own. After it has served, its
    /// replacement starts now (one per slot: the replacement must itself serve before its own
    /// STOPPING=1 starts another); before, it is a failed start.
    pub(super) fn retiring(&mut self, id: WorkerId, now: Instant) {
        let w = &self.workers[&id];
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        if matches!(w.state, State::Stopping { .. }) || !self.phase.serving() {
            return;
        }
        let Some(s) = self.slots.get(slot) else {
            return;
        };
        if s.next == Some(id) {
            let why = format!("slot {slot}: new worker said STOPPING=1 before it was ready");
            warn!(
                slot,
                pid, "new worker {slot} (pid {pid}) said STOPPING=1 before it was ready"
            );
            self.replacement_failed(slot, why, now);
            return;
        }
        if s.current != Some(id) {
            return;
        }
        let (spawned_at, ready_at) = (w.spawned_at, w.ready_at);
        let drain_until = Some(later(now, self.cfg.drain_timeout));
        if !served(ready_at, now) {
            warn!(
                slot,
                pid,
                "worker {slot} (pid {pid}) said STOPPING=1 before it had served: a failed start"
            );
            if let Some(w) = self.workers.get_mut(&id) {
                w.state = State::Stopping {
                    why: StopWhy::RetiredEarly,
                    kill_at: drain_until,
                };
            }
            let desc = "said STOPPING=1 before it had served".to_string();
            self.replace_current(slot, spawned_at, ready_at, desc, now);
            return;
        }
        info!(
            slot,
            pid,
            "worker {slot} (pid {pid}) is stopping on its own (STOPPING=1): starting its replacement"
        );
        if let Some(w) = self.workers.get_mut(&id) {
            w.state = State::Stopping {
                why: StopWhy::Retiring,
                kill_at: drain_until,
            };
        }
        let s = &mut self.slots[slot];
        s.current = None;
        if let Some(next) = s.next.take() {
            s.current = Some(next);
        } else {
            self.spawn(slot, now);
        }
    }

    /// A missed WATCHDOG=1 or WATCHDOG=trigger, of a worker or the agent: SIGABRT, SIGKILL
    /// after [`ABORT_GRACE`](super::ABORT_GRACE).
    pub(super) fn watchdog_failed(&mut self, id: WorkerId, now: Instant) {
        if let Some(w) = process_mut(&mut self.workers, &mut self.agent, id) {
            self.out.extend(abort_proc(w, now));
        }
    }
}
