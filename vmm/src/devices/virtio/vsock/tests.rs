//! virtio-vsock behind the virtio-pci transport, driven by a simulated driver over guest memory
//! and real Unix sockets on the host side: both handshakes, data both ways, credit accounting,
//! refused and unknown connections, malformed packets, a host peer that stops reading, half and
//! full closes, and the transport reset of a restored device.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::conn::CONN_BUF;
use super::proto::*;
use super::Vsock;
use crate::devices::pci::root::PciDevice;
use crate::devices::virtio::sim::{until, SimDriver, DEVICE_CFG, QSIZE};

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
const CID: u64 = 3;
const HDR: usize = 44;
/// Receive buffers: header and 4 KiB of data in one descriptor each, as Linux posts them.
const RX_BASE: u64 = 0x20000;
const RX_BUF: u32 = (HDR as u32) + 4096;
const RX_BUFS: u16 = 8;
/// Transmit buffers: header and data in two descriptors.
const TX_BASE: u64 = 0x40000;
const EV_BUF: u64 = 0x3f000;
/// Credit the simulated guest grants per connection unless a test says otherwise.
const GUEST_BUF: u32 = 64 << 10;

/// A packet as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pkt {
    src_port: u32,
    dst_port: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

fn header(src_cid: u64, dst_cid: u64, p: &Pkt) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    h[16..20].copy_from_slice(&p.src_port.to_le_bytes());
    h[20..24].copy_from_slice(&p.dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&(p.data.len() as u32).to_le_bytes());
    h[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
    h[30..32].copy_from_slice(&p.op.to_le_bytes());
    h[32..36].copy_from_slice(&p.flags.to_le_bytes());
    h[36..40].copy_from_slice(&p.buf_alloc.to_le_bytes());
    h[40..44].copy_from_slice(&p.fwd_cnt.to_le_bytes());
    h
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

struct Guest {
    drv: SimDriver,
    dir: tempfile::TempDir,
    /// Receive buffer address of each posted head.
    posted: HashMap<u32, u64>,
    rx_seen: u16,
    tx_sent: u16,
    next_rx_buf: u64,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(CID as u32, &dir.path().join("v.sock")).unwrap();
        let mut drv = SimDriver::new(Box::new(dev));
        drv.bring_up(0);
        let mut g = Guest {
            drv,
            dir,
            posted: HashMap::new(),
            rx_seen: 0,
            tx_sent: 0,
            next_rx_buf: 0,
        };
        for _ in 0..RX_BUFS {
            g.post_rx();
        }
        g.drv.kick(RXQ);
        g
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("v.sock")
    }

    fn post_rx(&mut self) {
        let addr = RX_BASE + u64::from(RX_BUF + 0x100) * (self.next_rx_buf % u64::from(RX_BUFS));
        self.next_rx_buf += 1;
        let head = self.drv.add_chain(RXQ, &[(addr, RX_BUF, true)]);
        self.posted.insert(u32::from(head), addr);
    }

    /// Sends `p` from the guest (header and data in two descriptors).
    fn send(&mut self, p: &Pkt) {
        self.send_raw(&header(CID, HOST_CID, p), &p.data);
    }

    fn send_raw(&mut self, hdr: &[u8], data: &[u8]) {
        let slot = u64::from(self.tx_sent % (QSIZE / 2));
        let at = TX_BASE + slot * 0x11000;
        self.drv.mem.write_slice(hdr, GuestAddress(at)).unwrap();
        self.drv
            .mem
            .write_slice(data, GuestAddress(at + 0x100))
            .unwrap();
        let mut descs = vec![(at, hdr.len() as u32, false)];
        if !data.is_empty() {
            descs.push((at + 0x100, data.len() as u32, false));
        }
        self.drv.add_chain(TXQ, &descs);
        self.drv.kick(TXQ);
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.drv.wait_used(TXQ, self.tx_sent);
    }

    /// The next packet the device put in a receive buffer (the buffer is posted again).
    fn recv(&mut self) -> Pkt {
        self.drv.wait_used(RXQ, self.rx_seen.wrapping_add(1));
        self.take()
    }

    /// A packet if one arrives within `t`.
    fn recv_within(&mut self, t: Duration) -> Option<Pkt> {
        let deadline = std::time::Instant::now() + t;
        while std::time::Instant::now() < deadline {
            if self.drv.used_idx(RXQ) != self.rx_seen {
                return Some(self.take());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    fn take(&mut self) -> Pkt {
        let (id, len) = self.drv.used(RXQ, self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let addr = self.posted.remove(&id).expect("a posted buffer");
        let b = self.drv.read(addr, len as usize);
        assert!(len as usize >= HDR, "short packet: {len}");
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), HOST_CID);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), CID);
        let data_len = u32_at(&b, 24) as usize;
        assert_eq!(HDR + data_len, len as usize);
        let p = Pkt {
            src_port: u32_at(&b, 16),
            dst_port: u32_at(&b, 20),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: u32_at(&b, 32),
            buf_alloc: u32_at(&b, 36),
            fwd_cnt: u32_at(&b, 40),
            data: b[HDR..].to_vec(),
        };
        self.post_rx();
        self.drv.kick(RXQ);
        p
    }
}

