//! virtio-blk over modern virtio-pci (virtio 1.x): one split queue, one request at a time,
//! polled. Loaders read kernels of tens of MiB through this, so requests are large (up to 1 MiB)
//! rather than a block at a time: every notification is a VM exit.

use core::sync::atomic::{fence, Ordering};

use crate::block::{BlockDevice, IoError};
use crate::memmap::{kind, Placement};
use crate::pci::{BarWindow, Function};
use crate::racy::Racy;
use crate::timer;

/// Requests, bytes and microseconds spent waiting on every disk, for the boot-time line at
/// ExitBootServices.
static STATS: Racy<(u64, u64, u64)> = Racy::new((0, 0, 0));

/// (requests, bytes, µs waited) so far.
pub fn stats() -> (u64, u64, u64) {
    STATS.get()
}

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_BLK_MODERN: u16 = 0x1042;
const VIRTIO_BLK_TRANSITIONAL: u16 = 0x1001;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

const F_SIZE_MAX: u32 = 1 << 1;
const F_RO: u32 = 1 << 5;
const F_FLUSH: u32 = 1 << 9;
/// VIRTIO_F_VERSION_1 (bit 32: bit 0 of the second feature word).
const F_VERSION_1_HIGH: u32 = 1;

const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;

const QUEUE_SIZE: u16 = 16;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const SECTOR: u64 = 512;
const MAX_REQUEST: u64 = 1 << 20;
const REQUEST_TIMEOUT_US: u64 = 30_000_000;

/// A virtio-blk device, ready for requests.
pub struct VirtioBlk {
    /// Where it sits on PCI (for its device path).
    pub pci: Function,
    common: u64,
    notify: u64,
    sectors: u64,
    read_only: bool,
    flush: bool,
    max_request: u64,
    ring: u64,
    /// Request header and status byte live here (driver-owned, identity-mapped).
    scratch: u64,
    avail_idx: core::cell::Cell<u16>,
    used_seen: core::cell::Cell<u16>,
}

