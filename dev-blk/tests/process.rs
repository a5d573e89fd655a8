//! Process tests: the real `dev-blk` binary driven over its vhost-user socket by a test frontend
//! that owns a memfd guest RAM and plays the virtio-blk driver.

mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use vm_memory::{Address, GuestAddress};

const BIN: &str = env!("CARGO_BIN_EXE_dev-blk");
const IMAGE_SIZE: usize = 4 << 20;
const SECTORS: u64 = (IMAGE_SIZE / 512) as u64;

struct Setup {
    _dir: TempDir,
    image: PathBuf,
    original: Vec<u8>,
    backend: Backend,
}

fn start(extra: &[&str]) -> Setup {
    let dir = TempDir::new("proc");
    let image = dir.path("disk.img");
    let original = make_image(&image, IMAGE_SIZE);
    let backend = Backend::dev_blk(Path::new(BIN), &dir, &image, extra).expect("spawn dev-blk");
    Setup {
        _dir: dir,
        image,
        original,
        backend,
    }
}

fn connect(s: &Setup, opts: Options) -> Device {
    Device::connect(&s.backend.socket, opts).expect("device bring-up")
}

fn image_bytes(s: &Setup) -> Vec<u8> {
    std::fs::read(&s.image).expect("read image")
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            u8::try_from(i % 239)
                .unwrap()
                .wrapping_mul(3)
                .wrapping_add(seed)
        })
        .collect()
}

fn sector_range(sector: u64, len: usize) -> std::ops::Range<usize> {
    let start = usize::try_from(sector * 512).unwrap();
    start..start + len
}

#[test]
fn config_features_and_read_write_flush_round_trip() {
    let mut s = start(&["--queues", "2"]);
    let mut dev = connect(&s, Options::default());
    assert_eq!(dev.capacity(), SECTORS);
    assert_eq!(
        u32::from_le_bytes(dev.config[20..24].try_into().unwrap()),
        512
    );
    assert_eq!(
        u32::from_le_bytes(dev.config[12..16].try_into().unwrap()),
        254
    );
    assert_eq!(
        u16::from_le_bytes(dev.config[34..36].try_into().unwrap()),
        2
    );
    for f in [
        VIRTIO_F_VERSION_1,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ] {
        assert_ne!(dev.device_features & f, 0, "feature {f:#x}");
    }
    assert_eq!(dev.device_features & VIRTIO_BLK_F_RO, 0);
    let pf = dev.offered_protocol_features.bits();
    assert_eq!(pf & (1 << 12), 0, "INFLIGHT_SHMFD must not be offered");
    assert_eq!(
        pf & ((1 << 0) | (1 << 3) | (1 << 9)),
        (1 << 0) | (1 << 3) | (1 << 9)
    );

    // Existing data reads back.
    let (st, used, at) = dev.request(0, T_IN, 3, None, 2048).unwrap();
    assert_eq!((st, used), (S_OK, 2049));
    assert_eq!(dev.read_bytes(at, 2048), s.original[sector_range(3, 2048)]);

    // Write, read back through the device and in the file.
    let data = pattern(8192, 1);
    let (st, used, _) = dev.request(0, T_OUT, 100, Some(&data), 0).unwrap();
    assert_eq!((st, used), (S_OK, 1));
    let (st, _, at) = dev.request(0, T_IN, 100, None, 8192).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(dev.read_bytes(at, 8192), data);
    assert_eq!(image_bytes(&s)[sector_range(100, 8192)], data[..]);

    let (st, used, _) = dev.request(0, T_FLUSH, 0, None, 0).unwrap();
    assert_eq!((st, used), (S_OK, 1));

    // Scatter-gather: one IN request over three buffers, via an indirect table.
    let bufs = [dev.alloc(512, 0), dev.alloc(1024, 0), dev.alloc(512, 0)];
    let hdr = dev.header(T_IN, 100);
    let status = dev.alloc(1, 0xff);
    let table = dev.alloc(16 * 5, 0);
    let entries = [
        (hdr, 16u32, 0u16),
        (bufs[0], 512, DESC_F_WRITE),
        (bufs[1], 1024, DESC_F_WRITE),
        (bufs[2], 512, DESC_F_WRITE),
        (status, 1, DESC_F_WRITE),
    ];
    for (i, (addr, len, flags)) in entries.iter().enumerate() {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.raw_value().to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        let (f, next) = if i + 1 < entries.len() {
            (flags | DESC_F_NEXT, u16::try_from(i + 1).unwrap())
        } else {
            (*flags, 0)
        };
        raw[12..14].copy_from_slice(&f.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        dev.write_bytes(table.unchecked_add(16 * u64::try_from(i).unwrap()), &raw);
    }
    let used = submit_raw(&mut dev, 0, &[(table, 16 * 5, DESC_F_INDIRECT, None)]);
    assert_eq!(used, Some(2049));
    assert_eq!(dev.byte(status), S_OK);
    let mut got = dev.read_bytes(bufs[0], 512);
    got.extend(dev.read_bytes(bufs[1], 1024));
    got.extend(dev.read_bytes(bufs[2], 512));
    assert_eq!(got, data[..2048]);
    assert!(s.backend.alive());
}

/// Writes raw descriptors `(addr, len, flags, next)` on fresh descriptor indices (linked in
/// order when `next` is `None` and more follow), submits the first as the head, and waits up
/// to 5 s for its completion. Returns the used length, or `None` if it never completed.
fn submit_raw(
    dev: &mut Device,
    q: usize,
    descs: &[(GuestAddress, u32, u16, Option<u16>)],
) -> Option<u32> {
    let vq = &mut dev.queues[q];
    let idx = vq.reserve(descs.len()).expect("free descriptors");
    for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let (flags, next) = match next {
            Some(n) => (flags | DESC_F_NEXT, n),
            None if k + 1 < descs.len() => (flags | DESC_F_NEXT, idx[k + 1]),
            None => (flags, 0),
        };
        vq.write_desc(&dev.mem, idx[k], addr.raw_value(), len, flags, next);
    }
    let head = idx[0];
    vq.push_raw(&dev.mem, head, &idx);
    vq.notify_always(&dev.mem);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut found = None;
        vq.for_each_used(&dev.mem, |id, len| {
            if id == head {
                found = Some(len);
            }
        });
        if found.is_some() {
            return found;
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        vq.wait(&dev.mem, Duration::from_millis(100));
    }
}

