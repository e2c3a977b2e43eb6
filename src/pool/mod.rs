//! The pure core: worker slots and their states, and every decision about them — start,
//! restart, give up, roll on reload, drain on stop, scale — as `handle(event, now) -> actions`.
//!
//! Facts come in as past-tense [`Event`]s with the clock passed in; imperative [`Action`]s go
//! out for the supervisor to perform. This module must never touch a process, a socket, a
//! signal or the clock itself: that is what makes the hard logic testable with tables of cases.
//!
//! Each rule lives in one place: this file holds the pool, starting workers and their
//! messages; [`clock`] its deadlines; [`exits`] what a worker's end (or `STOPPING=1`, or a
//! missed watchdog) means for its slot; [`reload`] the rolling reload; [`agent`] the one
//! process beside the pool (`--agent`); [`leave`] a removed slot's worker that still accepts
//! its queue; [`recycle`] replacing a worker that is too big or too old; [`stop`] stopping and
//! scaling; [`snapshot`] the pool as it crosses an in-place upgrade; [`types`] the vocabulary.

mod agent;
mod clock;
mod exits;
mod leave;
mod recycle;
mod reload;
mod snapshot;
mod stop;
mod types;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

pub use agent::{Agent, AgentConfig};
pub use leave::{LEAVE_MAX, LEAVE_POLL};
pub use snapshot::PoolSnapshot;
pub use types::*;

/// After a missed worker watchdog: SIGABRT, then SIGKILL after this long.
pub const ABORT_GRACE: Duration = Duration::from_secs(5);

/// The largest pool: `--workers`, `herder scale` and TTIN stop here.
pub const MAX_WORKERS: usize = 100_000;

pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_GAVE_UP: i32 = 1;
pub const EXIT_KILLED: i32 = 3;

/// `now + d`, for `d` from the configuration: never overflows (the flags are range-checked,
/// and this is the second line of defence).
pub fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
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
    pub started_at: Instant,
    announced_ready: bool,
    killed_any: bool,
    pub gave_up: Option<String>,
    /// herder's own shortage (EMFILE, ENOMEM, …) that keeps a worker from starting, until a
    /// spawn succeeds again.
    pub resource_error: Option<String>,
    /// Process groups that reaped workers left behind, and when they get SIGKILL.
    leftovers: BTreeMap<i32, Instant>,
    last_ready_at: Option<Instant>,
    next_ping: Option<Instant>,
    last_status: String,
    /// The recycle under way (one at a time), those waiting for it, and when workers'
    /// memory is measured next (`--max-memory`).
    pub recycle: Option<Recycle>,
    recycle_queue: Vec<(usize, WorkerId, RecycleWhy)>,
    next_measure: Option<Instant>,
    /// `--agent`: its processes and restart bookkeeping.
    pub agent: Option<Agent>,
    /// The workers have been started (with an agent, only once it is ready).
    pool_started: bool,
    out: Vec<Action>,
    manager: Vec<ManagerMsg>,
}

