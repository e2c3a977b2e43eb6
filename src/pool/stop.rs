//! What operators ask for — stop (drain, lame duck, force), scale, forwarded signals — and
//! the two ways one worker is stopped: drained (`--stop-signal`, SIGKILL after
//! `--drain-timeout`) or killed (SIGKILL to its process group).

use std::time::{Duration, Instant};

use tracing::{error, info};

use super::{fmt_dur, later, Pool, EXIT_CLEAN, EXIT_GAVE_UP, EXIT_KILLED, MAX_WORKERS};
use super::{Action, ManagerMsg, Phase, Request, Slot, State, Stop, StopWhy, WorkerId};

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
                    self.force();
                }
                Phase::Killing { .. } | Phase::Exited => {}
            },
            Request::ForceStop => {
                info!("QUIT: stopping at once");
                self.force();
            }
            Request::Reload => self.reload(now),
            Request::ScaleUp => self.scale(self.slots.len().saturating_add(1), now),
            Request::ScaleDown => self.scale(self.slots.len().saturating_sub(1), now),
            Request::ScaleTo(n) => self.scale(n, now),
            Request::Forward(signal) => {
                for w in self.workers.values() {
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

    fn stop_budget(&self) -> Duration {
        self.cfg
            .shutdown_delay
            .saturating_add(self.cfg.drain_timeout)
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
        self.finish_if_empty();
    }

    fn force(&mut self) {
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
        self.finish_if_empty();
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

    pub(super) fn finish_if_empty(&mut self) {
        if !self.workers.is_empty() {
            return;
        }
        let code = match self.phase {
            Phase::Draining { code } | Phase::Killing { code } => code,
            _ => return,
        };
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
            info!(slot, "scaling up: starting worker {slot}");
            self.spawn(slot, now);
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
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let kill_at = later(now, self.cfg.drain_timeout);
        match (w.state, w.pid) {
            (State::Stopping { kill_at: None, .. }, _) => {}
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
            }
            (State::Spawning, _) => {
                if !matches!(w.stop_when_spawned, Some(Stop::Kill(_))) {
                    w.stop_when_spawned = Some(Stop::Drain(why));
                }
            }
            (_, None) => {} // reaped: its exit is being handled
            (_, Some(pid)) => {
                w.state = State::Stopping {
                    why,
                    kill_at: Some(kill_at),
                };
                self.out.push(Action::Signal {
                    pid,
                    signal: self.cfg.stop_signal,
                });
            }
        }
    }

    /// SIGKILL to the worker's process group, now.
    pub(super) fn kill(&mut self, id: WorkerId, why: StopWhy) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match (w.state, w.pid) {
            (State::Spawning, _) => w.stop_when_spawned = Some(Stop::Kill(why)),
            (_, None) => {}
            (_, Some(pid)) => {
                w.state = State::Stopping { why, kill_at: None };
                self.out.push(Action::KillGroup { pid });
            }
        }
    }
}
