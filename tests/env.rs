//! Configuration from the environment, with the real binary: `HERDER_<OPTION>` sets an option
//! and the command line wins; a bad value is a one-line usage error naming the variable; the
//! workers never see herder's own settings; `--help` and the man page show the names.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

/// A herder with `env` added to its environment, ready.
fn start(env: &[(&str, &str)], args: &[&str], command: &[&str]) -> Herder {
    let mut cmd = herder_cmd(args, command);
    cmd.envs(env.iter().copied());
    let mut h = Herder::spawn(cmd);
    h.wait_line(&["pool ready"], LONG);
    h
}

/// `herder status --json` as a client, with `env` (and no `--control` unless in `args`).
fn status_json(env: &[(&str, &str)], args: &[&str]) -> serde_json::Value {
    let out = client(env, &[&["status", "--json"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn client(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(herder_bin())
        .args(args)
        .env_remove("HERDER_CONTROL")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).to_string())
        .collect()
}

/// The pids of the pool's workers once each has exec'd `sleep` (its environment is then the
/// one herder gave it).
fn sleeping_workers(h: &mut Herder, n: usize) -> Vec<i32> {
    let comm = |pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut pids = Vec::new();
    eventually("the workers to exec sleep", LONG, || {
        pids = h.spawned_pids();
        pids.len() == n
            && pids
                .iter()
                .all(|&p| comm(p).trim() == "sleep" && !environ(p).is_empty())
    });
    pids
}

const SLEEP: &[&str] = &["sh", "-c", "exec sleep 600"];

#[test]
fn a_variable_sets_an_option_and_the_command_line_wins() {
    let dir = TempDir::new("env-workers");
    let sock = dir.path().join("herder.sock");
    let control = ["--control", sock.to_str().unwrap()];
    let env = [("HERDER_WORKERS", "3")];
    {
        let _h = start(
            &env,
            &[&["-l", "127.0.0.1:0"][..], &control].concat(),
            SLEEP,
        );
        assert_eq!(status_json(&[], &control)["herder"]["workers"], 3);
    }
    let _h = start(
        &env,
        &[&["-l", "127.0.0.1:0", "--workers", "2"][..], &control].concat(),
        SLEEP,
    );
    assert_eq!(status_json(&[], &control)["herder"]["workers"], 2);
}

#[test]
fn herder_listen_is_a_list_and_herder_control_serves_the_clients_too() {
    let dir = TempDir::new("env-listen");
    let sock = dir.path().join("herder.sock");
    let unix = dir.path().join("app.sock");
    let list = format!("web=127.0.0.1:0\n  unix:{}", unix.display());
    let control = [("HERDER_CONTROL", sock.to_str().unwrap())];
    let env = [
        ("HERDER_LISTEN", list.as_str()),
        ("HERDER_WORKERS", "1"),
        control[0],
    ];
    {
        let _h = start(&env, &[], SLEEP);
        // No --control on either side: both read HERDER_CONTROL.
        let doc = status_json(&control, &[]);
        let sockets: Vec<String> = doc["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["address"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(sockets.len(), 2, "{doc}");
        assert!(sockets[0].starts_with("127.0.0.1:"), "{sockets:?}");
        assert_eq!(sockets[1], format!("unix:{}", unix.display()));
        assert_eq!(doc["sockets"][0]["name"], "web");
    }
    // One --listen on the command line replaces the whole list.
    let _h = start(&env, &["--listen", "127.0.0.1:0"], SLEEP);
    let doc = status_json(&control, &[]);
    assert_eq!(doc["sockets"].as_array().unwrap().len(), 1, "{doc}");
}

/// The socket at fd 3 of `pid` (`socket:[INODE]`).
fn fd3(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/3"))
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default()
}

#[test]
fn a_flag_from_the_environment_is_on_for_1_and_off_for_0() {
    for (value, separate) in [("1", true), ("0", false), ("yes", true), ("off", false)] {
        let env = [("HERDER_REUSEPORT", value), ("HERDER_WORKERS", "2")];
        let mut h = start(&env, &["-l", "127.0.0.1:0"], SLEEP);
        let pids = sleeping_workers(&mut h, 2);
        let (a, b) = (fd3(pids[0]), fd3(pids[1]));
        assert!(a.starts_with("socket:"), "{a}");
        assert_eq!(
            a != b,
            separate,
            "HERDER_REUSEPORT={value}: fd 3 is {a} and {b}"
        );
    }
}

/// A usage error: the environment, the command line, how the one line on stderr starts.
type Case = (
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
    &'static str,
);

#[test]
fn a_bad_value_in_the_environment_is_a_usage_error_that_names_the_variable() {
    let worker = ["sh", "-c", "echo WORKER RAN"];
    let cases: &[Case] = &[
        (
            &[("HERDER_WORKERS", "abc")],
            &[],
            "herder: HERDER_WORKERS=abc: invalid value 'abc' for '--workers <N>'",
        ),
        (
            &[("HERDER_WORKERS", "0")],
            &[],
            "herder: HERDER_WORKERS=0: --workers must be at least 1",
        ),
        (
            &[("HERDER_DRAIN_TIMEOUT", "366d")],
            &[],
            "herder: HERDER_DRAIN_TIMEOUT=366d: invalid value '366d' for '--drain-timeout <DUR>': out of range",
        ),
        (
            &[("HERDER_REUSEPORT", "maybe")],
            &[],
            "herder: HERDER_REUSEPORT=maybe: invalid value 'maybe' for '--reuseport'",
        ),
        (
            &[("HERDER_READY", "later")],
            &[],
            "herder: HERDER_READY=later: invalid value 'later' for '--ready <exec|notify>'",
        ),
        (
            &[("HERDER_LISTEN", "127.0.0.1:0 nowhere")],
            &[],
            "herder: HERDER_LISTEN='127.0.0.1:0 nowhere': invalid value 'nowhere'",
        ),
        (
            &[("HERDER_GROUP", "staff")],
            &[],
            "herder: HERDER_GROUP=staff: --group needs --user",
        ),
        // The command line's own bad value is not blamed on the variable.
        (
            &[("HERDER_WORKERS", "3")],
            &["--workers", "abc"],
            "herder: invalid value 'abc' for '--workers <N>'",
        ),
        (
            &[("HERDER_WORKERS", "3")],
            &["--workers", "0"],
            "herder: --workers must be at least 1",
        ),
    ];
    for (env, args, want) in cases {
        let mut cmd = herder_cmd(args, &worker);
        cmd.envs(env.iter().copied());
        let mut h = Herder::spawn(cmd);
        let status = h.wait_exit(LONG);
        let lines = h.lines();
        assert_eq!(status.code(), Some(2), "{env:?} {args:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{env:?} {args:?}: one line: {lines:?}");
        assert!(lines[0].starts_with(want), "{env:?} {args:?}: {lines:?}");
    }
    // A client's bad HERDER_CONTROL too.
    let out = client(&[("HERDER_CONTROL", "")], &["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("herder: HERDER_CONTROL=: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn workers_do_not_see_herders_own_settings() {
    let dir = TempDir::new("env-workers-env");
    let sock = dir.path().join("herder.sock");
    let env = [
        ("HERDER_WORKERS", "2"),
        ("HERDER_DRAIN_TIMEOUT", "5s"),
        ("HERDER_REUSEPORT", "0"),
        ("HERDER_LISTEN", "127.0.0.1:0"),
        ("HERDER_CONTROL", sock.to_str().unwrap()),
        ("HERDER_LOG", "info"),
        // The application's own, HERDER_-prefixed or not: passed on.
        ("HERDER_APP_GREETING", "hello"),
        ("APP_MODE", "test"),
    ];
    let mut h = start(&env, &[], SLEEP);
    let pids = sleeping_workers(&mut h, 2);
    let own = [
        "HERDER_WORKERS=",
        "HERDER_DRAIN_TIMEOUT=",
        "HERDER_REUSEPORT=",
        "HERDER_LISTEN=",
        "HERDER_CONTROL=",
        "HERDER_LOG=",
    ];
    for (slot, &pid) in pids.iter().enumerate() {
        let got = environ(pid);
        for var in own {
            assert!(
                !got.iter().any(|v| v.starts_with(var)),
                "worker {slot} sees {var}: {got:?}"
            );
        }
        for want in [
            format!("HERDER_WORKER={slot}"),
            "HERDER_APP_GREETING=hello".into(),
            "APP_MODE=test".into(),
        ] {
            assert!(got.contains(&want), "worker {slot} lacks {want}: {got:?}");
        }
    }
    // herder keeps them itself: `herder upgrade` re-executes it with this environment.
    let mine = environ(h.pid());
    assert!(mine.contains(&"HERDER_WORKERS=2".to_string()), "{mine:?}");
}

#[test]
fn the_help_names_the_variables_whatever_the_environment() {
    let help = |env: &[(&str, &str)]| {
        let out = client(env, &["--help"]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = help(&[]);
    assert!(plain.contains("[env: HERDER_WORKERS]"), "{plain}");
    assert!(plain.contains("[env: HERDER_CONTROL]"), "{plain}");
    assert_eq!(help(&[("HERDER_WORKERS", "7")]), plain);
    let first = plain.lines().next().unwrap();
    assert!(first.len() <= 100, "a short first line: {first}");
}

fn man_page(dir: &Path, env: &[(&str, &str)]) -> String {
    let out = client(env, &["generate", "man", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.join("herder.1")).unwrap()
}

#[test]
fn the_man_page_has_a_name_line_environment_and_examples() {
    let dir = TempDir::new("env-man");
    let page = man_page(dir.path(), &[]);
    let name = page
        .lines()
        .skip_while(|l| *l != ".SH NAME")
        .nth(1)
        .unwrap_or_default();
    assert_eq!(
        name,
        r"herder \- run a pool of worker processes on a shared listening socket, under systemd or as PID 1"
    );
    for section in [
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "COMMANDS",
        "\"EXIT STATUS\"",
        "ENVIRONMENT",
        "EXAMPLES",
        "\"SEE ALSO\"",
    ] {
        assert!(
            page.lines().any(|l| l == format!(".SH {section}")),
            "no {section}"
        );
    }
    let environment = page.split(".SH ENVIRONMENT").nth(1).unwrap();
    let environment = environment.split(".SH ").next().unwrap();
    for var in [
        "HERDER_WORKERS",
        r"HERDER_DRAIN_TIMEOUT",
        "HERDER_LISTEN",
        "HERDER_CONTROL",
        "HERDER_LOG",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "FDSTORE",
        "HERDER_WORKER\\fR",
    ] {
        assert!(environment.contains(var), "ENVIRONMENT lacks {var}");
    }
    let examples = page.split(".SH EXAMPLES").nth(1).unwrap();
    for example in [
        "ListenStream=8080",
        r"ExecStart=/usr/bin/herder",
        r"herder \-\-listen 0.0.0.0:8080",
        "HERDER_WORKERS=4",
        "herder status",
        r"herder reload \-\-wait",
        r"herder upgrade \-\-wait",
    ] {
        assert!(examples.contains(example), "EXAMPLES lack {example}");
    }
    // The page does not depend on who builds it.
    let other = TempDir::new("env-man-other");
    assert_eq!(man_page(other.path(), &[("HERDER_WORKERS", "9")]), page);
    // And groff has nothing to say about it, where groff is installed.
    if let Ok(out) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(dir.path().join("herder.1"))
        .output()
    {
        assert!(out.status.success() && out.stderr.is_empty(), "{out:?}");
    }
}
