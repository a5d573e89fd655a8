//! Walking one descriptor chain into the guest-memory segments it describes, refusing
//! everything a driver must not post: descriptors of the wrong direction (device-readable in a
//! receive buffer, device-writable in a transmit chain), zero-length descriptors, descriptors
//! outside guest memory, broken chains (a bad index, a loop, a bad indirect table) and chains
//! of more than [`MAX_DESCRIPTORS`] descriptors.

#![forbid(unsafe_code)]

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestRam;

/// Most descriptors one chain may have (indirect tables included). Linux uses at most
/// `MAX_SKB_FRAGS + 2` (19) per frame.
pub const MAX_DESCRIPTORS: usize = 512;

/// One piece of guest memory holding part of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    #[error("the descriptor chain is broken (bad index, loop or bad indirect table)")]
    Broken,
    #[error("the descriptor chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("a device-readable descriptor in a receive buffer")]
    ReadableInReceive,
    #[error("a device-writable descriptor in a transmit chain")]
    WritableInTransmit,
    #[error("a descriptor of length 0")]
    ZeroLength,
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// Which way the chain's data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Receive buffers: every descriptor device-writable.
    Receive,
    /// Transmit chains: every descriptor device-readable.
    Transmit,
}

/// Appends the segments of `chain` to `segs` and returns their total length. On error,
/// `segs` is left as it was.
pub fn collect(
    mem: &GuestRam,
    chain: DescriptorChain<&GuestRam>,
    dir: Direction,
    segs: &mut Vec<Segment>,
) -> Result<u64, ChainError> {
    let start = segs.len();
    let result = walk(mem, chain, dir, segs);
    if result.is_err() {
        segs.truncate(start);
    }
    result
}

