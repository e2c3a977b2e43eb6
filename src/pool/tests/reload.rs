//! The rolling reload and everything that can happen during one.

use super::*;

#[test]
fn reload_rolls_one_slot_at_a_time_and_ends_with_ready() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    let old = h.pids();
    for &p in &old {
        h.msg(p, WorkerMsg::Ready);
    }
    let acts = h.req(Request::Reload);
    assert_eq!(manager(&acts)[0], ManagerMsg::Reloading);
    assert_eq!(spawns(&acts), 1, "surge 1");
    assert!(
        signals(&acts).is_empty(),
        "the old worker keeps serving until its replacement is ready"
    );
    let new0 = h.next_pid;
    let acts = h.msg(new0, WorkerMsg::Ready);
    assert_eq!(signals(&acts), vec![(old[0], Signal::SIGTERM)]);
    assert_eq!(spawns(&acts), 1, "next slot");
    assert!(!manager(&acts).contains(&ManagerMsg::Ready));
    let new1 = h.next_pid;
    let acts = h.msg(new1, WorkerMsg::Ready);
    assert_eq!(signals(&acts), vec![(old[1], Signal::SIGTERM)]);
    assert!(manager(&acts).contains(&ManagerMsg::Ready));
    assert_eq!(h.pids(), vec![new0, new1]);
    // The old generation's exits are expected: no restart, no throttle.
    h.exit(old[0], TERMED);
    h.exit(old[1], TERMED);
    assert_eq!(h.pool.next_deadline(), None);
    assert_eq!(
        h.pool.last_reload,
        Some(ReloadOutcome::Succeeded { generation: 2 })
    );
}

#[test]
fn reload_surge_replaces_several_slots_at_once() {
    let mut c = cfg(4);
    c.reload_surge = 3;
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    assert_eq!(spawns(&h.req(Request::Reload)), 3);
}

#[test]
fn a_failed_reload_keeps_the_old_generation_and_the_next_reload_tries_again() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    let old = h.pids();
    h.req(Request::Reload);
    let acts = h.exit(h.next_pid, ExitStatus::Code(1));
    let m = manager(&acts);
    assert!(m.contains(&ManagerMsg::Ready));
    assert!(
        m.iter()
            .any(|m| matches!(m, ManagerMsg::Status(s) if s.starts_with("reload failed: slot 0"))),
        "{m:?}"
    );
    assert_eq!(spawns(&acts), 0, "no restart of a failed replacement");
    assert_eq!(h.pids(), old, "the old generation still serves");
    assert!(!h.pool.reloading);
    let acts = h.req(Request::Reload);
    assert_eq!(spawns(&acts), 1, "the next HUP tries again");
}

#[test]
fn a_replacement_that_never_gets_ready_fails_the_reload_at_the_ready_timeout() {
    let mut c = cfg(1);
    c.ready = ReadyMode::Notify;
    c.ready_timeout = Duration::from_secs(3);
    let mut h = H::new(c);
    h.start();
    h.msg(h.pid(0), WorkerMsg::Ready);
    h.req(Request::Reload);
    let new = h.next_pid;
    assert_eq!(kills(&h.advance(Duration::from_secs(3))), vec![new]);
    let acts = h.exit(new, ExitStatus::Signal(9));
    assert!(manager(&acts)
        .iter()
        .any(|m| matches!(m, ManagerMsg::Status(s) if s.contains("not ready within 3s"))));
}

#[test]
fn hup_during_a_reload_starts_over_with_the_newest_generation() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    h.req(Request::Reload);
    let first = h.next_pid;
    let acts = h.req(Request::Reload);
    assert_eq!(kills(&acts), vec![first], "the superseded replacement goes");
    assert!(
        !manager(&acts).contains(&ManagerMsg::Reloading),
        "one RELOADING=1 per reload"
    );
    assert_eq!(spawns(&acts), 1);
    // Its exit does not fail the new reload.
    let acts = h.exit(first, ExitStatus::Signal(9));
    assert!(h.pool.reloading);
    assert!(!manager(&acts).contains(&ManagerMsg::Ready));
    assert_eq!(h.pool.generation, 3);
}

/// A notify-mode pool of `n`, every worker ready, and a reload under way.
fn reloading(n: usize) -> H {
    let mut c = cfg(n);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    for p in h.pids() {
        h.msg(p, WorkerMsg::Ready);
    }
    h.advance(Duration::from_secs(2));
    h.req(Request::Reload);
    h
}

