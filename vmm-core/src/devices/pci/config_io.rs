//! PCI configuration mechanism #1 (ports 0xcf8..0xcff) and the reset control register that
//! shares its address range (0xcf9).

use std::sync::{Arc, Mutex};

use super::root::PciRoot;
use crate::bus::BusDevice;
use crate::devices::power::ResetControl;
use crate::exit::ExitSignal;
use crate::layout::ports;

/// CONFIG_ADDRESS: enable bit.
const ENABLE: u32 = 1 << 31;
/// Offset of the reset control register from 0xcf8.
const RESET_OFFSET: u64 = (ports::RESET_CONTROL - ports::PCI_CONFIG_ADDRESS) as u64;
/// Offset of CONFIG_DATA from 0xcf8.
const DATA_OFFSET: u64 = (ports::PCI_CONFIG_DATA - ports::PCI_CONFIG_ADDRESS) as u64;

/// The decoded fields of a CONFIG_ADDRESS value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    pub enabled: bool,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// Dword register index (bits 7:2).
    pub reg_idx: usize,
}

impl ConfigAddress {
    pub fn decode(v: u32) -> Self {
        let [reg, devfn, bus, _] = v.to_le_bytes();
        Self {
            enabled: v & ENABLE != 0,
            bus,
            device: devfn >> 3,
            function: devfn & 0x7,
            reg_idx: usize::from(reg >> 2),
        }
    }

    /// The CONFIG_ADDRESS value that decodes to `self` (what a guest driver writes).
    #[cfg(test)]
    pub fn encode(self) -> u32 {
        let enable = if self.enabled { ENABLE } else { 0 };
        let reg = u32::try_from(self.reg_idx & 0x3f).expect("masked to 6 bits");
        enable
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device & 0x1f) << 11)
            | (u32::from(self.function & 0x7) << 8)
            | (reg << 2)
    }
}

