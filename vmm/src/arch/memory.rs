//! Guest RAM layout: which ranges are RAM for a given size, and the E820 map the guest sees.

use super::layout::*;

/// Kind of an E820 entry, with the numeric values of the E820 specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not for the OS.
    Reserved = 2,
}

/// One entry of the memory map handed to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Kind,
}

/// RAM ranges `(start, size)` backing `mem_size` bytes of guest memory: everything below the
/// 32-bit MMIO hole first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (RAM_ABOVE_4G_START, mem_size - MMIO_HOLE_START),
        ]
    }
}

/// End (exclusive) of RAM below 4 GiB.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

/// The E820 map for `mem_size` bytes of RAM: low RAM up to the EBDA, the BIOS area (which holds
/// our ACPI tables) reserved, then RAM from 1 MiB, and RAM above 4 GiB when there is any.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820Kind::Reserved,
        },
    ];
    let low_end = low_ram_end(mem_size);
    if low_end > HIGH_RAM_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: low_end - HIGH_RAM_START,
            kind: E820Kind::Ram,
        });
    }
    // Linux uses ECAM only when firmware reserved it.
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Kind::Reserved,
    });
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: RAM_ABOVE_4G_START,
            size: mem_size - MMIO_HOLE_START,
            kind: E820Kind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(low_ram_end(512 << 20), 512 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_hole() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_HOLE_START);
    }

    #[test]
    fn guest_exactly_at_hole_start_has_no_high_range() {
        assert_eq!(ram_ranges(MMIO_HOLE_START), vec![(0, MMIO_HOLE_START)]);
    }

    #[test]
    fn e820_covers_ram_and_never_the_hole() {
        let map = e820_map(4 << 30);
        assert!(map.contains(&E820Entry {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820Kind::Reserved
        }));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // All RAM minus the 384 KiB between the EBDA and 1 MiB.
        assert_eq!(ram, (4 << 30) - (HIGH_RAM_START - EBDA_START));
        for e in map.iter().filter(|e| e.kind == E820Kind::Ram) {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_HOLE_START || e.addr >= RAM_ABOVE_4G_START,
                "{e:?} overlaps the MMIO hole"
            );
        }
        // Sorted and non-overlapping.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr);
        }
    }

    #[test]
    fn e820_reserves_the_acpi_area() {
        let map = e820_map(256 << 20);
        assert!(map.contains(&E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820Kind::Reserved
        }));
        let ram_end = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.addr + e.size)
            .max();
        assert_eq!(ram_end, Some(256 << 20));
    }
}
