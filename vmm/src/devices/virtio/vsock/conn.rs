//! One stream connection between a guest port and a host Unix socket: where it stands, the
//! credit each side grants the other, the guest's data the host peer has not read yet, and what
//! the device owes the guest.
//!
//! Flow control both ways, without unbounded buffering:
//! - guest → host: we grant the guest [`CONN_BUF`] bytes; what the host peer does not read at
//!   once waits in `tx` (never more than the grant: a guest that sends past it is reset), and
//!   the grant moves on (credit update) as the host reads;
//! - host → guest: we read from the host stream only as much as the guest's grant allows and
//!   only into buffers the guest posted; while the grant is used up we stop polling the stream,
//!   so a fast host writer is held back by its own socket buffer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};
use vmm_sys_util::epoll::EventSet;

use super::proto::{
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Bytes of guest data each connection holds for its host peer: the buffer space (`buf_alloc`)
/// we advertise.
pub const CONN_BUF: u32 = 256 << 10;
/// When the guest's view of our free space falls below this, we tell it about the space the
/// host peer freed since.
const CREDIT_LOW: u32 = CONN_BUF / 4;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Opened by a host process: our REQUEST is owed or sent, the guest has not accepted yet.
    LocalInit,
    /// Both sides connected.
    Established,
}

/// What a guest packet does to its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The connection goes on.
    Keep,
    /// The connection is aborted: an RST is owed to the guest, then it goes.
    Reset,
    /// The connection ends without a word to the guest (it sent the RST, or refused).
    Close,
}

/// Control packets owed to the guest.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    rst: bool,
    credit_update: bool,
    credit_request: bool,
    /// SHUTDOWN flags not sent yet.
    shutdown: u32,
}

impl Owed {
    fn any(&self) -> bool {
        self.request
            || self.response
            || self.rst
            || self.credit_update
            || self.credit_request
            || self.shutdown != 0
    }
}

/// A packet for the guest: the header's operation, flags and credit fields (addresses are the
/// connection's), and how many payload bytes were put in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// VIRTIO_VSOCK_OP_*.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Payload bytes.
    pub len: u32,
    /// Our buffer space.
    pub buf_alloc: u32,
    /// Guest bytes the host peer has read.
    pub fwd_cnt: u32,
}

/// One connection.
pub struct Conn {
    /// The host side.
    pub stream: UnixStream,
    /// The host's port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    phase: Phase,
    /// When a host-initiated request gives up waiting for the guest, or a closing connection
    /// is reset whatever it still holds.
    pub deadline: Option<Instant>,
    /// Guest bytes received, and those of them written to the host peer.
    recv_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    last_fwd_sent: Wrapping<u32>,
    /// The guest's grant: its buffer space and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    sent_cnt: Wrapping<u32>,
    /// Guest data the host peer has not read yet.
    tx: VecDeque<u8>,
    guest_no_send: bool,
    guest_no_recv: bool,
    host_eof: bool,
    /// The host peer will read nothing more (writing to it failed with EPIPE): what the guest
    /// still sends is dropped, and the guest is told.
    host_no_recv: bool,
    host_write_shut: bool,
    owed: Owed,
    /// The host stream has data we have not read.
    pub readable: bool,
    /// In the device's queue of connections with something for the guest.
    pub queued: bool,
    /// What the stream is registered for in the worker's epoll set.
    pub interest: EventSet,
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl Conn {
    fn new(stream: UnixStream, local_port: u32, peer_port: u32, phase: Phase) -> Conn {
        Conn {
            stream,
            local_port,
            peer_port,
            phase,
            deadline: None,
            recv_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            sent_cnt: Wrapping(0),
            tx: VecDeque::new(),
            guest_no_send: false,
            guest_no_recv: false,
            host_eof: false,
            host_no_recv: false,
            host_write_shut: false,
            owed: Owed::default(),
            readable: false,
            queued: false,
            interest: EventSet::empty(),
        }
    }

    /// A connection a host process opened to the guest's `peer_port`: a REQUEST is owed, and
    /// the guest has until `deadline` to accept.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Conn {
        let mut c = Conn::new(stream, local_port, peer_port, Phase::LocalInit);
        c.owed.request = true;
        c.deadline = Some(deadline);
        c
    }

