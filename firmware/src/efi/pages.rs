//! Buffers in pages of the memory map rather than the firmware heap: files of tens of MiB
//! (kernels, initramfs) pass through them.

use crate::memmap::{kind, Placement, PAGE};

/// Pages of boot services data, freed on drop unless kept.
pub struct PageBuf {
    addr: u64,
    pages: u64,
    len: usize,
}

impl PageBuf {
    /// `len` bytes for the caller to fill (not zeroed: files are read straight into them, and a
    /// kernel's worth of memset is a noticeable part of a boot in a nested guest), or `None` if
    /// memory is short.
    pub fn new(len: usize) -> Option<Self> {
        let pages = (len as u64).div_ceil(PAGE).max(1);
        // SAFETY: no other borrow of the memory map is alive.
        let addr = unsafe { crate::MEMORY.borrow() }
            .allocate(Placement::Any, kind::BOOT_DATA, pages)
            .ok()?;
        Some(Self { addr, pages, len })
    }

    /// The bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: our pages, `len` bytes long.
        unsafe { core::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: our pages, `len` bytes long.
        unsafe { core::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: no other borrow of the memory map is alive when buffers are dropped.
        let _ = unsafe { crate::MEMORY.borrow() }.free(self.addr, self.pages);
    }
}
