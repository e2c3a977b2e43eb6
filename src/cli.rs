//! The command line: clap definitions and their translation into a validated [`PoolConfig`].
//!
//! This module owns the contract of `PRODUCT.md` (flag names and their `HERDER_*` variables,
//! defaults, exit codes in `--help`) and what is generated from it: the man page (`man`), the
//! completions. It must never touch the process: no sockets, no signals; it reads the
//! environment (`env`) but never changes it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use nix::sys::signal::Signal;

use crate::listen::ListenSpec;
use crate::pool::{PoolConfig, ReadyMode};
use crate::steer::Balance;

mod agent;
mod env;
mod man;

pub use agent::AgentArgs;
pub use env::{own_vars, FromEnv, ListenArg};

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

/// The one line of `herder -h` and of the man page's NAME.
const ABOUT: &str =
    "run a pool of worker processes on a shared listening socket, under systemd or as PID 1";

/// What `herder --help` and the man page's DESCRIPTION say after [`ABOUT`].
const DESCRIPTION: &str = "\
herder takes the listening sockets from systemd (LISTEN_FDS) or binds its own (--listen), and \
runs COMMAND as a pool of workers that share them: it restarts a worker that crashes, replaces \
the pool one slot at a time on SIGHUP without refusing a connection, drains the workers on \
SIGTERM, and speaks sd_notify(3) both ways (READY, RELOADING, STOPPING, STATUS, WATCHDOG). As \
PID 1 in a container it also reaps every orphan.

Every option can also be set in the environment as HERDER_ and its long name in capitals \
(HERDER_WORKERS=4, HERDER_DRAIN_TIMEOUT=10s; --agent: HERDER_AGENT_COMMAND); the command line \
wins. Workers do not see these variables.";

/// Exit statuses, for `--help` and the man page's EXIT STATUS.
const EXIT_STATUS: [(&str, &str); 4] = [
    ("0", "stopped cleanly: every worker drained"),
    (
        "1",
        "gave up: workers kept failing (--restart-limit within --restart-window)",
    ),
    (
        "2",
        "usage or configuration error (a one-line message says what is wrong)",
    ),
    (
        "3",
        "stopped, but some workers had to be killed (--drain-timeout, or a forced stop)",
    ),
];

const SIGNALS: &str = "\
TERM, INT drain the pool (a second one, or QUIT, stops at once); HUP rolls the pool \
(zero-downtime reload); TTIN / TTOU add / remove one worker; USR1, USR2 are forwarded to every \
worker.";

const UNITS: &str = "\
Durations (DUR) are humantime strings like 500ms, 30s or 2m, at most 365d. Counts \
(--workers, --min-ready, --reload-surge) are at most 100000.";

/// The text after the options in `--help`: exit statuses, signals, units.
fn after_help() -> String {
    let codes: Vec<String> = EXIT_STATUS
        .iter()
        .map(|(code, what)| format!("  {code}  {what}"))
        .collect();
    format!(
        "Exit status:\n{}\n\nSignals: {SIGNALS}\n\n{UNITS}",
        codes.join("\n")
    )
}

// The about texts, the version with its build tag and the after-help are set in [`command`].
#[derive(Debug, Parser)]
#[command(
    name = "herder",
    about = ABOUT,
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
        /// Do not drain: SIGKILL every worker's process group at once.
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
    #[arg(long, env = "HERDER_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Generate {
    Man,
    Completions,
}

