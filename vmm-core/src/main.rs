//! vmm-core: atoll's core process. It owns KVM, the vCPUs and the guest-RAM mapping, and
//! emulates the platform (serial, RTC, ACPI power management, PCI host bridge).

mod acpi;
mod bus;
mod devices;
mod exit;
mod layout;

fn main() {}
