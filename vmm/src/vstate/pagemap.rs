//! Which pages of guest RAM the host holds, and which were written since a mark: the kernel's
//! page map (`/proc/self/pagemap`) and its soft-dirty bits (`/proc/self/clear_refs`).
//!
//! A snapshot then reads only the pages that exist (a page never touched is not present and
//! reads as zero) instead of scanning all of guest RAM, and a diff snapshot looks only at the
//! pages written since the last snapshot or restore. Soft-dirty bits are set by every write to
//! a page after the mark, whoever makes it: the guest through KVM (KVM takes a host write fault
//! before it maps a page writable) and our device threads alike, so no dirty bitmap has to be
//! threaded through every device (KVM's own dirty log sees only the guest's writes, and it
//! costs the guest its huge pages for as long as it is on).
//!
//! The files are opened once, before a jail hides `/proc` and drops the ids they need.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

/// The host's base page size.
pub const PAGE: usize = 4096;
/// Page map entry: the page is in memory.
const PRESENT: u64 = 1 << 63;
/// Page map entry: the page is in swap.
const SWAPPED: u64 = 1 << 62;
/// Page map entry: written since the last soft-dirty clear.
const SOFT_DIRTY: u64 = 1 << 55;
/// Entries read per `pread` (512 KiB of entries, for 256 MiB of memory).
const BATCH: usize = 1 << 16;

/// The page map of this process.
pub struct PageMap {
    pagemap: File,
    clear_refs: Option<File>,
    soft_dirty: bool,
}

static PAGE_MAP: OnceLock<Result<PageMap, String>> = OnceLock::new();

/// Tests that clear and read soft-dirty bits run one at a time: a clear is process-wide.
#[cfg(test)]
pub static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This process's page map, opened on first use. Call it before a jail closes.
pub fn get() -> Result<&'static PageMap, &'static str> {
    PAGE_MAP
        .get_or_init(|| PageMap::open().map_err(|e| format!("/proc/self/pagemap: {e}")))
        .as_ref()
        .map_err(String::as_str)
}

impl PageMap {
    fn open() -> io::Result<PageMap> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let clear_refs = OpenOptions::new()
            .write(true)
            .open("/proc/self/clear_refs")
            .ok();
        let mut map = PageMap {
            pagemap,
            clear_refs,
            soft_dirty: false,
        };
        map.soft_dirty = map.probe_soft_dirty().unwrap_or(false);
        tracing::debug!(soft_dirty = map.soft_dirty, "page map opened");
        Ok(map)
    }

    /// Whether this kernel tracks soft-dirty pages (CONFIG_MEM_SOFT_DIRTY): a page written
    /// after a clear must show the bit, and a page not written must not.
    ///
    /// The two pages are a mapping of their own between two inaccessible guard pages. Without
    /// the guards the kernel merges them into an adjacent private anonymous mapping (new
    /// mappings are placed next to the last), and where the merged one covers their 2 MiB
    /// block and transparent huge pages are `always` (the test host), one huge page backs
    /// both: writing one marks the other, the probe said "no tracking" and diff snapshots were
    /// refused (seen once in `apibench` with address randomization off; a script in the test
    /// host marks both pages so, every time).
    fn probe_soft_dirty(&self) -> io::Result<bool> {
        let pages = ProbePages::new()?;
        let base = pages.base();
        // SAFETY: both pages lie inside the probe's writable mapping, which `pages` keeps.
        unsafe {
            std::ptr::write_volatile(base as *mut u8, 1);
            std::ptr::write_volatile((base + PAGE) as *mut u8, 1);
        }
        self.clear_soft_dirty()?;
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(base as *mut u8, 2) };
        let mut e = Vec::new();
        self.entries(base, 2, &mut e)?;
        Ok(e[0] & SOFT_DIRTY != 0 && e[1] & SOFT_DIRTY == 0)
    }

    /// True when diff snapshots can be taken on this host.
    pub fn tracks_writes(&self) -> bool {
        self.soft_dirty
    }

    /// Marks every page of this process clean: from now on only pages written again are
    /// soft-dirty.
    pub fn clear_soft_dirty(&self) -> io::Result<()> {
        let mut f = self.clear_refs.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "/proc/self/clear_refs not writable",
            )
        })?;
        f.write_all(b"4")
    }

    /// Appends the entries of the `pages` pages from host address `addr` (page-aligned) to
    /// `out`.
    fn entries(&self, addr: usize, pages: usize, out: &mut Vec<u64>) -> io::Result<()> {
        let start = out.len();
        out.resize(start + pages, 0);
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(BATCH);
            // SAFETY: a u64 slice viewed as its bytes for the read; every bit pattern is a u64.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(out[start + done..].as_mut_ptr().cast::<u8>(), n * 8)
            };
            let offset = ((addr / PAGE + done) * 8) as u64;
            self.pagemap.read_exact_at(bytes, offset)?;
            done += n;
        }
        Ok(())
    }

    /// The pages of the mapping at `addr` (`len` bytes, page-aligned) to save: those the host
    /// holds (in memory or swap) or, with `since_mark`, those written since the last
    /// [`clear_soft_dirty`](Self::clear_soft_dirty). Returned as runs `(first page, count)`.
    pub fn pages(
        &self,
        addr: usize,
        len: usize,
        since_mark: bool,
    ) -> io::Result<Vec<(usize, usize)>> {
        let pages = len / PAGE;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        let mut buf = Vec::with_capacity(pages.min(BATCH));
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(BATCH);
            buf.clear();
            self.entries(addr + first * PAGE, n, &mut buf)?;
            for (i, e) in buf.iter().enumerate() {
                let wanted = if since_mark {
                    e & SOFT_DIRTY != 0
                } else {
                    e & (PRESENT | SWAPPED) != 0
                };
                if wanted {
                    let page = first + i;
                    match runs.last_mut() {
                        Some((s, c)) if *s + *c == page => *c += 1,
                        _ => runs.push((page, 1)),
                    }
                }
            }
            first += n;
        }
        Ok(runs)
    }
}

