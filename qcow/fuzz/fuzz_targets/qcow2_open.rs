//! Fuzzes opening untrusted qcow2 images: the input is written to a file in /dev/shm and opened
//! read-only (probed, and as qcow2), then a few ranges are read, mapped and the metadata
//! checked; a copy is opened writable, written, discarded, zeroed, resized and closed, then
//! checked and repaired. Nothing may panic, hang, or allocate without bound. Seeds: small
//! valid images made by qemu-img (`seeds/qcow2_open`).

#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use qcow::{Format, Image, OpenOptions};

/// Deletes the file when dropped (also when the target panics and libFuzzer reports it).
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, data: &[u8]) -> Option<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = dir.join(format!(
            "qcow-fuzz-{}-{}-{tag}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, data).ok()?;
        Some(TempFile(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads a few ranges (start, middle, end, and a cluster-straddling one) and maps a bounded
/// window: enough to walk L1/L2 and decompress without scaling with a huge virtual size.
fn exercise_reads(img: &Image) {
    let size = img.size();
    let mut buf = vec![0u8; 70_000];
    for off in [0, 65_536 - 100, size / 2, size.saturating_sub(4096)] {
        let off = off.min(size);
        let len = (buf.len() as u64).min(size - off) as usize;
        let _ = img.read_at(off, &mut buf[..len]);
    }
    let _ = img.map(0, size.min(16 << 20));
    let _ = img.map(size.saturating_sub(1 << 20), size.min(1 << 20));
    let _ = img.info();
}

fuzz_target!(|data: &[u8]| {
    let Some(file) = TempFile::new("ro", data) else {
        return;
    };
    let _ = qcow::probe(&file.0);
    let mut opened_qcow2 = false;
    for format in [None, Some(Format::Qcow2)] {
        let opts = OpenOptions {
            writable: false,
            format,
            ..Default::default()
        };
        if let Ok(img) = Image::open(&file.0, &opts) {
            if data.starts_with(b"QFI\xfb") {
                assert_eq!(img.format(), Format::Qcow2, "a qcow2 header opened as raw");
            }
            opened_qcow2 |= img.format() == Format::Qcow2;
            exercise_reads(&img);
            let _ = img.close();
        }
    }
    let _ = qcow::check(&file.0, false);
    // The read-only paths must not have changed the file.
    assert_eq!(
        std::fs::read(&file.0).ok().as_deref(),
        Some(data),
        "read-only open/check modified the image"
    );
    if !opened_qcow2 {
        return;
    }

    // Writable, on a copy.
    let Some(copy) = TempFile::new("rw", data) else {
        return;
    };
    let opts = OpenOptions {
        writable: true,
        format: Some(Format::Qcow2),
        ..Default::default()
    };
    if let Ok(img) = Image::open(&copy.0, &opts) {
        let size = img.size();
        let pat: Vec<u8> = (0..12_345u32).map(|i| (i % 251) as u8 + 1).collect();
        for off in [0, 4096 + 7, size / 3] {
            if off < size {
                let len = pat.len().min((size - off) as usize);
                let _ = img.write_at(off, &pat[..len]);
            }
        }
        let _ = img.write_zeroes(0, size.min(65_536), false);
        let _ = img.write_zeroes(size / 2, size.min(200_000) / 2, true);
        let _ = img.discard(size / 4, size.min(1 << 20) / 4);
        let _ = img.resize(size.saturating_add(1 << 20), false);
        exercise_reads(&img);
        let _ = img.flush();
        let _ = img.close();
    }
    let _ = qcow::check(&copy.0, true);
    let _ = qcow::check(&copy.0, false);
});
