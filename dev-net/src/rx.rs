//! Placing one received frame (virtio-net header first) into the receive buffers the guest
//! posted, in ring order.
//!
//! - Without `VIRTIO_NET_F_MRG_RXBUF` a frame goes into exactly one buffer (chain); a frame
//!   larger than the next buffer is dropped and the buffer stays available for the next frame.
//! - With it, a frame spreads over as many buffers as it needs and `num_buffers` in its header
//!   says how many; a frame larger than the whole ring could ever hold is dropped.
//! - When the ring runs out of buffers, every buffer taken for the frame is put back (the
//!   available index is rewound) and the caller keeps the frame until the guest posts more.
//! - A malformed buffer (see [`crate::chain`]) or one shorter than the header is completed
//!   unused (length 0) at once. Buffers taken before it for the same frame are completed
//!   unused too, so the used ring stays in ring order; the frame then starts over in the
//!   buffers after it.

#![forbid(unsafe_code)]

use std::ops::Range;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryError};

use crate::GuestRam;
use crate::chain::{ChainError, Direction, Segment, collect};
use crate::header::NUM_BUFFERS_OFFSET;

/// What became of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Written into `buffers` buffers, which are in the used ring.
    Delivered { buffers: u16 },
    /// The ring has too few buffers right now; nothing was consumed for this frame.
    NoBuffers,
    /// The frame cannot fit the buffers the guest posts; nothing was consumed for it.
    DoesNotFit,
}

/// A receive buffer that was completed unused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadBuffer {
    #[error("{0}")]
    Chain(ChainError),
    #[error("a receive buffer of {len} bytes is shorter than the {header}-byte header")]
    ShorterThanHeader { len: u64, header: usize },
}

