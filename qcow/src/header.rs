//! The qcow2 header (versions 2 and 3) and its extensions, parsed with every bound checked
//! before anything is allocated from it.

use std::path::Path;

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest cluster_bits (512 B – 2 MiB), as QEMU allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Tables larger than this (L1, refcount table) are refused: QEMU's own limit, and a bound on
/// what a hostile header can make us allocate.
pub const MAX_TABLE_BYTES: u64 = 32 << 20;
/// Host offsets are 56 bits wide in table entries.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest virtual size accepted (QEMU's QCOW_MAX_SIZE-like bound, 2^61 bytes... kept at 2^56
/// so that every guest offset also fits the host offset range).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image was marked corrupt by a writer.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression_type field is valid.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature: refcounts may be stale while the dirty bit is set.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: persistent bitmaps are consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Byte offsets of header fields that get rewritten in place.
pub mod field {
    /// Virtual size (u64).
    pub const SIZE: u64 = 24;
    /// l1_size (u32) followed by l1_table_offset (u64).
    pub const L1: u64 = 36;
    /// refcount_table_offset (u64) followed by refcount_table_clusters (u32).
    pub const REFTABLE: u64 = 48;
    /// incompatible_features (u64).
    pub const INCOMPAT: u64 = 72;
    /// autoclear_features (u64).
    pub const AUTOCLEAR: u64 = 88;
}

