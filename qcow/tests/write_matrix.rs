//! Writes qcow2 images through `qcow::Image` while mirroring every operation on a byte model,
//! then checks the result with `qemu-img check` (clean, no leaks), `qemu-img compare` (identical
//! to the model), our own `qcow::check`, and a fresh read. Covers cluster sizes, compat levels,
//! refcount widths (including refcount-table growth), backing files (COW), compressed clusters,
//! discard, write_zeroes, resize, many threads, and `create`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use qcow::{Compat, CreateOptions, Format, Image};
use vm_memory::VolatileSlice;

/// An image open for writing and the model of what it must read.
struct Harness {
    img: Image,
    path: PathBuf,
    data: Vec<u8>,
    /// What an unallocated range shows (the backing chain, zero-extended): a discard may
    /// expose it.
    lower: Vec<u8>,
    cluster: u64,
    rng: Rng,
}

impl Harness {
    fn open(path: &Path, data: Vec<u8>, lower: Vec<u8>, cluster: u64, seed: u64) -> Self {
        let img = open_rw(path);
        assert!(!img.read_only());
        assert_eq!(
            img.size(),
            data.len() as u64,
            "virtual size of {}",
            path.display()
        );
        Harness {
            img,
            path: path.to_path_buf(),
            data,
            lower,
            cluster,
            rng: Rng::new(seed),
        }
    }

    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    #[track_caller]
    fn write(&mut self, off: u64, buf: &[u8]) {
        self.img
            .write_at(off, buf)
            .unwrap_or_else(|e| panic!("write_at({off:#x}, {:#x}): {e}", buf.len()));
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }

    /// The same through `write_vectored`, split into odd pieces.
    #[track_caller]
    fn write_vectored(&mut self, off: u64, buf: &[u8]) {
        let mut copy = buf.to_vec();
        let mut sizes = Vec::new();
        let mut left = buf.len();
        while left > 0 {
            let n = (self.rng.range(1, 20_000) as usize).min(left);
            sizes.push(n);
            left -= n;
        }
        {
            let mut rest: &mut [u8] = &mut copy;
            let mut slices = Vec::new();
            for &n in &sizes {
                let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
                slices.push(VolatileSlice::from(a));
                rest = b;
            }
            self.img
                .write_vectored(off, &slices)
                .unwrap_or_else(|e| panic!("write_vectored({off:#x}, {sizes:?}): {e}"));
        }
        self.data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
    }

    #[track_caller]
    fn zeroes(&mut self, off: u64, len: u64, unmap: bool) {
        self.img
            .write_zeroes(off, len, unmap)
            .unwrap_or_else(|e| panic!("write_zeroes({off:#x}, {len:#x}, {unmap}): {e}"));
        self.data[off as usize..(off + len) as usize].fill(0);
        self.verify(off, len, "after write_zeroes");
    }

    /// Discard: afterwards every byte reads as before, as zero, or as the backing chain.
    #[track_caller]
    fn discard(&mut self, off: u64, len: u64) {
        self.img
            .discard(off, len)
            .unwrap_or_else(|e| panic!("discard({off:#x}, {len:#x}): {e}"));
        let got = read(&self.img, off, len as usize);
        for (i, &b) in got.iter().enumerate() {
            let p = off as usize + i;
            assert!(
                b == self.data[p] || b == 0 || b == self.lower[p],
                "after discard({off:#x}, {len:#x}): byte {p:#x} reads {b:#04x}, not the old \
                 {:#04x}, zero, or the backing's {:#04x}",
                self.data[p],
                self.lower[p]
            );
        }
        self.data[off as usize..(off + len) as usize].copy_from_slice(&got);
    }

    #[track_caller]
    fn verify(&self, off: u64, len: u64, ctx: &str) {
        let got = read(&self.img, off, len as usize);
        assert_bytes_eq(
            &format!(
                "{}: {ctx}: read_at({off:#x}, {len:#x})",
                self.path.display()
            ),
            &self.data[off as usize..(off + len) as usize],
            &got,
        );
    }

    fn verify_all(&self, ctx: &str) {
        assert_bytes_eq(
            &format!("{}: {ctx}: whole disk", self.path.display()),
            &self.data,
            &read_all(&self.img),
        );
    }

    /// A random range of at most `max` bytes, unaligned.
    fn range(&mut self, max: u64) -> (u64, u64) {
        let size = self.size();
        let off = self.rng.below(size);
        let len = self.rng.range(1, max.min(size - off) + 1);
        (off, len)
    }

    /// A random cluster-aligned range of 1..=4 clusters.
    fn aligned(&mut self) -> (u64, u64) {
        let n = self.size() / self.cluster;
        let c = self.rng.below(n);
        let len = self.rng.range(1, 5).min(n - c);
        (c * self.cluster, len * self.cluster)
    }

