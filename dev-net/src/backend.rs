//! The thin adapter between `vhost-user-backend` and the pair workers: feature and config
//! answers, one worker thread per queue pair (rx and tx of pair `i` are queues `2i` and
//! `2i + 1`), the tap queue in that thread's epoll set, and [`NetVring`], which tells a pair
//! when the frontend enables or disables its receive ring.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use tracing::{debug, trace, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{
    VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringStateGuard,
    VringStateMutGuard, VringT,
};
use virtio_queue::{Error as VirtQueError, Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::GuestRam;
use crate::config::{self, MAX_QUEUE_SIZE, NetParams};
use crate::tap::{Listener, Pair};
use crate::worker::{PairWorker, QueueRing, RxState, WorkerError};

/// Guest memory as shared with `vhost-user-backend` (replaced on `SET_MEM_TABLE`).
pub type SharedRam = GuestMemoryAtomic<GuestRam>;

/// Queue index of a pair's receive ring within its worker thread (the thread's vrings are
/// the pair's `[rx, tx]`).
const RX: u16 = 0;
const TX: u16 = 1;

/// A vring that reports `SET_VRING_ENABLE` (and `RESET_DEVICE`) to the pair it serves.
///
/// vhost-user-backend has no backend callback for ring enabling, so the ring type itself
/// passes it on. The pair is linked on the first event of the pair's worker thread (which
/// comes when the ring is first enabled); a change before that is picked up when linking.
#[derive(Clone)]
pub struct NetVring {
    inner: VringRwLock<SharedRam>,
    link: Arc<Mutex<Link>>,
}

#[derive(Default)]
struct Link {
    enabled: bool,
    pair: Option<Arc<Pair>>,
}

impl NetVring {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Links this (receive) ring to `pair`, once, and gives it the current enabled state.
    fn link_to(&self, pair: &Arc<Pair>) {
        let mut link = self.link();
        if link.pair.is_none() {
            link.pair = Some(Arc::clone(pair));
            // Under the link lock, so a concurrent `set_enabled` cannot be overtaken.
            pair.set_enabled(link.enabled);
        }
    }
}

impl<'a> VringStateGuard<'a, SharedRam> for NetVring {
    type G = <VringRwLock<SharedRam> as VringStateGuard<'a, SharedRam>>::G;
}

impl<'a> VringStateMutGuard<'a, SharedRam> for NetVring {
    type G = <VringRwLock<SharedRam> as VringStateMutGuard<'a, SharedRam>>::G;
}

impl VringT<SharedRam> for NetVring {
    fn new(mem: SharedRam, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(Self {
            inner: VringRwLock::new(mem, max_queue_size)?,
            link: Arc::default(),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, SharedRam>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, SharedRam>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        let mut link = self.link();
        link.enabled = enabled;
        if let Some(pair) = &link.pair {
            pair.set_enabled(enabled);
        }
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base);
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx);
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num);
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled);
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file);
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file);
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file);
    }
}

/// One ring's state, borrowed from its write guard for a batch.
struct GuardedRing<'a> {
    state: &'a mut VringState<SharedRam>,
    pair: u16,
}

impl QueueRing for GuardedRing<'_> {
    fn active(&mut self) -> bool {
        self.state.is_enabled() && self.state.get_queue().ready()
    }

    fn queue(&mut self) -> &mut Queue {
        self.state.get_queue_mut()
    }

    fn notify(&mut self) {
        if let Err(e) = self.state.signal_used_queue() {
            warn!(pair = self.pair, "cannot signal the used queue: {e}");
        }
    }
}

type Handler = VringEpollHandler<Arc<NetBackend>>;

/// Polls a tap queue in one worker thread's epoll set.
struct EpollListener {
    handler: Weak<Handler>,
    event: u64,
}

impl Listener for EpollListener {
    fn listen(&self, fd: std::os::fd::RawFd, on: bool) -> io::Result<()> {
        // The connection (and its epoll set) is gone: nothing is polled any more.
        let Some(handler) = self.handler.upgrade() else {
            return if on {
                Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the connection ended",
                ))
            } else {
                Ok(())
            };
        };
        if on {
            handler.register_listener(fd, EventSet::IN, self.event)
        } else {
            handler.unregister_listener(fd, EventSet::IN, self.event)
        }
    }
}

/// A virtio-net vhost-user backend for one frontend connection.
pub struct NetBackend {
    params: NetParams,
    pairs: Vec<Arc<Pair>>,
    mem: SharedRam,
    /// Epoll event id of the tap queue (ids up to `num_queues` are the library's).
    tap_event: u16,
}

