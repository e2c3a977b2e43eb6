//! herder's sockets in systemd's fd store, end to end. The test plays systemd: its NOTIFY_SOCKET
//! takes every FDSTORE=1 datagram with its fds (SCM_RIGHTS) and FDNAME=, and a restart passes
//! the stored fds back the way systemd does (sd_listen_fds(3)): the socket unit's fds first, then
//! the store's in no particular order, with LISTEN_FDNAMES the names they were stored under and
//! LISTEN_PID the pid of herder itself (a launcher sets it, then execs herder).

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod stale;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

use harness::*;

#[test]
fn every_socket_herder_binds_is_pushed_under_a_name_of_its_own() {
    let dir = TempDir::new("push");
    let mut m = Manager::bind(dir.path());
    let mut h = start(&POOL, &SLEEPER, &m, Some("16"), &[]);
    let addr = h.addr();
    let health = health_addr(&mut h);
    let ready = m.wait_ready(0);
    let pushes = m.pushes(0..ready);
    let names: Vec<&str> = pushes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        pushes.len(),
        3,
        "listen, slot 1's sibling, health: {names:?}"
    );
    let distinct: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{names:?}");
    for n in &names {
        assert!(valid_fdname(n) && n.starts_with("herder/"), "{n:?}");
    }
    // The documented scheme: a --listen socket by what it asks for, a sibling by where its
    // listener is bound.
    let find = |n: &str| {
        pushes
            .iter()
            .find(|(name, _)| name == n)
            .unwrap_or_else(|| panic!("no push of {n}: {names:?}"))
            .1
            .as_fd()
    };
    let listen = find("herder/listen-tcp-127.0.0.1%3A0");
    let sibling = find(&format!("herder/slot1-tcp-127.0.0.1%3A{}", addr.port()));
    let health_fd = find("herder/health-tcp-127.0.0.1%3A0");
    assert_eq!(local(listen), addr);
    assert_eq!(local(sibling), addr);
    assert_eq!(local(health_fd), health);
    assert_ne!(inode(listen), inode(sibling));
    // They are the very sockets herder and its workers hold.
    for fd in [listen, sibling, health_fd] {
        assert!(holds(h.pid(), inode(fd)), "herder holds {}", inode(fd));
    }
    let w = workers(&mut h, 2);
    assert_eq!(w.len(), 2);
    for (slot, pid) in w {
        exec_settled(pid);
        let want = if slot == 0 { listen } else { sibling };
        eventually("the worker's fd 3", LONG, || {
            socket_inodes(pid).contains(&(3, inode(want)))
        });
        let env = environ(pid);
        assert!(
            !env.iter().any(|e| e.starts_with("FDSTORE=")),
            "FDSTORE is herder's, not the workers': {env:?}"
        );
    }
}

#[test]
fn nothing_is_pushed_without_fdstore_unless_fd_store_is_given() {
    let dir = TempDir::new("nopush");
    let mut m = Manager::bind(dir.path());
    let h = start(&POOL, &SLEEPER, &m, None, &[]);
    let ready = m.wait_ready(0);
    assert!(
        m.got[..=ready]
            .iter()
            .all(|d| d.fds.is_empty() && !d.is_push()),
        "no FDSTORE, no --fd-store: nothing pushed; got {:#?}",
        m.texts(0)
    );
    drop(h);
    // systemd 252 sets no $FDSTORE: --fd-store says the store is there.
    let mut args = POOL.to_vec();
    args.push("--fd-store");
    let mut h = start(&args, &SLEEPER, &m, None, &[]);
    let from = m.got.len();
    let addr = h.addr();
    let ready = m.wait_ready(from);
    let mut names: Vec<String> = m.pushes(from..ready).into_iter().map(|p| p.0).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "herder/health-tcp-127.0.0.1%3A0".to_string(),
            "herder/listen-tcp-127.0.0.1%3A0".into(),
            format!("herder/slot1-tcp-127.0.0.1%3A{}", addr.port()),
        ]
    );
}