#[test]
fn get_id_with_and_without_serial() {
    let s = start(&["--serial", "atoll-disk-7"]);
    let mut dev = connect(&s, Options::default());
    let (st, used, at) = dev.request(0, T_GET_ID, 0, None, 20).unwrap();
    assert_eq!((st, used), (S_OK, 21));
    assert_eq!(dev.read_bytes(at, 20), b"atoll-disk-7\0\0\0\0\0\0\0\0");
    drop(dev);

    let s = start(&[]);
    let mut dev = connect(&s, Options::default());
    let meta = std::fs::metadata(&s.image).unwrap();
    let expected = format!(
        "{:08x}{:012x}",
        meta.dev() & 0xffff_ffff,
        meta.ino() & 0xffff_ffff_ffff
    );
    let (st, _, at) = dev.request(0, T_GET_ID, 0, None, 20).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(dev.read_bytes(at, 20), expected.as_bytes());
}

fn zero_segments(dev: &mut Device, kind: u32, segs: &[(u64, u32, u32)]) -> u8 {
    let mut payload = Vec::new();
    for &(sector, sectors, flags) in segs {
        payload.extend_from_slice(&sector.to_le_bytes());
        payload.extend_from_slice(&sectors.to_le_bytes());
        payload.extend_from_slice(&flags.to_le_bytes());
    }
    let (st, used, _) = dev.request(0, kind, 0, Some(&payload), 0).unwrap();
    assert_eq!(used, 1);
    st
}