fn r8(a: u64) -> u8 {
    // SAFETY: `a` is inside a BAR of a device we own (or our queue page).
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn r16(a: u64) -> u16 {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
fn r32(a: u64) -> u32 {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
fn w8(a: u64, v: u8) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
fn w16(a: u64, v: u16) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
fn w32(a: u64, v: u32) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
fn w64(a: u64, v: u64) {
    w32(a, v as u32);
    w32(a + 4, (v >> 32) as u32);
}

/// Why a device could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// A capability or BAR is missing.
    Missing(&'static str),
    /// The device refused our features.
    FeaturesRejected,
    /// No memory for the queue.
    NoMemory,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self {
            SetupError::Missing(what) => write!(f, "no {what}"),
            SetupError::FeaturesRejected => write!(f, "the device rejected VIRTIO_F_VERSION_1"),
            SetupError::NoMemory => write!(f, "no memory for its queue"),
        }
    }
}

/// Whether `f` is a virtio-blk device.
pub fn is_virtio_blk(f: &Function) -> bool {
    let (vendor, device) = f.ids();
    vendor == VIRTIO_VENDOR && (device == VIRTIO_BLK_MODERN || device == VIRTIO_BLK_TRANSITIONAL)
}

impl VirtioBlk {
    /// Resets and initializes the device at `pci`.
    pub fn new(pci: Function, window: &mut BarWindow) -> Result<Self, SetupError> {
        let mut common = None;
        let mut notify = None;
        let mut device = None;
        let caps: alloc::vec::Vec<(u8, u8)> = pci.capabilities().collect();
        for (id, at) in caps {
            if id != CAP_VENDOR {
                continue;
            }
            let cfg_type = pci.read8(at + 3);
            let bar = pci.read8(at + 4);
            let offset = u64::from(pci.read32(at + 8));
            if bar > 5 {
                continue;
            }
            let Some(base) = pci.memory_bar(bar, window) else {
                continue;
            };
            match cfg_type {
                CFG_COMMON if common.is_none() => common = Some(base + offset),
                CFG_NOTIFY if notify.is_none() => {
                    notify = Some((base + offset, pci.read32(at + 16)));
                }
                CFG_DEVICE if device.is_none() => device = Some(base + offset),
                _ => {}
            }
        }
        pci.enable();
        let common = common.ok_or(SetupError::Missing("common configuration capability"))?;
        let (notify_base, notify_mult) = notify.ok_or(SetupError::Missing("notify capability"))?;
        let device = device.ok_or(SetupError::Missing("device configuration capability"))?;

        // Reset, and wait for the device to say it is done.
        w8(common + 0x14, 0);
        let deadline = timer::now_us() + 1_000_000;
        while r8(common + 0x14) != 0 && timer::now_us() < deadline {}
        w8(common + 0x14, STATUS_ACKNOWLEDGE);
        w8(common + 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(common, 0);
        let features = r32(common + 4);
        w32(common + 0x08, 0);
        let wanted = features & (F_SIZE_MAX | F_RO | F_FLUSH);
        w32(common + 0x0c, wanted);
        w32(common + 0x08, 1);
        w32(common + 0x0c, F_VERSION_1_HIGH);
        w8(
            common + 0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        if r8(common + 0x14) & STATUS_FEATURES_OK == 0 {
            w8(common + 0x14, STATUS_FAILED);
            return Err(SetupError::FeaturesRejected);
        }

        // Queue 0 in one page: descriptors, then the available ring, then the used ring.
        w16(common + 0x16, 0);
        let max = r16(common + 0x18);
        let size = if max == 0 {
            QUEUE_SIZE
        } else {
            max.min(QUEUE_SIZE)
        };
        // SAFETY: boot-time only, no other borrow of the memory map is alive here.
        let ring = unsafe { crate::MEMORY.borrow() }
            .allocate(Placement::Any, kind::BOOT_DATA, 2)
            .map_err(|_| SetupError::NoMemory)?;
        // SAFETY: we just allocated these two pages.
        unsafe { core::ptr::write_bytes(ring as *mut u8, 0, 8192) };
        w16(common + 0x18, size);
        w64(common + 0x20, ring);
        w64(common + 0x28, ring + 1024);
        w64(common + 0x30, ring + 2048);
        let notify_off = u64::from(r16(common + 0x1e));
        w16(common + 0x1c, 1);
        w8(
            common + 0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );

        let max_request = if wanted & F_SIZE_MAX != 0 {
            // size_max bounds one segment; our data is one segment.
            u64::from(r32(device + 8)).clamp(SECTOR, MAX_REQUEST) & !(SECTOR - 1)
        } else {
            MAX_REQUEST
        };
        Ok(Self {
            pci,
            common,
            notify: notify_base + notify_off * u64::from(notify_mult),
            sectors: u64::from(r32(device)) | (u64::from(r32(device + 4)) << 32),
            read_only: wanted & F_RO != 0,
            flush: wanted & F_FLUSH != 0,
            max_request,
            ring,
            scratch: ring + 4096,
            avail_idx: core::cell::Cell::new(0),
            used_seen: core::cell::Cell::new(0),
        })
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Puts the device back into reset, so the OS finds it untouched and our queue memory can
    /// be reused (called at ExitBootServices).
    pub fn reset(&self) {
        w8(self.common + 0x14, 0);
    }

    fn request(
        &self,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
        device_writes: bool,
    ) -> Result<(), IoError> {
        let header = self.scratch;
        let status = self.scratch + 16;
        w32(header, kind);
        w32(header + 4, 0);
        w64(header + 8, sector);
        w8(status, 0xff);
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let d = self.ring + 16 * i;
            w64(d, addr);
            w32(d + 8, len);
            w16(d + 12, flags);
            w16(d + 14, next);
        };
        desc(0, header, 16, DESC_NEXT, 1);
        if len > 0 {
            desc(
                1,
                data,
                len,
                DESC_NEXT | if device_writes { DESC_WRITE } else { 0 },
                2,
            );
            desc(2, status, 1, DESC_WRITE, 0);
        } else {
            desc(0, header, 16, DESC_NEXT, 2);
            desc(2, status, 1, DESC_WRITE, 0);
        }
        let avail = self.ring + 1024;
        let idx = self.avail_idx.get();
        let size = r16(self.common + 0x18).max(1);
        w16(avail + 4 + 2 * u64::from(idx % size), 0);
        fence(Ordering::SeqCst);
        let next = idx.wrapping_add(1);
        w16(avail + 2, next);
        self.avail_idx.set(next);
        fence(Ordering::SeqCst);
        w16(self.notify, 0);
        let used = self.ring + 2048;
        let started = timer::now_us();
        let deadline = started + REQUEST_TIMEOUT_US;
        loop {
            fence(Ordering::SeqCst);
            if r16(used + 2) != self.used_seen.get() {
                break;
            }
            if timer::now_us() > deadline {
                crate::log!(
                    "virtio-blk {:02x}.{}: request timed out",
                    self.pci.device,
                    self.pci.function
                );
                return Err(IoError);
            }
            crate::io::pause();
        }
        self.used_seen.set(self.used_seen.get().wrapping_add(1));
        let (n, bytes, us) = STATS.get();
        STATS.set((
            n + 1,
            bytes + u64::from(len),
            us + (timer::now_us() - started),
        ));
        fence(Ordering::SeqCst);
        match r8(status) {
            0 => Ok(()),
            s => {
                crate::log!("virtio-blk {:02x}.{}: request type {kind} at sector {sector} failed (status {s})", self.pci.device, self.pci.function);
                Err(IoError)
            }
        }
    }

    /// Writes whole sectors from `buf` at `lba`.
    pub fn write_blocks(&self, lba: u64, buf: &[u8]) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError);
        }
        self.transfer(REQ_OUT, lba, buf.as_ptr() as u64, buf.len() as u64)
    }

    /// Moves `len` bytes (whole sectors inside the disk) between `addr` and the disk at `lba`,
    /// in requests of at most `max_request` bytes.
    fn transfer(&self, kind: u32, lba: u64, addr: u64, len: u64) -> Result<(), IoError> {
        if len % SECTOR != 0
            || lba
                .checked_add(len / SECTOR)
                .is_none_or(|end| end > self.sectors)
        {
            return Err(IoError);
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.max_request);
            self.request(
                kind,
                lba + done / SECTOR,
                addr + done,
                n as u32,
                kind == REQ_IN,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Asks the device to make written data durable.
    pub fn flush(&self) -> Result<(), IoError> {
        if self.flush {
            self.request(REQ_FLUSH, 0, 0, 0, false)
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for VirtioBlk {
    fn block_size(&self) -> u32 {
        SECTOR as u32
    }

    fn num_blocks(&self) -> u64 {
        self.sectors
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.transfer(REQ_IN, lba, buf.as_mut_ptr() as u64, buf.len() as u64)
    }
}
