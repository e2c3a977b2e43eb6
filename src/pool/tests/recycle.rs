//! Recycling (`--max-memory`, `--max-lifetime`): replace first, then drain; one at a time;
//! never below `--min-ready`; not a crash; staggered lifetimes.

use proptest::prelude::*;

use super::super::recycle::{lifetime_due, MEASURE_EVERY};
use super::*;

const MIB: u64 = 1 << 20;

fn measured(acts: &[Action]) -> Vec<(WorkerId, i32)> {
    acts.iter()
        .find_map(|a| match a {
            Action::Measure(w) => Some(w.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// A ready pool of `n` (notify mode) with `--max-memory 64M`.
fn memory_pool(n: usize) -> H {
    let mut c = cfg(n);
    c.ready = ReadyMode::Notify;
    c.max_memory = Some(64 * MIB);
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    h
}

impl H {
    /// Time passes to the next measurement; each worker of `big` slots reports `bytes`, the
    /// others 10 MiB.
    fn measure(&mut self, big: &[usize], bytes: u64) -> Vec<Action> {
        let mut acts = self.advance(MEASURE_EVERY);
        let mut asked = measured(&acts);
        for _ in 0..3 {
            if !asked.is_empty() {
                break;
            }
            acts = self.until_deadline();
            asked = measured(&acts);
        }
        assert!(!asked.is_empty(), "a measurement was asked for");
        let answer = asked
            .iter()
            .map(|&(id, _)| {
                let slot = self.pool.workers[&id].slot;
                (id, if big.contains(&slot) { bytes } else { 10 * MIB })
            })
            .collect();
        self.ev(Event::Measured(answer))
    }
}

#[test]
fn no_limit_no_measurement_and_no_wakeup() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    assert_eq!(h.pool.next_deadline(), None, "an idle pool sleeps");
}

#[test]
fn memory_is_measured_every_interval_and_only_for_ready_current_workers() {
    let mut h = memory_pool(3);
    let due = h.pool.next_deadline().expect("the next measurement");
    assert!(due <= h.now + MEASURE_EVERY);
    let acts = h.advance(MEASURE_EVERY);
    let asked = measured(&acts);
    assert_eq!(
        asked.iter().map(|&(_, pid)| pid).collect::<Vec<_>>(),
        h.pids()
    );
}

#[test]
fn a_worker_over_max_memory_is_replaced_first_then_drained_and_it_is_no_crash() {
    let mut h = memory_pool(2);
    let old = h.pids();
    let acts = h.measure(&[1], 100 * MIB);
    assert_eq!(spawns(&acts), 1, "its replacement starts");
    assert!(
        signals(&acts).is_empty(),
        "the old worker keeps serving meanwhile"
    );
    assert_eq!(h.pool.ready_count(), 2);
    let new = h.next_pid;
    let acts = h.msg(new, WorkerMsg::Ready);
    assert_eq!(
        signals(&acts),
        vec![(old[1], Signal::SIGTERM)],
        "then it drains"
    );
    assert_eq!(h.pids(), vec![old[0], new]);
    assert!(
        h.pool.recycle.is_some(),
        "under way until the old one has exited"
    );
    h.exit(old[1], TERMED);
    assert!(h.pool.recycle.is_none());
    assert_eq!(h.pool.counters.recycles.get("memory"), Some(&1));
    assert_eq!(h.pool.counters.restarts, 0, "a recycle is not a restart");
    assert_eq!(h.pool.slots[1].restarts, 0);
    assert_eq!(h.pool.slots[1].backoff_until, None);
    assert_eq!(h.pool.last_reload, None, "nor a reload");
}

#[test]
fn two_workers_over_the_limit_are_recycled_one_after_the_other() {
    let mut h = memory_pool(3);
    let old = h.pids();
    let acts = h.measure(&[0, 2], 100 * MIB);
    assert_eq!(spawns(&acts), 1, "one at a time");
    let first = h.next_pid;
    h.msg(first, WorkerMsg::Ready);
    // The second waits until the first recycle's old worker is gone.
    assert_eq!(h.pool.workers.len(), 4);
    let acts = h.exit(old[0], TERMED);
    assert_eq!(spawns(&acts), 1, "now the second");
    let second = h.next_pid;
    let acts = h.msg(second, WorkerMsg::Ready);
    assert_eq!(signals(&acts), vec![(old[2], Signal::SIGTERM)]);
    h.exit(old[2], TERMED);
    assert_eq!(h.pids(), vec![first, old[1], second]);
    assert_eq!(h.pool.counters.recycles.get("memory"), Some(&2));
}

#[test]
fn no_recycle_while_the_pool_is_below_min_ready() {
    let mut h = memory_pool(2);
    let old = h.pids();
    h.advance(Duration::from_millis(100));
    // Slot 0 crashes young: it waits out a backoff, the pool has 1 of 2 ready.
    h.exit(old[0], CRASH);
    assert_eq!(h.pool.ready_count(), 1);
    // The measurement comes after slot 0's backoff (100 ms): it is starting, not ready yet.
    let acts = h.measure(&[1], 100 * MIB);
    assert_eq!(
        spawns(&acts),
        0,
        "the pool is below --min-ready (2): slot 1 waits"
    );
    let back = h.pid(0);
    assert!(matches!(
        h.pool.workers[&h.pool.slots[0].current.unwrap()].state,
        State::Starting { .. }
    ));
    // Slot 0 is ready again; then slot 1's recycle starts.
    let acts = h.msg(back, WorkerMsg::Ready);
    assert_eq!(spawns(&acts), 1, "now slot 1 is recycled");
    assert!(signals(&acts).is_empty());
}

#[test]
fn a_replacement_that_fails_leaves_the_old_worker_serving_and_is_retried_later() {
    let mut h = memory_pool(2);
    let old = h.pids();
    h.measure(&[1], 100 * MIB);
    let new = h.next_pid;
    let acts = h.exit(new, CRASH);
    assert!(
        signals(&acts).is_empty() && kills(&acts).is_empty(),
        "old one untouched"
    );
    assert_eq!(h.pids(), old);
    assert_eq!(h.pool.last_reload, None, "not a failed reload");
    assert_eq!(h.pool.counters.restarts, 0);
    assert!(h.pool.recycle.is_none());
    let after = h.pool.slots[1].recycle_after.expect("a backoff");
    assert_eq!(after, h.now + Duration::from_secs(1));
    // Measured too big again before the backoff is over: nothing; after it: recycled.
    let id = h.pool.slots[1].current.unwrap();
    let acts = h.ev(Event::Measured(vec![(id, 100 * MIB)]));
    assert_eq!(spawns(&acts), 0, "not before the backoff is over");
    let acts = h.measure(&[1], 100 * MIB);
    assert_eq!(spawns(&acts), 1, "retried after the backoff");
}

#[test]
fn a_reload_supersedes_a_recycle_under_way() {
    let mut h = memory_pool(2);
    h.measure(&[1], 100 * MIB);
    let new = h.next_pid;
    let acts = h.req(Request::Reload);
    assert!(
        kills(&acts).contains(&new),
        "the recycle's replacement is pointless now"
    );
    assert!(h.pool.recycle.is_none());
    assert!(h.pool.reloading);
}

#[test]
fn no_recycle_during_a_reload_and_none_when_stopping() {
    let mut h = memory_pool(2);
    h.req(Request::Reload);
    let acts = h.measure(&[0, 1], 100 * MIB);
    assert_eq!(spawns(&acts), 0, "the reload replaces them anyway");
    let mut h = memory_pool(2);
    h.measure(&[1], 100 * MIB);
    h.req(Request::Stop);
    assert!(h.pool.recycle.is_none());
    assert_eq!(h.pool.recycle_deadline(), None);
}

#[test]
fn lifetimes_come_due_one_slot_at_a_time_and_no_worker_outlives_the_limit() {
    let life = Duration::from_secs(3);
    let mut c = cfg(4);
    c.max_lifetime = Some(life);
    let mut h = H::new(c);
    let start = h.now;
    h.start(); // exec mode: ready at once
    let mut recycles = 0;
    let mut exited = Vec::new();
    while h.now < start + Duration::from_secs(20) {
        // The draining old workers exit 50 ms after their SIGTERM.
        let acts = h.until_deadline();
        assert!(h.pool.workers.len() <= 5, "never two recycles at once");
        assert!(spawns(&acts) <= 1, "one replacement at a time");
        for (pid, _) in signals(&acts) {
            h.now += Duration::from_millis(50);
            h.exit(pid, TERMED);
            exited.push(pid);
            recycles += 1;
        }
        for w in h.pool.workers.values() {
            let age = h.now.saturating_duration_since(w.spawned_at);
            assert!(age <= life + Duration::from_millis(100), "age {age:?}");
        }
    }
    assert!(recycles >= 20, "4 slots, 3 s lives, 20 s: {recycles}");
    assert_eq!(h.pool.counters.restarts, 0);
    assert_eq!(
        h.pool.counters.recycles.get("lifetime"),
        Some(&(recycles as u64))
    );
}

#[test]
fn lifetime_grid_spreads_the_slots() {
    let start = Instant::now();
    let life = Duration::from_secs(60);
    let mut due: Vec<Instant> = (0..4)
        .map(|slot| lifetime_due(start, life, slot, 4, start))
        .collect();
    for (i, d) in due.iter().enumerate() {
        let age = d.duration_since(start);
        assert!(age > life / 2 && age <= life, "slot {i}: {age:?}");
    }
    due.sort();
    for w in due.windows(2) {
        assert_eq!(
            w[1].duration_since(w[0]),
            Duration::from_millis(7500),
            "L/(2n) apart"
        );
    }
}

proptest! {
    #[test]
    fn every_lifetime_is_between_half_and_whole_and_on_its_slots_grid(
        life_ms in 1000u64..10_000_000,
        slots in 1usize..200,
        slot_pick in 0usize..200,
        spawned_ms in 0u64..100_000_000,
    ) {
        let slot = slot_pick % slots;
        let start = Instant::now();
        let life = Duration::from_millis(life_ms);
        let spawned = start + Duration::from_millis(spawned_ms);
        let due = lifetime_due(start, life, slot, slots, spawned);
        let age = due.duration_since(spawned);
        prop_assert!(age <= life);
        prop_assert!(age + Duration::from_nanos(1) > life / 2);
        let half = life.as_nanos() / 2;
        let offset = half * slot as u128 / slots as u128;
        prop_assert_eq!((due.duration_since(start).as_nanos() - offset) % half, 0);
    }
}

#[test]
fn a_recycle_under_way_crosses_an_upgrade() {
    let mut h = memory_pool(2);
    let old = h.pids();
    h.measure(&[1], 100 * MIB);
    let snap = h.pool.snapshot(h.now);
    let text = serde_json::to_string(&snap).unwrap();
    let back: PoolSnapshot = serde_json::from_str(&text).unwrap();
    let mut pool = Pool::restore(h.pool.config().clone(), back, h.now, h.now);
    assert_eq!(pool.recycle, h.pool.recycle);
    assert_eq!(pool.counters.recycles.get("memory"), Some(&1));
    // The new image finishes it: the replacement is ready, the old one drains.
    let new = pool.recycle.unwrap().new;
    let acts = pool.handle(
        Event::Message {
            id: new,
            msg: WorkerMsg::Ready,
        },
        h.now,
    );
    assert_eq!(signals(&acts), vec![(old[1], Signal::SIGTERM)]);
}
