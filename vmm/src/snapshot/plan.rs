//! Which file supplies each page of restored guest memory: a snapshot chain (a full snapshot
//! and the diffs taken after it) resolved page by page, the newest layer holding a page
//! winning, into runs of consecutive pages read from one place. Both ways of restoring use it:
//! reading everything before the guest runs, and loading on demand while it runs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::memory::{data_extents, file_err, Layer, MemoryError};
use crate::vstate::pagemap::PAGE;

/// Consecutive bytes of one region that come from one place of one memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset in the region (page-aligned).
    pub offset: u64,
    /// Bytes (whole pages, except at the end of a region whose size is not whole pages).
    pub len: u64,
    /// Index of the file in [`Plan::files`].
    pub file: usize,
    /// Where the bytes start in that file.
    pub file_offset: u64,
}

/// The pages of one region that hold data (the others are zero), in address order.
#[derive(Debug)]
pub struct RegionPlan {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// The stored pages.
    pub segments: Vec<Segment>,
}

impl RegionPlan {
    /// The segments holding any of the region's bytes `from..to`, in address order.
    pub fn segments_in(&self, from: u64, to: u64) -> impl Iterator<Item = &Segment> {
        let first = self.segments.partition_point(|s| s.offset + s.len <= from);
        self.segments[first..]
            .iter()
            .take_while(move |s| s.offset < to)
    }
}

/// A resolved snapshot chain.
#[derive(Debug)]
pub struct Plan {
    /// The memory files, oldest layer first, opened.
    pub files: Vec<(PathBuf, File)>,
    /// One per RAM region, in the snapshot's order.
    pub regions: Vec<RegionPlan>,
}

impl Plan {
    /// Reads what the chain stores of region `region`'s bytes `from..from + out.len()` into
    /// their places in `out`. Bytes no layer stores restore as zero; they are not written, so
    /// `out` should hold zeroes there.
    pub fn read_stored(&self, region: usize, from: u64, out: &mut [u8]) -> Result<(), MemoryError> {
        let to = from + out.len() as u64;
        for s in self.regions[region].segments_in(from, to) {
            let start = s.offset.max(from);
            let end = (s.offset + s.len).min(to);
            let (path, file) = &self.files[s.file];
            file.read_exact_at(
                &mut out[(start - from) as usize..(end - from) as usize],
                s.file_offset + (start - s.offset),
            )
            .map_err(file_err(path))?;
        }
        Ok(())
    }

    /// Bytes the plan reads.
    pub fn bytes(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.segments)
            .map(|s| s.len)
            .sum()
    }
}

/// No layer holds the page: it is zero.
const NONE: u8 = u8::MAX;

/// Resolves `layers` (a full snapshot first, its diffs after it in order), checking that they
/// share one memory layout and that every page they list lies inside its region and its file.
pub fn resolve(layers: &[Layer]) -> Result<Plan, MemoryError> {
    let top = layers
        .last()
        .ok_or_else(|| MemoryError::Regions("no snapshot".into()))?;
    if layers.len() >= usize::from(NONE) {
        return Err(MemoryError::Regions(format!(
            "a chain of {} snapshots is too long",
            layers.len()
        )));
    }
    // The newest layer holding each page, per region.
    let mut owner: Vec<Vec<u8>> = Vec::with_capacity(top.regions.len());
    for r in &top.regions {
        let pages = usize::try_from(r.size.div_ceil(PAGE as u64))
            .map_err(|_| MemoryError::Regions("region too large".into()))?;
        owner.push(vec![NONE; pages]);
    }
    let mut files = Vec::with_capacity(layers.len());
    for (index, layer) in layers.iter().enumerate() {
        let file = File::open(&layer.path).map_err(file_err(&layer.path))?;
        let file_len = file.metadata().map_err(file_err(&layer.path))?.len();
        let layout = |addr, reason| MemoryError::Layout {
            path: layer.path.clone(),
            addr,
            reason,
        };
        if layer.regions.len() != top.regions.len() {
            return Err(layout(
                0,
                "has another memory layout than the snapshots after it",
            ));
        }
        for ((r, t), pages) in layer.regions.iter().zip(&top.regions).zip(&mut owner) {
            if r.guest_addr != t.guest_addr || r.size != t.size {
                return Err(layout(
                    r.guest_addr,
                    "has another memory layout than the snapshots after it",
                ));
            }
            if r.file_offset
                .checked_add(r.size)
                .is_none_or(|end| end > file_len)
            {
                return Err(layout(r.guest_addr, "lies past the end of the memory file"));
            }
            let pages_in_region = pages.len() as u64;
            let mut own = |first: u64, count: u64| {
                for page in &mut pages[first as usize..(first + count) as usize] {
                    *page = index as u8;
                }
            };
            match &r.pages {
                // Format 2: the file's data extents, widened to whole pages (a full snapshot's
                // holes are zero, so reading a little of one is harmless).
                None => {
                    for (from, to) in data_extents(&file, r.file_offset, r.file_offset + r.size)
                        .map_err(file_err(&layer.path))?
                    {
                        let first = (from - r.file_offset) / PAGE as u64;
                        let end = (to - r.file_offset).div_ceil(PAGE as u64);
                        own(first, end - first);
                    }
                }
                Some(runs) => {
                    for &[first, count] in runs {
                        first
                            .checked_add(count)
                            .filter(|end| *end <= pages_in_region)
                            .ok_or_else(|| {
                                layout(r.guest_addr, "lists pages outside the region")
                            })?;
                        own(first, count);
                    }
                }
            }
        }
        files.push((layer.path.clone(), file));
    }
    let regions = top
        .regions
        .iter()
        .zip(owner)
        .enumerate()
        .map(|(i, (t, pages))| RegionPlan {
            guest_addr: t.guest_addr,
            size: t.size,
            segments: segments(&pages, t.size, |layer| layers[layer].regions[i].file_offset),
        })
        .collect();
    Ok(Plan { files, regions })
}

