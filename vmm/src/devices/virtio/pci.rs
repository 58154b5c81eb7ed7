//! The virtio-pci transport, modern (virtio 1.x) layout only.
//!
//! BAR 0 (32 KiB) holds, at fixed offsets announced through vendor capabilities: the common
//! configuration, the ISR byte, the device configuration, the notification area (one 4-byte
//! doorbell per queue, each backed by an ioeventfd so a kick never exits to userspace), and the
//! MSI-X table and pending bits.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, ActiveQueue, Interrupt, VirtioDevice, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use crate::devices::pci::config::{Bar, PciConfig, PciId};
use crate::devices::pci::msix::{MsiSink, Msix};
use crate::devices::pci::root::PciDevice;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x100;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
const MSIX_TABLE_SIZE: u64 = MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET;
const MSIX_PBA_SIZE: u64 = BAR_SIZE - MSIX_PBA_OFFSET;
/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

const PCI_CAP_ID_VENDOR: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

/// Error creating the transport.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration space could not be built.
    #[error("virtio-pci config space: {0}")]
    Config(#[from] crate::devices::pci::config::Error),
    /// An eventfd could not be created.
    #[error("virtio-pci notification eventfd: {0}")]
    EventFd(std::io::Error),
}

#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Interrupts of one device: the ISR byte plus MSI-X vectors chosen by the driver.
struct MsixInterrupt {
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

/// Locks MSI-X state, recovering from poisoning: the state is plain data that every writer
/// leaves consistent, and interrupts must keep flowing.
fn lock_msix(msix: &Mutex<Msix>) -> MutexGuard<'_, Msix> {
    msix.lock().unwrap_or_else(|e| e.into_inner())
}

impl MsixInterrupt {
    fn raise(&self, vector: u16, isr_bit: u8) {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        if vector != NO_VECTOR {
            lock_msix(&self.msix).trigger(vector);
        }
    }
}

impl Interrupt for MsixInterrupt {
    fn notify_queue(&self, queue: u16) {
        let vector = self
            .queue_vectors
            .get(usize::from(queue))
            .copied()
            .unwrap_or(NO_VECTOR);
        self.raise(vector, 1);
    }

    fn notify_config(&self) {
        self.raise(self.config_vector, 2);
    }
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfig,
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    vm: Option<Arc<VmFd>>,
    kicks: Vec<EventFd>,
    notify_base: Option<u64>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    config_vector: u16,
    /// Register writes are replaying a snapshot: queues resume where they stood.
    restoring: bool,
    queues: Vec<QueueConfig>,
}

fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    // virtio_pci_cap after the ID and next pointer: cap_len, cfg_type, bar, id, padding[2],
    // offset, length, then (notify only) the multiplier.
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    body
}