    fn random_ops(&mut self, n: u64, with_discard: bool) {
        let max = (3 * self.cluster).clamp(4 * KIB, 200 * KIB);
        for i in 0..n {
            let seed = self.rng.next_u64();
            match self.rng.below(100) {
                0..=29 => {
                    let (off, len) = self.range(max);
                    self.write(off, &pattern(seed, len as usize));
                }
                30..=39 => {
                    let (off, len) = self.range(max);
                    self.write_vectored(off, &pattern(seed, len as usize));
                }
                40..=54 => {
                    let (off, len) = self.aligned();
                    self.write(off, &pattern(seed, len as usize));
                }
                55..=69 => {
                    // Partial cluster: a small write inside one cluster.
                    let c = self.rng.below(self.size() / self.cluster);
                    let a = self.rng.below(self.cluster);
                    let len = self.rng.range(1, self.cluster - a + 1).min(9000);
                    self.write(c * self.cluster + a, &pattern(seed, len as usize));
                }
                70..=79 => {
                    let (off, len) = if i % 2 == 0 {
                        self.aligned()
                    } else {
                        self.range(max)
                    };
                    let unmap = self.rng.chance(50);
                    self.zeroes(off, len, unmap);
                }
                80..=87 if with_discard => {
                    let (off, len) = if i % 2 == 0 {
                        self.aligned()
                    } else {
                        self.range(max)
                    };
                    self.discard(off, len);
                }
                _ => {
                    let (off, len) = self.range(max);
                    self.verify(off, len, &format!("random op {i}"));
                }
            }
        }
    }

    /// Writes [from, to) front to back in odd-sized chunks.
    fn sequential(&mut self, from: u64, to: u64, chunk: u64) {
        let mut off = from;
        while off < to {
            let len = chunk.min(to - off);
            let seed = self.rng.next_u64();
            self.write(off, &pattern(seed, len as usize));
            off += len;
        }
    }

    /// Verifies through the open image, closes it, and runs the closing checks.
    fn finish(self) -> Vec<u8> {
        self.verify_all("before close");
        self.img.flush().expect("flush");
        self.img.close().expect("close");
        verify_closed_image(&self.path, &self.data);
        self.data
    }
}

// ---------------------------------------------------------------------------------------------
// The matrix: cluster sizes x compat x refcount widths, on images made by qemu-img create.

fn matrix(cluster: u64, compat: &str, bits: u32, seed: u64) {
    let dir = tmp();
    let path = dir.path().join("w.qcow2");
    let size = if cluster == 512 { 4 * MIB } else { 8 * MIB } - 1536;
    qemu_create(
        &path,
        "qcow2",
        &format!("cluster_size={cluster},compat={compat},refcount_bits={bits}"),
        size,
    );
    let zero = vec![0u8; size as usize];
    let mut h = Harness::open(&path, zero.clone(), zero, cluster, seed);
    h.sequential(0, size / 4, 100_003);
    h.random_ops(300, true);
    h.verify_all("after random ops");
    let data = h.finish();

    // Reopen and keep writing: allocation must continue cleanly from an existing image.
    let mut h = Harness::open(&path, data, vec![0; size as usize], cluster, seed + 1);
    h.random_ops(100, true);
    h.finish();
}

macro_rules! matrix_tests {
    ($($name:ident: $cluster:expr, $compat:expr, $bits:expr;)*) => {$(
        #[test]
        fn $name() {
            matrix($cluster, $compat, $bits, line!() as u64);
        }
    )*};
}

