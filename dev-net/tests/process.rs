//! Process tests: the real `dev-net` binary driven over its vhost-user socket by a test
//! frontend that owns a memfd guest RAM and plays the virtio-net driver, with its tap in a
//! network namespace each test creates for itself (so the tests need root, as CI has).

mod common;

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const SECOND: Duration = Duration::from_secs(1);

/// Receives `n` datagrams on `sock`, as `(source port, payload)`.
fn host_recv(sock: &std::net::UdpSocket, n: usize) -> Vec<(u16, Vec<u8>)> {
    let mut buf = vec![0u8; 65536];
    (0..n)
        .map(|i| {
            let (len, from) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {n} from the guest: {e}"));
            (from.port(), buf[..len].to_vec())
        })
        .collect()
}

/// UDP frames to `dport` among `frames`, as `(source port, payload, frame)`.
fn udp_to(frames: &[RxFrame], dport: u16) -> Vec<(u16, Vec<u8>, RxFrame)> {
    frames
        .iter()
        .filter_map(|f| {
            let (s, d, p, _) = parse_udp(&f.frame)?;
            (d == dport).then(|| (s, p, f.clone()))
        })
        .collect()
}

/// Starts dev-net in inherited mode: the listener at fd 3, the tap queues from fd 4 on.
fn spawn_inherited(dir: &TempDir, listener: &UnixListener, taps: &[OwnedFd]) -> Backend {
    let mut cmd = Command::new(BIN);
    cmd.args(["--socket-fd", "3", "--mac", GUEST_MAC_STR]);
    let mut fds = vec![ipc::spawn::Inherit {
        fd: listener.as_fd(),
        target: 3,
    }];
    for (k, fd) in (4..).zip(taps) {
        cmd.args(["--tap-fd", &k.to_string()]);
        fds.push(ipc::spawn::Inherit {
            fd: fd.as_fd(),
            target: k,
        });
    }
    let log = File::create(dir.path("dev-net.log")).unwrap();
    cmd.env("ATOLL_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stderr(log);
    let child = ipc::spawn::spawn_with_fds(&mut cmd, &fds).expect("spawn dev-net");
    Backend {
        child,
        log: dir.path("dev-net.log"),
    }
}

#[test]
fn standalone_creates_the_tap_and_serves_its_config() {
    enter_netns();
    let dir = TempDir::new("create");
    let (mut be, sock) = Backend::standalone(
        &dir,
        &["--tap", "dnc0", "--queues", "2", "--mac", GUEST_MAC_STR],
    )
    .unwrap();
    let mut net = Net::connect(
        &sock,
        Options {
            pairs: 2,
            ..Options::default()
        },
    )
    .unwrap();
    assert_eq!(net.queue_num, 4);
    let c = net.config().unwrap();
    assert_eq!(c[0..6], GUEST_MAC);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2, "queue pairs");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500, "the tap's MTU");
    assert_eq!(c[12..17], [0xff; 5], "speed and duplex unknown");
    for (bit, name) in [
        (F_VERSION_1, "VERSION_1"),
        (F_EVENT_IDX, "EVENT_IDX"),
        (F_INDIRECT_DESC, "INDIRECT_DESC"),
        (F_MRG_RXBUF, "MRG_RXBUF"),
        (F_MAC, "MAC"),
        (F_STATUS, "STATUS"),
        (F_MQ, "MQ"),
        (F_MTU, "MTU"),
        (F_CSUM, "CSUM"),
        (F_GUEST_CSUM, "GUEST_CSUM"),
        (F_HOST_TSO4, "HOST_TSO4"),
        (F_GUEST_TSO4, "GUEST_TSO4"),
    ] {
        assert_ne!(net.offered & bit, 0, "{name} offered");
    }
    assert_eq!(net.offered & (1 << 17), 0, "no control queue");
    // Created, set up, multi-queue, with vnet headers.
    let link = ip(&["-d", "link", "show", "dnc0"]);
    assert!(link.contains(",UP"), "{link}");
    assert!(
        link.contains("multi_queue") && link.contains("vnet_hdr on"),
        "{link}"
    );
    drop(net);
    let log = be.stop().unwrap();
    assert!(log.contains("created the tap"), "{log}");
    assert!(!sock.exists(), "standalone mode removes its socket");
    // The tap was ours and not persistent: gone with the process.
    let deadline = Instant::now() + 5 * SECOND;
    while Command::new("ip")
        .args(["link", "show", "dnc0"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "dnc0 outlived dev-net");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn frames_flow_both_ways_with_mergeable_buffers() {
    enter_netns();
    make_tap("dn0", false, 9000);
    let host = host_socket(7000);
    let dir = TempDir::new("flow");
    let (mut be, sock) =
        Backend::standalone(&dir, &["--tap", "dn0", "--mac", GUEST_MAC_STR]).unwrap();
    let mut net = Net::connect(&sock, Options::default()).unwrap();
    wait_link_up("dn0");
    let cfg = net.config().unwrap();
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);

    // Transmit: the header alone, the header cut inside, a jumbo frame in three pieces.
    let sends: [(usize, &[usize]); 3] = [(18, &[12]), (1400, &[5, 100]), (8000, &[12, 3000, 3000])];
    let mut heads = Vec::new();
    for (i, (len, split)) in (0u8..).zip(sends) {
        let payload = pattern(len, i);
        let frame = guest_udp_frame(5000 + u16::from(i), 7000, &payload, 0);
        heads.push(net.post_tx(0, &[0; 12], &frame, split));
    }
    let done = net.tx_done(0, 3);
    assert_eq!(done, heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
    let got = host_recv(&host, 3);
    for (i, (len, _)) in (0u8..).zip(sends) {
        assert_eq!(got[usize::from(i)], (5000 + u16::from(i), pattern(len, i)));
    }

    // Receive into 2 KiB buffers: a 6000-byte datagram takes three.
    net.post_rx(0, 16, 2048);
    let sizes = [100usize, 1472, 6000];
    for (i, len) in (0u8..).zip(sizes) {
        send_to_guest(7100 + u16::from(i), 8000, &pattern(len, 0x40 + i));
    }
    let frames = net.rx_frames(0, 3, 5 * SECOND);
    let udp = udp_to(&frames, 8000);
    assert_eq!(udp.len(), 3, "{frames:?}");
    for ((i, len), (sport, payload, f)) in (0u8..).zip(sizes).zip(&udp) {
        assert_eq!(*sport, 7100 + u16::from(i));
        assert_eq!(*payload, pattern(len, 0x40 + i));
        assert_eq!(f.frame[0..6], GUEST_MAC, "to the guest");
        assert_eq!(f.frame[6..12], HOST_MAC, "from the host");
        let need = (12 + 42 + len).div_ceil(2048);
        assert_eq!(usize::from(f.num_buffers()), need, "num_buffers");
        assert_eq!(f.buffers, need);
    }
    drop(net);
    let log = be.stop().unwrap();
    let tx = counters(&log, 0, "tx");
    assert!(
        tx.contains("3 frames") && tx.contains("dropped: 0 malformed"),
        "{tx}"
    );
    assert!(!log.contains("WARN"), "{log}");
}

#[test]
fn malformed_and_oversized_frames_are_dropped_and_counted_and_traffic_goes_on() {
    enter_netns();
    make_tap("dn0", false, 9000);
    let host = host_socket(7000);
    let dir = TempDir::new("bad");
    let (mut be, sock) =
        Backend::standalone(&dir, &["--tap", "dn0", "--mac", GUEST_MAC_STR]).unwrap();
    // Without MRG_RXBUF: one buffer per frame.
    let mut net = Net::connect(
        &sock,
        Options {
            features: F_VERSION_1 | F_EVENT_IDX | F_MAC,
            ..Options::default()
        },
    )
    .unwrap();
    wait_link_up("dn0");

    // Receive buffers: good, device-readable (malformed), good.
    let a = net.alloc(1526, 0);
    let b = net.alloc(1526, 0);
    let c = net.alloc(1526, 0);
    let ha = net.post_raw(
        0,
        &[Buf {
            addr: a,
            len: 1526,
            write: true,
        }],
    );
    let hb = net.post_raw(
        0,
        &[Buf {
            addr: b,
            len: 1526,
            write: false,
        }],
    );
    let hc = net.post_raw(
        0,
        &[Buf {
            addr: c,
            len: 1526,
            write: true,
        }],
    );
    // 3042 bytes do not fit a 1526-byte buffer: dropped, the buffer stays.
    send_to_guest(7100, 8000, &pattern(3000, 1));
    send_to_guest(7101, 8000, &pattern(100, 2));
    send_to_guest(7102, 8000, &pattern(200, 3));
    let mem = net.mem.clone();
    let used: Vec<(u16, u32)> = net.rings[0]
        .collect(&mem, 3, 5 * SECOND)
        .into_iter()
        .map(|(h, l, _)| (h, l))
        .collect();
    assert_eq!(used, [(ha, 12 + 142), (hb, 0), (hc, 12 + 242)]);
    assert_eq!(
        parse_udp(&net.read(a + 12, 142)).unwrap().2,
        pattern(100, 2)
    );
    assert_eq!(
        parse_udp(&net.read(c + 12, 242)).unwrap().2,
        pattern(200, 3)
    );
    assert_eq!(
        net.read(b, 4),
        [0; 4],
        "the readable buffer was not written"
    );

    // Transmit: device-writable, oversized, short, a header the device refuses, then good.
    let good = guest_udp_frame(5000, 7000, &pattern(500, 9), 0);
    let big = net.alloc(65_563, 0);
    let w = net.alloc(100, 0);
    let mut heads = vec![
        net.post_raw(
            1,
            &[Buf {
                addr: w,
                len: 100,
                write: true,
            }],
        ),
        net.post_raw(
            1,
            &[Buf {
                addr: big,
                len: 12 + 65_551,
                write: false,
            }],
        ),
        net.post_tx(0, &[0; 12], &good[..10], &[]),
        // NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated.
        net.post_tx(0, &net_header(1, 34, 6), &good, &[]),
    ];
    heads.push(net.post_tx(0, &[0; 12], &good, &[]));
    let done = net.tx_done(0, 5);
    assert_eq!(done, heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
    assert_eq!(host_recv(&host, 1), [(5000, pattern(500, 9))]);
    assert!(be.alive());
    // And later frames still flow both ways.
    net.post_tx(0, &[0; 12], &guest_udp_frame(5001, 7000, b"after", 0), &[]);
    assert_eq!(host_recv(&host, 1), [(5001, b"after".to_vec())]);
    net.post_rx(0, 1, 1526);
    send_to_guest(7103, 8000, b"later");
    let frames = net.rx_frames(0, 1, 5 * SECOND);
    assert_eq!(udp_to(&frames, 8000)[0].1, b"later");

    drop(net);
    let log = be.stop().unwrap();
    let rx = counters(&log, 0, "rx");
    assert!(
        rx.contains("3 frames")
            && rx.contains(
                "dropped: 1 malformed chain, 0 short, 1 oversized, 0 bad header, 0 tap error"
            ),
        "{rx}"
    );
    let tx = counters(&log, 0, "tx");
    assert!(
        tx.contains("2 frames")
            && tx.contains(
                "dropped: 1 malformed chain, 1 short, 1 oversized, 1 bad header, 0 tap error"
            ),
        "{tx}"
    );
    // The first drop of each kind is logged at WARN, once.
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("dropped"))
        .count();
    assert_eq!(warns, 6, "{log}");
}

#[test]
fn offloads_follow_the_negotiated_features() {
    enter_netns();
    make_tap("dn0", false, 1500);
    let host = host_socket(7000);
    let dir = TempDir::new("offload");
    let (mut be, sock) =
        Backend::standalone(&dir, &["--tap", "dn0", "--mac", GUEST_MAC_STR]).unwrap();
    let base = F_VERSION_1 | F_MRG_RXBUF | F_EVENT_IDX | F_MAC;
    let uso = (1u64 << 54) | (1 << 55) | (1 << 56);

    // With checksum offload: frames come partially checksummed, and may go out so.
    let mut net = Net::connect(
        &sock,
        Options {
            features: base | F_CSUM | F_GUEST_CSUM | uso,
            ..Options::default()
        },
    )
    .unwrap();
    wait_link_up("dn0");
    net.post_rx(0, 8, 2048);
    send_to_guest(7100, 8000, &pattern(300, 1));
    let f = udp_to(&net.rx_frames(0, 1, 5 * SECOND), 8000)[0].2.clone();
    assert_eq!(f.header[0] & 1, 1, "NEEDS_CSUM: {:?}", f.header);
    assert_eq!(
        u16::from_le_bytes([f.header[6], f.header[7]]),
        34,
        "csum_start"
    );
    assert_eq!(
        u16::from_le_bytes([f.header[8], f.header[9]]),
        6,
        "csum_offset"
    );
    // A transmitted frame with NEEDS_CSUM and a checksum field the kernel will complete.
    let frame = guest_udp_frame(5000, 7000, &pattern(700, 2), 0x1234);
    net.post_tx(0, &net_header(1, 34, 6), &frame, &[]);
    assert_eq!(host_recv(&host, 1), [(5000, pattern(700, 2))]);
    if net.offered & uso == uso {
        // UDP segmentation offload: one 4000-byte super-frame instead of four datagrams.
        let s = std::net::UdpSocket::bind(("10.99.0.1", 7200)).unwrap();
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::UdpGsoSegment, &1000).unwrap();
        s.send_to(&pattern(4000, 3), ("10.99.0.2", 8001)).unwrap();
        let frames = udp_to(&net.rx_frames(0, 1, 5 * SECOND), 8001);
        assert_eq!(frames.len(), 1);
        let f = &frames[0].2;
        assert_eq!(f.header[1], 5, "gso_type UDP_L4: {:?}", f.header);
        assert_eq!(
            u16::from_le_bytes([f.header[4], f.header[5]]),
            1000,
            "gso_size"
        );
        assert_eq!(f.frame.len(), 42 + 4000);
    } else {
        eprintln!("this kernel's taps take no USO: that part is not checked");
    }
    drop(net);

    // Without: complete checksums, and NEEDS_CSUM from the driver is refused.
    let mut net = Net::connect(
        &sock,
        Options {
            features: base,
            ..Options::default()
        },
    )
    .unwrap();
    net.post_rx(0, 8, 2048);
    send_to_guest(7101, 8000, &pattern(300, 4));
    let (_, payload, f) = udp_to(&net.rx_frames(0, 1, 5 * SECOND), 8000)[0].clone();
    assert_eq!(payload, pattern(300, 4));
    assert_eq!(f.header[0] & 1, 0, "no NEEDS_CSUM: {:?}", f.header);
    let (_, _, _, csum) = parse_udp(&f.frame).unwrap();
    assert_ne!(csum, 0, "the kernel filled in the checksum");
    // Segmentation is done by the host: four datagrams.
    let s = std::net::UdpSocket::bind(("10.99.0.1", 7201)).unwrap();
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::UdpGsoSegment, &1000).unwrap();
    s.send_to(&pattern(4000, 5), ("10.99.0.2", 8001)).unwrap();
    let frames = udp_to(&net.rx_frames(0, 4, 5 * SECOND), 8001);
    assert_eq!(frames.len(), 4);
    assert!(
        frames
            .iter()
            .all(|f| f.2.header[1] == 0 && f.1.len() == 1000)
    );
    let h = net.post_tx(0, &net_header(1, 34, 6), &frame, &[]);
    assert_eq!(net.tx_done(0, 1), [(h, 0)]);
    drop(net);
    let log = be.stop().unwrap();
    assert!(counters(&log, 0, "tx").contains("1 bad header"), "{log}");
}

