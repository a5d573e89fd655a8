//! virtio-blk requests: walking a descriptor chain, validating it, and executing it against a
//! [`Disk`]. Nothing here knows about sockets, files or syscalls.
//!
//! A request is a byte stream split in two (virtio 1.2 §5.2.6): the device-readable part starts
//! with the 16-byte header `{type le32, reserved le32, sector le64}` followed by the data of OUT
//! requests (or the discard / write-zeroes segments); the device-writable part holds the data of
//! IN and GET_ID requests followed by the one status byte, which is the last byte of the chain.
//! The descriptors may cut these streams anywhere: nothing assumes one descriptor per part.
//!
//! Every request is validated before any I/O: broken or looping chains, readable descriptors
//! after writable ones, descriptors outside guest memory, short headers, lengths that are not a
//! multiple of 512, requests past the end of the disk, oversized requests and writes to a
//! read-only disk all complete with an error status (or, when there is no writable last byte to
//! hold a status, with a used length of 0) and never touch the image.

#![forbid(unsafe_code)]

use std::io;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::config::{
    DiskGeometry, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_REQUEST_BYTES,
    SECTOR_SHIFT, SECTOR_SIZE,
};

/// Guest memory as the backend maps it (no dirty-page bitmap).
pub type GuestRam = vm_memory::GuestMemoryMmap<()>;

/// Size of the request header.
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_SIZE: u64 = 16;

