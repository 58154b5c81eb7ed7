//! One data transfer between guest memory and a disk, and how back-to-back transfers merge into
//! one host I/O.

use std::io;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::backend::DiskBackend;

/// Guest buffers: address and length of each, in order.
pub type Segments = Vec<(GuestAddress, u32)>;

/// Most buffers one readv/writev takes (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

/// A read or write that passed every check (inside the disk, inside guest memory when it was
/// parsed) and only needs doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Io {
    /// Guest to disk when true.
    pub write: bool,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Guest buffers, in order.
    pub segments: Segments,
    /// Total bytes.
    pub len: u32,
}

impl Io {
    /// Guest memory slices of the buffers, None when one lies outside `mem`.
    pub fn slices<'m>(&self, mem: &'m GuestMemoryMmap) -> Option<Vec<VolatileSlice<'m>>> {
        slices(mem, self.segments.iter())
    }

    /// Carries the transfer out with the backend's synchronous calls.
    pub fn run_sync(&self, mem: &GuestMemoryMmap, disk: &mut dyn DiskBackend) -> io::Result<()> {
        match self.slices(mem) {
            Some(bufs) if self.write => disk.write_at(self.offset, &bufs),
            Some(bufs) => disk.read_at(self.offset, &bufs),
            None => Err(outside_memory()),
        }
    }
}

/// The error of a transfer whose buffer left guest memory.
pub(crate) fn outside_memory() -> io::Error {
    io::Error::other("guest buffer outside memory")
}

/// Slices of `segments` in `mem`, None when one lies outside it.
pub(crate) fn slices<'m, 's>(
    mem: &'m GuestMemoryMmap,
    segments: impl Iterator<Item = &'s (GuestAddress, u32)>,
) -> Option<Vec<VolatileSlice<'m>>> {
    segments
        .map(|(addr, len)| mem.get_slice(*addr, *len as usize).ok())
        .collect()
}

/// Splits `batch` (in queue order) into runs that one operation can serve: same direction, each
/// starting where the previous one ends on disk, at most `max_iovecs` buffers together. Merging
/// turns a guest's back-to-back sequential requests into one large host I/O.
pub fn merge_runs<T>(batch: Vec<(T, Io)>, max_iovecs: usize) -> Vec<Vec<(T, Io)>> {
    let mut runs: Vec<Vec<(T, Io)>> = Vec::new();
    let mut iovecs = 0;
    for (tag, io) in batch {
        let joins = runs.last().and_then(|r| r.last()).is_some_and(|(_, prev)| {
            prev.write == io.write
                && prev.offset + u64::from(prev.len) == io.offset
                && iovecs + io.segments.len() <= max_iovecs
        });
        match runs.last_mut() {
            Some(run) if joins => {
                iovecs += io.segments.len();
                run.push((tag, io));
            }
            _ => {
                iovecs = io.segments.len();
                runs.push(vec![(tag, io)]);
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_same_direction_transfers_merge() {
        let t = |write: bool, offset: u64, segs: usize| Io {
            write,
            offset,
            segments: vec![(GuestAddress(0x1000), 512); segs],
            len: 512 * segs as u32,
        };
        let batch = vec![
            (0, t(true, 0, 2)),
            (1, t(true, 1024, 1)),
            (2, t(false, 1536, 1)), // direction changes
            (3, t(false, 2048, 1)),
            (4, t(false, 8192, 1)), // not contiguous
            (5, t(false, 8704, 4)), // would exceed the iovec limit
        ];
        let runs = merge_runs(batch, 4);
        let heads: Vec<Vec<u16>> = runs
            .iter()
            .map(|r| r.iter().map(|(h, _)| *h).collect())
            .collect();
        assert_eq!(heads, vec![vec![0, 1], vec![2, 3], vec![4], vec![5]]);
    }
}
