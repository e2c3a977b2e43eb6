//! The sockets workers get: the listeners in a stable order, and with `--reuseport` one
//! sibling set per slot, kept open across that slot's restarts. A slot's siblings may also be
//! offered ready-made (herder's own, back from systemd's fd store); what was bound and released
//! is kept in a journal for the fd store to mirror (src/fdstore.rs).
//!
//! It also keeps each SO_REUSEPORT group's kernel order ([`Order`]) in step with every socket
//! it binds and closes, for steering (src/steer/). A removed slot's siblings stay open here
//! until the workers that hold them are gone ([`SocketSet::settle_retired`]), so that the
//! moment a socket leaves its group is herder's close, and the order stays known.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use super::{has_reuseport, sibling, ListenError, Listener};
use crate::steer::{sock_id, Order};

/// The kernel lets a socket join a SO_REUSEPORT group only if it is bound by the same
/// effective uid as the group's sockets (socket(7)); otherwise `bind` says EADDRINUSE, which
/// reads like a port clash. A socket's uid is its sockfs inode's owner (`fstat(2)` st_uid): the
/// uid that created it, e.g. root for systemd's sockets while herder runs as a DynamicUser.
fn check_owner(l: &Listener) -> Result<(), ListenError> {
    let fd = l.fd.as_raw_fd();
    let owner = nix::sys::stat::fstat(fd)
        .map_err(|source| ListenError::Inspect { fd, source })?
        .st_uid;
    let euid = nix::unistd::geteuid().as_raw();
    if owner != euid {
        return Err(ListenError::ReusePortOwner {
            fd,
            name: l.name.clone(),
            owner,
            euid,
        });
    }
    Ok(())
}

/// A change to the per-slot siblings since the last [`SocketSet::take_changes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiblingChange {
    /// `slot` got a freshly bound sibling of listener number `listener` (not an offered one).
    Bound { slot: usize, listener: usize },
    /// `slot`'s siblings were closed.
    Released { slot: usize },
}

/// The sockets workers get, and with `--reuseport` one sibling set per slot (slot 0 uses the
/// originals, so no socket in a SO_REUSEPORT group is ever left without an accepting worker).
pub struct SocketSet {
    pub listeners: Vec<Listener>,
    reuseport: bool,
    /// Each slot's siblings, one per reusable listener in listener order.
    per_slot: Vec<Option<Vec<OwnedFd>>>,
    fdnames: String,
    /// Ready-made siblings by (slot, listener number), used instead of binding.
    offered: BTreeMap<(usize, usize), OwnedFd>,
    changes: Vec<SiblingChange>,
    /// Per listener: its SO_REUSEPORT group's order (`None`: not a group of herder's).
    orders: Vec<Option<Order>>,
    /// Removed slots' siblings, open until none of the workers (ids) that got them is left.
    retired: Vec<Retired>,
}

/// A removed slot's siblings (by listener number) and the workers (ids) that got them.
type Retired = (Vec<u64>, Vec<(usize, OwnedFd)>);

/// One SO_REUSEPORT group as steering sees it.
pub struct Group<'a> {
    /// The listener number (its position among the listeners).
    pub listener: usize,
    /// A member to attach the group's program to.
    pub fd: BorrowedFd<'a>,
    /// The slot each socket serves, in the kernel's order (`None`: a retired slot's socket);
    /// `None` when the order is not known.
    pub members: Option<Vec<Option<usize>>>,
}

