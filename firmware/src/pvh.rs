//! What the VMM hands us in `hvm_start_info` (the PVH boot ABI): memory map, ACPI RSDP and the
//! command line, which we pass on to the boot loader as its load options.

use alloc::string::String;
use alloc::vec::Vec;

const MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM in the PVH memory map.
pub const E820_RAM: u32 = 1;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// One range of the VMM's memory map.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// Length.
    pub size: u64,
    /// E820 type (1 = RAM).
    pub kind: u32,
}

/// The start information, copied out of the low memory it lives in.
pub struct BootInfo {
    /// Memory map, as the VMM reported it.
    pub memmap: Vec<Range>,
    /// Physical address of the ACPI RSDP, if any.
    pub rsdp: Option<u64>,
    /// The VMM's command line (empty if none).
    pub cmdline: String,
}

/// Reads `hvm_start_info` at `addr`; `None` if it is not there (not started through PVH).
///
/// # Safety
/// `addr` is what the VMM left in EBX: identity-mapped memory holding the structure and the
/// tables it points at.
pub unsafe fn read(addr: u64) -> Option<BootInfo> {
    if addr == 0 {
        return None;
    }
    // SAFETY: per the caller, `addr` points at the start info.
    let info = unsafe { core::ptr::read_unaligned(addr as *const StartInfo) };
    if info.magic != MAGIC {
        return None;
    }
    let mut memmap = Vec::new();
    if info.memmap_paddr != 0 {
        for i in 0..info.memmap_entries.min(128) as usize {
            let p = (info.memmap_paddr as usize + i * core::mem::size_of::<MemmapEntry>())
                as *const MemmapEntry;
            // SAFETY: the VMM wrote `memmap_entries` entries at `memmap_paddr`.
            let e = unsafe { core::ptr::read_unaligned(p) };
            memmap.push(Range {
                start: e.addr,
                size: e.size,
                kind: e.kind,
            });
        }
    }
    let mut cmdline = String::new();
    if info.cmdline_paddr != 0 {
        let p = info.cmdline_paddr as *const u8;
        // Bounded: a missing terminator must not walk memory forever.
        for i in 0..4096 {
            // SAFETY: the command line is NUL-terminated within the VMM's 2 KiB limit; we stop
            // at the NUL or the bound.
            let b = unsafe { p.add(i).read_volatile() };
            if b == 0 {
                break;
            }
            cmdline.push(b as char);
        }
    }
    Some(BootInfo {
        memmap,
        rsdp: (info.rsdp_paddr != 0).then_some(info.rsdp_paddr),
        cmdline,
    })
}
