//! Device paths: building the ones we install (PciRoot/Pci/HD/File), reading the ones loaders
//! pass (bounded: a path without an end node must not walk memory forever), and matching one
//! against another for LocateDevicePath.

use alloc::string::String;
use alloc::vec::Vec;
use r_efi::protocols::device_path::Protocol as Node;

const TYPE_HARDWARE: u8 = 1;
const TYPE_ACPI: u8 = 2;
const TYPE_MEDIA: u8 = 4;
const TYPE_END: u8 = 0x7f;
const SUB_PCI: u8 = 1;
const SUB_ACPI: u8 = 1;
const SUB_HARD_DRIVE: u8 = 1;
const SUB_FILE_PATH: u8 = 4;
const SUB_END_ENTIRE: u8 = 0xff;
const MAX_PATH: usize = 4096;

/// A device path being built, as bytes.
#[derive(Clone, Default)]
pub struct Path(pub Vec<u8>);

impl Path {
    fn node(mut self, ty: u8, sub: u8, body: &[u8]) -> Self {
        let len = (4 + body.len()) as u16;
        self.0.extend_from_slice(&[ty, sub]);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(body);
        self
    }

    /// `PciRoot(0)/Pci(device, function)`.
    pub fn pci(device: u8, function: u8) -> Self {
        let mut acpi = Vec::new();
        acpi.extend_from_slice(&0x0a03_41d0u32.to_le_bytes()); // EISA PNP0A03
        acpi.extend_from_slice(&0u32.to_le_bytes());
        Path::default().node(TYPE_ACPI, SUB_ACPI, &acpi).node(
            TYPE_HARDWARE,
            SUB_PCI,
            &[function, device],
        )
    }

    /// Appends a GPT partition node.
    pub fn hard_drive(self, number: u32, start: u64, size: u64, guid: &[u8; 16]) -> Self {
        let mut b = Vec::new();
        b.extend_from_slice(&number.to_le_bytes());
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(guid);
        b.push(2); // GPT
        b.push(2); // GUID signature
        self.node(TYPE_MEDIA, SUB_HARD_DRIVE, &b)
    }

    /// Appends a file path node.
    pub fn file(self, path: &str) -> Self {
        let mut b = Vec::new();
        for u in super::util::to_ucs2(path) {
            b.extend_from_slice(&u.to_le_bytes());
        }
        self.node(TYPE_MEDIA, SUB_FILE_PATH, &b)
    }

    /// Appends the nodes of `other` (without its end node).
    pub fn append(mut self, other: &[u8]) -> Self {
        self.0.extend_from_slice(other);
        self
    }

    /// Ends the path and leaks it, for installation as a protocol.
    pub fn finish(mut self) -> *mut Node {
        self.0.extend_from_slice(&[TYPE_END, SUB_END_ENTIRE, 4, 0]);
        let b = alloc::boxed::Box::leak(self.0.into_boxed_slice());
        b.as_mut_ptr() as *mut Node
    }
}

/// The bytes of the nodes of `p` before its end node, or `None` if it is malformed.
///
/// # Safety
/// `p` is null or points at a device path.
pub unsafe fn nodes<'a>(p: *const Node) -> Option<&'a [u8]> {
    if p.is_null() {
        return None;
    }
    let base = p as *const u8;
    let mut off = 0usize;
    loop {
        if off + 4 > MAX_PATH {
            return None;
        }
        // SAFETY: reading node headers one by one, bounded by MAX_PATH.
        let (ty, sub, len) = unsafe {
            let h = core::slice::from_raw_parts(base.add(off), 4);
            (h[0], h[1], u16::from_le_bytes([h[2], h[3]]) as usize)
        };
        if ty == TYPE_END && sub == SUB_END_ENTIRE {
            // SAFETY: the `off` bytes before were just walked.
            return Some(unsafe { core::slice::from_raw_parts(base, off) });
        }
        if len < 4 {
            return None;
        }
        off += len;
    }
}

/// Splits node bytes into (type, subtype, body) triples.
pub fn split(bytes: &[u8]) -> Vec<(u8, u8, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= bytes.len() {
        let len = u16::from_le_bytes([bytes[off + 2], bytes[off + 3]]) as usize;
        if len < 4 || off + len > bytes.len() {
            break;
        }
        out.push((bytes[off], bytes[off + 1], &bytes[off + 4..off + len]));
        off += len;
    }
    out
}

/// The file path the media file-path nodes of `bytes` spell, joined with backslashes.
pub fn file_path(bytes: &[u8]) -> Option<String> {
    let mut out = String::new();
    for (ty, sub, body) in split(bytes) {
        if ty != TYPE_MEDIA || sub != SUB_FILE_PATH {
            return None;
        }
        let units: Vec<u16> = body
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let part = super::util::ucs2_to_string(&units);
        if !out.is_empty() && !out.ends_with('\\') && !part.starts_with('\\') {
            out.push('\\');
        }
        out.push_str(&part);
    }
    Some(out)
}

/// Whether `prefix`'s nodes start `path`'s; returns how many bytes of `path` they cover.
pub fn prefix_len(prefix: &[u8], path: &[u8]) -> Option<usize> {
    (path.len() >= prefix.len() && &path[..prefix.len()] == prefix).then_some(prefix.len())
}
