//! Streams both ends can check: each connection carries an id, then each side sends a
//! deterministic byte stream for (id, direction) and checks what it receives against the other
//! direction's, byte for byte — so loss, duplication and reordering all show, in both
//! directions, with no hashing.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

/// Host to guest.
pub const TO_GUEST: u32 = 0;
/// Guest to host.
pub const TO_HOST: u32 = 1;

/// The bytes of connection `id` in `direction`.
pub struct Pattern {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The stream of connection `id` in `direction`.
    pub fn new(id: u32, direction: u32) -> Pattern {
        // splitmix64 of (id, direction): nearby ids and the two directions start far apart.
        let mut z =
            (u64::from(id) << 32 | u64::from(direction)).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Pattern {
            state: z | 1,
            buf: [0; 8],
            used: 8,
        }
    }

    fn next_byte(&mut self) -> u8 {
        if self.used == 8 {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            self.buf = self.state.to_le_bytes();
            self.used = 0;
        }
        self.used += 1;
        self.buf[self.used - 1]
    }

    /// Fills `out` with the next bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_byte();
        }
    }

    /// Checks `data` against the next bytes; the offset (within `data`) of the first mismatch.
    pub fn check(&mut self, data: &[u8]) -> Result<(), usize> {
        for (i, b) in data.iter().enumerate() {
            if *b != self.next_byte() {
                return Err(i);
            }
        }
        Ok(())
    }
}

/// A stream that can be split between a reader and a writer thread and half-closed.
pub trait Duplex: Read + Write + Send + Sized + 'static {
    /// A second handle on the same connection.
    fn duplicate(&self) -> io::Result<Self>;
    /// Shuts one or both directions.
    fn close(&self, how: Shutdown) -> io::Result<()>;
}

impl Duplex for UnixStream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

impl Duplex for agent_proto::vsock::Stream {
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self, how: Shutdown) -> io::Result<()> {
        self.shutdown(how)
    }
}

/// How one side of an exchange ended.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes sent.
    pub sent: u64,
    /// Bytes received and checked.
    pub received: u64,
    /// The first thing that went wrong, if anything.
    pub error: Option<String>,
}

impl Outcome {
    /// One line for logs: `OK sent=.. received=..` or `FAIL ...`.
    pub fn line(&self) -> String {
        match &self.error {
            None => format!("OK sent={} received={}", self.sent, self.received),
            Some(e) => format!("FAIL sent={} received={} {e}", self.sent, self.received),
        }
    }
}

/// Runs one side of connection `id`: sends `bytes` of this side's stream (`my_direction`) and
/// checks the other side's, to the end. With `close_after`, sends only that much, then closes
/// both directions at once (a peer going away mid-stream) and checks nothing more.
pub fn exchange<S: Duplex>(
    stream: S,
    id: u32,
    my_direction: u32,
    bytes: u64,
    close_after: Option<u64>,
) -> Outcome {
    let writer = match stream.duplicate() {
        Ok(w) => w,
        Err(e) => {
            return Outcome {
                sent: 0,
                received: 0,
                error: Some(format!("duplicate: {e}")),
            }
        }
    };
    let to_send = close_after.unwrap_or(bytes).min(bytes);
    let sending = std::thread::spawn(move || send(writer, id, my_direction, to_send));
    if close_after.is_some() {
        let (sent, err) = sending
            .join()
            .unwrap_or((0, Some("writer panicked".into())));
        let _ = stream.close(Shutdown::Both);
        return Outcome {
            sent,
            received: 0,
            error: err,
        };
    }
    let (received, read_err) = receive(stream, id, 1 - my_direction, bytes);
    let (sent, write_err) = sending
        .join()
        .unwrap_or((0, Some("writer panicked".into())));
    Outcome {
        sent,
        received,
        error: read_err.or(write_err),
    }
}

fn send<S: Duplex>(mut w: S, id: u32, direction: u32, bytes: u64) -> (u64, Option<String>) {
    let mut p = Pattern::new(id, direction);
    let mut buf = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        if let Err(e) = w.write_all(&buf[..n]) {
            return (sent, Some(format!("write: {e}")));
        }
        sent += n as u64;
    }
    let _ = w.close(Shutdown::Write);
    (sent, None)
}

fn receive<S: Duplex>(mut r: S, id: u32, direction: u32, bytes: u64) -> (u64, Option<String>) {
    let mut p = Pattern::new(id, direction);
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(at) = p.check(&buf[..n]) {
                    return (got, Some(format!("mismatch at byte {}", got + at as u64)));
                }
                got += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(format!("read: {e}"))),
        }
    }
    if got != bytes {
        return (
            got,
            Some(format!("end of stream after {got} of {bytes} bytes")),
        );
    }
    (got, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exchange_checks_both_ways_and_catches_a_cut() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || exchange(b, 7, TO_GUEST, 300_000, None));
        let mine = exchange(a, 7, TO_HOST, 300_000, None);
        let theirs = t.join().unwrap();
        assert!(
            mine.error.is_none() && theirs.error.is_none(),
            "{mine:?} {theirs:?}"
        );
        assert_eq!((mine.received, theirs.received), (300_000, 300_000));

        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || exchange(b, 1, TO_GUEST, 300_000, Some(1000)));
        let mine = exchange(a, 1, TO_HOST, 300_000, None);
        t.join().unwrap();
        assert_eq!(mine.received, 1000);
        // The cut shows as an early end of stream or, when the peer's socket went away with
        // our bytes unread in it, as a reset: either way it is caught.
        let e = mine.error.expect("the cut is an error");
        assert!(
            e.contains("after 1000 of 300000") || e.contains("reset"),
            "{e}"
        );
        assert_ne!(
            Pattern::new(1, 0).next_byte(),
            Pattern::new(1, 1).next_byte()
        );
    }
}
