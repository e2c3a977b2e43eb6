//! The pool's clock: the next deadline the supervisor sleeps until, and what each passing
//! deadline means (a slot's backoff over, a worker not ready in time, a missed watchdog, a
//! drain that took too long, leftovers to kill, systemd's watchdog to ping).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::{fmt_dur, later, who, Pool, EXIT_CLEAN};
use super::{Action, ManagerMsg, Phase, State, StopWhy, Worker, WorkerId};

impl Pool {
    /// The earliest moment something is due (`None`: nothing; the loop sleeps until an event).
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self
            .workers
            .values()
            .chain(self.agent.iter().flat_map(|a| a.procs.values()))
            .filter_map(|w| self.worker_deadline(w));
        let slots = self.slots.iter().filter_map(|s| s.backoff_until);
        let phase = match self.phase {
            Phase::LameDuck { until } => Some(until),
            _ => None,
        };
        workers
            .chain(slots)
            .chain(phase)
            .chain(self.next_ping)
            .chain(self.leftovers.values().copied())
            .chain(self.recycle_deadline())
            .chain(self.agent_backoff())
            .min()
    }

    pub(super) fn worker_deadline(&self, w: &Worker) -> Option<Instant> {
        let watchdog = self.cfg.worker_watchdog.map(|iv| later(w.last_ping, iv));
        match w.state {
            State::Spawning => None,
            State::Starting { deadline } => Some(watchdog.map_or(deadline, |d| d.min(deadline))),
            State::Ready => watchdog,
            State::Leaving { until } => Some(until),
            State::Stopping { kill_at, .. } => kill_at,
        }
    }

    pub(super) fn tick(&mut self, now: Instant) {
        if let Phase::LameDuck { until } = self.phase {
            if now >= until {
                info!("shutdown delay over: draining the pool");
                self.begin_drain(EXIT_CLEAN, now);
            }
        }
        let mut backoff_over = false;
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            if s.backoff_until.is_some_and(|t| now >= t) {
                s.backoff_until = None;
                backoff_over = true;
                if self.phase.serving() && s.current.is_none() {
                    self.spawn(slot, now);
                }
            }
        }
        if backoff_over && self.reloading {
            self.advance_reload(now);
        }
        let agent = self.agent.iter().flat_map(|a| a.procs.iter());
        let due: Vec<WorkerId> = self
            .workers
            .iter()
            .chain(agent)
            .filter(|(_, w)| self.worker_deadline(w).is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.worker_due(id, now);
        }
        self.agent_tick(now);
        let groups: Vec<i32> = self
            .leftovers
            .iter()
            .filter(|(_, &t)| now >= t)
            .map(|(&g, _)| g)
            .collect();
        for pgid in groups {
            self.leftovers.remove(&pgid);
            warn!(
                pgid,
                "processes the worker with pid {pgid} left in its process group did not stop \
                 in time: killing them"
            );
            self.out.push(Action::SignalGroup {
                pgid,
                signal: Signal::SIGKILL,
            });
        }
        if let (Some(at), Some(iv)) = (self.next_ping, self.cfg.manager_watchdog) {
            if now >= at {
                if self.healthy(now, iv) {
                    self.manager.push(ManagerMsg::Watchdog);
                } else {
                    warn!("no ready worker for longer than the watchdog interval: not pinging systemd");
                }
                self.next_ping = Some(later(now, iv / 2));
            }
        }
    }

    /// A deadline of a worker or of the agent has passed.
    fn worker_due(&mut self, id: WorkerId, now: Instant) {
        let is_agent = !self.workers.contains_key(&id);
        let agent = self.agent.as_ref().and_then(|a| a.procs.get(&id));
        let Some(w) = self.workers.get(&id).or(agent) else {
            return;
        };
        let (slot, pid, who) = (w.slot, w.pid.unwrap_or(0), who(w, is_agent));
        let slot = (!is_agent).then_some(slot);
        let watchdog_due = self
            .cfg
            .worker_watchdog
            .is_some_and(|iv| now >= later(w.last_ping, iv));
        match w.state {
            State::Starting { deadline } if now >= deadline => {
                warn!(
                    slot,
                    pid,
                    "{who} not ready within {}: killing it",
                    fmt_dur(self.cfg.ready_timeout)
                );
                self.kill(id, StopWhy::ReadyTimeout);
            }
            State::Starting { .. } | State::Ready if watchdog_due => {
                warn!(
                    slot,
                    pid,
                    "{who} missed its watchdog ({}): aborting it",
                    fmt_dur(self.cfg.worker_watchdog.unwrap_or_default())
                );
                self.watchdog_failed(id, now);
            }
            State::Leaving { until } if now >= until => self.leave_timed_out(id, now),
            State::Stopping {
                why,
                kill_at: Some(t),
            } if now >= t => {
                warn!(slot, pid, "{who} did not exit in time: killing it");
                if !self.phase.serving() {
                    self.killed_any = true;
                }
                self.kill(id, why);
            }
            _ => {}
        }
    }

    /// Whether herder should keep pinging systemd's watchdog: serving with a ready worker, or
    /// without one for less than the interval.
    fn healthy(&self, now: Instant, interval: Duration) -> bool {
        if !self.phase.serving() || self.ready_count() > 0 {
            return true;
        }
        let since = self
            .last_ready_at
            .unwrap_or_else(|| later(self.started_at, self.cfg.ready_timeout));
        now.saturating_duration_since(since) < interval
    }
}
