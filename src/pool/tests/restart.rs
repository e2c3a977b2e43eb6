//! What a worker's end means: backoff, immediate replacement, the per-slot give-up, STOPPING=1,
//! herder's own resource failures, and what a dead worker leaves behind.

use super::*;

#[test]
fn a_crash_restarts_after_an_exponential_backoff() {
    let mut h = H::new(cfg(1));
    h.start();
    for (i, expect_ms) in [100u64, 200, 400, 800].into_iter().enumerate() {
        let pid = h.pid(0);
        let acts = h.exit(pid, CRASH);
        assert_eq!(
            spawns(&acts),
            0,
            "no restart before the backoff (round {i})"
        );
        assert_eq!(
            h.pool.next_deadline(),
            Some(h.now + Duration::from_millis(expect_ms))
        );
        let acts = h.advance(Duration::from_millis(expect_ms - 1));
        assert_eq!(spawns(&acts), 0);
        let acts = h.advance(Duration::from_millis(1));
        assert_eq!(spawns(&acts), 1, "restarted after {expect_ms} ms");
    }
}

#[test]
fn a_worker_that_lived_a_while_resets_the_backoff() {
    // Never ready (notify mode, no READY=1): only its lifetime counts.
    let mut c = cfg(1);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    h.exit(h.pid(0), CRASH);
    h.advance(Duration::from_millis(100));
    h.exit(h.pid(0), CRASH);
    h.advance(Duration::from_millis(200));
    h.now += crate::throttle::STABLE_AFTER;
    h.exit(h.pid(0), CRASH);
    assert_eq!(
        h.pool.next_deadline(),
        Some(h.now + Duration::from_millis(100))
    );
}

#[test]
fn a_worker_that_served_a_second_is_replaced_at_once() {
    let mut h = H::new(cfg(1));
    h.start();
    h.exit(h.pid(0), CRASH);
    h.advance(Duration::from_millis(100));
    h.advance(Duration::from_millis(999)); // ready (exec mode) and served 999 ms
    let acts = h.exit(h.pid(0), CRASH);
    assert_eq!(spawns(&acts), 0, "999 ms is a start-up crash loop");
    assert_eq!(
        h.pool.next_deadline(),
        Some(h.now + Duration::from_millis(200))
    );
    h.advance(Duration::from_millis(200));
    h.advance(Duration::from_secs(1)); // served a full second: a kill, not a crash loop
    let acts = h.exit(h.pid(0), ExitStatus::Signal(9));
    assert_eq!(spawns(&acts), 1, "replaced in the same step, no delay");
    assert_eq!(h.pool.slots[0].failures, 0, "and the backoff starts over");
    assert_eq!(h.pool.slots[0].restarts, 3, "it is still a restart");
}

#[test]
fn more_than_the_restart_limit_on_one_slot_gives_up_and_drains_the_rest() {
    let mut c = cfg(2);
    c.restart_limit = 3;
    let mut h = H::new(c);
    h.start();
    let healthy = h.pid(1);
    for _ in 0..3 {
        h.exit(h.pid(0), CRASH);
        h.until_deadline();
    }
    let acts = h.exit(h.pid(0), CRASH);
    assert_eq!(spawns(&acts), 0, "the 4th restart is not made");
    assert_eq!(
        signals(&acts),
        vec![(healthy, Signal::SIGTERM)],
        "the rest is drained gracefully"
    );
    assert!(
        statuses(&acts).iter().any(|s| s.starts_with(
            "gave up: slot 0 was restarted 4 times within 60s, more than --restart-limit 3"
        )),
        "{:?}",
        statuses(&acts)
    );
    let acts = h.exit(healthy, TERMED);
    assert_eq!(exit_code(&acts), Some(EXIT_GAVE_UP));
}

#[test]
fn killing_every_worker_of_a_healthy_pool_once_never_gives_up() {
    // The OOM killer takes the whole cgroup: one restart per slot, at any pool size.
    for n in [1, 2, 12, 16, 64] {
        let mut h = H::new(cfg(n));
        h.start();
        h.advance(Duration::from_secs(11));
        let batch: Vec<(i32, ExitStatus)> = h
            .pids()
            .into_iter()
            .map(|p| (p, ExitStatus::Signal(9)))
            .collect();
        let acts = h.exits(&batch);
        assert_eq!(exit_code(&acts), None, "{n} workers");
        assert!(h.pool.gave_up.is_none(), "{n} workers");
        assert_eq!(spawns(&acts), n, "all {n} replaced at once");
        assert!(signals(&acts).is_empty() && kills(&acts).is_empty());
        // ... and again, ten times within the window: still the limit of each slot (10).
        for _ in 0..9 {
            h.advance(Duration::from_secs(1));
            let batch: Vec<(i32, ExitStatus)> = h
                .pids()
                .into_iter()
                .map(|p| (p, ExitStatus::Signal(9)))
                .collect();
            assert_eq!(exit_code(&h.exits(&batch)), None);
        }
        assert_eq!(
            h.status(),
            format!("{n}/{n} workers ready, {} restarts in the last 60s", 10 * n)
        );
    }
}

