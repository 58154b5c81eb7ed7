//! Disk images for lightbyte: qcow2 (versions 2 and 3, any cluster size and refcount width,
//! zero and compressed clusters, extended L2 entries for reading, backing chains) and raw.
//!
//! We evaluated the `imago` crate for this (docs/qcow2-imago-evaluation.md): it lacks zstd,
//! extended L2 entries, dirty-image repair, check and convert, and its allocation order can
//! leave a referenced cluster with a zero refcount after a crash. Filling those gaps would
//! have meant a second engine next to it, so this crate is the engine.
//!
//! An [`Image`] is `Send + Sync`; reads and writes from many threads run concurrently.

mod chain;
mod check;
mod compress;
mod create;
mod entry;
mod error;
pub mod header;
pub mod hook;
mod iov;
mod layer;
mod qcow2;
mod raw;
mod refcount;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use vm_memory::VolatileSlice;

pub use chain::MAX_CHAIN_DEPTH;
pub use error::{Error, Result};

use layer::Layer;
use qcow2::ZeroMode;

/// An image file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Guest bytes are file bytes.
    Raw,
    /// QEMU copy-on-write version 2/3.
    Qcow2,
}

impl FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::Invalid(format!(
                "unknown image format {other:?}: expected raw or qcow2"
            ))),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

/// qcow2 version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compat {
    /// Version 2 ("compat=0.10").
    V2,
    /// Version 3 ("compat=1.1").
    V3,
}

impl FromStr for Compat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Compat> {
        match s {
            "0.10" | "v2" | "2" => Ok(Compat::V2),
            "1.1" | "v3" | "3" => Ok(Compat::V3),
            other => Err(Error::Invalid(format!(
                "unknown compat level {other:?}: expected 0.10 or 1.1"
            ))),
        }
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// Open for writing (backing files are always read-only).
    pub writable: bool,
    /// The format; `None` probes it. A file with a qcow2 header is only ever read as raw when
    /// the caller says `Some(Format::Raw)`.
    pub format: Option<Format>,
    /// O_DIRECT.
    pub direct: bool,
    /// Sees every change to a qcow2 image's file once it is open (crash and fault-injection
    /// tests); raw images refuse one.
    pub hook: Option<hook::Hook>,
}

/// A range of the disk and whether it reads as zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Reads as zeroes (unallocated through the whole chain, or zero clusters).
    pub zero: bool,
}

/// qcow2 details of [`ImageInfo`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Qcow2Info {
    /// "0.10" or "1.1".
    pub compat: String,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Subcluster allocation.
    pub extended_l2: bool,
    /// "zlib" or "zstd".
    pub compression_type: String,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
    /// Dirty bit set.
    pub dirty: bool,
    /// Corrupt bit set.
    pub corrupt: bool,
    /// Internal snapshots.
    pub snapshots: u32,
}

/// What `vmm img info` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImageInfo {
    /// Path as opened.
    pub filename: String,
    /// Format.
    pub format: Format,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// qcow2 details.
    pub qcow2: Option<Qcow2Info>,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format as stored.
    pub backing_format: Option<Format>,
    /// Resolved backing path.
    pub full_backing_filename: Option<String>,
    /// The backing image.
    pub backing: Option<Box<ImageInfo>>,
}

/// Options of [`create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Format.
    pub format: Format,
    /// Virtual size; `None` takes the backing image's.
    pub size: Option<u64>,
    /// qcow2 cluster size (512 B – 2 MiB).
    pub cluster_size: u32,
    /// qcow2 refcount width (1–64).
    pub refcount_bits: u32,
    /// qcow2 version.
    pub compat: Compat,
    /// Backing file name, stored as given (relative names resolve from the image's directory).
    pub backing_file: Option<String>,
    /// Backing format; probed and stored when `None`.
    pub backing_format: Option<Format>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            format: Format::Qcow2,
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            compat: Compat::V3,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Result of [`check`].
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Errors: clusters referenced more often than their refcount, bad table entries.
    pub corruptions: u64,
    /// Clusters with refcounts but no references.
    pub leaks: u64,
    /// A repair rewrote the refcounts (the counts above are after the repair).
    pub repaired: bool,
    /// One line per problem (capped).
    pub messages: Vec<String>,
    /// Guest clusters with data in this image (qemu-img's "allocated clusters").
    pub allocated_clusters: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// File length.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// No corruption and no leak.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
}