#[test]
fn discard_and_write_zeroes_change_the_image() {
    let mut s = start(&[]);
    let mut dev = connect(&s, Options::default());
    let blocks_before = std::fs::metadata(&s.image).unwrap().blocks();
    assert_eq!(
        zero_segments(&mut dev, T_DISCARD, &[(256, 256, 0), (1024, 8, 0)]),
        S_OK
    );
    assert_eq!(
        zero_segments(&mut dev, T_WRITE_ZEROES, &[(2048, 16, 0)]),
        S_OK
    );
    assert_eq!(
        zero_segments(&mut dev, T_WRITE_ZEROES, &[(3000, 24, 1)]),
        S_OK
    );
    let img = image_bytes(&s);
    assert_eq!(img.len(), IMAGE_SIZE, "the image size never changes");
    for (sector, n) in [(256u64, 256u64), (1024, 8), (2048, 16), (3000, 24)] {
        let r = sector_range(sector, usize::try_from(n * 512).unwrap());
        assert!(
            img[r].iter().all(|&b| b == 0),
            "sectors {sector}+{n} are zero"
        );
    }
    assert_eq!(
        img[sector_range(255, 512)],
        s.original[sector_range(255, 512)]
    );
    assert_eq!(
        img[sector_range(512, 512)],
        s.original[sector_range(512, 512)]
    );
    assert_eq!(
        img[sector_range(2064, 512)],
        s.original[sector_range(2064, 512)]
    );
    let blocks_after = std::fs::metadata(&s.image).unwrap().blocks();
    assert!(
        blocks_after < blocks_before,
        "discard punched holes ({blocks_before} -> {blocks_after})"
    );
    // The device reads zeros too.
    let (st, _, at) = dev.request(0, T_IN, 2048, None, 8192).unwrap();
    assert_eq!(st, S_OK);
    assert!(dev.read_bytes(at, 8192).iter().all(|&b| b == 0));
    // Discard with the UNMAP flag is unsupported; a segment past the end is an error.
    assert_eq!(zero_segments(&mut dev, T_DISCARD, &[(0, 1, 1)]), S_UNSUPP);
    assert_eq!(
        zero_segments(&mut dev, T_WRITE_ZEROES, &[(0, 8, 0), (SECTORS - 1, 2, 0)]),
        S_IOERR
    );
    assert_eq!(
        image_bytes(&s)[..4096],
        s.original[..4096],
        "all-or-nothing"
    );
    assert!(s.backend.alive());
}

#[test]
fn readonly_refuses_every_write_and_leaves_the_image_unchanged() {
    let mut s = start(&["--readonly"]);
    let mut dev = connect(&s, Options::default());
    assert_ne!(dev.device_features & VIRTIO_BLK_F_RO, 0);
    assert_eq!(dev.device_features & VIRTIO_BLK_F_DISCARD, 0);
    let data = pattern(4096, 9);
    let (st, used, _) = dev.request(0, T_OUT, 0, Some(&data), 0).unwrap();
    assert_eq!((st, used), (S_IOERR, 1));
    assert_eq!(zero_segments(&mut dev, T_DISCARD, &[(0, 8, 0)]), S_IOERR);
    assert_eq!(
        zero_segments(&mut dev, T_WRITE_ZEROES, &[(0, 8, 1)]),
        S_IOERR
    );
    let (st, _, _) = dev.request(0, T_FLUSH, 0, None, 0).unwrap();
    assert_eq!(st, S_OK);
    let (st, _, at) = dev.request(0, T_IN, 0, None, 4096).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(dev.read_bytes(at, 4096), s.original[..4096]);
    assert_eq!(image_bytes(&s), s.original);
    assert!(s.backend.alive());
}

#[test]
fn requests_past_the_end_fail_without_touching_the_image() {
    let mut s = start(&[]);
    let mut dev = connect(&s, Options::default());
    for (kind, sector, len) in [
        (T_IN, SECTORS, 512usize),
        (T_IN, SECTORS - 1, 1024),
        (T_OUT, SECTORS - 1, 1024),
        (T_OUT, SECTORS, 512),
        (T_IN, u64::MAX, 512),
        (T_OUT, u64::MAX / 512 + 1, 512),
    ] {
        let r = if kind == T_OUT {
            dev.request(0, kind, sector, Some(&pattern(len, 5)), 0)
        } else {
            dev.request(0, kind, sector, None, u32::try_from(len).unwrap())
        };
        let (st, used, _) = r.unwrap();
        assert_eq!((st, used), (S_IOERR, 1), "type {kind} sector {sector}");
    }
    let (st, _, _) = dev.request(0, T_IN, SECTORS - 1, None, 512).unwrap();
    assert_eq!(st, S_OK, "the last sector is readable");
    assert_eq!(image_bytes(&s), s.original);
    assert!(s.backend.alive());
}