#[test]
fn a_current_worker_crashing_while_its_replacement_starts_is_not_replaced_twice() {
    let mut h = reloading(2);
    let old0 = h.pid(0);
    let new0 = h.next_pid;
    let acts = h.exit(old0, ExitStatus::Signal(9));
    assert_eq!(
        spawns(&acts),
        0,
        "the replacement already on its way takes the slot"
    );
    assert_eq!(h.pool.slots[0].current, h.pool.worker_of_pid(new0));
    assert_eq!(h.pool.slots[0].restarts, 1, "the crash still counts");
    let acts = h.msg(new0, WorkerMsg::Ready);
    assert_eq!(spawns(&acts), 1, "the reload moves on to slot 1");
    let new1 = h.next_pid;
    let acts = h.msg(new1, WorkerMsg::Ready);
    assert!(manager(&acts).contains(&ManagerMsg::Ready));
    assert_eq!(
        h.pool.workers.len(),
        3,
        "two new, slot 1's old one draining"
    );
}

#[test]
fn stopping_from_a_replacement_fails_the_reload() {
    let mut h = reloading(2);
    let old = h.pids();
    let new0 = h.next_pid;
    let acts = h.msg(new0, WorkerMsg::Stopping);
    assert_eq!(kills(&acts), vec![new0]);
    assert!(statuses(&acts)
        .iter()
        .any(|s| s.contains("said STOPPING=1 before it was ready")));
    assert_eq!(h.pids(), old, "the old generation keeps serving");
    assert_eq!(spawns(&h.exit(new0, ExitStatus::Signal(9))), 0);
    assert_eq!(h.pool.slots[0].restarts, 0);
}

#[test]
fn scaling_during_a_reload_rolls_the_new_slots_too() {
    let mut h = reloading(2);
    let acts = h.req(Request::ScaleTo(3));
    assert_eq!(
        spawns(&acts),
        1,
        "the new slot starts in the newest generation"
    );
    let added = h.next_pid;
    assert_eq!(
        h.pool.workers[&h.pool.worker_of_pid(added).unwrap()].generation,
        2
    );
    h.msg(added, WorkerMsg::Ready);
    // Down to 1 while slot 0's replacement is starting: slot 1 and 2 go, the reload goes on.
    let replacement0 = h.pool.slots[0].next.unwrap();
    let acts = h.req(Request::ScaleTo(1));
    assert_eq!(
        acts.iter()
            .filter(|a| matches!(a, Action::ReleaseSlot { .. }))
            .count(),
        2
    );
    assert!(h.pool.reloading);
    let pid = h.pool.workers[&replacement0].pid.unwrap();
    let acts = h.msg(pid, WorkerMsg::Ready);
    assert!(manager(&acts).contains(&ManagerMsg::Ready), "{acts:?}");
    assert_eq!(
        h.pool.last_reload,
        Some(ReloadOutcome::Succeeded { generation: 2 })
    );
}

#[test]
fn a_stop_during_a_reload_drains_old_and_new() {
    let mut h = reloading(2);
    let new0 = h.next_pid;
    let acts = h.req(Request::Stop);
    let sent: Vec<i32> = signals(&acts).into_iter().map(|(p, _)| p).collect();
    assert_eq!(
        sent.len(),
        3,
        "both old workers and the replacement: {acts:?}"
    );
    assert!(sent.contains(&new0));
    assert!(!h.pool.reloading);
    // The replacement's exit is no failed reload now, nor a restart.
    let acts = h.exit(new0, TERMED);
    assert!(!statuses(&acts).iter().any(|s| s.contains("reload failed")));
    assert_eq!(spawns(&acts), 0);
}

#[test]
fn herder_short_of_resources_during_a_reload_retries_the_slot_and_the_reload_goes_on() {
    let mut h = reloading(1);
    let old = h.pid(0);
    // The replacement's spawn failed for herder's own lack of fds: not the new code's fault.
    let new0 = h.next_pid;
    let id = h.pool.worker_of_pid(new0).unwrap();
    h.exit(new0, ExitStatus::Signal(9)); // (a normal replacement failure for contrast below)
    assert!(matches!(
        h.pool.last_reload,
        Some(ReloadOutcome::Failed { .. })
    ));
    let _ = id;
    h.hold_spawns = true;
    h.req(Request::Reload);
    let id = h.held.pop().unwrap();
    let acts = h.spawn_failed(id, Blame::Herder);
    assert!(h.pool.reloading, "still reloading: {acts:?}");
    assert_eq!(h.pid(0), old, "the old one keeps serving");
    h.hold_spawns = false;
    let acts = h.until_deadline();
    assert_eq!(spawns(&acts), 1, "retried after the backoff");
    let acts = h.msg(h.next_pid, WorkerMsg::Ready);
    assert_eq!(signals(&acts), vec![(old, Signal::SIGTERM)]);
    assert_eq!(
        h.pool.last_reload,
        Some(ReloadOutcome::Succeeded { generation: 3 })
    );
}
