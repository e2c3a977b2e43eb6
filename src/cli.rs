//! The command line: clap definitions and their translation into a validated [`PoolConfig`].
//!
//! This module owns the contract of `PRODUCT.md` (flag names, defaults, exit codes in `--help`).
//! It must never touch the process: no sockets, no signals, no environment changes.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::Signal;

use crate::listen::ListenSpec;
use crate::pool::{PoolConfig, ReadyMode};

/// The longest duration any flag takes: 365 days. Far longer than any sensible timeout,
/// window or delay (a drain that may last a year is no drain), and short enough that every
/// sum herder computes from the configuration — `Instant::now()` plus any of them,
/// `--shutdown-delay + --drain-timeout + 5s`, `--ready-timeout + 5s`, WATCHDOG_USEC in µs —
/// is nowhere near overflowing (`Instant` holds i64 seconds; two of these plus slack is still
/// under tokio's ~2.2-year timer horizon). The core may rely on it for checked arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How [`MAX_DURATION`] reads in messages (and parses back: `humantime` takes `365d`).
const MAX_DURATION_TEXT: &str = "365d";

/// The largest pool: `--workers`, `--min-ready`, `--reload-surge`, and the control socket's
/// `scale` bound (src/control.rs) all stop here. A pool this big is already far past what one
/// machine's pid and fd limits allow; the bound exists so no count from outside can make
/// herder allocate or loop without limit.
pub use crate::pool::MAX_WORKERS;

const EXIT_CODES: &str = "\
Exit status:
  0  stopped cleanly: every worker drained
  1  gave up: workers kept failing (--restart-limit within --restart-window)
  2  usage or configuration error (a one-line message says what is wrong)
  3  stopped, but some workers had to be killed (--drain-timeout, or a forced stop)

Signals: TERM, INT drain the pool (a second one, or QUIT, stops at once); HUP rolls the pool
(zero-downtime reload); TTIN / TTOU add / remove one worker; USR1, USR2 are forwarded to every
worker.

Durations (DUR) are humantime strings like 500ms, 30s or 2m, at most 365d. Counts
(--workers, --min-ready, --reload-surge) are at most 100000.";

