//! Malformed and inconsistent images: `Image::open`, reads, writes, `map`, `probe` and `check`
//! must return errors (or, where documented, read zeroes) — never panic and never allocate
//! absurd amounts of memory. Also `check` finding and repairing refcount damage.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use common::*;
use qcow::{Format, Image};

/// Refuses any single allocation of 256 MiB or more (the process then aborts with "memory
/// allocation of N bytes failed"), so an image that makes the crate size a buffer from an
/// untrusted header field fails loudly instead of eating the machine.
struct CappedAlloc;

const ALLOC_CAP: usize = 256 << 20;

// SAFETY: defers to `System` for everything it allows; returning null for oversized requests
// is what the `GlobalAlloc` contract prescribes for a failed allocation.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as our caller's (non-zero-size layout).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (via us) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= ALLOC_CAP {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` (via us) with `layout`; caller's contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CappedAlloc = CappedAlloc;

/// A small valid qcow2 image with data in its first clusters: 64K clusters, v3, 16-bit
/// refcounts unless `opts` says otherwise. Returns (path, model).
fn valid(dir: &Path, name: &str, opts: &str) -> (PathBuf, Vec<u8>) {
    let p = dir.join(name);
    qemu_create(&p, "qcow2", opts, 2 * MIB);
    let mut model = vec![0u8; 2 * MIB as usize];
    let mut io = QemuIo::new(dir);
    io.write(&mut model, 0, &pattern(1, 200_000));
    io.pattern(&mut model, MIB + 4096, 8192, 0x77);
    io.run(&p, "qcow2");
    (p, model)
}

/// Runs `f`, turning a panic into a test failure that names the case.
fn no_panic<T>(case: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{case}: the crate panicked: {msg}");
        }
    }
}

