//! dev-blk vs qemu-storage-daemon: the same host-side vhost-user-blk driver (the process
//! tests' frontend) posts 4 KiB random reads and writes at queue depth 1 and 32 against both
//! backends serving the same raw file, and prints IOPS, p50 and p99 latency per side and the
//! ratio dev-blk / qsd.
//!
//! Run: `cargo bench -p dev-blk --bench vhost_blk` (env: `BENCH_SECS` per measurement round,
//! default 1; `BENCH_ROUNDS`, default 3; `BENCH_IMAGE_MB`, default 256; `BENCH_ROW`, e.g.
//! `write QD32`, to run one row only).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Backend, Device, GuestRam, Options, S_OK, T_IN, T_OUT, TempDir, VirtQueue};
use vm_memory::{Address, Bytes, GuestAddress};

const BLOCK: u32 = 4096;
const DEPTHS: [usize; 2] = [1, 32];

/// One in-flight request's fixed resources: three descriptors (header, data, status).
struct Slot {
    head: u16,
    data_desc: u16,
    hdr: GuestAddress,
    status: GuestAddress,
    started: Instant,
}

struct Side {
    name: &'static str,
    _backend: Backend,
    dev: Device,
    slots: Vec<Slot>,
    /// Slot index by head descriptor.
    by_head: Vec<usize>,
}

#[derive(Default)]
struct Samples {
    lat_ns: Vec<u64>,
    ops: u64,
    busy: Duration,
    errors: u64,
}

impl Samples {
    fn iops(&self) -> f64 {
        let secs = self.busy.as_secs_f64();
        if secs > 0.0 {
            ops_f64(self.ops) / secs
        } else {
            0.0
        }
    }

    fn percentile_us(&mut self, p: f64) -> f64 {
        if self.lat_ns.is_empty() {
            return 0.0;
        }
        self.lat_ns.sort_unstable();
        let n = self.lat_ns.len();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "rank of a percentile in a sample count far below 2^52"
        )]
        let rank = ((p / 100.0) * (n as f64 - 1.0)).round() as usize;
        ops_f64(self.lat_ns[rank.min(n - 1)]) / 1000.0
    }
}

#[allow(clippy::cast_precision_loss, reason = "counters far below 2^52")]
fn ops_f64(v: u64) -> f64 {
    v as f64
}

