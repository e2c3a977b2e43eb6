//! The command line's unit tests: parsing, bounds, and the environment's part in it.

use super::*;
use proptest::prelude::*;
use std::time::Instant;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("herder").chain(args.iter().copied()))
}

#[test]
fn command_after_double_dash() {
    let cli = parse(&["-w", "3", "--", "server", "--port", "1"]).unwrap();
    assert_eq!(cli.run.workers, Some(3));
    assert_eq!(cli.run.command, vec!["server", "--port", "1"]);
}

#[test]
fn no_command_is_an_error() {
    assert!(parse(&["-w", "3"]).is_err());
}

#[test]
fn signals_by_name_and_number() {
    assert_eq!(signal("TERM").unwrap(), Signal::SIGTERM);
    assert_eq!(signal("sigint").unwrap(), Signal::SIGINT);
    assert_eq!(signal("9").unwrap(), Signal::SIGKILL);
    assert!(signal("NOPE").is_err());
}

#[test]
fn zero_workers_is_refused() {
    let cli = parse(&["-w", "0", "--", "x"]).unwrap();
    assert!(cli.run.pool_config(2).is_err());
    let cli = parse(&["--", "x"]).unwrap();
    assert_eq!(cli.run.pool_config(4).unwrap().workers, 4);
}

#[test]
fn durations() {
    let cli = parse(&["--drain-timeout", "500ms", "--", "x"]).unwrap();
    assert_eq!(cli.run.drain_timeout, Duration::from_millis(500));
    assert!(parse(&["--drain-timeout", "soon", "--", "x"]).is_err());
}

const DURATION_FLAGS: [&str; 5] = [
    "--ready-timeout",
    "--drain-timeout",
    "--shutdown-delay",
    "--restart-window",
    "--worker-watchdog",
];

