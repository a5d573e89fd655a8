//! vmm-core: atoll's core process. It owns KVM, the vCPUs and the guest-RAM mapping, and
//! emulates the platform (serial, RTC, ACPI power management, PCI host bridge).
//!
//! It opens no paths: the launcher starts it with one inherited descriptor, the control socket
//! at `ipc::control::CORE_CONTROL_FD`, and sends everything else attached to `Start`.

mod acpi;
mod boot;
mod bus;
mod cpu;
mod devices;
mod exit;
mod irq_routing;
mod layout;
mod memory;
mod platform;
mod seccomp;
mod vcpu;
mod virtio;
mod vm;

use ipc::control::{CORE_CONTROL_FD, CoreChannel, CoreToLauncher, ExitReason, LauncherToCore};
use ipc::inherit::{InheritError, take_inherited_fd};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

fn main() -> ExitCode {
    ipc::logging::init("vmm-core", "warn");

    if std::env::args().len() > 1 {
        eprintln!(
            "vmm-core is started by `atoll run`; it takes no arguments and reads its \
             configuration from the control socket on fd {CORE_CONTROL_FD}"
        );
        return ExitCode::from(2);
    }
    // The launcher must have placed the control socket at CORE_CONTROL_FD (ipc::spawn).
    let control = match take_inherited_fd(CORE_CONTROL_FD) {
        Ok(fd) => fd,
        Err(InheritError::NotOpen(_)) => {
            eprintln!(
                "vmm-core: no control socket on fd {CORE_CONTROL_FD}; start it with `atoll run`"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("vmm-core: cannot take the control socket: {e}");
            return ExitCode::from(2);
        }
    };
    // Confinement (ipc::sandbox): before the core reads Start, maps guest RAM or starts a
    // thread, so everything that touches guest data runs under its seccomp allow-list.
    let policy = seccomp::policy().expect_fds([control.as_raw_fd()]);
    let confined = ipc::sandbox::lockdown(&policy);
    let chan = CoreChannel::from_fd(control);

    let reason = match confined {
        Err(e) => ExitReason::Internal(format!("cannot confine vmm-core: {}", error_chain(&e))),
        Ok(report) => {
            tracing::info!("{report}");
            run(&chan)
        }
    };
    if let ExitReason::Internal(msg) = &reason {
        tracing::error!("{msg}");
    }
    if let Err(e) = chan.send(&CoreToLauncher::Exited(reason.clone()), &[]) {
        tracing::error!("cannot report the VM's end to the launcher: {e}");
    }
    match reason {
        ExitReason::Internal(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// Reads `Start`, runs the VM, and returns why it ended.
fn run(chan: &CoreChannel) -> ExitReason {
    match chan.recv() {
        Ok((LauncherToCore::Start(cfg), fds)) => {
            match vm::StartFds::parse(&cfg, fds).and_then(|fds| vm::run(&cfg, fds, chan)) {
                Ok(reason) => reason,
                Err(e) => ExitReason::Internal(error_chain(&e)),
            }
        }
        Ok((other, _)) => ExitReason::Internal(format!("expected Start, got {other:?}")),
        Err(e) => ExitReason::Internal(format!(
            "cannot read the Start message: {}",
            error_chain(&e)
        )),
    }
}

/// "outer: inner: innermost" for an error and its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
