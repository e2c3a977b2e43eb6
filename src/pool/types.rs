//! The core's vocabulary: its configuration, the past-tense [`Event`]s it is told, the
//! imperative [`Action`]s it answers with, and the states of workers, slots and the pool.
//! Data only: every rule about them lives in the sibling modules.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::throttle::Throttle;

pub type WorkerId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyMode {
    Exec,
    Notify,
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub workers: usize,
    pub ready: ReadyMode,
    pub ready_timeout: Duration,
    pub min_ready: Option<usize>,
    pub stop_signal: Signal,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    /// More than this many restarts of one slot within `restart_window`: give up.
    pub restart_limit: u32,
    pub restart_window: Duration,
    pub reload_surge: usize,
    pub worker_watchdog: Option<Duration>,
    /// systemd's WatchdogSec= for herder itself (WATCHDOG_USEC).
    pub manager_watchdog: Option<Duration>,
    /// `--max-memory`: a worker whose process tree's PSS exceeds this many bytes is recycled.
    pub max_memory: Option<u64>,
    /// `--max-lifetime`: a worker is recycled before it is this old (staggered over slots).
    pub max_lifetime: Option<Duration>,
    /// `--reuseport`: how long a removed slot's worker may go on accepting what is queued on
    /// its slot's own socket before it drains (`None`: drain at once — without `--reuseport`
    /// the socket is shared and nothing is queued for that worker alone).
    pub leave_timeout: Option<Duration>,
    /// `--agent`: how the one process beside the pool is run.
    pub agent: Option<super::AgentConfig>,
}

/// How a worker process ended, as `waitpid(2)` reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit status {c}"),
            ExitStatus::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

impl ExitStatus {
    /// The exit in a log line's words, after "worker 1 (pid 124) ": "exited with status 1",
    /// "killed by signal 9 (SIGKILL)". (The `Display` form, "exit status 1", is the one
    /// `herder status`, `/status` and the `status=` field show.)
    pub fn phrase(&self) -> String {
        match self {
            ExitStatus::Code(c) => format!("exited with status {c}"),
            ExitStatus::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => format!("killed by signal {s} ({})", sig.as_str()),
                Err(_) => format!("killed by signal {s}"),
            },
        }
    }
}

/// One child the reaper collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    pub status: ExitStatus,
    /// Processes are left in its process group (children it started that outlived it).
    pub group_left: bool,
}

/// Whose fault a failed spawn was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The worker command: it cannot be found or executed, or `--user` cannot be taken on.
    Command,
    /// herder's own resources (EMFILE, ENFILE, EAGAIN, ENOMEM from pipe, socket or fork):
    /// retried with backoff, never counted toward the give-up.
    Herder,
}

/// What a worker said on its NOTIFY_SOCKET (sd_notify(3)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerMsg {
    Ready,
    Status(String),
    Watchdog,
    WatchdogTrigger,
    Stopping,
    Errno(i32),
}

/// What an operator asked for, by signal or the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// TERM, INT: drain gracefully (a second one forces).
    Stop,
    /// QUIT: stop at once.
    ForceStop,
    /// HUP: rolling reload.
    Reload,
    /// TTIN / TTOU.
    ScaleUp,
    ScaleDown,
    /// `herder scale N`.
    ScaleTo(usize),
    /// USR1, USR2: passed on to every worker.
    Forward(Signal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Start,
    /// The worker runs (it has exec'd). The supervisor reports the result of every
    /// [`Action::Spawn`] before any other event.
    Spawned {
        id: WorkerId,
        pid: i32,
    },
    /// No process runs for this worker. `code` is the 126/127-style status.
    SpawnFailed {
        id: WorkerId,
        code: i32,
        reason: String,
        blame: Blame,
    },
    /// Everything one SIGCHLD reaped, as one batch: every pid in it is forgotten before any
    /// decision is made, so no action names a process that is already gone.
    Reaped(Vec<Reaped>),
    Message {
        id: WorkerId,
        msg: WorkerMsg,
    },
    Request(Request),
    /// A deadline from [`super::Pool::next_deadline`] has passed.
    Tick,
    /// This image took the pool over from an earlier one (`herder upgrade`).
    Resumed,
    /// The answer to [`Action::Measure`]: each worker's memory (PSS of its process tree, in
    /// bytes); a worker that could not be measured (it is gone) is left out.
    Measured(Vec<(WorkerId, u64)>),
    /// Nothing waits any more on the sockets of the removed slot that worker `id` serves:
    /// no connection in their accept queues, no datagram in their receive queues. The
    /// supervisor looks while [`super::Pool::leaving`] names a worker.
    QueueEmpty {
        id: WorkerId,
    },
}

