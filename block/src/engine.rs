//! How transfers run: through io_uring on a raw image's file, on a pool of threads for disks
//! that are not a plain file, or one at a time on the caller's thread. The asynchronous engines
//! share one shape: [`Io`]s go in with `push_run`, tagged with whatever the caller needs to
//! answer them, finished ones come back from `reap` after their eventfd fires, and `drain`
//! waits for all of them.

use std::io;
use std::os::fd::RawFd;

use vm_memory::GuestMemoryMmap;

use crate::backend::DiskBackend;
use crate::io::Io;
use crate::pool::{Pool, DEFAULT_THREADS};
use crate::uring::Uring;

/// A transfer an engine finished.
#[derive(Debug)]
pub struct Done<T> {
    /// The caller's tag.
    pub tag: T,
    /// The transfer.
    pub io: Io,
    /// Its outcome. A short transfer is an error: the caller checked that it lies inside the
    /// disk, so a short count means the file shrank or the device failed.
    pub result: io::Result<()>,
}

/// The transfer engine of one disk while a device serves it.
pub enum Engine<T> {
    /// Transfers run on the caller's thread as they come.
    Sync,
    /// Transfers go through io_uring on the image file (boxed: the ring's state dwarfs the
    /// other variants).
    Uring(Box<Uring<T>>),
    /// Transfers run on a pool of threads.
    Pool(Pool<T>),
}

impl<T: Send + 'static> Engine<T> {
    /// The engine for `disk`: io_uring on its file when it has one and the kernel offers
    /// io_uring (room for `depth` transfers), else a thread pool when the disk serves
    /// concurrent calls, else synchronous transfers.
    pub fn for_disk(disk: &dyn DiskBackend, depth: u32) -> Engine<T> {
        if let Some(fd) = disk.raw_fd() {
            match Uring::new(fd, depth.next_power_of_two()) {
                Ok(u) => return Engine::Uring(Box::new(u)),
                Err(e) => tracing::warn!("block: io_uring unavailable ({e})"),
            }
        }
        if let Some(concurrent) = disk.concurrent() {
            match Pool::new(concurrent, DEFAULT_THREADS) {
                Ok(p) => return Engine::Pool(p),
                Err(e) => tracing::warn!("block: no I/O threads ({e})"),
            }
        }
        tracing::debug!("block: serving transfers synchronously");
        Engine::Sync
    }

    /// True when transfers should be handed to [`Engine::push_run`] rather than run in place.
    pub fn is_async(&self) -> bool {
        !matches!(self, Engine::Sync)
    }

    /// The eventfd signalled when transfers complete.
    pub fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Sync => None,
            Engine::Uring(u) => Some(u.completion_fd()),
            Engine::Pool(p) => Some(p.completion_fd()),
        }
    }

    /// Queues a run of transfers that continue each other on disk (see
    /// [`crate::merge_runs`]); the run is handed back when the engine cannot take it, and the
    /// caller then serves it synchronously.
    pub fn push_run(
        &mut self,
        mem: &GuestMemoryMmap,
        run: Vec<(T, Io)>,
    ) -> Result<(), Vec<(T, Io)>> {
        match self {
            Engine::Sync => Err(run),
            Engine::Uring(u) => u.push_run(mem, run),
            Engine::Pool(p) => {
                p.push_run(mem, run);
                Ok(())
            }
        }
    }

    /// Starts the transfers queued since the last call.
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Sync => Ok(()),
            Engine::Uring(u) => u.submit(),
            Engine::Pool(p) => {
                p.submit();
                Ok(())
            }
        }
    }

    /// Collects finished transfers.
    pub fn reap(&mut self) -> Vec<Done<T>> {
        match self {
            Engine::Sync => Vec::new(),
            Engine::Uring(u) => u.reap(),
            Engine::Pool(p) => p.reap(),
        }
    }

    /// Waits for every transfer in flight and returns those not reaped yet. Afterwards nothing
    /// the engine started touches guest memory any more.
    pub fn drain(&mut self) -> Vec<Done<T>> {
        match self {
            Engine::Sync => Vec::new(),
            Engine::Uring(u) => u.drain(),
            Engine::Pool(p) => p.drain(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::Done;

    /// The engines' tests' tag: the queue and head index a device would answer in.
    pub type Tag = (usize, u16);

    /// Queue, head, status as virtio-blk reports it (0 OK, 1 error), bytes written into guest
    /// buffers.
    pub fn outcome(d: &Done<Tag>) -> (usize, u16, u8, u32) {
        let (status, written) = match &d.result {
            Ok(()) if d.io.write => (0, 0),
            Ok(()) => (0, d.io.len),
            Err(_) => (1, 0),
        };
        (d.tag.0, d.tag.1, status, written)
    }
}