/// Opening must fail (with a bad-input error), whatever the requested access.
#[track_caller]
fn assert_open_fails(case: &str, path: &Path) {
    for writable in [false, true] {
        for format in [None, Some(Format::Qcow2)] {
            let r = no_panic(case, || Image::open(path, &opts(writable, format)));
            match r {
                Ok(img) => panic!(
                    "{case}: open(writable={writable}, format={format:?}) succeeded (as {:?}, \
                     size {:#x}); expected an error",
                    img.format(),
                    img.size()
                ),
                Err(e) => {
                    assert!(
                        e.is_bad_input(),
                        "{case}: expected a bad-input error, got {e} ({e:?})"
                    );
                    assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}

/// Exercises an image that may or may not open: nothing may panic, a qcow2 header is never
/// taken for raw, and reads that succeed over damaged metadata must return zeroes or the
/// model's bytes.
fn poke(case: &str, path: &Path, model: Option<&[u8]>) {
    let len_before = std::fs::metadata(path).unwrap().len();
    for writable in [false, true] {
        let r = no_panic(case, || Image::open(path, &opts(writable, None)));
        let Ok(img) = r else { continue };
        let magic = std::fs::read(path).map(|b| b.starts_with(b"QFI\xfb"));
        if magic.unwrap_or(false) {
            assert_eq!(
                img.format(),
                Format::Qcow2,
                "{case}: a qcow2 header opened as raw"
            );
        }
        no_panic(case, || {
            let size = img.size();
            for (off, len) in [
                (0, 65536),
                (size / 2, 100_000),
                (size.saturating_sub(4096), 4096),
            ] {
                let len = len.min(size - off.min(size)) as usize;
                let mut buf = vec![0xeeu8; len];
                if img.read_at(off, &mut buf).is_ok() {
                    if let Some(m) = model {
                        for (i, &b) in buf.iter().enumerate() {
                            let p = off as usize + i;
                            let want = m.get(p).copied().unwrap_or(0);
                            assert!(
                                b == 0 || b == want,
                                "{case}: read at {p:#x} gave {b:#04x}, neither zero nor the \
                                 original {want:#04x}"
                            );
                        }
                    }
                }
            }
            let _ = img.map(0, size.min(64 * MIB));
            let _ = img.info();
            if writable {
                let _ = img.write_at(4096, &[1; 4096]);
                let _ = img.write_zeroes(0, 65536, true);
                let _ = img.discard(MIB, 65536);
                let _ = img.flush();
            }
            let _ = img.close();
        });
        // A few small writes must not blow the file up (e.g. by following a table offset
        // far past the end of the file).
        let len = std::fs::metadata(path).unwrap().len();
        assert!(
            len <= 4 * len_before + 64 * MIB,
            "{case}: the file grew from {len_before:#x} to {len:#x} bytes"
        );
    }
    let _ = no_panic(case, || qcow::check(path, false));
}

// ---------------------------------------------------------------------------------------------
// Header fields.

#[test]
fn bad_magic_is_raw_unless_qcow2_requested() {
    let dir = tmp();
    let (p, _) = valid(dir.path(), "m.qcow2", "");
    put_bytes(&p, hdr::MAGIC, b"QFI\xfa");
    assert_eq!(qcow::probe(&p).unwrap(), Format::Raw);
    let img = Image::open(&p, &opts(false, None)).expect("opens as raw");
    assert_eq!(img.format(), Format::Raw);
    assert_bytes_eq(
        "raw view",
        &std::fs::read(&p).unwrap()[..4096],
        &read(&img, 0, 4096),
    );
    let r = Image::open(&p, &opts(false, Some(Format::Qcow2)));
    assert!(r.is_err(), "bad magic opened as qcow2");
    assert!(r.err().unwrap().is_bad_input());
}

#[test]
fn bad_versions() {
    let dir = tmp();
    for v in [0u32, 1, 4, 0xffff_ffff] {
        let (p, _) = valid(dir.path(), &format!("v{v}.qcow2"), "");
        put_be32(&p, hdr::VERSION, v);
        assert_ne!(
            qcow::probe(&p).ok(),
            Some(Format::Raw),
            "version {v}: probed as raw"
        );
        assert_open_fails(&format!("version {v}"), &p);
    }
}

#[test]
fn bad_cluster_bits() {
    let dir = tmp();
    for bits in [0u32, 8, 22, 31, 63, 64, 0xffff_ffff] {
        let (p, _) = valid(dir.path(), &format!("c{bits}.qcow2"), "");
        put_be32(&p, hdr::CLUSTER_BITS, bits);
        assert_open_fails(&format!("cluster_bits {bits}"), &p);
    }
}

#[test]
fn absurd_l1_size() {
    let dir = tmp();
    // l1_size 2^30 (an 8 GiB L1 table) for a 2 MiB disk; the same with a virtual size that
    // would need it; l1_size too small for the virtual size; l1_size 2^32-1.
    let cases: [(u32, Option<u64>); 5] = [
        (1 << 30, None),
        (1 << 30, Some(1 << 59)),
        (u32::MAX, None),
        (0, None),
        (1, Some(1 << 40)),
    ];
    for (i, (l1, size)) in cases.into_iter().enumerate() {
        let (p, _) = valid(dir.path(), &format!("l1-{i}.qcow2"), "");
        put_be32(&p, hdr::L1_SIZE, l1);
        if let Some(sz) = size {
            put_be64(&p, hdr::SIZE, sz);
        }
        assert_open_fails(&format!("l1_size {l1:#x}, size {size:?}"), &p);
    }
}

#[test]
fn absurd_virtual_size() {
    let dir = tmp();
    for sz in [u64::MAX, 1 << 63, (1 << 62) + 512] {
        let (p, _) = valid(dir.path(), &format!("s{sz:x}.qcow2"), "");
        put_be64(&p, hdr::SIZE, sz);
        assert_open_fails(&format!("virtual size {sz:#x}"), &p);
    }
}

#[test]
fn misaligned_tables() {
    let dir = tmp();
    let cases = [
        ("l1 +8", hdr::L1_OFFSET, 8u64),
        ("l1 +512", hdr::L1_OFFSET, 512),
        ("refcount table +8", hdr::REFCOUNT_TABLE_OFFSET, 8),
        ("refcount table +4096", hdr::REFCOUNT_TABLE_OFFSET, 4096),
    ];
    for (i, (case, field, delta)) in cases.into_iter().enumerate() {
        let (p, _) = valid(dir.path(), &format!("mis{i}.qcow2"), "");
        let v = get_be64(&p, field);
        put_be64(&p, field, v + delta);
        assert_open_fails(case, &p);
    }
}

#[test]
fn tables_past_eof() {
    let dir = tmp();
    let cases = [
        ("l1 at 1 TiB", hdr::L1_OFFSET, 1u64 << 40),
        ("l1 at 2^55", hdr::L1_OFFSET, 1 << 55),
        (
            "refcount table at 1 TiB",
            hdr::REFCOUNT_TABLE_OFFSET,
            1 << 40,
        ),
        ("l1 at 0 (the header)", hdr::L1_OFFSET, 0),
        ("refcount table at 0", hdr::REFCOUNT_TABLE_OFFSET, 0),
    ];
    for (i, (case, field, v)) in cases.into_iter().enumerate() {
        let (p, model) = valid(dir.path(), &format!("eof{i}.qcow2"), "");
        put_be64(&p, field, v);
        poke(case, &p, Some(&model));
    }
    // Absurd refcount table sizes.
    for (i, n) in [u32::MAX, 1 << 24].into_iter().enumerate() {
        let (p, _) = valid(dir.path(), &format!("rtc{i}.qcow2"), "");
        put_be32(&p, hdr::REFCOUNT_TABLE_CLUSTERS, n);
        assert_open_fails(&format!("refcount_table_clusters {n:#x}"), &p);
    }
}

#[test]
fn truncated_files() {
    let dir = tmp();
    let (p, model) = valid(dir.path(), "t.qcow2", "");
    let full = std::fs::read(&p).unwrap();
    for len in [
        4usize,
        20,
        71,
        72,
        103,
        104,
        512,
        65536,
        65536 * 3,
        full.len() / 2,
        full.len() - 1,
    ] {
        let t = dir.path().join(format!("trunc-{len}.qcow2"));
        std::fs::write(&t, &full[..len.min(full.len())]).unwrap();
        let case = format!("truncated to {len} bytes");
        assert_ne!(
            no_panic(&case, || qcow::probe(&t)).ok(),
            Some(Format::Raw),
            "{case}: qcow2 magic probed as raw"
        );
        if (4..104).contains(&len) {
            // Not even a whole header.
            assert_open_fails(&case, &t);
        } else {
            poke(&case, &t, Some(&model));
        }
    }
}

#[test]
fn backing_name_out_of_bounds() {
    let dir = tmp();
    let d = dir.path();
    std::fs::write(d.join("b.raw"), vec![1u8; MIB as usize]).unwrap();
    let cases = [
        ("name crosses the header cluster", Some(65536 - 4), None),
        ("name past EOF", Some(1 << 40), None),
        ("name length 1024", None, Some(1024)),
        ("name length 2^32-1", None, Some(u32::MAX)),
    ];
    for (i, (case, off, len)) in cases.into_iter().enumerate() {
        let p = d.join(format!("bn{i}.qcow2"));
        qemu_create_overlay(&p, "b.raw", "raw", "", None);
        if let Some(o) = off {
            put_be64(&p, hdr::BACKING_OFFSET, o);
        }
        if let Some(l) = len {
            put_be32(&p, hdr::BACKING_SIZE, l);
        }
        assert_open_fails(case, &p);
    }
    // The name read from inside the fixed header: garbage, so not found; no panic.
    let p = d.join("bn-inside.qcow2");
    qemu_create_overlay(&p, "b.raw", "raw", "", None);
    put_be64(&p, hdr::BACKING_OFFSET, 8);
    poke("backing name inside the fixed header", &p, None);
}

#[test]
fn missing_backing_file() {
    let dir = tmp();
    let d = dir.path();
    std::fs::write(d.join("b.raw"), vec![1u8; MIB as usize]).unwrap();
    let p = d.join("top.qcow2");
    qemu_create_overlay(&p, "b.raw", "raw", "", None);
    std::fs::remove_file(d.join("b.raw")).unwrap();
    for writable in [false, true] {
        let r = Image::open(&p, &opts(writable, None));
        assert!(r.is_err(), "opened with its backing file missing");
    }
}

#[test]
fn backing_loops() {
    let dir = tmp();
    let d = dir.path();
    // a -> b -> a
    qemu_create(&d.join("b.qcow2"), "qcow2", "", MIB);
    qemu_create_overlay(&d.join("a.qcow2"), "b.qcow2", "qcow2", "", None);
    std::fs::remove_file(d.join("b.qcow2")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&d.join("b.qcow2")),
        "1M",
    ]);
    assert_open_fails("a -> b -> a", &d.join("a.qcow2"));
    // a self-loop, by absolute path and via a symlink
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "./self.qcow2",
        "-F",
        "qcow2",
        s(&d.join("self.qcow2")),
        "1M",
    ]);
    assert_open_fails("self loop", &d.join("self.qcow2"));
    std::os::unix::fs::symlink(d.join("link-target.qcow2"), d.join("link.qcow2")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "link.qcow2",
        "-F",
        "qcow2",
        s(&d.join("link-target.qcow2")),
        "1M",
    ]);
    assert_open_fails("loop through a symlink", &d.join("link.qcow2"));
    assert!(qcow::create(
        &d.join("new.qcow2"),
        &qcow::CreateOptions {
            backing_file: Some("a.qcow2".into()),
            ..Default::default()
        }
    )
    .is_err());
}

