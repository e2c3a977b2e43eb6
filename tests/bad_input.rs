//! Bad input at setup: each case is one line on stderr, exit status 2, promptly, and no worker
//! ever started. Inherited-fd cases run herder under a small python launcher that puts the
//! fds in place and sets LISTEN_PID to the pid that then execs herder.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LAUNCHER: &str = r#"
import os, socket, sys
kind, fds, names = sys.argv[1], sys.argv[2], sys.argv[3]
keep = []
if kind in ("listening", "two", "reuseport"):
    for i in range(2 if kind == "two" else 1):
        s = socket.socket()
        if kind == "reuseport":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0)); s.listen(); keep.append(s)
        os.dup2(s.fileno(), 3 + i); os.set_inheritable(3 + i, True)
elif kind == "file":
    f = open("/dev/null"); keep.append(f); os.dup2(f.fileno(), 3); os.set_inheritable(3, True)
elif kind == "unlistened":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); keep.append(s); os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
os.environ["LISTEN_PID"] = os.environ.get("PID_FORMAT", "{}").format(os.getpid())
os.environ["LISTEN_FDS"] = fds
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
os.execvp(sys.argv[4], sys.argv[4:])
"#;

/// Runs herder to completion (with a deadline); its worker would print `WORKER RAN`. One
/// that is still running after 5s (it took the input) gets SIGTERM, so that a stop that
/// goes wrong with that input shows in the output; SIGKILL at 15s.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    let pid = child.id() as i32;
    let start = Instant::now();
    let watchdog = std::thread::spawn(move || {
        let mut termed = false;
        while start.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(Duration::from_millis(50));
            if !alive(pid) {
                return;
            }
            if !termed && start.elapsed() > Duration::from_secs(5) {
                // SAFETY: kill(2) on our own child that is still running.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                termed = true;
            }
        }
        // SAFETY: kill(2) on our own child that overstayed.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    watchdog.join().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "setup errors are prompt; herder ran on ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts exit 2, exactly one stderr line mentioning `expect`, and no worker.
fn assert_usage_error(out: Output, expect: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "exit 2; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("herder: "), "{stderr}");
    assert!(
        lines[0].contains(expect),
        "{:?} should mention {expect:?}",
        lines[0]
    );
    assert!(!stdout.contains("WORKER RAN"), "no worker may start");
}

const WORKER: [&str; 3] = ["sh", "-c", "echo WORKER RAN; exec sleep 600"];

fn herder(args: &[&str]) -> Command {
    herder_cmd(args, &WORKER)
}

fn inherited(kind: &str, fds: &str, names: &str) -> Command {
    launch(kind, fds, names, &[herder_bin(), "-w", "1", "--"])
}

/// The launcher puts the fds in place, then execs `program` (herder, or something that execs
/// herder in the same process), which gets WORKER as the command after its own arguments.
fn launch(kind: &str, fds: &str, names: &str, program: &[&str]) -> Command {
    let mut c = Command::new("python3");
    c.args(["-c", LAUNCHER, kind, fds, names])
        .args(program)
        .args(WORKER);
    c.env_remove("HERDER_LOG").env_remove("NOTIFY_SOCKET");
    c
}

#[test]
fn address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_usage_error(run(herder(&["-l", &addr])), "address already in use");
}

#[test]
fn unparsable_address() {
    assert_usage_error(
        run(herder(&["-l", "localhost:http"])),
        "invalid address 'localhost:http'",
    );
    assert_usage_error(
        run(herder(&["-l", "unix:relative/path"])),
        "invalid address",
    );
}

#[test]
fn zero_workers() {
    assert_usage_error(run(herder(&["-w", "0"])), "--workers must be at least 1");
}

#[test]
fn no_command() {
    let mut c = Command::new(herder_bin());
    c.args(["-w", "1"]);
    assert_usage_error(run(c), "no COMMAND");
}

#[test]
fn unknown_flag_and_bad_duration() {
    assert_usage_error(run(herder(&["--frobnicate"])), "--frobnicate");
    assert_usage_error(run(herder(&["--drain-timeout", "soon"])), "not a duration");
    assert_usage_error(run(herder(&["--stop-signal", "NOPE"])), "not a signal");
}

#[test]
fn listen_fds_not_a_number() {
    assert_usage_error(
        run(inherited("listening", "three", "-")),
        "LISTEN_FDS=three: not a number",
    );
}

