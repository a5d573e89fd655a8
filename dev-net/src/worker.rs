//! One queue pair's receive and transmit loops. No sockets, no syscalls: the tap is a [`Tap`]
//! and the ring a [`QueueRing`].
//!
//! # In-order completion (an invariant others depend on)
//!
//! Each pair is served by exactly one thread, and that thread completes the chains of each of
//! its two queues **in ring order, synchronously**: a transmit chain is written to the tap and
//! added to the used ring before the next one is popped; receive buffers are used in the order
//! they were posted (see [`crate::rx`]). `used.idx` is therefore a contiguous completion
//! boundary, which vmm-core's crash recovery relies on: after a backend crash it restarts each
//! ring at the guest's `used.idx` (`SET_VRING_BASE(used_idx)`) and replays the rest. A frame
//! transmitted just before a crash may be sent twice; receive buffers are simply used again.
//!
//! # Receive flow control
//!
//! Frames are read from the tap only while the guest has buffers. When it has none,
//! [`PairWorker::process_rx`] keeps the frame it holds, asks the guest for a kick when it posts
//! buffers, and returns [`RxState::Paused`]: the caller stops polling the tap until the receive
//! queue is kicked. Nothing is dropped and nothing spins.

#![forbid(unsafe_code)]

use std::io;

use tracing::{debug, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryBackend, VolatileSlice};

use crate::GuestRam;
use crate::chain::{Direction, Segment, collect};
use crate::config::{self, has};
use crate::header::{MAX_HEADER_LEN, NetHeader};
use crate::rx::{self, BadBuffer, Placement};
use crate::stats::{DropKind, PairStats, QueueStats};

/// Largest transmitted frame (after the virtio-net header): a 64 KiB TSO frame plus its
/// Ethernet header and a VLAN tag, as QEMU allows.
pub const MAX_TX_FRAME: usize = 65550;
/// Size of the receive bounce buffer: the header plus the largest frame the tap hands over
/// (a 64 KiB GSO frame, its Ethernet header and a VLAN tag).
pub const RX_BUFFER: usize = MAX_HEADER_LEN + 65536 + 14 + 4;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Frames received per call before the transmit queue gets a turn.
pub const RX_BUDGET: usize = 256;

