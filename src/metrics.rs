//! `/metrics` in the Prometheus text format, built from the pool's counters and the usage
//! sampled for the scrape (the `prometheus-client` crate does the encoding). Read-only.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::pool::{Pool, EXIT_REASONS, RECYCLE_REASONS};
use crate::status::{herder_state, worker_state};
use crate::supervisor::Record;
use crate::usage::PoolUsage;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

pub fn render(pool: &Pool, upgrades: &Record, usage: &PoolUsage) -> String {
    let mut root = Registry::default();
    let reg = root.sub_registry_with_prefix("herder");

    let by_state = Family::<Labels, Gauge>::default();
    for state in ["starting", "ready", "leaving", "draining", "stopping"] {
        by_state.get_or_create(&label("state", state)).set(0);
    }
    for w in pool.workers.values() {
        by_state
            .get_or_create(&label("state", worker_state(w)))
            .inc();
    }
    let backoff = pool
        .slots
        .iter()
        .filter(|s| s.current.is_none() && s.backoff_until.is_some())
        .count();
    by_state
        .get_or_create(&label("state", "backoff"))
        .set(backoff as i64);
    reg.register(
        "workers",
        "Workers by state (backoff: slots waiting to restart)",
        by_state,
    );

    let configured = Gauge::<i64>::default();
    configured.set(pool.slots.len() as i64);
    reg.register("pool_size", "Worker slots configured", configured);

    let ready = Gauge::<i64>::default();
    ready.set(pool.is_ready() as i64);
    reg.register("ready", "1 when the pool is ready (as /readyz)", ready);

    let generation = Gauge::<i64>::default();
    generation.set(pool.generation as i64);
    reg.register(
        "generation",
        "Current worker generation (incremented by each reload)",
        generation,
    );

    let state = Family::<Labels, Gauge>::default();
    state
        .get_or_create(&label("state", herder_state(pool).word()))
        .set(1);
    reg.register("state", "herder's own state", state);

    let c = &pool.counters;
    let restarts = Counter::<u64>::default();
    restarts.inc_by(c.restarts);
    reg.register(
        "restarts",
        "Workers restarted after an unexpected exit",
        restarts,
    );

    if let Some(agent) = &pool.agent {
        let up = Gauge::<i64>::default();
        up.set(agent.ready() as i64);
        reg.register("agent_ready", "1 when the agent (--agent) is ready", up);
        let restarts = Counter::<u64>::default();
        restarts.inc_by(c.agent_restarts);
        reg.register(
            "agent_restarts",
            "Agent restarts after it exited (apart from the workers' restarts)",
            restarts,
        );
    }

    let reloads = Family::<Labels, Counter>::default();
    reloads
        .get_or_create(&label("result", "succeeded"))
        .inc_by(c.reloads_succeeded);
    reloads
        .get_or_create(&label("result", "failed"))
        .inc_by(c.reloads_failed);
    reg.register("reloads", "Rolling reloads by result", reloads);

    let exits = Family::<Labels, Counter>::default();
    for reason in EXIT_REASONS {
        exits.get_or_create(&label("reason", reason)).inc_by(0);
    }
    for (reason, n) in &c.exits {
        exits.get_or_create(&label("reason", reason)).inc_by(*n);
    }
    reg.register("worker_exits", "Worker exits by reason", exits);

    let recycles = Family::<Labels, Counter>::default();
    for reason in RECYCLE_REASONS {
        recycles.get_or_create(&label("reason", reason)).inc_by(0);
    }
    for (reason, n) in &c.recycles {
        recycles.get_or_create(&label("reason", reason)).inc_by(*n);
    }
    reg.register(
        "recycles",
        "Workers recycled (replaced, then drained) by reason: --max-memory, --max-lifetime",
        recycles,
    );

    let give_ups = Counter::<u64>::default();
    give_ups.inc_by(c.give_ups);
    reg.register("give_ups", "Times herder gave up on a crash loop", give_ups);

    let up = Family::<Labels, Counter>::default();
    up.get_or_create(&label("result", "succeeded"))
        .inc_by(upgrades.succeeded);
    up.get_or_create(&label("result", "failed"))
        .inc_by(upgrades.failed);
    reg.register(
        "upgrades",
        "In-place upgrades of herder (herder upgrade) by result",
        up,
    );

    let short = Counter::<u64>::default();
    short.inc_by(c.resource_failures);
    reg.register(
        "resource_failures",
        "Worker starts that failed for want of herder's own resources (fds, memory, processes)",
        short,
    );

    register_usage(reg, pool, usage);
    register_process(&mut root, usage);

    let mut out = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut out, &root);
    out
}

/// Per slot, the memory and CPU of the worker serving it (its replacement and old generations
/// are not a slot's series); a worker that could not be measured has none.
fn register_usage(reg: &mut Registry, pool: &Pool, usage: &PoolUsage) {
    let memory = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    for (i, slot) in pool.slots.iter().enumerate() {
        let worker = slot.current.and_then(|id| pool.workers.get(&id));
        let Some(u) = worker.and_then(|w| usage.of(w.pid)) else {
            continue;
        };
        let slot = label("slot", &i.to_string());
        memory
            .get_or_create(&slot)
            .set(i64::try_from(u.pss_bytes).unwrap_or(i64::MAX));
        cpu.get_or_create(&slot).inc_by(u.cpu_seconds_total);
    }
    reg.register_with_unit(
        "worker_memory",
        "PSS of each slot's worker and its descendants",
        Unit::Bytes,
        memory,
    );
    reg.register_with_unit(
        "worker_cpu",
        "CPU time (user and system) of each slot's worker and its descendants",
        Unit::Seconds,
        cpu,
    );
}

/// herder's own, under the names of Prometheus' standard process metrics.
fn register_process(root: &mut Registry, usage: &PoolUsage) {
    let Some(h) = usage.herder else {
        return;
    };
    let rss = Gauge::<i64>::default();
    rss.set(i64::try_from(h.rss_bytes).unwrap_or(i64::MAX));
    root.register_with_unit(
        "process_resident_memory",
        "Resident memory size of herder itself",
        Unit::Bytes,
        rss,
    );
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(h.cpu_seconds_total);
    root.register_with_unit(
        "process_cpu",
        "User and system CPU time spent by herder itself",
        Unit::Seconds,
        cpu,
    );
}
