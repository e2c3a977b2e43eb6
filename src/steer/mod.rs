//! Steering new connections in the kernel (`--reuseport`, `--balance`): a classic BPF program
//! on each SO_REUSEPORT group herder owns picks the socket — only slots whose worker is ready,
//! and with `client-ip` the same slot for the same client — at no cost per connection and
//! with no process in the path.
//!
//! One file per concern: [`mod@program`] (the pure generator), [`order`] (the kernel's order of a
//! group's sockets, which the program's return value indexes), [`attach`] (the setsockopt).
//! This file holds what the supervisor keeps between events: what each group has attached,
//! so that a program is replaced only when the slots that can serve change. It must never
//! decide readiness itself: that is the pool's ([`crate::pool::Pool::serving_slots`]); it
//! only holds back a crash-looping slot a little longer ([`steerable`]).

mod attach;
mod order;
mod program;

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::listen::SocketSet;
use crate::pool::{Pool, State};
use crate::throttle::SERVED_AFTER;

pub use attach::sock_id;
pub use order::{Order, SockId};
pub use program::{program, Balance, Input};

/// What herder last attached to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attached {
    members: Vec<Option<usize>>,
    ready: Vec<bool>,
}

/// The steering of every `--reuseport` group, as the supervisor keeps it.
#[derive(Debug)]
pub struct Steering {
    pub balance: Balance,
    /// Per listener number: the inputs of the program it has.
    attached: BTreeMap<usize, Attached>,
    /// Per slot: whether new connections reach it (as of the last update).
    receiving: Vec<bool>,
    /// Groups whose order is not known, already logged.
    unknown: Vec<usize>,
    /// When a slot on probation (below) may get connections: the loop wakes up then.
    pub next: Option<Instant>,
}

/// Per slot: whether new connections should reach it now, and when that next changes by
/// itself. A slot is steered to once its worker is ready — except one that is crash-looping
/// (failed starts since its last worker served): its worker must have been ready for
/// `SERVED_AFTER` first, the mark the pool uses to tell a crash loop from a worker that
/// served. Else, with `--ready exec`, each start of a worker that exits at once would be
/// "ready" for a moment, and connections hashed to it then would wait in its queue.
pub fn steerable(pool: &Pool, now: Instant) -> (Vec<bool>, Option<Instant>) {
    let mut next = None::<Instant>;
    let ready = pool
        .serving_slots()
        .into_iter()
        .zip(&pool.slots)
        .map(|(serving, slot)| {
            let w = slot.current.and_then(|id| pool.workers.get(&id));
            let ready_at = w
                .filter(|w| w.state == State::Ready)
                .and_then(|w| w.ready_at);
            match ready_at {
                Some(at) if serving && slot.failures > 0 => {
                    let due = at.checked_add(SERVED_AFTER).unwrap_or(at);
                    if now < due {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                    now >= due
                }
                _ => serving,
            }
        })
        .collect();
    (ready, next)
}

impl Steering {
    pub fn new(balance: Balance) -> Steering {
        Steering {
            balance,
            attached: BTreeMap::new(),
            receiving: Vec::new(),
            unknown: Vec::new(),
            next: None,
        }
    }

    /// Brings every group's program in line with `ready` (per slot: can serve), replacing a
    /// program only when its inputs changed. `why` is what happened, for the log.
    pub fn update(&mut self, ready: &[bool], sockets: &SocketSet) {
        let mut receiving = vec![false; ready.len()];
        for g in sockets.groups() {
            let Some(members) = g.members else {
                if !self.unknown.contains(&g.listener) {
                    self.unknown.push(g.listener);
                    warn!(
                        listener = g.listener,
                        "not steering this socket's SO_REUSEPORT group: some of its sockets \
                         came back from the fd store, so their order in the kernel is not known"
                    );
                }
                continue;
            };
            let input = Input {
                group: &members,
                ready,
                balance: self.balance,
            };
            for s in input.receiving() {
                receiving[s] = true;
            }
            let want = Attached {
                members: members.clone(),
                ready: ready.to_vec(),
            };
            if self.attached.get(&g.listener) == Some(&want) {
                continue;
            }
            let prog = program(&input);
            match attach::attach(g.fd, &prog) {
                Ok(()) => {
                    debug!(
                        listener = g.listener,
                        balance = self.balance.word(),
                        instructions = prog.len(),
                        "steering program replaced: receiving slots {:?} of {}, group order {:?}",
                        input.receiving(),
                        ready.len(),
                        members
                    );
                    self.attached.insert(g.listener, want);
                }
                Err(e) => {
                    // Logged once per change; tried again at the next change.
                    warn!(
                        listener = g.listener,
                        "cannot attach the steering program: {e}"
                    );
                    self.attached.insert(g.listener, want);
                }
            }
        }
        self.receiving = receiving;
    }

    /// `/status`'s `steering` object: the mode and each slot's state, `receiving` or
    /// `steered away` (`slots` is null while no group is steered).
    pub fn report(&self) -> Value {
        let slots: Vec<&str> = self.receiving.iter().map(|&r| slot_word(r)).collect();
        let steered = !self.attached.is_empty();
        json!({ "balance": self.balance.word(), "slots": steered.then_some(slots) })
    }

    /// One slot's state for `/status`, if steering is on.
    pub fn slot(&self, slot: usize) -> Option<&'static str> {
        if self.attached.is_empty() {
            return None;
        }
        Some(slot_word(
            self.receiving.get(slot).copied().unwrap_or(false),
        ))
    }
}

fn slot_word(receiving: bool) -> &'static str {
    if receiving {
        "receiving"
    } else {
        "steered away"
    }
}
