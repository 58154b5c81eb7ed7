//! Changing the virtual size: growing is a header update (plus a larger L1 table when the new
//! size needs one); shrinking is allowed only over a tail that reads as zeroes.

use std::sync::atomic::Ordering;

use super::Qcow2;
use crate::error::{Error, Result};
use crate::header::{self, field};

impl Qcow2 {
    /// Sets the virtual size to `new_size` (a multiple of 512).
    pub(crate) fn resize(&self, new_size: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path.display()
            )));
        }
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::Invalid(format!("size {new_size} is too large")));
        }
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let need = self.header.l1_entries_for(new_size) as usize;
        if need > m.l1.len() {
            let bytes = need as u64 * 8;
            if bytes > header::MAX_TABLE_BYTES {
                return Err(Error::Invalid(format!(
                    "size {new_size} needs an L1 table over 32 MiB"
                )));
            }
            let clusters = bytes.div_ceil(self.g.cs);
            let entries = (clusters * self.g.cs / 8) as usize;
            let mut l1 = m.l1.clone();
            l1.resize(entries.min(u32::MAX as usize), 0);
            let new_off = self.alloc_contiguous(&mut m, clusters)?;
            let table: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_meta(&table, new_off)?;
            self.sync()?;
            let mut hdr = [0u8; 12];
            hdr[..4].copy_from_slice(&(l1.len() as u32).to_be_bytes());
            hdr[4..].copy_from_slice(&new_off.to_be_bytes());
            self.write_meta(&hdr, field::L1)?;
            self.sync()?;
            let old_clusters = (m.l1.len() as u64 * 8).div_ceil(self.g.cs);
            let old_first = m.l1_offset / self.g.cs;
            if m.l1_offset != 0 {
                for c in old_first..old_first + old_clusters {
                    self.decrement(&mut m, c)?;
                }
                self.write_dirty_refblocks(&mut m)?;
            }
            m.l1 = l1;
            m.l1_offset = new_off;
        }
        self.write_meta(&new_size.to_be_bytes(), field::SIZE)?;
        self.sync()?;
        m.size = new_size;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
