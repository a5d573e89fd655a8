//! Wires the platform devices (serial console, RTC, ACPI power and reset, PCI host bridge) onto
//! the buses and their interrupts onto KVM.

use crate::bus::{Bus, BusDevice, BusError};
use crate::devices::serial::{self, SerialConsole};
use crate::exit::ExitSignal;
use crate::layout::{irq, ports};
use kvm_ioctls::VmFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Errors of platform setup.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("cannot create the {0} interrupt eventfd")]
    EventFd(&'static str, #[source] std::io::Error),
    #[error("cannot register the {what} interrupt on GSI {gsi} with KVM")]
    Irqfd {
        what: &'static str,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot place the {0} on the bus")]
    Bus(&'static str, #[source] BusError),
    #[error("cannot set up the serial console")]
    Console(#[source] std::io::Error),
}

/// Ports the guest writes for I/O delays or POST codes: accepted silently, read as all-ones.
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The platform devices, kept alive for the VM's lifetime.
pub struct Platform {
    _serial: Arc<Mutex<SerialConsole<UnixStream>>>,
}

impl Platform {
    /// Creates the platform devices and maps them.
    pub fn attach(
        vm: &VmFd,
        pio: &Bus,
        _mmio: &Arc<Bus>,
        _exit: &Arc<ExitSignal>,
        console: UnixStream,
    ) -> Result<Self, PlatformError> {
        let irq_evt = EventFd::new(0).map_err(|e| PlatformError::EventFd("serial", e))?;
        vm.register_irqfd(&irq_evt, irq::COM1)
            .map_err(|source| PlatformError::Irqfd {
                what: "serial",
                gsi: irq::COM1,
                source,
            })?;
        let out = console.try_clone().map_err(PlatformError::Console)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(irq_evt, out)));
        pio.insert(
            serial.clone(),
            u64::from(ports::COM1),
            u64::from(ports::COM1_LEN),
        )
        .map_err(|e| PlatformError::Bus("serial port", e))?;
        serial::spawn_input_thread(Arc::clone(&serial), console).map_err(PlatformError::Console)?;

        pio.insert(Arc::new(Mutex::new(Sink)), u64::from(ports::POST), 1)
            .map_err(|e| PlatformError::Bus("POST port", e))?;
        Ok(Self { _serial: serial })
    }
}
