//! The ways a guest ends or resets the machine, each recorded on the VM's [`ExitSignal`]:
//!
//! - [`AcpiSleep`]: the ACPI hardware-reduced sleep control (port 0x600) and status (0x601)
//!   registers. Writing SLP_EN with SLP_TYP 5 (the DSDT's `_S5` value) powers off.
//! - [`ResetControl`]: the reset control register at port 0xcf9 (also the FADT reset register).
//!   It lives inside the PCI config-address dword, so [`super::pci::PciConfigIo`] owns it.
//! - [`I8042`]: the keyboard controller's CPU-reset command (0xfe on port 0x64), through
//!   vm-superio's `I8042Device`.
//! - [`PvPanic`]: QEMU's ISA pvpanic port (ACPI id `QEMU0001`) at [`PVPANIC`].

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::sync::Arc;

use ipc::control::ExitReason;
use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::ExitSignal;
use crate::layout::ports;

/// Port of the pvpanic device (QEMU's default `iobase`).
pub const PVPANIC: u16 = 0x505;
pub const PVPANIC_LEN: u16 = 1;
/// i8042 range: data port 0x60 up to and including the command/status port 0x64.
pub const I8042_LEN: u16 = ports::I8042_COMMAND - ports::I8042_DATA + 1;

/// Sleep control register: SLP_EN.
pub const SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYPx field (bits 2..=4).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The SLP_TYP value of S5 (soft off) this platform's DSDT `_S5` object must carry.
pub const S5_SLP_TYP: u8 = 5;

/// ACPI hardware-reduced sleep registers; insert at `ports::ACPI_SLEEP_CONTROL` with length
/// `ports::ACPI_SLEEP_LEN` (offset 0 = control, offset 1 = status).
pub struct AcpiSleep {
    exit: Arc<ExitSignal>,
}

impl AcpiSleep {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }

    fn control_write(&self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if slp_typ == S5_SLP_TYP {
            self.exit.request(ExitReason::PowerOff);
        } else {
            tracing::warn!(
                slp_typ,
                "guest asked for an unsupported sleep state; ignored"
            );
        }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Control reads as 0; status has no WAK_STS since the guest never sleeps and wakes.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, Some(&v)) = (offset, data.first()) {
            self.control_write(v);
        }
        // Status (offset 1) is write-1-to-clear and nothing is ever set.
    }
}

/// Reset control register: SYS_RST (bit 1) selects a hard reset, RST_CPU (bit 2) performs it,
/// FULL_RST (bit 3) asks for a full power cycle. Any write with RST_CPU set reboots, which
/// covers the ACPI reset value 0x06 and Linux's `reboot=pci` sequence (0x02 then 0x06/0x0e).
pub const RESET_CPU: u8 = 0x04;
const RESET_KEEP: u8 = 0x0a;

/// The reset control register's state and action (see [`RESET_CPU`]).
pub struct ResetControl {
    value: u8,
    exit: Arc<ExitSignal>,
}

impl ResetControl {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { value: 0, exit }
    }

    pub fn read(&self) -> u8 {
        self.value
    }

    pub fn write(&mut self, value: u8) {
        self.value = value & RESET_KEEP;
        if value & RESET_CPU != 0 {
            self.exit.request(ExitReason::Reboot);
        }
    }
}

/// A vm-superio trigger that requests a reboot.
pub struct RebootTrigger(Arc<ExitSignal>);

impl Trigger for RebootTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.request(ExitReason::Reboot);
        Ok(())
    }
}

/// The i8042 keyboard controller, reduced to its CPU-reset command. Insert it at
/// `ports::I8042_DATA` with length [`I8042_LEN`] so that offset 4 is the command port. Every
/// read returns 0: the status register says "output buffer empty, input buffer empty", which
/// lets Linux's reboot path (`kb_wait`) proceed. Keep the FADT's `IAPC_BOOT_ARCH` 8042 flag
/// clear so Linux does not probe for a keyboard here.
pub struct I8042 {
    dev: I8042Device<RebootTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            dev: I8042Device::new(RebootTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map_or(0, |o| self.dev.read(o));
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(&v)) = (u8::try_from(offset), data.first()) {
            // The trigger is infallible.
            let _ = self.dev.write(offset, v);
        }
    }
}

/// pvpanic event: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// pvpanic event: the guest panicked and a crash kernel (kdump) takes over.
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// QEMU's ISA pvpanic device. Reads return the events it supports; a write with
/// [`PVPANIC_PANICKED`] ends the VM as a guest crash. [`PVPANIC_CRASH_LOADED`] is only logged:
/// the guest's crash kernel is running and the VM must go on.
pub struct PvPanic {
    exit: Arc<ExitSignal>,
}

impl PvPanic {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if v & PVPANIC_PANICKED != 0 {
            self.exit.request(ExitReason::GuestCrash(
                "guest kernel panicked (pvpanic)".into(),
            ));
        } else if v & PVPANIC_CRASH_LOADED != 0 {
            tracing::warn!("guest kernel panicked; its crash kernel takes over (pvpanic)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit() -> Arc<ExitSignal> {
        Arc::new(ExitSignal::new().unwrap())
    }

    #[test]
    fn sleep_register_powers_off_only_on_s5_with_slp_en() {
        let e = exit();
        let mut s = AcpiSleep::new(Arc::clone(&e));
        // SLP_TYP 5 without SLP_EN, SLP_EN with S3 (typ 3), a write to the status register.
        s.write(0, &[S5_SLP_TYP << 2]);
        s.write(0, &[SLP_EN | (3 << 2)]);
        s.write(1, &[0xff]);
        assert!(!e.is_set());
        let mut b = [0xffu8];
        s.read(1, &mut b);
        assert_eq!(b, [0]);
        s.write(0, &[SLP_EN | (S5_SLP_TYP << 2)]);
        assert_eq!(e.reason(), Some(ExitReason::PowerOff));
        assert_eq!(
            0x34,
            SLP_EN | (S5_SLP_TYP << 2),
            "the byte the DSDT's _S5 produces"
        );
    }

    #[test]
    fn reset_control_reboots_on_rst_cpu() {
        let e = exit();
        let mut r = ResetControl::new(Arc::clone(&e));
        r.write(0x02); // first half of Linux's reboot=pci
        assert!(!e.is_set());
        assert_eq!(r.read(), 0x02);
        r.write(crate::layout::ports::RESET_VALUE);
        assert_eq!(e.reason(), Some(ExitReason::Reboot));
        assert_eq!(r.read(), 0x02, "RST_CPU does not stick");

        let e = exit();
        let mut r = ResetControl::new(Arc::clone(&e));
        r.write(0x0e);
        assert_eq!(e.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn i8042_reset_command_reboots_and_status_is_empty() {
        let e = exit();
        let mut k = I8042::new(Arc::clone(&e));
        let mut b = [0xffu8];
        k.read(4, &mut b);
        assert_eq!(b, [0], "status: no data, input buffer empty");
        k.write(0, &[0xfe]); // data port: not a command
        k.write(4, &[0xd1]); // another command
        assert!(!e.is_set());
        k.write(4, &[0xfe]);
        assert_eq!(e.reason(), Some(ExitReason::Reboot));
    }

    #[test]
    fn pvpanic_reports_events_and_crashes_on_panic() {
        let e = exit();
        let mut p = PvPanic::new(Arc::clone(&e));
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b, [0x03]);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        p.write(0, &[0]);
        assert!(!e.is_set());
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(
            e.reason(),
            Some(ExitReason::GuestCrash(
                "guest kernel panicked (pvpanic)".into()
            ))
        );
    }
}
