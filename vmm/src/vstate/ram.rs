//! Host mappings for guest RAM, placed so that KVM can back the guest with huge pages.
//!
//! KVM maps a guest range with 2 MiB (nested) page-table entries only when the host page behind
//! it is a huge page and guest-physical and host-virtual addresses agree modulo 2 MiB; otherwise
//! every 4 KiB guest page faults in on its own. `mmap` places an anonymous mapping on any page
//! boundary, so vm-memory's own allocation (which we otherwise use) left each region misaligned
//! about as often as not: a traced boot took 12,929 nested page faults under our `vmm` against
//! 505 under Firecracker, which aligns its guest memory the same way. vm-memory cannot place a
//! mapping, so this module maps, aligns and advises, and hands vm-memory the pointer.

use std::io;
use std::ptr::null_mut;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};

/// The alignment of guest RAM in the host: an x86-64 huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// An anonymous, private, read-write mapping of `len` bytes (a multiple of the page size) at a
/// [`HUGE_PAGE`]-aligned address, advised for transparent huge pages.
///
/// The mapping is never unmapped: vm-memory does not own a mapping it did not make, and guest RAM
/// lives as long as the `vmm` process (which runs one VM). Untouched pages cost nothing
/// (`MAP_NORESERVE`).
pub fn aligned_anonymous(len: usize) -> io::Result<MmapRegion> {
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new anonymous mapping at an address the kernel picks; nothing else refers to it.
    let base = unsafe { libc::mmap(null_mut(), reserve, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let head = start - base;
    let tail = reserve - head - len;
    // SAFETY: the head and tail are page-aligned parts of the mapping just made that nothing
    // refers to; `start..start + len` stays mapped.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: advice on our own mapping; it changes no contents. Hosts whose transparent huge
    // pages are "madvise" (Debian's default) need it; a failure only costs speed.
    if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "guest RAM not advised for huge pages");
    }
    // SAFETY: `start..start + len` is a valid mapping of this process (made above) that nothing
    // unmaps while the process lives.
    unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(start as *mut u8) }
        .with_mmap_prot(prot)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_huge_page_aligned_writable_and_zeroed() {
        for len in [4096, HUGE_PAGE, 3 * HUGE_PAGE + 4096] {
            let r = aligned_anonymous(len).unwrap();
            assert_eq!(r.as_ptr() as usize % HUGE_PAGE, 0, "len {len}");
            assert_eq!(r.size(), len);
            // SAFETY: the region is mapped read-write for `len` bytes.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), len) };
            assert!(bytes.iter().all(|b| *b == 0));
            bytes[len - 1] = 0xaa;
            assert_eq!(bytes[len - 1], 0xaa);
        }
        assert!(aligned_anonymous(usize::MAX - 4095).is_err());
    }
}
