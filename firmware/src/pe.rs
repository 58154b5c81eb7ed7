//! PE32+ image loader for x86_64 EFI applications and drivers (and EFI-stub Linux bzImages).
//!
//! Every offset and size in the file is attacker-controlled, so nothing here indexes, slices or
//! adds without a check. Header offsets are computed in `u64` from `u32`/`u16` fields plus small
//! constants, which cannot overflow; every range is then bounds-checked through [`span`] before
//! it is touched.

#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

const DOS_HEADER_LEN: u64 = 0x40;
const E_LFANEW_OFFSET: u64 = 0x3c;
const PE_SIGNATURE: &[u8; 4] = b"PE\0\0";
const COFF_HEADER_LEN: u64 = 20;
const MACHINE_X86_64: u16 = 0x8664;
const MAGIC_PE32: u16 = 0x10b;
const MAGIC_PE32_PLUS: u16 = 0x20b;
/// PE32+ optional header up to and including NumberOfRvaAndSizes; data directories follow.
const OPTIONAL_HEADER_FIXED_LEN: u64 = 112;
const DATA_DIRECTORY_LEN: u64 = 8;
const BASE_RELOC_DIRECTORY: u32 = 5;
const SECTION_HEADER_LEN: u64 = 40;
const IMAGE_FILE_RELOCS_STRIPPED: u16 = 0x0001;

const RELOC_BLOCK_HEADER_LEN: u32 = 8;
const REL_BASED_ABSOLUTE: u16 = 0;
const REL_BASED_HIGHLOW: u16 = 3;
const REL_BASED_DIR64: u16 = 10;

/// Why an image was rejected. Offsets and sizes are reported as found so a bad image can be
/// diagnosed from the message alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeError {
    NoMzSignature,
    /// The file ends inside a header structure.
    Truncated {
        what: &'static str,
        end: u64,
        file_len: u64,
    },
    PeHeaderOutOfRange {
        e_lfanew: u32,
        file_len: u64,
    },
    NoPeSignature {
        e_lfanew: u32,
    },
    WrongMachine(u16),
    NotPe32Plus(u16),
    OptionalHeaderTooSmall {
        size: u16,
        needed: u64,
    },
    BadSectionAlignment(u32),
    /// SizeOfHeaders does not cover the section table, so the copied headers would be incomplete.
    HeadersTooSmall {
        size_of_headers: u64,
        needed: u64,
    },
    HeadersLargerThanImage {
        size_of_headers: u64,
        size_of_image: u64,
    },
    EntryOutsideImage {
        entry_rva: u32,
        size_of_image: u64,
    },
    SectionOutsideImage {
        name: [u8; 8],
        virtual_address: u32,
        size: u32,
        size_of_image: u64,
    },
    SectionDataOutsideFile {
        name: [u8; 8],
        raw_offset: u32,
        size: u32,
        file_len: u64,
    },
    RelocDirOutsideImage {
        rva: u32,
        size: u32,
        size_of_image: u64,
    },
    /// Fewer than 8 bytes remain in the relocation directory where a block header should start.
    RelocBlockTruncated {
        offset: u64,
        remaining: u64,
    },
    RelocBlockBadSize {
        offset: u64,
        size: u32,
    },
    RelocBlockPastDirectory {
        offset: u64,
        size: u32,
        directory_size: u64,
    },
    RelocSiteOutsideImage {
        rva: u64,
        width: u8,
        size_of_image: u64,
    },
    UnsupportedRelocType {
        kind: u8,
        rva: u64,
    },
    DestSizeMismatch {
        dest_len: u64,
        size_of_image: u64,
    },
    LoadAddressOverflow {
        load_addr: u64,
        size_of_image: u64,
    },
    /// The image cannot be moved away from `image_base`; the caller may retry loading it there.
    /// `stripped` tells IMAGE_FILE_RELOCS_STRIPPED apart from a missing/empty relocation directory.
    NotRelocatable {
        image_base: u64,
        stripped: bool,
    },
}

/// Section names are raw bytes from the file; escape anything unprintable so a hostile name
/// cannot garble a log line.
struct SectionName<'a>(&'a [u8; 8]);

impl fmt::Display for SectionName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
                write!(f, "{}", char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for PeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PeError::NoMzSignature => write!(f, "not a PE image: no MZ signature"),
            PeError::Truncated {
                what,
                end,
                file_len,
            } => write!(
                f,
                "PE image truncated: {what} ends at byte 0x{end:x} but the file has only 0x{file_len:x} bytes"
            ),
            PeError::PeHeaderOutOfRange { e_lfanew, file_len } => write!(
                f,
                "not a PE image: e_lfanew 0x{e_lfanew:x} points past the end of the file (0x{file_len:x} bytes)"
            ),
            PeError::NoPeSignature { e_lfanew } => write!(
                f,
                "not a PE image: no PE\\0\\0 signature at e_lfanew 0x{e_lfanew:x}"
            ),
            PeError::WrongMachine(machine) => {
                write!(f, "PE machine 0x{machine:x} is not x86_64")
            }
            PeError::NotPe32Plus(magic) => {
                write!(
                    f,
                    "PE optional header magic 0x{magic:x} is not PE32+ (0x{MAGIC_PE32_PLUS:x})"
                )?;
                if magic == MAGIC_PE32 {
                    write!(f, ": 32-bit PE32 images are not supported")?;
                }
                Ok(())
            }
            PeError::OptionalHeaderTooSmall { size, needed } => write!(
                f,
                "PE optional header is 0x{size:x} bytes, too small for the PE32+ fields and data directories (0x{needed:x} bytes)"
            ),
            PeError::BadSectionAlignment(alignment) => write!(
                f,
                "PE SectionAlignment 0x{alignment:x} is not a power of two"
            ),
            PeError::HeadersTooSmall {
                size_of_headers,
                needed,
            } => write!(
                f,
                "PE SizeOfHeaders 0x{size_of_headers:x} does not cover the headers and section table (0x{needed:x} bytes)"
            ),
            PeError::HeadersLargerThanImage {
                size_of_headers,
                size_of_image,
            } => write!(
                f,
                "PE SizeOfHeaders 0x{size_of_headers:x} exceeds SizeOfImage 0x{size_of_image:x}"
            ),
            PeError::EntryOutsideImage {
                entry_rva,
                size_of_image,
            } => write!(
                f,
                "PE entry point rva 0x{entry_rva:x} is outside the image (SizeOfImage 0x{size_of_image:x})"
            ),
            PeError::SectionOutsideImage {
                ref name,
                virtual_address,
                size,
                size_of_image,
            } => write!(
                f,
                "section \"{}\" (rva 0x{virtual_address:x}, 0x{size:x} bytes) extends past SizeOfImage 0x{size_of_image:x}",
                SectionName(name)
            ),
            PeError::SectionDataOutsideFile {
                ref name,
                raw_offset,
                size,
                file_len,
            } => write!(
                f,
                "section \"{}\" raw data (file offset 0x{raw_offset:x}, 0x{size:x} bytes) extends past the end of the file (0x{file_len:x} bytes)",
                SectionName(name)
            ),
            PeError::RelocDirOutsideImage {
                rva,
                size,
                size_of_image,
            } => write!(
                f,
                "base relocation directory (rva 0x{rva:x}, 0x{size:x} bytes) is outside the image (SizeOfImage 0x{size_of_image:x})"
            ),
            PeError::RelocBlockTruncated { offset, remaining } => write!(
                f,
                "relocation block header at directory offset 0x{offset:x} is cut off: only 0x{remaining:x} bytes left in the directory"
            ),
            PeError::RelocBlockBadSize { offset, size } => write!(
                f,
                "relocation block at directory offset 0x{offset:x} has size 0x{size:x}; it must be at least 8 and even"
            ),
            PeError::RelocBlockPastDirectory {
                offset,
                size,
                directory_size,
            } => write!(
                f,
                "relocation block at directory offset 0x{offset:x} (0x{size:x} bytes) runs past the end of the relocation directory (0x{directory_size:x} bytes)"
            ),
            PeError::RelocSiteOutsideImage {
                rva,
                width,
                size_of_image,
            } => write!(
                f,
                "relocation site at rva 0x{rva:x} ({width} bytes) is outside the image (SizeOfImage 0x{size_of_image:x})"
            ),
            PeError::UnsupportedRelocType { kind, rva } => write!(
                f,
                "unsupported base relocation type {kind} at rva 0x{rva:x} (only ABSOLUTE, HIGHLOW and DIR64 are handled)"
            ),
            PeError::DestSizeMismatch {
                dest_len,
                size_of_image,
            } => write!(
                f,
                "destination buffer is 0x{dest_len:x} bytes but SizeOfImage is 0x{size_of_image:x}"
            ),
            PeError::LoadAddressOverflow {
                load_addr,
                size_of_image,
            } => write!(
                f,
                "load address 0x{load_addr:x} plus image size 0x{size_of_image:x} overflows the address space"
            ),
            PeError::NotRelocatable {
                image_base,
                stripped,
            } => {
                if stripped {
                    write!(f, "image has IMAGE_FILE_RELOCS_STRIPPED and cannot be moved")?;
                } else {
                    write!(
                        f,
                        "image has no base relocation directory and cannot be moved"
                    )?;
                }
                write!(f, "; load it at its preferred base 0x{image_base:x}")
            }
        }
    }
}

