//! Start-up: the agent before any worker, its socket and environment, readiness, usage errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::*;
use crate::harness::*;

#[test]
fn the_agent_is_ready_before_any_worker_starts() {
    let dir = TempDir::new("agent-order");
    let sock = dir.path().join("agent.sock");
    let addr = format!("unix:{}", sock.display());
    let systemd = NotifySocket::bind(dir.path());
    let agent = agent_cmd();
    let mut cmd = herder_cmd(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "3",
            "--ready",
            "notify",
            "--agent",
            &agent,
            "--agent-listen",
            &addr,
            "--agent-ready",
            "notify",
        ],
        &WORKER,
    );
    // Slow to become ready: a herder that started the workers at the agent's exec, not at
    // its READY=1, would have workers whose start-up request is answered "state=starting".
    cmd.env("AGENT_READY_DELAY_MS", "1500")
        .env("NOTIFY_SOCKET", &systemd.path);
    let mut systemd = systemd;
    let mut h = Herder::spawn(cmd);
    let pool = h.addr();
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    // Each worker asks the agent before its READY=1, so all three have by now.
    h.wait_nth_line(&["fixture-worker[", "start-up agent"], 3, LONG);
    let lines = h.lines();

    let starting_agent = position(&lines, "starting the agent", |l| {
        l.contains("starting the agent")
    });
    let starting_pool = position(&lines, "starting the pool", |l| {
        l.contains("starting the pool")
    });
    assert!(starting_agent < starting_pool, "{}", lines.join("\n"));
    let spawned = position(&lines, "agent (pid P) spawned", |l| {
        is_herder_agent_line(l) && l.contains(") spawned")
    });
    assert_eq!(agent_pid(&lines[spawned]), pid);
    let ready = position(&lines, "agent (pid P) ready", |l| {
        is_herder_agent_line(l) && l.contains(") ready")
    });
    let first_worker = position(&lines, "worker S (pid P) spawned", |l| {
        is_herder_worker_line(l) && l.contains(SPAWNED)
    });
    assert!(
        spawned < ready && ready < first_worker,
        "the agent ready before any worker spawned:\n{}",
        lines.join("\n")
    );

    // The processes' own clocks say the same: every worker started after the agent was ready.
    let agent_ready_ns = mono_ns(
        &lines[position(&lines, "the agent's ready", |l| {
            l.contains(&format!("fixture-agent[{pid}] ready mono_ns="))
        })],
    );
    let worker_starts: Vec<u64> = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.contains(" started mono_ns="))
        .map(|l| mono_ns(l))
        .collect();
    assert_eq!(worker_starts.len(), 3, "{}", lines.join("\n"));
    for t in &worker_starts {
        assert!(
            *t > agent_ready_ns,
            "a worker started at {t} ns, before the agent's READY=1 at {agent_ready_ns} ns"
        );
    }

    // Every worker was told the socket and reached the agent, ready, at start-up.
    let told = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.ends_with(&format!("agent socket {addr}")))
        .count();
    assert_eq!(told, 3, "HERDER_AGENT_SOCKET={addr}:\n{}", lines.join("\n"));
    let replies: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("start-up agent"))
        .collect();
    assert_eq!(replies.len(), 3);
    for r in &replies {
        assert!(
            r.contains(&format!("start-up agent reply: agent {pid} "))
                && r.ends_with("state=ready"),
            "{r}"
        );
    }

    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(
        mode & 0o777,
        0o660,
        "the agent's unix socket: the workers' uid and group only"
    );

    // The pool reaches the agent; herder says so everywhere.
    let body = get(pool, "/agent").expect("GET /agent");
    assert!(body.starts_with(&format!("agent {pid} ")), "{body}");
    assert_eq!(probe(health, "/readyz").0, 200);
    let doc = status(health);
    let a = &doc["agent"];
    assert_eq!(a["pid"], pid, "{a}");
    assert_eq!(a["state"], "ready", "{a}");
    assert_eq!(a["socket"], addr.as_str(), "{a}");
    assert_eq!(a["required"], false, "{a}");
    assert_eq!(a["restarts"], 0, "{a}");
    systemd.wait_for("READY=1", LONG);
    let says_agent_ready = |d: &str| {
        d.lines()
            .any(|l| l.starts_with("STATUS=") && l.contains("agent ready"))
    };
    if !systemd.received.iter().any(|d| says_agent_ready(d)) {
        systemd.wait(
            "a STATUS= saying the agent is ready",
            LONG,
            says_agent_ready,
        );
    }

    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert!(!sock.exists(), "the agent's unix socket is removed at exit");
}

