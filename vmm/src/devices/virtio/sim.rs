//! A simulated virtio driver for device tests: it drives a device behind the virtio-pci
//! transport through BAR accesses (feature negotiation, queue setup, MSI-X, status), lays out
//! split rings in guest memory, makes descriptor chains available, kicks queues and reads the
//! used rings back — what a guest kernel does, without a guest.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::pci::VirtioPciDevice;
use super::{
    VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use crate::devices::pci::msix::{MsiMessage, MsiSink};
use crate::devices::pci::root::PciDevice;

/// Common configuration in BAR 0.
pub const COMMON: u64 = 0x0000;
/// Device configuration in BAR 0.
pub const DEVICE_CFG: u64 = 0x2000;
/// Queue doorbells in BAR 0.
pub const NOTIFY: u64 = 0x3000;
/// MSI-X table in BAR 0.
pub const MSIX_TABLE: u64 = 0x4000;
/// Size of every simulated queue.
pub const QSIZE: u16 = 16;
/// Descriptor flag: the chain goes on.
pub const F_NEXT: u16 = 1;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = 2;
/// How long the helpers wait for the device.
pub const WAIT: Duration = Duration::from_secs(5);

/// Descriptor table, available and used ring of queue `q`: 12 KiB per queue from 64 KiB up.
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = 0x10000 + 0x3000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}

/// Counts the interrupts of each MSI-X vector.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<[AtomicUsize; 8]>);

impl MsiSink for Sink {
    fn route(&self, _vector: u16, _message: Option<MsiMessage>) {}
    fn fire(&self, vector: u16) {
        if let Some(c) = self.0.get(usize::from(vector)) {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Waits until `f` holds, failing the test after [`WAIT`].
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The driver of one device.
pub struct SimDriver {
    /// The device behind its transport.
    pub dev: VirtioPciDevice,
    /// Guest memory (1 MiB from 0; rings from 64 KiB, buffers above them).
    pub mem: GuestMemoryMmap,
    /// Interrupts per vector.
    pub fired: Sink,
    queues: usize,
    /// Per queue: next descriptor index to hand out, and the driver's avail index.
    next_desc: Vec<u16>,
    avail: Vec<u16>,
}

impl SimDriver {
    /// Puts `device` behind a transport over fresh guest memory.
    pub fn new(device: Box<dyn VirtioDevice>) -> SimDriver {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        SimDriver::over(device, mem)
    }

    /// Puts `device` behind a transport over `mem` (another device's memory, for restores).
    pub fn over(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> SimDriver {
        let queues = device.queue_max_sizes().len();
        let fired = Sink::default();
        let dev = VirtioPciDevice::new(
            device,
            mem.clone(),
            0xc000_0000,
            Box::new(fired.clone()),
            None,
        )
        .unwrap();
        SimDriver {
            dev,
            mem,
            fired,
            queues,
            next_desc: vec![0; queues],
            avail: vec![0; queues],
        }
    }

    /// Writes BAR 0 at `offset`.
    pub fn w(&mut self, offset: u64, data: &[u8]) {
        self.dev.bar_write(0, offset, data);
    }

    /// Reads `len` bytes of BAR 0 at `offset`.
    pub fn r(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.dev.bar_read(0, offset, &mut d);
        d
    }

    /// The device status byte.
    pub fn status(&mut self) -> u8 {
        self.r(COMMON + 0x14, 1)[0]
    }

    /// Writes the device status byte (0 resets).
    pub fn set_status(&mut self, s: u8) {
        self.w(COMMON + 0x14, &[s]);
    }

    /// The features the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.w(COMMON, &0u32.to_le_bytes());
        let lo = u32::from_le_bytes(self.r(COMMON + 4, 4).try_into().unwrap());
        self.w(COMMON, &1u32.to_le_bytes());
        let hi = u32::from_le_bytes(self.r(COMMON + 4, 4).try_into().unwrap());
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Negotiates VERSION_1 plus `features`, sets up every queue (vector = queue index) and
    /// MSI-X, and starts the device.
    pub fn bring_up(&mut self, features: u64) {
        let features = features | (1 << VIRTIO_F_VERSION_1);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        assert_eq!(self.device_features() & features, features);
        for (sel, half) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
            self.w(COMMON + 0x08, &sel.to_le_bytes());
            self.w(COMMON + 0x0c, &half.to_le_bytes());
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0);
        let cfg = self.dev.config();
        let mut ptr = (cfg.read_reg(0x34 / 4) & 0xff) as usize;
        while cfg.read_reg(ptr / 4) & 0xff != 0x11 {
            ptr = ((cfg.read_reg(ptr / 4) >> 8) & 0xff) as usize;
        }
        cfg.write(ptr + 3, &[0x80]);
        self.dev.config_written(ptr + 3);
        for v in 0..=self.queues as u64 {
            self.w(MSIX_TABLE + 16 * v, &0xfee0_0000u64.to_le_bytes());
            self.w(MSIX_TABLE + 16 * v + 8, &(0x30 + v as u32).to_le_bytes());
            self.w(MSIX_TABLE + 16 * v + 12, &0u32.to_le_bytes());
        }
        for q in 0..self.queues {
            let (desc, avail, used) = rings(q);
            for a in [avail, used] {
                self.mem
                    .write_slice(&[0u8; 0x1000], GuestAddress(a))
                    .unwrap();
            }
            self.w(COMMON + 0x16, &(q as u16).to_le_bytes());
            self.w(COMMON + 0x18, &QSIZE.to_le_bytes());
            self.w(COMMON + 0x1a, &(q as u16).to_le_bytes());
            self.w(COMMON + 0x20, &desc.to_le_bytes());
            self.w(COMMON + 0x28, &avail.to_le_bytes());
            self.w(COMMON + 0x30, &used.to_le_bytes());
            self.w(COMMON + 0x1c, &1u16.to_le_bytes());
        }
        self.next_desc = vec![0; self.queues];
        self.avail = vec![0; self.queues];
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(self.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    /// Makes a chain of `descs` (address, length, device-writable) available on queue `q`;
    /// returns its head.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, bool)]) -> u16 {
        let (table, avail, _) = rings(q);
        let head = self.next_desc[q];
        for (i, (addr, len, write)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let next = (idx + 1) % QSIZE;
            let mut flags = if *write { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let a = table + 16 * u64::from(idx);
            self.mem.write_obj(*addr, GuestAddress(a)).unwrap();
            self.mem.write_obj(*len, GuestAddress(a + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
        }
        self.next_desc[q] = (head + descs.len() as u16) % QSIZE;
        let slot = u64::from(self.avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.avail[q], GuestAddress(avail + 2))
            .unwrap();
        head
    }

    /// Rings queue `q`'s doorbell.
    pub fn kick(&mut self, q: usize) {
        self.w(NOTIFY + 4 * q as u64, &(q as u16).to_le_bytes());
    }

    /// The device's used index of queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(rings(q).2 + 2)).unwrap()
    }

    /// Waits until queue `q` has used `n` chains in all.
    pub fn wait_used(&self, q: usize, n: u16) {
        until(&format!("{n} used entries on queue {q}"), || {
            self.used_idx(q) >= n
        });
    }

    /// (descriptor id, length) of used entry `i` of queue `q`.
    pub fn used(&self, q: usize, i: u16) -> (u32, u32) {
        let a = rings(q).2 + 4 + 8 * u64::from(i % QSIZE);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    /// Interrupts of MSI-X vector `vector` so far.
    pub fn fired(&self, vector: usize) -> usize {
        self.fired.0[vector].load(Ordering::SeqCst)
    }
}
