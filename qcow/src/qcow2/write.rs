//! Writing: in place where a cluster is ours alone, otherwise allocate, copy what the write
//! does not cover from the old contents (backing file, zeroes, shared or compressed cluster),
//! and only then point the L2 table at the new cluster.

use vm_memory::VolatileSlice;

use super::{Meta, Qcow2};
use crate::entry::{self, Mapping, COPIED, ZERO};
use crate::error::{Error, Result};
use crate::iov::{self, Bufs};

/// Where the parts of a newly allocated cluster that the write does not cover come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    Zero,
    Backing,
    Data(u64),
    Compressed { offset: u64, len: u64 },
}

/// A cluster being allocated by a write.
#[derive(Debug)]
struct NewCluster {
    /// Guest cluster index.
    index: u64,
    host: u64,
    source: Source,
    /// The host cluster was newly allocated (as opposed to reusing a "zero, allocated" one).
    fresh: bool,
    /// The host cluster reads as zeroes already: zero parts need not be written.
    zeroed: bool,
    /// Clusters losing a reference once the new entry is in place.
    release: Vec<u64>,
}

enum Step {
    /// A run of clusters we own: write straight through.
    InPlace { host: u64, len: u64 },
    /// Clusters to allocate, in guest order.
    Allocate(Vec<NewCluster>),
    /// Another write is allocating the cluster at the current position.
    Wait,
}

/// How a range of whole clusters should read afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// Contents no longer needed (DISCARD).
    Discard,
    /// Zeroes, space may be freed.
    ZeroUnmap,
    /// Zeroes, keep the space allocated.
    ZeroKeep,
}

