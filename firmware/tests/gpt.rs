//! GPT parsing against sgdisk-made disks, block helpers and CRC-32.

mod common;

use std::sync::OnceLock;

use common::{le32, le64, pattern, run, MemDisk, Rng, TempDir};
use lightbyte_firmware::block::{read_bytes, BlockDevice, IoError, Slice};
use lightbyte_firmware::crc32::{crc32, update};
use lightbyte_firmware::fat::{Fat, FatError};
use lightbyte_firmware::gpt::{self, guid_to_string, Gpt, GptError, ESP_TYPE, LINUX_FS_TYPE};

struct Disk {
    image: Vec<u8>,
    boot_efi: Vec<u8>,
    /// `sgdisk -i N` fields per partition: (unique GUID, first, last, name).
    info: Vec<(String, u64, u64, String)>,
    disk_guid: String,
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    let line = text.lines().find(|l| l.starts_with(key)).unwrap();
    line[key.len()..].trim()
}

/// 64 MiB disk: an ESP holding a FAT filesystem and a Linux partition filling the rest.
fn disk() -> &'static Disk {
    static DISK: OnceLock<Disk> = OnceLock::new();
    DISK.get_or_init(|| {
        let t = TempDir::new("gpt");
        let d = t.path();
        run(d, "truncate", &["-s", "64M", "d.img"]);
        run(
            d,
            "sgdisk",
            &[
                "-n",
                "1:2048:+32M",
                "-t",
                "1:ef00",
                "-c",
                "1:ESP",
                "-n",
                "2:0:0",
                "-t",
                "2:8300",
                "-c",
                "2:rööt fs",
                "d.img",
            ],
        );
        run(d, "mkfs.vfat", &["-n", "ESP", "-C", "esp.img", "32768"]);
        let boot_efi = pattern(77, 150_000);
        std::fs::write(d.join("boot"), &boot_efi).unwrap();
        run(d, "mmd", &["-i", "esp.img", "::/EFI", "::/EFI/BOOT"]);
        run(
            d,
            "mcopy",
            &["-i", "esp.img", "boot", "::/EFI/BOOT/BOOTX64.EFI"],
        );
        run(
            d,
            "dd",
            &[
                "if=esp.img",
                "of=d.img",
                "bs=512",
                "seek=2048",
                "conv=notrunc",
                "status=none",
            ],
        );
        let mut info = Vec::new();
        for n in 1..=2 {
            let out = run(d, "sgdisk", &["-i", &n.to_string(), "d.img"]);
            let num = |k| {
                field(&out, k)
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            info.push((
                field(&out, "Partition unique GUID:").to_lowercase(),
                num("First sector:"),
                num("Last sector:"),
                field(&out, "Partition name:")
                    .trim_matches('\'')
                    .to_string(),
            ));
        }
        let p = run(d, "sgdisk", &["-p", "d.img"]);
        Disk {
            image: std::fs::read(d.join("d.img")).unwrap(),
            boot_efi,
            info,
            disk_guid: field(&p, "Disk identifier (GUID):").to_lowercase(),
        }
    })
}

fn parse(image: &[u8]) -> Result<Gpt, GptError> {
    gpt::read(&MemDisk::new(image.to_vec(), 512))
}

const LAST: usize = 64 * 1024 * 1024 - 512;

/// Recomputes the header CRC after editing a header at `at`.
fn fix_header_crc(img: &mut [u8], at: usize) {
    let size = le32(img, at + 12) as usize;
    img[at + 16..at + 20].fill(0);
    let c = crc32(&img[at..at + size]);
    img[at + 16..at + 20].copy_from_slice(&c.to_le_bytes());
}

/// Recomputes the entry array CRC of the header at `at`, then the header CRC.
fn fix_entries_crc(img: &mut [u8], at: usize) {
    let lba = le64(img, at + 72) as usize;
    let len = le32(img, at + 80) as usize * le32(img, at + 84) as usize;
    let c = crc32(&img[lba * 512..lba * 512 + len]);
    img[at + 88..at + 92].copy_from_slice(&c.to_le_bytes());
    fix_header_crc(img, at);
}

