//! Guest memory in a snapshot: one file holding every RAM region back to back.
//!
//! A full snapshot writes the pages the host holds for the guest (the page map says which: a
//! page never touched is not read at all) that are not all zero; the rest are holes. A diff
//! snapshot writes every page written since the VM's last snapshot or restore that no longer
//! holds what its base restores there, zero or not; it restores on top of its base. Both list
//! the pages they stored in `state.json`, so that restore reads only those whatever the file
//! system (one without SEEK_DATA, such as 9p, would otherwise hand back every hole as data).
//!
//! Restore reads the file into fresh guest RAM (huge-page aligned and advised, as at boot)
//! rather than mapping it: only the data the file holds is read (holes are skipped), and the
//! restored guest runs on huge pages. A copy-on-write mapping of the file restored in no time
//! but left the guest to fault every 4 KiB page in on its own through KVM, which cost the
//! first seconds after a restore in the test host. Where it can, restore reads in the
//! background while the guest already runs (`lazy`); [`read_all`] is the way when it cannot.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::plan::Plan;
use crate::vstate::pagemap::{self, PAGE};
use crate::vstate::ram;

/// Bytes copied per step when saving.
const CHUNK: usize = 1 << 20;

/// Why guest memory could not be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory file could not be created, written or read.
    #[error("{}: {source}", path.display())]
    File {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The saved layout does not fit the file or the address space.
    #[error("{}: region at {addr:#x}: {reason}", path.display())]
    Layout {
        /// The memory file.
        path: PathBuf,
        /// The region's guest address.
        addr: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Guest RAM could not be allocated, or the regions do not make a guest memory.
    #[error("guest memory: {0}")]
    Regions(String),
    /// This host cannot tell which pages were written (diff snapshots need it).
    #[error(
        "diff snapshots need the kernel's soft-dirty page tracking, which this host lacks ({0})"
    )]
    NoTracking(String),
}

impl MemoryError {
    /// True when the snapshot given is at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            MemoryError::Layout { .. } | MemoryError::NoTracking(_)
        )
    }
}

pub(super) fn file_err(path: &Path) -> impl FnOnce(io::Error) -> MemoryError + '_ {
    move |source| MemoryError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Where one RAM region lives in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
    /// The pages stored: runs `[first page, pages]` of the region, each at its own place in
    /// the file (`file_offset + first page * 4096`). A full snapshot's runs may span a few
    /// zero pages (holes); a diff's are exactly the pages written since its base. Restore
    /// reads only these, on any file system. Format 2 snapshots have none: restore reads the
    /// file's data extents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<[u64; 2]>>,
}

/// What a snapshot writes of guest memory.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    /// Every non-zero page.
    Full,
    /// Every page written since the last [`pagemap::PageMap::clear_soft_dirty`] that no longer
    /// holds what `base` (the chain the diff goes on) restores there.
    ///
    /// Written pages are found by the host's soft-dirty bits, whose granularity is the page
    /// the host maps: guest RAM is on 2 MiB huge pages, so a tick of the guest's timer marks
    /// megabytes, and a lazily restored VM's memory is all marked once loaded. Comparing each
    /// 4 KiB page with the base keeps a diff to what changed (Firecracker's KVM dirty log
    /// counts 4 KiB pages, but keeps the guest on 4 KiB nested pages while it is on).
    Diff(&'a Plan),
}

/// Writes the guest memory of `mem` to `path`; returns the layout. Nothing may write `mem`
/// meanwhile (the VM is paused) and all of it must be in (no userfaultfd waits on a read).
pub fn save(mem: &GuestMemoryMmap, path: &Path, kind: Kind) -> Result<Vec<Region>, MemoryError> {
    let map = pagemap::get();
    let diff = match kind {
        Kind::Full => None,
        Kind::Diff(base) => {
            match map {
                Ok(m) if m.tracks_writes() => {}
                Ok(_) => return Err(MemoryError::NoTracking("no soft-dirty bits".into())),
                Err(e) => return Err(MemoryError::NoTracking(e.into())),
            }
            check_layout(mem, base)?;
            Some(base)
        }
    };
    // Guest memory holds the guest's secrets: readable by the owner only.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    let started = std::time::Instant::now();
    // Without a page map (no /proc), every page is looked at.
    let candidates = |r: &GuestRegionMmap| match map {
        Ok(m) => m
            .pages(r.as_ptr() as usize, r.len() as usize, diff.is_some())
            .map_err(file_err(Path::new("/proc/self/pagemap"))),
        Err(_) => Ok(every_page(r)),
    };
    let (regions, Totals { examined, written }) =
        write_regions(mem, (&file, path), diff, candidates)?;
    let end = regions.last().map_or(0, |r| r.file_offset + r.size);
    file.set_len(end)
        .and_then(|()| file.sync_all())
        .map_err(file_err(path))?;
    tracing::info!(
        kind = if diff.is_some() { "diff" } else { "full" },
        examined_mib = examined >> 20,
        written_kib = written >> 10,
        ms = started.elapsed().as_millis() as u64,
        "guest memory saved"
    );
    Ok(regions)
}

