//! Tests of the raw-image backend on real files (buffered and `O_DIRECT`).

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::{Bytes, GuestAddress};

use super::*;

const MEM: u64 = 4 << 20;

struct TempImage(PathBuf);

impl TempImage {
    fn new(len: usize) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "dev-blk-disk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 253).unwrap()).collect();
        fs::write(&path, data).unwrap();
        Self(path)
    }

    fn open(&self, write: bool, direct: bool) -> File {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(&self.0).unwrap()
    }

    fn contents(&self) -> Vec<u8> {
        fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn ram() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), usize::try_from(MEM).unwrap())]).unwrap()
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 241).unwrap().wrapping_add(seed))
        .collect()
}

/// Read and write through `q`, checking the file and guest memory.
fn round_trip(q: &mut ImageQueue, img: &TempImage) {
    let mem = ram();
    // Read 1536 bytes at 512 into three guest pieces.
    let segs = [seg(0x1000, 512), seg(0x3000, 1000), seg(0x5000, 24)];
    q.read(&mem, 512, &segs).unwrap();
    let file = img.contents();
    let mut got = vec![0u8; 1536];
    mem.read_slice(&mut got[..512], GuestAddress(0x1000))
        .unwrap();
    mem.read_slice(&mut got[512..1512], GuestAddress(0x3000))
        .unwrap();
    mem.read_slice(&mut got[1512..], GuestAddress(0x5000))
        .unwrap();
    assert_eq!(got, file[512..2048]);

    // Write 2560 bytes at 3584 (not 4 KiB aligned at either end) from two pieces.
    let data = pattern(2560, 7);
    mem.write_slice(&data[..1000], GuestAddress(0x10000))
        .unwrap();
    mem.write_slice(&data[1000..], GuestAddress(0x20000))
        .unwrap();
    q.write(&mem, 3584, &[seg(0x10000, 1000), seg(0x20000, 1560)])
        .unwrap();
    let after = img.contents();
    assert_eq!(after[3584..6144], data[..]);
    assert_eq!(
        after[..3584],
        file[..3584],
        "bytes before the write are untouched"
    );
    assert_eq!(
        after[6144..],
        file[6144..],
        "bytes after the write are untouched"
    );

    // A large transfer spanning several bounce-buffer chunks.
    let big = pattern(3 << 20, 3);
    mem.write_slice(&big, GuestAddress(0x10_0000)).unwrap();
    q.write(&mem, 1 << 20, &[seg(0x10_0000, 3 << 20)]).unwrap();
    assert_eq!(img.contents()[1 << 20..4 << 20], big[..]);
    mem.write_slice(&vec![0u8; 3 << 20], GuestAddress(0x10_0000))
        .unwrap();
    q.read(&mem, 1 << 20, &[seg(0x10_0000, 3 << 20)]).unwrap();
    let mut back = vec![0u8; 3 << 20];
    mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(back, big);
}

fn zeroing(q: &mut ImageQueue, img: &TempImage) {
    let before = img.contents();
    q.discard(8192, 8192).unwrap();
    q.write_zeroes(20480, 1536, false).unwrap();
    q.write_zeroes(32768, 4096, true).unwrap();
    let after = img.contents();
    assert_eq!(after.len(), before.len(), "the image size never changes");
    // Discard on ext4/tmpfs punches a hole: zeros. (A hint elsewhere, so only check size.)
    assert!(after[20480..22016].iter().all(|&b| b == 0));
    assert!(after[32768..36864].iter().all(|&b| b == 0));
    assert_eq!(after[22016..32768], before[22016..32768]);
    assert_eq!(after[16384..20480], before[16384..20480]);
    q.flush().unwrap();
}

#[test]
fn buffered_round_trip_and_zeroing() {
    let img = TempImage::new(8 << 20);
    let image = Arc::new(RawImage::new(img.open(true, false), false).unwrap());
    assert_eq!(image.capacity_sectors(), (8 << 20) / 512);
    assert_eq!(image.direct_alignment(), None);
    let mut q = ImageQueue::new(image);
    round_trip(&mut q, &img);
    zeroing(&mut q, &img);
}

#[test]
fn direct_round_trip_and_zeroing() {
    let img = TempImage::new(8 << 20);
    let file = img.open(true, true);
    let image = match RawImage::new(file, false) {
        Ok(i) => i,
        Err(e) => panic!("O_DIRECT image: {e}"),
    };
    assert!(image.direct_alignment().is_some());
    let mut q = ImageQueue::new(Arc::new(image));
    round_trip(&mut q, &img);
    zeroing(&mut q, &img);
}