impl VirtioPciDevice {
    /// Wraps `device` with BAR 0 at `bar_addr`; interrupts go through `sink` (one vector per
    /// queue plus one for configuration changes). With `vm`, queue notifications use
    /// ioeventfds; without (unit tests), they arrive as BAR writes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        bar_addr: u64,
        sink: Box<dyn MsiSink>,
        vm: Option<Arc<VmFd>>,
    ) -> Result<Self, Error> {
        let device_type = device.device_type();
        let mut config = PciConfig::new(PciId {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device_type,
            class: class_of(device_type),
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        config.add_bar(
            0,
            bar_addr,
            Bar {
                size: BAR_SIZE,
                is_64bit: false,
            },
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &vendor_cap(CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &vendor_cap(CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &vendor_cap(CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE, &[]),
        )?;
        config.add_capability(
            PCI_CAP_ID_VENDOR,
            &vendor_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
        )?;
        let max_sizes = device.queue_max_sizes();
        let vectors = max_sizes.len() as u16 + 1;
        let msix = Msix::new(
            &mut config,
            vectors,
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
            sink,
        )?;
        let kicks = max_sizes
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            msix: Arc::new(Mutex::new(msix)),
            isr: Arc::new(AtomicU8::new(0)),
            device,
            mem,
            vm,
            kicks,
            notify_base: None,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            restoring: false,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
        })
    }

    fn msix(&self) -> MutexGuard<'_, Msix> {
        lock_msix(&self.msix)
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let value: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        // Queue and feature setup is frozen once the driver is running; a driver that wants to
        // change it must reset the device first.
        let running = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features = (self.driver_features & !mask) | ((value << shift) & mask);
            }
            0x10 => self.config_vector = value as u16,
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if !running => {
                let size = value as u16;
                if let Some(q) = self.selected() {
                    if size.is_power_of_two() && size <= q.max_size {
                        q.size = size;
                    }
                }
            }
            0x1a if !running => {
                if let Some(q) = self.selected() {
                    q.vector = value as u16;
                }
            }
            0x1c if !running => {
                if let Some(q) = self.selected() {
                    q.ready = value & 1 == 1;
                }
            }
            0x20..=0x37 if !running => {
                let reg = offset & !7;
                let high = offset & 4 != 0;
                if let Some(q) = self.selected() {
                    let field = match reg {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if high {
                        (*field & 0xffff_ffff) | (value << 32)
                    } else if data.len() == 8 {
                        value
                    } else {
                        (*field & !0xffff_ffff) | (value & 0xffff_ffff)
                    };
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            let version_1 = self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if self.driver_features & !offered != 0 || !version_1 {
                // Refuse: the driver reads status back and sees FEATURES_OK missing.
                self.status = status & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = status;
        if newly & STATUS_DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                tracing::error!("virtio-pci: {e}");
                self.status |= STATUS_DEVICE_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
            }
        }
    }

    fn activate(&mut self) -> Result<(), super::ActivateError> {
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, qc) in self.queues.iter().enumerate() {
            let bad = |what: &str| super::ActivateError::BadSetup(format!("queue {i}: {what}"));
            let mut q = Queue::new(qc.max_size).map_err(|e| bad(&format!("{e:?}")))?;
            q.set_size(qc.size);
            q.set_desc_table_address(Some(qc.desc as u32), Some((qc.desc >> 32) as u32));
            q.set_avail_ring_address(Some(qc.avail as u32), Some((qc.avail >> 32) as u32));
            q.set_used_ring_address(Some(qc.used as u32), Some((qc.used >> 32) as u32));
            q.set_event_idx(event_idx);
            q.set_ready(qc.ready);
            if qc.ready && !q.is_valid(&self.mem) {
                return Err(bad("rings outside guest memory or misaligned"));
            }
            if self.restoring && qc.ready {
                // Restored from a snapshot taken with the device quiesced: every request taken
                // from the ring was answered, so the next one to take is the next one to answer.
                let idx: u16 = self
                    .mem
                    .read_obj(vm_memory::GuestAddress(qc.used + 2))
                    .map_err(|_| bad("used ring outside guest memory"))?;
                q.set_next_avail(idx);
                q.set_next_used(idx);
            }
            queues.push(ActiveQueue {
                queue: q,
                kick: self.kicks[i].try_clone()?,
            });
        }
        let interrupt = Arc::new(MsixInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector,
        });
        self.device.activate(Activation {
            mem: self.mem.clone(),
            acked_features: self.driver_features,
            queues,
            interrupt,
            restored: self.restoring,
        })
    }

    fn reset(&mut self) {
        self.device.reset();
        // Kicks left over from before the reset must not wake the next activation.
        for k in &self.kicks {
            let _ = k.read();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.isr.store(0, Ordering::SeqCst);
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }

    fn set_ioeventfds(&mut self, base: Option<u64>) {
        let Some(vm) = self.vm.clone() else { return };
        let addr = |b: u64, q: usize| IoEventAddress::Mmio(b + NOTIFY_OFFSET + 4 * q as u64);
        if let Some(old) = self.notify_base.take() {
            for (q, kick) in self.kicks.iter().enumerate() {
                if let Err(e) = vm.unregister_ioevent(kick, &addr(old, q), NoDatamatch) {
                    tracing::warn!("virtio-pci: unregistering queue {q} notification: {e}");
                }
            }
        }
        if let Some(new) = base {
            for (q, kick) in self.kicks.iter().enumerate() {
                if let Err(e) = vm.register_ioevent(kick, &addr(new, q), NoDatamatch) {
                    // The BAR write path below still delivers the kick, just through an exit.
                    tracing::warn!("virtio-pci: queue {q} notification ioeventfd: {e}");
                }
            }
            self.notify_base = Some(new);
        }
    }
}

/// PCI class of a virtio device type.
fn class_of(device_type: u16) -> (u8, u8, u8) {
    match device_type {
        1 => (0x02, 0x00, 0x00),  // network controller
        2 => (0x01, 0x80, 0x00),  // mass storage, other
        19 => (0x07, 0x80, 0x00), // communication controller, other
        _ => (0xff, 0x00, 0x00),
    }
}