/// The run command's options. Every visible one can also be set as `HERDER_<LONG_NAME>`
/// (clap's `env`, read only when the option is not on the command line; a unit test holds each
/// new option to it). Flags take 1/0, true/false, yes/no, on/off there.
#[derive(Debug, Args)]
pub struct RunArgs {
    // (An explicit help text: rustdoc would read "[V6]" in a doc comment as a link.)
    #[arg(
        short,
        long,
        env = "HERDER_LISTEN",
        value_parser = env::ListenParser,
        value_name = "[NAME=]ADDR",
        help = "Bind a socket herder owns: HOST:PORT or [V6]:PORT (TCP), udp:HOST:PORT, unix:/path, \
                unix:@abstract. NAME goes into LISTEN_FDNAMES. Repeatable; in HERDER_LISTEN, \
                separated by whitespace. Sockets inherited through LISTEN_FDS come first."
    )]
    pub listen: Vec<ListenArg>,

    /// Pool size [default: the number of CPUs available to herder]
    #[arg(short, long, env = "HERDER_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    /// Give each worker slot its own SO_REUSEPORT socket on the same address; herder keeps it
    /// open across that slot's restarts.
    #[arg(long, env = "HERDER_REUSEPORT", value_parser = BoolishValueParser::new())]
    pub reuseport: bool,

    /// With --reuseport: new connections go only to slots whose worker is ready; `hash`
    /// spreads them by the client's address and port, `client-ip` keeps each client (IPv4
    /// address, IPv6 /64) on one slot while that slot is ready [default: hash]
    #[arg(
        long,
        env = "HERDER_BALANCE",
        value_enum,
        value_name = "hash|client-ip"
    )]
    pub balance: Option<BalanceArg>,

    /// When a worker counts as ready: right after exec, or when it sends READY=1 to herder's
    /// NOTIFY_SOCKET.
    #[arg(
        long,
        env = "HERDER_READY",
        value_enum,
        default_value = "exec",
        value_name = "exec|notify"
    )]
    pub ready: ReadyArg,

    /// A worker not ready by then is killed and counted as a failed start.
    #[arg(
        long,
        env = "HERDER_READY_TIMEOUT",
        value_parser = duration,
        default_value = "60s",
        value_name = "DUR"
    )]
    pub ready_timeout: Duration,

    /// How many ready workers make the pool ready (READY=1) [default: all]
    #[arg(long, env = "HERDER_MIN_READY", value_name = "N")]
    pub min_ready: Option<usize>,

    /// Signal sent to a worker to make it drain.
    #[arg(
        long,
        env = "HERDER_STOP_SIGNAL",
        value_parser = signal,
        default_value = "TERM",
        value_name = "SIG"
    )]
    pub stop_signal: Signal,

    /// How long a draining worker may take before SIGKILL.
    #[arg(
        long,
        env = "HERDER_DRAIN_TIMEOUT",
        value_parser = duration,
        default_value = "30s",
        value_name = "DUR"
    )]
    pub drain_timeout: Duration,

    /// Lame duck: on SIGTERM keep serving (but report not ready) this long, then drain.
    #[arg(
        long,
        env = "HERDER_SHUTDOWN_DELAY",
        value_parser = duration,
        default_value = "0s",
        value_name = "DUR"
    )]
    pub shutdown_delay: Duration,

    /// More than N restarts within --restart-window: give up (drain the pool, exit 1).
    #[arg(
        long,
        env = "HERDER_RESTART_LIMIT",
        default_value_t = 10,
        value_name = "N"
    )]
    pub restart_limit: u32,

    /// The window for --restart-limit.
    #[arg(
        long,
        env = "HERDER_RESTART_WINDOW",
        value_parser = duration,
        default_value = "60s",
        value_name = "DUR"
    )]
    pub restart_window: Duration,

    /// Slots replaced at once during a rolling reload.
    #[arg(
        long,
        env = "HERDER_RELOAD_SURGE",
        default_value_t = 1,
        value_name = "N"
    )]
    pub reload_surge: usize,

    /// Workers get WATCHDOG_USEC; one that stops sending WATCHDOG=1 is killed and restarted.
    #[arg(long, env = "HERDER_WORKER_WATCHDOG", value_parser = duration, value_name = "DUR")]
    pub worker_watchdog: Option<Duration>,

    /// Recycle a worker whose memory (the PSS of its whole process tree) exceeds SIZE: its
    /// replacement starts, then it drains. SIZE in bytes or with K, M, G (binary: 512M = 512
    /// MiB).
    #[arg(long, env = "HERDER_MAX_MEMORY", value_parser = size, value_name = "SIZE")]
    pub max_memory: Option<u64>,

    /// Recycle a worker before it is DUR old (each lives between DUR/2 and DUR, staggered over
    /// the slots so that two never come due together).
    #[arg(long, env = "HERDER_MAX_LIFETIME", value_parser = duration, value_name = "DUR")]
    pub max_lifetime: Option<Duration>,

    /// Run workers as this user (name or uid) after herder has bound the sockets.
    #[arg(long, env = "HERDER_USER", value_name = "USER")]
    pub user: Option<String>,

    /// Run workers with this group (name or gid) [default: the user's primary group].
    #[arg(long, env = "HERDER_GROUP", value_name = "GROUP")]
    pub group: Option<String>,

    /// Serve /livez, /readyz, /status (JSON) and /metrics (Prometheus) over HTTP on this address.
    #[arg(long, env = "HERDER_HEALTH", value_name = "HOST:PORT")]
    pub health: Option<String>,

    /// Push herder's own sockets (--listen, --reuseport siblings, --health) into systemd's fd
    /// store even without $FDSTORE (systemd 252 does not set it); the unit needs
    /// FileDescriptorStoreMax=. With $FDSTORE (systemd 254 and later) they are pushed anyway.
    #[arg(long, env = "HERDER_FD_STORE", value_parser = BoolishValueParser::new())]
    pub fd_store: bool,

    /// The control socket for `herder status|reload|scale|stop` (mode 0600)
    /// [default: $RUNTIME_DIRECTORY/herder.sock under systemd, else none]
    #[arg(long, env = "HERDER_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,

    #[command(flatten)]
    pub agent: AgentArgs,

    /// Say whether this binary can take over a running herder's state of this format (exit 0)
    /// or not (exit 1): the preflight of `herder upgrade`, run on the new binary with the
    /// running herder's own arguments.
    #[arg(long, value_name = "FORMAT", hide = true)]
    pub upgrade_check: Option<u32>,

    /// The program every worker runs, and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,

    /// Which options came from the environment, to name the variable in a later error.
    #[arg(skip)]
    pub from_env: FromEnv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BalanceArg {
    Hash,
    ClientIp,
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

/// `--max-memory`: `536870912`, `512M`, `1.5G`, `512MiB` (K, M, G, T are binary units, as in
/// systemd's `MemoryMax=` and `docker run -m`). At least 1M: a smaller limit would recycle any
/// worker at once.
fn size(s: &str) -> Result<u64, String> {
    match parse_size::Config::new().with_binary().parse_size(s) {
        Ok(b) if b >= 1 << 20 => Ok(b),
        Ok(_) => Err("out of range: at least 1M".into()),
        Err(e) => Err(format!("'{s}' is not a size like 512M or 2G ({e})")),
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
    /// Every `--listen` socket, in order (one `HERDER_LISTEN` may list several).
    pub fn listen(&self) -> Vec<ListenSpec> {
        self.listen
            .iter()
            .flat_map(|l| l.0.iter().cloned())
            .collect()
    }

    /// A setup error, with the variable in front when it is about an option from the
    /// environment: `HERDER_WORKERS=0: --workers must be at least 1`.
    pub fn explain(&self, msg: String) -> String {
        self.from_env.explain(msg)
    }

    /// How `--reuseport` groups are steered (`None`: without `--reuseport`, nothing is).
    pub fn balance(&self) -> Option<Balance> {
        let mode = match self.balance {
            None | Some(BalanceArg::Hash) => Balance::Hash,
            Some(BalanceArg::ClientIp) => Balance::ClientIp,
        };
        self.reuseport.then_some(mode)
    }

    /// Turns the flags into the pool's configuration; `cpus` is the default pool size.
    pub fn pool_config(&self, cpus: usize) -> Result<PoolConfig, String> {
        if self.balance.is_some() && !self.reuseport {
            return Err(
                "--balance needs --reuseport: herder steers connections between the \
                        slots' own SO_REUSEPORT sockets, and without --reuseport every worker \
                        accepts from one shared socket"
                    .into(),
            );
        }
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
        if self
            .max_lifetime
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return Err("--max-lifetime must be at least 1s".into());
        }
        let ready = match self.ready {
            ReadyArg::Exec => ReadyMode::Exec,
            ReadyArg::Notify => ReadyMode::Notify,
        };
        let agent = self
            .agent
            .config(ready, self.stop_signal, self.drain_timeout)?;
        Ok(PoolConfig {
            workers,
            ready,
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
            max_memory: self.max_memory,
            max_lifetime: self.max_lifetime,
            leave_timeout: self
                .reuseport
                .then(|| crate::pool::LEAVE_MAX.min(self.drain_timeout)),
            agent,
        })
    }
}

/// herder's whole command line, as `--help`, the man page and the completions show it.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    // `--version` says what `/status` says: the package version and a stamped build tag.
    let version: &'static str = Box::leak(crate::upgrade::version().into_boxed_str());
    // The help must not depend on the environment: the variables' names, never their values.
    let hide = |a: clap::Arg| a.hide_env_values(true);
    Cli::command()
        .version(version)
        .long_about(format!("{ABOUT}.\n\n{DESCRIPTION}"))
        .after_help(after_help())
        .mut_args(hide)
        .mut_subcommands(move |s| s.mut_args(hide))
}

/// Parses the command line (and the `HERDER_*` environment); on a usage error prints one line
/// and exits 2 (help and version exit 0).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cmd = command();
    let parsed = cmd.clone().try_get_matches_from(&argv).and_then(|m| {
        let mut cli = Cli::from_arg_matches(&m)?;
        cli.run.from_env = FromEnv::of(&cmd, &m);
        Ok(cli)
    });
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
            } else if let Some(setting) = env::culprit(&e, &cmd, &argv) {
                format!("{setting}: {first}")
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
    std::fs::create_dir_all(dir)?;
    let mut cmd = command();
    match what {
        Generate::Man => {
            let mut out = std::fs::File::create(dir.join("herder.1"))?;
            man::render(cmd, &mut out)?;
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
mod tests;
