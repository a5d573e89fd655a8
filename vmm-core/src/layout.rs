//! The guest's physical address map, I/O ports and interrupt lines: one place for every fixed
//! address the core, its ACPI tables and the boot code agree on.

/// GDT for the 64-bit boot entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty) for the boot entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT, four PDs (first 4 GiB with 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; RAM below it is usable, [EBDA, 1 MiB) is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x10000;
/// The x86 reset vector (F000:FFF0). Linux's last-resort reboot (`machine_real_restart`, the
/// default path on hardware-reduced ACPI without EFI) jumps here in real mode, so the boot code
/// puts a stub there that writes the reset register, as firmware would.
pub const RESET_VECTOR: u64 = 0xffff0;
/// The kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Guest RAM above this address is relocated above 4 GiB, leaving a hole for MMIO.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// End of the hole (4 GiB): RAM resumes here.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// The part of the hole that PCI BARs are allocated from.
pub const PCI_MMIO32_START: u64 = MEM_32BIT_GAP_START;
pub const PCI_MMIO32_END: u64 = IOAPIC_START; // exclusive
/// In-kernel IOAPIC and LAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// I/O ports the core emulates.
pub mod ports {
    /// i8042 data and command ports (only the 0xfe reset command is emulated).
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_COMMAND: u16 = 0x64;
    /// CMOS RTC index/data.
    pub const RTC: u16 = 0x70;
    pub const RTC_LEN: u16 = 2;
    /// POST diagnostic port; Linux uses it for I/O delays, so it is silently ignored.
    pub const POST: u16 = 0x80;
    /// 16550 UART COM1.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_LEN: u16 = 8;
    /// ACPI hardware-reduced sleep control (write) and status (read) registers.
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    pub const ACPI_SLEEP_LEN: u16 = 2;
    /// PCI configuration mechanism #1 address (0xcf8, dword) and data (0xcfc..0xcff); the byte
    /// at 0xcf9 is the reset control register, which also serves as the ACPI reset register.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
    pub const PCI_CONFIG_LEN: u16 = 8;
    pub const RESET_CONTROL: u16 = 0xcf9;
    /// Value the ACPI reset register write must carry (FADT RESET_VALUE).
    pub const RESET_VALUE: u8 = 0x06;
}

/// Interrupt lines (GSIs on the in-kernel IOAPIC).
pub mod irq {
    pub const COM1: u32 = 4;
    pub const RTC: u32 = 8;
    /// ACPI SCI (unused in hardware-reduced mode but the FADT names one).
    pub const SCI: u32 = 9;
    /// Number of IOAPIC pins; GSIs from here up are MSI routes.
    pub const IOAPIC_PINS: u32 = 24;
    /// First GSI handed out for MSI/MSI-X vectors.
    pub const MSI_GSI_START: u32 = IOAPIC_PINS;
}

/// Guest-physical RAM ranges for `ram_bytes` of RAM: everything below the 32-bit gap, then the
/// rest from 4 GiB up.
pub fn ram_ranges(ram_bytes: u64) -> Vec<(u64, u64)> {
    if ram_bytes <= MEM_32BIT_GAP_START {
        vec![(0, ram_bytes)]
    } else {
        vec![
            (0, MEM_32BIT_GAP_START),
            (RAM_64BIT_START, ram_bytes - MEM_32BIT_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_split_around_the_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(MEM_32BIT_GAP_START),
            vec![(0, MEM_32BIT_GAP_START)]
        );
        let four = 4u64 << 30;
        assert_eq!(
            ram_ranges(four),
            vec![
                (0, MEM_32BIT_GAP_START),
                (RAM_64BIT_START, four - MEM_32BIT_GAP_START)
            ]
        );
    }
}
