//! How the worker carries out data transfers: through io_uring on the image file, on a pool of
//! threads for disks that are not a plain file, or one at a time on the worker itself. The
//! asynchronous engines share one shape: transfers go in with `push_run`, finished ones come back
//! from `reap` after their eventfd fires, and `drain` waits for all of them.

use std::io;
use std::os::fd::RawFd;

use vm_memory::GuestMemoryMmap;

use super::pool::Pool;
use super::request::{Completion, Transfer};
use super::uring::Uring;

/// A transfer an engine finished.
pub struct Done {
    /// Queue the request came from.
    pub queue: usize,
    /// Head descriptor index of its chain.
    pub head: u16,
    /// Its outcome.
    pub completion: Completion,
}

/// The transfer engine of one activation of the device.
pub enum Engine {
    /// Transfers run on the worker thread as they are parsed.
    Sync,
    /// Transfers go through io_uring on the image file (boxed: the ring's state dwarfs the
    /// other variants).
    Uring(Box<Uring>),
    /// Transfers run on a pool of threads.
    Pool(Pool),
}

impl Engine {
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
    /// [`super::uring::merge_runs`]); the run is handed back when the engine cannot take it, and
    /// the caller then serves it synchronously.
    pub fn push_run(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: usize,
        run: Vec<(u16, Transfer)>,
    ) -> Result<(), Vec<(u16, Transfer)>> {
        match self {
            Engine::Sync => Err(run),
            Engine::Uring(u) => u.push_run(mem, queue, run),
            Engine::Pool(p) => {
                p.push_run(mem, queue, run);
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
    pub fn reap(&mut self) -> Vec<Done> {
        match self {
            Engine::Sync => Vec::new(),
            Engine::Uring(u) => u.reap(),
            Engine::Pool(p) => p.reap(),
        }
    }

    /// Waits for every transfer in flight and returns those not reaped yet. Afterwards nothing
    /// the engine started touches guest memory any more.
    pub fn drain(&mut self) -> Vec<Done> {
        match self {
            Engine::Sync => Vec::new(),
            Engine::Uring(u) => u.drain(),
            Engine::Pool(p) => p.drain(),
        }
    }
}
