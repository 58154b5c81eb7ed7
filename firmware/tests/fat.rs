//! FAT driver against images built by mkfs.vfat and mtools.

mod common;

use std::sync::OnceLock;

use common::{layout, pattern, run, MemDisk, Rng, TempDir};
use lightbyte_firmware::fat::{DateTime, Fat, FatError, FatType, Node};

const LONG_KERNEL: &str = "vmlinuz-6.1.0-57-cloud-amd64";
const MANY: usize = 60;

struct Fixture {
    image: Vec<u8>,
    /// (path, content) of every regular file written.
    files: Vec<(String, Vec<u8>)>,
    /// What `mdir` reports.
    free_bytes: u64,
}

fn many_name(i: usize) -> String {
    format!("entry-number-{i:03}.txt")
}

/// mkfs + mtools: a contiguous big file first, a directory tree with long names, a directory
/// spanning several clusters, an empty file, and a file fragmented across freed holes.
fn build(fat: u8, size_kib: u32, mkfs_extra: &[&str]) -> Fixture {
    let t = TempDir::new(&format!("fat{fat}"));
    let d = t.path();
    let img = "img";
    let size = size_kib.to_string();
    let fat_arg = fat.to_string();
    let mut args = vec!["-F", &fat_arg, "-n", "LBTEST"];
    args.extend_from_slice(mkfs_extra);
    args.extend_from_slice(&["-C", img, &size]);
    run(d, "mkfs.vfat", &args);

    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let put = |files: &mut Vec<(String, Vec<u8>)>, path: &str, content: Vec<u8>| {
        let local = format!("src{}", files.len());
        std::fs::write(d.join(&local), &content).unwrap();
        run(d, "mcopy", &["-i", img, &local, &format!("::/{path}")]);
        files.push((path.to_string(), content));
    };

    // On FAT32 with 512-byte clusters the big file's chain covers 94 KiB of FAT, more than
    // the driver caches, so re-walking it from the start would show up as extra requests.
    let big_len = match fat {
        12 => 300_001,
        16 => 1_500_007,
        _ => 12_000_011,
    };
    put(&mut files, "big.bin", pattern(1, big_len));
    for dir in [
        "EFI",
        "EFI/BOOT",
        "loader",
        "loader/entries",
        "deep",
        "deep/a",
        "deep/a/b",
        "many",
    ] {
        run(d, "mmd", &["-i", img, &format!("::/{dir}")]);
    }
    put(&mut files, "EFI/BOOT/BOOTX64.EFI", pattern(2, 70_000));
    put(&mut files, LONG_KERNEL, pattern(3, 200_000));
    put(&mut files, "empty.txt", Vec::new());
    put(&mut files, "readme.txt", b"lower case 8.3\n".to_vec());
    put(&mut files, "UPPER.TXT", b"upper case 8.3\n".to_vec());
    put(&mut files, "Mixed Case Name.Text", b"mixed\n".to_vec());
    put(&mut files, "deep/a/b/leaf.txt", pattern(4, 5000));

    // A known timestamp: mcopy -m keeps the source's mtime, interpreted in TZ=UTC.
    let conf = b"title Debian\nlinux /vmlinuz-6.1.0-57-cloud-amd64\n".to_vec();
    std::fs::write(d.join("conf"), &conf).unwrap();
    run(d, "touch", &["-d", "2021-03-04 05:06:08", "conf"]);
    run(
        d,
        "mcopy",
        &["-m", "-i", img, "conf", "::/loader/entries/debian-6.1.conf"],
    );
    files.push(("loader/entries/debian-6.1.conf".into(), conf));

    let mut many_args = vec!["-i".to_string(), img.to_string()];
    for i in 0..MANY {
        let name = many_name(i);
        let content = format!("file {i}\n").into_bytes();
        std::fs::write(d.join(&name), &content).unwrap();
        many_args.push(name.clone());
        files.push((format!("many/{name}"), content));
    }
    many_args.push("::/many/".into());
    let many_refs: Vec<&str> = many_args.iter().map(String::as_str).collect();
    run(d, "mcopy", &many_refs);

    // Holes of three clusters between live files, then a file larger than four holes: it
    // has to be split across them.
    let cs = layout(&std::fs::read(d.join(img)).unwrap()).cluster_size as usize;
    let mut hole_args = vec!["-i".to_string(), img.to_string()];
    for i in 0..10 {
        let name = format!("hole{i}");
        std::fs::write(d.join(&name), pattern(100 + i, 3 * cs)).unwrap();
        hole_args.push(name);
    }
    hole_args.push("::/".into());
    let hole_refs: Vec<&str> = hole_args.iter().map(String::as_str).collect();
    run(d, "mcopy", &hole_refs);
    for i in (1..10).step_by(2) {
        run(d, "mdel", &["-i", img, &format!("::/hole{i}")]);
    }
    for i in (0..10).step_by(2) {
        files.push((format!("hole{i}"), pattern(100 + i, 3 * cs)));
    }
    if fat == 32 {
        // mtools allocates from FSInfo's next-free hint, which points past the holes; make it
        // search from the start.
        let path = d.join(img);
        let mut bytes = std::fs::read(&path).unwrap();
        let fsinfo = usize::from(common::le16(&bytes, 48)) * 512;
        bytes[fsinfo + 492..fsinfo + 496].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    }
    put(&mut files, "frag.bin", pattern(5, 13 * cs + 123));

    let listing = run(d, "mdir", &["-i", img, "::/"]);
    let free_line = listing
        .lines()
        .find(|l| l.contains("bytes free"))
        .expect("mdir free line");
    let free_bytes: u64 = free_line
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap();

    Fixture {
        image: std::fs::read(d.join(img)).unwrap(),
        files,
        free_bytes,
    }
}

