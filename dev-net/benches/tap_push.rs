//! dev-net transmit vs a plain tap writer: the process tests' host-side vhost-user driver
//! keeps a real dev-net's transmit ring full of Ethernet/IPv4/TCP frames (12-byte vnet
//! header, NEEDS_CSUM; the 64 KiB row as TCPV4 segmentation-offload frames with gso_size
//! 1448, HOST_TSO4 and CSUM negotiated), and then this process writes the same frames
//! (header and all) to the same tap itself, one `write` per frame. Rows: 64-byte frames,
//! 1514-byte frames (an IP packet of 1500), and 64 KiB TSO frames. Printed per row and side:
//! frames per second and Gbit/s of Ethernet frame bytes (the vnet header not counted), and
//! the ratio dev-net / plain.
//!
//! The frames go to an address routed to a blackhole in a private network namespace with
//! forwarding off: the kernel takes each one through the tap and IPv4 receive and drops it at
//! routing. Each side's run is checked against the tap's and IPv4's counters: every frame
//! pushed was received by the tap without error and reached IPv4 with a valid header.
//!
//! Needs root (a network namespace). Run: `cargo bench -p dev-net --bench tap_push` (env:
//! `BENCH_SECS` per row and side, default 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::{
    BIN, Backend, Buf, F_CSUM, F_EVENT_IDX, F_HOST_TSO4, F_MAC, F_MRG_RXBUF, F_VERSION_1, GUEST_IP,
    GUEST_MAC, GUEST_MAC_STR, HOST_MAC, Net, Options, TempDir, enter_netns, inet_checksum, ip,
    make_tap, wait_link_up,
};

const TAP: &str = "bn0";
/// Where the frames go: routed to a blackhole.
const SINK_IP: [u8; 4] = [10, 99, 1, 1];
const MSS: u16 = 1448;
const QUEUE_SIZE: u16 = 256;
/// Distinct buffers per row and side (as many as the ring has entries).
const BUFFERS: usize = 256;
const HDR_LEN: usize = 12;
/// Ethernet + IPv4 + TCP headers.
const L4_END: usize = 14 + 20 + 20;

struct Row {
    name: &'static str,
    /// TCP payload bytes.
    payload: usize,
    tso: bool,
}

const ROWS: [Row; 3] = [
    Row {
        name: "64 B",
        payload: 64 - L4_END,
        tso: false,
    },
    Row {
        name: "1500 B",
        payload: 1500 - 40,
        tso: false,
    },
    Row {
        name: "64 KiB TSO",
        payload: 45 * MSS as usize,
        tso: true,
    },
];

/// The vnet header followed by an Ethernet/IPv4/TCP frame from the guest to `SINK_IP` with
/// `payload` bytes (the `seed`th of a row: sequence numbers differ), the TCP checksum left
/// to the host (NEEDS_CSUM, the pseudo-header sum in the field).
fn frame(payload: usize, tso: bool, seed: u32) -> anyhow::Result<Vec<u8>> {
    let mut f = vec![0u8; HDR_LEN + L4_END + payload];
    let (h, rest) = f.split_at_mut(HDR_LEN);
    h[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    if tso {
        h[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        h[4..6].copy_from_slice(&MSS.to_le_bytes());
    }
    h[2..4].copy_from_slice(&u16::try_from(L4_END)?.to_le_bytes()); // hdr_len
    h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: the TCP header
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: TCP's checksum field
    rest[0..6].copy_from_slice(&HOST_MAC);
    rest[6..12].copy_from_slice(&GUEST_MAC);
    rest[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = u16::try_from(40 + payload).context("an IPv4 packet of at most 64 KiB")?;
    let iph = &mut rest[14..34];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&total.to_be_bytes());
    iph[4..6].copy_from_slice(&u16::try_from(seed & 0xffff)?.to_be_bytes());
    iph[6] = 0x40; // don't fragment
    iph[8] = 64;
    iph[9] = 6;
    iph[12..16].copy_from_slice(&GUEST_IP);
    iph[16..20].copy_from_slice(&SINK_IP);
    let c = inet_checksum(iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    let tcp = &mut rest[34..];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    let seq = seed.wrapping_mul(u32::try_from(payload)?);
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 20 bytes
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    for (i, b) in tcp[20..].iter_mut().enumerate() {
        *b = u8::try_from(i % 251)?;
    }
    // The pseudo-header sum, folded and not complemented, as a driver leaves it for the
    // device to complete.
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&GUEST_IP);
    pseudo.extend_from_slice(&SINK_IP);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&u16::try_from(20 + payload)?.to_be_bytes());
    let sum = !inet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    Ok(f)
}

/// The tap's receive counters and IPv4's input counters in this namespace.
#[derive(Clone, Copy, Debug)]
struct Counters {
    rx_packets: u64,
    rx_errors: u64,
    rx_dropped: u64,
    ip_in_hdr_errors: u64,
    ip_in_addr_errors: u64,
}

fn counters() -> anyhow::Result<Counters> {
    // `thread-self`: the namespace is this thread's.
    let dev = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{TAP}:")))
        .with_context(|| format!("{TAP} missing from /proc/net/dev"))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip: "));
    let (names, values) = (
        ip_lines.next().context("no Ip: names")?,
        ip_lines.next().context("no Ip: values")?,
    );
    let ip: HashMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| Ok((n, v.parse::<u64>()?)))
        .collect::<anyhow::Result<_>>()?;
    let get = |n: &str| ip.get(n).copied().with_context(|| format!("no Ip {n}"));
    Ok(Counters {
        rx_packets: f[1],
        rx_errors: f[2],
        rx_dropped: f[3],
        ip_in_hdr_errors: get("InHdrErrors")?,
        ip_in_addr_errors: get("InAddrErrors")?,
    })
}

