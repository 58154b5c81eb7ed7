//! Refcounts and cluster allocation. Clusters are reserved in batches: their refcounts go to 1
//! and are synced to disk before any table may point at them, so a crash can only leak.

use super::{Meta, Qcow2};
use crate::error::Result;
use crate::header::{self, field};
use crate::refcount;

/// Upper bound of one reservation batch, in bytes of clusters.
const MAX_BATCH_BYTES: u64 = 64 << 20;

impl Qcow2 {
    fn rb_index(&self, c: u64) -> (usize, usize) {
        (
            (c / self.g.rb_entries) as usize,
            (c % self.g.rb_entries) as usize,
        )
    }

    /// The refcount block at `off`, cached.
    fn refblock<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut Vec<u8>> {
        if m.rb.get_mut(off).is_none() {
            let mut b = vec![0u8; self.g.cs as usize];
            self.read_meta(&mut b, off)?;
            m.rb.insert(off, b);
        }
        Ok(m.rb.get_mut(off).expect("just cached"))
    }

    /// Refcount of cluster `c` (0 when no refcount block covers it).
    pub(crate) fn refcount(&self, m: &mut Meta, c: u64) -> Result<u64> {
        let (r, i) = self.rb_index(c);
        let off = m.reftable.get(r).copied().unwrap_or(0);
        if off == 0 {
            return Ok(0);
        }
        let order = self.g.rc_order;
        Ok(refcount::get(self.refblock(m, off)?, order, i))
    }

    /// Sets the refcount of cluster `c`; the block is written by
    /// [`Qcow2::write_dirty_refblocks`].
    pub(crate) fn set_refcount(&self, m: &mut Meta, c: u64, v: u64) -> Result<()> {
        self.ensure_covered(m, c)?;
        let (r, i) = self.rb_index(c);
        let off = m.reftable[r];
        let order = self.g.rc_order;
        refcount::set(self.refblock(m, off)?, order, i, v);
        m.rb.mark_dirty(off);
        Ok(())
    }

    /// Drops one reference to cluster `c`.
    pub(crate) fn decrement(&self, m: &mut Meta, c: u64) -> Result<()> {
        let v = self.refcount(m, c)?;
        if v == 0 {
            return Err(self.corrupt(format!("freeing cluster {c} whose refcount is already 0")));
        }
        self.set_refcount(m, c, v - 1)?;
        if v == 1 {
            m.free_cursor = m.free_cursor.min(c);
            m.l2.remove(c * self.g.cs);
            m.zeroed.remove(&c);
        }
        Ok(())
    }

    /// Writes the refcount blocks changed since they were last written.
    pub(crate) fn write_dirty_refblocks(&self, m: &mut Meta) -> Result<()> {
        for (off, stamp) in m.rb.dirty() {
            let block = m.rb.peek(off).expect("dirty blocks stay cached");
            self.write_meta(block, off)?;
            m.rb.clean_if(off, stamp);
        }
        Ok(())
    }

    /// Takes the cluster at the end of the file.
    fn take_eof(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let c = m.eof;
        if (c + n) * self.g.cs > header::MAX_HOST_OFFSET {
            return Err(self.corrupt("the image file would exceed 2^56 bytes"));
        }
        m.eof += n;
        Ok(c)
    }

    /// Makes sure a refcount block covers cluster `c`, creating it (and growing the refcount
    /// table) when needed.
    fn ensure_covered(&self, m: &mut Meta, c: u64) -> Result<()> {
        let r = (c / self.g.rb_entries) as usize;
        if r >= m.reftable.len() {
            self.grow_reftable(m, r + 1)?;
        }
        if m.reftable[r] != 0 {
            return Ok(());
        }
        let b = self.take_eof(m, 1)?;
        let mut block = vec![0u8; self.g.cs as usize];
        let self_covered = b / self.g.rb_entries == r as u64;
        if self_covered {
            refcount::set(
                &mut block,
                self.g.rc_order,
                (b % self.g.rb_entries) as usize,
                1,
            );
        }
        let off = b * self.g.cs;
        self.write_meta(&block, off)?;
        // The block must be on disk before the table points at it.
        self.sync()?;
        m.rb.insert(off, block);
        m.reftable[r] = off;
        self.write_meta(&off.to_be_bytes(), m.reftable_offset + r as u64 * 8)?;
        if !self_covered {
            self.set_refcount(m, b, 1)?;
        }
        Ok(())
    }

