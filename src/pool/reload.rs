//! The rolling reload (HUP, `herder reload`): slot by slot, `--reload-surge` at a time, a new
//! generation's worker starts beside the old one; once it is ready the old one drains. A new
//! worker that fails before it is ready abandons the reload and the old generation keeps
//! serving; a newer reload starts over with the newest generation. With `--agent-reload` the
//! agent is replaced last, and the reload ends when the new agent is ready (src/pool/agent.rs).

use std::time::Instant;

use tracing::{error, info};

use super::{ManagerMsg, Phase, Pool, ReloadOutcome, StopWhy};

impl Pool {
    pub(super) fn reload(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            info!("reload requested while stopping: ignored");
            return;
        }
        self.generation += 1;
        info!(
            generation = self.generation,
            "reload requested: rolling the pool to generation {}", self.generation
        );
        if self.announced_ready && !self.reloading {
            self.manager.push(ManagerMsg::Reloading);
        }
        self.reloading = true;
        self.recycle_superseded();
        self.supersede_agent_reload();
        // A reload already under way starts over with the newest generation: its
        // not-yet-ready workers are pointless now.
        for slot in 0..self.slots.len() {
            if let Some(next) = self.slots[slot].next.take() {
                self.kill(next, StopWhy::Superseded);
            }
        }
        self.advance_reload(now);
    }

    /// Whether a slot still serves an older generation than the newest.
    fn stale(&self, slot: usize) -> bool {
        self.slots[slot]
            .current
            .and_then(|id| self.workers.get(&id))
            .is_some_and(|w| w.generation < self.generation)
    }

    /// Starts replacements up to `--reload-surge` (not in a slot that waits out a backoff);
    /// finishes the reload when none is left.
    pub(super) fn advance_reload(&mut self, now: Instant) {
        let in_flight = self.slots.iter().filter(|s| s.next.is_some()).count();
        let mut budget = self.cfg.reload_surge.saturating_sub(in_flight);
        for slot in 0..self.slots.len() {
            if budget == 0 {
                break;
            }
            let s = &self.slots[slot];
            let waiting = s.backoff_until.is_some_and(|t| t > now);
            if s.next.is_none() && !waiting && self.stale(slot) {
                self.spawn(slot, now);
                budget -= 1;
            }
        }
        let pending = (0..self.slots.len()).any(|i| self.slots[i].next.is_some() || self.stale(i));
        // The pool has rolled: with --agent-reload, the agent's turn comes before the end.
        if !pending && !self.agent_reload_pending(now) {
            self.reloading = false;
            self.last_reload = Some(ReloadOutcome::Succeeded {
                generation: self.generation,
            });
            self.counters.reloads_succeeded += 1;
            info!(
                generation = self.generation,
                "reload complete: generation {} serving, {}/{} workers ready",
                self.generation,
                self.ready_count(),
                self.slots.len()
            );
            if self.is_ready() || self.announced_ready {
                self.announced_ready = true;
                self.manager.push(ManagerMsg::Ready);
            }
        }
    }

    pub(super) fn reload_failed(&mut self, why: String) {
        error!("reload failed: {why}; the previous generation keeps serving");
        self.reloading = false;
        for slot in 0..self.slots.len() {
            if let Some(next) = self.slots[slot].next.take() {
                self.kill(next, StopWhy::Superseded);
            }
        }
        self.last_reload = Some(ReloadOutcome::Failed {
            generation: self.generation,
            why,
        });
        self.counters.reloads_failed += 1;
        if self.announced_ready {
            self.manager.push(ManagerMsg::Ready);
        }
    }
}
