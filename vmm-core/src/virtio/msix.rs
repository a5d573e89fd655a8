//! The MSI-X register model: the capability (PCI 3.0 §6.8.2), the vector table and the
//! pending-bit array, as the guest sees them. Pure state; the transport turns vector changes
//! into GSI routes and irqfds.

#![forbid(unsafe_code)]

use crate::irq_routing::MsiMessage;

/// Capability id of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Capability length: id, next, Message Control, Table Offset/BIR, PBA Offset/BIR.
pub const MSIX_CAP_LEN: usize = 12;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message Control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message Control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector Control: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// The most vectors a function may have (table size field is 11 bits).
pub const MAX_VECTORS: u16 = 2048;

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixEntry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub ctrl: u32,
}

impl Default for MsixEntry {
    /// Entries come out of reset masked.
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    pub fn masked(&self) -> bool {
        self.ctrl & VECTOR_MASKED != 0
    }

    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }

    fn field(&self, index: usize) -> u32 {
        match index {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.ctrl,
        }
    }

    fn set_field(&mut self, index: usize, value: u32) {
        match index {
            0 => self.addr_lo = value,
            1 => self.addr_hi = value,
            2 => self.data = value,
            // Only the mask bit of Vector Control is defined; the rest reads 0.
            _ => self.ctrl = value & VECTOR_MASKED,
        }
    }
}

