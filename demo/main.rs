//! herder-demo: the demo worker used by herder's quick start, integration tests and benchmarks.
//!
//! A small HTTP/1.1 server. It takes its listening socket from fd 3 (the LISTEN_FDS protocol,
//! `sd_listen_fds(3)`) or, as the "no supervisor" benchmark baseline, binds `--listen HOST:PORT`
//! itself with SO_REUSEPORT. It speaks `sd_notify(3)` toward herder (READY=1, STOPPING=1,
//! WATCHDOG=1) and drains gracefully on SIGTERM/SIGINT.
//!
//! Threads: the main thread is the only acceptor and the only thread with SIGTERM/SIGINT
//! unblocked, so a drain signal interrupts its blocking `accept4`. Handler threads, grown on
//! demand up to `MAX_CONNS`, serve one connection each; at the limit the acceptor stops
//! accepting, leaving connections in the kernel queue for sibling workers.
//!
//! It must never set O_NONBLOCK on, nor shutdown(), the inherited socket: that open file
//! description is shared with herder and every other worker. Nothing a client sends may panic
//! it. Only std and libc.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{env, mem, process, ptr, thread};

const HEAD_LIMIT: usize = 8 * 1024;
const BODY_LIMIT: u64 = 1024 * 1024;
const MAX_CONNS: usize = 512;
const SLEEP_CAP_MS: u64 = 600_000;
/// SO_RCVTIMEO on connections: how often an idle handler looks at the drain flag.
const TICK: Duration = Duration::from_millis(200);
/// A client that stops reading responses must not hold a handler thread forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// While draining, a request stalled mid-way gets this many ticks (5 s) before we give up.
const DRAIN_STALL_TICKS: u32 = 25;
const LINGER: Duration = Duration::from_secs(1);
const BACKLOG: libc::c_int = 1024;
const HANDLER_STACK: usize = 128 * 1024;
const USAGE: &str = "usage: herder-demo [--listen HOST:PORT] [--crash-route]";
const HELP: &str = "Serves HTTP on the socket at fd 3 (LISTEN_FDS) or, without it, binds \
    HOST:PORT with SO_REUSEPORT.\nRoutes: GET / , /health , /sleep?ms=N ; with --crash-route (tests \
    only) also /crash, which makes the worker exit 3.";

/// Set by the SIGTERM/SIGINT handler; everything else only reads it.
static DRAIN: AtomicBool = AtomicBool::new(false);
/// The listening fd, and a non-listening socket the signal handler dup2()s over it.
static LISTENER: AtomicI32 = AtomicI32::new(-1);
static PLACEHOLDER: AtomicI32 = AtomicI32::new(-1);
/// `--crash-route`: serve `GET /crash`. Off by default: the shipped image runs this worker on a
/// public port, and a route anyone can use to kill workers would let anyone make herder give up.
static CRASH_ROUTE: AtomicBool = AtomicBool::new(false);

/// stderr is herder's (or the journal's), shared with sibling workers. Each line goes out in one
/// write(2), so lines from several workers never interleave (pipe(7): writes up to PIPE_BUF are
/// atomic), and a broken stderr is ignored instead of panicking like eprintln! would.
macro_rules! log {
    ($($arg:tt)*) => {{
        let line = format!("herder-demo: {}\n", format_args!($($arg)*));
        let _ = io::stderr().write_all(line.as_bytes());
    }};
}

fn main() {
    let pid = process::id();
    let slot = env::var("HERDER_WORKER").unwrap_or_else(|_| "-".into());
    let listener = match parse_args().and_then(take_listener) {
        Ok(fd) => fd,
        Err(msg) => {
            log!("{msg}");
            process::exit(2);
        }
    };
    if let Err(e) = setup_drain_signal(listener) {
        log!("cannot install the SIGTERM handler: {e}");
        process::exit(2);
    }
    // Every thread spawned from here on inherits the blocked mask; the acceptor unblocks below.
    let notifier = Notifier::from_env().map(Arc::new);
    if let Some(n) = &notifier {
        start_watchdog(Arc::clone(n));
    }
    if let Some(ms) = env_u64("DEMO_READY_DELAY_MS") {
        thread::sleep(Duration::from_millis(ms)); // tests: a worker that is slow to start
    }
    if let (Some(n), false) = (&notifier, DRAIN.load(SeqCst)) {
        n.send("READY=1");
    }
    log!("pid {pid} slot {slot} listening");

    let pool = Arc::new(Pool::new(format!("pid={pid} slot={slot}\n").into_bytes()));
    set_drain_signals_blocked(false);
    let code = accept_loop(listener, &pool);
    log!("pid {pid} draining");
    if let Some(n) = &notifier {
        n.send("STOPPING=1");
    }
    pool.wait_idle();
    log!("pid {pid} drained, exiting");
    process::exit(code);
}

