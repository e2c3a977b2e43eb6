//! The agent (`--agent`): started first, the pool after it, its own restarts, stopped last.

use super::*;

fn with_agent(workers: usize, ready: ReadyMode, required: bool) -> PoolConfig {
    let mut c = cfg(workers);
    c.agent = Some(AgentConfig {
        ready,
        required,
        stop_signal: Signal::SIGINT,
        drain_timeout: Duration::from_secs(7),
        reload: false,
    });
    c
}

impl H {
    /// The pid of the current agent process.
    fn agent_pid(&self) -> i32 {
        let a = self.pool.agent.as_ref().expect("an agent");
        let id = a.slot.current.expect("an agent process");
        a.procs[&id].pid.expect("spawned")
    }
}

fn agent_spawns(acts: &[Action]) -> usize {
    acts.iter()
        .filter(|a| matches!(a, Action::SpawnAgent { .. }))
        .count()
}

#[test]
fn the_agent_starts_first_and_the_pool_once_it_is_ready() {
    let mut h = H::new(with_agent(3, ReadyMode::Notify, false));
    let acts = h.start();
    assert_eq!(agent_spawns(&acts), 1);
    assert_eq!(spawns(&acts), 0, "no worker before the agent is ready");
    let pid = h.agent_pid();
    assert!(!h.pool.is_ready());
    let acts = h.msg(pid, WorkerMsg::Ready);
    assert_eq!(spawns(&acts), 3, "the pool starts at the agent's READY=1");
    assert!(
        manager(&acts).contains(&ManagerMsg::Ready),
        "exec workers: ready now"
    );
    assert!(h.pool.is_ready());
    assert!(h.status().ends_with("; agent ready"), "{}", h.status());
}

#[test]
fn a_failed_first_start_lets_the_pool_start_without_it_unless_required() {
    let mut h = H::new(with_agent(2, ReadyMode::Notify, false));
    h.start();
    let acts = h.exit(h.agent_pid(), CRASH);
    assert_eq!(spawns(&acts), 2, "the pool starts without the agent");
    assert!(
        h.pool.is_ready(),
        "a non-required agent does not hold readiness"
    );
    assert!(
        h.status()
            .contains("agent down (exit status 1), restarting"),
        "{}",
        h.status()
    );

    let mut h = H::new(with_agent(2, ReadyMode::Notify, true));
    h.start();
    let acts = h.exit(h.agent_pid(), CRASH);
    assert_eq!(spawns(&acts), 0, "required: the workers wait for the agent");
    assert!(!h.pool.is_ready());
    let acts = h.until_deadline();
    assert_eq!(agent_spawns(&acts), 1, "restarted after the backoff");
}

#[test]
fn a_crash_looping_agent_backs_off_and_never_stops_the_pool() {
    let mut c = with_agent(2, ReadyMode::Notify, false);
    c.restart_limit = 3;
    let mut h = H::new(c);
    h.start();
    let mut delays = Vec::new();
    for _ in 0..8 {
        let before = h.now;
        h.exit(h.agent_pid(), CRASH);
        let acts = h.until_deadline();
        assert_eq!(agent_spawns(&acts), 1);
        delays.push(h.now - before);
    }
    assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
    assert!(delays[4] > delays[0], "the backoff grows: {delays:?}");
    assert_eq!(
        h.pool.phase,
        Phase::Running,
        "no give-up without --agent-required"
    );
    assert_eq!(h.pool.counters.agent_restarts, 8);
    assert_eq!(h.pool.counters.restarts, 0, "outside the pool's budget");
    assert!(h.pool.is_ready());
}

