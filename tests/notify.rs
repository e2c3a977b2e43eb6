//! sd_notify(3) both ways and the rolling reload, with the real binary: a test-bound datagram
//! socket stands in for systemd's NOTIFY_SOCKET; workers notify herder with real datagrams
//! (the demo worker, and shell scripts using Debian's `systemd-notify`).

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn with_notify(dir: &TempDir, args: &[&str], command: &[&str]) -> (Herder, NotifySocket) {
    let ns = NotifySocket::bind(dir.path());
    let mut cmd = herder_cmd(args, command);
    cmd.env("NOTIFY_SOCKET", &ns.path);
    (Herder::spawn(cmd), ns)
}

fn live_workers(h: &mut Herder) -> Vec<i32> {
    h.spawned_pids().into_iter().filter(|&p| alive(p)).collect()
}

fn has_systemd_notify() -> bool {
    Command::new("systemd-notify")
        .arg("--version")
        .output()
        .is_ok()
}

#[test]
fn the_manager_sees_ready_watchdog_reloading_ready_stopping_in_order() {
    let dir = TempDir::new("seq");
    let ns = NotifySocket::bind(dir.path());
    // Slot 1 of the first generation starts only when the test opens the gate.
    let gate = dir.path().join("gate");
    let script = format!(
        "if [ $HERDER_WORKER = 1 ]; then while [ ! -e {} ]; do sleep 0.02; done; fi; exec {}",
        gate.display(),
        demo_bin()
    );
    let mut cmd = herder_cmd(
        &["-l", "127.0.0.1:0", "-w", "2", "--ready", "notify"],
        &["sh", "-c", &script],
    );
    cmd.env("NOTIFY_SOCKET", &ns.path)
        .env("WATCHDOG_USEC", "400000");
    let mut ns = ns;
    let mut h = Herder::spawn(cmd);

    h.wait_line(&["worker 0 (pid", READY], LONG);
    ns.wait("a STATUS= while starting", LONG, |d| d.contains("STATUS="));
    assert!(
        !ns.received
            .iter()
            .any(|d| d.lines().any(|l| l == "READY=1")),
        "no READY=1 with 1 of 2 workers ready"
    );
    std::fs::write(&gate, "").unwrap();
    let ready = ns.wait_for("READY=1", LONG);
    assert!(
        ready.contains("STATUS=2/2 workers ready, 0 restarts in the last 60s"),
        "{ready}"
    );
    // Started by this test, not by systemd: herder names itself the main process.
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={}", h.pid())),
        "{ready}"
    );
    let first = live_workers(&mut h);

    // WATCHDOG=1 every half interval (200 ms): about 10 in 2 s.
    let start = Instant::now();
    let before = ns
        .received
        .iter()
        .filter(|d| d.contains("WATCHDOG=1"))
        .count();
    while start.elapsed() < Duration::from_secs(2) {
        ns.wait("WATCHDOG=1", LONG, |d| d.contains("WATCHDOG=1"));
    }
    let pings = ns
        .received
        .iter()
        .filter(|d| d.contains("WATCHDOG=1"))
        .count()
        - before;
    assert!(
        (5..=14).contains(&pings),
        "{pings} pings in 2 s at a 400 ms watchdog"
    );

    h.signal(libc::SIGHUP);
    let reloading = ns.wait_for("RELOADING=1", LONG);
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "one datagram: {reloading}"
    );
    ns.wait_for("READY=1", LONG);
    h.wait_line(&["reload complete"], LONG);
    let second = live_workers(&mut h);
    eventually("the old generation to exit", LONG, || {
        first.iter().all(|&p| !alive(p))
    });
    let second: Vec<i32> = second.into_iter().filter(|p| !first.contains(p)).collect();
    assert_eq!(second.len(), 2, "all worker pids are new");

    h.signal(libc::SIGTERM);
    ns.wait_for("STOPPING=1", LONG);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    // The order, as systemd saw it.
    let kinds: Vec<&str> = ns
        .received
        .iter()
        .filter_map(|d| {
            ["READY=1", "RELOADING=1", "STOPPING=1"]
                .into_iter()
                .find(|k| d.lines().any(|l| l == *k))
        })
        .collect();
    assert_eq!(kinds, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]);
}

