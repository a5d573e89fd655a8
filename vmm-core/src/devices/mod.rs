//! Platform devices the core emulates.
//!
//! - [`serial`]: the COM1 16550 console (vm-superio) with its input thread.
//! - [`rtc`]: the CMOS real-time clock.
//! - [`power`]: ACPI sleep control, reset control, i8042 reset and pvpanic.
//! - [`pci`]: the PCI host bridge, config spaces, BAR mapping and config mechanism #1.

pub mod pci;
pub mod power;
pub mod rtc;
pub mod serial;

pub use pci::{PciConfigIo, PciDevice, PciRoot};
pub use power::{AcpiSleep, I8042, PVPANIC, PvPanic};
pub use rtc::Rtc;
