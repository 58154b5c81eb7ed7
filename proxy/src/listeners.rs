//! The listening sockets, owned here rather than by the Pingora services that accept on them.
//!
//! Each balancer's service gets a duplicate of its socket (Pingora closes its copy when the
//! service ends); the original stays here until the balancer is removed. That is what lets a
//! new binary take the sockets over: they are sent to it while this process still accepts, and
//! the kernel's accept queue is shared by both, so no connection is refused in between.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use parking_lot::Mutex;
use pingora::server::{Fds, ListenFds};

/// Each socket with the number of balancers accepting on it.
#[derive(Default)]
pub struct Listeners {
    open: Mutex<BTreeMap<SocketAddr, (OwnedFd, usize)>>,
}

impl Listeners {
    /// Binds `addr` unless it is open already (no balancer counts as using it yet).
    pub fn bind(&self, addr: SocketAddr) -> io::Result<()> {
        if let std::collections::btree_map::Entry::Vacant(e) = self.open.lock().entry(addr) {
            let l = TcpListener::bind(addr)?;
            // Pingora's accept loop is async: the socket must not block. The flag is on the
            // open socket, so every duplicate (and a new binary's copy) shares it.
            l.set_nonblocking(true)?;
            e.insert((OwnedFd::from(l), 0));
        }
        Ok(())
    }

    /// A table holding a duplicate of the socket for `addr` (bound now if it is not open yet),
    /// as Pingora's listener builder looks it up: it takes that descriptor over. Counts one more
    /// user until [`Listeners::release`].
    pub fn table_for(&self, addr: SocketAddr) -> io::Result<ListenFds> {
        self.bind(addr)?;
        let mut open = self.open.lock();
        let entry = open
            .get_mut(&addr)
            .ok_or_else(|| io::Error::other("socket closed while starting"))?;
        let dup = entry.0.try_clone()?;
        entry.1 += 1;
        let mut fds = Fds::new();
        fds.add(addr.to_string(), dup.into_raw_fd());
        Ok(Arc::new(Mutex::new(fds)))
    }

    /// One user of `addr` stopped accepting; the last one closes this process's socket (with
    /// the service's copy gone too, the port is free and connections to it are refused).
    pub fn release(&self, addr: SocketAddr) {
        let mut open = self.open.lock();
        if let Some(entry) = open.get_mut(&addr) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                open.remove(&addr);
            }
        }
    }

    /// Closes sockets no balancer accepts on (bound for a push that then failed, or received
    /// from a previous binary for a balancer that no longer exists).
    pub fn close_unused(&self) {
        self.open.lock().retain(|_, (_, users)| *users > 0);
    }

    /// The open sockets, for sending to a new binary (the table borrows them).
    pub fn snapshot(&self) -> Fds {
        let mut fds = Fds::new();
        for (addr, (fd, _)) in self.open.lock().iter() {
            fds.add(addr.to_string(), fd.as_raw_fd());
        }
        fds
    }

    /// Takes ownership of sockets received from the previous binary.
    pub fn adopt(&self, received: Vec<(String, RawFd)>) -> io::Result<()> {
        let mut open = self.open.lock();
        for (key, raw) in received {
            // SAFETY: `raw` was just received over SCM_RIGHTS: a new descriptor in this
            // process that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let addr: SocketAddr = key.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("received socket for {key:?}"),
                )
            })?;
            open.insert(addr, (fd, 0));
        }
        Ok(())
    }
}
