//! virtio-blk behind the virtio-pci transport, driven by a simulated driver over guest memory:
//! feature negotiation, queue setup, a request through the notification doorbell, the MSI-X
//! interrupt, and reset.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::{Block, BlockOptions};
use super::pci::VirtioPciDevice;
use super::*;
use crate::config::OnError;
use crate::devices::pci::msix::{MsiMessage, MsiSink};
use crate::devices::pci::root::PciDevice;
use crate::devices::VmEvent;
use ::block::{DiskBackend, Format, ImageDisk};

const COMMON: u64 = 0x0000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HDR: u64 = 0x20000;
const DATA: u64 = 0x21000;
const STATUS: u64 = 0x22000;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

#[derive(Clone, Default)]
struct CountingSink(Arc<AtomicUsize>);

impl MsiSink for CountingSink {
    fn route(&self, _vector: u16, _message: Option<MsiMessage>) {}
    fn fire(&self, _vector: u16) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

struct Driver {
    dev: VirtioPciDevice,
    mem: GuestMemoryMmap,
    fired: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
    disk: Vec<u8>,
}

impl Driver {
    fn new(read_only: bool) -> Self {
        Self::build(read_only, false)
    }

    /// A driver whose device serves `disk` from a raw file (io_uring), or from a qcow2 image
    /// (the thread-pool engine) when `qcow2`.
    fn build(read_only: bool, qcow2: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        let backend: Box<dyn DiskBackend> = if qcow2 {
            let path = dir.path().join("disk.qcow2");
            let opts = qcow::CreateOptions {
                size: Some(disk.len() as u64),
                cluster_size: 4096,
                ..Default::default()
            };
            qcow::create(&path, &opts).unwrap();
            let writable = qcow::OpenOptions {
                writable: true,
                ..Default::default()
            };
            let image = qcow::Image::open(&path, &writable).unwrap();
            image.write_at(0, &disk).unwrap();
            image.close().unwrap();
            Box::new(ImageDisk::open(&path, Some(Format::Qcow2), read_only, false).unwrap())
        } else {
            let path = dir.path().join("disk.raw");
            std::fs::File::create(&path)
                .unwrap()
                .write_all(&disk)
                .unwrap();
            Box::new(ImageDisk::open(&path, Some(Format::Raw), read_only, false).unwrap())
        };
        let (drv, _) = Self::with_backend(backend, read_only, OnError::Report, dir, disk);
        drv
    }

    /// A driver whose device serves `backend`, with the VM's event channel.
    fn with_backend(
        backend: Box<dyn DiskBackend>,
        read_only: bool,
        on_error: OnError,
        dir: tempfile::TempDir,
        disk: Vec<u8>,
    ) -> (Self, std::sync::mpsc::Receiver<VmEvent>) {
        let (exit, events) = crate::builder::steps::exit_channel();
        let block = Block::new(
            backend,
            &BlockOptions {
                read_only,
                serial: "sim".into(),
                num_queues: 1,
                on_error,
                name: "disk 0 (sim)".into(),
                stall: exit,
            },
        );
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let sink = CountingSink::default();
        let fired = sink.0.clone();
        let dev = VirtioPciDevice::new(
            Box::new(block),
            mem.clone(),
            0xc000_0000,
            Box::new(sink),
            None,
        )
        .unwrap();
        let drv = Self {
            dev,
            mem,
            fired,
            _dir: dir,
            disk,
        };
        (drv, events)
    }

