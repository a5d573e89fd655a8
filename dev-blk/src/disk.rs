//! Raw image files: positioned vectored I/O straight between the image and guest memory
//! (`preadv`/`pwritev` on host pointers into the guest-RAM mapping), `fdatasync`, and
//! `fallocate` for discard and write-zeroes. With an `O_DIRECT` descriptor, data goes through
//! an aligned bounce buffer per queue and unaligned edges are read-modify-written.
//!
//! The image descriptor is used as handed over: it is never reopened (the launcher opened it
//! with the right mode, `O_RDONLY` for read-only disks), and its file offset is never relied on.
//! The syscalls on guest memory go through `ipc::guest_io`, so this module has no `unsafe`.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::sync::{Arc, RwLock};

use ipc::guest_io::{pread_exact_volatile, pwrite_all_volatile};
use nix::fcntl::{FallocateFlags, FcntlArg, OFlag, fallocate, fcntl};
use tracing::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryError, VolatileSlice};

use crate::config::SECTOR_SIZE;
use crate::request::{Disk, GuestRam, Segment, copy_from_guest, copy_to_guest, stream_len};

/// Size of the per-queue bounce buffer used with `O_DIRECT`.
const BOUNCE_SIZE: usize = 1 << 20;
/// Size of the zero buffer used when `fallocate` cannot zero a range.
const ZERO_CHUNK: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read the image descriptor's flags: {0}")]
    Flags(nix::Error),
    #[error("cannot stat the image: {0}")]
    Stat(io::Error),
    #[error("cannot determine the size of the image: {0}")]
    Size(io::Error),
    #[error("the image is opened with O_DIRECT but no I/O alignment up to 64 KiB works: {0}")]
    Alignment(io::Error),
}

/// An image file shared by all queues.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    readonly: bool,
    /// `Some(alignment)` when the descriptor has `O_DIRECT`.
    direct_align: Option<usize>,
    /// Usable size in bytes (a multiple of 512, and of the direct alignment).
    size: u64,
    dev: u64,
    ino: u64,
    physical_block_size: u32,
    /// With `O_DIRECT` and an alignment above 512, read-modify-write of a partial block
    /// holds this exclusively and every other write holds it shared, so a concurrent write on
    /// another queue cannot be overwritten with stale data.
    rmw: RwLock<()>,
}

