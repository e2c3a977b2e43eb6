//! Stopping (drain, lame duck, force) and scaling, and requests that arrive while stopping.

use super::*;

#[test]
fn stop_drains_then_exits_zero() {
    let mut h = H::new(cfg(2));
    h.start();
    let pids = h.pids();
    let acts = h.req(Request::Stop);
    assert_eq!(
        signals(&acts),
        pids.iter()
            .map(|&p| (p, Signal::SIGTERM))
            .collect::<Vec<_>>()
    );
    assert!(manager(&acts).contains(&ManagerMsg::Stopping));
    assert_eq!(exit_code(&h.exit(pids[0], ExitStatus::Code(0))), None);
    assert_eq!(
        h.pool.slots[0].current, None,
        "no slot names a worker that is gone"
    );
    // No restart while draining.
    assert_eq!(
        h.pool.next_deadline(),
        Some(h.now + Duration::from_secs(30))
    );
    assert_eq!(
        exit_code(&h.exit(pids[1], ExitStatus::Code(0))),
        Some(EXIT_CLEAN)
    );
}

#[test]
fn a_worker_that_ignores_the_stop_signal_is_killed_at_the_drain_timeout() {
    let mut c = cfg(1);
    c.drain_timeout = Duration::from_secs(2);
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    h.req(Request::Stop);
    assert!(kills(&h.advance(Duration::from_millis(1999))).is_empty());
    assert_eq!(kills(&h.advance(Duration::from_millis(1))), vec![pid]);
    assert_eq!(
        exit_code(&h.exit(pid, ExitStatus::Signal(9))),
        Some(EXIT_KILLED)
    );
}

#[test]
fn a_second_stop_or_quit_kills_at_once() {
    for second in [Request::Stop, Request::ForceStop] {
        let mut h = H::new(cfg(2));
        h.start();
        let pids = h.pids();
        h.req(Request::Stop);
        let acts = h.req(second);
        assert_eq!(kills(&acts), pids, "{second:?}");
    }
}

#[test]
fn lame_duck_keeps_serving_then_drains() {
    let mut c = cfg(1);
    c.shutdown_delay = Duration::from_secs(5);
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    let acts = h.req(Request::Stop);
    assert!(signals(&acts).is_empty(), "still serving");
    assert!(manager(&acts).contains(&ManagerMsg::Stopping));
    assert!(!h.pool.is_ready(), "/readyz says no");
    // A crash during the lame duck is still restarted: the pod is serving.
    h.exit(pid, CRASH);
    h.advance(Duration::from_millis(100));
    let pid = h.pid(0);
    let acts = h.advance(Duration::from_millis(4900));
    assert_eq!(signals(&acts), vec![(pid, Signal::SIGTERM)]);
}

#[test]
fn scaling_adds_and_removes_slots_but_never_below_one() {
    let mut h = H::new(cfg(1));
    h.start();
    assert_eq!(spawns(&h.req(Request::ScaleUp)), 1);
    assert_eq!(h.pool.slots.len(), 2);
    let top = h.pid(1);
    let acts = h.req(Request::ScaleDown);
    assert_eq!(signals(&acts), vec![(top, Signal::SIGTERM)]);
    assert!(acts.contains(&Action::ReleaseSlot { slot: 1 }));
    let acts = h.req(Request::ScaleDown);
    assert!(signals(&acts).is_empty(), "never below 1");
    assert_eq!(h.pool.slots.len(), 1);
    // The removed worker's exit is not a crash.
    assert_eq!(spawns(&h.exit(top, TERMED)), 0);
    assert_eq!(h.pool.next_deadline(), None);
}

#[test]
fn reload_and_scale_are_ignored_during_the_lame_duck_delay_and_the_drain() {
    let mut c = cfg(2);
    c.shutdown_delay = Duration::from_secs(5);
    let mut h = H::new(c);
    h.start();
    let pids = h.pids();
    h.req(Request::Stop);
    for r in [
        Request::Reload,
        Request::ScaleUp,
        Request::ScaleDown,
        Request::ScaleTo(5),
    ] {
        let acts = h.req(r);
        assert_eq!(spawns(&acts), 0, "{r:?} in the lame duck");
        assert!(signals(&acts).is_empty(), "{r:?} in the lame duck");
    }
    assert_eq!(h.pool.generation, 1);
    let acts = h.advance(Duration::from_secs(5));
    assert_eq!(signals(&acts).len(), 2, "drain begins");
    for r in [Request::Reload, Request::ScaleUp, Request::ScaleTo(1)] {
        let acts = h.req(r);
        assert_eq!(spawns(&acts), 0, "{r:?} in the drain");
        assert!(acts
            .iter()
            .all(|a| !matches!(a, Action::ReleaseSlot { .. })));
    }
    h.exit(pids[0], TERMED);
    assert_eq!(exit_code(&h.exit(pids[1], TERMED)), Some(EXIT_CLEAN));
}

#[test]
fn min_ready_after_scaling_below_it_is_the_whole_pool() {
    let mut c = cfg(4);
    c.min_ready = Some(3);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    assert!(h.pool.is_ready());
    h.req(Request::ScaleTo(2));
    assert_eq!(h.pool.min_ready(), 2, "never more than the pool");
    assert!(h.pool.is_ready(), "2 of 2 ready is ready");
    // Back up: the new slots are starting, 2 of 4 ready is below 3.
    h.req(Request::ScaleTo(4));
    assert!(!h.pool.is_ready());
    h.msg(h.next_pid, WorkerMsg::Ready);
    assert!(h.pool.is_ready(), "3 of 4");
}

#[test]
fn scaling_is_bounded() {
    let mut h = H::new(cfg(1));
    h.start();
    h.hold_spawns = true;
    h.req(Request::ScaleTo(usize::MAX));
    assert_eq!(h.pool.slots.len(), MAX_WORKERS);
}
