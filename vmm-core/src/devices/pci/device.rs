//! The interface between a PCI device model and the PCI root.

use super::configuration::PciConfiguration;

/// A PCI function on bus 0, as the [`PciRoot`](super::PciRoot) sees it.
///
/// # How a device plugs in
///
/// 1. Build a [`PciConfiguration`] with the device's ids and class, register its BARs with
///    [`PciConfiguration::add_bar`] (sizes only; addresses are the root's job) and its
///    capabilities with [`PciConfiguration::add_capability`] /
///    [`add_capability_with_mask`](PciConfiguration::add_capability_with_mask) (for example
///    the virtio vendor capabilities and MSI-X, whose Message Control bits 15:14 must be
///    writable: mask `[0, 0, 0x00, 0xc0, 0, ...]`).
/// 2. Wrap the device in `Arc<Mutex<_>>` and hand it to
///    [`PciRoot::add_device`](super::PciRoot::add_device). The root assigns every BAR a
///    naturally aligned address from its windows, writes it into the config space, maps each
///    BAR on the MMIO (or port-I/O) bus and turns on memory (and I/O) decoding, as firmware
///    would. After `add_device` returns, [`PciConfiguration::bar_addr`] gives each BAR's
///    initial address: that is where to register ioeventfds (e.g. virtio notify addresses).
/// 3. Guest accesses then arrive as:
///    - config space: [`read_config_register`](Self::read_config_register) /
///      [`write_config_register`](Self::write_config_register), one dword register at a time;
///    - BARs: [`read_bar`](Self::read_bar) / [`write_bar`](Self::write_bar) with the BAR index
///      and the offset from the BAR's start (accesses that KVM turns into ioeventfd signals,
///      such as virtio notifies, never get here);
///    - a moved BAR: [`bar_moved`](Self::bar_moved), after the bus mapping already moved.
///
/// The device is locked (its `Mutex`) for each call; calls come from vCPU threads. The root
/// never holds the device lock while it changes a bus, and a device must not take the root's
/// lock from these methods.
pub trait PciDevice: Send {
    /// The device's configuration space.
    fn config(&self) -> &PciConfiguration;

    /// The device's configuration space, mutable.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// A guest read of config register `reg_idx` (byte offset `reg_idx * 4`, 0..64). The
    /// root extracts the bytes the guest asked for from the returned dword. Override to
    /// give a register read side effects (virtio's `VIRTIO_PCI_CAP_PCI_CFG` data window reads
    /// the BAR); the default reads the stored value.
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config().read_reg(reg_idx)
    }

    /// A guest write of `data` (1, 2 or 4 bytes) at byte `offset` (0..=3) within config
    /// register `reg_idx`. The default applies the write masks of
    /// [`PciConfiguration::write_reg`]. Override to react to writes (MSI-X enable/mask bits,
    /// the `PCI_CFG` window) and call the default logic through `self.config_mut()`. After
    /// every write the root compares the BAR addresses and the command register with its
    /// bus mappings and moves them (see [`bar_moved`](Self::bar_moved)).
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config_mut().write_reg(reg_idx, offset, data);
    }

    /// A guest read of `data.len()` bytes at `offset` from the start of BAR `bar`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// A guest write of `data` at `offset` from the start of BAR `bar`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// The guest moved BAR `bar` from guest address `old` to `new` (while decoding was
    /// enabled, or by enabling decoding after reprogramming it). The bus range has already
    /// moved; the device re-registers whatever it keyed on the old address (ioeventfds, KVM
    /// memory slots of memory-like BARs). Called with the device locked.
    fn bar_moved(&mut self, bar: usize, old: u64, new: u64) {
        let _ = (bar, old, new);
    }
}
