//! Unit tests of request parsing, validation and execution, on virtio-queue's mock rings.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::DiskGeometry;

pub(crate) const MEM_SIZE: u64 = 16 << 20;
pub(crate) const HDR: u64 = 0x10000;
pub(crate) const DATA: u64 = 0x20000;
pub(crate) const STATUS: u64 = 0xf000;
pub(crate) const CAPACITY: u64 = 64; // sectors

/// `VRING_DESC_F_WRITE`, `VRING_DESC_F_NEXT`, `VRING_DESC_F_INDIRECT` as descriptor flags.
pub(crate) const W: u16 = 2;
pub(crate) const NEXT: u16 = 1;
pub(crate) const INDIRECT: u16 = 4;
pub(crate) const R: u16 = 0;

pub(crate) fn ram() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())]).unwrap()
}

pub(crate) fn geometry(readonly: bool) -> DiskGeometry {
    DiskGeometry {
        capacity_sectors: CAPACITY,
        readonly,
        serial: *b"test-serial-0123\0\0\0\0",
        num_queues: 1,
        queue_size: 16,
        physical_block_size: 4096,
    }
}

/// An in-memory disk that panics on any access outside itself, so a validation gap shows up.
#[derive(Debug)]
pub(crate) struct FakeDisk {
    pub data: Vec<u8>,
    pub flushes: u32,
    pub discards: Vec<(u64, u64)>,
    pub zeroed: Vec<(u64, u64, bool)>,
    pub calls: u32,
}

impl FakeDisk {
    pub fn new() -> Self {
        let len = usize::try_from(CAPACITY * SECTOR_SIZE).unwrap();
        Self {
            data: (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect(),
            flushes: 0,
            discards: Vec::new(),
            zeroed: Vec::new(),
            calls: 0,
        }
    }

    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let start = usize::try_from(offset).unwrap();
        let end = start + usize::try_from(len).unwrap();
        assert!(
            end <= self.data.len(),
            "access past the end: {start}..{end}"
        );
        start..end
    }
}

impl Disk for FakeDisk {
    fn read(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()> {
        self.calls += 1;
        let r = self.range(offset, stream_len(segs));
        copy_to_guest(mem, segs, 0, &self.data[r]).map_err(io::Error::other)
    }

    fn write(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()> {
        self.calls += 1;
        let r = self.range(offset, stream_len(segs));
        copy_from_guest(mem, segs, 0, &mut self.data[r]).map_err(io::Error::other)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.calls += 1;
        self.flushes += 1;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.calls += 1;
        let _ = self.range(offset, len);
        self.discards.push((offset, len));
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.calls += 1;
        let r = self.range(offset, len);
        self.data[r].fill(0);
        self.zeroed.push((offset, len, unmap));
        Ok(())
    }
}

pub(crate) fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

pub(crate) fn header(mem: &GuestRam, at: u64, kind: u32, sector: u64) {
    let mut raw = [0u8; 16];
    raw[0..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

/// Runs one chain built from `descs` (NEXT flags and indices are filled in).
fn run(mem: &GuestRam, descs: &[RawDescriptor], disk: &mut FakeDisk, readonly: bool) -> Outcome {
    mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let mut h = RequestHandler::new(geometry(readonly));
    h.handle(mem, chain, disk)
}

fn status(mem: &GuestRam) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

#[test]
fn read_into_two_segments() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    let out = run(
        &mem,
        &[
            desc(HDR, 16, R),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 512, W),
            desc(STATUS, 1, W),
        ],
        &mut disk,
        false,
    );
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.used_len, 1025);
    assert_eq!(status(&mem), OK);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got[..512], GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut got[512..], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got, disk.data[1024..2048]);
}

#[test]
fn write_with_split_header_and_shared_status_descriptor() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    // The header is cut in two descriptors, and the second also carries the data start.
    let payload: Vec<u8> = (0..1024u32)
        .map(|i| u8::try_from(i % 7).unwrap() + 100)
        .collect();
    let mut stream = vec![0u8; 8];
    mem.read_slice(&mut stream, GuestAddress(HDR + 8)).unwrap();
    mem.write_slice(&stream, GuestAddress(DATA)).unwrap();
    mem.write_slice(&payload, GuestAddress(DATA + 8)).unwrap();
    let out = run(
        &mem,
        &[desc(HDR, 8, R), desc(DATA, 8 + 1024, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.used_len, 1);
    assert_eq!(status(&mem), OK);
    assert_eq!(disk.data[3 * 512..3 * 512 + 1024], payload[..]);
}

#[test]
fn status_byte_may_share_the_last_data_descriptor() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mem.write_obj(0xaau8, GuestAddress(DATA + 512)).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let chain = q
        .build_desc_chain(&[desc(HDR, 16, R), desc(DATA, 513, W)])
        .unwrap();
    let out = RequestHandler::new(geometry(false)).handle(&mem, chain, &mut disk);
    assert!(out.error.is_none());
    assert_eq!(out.used_len, 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(), OK);
}

