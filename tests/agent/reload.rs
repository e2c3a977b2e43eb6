//! Reload and upgrade: `--agent-reload` replaces the agent after the pool; `herder upgrade`
//! keeps it.

use std::path::PathBuf;
use std::process::Command;

use crate::common::*;
use crate::harness::*;

#[test]
fn agent_reload_replaces_the_agent_once_the_pool_has_rolled() {
    let dir = TempDir::new("agent-reload");
    let control_sock = dir.path().join("herder.sock");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "--control",
            control_sock.to_str().unwrap(),
            "-w",
            "2",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            "[::1]:0",
            "--agent-reload",
        ],
        &[],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let old = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    let old_socket = fds(old)[&3].clone();
    let addr = status(health)["agent"]["socket"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        addr.starts_with("[::1]:") && !addr.ends_with(":0"),
        "{addr}"
    );
    h.wait_nth_line(&["fixture-worker[", "start-up agent reply: agent"], 2, LONG);
    let out = control(&control_sock, &["reload", "--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{out:?}");
    let new = wait_agent(&mut h, "ready", 2);
    assert_ne!(new, old);
    assert_eq!(fds(new)[&3], old_socket, "the same socket at fd 3");
    h.wait_line(&[&format!("agent (pid {old}) exited with status 0")], LONG);
    let lines = h.lines();
    // The pool's second generation ready, then the new agent, then the old one's stop.
    let last_worker_ready = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| is_herder_worker_line(l) && l.contains(READY))
        .map(|(i, _)| i)
        .nth(3)
        .unwrap_or_else(|| panic!("4 worker ready lines:\n{}", lines.join("\n")));
    let new_spawned = position(&lines, "the new agent spawned", |l| {
        l.contains(&format!("agent (pid {new}) spawned"))
    });
    let new_ready = position(&lines, "the new agent ready", |l| {
        l.contains(&format!("agent (pid {new}) ready"))
    });
    let old_termed = position(&lines, "the old agent's SIGTERM", |l| {
        l.contains(&format!("fixture-agent[{old}] got SIGTERM"))
    });
    assert!(
        last_worker_ready < new_spawned && new_ready < old_termed,
        "the pool rolled, then a new agent, then the old one stopped:\n{}",
        lines.join("\n")
    );
    // The reload (and so `reload --wait`, and READY=1 under Type=notify-reload) ends with the
    // new agent ready, not when the pool has rolled.
    let complete = position(&lines, "reload complete", |l| l.contains("reload complete"));
    assert!(
        new_ready < complete,
        "the reload ended after the new agent was ready:\n{}",
        lines.join("\n")
    );
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {new} ")));
    let doc = status(health);
    assert_eq!(doc["agent"]["pid"], new, "{doc}");
    assert_eq!(doc["agent"]["state"], "ready", "{doc}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn an_upgrade_keeps_the_agent() {
    let dir = TempDir::new("agent-upgrade");
    let exe: PathBuf = dir.path().join("herder");
    install(&exe, "one");
    let control_sock = dir.path().join("herder.sock");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
    let agent = agent_cmd();
    let mut cmd = Command::new(&exe);
    cmd.args(["-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--control"])
        .arg(&control_sock)
        .args(["-w", "2", "--ready", "notify", "--agent", &agent])
        .args(["--agent-listen", &addr, "--"])
        .args(WORKER)
        .env("HERDER_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    let mut h = Herder::spawn(cmd);
    let pool = h.addr();
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    let before = get(pool, "/agent").unwrap();
    assert!(before.starts_with(&format!("agent {pid} ")), "{before}");
    let counter_before = num_after(&before, &format!("agent {pid} "));
    let socket_before = fds(pid)[&3].clone();
    let workers = slot_pids(&status(health));

    install(&exe, "two");
    let out = control(&control_sock, &["upgrade", "--wait", "--timeout", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = status(health);
    assert!(
        doc["herder"]["version"].as_str().unwrap().ends_with("+two"),
        "{doc}"
    );
    assert_eq!(doc["agent"]["pid"], pid, "the same agent: {doc}");
    assert_eq!(doc["agent"]["restarts"], 0, "{doc}");
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(slot_pids(&doc), workers);
    assert!(alive(pid));
    assert_eq!(fds(pid)[&3], socket_before);
    // The same process, counting on: not a new agent with the same pid by chance.
    let after = get(pool, "/agent").unwrap();
    assert!(after.starts_with(&format!("agent {pid} ")), "{after}");
    assert!(num_after(&after, &format!("agent {pid} ")) > counter_before);
    let agent_exits = h
        .lines()
        .iter()
        .filter(|l| is_herder_agent_line(l) && is_worker_exit(l))
        .count();
    assert_eq!(agent_exits, 0, "the agent was neither stopped nor killed");
    // The new image knows it is the agent: a stop still ends it after the workers.
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    let lines = h.lines();
    let agent_exit = position(&lines, "the agent's exit", |l| {
        l.contains(&format!("agent (pid {pid}) exited with status 0"))
    });
    let last_worker_exit = lines
        .iter()
        .rposition(|l| is_herder_worker_line(l) && is_worker_exit(l))
        .expect("worker exits");
    assert!(last_worker_exit < agent_exit, "{}", lines.join("\n"));
}