    fn w(&mut self, offset: u64, data: &[u8]) {
        self.dev.bar_write(0, offset, data);
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.dev.bar_read(0, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn status(&mut self) -> u8 {
        let mut d = [0u8; 1];
        self.dev.bar_read(0, COMMON + 0x14, &mut d);
        d[0]
    }

    fn set_status(&mut self, s: u8) {
        self.w(COMMON + 0x14, &[s]);
    }

    fn device_features(&mut self) -> u64 {
        self.w(COMMON, &0u32.to_le_bytes());
        let lo = self.r32(COMMON + 4);
        self.w(COMMON, &1u32.to_le_bytes());
        let hi = self.r32(COMMON + 4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn ack_features(&mut self, f: u64) {
        self.w(COMMON + 0x08, &0u32.to_le_bytes());
        self.w(COMMON + 0x0c, &(f as u32).to_le_bytes());
        self.w(COMMON + 0x08, &1u32.to_le_bytes());
        self.w(COMMON + 0x0c, &((f >> 32) as u32).to_le_bytes());
    }

    fn enable_msix(&mut self) {
        // Find the MSI-X capability and set its enable bit.
        let cfg = self.dev.config();
        let mut ptr = (cfg.read_reg(0x34 / 4) & 0xff) as usize;
        while cfg.read_reg(ptr / 4) & 0xff != 0x11 {
            ptr = ((cfg.read_reg(ptr / 4) >> 8) & 0xff) as usize;
            assert_ne!(ptr, 0, "no MSI-X capability");
        }
        cfg.write(ptr + 3, &[0x80]);
        self.dev.config_written(ptr + 3);
        // Vector 0: some address, unmasked.
        self.w(MSIX_TABLE, &0xfee0_0000u64.to_le_bytes());
        self.w(MSIX_TABLE + 8, &0x30u32.to_le_bytes());
        self.w(MSIX_TABLE + 12, &0u32.to_le_bytes());
    }

    fn setup_queue(&mut self) {
        self.w(COMMON + 0x16, &0u16.to_le_bytes());
        self.w(COMMON + 0x18, &16u16.to_le_bytes());
        self.w(COMMON + 0x1a, &0u16.to_le_bytes());
        self.w(COMMON + 0x20, &DESC.to_le_bytes());
        self.w(COMMON + 0x28, &AVAIL.to_le_bytes());
        self.w(COMMON + 0x30, &USED.to_le_bytes());
        self.w(COMMON + 0x1c, &1u16.to_le_bytes());
    }

    fn bring_up(&mut self) {
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = self.device_features();
        assert_ne!(offered & (1 << VIRTIO_F_VERSION_1), 0);
        self.ack_features(1 << VIRTIO_F_VERSION_1);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        assert_ne!(self.status() & STATUS_FEATURES_OK, 0);
        self.enable_msix();
        self.setup_queue();
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(self.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(DESC + 16 * i);
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, GuestAddress(a.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a.0 + 14)).unwrap();
    }

    /// Submits a read of one sector and waits for it to complete.
    fn read_sector(&mut self, sector: u64, avail_idx: u16) -> (u8, Vec<u8>) {
        self.submit_sector(false, sector, avail_idx, 0);
        assert!(
            self.wait_used(avail_idx + 1, Duration::from_secs(10)),
            "request not completed"
        );
        let slot = u64::from(avail_idx % 16);
        let used_len: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
            .unwrap();
        assert_eq!(used_len, 513);
        let mut data = vec![0u8; 512];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), data)
    }

    /// Puts a one-sector read or write (its header, data and status in descriptors 3k..3k+2
    /// for chain `k`, data at DATA + 512k) in the available ring as entry `avail_idx`, and
    /// kicks.
    fn submit_sector(&mut self, write: bool, sector: u64, avail_idx: u16, k: u16) {
        let (hdr, data, status) = (
            HDR + 16 * u64::from(k),
            DATA + 512 * u64::from(k),
            STATUS + u64::from(k),
        );
        self.mem
            .write_obj(u32::from(write), GuestAddress(hdr))
            .unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let d = u64::from(3 * k);
        let data_flags = if write { 0 } else { VRING_DESC_F_WRITE };
        self.desc(d, hdr, 16, VRING_DESC_F_NEXT, 3 * k + 1);
        self.desc(d + 1, data, 512, data_flags | VRING_DESC_F_NEXT, 3 * k + 2);
        self.desc(d + 2, status, 1, VRING_DESC_F_WRITE, 0);
        let slot = u64::from(avail_idx % 16);
        self.mem
            .write_obj(3 * k, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.mem
            .write_obj(avail_idx + 1, GuestAddress(AVAIL + 2))
            .unwrap();
        self.w(NOTIFY, &0u16.to_le_bytes());
    }

    /// The used index, once it reaches `idx` (false when `within` passes first).
    fn wait_used(&self, idx: u16, within: Duration) -> bool {
        let start = Instant::now();
        while self.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != idx {
            if start.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

#[test]
fn simulated_driver_reads_through_the_queue_and_gets_an_interrupt() {
    let mut drv = Driver::new(false);
    drv.bring_up();
    let (status, data) = drv.read_sector(3, 0);
    assert_eq!(status, 0);
    assert_eq!(data, drv.disk[1536..2048]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while drv.fired.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no MSI-X interrupt");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (status, data) = drv.read_sector(100, 1);
    assert_eq!(status, 0);
    assert_eq!(data, drv.disk[51200..51712]);

    // Reset stops the device; it can be brought up again from scratch.
    drv.set_status(0);
    assert_eq!(drv.status(), 0);
    drv.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    drv.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    drv.bring_up();
    let (status, data) = drv.read_sector(7, 0);
    assert_eq!(status, 0);
    assert_eq!(data, drv.disk[3584..4096]);
}

#[test]
fn a_qcow2_disk_is_served_through_the_thread_pool_and_survives_reset() {
    let mut drv = Driver::build(false, true);
    drv.bring_up();
    for (i, sector) in [3u64, 100, 0, 127].into_iter().enumerate() {
        let (status, data) = drv.read_sector(sector, i as u16);
        assert_eq!(status, 0);
        let off = sector as usize * 512;
        assert_eq!(data, drv.disk[off..off + 512], "sector {sector}");
    }
    drv.set_status(0);
    assert_eq!(drv.status(), 0);
    drv.mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    drv.mem.write_obj(0u16, GuestAddress(AVAIL + 2)).unwrap();
    drv.bring_up();
    let (status, data) = drv.read_sector(64, 0);
    assert_eq!(status, 0);
    assert_eq!(data, drv.disk[32768..33280]);
}

#[test]
fn features_without_version_1_are_refused() {
    let mut drv = Driver::new(true);
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    let offered = drv.device_features();
    assert_ne!(
        offered & (1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO),
        0
    );
    drv.ack_features(offered & !(1 << VIRTIO_F_VERSION_1));
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(drv.status() & STATUS_FEATURES_OK, 0);
    // Features the device never offered are not accepted either.
    drv.ack_features((1 << VIRTIO_F_VERSION_1) | (1 << 40));
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    assert_eq!(drv.status() & STATUS_FEATURES_OK, 0);
}

#[test]
fn rings_outside_memory_need_a_reset() {
    let mut drv = Driver::new(false);
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    drv.ack_features(1 << VIRTIO_F_VERSION_1);
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    drv.setup_queue();
    drv.w(COMMON + 0x20, &(1u64 << 40).to_le_bytes());
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_ne!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn block_config_space() {
    let mut drv = Driver::new(false);
    let mut cap = [0u8; 8];
    drv.dev.bar_read(0, 0x2000, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 65536 / 512, "capacity in sectors");
    let mut nq = [0u8; 2];
    drv.dev.bar_read(0, 0x2000 + 34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 1);
}

/// A disk in memory whose writes fail with ENOSPC while `full` is set.
struct Filling {
    inner: ::block::MemoryDisk,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl DiskBackend for Filling {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(
        &mut self,
        offset: u64,
        bufs: &[vm_memory::VolatileSlice<'_>],
    ) -> std::io::Result<()> {
        self.inner.read_at(offset, bufs)
    }
    fn write_at(
        &mut self,
        offset: u64,
        bufs: &[vm_memory::VolatileSlice<'_>],
    ) -> std::io::Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(offset, bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

fn filling_driver(
    on_error: OnError,
) -> (
    Driver,
    Arc<std::sync::atomic::AtomicBool>,
    std::sync::mpsc::Receiver<VmEvent>,
) {
    let disk: Vec<u8> = (0..65536u32).map(|i| (i * 3) as u8).collect();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let backend = Filling {
        inner: ::block::MemoryDisk::new(disk.clone()),
        full: full.clone(),
    };
    let (mut drv, events) = Driver::with_backend(
        Box::new(backend),
        false,
        on_error,
        tempfile::tempdir().unwrap(),
        disk,
    );
    drv.bring_up();
    (drv, full, events)
}

#[test]
fn a_write_failing_on_a_full_host_disk_waits_for_resume_and_then_goes_through() {
    let (mut drv, full, events) = filling_driver(OnError::Pause);
    let payload = [0x5au8; 512];
    drv.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    drv.submit_sector(true, 9, 0, 0);
    // Not answered: the VM is asked to pause instead.
    match events.recv_timeout(Duration::from_secs(10)) {
        Ok(VmEvent::Stall(why)) => assert!(
            why.contains("disk 0 (sim)") && why.contains("No space left"),
            "{why}"
        ),
        other => panic!("expected a stall, got {other:?}"),
    }
    assert!(
        !drv.wait_used(1, Duration::from_millis(200)),
        "the failed write was answered"
    );
    assert_eq!(drv.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    // A later request waits behind it, even a read.
    drv.submit_sector(false, 2, 1, 1);
    assert!(
        !drv.wait_used(1, Duration::from_millis(200)),
        "served while stalled"
    );
    // A resume before the host is fixed: the retry fails, the VM is asked to pause again.
    drv.dev.pause().unwrap();
    drv.dev.resume();
    assert!(matches!(
        events.recv_timeout(Duration::from_secs(10)),
        Ok(VmEvent::Stall(_))
    ));
    assert!(!drv.wait_used(1, Duration::from_millis(200)));
    // Space freed, VM paused and resumed: both go through, in order, without an error.
    full.store(false, Ordering::SeqCst);
    drv.dev.pause().unwrap();
    drv.dev.resume();
    assert!(
        drv.wait_used(2, Duration::from_secs(10)),
        "not retried on resume"
    );
    assert_eq!(
        drv.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "write status"
    );
    assert_eq!(
        drv.mem.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        0,
        "read status"
    );
    let (status, data) = drv.read_sector(9, 2);
    assert_eq!((status, &data[..]), (0, &payload[..]), "the write landed");
    assert!(events.try_recv().is_err(), "no further stall");
}

#[test]
fn with_on_error_report_the_guest_gets_the_error() {
    let (mut drv, _full, events) = filling_driver(OnError::Report);
    drv.submit_sector(true, 9, 0, 0);
    assert!(drv.wait_used(1, Duration::from_secs(10)));
    assert_eq!(
        drv.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8
    );
    assert!(events.try_recv().is_err(), "no stall with on-error=report");
    let (status, _) = drv.read_sector(2, 1);
    assert_eq!(status, 0, "reads go on");
}