fn in_region(offset: u64, len: usize, start: u64, size: u64) -> Option<u64> {
    (offset >= start && offset + len as u64 <= start + size).then(|| offset - start)
}

impl PciDevice for VirtioPciDevice {
    fn config(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, _offset: usize) {
        let mut msix = lock_msix(&self.msix);
        msix.config_written(&mut self.config);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let len = data.len();
        if let Some(o) = in_region(offset, len, COMMON_OFFSET, COMMON_SIZE) {
            self.common_read(o, data);
        } else if in_region(offset, len, ISR_OFFSET, ISR_SIZE).is_some() {
            // Reading the ISR acknowledges it.
            data[0] = self.isr.swap(0, Ordering::SeqCst);
        } else if let Some(o) = in_region(offset, len, DEVICE_OFFSET, DEVICE_SIZE) {
            self.device.read_config(o, data);
        } else if let Some(o) = in_region(offset, len, MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) {
            self.msix().table_read(o, data);
        } else if let Some(o) = in_region(offset, len, MSIX_PBA_OFFSET, MSIX_PBA_SIZE) {
            self.msix().pba_read(o, data);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let len = data.len();
        if let Some(o) = in_region(offset, len, COMMON_OFFSET, COMMON_SIZE) {
            self.common_write(o, data);
        } else if let Some(o) = in_region(offset, len, DEVICE_OFFSET, DEVICE_SIZE) {
            self.device.write_config(o, data);
        } else if let Some(o) = in_region(offset, len, NOTIFY_OFFSET, NOTIFY_SIZE) {
            let q = (o / u64::from(NOTIFY_MULTIPLIER)) as usize;
            if let Some(kick) = self.kicks.get(q) {
                let _ = kick.write(1);
            }
        } else if let Some(o) = in_region(offset, len, MSIX_TABLE_OFFSET, MSIX_TABLE_SIZE) {
            self.msix().table_write(o, data);
        }
    }

    fn bar_mapped(&mut self, bar: usize, addr: Option<u64>) {
        if bar == 0 {
            self.set_ioeventfds(addr);
        }
    }

    fn pause(&mut self) -> Result<(), crate::devices::PauseError> {
        self.device.pause()
    }

    fn save_registers(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut w: Vec<(u64, Vec<u8>)> = Vec::new();
        let vectors = self.queues.len() as u64 + 1;
        for v in 0..vectors {
            for dword in 0..4 {
                let off = v * 16 + dword * 4;
                let mut b = [0u8; 4];
                self.msix().table_read(off, &mut b);
                w.push((MSIX_TABLE_OFFSET + off, b.to_vec()));
            }
        }
        for sel in 0..2u32 {
            w.push((COMMON_OFFSET + 0x08, sel.to_le_bytes().to_vec()));
            let half = (self.driver_features >> (32 * sel)) as u32;
            w.push((COMMON_OFFSET + 0x0c, half.to_le_bytes().to_vec()));
        }
        w.push((
            COMMON_OFFSET + 0x10,
            self.config_vector.to_le_bytes().to_vec(),
        ));
        for (i, q) in self.queues.iter().enumerate() {
            let c = |o: u64, b: Vec<u8>| (COMMON_OFFSET + o, b);
            w.push(c(0x16, (i as u16).to_le_bytes().to_vec()));
            w.push(c(0x18, q.size.to_le_bytes().to_vec()));
            w.push(c(0x1a, q.vector.to_le_bytes().to_vec()));
            for (o, addr) in [(0x20, q.desc), (0x28, q.avail), (0x30, q.used)] {
                w.push(c(o, (addr as u32).to_le_bytes().to_vec()));
                w.push(c(o + 4, ((addr >> 32) as u32).to_le_bytes().to_vec()));
            }
            if q.ready {
                w.push(c(0x1c, 1u16.to_le_bytes().to_vec()));
            }
        }
        // Status last, in the order a driver sets it: DRIVER_OK activates the device.
        let mut built = 0u8;
        for bit in [1u8, 2, STATUS_FEATURES_OK, STATUS_DRIVER_OK] {
            if self.status & bit != 0 {
                built |= bit;
                w.push((COMMON_OFFSET + 0x14, vec![built]));
            }
        }
        w
    }

    fn restore_registers(&mut self, writes: &[(u64, Vec<u8>)]) {
        self.restoring = true;
        for (off, data) in writes {
            self.bar_write(0, *off, data);
        }
        self.restoring = false;
    }

    fn resume(&mut self) {
        self.device.resume()
    }
}