matrix_tests! {
    v2_512_rc16: 512, "0.10", 16;
    v3_512_rc1: 512, "1.1", 1;
    v3_512_rc16: 512, "1.1", 16;
    v3_512_rc64: 512, "1.1", 64;
    v2_4k_rc16: 4096, "0.10", 16;
    v3_4k_rc1: 4096, "1.1", 1;
    v3_4k_rc16: 4096, "1.1", 16;
    v3_4k_rc64: 4096, "1.1", 64;
    v2_64k_rc16: 65536, "0.10", 16;
    v3_64k_rc1: 65536, "1.1", 1;
    v3_64k_rc16: 65536, "1.1", 16;
    v3_64k_rc64: 65536, "1.1", 64;
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters (32 KiB)
/// and the initial one-cluster refcount table 64 blocks (2 MiB of file), so writing 6 MiB
/// must grow the refcount table (and allocate many refcount blocks).
#[test]
fn refcount_table_growth_512_rc64() {
    let dir = tmp();
    let path = dir.path().join("g.qcow2");
    let size = 16 * MIB;
    qemu_create(&path, "qcow2", "cluster_size=512,refcount_bits=64", size);
    let before = get_be32(&path, hdr::REFCOUNT_TABLE_CLUSTERS);
    let zero = vec![0u8; size as usize];
    let mut h = Harness::open(&path, zero.clone(), zero, 512, 77);
    h.sequential(MIB, 7 * MIB, 65536 + 512);
    h.random_ops(100, false);
    h.finish();
    let after = get_be32(&path, hdr::REFCOUNT_TABLE_CLUSTERS);
    assert!(
        after > before,
        "test setup: refcount table did not grow ({before} -> {after} clusters)"
    );
}

/// The same growth with 1-bit refcounts and a big write burst (table growth unlikely, but many
/// refcount blocks whose entries are single bits).
#[test]
fn many_refblocks_512_rc1() {
    let dir = tmp();
    let path = dir.path().join("g1.qcow2");
    let size = 8 * MIB;
    qemu_create(&path, "qcow2", "cluster_size=512,refcount_bits=1", size);
    let zero = vec![0u8; size as usize];
    let mut h = Harness::open(&path, zero.clone(), zero, 512, 78);
    h.sequential(0, 5 * MIB, 30_001);
    h.random_ops(100, true);
    h.finish();
}

// ---------------------------------------------------------------------------------------------
// Many threads.

/// 8 threads write disjoint byte ranges that share clusters (units of 3/8 cluster, dealt out
/// round-robin), each reading back its own writes; the merged result must be exact.
fn threads_disjoint(cluster: u64, size: u64, seed: u64) {
    let dir = tmp();
    let path = dir.path().join("t.qcow2");
    qemu_create(&path, "qcow2", &format!("cluster_size={cluster}"), size);
    let img = Arc::new(open_rw(&path));
    let unit = cluster * 3 / 8;
    let units = size / unit;
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                let mut r = Rng::new(seed * 31 + t);
                let mut mine: Vec<(u64, Vec<u8>)> = Vec::new();
                let owned: Vec<u64> = (0..units).filter(|u| u % 8 == t).collect();
                for i in 0..owned.len() * 2 {
                    let u = owned[r.below(owned.len() as u64) as usize];
                    let a = r.below(unit);
                    let len = r.range(1, unit - a + 1);
                    let off = u * unit + a;
                    let buf = if i % 7 == 6 {
                        img.write_zeroes(off, len, r.chance(50))
                            .unwrap_or_else(|e| panic!("thread {t}: write_zeroes: {e}"));
                        vec![0; len as usize]
                    } else {
                        let buf = pattern(r.next_u64(), len as usize);
                        img.write_at(off, &buf)
                            .unwrap_or_else(|e| panic!("thread {t}: write_at: {e}"));
                        buf
                    };
                    let mut back = vec![0; len as usize];
                    img.read_at(off, &mut back)
                        .unwrap_or_else(|e| panic!("thread {t}: read_at: {e}"));
                    assert_bytes_eq(
                        &format!("thread {t}: read back ({off:#x}, {len:#x})"),
                        &buf,
                        &back,
                    );
                    mine.push((off, buf));
                }
                mine
            })
        })
        .collect();
    let mut model = vec![0u8; size as usize];
    for h in handles {
        for (off, buf) in h.join().expect("writer thread panicked") {
            model[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
    }
    let img = Arc::into_inner(img).unwrap();
    assert_bytes_eq("after 8 disjoint writers", &model, &read_all(&img));
    img.close().expect("close");
    verify_closed_image(&path, &model);
}

#[test]
fn threads_disjoint_64k() {
    threads_disjoint(65536, 4 * MIB, 91);
}

#[test]
fn threads_disjoint_512() {
    threads_disjoint(512, MIB, 92);
}

#[test]
fn threads_disjoint_4k_over_backing() {
    // Same, but every allocation is a COW from a backing file full of data.
    let dir = tmp();
    let base_raw = dir.path().join("base.raw");
    let base = pattern(93, 2 * MIB as usize);
    std::fs::write(&base_raw, &base).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_create_overlay(&top, "base.raw", "raw", "cluster_size=4096", None);
    let img = Arc::new(open_rw(&top));
    let unit = 4096 * 3 / 8;
    let units = 2 * MIB / unit;
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let img = Arc::clone(&img);
            std::thread::spawn(move || {
                let mut r = Rng::new(930 + t);
                let mut mine = Vec::new();
                for u in (0..units).filter(|u| u % 8 == t) {
                    let a = r.below(unit);
                    let len = r.range(1, unit - a + 1);
                    let buf = pattern(r.next_u64(), len as usize);
                    img.write_at(u * unit + a, &buf)
                        .unwrap_or_else(|e| panic!("thread {t}: write_at: {e}"));
                    mine.push((u * unit + a, buf));
                }
                mine
            })
        })
        .collect();
    let mut model = base.clone();
    for h in handles {
        for (off, buf) in h.join().expect("writer thread panicked") {
            model[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
        }
    }
    let img = Arc::into_inner(img).unwrap();
    assert_bytes_eq(
        "after 8 disjoint writers over backing",
        &model,
        &read_all(&img),
    );
    img.close().expect("close");
    verify_closed_image(&top, &model);
    assert_bytes_eq(
        "backing file untouched",
        &base,
        &std::fs::read(&base_raw).unwrap(),
    );
}

