//! The agent (`--agent`): one process beside the pool for the work that must not run N times
//! (egg.js's Agent). It starts before the workers, which start once it is ready (or, unless
//! `--agent-required`, once its first start has failed); it is restarted on its own backoff,
//! outside the pool's give-up budget (with `--agent-required`, more than `--restart-limit`
//! restarts within `--restart-window` give up); on stop it drains after the last worker has
//! exited; `--agent-reload` replaces it once a reload has rolled the pool.
//!
//! Its processes are [`Worker`]s that belong to no slot, kept apart from the pool's so that no
//! rule about slots (restarts, reloads, recycling, steering) can touch them; their pids share
//! the pool's table, so the reaper and the notify sockets treat them alike.
//!
//! This file: its configuration and state, starting it, its readiness and messages, stopping
//! it, `--agent-reload`; [`exits`] what its end means and its deadlines.

mod exits;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::info;

use super::stop::drain_proc;
use super::{later, Pool};
use super::{Action, PoolConfig, ReadyMode, Slot, State, Stop, StopWhy, Worker, WorkerId};
use crate::throttle::served;

/// How the agent is run: `--agent-ready`, `--agent-required`, `--agent-stop-signal`,
/// `--agent-drain-timeout`, `--agent-reload`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub ready: ReadyMode,
    pub required: bool,
    pub stop_signal: Signal,
    pub drain_timeout: Duration,
    pub reload: bool,
}

/// The agent's state: its processes (the current one, a replacement starting, old ones
/// draining) and its own restart bookkeeping, a [`Slot`]'s that no pool slot shares.
#[derive(Debug, Clone)]
pub struct Agent {
    pub procs: BTreeMap<WorkerId, Worker>,
    /// `current`: the agent serving now (or starting to); `next`: its replacement
    /// (`--agent-reload`) until ready; and the backoff, failures, restarts, throttle and last
    /// exit, counted as for a slot (the recycle fields are unused).
    pub slot: Slot,
    /// The generation its current process was started for (`--agent-reload` follows the pool).
    pub generation: u64,
    /// It has been ready once, or (not required) its first start failed: the pool may start.
    pub settled: bool,
}

impl Agent {
    pub fn new(cfg: &PoolConfig) -> Agent {
        Agent {
            procs: BTreeMap::new(),
            slot: Slot::new(cfg),
            generation: 1,
            settled: false,
        }
    }

    /// Whether an agent process is ready now (the current one, or an old one still serving).
    pub fn ready(&self) -> bool {
        self.procs.values().any(|w| w.state == State::Ready)
    }

    /// The process `herder status` shows: the current one, else one still draining.
    pub fn shown(&self) -> Option<&Worker> {
        self.slot
            .current
            .and_then(|id| self.procs.get(&id))
            .or_else(|| self.procs.values().next())
    }
}

impl Pool {
    fn agent_cfg(&self) -> Option<&AgentConfig> {
        self.cfg.agent.as_ref()
    }

    /// Whether the agent lets herder count as ready: no agent; a required one that is ready;
    /// one that is not required once it has settled.
    pub fn agent_ok(&self) -> bool {
        match (&self.agent, self.agent_cfg()) {
            (Some(a), Some(c)) if c.required => a.ready(),
            (Some(a), _) => a.settled,
            (None, _) => true,
        }
    }

    pub(super) fn is_agent(&self, id: WorkerId) -> bool {
        self.agent
            .as_ref()
            .is_some_and(|a| a.procs.contains_key(&id))
    }

    /// A new agent process: the current one if there is none, else the replacement.
    pub(super) fn spawn_agent(&mut self, now: Instant) {
        let id = self.next_id;
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        self.next_id += 1;
        let w = Worker {
            slot: 0,
            generation: agent.generation,
            pid: None,
            state: State::Spawning,
            spawned_at: now,
            ready_at: None,
            last_ping: now,
            status: None,
            errno: None,
            stop_when_spawned: None,
        };
        agent.procs.insert(id, w);
        if agent.slot.current.is_none() {
            agent.slot.current = Some(id);
        } else {
            agent.slot.next = Some(id);
        }
        self.out.push(Action::SpawnAgent { id });
    }

    pub(super) fn agent_spawned(&mut self, id: WorkerId, pid: i32, now: Instant) {
        let deadline = later(now, self.cfg.ready_timeout);
        let exec = self.agent_cfg().is_some_and(|c| c.ready == ReadyMode::Exec);
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let Some(w) = agent.procs.get_mut(&id) else {
            return;
        };
        w.pid = Some(pid);
        w.spawned_at = now;
        w.last_ping = now;
        w.state = State::Starting { deadline };
        let pending = w.stop_when_spawned.take();
        agent.slot.resource_failures = 0;
        self.pids.insert(pid, id);
        self.leftovers.remove(&pid);
        info!(pid, role = "agent", "agent (pid {pid}) spawned");
        match pending {
            Some(Stop::Drain(why)) => return self.stop_agent_proc(id, why, now),
            Some(Stop::Kill(why)) => return self.kill(id, why),
            None => {}
        }
        if !self.phase.serving() {
            // Spawned as the stop began: it stops once the pool is gone.
            return self.finish_if_empty(now);
        }
        if exec {
            self.agent_became_ready(id, now);
        }
    }