impl SocketSet {
    pub fn new(listeners: Vec<Listener>, reuseport: bool) -> Result<SocketSet, ListenError> {
        if reuseport {
            for l in listeners
                .iter()
                .filter(|l| l.reusable && l.owned_path.is_none())
            {
                if !has_reuseport(l) {
                    return Err(ListenError::NoReusePort {
                        fd: l.fd.as_raw_fd(),
                        name: l.name.clone(),
                    });
                }
                check_owner(l)?;
            }
        }
        let fdnames = listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":");
        let orders = first_orders(&listeners, reuseport);
        Ok(SocketSet {
            listeners,
            reuseport,
            per_slot: Vec::new(),
            fdnames,
            offered: BTreeMap::new(),
            changes: Vec::new(),
            orders,
            retired: Vec::new(),
        })
    }

    /// Whether slots get siblings of their own (`--reuseport`).
    pub fn reuseport(&self) -> bool {
        self.reuseport
    }

    pub fn fdnames(&self) -> &str {
        &self.fdnames
    }

    /// Binds the siblings for slots `1..n` now, so that setup errors surface before any worker.
    pub fn prepare(&mut self, slots: usize) -> Result<(), ListenError> {
        for slot in 1..slots {
            self.fds_for(slot)?;
        }
        Ok(())
    }

    /// The fds a worker of `slot` gets at 3, 4, … (in `--listen`/LISTEN_FDS order).
    pub fn fds_for(&mut self, slot: usize) -> Result<Vec<RawFd>, ListenError> {
        let shared = |l: &Listener| l.fd.as_raw_fd();
        if !self.reuseport || slot == 0 {
            return Ok(self.listeners.iter().map(shared).collect());
        }
        if self.per_slot.len() <= slot {
            self.per_slot.resize_with(slot + 1, || None);
        }
        if self.per_slot[slot].is_none() {
            let mut set = Vec::new();
            let mut bound = Vec::new();
            for (i, l) in self
                .listeners
                .iter()
                .enumerate()
                .filter(|(_, l)| l.reusable)
            {
                if let Some(fd) = self.offered.remove(&(slot, i)) {
                    // From the fd store: it joined in an earlier herder's time.
                    if let (Some(Some(o)), Some(id)) = (self.orders.get_mut(i), sock_id(fd.as_fd()))
                    {
                        o.join_unknown(id);
                    }
                    set.push((i, fd));
                    continue;
                }
                match sibling(l) {
                    Ok(fd) => {
                        // Bound and listening: it is the group's last socket now.
                        if let (Some(Some(o)), Some(id)) =
                            (self.orders.get_mut(i), sock_id(fd.as_fd()))
                        {
                            o.join(id);
                        }
                        bound.push(i);
                        set.push((i, fd));
                    }
                    Err(e) => {
                        // What was offered stays on offer; what was just bound is closed.
                        for (i, fd) in set.into_iter().filter(|(i, _)| !bound.contains(i)) {
                            self.offered.insert((slot, i), fd);
                        }
                        return Err(e);
                    }
                }
            }
            let changes = bound
                .into_iter()
                .map(|listener| SiblingChange::Bound { slot, listener });
            self.changes.extend(changes);
            self.per_slot[slot] = Some(set.into_iter().map(|(_, fd)| fd).collect());
        }
        let mut siblings = self.per_slot[slot].as_ref().expect("just filled").iter();
        Ok(self
            .listeners
            .iter()
            .map(|l| {
                if l.reusable {
                    siblings.next().map_or(shared(l), |s| s.as_raw_fd())
                } else {
                    shared(l)
                }
            })
            .collect())
    }

    /// A removed slot's siblings: no longer any slot's, and closed once none of `holders`
    /// (the workers that got them) is left ([`SocketSet::settle_retired`]).
    pub fn release(&mut self, slot: usize, holders: Vec<u64>) {
        if let Some(s) = self.per_slot.get_mut(slot) {
            if let Some(fds) = s.take() {
                self.changes.push(SiblingChange::Released { slot });
                let reusable = self
                    .listeners
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.reusable);
                let fds = reusable.map(|(i, _)| i).zip(fds).collect();
                self.retired.push((holders, fds));
                // With no holder at all, it closes now.
                self.settle_retired(|_| true);
            }
        }
    }

    /// Closes the retired siblings whose holders are all gone (`alive` says which are not):
    /// each leaves its group then, the last socket moving into its place.
    pub fn settle_retired(&mut self, alive: impl Fn(u64) -> bool) {
        let (gone, keep) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(holders, _)| !holders.iter().any(|&h| alive(h)));
        self.retired = keep;
        for (_, fds) in gone {
            for (i, fd) in fds {
                if let (Some(Some(o)), Some(id)) = (self.orders.get_mut(i), sock_id(fd.as_fd())) {
                    o.leave(id);
                }
                drop(fd);
            }
        }
    }

    /// Whether a connection or datagram still waits on a retired sibling `holder` (a worker
    /// id) got: what its leaving worker should accept before it drains (src/pool/leave.rs).
    pub fn retired_waiting(&self, holder: u64) -> bool {
        self.retired
            .iter()
            .filter(|(holders, _)| holders.contains(&holder))
            .flat_map(|(_, fds)| fds)
            .any(|(_, fd)| super::queue::waiting(fd.as_fd()) == Some(true))
    }

    /// Every SO_REUSEPORT group herder steers: one per reusable listener, with `--reuseport`.
    pub fn groups(&self) -> Vec<Group<'_>> {
        let mut slot_of = BTreeMap::new();
        for (slot, set) in self.per_slot.iter().enumerate() {
            for fd in set.iter().flatten() {
                if let Some(id) = sock_id(fd.as_fd()) {
                    slot_of.insert(id, slot);
                }
            }
        }
        self.orders
            .iter()
            .enumerate()
            .filter_map(|(i, o)| Some((i, o.as_ref()?)))
            .map(|(i, o)| {
                let l = &self.listeners[i];
                if let Some(id) = sock_id(l.fd.as_fd()) {
                    slot_of.insert(id, 0);
                }
                Group {
                    listener: i,
                    fd: l.fd.as_fd(),
                    members: o
                        .socks()
                        .map(|s| s.iter().map(|id| slot_of.get(id).copied()).collect()),
                }
            })
            .collect()
    }

    /// Offers `fd` as `slot`'s sibling of listener number `listener`, to be used instead of
    /// binding one (the caller has checked that it is bound to the same address, with
    /// SO_REUSEPORT).
    pub fn offer(&mut self, slot: usize, listener: usize, fd: OwnedFd) {
        self.offered.insert((slot, listener), fd);
    }

    /// Withdraws every offer not taken (closing those fds): which (slot, listener) they were.
    pub fn take_offers(&mut self) -> Vec<(usize, usize)> {
        std::mem::take(&mut self.offered).into_keys().collect()
    }

    /// The siblings bound and released since the last call.
    pub fn take_changes(&mut self) -> Vec<SiblingChange> {
        std::mem::take(&mut self.changes)
    }

    /// `slot`'s sibling of listener number `listener`, if it has one now.
    pub fn sibling_of(&self, slot: usize, listener: usize) -> Option<BorrowedFd<'_>> {
        if !self.listeners.get(listener)?.reusable {
            return None;
        }
        let nth = self.listeners[..listener]
            .iter()
            .filter(|l| l.reusable)
            .count();
        Some(self.per_slot.get(slot)?.as_ref()?.get(nth)?.as_fd())
    }

    pub fn remove_owned_paths(&self) {
        for l in &self.listeners {
            l.remove_owned_path();
        }
    }
}