/// Returns the value of `--listen`, if given.
fn parse_args() -> Result<Option<String>, String> {
    let mut args = env::args().skip(1);
    let mut listen = None;
    while let Some(arg) = args.next() {
        if arg == "--listen" || arg == "-l" {
            listen = Some(args.next().ok_or("--listen needs HOST:PORT")?);
        } else if let Some(v) = arg.strip_prefix("--listen=") {
            listen = Some(v.to_string());
        } else if arg == "--crash-route" {
            CRASH_ROUTE.store(true, SeqCst);
        } else if arg == "--help" || arg == "-h" {
            let _ = writeln!(io::stdout(), "{USAGE}\n{HELP}");
            process::exit(0);
        } else {
            return Err(format!("unexpected argument {arg:?} ({USAGE})"));
        }
    }
    Ok(listen)
}

/// fd 3 when LISTEN_FDS/LISTEN_PID hand it to us, else a socket bound to `--listen`.
fn take_listener(listen: Option<String>) -> Result<RawFd, String> {
    let why_not_inherited = match env::var("LISTEN_FDS") {
        Err(_) => "LISTEN_FDS is not set".to_string(),
        Ok(fds) => {
            let n: u32 = fds
                .trim()
                .parse()
                .map_err(|_| format!("LISTEN_FDS={fds:?} is not a number"))?;
            let listen_pid = env::var("LISTEN_PID").unwrap_or_default();
            // sd_listen_fds(3): the variables count only if LISTEN_PID names this very process.
            if listen_pid.trim().parse::<u32>().ok() != Some(process::id()) {
                format!(
                    "LISTEN_PID={listen_pid:?} is not this process ({})",
                    process::id()
                )
            } else if n == 0 {
                "LISTEN_FDS=0".to_string()
            } else {
                check_listening_stream(3)?;
                return Ok(3);
            }
        }
    };
    match listen {
        Some(addr) => bind_reuseport(&addr),
        None => Err(format!(
            "no listening socket: {why_not_inherited} and no --listen HOST:PORT given"
        )),
    }
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val and len are valid for writes and len says how big val is.
    let rc = unsafe { libc::getsockopt(fd, level, name, ptr::addr_of_mut!(val).cast(), &mut len) };
    if rc == 0 {
        Ok(val)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &T) -> io::Result<()> {
    let len = mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: val points to a live T of exactly len bytes; the kernel only reads it.
    let rc = unsafe { libc::setsockopt(fd, level, name, ptr::from_ref(val).cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Refuse anything on fd 3 that a blocking accept loop cannot serve, with a clear message.
fn check_listening_stream(fd: RawFd) -> Result<(), String> {
    let ty = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)
        .map_err(|e| format!("LISTEN_FDS: fd {fd} is not a usable socket: {e}"))?;
    let listening = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).unwrap_or(0);
    if ty != libc::SOCK_STREAM || listening == 0 {
        return Err(format!(
            "LISTEN_FDS: fd {fd} is not a listening stream socket"
        ));
    }
    Ok(())
}

/// The benchmark baseline: N copies each bind the same port and the kernel spreads connections.
fn bind_reuseport(addr: &str) -> Result<RawFd, String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("--listen {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("--listen {addr}: no address"))?;
    let fail = |what: &str| format!("--listen {addr}: {what}: {}", io::Error::last_os_error());
    let domain = if sa.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall, no pointers.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket"));
    }
    // SAFETY: socket() just returned fd and nothing else owns it; OwnedFd closes it on error.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        setsockopt(fd, libc::SOL_SOCKET, opt, &one).map_err(|e| format!("--listen {addr}: {e}"))?;
    }
    let (storage, len) = sockaddr_of(&sa);
    // SAFETY: storage holds a sockaddr of len bytes for this address family.
    if unsafe { libc::bind(fd, ptr::addr_of!(storage).cast(), len) } != 0 {
        return Err(fail("bind"));
    }
    // SAFETY: plain syscall on our own socket.
    if unsafe { libc::listen(fd, BACKLOG) } != 0 {
        return Err(fail("listen"));
    }
    Ok(sock.into_raw_fd())
}

