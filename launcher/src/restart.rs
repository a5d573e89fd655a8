//! When a dead device process is started again (DESIGN.md §4): after a backoff that starts at
//! a few milliseconds and doubles with each quick death, within a budget of restarts per time
//! window. Pure logic: the supervisor feeds it deaths and the clock.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The first backoff.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// The longest backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// A process that ran this long before dying starts the backoff over: only a device that
/// dies right after its start (a crash loop) backs off further; one killed while serving
/// comes back after [`FIRST_BACKOFF`].
pub const STABLE_AFTER: Duration = Duration::from_millis(250);
/// Restarts allowed per [`BUDGET_WINDOW`].
pub const BUDGET: usize = 30;
/// The window of the restart budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// What to do about a death.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Start the device again at this moment.
    RestartAt(Instant),
    /// The budget is spent: the device stays down and is marked failed.
    GiveUp,
}

/// The restart history of one device.
#[derive(Debug)]
pub struct RestartPolicy {
    budget: usize,
    window: Duration,
    /// When the current incarnation started.
    started: Instant,
    backoff: Duration,
    restarts: VecDeque<Instant>,
    failed: bool,
}

impl RestartPolicy {
    /// A device started at `now`, with the default budget.
    pub fn new(now: Instant) -> Self {
        Self::with_budget(now, BUDGET, BUDGET_WINDOW)
    }

    pub fn with_budget(now: Instant, budget: usize, window: Duration) -> Self {
        Self {
            budget,
            window,
            started: now,
            backoff: FIRST_BACKOFF,
            restarts: VecDeque::new(),
            failed: false,
        }
    }

    /// The device died at `now`.
    pub fn died(&mut self, now: Instant) -> Decision {
        if self.failed {
            return Decision::GiveUp;
        }
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.duration_since(t) > self.window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() >= self.budget {
            self.failed = true;
            return Decision::GiveUp;
        }
        if now.duration_since(self.started) >= STABLE_AFTER {
            self.backoff = FIRST_BACKOFF;
        }
        let at = now + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.restarts.push_back(at);
        Decision::RestartAt(at)
    }

    /// The device was started again at `now`.
    pub fn restarted(&mut self, now: Instant) {
        self.started = now;
    }

    /// Restarts within the current window.
    pub fn count(&self) -> usize {
        self.restarts.len()
    }

    /// Whether the budget ran out.
    #[cfg(test)]
    pub fn is_failed(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_for_quick_deaths_and_is_capped() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::with_budget(t0, 100, Duration::from_secs(3600));
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let Decision::RestartAt(at) = p.died(now) else {
                panic!("gave up")
            };
            waits.push(at - now);
            now = at;
            p.restarted(now);
        }
        assert_eq!(waits[0], Duration::from_millis(5));
        assert_eq!(waits[1], Duration::from_millis(10));
        assert_eq!(waits[2], Duration::from_millis(20));
        assert_eq!(*waits.last().unwrap(), MAX_BACKOFF);
    }

    #[test]
    fn a_stable_process_starts_the_backoff_over() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::new(t0);
        p.died(t0);
        p.died(t0);
        let later = t0 + STABLE_AFTER + Duration::from_secs(1);
        p.restarted(t0);
        assert_eq!(p.died(later), Decision::RestartAt(later + FIRST_BACKOFF));
    }

    #[test]
    fn budget_per_window_then_failed_for_good() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::with_budget(t0, 3, Duration::from_secs(60));
        for i in 0..3 {
            assert!(matches!(
                p.died(t0 + Duration::from_secs(i)),
                Decision::RestartAt(_)
            ));
        }
        assert_eq!(p.count(), 3);
        // Restarts older than the window no longer count...
        assert!(matches!(
            RestartPolicy::with_budget(t0, 1, Duration::from_secs(1)).died(t0),
            Decision::RestartAt(_)
        ));
        let mut q = RestartPolicy::with_budget(t0, 1, Duration::from_secs(1));
        q.died(t0);
        assert!(matches!(
            q.died(t0 + Duration::from_secs(5)),
            Decision::RestartAt(_)
        ));
        // ...but inside it the fourth death is one too many, and failed stays failed.
        assert_eq!(p.died(t0 + Duration::from_secs(4)), Decision::GiveUp);
        assert!(p.is_failed());
        assert_eq!(p.died(t0 + Duration::from_secs(3600)), Decision::GiveUp);
    }
}
