//! Translating guest ranges to what backs them, and reading.

use super::{Meta, Qcow2};
use crate::entry::{self, Mapping, SUBCLUSTERS};
use crate::error::Result;
use crate::iov::Bufs;

impl Qcow2 {
    /// Bytes per mapping unit: a subcluster with extended L2 entries, else a cluster.
    pub(crate) fn unit(&self) -> u64 {
        if self.g.ext {
            self.g.cs / SUBCLUSTERS
        } else {
            self.g.cs
        }
    }

    /// Mapping of the unit containing `guest`, host offsets pointing at the unit's start.
    pub(crate) fn mapping_at(&self, m: &mut Meta, guest: u64) -> Result<Mapping> {
        let l2off = self.l2_offset(m, guest)?;
        if l2off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let idx = ((guest / self.g.cs) % self.g.l2_entries) as usize;
        let words = self.g.l2_words as usize;
        let (bits, v3, ext) = (self.g.cluster_bits, self.g.v3, self.g.ext);
        let sub = (guest % self.g.cs) / self.unit();
        let table = self.l2_table(m, l2off)?;
        let e = table[idx * words];
        let r = if ext {
            entry::decode_ext_l2(e, table[idx * words + 1], sub, bits)
        } else {
            entry::decode_l2(e, bits, v3)
        };
        r.map_err(|reason| self.corrupt(format!("guest offset {guest:#x}: {reason}")))
    }

    /// What backs `guest..guest+len`: the mapping at `guest` (host offsets adjusted to `guest`)
    /// and how many bytes from `guest` on map the same way, contiguously on the host.
    pub(crate) fn map_range(&self, m: &mut Meta, guest: u64, len: u64) -> Result<(Mapping, u64)> {
        let unit = self.unit();
        let first = self.mapping_at(m, guest)?;
        let within = guest % unit;
        let mut n = (unit - within).min(len);
        let first = match first {
            Mapping::Data { host, copied } => {
                self.check_host(m, host)?;
                Mapping::Data {
                    host: host + within,
                    copied,
                }
            }
            other => other,
        };
        if matches!(first, Mapping::Compressed { .. }) {
            // Compressed clusters are always whole clusters.
            return Ok((first, (self.g.cs - guest % self.g.cs).min(len)));
        }
        while n < len {
            let next = self.mapping_at(m, guest + n)?;
            let continues = match (first, next) {
                (Mapping::Unallocated, Mapping::Unallocated) => true,
                (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                (
                    Mapping::Data {
                        host: a,
                        copied: ca,
                    },
                    Mapping::Data {
                        host: b,
                        copied: cb,
                    },
                ) => ca == cb && b == a + n,
                _ => false,
            };
            if !continues {
                break;
            }
            n += unit.min(len - n);
        }
        Ok((first, n))
    }

    fn check_host(&self, m: &Meta, host: u64) -> Result<()> {
        if host >= m.eof * self.g.cs || host == 0 {
            return Err(self.corrupt(format!("data cluster at {host:#x} lies outside the file")));
        }
        Ok(())
    }

    /// Reads `bufs.len()` guest bytes at `guest`.
    pub(crate) fn read(&self, guest: u64, bufs: Bufs<'_, '_>) -> Result<()> {
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let len = bufs.len();
        let mut pos = 0;
        while pos < len {
            let (map, n) = {
                let mut m = self.lock();
                self.map_range(&mut m, guest + pos, len - pos)?
            };
            let part = bufs.sub(pos, n);
            match map {
                Mapping::Data { host, .. } => {
                    self.data
                        .read(&self.file, &part, host)
                        .map_err(crate::error::Error::io(&self.path))?;
                }
                Mapping::Zero { .. } => Bufs::new(&part).zero(0, n),
                Mapping::Unallocated => self.read_backing(guest + pos, Bufs::new(&part))?,
                Mapping::Compressed { offset, len: clen } => {
                    let data = self.decompress(offset, clen)?;
                    let at = ((guest + pos) % self.g.cs) as usize;
                    Bufs::new(&part).copy_in(0, &data[at..at + n as usize]);
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Extents of `guest..guest+len` as this layer alone sees them: `Some(true)` reads as
    /// zeroes, `Some(false)` holds data here, `None` is unallocated (falls through).
    pub(crate) fn layer_map(&self, guest: u64, len: u64) -> Result<Vec<(u64, Option<bool>)>> {
        let mut out: Vec<(u64, Option<bool>)> = Vec::new();
        let mut pos = 0;
        let mut m = self.lock();
        while pos < len {
            let (map, n) = self.map_range(&mut m, guest + pos, len - pos)?;
            let kind = match map {
                Mapping::Unallocated => None,
                Mapping::Zero { .. } => Some(true),
                Mapping::Data { .. } | Mapping::Compressed { .. } => Some(false),
            };
            match out.last_mut() {
                Some((l, k)) if *k == kind => *l += n,
                _ => out.push((n, kind)),
            }
            pos += n;
        }
        Ok(out)
    }
}