#[test]
fn direct_with_4k_alignment_read_modify_writes_edges() {
    let img = TempImage::new(8 << 20);
    let mut image = RawImage::new(img.open(true, true), false).unwrap();
    // Force the 4 KiB alignment of a 4Kn disk; valid on any device.
    image.direct_align = Some(4096);
    let mut q = ImageQueue::new(Arc::new(image));
    round_trip(&mut q, &img);
    zeroing(&mut q, &img);
}

#[test]
fn readonly_descriptor_refuses_writes() {
    let img = TempImage::new(1 << 20);
    let image = Arc::new(RawImage::new(img.open(false, false), false).unwrap());
    assert!(
        image.readonly(),
        "an O_RDONLY descriptor makes the disk read-only"
    );
    let mut q = ImageQueue::new(image);
    let mem = ram();
    let before = img.contents();
    assert!(q.write(&mem, 0, &[seg(0x1000, 512)]).is_err());
    assert!(q.discard(0, 4096).is_err());
    assert!(q.write_zeroes(0, 4096, true).is_err());
    q.flush().unwrap();
    q.read(&mem, 0, &[seg(0x1000, 512)]).unwrap();
    assert_eq!(img.contents(), before);
}

#[test]
fn odd_sizes_round_down() {
    let img = TempImage::new(1000);
    let image = RawImage::new(img.open(true, false), false).unwrap();
    assert_eq!(image.capacity_sectors(), 1);
    assert_eq!(image.size(), 512);
    let img = TempImage::new(100);
    assert_eq!(
        RawImage::new(img.open(true, false), true)
            .unwrap()
            .capacity_sectors(),
        0
    );
}

#[test]
fn reads_past_the_end_of_a_shrunk_file_fail() {
    let img = TempImage::new(64 << 10);
    let image = Arc::new(RawImage::new(img.open(true, false), false).unwrap());
    let mut q = ImageQueue::new(image);
    // Someone else truncates the file behind our back.
    img.open(true, false).set_len(4096).unwrap();
    let mem = ram();
    let err = q.read(&mem, 8192, &[seg(0x1000, 4096)]).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn buffered_io_with_many_slices_and_region_crossings() {
    let img = TempImage::new(2 << 20);
    let image = Arc::new(RawImage::new(img.open(true, false), false).unwrap());
    let mut q = ImageQueue::new(image);
    // Two regions, so that segments across their boundary are split into two slices.
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(0), 0x20_0000),
        (GuestAddress(0x20_0000), 0x20_0000),
    ])
    .unwrap();
    let boundary = seg(0x20_0000 - 256, 768);
    // A single segment across the boundary, and more segments than one preadv takes.
    let one = vec![boundary];
    let count = ipc::guest_io::IOV_MAX + 76;
    let mut many: Vec<Segment> = (0..count)
        .map(|i| {
            // Leave room around the boundary segment.
            let slot = u64::try_from(if i >= 1023 { i + 2 } else { i }).unwrap();
            seg(0x800 * slot, 512 + u32::try_from(i % 3).unwrap() * 16)
        })
        .collect();
    many.insert(count / 2, boundary);
    for segs in [one, many] {
        let total: usize = segs.iter().map(|s| usize::try_from(s.len).unwrap()).sum();
        let gather = |mem: &GuestRam| {
            let mut out = Vec::with_capacity(total);
            for s in &segs {
                let mut part = vec![0u8; usize::try_from(s.len).unwrap()];
                mem.read_slice(&mut part, s.addr).unwrap();
                out.extend_from_slice(&part);
            }
            out
        };

        q.read(&mem, 4096, &segs).unwrap();
        assert_eq!(gather(&mem), img.contents()[4096..4096 + total]);

        let data = pattern(total, 5);
        let mut at = 0;
        for s in &segs {
            let len = usize::try_from(s.len).unwrap();
            mem.write_slice(&data[at..at + len], s.addr).unwrap();
            at += len;
        }
        let before = img.contents();
        q.write(&mem, 65536, &segs).unwrap();
        let file = img.contents();
        assert_eq!(file[65536..65536 + total], data[..]);
        assert_eq!(file[..65536], before[..65536]);
        assert_eq!(file[65536 + total..], before[65536 + total..]);
    }
}
