//! Direct Linux boot: kernel (bzImage or ELF vmlinux), initramfs and command line into guest
//! RAM, the zero page with its e820 map, and the identity page tables and GDT the 64-bit entry
//! point expects.

use crate::layout::{self, MEM_32BIT_GAP_START};
use crate::memory::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{
    self, Cmdline, KernelLoader, KernelLoaderResult, bzimage::BzImage, elf::Elf,
};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Boot protocol constants (Documentation/arch/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The 64-bit entry point of a bzImage sits 0x200 bytes into its protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `setup_header.xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;

/// Errors of loading the guest's boot payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the kernel is neither a bzImage ({bzimage}) nor an ELF vmlinux ({elf})")]
    KernelFormat {
        bzimage: loader::Error,
        elf: loader::Error,
    },
    #[error(
        "the bzImage has no 64-bit entry point (boot protocol {0:#x}, xloadflags lack XLF_KERNEL_64)"
    )]
    No64BitEntry(u16),
    #[error("cannot read the {what} image")]
    Read {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the initramfs of {size} bytes does not fit in guest RAM below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the command line into guest RAM")]
    CmdlineLoad(#[source] loader::Error),
    #[error("cannot write {what} into guest RAM")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("guest RAM is too small for the kernel ({0} bytes)")]
    RamTooSmall(u64),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// 64-bit entry point.
    pub rip: u64,
    /// Guest address of the zero page (passed in RSI).
    pub zero_page: u64,
}

/// Everything that goes into guest RAM before the first instruction runs.
pub struct BootPayload<'a> {
    pub kernel: &'a mut File,
    pub initramfs: Option<&'a mut File>,
    pub cmdline: &'a str,
    pub rsdp: GuestAddress,
}

/// Loads kernel, initramfs and command line and writes the zero page, page tables and GDT.
pub fn load(mem: &GuestMemoryMmap, payload: BootPayload<'_>) -> Result<BootEntry, BootError> {
    let ram_bytes: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    if ram_bytes < 64 << 20 {
        return Err(BootError::RamTooSmall(ram_bytes));
    }
    let (kernel, rip) = load_kernel(mem, payload.kernel)?;

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux carries no setup header: fill in what the kernel reads from it.
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;

    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(payload.cmdline)
        .map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(BootError::CmdlineLoad)?;
    params.hdr.cmd_line_ptr = u32::try_from(layout::CMDLINE_START).expect("below 4 GiB");
    params.hdr.cmdline_size = u32::try_from(payload.cmdline.len() + 1).unwrap_or(u32::MAX);

    if let Some(initrd) = payload.initramfs {
        let (addr, size) = load_initramfs(mem, initrd, &params, kernel.kernel_end)?;
        params.hdr.ramdisk_image = u32::try_from(addr).expect("initrd placed below 4 GiB");
        params.hdr.ramdisk_size = u32::try_from(size).expect("initrd smaller than 4 GiB");
    }

    params.acpi_rsdp_addr = payload.rsdp.0;
    fill_e820(&mut params, ram_bytes);
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::Write {
            what: "the zero page",
            source,
        })?;
    write_page_tables(mem)?;
    write_gdt(mem)?;
    write_reset_vector(mem)?;
    Ok(BootEntry {
        rip,
        zero_page: layout::ZERO_PAGE_START,
    })
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
) -> Result<(KernelLoaderResult, u64), BootError> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let bz = BzImage::load(mem, None, kernel, himem);
    match bz {
        Ok(res) => {
            let hdr = res.setup_header.expect("bzImage loader returns its header");
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(hdr.version));
            }
            let rip = res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET;
            Ok((res, rip))
        }
        Err(bzimage) => {
            kernel
                .seek(SeekFrom::Start(0))
                .map_err(|source| BootError::Read {
                    what: "kernel",
                    source,
                })?;
            match Elf::load(mem, None, kernel, himem) {
                Ok(res) => {
                    let rip = res.kernel_load.0;
                    Ok((res, rip))
                }
                Err(elf) => Err(BootError::KernelFormat { bzimage, elf }),
            }
        }
    }
}

/// Places the initramfs at the top of RAM below the 32-bit gap (and below the kernel's
/// `initrd_addr_max`), page-aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    params: &boot_params,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let size = initrd
        .metadata()
        .map_err(|source| BootError::Read {
            what: "initramfs",
            source,
        })?
        .len();
    let low_ram_end = mem.last_addr().0.min(MEM_32BIT_GAP_START - 1) + 1;
    let max = match params.hdr.initrd_addr_max {
        0 => 0x37ff_ffff, // boot protocol < 2.03 default
        m => u64::from(m),
    };
    let limit = low_ram_end.min(max + 1);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(layout::HIMEM_START))
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(|source| BootError::Read {
            what: "initramfs",
            source,
        })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|source| BootError::Write {
            what: "the initramfs",
            source,
        })?;
    Ok((addr, size))
}

/// The e820 map: low RAM, the reserved EBDA/BIOS area (which holds the ACPI tables), RAM from
/// 1 MiB to the gap, and RAM above 4 GiB.
fn fill_e820(params: &mut boot_params, ram_bytes: u64) {
    let mut entries = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for (start, len) in layout::ram_ranges(ram_bytes) {
        let end = start + len;
        let start = start.max(layout::HIMEM_START);
        entries.push((start, end - start, E820_RAM));
    }
    for (i, (addr, size, type_)) in entries.iter().copied().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = u8::try_from(entries.len()).expect("a handful of entries");
}

/// Identity-maps the first 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> 4 PDs.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let w = |v: u64, at: u64| {
        mem.write_obj(v, GuestAddress(at))
            .map_err(|source| BootError::Write {
                what: "the boot page tables",
                source,
            })
    };
    w(layout::PDPTE_START | 0x03, layout::PML4_START)?;
    for i in 0..4u64 {
        w(
            (layout::PDE_START + i * 0x1000) | 0x03,
            layout::PDPTE_START + i * 8,
        )?;
    }
    for i in 0..2048u64 {
        // Present | writable | page size (2 MiB).
        w((i << 21) | 0x83, layout::PDE_START + i * 8)?;
    }
    Ok(())
}

/// GDT entries of the boot CPU: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Builds a GDT descriptor from flags, base and limit (the usual VMM helper).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Real-mode code at the reset vector: `mov al, RESET_VALUE; mov dx, RESET_CONTROL; out dx, al;
/// hlt; jmp $-1`. A guest that jumps to the BIOS to reboot thereby asks the core for a reset.
#[rustfmt::skip]
fn reset_vector_stub() -> [u8; 9] {
    let [lo, hi] = layout::ports::RESET_CONTROL.to_le_bytes();
    [
        0xb0, layout::ports::RESET_VALUE,   // mov al, RESET_VALUE
        0xba, lo, hi,                       // mov dx, RESET_CONTROL
        0xee,                               // out dx, al
        0xf4,                               // hlt
        0xeb, 0xfd,                         // jmp $-1
    ]
}

// The stub sits between the ACPI tables and the end of the first MiB.
const _: () = assert!(layout::ACPI_START + layout::ACPI_SIZE <= layout::RESET_VECTOR);

fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&reset_vector_stub(), GuestAddress(layout::RESET_VECTOR))
        .map_err(|source| BootError::Write {
            what: "the reset vector",
            source,
        })
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, e) in (0u64..).zip(BOOT_GDT) {
        mem.write_obj(e, GuestAddress(layout::BOOT_GDT_START + i * 8))
            .map_err(|source| BootError::Write {
                what: "the boot GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|source| BootError::Write {
            what: "the boot IDT",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_splits_around_the_gap() {
        let mut p = boot_params::default();
        fill_e820(&mut p, 4 << 30);
        let e: Vec<_> = p.e820_table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            e,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, MEM_32BIT_GAP_START - 0x100000, E820_RAM),
                (1 << 32, (4 << 30) - MEM_32BIT_GAP_START, E820_RAM),
            ]
        );
        let total: u64 = e.iter().filter(|x| x.2 == E820_RAM).map(|x| x.1).sum();
        assert_eq!(total + 0x100000 - 0x9fc00, 4 << 30);
    }

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn reset_vector_stub_writes_the_reset_register() {
        let stub = reset_vector_stub();
        assert_eq!(stub, [0xb0, 0x06, 0xba, 0xf9, 0x0c, 0xee, 0xf4, 0xeb, 0xfd]);
        let end = layout::RESET_VECTOR + u64::try_from(stub.len()).unwrap();
        assert!(
            end <= 0x10_0000,
            "stub ends at {end:#x}, past the first MiB"
        );
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
        let path = std::env::temp_dir().join(format!("atoll-notakernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let mut f = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let err = load(
            &mem,
            BootPayload {
                kernel: &mut f,
                initramfs: None,
                cmdline: "console=ttyS0",
                rsdp: GuestAddress(0xe0000),
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
    }
}
