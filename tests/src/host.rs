//! What kind of KVM the host offers, and so where L2 guests run.
#![forbid(unsafe_code)]

use std::path::Path;

/// The host's `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKvm {
    /// A real KVM (hardware virtualization, possibly nested): boots Linux directly.
    Real,
    /// `kvm_pvm`: the KVM API works but Linux guests cannot boot (see TESTBED.md).
    Pvm,
    /// No `/dev/kvm` at all.
    Missing,
}

impl HostKvm {
    /// Looks at `/dev/kvm` and `/sys/module/kvm_pvm`.
    pub fn detect() -> Self {
        if !Path::new("/dev/kvm").exists() {
            Self::Missing
        } else if Path::new("/sys/module/kvm_pvm").exists() {
            Self::Pvm
        } else {
            Self::Real
        }
    }
}

/// Where L2 guests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside an L1 QEMU-TCG guest with nested SVM.
    L1,
    /// Directly on the host, whose KVM is real.
    Direct,
}

impl Placement {
    /// `$ATOLL_TESTBED=l1|direct` when set, else L1 unless the host's KVM is real.
    pub fn choose(host: HostKvm) -> Result<Self, String> {
        match std::env::var("ATOLL_TESTBED").as_deref() {
            Ok("l1") => Ok(Self::L1),
            Ok("direct") => Ok(Self::Direct),
            Ok(other) => Err(format!(
                "ATOLL_TESTBED={other:?} is neither \"l1\" nor \"direct\""
            )),
            Err(_) if host == HostKvm::Real => Ok(Self::Direct),
            Err(_) => Ok(Self::L1),
        }
    }
}
