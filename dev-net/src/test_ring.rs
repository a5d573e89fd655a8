//! A driver's view of a split virtqueue in test memory, for the unit tests: post chains, read
//! used entries. (virtio-queue's `MockSplitQueue` lays the rings out; this adds the driver.)

use std::sync::atomic::{Ordering, fence};

use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::GuestRam;
use crate::chain::tests::{NEXT, WRITE, desc};

/// One buffer of a chain: address, length, device-writable.
pub type Buf = (u64, u32, bool);

pub struct TestRing<'a> {
    pub mock: MockSplitQueue<'a, GuestRam>,
    pub mem: &'a GuestRam,
    pub size: u16,
    next_desc: u16,
    /// Used ring, apart from the mock's (which overlaps the avail ring's used_event).
    pub used: GuestAddress,
    last_used: u16,
}

impl<'a> TestRing<'a> {
    pub fn new(mem: &'a GuestRam, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::new(mem, size),
            mem,
            size,
            next_desc: 0,
            used: GuestAddress(0x8_0000),
            last_used: 0,
        }
    }

    /// The device's side: a ready queue over these rings.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q: Queue = self.mock.create_queue().unwrap();
        q.try_set_used_ring_address(self.used).unwrap();
        q.set_event_idx(event_idx);
        q
    }

    /// Writes a chain of `bufs` on the next free descriptors (wrapping) and makes it available.
    /// Returns its head.
    pub fn post(&mut self, bufs: &[Buf]) -> u16 {
        let n = u16::try_from(bufs.len()).unwrap();
        let head = self.next_desc;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let k = u16::try_from(k).unwrap();
            let i = (head + k) % self.size;
            let mut flags = if write { WRITE } else { 0 };
            let next = (i + 1) % self.size;
            if k + 1 < n {
                flags |= NEXT;
            }
            self.mock
                .desc_table()
                .store(i, desc(addr, len, flags, next))
                .unwrap();
        }
        self.next_desc = (head + n) % self.size;
        self.post_head(head);
        head
    }

    /// Makes descriptor `head` available as it is.
    pub fn post_head(&mut self, head: u16) {
        let idx = self.mock.avail().idx().load();
        self.mock
            .avail()
            .ring()
            .ref_at(usize::from(idx % self.size))
            .unwrap()
            .store(head);
        fence(Ordering::SeqCst);
        self.mock.avail().idx().store(idx.wrapping_add(1));
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
    }

    /// New used entries `(head, len)` since the last call.
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.last_used != end {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.last_used % self.size));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, v: u16) {
        let at = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(self.size));
        self.mem.write_obj(v, at).unwrap();
    }

    /// The device's `avail_event` (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
        self.mem.read_obj(at).unwrap()
    }

    /// The used ring's flags (`VRING_USED_F_NO_NOTIFY`).
    pub fn used_flags(&self) -> u16 {
        self.mem.read_obj(self.used).unwrap()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