#[test]
fn malformed_chains_and_unknown_types_complete_with_errors_and_the_process_survives() {
    let mut s = start(&[]);
    let mut dev = connect(&s, Options::default());

    // No status descriptor: completed with used length 0.
    let hdr = dev.header(T_IN, 0);
    let data = dev.alloc(512, 0);
    assert_eq!(
        submit_raw(&mut dev, 0, &[(hdr, 16, 0, None), (data, 512, 0, None)]),
        Some(0)
    );
    // Status descriptor read-only: used length 0, status byte untouched.
    let status = dev.alloc(1, 0x5a);
    assert_eq!(
        submit_raw(
            &mut dev,
            0,
            &[
                (hdr, 16, 0, None),
                (data, 512, DESC_F_WRITE, None),
                (status, 1, 0, None)
            ]
        ),
        Some(0)
    );
    assert_eq!(dev.byte(status), 0x5a);
    // Data too short (not a multiple of 512).
    let (st, used, _) = dev.request(0, T_IN, 0, None, 100).unwrap();
    assert_eq!((st, used), (S_IOERR, 1));
    // Header too short.
    let status = dev.alloc(1, 0xff);
    assert_eq!(
        submit_raw(
            &mut dev,
            0,
            &[(hdr, 8, 0, None), (status, 1, DESC_F_WRITE, None)]
        ),
        Some(1)
    );
    assert_eq!(dev.byte(status), S_IOERR);
    // Huge: five 15 MiB descriptors over the same memory, 75 MiB of data.
    let big = dev.alloc(15 << 20, 0x11);
    let hdr_out = dev.header(T_OUT, 0);
    let status = dev.alloc(1, 0xff);
    let mut descs = vec![(hdr_out, 16, 0, None)];
    descs.extend((0..5).map(|_| (big, 15u32 << 20, 0u16, None)));
    descs.push((status, 1, DESC_F_WRITE, None));
    assert_eq!(submit_raw(&mut dev, 0, &descs), Some(1));
    assert_eq!(dev.byte(status), S_IOERR);
    // Data outside guest RAM.
    let status = dev.alloc(1, 0xff);
    assert_eq!(
        submit_raw(
            &mut dev,
            0,
            &[
                (hdr_out, 16, 0, None),
                (GuestAddress(1 << 40), 4096, 0, None),
                (status, 1, DESC_F_WRITE, None)
            ]
        ),
        Some(1)
    );
    assert_eq!(dev.byte(status), S_IOERR);
    // A looping chain: d0 -> d1 -> d0.
    let idx = dev.queues[0].reserve(2).unwrap();
    {
        let vq = &mut dev.queues[0];
        vq.write_desc(&dev.mem, idx[0], hdr.raw_value(), 16, DESC_F_NEXT, idx[1]);
        vq.write_desc(
            &dev.mem,
            idx[1],
            status.raw_value(),
            1,
            DESC_F_WRITE | DESC_F_NEXT,
            idx[0],
        );
        vq.push_raw(&dev.mem, idx[0], &idx);
        vq.notify_always(&dev.mem);
    }
    let got = dev.queues[0].collect(&dev.mem, Duration::from_secs(5));
    assert_eq!(got, vec![(idx[0], 0)]);
    // A chain whose next index is outside the table.
    let idx = dev.queues[0].reserve(1).unwrap();
    {
        let vq = &mut dev.queues[0];
        vq.write_desc(&dev.mem, idx[0], hdr.raw_value(), 16, DESC_F_NEXT, 999);
        vq.push_raw(&dev.mem, idx[0], &idx);
        vq.notify_always(&dev.mem);
    }
    let got = dev.queues[0].collect(&dev.mem, Duration::from_secs(5));
    assert_eq!(got, vec![(idx[0], 0)]);
    // A head index outside the descriptor table cannot be completed; later chains still are.
    {
        let mem = dev.mem.clone();
        dev.queues[0].push_head(&mem, 999);
    }
    // Unknown request types.
    for kind in [2u32, 10, 14, 0x1234_5678] {
        let (st, used, _) = dev.request(0, kind, 0, None, 0).unwrap();
        assert_eq!((st, used), (S_UNSUPP, 1), "type {kind}");
    }
    // The device still works and nothing was written.
    let (st, _, at) = dev.request(0, T_IN, 8, None, 4096).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(dev.read_bytes(at, 4096), s.original[sector_range(8, 4096)]);
    assert_eq!(image_bytes(&s), s.original);
    assert!(s.backend.alive());
}