/// Checks that the `pushed` frames since `before` all reached the tap and IPv4 intact.
fn check(side: &str, row: &str, before: Counters, pushed: u64) -> anyhow::Result<()> {
    let after = counters()?;
    let d = |a: u64, b: u64| a - b;
    let (rx, err, drop, hdr, addr) = (
        d(after.rx_packets, before.rx_packets),
        d(after.rx_errors, before.rx_errors),
        d(after.rx_dropped, before.rx_dropped),
        d(after.ip_in_hdr_errors, before.ip_in_hdr_errors),
        d(after.ip_in_addr_errors, before.ip_in_addr_errors),
    );
    ensure!(
        rx == pushed && err == 0 && drop == 0 && hdr == 0 && addr == pushed,
        "{side}, {row}: {pushed} frames pushed, but the tap received {rx} ({err} errors, \
         {drop} dropped) and IPv4 saw {hdr} bad headers and {addr} frames to drop at routing"
    );
    Ok(())
}

/// Frames (their Ethernet bytes) pushed in a measured interval.
struct Rate {
    frames: u64,
    bytes: u64,
    secs: f64,
}

impl Rate {
    fn pps(&self) -> f64 {
        f64_of(self.frames) / self.secs
    }

    fn gbps(&self) -> f64 {
        f64_of(self.bytes) * 8.0 / self.secs / 1e9
    }
}

#[allow(clippy::cast_precision_loss, reason = "counters far below 2^52")]
fn f64_of(v: u64) -> f64 {
    v as f64
}

/// Keeps dev-net's transmit ring full of `bufs` (in turn) for `dur`: the frames completed in
/// that time, and all frames pushed (the ring is drained at the end).
fn run_dev_net(
    net: &mut Net,
    bufs: &[Buf],
    frame_len: usize,
    dur: Duration,
) -> anyhow::Result<(Rate, u64)> {
    let mem = net.mem.clone();
    let ring = &mut net.rings[1];
    let size = usize::from(ring.size);
    let (mut next, mut pushed, mut done) = (0usize, 0u64, 0u64);
    let start = Instant::now();
    loop {
        while ring.outstanding() < size {
            ring.post(&mem, &bufs[next..=next]);
            next = (next + 1) % bufs.len();
            pushed += 1;
        }
        ring.publish(&mem);
        ensure!(
            ring.wait(&mem, Duration::from_secs(5)),
            "dev-net completed no transmit chain within 5 s"
        );
        done += u64::try_from(ring.take_used(&mem).len())?;
        if start.elapsed() >= dur {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let left = ring.outstanding();
    let drained = ring.collect(&mem, left, Duration::from_secs(5)).len();
    ensure!(
        drained == left,
        "dev-net completed {drained} of the last {left} chains"
    );
    let rate = Rate {
        frames: done,
        bytes: done * u64::try_from(frame_len)?,
        secs,
    };
    Ok((rate, pushed))
}

/// Writes `frames` (in turn) to `tap` for `dur`.
fn run_plain(tap: &mut File, frames: &[Vec<u8>], dur: Duration) -> anyhow::Result<Rate> {
    let frame_len = u64::try_from(frames[0].len() - HDR_LEN)?;
    let mut next = 0usize;
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        for _ in 0..32 {
            let f = &frames[next];
            let w = tap
                .write(f)
                .with_context(|| format!("writing a {}-byte frame to {TAP}", f.len()))?;
            ensure!(w == f.len(), "the tap took {w} of {} bytes", f.len());
            next = (next + 1) % frames.len();
            n += 1;
        }
    }
    Ok(Rate {
        frames: n,
        bytes: n * frame_len,
        secs: start.elapsed().as_secs_f64(),
    })
}

fn row_frames(row: &Row) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..BUFFERS)
        .map(|i| frame(row.payload, row.tso, u32::try_from(i)?))
        .collect()
}

