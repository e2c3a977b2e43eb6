//! What herder reports about itself: the JSON document behind `/status` (and `herder status`),
//! built from the pool's state on request, with the memory and CPU sampled for it
//! ([`PoolUsage`]). Read-only: nothing here changes the pool.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::listen::SocketSet;
use crate::pool::{fmt_dur, Phase, Pool, ReloadOutcome, State, StopWhy, Worker, WorkerId};
use crate::supervisor::Record;
use crate::usage::{percent_since_start, PoolUsage};

/// The version of this document's shape; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// herder's state: the one description behind `/status`, `/readyz`, `/metrics` and the
/// `STATUS=` line systemd shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HerderState {
    Starting,
    Ready,
    Reloading,
    LameDuck,
    Draining,
    GivingUp,
    Stopping,
    Exited,
}

impl HerderState {
    pub fn word(self) -> &'static str {
        match self {
            HerderState::Starting => "starting",
            HerderState::Ready => "ready",
            HerderState::Reloading => "reloading",
            HerderState::LameDuck => "lame-duck",
            HerderState::Draining => "draining",
            HerderState::GivingUp => "giving-up",
            HerderState::Stopping => "stopping",
            HerderState::Exited => "exited",
        }
    }
}

pub fn herder_state(pool: &Pool) -> HerderState {
    match pool.phase {
        Phase::Running if pool.reloading => HerderState::Reloading,
        Phase::Running if pool.is_ready() => HerderState::Ready,
        Phase::Running => HerderState::Starting,
        Phase::LameDuck { .. } => HerderState::LameDuck,
        Phase::Draining { .. } if pool.gave_up.is_some() => HerderState::GivingUp,
        Phase::Draining { .. } => HerderState::Draining,
        Phase::Killing { .. } => HerderState::Stopping,
        Phase::Exited => HerderState::Exited,
    }
}

/// The one-line `STATUS=` that `systemctl status` shows.
pub fn status_line(pool: &Pool, now: Instant) -> String {
    let (ready, n) = (pool.ready_count(), pool.slots.len());
    let state = herder_state(pool);
    let line = match (state, &pool.gave_up) {
        (HerderState::LameDuck, _) => {
            format!("shutting down: not ready, {ready}/{n} workers still serving")
        }
        (HerderState::GivingUp | HerderState::Stopping | HerderState::Exited, Some(why)) => {
            format!("gave up: {why}")
        }
        (HerderState::Draining | HerderState::Stopping | HerderState::Exited, _)
        | (HerderState::GivingUp, None) => {
            format!("draining: {} workers left", pool.workers.len())
        }
        (HerderState::Reloading, _) => {
            let done = pool
                .slots
                .iter()
                .filter_map(|s| s.current)
                .filter_map(|id| pool.workers.get(&id))
                .filter(|w| w.generation == pool.generation)
                .count();
            format!("reloading: {done}/{n} workers replaced, {ready}/{n} ready")
        }
        (HerderState::Starting | HerderState::Ready, _) => {
            let restarts = pool.recent_restarts(now);
            let window = fmt_dur(pool.config().restart_window);
            let base =
                format!("{ready}/{n} workers ready, {restarts} restarts in the last {window}");
            match &pool.last_reload {
                Some(ReloadOutcome::Failed { why, .. }) => format!("reload failed: {why}; {base}"),
                _ => base,
            }
        }
    };
    let line = match &pool.resource_error {
        Some(e) if pool.phase.serving() => {
            format!("{line}; herder cannot start workers: {e} (retrying)")
        }
        _ => line,
    };
    match agent_phrase(pool) {
        Some(a) => format!("{line}; {a}"),
        None => line,
    }
}

/// The agent in a few words for `STATUS=`: "agent ready", "agent down (exit status 1),
/// restarting", … (`None`: no agent).
fn agent_phrase(pool: &Pool) -> Option<String> {
    let agent = pool.agent.as_ref()?;
    let phrase = match agent.shown() {
        Some(w) if w.state == State::Ready => "agent ready".to_string(),
        Some(w) => format!("agent {}", worker_state(w)),
        None if agent.slot.backoff_until.is_some() => format!(
            "agent down ({}), restarting",
            agent.slot.last_exit.as_deref().unwrap_or("not started")
        ),
        None => "agent stopped".to_string(),
    };
    Some(phrase)
}

/// The agent's part of the status document (`null` without `--agent`); the supervisor adds
/// its socket.
fn agent_json(pool: &Pool, usage: &PoolUsage, now: Instant) -> Value {
    let Some(agent) = &pool.agent else {
        return Value::Null;
    };
    let shown = agent.shown();
    let state = match shown {
        Some(w) => worker_state(w),
        None if agent.slot.backoff_until.is_some() => "backoff",
        None => "down",
    };
    let age = shown.map(|w| now.saturating_duration_since(w.spawned_at));
    let mut v = json!({
        "pid": shown.and_then(|w| w.pid),
        "state": state,
        "ready": agent.ready(),
        "required": pool.config().agent.as_ref().is_some_and(|c| c.required),
        "socket": Value::Null,
        "generation": shown.map(|w| w.generation),
        "uptime_s": age.map(|a| round(a.as_secs_f64())),
        "restarts": agent.slot.restarts,
        "last_exit": agent.slot.last_exit,
        "backoff_ms": agent.slot.backoff_until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
        "status": shown.and_then(|w| w.status.clone()),
        "replacement": agent.slot.next.and_then(|id| agent.procs.get(&id)).map(|w| w.pid),
    });
    usage_fields(
        &mut v,
        usage,
        shown.and_then(|w| w.pid),
        age.unwrap_or_default(),
    );
    v
}

