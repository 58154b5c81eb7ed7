//! Quick end-to-end round trips of the engine against qemu-img.

use std::path::Path;
use std::process::Command;

use qcow::{CreateOptions, Image, OpenOptions};

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn rw() -> OpenOptions {
    OpenOptions {
        writable: true,
        ..OpenOptions::default()
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn assert_clean(p: &Path) {
    let (ok, out) = qemu_img(&["check", p.to_str().unwrap()]);
    assert!(ok, "qemu-img check: {out}");
    let r = qcow::check(p, false).unwrap();
    assert!(r.is_clean(), "our check: {r:?}");
}

#[test]
fn write_read_and_compare_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, rb) in [(65536u32, 16u32), (512, 64), (4096, 1)] {
        let img = dir.path().join(format!("a-{cs}-{rb}.qcow2"));
        let raw = dir.path().join(format!("a-{cs}-{rb}.raw"));
        let size = 8u64 << 20;
        qcow::create(
            &img,
            &CreateOptions {
                size: Some(size),
                cluster_size: cs,
                refcount_bits: rb,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        assert_clean(&img);
        let mut model = vec![0u8; size as usize];
        let d = Image::open(&img, &rw()).unwrap();
        let mut x = 7u64;
        for i in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (size - 70000);
            let len = ((x >> 8) % 70000) as usize + 1;
            let data = pattern(i, len);
            d.write_at(off, &data).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        d.write_zeroes(1 << 20, 1 << 20, true).unwrap();
        model[1 << 20..2 << 20].fill(0);
        d.discard(3 << 20, 1 << 20).unwrap();
        model[3 << 20..4 << 20].fill(0);
        let mut back = vec![0u8; size as usize];
        d.read_at(0, &mut back).unwrap();
        assert!(back == model, "read back differs ({cs}/{rb})");
        d.close().unwrap();
        std::fs::write(&raw, &model).unwrap();
        assert_clean(&img);
        let (ok, out) = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "compare: {out}");
    }
}

#[test]
fn overlay_reads_through_and_copies_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let data = pattern(3, 4 << 20);
    std::fs::write(&base, &data).unwrap();
    let top = dir.path().join("top.qcow2");
    qcow::create(
        &top,
        &CreateOptions {
            size: Some(16 << 20),
            backing_file: Some("base.raw".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let d = Image::open(&top, &rw()).unwrap();
    let mut model = data.clone();
    model.resize(16 << 20, 0);
    let w = pattern(9, 5000);
    d.write_at(100_000, &w).unwrap();
    model[100_000..105_000].copy_from_slice(&w);
    d.write_at(4 << 20, &w).unwrap();
    model[4 << 20..(4 << 20) + 5000].copy_from_slice(&w);
    d.write_zeroes(0, 65536, false).unwrap();
    model[..65536].fill(0);
    let mut back = vec![0u8; 16 << 20];
    d.read_at(0, &mut back).unwrap();
    assert!(back == model);
    d.resize(32 << 20, false).unwrap();
    d.close().unwrap();
    assert_eq!(std::fs::read(&base).unwrap(), data, "base untouched");
    assert_clean(&top);
    let raw = dir.path().join("expect.raw");
    model.resize(32 << 20, 0);
    std::fs::write(&raw, &model).unwrap();
    let (ok, out) = qemu_img(&[
        "compare",
        "-F",
        "raw",
        top.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "compare: {out}");
}