/// One tap queue, as the worker uses it.
pub trait Tap {
    /// Reads one frame (virtio-net header first) into `buf` and returns its full length, which
    /// is larger than `buf` when the frame did not fit (the rest is lost). Fails with
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame: `header`, then `frame` gathered from guest memory.
    fn write(&mut self, header: &[u8], frame: &[VolatileSlice<'_, ()>]) -> io::Result<usize>;
}

/// The ring a worker serves and the way to interrupt its driver; the worker holds it for a
/// whole batch, so an implementation can lend both out of one lock guard.
pub trait QueueRing {
    /// The queue may be used: it is ready (started) and enabled.
    fn active(&mut self) -> bool;
    fn queue(&mut self) -> &mut Queue;
    /// Interrupts the driver.
    fn notify(&mut self);
}

/// A bare queue (always enabled) plus a notification callback.
impl QueueRing for (&mut Queue, &mut dyn FnMut()) {
    fn active(&mut self) -> bool {
        self.0.ready()
    }

    fn queue(&mut self) -> &mut Queue {
        self.0
    }

    fn notify(&mut self) {
        (self.1)();
    }
}

/// Errors of a ring (not of single frames, which are dropped and counted).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("pair {pair} {queue}: cannot update the ring")]
    Ring {
        pair: u16,
        queue: &'static str,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("pair {pair} rx: cannot place a frame")]
    Place {
        pair: u16,
        #[source]
        source: rx::PlaceError,
    },
}

/// What the caller does with the tap afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxState {
    /// The guest has no buffers (or the queue is stopped): stop polling the tap until the
    /// receive queue is kicked.
    Paused,
    /// The tap has no more frames: keep polling it.
    Drained,
    /// The batch ended with frames still waiting: keep polling (the tap stays readable).
    Budget,
}

/// The state of one queue pair: negotiated header format, the receive bounce buffer with the
/// frame it may hold, and the counters.
#[derive(Debug)]
pub struct PairWorker {
    index: u16,
    features: u64,
    hdr_len: usize,
    mrg: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` still to be placed.
    pending: Option<usize>,
    scratch: rx::Scratch,
    tx_segs: Vec<Segment>,
    stats: PairStats,
    bad_avail_logged: bool,
    ring_error_logged: bool,
}

impl PairWorker {
    pub fn new(index: u16) -> Self {
        Self {
            index,
            features: 0,
            hdr_len: config::header_len(0),
            mrg: false,
            rx_buf: vec![0; RX_BUFFER],
            pending: None,
            scratch: rx::Scratch::default(),
            tx_segs: Vec::new(),
            stats: PairStats::default(),
            bad_avail_logged: false,
            ring_error_logged: false,
        }
    }

    pub fn stats(&self) -> PairStats {
        self.stats
    }

    /// `true` the first time it is called (a ring error is then logged at WARN; later ones,
    /// which a broken or hostile driver can cause on every kick, at DEBUG).
    pub fn first_ring_error(&mut self) -> bool {
        !std::mem::replace(&mut self.ring_error_logged, true)
    }

    /// Takes the features the driver acked. A frame held from before a change of features is
    /// dropped: its header was written for the old ones.
    pub fn set_features(&mut self, features: u64) {
        if features != self.features && self.pending.take().is_some() {
            debug!(pair = self.index, "held frame dropped on renegotiation");
        }
        self.features = features;
        self.hdr_len = config::header_len(features);
        self.mrg = has(
            features,
            virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF,
        );
    }

    /// Moves frames from the tap into the guest's receive buffers until the tap is empty, the
    /// guest has no buffers or [`RX_BUDGET`] frames went in; interrupts the driver once at the
    /// end if it wants it.
    pub fn process_rx(
        &mut self,
        ring: &mut impl QueueRing,
        mem: &GuestRam,
        tap: &mut impl Tap,
    ) -> Result<RxState, WorkerError> {
        if !ring.active() {
            return Ok(RxState::Paused);
        }
        let pair = self.index;
        let ring_err = |source| WorkerError::Ring {
            pair,
            queue: "rx",
            source,
        };
        // While buffers last the driver need not kick; see the pause below.
        ring.queue().disable_notification(mem).map_err(ring_err)?;
        let start = ring.queue().next_used();
        let mut delivered = 0usize;
        let state = loop {
            if delivered >= RX_BUDGET {
                break RxState::Budget;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match tap.read(&mut self.rx_buf) {
                    Ok(n) if n > self.rx_buf.len() => {
                        let cap = self.rx_buf.len();
                        drop_frame(pair, "rx", &mut self.stats.rx, DropKind::Oversized, || {
                            format!("a {n}-byte frame from the tap is larger than {cap} bytes")
                        });
                        continue;
                    }
                    Ok(n) if n < self.hdr_len + MIN_FRAME => {
                        drop_frame(pair, "rx", &mut self.stats.rx, DropKind::Short, || {
                            format!("a {n}-byte frame from the tap is too short")
                        });
                        continue;
                    }
                    Ok(n) => {
                        self.pending = Some(n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxState::Drained,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        drop_frame(pair, "rx", &mut self.stats.rx, DropKind::Tap, || {
                            format!("reading the tap failed: {e}")
                        });
                        break RxState::Drained;
                    }
                },
            };
            let stats = &mut self.stats.rx;
            let mut on_bad = |head: u16, why: BadBuffer| {
                let kind = match why {
                    BadBuffer::Chain(_) => DropKind::MalformedChain,
                    BadBuffer::ShorterThanHeader { .. } => DropKind::Short,
                };
                drop_frame(pair, "rx", stats, kind, || {
                    format!("receive buffer {head} completed unused: {why}")
                });
            };
            let placed = rx::place(
                ring.queue(),
                mem,
                &mut self.rx_buf[..len],
                self.hdr_len,
                self.mrg,
                &mut self.scratch,
                &mut on_bad,
            );
            match placed {
                Ok(Placement::Delivered { .. }) => {
                    self.pending = None;
                    self.stats.rx.delivered(len - self.hdr_len);
                    delivered += 1;
                }
                Ok(Placement::DoesNotFit) => {
                    self.pending = None;
                    let mrg = self.mrg;
                    drop_frame(pair, "rx", &mut self.stats.rx, DropKind::Oversized, || {
                        if mrg {
                            format!("a {len}-byte frame does not fit the whole receive ring")
                        } else {
                            format!("a {len}-byte frame does not fit the next receive buffer")
                        }
                    });
                }
                Ok(Placement::NoBuffers) => {
                    // Ask for a kick when the driver posts buffers beyond those available now
                    // (they are too few for this frame, and `place` rewound over them), then
                    // look again: it may have posted some meanwhile. With EVENT_IDX the
                    // notify threshold is `avail_event`, which `enable_notification` sets to
                    // `next_avail`; left at the rewound position it would lie behind the
                    // driver's avail index and the driver would never kick again.
                    let q = ring.queue();
                    let rewound = q.next_avail();
                    let avail = q
                        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                        .map_err(ring_err)?;
                    q.set_next_avail(avail.0);
                    let more = q.enable_notification(mem);
                    q.set_next_avail(rewound);
                    if more.map_err(ring_err)? {
                        q.disable_notification(mem).map_err(ring_err)?;
                        continue;
                    }
                    break RxState::Paused;
                }
                Err(source) => {
                    // The buffers of this frame were completed; the frame is lost.
                    self.pending = None;
                    return Err(WorkerError::Place { pair, source });
                }
            }
        };
        self.interrupt(ring, mem, start, true)?;
        Ok(state)
    }

    /// Writes every available transmit chain to the tap, in order, completing each before
    /// popping the next; interrupts the driver once at the end if it wants it.
    pub fn process_tx(
        &mut self,
        ring: &mut impl QueueRing,
        mem: &GuestRam,
        tap: &mut impl Tap,
    ) -> Result<(), WorkerError> {
        if !ring.active() {
            return Ok(());
        }
        let pair = self.index;
        let ring_err = |source| WorkerError::Ring {
            pair,
            queue: "tx",
            source,
        };
        let start = ring.queue().next_used();
        loop {
            ring.queue().disable_notification(mem).map_err(ring_err)?;
            let mut popped = 0u32;
            // `pop_descriptor_chain` returns `None` both on an empty ring and on an unusable
            // available index (more than a queue size ahead).
            while let Some(chain) = ring.queue().pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                match self.transmit(mem, chain, tap) {
                    Ok(bytes) => self.stats.tx.delivered(bytes),
                    Err((kind, why)) => {
                        drop_frame(pair, "tx", &mut self.stats.tx, kind, || {
                            format!("chain {head} dropped: {why}")
                        });
                    }
                }
                // In order: this chain is used before the next one is popped. A transmit
                // chain has nothing for the driver to read: length 0.
                if let Err(e) = ring.queue().add_used(mem, head, 0) {
                    drop_frame(
                        pair,
                        "tx",
                        &mut self.stats.tx,
                        DropKind::MalformedChain,
                        || format!("chain {head} cannot be completed: {e}"),
                    );
                }
            }
            if !ring.queue().enable_notification(mem).map_err(ring_err)? {
                break;
            }
            if popped == 0 {
                // A driver bug (or a hostile one): logged once, not per kick.
                let next_avail = ring.queue().next_avail();
                if std::mem::replace(&mut self.bad_avail_logged, true) {
                    debug!(
                        pair,
                        next_avail, "transmit ring: available index is unusable"
                    );
                } else {
                    warn!(
                        pair,
                        next_avail,
                        "transmit ring: available index is unusable; waiting for the next kick \
                         (logged once)"
                    );
                }
                break;
            }
        }
        self.interrupt(ring, mem, start, false)
    }

    /// Validates one transmit chain and writes its frame to the tap; returns the frame's
    /// length.
    fn transmit(
        &mut self,
        mem: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
        tap: &mut impl Tap,
    ) -> Result<usize, (DropKind, String)> {
        self.tx_segs.clear();
        let total = collect(mem, chain, Direction::Transmit, &mut self.tx_segs)
            .map_err(|e| (DropKind::MalformedChain, e.to_string()))?;
        let total = usize::try_from(total).unwrap_or(usize::MAX);
        let hdr_len = self.hdr_len;
        if total < hdr_len + MIN_FRAME {
            return Err((
                DropKind::Short,
                format!(
                    "{total} bytes are less than a {hdr_len}-byte header and an Ethernet header"
                ),
            ));
        }
        let frame_len = total - hdr_len;
        if frame_len > MAX_TX_FRAME {
            return Err((
                DropKind::Oversized,
                format!("a {frame_len}-byte frame is larger than {MAX_TX_FRAME} bytes"),
            ));
        }
        // The header is copied out and checked once; the tap gets the checked copy, so the
        // guest cannot change it in between.
        let mut raw = [0u8; MAX_HEADER_LEN];
        let mut copied = 0usize;
        let mut slices = Vec::with_capacity(self.tx_segs.len() + 1);
        let memory = |e: vm_memory::GuestMemoryError| (DropKind::MalformedChain, e.to_string());
        for seg in &self.tx_segs {
            let len = usize::try_from(seg.len).unwrap_or(usize::MAX);
            let in_header = (hdr_len - copied).min(len);
            if in_header > 0 {
                mem.read_slice(&mut raw[copied..copied + in_header], seg.addr)
                    .map_err(memory)?;
                copied += in_header;
            }
            if in_header == len {
                continue;
            }
            let addr = seg
                .addr
                .checked_add(u64::try_from(in_header).unwrap_or(u64::MAX))
                .ok_or((DropKind::MalformedChain, "address overflow".to_owned()))?;
            for s in mem.get_slices(addr, len - in_header) {
                slices.push(s.map_err(memory)?);
            }
        }
        let header = NetHeader::parse(&raw[..hdr_len])
            .validate_tx(frame_len, self.features)
            .map_err(|e| (DropKind::BadHeader, e.to_string()))?
            .to_bytes();
        tap.write(&header[..hdr_len], &slices)
            .map_err(|e| (DropKind::Tap, format!("the tap refused the frame: {e}")))?;
        Ok(frame_len)
    }

    /// One interrupt for everything used since `start`, if the driver wants it.
    fn interrupt(
        &mut self,
        ring: &mut impl QueueRing,
        mem: &GuestRam,
        start: u16,
        rx: bool,
    ) -> Result<(), WorkerError> {
        if ring.queue().next_used() == start {
            return Ok(());
        }
        let wants = ring
            .queue()
            .needs_notification(mem)
            .map_err(|source| WorkerError::Ring {
                pair: self.index,
                queue: if rx { "rx" } else { "tx" },
                source,
            })?;
        if wants {
            ring.notify();
            let q = if rx {
                &mut self.stats.rx
            } else {
                &mut self.stats.tx
            };
            q.notifications += 1;
        }
        Ok(())
    }
}

/// Counts a drop; the first of its kind on the queue is logged at WARN, later ones at DEBUG.
fn drop_frame(
    pair: u16,
    queue: &'static str,
    stats: &mut QueueStats,
    kind: DropKind,
    why: impl FnOnce() -> String,
) {
    if stats.drop_frame(kind) {
        warn!(
            pair,
            queue,
            kind = kind.name(),
            "dropped: {} (further drops of this kind are counted, not logged)",
            why()
        );
    } else {
        debug!(pair, queue, kind = kind.name(), "dropped: {}", why());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
    };
    use virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;

    use super::*;
    use crate::chain::tests::ram;
    use crate::test_ring::TestRing;

    const QSIZE: u16 = 16;

    /// Frames to hand out, frames written, and a way to make writes fail.
    #[derive(Default)]
    struct FakeTap {
        incoming: VecDeque<Vec<u8>>,
        sent: Vec<(Vec<u8>, Vec<u8>)>,
        write_error: Option<io::ErrorKind>,
        reads: usize,
    }

    impl Tap for FakeTap {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let Some(f) = self.incoming.pop_front() else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            let n = f.len().min(buf.len());
            buf[..n].copy_from_slice(&f[..n]);
            Ok(f.len())
        }

        fn write(&mut self, header: &[u8], frame: &[VolatileSlice<'_, ()>]) -> io::Result<usize> {
            if let Some(kind) = self.write_error {
                return Err(kind.into());
            }
            let mut data = Vec::new();
            for s in frame {
                let mut part = vec![0u8; s.len()];
                s.copy_to(&mut part[..]);
                data.extend(part);
            }
            let n = header.len() + data.len();
            self.sent.push((header.to_vec(), data));
            Ok(n)
        }
    }

    /// A tap frame: a 12-byte header with `flags`, then `len` bytes of pattern `seed`.
    fn tap_frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend((0..len).map(|i| u8::try_from(i % 251).unwrap() ^ seed));
        f
    }

    fn worker(features: u64) -> PairWorker {
        let mut w = PairWorker::new(0);
        w.set_features(features | (1 << VIRTIO_F_VERSION_1));
        w
    }

    fn rx(
        w: &mut PairWorker,
        q: &mut Queue,
        mem: &GuestRam,
        tap: &mut FakeTap,
        notified: &mut u32,
    ) -> RxState {
        let mut notify = || *notified += 1;
        w.process_rx(&mut (q, &mut notify as &mut dyn FnMut()), mem, tap)
            .unwrap()
    }

    fn tx(w: &mut PairWorker, q: &mut Queue, mem: &GuestRam, tap: &mut FakeTap) -> u32 {
        let mut n = 0;
        let mut notify = || n += 1;
        w.process_tx(&mut (q, &mut notify as &mut dyn FnMut()), mem, tap)
            .unwrap();
        n
    }

    #[test]
    fn rx_moves_frames_until_the_tap_is_empty_with_one_interrupt() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let heads: Vec<u16> = (0..4u64)
            .map(|i| r.post(&[(0x10_0000 + i * 0x1000, 2048, true)]))
            .collect();
        let mut q = r.queue(false);
        let mut tap = FakeTap::default();
        tap.incoming
            .extend([tap_frame(60, 1), tap_frame(1514, 2), tap_frame(100, 3)]);
        let mut w = worker(1 << VIRTIO_NET_F_MRG_RXBUF);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Drained
        );
        assert_eq!(notified, 1);
        assert_eq!(
            r.take_used(),
            [(heads[0], 72), (heads[1], 1526), (heads[2], 112)]
        );
        let mut want = tap_frame(1514, 2);
        want[10] = 1;
        assert_eq!(r.read(0x10_1000, 1526), want);
        let s = w.stats().rx;
        assert_eq!(
            (s.frames, s.bytes, s.notifications),
            (3, 60 + 1514 + 100, 1)
        );
        // Kicks were not wanted while buffers lasted.
        assert_eq!(
            r.used_flags(),
            u16::try_from(VRING_USED_F_NO_NOTIFY).unwrap()
        );
    }

    /// A frame needing more mergeable buffers than are posted: the buffers stay available,
    /// and with EVENT_IDX the driver must be asked to kick when it posts beyond them (not at
    /// the rewound position, which its avail index has already passed).
    #[test]
    fn rx_with_too_few_buffers_asks_for_a_kick_past_the_posted_ones() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        r.post(&[(0x10_0000, 64, true)]);
        r.post(&[(0x11_0000, 64, true)]);
        let mut q = r.queue(true);
        r.set_used_event(0);
        let mut tap = FakeTap::default();
        tap.incoming.extend([tap_frame(1000, 1)]);
        let mut w = worker(1 << VIRTIO_NET_F_MRG_RXBUF);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Paused
        );
        assert!(
            r.take_used().is_empty(),
            "nothing delivered, nothing consumed"
        );
        assert_eq!(r.avail_event(), 2, "kick when a third buffer is posted");
        assert_eq!(q.next_avail(), 0, "the two buffers stay available");
    }

    #[test]
    fn rx_without_buffers_pauses_and_keeps_the_frame() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let h0 = r.post(&[(0x10_0000, 2048, true)]);
        let mut q = r.queue(true);
        r.set_used_event(0);
        let mut tap = FakeTap::default();
        tap.incoming
            .extend([tap_frame(100, 1), tap_frame(200, 2), tap_frame(300, 3)]);
        let mut w = worker(0);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Paused
        );
        assert_eq!(r.take_used(), [(h0, 112)]);
        assert_eq!(notified, 1);
        assert_eq!(
            tap.incoming.len(),
            1,
            "the second frame is held, the third unread"
        );
        // EVENT_IDX: the driver is asked to kick when it posts the next buffer.
        assert_eq!(r.avail_event(), 1);
        let reads = tap.reads;
        // A spurious wake-up while still without buffers reads nothing more.
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Paused
        );
        assert_eq!(tap.reads, reads);
        let h1 = r.post(&[(0x11_0000, 2048, true)]);
        let h2 = r.post(&[(0x12_0000, 2048, true)]);
        r.set_used_event(1);
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Drained
        );
        assert_eq!(r.take_used(), [(h1, 212), (h2, 312)]);
        assert_eq!(notified, 2);
        assert_eq!(r.read(0x11_0000 + 12, 200), tap_frame(200, 2)[12..]);
        assert_eq!(w.stats().rx.total_drops(), 0);
    }

    #[test]
    fn rx_interrupts_follow_used_event() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        for i in 0..8u64 {
            r.post(&[(0x10_0000 + i * 0x1000, 2048, true)]);
        }
        let mut q = r.queue(true);
        let mut w = worker(0);
        let mut tap = FakeTap::default();
        let mut notified = 0;
        // The driver wants to hear only once used passes 5.
        r.set_used_event(5);
        tap.incoming.extend((0..3).map(|i| tap_frame(60, i)));
        rx(&mut w, &mut q, &mem, &mut tap, &mut notified);
        assert_eq!(notified, 0, "used 0 -> 3 does not pass 5");
        tap.incoming.extend((0..3).map(|i| tap_frame(60, i)));
        rx(&mut w, &mut q, &mem, &mut tap, &mut notified);
        assert_eq!(notified, 1, "used 3 -> 6 passes 5");
    }

    #[test]
    fn rx_drops_oversized_and_runt_frames_and_goes_on() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let h0 = r.post(&[(0x10_0000, 1526, true)]);
        let mut q = r.queue(false);
        let mut tap = FakeTap::default();
        tap.incoming.extend([
            tap_frame(RX_BUFFER, 1),
            tap_frame(4, 2),
            tap_frame(2000, 3),
            tap_frame(1514, 4),
        ]);
        let mut w = worker(0);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Drained
        );
        assert_eq!(r.take_used(), [(h0, 1526)]);
        let s = w.stats().rx;
        assert_eq!(
            s.drops_of(DropKind::Oversized),
            2,
            "too big for us, too big for the buffer"
        );
        assert_eq!(s.drops_of(DropKind::Short), 1);
        assert_eq!(s.frames, 1);
    }

    #[test]
    fn rx_stops_after_a_budget_and_leaves_the_rest_to_the_next_call() {
        let mem = ram();
        let size = 512;
        let mut r = TestRing::new(&mem, size);
        for i in 0..300u64 {
            r.post(&[(0x10_0000 + i * 0x800, 2048, true)]);
        }
        let mut q = r.queue(false);
        let mut tap = FakeTap::default();
        tap.incoming.extend((0..300).map(|_| tap_frame(60, 0)));
        let mut w = worker(0);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Budget
        );
        assert_eq!(r.take_used().len(), RX_BUDGET);
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Drained
        );
        assert_eq!(r.take_used().len(), 300 - RX_BUDGET);
        assert_eq!(notified, 2);
    }

    #[test]
    fn rx_leaves_an_inactive_ring_alone() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        r.post(&[(0x10_0000, 2048, true)]);
        let mut q = r.queue(false);
        q.set_ready(false);
        let mut tap = FakeTap::default();
        tap.incoming.push_back(tap_frame(60, 0));
        let mut w = worker(0);
        let mut notified = 0;
        assert_eq!(
            rx(&mut w, &mut q, &mem, &mut tap, &mut notified),
            RxState::Paused
        );
        assert_eq!(tap.reads, 0);
        assert_eq!(r.used_flags(), 0);
        assert_eq!(r.used_idx(), 0);
    }

    /// A transmit chain `[header(12) | frame]` split as `parts` (lengths) at 4 KiB steps from
    /// `base`; writes the bytes into guest memory.
    fn post_tx(
        r: &mut TestRing<'_>,
        base: u64,
        header: [u8; 12],
        frame: &[u8],
        parts: &[usize],
    ) -> u16 {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        assert_eq!(parts.iter().sum::<usize>(), bytes.len());
        let mut at = 0;
        let mut bufs = Vec::new();
        for (k, &len) in parts.iter().enumerate() {
            let addr = base + 0x1_0000 * u64::try_from(k).unwrap();
            r.mem
                .write_slice(&bytes[at..at + len], vm_memory::GuestAddress(addr))
                .unwrap();
            bufs.push((addr, u32::try_from(len).unwrap(), false));
            at += len;
        }
        r.post(&bufs)
    }

    fn eth(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 241).unwrap() ^ seed)
            .collect()
    }

    #[test]
    fn tx_writes_each_frame_in_order_with_a_checked_header() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let csum_hdr = NetHeader {
            flags: 1,
            csum_start: 34,
            csum_offset: 6,
            num_buffers: 9,
            ..NetHeader::default()
        }
        .to_bytes();
        let f0 = eth(60, 1);
        let f1 = eth(1514, 2);
        // Header alone, header split 5+7 with the frame, everything in one descriptor.
        let h0 = post_tx(&mut r, 0x10_0000, [0; 12], &f0, &[12, 60]);
        let h1 = post_tx(&mut r, 0x20_0000, csum_hdr, &f1, &[5, 7 + 100, 1414]);
        let h2 = post_tx(&mut r, 0x30_0000, [0; 12], &f0, &[72]);
        let mut q = r.queue(false);
        let mut tap = FakeTap::default();
        let mut w = worker(1 << VIRTIO_NET_F_CSUM);
        assert_eq!(tx(&mut w, &mut q, &mem, &mut tap), 1);
        assert_eq!(r.take_used(), [(h0, 0), (h1, 0), (h2, 0)]);
        let mut sanitised = csum_hdr;
        sanitised[10] = 0;
        assert_eq!(
            tap.sent,
            [
                (vec![0; 12], f0.clone()),
                (sanitised.to_vec(), f1),
                (vec![0; 12], f0)
            ]
        );
        let s = w.stats().tx;
        assert_eq!((s.frames, s.bytes, s.notifications), (3, 60 + 1514 + 60, 1));
    }

    #[test]
    fn tx_drops_bad_chains_completes_them_in_order_and_goes_on() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let good = eth(100, 7);
        let tso = NetHeader {
            flags: 1,
            gso_type: 1,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            ..NetHeader::default()
        }
        .to_bytes();
        let heads = vec![
            // writable
            r.post(&[(0x10_0000, 12, false), (0x10_1000, 100, true)]),
            // short
            post_tx(&mut r, 0x20_0000, [0; 12], &good[..10], &[22]),
            // TSO not negotiated
            post_tx(&mut r, 0x30_0000, tso, &good, &[112]),
            // oversized
            r.post(&[(0x40_0000, 12, false), (0x40_1000, 65_551, false)]),
            // outside memory
            r.post(&[(0xf000_0000, 100, false)]),
            // good
            post_tx(&mut r, 0x50_0000, [0; 12], &good, &[112]),
        ];
        let mut q = r.queue(false);
        let mut tap = FakeTap::default();
        let mut w = worker(1 << VIRTIO_NET_F_CSUM);
        tx(&mut w, &mut q, &mem, &mut tap);
        let used = r.take_used();
        assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), heads);
        assert!(used.iter().all(|u| u.1 == 0));
        assert_eq!(tap.sent, [(vec![0; 12], good.clone())]);
        let s = w.stats().tx;
        assert_eq!(s.drops_of(DropKind::MalformedChain), 2);
        assert_eq!(s.drops_of(DropKind::Short), 1);
        assert_eq!(s.drops_of(DropKind::BadHeader), 1);
        assert_eq!(s.drops_of(DropKind::Oversized), 1);
        assert_eq!(s.frames, 1);

        // With HOST_TSO4 negotiated the same header passes; a tap that refuses is a drop.
        w.set_features((1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << 32));
        let h = post_tx(&mut r, 0x30_0000, tso, &good, &[112]);
        tx(&mut w, &mut q, &mem, &mut tap);
        assert_eq!(tap.sent.len(), 2);
        tap.write_error = Some(io::ErrorKind::InvalidInput);
        let h2 = post_tx(&mut r, 0x30_0000, tso, &good, &[112]);
        tx(&mut w, &mut q, &mem, &mut tap);
        assert_eq!(r.take_used(), [(h, 0), (h2, 0)]);
        assert_eq!(w.stats().tx.drops_of(DropKind::Tap), 1);
    }

    #[test]
    fn tx_interrupts_follow_used_event() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let mut q = r.queue(true);
        let mut tap = FakeTap::default();
        let mut w = worker(0);
        let f = eth(60, 0);
        r.set_used_event(2);
        for i in 0..2u64 {
            post_tx(&mut r, 0x10_0000 + i * 0x10_0000, [0; 12], &f, &[72]);
        }
        assert_eq!(
            tx(&mut w, &mut q, &mem, &mut tap),
            0,
            "used 0 -> 2 does not pass 2"
        );
        post_tx(&mut r, 0x30_0000, [0; 12], &f, &[72]);
        assert_eq!(tx(&mut w, &mut q, &mem, &mut tap), 1);
        // Kicks re-enabled: avail_event is where the device stopped.
        assert_eq!(r.avail_event(), 3);
        assert_eq!(tx(&mut w, &mut q, &mem, &mut tap), 0, "nothing new");
    }
}