/// What [`load`] needs, taken from validated headers.
#[derive(Debug, Clone)]
pub struct PeInfo {
    /// Preferred load address.
    pub image_base: u64,
    pub size_of_image: u64,
    pub size_of_headers: u64,
    /// Power of two; the caller should align the load address to it.
    pub section_alignment: u32,
    pub entry_rva: u32,
    /// 10 EFI application, 11 boot service driver, 12 runtime driver. Not checked here: which
    /// subsystems are acceptable is the caller's policy.
    pub subsystem: u16,
    pub sections: Vec<Section>,
    /// Base relocation directory; `reloc_size == 0` means there is none.
    pub reloc_rva: u32,
    pub reloc_size: u32,
    /// IMAGE_FILE_RELOCS_STRIPPED: the image must be loaded at `image_base`.
    pub relocs_stripped: bool,
}

/// One section table entry, as found in the file.
#[derive(Debug, Clone)]
pub struct Section {
    pub name: [u8; 8],
    pub virtual_address: u32,
    pub virtual_size: u32,
    pub raw_offset: u32,
    pub raw_size: u32,
    pub characteristics: u32,
}

/// `start..start + len` as an index range, if it lies entirely within `limit` bytes.
fn span(start: u64, len: u64, limit: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len)?;
    if end > u64::try_from(limit).ok()? {
        return None;
    }
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

fn len64(bytes: &[u8]) -> u64 {
    // usize is at most 64 bits on every target Rust supports, so this never saturates.
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}

fn need(file: &[u8], start: u64, len: u64, what: &'static str) -> Result<(), PeError> {
    match span(start, len, file.len()) {
        Some(_) => Ok(()),
        None => Err(PeError::Truncated {
            what,
            end: start.saturating_add(len),
            file_len: len64(file),
        }),
    }
}

fn bytes_at<const N: usize>(
    file: &[u8],
    offset: u64,
    what: &'static str,
) -> Result<[u8; N], PeError> {
    span(offset, N as u64, file.len())
        .and_then(|range| file.get(range))
        .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
        .ok_or(PeError::Truncated {
            what,
            end: offset.saturating_add(N as u64),
            file_len: len64(file),
        })
}

fn u16_at(file: &[u8], offset: u64, what: &'static str) -> Result<u16, PeError> {
    bytes_at(file, offset, what).map(u16::from_le_bytes)
}

fn u32_at(file: &[u8], offset: u64, what: &'static str) -> Result<u32, PeError> {
    bytes_at(file, offset, what).map(u32::from_le_bytes)
}

fn u64_at(file: &[u8], offset: u64, what: &'static str) -> Result<u64, PeError> {
    bytes_at(file, offset, what).map(u64::from_le_bytes)
}

/// Number of file bytes to copy for `section`, after checking that the section fits in the
/// image and its copied bytes are in the file. Shared by [`parse`] and [`load`] so that a parsed
/// image cannot fail to load for layout reasons, while `load` still never trusts `PeInfo`.
fn section_copy_len(section: &Section, size_of_image: u64, file_len: u64) -> Result<u64, PeError> {
    // Some linkers leave VirtualSize at 0; SizeOfRawData is then the only size there is.
    let mem_len = if section.virtual_size == 0 {
        section.raw_size
    } else {
        section.virtual_size
    };
    // SizeOfRawData is rounded up to FileAlignment and may run past VirtualSize; that padding is
    // not part of the section and may even be missing from the end of the file.
    let copy_len = section.raw_size.min(mem_len);
    if u64::from(section.virtual_address) + u64::from(mem_len) > size_of_image {
        return Err(PeError::SectionOutsideImage {
            name: section.name,
            virtual_address: section.virtual_address,
            size: mem_len,
            size_of_image,
        });
    }
    // A section with nothing to copy (e.g. .bss) may carry any PointerToRawData.
    if copy_len != 0 && u64::from(section.raw_offset) + u64::from(copy_len) > file_len {
        return Err(PeError::SectionDataOutsideFile {
            name: section.name,
            raw_offset: section.raw_offset,
            size: copy_len,
            file_len,
        });
    }
    Ok(u64::from(copy_len))
}

/// Validates headers (MZ, e_lfanew, "PE\0\0", machine 0x8664, optional header magic 0x20b,
/// sizes) and returns what loading needs.
///
/// Section layout is checked here too (each section fits in SizeOfImage, its copied bytes are in
/// the file), so given a correctly sized `dest`, an image that parses can fail to [`load`] only
/// because of its relocations or the load address.
pub fn parse(file: &[u8]) -> Result<PeInfo, PeError> {
    let file_len = len64(file);
    if !file.starts_with(b"MZ") {
        return Err(PeError::NoMzSignature);
    }
    need(file, 0, DOS_HEADER_LEN, "DOS header")?;
    let e_lfanew = u32_at(file, E_LFANEW_OFFSET, "DOS header")?;
    let pe = u64::from(e_lfanew);
    if pe >= file_len {
        return Err(PeError::PeHeaderOutOfRange { e_lfanew, file_len });
    }
    if bytes_at::<4>(file, pe, "PE signature")? != *PE_SIGNATURE {
        return Err(PeError::NoPeSignature { e_lfanew });
    }

    let coff = pe + 4;
    need(file, coff, COFF_HEADER_LEN, "COFF file header")?;
    let machine = u16_at(file, coff, "COFF file header")?;
    if machine != MACHINE_X86_64 {
        return Err(PeError::WrongMachine(machine));
    }
    let number_of_sections = u16_at(file, coff + 2, "COFF file header")?;
    let optional_header_size = u16_at(file, coff + 16, "COFF file header")?;
    let file_characteristics = u16_at(file, coff + 18, "COFF file header")?;

    let opt = coff + COFF_HEADER_LEN;
    need(
        file,
        opt,
        u64::from(optional_header_size),
        "optional header",
    )?;
    let too_small = |needed| PeError::OptionalHeaderTooSmall {
        size: optional_header_size,
        needed,
    };
    // Reject by magic before complaining about size: a PE32 header is laid out differently, so
    // its size says nothing useful.
    if optional_header_size < 2 {
        return Err(too_small(OPTIONAL_HEADER_FIXED_LEN));
    }
    let magic = u16_at(file, opt, "optional header")?;
    if magic != MAGIC_PE32_PLUS {
        return Err(PeError::NotPe32Plus(magic));
    }
    if u64::from(optional_header_size) < OPTIONAL_HEADER_FIXED_LEN {
        return Err(too_small(OPTIONAL_HEADER_FIXED_LEN));
    }
    let entry_rva = u32_at(file, opt + 16, "optional header")?;
    let image_base = u64_at(file, opt + 24, "optional header")?;
    let section_alignment = u32_at(file, opt + 32, "optional header")?;
    let size_of_image = u64::from(u32_at(file, opt + 56, "optional header")?);
    let size_of_headers = u64::from(u32_at(file, opt + 60, "optional header")?);
    let subsystem = u16_at(file, opt + 68, "optional header")?;
    let number_of_rva_and_sizes = u32_at(file, opt + 108, "optional header")?;
    let directories_len = u64::from(number_of_rva_and_sizes) * DATA_DIRECTORY_LEN;
    if OPTIONAL_HEADER_FIXED_LEN + directories_len > u64::from(optional_header_size) {
        return Err(too_small(OPTIONAL_HEADER_FIXED_LEN + directories_len));
    }
    // Images may carry fewer than 16 directories (the Linux EFI stub has 6); a missing entry
    // means the same as an empty one.
    let (reloc_rva, reloc_size) = if number_of_rva_and_sizes > BASE_RELOC_DIRECTORY {
        let entry =
            opt + OPTIONAL_HEADER_FIXED_LEN + u64::from(BASE_RELOC_DIRECTORY) * DATA_DIRECTORY_LEN;
        (
            u32_at(file, entry, "optional header")?,
            u32_at(file, entry + 4, "optional header")?,
        )
    } else {
        (0, 0)
    };

    // The caller aligns its allocation to this, which only makes sense for a power of two.
    if !section_alignment.is_power_of_two() {
        return Err(PeError::BadSectionAlignment(section_alignment));
    }
    if size_of_headers > size_of_image {
        return Err(PeError::HeadersLargerThanImage {
            size_of_headers,
            size_of_image,
        });
    }
    if u64::from(entry_rva) >= size_of_image {
        return Err(PeError::EntryOutsideImage {
            entry_rva,
            size_of_image,
        });
    }

    let table = opt + u64::from(optional_header_size);
    let table_len = u64::from(number_of_sections) * SECTION_HEADER_LEN;
    need(file, table, table_len, "section table")?;
    if size_of_headers < table + table_len {
        return Err(PeError::HeadersTooSmall {
            size_of_headers,
            needed: table + table_len,
        });
    }
    need(file, 0, size_of_headers, "headers (SizeOfHeaders)")?;

    let mut sections = Vec::with_capacity(usize::from(number_of_sections));
    for index in 0..u64::from(number_of_sections) {
        let at = table + index * SECTION_HEADER_LEN;
        let section = Section {
            name: bytes_at(file, at, "section table")?,
            virtual_size: u32_at(file, at + 8, "section table")?,
            virtual_address: u32_at(file, at + 12, "section table")?,
            raw_size: u32_at(file, at + 16, "section table")?,
            raw_offset: u32_at(file, at + 20, "section table")?,
            characteristics: u32_at(file, at + 36, "section table")?,
        };
        section_copy_len(&section, size_of_image, file_len)?;
        sections.push(section);
    }

    if reloc_size != 0 && u64::from(reloc_rva) + u64::from(reloc_size) > size_of_image {
        return Err(PeError::RelocDirOutsideImage {
            rva: reloc_rva,
            size: reloc_size,
            size_of_image,
        });
    }

    Ok(PeInfo {
        image_base,
        size_of_image,
        size_of_headers,
        section_alignment,
        entry_rva,
        subsystem,
        sections,
        reloc_rva,
        reloc_size,
        relocs_stripped: file_characteristics & IMAGE_FILE_RELOCS_STRIPPED != 0,
    })
}