#[test]
fn two_queues_in_parallel() {
    let mut s = start(&["--queues", "2"]);
    let mut dev = connect(
        &s,
        Options {
            queues: 2,
            ..Options::default()
        },
    );
    // 32 writes on each queue to distinct sectors, kicked together.
    let mut expect = Vec::new();
    for q in 0..2usize {
        for i in 0..32u64 {
            let sector = (u64::try_from(q).unwrap() * 64 + i) * 8;
            let data = pattern(
                4096,
                u8::try_from(q * 32).unwrap() + u8::try_from(i).unwrap(),
            );
            let hdr = dev.header(T_OUT, sector);
            let buf = dev.alloc(4096, 0);
            dev.write_bytes(buf, &data);
            let status = dev.alloc(1, 0xff);
            let mem = dev.mem.clone();
            let head = dev.queues[q]
                .push(
                    &mem,
                    &[Buf::r(hdr, 16), Buf::r(buf, 4096), Buf::w(status, 1)],
                )
                .unwrap();
            expect.push((q, head, status, sector, data));
        }
    }
    let mem = dev.mem.clone();
    dev.queues[0].notify_always(&mem);
    dev.queues[1].notify_always(&mem);
    for q in 0..2usize {
        let mut done = Vec::new();
        while done.len() < 32 {
            let got = dev.queues[q].collect(&mem, Duration::from_secs(5));
            assert!(!got.is_empty(), "queue {q} stalled after {}", done.len());
            done.extend(got);
        }
        // In order: completions come back in submission order.
        let heads: Vec<u16> = expect.iter().filter(|e| e.0 == q).map(|e| e.1).collect();
        assert_eq!(done.iter().map(|d| d.0).collect::<Vec<_>>(), heads);
    }
    let img = image_bytes(&s);
    for (_, _, status, sector, data) in &expect {
        assert_eq!(dev.byte(*status), S_OK);
        assert_eq!(img[sector_range(*sector, 4096)], data[..]);
    }
    assert!(s.backend.alive());
}

#[test]
fn event_idx_batches() {
    let mut s = start(&[]);
    let mut dev = connect(
        &s,
        Options {
            event_idx: true,
            ..Options::default()
        },
    );
    assert_ne!(dev.features & VIRTIO_RING_F_EVENT_IDX, 0);
    // Many sequential requests (wrapping the 256-entry ring several times) ...
    for i in 0..600u64 {
        let (st, used, _) = dev.request(0, T_IN, i % SECTORS, None, 512).unwrap();
        assert_eq!((st, used), (S_OK, 513), "request {i}");
        if i % 100 == 99 {
            dev.reset_buffers();
        }
    }
    // ... then batches of 64 published at once with kick suppression honoured.
    let mem = dev.mem.clone();
    for round in 0..5u64 {
        dev.reset_buffers();
        let mut heads = Vec::new();
        for i in 0..64u64 {
            let hdr = dev.header(T_IN, round * 64 + i);
            let buf = dev.alloc(512, 0);
            let status = dev.alloc(1, 0xff);
            heads.push((
                dev.queues[0]
                    .push(
                        &mem,
                        &[Buf::r(hdr, 16), Buf::w(buf, 512), Buf::w(status, 1)],
                    )
                    .unwrap(),
                buf,
                status,
                round * 64 + i,
            ));
        }
        dev.queues[0].notify(&mem);
        let mut done = 0;
        while done < 64 {
            let got = dev.queues[0].collect(&mem, Duration::from_secs(5));
            assert!(!got.is_empty(), "round {round}: stalled after {done}");
            done += got.len();
        }
        for (_, buf, status, sector) in heads {
            assert_eq!(dev.byte(status), S_OK);
            assert_eq!(
                dev.read_bytes(buf, 512),
                s.original[sector_range(sector, 512)]
            );
        }
    }
    assert!(s.backend.alive());
}