/// A worker's state as one word: starting, ready, leaving (a removed slot's, still accepting
/// its queue), draining, stopping (killed or aborted).
pub fn worker_state(w: &Worker) -> &'static str {
    match w.state {
        State::Spawning | State::Starting { .. } => "starting",
        State::Ready => "ready",
        State::Leaving { .. } => "leaving",
        State::Stopping {
            why: StopWhy::Drain | StopWhy::Retiring,
            kill_at: Some(_),
        } => "draining",
        State::Stopping { .. } => "stopping",
    }
}

/// The memory and CPU fields of a worker (`null` when it could not be measured). CPU % is
/// over the interval since the previous sample; on a worker's first, since it started.
fn usage_fields(v: &mut Value, usage: &PoolUsage, pid: Option<i32>, age: Duration) {
    let u = usage.of(pid);
    v["memory_bytes"] = json!(u.map(|u| u.pss_bytes));
    v["cpu_seconds"] = json!(u.map(|u| round(u.cpu_seconds_total)));
    v["cpu_percent"] = json!(u.and_then(|u| u
        .cpu_percent
        .or_else(|| percent_since_start(u.cpu_seconds_total, age))
        .map(round1)));
    v["processes"] = json!(u.map(|u| u.processes));
}

fn worker_json(pool: &Pool, usage: &PoolUsage, id: WorkerId, now: Instant) -> Value {
    let Some(w) = pool.workers.get(&id) else {
        return Value::Null;
    };
    let age = now.saturating_duration_since(w.spawned_at);
    let mut v = json!({
        "pid": w.pid,
        "state": worker_state(w),
        "generation": w.generation,
        "uptime_s": round(age.as_secs_f64()),
        "status": w.status,
    });
    usage_fields(&mut v, usage, w.pid, age);
    v
}

fn round(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

fn round1(p: f64) -> f64 {
    (p * 10.0).round() / 10.0
}

pub fn status_json(
    pool: &Pool,
    sockets: &SocketSet,
    upgrades: &Record,
    usage: &PoolUsage,
    now: Instant,
) -> Value {
    let slots: Vec<Value> = pool
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let current = s.current.map(|id| worker_json(pool, usage, id, now));
            let state = match (&current, s.backoff_until) {
                (Some(c), _) => c["state"].clone(),
                (None, Some(_)) => json!("backoff"),
                (None, None) => json!("empty"),
            };
            let of_current = |k: &str| current.as_ref().map(|c| c[k].clone());
            json!({
                "slot": i,
                "pid": of_current("pid"),
                "state": state,
                "uptime_s": of_current("uptime_s"),
                "generation": of_current("generation"),
                "restarts": s.restarts,
                "last_exit": s.last_exit,
                "backoff_ms": s.backoff_until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                "worker_status": of_current("status"),
                "memory_bytes": of_current("memory_bytes"),
                "cpu_seconds": of_current("cpu_seconds"),
                "cpu_percent": of_current("cpu_percent"),
                "processes": of_current("processes"),
                "replacement": s.next.map(|id| worker_json(pool, usage, id, now)),
            })
        })
        .collect();
    // Workers no slot points at: old generations draining, removed slots, retiring ones.
    // A set, so that the document costs O(workers), not O(workers²).
    let in_slots: HashSet<WorkerId> = pool
        .slots
        .iter()
        .flat_map(|s| [s.current, s.next])
        .flatten()
        .collect();
    let others: Vec<Value> = pool
        .workers
        .iter()
        .filter(|(id, _)| !in_slots.contains(*id))
        .map(|(&id, w)| {
            let mut v = worker_json(pool, usage, id, now);
            v["slot"] = json!(w.slot);
            v
        })
        .collect();
    let last_reload = match &pool.last_reload {
        None => Value::Null,
        Some(ReloadOutcome::Succeeded { generation }) => {
            json!({"generation": generation, "result": "succeeded"})
        }
        Some(ReloadOutcome::Failed { generation, why }) => {
            json!({"generation": generation, "result": "failed", "reason": why})
        }
    };
    let sockets: Vec<Value> = sockets
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| json!({"fd": 3 + i, "name": l.name, "address": l.display}))
        .collect();
    json!({
        "format": FORMAT_VERSION,
        "herder": {
            "version": crate::upgrade::version(),
            "upgrades": upgrades.succeeded,
            "upgrades_failed": upgrades.failed,
            "last_upgrade": upgrades.last.as_ref().map(|(at, from)| {
                let unix_now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                json!({"from": from, "at_unix": at, "ago_s": unix_now.saturating_sub(*at)})
            }),
            "pid": std::process::id(),
            "state": herder_state(pool).word(),
            "ready": pool.is_ready(),
            "uptime_s": round(now.saturating_duration_since(pool.started_at).as_secs_f64()),
            "generation": pool.generation,
            "workers": pool.slots.len(),
            "ready_workers": pool.ready_count(),
            "min_ready": pool.min_ready(),
            "restarts_total": pool.counters.restarts,
            "recycles_total": pool.counters.recycles,
            "recycling": pool.recycle.map(|r| json!({"slot": r.slot, "reason": r.why.name()})),
            "last_reload": last_reload,
            "gave_up": pool.gave_up,
            "resource_error": pool.resource_error,
            "memory_bytes": usage.herder.map(|h| h.rss_bytes),
            "cpu_seconds": usage.herder.map(|h| round(h.cpu_seconds_total)),
            "cpu_percent": usage.herder.and_then(|h| h
                .cpu_percent
                .or_else(|| percent_since_start(
                    h.cpu_seconds_total,
                    now.saturating_duration_since(pool.started_at),
                ))
                .map(round1)),
        },
        "sockets": sockets,
        "slots": slots,
        "other_workers": others,
        "agent": agent_json(pool, usage, now),
    })
}
