//! The pool as it crosses an in-place upgrade (`herder upgrade`): every slot, worker, restart
//! history, counter and pending deadline, in a versioned, tolerant form (serde; unknown fields
//! are ignored and missing ones take their defaults, so that one format can grow). Pure data
//! and arithmetic: the fds, the file and the exec are `upgrade`'s.
//!
//! An `Instant` travels as signed nanoseconds from the moment the snapshot was taken. The
//! monotonic clock goes on across `execve`, so the new image puts every deadline back at the
//! same moment: it only needs to know when, on its own clock, that moment was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{
    later, Counters, Phase, Pool, PoolConfig, Recycle, RecycleWhy, ReloadOutcome, Slot, State,
    StopWhy, Worker,
};
use super::{WorkerId, EXIT_REASONS, MAX_WORKERS, RECYCLE_REASONS};
use crate::throttle::Throttle;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoolSnapshot {
    pub next_id: u64,
    pub generation: u64,
    pub last_reload: Option<ReloadSnapshot>,
    pub started_at: i64,
    pub announced_ready: bool,
    pub killed_any: bool,
    pub resource_error: Option<String>,
    /// (pgid, when it gets SIGKILL)
    pub leftovers: Vec<(i32, i64)>,
    pub last_ready_at: Option<i64>,
    pub counters: CountersSnapshot,
    pub slots: Vec<SlotSnapshot>,
    pub workers: Vec<WorkerSnapshot>,
    /// The recycle under way (`--max-memory`, `--max-lifetime`). What was only queued is not
    /// carried: the new image finds it due again.
    pub recycle: Option<RecycleSnapshot>,
    /// `--agent`: its processes and restart bookkeeping.
    pub agent: Option<AgentSnapshot>,
    /// The workers have not been started yet (the agent is not ready): `false` from an
    /// older image, whose pool always was.
    pub pool_waiting: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentSnapshot {
    pub procs: Vec<WorkerSnapshot>,
    /// Its processes and restart bookkeeping, as a slot's.
    pub slot: SlotSnapshot,
    pub generation: u64,
    pub settled: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecycleSnapshot {
    pub slot: usize,
    pub old: u64,
    pub new: u64,
    /// `memory` (with `bytes`) or `lifetime`.
    pub why: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadSnapshot {
    pub generation: u64,
    pub succeeded: bool,
    pub why: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CountersSnapshot {
    pub restarts: u64,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub give_ups: u64,
    pub resource_failures: u64,
    pub exits: BTreeMap<String, u64>,
    pub recycles: BTreeMap<String, u64>,
    pub agent_restarts: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotSnapshot {
    pub current: Option<u64>,
    pub next: Option<u64>,
    pub backoff_until: Option<i64>,
    pub failures: u32,
    pub resource_failures: u32,
    pub restarts: u32,
    pub throttle: Vec<i64>,
    pub last_exit: Option<String>,
    pub recycle_after: Option<i64>,
    pub recycle_failures: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSnapshot {
    pub id: u64,
    pub slot: usize,
    pub generation: u64,
    pub pid: i32,
    /// `starting`, `ready` or `stopping`.
    pub state: String,
    /// Starting: the ready deadline; leaving: when it drains even if its queue is not empty;
    /// stopping: when SIGKILL is due (`None`: already killed).
    pub deadline: Option<i64>,
    /// Stopping: why (as [`why_name`] spells it).
    pub why: Option<String>,
    pub spawned_at: i64,
    pub ready_at: Option<i64>,
    pub last_ping: i64,
    pub status: Option<String>,
    pub errno: Option<i32>,
}

/// Nanoseconds from `base` to `t` (negative: before it), saturating.
fn enc(t: Instant, base: Instant) -> i64 {
    if t >= base {
        i64::try_from(t.duration_since(base).as_nanos()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(base.duration_since(t).as_nanos()).unwrap_or(i64::MAX)
    }
}

/// The inverse of [`enc`], never panicking: an instant out of range lands at `base`.
fn dec(off: i64, base: Instant) -> Instant {
    let d = Duration::from_nanos(off.unsigned_abs());
    if off >= 0 {
        later(base, d)
    } else {
        base.checked_sub(d).unwrap_or(base)
    }
}

fn why_name(w: StopWhy) -> &'static str {
    match w {
        StopWhy::Drain => "drain",
        StopWhy::Retiring => "retiring",
        StopWhy::RetiredEarly => "retired_early",
        StopWhy::Watchdog => "watchdog",
        StopWhy::ReadyTimeout => "ready_timeout",
        StopWhy::Superseded => "superseded",
        StopWhy::Killed => "killed",
    }
}

fn why_from(s: &str) -> StopWhy {
    match s {
        "retiring" => StopWhy::Retiring,
        "retired_early" => StopWhy::RetiredEarly,
        "watchdog" => StopWhy::Watchdog,
        "ready_timeout" => StopWhy::ReadyTimeout,
        "superseded" => StopWhy::Superseded,
        "killed" => StopWhy::Killed,
        // A reason a newer herder invented: drain it, the mildest way out.
        _ => StopWhy::Drain,
    }
}

fn worker_snapshot(id: WorkerId, w: &Worker, base: Instant) -> WorkerSnapshot {
    let e = |t: Instant| enc(t, base);
    let (state, deadline, why) = match w.state {
        State::Spawning => ("starting", None, None),
        State::Starting { deadline } => ("starting", Some(e(deadline)), None),
        State::Ready => ("ready", None, None),
        State::Leaving { until } => ("leaving", Some(e(until)), None),
        State::Stopping { why, kill_at } => {
            ("stopping", kill_at.map(e), Some(why_name(why).to_string()))
        }
    };
    WorkerSnapshot {
        id,
        slot: w.slot,
        generation: w.generation,
        pid: w.pid.unwrap_or(0),
        state: state.into(),
        deadline,
        why,
        spawned_at: e(w.spawned_at),
        ready_at: w.ready_at.map(e),
        last_ping: e(w.last_ping),
        status: w.status.clone(),
        errno: w.errno,
    }
}

/// A worker (or agent process) of the snapshot; `None` without a pid.
fn worker_restored(
    w: WorkerSnapshot,
    base: Instant,
    now: Instant,
    cfg: &PoolConfig,
) -> Option<Worker> {
    let d = |off: i64| dec(off, base);
    if w.pid <= 0 {
        return None;
    }
    let state = match w.state.as_str() {
        "ready" => State::Ready,
        // (An older image takes "leaving" for starting: its --ready-timeout ends it.)
        "leaving" => State::Leaving {
            until: w.deadline.map_or(now, d),
        },
        "stopping" => State::Stopping {
            why: why_from(w.why.as_deref().unwrap_or("drain")),
            kill_at: w.deadline.map(d),
        },
        _ => State::Starting {
            deadline: w.deadline.map_or_else(|| later(now, cfg.ready_timeout), d),
        },
    };
    Some(Worker {
        slot: w.slot,
        generation: w.generation,
        pid: Some(w.pid),
        state,
        spawned_at: d(w.spawned_at),
        ready_at: w.ready_at.map(d),
        last_ping: d(w.last_ping),
        status: w.status,
        errno: w.errno,
        stop_when_spawned: None,
    })
}

fn slot_snapshot(s: &Slot, base: Instant) -> SlotSnapshot {
    let e = |t: Instant| enc(t, base);
    SlotSnapshot {
        current: s.current,
        next: s.next,
        backoff_until: s.backoff_until.map(e),
        failures: s.failures,
        resource_failures: s.resource_failures,
        restarts: s.restarts,
        throttle: s.throttle.history().map(e).collect(),
        last_exit: s.last_exit.clone(),
        recycle_after: s.recycle_after.map(e),
        recycle_failures: s.recycle_failures,
    }
}

/// A slot (or the agent's bookkeeping) of the snapshot; `exists` says which process ids came
/// across. One left empty without a pending backoff is refilled at once.
fn slot_restored(
    s: SlotSnapshot,
    cfg: &PoolConfig,
    base: Instant,
    now: Instant,
    exists: impl Fn(WorkerId) -> bool,
) -> Slot {
    let d = |off: i64| dec(off, base);
    let named = |id: Option<WorkerId>| id.filter(|&i| exists(i));
    let current = named(s.current);
    Slot {
        current,
        next: named(s.next),
        backoff_until: s
            .backoff_until
            .map(d)
            .or_else(|| current.is_none().then_some(now)),
        failures: s.failures,
        resource_failures: s.resource_failures,
        restarts: s.restarts,
        throttle: Throttle::with_history(
            cfg.restart_limit,
            cfg.restart_window,
            s.throttle.into_iter().map(d).collect(),
        ),
        last_exit: s.last_exit,
        recycle_after: s.recycle_after.map(d),
        recycle_failures: s.recycle_failures,
    }
}

impl Pool {
    /// Whether the pool can cross an exec now; `Err` says why not. Only a running pool with
    /// no reload under way and no worker spawning does: there is nothing half-done to carry.
    pub fn can_snapshot(&self) -> Result<(), String> {
        match self.phase {
            Phase::Running if self.reloading => {
                return Err("a reload is under way: upgrade after it".into())
            }
            Phase::Running => {}
            _ => return Err("herder is stopping".into()),
        }
        if self.workers.values().any(|w| w.state == State::Spawning) {
            return Err("a worker is being spawned".into());
        }
        let agent = self.agent.iter().flat_map(|a| a.procs.values());
        if agent.clone().any(|w| w.state == State::Spawning) {
            return Err("the agent is being spawned".into());
        }
        Ok(())
    }

    pub fn snapshot(&self, base: Instant) -> PoolSnapshot {
        let e = |t: Instant| enc(t, base);
        let workers = self
            .workers
            .iter()
            .map(|(&id, w)| worker_snapshot(id, w, base))
            .collect();
        let slots = self.slots.iter().map(|s| slot_snapshot(s, base)).collect();
        let c = &self.counters;
        PoolSnapshot {
            next_id: self.next_id,
            generation: self.generation,
            last_reload: self.last_reload.as_ref().map(|r| match r {
                ReloadOutcome::Succeeded { generation } => ReloadSnapshot {
                    generation: *generation,
                    succeeded: true,
                    why: String::new(),
                },
                ReloadOutcome::Failed { generation, why } => ReloadSnapshot {
                    generation: *generation,
                    succeeded: false,
                    why: why.clone(),
                },
            }),
            started_at: e(self.started_at),
            announced_ready: self.announced_ready,
            killed_any: self.killed_any,
            resource_error: self.resource_error.clone(),
            leftovers: self.leftovers.iter().map(|(&g, &t)| (g, e(t))).collect(),
            last_ready_at: self.last_ready_at.map(e),
            counters: CountersSnapshot {
                restarts: c.restarts,
                reloads_succeeded: c.reloads_succeeded,
                reloads_failed: c.reloads_failed,
                give_ups: c.give_ups,
                resource_failures: c.resource_failures,
                exits: c.exits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                recycles: c
                    .recycles
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                agent_restarts: c.agent_restarts,
            },
            slots,
            workers,
            recycle: self.recycle.map(|r| RecycleSnapshot {
                slot: r.slot,
                old: r.old,
                new: r.new,
                why: r.why.name().to_string(),
                bytes: match r.why {
                    RecycleWhy::Memory(b) => b,
                    RecycleWhy::Lifetime => 0,
                },
            }),
            agent: self.agent.as_ref().map(|a| AgentSnapshot {
                procs: a
                    .procs
                    .iter()
                    .map(|(&id, w)| worker_snapshot(id, w, base))
                    .collect(),
                slot: slot_snapshot(&a.slot, base),
                generation: a.generation,
                settled: a.settled,
            }),
            pool_waiting: !self.pool_started,
        }
    }

    /// The pool of an earlier image, taken over: `base` is the moment the snapshot was taken,
    /// on this image's clock. Workers whose pid is missing (0) are dropped; a slot that names
    /// a worker that is not there is left empty and refilled by the next tick.
    pub fn restore(cfg: PoolConfig, snap: PoolSnapshot, base: Instant, now: Instant) -> Pool {
        let d = |off: i64| dec(off, base);
        let mut pool = Pool::new(cfg, now);
        let mut workers = BTreeMap::new();
        let mut pids = BTreeMap::new();
        for w in snap.workers {
            let (id, pid) = (w.id, w.pid);
            if let Some(worker) = worker_restored(w, base, now, &pool.cfg) {
                pids.insert(pid, id);
                workers.insert(id, worker);
            }
        }
        let slots: Vec<Slot> = snap
            .slots
            .into_iter()
            .take(MAX_WORKERS)
            .map(|s| slot_restored(s, &pool.cfg, base, now, |id| workers.contains_key(&id)))
            .collect();
        if !slots.is_empty() {
            pool.slots = slots;
        }
        let exits = known(&snap.counters.exits, EXIT_REASONS);
        pool.counters = Counters {
            restarts: snap.counters.restarts,
            reloads_succeeded: snap.counters.reloads_succeeded,
            reloads_failed: snap.counters.reloads_failed,
            give_ups: snap.counters.give_ups,
            resource_failures: snap.counters.resource_failures,
            exits,
            recycles: known(&snap.counters.recycles, RECYCLE_REASONS),
            agent_restarts: snap.counters.agent_restarts,
        };
        pool.pool_started = !snap.pool_waiting;
        if let (Some(agent), Some(a)) = (pool.agent.as_mut(), snap.agent) {
            for w in a.procs {
                let (id, pid) = (w.id, w.pid);
                if let Some(worker) = worker_restored(w, base, now, &pool.cfg) {
                    pids.insert(pid, id);
                    agent.procs.insert(id, worker);
                }
            }
            // (An agent that is gone without a pending backoff is restarted at once.)
            let procs = &agent.procs;
            agent.slot = slot_restored(a.slot, &pool.cfg, base, now, |id| procs.contains_key(&id));
            agent.generation = a.generation.max(1);
            agent.settled = a.settled;
        } else if let Some(agent) = pool.agent.as_mut() {
            // The earlier image ran no agent: this one starts it now.
            agent.slot.backoff_until = Some(now);
            agent.settled = true;
        }
        let agent_max = pool
            .agent
            .as_ref()
            .and_then(|a| a.procs.keys().max().copied())
            .unwrap_or(0);
        pool.next_id = snap
            .next_id
            .max(workers.keys().max().map_or(1, |m| m + 1))
            .max(agent_max + 1);
        pool.workers = workers;
        pool.pids = pids;
        pool.generation = snap.generation.max(1);
        pool.last_reload = snap.last_reload.map(|r| {
            if r.succeeded {
                ReloadOutcome::Succeeded {
                    generation: r.generation,
                }
            } else {
                ReloadOutcome::Failed {
                    generation: r.generation,
                    why: r.why,
                }
            }
        });
        pool.started_at = d(snap.started_at);
        pool.announced_ready = snap.announced_ready;
        pool.killed_any = snap.killed_any;
        pool.resource_error = snap.resource_error;
        pool.leftovers = snap.leftovers.into_iter().map(|(g, t)| (g, d(t))).collect();
        pool.last_ready_at = snap.last_ready_at.map(d);
        // The recycle under way, if both its workers came across.
        pool.recycle = snap.recycle.and_then(|r| {
            let why = match r.why.as_str() {
                "memory" => RecycleWhy::Memory(r.bytes),
                "lifetime" => RecycleWhy::Lifetime,
                _ => return None,
            };
            let slot = pool.slots.get(r.slot)?;
            let named = slot.current == Some(r.old) && slot.next == Some(r.new);
            named.then_some(Recycle {
                slot: r.slot,
                old: r.old,
                new: r.new,
                why,
            })
        });
        pool
    }
}

/// A counter map of the snapshot, with only the names this image counts by.
fn known(m: &BTreeMap<String, u64>, names: &[&'static str]) -> BTreeMap<&'static str, u64> {
    m.iter()
        .filter_map(|(k, v)| names.iter().find(|r| **r == k.as_str()).map(|r| (*r, *v)))
        .collect()
}
