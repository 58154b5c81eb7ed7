//! The guest's side of the crash and fault tests: a randomized workload of guest operations,
//! the disk contents the guest expects after them, and what it may see after a crash or a
//! failed operation.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use qcow::{Compat, CreateOptions, Format, Image};

use crate::common::{self, Rng};

pub const SECTOR: u64 = 512;

/// One guest operation of the workload.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Grow { size: u64 },
    Flush,
}

/// The guest's view of the disk.
#[derive(Clone)]
pub struct Model {
    pub bytes: Vec<u8>,
    pub cluster: u64,
    /// What discarded clusters read: the backing file on v2 overlays (no zero flag), else
    /// zeroes (`None`).
    pub discarded: Option<Arc<Vec<u8>>>,
}

impl Model {
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Write { off, len, seed } => {
                let data = common::pattern(seed, len as usize);
                self.bytes[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero { off, len, .. } => self.bytes[off as usize..(off + len) as usize].fill(0),
            Op::Discard { off, len } => {
                // Whole clusters read as zeroes afterwards (v3, or no backing file); the rest
                // keeps its data.
                for x in self.whole_clusters(off, len) {
                    let v = self.discarded.as_ref().and_then(|d| d.get(x as usize));
                    self.bytes[x as usize] = v.copied().unwrap_or(0);
                }
            }
            Op::Grow { size } => self.bytes.resize(size as usize, 0),
            Op::Flush => {}
        }
    }

    /// The bytes of `off..off+len` in clusters it covers whole (the last, partial cluster of
    /// the disk counts as whole), possibly empty.
    fn whole_clusters(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        let a = off.next_multiple_of(self.cluster);
        let end = off + len;
        let b = if end >= self.bytes.len() as u64 {
            end
        } else {
            end / self.cluster * self.cluster
        };
        a..b.max(a)
    }

    /// Sectors whose contents `op` determines whatever they held (a discard leaves the parts
    /// of clusters it only partly covers alone).
    pub fn overwritten(&self, op: Op) -> std::ops::Range<u64> {
        match op {
            Op::Discard { off, len } => {
                let r = self.whole_clusters(off, len);
                r.start / SECTOR..r.end.div_ceil(SECTOR)
            }
            _ => self.touched(op),
        }
    }

    /// Sectors `op` may change.
    pub fn touched(&self, op: Op) -> std::ops::Range<u64> {
        match op {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                off / SECTOR..(off + len).div_ceil(SECTOR)
            }
            Op::Grow { size } => self.bytes.len() as u64 / SECTOR..size / SECTOR,
            Op::Flush => 0..0,
        }
    }
}

pub struct Config {
    pub name: &'static str,
    pub cluster: u32,
    pub size: u64,
    pub compat: Compat,
    /// Bytes of a raw backing file, when the image is an overlay.
    pub backing: Option<u64>,
    pub ops: usize,
}

pub fn workload(cfg: &Config, seed: u64) -> Vec<Op> {
    let mut r = Rng::new(seed);
    let cs = u64::from(cfg.cluster);
    let mut size = cfg.size;
    let mut ops = Vec::new();
    let mut grown = 0;
    for i in 0..cfg.ops {
        let sectors = size / SECTOR;
        let pick = r.below(100);
        let off = r.below(sectors) * SECTOR;
        // Mostly small, sometimes a few clusters.
        let max = if r.chance(20) { 4 * cs } else { cs };
        let len = (r.range(1, max / SECTOR + 1) * SECTOR).min(size - off);
        let op = match pick {
            0..=54 => Op::Write {
                off,
                len,
                seed: seed * 100_000 + i as u64,
            },
            55..=64 => Op::Zero {
                off,
                len,
                unmap: r.chance(50),
            },
            65..=79 => Op::Discard { off, len },
            80..=81 if grown < 2 => {
                grown += 1;
                size += (size / 4).next_multiple_of(cs);
                Op::Grow { size }
            }
            _ => Op::Flush,
        };
        ops.push(op);
    }
    ops
}

/// The model after operations `0..n`, from the nearest snapshot.
pub struct History {
    pub ops: Vec<Op>,
    /// (n, model after ops 0..n), at every flush and at the start.
    pub snapshots: Vec<(usize, Model)>,
}

impl History {
    pub fn new(start: Model, ops: &[Op]) -> Self {
        let mut snapshots = vec![(0, start.clone())];
        let mut m = start;
        for (i, &op) in ops.iter().enumerate() {
            m.apply(op);
            if let Op::Flush = op {
                snapshots.push((i, m.clone()));
            }
        }
        History {
            ops: ops.to_vec(),
            snapshots,
        }
    }