fn main() -> anyhow::Result<()> {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2u64);
    let dur = Duration::from_secs(secs);
    let warm = Duration::from_millis(200);

    // This thread (and dev-net, started from it) in a namespace of its own, gone when the
    // process ends. Forwarding off: frames to the blackholed sink are dropped at routing
    // and counted as InAddrErrors.
    enter_netns();
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").context("ip_forward")?;
    make_tap(TAP, false, 1500);
    ip(&["route", "add", "blackhole", "10.99.1.0/24"]);

    // dev-net side.
    let dir = TempDir::new("bench");
    let sock = dir.path("net.sock");
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket")
        .arg(&sock)
        .args(["--tap", TAP, "--mac", GUEST_MAC_STR]);
    let mut be = Backend::spawn(&mut cmd, &dir.path("dev-net.log"))?;
    let want = F_VERSION_1 | F_EVENT_IDX | F_MAC | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4;
    let mut net = Net::connect(
        &sock,
        Options {
            queue_size: QUEUE_SIZE,
            features: want,
            mem_size: 64 << 20,
            ..Options::default()
        },
    )?;
    ensure!(
        net.features & want == want,
        "dev-net did not offer CSUM and HOST_TSO4 (offered {:#x})",
        net.offered
    );
    wait_link_up(TAP);
    let mut dev_rates = Vec::new();
    for row in &ROWS {
        let frames = row_frames(row)?;
        let bufs: Vec<Buf> = frames
            .iter()
            .map(|f| {
                let addr = net.alloc(u64::try_from(f.len())?, 0);
                net.write(addr, f);
                Ok(Buf {
                    addr,
                    len: u32::try_from(f.len())?,
                    write: false,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let frame_len = frames[0].len() - HDR_LEN;
        let before = counters()?;
        let (_, warm_pushed) = run_dev_net(&mut net, &bufs, frame_len, warm)?;
        let (rate, pushed) = run_dev_net(&mut net, &bufs, frame_len, dur)?;
        check("dev-net", row.name, before, warm_pushed + pushed)?;
        dev_rates.push(rate);
    }
    drop(net);
    let log = be.stop()?;
    let tx = common::counters(&log, 0, "tx");
    ensure!(
        tx.contains(" 0 malformed chain, 0 short, 0 oversized, 0 bad header, 0 tap error"),
        "dev-net dropped frames: {tx}"
    );
    drop(be);

    // Plain side: the same tap, now free, written by this process.
    let taps = ipc::tap::open_tap(TAP, 1)?;
    let Some(fd) = taps.fds.into_iter().next() else {
        bail!("open_tap returned no queue");
    };
    ipc::tap::set_vnet_hdr_size(fd.as_fd(), i32::try_from(HDR_LEN)?)?;
    let mut tap = File::from(fd);
    wait_link_up(TAP);

    println!(
        "transmit to a tap: a 12-byte vnet header with NEEDS_CSUM, one queue pair, {QUEUE_SIZE}-entry \
         ring with EVENT_IDX (dev-net) vs one write(2) per frame (plain), {secs} s per row and side"
    );
    println!(
        "{:<11} {:>12} {:>8} | {:>12} {:>8} | {:>7}",
        "row", "dev-net pps", "Gbit/s", "plain pps", "Gbit/s", "ratio"
    );
    for (row, dev) in ROWS.iter().zip(&dev_rates) {
        let frames = row_frames(row)?;
        let before = counters()?;
        let warm_rate = run_plain(&mut tap, &frames, warm)?;
        let rate = run_plain(&mut tap, &frames, dur)?;
        check("plain", row.name, before, warm_rate.frames + rate.frames)?;
        println!(
            "{:<11} {:>12.0} {:>8.2} | {:>12.0} {:>8.2} | {:>7.2}",
            row.name,
            dev.pps(),
            dev.gbps(),
            rate.pps(),
            rate.gbps(),
            dev.pps() / rate.pps()
        );
    }
    println!(
        "ratio: dev-net / plain frames per second; Gbit/s counts Ethernet frame bytes (1514 B \
         for 1500 B, 65214 B for 64 KiB TSO = 45 x {MSS}-byte segments)"
    );
    Ok(())
}