impl Pool {
    pub fn new(cfg: PoolConfig, now: Instant) -> Self {
        let next_ping = cfg.manager_watchdog.map(|_| now);
        let workers = cfg.workers.clamp(1, MAX_WORKERS);
        let agent = cfg.agent.as_ref().map(|_| Agent::new(&cfg));
        Pool {
            agent,
            pool_started: false,
            slots: (0..workers).map(|_| Slot::new(&cfg)).collect(),
            cfg,
            counters: Counters::default(),
            workers: BTreeMap::new(),
            pids: BTreeMap::new(),
            next_id: 1,
            generation: 1,
            reloading: false,
            last_reload: None,
            phase: Phase::Running,
            started_at: now,
            announced_ready: false,
            killed_any: false,
            gave_up: None,
            resource_error: None,
            leftovers: BTreeMap::new(),
            last_ready_at: None,
            next_ping,
            last_status: String::new(),
            recycle: None,
            recycle_queue: Vec::new(),
            next_measure: None,
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
            Event::SpawnFailed {
                id,
                code,
                reason,
                blame,
            } => self.spawn_failed(id, code, reason, blame, now),
            Event::Reaped(batch) => self.reaped(batch, now),
            Event::Message { id, msg } => self.message(id, msg, now),
            Event::Request(r) => self.request(r, now),
            Event::Tick => self.tick(now),
            Event::Resumed => self.resumed(now),
            Event::Measured(batch) => self.measured(batch, now),
            Event::QueueEmpty { id } => self.queue_empty(id, now),
        }
        self.advance_recycle(now);
        self.flush(now)
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

    /// Per slot: whether its current worker is ready, so that new connections should reach
    /// it (what `--reuseport` steering follows, src/steer/).
    pub fn serving_slots(&self) -> Vec<bool> {
        let ready = |id: &WorkerId| {
            self.workers
                .get(id)
                .is_some_and(|w| w.state == State::Ready)
        };
        self.slots
            .iter()
            .map(|s| s.current.as_ref().is_some_and(ready))
            .collect()
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
        self.phase == Phase::Running && self.ready_count() >= self.min_ready() && self.agent_ok()
    }

    /// The worker (or agent process) with this pid.
    pub fn worker_of_pid(&self, pid: i32) -> Option<WorkerId> {
        self.pids.get(&pid).copied()
    }

    /// The pid of a worker or agent process, while it runs.
    pub fn pid_of(&self, id: WorkerId) -> Option<i32> {
        match self.workers.get(&id) {
            Some(w) => w.pid,
            None => self.agent.as_ref()?.procs.get(&id)?.pid,
        }
    }

    /// Restarts within `--restart-window`, over all slots.
    pub fn recent_restarts(&self, now: Instant) -> usize {
        self.slots.iter().map(|s| s.throttle.recent(now)).sum()
    }

    // --- starting workers ---------------------------------------------------------------

    fn start(&mut self, now: Instant) {
        // Tell systemd a start may take up to --ready-timeout for each stage that waits for
        // READY=1: the agent's, then the workers' (sd_notify(3) EXTEND_TIMEOUT_USEC).
        let agent_waits = self
            .cfg
            .agent
            .as_ref()
            .is_some_and(|a| a.ready == ReadyMode::Notify);
        let stages = u32::from(self.cfg.ready == ReadyMode::Notify) + u32::from(agent_waits);
        if stages > 0 {
            self.manager.push(ManagerMsg::ExtendTimeout(
                (self.cfg.ready_timeout * stages).saturating_add(Duration::from_secs(5)),
            ));
        }
        if self.agent.is_some() {
            info!("starting the agent");
            self.spawn_agent(now);
        } else {
            self.start_pool(now);
        }
    }

    /// The workers, every slot at once (after the agent, when there is one).
    fn start_pool(&mut self, now: Instant) {
        self.pool_started = true;
        info!(
            workers = self.slots.len(),
            "starting the pool: {} workers",
            self.slots.len()
        );
        for slot in 0..self.slots.len() {
            self.spawn(slot, now);
        }
    }

    /// A new worker for `slot`: its current one if it has none, else its replacement.
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
            stop_when_spawned: None,
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
            return self.agent_spawned(id, pid, now);
        };
        w.pid = Some(pid);
        w.spawned_at = now;
        w.last_ping = now;
        w.state = State::Starting {
            deadline: later(now, self.cfg.ready_timeout),
        };
        let (slot, generation) = (w.slot, w.generation);
        let pending = w.stop_when_spawned.take();
        self.pids.insert(pid, id);
        // That number names our worker now: a group an earlier worker left under it is gone.
        self.leftovers.remove(&pid);
        if self.resource_error.take().is_some() {
            info!("herder can start workers again");
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.resource_failures = 0;
        }
        info!(
            slot,
            pid, generation, "worker {slot} (pid {pid}) spawned, generation {generation}"
        );
        match pending {
            Some(Stop::Drain(why)) => return self.stop_worker(id, why, now),
            Some(Stop::Kill(why)) => return self.kill(id, why),
            None => {}
        }
        if !self.phase.serving() {
            // Spawned as the stop began: drain it like the others.
            self.stop_worker(id, StopWhy::Drain, now);
            return;
        }
        if self.cfg.ready == ReadyMode::Exec {
            self.became_ready(id, now);
        }
    }

    fn became_ready(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.state = State::Ready;
        w.ready_at = Some(now);
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        info!(slot, pid, "worker {slot} (pid {pid}) ready");
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
        self.announce_if_ready();
    }

    /// READY=1 to systemd, once: when enough workers (and the agent) first are.
    fn announce_if_ready(&mut self) {
        if !self.announced_ready && !self.reloading && self.is_ready() {
            self.announced_ready = true;
            let ready = self.ready_count();
            info!(ready, "pool ready: {ready}/{} workers", self.slots.len());
            self.manager.push(ManagerMsg::Ready);
        }
    }

    /// A message from a worker or the agent.
    fn message(&mut self, id: WorkerId, msg: WorkerMsg, now: Instant) {
        let is_agent = !self.workers.contains_key(&id);
        let Some(w) = process_mut(&mut self.workers, &mut self.agent, id) else {
            return;
        };
        let (slot, pid, who) = (w.slot, w.pid.unwrap_or(0), who(w, is_agent));
        let slot = (!is_agent).then_some(slot);
        let stopping = matches!(w.state, State::Stopping { .. });
        match msg {
            WorkerMsg::Ready => {
                if matches!(w.state, State::Starting { .. }) {
                    if is_agent {
                        self.agent_became_ready(id, now);
                    } else {
                        self.became_ready(id, now);
                    }
                }
            }
            WorkerMsg::Watchdog => w.last_ping = now,
            WorkerMsg::Status(s) => w.status = Some(s),
            WorkerMsg::Errno(e) => w.errno = Some(e),
            WorkerMsg::WatchdogTrigger if stopping => {
                debug!(
                    slot,
                    pid, "{who} sent WATCHDOG=trigger while stopping: ignored"
                );
            }
            WorkerMsg::WatchdogTrigger => {
                warn!(
                    slot,
                    pid, "{who} asked for a watchdog failure (WATCHDOG=trigger)"
                );
                self.watchdog_failed(id, now);
            }
            WorkerMsg::Stopping if is_agent => self.agent_retiring(id, now),
            WorkerMsg::Stopping => self.retiring(id, now),
        }
    }

    /// The first event of an image that took the pool over: systemd hears READY=1 (ending
    /// the RELOADING=1 the old image sent), a fresh STATUS= and a watchdog ping at once.
    fn resumed(&mut self, now: Instant) {
        info!(
            workers = self.workers.len(),
            generation = self.generation,
            "took over the pool from the previous herder: {} workers, generation {}",
            self.workers.len(),
            self.generation
        );
        self.last_status.clear();
        if self.announced_ready {
            self.manager.push(ManagerMsg::Ready);
        }
        if let Some(iv) = self.cfg.manager_watchdog {
            self.manager.push(ManagerMsg::Watchdog);
            self.next_ping = Some(later(now, iv / 2));
        }
    }

    // --- reporting ----------------------------------------------------------------------

    fn flush(&mut self, now: Instant) -> Vec<Action> {
        let status = crate::status::status_line(self, now);
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

/// The worker (or agent process) `id`, from the pool's workers or the agent's (a free function,
/// so that the caller can push actions to the pool's other fields while holding it).
fn process_mut<'a>(
    workers: &'a mut BTreeMap<WorkerId, Worker>,
    agent: &'a mut Option<Agent>,
    id: WorkerId,
) -> Option<&'a mut Worker> {
    match workers.get_mut(&id) {
        Some(w) => Some(w),
        None => agent.as_mut()?.procs.get_mut(&id),
    }
}

/// How log lines name a process: "worker 2 (pid 124)", "agent (pid 99)".
fn who(w: &Worker, is_agent: bool) -> String {
    let pid = w.pid.unwrap_or(0);
    if is_agent {
        format!("agent (pid {pid})")
    } else {
        format!("worker {} (pid {pid})", w.slot)
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
