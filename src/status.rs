//! What herder reports about itself: the JSON document behind `/status` (and `herder status`),
//! built from the pool's state on request. Read-only: nothing here changes the pool.

use std::collections::HashSet;
use std::time::Instant;

use serde_json::{json, Value};

use crate::listen::SocketSet;
use crate::pool::{Phase, Pool, ReloadOutcome, State, StopWhy, Worker, WorkerId};

/// The version of this document's shape; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// herder's state as one word.
pub fn herder_state(pool: &Pool) -> &'static str {
    match pool.phase {
        Phase::Running if pool.gave_up.is_some() => "giving-up",
        Phase::Running if pool.reloading => "reloading",
        Phase::Running if pool.is_ready() => "ready",
        Phase::Running => "starting",
        Phase::LameDuck { .. } => "lame-duck",
        Phase::Draining { .. } if pool.gave_up.is_some() => "giving-up",
        Phase::Draining { .. } => "draining",
        Phase::Killing { .. } => "stopping",
        Phase::Exited => "exited",
    }
}

/// A worker's state as one word: starting, ready, draining, stopping (killed or aborted).
pub fn worker_state(w: &Worker) -> &'static str {
    match w.state {
        State::Spawning | State::Starting { .. } => "starting",
        State::Ready => "ready",
        State::Stopping {
            why: StopWhy::Drain | StopWhy::Retiring,
            kill_at: Some(_),
        } => "draining",
        State::Stopping { .. } => "stopping",
    }
}

fn worker_json(pool: &Pool, id: WorkerId, now: Instant) -> Value {
    let Some(w) = pool.workers.get(&id) else {
        return Value::Null;
    };
    json!({
        "pid": w.pid,
        "state": worker_state(w),
        "generation": w.generation,
        "uptime_s": round(now.saturating_duration_since(w.spawned_at).as_secs_f64()),
        "status": w.status,
    })
}

fn round(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

pub fn status_json(pool: &Pool, sockets: &SocketSet, now: Instant) -> Value {
    let slots: Vec<Value> = pool
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let current = s.current.map(|id| worker_json(pool, id, now));
            let state = match (&current, s.backoff_until) {
                (Some(c), _) => c["state"].clone(),
                (None, Some(_)) => json!("backoff"),
                (None, None) => json!("empty"),
            };
            json!({
                "slot": i,
                "pid": current.as_ref().map(|c| c["pid"].clone()),
                "state": state,
                "uptime_s": current.as_ref().map(|c| c["uptime_s"].clone()),
                "generation": current.as_ref().map(|c| c["generation"].clone()),
                "restarts": s.restarts,
                "last_exit": s.last_exit,
                "backoff_ms": s.backoff_until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
                "worker_status": current.as_ref().map(|c| c["status"].clone()),
                "replacement": s.next.map(|id| worker_json(pool, id, now)),
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
            let mut v = worker_json(pool, id, now);
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
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "state": herder_state(pool),
            "ready": pool.is_ready(),
            "uptime_s": round(now.saturating_duration_since(pool.started_at).as_secs_f64()),
            "generation": pool.generation,
            "workers": pool.slots.len(),
            "ready_workers": pool.ready_count(),
            "min_ready": pool.min_ready(),
            "restarts_total": pool.counters.restarts,
            "last_reload": last_reload,
            "gave_up": pool.gave_up,
        },
        "sockets": sockets,
        "slots": slots,
        "other_workers": others,
    })
}