#[test]
fn a_sigkilled_herder_comes_back_on_its_stored_sockets_and_refuses_no_connection() {
    let dir = TempDir::new("restart");
    let mut m = Manager::bind(dir.path());
    let mut a = start(&POOL, &[demo_bin()], &m, Some("16"), &[]);
    let addr = a.addr();
    let health = health_addr(&mut a);
    let ready = m.wait_ready(0);
    assert_eq!(m.pushes(0..ready).len(), 3, "{:#?}", m.texts(0));
    a.wait_line(&["pool ready"], LONG);
    let old_workers: Vec<i32> = workers(&mut a, 2).into_iter().map(|w| w.1).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, clients) = load(addr, stop.clone(), 4);
    eventually("the load to be served", LONG, || {
        ok.load(Ordering::SeqCst) > 20
    });
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    for pid in old_workers {
        eventually("the old workers to die with herder", LONG, || !alive(pid));
    }
    // No herder runs now: connections wait in the stored sockets' queues.
    let gap: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || get(addr, "/")))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    let from = m.got.len();
    let stored = m.pushes(0..ready);
    let inodes: BTreeSet<u64> = stored.iter().map(|(_, fd)| inode(fd.as_fd())).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    );
    let mut b = start(&POOL, &[demo_bin()], &m, Some("16"), &passed);
    assert_eq!(b.addr(), addr, "the same port");
    assert_eq!(health_addr(&mut b), health, "the same health port");
    for g in gap {
        let answer = g.join().unwrap();
        assert!(answer.is_ok(), "a connection made in the gap: {answer:?}");
    }
    let served = ok.load(Ordering::SeqCst);
    eventually("the load to be served again", LONG, || {
        ok.load(Ordering::SeqCst) > served + 20
    });
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    eprintln!(
        "served {} requests ({} before the restart was whole)",
        ok.load(Ordering::SeqCst),
        served
    );
    assert_eq!(refused.load(Ordering::SeqCst), 0, "no connection refused");
    get(health, "/livez").expect("the stored health socket serves");

    // Taken back, not bound again: herder and its workers hold the very sockets passed.
    let ready = m.wait_ready(from);
    for &ino in &inodes {
        assert!(holds(b.pid(), ino), "herder holds the stored socket {ino}");
    }
    for (_, pid) in workers(&mut b, 2) {
        eventually("a worker on a stored socket", LONG, || {
            socket_inodes(pid)
                .iter()
                .any(|&(fd, i)| fd == 3 && inodes.contains(&i))
        });
    }
    assert!(
        m.pushes(from..ready).is_empty() && m.removals(from..ready).is_empty(),
        "nothing new to store, nothing to remove: {:#?}",
        m.texts(from)
    );
}

#[test]
fn a_changed_port_is_bound_anew_and_the_stale_sockets_are_removed() {
    let dir = TempDir::new("moved");
    let mut m = Manager::bind(dir.path());
    let args = ["-l", "127.0.0.1:0", "--reuseport", "-w", "2"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let old = a.addr();
    let ready = m.wait_ready(0);
    assert_eq!(m.pushes(0..ready).len(), 2, "{:#?}", m.texts(0));
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let from = m.got.len();
    let stored = m.pushes(0..ready);
    let stale: Vec<u64> = stored.iter().map(|(_, fd)| inode(fd.as_fd())).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    );
    let args = ["-l", &listen, "--reuseport", "-w", "2"];
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let mut removed = m.removals(from..ready);
    removed.sort();
    assert_eq!(
        removed,
        [
            "herder/listen-tcp-127.0.0.1%3A0".to_string(),
            format!("herder/slot1-tcp-127.0.0.1%3A{}", old.port()),
        ]
    );
    let mut pushed: Vec<(String, u16)> = m
        .pushes(from..ready)
        .into_iter()
        .map(|(n, fd)| (n, local(fd.as_fd()).port()))
        .collect();
    pushed.sort();
    assert_eq!(
        pushed,
        [
            (format!("herder/listen-tcp-127.0.0.1%3A{port}"), port),
            (format!("herder/slot1-tcp-127.0.0.1%3A{port}"), port),
        ]
    );
    for ino in stale {
        assert!(!holds(b.pid(), ino), "the stale socket {ino} is closed");
    }
}

