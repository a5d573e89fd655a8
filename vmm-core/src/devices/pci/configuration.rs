//! A type-0 PCI configuration space (256 bytes) with per-bit write masks.
//!
//! The device model fills in the identification, registers its BARs and capabilities, and from
//! then on the guest can change only the writable bits: command, cache line size, latency
//! timer, interrupt line, the address bits of the BARs (so that writing all-ones and reading
//! back yields the size mask) and whatever capability bits the device declared writable.

use super::PciError;

/// Registers (dwords) in a conventional config space.
pub const NUM_CONFIG_REGS: usize = 64;
/// BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Register index of vendor/device id.
pub const ID_REG: usize = 0;
/// Register index of command (low word) and status (high word).
pub const COMMAND_REG: usize = 1;
/// Register index of revision (byte 0) and class code (bytes 1..=3).
pub const CLASS_REG: usize = 2;
/// Register index of cache line size, latency timer, header type, BIST.
pub const HEADER_REG: usize = 3;
/// Register index of BAR 0; BAR n is at `BAR0_REG + n`.
pub const BAR0_REG: usize = 4;
/// Register index of subsystem vendor/subsystem id.
pub const SUBSYSTEM_REG: usize = 11;
/// Register index of the expansion ROM BAR (not implemented: reads 0).
#[cfg(test)]
pub const ROM_REG: usize = 12;
/// Register index of the capabilities pointer (byte 0).
pub const CAPABILITY_POINTER_REG: usize = 13;
/// Register index of interrupt line (byte 0) and pin (byte 1).
pub const INTERRUPT_REG: usize = 15;

/// Byte offset of the capabilities pointer.
const CAPABILITY_POINTER: usize = CAPABILITY_POINTER_REG * 4;
/// First byte offset available to capabilities.
const FIRST_CAPABILITY: usize = 0x40;
const CONFIG_SIZE: usize = NUM_CONFIG_REGS * 4;

/// Command register bits.
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;
/// Status register bit: the capabilities list exists.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// BAR low bits.
const BAR_IO_SPACE: u32 = 0x1;
const BAR_MEM_64: u32 = 0x4;
const BAR_MEM_PREFETCH: u32 = 0x8;
const BAR_IO_ADDR_MASK: u32 = !0x3;
const BAR_MEM_ADDR_MASK: u32 = !0xf;

/// Smallest and largest BARs the PCI spec allows.
const MIN_MEM_BAR: u64 = 16;
const MAX_MEM32_BAR: u64 = 1 << 31;
const MAX_MEM64_BAR: u64 = 1 << 63;
const MIN_IO_BAR: u64 = 4;
const MAX_IO_BAR: u64 = 256;

/// The kind of a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O (mapped on the port-I/O bus).
    #[allow(
        dead_code,
        reason = "PciRoot allocates and maps I/O BARs; no device of this VMM has one yet"
    )]
    Io,
    /// 32-bit memory.
    #[allow(
        dead_code,
        reason = "PciRoot places 32-bit BARs below 4 GiB; virtio-pci uses a 64-bit BAR"
    )]
    Memory32 { prefetchable: bool },
    /// 64-bit memory; uses two BAR slots (`index` and `index + 1`).
    Memory64 { prefetchable: bool },
}

impl BarKind {
    pub fn is_io(self) -> bool {
        matches!(self, BarKind::Io)
    }
}

/// A registered BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub index: usize,
    pub kind: BarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
}

/// The identification part of a type-0 header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Base class (e.g. 0x06 bridge, 0x01 storage, 0x02 network).
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

/// A type-0 configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; NUM_CONFIG_REGS],
    writable: [u32; NUM_CONFIG_REGS],
    bars: [Option<BarInfo>; NUM_BARS],
    /// Byte offset of the last capability added, whose next pointer links the next one.
    last_capability: Option<usize>,
    /// First free byte offset for the next capability.
    next_capability: usize,
}

