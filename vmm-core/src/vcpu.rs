//! vCPU threads: run KVM_RUN, dispatch port and MMIO exits to the buses, turn fatal exits into
//! a VM exit reason, and stop when the VM ends.

use crate::bus::Bus;
use crate::exit::ExitSignal;
use ipc::control::ExitReason;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// Addresses logged as unhandled at most this many times in total (a guest scanning its
/// address space must not make the log, or this set, grow without bound).
const MAX_LOGGED_UNHANDLED: usize = 4096;

/// Remembers which unhandled addresses were logged, so each is logged once for reads and
/// once for writes.
#[derive(Default)]
pub struct UnhandledLog {
    seen: Mutex<HashSet<(bool, bool, u64)>>,
}

impl UnhandledLog {
    fn note(&self, pio: bool, addr: u64, write: Option<&[u8]>, len: usize) {
        let mut seen = self.seen.lock().expect("unhandled log lock poisoned");
        if seen.len() > MAX_LOGGED_UNHANDLED || !seen.insert((pio, write.is_some(), addr)) {
            return;
        }
        let space = if pio { "port" } else { "MMIO" };
        match write {
            Some(data) => {
                tracing::warn!("unhandled {space} write at {addr:#x} ({len} bytes: {data:02x?})")
            }
            None => tracing::warn!(
                "unhandled {space} read at {addr:#x} ({len} bytes); returning all-ones"
            ),
        }
        if seen.len() > MAX_LOGGED_UNHANDLED {
            tracing::warn!(
                "more than {MAX_LOGGED_UNHANDLED} unhandled addresses; no longer logging them"
            );
        }
    }
}

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub unhandled: UnhandledLog,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the signal that knocks a vCPU thread out of KVM_RUN.
pub fn install_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(SIGRTMIN(), kick_handler)
}

/// Starts vCPU `id` on its own thread.
pub fn spawn(id: u32, vcpu: VcpuFd, ctx: Arc<VcpuContext>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || run(id, vcpu, &ctx))
}

fn run(id: u32, mut vcpu: VcpuFd, ctx: &VcpuContext) {
    while !ctx.exit.is_set() {
        let fatal = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    ctx.unhandled.note(true, u64::from(port), None, data.len());
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !ctx.pio.write(u64::from(port), data) {
                    ctx.unhandled
                        .note(true, u64::from(port), Some(data), data.len());
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                    ctx.unhandled.note(false, addr, None, data.len());
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    ctx.unhandled.note(false, addr, Some(data), data.len());
                }
                None
            }
            Ok(VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN)"
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on host CPU {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: KVM internal error (emulation failure)"
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                other => ExitReason::GuestCrash(format!("vCPU {id}: system event {other}")),
            }),
            Ok(other) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(ExitReason::Internal(format!(
                "vCPU {id}: KVM_RUN failed: {e}"
            ))),
        };
        if let Some(reason) = fatal {
            ctx.exit.request(reason);
        }
    }
}

/// Knocks every vCPU out of KVM_RUN until all threads have returned, then joins them.
pub fn stop_all(handles: Vec<JoinHandle<()>>) {
    while handles.iter().any(|h| !h.is_finished()) {
        for h in handles.iter().filter(|h| !h.is_finished()) {
            // A thread that exits between the check and the kill makes this fail: harmless.
            let _ = h.kill(SIGRTMIN());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        if h.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}