#[test]
fn listen_fds_names_a_missing_fd() {
    assert_usage_error(
        run(inherited("listening", "2", "-")),
        "LISTEN_FDS=2 but fd 4 is not open",
    );
}

#[test]
fn listen_fds_smaller_than_what_was_passed() {
    assert_usage_error(
        run(inherited("two", "1", "-")),
        "LISTEN_FDS=1 but fd 4 is also open",
    );
}

#[test]
fn listen_fdnames_with_the_wrong_count() {
    assert_usage_error(
        run(inherited("listening", "1", "a:b")),
        "LISTEN_FDNAMES has 2 names but LISTEN_FDS=1",
    );
}

#[test]
fn an_inherited_fd_that_is_not_a_socket() {
    assert_usage_error(
        run(inherited("file", "1", "-")),
        "inherited fd 3 is not a socket",
    );
}

#[test]
fn an_inherited_stream_socket_that_is_not_listening() {
    assert_usage_error(
        run(inherited("unlistened", "1", "-")),
        "fd 3 is a stream socket that is not listening",
    );
}

#[test]
fn a_regular_file_where_the_unix_socket_goes_is_not_removed() {
    let dir = TempDir::new("unixfile");
    let path = dir.path().join("app.sock");
    std::fs::write(&path, "precious").unwrap();
    let spec = format!("unix:{}", path.display());
    assert_usage_error(run(herder(&["-l", &spec])), "exists and is not a socket");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn user_when_not_root_or_unknown() {
    if root() {
        assert_usage_error(
            run(herder(&["--user", "no-such-user-herder"])),
            "no such user",
        );
    } else {
        assert_usage_error(run(herder(&["--user", "nobody"])), "must run as root");
    }
}

#[test]
fn a_good_inherited_socket_is_used_after_all() {
    // The control case for the launcher: the same path with valid input starts the worker.
    let mut c = inherited("listening", "1", "web");
    c.env("HERDER_LOG", "info");
    let mut h = Herder::spawn(c);
    h.wait_line(&["WORKER RAN"], LONG);
    h.wait_line(&["listening", "name=web"], LONG);
}

#[test]
fn a_stale_unix_socket_file_is_replaced_and_removed_at_exit() {
    let dir = TempDir::new("stale");
    let path = dir.path().join("app.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let spec = format!("unix:{}", path.display());
    let mut h = Herder::start(&["-l", &spec, "-w", "1"], &[demo_bin()]);
    h.wait_line(&["pool ready"], LONG);
    let mut s = std::os::unix::net::UnixStream::connect(&path).expect("herder's socket accepts");
    use std::io::{Read, Write};
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    h.signal(libc::SIGTERM);
    assert_eq!(h.wait_exit(LONG).code(), Some(0));
    assert!(!path.exists(), "herder removes the socket file it created");
}

// Issue 10: no input makes herder panic; out-of-range values are usage errors.

const DURATION_FLAGS: [&str; 5] = [
    "--ready-timeout",
    "--drain-timeout",
    "--shutdown-delay",
    "--restart-window",
    "--worker-watchdog",
];

#[test]
fn a_huge_drain_timeout_is_out_of_range() {
    // It used to be taken, and SIGTERM then panicked: overflow when adding duration to instant.
    assert_usage_error(
        run(herder(&[
            "-l",
            "127.0.0.1:0",
            "--drain-timeout",
            "500000000000years",
        ])),
        "out of range: at most 365d",
    );
}

#[test]
fn every_duration_flag_is_range_checked() {
    for flag in DURATION_FLAGS {
        for value in ["366d", "99999999999999999999999s"] {
            let out = run(herder(&["-l", "127.0.0.1:0", "-w", "1", flag, value]));
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert_usage_error(out, "out of range: at most 365d");
            assert!(stderr.contains(flag), "{stderr}");
        }
    }
    // The client too: --timeout is checked before any control socket is looked for.
    let dir = TempDir::new("reload-timeout");
    let sock = dir.path().join("none.sock");
    let mut c = Command::new(herder_bin());
    c.args(["reload", "--wait", "--timeout", "366d", "--control"])
        .arg(&sock);
    assert_usage_error(run(c), "out of range: at most 365d");
}

#[test]
fn counts_over_the_maximum_are_refused() {
    // A command that does not exist: an old herder that takes -w 100001 forks nothing.
    let cmd = ["/nonexistent/herder-test-worker"];
    for (flag, extra) in [
        ("--workers", &[][..]),
        ("--min-ready", &["-w", "1"][..]),
        ("--reload-surge", &["-w", "1"][..]),
    ] {
        let mut args = vec![flag, "100001", "-l", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        assert_usage_error(
            run(herder_cmd(&args, &cmd)),
            &format!("{flag} 100001 is out of range: at most 100000"),
        );
    }
}

#[test]
fn absurd_listen_fds_are_refused() {
    for (fds, names, expect) in [
        // Used to allocate a list of that many names: capacity overflow panic.
        (
            "4611686018427387904",
            "-",
            "LISTEN_FDS=4611686018427387904: out of range (at most 4096",
        ),
        ("2147483648", "-", "LISTEN_FDS=2147483648: out of range"),
        ("4097", "-", "LISTEN_FDS=4097: out of range"),
        ("99999999999999999999999", "-", "out of range"),
        // Only the plain decimal digits a service manager writes.
        ("-1", "-", "LISTEN_FDS=-1: not a number"),
        ("+1", "-", "LISTEN_FDS=+1: not a number"),
        (" 1", "-", "LISTEN_FDS= 1: not a number"),
        ("1 ", "-", "LISTEN_FDS=1 : not a number"),
        ("0x1", "-", "LISTEN_FDS=0x1: not a number"),
    ] {
        assert_usage_error(run(inherited("listening", fds, names)), expect);
    }
}

#[test]
fn absurd_listen_pid_is_refused() {
    for (format, expect) in [
        ("+{}", "not a number"),
        (" {}", "not a number"),
        ("{}0000000000000000000000", "not a number"),
    ] {
        let mut c = inherited("listening", "1", "-");
        c.env("PID_FORMAT", format);
        assert_usage_error(run(c), expect);
    }
}

#[test]
fn absurd_listen_fdnames_are_refused() {
    let long = "n".repeat(100_000);
    assert_usage_error(
        run(inherited("listening", "1", &long)),
        "LISTEN_FDNAMES: name 1 of 1 is 100000 bytes long (at most 255)",
    );
    assert_usage_error(
        run(inherited("listening", "1", "we\tb")),
        "LISTEN_FDNAMES: name 1 of 1 has a control or non-ASCII byte",
    );
    let many = ":".repeat(100_000);
    assert_usage_error(
        run(inherited("listening", "1", &many)),
        "LISTEN_FDNAMES has 100001 names but LISTEN_FDS=1",
    );
}

#[test]
fn a_long_value_is_cut_short_in_the_message() {
    let out = run(inherited("listening", &"7".repeat(10_000), "-"));
    assert!(
        out.stderr.len() < 200,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_usage_error(out, "7777…: out of range");
}

/// The uid a SO_REUSEPORT sibling is refused to (nobody on Debian).
const OTHER_UID: &str = "65534";

#[test]
fn reuseport_with_an_inherited_socket_of_another_uid_is_a_clear_error() {
    if !root() {
        eprintln!("skipped: needs root to create the socket as another uid than herder's");
        return;
    }
    // systemd (root) made the socket; herder runs as DynamicUser: the kernel refuses a
    // SO_REUSEPORT sibling bound by another uid (EADDRINUSE).
    let setpriv = format!("--reuid={OTHER_UID}");
    let regid = format!("--regid={OTHER_UID}");
    let program = [
        "setpriv",
        &setpriv,
        &regid,
        "--clear-groups",
        herder_bin(),
        "--reuseport",
        "-w",
        "2",
        "--",
    ];
    assert_usage_error(
        run(launch("reuseport", "1", "http", &program)),
        &format!(
            "--reuseport: inherited fd 3 (http) belongs to uid 0 but herder runs as uid {OTHER_UID}; \
             SO_REUSEPORT siblings must be bound by the socket's own uid \
             (run herder as that user, or leave out --reuseport)"
        ),
    );
}

#[test]
fn reuseport_with_an_inherited_socket_of_our_own_uid_works() {
    // The control case: the same launcher, herder under the socket's own uid.
    let mut c = launch(
        "reuseport",
        "1",
        "http",
        &[herder_bin(), "--reuseport", "-w", "2", "--"],
    );
    c.env("HERDER_LOG", "info");
    let mut h = Herder::spawn(c);
    h.wait_nth_line(&["WORKER RAN"], 2, LONG);
    h.wait_line(&["listening", "name=http"], LONG);
}
