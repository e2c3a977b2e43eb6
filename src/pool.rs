//! The pure core: worker slots and their states, and every decision about them — start,
//! restart with backoff, give up, roll on reload, drain on stop, scale — as
//! `handle(event, now) -> actions`.
//!
//! Facts come in as past-tense [`Event`]s with the clock passed in; imperative [`Action`]s go
//! out for the supervisor to perform. This module must never touch a process, a socket, a
//! signal or the clock itself: that is what makes the hard logic testable with tables of cases.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{debug, error, info, warn};

use crate::throttle::{backoff, healthy_run, Throttle};

pub type WorkerId = u64;

/// After a missed worker watchdog: SIGABRT, then SIGKILL after this long.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_GAVE_UP: i32 = 1;
pub const EXIT_KILLED: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    Exec,
    Notify,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub workers: usize,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub min_ready: Option<usize>,
    pub stop_signal: Signal,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub reload_surge: usize,
    pub worker_watchdog: Option<Duration>,
    /// systemd's WatchdogSec= for herder itself (WATCHDOG_USEC).
    pub manager_watchdog: Option<Duration>,
}

/// How a worker process ended, as `waitpid(2)` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit status {c}"),
            ExitStatus::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

/// What a worker said on its NOTIFY_SOCKET (sd_notify(3)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMsg {
    Ready,
    Status(String),
    Watchdog,
    WatchdogTrigger,
    Stopping,
    Errno(i32),
}

/// What an operator asked for, by signal or (later) the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// TERM, INT: drain gracefully (a second one forces).
    Stop,
    /// QUIT: stop at once.
    ForceStop,
    /// HUP: rolling reload.
    Reload,
    /// TTIN / TTOU.
    ScaleUp,
    ScaleDown,
    /// `herder scale N`.
    ScaleTo(usize),
    /// USR1, USR2: passed on to every worker.
    Forward(Signal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    Spawned {
        id: WorkerId,
        pid: i32,
    },
    /// No process runs for this worker: fork or exec failed. `code` is the 126/127-style status.
    SpawnFailed {
        id: WorkerId,
        code: i32,
        reason: String,
    },
    Exited {
        pid: i32,
        status: ExitStatus,
    },
    Message {
        id: WorkerId,
        msg: WorkerMsg,
    },
    Request(Request),
    /// A deadline from [`Pool::next_deadline`] has passed.
    Tick,
}

