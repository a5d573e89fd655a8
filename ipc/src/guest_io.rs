//! Positioned vectored I/O straight between a file and guest memory (`preadv`/`pwritev` on
//! the host addresses of [`VolatileSlice`]s), without a bounce buffer and without `unsafe` at
//! the caller.
//!
//! A `VolatileSlice<'a, B>` guarantees that its memory stays mapped and valid for `len()` bytes
//! for `'a` and that it is only accessed through volatile operations or raw pointers, never
//! through Rust references; the kernel reading or writing it during the call is such an
//! access. Each slice's pointer guard (`ptr_guard` / `ptr_guard_mut`, which map the memory on
//! backends such as Xen's) is held for the duration of the syscall, and after a read the bytes
//! written into guest memory are marked dirty in the slice's bitmap (a no-op for `()`).
//!
//! The single-call functions transfer at most [`IOV_MAX`] slices and may transfer less than
//! asked (as `preadv`/`pwritev` do); the `_exact` / `_all` variants loop until everything is
//! transferred. `EINTR` is retried everywhere.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};

/// The most iovecs one `preadv`/`pwritev` call takes on Linux (`UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;
/// iovecs built on the stack (requests usually have a few); longer lists use the heap.
const INLINE_IOVS: usize = 8;

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// `preadv`: the file is read, guest memory written.
    FileToGuest,
    /// `pwritev`: guest memory is read, the file written.
    GuestToFile,
}

/// Keeps one slice's host pointer valid while the kernel uses it.
enum Guard {
    Read(#[allow(dead_code, reason = "held only for its Drop")] PtrGuard),
    Write(#[allow(dead_code, reason = "held only for its Drop")] PtrGuardMut),
}

impl Guard {
    fn new<B: BitmapSlice>(slice: &VolatileSlice<'_, B>, dir: Direction) -> (Self, libc::iovec) {
        match dir {
            Direction::FileToGuest => {
                let g = slice.ptr_guard_mut();
                let iov = libc::iovec {
                    iov_base: g.as_ptr().cast(),
                    iov_len: slice.len(),
                };
                (Guard::Write(g), iov)
            }
            Direction::GuestToFile => {
                let g = slice.ptr_guard();
                let iov = libc::iovec {
                    iov_base: g.as_ptr().cast_mut().cast(),
                    iov_len: slice.len(),
                };
                (Guard::Read(g), iov)
            }
        }
    }
}

/// Reads from `file` at `offset` into `bufs` in order with one `preadv` (at most the first
/// [`IOV_MAX`] slices), returning how many bytes were read; 0 means end of file (or no room).
pub fn pread_volatile<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<usize> {
    transfer(file, bufs, 0, offset, Direction::FileToGuest)
}

/// Writes `bufs` in order to `file` at `offset` with one `pwritev` (at most the first
/// [`IOV_MAX`] slices), returning how many bytes were written.
pub fn pwrite_volatile<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<usize> {
    transfer(file, bufs, 0, offset, Direction::GuestToFile)
}

/// Fills all of `bufs` from `file` at `offset`, resuming after short reads. Fails with
/// [`io::ErrorKind::UnexpectedEof`] if the file ends first (what was read stays in `bufs`).
pub fn pread_exact_volatile<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<()> {
    transfer_all(file, bufs, offset, Direction::FileToGuest)
}

/// Writes all of `bufs` to `file` at `offset`, resuming after short writes. Fails with
/// [`io::ErrorKind::WriteZero`] if a write makes no progress.
pub fn pwrite_all_volatile<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
) -> io::Result<()> {
    transfer_all(file, bufs, offset, Direction::GuestToFile)
}

fn transfer_all<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let (mut idx, mut skip) = advance(bufs, 0, 0, 0);
    let mut offset = offset;
    while idx < bufs.len() {
        let n = transfer(file, &bufs[idx..], skip, offset, dir)?;
        if n == 0 {
            return Err(match dir {
                Direction::FileToGuest => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ends before byte {offset}"),
                ),
                Direction::GuestToFile => io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("a write at byte {offset} wrote nothing"),
                ),
            });
        }
        offset = offset
            .checked_add(u64::try_from(n).unwrap_or(u64::MAX))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        (idx, skip) = advance(bufs, idx, skip, n);
    }
    Ok(())
}

