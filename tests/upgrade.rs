//! `herder upgrade`: herder re-executes the binary at the path it was started from, in place —
//! the same pid, the same sockets, the same running workers — while clients keep connecting.
//! The binaries are copies of this build with a build tag stamped in
//! (packaging/stamp-build-tag.py), so the old and the new one report different versions.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const STAMP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/stamp-build-tag.py");

/// A copy of the herder under test at `path`, stamped with `tag`; put in place the way a
/// package manager does (a new file renamed over the old one).
fn install(path: &Path, tag: &str) {
    let tmp = path.with_extension("new");
    std::fs::copy(herder_bin(), &tmp).unwrap();
    let out = Command::new("python3")
        .arg(STAMP)
        .arg(&tmp)
        .arg(tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&tmp, path).unwrap();
}

/// `bytes` as the executable at `path`, renamed into place (the running one is busy).
fn put(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn client(sock: &Path, args: &[&str]) -> Output {
    Command::new(herder_bin())
        .args(args)
        .arg("--control")
        .arg(sock)
        .output()
        .unwrap()
}

fn status(sock: &Path) -> serde_json::Value {
    let out = client(sock, &["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn slot_pids(doc: &serde_json::Value) -> Vec<i64> {
    doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_i64().unwrap_or(0))
        .collect()
}

/// New connections, one request each, until stopped: (ok, failed).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..4)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        match get(addr, "/") {
                            Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                            Err(e) => {
                                eprintln!("  load: {e}");
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

struct Setup {
    _dir: TempDir,
    exe: PathBuf,
    sock: PathBuf,
    h: Herder,
}

fn start(tag: &str, extra: &[&str], command: &[&str]) -> Setup {
    start_with(tag, &[], extra, command)
}

/// As [`start`], with `env` added to herder's environment.
fn start_with(tag: &str, env: &[(&str, &str)], extra: &[&str], command: &[&str]) -> Setup {
    let dir = TempDir::new("upgrade");
    let exe = dir.path().join("herder");
    install(&exe, tag);
    let sock = dir.path().join("herder.sock");
    let mut cmd = Command::new(&exe);
    cmd.args(["-l", "127.0.0.1:0", "--health", "127.0.0.1:0", "--control"])
        .arg(&sock)
        .args(extra)
        .arg("--")
        .args(command)
        .env("HERDER_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .envs(env.iter().copied());
    let mut h = Herder::spawn(cmd);
    h.wait_line(&["pool ready"], LONG);
    Setup {
        _dir: dir,
        exe,
        sock,
        h,
    }
}

fn http_code(addr: SocketAddr, path: &str) -> u16 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn upgrade_keeps_the_pid_the_workers_and_every_connection() {
    // --worker-watchdog 1s: the workers ping herder every half second, so they stay alive after
    // the upgrade only if the new image reads their (inherited) notify sockets.
    let mut s = start(
        "one",
        &[
            "-w",
            "2",
            "--reuseport",
            "--ready",
            "notify",
            "--worker-watchdog",
            "1s",
        ],
        &[demo_bin()],
    );
    let addr = s.h.addr();
    let health = health_addr(&mut s.h);
    let pid = s.h.pid();
    // A restart before the upgrade: the history must come across.
    let before = status(&s.sock);
    let victim = slot_pids(&before)[0] as i32;
    // SAFETY: kill(2) on a worker of the herder this test started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let mut doc = serde_json::Value::Null;
    eventually("the killed worker replaced", LONG, || {
        doc = status(&s.sock);
        doc["herder"]["ready_workers"] == 2 && !slot_pids(&doc).contains(&(victim as i64))
    });
    assert!(doc["herder"]["version"].as_str().unwrap().ends_with("+one"));
    let workers = slot_pids(&doc);

    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    // Settled: a control connection of the last `status` may still be closing; the least of a
    // few samples over 200 ms is the table without it.
    let fds_before = (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            fds(pid)
        })
        .min()
        .unwrap();
    let load = Load::start(addr);
    eventually("load running", LONG, || load.ok() > 20);
    install(&s.exe, "two");
    let out = client(&s.sock, &["upgrade", "--wait", "--timeout", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("+two"),
        "{out:?}"
    );

    let after = status(&s.sock);
    let h = &after["herder"];
    assert_eq!(h["pid"], pid as i64, "the same pid");
    assert!(h["version"].as_str().unwrap().ends_with("+two"), "{h}");
    assert!(
        h["last_upgrade"]["from"]
            .as_str()
            .unwrap()
            .ends_with("+one"),
        "{h}"
    );
    assert_eq!(h["restarts_total"], 1, "the restart history came across");
    assert_eq!(
        slot_pids(&after),
        workers,
        "the same workers, not restarted"
    );
    eventually(
        "the same fds as before: none lost, none leaked",
        LONG,
        || fds(pid) == fds_before,
    );
    assert_eq!(http_code(health, "/livez"), 200);
    assert_eq!(http_code(health, "/readyz"), 200);
    // Three watchdog intervals under load on the new image: the same workers still.
    let t = Instant::now();
    eventually("3 s of serving after the upgrade", LONG, || {
        t.elapsed() >= Duration::from_secs(3)
    });
    assert_eq!(slot_pids(&status(&s.sock)), workers, "fed their watchdog");
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "{ok} ok");
    assert_eq!(s.h.worker_exits(), 1, "only the one killed on purpose");
    let metrics = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(health).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut m = String::new();
        c.read_to_string(&mut m).unwrap();
        m
    };
    assert!(
        metrics.contains("herder_upgrades_total{result=\"succeeded\"} 1"),
        "{metrics}"
    );

    // The new image reloads and stops like any herder.
    let out = client(&s.sock, &["reload", "--wait", "--timeout", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reloaded = slot_pids(&status(&s.sock));
    assert!(
        reloaded.iter().all(|p| !workers.contains(p)),
        "{reloaded:?}"
    );
    let out = client(&s.sock, &["stop"]);
    assert!(out.status.success());
    assert_eq!(s.h.wait_exit(LONG).code(), Some(0));
}

fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[test]
fn an_upgrade_keeps_the_configuration_from_the_environment() {
    // Set only in the environment: the preflight and the new image must read the same.
    let env = [("HERDER_WORKERS", "3"), ("HERDER_MIN_READY", "2")];
    let mut s = start_with("one", &env, &[], &["sh", "-c", "exec sleep 600"]);
    let before = status(&s.sock);
    assert_eq!(before["herder"]["workers"], 3, "{before}");
    assert_eq!(before["herder"]["min_ready"], 2, "{before}");
    install(&s.exe, "two");
    let out = client(&s.sock, &["upgrade", "--wait", "--timeout", "30s"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = status(&s.sock);
    let h = &after["herder"];
    assert!(h["version"].as_str().unwrap().ends_with("+two"), "{h}");
    assert_eq!(h["pid"], before["herder"]["pid"]);
    assert_eq!(h["workers"], 3, "{h}");
    assert_eq!(
        h["min_ready"], 2,
        "the new image read HERDER_MIN_READY: {h}"
    );
    assert_eq!(slot_pids(&after), slot_pids(&before));
    assert!(environ(s.h.pid()).contains(&"HERDER_WORKERS=3".to_string()));
    // A worker the new image starts gets its slot, not herder's settings.
    let victim = slot_pids(&after)[1] as i32;
    // SAFETY: kill(2) on a worker of the herder this test started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut fresh = 0;
    eventually(
        "the killed worker replaced by one running sleep",
        LONG,
        || {
            let pids = slot_pids(&status(&s.sock));
            fresh = pids.get(1).copied().unwrap_or(0) as i32;
            fresh > 0
                && fresh != victim
                && comm(fresh).trim() == "sleep"
                && !environ(fresh).is_empty()
        },
    );
    let got = environ(fresh);
    assert!(got.contains(&"HERDER_WORKER=1".to_string()), "{got:?}");
    assert!(
        !got.iter()
            .any(|v| v.starts_with("HERDER_WORKERS=") || v.starts_with("HERDER_MIN_READY=")),
        "{got:?}"
    );
    s.h.signal(libc::SIGTERM);
    assert_eq!(s.h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_binary_that_cannot_take_over_leaves_the_old_herder_running() {
    let mut s = start("one", &["-w", "2"], &["sh", "-c", "exec sleep 600"]);
    let before = status(&s.sock);
    let workers = slot_pids(&before);
    // Garbage where the binary was.
    put(&s.exe, b"\x7fELF but not really, just garbage bytes");
    let out = client(&s.sock, &["upgrade", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("upgrade refused") && err.contains("cannot run"),
        "{err}"
    );
    // A binary that cannot resume this state format.
    put(
        &s.exe,
        b"#!/bin/sh\necho 'herder: cannot resume upgrade state format 1 (this herder reads 2..=2)' >&2\nexit 1\n",
    );
    let out = client(&s.sock, &["upgrade", "--wait"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot resume upgrade state format 1"),
        "{err}"
    );
    // Nothing changed.
    let after = status(&s.sock);
    assert_eq!(after["herder"]["pid"], before["herder"]["pid"]);
    assert!(after["herder"]["version"]
        .as_str()
        .unwrap()
        .ends_with("+one"));
    assert_eq!(after["herder"]["upgrades_failed"], 2);
    assert_eq!(slot_pids(&after), workers);
    assert_eq!(s.h.count(&["upgrading: executing"]), 0);
    // And it still stops cleanly.
    s.h.signal(libc::SIGTERM);
    assert_eq!(s.h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_worker_that_exits_during_the_exec_is_reaped_and_replaced() {
    // Slot 1's first worker exits the moment herder's executable changes (the exec itself);
    // its exit must be reaped by the new image, and the slot refilled.
    let script = "if [ $HERDER_WORKER = 1 ] && [ ! -e \"$GATE\" ]; then touch \"$GATE\"; \
                  old=$(stat -L -c %i /proc/$PPID/exe); \
                  while [ \"$(stat -L -c %i /proc/$PPID/exe)\" = \"$old\" ]; do sleep 0.002; done; \
                  exit 3; fi; exec sleep 600";
    let dir = TempDir::new("upgrade-exit");
    let gate = dir.path().join("gate");
    let mut s = {
        let d = TempDir::new("upgrade-exit-bin");
        let exe = d.path().join("herder");
        install(&exe, "one");
        let sock = d.path().join("herder.sock");
        let mut cmd = Command::new(&exe);
        cmd.args(["-l", "127.0.0.1:0", "-w", "2", "--control"])
            .arg(&sock)
            .args(["--", "sh", "-c", script])
            .env("GATE", &gate)
            .env("HERDER_LOG", "info");
        let mut h = Herder::spawn(cmd);
        h.wait_line(&["pool ready"], LONG);
        Setup {
            _dir: d,
            exe,
            sock,
            h,
        }
    };
    eventually("slot 1's worker watching", LONG, || gate.exists());
    let old = slot_pids(&status(&s.sock));
    install(&s.exe, "two");
    let out = client(&s.sock, &["upgrade", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.h.wait_line(&["worker 1 (pid", ") exited with status 3"], LONG);
    let mut doc = serde_json::Value::Null;
    eventually("slot 1 refilled", LONG, || {
        doc = status(&s.sock);
        let pids = slot_pids(&doc);
        doc["herder"]["ready_workers"] == 2 && pids[1] != old[1] && pids[0] == old[0]
    });
    assert!(doc["herder"]["version"].as_str().unwrap().ends_with("+two"));
    assert!(!alive(old[1] as i32), "reaped, not a zombie");
    s.h.signal(libc::SIGTERM);
    assert_eq!(s.h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_hup_that_arrives_during_the_exec_is_not_lost() {
    // A watcher sends SIGHUP the moment herder's executable changes, i.e. while the new image
    // is still starting. Had it unblocked signals before installing its handlers, HUP's default
    // action would have killed it; instead the HUP is pending, delivered, and rolls the pool.
    use std::os::unix::fs::MetadataExt;
    let mut s = start("one", &["-w", "1"], &["sh", "-c", "exec sleep 600"]);
    let pid = s.h.pid();
    let inode = |pid: i32| {
        std::fs::metadata(format!("/proc/{pid}/exe"))
            .map(|m| m.ino())
            .ok()
    };
    let old = inode(pid);
    install(&s.exe, "two");
    let watcher = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let now = inode(pid);
            if now.is_some() && now != old {
                // SAFETY: kill(2) on the herder this test started.
                unsafe { libc::kill(pid, libc::SIGHUP) };
                return true;
            }
            std::thread::yield_now();
        }
        false
    });
    let out = client(&s.sock, &["upgrade", "--wait"]);
    assert!(watcher.join().unwrap(), "the exec was seen");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut doc = serde_json::Value::Null;
    eventually(
        "the HUP's reload to complete in the new image",
        LONG,
        || {
            doc = status(&s.sock);
            doc["herder"]["generation"] == 2 && doc["herder"]["state"] == "ready"
        },
    );
    assert_eq!(doc["herder"]["pid"], pid as i64, "alive, the same process");
    assert!(doc["herder"]["version"].as_str().unwrap().ends_with("+two"));
    s.h.signal(libc::SIGTERM);
    assert_eq!(s.h.wait_exit(LONG).code(), Some(0));
}