#[test]
fn an_abstract_notify_socket_works() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("herder-test-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(LONG)).unwrap();
    let mut cmd = herder_cmd(&["-w", "1"], &["sh", "-c", "exec sleep 600"]);
    cmd.env("NOTIFY_SOCKET", format!("@{name}"));
    let _h = Herder::spawn(cmd);
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + LONG;
    loop {
        let n = sock
            .recv(&mut buf)
            .expect("a datagram on the abstract socket");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
        assert!(Instant::now() < deadline);
    }
}

#[test]
fn five_reloads_under_load_fail_no_request() {
    let dir = TempDir::new("reloads");
    let (mut h, mut ns) = with_notify(
        &dir,
        &["-l", "127.0.0.1:0", "-w", "2", "--ready", "notify"],
        &[demo_bin()],
    );
    let addr = h.addr();
    ns.wait_for("READY=1", LONG);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 200_000 {
                    n += 1;
                    match get(addr, "/") {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failed.lock().unwrap().push(e.to_string()),
                    }
                }
            })
        })
        .collect();
    let mut seen_pids = std::collections::BTreeSet::new();
    for round in 1..=5 {
        let before = ok.load(Ordering::SeqCst);
        h.signal(libc::SIGHUP);
        ns.wait_for("RELOADING=1", LONG);
        ns.wait_for("READY=1", LONG);
        h.wait_nth_line(&["reload complete"], round, LONG);
        eventually("requests to flow after the reload", LONG, || {
            ok.load(Ordering::SeqCst) > before + 10
        });
        let pids = live_workers(&mut h);
        assert!(pids.len() >= 2, "round {round}: {pids:?}");
        seen_pids.extend(pids);
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}",
        failed.len(),
        ok.load(Ordering::SeqCst),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(h.count(&["reload complete"]), 5);
    assert!(
        seen_pids.len() >= 10,
        "every reload brought new workers: {seen_pids:?}"
    );
}

#[test]
fn ready_notify_with_systemd_notify_works_100_times_out_of_100() {
    if !has_systemd_notify() {
        eprintln!("skipping: systemd-notify is not installed");
        return;
    }
    let dir = TempDir::new("sdnotify");
    let args = [
        "-w",
        "4",
        "--ready",
        "notify",
        "--ready-timeout",
        "20s",
        "--reload-surge",
        "4",
    ];
    let (mut h, mut ns) = with_notify(
        &dir,
        &args,
        &["sh", "-c", "systemd-notify --ready; exec sleep 600"],
    );
    ns.wait_for("READY=1", LONG);
    for _ in 0..24 {
        h.signal(libc::SIGHUP);
        ns.wait_for("RELOADING=1", LONG);
        let r = ns.wait_for("READY=1", LONG);
        assert!(!r.contains("reload failed"), "{r}");
    }
    // 4 + 24 × 4 notifications, every one counted (the log may trail the datagram a little).
    h.wait_nth_line(&[READY], 100, LONG);
    assert_eq!(h.count(&["not ready within"]), 0);
}

#[test]
fn a_worker_that_never_notifies_is_killed_at_the_ready_timeout() {
    let mut h = Herder::start(
        &[
            "-w",
            "1",
            "--ready",
            "notify",
            "--ready-timeout",
            "1s",
            "--restart-limit",
            "1",
        ],
        &["sh", "-c", "exec sleep 600"],
    );
    assert_eq!(
        h.wait_exit(LONG).code(),
        Some(1),
        "failed starts count toward the restart limit"
    );
    assert_eq!(h.count(&[") not ready within 1s: killing it"]), 2);
    assert_eq!(h.count(&["pool ready"]), 0);
}