/// Copies `len` bytes; `None` if either side is out of bounds.
fn copy(dest: &mut [u8], to: u64, src: &[u8], from: u64, len: u64) -> Option<()> {
    let dest = dest.get_mut(span(to, len, dest.len())?)?;
    let src = src.get(span(from, len, src.len())?)?;
    // Both ranges are `len` long; checking keeps copy_from_slice's length panic unreachable.
    if dest.len() != src.len() {
        return None;
    }
    dest.copy_from_slice(src);
    Some(())
}

/// Copies headers and sections of `file` into `dest` (`dest.len() == size_of_image`; the rest
/// zeroed), then applies base relocations for the image being at guest address `load_addr`
/// instead of `image_base`.
///
/// Section raw data beyond the file or beyond SizeOfImage is an error. VirtualSize larger than
/// SizeOfRawData zero-fills; SizeOfRawData larger than a non-zero VirtualSize copies only
/// VirtualSize bytes. Relocation types: ABSOLUTE (skipped), DIR64, and HIGHLOW (applied to the
/// low 32 bits); anything else is an error. If `load_addr != image_base` and the image has
/// IMAGE_FILE_RELOCS_STRIPPED or no relocation directory, returns
/// [`PeError::NotRelocatable`] without touching `dest`, so the caller can retry at `image_base`.
///
/// `info` is re-checked against `file` and `dest` rather than trusted. When `load_addr` equals
/// `image_base` the relocation table is not read at all: nothing would change, and this is the
/// retry path for images whose relocations cannot be applied. On error `dest` holds a partial
/// image and must not be run.
pub fn load(file: &[u8], info: &PeInfo, dest: &mut [u8], load_addr: u64) -> Result<(), PeError> {
    let size_of_image = info.size_of_image;
    let dest_len = len64(dest);
    if dest_len != size_of_image {
        return Err(PeError::DestSizeMismatch {
            dest_len,
            size_of_image,
        });
    }
    if load_addr.checked_add(size_of_image).is_none() {
        return Err(PeError::LoadAddressOverflow {
            load_addr,
            size_of_image,
        });
    }
    // Relocation arithmetic is modular: loading below image_base is a "negative" delta.
    let delta = load_addr.wrapping_sub(info.image_base);
    // Decide before touching `dest` so that a caller retrying at image_base wastes nothing.
    // An image without a relocation directory (Linux's EFI stub: position-independent, image
    // base 0) loads anywhere without fixups, as EDK2 does; only RELOCS_STRIPPED pins it.
    if delta != 0 && info.relocs_stripped {
        return Err(PeError::NotRelocatable {
            image_base: info.image_base,
            stripped: info.relocs_stripped,
        });
    }

    let file_len = len64(file);
    if info.size_of_headers > size_of_image {
        return Err(PeError::HeadersLargerThanImage {
            size_of_headers: info.size_of_headers,
            size_of_image,
        });
    }
    // Images (and the Linux EFI stub in particular) read their own headers from memory.
    copy(dest, 0, file, 0, info.size_of_headers).ok_or(PeError::Truncated {
        what: "headers (SizeOfHeaders)",
        end: info.size_of_headers,
        file_len,
    })?;
    // Bytes not copied from the file are zeroed afterwards, gap by gap: a kernel's image is tens
    // of MiB, most of it copied, and zeroing all of it first doubled the writes.
    let mut copied: Vec<(usize, usize)> = alloc::vec![(0, info.size_of_headers as usize)];
    for section in &info.sections {
        let copy_len = section_copy_len(section, size_of_image, file_len)?;
        let start = section.virtual_address as usize;
        copied.push((start, start + copy_len as usize));
        // section_copy_len has bounded both ranges; this is only reachable if it is wrong.
        copy(
            dest,
            u64::from(section.virtual_address),
            file,
            u64::from(section.raw_offset),
            copy_len,
        )
        .ok_or(PeError::SectionDataOutsideFile {
            name: section.name,
            raw_offset: section.raw_offset,
            size: section.raw_size,
            file_len,
        })?;
    }

    copied.sort_unstable();
    let mut zeroed_to = 0;
    for (start, end) in copied {
        if start > zeroed_to {
            dest[zeroed_to..start].fill(0);
        }
        zeroed_to = zeroed_to.max(end);
    }
    if zeroed_to < dest.len() {
        dest[zeroed_to..].fill(0);
    }

    if delta != 0 {
        relocate(dest, info.reloc_rva, info.reloc_size, delta)?;
    }
    Ok(())
}

/// Applies the base relocation directory at `rva` (in the loaded image) for a move by `delta`.
fn relocate(image: &mut [u8], rva: u32, size: u32, delta: u64) -> Result<(), PeError> {
    let size_of_image = len64(image);
    // Work from a copy so that a fixup landing inside the table cannot alter entries still to be
    // read; the result then does not depend on the order of blocks.
    let table: Vec<u8> = span(u64::from(rva), u64::from(size), image.len())
        .and_then(|range| image.get(range))
        .ok_or(PeError::RelocDirOutsideImage {
            rva,
            size,
            size_of_image,
        })?
        .to_vec();
    let directory_size = len64(&table);

    let mut rest: &[u8] = &table;
    let mut offset: u64 = 0;
    while !rest.is_empty() {
        let Some((&[p0, p1, p2, p3, s0, s1, s2, s3], _)) = rest.split_first_chunk::<8>() else {
            return Err(PeError::RelocBlockTruncated {
                offset,
                remaining: len64(rest),
            });
        };
        let page = u32::from_le_bytes([p0, p1, p2, p3]);
        let block_size = u32::from_le_bytes([s0, s1, s2, s3]);
        // A block shorter than its own header is malformed (size 0 would also never advance);
        // an odd size would split an entry.
        if block_size < RELOC_BLOCK_HEADER_LEN || block_size % 2 != 0 {
            return Err(PeError::RelocBlockBadSize {
                offset,
                size: block_size,
            });
        }
        let past_directory = PeError::RelocBlockPastDirectory {
            offset,
            size: block_size,
            directory_size,
        };
        let (block, tail) = usize::try_from(block_size)
            .ok()
            .and_then(|len| rest.split_at_checked(len))
            .ok_or(past_directory)?;
        // The 8 header bytes are the first four 2-byte chunks.
        for entry in block.chunks_exact(2).skip(4) {
            if let &[lo, hi] = entry {
                apply_fixup(image, page, u16::from_le_bytes([lo, hi]), delta)?;
            }
        }
        rest = tail;
        offset += u64::from(block_size);
    }
    Ok(())
}

