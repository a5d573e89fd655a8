//! The MMIO and port-I/O buses: address ranges mapped to devices.
//!
//! Devices implement the narrow [`BusDevice`] (`&mut self`); the bus stores them behind a
//! `Mutex` through the blanket [`BusDeviceSync`] impl, so vCPU threads share one bus. A device
//! that needs finer-grained locking implements [`BusDeviceSync`] itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus, seen with exclusive access. `offset` is relative to the start of the
/// range the device was inserted at; `data.len()` is the access width (1, 2, 4 or 8).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device on a bus, shared between vCPU threads.
pub trait BusDeviceSync: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: BusDevice> BusDeviceSync for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.lock()
            .expect("bus device lock poisoned")
            .read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .expect("bus device lock poisoned")
            .write(offset, data);
    }
}

/// Errors of bus management.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("no device is mapped at {0:#x}")]
    NotMapped(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: Arc<dyn BusDeviceSync>,
}

/// A set of non-overlapping address ranges, each mapped to a device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    pub fn insert(&self, dev: Arc<dyn BusDeviceSync>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut ranges = self.ranges.write().expect("bus lock poisoned");
        if let Some((&b, e)) = ranges.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// Unmaps the range that starts at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().expect("bus lock poisoned");
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotMapped(base))
    }

    /// Moves the range that starts at `old` to `new` (a guest reprogramming a BAR).
    pub fn relocate(&self, old: u64, new: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().expect("bus lock poisoned");
        let e = ranges.remove(&old).ok_or(BusError::NotMapped(old))?;
        let end = new.checked_add(e.len).ok_or(BusError::BadRange {
            base: new,
            len: e.len,
        })?;
        if let Some((&b, o)) = ranges.range(..end).next_back()
            && b + o.len > new
        {
            let len = e.len;
            ranges.insert(old, e);
            return Err(BusError::Overlap { base: new, len });
        }
        ranges.insert(new, e);
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, Arc<dyn BusDeviceSync>)> {
        let ranges = self.ranges.read().expect("bus lock poisoned");
        let (&base, e) = ranges.range(..=addr).next_back()?;
        (addr - base < e.len).then(|| (addr - base, Arc::clone(&e.dev)))
    }

    /// Reads from the device at `addr`; `false` if nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((off, dev)) => {
                dev.read(off, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `false` if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((off, dev)) => {
                dev.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last, vec![(0, vec![0x41])]);
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let bus = Bus::new();
        let dev: Arc<dyn BusDeviceSync> = Arc::new(Mutex::new(Reg::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10ff, 1),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf01, 0x100),
            Err(BusError::Overlap {
                base: 0xf01,
                len: 0x100
            })
        );
        assert!(bus.insert(dev.clone(), 0x1100, 0x100).is_ok());
        assert!(bus.insert(dev.clone(), 0xf00, 0x100).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(dev, 0x5000, 0),
            Err(BusError::BadRange {
                base: 0x5000,
                len: 0
            })
        );
    }

    #[test]
    fn relocate_moves_or_refuses() {
        let bus = Bus::new();
        let dev: Arc<dyn BusDeviceSync> = Arc::new(Mutex::new(Reg::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        bus.insert(dev, 0x3000, 0x100).unwrap();
        assert!(bus.relocate(0x1000, 0x2f80).is_err());
        let mut b = [0u8; 1];
        assert!(
            bus.read(0x1000, &mut b),
            "failed relocation keeps the old mapping"
        );
        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(!bus.read(0x1000, &mut b));
        assert!(bus.read(0x20ff, &mut b));
        assert_eq!(bus.remove(0x1000), Err(BusError::NotMapped(0x1000)));
    }
}
