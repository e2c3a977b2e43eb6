//! Restart throttling: the give-up rule (more than N restarts of one slot within a window)
//! and the per-slot delay before a restart — none after a worker that served, an exponential
//! backoff for a start-up crash loop. Pure arithmetic over the `Instant`s it is given; no
//! clock, no processes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// First restart delay of a failing slot.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The delay never grows past this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// A worker that lived this long was healthy: its slot's backoff starts over.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);
/// A worker that became ready and served this long was no start-up crash loop: when it dies
/// (OOM, kill -9) its replacement starts at once. One that keeps dying after serving a while
/// is the restart limit's business, not the backoff's.
pub const SERVED_AFTER: Duration = Duration::from_secs(1);

/// Whether a worker became ready and served for [`SERVED_AFTER`].
pub fn served(ready: Option<Instant>, now: Instant) -> bool {
    ready.is_some_and(|r| now.saturating_duration_since(r) >= SERVED_AFTER)
}

/// The delay before a slot's worker is replaced, and the slot's new count of consecutive
/// failed starts: none for a worker that served; the first step for one that lived
/// [`STABLE_AFTER`] without serving; the next step of the backoff otherwise.
pub fn restart_delay(
    failures: u32,
    spawned: Instant,
    ready: Option<Instant>,
    now: Instant,
) -> (u32, Duration) {
    if served(ready, now) {
        (0, Duration::ZERO)
    } else if now.saturating_duration_since(spawned) >= STABLE_AFTER {
        (1, backoff(1))
    } else {
        let failures = failures.saturating_add(1);
        (failures, backoff(failures))
    }
}

/// Counts restarts in a sliding window (`--restart-limit` within `--restart-window`).
#[derive(Debug, Clone)]
pub struct Throttle {
    limit: u32,
    window: Duration,
    restarts: VecDeque<Instant>,
}

impl Throttle {
    pub fn new(limit: u32, window: Duration) -> Self {
        Throttle {
            limit,
            window,
            restarts: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= self.window)
        {
            self.restarts.pop_front();
        }
    }

    /// Records one restart; `false` means the limit is exceeded: give up instead.
    pub fn allow(&mut self, now: Instant) -> bool {
        self.expire(now);
        self.restarts.push_back(now);
        self.restarts.len() <= self.limit as usize
    }

    /// When the restarts still remembered happened, oldest first (carried across an upgrade).
    pub fn history(&self) -> impl Iterator<Item = Instant> + '_ {
        self.restarts.iter().copied()
    }

    /// A throttle that remembers `history` (from [`Throttle::history`] of an earlier image).
    pub fn with_history(limit: u32, window: Duration, history: Vec<Instant>) -> Self {
        Throttle {
            limit,
            window,
            restarts: history.into(),
        }
    }

    /// Restarts within the window ending `now`.
    pub fn recent(&self, now: Instant) -> usize {
        self.restarts
            .iter()
            .filter(|&&t| now.saturating_duration_since(t) < self.window)
            .count()
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}

/// The delay before the `failures`-th consecutive restart of a slot (1-based):
/// 100 ms, 200 ms, 400 ms, … capped at 5 s.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    (BACKOFF_START * (1u32 << shift)).min(BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let ms: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(1000), BACKOFF_CAP);
        assert_eq!(backoff(0), BACKOFF_START);
    }

    #[test]
    fn more_than_limit_in_window_gives_up() {
        let t0 = Instant::now();
        let mut t = Throttle::new(3, Duration::from_secs(60));
        assert!(t.allow(t0));
        assert!(t.allow(t0 + Duration::from_secs(1)));
        assert!(t.allow(t0 + Duration::from_secs(2)));
        assert!(
            !t.allow(t0 + Duration::from_secs(3)),
            "the 4th restart within 60s exceeds 3"
        );
    }

    #[test]
    fn old_restarts_leave_the_window() {
        let t0 = Instant::now();
        let mut t = Throttle::new(2, Duration::from_secs(10));
        assert!(t.allow(t0));
        assert!(t.allow(t0 + Duration::from_secs(1)));
        // 11 s later the first two are out of the window.
        assert!(t.allow(t0 + Duration::from_secs(12)));
        assert_eq!(t.recent(t0 + Duration::from_secs(12)), 1);
    }

    #[test]
    fn a_worker_that_served_is_replaced_at_once_a_crash_loop_backs_off() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Ready at once, died 999 ms later: a crash loop step.
        assert_eq!(
            restart_delay(2, t0, Some(t0), t0 + Duration::from_millis(999)),
            (3, Duration::from_millis(400))
        );
        // Served a second: no delay, and the backoff starts over.
        assert_eq!(
            restart_delay(5, t0, Some(t0), t0 + s(1)),
            (0, Duration::ZERO)
        );
        // Never ready but lived 10 s: the first step again.
        assert_eq!(
            restart_delay(5, t0, None, t0 + STABLE_AFTER),
            (1, BACKOFF_START)
        );
        assert_eq!(restart_delay(u32::MAX, t0, None, t0).1, BACKOFF_CAP);
    }

    #[test]
    fn limit_zero_gives_up_at_the_first_restart() {
        let mut t = Throttle::new(0, Duration::from_secs(60));
        assert!(!t.allow(Instant::now()));
    }
}