/// The listeners with their fds, whether siblings are per slot, and each slot's siblings.
pub type Parts<'a> = (Vec<(RawFd, &'a Listener)>, bool, Vec<Option<Vec<RawFd>>>);

/// What steering needs to cross an upgrade: each listener's group order (the sockets by
/// inode, and whether the order is known), and the retired siblings — the workers (ids)
/// holding them and their fds by listener number. A retired sibling is still in its group
/// while an old worker holds it, so the new image must keep it, and know where it is.
#[derive(Debug, Default)]
pub struct SteerParts<Fd> {
    pub orders: Vec<Option<(Vec<u64>, bool)>>,
    pub retired: Vec<RetiredParts<Fd>>,
}

/// One retired sibling set as it crosses an upgrade: the worker ids holding it, and its fds by
/// listener number.
pub type RetiredParts<Fd> = (Vec<u64>, Vec<(usize, Fd)>);

/// What crosses an in-place upgrade (fd numbers stay the same across exec).
impl SocketSet {
    /// The listeners with their fds, whether siblings are per slot, and each slot's siblings.
    pub fn parts(&self) -> Parts<'_> {
        let listeners = self
            .listeners
            .iter()
            .map(|l| (l.fd.as_raw_fd(), l))
            .collect();
        let siblings = self
            .per_slot
            .iter()
            .map(|s| {
                s.as_ref()
                    .map(|v| v.iter().map(|f| f.as_raw_fd()).collect())
            })
            .collect();
        (listeners, self.reuseport, siblings)
    }

    /// The groups' orders and the retired siblings (fd numbers), for the next image.
    pub fn steer_parts(&self) -> SteerParts<RawFd> {
        SteerParts {
            orders: self
                .orders
                .iter()
                .map(|o| o.as_ref().map(Order::to_parts))
                .collect(),
            retired: self
                .retired
                .iter()
                .map(|(holders, fds)| {
                    let fds = fds.iter().map(|(i, fd)| (*i, fd.as_raw_fd())).collect();
                    (holders.clone(), fds)
                })
                .collect(),
        }
    }

    /// The set an earlier image had: its listeners and siblings, taken over as they are (they
    /// were validated when first bound or inherited).
    /// With `steer` from an image that carried it, the groups' orders and retired siblings
    /// are taken over as they are; without (an older image), the orders are rebuilt from the
    /// slots, which is right unless slots were removed before the upgrade.
    pub fn from_parts(
        listeners: Vec<Listener>,
        reuseport: bool,
        per_slot: Vec<Option<Vec<OwnedFd>>>,
        steer: SteerParts<OwnedFd>,
    ) -> SocketSet {
        let fdnames = listeners
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":");
        let mut orders = first_orders(&listeners, reuseport);
        if steer.orders.len() == orders.len() {
            for (o, carried) in orders.iter_mut().zip(steer.orders) {
                if let (Some(o), Some((socks, known))) = (o.as_mut(), carried) {
                    *o = Order::from_parts(socks, known);
                }
            }
        } else {
            for set in per_slot.iter().flatten() {
                let reusable = listeners.iter().enumerate().filter(|(_, l)| l.reusable);
                for ((i, _), fd) in reusable.zip(set) {
                    if let (Some(Some(o)), Some(id)) = (orders.get_mut(i), sock_id(fd.as_fd())) {
                        o.join(id);
                    }
                }
            }
        }
        SocketSet {
            listeners,
            reuseport,
            per_slot,
            fdnames,
            offered: BTreeMap::new(),
            changes: Vec::new(),
            orders,
            retired: steer.retired,
        }
    }
}

/// Each reusable listener's group, with the listener first (`--reuseport` only).
fn first_orders(listeners: &[Listener], reuseport: bool) -> Vec<Option<Order>> {
    listeners
        .iter()
        .map(|l| {
            let id = sock_id(l.fd.as_fd())?;
            (reuseport && l.reusable).then(|| Order::new(id))
        })
        .collect()
}
