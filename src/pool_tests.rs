//! Unit tests of the pure core: events in, actions out, a fake clock, no processes.

use super::*;

fn cfg(workers: usize) -> PoolConfig {
    PoolConfig {
        workers,
        ready: ReadyMode::Exec,
        ready_timeout: Duration::from_secs(60),
        min_ready: None,
        stop_signal: Signal::SIGTERM,
        drain_timeout: Duration::from_secs(30),
        shutdown_delay: Duration::ZERO,
        restart_limit: 10,
        restart_window: Duration::from_secs(60),
        reload_surge: 1,
        worker_watchdog: None,
        manager_watchdog: None,
    }
}

/// A pool, a fake clock, and a fake kernel that hands out pids.
struct H {
    pool: Pool,
    now: Instant,
    next_pid: i32,
    /// Every action seen, in order.
    log: Vec<Action>,
}

impl H {
    fn new(c: PoolConfig) -> H {
        let now = Instant::now();
        H {
            pool: Pool::new(c, now),
            now,
            next_pid: 100,
            log: Vec::new(),
        }
    }

    /// Feeds an event; performs Spawn actions (successfully) the way the supervisor would.
    fn ev(&mut self, e: Event) -> Vec<Action> {
        let mut all = Vec::new();
        let mut queue = vec![e];
        while let Some(e) = queue.pop() {
            let acts = self.pool.handle(e, self.now);
            for a in &acts {
                if let Action::Spawn { id, .. } = a {
                    self.next_pid += 1;
                    queue.insert(
                        0,
                        Event::Spawned {
                            id: *id,
                            pid: self.next_pid,
                        },
                    );
                }
            }
            all.extend(acts);
        }
        self.log.extend(all.clone());
        all
    }

    fn start(&mut self) -> Vec<Action> {
        self.ev(Event::Start)
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.ev(Event::Tick)
    }

    fn exit(&mut self, pid: i32, status: ExitStatus) -> Vec<Action> {
        self.ev(Event::Exited { pid, status })
    }

    fn msg(&mut self, pid: i32, msg: WorkerMsg) -> Vec<Action> {
        let id = self.pool.worker_of_pid(pid).expect("known pid");
        self.ev(Event::Message { id, msg })
    }

    fn req(&mut self, r: Request) -> Vec<Action> {
        self.ev(Event::Request(r))
    }

    /// The pid serving `slot`.
    fn pid(&self, slot: usize) -> i32 {
        let id = self.pool.slots[slot].current.expect("slot has a worker");
        self.pool.workers[&id].pid.expect("spawned")
    }

    fn pids(&self) -> Vec<i32> {
        (0..self.pool.slots.len()).map(|s| self.pid(s)).collect()
    }
}

fn spawns(acts: &[Action]) -> usize {
    acts.iter()
        .filter(|a| matches!(a, Action::Spawn { .. }))
        .count()
}

fn manager(acts: &[Action]) -> Vec<ManagerMsg> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Manager(m) => Some(m.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn signals(acts: &[Action]) -> Vec<(i32, Signal)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Signal { pid, signal } => Some((*pid, *signal)),
            _ => None,
        })
        .collect()
}

fn kills(acts: &[Action]) -> Vec<i32> {
    acts.iter()
        .filter_map(|a| match a {
            Action::KillGroup { pid } => Some(*pid),
            _ => None,
        })
        .collect()
}

fn exit_code(acts: &[Action]) -> Option<i32> {
    acts.iter().find_map(|a| match a {
        Action::Exit(c) => Some(*c),
        _ => None,
    })
}

const CRASH: ExitStatus = ExitStatus::Code(1);
const TERMED: ExitStatus = ExitStatus::Signal(15);

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
fn a_worker_that_served_a_second_resets_the_backoff() {
    let mut h = H::new(cfg(1));
    h.start();
    h.exit(h.pid(0), CRASH);
    h.advance(Duration::from_millis(100));
    h.advance(Duration::from_millis(999)); // ready (exec mode) and served 999 ms
    h.exit(h.pid(0), CRASH);
    assert_eq!(
        h.pool.next_deadline(),
        Some(h.now + Duration::from_millis(200)),
        "not yet"
    );
    h.advance(Duration::from_millis(200));
    h.advance(Duration::from_secs(1)); // served a full second: a kill, not a crash loop
    h.exit(h.pid(0), CRASH);
    assert_eq!(
        h.pool.next_deadline(),
        Some(h.now + Duration::from_millis(100))
    );
}

