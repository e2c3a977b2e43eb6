//! Unit tests of the pure core: events in, actions out, a fake clock, no processes. The
//! harness is here; the tables of cases are grouped like the core: [`lifecycle`], [`restart`],
//! [`reload`], [`recycle`], [`stop`], [`leave`], [`agent`].

mod agent;
mod leave;
mod lifecycle;
mod recycle;
mod reload;
mod restart;
mod snapshot;
mod stop;

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;

fn cfg(workers: usize) -> PoolConfig {
    PoolConfig {
        workers,
        ready: ReadyMode::Exec,
        ready_timeout: Duration::from_secs(60),
        min_ready: None,
        stop_signal: Signal::SIGTERM,
        drain_timeout: Duration::from_secs(30),
        shutdown_delay: Duration::ZERO,
        restart_limit: 10,
        restart_window: Duration::from_secs(60),
        reload_surge: 1,
        worker_watchdog: None,
        manager_watchdog: None,
        max_memory: None,
        max_lifetime: None,
        leave_timeout: None,
        agent: None,
    }
}

/// A pool, a fake clock, and a fake kernel that hands out pids.
struct H {
    pool: Pool,
    now: Instant,
    next_pid: i32,
    /// Every action seen, in order.
    log: Vec<Action>,
    /// While set, Spawn actions are not answered: their ids wait in `held` (to put other
    /// events between a spawn and its result).
    hold_spawns: bool,
    held: Vec<WorkerId>,
}

impl H {
    fn new(c: PoolConfig) -> H {
        let now = Instant::now();
        H {
            pool: Pool::new(c, now),
            now,
            next_pid: 100,
            log: Vec::new(),
            hold_spawns: false,
            held: Vec::new(),
        }
    }

    /// Feeds an event; performs Spawn actions (successfully) the way the supervisor would.
    fn ev(&mut self, e: Event) -> Vec<Action> {
        let mut all = Vec::new();
        let mut queue = vec![e];
        while let Some(e) = queue.pop() {
            let acts = self.pool.handle(e, self.now);
            for a in &acts {
                if let Action::Spawn { id, .. } | Action::SpawnAgent { id } = a {
                    if self.hold_spawns {
                        self.held.push(*id);
                        continue;
                    }
                    self.next_pid += 1;
                    queue.insert(
                        0,
                        Event::Spawned {
                            id: *id,
                            pid: self.next_pid,
                        },
                    );
                }
            }
            all.extend(acts);
        }
        self.log.extend(all.clone());
        all
    }

    fn start(&mut self) -> Vec<Action> {
        self.ev(Event::Start)
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.ev(Event::Tick)
    }

    fn exit(&mut self, pid: i32, status: ExitStatus) -> Vec<Action> {
        self.exits(&[(pid, status)])
    }

    /// One SIGCHLD's batch.
    fn exits(&mut self, batch: &[(i32, ExitStatus)]) -> Vec<Action> {
        let batch = batch
            .iter()
            .map(|&(pid, status)| Reaped {
                pid,
                status,
                group_left: false,
            })
            .collect();
        self.ev(Event::Reaped(batch))
    }

    /// An exit that left processes in the worker's group.
    fn exit_leaving(&mut self, pid: i32, status: ExitStatus) -> Vec<Action> {
        self.ev(Event::Reaped(vec![Reaped {
            pid,
            status,
            group_left: true,
        }]))
    }

    /// Answers a held spawn: it runs now, with the next pid.
    fn spawned(&mut self, id: WorkerId) -> (i32, Vec<Action>) {
        self.next_pid += 1;
        let pid = self.next_pid;
        (pid, self.ev(Event::Spawned { id, pid }))
    }

    fn spawn_failed(&mut self, id: WorkerId, blame: Blame) -> Vec<Action> {
        self.ev(Event::SpawnFailed {
            id,
            code: 126,
            reason: "Too many open files (os error 24)".into(),
            blame,
        })
    }

    /// Time passes up to the next deadline.
    fn until_deadline(&mut self) -> Vec<Action> {
        let due = self.pool.next_deadline().expect("something is due");
        let d = due.saturating_duration_since(self.now);
        self.advance(d)
    }

    fn status(&self) -> String {
        crate::status::status_line(&self.pool, self.now)
    }

    fn msg(&mut self, pid: i32, msg: WorkerMsg) -> Vec<Action> {
        let id = self.pool.worker_of_pid(pid).expect("known pid");
        self.ev(Event::Message { id, msg })
    }

    fn req(&mut self, r: Request) -> Vec<Action> {
        self.ev(Event::Request(r))
    }

    /// The pid serving `slot`.
    fn pid(&self, slot: usize) -> i32 {
        let id = self.pool.slots[slot].current.expect("slot has a worker");
        self.pool.workers[&id].pid.expect("spawned")
    }

    fn pids(&self) -> Vec<i32> {
        (0..self.pool.slots.len()).map(|s| self.pid(s)).collect()
    }
}

fn spawns(acts: &[Action]) -> usize {
    acts.iter()
        .filter(|a| matches!(a, Action::Spawn { .. }))
        .count()
}

fn manager(acts: &[Action]) -> Vec<ManagerMsg> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Manager(m) => Some(m.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn signals(acts: &[Action]) -> Vec<(i32, Signal)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Signal { pid, signal } => Some((*pid, *signal)),
            _ => None,
        })
        .collect()
}

fn kills(acts: &[Action]) -> Vec<i32> {
    acts.iter()
        .filter_map(|a| match a {
            Action::KillGroup { pid } => Some(*pid),
            _ => None,
        })
        .collect()
}

fn group_signals(acts: &[Action]) -> Vec<(i32, Signal)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::SignalGroup { pgid, signal } => Some((*pgid, *signal)),
            _ => None,
        })
        .collect()
}

fn statuses(acts: &[Action]) -> Vec<String> {
    manager(acts)
        .into_iter()
        .filter_map(|m| match m {
            ManagerMsg::Status(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn exit_code(acts: &[Action]) -> Option<i32> {
    acts.iter().find_map(|a| match a {
        Action::Exit(c) => Some(*c),
        _ => None,
    })
}

const CRASH: ExitStatus = ExitStatus::Code(1);
const TERMED: ExitStatus = ExitStatus::Signal(15);
