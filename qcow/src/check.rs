//! Consistency check of qcow2 metadata, and refcount rebuilding (the repair, also used to open
//! images left dirty with lazy refcounts).
//!
//! Every cluster the metadata references is counted and compared with its stored refcount:
//! fewer stored than referenced is corruption (the allocator could hand the cluster out
//! again), more stored is a leak (space lost, data safe).

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::entry::{self, Mapping, COPIED};
use crate::error::{Error, Result};
use crate::header::{self, field, Header};
use crate::iov;
use crate::refcount;
use crate::CheckReport;

/// Largest number of clusters we count (bounds memory: 8 bytes per cluster).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;
/// Messages kept in a report; the counters keep counting past this.
const MAX_MESSAGES: usize = 100;

struct Counter {
    path: std::path::PathBuf,
    file: File,
    h: Header,
    cs: u64,
    refs: Vec<u64>,
    report: CheckReport,
    /// (cluster, COPIED flag) of every L2 table and data cluster of the active L1 table.
    copied: Vec<(u64, bool)>,
}

impl Counter {
    fn corrupt(&mut self, msg: String) {
        self.report.corruptions += 1;
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(format!("ERROR {msg}"));
        }
    }

    fn leak(&mut self, msg: String) {
        self.report.leaks += 1;
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(format!("Leaked {msg}"));
        }
    }

    /// Counts a reference to the clusters holding `off..off+len`.
    fn add(&mut self, what: &str, off: u64, len: u64) {
        let first = off / self.cs;
        let last = (off + len.max(1) - 1) / self.cs;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.corrupt(format!("{what} at {off:#x} lies past the end of the file"));
                    return;
                }
            }
        }
    }

    fn read_table(&mut self, off: u64, bytes: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; bytes as usize];
        iov::pread(&self.file, &mut buf, off).map_err(Error::io(&self.path))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    /// Counts an L1 table, its L2 tables and their data clusters.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> Result<()> {
        if l1_size * 8 > header::MAX_TABLE_BYTES || l1_off % self.cs != 0 {
            self.corrupt(format!(
                "L1 table at {l1_off:#x} with {l1_size} entries is invalid"
            ));
            return Ok(());
        }
        if l1_size == 0 {
            return Ok(());
        }
        self.add("L1 table", l1_off, l1_size * 8);
        let l1 = self.read_table(l1_off, l1_size * 8)?;
        let bits = self.h.cluster_bits;
        let words = self.h.l2_entry_bytes() / 8;
        for (i, e) in l1.iter().enumerate() {
            let l2 = match entry::decode_l1(*e, bits) {
                Ok(0) => continue,
                Ok(o) => o,
                Err(r) => {
                    self.corrupt(format!("L1 entry {i}: {r}"));
                    continue;
                }
            };
            if l2 >= self.refs.len() as u64 * self.cs {
                self.corrupt(format!("L2 table at {l2:#x} lies past the end of the file"));
                continue;
            }
            self.add("L2 table", l2, self.cs);
            if active {
                self.copied.push((l2 / self.cs, e & COPIED != 0));
            }
            let table = self.read_table(l2, self.cs)?;
            for (j, w) in table.chunks_exact(words as usize).enumerate() {
                let decoded = if self.h.extended_l2() {
                    // Validate every subcluster; count the cluster once.
                    let mut r = Ok(Mapping::Unallocated);
                    for s in 0..entry::SUBCLUSTERS {
                        if let Err(e) = entry::decode_ext_l2(w[0], w[1], s, bits) {
                            r = Err(e);
                            break;
                        }
                    }
                    r.and_then(|_| {
                        let std = entry::decode_l2(w[0] & !1, bits, true)?;
                        Ok(std)
                    })
                } else {
                    entry::decode_l2(w[0], bits, self.h.version == 3)
                };
                match decoded {
                    Ok(Mapping::Data { host, .. }) | Ok(Mapping::Zero { host: Some(host) }) => {
                        let copied = w[0] & COPIED != 0;
                        self.add("data cluster", host, self.cs);
                        if active {
                            self.copied.push((host / self.cs, copied));
                            self.report.allocated_clusters += 1;
                        }
                    }
                    Ok(Mapping::Compressed { offset, len }) => {
                        self.add("compressed cluster", offset, len);
                        if active {
                            self.report.allocated_clusters += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(r) => self.corrupt(format!("L2 table at {l2:#x} entry {j}: {r}")),
                }
            }
        }
        Ok(())
    }

    /// Counts the snapshot table and every snapshot's tables.
    fn walk_snapshots(&mut self) -> Result<()> {
        let mut off = self.h.snapshots_offset;
        let start = off;
        for n in 0..self.h.nb_snapshots {
            let mut fixed = [0u8; 40];
            iov::pread(&self.file, &mut fixed, off).map_err(Error::io(&self.path))?;
            let l1_off = u64::from_be_bytes(fixed[0..8].try_into().expect("8"));
            let l1_size = u64::from(u32::from_be_bytes(fixed[8..12].try_into().expect("4")));
            let id_len = u64::from(u16::from_be_bytes(fixed[12..14].try_into().expect("2")));
            let name_len = u64::from(u16::from_be_bytes(fixed[14..16].try_into().expect("2")));
            let extra = u64::from(u32::from_be_bytes(fixed[36..40].try_into().expect("4")));
            if extra > 1024 {
                self.corrupt(format!("snapshot {n}: extra data of {extra} bytes"));
                return Ok(());
            }
            self.walk_l1(l1_off, l1_size, false)?;
            off += (40 + extra + id_len + name_len).next_multiple_of(8);
        }
        if off > start {
            self.add("snapshot table", start, off - start);
        }
        Ok(())
    }
}