/// The MSI-X state of one function.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// `vectors` entries (1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16) -> Self {
        assert!(
            (1..=MAX_VECTORS).contains(&vectors),
            "MSI-X has 1..=2048 vectors, not {vectors}"
        );
        Self {
            entries: vec![MsixEntry::default(); usize::from(vectors)],
            enabled: false,
            function_masked: false,
        }
    }

    /// The capability bytes (next pointer 0) and its write mask: only Message Control's
    /// enable and function-mask bits are writable. Table and PBA live in BAR `bar` at the
    /// given offsets (8-byte aligned).
    pub fn capability(
        &self,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> ([u8; MSIX_CAP_LEN], [u8; MSIX_CAP_LEN]) {
        assert!(bar < 6 && table_offset.is_multiple_of(8) && pba_offset.is_multiple_of(8));
        let size = u16::try_from(self.entries.len() - 1).expect("at most 2048 entries");
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = MSIX_CAP_ID;
        cap[2..4].copy_from_slice(&size.to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let mut mask = [0u8; MSIX_CAP_LEN];
        mask[3] = 0xc0;
        (cap, mask)
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Takes the enable and function-mask bits from a Message Control value; returns whether
    /// either changed.
    pub fn set_control(&mut self, control: u16) -> bool {
        let enabled = control & MSIX_ENABLE != 0;
        let masked = control & MSIX_FUNCTION_MASK != 0;
        let changed = enabled != self.enabled || masked != self.function_masked;
        self.enabled = enabled;
        self.function_masked = masked;
        changed
    }

    pub fn entry(&self, vector: usize) -> Option<&MsixEntry> {
        self.entries.get(vector)
    }

    /// Whether `vector` may deliver: MSI-X on, function and vector unmasked.
    pub fn is_active(&self, vector: usize) -> bool {
        self.enabled
            && !self.function_masked
            && self.entries.get(vector).is_some_and(|e| !e.masked())
    }

    /// A guest read of the table at `offset` (any width; bytes past the table read 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(u64::try_from(i).unwrap_or(u64::MAX))
                .and_then(|o| self.table_byte(o))
                .unwrap_or(0);
        }
    }

    fn locate(&self, offset: u64) -> Option<(usize, usize, usize)> {
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        if entry >= self.entries.len() {
            return None;
        }
        let within = usize::try_from(offset % MSIX_ENTRY_SIZE).ok()?;
        Some((entry, within / 4, within % 4))
    }

    fn table_byte(&self, offset: u64) -> Option<u8> {
        let (entry, field, byte) = self.locate(offset)?;
        Some(self.entries[entry].field(field).to_le_bytes()[byte])
    }

    /// A guest write to the table at `offset`; returns the entries it changed, in order.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut changed = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let Some((entry, field, byte)) = offset
                .checked_add(u64::try_from(i).unwrap_or(u64::MAX))
                .and_then(|o| self.locate(o))
            else {
                continue;
            };
            let e = &mut self.entries[entry];
            let mut bytes = e.field(field).to_le_bytes();
            bytes[byte] = b;
            let before = *e;
            e.set_field(field, u32::from_le_bytes(bytes));
            if *e != before && changed.last() != Some(&entry) {
                changed.push(entry);
            }
        }
        changed
    }

    /// A guest read of the pending-bit array at `offset`; `pending(v)` tells whether vector
    /// `v` has an interrupt held back by a mask.
    pub fn read_pba(&self, offset: u64, data: &mut [u8], pending: impl Fn(usize) -> bool) {
        for (i, b) in data.iter_mut().enumerate() {
            let Some(byte) = offset
                .checked_add(u64::try_from(i).unwrap_or(u64::MAX))
                .and_then(|o| usize::try_from(o).ok())
            else {
                *b = 0;
                continue;
            };
            *b = (0..8)
                .filter(|bit| {
                    let v = byte * 8 + bit;
                    v < self.entries.len() && pending(v)
                })
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_layout() {
        let t = MsixTable::new(3);
        let (cap, mask) = t.capability(0, 0x8000, 0x9000);
        assert_eq!(cap[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2, "table size is N-1");
        assert_eq!(
            u32::from_le_bytes(cap[4..8].try_into().unwrap()),
            0x8000,
            "BIR 0"
        );
        assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x9000);
        assert_eq!(mask, [0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn entries_reset_masked_and_take_any_width() {
        let mut t = MsixTable::new(2);
        let mut b = [0u8; 4];
        t.read_table(12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "masked at reset");
        assert!(!t.is_active(0));

        // Dword writes of address and data for vector 1, then a qword read back.
        assert_eq!(t.write_table(16, &0xfee0_1000u32.to_le_bytes()), vec![1]);
        assert_eq!(t.write_table(20, &0u32.to_le_bytes()), Vec::<usize>::new());
        assert_eq!(t.write_table(24, &0x4041u32.to_le_bytes()), vec![1]);
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        assert_eq!(
            t.entry(1).unwrap().message(),
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            }
        );
        // Reserved vector-control bits stay 0.
        t.write_table(28, &0xffff_fffeu32.to_le_bytes());
        t.read_table(28, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
        // A qword write spanning two entries reports both.
        assert_eq!(t.write_table(8, &[1, 0, 0, 0, 1, 0, 0, 0]), vec![0]);
        assert_eq!(t.write_table(12, &[0, 0, 0, 0, 0, 0, 0, 0]), vec![0, 1]);
        // Past the table: ignored, reads 0.
        assert!(t.write_table(32, &[0xff; 4]).is_empty());
        t.read_table(30, &mut b);
        assert_eq!(b, [0, 0, 0, 0]);
    }

    #[test]
    fn activity_needs_enable_and_no_masks() {
        let mut t = MsixTable::new(2);
        t.write_table(12, &0u32.to_le_bytes());
        assert!(!t.is_active(0), "MSI-X still disabled");
        assert!(t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK));
        assert!(!t.is_active(0), "function masked");
        assert!(!t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK));
        assert!(t.set_control(MSIX_ENABLE | 0x7ff));
        assert!(t.enabled() && !t.function_masked());
        assert!(t.is_active(0));
        assert!(!t.is_active(1), "vector 1 still masked");
        assert!(!t.is_active(2), "no such vector");
    }

    #[test]
    fn pending_bits() {
        let t = MsixTable::new(10);
        let mut b = [0u8; 8];
        t.read_pba(0, &mut b, |v| v == 1 || v == 9 || v == 63);
        assert_eq!(b, [0b10, 0b10, 0, 0, 0, 0, 0, 0]);
        let mut hi = [0u8; 4];
        t.read_pba(4, &mut hi, |_| true);
        assert_eq!(hi, [0; 4]);
    }
}