/// One piece of guest memory holding part of a request's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The storage a request executes against. Offsets and lengths are in bytes and have been
/// validated against the disk's capacity before any call.
pub trait Disk {
    /// Reads `sum(segs.len)` bytes at `offset` into the guest memory described by `segs`.
    fn read(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()>;
    /// Writes the guest memory described by `segs` at `offset`.
    fn write(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Hints that `[offset, offset + len)` is unused (reads may then return old data or zeros).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros; `unmap` allows deallocating it.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Why a request failed. The variant decides the status byte (see [`RequestError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the descriptor chain is broken (bad index, loop or bad indirect table)")]
    BrokenChain,
    #[error("the descriptor chain has more than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("the chain does not end with a device-writable status byte")]
    NoStatus,
    #[error("the device-readable part is {0} bytes, shorter than the 16-byte header")]
    ShortHeader(u64),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("request of {0} bytes is larger than the limit of {MAX_REQUEST_BYTES}")]
    TooLarge(u64),
    #[error("sectors {sector}..+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("request type {0} writes to a read-only disk")]
    ReadOnly(u32),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("discard/write-zeroes payload of {0} bytes is not 1..={MAX_DISCARD_SEGMENTS} segments")]
    BadSegmentCount(u64),
    #[error("discard/write-zeroes segment of {0} sectors is larger than {MAX_DISCARD_SECTORS}")]
    SegmentTooLarge(u32),
    #[error("request type {kind} has unsupported segment flags {flags:#x}")]
    BadFlags { kind: u32, flags: u32 },
    #[error("guest memory access failed: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("{op} at byte {offset} failed: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
}

impl RequestError {
    /// The status byte reported to the driver for this error.
    pub fn status(&self) -> u8 {
        let s = match self {
            Self::Unsupported(_) | Self::BadFlags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status_byte(s)
    }
}

fn status_byte(s: u32) -> u8 {
    u8::try_from(s).unwrap_or(u8::MAX)
}

/// What happened to one chain: the used length to report and, if it failed, why.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes written into the device-writable part, status byte included (0 when no status
    /// could be written).
    pub used_len: u32,
    /// The status byte written, if any.
    pub status: Option<u8>,
    /// The failure, to be logged by the caller.
    pub error: Option<RequestError>,
}

/// The fixed request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u32,
    pub sector: u64,
}

impl Header {
    pub fn parse(raw: &[u8; 16]) -> Self {
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&raw[0..4]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[8..16]);
        Self {
            kind: u32::from_le_bytes(kind),
            sector: u64::from_le_bytes(sector),
        }
    }
}

/// Parses and executes requests. Owns reusable buffers so that the steady state allocates
/// nothing per request.
#[derive(Debug)]
pub struct RequestHandler {
    geometry: DiskGeometry,
    max_descriptors: usize,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    data: Vec<Segment>,
}

/// Result of walking a chain.
struct Walk {
    readable_len: u64,
    writable_len: u64,
    /// Address of the status byte (last byte of the chain, device-writable, in memory).
    status: Option<GuestAddress>,
    /// The first structural problem found.
    fault: Option<RequestError>,
}

impl RequestHandler {
    pub fn new(geometry: DiskGeometry) -> Self {
        // Header + seg_max data segments + status; an indirect table may hold as many.
        let max_descriptors = usize::try_from(geometry.seg_max()).unwrap_or(usize::MAX) + 2;
        Self {
            geometry,
            max_descriptors,
            readable: Vec::with_capacity(max_descriptors),
            writable: Vec::with_capacity(max_descriptors),
            data: Vec::with_capacity(max_descriptors),
        }
    }

    pub fn geometry(&self) -> &DiskGeometry {
        &self.geometry
    }

    /// Validates and executes one chain, writes its status byte, and returns the used length.
    pub fn handle<D: Disk>(
        &mut self,
        mem: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
        disk: &mut D,
    ) -> Outcome {
        let walk = self.walk(mem, chain);
        let Some(status_addr) = walk.status else {
            return Outcome {
                used_len: 0,
                status: None,
                error: Some(walk.fault.unwrap_or(RequestError::NoStatus)),
            };
        };
        let result = match walk.fault {
            Some(e) => Err(e),
            None => self.execute(mem, &walk, disk),
        };
        let (status, written, error) = match result {
            Ok(written) => (status_byte(VIRTIO_BLK_S_OK), written, None),
            Err(e) => (e.status(), 0, Some(e)),
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            // Checked to be inside guest memory during the walk; only a concurrent memory-table
            // change could get here. Report it like any other failure, without a status.
            return Outcome {
                used_len: 0,
                status: None,
                error: Some(RequestError::Memory(e)),
            };
        }
        Outcome {
            used_len: written.saturating_add(1),
            status: Some(status),
            error,
        }
    }

    /// Collects the chain's descriptors into `readable` and `writable` (skipping empty ones),
    /// locating the status byte and recording the first structural fault.
    fn walk(&mut self, mem: &GuestRam, chain: DescriptorChain<&GuestRam>) -> Walk {
        self.readable.clear();
        self.writable.clear();
        let mut walk = Walk {
            readable_len: 0,
            writable_len: 0,
            status: None,
            fault: None,
        };
        let mut count = 0usize;
        let mut last = None;
        for desc in chain {
            count += 1;
            if count > self.max_descriptors {
                walk.fault = Some(RequestError::TooManyDescriptors(self.max_descriptors));
                // The real end of the chain is unknown: no status byte.
                return walk;
            }
            last = Some(desc);
            if desc.len() == 0 {
                continue;
            }
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            let usize_len = usize::try_from(seg.len).unwrap_or(usize::MAX);
            if !mem.check_range(seg.addr, usize_len) && walk.fault.is_none() {
                walk.fault = Some(RequestError::OutsideMemory {
                    addr: seg.addr.raw_value(),
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                walk.writable_len += u64::from(seg.len);
                self.writable.push(seg);
            } else {
                if !self.writable.is_empty() && walk.fault.is_none() {
                    walk.fault = Some(RequestError::ReadableAfterWritable);
                }
                walk.readable_len += u64::from(seg.len);
                self.readable.push(seg);
            }
        }
        let Some(last) = last else {
            walk.fault = Some(RequestError::BrokenChain);
            return walk;
        };
        if last.has_next() {
            // The iterator stopped early: a bad `next` index, a loop or an invalid indirect
            // table. The status location is unknown.
            walk.fault = Some(RequestError::BrokenChain);
            return walk;
        }
        if last.is_write_only() && last.len() > 0 {
            let ok = mem.check_range(last.addr(), usize::try_from(last.len()).unwrap_or(0));
            if ok {
                walk.status = last.addr().checked_add(u64::from(last.len()) - 1);
            }
        }
        if walk.status.is_none() && walk.fault.is_none() {
            walk.fault = Some(RequestError::NoStatus);
        }
        walk
    }

    /// Runs a structurally valid request; returns the bytes written before the status byte.
    fn execute<D: Disk>(
        &mut self,
        mem: &GuestRam,
        walk: &Walk,
        disk: &mut D,
    ) -> Result<u32, RequestError> {
        if walk.readable_len < HEADER_SIZE {
            return Err(RequestError::ShortHeader(walk.readable_len));
        }
        let mut raw = [0u8; 16];
        copy_from_guest(mem, &self.readable, 0, &mut raw)?;
        let header = Header::parse(&raw);
        let readonly = self.geometry.readonly;
        // Data bytes in the writable part, before the status byte.
        let data_in_len = walk.writable_len - 1;
        let data_out_len = walk.readable_len - HEADER_SIZE;
        match header.kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(header.sector, data_in_len)?;
                sub_stream(&self.writable, 0, data_in_len, &mut self.data);
                disk.read(mem, offset, &self.data)
                    .map_err(|source| io_error("read", offset, source))?;
                Ok(u32::try_from(data_in_len).unwrap_or(u32::MAX))
            }
            VIRTIO_BLK_T_OUT => {
                if readonly {
                    return Err(RequestError::ReadOnly(header.kind));
                }
                let offset = self.check_range(header.sector, data_out_len)?;
                sub_stream(&self.readable, HEADER_SIZE, data_out_len, &mut self.data);
                disk.write(mem, offset, &self.data)
                    .map_err(|source| io_error("write", offset, source))?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !readonly {
                    disk.flush()
                        .map_err(|source| io_error("flush", 0, source))?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = usize::try_from(data_in_len)
                    .unwrap_or(usize::MAX)
                    .min(ID_BYTES);
                sub_stream(&self.writable, 0, data_in_len, &mut self.data);
                copy_to_guest(mem, &self.data, 0, &self.geometry.serial[..n])?;
                Ok(u32::try_from(n).unwrap_or(0))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if readonly {
                    return Err(RequestError::ReadOnly(header.kind));
                }
                self.discard_or_zero(mem, header.kind, data_out_len, disk)?;
                Ok(0)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Validates all segments first, then applies them, so that a bad segment leaves the
    /// image untouched.
    fn discard_or_zero<D: Disk>(
        &mut self,
        mem: &GuestRam,
        kind: u32,
        payload_len: u64,
        disk: &mut D,
    ) -> Result<(), RequestError> {
        let count = payload_len / DISCARD_SEGMENT_SIZE;
        if !payload_len.is_multiple_of(DISCARD_SEGMENT_SIZE)
            || count == 0
            || count > u64::from(MAX_DISCARD_SEGMENTS)
        {
            return Err(RequestError::BadSegmentCount(payload_len));
        }
        // At most MAX_DISCARD_SEGMENTS entries: keep them on the stack.
        let mut segs = [(0u64, 0u64, false); MAX_DISCARD_SEGMENTS as usize];
        for i in 0..count {
            let mut raw = [0u8; 16];
            copy_from_guest(
                mem,
                &self.readable,
                HEADER_SIZE + i * DISCARD_SEGMENT_SIZE,
                &mut raw,
            )?;
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            let allowed = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed != 0 {
                return Err(RequestError::BadFlags { kind, flags });
            }
            if sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::SegmentTooLarge(sectors));
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let offset = self.check_range_unlimited(sector, len)?;
            let idx = usize::try_from(i).unwrap_or(0);
            segs[idx] = (offset, len, unmap);
        }
        for &(offset, len, unmap) in &segs[..usize::try_from(count).unwrap_or(0)] {
            if len == 0 {
                continue;
            }
            if kind == VIRTIO_BLK_T_DISCARD {
                disk.discard(offset, len)
                    .map_err(|source| io_error("discard", offset, source))?;
            } else {
                disk.write_zeroes(offset, len, unmap)
                    .map_err(|source| io_error("write-zeroes", offset, source))?;
            }
        }
        Ok(())
    }

    /// Checks a data transfer of `len` bytes at `sector`; returns the byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::UnalignedLength(len));
        }
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        self.check_range_unlimited(sector, len)
    }

    fn check_range_unlimited(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let sectors = len >> SECTOR_SHIFT;
        let capacity = self.geometry.capacity_sectors;
        let out_of_range = RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        };
        match sector.checked_add(sectors) {
            Some(end) if end <= capacity => {}
            _ => return Err(out_of_range),
        }
        // capacity <= u64::MAX >> 9 because it came from a byte size, so this cannot overflow
        // once the range check passed; checked anyway.
        sector.checked_mul(SECTOR_SIZE).ok_or(out_of_range)
    }
}

fn io_error(op: &'static str, offset: u64, source: io::Error) -> RequestError {
    RequestError::Io { op, offset, source }
}

/// Fills `out` with the part `[skip, skip + take)` of the stream formed by `src`.
pub fn sub_stream(src: &[Segment], skip: u64, take: u64, out: &mut Vec<Segment>) {
    out.clear();
    let mut skip = skip;
    let mut take = take;
    for seg in src {
        if take == 0 {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = len - skip;
        let n = avail.min(take);
        out.push(Segment {
            addr: seg.addr.unchecked_add(skip),
            len: u32::try_from(n).unwrap_or(u32::MAX),
        });
        take -= n;
        skip = 0;
    }
}

/// Copies `dst.len()` bytes starting at byte `offset` of the stream formed by `segs`.
pub fn copy_from_guest(
    mem: &GuestRam,
    segs: &[Segment],
    offset: u64,
    dst: &mut [u8],
) -> Result<(), GuestMemoryError> {
    let mut skip = offset;
    let mut done = 0usize;
    for seg in segs {
        if done == dst.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(dst.len() - done);
        mem.read_slice(&mut dst[done..done + n], seg.addr.unchecked_add(skip))?;
        done += n;
        skip = 0;
    }
    if done == dst.len() {
        Ok(())
    } else {
        Err(GuestMemoryError::PartialBuffer {
            expected: dst.len(),
            completed: done,
        })
    }
}

/// Copies `src` into the stream formed by `segs`, starting at byte `offset` of the stream.
pub fn copy_to_guest(
    mem: &GuestRam,
    segs: &[Segment],
    offset: u64,
    src: &[u8],
) -> Result<(), GuestMemoryError> {
    let mut skip = offset;
    let mut done = 0usize;
    for seg in segs {
        if done == src.len() {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let avail = usize::try_from(len - skip).unwrap_or(usize::MAX);
        let n = avail.min(src.len() - done);
        mem.write_slice(&src[done..done + n], seg.addr.unchecked_add(skip))?;
        done += n;
        skip = 0;
    }
    if done == src.len() {
        Ok(())
    } else {
        Err(GuestMemoryError::PartialBuffer {
            expected: src.len(),
            completed: done,
        })
    }
}

/// Total bytes of a segment list.
pub fn stream_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

#[cfg(test)]
#[path = "request_tests.rs"]
pub(crate) mod tests;
