//! AF_VSOCK stream sockets through libc, for programs in the guest (std has none): a listener
//! (the agent) and outgoing connections to the host.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A listening vsock socket on any CID.
pub struct Listener(OwnedFd);

/// One accepted connection.
pub struct Stream(OwnedFd);

fn last() -> io::Error {
    io::Error::last_os_error()
}

impl Listener {
    /// Listens on `port`, retrying until `timeout` while the vsock transport is not there yet
    /// (its driver may still be loading when the agent starts).
    pub fn bind_retrying(port: u32, timeout: Duration) -> io::Result<Listener> {
        let deadline = Instant::now() + timeout;
        loop {
            match Listener::bind(port) {
                Ok(l) => return Ok(l),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Listens on `port`.
    pub fn bind(port: u32) -> io::Result<Listener> {
        let fd = socket()?;
        let addr = sockaddr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm of the length given.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(last());
        }
        // SAFETY: listen on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
            return Err(last());
        }
        Ok(Listener(fd))
    }

    /// The next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        loop {
            // SAFETY: accept4 without an address buffer; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh descriptor nobody else owns.
                return Ok(Stream(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = last();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data for which zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// The host's context ID.
pub const HOST_CID: u32 = 2;

impl Stream {
    /// Connects to `port` on context `cid` (the host is [`HOST_CID`]).
    pub fn connect(cid: u32, port: u32) -> io::Result<Stream> {
        let fd = socket()?;
        let addr = sockaddr(cid, port);
        loop {
            // SAFETY: `addr` is a valid sockaddr_vm of the length given.
            let r = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_vm).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if r == 0 {
                return Ok(Stream(fd));
            }
            let e = last();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a socket we own.
        if unsafe { libc::shutdown(self.0.as_raw_fd(), how) } < 0 {
            return Err(last());
        }
        Ok(())
    }

    /// A second handle on the same connection (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream(self.0.try_clone()?))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(last());
        }
        Ok(n as usize)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is readable for its length; MSG_NOSIGNAL: a gone peer is an error, not
        // a SIGPIPE.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(last());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