#[test]
fn garbage_on_the_socket_then_a_new_connection_works() {
    use std::io::Write;
    let mut s = start(&[]);
    {
        let mut raw = connect_stream(&s.backend.socket, Duration::from_secs(10)).unwrap();
        raw.write_all(&[0xffu8; 64]).unwrap();
        // A header announcing a huge payload, then hang up.
        raw.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f])
            .unwrap();
    }
    // A frontend that sets up and vanishes mid-way.
    {
        let stream = connect_stream(&s.backend.socket, Duration::from_secs(10)).unwrap();
        let fe = vhost::vhost_user::Frontend::from_stream(stream, 1);
        use vhost::VhostBackend;
        fe.set_owner().unwrap();
    }
    let mut dev = connect(&s, Options::default());
    let (st, _, at) = dev.request(0, T_IN, 0, None, 512).unwrap();
    assert_eq!(st, S_OK);
    assert_eq!(dev.read_bytes(at, 512), s.original[..512]);
    assert!(s.backend.alive());
}

#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    let mut s = start(&[]);
    let mut dev = connect(&s, Options::default());
    let (st, _, _) = dev.request(0, T_OUT, 0, Some(&pattern(512, 3)), 0).unwrap();
    assert_eq!(st, S_OK);
    s.backend.signal(Signal::SIGTERM);
    let status = s
        .backend
        .wait_exit(Duration::from_secs(5))
        .expect("exit on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!s.backend.socket.exists());
}