    /// A connection the guest requested and a host listener took: a RESPONSE is owed.
    pub fn guest_initiated(stream: UnixStream, local_port: u32, peer_port: u32) -> Conn {
        let mut c = Conn::new(stream, local_port, peer_port, Phase::Established);
        c.owed.response = true;
        c
    }

    /// Where the connection stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Bytes the guest lets us send it now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest data waiting for the host peer.
    pub fn pending_tx(&self) -> usize {
        self.tx.len()
    }

    fn may_read_host(&self) -> bool {
        self.phase == Phase::Established
            && !self.guest_no_recv
            && !self.host_eof
            && !self.owed.rst
            && self.peer_credit() > 0
    }

    /// True when there is a packet to build for the guest.
    pub fn has_rx_work(&self) -> bool {
        self.owed.any() || (self.readable && self.may_read_host())
    }

    /// What to poll the host stream for.
    pub fn wanted(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.may_read_host() && !self.readable {
            e |= EventSet::IN;
        }
        if !self.tx.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Owes the guest an RST: the connection is aborted.
    pub fn reset(&mut self) {
        self.owed.rst = true;
    }

    /// Takes a packet the guest sent on this connection.
    pub fn from_guest(
        &mut self,
        op: u16,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        data: Option<&VolatileSlice<'_>>,
    ) -> Verdict {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        match (op, self.phase) {
            (OP_RST, _) => Verdict::Close,
            (OP_RESPONSE, Phase::LocalInit) => self.accepted(),
            (OP_RW, Phase::Established) => match data {
                Some(d) => self.data_from_guest(d),
                None => Verdict::Keep,
            },
            (OP_CREDIT_UPDATE, Phase::Established) => Verdict::Keep,
            (OP_CREDIT_REQUEST, Phase::Established) => {
                self.owed.credit_update = true;
                Verdict::Keep
            }
            (OP_SHUTDOWN, Phase::Established) => self.shutdown_from_guest(flags),
            // A request on a connection that exists, a response to nothing, data before the
            // handshake: the guest and we disagree about the connection.
            _ => Verdict::Reset,
        }
    }

    /// The guest accepted our request: tell the host process which port it got.
    fn accepted(&mut self) -> Verdict {
        self.phase = Phase::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.local_port);
        // The stream is new and empty: a short line fits its buffer.
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => Verdict::Keep,
            _ => Verdict::Reset,
        }
    }

    fn data_from_guest(&mut self, data: &VolatileSlice<'_>) -> Verdict {
        if self.guest_no_send {
            return Verdict::Reset;
        }
        let len = data.len();
        let held = (self.recv_cnt - self.fwd_cnt).0 as usize;
        if held + len > CONN_BUF as usize {
            tracing::debug!(
                port = self.local_port,
                "vsock: the guest sent past its credit; resetting"
            );
            return Verdict::Reset;
        }
        self.recv_cnt += Wrapping(len as u32);
        if self.host_no_recv {
            self.fwd_cnt = self.recv_cnt;
            return Verdict::Keep;
        }
        let mut written = 0;
        if self.tx.is_empty() {
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if would_block(&e) => {}
                Err(VolatileMemoryError::IOError(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.host_stopped_reading();
                    return Verdict::Keep;
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        if written < len {
            let mut rest = vec![0u8; len - written];
            if data
                .offset(written)
                .map(|s| s.copy_to(&mut rest[..]))
                .is_err()
            {
                return Verdict::Reset;
            }
            self.tx.extend(rest);
        }
        self.note_forwarded();
        Verdict::Keep
    }

    fn shutdown_from_guest(&mut self, flags: u32) -> Verdict {
        if flags & SHUTDOWN_RCV != 0 {
            self.guest_no_recv = true;
        }
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_no_send = true;
        }
        self.after_flush();
        Verdict::Keep
    }

    /// The host stream can take more: writes what the guest sent and the host has not read.
    pub fn flush(&mut self) -> Verdict {
        while !self.tx.is_empty() {
            let (front, _) = self.tx.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Verdict::Reset,
                Ok(n) => {
                    self.tx.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    self.host_stopped_reading();
                    break;
                }
                Err(_) => return Verdict::Reset,
            }
        }
        self.note_forwarded();
        self.after_flush();
        Verdict::Keep
    }

    /// The host peer closed its reading side (or all of it): what it wrote before still goes
    /// to the guest, which is told it can send nothing more (SHUTDOWN with RCV: "the host will
    /// receive no more").
    fn host_stopped_reading(&mut self) {
        self.host_no_recv = true;
        self.tx.clear();
        self.fwd_cnt = self.recv_cnt;
        self.owed.shutdown |= SHUTDOWN_RCV;
    }

    /// Once everything the guest sent is with the host: pass on the guest's end of sending,
    /// and finish a connection the guest closed.
    fn after_flush(&mut self) {
        if !self.tx.is_empty() {
            return;
        }
        if self.guest_no_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        if self.guest_no_send && self.guest_no_recv {
            // The guest closed: it waits for our RST to let go of the socket.
            self.owed.rst = true;
        }
    }

    /// The host read guest data: when the guest's view of our free space runs low, tell it.
    fn note_forwarded(&mut self) {
        let guest_view = CONN_BUF - (self.recv_cnt - self.last_fwd_sent).0.min(CONN_BUF);
        if guest_view < CREDIT_LOW && self.fwd_cnt != self.last_fwd_sent {
            self.owed.credit_update = true;
        }
    }

    /// True when the guest closed both directions and the host has not read everything yet:
    /// the connection gets until its deadline.
    pub fn closing(&self) -> bool {
        self.guest_no_send && self.guest_no_recv && !self.tx.is_empty()
    }

    /// Builds the next packet for the guest, its payload (if any) read from the host stream
    /// into `buf`. None when there is nothing to send after all (the stream had no data).
    pub fn next_packet(&mut self, buf: Option<&VolatileSlice<'_>>) -> Option<Outgoing> {
        let (op, flags, len) = self.next_op(buf)?;
        self.last_fwd_sent = self.fwd_cnt;
        self.owed.credit_update = false;
        Some(Outgoing {
            op,
            flags,
            len,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        })
    }

    fn next_op(&mut self, buf: Option<&VolatileSlice<'_>>) -> Option<(u16, u32, u32)> {
        if self.owed.rst {
            return Some((OP_RST, 0, 0));
        }
        if std::mem::take(&mut self.owed.request) {
            return Some((OP_REQUEST, 0, 0));
        }
        if std::mem::take(&mut self.owed.response) {
            return Some((OP_RESPONSE, 0, 0));
        }
        if self.readable && self.may_read_host() {
            if let Some(rw) = self.read_host(buf) {
                return Some(rw);
            }
        }
        // After any data: a SHUTDOWN must not overtake what came before it.
        if self.owed.shutdown != 0 {
            return Some((OP_SHUTDOWN, std::mem::take(&mut self.owed.shutdown), 0));
        }
        if self.owed.credit_update {
            return Some((OP_CREDIT_UPDATE, 0, 0));
        }
        if std::mem::take(&mut self.owed.credit_request) {
            return Some((OP_CREDIT_REQUEST, 0, 0));
        }
        None
    }

    /// Reads host data into the guest's buffer: an RW packet, or the end of the host's stream.
    fn read_host(&mut self, buf: Option<&VolatileSlice<'_>>) -> Option<(u16, u32, u32)> {
        let buf = buf?;
        let room = (self.peer_credit() as usize).min(buf.len());
        let mut slice = buf.subslice(0, room).ok()?;
        match self.stream.read_volatile(&mut slice) {
            Ok(0) => {
                // The host will send nothing more.
                self.host_eof = true;
                self.readable = false;
                self.owed.shutdown |= SHUTDOWN_SEND;
                None
            }
            Ok(n) => {
                self.sent_cnt += Wrapping(n as u32);
                if self.peer_credit() == 0 {
                    // The guest's buffer is full: ask it to say when it has room.
                    self.owed.credit_request = true;
                }
                Some((OP_RW, 0, n as u32))
            }
            Err(e) if would_block(&e) => {
                self.readable = false;
                None
            }
            Err(_) => {
                self.owed.rst = true;
                Some((OP_RST, 0, 0))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Conn, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Conn::guest_initiated(ours, 1234, 5000), theirs)
    }

    fn slice(buf: &mut [u8]) -> VolatileSlice<'_> {
        // SAFETY: the slice covers `buf`, which outlives it and is not otherwise accessed
        // while the VolatileSlice is used.
        unsafe { VolatileSlice::new(buf.as_mut_ptr(), buf.len()) }
    }

    #[test]
    fn a_guest_request_is_answered_and_data_flows_both_ways() {
        let (mut c, mut host) = pair();
        assert!(c.has_rx_work());
        let out = c.next_packet(None).unwrap();
        assert_eq!(
            (out.op, out.buf_alloc, out.fwd_cnt),
            (OP_RESPONSE, CONN_BUF, 0)
        );
        assert!(!c.has_rx_work());

        let mut data = *b"hello host";
        assert_eq!(
            c.from_guest(OP_RW, 0, 4096, 0, Some(&slice(&mut data))),
            Verdict::Keep
        );
        let mut got = [0u8; 10];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello host");

        // Host to guest: nothing is read before the guest grants credit.
        host.write_all(b"hello guest").unwrap();
        c.readable = true;
        let mut rx = [0u8; 64];
        c.from_guest(OP_CREDIT_UPDATE, 0, 0, 0, None);
        assert!(!c.has_rx_work() && !c.wanted().contains(EventSet::IN));
        c.from_guest(OP_CREDIT_UPDATE, 0, 8, 0, None);
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert_eq!((out.op, out.len, out.fwd_cnt), (OP_RW, 8, 10));
        assert_eq!(&rx[..8], b"hello gu");
        // Credit used up: the device asks for more and stops polling the stream.
        assert_eq!(c.peer_credit(), 0);
        assert_eq!(c.next_packet(None).unwrap().op, OP_CREDIT_REQUEST);
        assert!(!c.wanted().contains(EventSet::IN));
        c.from_guest(OP_CREDIT_UPDATE, 0, 64, 8, None);
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert_eq!((out.op, out.len), (OP_RW, 3));
        assert_eq!(&rx[..3], b"est");
    }

    #[test]
    fn a_host_that_does_not_read_holds_the_guest_to_its_credit() {
        let (mut c, host) = pair();
        c.next_packet(None);
        let mut chunk = vec![7u8; 64 << 10];
        // What the host's socket buffer does not take waits in the connection, up to the
        // buffer space we advertised.
        while c.pending_tx() + chunk.len() <= CONN_BUF as usize {
            assert_eq!(
                c.from_guest(OP_RW, 0, 4096, 0, Some(&slice(&mut chunk))),
                Verdict::Keep
            );
        }
        assert!(c.pending_tx() > 0, "the host's socket buffer took it all");
        assert!(c.wanted().contains(EventSet::OUT));
        let held = c.pending_tx();
        // Past that, the guest broke the protocol: reset, and nothing more is held.
        assert_eq!(
            c.from_guest(OP_RW, 0, 4096, 0, Some(&slice(&mut chunk))),
            Verdict::Reset
        );
        assert_eq!(c.pending_tx(), held, "nothing past the buffer was held");

        // The host reads: the connection forwards the rest and grants the guest more.
        let (mut c, mut host2) = pair();
        c.next_packet(None);
        let mut big = vec![9u8; CONN_BUF as usize];
        assert_eq!(
            c.from_guest(OP_RW, 0, 4096, 0, Some(&slice(&mut big))),
            Verdict::Keep
        );
        let mut sink = vec![0u8; CONN_BUF as usize];
        let mut got = 0;
        while got < CONN_BUF as usize {
            let n = host2.read(&mut sink).unwrap();
            got += n;
            assert_eq!(c.flush(), Verdict::Keep);
        }
        assert_eq!(c.pending_tx(), 0);
        let out = c.next_packet(None).unwrap();
        assert_eq!((out.op, out.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF));
        drop(host);
    }

    #[test]
    fn shutdowns_pass_through_and_a_guest_close_is_answered_with_rst() {
        let (mut c, mut host) = pair();
        c.next_packet(None);
        // The guest stops sending: the host reads EOF.
        c.from_guest(OP_SHUTDOWN, 0, 4096, 0, None);
        c.from_guest(OP_SHUTDOWN, SHUTDOWN_SEND, 4096, 0, None);
        let mut b = [0u8; 1];
        assert_eq!(host.read(&mut b).unwrap(), 0);
        // The host stops sending: the guest gets SHUTDOWN(SEND) after the data before it.
        host.write_all(b"last").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        c.readable = true;
        let mut rx = [0u8; 16];
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert_eq!((out.op, out.len), (OP_RW, 4));
        c.readable = true;
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert_eq!((out.op, out.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        // The guest closes: RST.
        c.from_guest(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 4096, 4, None);
        assert_eq!(c.next_packet(None).unwrap().op, OP_RST);
    }

    #[test]
    fn a_host_that_goes_away_still_delivers_what_it_wrote() {
        let (mut c, mut host) = pair();
        c.next_packet(None);
        c.from_guest(OP_CREDIT_UPDATE, 0, 4096, 0, None);
        host.write_all(b"last words").unwrap();
        drop(host);
        // The guest writes into the void: no reset, but it is told the host receives no more.
        let mut data = *b"hello?";
        assert_eq!(
            c.from_guest(OP_RW, 0, 4096, 0, Some(&slice(&mut data))),
            Verdict::Keep
        );
        c.readable = true;
        let mut rx = [0u8; 64];
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert_eq!((out.op, out.len), (OP_RW, 10), "the data first");
        assert_eq!(&rx[..10], b"last words");
        let out = c.next_packet(Some(&slice(&mut rx))).unwrap();
        assert!(
            (out.op == OP_SHUTDOWN && out.flags & SHUTDOWN_RCV != 0) || out.op == OP_RST,
            "{out:?}"
        );
    }

    #[test]
    fn protocol_errors_reset_and_rst_closes() {
        let (mut c, _host) = pair();
        assert_eq!(c.from_guest(OP_REQUEST, 0, 0, 0, None), Verdict::Reset);
        assert_eq!(c.from_guest(OP_RESPONSE, 0, 0, 0, None), Verdict::Reset);
        assert_eq!(c.from_guest(99, 0, 0, 0, None), Verdict::Reset);
        assert_eq!(c.from_guest(OP_RST, 0, 0, 0, None), Verdict::Close);
        // Before the guest accepted, data is an error.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut l = Conn::host_initiated(ours, 1 << 30, 52, Instant::now());
        let mut d = *b"x";
        assert_eq!(
            l.from_guest(OP_RW, 0, 0, 0, Some(&slice(&mut d))),
            Verdict::Reset
        );
    }

    #[test]
    fn a_host_connection_is_told_its_port_once_the_guest_accepts() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        let mut c = Conn::host_initiated(ours, (1 << 30) + 7, 52, Instant::now());
        assert_eq!(c.next_packet(None).unwrap().op, OP_REQUEST);
        assert_eq!(c.phase(), Phase::LocalInit);
        assert_eq!(c.from_guest(OP_RESPONSE, 0, 4096, 0, None), Verdict::Keep);
        assert_eq!(c.phase(), Phase::Established);
        assert!(c.deadline.is_none());
        let mut line = [0u8; 14];
        host.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741831\n");
    }
}