/// sd_notify(3) messages for herder's own service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerMsg {
    Ready,
    /// RELOADING=1; the sender adds MONOTONIC_USEC= (required by Type=notify-reload).
    Reloading,
    Stopping,
    Status(String),
    Watchdog,
    ExtendTimeout(Duration),
    Errno(i32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn {
        id: WorkerId,
        slot: usize,
        generation: u64,
    },
    Signal {
        pid: i32,
        signal: Signal,
    },
    /// Start the agent process `id` (`--agent`); like [`Action::Spawn`], its result is the
    /// next event.
    SpawnAgent {
        id: WorkerId,
    },
    /// SIGKILL to a live worker's whole process group (its pgid is its pid).
    KillGroup {
        pid: i32,
    },
    /// A signal to the process group a reaped worker left behind (killpg(2) only: the
    /// leader's pid is no process of ours any more).
    SignalGroup {
        pgid: i32,
        signal: Signal,
    },
    /// The slot was removed (scale down): its `--reuseport` socket may be closed.
    ReleaseSlot {
        slot: usize,
    },
    /// Measure these workers' memory (`--max-memory`) and report [`Event::Measured`] next,
    /// before any other event.
    Measure(Vec<(WorkerId, i32)>),
    /// One datagram to the service manager.
    Manager(Vec<ManagerMsg>),
    Exit(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopWhy {
    /// Asked to drain: stop, reload (old generation), scale down.
    Drain,
    /// Said STOPPING=1 itself after serving; its replacement is already on the way.
    Retiring,
    /// Said STOPPING=1 before it had served: a failed start.
    RetiredEarly,
    Watchdog,
    ReadyTimeout,
    /// A newer reload made this not-yet-ready worker pointless.
    Superseded,
    /// SIGKILLed (forced stop or drain timeout); waiting for the reaper.
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The Spawn action is out; no pid yet.
    Spawning,
    /// Running, waiting for READY=1 until `deadline`.
    Starting {
        deadline: Instant,
    },
    Ready,
    /// Its slot was removed by a scale-down (`--reuseport`): new connections are steered
    /// away, and it still accepts what the kernel had queued on the slot's socket, until
    /// that queue is empty ([`Event::QueueEmpty`]) or `until`; then it drains.
    Leaving {
        until: Instant,
    },
    /// Told to stop; SIGKILL at `kill_at` (`None`: already killed).
    Stopping {
        why: StopWhy,
        kill_at: Option<Instant>,
    },
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    /// `None` before it is spawned, and from the moment it is reaped.
    pub pid: Option<i32>,
    pub state: State,
    pub spawned_at: Instant,
    /// When it became ready (its last READY=1, or its exec).
    pub ready_at: Option<Instant>,
    pub last_ping: Instant,
    pub status: Option<String>,
    pub errno: Option<i32>,
    /// A stop decided while it was still [`State::Spawning`], carried out once it runs.
    pub stop_when_spawned: Option<Stop>,
}

/// How a worker is to be stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `--stop-signal`, SIGKILL after `--drain-timeout`.
    Drain(StopWhy),
    /// SIGKILL to its process group at once.
    Kill(StopWhy),
}

#[derive(Debug, Clone)]
pub struct Slot {
    /// The worker serving this slot.
    pub current: Option<WorkerId>,
    /// Its replacement during a rolling reload, until ready.
    pub next: Option<WorkerId>,
    pub backoff_until: Option<Instant>,
    /// Consecutive failed starts, for the backoff.
    pub failures: u32,
    /// Consecutive spawns that failed for want of herder's own resources.
    pub resource_failures: u32,
    pub restarts: u32,
    /// This slot's restarts within `--restart-window` (the give-up rule is per slot).
    pub throttle: Throttle,
    pub last_exit: Option<String>,
    /// A recycle's replacement failed: none again before this.
    pub recycle_after: Option<Instant>,
    /// Consecutive failed recycles, for that backoff.
    pub recycle_failures: u32,
}

impl Slot {
    pub fn new(cfg: &PoolConfig) -> Slot {
        Slot {
            current: None,
            next: None,
            backoff_until: None,
            failures: 0,
            resource_failures: 0,
            restarts: 0,
            throttle: Throttle::new(cfg.restart_limit, cfg.restart_window),
            last_exit: None,
            recycle_after: None,
            recycle_failures: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// `--shutdown-delay`: not ready, still serving, until then.
    LameDuck {
        until: Instant,
    },
    Draining {
        code: i32,
    },
    Killing {
        code: i32,
    },
    Exited,
}

impl Phase {
    /// Workers serve and are restarted: running, or in the lame-duck delay.
    pub fn serving(self) -> bool {
        matches!(self, Phase::Running | Phase::LameDuck { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    Succeeded { generation: u64 },
    Failed { generation: u64, why: String },
}

/// Running totals for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub restarts: u64,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub give_ups: u64,
    /// Spawns that failed for want of herder's own resources.
    pub resource_failures: u64,
    /// Worker exits by reason: see [`EXIT_REASONS`].
    pub exits: BTreeMap<&'static str, u64>,
    /// Recycles started, by [`RecycleWhy::name`]: `memory`, `lifetime`.
    pub recycles: BTreeMap<&'static str, u64>,
    /// Restarts of the agent (`--agent`), apart from the pool's.
    pub agent_restarts: u64,
}

/// Why a worker is recycled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecycleWhy {
    /// Its process tree's PSS, in bytes, above `--max-memory`.
    Memory(u64),
    /// It reached `--max-lifetime`.
    Lifetime,
}

impl RecycleWhy {
    /// The `reason` label of `herder_recycles_total`.
    pub fn name(self) -> &'static str {
        match self {
            RecycleWhy::Memory(_) => "memory",
            RecycleWhy::Lifetime => "lifetime",
        }
    }
}

/// Every reason `/metrics` counts recycles by.
pub const RECYCLE_REASONS: &[&str] = &["memory", "lifetime"];

/// A recycle under way: `new` starts in `slot` beside `old`; once it is ready, `old` drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recycle {
    pub slot: usize,
    pub old: WorkerId,
    pub new: WorkerId,
    pub why: RecycleWhy,
}

/// Every reason `/metrics` counts worker exits by.
pub const EXIT_REASONS: &[&str] = &[
    "crash",
    "drained",
    "retired",
    "retired_early",
    "watchdog",
    "ready_timeout",
    "spawn_failed",
    "superseded",
    "killed",
];

/// Why a worker that is gone went away, as `/metrics` counts it.
pub fn exit_reason(state: State) -> &'static str {
    match state {
        State::Spawning => "spawn_failed",
        State::Starting { .. } | State::Ready | State::Leaving { .. } => "crash",
        State::Stopping { why, .. } => match why {
            StopWhy::Drain => "drained",
            StopWhy::Retiring => "retired",
            StopWhy::RetiredEarly => "retired_early",
            StopWhy::Watchdog => "watchdog",
            StopWhy::ReadyTimeout => "ready_timeout",
            StopWhy::Superseded => "superseded",
            StopWhy::Killed => "killed",
        },
    }
}
