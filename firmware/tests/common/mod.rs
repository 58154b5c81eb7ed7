//! Test helpers: an in-memory block device that counts requests, temp dirs and tool runners.
#![allow(dead_code)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use lightbyte_firmware::block::{BlockDevice, IoError};

pub struct MemDisk {
    pub data: Vec<u8>,
    pub bs: u32,
    pub calls: Cell<usize>,
}

impl MemDisk {
    pub fn new(data: Vec<u8>, bs: u32) -> Self {
        MemDisk {
            data,
            bs,
            calls: Cell::new(0),
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    pub fn reset_calls(&self) {
        self.calls.set(0);
    }
}

impl BlockDevice for MemDisk {
    fn block_size(&self) -> u32 {
        self.bs
    }

    fn num_blocks(&self) -> u64 {
        self.data.len() as u64 / u64::from(self.bs)
    }

    fn read_blocks(&self, lba: u64, buf: &mut [u8]) -> Result<(), IoError> {
        // Strict like real firmware: a misaligned request is a driver bug, not a short read.
        assert_eq!(buf.len() % self.bs as usize, 0, "unaligned read_blocks");
        self.calls.set(self.calls.get() + 1);
        let start = lba.checked_mul(u64::from(self.bs)).ok_or(IoError)?;
        let end = start.checked_add(buf.len() as u64).ok_or(IoError)?;
        if end > self.num_blocks() * u64::from(self.bs) {
            return Err(IoError);
        }
        buf.copy_from_slice(&self.data[start as usize..end as usize]);
        Ok(())
    }
}

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("fw-fs-{}-{}-{}", std::process::id(), tag, n));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a tool and returns its stdout, failing the test with its output on error.
pub fn run(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64*: deterministic so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng(seed | 1).bytes(len)
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Byte offsets of a FAT image's regions, parsed independently of the driver.
pub struct Layout {
    pub bps: u64,
    pub fat_offset: u64,
    pub fat_bytes: u64,
    pub data_offset: u64,
    pub cluster_size: u64,
    pub clusters: u64,
    pub bits: u8,
}

impl Layout {
    /// The cluster chain from `first`, read straight from the image (for checking the
    /// driver, e.g. that a file really is fragmented).
    pub fn chain(&self, img: &[u8], first: u32) -> Vec<u32> {
        let fat = self.fat_offset as usize;
        let mut out = vec![first];
        let mut c = first as usize;
        loop {
            let v = match self.bits {
                12 => {
                    let raw = u32::from(le16(img, fat + c + c / 2));
                    if c % 2 == 1 {
                        raw >> 4
                    } else {
                        raw & 0xFFF
                    }
                }
                16 => u32::from(le16(img, fat + 2 * c)),
                _ => le32(img, fat + 4 * c) & 0x0FFF_FFFF,
            };
            if v < 2 || u64::from(v) > self.clusters + 1 || out.len() as u64 > self.clusters {
                return out;
            }
            out.push(v);
            c = v as usize;
        }
    }

    /// Number of physically contiguous runs in a chain.
    pub fn runs(chain: &[u32]) -> usize {
        1 + chain.windows(2).filter(|w| w[1] != w[0] + 1).count()
    }
}

pub fn layout(img: &[u8]) -> Layout {
    let bps = u64::from(le16(img, 11));
    let spc = u64::from(img[13]);
    let rsv = u64::from(le16(img, 14));
    let nfats = u64::from(img[16]);
    let root_ents = u64::from(le16(img, 17));
    let fatsz = match le16(img, 22) {
        0 => u64::from(le32(img, 36)),
        n => u64::from(n),
    };
    let tot = match le16(img, 19) {
        0 => u64::from(le32(img, 32)),
        n => u64::from(n),
    };
    let data = rsv + nfats * fatsz + (root_ents * 32).div_ceil(bps);
    let clusters = (tot - data) / spc;
    Layout {
        bps,
        fat_offset: rsv * bps,
        fat_bytes: fatsz * bps,
        data_offset: data * bps,
        cluster_size: spc * bps,
        clusters,
        bits: if le16(img, 22) == 0 {
            32
        } else if clusters < 4085 {
            12
        } else {
            16
        },
    }
}
