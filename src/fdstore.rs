//! herder's own sockets in systemd's fd store: every socket herder binds itself (`--listen`,
//! the `--reuseport` siblings of each slot, `--health`) is pushed with `FDSTORE=1` and a name
//! of its own ([`name`]), and taken back from LISTEN_FDS on the next start, so that a crashed,
//! SIGKILLed or restarted herder refuses no connection and loses none queued in the kernel
//! (sd_notify(3), sd_listen_fds(3), systemd.service(5) `FileDescriptorStoreMax=`).
//!
//! This module owns the names, the split of what LISTEN_FDS passes into the socket unit's fds
//! and herder's stored ones, the choice between a stored socket and a new bind, and the
//! FDSTORE=1 / FDSTOREREMOVE=1 messages that keep the store equal to what herder holds. It must
//! never hand a stored fd to a worker as if a socket unit had passed it, never adopt a socket
//! whose facts (type, listening, address, SO_REUSEPORT, owner) differ from what is asked for
//! now, never leave in the store a socket herder does not use (in a SO_REUSEPORT group such a
//! socket would take connections nobody accepts), and never fail herder for anything the store
//! holds: a bad entry is logged, removed and closed.

mod check;
pub mod name;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::listen::{self, Addr, InheritedEnv, ListenError, ListenSpec, Listener, SocketSet};
use crate::manager::Manager;
use check::{inspect, judge, Want};
use name::Id;

/// How long a bind that finds its address in use is retried after herder has asked systemd to
/// drop stored sockets: systemd closes its copies when it reads the FDSTOREREMOVE=1, a moment
/// after herder sent it, and until then an old socket may still hold the address.
const REBIND_WAIT: Duration = Duration::from_secs(5);

/// What LISTEN_FDS handed back under herder's own names, not yet judged.
#[derive(Debug, Default)]
pub struct Stored(Vec<(String, OwnedFd)>);

/// `sd_listen_fds_with_names(3)`, split: the socket unit's sockets, validated, in the order
/// passed (workers get them as they are), and herder's own stored fds (names starting with
/// [`name::PREFIX`]), made close-on-exec and set aside. systemd passes the socket unit's fds
/// first and the store's after them, in no fixed order: only the names tell them apart.
/// Logs nothing (logging is not set up yet).
pub fn inherit(env: &InheritedEnv, my_pid: u32) -> Result<(Vec<Listener>, Stored), ListenError> {
    let fds = listen::inherit_fds(env, my_pid)?;
    let count = fds.len();
    let mut unit = Vec::new();
    let mut stored = Vec::new();
    for (fd, name) in fds {
        if name::is_herders(&name) {
            // Whatever it is, no worker may inherit it. (F_SETFD cannot fail on an open fd.)
            let _ = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            stored.push((name, fd));
        } else {
            unit.push(listen::validate_inherited(fd, name)?);
        }
    }
    listen::check_no_extra_fd(count)?;
    Ok((unit, Stored(stored)))
}

/// Whether herder pushes its sockets, and the most systemd keeps: `$FDSTORE` (systemd ≥ 254
/// sets it to `FileDescriptorStoreMax=` when that is above 0), or `--fd-store` (systemd 252
/// has a store but does not say so).
pub fn wanted(fdstore: Option<&OsStr>, flag: bool) -> (bool, Option<usize>) {
    let max = fdstore
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    (max.is_some() || flag, max)
}

/// The sockets `--listen` and `--health` ask for, stored or new.
pub struct Own {
    /// In `--listen` order.
    pub listeners: Vec<Listener>,
    pub health: Option<Listener>,
}

/// What herder has in the fd store and what it got back from it.
#[derive(Default)]
pub struct FdStore {
    /// Whether herder pushes its sockets (and keeps what it takes back in the store).
    push: bool,
    /// `$FDSTORE`, when systemd said it.
    max: Option<usize>,
    /// herder's own handle on NOTIFY_SOCKET, when there is one.
    manager: Option<Manager>,
    euid: u32,
    reuseport: bool,
    /// Stored fds not taken yet, by name (setup only).
    candidates: BTreeMap<String, Candidate>,
    /// The names herder keeps in the store now.
    stored: BTreeSet<String>,
    /// Each listener's address and copy, the key of its siblings' names (reusable ones only).
    keys: Vec<Option<(Addr, u32)>>,
    /// When herder last asked systemd to drop something (a bind may wait for it).
    removed_at: Option<Instant>,
    over_warned: bool,
}