fn fixture(t: FatType) -> &'static Fixture {
    static F12: OnceLock<Fixture> = OnceLock::new();
    static F16: OnceLock<Fixture> = OnceLock::new();
    static F32: OnceLock<Fixture> = OnceLock::new();
    match t {
        FatType::Fat12 => F12.get_or_init(|| build(12, 3 * 1024, &[])),
        FatType::Fat16 => F16.get_or_init(|| build(16, 16 * 1024, &[])),
        FatType::Fat32 => F32.get_or_init(|| build(32, 40 * 1024, &["-s", "1"])),
    }
}

fn disk(t: FatType) -> MemDisk {
    MemDisk::new(fixture(t).image.clone(), 512)
}

fn read_all(fs: &Fat<&MemDisk>, node: &Node) -> Vec<u8> {
    let mut out = vec![0u8; node.size as usize + 10];
    let n = fs.read(node, 0, &mut out).unwrap();
    out.truncate(n);
    out
}

fn list(fs: &Fat<&MemDisk>, dir: &Node) -> Vec<Node> {
    let mut pos = 0;
    let mut out = Vec::new();
    while let Some(n) = fs.next_entry(dir, &mut pos).unwrap() {
        out.push(n);
        assert!(out.len() < 10_000);
    }
    // Listing is finished for good: the cursor stays at the end.
    assert!(fs.next_entry(dir, &mut pos).unwrap().is_none());
    out
}

fn check_geometry(t: FatType) {
    let f = fixture(t);
    let d = disk(t);
    let fs = Fat::new(&d).unwrap();
    assert_eq!(fs.fat_type(), t);
    assert_eq!(fs.volume_label(), "LBTEST");
    let l = layout(&f.image);
    assert_eq!(u64::from(fs.cluster_size()), l.cluster_size);
    assert_eq!(fs.total_bytes(), l.clusters * l.cluster_size);
    assert_eq!(fs.free_bytes().unwrap(), f.free_bytes);
    // Cached: a second call does not touch the device.
    d.reset_calls();
    assert_eq!(fs.free_bytes().unwrap(), f.free_bytes);
    assert_eq!(d.calls(), 0);
}

