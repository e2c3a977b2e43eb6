//! Stopping: the pool drains first, then the agent (its own signal and drain timeout); QUIT
//! kills both at once.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::harness::*;

#[test]
fn a_stop_drains_the_workers_before_the_agent() {
    let dir = TempDir::new("agent-stop");
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix:{}", sock.display());
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "3",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
        ],
        &[],
    );
    let pool = h.addr();
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {pid} ")));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    let lines = h.lines();
    let worker_exits: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_herder_worker_line(l) && is_worker_exit(l))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(worker_exits.len(), 3, "{}", lines.join("\n"));
    let agent_exit = position(&lines, "the agent's exit", |l| {
        is_herder_agent_line(l) && is_worker_exit(l)
    });
    assert!(
        lines[agent_exit].contains(&format!("agent (pid {pid}) exited with status 0")),
        "it exits 0 on SIGTERM: {}",
        lines[agent_exit]
    );
    let drained = position(&lines, "pool drained: stopping the agent", |l| {
        l.contains("pool drained: stopping the agent")
    });
    let agent_termed = position(&lines, "the agent's SIGTERM", |l| {
        l.contains(&format!("fixture-agent[{pid}] got SIGTERM"))
    });
    let last_worker = *worker_exits.last().unwrap();
    assert!(
        last_worker < drained && drained < agent_termed && agent_termed < agent_exit,
        "every worker's exit, then the agent's stop:\n{}",
        lines.join("\n")
    );
    // Each worker's last request, made during its drain, reached the agent.
    let last: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.contains(" last agent "))
        .collect();
    assert_eq!(last.len(), 3, "{}", lines.join("\n"));
    for l in last {
        assert!(
            l.contains(&format!("last agent reply: agent {pid} ")),
            "{l}"
        );
    }
    assert!(!sock.exists(), "the agent's unix socket is removed at exit");
}

#[test]
fn the_agent_gets_its_stop_signal_after_the_pool_and_sigkill_at_its_drain_timeout() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--agent-stop-signal",
            "USR2",
            "--agent-drain-timeout",
            "1s",
        ],
        &[],
    );
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGTERM);
    // USR2 makes the fixture log and carry on: herder must SIGKILL it, a second later.
    h.wait_line(&[&format!("fixture-agent[{pid}] got SIGUSR2")], LONG);
    let asked = Instant::now();
    let code = h.wait_exit(LONG).code();
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "--agent-drain-timeout 1s: {:?}",
        asked.elapsed()
    );
    let lines = h.lines();
    let last_worker_exit = lines
        .iter()
        .rposition(|l| is_herder_worker_line(l) && is_worker_exit(l))
        .expect("worker exits");
    let usr2 = position(&lines, "the agent's USR2", |l| {
        l.contains(&format!("fixture-agent[{pid}] got SIGUSR2"))
    });
    let killed = position(&lines, "the agent killed", |l| {
        l.contains(&format!("agent (pid {pid}) killed by signal 9 (SIGKILL)"))
    });
    assert!(
        last_worker_exit < usr2 && usr2 < killed,
        "{}",
        lines.join("\n")
    );
    assert_eq!(h.count(&["fixture-agent[", "got SIGTERM"]), 0);
    assert_eq!(
        code,
        Some(3),
        "3, as when a worker had to be SIGKILLed at its drain timeout"
    );
}

#[test]
fn quit_kills_the_agent_with_the_pool_at_once() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "60s",
        ],
        &[],
    );
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.signal(libc::SIGQUIT);
    let code = h.wait_exit(LONG).code();
    assert_eq!(code, Some(3), "a forced stop");
    assert_eq!(
        h.count(&[&format!("agent (pid {pid}) killed by signal 9 (SIGKILL)")]),
        1
    );
    assert_eq!(h.count(&["pool drained: stopping the agent"]), 0);
    assert_eq!(h.count(&["fixture-agent[", "got SIGTERM"]), 0);
    assert!(!alive(pid));
}
