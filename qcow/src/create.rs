//! Creating images: raw files, and qcow2 files laid out as header, refcount table, refcount
//! blocks and L1 table in the first clusters — a metadata-only operation whatever the size, so
//! an overlay of a large base image is ready in milliseconds.

use std::fs::OpenOptions;
use std::path::Path;

use crate::chain;
use crate::error::{Error, Result};
use crate::header::{self, Compression, Header};
use crate::iov;
use crate::refcount;
use crate::{Compat, CreateOptions, Format};

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

/// Validated layout parameters.
fn check_options(opts: &CreateOptions) -> Result<(u32, u32)> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(invalid(format!(
            "cluster size {cs} must be a power of two between 512 and 2097152"
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || !(1..=64).contains(&rb) {
        return Err(invalid(format!(
            "refcount bits {rb} must be a power of two between 1 and 64"
        )));
    }
    if opts.compat == Compat::V2 && rb != 16 {
        return Err(invalid(
            "compat 0.10 (v2) images only have 16-bit refcounts".into(),
        ));
    }
    Ok((cs.trailing_zeros(), rb.trailing_zeros()))
}

/// Creates the image described by `opts` at `path`.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    if opts.format == Format::Raw {
        if opts.backing_file.is_some() {
            return Err(invalid("raw images cannot have a backing file".into()));
        }
        let size = opts
            .size
            .ok_or_else(|| invalid("a size is needed for a raw image".into()))?;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Error::io(path))?;
        return f.set_len(size).map_err(Error::io(path));
    }
    let (cluster_bits, refcount_order) = check_options(opts)?;
    // The backing chain must open; its size is the default size.
    let mut backing_format = opts.backing_format;
    let mut size = opts.size;
    if let Some(name) = &opts.backing_file {
        let bpath = chain::resolve_backing(path, name);
        if !bpath.exists() {
            return Err(Error::Backing {
                path: path.to_path_buf(),
                reason: format!("backing file {} does not exist", bpath.display()),
            });
        }
        let layer = chain::open(&bpath, backing_format, false, false)?;
        backing_format = Some(layer.format());
        size = size.or(Some(layer.size()));
    }
    let size =
        size.ok_or_else(|| invalid("a size is needed (no backing file to take it from)".into()))?;
    if size % 512 != 0 {
        return Err(invalid(format!("size {size} is not a multiple of 512")));
    }
    if size > header::MAX_VIRTUAL_SIZE {
        return Err(invalid(format!("size {size} is too large")));
    }
    let cs = 1u64 << cluster_bits;
    let mut h = Header {
        version: if opts.compat == Compat::V2 { 2 } else { 3 },
        cluster_bits,
        size,
        l1_size: 0,
        l1_offset: 0,
        reftable_offset: cs,
        reftable_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order,
        header_length: 112,
        compression: Compression::Zlib,
        backing_file: None,
        backing_format: None,
        has_bitmaps: false,
    };
    let l1_entries = h.l1_entries_for(size);
    if l1_entries * 8 > header::MAX_TABLE_BYTES {
        return Err(invalid(format!(
            "size {size} needs an L1 table over 32 MiB; use larger clusters"
        )));
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let rb_entries = (cs * 8) >> refcount_order;
    // Header, refcount table, refcount blocks, L1: find sizes that cover themselves.
    let (mut t, mut r) = (1u64, 1u64);
    loop {
        let total = 1 + t + r + l1_clusters;
        let r2 = total.div_ceil(rb_entries);
        let t2 = (r2 * 8).div_ceil(cs);
        if (r2, t2) == (r, t) {
            break;
        }
        (r, t) = (r2, t2);
    }
    let total = 1 + t + r + l1_clusters;
    h.l1_size = l1_entries as u32;
    h.l1_offset = (1 + t + r) * cs;
    h.reftable_clusters = t as u32;
    let fmt_name = backing_format.map(|f| f.to_string());
    let head = header::build(&h, opts.backing_file.as_deref(), fmt_name.as_deref())?;

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(Error::io(path))?;
    let result = (|| {
        file.set_len(total * cs).map_err(Error::io(path))?;
        iov::pwrite(&file, &head, 0).map_err(Error::io(path))?;
        let mut table = Vec::with_capacity((t * cs) as usize);
        for i in 0..r {
            table.extend_from_slice(&((1 + t + i) * cs).to_be_bytes());
        }
        iov::pwrite(&file, &table, cs).map_err(Error::io(path))?;
        for i in 0..r {
            let mut block = vec![0u8; cs as usize];
            for c in i * rb_entries..((i + 1) * rb_entries).min(total) {
                refcount::set(&mut block, refcount_order, (c - i * rb_entries) as usize, 1);
            }
            iov::pwrite(&file, &block, (1 + t + i) * cs).map_err(Error::io(path))?;
        }
        file.sync_all().map_err(Error::io(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}