fn open_header(path: &Path, writable: bool) -> Result<(File, Header, u64)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(Error::io(path))?;
    let len = file.metadata().map_err(Error::io(path))?.len();
    let mut first = vec![0u8; 24.min(len as usize)];
    iov::pread(&file, &mut first, 0).map_err(Error::io(path))?;
    if first.len() < 24 || !header::looks_like_qcow2(&first) {
        return Err(Error::Invalid(format!(
            "{}: not a qcow2 image",
            path.display()
        )));
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
    Ok((file, h, len))
}

/// References of everything except the refcount structures, plus the report so far.
fn count(path: &Path, file: &File, h: &Header, len: u64) -> Result<Counter> {
    let cs = h.cluster_size();
    let clusters = len.div_ceil(cs);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Invalid(format!(
            "{}: {clusters} clusters is too many to check",
            path.display()
        )));
    }
    let mut c = Counter {
        path: path.to_path_buf(),
        file: file.try_clone().map_err(Error::io(path))?,
        h: h.clone(),
        cs,
        refs: vec![0; clusters as usize],
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            image_end_offset: len,
            ..CheckReport::default()
        },
        copied: Vec::new(),
    };
    c.add("header", 0, cs);
    c.walk_l1(h.l1_offset, u64::from(h.l1_size), true)?;
    if h.nb_snapshots > 0 {
        c.walk_snapshots()?;
    }
    Ok(c)
}

/// Stored refcount table and a reader of stored refcounts.
struct Stored {
    table: Vec<u64>,
    blocks: std::collections::HashMap<u64, Vec<u8>>,
}

fn load_stored(c: &mut Counter) -> Result<Stored> {
    let h = c.h.clone();
    let table = c.read_table(h.reftable_offset, u64::from(h.reftable_clusters) * c.cs)?;
    let mut blocks = std::collections::HashMap::new();
    for (i, off) in table.iter().enumerate() {
        if *off == 0 {
            continue;
        }
        if off % c.cs != 0 || *off >= c.refs.len() as u64 * c.cs {
            c.corrupt(format!("refcount block {i} at {off:#x} is invalid"));
            continue;
        }
        let mut b = vec![0u8; c.cs as usize];
        iov::pread(&c.file, &mut b, *off).map_err(Error::io(&c.path))?;
        blocks.insert(*off, b);
    }
    Ok(Stored { table, blocks })
}

impl Stored {
    fn get(&self, h: &Header, c: u64) -> u64 {
        let per = (h.cluster_size() * 8) >> h.refcount_order;
        let off = self.table.get((c / per) as usize).copied().unwrap_or(0);
        match self.blocks.get(&off) {
            Some(b) => refcount::get(b, h.refcount_order, (c % per) as usize),
            None => 0,
        }
    }
}