/// The stored fds under one name.
struct Candidate {
    id: Id,
    fds: Vec<OwnedFd>,
    /// Something else under this name was closed already (not a socket): what is kept must be
    /// stored again, alone.
    dirty: bool,
}

impl FdStore {
    /// `fdstore` is `$FDSTORE`, `flag` is `--fd-store`. Stored fds herder cannot be the author
    /// of (a name it does not write, not a socket) are logged and closed here.
    pub fn new(
        stored: Stored,
        fdstore: Option<&OsStr>,
        flag: bool,
        manager: Option<&Manager>,
    ) -> FdStore {
        let (push, max) = wanted(fdstore, flag);
        let manager = manager.and_then(|m| {
            m.try_clone()
                .map_err(|e| warn!("fd store: cannot use NOTIFY_SOCKET: {e}"))
                .ok()
        });
        if push && manager.is_none() {
            warn!("fd store: no NOTIFY_SOCKET to push sockets to; nothing is stored");
        }
        let mut s = FdStore {
            push: push && manager.is_some(),
            max,
            manager,
            euid: nix::unistd::geteuid().as_raw(),
            ..FdStore::default()
        };
        for (fdname, fd) in stored.0 {
            let Some(id) = name::parse(&fdname) else {
                warn!(
                    %fdname,
                    "fd store: {fdname} is not a name herder writes; removed and closed"
                );
                s.remove(&fdname);
                continue;
            };
            let c = s.candidates.entry(fdname).or_insert(Candidate {
                id,
                fds: Vec::new(),
                dirty: false,
            });
            // (Removed from the store with the rest of its name, below or when taken.)
            if inspect(fd.as_fd()).socket {
                c.fds.push(fd);
            } else {
                c.dirty = true;
            }
        }
        for (fdname, c) in &s.candidates {
            if c.dirty {
                warn!(%fdname, "fd store: {fdname} is not a socket; removed and closed");
            }
            if c.fds.len() > 1 {
                warn!(
                    %fdname,
                    count = c.fds.len(),
                    "fd store: {} sockets under the name {fdname}; the first that fits is kept",
                    c.fds.len()
                );
            }
        }
        s
    }

    /// The `--listen` sockets (in order) and the `--health` one: each the stored socket of its
    /// name when that is what is asked for, else bound now. Stored sockets that will not be
    /// used are removed first, so that none still holds an address about to be bound.
    pub fn own_sockets(
        &mut self,
        specs: &[ListenSpec],
        health: Option<&ListenSpec>,
        reuseport: bool,
    ) -> Result<Own> {
        self.reuseport = reuseport;
        let names = listen_names(specs);
        let taken: Vec<Option<OwnedFd>> = specs
            .iter()
            .zip(&names)
            .map(|(s, n)| {
                self.take(
                    n.as_deref()?,
                    &Want::Asked {
                        addr: &s.addr,
                        reuseport,
                    },
                )
            })
            .collect();
        let health_name = health.and_then(|h| {
            Id::Health {
                addr: h.addr.clone(),
            }
            .name()
        });
        let health_taken = health.zip(health_name.as_deref()).and_then(|(h, n)| {
            let want = Want::Asked {
                addr: &h.addr,
                reuseport: false,
            };
            self.take(n, &want)
        });
        // Siblings can be judged only once the listeners are known; meanwhile only one that
        // could join a new socket's SO_REUSEPORT group (herder's uid, SO_REUSEPORT) may keep an
        // address: every other is removed before anything is bound.
        let euid = self.euid;
        self.discard(|c| {
            !(reuseport
                && matches!(c.id, Id::Sibling { .. })
                && c.fds.iter().any(|fd| {
                    let f = inspect(fd.as_fd());
                    f.reuseport && f.owner == euid
                }))
        });
        let mut listeners = Vec::with_capacity(specs.len());
        for ((spec, fdname), fd) in specs.iter().zip(names).zip(taken) {
            listeners.push(self.adopt_or_bind(spec, fdname, fd, reuseport)?);
        }
        let health = match health {
            Some(h) => Some(
                self.adopt_or_bind(h, health_name, health_taken, false)
                    .context("--health")?,
            ),
            None => None,
        };
        Ok(Own { listeners, health })
    }