/// Bytes looked at and written by [`write_regions`].
#[derive(Default)]
struct Totals {
    examined: u64,
    written: u64,
}

/// Every page of `r`, as one run.
fn every_page(r: &GuestRegionMmap) -> Vec<(usize, usize)> {
    vec![(0, (r.len() as usize).div_ceil(PAGE))]
}

/// Writes the regions of `mem` one after the other into `file` (at `path`): of the pages
/// `candidates` gives for a region (runs `(first page, count)`), those not all zero, or with a
/// `diff` base those whose bytes differ from what it restores there. Returns the layout.
///
/// Guest memory is looked at where it is, not copied out first: nothing writes it while a
/// snapshot is taken (the VM is paused). In the test host, comparing a diff's 20 MiB through
/// a copy took 190 ms, and in place 17 ms.
fn write_regions(
    mem: &GuestMemoryMmap,
    (file, path): (&File, &Path),
    diff: Option<&Plan>,
    candidates: impl Fn(&GuestRegionMmap) -> Result<Vec<(usize, usize)>, MemoryError>,
) -> Result<(Vec<Region>, Totals), MemoryError> {
    let mut totals = Totals::default();
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut old = vec![0u8; if diff.is_some() { CHUNK } else { 0 }];
    // A diff's runs are exactly its pages: a hole listed in one would restore as zeroes over
    // its base.
    let gap = if diff.is_some() { 0 } else { MERGE_GAP };
    for (index, r) in mem.iter().enumerate() {
        let start = r.start_addr().raw_value();
        let size = r.len();
        let len =
            usize::try_from(size).map_err(|_| MemoryError::Regions("region too large".into()))?;
        // SAFETY: the region is mapped readable for `len` bytes as long as `mem` lives, and
        // its contents stand still while a snapshot is taken: the vCPUs are parked and the
        // devices quiesced (`RunningVm::pause`), and a restored VM's memory is all in
        // (`RunningVm::memory_loaded`), so no read waits on a userfaultfd.
        let ram = unsafe { std::slice::from_raw_parts(r.as_ptr(), len) };
        let mut stored = Runs::default();
        for (first, count) in candidates(r)? {
            let bytes = (count * PAGE).min(len - first * PAGE);
            let mut done = 0usize;
            while done < bytes {
                let n = (bytes - done).min(CHUNK);
                let at = first * PAGE + done;
                let now = &ram[at..at + n];
                let runs = match diff {
                    Some(base) => {
                        let old = &mut old[..n];
                        old.fill(0);
                        base.read_stored(index, at as u64, old)?;
                        write_pages(file, now, offset + at as u64, |p, page| {
                            page != &old[p * PAGE..p * PAGE + page.len()]
                        })
                    }
                    None => write_pages(file, now, offset + at as u64, |_, page| {
                        page.iter().any(|b| *b != 0)
                    }),
                }
                .map_err(file_err(path))?;
                for (p, c) in runs {
                    stored.add(first + done / PAGE + p, c, gap);
                    totals.written += (c * PAGE) as u64;
                }
                totals.examined += n as u64;
                done += n;
            }
        }
        regions.push(Region {
            guest_addr: start,
            size,
            file_offset: offset,
            pages: Some(stored.0),
        });
        offset += size;
    }
    Ok((regions, totals))
}

/// Pages of a region as runs `[first, count]`, in order.
#[derive(Default)]
struct Runs(Vec<[u64; 2]>);

