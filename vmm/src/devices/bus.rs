//! Address-range dispatch of port I/O and MMIO accesses to devices.
//!
//! Our own code: the rust-vmm `vm-device` crate's bus is unmaintained and tied to an older
//! vm-memory; what we need is a sorted map and a lookup.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. Offsets are relative to the base the device was inserted at.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Error inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device. Ranges can be added
/// and removed while vCPUs run (PCI BARs move when the guest reprograms them).
#[derive(Default)]
pub struct Bus {
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::InvalidRange { base, len })?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if let Some((b, e)) = entries.range(..end).next_back() {
            if b + e.len > base {
                return Err(Error::Overlap { base, len });
            }
        }
        entries.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.remove(&base).is_some()
    }

    /// The device covering `[addr, addr + size)` and the offset into it. The bus lock is released
    /// before the device is locked, so a device handler may itself change the bus.
    fn lookup(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = entries.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= entry.len).then(|| (offset, entry.device.clone()))
    }

    /// Dispatches a read; returns false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((offset, dev)) => {
                lock(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr, data.len()) {
            Some((offset, dev)) => {
                lock(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device whose handler panicked on another
/// vCPU thread is still the best state we have, and the VM is being torn down in that case.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_with_offsets() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 4).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x402, &[9, 9]));
        assert_eq!(b.lock().unwrap().writes, vec![(2, vec![9, 9])]);
        assert!(a.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn accesses_outside_or_straddling_are_unhandled() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x10, 4)
            .unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0x0f, &mut d[..1]));
        assert!(!bus.read(0x14, &mut d[..1]));
        assert!(!bus.read(0x12, &mut d), "straddles the end");
        assert!(bus.read(0x10, &mut d));
    }

    #[test]
    fn overlaps_and_empty_ranges_are_rejected() {
        let bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10f, 1),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf0, 0x11),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x0, 0x1000),
            Err(Error::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0x200, 0),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(Error::InvalidRange { .. })
        ));
        bus.insert(dev(), 0x110, 1).unwrap();
        bus.insert(dev(), 0xff, 1).unwrap();
    }
}