#[test]
fn a_reload_whose_new_workers_never_get_ready_is_abandoned() {
    let dir = TempDir::new("badreload");
    let broken = dir.path().join("broken");
    let script = format!(
        "if [ -e {} ]; then exec sleep 600; fi; exec {}",
        broken.display(),
        demo_bin()
    );
    let args = [
        "-l",
        "127.0.0.1:0",
        "-w",
        "2",
        "--ready",
        "notify",
        "--ready-timeout",
        "1s",
    ];
    let (mut h, mut ns) = with_notify(&dir, &args, &["sh", "-c", &script]);
    let addr = h.addr();
    ns.wait_for("READY=1", LONG);
    h.wait_line(&["pool ready"], LONG);
    let old = live_workers(&mut h);
    std::fs::write(&broken, "").unwrap();
    h.signal(libc::SIGHUP);
    let r = ns.wait("READY=1 after the failed reload", LONG, |d| {
        d.lines().any(|l| l == "READY=1")
    });
    assert!(
        r.contains("STATUS=reload failed: slot 0: not ready within 1s"),
        "{r}"
    );
    // The old generation still serves.
    assert_eq!(
        distinct_pids(addr, 2, LONG).into_iter().collect::<Vec<_>>(),
        old
    );
    // The next HUP tries again (and succeeds once the code is fixed).
    std::fs::remove_file(&broken).unwrap();
    h.signal(libc::SIGHUP);
    let r = ns.wait("READY=1 after the retry", LONG, |d| {
        d.lines().any(|l| l == "READY=1")
    });
    assert!(r.contains("STATUS=2/2 workers ready"), "{r}");
    eventually("the old generation to drain and exit", LONG, || {
        old.iter().all(|&p| !alive(p))
    });
    let new = distinct_pids(addr, 2, LONG);
    assert!(new.iter().all(|p| !old.contains(p)), "{new:?} vs {old:?}");
}

#[test]
fn a_worker_that_stops_sending_watchdog_is_replaced() {
    // The demo pings at half the interval: it is left alone.
    let mut h = Herder::start(
        &["-l", "127.0.0.1:0", "-w", "1", "--worker-watchdog", "2s"],
        &[demo_bin()],
    );
    h.wait_line(&["pool ready"], LONG);
    let pid = h.spawned_pids()[0];
    eventually(
        "WATCHDOG_USEC and WATCHDOG_PID in the worker's environment",
        LONG,
        || {
            let env = String::from_utf8_lossy(
                &std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default(),
            )
            .to_string();
            env.contains("WATCHDOG_USEC=2000000") && env.contains(&format!("WATCHDOG_PID={pid}"))
        },
    );
    // Several intervals without a miss (generous, for a loaded machine).
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert_eq!(h.count(&["missed its watchdog"]), 0);
        std::thread::sleep(Duration::from_millis(100));
    }
    // A worker that never pings is aborted and replaced.
    let mut h = Herder::start(
        &["-w", "1", "--worker-watchdog", "300ms"],
        &["sh", "-c", "exec sleep 600"],
    );
    let first = field(&h.wait_line(&[SPAWNED], LONG), "pid").unwrap();
    h.wait_line(&["missed its watchdog", &format!("pid={first}")], LONG);
    h.wait_line(
        &[&format!("(pid {first}) killed by signal 6 (SIGABRT)")],
        LONG,
    );
    h.wait_nth_line(&[SPAWNED], 2, LONG);
}

