//! Block I/O and Disk I/O on a whole disk and on each of its partitions.

use core::ffi::c_void;
use r_efi::efi::{Boolean, Status};
use r_efi::protocols::{block_io, disk_io};

use crate::block::{read_bytes, BlockDevice, Slice};
use crate::virtio_blk::VirtioBlk;

const BLOCK: u64 = 512;

/// Block I/O for blocks `[first, first + count)` of `disk`.
#[repr(C)]
pub struct BlockIo {
    proto: block_io::Protocol,
    media: block_io::Media,
    disk: &'static VirtioBlk,
    first: u64,
    count: u64,
}

/// Disk I/O over the same range.
#[repr(C)]
pub struct DiskIo {
    proto: disk_io::Protocol,
    media_id: u32,
    disk: &'static VirtioBlk,
    first: u64,
    count: u64,
}

fn range_ok(lba: u64, len: u64, count: u64) -> bool {
    len % BLOCK == 0 && lba.checked_add(len / BLOCK).is_some_and(|end| end <= count)
}

extern "efiapi" fn reset(_this: *mut block_io::Protocol, _ext: Boolean) -> Status {
    Status::SUCCESS
}

/// The checks Read/WriteBlocks share; `Ok(None)` for an empty transfer.
fn check_blocks(
    this: *mut block_io::Protocol,
    media_id: u32,
    lba: u64,
    size: usize,
    buf: *mut c_void,
    write: bool,
) -> Result<Option<&'static BlockIo>, Status> {
    // SAFETY: `this` is the first field of one of our BlockIo structures, which live for ever.
    let b = unsafe { &*(this as *const BlockIo) };
    if media_id != b.media.media_id {
        return Err(Status::MEDIA_CHANGED);
    }
    if write && b.disk.read_only() {
        return Err(Status::WRITE_PROTECTED);
    }
    if size == 0 {
        return Ok(None);
    }
    if size as u64 % BLOCK != 0 {
        return Err(Status::BAD_BUFFER_SIZE);
    }
    if buf.is_null() || !range_ok(lba, size as u64, b.count) {
        return Err(Status::INVALID_PARAMETER);
    }
    Ok(Some(b))
}

fn done(r: Result<(), crate::block::IoError>) -> Status {
    match r {
        Ok(()) => Status::SUCCESS,
        Err(_) => Status::DEVICE_ERROR,
    }
}

extern "efiapi" fn read_blocks(
    this: *mut block_io::Protocol,
    media_id: u32,
    lba: u64,
    size: usize,
    buf: *mut c_void,
) -> Status {
    match check_blocks(this, media_id, lba, size, buf, false) {
        Ok(Some(b)) => {
            // SAFETY: the loader gives a buffer of `size` bytes (checked non-null).
            let out = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, size) };
            done(b.disk.read_blocks(b.first + lba, out))
        }
        Ok(None) => Status::SUCCESS,
        Err(s) => s,
    }
}

extern "efiapi" fn write_blocks(
    this: *mut block_io::Protocol,
    media_id: u32,
    lba: u64,
    size: usize,
    buf: *mut c_void,
) -> Status {
    match check_blocks(this, media_id, lba, size, buf, true) {
        Ok(Some(b)) => {
            // SAFETY: the loader gives a buffer of `size` bytes (checked non-null).
            let data = unsafe { core::slice::from_raw_parts(buf as *const u8, size) };
            done(b.disk.write_blocks(b.first + lba, data))
        }
        Ok(None) => Status::SUCCESS,
        Err(s) => s,
    }
}

extern "efiapi" fn flush_blocks(this: *mut block_io::Protocol) -> Status {
    // SAFETY: as in `check_blocks`.
    let b = unsafe { &*(this as *const BlockIo) };
    done(b.disk.flush())
}