impl PciConfiguration {
    /// A config space with `header`'s identification, no BARs, no capabilities, interrupt
    /// pin 0 (none). Command, cache line size, latency timer and interrupt line are writable.
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = [0u32; NUM_CONFIG_REGS];
        let mut writable = [0u32; NUM_CONFIG_REGS];
        regs[ID_REG] = u32::from(header.vendor_id) | (u32::from(header.device_id) << 16);
        regs[CLASS_REG] = u32::from(header.revision_id)
            | (u32::from(header.prog_if) << 8)
            | (u32::from(header.subclass) << 16)
            | (u32::from(header.class) << 24);
        // Header type 0 (byte 2 of HEADER_REG), single function.
        regs[SUBSYSTEM_REG] =
            u32::from(header.subsystem_vendor_id) | (u32::from(header.subsystem_id) << 16);
        writable[COMMAND_REG] = u32::from(COMMAND_WRITABLE);
        writable[HEADER_REG] = 0x0000_ffff;
        writable[INTERRUPT_REG] = 0x0000_00ff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        }
    }

    /// The dword register `reg_idx` (0..64); out-of-range indices read 0.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.regs.get(reg_idx).copied().unwrap_or(0)
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` within register `reg_idx`;
    /// only writable bits change. Writes that run past the register are ignored.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        if reg_idx >= NUM_CONFIG_REGS || data.is_empty() || offset + data.len() > 4 {
            return;
        }
        let mut value = 0u32;
        let mut mask = 0u32;
        for (i, &b) in data.iter().enumerate() {
            value |= u32::from(b) << (8 * (offset + i));
            mask |= 0xff << (8 * (offset + i));
        }
        let writable = self.writable[reg_idx] & mask;
        self.regs[reg_idx] = (self.regs[reg_idx] & !writable) | (value & writable);
    }

    /// Reads `data.len()` bytes from byte `offset` (device-side view, no side effects).
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.byte(offset + i);
        }
    }

    /// Writes `data` at byte `offset` ignoring the write masks: for the device model itself
    /// (status bits, capability state), never for guest writes. Bytes past 0xff are dropped.
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.set_byte(offset + i, b);
        }
    }

    fn byte(&self, offset: usize) -> u8 {
        let Some(&reg) = self.regs.get(offset / 4) else {
            return 0;
        };
        (reg >> (8 * (offset % 4))).to_le_bytes()[0]
    }

    fn set_byte(&mut self, offset: usize, v: u8) {
        if let Some(reg) = self.regs.get_mut(offset / 4) {
            let shift = 8 * (offset % 4);
            *reg = (*reg & !(0xff << shift)) | (u32::from(v) << shift);
        }
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        if let Some(reg) = self.writable.get_mut(offset / 4) {
            let shift = 8 * (offset % 4);
            *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        let b = self.regs[COMMAND_REG].to_le_bytes();
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Sets the command register as firmware would (ignores the write mask).
    pub fn set_command(&mut self, command: u16) {
        self.write_bytes(COMMAND_REG * 4, &command.to_le_bytes());
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        let b = self.regs[COMMAND_REG].to_le_bytes();
        u16::from_le_bytes([b[2], b[3]])
    }

    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    #[cfg(test)]
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Sets the interrupt pin (1 = INTA# .. 4 = INTD#, 0 = none) and the initial line.
    #[cfg(test)]
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.write_bytes(INTERRUPT_REG * 4, &[line, pin]);
    }

    /// The interrupt line the guest programmed.
    #[cfg(test)]
    pub fn interrupt_line(&self) -> u8 {
        self.byte(INTERRUPT_REG * 4)
    }

    /// Registers BAR `index` with `size` bytes (a power of two; memory BARs at least 16 bytes,
    /// 32-bit ones at most 2 GiB; I/O BARs 4..=256 bytes). A 64-bit BAR also takes slot
    /// `index + 1`. The address starts at 0; [`set_bar_addr`](Self::set_bar_addr) places it.
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let slots = if matches!(kind, BarKind::Memory64 { .. }) {
            2
        } else {
            1
        };
        if index + slots > NUM_BARS {
            return Err(PciError::BadBarIndex(index));
        }
        if (index..index + slots).any(|i| self.bar_slot_used(i)) {
            return Err(PciError::BarInUse(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (MIN_IO_BAR, MAX_IO_BAR),
            BarKind::Memory32 { .. } => (MIN_MEM_BAR, MAX_MEM32_BAR),
            BarKind::Memory64 { .. } => (MIN_MEM_BAR, MAX_MEM64_BAR),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BadBarSize {
                index,
                size,
                min,
                max,
            });
        }
        let addr_mask = !(size - 1);
        let reg = BAR0_REG + index;
        let (low_bits, low_mask) = match kind {
            BarKind::Io => (BAR_IO_SPACE, BAR_IO_ADDR_MASK),
            BarKind::Memory32 { prefetchable } => (prefetch_bit(prefetchable), BAR_MEM_ADDR_MASK),
            BarKind::Memory64 { prefetchable } => {
                (BAR_MEM_64 | prefetch_bit(prefetchable), BAR_MEM_ADDR_MASK)
            }
        };
        self.regs[reg] = low_bits;
        self.writable[reg] = low32(addr_mask) & low_mask;
        if slots == 2 {
            self.regs[reg + 1] = 0;
            self.writable[reg + 1] = high32(addr_mask);
        }
        self.bars[index] = Some(BarInfo { index, kind, size });
        Ok(())
    }

    fn bar_slot_used(&self, slot: usize) -> bool {
        self.bars.iter().flatten().any(|b| {
            b.index == slot || (matches!(b.kind, BarKind::Memory64 { .. }) && b.index + 1 == slot)
        })
    }

    /// The BAR registered at `index`, if any (a 64-bit BAR's upper slot is not one).
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().flatten()
    }

    /// All registered BARs, by index.
    pub fn bars(&self) -> impl Iterator<Item = BarInfo> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The address BAR `index` currently holds (type bits removed); 0 if unregistered.
    pub fn bar_addr(&self, index: usize) -> u64 {
        let Some(bar) = self.bar(index) else {
            return 0;
        };
        let reg = BAR0_REG + index;
        match bar.kind {
            BarKind::Io => u64::from(self.regs[reg] & BAR_IO_ADDR_MASK),
            BarKind::Memory32 { .. } => u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK),
            BarKind::Memory64 { .. } => {
                u64::from(self.regs[reg] & BAR_MEM_ADDR_MASK)
                    | (u64::from(self.regs[reg + 1]) << 32)
            }
        }
    }

    /// Places BAR `index` at `addr`, which must be aligned to the BAR's size and, for 32-bit
    /// and I/O BARs, fit in 32 bits.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), PciError> {
        let bar = self.bar(index).ok_or(PciError::BadBarIndex(index))?;
        let fits = match bar.kind {
            BarKind::Memory64 { .. } => addr.checked_add(bar.size).is_some(),
            _ => addr.checked_add(bar.size).is_some_and(|end| end <= 1 << 32),
        };
        if !addr.is_multiple_of(bar.size) || !fits {
            return Err(PciError::BadBarAddress {
                index,
                addr,
                size: bar.size,
            });
        }
        let reg = BAR0_REG + index;
        let type_bits = self.regs[reg] & !self.writable[reg];
        self.regs[reg] = type_bits | low32(addr);
        if matches!(bar.kind, BarKind::Memory64 { .. }) {
            self.regs[reg + 1] = high32(addr);
        }
        Ok(())
    }

    /// Whether BAR `index` holds a sizing probe rather than an address: the guest wrote
    /// all-ones to it (or to the upper half of a 64-bit BAR) and has not restored it yet.
    pub fn bar_holds_size_probe(&self, index: usize) -> bool {
        let Some(bar) = self.bar(index) else {
            return false;
        };
        let reg = BAR0_REG + index;
        let low = self.regs[reg] & self.writable[reg] == self.writable[reg];
        let high = matches!(bar.kind, BarKind::Memory64 { .. }) && self.regs[reg + 1] == u32::MAX;
        low || high
    }

    /// Adds a read-only capability; `cap[0]` is the capability id, `cap[1]` (the next pointer)
    /// is filled in. Returns the byte offset the capability was placed at (dword aligned).
    pub fn add_capability(&mut self, cap: &[u8]) -> Result<usize, PciError> {
        self.add_capability_with_mask(cap, &vec![0; cap.len()])
    }

    /// Adds a capability whose bits set in `writable` (same length as `cap`) the guest may
    /// change. The id and next-pointer bytes always stay read-only.
    pub fn add_capability_with_mask(
        &mut self,
        cap: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciError> {
        if cap.len() < 2 {
            return Err(PciError::CapabilityTooShort(cap.len()));
        }
        if writable.len() != cap.len() {
            return Err(PciError::MaskLength {
                cap: cap.len(),
                mask: writable.len(),
            });
        }
        let offset = self.next_capability.next_multiple_of(4);
        if offset + cap.len() > CONFIG_SIZE {
            return Err(PciError::CapabilityTooLarge {
                offset,
                len: cap.len(),
            });
        }
        for (i, (&b, &m)) in cap.iter().zip(writable).enumerate() {
            self.set_byte(offset + i, b);
            self.set_writable_byte(offset + i, if i < 2 { 0 } else { m });
        }
        self.set_byte(offset + 1, 0);
        let offset_byte = u8::try_from(offset).expect("capability offset is below 0x100");
        match self.last_capability {
            Some(prev) => self.set_byte(prev + 1, offset_byte),
            None => {
                self.set_byte(CAPABILITY_POINTER, offset_byte);
                let status = self.status() | STATUS_CAPABILITIES;
                self.write_bytes(COMMAND_REG * 4 + 2, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + cap.len();
        Ok(offset)
    }

    /// Byte ranges of all capabilities, as `(offset, id)` following the list.
    #[cfg(test)]
    pub fn capabilities(&self) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut next = usize::from(self.byte(CAPABILITY_POINTER));
        while next != 0 && out.len() < NUM_CONFIG_REGS {
            out.push((next, self.byte(next)));
            next = usize::from(self.byte(next + 1));
        }
        out
    }

    /// Whether byte range `[offset, offset + len)` overlaps `range` (helper for devices that
    /// intercept writes to one of their capabilities).
    pub fn overlaps(offset: usize, len: usize, range: std::ops::Range<usize>) -> bool {
        offset < range.end && range.start < offset + len
    }
}

fn prefetch_bit(prefetchable: bool) -> u32 {
    if prefetchable { BAR_MEM_PREFETCH } else { 0 }
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked to 32 bits")
}

fn high32(v: u64) -> u32 {
    u32::try_from(v >> 32).expect("shifted to 32 bits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x0002,
        }
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) {
        c.write_reg(reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn identification_is_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_reg(ID_REG), 0x1042_1af4);
        assert_eq!(c.read_reg(CLASS_REG), 0x0100_0001);
        assert_eq!(c.read_reg(SUBSYSTEM_REG), 0x0002_1af4);
        assert_eq!(c.read_reg(HEADER_REG) >> 16 & 0xff, 0, "header type 0");
        write32(&mut c, ID_REG, 0);
        write32(&mut c, CLASS_REG, 0);
        write32(&mut c, SUBSYSTEM_REG, 0);
        write32(&mut c, ROM_REG, u32::MAX);
        assert_eq!(c.read_reg(ID_REG), 0x1042_1af4);
        assert_eq!(c.read_reg(CLASS_REG), 0x0100_0001);
        assert_eq!(c.read_reg(SUBSYSTEM_REG), 0x0002_1af4);
        assert_eq!(c.read_reg(ROM_REG), 0, "no expansion ROM");
        assert_eq!(c.read_reg(64), 0);
    }

    #[test]
    fn command_and_status_masks() {
        let mut c = PciConfiguration::new(&header());
        write32(&mut c, COMMAND_REG, u32::MAX);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        assert_eq!(c.status(), 0, "status is read-only");
        assert!(c.memory_enabled() && c.io_enabled() && c.bus_master_enabled());
        // A byte write to the upper byte of the command word only.
        c.write_reg(COMMAND_REG, 1, &[0]);
        assert_eq!(c.command(), COMMAND_WRITABLE & 0xff);
        // Interrupt line is writable, pin is not.
        c.set_interrupt(1, 5);
        c.write_reg(INTERRUPT_REG, 0, &[10, 3]);
        assert_eq!(c.interrupt_line(), 10);
        assert_eq!(c.read_reg(INTERRUPT_REG) >> 8 & 0xff, 1);
        // Writes that cross the register are refused.
        c.write_reg(INTERRUPT_REG, 3, &[1, 2]);
        assert_eq!(c.interrupt_line(), 10);
    }

    #[test]
    fn bar_sizing_32_64_and_io() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(
            0,
            0x1000,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(2, 0x4000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        c.add_bar(4, 0x20, BarKind::Io).unwrap();
        // Unregistered BAR 5 reads 0 and ignores all-ones.
        for reg in BAR0_REG..BAR0_REG + NUM_BARS {
            write32(&mut c, reg, u32::MAX);
        }
        assert_eq!(c.read_reg(BAR0_REG), 0xffff_f000);
        assert_eq!(c.read_reg(BAR0_REG + 1), 0, "BAR 1 unused");
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xffff_c00c, "64-bit prefetchable");
        assert_eq!(c.read_reg(BAR0_REG + 3), 0xffff_ffff);
        assert_eq!(c.read_reg(BAR0_REG + 4), 0xffff_ffe1, "I/O");
        assert_eq!(c.read_reg(BAR0_REG + 5), 0);
        assert!(c.bar_holds_size_probe(0) && c.bar_holds_size_probe(2));
        // The size the guest computes: ~(mask) + 1.
        assert_eq!(!(c.read_reg(BAR0_REG) & !0xf) + 1, 0x1000);
        let mask64 = u64::from(c.read_reg(BAR0_REG + 2) & !0xf)
            | (u64::from(c.read_reg(BAR0_REG + 3)) << 32);
        assert_eq!(!mask64 + 1, 0x4000);
        // Program addresses: low bits are dropped, type bits stay.
        write32(&mut c, BAR0_REG, 0xc000_0fff);
        write32(&mut c, BAR0_REG + 2, 0xd000_0000);
        write32(&mut c, BAR0_REG + 3, 0x1);
        write32(&mut c, BAR0_REG + 4, 0xc040);
        assert_eq!(c.read_reg(BAR0_REG), 0xc000_0000);
        assert_eq!(c.bar_addr(0), 0xc000_0000);
        assert_eq!(c.bar_addr(2), 0x1_d000_0000);
        assert_eq!(c.read_reg(BAR0_REG + 2), 0xd000_000c);
        assert_eq!(c.bar_addr(4), 0xc040);
        assert_eq!(c.read_reg(BAR0_REG + 4), 0xc041);
        assert!(!c.bar_holds_size_probe(0) && !c.bar_holds_size_probe(2));
        assert_eq!(c.bars().map(|b| b.index).collect::<Vec<_>>(), vec![0, 2, 4]);
    }

    #[test]
    fn bar_registration_is_checked() {
        let mut c = PciConfiguration::new(&header());
        let mem = BarKind::Memory32 {
            prefetchable: false,
        };
        let mem64 = BarKind::Memory64 {
            prefetchable: false,
        };
        assert!(matches!(
            c.add_bar(0, 0x1800, mem),
            Err(PciError::BadBarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 8, mem),
            Err(PciError::BadBarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(0, 512, BarKind::Io),
            Err(PciError::BadBarSize { .. })
        ));
        assert_eq!(c.add_bar(5, 0x1000, mem64), Err(PciError::BadBarIndex(5)));
        assert_eq!(c.add_bar(6, 0x1000, mem), Err(PciError::BadBarIndex(6)));
        c.add_bar(0, 0x1000, mem64).unwrap();
        assert_eq!(c.add_bar(1, 0x1000, mem), Err(PciError::BarInUse(1)));
        assert_eq!(c.add_bar(0, 0x1000, mem), Err(PciError::BarInUse(0)));
        assert!(c.bar(1).is_none());
        assert!(matches!(
            c.set_bar_addr(0, 0xc000_0800),
            Err(PciError::BadBarAddress { .. })
        ));
        assert_eq!(c.set_bar_addr(3, 0), Err(PciError::BadBarIndex(3)));
        c.add_bar(2, 0x1000, mem).unwrap();
        assert!(matches!(
            c.set_bar_addr(2, 0x1_0000_0000),
            Err(PciError::BadBarAddress { .. })
        ));
        c.set_bar_addr(0, 0x2_0000_0000).unwrap();
        assert_eq!(c.bar_addr(0), 0x2_0000_0000);
        assert_eq!(c.read_reg(BAR0_REG), 0x4);
    }

    #[test]
    fn capability_list_is_linked_and_masked() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.status() & STATUS_CAPABILITIES, 0);
        let a = c.add_capability(&[0x09, 0xee, 16, 1, 0, 0]).unwrap();
        let b = c
            .add_capability_with_mask(&[0x11, 0, 0x03, 0x00], &[0xff, 0xff, 0, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48, "dword aligned after a 6-byte capability");
        assert_eq!(c.status() & STATUS_CAPABILITIES, STATUS_CAPABILITIES);
        assert_eq!(c.read_reg(CAPABILITY_POINTER_REG) & 0xff, 0x40);
        assert_eq!(c.capabilities(), vec![(0x40, 0x09), (0x48, 0x11)]);
        let mut bytes = [0u8; 4];
        c.read_bytes(0x40, &mut bytes);
        assert_eq!(bytes, [0x09, 0x48, 16, 1]);
        // Read-only capability; masked capability: id/next stay, only 0xc0 of byte 3 moves.
        write32(&mut c, 0x40 / 4, 0);
        write32(&mut c, 0x48 / 4, u32::MAX);
        assert_eq!(c.read_reg(0x40 / 4), 0x0110_4809);
        assert_eq!(c.read_reg(0x48 / 4), 0xc003_0011);
        // Device-side writes bypass the mask.
        c.write_bytes(0x4a, &[0x07]);
        assert_eq!(c.read_reg(0x48 / 4), 0xc007_0011);
        assert!(matches!(
            c.add_capability(&[0x09]),
            Err(PciError::CapabilityTooShort(1))
        ));
        assert!(matches!(
            c.add_capability_with_mask(&[0x09, 0, 0], &[0]),
            Err(PciError::MaskLength { .. })
        ));
        assert!(matches!(
            c.add_capability(&[0x09; 200]),
            Err(PciError::CapabilityTooLarge { .. })
        ));
        assert!(PciConfiguration::overlaps(0x48, 4, 0x4a..0x4c));
        assert!(!PciConfiguration::overlaps(0x44, 4, 0x48..0x4c));
    }
}
