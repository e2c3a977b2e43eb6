//! What herder does with what the store hands back that it cannot or must not use: entries
//! that are not what their names say, duplicates, sockets bound elsewhere or by another uid,
//! unix sockets whose file is gone, failed pushes, a store that is too small.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use crate::harness::*;

#[test]
fn stored_fds_that_are_not_what_their_names_say_are_removed_and_closed() {
    let dir = TempDir::new("bad");
    let mut m = Manager::bind(dir.path());
    let file_path = dir.path().join("not-a-socket");
    let file = OwnedFd::from(std::fs::File::create(&file_path).unwrap());
    let bogus = tcp_listener(false);
    let udp: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
    let passed = [
        ("herder/listen-tcp-127.0.0.1%3A0", file.as_fd()),
        ("herder/bogus", bogus.as_fd()),
        ("herder/health-tcp-127.0.0.1%3A0", udp.as_fd()),
    ];
    let args = ["-l", "127.0.0.1:0", "-w", "1", "--health", "127.0.0.1:0"];
    let mut h = start(&args, &[demo_bin()], &m, Some("16"), &passed);
    let addr = h.addr();
    let health = health_addr(&mut h);
    let ready = m.wait_ready(0);
    get(addr, "/").expect("herder serves on a socket of its own");
    get(health, "/livez").expect("and health on another");
    h.wait_line(&["not a socket"], LONG);
    h.wait_line(&["not a name herder writes", "herder/bogus"], LONG);
    h.wait_line(&["a socket of another type"], LONG);
    let mut removed = m.removals(0..ready);
    removed.sort();
    assert_eq!(
        removed,
        [
            "herder/bogus",
            "herder/health-tcp-127.0.0.1%3A0",
            "herder/listen-tcp-127.0.0.1%3A0"
        ]
    );
    // Removed before the new socket of that name is stored.
    for n in [
        "herder/listen-tcp-127.0.0.1%3A0",
        "herder/health-tcp-127.0.0.1%3A0",
    ] {
        let (r, p) = (m.removal_of(0, n).unwrap(), m.push_of(0, n).unwrap());
        assert!(r < p, "{n}: removal, then the new push");
    }
    let links = fd_links(h.pid());
    assert!(
        !links.iter().any(|(_, t)| Path::new(t) == file_path),
        "the file is closed: {links:?}"
    );
    for fd in [bogus.as_fd(), udp.as_fd()] {
        assert!(!holds(h.pid(), inode(fd)), "closed");
    }
    let (_, worker) = workers(&mut h, 1)[0];
    let listen = m.push_of(0, "herder/listen-tcp-127.0.0.1%3A0").unwrap();
    let listen_ino = inode(m.got[listen].fds[0].as_fd());
    eventually(
        "the worker's only socket is herder's --listen",
        LONG,
        || {
            environ(worker).contains(&"LISTEN_FDS=1".to_string())
                && socket_inodes(worker).first() == Some(&(3, listen_ino))
        },
    );
    assert!(!holds(worker, inode(bogus.as_fd())));
}

