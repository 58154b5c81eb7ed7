//! Guest memory in a snapshot: one file holding every RAM region back to back, written sparse
//! (all-zero pages are holes), and mapped copy-on-write on restore instead of read: restore
//! time does not grow with memory size, and pages the restored guest never touches are never
//! read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

/// Chunk size for copying and zero detection.
const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

/// Where one RAM region lives in the memory file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Region {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Writes every region of `mem` to `path`; returns the layout.
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<Region>, String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; CHUNK];
    for r in mem.iter() {
        let start = r.start_addr().raw_value();
        let size = r.len();
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + done))
                .map_err(|e| format!("reading guest memory at {:#x}: {e}", start + done))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    file.write_all_at(page, offset + done + (i * PAGE) as u64)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            done += n as u64;
        }
        regions.push(Region {
            guest_addr: start,
            size,
            file_offset: offset,
        });
        offset += size;
    }
    file.set_len(offset)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(regions)
}

/// Maps the memory file privately (copy-on-write) at the saved guest addresses.
pub fn restore(path: &Path, regions: &[Region]) -> Result<GuestMemoryMmap, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > len)
        {
            return Err(format!(
                "{}: region at {:#x} lies past the end of the memory file",
                path.display(),
                r.guest_addr
            ));
        }
        let fo = FileOffset::new(file.try_clone().map_err(|e| e.to_string())?, r.file_offset);
        let region = MmapRegion::build(
            Some(fo),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| format!("mapping guest memory: {e}"))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| format!("region at {:#x} overflows", r.guest_addr))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| format!("guest memory layout: {e}"))
}
