//! virtio-net behind the virtio-pci transport, driven by a simulated driver over guest memory,
//! with the TAP replaced by a SOCK_SEQPACKET socket pair (one record per frame, header
//! included, cut like a TAP's frame when longer than the buffers): transmit and
//! receive, mergeable buffers, waiting for room, malformed chains, pause/resume and reset.

use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress, VolatileSlice};

use super::tap::{iovecs, FrameIo, VNET_HDR_LEN};
use super::*;
use crate::devices::pci::root::PciDevice;
use crate::devices::virtio::sim::{
    rings, until, SimDriver, COMMON, DEVICE_CFG, F_NEXT, QSIZE, WAIT,
};
use crate::devices::virtio::{
    STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};

const RX_BUFS: u64 = 0x20000;
const TX_BUFS: u64 = 0x60000;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// The device end of the socket pair, standing in for a TAP.
struct FakeTap {
    fd: OwnedFd,
    offloads: Arc<Mutex<Vec<u32>>>,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn msg(iov: &mut [libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is plain data for which zero is valid.
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_mut_ptr();
    m.msg_iovlen = iov.len();
    m
}

impl FrameIo for FakeTap {
    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut iov = iovecs(bufs);
        let mut m = msg(&mut iov);
        // Like a TAP, a record longer than the buffers is cut to their length.
        // SAFETY: the iovecs point into guest memory (and the device's spare byte) borrowed by
        // `bufs` for this call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut m, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn write_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut iov = iovecs(bufs);
        let m = msg(&mut iov);
        // SAFETY: the iovecs point into guest memory borrowed by `bufs`, only read.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &m, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// The host end of the socket pair.
struct Host(OwnedFd);

impl Host {
    fn send(&self, record: &[u8]) {
        // SAFETY: `record` is a live buffer of the length given.
        let n = unsafe { libc::send(self.0.as_raw_fd(), record.as_ptr().cast(), record.len(), 0) };
        assert_eq!(n, record.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next record, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
        if r <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 70000];
        // SAFETY: `buf` is a live buffer of the length given.
        let n = unsafe {
            libc::recv(
                self.0.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        buf.truncate(n as usize);
        Some(buf)
    }
}

fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

struct Driver {
    sim: SimDriver,
    host: Host,
    offloads: Arc<Mutex<Vec<u32>>>,
    handle: NetHandle,
}

impl Deref for Driver {
    type Target = SimDriver;
    fn deref(&self) -> &SimDriver {
        &self.sim
    }
}

impl DerefMut for Driver {
    fn deref_mut(&mut self) -> &mut SimDriver {
        &mut self.sim
    }
}

/// An Ethernet frame of `len` bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![
        0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5,
    ];
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

/// A virtio-net header with some flags, and `num_buffers` deliberately wrong.
fn header() -> [u8; VNET_HDR_LEN] {
    [1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0xee, 0xee]
}

impl Driver {
    fn new() -> Self {
        Self::build(None)
    }

    /// A driver whose fake TAP takes at most about `sndbuf` bytes before pushing back.
    fn build(sndbuf: Option<libc::c_int>) -> Self {
        let (dev_end, host_end) = socket_pair();
        if let Some(size) = sndbuf {
            // SAFETY: SO_SNDBUF reads a c_int of the length given.
            let r = unsafe {
                libc::setsockopt(
                    dev_end.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            assert_eq!(r, 0);
        }
        let offloads = Arc::new(Mutex::new(Vec::new()));
        let tap = FakeTap {
            fd: dev_end,
            offloads: offloads.clone(),
        };
        let net = Net::new(Arc::new(tap), MAC);
        let handle = net.handle();
        Self {
            sim: SimDriver::new(Box::new(net)),
            host: Host(host_end),
            offloads,
            handle,
        }
    }

    /// Puts `hdr` + `frame` into guest memory split over two buffers and sends it.
    fn transmit(&mut self, at: u64, frame: &[u8]) -> u16 {
        self.mem.write_slice(&header(), GuestAddress(at)).unwrap();
        self.mem
            .write_slice(frame, GuestAddress(at + 0x100))
            .unwrap();
        let head = self.add_chain(
            TX,
            &[
                (at, VNET_HDR_LEN as u32, false),
                (at + 0x100, frame.len() as u32, false),
            ],
        );
        self.kick(TX);
        head
    }

    fn counters(&self) -> [u64; 6] {
        let c = self.handle.counters();
        [
            &c.rx_packets,
            &c.rx_bytes,
            &c.rx_dropped,
            &c.tx_packets,
            &c.tx_bytes,
            &c.tx_dropped,
        ]
        .map(|a| a.load(Ordering::SeqCst))
    }
}

fn record(f: &[u8]) -> Vec<u8> {
    let mut r = header().to_vec();
    r.extend_from_slice(f);
    r
}

#[test]
fn features_and_config_space() {
    let mut drv = Driver::new();
    let f = drv.device_features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit} not offered");
    }
    assert_eq!(
        f & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ),
        0
    );
    assert_eq!(drv.r(DEVICE_CFG, 6), MAC);
    assert_eq!(drv.r(DEVICE_CFG + 6, 2), [1, 0], "link up");
    assert_eq!(drv.r(DEVICE_CFG + 8, 2), [1, 0], "one queue pair");
    assert_eq!(drv.r(DEVICE_CFG + 10, 2), [0, 0]);
    // The PCI identity of a modern network device.
    let id = drv.dev.config().read_reg(0);
    assert_eq!(id, 0x1041_1af4);
}

#[test]
fn a_transmitted_frame_reaches_the_host_with_its_header() {
    let mut drv = Driver::new();
    drv.bring_up(1 << VIRTIO_NET_F_HOST_TSO4 | 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CSUM);
    let f = frame(1000, 1);
    let head = drv.transmit(TX_BUFS, &f);
    assert_eq!(drv.host.recv(WAIT).expect("frame on the host"), record(&f));
    drv.wait_used(TX, 1);
    assert_eq!(drv.used(TX, 0), (u32::from(head), 0));
    until("TX interrupt", || drv.fired(1) > 0);
    assert_eq!(drv.counters(), [0, 0, 0, 1, 1000, 0]);

    // Several at once, in order.
    let frames: Vec<_> = (0..5).map(|i| frame(60 + 100 * i, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        drv.transmit(TX_BUFS + 0x1000 * (i as u64 + 1), f);
    }
    for f in &frames {
        assert_eq!(drv.host.recv(WAIT).unwrap(), record(f));
    }
    drv.wait_used(TX, 6);
}

#[test]
fn a_full_tap_holds_frames_back_until_it_has_room() {
    let mut drv = Driver::build(Some(64 << 10));
    drv.bring_up(0);
    let frames: Vec<_> = (0..8).map(|i| frame(60000, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        drv.transmit(TX_BUFS + 0x10000 * i as u64, f);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(drv.used_idx(TX) < 8, "the TAP never pushed back");
    // As the host reads, the device sends the rest, in order and without loss.
    for f in &frames {
        assert_eq!(drv.host.recv(WAIT).expect("frame on the host"), record(f));
    }
    drv.wait_used(TX, 8);
    assert_eq!(drv.counters()[3..], [8, 480000, 0]);
}

#[test]
fn a_received_frame_fills_a_chain_and_interrupts() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    // The header and the frame in separate buffers, as a driver without mergeable buffers may.
    let h0 = drv.add_chain(RX, &[(RX_BUFS, 12, true), (RX_BUFS + 0x100, 1600, true)]);
    let h1 = drv.add_chain(RX, &[(RX_BUFS + 0x1000, 2048, true)]);
    drv.kick(RX);
    let f = frame(100, 7);
    drv.host.send(&record(&f));
    drv.wait_used(RX, 1);
    assert_eq!(drv.used(RX, 0), (u32::from(h0), 112));
    let hdr = drv.read(RX_BUFS, 12);
    assert_eq!(hdr[..10], header()[..10], "the TAP's header as it came");
    assert_eq!(hdr[10..], [1, 0], "num_buffers");
    assert_eq!(drv.read(RX_BUFS + 0x100, 100), f);
    until("RX interrupt", || drv.fired(0) > 0);

    let f = frame(1514, 8);
    drv.host.send(&record(&f));
    drv.wait_used(RX, 2);
    assert_eq!(drv.used(RX, 1), (u32::from(h1), 1526));
    assert_eq!(drv.read(RX_BUFS + 0x1000 + 12, 1514), f);
    assert_eq!(drv.counters(), [2, 1614, 0, 0, 0, 0]);
}

#[test]
fn a_frame_one_byte_too_long_is_dropped_and_an_exact_fit_is_not() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    let head = drv.add_chain(RX, &[(RX_BUFS, 12, true), (RX_BUFS + 0x100, 100, true)]);
    drv.kick(RX);
    drv.host.send(&record(&frame(101, 17)));
    let fits = frame(100, 18);
    drv.host.send(&record(&fits));
    drv.wait_used(RX, 1);
    assert_eq!(drv.used(RX, 0), (u32::from(head), 112));
    assert_eq!(drv.read(RX_BUFS + 0x100, 100), fits);
    assert_eq!(drv.counters()[..3], [1, 100, 1]);
}

#[test]
fn mergeable_buffers_take_a_frame_in_pieces() {
    let mut drv = Driver::new();
    drv.bring_up(1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_RING_F_EVENT_IDX);
    // Fewer buffers than a 64 KiB frame needs: the device waits for the driver to fill the ring.
    for i in 0..4 {
        drv.add_chain(RX, &[(RX_BUFS + 0x1000 * i, 1024, true)]);
    }
    drv.kick(RX);
    let f = frame(3000, 3);
    drv.host.send(&record(&f));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        drv.used_idx(RX),
        0,
        "read without room for the largest frame"
    );
    // With the ring full the device holds every buffer the driver can give, and reads.
    for i in 4..u64::from(QSIZE) {
        drv.add_chain(RX, &[(RX_BUFS + 0x1000 * i, 1024, true)]);
    }
    drv.kick(RX);
    drv.wait_used(RX, 3);
    assert_eq!(drv.used(RX, 0), (0, 1024));
    assert_eq!(drv.used(RX, 1), (1, 1024));
    assert_eq!(drv.used(RX, 2), (2, 3012 - 2048));
    assert_eq!(drv.read(RX_BUFS + 10, 2), [3, 0], "num_buffers");
    let mut got = drv.read(RX_BUFS + 12, 1012);
    got.extend(drv.read(RX_BUFS + 0x1000, 1024));
    got.extend(drv.read(RX_BUFS + 0x2000, 3012 - 2048));
    assert_eq!(got, f);

    // The driver gives back what it was handed; then a frame larger than the whole ring
    // (16 KiB) is dropped, and the buffers stay for the next frame.
    for i in 0..3 {
        drv.add_chain(RX, &[(RX_BUFS + 0x1000 * i, 1024, true)]);
    }
    drv.kick(RX);
    drv.host.send(&record(&frame(20000, 4)));
    let small = frame(500, 5);
    drv.host.send(&record(&small));
    drv.wait_used(RX, 4);
    assert_eq!(drv.used(RX, 3), (3, 512));
    assert_eq!(drv.read(RX_BUFS + 0x3000 + 10, 2), [1, 0]);
    assert_eq!(drv.read(RX_BUFS + 0x3000 + 12, 500), small);
    assert_eq!(drv.counters()[..3], [2, 3500, 1]);
    until("RX interrupt", || drv.fired(0) > 0);
}

#[test]
fn a_frame_waits_for_buffers_and_arrives_after_the_kick() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    let f = frame(200, 9);
    drv.host.send(&record(&f));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(drv.used_idx(RX), 0);
    assert_eq!(drv.counters()[2], 0, "nothing dropped while waiting");
    let head = drv.add_chain(RX, &[(RX_BUFS, 2048, true)]);
    drv.kick(RX);
    drv.wait_used(RX, 1);
    assert_eq!(drv.used(RX, 0), (u32::from(head), 212));
    assert_eq!(drv.read(RX_BUFS + 12, 200), f);
    // Out of buffers again, and again served once the driver adds one.
    drv.host.send(&record(&frame(300, 10)));
    drv.add_chain(RX, &[(RX_BUFS + 0x1000, 2048, true)]);
    drv.kick(RX);
    drv.wait_used(RX, 2);
    assert_eq!(drv.used(RX, 1).1, 312);
}

#[test]
fn malformed_chains_are_completed_and_the_device_keeps_serving() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    let f = frame(100, 11);
    drv.mem
        .write_slice(&record(&f), GuestAddress(TX_BUFS))
        .unwrap();
    // Transmit: a device-writable buffer, a buffer outside guest memory, a chain shorter than
    // the headers, one longer than any frame, then a good one.
    drv.add_chain(TX, &[(TX_BUFS, 112, true)]);
    drv.add_chain(TX, &[(TX_BUFS, 12, false), (1 << 40, 100, false)]);
    drv.add_chain(TX, &[(TX_BUFS, 20, false)]);
    drv.add_chain(TX, &[(TX_BUFS, 12, false), (TX_BUFS, 70000, false)]);
    drv.add_chain(TX, &[(TX_BUFS, 112, false)]);
    drv.kick(TX);
    drv.wait_used(TX, 5);
    for i in 0..5 {
        assert_eq!(drv.used(TX, i).1, 0);
    }
    assert_eq!(drv.host.recv(WAIT).unwrap(), record(&f));
    assert_eq!(drv.host.recv(Duration::from_millis(100)), None);
    assert_eq!(drv.counters()[3..], [1, 100, 4]);

    // A descriptor that chains to itself ends after the queue size, without hanging.
    let (table, ..) = rings(TX);
    let head = drv.add_chain(TX, &[(TX_BUFS, 112, false)]);
    drv.mem
        .write_obj(F_NEXT, GuestAddress(table + 16 * u64::from(head) + 12))
        .unwrap();
    drv.mem
        .write_obj(head, GuestAddress(table + 16 * u64::from(head) + 14))
        .unwrap();
    drv.kick(TX);
    drv.wait_used(TX, 6);
    while drv.host.recv(Duration::from_millis(50)).is_some() {}

    // Receive: a device-readable buffer, one outside guest memory, one too small for the header;
    // each is handed back empty, in order, and the frame lands in the good one after them.
    let bad = [
        drv.add_chain(RX, &[(RX_BUFS, 2048, false)]),
        drv.add_chain(RX, &[(1 << 40, 2048, true)]),
        drv.add_chain(RX, &[(RX_BUFS, 8, true)]),
    ];
    let good = drv.add_chain(RX, &[(RX_BUFS + 0x1000, 2048, true)]);
    drv.kick(RX);
    drv.host.send(&record(&f));
    drv.wait_used(RX, 4);
    for (i, h) in bad.iter().enumerate() {
        assert_eq!(drv.used(RX, i as u16), (u32::from(*h), 0));
    }
    assert_eq!(drv.used(RX, 3), (u32::from(good), 112));
    assert_eq!(drv.read(RX_BUFS + 0x1000 + 12, 100), f);

    // Still serving both ways.
    let g = frame(64, 12);
    drv.transmit(TX_BUFS + 0x2000, &g);
    assert_eq!(drv.host.recv(WAIT).unwrap(), record(&g));
}

#[test]
fn pause_holds_the_queues_and_resume_releases_them() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    drv.add_chain(RX, &[(RX_BUFS, 2048, true)]);
    drv.kick(RX);
    drv.dev.pause().unwrap();
    let rx = frame(400, 13);
    drv.host.send(&record(&rx));
    let tx = frame(300, 14);
    drv.transmit(TX_BUFS, &tx);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(drv.used_idx(RX), 0, "received while paused");
    assert_eq!(drv.used_idx(TX), 0, "transmitted while paused");
    assert_eq!(drv.host.recv(Duration::from_millis(10)), None);
    drv.dev.resume();
    assert_eq!(drv.host.recv(WAIT).unwrap(), record(&tx));
    drv.wait_used(TX, 1);
    drv.wait_used(RX, 1);
    assert_eq!(drv.read(RX_BUFS + 12, 400), rx);
}