fn sockaddr_of(sa: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain integers; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match sa {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is big enough and suitably aligned for any sockaddr.
            unsafe { ptr::write(ptr::addr_of_mut!(storage).cast(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write(ptr::addr_of_mut!(storage).cast(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The drain signal must interrupt the acceptor's blocking accept4, and only the acceptor's:
/// no SA_RESTART (signal(7): accept is then not restarted and fails with EINTR), and the signals
/// stay blocked in every other thread. The handler also dup2()s a non-listening socket over the
/// listener, which closes the race where the signal lands after the acceptor checked the flag
/// but before it entered accept4: that accept4 then fails at once instead of blocking.
fn setup_drain_signal(listener: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall; an unconnected unix stream socket that accept4 rejects with EINVAL.
    let placeholder =
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if placeholder < 0 {
        return Err(io::Error::last_os_error());
    }
    PLACEHOLDER.store(placeholder, SeqCst);
    LISTENER.store(listener, SeqCst);
    set_drain_signals_blocked(true);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is valid; we fill in the handler, an empty mask and flags 0.
        let rc = unsafe {
            let mut sa: libc::sigaction = mem::zeroed();
            sa.sa_sigaction = on_drain_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_drain_signal(_sig: libc::c_int) {
    DRAIN.store(true, SeqCst);
    let (from, to) = (PLACEHOLDER.load(SeqCst), LISTENER.load(SeqCst));
    // SAFETY: dup2 is async-signal-safe (signal-safety(7)); both fds stay open for the life of
    // the process (only this handler ever replaces `to`). errno is saved and restored so the
    // interrupted code still sees its own error.
    unsafe {
        let errno = libc::__errno_location();
        let saved = *errno;
        libc::dup2(from, to);
        *errno = saved;
    }
}

fn set_drain_signals_blocked(block: bool) {
    let how = if block {
        libc::SIG_BLOCK
    } else {
        libc::SIG_UNBLOCK
    };
    // SAFETY: set is initialised by sigemptyset before use; pthread_sigmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(how, &set, ptr::null_mut());
    }
}

/// Returns the exit status: 0 after a drain signal, 1 if the listener itself broke.
fn accept_loop(listener: RawFd, pool: &Arc<Pool>) -> i32 {
    loop {
        if !pool.wait_for_room() || DRAIN.load(SeqCst) {
            return 0;
        }
        // SAFETY: plain syscall; null address pointers because we do not need the peer address.
        let fd = unsafe {
            libc::accept4(
                listener,
                ptr::null_mut(),
                ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 just returned fd and nothing else owns it.
            pool.dispatch(unsafe { OwnedFd::from_raw_fd(fd) });
            continue;
        }
        let err = io::Error::last_os_error();
        if DRAIN.load(SeqCst) {
            return 0; // EINTR, or EINVAL from the placeholder the handler put in place
        }
        match err.raw_os_error().unwrap_or(0) {
            // Someone else set O_NONBLOCK on the shared socket; we must not clear it: wait instead.
            libc::EAGAIN => wait_readable(listener),
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                log!("accept: {err}; retrying");
                thread::sleep(Duration::from_millis(10));
            }
            libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EFAULT => {
                log!("accept failed: {err}; draining");
                DRAIN.store(true, SeqCst);
                return 1;
            }
            // EINTR, and (accept(2)) network errors that belong to the new connection.
            _ => {}
        }
    }
}

fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; poll only writes its revents. EINTR just returns.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// Handler threads and the connections waiting for one. `live` counts accepted connections not
/// yet closed, which bounds both concurrency and the number of threads.
struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
    room: Condvar,
    body: Vec<u8>,
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<OwnedFd>,
    idle: usize,
    live: usize,
    /// The acceptor sleeps on `room` (at the limit, or draining): only then is a wakeup needed.
    acceptor_waiting: bool,
}

impl Pool {
    fn new(body: Vec<u8>) -> Pool {
        Pool {
            state: Mutex::default(),
            work: Condvar::new(),
            room: Condvar::new(),
            body,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks while MAX_CONNS are live; false if a drain started meanwhile.
    fn wait_for_room(&self) -> bool {
        let mut st = self.lock();
        while st.live >= MAX_CONNS {
            if DRAIN.load(SeqCst) {
                return false;
            }
            st.acceptor_waiting = true;
            st = self
                .room
                .wait_timeout(st, TICK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.acceptor_waiting = false;
        true
    }

    fn dispatch(self: &Arc<Self>, conn: OwnedFd) {
        let mut st = self.lock();
        st.live += 1;
        st.queue.push_back(conn);
        if st.idle >= st.queue.len() {
            self.work.notify_one();
            return;
        }
        drop(st);
        if let Err(e) = self.spawn_handler() {
            log!("cannot start a handler thread: {e}; dropping a connection");
            let mut st = self.lock();
            if st.queue.pop_back().is_some() {
                st.live -= 1;
            }
        }
    }

    fn spawn_handler(self: &Arc<Self>) -> io::Result<()> {
        let pool = Arc::clone(self);
        // A new thread inherits the creator's mask: block around the spawn so the drain signal
        // can never be delivered to a handler thread, not even before its first instruction.
        set_drain_signals_blocked(true);
        let spawned = thread::Builder::new()
            .name("conn".into())
            .stack_size(HANDLER_STACK)
            .spawn(move || pool.handler_thread());
        set_drain_signals_blocked(false);
        spawned.map(drop)
    }

    fn handler_thread(&self) {
        let mut conn = self.next_conn(false);
        loop {
            serve(conn, &self.body);
            conn = self.next_conn(true);
        }
    }

    /// Waits for a queued connection; `finished` says one was just closed (one lock for both).
    fn next_conn(&self, finished: bool) -> OwnedFd {
        let mut st = self.lock();
        if finished {
            st.live -= 1;
            if st.acceptor_waiting {
                self.room.notify_one();
            }
        }
        st.idle += 1;
        loop {
            if let Some(conn) = st.queue.pop_front() {
                st.idle -= 1;
                return conn;
            }
            st = self.work.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn wait_idle(&self) {
        let mut st = self.lock();
        while st.live > 0 {
            st.acceptor_waiting = true;
            st = self.room.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Speaks `sd_notify(3)` to NOTIFY_SOCKET: an absolute path or `@abstract`.
struct Notifier {
    sock: UnixDatagram,
    addr: UnixAddr,
}

impl Notifier {
    fn from_env() -> Option<Notifier> {
        let target = env::var_os("NOTIFY_SOCKET")?;
        let bytes = target.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => UnixAddr::from_abstract_name(&bytes[1..]),
            Some(b'/') => UnixAddr::from_pathname(&target),
            _ => {
                log!("NOTIFY_SOCKET={target:?}: not a path or @abstract name; not notifying");
                return None;
            }
        };
        match (addr, UnixDatagram::unbound()) {
            (Ok(addr), Ok(sock)) => Some(Notifier { sock, addr }),
            (Err(e), _) | (_, Err(e)) => {
                log!("NOTIFY_SOCKET={target:?}: {e}; not notifying");
                None
            }
        }
    }

    fn send(&self, msg: &str) {
        if let Err(e) = self.sock.send_to_addr(msg.as_bytes(), &self.addr) {
            log!("sd_notify {msg:?}: {e}");
        }
    }
}

/// WATCHDOG=1 every half WATCHDOG_USEC, as `sd_watchdog_enabled(3)` advises.
fn start_watchdog(notifier: Arc<Notifier>) {
    let Some(usec) = env_u64("WATCHDOG_USEC").filter(|&u| u > 0) else {
        return;
    };
    if let Ok(pid) = env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(process::id()) {
            return; // meant for another process (sd_watchdog_enabled(3))
        }
    }
    if env::var("DEMO_NO_WATCHDOG").as_deref() == Ok("1") {
        return; // tests: a worker that stops pinging
    }
    let every = Duration::from_micros(usec / 2);
    let spawned = thread::Builder::new()
        .name("watchdog".into())
        .stack_size(HANDLER_STACK)
        .spawn(move || loop {
            notifier.send("WATCHDOG=1");
            thread::sleep(every);
        });
    if let Err(e) = spawned {
        log!("cannot start the watchdog thread: {e}");
    }
}

/// `DEMO_LEAK_KB=N`: every `GET /` keeps N KiB more, touched and never freed — the leaking
/// worker of the recycling tests and benchmark (`--max-memory`).
fn leak() {
    static LEAK_KB: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let kb = *LEAK_KB.get_or_init(|| env_u64("DEMO_LEAK_KB").unwrap_or(0) as usize);
    if kb > 0 {
        // Non-zero bytes, so that every page is really there (not the shared zero page).
        mem::forget(vec![1u8; kb.saturating_mul(1024)]);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = env::var(name).ok()?;
    let parsed = value.trim().parse().ok();
    if parsed.is_none() {
        log!("{name}={value:?} is not a number; ignored");
    }
    parsed
}

/// What a request asks for, decided while parsing so nothing borrows the read buffer.
#[derive(Debug, PartialEq)]
enum Route {
    Root,
    Sleep(u64),
    Health,
    Crash,
    BadSleep,
    WrongMethod,
    NotFound,
}

#[derive(Debug)]
struct Request {
    route: Route,
    head_only: bool,
    http10: bool,
    keep_alive: bool,
    content_length: u64,
    expect_continue: bool,
}

#[derive(Default)]
struct Headers {
    content_length: Option<u64>,
    transfer_encoding: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parses a complete request head; Err is the status to answer before closing.
fn parse_head(head: &[u8]) -> Result<Request, u16> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut parts = lines.next().unwrap_or_default().split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(400);
    };
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        v if v.starts_with(b"HTTP/") => return Err(505),
        _ => return Err(400),
    };
    let target = std::str::from_utf8(target).map_err(|_| 400u16)?;
    if method.is_empty() || target.is_empty() {
        return Err(400);
    }
    let h = parse_headers(lines)?;
    if h.transfer_encoding {
        return Err(501); // no chunked decoding: we could not find where the body ends
    }
    let content_length = h.content_length.unwrap_or(0);
    if content_length > BODY_LIMIT {
        return Err(413);
    }
    Ok(Request {
        route: route(method, target),
        head_only: method == b"HEAD",
        http10,
        keep_alive: !h.close && (!http10 || h.keep_alive),
        content_length,
        expect_continue: h.expect_continue,
    })
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<Headers, u16> {
    let mut h = Headers::default();
    for line in lines.filter(|l| !l.is_empty()) {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            return Err(400); // obsolete line folding (RFC 9112 section 5.2)
        }
        let colon = line.iter().position(|&b| b == b':').ok_or(400u16)?;
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.is_empty() || name.iter().any(u8::is_ascii_whitespace) {
            return Err(400);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(400u16)?;
            if h.content_length.is_some_and(|old| old != n) {
                return Err(400); // conflicting lengths: request smuggling territory
            }
            h.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            h.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                h.close |= token.eq_ignore_ascii_case(b"close");
                h.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            h.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    Ok(h)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

fn route(method: &[u8], target: &str) -> Route {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let crash = path == "/crash" && CRASH_ROUTE.load(SeqCst);
    if !matches!(path, "/" | "/health" | "/sleep") && !crash {
        return Route::NotFound;
    }
    if method != b"GET" && method != b"HEAD" {
        return Route::WrongMethod;
    }
    match path {
        "/" => Route::Root,
        "/health" => Route::Health,
        "/crash" => Route::Crash,
        _ => query
            .split('&')
            .find_map(|kv| kv.strip_prefix("ms="))
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(Route::BadSleep, |ms| Route::Sleep(ms.min(SLEEP_CAP_MS))),
    }
}

/// Serves one connection until the client closes, an error, or the drain.
fn serve(fd: OwnedFd, body: &[u8]) {
    let mut conn = Conn::new(fd);
    let mut out = Vec::with_capacity(256);
    loop {
        let head_len = match conn.read_head() {
            Ok(n) => n,
            Err(Some(status)) => return conn.reject(status),
            Err(None) => return,
        };
        let parsed = parse_head(&conn.buf[..head_len]);
        conn.consume(head_len);
        let req = match parsed {
            Ok(req) => req,
            Err(status) => return conn.reject(status),
        };
        // Without this, curl waits a second before it sends a body (RFC 9110 section 10.1.1).
        if req.expect_continue
            && req.content_length > 0
            && conn.send_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
        {
            return;
        }
        if !conn.discard_body(req.content_length) || !respond(&conn, &req, body, &mut out) {
            return;
        }
    }
}

/// Answers a parsed request; false when the connection must now close.
fn respond(conn: &Conn, req: &Request, body: &[u8], out: &mut Vec<u8>) -> bool {
    let (status, payload): (u16, &[u8]) = match req.route {
        Route::Root => {
            leak();
            (200, body)
        }
        Route::Sleep(ms) => {
            thread::sleep(Duration::from_millis(ms)); // a drain lets this finish
            (200, body)
        }
        Route::Health => (200, b"ok\n"),
        Route::Crash => process::exit(3),
        Route::BadSleep => (400, b"want /sleep?ms=N\n"),
        Route::WrongMethod => (405, b"method not allowed\n"),
        Route::NotFound => (404, b"not found\n"),
    };
    // Read the flag after the work: a request in flight when the drain began closes its connection.
    let keep_alive = req.keep_alive && !DRAIN.load(SeqCst);
    out.clear();
    write_head(out, status, payload.len(), keep_alive, req.http10);
    if !req.head_only {
        out.extend_from_slice(payload);
    }
    conn.send_all(out).is_ok() && keep_alive
}

fn write_head(out: &mut Vec<u8>, status: u16, len: usize, keep_alive: bool, http10: bool) {
    let _ = write!(out, "HTTP/1.1 {status} {}\r\nDate: ", reason(status));
    http_date(out);
    let _ = write!(
        out,
        "\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n"
    );
    if status == 405 {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends an IMF-fixdate (RFC 9110 section 5.6.7), formatted at most once a second per thread.
fn http_date(out: &mut Vec<u8>) {
    thread_local!(static CACHE: RefCell<(u64, String)> = RefCell::default());
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = format_http_date(secs);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

fn format_http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, t) = (secs / 86_400, secs % 86_400);
    // civil_from_days from Howard Hinnant's "chrono-Compatible Low-Level Date Algorithms".
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// One client connection and its read buffer (which also holds pipelined requests).
struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
    filled: usize,
}

enum Recv {
    Data(usize),
    Timeout,
    Closed,
}

impl Conn {
    fn new(fd: OwnedFd) -> Conn {
        let raw = fd.as_raw_fd();
        let timeval = |d: Duration| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        };
        // Best effort: on a unix socket TCP_NODELAY fails, which is fine.
        let _ = setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeval(TICK));
        let _ = setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &timeval(SEND_TIMEOUT),
        );
        let _ = setsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &1 as &libc::c_int,
        );
        Conn {
            fd,
            buf: vec![0; HEAD_LIMIT],
            filled: 0,
        }
    }

    /// Reads into buf[from..to]; the range must not be empty (0 means EOF).
    fn recv(&mut self, from: usize, to: usize) -> Recv {
        let dst = &mut self.buf[from..to];
        loop {
            // SAFETY: dst is a live, writable buffer of dst.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len(), 0) };
            match n {
                0 => return Recv::Closed,
                n if n > 0 => return Recv::Data(n as usize),
                _ => match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Recv::Timeout, // SO_RCVTIMEO tick
                    _ => return Recv::Closed,
                },
            }
        }
    }

    /// Reads until buf holds a full head; returns its length. Err(Some(status)) to reject,
    /// Err(None) to close quietly (client gone, or idle while draining).
    fn read_head(&mut self) -> Result<usize, Option<u16>> {
        let (mut scanned, mut stalled) = (0, 0);
        loop {
            // RFC 9112 section 2.2: ignore empty lines before a request line.
            let blank = self.buf[..self.filled]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 {
                self.consume(blank);
                scanned = 0;
            }
            if let Some(end) = find_head_end(&self.buf[..self.filled], scanned) {
                return Ok(end);
            }
            scanned = self.filled.saturating_sub(2);
            if self.filled == HEAD_LIMIT {
                return Err(Some(431));
            }
            match self.recv(self.filled, HEAD_LIMIT) {
                Recv::Data(n) => (self.filled, stalled) = (self.filled + n, 0),
                Recv::Timeout if keep_waiting(self.filled > 0, &mut stalled) => {}
                Recv::Timeout | Recv::Closed => return Err(None),
            }
        }
    }

    /// Reads and drops a Content-Length body; false if the connection is done for.
    fn discard_body(&mut self, len: u64) -> bool {
        let buffered = (self.filled as u64).min(len) as usize;
        self.consume(buffered);
        let (mut left, mut stalled) = (len - buffered as u64, 0);
        while left > 0 {
            // The buffer is empty here; never read past the body into the next request.
            match self.recv(0, left.min(HEAD_LIMIT as u64) as usize) {
                Recv::Data(n) => (left, stalled) = (left - n as u64, 0),
                Recv::Timeout if keep_waiting(true, &mut stalled) => {}
                Recv::Timeout | Recv::Closed => return false,
            }
        }
        true
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    fn send_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            // SAFETY: data is a live buffer of data.len() bytes. MSG_NOSIGNAL: a vanished client
            // must give EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            } else {
                data = &data[n as usize..];
            }
        }
        Ok(())
    }

    /// Answers a request we cannot parse or serve, then closes without destroying the answer.
    fn reject(mut self, status: u16) {
        let mut out = Vec::new();
        let text = format!("{}\n", reason(status));
        write_head(&mut out, status, text.len(), false, false);
        out.extend_from_slice(text.as_bytes());
        if self.send_all(&out).is_err() {
            return;
        }
        // Closing with unread input makes the kernel send RST, which can destroy the response
        // before the client reads it (RFC 9112 section 9.6): half-close, then drain for a bit.
        // SAFETY: shuts down writing on this client connection only, never the listener.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_WR) };
        let deadline = Instant::now() + LINGER;
        while Instant::now() < deadline {
            if let Recv::Closed = self.recv(0, HEAD_LIMIT) {
                break;
            }
        }
    }
}

/// After a receive tick with no data: keep waiting unless we are draining and the client is
/// idle between requests, or has stalled mid-request for DRAIN_STALL_TICKS.
fn keep_waiting(mid_request: bool, stalled: &mut u32) -> bool {
    if !DRAIN.load(SeqCst) {
        return true;
    }
    *stalled += 1;
    mid_request && *stalled < DRAIN_STALL_TICKS
}

/// Index just past the blank line that ends a head; accepts bare LF line ends too.
/// `from` lets a caller skip bytes it already scanned.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let nl = i + off;
        match (buf.get(nl + 1), buf.get(nl + 2)) {
            (Some(b'\n'), _) => return Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_accepts_crlf_and_lf_and_resumes() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest", 0),
            Some(24)
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\nrest", 0), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n", 0), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n", 15), Some(18));
    }

    #[test]
    fn routes_and_keep_alive() {
        let r = parse_head(b"GET /sleep?x=1&ms=700000 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(r.route, Route::Sleep(SLEEP_CAP_MS));
        assert!(r.keep_alive && !r.http10);
        let r = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!r.keep_alive);
        let r = parse_head(b"HEAD /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(r.keep_alive && r.head_only && r.route == Route::Health);
        let r = parse_head(b"GET / HTTP/1.1\r\nconnection: foo, close\r\n\r\n").unwrap();
        assert!(!r.keep_alive);
        assert_eq!(
            parse_head(b"POST / HTTP/1.1\r\n\r\n").unwrap().route,
            Route::WrongMethod
        );
        assert_eq!(
            parse_head(b"GET /nope HTTP/1.1\r\n\r\n").unwrap().route,
            Route::NotFound
        );
        assert_eq!(
            parse_head(b"GET /sleep?ms=x HTTP/1.1\r\n\r\n")
                .unwrap()
                .route,
            Route::BadSleep
        );
    }

    #[test]
    fn bad_heads_get_a_status() {
        let status = |h: &[u8]| parse_head(h).unwrap_err();
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status(b"GET \xff HTTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn http_dates() {
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            format_http_date(951_782_400),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }
}