    /// Binds the siblings of slots `1..slots` ([`SocketSet::prepare`]), each the stored one of
    /// its name when it is bound where its listener is; then removes whatever the store still
    /// holds that herder does not use, and pushes every socket bound since.
    pub fn prepare(&mut self, sockets: &mut SocketSet, slots: usize) -> Result<(), ListenError> {
        self.learn_keys(sockets);
        if self.reuseport {
            for slot in 1..slots {
                for i in 0..self.keys.len() {
                    let (Some(fdname), Some((addr, _))) =
                        (self.sibling_name(slot, i), &self.keys[i])
                    else {
                        continue;
                    };
                    let addr = addr.clone();
                    if let Some(fd) = self.take(&fdname, &Want::SiblingOf { addr: &addr }) {
                        info!(
                            %fdname,
                            slot,
                            "--reuseport socket of worker {slot} taken back from the fd store \
                             ({fdname})"
                        );
                        sockets.offer(slot, i, fd);
                    }
                }
            }
        }
        let prepared = sockets.prepare(slots);
        for (slot, i) in sockets.take_offers() {
            if let Some(fdname) = self.sibling_name(slot, i) {
                self.remove(&fdname);
            }
        }
        self.discard(|_| true);
        self.sync(sockets);
        prepared
    }

    /// After `herder upgrade` (an in-place re-exec): the store still holds what the earlier
    /// image put there, `sockets` is the set it handed over (its last `specs.len()` listeners
    /// are the `--listen` ones, with siblings for slots `1..slots`). Nothing is sent: those
    /// sockets are stored already, and from now on slots scaled away or added are mirrored as
    /// before. (Without this, a slot scaled away after an upgrade would leave its sibling in
    /// the store, in the SO_REUSEPORT group, taking connections nobody accepts.)
    pub fn resumed(
        fdstore: Option<&OsStr>,
        flag: bool,
        manager: Option<&Manager>,
        specs: &[ListenSpec],
        health: Option<&ListenSpec>,
        sockets: &mut SocketSet,
        slots: usize,
    ) -> FdStore {
        let mut s = FdStore::new(Stored::default(), fdstore, flag, manager);
        s.reuseport = sockets.reuseport();
        s.learn_keys(sockets);
        // What sync would report is stored already.
        sockets.take_changes();
        if !s.push {
            return s;
        }
        let mut names: Vec<String> = listen_names(specs).into_iter().flatten().collect();
        names.extend(health.and_then(|h| {
            Id::Health {
                addr: h.addr.clone(),
            }
            .name()
        }));
        for slot in 1..slots {
            for i in 0..s.keys.len() {
                if sockets.sibling_of(slot, i).is_some() {
                    names.extend(s.sibling_name(slot, i));
                }
            }
        }
        s.stored.extend(names);
        s
    }

    /// Each listener's sibling key: its bound address and copy (reusable listeners only).
    fn learn_keys(&mut self, sockets: &SocketSet) {
        let addrs: Vec<Option<Addr>> = sockets
            .listeners
            .iter()
            .map(|l| {
                if l.reusable {
                    inspect(l.fd.as_fd()).local
                } else {
                    None
                }
            })
            .collect();
        let copies = name::copies(addrs.iter().map(Option::as_ref));
        self.keys = addrs
            .into_iter()
            .zip(copies)
            .map(|(a, c)| a.map(|a| (a, c)))
            .collect();
    }

    /// Mirrors in the store the siblings bound and released since the last call (slots started
    /// or scaled away while the loop runs).
    pub fn sync(&mut self, sockets: &mut SocketSet) {
        for change in sockets.take_changes() {
            match change {
                listen::SiblingChange::Bound { slot, listener } => {
                    let fd = sockets.sibling_of(slot, listener);
                    if let (Some(fdname), Some(fd)) = (self.sibling_name(slot, listener), fd) {
                        self.store(&fdname, fd);
                    }
                }
                listen::SiblingChange::Released { slot } => {
                    for i in 0..self.keys.len() {
                        if let Some(fdname) = self.sibling_name(slot, i) {
                            if self.stored.contains(&fdname) {
                                self.remove(&fdname);
                            }
                        }
                    }
                }
            }
        }
    }