fn compare(c: &mut Counter, stored: &Stored) {
    let h = c.h.clone();
    let per = (c.cs * 8) >> h.refcount_order;
    let n = c.refs.len() as u64;
    for i in 0..n {
        let s = stored.get(&h, i);
        let r = c.refs[i as usize];
        if s < r {
            c.corrupt(format!("cluster {i} refcount={s} reference={r}"));
        } else if s > r {
            c.leak(format!("cluster {i} refcount={s} reference={r}"));
        }
    }
    // Refcounts of clusters past the end of the file: nothing can reference them.
    for (b, off) in stored.table.iter().enumerate() {
        let first = (b as u64 * per).max(n);
        let last = (b as u64 + 1) * per;
        if *off == 0 || first >= last {
            continue;
        }
        for i in first..last {
            let s = stored.get(&h, i);
            if s > 0 {
                c.leak(format!(
                    "cluster {i} refcount={s} reference=0 (past the end of the file)"
                ));
            }
        }
    }
    let flags = std::mem::take(&mut c.copied);
    for (cl, copied) in flags {
        let s = stored.get(&h, cl);
        if (s == 1) != copied {
            c.corrupt(format!(
                "OFLAG_COPIED cluster {cl}: refcount={s} copied={copied}"
            ));
        }
    }
}

/// Full check (see the crate docs for [`crate::check`]).
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let (file, h, len) = open_header(path, repair)?;
    let mut c = count(path, &file, &h, len)?;
    let base = c.refs.clone();
    let stored = load_stored(&mut c)?;
    c.add(
        "refcount table",
        h.reftable_offset,
        u64::from(h.reftable_clusters) * c.cs,
    );
    for off in stored.table.clone() {
        if off != 0 && off % c.cs == 0 {
            c.add("refcount block", off, c.cs);
        }
    }
    compare(&mut c, &stored);
    let refcount_problems = c
        .report
        .messages
        .iter()
        .any(|m| m.contains(" refcount=") && !m.contains("OFLAG"))
        || c.report.leaks > 0;
    if !repair || !refcount_problems {
        return Ok(c.report);
    }
    write_refcounts(path, &file, &h, base)?;
    let mut after = check(path, false)?;
    after.repaired = true;
    Ok(after)
}

/// Recomputes every refcount from the tables and installs fresh refcount structures (used for
/// images opened while dirty).
pub(crate) fn rebuild_refcounts(path: &Path, file: &File, h: &Header) -> Result<()> {
    let len = file.metadata().map_err(Error::io(path))?.len();
    let c = count(path, file, h, len)?;
    if c.report.corruptions > 0 {
        return Err(Error::corrupt(
            path,
            format!(
                "cannot rebuild refcounts of a dirty image with corrupt tables: {}",
                c.report.messages.join("; ")
            ),
        ));
    }
    write_refcounts(path, file, h, c.refs)
}

/// Writes new refcount blocks and table for `refs` after the end of the file, then switches
/// the header to them. The old structures become free space.
fn write_refcounts(path: &Path, file: &File, h: &Header, mut refs: Vec<u64>) -> Result<()> {
    let cs = h.cluster_size();
    let per = (cs * 8) >> h.refcount_order;
    let start = refs.len() as u64;
    let (mut r, mut t) = (1u64, 1u64);
    loop {
        let total = start + r + t;
        let r2 = total.div_ceil(per);
        let t2 = (r2 * 8).div_ceil(cs);
        if (r2, t2) == (r, t) {
            break;
        }
        (r, t) = (r2, t2);
    }
    if t * cs > header::MAX_TABLE_BYTES {
        return Err(Error::Invalid(format!(
            "{}: refcount table would be too large",
            path.display()
        )));
    }
    refs.resize((start + r + t) as usize, 1);
    let max = refcount::max(h.refcount_order);
    if let Some(i) = refs.iter().position(|v| *v > max) {
        return Err(Error::corrupt(
            path,
            format!(
                "cluster {i} has more references than {}-bit refcounts hold",
                h.refcount_bits()
            ),
        ));
    }
    let mut table = vec![0u8; (t * cs) as usize];
    for b in 0..r {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per {
            if let Some(v) = refs.get((b * per + i) as usize) {
                refcount::set(&mut block, h.refcount_order, i as usize, *v);
            }
        }
        let off = (start + b) * cs;
        iov::pwrite(file, &block, off).map_err(Error::io(path))?;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    let table_off = (start + r) * cs;
    iov::pwrite(file, &table, table_off).map_err(Error::io(path))?;
    file.sync_all().map_err(Error::io(path))?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table_off.to_be_bytes());
    hdr[8..].copy_from_slice(&(t as u32).to_be_bytes());
    iov::pwrite(file, &hdr, field::REFTABLE).map_err(Error::io(path))?;
    file.sync_all().map_err(Error::io(path))
}