/// Runs of consecutive pages owned by one layer, as segments of a region of `size` bytes;
/// `file_offset` gives where a layer's file holds the region.
fn segments(owner: &[u8], size: u64, file_offset: impl Fn(usize) -> u64) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < owner.len() {
        let layer = owner[start];
        let mut end = start + 1;
        while end < owner.len() && owner[end] == layer {
            end += 1;
        }
        if layer != NONE {
            let offset = (start * PAGE) as u64;
            out.push(Segment {
                offset,
                len: ((end * PAGE) as u64).min(size) - offset,
                file: usize::from(layer),
                file_offset: file_offset(usize::from(layer)) + offset,
            });
        }
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory::Region;

    fn region(size: u64, file_offset: u64, pages: &[[u64; 2]]) -> Region {
        Region {
            guest_addr: 0,
            size,
            file_offset,
            pages: Some(pages.to_vec()),
        }
    }

    fn layer(dir: &std::path::Path, name: &str, len: u64, regions: Vec<Region>) -> Layer {
        let path = dir.join(name);
        File::create(&path).unwrap().set_len(len).unwrap();
        Layer { path, regions }
    }

    #[test]
    fn the_newest_layer_holding_a_page_supplies_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = PAGE as u64;
        let base = layer(
            dir.path(),
            "base",
            16 * p,
            vec![region(16 * p, 0, &[[0, 8]])],
        );
        let diff = layer(
            dir.path(),
            "diff",
            16 * p,
            vec![region(16 * p, 0, &[[2, 2], [10, 1]])],
        );
        let plan = resolve(&[base, diff]).unwrap();
        let segs = &plan.regions[0].segments;
        let at = |offset: u64, len: u64, file: usize| Segment {
            offset: offset * p,
            len: len * p,
            file,
            file_offset: offset * p,
        };
        assert_eq!(
            segs,
            &vec![at(0, 2, 0), at(2, 2, 1), at(4, 4, 0), at(10, 1, 1)]
        );
        assert_eq!(plan.bytes(), 9 * p);
        let at_byte = |b: u64| plan.regions[0].segments_in(b, b + 1).next();
        assert_eq!(at_byte(3 * p + 5).unwrap().file, 1);
        assert_eq!(at_byte(9 * p), None);
        assert_eq!(at_byte(10 * p).unwrap().len, p);
        let spanned: Vec<usize> = plan.regions[0]
            .segments_in(3 * p, 10 * p + 1)
            .map(|s| s.file)
            .collect();
        assert_eq!(spanned, vec![1, 0, 1]);
    }

    #[test]
    fn pages_outside_the_region_or_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = PAGE as u64;
        let outside = layer(dir.path(), "a", 4 * p, vec![region(4 * p, 0, &[[3, 2]])]);
        assert!(matches!(
            resolve(&[outside]),
            Err(MemoryError::Layout { reason, .. }) if reason.contains("outside")
        ));
        let short = layer(dir.path(), "b", 2 * p, vec![region(4 * p, 0, &[[0, 1]])]);
        assert!(matches!(
            resolve(&[short]),
            Err(MemoryError::Layout { reason, .. }) if reason.contains("past the end")
        ));
        let overflow = layer(
            dir.path(),
            "c",
            4 * p,
            vec![region(4 * p, 0, &[[u64::MAX, 2]])],
        );
        assert!(resolve(&[overflow]).is_err());
    }

    #[test]
    fn a_region_of_partial_pages_ends_its_last_segment_at_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = PAGE as u64;
        let l = layer(
            dir.path(),
            "a",
            3 * p,
            vec![region(2 * p + 100, 0, &[[0, 3]])],
        );
        let plan = resolve(&[l]).unwrap();
        assert_eq!(plan.regions[0].segments[0].len, 2 * p + 100);
    }
}
