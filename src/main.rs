//! herder: a socket-activation launcher. `main` is synchronous setup — parse flags, take (and
//! unset) what the service manager passed, bind sockets, set the signal mask and the
//! subreaper — then a hand-built current-thread tokio runtime runs the supervisor's loop.
//! Setup errors are one line on stderr and exit status 2; once the loop runs, herder only
//! exits when asked to stop or when it gives up.

mod cli;
mod client;
mod control;
mod fdstore;
mod health;
mod listen;
mod logging;
mod manager;
mod metrics;
mod notify;
mod pid1;
mod pool;
mod reap;
mod serve;
mod signals;
mod spawn;
mod status;
mod steer;
mod supervisor;
mod throttle;
mod upgrade;
mod usage;
mod watch;

use std::ffi::OsString;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::listen::{InheritedEnv, SocketSet};

use crate::pool::Pool;

/// Usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

/// What systemd (or another manager) put in our environment, removed from it before any
/// thread exists so that no worker inherits it (workers get their own values).
struct FromManager {
    listen: InheritedEnv,
    notify_socket: Option<OsString>,
    watchdog_usec: Option<OsString>,
    watchdog_pid: Option<OsString>,
    /// Set by an earlier herder that executed this one in place (`herder upgrade`).
    upgrade_state: Option<OsString>,
    /// `FDSTORE`: systemd (≥ 254) keeps this many fds for us (src/fdstore.rs).
    fdstore: Option<OsString>,
}

fn take_env() -> FromManager {
    let take = |k: &str| {
        let v = std::env::var_os(k);
        // SAFETY: called first thing in `main`, before the runtime or any other thread exists,
        // so nothing can read the environment concurrently (std::env::remove_var docs).
        unsafe { std::env::remove_var(k) };
        v
    };
    FromManager {
        listen: InheritedEnv {
            listen_pid: take("LISTEN_PID"),
            listen_fds: take("LISTEN_FDS"),
            listen_fdnames: take("LISTEN_FDNAMES"),
        },
        notify_socket: take("NOTIFY_SOCKET"),
        watchdog_usec: take("WATCHDOG_USEC"),
        watchdog_pid: take("WATCHDOG_PID"),
        upgrade_state: take(upgrade::STATE_FD_VAR),
        fdstore: take("FDSTORE"),
    }
}