#[test]
fn of_several_stored_sockets_under_one_name_the_first_that_fits_is_kept() {
    let dir = TempDir::new("dup");
    let mut m = Manager::bind(dir.path());
    let name = "herder/listen-tcp-127.0.0.1%3A0";
    let udp: OwnedFd = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().into();
    let (first, second) = (tcp_listener(false), tcp_listener(false));
    let passed = [
        (name, udp.as_fd()),
        (name, first.as_fd()),
        (name, second.as_fd()),
    ];
    let mut h = start(
        &["-l", "127.0.0.1:0", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    assert_eq!(h.addr(), local(first.as_fd()), "the first that fits");
    let ready = m.wait_ready(0);
    // The store is made to hold that one only: all of the name removed, that one stored again.
    let removed = m.removal_of(0, name).expect("removed");
    let pushed = m.push_of(removed, name).expect("stored again");
    assert!(pushed < ready);
    assert_eq!(inode(m.got[pushed].fds[0].as_fd()), inode(first.as_fd()));
    assert_eq!(m.pushes(0..ready).len(), 1);
    assert!(holds(h.pid(), inode(first.as_fd())));
    for fd in [udp.as_fd(), second.as_fd()] {
        assert!(!holds(h.pid(), inode(fd)), "the others are closed");
    }
}

#[test]
fn a_stored_socket_bound_elsewhere_than_its_name_says_is_not_used() {
    let dir = TempDir::new("forged");
    let mut m = Manager::bind(dir.path());
    let port = free_port();
    let name = format!("herder/listen-tcp-127.0.0.1%3A{port}");
    let elsewhere = tcp_listener(false);
    let listen = format!("127.0.0.1:{port}");
    let mut h = start(
        &["-l", &listen, "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &[(&name, elsewhere.as_fd())],
    );
    assert_eq!(h.addr().port(), port);
    let ready = m.wait_ready(0);
    h.wait_line(&["stored socket", "not used:", "bound to 127.0.0.1:"], LONG);
    let removed = m.removal_of(0, &name).expect("removed");
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_eq!(local(m.got[pushed].fds[0].as_fd()).port(), port);
    assert!(!holds(h.pid(), inode(elsewhere.as_fd())), "closed");
}

#[test]
fn a_unix_socket_is_taken_back_while_its_file_is_there_and_bound_anew_when_it_is_gone() {
    let dir = TempDir::new("unix");
    let mut m = Manager::bind(dir.path());
    let path = dir.path().join("app.sock");
    let listen = format!("unix:{}", path.display());
    let name = format!("herder/listen-unix-{}", path.display());
    let args = ["-l", &listen, "-w", "1"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let stored = m.pushes(0..ready);
    assert_eq!(
        stored.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [name.as_str()]
    );
    let ino = inode(stored[0].1.as_fd());
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);

    // SIGKILLed, herder left its socket file: the stored socket is still reachable there.
    let from = m.got.len();
    let passed = [(name.as_str(), stored[0].1.as_fd())];
    let mut b = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    assert!(holds(b.pid(), ino), "taken back");
    assert!(m.pushes(from..ready).is_empty() && m.removals(from..ready).is_empty());
    std::os::unix::net::UnixStream::connect(&path).expect("the file leads to it");
    // A clean stop removes the file: the stored socket can no longer be reached.
    b.signal(libc::SIGTERM);
    assert!(b.wait_exit(LONG).success());
    assert!(!path.exists());

    let from = m.got.len();
    let mut c = start(&args, &SLEEPER, &m, Some("16"), &passed);
    let ready = m.wait_ready(from);
    c.wait_line(
        &["stored socket", "not used:", "its socket file is gone"],
        LONG,
    );
    let removed = m.removal_of(from, &name).expect("removed");
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_ne!(inode(m.got[pushed].fds[0].as_fd()), ino);
    assert!(!holds(c.pid(), ino));
    std::os::unix::net::UnixStream::connect(&path).expect("bound anew");
}

#[test]
fn a_socket_that_must_be_bound_anew_waits_for_systemd_to_drop_the_old_one() {
    let dir = TempDir::new("rebind");
    let mut m = Manager::bind(dir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let name = format!("herder/listen-tcp-127.0.0.1%3A{port}");
    let mut a = start(&["-l", &listen, "-w", "1"], &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let worker = workers(&mut a, 1)[0].1;
    assert_eq!(m.pushes(0..ready).len(), 1);
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    eventually("the old worker to die with herder", LONG, || !alive(worker));

    // Now with --reuseport: the stored socket has no SO_REUSEPORT and cannot be used, and
    // while the store holds it, the port is taken.
    let stored = m.pushes(0..ready);
    let old = inode(stored[0].1.as_fd());
    let passed = [(name.as_str(), stored[0].1.as_fd())];
    let from = m.got.len();
    let mut b = start(
        &["-l", &listen, "--reuseport", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    drop(stored);
    let removed = m.wait(from, "FDSTOREREMOVE=1", |d| d.is_remove());
    assert_eq!(m.got[removed].fdname(), Some(name.as_str()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(b.pid()), "herder waits for the store to let go");
    // What systemd does with FDSTOREREMOVE=1: close its copies.
    for d in &mut m.got {
        if d.fdname() == Some(name.as_str()) {
            d.fds.clear();
        }
    }
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let pushed = m.push_of(removed, &name).expect("the new one stored");
    assert!(pushed < ready);
    assert_ne!(inode(m.got[pushed].fds[0].as_fd()), old);
}

#[test]
fn a_push_that_fails_is_logged_once_and_herder_serves_on() {
    let dir = TempDir::new("nomanager");
    // A NOTIFY_SOCKET nobody listens on: every datagram to it fails.
    let gone = Manager::bind(dir.path());
    drop(gone.sock);
    std::fs::remove_file(&gone.path).unwrap();
    let m = Manager {
        path: gone.path,
        sock: UnixDatagram::unbound().unwrap(),
        got: Vec::new(),
    };
    let mut h = start(&POOL, &[demo_bin()], &m, Some("16"), &[]);
    let addr = h.addr();
    h.wait_line(&["pool ready"], LONG);
    get(addr, "/").expect("herder serves");
    h.wait_line(&["cannot send to the service manager's fd store"], LONG);
    // Scaling adds a sibling to push: still one line.
    h.signal(libc::SIGTTIN);
    h.wait_nth_line(&["worker 2 (pid", SPAWNED], 1, LONG);
    get(addr, "/").expect("herder still serves");
    assert_eq!(
        h.count(&["cannot send to the service manager's fd store"]),
        1,
        "logged once"
    );
}

#[test]
fn more_sockets_than_fdstore_allows_is_a_warning() {
    let dir = TempDir::new("over");
    let mut m = Manager::bind(dir.path());
    let mut h = start(&POOL, &SLEEPER, &m, Some("2"), &[]);
    let ready = m.wait_ready(0);
    h.wait_line(&["more than FDSTORE=2", "FileDescriptorStoreMax="], LONG);
    // systemd decides what it keeps; herder offers every socket.
    assert_eq!(m.pushes(0..ready).len(), 3);
}

#[test]
fn a_socket_stored_beside_a_non_socket_of_its_name_is_kept_and_stored_again_alone() {
    let dir = TempDir::new("dirty");
    let mut m = Manager::bind(dir.path());
    let name = "herder/listen-tcp-127.0.0.1%3A0";
    let file = OwnedFd::from(std::fs::File::create(dir.path().join("file")).unwrap());
    let sock = tcp_listener(false);
    let passed = [(name, file.as_fd()), (name, sock.as_fd())];
    let mut h = start(
        &["-l", "127.0.0.1:0", "-w", "1"],
        &SLEEPER,
        &m,
        Some("16"),
        &passed,
    );
    assert_eq!(h.addr(), local(sock.as_fd()), "the socket is taken back");
    let ready = m.wait_ready(0);
    // FDSTOREREMOVE=1 drops everything under the name, the socket too: it is stored again.
    let removed = m.removal_of(0, name).expect("removed");
    let pushed = m.push_of(removed, name).expect("stored again");
    assert!(pushed < ready);
    assert_eq!(inode(m.got[pushed].fds[0].as_fd()), inode(sock.as_fd()));
    assert_eq!(m.removals(0..ready).len(), 1);
}

#[test]
fn sockets_stored_by_another_uid_are_removed_before_reuseport_binds_anew() {
    if !root() {
        eprintln!("skipped: needs root to run herder as another uid");
        return;
    }
    // A DynamicUser= that got another uid this time: the kernel lets no socket of the new uid
    // into the old sockets' SO_REUSEPORT group, so none of them can be used, and until every
    // one is gone the port is taken.
    let dir = TempDir::new("uid");
    let mut m = Manager::bind(dir.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&m.path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = ["-l", &listen, "--reuseport", "-w", "2"];
    let mut a = start(&args, &SLEEPER, &m, Some("16"), &[]);
    let ready = m.wait_ready(0);
    let old_workers: Vec<i32> = workers(&mut a, 2).into_iter().map(|w| w.1).collect();
    assert_eq!(m.pushes(0..ready).len(), 2);
    a.signal(libc::SIGKILL);
    a.wait_exit(LONG);
    for pid in old_workers {
        eventually("the old workers to die with herder", LONG, || !alive(pid));
    }

    let stored = m.pushes(0..ready);
    let names: BTreeSet<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    let passed: Vec<(&str, BorrowedFd<'_>)> = stored
        .iter()
        .map(|(n, fd)| (n.as_str(), fd.as_fd()))
        .collect();
    let from = m.got.len();
    let mut as_nobody = vec!["--reuid=65534", "--regid=65534", "--clear-groups"];
    as_nobody.push(herder_bin());
    as_nobody.extend(args);
    // The launcher execs setpriv, which execs herder: one pid, LISTEN_PID stays right.
    let mut b = start_via("setpriv", &as_nobody, &SLEEPER, &m, Some("16"), &passed);
    drop(stored);
    let mut removed = BTreeSet::new();
    let mut i = from;
    while removed != names {
        i = m.wait(i, "FDSTOREREMOVE=1", |d| d.is_remove()) + 1;
        removed.insert(m.got[i - 1].fdname().unwrap().to_string());
    }
    // Both removed before herder binds; now systemd lets go of them.
    for d in &mut m.got[..from] {
        d.fds.clear();
    }
    assert_eq!(b.addr().port(), port);
    let ready = m.wait_ready(from);
    let pushed: BTreeSet<String> = m.pushes(from..ready).into_iter().map(|p| p.0).collect();
    assert_eq!(pushed, names, "bound anew, stored anew");
}
