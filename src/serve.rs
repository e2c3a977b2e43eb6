//! The one accept loop behind `--health` and `--control`: it owns a listening socket and the
//! tasks of its live connections, and nothing else. It accepts *always* — a permit is never
//! awaited before `accept(2)`, so a client cannot keep the next one waiting in the kernel's
//! backlog — and keeps at most [`Bounds::connections`] connections alive: one more evicts the
//! oldest connection that has not yet delivered a complete request (a slowloris or an idle
//! one), or the oldest of all when every one has. So a probe is never locked out: it is the
//! newest connection, delivers its request in one packet, and from then on is evicted last.
//! Accept errors that retrying at once cannot fix (EMFILE, ENFILE, ENOBUFS, ENOMEM, or one we
//! do not know) pause the loop on the [`Backoff`] schedule and are logged once per episode.
//!
//! It must never read or answer a request (that is the handler's, and every answer is composed
//! by the event loop), never block the runtime, and never retry a failed accept without a
//! pause: a full fd table must not cost a core.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

/// The first pause after an accept error that retrying at once cannot fix.
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause: well under the kubelet's default 1 s probe timeout, so that a probe
/// waiting in the backlog when descriptors come back is still answered in time, and at four
/// failed `accept(2)` calls a second the wait costs no measurable CPU.
pub const BACKOFF_MAX: Duration = Duration::from_millis(250);
/// Accept failures less than this apart are one episode, logged once: four times the longest
/// pause, so that a table that stays full never looks like a new episode.
pub const EPISODE_GAP: Duration = Duration::from_secs(1);

/// A listening socket the loop can accept from: TCP (`--health`) or unix (`--control`).
pub trait Listener: Send + Sync + 'static {
    /// An accepted connection with its peer address.
    type Conn: Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Listener for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio::net::TcpListener::poll_accept(self, cx)
    }
}

impl Listener for tokio::net::UnixListener {
    type Conn = (tokio::net::UnixStream, tokio::net::unix::SocketAddr);
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio::net::UnixListener::poll_accept(self, cx)
    }
}

/// What one listener's connections may cost.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// What is served, for the logs: `health`, `control`.
    pub what: &'static str,
    /// Live connections at most; accepting one more evicts one (see the module doc).
    pub connections: usize,
    /// Each connection's whole life, accept to close; `None` when the handler keeps its own
    /// deadlines (the control socket: `reload --wait` may wait for as long as a reload takes).
    pub deadline: Option<Duration>,
}

/// Handed to each connection's handler, which calls [`Delivered::mark`] once the complete
/// request is in: from then on the connection is evicted only when every other one has
/// delivered too.
pub struct Delivered(Option<oneshot::Sender<()>>);

impl Delivered {
    pub fn mark(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// The pause schedule after accept errors that retrying at once cannot fix: [`BACKOFF_MIN`],
/// doubling up to [`BACKOFF_MAX`]; back to the start once an accept succeeds. And the episode,
/// for the logs: failures less than [`EPISODE_GAP`] apart, logged once when it starts and once
/// when it is over. When descriptors are scarce a success is often followed by the next
/// failure at once (the connection just accepted holds the descriptor just freed): that is
/// one episode, not one per connection.
#[derive(Debug, Default)]
pub struct Backoff {
    /// Failures since the last success: where the schedule stands.
    failures: u32,
    /// Failures in the current episode.
    episode: u32,
    /// The current episode's last failure (`None`: no episode under way).
    last_failure: Option<Instant>,
}

impl Backoff {
    /// One more failure at `now`: how long to pause before the next `accept(2)`, and whether
    /// it starts an episode (log it).
    pub fn failed(&mut self, now: Instant) -> (Duration, bool) {
        let pause = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        let starts = self
            .last_failure
            .is_none_or(|t| now.saturating_duration_since(t) >= EPISODE_GAP);
        if starts {
            self.episode = 0;
        }
        self.episode = self.episode.saturating_add(1);
        self.last_failure = Some(now);
        (pause, starts)
    }

    /// An accept succeeded at `now`: the schedule starts over. `Some(failures)` when this ends
    /// an episode (log it): its last failure is [`EPISODE_GAP`] ago.
    pub fn succeeded(&mut self, now: Instant) -> Option<u32> {
        self.failures = 0;
        let last = self.last_failure?;
        if now.saturating_duration_since(last) < EPISODE_GAP {
            return None;
        }
        self.last_failure = None;
        Some(std::mem::take(&mut self.episode))
    }
}

/// Whether an accept error concerns only the connection being accepted, so that the next
/// `accept(2)` can go at once. accept(2): Linux passes pending network errors on the new socket
/// as accept's own error, and "should treat them like EAGAIN by retrying". Everything else —
/// EMFILE, ENFILE, ENOBUFS, ENOMEM, and any error we do not know — is not cured by retrying.
pub fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::EOPNOTSUPP
                | libc::ETIMEDOUT
        )
    ) || e.kind() == io::ErrorKind::Interrupted
}