/// The soft-dirty probe's two writable pages: a mapping of their own between two inaccessible
/// guard pages (see [`PageMap::probe_soft_dirty`]); unmapped on drop.
struct ProbePages {
    map: *mut libc::c_void,
}

impl ProbePages {
    const LEN: usize = 4 * PAGE;

    fn new() -> io::Result<ProbePages> {
        // SAFETY: a new private anonymous mapping, owned by the value returned.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::LEN,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let pages = ProbePages { map };
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: the two middle pages of the mapping made above.
        if unsafe { libc::mprotect(pages.base() as *mut libc::c_void, 2 * PAGE, rw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(pages)
    }

    /// The first writable page.
    fn base(&self) -> usize {
        self.map as usize + PAGE
    }
}

impl Drop for ProbePages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.map, Self::LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::ram;

    #[test]
    fn the_probes_pages_are_a_mapping_of_their_own_beside_others_like_them() {
        // Mappings made in a row are placed next to each other: unguarded, these would merge
        // into one (the way the probe's pages merged with a neighbour).
        let all: Vec<ProbePages> = (0..8).map(|_| ProbePages::new().unwrap()).collect();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for pages in &all {
            let (base, end) = (pages.base(), pages.base() + 2 * PAGE);
            let own = format!("{base:x}-{end:x} rw-p ");
            assert!(
                maps.lines().any(|l| l.starts_with(&own)),
                "no mapping {own}in:\n{maps}"
            );
        }
    }

    #[test]
    fn untouched_pages_are_absent_and_writes_after_a_clear_are_seen() {
        let _serial = TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let map = get().expect("this host has /proc/self/pagemap");
        // Small pages (no huge-page advice) so that the page granularity shows.
        let len = 16 * PAGE;
        let region = ram::aligned_anonymous(len).unwrap();
        // SAFETY: the region is mapped read-write for `len` bytes and no one else uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len) };
        let addr = region.as_ptr() as usize;
        // SAFETY: our own mapping; dropping the advice changes no contents.
        unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
        bytes[3 * PAGE] = 1;
        bytes[4 * PAGE + 100] = 1;
        bytes[9 * PAGE] = 1;
        assert_eq!(map.pages(addr, len, false).unwrap(), vec![(3, 2), (9, 1)]);
        if !map.tracks_writes() {
            // This kernel lacks CONFIG_MEM_SOFT_DIRTY (the build machines' does): the bits are
            // never set, which the probe saw. The test host's Debian kernel has them; the
            // snapshot guest test takes diffs there.
            return;
        }
        map.clear_soft_dirty().unwrap();
        assert_eq!(map.pages(addr, len, true).unwrap(), vec![]);
        bytes[9 * PAGE + 5] = 2;
        bytes[12 * PAGE] = 2;
        assert_eq!(map.pages(addr, len, true).unwrap(), vec![(9, 1), (12, 1)]);
        assert_eq!(
            map.pages(addr, len, false).unwrap(),
            vec![(3, 2), (9, 1), (12, 1)]
        );
    }
}
