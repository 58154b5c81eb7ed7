//! The host side of the device: the listening Unix socket host processes connect to, their
//! `CONNECT <port>` handshakes, the connections by address, and the order in which
//! connections get the guest's receive buffers (round robin, so one busy connection cannot
//! starve the others).
//!
//! Host → guest: a process connects to the socket and writes `CONNECT <port>\n`; we send the
//! guest a REQUEST from a fresh host port; when the guest accepts, the process reads
//! `OK <hostport>\n` and the stream is the connection. If the guest refuses (or does not
//! answer in time) the stream is closed.
//! Guest → host: a guest REQUEST for host port P is joined to the Unix socket listening at
//! `<socket>_P`; if nothing listens there, the guest gets an RST.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::conn::{Conn, Outgoing, Verdict};
use super::proto::{OP_REQUEST, OP_RST};

/// Epoll token of the listening socket.
pub const LISTENER_TOKEN: u64 = 8;
/// Tokens of host streams: this plus the entry's index.
pub const STREAM_TOKEN_BASE: u64 = 16;
/// Most connections and pending handshakes at once; more are refused.
pub const MAX_ENTRIES: usize = 1024;
/// Most connectionless RSTs waiting for receive buffers; beyond, the guest times out instead.
const MAX_PENDING_RSTS: usize = 256;
/// How long a host process has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest has to accept a host-initiated connection.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection the guest closed may wait for the host to read what it holds.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest `CONNECT` line.
const MAX_HANDSHAKE: usize = 64;
/// First host port given to host-initiated connections (as Firecracker does, out of the range
/// services listen on).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// A host process that connected and has not sent its `CONNECT` line yet.
struct Handshake {
    stream: UnixStream,
    deadline: Instant,
    interest: EventSet,
}

enum Entry {
    Handshake(Handshake),
    Conn(Box<Conn>),
}

impl Entry {
    fn stream(&self) -> &UnixStream {
        match self {
            Entry::Handshake(h) => &h.stream,
            Entry::Conn(c) => &c.stream,
        }
    }

    fn interest(&mut self) -> &mut EventSet {
        match self {
            Entry::Handshake(h) => &mut h.interest,
            Entry::Conn(c) => &mut c.interest,
        }
    }

    fn wanted(&self) -> EventSet {
        match self {
            Entry::Handshake(_) => EventSet::IN,
            Entry::Conn(c) => c.wanted(),
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Entry::Handshake(h) => Some(h.deadline),
            Entry::Conn(c) => c.deadline,
        }
    }
}

/// A packet for the guest: addresses (host port, guest port) and the rest of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToGuest {
    /// Host port (the packet's source).
    pub local_port: u32,
    /// Guest port (its destination).
    pub peer_port: u32,
    /// Operation, flags, length, credit.
    pub out: Outgoing,
}

/// What a guest packet carries besides its addresses.
#[derive(Clone, Copy, Debug)]
pub struct FromGuest {
    /// Host port (the packet's destination).
    pub local_port: u32,
    /// Guest port (its source).
    pub peer_port: u32,
    /// Operation.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// The guest's buffer space.
    pub buf_alloc: u32,
    /// What the guest has consumed of what we sent.
    pub fwd_cnt: u32,
}

/// Counters of the device, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections established.
    pub established: u64,
    /// RSTs sent to the guest.
    pub resets: u64,
}

/// The host side of one device.
pub struct Muxer {
    listener: UnixListener,
    socket_path: PathBuf,
    entries: Vec<Option<Entry>>,
    by_addr: HashMap<(u32, u32), usize>,
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// Connections with something for the guest, in turn.
    rxq: VecDeque<usize>,
    /// RSTs for addresses without a connection: (host port, guest port).
    rsts: VecDeque<(u32, u32)>,
    /// Entries whose polling may need to change before the next wait.
    touched: Vec<usize>,
    /// Whether the listener is in the epoll set.
    listening: bool,
    /// Everything is out of the epoll set while the device is paused.
    quiesced: bool,
    stats: Stats,
}

