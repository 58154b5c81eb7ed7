//! Reads qcow2 images made by qemu-img/qemu-io (and raw files) through `qcow::Image` and checks
//! every byte against the model the image was built from and against `qemu-img convert -O raw`.
//! Covers cluster sizes, compat levels, refcount widths, zero clusters, compressed clusters
//! (zlib, zstd), extended L2 (subclusters), 3-deep backing chains (raw and qcow2 bases,
//! relative and absolute paths, smaller bases), plus `map` and `info`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qcow::{Format, Image, ImageInfo};
use vm_memory::VolatileSlice;

/// Everything an image check needs. `dir` keeps the files alive.
struct Built {
    dir: tempfile::TempDir,
    img: PathBuf,
    data: Vec<u8>,
}

/// A raw disk of `size` bytes (see `make_disk`) converted to qcow2 with `opts`.
fn build(seed: u64, size: u64, cluster: u64, opts: &str, compress: bool) -> Built {
    let dir = tmp();
    let raw = dir.path().join("src.raw");
    let img = dir.path().join("img.qcow2");
    let max_run = (cluster * 3).clamp(8 * KIB, 256 * KIB);
    let (data, runs) = make_disk(seed, size, max_run, (2 * cluster).max(64 * KIB));
    write_disk_raw(&raw, &data, &runs);
    qemu_convert_to_qcow2(&raw, &img, opts, compress);
    Built { dir, img, data }
}

/// The full read check of one image whose content must be `expected`.
fn check_image(path: &Path, expected: &[u8], format: Format, cluster: u64, seed: u64) {
    // Validate the test itself first: qemu must agree with the model.
    let oracle = qemu_read_all(path, None);
    assert_bytes_eq(
        "qemu-img convert -O raw vs model (test setup)",
        expected,
        &oracle,
    );

    let img = open_ro(path);
    assert_eq!(img.size(), expected.len() as u64, "virtual size");
    assert_eq!(img.format(), format, "format");
    assert!(img.read_only(), "opened read-only");
    assert_bytes_eq("read_at over the whole disk", expected, &read_all(&img));
    check_random_reads(&img, expected, cluster, seed);
    check_vectored(&img, expected, seed);
    check_map(&img, expected, 0, expected.len() as u64);
    let mut r = Rng::new(seed ^ 0x3a9);
    for _ in 0..8 {
        let off = r.below(expected.len() as u64);
        let len = r.range(1, expected.len() as u64 - off + 1);
        check_map(&img, expected, off, len);
    }
    check_info(&img.info(), path);
    img.close().expect("close");
}

/// Reads at odd offsets/lengths, most of them crossing cluster boundaries.
fn check_random_reads(img: &Image, expected: &[u8], cluster: u64, seed: u64) {
    let size = expected.len() as u64;
    let mut r = Rng::new(seed ^ 0x5eed);
    let max_len = (3 * cluster).min(256 * KIB);
    for i in 0..200 {
        let (off, len) = if i % 2 == 0 {
            // Straddle a cluster boundary.
            let b = r.below(size / cluster + 1) * cluster;
            let off = b.saturating_sub(r.range(1, 1500)).min(size - 1);
            (off, r.range(1, max_len).min(size - off))
        } else {
            let off = r.below(size);
            (off, r.range(1, max_len).min(size - off))
        };
        let got = read(img, off, len as usize);
        assert_bytes_eq(
            &format!("read_at({off:#x}, {len:#x})"),
            &expected[off as usize..(off + len) as usize],
            &got,
        );
    }
    // The very end of the disk.
    for len in [1u64, 511, 513, 4097] {
        let len = len.min(size);
        let off = size - len;
        assert_bytes_eq(
            &format!("read_at({off:#x}, {len}) at the end"),
            &expected[off as usize..],
            &read(img, off, len as usize),
        );
    }
    // Zero-length read at offset 0 is a no-op.
    img.read_at(0, &mut []).expect("zero-length read");
}