#[test]
fn sgdisk_layout() {
    let d = disk();
    let g = parse(&d.image).unwrap();
    assert_eq!(guid_to_string(&g.disk_guid), d.disk_guid);
    assert_eq!(g.partitions.len(), 2);
    let (esp, linux) = (&g.partitions[0], &g.partitions[1]);
    assert_eq!(esp.number, 1);
    assert_eq!(esp.type_guid, ESP_TYPE);
    assert_eq!(esp.name, "ESP");
    assert_eq!(esp.first_lba, 2048);
    assert_eq!(esp.last_lba, 2048 + 32 * 2048 - 1);
    assert_eq!(linux.number, 2);
    assert_eq!(linux.type_guid, LINUX_FS_TYPE);
    assert_eq!(linux.name, "rööt fs");
    for (p, (guid, first, last, name)) in g.partitions.iter().zip(&d.info) {
        assert_eq!(&guid_to_string(&p.unique_guid), guid);
        assert_eq!((p.first_lba, p.last_lba), (*first, *last));
        assert_eq!(&p.name, name);
    }
    assert_eq!(
        guid_to_string(&ESP_TYPE),
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    );
    assert_eq!(
        guid_to_string(&LINUX_FS_TYPE),
        "0fc63daf-8483-4772-8e79-3d69d8477de4"
    );
}

