//! Wires the platform devices (serial console, RTC, ACPI power and reset, PCI host bridge) onto
//! the buses and their interrupts onto KVM.

use crate::bus::{Bus, BusDevice, BusError};
use crate::devices::power::{I8042_LEN, PVPANIC_LEN};
use crate::devices::serial::{self, SerialConsole};
use crate::devices::{AcpiSleep, I8042, PVPANIC, PciConfigIo, PciRoot, PvPanic, Rtc};
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

/// Ports the guest writes for I/O delays or POST codes, and legacy ISA hardware this platform
/// does not have but every Linux probes for: accepted silently, read as all-ones ("absent").
struct Sink;

/// Legacy ISA port ranges Linux probes at boot and finds absent: DMA page registers (around the
/// POST port), Super I/O configuration ports, COM2..COM4 and the parallel ports. Mapping them to
/// [`Sink`] keeps the "unhandled access" warnings for accesses that are really unexpected.
const ABSENT_ISA_PORTS: &[(&str, u16, u16)] = &[
    ("DMA page registers", 0x81, 0x0f),
    ("Super I/O config (0x2e)", 0x2e, 2),
    ("Super I/O config (0x4e)", 0x4e, 2),
    ("COM2", 0x2f8, 8),
    ("COM3", 0x3e8, 8),
    ("COM4", 0x2e8, 8),
    ("LPT1", 0x378, 3),
    ("LPT2", 0x278, 3),
    ("LPT3", 0x3bc, 3),
];

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The platform devices, kept alive for the VM's lifetime.
pub struct Platform {
    _serial: Arc<Mutex<SerialConsole<UnixStream>>>,
    /// The PCI host bridge; PCI devices are added here.
    pub pci: Arc<Mutex<PciRoot>>,
}

fn place(
    bus: &Bus,
    what: &'static str,
    dev: Arc<dyn crate::bus::BusDeviceSync>,
    base: u16,
    len: u16,
) -> Result<(), PlatformError> {
    bus.insert(dev, u64::from(base), u64::from(len))
        .map_err(|e| PlatformError::Bus(what, e))
}

impl Platform {
    /// Creates the platform devices and maps them.
    pub fn attach(
        vm: &VmFd,
        pio: &Arc<Bus>,
        mmio: &Arc<Bus>,
        exit: &Arc<ExitSignal>,
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
        place(
            pio,
            "serial port",
            serial.clone(),
            ports::COM1,
            ports::COM1_LEN,
        )?;
        serial::spawn_input_thread(Arc::clone(&serial), console).map_err(PlatformError::Console)?;

        place(pio, "POST port", Arc::new(Mutex::new(Sink)), ports::POST, 1)?;
        for &(what, base, len) in ABSENT_ISA_PORTS {
            place(pio, what, Arc::new(Mutex::new(Sink)), base, len)?;
        }
        place(
            pio,
            "RTC",
            Arc::new(Mutex::new(Rtc::new())),
            ports::RTC,
            ports::RTC_LEN,
        )?;
        let sleep = Arc::new(Mutex::new(AcpiSleep::new(Arc::clone(exit))));
        place(
            pio,
            "ACPI sleep registers",
            sleep,
            ports::ACPI_SLEEP_CONTROL,
            ports::ACPI_SLEEP_LEN,
        )?;
        let i8042 = Arc::new(Mutex::new(I8042::new(Arc::clone(exit))));
        place(pio, "i8042", i8042, ports::I8042_DATA, I8042_LEN)?;
        let pvpanic = Arc::new(Mutex::new(PvPanic::new(Arc::clone(exit))));
        place(pio, "pvpanic", pvpanic, PVPANIC, PVPANIC_LEN)?;

        let pci = Arc::new(Mutex::new(PciRoot::new(Arc::clone(mmio), Arc::clone(pio))));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(
            Arc::clone(&pci),
            Arc::clone(exit),
        )));
        place(
            pio,
            "PCI config ports",
            config_io,
            ports::PCI_CONFIG_ADDRESS,
            ports::PCI_CONFIG_LEN,
        )?;
        Ok(Self {
            _serial: serial,
            pci,
        })
    }
}
