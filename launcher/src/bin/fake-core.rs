//! `atoll-fake-core`: a stand-in for `vmm-core` for the launcher's process tests (built with the
//! `fake-core` feature). It speaks the real control protocol on the inherited control socket,
//! describes what it received in a report file, talks on the console, and ends the way the
//! test asks.
//!
//! Environment (inherited through `atoll`):
//! - `FAKE_CORE_REPORT`: file to write `key=value` lines to (written before the exit message).
//! - `FAKE_CORE_ECHO=1`: read one line from the console and write back `echo: <line>`.
//! - `FAKE_CORE_EXIT`: `poweroff`, `reboot`, `crash`, `internal`, `die` (exit 3 without a
//!   message), `stop` (default: wait for `Shutdown`, answer `Stopped`) or `ignore` (ignore
//!   `Shutdown` and wait to be killed).

#![forbid(unsafe_code)]

use ipc::control::{
    CORE_CONTROL_FD, CoreChannel, CoreToLauncher, ExitReason, LauncherToCore, VmConfig,
};
use nix::sys::socket::{UnixAddr, getpeername};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

fn main() {
    // The launcher's confinement report descriptor is not part of what the test checks.
    let report_fd = std::env::var(ipc::sandbox::REPORT_FD_ENV).ok();
    let startup_fds = open_fds(report_fd.as_deref());
    // Like the real core, lock down first: run unconfined (`--debug-device
    // vmm-core=unconfined`) this only sends the launcher its report.
    ipc::sandbox::lockdown(&ipc::sandbox::Policy::new("fake-core")).expect("lockdown");
    // The launcher places the control socket at CORE_CONTROL_FD.
    let chan = CoreChannel::from_fd(
        ipc::inherit::take_inherited_fd(CORE_CONTROL_FD).expect("take the control socket"),
    );
    let mut report = format!("startup_fds={startup_fds}\n");
    let (msg, fds) = chan.recv().expect("receive Start");
    let LauncherToCore::Start(cfg) = msg else {
        panic!("expected Start, got {msg:?}");
    };
    describe(&cfg, &fds, &mut report);

    let console_index = 3 + usize::from(cfg.has_initramfs);
    let console = fds
        .into_iter()
        .nth(console_index)
        .map(UnixStream::from)
        .expect("console fd");
    (&console)
        .write_all(b"fake-core: console ok\n")
        .expect("console write");
    if std::env::var_os("FAKE_CORE_ECHO").is_some() {
        let mut line = String::new();
        BufReader::new(&console)
            .read_line(&mut line)
            .expect("console read");
        writeln!(report, "console_input={}", line.trim_end()).unwrap();
        (&console)
            .write_all(format!("echo: {line}").as_bytes())
            .expect("console echo");
    }
    chan.send(&CoreToLauncher::Running, &[]).expect("Running");

    let action = std::env::var("FAKE_CORE_EXIT").unwrap_or_else(|_| "stop".into());
    let reason = match action.as_str() {
        "poweroff" => ExitReason::PowerOff,
        "reboot" => ExitReason::Reboot,
        "crash" => ExitReason::GuestCrash("triple fault".into()),
        "internal" => ExitReason::Internal("fake failure".into()),
        "die" => {
            write_report(&report);
            std::process::exit(3);
        }
        "stop" | "ignore" => {
            write_report(&report);
            loop {
                match chan.recv() {
                    Ok((LauncherToCore::Shutdown, _)) if action == "stop" => {
                        report.push_str("got=Shutdown\n");
                        break ExitReason::Stopped;
                    }
                    Ok((LauncherToCore::Shutdown, _)) => {}
                    Ok((other, _)) => panic!("unexpected {other:?}"),
                    Err(e) => panic!("control channel: {e}"),
                }
            }
        }
        other => panic!("unknown FAKE_CORE_EXIT={other}"),
    };
    write_report(&report);
    drop(console);
    chan.send(&CoreToLauncher::Exited(reason), &[])
        .expect("Exited");
}

/// The descriptors open in this process, except the one listing them.
fn open_fds(except: Option<&str>) -> String {
    let own = format!("/proc/{}/fd", std::process::id());
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("list fds")
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let skip = target.to_str() == Some(own.as_str())
                || except.is_some_and(|x| x == fd.to_string());
            (!skip).then_some(fd)
        })
        .collect();
    fds.sort_unstable();
    fds.iter().map(i32::to_string).collect::<Vec<_>>().join(",")
}

fn link(fd: &OwnedFd) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("<{e}>"))
}

fn describe(cfg: &VmConfig, fds: &[OwnedFd], out: &mut String) {
    writeln!(out, "cpus={}", cfg.cpus).unwrap();
    writeln!(out, "memory={}", cfg.memory_bytes).unwrap();
    writeln!(out, "cmdline={}", cfg.cmdline).unwrap();
    writeln!(out, "has_initramfs={}", cfg.has_initramfs).unwrap();
    writeln!(out, "nfds={}", fds.len()).unwrap();
    let mut fds = fds.iter();
    let kvm = fds.next().expect("kvm fd");
    writeln!(out, "kvm={}", link(kvm)).unwrap();
    let ram = fds.next().expect("memfd");
    let ram_file = std::fs::File::from(ram.try_clone().unwrap());
    writeln!(out, "ram={}", link(ram)).unwrap();
    writeln!(out, "ram_size={}", ram_file.metadata().unwrap().len()).unwrap();
    let seals = nix::fcntl::fcntl(&ram_file, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
    writeln!(out, "ram_seals={seals:#x}").unwrap();
    let kernel = fds.next().expect("kernel fd");
    writeln!(out, "kernel={}", link(kernel)).unwrap();
    let mut head = [0u8; 4];
    std::fs::File::from(kernel.try_clone().unwrap())
        .read_exact(&mut head)
        .unwrap();
    writeln!(out, "kernel_head={head:02x?}").unwrap();
    if cfg.has_initramfs {
        writeln!(out, "initramfs={}", link(fds.next().expect("initramfs fd"))).unwrap();
    }
    let console = fds.next().expect("console fd");
    writeln!(out, "console={}", link(console)).unwrap();
    for disk in &cfg.disks {
        let sock = fds.next().expect("disk fd");
        let peer = getpeername::<UnixAddr>(sock.as_raw_fd())
            .ok()
            .and_then(|a| a.path().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "<not connected>".into());
        writeln!(out, "disk {} queues={} peer={peer}", disk.id, disk.queues).unwrap();
    }
    assert!(fds.next().is_none(), "more fds than the config implies");
}

fn write_report(report: &str) {
    if let Some(path) = std::env::var_os("FAKE_CORE_REPORT") {
        std::fs::write(path, report).expect("write report");
    }
}
