//! One image file of a chain, whatever its format.

use vm_memory::VolatileSlice;

use crate::error::Result;
use crate::iov::Bufs;
use crate::qcow2::Qcow2;
use crate::raw::Raw;
use crate::Format;

/// An open image file.
pub enum Layer {
    /// Raw.
    Raw(Raw),
    /// qcow2 (with its own backing layer inside).
    Qcow2(Box<Qcow2>),
}

impl Layer {
    /// Virtual size.
    pub fn size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.size(),
            Layer::Qcow2(q) => q.size(),
        }
    }

    /// Format of this file.
    pub fn format(&self) -> Format {
        match self {
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
        }
    }

    /// Reads guest bytes (the range lies inside the disk).
    pub fn read(&self, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        match self {
            Layer::Raw(r) => r.read(off, bufs),
            Layer::Qcow2(q) => q.read(off, Bufs::new(bufs)),
        }
    }

    /// Extents of `off..off+len` through the chain below and including this layer: `true`
    /// reads as zeroes.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        match self {
            Layer::Raw(r) => r.map(off, len),
            Layer::Qcow2(q) => {
                let mut out: Vec<(u64, bool)> = Vec::new();
                let mut pos = off;
                for (n, kind) in q.layer_map(off, len)? {
                    let parts = match kind {
                        Some(z) => vec![(n, z)],
                        None => match q.backing() {
                            Some(b) => {
                                let avail = b.size().saturating_sub(pos).min(n);
                                let mut v = if avail > 0 {
                                    b.map(pos, avail)?
                                } else {
                                    Vec::new()
                                };
                                if avail < n {
                                    v.push((n - avail, true));
                                }
                                v
                            }
                            None => vec![(n, true)],
                        },
                    };
                    for (l, z) in parts {
                        match out.last_mut() {
                            Some((pl, pz)) if *pz == z => *pl += l,
                            _ => out.push((l, z)),
                        }
                    }
                    pos += n;
                }
                Ok(out)
            }
        }
    }
}