/// sd_notify(3) messages for herder's own service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerMsg {
    Ready,
    /// RELOADING=1; the sender adds MONOTONIC_USEC= (required by Type=notify-reload).
    Reloading,
    Stopping,
    Status(String),
    Watchdog,
    ExtendTimeout(Duration),
    Errno(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn {
        id: WorkerId,
        slot: usize,
        generation: u64,
    },
    Signal {
        pid: i32,
        signal: Signal,
    },
    /// SIGKILL to the worker's whole process group (its pgid is its pid).
    KillGroup {
        pid: i32,
    },
    /// The slot was removed (scale down): its `--reuseport` socket may be closed.
    ReleaseSlot {
        slot: usize,
    },
    /// One datagram to the service manager.
    Manager(Vec<ManagerMsg>),
    Exit(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Asked to drain: stop, reload (old generation), scale down.
    Drain,
    /// Said STOPPING=1 itself; its replacement is already on the way.
    Retiring,
    Watchdog,
    ReadyTimeout,
    /// A newer reload made this not-yet-ready worker pointless.
    Superseded,
    /// SIGKILLed (forced stop or drain timeout); waiting for the reaper.
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The Spawn action is out; no pid yet.
    Spawning,
    /// Running, waiting for READY=1 until `deadline`.
    Starting {
        deadline: Instant,
    },
    Ready,
    /// Told to stop; SIGKILL at `kill_at` (`None`: already killed).
    Stopping {
        why: StopWhy,
        kill_at: Option<Instant>,
    },
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    pub pid: Option<i32>,
    pub state: State,
    pub spawned_at: Instant,
    /// When it became ready (its last READY=1, or its exec).
    pub ready_at: Option<Instant>,
    pub last_ping: Instant,
    pub status: Option<String>,
    pub errno: Option<i32>,
}

#[derive(Debug, Clone, Default)]
pub struct Slot {
    /// The worker serving this slot.
    pub current: Option<WorkerId>,
    /// Its replacement during a rolling reload, until ready.
    pub next: Option<WorkerId>,
    pub backoff_until: Option<Instant>,
    /// Consecutive failures, for the backoff.
    pub failures: u32,
    pub restarts: u32,
    pub last_exit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// `--shutdown-delay`: not ready, still serving, until then.
    LameDuck {
        until: Instant,
    },
    Draining {
        code: i32,
    },
    Killing {
        code: i32,
    },
    Exited,
}

impl Phase {
    /// Workers serve and are restarted: running, or in the lame-duck delay.
    pub fn serving(self) -> bool {
        matches!(self, Phase::Running | Phase::LameDuck { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Succeeded { generation: u64 },
    Failed { generation: u64, why: String },
}

/// Running totals for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub restarts: u64,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub give_ups: u64,
    /// Worker exits by reason: crash, drained, retired, watchdog, ready_timeout, spawn_failed,
    /// superseded, killed.
    pub exits: BTreeMap<&'static str, u64>,
}

pub struct Pool {
    cfg: PoolConfig,
    pub counters: Counters,
    pub slots: Vec<Slot>,
    pub workers: BTreeMap<WorkerId, Worker>,
    pids: BTreeMap<i32, WorkerId>,
    next_id: WorkerId,
    pub generation: u64,
    pub reloading: bool,
    pub last_reload: Option<ReloadOutcome>,
    pub phase: Phase,
    throttle: Throttle,
    pub started_at: Instant,
    announced_ready: bool,
    killed_any: bool,
    pub gave_up: Option<String>,
    last_ready_at: Option<Instant>,
    next_ping: Option<Instant>,
    last_status: String,
    out: Vec<Action>,
    manager: Vec<ManagerMsg>,
}

impl Pool {
    pub fn new(cfg: PoolConfig, now: Instant) -> Self {
        let throttle = Throttle::new(cfg.restart_limit, cfg.restart_window);
        let next_ping = cfg.manager_watchdog.map(|_| now);
        Pool {
            slots: vec![Slot::default(); cfg.workers],
            cfg,
            counters: Counters::default(),
            workers: BTreeMap::new(),
            pids: BTreeMap::new(),
            next_id: 1,
            generation: 1,
            reloading: false,
            last_reload: None,
            phase: Phase::Running,
            throttle,
            started_at: now,
            announced_ready: false,
            killed_any: false,
            gave_up: None,
            last_ready_at: None,
            next_ping,
            last_status: String::new(),
            out: Vec::new(),
            manager: Vec::new(),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The one entry point: a fact in, the actions it calls for out.
    pub fn handle(&mut self, ev: Event, now: Instant) -> Vec<Action> {
        if self.ready_count() > 0 {
            self.last_ready_at = Some(now);
        }
        match ev {
            Event::Start => self.start(now),
            Event::Spawned { id, pid } => self.spawned(id, pid, now),
            Event::SpawnFailed { id, code, reason } => self.spawn_failed(id, code, &reason, now),
            Event::Exited { pid, status } => self.exited(pid, status, now),
            Event::Message { id, msg } => self.message(id, msg, now),
            Event::Request(r) => self.request(r, now),
            Event::Tick => self.tick(now),
        }
        self.flush(now)
    }

    /// The earliest moment something is due (`None`: nothing; the loop sleeps until an event).
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self
            .workers
            .values()
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
            .min()
    }

    fn worker_deadline(&self, w: &Worker) -> Option<Instant> {
        let watchdog = self.cfg.worker_watchdog.map(|iv| w.last_ping + iv);
        match w.state {
            State::Spawning => None,
            State::Starting { deadline } => Some(watchdog.map_or(deadline, |d| d.min(deadline))),
            State::Ready => watchdog,
            State::Stopping { kill_at, .. } => kill_at,
        }
    }

    pub fn ready_count(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.current)
            .filter(|id| {
                self.workers
                    .get(id)
                    .is_some_and(|w| w.state == State::Ready)
            })
            .count()
    }

    /// `--min-ready`, never more than the pool.
    pub fn min_ready(&self) -> usize {
        self.cfg
            .min_ready
            .unwrap_or(self.slots.len())
            .min(self.slots.len())
            .max(1)
    }

    /// Ready for traffic: enough ready workers and not stopping (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Running && self.ready_count() >= self.min_ready()
    }

    pub fn worker_of_pid(&self, pid: i32) -> Option<WorkerId> {
        self.pids.get(&pid).copied()
    }

    // --- events -------------------------------------------------------------------------

    fn start(&mut self, now: Instant) {
        info!(workers = self.slots.len(), "starting the pool");
        if self.cfg.ready == ReadyMode::Notify {
            // Tell systemd a start may take up to --ready-timeout (sd_notify(3) EXTEND_TIMEOUT_USEC).
            self.manager.push(ManagerMsg::ExtendTimeout(
                self.cfg.ready_timeout + Duration::from_secs(5),
            ));
        }
        for slot in 0..self.slots.len() {
            self.spawn(slot, now);
        }
    }

    fn spawn(&mut self, slot: usize, now: Instant) -> WorkerId {
        let id = self.next_id;
        self.next_id += 1;
        let generation = self.generation;
        let w = Worker {
            slot,
            generation,
            pid: None,
            state: State::Spawning,
            spawned_at: now,
            ready_at: None,
            last_ping: now,
            status: None,
            errno: None,
        };
        self.workers.insert(id, w);
        let s = &mut self.slots[slot];
        if s.current.is_none() {
            s.current = Some(id);
        } else {
            s.next = Some(id);
        }
        self.out.push(Action::Spawn {
            id,
            slot,
            generation,
        });
        id
    }

    fn spawned(&mut self, id: WorkerId, pid: i32, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.pid = Some(pid);
        w.spawned_at = now;
        w.last_ping = now;
        self.pids.insert(pid, id);
        let slot = w.slot;
        info!(slot, pid, generation = w.generation, "worker spawned");
        if !self.phase.serving() {
            // Spawned as the stop began: drain it like the others.
            self.stop_worker(id, StopWhy::Drain, now);
            return;
        }
        match self.cfg.ready {
            ReadyMode::Exec => self.became_ready(id, now),
            ReadyMode::Notify => {
                let w = self.workers.get_mut(&id).expect("worker exists");
                w.state = State::Starting {
                    deadline: now + self.cfg.ready_timeout,
                };
            }
        }
    }

    fn spawn_failed(&mut self, id: WorkerId, code: i32, reason: &str, now: Instant) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        error!(
            slot = w.slot,
            code, "cannot start worker: {reason} (exit {code})"
        );
        self.gone(id, format!("failed to start: {reason} (exit {code})"), now);
    }

    fn exited(&mut self, pid: i32, status: ExitStatus, now: Instant) {
        let Some(id) = self.pids.remove(&pid) else {
            debug!(pid, %status, "reaped a process that is not a worker");
            return;
        };
        let w = &self.workers[&id];
        let expected = matches!(
            w.state,
            State::Stopping {
                why: StopWhy::Drain | StopWhy::Retiring,
                ..
            }
        );
        if expected {
            info!(slot = w.slot, pid, %status, "worker exited");
        } else {
            warn!(slot = w.slot, pid, %status, "worker exited");
        }
        self.gone(id, status.to_string(), now);
    }

    /// A worker no longer exists: decide what its absence means.
    fn gone(&mut self, id: WorkerId, desc: String, now: Instant) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        if let Some(pid) = w.pid {
            self.pids.remove(&pid);
        }
        *self.counters.exits.entry(exit_reason(w.state)).or_default() += 1;
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
            self.finish_if_empty();
            return;
        }
        if is_next {
            self.slots[slot].next = None;
            let why = match w.state {
                State::Stopping {
                    why: StopWhy::ReadyTimeout,
                    ..
                } => {
                    format!(
                        "slot {slot}: not ready within {}",
                        fmt_dur(self.cfg.ready_timeout)
                    )
                }
                _ => format!("slot {slot}: new worker {desc} before it was ready"),
            };
            // (A superseded replacement left `next` before it was killed: it never gets here.)
            self.reload_failed(why);
            return;
        }
        if !is_current {
            return; // an old generation, a retiring or a removed worker: nothing to replace
        }
        let s = &mut self.slots[slot];
        s.current = None;
        s.last_exit = Some(desc.clone());
        s.restarts += 1;
        self.counters.restarts += 1;
        if !self.throttle.allow(now) {
            let why = format!(
                "more than {} restarts within {}; last: slot {slot} {desc}",
                self.throttle.limit(),
                fmt_dur(self.throttle.window())
            );
            self.give_up(why, now);
            return;
        }
        let s = &mut self.slots[slot];
        if healthy_run(w.spawned_at, w.ready_at, now) {
            s.failures = 0;
        }
        s.failures += 1;
        let delay = backoff(s.failures);
        s.backoff_until = Some(now + delay);
        warn!(
            slot,
            delay_ms = delay.as_millis() as u64,
            "restarting in {} ms",
            delay.as_millis()
        );
    }

    fn message(&mut self, id: WorkerId, msg: WorkerMsg, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        match msg {
            WorkerMsg::Ready => {
                if matches!(w.state, State::Starting { .. }) {
                    self.became_ready(id, now);
                }
            }
            WorkerMsg::Watchdog => w.last_ping = now,
            WorkerMsg::Status(s) => w.status = Some(s),
            WorkerMsg::Errno(e) => w.errno = Some(e),
            WorkerMsg::WatchdogTrigger => {
                warn!(
                    slot,
                    pid, "worker asked for a watchdog failure (WATCHDOG=trigger)"
                );
                self.watchdog_failed(id, now);
            }
            WorkerMsg::Stopping => self.retiring(id, now),
        }
    }

    /// STOPPING=1 from a worker: it is about to exit on its own; replace it now.
    fn retiring(&mut self, id: WorkerId, now: Instant) {
        let w = &self.workers[&id];
        let slot = w.slot;
        if matches!(w.state, State::Stopping { .. }) || !self.phase.serving() {
            return;
        }
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        if s.current != Some(id) {
            return;
        }
        info!(
            slot,
            pid = w.pid.unwrap_or(0),
            "worker is stopping on its own (STOPPING=1): starting its replacement"
        );
        s.current = None;
        let has_next = s.next.is_some();
        let w = self.workers.get_mut(&id).expect("worker exists");
        w.state = State::Stopping {
            why: StopWhy::Retiring,
            kill_at: Some(now + self.cfg.drain_timeout),
        };
        if has_next {
            let s = &mut self.slots[slot];
            s.current = s.next.take();
        } else {
            self.spawn(slot, now);
        }
    }

    fn became_ready(&mut self, id: WorkerId, now: Instant) {
        let w = self.workers.get_mut(&id).expect("worker exists");
        w.state = State::Ready;
        w.ready_at = Some(now);
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        info!(slot, pid, "worker ready");
        let s = &mut self.slots[slot];
        s.backoff_until = None;
        if s.next == Some(id) {
            // Rolling reload: the new worker serves; now the old one may drain.
            let old = s.current.replace(id);
            s.next = None;
            if let Some(old) = old {
                self.stop_worker(old, StopWhy::Drain, now);
            }
        }
        if self.reloading {
            self.advance_reload(now);
        }
        if !self.announced_ready && !self.reloading && self.is_ready() {
            self.announced_ready = true;
            info!(ready = self.ready_count(), "pool ready");
            self.manager.push(ManagerMsg::Ready);
        }
    }

    fn request(&mut self, r: Request, now: Instant) {
        match r {
            Request::Stop => match self.phase {
                Phase::Running if !self.cfg.shutdown_delay.is_zero() => {
                    info!(delay = %fmt_dur(self.cfg.shutdown_delay), "stop requested: lame duck, then drain");
                    self.phase = Phase::LameDuck {
                        until: now + self.cfg.shutdown_delay,
                    };
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
            Request::ScaleUp => self.scale(self.slots.len() + 1, now),
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

    fn tick(&mut self, now: Instant) {
        if let Phase::LameDuck { until } = self.phase {
            if now >= until {
                info!("shutdown delay over: draining the pool");
                self.begin_drain(EXIT_CLEAN, now);
            }
        }
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            if s.backoff_until.is_some_and(|t| now >= t) {
                s.backoff_until = None;
                if self.phase.serving() && s.current.is_none() {
                    self.spawn(slot, now);
                }
            }
        }
        let due: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| self.worker_deadline(w).is_some_and(|d| now >= d))
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.worker_due(id, now);
        }
        if let (Some(at), Some(iv)) = (self.next_ping, self.cfg.manager_watchdog) {
            if now >= at {
                if self.healthy(now, iv) {
                    self.manager.push(ManagerMsg::Watchdog);
                } else {
                    warn!("no ready worker for longer than the watchdog interval: not pinging systemd");
                }
                self.next_ping = Some(now + iv / 2);
            }
        }
    }

    fn worker_due(&mut self, id: WorkerId, now: Instant) {
        let w = &self.workers[&id];
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        let watchdog_due = self
            .cfg
            .worker_watchdog
            .is_some_and(|iv| now >= w.last_ping + iv);
        match w.state {
            State::Starting { deadline } if now >= deadline => {
                warn!(
                    slot,
                    pid,
                    "worker not ready within {}: killing it",
                    fmt_dur(self.cfg.ready_timeout)
                );
                self.kill(id, StopWhy::ReadyTimeout);
            }
            State::Starting { .. } | State::Ready if watchdog_due => {
                warn!(
                    slot,
                    pid,
                    "worker missed its watchdog ({}): aborting it",
                    fmt_dur(self.cfg.worker_watchdog.unwrap_or_default())
                );
                self.watchdog_failed(id, now);
            }
            State::Stopping {
                why,
                kill_at: Some(t),
            } if now >= t => {
                warn!(slot, pid, "worker did not exit in time: killing it");
                if !self.phase.serving() {
                    self.killed_any = true;
                }
                self.kill(id, why);
            }
            _ => {}
        }
    }

    fn watchdog_failed(&mut self, id: WorkerId, now: Instant) {
        let w = self.workers.get_mut(&id).expect("worker exists");
        if let Some(pid) = w.pid {
            w.state = State::Stopping {
                why: StopWhy::Watchdog,
                kill_at: Some(now + ABORT_GRACE),
            };
            self.out.push(Action::Signal {
                pid,
                signal: Signal::SIGABRT,
            });
        }
    }

    // --- reload -------------------------------------------------------------------------

    fn reload(&mut self, now: Instant) {
        if !self.phase.serving() || matches!(self.phase, Phase::LameDuck { .. }) {
            info!("reload requested while stopping: ignored");
            return;
        }
        self.generation += 1;
        info!(
            generation = self.generation,
            "reload requested: rolling the pool"
        );
        if self.announced_ready && !self.reloading {
            self.manager.push(ManagerMsg::Reloading);
        }
        self.reloading = true;
        // A reload already under way starts over with the newest generation: its
        // not-yet-ready workers are pointless now.
        for slot in 0..self.slots.len() {
            if let Some(next) = self.slots[slot].next.take() {
                self.kill(next, StopWhy::Superseded);
            }
        }
        self.advance_reload(now);
    }

    /// Starts replacements up to `--reload-surge`; finishes the reload when none is left.
    fn advance_reload(&mut self, now: Instant) {
        let in_flight = self.slots.iter().filter(|s| s.next.is_some()).count();
        let mut budget = self.cfg.reload_surge.saturating_sub(in_flight);
        for slot in 0..self.slots.len() {
            if budget == 0 {
                break;
            }
            let s = &self.slots[slot];
            let stale = s
                .current
                .is_some_and(|id| self.workers[&id].generation < self.generation);
            if s.next.is_none() && stale {
                self.spawn(slot, now);
                budget -= 1;
            }
        }
        let pending = self.slots.iter().any(|s| {
            s.next.is_some()
                || s.current
                    .is_some_and(|id| self.workers[&id].generation < self.generation)
        });
        if !pending {
            self.reloading = false;
            self.last_reload = Some(ReloadOutcome::Succeeded {
                generation: self.generation,
            });
            self.counters.reloads_succeeded += 1;
            info!(generation = self.generation, "reload complete");
            if self.is_ready() || self.announced_ready {
                self.announced_ready = true;
                self.manager.push(ManagerMsg::Ready);
            }
        }
    }

    fn reload_failed(&mut self, why: String) {
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

    // --- stop and scale -----------------------------------------------------------------

    fn stop_budget(&self) -> Duration {
        self.cfg.shutdown_delay + self.cfg.drain_timeout + Duration::from_secs(5)
    }

    fn begin_drain(&mut self, code: i32, now: Instant) {
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
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.killed_any = true;
            self.kill(id, StopWhy::Killed);
        }
        self.finish_if_empty();
    }

    fn give_up(&mut self, why: String, now: Instant) {
        error!("giving up: {why}");
        self.gave_up = Some(why);
        self.counters.give_ups += 1;
        let errno = self.workers.values().find_map(|w| w.errno);
        if let Some(e) = errno {
            self.manager.push(ManagerMsg::Errno(e));
        }
        self.begin_drain(EXIT_GAVE_UP, now);
    }

    fn finish_if_empty(&mut self) {
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
        info!(code, "pool stopped");
        self.phase = Phase::Exited;
        self.out.push(Action::Exit(code));
    }

    fn scale(&mut self, target: usize, now: Instant) {
        if !self.phase.serving() || matches!(self.phase, Phase::LameDuck { .. }) {
            return;
        }
        let target = target.max(1);
        while self.slots.len() < target {
            self.slots.push(Slot::default());
            let slot = self.slots.len() - 1;
            info!(slot, "scaling up");
            self.spawn(slot, now);
        }
        while self.slots.len() > target {
            let slot = self.slots.len() - 1;
            let s = self.slots.pop().expect("more than one slot");
            info!(slot, "scaling down");
            for id in [s.current, s.next].into_iter().flatten() {
                self.stop_worker(id, StopWhy::Drain, now);
            }
            self.out.push(Action::ReleaseSlot { slot });
        }
        if self.reloading {
            self.advance_reload(now);
        }
    }

    /// Asks a worker to drain: `--stop-signal`, SIGKILL after `--drain-timeout`.
    fn stop_worker(&mut self, id: WorkerId, why: StopWhy, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let kill_at = now + self.cfg.drain_timeout;
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
            (_, None) => {} // still spawning: handled when Spawned arrives
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

    fn kill(&mut self, id: WorkerId, why: StopWhy) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if let Some(pid) = w.pid {
            w.state = State::Stopping { why, kill_at: None };
            self.out.push(Action::KillGroup { pid });
        }
    }

    // --- reporting ----------------------------------------------------------------------

    fn healthy(&self, now: Instant, interval: Duration) -> bool {
        if !self.phase.serving() || self.ready_count() > 0 {
            return true;
        }
        let since = self
            .last_ready_at
            .unwrap_or(self.started_at + self.cfg.ready_timeout);
        now.saturating_duration_since(since) < interval
    }

    /// The one-line STATUS= that `systemctl status` shows.
    pub fn status_line(&mut self, now: Instant) -> String {
        let (ready, n) = (self.ready_count(), self.slots.len());
        match self.phase {
            Phase::LameDuck { .. } => {
                format!("shutting down: not ready, {ready}/{n} workers still serving")
            }
            Phase::Draining { .. } | Phase::Killing { .. } | Phase::Exited => {
                let left = self.workers.len();
                match &self.gave_up {
                    Some(why) => format!("gave up: {why}"),
                    None => format!("draining: {left} workers left"),
                }
            }
            Phase::Running if self.reloading => {
                let done = self
                    .slots
                    .iter()
                    .filter_map(|s| s.current)
                    .filter(|id| self.workers[id].generation == self.generation)
                    .count();
                format!("reloading: {done}/{n} workers replaced, {ready}/{n} ready")
            }
            Phase::Running => {
                let restarts = self.throttle.recent(now);
                let window = fmt_dur(self.throttle.window());
                let base =
                    format!("{ready}/{n} workers ready, {restarts} restarts in the last {window}");
                match &self.last_reload {
                    Some(ReloadOutcome::Failed { why, .. }) => {
                        format!("reload failed: {why}; {base}")
                    }
                    _ => base,
                }
            }
        }
    }

    fn flush(&mut self, now: Instant) -> Vec<Action> {
        let status = self.status_line(now);
        if status != self.last_status {
            self.last_status = status.clone();
            self.manager.push(ManagerMsg::Status(status));
        }
        let mut out = std::mem::take(&mut self.out);
        if !self.manager.is_empty() {
            let msgs = std::mem::take(&mut self.manager);
            // Manager messages go before an Exit, so the last STATUS= is out first.
            let at = out
                .iter()
                .position(|a| matches!(a, Action::Exit(_)))
                .unwrap_or(out.len());
            out.insert(at, Action::Manager(msgs));
        }
        out
    }
}

/// Why a worker that is gone went away, as `/metrics` counts it.
fn exit_reason(state: State) -> &'static str {
    match state {
        State::Spawning => "spawn_failed",
        State::Starting { .. } | State::Ready => "crash",
        State::Stopping { why, .. } => match why {
            StopWhy::Drain => "drained",
            StopWhy::Retiring => "retired",
            StopWhy::Watchdog => "watchdog",
            StopWhy::ReadyTimeout => "ready_timeout",
            StopWhy::Superseded => "superseded",
            StopWhy::Killed => "killed",
        },
    }
}

/// `60s`, `2m`, `500ms`: durations as the flags spell them.
pub fn fmt_dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms >= 120_000 && ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