#[test]
fn a_tcp_agent_socket_on_port_0_is_bound_once_and_told_to_every_worker() {
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "--health",
            "127.0.0.1:0",
            "-w",
            "2",
            "--agent",
            &agent,
            "--agent-listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    h.wait_nth_line(&["fixture-worker[", "start-up agent"], 2, LONG);
    let doc = status(health);
    let addr = doc["agent"]["socket"]
        .as_str()
        .unwrap_or_else(|| panic!("no agent socket in {doc}"))
        .to_string();
    let bound: SocketAddr = addr.parse().expect("HOST:PORT");
    assert!(bound.ip().is_loopback() && bound.port() != 0, "{addr}");
    let pid = doc["agent"]["pid"].as_i64().unwrap() as i32;

    let lines = h.lines();
    let spawned = position(&lines, "agent (pid P) spawned", |l| {
        is_herder_agent_line(l) && l.contains(") spawned")
    });
    assert_eq!(agent_pid(&lines[spawned]), pid);
    let first_worker = position(&lines, "worker S (pid P) spawned", |l| {
        is_herder_worker_line(l) && l.contains(SPAWNED)
    });
    assert!(spawned < first_worker, "{}", lines.join("\n"));
    let told = lines
        .iter()
        .filter(|l| l.contains("fixture-worker[") && l.ends_with(&format!("agent socket {addr}")))
        .count();
    assert_eq!(told, 2, "HERDER_AGENT_SOCKET={addr}:\n{}", lines.join("\n"));
    // --agent-ready defaults to --ready (exec): the workers may connect before the agent
    // accepts, but herder bound the socket first, so the kernel queues them.
    for r in lines.iter().filter(|l| l.contains("start-up agent")) {
        assert!(
            r.contains(&format!("start-up agent reply: agent {pid} ")),
            "{r}"
        );
    }
    // Reachable directly too, at the address herder printed.
    let mut s = TcpStream::connect_timeout(&bound, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(b"hello from the test\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with(&format!("agent {pid} ")), "{answer}");
    let body = get(pool, "/agent").expect("GET /agent");
    assert!(body.starts_with(&format!("agent {pid} ")), "{body}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn the_agent_gets_its_socket_and_environment_and_none_of_the_pools_sockets() {
    let dir = TempDir::new("agent-env");
    let control_sock = dir.path().join("herder.sock");
    let pool_unix = format!("unix:{}", dir.path().join("pool.sock").display());
    let addr = abstract_name("env");
    let agent = agent_cmd();
    let mut h = start(
        &[
            "-l",
            "127.0.0.1:0",
            "-l",
            &pool_unix,
            "--health",
            "127.0.0.1:0",
            "--control",
            control_sock.to_str().unwrap(),
            "-w",
            "1",
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
    let health = health_addr(&mut h);
    let pid = wait_agent(&mut h, "ready", 1);
    h.wait_line(&["pool ready"], LONG);
    h.wait_line(&["fixture-worker[", "start-up agent reply: agent"], LONG);
    let worker = slot_pids(&status(health))[0] as i32;

    let env = environ(pid);
    for want in [
        "HERDER_AGENT=1".to_string(),
        "LISTEN_FDS=1".to_string(),
        format!("LISTEN_PID={pid}"),
        "LISTEN_FDNAMES=agent".to_string(),
        format!("HERDER_AGENT_SOCKET={addr}"),
    ] {
        assert!(env.contains(&want), "the agent has {want}: {env:?}");
    }
    assert!(
        env.iter().any(|v| v.starts_with("NOTIFY_SOCKET=")),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|v| v.starts_with("HERDER_WORKER=")),
        "{env:?}"
    );
    let wenv = environ(worker);
    assert!(
        wenv.contains(&format!("HERDER_AGENT_SOCKET={addr}")),
        "{wenv:?}"
    );
    assert!(wenv.contains(&"HERDER_WORKER=0".to_string()), "{wenv:?}");
    assert!(!wenv.contains(&"HERDER_AGENT=1".to_string()), "{wenv:?}");

    // Its socket at fd 3, and nothing of the pool's: the worker's fds 3 and 4 are the pool's.
    let afds = fds(pid);
    let wfds = fds(worker);
    let pool_sockets: Vec<&String> = [3, 4].iter().map(|n| &wfds[n]).collect();
    assert!(afds[&3].starts_with("socket:"), "{afds:?}");
    for s in &pool_sockets {
        assert!(s.starts_with("socket:"), "{wfds:?}");
        assert!(
            !afds.values().any(|v| v == *s),
            "the agent holds the pool's {s}: {afds:?}"
        );
    }
    assert!(
        !wfds.values().any(|v| *v == afds[&3]),
        "a worker holds the agent's socket: {wfds:?}"
    );
    assert_eq!(afds[&0], "/dev/null", "{afds:?}");
    assert_eq!(
        afds.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "no other fd: {afds:?}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let pgrp: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, pid, "its own process group");

    // USR1 reaches the agent too.
    h.signal(libc::SIGUSR1);
    h.wait_line(&[&format!("fixture-agent[{pid}] got SIGUSR1")], LONG);

    // `herder status`: one row for the agent; /status says the rest.
    let out = control(&control_sock, &["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some("agent"))
        .unwrap_or_else(|| panic!("no agent row:\n{table}"));
    assert!(row.contains(&pid.to_string()), "{row}");
    assert!(
        table
            .lines()
            .any(|l| l.trim() == format!("agent socket: {addr}")),
        "{table}"
    );
    let doc = status(health);
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(doc["agent"]["pid"], pid, "{doc}");
    let json = control(&control_sock, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["agent"]["pid"], pid, "{json}");

    // A reload without --agent-reload rolls the pool and leaves the agent alone.
    let out = control(&control_sock, &["reload", "--wait", "--timeout", "30s"]);
    assert!(out.status.success(), "{out:?}");
    let doc = status(health);
    assert_ne!(slot_pids(&doc)[0] as i32, worker, "the pool rolled");
    assert_eq!(doc["agent"]["pid"], pid, "the agent did not: {doc}");
    assert!(get(pool, "/agent")
        .unwrap()
        .starts_with(&format!("agent {pid} ")));
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn agent_options_without_an_agent_are_a_usage_error() {
    let agent = agent_cmd();
    let cases: [&[&str]; 6] = [
        &["--agent-listen", "127.0.0.1:0"],
        &["--agent-required"],
        &["--agent-reload"],
        &["--agent-ready", "notify"],
        &["--agent", ""],
        &["--agent", &agent, "--agent-listen", "udp:127.0.0.1:0"],
    ];
    for args in cases {
        let mut h = Herder::spawn(herder_cmd(args, &["sh", "-c", "echo WORKER RAN"]));
        let code = h.wait_exit(Duration::from_secs(10)).code();
        let lines = h.lines();
        assert_eq!(code, Some(2), "{args:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{args:?}: one line: {lines:?}");
        assert!(lines[0].starts_with("herder: "), "{args:?}: {lines:?}");
        assert!(lines[0].contains("--agent"), "{args:?}: {lines:?}");
    }
    // And without any agent option, /status says there is none.
    let mut h = Herder::start(
        &["--health", "127.0.0.1:0", "-w", "1"],
        &["sh", "-c", "exec sleep 600"],
    );
    let health = health_addr(&mut h);
    h.wait_line(&["pool ready"], LONG);
    let doc = status(health);
    assert!(doc.get("agent").is_some_and(|a| a.is_null()), "{doc}");
}

#[test]
fn a_required_agent_gates_the_workers_and_readyz_configured_from_the_environment() {
    let dir = TempDir::new("agent-required");
    let gate = dir.path().join("gate");
    let addr = format!("unix:{}", dir.path().join("agent.sock").display());
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
        ],
        &[
            ("HERDER_AGENT_COMMAND", &agent),
            ("HERDER_AGENT_LISTEN", &addr),
            ("HERDER_AGENT_REQUIRED", "true"),
            ("AGENT_READY_GATE", gate.to_str().unwrap()),
        ],
    );
    let pool = h.addr();
    let health = health_addr(&mut h);
    let first = wait_agent(&mut h, "spawned", 1);
    h.wait_line(&[&format!("fixture-agent[{first}] waiting for")], LONG);
    let (code, body) = probe(health, "/readyz");
    assert_eq!(code, 503, "{body}");
    let doc = status(health);
    assert_eq!(doc["agent"]["state"], "starting", "{doc}");
    assert_eq!(doc["agent"]["required"], true, "{doc}");
    assert_eq!(doc["agent"]["socket"], addr.as_str(), "{doc}");
    assert_eq!(
        h.lines()
            .iter()
            .filter(|l| is_herder_worker_line(l) && l.contains(SPAWNED))
            .count(),
        0,
        "no worker before a required agent's READY=1"
    );
    std::fs::write(&gate, "").unwrap();
    assert_eq!(wait_agent(&mut h, "ready", 1), first);
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(probe(health, "/readyz").0, 200);

    // Down again: /readyz says so at once, while the pool keeps serving.
    std::fs::remove_file(&gate).unwrap();
    // SAFETY: kill(2) on the agent pid herder reported.
    unsafe { libc::kill(first, libc::SIGKILL) };
    h.wait_line(&[&format!("agent (pid {first}) killed by signal 9")], LONG);
    let second = wait_agent(&mut h, "spawned", 2);
    h.wait_line(&[&format!("fixture-agent[{second}] waiting for")], LONG);
    let (code, body) = probe(health, "/readyz");
    assert_eq!(code, 503, "a required agent that is not ready: {body}");
    assert!(body.contains("agent"), "says why: {body}");
    body_is_a_pid(&get(pool, "/").expect("the pool serves meanwhile"));
    std::fs::write(&gate, "").unwrap();
    assert_eq!(wait_agent(&mut h, "ready", 2), second);
    eventually("/readyz 200 again", LONG, || {
        probe(health, "/readyz").0 == 200
    });
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
