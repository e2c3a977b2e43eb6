//! Starting, readiness, watchdogs, signals passed on, and the order of events around a spawn.

use super::*;

#[test]
fn exec_mode_is_ready_after_every_spawn_and_says_so_once() {
    let mut h = H::new(cfg(3));
    let acts = h.start();
    assert_eq!(spawns(&acts), 3);
    let m = manager(&h.log);
    assert_eq!(m.iter().filter(|m| **m == ManagerMsg::Ready).count(), 1);
    assert!(m.contains(&ManagerMsg::Status(
        "3/3 workers ready, 0 restarts in the last 60s".into()
    )));
    assert!(h.pool.is_ready());
}

#[test]
fn notify_mode_waits_for_ready_from_every_worker() {
    let mut c = cfg(2);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    assert!(!manager(&h.log).contains(&ManagerMsg::Ready));
    let (a, b) = (h.pid(0), h.pid(1));
    let acts = h.msg(a, WorkerMsg::Ready);
    assert!(
        !manager(&acts).contains(&ManagerMsg::Ready),
        "1 of 2 is not ready"
    );
    let acts = h.msg(b, WorkerMsg::Ready);
    assert!(manager(&acts).contains(&ManagerMsg::Ready));
}

#[test]
fn min_ready_makes_the_pool_ready_early() {
    let mut c = cfg(3);
    c.ready = ReadyMode::Notify;
    c.min_ready = Some(1);
    let mut h = H::new(c);
    h.start();
    let acts = h.msg(h.pid(2), WorkerMsg::Ready);
    assert!(manager(&acts).contains(&ManagerMsg::Ready));
}

#[test]
fn a_silent_worker_is_aborted_then_killed_and_restarted() {
    let mut c = cfg(1);
    c.worker_watchdog = Some(Duration::from_secs(1));
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    h.advance(Duration::from_millis(900));
    h.msg(pid, WorkerMsg::Watchdog);
    assert!(
        signals(&h.advance(Duration::from_millis(900))).is_empty(),
        "pinged in time"
    );
    assert_eq!(
        signals(&h.advance(Duration::from_millis(100))),
        vec![(pid, Signal::SIGABRT)]
    );
    assert_eq!(kills(&h.advance(ABORT_GRACE)), vec![pid]);
    // It had served (ready at exec, for 1.9 s): replaced at once, and counted.
    assert_eq!(spawns(&h.exit(pid, ExitStatus::Signal(9))), 1);
    assert_eq!(h.pool.slots[0].restarts, 1, "counted as a failure");
}

#[test]
fn watchdog_trigger_fails_the_worker_at_once() {
    let mut c = cfg(1);
    c.worker_watchdog = Some(Duration::from_secs(10));
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    assert_eq!(
        signals(&h.msg(pid, WorkerMsg::WatchdogTrigger)),
        vec![(pid, Signal::SIGABRT)]
    );
}

#[test]
fn the_ready_timeout_kills_and_counts_a_failed_start() {
    let mut c = cfg(1);
    c.ready = ReadyMode::Notify;
    c.ready_timeout = Duration::from_secs(2);
    let mut h = H::new(c);
    h.start();
    let pid = h.pid(0);
    assert_eq!(kills(&h.advance(Duration::from_secs(2))), vec![pid]);
    h.exit(pid, ExitStatus::Signal(9));
    assert_eq!(h.pool.slots[0].restarts, 1);
}

#[test]
fn systemd_watchdog_pings_at_half_interval_only_while_healthy() {
    let mut c = cfg(1);
    c.manager_watchdog = Some(Duration::from_secs(2));
    let mut h = H::new(c);
    h.start();
    assert!(manager(&h.advance(Duration::ZERO)).contains(&ManagerMsg::Watchdog));
    // The only worker dies young and cannot come back (we never let the backoff run).
    h.advance(Duration::from_millis(500));
    let pid = h.pid(0);
    h.exit(pid, CRASH);
    h.pool.slots[0].backoff_until = None;
    assert!(manager(&h.advance(Duration::from_millis(500))).contains(&ManagerMsg::Watchdog));
    assert!(
        manager(&h.advance(Duration::from_secs(1))).contains(&ManagerMsg::Watchdog),
        "1.5 s without a ready worker"
    );
    assert!(
        !manager(&h.advance(Duration::from_secs(1))).contains(&ManagerMsg::Watchdog),
        "2.5 s: unhealthy"
    );
}