/// One live connection: its task and whether it has delivered its request yet.
struct Live {
    task: AbortHandle,
    delivered: oneshot::Receiver<()>,
}

impl Live {
    /// Still waiting for its request (a dropped marker counts as delivered: the task is done
    /// reading).
    fn waiting(&mut self) -> bool {
        matches!(self.delivered.try_recv(), Err(TryRecvError::Empty))
    }
}

/// Which connection to evict, given whether each (in accept order) still waits for its request:
/// the oldest waiting one, else the oldest.
pub fn victim(waiting: impl IntoIterator<Item = bool>) -> Option<usize> {
    let mut any = false;
    for (i, w) in waiting.into_iter().enumerate() {
        if w {
            return Some(i);
        }
        any = true;
    }
    any.then_some(0)
}

/// The live connections in accept order, and the current eviction episode.
struct Table {
    bounds: Bounds,
    live: VecDeque<Live>,
    /// Evictions since the table was last below half its bound.
    evicted: u64,
}

impl Table {
    /// Forgets finished connections; ends an eviction episode once the pressure is off.
    fn prune(&mut self) {
        self.live.retain(|l| !l.task.is_finished());
        if self.evicted > 0 && self.live.len() < self.bounds.connections / 2 {
            info!(
                "{}: connection pressure over ({} connections evicted)",
                self.bounds.what, self.evicted
            );
            self.evicted = 0;
        }
    }

    /// Makes room for one more connection, evicting one if the bound is reached.
    fn make_room(&mut self) {
        self.prune();
        if self.live.len() < self.bounds.connections {
            return;
        }
        let Some(i) = victim(self.live.iter_mut().map(Live::waiting)) else {
            return;
        };
        if let Some(l) = self.live.remove(i) {
            l.task.abort();
        }
        if self.evicted == 0 {
            warn!(
                "{}: {} connections open; evicting the oldest that has not sent its request (logged once until the pressure is over)",
                self.bounds.what, self.bounds.connections
            );
        }
        self.evicted += 1;
    }
}