/// The checks Read/WriteDisk share; `Ok(None)` for an empty transfer.
fn check_disk(
    this: *mut disk_io::Protocol,
    media_id: u32,
    offset: u64,
    size: usize,
    buf: *mut c_void,
    write: bool,
) -> Result<Option<&'static DiskIo>, Status> {
    // SAFETY: `this` is the first field of one of our DiskIo structures, which live for ever.
    let d = unsafe { &*(this as *const DiskIo) };
    if media_id != d.media_id {
        return Err(Status::MEDIA_CHANGED);
    }
    if write && d.disk.read_only() {
        return Err(Status::WRITE_PROTECTED);
    }
    if size == 0 {
        return Ok(None);
    }
    if buf.is_null()
        || offset
            .checked_add(size as u64)
            .is_none_or(|end| end > d.count * BLOCK)
    {
        return Err(Status::INVALID_PARAMETER);
    }
    Ok(Some(d))
}

extern "efiapi" fn read_disk(
    this: *mut disk_io::Protocol,
    media_id: u32,
    offset: u64,
    size: usize,
    buf: *mut c_void,
) -> Status {
    let d = match check_disk(this, media_id, offset, size, buf, false) {
        Ok(Some(d)) => d,
        Ok(None) => return Status::SUCCESS,
        Err(s) => return s,
    };
    // SAFETY: the loader gives a buffer of `size` bytes (checked non-null).
    let out = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, size) };
    let part = Slice {
        dev: d.disk,
        first: d.first,
        count: d.count,
    };
    done(read_bytes(&part, offset, out))
}

extern "efiapi" fn write_disk(
    this: *mut disk_io::Protocol,
    media_id: u32,
    offset: u64,
    size: usize,
    buf: *mut c_void,
) -> Status {
    let d = match check_disk(this, media_id, offset, size, buf, true) {
        Ok(Some(d)) => d,
        Ok(None) => return Status::SUCCESS,
        Err(s) => return s,
    };
    // SAFETY: the loader gives a buffer of `size` bytes (checked non-null).
    let data = unsafe { core::slice::from_raw_parts(buf as *const u8, size) };
    // Read-modify-write of the sectors the range touches.
    let first = offset / BLOCK;
    let last = (offset + size as u64 - 1) / BLOCK;
    let mut sectors = alloc::vec![0u8; ((last - first + 1) * BLOCK) as usize];
    if d.disk.read_blocks(d.first + first, &mut sectors).is_err() {
        return Status::DEVICE_ERROR;
    }
    let at = (offset - first * BLOCK) as usize;
    sectors[at..at + size].copy_from_slice(data);
    done(d.disk.write_blocks(d.first + first, &sectors))
}

/// Builds Block I/O and Disk I/O for blocks `[first, first + count)` of `disk`.
pub fn build(
    disk: &'static VirtioBlk,
    media_id: u32,
    first: u64,
    count: u64,
    partition: bool,
) -> (*mut c_void, *mut c_void) {
    let bio = super::util::leak(BlockIo {
        proto: block_io::Protocol {
            revision: 0x0002_0001,
            media: core::ptr::null(),
            reset,
            read_blocks,
            write_blocks,
            flush_blocks,
        },
        media: block_io::Media {
            media_id,
            removable_media: false,
            media_present: true,
            logical_partition: partition,
            read_only: disk.read_only(),
            write_caching: false,
            block_size: BLOCK as u32,
            io_align: 0,
            last_block: count.saturating_sub(1),
            lowest_aligned_lba: 0,
            logical_blocks_per_physical_block: 1,
            optimal_transfer_length_granularity: 0,
        },
        disk,
        first,
        count,
    });
    // SAFETY: just leaked; the media lives inside the same allocation.
    unsafe { (*bio).proto.media = core::ptr::addr_of!((*bio).media) };
    let dio = super::util::leak(DiskIo {
        proto: disk_io::Protocol {
            revision: 0x0001_0000,
            read_disk,
            write_disk,
        },
        media_id,
        disk,
        first,
        count,
    });
    (bio as *mut c_void, dio as *mut c_void)
}
