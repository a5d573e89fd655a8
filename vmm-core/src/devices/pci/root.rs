//! PCI bus 0: the host bridge, device slots, BAR placement and BAR mapping on the buses.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use super::PciError;
use super::configuration::{COMMAND_IO, COMMAND_MEMORY, NUM_BARS, PciConfiguration, PciHeader};
use super::device::PciDevice;
use crate::bus::{Bus, BusDeviceSync};
use crate::layout;

/// Port-I/O window for I/O BARs (above the legacy ISA ports, as PC firmware does).
pub const PCI_IO_START: u64 = 0xc000;
/// End of the I/O BAR window (exclusive).
pub const PCI_IO_END: u64 = 0x1_0000;
/// Device slots on bus 0.
pub const NUM_SLOTS: usize = 32;

/// The host bridge's ids: Intel, and class 0x0600 (host bridge), which Linux's
/// `pci_sanity_check` looks for on bus 0.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;

/// Device 0 on bus 0: a host bridge with no BARs.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class: 0x06,
                subclass: 0x00,
                ..PciHeader::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A bump allocator of naturally aligned ranges (BAR addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressAllocator {
    next: u64,
    end: u64,
}

impl AddressAllocator {
    pub fn new(window: Range<u64>) -> Self {
        Self {
            next: window.start,
            end: window.end,
        }
    }

    /// A `size`-byte range aligned to `size` (a power of two), or `None` if the window is
    /// exhausted.
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size).filter(|&e| e <= self.end)?;
        self.next = end;
        Some(base)
    }
}

/// What the bus sees of one BAR: forwards accesses to the device with the BAR index.
struct BarAdapter {
    dev: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDeviceSync for BarAdapter {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).read_bar(self.bar, offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        lock(&self.dev).write_bar(self.bar, offset, data);
    }
}

fn lock(dev: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().expect("PCI device lock poisoned")
}

/// Where one BAR currently is on its bus.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    addr: u64,
    size: u64,
    io: bool,
    /// A target address the bus refused, so the warning is logged once.
    refused: Option<u64>,
}

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    maps: [Option<Mapping>; NUM_BARS],
}

/// PCI bus 0 with a host bridge at device 0.
///
/// BARs live on the buses as long as their device exists: clearing the decode bits in the
/// command register does not unmap them (Linux does that around BAR sizing). A BAR moves when
/// the guest writes a new address while decoding is enabled, or enables decoding after
/// writing one; size probes (all-ones) and address 0 never move a BAR.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    mmio: AddressAllocator,
    io: AddressAllocator,
}

impl PciRoot {
    /// Bus 0 with memory BARs allocated from `layout::PCI_MMIO32_START..PCI_MMIO32_END` and
    /// I/O BARs from `PCI_IO_START..PCI_IO_END`.
    pub fn new(mmio_bus: Arc<Bus>, pio_bus: Arc<Bus>) -> Self {
        Self::with_windows(
            mmio_bus,
            pio_bus,
            layout::PCI_MMIO32_START..layout::PCI_MMIO32_END,
            PCI_IO_START..PCI_IO_END,
        )
    }