    fn sibling_name(&self, slot: usize, listener: usize) -> Option<String> {
        let (addr, copy) = self.keys.get(listener)?.as_ref()?;
        let slot = u32::try_from(slot).ok()?;
        let (addr, copy) = (addr.clone(), *copy);
        Id::Sibling { slot, addr, copy }.name()
    }

    /// The stored socket named `fdname`, if it is what `want` says: the first that is, of
    /// several under one name. Every other is closed; what herder does not keep in the store
    /// is removed from it.
    fn take(&mut self, fdname: &str, want: &Want<'_>) -> Option<OwnedFd> {
        let Candidate { fds, dirty, .. } = self.candidates.remove(fdname)?;
        let several = fds.len() > 1 || dirty;
        let mut kept = None;
        for fd in fds {
            if kept.is_some() {
                continue;
            }
            match judge(want, &inspect(fd.as_fd()), self.euid) {
                Ok(()) => kept = Some(fd),
                Err(why) => warn!(%fdname, "fd store: stored socket {fdname} not used: {why}"),
            }
        }
        match &kept {
            // Adopted as it is: it stays in the store, not pushed again.
            Some(_) if self.push && !several => {
                self.stored.insert(fdname.to_string());
            }
            // One kept of several: the store is made to hold that one only.
            Some(fd) if self.push => {
                self.remove(fdname);
                self.store(fdname, fd.as_fd());
            }
            // Not used, or the store is not herder's to use now.
            _ => self.remove(fdname),
        }
        kept
    }

    /// Removes and closes every candidate `which` says, as no longer needed.
    fn discard(&mut self, which: impl Fn(&Candidate) -> bool) {
        let names: Vec<String> = self
            .candidates
            .iter()
            .filter(|(_, c)| which(c))
            .map(|(n, _)| n.clone())
            .collect();
        for fdname in names {
            self.candidates.remove(&fdname);
            info!(
                %fdname,
                "fd store: stored socket {fdname} no longer needed; removed and closed"
            );
            self.remove(&fdname);
        }
    }

    fn adopt_or_bind(
        &mut self,
        spec: &ListenSpec,
        fdname: Option<String>,
        taken: Option<OwnedFd>,
        reuseport: bool,
    ) -> Result<Listener, ListenError> {
        if let Some(fd) = taken {
            let l = listen::listener(spec, fd);
            let name = fdname.as_deref().unwrap_or("");
            info!(
                fdname = name,
                addr = %l.display,
                "socket taken back from the fd store: {} ({name})",
                l.display
            );
            return Ok(l);
        }
        let l = self.bind(spec, reuseport)?;
        if let Some(n) = &fdname {
            self.store(n, l.fd.as_fd());
        }
        Ok(l)
    }

    /// [`listen::bind`], waiting up to [`REBIND_WAIT`] after a removal for systemd to close
    /// what may still hold the address.
    fn bind(&self, spec: &ListenSpec, reuseport: bool) -> Result<Listener, ListenError> {
        loop {
            match listen::bind(spec, reuseport) {
                Err(ListenError::InUse { .. })
                    if self.removed_at.is_some_and(|t| t.elapsed() < REBIND_WAIT) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    fn store(&mut self, fdname: &str, fd: BorrowedFd<'_>) {
        if !self.push {
            return;
        }
        let Some(m) = self.manager.as_mut() else {
            return;
        };
        if m.store_fd(fdname, fd) {
            self.stored.insert(fdname.to_string());
        }
        if let Some(max) = self.max {
            if self.stored.len() > max && !self.over_warned {
                self.over_warned = true;
                warn!(
                    "fd store: herder has more than FDSTORE={max} sockets to store; systemd \
                     keeps only {max} (raise FileDescriptorStoreMax=)"
                );
            }
        }
    }

    fn remove(&mut self, fdname: &str) {
        self.stored.remove(fdname);
        if let Some(m) = self.manager.as_mut() {
            if name::valid_fdname(fdname) && m.remove_stored(fdname) {
                self.removed_at = Some(Instant::now());
            }
        }
    }
}

/// The name of each `--listen` socket.
fn listen_names(specs: &[ListenSpec]) -> Vec<Option<String>> {
    let copies = name::copies(specs.iter().map(|s| Some(&s.addr)));
    specs
        .iter()
        .zip(copies)
        .map(|(s, copy)| {
            let addr = s.addr.clone();
            Id::Listen { addr, copy }.name()
        })
        .collect()
}