#[test]
fn flush_and_readonly_flush() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none());
    assert_eq!((disk.flushes, status(&mem)), (1, OK));
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        true,
    );
    assert!(out.error.is_none());
    assert_eq!((disk.flushes, status(&mem)), (1, OK));
}

#[test]
fn get_id_full_and_short_buffer() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
        &mut disk,
        true,
    );
    assert_eq!(out.used_len, 21);
    assert_eq!(status(&mem), OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"test-serial-0123\0\0\0\0");

    mem.write_slice(&[0xeeu8; 20], GuestAddress(DATA)).unwrap();
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 4, W), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert_eq!(out.used_len, 5);
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..5], b"test\xee");
}

fn discard_segment(mem: &GuestRam, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, DATA, 4, 8, 0);
    discard_segment(&mem, DATA + 16, 20, 2, 0);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(disk.discards, vec![(4 * 512, 8 * 512), (20 * 512, 2 * 512)]);

    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&mem, DATA, 10, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(disk.zeroed, vec![(10 * 512, 3 * 512, true)]);
    assert!(disk.data[10 * 512..13 * 512].iter().all(|&b| b == 0));
    assert_eq!(status(&mem), OK);
}

#[test]
fn discard_validation_is_all_or_nothing() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    // First segment fine, second past the end: nothing may be zeroed.
    discard_segment(&mem, DATA, 0, 4, 0);
    discard_segment(&mem, DATA + 16, CAPACITY - 1, 2, 0);
    let before = disk.data.clone();
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(matches!(out.error, Some(RequestError::OutOfRange { .. })));
    assert_eq!(status(&mem), IOERR);
    assert_eq!(disk.data, before);
    assert_eq!(disk.calls, 0);

    // Discard with UNMAP (reserved for discard) and write-zeroes with a reserved bit: UNSUPP.
    header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&mem, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(matches!(out.error, Some(RequestError::BadFlags { .. })));
    assert_eq!(status(&mem), UNSUPP);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&mem, DATA, 0, 1, 0x2);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert_eq!(status(&mem), UNSUPP, "{:?}", out.error);

    // No segment, a partial segment, too many segments, a too-large segment: IOERR.
    for (len, sectors) in [
        (0u32, 1u32),
        (24, 1),
        (16 * 33, 1),
        (16, MAX_DISCARD_SECTORS + 1),
    ] {
        discard_segment(&mem, DATA, 0, sectors, 0);
        let mut descs = vec![desc(HDR, 16, R)];
        if len > 0 {
            descs.push(desc(DATA, len, R));
        }
        descs.push(desc(STATUS, 1, W));
        let out = run(&mem, &descs, &mut disk, false);
        assert_eq!(status(&mem), IOERR, "len {len}: {:?}", out.error);
    }
    assert_eq!(disk.calls, 0);
}

#[test]
fn readonly_refuses_every_write() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    let before = disk.data.clone();
    for kind in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        header(&mem, HDR, kind, 0);
        discard_segment(&mem, DATA, 0, 1, 0);
        let out = run(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            &mut disk,
            true,
        );
        assert!(matches!(out.error, Some(RequestError::ReadOnly(k)) if k == kind));
        assert_eq!(status(&mem), IOERR);
    }
    assert_eq!(disk.calls, 0);
    assert_eq!(disk.data, before);
}