/// Builds a chain of `depth` images (depth 1 = a lone image) and returns the top.
fn chain(d: &Path, depth: usize) -> PathBuf {
    let mut prev = d.join("c0.qcow2");
    qemu_create(&prev, "qcow2", "cluster_size=4096", 64 * KIB);
    for i in 1..depth {
        let p = d.join(format!("c{i}.qcow2"));
        qemu_create_overlay(
            &p,
            prev.file_name().unwrap().to_str().unwrap(),
            "qcow2",
            "cluster_size=4096",
            None,
        );
        prev = p;
    }
    prev
}

#[test]
fn chain_depth_limit() {
    let dir = tmp();
    // A modest chain works...
    let d8 = dir.path().join("d8");
    std::fs::create_dir(&d8).unwrap();
    let top = chain(&d8, 8);
    let img = open_ro(&top);
    assert!(is_zero(&read(&img, 0, 65536)));
    img.close().unwrap();
    // ... a 40-deep one is refused, whatever the access.
    let d40 = dir.path().join("d40");
    std::fs::create_dir(&d40).unwrap();
    let top = chain(&d40, 40);
    assert_open_fails("40-deep backing chain", &top);
}

#[test]
fn encryption_refused() {
    let dir = tmp();
    for m in [1u32, 2, 3] {
        let (p, _) = valid(dir.path(), &format!("crypt{m}.qcow2"), "");
        put_be32(&p, hdr::CRYPT_METHOD, m);
        assert_open_fails(&format!("crypt_method {m}"), &p);
    }
}

