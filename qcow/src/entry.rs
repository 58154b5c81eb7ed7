//! Table entries: L1 entries, standard and extended L2 entries, compressed-cluster descriptors,
//! decoded into what a guest range maps to.

/// Set in L1/L2 entries whose cluster has refcount exactly 1 (writable in place).
pub const COPIED: u64 = 1 << 63;
/// Set in L2 entries of compressed clusters.
pub const COMPRESSED: u64 = 1 << 62;
/// v3 standard L2 entries: the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Host-offset bits of L1 and standard L2 entries (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
pub const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits of a standard L2 entry that must be zero.
pub const L2_RESERVED: u64 = !(OFFSET_MASK | COPIED | COMPRESSED | ZERO);

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;

/// Where a (sub)cluster's data comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read from the backing file (or zeroes without one).
    Unallocated,
    /// Reads as zeroes. `host` is a cluster kept allocated (v3 "zero, allocated"), if any.
    Zero {
        /// Preallocated cluster.
        host: Option<u64>,
    },
    /// Plain data at `host` (cluster start). `copied`: refcount is 1, writable in place.
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// The COPIED flag.
        copied: bool,
    },
    /// A compressed cluster.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: u64,
        /// Length of the compressed bytes (upper bound, whole sectors).
        len: u64,
    },
}

/// Decodes a standard L2 entry. `Err` carries why the entry is invalid.
pub fn decode_l2(entry: u64, cluster_bits: u32, v3: bool) -> Result<Mapping, String> {
    if entry & COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        return Ok(Mapping::Compressed { offset, len });
    }
    if entry & L2_RESERVED != 0 {
        return Err(format!("L2 entry {entry:#x} has reserved bits set"));
    }
    let host = entry & OFFSET_MASK;
    let cs_mask = (1u64 << cluster_bits) - 1;
    if host & cs_mask != 0 {
        return Err(format!(
            "L2 entry {entry:#x} points to an unaligned cluster"
        ));
    }
    if entry & ZERO != 0 {
        if !v3 {
            return Err(format!(
                "L2 entry {entry:#x} has the zero flag in a v2 image"
            ));
        }
        return Ok(Mapping::Zero {
            host: (host != 0).then_some(host),
        });
    }
    if host == 0 {
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data {
        host,
        copied: entry & COPIED != 0,
    })
}

/// Decodes one subcluster of an extended L2 entry (`entry`, `bitmap`).
pub fn decode_ext_l2(
    entry: u64,
    bitmap: u64,
    sub: u64,
    cluster_bits: u32,
) -> Result<Mapping, String> {
    if entry & COMPRESSED != 0 {
        if bitmap != 0 {
            return Err("compressed cluster with a subcluster bitmap".into());
        }
        return decode_l2(entry, cluster_bits, true);
    }
    if entry & ZERO != 0 {
        return Err(format!(
            "extended L2 entry {entry:#x} uses the standard zero flag"
        ));
    }
    let alloc = bitmap & 0xffff_ffff;
    let zero = bitmap >> 32;
    if alloc & zero != 0 {
        return Err("subcluster both allocated and zero".into());
    }
    let std = decode_l2(entry, cluster_bits, true)?;
    let bit = 1u64 << sub;
    let sub_size = (1u64 << cluster_bits) / SUBCLUSTERS;
    match std {
        Mapping::Unallocated if alloc != 0 => {
            Err("subclusters allocated in a cluster without a host offset".into())
        }
        _ if zero & bit != 0 => Ok(Mapping::Zero { host: None }),
        Mapping::Data { host, copied } if alloc & bit != 0 => Ok(Mapping::Data {
            host: host + sub * sub_size,
            copied,
        }),
        _ => Ok(Mapping::Unallocated),
    }
}

/// Validates an L1 entry and returns the L2 table offset (0: none).
pub fn decode_l1(entry: u64, cluster_bits: u32) -> Result<u64, String> {
    if entry & L1_RESERVED != 0 {
        return Err(format!("L1 entry {entry:#x} has reserved bits set"));
    }
    let off = entry & OFFSET_MASK;
    if off & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "L1 entry {entry:#x} points to an unaligned L2 table"
        ));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries() {
        assert_eq!(decode_l2(0, 16, true), Ok(Mapping::Unallocated));
        assert_eq!(
            decode_l2(COPIED | 0x30000, 16, true),
            Ok(Mapping::Data {
                host: 0x30000,
                copied: true
            })
        );
        assert_eq!(decode_l2(1, 16, true), Ok(Mapping::Zero { host: None }));
        assert!(decode_l2(1, 16, false).is_err());
        assert!(decode_l2(0x30200, 16, true).is_err(), "unaligned");
        assert!(decode_l2(1 << 57, 16, true).is_err(), "reserved bit");
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: offset in bits 0..54, sector count - 1 in bits 54..62.
        let e = COMPRESSED | (3u64 << 54) | 0x1234_5600 | 0x10;
        assert_eq!(
            decode_l2(e, 16, true),
            Ok(Mapping::Compressed {
                offset: 0x1234_5610,
                len: 4 * 512 - 0x10
            })
        );
    }

    #[test]
    fn subclusters() {
        let host = 0x10_0000;
        let bitmap = 0b0101 | (0b1000u64 << 32);
        let at = |s| decode_ext_l2(host | COPIED, bitmap, s, 16).unwrap();
        assert_eq!(at(0), Mapping::Data { host, copied: true });
        assert_eq!(at(1), Mapping::Unallocated);
        assert_eq!(
            at(2),
            Mapping::Data {
                host: host + 2 * 2048,
                copied: true
            }
        );
        assert_eq!(at(3), Mapping::Zero { host: None });
        assert!(decode_ext_l2(0, 1, 0, 16).is_err());
        assert!(decode_ext_l2(host, 1 | (1 << 32), 0, 16).is_err());
    }
}
