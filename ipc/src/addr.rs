//! Address-space newtypes. Each address space gets its own type so that a port number can never
//! be passed where a guest-physical address is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A guest-physical memory address.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct GuestPhysAddr(pub u64);

/// An address on the guest's MMIO bus (guest-physical, outside RAM).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct MmioAddress(pub u64);

/// A port on the guest's x86 I/O-port bus.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PioAddress(pub u16);

macro_rules! addr_common {
    ($t:ident, $inner:ty, $fmt:literal) => {
        impl $t {
            /// The raw address value.
            pub const fn raw(self) -> $inner {
                self.0
            }

            /// `self + off`, or `None` on overflow.
            pub fn checked_add(self, off: $inner) -> Option<Self> {
                self.0.checked_add(off).map(Self)
            }

            /// The offset of `self` from `base`, or `None` if `self` lies below `base`.
            pub fn offset_from(self, base: Self) -> Option<$inner> {
                self.0.checked_sub(base.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

addr_common!(GuestPhysAddr, u64, "gpa {:#x}");
addr_common!(MmioAddress, u64, "mmio {:#x}");
addr_common!(PioAddress, u16, "port {:#x}");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_overflow() {
        let base = MmioAddress(0x1000);
        assert_eq!(MmioAddress(0x1010).offset_from(base), Some(0x10));
        assert_eq!(MmioAddress(0x0fff).offset_from(base), None);
        assert_eq!(PioAddress(0xffff).checked_add(1), None);
        assert_eq!(GuestPhysAddr(1).checked_add(2), Some(GuestPhysAddr(3)));
        assert_eq!(PioAddress(0x3f8).to_string(), "port 0x3f8");
    }
}