    pub(super) fn agent_became_ready(&mut self, id: WorkerId, now: Instant) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let Some(w) = agent.procs.get_mut(&id) else {
            return;
        };
        w.state = State::Ready;
        w.ready_at = Some(now);
        let pid = w.pid.unwrap_or(0);
        info!(pid, role = "agent", "agent (pid {pid}) ready");
        agent.slot.backoff_until = None;
        let mut old = None;
        if agent.slot.next == Some(id) {
            old = agent.slot.current.replace(id);
            agent.slot.next = None;
        }
        let first = !agent.settled;
        agent.settled = true;
        if let Some(old) = old {
            info!(
                pid,
                "agent reload: the new agent (pid {pid}) is ready; the old one drains"
            );
            self.stop_agent_proc(old, StopWhy::Drain, now);
        }
        if first && !self.pool_started && self.phase.serving() {
            self.start_pool(now);
        }
        if self.reloading {
            self.advance_reload(now);
        }
        self.announce_if_ready();
    }

    /// STOPPING=1 from the current agent after it has served: its replacement starts now.
    /// (Before it has served, or from a replacement, its exit is what counts.)
    pub(super) fn agent_retiring(&mut self, id: WorkerId, now: Instant) {
        let timeout = self
            .agent_cfg()
            .map_or(self.cfg.drain_timeout, |c| c.drain_timeout);
        if !self.phase.serving() {
            return;
        }
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        let Some(w) = agent.procs.get_mut(&id) else {
            return;
        };
        if agent.slot.current != Some(id) || !served(w.ready_at, now) || w.state != State::Ready {
            return;
        }
        let pid = w.pid.unwrap_or(0);
        info!(
            pid,
            "agent (pid {pid}) is stopping on its own (STOPPING=1): starting its replacement"
        );
        w.state = State::Stopping {
            why: StopWhy::Retiring,
            kill_at: Some(later(now, timeout)),
        };
        agent.slot.current = agent.slot.next.take();
        if agent.slot.current.is_none() {
            self.spawn_agent(now);
        }
    }

    /// `--agent-stop-signal`, SIGKILL after `--agent-drain-timeout`.
    pub(super) fn stop_agent_proc(&mut self, id: WorkerId, why: StopWhy, now: Instant) {
        let (signal, timeout) = self
            .agent_cfg()
            .map_or((self.cfg.stop_signal, self.cfg.drain_timeout), |c| {
                (c.stop_signal, c.drain_timeout)
            });
        if let Some(w) = self.agent.as_mut().and_then(|a| a.procs.get_mut(&id)) {
            self.out.extend(drain_proc(w, why, signal, timeout, now));
        }
    }

    /// Every agent process, for a forced stop or a forwarded signal.
    pub(super) fn agent_ids(&self) -> Vec<WorkerId> {
        self.agent
            .as_ref()
            .map(|a| a.procs.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Once the last worker is gone while stopping: the agent drains. `true` while an agent
    /// process is left (herder exits after it).
    pub(super) fn stop_agent_after_pool(&mut self, now: Instant) -> bool {
        let Some(agent) = self.agent.as_mut() else {
            return false;
        };
        agent.slot.backoff_until = None;
        let running: Vec<WorkerId> = agent
            .procs
            .iter()
            .filter(|(_, w)| !matches!(w.state, State::Stopping { .. }))
            .map(|(&id, _)| id)
            .collect();
        let left = !agent.procs.is_empty();
        if !running.is_empty() {
            info!("pool drained: stopping the agent");
        }
        for id in running {
            self.stop_agent_proc(id, StopWhy::Drain, now);
        }
        left
    }

    /// `--agent-reload`: once a reload has rolled the pool, the agent's turn. `true` while the
    /// reload must wait for it: a new agent was started now or is still starting; it ends when
    /// the agent serving is of the reload's generation (or none runs: the next one will be).
    pub(super) fn agent_reload_pending(&mut self, now: Instant) -> bool {
        let generation = self.generation;
        let wanted = self.agent_cfg().is_some_and(|c| c.reload);
        if !wanted || !self.phase.serving() || !self.pool_started {
            return false;
        }
        let Some(agent) = self.agent.as_mut() else {
            return false;
        };
        let Some(current) = agent.slot.current.and_then(|id| agent.procs.get(&id)) else {
            agent.generation = generation; // restarting: its next start is of this generation
            return false;
        };
        if current.generation >= generation {
            return false;
        }
        if agent.slot.next.is_none() {
            agent.generation = generation;
            info!(
                generation,
                "reload: the pool has rolled; replacing the agent"
            );
            self.spawn_agent(now);
        }
        true
    }

    /// A newer reload: the new agent of the previous one is pointless now.
    pub(super) fn supersede_agent_reload(&mut self) {
        if let Some(next) = self.agent.as_mut().and_then(|a| a.slot.next.take()) {
            self.kill(next, StopWhy::Superseded);
        }
    }
}
