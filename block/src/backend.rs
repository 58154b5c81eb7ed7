//! The calls a disk device makes, with guest memory slices and byte offsets: it knows nothing
//! of file formats.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::VolatileSlice;

/// A disk image.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Drops the contents of a range (reads return zeroes afterwards).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range; `unmap` allows freeing the space instead of writing zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Called once when the VM ends: makes the image consistent for other tools (qcow2 hands
    /// back clusters reserved for writes that never came).
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// A file descriptor whose byte offsets are disk offsets, when there is one (raw images):
    /// the device may then run transfers on it asynchronously. Formats that map offsets
    /// (qcow2) return None and are served through the calls above.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// A handle that serves reads and writes from many threads at once, when the disk has one:
    /// without a file descriptor for io_uring, this is how the device keeps more than one
    /// transfer in flight. Disks that return None serve transfers one at a time.
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentDisk>> {
        None
    }
}

/// Reads and writes that many threads may run at once on one disk (the counterpart of
/// [`DiskBackend::read_at`]/[`DiskBackend::write_at`] for the thread-pool engine).
pub trait ConcurrentDisk: Send + Sync {
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
}