/// Moves the position `(idx, skip)` (slice index, bytes done in that slice) on by `n` bytes,
/// past any empty or finished slices.
fn advance<B: BitmapSlice>(
    bufs: &[VolatileSlice<'_, B>],
    idx: usize,
    skip: usize,
    n: usize,
) -> (usize, usize) {
    let mut idx = idx;
    let mut left = skip + n;
    while let Some(s) = bufs.get(idx) {
        if left < s.len() {
            break;
        }
        left -= s.len();
        idx += 1;
    }
    (idx, left)
}

/// One `preadv`/`pwritev` of `bufs` (at most [`IOV_MAX`] of them), leaving out the first
/// `skip` bytes of `bufs[0]`.
fn transfer<B: BitmapSlice>(
    file: BorrowedFd<'_>,
    bufs: &[VolatileSlice<'_, B>],
    skip: usize,
    offset: u64,
    dir: Direction,
) -> io::Result<usize> {
    let bufs = &bufs[..bufs.len().min(IOV_MAX)];
    let Some((first, rest)) = bufs.split_first() else {
        return Ok(0);
    };
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let head = if skip == 0 {
        first.clone()
    } else {
        first
            .offset(skip)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
    };
    let fd = file.as_raw_fd();
    let done = if bufs.len() <= INLINE_IOVS {
        let mut iov = [EMPTY_IOVEC; INLINE_IOVS];
        let mut guards: [Option<Guard>; INLINE_IOVS] = Default::default();
        fill(&mut iov, &mut guards, &head, rest, dir);
        syscall(fd, &iov[..bufs.len()], off, dir)?
    } else {
        let mut iov = vec![EMPTY_IOVEC; bufs.len()];
        let mut guards: Vec<Option<Guard>> =
            std::iter::repeat_with(|| None).take(bufs.len()).collect();
        fill(&mut iov, &mut guards, &head, rest, dir);
        syscall(fd, &iov, off, dir)?
    };
    if dir == Direction::FileToGuest {
        let mut left = done;
        for s in std::iter::once(&head).chain(rest) {
            if left == 0 {
                break;
            }
            let n = s.len().min(left);
            s.bitmap().mark_dirty(0, n);
            left -= n;
        }
    }
    Ok(done)
}

/// Builds the iovecs for `head` followed by `rest`, keeping their pointer guards in `guards`
/// (which the caller drops only after the syscall).
fn fill<B: BitmapSlice>(
    iov: &mut [libc::iovec],
    guards: &mut [Option<Guard>],
    head: &VolatileSlice<'_, B>,
    rest: &[VolatileSlice<'_, B>],
    dir: Direction,
) {
    let slices = std::iter::once(head).chain(rest);
    for ((slot, guard), slice) in iov.iter_mut().zip(guards.iter_mut()).zip(slices) {
        let (g, v) = Guard::new(slice, dir);
        *slot = v;
        *guard = Some(g);
    }
}

fn syscall(fd: RawFd, iov: &[libc::iovec], off: libc::off_t, dir: Direction) -> io::Result<usize> {
    let cnt =
        libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        let ret = match dir {
            // SAFETY: every iovec was built from a `VolatileSlice` borrowed by our caller for
            // the whole call, whose memory is valid for `iov_len` bytes and may be written
            // through raw pointers; its pointer guard is alive (see `transfer`). preadv writes
            // at most `iov_len` bytes through each.
            Direction::FileToGuest => unsafe { libc::preadv(fd, iov.as_ptr(), cnt, off) },
            // SAFETY: as above; pwritev only reads through the pointers.
            Direction::GuestToFile => unsafe { libc::pwritev(fd, iov.as_ptr(), cnt, off) },
        };
        if let Ok(n) = usize::try_from(ret) {
            return Ok(n);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    type Ram = GuestMemoryMmap<()>;

    /// A file in the temp directory, unlinked at once (it lives as long as the handle).
    fn temp_file(contents: &[u8]) -> File {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ipc-guest-io-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all_at(contents, 0).unwrap();
        f
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
            .collect()
    }

    /// Two 64 KiB regions with a hole between them.
    fn ram() -> Ram {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x2_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn slices<'a, M: GuestMemoryBackend>(
        mem: &'a M,
        parts: &[(u64, usize)],
    ) -> Vec<VolatileSlice<'a, vm_memory::bitmap::MS<'a, M>>> {
        parts
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len).unwrap())
            .collect()
    }

    #[test]
    fn reads_into_several_slices_in_order() {
        let data = pattern(8192, 0x5a);
        let file = temp_file(&data);
        let mem = ram();
        // One slice at the end of the first region, one in the second, one in the first.
        let bufs = slices(&mem, &[(0xff00, 0x100), (0x2_0010, 0x300), (0x40, 0x7)]);
        let n = pread_volatile(file.as_fd(), &bufs, 1000).unwrap();
        assert_eq!(n, 0x407);
        let mut got = vec![0u8; 0x100];
        mem.read_slice(&mut got, GuestAddress(0xff00)).unwrap();
        assert_eq!(got, data[1000..1256]);
        let mut got = vec![0u8; 0x300];
        mem.read_slice(&mut got, GuestAddress(0x2_0010)).unwrap();
        assert_eq!(got, data[1256..2024]);
        let mut got = [0u8; 7];
        mem.read_slice(&mut got, GuestAddress(0x40)).unwrap();
        assert_eq!(got, data[2024..2031]);
        // Memory around the slices is untouched.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x47)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2_0310)).unwrap(), 0);
    }

    #[test]
    fn writes_several_slices_at_an_offset() {
        let file = temp_file(&[0xee; 4096]);
        let mem = ram();
        let a = pattern(300, 1);
        let b = pattern(500, 2);
        mem.write_slice(&a, GuestAddress(0x2_f000)).unwrap();
        mem.write_slice(&b, GuestAddress(0x100)).unwrap();
        let bufs = slices(&mem, &[(0x2_f000, 300), (0x100, 500)]);
        assert_eq!(pwrite_volatile(file.as_fd(), &bufs, 777).unwrap(), 800);
        let mut back = vec![0u8; 4096];
        file.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..777].iter().all(|&x| x == 0xee));
        assert_eq!(back[777..1077], a[..]);
        assert_eq!(back[1077..1577], b[..]);
        assert!(back[1577..].iter().all(|&x| x == 0xee));
    }

    #[test]
    fn writing_past_the_end_extends_the_file() {
        let file = temp_file(b"abc");
        let mem = ram();
        mem.write_slice(b"xyz", GuestAddress(0)).unwrap();
        let bufs = slices(&mem, &[(0, 3)]);
        pwrite_all_volatile(file.as_fd(), &bufs, 10).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 13);
        let mut back = [0u8; 13];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"abc\0\0\0\0\0\0\0xyz");
    }

    #[test]
    fn short_read_at_the_end_of_the_file() {
        let data = pattern(1000, 3);
        let file = temp_file(&data);
        let mem = ram();
        let bufs = slices(&mem, &[(0, 64), (0x1000, 64)]);
        // 40 bytes left: a short count, not an error.
        assert_eq!(pread_volatile(file.as_fd(), &bufs, 960).unwrap(), 40);
        let mut got = [0u8; 40];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert_eq!(got[..], data[960..]);
        assert_eq!(pread_volatile(file.as_fd(), &bufs, 1000).unwrap(), 0);
        assert_eq!(pread_volatile(file.as_fd(), &bufs, 5000).unwrap(), 0);
        // The exact variant reports the end of file, after filling what it could.
        let err = pread_exact_volatile(file.as_fd(), &bufs, 900).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("byte 1000"), "{err}");
        let mut got = [0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert_eq!(got[..], data[900..964]);
        let mut got = [0u8; 36];
        mem.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got[..], data[964..]);
    }

    #[test]
    fn more_slices_than_iov_max() {
        let total_slices = IOV_MAX + 100;
        // Slices of 1, 2 and 3 bytes, 4 bytes apart.
        let parts: Vec<(u64, usize)> = (0..total_slices)
            .map(|i| (u64::try_from(i * 4).unwrap(), i % 3 + 1))
            .collect();
        let total: usize = parts.iter().map(|p| p.1).sum();
        let data = pattern(total + 10, 7);
        let file = temp_file(&data);
        let mem = ram();
        let bufs = slices(&mem, &parts);
        // One call stops after IOV_MAX slices.
        let capped: usize = parts[..IOV_MAX].iter().map(|p| p.1).sum();
        assert_eq!(pread_volatile(file.as_fd(), &bufs, 0).unwrap(), capped);
        // The exact variant goes on with the rest.
        let mem = ram();
        let bufs = slices(&mem, &parts);
        pread_exact_volatile(file.as_fd(), &bufs, 10).unwrap();
        let mut pos = 10;
        for &(addr, len) in &parts {
            let mut got = vec![0u8; len];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got, data[pos..pos + len], "slice at {addr:#x}");
            pos += len;
        }
        // And writes them all back in order.
        let out = temp_file(&[]);
        pwrite_all_volatile(out.as_fd(), &bufs, 0).unwrap();
        let mut back = vec![0u8; total];
        out.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, data[10..10 + total]);
    }

    #[test]
    fn skip_leaves_out_the_start_of_the_first_slice() {
        let data = pattern(512, 9);
        let file = temp_file(&data);
        let mem = ram();
        let bufs = slices(&mem, &[(0, 100), (0x200, 50)]);
        let n = transfer(file.as_fd(), &bufs, 30, 0, Direction::FileToGuest).unwrap();
        assert_eq!(n, 120);
        let mut got = [0u8; 100];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert!(got[..30].iter().all(|&x| x == 0));
        assert_eq!(got[30..], data[..70]);
        let mut got = [0u8; 50];
        mem.read_slice(&mut got, GuestAddress(0x200)).unwrap();
        assert_eq!(got[..], data[70..120]);
        // Skipping past the end of the first slice is refused.
        let err = transfer(file.as_fd(), &bufs, 101, 0, Direction::FileToGuest).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn advance_resumes_inside_and_past_slices() {
        let mem = ram();
        let bufs = slices(&mem, &[(0, 10), (0x100, 0), (0x200, 5), (0x300, 20)]);
        assert_eq!(advance(&bufs, 0, 0, 0), (0, 0));
        assert_eq!(advance(&bufs, 0, 0, 4), (0, 4));
        assert_eq!(
            advance(&bufs, 0, 4, 6),
            (2, 0),
            "the empty slice is passed over"
        );
        assert_eq!(advance(&bufs, 0, 4, 9), (2, 3));
        assert_eq!(advance(&bufs, 2, 3, 2), (3, 0));
        assert_eq!(advance(&bufs, 3, 0, 19), (3, 19));
        assert_eq!(advance(&bufs, 3, 19, 1), (4, 0));
        let empty = slices(&mem, &[(0, 0), (0x10, 0)]);
        assert_eq!(advance(&empty, 0, 0, 0), (2, 0));
    }

    #[test]
    fn empty_lists_and_empty_slices() {
        let file = temp_file(b"hello");
        let mem = ram();
        let none: Vec<VolatileSlice<'_, ()>> = Vec::new();
        assert_eq!(pread_volatile(file.as_fd(), &none, 0).unwrap(), 0);
        pread_exact_volatile(file.as_fd(), &none, 0).unwrap();
        pwrite_all_volatile(file.as_fd(), &none, 0).unwrap();
        // Empty slices inside a list are harmless, also at the end of the file.
        let bufs = slices(&mem, &[(0, 0), (0x10, 5), (0x20, 0)]);
        pread_exact_volatile(file.as_fd(), &bufs, 0).unwrap();
        let mut got = [0u8; 5];
        mem.read_slice(&mut got, GuestAddress(0x10)).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn errors_are_reported() {
        let mem = ram();
        let bufs = slices(&mem, &[(0, 16)]);
        let file = temp_file(&[1; 16]);
        let err = pread_volatile(file.as_fd(), &bufs, u64::MAX).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EOVERFLOW));
        // A pipe has no positions.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = pread_exact_volatile(r.as_fd(), &bufs, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESPIPE));
        // A read-only descriptor cannot be written.
        let ro = File::open("/proc/self/exe").unwrap();
        let err = pwrite_all_volatile(ro.as_fd(), &bufs, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    /// A dirty "bitmap" that records every `mark_dirty` as `(offset in region, len)`.
    #[derive(Clone, Debug, Default)]
    struct Recorder {
        base: usize,
        marks: std::sync::Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
    }

    impl vm_memory::bitmap::WithBitmapSlice<'_> for Recorder {
        type S = Self;
    }

    impl BitmapSlice for Recorder {}

    impl Bitmap for Recorder {
        fn mark_dirty(&self, offset: usize, len: usize) {
            self.marks.lock().unwrap().push((self.base + offset, len));
        }

        fn dirty_at(&self, offset: usize) -> bool {
            let at = self.base + offset;
            self.marks
                .lock()
                .unwrap()
                .iter()
                .any(|&(o, l)| (o..o + l).contains(&at))
        }

        fn slice_at(&self, offset: usize) -> Self {
            Self {
                base: self.base + offset,
                marks: self.marks.clone(),
            }
        }
    }

    impl vm_memory::bitmap::NewBitmap for Recorder {
        fn with_len(_len: usize) -> Self {
            Self::default()
        }
    }

    #[test]
    fn reads_mark_what_they_wrote_dirty_and_writes_do_not() {
        let mem: GuestMemoryMmap<Recorder> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        let marks = || region.bitmap().marks.lock().unwrap().clone();
        let file = temp_file(&pattern(3 * 4096, 11));
        // The file's end leaves the second slice partly unfilled: only the filled part is
        // dirty.
        let bufs = slices(&mem, &[(0x3064, 0x1032), (0x9064, 0x1000)]);
        let n = pread_volatile(file.as_fd(), &bufs, 0x1064).unwrap();
        assert_eq!(n, 0x2000 - 0x64);
        assert_eq!(
            marks(),
            vec![(0x3064, 0x1032), (0x9064, 0x2000 - 0x64 - 0x1032)]
        );
        assert!(region.bitmap().dirty_at(0x9064 + 0xf00));
        assert!(!region.bitmap().dirty_at(0x9064 + 0xfff));
        // A resumed read marks the resumed part from where it starts.
        let bufs = slices(&mem, &[(0x20000, 0x100), (0x30000, 0x100)]);
        region.bitmap().marks.lock().unwrap().clear();
        transfer(file.as_fd(), &bufs, 0x40, 0, Direction::FileToGuest).unwrap();
        assert_eq!(marks(), vec![(0x20040, 0xc0), (0x30000, 0x100)]);
        // Writing guest memory out to the file dirties nothing.
        region.bitmap().marks.lock().unwrap().clear();
        pwrite_all_volatile(file.as_fd(), &bufs, 0).unwrap();
        assert_eq!(marks(), vec![]);
    }
}