/// Errors of the ring itself.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("cannot publish a used entry")]
    Used(#[source] virtio_queue::Error),
    #[error("cannot write a frame into guest memory")]
    Memory(#[source] GuestMemoryError),
}

/// Buffers taken for the frame being placed.
#[derive(Debug)]
struct Taken {
    head: u16,
    segs: Range<usize>,
}

/// Reusable allocations of [`place`].
#[derive(Debug, Default)]
pub struct Scratch {
    segs: Vec<Segment>,
    taken: Vec<Taken>,
}

/// Places `frame` (a `hdr_len`-byte virtio-net header, then the Ethernet frame) into the
/// buffers of `queue`, sets `num_buffers` (12-byte headers only: the count with `mrg`, 1
/// without), and publishes the used entries. `on_bad` hears of every buffer completed unused.
pub fn place(
    queue: &mut Queue,
    mem: &GuestRam,
    frame: &mut [u8],
    hdr_len: usize,
    mrg: bool,
    scratch: &mut Scratch,
    on_bad: &mut dyn FnMut(u16, BadBuffer),
) -> Result<Placement, PlaceError> {
    scratch.segs.clear();
    scratch.taken.clear();
    let need = u64::try_from(frame.len()).unwrap_or(u64::MAX);
    let limit = if mrg { usize::from(queue.size()) } else { 1 };
    let mut cap = 0u64;
    while cap < need {
        if scratch.taken.len() >= limit {
            rewind(queue, scratch.taken.len());
            return Ok(Placement::DoesNotFit);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            rewind(queue, scratch.taken.len());
            return Ok(Placement::NoBuffers);
        };
        let head = chain.head_index();
        let start = scratch.segs.len();
        let bad = match collect(mem, chain, Direction::Receive, &mut scratch.segs) {
            Ok(len) if len >= u64::try_from(hdr_len).unwrap_or(u64::MAX) => {
                scratch.taken.push(Taken {
                    head,
                    segs: start..scratch.segs.len(),
                });
                cap += len;
                None
            }
            Ok(len) => Some(BadBuffer::ShorterThanHeader {
                len,
                header: hdr_len,
            }),
            Err(e) => Some(BadBuffer::Chain(e)),
        };
        if let Some(why) = bad {
            // In ring order: the buffers taken before the bad one go back unused first.
            for t in scratch.taken.drain(..) {
                queue.add_used(mem, t.head, 0).map_err(PlaceError::Used)?;
            }
            scratch.segs.clear();
            cap = 0;
            // A head outside the ring cannot be completed; the driver's own bookkeeping is
            // broken then, and there is nothing better to do than to skip it.
            let _ = queue.add_used(mem, head, 0);
            on_bad(head, why);
        }
    }

    let buffers = u16::try_from(scratch.taken.len()).unwrap_or(u16::MAX);
    if hdr_len >= NUM_BUFFERS_OFFSET + 2 {
        let n = if mrg { buffers } else { 1 };
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
    }
    let mut off = 0usize;
    let mut failed = None;
    for t in &scratch.taken {
        let mut written = 0usize;
        if failed.is_none() {
            for seg in &scratch.segs[t.segs.clone()] {
                let left = frame.len() - off;
                if left == 0 {
                    break;
                }
                let n = left.min(usize::try_from(seg.len).unwrap_or(usize::MAX));
                if let Err(e) = mem.write_slice(&frame[off..off + n], seg.addr) {
                    failed = Some(e);
                    written = 0;
                    break;
                }
                off += n;
                written += n;
            }
        }
        let len = u32::try_from(written).unwrap_or(u32::MAX);
        queue.add_used(mem, t.head, len).map_err(PlaceError::Used)?;
    }
    match failed {
        Some(e) => Err(PlaceError::Memory(e)),
        None => Ok(Placement::Delivered { buffers }),
    }
}

fn rewind(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::ram;
    use crate::test_ring::TestRing;

    const QSIZE: u16 = 16;

    /// A frame of `len` bytes after a 12-byte header whose bytes are all 0xaa.
    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0xaa; 12];
        f.extend((0..len).map(|i| u8::try_from(i % 253).unwrap()));
        f
    }

    fn run(
        q: &mut Queue,
        mem: &GuestRam,
        f: &mut [u8],
        mrg: bool,
    ) -> (Placement, Vec<(u16, BadBuffer)>) {
        let mut bad = Vec::new();
        let p = place(q, mem, f, 12, mrg, &mut Scratch::default(), &mut |h, b| {
            bad.push((h, b))
        })
        .unwrap();
        (p, bad)
    }

    #[test]
    fn one_buffer_per_frame_without_mergeable_buffers() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let h0 = r.post(&[(0x10_0000, 12, true), (0x10_1000, 2000, true)]);
        let h1 = r.post(&[(0x20_0000, 1000, true)]);
        let mut q = r.queue(false);
        let mut f = frame(1500);
        assert_eq!(
            run(&mut q, &mem, &mut f, false).0,
            Placement::Delivered { buffers: 1 }
        );
        assert_eq!(r.take_used(), [(h0, 1512)]);
        // Header split from the data, num_buffers = 1.
        let mut want = f.clone();
        want[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(r.read(0x10_0000, 12), want[..12]);
        assert_eq!(r.read(0x10_1000, 1500), want[12..]);
        // The next buffer is too small: the frame is dropped, the buffer stays.
        let mut big = frame(1500);
        assert_eq!(run(&mut q, &mem, &mut big, false).0, Placement::DoesNotFit);
        assert!(r.take_used().is_empty());
        let mut small = frame(900);
        assert_eq!(
            run(&mut q, &mem, &mut small, false).0,
            Placement::Delivered { buffers: 1 }
        );
        assert_eq!(r.take_used(), [(h1, 912)]);
        assert_eq!(run(&mut q, &mem, &mut small, false).0, Placement::NoBuffers);
    }

    #[test]
    fn mergeable_buffers_spread_a_frame_and_count_them() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let heads: Vec<u16> = (0..4u64)
            .map(|i| r.post(&[(0x10_0000 + i * 0x1000, 1024, true)]))
            .collect();
        let mut q = r.queue(false);
        let mut f = frame(2500); // 2512 bytes: 3 buffers
        assert_eq!(
            run(&mut q, &mem, &mut f, true).0,
            Placement::Delivered { buffers: 3 }
        );
        assert_eq!(
            r.take_used(),
            [(heads[0], 1024), (heads[1], 1024), (heads[2], 464)]
        );
        let mut got = r.read(0x10_0000, 1024);
        got.extend(r.read(0x10_1000, 1024));
        got.extend(r.read(0x10_2000, 464));
        let mut want = f.clone();
        want[10..12].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(got, want);

        // One buffer left, two needed: nothing is consumed and the frame waits.
        let mut f = frame(1500);
        assert_eq!(run(&mut q, &mem, &mut f, true).0, Placement::NoBuffers);
        assert!(r.take_used().is_empty());
        let h4 = r.post(&[(0x10_4000, 1024, true)]);
        assert_eq!(
            run(&mut q, &mem, &mut f, true).0,
            Placement::Delivered { buffers: 2 }
        );
        assert_eq!(r.take_used(), [(heads[3], 1024), (h4, 488)]);
    }

    #[test]
    fn a_frame_larger_than_the_ring_is_dropped_without_consuming_buffers() {
        let mem = ram();
        let mut r = TestRing::new(&mem, 4);
        for i in 0..4u64 {
            r.post(&[(0x10_0000 + i * 0x1000, 100, true)]);
        }
        let mut q = r.queue(false);
        let mut f = frame(1000);
        assert_eq!(run(&mut q, &mem, &mut f, true).0, Placement::DoesNotFit);
        assert!(r.take_used().is_empty());
        let mut f = frame(300);
        assert_eq!(
            run(&mut q, &mem, &mut f, true).0,
            Placement::Delivered { buffers: 4 }
        );
    }

    #[test]
    fn bad_buffers_are_completed_unused_in_ring_order() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        let good0 = r.post(&[(0x10_0000, 1024, true)]);
        let readable = r.post(&[(0x11_0000, 1024, false)]);
        let short = r.post(&[(0x12_0000, 8, true)]);
        let outside = r.post(&[(0xf000_0000, 1024, true)]);
        let good1 = r.post(&[(0x13_0000, 1024, true)]);
        let good2 = r.post(&[(0x14_0000, 1024, true)]);
        let mut q = r.queue(false);
        let mut f = frame(1500);
        let (p, bad) = run(&mut q, &mem, &mut f, true);
        assert_eq!(p, Placement::Delivered { buffers: 2 });
        assert_eq!(
            bad,
            [
                (readable, BadBuffer::Chain(ChainError::ReadableInReceive)),
                (short, BadBuffer::ShorterThanHeader { len: 8, header: 12 }),
                (
                    outside,
                    BadBuffer::Chain(ChainError::OutsideMemory {
                        addr: 0xf000_0000,
                        len: 1024
                    })
                ),
            ]
        );
        assert_eq!(
            r.take_used(),
            [
                (good0, 0),
                (readable, 0),
                (short, 0),
                (outside, 0),
                (good1, 1024),
                (good2, 488)
            ]
        );
        assert_eq!(r.read(0x13_0000 + 10, 2), 2u16.to_le_bytes());
    }

    #[test]
    fn a_bad_head_index_is_skipped() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        r.post_head(QSIZE + 3);
        let good = r.post(&[(0x10_0000, 2048, true)]);
        let mut q = r.queue(false);
        let mut f = frame(100);
        let (p, bad) = run(&mut q, &mem, &mut f, false);
        assert_eq!(p, Placement::Delivered { buffers: 1 });
        assert_eq!(bad, [(QSIZE + 3, BadBuffer::Chain(ChainError::Broken))]);
        assert_eq!(r.take_used(), [(good, 112)]);
    }

    #[test]
    fn legacy_headers_have_no_num_buffers() {
        let mem = ram();
        let mut r = TestRing::new(&mem, QSIZE);
        r.post(&[(0x10_0000, 2048, true)]);
        let mut q = r.queue(false);
        let mut f = vec![0xaa; 10 + 60];
        let mut bad = Vec::new();
        let p = place(
            &mut q,
            &mem,
            &mut f,
            10,
            false,
            &mut Scratch::default(),
            &mut |h, b| bad.push((h, b)),
        )
        .unwrap();
        assert_eq!(p, Placement::Delivered { buffers: 1 });
        assert_eq!(r.read(0x10_0000, 70), vec![0xaa; 70]);
    }
}
