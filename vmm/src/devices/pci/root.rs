//! The PCI root complex: bus 0 with a host bridge in slot 0 and devices in the other slots,
//! configuration access (legacy ports and ECAM), and the mapping of each device's memory BARs
//! onto the MMIO bus, following the guest when it moves them or turns decoding off.

use std::sync::{Arc, Mutex, Weak};

use super::config::{PciConfig, PciId, NUM_BARS};
use crate::devices::bus::{Bus, BusDevice};

/// Slots on bus 0.
pub const SLOTS: usize = 32;

/// A PCI function that a guest drives through configuration space and memory BARs.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&mut self) -> &mut PciConfig;
    /// Called after the guest wrote configuration space at `offset` (e.g. MSI-X enable bits).
    fn config_written(&mut self, _offset: usize) {}
    /// Guest read in BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write in BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// BAR `bar` is now decoded at `addr`, or not at all. Devices with ioeventfds in a BAR move
    /// them here.
    fn bar_mapped(&mut self, _bar: usize, _addr: Option<u64>) {}
    /// Stops taking work from the guest and finishes what is in flight (VM pause).
    fn pause(&mut self) -> Result<(), crate::devices::PauseError> {
        Ok(())
    }
    /// Undoes [`PciDevice::pause`].
    fn resume(&mut self) {}
    /// BAR 0 register writes that bring a freshly created device to its current programmed
    /// state (snapshot); configuration space is saved separately.
    fn save_registers(&mut self) -> Vec<(u64, Vec<u8>)> {
        Vec::new()
    }
    /// Replays [`PciDevice::save_registers`] (restore).
    fn restore_registers(&mut self, writes: &[(u64, Vec<u8>)]) {
        for (off, data) in writes {
            self.bar_write(0, *off, data);
        }
    }
}

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock(dev: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Error adding a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// All slots are taken.
    #[error("no free PCI slot on bus 0")]
    NoSlot,
    /// The BAR window is exhausted.
    #[error("no room for a {0:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace(u64),
    /// A BAR could not be declared.
    #[error(transparent)]
    Config(#[from] super::config::Error),
    /// A BAR could not be placed on the MMIO bus.
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::Error),
}

/// The host bridge in slot 0: identity only.
struct HostBridge(PciConfig);

impl PciDevice for HostBridge {
    fn config(&mut self) -> &mut PciConfig {
        &mut self.0
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Routes MMIO accesses inside one BAR to its device.
struct BarWindow {
    dev: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.dev).bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.dev).bar_write(self.bar, offset, data);
    }
}

struct Slot {
    dev: SharedPciDevice,
    /// Where each BAR is currently on the MMIO bus.
    mapped: [Option<u64>; NUM_BARS],
}

/// Bus 0.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    mmio: Arc<Bus>,
    next_bar: u64,
    bar_end: u64,
}

impl PciRoot {
    /// A root complex whose BARs are allocated in `[window_start, window_end)` and mapped onto
    /// `mmio`.
    pub fn new(mmio: Arc<Bus>, window_start: u64, window_end: u64) -> Self {
        let bridge = HostBridge(PciConfig::new(PciId {
            vendor: 0x1b36, // Red Hat, Inc.
            device: 0x0008, // PCIe host bridge
            class: (0x06, 0x00, 0x00),
            revision: 0,
            subsystem_vendor: 0x1b36,
            subsystem: 0x0008,
        }));
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            dev: Arc::new(Mutex::new(bridge)),
            mapped: [None; NUM_BARS],
        });
        Self {
            slots,
            mmio,
            next_bar: window_start,
            bar_end: window_end,
        }
    }

    /// Reserves a naturally aligned range of `size` bytes in the BAR window.
    pub fn allocate_bar(&mut self, size: u64) -> Result<u64, Error> {
        let addr = self.next_bar.next_multiple_of(size);
        let end = addr.checked_add(size).ok_or(Error::NoBarSpace(size))?;
        if end > self.bar_end {
            return Err(Error::NoBarSpace(size));
        }
        self.next_bar = end;
        Ok(addr)
    }

    /// Puts `dev` (its BARs already declared) in the first free slot and maps its BARs.
    pub fn add_device(&mut self, dev: SharedPciDevice) -> Result<u8, Error> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(Error::NoSlot)?;
        self.slots[slot] = Some(Slot {
            dev,
            mapped: [None; NUM_BARS],
        });
        self.sync_bars(slot)?;
        Ok(slot as u8)
    }

    /// Makes the MMIO bus match the device's BARs and command register.
    fn sync_bars(&mut self, slot: usize) -> Result<(), Error> {
        let Some(s) = self.slots[slot].as_mut() else {
            return Ok(());
        };
        let wanted: Vec<Option<(u64, u64)>> = {
            let mut d = lock(&s.dev);
            let cfg = d.config();
            let enabled = cfg.memory_enabled();
            (0..NUM_BARS)
                .map(|i| match (cfg.bar(i), cfg.bar_addr(i)) {
                    (Some(bar), Some(addr)) if enabled => Some((addr, bar.size)),
                    _ => None,
                })
                .collect()
        };
        for (bar, want) in wanted.into_iter().enumerate() {
            let want_addr = want.map(|w| w.0);
            if s.mapped[bar] == want_addr {
                continue;
            }
            if let Some(old) = s.mapped[bar].take() {
                self.mmio.remove(old);
            }
            if let Some((addr, size)) = want {
                let window = Arc::new(Mutex::new(BarWindow {
                    dev: s.dev.clone(),
                    bar,
                }));
                match self.mmio.insert(window, addr, size) {
                    Ok(()) => s.mapped[bar] = Some(addr),
                    // A guest that moves a BAR onto another device's range gets no decoding
                    // there, as on hardware with a conflicting assignment.
                    Err(e) => tracing::warn!("PCI slot {slot} BAR {bar}: {e}"),
                }
            }
            lock(&s.dev).bar_mapped(bar, s.mapped[bar]);
        }
        Ok(())
    }

    fn device(&self, bus: u8, slot: u8, func: u8) -> Option<&SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref().map(|s| &s.dev)
    }

    /// The devices, by slot.
    pub fn devices(&self) -> Vec<(u8, SharedPciDevice)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (i as u8, s.dev.clone())))
            .collect()
    }

    /// Reads the dword at `offset` (aligned down) of a function; absent functions read all ones.
    pub fn config_read(&self, bus: u8, slot: u8, func: u8, offset: usize) -> u32 {
        match self.device(bus, slot, func) {
            Some(dev) => lock(dev).config().read_reg(offset / 4),
            None => 0xffff_ffff,
        }
    }

    /// Writes `data` at `offset` of a function's configuration space.
    pub fn config_write(&mut self, bus: u8, slot: u8, func: u8, offset: usize, data: &[u8]) {
        let Some(dev) = self.device(bus, slot, func).cloned() else {
            return;
        };
        {
            let mut d = lock(&dev);
            d.config().write(offset, data);
            d.config_written(offset);
        }
        // Only BAR and command writes can change what is decoded where.
        if offset < 0x28 {
            if let Err(e) = self.sync_bars(usize::from(slot)) {
                tracing::warn!("PCI slot {slot}: {e}");
            }
        }
    }
}