#[test]
fn a_worker_sending_stopping_gets_its_replacement_before_it_exits() {
    if !has_systemd_notify() {
        eprintln!("skipping: systemd-notify is not installed");
        return;
    }
    let dir = TempDir::new("stopping");
    let gate = dir.path().join("go");
    // The first worker serves a moment (a STOPPING=1 before it served would be a failed
    // start), says STOPPING=1, then waits (up to 30 s) for the test's go before exiting.
    let script = format!(
        "systemd-notify --ready; if [ $HERDER_WORKER = 0 ] && [ ! -e {0}.used ]; then touch {0}.used; \
         sleep 1.5; systemd-notify STOPPING=1; echo said-stopping $$; i=0; while [ ! -e {0} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 0; fi; exec sleep 600",
        gate.display()
    );
    let mut h = Herder::start(
        &["-w", "1", "--ready", "notify", "--restart-limit", "0"],
        &["sh", "-c", &script],
    );
    let line = h.wait_line(&["said-stopping"], LONG);
    let old: i32 = line.split_whitespace().last().unwrap().parse().unwrap();
    h.wait_line(&["stopping on its own (STOPPING=1)"], LONG);
    // The replacement is up while the old one still runs.
    h.wait_nth_line(&[READY], 2, LONG);
    assert!(alive(old), "the old worker has not exited yet");
    std::fs::write(&gate, "").unwrap();
    h.wait_worker_exit(&[&format!("(pid {old})")], LONG);
    // restart-limit 0: had that exit counted as a crash, herder would have given up.
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert_eq!(h.count(&["giving up"]), 0);
}

/// A worker that throws everything at herder's notify socket, then says READY=1.
const HOSTILE: &str = r#"
import os, socket, array, sys, time
while not os.path.exists(sys.argv[1]): time.sleep(0.02)   # the test's go, after its baseline
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"): addr = "\0" + addr[1:]
s.connect(addr)
s.send(b"\xff\xfe\x00garbage\nno-equals\n=\nREADY\nREADY=2\n")
try: s.send(b"READY=1\n" + b"x" * 60000)       # oversized: must be dropped whole
except OSError: pass
nul = [os.open("/dev/null", os.O_RDONLY) for _ in range(10)]
s.sendmsg([b"STATUS=with fds"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", nul))])
for fd in nul: os.close(fd)
s.setblocking(False)
sent = 0
for i in range(20000):                          # a flood
    try: s.send(b"STATUS=flood %d\nWATCHDOG=1\n" % i); sent += 1
    except BlockingIOError: pass
s.setblocking(True)
s.send(b"READY=1\n")
print("hostile done", sent, flush=True)
os.execvp("sleep", ["sleep", "600"])
"#;

#[test]
fn hostile_input_on_the_worker_notify_socket_is_survived_without_leaks() {
    let dir = TempDir::new("hostile");
    let go = dir.path().join("go");
    let go = go.to_str().unwrap();
    let mut h = Herder::start(
        &["-l", "127.0.0.1:0", "-w", "1", "--ready", "notify"],
        &["python3", "-c", HOSTILE, go],
    );
    h.wait_line(&[SPAWNED], LONG);
    let herder_pid = h.pid();
    let devnull = || {
        std::fs::read_dir(format!("/proc/{herder_pid}/fd"))
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|t| t == std::path::Path::new("/dev/null"))
            })
            .count()
    };
    let baseline = devnull();
    std::fs::write(go, "").unwrap();
    h.wait_line(&["hostile done"], LONG);
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(
        h.count(&["oversized"]),
        1,
        "the oversized datagram is dropped (and logged)"
    );
    assert_eq!(
        devnull(),
        baseline,
        "the ten fds passed with SCM_RIGHTS were closed at once"
    );
    // Still responsive: a scale-up goes through the same event loop.
    h.signal(libc::SIGTTIN);
    h.wait_line(&["worker 1 (pid", SPAWNED], LONG);
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", h.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        rss_kb < 64 * 1024,
        "memory stays small after a flood: {rss_kb} kB"
    );
}