/// herder: a socket-activation launcher. It takes the listening socket from systemd
/// (LISTEN_FDS) or binds its own, and runs a supervised pool of workers that share it.
#[derive(Debug, Parser)]
#[command(
    name = "herder",
    version,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(flatten)]
    pub run: RunArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the running pool: every slot's pid, state, uptime, memory, CPU, restarts and last
    /// exit, and herder's own memory and CPU.
    Status {
        /// The full status document as JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C (with --json: one document per line).
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Start a rolling reload of the running pool.
    Reload {
        /// Wait until the new generation serves: exit 0 then, 1 with the reason if abandoned.
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this long (the reload goes on).
        #[arg(long, value_parser = duration, value_name = "DUR")]
        timeout: Option<Duration>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Resize the running pool: N workers, or +N / -N.
    Scale {
        #[arg(allow_hyphen_values = true, value_name = "N|+N|-N")]
        to: String,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Stop the running pool: drain (like SIGTERM), or with --force at once (like SIGQUIT).
    Stop {
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Re-execute herder's own binary in place (after a package upgrade): the same PID, the
    /// same sockets, the same running workers. Workers are not restarted: `reload` does that.
    Upgrade {
        /// Wait until the new binary runs the pool: exit 0 then, 1 with the reason if it could
        /// not (the old one keeps running).
        #[arg(long)]
        wait: bool,
        /// With --wait, give up waiting after this long.
        #[arg(long, value_parser = duration, value_name = "DUR")]
        timeout: Option<Duration>,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Write the man page or shell completions into DIR (used by packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_enum)]
        what: Generate,
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ControlArg {
    /// The running herder's control socket [default: $RUNTIME_DIRECTORY/herder.sock]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Generate {
    Man,
    Completions,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    // (An explicit help text: rustdoc would read "[V6]" in a doc comment as a link.)
    #[arg(
        short,
        long,
        value_name = "[NAME=]ADDR",
        help = "Bind a socket herder owns: HOST:PORT or [V6]:PORT (TCP), udp:HOST:PORT, unix:/path, \
                unix:@abstract. NAME goes into LISTEN_FDNAMES. Repeatable. Sockets inherited through \
                LISTEN_FDS come first."
    )]
    pub listen: Vec<ListenSpec>,

    /// Pool size [default: the number of CPUs available to herder]
    #[arg(short, long, value_name = "N")]
    pub workers: Option<usize>,

    /// Give each worker slot its own SO_REUSEPORT socket on the same address; herder keeps it
    /// open across that slot's restarts.
    #[arg(long)]
    pub reuseport: bool,

    /// When a worker counts as ready: right after exec, or when it sends READY=1 to herder's
    /// NOTIFY_SOCKET.
    #[arg(long, value_enum, default_value = "exec", value_name = "exec|notify")]
    pub ready: ReadyArg,

    /// A worker not ready by then is killed and counted as a failed start.
    #[arg(long, value_parser = duration, default_value = "60s", value_name = "DUR")]
    pub ready_timeout: Duration,

    /// How many ready workers make the pool ready (READY=1) [default: all]
    #[arg(long, value_name = "N")]
    pub min_ready: Option<usize>,

    /// Signal sent to a worker to make it drain.
    #[arg(long, value_parser = signal, default_value = "TERM", value_name = "SIG")]
    pub stop_signal: Signal,

    /// How long a draining worker may take before SIGKILL.
    #[arg(long, value_parser = duration, default_value = "30s", value_name = "DUR")]
    pub drain_timeout: Duration,

    /// Lame duck: on SIGTERM keep serving (but report not ready) this long, then drain.
    #[arg(long, value_parser = duration, default_value = "0s", value_name = "DUR")]
    pub shutdown_delay: Duration,

    /// More than N restarts within --restart-window: give up (drain the pool, exit 1).
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub restart_limit: u32,

    /// The window for --restart-limit.
    #[arg(long, value_parser = duration, default_value = "60s", value_name = "DUR")]
    pub restart_window: Duration,

    /// Slots replaced at once during a rolling reload.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub reload_surge: usize,

    /// Workers get WATCHDOG_USEC; one that stops sending WATCHDOG=1 is killed and restarted.
    #[arg(long, value_parser = duration, value_name = "DUR")]
    pub worker_watchdog: Option<Duration>,

    /// Run workers as this user (name or uid) after herder has bound the sockets.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    /// Run workers with this group (name or gid) [default: the user's primary group].
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Serve /livez, /readyz, /status (JSON) and /metrics (Prometheus) over HTTP on this address.
    #[arg(long, value_name = "HOST:PORT")]
    pub health: Option<String>,

    /// Push herder's own sockets (--listen, --reuseport siblings, --health) into systemd's fd
    /// store even without $FDSTORE (systemd 252 does not set it); the unit needs
    /// FileDescriptorStoreMax=. With $FDSTORE (systemd 254 and later) they are pushed anyway.
    #[arg(long)]
    pub fd_store: bool,

    /// The control socket for `herder status|reload|scale|stop` (mode 0600)
    /// [default: $RUNTIME_DIRECTORY/herder.sock under systemd, else none]
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Say whether this binary can take over a running herder's state of this format (exit 0)
    /// or not (exit 1): the preflight of `herder upgrade`, run on the new binary with the
    /// running herder's own arguments.
    #[arg(long, value_name = "FORMAT", hide = true)]
    pub upgrade_check: Option<u32>,

    /// The program every worker runs, and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadyArg {
    Exec,
    Notify,
}

/// A humantime duration no longer than [`MAX_DURATION`] (the value parser of every DUR flag).
fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d <= MAX_DURATION => Ok(d),
        Ok(_) => Err(format!("out of range: at most {MAX_DURATION_TEXT}")),
        // humantime's word for a number past u64, or for a fraction finer than 1ns.
        Err(humantime::DurationError::NumberOverflow) => Err(format!(
            "out of range: at most {MAX_DURATION_TEXT}, in steps of at least 1ns"
        )),
        Err(e) => Err(format!(
            "'{s}' is not a duration like 500ms, 30s or 2m ({e})"
        )),
    }
}