fn check_all_files(t: FatType, bs: u32) {
    let f = fixture(t);
    let d = MemDisk::new(f.image.clone(), bs);
    let fs = Fat::new(&d).unwrap();
    let root = fs.root();
    for (path, content) in &f.files {
        let node = fs
            .lookup(&root, path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(!node.is_dir, "{path}");
        assert_eq!(node.size, content.len() as u64, "{path}");
        assert_eq!(&read_all(&fs, &node), content, "{path}");
        assert_eq!(
            node.name,
            path.rsplit('/').next().unwrap(),
            "long name of {path}"
        );
    }
}

fn check_random_reads(t: FatType) {
    let f = fixture(t);
    let d = disk(t);
    let fs = Fat::new(&d).unwrap();
    let mut rng = Rng(0x1234_5678 + t as u64);
    for name in ["big.bin", LONG_KERNEL, "frag.bin"] {
        let content = &f.files.iter().find(|(p, _)| p == name).unwrap().1;
        let node = fs.lookup(&fs.root(), name).unwrap();
        let len = content.len() as u64;
        let mut buf = vec![0u8; 300_000];
        for i in 0..200 {
            let off = match i % 4 {
                0 => rng.below(len + 100),
                1 => len.saturating_sub(rng.below(5000)),
                _ => rng.below(len),
            };
            let want = match i % 3 {
                0 => rng.below(64) as usize,
                1 => rng.below(9000) as usize,
                _ => rng.below(buf.len() as u64) as usize,
            };
            let n = fs.read(&node, off, &mut buf[..want]).unwrap();
            let expect = (len.saturating_sub(off) as usize).min(want);
            assert_eq!(n, expect, "{name} off {off} len {want}");
            if n > 0 {
                assert_eq!(&buf[..n], &content[off as usize..off as usize + n]);
            }
        }
        assert_eq!(fs.read(&node, len, &mut buf).unwrap(), 0);
        assert_eq!(fs.read(&node, u64::MAX, &mut buf).unwrap(), 0);
        assert_eq!(fs.read(&node, 0, &mut []).unwrap(), 0);
    }
}

fn check_request_counts(t: FatType) {
    let f = fixture(t);
    let d = disk(t);
    let fs = Fat::new(&d).unwrap();
    let big = fs.lookup(&fs.root(), "big.bin").unwrap();
    let content = &f.files[0].1;

    // One request for the data (plus one for its partial last block) plus the FAT read in
    // windows of at least 4 KiB.
    let l = layout(&f.image);
    let fat_span = content.len() as u64 / l.cluster_size * u64::from(l.bits) / 8;
    d.reset_calls();
    assert_eq!(read_all(&fs, &big), *content);
    let whole = d.calls() as u64;
    assert!(
        whole <= 3 + fat_span / 4096,
        "whole contiguous read took {whole} requests"
    );

    // Sequential chunks: one data request each and no repeated chain walks hitting the disk.
    let fs = Fat::new(&d).unwrap();
    let chunk = 64 * 1024;
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    let mut chunks = 0;
    d.reset_calls();
    loop {
        let n = fs.read(&big, off, &mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert_eq!(&buf[..n], &content[off as usize..off as usize + n]);
        off += n as u64;
        chunks += 1;
    }
    let calls = d.calls() as u64;
    assert!(
        calls <= chunks + 3 + fat_span / 4096,
        "{chunks} sequential chunks took {calls} requests"
    );

    // The fragmented file: one request per run, plus FAT windows.
    let frag = fs.lookup(&fs.root(), "frag.bin").unwrap();
    let runs = common::Layout::runs(&layout(&f.image).chain(&f.image, frag.first_cluster));
    assert!(runs >= 4, "frag.bin has only {runs} runs");
    d.reset_calls();
    let expected = &f.files.iter().find(|(p, _)| p == "frag.bin").unwrap().1;
    assert_eq!(&read_all(&fs, &frag), expected);
    assert!(
        d.calls() <= runs + 4,
        "frag.bin ({runs} runs) read in {} requests",
        d.calls()
    );
}

fn check_lookup(t: FatType) {
    let d = disk(t);
    let fs = Fat::new(&d).unwrap();
    let root = fs.root();
    let boot = fs.lookup(&root, "EFI/BOOT/BOOTX64.EFI").unwrap();
    for p in [
        "efi\\boot\\bootx64.efi",
        "/Efi/Boot/BootX64.efi",
        "\\EFI\\BOOT\\BOOTX64.EFI",
        "EFI//BOOT/./BOOTX64.EFI",
        "EFI/BOOT/../BOOT/BOOTX64.EFI",
        "loader/../EFI/BOOT/BOOTX64.EFI",
        "../EFI/BOOT/BOOTX64.EFI",
    ] {
        assert_eq!(fs.lookup(&root, p).unwrap(), boot, "{p}");
    }

    let entries = fs.lookup(&root, "loader/entries").unwrap();
    assert!(entries.is_dir);
    assert_eq!(entries.name, "entries");
    let conf = fs.lookup(&entries, "DEBIAN-6.1.CONF").unwrap();
    assert_eq!(conf.name, "debian-6.1.conf");
    // The 8.3 alias mtools generated.
    assert_eq!(fs.lookup(&entries, "debian~1.con").unwrap(), conf);
    assert_eq!(
        fs.lookup(&entries, "../../EFI/BOOT/BOOTX64.EFI").unwrap(),
        boot
    );
    assert_eq!(
        fs.lookup(&entries, "/vmlinuz-6.1.0-57-CLOUD-amd64")
            .unwrap()
            .name,
        LONG_KERNEL
    );
    assert_eq!(fs.lookup(&entries, "\\").unwrap(), root);
    assert_eq!(fs.lookup(&entries, "").unwrap(), entries);
    assert_eq!(fs.lookup(&entries, ".").unwrap(), entries);

    // ".." from a node handed in (no path history) goes through the on-disk "..".
    let loader = fs.lookup(&root, "loader").unwrap();
    assert_eq!(fs.lookup(&entries, "..").unwrap(), loader);
    assert_eq!(fs.lookup(&loader, "..").unwrap(), root);
    assert_eq!(fs.lookup(&entries, "../..").unwrap(), root);
    assert_eq!(fs.lookup(&entries, "../../../..").unwrap(), root);
    let b = fs.lookup(&root, "deep/a/b").unwrap();
    assert_eq!(fs.lookup(&b, "../..").unwrap().name, "deep");
    assert_eq!(fs.lookup(&b, "..").unwrap().name, "a");
    assert_eq!(fs.lookup(&b, "../../a/b/leaf.txt").unwrap().size, 5000);

    assert_eq!(fs.lookup(&root, "nope"), Err(FatError::NotFound));
    assert_eq!(fs.lookup(&root, "EFI/nope/x"), Err(FatError::NotFound));
    assert_eq!(
        fs.lookup(&root, "EFI/BOOT/BOOTX64.EFI/x"),
        Err(FatError::NotADirectory)
    );
    assert_eq!(
        fs.lookup(&root, "EFI/BOOT/BOOTX64.EFI/.."),
        Err(FatError::NotADirectory)
    );
    assert_eq!(
        fs.read(&entries, 0, &mut [0; 4]),
        Err(FatError::IsADirectory)
    );
    assert_eq!(fs.next_entry(&boot, &mut 0), Err(FatError::NotADirectory));
}

fn check_listings(t: FatType) {
    let f = fixture(t);
    let d = disk(t);
    let fs = Fat::new(&d).unwrap();
    let root = fs.root();

    let mut names: Vec<(String, bool, u64)> = list(&fs, &root)
        .into_iter()
        .map(|n| (n.name, n.is_dir, n.size))
        .collect();
    names.sort();
    let mut expected: Vec<(String, bool, u64)> = ["EFI", "loader", "deep", "many"]
        .iter()
        .map(|n| (n.to_string(), true, 0))
        .collect();
    for (p, c) in &f.files {
        if !p.contains('/') {
            expected.push((p.clone(), false, c.len() as u64));
        }
    }
    expected.sort();
    assert_eq!(names, expected);

    // "." and ".." are skipped.
    let entries = fs.lookup(&root, "loader/entries").unwrap();
    let l = list(&fs, &entries);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].name, "debian-6.1.conf");

    // Spans several clusters on every type: 3 entries per file.
    let many = fs.lookup(&root, "many").unwrap();
    let l = list(&fs, &many);
    assert!(MANY as u64 * 3 * 32 > u64::from(fs.cluster_size()));
    let got: Vec<String> = l.iter().map(|n| n.name.clone()).collect();
    let want: Vec<String> = (0..MANY).map(many_name).collect();
    assert_eq!(got, want);
    for n in &l {
        assert_eq!(fs.lookup(&many, &n.name.to_uppercase()).unwrap(), *n);
    }

    let empty = fs.lookup(&root, "empty.txt").unwrap();
    assert_eq!(empty.size, 0);
    assert_eq!(empty.first_cluster, 0);
    assert_eq!(fs.read(&empty, 0, &mut [0; 16]).unwrap(), 0);

    let conf = fs.lookup(&root, "loader/entries/debian-6.1.conf").unwrap();
    assert_eq!(
        conf.modified,
        DateTime {
            year: 2021,
            month: 3,
            day: 4,
            hour: 5,
            minute: 6,
            second: 8
        }
    );
    assert_ne!(conf.created, DateTime::default());
    assert_eq!(conf.attributes & lightbyte_firmware::fat::ATTR_DIRECTORY, 0);
    assert_ne!(
        entries.attributes & lightbyte_firmware::fat::ATTR_DIRECTORY,
        0
    );
}