#[test]
fn messages_from_outside_the_worker_tree_are_dropped_and_logged_once() {
    let mut h = Herder::start(
        &["-w", "1", "--ready", "notify", "--ready-timeout", "60s"],
        &["sh", "-c", "exec sleep 600"],
    );
    let pid: i32 = field(&h.wait_line(&[SPAWNED], LONG), "pid")
        .unwrap()
        .parse()
        .unwrap();
    let mut ns = String::new();
    eventually("the worker's environment to be readable", LONG, || {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env).to_string();
        ns = env
            .split('\0')
            .find_map(|e| e.strip_prefix("NOTIFY_SOCKET="))
            .unwrap_or_default()
            .to_string();
        !ns.is_empty()
    });
    // This test process (root) is alive and not in the worker's tree.
    let sock = UnixDatagram::unbound().unwrap();
    for _ in 0..3 {
        sock.send_to(b"READY=1\n", &ns).unwrap();
    }
    h.wait_line(&["may not speak for the worker", "OutsideTree"], LONG);
    // A foreign sender must not have made the worker ready.
    assert_eq!(h.count(&["pool ready"]), 0);
    assert_eq!(h.count(&["may not speak for the worker"]), 1, "logged once");
}

#[test]
fn a_storm_of_sighups_collapses_into_one_reload() {
    if !has_systemd_notify() {
        eprintln!("skipping: systemd-notify is not installed");
        return;
    }
    let dir = TempDir::new("storm");
    let args = ["-w", "2", "--ready", "notify", "--reload-surge", "2"];
    // Workers take a moment to get ready, so HUPs land while replacements are starting.
    let (mut h, mut ns) = with_notify(
        &dir,
        &args,
        &[
            "sh",
            "-c",
            "sleep 0.2; systemd-notify --ready; exec sleep 600",
        ],
    );
    ns.wait_for("READY=1", LONG);
    h.wait_line(&["pool ready"], LONG);
    let first = live_workers(&mut h);
    for _ in 0..50 {
        h.signal(libc::SIGHUP);
    }
    ns.wait_for("RELOADING=1", LONG);
    let r = ns.wait_for("READY=1", LONG);
    assert!(r.contains("STATUS=2/2 workers ready"), "{r}");
    h.wait_line(&["reload complete"], LONG);
    // One RELOADING=1 for the whole storm, and the pool ends on one new generation.
    let reloading = ns
        .received
        .iter()
        .filter(|d| d.lines().any(|l| l == "RELOADING=1"))
        .count();
    assert_eq!(reloading, 1, "{:#?}", ns.received);
    eventually("the first generation to drain", LONG, || {
        first.iter().all(|&p| !alive(p))
    });
    let live = live_workers(&mut h);
    assert_eq!(live.len(), 2, "{live:?}");
    // Coalesced: far fewer spawns than signals (each HUP that lands mid-reload replaces only the
    // not-yet-ready workers).
    let spawned = h.count(&[SPAWNED]);
    assert!(spawned < 2 + 2 * 50, "{spawned} spawns for 50 HUPs");
}

#[test]
fn stop_extends_the_timeout_and_give_up_says_why() {
    let dir = TempDir::new("giveup");
    let (mut h, mut ns) = with_notify(
        &dir,
        &["-w", "1", "--restart-limit", "1", "--drain-timeout", "7s"],
        &["sh", "-c", "exit 4"],
    );
    let status = ns.wait("a give-up STATUS=", LONG, |d| d.contains("STATUS=gave up:"));
    assert!(
        status.contains(
            "slot 0 was restarted 2 times within 60s, more than --restart-limit 1; last: exit status 4"
        ),
        "{status}"
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(1));

    let dir = TempDir::new("extend");
    let (mut h, mut ns) = with_notify(
        &dir,
        &["-w", "1", "--drain-timeout", "7s"],
        &["sh", "-c", "exec sleep 600"],
    );
    ns.wait_for("READY=1", LONG);
    h.signal(libc::SIGTERM);
    let stopping = ns.wait_for("STOPPING=1", LONG);
    assert!(
        stopping
            .lines()
            .any(|l| l == "EXTEND_TIMEOUT_USEC=12000000"),
        "drain + 5 s: {stopping}"
    );
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