fn walk(
    mem: &GuestRam,
    chain: DescriptorChain<&GuestRam>,
    dir: Direction,
    segs: &mut Vec<Segment>,
) -> Result<u64, ChainError> {
    let mut total = 0u64;
    let mut count = 0usize;
    let mut last_has_next = true;
    // The iterator stops early, without saying so, on a bad index, a loop (more descriptors
    // than the table holds), a bad indirect table or a length overflow; in each case the last
    // descriptor it yielded still says "next".
    for desc in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(ChainError::TooManyDescriptors);
        }
        match (dir, desc.is_write_only()) {
            (Direction::Receive, false) => return Err(ChainError::ReadableInReceive),
            (Direction::Transmit, true) => return Err(ChainError::WritableInTransmit),
            _ => {}
        }
        let len = desc.len();
        if len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let addr = desc.addr();
        let inside = usize::try_from(len).is_ok_and(|l| mem.check_range(addr, l));
        if !inside {
            return Err(ChainError::OutsideMemory { addr: addr.0, len });
        }
        segs.push(Segment { addr, len });
        total += u64::from(len);
        last_has_next = desc.has_next();
    }
    if count == 0 || last_has_next {
        return Err(ChainError::Broken);
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::Bytes;

    use super::*;

    pub const NEXT: u16 = flag(VRING_DESC_F_NEXT);
    pub const WRITE: u16 = flag(VRING_DESC_F_WRITE);
    pub const INDIRECT: u16 = flag(VRING_DESC_F_INDIRECT);

    /// The 16-bit descriptor flags.
    const fn flag(v: u32) -> u16 {
        let b = v.to_le_bytes();
        u16::from_le_bytes([b[0], b[1]])
    }

    /// 16 MiB of test guest memory.
    pub fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Stores `descs` at descriptor indices `0..`, makes index 0 available, and returns
    /// the chain popped from a fresh queue.
    fn chain_of<'a>(
        q: &MockSplitQueue<'a, GuestRam>,
        mem: &'a GuestRam,
        descs: &[RawDescriptor],
    ) -> DescriptorChain<&'a GuestRam> {
        for (i, d) in descs.iter().enumerate() {
            q.desc_table().store(u16::try_from(i).unwrap(), *d).unwrap();
        }
        q.avail().ring().ref_at(0).unwrap().store(0);
        q.avail().idx().store(1);
        let mut queue: Queue = q.create_queue().unwrap();
        queue.iter(mem).unwrap().next().unwrap()
    }

    fn run(descs: &[RawDescriptor], dir: Direction) -> (Result<u64, ChainError>, Vec<Segment>) {
        let mem = ram();
        let q = MockSplitQueue::new(&mem, 16);
        let chain = chain_of(&q, &mem, descs);
        let mut segs = vec![Segment {
            addr: GuestAddress(1),
            len: 1,
        }];
        let r = collect(&mem, chain, dir, &mut segs);
        (r, segs)
    }

    #[test]
    fn collects_segments_in_order() {
        let (r, segs) = run(
            &[
                desc(0x10_0000, 12, WRITE | NEXT, 1),
                desc(0x20_0000, 1500, WRITE | NEXT, 2),
                desc(0x30_0000, 100, WRITE, 0),
            ],
            Direction::Receive,
        );
        assert_eq!(r, Ok(1612));
        assert_eq!(
            &segs[1..],
            [
                Segment {
                    addr: GuestAddress(0x10_0000),
                    len: 12
                },
                Segment {
                    addr: GuestAddress(0x20_0000),
                    len: 1500
                },
                Segment {
                    addr: GuestAddress(0x30_0000),
                    len: 100
                },
            ]
        );
        let (r, _) = run(&[desc(0x10_0000, 60, 0, 0)], Direction::Transmit);
        assert_eq!(r, Ok(60));
    }

    #[test]
    fn refuses_malformed_chains_and_leaves_segments_alone() {
        let cases: Vec<(Vec<RawDescriptor>, Direction, ChainError)> = vec![
            (
                vec![
                    desc(0x10_0000, 12, WRITE | NEXT, 1),
                    desc(0x20_0000, 10, 0, 0),
                ],
                Direction::Receive,
                ChainError::ReadableInReceive,
            ),
            (
                vec![desc(0x10_0000, 12, NEXT, 1), desc(0x20_0000, 10, WRITE, 0)],
                Direction::Transmit,
                ChainError::WritableInTransmit,
            ),
            (
                vec![desc(0x10_0000, 12, NEXT, 1), desc(0x20_0000, 0, 0, 0)],
                Direction::Transmit,
                ChainError::ZeroLength,
            ),
            (
                vec![desc(16 << 20, 12, 0, 0)],
                Direction::Transmit,
                ChainError::OutsideMemory {
                    addr: 16 << 20,
                    len: 12,
                },
            ),
            (
                vec![desc((16 << 20) - 4, 12, 0, 0)],
                Direction::Transmit,
                ChainError::OutsideMemory {
                    addr: (16 << 20) - 4,
                    len: 12,
                },
            ),
            // A loop: 0 -> 1 -> 0.
            (
                vec![desc(0x10_0000, 12, NEXT, 1), desc(0x20_0000, 10, NEXT, 0)],
                Direction::Transmit,
                ChainError::Broken,
            ),
            // "next" beyond the table.
            (
                vec![desc(0x10_0000, 12, NEXT, 99)],
                Direction::Transmit,
                ChainError::Broken,
            ),
            // An indirect table whose length is not a multiple of 16.
            (
                vec![desc(0x40_0000, 20, INDIRECT, 0)],
                Direction::Transmit,
                ChainError::Broken,
            ),
        ];
        for (descs, dir, want) in cases {
            let (r, segs) = run(&descs, dir);
            assert_eq!(r, Err(want), "{descs:?}");
            assert_eq!(segs.len(), 1, "segments kept on error");
        }
    }

    #[test]
    fn indirect_tables_are_followed_and_bounded() {
        let mem = ram();
        let q = MockSplitQueue::new(&mem, 16);
        let table = 0x40_0000u64;
        for (i, d) in [desc(0x10_0000, 12, NEXT, 1), desc(0x20_0000, 48, 0, 0)]
            .iter()
            .enumerate()
        {
            let at = GuestAddress(table + 16 * u64::try_from(i).unwrap());
            mem.write_obj(*d, at).unwrap();
        }
        let chain = chain_of(&q, &mem, &[desc(table, 32, INDIRECT, 0)]);
        let mut segs = Vec::new();
        assert_eq!(collect(&mem, chain, Direction::Transmit, &mut segs), Ok(60));
        assert_eq!(segs.len(), 2);

        // A 600-entry indirect chain is longer than MAX_DESCRIPTORS.
        let n = 600u16;
        for i in 0..n {
            let flags = if i + 1 < n { NEXT } else { 0 };
            let at = GuestAddress(table + 16 * u64::from(i));
            mem.write_obj(desc(0x10_0000, 1, flags, i + 1), at).unwrap();
        }
        let chain = chain_of(&q, &mem, &[desc(table, 16 * u32::from(n), INDIRECT, 0)]);
        assert_eq!(
            collect(&mem, chain, Direction::Transmit, &mut segs),
            Err(ChainError::TooManyDescriptors)
        );
        assert_eq!(segs.len(), 2);
    }
}
