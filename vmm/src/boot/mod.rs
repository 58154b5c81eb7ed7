//! Direct Linux boot: kernel image (ELF vmlinux or bzImage), initramfs, command line, and the
//! boot information structure of the chosen protocol (PVH `hvm_start_info` or the zero page).

mod linux;
mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START};
use crate::arch::memory;
use crate::arch::regs::BootMode;

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

/// Error loading the guest's boot payload. Every variant names the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF nor a bzImage.
    #[error("kernel {0}: not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    UnknownFormat(PathBuf),
    /// linux-loader rejected the image.
    #[error("kernel {path}: {source}")]
    Load {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        source: linux_loader::loader::Error,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length, without the NUL.
        len: usize,
        /// The largest accepted length.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initramfs does not fit between the kernel and the end of low memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitramfsTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it may end at.
        limit: u64,
        /// Where the kernel's reserved area ends.
        kernel_end: u64,
    },
    /// Writing boot structures failed.
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Why.
        source: vm_memory::GuestMemoryError,
    },
    /// The boot protocol structure could not be written.
    #[error("writing the {what}: {source}")]
    BootInfo {
        /// Which structure.
        what: &'static str,
        /// What linux-loader's configurator said.
        source: linux_loader::configurator::Error,
    },
    /// A firmware without the PVH entry note we start firmware through.
    #[error("firmware {0}: not a PVH ELF (an ELF executable with a XEN_ELFNOTE_PHYS32_ENTRY note, such as lightbyte-firmware)")]
    NotFirmware(PathBuf),
    /// The PVH memory map does not fit its area.
    #[error("PVH memory map has {0} entries, more than fit")]
    TooManyMemmapEntries(usize),
}

fn boot_info_err(what: &'static str) -> impl FnOnce(linux_loader::configurator::Error) -> Error {
    move |source| Error::BootInfo { what, source }
}

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootPayload<'a> {
    /// Kernel image, or the firmware when `firmware` is set.
    pub kernel: &'a Path,
    /// `kernel` is a UEFI firmware: a PVH ELF started with the command line as its only input.
    pub firmware: bool,
    /// Optional initramfs.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM size.
    pub mem_size: u64,
    /// Address of the ACPI RSDP, handed to the kernel.
    pub rsdp: GuestAddress,
}

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug)]
struct Initramfs {
    addr: u64,
    size: u64,
}

enum Format {
    Elf,
    BzImage,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn detect_format(file: &mut File, path: &Path) -> Result<Format, Error> {
    let mut head = [0u8; 0x206];
    let mut filled = 0;
    while filled < head.len() {
        match file
            .read(&mut head[filled..])
            .map_err(io_err("kernel", path))?
        {
            0 => break,
            n => filled += n,
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(io_err("kernel", path))?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        Ok(Format::Elf)
    } else if filled >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Ok(Format::BzImage)
    } else {
        Err(Error::UnknownFormat(path.to_path_buf()))
    }
}

/// Checks that `kernel` is a file we know how to boot, without loading it.
pub fn check_kernel(kernel: &Path) -> Result<(), Error> {
    let mut file = File::open(kernel).map_err(io_err("kernel", kernel))?;
    detect_format(&mut file, kernel).map(|_| ())
}

/// Checks that `firmware` is an ELF (its PVH note is checked when it is loaded).
pub fn check_firmware(firmware: &Path) -> Result<(), Error> {
    let mut file = File::open(firmware).map_err(io_err("firmware", firmware))?;
    match detect_format(&mut file, firmware) {
        Ok(Format::Elf) => Ok(()),
        _ => Err(Error::NotFirmware(firmware.to_path_buf())),
    }
}

/// Loads kernel, initramfs and command line into `mem`, writes the boot information for the
/// protocol the kernel supports, and returns how the boot CPU must enter it.
pub fn load(mem: &GuestMemoryMmap, payload: &BootPayload) -> Result<BootMode, Error> {
    let kernel = payload.kernel;
    let mut file = File::open(kernel).map_err(io_err("kernel", kernel))?;
    let format = detect_format(&mut file, kernel)?;
    let load_err = |source| Error::Load {
        path: kernel.to_path_buf(),
        source,
    };
    if payload.firmware && !matches!(format, Format::Elf) {
        return Err(Error::NotFirmware(kernel.to_path_buf()));
    }
    let start = Some(GuestAddress(HIGH_RAM_START));
    let result: KernelLoaderResult = match format {
        Format::Elf => Elf::load(mem, None, &mut file, start).map_err(load_err)?,
        Format::BzImage => BzImage::load(mem, None, &mut file, start).map_err(load_err)?,
    };

    write_cmdline(mem, payload.cmdline)?;
    let kernel_end = reserved_end(&result);
    let initramfs = match payload.initramfs {
        Some(path) => Some(load_initramfs(
            mem,
            path,
            kernel_end,
            initramfs_limit(payload.mem_size, result.setup_header.as_ref()),
        )?),
        None => None,
    };

    match (format, result.pvh_boot_cap) {
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) if payload.firmware => {
            pvh::write_start_info(mem, payload, None)?;
            Ok(BootMode::Pvh { entry: entry.0 })
        }
        _ if payload.firmware => Err(Error::NotFirmware(kernel.to_path_buf())),
        (Format::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            pvh::write_start_info(mem, payload, initramfs)?;
            Ok(BootMode::Pvh { entry: entry.0 })
        }
        (Format::Elf, _) => {
            linux::write_zero_page(mem, payload, None, initramfs)?;
            Ok(BootMode::LinuxLongMode {
                entry: result.kernel_load.0,
            })
        }
        (Format::BzImage, _) => {
            linux::write_zero_page(mem, payload, result.setup_header, initramfs)?;
            Ok(BootMode::LinuxLongMode {
                entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            })
        }
    }
}