/// Compression method of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (QEMU's "zlib").
    Zlib,
    /// zstd frames.
    Zstd,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_offset: u64,
    /// Host offset of the refcount table.
    pub reftable_offset: u64,
    /// Clusters the refcount table occupies.
    pub reftable_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Header length (v3: from the header; v2: 72).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// Backing file name, as stored.
    pub backing_file: Option<String>,
    /// Backing format from the backing-format extension.
    pub backing_format: Option<String>,
    /// A persistent-bitmaps extension is present.
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Whether `b` starts like a qcow2 image (what format probing looks at).
pub fn looks_like_qcow2(b: &[u8]) -> bool {
    b.len() >= 4 && be32(b, 0) == MAGIC
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// L2 entries per L2 table (one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l1 = self.l2_entries() * self.cluster_size();
        size.div_ceil(per_l1)
    }

    /// Parses and validates the header in `cluster0` (the image's first cluster, or as much of
    /// the file as exists when it is shorter); `file_len` bounds table offsets.
    pub fn parse(path: &Path, cluster0: &[u8], file_len: u64) -> Result<Header> {
        let bad = |r: String| Error::corrupt(path, r);
        if cluster0.len() < 72 || !looks_like_qcow2(cluster0) {
            return Err(bad("no qcow2 header (bad magic or file too short)".into()));
        }
        let version = be32(cluster0, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(
                path,
                format!("qcow2 version {version} (only 2 and 3 exist)"),
            ));
        }
        let cluster_bits = be32(cluster0, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        if (cluster0.len() as u64) < cs.min(file_len) {
            return Err(bad("header cluster truncated".into()));
        }
        let crypt = be32(cluster0, 32);
        if crypt != 0 {
            return Err(Error::unsupported(
                path,
                format!("encrypted images (crypt_method {crypt})"),
            ));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(cluster0, 24),
            l1_size: be32(cluster0, 36),
            l1_offset: be64(cluster0, 40),
            reftable_offset: be64(cluster0, 48),
            reftable_clusters: be32(cluster0, 56),
            nb_snapshots: be32(cluster0, 60),
            snapshots_offset: be64(cluster0, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            has_bitmaps: false,
        };
        if version == 3 {
            if cluster0.len() < 104 {
                return Err(bad("v3 header truncated".into()));
            }
            h.incompatible = be64(cluster0, 72);
            h.compatible = be64(cluster0, 80);
            h.autoclear = be64(cluster0, 88);
            h.refcount_order = be32(cluster0, 96);
            h.header_length = be32(cluster0, 100);
            if h.header_length < 104 {
                return Err(bad(format!("header_length {} < 104", h.header_length)));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > cluster0.len() {
                return Err(bad(format!(
                    "header_length {} exceeds the first cluster",
                    h.header_length
                )));
            }
            let unknown = h.incompatible & !INCOMPAT_KNOWN;
            if unknown != 0 {
                return Err(Error::unsupported(
                    path,
                    format!("unknown incompatible feature bits {unknown:#x}"),
                ));
            }
            if h.incompatible & INCOMPAT_DATA_FILE != 0 {
                return Err(Error::unsupported(path, "external data files"));
            }
            if h.incompatible & INCOMPAT_COMPRESSION != 0 {
                if h.header_length < 105 {
                    return Err(bad(
                        "compression type bit set but no compression_type field".into(),
                    ));
                }
                h.compression = match cluster0[104] {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    t => return Err(Error::unsupported(path, format!("compression type {t}"))),
                };
            } else if h.header_length >= 105 && cluster0[104] != 0 {
                return Err(bad(
                    "compression_type set without its incompatible bit".into()
                ));
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} > 6", h.refcount_order)));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(bad(format!("virtual size {} is too large", h.size)));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(bad(
                "extended L2 entries need clusters of at least 16 KiB".into()
            ));
        }
        // Tables: aligned, bounded, inside the addressable range.
        let check_table = |what: &str, off: u64, bytes: u64| -> Result<()> {
            if bytes > MAX_TABLE_BYTES {
                return Err(bad(format!("{what} of {bytes} bytes is too large")));
            }
            if off % cs != 0 {
                return Err(bad(format!(
                    "{what} offset {off:#x} is not cluster aligned"
                )));
            }
            if bytes > 0 && (off == 0 || off.checked_add(bytes).is_none_or(|e| e > MAX_HOST_OFFSET))
            {
                return Err(bad(format!("{what} offset {off:#x} is invalid")));
            }
            Ok(())
        };
        check_table("L1 table", h.l1_offset, u64::from(h.l1_size) * 8)?;
        if u64::from(h.l1_size) < h.l1_entries_for(h.size) {
            return Err(bad(format!(
                "L1 table of {} entries cannot map {} bytes",
                h.l1_size, h.size
            )));
        }
        if h.reftable_clusters == 0 {
            return Err(bad("no refcount table".into()));
        }
        check_table(
            "refcount table",
            h.reftable_offset,
            u64::from(h.reftable_clusters) * cs,
        )?;
        if h.nb_snapshots > 65536 {
            return Err(bad(format!("{} snapshots is too many", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset % cs != 0 || h.snapshots_offset == 0) {
            return Err(bad("snapshot table offset is invalid".into()));
        }
        h.parse_extensions(path, cluster0)?;
        // Backing file name: inside the first cluster, at most 1023 bytes (QEMU's limit).
        let bf_off = be64(cluster0, 8);
        let bf_len = be32(cluster0, 16);
        if bf_off != 0 {
            if bf_len == 0 || bf_len > 1023 {
                return Err(bad(format!("backing file name length {bf_len}")));
            }
            let end = bf_off
                .checked_add(u64::from(bf_len))
                .filter(|e| *e <= cs && *e <= cluster0.len() as u64)
                .ok_or_else(|| bad("backing file name outside the first cluster".into()))?;
            let name = &cluster0[bf_off as usize..end as usize];
            let name = std::str::from_utf8(name)
                .map_err(|_| bad("backing file name is not UTF-8".into()))?;
            if name.contains('\0') {
                return Err(bad("backing file name contains NUL".into()));
            }
            h.backing_file = Some(name.to_string());
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, c0: &[u8]) -> Result<()> {
        let bad = |r: &str| Error::corrupt(path, r.to_string());
        let mut off = self.header_length as usize;
        if self.version == 2 {
            off = 72;
        }
        off = off.next_multiple_of(8);
        loop {
            if off + 8 > c0.len() {
                // v2 images may have no end marker when nothing follows; treat the end of the
                // cluster as the end of the list.
                if self.version == 2 {
                    return Ok(());
                }
                return Err(bad("header extensions run past the first cluster"));
            }
            let ty = be32(c0, off);
            let len = be32(c0, off + 4) as usize;
            if ty == EXT_END {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|e| *e <= c0.len())
                .ok_or_else(|| bad("header extension runs past the first cluster"))?;
            let data = &c0[data_start..data_end];
            match ty {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| bad("backing format is not UTF-8"))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_BITMAPS => self.has_bitmaps = true,
                EXT_ENCRYPTION => {
                    return Err(Error::unsupported(path, "encryption header extension"))
                }
                EXT_DATA_FILE => return Err(Error::unsupported(path, "external data files")),
                // Feature names are informational; unknown extensions are ignored as the spec
                // requires.
                _ => {}
            }
            off = data_start + len.next_multiple_of(8);
        }
    }
}

/// Serialized header of a new image (v2 or v3) with its extensions, backing name included.
pub fn build(
    h: &Header,
    backing_file: Option<&str>,
    backing_format: Option<&str>,
) -> Result<Vec<u8>> {
    let mut b = vec![0u8; if h.version == 3 { 112 } else { 72 }];
    let put32 =
        |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 4, h.version);
    put32(&mut b, 20, h.cluster_bits);
    put64(&mut b, 24, h.size);
    put32(&mut b, 36, h.l1_size);
    put64(&mut b, 40, h.l1_offset);
    put64(&mut b, 48, h.reftable_offset);
    put32(&mut b, 56, h.reftable_clusters);
    if h.version == 3 {
        put64(&mut b, 72, h.incompatible);
        put64(&mut b, 80, h.compatible);
        put64(&mut b, 88, h.autoclear);
        put32(&mut b, 96, h.refcount_order);
        put32(&mut b, 100, 112);
    }
    let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b.resize(b.len().next_multiple_of(8), 0);
    };
    if let Some(f) = backing_format {
        ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
    }
    if h.version == 3 {
        // Feature name table, so tools can name the bits.
        let mut t = Vec::new();
        for (kind, bit, name) in [
            (0u8, 0u8, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ] {
            let mut e = [0u8; 48];
            e[0] = kind;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        ext(&mut b, EXT_FEATURE_TABLE, &t);
    }
    ext(&mut b, EXT_END, &[]);
    if let Some(name) = backing_file {
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::Invalid(format!(
                "backing file name must be 1 to 1023 bytes, got {}",
                name.len()
            )));
        }
        let off = b.len() as u64;
        b.extend_from_slice(name.as_bytes());
        put64(&mut b, 8, off);
        put32(&mut b, 16, name.len() as u32);
    }
    if b.len() as u64 > h.cluster_size() {
        return Err(Error::Invalid(
            "header and backing file name do not fit in one cluster".into(),
        ));
    }
    Ok(b)
}
