//! The UEFI memory map: every byte of guest RAM (and the reserved ranges the VMM announced) with
//! its UEFI type, and page allocation out of it. Allocation goes top-down below 4 GiB, which is
//! all the firmware's page tables map; RAM above 4 GiB is reported as free for the OS.

use alloc::vec::Vec;

/// UEFI memory types (the specification's numbering).
pub mod kind {
    pub const RESERVED: u32 = 0;
    pub const LOADER_CODE: u32 = 1;
    pub const LOADER_DATA: u32 = 2;
    pub const BOOT_CODE: u32 = 3;
    pub const BOOT_DATA: u32 = 4;
    pub const RUNTIME_CODE: u32 = 5;
    pub const RUNTIME_DATA: u32 = 6;
    pub const CONVENTIONAL: u32 = 7;
    pub const UNUSABLE: u32 = 8;
    pub const ACPI_RECLAIM: u32 = 9;
    pub const ACPI_NVS: u32 = 10;
    pub const MMIO: u32 = 11;
    pub const MMIO_PORT: u32 = 12;
    pub const PAL_CODE: u32 = 13;
    pub const PERSISTENT: u32 = 14;
    /// One past the last type the specification defines; 0x7000_0000.. are OEM, 0x8000_0000..
    /// OS loader types, both allowed in allocations.
    pub const MAX: u32 = 15;
}

pub const PAGE: u64 = 4096;
const LIMIT_4G: u64 = 1 << 32;

const ATTR_UC: u64 = 0x1;
const ATTR_WC: u64 = 0x2;
const ATTR_WT: u64 = 0x4;
const ATTR_WB: u64 = 0x8;
const ATTR_RUNTIME: u64 = 1 << 63;

/// A range of pages of one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte (page-aligned).
    pub start: u64,
    /// Pages.
    pub pages: u64,
    /// UEFI memory type.
    pub kind: u32,
}

impl Region {
    fn end(&self) -> u64 {
        self.start + self.pages * PAGE
    }

    /// The attribute bits the OS sees.
    pub fn attributes(&self) -> u64 {
        match self.kind {
            kind::MMIO | kind::MMIO_PORT => ATTR_UC | ATTR_RUNTIME,
            kind::RUNTIME_CODE | kind::RUNTIME_DATA => {
                ATTR_UC | ATTR_WC | ATTR_WT | ATTR_WB | ATTR_RUNTIME
            }
            kind::RESERVED => ATTR_UC,
            _ => ATTR_UC | ATTR_WC | ATTR_WT | ATTR_WB,
        }
    }
}

/// Where an allocation may go (UEFI's AllocateType).
#[derive(Clone, Copy, Debug)]
pub enum Placement {
    /// Anywhere.
    Any,
    /// Ending at or below this address (inclusive, as UEFI's AllocateMaxAddress).
    Below(u64),
    /// Exactly here.
    At(u64),
}

/// Why an allocation or free failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No free range fits.
    OutOfResources,
    /// Freeing something that was not allocated, or an address not page-aligned.
    NotFound,
    /// A bad type or size.
    InvalidParameter,
}

/// The memory map.
#[derive(Default)]
pub struct MemoryMap {
    regions: Vec<Region>,
    key: usize,
}

