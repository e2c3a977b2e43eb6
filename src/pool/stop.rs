//! What operators ask for — stop (drain, lame duck, force), scale, forwarded signals — and
//! the two ways one worker is stopped: drained (`--stop-signal`, SIGKILL after
//! `--drain-timeout`) or killed (SIGKILL to its process group).

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{error, info};

use super::{fmt_dur, later, process_mut, Pool, ABORT_GRACE};
use super::{Action, ManagerMsg, Phase, Request, Slot, State, Stop, StopWhy, Worker, WorkerId};
use super::{EXIT_CLEAN, EXIT_GAVE_UP, EXIT_KILLED, MAX_WORKERS};

impl Pool {
    pub(super) fn request(&mut self, r: Request, now: Instant) {
        match r {
            Request::Stop => match self.phase {
                Phase::Running if !self.cfg.shutdown_delay.is_zero() => {
                    let delay = fmt_dur(self.cfg.shutdown_delay);
                    info!(%delay, "stop requested: lame duck for {delay}, then drain");
                    self.phase = Phase::LameDuck {
                        until: later(now, self.cfg.shutdown_delay),
                    };
                    self.reloading = false;
                    self.manager.push(ManagerMsg::Stopping);
                    self.manager
                        .push(ManagerMsg::ExtendTimeout(self.stop_budget()));
                }
                Phase::Running => {
                    info!("stop requested: draining the pool");
                    self.begin_drain(EXIT_CLEAN, now);
                }
                Phase::LameDuck { .. } | Phase::Draining { .. } => {
                    info!("second stop request: stopping at once");
                    self.force(now);
                }
                Phase::Killing { .. } | Phase::Exited => {}
            },
            Request::ForceStop => {
                info!("QUIT: stopping at once");
                self.force(now);
            }
            Request::Reload => self.reload(now),
            Request::ScaleUp => self.scale(self.slots.len().saturating_add(1), now),
            Request::ScaleDown => self.scale(self.slots.len().saturating_sub(1), now),
            Request::ScaleTo(n) => self.scale(n, now),
            Request::Forward(signal) => {
                let agent = self.agent.iter().flat_map(|a| a.procs.values());
                for w in self.workers.values().chain(agent) {
                    let killed = matches!(
                        w.state,
                        State::Stopping {
                            why: StopWhy::Killed,
                            ..
                        }
                    );
                    if let (Some(pid), false) = (w.pid, killed) {
                        self.out.push(Action::Signal { pid, signal });
                    }
                }
            }
        }
    }

    /// How long a stop may take: the lame duck, the pool's drain, then the agent's.
    fn stop_budget(&self) -> Duration {
        let agent = self
            .cfg
            .agent
            .as_ref()
            .map_or(Duration::ZERO, |a| a.drain_timeout);
        self.cfg
            .shutdown_delay
            .saturating_add(self.cfg.drain_timeout)
            .saturating_add(agent)
            .saturating_add(Duration::from_secs(5))
    }

    pub(super) fn begin_drain(&mut self, code: i32, now: Instant) {
        if !matches!(self.phase, Phase::LameDuck { .. }) {
            self.manager.push(ManagerMsg::Stopping);
            self.manager
                .push(ManagerMsg::ExtendTimeout(self.stop_budget()));
        }
        self.phase = Phase::Draining { code };
        self.reloading = false;
        for s in &mut self.slots {
            s.backoff_until = None;
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.stop_worker(id, StopWhy::Drain, now);
        }
        self.finish_if_empty(now);
    }