#[test]
fn every_duration_flag_is_bounded() {
    for flag in DURATION_FLAGS {
        let cli = parse(&[flag, "365d", "--", "x"]).unwrap();
        cli.run.pool_config(1).unwrap();
        for huge in ["365d 1ns", "500000000000years", "99999999999999999999999s"] {
            let e = parse(&[flag, huge, "--", "x"]).unwrap_err().to_string();
            assert!(
                e.contains("out of range: at most 365d"),
                "{flag} {huge}: {e}"
            );
        }
    }
    assert!(parse(&["reload", "--timeout", "365d"]).is_ok());
    let e = parse(&["reload", "--timeout", "366d"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn the_minimums_stay() {
    let cli = parse(&["--worker-watchdog", "9ms", "--", "x"]).unwrap();
    assert!(cli.run.pool_config(1).is_err());
    let cli = parse(&["--restart-window", "0s", "--", "x"]).unwrap();
    assert!(cli.run.pool_config(1).is_err());
}

#[test]
fn the_largest_sums_from_the_configuration_do_not_overflow() {
    // pool.rs: now + shutdown_delay + drain_timeout + 5s (the stop budget) is the largest.
    let budget = MAX_DURATION + MAX_DURATION + Duration::from_secs(5);
    assert!(Instant::now().checked_add(budget).is_some());
    assert!(
        u64::try_from(MAX_DURATION.as_micros()).is_ok(),
        "WATCHDOG_USEC"
    );
}

#[test]
fn every_count_is_bounded() {
    let max = MAX_WORKERS.to_string();
    let over = (MAX_WORKERS + 1).to_string();
    for flag in ["--workers", "--reload-surge", "--min-ready"] {
        let cli = parse(&[flag, &max, "--", "x"]).unwrap();
        cli.run.pool_config(1).unwrap();
        let cli = parse(&[flag, &over, "--", "x"]).unwrap();
        let e = cli.run.pool_config(1).unwrap_err();
        assert_eq!(e, format!("{flag} {over} is out of range: at most {max}"));
    }
}

#[test]
fn the_help_states_the_bounds() {
    assert_eq!(
        humantime::parse_duration(MAX_DURATION_TEXT).unwrap(),
        MAX_DURATION
    );
    assert!(after_help().contains(&format!("at most {MAX_DURATION_TEXT}")));
    assert!(after_help().contains(&format!("at most {MAX_WORKERS}")));
}

/// Strings that look like durations, so that the boundary gets hit, not only garbage.
fn duration_like() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec![
        "ns", "us", "ms", "s", "m", "h", "d", "w", "months", "y", "years", "", "x",
    ]);
    let part = ("[0-9]{1,22}", prop::option::of("\\.[0-9]{1,12}"), unit)
        .prop_map(|(n, f, u)| format!("{n}{}{u}", f.unwrap_or_default()));
    prop::collection::vec(part, 1..4).prop_map(|p| p.join(" "))
}

proptest! {
    #[test]
    fn the_duration_parser_accepts_exactly_what_is_in_range(
        s in prop_oneof![any::<String>(), duration_like()]
    ) {
        match (duration(&s), humantime::parse_duration(&s)) {
            (Ok(d), Ok(h)) => prop_assert!(d == h && d <= MAX_DURATION),
            (Err(e), Ok(h)) => {
                prop_assert!(h > MAX_DURATION, "{s}: {e}");
                prop_assert!(e.contains("out of range"));
            }
            (Err(_), Err(_)) => {}
            (Ok(d), Err(e)) => prop_assert!(false, "{s}: {d:?} but humantime says {e}"),
        }
    }

    #[test]
    fn durations_round_trip_through_humantime(
        secs in 0..=MAX_DURATION.as_secs() + 2,
        nanos in 0..1_000_000_000u32,
    ) {
        let d = Duration::new(secs, nanos);
        let text = humantime::format_duration(d).to_string();
        if d <= MAX_DURATION {
            prop_assert_eq!(duration(&text), Ok(d), "{}", text);
        } else {
            prop_assert!(duration(&text).unwrap_err().contains("out of range"));
        }
    }

    #[test]
    fn huge_durations_are_out_of_range(secs in MAX_DURATION.as_secs()..=u64::MAX) {
        let text = humantime::format_duration(Duration::new(secs, 1)).to_string();
        prop_assert!(duration(&text).unwrap_err().contains("out of range"));
    }

    #[test]
    fn counts_are_accepted_exactly_in_range(
        n in prop_oneof![0..=MAX_WORKERS + 2, any::<usize>()],
        which in 0..3usize,
    ) {
        let flag = ["--workers", "--reload-surge", "--min-ready"][which];
        let cli = parse(&[flag, &n.to_string(), "--", "x"]).unwrap();
        let ok = cli.run.pool_config(1).is_ok();
        prop_assert_eq!(ok, (1..=MAX_WORKERS).contains(&n));
    }
}

// The environment's part: `HERDER_<LONG_NAME>` for every option.

/// `--drain-timeout` → `HERDER_DRAIN_TIMEOUT`; `--agent` → `HERDER_AGENT_COMMAND`
/// (`HERDER_AGENT=1` marks the agent process, src/cli/agent.rs).
fn variable_for(long: &str) -> String {
    if long == "agent" {
        return super::agent::COMMAND_VAR.to_string();
    }
    format!("HERDER_{}", long.to_ascii_uppercase().replace('-', "_"))
}

fn built() -> clap::Command {
    let mut cmd = command();
    cmd.build();
    cmd
}

#[test]
fn every_visible_run_option_has_its_variable() {
    let cmd = built();
    let mut checked = 0;
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        let env = a.get_env().map(|v| v.to_string_lossy().into_owned());
        let Some(long) = a.get_long() else {
            assert_eq!(env, None, "the COMMAND is never read from the environment");
            continue;
        };
        if matches!(id, "help" | "version") || a.is_hide_set() {
            assert_eq!(env, None, "--{long} is hidden or clap's own: no variable");
            continue;
        }
        assert_eq!(env, Some(variable_for(long)), "--{long}");
        assert!(
            a.is_hide_env_values_set(),
            "--{long}: help must not show the value"
        );
        checked += 1;
    }
    assert!(checked >= 18, "only {checked} options checked");
}

#[test]
fn the_clients_read_herder_control() {
    let cmd = built();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        for a in sub.get_arguments().filter(|a| a.get_id() != "help") {
            let env = a.get_env().map(|v| v.to_string_lossy().into_owned());
            let want = (a.get_id() == "control").then(|| "HERDER_CONTROL".to_string());
            assert_eq!(env, want, "herder {} --{:?}", sub.get_name(), a.get_long());
        }
    }
}

#[test]
fn no_option_takes_a_name_herder_sets_or_reads_otherwise() {
    let vars = own_vars();
    for reserved in env::RESERVED {
        let options: Vec<&String> = vars.iter().filter(|v| *v != env::LOG_VAR).collect();
        assert!(!options.contains(&&reserved.to_string()), "{reserved}");
    }
    assert!(vars.contains("HERDER_LOG") && vars.contains("HERDER_CONTROL"));
    assert!(vars.contains("HERDER_WORKERS") && !vars.contains("HERDER_WORKER"));
    assert!(vars.iter().all(|v| v.starts_with("HERDER_")), "{vars:?}");
}

#[test]
fn herder_listen_is_a_whitespace_list_the_command_line_one_address() {
    use clap::builder::TypedValueParser;
    use clap::parser::ValueSource::{CommandLine, EnvVariable};
    let cmd = built();
    let arg = cmd.get_arguments().find(|a| a.get_id() == "listen");
    let parse = |v: &str, src| env::ListenParser.parse_ref_(&cmd, arg, v.as_ref(), src);
    let two = parse("web=127.0.0.1:80\n\t [::1]:80 ", EnvVariable).unwrap();
    let shown: Vec<String> = two.0.iter().map(|s| s.to_string()).collect();
    assert_eq!(shown, ["web=127.0.0.1:80", "[::1]:80"]);
    // A unix path may hold a space on the command line.
    let one = parse("unix:/run/my app.sock", CommandLine).unwrap();
    assert_eq!(one.0.len(), 1);
    assert!(parse("127.0.0.1:80 127.0.0.1:81", CommandLine).is_err());
    for empty in ["", "  \n"] {
        let e = parse(empty, EnvVariable).unwrap_err().to_string();
        assert!(e.contains("invalid address"), "{e}");
    }
    let e = parse("127.0.0.1:80 nowhere", EnvVariable).unwrap_err();
    assert!(e.to_string().contains("'nowhere'"), "{e}");
}