impl NetBackend {
    /// `mem` must be the `GuestMemoryAtomic` handed to the `VhostUserDaemon`, so that
    /// `SET_MEM_TABLE` updates reach the workers. `pairs.len()` must be `params.pairs`.
    pub fn new(params: NetParams, pairs: &[Arc<Pair>], mem: SharedRam) -> Self {
        let tap_event = params.pairs.saturating_mul(2).saturating_add(1);
        Self {
            params,
            pairs: pairs.to_vec(),
            mem,
            tap_event,
        }
    }

    /// Hands each pair the epoll set of its worker thread (`handlers` from
    /// `VhostUserDaemon::get_epoll_handlers`, one per pair, in pair order).
    pub fn connect(&self, handlers: &[Arc<Handler>]) {
        for (pair, handler) in self.pairs.iter().zip(handlers) {
            pair.connect(Box::new(EpollListener {
                handler: Arc::downgrade(handler),
                event: u64::from(self.tap_event),
            }));
        }
    }

    fn receive(&self, pair: &Pair, vring: &NetVring, mem: &GuestRam) {
        let state = {
            let mut worker = pair.worker();
            let mut guard = vring.get_mut();
            let mut ring = GuardedRing {
                state: &mut guard,
                pair: pair.index(),
            };
            let state = worker.process_rx(&mut ring, mem, &mut pair.io());
            if let Err(e) = &state {
                log_ring_error(&mut worker, e);
            }
            state
        };
        // After the ring and worker locks are released: the gate takes its own lock.
        match state {
            Ok(state) => {
                trace!(pair = pair.index(), ?state, "receive");
                pair.set_paused(state == RxState::Paused);
            }
            Err(_) => pair.set_paused(true),
        }
    }

    fn transmit(&self, pair: &Pair, vring: &NetVring, mem: &GuestRam) {
        let mut worker = pair.worker();
        let mut guard = vring.get_mut();
        let mut ring = GuardedRing {
            state: &mut guard,
            pair: pair.index(),
        };
        if let Err(e) = worker.process_tx(&mut ring, mem, &mut pair.io()) {
            log_ring_error(&mut worker, &e);
        }
    }
}

fn log_ring_error(worker: &mut PairWorker, e: &WorkerError) {
    if worker.first_ring_error() {
        warn!(
            "{e}: {} (further ring errors of this pair are logged at DEBUG)",
            source_text(e)
        );
    } else {
        debug!("{e}: {}", source_text(e));
    }
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map_or_else(String::new, ToString::to_string)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = NetVring;

    fn num_queues(&self) -> usize {
        usize::from(self.params.pairs) * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.params.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not INFLIGHT_SHMFD (vhost-user-backend 0.24 rejects its messages): recovery after a
        // crash relies on in-order completion (see `crate::worker`).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        // The handler sets the flag on each queue.
        debug!(enabled, "EVENT_IDX");
    }

    fn acked_features(&self, features: u64) {
        debug!(features = format_args!("{features:#x}"), "features acked");
        let hdr_len = i32::try_from(config::header_len(features)).unwrap_or(12);
        let offloads = config::tun_offloads(features, self.params.tap_offloads);
        for pair in &self.pairs {
            pair.worker().set_features(features);
            // Both settings belong to the whole tap; set on every queue all the same.
            if let Err(e) = ipc::tap::set_vnet_hdr_size(pair.fd(), hdr_len) {
                warn!(pair = pair.index(), "{e}: {}", source_text(&e));
            }
            if let Err(e) = ipc::tap::set_offload(pair.fd(), offloads) {
                warn!(pair = pair.index(), "{e}: {}", source_text(&e));
            }
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.params.config_slice(offset, size).unwrap_or_else(|| {
            warn!(offset, size, "GET_CONFIG outside the config space");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the virtio-net config space is writable by the driver.
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "config space is read-only (write of {} bytes at {offset})",
                buf.len()
            ),
        ))
    }

    fn update_memory(&self, _mem: SharedRam) -> io::Result<()> {
        // The daemon updated the very `GuestMemoryAtomic` we hold.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.params.pairs).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Required: without it the worker threads never leave their epoll loop and dropping
        // the daemon (which joins them) hangs.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here end the worker thread for good, so problems are logged
        // and never returned.
        let (Some(pair), Some(rx), Some(tx)) =
            (self.pairs.get(thread_id), vrings.first(), vrings.get(1))
        else {
            warn!(device_event, thread_id, "event for an unknown queue pair");
            return Ok(());
        };
        trace!(pair = pair.index(), device_event, "event");
        rx.link_to(pair);
        let mem = self.mem.memory();
        match device_event {
            // A receive kick (new buffers) or a readable tap queue.
            RX => self.receive(pair, rx, &mem),
            e if e == self.tap_event => self.receive(pair, rx, &mem),
            TX => self.transmit(pair, tx, &mem),
            other => warn!(pair = pair.index(), event = other, "unexpected event"),
        }
        Ok(())
    }
}