    fn force(&mut self, now: Instant) {
        let code = match self.phase {
            Phase::Draining { code } | Phase::Killing { code } => code,
            _ => EXIT_CLEAN,
        };
        if matches!(self.phase, Phase::Running | Phase::LameDuck { .. }) {
            self.manager.push(ManagerMsg::Stopping);
        }
        self.phase = Phase::Killing { code };
        self.reloading = false;
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.killed_any = true;
            self.kill(id, StopWhy::Killed);
        }
        for id in self.agent_ids() {
            self.killed_any = true;
            self.kill(id, StopWhy::Killed);
        }
        self.finish_if_empty(now);
    }

    pub(super) fn give_up(&mut self, why: String, now: Instant) {
        error!("giving up: {why}");
        self.gave_up = Some(why);
        self.counters.give_ups += 1;
        let errno = self.workers.values().find_map(|w| w.errno);
        if let Some(e) = errno {
            self.manager.push(ManagerMsg::Errno(e));
        }
        self.begin_drain(EXIT_GAVE_UP, now);
    }

    /// Once the last worker is gone while stopping: the agent drains; once it is gone too,
    /// herder exits.
    pub(super) fn finish_if_empty(&mut self, now: Instant) {
        if !self.workers.is_empty() {
            return;
        }
        let code = match self.phase {
            Phase::Draining { code } | Phase::Killing { code } => code,
            _ => return,
        };
        if self.stop_agent_after_pool(now) {
            return;
        }
        let code = if code == EXIT_CLEAN && self.killed_any {
            EXIT_KILLED
        } else {
            code
        };
        info!(code, "pool stopped: herder exits with status {code}");
        self.phase = Phase::Exited;
        self.out.push(Action::Exit(code));
    }

    fn scale(&mut self, target: usize, now: Instant) {
        if self.phase != Phase::Running {
            info!("scaling requested while stopping: ignored");
            return;
        }
        let target = target.clamp(1, MAX_WORKERS);
        while self.slots.len() < target {
            self.slots.push(Slot::new(&self.cfg));
            let slot = self.slots.len() - 1;
            if self.pool_started {
                info!(slot, "scaling up: starting worker {slot}");
                self.spawn(slot, now);
            }
        }
        while self.slots.len() > target {
            let slot = self.slots.len() - 1;
            let Some(s) = self.slots.pop() else { break };
            info!(slot, "scaling down: stopping worker {slot}");
            // Its worker is steered away first, and drains once its queue is served.
            if let Some(id) = s.current {
                self.remove_worker(id, now);
            }
            if let Some(id) = s.next {
                self.stop_worker(id, StopWhy::Drain, now);
            }
            self.out.push(Action::ReleaseSlot { slot });
        }
        if self.slots.iter().all(|s| s.resource_failures == 0) && self.resource_error.is_some() {
            info!("no worker is waiting for herder's resources any more");
            self.resource_error = None;
        }
        if self.reloading {
            self.advance_reload(now);
        }
    }

    /// Asks a worker to drain: `--stop-signal`, SIGKILL after `--drain-timeout`.
    pub(super) fn stop_worker(&mut self, id: WorkerId, why: StopWhy, now: Instant) {
        let (signal, timeout) = (self.cfg.stop_signal, self.cfg.drain_timeout);
        if let Some(w) = self.workers.get_mut(&id) {
            self.out.extend(drain_proc(w, why, signal, timeout, now));
        }
    }

    /// SIGKILL to the process group of a worker or of the agent, now.
    pub(super) fn kill(&mut self, id: WorkerId, why: StopWhy) {
        if let Some(w) = process_mut(&mut self.workers, &mut self.agent, id) {
            self.out.extend(kill_proc(w, why));
        }
    }
}

/// Drains one process (a worker or the agent): `signal` now, SIGKILL after `timeout`; one
/// already stopping keeps the earlier deadline, one still spawning is stopped once it runs.
/// The action to perform, if any.
pub(super) fn drain_proc(
    w: &mut Worker,
    why: StopWhy,
    signal: Signal,
    timeout: Duration,
    now: Instant,
) -> Option<Action> {
    let kill_at = later(now, timeout);
    match (w.state, w.pid) {
        (State::Stopping { kill_at: None, .. }, _) => None,
        (
            State::Stopping {
                why,
                kill_at: Some(t),
            },
            _,
        ) => {
            w.state = State::Stopping {
                why,
                kill_at: Some(t.min(kill_at)),
            };
            None
        }
        (State::Spawning, _) => {
            if !matches!(w.stop_when_spawned, Some(Stop::Kill(_))) {
                w.stop_when_spawned = Some(Stop::Drain(why));
            }
            None
        }
        (_, None) => None, // reaped: its exit is being handled
        (_, Some(pid)) => {
            w.state = State::Stopping {
                why,
                kill_at: Some(kill_at),
            };
            Some(Action::Signal { pid, signal })
        }
    }
}

/// A missed watchdog (or WATCHDOG=trigger): SIGABRT now, SIGKILL after [`ABORT_GRACE`]
/// (once it runs, if it is still spawning).
pub(super) fn abort_proc(w: &mut Worker, now: Instant) -> Option<Action> {
    match (w.state, w.pid) {
        (State::Stopping { .. }, _) => None,
        (State::Spawning, _) => {
            w.stop_when_spawned = Some(Stop::Kill(StopWhy::Watchdog));
            None
        }
        (_, None) => None, // reaped: its exit is being handled
        (_, Some(pid)) => {
            w.state = State::Stopping {
                why: StopWhy::Watchdog,
                kill_at: Some(later(now, ABORT_GRACE)),
            };
            Some(Action::Signal {
                pid,
                signal: Signal::SIGABRT,
            })
        }
    }
}

/// SIGKILL to one process's group, now (once it runs, if it is still spawning).
pub(super) fn kill_proc(w: &mut Worker, why: StopWhy) -> Option<Action> {
    match (w.state, w.pid) {
        (State::Spawning, _) => {
            w.stop_when_spawned = Some(Stop::Kill(why));
            None
        }
        (_, None) => None,
        (_, Some(pid)) => {
            w.state = State::Stopping { why, kill_at: None };
            Some(Action::KillGroup { pid })
        }
    }
}