/// A count flag's upper bound, checked in [`RunArgs::pool_config`].
fn at_most(flag: &str, n: usize, max: usize) -> Result<(), String> {
    if n > max {
        return Err(format!("{flag} {n} is out of range: at most {max}"));
    }
    Ok(())
}

/// Parses `TERM`, `SIGTERM` or `15`.
pub fn signal(s: &str) -> Result<Signal, String> {
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("'{s}' is not a signal number"));
    }
    name.parse::<Signal>()
        .map_err(|_| format!("'{s}' is not a signal name like TERM or INT"))
}

impl RunArgs {
    /// Turns the flags into the pool's configuration; `cpus` is the default pool size.
    pub fn pool_config(&self, cpus: usize) -> Result<PoolConfig, String> {
        let workers = self.workers.unwrap_or(cpus.max(1));
        if workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        at_most("--workers", workers, MAX_WORKERS)?;
        if self.reload_surge == 0 {
            return Err("--reload-surge must be at least 1".into());
        }
        at_most("--reload-surge", self.reload_surge, MAX_WORKERS)?;
        if self.min_ready == Some(0) {
            return Err("--min-ready must be at least 1".into());
        }
        if let Some(n) = self.min_ready {
            at_most("--min-ready", n, MAX_WORKERS)?;
        }
        if let Some(w) = self.worker_watchdog {
            if w < Duration::from_millis(10) {
                return Err("--worker-watchdog must be at least 10ms".into());
            }
        }
        if self.restart_window.is_zero() {
            return Err("--restart-window must be longer than 0s".into());
        }
        Ok(PoolConfig {
            workers,
            ready: match self.ready {
                ReadyArg::Exec => ReadyMode::Exec,
                ReadyArg::Notify => ReadyMode::Notify,
            },
            ready_timeout: self.ready_timeout,
            min_ready: self.min_ready,
            stop_signal: self.stop_signal,
            drain_timeout: self.drain_timeout,
            shutdown_delay: self.shutdown_delay,
            restart_limit: self.restart_limit,
            restart_window: self.restart_window,
            reload_surge: self.reload_surge,
            worker_watchdog: self.worker_watchdog,
            manager_watchdog: None,
        })
    }
}

/// Parses the command line; on a usage error prints one line and exits 2 (help and version
/// exit 0).
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    // `--version` says what `/status` says: the package version and a stamped build tag.
    let version: &'static str = Box::leak(crate::upgrade::version().into_boxed_str());
    let parsed = Cli::command()
        .version(version)
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid usage");
            let first = first.trim_start_matches("error: ");
            let hint = if matches!(e.kind(), MissingRequiredArgument) && text.contains("<COMMAND>")
            {
                "no COMMAND: usage is herder [OPTIONS] -- COMMAND [ARG]...".to_string()
            } else {
                first.to_string()
            };
            eprintln!("herder: {hint}");
            std::process::exit(crate::EXIT_USAGE);
        }
    }
}

/// Writes the man page or the shell completions generated from these definitions.
pub fn generate(what: Generate, dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut cmd = Cli::command();
    match what {
        Generate::Man => {
            let mut out = std::fs::File::create(dir.join("herder.1"))?;
            clap_mangen::Man::new(cmd).render(&mut out)?;
        }
        Generate::Completions => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd, "herder", dir)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        assert!(EXIT_CODES.contains(&format!("at most {MAX_DURATION_TEXT}")));
        assert!(EXIT_CODES.contains(&format!("at most {MAX_WORKERS}")));
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
}
