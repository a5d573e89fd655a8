//! A device whose backend will not come back (its process used up its restart budget): the
//! core itself completes the guest's requests with errors, so the guest sees a failed device
//! instead of requests that hang forever (DESIGN.md §4).
//!
//! A [`Drainer`] thread waits on the rings' kick eventfds (the notify ioeventfds KVM signals)
//! and completes every available chain as the [`FailPolicy`] says, starting at the guest's
//! `used.idx`: requests the dead backend took but never completed are failed too.

#![forbid(unsafe_code)]

use super::QueueConfig;
use crate::memory::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, Le16};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How a failed device answers: which rings it drains and what each completion says.
pub trait FailPolicy: Send + Sync {
    /// Whether ring `queue` is drained (a network card's receive rings are left alone: no
    /// frame will arrive).
    fn drains(&self, queue: u16) -> bool;
    /// Completes one chain (for example writes an error status into it); returns the used
    /// length.
    fn complete(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32;
}

/// virtio-blk: `VIRTIO_BLK_S_IOERR` in each request's status byte (the last byte of its last
/// device-writable descriptor).
pub struct BlkIoError;

/// `VIRTIO_BLK_S_IOERR`.
const VIRTIO_BLK_S_IOERR: u8 = 1;

impl FailPolicy for BlkIoError {
    fn drains(&self, _queue: u16) -> bool {
        true
    }

    fn complete(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let status = chain
            .filter(|d| d.is_write_only() && d.len() > 0)
            .last()
            .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1));
        match status {
            Some(at) if mem.write_obj(VIRTIO_BLK_S_IOERR, at).is_ok() => 1,
            _ => 0,
        }
    }
}

/// virtio-net: transmitted frames are dropped (completed unsent); receive rings stay as they
/// are.
pub struct NetDrop;

impl FailPolicy for NetDrop {
    fn drains(&self, queue: u16) -> bool {
        queue % 2 == 1
    }

    fn complete(&self, _mem: &GuestMemoryMmap, _chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        0
    }
}

/// A started ring as the drainer needs it.
pub struct DrainedQueue {
    pub config: QueueConfig,
    pub kick: EventFd,
    pub call: EventFd,
}

/// The thread that fails a device's requests; stopped on drop.
pub struct Drainer {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drainer {
    /// Starts failing the requests of `queues` (negotiated `event_idx`) as `policy` says.
    pub fn start(
        label: &str,
        mem: GuestMemoryMmap,
        queues: Vec<DrainedQueue>,
        event_idx: bool,
        policy: Arc<dyn FailPolicy>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_thread = stop.try_clone()?;
        let label = label.to_owned();
        let mut rings = Vec::new();
        for q in queues.into_iter().filter(|q| policy.drains(q.config.index)) {
            match ring(&mem, &q.config, event_idx) {
                Some(queue) => rings.push((queue, q)),
                None => {
                    tracing::warn!(device = %label, queue = q.config.index, "ring not in guest RAM; not drained");
                }
            }
        }
        let thread = std::thread::Builder::new()
            .name(format!("failed {label}"))
            .spawn(move || run(&label, &mem, rings, &stop_thread, policy.as_ref()))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The guest's ring, resumed at its `used.idx`.
fn ring(mem: &GuestMemoryMmap, c: &QueueConfig, event_idx: bool) -> Option<Queue> {
    let mut queue = Queue::new(c.size).ok()?;
    queue
        .try_set_desc_table_address(GuestAddress(c.desc))
        .ok()?;
    queue
        .try_set_avail_ring_address(GuestAddress(c.avail))
        .ok()?;
    queue.try_set_used_ring_address(GuestAddress(c.used)).ok()?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return None;
    }
    let used: u16 = mem.read_obj::<Le16>(c.used_idx_address()).ok()?.into();
    queue.set_next_avail(used);
    queue.set_next_used(used);
    Some(queue)
}

/// An epoll set of `stop` and every ring's kick eventfd.
fn watch(stop: &EventFd, rings: &[(Queue, DrainedQueue)]) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    let fds =
        std::iter::once(stop.as_raw_fd()).chain(rings.iter().map(|(_, q)| q.kick.as_raw_fd()));
    for (n, fd) in (0u64..).zip(fds) {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, n))?;
    }
    Ok(epoll)
}

fn run(
    label: &str,
    mem: &GuestMemoryMmap,
    mut rings: Vec<(Queue, DrainedQueue)>,
    stop: &EventFd,
    policy: &dyn FailPolicy,
) {
    let epoll = match watch(stop, &rings) {
        Ok(epoll) => epoll,
        Err(e) => {
            tracing::error!(device = %label, "cannot watch the failed device's notifies; its requests hang: {e}");
            return;
        }
    };
    let mut failed = 0u64;
    loop {
        for (queue, q) in &mut rings {
            let _ = q.kick.read();
            let mut any = false;
            // `enable_notification` moves `avail_event` (EVENT_IDX) so the driver notifies
            // again, and reports requests that arrived meanwhile.
            loop {
                while let Some(chain) = queue.pop_descriptor_chain(mem) {
                    let head = chain.head_index();
                    let len = policy.complete(mem, chain);
                    if queue.add_used(mem, head, len).is_err() {
                        break;
                    }
                    any = true;
                    failed += 1;
                }
                if !matches!(queue.enable_notification(mem), Ok(true)) {
                    break;
                }
            }
            if any && queue.needs_notification(mem).unwrap_or(true) {
                let _ = q.call.write(1);
            }
        }
        let mut events = [EpollEvent::default(); 1];
        match epoll.wait(-1, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(device = %label, "cannot wait for the failed device's notifies: {e}");
                return;
            }
        }
        if stop.read().is_ok() {
            tracing::info!(device = %label, failed, "stopped failing requests");
            return;
        }
    }
}

impl QueueConfig {
    /// Where the guest keeps this ring's `used.idx`.
    pub fn used_idx_address(&self) -> GuestAddress {
        GuestAddress(self.used + 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn blk_requests_get_ioerr_in_their_status_byte() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x8000, 16, 0x1, 1)),
            RawDescriptor::from(Descriptor::new(0x9000, 512, 0x3, 2)),
            RawDescriptor::from(Descriptor::new(0xa000, 1, 0x2, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&m).unwrap();
        assert_eq!(BlkIoError.complete(&m, chain), 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 1);
    }

    #[test]
    fn drainer_fails_pending_and_later_requests_then_stops() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [
            RawDescriptor::from(Descriptor::new(0x8000, 16, 0x1, 1)),
            RawDescriptor::from(Descriptor::new(0xa000, 1, 0x2, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let config = QueueConfig {
            index: 0,
            size: 16,
            desc: vq.desc_table_addr().0,
            avail: vq.avail_addr().0,
            used: vq.used_addr().0,
        };
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let drainer = Drainer::start(
            "test",
            m.clone(),
            vec![DrainedQueue {
                config,
                kick: kick.try_clone().unwrap(),
                call: call.try_clone().unwrap(),
            }],
            true,
            Arc::new(BlkIoError),
        )
        .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while m.read_obj::<u16>(config.used_idx_address()).unwrap() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "pending request not failed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 1);
        assert!(call.read().is_ok(), "interrupt raised");
        // EVENT_IDX: avail_event (after the 16 used elements) asks for the next notify.
        let avail_event = GuestAddress(config.used + 4 + 8 * 16);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while m.read_obj::<u16>(avail_event).unwrap() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "avail_event not moved"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(drainer);
    }
}
