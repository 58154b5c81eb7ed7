//! The qcow2 engine: one image file (one layer of a chain). Metadata lives behind a mutex and
//! is written through to the file as it changes; guest data moves outside the lock, so many
//! reads and writes run at once.
//!
//! Crash safety. A power loss keeps what was written before the last fdatasync and any subset
//! of what was written after it, so every "A before B" below is a sync between them, not an
//! order of writes; tests/crash.rs rebuilds thousands of such states and checks each.
//! - Refcounts before references: clusters are reserved in batches whose refcounts are made
//!   durable before any table may point at them.
//! - Tables before pointers: a new L2 table is zeroes on disk (a hole past the old end of the
//!   file, or written and synced when the cluster is recycled) before its L1 entry is written.
//! - Data before mappings: L2 tables are written back, not through. An entry changes in the
//!   cached table only after its data cluster is written, and dirty tables reach the file after
//!   a sync that covers those data writes (at a flush, or when the cache is full of dirty
//!   tables), as QEMU's cache dependencies do. After a completed flush every acknowledged write
//!   is durable.
//! - No reuse while referenced: a cluster dropped from a table is freed only at a flush, once
//!   the table without it is durable; only then may the allocator hand it out again.
//!
//! So a crash may leak clusters but never leaves a referenced cluster with a refcount of zero,
//! a table pointing at stale contents, or a guest cluster showing another's data.
//!
//! Errors: a failed write leaves memory as the file last saw it: an L1 entry changes in memory
//! only after its write succeeded (a failed one leaks its table rather than risk handing it
//! out twice), an allocation's L2 entries change only after its data is written (clusters of a
//! failed one go back to the pool), and dirty tables stay dirty until written.

mod alloc;
mod cache;
mod read;
mod resize;
mod write;

pub(crate) use write::ZeroMode;

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use vm_memory::VolatileSlice;

use self::cache::TableCache;
use crate::entry;
use crate::error::{Error, Result};
use crate::header::{self, Compression, Header};
use crate::hook::{FileOp, Hook};
use crate::iov;
use crate::layer::Layer;

/// Bytes of L2 tables (and of refcount blocks) kept in memory per image.
const L2_CACHE_BYTES: u64 = 32 << 20;
const RB_CACHE_BYTES: u64 = 4 << 20;

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cs: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// u64 words per L2 entry (1, or 2 with extended L2).
    pub l2_words: u64,
    pub ext: bool,
    pub v3: bool,
    pub rc_order: u32,
    /// Entries per refcount block.
    pub rb_entries: u64,
    pub compression: Compression,
}

impl Geometry {
    fn of(h: &Header) -> Self {
        Geometry {
            cluster_bits: h.cluster_bits,
            cs: h.cluster_size(),
            l2_entries: h.l2_entries(),
            l2_words: h.l2_entry_bytes() / 8,
            ext: h.extended_l2(),
            v3: h.version == 3,
            rc_order: h.refcount_order,
            rb_entries: (h.cluster_size() * 8) >> h.refcount_order,
            compression: h.compression,
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries * self.cs
    }
}

/// Mutable metadata, under [`Qcow2::meta`].
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l2: TableCache<Vec<u64>>,
    pub reftable: Vec<u64>,
    pub reftable_offset: u64,
    pub rb: TableCache<Vec<u8>>,
    /// Count of L2 entry changes; `synced_changes` of them are known to follow their data onto
    /// the disk (their data writes completed before a sync that returned).
    pub l2_changes: u64,
    pub synced_changes: u64,
    /// First cluster index past everything allocated.
    pub eof: u64,
    /// Where the search for free clusters resumes.
    pub free_cursor: u64,
    /// Clusters with a durable refcount of 1 that nothing references yet.
    pub reserved: VecDeque<u64>,
    /// Reserved clusters known to read as zeroes (taken past the end of the file).
    pub zeroed: HashSet<u64>,
    /// Size of the next reservation batch.
    pub batch: u64,
    /// Clusters (indices) unreferenced by the tables, to be freed at the next flush.
    pub pending_free: Vec<u64>,
    /// Guest clusters being allocated right now.
    pub inflight: HashSet<u64>,
    /// Total size of the file when the image was last sized (bytes).
    pub size: u64,
}