    pub fn at(&self, n: usize) -> Model {
        let (k, m) = self
            .snapshots
            .iter()
            .rev()
            .find(|(k, _)| *k <= n)
            .expect("snapshot 0");
        let mut m = m.clone();
        for &op in &self.ops[*k..n] {
            m.apply(op);
        }
        m
    }

    /// What the guest may see after a crash: sector by sector the model after `acked`
    /// operations, or for sectors operations `acked..begun` touched, any value they held in
    /// between.
    pub fn expect(&self, acked: usize, begun: usize) -> Expect {
        let mut m = self.at(acked);
        let base = m.bytes.clone();
        let mut sizes = vec![m.bytes.len()];
        let mut allowed: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
        for &op in &self.ops[acked..begun] {
            let touched = m.touched(op);
            for sct in touched.clone() {
                allowed
                    .entry(sct)
                    .or_insert_with(|| vec![sector(&m.bytes, sct)]);
            }
            m.apply(op);
            sizes.push(m.bytes.len());
            for sct in touched {
                allowed.get_mut(&sct).unwrap().push(sector(&m.bytes, sct));
            }
        }
        Expect {
            base,
            allowed,
            sizes,
            ops: (acked, begun),
        }
    }
}

pub struct Expect {
    pub base: Vec<u8>,
    /// sector -> every value it may hold
    pub allowed: HashMap<u64, Vec<Vec<u8>>>,
    pub sizes: Vec<usize>,
    pub ops: (usize, usize),
}

impl Expect {
    pub fn verify(&self, got: &[u8]) -> Result<(), String> {
        let (acked, begun) = self.ops;
        if !self.sizes.contains(&got.len()) {
            return Err(format!(
                "the disk is {} bytes; the guest saw sizes {:?}",
                got.len(),
                self.sizes
            ));
        }
        for (k, g) in got.chunks(SECTOR as usize).enumerate() {
            let sct = k as u64;
            let ok = match self.allowed.get(&sct) {
                Some(vals) => vals.iter().any(|v| v[..g.len()] == *g),
                None => {
                    let a = k * SECTOR as usize;
                    self.base.get(a..a + g.len()) == Some(g)
                }
            };
            if !ok {
                return Err(format!(
                    "sector {sct} (offset {:#x}) reads {:02x?}…, which the guest never wrote \
                     there since its last completed flush (ops {acked}..{begun})",
                    sct * SECTOR,
                    &g[..8]
                ));
            }
        }
        Ok(())
    }
}

/// Sector `n` of `bytes` (zeroes past the end).
pub fn sector(bytes: &[u8], n: u64) -> Vec<u8> {
    let a = (n * SECTOR) as usize;
    let mut v = vec![0u8; SECTOR as usize];
    if a < bytes.len() {
        let b = (a + SECTOR as usize).min(bytes.len());
        v[..b - a].copy_from_slice(&bytes[a..b]);
    }
    v
}

/// Creates the image (and its backing file) for `cfg` in `dir`; returns its path and the
/// guest's view of it.
pub fn create(dir: &Path, cfg: &Config, seed: u64) -> (std::path::PathBuf, Model) {
    let path = dir.join("disk.qcow2");
    let mut bytes = vec![0u8; cfg.size as usize];
    let mut discarded = None;
    let mut opts = CreateOptions {
        size: Some(cfg.size),
        cluster_size: cfg.cluster,
        compat: cfg.compat,
        ..Default::default()
    };
    if let Some(n) = cfg.backing {
        let data = common::pattern(seed ^ 0xba5e, n as usize);
        std::fs::write(dir.join("base.raw"), &data).unwrap();
        bytes[..n as usize].copy_from_slice(&data);
        if cfg.compat == Compat::V2 {
            discarded = Some(Arc::new(data));
        }
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some(Format::Raw);
    }
    qcow::create(&path, &opts).unwrap();
    let model = Model {
        bytes,
        cluster: u64::from(cfg.cluster),
        discarded,
    };
    (path, model)
}

/// Performs `op` on `img`.
pub fn perform(img: &Image, op: Op) -> qcow::Result<()> {
    match op {
        Op::Write { off, len, seed } => img.write_at(off, &common::pattern(seed, len as usize)),
        Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap),
        Op::Discard { off, len } => img.discard(off, len),
        Op::Grow { size } => img.resize(size, false),
        Op::Flush => img.flush(),
    }
}