/// xorshift64*: a fast, deterministic random sector source shared by both sides.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl Side {
    fn new(name: &'static str, backend: Backend) -> anyhow::Result<Self> {
        let mut dev = Device::connect(
            &backend.socket,
            Options {
                queues: 1,
                queue_size: 256,
                event_idx: true,
                mem_size: 64 << 20,
            },
        )
        .with_context(|| format!("{name}: bring-up"))?;
        let max_depth = DEPTHS.iter().copied().max().unwrap_or(1);
        let mut slots = Vec::new();
        let mut by_head = vec![usize::MAX; 256];
        for i in 0..max_depth {
            let hdr = dev.alloc(16, 0);
            let data = dev.alloc(u64::from(BLOCK), 0x5a);
            let status = dev.alloc(1, 0xff);
            let idx = dev.queues[0].reserve(3).context("descriptors")?;
            slots.push(Slot {
                head: idx[0],
                data_desc: idx[1],
                hdr,
                status,
                started: Instant::now(),
            });
            by_head[usize::from(idx[0])] = i;
            // Fixed chain; the data descriptor's direction is set per run.
            let q = &dev.queues[0];
            q.write_desc(&dev.mem, idx[0], hdr.raw_value(), 16, 1, idx[1]);
            q.write_desc(&dev.mem, idx[1], data.raw_value(), BLOCK, 1, idx[2]);
            q.write_desc(&dev.mem, idx[2], status.raw_value(), 1, 2, 0);
        }
        Ok(Self {
            name,
            _backend: backend,
            dev,
            slots,
            by_head,
        })
    }

    /// Points every slot's data descriptor at device-writable (read) or -readable (write).
    fn set_direction(&mut self, write: bool) {
        let q = &self.dev.queues[0];
        for slot in &self.slots {
            let at = q.desc.unchecked_add(16 * u64::from(slot.data_desc) + 12);
            let flags: u16 = if write { 1 } else { 1 | 2 };
            self.dev.mem.write_obj(flags.to_le(), at).expect("flags");
        }
    }

    fn start(q: &mut VirtQueue, mem: &GuestRam, slot: &mut Slot, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, slot.hdr).expect("header");
        mem.write_obj(0xffu8, slot.status).expect("status");
        slot.started = Instant::now();
        q.push_head(mem, slot.head);
    }

    /// Runs `depth` requests in flight for `duration`; returns the samples.
    fn run(
        &mut self,
        write: bool,
        depth: usize,
        duration: Duration,
        rng: &mut Rng,
        sectors: u64,
    ) -> anyhow::Result<Samples> {
        self.set_direction(write);
        let kind = if write { T_OUT } else { T_IN };
        let blocks = sectors / u64::from(BLOCK / 512);
        let mem = self.dev.mem.clone();
        let q = &mut self.dev.queues[0];
        let mut samples = Samples {
            lat_ns: Vec::with_capacity(1 << 20),
            ..Samples::default()
        };
        let mut done_heads: Vec<u16> = Vec::with_capacity(depth);
        let start = Instant::now();
        for slot in self.slots.iter_mut().take(depth) {
            Self::start(q, &mem, slot, kind, (rng.next() % blocks) * 8);
        }
        q.notify(&mem);
        let mut in_flight = depth;
        let deadline = start + duration;
        while in_flight > 0 {
            ensure!(
                q.wait(&mem, Duration::from_secs(5)),
                "{}: no completion within 5 s",
                self.name
            );
            done_heads.clear();
            q.for_each_used(&mem, |id, _| done_heads.push(id));
            let now = Instant::now();
            let more = now < deadline;
            for &head in &done_heads {
                let i = self.by_head[usize::from(head)];
                let slot = &mut self.slots[i];
                let ns =
                    u64::try_from(now.duration_since(slot.started).as_nanos()).unwrap_or(u64::MAX);
                samples.lat_ns.push(ns);
                samples.ops += 1;
                if mem.read_obj::<u8>(slot.status).expect("status") != S_OK {
                    samples.errors += 1;
                }
                if more {
                    Self::start(q, &mem, slot, kind, (rng.next() % blocks) * 8);
                } else {
                    in_flight -= 1;
                }
            }
            if more {
                q.notify(&mem);
            }
        }
        samples.busy = start.elapsed();
        Ok(samples)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing useful either way.
    let secs = env_u64("BENCH_SECS", 1);
    let rounds = env_u64("BENCH_ROUNDS", 3);
    let image_mb = env_u64("BENCH_IMAGE_MB", 256);
    if std::process::Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("qemu-storage-daemon not found; skipping the comparison");
        return Ok(());
    }

    let dir = TempDir::new("bench");
    let image = dir.path("bench.img");
    {
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| u8::try_from(i % 253).unwrap_or(0))
            .collect();
        let mut f = std::fs::File::create(&image)?;
        for _ in 0..image_mb {
            std::io::Write::write_all(&mut f, &chunk)?;
        }
        f.sync_all()?;
    }
    let sectors = image_mb * 2048;

    let bin = Path::new(env!("CARGO_BIN_EXE_dev-blk"));
    let mut sides = [
        Side::new("dev-blk", Backend::dev_blk(bin, &dir, &image, &[])?)?,
        Side::new("qsd", Backend::qsd(&dir, &image, 1)?)?,
    ];

    println!(
        "4 KiB random I/O over vhost-user, {image_mb} MiB image, {rounds} x {secs} s per row and side, \
         EVENT_IDX on, one queue"
    );
    println!(
        "{:<10} {:>10} {:>9} {:>9} | {:>10} {:>9} {:>9} | {:>7} {:>7} {:>7}",
        "row",
        "dev IOPS",
        "p50 us",
        "p99 us",
        "qsd IOPS",
        "p50 us",
        "p99 us",
        "IOPS x",
        "p50 x",
        "p99 x"
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for depth in DEPTHS {
        for write in [false, true] {
            let row = format!("{} QD{depth}", if write { "write" } else { "read" });
            if let Ok(only) = std::env::var("BENCH_ROW")
                && only != row
            {
                continue;
            }
            let mut total = [Samples::default(), Samples::default()];
            // Warm-up, then alternate the sides round by round so that background noise
            // falls on both.
            for side in sides.iter_mut() {
                side.run(write, depth, Duration::from_millis(200), &mut rng, sectors)?;
            }
            for _ in 0..rounds {
                for (k, side) in sides.iter_mut().enumerate() {
                    let s = side.run(write, depth, Duration::from_secs(secs), &mut rng, sectors)?;
                    total[k].lat_ns.extend_from_slice(&s.lat_ns);
                    total[k].ops += s.ops;
                    total[k].busy += s.busy;
                    total[k].errors += s.errors;
                }
            }
            for (k, t) in total.iter().enumerate() {
                ensure!(
                    t.errors == 0,
                    "{}: {} requests failed",
                    sides[k].name,
                    t.errors
                );
            }
            let [d, q] = &mut total;
            let (d_iops, q_iops) = (d.iops(), q.iops());
            let (d50, d99) = (d.percentile_us(50.0), d.percentile_us(99.0));
            let (q50, q99) = (q.percentile_us(50.0), q.percentile_us(99.0));
            println!(
                "{row:<10} {d_iops:>10.0} {d50:>9.1} {d99:>9.1} | {q_iops:>10.0} {q50:>9.1} {q99:>9.1} | {:>7.2} {:>7.2} {:>7.2}",
                d_iops / q_iops,
                d50 / q50,
                d99 / q99
            );
        }
    }
    println!("IOPS x > 1 and latency x < 1 mean dev-blk is faster.");
    Ok(())
}