#[test]
fn a_command_that_always_fails_still_gives_up_within_the_window_at_any_pool_size() {
    for n in [1, 4, 16] {
        let mut h = H::new(cfg(n));
        h.start();
        let started = h.now;
        let mut gave_up = false;
        for _ in 0..1000 {
            let batch: Vec<(i32, ExitStatus)> = (0..n)
                .filter_map(|s| h.pool.slots[s].current)
                .filter_map(|id| h.pool.workers[&id].pid)
                .map(|p| (p, CRASH))
                .collect();
            if !batch.is_empty() && exit_code(&h.exits(&batch)).is_some() {
                gave_up = true;
                break;
            }
            if h.pool.gave_up.is_some() {
                // Drained: the rest exit.
                let left: Vec<(i32, ExitStatus)> = h
                    .pool
                    .workers
                    .values()
                    .filter_map(|w| w.pid)
                    .map(|p| (p, TERMED))
                    .collect();
                gave_up = exit_code(&h.exits(&left)) == Some(EXIT_GAVE_UP);
                break;
            }
            h.until_deadline();
        }
        assert!(gave_up, "{n} workers");
        assert!(
            h.now - started < Duration::from_secs(60),
            "within the window: {:?}",
            h.now - started
        );
    }
}

#[test]
fn a_command_that_cannot_run_backs_off_and_gives_up_without_spinning() {
    let mut c = cfg(1);
    c.restart_limit = 2;
    let mut h = H::new(c);
    // Every spawn fails (as exec of a missing command does).
    h.hold_spawns = true;
    h.start();
    let mut attempts = 0;
    while let Some(id) = h.held.pop() {
        attempts += 1;
        let acts = h.ev(Event::SpawnFailed {
            id,
            code: 127,
            reason: "not found".into(),
            blame: Blame::Command,
        });
        if let Some(code) = exit_code(&acts) {
            assert_eq!(code, EXIT_GAVE_UP);
            break;
        }
        let due = h.pool.next_deadline().expect("a backoff is pending");
        assert!(due > h.now, "never an immediate retry");
        h.until_deadline();
    }
    assert_eq!(attempts, 3, "limit 2: two restarts, then give up");
}

#[test]
fn herder_short_of_fds_retries_with_backoff_and_never_gives_up() {
    let mut c = cfg(2);
    c.restart_limit = 1;
    let mut h = H::new(c);
    h.hold_spawns = true;
    h.start();
    let (first, second) = (h.held[0], h.held[1]);
    h.held.clear();
    h.spawned(first);
    let acts = h.spawn_failed(second, Blame::Herder);
    assert_eq!(exit_code(&acts), None);
    assert!(
        statuses(&acts)[0]
            .ends_with("herder cannot start workers: Too many open files (os error 24) (retrying)"),
        "{:?}",
        statuses(&acts)
    );
    // A hundred failures in a row: backoff grows to its cap, no restart counted, no give-up.
    let mut last_delay = Duration::ZERO;
    for _ in 0..100 {
        let due = h.pool.next_deadline().expect("a retry is pending");
        let delay = due - h.now;
        assert!(delay >= last_delay && delay <= crate::throttle::BACKOFF_CAP);
        last_delay = delay;
        h.until_deadline();
        let id = h.held.pop().expect("retried");
        assert_eq!(exit_code(&h.spawn_failed(id, Blame::Herder)), None);
    }
    assert_eq!(last_delay, crate::throttle::BACKOFF_CAP);
    assert_eq!(h.pool.slots[1].restarts, 0);
    assert_eq!(h.pool.counters.restarts, 0);
    assert_eq!(h.pool.counters.resource_failures, 101);
    // Resources come back: the slot fills, the status line is clean again.
    h.until_deadline();
    let id = h.held.pop().unwrap();
    h.spawned(id);
    assert!(h.pool.resource_error.is_none());
    assert_eq!(h.status(), "2/2 workers ready, 0 restarts in the last 60s");
}

#[test]
fn stopping_from_a_worker_that_served_starts_its_replacement_and_is_not_a_crash() {
    let mut h = H::new(cfg(1));
    h.start();
    h.advance(Duration::from_secs(1));
    let old = h.pid(0);
    let acts = h.msg(old, WorkerMsg::Stopping);
    assert_eq!(spawns(&acts), 1, "replacement before the old one exits");
    let acts = h.exit(old, ExitStatus::Code(0));
    assert_eq!(spawns(&acts), 0);
    assert_eq!(h.pool.slots[0].restarts, 0);
    assert_eq!(h.pool.next_deadline(), None, "no backoff pending");
}

