//! Block devices as the filesystem drivers see them, and byte-granular reads on top.

use alloc::vec;
use core::fmt;

/// Error of the device below (the driver logs details itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError;

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("device I/O error")
    }
}

/// A disk read in blocks. `&self` because drivers use interior mutability.
pub trait BlockDevice {
    /// 512 in practice; 512 and 4096 are supported.
    fn block_size(&self) -> u32;
    fn num_blocks(&self) -> u64;
    /// Reads `buf.len() / block_size` blocks from `lba`; `buf.len()` is a multiple of block_size.
    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), IoError>;
}

// Lets a driver that takes its device by value borrow one instead (e.g. a partition `Slice`
// that the caller keeps, or a disk shared by several partitions).
impl<T: BlockDevice + ?Sized> BlockDevice for &T {
    fn block_size(&self) -> u32 {
        (**self).block_size()
    }
    fn num_blocks(&self) -> u64 {
        (**self).num_blocks()
    }
    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read_blocks(lba, buf)
    }
}

/// A window of another device: a partition (blocks `first..first + count`).
pub struct Slice<'a, D: BlockDevice + ?Sized> {
    pub dev: &'a D,
    pub first: u64,
    pub count: u64,
}

impl<D: BlockDevice + ?Sized> BlockDevice for Slice<'_, D> {
    fn block_size(&self) -> u32 {
        self.dev.block_size()
    }

    fn num_blocks(&self) -> u64 {
        self.count
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let bs = u64::from(self.dev.block_size());
        if bs == 0 || buf.len() as u64 % bs != 0 {
            return Err(IoError);
        }
        // The partition bounds come from an on-disk table, so a reader confused by a corrupt
        // filesystem must not be able to reach the neighbouring partition.
        let end = lba.checked_add(buf.len() as u64 / bs).ok_or(IoError)?;
        if end > self.count {
            return Err(IoError);
        }
        let abs = self.first.checked_add(lba).ok_or(IoError)?;
        self.dev.read_blocks(abs, buf)
    }
}

/// Reads an arbitrary byte range through a block device (unaligned offset and length).
///
/// The aligned middle of the range goes straight into `buf` with a single device call, so a
/// large aligned read costs one request; only partial blocks at the ends are bounced.
pub fn read_bytes<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), IoError> {
    if buf.is_empty() {
        return Ok(());
    }
    let bs = u64::from(dev.block_size());
    if bs == 0 {
        return Err(IoError);
    }
    let end = offset.checked_add(buf.len() as u64).ok_or(IoError)?;
    if end > dev.num_blocks().saturating_mul(bs) {
        return Err(IoError);
    }
    let bsz = bs as usize;
    let mut bounce = vec![];
    let mut pos = offset;
    let mut done = 0usize;

    let head = (pos % bs) as usize;
    if head != 0 {
        bounce.resize(bsz, 0);
        dev.read_blocks(pos / bs, &mut bounce)?;
        let n = (bsz - head).min(buf.len());
        buf[..n].copy_from_slice(&bounce[head..head + n]);
        done = n;
        pos += n as u64;
    }

    let middle = (buf.len() - done) / bsz * bsz;
    if middle != 0 {
        dev.read_blocks(pos / bs, &mut buf[done..done + middle])?;
        done += middle;
        pos += middle as u64;
    }

    if done < buf.len() {
        bounce.resize(bsz, 0);
        dev.read_blocks(pos / bs, &mut bounce)?;
        let n = buf.len() - done;
        buf[done..].copy_from_slice(&bounce[..n]);
    }
    Ok(())
}