impl Qcow2 {
    fn require_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path.display()
            )))
        }
    }

    /// The L2 table for `guest`, allocated (zeroed) when missing. Returns its offset.
    fn ensure_l2(&self, m: &mut Meta, guest: u64) -> Result<u64> {
        let off = self.l2_offset(m, guest)?;
        let i = (guest / self.g.l2_span()) as usize;
        if off != 0 {
            if m.l1[i] & COPIED == 0 {
                let c = off / self.g.cs;
                if self.refcount(m, c)? != 1 {
                    return Err(Error::unsupported(
                        &self.path,
                        "writing through an L2 table shared with a snapshot",
                    ));
                }
                let entry = m.l1[i] | COPIED;
                self.write_meta(&entry.to_be_bytes(), m.l1_offset + i as u64 * 8)?;
                m.l1[i] = entry;
            }
            return Ok(off);
        }
        if i >= m.l1.len() {
            return Err(self.corrupt("guest offset beyond the L1 table"));
        }
        let (host, zeroed) = self.alloc(m, 1)?[0];
        if !zeroed {
            // A recycled cluster holds old contents: the table must be zeroes on disk before
            // the L1 entry may point at it.
            let zeroes = vec![0u8; self.g.cs as usize];
            if let Err(e) = self.write_meta(&zeroes, host).and_then(|()| self.sync()) {
                self.unalloc(m, &[host]);
                return Err(e);
            }
        }
        let entry = host | COPIED;
        // A failed write may have landed all the same: the table stays allocated (a leak at
        // worst) rather than going back to the pool while the file may point at it.
        self.write_meta(&entry.to_be_bytes(), m.l1_offset + i as u64 * 8)?;
        m.l1[i] = entry;
        let words = (self.g.l2_entries * self.g.l2_words) as usize;
        self.cache_l2(m, host, vec![0u64; words])?;
        Ok(host)
    }

    /// Sets the L2 entry of guest cluster `index` (the table exists) in the cache; the table
    /// is written back at the next flush.
    fn set_l2(&self, m: &mut Meta, index: u64, value: u64) -> Result<()> {
        let (applied, done) = self.set_l2_entries(m, &[(index, value)]);
        debug_assert!(applied <= 1);
        done
    }

    /// Sets the L2 entries of consecutive guest clusters `(index, value)` (tables exist) in
    /// the cache. Returns how many were set: all, or on an error (loading a table) a prefix.
    fn set_l2_entries(&self, m: &mut Meta, entries: &[(u64, u64)]) -> (usize, Result<()>) {
        let per = self.g.l2_entries;
        let mut applied = 0;
        for run in entries.chunk_by(|a, b| b.0 == a.0 + 1 && b.0 % per != 0) {
            let first = run[0].0;
            let off = match self.l2_offset(m, first * self.g.cs) {
                Ok(off) => off,
                Err(e) => return (applied, Err(e)),
            };
            let i = (first % per) as usize;
            let table = match self.l2_table(m, off) {
                Ok(t) => t,
                Err(e) => return (applied, Err(e)),
            };
            for (k, (_, v)) in run.iter().enumerate() {
                table[i + k] = *v;
            }
            self.l2_changed(m, off);
            applied += run.len();
        }
        (applied, Ok(()))
    }

    /// Clusters that hold a reference because of `map`.
    fn held_by(&self, map: Mapping) -> Vec<u64> {
        match map {
            Mapping::Data { host, .. } | Mapping::Zero { host: Some(host) } => {
                vec![host / self.g.cs]
            }
            Mapping::Compressed { offset, len } => self.compressed_clusters(offset, len).collect(),
            _ => Vec::new(),
        }
    }

    fn plan(&self, m: &mut Meta, guest: u64, len: u64) -> Result<Step> {
        let cs = self.g.cs;
        let first = guest / cs;
        let last = (guest + len - 1) / cs;
        let mut news: Vec<NewCluster> = Vec::new();
        for index in first..=last {
            self.ensure_l2(m, index * cs)?;
            let map = self.mapping_at(m, index * cs)?;
            if let Mapping::Data { host, copied: true } = map {
                if !news.is_empty() {
                    break;
                }
                // Extend the in-place run while clusters continue contiguously on the host.
                let mut run_end = (index + 1) * cs;
                let mut next = index + 1;
                while next <= last && next % self.g.l2_entries != 0 {
                    match self.mapping_at(m, next * cs)? {
                        Mapping::Data {
                            host: h,
                            copied: true,
                        } if h == host + (next - index) * cs => {
                            run_end += cs;
                            next += 1;
                        }
                        _ => break,
                    }
                }
                let start = guest.max(index * cs);
                let end = run_end.min(guest + len);
                let host = host + (start - index * cs);
                if host >= m.eof * cs {
                    return Err(
                        self.corrupt(format!("data cluster at {host:#x} lies outside the file"))
                    );
                }
                return Ok(Step::InPlace {
                    host,
                    len: end - start,
                });
            }
            if m.inflight.contains(&index) {
                if news.is_empty() {
                    return Ok(Step::Wait);
                }
                break;
            }
            let (source, reuse) = match map {
                Mapping::Unallocated if self.backing.is_some() => (Source::Backing, None),
                Mapping::Unallocated => (Source::Zero, None),
                Mapping::Zero { host: Some(h) } if self.refcount(m, h / cs)? == 1 => {
                    (Source::Zero, Some(h))
                }
                Mapping::Zero { .. } => (Source::Zero, None),
                Mapping::Data { host, .. } => (Source::Data(host), None),
                Mapping::Compressed { offset, len } => (Source::Compressed { offset, len }, None),
            };
            let release = if reuse.is_some() {
                Vec::new()
            } else {
                self.held_by(map)
            };
            news.push(NewCluster {
                index,
                host: reuse.unwrap_or(0),
                source,
                fresh: reuse.is_none(),
                zeroed: false,
                release,
            });
        }
        let fresh = news.iter().filter(|n| n.fresh).count() as u64;
        let hosts = self.alloc(m, fresh)?;
        let mut hosts = hosts.into_iter();
        for n in news.iter_mut().filter(|n| n.fresh) {
            (n.host, n.zeroed) = hosts.next().expect("allocated one per fresh cluster");
        }
        for n in &news {
            m.inflight.insert(n.index);
        }
        Ok(Step::Allocate(news))
    }

    /// Bytes `range` of the old contents of guest cluster `index`.
    fn old_bytes(&self, src: Source, index: u64, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        match src {
            Source::Zero => {}
            Source::Backing => {
                let s = [iov::slice_of(&mut buf)];
                self.read_backing(index * self.g.cs + range.start, Bufs::new(&s))?;
            }
            Source::Data(host) => self.read_meta(&mut buf, host + range.start)?,
            Source::Compressed { offset, len } => {
                let data = self.decompress(offset, len)?;
                buf.copy_from_slice(&data[range.start as usize..range.end as usize]);
            }
        }
        Ok(buf)
    }

    /// Writes the new clusters' contents: guest data plus old contents around it (except
    /// zeroes over clusters that read as zeroes already).
    fn fill(&self, news: &[NewCluster], guest: u64, bufs: Bufs<'_, '_>) -> Result<()> {
        enum Part {
            Old(usize),
            Guest { at: u64 },
        }
        let cs = self.g.cs;
        let end = guest + bufs.len();
        let mut owned: Vec<Vec<u8>> = Vec::new();
        // (host offset, what, length), in host order within each cluster.
        let mut pieces: Vec<(u64, Part, u64)> = Vec::new();
        for n in news {
            let c0 = n.index * cs;
            let ws = guest.max(c0) - c0;
            let we = end.min(c0 + cs) - c0;
            let keep_hole = n.zeroed && matches!(n.source, Source::Zero);
            if ws > 0 && !keep_hole {
                owned.push(self.old_bytes(n.source, n.index, 0..ws)?);
                pieces.push((n.host, Part::Old(owned.len() - 1), ws));
            }
            pieces.push((
                n.host + ws,
                Part::Guest {
                    at: c0 + ws - guest,
                },
                we - ws,
            ));
            if we < cs && !keep_hole {
                owned.push(self.old_bytes(n.source, n.index, we..cs)?);
                pieces.push((n.host + we, Part::Old(owned.len() - 1), cs - we));
            }
        }
        let mut i = 0;
        while i < pieces.len() {
            // Pieces contiguous on the host go out in one pwritev.
            let mut j = i + 1;
            let mut host_end = pieces[i].0 + pieces[i].2;
            while j < pieces.len() && pieces[j].0 == host_end {
                host_end += pieces[j].2;
                j += 1;
            }
            let mut slices: Vec<VolatileSlice<'_>> = Vec::new();
            for (_, part, len) in &pieces[i..j] {
                match part {
                    Part::Old(k) => slices.push(iov::slice_of_ro(&owned[*k])),
                    Part::Guest { at } => slices.extend(bufs.sub(*at, *len)),
                }
            }
            self.write_data(&slices, pieces[i].0)?;
            i = j;
        }
        Ok(())
    }

    /// Writes `bufs` at guest offset `guest`.
    pub(crate) fn write(&self, guest: u64, bufs: Bufs<'_, '_>) -> Result<()> {
        self.require_writable()?;
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let len = bufs.len();
        let mut pos = 0;
        while pos < len {
            let step = {
                let mut m = self.lock();
                loop {
                    match self.plan(&mut m, guest + pos, len - pos)? {
                        Step::Wait => {
                            m = self.allocated.wait(m).unwrap_or_else(|e| e.into_inner());
                        }
                        s => break s,
                    }
                }
            };
            match step {
                Step::InPlace { host, len: n } => {
                    self.write_data(&bufs.sub(pos, n), host)?;
                    pos += n;
                }
                Step::Allocate(news) => {
                    let first = news[0].index * self.g.cs;
                    let end = ((news[news.len() - 1].index + 1) * self.g.cs).min(guest + len);
                    let start = guest + pos;
                    let sub = bufs.sub(pos, end - start);
                    let filled = self.fill(&news, start, Bufs::new(&sub));
                    let mut m = self.lock();
                    for n in &news {
                        m.inflight.remove(&n.index);
                    }
                    // The entries change only once the data is written; those that could not
                    // be set leave their clusters unreferenced, back in the pool.
                    let (applied, committed) = match filled {
                        Ok(()) => {
                            let entries: Vec<(u64, u64)> =
                                news.iter().map(|n| (n.index, n.host | COPIED)).collect();
                            self.set_l2_entries(&mut m, &entries)
                        }
                        Err(e) => (0, Err(e)),
                    };
                    for n in &news[..applied] {
                        m.pending_free.extend(&n.release);
                    }
                    let unused: Vec<u64> = news[applied..]
                        .iter()
                        .filter(|n| n.fresh)
                        .map(|n| n.host)
                        .collect();
                    self.unalloc(&mut m, &unused);
                    drop(m);
                    self.allocated.notify_all();
                    committed?;
                    debug_assert!(first <= start);
                    pos = end - guest;
                }
                Step::Wait => unreachable!("waited above"),
            }
        }
        Ok(())
    }

    /// Writes zeroes over `start..end` (nothing when empty).
    fn write_zero_bytes(&self, start: u64, end: u64) -> Result<()> {
        let zeroes = vec![0u8; (1 << 20).min(end.saturating_sub(start)) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64);
            self.write(pos, Bufs::new(&[iov::slice_of_ro(&zeroes[..n as usize])]))?;
            pos += n;
        }
        Ok(())
    }

    /// Applies `mode` to the whole clusters in `guest..guest+len`; partial clusters at either
    /// end are zero-filled for the zeroing modes and left alone for a discard.
    pub(crate) fn zero_range(&self, guest: u64, len: u64, mode: ZeroMode) -> Result<()> {
        self.require_writable()?;
        let cs = self.g.cs;
        let size = self.size();
        let end = guest + len;
        let mut a = guest.next_multiple_of(cs);
        // A range reaching the end of the disk covers the last (partial) cluster entirely.
        let mut b = if end >= size {
            end.next_multiple_of(cs)
        } else {
            end / cs * cs
        };
        if a >= b {
            a = guest;
            b = guest;
        }
        if mode != ZeroMode::Discard {
            if a >= b {
                return self.write_zero_bytes(guest, end);
            }
            self.write_zero_bytes(guest, a)?;
            self.write_zero_bytes(b, end)?;
        }
        if a >= b {
            return Ok(());
        }
        let v2_with_backing = !self.g.v3 && self.backing.is_some();
        if v2_with_backing && mode != ZeroMode::Discard {
            // v2 has no zero flag: zeroes over a backing file must be written out.
            return self.write_zero_bytes(a, b.min(size));
        }
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut m = self.lock();
        let mut index = a / cs;
        while index < b / cs {
            if m.inflight.contains(&index) {
                m = self.allocated.wait(m).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            let map = self.mapping_at(&mut m, index * cs)?;
            let has_backing = self.backing.is_some();
            let zero_flag = self.g.v3 && has_backing;
            let target = match (mode, map) {
                (_, Mapping::Unallocated) if !zero_flag => None,
                (_, Mapping::Zero { host: None }) => None,
                (ZeroMode::ZeroKeep, Mapping::Data { host, copied: true })
                | (ZeroMode::ZeroKeep, Mapping::Zero { host: Some(host) })
                    if self.g.v3 =>
                {
                    Some(host | COPIED | ZERO)
                }
                _ => Some(if zero_flag { ZERO } else { 0 }),
            };
            if let Some(value) = target {
                self.ensure_l2(&mut m, index * cs)?;
                self.set_l2(&mut m, index, value)?;
                if value & entry::OFFSET_MASK == 0 {
                    let held = self.held_by(map);
                    m.pending_free.extend(held);
                }
            }
            index += 1;
        }
        Ok(())
    }
}