/// `read_vectored` with buffers of odd sizes matches `expected`.
fn check_vectored(img: &Image, expected: &[u8], seed: u64) {
    let size = expected.len() as u64;
    let mut r = Rng::new(seed ^ 0x7ec);
    for _ in 0..20 {
        let sizes: Vec<usize> = (0..r.range(1, 6))
            .map(|_| r.range(1, 70_000) as usize)
            .collect();
        let total: usize = sizes.iter().sum();
        if total as u64 > size {
            continue;
        }
        let off = r.below(size - total as u64 + 1);
        let mut buf = vec![0xeeu8; total];
        {
            let mut rest: &mut [u8] = &mut buf;
            let mut slices = Vec::new();
            for &n in &sizes {
                let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
                slices.push(VolatileSlice::from(a));
                rest = b;
            }
            img.read_vectored(off, &slices)
                .unwrap_or_else(|e| panic!("read_vectored({off:#x}, {sizes:?}): {e}"));
        }
        assert_bytes_eq(
            &format!("read_vectored({off:#x}, {sizes:?})"),
            &expected[off as usize..off as usize + total],
            &buf,
        );
    }
}

/// `map(off, len)` covers exactly the range with consecutive extents, and zero extents read
/// as zeroes.
fn check_map(img: &Image, expected: &[u8], off: u64, len: u64) {
    let ext = img
        .map(off, len)
        .unwrap_or_else(|e| panic!("map({off:#x}, {len:#x}): {e}"));
    let mut pos = off;
    for e in &ext {
        assert_eq!(
            e.offset, pos,
            "map({off:#x}, {len:#x}): extents not consecutive: {ext:?}"
        );
        assert!(e.len > 0, "map({off:#x}, {len:#x}): empty extent {e:?}");
        if e.zero {
            let r = e.offset as usize..(e.offset + e.len) as usize;
            if let Some(i) = expected[r.clone()].iter().position(|&b| b != 0) {
                panic!(
                    "map({off:#x}, {len:#x}): extent {e:?} says zero but byte {:#x} is {:#04x}",
                    r.start + i,
                    expected[r.start + i]
                );
            }
        }
        pos += e.len;
    }
    assert_eq!(
        pos,
        off + len,
        "map({off:#x}, {len:#x}) ends at {pos:#x}: {ext:?}"
    );
}

/// `canonicalize` that keeps the original when the file cannot be resolved.
fn canon(p: &str) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p))
}