#[test]
fn workers_see_only_the_socket_unit_fds_and_the_listen_ones() {
    let dir = TempDir::new("unit");
    let mut m = Manager::bind(dir.path());
    // A socket unit herder-app.socket with ReusePort=yes and no FileDescriptorName=: its fd is
    // named after the unit, which is not herder's reserved prefix.
    let unit_name = "herder-app.socket";
    let unit = tcp_listener(true);
    let unit_port = local(unit.as_fd()).port();
    let args = [
        "-l",
        "web=127.0.0.1:0",
        "--reuseport",
        "-w",
        "2",
        "--health",
        "127.0.0.1:0",
    ];
    let mut a = start(
        &args,
        &SLEEPER,
        &m,
        Some("16"),
        &[(unit_name, unit.as_fd())],
    );
    let line = a.wait_line(&["listening", "name=web"], LONG);
    let web: SocketAddr = field(&line, "addr").unwrap().parse().unwrap();
    let ready = m.wait_ready(0);
    let stored = m.pushes(0..ready);
    let mut names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    let siblings = [
        format!("herder/slot1-tcp-127.0.0.1%3A{unit_port}"),
        format!("herder/slot1-tcp-127.0.0.1%3A{}", web.port()),
    ];
    let mut want = vec![
        "herder/health-tcp-127.0.0.1%3A0",
        "herder/listen-tcp-127.0.0.1%3A0",
        &siblings[0],
        &siblings[1],
    ];
    want.sort();
    assert_eq!(
        names, want,
        "the socket unit's own socket is systemd's, its sibling herder's"
    );
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    let ino = |n: &str| inode(stored.iter().find(|(name, _)| name == n).unwrap().1.as_fd());
    let mut passed: Vec<(&str, BorrowedFd<'_>)> = vec![(unit_name, unit.as_fd())];
    passed.extend(shuffled(
        stored
            .iter()
            .map(|(n, fd)| (n.as_str(), fd.as_fd()))
            .collect(),
    ));
    let from = m.got.len();
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    assert!(m.pushes(from..ready).is_empty(), "{:#?}", m.texts(from));
    let want = [
        (
            0,
            [inode(unit.as_fd()), ino("herder/listen-tcp-127.0.0.1%3A0")],
        ),
        (1, [ino(&siblings[0]), ino(&siblings[1])]),
    ];
    let w = workers(&mut b, 2);
    assert_eq!(w.len(), 2);
    for ((slot, pid), (want_slot, inodes)) in w.into_iter().zip(want) {
        assert_eq!(slot, want_slot);
        exec_settled(pid);
        eventually(
            "the worker to see fds 0 1 2 3 4 and nothing else",
            LONG,
            || fd_links(pid).iter().map(|f| f.0).collect::<Vec<_>>() == [0, 1, 2, 3, 4],
        );
        assert_eq!(
            socket_inodes(pid),
            [(3, inodes[0]), (4, inodes[1])],
            "slot {slot}: the socket unit's first, then --listen's"
        );
        let env = environ(pid);
        for e in [
            "LISTEN_FDS=2".to_string(),
            format!("LISTEN_FDNAMES={unit_name}:web"),
            format!("LISTEN_PID={pid}"),
        ] {
            assert!(env.contains(&e), "slot {slot}: {e} missing from {env:?}");
        }
    }
}

#[test]
fn scaling_down_removes_the_slot_sibling_from_the_store() {
    let dir = TempDir::new("scale");
    let mut m = Manager::bind(dir.path());
    let args = ["-l", "127.0.0.1:0", "--reuseport", "-w", "3"];
    let mut h = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let addr = h.addr();
    let ready = m.wait_ready(0);
    let slot2 = format!("herder/slot2-tcp-127.0.0.1%3A{}", addr.port());
    let first = m.push_of(0, &slot2).expect("slot 2's sibling pushed");
    let first_ino = inode(m.got[first].fds[0].as_fd());
    assert_eq!(m.pushes(0..ready).len(), 3);

    h.signal(libc::SIGTTOU);
    let removed = m.wait(ready, "FDSTOREREMOVE=1 of slot 2", |d| {
        d.is_remove() && d.fdname() == Some(slot2.as_str())
    });
    assert_eq!(
        m.removals(ready..removed + 1),
        std::slice::from_ref(&slot2),
        "slot 2's only"
    );

    h.signal(libc::SIGTTIN);
    let again = m.wait(removed, "slot 2's new sibling", |d| {
        d.is_push() && d.fdname() == Some(slot2.as_str())
    });
    let fd = m.got[again].fds[0].as_fd();
    assert_eq!(local(fd), addr);
    assert_ne!(inode(fd), first_ino, "a new socket");
    assert!(m.removal_of(0, "herder/listen-tcp-127.0.0.1%3A0").is_none());
}