fn read_dword_part(dword: u32, byte: usize, data: &mut [u8]) {
    let bytes = dword.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(byte + i).copied().unwrap_or(0xff);
    }
}

/// How the configuration access devices reach the root complex: weakly, because the root
/// holds the MMIO bus they sit on. A strong reference would make a cycle that keeps every
/// device (and its disk files, with their locks) alive after the VM is gone.
struct RootRef(Weak<Mutex<PciRoot>>);

impl RootRef {
    /// Runs `f` on the root; None once the VM is gone.
    fn with<R>(&self, f: impl FnOnce(&mut PciRoot) -> R) -> Option<R> {
        let root = self.0.upgrade()?;
        let mut guard = root.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut guard))
    }
}

/// Configuration mechanism #1: address register at 0xCF8, data window at 0xCFC..0xCFF.
pub struct PciConfigIo {
    root: RootRef,
    address: u32,
}

/// First port of [`PciConfigIo`].
pub const CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports covered by [`PciConfigIo`].
pub const CONFIG_IO_PORTS: u64 = 8;

impl PciConfigIo {
    /// Config access to `root`.
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root: RootRef(Arc::downgrade(root)),
            address: 0,
        }
    }

    /// `(bus, slot, function, register offset)` selected, when the enable bit is set.
    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        (self.address & 0x8000_0000 != 0).then_some((
            (self.address >> 16) as u8,
            ((self.address >> 11) & 0x1f) as u8,
            ((self.address >> 8) & 0x7) as u8,
            (self.address & 0xfc) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, _) => {
                let byte = (offset - 4) as usize;
                let dword = match self.target() {
                    Some((bus, slot, func, reg)) => self
                        .root
                        .with(|root| root.config_read(bus, slot, func, reg))
                        .unwrap_or(0xffff_ffff),
                    None => 0xffff_ffff,
                };
                read_dword_part(dword, byte, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => self.address = u32::from_le_bytes(data.try_into().expect("4 bytes")),
            (4..=7, _) => {
                if let Some((bus, slot, func, reg)) = self.target() {
                    let offset = reg + (offset - 4) as usize;
                    self.root
                        .with(|root| root.config_write(bus, slot, func, offset, data));
                }
            }
            _ => {}
        }
    }
}

/// ECAM (PCIe enhanced configuration access) for bus 0: 4 KiB per function.
pub struct PciEcam {
    root: RootRef,
}