/// Inherited mode, as the launcher runs it: an already listening socket and an open image,
/// both passed as descriptors. The backend serves one frontend after the other on the same
/// listener, and a read-only descriptor makes a read-only disk.
#[test]
fn inherited_descriptors_reconnect_and_readonly_fd() {
    let dir = TempDir::new("inherit");
    let image = dir.path("disk.img");
    let original = make_image(&image, IMAGE_SIZE);
    let sock = dir.path("blk.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut backend = spawn_inherited(&sock, &listener, &file, &[]);

    let data = pattern(4096, 77);
    {
        let mut dev = Device::connect(&sock, Options::default()).unwrap();
        let (st, _, _) = dev.request(0, T_OUT, 16, Some(&data), 0).unwrap();
        assert_eq!(st, S_OK);
    }
    for round in 0..3 {
        let mut dev = Device::connect(&sock, Options::default()).unwrap();
        let (st, _, at) = dev.request(0, T_IN, 16, None, 4096).unwrap();
        assert_eq!(st, S_OK, "round {round}");
        assert_eq!(dev.read_bytes(at, 4096), data);
    }
    assert!(backend.alive());
    backend.signal(Signal::SIGTERM);
    let status = backend
        .wait_exit(Duration::from_secs(5))
        .expect("exit on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(sock.exists(), "the launcher's socket is not ours to remove");

    // An O_RDONLY descriptor without --readonly: read-only disk.
    let ro = File::open(&image).unwrap();
    let mut backend = spawn_inherited(&sock, &listener, &ro, &[]);
    let mut dev = Device::connect(&sock, Options::default()).unwrap();
    assert_ne!(dev.device_features & VIRTIO_BLK_F_RO, 0);
    let (st, _, _) = dev.request(0, T_OUT, 0, Some(&pattern(512, 1)), 0).unwrap();
    assert_eq!(st, S_IOERR);
    let mut expected = original;
    expected[sector_range(16, 4096)].copy_from_slice(&data);
    assert_eq!(std::fs::read(&image).unwrap(), expected);
    assert!(backend.alive());
}

/// The launcher's restart path: dev-blk is killed with requests the guest posted but that were
/// never completed; a new incarnation inherits the same listener and image, the frontend
/// replays the setup with `SET_VRING_BASE(used.idx)`, and every posted request completes.
#[test]
fn restart_after_a_crash_resumes_from_the_used_index() {
    let dir = TempDir::new("restart");
    let image = dir.path("disk.img");
    let original = make_image(&image, IMAGE_SIZE);
    let sock = dir.path("blk.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut first = spawn_inherited(&sock, &listener, &file, &["--queues", "2"]);
    let mut dev = Device::connect(
        &sock,
        Options {
            queues: 2,
            event_idx: true,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..10u64 {
        let (st, _, _) = dev
            .request(
                usize::try_from(i % 2).unwrap(),
                T_OUT,
                i * 8,
                Some(&pattern(4096, u8::try_from(i).unwrap())),
                0,
            )
            .unwrap();
        assert_eq!(st, S_OK);
    }
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("killed");

    // The guest keeps posting (and kicking: the eventfds count) while no backend exists.
    let mem = dev.mem.clone();
    let mut posted = Vec::new();
    for (q, sector) in [(0usize, 200u64), (1, 300), (0, 400)] {
        let data = pattern(4096, u8::try_from(sector % 251).unwrap());
        let hdr = dev.header(T_OUT, sector);
        let buf = dev.alloc(4096, 0);
        dev.write_bytes(buf, &data);
        let status = dev.alloc(1, 0xff);
        let head = dev.queues[q]
            .push(
                &mem,
                &[Buf::r(hdr, 16), Buf::r(buf, 4096), Buf::w(status, 1)],
            )
            .unwrap();
        dev.queues[q].notify_always(&mem);
        posted.push((q, head, status, sector, data));
    }

    let mut second = spawn_inherited(&sock, &listener, &file, &["--queues", "2"]);
    dev.resume(&sock).unwrap();
    for q in 0..2usize {
        let want = posted.iter().filter(|p| p.0 == q).count();
        let mut got = Vec::new();
        while got.len() < want {
            let c = dev.queues[q].collect(&mem, Duration::from_secs(5));
            assert!(
                !c.is_empty(),
                "queue {q}: posted requests not completed after restart"
            );
            got.extend(c);
        }
        let heads: Vec<u16> = posted.iter().filter(|p| p.0 == q).map(|p| p.1).collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), heads);
    }
    let img = std::fs::read(&image).unwrap();
    for (_, _, status, sector, data) in &posted {
        assert_eq!(dev.byte(*status), S_OK);
        assert_eq!(img[sector_range(*sector, 4096)], data[..]);
    }
    assert_eq!(
        img[sector_range(1000, 4096)],
        original[sector_range(1000, 4096)]
    );
    assert!(second.alive());
}

fn spawn_inherited(sock: &Path, listener: &UnixListener, image: &File, extra: &[&str]) -> Backend {
    let mut cmd = Command::new(BIN);
    cmd.args(["--socket-fd", "3", "--image-fd", "4"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let child = ipc::spawn::spawn_with_fds(
        &mut cmd,
        &[
            ipc::spawn::Inherit {
                fd: listener.as_fd(),
                target: 3,
            },
            ipc::spawn::Inherit {
                fd: image.as_fd(),
                target: 4,
            },
        ],
    )
    .expect("spawn dev-blk with inherited fds");
    Backend {
        child,
        socket: sock.to_path_buf(),
    }
}

#[test]
fn bad_command_lines_are_refused() {
    for args in [
        vec!["--socket-fd", "3"],
        vec!["--socket", "/nonexistent/x", "--image-fd", "4"],
        vec![
            "--socket",
            "/tmp/x",
            "--image",
            "/tmp/y",
            "--serial",
            "123456789012345678901",
        ],
        vec!["--socket", "/tmp/x", "--image", "/tmp/y", "--queues", "0"],
        vec!["--socket-fd", "1", "--image-fd", "2"],
        vec!["--socket-fd", "57", "--image-fd", "58"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
    }
}