fn main() {
    spawn::ensure_std_fds();
    // Before anything is opened: herder's own fds are herder's problem, workers get the limit
    // back.
    let nofile = spawn::raise_nofile();
    let from_manager = take_env();
    // An image started by `herder upgrade` keeps the signals blocked that arrived during the
    // exec until its handlers exist (Supervisor::run unblocks them).
    if from_manager.upgrade_state.is_none() {
        signals::unblock_all();
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    let cli = cli::parse();
    if let Some(command) = cli.command {
        std::process::exit(subcommand(command));
    }
    if let Some(format) = cli.run.upgrade_check {
        std::process::exit(upgrade_check(&cli.run, format));
    }
    if let Some(fd) = &from_manager.upgrade_state {
        logging::init();
        let resumed = resume(&cli.run, fd, &argv);
        run(resumed.map_err(|e| explain(&cli.run, e)));
    }
    // Inherited fds first, before logging (the journal socket) opens anything past them.
    // herder's own sockets back from systemd's fd store are set aside (src/fdstore.rs).
    let inherited = fdstore::inherit(&from_manager.listen, std::process::id());
    logging::init();
    let setup = inherited
        .map_err(anyhow::Error::from)
        .and_then(|(l, stored)| setup(&cli.run, from_manager, l, stored, nofile))
        .map(|mut s| {
            s.up.exe = argv.first().and_then(|a| upgrade::own_path(a));
            s.up.args = argv.iter().skip(1).cloned().collect();
            s.up.nofile = nofile.map(|l| (l.rlim_cur, l.rlim_max));
            s
        });
    run(setup.map_err(|e| explain(&cli.run, e)));
}

/// A setup error that names the `HERDER_*` variable it is about, if it came from one.
fn explain(args: &cli::RunArgs, e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::msg(args.explain(format!("{e:#}")))
}

/// Runs the event loop of a supervisor that setup made (or says why it could not, exit 2).
fn run(supervisor: Result<supervisor::Supervisor>) -> ! {
    let supervisor = match supervisor {
        Ok(s) => s,
        Err(e) => {
            eprintln!("herder: {e:#}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herder: cannot start the event loop: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(supervisor.run());
    std::process::exit(code);
}

/// `herder --upgrade-check FORMAT ARGS…`: whether this binary, with these arguments, can take
/// over a running herder's state of that format. Nothing is bound or started.
fn upgrade_check(args: &cli::RunArgs, format: u32) -> i32 {
    let checked = args
        .pool_config(cpus())
        .map_err(anyhow::Error::msg)
        .and_then(|_| credentials(args))
        .map_err(|e| args.explain(format!("{e:#}")))
        .and_then(|_| upgrade::check(format));
    match checked {
        Ok(()) => {
            println!(
                "herder {} resumes upgrade state format {format}",
                upgrade::version()
            );
            0
        }
        Err(why) => {
            eprintln!("herder: {why}");
            1
        }
    }
}

/// The setup of an image that an earlier herder executed in place: everything comes from the
/// state it left, nothing is bound or inherited anew.
fn resume(args: &cli::RunArgs, fd: &OsString, argv: &[OsString]) -> Result<supervisor::Supervisor> {
    let fd: i32 = fd
        .to_str()
        .and_then(|v| v.parse().ok())
        .context("the upgrade state fd is not a number")?;
    let state = upgrade::read_state(fd).map_err(anyhow::Error::msg)?;
    let cfg = args.pool_config(cpus()).map_err(anyhow::Error::msg)?;
    let creds = credentials(args)?;
    supervisor::resume(
        state,
        supervisor::Resume {
            cfg,
            command: args.command.clone(),
            creds,
            exe: argv.first().and_then(|a| upgrade::own_path(a)),
            args: argv.iter().skip(1).cloned().collect(),
            listen: args.listen(),
            health: health_spec(args)?,
            fd_store: args.fd_store,
            agent_command: args.agent.command().map_err(anyhow::Error::msg)?,
        },
    )
    .map(|mut s| {
        // The programs stay attached across the exec; this image re-attaches from the pool's
        // state at its first turn of the loop.
        s.steer = args.balance().map(steer::Steering::new);
        s
    })
}

/// `herder status|reload|scale|stop|generate`: a client of a running herder, or a generator.
fn subcommand(command: cli::Command) -> i32 {
    use cli::Command::*;
    use client::Ask;
    match command {
        Generate { what, dir } => match cli::generate(what, &dir) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("herder: cannot write into {}: {e}", dir.display());
                EXIT_USAGE
            }
        },
        Status {
            json,
            watch,
            control,
        } => client::run(Ask::Status { json, watch }, control.control),
        Reload {
            wait,
            timeout,
            control,
        } => client::run(Ask::Reload { wait, timeout }, control.control),
        Scale { to, control } => client::run(Ask::Scale { to }, control.control),
        Stop { force, control } => client::run(Ask::Stop { force }, control.control),
        Upgrade {
            wait,
            timeout,
            control,
        } => client::run(Ask::Upgrade { wait, timeout }, control.control),
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn setup(
    args: &cli::RunArgs,
    env: FromManager,
    mut listeners: Vec<listen::Listener>,
    stored: fdstore::Stored,
    nofile: Option<libc::rlimit>,
) -> Result<supervisor::Supervisor> {
    let my_pid = std::process::id();
    let mut cfg = args.pool_config(cpus()).map_err(anyhow::Error::msg)?;
    cfg.manager_watchdog = manager::watchdog_interval(
        env.watchdog_usec.as_ref().and_then(|v| v.to_str()),
        env.watchdog_pid.as_ref().and_then(|v| v.to_str()),
        my_pid,
    );
    let creds = credentials(args)?;
    let (worker_uid, worker_gid) = creds.as_ref().map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |c| (c.uid, c.gid),
    );

    let manager = match env.notify_socket.as_ref().and_then(|v| v.to_str()) {
        Some(v) => Some(manager::Manager::new(v).context("NOTIFY_SOCKET")?),
        None => None,
    };
    let health_spec = health_spec(args)?;
    // Stored sockets are taken back where they fit; the rest is bound and pushed.
    let mut store = fdstore::FdStore::new(
        stored,
        env.fdstore.as_deref(),
        args.fd_store,
        manager.as_ref(),
    );
    let own = store.own_sockets(&args.listen(), health_spec.as_ref(), args.reuseport)?;
    listeners.extend(own.listeners);
    let mut sockets = SocketSet::new(listeners, args.reuseport)?;
    store.prepare(&mut sockets, cfg.workers)?;
    for l in &sockets.listeners {
        info!(addr = %l.display, name = %l.name, "listening on {} (name {})", l.display, l.name);
    }
    let health = own.health.map(|l| {
        info!(addr = %l.display, "health endpoint on {}", l.display);
        std::net::TcpListener::from(l.fd)
    });
    let control = match args.control.clone().or_else(control::default_path) {
        Some(path) => {
            let l = control::bind(&path)?;
            info!(path = %path.display(), "control socket at {}", path.display());
            Some((l, path))
        }
        None => None,
    };
    let agent_socket = bind_agent_socket(args, (worker_uid, worker_gid), creds.is_some())?;
    let agent_address = agent_socket.as_ref().map(|l| l.display.as_str());
    let agent_plan = agent_plan(args, creds.clone(), nofile, agent_address)?;
    let mut plan =
        spawn::Plan::new(&args.command, creds, nofile).context("preparing the worker command")?;
    if let Some(a) = agent_address {
        plan.set_env("HERDER_AGENT_SOCKET", a);
    }
    let notify = notify::NotifySockets::new((worker_uid, worker_gid));
    pid1::become_subreaper();
    if let Some(w) = cfg.manager_watchdog {
        let interval = pool::fmt_dur(w);
        info!(
            %interval,
            "systemd watchdog enabled: WatchdogSec={interval}, pinged every {}",
            pool::fmt_dur(w / 2)
        );
    }
    let pool = Pool::new(cfg, Instant::now());
    let mut s = supervisor::Supervisor::new(pool, sockets, plan, manager, worker_uid, notify);
    s.health = health;
    s.control = control;
    s.agent_plan = agent_plan;
    s.agent_socket = agent_socket;
    let text = |v: &Option<OsString>| v.as_ref().and_then(|v| v.to_str()).map(str::to_string);
    s.up.manager = supervisor::ManagerFacts {
        notify_socket: text(&env.notify_socket),
        watchdog_usec: text(&env.watchdog_usec),
        watchdog_pid: text(&env.watchdog_pid),
        fdstore: text(&env.fdstore),
    };
    s.fd_store = store;
    s.steer = args.balance().map(steer::Steering::new);
    Ok(s)
}

/// `--agent-listen`: the socket, bound once for herder's whole life. A unix path is mode 0660
/// (bound under umask 0117: no moment at which another user could connect; setup is
/// single-threaded, so the umask change races nothing) and belongs to the workers' user and
/// group (`--user`), who must be able to connect to it.
fn bind_agent_socket(
    args: &cli::RunArgs,
    (uid, gid): (u32, u32),
    switching_user: bool,
) -> Result<Option<listen::Listener>> {
    let Some(spec) = args.agent.listen().map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let bound = listen::bind(&spec, false);
    nix::sys::stat::umask(old);
    let l = bound.context("--agent-listen")?;
    if let (Some(path), true) = (&l.owned_path, switching_user) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("--agent-listen: cannot give {} to --user", path.display()))?;
    }
    info!(addr = %l.display, "agent socket on {}", l.display);
    Ok(Some(l))
}

/// `--agent`: the agent's command, with the workers' credentials and fd limit, and
/// `HERDER_AGENT_SOCKET` when it has a socket.
fn agent_plan(
    args: &cli::RunArgs,
    creds: Option<spawn::Credentials>,
    nofile: Option<libc::rlimit>,
    address: Option<&str>,
) -> Result<Option<spawn::Plan>> {
    let Some(command) = args.agent.command().map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let mut plan =
        spawn::Plan::new(&command, creds, nofile).context("preparing the agent command")?;
    if let Some(a) = address {
        plan.set_env("HERDER_AGENT_SOCKET", a);
    }
    Ok(Some(plan))
}

/// What `--health` says: a TCP address.
fn health_spec(args: &cli::RunArgs) -> Result<Option<listen::ListenSpec>> {
    let Some(addr) = &args.health else {
        return Ok(None);
    };
    let spec: listen::ListenSpec = addr.parse().map_err(|e| anyhow::anyhow!("--health: {e}"))?;
    if !matches!(spec.addr, listen::Addr::Tcp(_)) {
        bail!("--health {addr}: expected HOST:PORT");
    }
    Ok(Some(spec))
}

/// `--user` / `--group`, resolved once, before any fork (the lookups may read files and
/// allocate, which the child must not).
fn credentials(args: &cli::RunArgs) -> Result<Option<spawn::Credentials>> {
    use nix::unistd::{Gid, Group, Uid, User};
    let Some(user) = &args.user else {
        if args.group.is_some() {
            bail!("--group needs --user");
        }
        return Ok(None);
    };
    if !Uid::effective().is_root() {
        bail!("--user {user}: herder must run as root to start workers as another user");
    }
    let (uid, primary_gid, name) = match user.parse::<u32>() {
        Ok(n) => match User::from_uid(Uid::from_raw(n)).ok().flatten() {
            Some(u) => (n, u.gid.as_raw(), Some(u.name)),
            None => (n, n, None),
        },
        Err(_) => match User::from_name(user).with_context(|| format!("--user {user}"))? {
            Some(u) => (u.uid.as_raw(), u.gid.as_raw(), Some(u.name)),
            None => bail!("--user {user}: no such user"),
        },
    };
    let gid = match &args.group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => match Group::from_name(g).with_context(|| format!("--group {g}"))? {
                Some(gr) => gr.gid.as_raw(),
                None => bail!("--group {g}: no such group"),
            },
        },
    };
    let groups = match (&name, &args.group) {
        (Some(n), None) => {
            let c = std::ffi::CString::new(n.as_str()).context("--user")?;
            nix::unistd::getgrouplist(&c, Gid::from_raw(gid))
                .map(|v| v.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid])
        }
        _ => vec![gid],
    };
    Ok(Some(spawn::Credentials { uid, gid, groups }))
}