#[test]
fn reset_stops_the_device_and_it_comes_back() {
    let mut drv = Driver::new();
    drv.bring_up(1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4);
    drv.add_chain(RX, &[(RX_BUFS, 2048, true)]);
    drv.kick(RX);
    let f = frame(100, 15);
    drv.host.send(&record(&f));
    drv.wait_used(RX, 1);
    drv.set_status(0);
    assert_eq!(drv.status(), 0);
    assert_eq!(
        drv.offloads.lock().unwrap().last(),
        Some(&0),
        "offloads cleared"
    );
    // Nothing is served between the reset and the next DRIVER_OK.
    drv.host.send(&record(&f));
    std::thread::sleep(Duration::from_millis(100));
    drv.bring_up(0);
    drv.add_chain(RX, &[(RX_BUFS + 0x1000, 2048, true)]);
    drv.kick(RX);
    drv.wait_used(RX, 1);
    assert_eq!(drv.read(RX_BUFS + 0x1000 + 12, 100), f);
    let g = frame(80, 16);
    drv.transmit(TX_BUFS, &g);
    assert_eq!(drv.host.recv(WAIT).unwrap(), record(&g));
}

#[test]
fn offloads_follow_the_acked_features() {
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tap_offloads(0), 0);
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
    assert_eq!(
        tap_offloads(
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_TSO6)
        ),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    // Segmentation without checksum offload is not a thing the TAP (or virtio) allows.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    // The host side offloads (CSUM, HOST_TSO) need nothing from the TAP but the header.
    assert_eq!(tap_offloads(bit(VIRTIO_NET_F_HOST_TSO4)), 0);

    let mut drv = Driver::new();
    assert_eq!(*drv.offloads.lock().unwrap(), Vec::<u32>::new());
    drv.bring_up(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO6));
    assert_eq!(
        drv.offloads.lock().unwrap().last(),
        Some(&(libc::TUN_F_CSUM | libc::TUN_F_TSO6))
    );
}

#[test]
fn closing_the_handle_releases_the_tap() {
    let mut drv = Driver::new();
    drv.bring_up(0);
    drv.handle.close();
    // The host end sees the device end go away.
    let mut p = libc::pollfd {
        fd: drv.host.0.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, 5000) };
    assert_eq!(r, 1);
    assert_ne!(p.revents & libc::POLLHUP, 0);
    // A driver starting again finds the device unusable rather than a crash.
    drv.set_status(0);
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    drv.w(COMMON + 0x08, &1u32.to_le_bytes());
    drv.w(COMMON + 0x0c, &1u32.to_le_bytes());
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    drv.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    assert_ne!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}
