//! GUID Partition Table parsing (UEFI spec, chapter 5.3).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::block::{read_bytes, BlockDevice, IoError};
use crate::crc32::crc32;

/// Builds the on-disk form of a GUID from its textual fields: the first three fields are
/// stored little-endian, the last eight bytes as written.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// EFI System Partition, C12A7328-F81F-11D2-BA4B-00A0C93EC93B.
pub const ESP_TYPE: [u8; 16] = guid(
    0xC12A_7328,
    0xF81F,
    0x11D2,
    [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
);

/// Linux filesystem data, 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
pub const LINUX_FS_TYPE: [u8; 16] = guid(
    0x0FC6_3DAF,
    0x8483,
    0x4772,
    [0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4],
);

const SIGNATURE: &[u8; 8] = b"EFI PART";
const MIN_HEADER_SIZE: u32 = 92;
const MIN_ENTRY_SIZE: u32 = 128;
// The spec requires room for at least 128 entries (16 KiB); 1 MiB leaves plenty of headroom
// while keeping a corrupt count from making us allocate or read gigabytes.
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
const NAME_UNITS: usize = 36;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based index of the entry in the partition array.
    pub number: u32,
    pub type_guid: [u8; 16],
    pub unique_guid: [u8; 16],
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub name: String,
}

impl Partition {
    pub fn num_blocks(&self) -> u64 {
        // Saturating so a hand-built, inverted entry cannot panic; entries from `read` are
        // always ordered.
        self.last_lba
            .saturating_sub(self.first_lba)
            .saturating_add(1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub disk_guid: [u8; 16],
    pub partitions: Vec<Partition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptError {
    Io,
    /// No "EFI PART" signature at LBA 1 (nor in the backup header).
    NoGpt,
    BadHeaderCrc,
    BadEntriesCrc,
    Invalid(&'static str),
}

impl fmt::Display for GptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GptError::Io => f.write_str("I/O error reading the partition table"),
            GptError::NoGpt => f.write_str("no GPT signature"),
            GptError::BadHeaderCrc => f.write_str("GPT header CRC mismatch"),
            GptError::BadEntriesCrc => f.write_str("GPT partition entries CRC mismatch"),
            GptError::Invalid(why) => write!(f, "invalid GPT: {why}"),
        }
    }
}

impl From<IoError> for GptError {
    fn from(_: IoError) -> Self {
        GptError::Io
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

fn guid_at(b: &[u8], at: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

/// Reads the partition table, falling back to the backup header at the last LBA when the
/// primary one (or its entry array) is unusable.
pub fn read(dev: &dyn BlockDevice) -> Result<Gpt, GptError> {
    let num_blocks = dev.num_blocks();
    if num_blocks < 3 {
        return Err(GptError::NoGpt);
    }
    let primary = read_at(dev, 1);
    match primary {
        Ok(gpt) => Ok(gpt),
        Err(err) => {
            let backup_lba = num_blocks - 1;
            read_at(dev, backup_lba).map_err(|_| err)
        }
    }
}

fn read_at(dev: &dyn BlockDevice, lba: u64) -> Result<Gpt, GptError> {
    let bs = dev.block_size();
    let num_blocks = dev.num_blocks();
    if bs < 512 {
        return Err(GptError::Invalid("block size below 512"));
    }
    let mut hdr = vec![0u8; bs as usize];
    let hdr_offset = lba.checked_mul(u64::from(bs)).ok_or(GptError::Io)?;
    read_bytes(dev, hdr_offset, &mut hdr)?;
    if &hdr[..8] != SIGNATURE {
        return Err(GptError::NoGpt);
    }

    let header_size = le32(&hdr, 12);
    if header_size < MIN_HEADER_SIZE || header_size > bs {
        return Err(GptError::Invalid("header size out of range"));
    }
    let stored_crc = le32(&hdr, 16);
    let mut copy = hdr[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    if crc32(&copy) != stored_crc {
        return Err(GptError::BadHeaderCrc);
    }

    // A header copied to the wrong place (e.g. a cloned smaller disk) describes another layout.
    if le64(&hdr, 24) != lba {
        return Err(GptError::Invalid(
            "header MyLBA does not match its location",
        ));
    }
    let first_usable = le64(&hdr, 40);
    let last_usable = le64(&hdr, 48);
    if first_usable > last_usable || last_usable >= num_blocks {
        return Err(GptError::Invalid("usable LBA range outside the disk"));
    }
    let disk_guid = guid_at(&hdr, 56);
    let entries_lba = le64(&hdr, 72);
    let count = le32(&hdr, 80);
    let entry_size = le32(&hdr, 84);
    let entries_crc = le32(&hdr, 88);

    if entry_size < MIN_ENTRY_SIZE || entry_size % MIN_ENTRY_SIZE != 0 {
        return Err(GptError::Invalid("entry size not a multiple of 128"));
    }
    let array_bytes = u64::from(count) * u64::from(entry_size);
    if array_bytes > MAX_ENTRIES_BYTES {
        return Err(GptError::Invalid("partition entry array too large"));
    }
    let array_blocks = array_bytes.div_ceil(u64::from(bs));
    if entries_lba < 2 || entries_lba == lba {
        return Err(GptError::Invalid(
            "partition entry array overlaps the header",
        ));
    }
    match entries_lba.checked_add(array_blocks) {
        Some(end) if end <= num_blocks => {}
        _ => return Err(GptError::Invalid("partition entry array outside the disk")),
    }

    let mut entries = vec![0u8; array_bytes as usize];
    let entries_offset = entries_lba.checked_mul(u64::from(bs)).ok_or(GptError::Io)?;
    read_bytes(dev, entries_offset, &mut entries)?;
    if crc32(&entries) != entries_crc {
        return Err(GptError::BadEntriesCrc);
    }

    let mut partitions = Vec::new();
    for (i, e) in entries.chunks_exact(entry_size as usize).enumerate() {
        let type_guid = guid_at(e, 0);
        if type_guid == [0; 16] {
            continue;
        }
        let first_lba = le64(e, 32);
        let last_lba = le64(e, 40);
        if first_lba > last_lba {
            return Err(GptError::Invalid("partition ends before it starts"));
        }
        if first_lba < first_usable || last_lba > last_usable {
            return Err(GptError::Invalid("partition outside the usable LBA range"));
        }
        partitions.push(Partition {
            // `count` is a u32, so the index fits.
            number: i as u32 + 1,
            type_guid,
            unique_guid: guid_at(e, 16),
            first_lba,
            last_lba,
            name: decode_name(&e[56..56 + 2 * NAME_UNITS]),
        });
    }
    Ok(Gpt {
        disk_guid,
        partitions,
    })
}

fn decode_name(raw: &[u8]) -> String {
    let units = raw
        .chunks_exact(2)
        .map(|c| le16(c, 0))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// Canonical lowercase text form, e.g. `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`.
pub fn guid_to_string(g: &[u8; 16]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        le32(g, 0),
        le16(g, 4),
        le16(g, 6),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}