#[test]
fn stopping_before_it_was_ready_is_a_failed_start() {
    let mut c = cfg(1);
    c.ready = ReadyMode::Notify;
    c.restart_limit = 3;
    let mut h = H::new(c);
    h.start();
    // `systemd-notify STOPPING=1; exec sleep 30`, over and over: each one is a failed start,
    // with the backoff between them, until the restart limit.
    let mut alive = Vec::new();
    for round in 0..4 {
        let pid = h.pid(0);
        alive.push(pid);
        let acts = h.msg(pid, WorkerMsg::Stopping);
        assert_eq!(spawns(&acts), 0, "round {round}: no replacement at once");
        if round == 3 {
            assert!(h.pool.gave_up.is_some(), "the 4th failed start exceeds 3");
            break;
        }
        assert_eq!(h.pool.slots[0].restarts, round + 1);
        let acts = h.until_deadline();
        assert_eq!(spawns(&acts), 1, "after the backoff");
    }
    // At no time more than one worker starting per slot, and the early retirees are drained.
    assert!(h.pool.workers.len() <= 5);
}

#[test]
fn a_stopping_storm_in_exec_mode_yields_one_replacement_at_a_time() {
    let mut c = cfg(1);
    c.restart_limit = 1000;
    let mut h = H::new(c);
    h.start();
    // Every worker says STOPPING=1 the moment it runs and never exits.
    for _ in 0..50 {
        while h.pool.slots[0].current.is_none() {
            h.until_deadline();
        }
        let pid = h.pid(0);
        h.msg(pid, WorkerMsg::Stopping);
        let starting = h
            .pool
            .workers
            .values()
            .filter(|w| !matches!(w.state, State::Stopping { .. }))
            .count();
        assert!(starting <= 1, "one replacement per slot at a time");
    }
    // Paced by the backoff (capped at 5 s), not by fork: 50 in well over a minute.
    assert!(h.now - h.pool.started_at > Duration::from_secs(60));
}

#[test]
fn repeated_stopping_from_one_worker_counts_once() {
    let mut h = H::new(cfg(1));
    h.start();
    h.advance(Duration::from_secs(2));
    let pid = h.pid(0);
    assert_eq!(spawns(&h.msg(pid, WorkerMsg::Stopping)), 1);
    for _ in 0..10 {
        let id = h.pool.worker_of_pid(pid).unwrap();
        assert_eq!(
            spawns(&h.ev(Event::Message {
                id,
                msg: WorkerMsg::Stopping
            })),
            0
        );
    }
    assert_eq!(h.pool.workers.len(), 2);
}

#[test]
fn a_dead_workers_leftovers_get_the_stop_signal_then_sigkill() {
    let mut c = cfg(1);
    c.drain_timeout = Duration::from_secs(3);
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    let acts = h.exit_leaving(pid, CRASH);
    assert_eq!(group_signals(&acts), vec![(pid, Signal::SIGTERM)]);
    h.until_deadline(); // the backoff: a new worker
    assert!(group_signals(&h.advance(Duration::from_millis(2800))).is_empty());
    assert_eq!(
        group_signals(&h.advance(Duration::from_millis(100))),
        vec![(pid, Signal::SIGKILL)],
        "at --drain-timeout"
    );
    assert_eq!(h.pool.next_deadline(), None, "once");
}

#[test]
fn a_leftover_group_whose_number_a_new_worker_took_is_left_alone() {
    let mut h = H::new(cfg(1));
    h.start();
    let pid = h.pid(0);
    h.exit_leaving(pid, CRASH);
    // The kernel hands the same number to the replacement (the old group is gone).
    h.next_pid = pid - 1;
    h.until_deadline();
    assert_eq!(h.pid(0), pid);
    let acts = h.advance(Duration::from_secs(31));
    assert!(group_signals(&acts).is_empty(), "{acts:?}");
}

#[test]
fn several_exits_in_one_batch_signal_none_of_the_reaped() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    h.req(Request::Reload);
    let (old0, old1) = (h.pid(0), h.pid(1));
    let new0 = h.next_pid;
    // One SIGCHLD: the replacement failed (which abandons the reload and kills replacements)
    // and both old workers crashed. Nothing may be sent to any of the three.
    let acts = h.exits(&[(new0, CRASH), (old0, CRASH), (old1, CRASH)]);
    for gone in [new0, old0, old1] {
        assert!(!signals(&acts).iter().any(|(p, _)| *p == gone), "{acts:?}");
        assert!(!kills(&acts).contains(&gone), "{acts:?}");
    }
    assert_eq!(h.pool.workers.len(), 0);
    assert!(matches!(
        h.pool.last_reload,
        Some(ReloadOutcome::Failed { .. })
    ));
    assert_eq!(h.pool.slots[0].restarts + h.pool.slots[1].restarts, 2);
}