#[test]
fn out_of_range_and_overflowing_sectors() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_IN, CAPACITY, 512),
        (VIRTIO_BLK_T_IN, CAPACITY - 1, 1024),
        (VIRTIO_BLK_T_OUT, CAPACITY - 1, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, 512),
        (VIRTIO_BLK_T_IN, CAPACITY + 1, 0),
    ] {
        header(&mem, HDR, kind, sector);
        let data_flags = if kind == VIRTIO_BLK_T_IN { W } else { R };
        let mut descs = vec![desc(HDR, 16, R)];
        if len > 0 {
            descs.push(desc(DATA, len, data_flags));
        }
        descs.push(desc(STATUS, 1, W));
        let out = run(&mem, &descs, &mut disk, false);
        assert!(
            matches!(out.error, Some(RequestError::OutOfRange { .. })),
            "sector {sector}: {:?}",
            out.error
        );
        assert_eq!(out.used_len, 1);
        assert_eq!(status(&mem), IOERR);
    }
    assert_eq!(disk.calls, 0);
    // The last sector itself is fine.
    header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY - 1);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none());
}

#[test]
fn unaligned_and_oversized_lengths() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(matches!(
        out.error,
        Some(RequestError::UnalignedLength(100))
    ));
    assert_eq!(status(&mem), IOERR);
    // Five 15 MiB descriptors over the same memory: 75 MiB > MAX_REQUEST_BYTES.
    let mut descs = vec![desc(HDR, 16, R)];
    descs.extend((0..5).map(|_| desc(0x10_0000, 15 << 20, W)));
    descs.push(desc(STATUS, 1, W));
    let out = run(&mem, &descs, &mut disk, false);
    assert!(
        matches!(out.error, Some(RequestError::TooLarge(_))),
        "{:?}",
        out.error
    );
    assert_eq!(status(&mem), IOERR);
    assert_eq!(disk.calls, 0);
}

#[test]
fn chains_without_a_usable_status_byte_complete_with_length_zero() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Only readable descriptors.
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, R)],
        &mut disk,
        false,
    );
    assert!(matches!(out.error, Some(RequestError::NoStatus)));
    assert_eq!((out.used_len, out.status), (0, None));
    // Status descriptor read-only after a writable data descriptor.
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, R)],
        &mut disk,
        false,
    );
    assert_eq!((out.used_len, out.status), (0, None));
    assert!(matches!(
        out.error,
        Some(RequestError::ReadableAfterWritable)
    ));
    // Status descriptor outside guest memory.
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(MEM_SIZE, 1, W)],
        &mut disk,
        false,
    );
    assert_eq!((out.used_len, out.status), (0, None));
    // Zero-length final writable descriptor.
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 0, W)],
        &mut disk,
        false,
    );
    assert_eq!((out.used_len, out.status), (0, None));
    assert_eq!(disk.calls, 0);
}