fn token(id: usize) -> u64 {
    STREAM_TOKEN_BASE + id as u64
}

fn ctl(epoll: &Epoll, fd: i32, token: u64, had: EventSet, want: EventSet) {
    if had == want {
        return;
    }
    let (op, events) = match (had.is_empty(), want.is_empty()) {
        (true, _) => (ControlOperation::Add, want),
        (false, true) => (ControlOperation::Delete, EventSet::empty()),
        (false, false) => (ControlOperation::Modify, want),
    };
    if let Err(e) = epoll.ctl(op, fd, EpollEvent::new(events, token)) {
        tracing::warn!("vsock: polling a host socket: {e}");
    }
}

impl Muxer {
    /// The host side of a device listening on `listener` (bound at `socket_path`).
    pub fn new(listener: UnixListener, socket_path: PathBuf) -> io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            listener,
            socket_path,
            entries: Vec::new(),
            by_addr: HashMap::new(),
            local_ports: HashSet::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            rsts: VecDeque::new(),
            touched: Vec::new(),
            listening: false,
            quiesced: true,
            stats: Stats::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Open connections and handshakes.
    pub fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Brings the epoll set in line with what each socket waits for: nothing while `paused`.
    pub fn sync(&mut self, epoll: &Epoll, paused: bool) {
        if paused {
            if !self.quiesced {
                self.quiesced = true;
                self.set_listening(epoll, false);
                for id in 0..self.entries.len() {
                    self.set_interest(epoll, id, EventSet::empty());
                }
            }
            self.touched.clear();
            return;
        }
        if self.quiesced {
            self.quiesced = false;
            self.set_listening(epoll, true);
            self.touched = (0..self.entries.len()).collect();
        }
        let full = self.len() >= MAX_ENTRIES;
        // A full table stops accepting: new host connections wait in the listen backlog.
        self.set_listening(epoll, !full);
        for id in std::mem::take(&mut self.touched) {
            let want = match self.entries.get(id) {
                Some(Some(e)) => e.wanted(),
                _ => continue,
            };
            self.set_interest(epoll, id, want);
        }
    }

    fn set_listening(&mut self, epoll: &Epoll, on: bool) {
        if on != self.listening {
            let (had, want) = if on {
                (EventSet::empty(), EventSet::IN)
            } else {
                (EventSet::IN, EventSet::empty())
            };
            ctl(epoll, self.listener.as_raw_fd(), LISTENER_TOKEN, had, want);
            self.listening = on;
        }
    }

    fn set_interest(&mut self, epoll: &Epoll, id: usize, want: EventSet) {
        if let Some(Some(e)) = self.entries.get_mut(id) {
            let fd = e.stream().as_raw_fd();
            let had = *e.interest();
            ctl(epoll, fd, token(id), had, want);
            *e.interest() = want;
        }
    }

