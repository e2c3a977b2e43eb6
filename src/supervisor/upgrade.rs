//! The supervisor's side of `herder upgrade`: what the loop must remember for it (the path it
//! was started from, its arguments, what systemd gave it, the raw fds of sockets its tasks
//! own), gathering the [`State`] from the loop's state and performing the exec, and — in the
//! new image — answering the clients that waited for it. The mechanism (the document, the
//! preflight, the exec) is `crate::upgrade`'s; taking the state back is `main`'s.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::Supervisor;
use crate::control;
use crate::listen::SocketSet;
use crate::manager::Manager;
use crate::notify::NotifySockets;
use crate::pool::{ManagerMsg, Pool, PoolConfig, WorkerId};
use crate::spawn::{Credentials, Plan};
use crate::upgrade::{self, ListenerState, NotifyState, State};

/// What systemd put in the first image's environment (which unset it), for the next image.
#[derive(Debug, Clone, Default)]
pub struct ManagerFacts {
    pub notify_socket: Option<String>,
    pub watchdog_usec: Option<String>,
    pub watchdog_pid: Option<String>,
    pub fdstore: Option<String>,
}

/// Upgrades so far, for `/status` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub succeeded: u64,
    pub failed: u64,
    /// The last one: when (unix seconds) and from which version.
    pub last: Option<(u64, String)>,
}

