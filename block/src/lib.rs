//! lightbyte's block layer, after Cloud Hypervisor's `block` crate: what a disk device needs
//! from disks, and nothing of virtio.
//!
//! - [`DiskBackend`] (and [`ConcurrentDisk`] for disks that serve many threads at once): the
//!   calls a device makes with guest memory slices and byte offsets.
//! - [`ImageDisk`]: every image file, raw or qcow2 (with its backing chain), through the `qcow`
//!   crate; [`open_disk`] opens one in the format given or probed.
//! - [`MemoryDisk`]: a disk in memory, for tests and fuzzing of the layers above.
//! - [`Engine`]: how transfers run — io_uring straight between a raw file and guest memory, a
//!   pool of threads for formats that map offsets (qcow2), or synchronously — with the same
//!   shape for each: [`Io`]s go in tagged with whatever the caller needs to answer them, and
//!   come back as [`Done`] once their eventfd fires.

#![warn(missing_docs)]

mod backend;
mod engine;
mod image;
mod io;
mod memory;
mod open;
mod pool;
mod uring;

pub use backend::{ConcurrentDisk, DiskBackend};
pub use engine::{Done, Engine};
pub use image::ImageDisk;
pub use io::{merge_runs, Io, Segments, MAX_IOVECS};
pub use memory::MemoryDisk;
pub use open::{open_disk, OpenError};
pub use pool::{set_thread_hook, Pool, DEFAULT_THREADS};
pub use qcow::Format;
pub use uring::Uring;
