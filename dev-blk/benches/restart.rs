//! Restart outage of dev-blk, the way atoll's supervisor and core handle a crash: a host-side
//! vhost-user-blk driver (the process tests' frontend) runs 4 KiB writes against a dev-blk that
//! inherits its listening socket and image; the bench SIGKILLs it, reaps it, waits the
//! supervisor's first backoff (5 ms), starts a new incarnation on the same listener, reconnects
//! and replays the rings from `used.idx` (the core's `reconnect`), and measures from the
//! SIGKILL to the completion of the request the driver posted while no backend existed.
//! Prints p50/p99/max over the kills.
//!
//! Run: `cargo bench -p dev-blk --bench restart` (env `BENCH_KILLS`, default 100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{Buf, Device, Options, S_OK, T_OUT, TempDir, make_image};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_dev-blk");
/// The supervisor's first backoff (launcher/src/restart.rs `FIRST_BACKOFF`).
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const IMAGE: usize = 16 << 20;

fn spawn(listener: &UnixListener, image: &File) -> anyhow::Result<Child> {
    let mut cmd = Command::new(BIN);
    cmd.args(["--socket-fd", "3", "--image-fd", "4"])
        .env("ATOLL_LOG", "error")
        .stdin(Stdio::null());
    ipc::spawn::spawn_with_fds(
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
    .context("spawning dev-blk")
}

/// The `p`th percentile (nearest rank) of `sorted`.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let n = sorted.len();
    let rank = (p * n).div_ceil(100);
    sorted[rank.clamp(1, n) - 1]
}

fn main() -> anyhow::Result<()> {
    let kills: usize = std::env::var("BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = TempDir::new("restart-bench");
    let image_path = dir.path("disk.img");
    make_image(&image_path, IMAGE);
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image_path)?;
    let sock = dir.path("blk.sock");
    let listener = UnixListener::bind(&sock)?;
    let mut child = spawn(&listener, &image)?;
    let mut dev = Device::connect(
        &sock,
        Options {
            event_idx: true,
            ..Options::default()
        },
    )?;
    let mem = dev.mem.clone();
    let data = vec![0x5au8; 4096];
    let mut outages = Vec::with_capacity(kills);
    let mut reconnects = Vec::with_capacity(kills);
    for k in 0..kills {
        // A few requests on the live backend first.
        for i in 0..4u64 {
            dev.reset_buffers();
            let (st, _, _) = dev.request(0, T_OUT, (i * 8) % 1024, Some(&data), 0)?;
            ensure!(st == S_OK, "request before kill {k} failed: status {st}");
        }
        dev.reset_buffers();
        let t0 = Instant::now();
        kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGKILL)?;
        child.wait()?;
        // The guest posts a write while no backend exists.
        let hdr = dev.header(T_OUT, 2048);
        let buf = dev.alloc(4096, 0);
        dev.write_bytes(buf, &data);
        let status = dev.alloc(1, 0xff);
        dev.queues[0]
            .push(
                &mem,
                &[Buf::r(hdr, 16), Buf::r(buf, 4096), Buf::w(status, 1)],
            )
            .context("ring full")?;
        dev.queues[0].notify_always(&mem);
        std::thread::sleep(FIRST_BACKOFF.saturating_sub(t0.elapsed()));
        let t_spawn = Instant::now();
        child = spawn(&listener, &image)?;
        dev.resume(&sock)?;
        reconnects.push(t_spawn.elapsed());
        let done = dev.queues[0].collect(&mem, Duration::from_secs(10));
        let outage = t0.elapsed();
        ensure!(
            done.len() == 1,
            "kill {k}: the posted request did not complete"
        );
        ensure!(
            dev.byte(status) == S_OK,
            "kill {k}: the posted request failed"
        );
        outages.push(outage);
    }
    let _ = kill(Pid::from_raw(i32::try_from(child.id())?), Signal::SIGKILL);
    let _ = child.wait();
    outages.sort();
    reconnects.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "dev-blk restart outage (SIGKILL -> next completed request, incl. {} ms backoff), {} kills: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        FIRST_BACKOFF.as_millis(),
        outages.len(),
        ms(percentile(&outages, 50)),
        ms(percentile(&outages, 99)),
        ms(*outages.last().context("no kills")?)
    );
    println!(
        "  of which spawn + vhost-user reconnect and replay: p50 {:.2} ms, p99 {:.2} ms",
        ms(percentile(&reconnects, 50)),
        ms(percentile(&reconnects, 99)),
    );
    Ok(())
}
