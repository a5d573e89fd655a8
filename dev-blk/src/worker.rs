//! One queue's request loop: pop every available chain, execute it, publish it as used, and
//! tell the caller whether the driver wants an interrupt. No sockets, no syscalls.
//!
//! # In-order completion (an invariant others depend on)
//!
//! Each queue is served by exactly one thread, and that thread completes the chains of its
//! queue **in the order it popped them, synchronously**: a chain is executed and added to the
//! used ring before the next one is popped. The used index is therefore a contiguous
//! completion boundary: every chain before `used.idx` is complete and none after it has been
//! reported. vmm-core's crash recovery relies on this: after a backend crash it restarts the
//! ring from the guest's `used.idx` (`SET_VRING_BASE(used_idx)`) and replays the rest, which is
//! only correct if no later chain was completed before an earlier one. Do not add
//! asynchronous or out-of-order completion here without also implementing `INFLIGHT_SHMFD`.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tracing::warn;
use virtio_queue::{Queue, QueueT};

use crate::request::{Disk, GuestRam, RequestHandler};

/// Errors of the ring itself (not of individual requests, which complete with a status).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("queue {queue}: cannot update notification state: {source}")]
    Notification {
        queue: u16,
        source: virtio_queue::Error,
    },
}

/// Lets `burst` lines through per `window`, and counts the ones it holds back.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(n)` when a line may be logged at `now`, `n` being how many lines were
    /// suppressed since the last one allowed; `None` when this line must be dropped.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = match self.window_start {
            None => true,
            Some(start) => now.saturating_duration_since(start) >= self.window,
        };
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Counters of one queue, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub completed: u64,
    pub failed: u64,
    pub notifications: u64,
}

/// The state of one queue's worker: request parser, disk handle, log limiter.
#[derive(Debug)]
pub struct QueueWorker<D> {
    index: u16,
    handler: RequestHandler,
    disk: D,
    limiter: LogLimiter,
    stats: QueueStats,
}

impl<D: Disk> QueueWorker<D> {
    pub fn new(index: u16, handler: RequestHandler, disk: D) -> Self {
        Self {
            index,
            handler,
            disk,
            limiter: LogLimiter::new(10, Duration::from_secs(5)),
            stats: QueueStats::default(),
        }
    }

    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// Processes every available chain in order and returns whether the driver must be
    /// notified (one notification per batch, honouring EVENT_IDX / NO_INTERRUPT).
    ///
    /// Driver notifications (kicks) are suppressed while the batch runs and re-enabled at the
    /// end, re-checking the ring to close the race with a driver that added chains meanwhile.
    pub fn process(&mut self, queue: &mut Queue, mem: &GuestRam) -> Result<bool, WorkerError> {
        let mut completed_any = false;
        loop {
            queue
                .disable_notification(mem)
                .map_err(|source| self.ring_error(source))?;
            let mut popped = 0u32;
            // `pop_descriptor_chain` returns `None` both when the ring is empty and when it is
            // unusable (not ready, or an available index more than a queue size ahead).
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                let outcome = self.handler.handle(mem, chain, &mut self.disk);
                if let Some(err) = &outcome.error {
                    self.stats.failed += 1;
                    if let Some(suppressed) = self.limiter.allow(Instant::now()) {
                        warn!(
                            queue = self.index,
                            head,
                            status = ?outcome.status,
                            suppressed,
                            "request failed: {err}"
                        );
                    }
                }
                // In order: this chain is published before the next one is popped.
                match queue.add_used(mem, head, outcome.used_len) {
                    Ok(()) => {
                        completed_any = true;
                        self.stats.completed += 1;
                    }
                    Err(e) => {
                        if let Some(suppressed) = self.limiter.allow(Instant::now()) {
                            warn!(
                                queue = self.index,
                                head, suppressed, "cannot complete chain: {e}"
                            );
                        }
                    }
                }
            }
            let more = queue
                .enable_notification(mem)
                .map_err(|source| self.ring_error(source))?;
            if !more {
                break;
            }
            if popped == 0 {
                // The ring claims entries we cannot pop: a bogus available index or a queue
                // that is not ready. Stop instead of spinning; the next kick retries.
                if let Some(suppressed) = self.limiter.allow(Instant::now()) {
                    warn!(
                        queue = self.index,
                        next_avail = queue.next_avail(),
                        suppressed,
                        "available ring is unusable; waiting for the next kick"
                    );
                }
                break;
            }
        }
        if !completed_any {
            return Ok(false);
        }
        let notify = queue
            .needs_notification(mem)
            .map_err(|source| self.ring_error(source))?;
        if notify {
            self.stats.notifications += 1;
        }
        Ok(notify)
    }

    fn ring_error(&self, source: virtio_queue::Error) -> WorkerError {
        WorkerError::Notification {
            queue: self.index,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_allows_a_burst_per_window_and_counts_the_rest() {
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(500)), None);
        assert_eq!(l.allow(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(l.allow(t0 + Duration::from_millis(1001)), Some(0));
        assert_eq!(l.allow(t0 + Duration::from_millis(1002)), None);
    }
}