/// An open image with its backing chain.
pub struct Image {
    top: Layer,
    writable: bool,
    path: std::path::PathBuf,
}

impl Image {
    /// Opens `path` (and its backing chain).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
        let mut top = chain::open(path, opts.format, opts.writable, opts.direct)?;
        if let Some(hook) = &opts.hook {
            match &mut top {
                Layer::Qcow2(q) => q.set_hook(Some(hook.clone())),
                Layer::Raw(_) => {
                    return Err(Error::Invalid(format!(
                        "{}: file hooks apply to qcow2 images only",
                        path.display()
                    )))
                }
            }
        }
        Ok(Image {
            top,
            writable: opts.writable,
            path: path.to_path_buf(),
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.top.size()
    }

    /// Format of the top file.
    pub fn format(&self) -> Format {
        self.top.format()
    }

    /// For a raw image, the file descriptor guest data goes through (the O_DIRECT one when
    /// opened direct): its offsets are disk offsets, so callers may run transfers on it
    /// themselves (io_uring). None for qcow2, whose offsets map through metadata.
    pub fn raw_data_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.top {
            Layer::Raw(r) => Some(r.data_fd()),
            Layer::Qcow2(_) => None,
        }
    }

    /// Opened read-only.
    pub fn read_only(&self) -> bool {
        !self.writable
    }

    fn range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::Invalid(format!(
                "{}: range {offset:#x}+{len:#x} is past the end of the disk ({} bytes)",
                self.path.display(),
                self.size()
            ))),
        }
    }

    fn writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path.display()
            )))
        }
    }

    /// Reads into `bufs`, in order, from `offset`.
    pub fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.range(offset, iov::Bufs::new(bufs).len())?;
        self.top.read(offset, bufs)
    }

    /// Writes `bufs`, in order, at `offset`.
    pub fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.writable()?;
        self.range(offset, iov::Bufs::new(bufs).len())?;
        match &self.top {
            Layer::Raw(r) => r.write(offset, bufs),
            Layer::Qcow2(q) => q.write(offset, iov::Bufs::new(bufs)),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(offset, &[iov::slice_of(buf)])
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_vectored(offset, &[iov::slice_of_ro(buf)])
    }

    /// Makes data and metadata written so far durable.
    pub fn flush(&self) -> Result<()> {
        match &self.top {
            Layer::Raw(r) => r.flush(),
            Layer::Qcow2(q) => q.flush(),
        }
    }

    /// Drops the contents of a range: a hint, as in virtio and SCSI. Whole qcow2 clusters in it
    /// read as zeroes afterwards (or, on v2 images with a backing file, as the backing file);
    /// parts of clusters keep their data. Raw files get a hole punched (zeroes).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        self.range(offset, len)?;
        match &self.top {
            Layer::Raw(r) => r.zero(offset, len, true),
            Layer::Qcow2(q) => q.zero_range(offset, len, ZeroMode::Discard),
        }
    }

    /// Makes a range read as zeroes; `unmap` allows freeing its space.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.writable()?;
        self.range(offset, len)?;
        let mode = if unmap {
            ZeroMode::ZeroUnmap
        } else {
            ZeroMode::ZeroKeep
        };
        match &self.top {
            Layer::Raw(r) => r.zero(offset, len, unmap),
            Layer::Qcow2(q) => q.zero_range(offset, len, mode),
        }
    }

    /// Changes the virtual size. Shrinking needs `shrink` and a tail that reads as zeroes.
    pub fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        self.writable()?;
        let size = self.size();
        if self.format() == Format::Qcow2 && new_size % 512 != 0 {
            return Err(Error::Invalid(format!(
                "size {new_size} is not a multiple of 512"
            )));
        }
        if new_size < size {
            if !shrink {
                return Err(Error::Invalid(format!(
                    "{}: new size {new_size} is smaller than the current {size}; shrinking needs --shrink",
                    self.path.display()
                )));
            }
            let data = self.nonzero_bytes(new_size, size - new_size)?;
            if data > 0 {
                return Err(Error::Invalid(format!(
                    "{}: refusing to shrink: {data} non-zero bytes lie past the new size {new_size}",
                    self.path.display()
                )));
            }
            if let Layer::Qcow2(q) = &self.top {
                q.zero_range(new_size, size - new_size, ZeroMode::ZeroUnmap)?;
                q.flush()?;
            }
        }
        match &self.top {
            Layer::Raw(r) => r.resize(new_size),
            Layer::Qcow2(q) => q.resize(new_size),
        }
    }

    /// Bytes in `offset..offset+len` that are not zero (allocated extents are read).
    fn nonzero_bytes(&self, offset: u64, len: u64) -> Result<u64> {
        let mut found = 0;
        let mut buf = vec![0u8; 1 << 20];
        for e in self.map(offset, len)?.into_iter().filter(|e| !e.zero) {
            let mut pos = e.offset;
            while pos < e.offset + e.len {
                let n = (e.offset + e.len - pos).min(buf.len() as u64) as usize;
                self.read_at(pos, &mut buf[..n])?;
                found += buf[..n].iter().filter(|b| **b != 0).count() as u64;
                pos += n as u64;
            }
        }
        Ok(found)
    }

    /// How `offset..offset+len` reads through the whole chain.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.range(offset, len)?;
        let mut pos = offset;
        Ok(self
            .top
            .map(offset, len)?
            .into_iter()
            .map(|(l, zero)| {
                let e = Extent {
                    offset: pos,
                    len: l,
                    zero,
                };
                pos += l;
                e
            })
            .collect())
    }

    /// Description of the image and its chain.
    pub fn info(&self) -> ImageInfo {
        layer_info(&self.top, &self.path)
    }

    /// Flushes and returns clusters reserved for writes, so that an image nobody writes to any
    /// more has no leaked clusters. The image stays usable (later writes reserve again). Call
    /// it when the VM ends: a process that exits without dropping the image skips it.
    pub fn release(&self) -> Result<()> {
        match &self.top {
            Layer::Raw(r) => r.flush(),
            Layer::Qcow2(q) => q.close(),
        }
    }

    /// [`Image::release`], then drop. Errors are reported (dropping the image does the same but
    /// can only log them).
    pub fn close(self) -> Result<()> {
        self.release()
    }
}

