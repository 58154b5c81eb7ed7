//! Guest memory in a snapshot: one file holding every RAM region back to back, written sparse
//! (all-zero pages are holes), and mapped copy-on-write on restore instead of read: restore
//! time does not grow with memory size, and pages the restored guest never touches are never
//! read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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

/// Why guest memory could not be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory file could not be created, written, read or mapped.
    #[error("{}: {source}", path.display())]
    File {
        /// The memory file.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Guest memory could not be read.
    #[error("reading guest memory at {addr:#x}: {source}")]
    Guest {
        /// Where.
        addr: u64,
        /// What failed.
        source: vm_memory::GuestMemoryError,
    },
    /// The saved layout does not fit the file or the address space.
    #[error("{}: region at {addr:#x}: {reason}", path.display())]
    Layout {
        /// The memory file.
        path: std::path::PathBuf,
        /// The region's guest address.
        addr: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The mapped regions do not make a guest memory.
    #[error("guest memory layout: {0}")]
    Regions(String),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> MemoryError + '_ {
    move |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    }
}

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
pub fn save(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<Region>, MemoryError> {
    // Guest memory holds the guest's secrets: readable by the owner only.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
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
                .map_err(|source| MemoryError::Guest {
                    addr: start + done,
                    source,
                })?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    file.write_all_at(page, offset + done + (i * PAGE) as u64)
                        .map_err(file_err(path))?;
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
        .map_err(file_err(path))?;
    Ok(regions)
}

/// Maps the memory file privately (copy-on-write) at the saved guest addresses.
pub fn restore(path: &Path, regions: &[Region]) -> Result<GuestMemoryMmap, MemoryError> {
    let file = File::open(path).map_err(file_err(path))?;
    let len = file.metadata().map_err(file_err(path))?.len();
    let layout = |addr, reason| MemoryError::Layout {
        path: path.to_path_buf(),
        addr,
        reason,
    };
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        if r.file_offset
            .checked_add(r.size)
            .is_none_or(|end| end > len)
        {
            return Err(layout(r.guest_addr, "lies past the end of the memory file"));
        }
        let fo = FileOffset::new(file.try_clone().map_err(file_err(path))?, r.file_offset);
        let region = MmapRegion::build(
            Some(fo),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| file_err(path)(std::io::Error::other(format!("mapping: {e}"))))?;
        mapped.push(
            GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
                .ok_or_else(|| layout(r.guest_addr, "overflows the address space"))?,
        );
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Regions(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_memory_file_is_the_owners_alone_and_holds_the_guests_bytes() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * PAGE)]).unwrap();
        mem.write_slice(b"secret", GuestAddress(PAGE as u64 + 10))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let regions = save(&mem, &path).unwrap();
        assert_eq!(regions.len(), 1);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[PAGE + 10..PAGE + 16], b"secret");
        // An existing file is never overwritten.
        assert!(save(&mem, &path).is_err());
    }
}
