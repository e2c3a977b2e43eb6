//! The event loop: one `select!` over signals, worker notifications and one sleep until the
//! pool's next deadline — no fixed-period polling. It owns every piece of state; the decisions
//! are the pool's ([`Pool::handle`]); this module only performs the actions the pool returns
//! (fork, kill, notify systemd, exit) and feeds back what happened. [`upgrade`] is its side of
//! `herder upgrade`. [`usage`] samples the workers' memory and CPU when a request asks.

mod upgrade;
mod usage;

pub use upgrade::{resume, ManagerFacts, Record, Resume, UpgradeCtx};
pub use usage::Meter;

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::oneshot;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error};

use crate::fdstore::FdStore;
use crate::health::{self, Answer, Query, Route};
use crate::listen::SocketSet;
use crate::manager::Manager;
use crate::notify::{self, Incoming, NotifySockets};
use crate::pool::LEAVE_POLL;
use crate::pool::{Action, Blame, Event, Phase, Pool, Reaped, ReloadOutcome, Request, WorkerId};
use crate::signals::{Meaning, Signals};
use crate::spawn::{self, Plan, WorkerEnv};
use crate::steer::Steering;
use crate::{control, metrics, status};

/// Bound on queued worker notifications: a flood waits in the kernel, not in our memory.
const NOTIFY_QUEUE: usize = 1024;

pub struct Supervisor {
    pub pool: Pool,
    pub sockets: SocketSet,
    pub plan: Plan,
    pub manager: Option<Manager>,
    /// The uid workers run as (their notifications are accepted from it).
    pub worker_uid: u32,
    readers: HashMap<WorkerId, JoinHandle<()>>,
    tx: mpsc::Sender<Incoming>,
    rx: mpsc::Receiver<Incoming>,
    /// Where the workers' NOTIFY_SOCKETs are made.
    notify: NotifySockets,
    /// `--health`: the socket, until the loop starts serving it.
    pub health: Option<std::net::TcpListener>,
    queries_tx: mpsc::Sender<Query>,
    queries: mpsc::Receiver<Query>,
    /// `--control`: the socket (until served) and its path (removed at exit).
    pub control: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    control_path: Option<PathBuf>,
    requests_tx: mpsc::Sender<control::Request>,
    requests: mpsc::Receiver<control::Request>,
    /// `herder reload --wait` clients: the generation each waits for.
    reload_waiters: Vec<(u64, oneshot::Sender<Value>)>,
    /// What an in-place upgrade needs and remembers.
    pub up: UpgradeCtx,
    /// herder's sockets in systemd's fd store: slots' siblings follow them in and out.
    pub fd_store: FdStore,
    /// The workers' memory and CPU, sampled on request (and the tracker behind CPU %).
    pub meter: Meter,
    /// `--reuseport`: the steering programs on the groups (src/steer/).
    pub steer: Option<Steering>,
    /// When the removed slots' queues of leaving workers are looked at next (`None`: no
    /// worker is leaving, nothing is polled).
    leave_poll: Option<Instant>,
    /// `--agent`: its command (with the workers' environment and credentials).
    pub agent_plan: Option<Plan>,
    /// `--agent-listen`: the socket herder keeps for the agent (its fd 3).
    pub agent_socket: Option<crate::listen::Listener>,
}

impl Supervisor {
    pub fn new(
        pool: Pool,
        sockets: SocketSet,
        plan: Plan,
        manager: Option<Manager>,
        worker_uid: u32,
        notify: NotifySockets,
    ) -> Self {
        let (tx, rx) = mpsc::channel(NOTIFY_QUEUE);
        let (queries_tx, queries) = mpsc::channel(health::MAX_CONNECTIONS);
        let (requests_tx, requests) = mpsc::channel(16);
        Supervisor {
            control: None,
            control_path: None,
            requests_tx,
            requests,
            reload_waiters: Vec::new(),
            up: UpgradeCtx::default(),
            fd_store: FdStore::default(),
            meter: Meter::default(),
            steer: None,
            leave_poll: None,
            agent_plan: None,
            agent_socket: None,
            health: None,
            queries_tx,
            queries,
            pool,
            sockets,
            plan,
            manager,
            worker_uid,
            readers: HashMap::new(),
            tx,
            rx,
            notify,
        }
    }