#[test]
fn a_required_agent_that_keeps_failing_gives_up() {
    let mut c = with_agent(2, ReadyMode::Notify, true);
    c.restart_limit = 3;
    let mut h = H::new(c);
    h.start();
    let mut code = None;
    for _ in 0..6 {
        let acts = h.exit(h.agent_pid(), CRASH);
        code = exit_code(&acts);
        if code.is_some() {
            break;
        }
        h.until_deadline();
    }
    assert_eq!(code, Some(EXIT_GAVE_UP));
    assert!(h
        .pool
        .gave_up
        .as_deref()
        .unwrap_or("")
        .contains("the agent was restarted"));
    assert!(h.pool.workers.is_empty(), "never started a worker");
}

#[test]
fn an_agent_that_served_is_restarted_at_once() {
    let mut h = H::new(with_agent(1, ReadyMode::Exec, false));
    h.start();
    let pid = h.agent_pid();
    h.advance(Duration::from_secs(5));
    let acts = h.exit(pid, ExitStatus::Signal(9));
    assert_eq!(agent_spawns(&acts), 1);
    assert_ne!(h.agent_pid(), pid);
    assert_eq!(spawns(&acts), 0, "the pool is untouched");
}

#[test]
fn stop_drains_the_pool_first_then_the_agent() {
    let mut h = H::new(with_agent(2, ReadyMode::Exec, false));
    h.start();
    let agent = h.agent_pid();
    let workers = h.pids();
    let acts = h.req(Request::Stop);
    let sent = signals(&acts);
    assert!(
        sent.iter().all(|&(p, _)| p != agent),
        "not the agent yet: {sent:?}"
    );
    assert_eq!(sent.len(), 2);
    let acts = h.exit(workers[0], TERMED);
    assert!(signals(&acts).is_empty());
    let acts = h.exit(workers[1], TERMED);
    assert_eq!(
        signals(&acts),
        vec![(agent, Signal::SIGINT)],
        "--agent-stop-signal"
    );
    assert_eq!(exit_code(&acts), None, "herder waits for the agent");
    // --agent-drain-timeout: SIGKILL after 7 s.
    let acts = h.until_deadline();
    assert_eq!(kills(&acts), vec![agent]);
    let acts = h.exit(agent, ExitStatus::Signal(9));
    assert_eq!(exit_code(&acts), Some(EXIT_KILLED));
}

#[test]
fn an_agent_that_exits_while_the_pool_drains_is_not_restarted() {
    let mut h = H::new(with_agent(1, ReadyMode::Exec, false));
    h.start();
    let (agent, worker) = (h.agent_pid(), h.pid(0));
    h.req(Request::Stop);
    let acts = h.exit(agent, CRASH);
    assert_eq!(agent_spawns(&acts), 0);
    let acts = h.exit(worker, TERMED);
    assert_eq!(exit_code(&acts), Some(EXIT_CLEAN));
}

#[test]
fn a_forced_stop_kills_the_agent_too() {
    let mut h = H::new(with_agent(1, ReadyMode::Exec, false));
    h.start();
    let agent = h.agent_pid();
    let acts = h.req(Request::ForceStop);
    assert!(kills(&acts).contains(&agent));
}

#[test]
fn signals_are_forwarded_to_the_agent_too() {
    let mut h = H::new(with_agent(1, ReadyMode::Exec, false));
    h.start();
    let agent = h.agent_pid();
    let acts = h.req(Request::Forward(Signal::SIGUSR1));
    assert!(signals(&acts).contains(&(agent, Signal::SIGUSR1)));
}

