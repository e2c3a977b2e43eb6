//! Operating a running pool through the control socket: `herder status`, `reload --wait`,
//! `scale`, `stop`, and `/metrics`, with the real binary on both ends.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn client(sock: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(herder_bin());
    c.args(args).arg("--control").arg(sock);
    c.output().unwrap()
}

fn status_json(sock: &Path) -> serde_json::Value {
    let out = client(sock, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn slot_pids(doc: &serde_json::Value) -> Vec<i64> {
    doc["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["pid"].as_i64())
        .collect()
}

fn start(dir: &TempDir, extra: &[&str], command: &[&str]) -> (Herder, std::path::PathBuf) {
    let sock = dir.path().join("herder.sock");
    let mut args = vec!["-l", "127.0.0.1:0", "--control", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut h = Herder::start(&args, command);
    h.wait_line(&["pool ready"], LONG);
    (h, sock)
}

#[test]
fn status_reflects_the_pool_before_and_after_a_kill_and_a_scale() {
    let dir = TempDir::new("ctl-status");
    let (mut h, sock) = start(&dir, &["-w", "2"], &[demo_bin()]);
    let mode = std::fs::metadata(&sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);

    let doc = status_json(&sock);
    assert_eq!(doc["herder"]["state"], "ready");
    let before = slot_pids(&doc);
    assert_eq!(before.len(), 2);
    let table = String::from_utf8(client(&sock, &["status"]).stdout).unwrap();
    assert!(
        table.contains("SLOT")
            && table.contains("RESTARTS")
            && table.contains(&before[0].to_string()),
        "{table}"
    );
    assert!(
        table.contains("127.0.0.1:"),
        "the sockets it holds: {table}"
    );

    // SAFETY: kill(2) on a worker pid herder reported.
    unsafe { libc::kill(before[0] as i32, libc::SIGKILL) };
    h.wait_nth_line(&[READY], 3, LONG);
    let doc = status_json(&sock);
    let slot0 = &doc["slots"][0];
    assert_ne!(slot0["pid"].as_i64().unwrap(), before[0]);
    assert_eq!(slot0["restarts"], 1);
    assert_eq!(slot0["last_exit"], "killed by SIGKILL");
    let table = String::from_utf8(client(&sock, &["status"]).stdout).unwrap();
    assert!(table.contains("killed by SIGKILL"), "{table}");

    assert!(client(&sock, &["scale", "4"]).status.success());
    h.wait_line(&["worker 3 (pid", READY], LONG);
    assert_eq!(slot_pids(&status_json(&sock)).len(), 4);
    assert!(client(&sock, &["scale", "-1"]).status.success());
    h.wait_worker_exit(&["worker 3 (pid"], LONG);
    let doc = status_json(&sock);
    assert_eq!(doc["herder"]["workers"], 3);
    assert_eq!(slot_pids(&doc).len(), 3);
    assert!(client(&sock, &["scale", "+1"]).status.success());
    h.wait_nth_line(&["worker 3 (pid", READY], 2, LONG);

    assert!(client(&sock, &["stop"]).status.success());
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert!(!sock.exists(), "the socket is removed at exit");
    let out = client(&sock, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is listening there"));
}

#[test]
fn reload_wait_succeeds_with_new_pids_and_fails_with_the_reason() {
    let dir = TempDir::new("ctl-reload");
    let broken = dir.path().join("broken");
    let script = format!(
        "if [ -e {} ]; then exec sleep 600; fi; exec {}",
        broken.display(),
        demo_bin()
    );
    let (mut h, sock) = start(
        &dir,
        &["-w", "2", "--ready", "notify", "--ready-timeout", "1s"],
        &["sh", "-c", &script],
    );
    let addr = h.addr();
    let old = slot_pids(&status_json(&sock));

    let out = client(&sock, &["reload", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 2 is serving"));
    let new = slot_pids(&status_json(&sock));
    assert!(
        new.iter().all(|p| !old.contains(p)),
        "all pids new: {old:?} -> {new:?}"
    );

    std::fs::write(&broken, "").unwrap();
    let out = client(&sock, &["reload", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload failed: slot 0: not ready within 1s"),
        "{err}"
    );
    // The previous generation still serves.
    assert_eq!(slot_pids(&status_json(&sock)), new);
    let serving: Vec<i64> = distinct_pids(addr, 2, LONG)
        .into_iter()
        .map(i64::from)
        .collect();
    let mut expect = new.clone();
    expect.sort();
    assert_eq!(serving, expect);
    let doc = status_json(&sock);
    assert_eq!(doc["herder"]["last_reload"]["result"], "failed");
}

#[test]
fn another_uid_is_refused_and_bad_requests_are_survived() {
    if !root() {
        eprintln!("skipping: needs root to run a client as another uid");
        return;
    }
    let dir = TempDir::new("ctl-hostile");
    let (mut h, sock) = start(&dir, &["-w", "1"], &["sh", "-c", "exec sleep 600"]);
    // Open the file mode so that only SO_PEERCRED stands in the way.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let mut c = Command::new(herder_bin());
    c.args(["status", "--control"])
        .arg(&sock)
        .uid(65534)
        .gid(65534);
    let out = c.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied: uid 65534"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ask = |bytes: &[u8], half_close: bool| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(LONG)).unwrap();
        let _ = s.write_all(bytes);
        if half_close {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    assert!(ask(b"garbage\n", false).contains("not JSON"));
    assert!(ask(b"{\"v\":1,\"cmd\":\"fly\"}\n", false).contains("unknown command"));
    assert!(ask(b"{\"v\":9,\"cmd\":\"status\"}\n", false).contains("not supported"));
    assert!(ask(&vec![b'{'; 100_000], false).contains("longer than"));
    assert!(
        ask(b"{\"v\":1,\"cmd\":\"status\"}", true).contains("\"ok\":true"),
        "a half-closed request is still answered"
    );
    drop(UnixStream::connect(&sock).unwrap()); // connect and leave
    let idle = UnixStream::connect(&sock).unwrap(); // connect and say nothing
    let answer = ask(b"{\"v\":1,\"cmd\":\"status\"}\n", false);
    assert!(answer.contains("\"ok\":true"), "{answer}");
    drop(idle);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_the_pool() {
    let dir = TempDir::new("metrics");
    let sock = dir.path().join("herder.sock");
    let mut h = Herder::start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--health",
            "127.0.0.1:0",
            "--control",
            sock.to_str().unwrap(),
        ],
        &[demo_bin()],
    );
    let health: std::net::SocketAddr = field(&h.wait_line(&["health endpoint"], LONG), "addr")
        .unwrap()
        .parse()
        .unwrap();
    h.wait_line(&["pool ready"], LONG);
    let scrape = || {
        let mut s = std::net::TcpStream::connect(health).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = resp.split("\r\n\r\n").nth(1).unwrap().to_string();
        let lines = body.lines().map(|l| Ok(l.to_string()));
        prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
    };
    let value =
        |scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>| -> f64 {
            let s = scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .unwrap_or_else(|| panic!("no {name} {label:?}"));
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("unexpected type for {name}"),
            }
        };
    let m = scrape();
    assert_eq!(value(&m, "herder_workers", Some(("state", "ready"))), 2.0);
    assert_eq!(value(&m, "herder_restarts_total", None), 0.0);
    assert_eq!(
        value(&m, "herder_reloads_total", Some(("result", "succeeded"))),
        0.0
    );

    let victim = h.spawned_pids()[0];
    // SAFETY: kill(2) on a worker pid herder reported.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    h.wait_nth_line(&[READY], 3, LONG);
    assert!(client(&sock, &["reload", "--wait"]).status.success());
    let m = scrape();
    assert_eq!(value(&m, "herder_restarts_total", None), 1.0);
    assert_eq!(
        value(&m, "herder_worker_exits_total", Some(("reason", "crash"))),
        1.0
    );
    assert_eq!(
        value(&m, "herder_reloads_total", Some(("result", "succeeded"))),
        1.0
    );
    assert_eq!(value(&m, "herder_generation", None), 2.0);
    eventually("the old generation's exits to be counted", LONG, || {
        value(
            &scrape(),
            "herder_worker_exits_total",
            Some(("reason", "drained")),
        ) == 2.0
    });
}

/// How much one write to a unix stream socket can put in flight before it blocks. unix(7):
/// stream sockets are flow-controlled by the *sender's* SO_SNDBUF (the peer's SO_RCVBUF
/// counts for nothing), so a client cannot shrink this; only a big answer can exceed it.
fn unix_stream_capacity() -> usize {
    let (a, _b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut n = 0;
    while let Ok(k) = (&a).write(&chunk) {
        n += k;
    }
    n
}

fn request_status(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"{\"v\":1,\"cmd\":\"status\"}\n").unwrap();
    s
}

/// Reads to EOF (or an error: a reset is an end too); what came.
fn read_all(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

#[test]
fn clients_that_never_read_their_answer_are_dropped_and_block_no_one() {
    let dir = TempDir::new("ctl-unread");
    let sock = dir.path().join("herder.sock");
    // A pool big enough for `status` to outgrow the socket's buffer (~160 bytes a worker).
    let workers = 2000;
    let mut cmd = herder_cmd(
        &[
            "--control",
            sock.to_str().unwrap(),
            "-w",
            &workers.to_string(),
        ],
        &["sleep", "600"],
    );
    // One notify socket per worker in herder: more descriptors than the usual 1024.
    // SAFETY: setrlimit(2) is async-signal-safe; it only changes the child's own limit.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 8192,
                rlim_max: 8192,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            Ok(())
        });
    }
    let mut h = Herder::spawn(cmd);
    h.wait_line(&["pool ready"], 3 * LONG);
    let full = read_all(&mut request_status(&sock)).len();
    let capacity = unix_stream_capacity();
    assert!(
        full > capacity + 64 * 1024,
        "the answer ({full} bytes) must not fit in a socket's buffer ({capacity} bytes)"
    );

    // More clients than herder serves at once ask, and never read.
    let mut stuck: Vec<UnixStream> = (0..20).map(|_| request_status(&sock)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    let out = client(&sock, &["status"]);
    assert!(
        out.status.success(),
        "a normal client is answered: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        start.elapsed()
    );

    // Connected, says nothing: cut at the read deadline (5 s), with a reason.
    let mut silent = UnixStream::connect(&sock).unwrap();
    let start = Instant::now();
    let said = String::from_utf8(read_all(&mut silent)).unwrap();
    let took = start.elapsed();
    assert!(
        said.contains("timed out waiting for a request line"),
        "{said}"
    );
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "cut after {took:?}"
    );

    // Past the write deadline (5 s) the unread answers are gone: what is left to read is
    // what the socket held, not the whole answer.
    for (i, s) in stuck.iter_mut().enumerate() {
        let got = read_all(s);
        // (The answer's size varies by a few bytes: uptimes.)
        assert!(
            got.len() + 32 * 1024 < full,
            "client {i} still got its whole answer ({} of {full} bytes): herder kept writing",
            got.len()
        );
    }
    assert!(client(&sock, &["status"]).status.success());
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
