//! vmm-core's seccomp allow-list, installed by `ipc::sandbox::lockdown` right after the core
//! has taken its control socket, before it reads `Start`, maps guest RAM or starts a thread:
//! everything the core does with guest data runs under it.
//!
//! Provenance: the calls of `vm.rs`, `memory.rs`, `boot.rs` (`linux-loader` reading the
//! kernel and initramfs descriptors), `cpu.rs`, `vcpu.rs` (vCPU threads, the kick signal),
//! `irq_routing.rs`, `platform.rs` and `devices/` (the console socket and its input thread),
//! `virtio/` (ioeventfds, irqfds, MSI routes, the `vhost` frontend's messages with
//! descriptors, its watchdog threads that shut a stuck connection down) and `ipc::channel`;
//! every KVM ioctl `kvm-ioctls` issues for the methods the core calls; then checked by booting
//! the tiny guests of `tests/tests/tiny_guest.rs` through the real launcher with the filter in
//! log mode and reading the kernel's seccomp audit records, and by `strace -f` of the
//! vhost-user frontend tests (`virtio/tests/vhost_user.rs`) for the calls a real guest's
//! virtio devices make at run time, which the tiny guests do not reach.

use ipc::sandbox::policy::Policy;
use kvm_bindings::{
    kvm_cpuid2, kvm_fpu, kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_lapic_state,
    kvm_msi, kvm_msrs, kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
};

/// The KVM ioctl type (`KVMIO`).
const KVMIO: u32 = 0xae;

/// `_IOC(dir, KVMIO, nr, size)` (include/uapi/asm-generic/ioctl.h).
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    assert!(size < 1 << 14, "ioctl argument too large for _IOC");
    // The assertion above keeps the size within the 14-bit field.
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (dir << 30) | (size << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u32) -> u32 {
    ioc(0, nr, 0)
}
const fn iow<T>(nr: u32) -> u32 {
    ioc(1, nr, size_of::<T>())
}
const fn ior<T>(nr: u32) -> u32 {
    ioc(2, nr, size_of::<T>())
}
const fn iowr<T>(nr: u32) -> u32 {
    ioc(3, nr, size_of::<T>())
}

// /dev/kvm
const KVM_GET_API_VERSION: u32 = io(0x00);
const KVM_CREATE_VM: u32 = io(0x01);
const KVM_CHECK_EXTENSION: u32 = io(0x03);
const KVM_GET_VCPU_MMAP_SIZE: u32 = io(0x04);
const KVM_GET_SUPPORTED_CPUID: u32 = iowr::<kvm_cpuid2>(0x05);
// VM
const KVM_CREATE_VCPU: u32 = io(0x41);
const KVM_SET_USER_MEMORY_REGION: u32 = iow::<kvm_userspace_memory_region>(0x46);
const KVM_SET_TSS_ADDR: u32 = io(0x47);
const KVM_SET_IDENTITY_MAP_ADDR: u32 = iow::<u64>(0x48);
const KVM_CREATE_IRQCHIP: u32 = io(0x60);
const KVM_IRQ_LINE: u32 = iow::<kvm_irq_level>(0x61);
const KVM_SET_GSI_ROUTING: u32 = iow::<kvm_irq_routing>(0x6a);
const KVM_IRQFD: u32 = iow::<kvm_irqfd>(0x76);
const KVM_CREATE_PIT2: u32 = iow::<kvm_pit_config>(0x77);
const KVM_IOEVENTFD: u32 = iow::<kvm_ioeventfd>(0x79);
const KVM_SIGNAL_MSI: u32 = iow::<kvm_msi>(0xa5);
// vCPU
const KVM_RUN: u32 = io(0x80);
const KVM_SET_REGS: u32 = iow::<kvm_regs>(0x82);
const KVM_GET_SREGS: u32 = ior::<kvm_sregs>(0x83);
const KVM_SET_SREGS: u32 = iow::<kvm_sregs>(0x84);
const KVM_SET_MSRS: u32 = iow::<kvm_msrs>(0x89);
const KVM_SET_FPU: u32 = iow::<kvm_fpu>(0x8d);
const KVM_GET_LAPIC: u32 = ior::<kvm_lapic_state>(0x8e);
const KVM_SET_LAPIC: u32 = iow::<kvm_lapic_state>(0x8f);
const KVM_SET_CPUID2: u32 = iow::<kvm_cpuid2>(0x90);

/// Every ioctl the core may issue (all on KVM descriptors).
const IOCTLS: [u32; 25] = [
    KVM_GET_API_VERSION,
    KVM_CREATE_VM,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_GET_SUPPORTED_CPUID,
    KVM_CREATE_VCPU,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_SET_IDENTITY_MAP_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_IRQ_LINE,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_SIGNAL_MSI,
    KVM_RUN,
    KVM_SET_REGS,
    KVM_GET_SREGS,
    KVM_SET_SREGS,
    KVM_SET_MSRS,
    KVM_SET_FPU,
    KVM_GET_LAPIC,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
];

/// The core's policy.
pub fn policy() -> Policy {
    Policy::runtime("vmm-core")
        .allow(&[
            // Control channel and vhost-user: seqpacket/stream messages with descriptors
            // attached (ipc::fdpass, vhost's endpoint), the console socket's bytes (std's
            // UnixStream reads with recv and writes with send), waiting on the exit event and
            // the control socket, the watchdog's shutdown of a stuck backend connection.
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_read,
            libc::SYS_poll,
            libc::SYS_shutdown,
            // Kernel and initramfs loading (linux-loader reads and seeks the descriptors the
            // launcher opened); the memfd's size (std's metadata).
            libc::SYS_lseek,
            libc::SYS_statx,
            // Exit event, ioeventfds, irqfds; the failed-device drainer's epoll loop
            // (virtio/failed.rs).
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
        ])
        .allow_ioctls(&IOCTLS)
        // Duplicating descriptors (std's try_clone of the console and backend sockets).
        .allow_arg_values(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::sandbox::policy::Violation;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h as printed by a C program on x86_64.
        assert_eq!(KVM_GET_API_VERSION, 0xae00);
        assert_eq!(KVM_CREATE_VM, 0xae01);
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_SUPPORTED_CPUID, 0xc008_ae05);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(KVM_SET_IDENTITY_MAP_ADDR, 0x4008_ae48);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_CREATE_PIT2, 0x4040_ae77);
        assert_eq!(KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(KVM_SET_REGS, 0x4090_ae82);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_SET_SREGS, 0x4138_ae84);
        assert_eq!(KVM_SET_MSRS, 0x4008_ae89);
        assert_eq!(KVM_SET_FPU, 0x41a0_ae8d);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_SET_LAPIC, 0x4400_ae8f);
        assert_eq!(KVM_SET_CPUID2, 0x4008_ae90);
        assert_eq!(KVM_IRQ_LINE, 0x4008_ae61);
    }

    #[test]
    fn compiles_and_keeps_paths_sockets_and_processes_out() {
        let p = policy();
        p.compile(Violation::Kill).unwrap();
        for nr in [
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_fork,
            libc::SYS_memfd_create,
        ] {
            assert!(!p.lists(nr), "syscall {nr}");
        }
    }
}