/// `info` (recursively through the backing chain) agrees with `qemu-img info`.
fn check_info(i: &ImageInfo, path: &Path) {
    let q = qemu_info(path);
    let ctx = format!("info of {}: ours {i:#?}\nqemu {q:#}", path.display());
    assert_eq!(
        Some(i.virtual_size),
        q["virtual-size"].as_u64(),
        "virtual-size; {ctx}"
    );
    assert_eq!(
        Some(i.format.to_string().as_str()),
        q["format"].as_str(),
        "format; {ctx}"
    );
    assert_eq!(
        i.cluster_size,
        q["cluster-size"].as_u64(),
        "cluster-size; {ctx}"
    );
    assert_eq!(
        Some(i.actual_size),
        q["actual-size"].as_u64(),
        "actual-size; {ctx}"
    );
    assert_eq!(
        i.backing_file.as_deref(),
        q["backing-filename"].as_str(),
        "backing-filename; {ctx}"
    );
    assert_eq!(
        i.backing_format.map(|f| f.to_string()).as_deref(),
        q["backing-filename-format"].as_str(),
        "backing-filename-format; {ctx}"
    );
    assert_eq!(
        i.full_backing_filename.as_deref().map(canon),
        q["full-backing-filename"].as_str().map(canon),
        "full-backing-filename; {ctx}"
    );
    match (&i.qcow2, q["format"].as_str()) {
        (Some(qi), Some("qcow2")) => {
            let d = &q["format-specific"]["data"];
            assert_eq!(
                Some(qi.compat.as_str()),
                d["compat"].as_str(),
                "compat; {ctx}"
            );
            assert_eq!(
                Some(u64::from(qi.refcount_bits)),
                d["refcount-bits"].as_u64(),
                "refcount-bits; {ctx}"
            );
            assert_eq!(
                qi.extended_l2,
                d["extended-l2"].as_bool().unwrap_or(false),
                "extended-l2; {ctx}"
            );
            if let Some(ct) = d["compression-type"].as_str() {
                assert_eq!(qi.compression_type, ct, "compression-type; {ctx}");
            }
            assert_eq!(
                qi.lazy_refcounts,
                d["lazy-refcounts"].as_bool().unwrap_or(false),
                "lazy-refcounts; {ctx}"
            );
            assert_eq!(
                qi.corrupt,
                d["corrupt"].as_bool().unwrap_or(false),
                "corrupt; {ctx}"
            );
            assert_eq!(
                qi.dirty,
                q["dirty-flag"].as_bool().unwrap_or(false),
                "dirty-flag; {ctx}"
            );
        }
        (None, Some("raw")) => {}
        _ => panic!("qcow2 info present iff format is qcow2; {ctx}"),
    }
    match (&i.backing, q["full-backing-filename"].as_str()) {
        (Some(b), Some(full)) => check_info(b, Path::new(full)),
        (None, None) => {}
        _ => panic!("backing info present iff there is a backing file; {ctx}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster sizes x compat levels, refcount widths.

fn plain(cluster: u64, compat: &str, refcount_bits: u32, seed: u64) {
    let size = match cluster {
        512 => 3 * MIB - 1536,
        4096 => 4 * MIB + 512,
        65536 => 8 * MIB - 4608,
        _ => 16 * MIB - 1536,
    };
    let opts = format!("cluster_size={cluster},compat={compat},refcount_bits={refcount_bits}");
    let b = build(seed, size, cluster, &opts, false);
    check_image(&b.img, &b.data, Format::Qcow2, cluster, seed);
}

macro_rules! plain_tests {
    ($($name:ident: $cluster:expr, $compat:expr, $bits:expr;)*) => {$(
        #[test]
        fn $name() {
            plain($cluster, $compat, $bits, line!() as u64);
        }
    )*};
}

plain_tests! {
    v2_cluster_512: 512, "0.10", 16;
    v3_cluster_512: 512, "1.1", 16;
    v2_cluster_4k: 4096, "0.10", 16;
    v3_cluster_4k: 4096, "1.1", 16;
    v2_cluster_64k: 65536, "0.10", 16;
    v3_cluster_64k: 65536, "1.1", 16;
    v2_cluster_2m: 2 << 20, "0.10", 16;
    v3_cluster_2m: 2 << 20, "1.1", 16;
    refcount_bits_1: 65536, "1.1", 1;
    refcount_bits_2: 65536, "1.1", 2;
    refcount_bits_4: 4096, "1.1", 4;
    refcount_bits_8: 65536, "1.1", 8;
    refcount_bits_16: 512, "1.1", 16;
    refcount_bits_32: 65536, "1.1", 32;
    refcount_bits_64: 4096, "1.1", 64;
    refcount_bits_64_cluster_512: 512, "1.1", 64;
}

/// qemu-img convert leaves zero regions unallocated (the test setup relies on it).
#[test]
fn convert_leaves_zero_regions_unallocated() {
    let b = build(11, 4 * MIB, 65536, "cluster_size=65536", false);
    let map = qemu_img(&["map", "--output", "json", s(&b.img)]);
    assert!(
        map.contains("\"data\": false"),
        "expected unallocated zero clusters in the converted image: {map}"
    );
    check_image(&b.img, &b.data, Format::Qcow2, 65536, 11);
}

// ---------------------------------------------------------------------------------------------
// Zero clusters made by qemu-io (`write -z`, with and without unmap) over allocated data.

fn zero_flags(compat: &str, cluster: u64, seed: u64) {
    let size = 4 * MIB;
    let dir = tmp();
    let raw = dir.path().join("src.raw");
    let img = dir.path().join("img.qcow2");
    let mut data = pattern(seed, size as usize);
    std::fs::write(&raw, &data).unwrap();
    qemu_convert_to_qcow2(
        &raw,
        &img,
        &format!("cluster_size={cluster},compat={compat}"),
        false,
    );
    let mut io = QemuIo::new(dir.path());
    let mut r = Rng::new(seed);
    for i in 0..40 {
        let unmap = i % 3 == 0;
        let (off, len) = if i % 2 == 0 {
            // Whole clusters: the zero flag (v3) or deallocation (v2).
            let c = r.below(size / cluster - 4);
            (c * cluster, r.range(1, 4) * cluster)
        } else {
            // Partial clusters: qemu writes zeroes (COW).
            let off = r.below(size - 20_000);
            (off, r.range(1, 20_000))
        };
        io.zero(&mut data, off, len, unmap);
        if i % 5 == 0 {
            // Data written back over part of a zeroed range.
            let off = off + len / 3;
            let len = (len / 3).max(1);
            io.write(&mut data, off, &pattern(seed + i, len as usize));
        }
    }
    io.run(&img, "qcow2");
    check_image(&img, &data, Format::Qcow2, cluster, seed);
}

#[test]
fn zero_clusters_v3_64k() {
    zero_flags("1.1", 65536, 21);
}

#[test]
fn zero_clusters_v3_4k() {
    zero_flags("1.1", 4096, 22);
}

#[test]
fn zero_clusters_v2_64k() {
    zero_flags("0.10", 65536, 23);
}

// ---------------------------------------------------------------------------------------------
// Compressed clusters.

fn compressed(cluster: u64, opts: &str, size: u64, seed: u64) {
    let opts = format!("cluster_size={cluster},{opts}");
    let b = build(seed, size, cluster, &opts, true);
    let n = qemu_compressed_clusters(&b.img);
    assert!(n > 0, "test setup: no compressed cluster in {opts}");
    check_image(&b.img, &b.data, Format::Qcow2, cluster, seed);

    // Mixed: qemu writes single compressed clusters (only possible into unallocated clusters:
    // whole zero clusters of the source) and overwrites parts of compressed clusters (normal
    // clusters appear among compressed ones).
    let mut data = b.data.clone();
    let mut io = QemuIo::new(b.dir.path());
    let mut r = Rng::new(seed ^ 0xc0);
    let zero_clusters: Vec<u64> = (0..size / cluster)
        .filter(|c| is_zero(&data[(c * cluster) as usize..((c + 1) * cluster) as usize]))
        .collect();
    assert!(
        !zero_clusters.is_empty(),
        "test setup: no zero cluster to compress into"
    );
    for (i, c) in zero_clusters.iter().step_by(3).take(8).enumerate() {
        io.compressed(
            &mut data,
            c * cluster,
            &compressible(seed * 200 + i as u64, cluster as usize),
        );
    }
    for i in 0..12 {
        let off = r.below(size - 9000);
        io.write(
            &mut data,
            off,
            &pattern(seed * 100 + i, r.range(1, 9000) as usize),
        );
    }
    io.run(&b.img, "qcow2");
    check_image(&b.img, &data, Format::Qcow2, cluster, seed + 1);
}

#[test]
fn compressed_zlib_v2_64k() {
    compressed(65536, "compat=0.10", 6 * MIB, 31);
}

#[test]
fn compressed_zlib_v3_4k() {
    compressed(4096, "compression_type=zlib", 3 * MIB, 32);
}

#[test]
fn compressed_zlib_v3_512() {
    compressed(512, "compression_type=zlib", MIB, 33);
}

#[test]
fn compressed_zstd_64k() {
    compressed(65536, "compression_type=zstd", 6 * MIB, 34);
}

#[test]
fn compressed_zstd_4k() {
    compressed(4096, "compression_type=zstd", 3 * MIB, 35);
}

#[test]
fn compressed_zstd_2m() {
    compressed(2 << 20, "compression_type=zstd", 10 * MIB, 36);
}

#[test]
fn compressed_zstd_extended_l2_64k() {
    compressed(65536, "compression_type=zstd,extended_l2=on", 4 * MIB, 37);
}

// ---------------------------------------------------------------------------------------------
// Extended L2 entries (subclusters): partially allocated clusters, zero subclusters, with and
// without a backing file.

fn subcluster_writes(io: &mut QemuIo, model: &mut [u8], cluster: u64, seed: u64, n: u64) {
    let size = model.len() as u64;
    let sub = cluster / 32;
    let mut r = Rng::new(seed);
    for i in 0..n {
        match i % 6 {
            0 | 1 => {
                // Subcluster-aligned data.
                let s = r.below(size / sub - 3);
                let len = r.range(1, 3) * sub;
                io.write(model, s * sub, &pattern(seed * 1000 + i, len as usize));
            }
            2 => {
                // Unaligned data (qemu COWs inside subclusters).
                let off = r.below(size - 3 * sub);
                let len = r.range(1, 2 * sub);
                io.pattern(model, off, len, r.byte_nz());
            }
            3 => {
                // Zero subclusters.
                let s = r.below(size / sub - 5);
                io.zero(model, s * sub, r.range(1, 5) * sub, false);
            }
            4 => {
                // Zero subclusters, unmap allowed.
                let s = r.below(size / sub - 5);
                io.zero(model, s * sub, r.range(1, 5) * sub, true);
            }
            _ => {
                // Unaligned zeroes.
                let off = r.below(size - 3 * sub);
                io.zero(model, off, r.range(1, 3 * sub), false);
            }
        }
    }
}

fn extended_l2(cluster: u64, size: u64, seed: u64) {
    let b = build(
        seed,
        size,
        cluster,
        &format!("cluster_size={cluster},extended_l2=on"),
        false,
    );
    let mut data = b.data.clone();
    let mut io = QemuIo::new(b.dir.path());
    subcluster_writes(&mut io, &mut data, cluster, seed, 60);
    io.run(&b.img, "qcow2");
    check_image(&b.img, &data, Format::Qcow2, cluster, seed);

    // An extended-L2 overlay over that image: unallocated subclusters read from the backing
    // file, zero subclusters hide it.
    let top = b.dir.path().join("top.qcow2");
    qemu_create_overlay(
        &top,
        "img.qcow2",
        "qcow2",
        &format!("cluster_size={cluster},extended_l2=on"),
        None,
    );
    let mut io = QemuIo::new(b.dir.path());
    subcluster_writes(&mut io, &mut data, cluster, seed + 7, 60);
    io.run(&top, "qcow2");
    check_image(&top, &data, Format::Qcow2, cluster, seed + 7);
}

#[test]
fn extended_l2_64k() {
    extended_l2(65536, 4 * MIB, 41);
}

#[test]
fn extended_l2_2m() {
    extended_l2(2 << 20, 12 * MIB, 42);
}

#[test]
fn extended_l2_32k_specific_subclusters() {
    // Hand-picked: a lone subcluster in the middle of an unallocated cluster, a zero subcluster
    // between two data subclusters, the last subcluster of a cluster.
    let dir = tmp();
    let img = dir.path().join("e.qcow2");
    qemu_create(&img, "qcow2", "cluster_size=32768,extended_l2=on", MIB);
    let mut data = vec![0u8; MIB as usize];
    let mut io = QemuIo::new(dir.path());
    io.pattern(&mut data, 4096, 1024, 0xab); // subcluster 4 of cluster 0
    io.pattern(&mut data, 32768, 3 * 1024, 0x11); // subclusters 0..3 of cluster 1
    io.zero(&mut data, 32768 + 1024, 1024, false); // subcluster 1 zero
    io.pattern(&mut data, 3 * 32768 - 1024, 1024, 0x22); // last subcluster of cluster 2
    io.pattern(&mut data, 5 * 32768 + 100, 10, 0x33); // unaligned, inside one subcluster
    io.zero(&mut data, 8 * 32768, 32768, false); // whole cluster zero
    io.run(&img, "qcow2");
    check_image(&img, &data, Format::Qcow2, 32768, 43);
}

// ---------------------------------------------------------------------------------------------
// Backing chains.

/// base (raw, relative name) -> mid (qcow2 v3 64K, absolute name) -> top (qcow2 v2 4K).
/// Sizes grow: base 3 MiB + 2.5 KiB, mid 5 MiB, top 8 MiB.
#[test]
fn chain_raw_base_relative_and_absolute() {
    let dir = tmp();
    let d = dir.path();
    let base = d.join("base.raw");
    let mid = d.join("mid.qcow2");
    let top = d.join("top.qcow2");
    let base_size = 3 * MIB + 2560;
    let (base_data, runs) = make_disk(51, base_size, 100 * KIB, 0);
    write_disk_raw(&base, &base_data, &runs);

    qemu_create_overlay(&mid, "base.raw", "raw", "cluster_size=65536", Some(5 * MIB));
    let mut mid_data = base_data.clone();
    mid_data.resize(5 * MIB as usize, 0);
    let mut io = QemuIo::new(d);
    let mut r = Rng::new(52);
    for i in 0..30 {
        let off = r.below(5 * MIB - 70_000);
        match i % 3 {
            0 => io.write(
                &mut mid_data,
                off,
                &pattern(520 + i, r.range(1, 70_000) as usize),
            ),
            1 => io.zero(&mut mid_data, off, r.range(1, 70_000), i % 2 == 0),
            _ => io.pattern(&mut mid_data, off, r.range(1, 3000), 0x4d),
        }
    }
    // Straddle the end of the base.
    io.pattern(&mut mid_data, base_size - 1000, 5000, 0x5e);
    io.run(&mid, "qcow2");
    check_image(&mid, &mid_data, Format::Qcow2, 65536, 53);

    qemu_create_overlay(
        &top,
        s(&mid),
        "qcow2",
        "cluster_size=4096,compat=0.10",
        Some(8 * MIB),
    );
    let mut top_data = mid_data.clone();
    top_data.resize(8 * MIB as usize, 0);
    let mut io = QemuIo::new(d);
    for i in 0..30 {
        let off = r.below(8 * MIB - 20_000);
        match i % 3 {
            0 => io.write(
                &mut top_data,
                off,
                &pattern(530 + i, r.range(1, 20_000) as usize),
            ),
            1 => io.zero(&mut top_data, off, r.range(1, 20_000), false),
            _ => io.pattern(&mut top_data, off, r.range(1, 3000), 0x7f),
        }
    }
    io.run(&top, "qcow2");
    check_image(&top, &top_data, Format::Qcow2, 4096, 54);
}

/// base (qcow2 v2, 512-byte clusters) -> mid (qcow2 v3 extended L2, in a subdirectory, backing
/// name `../base.qcow2`) -> top (qcow2 v3 64K, in another subdirectory, backing name
/// `../sub/./mid.qcow2`). Relative names resolve against the referencing image's directory.
#[test]
fn chain_qcow2_base_relative_subdirectories() {
    let dir = tmp();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::create_dir(d.join("other")).unwrap();
    let base_raw = d.join("base.raw");
    let base = d.join("base.qcow2");
    let mid = d.join("sub/mid.qcow2");
    let top = d.join("other/top.qcow2");
    let base_size = 2 * MIB + 512;
    let (base_data, runs) = make_disk(61, base_size, 50 * KIB, 0);
    write_disk_raw(&base_raw, &base_data, &runs);
    qemu_convert_to_qcow2(&base_raw, &base, "cluster_size=512,compat=0.10", false);
    std::fs::remove_file(&base_raw).unwrap();

    qemu_create_overlay(
        &mid,
        "../base.qcow2",
        "qcow2",
        "cluster_size=65536,extended_l2=on",
        Some(4 * MIB),
    );
    let mut data = base_data.clone();
    data.resize(4 * MIB as usize, 0);
    let mut io = QemuIo::new(d);
    subcluster_writes(&mut io, &mut data, 65536, 62, 40);
    io.run(&mid, "qcow2");
    check_image(&mid, &data, Format::Qcow2, 65536, 63);

    qemu_create_overlay(
        &top,
        "../sub/./mid.qcow2",
        "qcow2",
        "cluster_size=65536",
        Some(6 * MIB),
    );
    data.resize(6 * MIB as usize, 0);
    let mut io = QemuIo::new(d);
    let mut r = Rng::new(64);
    for i in 0..40 {
        let off = r.below(6 * MIB - 150_000);
        if i % 4 == 3 {
            io.zero(&mut data, off, r.range(1, 150_000), i % 8 == 3);
        } else {
            io.write(
                &mut data,
                off,
                &pattern(640 + i, r.range(1, 150_000) as usize),
            );
        }
    }
    io.run(&top, "qcow2");
    check_image(&top, &data, Format::Qcow2, 65536, 65);
}

/// A compressed base under a 2M-cluster overlay (partial cluster writes in the overlay read the
/// rest of the cluster from compressed base clusters).
#[test]
fn chain_compressed_base_big_cluster_overlay() {
    let b = build(
        71,
        5 * MIB,
        4096,
        "cluster_size=4096,compression_type=zstd",
        true,
    );
    let top = b.dir.path().join("top.qcow2");
    qemu_create_overlay(&top, "img.qcow2", "qcow2", "cluster_size=2097152", None);
    let mut data = b.data.clone();
    let mut io = QemuIo::new(b.dir.path());
    io.pattern(&mut data, 100, 5000, 0x99);
    io.pattern(&mut data, 2 * MIB + 4096 * 3 + 7, 4096, 0x98);
    io.run(&top, "qcow2");
    check_image(&top, &data, Format::Qcow2, 2 << 20, 72);
}

// ---------------------------------------------------------------------------------------------
// Raw images.

#[test]
fn raw_image_with_holes() {
    let dir = tmp();
    let raw = dir.path().join("disk.img");
    let (data, runs) = make_disk(81, 5 * MIB + 1024, 200 * KIB, MIB);
    write_disk_raw(&raw, &data, &runs);
    assert_eq!(qcow::probe(&raw).expect("probe raw"), Format::Raw);
    check_image(&raw, &data, Format::Raw, 4096, 82);
    // Explicit format works too.
    let img = Image::open(&raw, &opts(false, Some(Format::Raw))).expect("open explicit raw");
    assert_bytes_eq("explicit raw", &data, &read_all(&img));
    assert!(img.info().qcow2.is_none());
    assert_eq!(img.info().cluster_size, None);
}

// ---------------------------------------------------------------------------------------------
// map vs qemu-img map: whatever qemu reports as zero and unallocated in the whole chain, we
// report as zero too (a quality check: map is used to keep images sparse).

fn zero_ranges_per_qemu(path: &Path) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output", "json", s(path)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["zero"].as_bool() == Some(true) && e["data"].as_bool() == Some(false))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn map_agrees_with_qemu(path: &Path) {
    let img = open_ro(path);
    let ext = img.map(0, img.size()).expect("map");
    for (start, len) in zero_ranges_per_qemu(path) {
        for e in &ext {
            let a = e.offset.max(start);
            let b = (e.offset + e.len).min(start + len);
            assert!(
                a >= b || e.zero,
                "{}: qemu-img map says [{start:#x}, +{len:#x}) is zero/unallocated but our extent \
                 {e:?} is not zero",
                path.display()
            );
        }
    }
}

#[test]
fn map_zero_extents_match_qemu() {
    let b = build(91, 4 * MIB, 65536, "cluster_size=65536", false);
    map_agrees_with_qemu(&b.img);
    let c = build(92, 3 * MIB, 4096, "cluster_size=4096,compat=0.10", true);
    map_agrees_with_qemu(&c.img);

    // Zero flags and zero subclusters.
    let dir = tmp();
    let img = dir.path().join("z.qcow2");
    qemu_create(&img, "qcow2", "cluster_size=65536,extended_l2=on", 2 * MIB);
    let mut model = vec![0u8; 2 * MIB as usize];
    let mut io = QemuIo::new(dir.path());
    io.pattern(&mut model, 0, MIB, 0x42);
    io.zero(&mut model, 65536, 65536, false);
    io.zero(&mut model, 4 * 65536 + 2048, 4096, false);
    io.run(&img, "qcow2");
    map_agrees_with_qemu(&img);

    // An overlay with nothing written over a qcow2 with holes.
    let top = b.dir.path().join("top.qcow2");
    qemu_create_overlay(&top, "img.qcow2", "qcow2", "", None);
    map_agrees_with_qemu(&top);
}