impl RawImage {
    /// Takes over an already opened image. `readonly` refuses writes; a descriptor opened
    /// `O_RDONLY` is read-only whatever `readonly` says.
    pub fn new(file: File, readonly: bool) -> Result<Self, DiskError> {
        let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(DiskError::Flags)?;
        let flags = OFlag::from_bits_truncate(flags);
        let access = flags & OFlag::O_ACCMODE;
        let fd_readonly = access == OFlag::O_RDONLY;
        if fd_readonly && !readonly {
            warn!("the image descriptor is read-only: serving the disk read-only");
        }
        let direct = flags.contains(OFlag::O_DIRECT);

        let meta = file.metadata().map_err(DiskError::Stat)?;
        let raw_size = if meta.file_type().is_block_device() {
            // Block devices report a length of 0; their end is their size. Only the shared
            // file offset moves, which nothing here uses.
            (&file).seek(SeekFrom::End(0)).map_err(DiskError::Size)?
        } else {
            meta.len()
        };
        let direct_align = if direct {
            Some(probe_direct_alignment(&file).map_err(DiskError::Alignment)?)
        } else {
            None
        };
        let unit = direct_align.map_or(SECTOR_SIZE, |a| (a as u64).max(SECTOR_SIZE));
        let size = raw_size - raw_size % unit;
        if size != raw_size {
            warn!(
                raw_size,
                usable = size,
                "the image size is not a multiple of {unit} bytes; the tail is not exposed"
            );
        }
        let blksize = u32::try_from(meta.blksize()).unwrap_or(4096);
        let mut physical = blksize.clamp(512, 65536);
        if !physical.is_power_of_two() {
            physical = 4096;
        }
        if let Some(a) = direct_align {
            physical = physical.max(u32::try_from(a).unwrap_or(4096));
        }
        Ok(Self {
            file,
            readonly: readonly || fd_readonly,
            direct_align,
            size,
            dev: meta.dev(),
            ino: meta.ino(),
            physical_block_size: physical,
            rmw: RwLock::new(()),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The `O_DIRECT` alignment in bytes, if the descriptor has `O_DIRECT`.
    pub fn direct_alignment(&self) -> Option<usize> {
        self.direct_align
    }

    /// `(st_dev, st_ino)` of the image, for the default serial.
    pub fn identity(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// `fdatasync` the image (no-op for read-only images).
    pub fn sync(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }
}

/// Finds the smallest offset/length alignment `O_DIRECT` accepts, by reading at offset 0.
fn probe_direct_alignment(file: &File) -> io::Result<usize> {
    let mut buf = AlignedBuf::new(65536, 65536);
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    let mut align = 512;
    while align <= 65536 {
        match file.read_at(&mut buf.as_mut_slice()[..align], 0) {
            Ok(_) => return Ok(align),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
        align *= 2;
    }
    Err(last)
}

/// A heap buffer whose start is aligned, built safely from an over-sized `Vec`.
#[derive(Debug)]
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        assert!(
            start <= align,
            "align_offset of a u8 pointer is always computable"
        );
        Self {
            storage,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Direction and guest side of an `O_DIRECT` transfer.
#[derive(Clone, Copy)]
enum Transfer<'a> {
    /// Image to guest memory.
    Read(&'a GuestRam, &'a [Segment]),
    /// Guest memory to image.
    Write(&'a GuestRam, &'a [Segment]),
    /// Zeros to image.
    Zeroes,
}

/// One queue's handle on the image, with that queue's scratch buffers.
#[derive(Debug)]
pub struct ImageQueue {
    image: Arc<RawImage>,
    bounce: Option<AlignedBuf>,
    zeroes: Option<AlignedBuf>,
}

impl ImageQueue {
    pub fn new(image: Arc<RawImage>) -> Self {
        Self {
            image,
            bounce: None,
            zeroes: None,
        }
    }

    pub fn image(&self) -> &Arc<RawImage> {
        &self.image
    }

    /// Buffered (non-`O_DIRECT`) transfer between guest memory and the image.
    fn guest_io(
        &self,
        mem: &GuestRam,
        offset: u64,
        segs: &[Segment],
        write: bool,
    ) -> io::Result<()> {
        // The usual case: one data segment inside one memory region, no allocation.
        if let [seg] = segs
            && let Ok(slice) =
                GuestMemoryBackend::get_slice(mem, seg.addr, usize::try_from(seg.len).unwrap_or(0))
        {
            return self.vectored(&[slice], offset, write);
        }
        let mut slices = Vec::with_capacity(segs.len());
        for seg in segs {
            let len = usize::try_from(seg.len).unwrap_or(usize::MAX);
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, len) {
                slices.push(slice.map_err(guest_to_io)?);
            }
        }
        self.vectored(&slices, offset, write)
    }

    /// `preadv`/`pwritev` of all of `bufs` at `offset`, resuming after short transfers.
    fn vectored(&self, bufs: &[VolatileSlice<'_>], offset: u64, write: bool) -> io::Result<()> {
        let fd = self.image.file.as_fd();
        if write {
            pwrite_all_volatile(fd, bufs, offset)
        } else {
            pread_exact_volatile(fd, bufs, offset)
        }
    }

    /// `O_DIRECT` transfer through the aligned bounce buffer, with read-modify-write of
    /// partial blocks at the edges.
    fn direct_io(
        &mut self,
        align: usize,
        offset: u64,
        len: u64,
        transfer: Transfer<'_>,
    ) -> io::Result<()> {
        let image = Arc::clone(&self.image);
        let a = align as u64;
        let start = offset - offset % a;
        let end = (offset + len).div_ceil(a) * a;
        let write = !matches!(transfer, Transfer::Read(..));
        let partial = start != offset || end != offset + len;
        // Held until the transfer ends (see `RawImage::rmw`).
        let needs_lock = write && align as u64 > SECTOR_SIZE;
        let _exclusive =
            (needs_lock && partial).then(|| image.rmw.write().unwrap_or_else(|e| e.into_inner()));
        let _shared =
            (needs_lock && !partial).then(|| image.rmw.read().unwrap_or_else(|e| e.into_inner()));
        let bounce = self
            .bounce
            .get_or_insert_with(|| AlignedBuf::new(BOUNCE_SIZE, align.max(4096)));
        let mut pos = start;
        while pos < end {
            let chunk = usize::try_from((end - pos).min(BOUNCE_SIZE as u64)).unwrap_or(BOUNCE_SIZE);
            let buf = &mut bounce.as_mut_slice()[..chunk];
            let ov_start = pos.max(offset);
            let ov_end = (pos + chunk as u64).min(offset + len);
            let lo = usize::try_from(ov_start - pos).unwrap_or(0);
            let hi = usize::try_from(ov_end - pos).unwrap_or(chunk);
            let stream_off = ov_start - offset;
            if let Transfer::Read(mem, segs) = transfer {
                image.file.read_exact_at(buf, pos)?;
                copy_to_guest(mem, segs, stream_off, &buf[lo..hi]).map_err(guest_to_io)?;
            } else {
                if lo > 0 || hi < chunk {
                    image.file.read_exact_at(buf, pos)?;
                }
                match transfer {
                    Transfer::Write(mem, segs) => {
                        copy_from_guest(mem, segs, stream_off, &mut buf[lo..hi])
                            .map_err(guest_to_io)?;
                    }
                    _ => buf[lo..hi].fill(0),
                }
                image.file.write_all_at(buf, pos)?;
            }
            pos += chunk as u64;
        }
        Ok(())
    }

    /// Writes zeros over `[offset, offset + len)` with plain writes.
    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if let Some(align) = self.image.direct_align {
            return self.direct_io(align, offset, len, Transfer::Zeroes);
        }
        let zeroes = self
            .zeroes
            .get_or_insert_with(|| AlignedBuf::new(ZERO_CHUNK, 4096));
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = usize::try_from((end - pos).min(ZERO_CHUNK as u64)).unwrap_or(ZERO_CHUNK);
            self.image
                .file
                .write_all_at(&zeroes.as_mut_slice()[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let l = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        fallocate(&self.image.file, flags, off, l).map_err(io::Error::from)
    }
}

/// `fallocate` mode not available on this file system / device.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

fn guest_to_io(e: GuestMemoryError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e)
}

impl Disk for ImageQueue {
    fn read(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()> {
        match self.image.direct_align {
            None => self.guest_io(mem, offset, segs, false),
            Some(align) => {
                let len = stream_len(segs);
                self.direct_io(align, offset, len, Transfer::Read(mem, segs))
            }
        }
    }

    fn write(&mut self, mem: &GuestRam, offset: u64, segs: &[Segment]) -> io::Result<()> {
        if self.image.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        match self.image.direct_align {
            None => self.guest_io(mem, offset, segs, true),
            Some(align) => {
                let len = stream_len(segs);
                self.direct_io(align, offset, len, Transfer::Write(mem, segs))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.image.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(flags, offset, len) {
            // Discard is a hint: where holes cannot be punched, keeping the data is correct.
            Err(e) if unsupported(&e) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.image.readonly {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if unmap {
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(punch, offset, len) {
                Err(e) if unsupported(&e) => {}
                other => return other,
            }
        }
        let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(zero, offset, len) {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            other => other,
        }
    }
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