#[test]
fn forwarded_signals_reach_every_worker() {
    let mut h = H::new(cfg(2));
    h.start();
    let pids = h.pids();
    let acts = h.req(Request::Forward(Signal::SIGUSR1));
    assert_eq!(
        signals(&acts),
        pids.iter()
            .map(|&p| (p, Signal::SIGUSR1))
            .collect::<Vec<_>>()
    );
}

#[test]
fn unknown_pids_are_orphans_and_change_nothing() {
    let mut h = H::new(cfg(1));
    h.start();
    let acts = h.exit(99999, ExitStatus::Code(0));
    assert!(acts.is_empty());
}

#[test]
fn a_stop_decided_between_a_spawn_and_its_result_is_carried_out() {
    // The supervisor answers every spawn before any other event; should anything come in
    // between anyway, the decision is kept and carried out once the worker runs.
    let mut c = cfg(1);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    h.msg(h.pid(0), WorkerMsg::Ready);
    h.hold_spawns = true;
    h.req(Request::Reload);
    let first = h.held.pop().expect("the replacement's spawn");
    h.req(Request::Reload); // supersedes it while it has no pid yet
    let second = h.held.pop().expect("the newer replacement");
    h.hold_spawns = false;
    let (pid, acts) = h.spawned(first);
    assert_eq!(
        kills(&acts),
        vec![pid],
        "the superseded one is killed as it starts"
    );
    let (_, acts) = h.spawned(second);
    assert!(kills(&acts).is_empty());
    assert_eq!(h.pool.slots[0].next, Some(second));

    // A stop between a spawn and its result: drained as soon as it runs.
    h.hold_spawns = true;
    h.req(Request::ScaleUp);
    let id = h.held.pop().unwrap();
    h.req(Request::Stop);
    h.hold_spawns = false;
    let (pid, acts) = h.spawned(id);
    assert!(signals(&acts).contains(&(pid, Signal::SIGTERM)));
}

#[test]
fn a_watchdog_trigger_from_a_draining_worker_changes_nothing() {
    let mut c = cfg(2);
    c.worker_watchdog = Some(Duration::from_secs(1));
    let mut h = H::new(c);
    h.start();
    let top = h.pid(1);
    h.req(Request::ScaleDown);
    let acts = h.msg(top, WorkerMsg::WatchdogTrigger);
    assert!(signals(&acts).is_empty(), "no SIGABRT mid-drain: {acts:?}");
    // Nor does a missed ping: a draining worker is bounded by --drain-timeout only.
    let acts = h.advance(Duration::from_secs(5));
    assert!(
        !signals(&acts).contains(&(top, Signal::SIGABRT)),
        "{acts:?}"
    );
    assert!(kills(&h.advance(Duration::from_secs(25))).contains(&top));
    assert!(!h.log.contains(&Action::Signal {
        pid: top,
        signal: Signal::SIGABRT
    }));
}

#[test]
fn an_exit_reads_as_words_in_a_log_line_and_stays_short_in_status() {
    let cases = [
        (ExitStatus::Code(3), "exited with status 3", "exit status 3"),
        (
            ExitStatus::Signal(9),
            "killed by signal 9 (SIGKILL)",
            "killed by SIGKILL",
        ),
        (
            ExitStatus::Signal(99),
            "killed by signal 99",
            "killed by signal 99",
        ),
    ];
    for (status, phrase, shown) in cases {
        assert_eq!(status.phrase(), phrase);
        assert_eq!(status.to_string(), shown, "herder status, /status, status=");
    }
}