#[test]
fn feature_bits() {
    let dir = tmp();
    // Unknown incompatible bits: refused.
    for bit in [5u32, 10, 63] {
        let (p, _) = valid(dir.path(), &format!("inc{bit}.qcow2"), "");
        put_be64(&p, hdr::INCOMPATIBLE, 1 << bit);
        assert_open_fails(&format!("incompatible bit {bit}"), &p);
    }
    // Known incompatible bit 2 (external data file) without the extension: refused.
    let (p, _) = valid(dir.path(), "extdata.qcow2", "");
    put_be64(&p, hdr::INCOMPATIBLE, 1 << 2);
    assert_open_fails("external data file bit", &p);
    // Unknown compatible and autoclear bits: ignored.
    let (p, model) = valid(dir.path(), "compat.qcow2", "");
    put_be64(&p, hdr::COMPATIBLE, 1 << 40);
    put_be64(&p, hdr::AUTOCLEAR, 1 << 40);
    let img = open_ro(&p);
    assert_bytes_eq("unknown compatible/autoclear bits", &model, &read_all(&img));
    img.close().unwrap();
    let img = open_rw(&p);
    img.write_at(0, &[5; 10]).unwrap();
    img.close().unwrap();
    assert_eq!(
        get_be64(&p, hdr::AUTOCLEAR),
        0,
        "writable open must clear unknown autoclear bits"
    );
    assert_qemu_check_clean(&p);
}

