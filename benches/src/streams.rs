//! The host side of the stream benchmarks against a guest's `vsockt bench-serve`: bulk
//! throughput each way, connection setup rate and request/response round trips, over whatever
//! transport the caller connects (vsock through the VMM's socket, TCP over virtio-net).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{bail, Result};

/// The guest's services, relative to its base port.
pub const SINK: u16 = 0;
/// Writes the configured byte count, then closes.
pub const SOURCE: u16 = 1;
/// Closes each connection at once.
pub const ACCEPT_CLOSE: u16 = 2;
/// Sends back what it reads.
pub const ECHO: u16 = 3;

/// A connected byte stream of either transport.
pub trait Stream: Read + Write {
    /// Ends our direction (the guest's sink then sees the end).
    fn shut_write(&self) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Stream for TcpStream {
    fn shut_write(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

/// Opens a connection to the guest service at `offset` from the base port.
pub type Connect<'a> = &'a dyn Fn(u16) -> Result<Box<dyn Stream>>;

const MIB: f64 = (1 << 20) as f64;

/// MiB/s of `bytes` sent to the guest's sink, until the guest has read them all (its close).
pub fn to_guest(connect: Connect<'_>, bytes: u64) -> Result<f64> {
    let start = Instant::now();
    let mut s = connect(SINK)?;
    let buf = vec![0xa5u8; 64 << 10];
    let mut sent = 0;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        sent += n as u64;
    }
    s.shut_write()?;
    let mut b = [0u8; 16];
    while s.read(&mut b)? > 0 {}
    Ok(bytes as f64 / MIB / start.elapsed().as_secs_f64())
}

/// MiB/s of the guest's source (`bytes` long), read to its end.
pub fn from_guest(connect: Connect<'_>, bytes: u64) -> Result<f64> {
    let start = Instant::now();
    let mut s = connect(SOURCE)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    if got != bytes {
        bail!("received {got} of {bytes} bytes");
    }
    Ok(bytes as f64 / MIB / start.elapsed().as_secs_f64())
}

/// Connections per second to the service that accepts and closes.
pub fn setup_rate(connect: Connect<'_>, n: u32) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        let mut s = connect(ACCEPT_CLOSE)?;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}

/// Round trips per second of one byte through the guest's echo, `n` in a row on one
/// connection (the caller's connector sets no-delay for TCP).
pub fn round_trips(connect: Connect<'_>, n: u32) -> Result<f64> {
    let mut s = connect(ECHO)?;
    let mut b = [0u8; 1];
    // One untimed trip: the connection's first packets cost more.
    s.write_all(b"x")?;
    s.read_exact(&mut b)?;
    let start = Instant::now();
    for i in 0..n {
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        if b[0] != i as u8 {
            bail!("echo answered {} for {}", b[0], i as u8);
        }
    }
    Ok(f64::from(n) / start.elapsed().as_secs_f64())
}