fn pkt(src_port: u32, dst_port: u32, op: u16) -> Pkt {
    Pkt {
        src_port,
        dst_port,
        op,
        flags: 0,
        buf_alloc: GUEST_BUF,
        fwd_cnt: 0,
        data: Vec::new(),
    }
}

/// A host process connects to guest port `port` and the guest accepts: (stream, host port).
fn host_connect(g: &mut Guest, port: u32) -> (UnixStream, u32) {
    let mut s = UnixStream::connect(g.socket()).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    // Other connections' packets (credit updates) may come first.
    let req = loop {
        let p = g.recv();
        if p.dst_port == port {
            break p;
        }
    };
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, port));
    assert!(
        req.src_port >= 1 << 30,
        "host ports come from the high range"
    );
    assert_eq!(req.buf_alloc, CONN_BUF);
    g.send(&pkt(port, req.src_port, OP_RESPONSE));
    let mut line = [0u8; 64];
    let mut n = 0;
    while !line[..n].contains(&b'\n') {
        n += s.read(&mut line[n..]).unwrap();
    }
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    (s, req.src_port)
}

#[test]
fn config_space_and_features() {
    let mut g = Guest::new();
    let cid = g.drv.r(DEVICE_CFG, 8);
    assert_eq!(u64::from_le_bytes(cid.try_into().unwrap()), CID);
    let id = g.drv.dev.config().read_reg(0);
    assert_eq!(id >> 16, 0x1040 + 19, "virtio-vsock PCI device ID");
}

#[test]
fn a_host_process_reaches_a_guest_listener_and_data_flows_both_ways() {
    let mut g = Guest::new();
    let (mut s, hp) = host_connect(&mut g, 52);
    s.write_all(b"from the host").unwrap();
    let rw = g.recv();
    assert_eq!((rw.op, rw.src_port, rw.dst_port), (OP_RW, hp, 52));
    assert_eq!(rw.data, b"from the host");
    let mut p = pkt(52, hp, OP_RW);
    p.data = b"from the guest".to_vec();
    g.send(&p);
    let mut got = [0u8; 14];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the guest");
}

#[test]
fn a_refused_or_unanswered_host_connection_is_closed() {
    let mut g = Guest::new();
    let mut s = UnixStream::connect(g.socket()).unwrap();
    s.write_all(b"CONNECT 7\n").unwrap();
    let req = g.recv();
    g.send(&pkt(7, req.src_port, OP_RST));
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0, "the stream closes without OK");
    // Garbage instead of a CONNECT line: closed too.
    let mut s = UnixStream::connect(g.socket()).unwrap();
    s.write_all(b"HELLO\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
}