macro_rules! per_type {
    ($($name:ident: $t:expr,)*) => {$(
        mod $name {
            use super::*;
            #[test]
            fn geometry() {
                check_geometry($t);
            }
            #[test]
            fn all_files() {
                check_all_files($t, 512);
            }
            #[test]
            fn all_files_on_4k_blocks() {
                check_all_files($t, 4096);
            }
            #[test]
            fn random_reads() {
                check_random_reads($t);
            }
            #[test]
            fn request_counts() {
                check_request_counts($t);
            }
            #[test]
            fn lookup() {
                check_lookup($t);
            }
            #[test]
            fn listings() {
                check_listings($t);
            }
        }
    )*};
}

per_type! {
    fat12: FatType::Fat12,
    fat16: FatType::Fat16,
    fat32: FatType::Fat32,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn nt_case_bits_lowercase_short_names() {
    let mut img = fixture(FatType::Fat16).image.clone();
    let at = find(&img, b"UPPER   TXT").unwrap();
    for (flags, name) in [
        (0x08, "upper.TXT"),
        (0x10, "UPPER.txt"),
        (0x18, "upper.txt"),
    ] {
        img[at + 12] = flags;
        let d = MemDisk::new(img.clone(), 512);
        let fs = Fat::new(&d).unwrap();
        let node = fs.lookup(&fs.root(), "Upper.Txt").unwrap();
        assert_eq!(node.name, name);
    }
}

#[test]
fn lfn_with_wrong_checksum_falls_back_to_short_name() {
    let img = fixture(FatType::Fat16).image.clone();
    // The LFN entry holding the first 5 characters (sequence 1, right before the 8.3 entry).
    let utf16: Vec<u8> = "vmlin".encode_utf16().flat_map(u16::to_le_bytes).collect();
    let lfn = find(&img, &utf16).unwrap() - 1;
    assert_eq!(img[lfn], 1);
    // Either the LFN parts disagree with each other, or the 8.3 entry was renamed since.
    for (at, expect_short) in [(lfn + 13, "VMLINU~1"), (lfn + 32 + 7, "VMLINU~9")] {
        let mut img = img.clone();
        if at == lfn + 13 {
            img[at] ^= 0x5A;
        } else {
            img[at] = b'9';
        }
        let d = MemDisk::new(img, 512);
        let fs = Fat::new(&d).unwrap();
        assert_eq!(fs.lookup(&fs.root(), LONG_KERNEL), Err(FatError::NotFound));
        let short = list(&fs, &fs.root())
            .into_iter()
            .find(|n| n.size == 200_000)
            .unwrap();
        assert!(short.name.starts_with(expect_short), "{}", short.name);
        assert_eq!(fs.lookup(&fs.root(), &short.name).unwrap(), short);
    }
}

#[test]
fn label_absent_or_only_in_boot_sector() {
    let t = TempDir::new("nolabel");
    run(t.path(), "mkfs.vfat", &["-C", "a", "2048"]);
    run(t.path(), "mkfs.vfat", &["-n", "BPBONLY", "-C", "b", "2048"]);
    let a = MemDisk::new(std::fs::read(t.join("a")).unwrap(), 512);
    assert_eq!(Fat::new(&a).unwrap().volume_label(), "");

    // Drop the root's label entry: the boot sector copy remains.
    let mut b = std::fs::read(t.join("b")).unwrap();
    let l = layout(&b);
    let root = (l.fat_offset + 2 * l.fat_bytes) as usize;
    assert_eq!(&b[root..root + 11], b"BPBONLY    ");
    b[root] = 0xE5;
    let b = MemDisk::new(b, 512);
    assert_eq!(Fat::new(&b).unwrap().volume_label(), "BPBONLY");
}

#[test]
fn four_k_sectors() {
    let t = TempDir::new("4k");
    run(
        t.path(),
        "mkfs.vfat",
        &[
            "-S",
            "4096",
            "-s",
            "1",
            "-F",
            "16",
            "-C",
            "img",
            &(20 * 1024).to_string(),
        ],
    );
    let content = pattern(9, 123_457);
    std::fs::write(t.join("k"), &content).unwrap();
    run(t.path(), "mmd", &["-i", "img", "::/EFI"]);
    run(t.path(), "mcopy", &["-i", "img", "k", "::/EFI/kernel.img"]);
    let d = MemDisk::new(std::fs::read(t.join("img")).unwrap(), 4096);
    let fs = Fat::new(&d).unwrap();
    assert_eq!(fs.fat_type(), FatType::Fat16);
    assert_eq!(fs.cluster_size() % 4096, 0);
    let node = fs.lookup(&fs.root(), "efi/KERNEL.IMG").unwrap();
    assert_eq!(read_all(&fs, &node), content);
}

#[test]
fn not_fat() {
    let zeros = MemDisk::new(vec![0; 1 << 20], 512);
    assert!(matches!(Fat::new(&zeros), Err(FatError::NotFat(_))));
    let tiny = MemDisk::new(vec![0; 0], 512);
    assert_eq!(Fat::new(&tiny).err(), Some(FatError::Io));

    // A real boot sector with one field broken at a time.
    let img = fixture(FatType::Fat12).image.clone();
    for (at, value) in [(11, 0x00), (13, 3), (14, 0), (16, 0), (21, 0x12), (22, 0)] {
        let mut bad = img.clone();
        bad[at] = value;
        bad[at + 1] = 0;
        let d = MemDisk::new(bad, 512);
        assert!(
            matches!(Fat::new(&d), Err(FatError::NotFat(_))),
            "byte {at} = {value}"
        );
    }
    // A volume claiming more sectors than the device holds.
    let mut big = img.clone();
    big[19..21].copy_from_slice(&0u16.to_le_bytes());
    big[32..36].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let d = MemDisk::new(big, 512);
    assert!(matches!(Fat::new(&d), Err(FatError::NotFat(_))));
}

#[test]
fn corrupt_chains_are_errors_not_hangs() {
    let f = fixture(FatType::Fat16);
    let l = layout(&f.image);
    let d0 = MemDisk::new(f.image.clone(), 512);
    let fs = Fat::new(&d0).unwrap();
    let big = fs.lookup(&fs.root(), "big.bin").unwrap();
    let c = big.first_cluster as usize;
    let fat = l.fat_offset as usize;

    // A loop back to the file's first cluster, shorter than the file: reads terminate (the
    // data repeats; only the chain length bound can catch loops).
    let mut img = f.image.clone();
    img[fat + 2 * (c + 5)..fat + 2 * (c + 6)].copy_from_slice(&(c as u16).to_le_bytes());
    let d = MemDisk::new(img.clone(), 512);
    let fs = Fat::new(&d).unwrap();
    let mut buf = vec![0u8; big.size as usize];
    assert_eq!(fs.read(&big, 0, &mut buf).unwrap(), buf.len());
    assert_eq!(
        &buf[..5 * l.cluster_size as usize],
        &f.files[0].1[..5 * l.cluster_size as usize]
    );

    // The same loop under a 4 GiB size: it would go round forever, and is cut off once the
    // chain is longer than the volume.
    let entry = find(&img, b"BIG     BIN").unwrap();
    img[entry + 28..entry + 32].copy_from_slice(&u32::MAX.to_le_bytes());
    let d = MemDisk::new(img, 512);
    let fs = Fat::new(&d).unwrap();
    let huge = fs.lookup(&fs.root(), "big.bin").unwrap();
    assert_eq!(huge.size, u64::from(u32::MAX));
    let r = fs.read(&huge, u64::from(u32::MAX) - 10, &mut buf[..4]);
    assert_eq!(
        r,
        Err(FatError::Corrupt("cluster chain longer than the volume"))
    );
    let r = fs.read(&huge, 0, &mut buf);
    assert!(r.is_ok(), "{r:?}");

    // A size beyond the end of an intact chain.
    let mut img = f.image.clone();
    img[entry + 28..entry + 32].copy_from_slice(&(big.size as u32 + 10_000).to_le_bytes());
    let d = MemDisk::new(img, 512);
    let fs = Fat::new(&d).unwrap();
    let long = fs.lookup(&fs.root(), "big.bin").unwrap();
    // The last real cluster still has room past the old size, so read beyond that.
    let r = fs.read(&long, big.size + 5000, &mut buf[..100]);
    assert_eq!(
        r,
        Err(FatError::Corrupt("cluster chain shorter than the file"))
    );

    // A self-loop in a directory chain: listing ends in an error, bounded.
    let many = fs.lookup(&fs.root(), "many").unwrap();
    let m = many.first_cluster as usize;
    let mut img = f.image.clone();
    img[fat + 2 * m..fat + 2 * (m + 1)].copy_from_slice(&(m as u16).to_le_bytes());
    let d = MemDisk::new(img, 512);
    let fs = Fat::new(&d).unwrap();
    let mut buf = vec![0u8; big.size as usize];
    let mut pos = 0;
    let mut seen = 0;
    let end = loop {
        match fs.next_entry(&many, &mut pos) {
            Ok(Some(_)) => seen += 1,
            other => break other,
        }
        assert!(seen < 100_000);
    };
    assert!(
        end.is_ok() || matches!(end, Err(FatError::Corrupt(_))),
        "{end:?}"
    );

    // Free and out-of-range links.
    for value in [0u16, 1, 0xFFF7, 0xFFF0] {
        let mut img = f.image.clone();
        img[fat + 2 * (c + 1)..fat + 2 * (c + 2)].copy_from_slice(&value.to_le_bytes());
        let d = MemDisk::new(img, 512);
        let fs = Fat::new(&d).unwrap();
        let r = fs.read(&big, 0, &mut buf);
        assert!(matches!(r, Err(FatError::Corrupt(_))), "{value:#x}: {r:?}");
    }
}
