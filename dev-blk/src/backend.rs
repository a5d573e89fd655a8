//! The thin adapter between `vhost-user-backend` and the request logic: feature and config
//! answers, one worker thread per queue, and the per-kick call into
//! [`QueueWorker::process_ring`].

#![forbid(unsafe_code)]

use std::io;
use std::sync::{Arc, Mutex};

use tracing::{debug, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::config::DiskGeometry;
use crate::disk::{ImageQueue, RawImage};
use crate::request::{GuestRam, RequestHandler};
use crate::worker::{QueueRing, QueueWorker};

/// Guest memory as shared with `vhost-user-backend` (replaced on `SET_MEM_TABLE`).
pub type SharedRam = GuestMemoryAtomic<GuestRam>;

/// One queue's vring state, borrowed from its write guard for a batch: the worker reaches the
/// queue and the call eventfd through it, one after the other.
struct GuardedRing<'a> {
    state: &'a mut VringState<SharedRam>,
    queue: usize,
}

impl QueueRing for GuardedRing<'_> {
    fn queue(&mut self) -> &mut Queue {
        self.state.get_queue_mut()
    }

    fn notify(&mut self) {
        if let Err(e) = self.state.signal_used_queue() {
            warn!(queue = self.queue, "cannot signal the used queue: {e}");
        }
    }
}

/// A virtio-blk vhost-user backend for one connection.
///
/// Each queue has its own worker thread (`queues_per_thread` puts one queue in each), and each
/// worker completes its queue in order: see the invariant in [`crate::worker`].
pub struct BlkBackend {
    geometry: DiskGeometry,
    mem: SharedRam,
    workers: Vec<Mutex<QueueWorker<ImageQueue>>>,
}

impl BlkBackend {
    /// `mem` must be the same `GuestMemoryAtomic` handed to the `VhostUserDaemon`, so that
    /// `SET_MEM_TABLE` updates are seen by the workers.
    pub fn new(geometry: DiskGeometry, image: &Arc<RawImage>, mem: SharedRam) -> Self {
        let workers = (0..geometry.num_queues)
            .map(|q| {
                Mutex::new(QueueWorker::new(
                    q,
                    RequestHandler::new(geometry.clone()),
                    ImageQueue::new(Arc::clone(image)),
                ))
            })
            .collect();
        Self {
            geometry,
            mem,
            workers,
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<SharedRam>;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.geometry.queue_size)
    }

    fn features(&self) -> u64 {
        self.geometry.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not INFLIGHT_SHMFD: vhost-user-backend 0.24 rejects its messages. Recovery after a
        // crash relies on in-order completion instead.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        // The handler sets the flag on each queue; nothing else depends on it.
        debug!(enabled, "EVENT_IDX");
    }

    fn acked_features(&self, features: u64) {
        debug!(features = format_args!("{features:#x}"), "features acked");
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.geometry.config_slice(offset, size).unwrap_or_else(|| {
            warn!(offset, size, "GET_CONFIG outside the config space");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in the virtio-blk config space we offer is writable.
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
        (0..self.geometry.num_queues).map(|q| 1u64 << q).collect()
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
        // Errors returned from here end the worker thread for good, so guest-caused problems
        // are logged (by the worker) and never returned.
        let (Some(vring), Some(worker)) = (
            vrings.get(usize::from(device_event)),
            self.workers.get(thread_id),
        ) else {
            warn!(device_event, thread_id, "event for an unknown queue");
            return Ok(());
        };
        let mut worker = worker.lock().unwrap_or_else(|e| e.into_inner());
        let mem = self.mem.memory();
        // One write guard for the whole batch; `vring.add_used()` would take the lock again
        // and deadlock, so the worker works on the queue through this guard only. Holding it
        // also keeps the call eventfd in place (SET_VRING_CALL needs the same lock).
        let mut state = vring.get_mut();
        let mut ring = GuardedRing {
            state: &mut state,
            queue: thread_id,
        };
        if let Err(e) = worker.process_ring(&mut ring, &mem) {
            warn!("{e}");
        }
        Ok(())
    }
}
