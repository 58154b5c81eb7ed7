//! A disk held in memory: for tests and fuzzing of the layers above the block layer.

use std::io;

use vm_memory::VolatileSlice;

use crate::backend::DiskBackend;

/// A disk held in memory: for tests and fuzzing of the layers above.
#[derive(Clone, Debug, Default)]
pub struct MemoryDisk {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Whether a flush was requested.
    pub flushed: bool,
}

impl MemoryDisk {
    /// A disk with these contents.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            flushed: false,
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.data.len() as u64)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the disk")
            })?;
        Ok(offset as usize..end as usize)
    }
}

impl DiskBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            let r = self.range(off, b.len() as u64)?;
            b.copy_from(&self.data[r]);
            off += b.len() as u64;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            let r = self.range(off, b.len() as u64)?;
            b.copy_to(&mut self.data[r]);
            off += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushed = true;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.discard(offset, len)
    }
}