#[test]
fn agent_reload_replaces_it_after_the_pool_has_rolled() {
    let mut c = with_agent(1, ReadyMode::Notify, false);
    c.agent.as_mut().unwrap().reload = true;
    let mut h = H::new(c);
    h.start();
    let old = h.agent_pid();
    h.msg(old, WorkerMsg::Ready);
    // (exec workers: the new one is ready at once, and the reload is done in this turn.)
    let acts = h.req(Request::Reload);
    let worker = acts.iter().position(|a| matches!(a, Action::Spawn { .. }));
    let agent = acts
        .iter()
        .position(|a| matches!(a, Action::SpawnAgent { .. }));
    assert!(
        worker < agent && worker.is_some(),
        "the pool rolls first: {acts:?}"
    );
    let a = h.pool.agent.as_ref().unwrap();
    let next = a.slot.next.expect("a new agent once the pool has rolled");
    let new = a.procs[&next].pid.unwrap();
    assert_eq!(
        h.agent_pid(),
        old,
        "the old agent serves until the new one is ready"
    );
    assert!(h.pool.reloading, "the reload ends with the agent's");
    assert!(
        !manager(&acts).contains(&ManagerMsg::Ready),
        "no READY=1 yet"
    );
    let acts = h.msg(new, WorkerMsg::Ready);
    assert_eq!(signals(&acts), vec![(old, Signal::SIGINT)]);
    assert!(!h.pool.reloading);
    assert!(
        manager(&acts).contains(&ManagerMsg::Ready),
        "READY=1 ends the reload"
    );
    assert_eq!(
        h.pool.last_reload,
        Some(ReloadOutcome::Succeeded { generation: 2 })
    );
    assert_eq!(h.agent_pid(), new);
    let acts = h.exit(old, ExitStatus::Signal(2));
    assert_eq!(agent_spawns(&acts), 0, "the old one's exit is expected");
    assert_eq!(h.pool.counters.agent_restarts, 0);
}

#[test]
fn the_agent_crosses_an_upgrade() {
    let mut h = H::new(with_agent(2, ReadyMode::Exec, false));
    h.start();
    let agent = h.agent_pid();
    h.exit(agent, CRASH);
    h.until_deadline();
    let agent = h.agent_pid();
    let snap = h.pool.snapshot(h.now);
    let json = serde_json::to_string(&snap).unwrap();
    let back = serde_json::from_str(&json).unwrap();
    let cfg = h.pool.config().clone();
    let pool = Pool::restore(cfg, back, h.now, h.now);
    let a = pool.agent.as_ref().unwrap();
    assert_eq!(a.procs[&a.slot.current.unwrap()].pid, Some(agent));
    assert_eq!(a.slot.restarts, 1);
    assert_eq!(pool.worker_of_pid(agent), a.slot.current);
    assert!(pool.is_ready());
}

#[test]
fn an_agent_that_misses_its_watchdog_is_aborted_and_restarted() {
    let mut c = with_agent(1, ReadyMode::Exec, false);
    c.worker_watchdog = Some(Duration::from_secs(2));
    let mut h = H::new(c);
    h.start();
    let (agent, worker) = (h.agent_pid(), h.pid(0));
    h.advance(Duration::from_secs(1));
    h.msg(worker, WorkerMsg::Watchdog);
    h.msg(agent, WorkerMsg::Watchdog);
    let acts = h.advance(Duration::from_millis(1500));
    assert!(signals(&acts).is_empty(), "pinged in time: {acts:?}");
    h.msg(worker, WorkerMsg::Watchdog);
    let acts = h.advance(Duration::from_millis(1000));
    assert_eq!(signals(&acts), vec![(agent, Signal::SIGABRT)]);
    let mut killed = Vec::new();
    for _ in 0..5 {
        h.msg(worker, WorkerMsg::Watchdog);
        killed.extend(kills(&h.advance(Duration::from_secs(1))));
    }
    assert_eq!(killed, vec![agent], "SIGKILL after the abort grace");
    let acts = h.exit(agent, ExitStatus::Signal(9));
    assert_eq!(agent_spawns(&acts), 1, "it had served: restarted at once");
    assert_eq!(h.pool.counters.restarts, 0);
}