/// 8 threads write overlapping ranges, thread t always with byte t+1. Afterwards each byte is
/// 0 only where nobody wrote, else the value of one of the threads that wrote it (a lost
/// cluster allocation shows up as zeroes or stale bytes).
#[test]
fn threads_overlapping() {
    for (cluster, size) in [(65536u64, 2 * MIB), (4096, MIB)] {
        let dir = tmp();
        let path = dir.path().join("o.qcow2");
        qemu_create(&path, "qcow2", &format!("cluster_size={cluster}"), size);
        let img = Arc::new(open_rw(&path));
        let handles: Vec<_> = (0..8u64)
            .map(|t| {
                let img = Arc::clone(&img);
                std::thread::spawn(move || {
                    let mut r = Rng::new(1000 + t);
                    let mut ranges = Vec::new();
                    for _ in 0..150 {
                        let off = r.below(size);
                        let len = r.range(1, (3 * cluster).min(size - off) + 1);
                        img.write_at(off, &vec![t as u8 + 1; len as usize])
                            .unwrap_or_else(|e| panic!("thread {t}: write_at: {e}"));
                        ranges.push((off, len));
                    }
                    ranges
                })
            })
            .collect();
        // Bit t of writers[p]: thread t wrote byte p.
        let mut writers = vec![0u8; size as usize];
        for (t, h) in handles.into_iter().enumerate() {
            for (off, len) in h.join().expect("writer thread panicked") {
                for w in &mut writers[off as usize..(off + len) as usize] {
                    *w |= 1 << t;
                }
            }
        }
        let img = Arc::into_inner(img).unwrap();
        let got = read_all(&img);
        for (p, (&b, &w)) in got.iter().zip(&writers).enumerate() {
            let ok = if b == 0 {
                w == 0
            } else {
                b <= 8 && w & (1 << (b - 1)) != 0
            };
            assert!(
                ok,
                "cluster {cluster}: byte {p:#x} reads {b:#04x} but the threads that wrote it \
                 (bitmask {w:#010b}) wrote values t+1"
            );
        }
        img.close().expect("close");
        verify_closed_image(&path, &got);
    }
}

// ---------------------------------------------------------------------------------------------
// Backing files: COW across the backing boundary; the backing file is never written.

fn cow_over_backing(
    base_opts: Option<&str>,
    top_opts: &str,
    top_cluster: u64,
    use_our_create: bool,
    seed: u64,
) {
    let dir = tmp();
    let d = dir.path();
    let base_size = 3 * MIB + 1024;
    let (base_data, runs) = make_disk(seed, base_size, 80 * KIB, 128 * KIB);
    let raw = d.join("base.raw");
    write_disk_raw(&raw, &base_data, &runs);
    let (base_name, base_fmt) = match base_opts {
        Some(o) => {
            qemu_convert_to_qcow2(&raw, &d.join("base.qcow2"), o, false);
            ("base.qcow2", "qcow2")
        }
        None => ("base.raw", "raw"),
    };
    let base_path = d.join(base_name);
    let base_before = std::fs::read(&base_path).unwrap();
    let top = d.join("top.qcow2");
    let size = 6 * MIB;
    if use_our_create {
        let compat = if top_opts.contains("compat=0.10") {
            Compat::V2
        } else {
            Compat::V3
        };
        qcow::create(
            &top,
            &CreateOptions {
                format: Format::Qcow2,
                size: Some(size),
                cluster_size: top_cluster as u32,
                refcount_bits: 16,
                compat,
                backing_file: Some(base_name.to_string()),
                backing_format: Some(base_fmt.parse().unwrap()),
            },
        )
        .expect("qcow::create overlay");
    } else {
        qemu_create_overlay(&top, base_name, base_fmt, top_opts, Some(size));
    }
    let mut lower = base_data.clone();
    lower.resize(size as usize, 0);
    let mut h = Harness::open(&top, lower.clone(), lower, top_cluster, seed);
    // Partial writes into clusters that are still in the backing file, straddling its end.
    h.write(5, &[1, 2, 3]);
    h.write(base_size - 700, &pattern(seed, 3000));
    h.write(top_cluster + 17, &pattern(seed + 1, 100));
    h.random_ops(250, true);
    h.finish();
    assert_bytes_eq(
        "backing file bytes unchanged",
        &base_before,
        &std::fs::read(&base_path).unwrap(),
    );
}

#[test]
fn cow_raw_base_64k_overlay() {
    cow_over_backing(None, "cluster_size=65536", 65536, false, 101);
}

#[test]
fn cow_qcow2_4k_base_64k_overlay() {
    cow_over_backing(
        Some("cluster_size=4096"),
        "cluster_size=65536",
        65536,
        false,
        102,
    );
}

#[test]
fn cow_qcow2_64k_base_4k_v2_overlay() {
    cow_over_backing(
        Some("cluster_size=65536"),
        "cluster_size=4096,compat=0.10",
        4096,
        false,
        103,
    );
}

#[test]
fn cow_our_create_v2_512_overlay() {
    cow_over_backing(
        Some("cluster_size=65536,compat=0.10"),
        "compat=0.10",
        512,
        true,
        104,
    );
}

#[test]
fn cow_our_create_v3_64k_overlay_raw_base() {
    cow_over_backing(None, "", 65536, true, 105);
}