#[test]
fn more_than_the_restart_limit_gives_up_and_drains_the_rest() {
    let mut c = cfg(2);
    c.restart_limit = 3;
    let mut h = H::new(c);
    h.start();
    let healthy = h.pid(1);
    for _ in 0..3 {
        h.exit(h.pid(0), CRASH);
        let d = h.pool.next_deadline().unwrap() - h.now;
        h.advance(d);
    }
    let acts = h.exit(h.pid(0), CRASH);
    assert_eq!(spawns(&acts), 0, "the 4th restart is not made");
    assert_eq!(
        signals(&acts),
        vec![(healthy, Signal::SIGTERM)],
        "the rest is drained gracefully"
    );
    assert!(manager(&acts).iter().any(|m| matches!(m, ManagerMsg::Status(s) if s.starts_with("gave up: more than 3 restarts within 60s"))));
    let acts = h.exit(healthy, TERMED);
    assert_eq!(exit_code(&acts), Some(EXIT_GAVE_UP));
}

#[test]
fn a_command_that_cannot_run_backs_off_and_gives_up_without_spinning() {
    let mut c = cfg(1);
    c.restart_limit = 2;
    let mut h = H::new(c);
    // Every spawn fails (as exec of a missing command does).
    let mut acts = h.pool.handle(Event::Start, h.now);
    let mut attempts = 0;
    while let Some(Action::Spawn { id, .. }) = acts
        .iter()
        .find(|a| matches!(a, Action::Spawn { .. }))
        .cloned()
    {
        attempts += 1;
        acts = h.pool.handle(
            Event::SpawnFailed {
                id,
                code: 127,
                reason: "not found".into(),
            },
            h.now,
        );
        if let Some(code) = exit_code(&acts) {
            assert_eq!(code, EXIT_GAVE_UP);
            break;
        }
        let due = h.pool.next_deadline().expect("a backoff is pending");
        assert!(due > h.now, "never an immediate retry");
        h.now = due;
        acts = h.pool.handle(Event::Tick, h.now);
    }
    assert_eq!(attempts, 3, "limit 2: two restarts, then give up");
}

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

#[test]
fn stopping_from_a_worker_starts_its_replacement_and_is_not_a_crash() {
    let mut h = H::new(cfg(1));
    h.start();
    let old = h.pid(0);
    let acts = h.msg(old, WorkerMsg::Stopping);
    assert_eq!(spawns(&acts), 1, "replacement before the old one exits");
    let acts = h.exit(old, ExitStatus::Code(0));
    assert_eq!(spawns(&acts), 0);
    assert_eq!(h.pool.slots[0].restarts, 0);
    assert_eq!(h.pool.next_deadline(), None, "no backoff pending");
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
    h.exit(pid, ExitStatus::Signal(9));
    assert_eq!(h.pool.slots[0].restarts, 1, "counted as a failure");
    assert_eq!(spawns(&h.advance(Duration::from_millis(100))), 1);
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
fn systemd_watchdog_pings_at_half_interval_only_while_healthy() {
    let mut c = cfg(1);
    c.manager_watchdog = Some(Duration::from_secs(2));
    let mut h = H::new(c);
    h.start();
    assert!(manager(&h.advance(Duration::ZERO)).contains(&ManagerMsg::Watchdog));
    assert!(manager(&h.advance(Duration::from_secs(1))).contains(&ManagerMsg::Watchdog));
    // The only worker dies and cannot come back (limit 10, but we never let the backoff run).
    let pid = h.pid(0);
    h.exit(pid, CRASH);
    h.pool.slots[0].backoff_until = None;
    assert!(
        manager(&h.advance(Duration::from_secs(1))).contains(&ManagerMsg::Watchdog),
        "1s without a ready worker"
    );
    assert!(
        !manager(&h.advance(Duration::from_secs(1))).contains(&ManagerMsg::Watchdog),
        "2s: unhealthy"
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