#[test]
fn two_queue_pairs_each_carry_traffic_and_a_disabled_pair_gets_none() {
    enter_netns();
    make_tap("dn0", true, 1500);
    let host = host_socket(7000);
    let dir = TempDir::new("mq");
    let (mut be, sock) = Backend::standalone(
        &dir,
        &["--tap", "dn0", "--queues", "2", "--mac", GUEST_MAC_STR],
    )
    .unwrap();
    let mut net = Net::connect(
        &sock,
        Options {
            pairs: 2,
            ..Options::default()
        },
    )
    .unwrap();
    wait_link_up("dn0");
    // Each pair transmits.
    for pair in 0..2u16 {
        let frame = guest_udp_frame(5000 + pair, 7000, &pattern(64, 1), 0);
        net.post_tx(usize::from(pair), &[0; 12], &frame, &[]);
        assert_eq!(net.tx_done(usize::from(pair), 1).len(), 1);
    }
    let mut from: Vec<u16> = host_recv(&host, 2).into_iter().map(|g| g.0).collect();
    from.sort_unstable();
    assert_eq!(from, [5000, 5001]);

    net.post_rx(0, 200, 2048);
    net.post_rx(1, 200, 2048);
    // Flows are spread over the attached tap queues by their hash.
    let per_pair = |net: &mut Net, first_port: u16, n: u16| -> [usize; 2] {
        for p in first_port..first_port + n {
            send_to_guest(p, 8000, &p.to_be_bytes());
        }
        let mut counts = [0usize; 2];
        let deadline = Instant::now() + 5 * SECOND;
        while counts.iter().sum::<usize>() < usize::from(n) && Instant::now() < deadline {
            for (pair, count) in counts.iter_mut().enumerate() {
                let frames = net.rx_frames(pair, usize::from(n), Duration::from_millis(20));
                *count += udp_to(&frames, 8000).len();
            }
        }
        counts
    };
    let both = per_pair(&mut net, 20000, 48);
    assert_eq!(
        both.iter().sum::<usize>(),
        48,
        "{both:?}\n{}\n{}\n{}",
        be.log_text(),
        ip(&["-s", "-d", "link", "show", "dn0"]),
        ip(&["neigh"])
    );
    assert!(both[0] > 0 && both[1] > 0, "both pairs receive: {both:?}");

    // The guest goes down to one pair: pair 1's tap queue is detached and gets nothing.
    net.set_pair_enabled(1, false).unwrap();
    let one = per_pair(&mut net, 21000, 48);
    assert_eq!(one, [48, 0]);
    // And back to two.
    net.set_pair_enabled(1, true).unwrap();
    let again = per_pair(&mut net, 22000, 48);
    assert_eq!(again.iter().sum::<usize>(), 48, "{again:?}");
    assert!(again[1] > 0, "pair 1 receives again: {again:?}");
    drop(net);
    let log = be.stop().unwrap();
    assert!(
        counters(&log, 1, "rx").contains("dropped: 0 malformed"),
        "{log}"
    );
}