impl MemoryMap {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            regions: Vec::new(),
            key: 1,
        }
    }

    /// Marks `[start, start + size)` (rounded out to pages) as `kind`, whatever it was.
    pub fn set(&mut self, start: u64, size: u64, kind: u32) {
        let first = start & !(PAGE - 1);
        let end = (start + size + PAGE - 1) & !(PAGE - 1);
        if end <= first {
            return;
        }
        let mut out = Vec::with_capacity(self.regions.len() + 2);
        for r in &self.regions {
            if r.end() <= first || r.start >= end {
                out.push(*r);
                continue;
            }
            if r.start < first {
                out.push(Region {
                    start: r.start,
                    pages: (first - r.start) / PAGE,
                    kind: r.kind,
                });
            }
            if r.end() > end {
                out.push(Region {
                    start: end,
                    pages: (r.end() - end) / PAGE,
                    kind: r.kind,
                });
            }
        }
        out.push(Region {
            start: first,
            pages: (end - first) / PAGE,
            kind,
        });
        out.sort_by_key(|r| r.start);
        // Merge neighbours of one type so the map stays short.
        let mut merged: Vec<Region> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if last.kind == r.kind && last.end() == r.start => last.pages += r.pages,
                _ => merged.push(r),
            }
        }
        self.regions = merged;
        self.key += 1;
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Changes whenever the map does (GetMemoryMap's MapKey).
    pub fn key(&self) -> usize {
        self.key
    }

    fn kind_at(&self, start: u64, end: u64) -> Option<u32> {
        // The type covering the whole of [start, end), if one region does.
        self.regions
            .iter()
            .find(|r| r.start <= start && r.end() >= end)
            .map(|r| r.kind)
    }

    /// Allocates `pages` pages of `kind`.
    pub fn allocate(
        &mut self,
        placement: Placement,
        kind: u32,
        pages: u64,
    ) -> Result<u64, MapError> {
        if pages == 0 || kind == kind::CONVENTIONAL || (kind::MAX..0x7000_0000).contains(&kind) {
            return Err(MapError::InvalidParameter);
        }
        let size = pages.checked_mul(PAGE).ok_or(MapError::OutOfResources)?;
        let addr = match placement {
            Placement::At(addr) => {
                if addr % PAGE != 0 {
                    return Err(MapError::NotFound);
                }
                let end = addr.checked_add(size).ok_or(MapError::NotFound)?;
                if self.kind_at(addr, end) != Some(kind::CONVENTIONAL) {
                    return Err(MapError::NotFound);
                }
                addr
            }
            Placement::Any | Placement::Below(_) => {
                let limit = match placement {
                    Placement::Below(max) => (max.saturating_add(1) & !(PAGE - 1)).min(LIMIT_4G),
                    _ => LIMIT_4G,
                };
                self.regions
                    .iter()
                    .rev()
                    .filter(|r| r.kind == kind::CONVENTIONAL)
                    // Never hand out page 0: a NULL allocation would look like a failure.
                    .filter_map(|r| {
                        let top = r.end().min(limit);
                        let start = top.checked_sub(size)?;
                        (start >= r.start.max(PAGE)).then_some(start)
                    })
                    .next()
                    .ok_or(MapError::OutOfResources)?
            }
        };
        self.set(addr, size, kind);
        Ok(addr)
    }

    /// Returns allocated pages to the free pool.
    pub fn free(&mut self, addr: u64, pages: u64) -> Result<(), MapError> {
        if addr % PAGE != 0 || pages == 0 {
            return Err(MapError::NotFound);
        }
        let end = addr.checked_add(pages * PAGE).ok_or(MapError::NotFound)?;
        match self.kind_at(addr, end) {
            Some(k) if k != kind::CONVENTIONAL && k != kind::RESERVED && k != kind::MMIO => {
                self.set(addr, pages * PAGE, kind::CONVENTIONAL);
                Ok(())
            }
            _ => Err(MapError::NotFound),
        }
    }

    /// Whether `[addr, addr+size)` lies in RAM the firmware handed out or owns (for checks on
    /// pointers from loaders).
    pub fn is_ram(&self, addr: u64, size: u64) -> bool {
        let Some(end) = addr.checked_add(size) else {
            return false;
        };
        self.regions.iter().any(|r| {
            r.start <= addr
                && r.end() >= end
                && !matches!(r.kind, kind::RESERVED | kind::MMIO | kind::MMIO_PORT)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> MemoryMap {
        let mut m = MemoryMap::new();
        m.set(0, 0x9f000, kind::CONVENTIONAL);
        m.set(0xe0000, 0x20000, kind::RESERVED);
        m.set(0x100000, (256 << 20) - 0x100000, kind::CONVENTIONAL);
        m
    }

    #[test]
    fn allocates_top_down_and_frees_back_to_one_region() {
        let mut m = map();
        let before = m.regions().to_vec();
        let a = m.allocate(Placement::Any, kind::LOADER_DATA, 4).unwrap();
        assert_eq!(a, (256 << 20) - 4 * PAGE);
        let b = m.allocate(Placement::Any, kind::LOADER_DATA, 1).unwrap();
        assert_eq!(b, a - PAGE);
        // Two adjacent allocations of one type are one region.
        assert_eq!(
            m.regions()
                .iter()
                .filter(|r| r.kind == kind::LOADER_DATA)
                .count(),
            1
        );
        m.free(a, 4).unwrap();
        m.free(b, 1).unwrap();
        assert_eq!(m.regions(), &before[..]);
    }

    #[test]
    fn below_and_at_placements() {
        let mut m = map();
        let a = m
            .allocate(Placement::Below(0x1ff_ffff), kind::BOOT_DATA, 2)
            .unwrap();
        assert_eq!(a + 2 * PAGE, 0x200_0000);
        assert_eq!(
            m.allocate(Placement::At(0x300_0000), kind::BOOT_DATA, 1),
            Ok(0x300_0000)
        );
        assert_eq!(
            m.allocate(Placement::At(0x300_0000), kind::BOOT_DATA, 1),
            Err(MapError::NotFound)
        );
        assert_eq!(
            m.allocate(Placement::At(0xe0000), kind::BOOT_DATA, 1),
            Err(MapError::NotFound)
        );
        assert_eq!(
            m.allocate(Placement::Any, kind::BOOT_DATA, 1 << 20),
            Err(MapError::OutOfResources)
        );
        assert_eq!(
            m.allocate(Placement::Any, kind::CONVENTIONAL, 1),
            Err(MapError::InvalidParameter)
        );
        assert!(m.allocate(Placement::Any, 0x8000_0001, 1).is_ok());
    }

    #[test]
    fn never_returns_page_zero_or_frees_what_was_not_allocated() {
        let mut m = MemoryMap::new();
        m.set(0, 2 * PAGE, kind::CONVENTIONAL);
        assert_eq!(m.allocate(Placement::Any, kind::BOOT_DATA, 1), Ok(PAGE));
        assert_eq!(
            m.allocate(Placement::Any, kind::BOOT_DATA, 1),
            Err(MapError::OutOfResources)
        );
        assert_eq!(m.free(0, 1), Err(MapError::NotFound));
        assert_eq!(m.free(PAGE + 1, 1), Err(MapError::NotFound));
    }

    #[test]
    fn set_splits_and_key_changes() {
        let mut m = map();
        let k = m.key();
        m.set(0x200_0000, PAGE, kind::RUNTIME_CODE);
        assert_ne!(m.key(), k);
        let rt = m
            .regions()
            .iter()
            .find(|r| r.kind == kind::RUNTIME_CODE)
            .unwrap();
        assert_eq!((rt.start, rt.pages), (0x200_0000, 1));
        assert_ne!(rt.attributes() & ATTR_RUNTIME, 0);
        assert!(m.is_ram(0x200_0000, 10));
        assert!(!m.is_ram(0xe0000, 10));
    }
}