    /// Replaces the refcount table with one of at least `need` entries.
    fn grow_reftable(&self, m: &mut Meta, need: usize) -> Result<()> {
        let per_cluster = (self.g.cs / 8) as usize;
        let old_clusters = m.reftable.len().div_ceil(per_cluster) as u64;
        let old_offset = m.reftable_offset;
        let mut entries = need.max(m.reftable.len() * 2);
        // The new table lives at the end of the file: size it so that it also covers itself
        // and the refcount blocks describing it.
        loop {
            let clusters = entries.div_ceil(per_cluster) as u64;
            let last = m.eof + 2 * clusters + 8;
            let needed = (last / self.g.rb_entries) as usize + 1;
            if needed <= entries {
                break;
            }
            entries = needed.max(entries * 2);
        }
        let clusters = entries.div_ceil(per_cluster) as u64;
        entries = clusters as usize * per_cluster;
        if clusters * self.g.cs > header::MAX_TABLE_BYTES {
            return Err(self.corrupt("refcount table would exceed 32 MiB"));
        }
        let start = self.take_eof(m, clusters)?;
        m.reftable.resize(entries, 0);
        // The table is not on disk yet; refcount blocks created now only update memory and
        // their own clusters, and get written with the table below.
        m.reftable_offset = start * self.g.cs;
        for c in start..start + clusters {
            self.set_refcount(m, c, 1)?;
        }
        self.write_dirty_refblocks(m)?;
        let bytes: Vec<u8> = m.reftable.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_meta(&bytes, m.reftable_offset)?;
        self.set_file_len(self.file_len()?.max(m.eof * self.g.cs))?;
        self.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&m.reftable_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.write_meta(&hdr, field::REFTABLE)?;
        self.sync()?;
        // Nothing points at the old table any more.
        for c in 0..old_clusters {
            self.decrement(m, old_offset / self.g.cs + c)?;
        }
        Ok(())
    }

    fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(crate::error::Error::io(&self.path))?
            .len())
    }

    /// Reserves at least `n` clusters: free ones first, then from the end of the file. Their
    /// refcounts are durable when this returns.
    fn reserve(&self, m: &mut Meta, n: u64) -> Result<()> {
        let want = n.max(m.batch);
        let max_batch = (MAX_BATCH_BYTES / self.g.cs).clamp(16, 8192);
        m.batch = (m.batch * 2).min(max_batch);
        let mut got = Vec::with_capacity(want as usize);
        while (got.len() as u64) < want && m.free_cursor < m.eof {
            let c = m.free_cursor;
            m.free_cursor += 1;
            if c != 0 && self.refcount(m, c)? == 0 {
                got.push(c);
            }
        }
        let rest = want - got.len() as u64;
        let mut past_eof = 0..0;
        if rest > 0 {
            let start = self.take_eof(m, rest)?;
            got.extend(start..start + rest);
            past_eof = start..start + rest;
        }
        for &c in &got {
            self.set_refcount(m, c, 1)?;
        }
        self.write_dirty_refblocks(m)?;
        let len = self.file_len()?;
        if m.eof * self.g.cs > len {
            self.set_file_len(m.eof * self.g.cs)?;
        }
        self.sync()?;
        m.reserved.extend(got);
        // Clusters past the old end of the file read as zeroes (a hole), durably so once the
        // new length is synced: nothing needs to write zeroes into them.
        m.zeroed.extend(past_eof);
        Ok(())
    }

    /// `n` clusters for new data or tables (refcount 1, durable), as host offsets, each with
    /// whether it is known to read as zeroes (never written since the file grew over it).
    pub(crate) fn alloc(&self, m: &mut Meta, n: u64) -> Result<Vec<(u64, bool)>> {
        if (m.reserved.len() as u64) < n {
            let short = n - m.reserved.len() as u64;
            self.reserve(m, short)?;
        }
        let got: Vec<u64> = m.reserved.drain(..n as usize).collect();
        Ok(got
            .into_iter()
            .map(|c| (c * self.g.cs, m.zeroed.remove(&c)))
            .collect())
    }

    /// Hands clusters from a failed operation back to the reservation pool. Nothing durable
    /// may point at them; they may have been written in part (no longer known zero).
    pub(crate) fn unalloc(&self, m: &mut Meta, hosts: &[u64]) {
        for h in hosts.iter().rev() {
            m.reserved.push_front(h / self.g.cs);
        }
    }

    /// `n` contiguous clusters at the end of the file (for tables), durable refcounts.
    pub(crate) fn alloc_contiguous(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let start = self.take_eof(m, n)?;
        for c in start..start + n {
            self.set_refcount(m, c, 1)?;
        }
        self.write_dirty_refblocks(m)?;
        let len = self.file_len()?;
        if m.eof * self.g.cs > len {
            self.set_file_len(m.eof * self.g.cs)?;
        }
        self.sync()?;
        Ok(start * self.g.cs)
    }

    /// Clusters the compressed bytes at `offset..offset+len` occupy (each holds one reference
    /// per compressed cluster stored in it).
    pub(crate) fn compressed_clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.g.cs;
        let last = (offset + len.max(1) - 1) / self.g.cs;
        first..last + 1
    }
}