/// What an in-place upgrade needs that the loop would not otherwise keep.
#[derive(Debug, Default)]
pub struct UpgradeCtx {
    /// The path herder was started from (`None`: unknown, no upgrade possible).
    pub exe: Option<PathBuf>,
    /// herder's own arguments (argv[1..]), for the new image and its preflight.
    pub args: Vec<OsString>,
    pub manager: ManagerFacts,
    /// RLIMIT_NOFILE as the first image found it.
    pub nofile: Option<(u64, u64)>,
    /// The health and control listeners, owned by their tasks.
    pub health_fd: Option<RawFd>,
    pub control_fd: Option<RawFd>,
    /// Every live worker's notify socket (owned by its reader task) and address.
    pub notify_fds: BTreeMap<WorkerId, (RawFd, String)>,
    pub record: Record,
    /// In an image that took over: `herder upgrade --wait` clients to answer once it runs.
    pub waiters: Vec<RawFd>,
    /// This image took over from another (signals stay blocked until handlers exist).
    pub resumed: bool,
    /// Notify sockets of workers an earlier image started, read once the loop runs.
    pub adopt: Vec<(WorkerId, crate::notify::WorkerSocket)>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Supervisor {
    /// `herder upgrade [--wait]`. Everything that can be checked is checked before anything
    /// changes; the only step that cannot be taken back is a successful execve.
    pub(super) fn upgrade(
        &mut self,
        wait: bool,
        reply: oneshot::Sender<Value>,
        conn: Option<RawFd>,
    ) {
        let refuse = |this: &mut Supervisor, reply: oneshot::Sender<Value>, why: String| {
            warn!("upgrade refused: {why}");
            this.up.record.failed += 1;
            let _ = reply.send(control::error(format!("upgrade refused: {why}")));
        };
        if let Err(why) = self.pool.can_snapshot() {
            return refuse(self, reply, why);
        }
        let Some(exe) = self.up.exe.clone() else {
            return refuse(
                self,
                reply,
                "herder does not know the path it was started from".into(),
            );
        };
        if wait && conn.is_none() {
            return refuse(self, reply, "no connection to answer on".into());
        }
        info!(
            exe = %exe.display(),
            "upgrade requested: checking the new binary {}",
            exe.display()
        );
        if let Err(why) = upgrade::preflight(&exe, &self.up.args) {
            return refuse(self, reply, why);
        }
        let now = Instant::now();
        let now_ns = upgrade::monotonic_ns();
        let mut state = self.gather(now, now_ns);
        if wait {
            state.waiters.extend(conn);
        }
        let fd = match upgrade::write_state(&state) {
            Ok(fd) => fd,
            Err(e) => return refuse(self, reply, format!("cannot write the upgrade state: {e}")),
        };
        // systemd: a reload of herder itself is under way; and the watchdog is fed right
        // before the exec (the new image pings again as soon as it runs).
        if let Some(m) = self.manager.as_mut() {
            m.send(&[ManagerMsg::Reloading, ManagerMsg::Watchdog]);
        }
        info!(
            from = %upgrade::version(),
            exe = %exe.display(),
            "upgrading: executing {} in place (this is herder {})",
            exe.display(),
            upgrade::version()
        );
        if !wait {
            // Answered now, written here: the connection's task would not run before the exec.
            if let Some(c) = conn {
                let answer = control::ok(json!({"upgrading": exe.display().to_string()}));
                upgrade::write_line(c, &answer);
            }
        }
        let err = upgrade::exec(&exe, &self.up.args, &state.fds(), &fd);
        // Still here: execve failed, and nothing was torn down. The old image carries on.
        error!(
            "upgrade failed: cannot execute {}: {err}; this herder keeps running",
            exe.display()
        );
        self.up.record.failed += 1;
        if let Some(m) = self.manager.as_mut() {
            m.send(&[ManagerMsg::Ready]);
        }
        let _ = reply.send(control::error(format!(
            "upgrade failed: cannot execute {}: {err}",
            exe.display()
        )));
    }

    /// The state the next image takes over.
    fn gather(&self, now: Instant, now_ns: u64) -> State {
        let (listeners, reuseport, siblings) = self.sockets.parts();
        let steer = self.sockets.steer_parts();
        State {
            format: upgrade::FORMAT,
            from_version: upgrade::version(),
            taken_monotonic_ns: now_ns,
            pool: self.pool.snapshot(now),
            listeners: listeners
                .into_iter()
                .map(|(fd, l)| ListenerState {
                    fd,
                    name: l.name.clone(),
                    display: l.display.clone(),
                    owned_path: l.owned_path.clone(),
                    reusable: l.reusable,
                })
                .collect(),
            reuseport,
            siblings,
            orders: steer.orders,
            retired: steer.retired,
            health_fd: self.up.health_fd,
            control_fd: self.up.control_fd,
            control_path: self.control_path.clone(),
            agent_listener: self.agent_socket.as_ref().map(|l| ListenerState {
                fd: l.fd.as_raw_fd(),
                name: l.name.clone(),
                display: l.display.clone(),
                owned_path: l.owned_path.clone(),
                reusable: l.reusable,
            }),
            notify_dir: self.notify.dir().map(|d| d.to_path_buf()),
            notify_prefix: self.notify.prefix().map(str::to_string),
            notify: self
                .up
                .notify_fds
                .iter()
                .map(|(&worker, (fd, address))| NotifyState {
                    worker,
                    fd: *fd,
                    address: address.clone(),
                })
                .collect(),
            notify_socket: self.up.manager.notify_socket.clone(),
            watchdog_usec: self.up.manager.watchdog_usec.clone(),
            watchdog_pid: self.up.manager.watchdog_pid.clone(),
            fdstore: self.up.manager.fdstore.clone(),
            nofile: self.up.nofile,
            waiters: Vec::new(),
            upgrades: self.up.record.succeeded,
            upgrades_failed: self.up.record.failed,
            last_upgrade: self.up.record.last.clone(),
        }
    }

    /// In the new image, once the pool is taken over: the clients that waited hear it worked.
    pub(super) fn answer_waiters(&mut self) {
        let answer = control::ok(json!({
            "version": upgrade::version(),
            "pid": std::process::id(),
            "workers": self.pool.workers.len(),
        }));
        for fd in std::mem::take(&mut self.up.waiters) {
            upgrade::answer_waiter(fd, &answer);
        }
    }
}

/// The record of a new image: the old one's, plus this upgrade.
pub fn record_after(state: &State) -> Record {
    Record {
        succeeded: state.upgrades + 1,
        failed: state.upgrades_failed,
        last: Some((unix_now(), state.from_version.clone())),
    }
}

/// Whether `fd` is an open socket (what every fd in the state must be).
fn is_socket(fd: RawFd) -> bool {
    fd >= 0 && nix::sys::stat::fstat(fd).is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// What the new image needs besides the state: its configuration and the workers' command.
pub struct Resume {
    pub cfg: PoolConfig,
    pub command: Vec<OsString>,
    pub creds: Option<Credentials>,
    pub exe: Option<PathBuf>,
    pub args: Vec<OsString>,
    /// `--listen`, `--health` and `--fd-store`: what the fd store is kept in step with.
    pub listen: Vec<crate::listen::ListenSpec>,
    pub health: Option<crate::listen::ListenSpec>,
    pub fd_store: bool,
    /// `--agent`: the agent's command.
    pub agent_command: Option<Vec<OsString>>,
}

/// The new image's setup: the supervisor an earlier image handed over in `state`, with its
/// sockets, workers and deadlines. A listener that did not arrive is fatal (exit 2, and the
/// workers die with herder); a notify socket that did not is that worker's loss only.
pub fn resume(state: State, r: Resume) -> anyhow::Result<Supervisor> {
    use anyhow::{bail, Context};
    use std::os::fd::{FromRawFd, OwnedFd};
    let now = Instant::now();
    let base = upgrade::taken_at(&state, now, upgrade::monotonic_ns());
    let my_pid = std::process::id();
    let mut listeners = Vec::with_capacity(state.listeners.len());
    for l in &state.listeners {
        if !is_socket(l.fd) {
            bail!(
                "upgrade: listening socket {} (fd {}) did not arrive",
                l.display,
                l.fd
            );
        }
        listeners.push(crate::listen::Listener {
            // SAFETY: an open socket (checked) the previous image handed to us alone.
            fd: unsafe { OwnedFd::from_raw_fd(l.fd) },
            name: l.name.clone(),
            display: l.display.clone(),
            owned_path: l.owned_path.clone(),
            reusable: l.reusable,
        });
    }
    let per_slot = state
        .siblings
        .iter()
        .map(|s| {
            s.as_ref().map(|fds| {
                fds.iter()
                    .filter(|&&fd| is_socket(fd))
                    // SAFETY: as above.
                    .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                    .collect()
            })
        })
        .collect();
    let steer = crate::listen::SteerParts {
        orders: state.orders.clone(),
        retired: state
            .retired
            .iter()
            .map(|(holders, fds)| {
                let fds = fds
                    .iter()
                    .filter(|(_, fd)| is_socket(*fd))
                    // SAFETY: as above.
                    .map(|&(i, fd)| (i, unsafe { OwnedFd::from_raw_fd(fd) }))
                    .collect();
                (holders.clone(), fds)
            })
            .collect(),
    };
    let sockets = SocketSet::from_parts(listeners, state.reuseport, per_slot, steer);
    let manager = match &state.notify_socket {
        Some(v) => Some(Manager::new(v).context("NOTIFY_SOCKET")?),
        None => None,
    };
    let mut cfg = r.cfg;
    cfg.manager_watchdog = crate::manager::watchdog_interval(
        state.watchdog_usec.as_deref(),
        state.watchdog_pid.as_deref(),
        my_pid,
    );
    let nofile = state.nofile.map(|(cur, max)| libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    });
    let (uid, gid) = r.creds.as_ref().map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |c| (c.uid, c.gid),
    );
    let agent_socket = match &state.agent_listener {
        Some(l) if is_socket(l.fd) => Some(crate::listen::Listener {
            // SAFETY: an open socket (checked) the previous image handed to us alone.
            fd: unsafe { OwnedFd::from_raw_fd(l.fd) },
            name: l.name.clone(),
            display: l.display.clone(),
            owned_path: l.owned_path.clone(),
            reusable: l.reusable,
        }),
        Some(l) => bail!(
            "upgrade: the agent socket {} (fd {}) did not arrive",
            l.display,
            l.fd
        ),
        None => None,
    };
    let address = agent_socket.as_ref().map(|l| l.display.clone());
    let agent_plan = match &r.agent_command {
        Some(cmd) => {
            let mut p =
                Plan::new(cmd, r.creds.clone(), nofile).context("preparing the agent command")?;
            if let Some(a) = &address {
                p.set_env("HERDER_AGENT_SOCKET", a);
            }
            Some(p)
        }
        None => None,
    };
    let mut plan =
        Plan::new(&r.command, r.creds, nofile).context("preparing the worker command")?;
    if let Some(a) = &address {
        plan.set_env("HERDER_AGENT_SOCKET", a);
    }
    let notify = NotifySockets::resume(
        state.notify_dir.clone(),
        state.notify_prefix.clone(),
        (uid, gid),
    );
    let mut readers = Vec::new();
    for n in &state.notify {
        if is_socket(n.fd) {
            // SAFETY: an open socket (checked) the previous image handed to us alone.
            readers.push((n.worker, unsafe { notify.adopt(n.fd, n.address.clone()) }));
        }
    }
    crate::pid1::become_subreaper();
    let pool = Pool::restore(cfg, state.pool.clone(), base, now);
    let slots = pool.slots.len();
    let mut s = Supervisor::new(pool, sockets, plan, manager, uid, notify);
    s.agent_plan = agent_plan;
    s.agent_socket = agent_socket;
    // The store still holds what the old image put there; from now on it is kept in step.
    s.fd_store = crate::fdstore::FdStore::resumed(
        state.fdstore.as_deref().map(std::ffi::OsStr::new),
        r.fd_store,
        s.manager.as_ref(),
        &r.listen,
        r.health.as_ref(),
        &mut s.sockets,
        slots,
    );
    s.health = state
        .health_fd
        .filter(|&fd| is_socket(fd))
        // SAFETY: as above.
        .map(|fd| unsafe { std::net::TcpListener::from_raw_fd(fd) });
    s.control = match (state.control_fd, &state.control_path) {
        (Some(fd), Some(path)) if is_socket(fd) => Some((
            // SAFETY: as above.
            unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) },
            path.clone(),
        )),
        _ => None,
    };
    s.up = UpgradeCtx {
        exe: r.exe,
        args: r.args,
        manager: ManagerFacts {
            notify_socket: state.notify_socket.clone(),
            watchdog_usec: state.watchdog_usec.clone(),
            watchdog_pid: state.watchdog_pid.clone(),
            fdstore: state.fdstore.clone(),
        },
        nofile: state.nofile,
        record: record_after(&state),
        waiters: state.waiters.clone(),
        resumed: true,
        adopt: readers,
        ..UpgradeCtx::default()
    };
    info!(
        from = %state.from_version,
        to = %upgrade::version(),
        "upgraded in place from herder {} to {}",
        state.from_version,
        upgrade::version()
    );
    Ok(s)
}
