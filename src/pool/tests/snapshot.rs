//! The pool across an in-place upgrade: what goes into the snapshot comes back, deadlines
//! included, and the taken-over pool behaves as the old one would have.

use super::*;

/// A pool with a bit of everything: a crash in backoff, a draining old worker after a reload,
/// restart history, counters, a leftover group, a worker status.
fn busy(watchdog: bool) -> H {
    let mut c = cfg(3);
    c.ready = ReadyMode::Notify;
    c.manager_watchdog = watchdog.then_some(Duration::from_secs(10));
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    h.msg(h.pid(0), WorkerMsg::Status("serving".into()));
    h.advance(Duration::from_secs(2));
    h.req(Request::Reload);
    let new1 = h.next_pid;
    h.msg(new1, WorkerMsg::Ready);
    let new2 = h.next_pid;
    h.msg(new2, WorkerMsg::Ready);
    let new3 = h.next_pid;
    h.msg(new3, WorkerMsg::Ready); // reload complete; old workers draining
    h.advance(Duration::from_millis(300));
    h.exit_leaving(h.pid(2), CRASH); // young: backoff, and a leftover group
    h
}

#[test]
fn a_snapshot_round_trips_through_json_and_restores_the_same_pool() {
    let h = busy(false);
    assert!(h.pool.can_snapshot().is_ok());
    let snap = h.pool.snapshot(h.now);
    let text = serde_json::to_string(&snap).unwrap();
    let back: PoolSnapshot = serde_json::from_str(&text).unwrap();
    assert_eq!(back, snap);
    // The new image's clock: 40 ms later, the snapshot moment is 40 ms ago.
    let later_now = h.now + Duration::from_millis(40);
    let pool = Pool::restore(h.pool.config().clone(), back, h.now, later_now);
    assert_eq!(
        pool.snapshot(h.now),
        snap,
        "every field and deadline came back"
    );
    assert_eq!(pool.next_deadline(), h.pool.next_deadline());
    assert_eq!(pool.worker_of_pid(h.pid(0)), h.pool.worker_of_pid(h.pid(0)));
}

#[test]
fn the_taken_over_pool_carries_on_where_the_old_one_was() {
    let mut h = busy(true);
    let old: Vec<i32> = h
        .pool
        .workers
        .values()
        .filter(|w| w.generation == 1)
        .filter_map(|w| w.pid)
        .collect();
    let snap = h.pool.snapshot(h.now);
    let cfg = h.pool.config().clone();
    h.pool = Pool::restore(cfg, snap, h.now, h.now);
    let acts = h.ev(Event::Resumed);
    let m = manager(&acts);
    assert!(
        m.contains(&ManagerMsg::Ready),
        "READY=1 after the exec: {m:?}"
    );
    assert!(m.contains(&ManagerMsg::Watchdog), "a ping at once: {m:?}");
    assert!(
        m.iter().any(|m| matches!(m, ManagerMsg::Status(_))),
        "a fresh STATUS="
    );
    // The crashed slot's backoff runs out as it would have: a spawn.
    let acts = h.until_deadline();
    assert_eq!(spawns(&acts), 1);
    // The old generation's drain deadline still holds: SIGKILL at 30 s after it began.
    let acts = h.advance(Duration::from_secs(30));
    let killed = kills(&acts);
    assert!(
        old.iter().all(|p| killed.contains(p)),
        "old ones killed: {old:?} {killed:?}"
    );
    // And an operator's stop drains everything.
    h.req(Request::Stop);
    assert!(matches!(h.pool.phase, Phase::Draining { .. }));
}

#[test]
fn only_a_settled_pool_crosses() {
    let mut h = busy(false);
    h.req(Request::Reload);
    assert!(h.pool.can_snapshot().unwrap_err().contains("reload"));
    let mut h = busy(false);
    h.req(Request::Stop);
    assert!(h.pool.can_snapshot().unwrap_err().contains("stopping"));
}

#[test]
fn a_tolerant_format_takes_unknown_and_missing_fields() {
    let text = r#"{"generation": 4, "something_new": [1, 2], "slots": [{"current": 7}],
                   "workers": [{"id": 7, "slot": 0, "pid": 4242, "state": "ready", "later": true}]}"#;
    let snap: PoolSnapshot = serde_json::from_str(text).unwrap();
    let now = Instant::now();
    let pool = Pool::restore(cfg(1), snap, now, now);
    assert_eq!(pool.generation, 4);
    assert_eq!(pool.worker_of_pid(4242), Some(7));
    assert_eq!(pool.ready_count(), 1);
    let empty: PoolSnapshot = serde_json::from_str("{}").unwrap();
    let pool = Pool::restore(cfg(2), empty, now, now);
    assert_eq!(
        pool.slots.len(),
        2,
        "nothing to take over: the configured pool, to be filled"
    );
}