impl Runs {
    /// Adds `count` pages from `first`, joining the last run when at most `gap` pages lie
    /// between them.
    fn add(&mut self, first: usize, count: usize, gap: usize) {
        let (first, count, gap) = (first as u64, count as u64, gap as u64);
        match self.0.last_mut() {
            Some([f, c]) if *f + *c + gap >= first => *c = first + count - *f,
            _ => self.0.push([first, count]),
        }
    }
}

/// Zero pages a full snapshot's list of stored pages may span between two runs (holes read
/// back as the zeroes they are): keeps the list short.
const MERGE_GAP: usize = 16;

/// Writes the pages of `buf` that `keep` (given each page's index and bytes) wants,
/// consecutive ones in one write; returns them as runs `(first page in buf, pages)`.
fn write_pages(
    file: &File,
    buf: &[u8],
    at: u64,
    keep: impl Fn(usize, &[u8]) -> bool,
) -> io::Result<Vec<(usize, usize)>> {
    let mut written = Vec::new();
    let mut run: Option<usize> = None;
    let pages = buf.len().div_ceil(PAGE);
    for i in 0..=pages {
        let kept = i < pages && keep(i, &buf[i * PAGE..((i + 1) * PAGE).min(buf.len())]);
        match (kept, run) {
            (true, None) => run = Some(i),
            (false, Some(s)) => {
                let end = (i * PAGE).min(buf.len());
                file.write_all_at(&buf[s * PAGE..end], at + (s * PAGE) as u64)?;
                written.push((s, i - s));
                run = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Refuses a base whose memory layout is not the VM's: the diff could not go on it.
fn check_layout(mem: &GuestMemoryMmap, base: &Plan) -> Result<(), MemoryError> {
    let path = base
        .files
        .last()
        .map(|(p, _)| p.clone())
        .unwrap_or_default();
    let same = mem.num_regions() == base.regions.len()
        && mem
            .iter()
            .zip(&base.regions)
            .all(|(r, b)| r.start_addr().raw_value() == b.guest_addr && r.len() == b.size);
    if same {
        return Ok(());
    }
    Err(MemoryError::Layout {
        path,
        addr: 0,
        reason: "the VM's memory layout is not this base snapshot's",
    })
}

/// One snapshot's memory: its file and layout.
#[derive(Debug)]
pub struct Layer {
    /// The memory file.
    pub path: PathBuf,
    /// Its regions.
    pub regions: Vec<Region>,
}

/// Fresh guest RAM for the regions of `plan` (huge-page aligned and advised, as at boot), zero,
/// and the means to give it back should the restore fail.
pub fn allocate(plan: &Plan) -> Result<(GuestMemoryMmap, ram::Reclaim), MemoryError> {
    ram::guest_memory(plan.regions.iter().map(|r| (r.guest_addr, r.size)))
        .map_err(|e| MemoryError::Regions(format!("allocating guest memory: {e}")))
}

/// Reads every page `plan` lists into `mem` (made by [`allocate`] for it, not yet used by
/// anything else).
pub fn read_all(plan: &Plan, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    let started = std::time::Instant::now();
    for (index, dest) in mem.iter().enumerate() {
        // SAFETY: the region was mapped read-write for its length by `allocate` (so it is
        // zero) and nothing else (no vCPU, no device) uses it yet.
        let ram = unsafe { std::slice::from_raw_parts_mut(dest.as_ptr(), dest.len() as usize) };
        plan.read_stored(index, 0, ram)?;
    }
    tracing::info!(
        layers = plan.files.len(),
        read_kib = plan.bytes() >> 10,
        ms = started.elapsed().as_millis() as u64,
        "guest memory read"
    );
    Ok(())
}

/// Reads guest memory back from `layers`, a full snapshot first and the diffs taken after it
/// in order, into fresh guest RAM (what [`super::lazy::restore`] does when it cannot load in
/// the background).
#[cfg(test)]
pub fn restore(layers: &[Layer]) -> Result<GuestMemoryMmap, MemoryError> {
    let plan = super::plan::resolve(layers)?;
    let (mem, _) = allocate(&plan)?;
    read_all(&plan, &mem)?;
    Ok(mem)
}

/// The data ranges of `file` between `from` and `to` (holes left out). A file system that
/// cannot tell reports everything as data, which reads holes as the zeroes they are.
pub(super) fn data_extents(file: &File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence| -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own moves only its offset, which nothing else uses
        // (reads go through pread).
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(data) = seek(pos, libc::SEEK_DATA)?.filter(|d| *d < to) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use vm_memory::{Bytes, GuestAddress};

    /// Two regions with a gap, as guest RAM is laid out below and above the PCI hole.
    fn memory() -> GuestMemoryMmap {
        let regions = [(0u64, 64 * PAGE), (1 << 30, 32 * PAGE)]
            .into_iter()
            .map(|(at, len)| {
                GuestRegionMmap::new(ram::aligned_anonymous(len).unwrap(), GuestAddress(at))
                    .unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    }

    fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let mut b = vec![0u8; r.len() as usize];
            mem.read_slice(&mut b, r.start_addr()).unwrap();
            out.extend(b);
        }
        out
    }

    fn layer(dir: &Path, name: &str, regions: &[Region]) -> Layer {
        Layer {
            path: dir.join(name),
            regions: regions.to_vec(),
        }
    }

    #[test]
    fn the_memory_file_is_the_owners_alone_and_holds_the_guests_bytes() {
        let mem = memory();
        mem.write_slice(b"secret", GuestAddress(PAGE as u64 + 10))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let regions = save(&mem, &path, Kind::Full).unwrap();
        assert_eq!(regions.len(), 2);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[PAGE + 10..PAGE + 16], b"secret");
        // An existing file is never overwritten.
        assert!(save(&mem, &path, Kind::Full).is_err());
    }

    #[test]
    fn a_full_snapshot_stores_only_nonzero_pages_and_reads_back_whole() {
        let mem = memory();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(5 * PAGE as u64 + 1))
            .unwrap();
        mem.write_slice(b"top", GuestAddress((1 << 30) + 32 * PAGE as u64 - 3))
            .unwrap();
        // A page the guest touched but left zero is not stored.
        mem.write_slice(&[0u8; 8], GuestAddress(40 * PAGE as u64))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let regions = save(&mem, &dir.path().join("memory"), Kind::Full).unwrap();
        // Pages 5-8 (the sevens), not the zero page 40; the last page of the second region.
        assert_eq!(regions[0].pages, Some(vec![[5, 4]]));
        assert_eq!(regions[1].pages, Some(vec![[31, 1]]));
        let meta = std::fs::metadata(dir.path().join("memory")).unwrap();
        assert_eq!(meta.len(), 96 * PAGE as u64);
        // 4 pages of sevens and one with "top" (file systems may allocate a little more).
        assert!(
            meta.blocks() * 512 <= 16 * PAGE as u64,
            "{} blocks",
            meta.blocks()
        );
        let back = restore(&[layer(dir.path(), "memory", &regions)]).unwrap();
        assert_eq!(contents(&back), contents(&mem));
        for r in back.iter() {
            assert_eq!(r.as_ptr() as usize % ram::HUGE_PAGE, 0);
        }
        // A format 2 snapshot lists nothing: its file's data extents are read instead.
        let unlisted: Vec<Region> = regions
            .iter()
            .map(|r| Region {
                pages: None,
                ..r.clone()
            })
            .collect();
        let back = restore(&[layer(dir.path(), "memory", &unlisted)]).unwrap();
        assert_eq!(contents(&back), contents(&mem));
    }

    #[test]
    fn runs_join_across_small_gaps_only_when_asked() {
        let mut r = Runs::default();
        r.add(0, 2, MERGE_GAP);
        r.add(2, 1, MERGE_GAP);
        r.add(3 + MERGE_GAP, 1, MERGE_GAP);
        r.add(5 + 2 * MERGE_GAP, 1, MERGE_GAP);
        assert_eq!(
            r.0,
            vec![[0, 4 + MERGE_GAP as u64], [5 + 2 * MERGE_GAP as u64, 1]]
        );
        let mut exact = Runs::default();
        exact.add(0, 1, 0);
        exact.add(2, 1, 0);
        exact.add(3, 2, 0);
        assert_eq!(exact.0, vec![[0, 1], [2, 3]]);
    }

    #[test]
    fn a_diff_is_read_on_top_of_its_base_zeroes_included() {
        let mem = memory();
        mem.write_slice(&[1u8; 10 * PAGE], GuestAddress(0)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = save(&mem, &dir.path().join("base"), Kind::Full).unwrap();
        // A diff as a diff snapshot lays it out: pages 2-3 (page 3 now zero) of the first
        // region and page 5 of the second, each at its own place in a sparse file.
        let file = File::create(dir.path().join("diff")).unwrap();
        file.set_len(96 * PAGE as u64).unwrap();
        let mut two = vec![9u8; PAGE];
        two.extend([0u8; PAGE]);
        file.write_all_at(&two, 2 * PAGE as u64).unwrap();
        file.write_all_at(&[8u8; PAGE], (64 + 5) * PAGE as u64)
            .unwrap();
        let mut diff = base.clone();
        diff[0].pages = Some(vec![[2, 2]]);
        diff[1].pages = Some(vec![[5, 1]]);
        let back = restore(&[
            layer(dir.path(), "base", &base),
            layer(dir.path(), "diff", &diff),
        ])
        .unwrap();
        let mut want = contents(&mem);
        want[2 * PAGE..3 * PAGE].fill(9);
        want[3 * PAGE..4 * PAGE].fill(0);
        want[(64 + 5) * PAGE..(64 + 6) * PAGE].fill(8);
        assert_eq!(contents(&back), want);
    }

    /// Guest memory with ten pages of ones and a page of twos, and its full snapshot, `base`
    /// in a fresh directory.
    fn with_base() -> (GuestMemoryMmap, tempfile::TempDir, Vec<Region>) {
        let mem = memory();
        mem.write_slice(&[1u8; 10 * PAGE], GuestAddress(0)).unwrap();
        mem.write_slice(&[2u8; PAGE], GuestAddress(1 << 30))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = save(&mem, &dir.path().join("base"), Kind::Full).unwrap();
        (mem, dir, base)
    }

    #[test]
    fn a_diff_holds_the_pages_written_since_the_mark_and_restores_on_its_base() {
        let _serial = pagemap::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let map = pagemap::get().unwrap();
        let (mem, dir, base) = with_base();
        let plan = super::super::plan::resolve(&[layer(dir.path(), "base", &base)]).unwrap();
        if !map.tracks_writes() {
            // Without soft-dirty bits (this build machine's kernel) a diff is refused, never
            // written as if nothing had changed.
            let e = save(&mem, &dir.path().join("diff"), Kind::Diff(&plan)).unwrap_err();
            assert!(matches!(e, MemoryError::NoTracking(_)), "{e}");
            assert!(!dir.path().join("diff").exists());
            return;
        }
        map.clear_soft_dirty().unwrap();
        // A page changed, a page zeroed (a diff must carry zeroes too), a new page.
        mem.write_slice(b"changed", GuestAddress(3 * PAGE as u64))
            .unwrap();
        mem.write_slice(&[0u8; PAGE], GuestAddress(7 * PAGE as u64))
            .unwrap();
        mem.write_slice(b"new", GuestAddress((1 << 30) + 20 * PAGE as u64))
            .unwrap();
        let diff = save(&mem, &dir.path().join("diff"), Kind::Diff(&plan)).unwrap();
        // Exactly the written pages, though huge pages make the soft-dirty bits coarser.
        let listed: Vec<Vec<[u64; 2]>> = diff.iter().map(|r| r.pages.clone().unwrap()).collect();
        assert_eq!(listed, vec![vec![[3, 1], [7, 1]], vec![[20, 1]]]);
        let back = restore(&[
            layer(dir.path(), "base", &base),
            layer(dir.path(), "diff", &diff),
        ])
        .unwrap();
        assert_eq!(contents(&back), contents(&mem));
        // The base alone is the memory as it was.
        let old = restore(&[layer(dir.path(), "base", &base)]).unwrap();
        let mut b = [0u8; 7];
        old.read_slice(&mut b, GuestAddress(3 * PAGE as u64))
            .unwrap();
        assert_eq!(b, [1u8; 7]);
    }

    #[test]
    fn a_diff_stores_only_the_pages_that_differ_from_its_chain() {
        let (mem, dir, base) = with_base();
        // Written since the base: a page changed, a page given its own bytes again, a page
        // zeroed, a zero page given bytes, a zero page given zeroes.
        mem.write_slice(b"changed", GuestAddress(3 * PAGE as u64 + 100))
            .unwrap();
        mem.write_slice(&[1u8; PAGE], GuestAddress(5 * PAGE as u64))
            .unwrap();
        mem.write_slice(&[0u8; PAGE], GuestAddress(7 * PAGE as u64))
            .unwrap();
        mem.write_slice(b"new", GuestAddress((1 << 30) + 20 * PAGE as u64))
            .unwrap();
        mem.write_slice(&[0u8; PAGE], GuestAddress(30 * PAGE as u64))
            .unwrap();
        // Every page offered, as the soft-dirty bits of huge pages or a lazy restore do.
        let diff = |name: &str, chain: &[Layer]| {
            let plan = super::super::plan::resolve(chain).unwrap();
            let path = dir.path().join(name);
            let file = File::create(&path).unwrap();
            let (regions, totals) =
                write_regions(&mem, (&file, &path), Some(&plan), |r| Ok(every_page(r))).unwrap();
            file.set_len(96 * PAGE as u64).unwrap();
            (regions, totals.written)
        };
        let mut chain = vec![layer(dir.path(), "base", &base)];
        let (first, written) = diff("diff1", &chain);
        assert_eq!(first[0].pages, Some(vec![[3, 1], [7, 1]]));
        assert_eq!(first[1].pages, Some(vec![[20, 1]]));
        assert_eq!(written, 3 * PAGE as u64);
        chain.push(layer(dir.path(), "diff1", &first));
        assert_eq!(contents(&restore(&chain).unwrap()), contents(&mem));

        // A diff on that diff compares with the whole chain: page 3 back to the base's bytes
        // differs from the chain (which has "changed" there); page 7 is still the chain's zero.
        mem.write_slice(&[1u8; PAGE], GuestAddress(3 * PAGE as u64))
            .unwrap();
        let (second, written) = diff("diff2", &chain);
        assert_eq!(second[0].pages, Some(vec![[3, 1]]));
        assert_eq!(second[1].pages, Some(vec![]));
        assert_eq!(written, PAGE as u64);
        chain.push(layer(dir.path(), "diff2", &second));
        assert_eq!(contents(&restore(&chain).unwrap()), contents(&mem));

        // A base of another layout is refused before anything is written.
        let plan = super::super::plan::resolve(&chain).unwrap();
        let other = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(
            ram::aligned_anonymous(64 * PAGE).unwrap(),
            GuestAddress(0),
        )
        .unwrap()])
        .unwrap();
        let e = check_layout(&other, &plan).unwrap_err();
        assert!(e.to_string().contains("memory layout"), "{e}");
        assert!(check_layout(&mem, &plan).is_ok());
    }

    #[test]
    fn layouts_that_do_not_fit_are_refused() {
        let mem = memory();
        let dir = tempfile::tempdir().unwrap();
        let regions = save(&mem, &dir.path().join("memory"), Kind::Full).unwrap();
        let refused = |regions: &[Region], layers: usize| {
            let base = layer(dir.path(), "memory", regions);
            let top = layer(dir.path(), "memory", regions);
            let list = if layers == 1 {
                vec![top]
            } else {
                vec![base, top]
            };
            match restore(&list) {
                Err(e @ MemoryError::Layout { .. }) => e.to_string(),
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("accepted"),
            }
        };
        let mut past_end = regions.clone();
        past_end[1].size += PAGE as u64;
        assert!(refused(&past_end, 1).contains("past the end"));
        let mut outside = regions.clone();
        outside[0].pages = Some(vec![[60, 5]]);
        assert!(refused(&outside, 1).contains("outside the region"));
        let mut overflow = regions.clone();
        overflow[0].pages = Some(vec![[u64::MAX, 2]]);
        assert!(refused(&overflow, 1).contains("outside the region"));
        // A region of a size that is not whole pages, with an empty run at its very end: read
        // as nothing, no panic.
        let mut ragged = regions.clone();
        ragged[1].size -= 100;
        ragged[1].pages = Some(vec![[32, 0], [31, 1]]);
        assert!(restore(&[layer(dir.path(), "memory", &ragged)]).is_ok());
        // A base whose layout differs from its diff's.
        let moved = vec![
            Region {
                guest_addr: 4096,
                ..regions[0].clone()
            },
            regions[1].clone(),
        ];
        let list = [
            layer(dir.path(), "memory", &moved),
            layer(dir.path(), "memory", &regions),
        ];
        assert!(matches!(restore(&list), Err(MemoryError::Layout { .. })));
        let missing = [layer(dir.path(), "nothing", &regions)];
        assert!(matches!(restore(&missing), Err(MemoryError::File { .. })));
    }
}
