//! The agent's own supervision: restarts at once or with backoff, never a refused request,
//! giving up only with `--agent-required`, STOPPING=1.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::harness::*;

#[test]
fn killing_the_agent_under_load_fails_no_request() {
    let dir = TempDir::new("agent-kill");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    // Created before the kill: the replacement then accepts nothing for its first second,
    // so requests certainly wait in the socket's queue (which herder holds) meanwhile.
    let slow = dir.path().join("slow-start");
    // A connection the agent has accepted dies with it; the claim is about those waiting in
    // the queue. So the agent is told to stop accepting first (and says when what it had
    // accepted is answered), and is killed while the load keeps queueing.
    let pause_dir = dir.path();
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        &[
            ("AGENT_SLOW_START_FILE", slow.to_str().unwrap()),
            ("AGENT_PAUSE_DIR", pause_dir.to_str().unwrap()),
        ],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    let ready_at = Instant::now();
    h.wait_line(&["pool ready"], LONG);
    let to_agent = Load::start(pool, "/agent", 4, Duration::from_millis(2));
    let to_pool = Load::start(pool, "/", 1, Duration::from_millis(10));
    // Past a second of serving: the agent is restarted at once, not after a backoff.
    eventually("the agent serving the load for over a second", LONG, || {
        to_agent.answers_from(old) >= 20 && ready_at.elapsed() > Duration::from_millis(1200)
    });
    std::fs::write(&slow, "").unwrap();
    std::fs::write(pause_dir.join(format!("pause-{old}")), "").unwrap();
    h.wait_line(&[&format!("fixture-agent[{old}] paused")], LONG);
    // SAFETY: kill(2) on the agent pid herder reported.
    unsafe { libc::kill(old, libc::SIGKILL) };
    h.wait_line(
        &[&format!("agent (pid {old}) killed by signal 9 (SIGKILL)")],
        LONG,
    );
    let pool_ok_at_kill = to_pool.ok();
    h.wait_line(&["agent restarting"], LONG);
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    let pool_ok_at_ready = to_pool.ok();
    eventually("the new agent answering the load", LONG, || {
        to_agent.answers_from(new) >= 20
    });
    let (agent_ok, agent_failed, slowest) = to_agent.finish();
    let (pool_ok, pool_failed, _) = to_pool.finish();
    eprintln!(
        "GET /agent: {agent_ok} ok, {agent_failed} failed, slowest {slowest} ms; \
         GET /: {pool_ok} ok, {pool_failed} failed, {} while the agent was down",
        pool_ok_at_ready - pool_ok_at_kill
    );
    assert_eq!(agent_failed, 0, "no request to the agent failed");
    assert_eq!(pool_failed, 0, "no request to the pool failed");
    assert!(
        slowest >= 500,
        "some requests waited in the queue for the replacement ({slowest} ms)"
    );
    assert!(
        pool_ok_at_ready > pool_ok_at_kill,
        "the pool kept serving GET / while the agent was down"
    );
    assert!(
        h.count(&["agent restarting at once"]) == 1,
        "it had served for over a second: {:?}",
        h.lines()
            .iter()
            .filter(|l| l.contains("agent restarting"))
            .collect::<Vec<_>>()
    );

    let doc = status(health);
    let a = &doc["agent"];
    assert_eq!(a["pid"], new, "{a}");
    assert_eq!(a["state"], "ready", "{a}");
    assert_eq!(a["restarts"], 1, "{a}");
    assert!(
        a["last_exit"].as_str().unwrap_or("").contains("SIGKILL"),
        "{a}"
    );
    assert_eq!(
        doc["herder"]["restarts_total"], 0,
        "the agent's restarts are its own: {doc}"
    );
    let (_, metrics) = probe(health, "/metrics");
    assert!(
        metrics.contains("herder_agent_restarts_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("herder_agent_ready 1"), "{metrics}");
    assert_eq!(
        h.lines()
            .iter()
            .filter(|l| is_herder_worker_line(l) && is_worker_exit(l))
            .count(),
        0,
        "no worker was restarted"
    );
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn an_agent_that_always_fails_does_not_stop_the_pool() {
    let dir = TempDir::new("agent-fail");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    let agent = agent_cmd();
    // --restart-limit 2, and the agent fails far more often: without --agent-required herder
    // never gives up because of it.
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--restart-limit",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        // The workers' start-up request waits for no agent for long.
        &[("AGENT_FAIL", "1"), ("WORKER_AGENT_TIMEOUT_MS", "500")],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    h.wait_nth_line(&["agent restarting in "], 4, LONG);
    body_is_a_pid(&get(pool, "/").expect("the pool serves"));
    assert_eq!(probe(health, "/readyz").0, 200, "not required: ready");

    let doc = status(health);
    let a = &doc["agent"];
    let state = a["state"].as_str().unwrap_or_default();
    assert!(state == "backoff" || state == "starting", "{a}");
    assert!(
        a["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("status 1")),
        "{a}"
    );
    let restarts = a["restarts"].as_u64().unwrap();
    assert!(restarts >= 3, "{a}");
    h.wait_nth_line(&["agent restarting in "], 5, LONG);
    eventually("the agent's restarts counted", LONG, || {
        status(health)["agent"]["restarts"].as_u64().unwrap() > restarts
    });

    let delays: Vec<i64> = h
        .lines()
        .iter()
        .filter(|l| l.contains("agent restarting in "))
        .map(|l| num_after(l, "agent restarting in "))
        .collect();
    let doubling: Vec<i64> = (0..delays.len() as u32)
        .map(|i| (100 * 2i64.pow(i)).min(5000))
        .collect();
    assert_eq!(
        delays, doubling,
        "the backoff: 100 ms, doubling, at most 5 s"
    );
    assert!(
        h.lines()
            .iter()
            .filter(|l| l.contains("fixture-agent[") && l.contains("failing on purpose"))
            .count()
            >= 5
    );
    assert_eq!(h.count(&["giving up"]), 0);
    assert!(h.child.try_wait().unwrap().is_none(), "herder still runs");
    body_is_a_pid(&get(pool, "/").expect("the pool still serves"));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_required_agent_that_always_fails_makes_herder_give_up_before_any_worker() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--agent-required",
            "--agent-ready",
            "notify",
            "--restart-limit",
            "3",
        ],
        &[("AGENT_FAIL", "1")],
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1), "gave up");
    let lines = h.lines();
    let exits = lines
        .iter()
        .filter(|l| is_herder_agent_line(l) && l.contains(") exited with status 1"))
        .count();
    assert_eq!(exits, 4, "1 start + 3 restarts, like a worker's slot");
    for ms in [100, 200, 400] {
        assert_eq!(
            h.count(&[&format!("agent restarting in {ms} ms")]),
            1,
            "backoff of {ms} ms"
        );
    }
    assert_eq!(h.count(&["giving up", "agent"]), 1, "{}", lines.join("\n"));
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("fixture-worker[")
                || (is_herder_worker_line(l) && l.contains(SPAWNED))),
        "no worker was ever started:\n{}",
        lines.join("\n")
    );
}

#[test]
fn an_agent_that_says_stopping_is_replaced_at_once() {
    let dir = TempDir::new("agent-retire");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "1",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
        ],
        &[("AGENT_RETIRE_DIR", dir.path().to_str().unwrap())],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    let ready_at = Instant::now();
    h.wait_line(&["pool ready"], LONG);
    // STOPPING=1 counts once the agent has served (a second ready).
    eventually("the agent ready for over a second", LONG, || {
        ready_at.elapsed() > Duration::from_millis(1200)
    });
    // Forwarded to the agent, whose answer is STOPPING=1; it then waits to be released.
    h.signal(libc::SIGUSR1);
    h.wait_line(&[&format!("fixture-agent[{old}] retiring")], LONG);
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    assert!(alive(old), "replaced while the old one still runs");
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {new} ")));
    std::fs::write(dir.path().join(format!("retire-{old}")), "").unwrap();
    h.wait_line(&[&format!("agent (pid {old}) exited with status 0")], LONG);
    assert_eq!(h.count(&["agent restarting in"]), 0, "no backoff");
    let doc = status(health);
    assert_eq!(doc["agent"]["pid"], new, "{doc}");
    assert_eq!(doc["agent"]["state"], "ready", "{doc}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