fn layer_info(layer: &Layer, path: &Path) -> ImageInfo {
    use std::os::unix::fs::MetadataExt;
    let (file, format) = match layer {
        Layer::Raw(r) => (&r.file, Format::Raw),
        Layer::Qcow2(q) => (&q.file, Format::Qcow2),
    };
    let actual_size = file.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    let mut info = ImageInfo {
        filename: path.display().to_string(),
        format,
        virtual_size: layer.size(),
        actual_size,
        cluster_size: None,
        qcow2: None,
        backing_file: None,
        backing_format: None,
        full_backing_filename: None,
        backing: None,
    };
    if let Layer::Qcow2(q) = layer {
        let h = q.header();
        info.cluster_size = Some(h.cluster_size());
        info.qcow2 = Some(Qcow2Info {
            compat: if h.version == 2 { "0.10" } else { "1.1" }.into(),
            refcount_bits: h.refcount_bits(),
            extended_l2: h.extended_l2(),
            compression_type: match h.compression {
                header::Compression::Zlib => "zlib",
                header::Compression::Zstd => "zstd",
            }
            .into(),
            lazy_refcounts: h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            dirty: h.incompatible & header::INCOMPAT_DIRTY != 0,
            corrupt: h.incompatible & header::INCOMPAT_CORRUPT != 0,
            snapshots: h.nb_snapshots,
        });
        info.backing_file = h.backing_file.clone();
        if let Some(name) = &h.backing_file {
            let full = chain::resolve_backing(path, name);
            info.full_backing_filename = Some(full.display().to_string());
            if let Some(b) = q.backing() {
                info.backing_format = Some(b.format());
                info.backing = Some(Box::new(layer_info(b, &full)));
            }
        }
    }
    info
}

/// Creates an image; fails when `path` exists.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    create::create(path, opts)
}

/// The format of the file at `path`, from its contents.
pub fn probe(path: &Path) -> Result<Format> {
    let f = std::fs::File::open(path).map_err(Error::io(path))?;
    chain::probe_file(&f, path)
}

/// Checks a qcow2 image's metadata (see [`CheckReport`]); `repair` rebuilds the refcounts.
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    check::check(path, repair)
}