/// End of the memory the kernel may use while it starts: the loaded image, or for a bzImage the
/// larger area (`init_size`) it decompresses into.
fn reserved_end(result: &KernelLoaderResult) -> u64 {
    let image_end = result.kernel_end;
    let init_end = result
        .setup_header
        .map(|h| result.kernel_load.0 + u64::from(h.init_size))
        .unwrap_or(0);
    image_end.max(init_end)
}

/// Highest address (exclusive) the initramfs may end at.
fn initramfs_limit(mem_size: u64, hdr: Option<&setup_header>) -> u64 {
    let low_end = memory::low_ram_end(mem_size);
    match hdr {
        Some(h) if h.initrd_addr_max != 0 => low_end.min(u64::from(h.initrd_addr_max) + 1),
        _ => low_end,
    }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::Memory {
            what: "command line",
            source,
        })
}

/// Places the initramfs page-aligned at the top of low memory, as boot loaders do.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<Initramfs, Error> {
    let mut file = File::open(path).map_err(io_err("initramfs", path))?;
    let size = file.metadata().map_err(io_err("initramfs", path))?.len();
    let too_large = || Error::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::Memory {
            what: "initramfs",
            source,
        })?;
    Ok(Initramfs { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpfile(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        File::create(&p).unwrap().write_all(bytes).unwrap();
        (dir, p)
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn payload<'a>(
        kernel: &'a Path,
        initramfs: Option<&'a Path>,
        cmdline: &'a str,
    ) -> BootPayload<'a> {
        BootPayload {
            kernel,
            initramfs,
            cmdline,
            mem_size: 64 << 20,
            rsdp: GuestAddress(0xe0000),
            firmware: false,
        }
    }

    #[test]
    fn garbage_kernel_is_rejected_by_name() {
        let (_d, p) = tmpfile(b"this is not a kernel at all");
        let err = load(&mem(), &payload(&p, None, "")).unwrap_err();
        assert!(matches!(err, Error::UnknownFormat(_)));
        assert!(err.to_string().contains("not a Linux kernel"), "{err}");
    }

    #[test]
    fn empty_and_missing_kernels_are_errors() {
        let (_d, p) = tmpfile(b"");
        assert!(matches!(
            load(&mem(), &payload(&p, None, "")),
            Err(Error::UnknownFormat(_))
        ));
        let missing = Path::new("/nonexistent/vmlinux");
        let err = load(&mem(), &payload(missing, None, "")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn truncated_elf_is_a_load_error() {
        let (_d, p) = tmpfile(b"\x7fELF\x02\x01\x01");
        assert!(matches!(
            load(&mem(), &payload(&p, None, "")),
            Err(Error::Load { .. })
        ));
    }

    #[test]
    fn cmdline_limits() {
        let m = mem();
        write_cmdline(&m, "console=ttyS0").unwrap();
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&m, &long),
            Err(Error::CmdlineTooLong { .. })
        ));
        assert!(matches!(write_cmdline(&m, "a\0b"), Err(Error::CmdlineNul)));
    }

    #[test]
    fn initramfs_goes_to_top_of_memory_page_aligned() {
        let (_d, p) = tmpfile(&[0xab; 5000]);
        let m = mem();
        let placed = load_initramfs(&m, &p, 0x200_0000, 64 << 20).unwrap();
        assert_eq!(placed.size, 5000);
        assert_eq!(placed.addr % PAGE_SIZE, 0);
        assert!(placed.addr + placed.size <= 64 << 20);
        let mut back = [0u8; 5000];
        m.read_slice(&mut back, GuestAddress(placed.addr)).unwrap();
        assert!(back.iter().all(|b| *b == 0xab));
    }

    #[test]
    fn initramfs_overlapping_kernel_is_rejected() {
        let (_d, p) = tmpfile(&[0; 8192]);
        let err = load_initramfs(&mem(), &p, (64 << 20) - 4096, 64 << 20).unwrap_err();
        assert!(matches!(err, Error::InitramfsTooLarge { .. }));
    }

    #[test]
    fn initramfs_limit_respects_header() {
        let hdr = setup_header {
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        assert_eq!(initramfs_limit(2 << 30, Some(&hdr)), 0x3800_0000);
        assert_eq!(initramfs_limit(256 << 20, Some(&hdr)), 256 << 20);
        assert_eq!(initramfs_limit(8 << 30, None), 0xc000_0000);
    }
}