#[test]
fn falls_back_to_backup() {
    let d = disk();
    let good = parse(&d.image).unwrap();

    let mut img = d.image.clone();
    img[512 + 60] ^= 1;
    assert_eq!(parse(&img).unwrap(), good);

    // Primary signature gone entirely.
    let mut img = d.image.clone();
    img[512..1024].fill(0);
    assert_eq!(parse(&img).unwrap(), good);

    // Primary entry array corrupted.
    let mut img = d.image.clone();
    img[2 * 512 + 100] ^= 0x80;
    assert_eq!(parse(&img).unwrap(), good);

    // Primary header valid but describing garbage.
    let mut img = d.image.clone();
    img[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_header_crc(&mut img, 512);
    assert_eq!(parse(&img).unwrap(), good);
}

#[test]
fn both_headers_bad() {
    let d = disk();
    let mut img = d.image.clone();
    img[512 + 60] ^= 1;
    img[LAST + 60] ^= 1;
    assert_eq!(parse(&img), Err(GptError::BadHeaderCrc));

    // Primary's error wins.
    let mut img = d.image.clone();
    img[512..1024].fill(0);
    img[LAST + 60] ^= 1;
    assert_eq!(parse(&img), Err(GptError::NoGpt));

    let mut img = d.image.clone();
    img[2 * 512 + 100] ^= 0x80;
    let backup_entries = le64(&img, LAST + 72) as usize * 512;
    img[backup_entries + 100] ^= 0x80;
    assert_eq!(parse(&img), Err(GptError::BadEntriesCrc));
}

#[test]
fn no_gpt() {
    assert_eq!(parse(&vec![0; 1 << 20]), Err(GptError::NoGpt));
    assert_eq!(parse(&[0; 1024]), Err(GptError::NoGpt));
    assert_eq!(parse(&pattern(5, 1 << 20)), Err(GptError::NoGpt));
}

#[test]
fn invalid_fields() {
    let d = disk();
    type Edit = fn(&mut Vec<u8>, usize);
    let edits: [(Edit, &str); 6] = [
        (
            |i, h| i[h + 80..h + 84].copy_from_slice(&u32::MAX.to_le_bytes()),
            "entry count",
        ),
        (
            |i, h| i[h + 84..h + 88].copy_from_slice(&200u32.to_le_bytes()),
            "entry size",
        ),
        (
            |i, h| i[h + 12..h + 16].copy_from_slice(&4000u32.to_le_bytes()),
            "header size",
        ),
        (
            |i, h| i[h + 48..h + 56].copy_from_slice(&u64::MAX.to_le_bytes()),
            "last usable",
        ),
        (
            |i, h| i[h + 72..h + 80].copy_from_slice(&(u64::MAX - 3).to_le_bytes()),
            "entries LBA",
        ),
        (
            |i, h| i[h + 24..h + 32].copy_from_slice(&7u64.to_le_bytes()),
            "my LBA",
        ),
    ];
    for (edit, what) in edits {
        let mut img = d.image.clone();
        for h in [512, LAST] {
            edit(&mut img, h);
            if le32(&img, h + 12) <= 512 {
                fix_header_crc(&mut img, h);
            }
        }
        assert!(
            matches!(parse(&img), Err(GptError::Invalid(_))),
            "{what}: {:?}",
            parse(&img)
        );
    }

    // Partition entries out of range or inverted, with every CRC fixed.
    for (first, last) in [(2048u64, 1u64 << 40), (5000, 4000), (1, 100)] {
        let mut img = d.image.clone();
        for h in [512, LAST] {
            let e = le64(&img, h + 72) as usize * 512;
            img[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            img[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
            fix_entries_crc(&mut img, h);
        }
        assert!(matches!(parse(&img), Err(GptError::Invalid(_))));
    }
}

#[test]
fn gpt_fuzz_never_panics() {
    let d = disk();
    let mut rng = Rng(42);
    let mut dev = MemDisk::new(d.image.clone(), 512);
    let regions = [0..34 * 512, LAST - 32 * 512..LAST + 512];
    for i in 0..400 {
        let img = &mut dev.data;
        let mut undo = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let r = &regions[rng.below(2) as usize];
            let at = r.start + rng.below((r.end - r.start) as u64) as usize;
            undo.push((at, img[at]));
            img[at] ^= 1 + rng.below(255) as u8;
        }
        // Half the time make the corruption pass the CRC checks to reach the validation.
        if i % 2 == 0 {
            for h in [512, LAST] {
                for k in 0..92 {
                    undo.push((h + k, img[h + k]));
                }
                if !(92..=512).contains(&le32(img, h + 12)) {
                    continue;
                }
                let lba = le64(img, h + 72);
                let len = u64::from(le32(img, h + 80)) * u64::from(le32(img, h + 84));
                let fits = lba
                    .checked_mul(512)
                    .and_then(|o| o.checked_add(len))
                    .is_some_and(|end| end <= img.len() as u64);
                if fits && len <= 1 << 20 {
                    fix_entries_crc(img, h);
                } else {
                    fix_header_crc(img, h);
                }
            }
        }
        let _ = gpt::read(&dev);
        for (at, b) in undo.into_iter().rev() {
            dev.data[at] = b;
        }
    }
    assert!(dev.data == d.image);
}

/// A GPT written by hand on a 4096-byte-block disk (sgdisk only makes 512-byte ones).
#[test]
fn four_k_blocks() {
    const BS: usize = 4096;
    let blocks = 1024usize;
    let mut img = vec![0u8; BS * blocks];
    let entries_bytes = 128 * 128;
    let write_entries = |img: &mut Vec<u8>, lba: usize| {
        let e = &mut img[lba * BS..lba * BS + 128];
        e[..16].copy_from_slice(&ESP_TYPE);
        e[16..32].copy_from_slice(&[7; 16]);
        e[32..40].copy_from_slice(&10u64.to_le_bytes());
        e[40..48].copy_from_slice(&500u64.to_le_bytes());
        for (k, u) in "Ü boot".encode_utf16().enumerate() {
            e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
        }
    };
    let backup_entries = blocks - 1 - entries_bytes / BS;
    write_entries(&mut img, 2);
    write_entries(&mut img, backup_entries);
    for (h, me, alt, entries) in [
        (1, 1u64, blocks as u64 - 1, 2u64),
        (blocks - 1, blocks as u64 - 1, 1, backup_entries as u64),
    ] {
        let at = h * BS;
        img[at..at + 8].copy_from_slice(b"EFI PART");
        img[at + 8..at + 12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        img[at + 12..at + 16].copy_from_slice(&92u32.to_le_bytes());
        img[at + 24..at + 32].copy_from_slice(&me.to_le_bytes());
        img[at + 32..at + 40].copy_from_slice(&alt.to_le_bytes());
        img[at + 40..at + 48].copy_from_slice(&6u64.to_le_bytes());
        img[at + 48..at + 56].copy_from_slice(&(blocks as u64 - 6).to_le_bytes());
        img[at + 56..at + 72].copy_from_slice(&[0xAB; 16]);
        img[at + 72..at + 80].copy_from_slice(&entries.to_le_bytes());
        img[at + 80..at + 84].copy_from_slice(&128u32.to_le_bytes());
        img[at + 84..at + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = entries as usize * BS;
        let c = crc32(&img[e..e + entries_bytes]);
        img[at + 88..at + 92].copy_from_slice(&c.to_le_bytes());
        let c = crc32(&img[at..at + 92]);
        img[at + 16..at + 20].copy_from_slice(&c.to_le_bytes());
    }
    let check = |img: &[u8]| {
        let g = gpt::read(&MemDisk::new(img.to_vec(), BS as u32)).unwrap();
        assert_eq!(g.disk_guid, [0xAB; 16]);
        assert_eq!(g.partitions.len(), 1);
        let p = &g.partitions[0];
        assert_eq!((p.number, p.first_lba, p.last_lba), (1, 10, 500));
        assert_eq!(p.name, "Ü boot");
        assert_eq!(p.num_blocks(), 491);
    };
    check(&img);
    img[BS + 60] ^= 1;
    check(&img);
}

#[test]
fn fat_inside_partition() {
    let d = disk();
    let dev = MemDisk::new(d.image.clone(), 512);
    let g = gpt::read(&dev).unwrap();
    let esp = &g.partitions[0];
    let part = Slice {
        dev: &dev,
        first: esp.first_lba,
        count: esp.num_blocks(),
    };
    let fs = Fat::new(&part).unwrap();
    assert_eq!(fs.volume_label(), "ESP");
    let f = fs.lookup(&fs.root(), "/efi/boot/bootx64.efi").unwrap();
    let mut buf = vec![0u8; f.size as usize];
    assert_eq!(fs.read(&f, 0, &mut buf).unwrap(), d.boot_efi.len());
    assert_eq!(buf, d.boot_efi);

    let linux = &g.partitions[1];
    let part2 = Slice {
        dev: &dev,
        first: linux.first_lba,
        count: linux.num_blocks(),
    };
    assert!(matches!(Fat::new(&part2), Err(FatError::NotFat(_))));
}

#[test]
fn slice_bounds() {
    let data = pattern(3, 64 * 512);
    let dev = MemDisk::new(data.clone(), 512);
    let s = Slice {
        dev: &dev,
        first: 8,
        count: 16,
    };
    assert_eq!(s.num_blocks(), 16);
    assert_eq!(s.block_size(), 512);
    let mut buf = vec![0u8; 2 * 512];
    s.read_blocks(14, &mut buf).unwrap();
    assert_eq!(buf, data[22 * 512..24 * 512]);
    assert_eq!(s.read_blocks(15, &mut buf), Err(IoError));
    assert_eq!(s.read_blocks(u64::MAX, &mut buf), Err(IoError));
    assert_eq!(s.read_blocks(0, &mut buf[..100]), Err(IoError));
    let mut one = [0u8; 1];
    assert_eq!(read_bytes(&s, 16 * 512, &mut one), Err(IoError));
    read_bytes(&s, 16 * 512 - 1, &mut one).unwrap();
    assert_eq!(one[0], data[24 * 512 - 1]);
}

#[test]
fn read_bytes_matches_and_is_cheap() {
    for bs in [512u32, 4096] {
        let data = pattern(bs as u64, 256 * 1024);
        let dev = MemDisk::new(data.clone(), bs);
        let mut rng = Rng(99);
        for _ in 0..500 {
            let off = rng.below(data.len() as u64) as usize;
            let len = rng.below((data.len() - off) as u64 + 1) as usize;
            let mut buf = vec![0u8; len];
            dev.reset_calls();
            read_bytes(&dev, off as u64, &mut buf).unwrap();
            assert_eq!(buf, data[off..off + len]);
            assert!(dev.calls() <= 3);
        }
        let mut buf = vec![0u8; 64 * 1024];
        dev.reset_calls();
        read_bytes(&dev, 8192, &mut buf).unwrap();
        assert_eq!(dev.calls(), 1);
        assert_eq!(
            read_bytes(&dev, data.len() as u64 - 10, &mut buf[..11]),
            Err(IoError)
        );
        assert_eq!(read_bytes(&dev, u64::MAX, &mut buf[..2]), Err(IoError));
        read_bytes(&dev, u64::MAX, &mut []).unwrap();
    }
}

#[test]
fn crc32_vectors() {
    assert_eq!(crc32(b""), 0);
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(
        crc32(b"The quick brown fox jumps over the lazy dog"),
        0x414F_A339
    );
    let data = pattern(8, 10_000);
    assert_eq!(
        update(update(0, &data[..3333]), &data[3333..]),
        crc32(&data)
    );
}