    /// The earliest deadline of any connection or handshake.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .flatten()
            .filter_map(Entry::deadline)
            .min()
    }

    fn insert(&mut self, entry: Entry) -> usize {
        let id = match self.entries.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        self.entries[id] = Some(entry);
        self.touched.push(id);
        id
    }

    fn remove(&mut self, id: usize) {
        if let Some(Entry::Conn(c)) = self.entries.get_mut(id).and_then(Option::take) {
            self.by_addr.remove(&(c.local_port, c.peer_port));
            self.local_ports.remove(&c.local_port);
        }
        // Closing the stream takes it out of the epoll set.
    }

    fn enqueue(&mut self, id: usize) {
        if let Some(Some(Entry::Conn(c))) = self.entries.get_mut(id) {
            if !c.queued && c.has_rx_work() {
                c.queued = true;
                self.rxq.push_back(id);
            }
        }
        self.touched.push(id);
    }

    /// Refuses a guest packet for (host port, guest port) with an RST.
    pub fn refuse(&mut self, local_port: u32, peer_port: u32) {
        self.rst(local_port, peer_port);
    }

    fn rst(&mut self, local_port: u32, peer_port: u32) {
        if self.rsts.len() < MAX_PENDING_RSTS {
            self.rsts.push_back((local_port, peer_port));
        }
    }

    /// True when a packet waits for a receive buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.rsts.is_empty() || !self.rxq.is_empty()
    }

    /// Builds the next packet for the guest, its payload (if any) in `buf`.
    pub fn next_packet(&mut self, buf: Option<&VolatileSlice<'_>>) -> Option<ToGuest> {
        if let Some((local_port, peer_port)) = self.rsts.pop_front() {
            self.stats.resets += 1;
            return Some(ToGuest {
                local_port,
                peer_port,
                out: Outgoing {
                    op: OP_RST,
                    flags: 0,
                    len: 0,
                    buf_alloc: 0,
                    fwd_cnt: 0,
                },
            });
        }
        while let Some(id) = self.rxq.pop_front() {
            let Some(Some(Entry::Conn(c))) = self.entries.get_mut(id) else {
                continue;
            };
            c.queued = false;
            let Some(out) = c.next_packet(buf) else {
                self.touched.push(id);
                continue;
            };
            let pkt = ToGuest {
                local_port: c.local_port,
                peer_port: c.peer_port,
                out,
            };
            if out.op == OP_RST {
                self.stats.resets += 1;
                self.remove(id);
            } else {
                self.enqueue(id);
            }
            return Some(pkt);
        }
        None
    }

    /// Takes a packet the guest sent; `data` is its payload.
    pub fn from_guest(&mut self, p: FromGuest, data: Option<&VolatileSlice<'_>>) {
        let key = (p.local_port, p.peer_port);
        let Some(&id) = self.by_addr.get(&key) else {
            match p.op {
                OP_REQUEST => self.guest_connects(p),
                OP_RST => {}
                _ => self.rst(p.local_port, p.peer_port),
            }
            return;
        };
        let Some(Some(Entry::Conn(c))) = self.entries.get_mut(id) else {
            return;
        };
        match c.from_guest(p.op, p.flags, p.buf_alloc, p.fwd_cnt, data) {
            Verdict::Keep => {
                if c.closing() && c.deadline.is_none() {
                    c.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                }
            }
            Verdict::Reset => c.reset(),
            Verdict::Close => {
                self.remove(id);
                return;
            }
        }
        self.enqueue(id);
    }

    /// A guest asks for host port `p.local_port`: join it to the Unix socket listening at
    /// `<socket>_<port>`, or refuse.
    fn guest_connects(&mut self, p: FromGuest) {
        if self.len() >= MAX_ENTRIES {
            return self.rst(p.local_port, p.peer_port);
        }
        let mut path = self.socket_path.clone().into_os_string();
        path.push(format!("_{}", p.local_port));
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(port = p.local_port, "vsock: guest connection refused: {e}");
                return self.rst(p.local_port, p.peer_port);
            }
        };
        if stream.set_nonblocking(true).is_err() {
            return self.rst(p.local_port, p.peer_port);
        }
        let mut c = Conn::guest_initiated(stream, p.local_port, p.peer_port);
        c.from_guest(
            super::proto::OP_CREDIT_UPDATE,
            0,
            p.buf_alloc,
            p.fwd_cnt,
            None,
        );
        self.stats.established += 1;
        let id = self.insert(Entry::Conn(Box::new(c)));
        self.by_addr.insert((p.local_port, p.peer_port), id);
        self.enqueue(id);
    }

    /// An epoll event on the listener or a host stream.
    pub fn on_event(&mut self, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            return self.accept();
        }
        let Some(id) = token.checked_sub(STREAM_TOKEN_BASE).map(|i| i as usize) else {
            return;
        };
        match self.entries.get_mut(id) {
            Some(Some(Entry::Handshake(_))) => self.handshake(id),
            Some(Some(Entry::Conn(c))) => {
                let failed = events.intersects(EventSet::ERROR | EventSet::HANG_UP);
                let writable = events.contains(EventSet::OUT) || (failed && c.pending_tx() > 0);
                if writable && c.flush() == Verdict::Reset {
                    c.reset();
                }
                if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    c.readable = true;
                }
                self.enqueue(id);
            }
            _ => {}
        }
    }

    fn accept(&mut self) {
        while self.len() < MAX_ENTRIES {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.insert(Entry::Handshake(Handshake {
                        stream,
                        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                        interest: EventSet::empty(),
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accepting a host connection: {e}");
                    return;
                }
            }
        }
    }

    /// Reads a host process's `CONNECT <port>\n` (without taking anything after it from the
    /// stream: what follows is the connection's data), then asks the guest.
    fn handshake(&mut self, id: usize) {
        let Some(Some(Entry::Handshake(h))) = self.entries.get_mut(id) else {
            return;
        };
        let mut peek = [0u8; MAX_HANDSHAKE];
        // SAFETY: recv writes at most `peek.len()` bytes into `peek`, which outlives the call.
        let n = unsafe {
            libc::recv(
                h.stream.as_raw_fd(),
                peek.as_mut_ptr().cast(),
                peek.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            return;
        }
        let n = usize::try_from(n).unwrap_or(0);
        let Some(end) = peek[..n].iter().position(|b| *b == b'\n') else {
            if n == 0 || n == MAX_HANDSHAKE {
                // Closed before the line ended, or no line at all.
                self.remove(id);
            }
            return;
        };
        let mut line = vec![0u8; end + 1];
        if h.stream.read_exact(&mut line).is_err() {
            return self.remove(id);
        }
        let port = std::str::from_utf8(&line[..end])
            .ok()
            .map(|l| l.trim_end_matches('\r'))
            .and_then(|l| l.strip_prefix("CONNECT "))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(port) = port else {
            tracing::debug!("vsock: a host connection sent no CONNECT line");
            return self.remove(id);
        };
        let Some(Entry::Handshake(h)) = self.entries[id].take() else {
            return;
        };
        let local_port = self.allocate_port();
        let c = Conn::host_initiated(h.stream, local_port, port, Instant::now() + REQUEST_TIMEOUT);
        self.entries[id] = Some(Entry::Conn(Box::new(c)));
        // The stream is registered already: keep its registration in step.
        if let Some(Some(e)) = self.entries.get_mut(id) {
            *e.interest() = h.interest;
        }
        self.by_addr.insert((local_port, port), id);
        self.local_ports.insert(local_port);
        self.enqueue(id);
    }

    fn allocate_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.local_ports.contains(&p) {
                return p;
            }
        }
    }

    /// Gives up on what passed its deadline: handshakes never finished, requests the guest did
    /// not answer (their streams are closed), closing connections the host did not drain
    /// (reset).
    pub fn expire(&mut self, now: Instant) {
        for id in 0..self.entries.len() {
            let expired = match &self.entries[id] {
                Some(e) => e.deadline().is_some_and(|d| d <= now),
                None => false,
            };
            if !expired {
                continue;
            }
            match &mut self.entries[id] {
                Some(Entry::Conn(c)) if c.phase() == super::conn::Phase::Established => {
                    c.deadline = None;
                    c.reset();
                    self.enqueue(id);
                }
                _ => {
                    // A request the guest never answered gets an RST too, in case it
                    // answers later.
                    if let Some(Some(Entry::Conn(c))) = self.entries.get(id) {
                        self.rst(c.local_port, c.peer_port);
                    }
                    self.remove(id);
                }
            }
        }
    }
}