#[test]
fn a_guest_reaches_a_host_listener_and_unknown_ports_get_rst() {
    let mut g = Guest::new();
    let mut path = g.socket().into_os_string();
    path.push("_1234");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(&pkt(49152, 1234, OP_REQUEST));
    let resp = g.recv();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port),
        (OP_RESPONSE, 1234, 49152)
    );
    let (mut host, _) = listener.accept().unwrap();
    let mut p = pkt(49152, 1234, OP_RW);
    p.data = vec![0xab; 3000];
    g.send(&p);
    let mut got = vec![0u8; 3000];
    host.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|b| *b == 0xab));
    host.write_all(b"back").unwrap();
    assert_eq!(g.recv().data, b"back");

    // Nothing listens on port 999; data for a connection that does not exist.
    g.send(&pkt(49153, 999, OP_REQUEST));
    let rst = g.recv();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 999, 49153));
    g.send(&pkt(40000, 1234, OP_RW));
    assert_eq!(g.recv().op, OP_RST);
    // An RST for nothing gets nothing back.
    g.send(&pkt(40001, 1234, OP_RST));
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
}

#[test]
fn malformed_packets_are_dropped_and_the_device_keeps_serving() {
    let mut g = Guest::new();
    // A header descriptor shorter than a header.
    g.send_raw(&[1, 2, 3], &[]);
    // A header from another CID, and one to a CID other than the host.
    let p = pkt(1, 2, OP_REQUEST);
    g.send_raw(&header(9, HOST_CID, &p), &[]);
    g.send_raw(&header(CID, 7, &p), &[]);
    // A length field larger than the data that follows.
    let mut h = header(CID, HOST_CID, &pkt(5, 6, OP_RW));
    h[24..28].copy_from_slice(&(1u32 << 20).to_le_bytes());
    g.send_raw(&h, &[0; 16]);
    // Another socket type.
    let mut h = header(CID, HOST_CID, &pkt(5, 6, OP_REQUEST));
    h[28..30].copy_from_slice(&2u16.to_le_bytes());
    g.send_raw(&h, &[]);
    let rst = g.recv();
    assert_eq!(rst.op, OP_RST, "a seqpacket request is refused");
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
    // Still serving.
    let (mut s, hp) = host_connect(&mut g, 52);
    s.write_all(b"ok").unwrap();
    assert_eq!(g.recv().data, b"ok");
    let _ = hp;
}

#[test]
fn host_data_follows_the_guests_credit() {
    let mut g = Guest::new();
    let (mut s, hp) = host_connect(&mut g, 52);
    // The guest grants 8 KiB on this connection.
    let mut grant = pkt(52, hp, OP_CREDIT_UPDATE);
    grant.buf_alloc = 8 << 10;
    g.send(&grant);
    let blob: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&blob).unwrap();
    let mut got = Vec::new();
    while got.len() < 8 << 10 {
        let p = g.recv();
        assert_eq!(p.op, OP_RW);
        got.extend(p.data);
    }
    assert_eq!(got.len(), 8 << 10, "not a byte past the grant");
    let req = g.recv();
    assert_eq!(req.op, OP_CREDIT_REQUEST);
    assert!(g.recv_within(Duration::from_millis(100)).is_none());
    // The guest consumed it all and grants the same again.
    let mut more = pkt(52, hp, OP_CREDIT_UPDATE);
    more.buf_alloc = 8 << 10;
    more.fwd_cnt = 8 << 10;
    g.send(&more);
    while got.len() < 16 << 10 {
        got.extend(g.recv().data);
    }
    more.fwd_cnt = 16 << 10;
    g.send(&more);
    while got.len() < blob.len() {
        let p = g.recv();
        if p.op == OP_RW {
            got.extend(p.data);
        }
    }
    assert_eq!(got, blob, "no loss, no reordering");
}

