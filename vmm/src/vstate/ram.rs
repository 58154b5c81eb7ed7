//! Host mappings for guest RAM, placed so that KVM can back the guest with huge pages.
//!
//! KVM maps a guest range with 2 MiB (nested) page-table entries only when the host page behind
//! it is a huge page and guest-physical and host-virtual addresses agree modulo 2 MiB; otherwise
//! every 4 KiB guest page faults in on its own. `mmap` places an anonymous mapping on any page
//! boundary, so vm-memory's own allocation (which we otherwise use) left each region misaligned
//! about as often as not: a traced boot took 12,929 nested page faults under our `vmm` against
//! 505 under Firecracker, which aligns its guest memory the same way. vm-memory cannot place a
//! mapping, so this module maps, aligns and advises, and hands vm-memory the pointer.
//!
//! vm-memory never unmaps a mapping it did not make, so guest RAM built here stays mapped until
//! the process ends; that is its lifetime once a VM runs (a `vmm` process runs one VM). A boot
//! or restore that fails after the memory was made gives it back with [`Reclaim`]: the process
//! lives on, waiting for another try, and a restore has read the snapshot into that memory.

use std::io;
use std::ptr::null_mut;
use std::sync::{Arc, Weak};

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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

/// Guest RAM for `ranges` (guest address, length), each range a mapping of its own made by
/// [`aligned_anonymous`], with the means to unmap it again should the VM it is for fail to
/// build. A failure here unmaps what it had mapped.
pub fn guest_memory(
    ranges: impl IntoIterator<Item = (u64, u64)>,
) -> io::Result<(GuestMemoryMmap, Reclaim)> {
    let mut regions: Vec<Arc<GuestRegionMmap>> = Vec::new();
    let unmap_all = |regions: &[Arc<GuestRegionMmap>]| {
        for r in regions {
            // SAFETY: a mapping made below for a region nobody else has seen yet.
            unsafe { libc::munmap(r.as_ptr().cast(), r.size()) };
        }
    };
    for (start, len) in ranges {
        let made = usize::try_from(len)
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOMEM))
            .and_then(aligned_anonymous)
            .and_then(|mapping| {
                let (ptr, size) = (mapping.as_ptr(), mapping.size());
                GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or_else(|| {
                    // SAFETY: the mapping just made, which the refused region did not keep.
                    unsafe { libc::munmap(ptr.cast(), size) };
                    io::Error::other(format!(
                        "guest range {start:#x}+{len:#x} wraps the address space"
                    ))
                })
            });
        match made {
            Ok(region) => regions.push(Arc::new(region)),
            Err(e) => {
                unmap_all(&regions);
                return Err(e);
            }
        }
    }
    let reclaim = Reclaim {
        regions: regions
            .iter()
            .map(|r| (Arc::downgrade(r), r.as_ptr() as usize, r.size()))
            .collect(),
    };
    match GuestMemoryMmap::from_arc_regions(regions.clone()) {
        Ok(memory) => Ok((memory, reclaim)),
        Err(e) => {
            unmap_all(&regions);
            Err(io::Error::other(e.to_string()))
        }
    }
}

/// Unmaps guest RAM made by [`guest_memory`] once nothing refers to it any more: for a VM that
/// failed to build. A VM that runs keeps its memory for good, and its `Reclaim` is just dropped.
#[derive(Debug)]
pub struct Reclaim {
    /// Each region, with its host address and length.
    regions: Vec<(Weak<GuestRegionMmap>, usize, usize)>,
}

impl Reclaim {
    /// Unmaps every region no `GuestMemoryMmap` holds any more (everything the VM was built
    /// from must be gone: the caller drops it first, and stops whatever wrote into the memory
    /// through raw addresses, such as a memory loader). A region still held is left mapped, and
    /// logged. Returns how many regions were unmapped.
    pub fn release(self) -> usize {
        let mut unmapped = 0;
        let mut bytes = 0;
        for (region, ptr, len) in self.regions {
            if region.strong_count() > 0 {
                tracing::warn!(
                    addr = ptr,
                    len,
                    "guest RAM of a VM that failed to build is still in use; left mapped"
                );
                continue;
            }
            // SAFETY: a mapping made by `guest_memory` that no `GuestRegionMmap` (hence no
            // `GuestMemoryMmap`, device or `Vm` of ours) refers to any more. A KVM VM file
            // descriptor that outlived its `Vm` would only find the pages gone (KVM follows the
            // host's mappings); its build failed, so it never runs.
            if unsafe { libc::munmap(ptr as *mut libc::c_void, len) } == 0 {
                unmapped += 1;
                bytes += len;
            }
        }
        tracing::info!(
            regions = unmapped,
            mib = bytes >> 20,
            "guest RAM of a VM that failed to build unmapped"
        );
        unmapped
    }
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

    /// Whether `[ptr, ptr + len)` is mapped in this process.
    fn mapped(ptr: usize, len: usize) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    usize::from_str_radix(a, 16).ok()?,
                    usize::from_str_radix(b, 16).ok()?,
                ))
            })
            .any(|(a, b)| a <= ptr && ptr + len <= b)
    }

    #[test]
    fn memory_of_a_failed_build_is_unmapped_once_nothing_holds_it() {
        use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

        let ranges = [(0, 2 * HUGE_PAGE as u64), (1 << 32, 4096)];
        let (mem, reclaim) = guest_memory(ranges).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let spans: Vec<(usize, usize)> = mem
            .iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .collect();
        assert!(spans.iter().all(|&(p, _)| p % HUGE_PAGE == 0));
        mem.write_obj(0xabu8, GuestAddress(1 << 32)).unwrap();
        // A device still holding the memory keeps it mapped.
        let held = mem.clone();
        drop(mem);
        let reclaim_held = Reclaim {
            regions: reclaim.regions.clone(),
        };
        assert_eq!(reclaim_held.release(), 0, "held by `held`");
        assert_eq!(held.read_obj::<u8>(GuestAddress(1 << 32)).unwrap(), 0xab);
        assert!(spans.iter().all(|&(p, l)| mapped(p, l)));
        drop(held);
        assert_eq!(reclaim.release(), 2);
    }

    #[test]
    fn ranges_that_cannot_be_mapped_are_errors() {
        assert!(guest_memory([(0, 4096), (1 << 20, u64::MAX - 4095)]).is_err());
        assert!(guest_memory([(u64::MAX - 4095, 8192)]).is_err(), "wraps");
    }
}
