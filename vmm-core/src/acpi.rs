//! ACPI tables for a directly booted Linux guest (no firmware).
//!
//! The table set, written into guest memory at [`layout::ACPI_START`]:
//!
//! ```text
//! RSDP (rev 2) -> XSDT -> FADT (rev 6, hardware-reduced) -> DSDT
//!                      -> MADT (LAPICs, IOAPIC, IRQ overrides, LAPIC NMI)
//! ```
//!
//! The platform is ACPI *hardware-reduced*: there are no PM1 event/control blocks, no GPEs and
//! no PM timer. Power-off goes through the FADT sleep control register (port
//! [`ports::ACPI_SLEEP_CONTROL`]): Linux writes `(SLP_TYP << 2) | SLP_EN` with `SLP_EN = 1 << 5`
//! and `SLP_TYP` taken from the DSDT's `\_S5_` package, which holds [`S5_SLEEP_TYPE`]. Reset
//! goes through the FADT reset register, the byte at [`ports::RESET_CONTROL`] with
//! [`ports::RESET_VALUE`].
//!
//! The DSDT describes the PCI root bridge `\_SB_.PCI0` (Linux only scans PCI buses that have a
//! root bridge in the namespace), COM1, the CMOS RTC and a pvpanic device. Callers may add
//! further devices under `\_SB_` with [`create_acpi_tables_with_devices`].

#![forbid(unsafe_code)]

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::layout::{self, irq, ports};

/// `SLP_TYP` value of the `\_S5_` (soft-off) package. The sleep control register decodes a
/// write of `(S5_SLEEP_TYPE << 2) | (1 << 5)` (= 0x34) as power-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// I/O port of the pvpanic device (ACPI `_HID` "QEMU0001", one byte).
pub const PVPANIC_PORT: u16 = 0x505;

/// Most vCPUs the tables can describe: xAPIC ids are 8 bits, 0xff is the broadcast id and the
/// IOAPIC takes the id right after the last vCPU.
pub const MAX_CPUS: u32 = 254;

/// OEM identification carried by every table.
const OEM_ID: [u8; 6] = *b"ATOLL ";
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"ATOLLVMM";

/// Every table starts on this boundary (the RSDP needs 16 bytes, the others 8).
const TABLE_ALIGN: u64 = 16;

/// Size of the common system description table header.
const SDT_HEADER_LEN: u32 = 36;