    /// Runs until the pool exits; returns herder's exit status.
    pub async fn run(mut self) -> i32 {
        let mut signals = match Signals::register() {
            Ok(s) => s,
            Err(e) => {
                error!("cannot install signal handlers: {e}");
                self.finish();
                return crate::EXIT_USAGE;
            }
        };
        if self.up.resumed {
            // The old image blocked everything across the exec; what arrived meanwhile is
            // pending, and is delivered now that the handlers are in place.
            crate::signals::unblock_all();
            for (id, sock) in std::mem::take(&mut self.up.adopt) {
                self.adopt_reader(id, sock);
            }
        }
        if let Some(listener) = self.health.take() {
            self.up.health_fd = Some(listener.as_raw_fd());
            let served = listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(listener));
            match served {
                Ok(l) => drop(tokio::spawn(health::serve(l, self.queries_tx.clone()))),
                Err(e) => error!("cannot serve the health endpoint: {e}"),
            }
        }
        if let Some((listener, path)) = self.control.take() {
            self.up.control_fd = Some(listener.as_raw_fd());
            self.control_path = Some(path);
            let served = listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(listener));
            match served {
                Ok(l) => drop(tokio::spawn(control::serve(l, self.requests_tx.clone()))),
                Err(e) => error!("cannot serve the control socket: {e}"),
            }
        }
        let mut events = VecDeque::new();
        if self.up.resumed {
            events.push_back(Event::Resumed);
            // Children that exited while the exec was under way: reaped by this image.
            if let Some(batch) = self.reap() {
                events.push_back(batch);
            }
        } else {
            events.push_back(Event::Start);
        }
        loop {
            while let Some(ev) = events.pop_front() {
                let actions = self.pool.handle(ev, Instant::now());
                let mut spawned = Vec::new();
                if let Some(code) = self.perform(actions, &mut spawned) {
                    self.finish();
                    return code;
                }
                // What became of each spawn is the pool's next news, before anything else.
                for ev in spawned.into_iter().rev() {
                    events.push_front(ev);
                }
            }
            self.steer();
            self.settle_reload_waiters();
            if !self.up.waiters.is_empty() {
                self.answer_waiters();
            }
            let steer_at = self.steer.as_ref().and_then(|s| s.next);
            self.arm_leave_poll();
            let deadline = self.pool.next_deadline().into_iter().chain(steer_at);
            let deadline = deadline.chain(self.leave_poll).min();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                (sig, meaning) = signals.recv() => match meaning {
                    Meaning::ChildExited => {
                        if let Some(batch) = self.reap() {
                            events.push_back(batch);
                        }
                    }
                    Meaning::Request(r) => {
                        debug!(signal = sig.as_str(), "{} received", sig.as_str());
                        events.push_back(Event::Request(r));
                    }
                },
                Some((id, msg)) = self.rx.recv() => events.push_back(Event::Message { id, msg }),
                Some(q) = self.queries.recv() => self.answer(q),
                Some(r) = self.requests.recv() => {
                    if let Some(ev) = self.command(r) {
                        events.push_back(ev);
                    }
                }
                () = sleep => {
                    events.push_back(Event::Tick);
                    events.extend(self.look_at_leaving());
                }
            }
        }
    }

    /// Every child that has exited, as one event (`None`: none had).
    fn reap(&mut self) -> Option<Event> {
        let batch: Vec<Reaped> = crate::reap::reap_all()
            .into_iter()
            .map(|(pid, status)| {
                self.reaped(pid);
                Reaped {
                    pid,
                    status,
                    group_left: group_alive(pid),
                }
            })
            .collect();
        (!batch.is_empty()).then_some(Event::Reaped(batch))
    }

    /// Performs the pool's actions; the result of each spawn goes into `spawned`.
    fn perform(&mut self, actions: Vec<Action>, spawned: &mut Vec<Event>) -> Option<i32> {
        let mut exit = None;
        for action in actions {
            match action {
                Action::Spawn {
                    id,
                    slot,
                    generation: _,
                } => spawned.push(self.spawn(id, slot)),
                Action::SpawnAgent { id } => spawned.push(self.spawn_agent(id)),
                Action::Signal { pid, signal } => {
                    if let Err(e) = kill(Pid::from_raw(pid), signal) {
                        debug!(pid, "cannot send {} to pid {pid}: {e}", signal.as_str());
                    }
                }
                Action::KillGroup { pid } => {
                    if killpg(Pid::from_raw(pid), Signal::SIGKILL).is_err() {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                Action::SignalGroup { pgid, signal } => {
                    if let Err(e) = killpg(Pid::from_raw(pgid), signal) {
                        debug!(
                            pgid,
                            "cannot send {} to process group {pgid}: {e}",
                            signal.as_str()
                        );
                    }
                }
                Action::ReleaseSlot { slot } => {
                    let holders = self.pool.workers.iter().filter(|(_, w)| w.slot == slot);
                    let holders = holders.map(|(&id, _)| id).collect();
                    self.sockets.release(slot, holders);
                    self.fd_store.sync(&mut self.sockets);
                }
                Action::Measure(workers) => {
                    let found = workers
                        .into_iter()
                        .filter_map(|(id, pid)| {
                            let t = crate::usage::tree_usage(u32::try_from(pid).ok()?)?;
                            Some((id, t.pss_bytes))
                        })
                        .collect();
                    spawned.push(Event::Measured(found));
                }
                Action::Manager(msgs) => {
                    if let Some(m) = self.manager.as_mut() {
                        m.send(&msgs);
                    }
                }
                Action::Exit(code) => exit = Some(code),
            }
        }
        exit
    }

    fn spawn(&mut self, id: WorkerId, slot: usize) -> Event {
        let failed = |code: i32, reason: String, blame: Blame| Event::SpawnFailed {
            id,
            code,
            reason,
            blame,
        };
        // Sockets and the notify channel are herder's part: their failures are herder's.
        let fds = self.sockets.fds_for(slot);
        self.fd_store.sync(&mut self.sockets);
        let fds = match fds {
            Ok(f) => f,
            Err(e) => return failed(126, e.to_string(), Blame::Herder),
        };
        let sock = match self.notify.bind(id) {
            Ok(s) => s,
            Err(e) => return failed(126, e.to_string(), Blame::Herder),
        };
        let env = WorkerEnv {
            slot: Some(slot),
            fds: &fds,
            fdnames: self.sockets.fdnames(),
            notify_socket: &sock.address,
            watchdog: self.pool.config().worker_watchdog,
        };
        let result = spawn::spawn(&self.plan, &env);
        self.spawned(id, sock, result)
    }

    /// Starts the agent: its own command, its socket (if any) at fd 3, `HERDER_AGENT=1`.
    fn spawn_agent(&mut self, id: WorkerId) -> Event {
        let failed = |code: i32, reason: String, blame: Blame| Event::SpawnFailed {
            id,
            code,
            reason,
            blame,
        };
        let Some(plan) = self.agent_plan.as_ref() else {
            return failed(127, "no agent command".into(), Blame::Command);
        };
        let fds: Vec<_> = self.agent_socket.iter().map(|l| l.fd.as_raw_fd()).collect();
        let sock = match self.notify.bind(id) {
            Ok(s) => s,
            Err(e) => return failed(126, e.to_string(), Blame::Herder),
        };
        let env = WorkerEnv {
            slot: None,
            fds: &fds,
            fdnames: "agent",
            notify_socket: &sock.address,
            watchdog: self.pool.config().worker_watchdog,
        };
        let result = spawn::spawn(plan, &env);
        self.spawned(id, sock, result)
    }

    /// A spawn's outcome as the pool's next event; a process that runs gets its notify
    /// socket read.
    fn spawned(
        &mut self,
        id: WorkerId,
        sock: notify::WorkerSocket,
        result: Result<i32, spawn::SpawnError>,
    ) -> Event {
        match result {
            Ok(pid) => {
                self.up
                    .notify_fds
                    .insert(id, (sock.raw_fd(), sock.address.clone()));
                let task = notify::serve_worker(sock, id, pid, self.worker_uid, self.tx.clone());
                self.readers.insert(id, tokio::spawn(task));
                Event::Spawned { id, pid }
            }
            Err(e) => Event::SpawnFailed {
                id,
                code: e.code(),
                reason: e.to_string(),
                blame: e.blame(),
            },
        }
    }

    /// Closes the removed slots' sockets nobody holds any more, and steers new connections to
    /// the slots that can serve now (a program is replaced only when that changed). An image
    /// that resumed after `herder upgrade` attaches afresh from the pool's state.
    fn steer(&mut self) {
        let workers = &self.pool.workers;
        self.sockets.settle_retired(|id| workers.contains_key(&id));
        if let Some(steer) = self.steer.as_mut() {
            let (ready, next) = crate::steer::steerable(&self.pool, Instant::now());
            steer.next = next;
            steer.update(&ready, &self.sockets);
        }
    }

    /// While a worker is leaving (src/pool/leave.rs), its removed slot's queues are looked at
    /// every [`LEAVE_POLL`] — the first time one interval after it began, so that a handshake
    /// the kernel had already hashed there has landed in the queue.
    fn arm_leave_poll(&mut self) {
        if self.pool.leaving().is_empty() {
            self.leave_poll = None;
        } else if self.leave_poll.is_none() {
            self.leave_poll = Some(Instant::now() + LEAVE_POLL);
        }
    }

    /// When the poll is due: each leaving worker whose queues are empty, as an event.
    fn look_at_leaving(&mut self) -> Vec<Event> {
        if self.leave_poll.is_none_or(|t| Instant::now() < t) {
            return Vec::new();
        }
        self.leave_poll = None;
        let leaving = self.pool.leaving().into_iter();
        leaving
            .filter(|&id| !self.sockets.retired_waiting(id))
            .map(|id| Event::QueueEmpty { id })
            .collect()
    }

    /// `/status` and `herder status --json`: the pool's document and the steering.
    /// The status document (`/status`, `herder status`): the pool, the workers' usage
    /// (sampled now, or reused), and the steering.
    fn status_doc(&mut self, now: Instant) -> Value {
        let usage = self.meter.report(&self.pool, now);
        let mut doc = status::status_json(&self.pool, &self.sockets, &self.up.record, usage, now);
        if let (Some(l), true) = (&self.agent_socket, doc["agent"].is_object()) {
            doc["agent"]["socket"] = json!(l.display);
        }
        if let Some(s) = &self.steer {
            doc["steering"] = s.report();
            for (i, slot) in doc["slots"]
                .as_array_mut()
                .into_iter()
                .flatten()
                .enumerate()
            {
                slot["steering"] = json!(s.slot(i));
            }
        }
        doc
    }

    /// A health probe, answered from the loop's own state (so `/livez` proves the loop runs).
    fn answer(&mut self, q: Query) {
        let now = Instant::now();
        let a = match q.route {
            Route::Livez => Answer::text(200, "ok\n"),
            Route::Readyz if self.pool.is_ready() => Answer::text(200, "ready\n"),
            Route::Readyz if self.pool.phase == Phase::Running && !self.pool.agent_ok() => {
                Answer::text(503, "not ready: the agent is not ready\n")
            }
            Route::Readyz => Answer::text(
                503,
                format!("not ready: {}\n", status::herder_state(&self.pool).word()),
            ),
            Route::Status => {
                let doc = self.status_doc(now);
                Answer {
                    code: 200,
                    content_type: "application/json",
                    body: format!("{doc:#}\n"),
                }
            }
            Route::Metrics => Answer {
                code: 200,
                content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body: metrics::render(
                    &self.pool,
                    &self.up.record,
                    self.meter.report(&self.pool, now),
                ),
            },
        };
        let _ = q.reply.send(a);
    }

    /// A control-socket request: answered now, or (`reload --wait`) when the reload ends.
    fn command(&mut self, r: control::Request) -> Option<Event> {
        use control::{Command, Scale};
        let serving = self.pool.phase == Phase::Running;
        let (answer, event) = match r.command {
            Command::Status => {
                let doc = self.status_doc(Instant::now());
                (control::ok(json!({ "status": doc })), None)
            }
            Command::Reload { .. } if !serving => {
                (control::error("herder is stopping: no reload"), None)
            }
            Command::Reload { wait } => {
                // The reload starts with the next event; its generation is the next one.
                let generation = self.pool.generation + 1;
                if wait {
                    self.reload_waiters.push((generation, r.reply));
                    return Some(Event::Request(Request::Reload));
                }
                (
                    control::ok(json!({ "generation": generation })),
                    Some(Event::Request(Request::Reload)),
                )
            }
            Command::Scale(_) if !serving => {
                (control::error("herder is stopping: no scaling"), None)
            }
            Command::Scale(s) => {
                let now = self.pool.slots.len() as i64;
                let target = match s {
                    Scale::To(n) => n as i64,
                    Scale::By(d) => now + d,
                }
                .max(1) as usize;
                (
                    control::ok(json!({ "workers": target })),
                    Some(Event::Request(Request::ScaleTo(target))),
                )
            }
            Command::Upgrade { wait } => {
                self.upgrade(wait, r.reply, r.conn);
                return None;
            }
            Command::Stop { force } => {
                let req = if force {
                    Request::ForceStop
                } else {
                    Request::Stop
                };
                (control::ok(json!({})), Some(Event::Request(req)))
            }
        };
        let _ = r.reply.send(answer);
        event
    }

    /// Answers `reload --wait` clients whose reload has ended (or can no longer end).
    fn settle_reload_waiters(&mut self) {
        if self.reload_waiters.is_empty() {
            return;
        }
        let stopping = self.pool.phase != Phase::Running;
        for (generation, reply) in std::mem::take(&mut self.reload_waiters) {
            let answer = match &self.pool.last_reload {
                _ if stopping => Some(control::error(
                    "herder is stopping: the reload was abandoned",
                )),
                _ if self.pool.reloading => None,
                Some(ReloadOutcome::Succeeded { generation: g }) if *g >= generation => {
                    Some(control::ok(json!({ "generation": g })))
                }
                Some(ReloadOutcome::Failed { generation: g, why }) if *g >= generation => {
                    Some(control::error(format!("reload failed: {why}")))
                }
                _ => None,
            };
            match answer {
                Some(a) => drop(reply.send(a)),
                None => self.reload_waiters.push((generation, reply)),
            }
        }
    }

    /// A child was reaped: forget its last usage sample, stop reading its notifications.
    fn reaped(&mut self, pid: i32) {
        self.meter.tracker.forget(pid.unsigned_abs());
        if let Some(id) = self.pool.worker_of_pid(pid) {
            self.up.notify_fds.remove(&id);
            if let Some(task) = self.readers.remove(&id) {
                task.abort();
            }
        }
    }

    /// Reads the notify socket of a worker an earlier image started (an in-place upgrade).
    pub fn adopt_reader(&mut self, id: WorkerId, sock: notify::WorkerSocket) {
        let Some(pid) = self.pool.pid_of(id) else {
            return; // gone: dropping the socket closes it (and unlinks its file)
        };
        self.up
            .notify_fds
            .insert(id, (sock.raw_fd(), sock.address.clone()));
        let task = notify::serve_worker(sock, id, pid, self.worker_uid, self.tx.clone());
        self.readers.insert(id, tokio::spawn(task));
    }

    fn finish(&mut self) {
        for (_, task) in self.readers.drain() {
            task.abort();
        }
        // A worker's leftovers were reparented to us (subreaper or PID 1): the sweep gets them.
        crate::pid1::sweep();
        if let Some(p) = &self.control_path {
            let _ = std::fs::remove_file(p);
        }
        self.sockets.remove_owned_paths();
        if let Some(l) = &self.agent_socket {
            l.remove_owned_path();
        }
        self.notify.remove();
    }
}

/// Whether processes are left in the process group led by `pid`, a child just reaped (a
/// group outlives its leader while it has members; kill(2) with signal 0 only checks).
fn group_alive(pid: i32) -> bool {
    // (-1 would mean every process: never for pid 1 or less.)
    pid > 1 && kill(Pid::from_raw(-pid), None).is_ok()
}