/// One qcow2 file.
pub struct Qcow2 {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// Guest data transfers (O_DIRECT when asked for).
    pub(crate) data: iov::DataFile,
    pub(crate) header: Header,
    pub(crate) g: Geometry,
    pub(crate) writable: bool,
    pub(crate) backing: Option<Box<Layer>>,
    pub(crate) meta: Mutex<Meta>,
    /// Signalled when in-flight allocations commit.
    pub(crate) allocated: Condvar,
    /// Held shared by every read and write for its whole duration, exclusively when freed
    /// clusters are returned to the allocator (no transfer may still target them).
    pub(crate) gate: RwLock<()>,
    pub(crate) size: AtomicU64,
    /// The last decompressed cluster (sequential reads of compressed images hit it).
    decompressed: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// Sees every change to the file (crash and fault-injection tests).
    hook: Option<Hook>,
}

fn be64_words(buf: &[u8]) -> Vec<u64> {
    buf.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl Qcow2 {
    /// Opens `file` (already opened with the right access mode) as qcow2, without its backing
    /// file: the caller attaches that with [`Qcow2::set_backing`].
    pub fn open(path: &Path, file: File, writable: bool) -> Result<Qcow2> {
        let len = file.metadata().map_err(Error::io(path))?.len();
        let mut first = vec![0u8; 112.min(len as usize)];
        iov::pread(&file, &mut first, 0).map_err(Error::io(path))?;
        if first.len() < 72 || !header::looks_like_qcow2(&first) {
            return Err(Error::corrupt(path, "no qcow2 header"));
        }
        let bits = u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"));
        if !(header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::corrupt(
                path,
                format!("cluster_bits {bits} is out of range"),
            ));
        }
        let mut c0 = vec![0u8; (1u64 << bits).min(len) as usize];
        iov::pread(&file, &mut c0, 0).map_err(Error::io(path))?;
        let h = Header::parse(path, &c0, len)?;
        if writable {
            if h.extended_l2() {
                return Err(Error::unsupported(
                    path,
                    "writing images with extended L2 entries (subclusters); open read-only or \
                     convert with `vmm img convert`",
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    path,
                    "writing images with internal snapshots; open read-only",
                ));
            }
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(Error::corrupt(
                    path,
                    "the image is marked corrupt; run `vmm img check --repair` or open it read-only",
                ));
            }
        }
        let g = Geometry::of(&h);
        for (what, off, bytes) in [
            ("L1 table", h.l1_offset, u64::from(h.l1_size) * 8),
            (
                "refcount table",
                h.reftable_offset,
                u64::from(h.reftable_clusters) * g.cs,
            ),
        ] {
            if bytes > 0 && off + bytes > len.next_multiple_of(g.cs) {
                return Err(Error::corrupt(
                    path,
                    format!("{what} at {off:#x} ({bytes} bytes) lies past the end of the file"),
                ));
            }
        }
        let mut l1_bytes = vec![0u8; h.l1_size as usize * 8];
        iov::pread(&file, &mut l1_bytes, h.l1_offset).map_err(Error::io(path))?;
        let l1 = be64_words(&l1_bytes);
        for e in &l1 {
            entry::decode_l1(*e, h.cluster_bits).map_err(|r| Error::corrupt(path, r))?;
        }
        let mut rt_bytes = vec![0u8; (u64::from(h.reftable_clusters) * g.cs) as usize];
        iov::pread(&file, &mut rt_bytes, h.reftable_offset).map_err(Error::io(path))?;
        let reftable = be64_words(&rt_bytes);
        for e in &reftable {
            if e & (g.cs - 1) != 0 || *e >= header::MAX_HOST_OFFSET {
                return Err(Error::corrupt(
                    path,
                    format!("refcount table entry {e:#x} is invalid"),
                ));
            }
        }
        let eof = len.div_ceil(g.cs).max(1);
        let meta = Meta {
            l1,
            l1_offset: h.l1_offset,
            l2: TableCache::new((L2_CACHE_BYTES / g.cs).clamp(16, 4096) as usize),
            reftable,
            reftable_offset: h.reftable_offset,
            rb: TableCache::new((RB_CACHE_BYTES / g.cs).clamp(8, 1024) as usize),
            l2_changes: 0,
            synced_changes: 0,
            eof,
            free_cursor: 0,
            reserved: VecDeque::new(),
            zeroed: HashSet::new(),
            batch: 16,
            pending_free: Vec::new(),
            inflight: HashSet::new(),
            size: h.size,
        };
        let q = Qcow2 {
            path: path.to_path_buf(),
            file,
            data: iov::DataFile { direct: None },
            size: AtomicU64::new(h.size),
            header: h,
            g,
            writable,
            backing: None,
            meta: Mutex::new(meta),
            allocated: Condvar::new(),
            gate: RwLock::new(()),
            decompressed: Mutex::new(None),
            hook: None,
        };
        if writable {
            q.prepare_for_writing()?;
        }
        Ok(q)
    }

    /// Repairs the refcounts of an image left dirty (lazy refcounts) and clears feature bits we
    /// do not maintain, before the first write.
    fn prepare_for_writing(&self) -> Result<()> {
        let h = &self.header;
        if h.incompatible & header::INCOMPAT_DIRTY != 0 {
            tracing::info!(path = %self.path.display(), "image is dirty: rebuilding refcounts");
            crate::check::rebuild_refcounts(&self.path, &self.file, h)?;
            let mut m = self.lock();
            let mut head = vec![0u8; 60];
            iov::pread(&self.file, &mut head, 0).map_err(Error::io(&self.path))?;
            let rt_off = u64::from_be_bytes(head[48..56].try_into().expect("8 bytes"));
            let rt_clusters = u32::from_be_bytes(head[56..60].try_into().expect("4 bytes"));
            let mut rt = vec![0u8; (u64::from(rt_clusters) * self.g.cs) as usize];
            iov::pread(&self.file, &mut rt, rt_off).map_err(Error::io(&self.path))?;
            m.reftable = be64_words(&rt);
            m.reftable_offset = rt_off;
            m.rb = TableCache::new((RB_CACHE_BYTES / self.g.cs).clamp(8, 1024) as usize);
            let len = self.file.metadata().map_err(Error::io(&self.path))?.len();
            m.eof = len.div_ceil(self.g.cs).max(1);
            let incompat = h.incompatible & !header::INCOMPAT_DIRTY;
            self.write_meta(&incompat.to_be_bytes(), header::field::INCOMPAT)?;
        }
        if h.autoclear != 0 {
            // Persistent bitmaps (and any autoclear feature) are not kept up to date by us:
            // clearing the bits tells every reader they are stale, as the specification asks.
            self.write_meta(&0u64.to_be_bytes(), header::field::AUTOCLEAR)?;
        }
        if h.incompatible & header::INCOMPAT_DIRTY != 0 || h.autoclear != 0 {
            self.sync()?;
        }
        Ok(())
    }

    /// Routes guest data through `data` (an O_DIRECT descriptor).
    pub fn set_data_file(&mut self, data: iov::DataFile) {
        self.data = data;
    }

    /// Passes every later change to the file through `hook`.
    pub fn set_hook(&mut self, hook: Option<Hook>) {
        self.hook = hook;
    }

    /// Attaches the backing layer (done once, before the image is shared).
    pub fn set_backing(&mut self, backing: Option<Layer>) {
        self.backing = backing.map(Box::new);
    }

    /// The backing layer.
    pub fn backing(&self) -> Option<&Layer> {
        self.backing.as_deref()
    }

    /// The parsed header, as opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn corrupt(&self, reason: impl Into<String>) -> Error {
        Error::corrupt(&self.path, reason)
    }

    /// Runs `run`, a change to the file described by `op`, past the hook when one is attached
    /// (`op` is only built then: it copies written bytes).
    fn change(
        &self,
        op: impl FnOnce() -> FileOp,
        run: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<()> {
        let Some(hook) = &self.hook else {
            return run().map_err(Error::io(&self.path));
        };
        let op = op();
        hook.0.before(&op).map_err(Error::io(&self.path))?;
        run().map_err(Error::io(&self.path))?;
        hook.0.after(&op);
        Ok(())
    }

    pub(crate) fn write_meta(&self, bytes: &[u8], off: u64) -> Result<()> {
        self.change(
            || FileOp::Write {
                offset: off,
                data: bytes.to_vec(),
            },
            || iov::pwrite(&self.file, bytes, off),
        )
    }

    /// Writes guest data (through the O_DIRECT descriptor when there is one).
    pub(crate) fn write_data(&self, slices: &[VolatileSlice<'_>], off: u64) -> Result<()> {
        self.change(
            || {
                let bufs = iov::Bufs::new(slices);
                let mut data = vec![0u8; bufs.len() as usize];
                bufs.copy_out(0, &mut data);
                FileOp::Write { offset: off, data }
            },
            || self.data.write(&self.file, slices, off),
        )
    }

    /// Sets the file's length.
    pub(crate) fn set_file_len(&self, len: u64) -> Result<()> {
        self.change(|| FileOp::SetLen(len), || self.file.set_len(len))
    }

    pub(crate) fn read_meta(&self, bytes: &mut [u8], off: u64) -> Result<()> {
        iov::pread(&self.file, bytes, off).map_err(Error::io(&self.path))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.change(|| FileOp::Sync, || self.file.sync_data())
    }

    /// Offset of the L2 table for guest offset `guest` (0: none), checked.
    pub(crate) fn l2_offset(&self, m: &Meta, guest: u64) -> Result<u64> {
        let i = (guest / self.g.l2_span()) as usize;
        let e = m.l1.get(i).copied().unwrap_or(0);
        let off = entry::decode_l1(e, self.g.cluster_bits).map_err(|r| self.corrupt(r))?;
        Ok(off)
    }

    /// The L2 table at `off`, loaded into the cache when needed.
    pub(crate) fn l2_table<'m>(&self, m: &'m mut Meta, off: u64) -> Result<&'m mut Vec<u64>> {
        if m.l2.get_mut(off).is_none() {
            if off >= m.eof * self.g.cs {
                return Err(
                    self.corrupt(format!("L2 table at {off:#x} is past the end of the file"))
                );
            }
            let mut buf = vec![0u8; self.g.cs as usize];
            self.read_meta(&mut buf, off)?;
            return self.cache_l2(m, off, be64_words(&buf));
        }
        Ok(m.l2.get_mut(off).expect("cached"))
    }

    /// Caches `table` (as it is on disk) for `off`, making room first when every cached table
    /// is dirty.
    pub(crate) fn cache_l2<'m>(
        &self,
        m: &'m mut Meta,
        off: u64,
        table: Vec<u64>,
    ) -> Result<&'m mut Vec<u64>> {
        if m.l2.full_of_dirty() {
            self.write_back_l2(m)?;
        }
        Ok(m.l2.insert(off, table))
    }

    /// Records a change to the cached L2 table at `off`.
    pub(crate) fn l2_changed(&self, m: &mut Meta, off: u64) {
        m.l2.mark_dirty(off);
        m.l2_changes += 1;
    }

    /// Writes the dirty L2 tables, after a sync when entries changed since the last one (the
    /// data they point at must be durable first). Returns whether anything was written.
    fn write_back_l2(&self, m: &mut Meta) -> Result<bool> {
        let dirty = m.l2.dirty();
        if dirty.is_empty() {
            return Ok(false);
        }
        if m.l2_changes > m.synced_changes {
            // Under the lock no entry can change meanwhile: every one so far is covered.
            self.sync()?;
            m.synced_changes = m.l2_changes;
        }
        for (off, stamp) in dirty {
            let table = m.l2.peek(off).expect("dirty tables stay cached");
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_meta(&bytes, off)?;
            m.l2.clean_if(off, stamp);
        }
        Ok(true)
    }

    /// Makes every acknowledged write durable (data, then the tables mapping it), then frees
    /// the clusters that durable tables stopped referencing.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // The bulk of the data goes out without holding the lock.
        let before = self.lock().l2_changes;
        self.sync()?;
        let mut m = self.lock();
        m.synced_changes = m.synced_changes.max(before);
        let wrote = self.write_back_l2(&mut m)?;
        // Everything these clusters were dropped from is in the tables just written.
        let pending = std::mem::take(&mut m.pending_free);
        drop(m);
        if wrote || !pending.is_empty() {
            if let Err(e) = self.sync() {
                self.lock().pending_free.extend(pending);
                return Err(e);
            }
        }
        if !pending.is_empty() {
            // No transfer may still be aimed at a cluster we hand back to the allocator.
            let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let mut m = self.lock();
            for c in pending {
                self.decrement(&mut m, c)?;
            }
            self.write_dirty_refblocks(&mut m)?;
            drop(m);
            self.sync()?;
        }
        Ok(())
    }

    /// Returns reserved but unused clusters and frees pending ones: after this, `check` finds
    /// no leaks.
    pub fn close(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        {
            let mut m = self.lock();
            let reserved: Vec<u64> = m.reserved.drain(..).collect();
            for c in reserved {
                self.decrement(&mut m, c)?;
            }
            self.write_dirty_refblocks(&mut m)?;
        }
        self.flush()?;
        self.trim_tail()
    }

    /// Cuts free clusters off the end of the file (reservations handed back leave them).
    fn trim_tail(&self) -> Result<()> {
        let mut m = self.lock();
        if !m.pending_free.is_empty() || !m.reserved.is_empty() || !m.inflight.is_empty() {
            return Ok(());
        }
        let mut end = m.eof;
        while end > 1 && self.refcount(&mut m, end - 1)? == 0 {
            end -= 1;
        }
        let len = self.file.metadata().map_err(Error::io(&self.path))?.len();
        if end * self.g.cs < len {
            self.set_file_len(end * self.g.cs)?;
            m.eof = end;
            m.free_cursor = m.free_cursor.min(end);
        }
        Ok(())
    }

    /// Reads and caches decompressed cluster data.
    pub(crate) fn decompress(&self, offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        let mut cached = self.decompressed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((o, data)) = cached.as_ref() {
            if *o == offset {
                return Ok(data.clone());
            }
        }
        if offset
            .checked_add(len)
            .is_none_or(|e| e > header::MAX_HOST_OFFSET)
        {
            return Err(self.corrupt(format!("compressed cluster at {offset:#x} is out of range")));
        }
        let mut input = vec![0u8; len as usize];
        self.read_meta(&mut input, offset)?;
        let mut out = vec![0u8; self.g.cs as usize];
        crate::compress::decompress_cluster(self.g.compression, &input, &mut out)
            .map_err(|r| self.corrupt(format!("compressed cluster at {offset:#x}: {r}")))?;
        let out = Arc::new(out);
        *cached = Some((offset, out.clone()));
        Ok(out)
    }

    /// Guest bytes read from the backing layer (zeroes past its end, or without one).
    pub(crate) fn read_backing(&self, guest: u64, bufs: iov::Bufs<'_, '_>) -> Result<()> {
        let len = bufs.len();
        match self.backing.as_deref() {
            Some(b) => {
                let bsize = b.size();
                let avail = bsize.saturating_sub(guest).min(len);
                if avail > 0 {
                    b.read(guest, &bufs.sub(0, avail))?;
                }
                if avail < len {
                    bufs.zero(avail, len - avail);
                }
                Ok(())
            }
            None => {
                bufs.zero(0, len);
                Ok(())
            }
        }
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(path = %self.path.display(), "closing image: {e}");
        }
    }
}