#[test]
fn a_host_peer_that_stops_reading_holds_back_only_its_connection() {
    let mut g = Guest::new();
    let mut path = g.socket().into_os_string();
    path.push("_80");
    let listener = UnixListener::bind(&path).unwrap();
    g.send(&pkt(50000, 80, OP_REQUEST));
    assert_eq!(g.recv().op, OP_RESPONSE);
    let (_stalled, _) = listener.accept().unwrap();
    // The guest fills its whole grant on the stalled connection: accepted, held.
    let mut p = pkt(50000, 80, OP_RW);
    p.data = vec![1; 32 << 10];
    for _ in 0..(CONN_BUF / (32 << 10)) {
        g.send(&p);
    }
    // Another connection is served meanwhile.
    let (mut s, hp) = host_connect(&mut g, 53);
    let mut q = pkt(53, hp, OP_RW);
    q.data = b"still here".to_vec();
    g.send(&q);
    let mut got = [0u8; 10];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still here");
    // Past what the stalled connection may hold (its host socket buffer took some, the rest
    // is held up to our buffer space): the guest is reset there rather than buffered without
    // bound.
    let mut saw_rst = false;
    for _ in 0..64 {
        g.send(&p);
        if let Some(r) = g.recv_within(Duration::from_millis(20)) {
            if r.op == OP_RST && r.dst_port == 50000 {
                saw_rst = true;
                break;
            }
        }
    }
    assert!(saw_rst, "a guest overrunning a stalled peer is reset");
}

#[test]
fn shutdowns_pass_through_and_closes_end_with_rst() {
    let mut g = Guest::new();
    let (mut s, hp) = host_connect(&mut g, 52);
    // Guest stops sending: the host reads EOF.
    let mut sh = pkt(52, hp, OP_SHUTDOWN);
    sh.flags = SHUTDOWN_SEND;
    g.send(&sh);
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // The host sends its last data and shuts its side: the guest gets it, then SHUTDOWN.
    s.write_all(b"bye").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut data = Vec::new();
    let last = loop {
        let p = g.recv();
        if p.op != OP_RW {
            break p;
        }
        data.extend(p.data);
    };
    assert_eq!(data, b"bye");
    assert_eq!((last.op, last.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest closes: RST, and the stream is gone.
    sh.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(&sh);
    assert_eq!(g.recv().op, OP_RST);
    // A host process that goes away: its end of stream arrives as a SHUTDOWN; what the guest
    // sends after it is dropped and the guest is told the host receives no more; the guest
    // closes and the connection ends.
    let (s2, hp2) = host_connect(&mut g, 54);
    drop(s2);
    let p = g.recv();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    let mut w = pkt(54, hp2, OP_RW);
    w.data = b"anyone?".to_vec();
    g.send(&w);
    let p = g.recv();
    assert_eq!((p.op, p.flags & SHUTDOWN_RCV), (OP_SHUTDOWN, SHUTDOWN_RCV));
    let mut close = pkt(54, hp2, OP_SHUTDOWN);
    close.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(&close);
    assert_eq!(g.recv().op, OP_RST);
}

#[test]
fn a_restored_device_tells_the_guest_the_transport_was_reset() {
    let mut g = Guest::new();
    g.drv.add_chain(EVQ, &[(EV_BUF, 4, true)]);
    g.drv.kick(EVQ);
    assert!(
        g.recv_within(Duration::from_millis(50)).is_none(),
        "no event on a fresh device"
    );
    assert_eq!(g.drv.used_idx(EVQ), 0);
    // A new process: a new device replays the old one's registers.
    let regs = g.drv.dev.save_registers();
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(CID as u32, &dir.path().join("v2.sock")).unwrap();
    let mut restored = SimDriver::over(Box::new(dev), g.drv.mem.clone());
    restored.dev.restore_registers(&regs);
    restored.dev.resume();
    until("the transport reset event", || restored.used_idx(EVQ) == 1);
    let (_, len) = restored.used(EVQ, 0);
    assert_eq!(len, 4);
    let id: u32 = restored.mem.read_obj(GuestAddress(EV_BUF)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
}
