//! Attacks on the worker notify channel by someone who is not the worker: a second local uid
//! (`setpriv` to nobody) and a process in another pid namespace. The channel belongs to the
//! worker: nobody else can deliver a message, claim a socket's name, or leave herder holding
//! an fd. The same for the agent (`--agent`): its notify socket, and its `--agent-listen` unix
//! socket, which only the workers' user and group may connect to. Each test also passes against a build where the attack works only if it cannot
//! fail, so each was checked against the previous herder (HERDER_TEST_BIN): see the notes in
//! each test.
//!
//! Needs root (to become nobody, and for namespaces); skipped otherwise.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};

use common::*;

const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
];

/// Debian's python3: nobody may not read a python installed under /root (pyenv).
const PYTHON: &str = "/usr/bin/python3";

fn prerequisites() -> bool {
    if !root() {
        eprintln!("skipping: needs root (setpriv to nobody, unshare)");
        return false;
    }
    true
}

/// Runs a python script as nobody; its stdout.
fn as_nobody(script: &str, args: &[&str]) -> String {
    let out = Command::new(NOBODY[0])
        .args(&NOBODY[1..])
        .args([PYTHON, "-c", script])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the attacker");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("  attacker: {text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A worker's NOTIFY_SOCKET, from its environment.
fn notify_socket_of(worker: i32) -> String {
    let mut ns = String::new();
    eventually("the worker's NOTIFY_SOCKET", LONG, || {
        let env = std::fs::read(format!("/proc/{worker}/environ")).unwrap_or_default();
        ns = String::from_utf8_lossy(&env)
            .split('\0')
            .find_map(|e| e.strip_prefix("NOTIFY_SOCKET="))
            .unwrap_or_default()
            .to_string();
        !ns.is_empty()
    });
    ns
}

/// A datagram to a NOTIFY_SOCKET value: a path or an `@abstract` name.
fn send_to(sock: &UnixDatagram, ns: &str, bytes: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    match ns.strip_prefix('@') {
        Some(name) => sock.send_to_addr(
            bytes,
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
        ),
        None => sock.send_to(bytes, ns),
    }
}

/// The worker waits for `go`, then says STATUS=after-attack: once herder shows that status,
/// everything sent to the socket before it has been read (one socket, one queue).
fn barrier_worker(go: &std::path::Path) -> String {
    format!(
        "while [ ! -e {} ]; do sleep 0.05; done; systemd-notify --status=after-attack; exec sleep 600",
        go.display()
    )
}

fn worker_status(sock: &std::path::Path) -> String {
    let out = Command::new(herder_bin())
        .args(["status", "--json", "--control"])
        .arg(sock)
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    doc["slots"][0]["worker_status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Sends, as the given uid, 10 datagrams of forged messages, each carrying 20 fds.
const FORGE_WITH_FDS: &str = r#"
import os, socket, array, sys
addr = sys.argv[1]
if addr.startswith("@"): addr = "\0" + addr[1:]
nul = [os.open("/dev/null", os.O_RDONLY) for _ in range(20)]
sent = refused = 0
for i in range(10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendmsg([b"WATCHDOG=trigger\nSTOPPING=1\nREADY=1\n"],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", nul))], 0, addr)
        sent += 1
    except PermissionError:
        refused += 1
print("sent", sent, "refused", refused, flush=True)
"#;

#[test]
fn another_uid_can_neither_send_to_a_worker_socket_nor_pass_herder_fds() {
    // On the previous herder (abstract sockets, a 16-fd control buffer): all 10 datagrams
    // were delivered and herder kept 200 fds more.
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("atk-fds");
    let go = dir.path().join("go");
    let sock = dir.path().join("herder.sock");
    let mut h = Herder::start(
        &["-w", "1", "--control", sock.to_str().unwrap()],
        &["sh", "-c", &barrier_worker(&go)],
    );
    let worker: i32 = field(&h.wait_line(&[SPAWNED], LONG), "pid")
        .unwrap()
        .parse()
        .unwrap();
    h.wait_line(&["pool ready"], LONG);
    let ns = notify_socket_of(worker);
    let before = fd_count(h.pid());
    let out = as_nobody(FORGE_WITH_FDS, &[&ns]);
    assert!(out.contains("sent 0 refused 10"), "{out}");
    std::fs::write(&go, "").unwrap();
    eventually("the worker's own STATUS= after the attack", LONG, || {
        worker_status(&sock) == "after-attack"
    });
    // (Eventually: the control connection that asked for the status may still be closing.)
    let pid = h.pid();
    eventually("herder holds no fd it did not ask for", LONG, || {
        fd_count(pid) == before
    });
    assert!(alive(worker), "the forged WATCHDOG=trigger did nothing");
    assert_eq!(h.worker_exits(), 0);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_worker_that_passes_hundreds_of_fds_leaves_herder_none() {
    // The worker itself may send; a misbehaving one must not fill herder's fd table either.
    // On the previous herder every datagram with more than 16 fds left them open in herder.
    let dir = TempDir::new("atk-own-fds");
    let go = dir.path().join("go");
    let script = format!(
        r#"
import os, socket, array, sys, time
while not os.path.exists("{go}"): time.sleep(0.02)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"): addr = "\0" + addr[1:]
nul = [os.open("/dev/null", os.O_RDONLY) for _ in range(250)]
for n in (17, 64, 250, 250, 250):
    s.sendmsg([b"STATUS=fds %d" % n], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", nul[:n]))], 0, addr)
s.sendmsg([b"STATUS=after-attack"], [], 0, addr)
os.execvp("sleep", ["sleep", "600"])
"#,
        go = go.display()
    );
    let sock = dir.path().join("herder.sock");
    let mut h = Herder::start(
        &["-w", "1", "--control", sock.to_str().unwrap()],
        &["python3", "-c", &script],
    );
    h.wait_line(&["pool ready"], LONG);
    let before = fd_count(h.pid());
    std::fs::write(&go, "").unwrap();
    eventually("the worker's last STATUS=", LONG, || {
        worker_status(&sock) == "after-attack"
    });
    // (Eventually: the control connection that asked for the status may still be closing.)
    let pid = h.pid();
    eventually(
        "herder's fds back to where they were: 831 passed fds, all closed",
        LONG,
        || fd_count(pid) == before,
    );
}

/// Binds, as nobody, the next 60 names herder would use, both ways it could: abstract names
/// that follow the ones in /proc/net/unix, and files in the directory of a path socket.
/// Then holds them until killed.
const SQUAT: &str = r#"
import os, re, socket, sys, time
addr = sys.argv[1]
held, refused = [], 0
if addr.startswith("@"):
    name = addr[1:]
    prefix, last = name.rsplit("/", 1)
    start = int(re.match(r"\d+", last).group(0))
    names = ["\0%s/%d" % (prefix, start + i) for i in range(1, 61)]
else:
    d = os.path.dirname(addr)
    start = int(os.path.basename(addr))
    names = ["%s/%d" % (d, start + i) for i in range(1, 61)]
for n in names:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(n); held.append(s)
    except OSError:
        refused += 1
print("held", len(held), "refused", refused, flush=True)
time.sleep(600)
"#;

#[test]
fn another_uid_cannot_squat_the_names_of_future_worker_sockets() {
    // On the previous herder the names were @herder/<prefix>/<sequential id>: nobody bound the
    // next 60, every spawn failed with EADDRINUSE, counted as a restart, and herder gave up.
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("atk-squat");
    let sock = dir.path().join("herder.sock");
    let mut h = Herder::start(
        &["-w", "1", "--control", sock.to_str().unwrap()],
        &["sh", "-c", "exec sleep 600"],
    );
    let worker: i32 = field(&h.wait_line(&[SPAWNED], LONG), "pid")
        .unwrap()
        .parse()
        .unwrap();
    h.wait_line(&["pool ready"], LONG);
    let ns = notify_socket_of(worker);
    let mut squatter = Command::new(NOBODY[0])
        .args(&NOBODY[1..])
        .args([PYTHON, "-u", "-c", SQUAT, &ns])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(squatter.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    eprintln!("  squatter: {line}");
    let out = Command::new(herder_bin())
        .args(["scale", "31", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success());
    h.wait_nth_line(&[READY], 31, LONG);
    // SAFETY: kill(2) on the squatter we started.
    unsafe { libc::kill(squatter.id() as i32, libc::SIGKILL) };
    let _ = squatter.wait();
    assert!(line.starts_with("held 0 "), "{line}");
    assert_eq!(h.count(&["cannot start"]), 0);
    assert_eq!(h.count(&["giving up"]), 0);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn a_sender_in_another_pid_namespace_is_dropped() {
    // herder in a pid namespace of its own (a container); the attacker, root, outside it: the
    // kernel reports its pid as 0. On the previous herder a sender it could not look up was
    // accepted: WATCHDOG=trigger got the worker SIGABRTed, READY=1 made it ready.
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("atk-pidns");
    let go = dir.path().join("go");
    let sock = dir.path().join("herder.sock");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        herder_bin(),
    ])
    .args([
        "-w",
        "1",
        "--ready",
        "notify",
        "--control",
        sock.to_str().unwrap(),
    ])
    .args(["--", "sh", "-c", &barrier_worker(&go)])
    .env("HERDER_LOG", "info");
    let mut h = Herder::spawn(cmd);
    h.wait_line(&[SPAWNED], LONG);
    // Outside the namespace: unshare → herder (pid 1 inside) → the worker.
    let mut worker = 0;
    eventually("the worker, seen from outside", LONG, || {
        let herder = children_of(h.pid()).first().copied().unwrap_or(0);
        worker = children_of(herder).first().copied().unwrap_or(0);
        worker != 0
    });
    let ns = notify_socket_of(worker);
    let attacker = UnixDatagram::unbound().unwrap();
    for _ in 0..5 {
        send_to(&attacker, &ns, b"READY=1\nWATCHDOG=trigger\n").expect("root reaches the socket");
    }
    std::fs::write(&go, "").unwrap();
    eventually("the worker's own STATUS=", LONG, || {
        worker_status(&sock) == "after-attack"
    });
    assert!(alive(worker), "not aborted by the forged WATCHDOG=trigger");
    assert_eq!(
        h.count(&["pool ready"]),
        0,
        "not made ready by a forged READY=1"
    );
    assert_eq!(h.count(&["WATCHDOG=trigger"]), 0);
    h.wait_line(&["may not speak for the worker", "OtherPidNamespace"], LONG);
}

#[test]
fn without_a_writable_directory_abstract_sockets_are_random_and_still_guarded() {
    // A read-only root with no /run, /tmp or /dev/shm to write to: herder falls back to
    // abstract names, random per socket (no sequence to squat), and the checks by uid still
    // drop what nobody sends. systemd-notify from the worker still counts.
    if !prerequisites() {
        return;
    }
    // /run, /tmp and /dev/shm become read-only in a mount namespace of herder's own: still
    // there (the binaries and this test's files may live under /tmp), but nothing can be
    // created in them.
    let dir = TempDir::new("atk-ro");
    let go = dir.path().join("go");
    let ro = |d: &str| format!("mount --bind {d} {d} && mount -o remount,bind,ro {d}");
    let script = format!(
        "{} && {} && {} && exec {} -w 2 --ready notify -- sh -c \
         'while [ ! -e {} ]; do sleep 0.05; done; systemd-notify --ready; exec sleep 600'",
        ro("/run"),
        ro("/tmp"),
        ro("/dev/shm"),
        herder_bin(),
        go.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("HERDER_LOG", "info")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("TMPDIR");
    let mut h = Herder::spawn(cmd);
    h.wait_line(
        &["no writable directory for the worker notify sockets"],
        LONG,
    );
    let mut names = Vec::new();
    for n in 0..2 {
        let line = h.wait_nth_line(&[SPAWNED], n + 1, LONG);
        let pid: i32 = field(&line, "pid").unwrap().parse().unwrap();
        names.push(notify_socket_of(pid));
    }
    for n in &names {
        assert!(n.starts_with("@herder/"), "{names:?}");
    }
    let tail = |n: &str| n.rsplit('-').next().unwrap_or_default().to_string();
    assert_ne!(
        tail(&names[0]),
        tail(&names[1]),
        "random, not sequential: {names:?}"
    );
    let before = fd_count(h.pid());
    let out = as_nobody(FORGE_WITH_FDS, &[&names[0]]);
    assert!(
        out.contains("sent 10"),
        "an abstract socket takes anyone's datagram: {out}"
    );
    h.wait_line(&["may not speak for the worker", "OtherUid(65534)"], LONG);
    std::fs::write(&go, "").unwrap();
    // READY=1 from each worker, after the attack on the same socket: all of it was read.
    h.wait_line(&["pool ready"], LONG);
    assert_eq!(fd_count(h.pid()), before, "the 200 passed fds were closed");
    assert!(h.count(&["WATCHDOG=trigger"]) == 0 && h.worker_exits() == 0);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn workers_of_another_uid_own_their_socket_and_reach_it() {
    // --user nobody: the socket files belong to nobody (mode 0600) in a directory only
    // searchable by others (0711); systemd-notify from the worker still counts.
    if !prerequisites() {
        return;
    }
    let mut h = Herder::start(
        &["-w", "2", "--user", "nobody", "--ready", "notify"],
        &["sh", "-c", "systemd-notify --ready; exec sleep 600"],
    );
    h.wait_line(&["pool ready"], LONG);
    use std::os::unix::fs::MetadataExt;
    for pid in h.spawned_pids() {
        let ns = notify_socket_of(pid);
        let meta = std::fs::metadata(&ns).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o600), "{ns}");
        let dir = std::fs::metadata(std::path::Path::new(&ns).parent().unwrap()).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o711), "{ns}");
    }
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

/// Connects, as the uid running it, to a unix stream socket; prints what happened.
const CONNECT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
    print("connected", flush=True)
except PermissionError:
    print("refused", flush=True)
"#;

/// herder with an agent on a unix socket in a directory anyone may search, started under
/// umask 000 (so that the socket's mode is herder's choice, not the umask's).
fn herder_with_agent(dir: &std::path::Path, extra: &[&str]) -> (Herder, String) {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("agent.sock").display().to_string();
    let listen = format!("unix:{path}");
    let mut args = vec![
        "-w",
        "1",
        "--agent",
        "sh -c 'exec sleep 600'",
        "--agent-listen",
        &listen,
    ];
    args.extend(extra);
    let mut cmd = herder_cmd(&args, &["sleep", "600"]);
    // SAFETY: umask(2) is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut h = Herder::spawn(cmd);
    h.wait_line(&["pool ready"], LONG);
    (h, path)
}

#[test]
fn another_uid_can_neither_connect_to_the_agent_nor_send_to_its_notify_socket() {
    // On the herder before the agent socket was bound under umask 0117, the socket took its
    // mode from herder's umask: under umask 000 (mode 0777) nobody connected.
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("atk-agent");
    let (mut h, path) = herder_with_agent(dir.path(), &[]);
    let agent: i32 = field(&h.wait_line(&["agent (pid", "spawned"], LONG), "pid")
        .unwrap()
        .parse()
        .unwrap();
    let out = as_nobody(CONNECT, &[&path]);
    assert!(out.contains("refused"), "nobody reached the agent: {out}");
    let ns = notify_socket_of(agent);
    let before = fd_count(h.pid());
    let out = as_nobody(FORGE_WITH_FDS, &[&ns]);
    assert!(out.contains("sent 0 refused 10"), "{out}");
    assert_eq!(fd_count(h.pid()), before);
    assert!(
        alive(agent),
        "the forged WATCHDOG=trigger and STOPPING=1 did nothing"
    );
    assert_eq!(h.count(&["agent restarting"]), 0);
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}

#[test]
fn the_workers_user_reaches_the_agent_socket() {
    // The other side of the test above: with --user nobody the socket is nobody's, so the
    // refusal there is the mode's doing, not the directory's or the attacker's.
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("atk-agent-user");
    let (mut h, path) = herder_with_agent(dir.path(), &["--user", "nobody"]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o660), "{path}");
    let out = as_nobody(CONNECT, &[&path]);
    assert!(out.contains("connected"), "{out}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
}