#[test]
fn a_required_agent_that_dies_makes_the_pool_not_ready_until_it_is_back() {
    let mut h = H::new(with_agent(1, ReadyMode::Notify, true));
    h.start();
    h.msg(h.agent_pid(), WorkerMsg::Ready);
    assert!(h.pool.is_ready());
    h.advance(Duration::from_secs(2));
    h.exit(h.agent_pid(), CRASH);
    assert!(!h.pool.is_ready(), "required: not ready without it");
    assert!(h.pool.ready_count() == 1, "the pool itself still serves");
    h.msg(h.agent_pid(), WorkerMsg::Ready);
    assert!(h.pool.is_ready());
}

#[test]
fn stopping_from_an_agent_that_served_starts_its_replacement() {
    let mut h = H::new(with_agent(1, ReadyMode::Notify, false));
    h.start();
    let old = h.agent_pid();
    h.msg(old, WorkerMsg::Ready);
    h.advance(Duration::from_secs(2));
    let acts = h.msg(old, WorkerMsg::Stopping);
    assert_eq!(agent_spawns(&acts), 1);
    let new = h.agent_pid();
    assert_ne!(new, old);
    let acts = h.exit(old, ExitStatus::Code(0));
    assert_eq!(agent_spawns(&acts), 0, "its exit was announced");
    assert_eq!(h.pool.counters.agent_restarts, 0);
}

fn agent_reload_cfg() -> PoolConfig {
    let mut c = with_agent(1, ReadyMode::Notify, false);
    c.agent.as_mut().unwrap().reload = true;
    c
}

/// The pool rolled; the new agent (its pid) is starting.
fn reloaded_to_the_agent(h: &mut H) -> i32 {
    h.start();
    h.msg(h.agent_pid(), WorkerMsg::Ready);
    h.req(Request::Reload);
    let a = h.pool.agent.as_ref().unwrap();
    a.procs[&a.slot.next.expect("a new agent")].pid.unwrap()
}

#[test]
fn a_new_agent_that_fails_fails_the_reload_and_the_old_one_goes_on() {
    let mut h = H::new(agent_reload_cfg());
    let new = reloaded_to_the_agent(&mut h);
    let old = h.agent_pid();
    let acts = h.exit(new, CRASH);
    assert!(signals(&acts).is_empty(), "the old agent is left alone");
    assert!(!h.pool.reloading);
    assert!(matches!(
        h.pool.last_reload,
        Some(ReloadOutcome::Failed { .. })
    ));
    assert_eq!(h.agent_pid(), old);
    assert_eq!(h.pool.counters.agent_restarts, 0);
}

#[test]
fn a_newer_reload_supersedes_the_new_agent() {
    let mut h = H::new(agent_reload_cfg());
    let first = reloaded_to_the_agent(&mut h);
    let acts = h.req(Request::Reload);
    assert!(kills(&acts).contains(&first), "{acts:?}");
    let a = h.pool.agent.as_ref().unwrap();
    assert!(
        a.slot.next.is_some(),
        "the newest reload starts its own new agent"
    );
    let newest = a.procs[&a.slot.next.unwrap()].pid.unwrap();
    let acts = h.exit(first, ExitStatus::Signal(9));
    assert_eq!(agent_spawns(&acts), 0, "the superseded one is forgotten");
    let acts = h.msg(newest, WorkerMsg::Ready);
    assert!(!h.pool.reloading);
    assert!(manager(&acts).contains(&ManagerMsg::Ready));
    assert_eq!(
        h.pool.last_reload,
        Some(ReloadOutcome::Succeeded { generation: 3 })
    );
}

#[test]
fn an_agent_in_backoff_at_the_end_of_a_reload_does_not_hold_it() {
    let mut h = H::new(agent_reload_cfg());
    h.start();
    h.msg(h.agent_pid(), WorkerMsg::Ready);
    h.exit(h.agent_pid(), CRASH);
    h.req(Request::Reload);
    assert!(
        !h.pool.reloading,
        "nothing to replace: its next start is of the new generation"
    );
    h.until_deadline();
    let a = h.pool.agent.as_ref().unwrap();
    assert_eq!(a.procs[&a.slot.current.unwrap()].generation, 2);
}