#[test]
fn a_later_error_names_the_variable_of_an_option_from_the_environment() {
    let from_env = FromEnv(vec![(
        "--workers".to_string(),
        "HERDER_WORKERS=0".to_string(),
    )]);
    let e = from_env.explain("--workers must be at least 1".into());
    assert_eq!(e, "HERDER_WORKERS=0: --workers must be at least 1");
    assert_eq!(
        from_env.explain("--workers-x is other".into()),
        "--workers-x is other"
    );
    assert_eq!(
        from_env.explain("--user x: no such user".into()),
        "--user x: no such user"
    );
}

#[test]
fn the_help_shows_the_variables_and_the_short_about() {
    let mut cmd = command();
    let long = cmd.render_long_help().to_string();
    assert!(long.contains("[env: HERDER_WORKERS]"), "{long}");
    assert!(!long.contains("[env: HERDER_WORKERS="), "no value shown");
    assert!(long.starts_with(&format!("{ABOUT}.\n")), "{long}");
    let short = cmd.render_help().to_string();
    assert_eq!(short.lines().next(), Some(ABOUT));
}

// The agent's options (src/cli/agent.rs).

#[test]
fn the_agent_command_is_split_like_a_shell_would() {
    let cli = parse(&["--agent", r#"python3 "my agent.py" --name a\ b"#, "--", "x"]).unwrap();
    let words = cli.run.agent.command().unwrap().unwrap();
    assert_eq!(words, vec!["python3", "my agent.py", "--name", "a b"]);
    for bad in ["", "   ", "python3 'open"] {
        let cli = parse(&["--agent", bad, "--", "x"]).unwrap();
        assert!(cli.run.pool_config(1).is_err(), "{bad:?}");
    }
}

#[test]
fn the_agent_follows_the_pool_unless_told_otherwise() {
    let cli = parse(&[
        "--ready",
        "notify",
        "--stop-signal",
        "INT",
        "--drain-timeout",
        "9s",
        "--agent",
        "a",
        "--",
        "x",
    ])
    .unwrap();
    let a = cli.run.pool_config(1).unwrap().agent.unwrap();
    assert_eq!(a.ready, ReadyMode::Notify);
    assert_eq!(a.stop_signal, Signal::SIGINT);
    assert_eq!(a.drain_timeout, Duration::from_secs(9));
    assert!(!a.required && !a.reload);
    let cli = parse(&[
        "--agent",
        "a",
        "--agent-ready",
        "exec",
        "--agent-stop-signal",
        "USR2",
        "--agent-drain-timeout",
        "2s",
        "--agent-required",
        "--agent-reload",
        "--ready",
        "notify",
        "--",
        "x",
    ])
    .unwrap();
    let a = cli.run.pool_config(1).unwrap().agent.unwrap();
    assert_eq!(a.ready, ReadyMode::Exec);
    assert_eq!(a.stop_signal, Signal::SIGUSR2);
    assert_eq!(a.drain_timeout, Duration::from_secs(2));
    assert!(a.required && a.reload);
    assert!(parse(&["--", "x"])
        .unwrap()
        .run
        .pool_config(1)
        .unwrap()
        .agent
        .is_none());
}

#[test]
fn agent_options_without_an_agent_or_with_a_datagram_socket_are_refused() {
    for flags in [
        &["--agent-listen", "unix:/run/a.sock"][..],
        &["--agent-required"],
        &["--agent-reload"],
        &["--agent-ready", "notify"],
        &["--agent-stop-signal", "INT"],
        &["--agent-drain-timeout", "1s"],
    ] {
        let args: Vec<&str> = flags.iter().copied().chain(["--", "x"]).collect();
        let e = parse(&args).unwrap().run.pool_config(1).unwrap_err();
        assert!(e.ends_with("needs --agent"), "{flags:?}: {e}");
    }
    let cli = parse(&[
        "--agent",
        "a",
        "--agent-listen",
        "udp:127.0.0.1:9",
        "--",
        "x",
    ])
    .unwrap();
    assert!(cli
        .run
        .pool_config(1)
        .unwrap_err()
        .contains("stream socket"));
    let cli = parse(&["--agent", "a", "--agent-listen", "[::1]:0", "--", "x"]).unwrap();
    assert!(cli.run.pool_config(1).is_ok());
}
