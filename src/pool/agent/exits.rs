//! What the agent's end means: restart it (at once after it served, else after the backoff),
//! give up (`--agent-required`, past the limit), fail a reload waiting for a new agent, or —
//! stopping — nothing; and its deadlines (ready timeout, watchdog, SIGKILL, backoff).

use std::time::Instant;

use tracing::{error, info, warn};

use super::super::{fmt_dur, later, Pool};
use super::super::{Blame, Reaped, State, StopWhy, WorkerId};
use crate::throttle::{backoff, restart_delay};

impl Pool {
    /// When the agent's backoff ends (its processes' deadlines are the pool's, like a worker's).
    pub(in crate::pool) fn agent_backoff(&self) -> Option<Instant> {
        self.agent.as_ref()?.slot.backoff_until
    }

    /// The end of the agent's backoff: it starts again.
    pub(in crate::pool) fn agent_tick(&mut self, now: Instant) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        if agent.slot.backoff_until.is_some_and(|t| now >= t) {
            agent.slot.backoff_until = None;
            if self.phase.serving() && agent.slot.current.is_none() {
                self.spawn_agent(now);
            }
        }
    }

    /// An agent process was reaped (its pid is already forgotten).
    pub(in crate::pool) fn agent_reaped(&mut self, id: WorkerId, r: Reaped, now: Instant) {
        let Some(w) = self.agent.as_ref().and_then(|a| a.procs.get(&id)) else {
            return;
        };
        let expected = matches!(
            w.state,
            State::Stopping {
                why: StopWhy::Drain | StopWhy::Retiring,
                ..
            }
        );
        let (pid, status) = (r.pid, r.status);
        let what = status.phrase();
        if expected {
            info!(pid, %status, role = "agent", "agent (pid {pid}) {what}");
        } else {
            warn!(pid, %status, role = "agent", "agent (pid {pid}) {what}");
        }
        if r.group_left {
            self.stop_leftovers("the agent", pid, now);
        }
        self.agent_gone(id, status.to_string(), now);
    }

    pub(in crate::pool) fn agent_spawn_failed(
        &mut self,
        id: WorkerId,
        code: i32,
        reason: String,
        blame: Blame,
        now: Instant,
    ) {
        if !self.is_agent(id) {
            return;
        }
        match blame {
            Blame::Command => {
                error!(code, "cannot start the agent: {reason} (exit {code})");
                self.agent_gone(id, format!("failed to start: {reason} (exit {code})"), now);
            }
            Blame::Herder => {
                let Some(agent) = self.agent.as_mut() else {
                    return;
                };
                agent.procs.remove(&id);
                if agent.slot.current == Some(id) {
                    agent.slot.current = None;
                }
                let was_next = agent.slot.next == Some(id);
                if was_next {
                    agent.slot.next = None;
                }
                self.counters.resource_failures += 1;
                if !self.phase.serving() {
                    return self.finish_if_empty(now);
                }
                if was_next {
                    // The agent serving goes on; a reload waiting for this one has failed.
                    let why = format!("herder could not start the new agent: {reason}");
                    if !self.reloading {
                        warn!("agent replacement failed: {why}");
                        return;
                    }
                    return self.reload_failed(why);
                }
                agent.slot.resource_failures = agent.slot.resource_failures.saturating_add(1);
                let delay = backoff(agent.slot.resource_failures);
                agent.slot.backoff_until = Some(later(now, delay));
                agent.slot.last_exit = Some(format!("herder could not start it: {reason}"));
                warn!(
                    "herder cannot start the agent: {reason} (herder's own resources, not the \
                     agent's fault); retrying in {}",
                    fmt_dur(delay)
                );
            }
        }
    }

    /// An agent process no longer exists: restart it (at once if it had served, after the
    /// backoff if not), give up (`--agent-required`, past the limit), or — stopping — go on.
    fn agent_gone(&mut self, id: WorkerId, desc: String, now: Instant) {
        let required = self.agent_cfg().is_some_and(|c| c.required);
        let serving = self.phase.serving();
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let Some(w) = agent.procs.remove(&id) else {
            return;
        };
        if let Some(pid) = w.pid {
            self.pids.remove(&pid);
        }
        let (is_current, is_next) = (agent.slot.current == Some(id), agent.slot.next == Some(id));
        if is_current {
            agent.slot.current = None;
        }
        if is_next {
            agent.slot.next = None;
        }
        if !serving {
            return self.finish_if_empty(now);
        }
        if is_next {
            let why = format!("the new agent {desc} before it was ready; the old agent goes on");
            if self.reloading {
                self.reload_failed(why);
            } else {
                warn!("agent replacement failed: {why}");
            }
            return;
        }
        if !is_current {
            return; // an old agent that drained (reload) or retired
        }
        agent.slot.last_exit = Some(desc.clone());
        agent.slot.restarts = agent.slot.restarts.saturating_add(1);
        self.counters.agent_restarts += 1;
        let allowed = agent.slot.throttle.allow(now);
        if required && !allowed {
            let why = format!(
                "the agent was restarted {} times within {}, more than --restart-limit {}; \
                 last: {desc}",
                agent.slot.throttle.recent(now),
                fmt_dur(agent.slot.throttle.window()),
                agent.slot.throttle.limit(),
            );
            return self.give_up(why, now);
        }
        let (failures, delay) = restart_delay(agent.slot.failures, w.spawned_at, w.ready_at, now);
        agent.slot.failures = failures;
        let first_failed = !agent.settled;
        if let Some(next) = agent.slot.next.take() {
            agent.slot.current = Some(next);
            info!("agent: its replacement from the reload takes over");
        } else if delay.is_zero() {
            info!("agent restarting at once (it had served)");
            self.spawn_agent(now);
        } else {
            agent.slot.backoff_until = Some(later(now, delay));
            warn!(
                delay_ms = delay.as_millis() as u64,
                "agent restarting in {} ms (backoff after {failures} failed start{})",
                delay.as_millis(),
                if failures == 1 { "" } else { "s" }
            );
        }
        if first_failed && !required {
            if let Some(a) = self.agent.as_mut() {
                a.settled = true;
            }
            if !self.pool_started {
                warn!("agent not ready: starting the pool without it");
                self.start_pool(now);
            }
            self.announce_if_ready();
        }
    }
}