    /// Bus 0 with explicit BAR windows.
    pub fn with_windows(
        mmio_bus: Arc<Bus>,
        pio_bus: Arc<Bus>,
        mmio: Range<u64>,
        io: Range<u64>,
    ) -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            dev: Arc::new(Mutex::new(HostBridge::new())),
            maps: [None; NUM_BARS],
        });
        Self {
            slots,
            mmio_bus,
            pio_bus,
            mmio: AddressAllocator::new(mmio),
            io: AddressAllocator::new(io),
        }
    }

    fn bus_for(&self, io: bool) -> &Arc<Bus> {
        if io { &self.pio_bus } else { &self.mmio_bus }
    }

    /// Plugs `dev` into the first free slot: assigns each BAR an address (largest first,
    /// naturally aligned), maps it on the MMIO or port-I/O bus, and enables memory/I/O
    /// decoding. Returns the device number (slot) on bus 0.
    pub fn add_device(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        let mut bars: Vec<_> = lock(&dev).config().bars().collect();
        bars.sort_by(|a, b| b.size.cmp(&a.size).then(a.index.cmp(&b.index)));

        let (mut mmio, mut io) = (self.mmio, self.io);
        let mut placed = Vec::with_capacity(bars.len());
        for bar in &bars {
            let (alloc, window) = if bar.kind.is_io() {
                (&mut io, "port-I/O")
            } else {
                (&mut mmio, "MMIO")
            };
            let addr = alloc.allocate(bar.size).ok_or(PciError::OutOfSpace {
                index: bar.index,
                size: bar.size,
                window,
            })?;
            placed.push((*bar, addr));
        }

        let mut maps = [None; NUM_BARS];
        for &(bar, addr) in &placed {
            let io = bar.kind.is_io();
            let adapter = Arc::new(BarAdapter {
                dev: Arc::clone(&dev),
                bar: bar.index,
            });
            if let Err(source) = self.bus_for(io).insert(adapter, addr, bar.size) {
                for m in maps.iter().flatten() {
                    let m: &Mapping = m;
                    let _ = self.bus_for(m.io).remove(m.addr);
                }
                return Err(PciError::Map {
                    index: bar.index,
                    addr,
                    source,
                });
            }
            maps[bar.index] = Some(Mapping {
                addr,
                size: bar.size,
                io,
                refused: None,
            });
        }

        {
            let mut d = lock(&dev);
            let cfg = d.config_mut();
            for &(bar, addr) in &placed {
                cfg.set_bar_addr(bar.index, addr)
                    .expect("allocated BAR addresses are aligned and in range");
            }
            let mut command = cfg.command();
            if bars.iter().any(|b| !b.kind.is_io()) {
                command |= COMMAND_MEMORY;
            }
            if bars.iter().any(|b| b.kind.is_io()) {
                command |= COMMAND_IO;
            }
            cfg.set_command(command);
        }
        self.mmio = mmio;
        self.io = io;
        self.slots[slot] = Some(Slot { dev, maps });
        Ok(u8::try_from(slot).expect("fewer than 256 slots"))
    }

    /// The device in `slot`, if any (slot 0 is the host bridge).
    #[cfg(test)]
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.slots
            .get(usize::from(slot))?
            .as_ref()
            .map(|s| Arc::clone(&s.dev))
    }

    fn slot_index(bus: u8, device: u8, function: u8) -> Option<usize> {
        (bus == 0 && function == 0 && usize::from(device) < NUM_SLOTS)
            .then_some(usize::from(device))
    }

    /// Config register `reg_idx` of bus/device/function; all-ones where no function exists.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, reg_idx: usize) -> u32 {
        Self::slot_index(bus, device, function)
            .and_then(|i| self.slots[i].as_ref())
            .map_or(u32::MAX, |s| lock(&s.dev).read_config_register(reg_idx))
    }

    /// A config write of `data` at byte `offset` within register `reg_idx`; then moves any
    /// BAR whose address changed while its decoding is on.
    pub fn config_write(
        &mut self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(i) = Self::slot_index(bus, device, function) else {
            return;
        };
        let Some(slot) = self.slots[i].as_ref() else {
            return;
        };
        let dev = Arc::clone(&slot.dev);
        let moves = {
            let mut d = lock(&dev);
            d.write_config_register(reg_idx, offset, data);
            pending_moves(d.config(), &slot.maps)
        };
        for (bar, new) in moves {
            self.move_bar(i, bar, new);
        }
    }

    fn move_bar(&mut self, slot: usize, bar: usize, new: u64) {
        let Some(s) = self.slots[slot].as_ref() else {
            return;
        };
        let dev = Arc::clone(&s.dev);
        let Some(m) = s.maps[bar] else { return };
        match self.bus_for(m.io).relocate(m.addr, new) {
            Ok(()) => {
                if let Some(Some(m)) = self.slots[slot].as_mut().map(|s| &mut s.maps[bar]) {
                    m.addr = new;
                    m.refused = None;
                }
                tracing::debug!(slot, bar, old = m.addr, new, "PCI BAR moved");
                lock(&dev).bar_moved(bar, m.addr, new);
            }
            Err(e) => {
                if m.refused != Some(new) {
                    tracing::warn!(slot, bar, old = m.addr, new, error = %e,
                        "guest moved a PCI BAR onto an occupied range; it stays where it was");
                    if let Some(Some(m)) = self.slots[slot].as_mut().map(|s| &mut s.maps[bar]) {
                        m.refused = Some(new);
                    }
                }
            }
        }
    }
}

/// BARs whose programmed address differs from their mapping while decoding is on.
fn pending_moves(cfg: &PciConfiguration, maps: &[Option<Mapping>; NUM_BARS]) -> Vec<(usize, u64)> {
    let mut moves = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let Some(m) = m else { continue };
        let decoding = if m.io {
            cfg.io_enabled()
        } else {
            cfg.memory_enabled()
        };
        if !decoding || cfg.bar_holds_size_probe(i) {
            continue;
        }
        let new = cfg.bar_addr(i);
        let limit = if m.io { PCI_IO_END } else { u64::MAX };
        let fits = new.checked_add(m.size).is_some_and(|end| end <= limit);
        if new != m.addr && new != 0 && fits {
            moves.push((i, new));
        }
    }
    moves
}