/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`). The 8042 bit (1 << 1) stays clear so
/// Linux does not probe an i8042 (the core only emulates its reset command) and "VGA not
/// present" (1 << 2) is set: atoll has no legacy VGA. CMOS RTC and MSI stay available.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// The PCI root bridge forwards I/O ports [0, 0xcf8) and [0xd00, 0x10000); the config
/// mechanism ports 0xcf8..0xd00 stay with the host bridge, as on PC chipsets.
const PCI_IO_HIGH_START: u16 = 0x0d00;

/// MADT flags: PCAT_COMPAT (a dual 8259 PIC is present; KVM's in-kernel irqchip has one).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt-controller structure types the crate does not provide.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity in bits 0-1 (1 = active high), trigger mode in bits 2-3
/// (1 = edge, 3 = level).
const MPS_INTI_ACTIVE_HIGH: u16 = 0b01;
const MPS_INTI_EDGE: u16 = 0b01 << 2;
const MPS_INTI_LEVEL: u16 = 0b11 << 2;
/// "All processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe {0} vCPUs in the MADT: between 1 and {MAX_CPUS} are supported")]
    CpuCount(u32),
    #[error(
        "the {table} table would end at {end:#x}, past the ACPI region [{start:#x}, {limit:#x})",
        start = layout::ACPI_START,
        limit = layout::ACPI_START + layout::ACPI_SIZE
    )]
    RegionFull { table: &'static str, end: u64 },
    #[error("{what} ({value:#x}) does not fit its ACPI field")]
    FieldOverflow { what: &'static str, value: u64 },
    #[error("cannot write the {table} table ({len} bytes) at guest address {addr:#x}: {source}")]
    Write {
        table: &'static str,
        addr: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
}

/// Writes the full table set for `num_cpus` vCPUs at [`layout::ACPI_START`] and returns the
/// RSDP's address (for `boot_params.acpi_rsdp_addr`).
pub fn create_acpi_tables(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<GuestAddress, AcpiError> {
    create_acpi_tables_with_devices(mem, num_cpus, &[])
}

/// Like [`create_acpi_tables`], with `extra_devices` (AML `Device` objects built with
/// `acpi_tables::aml`) added to the DSDT's `\_SB_` scope after the built-in devices.
pub fn create_acpi_tables_with_devices(
    mem: &GuestMemoryMmap,
    num_cpus: u32,
    extra_devices: &[&dyn Aml],
) -> Result<GuestAddress, AcpiError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(num_cpus));
    }

    let rsdp_addr = layout::ACPI_START;
    let mut region = Region::new(rsdp_addr + to_u64(Rsdp::len()));

    let dsdt_addr = region.place("DSDT", build_dsdt(extra_devices)?)?;
    let fadt_addr = region.place("FADT", build_fadt(dsdt_addr)?)?;
    let madt_addr = region.place("MADT", build_madt(num_cpus)?)?;

    let mut xsdt = XSDT::new(OEM_ID, *b"ATOLXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = region.place("XSDT", aml_bytes(&xsdt))?;

    region.tables.push(Table {
        name: "RSDP",
        addr: rsdp_addr,
        bytes: aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    });

    // Clear the whole region first so nothing from an earlier boot of this memory survives.
    let zeros = vec![0u8; usize::try_from(layout::ACPI_SIZE).expect("ACPI_SIZE fits usize")];
    write(mem, "ACPI region", layout::ACPI_START, &zeros)?;
    for table in &region.tables {
        write(mem, table.name, table.addr, &table.bytes)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

/// One table, placed.
struct Table {
    name: &'static str,
    addr: u64,
    bytes: Vec<u8>,
}

/// Bump allocator over the ACPI region.
struct Region {
    next: u64,
    tables: Vec<Table>,
}

impl Region {
    fn new(start: u64) -> Self {
        Self {
            next: start,
            tables: Vec::new(),
        }
    }

    /// Assigns `bytes` the next aligned address in the region and returns that address.
    fn place(&mut self, name: &'static str, bytes: Vec<u8>) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + to_u64(bytes.len());
        if end > layout::ACPI_START + layout::ACPI_SIZE {
            return Err(AcpiError::RegionFull { table: name, end });
        }
        self.next = end;
        self.tables.push(Table { name, addr, bytes });
        Ok(addr)
    }
}

fn write(
    mem: &GuestMemoryMmap,
    table: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| AcpiError::Write {
            table,
            addr,
            len: bytes.len(),
            source,
        })
}

fn to_u64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits u64 on x86_64")
}

fn aml_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    aml.to_aml_bytes(&mut bytes);
    bytes
}

fn field<T: TryFrom<u64>>(what: &'static str, value: u64) -> Result<T, AcpiError> {
    T::try_from(value).map_err(|_| AcpiError::FieldOverflow { what, value })
}

/// An 8-bit System I/O register.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_fadt(dsdt_addr: u64) -> Result<Vec<u8>, AcpiError> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"ATOLFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = field::<u16>("SCI interrupt", u64::from(irq::SCI))?.into();
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.reset_reg = io_byte_register(ports::RESET_CONTROL);
    fadt.reset_value = ports::RESET_VALUE;
    fadt.sleep_control_reg = io_byte_register(ports::ACPI_SLEEP_CONTROL);
    fadt.sleep_status_reg = io_byte_register(ports::ACPI_SLEEP_STATUS);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    Ok(aml_bytes(&fadt.finalize()))
}

/// MADT Interrupt Source Override: ISA `source` IRQ delivered on `gsi`.
fn interrupt_source_override(source: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut s = [0u8; 10];
    s[0] = MADT_INTERRUPT_SOURCE_OVERRIDE;
    s[1] = 10; // length
    s[2] = 0; // bus: ISA
    s[3] = source;
    s[4..8].copy_from_slice(&gsi.to_le_bytes());
    s[8..10].copy_from_slice(&flags.to_le_bytes());
    s
}

/// MADT Local APIC NMI: NMI wired to `lint` (0 or 1) of `processor_uid`'s local APIC.
fn local_apic_nmi(processor_uid: u8, flags: u16, lint: u8) -> [u8; 6] {
    let mut s = [0u8; 6];
    s[0] = MADT_LOCAL_APIC_NMI;
    s[1] = 6; // length
    s[2] = processor_uid;
    s[3..5].copy_from_slice(&flags.to_le_bytes());
    s[5] = lint;
    s
}

fn build_madt(num_cpus: u32) -> Result<Vec<u8>, AcpiError> {
    let mut madt = Sdt::new(*b"APIC", SDT_HEADER_LEN + 8, 5, OEM_ID, *b"ATOLAPIC", 1);
    madt.write_u32(36, field("local APIC address", layout::LAPIC_START)?);
    madt.write_u32(40, MADT_PCAT_COMPAT);

    for cpu in 0..num_cpus {
        let id = field::<u8>("local APIC id", u64::from(cpu))?;
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    let ioapic_id = field::<u8>("IOAPIC id", u64::from(num_cpus))?;
    madt.append_slice(&aml_bytes(&IoApic::new(
        ioapic_id,
        field("IOAPIC address", layout::IOAPIC_START)?,
        0,
    )));
    // The PIT (ISA IRQ 0) is wired to IOAPIC pin 2, as on PC hardware and KVM's irqchip.
    madt.append_slice(&interrupt_source_override(
        0,
        2,
        MPS_INTI_ACTIVE_HIGH | MPS_INTI_EDGE,
    ));
    // The SCI is level-triggered, active high (KVM's IOAPIC has no polarity inversion).
    let sci = field::<u8>("SCI interrupt", u64::from(irq::SCI))?;
    madt.append_slice(&interrupt_source_override(
        sci,
        irq::SCI,
        MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL,
    ));
    // NMI on LINT1 of every local APIC, polarity and trigger as the bus conforms.
    madt.append_slice(&local_apic_nmi(ALL_PROCESSORS, 0, 1));
    Ok(madt.as_slice().to_vec())
}

fn build_dsdt(extra_devices: &[&dyn Aml]) -> Result<Vec<u8>, AcpiError> {
    // \_S5_: SLP_TYPa, SLP_TYPb.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]),
    );

    // PCI root bridge: bus 0, config mechanism #1 ports, I/O windows around them, the 32-bit
    // MMIO hole.
    let pci_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let pci_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let pci_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let pci_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let bus_range = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = aml::IO::new(
        ports::PCI_CONFIG_ADDRESS,
        ports::PCI_CONFIG_ADDRESS,
        1,
        field("PCI config port range", u64::from(ports::PCI_CONFIG_LEN))?,
    );
    let io_low = aml::AddressSpace::new_io(0u16, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = aml::AddressSpace::new_io(PCI_IO_HIGH_START, 0xffffu16, None);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        field::<u32>("PCI MMIO window start", layout::PCI_MMIO32_START)?,
        field::<u32>("PCI MMIO window end", layout::PCI_MMIO32_END - 1)?,
        None,
    );
    let pci_crs_template =
        aml::ResourceTemplate::new(vec![&bus_range, &config_ports, &io_low, &io_high, &mmio32]);
    let pci_crs = aml::Name::new("_CRS".into(), &pci_crs_template);
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![&pci_hid, &pci_uid, &pci_seg, &pci_bbn, &pci_crs],
    );

    // COM1.
    let com1_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_irq = aml::Interrupt::new(true, true, false, false, irq::COM1);
    let com1_io = aml::IO::new(
        ports::COM1,
        ports::COM1,
        1,
        field("COM1 port range", u64::from(ports::COM1_LEN))?,
    );
    let com1_crs_template = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs_template);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    // CMOS RTC.
    let rtc_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
    let rtc_irq = aml::Interrupt::new(true, true, false, false, irq::RTC);
    let rtc_io = aml::IO::new(
        ports::RTC,
        ports::RTC,
        1,
        field("RTC port range", u64::from(ports::RTC_LEN))?,
    );
    let rtc_crs_template = aml::ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let rtc_crs = aml::Name::new("_CRS".into(), &rtc_crs_template);
    let rtc = aml::Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs]);

    // pvpanic.
    let pvpanic_hid = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvpanic_sta = aml::Name::new("_STA".into(), &0x0fu8);
    let pvpanic_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvpanic_crs_template = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    let pvpanic_crs = aml::Name::new("_CRS".into(), &pvpanic_crs_template);
    let pvpanic = aml::Device::new(
        "PEVT".into(),
        vec![&pvpanic_hid, &pvpanic_sta, &pvpanic_crs],
    );

    let mut sb_children: Vec<&dyn Aml> = vec![&pci0, &com1, &rtc, &pvpanic];
    sb_children.extend_from_slice(extra_devices);
    let sb = aml::Scope::new("\\_SB_".into(), sb_children);

    // DSDT revision 2: 64-bit AML integers.
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        2,
        OEM_ID,
        *b"ATOLDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&aml_bytes(&s5));
    dsdt.append_slice(&aml_bytes(&sb));
    Ok(dsdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn guest_memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr))
            .expect("read guest memory");
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads the system description table at `addr`, checking its signature, that it lies
    /// inside the ACPI region and that its checksum is valid.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(
            &header[0..4],
            signature,
            "signature at {addr:#x}: {:?}",
            String::from_utf8_lossy(&header[0..4])
        );
        let len = u32_at(&header, 4);
        assert!(len >= 36, "{signature:?} length {len}");
        assert!(addr >= layout::ACPI_START);
        assert!(addr + u64::from(len) <= layout::ACPI_START + layout::ACPI_SIZE);
        let table = read(mem, addr, usize::try_from(len).unwrap());
        assert_eq!(sum(&table), 0, "{signature:?} checksum");
        assert_eq!(&table[10..16], &OEM_ID);
        table
    }

    /// The tables reachable from the RSDP, by signature, with their addresses.
    struct Tables {
        rsdp: Vec<u8>,
        xsdt: (u64, Vec<u8>),
        fadt: (u64, Vec<u8>),
        madt: (u64, Vec<u8>),
        dsdt: (u64, Vec<u8>),
    }

    fn walk(mem: &GuestMemoryMmap, rsdp_addr: GuestAddress) -> Tables {
        let rsdp = read(mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp_addr.0 % 16, 0, "RSDP must be 16-byte aligned");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(&rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(&rsdp[9..15], &OEM_ID);

        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(mem, xsdt_addr, b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(xsdt.len(), 36 + 8 * entries.len());

        let mut fadt = None;
        let mut madt = None;
        for &addr in &entries {
            let sig = read(mem, addr, 4);
            match &sig[..] {
                b"FACP" => {
                    assert!(fadt.is_none(), "two FADTs");
                    fadt = Some((addr, read_table(mem, addr, b"FACP")));
                }
                b"APIC" => {
                    assert!(madt.is_none(), "two MADTs");
                    madt = Some((addr, read_table(mem, addr, b"APIC")));
                }
                other => panic!("unexpected XSDT entry {:?}", String::from_utf8_lossy(other)),
            }
        }
        let fadt = fadt.expect("XSDT lists a FADT");
        let madt = madt.expect("XSDT lists a MADT");

        assert_eq!(u32_at(&fadt.1, 40), 0, "32-bit DSDT pointer unused");
        let dsdt_addr = u64_at(&fadt.1, 140);
        let dsdt = read_table(mem, dsdt_addr, b"DSDT");

        Tables {
            rsdp,
            xsdt: (xsdt_addr, xsdt),
            fadt,
            madt,
            dsdt: (dsdt_addr, dsdt),
        }
    }

    /// A 12-byte generic address structure at `off`: (space, width, offset, access, address).
    fn gas_at(b: &[u8], off: usize) -> (u8, u8, u8, u8, u64) {
        (
            b[off],
            b[off + 1],
            b[off + 2],
            b[off + 3],
            u64_at(b, off + 4),
        )
    }

    #[test]
    fn chain_from_rsdp_is_complete_and_checksummed() {
        let mem = guest_memory(2 << 20);
        let rsdp_addr = create_acpi_tables(&mem, 2).expect("tables");
        assert_eq!(rsdp_addr, GuestAddress(layout::ACPI_START));
        let t = walk(&mem, rsdp_addr);

        // No two tables overlap.
        let mut spans = [
            (rsdp_addr.0, t.rsdp.len()),
            (t.xsdt.0, t.xsdt.1.len()),
            (t.fadt.0, t.fadt.1.len()),
            (t.madt.0, t.madt.1.len()),
            (t.dsdt.0, t.dsdt.1.len()),
        ];
        spans.sort_unstable();
        for pair in spans.windows(2) {
            let (a, a_len) = pair[0];
            let (b, _) = pair[1];
            assert!(
                a + to_u64(a_len) <= b,
                "tables at {a:#x} and {b:#x} overlap"
            );
        }
        let last = spans.last().unwrap();
        assert!(last.0 + to_u64(last.1) <= layout::ACPI_START + layout::ACPI_SIZE);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, 1).unwrap());
        let fadt = &t.fadt.1;
        assert_eq!(fadt.len(), 276, "FADT length for revision 6");
        assert_eq!(fadt[8], 6, "FADT major revision");
        assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
        let boot_arch = u16_at(fadt, 109);
        assert_eq!(boot_arch & (1 << 1), 0, "8042 flag must be clear");
        assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
        assert_eq!(boot_arch & (1 << 3), 0, "MSI must stay enabled");
        assert_eq!(boot_arch & (1 << 5), 0, "the CMOS RTC is present");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            gas_at(fadt, 116),
            (1, 8, 0, 1, u64::from(ports::RESET_CONTROL)),
            "RESET_REG"
        );
        assert_eq!(fadt[128], ports::RESET_VALUE);
        assert_eq!(fadt[131], 5, "FADT minor revision");
        assert_eq!(gas_at(fadt, 244), (1, 8, 0, 1, 0x600), "SLEEP_CONTROL_REG");
        assert_eq!(gas_at(fadt, 256), (1, 8, 0, 1, 0x601), "SLEEP_STATUS_REG");
        assert_eq!(&fadt[268..276], b"ATOLLVMM");
        // No FACS on a hardware-reduced platform, no PM1 blocks.
        assert_eq!(u32_at(fadt, 36), 0);
        assert_eq!(u64_at(fadt, 132), 0);
        assert_eq!(u32_at(fadt, 64), 0, "PM1a_CNT_BLK");
    }

    /// MADT structures as (type, bytes).
    fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let len = usize::from(madt[off + 1]);
            assert!(
                len >= 2 && off + len <= madt.len(),
                "bad MADT entry at {off}"
            );
            out.push((madt[off], madt[off..off + len].to_vec()));
            off += len;
        }
        out
    }

    fn check_madt(num_cpus: u32) {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, num_cpus).unwrap());
        let madt = &t.madt.1;
        assert_eq!(u64::from(u32_at(madt, 36)), layout::LAPIC_START);
        assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
        let structures = madt_structures(madt);

        let lapics: Vec<&Vec<u8>> = structures
            .iter()
            .filter(|(ty, _)| *ty == 0)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(lapics.len(), usize::try_from(num_cpus).unwrap());
        for (i, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic.len(), 8);
            assert_eq!(usize::from(lapic[2]), i, "processor uid");
            assert_eq!(usize::from(lapic[3]), i, "APIC id");
            assert_eq!(u32_at(lapic, 4) & 1, 1, "enabled");
        }

        let ioapics: Vec<&Vec<u8>> = structures
            .iter()
            .filter(|(ty, _)| *ty == 1)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(ioapics.len(), 1);
        let ioapic = ioapics[0];
        assert_eq!(
            u32::from(ioapic[2]),
            num_cpus,
            "IOAPIC id after the LAPIC ids"
        );
        assert_eq!(u64::from(u32_at(ioapic, 4)), layout::IOAPIC_START);
        assert_eq!(u32_at(ioapic, 8), 0, "GSI base");

        let overrides: Vec<(u8, u32, u16)> = structures
            .iter()
            .filter(|(ty, _)| *ty == 2)
            .map(|(_, b)| {
                assert_eq!(b.len(), 10);
                assert_eq!(b[2], 0, "ISA bus");
                (b[3], u32_at(b, 4), u16_at(b, 8))
            })
            .collect();
        assert!(
            overrides.contains(&(0, 2, 0b0101)),
            "IRQ0 -> GSI2 edge/high: {overrides:?}"
        );

        let nmis: Vec<&Vec<u8>> = structures
            .iter()
            .filter(|(ty, _)| *ty == 4)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0].len(), 6);
        assert_eq!(nmis[0][2], 0xff, "all processors");
        assert_eq!(nmis[0][5], 1, "LINT1");
    }

    #[test]
    fn madt_one_cpu() {
        check_madt(1);
    }

    #[test]
    fn madt_eight_cpus() {
        check_madt(8);
    }

    #[test]
    fn madt_max_cpus() {
        check_madt(MAX_CPUS);
    }

    #[test]
    fn dsdt_s5_package_holds_the_s5_sleep_type() {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, 1).unwrap());
        let aml = &t.dsdt.1[36..];
        let at = aml
            .windows(5)
            .position(|w| w == b"\x08_S5_")
            .expect("Name(_S5_, ...) in the DSDT");
        // NameOp "_S5_" PackageOp PkgLength NumElements BytePrefix 5 BytePrefix 5
        assert_eq!(&aml[at + 5..at + 12], &[0x12, 0x06, 0x02, 0x0a, 5, 0x0a, 5]);
        assert_eq!(S5_SLEEP_TYPE, 5);
    }

    #[test]
    fn bad_cpu_counts_are_rejected() {
        let mem = guest_memory(2 << 20);
        for n in [0, MAX_CPUS + 1, 1000] {
            match create_acpi_tables(&mem, n) {
                Err(AcpiError::CpuCount(got)) => assert_eq!(got, n),
                other => panic!("{n} vCPUs: {other:?}"),
            }
        }
    }

    #[test]
    fn memory_too_small_for_the_region_is_an_error() {
        let mem = guest_memory(512 << 10);
        let err = create_acpi_tables(&mem, 1).unwrap_err();
        assert!(matches!(err, AcpiError::Write { .. }), "{err:?}");
    }

    #[test]
    fn oversized_dsdt_is_rejected() {
        let mem = guest_memory(2 << 20);
        let blob = aml::BufferData::new(vec![0xaa; usize::try_from(layout::ACPI_SIZE).unwrap()]);
        let name = aml::Name::new("BLOB".into(), &blob);
        let err = create_acpi_tables_with_devices(&mem, 1, &[&name]).unwrap_err();
        assert!(
            matches!(err, AcpiError::RegionFull { table: "DSDT", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn stale_bytes_in_the_region_are_cleared() {
        let mem = guest_memory(2 << 20);
        let junk = vec![0x5au8; usize::try_from(layout::ACPI_SIZE).unwrap()];
        mem.write_slice(&junk, GuestAddress(layout::ACPI_START))
            .unwrap();
        walk(&mem, create_acpi_tables(&mem, 4).unwrap());
        let tail = read(&mem, layout::ACPI_START + layout::ACPI_SIZE - 4096, 4096);
        assert!(tail.iter().all(|&b| b == 0));
    }

    /// A scratch directory removed on drop.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "atoll-acpi-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            Self(dir)
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `iasl -d` on `table` (a complete ACPI table) and returns the disassembly. Fails
    /// loudly when iasl is missing or reports errors.
    fn iasl_disassemble(dir: &Path, name: &str, table: &[u8]) -> String {
        let input = dir.join(format!("{name}.dat"));
        std::fs::write(&input, table).expect("write table file");
        let output = match Command::new("iasl")
            .arg("-d")
            .arg(&input)
            .current_dir(dir)
            .output()
        {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "iasl not found: install acpica-tools (apt-get install -y acpica-tools) to run \
                 the ACPI interoperability tests"
            ),
            Err(e) => panic!("cannot run iasl: {e}"),
        };
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "iasl -d {name} failed:\n{log}");
        for bad in ["Error", "error", "Warning", "Invalid", "Incorrect"] {
            assert!(
                !log.contains(bad),
                "iasl -d {name} reported {bad:?}:\n{log}"
            );
        }
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
            .unwrap_or_else(|e| panic!("iasl wrote no {name}.dsl ({e}):\n{log}"));
        for bad in ["Incorrect", "Invalid", "**** Unknown"] {
            assert!(!dsl.contains(bad), "{name}.dsl contains {bad:?}:\n{dsl}");
        }
        dsl
    }

    /// Compiles `{name}.dsl` in `dir` with iasl, optimisations off (`-oa`) so names keep the
    /// form we emit, and returns the AML.
    fn iasl_recompile(dir: &Path, name: &str) -> Vec<u8> {
        let output = Command::new("iasl")
            .args(["-oa", "-p", "recompiled"])
            .arg(format!("{name}.dsl"))
            .current_dir(dir)
            .output()
            .expect("run iasl");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "iasl {name}.dsl failed:\n{log}");
        assert!(
            log.contains("0 Errors, 0 Warnings, 0 Remarks"),
            "iasl {name}.dsl complained:\n{log}"
        );
        std::fs::read(dir.join("recompiled.aml")).expect("recompiled AML")
    }

    /// The iasl checks do fail on a broken table.
    #[test]
    #[should_panic(expected = "Incorrect")]
    fn iasl_check_catches_a_bad_checksum() {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, 1).unwrap());
        let mut dsdt = t.dsdt.1;
        dsdt[9] ^= 1;
        let dir = ScratchDir::new("bad-checksum");
        iasl_disassemble(&dir.0, "dsdt", &dsdt);
    }

    #[test]
    fn iasl_disassembles_the_dsdt() {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, 2).unwrap());
        let dir = ScratchDir::new("dsdt");
        let dsl = iasl_disassemble(&dir.0, "dsdt", &t.dsdt.1);
        for needle in [
            "_S5_",
            "PNP0A03",
            "PNP0501",
            "PNP0B00",
            "QEMU0001",
            "WordBusNumber",
            "DWordMemory",
            "0xC0000000",
            "0xFEBFFFFF",
            "0x0CF8",
            "0x0CF7",
            "0x0D00",
            "0x03F8",
            "0x0505",
            "_SEG",
            "_BBN",
        ] {
            assert!(
                dsl.contains(needle),
                "{needle} missing from the DSDT:\n{dsl}"
            );
        }
        // What iasl read back compiles to exactly our AML (header aside: the compiler id
        // differs).
        let recompiled = iasl_recompile(&dir.0, "dsdt");
        assert_eq!(
            recompiled[36..],
            t.dsdt.1[36..],
            "iasl's reading of the DSDT recompiles to different AML:\n{dsl}"
        );
    }

    #[test]
    fn iasl_accepts_fadt_and_madt() {
        let mem = guest_memory(2 << 20);
        let t = walk(&mem, create_acpi_tables(&mem, 8).unwrap());
        let dir = ScratchDir::new("fadt-madt");

        let fadt = iasl_disassemble(&dir.0, "facp", &t.fadt.1);
        for needle in [
            "Hardware Reduced (V5) : 1",
            "Reset Register Supported (V2) : 1",
            "Boot Flags (decoded below) : 0004",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
            "Address : 0000000000000CF9",
            "Hypervisor ID : 4D4D564C4C4F5441", // "ATOLLVMM", little-endian
        ] {
            assert!(
                fadt.contains(needle),
                "{needle} missing from the FADT:\n{fadt}"
            );
        }

        let madt = iasl_disassemble(&dir.0, "apic", &t.madt.1);
        let lapics = madt.matches("Processor Local APIC").count();
        assert_eq!(lapics, 8, "local APICs in the MADT:\n{madt}");
        for needle in ["I/O APIC", "Interrupt Source Override", "Local APIC NMI"] {
            assert!(
                madt.contains(needle),
                "{needle} missing from the MADT:\n{madt}"
            );
        }
    }
}
