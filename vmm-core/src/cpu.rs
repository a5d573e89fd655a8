//! vCPU configuration: CPUID with a flat topology (one socket, N cores, one thread each), boot
//! MSRs, long-mode registers for the boot CPU, FPU and the local APIC's LINT pins.

use crate::boot::{BOOT_GDT, BootEntry};
use crate::layout;
use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;

/// Errors of vCPU configuration; each names the vCPU and the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("vCPU {cpu}: {step} failed")]
    Kvm {
        cpu: u32,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { cpu: u32, set: usize, wanted: usize },
    #[error("building the MSR list failed: {0:?}")]
    MsrList(vmm_sys_util::fam::Error),
}

// MSR numbers (Intel SDM vol. 4; AMD APM vol. 2 for the syscall ones).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

// CPUID bits.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;

// Control-register and EFER bits for the 64-bit entry.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Number of bits needed to hold values `0..n`.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adapts KVM's supported CPUID to vCPU `cpu` of `count`: APIC ids, topology leaves (Intel
/// 0x4/0xb/0x1f, AMD 0x8000_0001/0x8000_0008/0x8000_001e), the hypervisor bit and TSC-deadline.
pub fn patch_cpuid(cpuid: &mut CpuId, cpu: u32, count: u32, tsc_deadline: bool) {
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (cpu << 24) | (count.min(255) << 16) | (e.ebx & 0xffff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Cores sharing the package (EAX[31:26]) and threads sharing this cache
                // (EAX[25:14]): every cache is per core except the last level.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                // Level 0: SMT (1 thread per core); level 1: cores.
                e.edx = cpu;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0001 => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // NC = cores - 1, ApicIdCoreIdSize.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            0x8000_001e => {
                e.eax = cpu;
                e.ebx = cpu & 0xff; // compute unit id; one thread per unit
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

/// MSR values every vCPU starts with.
fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
    .map_err(CpuError::MsrList)
}

/// Configures vCPU `cpu`: CPUID, MSRs, FPU and LAPIC for all; registers for the boot CPU only
/// (application processors wait for INIT/SIPI in the in-kernel LAPIC).
pub fn configure(
    vcpu: &VcpuFd,
    cpu: u32,
    cpuid: &CpuId,
    entry: Option<BootEntry>,
) -> Result<(), CpuError> {
    let kvm = |step| move |source| CpuError::Kvm { cpu, step, source };
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let msrs = boot_msrs()?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != msrs.as_slice().len() {
        return Err(CpuError::Msrs {
            cpu,
            set,
            wanted: msrs.as_slice().len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    set_lint(vcpu).map_err(kvm("KVM_SET_LAPIC"))?;
    if let Some(entry) = entry {
        set_long_mode(vcpu, entry).map_err(kvm("KVM_SET_SREGS/REGS"))?;
    }
    Ok(())
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic()?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut reg = [0u8; 4];
        for (d, s) in reg.iter_mut().zip(&lapic.regs[off..off + 4]) {
            *d = s.to_ne_bytes()[0];
        }
        let v = (u32::from_le_bytes(reg) & !0x700) | (mode << 8);
        for (d, s) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
            *d = i8::from_ne_bytes([s]);
        }
    }
    vcpu.set_lapic(&lapic)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bits = |shift: u32, mask: u64| -> u8 {
        u8::try_from((entry >> shift) & mask).expect("masked to fit")
    };
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = u32::try_from((entry & 0xffff) | ((entry >> 32) & 0xf_0000)).expect("20 bits");
    let g = bits(55, 1);
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: bits(40, 0xf),
        present: bits(47, 1),
        dpl: bits(45, 3),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g,
        avl: bits(52, 1),
        unusable: u8::from(bits(47, 1) == 0),
        padding: 0,
    }
}

fn set_long_mode(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = u16::try_from(BOOT_GDT.len() * 8 - 1).expect("small GDT");
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: entry.zero_page,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn topology_leaves_describe_n_cores() {
        let mut c =
            CpuId::from_entries(&[leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x8000_0008, 0)])
                .unwrap();
        patch_cpuid(&mut c, 2, 4, true);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2, "initial APIC id");
        assert_eq!((s[0].ebx >> 16) & 0xff, 4, "logical processors per package");
        assert_ne!(s[0].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(s[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((s[1].ebx, s[1].ecx >> 8, s[1].edx), (1, 1, 2), "SMT level");
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx >> 8), (2, 4, 2), "core level");
        assert_eq!(s[3].ecx & 0xff, 3);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(
            (cs.l, cs.db, cs.present, cs.s, cs.type_, cs.selector),
            (1, 0, 1, 1, 0xb, 8)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
    }
}
