//! Scale-down without resets (`--reuseport`). The kernel hashed some connections onto a
//! removed slot's own socket before the steering program changed; if its worker drained at
//! once it would stop accepting, and those connections would be reset when the socket closes.
//! So the slot's ready worker first *leaves*: the slot is gone (steering sends it nothing new),
//! the worker goes on accepting, and it drains only once the supervisor reports that nothing
//! waits on the slot's sockets ([`Event::QueueEmpty`](super::Event)) — or at
//! [`LEAVE_MAX`] (or `--drain-timeout`, if shorter), so a queue nobody accepts from cannot
//! hold a scale-down up.
//!
//! The core only keeps the state and the deadline; looking at the queues (`TCP_INFO`,
//! `SIOCINQ`) is the supervisor's, every [`LEAVE_POLL`] while [`Pool::leaving`] names a worker.

use std::time::{Duration, Instant};

use tracing::info;

use super::{later, Pool, State, StopWhy, WorkerId};

/// How often the supervisor looks at a leaving worker's queues.
pub const LEAVE_POLL: Duration = Duration::from_millis(10);

/// The longest a removed slot's worker goes on accepting before it drains (`--drain-timeout`
/// when that is shorter).
pub const LEAVE_MAX: Duration = Duration::from_secs(1);

impl Pool {
    /// A worker of a slot just removed: a ready one with a socket of its own leaves (it
    /// accepts what is queued there, then drains); any other drains now.
    pub(super) fn remove_worker(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match (self.cfg.leave_timeout, w.state, w.pid) {
            (Some(t), State::Ready, Some(pid)) if !t.is_zero() => {
                let slot = w.slot;
                w.state = State::Leaving {
                    until: later(now, t),
                };
                info!(
                    slot,
                    pid,
                    "worker {slot} (pid {pid}) steered away: it accepts what is queued on its \
                     socket, then drains"
                );
            }
            _ => self.stop_worker(id, StopWhy::Drain, now),
        }
    }

    /// The removed slot's queues are empty: its worker drains now.
    pub(super) fn queue_empty(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if let (State::Leaving { .. }, Some(pid)) = (w.state, w.pid) {
            let slot = w.slot;
            info!(
                slot,
                pid, "worker {slot} (pid {pid}): nothing is queued on its socket: draining it"
            );
            self.stop_worker(id, StopWhy::Drain, now);
        }
    }

    /// The wait is over and the queue is not empty: drain anyway (the worker accepts no more,
    /// or too slowly; what is still queued is reset when the socket closes).
    pub(super) fn leave_timed_out(&mut self, id: WorkerId, now: Instant) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid.unwrap_or(0));
        info!(
            slot,
            pid,
            "worker {slot} (pid {pid}): connections still queued on its socket after {}: \
             draining it anyway",
            super::fmt_dur(self.cfg.leave_timeout.unwrap_or_default())
        );
        self.stop_worker(id, StopWhy::Drain, now);
    }

    /// The workers whose removed slot's queues the supervisor should watch (empty: none, and
    /// no polling).
    pub fn leaving(&self) -> Vec<WorkerId> {
        self.workers
            .iter()
            .filter(|(_, w)| matches!(w.state, State::Leaving { .. }) && w.pid.is_some())
            .map(|(&id, _)| id)
            .collect()
    }
}
