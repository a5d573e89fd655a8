//! Guest RAM: the launcher's sealed memfd, mapped `MAP_SHARED` around the 32-bit MMIO hole and
//! registered with KVM as memory slots.

use crate::layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::sync::Arc;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, mmap::FromRangesError,
};

/// The guest's RAM mapping.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors of guest-RAM setup.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot stat the guest-RAM memfd")]
    Stat(#[source] std::io::Error),
    #[error("guest-RAM memfd holds {actual} bytes but the VM needs {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("guest RAM of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("cannot map guest RAM")]
    Map(#[source] FromRangesError),
    #[error("KVM refused memory slot {slot} at {gpa:#x} ({len:#x} bytes)")]
    Slot {
        slot: u32,
        gpa: u64,
        len: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps `memfd` (exactly `ram_bytes` long) as guest RAM: below the 32-bit gap first, the rest
/// from 4 GiB up, both `MAP_SHARED` views of the one file.
pub fn map_guest_ram(memfd: File, ram_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let actual = memfd.metadata().map_err(MemoryError::Stat)?.len();
    if actual != ram_bytes {
        return Err(MemoryError::SizeMismatch {
            expected: ram_bytes,
            actual,
        });
    }
    let file = Arc::new(memfd);
    let mut file_off = 0u64;
    let mut ranges = Vec::new();
    for (gpa, len) in layout::ram_ranges(ram_bytes) {
        let size = usize::try_from(len).map_err(|_| MemoryError::TooLarge(ram_bytes))?;
        ranges.push((
            GuestAddress(gpa),
            size,
            Some(FileOffset::from_arc(Arc::clone(&file), file_off)),
        ));
        file_off += len;
    }
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(MemoryError::Map)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register_with_kvm(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let gpa = region.start_addr().0;
        let len = region.len();
        let host = region.as_ptr() as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: `host` is the start of a live mapping of exactly `len` bytes owned by `mem`,
        // which the core keeps alive (and never unmaps) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Slot {
            slot,
            gpa,
            len,
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn memfd(len: u64) -> File {
        let f = memfd::MemfdOptions::default()
            .create("test-ram")
            .unwrap()
            .into_file();
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn maps_below_the_gap_and_shares_the_file() {
        let f = memfd(16 << 20);
        let probe = f.try_clone().unwrap();
        let mem = map_guest_ram(f, 16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&probe, &mut b, 0x1000).unwrap();
        assert_eq!(
            u32::from_le_bytes(b),
            0xdead_beef,
            "MAP_SHARED view of the memfd"
        );
    }

    #[test]
    fn size_mismatch_is_refused() {
        let err = map_guest_ram(memfd(4096), 8192).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::SizeMismatch {
                expected: 8192,
                actual: 4096
            }
        ));
    }
}