/// Writing extended-L2 images is a documented limitation: a writable open is refused with a
/// clear bad-input error and leaves the file alone; read-only works.
#[test]
fn extended_l2_writable_open_refused() {
    let dir = tmp();
    let p = dir.path().join("e.qcow2");
    qemu_create(&p, "qcow2", "cluster_size=65536,extended_l2=on", MIB);
    let before = std::fs::read(&p).unwrap();
    match Image::open(&p, &opts(true, None)) {
        Ok(_) => panic!(
            "writable open of an extended-L2 image succeeded; if writing is now \
                         supported, turn this into a COW test"
        ),
        Err(e) => {
            assert!(e.is_bad_input(), "{e:?}");
            assert!(
                e.to_string().contains("extended L2"),
                "unclear message: {e}"
            );
        }
    }
    assert_eq!(
        before,
        std::fs::read(&p).unwrap(),
        "refused open modified the file"
    );
    let img = open_ro(&p);
    assert!(img.info().qcow2.unwrap().extended_l2);
    img.close().unwrap();
}

#[test]
fn cow_three_deep() {
    // base raw -> mid qcow2 (written by qemu) -> top (written by us).
    let dir = tmp();
    let d = dir.path();
    let base = pattern(111, 2 * MIB as usize);
    std::fs::write(d.join("base.raw"), &base).unwrap();
    let mid = d.join("mid.qcow2");
    qemu_create_overlay(&mid, "base.raw", "raw", "cluster_size=4096", Some(3 * MIB));
    let mut model = base.clone();
    model.resize(3 * MIB as usize, 0);
    let mut io = QemuIo::new(d);
    io.pattern(&mut model, 1000, 70_000, 0x31);
    io.zero(&mut model, 200_000, 65536, false);
    io.pattern(&mut model, 2 * MIB - 10, 20, 0x32);
    io.run(&mid, "qcow2");
    let top = d.join("top.qcow2");
    qemu_create_overlay(&top, s(&mid), "qcow2", "cluster_size=65536", Some(4 * MIB));
    model.resize(4 * MIB as usize, 0);
    let lower = model.clone();
    let mut h = Harness::open(&top, model, lower, 65536, 112);
    h.random_ops(200, true);
    h.finish();
}

// ---------------------------------------------------------------------------------------------
// Writes into compressed clusters.

fn compressed_cow(opts: &str, cluster: u64, seed: u64) {
    let dir = tmp();
    let raw = dir.path().join("src.raw");
    let path = dir.path().join("c.qcow2");
    let size = 3 * MIB;
    let data = compressible(seed, size as usize);
    std::fs::write(&raw, &data).unwrap();
    qemu_convert_to_qcow2(&raw, &path, &format!("cluster_size={cluster},{opts}"), true);
    assert!(
        qemu_compressed_clusters(&path) > 0,
        "test setup: nothing compressed"
    );
    let zero = vec![0u8; size as usize];
    let mut h = Harness::open(&path, data, zero, cluster, seed);
    // Small writes into compressed clusters (COW must decompress the rest).
    for c in (0..size / cluster).step_by(3) {
        let off = c * cluster + h.rng.below(cluster - 8);
        h.write(off, &[0xc0, 0xff, 0xee]);
    }
    // Whole-cluster overwrites, zeroes and discards of compressed clusters.
    for c in (1..size / cluster).step_by(7) {
        let seed = h.rng.next_u64();
        h.write(c * cluster, &pattern(seed, cluster as usize));
    }
    for c in (2..size / cluster).step_by(11) {
        h.zeroes(c * cluster, cluster, c % 2 == 0);
    }
    for c in (4..size / cluster).step_by(13) {
        h.discard(c * cluster, cluster);
    }
    h.random_ops(100, true);
    h.finish();
}

#[test]
fn compressed_cow_zlib_64k() {
    compressed_cow("compression_type=zlib", 65536, 121);
}

#[test]
fn compressed_cow_zstd_4k() {
    compressed_cow("compression_type=zstd", 4096, 122);
}

#[test]
fn compressed_cow_v2_zlib_4k() {
    compressed_cow("compat=0.10", 4096, 123);
}

// ---------------------------------------------------------------------------------------------
// write_zeroes on whole clusters is visible in map (v3 zero flag / deallocation).

#[test]
fn write_zeroes_whole_clusters_map_zero() {
    for unmap in [false, true] {
        let dir = tmp();
        let path = dir.path().join("z.qcow2");
        qemu_create(&path, "qcow2", "cluster_size=65536", 2 * MIB);
        let zero = vec![0u8; 2 * MIB as usize];
        let mut h = Harness::open(&path, zero.clone(), zero, 65536, 131);
        h.sequential(0, 2 * MIB, 65536);
        h.zeroes(4 * 65536, 3 * 65536, unmap);
        let ext = h.img.map(4 * 65536, 3 * 65536).expect("map");
        assert!(
            ext.iter().all(|e| e.zero),
            "unmap={unmap}: write_zeroes of whole clusters, but map says {ext:?}"
        );
        h.finish();
    }
}

