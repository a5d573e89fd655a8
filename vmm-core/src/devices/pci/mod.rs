//! The PCI host side: bus 0 with a host bridge ([`PciRoot`]), type-0 configuration spaces
//! ([`PciConfiguration`]), the device interface ([`PciDevice`]) and configuration mechanism #1
//! on ports 0xcf8..0xcff ([`PciConfigIo`]).
//!
//! Wiring (done by the core):
//! ```text
//! let root = Arc::new(Mutex::new(PciRoot::new(mmio_bus.clone(), pio_bus.clone())));
//! let slot = root.lock().unwrap().add_device(virtio_dev)?;   // BARs placed and mapped
//! pio_bus.insert(Arc::new(Mutex::new(PciConfigIo::new(root, exit))), 0xcf8, 8)?;
//! ```

#![forbid(unsafe_code)]

mod config_io;
mod configuration;
mod device;
mod root;

pub use config_io::PciConfigIo;
pub use configuration::{BarKind, PciConfiguration, PciHeader};
pub use device::PciDevice;
pub use root::PciRoot;

use crate::bus::BusError;

/// Errors of PCI device setup.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("BAR index {0} does not exist in a type-0 header (BARs 0..=5, a 64-bit BAR takes two)")]
    BadBarIndex(usize),
    #[error("BAR {0} is already registered")]
    BarInUse(usize),
    #[error("BAR {index} size {size:#x} is not a power of two in {min:#x}..={max:#x}")]
    BadBarSize {
        index: usize,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error("BAR {index} address {addr:#x} is not aligned to its size {size:#x} or out of range")]
    BadBarAddress { index: usize, addr: u64, size: u64 },
    #[error("capability of {0} bytes is too short (id and next pointer are required)")]
    CapabilityTooShort(usize),
    #[error("writable mask of {mask} bytes does not match the capability's {cap} bytes")]
    MaskLength { cap: usize, mask: usize },
    #[error("capability of {len} bytes at {offset:#x} does not fit in config space")]
    CapabilityTooLarge { offset: usize, len: usize },
    #[error("all PCI slots on bus 0 are in use")]
    NoFreeSlot,
    #[error("no room for BAR {index} ({size:#x} bytes) in the {window} window")]
    OutOfSpace {
        index: usize,
        size: u64,
        window: &'static str,
    },
    #[error("cannot map BAR {index} at {addr:#x}")]
    Map {
        index: usize,
        addr: u64,
        source: BusError,
    },
}