#[test]
fn without_receive_buffers_frames_wait_without_loss_or_spinning() {
    enter_netns();
    make_tap("dn0", false, 1500);
    let dir = TempDir::new("stall");
    let (mut be, sock) =
        Backend::standalone(&dir, &["--tap", "dn0", "--mac", GUEST_MAC_STR]).unwrap();
    let mut net = Net::connect(&sock, Options::default()).unwrap();
    wait_link_up("dn0");
    for i in 0..5u8 {
        send_to_guest(7100, 8000, &pattern(100, i));
    }
    std::thread::sleep(Duration::from_millis(200));
    let before = be.cpu_ticks();
    std::thread::sleep(Duration::from_millis(500));
    let spent = be.cpu_ticks() - before;
    assert!(
        spent <= 5,
        "dev-net used {spent} ticks in 0.5 s while waiting for buffers"
    );
    net.post_rx(0, 8, 2048);
    let frames = udp_to(&net.rx_frames(0, 5, 5 * SECOND), 8000);
    let payloads: Vec<Vec<u8>> = frames.into_iter().map(|f| f.1).collect();
    assert_eq!(
        payloads,
        (0..5u8).map(|i| pattern(100, i)).collect::<Vec<_>>()
    );
    drop(net);
    let log = be.stop().unwrap();
    assert!(counters(&log, 0, "rx").contains("5 frames"), "{log}");
    assert!(!log.contains("WARN"), "{log}");
}