/// write_zeroes over a range that crosses a cluster boundary without covering a whole
/// cluster, longer than one cluster (e.g. [100, 100+70000) with 64 KiB clusters).
#[test]
fn write_zeroes_across_boundary_without_whole_cluster() {
    for (cluster, off, len) in [
        (65536u64, 100u64, 70_000u64),
        (512, 1, 1000),
        (4096, 4000, 4100),
    ] {
        for unmap in [false, true] {
            let dir = tmp();
            let path = dir.path().join("wz.qcow2");
            qemu_create(&path, "qcow2", &format!("cluster_size={cluster}"), MIB);
            let zero = vec![0u8; MIB as usize];
            let mut h = Harness::open(&path, zero.clone(), zero, cluster, 132);
            h.write(0, &pattern(133, 3 * cluster as usize));
            h.zeroes(off, len, unmap);
            h.finish();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resize.

#[test]
fn resize_grow() {
    for (cluster, compat) in [(512u64, "1.1"), (65536, "0.10"), (4096, "1.1")] {
        let dir = tmp();
        let path = dir.path().join("r.qcow2");
        let size = 3 * MIB + 512;
        qemu_create(
            &path,
            "qcow2",
            &format!("cluster_size={cluster},compat={compat}"),
            size,
        );
        let zero = vec![0u8; size as usize];
        let mut h = Harness::open(&path, zero.clone(), zero, cluster, 141);
        h.random_ops(60, false);
        // Grow to an unaligned size; with 512-byte clusters the L1 table must grow too
        // (one L2 covers 32 KiB: 3 MiB needs 2 clusters of L1, 12 MiB 6 clusters).
        let new = 12 * MIB + 1536;
        h.img.resize(new, false).expect("resize grow");
        assert_eq!(h.img.size(), new);
        h.data.resize(new as usize, 0);
        h.lower.resize(new as usize, 0);
        h.verify(size - 1000, 100_000, "the new area reads as zeroes");
        h.write(new - 3000, &pattern(142, 3000));
        h.write(size - 10, &pattern(143, 20));
        h.write(10 * MIB + 5, &pattern(144, 70_000));
        h.random_ops(60, true);
        h.finish();
        let q = qemu_info(&path);
        assert_eq!(
            q["virtual-size"].as_u64(),
            Some(new),
            "qemu-img info after resize"
        );
    }
}

#[test]
fn resize_grow_overlay_past_backing() {
    let dir = tmp();
    let base = pattern(151, MIB as usize);
    std::fs::write(dir.path().join("base.raw"), &base).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_create_overlay(&top, "base.raw", "raw", "cluster_size=4096", None);
    let mut h = Harness::open(&top, base.clone(), base, 4096, 152);
    h.img.resize(3 * MIB, false).expect("resize grow");
    h.data.resize(3 * MIB as usize, 0);
    h.lower.resize(3 * MIB as usize, 0);
    h.verify(MIB - 4096, 8192, "across the old end");
    h.write(MIB - 100, &pattern(153, 300));
    h.random_ops(80, true);
    h.finish();
}

#[test]
fn resize_shrink() {
    let dir = tmp();
    let path = dir.path().join("s.qcow2");
    qemu_create(&path, "qcow2", "cluster_size=65536", 8 * MIB);
    let zero = vec![0u8; 8 * MIB as usize];
    let mut h = Harness::open(&path, zero.clone(), zero, 65536, 161);
    h.write(100, &pattern(162, 2 * MIB as usize));
    h.write(5 * MIB + 7, &[9; 100]);
    // Data past the new end: refused, nothing changed.
    assert!(
        h.img.resize(4 * MIB, true).is_err(),
        "shrink over data must fail"
    );
    assert_eq!(h.img.size(), 8 * MIB);
    h.verify_all("after refused shrink");
    // shrink=false never shrinks.
    assert!(
        h.img.resize(6 * MIB, false).is_err(),
        "shrinking without shrink=true must fail"
    );
    assert_eq!(h.img.size(), 8 * MIB);
    // Zero the cluster holding the data past the new end, then shrinking works.
    h.zeroes(5 * MIB, 65536, true);
    h.img
        .resize(4 * MIB + 512, true)
        .expect("shrink over zeroes");
    assert_eq!(h.img.size(), 4 * MIB + 512);
    h.data.truncate((4 * MIB + 512) as usize);
    h.lower.truncate((4 * MIB + 512) as usize);
    h.random_ops(50, true);
    h.finish();
    assert_eq!(
        qemu_info(&path)["virtual-size"].as_u64(),
        Some(4 * MIB + 512)
    );
}

/// "shrink when nothing but zeroes lies past the new end": a cluster that was written and then
/// zeroed only in part (so it stays allocated, holding zeroes) is nothing but zeroes.
#[test]
fn resize_shrink_over_zeroed_partial_cluster() {
    let dir = tmp();
    let path = dir.path().join("s.qcow2");
    qemu_create(&path, "qcow2", "cluster_size=65536", 8 * MIB);
    let zero = vec![0u8; 8 * MIB as usize];
    let mut h = Harness::open(&path, zero.clone(), zero, 65536, 165);
    h.write(5 * MIB + 7, &[9; 100]);
    h.zeroes(5 * MIB, 107, true);
    h.img
        .resize(4 * MIB, true)
        .expect("shrink: only zeroes lie past the new end");
    h.data.truncate(4 * MIB as usize);
    h.lower.truncate(4 * MIB as usize);
    h.finish();
}

// ---------------------------------------------------------------------------------------------
// create.

fn create_and_compare(cluster: u32, bits: u32, compat: Compat, size: u64) {
    let dir = tmp();
    let path = dir.path().join("n.qcow2");
    qcow::create(
        &path,
        &CreateOptions {
            format: Format::Qcow2,
            size: Some(size),
            cluster_size: cluster,
            refcount_bits: bits,
            compat,
            backing_file: None,
            backing_format: None,
        },
    )
    .unwrap_or_else(|e| panic!("create {cluster} {bits} {compat:?}: {e}"));
    let q = qemu_info(&path);
    let ctx = format!("{q:#}");
    assert_eq!(q["format"], "qcow2", "{ctx}");
    assert_eq!(q["virtual-size"].as_u64(), Some(size), "{ctx}");
    assert_eq!(
        q["cluster-size"].as_u64(),
        Some(u64::from(cluster)),
        "{ctx}"
    );
    let d = &q["format-specific"]["data"];
    let compat_s = match compat {
        Compat::V2 => "0.10",
        Compat::V3 => "1.1",
    };
    assert_eq!(d["compat"], compat_s, "{ctx}");
    assert_eq!(d["refcount-bits"].as_u64(), Some(u64::from(bits)), "{ctx}");
    assert!(q["backing-filename"].is_null(), "{ctx}");
    assert_qemu_check_clean(&path);
    let report = qcow::check(&path, false).expect("qcow::check");
    assert!(report.is_clean(), "{report:?}");
    // Usable: write through us, compare through qemu.
    let zero = vec![0u8; size as usize];
    let mut h = Harness::open(
        &path,
        zero.clone(),
        zero,
        u64::from(cluster),
        u64::from(cluster + bits),
    );
    h.random_ops(if cluster >= 1 << 20 { 10 } else { 40 }, true);
    h.finish();
}

#[test]
fn create_matrix() {
    create_and_compare(65536, 16, Compat::V3, 4 * MIB);
    create_and_compare(65536, 16, Compat::V2, 4 * MIB + 512);
    create_and_compare(512, 64, Compat::V3, 2 * MIB);
    create_and_compare(4096, 1, Compat::V3, 3 * MIB);
    create_and_compare(2 << 20, 8, Compat::V3, 6 * MIB);
    create_and_compare(4096, 16, Compat::V2, MIB);
}

#[test]
fn create_defaults_match_qemu_defaults() {
    let dir = tmp();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    qcow::create(
        &ours,
        &CreateOptions {
            size: Some(10 * MIB),
            ..Default::default()
        },
    )
    .expect("create");
    qemu_create(&theirs, "qcow2", "", 10 * MIB);
    let (a, b) = (qemu_info(&ours), qemu_info(&theirs));
    for k in ["virtual-size", "cluster-size", "format"] {
        assert_eq!(a[k], b[k], "{k}");
    }
    for k in ["compat", "refcount-bits", "extended-l2", "lazy-refcounts"] {
        assert_eq!(
            a["format-specific"]["data"][k], b["format-specific"]["data"][k],
            "format-specific {k}"
        );
    }
}

#[test]
fn create_with_backing() {
    let dir = tmp();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_create(&base, "qcow2", "cluster_size=4096", 5 * MIB + 512);
    let mut model = vec![0u8; (5 * MIB + 512) as usize];
    let mut io = QemuIo::new(d);
    io.write(&mut model, 12345, &pattern(171, 100_000));
    io.run(&base, "qcow2");

    // Size taken from the backing file; relative name; format probed when not given.
    let top = d.join("top.qcow2");
    qcow::create(
        &top,
        &CreateOptions {
            backing_file: Some("base.qcow2".into()),
            ..Default::default()
        },
    )
    .expect("create with backing");
    let q = qemu_info(&top);
    assert_eq!(q["virtual-size"].as_u64(), Some(5 * MIB + 512), "{q:#}");
    assert_eq!(q["backing-filename"], "base.qcow2", "{q:#}");
    assert_eq!(
        std::fs::canonicalize(q["full-backing-filename"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&base).unwrap()
    );
    assert_qemu_check_clean(&top);
    assert_bytes_eq(
        "overlay reads the backing",
        &model,
        &read_all(&open_ro(&top)),
    );

    // Explicit format and size, absolute backing path: the header records both.
    let top2 = d.join("top2.qcow2");
    qcow::create(
        &top2,
        &CreateOptions {
            size: Some(7 * MIB),
            backing_file: Some(s(&base).to_string()),
            backing_format: Some(Format::Qcow2),
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .expect("create with backing and size");
    let q = qemu_info(&top2);
    assert_eq!(q["virtual-size"].as_u64(), Some(7 * MIB), "{q:#}");
    assert_eq!(q["backing-filename"].as_str(), Some(s(&base)), "{q:#}");
    assert_eq!(q["backing-filename-format"], "qcow2", "{q:#}");
    model.resize(7 * MIB as usize, 0);
    assert_bytes_eq("bigger overlay", &model, &read_all(&open_ro(&top2)));

    // A raw backing file.
    std::fs::write(d.join("b.raw"), pattern(172, MIB as usize)).unwrap();
    let top3 = d.join("top3.qcow2");
    qcow::create(
        &top3,
        &CreateOptions {
            backing_file: Some("b.raw".into()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        },
    )
    .expect("create over raw");
    assert_eq!(qemu_info(&top3)["backing-filename-format"], "raw");
    assert_bytes_eq(
        "overlay over raw",
        &pattern(172, MIB as usize),
        &read_all(&open_ro(&top3)),
    );
}

#[test]
fn create_refuses_bad_requests() {
    let dir = tmp();
    let d = dir.path();
    let exists = d.join("exists.qcow2");
    std::fs::write(&exists, b"precious").unwrap();
    let e = qcow::create(
        &exists,
        &CreateOptions {
            size: Some(MIB),
            ..Default::default()
        },
    );
    assert!(e.is_err(), "create over an existing file must fail");
    assert_eq!(std::fs::read(&exists).unwrap(), b"precious");

    let bad = |name: &str, o: CreateOptions, bad_input: bool| {
        let p = d.join(name);
        let r = qcow::create(&p, &o);
        assert!(r.is_err(), "{name}: create({o:?}) should fail");
        if bad_input {
            assert!(
                r.unwrap_err().is_bad_input(),
                "{name}: should be a bad-input error"
            );
        }
    };
    let base = CreateOptions {
        size: Some(MIB),
        ..Default::default()
    };
    bad(
        "missing-backing",
        CreateOptions {
            size: None,
            backing_file: Some("nope.qcow2".into()),
            ..Default::default()
        },
        false,
    );
    let cases = [
        (
            "no-size",
            CreateOptions {
                size: None,
                ..base.clone()
            },
        ),
        (
            "cluster-1000",
            CreateOptions {
                cluster_size: 1000,
                ..base.clone()
            },
        ),
        (
            "cluster-256",
            CreateOptions {
                cluster_size: 256,
                ..base.clone()
            },
        ),
        (
            "cluster-4m",
            CreateOptions {
                cluster_size: 4 << 20,
                ..base.clone()
            },
        ),
        (
            "refcount-3",
            CreateOptions {
                refcount_bits: 3,
                ..base.clone()
            },
        ),
        (
            "refcount-128",
            CreateOptions {
                refcount_bits: 128,
                ..base.clone()
            },
        ),
        (
            "v2-refcount-64",
            CreateOptions {
                refcount_bits: 64,
                compat: Compat::V2,
                ..base.clone()
            },
        ),
        (
            "raw-with-backing",
            CreateOptions {
                format: Format::Raw,
                backing_file: Some(s(&exists).to_string()),
                ..base.clone()
            },
        ),
    ];
    for (name, o) in cases {
        bad(name, o, true);
        assert!(
            !d.join(name).exists(),
            "{name}: failed create left a file behind"
        );
    }
}

#[test]
fn create_raw() {
    let dir = tmp();
    let p = dir.path().join("r.img");
    qcow::create(
        &p,
        &CreateOptions {
            format: Format::Raw,
            size: Some(3 * MIB + 512),
            ..Default::default()
        },
    )
    .expect("create raw");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 3 * MIB + 512);
    assert_eq!(qcow::probe(&p).unwrap(), Format::Raw);
    // Writing a raw image through Image.
    let img = Image::open(&p, &opts(true, Some(Format::Raw))).expect("open raw rw");
    let mut model = vec![0u8; (3 * MIB + 512) as usize];
    let mut r = Rng::new(181);
    for _ in 0..50 {
        let off = r.below(model.len() as u64 - 70_000);
        let buf = pattern(r.next_u64(), r.range(1, 70_000) as usize);
        img.write_at(off, &buf).expect("raw write");
        model[off as usize..off as usize + buf.len()].copy_from_slice(&buf);
    }
    img.write_zeroes(1000, 5000, true)
        .expect("raw write_zeroes");
    model[1000..6000].fill(0);
    img.close().expect("close");
    assert_bytes_eq("raw file", &model, &std::fs::read(&p).unwrap());
}

#[test]
fn read_only_image_refuses_writes() {
    let dir = tmp();
    let p = dir.path().join("ro.qcow2");
    qemu_create(&p, "qcow2", "", MIB);
    let before = std::fs::read(&p).unwrap();
    let img = open_ro(&p);
    assert!(img.read_only());
    assert!(img.write_at(0, &[1; 512]).is_err());
    assert!(img.write_zeroes(0, 4096, true).is_err());
    assert!(img.discard(0, 65536).is_err());
    assert!(img.resize(2 * MIB, false).is_err());
    img.close().unwrap();
    assert_eq!(
        before,
        std::fs::read(&p).unwrap(),
        "read-only image modified"
    );
}