#[test]
fn corrupt_bit() {
    let dir = tmp();
    let (p, model) = valid(dir.path(), "corrupt.qcow2", "");
    put_be64(&p, hdr::INCOMPATIBLE, 1 << 1);
    let img = open_ro(&p);
    assert!(img.info().qcow2.unwrap().corrupt);
    assert_bytes_eq(
        "read-only open of an image marked corrupt",
        &model,
        &read_all(&img),
    );
    img.close().unwrap();
    let r = Image::open(&p, &opts(true, None));
    assert!(
        r.is_err(),
        "writable open of an image marked corrupt must fail"
    );
}

/// An image left dirty by a crash with lazy refcounts (qemu-io `abort`): its refcounts are
/// stale. Read-only open reads the data; a writable open either refuses or repairs, and after
/// our writes the image is consistent.
#[test]
fn dirty_image() {
    let dir = tmp();
    let p = dir.path().join("dirty.qcow2");
    qemu_create(&p, "qcow2", "cluster_size=4096,lazy_refcounts=on", MIB);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "flush",
            "-c",
            "abort",
            s(&p),
        ],
    );
    assert_ne!(out.code, 0, "qemu-io abort: {}", out.describe());
    assert_eq!(
        get_be64(&p, hdr::INCOMPATIBLE) & 1,
        1,
        "test setup: dirty bit not set"
    );
    let mut model = vec![0u8; MIB as usize];
    model[..65536].fill(0x5a);

    let img = open_ro(&p);
    assert!(img.info().qcow2.unwrap().dirty);
    assert_bytes_eq("dirty image, read-only", &model, &read_all(&img));
    img.close().unwrap();
    // Read-only open must not have touched the file.
    assert_eq!(
        get_be64(&p, hdr::INCOMPATIBLE) & 1,
        1,
        "read-only open cleared the dirty bit"
    );

    match no_panic("dirty writable open", || Image::open(&p, &opts(true, None))) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(img) => {
            img.write_at(100_000, &[7; 70_000])
                .expect("write after repair");
            model[100_000..170_000].fill(7);
            img.close().expect("close");
            verify_closed_image(&p, &model);
            assert_eq!(
                get_be64(&p, hdr::INCOMPATIBLE) & 1,
                0,
                "dirty bit left set after close"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Damaged L1/L2 entries.

#[test]
fn l2_entries_past_eof_or_misaligned() {
    let dir = tmp();
    let cases: [(&str, u64); 5] = [
        ("past EOF (1 TiB)", 1 << 40),
        ("past EOF (2^55)", 1 << 55),
        ("misaligned +512", 512),
        ("points at the header", 0),
        ("reserved bits set", 1 << 60),
    ];
    for (i, (case, v)) in cases.into_iter().enumerate() {
        let (p, model) = valid(dir.path(), &format!("l2-{i}.qcow2"), "");
        let e = l2_entry_offset(&p, 0);
        let old = get_be64(&p, e);
        let host = old & 0x00ff_ffff_ffff_fe00;
        let new = match i {
            0 | 1 => (1 << 63) | v,
            2 => (1 << 63) | (host + v),
            3 => 1 << 63, // offset 0 with COPIED: qemu treats it as corruption
            _ => old | v,
        };
        put_be64(&p, e, new);
        poke(case, &p, Some(&model));
        if i == 2 {
            // A misaligned data cluster offset is always an error when read.
            let img = open_ro(&p);
            let mut buf = vec![0; 4096];
            assert!(img.read_at(0, &mut buf).is_err(), "{case}: read succeeded");
        }
    }
}

#[test]
fn l1_entries_damaged() {
    let dir = tmp();
    for (i, v) in [
        (1u64 << 63) | (1 << 40),
        (1 << 63) | 0x10200,
        1 << 63,
        u64::MAX,
    ]
    .into_iter()
    .enumerate()
    {
        let (p, model) = valid(dir.path(), &format!("l1e-{i}.qcow2"), "");
        let l1 = get_be64(&p, hdr::L1_OFFSET);
        put_be64(&p, l1, v);
        poke(&format!("L1[0] = {v:#x}"), &p, Some(&model));
    }
}

#[test]
fn compressed_entries_damaged() {
    let dir = tmp();
    let raw = dir.path().join("c.raw");
    std::fs::write(&raw, compressible(5, MIB as usize)).unwrap();
    let model = compressible(5, MIB as usize);
    for (i, ct) in ["zlib", "zstd"].into_iter().enumerate() {
        for j in 0..4u64 {
            let p = dir.path().join(format!("cd-{i}-{j}.qcow2"));
            qemu_convert_to_qcow2(
                &raw,
                &p,
                &format!("cluster_size=4096,compression_type={ct}"),
                true,
            );
            let e = l2_entry_offset(&p, 0);
            let old = get_be64(&p, e);
            assert_eq!(old >> 62, 1, "test setup: cluster 0 not compressed");
            let cs_bits = 12u64;
            let x = 62 - (cs_bits - 8);
            let off_mask = (1u64 << x) - 1;
            let host = old & off_mask;
            let new = match j {
                // Host offset far past EOF.
                0 => (1 << 62) | (old & !off_mask & !(1 << 62)) | ((1 << x) - 512),
                // Maximum compressed length.
                1 => old | (((1u64 << (62 - x)) - 1) << x),
                _ => old,
            };
            put_be64(&p, e, new);
            if j == 2 {
                // Garbage compressed bytes.
                put_bytes(&p, host, &pattern(j, 600));
            }
            if j == 3 {
                // Compressed stream truncated: zero its second half.
                put_bytes(&p, host + 100, &[0; 400]);
            }
            let case = format!("{ct} compressed entry damage #{j}");
            // Before `poke`, whose writable pass changes the image.
            let img = no_panic(&case, || open_ro(&p));
            let mut buf = vec![0; 4096];
            let r = no_panic(&case, || img.read_at(0, &mut buf));
            if j < 2 {
                assert!(
                    r.is_err() || buf == model[..4096],
                    "{case}: read gave wrong data without error"
                );
            }
            img.close().unwrap();
            poke(&case, &p, Some(&model));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Format selection.

#[test]
fn explicit_raw_reads_qcow2_bytes() {
    let dir = tmp();
    let (p, _) = valid(dir.path(), "x.qcow2", "");
    let file = std::fs::read(&p).unwrap();
    let img = Image::open(&p, &opts(false, Some(Format::Raw))).expect("explicit raw");
    assert_eq!(img.format(), Format::Raw);
    assert_eq!(img.size(), file.len() as u64);
    assert_bytes_eq("raw view of a qcow2 file", &file, &read_all(&img));
}

#[test]
fn probing() {
    let dir = tmp();
    let d = dir.path();
    let (q, _) = valid(d, "p.qcow2", "");
    assert_eq!(qcow::probe(&q).unwrap(), Format::Qcow2);
    assert_eq!(open_ro(&q).format(), Format::Qcow2);
    std::fs::write(d.join("zero.raw"), vec![0u8; 65536]).unwrap();
    assert_eq!(qcow::probe(&d.join("zero.raw")).unwrap(), Format::Raw);
    std::fs::write(d.join("empty.raw"), b"").unwrap();
    assert_eq!(qcow::probe(&d.join("empty.raw")).ok(), Some(Format::Raw));
    // qcow2 magic followed by garbage is never raw.
    let mut g = b"QFI\xfb".to_vec();
    g.extend(pattern(9, 4096));
    std::fs::write(d.join("garbage.qcow2"), &g).unwrap();
    assert_ne!(
        qcow::probe(&d.join("garbage.qcow2")).ok(),
        Some(Format::Raw)
    );
    let r = no_panic("garbage", || {
        Image::open(&d.join("garbage.qcow2"), &opts(false, None))
    });
    assert!(
        r.as_ref()
            .map(|i| i.format() != Format::Raw)
            .unwrap_or(true),
        "qcow2 magic + garbage opened as raw"
    );
    assert!(qcow::probe(&d.join("does-not-exist")).is_err());
}

// ---------------------------------------------------------------------------------------------
// check.

#[test]
fn check_finds_and_repairs_refcount_damage() {
    let dir = tmp();
    // 1. A used data cluster with refcount 0: corruption.
    let (p, model) = valid(dir.path(), "rc0.qcow2", "");
    let host = host_cluster_of(&p, 0).expect("cluster 0 allocated");
    let cs = 65536;
    set_refcount16(&p, host / cs, 0);
    assert_eq!(
        qemu_check(&p).0.code,
        2,
        "test setup: qemu sees a corruption"
    );
    let r = qcow::check(&p, false).expect("check");
    assert!(
        r.corruptions > 0 && !r.is_clean(),
        "refcount 0 on a used cluster: {r:?}"
    );
    assert!(!r.repaired);
    assert!(!r.messages.is_empty(), "no message explains the corruption");
    let r = qcow::check(&p, true).expect("check repair");
    assert!(r.repaired, "{r:?}");
    assert_qemu_check_clean(&p);
    assert!(qcow::check(&p, false).unwrap().is_clean());
    assert_bytes_eq("data after repair", &model, &read_all(&open_ro(&p)));

    // 2. A refcount on a cluster nothing uses: a leak.
    let (p, model) = valid(dir.path(), "leak.qcow2", "");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len.div_ceil(cs) * cs + 2 * cs).unwrap();
    drop(f);
    let idx = len.div_ceil(cs);
    assert_eq!(get_refcount16(&p, idx), 0);
    set_refcount16(&p, idx, 1);
    assert_eq!(qemu_check(&p).0.code, 3, "test setup: qemu sees a leak");
    let r = qcow::check(&p, false).expect("check");
    assert!(r.leaks > 0 && r.corruptions == 0, "leaked cluster: {r:?}");
    let r = qcow::check(&p, true).expect("check repair");
    assert!(r.repaired, "{r:?}");
    assert_qemu_check_clean(&p);
    assert!(qcow::check(&p, false).unwrap().is_clean());
    assert_bytes_eq("data after leak repair", &model, &read_all(&open_ro(&p)));

    // 3. Refcount 2 on a cluster used once (a leak for qemu too).
    let (p, _) = valid(dir.path(), "rc2.qcow2", "");
    let host = host_cluster_of(&p, 0).unwrap();
    set_refcount16(&p, host / cs, 2);
    let q = qemu_check(&p).0.code;
    let r = qcow::check(&p, false).expect("check");
    assert!(
        !r.is_clean(),
        "refcount 2 on a cluster used once (qemu exit {q}): {r:?}"
    );
    qcow::check(&p, true).expect("repair");
    assert_qemu_check_clean(&p);

    // 4. Counts agree with qemu's on a clean image.
    let (p, _) = valid(dir.path(), "clean.qcow2", "");
    let (_, qv) = qemu_check(&p);
    let r = qcow::check(&p, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        Some(r.allocated_clusters),
        qv["allocated-clusters"].as_u64(),
        "{r:?} vs {qv:#}"
    );
    assert_eq!(
        Some(r.total_clusters),
        qv["total-clusters"].as_u64(),
        "{r:?} vs {qv:#}"
    );
    assert_eq!(
        Some(r.image_end_offset),
        qv["image-end-offset"].as_u64(),
        "{r:?} vs {qv:#}"
    );
}

#[test]
fn check_on_broken_metadata() {
    let dir = tmp();
    let (p, _) = valid(dir.path(), "b.qcow2", "");
    let e = l2_entry_offset(&p, 0);
    put_be64(&p, e, (1 << 63) | (1 << 40));
    let r = no_panic("check, L2 past EOF", || qcow::check(&p, false));
    if let Ok(r) = r {
        assert!(r.corruptions > 0, "L2 entry past EOF not reported: {r:?}");
    }
    let (p, _) = valid(dir.path(), "m.qcow2", "");
    let e = l2_entry_offset(&p, 0);
    let old = get_be64(&p, e);
    put_be64(&p, e, old + 512);
    let r = no_panic("check, misaligned L2 entry", || qcow::check(&p, false));
    if let Ok(r) = r {
        assert!(r.corruptions > 0, "misaligned L2 entry not reported: {r:?}");
    }
    std::fs::write(dir.path().join("raw"), [0u8; 4096]).unwrap();
    assert!(
        qcow::check(&dir.path().join("raw"), false).is_err(),
        "check of a raw file"
    );
}

// ---------------------------------------------------------------------------------------------
// Internal snapshots (qemu-made): the active layer reads right, check accounts for the
// snapshot's tables, and writes to clusters shared with the snapshot must copy them.

#[test]
fn internal_snapshots() {
    let dir = tmp();
    let (p, mut model) = valid(dir.path(), "snap.qcow2", "cluster_size=4096");
    let snap_model = model.clone();
    qemu_img(&["snapshot", "-c", "s1", s(&p)]);
    let mut io = QemuIo::new(dir.path());
    io.pattern(&mut model, 1000, 5000, 0x44);
    io.run(&p, "qcow2");
    let img = open_ro(&p);
    assert_eq!(img.info().qcow2.unwrap().snapshots, 1);
    assert_bytes_eq("active layer with a snapshot", &model, &read_all(&img));
    img.close().unwrap();
    let r = qcow::check(&p, false).expect("check");
    assert!(r.is_clean(), "check of an image with a snapshot: {r:?}");
    match Image::open(&p, &opts(true, None)) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(img) => {
            img.write_at(20_000, &[0x66; 30_000]).unwrap();
            model[20_000..50_000].fill(0x66);
            img.close().unwrap();
            assert_qemu_check_clean(&p);
            let out = dir.path().join("s1.raw");
            qemu_img(&[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                s(&p),
                s(&out),
            ]);
            assert_bytes_eq(
                "snapshot s1 intact",
                &snap_model,
                &std::fs::read(&out).unwrap(),
            );
            assert_bytes_eq("active layer", &model, &qemu_read_all(&p, None));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic mini-fuzz: random byte damage in the metadata of small valid images.

#[test]
fn random_metadata_damage() {
    let dir = tmp();
    let d = dir.path();
    let mut images = Vec::new();
    for (i, o) in [
        "cluster_size=512,compat=0.10",
        "cluster_size=4096",
        "cluster_size=65536,extended_l2=on",
    ]
    .into_iter()
    .enumerate()
    {
        let (p, _) = valid(d, &format!("src{i}.qcow2"), o);
        images.push(std::fs::read(&p).unwrap());
    }
    let mut r = Rng::new(4242);
    for n in 0..120 {
        let src = &images[n % images.len()];
        let mut bytes = src.clone();
        let metadata_end = bytes.len().min(if n % 3 == 0 { 1024 } else { 6 * 65536 });
        let flips = r.range(1, 6);
        let mut what = Vec::new();
        for _ in 0..flips {
            let pos = r.below(metadata_end as u64) as usize;
            let v = r.next_u64() as u8;
            what.push((pos, v));
            bytes[pos] = v;
        }
        let p: PathBuf = d.join(format!("fz{n}.qcow2"));
        std::fs::write(&p, &bytes).unwrap();
        poke(&format!("damage #{n} {what:x?}"), &p, None);
        std::fs::remove_file(&p).unwrap();
    }
}