fn apply_fixup(image: &mut [u8], page: u32, entry: u16, delta: u64) -> Result<(), PeError> {
    let kind = entry >> 12;
    let rva = u64::from(page) + u64::from(entry & 0x0fff);
    match kind {
        // Padding that keeps blocks 4-byte aligned.
        REL_BASED_ABSOLUTE => Ok(()),
        // Truncating delta is the definition of HIGHLOW: a 32-bit address moves by the low half.
        REL_BASED_HIGHLOW => patch::<4>(image, rva, |word| {
            u32::from_le_bytes(word)
                .wrapping_add(delta as u32)
                .to_le_bytes()
        }),
        REL_BASED_DIR64 => patch::<8>(image, rva, |word| {
            u64::from_le_bytes(word).wrapping_add(delta).to_le_bytes()
        }),
        _ => Err(PeError::UnsupportedRelocType {
            kind: kind as u8,
            rva,
        }),
    }
}

fn patch<const N: usize>(
    image: &mut [u8],
    rva: u64,
    update: impl FnOnce([u8; N]) -> [u8; N],
) -> Result<(), PeError> {
    let size_of_image = len64(image);
    let site = span(rva, N as u64, image.len())
        .and_then(|range| image.get_mut(range))
        .and_then(|bytes| <&mut [u8; N]>::try_from(bytes).ok())
        .ok_or(PeError::RelocSiteOutsideImage {
            rva,
            width: N as u8,
            size_of_image,
        })?;
    *site = update(*site);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::vec;

    const DELTA: u64 = 0x123_4000;
    const MEM_EXECUTE: u32 = 0x2000_0000;

    fn le16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn le32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn le64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn put16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn align(v: usize, a: usize) -> usize {
        v.div_ceil(a) * a
    }

    // ---------------------------------------------------------------- synthetic images

    #[derive(Clone)]
    struct SynSection {
        name: &'static str,
        va: u32,
        vsize: u32,
        data: Vec<u8>,
        characteristics: u32,
    }

    /// Minimal PE32+ writer. e_lfanew is always 0x40; tests patch bytes for anything odder.
    #[derive(Clone)]
    struct Syn {
        machine: u16,
        magic: u16,
        file_characteristics: u16,
        image_base: u64,
        section_alignment: u32,
        file_alignment: u32,
        entry: u32,
        subsystem: u16,
        num_dirs: u32,
        reloc_dir: (u32, u32),
        size_of_image: Option<u32>,
        sections: Vec<SynSection>,
    }

    const BASE: u64 = 0x1_4000_0000;
    const E_LFANEW: usize = 0x40;
    const COFF: usize = E_LFANEW + 4;
    const OPT: usize = COFF + 20;
    const TABLE: usize = OPT + 112 + 16 * 8;

    const DIR64: u16 = 10 << 12;
    const HIGHLOW: u16 = 3 << 12;

    fn reloc_block(page: u32, entries: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&page.to_le_bytes());
        b.extend_from_slice(&(8 + 2 * entries.len() as u32).to_le_bytes());
        for e in entries {
            b.extend_from_slice(&e.to_le_bytes());
        }
        b
    }

    fn text_data() -> Vec<u8> {
        let mut d: Vec<u8> = (0..0x40u8).map(|i| 0x90 ^ i).collect();
        put64(&mut d, 0x18, BASE + 0x2000);
        d
    }

    fn data_data() -> Vec<u8> {
        let mut d: Vec<u8> = (0..0x30u8).map(|i| 0xa0 ^ i).collect();
        put64(&mut d, 0x00, BASE + 0x1000);
        put64(&mut d, 0x08, BASE + 0x2010);
        put32(&mut d, 0x10, (BASE + 0x1004) as u32);
        put64(&mut d, 0x28, BASE + 0x5000);
        d
    }

    fn reloc_data() -> Vec<u8> {
        let mut r = reloc_block(
            0x2000,
            &[DIR64, DIR64 | 0x8, HIGHLOW | 0x10, DIR64 | 0x28, 0, 0],
        );
        r.extend(reloc_block(0x1000, &[DIR64 | 0x18, 0]));
        assert_eq!(r.len(), 32);
        r
    }

    impl Syn {
        /// .text, .data with DIR64/HIGHLOW sites, .reloc, a .bss-like section (VirtualSize >
        /// raw), an .rdata whose raw size exceeds VirtualSize, and one with VirtualSize 0.
        fn new() -> Syn {
            Syn {
                machine: 0x8664,
                magic: 0x20b,
                file_characteristics: 0x0206,
                image_base: BASE,
                section_alignment: 0x1000,
                file_alignment: 0x200,
                entry: 0x1000,
                subsystem: 10,
                num_dirs: 16,
                reloc_dir: (0x3000, 32),
                size_of_image: None,
                sections: vec![
                    SynSection {
                        name: ".text",
                        va: 0x1000,
                        vsize: 0x40,
                        data: text_data(),
                        characteristics: 0x6000_0020,
                    },
                    SynSection {
                        name: ".data",
                        va: 0x2000,
                        vsize: 0x30,
                        data: data_data(),
                        characteristics: 0xc000_0040,
                    },
                    SynSection {
                        name: ".reloc",
                        va: 0x3000,
                        vsize: 32,
                        data: reloc_data(),
                        characteristics: 0x4200_0040,
                    },
                    SynSection {
                        name: ".bss",
                        va: 0x4000,
                        vsize: 0x400,
                        data: vec![0x55; 0x10],
                        characteristics: 0xc000_0080,
                    },
                    SynSection {
                        name: ".rdata",
                        va: 0x5000,
                        vsize: 0x8,
                        data: vec![0xee; 0x20],
                        characteristics: 0x4000_0040,
                    },
                    SynSection {
                        name: ".vzero",
                        va: 0x6000,
                        vsize: 0,
                        data: vec![0x77; 0x10],
                        characteristics: 0x4000_0040,
                    },
                ],
            }
        }

        fn with_relocs(mut self, table: Vec<u8>) -> Syn {
            let s = self
                .sections
                .iter_mut()
                .find(|s| s.name == ".reloc")
                .unwrap();
            s.vsize = table.len() as u32;
            self.reloc_dir = (s.va, table.len() as u32);
            s.data = table;
            self
        }

        fn build(&self) -> Vec<u8> {
            let fa = self.file_alignment as usize;
            let sa = self.section_alignment as usize;
            let opt_len = 112 + 8 * self.num_dirs as usize;
            let table = OPT + opt_len;
            let headers_end = table + 40 * self.sections.len();
            let size_of_headers = align(headers_end, fa);
            let mut raw_pos = size_of_headers;
            let mut placement = Vec::new();
            for s in &self.sections {
                if s.data.is_empty() {
                    placement.push((0, 0));
                } else {
                    let raw_size = align(s.data.len(), fa);
                    placement.push((raw_pos, raw_size));
                    raw_pos += raw_size;
                }
            }
            let size_of_image = self.size_of_image.map(|v| v as usize).unwrap_or_else(|| {
                let end = self
                    .sections
                    .iter()
                    .map(|s| s.va as usize + (s.vsize as usize).max(s.data.len()))
                    .max()
                    .unwrap_or(size_of_headers);
                align(end.max(size_of_headers), sa)
            });

            let mut f = vec![0u8; raw_pos];
            f[0..2].copy_from_slice(b"MZ");
            put32(&mut f, 0x3c, E_LFANEW as u32);
            f[E_LFANEW..E_LFANEW + 4].copy_from_slice(b"PE\0\0");
            put16(&mut f, COFF, self.machine);
            put16(&mut f, COFF + 2, self.sections.len() as u16);
            put16(&mut f, COFF + 16, opt_len as u16);
            put16(&mut f, COFF + 18, self.file_characteristics);
            put16(&mut f, OPT, self.magic);
            put32(&mut f, OPT + 16, self.entry);
            put64(&mut f, OPT + 24, self.image_base);
            put32(&mut f, OPT + 32, self.section_alignment);
            put32(&mut f, OPT + 36, self.file_alignment);
            put32(&mut f, OPT + 56, size_of_image as u32);
            put32(&mut f, OPT + 60, size_of_headers as u32);
            put16(&mut f, OPT + 68, self.subsystem);
            put32(&mut f, OPT + 108, self.num_dirs);
            if self.num_dirs > 5 {
                put32(&mut f, OPT + 112 + 40, self.reloc_dir.0);
                put32(&mut f, OPT + 112 + 44, self.reloc_dir.1);
            }
            for (i, (s, &(raw_off, raw_size))) in self.sections.iter().zip(&placement).enumerate() {
                let h = table + 40 * i;
                f[h..h + s.name.len()].copy_from_slice(s.name.as_bytes());
                put32(&mut f, h + 8, s.vsize);
                put32(&mut f, h + 12, s.va);
                put32(&mut f, h + 16, raw_size as u32);
                put32(&mut f, h + 20, raw_off as u32);
                put32(&mut f, h + 36, s.characteristics);
                f[raw_off..raw_off + s.data.len()].copy_from_slice(&s.data);
            }
            f
        }
    }

    fn load_at(file: &[u8], load_addr: u64) -> Result<Vec<u8>, PeError> {
        let info = parse(file)?;
        // Garbage, so that "the rest zeroed" is actually tested.
        let mut dest = vec![0xa5; info.size_of_image as usize];
        load(file, &info, &mut dest, load_addr)?;
        Ok(dest)
    }

    fn load_err(file: &[u8], load_addr: u64) -> PeError {
        load_at(file, load_addr).expect_err("load should fail")
    }

    #[test]
    fn synthetic_parse_fields() {
        let file = Syn::new().build();
        let info = parse(&file).unwrap();
        assert_eq!(info.image_base, BASE);
        assert_eq!(info.size_of_image, 0x7000);
        assert_eq!(info.size_of_headers, 0x400);
        assert_eq!(info.section_alignment, 0x1000);
        assert_eq!(info.entry_rva, 0x1000);
        assert_eq!(info.subsystem, 10);
        assert_eq!((info.reloc_rva, info.reloc_size), (0x3000, 32));
        assert!(!info.relocs_stripped);
        let names: Vec<&[u8]> = info.sections.iter().map(|s| &s.name[..]).collect();
        assert_eq!(
            names,
            [
                b".text\0\0\0",
                b".data\0\0\0",
                b".reloc\0\0",
                b".bss\0\0\0\0",
                b".rdata\0\0",
                b".vzero\0\0"
            ]
        );
        let s = &info.sections[3];
        assert_eq!(
            (s.virtual_address, s.virtual_size, s.raw_offset, s.raw_size),
            (0x4000, 0x400, 0xa00, 0x200)
        );
        assert_eq!(s.characteristics, 0xc000_0080);

        for subsystem in [11, 12] {
            let file = Syn {
                subsystem,
                ..Syn::new()
            }
            .build();
            assert_eq!(parse(&file).unwrap().subsystem, subsystem);
        }
    }

    /// The loaded image, built by hand from the layout `Syn::new` promises.
    fn expected_synthetic(file: &[u8], load_addr: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x7000];
        e[..0x400].copy_from_slice(&file[..0x400]);
        e[0x1000..0x1040].copy_from_slice(&text_data());
        e[0x2000..0x2030].copy_from_slice(&data_data());
        e[0x3000..0x3020].copy_from_slice(&reloc_data());
        e[0x4000..0x4010].fill(0x55);
        e[0x5000..0x5008].fill(0xee);
        e[0x6000..0x6010].fill(0x77);
        put64(&mut e, 0x1018, load_addr + 0x2000);
        put64(&mut e, 0x2000, load_addr + 0x1000);
        put64(&mut e, 0x2008, load_addr + 0x2010);
        put32(&mut e, 0x2010, (load_addr + 0x1004) as u32);
        put64(&mut e, 0x2028, load_addr + 0x5000);
        e
    }

    #[test]
    fn synthetic_load_and_relocate() {
        let file = Syn::new().build();
        for load_addr in [
            BASE,
            BASE + DELTA,
            BASE - 0x1000_0000,
            0,
            0xffff_8000_0000_0000,
        ] {
            let image = load_at(&file, load_addr).unwrap();
            // The pointers must point into the loaded copy, whatever the direction of the move.
            assert_eq!(
                le64(&image, 0x2000),
                load_addr + 0x1000,
                "at 0x{load_addr:x}"
            );
            assert_eq!(le64(&image, 0x1018), load_addr + 0x2000);
            assert_eq!(le32(&image, 0x2010), (load_addr + 0x1004) as u32);
            assert_eq!(
                image,
                expected_synthetic(&file, load_addr),
                "at 0x{load_addr:x}"
            );
        }
    }

    #[test]
    fn synthetic_small_alignments() {
        // Alignment 32/32 as some toolchains emit.
        let file = Syn {
            section_alignment: 32,
            file_alignment: 32,
            ..Syn::new()
        }
        .build();
        let info = parse(&file).unwrap();
        assert_eq!(info.section_alignment, 32);
        assert_eq!(info.sections[0].raw_size, 0x40);
        let image = load_at(&file, BASE + DELTA).unwrap();
        assert_eq!(le64(&image, 0x2000), BASE + DELTA + 0x1000);
        assert_eq!(le64(&image, 0x2028), BASE + DELTA + 0x5000);
        assert_eq!(&image[0x4000..0x4010], &[0x55; 0x10]);
        assert!(image[0x4010..0x4400].iter().all(|&b| b == 0));
        assert!(image[0x5008..0x6000].iter().all(|&b| b == 0));
    }

    #[test]
    fn synthetic_every_truncation_is_a_clear_error() {
        let file = Syn::new().build();
        assert_eq!(file.len(), 0x1000, "last section must end the file");
        for n in 0..file.len() {
            let err = parse(&file[..n]).expect_err("truncated image parsed");
            let truncated = |what: &str| matches!(err, PeError::Truncated { what: w, file_len, .. } if w == what && file_len == n as u64);
            let ok = match n {
                0..=1 => err == PeError::NoMzSignature,
                2..=0x3f => truncated("DOS header"),
                0x40 => matches!(err, PeError::PeHeaderOutOfRange { e_lfanew: 0x40, .. }),
                0x41..=0x43 => truncated("PE signature"),
                0x44..=0x57 => truncated("COFF file header"),
                0x58..=0x147 => truncated("optional header"),
                0x148..=0x237 => truncated("section table"),
                0x238..=0x3ff => truncated("headers (SizeOfHeaders)"),
                _ => matches!(err, PeError::SectionDataOutsideFile { .. }),
            };
            assert!(ok, "length 0x{n:x}: unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(
            parse(&file[..0x100]).unwrap_err().to_string(),
            "PE image truncated: optional header ends at byte 0x148 but the file has only 0x100 bytes"
        );
        assert_eq!(
            parse(&file[..0xff0]).unwrap_err().to_string(),
            "section \".vzero\" raw data (file offset 0xe00, 0x200 bytes) extends past the end of the file (0xff0 bytes)"
        );
    }

    #[test]
    fn synthetic_header_errors() {
        let good = Syn::new().build();

        let mut f = good.clone();
        f[0] = b'Z';
        assert_eq!(
            parse(&f).unwrap_err().to_string(),
            "not a PE image: no MZ signature"
        );

        for e_lfanew in [0xffff_fffc, 0xffff_ffff, good.len() as u32] {
            let mut f = good.clone();
            put32(&mut f, 0x3c, e_lfanew);
            assert_eq!(
                parse(&f).unwrap_err(),
                PeError::PeHeaderOutOfRange {
                    e_lfanew,
                    file_len: good.len() as u64
                }
            );
        }
        let mut f = good.clone();
        put32(&mut f, 0x3c, good.len() as u32 - 2);
        assert!(matches!(
            parse(&f).unwrap_err(),
            PeError::Truncated {
                what: "PE signature",
                ..
            }
        ));
        let mut f = good.clone();
        put32(&mut f, 0x3c, 0x80);
        assert_eq!(
            parse(&f).unwrap_err(),
            PeError::NoPeSignature { e_lfanew: 0x80 }
        );

        let f = Syn {
            machine: 0x14c,
            ..Syn::new()
        }
        .build();
        assert_eq!(parse(&f).unwrap_err(), PeError::WrongMachine(0x14c));
        assert_eq!(
            parse(&f).unwrap_err().to_string(),
            "PE machine 0x14c is not x86_64"
        );

        let f = Syn {
            magic: 0x10b,
            ..Syn::new()
        }
        .build();
        assert_eq!(parse(&f).unwrap_err(), PeError::NotPe32Plus(0x10b));
        assert_eq!(
            parse(&f).unwrap_err().to_string(),
            "PE optional header magic 0x10b is not PE32+ (0x20b): 32-bit PE32 images are not supported"
        );

        // SizeOfOptionalHeader too small for the fixed fields, then for the directories.
        for (size, needed) in [(0u16, 112u64), (100, 112), (112 + 8 * 15, 112 + 8 * 16)] {
            let mut f = good.clone();
            put16(&mut f, COFF + 16, size);
            assert_eq!(
                parse(&f).unwrap_err(),
                PeError::OptionalHeaderTooSmall { size, needed }
            );
        }
        // A NumberOfRvaAndSizes large enough to overflow 32-bit arithmetic.
        let mut f = good.clone();
        put32(&mut f, OPT + 108, u32::MAX);
        assert!(matches!(
            parse(&f).unwrap_err(),
            PeError::OptionalHeaderTooSmall { .. }
        ));

        for alignment in [0, 3, 0x1800] {
            let f = Syn {
                section_alignment: alignment,
                file_alignment: 0x200,
                size_of_image: Some(0x7000),
                ..Syn::new()
            }
            .build();
            assert_eq!(
                parse(&f).unwrap_err(),
                PeError::BadSectionAlignment(alignment)
            );
        }

        let mut f = good.clone();
        put32(&mut f, OPT + 60, 0x8000);
        assert_eq!(
            parse(&f).unwrap_err(),
            PeError::HeadersLargerThanImage {
                size_of_headers: 0x8000,
                size_of_image: 0x7000
            }
        );
        let mut f = good.clone();
        put32(&mut f, OPT + 60, 0x200);
        assert_eq!(
            parse(&f).unwrap_err(),
            PeError::HeadersTooSmall {
                size_of_headers: 0x200,
                needed: 0x238
            }
        );

        let f = Syn {
            entry: 0x7000,
            ..Syn::new()
        }
        .build();
        assert_eq!(
            parse(&f).unwrap_err(),
            PeError::EntryOutsideImage {
                entry_rva: 0x7000,
                size_of_image: 0x7000
            }
        );

        // Section larger than SizeOfImage, and raw data beyond the file.
        let f = Syn {
            size_of_image: Some(0x6100),
            ..Syn::new()
        }
        .build();
        assert_eq!(
            parse(&f).unwrap_err().to_string(),
            "section \".vzero\" (rva 0x6000, 0x200 bytes) extends past SizeOfImage 0x6100"
        );
        let mut f = good.clone();
        put32(&mut f, TABLE + 40 + 20, 0xffff_fe00);
        assert!(matches!(
            parse(&f).unwrap_err(),
            PeError::SectionDataOutsideFile {
                raw_offset: 0xffff_fe00,
                ..
            }
        ));
        let mut f = good.clone();
        put32(&mut f, TABLE + 40 + 12, 0xffff_ffff);
        assert!(matches!(
            parse(&f).unwrap_err(),
            PeError::SectionOutsideImage {
                virtual_address: 0xffff_ffff,
                ..
            }
        ));
        // Nothing to copy: the raw offset of a zero-length section is irrelevant.
        let mut f = good.clone();
        put32(&mut f, TABLE + 16, 0);
        put32(&mut f, TABLE + 20, 0xffff_ffff);
        parse(&f).unwrap();

        let f = Syn {
            reloc_dir: (0x6ff8, 0x10),
            ..Syn::new()
        }
        .build();
        assert_eq!(
            parse(&f).unwrap_err().to_string(),
            "base relocation directory (rva 0x6ff8, 0x10 bytes) is outside the image (SizeOfImage 0x7000)"
        );
        let f = Syn {
            reloc_dir: (0xffff_ffff, 0xffff_ffff),
            ..Syn::new()
        }
        .build();
        assert!(matches!(
            parse(&f).unwrap_err(),
            PeError::RelocDirOutsideImage { .. }
        ));
    }

    #[test]
    fn synthetic_raw_padding_may_run_past_end_of_file() {
        // The last section's SizeOfRawData (0x200) runs past the end of the file, but only its
        // VirtualSize (0x10) bytes are needed.
        let mut f = Syn::new().build();
        put32(&mut f, TABLE + 5 * 40 + 8, 0x10);
        f.truncate(0xe10);
        let image = load_at(&f, BASE + DELTA).unwrap();
        assert_eq!(&image[0x6000..0x6010], &[0x77; 0x10]);
        assert!(image[0x6010..].iter().all(|&b| b == 0));
        // One byte short of the needed data is an error.
        assert!(matches!(
            parse(&f[..0xe0f]).unwrap_err(),
            PeError::SectionDataOutsideFile { size: 0x10, .. }
        ));
    }

    #[test]
    fn synthetic_load_rechecks_info() {
        let file = Syn::new().build();
        let info = parse(&file).unwrap();
        let mut dest = vec![0; 0x7000];

        let mut short = vec![0; 0x6fff];
        assert_eq!(
            load(&file, &info, &mut short, BASE).unwrap_err(),
            PeError::DestSizeMismatch {
                dest_len: 0x6fff,
                size_of_image: 0x7000
            }
        );
        assert!(matches!(
            load(&file, &info, &mut dest, u64::MAX - 0x100).unwrap_err(),
            PeError::LoadAddressOverflow { .. }
        ));

        let mut bad = info.clone();
        bad.sections[1].raw_offset = 0xff0;
        assert!(matches!(
            load(&file, &bad, &mut dest, BASE).unwrap_err(),
            PeError::SectionDataOutsideFile { .. }
        ));
        let mut bad = info.clone();
        bad.sections[1].virtual_address = 0x6ff0;
        assert!(matches!(
            load(&file, &bad, &mut dest, BASE).unwrap_err(),
            PeError::SectionOutsideImage { .. }
        ));
        let mut bad = info.clone();
        bad.size_of_headers = 0x8000;
        assert!(matches!(
            load(&file, &bad, &mut dest, BASE).unwrap_err(),
            PeError::HeadersLargerThanImage { .. }
        ));
        let mut bad = info.clone();
        bad.reloc_rva = 0x6ff0;
        assert!(matches!(
            load(&file, &bad, &mut dest, BASE + DELTA).unwrap_err(),
            PeError::RelocDirOutsideImage { .. }
        ));
        // File shorter than the headers it claims.
        assert!(matches!(
            load(&file[..0x300], &info, &mut dest, BASE).unwrap_err(),
            PeError::Truncated {
                what: "headers (SizeOfHeaders)",
                ..
            }
        ));
    }

    #[test]
    fn synthetic_relocation_errors() {
        let with = |table: Vec<u8>| Syn::new().with_relocs(table).build();
        let at = BASE + DELTA;

        for size in [0u32, 4, 7] {
            let mut t = reloc_block(0x2000, &[DIR64]);
            put32(&mut t, 4, size);
            assert_eq!(
                load_err(&with(t), at),
                PeError::RelocBlockBadSize { offset: 0, size }
            );
        }
        let mut t = reloc_block(0x2000, &[DIR64, 0]);
        put32(&mut t, 4, 11);
        assert_eq!(
            load_err(&with(t), at),
            PeError::RelocBlockBadSize {
                offset: 0,
                size: 11
            }
        );

        // Second block claims more bytes than the directory has left.
        let mut t = reloc_block(0x2000, &[DIR64, 0]);
        t.extend(reloc_block(0x1000, &[DIR64 | 0x18, 0]));
        put32(&mut t, 12 + 4, 0x40);
        assert_eq!(
            load_err(&with(t), at),
            PeError::RelocBlockPastDirectory {
                offset: 12,
                size: 0x40,
                directory_size: 24
            }
        );
        let mut t = reloc_block(0x2000, &[DIR64, 0]);
        put32(&mut t, 4, 0xffff_fff0);
        assert!(matches!(
            load_err(&with(t), at),
            PeError::RelocBlockPastDirectory { .. }
        ));

        // Trailing bytes too few for another block header.
        let mut t = reloc_block(0x2000, &[DIR64, 0]);
        t.extend([0, 0, 0, 0]);
        assert_eq!(
            load_err(&with(t), at),
            PeError::RelocBlockTruncated {
                offset: 12,
                remaining: 4
            }
        );

        // Sites straddling or beyond the end of the image, including overflow-prone page RVAs.
        for (page, entry, rva, width) in [
            (0x6ff8, DIR64 | 0x4, 0x6ffc, 8),
            (0x6000, HIGHLOW | 0xffe, 0x6ffe, 4),
            (0xffff_f000, DIR64 | 0xfff, 0xffff_ffff, 8),
        ] {
            let t = reloc_block(page, &[entry, 0]);
            assert_eq!(
                load_err(&with(t), at),
                PeError::RelocSiteOutsideImage {
                    rva,
                    width,
                    size_of_image: 0x7000
                }
            );
        }
        // The last in-bounds DIR64 site is fine.
        load_at(&with(reloc_block(0x6ff8, &[DIR64, 0])), at).unwrap();

        for kind in [1u16, 2, 4, 5, 9, 11, 15] {
            let t = reloc_block(0x2000, &[DIR64, kind << 12 | 0x8]);
            assert_eq!(
                load_err(&with(t), at),
                PeError::UnsupportedRelocType {
                    kind: kind as u8,
                    rva: 0x2008
                }
            );
        }
        assert_eq!(
            load_err(&with(reloc_block(0x2000, &[DIR64, 4 << 12 | 0x8])), at).to_string(),
            "unsupported base relocation type 4 at rva 0x2008 (only ABSOLUTE, HIGHLOW and DIR64 are handled)"
        );
        // At the preferred base nothing needs fixing, so the table is not consulted.
        load_at(&with(reloc_block(0x2000, &[4 << 12])), BASE).unwrap();
    }

    #[test]
    fn synthetic_not_relocatable() {
        let stripped = Syn {
            file_characteristics: 0x0207,
            ..Syn::new()
        }
        .build();
        assert!(parse(&stripped).unwrap().relocs_stripped);
        let info = parse(&stripped).unwrap();
        let mut dest = vec![0xa5; 0x7000];
        let err = load(&stripped, &info, &mut dest, BASE + DELTA).unwrap_err();
        assert!(
            dest.iter().all(|&b| b == 0xa5),
            "dest touched before refusing"
        );
        assert_eq!(
            err,
            PeError::NotRelocatable {
                image_base: BASE,
                stripped: true
            }
        );
        assert_eq!(
            err.to_string(),
            "image has IMAGE_FILE_RELOCS_STRIPPED and cannot be moved; load it at its preferred base 0x140000000"
        );
        // The retry the error suggests works and leaves the file's addresses alone.
        assert_eq!(
            load_at(&stripped, BASE).unwrap(),
            expected_synthetic(&stripped, BASE)
        );

        for no_dir in [
            Syn {
                reloc_dir: (0, 0),
                ..Syn::new()
            },
            Syn {
                reloc_dir: (0x3000, 0),
                ..Syn::new()
            },
            Syn {
                num_dirs: 5,
                ..Syn::new()
            },
        ] {
            let f = no_dir.build();
            let info = parse(&f).unwrap();
            assert_eq!(info.reloc_size, 0);
            // No directory: it moves without fixups.
            let image = load_at(&f, BASE - 0x1000).unwrap();
            assert_eq!(le64(&image, 0x2000), BASE + 0x1000);
        }
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Parses and, if that succeeds, loads at a few addresses; any panic fails the test.
    fn parse_and_load_anything(file: &[u8]) {
        if let Ok(info) = parse(file) {
            // A corrupted SizeOfImage can be up to 4 GiB; that is the caller's allocation to refuse.
            if info.size_of_image > 64 << 20 {
                return;
            }
            let mut dest = vec![0u8; info.size_of_image as usize];
            for addr in [
                info.image_base,
                info.image_base.wrapping_add(DELTA),
                0,
                0x1000,
            ] {
                let _ = load(file, &info, &mut dest, addr);
            }
        }
    }

    #[test]
    fn synthetic_random_corruption_never_panics() {
        let good = Syn::new().build();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(f.len());
                // Bias towards values that hit boundaries.
                f[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            parse_and_load_anything(&f);
        }
    }

    // ---------------------------------------------------------------- real images

    /// Maps an RVA to a file offset through the section table, the way the file lays it out.
    fn file_offset(info: &PeInfo, rva: u64) -> Option<usize> {
        if rva < info.size_of_headers {
            return Some(rva as usize);
        }
        info.sections.iter().find_map(|s| {
            let len = if s.virtual_size == 0 {
                s.raw_size
            } else {
                s.raw_size.min(s.virtual_size)
            };
            let va = u64::from(s.virtual_address);
            (rva >= va && rva < va + u64::from(len))
                .then(|| (u64::from(s.raw_offset) + rva - va) as usize)
        })
    }

    /// (rva, type) of every fixup, read straight from the file rather than through the loader.
    fn reference_relocs(file: &[u8], info: &PeInfo) -> Vec<(u64, u16)> {
        let mut out = Vec::new();
        if info.reloc_size == 0 {
            return out;
        }
        let start = file_offset(info, info.reloc_rva.into())
            .expect("relocation directory not backed by the file");
        let dir = &file[start..start + info.reloc_size as usize];
        let mut i = 0;
        while i < dir.len() {
            let page = u64::from(le32(dir, i));
            let size = le32(dir, i + 4) as usize;
            assert!(
                size >= 8 && i + size <= dir.len(),
                "bad block in the file itself"
            );
            for j in (i + 8..i + size).step_by(2) {
                let e = le16(dir, j);
                out.push((page + u64::from(e & 0xfff), e >> 12));
            }
            i += size;
        }
        out
    }

    /// Headers and section data where they belong, everything else zero.
    fn plain_copy(file: &[u8], info: &PeInfo) -> Vec<u8> {
        let mut image = vec![0u8; info.size_of_image as usize];
        let h = info.size_of_headers as usize;
        image[..h].copy_from_slice(&file[..h]);
        for s in &info.sections {
            let len = if s.virtual_size == 0 {
                s.raw_size
            } else {
                s.raw_size.min(s.virtual_size)
            } as usize;
            let (va, raw) = (s.virtual_address as usize, s.raw_offset as usize);
            image[va..va + len].copy_from_slice(&file[raw..raw + len]);
        }
        image
    }

    fn objdump(args: &[&str], path: &Path) -> Option<String> {
        let out = Command::new("objdump").args(args).arg(path).output().ok()?;
        assert!(
            out.status.success(),
            "objdump {args:?} {} failed",
            path.display()
        );
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn hex(s: &str) -> u64 {
        u64::from_str_radix(s.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("not hex: {s}"))
    }

    /// Compares parse() with binutils' reading of the same file.
    fn cross_check_objdump(path: &Path, info: &PeInfo) {
        let Some(headers) = objdump(&["-h"], path) else {
            eprintln!(
                "objdump not available; skipping cross-check of {}",
                path.display()
            );
            return;
        };
        let rows: Vec<Vec<&str>> = headers
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|t| t.len() == 7 && t[0].parse::<usize>().is_ok())
            .collect();
        assert_eq!(
            rows.len(),
            info.sections.len(),
            "section count vs objdump -h:\n{headers}"
        );
        for (row, s) in rows.iter().zip(&info.sections) {
            let name = String::from_utf8_lossy(&s.name)
                .trim_end_matches('\0')
                .to_string();
            assert_eq!(row[1], name);
            assert_eq!(
                hex(row[3]),
                info.image_base + u64::from(s.virtual_address),
                "{name} VMA"
            );
            if s.raw_size != 0 {
                assert_eq!(hex(row[5]), u64::from(s.raw_offset), "{name} file offset");
                let len = if s.virtual_size == 0 {
                    s.raw_size
                } else {
                    s.raw_size.min(s.virtual_size)
                };
                assert_eq!(hex(row[2]), u64::from(len), "{name} size");
            }
        }

        let private = objdump(&["-p"], path).unwrap();
        let field = |key: &str| -> u64 {
            let line = private
                .lines()
                .find(|l| l.split_whitespace().next() == Some(key))
                .unwrap_or_else(|| panic!("{key} missing from objdump -p"));
            hex(line.split_whitespace().nth(1).unwrap())
        };
        assert_eq!(field("ImageBase"), info.image_base);
        assert_eq!(field("SizeOfImage"), info.size_of_image);
        assert_eq!(field("SizeOfHeaders"), info.size_of_headers);
        assert_eq!(field("SectionAlignment"), u64::from(info.section_alignment));
        assert_eq!(field("AddressOfEntryPoint"), u64::from(info.entry_rva));
        assert_eq!(field("Subsystem"), u64::from(info.subsystem));
        assert_eq!(field("Characteristics") & 1 != 0, info.relocs_stripped);
        let reloc_entry = private.lines().find(|l| l.starts_with("Entry 5 "));
        let (rva, size) = reloc_entry.map_or((0, 0), |l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            (hex(t[2]), hex(t[3]))
        });
        assert_eq!(
            (rva, size),
            (u64::from(info.reloc_rva), u64::from(info.reloc_size))
        );
    }

    /// Everything the brief asks of a real image. Returns the number of DIR64 fixups checked.
    fn check_real_image(path: &Path) -> usize {
        let what = path.display();
        let file = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: {e}"));
        let info = parse(&file).unwrap_or_else(|e| panic!("{what}: {e}"));

        assert_eq!(info.subsystem, 10, "{what}: not an EFI application");
        assert!(
            info.size_of_image > 0 && info.size_of_image <= 256 << 20,
            "{what}: {info:?}"
        );
        assert!(
            info.size_of_headers >= 0x200 && info.size_of_headers <= 0x1000,
            "{what}: {info:?}"
        );
        assert!(
            (32..=0x10000).contains(&info.section_alignment),
            "{what}: {info:?}"
        );
        assert!(!info.sections.is_empty());
        let entry = u64::from(info.entry_rva);
        assert!(
            info.sections.iter().any(|s| {
                let va = u64::from(s.virtual_address);
                s.characteristics & MEM_EXECUTE != 0
                    && entry >= va
                    && entry < va + u64::from(s.virtual_size.max(s.raw_size))
            }),
            "{what}: entry 0x{entry:x} is not in an executable section"
        );
        cross_check_objdump(path, &info);

        let plain = plain_copy(&file, &info);
        let mut dest = vec![0xa5u8; info.size_of_image as usize];
        load(&file, &info, &mut dest, info.image_base).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            dest == plain,
            "{what}: load at image_base differs from a plain copy"
        );

        let load_addr = info.image_base + DELTA;
        let result = load(&file, &info, &mut dest, load_addr);
        if info.relocs_stripped {
            assert_eq!(
                result,
                Err(PeError::NotRelocatable {
                    image_base: info.image_base,
                    stripped: info.relocs_stripped
                }),
                "{what}"
            );
            return 0;
        }
        result.unwrap_or_else(|e| panic!("{what}: {e}"));

        let relocs = reference_relocs(&file, &info);
        let mut touched = vec![false; dest.len()];
        let mut dir64 = 0;
        for &(rva, kind) in &relocs {
            let r = rva as usize;
            match kind {
                0 => {}
                10 => {
                    let original = le64(
                        &file,
                        file_offset(&info, rva).expect("DIR64 site not in file data"),
                    );
                    assert_eq!(
                        le64(&dest, r),
                        original.wrapping_add(DELTA),
                        "{what}: DIR64 at 0x{rva:x}"
                    );
                    touched[r..r + 8].fill(true);
                    dir64 += 1;
                }
                3 => {
                    let original = le32(
                        &file,
                        file_offset(&info, rva).expect("HIGHLOW site not in file data"),
                    );
                    assert_eq!(
                        le32(&dest, r),
                        original.wrapping_add(DELTA as u32),
                        "{what}: HIGHLOW at 0x{rva:x}"
                    );
                    touched[r..r + 4].fill(true);
                }
                other => panic!("{what}: unexpected relocation type {other} in a real image"),
            }
        }
        for s in &info.sections {
            let va = s.virtual_address as usize;
            let copied = if s.virtual_size == 0 {
                s.raw_size
            } else {
                s.raw_size.min(s.virtual_size)
            } as usize;
            let mem = s.virtual_size.max(copied as u32) as usize;
            for i in 0..copied {
                if !touched[va + i] {
                    assert_eq!(
                        dest[va + i],
                        file[s.raw_offset as usize + i],
                        "{what}: byte at rva 0x{:x}",
                        va + i
                    );
                }
            }
            assert!(
                dest[va + copied..va + mem].iter().all(|&b| b == 0),
                "{what}: zero-fill of {:?}",
                s.name
            );
        }
        let differing = dest
            .iter()
            .zip(&plain)
            .enumerate()
            .filter(|(_, (a, b))| a != b);
        for (i, _) in differing {
            assert!(
                touched[i],
                "{what}: byte at rva 0x{i:x} changed but is not a relocation site"
            );
        }
        dir64
    }

    /// Loops over truncations of a real image; only panics matter.
    fn truncations_never_panic(path: &Path, limit: usize) {
        let file = std::fs::read(path).unwrap();
        let end = file.len().min(limit);
        for n in (0..end).step_by(97).chain(end.saturating_sub(64)..end) {
            parse_and_load_anything(&file[..n]);
        }
    }

    const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
    const SYSTEMD_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

    #[test]
    fn real_systemd_boot() {
        check_real_image(Path::new(SYSTEMD_BOOT));
        // Small enough to truncate over its whole length, so successful parses reach load too.
        truncations_never_panic(Path::new(SYSTEMD_BOOT), usize::MAX);
    }

    #[test]
    fn real_systemd_stub() {
        check_real_image(Path::new(SYSTEMD_STUB));
        truncations_never_panic(Path::new(SYSTEMD_STUB), 64 << 10);
    }

    #[test]
    fn real_image_header_corruption_never_panics() {
        let good = std::fs::read(SYSTEMD_BOOT).unwrap();
        let info = parse(&good).unwrap();
        let reloc = file_offset(&info, info.reloc_rva.into()).unwrap();
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for _ in 0..2_000 {
            let mut f = good.clone();
            for _ in 0..1 + rng.below(3) {
                // Headers and the relocation table: the parts the loader interprets.
                let at = if rng.below(2) == 0 {
                    rng.below(0x400)
                } else {
                    reloc + rng.below(info.reloc_size as usize)
                };
                f[at] = rng.next() as u8;
            }
            parse_and_load_anything(&f);
        }
    }

    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn real_grub_standalone() {
        let tmp = TempDir(std::env::temp_dir().join(format!("fw-pe-grub-{}", std::process::id())));
        std::fs::create_dir_all(&tmp.0).unwrap();
        let cfg = tmp.0.join("grub.cfg");
        let efi = tmp.0.join("grub.efi");
        std::fs::write(&cfg, "echo hello\n").unwrap();
        let mut map = std::ffi::OsString::from("boot/grub/grub.cfg=");
        map.push(&cfg);
        let status = Command::new("grub-mkstandalone")
            .args(["-O", "x86_64-efi", "-o"])
            .arg(&efi)
            .arg(map)
            .status()
            .expect("grub-mkstandalone (package grub-efi-amd64-bin / grub2-common) is needed");
        assert!(status.success(), "grub-mkstandalone failed");

        let info = parse(&std::fs::read(&efi).unwrap()).unwrap();
        assert_eq!(
            info.section_alignment, 0x1000,
            "GRUB uses 4 KiB section alignment"
        );
        let dir64 = check_real_image(&efi);
        // GRUB is the image here that really has DIR64 fixups; without them the relocation
        // check above would be vacuous.
        assert!(dir64 > 100, "only {dir64} DIR64 fixups in GRUB");
        truncations_never_panic(&efi, 64 << 10);
    }

    fn debian_kernels() -> Vec<PathBuf> {
        let hint = "run tests/guest/fetch-debian-kernel.sh cloud-amd64";
        let home = std::env::var_os("HOME")
            .unwrap_or_else(|| panic!("HOME is not set; cannot find the Debian kernel ({hint})"));
        let cache = Path::new(&home).join(".cache/lightbyte");
        let mut kernels: Vec<PathBuf> = std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("debian-linux-image-")
            })
            .map(|e| e.path().join("vmlinuz"))
            .filter(|p| p.is_file())
            .collect();
        kernels.sort();
        assert!(
            !kernels.is_empty(),
            "no {}/debian-linux-image-*/vmlinuz: {hint}",
            cache.display()
        );
        kernels
    }

    #[test]
    fn real_debian_kernel() {
        for kernel in debian_kernels() {
            let file = std::fs::read(&kernel).unwrap();
            // It must really be a bzImage with the EFI stub, not some other PE.
            assert_eq!(&file[0x202..0x206], b"HdrS", "{}", kernel.display());
            check_real_image(&kernel);
            truncations_never_panic(&kernel, 64 << 10);
        }
    }

    #[test]
    fn every_error_has_a_message() {
        let name = *b".te\"x\x01t\0";
        let errors = [
            PeError::NoMzSignature,
            PeError::Truncated {
                what: "x",
                end: 1,
                file_len: 0,
            },
            PeError::PeHeaderOutOfRange {
                e_lfanew: 1,
                file_len: 0,
            },
            PeError::NoPeSignature { e_lfanew: 0 },
            PeError::WrongMachine(0x1c0),
            PeError::NotPe32Plus(0x107),
            PeError::OptionalHeaderTooSmall {
                size: 0,
                needed: 112,
            },
            PeError::BadSectionAlignment(3),
            PeError::HeadersTooSmall {
                size_of_headers: 0,
                needed: 1,
            },
            PeError::HeadersLargerThanImage {
                size_of_headers: 2,
                size_of_image: 1,
            },
            PeError::EntryOutsideImage {
                entry_rva: 2,
                size_of_image: 1,
            },
            PeError::SectionOutsideImage {
                name,
                virtual_address: 0,
                size: 0,
                size_of_image: 0,
            },
            PeError::SectionDataOutsideFile {
                name,
                raw_offset: 0,
                size: 0,
                file_len: 0,
            },
            PeError::RelocDirOutsideImage {
                rva: 0,
                size: 0,
                size_of_image: 0,
            },
            PeError::RelocBlockTruncated {
                offset: 0,
                remaining: 0,
            },
            PeError::RelocBlockBadSize { offset: 0, size: 0 },
            PeError::RelocBlockPastDirectory {
                offset: 0,
                size: 0,
                directory_size: 0,
            },
            PeError::RelocSiteOutsideImage {
                rva: 0,
                width: 8,
                size_of_image: 0,
            },
            PeError::UnsupportedRelocType { kind: 4, rva: 0 },
            PeError::DestSizeMismatch {
                dest_len: 0,
                size_of_image: 1,
            },
            PeError::LoadAddressOverflow {
                load_addr: 0,
                size_of_image: 0,
            },
            PeError::NotRelocatable {
                image_base: 0,
                stripped: false,
            },
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.len() > 20, "{e:?}: {msg}");
        }
        assert_eq!(
            errors[11].to_string(),
            "section \".te\\x22x\\x01t\" (rva 0x0, 0x0 bytes) extends past SizeOfImage 0x0"
        );
    }
}