#[test]
fn structural_faults_with_a_status_byte_report_ioerr() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    // Readable after writable, but the chain still ends with a writable status.
    let out = run(
        &mem,
        &[
            desc(HDR, 16, R),
            desc(DATA, 512, W),
            desc(DATA, 512, R),
            desc(STATUS, 1, W),
        ],
        &mut disk,
        false,
    );
    assert!(matches!(
        out.error,
        Some(RequestError::ReadableAfterWritable)
    ));
    assert_eq!(status(&mem), IOERR);
    // Data outside guest memory.
    let out = run(
        &mem,
        &[
            desc(HDR, 16, R),
            desc(MEM_SIZE - 256, 512, R),
            desc(STATUS, 1, W),
        ],
        &mut disk,
        false,
    );
    assert!(matches!(
        out.error,
        Some(RequestError::OutsideMemory { .. })
    ));
    assert_eq!(status(&mem), IOERR);
    // Header too short.
    let out = run(
        &mem,
        &[desc(HDR, 8, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(matches!(out.error, Some(RequestError::ShortHeader(8))));
    assert_eq!(status(&mem), IOERR);
    // Unknown types.
    for kind in [10u32, 0xff, VIRTIO_BLK_T_SECURE_ERASE_FOR_TEST] {
        header(&mem, HDR, kind, 0);
        let out = run(
            &mem,
            &[desc(HDR, 16, R), desc(STATUS, 1, W)],
            &mut disk,
            false,
        );
        assert!(matches!(out.error, Some(RequestError::Unsupported(k)) if k == kind));
        assert_eq!(status(&mem), UNSUPP);
    }
    assert_eq!(disk.calls, 0);
}

const VIRTIO_BLK_T_SECURE_ERASE_FOR_TEST: u32 = 14;

/// Writes raw descriptors at table indices and makes `head` available.
fn raw_chain(
    mem: &GuestRam,
    q: &MockSplitQueue<'_, GuestRam>,
    descs: &[(u16, RawDescriptor)],
    head: u16,
) {
    for &(i, d) in descs {
        q.desc_table().store(i, d).unwrap();
    }
    let idx = q.avail().idx().load();
    q.avail()
        .ring()
        .ref_at(usize::from(idx % 16))
        .unwrap()
        .store(head);
    q.avail().idx().store(idx.wrapping_add(1));
    let _ = mem;
}

pub(crate) fn linked(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

#[test]
fn broken_and_looping_chains() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let q = MockSplitQueue::new(&mem, 16);
    let next = NEXT;
    // next index out of the table.
    raw_chain(&mem, &q, &[(0, linked(HDR, 16, R | next, 100))], 0);
    // a loop 1 -> 2 -> 1.
    raw_chain(
        &mem,
        &q,
        &[
            (1, linked(HDR, 16, R | next, 2)),
            (2, linked(STATUS, 1, W | next, 1)),
        ],
        1,
    );
    // head index out of the table.
    raw_chain(&mem, &q, &[], 40);
    let mut queue: Queue = q.create_queue().unwrap();
    let mut h = RequestHandler::new(geometry(false));
    for _ in 0..3 {
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        let out = h.handle(&mem, chain, &mut disk);
        assert!(
            matches!(out.error, Some(RequestError::BrokenChain)),
            "{:?}",
            out.error
        );
        assert_eq!((out.used_len, out.status), (0, None));
    }
    assert!(queue.iter(&mem).unwrap().next().is_none());
    assert_eq!(disk.calls, 0);
}

#[test]
fn indirect_chain_and_descriptor_limit() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let q = MockSplitQueue::new(&mem, 16);
    let next = NEXT;
    let table = 0x8000u64;
    let entries = [
        linked(HDR, 16, R | next, 1),
        linked(DATA, 512, W | next, 2),
        linked(STATUS, 1, W, 0),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(table + 16 * u64::try_from(i).unwrap()))
            .unwrap();
    }
    raw_chain(&mem, &q, &[(0, linked(table, 48, INDIRECT, 0))], 0);
    let mut queue: Queue = q.create_queue().unwrap();
    let mut h = RequestHandler::new(geometry(false));
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let out = h.handle(&mem, chain, &mut disk);
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.used_len, 513);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.data[512..1024]);

    // Queue size 16 allows 14 data segments + header + status; 15 data segments is too many.
    let mut descs = vec![desc(HDR, 16, R)];
    descs.extend((0..15u64).map(|i| desc(DATA + i * 512, 512, W)));
    descs.push(desc(STATUS, 1, W));
    let q2 = MockSplitQueue::new(&mem, 32);
    let chain = q2.build_desc_chain(&descs).unwrap();
    let out = h.handle(&mem, chain, &mut disk);
    assert!(matches!(
        out.error,
        Some(RequestError::TooManyDescriptors(16))
    ));
    assert_eq!(out.used_len, 0);
}

#[test]
fn zero_length_transfer_is_a_no_op_success() {
    let mem = ram();
    let mut disk = FakeDisk::new();
    header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY);
    let out = run(
        &mem,
        &[desc(HDR, 16, R), desc(STATUS, 1, W)],
        &mut disk,
        false,
    );
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.used_len, 1);
}

#[test]
fn sub_stream_and_copies_cross_segments() {
    let mem = ram();
    let segs = [
        Segment {
            addr: GuestAddress(0x1000),
            len: 3,
        },
        Segment {
            addr: GuestAddress(0x2000),
            len: 5,
        },
        Segment {
            addr: GuestAddress(0x3000),
            len: 4,
        },
    ];
    let mut out = Vec::new();
    sub_stream(&segs, 2, 7, &mut out);
    assert_eq!(
        out,
        vec![
            Segment {
                addr: GuestAddress(0x1002),
                len: 1
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 5
            },
            Segment {
                addr: GuestAddress(0x3000),
                len: 1
            },
        ]
    );
    copy_to_guest(&mem, &segs, 1, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).unwrap();
    let mut back = [0u8; 11];
    copy_from_guest(&mem, &segs, 1, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert!(copy_from_guest(&mem, &segs, 2, &mut [0u8; 11]).is_err());
}

#[test]
fn flag_constants_match_the_bindings() {
    assert_eq!(u32::from(W), VRING_DESC_F_WRITE);
    assert_eq!(u32::from(NEXT), VRING_DESC_F_NEXT);
    assert_eq!(u32::from(INDIRECT), VRING_DESC_F_INDIRECT);
}
