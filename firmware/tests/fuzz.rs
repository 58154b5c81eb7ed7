//! Random corruption of real FAT images: every operation must return (Ok or Err), never panic
//! or hang.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{layout, pattern, run, MemDisk, Rng, TempDir};
use lightbyte_firmware::fat::Fat;

fn build(fat: u8, size_kib: u32, extra: &[&str]) -> Vec<u8> {
    let t = TempDir::new(&format!("fuzz{fat}"));
    let d = t.path();
    let fat_arg = fat.to_string();
    let size = size_kib.to_string();
    let mut args = vec!["-F", &fat_arg, "-n", "FUZZ"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-C", "img", &size]);
    run(d, "mkfs.vfat", &args);
    // Directories first so they sit in the low clusters the mutations target.
    for dir in [
        "EFI",
        "EFI/BOOT",
        "loader",
        "loader/entries",
        "many",
        "many/sub",
    ] {
        run(d, "mmd", &["-i", "img", &format!("::/{dir}")]);
    }
    let mut args: Vec<String> = vec!["-i".into(), "img".into()];
    for i in 0..40 {
        let name = format!("a long file name number {i}.conf");
        std::fs::write(d.join(&name), pattern(i, 100 + 700 * i as usize)).unwrap();
        args.push(name);
    }
    args.push("::/many/".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(d, "mcopy", &refs);
    for (name, len) in [
        ("EFI/BOOT/BOOTX64.EFI", 50_000),
        ("loader/entries/debian-6.1.conf", 300),
        ("vmlinuz-6.1.0-57-cloud-amd64", 150_000),
        ("many/sub/x", 9000),
        ("empty", 0),
    ] {
        std::fs::write(d.join("src"), pattern(len as u64, len)).unwrap();
        run(d, "mcopy", &["-i", "img", "src", &format!("::/{name}")]);
    }
    std::fs::read(d.join("img")).unwrap()
}

fn set_fat_entry(
    img: &mut [u8],
    fat: usize,
    bits: u8,
    c: usize,
    v: u32,
    undo: &mut Vec<(usize, u8)>,
) {
    let (at, bytes) = match bits {
        12 => (fat + c + c / 2, 2),
        16 => (fat + 2 * c, 2),
        _ => (fat + 4 * c, 4),
    };
    for k in 0..bytes {
        undo.push((at + k, img[at + k]));
    }
    match bits {
        12 => {
            let old = u16::from_le_bytes([img[at], img[at + 1]]);
            let v = (v & 0xFFF) as u16;
            let new = if c & 1 == 1 {
                (old & 0x000F) | (v << 4)
            } else {
                (old & 0xF000) | v
            };
            img[at..at + 2].copy_from_slice(&new.to_le_bytes());
        }
        16 => img[at..at + 2].copy_from_slice(&(v as u16).to_le_bytes()),
        _ => img[at..at + 4].copy_from_slice(&v.to_le_bytes()),
    }
}

fn walk(fs: &Fat<&MemDisk>) {
    let _ = fs.free_bytes();
    let _ = fs.volume_label();
    let _ = fs.total_bytes();
    let root = fs.root();
    for p in [
        "EFI/BOOT/BOOTX64.EFI",
        "/loader/entries/../entries/debian-6.1.conf",
        "many/sub/../../many/sub/x",
        "..\\..\\EFI",
        "many/a long file name number 7.conf",
    ] {
        let _ = fs.lookup(&root, p);
    }

    let mut budget = 5_000usize;
    let mut stack = vec![root];
    let mut buf = vec![0u8; 64 * 1024];
    while let Some(dir) = stack.pop() {
        let mut pos = 0u64;
        loop {
            if budget == 0 {
                return;
            }
            budget -= 1;
            let before = pos;
            match fs.next_entry(&dir, &mut pos) {
                Ok(Some(n)) => {
                    assert!(pos > before, "cursor did not advance");
                    let _ = fs.lookup(&dir, &n.name);
                    if n.is_dir {
                        let _ = fs.lookup(&n, "..");
                        let _ = fs.lookup(&n, "../..");
                        if stack.len() < 32 {
                            stack.push(n);
                        }
                    } else {
                        let mut off = 0u64;
                        for _ in 0..32 {
                            match fs.read(&n, off, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => {
                                    assert!(k <= buf.len());
                                    assert!(off + k as u64 <= n.size);
                                    off += k as u64;
                                }
                            }
                        }
                        let _ = fs.read(&n, n.size.saturating_sub(3), &mut buf[..7]);
                    }
                }
                Ok(None) => break,
                Err(_) if pos == before => break,
                Err(_) => {}
            }
        }
    }
}

fn fuzz(img: Vec<u8>, iterations: usize, seed: u64) {
    let l = layout(&img);
    let bits = match (l.clusters, img[22] | img[23]) {
        (_, 0) => 32,
        (c, _) if c < 4085 => 12,
        _ => 16,
    };
    let fat = l.fat_offset as usize;
    let fat_span = (l.fat_bytes as usize).min(4096);
    let dirs = (l.fat_offset + l.fat_bytes) as usize;
    let dirs_end = (l.data_offset + 48 * l.cluster_size) as usize;
    let mut dev = MemDisk::new(img, 512);
    let original = dev.data.clone();
    let mut rng = Rng(seed);
    let mut mounted = 0;
    for _ in 0..iterations {
        let img = &mut dev.data;
        let mut undo = Vec::new();
        for _ in 0..1 + rng.below(8) {
            match rng.below(5) {
                0 => {
                    let at = rng.below(90) as usize;
                    undo.push((at, img[at]));
                    img[at] ^= 1 << rng.below(8);
                }
                1 => {
                    let at = fat + rng.below(fat_span as u64) as usize;
                    undo.push((at, img[at]));
                    img[at] = rng.next_u64() as u8;
                }
                2 => {
                    // Links to nearby clusters: loops, cross-links, free or reserved values.
                    let c = 2 + rng.below(150) as usize;
                    let v = match rng.below(4) {
                        0 => c as u32,
                        1 => rng.below(200) as u32,
                        2 => 0x0FFF_FFF7,
                        _ => rng.next_u64() as u32,
                    };
                    set_fat_entry(img, fat, bits, c, v, &mut undo);
                }
                _ => {
                    let at = dirs + rng.below((dirs_end - dirs) as u64) as usize;
                    undo.push((at, img[at]));
                    img[at] = match rng.below(3) {
                        0 => img[at] ^ (1 << rng.below(8)),
                        1 => 0xFF,
                        _ => rng.next_u64() as u8,
                    };
                }
            }
        }
        if let Ok(fs) = Fat::new(&dev) {
            mounted += 1;
            walk(&fs);
        }
        for (at, b) in undo.into_iter().rev() {
            dev.data[at] = b;
        }
    }
    assert!(dev.data == original);
    // Most mutations must get past mount, or the walk was not exercised.
    assert!(mounted > iterations / 2, "only {mounted} mounted");
}

/// Runs on a thread so a hang fails the test instead of stalling the suite.
/// FW_FS_FUZZ_ITERS and FW_FS_FUZZ_SEED allow longer or different runs.
fn fuzz_bounded(fat: u8, size_kib: u32, extra: &[&str], iterations: usize, seed: u64) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let iterations = env("FW_FS_FUZZ_ITERS").map_or(iterations, |n| n as usize);
    let seed = seed + env("FW_FS_FUZZ_SEED").unwrap_or(0) * 1000;
    let img = build(fat, size_kib, extra);
    let (tx, rx) = mpsc::channel();
    let worker = thread::spawn(move || {
        fuzz(img, iterations, seed);
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(900)) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("FAT{fat} fuzz did not finish: a hang"),
    }
}

#[test]
fn fuzz_fat12() {
    fuzz_bounded(12, 1440, &[], 400, 12);
}

#[test]
fn fuzz_fat16() {
    fuzz_bounded(16, 8 * 1024, &["-s", "2"], 400, 16);
}

#[test]
fn fuzz_fat32() {
    fuzz_bounded(32, 34 * 1024, &["-s", "1"], 300, 32);
}