impl PciEcam {
    /// ECAM access to `root`.
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root: RootRef(Arc::downgrade(root)),
        }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, func, reg) = ecam_target(offset);
        let dword = self
            .root
            .with(|root| root.config_read(bus, slot, func, reg & !3))
            .unwrap_or(0xffff_ffff);
        read_dword_part(dword, reg & 3, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, func, reg) = ecam_target(offset);
        self.root
            .with(|root| root.config_write(bus, slot, func, reg, data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::config::Bar;

    struct Probe {
        cfg: PciConfig,
        mapped: Vec<(usize, Option<u64>)>,
    }

    impl PciDevice for Probe {
        fn config(&mut self) -> &mut PciConfig {
            &mut self.cfg
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill((bar as u8) << 4 | offset as u8);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
            self.mapped.push((bar, addr));
        }
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<PciRoot>>, Arc<Mutex<Probe>>) {
        let mmio = Arc::new(Bus::new());
        let mut root = PciRoot::new(mmio.clone(), 0xc000_0000, 0xe000_0000);
        let mut cfg = PciConfig::new(PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: (1, 0, 0),
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
        });
        let addr = root.allocate_bar(0x4000).unwrap();
        cfg.add_bar(
            0,
            addr,
            Bar {
                size: 0x4000,
                is_64bit: false,
            },
        )
        .unwrap();
        let probe = Arc::new(Mutex::new(Probe {
            cfg,
            mapped: Vec::new(),
        }));
        assert_eq!(root.add_device(probe.clone()).unwrap(), 1);
        (mmio, Arc::new(Mutex::new(root)), probe)
    }

    #[test]
    fn devices_go_when_the_bus_goes() {
        // The root holds the MMIO bus, and the ECAM window on that bus reaches the root: the
        // devices (and the disk files they hold) must still go once nobody else holds the root.
        let (mmio, root, probe) = setup();
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(&root))),
            0xb000_0000,
            1 << 20,
        )
        .unwrap();
        let pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(PciConfigIo::new(&root))), 0xcf8, 8)
            .unwrap();
        let device = Arc::downgrade(&probe);
        drop(probe);
        drop(mmio);
        drop(root);
        assert!(device.upgrade().is_none(), "the device outlived its bus");
        // What is left of the buses answers like an empty bus.
        let mut d = [0u8; 4];
        pio.write(0xcf8, &0x8000_0800u32.to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
    }

    fn cf8(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (slot << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn enumeration_through_ports_and_ecam() {
        let (_mmio, root, _probe) = setup();
        let mut io = PciConfigIo::new(&root);
        assert_eq!(cf8(&mut io, 0, 0), 0x0008_1b36, "host bridge");
        assert_eq!(cf8(&mut io, 1, 0), 0x1042_1af4, "device in slot 1");
        assert_eq!(cf8(&mut io, 2, 0), 0xffff_ffff, "empty slot");
        let mut ecam = PciEcam::new(&root);
        let mut d = [0u8; 2];
        ecam.read((1 << 15) + 2, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x1042);
        let mut d = [0u8; 4];
        ecam.read(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 is empty");
        // Byte reads inside the data window.
        io.write(0, &(0x8000_0000u32 | (1 << 11)).to_le_bytes());
        let mut b = [0u8; 1];
        io.read(7, &mut b);
        assert_eq!(b[0], 0x10);
        // Disabled address register reads all ones.
        io.write(0, &(1u32 << 11).to_le_bytes());
        let mut d = [0u8; 4];
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bars_follow_decoding_and_relocation() {
        let (mmio, root, probe) = setup();
        let mut io = PciConfigIo::new(&root);
        let mut d = [0u8; 1];
        assert!(mmio.read(0xc000_0003, &mut d));
        assert_eq!(d[0], 0x03);
        // Turn decoding off (as Linux does while sizing BARs): the BAR disappears.
        io.write(0, &(0x8000_0000u32 | (1 << 11) | 4).to_le_bytes());
        io.write(4, &0u16.to_le_bytes());
        assert!(!mmio.read(0xc000_0003, &mut d));
        // Size it, move it, turn decoding back on.
        io.write(0, &(0x8000_0000u32 | (1 << 11) | 0x10).to_le_bytes());
        io.write(4, &u32::MAX.to_le_bytes());
        let mut size = [0u8; 4];
        io.read(4, &mut size);
        assert_eq!(u32::from_le_bytes(size), 0xffff_c000);
        io.write(4, &0xd000_0000u32.to_le_bytes());
        io.write(0, &(0x8000_0000u32 | (1 << 11) | 4).to_le_bytes());
        io.write(4, &2u16.to_le_bytes());
        assert!(!mmio.read(0xc000_0003, &mut d));
        assert!(mmio.read(0xd000_0005, &mut d));
        assert_eq!(d[0], 0x05);
        let mapped = &probe.lock().unwrap().mapped;
        assert_eq!(
            mapped.as_slice(),
            &[(0, Some(0xc000_0000)), (0, None), (0, Some(0xd000_0000))]
        );
    }

    #[test]
    fn bar_window_exhaustion() {
        let mut root = PciRoot::new(Arc::new(Bus::new()), 0x1000, 0x3000);
        assert_eq!(root.allocate_bar(0x1000).unwrap(), 0x1000);
        assert_eq!(root.allocate_bar(0x1000).unwrap(), 0x2000);
        assert!(matches!(
            root.allocate_bar(0x1000),
            Err(Error::NoBarSpace(_))
        ));
    }
}