/// Accepts connections until the task is dropped (which aborts the live ones too), running
/// `handler` for each in its own task within `bounds`.
pub async fn accept_loop<L, H, F>(listener: L, bounds: Bounds, mut handler: H)
where
    L: Listener,
    H: FnMut(L::Conn, Delivered) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut table = Table {
        bounds,
        live: VecDeque::with_capacity(bounds.connections + 1),
        evicted: 0,
    };
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            r = poll_fn(|cx| listener.poll_accept(cx)) => r,
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!("{}: a connection task panicked: {e}", bounds.what);
                    }
                }
                table.prune();
                continue;
            }
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) if transient(&e) => {
                debug!("{}: accept failed: {e}", bounds.what);
                continue;
            }
            Err(e) => {
                let (pause, starts) = backoff.failed(Instant::now());
                if starts {
                    warn!(
                        "{}: cannot accept connections: {e}; retrying with a pause of up to {BACKOFF_MAX:?} (logged once until it works again)",
                        bounds.what
                    );
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if let Some(failures) = backoff.succeeded(Instant::now()) {
            info!(
                "{}: accepting connections again (after {failures} failed attempts)",
                bounds.what
            );
        }
        table.make_room();
        let (tx, delivered) = oneshot::channel();
        let work = handler(conn, Delivered(Some(tx)));
        let task = match bounds.deadline {
            Some(d) => tasks.spawn(async move {
                let _ = tokio::time::timeout(d, work).await;
            }),
            None => tasks.spawn(work),
        };
        table.live.push_back(Live { task, delivered });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[test]
    fn backoff_doubles_from_10ms_to_250ms_and_starts_over_after_a_success() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let ms = |b: &mut Backoff| b.failed(now).0.as_millis();
        let schedule: Vec<u128> = (0..8).map(|_| ms(&mut b)).collect();
        assert_eq!(schedule, [10, 20, 40, 80, 160, 250, 250, 250]);
        for _ in 0..100 {
            assert_eq!(ms(&mut b), 250, "capped, no overflow");
        }
        b.succeeded(now);
        assert_eq!(ms(&mut b), 10, "a success starts the schedule over");
        assert_eq!(ms(&mut b), 20);
    }

    #[test]
    fn an_episode_is_logged_once_however_often_it_flaps() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut b = Backoff::default();
        assert_eq!(b.succeeded(at(0)), None, "no episode");
        assert!(b.failed(at(0)).1, "the first failure starts an episode");
        assert!(!b.failed(at(10)).1);
        // Scarce descriptors: an accept works, the next one fails again; the same episode.
        for i in 1..=5 {
            assert_eq!(b.succeeded(at(100 * i)), None);
            assert!(!b.failed(at(100 * i + 1)).1, "still the same episode");
        }
        assert_eq!(b.succeeded(at(1000)), None, "too soon to say it is over");
        assert_eq!(b.succeeded(at(1501)), Some(7), "over: 7 failures");
        assert_eq!(b.succeeded(at(1600)), None);
        assert!(b.failed(at(1700)).1, "a new episode");
        // No success in between, but a long gap: a new episode too.
        assert!(b.failed(at(9000)).1);
    }

    #[test]
    fn only_per_connection_errors_are_retried_at_once() {
        let os = io::Error::from_raw_os_error;
        for e in [libc::ECONNABORTED, libc::EINTR, libc::EPROTO, libc::EPERM] {
            assert!(transient(&os(e)), "{e}");
        }
        for e in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
        ] {
            assert!(!transient(&os(e)), "{e}");
        }
    }

    #[test]
    fn the_victim_is_the_oldest_still_waiting_else_the_oldest() {
        assert_eq!(victim([]), None);
        assert_eq!(victim([false, true, true]), Some(1));
        assert_eq!(victim([true, false]), Some(0));
        assert_eq!(victim([false, false]), Some(0));
    }

    /// Whether the server closed `s` (EOF or reset) within a short wait.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[test]
    fn a_full_table_evicts_the_oldest_connection_that_has_not_delivered() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let bounds = Bounds {
                what: "test",
                connections: 2,
                deadline: None,
            };
            // A request is one byte; the handler then holds the connection.
            let server = tokio::spawn(accept_loop(
                listener,
                bounds,
                |(mut c, _), mut d| async move {
                    let mut b = [0u8; 1];
                    if c.read(&mut b).await.unwrap_or(0) == 1 {
                        d.mark();
                    }
                    std::future::pending::<()>().await;
                },
            ));
            let connect = || async {
                let s = TcpStream::connect(addr).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await; // accepted
                s
            };
            let mut delivered = connect().await;
            delivered.write_all(b"x").await.unwrap();
            let mut idle = connect().await;
            let mut third = connect().await;
            assert!(closed(&mut idle).await, "the idle one is evicted first");
            let mut fourth = connect().await;
            assert!(closed(&mut third).await, "then the next one still waiting");
            fourth.write_all(b"x").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _fifth = connect().await;
            assert!(
                closed(&mut delivered).await,
                "all delivered: the oldest goes"
            );
            assert!(!closed(&mut fourth).await, "the newer delivered one stays");
            server.abort();
        });
    }
}