/// The port-I/O device for `ports::PCI_CONFIG_ADDRESS` with length `ports::PCI_CONFIG_LEN`:
/// - a dword at 0xcf8 is CONFIG_ADDRESS and reads back exactly what was written;
/// - a byte at 0xcf9 is the reset control register ([`ResetControl`]);
/// - other accesses to 0xcf8..0xcfb are ignored (reads return all-ones), which covers
///   Linux's `outb(0x01, 0xcfb)` in `pci_check_type1`;
/// - byte, word and dword accesses to 0xcfc..0xcff read or write the addressed config
///   register at the matching byte offset; accesses with the enable bit clear, to absent
///   functions or crossing the dword read all-ones and write nothing.
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    reset: ResetControl,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>, exit: Arc<ExitSignal>) -> Self {
        Self {
            root,
            address: 0,
            reset: ResetControl::new(exit),
        }
    }

    fn root(&self) -> std::sync::MutexGuard<'_, PciRoot> {
        self.root.lock().expect("PCI root lock poisoned")
    }

    /// The byte offset within the dword and the decoded address of a data-port access, or
    /// `None` if the access cannot reach config space.
    fn data_target(&self, offset: u64, len: usize) -> Option<(ConfigAddress, u64)> {
        let sub = offset.checked_sub(DATA_OFFSET)?;
        let end = sub.checked_add(u64::try_from(len).ok()?)?;
        let addr = ConfigAddress::decode(self.address);
        (len > 0 && end <= 4 && addr.enabled).then_some((addr, sub))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (RESET_OFFSET, 1) => data[0] = self.reset.read(),
            _ => match self.data_target(offset, data.len()) {
                Some((a, sub)) => {
                    let v = self
                        .root()
                        .config_read(a.bus, a.device, a.function, a.reg_idx)
                        .to_le_bytes();
                    let sub = usize::try_from(sub).expect("sub-dword offset below 4");
                    data.copy_from_slice(&v[sub..sub + data.len()]);
                }
                None => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[a, b, c, d]) => self.address = u32::from_le_bytes([a, b, c, d]),
            (RESET_OFFSET, &[v]) => self.reset.write(v),
            _ => {
                if let Some((a, sub)) = self.data_target(offset, data.len()) {
                    self.root()
                        .config_write(a.bus, a.device, a.function, a.reg_idx, sub, data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::configuration::{
        BAR0_REG, BarKind, COMMAND_MEMORY, COMMAND_REG, PciConfiguration, PciHeader,
    };
    use super::super::device::PciDevice;
    use super::super::root::{HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
    use super::*;
    use crate::bus::Bus;
    use ipc::control::ExitReason;

    const MMIO_BASE: u64 = crate::layout::PCI_MMIO32_START;

    fn lo(v: u64) -> u32 {
        u32::try_from(v & 0xffff_ffff).unwrap()
    }

    fn hi(v: u64) -> u32 {
        u32::try_from(v >> 32).unwrap()
    }

    /// A device with one 32-bit memory BAR (0x1000) and one 64-bit BAR (0x4000) whose
    /// registers are plain memory, recording BAR moves.
    struct TestDev {
        config: PciConfiguration,
        bar0: Vec<u8>,
        moves: Vec<(usize, u64, u64)>,
    }

    impl TestDev {
        fn new() -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                class: 0x01,
                ..PciHeader::default()
            });
            config
                .add_bar(
                    0,
                    0x1000,
                    BarKind::Memory32 {
                        prefetchable: false,
                    },
                )
                .unwrap();
            config
                .add_bar(
                    2,
                    0x4000,
                    BarKind::Memory64 {
                        prefetchable: false,
                    },
                )
                .unwrap();
            Self {
                config,
                bar0: vec![0; 0x1000],
                moves: Vec::new(),
            }
        }
    }

    impl PciDevice for TestDev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            let o = usize::try_from(offset).unwrap();
            if bar == 0 {
                data.copy_from_slice(&self.bar0[o..o + data.len()]);
            } else {
                data.fill(u8::try_from(bar).unwrap());
            }
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            let o = usize::try_from(offset).unwrap();
            if bar == 0 {
                self.bar0[o..o + data.len()].copy_from_slice(data);
            }
        }
        fn bar_moved(&mut self, bar: usize, old: u64, new: u64) {
            self.moves.push((bar, old, new));
        }
    }

    struct Rig {
        io: PciConfigIo,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        dev: Arc<Mutex<TestDev>>,
        slot: u8,
    }

    fn rig() -> Rig {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let mut root = PciRoot::new(Arc::clone(&mmio), Arc::clone(&pio));
        let dev = Arc::new(Mutex::new(TestDev::new()));
        let slot = root.add_device(dev.clone()).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let io = PciConfigIo::new(Arc::new(Mutex::new(root)), Arc::clone(&exit));
        Rig {
            io,
            mmio,
            pio,
            exit,
            dev,
            slot,
        }
    }

    impl Rig {
        fn select(&mut self, device: u8, reg_idx: usize) {
            let a = ConfigAddress {
                enabled: true,
                bus: 0,
                device,
                function: 0,
                reg_idx,
            };
            self.io.write(0, &a.encode().to_le_bytes());
        }
        fn read32(&mut self, device: u8, reg_idx: usize) -> u32 {
            self.select(device, reg_idx);
            let mut b = [0u8; 4];
            self.io.read(4, &mut b);
            u32::from_le_bytes(b)
        }
        fn write32(&mut self, device: u8, reg_idx: usize, v: u32) {
            self.select(device, reg_idx);
            self.io.write(4, &v.to_le_bytes());
        }
        fn mmio_read32(&self, addr: u64) -> Option<u32> {
            let mut b = [0u8; 4];
            self.mmio.read(addr, &mut b).then(|| u32::from_le_bytes(b))
        }
    }

    #[test]
    fn address_encoding() {
        let a = ConfigAddress::decode(0x8001_2a3c);
        assert_eq!(
            a,
            ConfigAddress {
                enabled: true,
                bus: 1,
                device: 5,
                function: 2,
                reg_idx: 0x0f
            }
        );
        assert_eq!(a.encode(), 0x8001_2a3c);
        assert_eq!(
            ConfigAddress::decode(0x0000_0003).reg_idx,
            0,
            "bits 1:0 ignored"
        );
    }

    #[test]
    fn linux_pci_check_type1_sequence() {
        let mut r = rig();
        r.io.write(3, &[0x01]); // outb(0x01, 0xCFB)
        let mut b = [0u8; 4];
        r.io.read(0, &mut b);
        let tmp = u32::from_le_bytes(b);
        r.io.write(0, &0x8000_0000u32.to_le_bytes());
        r.io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        r.io.write(0, &tmp.to_le_bytes());
        assert!(
            !r.exit.is_set(),
            "the dword write covers 0xcf9 but is not a reset"
        );
    }

    #[test]
    fn host_bridge_and_absent_devices() {
        let mut r = rig();
        assert_eq!(
            r.read32(0, 0),
            u32::from(HOST_BRIDGE_VENDOR_ID) | (u32::from(HOST_BRIDGE_DEVICE_ID) << 16)
        );
        // Linux's pci_sanity_check: the class word at 0x0a is 0x0600.
        r.select(0, 2);
        let mut w = [0u8; 2];
        r.io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        assert_eq!(r.read32(31, 0), u32::MAX, "empty slot");
        // Function 1, bus 1: absent.
        r.io.write(0, &0x8000_0100u32.to_le_bytes());
        let mut b = [0u8; 4];
        r.io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        r.io.write(0, &0x8001_0000u32.to_le_bytes());
        r.io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        // Enable bit clear: nothing.
        r.io.write(0, &0x0000_0000u32.to_le_bytes());
        r.io.read(4, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(r.slot, 1);
    }

    #[test]
    fn sub_dword_data_accesses() {
        let mut r = rig();
        let slot = r.slot;
        assert_eq!(r.read32(slot, 0), 0x1042_1af4);
        r.select(slot, 0);
        let mut b1 = [0u8; 1];
        r.io.read(7, &mut b1);
        assert_eq!(b1, [0x10]);
        let mut w = [0u8; 2];
        r.io.read(6, &mut w);
        assert_eq!(w, [0x42, 0x10]);
        // A word at 0xcff would cross the dword: all-ones.
        r.io.read(7, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        // Byte write to the interrupt line (register 15, byte 0) via 0xcfc.
        r.select(slot, 15);
        r.io.write(4, &[0x0b]);
        assert_eq!(r.read32(slot, 15) & 0xff, 0x0b);
        // Byte write to the command register's upper byte via 0xcfd (INTx disable).
        r.select(slot, COMMAND_REG);
        r.io.write(5, &[0x04]);
        assert_eq!(
            r.read32(slot, COMMAND_REG) & 0xffff,
            0x0400 | u32::from(COMMAND_MEMORY)
        );
    }

    #[test]
    fn reset_byte_reboots() {
        let mut r = rig();
        r.io.write(1, &[0x02]);
        assert!(!r.exit.is_set());
        let mut b = [0u8];
        r.io.read(1, &mut b);
        assert_eq!(b, [0x02]);
        r.io.write(1, &[0x06]);
        assert_eq!(r.exit.reason(), Some(ExitReason::Reboot));
        // A byte write elsewhere in the address dword is ignored.
        let mut r = rig();
        r.io.write(0, &[0x06]);
        r.io.write(2, &[0x06]);
        assert!(!r.exit.is_set());
    }

    #[test]
    fn bars_are_assigned_mapped_and_decoding() {
        let mut r = rig();
        let slot = r.slot;
        // Largest first: the 64-bit 16 KiB BAR, then the 4 KiB one.
        assert_eq!(r.read32(slot, BAR0_REG + 2), lo(MMIO_BASE) | 0x4);
        assert_eq!(r.read32(slot, BAR0_REG + 3), 0);
        assert_eq!(r.read32(slot, BAR0_REG), lo(MMIO_BASE + 0x4000));
        assert_eq!(
            r.read32(slot, COMMAND_REG) & 0x3,
            u32::from(COMMAND_MEMORY),
            "memory decoding on, I/O off"
        );
        assert!(
            r.mmio
                .write(MMIO_BASE + 0x4000 + 0x10, &0xdead_beefu32.to_le_bytes())
        );
        assert_eq!(r.mmio_read32(MMIO_BASE + 0x4010), Some(0xdead_beef));
        assert_eq!(
            r.mmio_read32(MMIO_BASE + 0x3ffc),
            Some(0x0202_0202),
            "BAR 2"
        );
        assert_eq!(r.mmio_read32(MMIO_BASE + 0x5000), None);
        let mut b = [0u8; 1];
        assert!(!r.pio.read(super::super::root::PCI_IO_START, &mut b));
    }

    #[test]
    fn linux_style_sizing_does_not_move_bars() {
        let mut r = rig();
        let slot = r.slot;
        let bar0 = MMIO_BASE + 0x4000;
        // With decoding on (as for devices marked mmio_always_on): write ~0, read, restore.
        r.write32(slot, BAR0_REG, u32::MAX);
        assert_eq!(r.read32(slot, BAR0_REG), 0xffff_f000);
        r.write32(slot, BAR0_REG, lo(bar0));
        // With decoding off, the 64-bit BAR: both halves.
        let cmd = r.read32(slot, COMMAND_REG);
        r.write32(slot, COMMAND_REG, cmd & !0x3);
        r.write32(slot, BAR0_REG + 2, u32::MAX);
        r.write32(slot, BAR0_REG + 3, u32::MAX);
        assert_eq!(r.read32(slot, BAR0_REG + 2), 0xffff_c004);
        assert_eq!(r.read32(slot, BAR0_REG + 3), u32::MAX);
        r.write32(slot, BAR0_REG + 2, lo(MMIO_BASE));
        r.write32(slot, BAR0_REG + 3, 0);
        r.write32(slot, COMMAND_REG, cmd);
        assert!(r.dev.lock().unwrap().moves.is_empty());
        assert!(r.mmio.write(bar0, &[7]));
        assert_eq!(r.dev.lock().unwrap().bar0[0], 7);
    }

    #[test]
    fn moving_a_bar_with_decoding_on_relocates_the_range() {
        let mut r = rig();
        let slot = r.slot;
        let old = MMIO_BASE + 0x4000;
        let new = 0xd000_0000u64;
        r.mmio.write(old, &[0x5a]);
        r.write32(slot, BAR0_REG, lo(new));
        assert_eq!(r.dev.lock().unwrap().moves, vec![(0, old, new)]);
        assert_eq!(r.mmio_read32(old), None, "old range unmapped");
        let mut b = [0u8];
        assert!(r.mmio.read(new, &mut b));
        assert_eq!(b, [0x5a], "same device behind the new range");
        // Moving onto the other BAR is refused; the BAR stays where it was.
        r.write32(slot, BAR0_REG, lo(MMIO_BASE));
        assert_eq!(r.dev.lock().unwrap().moves.len(), 1);
        assert!(r.mmio.read(new, &mut b));
    }

    #[test]
    fn moving_a_bar_while_decoding_is_off_takes_effect_on_enable() {
        let mut r = rig();
        let slot = r.slot;
        let old64 = MMIO_BASE;
        let new64 = 0x1_2340_0000u64;
        let cmd = r.read32(slot, COMMAND_REG);
        r.write32(slot, COMMAND_REG, cmd & !u32::from(COMMAND_MEMORY));
        r.write32(slot, BAR0_REG + 2, lo(new64));
        r.write32(slot, BAR0_REG + 3, hi(new64));
        assert!(r.dev.lock().unwrap().moves.is_empty());
        assert!(
            r.mmio_read32(old64).is_some(),
            "mapping kept while decoding is off"
        );
        r.write32(slot, COMMAND_REG, cmd);
        assert_eq!(r.dev.lock().unwrap().moves, vec![(2, old64, new64)]);
        assert_eq!(r.mmio_read32(new64), Some(0x0202_0202));
        assert_eq!(r.mmio_read32(old64), None);
    }

    #[test]
    fn io_bars_go_on_the_port_bus() {
        struct IoDev(PciConfiguration);
        impl PciDevice for IoDev {
            fn config(&self) -> &PciConfiguration {
                &self.0
            }
            fn config_mut(&mut self) -> &mut PciConfiguration {
                &mut self.0
            }
            fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
                data.fill(u8::try_from(bar * 16).unwrap() + u8::try_from(offset).unwrap());
            }
            fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
        }
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let mut root = PciRoot::new(Arc::clone(&mmio), Arc::clone(&pio));
        let mut cfg = PciConfiguration::new(&PciHeader::default());
        cfg.add_bar(1, 0x20, BarKind::Io).unwrap();
        let dev = Arc::new(Mutex::new(IoDev(cfg)));
        root.add_device(dev.clone()).unwrap();
        let base = super::super::root::PCI_IO_START;
        assert_eq!(dev.lock().unwrap().0.bar_addr(1), base);
        assert!(dev.lock().unwrap().0.io_enabled());
        assert!(!dev.lock().unwrap().0.memory_enabled());
        let mut b = [0u8];
        assert!(pio.read(base + 3, &mut b));
        assert_eq!(b, [0x13]);
    }

    #[test]
    fn out_of_space_and_slots() {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let mut root = PciRoot::with_windows(
            Arc::clone(&mmio),
            Arc::clone(&pio),
            MMIO_BASE..MMIO_BASE + 0x8000,
            0xc000..0xc100,
        );
        root.add_device(Arc::new(Mutex::new(TestDev::new())))
            .unwrap();
        let e = root
            .add_device(Arc::new(Mutex::new(TestDev::new())))
            .unwrap_err();
        assert!(matches!(
            e,
            super::super::PciError::OutOfSpace { index: 2, .. }
        ));
        // A device without BARs fits until the slots run out (0 is the host bridge).
        let mut slots = Vec::new();
        loop {
            let cfg = PciConfiguration::new(&PciHeader::default());
            struct NoBars(PciConfiguration);
            impl PciDevice for NoBars {
                fn config(&self) -> &PciConfiguration {
                    &self.0
                }
                fn config_mut(&mut self) -> &mut PciConfiguration {
                    &mut self.0
                }
                fn read_bar(&mut self, _: usize, _: u64, _: &mut [u8]) {}
                fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
            }
            match root.add_device(Arc::new(Mutex::new(NoBars(cfg)))) {
                Ok(s) => slots.push(s),
                Err(e) => {
                    assert_eq!(e, super::super::PciError::NoFreeSlot);
                    break;
                }
            }
        }
        assert_eq!(slots, (2..32).collect::<Vec<u8>>());
        assert!(root.device(0).is_some());
        assert!(root.device(32).is_none());
    }
}
