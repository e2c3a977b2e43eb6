//! Signals are data: each one herder handles has a name here and turns into a [`Request`] for
//! the pool (or, for SIGCHLD, a call to the reaper). Handlers are registered through tokio
//! before the first worker starts; the kernel-fault signals (SEGV, BUS, FPE, ILL) are never
//! blocked or handled.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

use crate::pool::Request;

/// What a signal means to herder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    Request(Request),
    ChildExited,
}

/// The signals herder listens for, and what each means.
pub const HANDLED: &[(Signal, Meaning)] = &[
    (Signal::SIGTERM, Meaning::Request(Request::Stop)),
    (Signal::SIGINT, Meaning::Request(Request::Stop)),
    (Signal::SIGQUIT, Meaning::Request(Request::ForceStop)),
    (Signal::SIGHUP, Meaning::Request(Request::Reload)),
    (Signal::SIGTTIN, Meaning::Request(Request::ScaleUp)),
    (Signal::SIGTTOU, Meaning::Request(Request::ScaleDown)),
    (
        Signal::SIGUSR1,
        Meaning::Request(Request::Forward(Signal::SIGUSR1)),
    ),
    (
        Signal::SIGUSR2,
        Meaning::Request(Request::Forward(Signal::SIGUSR2)),
    ),
    (Signal::SIGCHLD, Meaning::ChildExited),
];

/// One registered stream per handled signal, in the order of [`HANDLED`].
pub struct Signals {
    streams: Vec<(Signal, Meaning, Stream)>,
}

impl Signals {
    /// Registers every handler. Must run inside the runtime, before any worker is spawned.
    pub fn register() -> std::io::Result<Signals> {
        let mut streams = Vec::with_capacity(HANDLED.len());
        for &(sig, meaning) in HANDLED {
            streams.push((sig, meaning, signal(SignalKind::from_raw(sig as i32))?));
        }
        Ok(Signals { streams })
    }

    /// The next signal that arrives (any of them; no ordering among simultaneous ones).
    pub async fn recv(&mut self) -> (Signal, Meaning) {
        let futures = self.streams.iter_mut().map(|(sig, meaning, stream)| {
            let (sig, meaning) = (*sig, *meaning);
            Box::pin(async move {
                stream.recv().await;
                (sig, meaning)
            })
        });
        futures_select(futures).await
    }
}

/// Waits for the first of several futures (a small `select_all`, to avoid a dependency for
/// one call).
async fn futures_select<F, T>(futures: impl Iterator<Item = std::pin::Pin<Box<F>>>) -> T
where
    F: std::future::Future<Output = T> + ?Sized,
{
    let mut futures: Vec<_> = futures.collect();
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// herder may have been started with signals blocked (the mask survives exec): unblock all, so
/// TERM and CHLD reach us. Called in `main` before any thread exists.
pub fn unblock_all() {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}