/// The launcher's way: an inherited listener and tap queues. dev-net serves one frontend
/// after the other on the same listener; killed with chains the guest posted, a new
/// incarnation on the same descriptors completes them all, in order, after the frontend
/// resumes at `used.idx`.
#[test]
fn inherited_mode_reconnects_and_restarts_without_loss() {
    enter_netns();
    make_tap("dn0", true, 1500);
    let host = host_socket(7000);
    let dir = TempDir::new("restart");
    let taps = ipc::tap::open_tap("dn0", 2).unwrap();
    assert!(!taps.created);
    let sock = dir.path("net.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut first = spawn_inherited(&dir, &listener, &taps.fds);
    wait_link_up("dn0");
    let opts = Options {
        pairs: 2,
        ..Options::default()
    };
    for round in 0..2u16 {
        let mut net = Net::connect(&sock, opts).unwrap();
        net.post_tx(
            1,
            &[0; 12],
            &guest_udp_frame(5000 + round, 7000, b"hi", 0),
            &[],
        );
        assert_eq!(host_recv(&host, 1), [(5000 + round, b"hi".to_vec())]);
    }

    let mut net = Net::connect(&sock, opts).unwrap();
    net.post_rx(0, 64, 2048);
    net.post_rx(1, 64, 2048);
    // The guest talks to host port 7100 from pair 0: the tap then steers that flow's answers
    // to queue 0 (whose frames wait across a restart; pair 1's queue is detached and emptied
    // when the new incarnation starts, until the frontend enables pair 1 again).
    let back = host_socket(7100);
    net.post_tx(0, &[0; 12], &guest_udp_frame(8000, 7100, b"before", 0), &[]);
    assert_eq!(net.tx_done(0, 1).len(), 1);
    assert_eq!(host_recv(&back, 1), [(8000, b"before".to_vec())]);
    first.signal(Signal::SIGKILL);
    first.wait_exit(5 * SECOND).unwrap();

    // The guest goes on transmitting while no backend exists (its kicks are counted in the
    // eventfds), and the host answers meanwhile.
    let mut posted = Vec::new();
    for (pair, port) in [(0usize, 5020u16), (1, 5021), (0, 5022), (1, 5023)] {
        let h = net.post_tx(
            pair,
            &[0; 12],
            &guest_udp_frame(port, 7000, &pattern(300, 7), 0),
            &[],
        );
        posted.push((pair, h, port));
    }
    back.send_to(b"while down", ("10.99.0.2", 8000)).unwrap();

    let mut second = spawn_inherited(&dir, &listener, &taps.fds);
    net.resume(&sock).unwrap();
    for pair in 0..2 {
        let want: Vec<(u16, u32)> = posted
            .iter()
            .filter(|p| p.0 == pair)
            .map(|p| (p.1, 0))
            .collect();
        assert_eq!(
            net.tx_done(pair, want.len()),
            want,
            "pair {pair} completes in order"
        );
    }
    let mut from: Vec<u16> = host_recv(&host, 4).into_iter().map(|g| g.0).collect();
    from.sort_unstable();
    assert_eq!(from, [5020, 5021, 5022, 5023]);
    // The frame sent while dev-net was down waited in the tap queue of pair 0.
    let frames = net.rx_frames(0, 1, 5 * SECOND);
    assert_eq!(udp_to(&frames, 8000)[0].1, b"while down");
    // Both directions work on, on both pairs.
    net.post_tx(1, &[0; 12], &guest_udp_frame(5030, 7000, b"after", 0), &[]);
    assert_eq!(host_recv(&host, 1), [(5030, b"after".to_vec())]);
    assert!(second.alive());
    drop(net);
    let log = second.stop().unwrap();
    assert!(!log.contains("WARN"), "{log}");
    assert!(sock.exists(), "the launcher's socket is not ours to remove");
}

#[test]
fn bad_command_lines_and_descriptors_are_refused() {
    enter_netns();
    ip(&["tuntap", "add", "tun0", "mode", "tun"]);
    for args in [
        vec![],
        vec!["--socket-fd", "3"],
        vec!["--socket", "/tmp/x"],
        vec!["--tap", "dn0"],
        vec!["--socket", "/tmp/x", "--tap", "dn0", "--queues", "0"],
        vec!["--socket", "/tmp/x", "--tap", "dn0", "--queues", "128"],
        vec![
            "--socket",
            "/tmp/x",
            "--tap",
            "dn0",
            "--mac",
            "01:00:5e:00:00:01",
        ],
        vec!["--socket", "/tmp/x", "--tap", "dn0", "--mtu", "67"],
        vec!["--socket-fd", "3", "--tap-fd", "4", "--queues", "2"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
    }
    let dir = TempDir::new("badargs");
    let refused = |args: &[&str], want: &str| {
        let out = Command::new(BIN)
            .args(["--socket", dir.path("s").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    };
    refused(
        &["--tap", "a-name-too-long-for-linux"],
        "longer than 15 bytes",
    );
    refused(&["--tap", "tun0"], "tun0 is a tun device");
    refused(&["--tap", "lo"], "not a tap");

    // An inherited descriptor that is not a tap queue.
    let listener = UnixListener::bind(dir.path("l.sock")).unwrap();
    let null = File::open("/dev/null").unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["--socket-fd", "3", "--tap-fd", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = ipc::spawn::spawn_with_fds(
        &mut cmd,
        &[
            ipc::spawn::Inherit {
                fd: listener.as_fd(),
                target: 3,
            },
            ipc::spawn::Inherit {
                fd: null.as_fd(),
                target: 4,
            },
        ],
    )
    .unwrap()
    .wait_with_output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--tap-fd 4") && err.contains("not a tun/tap device"),
        "{err}"
    );
}
