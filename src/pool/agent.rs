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

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use super::stop::{drain_proc, kill_proc};
use super::{fmt_dur, later, Pool, ABORT_GRACE};
use super::{Action, Blame, ReadyMode, Reaped, State, Stop, StopWhy, Worker, WorkerId, WorkerMsg};
use crate::throttle::{backoff, restart_delay, served, Throttle};

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
/// draining) and its own restart bookkeeping.
#[derive(Debug, Clone)]
pub struct Agent {
    pub procs: BTreeMap<WorkerId, Worker>,
    /// The agent serving now (or starting to).
    pub current: Option<WorkerId>,
    /// Its replacement (`--agent-reload`), until ready.
    pub next: Option<WorkerId>,
    pub backoff_until: Option<Instant>,
    /// Consecutive failed starts, for the backoff.
    pub failures: u32,
    pub resource_failures: u32,
    pub restarts: u32,
    pub throttle: Throttle,
    pub last_exit: Option<String>,
    /// The generation its current process was started for (`--agent-reload` follows the pool).
    pub generation: u64,
    /// It has been ready once, or (not required) its first start failed: the pool may start.
    pub settled: bool,
}

impl Agent {
    pub fn new(limit: u32, window: Duration) -> Agent {
        Agent {
            procs: BTreeMap::new(),
            current: None,
            next: None,
            backoff_until: None,
            failures: 0,
            resource_failures: 0,
            restarts: 0,
            throttle: Throttle::new(limit, window),
            last_exit: None,
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
        self.current
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
        if agent.current.is_none() {
            agent.current = Some(id);
        } else {
            agent.next = Some(id);
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
        agent.resource_failures = 0;
        self.pids.insert(pid, id);
        self.leftovers.remove(&pid);
        info!(pid, role = "agent", "agent (pid {pid}) spawned");
        match pending {
            Some(Stop::Drain(why)) => return self.stop_agent_proc(id, why, now),
            Some(Stop::Kill(why)) => return self.kill_agent_proc(id, why),
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

    fn agent_became_ready(&mut self, id: WorkerId, now: Instant) {
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
        agent.backoff_until = None;
        let mut old = None;
        if agent.next == Some(id) {
            old = agent.current.replace(id);
            agent.next = None;
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
        self.announce_if_ready();
    }

    pub(super) fn agent_message(&mut self, id: WorkerId, msg: WorkerMsg, now: Instant) {
        let Some(w) = self.agent.as_mut().and_then(|a| a.procs.get_mut(&id)) else {
            return;
        };
        let pid = w.pid.unwrap_or(0);
        let stopping = matches!(w.state, State::Stopping { .. });
        match msg {
            WorkerMsg::Ready => {
                if matches!(w.state, State::Starting { .. }) {
                    self.agent_became_ready(id, now);
                }
            }
            WorkerMsg::Watchdog => w.last_ping = now,
            WorkerMsg::Status(s) => w.status = Some(s),
            WorkerMsg::Errno(e) => w.errno = Some(e),
            WorkerMsg::WatchdogTrigger if stopping => {
                debug!(
                    pid,
                    "agent (pid {pid}) sent WATCHDOG=trigger while stopping: ignored"
                );
            }
            WorkerMsg::WatchdogTrigger => {
                warn!(
                    pid,
                    "agent (pid {pid}) asked for a watchdog failure (WATCHDOG=trigger)"
                );
                self.agent_watchdog_failed(id, now);
            }
            WorkerMsg::Stopping => self.agent_retiring(id, now),
        }
    }

    /// STOPPING=1 from the current agent after it has served: its replacement starts now.
    /// (Before it has served, or from a replacement, its exit is what counts.)
    fn agent_retiring(&mut self, id: WorkerId, now: Instant) {
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
        if agent.current != Some(id) || !served(w.ready_at, now) || w.state != State::Ready {
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
        agent.current = agent.next.take();
        if agent.current.is_none() {
            self.spawn_agent(now);
        }
    }

    fn agent_watchdog_failed(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.agent.as_mut().and_then(|a| a.procs.get_mut(&id)) else {
            return;
        };
        match (w.state, w.pid) {
            (State::Stopping { .. }, _) => {}
            (State::Spawning, _) => w.stop_when_spawned = Some(Stop::Kill(StopWhy::Watchdog)),
            (_, None) => {}
            (_, Some(pid)) => {
                w.state = State::Stopping {
                    why: StopWhy::Watchdog,
                    kill_at: Some(later(now, ABORT_GRACE)),
                };
                self.out.push(Action::Signal {
                    pid,
                    signal: Signal::SIGABRT,
                });
            }
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

    pub(super) fn kill_agent_proc(&mut self, id: WorkerId, why: StopWhy) {
        if let Some(w) = self.agent.as_mut().and_then(|a| a.procs.get_mut(&id)) {
            self.out.extend(kill_proc(w, why));
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
        agent.backoff_until = None;
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

    /// The agent's deadlines: its processes' (ready timeout, watchdog, SIGKILL) and its backoff.
    pub(super) fn agent_deadlines(&self) -> Vec<Instant> {
        let Some(agent) = &self.agent else {
            return Vec::new();
        };
        agent
            .procs
            .values()
            .filter_map(|w| self.worker_deadline(w))
            .chain(agent.backoff_until)
            .collect()
    }

    pub(super) fn agent_tick(&mut self, now: Instant) {
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        if agent.backoff_until.is_some_and(|t| now >= t) {
            agent.backoff_until = None;
            if self.phase.serving() && agent.current.is_none() {
                self.spawn_agent(now);
            }
        }
        let Some(agent) = &self.agent else {
            return;
        };
        let due: Vec<WorkerId> = agent
            .procs
            .iter()
            .filter(|(_, w)| self.worker_deadline(w).is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.agent_due(id, now);
        }
    }

    fn agent_due(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.agent.as_ref().and_then(|a| a.procs.get(&id)) else {
            return;
        };
        let pid = w.pid.unwrap_or(0);
        let watchdog_due = self
            .cfg
            .worker_watchdog
            .is_some_and(|iv| now >= later(w.last_ping, iv));
        match w.state {
            State::Starting { deadline } if now >= deadline => {
                warn!(
                    pid,
                    "agent (pid {pid}) not ready within {}: killing it",
                    fmt_dur(self.cfg.ready_timeout)
                );
                self.kill_agent_proc(id, StopWhy::ReadyTimeout);
            }
            State::Starting { .. } | State::Ready if watchdog_due => {
                warn!(
                    pid,
                    "agent (pid {pid}) missed its watchdog ({}): aborting it",
                    fmt_dur(self.cfg.worker_watchdog.unwrap_or_default())
                );
                self.agent_watchdog_failed(id, now);
            }
            State::Stopping {
                why,
                kill_at: Some(t),
            } if now >= t => {
                warn!(pid, "agent (pid {pid}) did not exit in time: killing it");
                if !self.phase.serving() {
                    self.killed_any = true;
                }
                self.kill_agent_proc(id, why);
            }
            _ => {}
        }
    }

    /// An agent process was reaped (its pid is already forgotten).
    pub(super) fn agent_reaped(&mut self, id: WorkerId, r: Reaped, now: Instant) {
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

    pub(super) fn agent_spawn_failed(
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
                if agent.current == Some(id) {
                    agent.current = None;
                }
                if agent.next == Some(id) {
                    agent.next = None;
                }
                self.counters.resource_failures += 1;
                if !self.phase.serving() {
                    return self.finish_if_empty(now);
                }
                agent.resource_failures = agent.resource_failures.saturating_add(1);
                let delay = backoff(agent.resource_failures);
                agent.backoff_until = Some(later(now, delay));
                agent.last_exit = Some(format!("herder could not start it: {reason}"));
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
        let (is_current, is_next) = (agent.current == Some(id), agent.next == Some(id));
        if is_current {
            agent.current = None;
        }
        if is_next {
            agent.next = None;
        }
        if !serving {
            return self.finish_if_empty(now);
        }
        if is_next {
            warn!("agent reload failed: the new agent {desc} before it was ready; the old agent goes on");
            return;
        }
        if !is_current {
            return; // an old agent that drained (reload) or retired
        }
        agent.last_exit = Some(desc.clone());
        agent.restarts = agent.restarts.saturating_add(1);
        self.counters.agent_restarts += 1;
        let allowed = agent.throttle.allow(now);
        if required && !allowed {
            let why = format!(
                "the agent was restarted {} times within {}, more than --restart-limit {}; \
                 last: {desc}",
                agent.throttle.recent(now),
                fmt_dur(agent.throttle.window()),
                agent.throttle.limit(),
            );
            return self.give_up(why, now);
        }
        let (failures, delay) = restart_delay(agent.failures, w.spawned_at, w.ready_at, now);
        agent.failures = failures;
        let first_failed = !agent.settled;
        if let Some(next) = agent.next.take() {
            agent.current = Some(next);
            info!("agent: its replacement from the reload takes over");
        } else if delay.is_zero() {
            info!("agent restarting at once (it had served)");
            self.spawn_agent(now);
        } else {
            agent.backoff_until = Some(later(now, delay));
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

    /// `--agent-reload`, once a reload has rolled the pool: a new agent beside the old one.
    pub(super) fn reload_agent(&mut self, now: Instant) {
        let generation = self.generation;
        let wanted = self.agent_cfg().is_some_and(|c| c.reload);
        let Some(agent) = self.agent.as_mut() else {
            return;
        };
        if !wanted || !self.phase.serving() || !self.pool_started {
            return;
        }
        agent.generation = generation;
        if agent.current.is_some() && agent.next.is_none() {
            info!(generation, "reload: replacing the agent");
            self.spawn_agent(now);
        }
    }
}
