//! Simple File System and File protocols over a FAT volume (read-only: the ESP is the loaders'
//! to read; writes answer WRITE_PROTECTED).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::{Char16, Guid, Status};
use r_efi::protocols::{file, simple_file_system as sfs};

use crate::block::Slice;
use crate::fat::{DateTime, Fat, FatError, Node};
use crate::virtio_blk::VirtioBlk;

/// A partition of a virtio disk.
pub type Part = Slice<'static, VirtioBlk>;

/// One FAT volume.
pub struct Volume {
    /// The file system.
    pub fat: Fat<Part>,
}

#[repr(C)]
struct SimpleFs {
    proto: sfs::Protocol,
    volume: &'static Volume,
}

#[repr(C)]
struct FileHandle {
    proto: file::Protocol,
    volume: &'static Volume,
    node: Node,
    pos: u64,
    dir_cursor: u64,
}

const FILE_MODE_WRITE: u64 = 0x2;
const FILE_MODE_CREATE: u64 = 0x8000_0000_0000_0000;
const INFO_HEADER: usize = 80;

fn status(e: &FatError) -> Status {
    match e {
        FatError::NotFound => Status::NOT_FOUND,
        FatError::NotADirectory | FatError::IsADirectory => Status::NOT_FOUND,
        FatError::Io => Status::DEVICE_ERROR,
        _ => Status::VOLUME_CORRUPTED,
    }
}

fn this(p: *mut file::Protocol) -> &'static mut FileHandle {
    // SAFETY: every file protocol we hand out is the first field of a leaked FileHandle.
    unsafe { &mut *(p as *mut FileHandle) }
}

fn new_handle(volume: &'static Volume, node: Node) -> *mut file::Protocol {
    super::util::leak(FileHandle {
        proto: file::Protocol {
            revision: 0x0001_0000,
            open,
            close,
            delete,
            read,
            write,
            get_position,
            set_position,
            get_info,
            set_info,
            flush,
            open_ex,
            read_ex,
            write_ex,
            flush_ex,
        },
        volume,
        node,
        pos: 0,
        dir_cursor: 0,
    }) as *mut file::Protocol
}

extern "efiapi" fn open_volume(this: *mut sfs::Protocol, root: *mut *mut file::Protocol) -> Status {
    // SAFETY: our protocol is the first field of a SimpleFs.
    let fs = unsafe { &*(this as *const SimpleFs) };
    let h = new_handle(fs.volume, fs.volume.fat.root());
    // SAFETY: loader's out-pointer.
    if unsafe { super::util::put(root, h) } {
        Status::SUCCESS
    } else {
        Status::INVALID_PARAMETER
    }
}

extern "efiapi" fn open(
    p: *mut file::Protocol,
    new: *mut *mut file::Protocol,
    name: *mut Char16,
    mode: u64,
    _attrs: u64,
) -> Status {
    let f = this(p);
    // SAFETY: a NUL-terminated name from the loader.
    let Some(name) = (unsafe { super::util::read_ucs2(name) }) else {
        return Status::INVALID_PARAMETER;
    };
    let name = super::util::ucs2_to_string(&name);
    let found = f.volume.fat.lookup(&f.node, &name);
    if mode & (FILE_MODE_WRITE | FILE_MODE_CREATE) != 0 {
        return match found {
            Err(FatError::NotFound) if mode & FILE_MODE_CREATE == 0 => Status::NOT_FOUND,
            _ => Status::WRITE_PROTECTED,
        };
    }
    match found {
        Ok(node) => {
            let h = new_handle(f.volume, node);
            // SAFETY: loader's out-pointer.
            if unsafe { super::util::put(new, h) } {
                Status::SUCCESS
            } else {
                // SAFETY: just leaked by new_handle; nobody else has it.
                drop(unsafe { Box::from_raw(h as *mut FileHandle) });
                Status::INVALID_PARAMETER
            }
        }
        Err(e) => status(&e),
    }
}

extern "efiapi" fn close(p: *mut file::Protocol) -> Status {
    // SAFETY: the loader gives back a handle we leaked; it must not use it again.
    drop(unsafe { Box::from_raw(p as *mut FileHandle) });
    Status::SUCCESS
}

extern "efiapi" fn delete(p: *mut file::Protocol) -> Status {
    close(p);
    Status::WARN_DELETE_FAILURE
}

fn efi_time(t: &DateTime) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&t.year.to_le_bytes());
    b[2] = t.month;
    b[3] = t.day;
    b[4] = t.hour;
    b[5] = t.minute;
    b[6] = t.second;
    // Time zone: EFI_UNSPECIFIED_TIMEZONE.
    b[12..14].copy_from_slice(&0x07ffu16.to_le_bytes());
    b
}

fn file_info(node: &Node, cluster: u64) -> Vec<u8> {
    let name = super::util::to_ucs2(&node.name);
    let size = INFO_HEADER + 2 * name.len();
    let mut b = Vec::with_capacity(size);
    b.extend_from_slice(&(size as u64).to_le_bytes());
    let len = if node.is_dir { 0 } else { node.size };
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&(len.div_ceil(cluster) * cluster).to_le_bytes());
    b.extend_from_slice(&efi_time(&node.created));
    b.extend_from_slice(&efi_time(&node.accessed));
    b.extend_from_slice(&efi_time(&node.modified));
    let mut attr = u64::from(node.attributes) & 0x37;
    if node.is_dir {
        attr |= 0x10;
    }
    b.extend_from_slice(&attr.to_le_bytes());
    for u in name {
        b.extend_from_slice(&u.to_le_bytes());
    }
    b
}

/// Copies `data` out if it fits, else reports the size needed.
fn give(data: &[u8], size: *mut usize, buf: *mut c_void) -> Status {
    if size.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: loader's in/out size.
    let room = unsafe { size.read_unaligned() };
    // SAFETY: as above.
    unsafe { size.write_unaligned(data.len()) };
    if room < data.len() {
        return Status::BUFFER_TOO_SMALL;
    }
    if buf.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's buffer holds `room` >= len bytes.
    unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), buf as *mut u8, data.len()) };
    Status::SUCCESS
}

extern "efiapi" fn read(p: *mut file::Protocol, size: *mut usize, buf: *mut c_void) -> Status {
    let f = this(p);
    if size.is_null() {
        return Status::INVALID_PARAMETER;
    }
    if f.node.is_dir {
        let mut cursor = f.dir_cursor;
        return match f.volume.fat.next_entry(&f.node, &mut cursor) {
            Ok(None) => {
                // SAFETY: checked non-null above.
                unsafe { size.write_unaligned(0) };
                Status::SUCCESS
            }
            Ok(Some(entry)) => {
                let s = give(
                    &file_info(&entry, u64::from(f.volume.fat.cluster_size())),
                    size,
                    buf,
                );
                if s == Status::SUCCESS {
                    f.dir_cursor = cursor;
                }
                s
            }
            Err(e) => status(&e),
        };
    }
    // SAFETY: checked non-null above.
    let want = unsafe { size.read_unaligned() };
    if want == 0 {
        return Status::SUCCESS;
    }
    if buf.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's buffer holds `want` bytes.
    let out = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, want) };
    match f.volume.fat.read(&f.node, f.pos, out) {
        Ok(n) => {
            f.pos += n as u64;
            // SAFETY: checked non-null above.
            unsafe { size.write_unaligned(n) };
            Status::SUCCESS
        }
        Err(e) => status(&e),
    }
}

extern "efiapi" fn write(_p: *mut file::Protocol, _size: *mut usize, _buf: *mut c_void) -> Status {
    Status::WRITE_PROTECTED
}

extern "efiapi" fn get_position(p: *mut file::Protocol, pos: *mut u64) -> Status {
    let f = this(p);
    if f.node.is_dir {
        return Status::UNSUPPORTED;
    }
    // SAFETY: loader's out-pointer.
    if unsafe { super::util::put(pos, f.pos) } {
        Status::SUCCESS
    } else {
        Status::INVALID_PARAMETER
    }
}

extern "efiapi" fn set_position(p: *mut file::Protocol, pos: u64) -> Status {
    let f = this(p);
    if f.node.is_dir {
        if pos != 0 {
            return Status::UNSUPPORTED;
        }
        f.dir_cursor = 0;
        return Status::SUCCESS;
    }
    f.pos = if pos == u64::MAX { f.node.size } else { pos };
    Status::SUCCESS
}

extern "efiapi" fn get_info(
    p: *mut file::Protocol,
    ty: *mut Guid,
    size: *mut usize,
    buf: *mut c_void,
) -> Status {
    let f = this(p);
    // SAFETY: the loader's GUID.
    let Some(ty) = (unsafe { super::util::guid(ty) }) else {
        return Status::INVALID_PARAMETER;
    };
    let fat = &f.volume.fat;
    if ty == file::INFO_ID {
        give(
            &file_info(&f.node, u64::from(fat.cluster_size())),
            size,
            buf,
        )
    } else if ty == file::SYSTEM_INFO_ID {
        let label = super::util::to_ucs2(&fat.volume_label());
        let total = 36 + 2 * label.len();
        let mut b = Vec::with_capacity(total);
        b.extend_from_slice(&(total as u64).to_le_bytes());
        b.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]); // read-only, padding
        b.extend_from_slice(&fat.total_bytes().to_le_bytes());
        b.extend_from_slice(&fat.free_bytes().unwrap_or(0).to_le_bytes());
        b.extend_from_slice(&fat.cluster_size().to_le_bytes());
        for u in label {
            b.extend_from_slice(&u.to_le_bytes());
        }
        give(&b, size, buf)
    } else if ty == file::SYSTEM_VOLUME_LABEL_ID {
        let b: Vec<u8> = super::util::to_ucs2(&fat.volume_label())
            .iter()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        give(&b, size, buf)
    } else {
        Status::UNSUPPORTED
    }
}

extern "efiapi" fn set_info(
    _p: *mut file::Protocol,
    _ty: *mut Guid,
    _size: usize,
    _buf: *mut c_void,
) -> Status {
    Status::WRITE_PROTECTED
}

extern "efiapi" fn flush(_p: *mut file::Protocol) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn open_ex(
    _p: *mut file::Protocol,
    _new: *mut *mut file::Protocol,
    _name: *mut Char16,
    _mode: u64,
    _attrs: u64,
    _token: *mut file::IoToken,
) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn read_ex(_p: *mut file::Protocol, _token: *mut file::IoToken) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn write_ex(_p: *mut file::Protocol, _token: *mut file::IoToken) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn flush_ex(_p: *mut file::Protocol, _token: *mut file::IoToken) -> Status {
    Status::UNSUPPORTED
}

/// The Simple File System protocol of `volume`.
pub fn build(volume: &'static Volume) -> *mut c_void {
    super::util::leak(SimpleFs {
        proto: sfs::Protocol {
            revision: 0x0001_0000,
            open_volume,
        },
        volume,
    }) as *mut c_void
}

/// Looks up a regular file of `volume` by path.
pub fn find_file(volume: &Volume, path: &str) -> Result<Node, FatError> {
    let node = volume.fat.lookup(&volume.fat.root(), path)?;
    if node.is_dir {
        return Err(FatError::IsADirectory);
    }
    Ok(node)
}

/// Reads all of `node` into `out` (exactly its size).
pub fn read_all(volume: &Volume, node: &Node, out: &mut [u8]) -> Result<(), FatError> {
    let mut done = 0;
    while done < out.len() {
        let n = volume.fat.read(node, done as u64, &mut out[done..])?;
        if n == 0 {
            return Err(FatError::Corrupt(
                "file shorter than its directory entry says",
            ));
        }
        done += n;
    }
    Ok(())
}

/// The volume behind a Simple File System interface we installed.
///
/// # Safety
/// `iface` is an interface installed for the Simple File System GUID by this module.
pub unsafe fn volume_of(iface: *mut c_void) -> &'static Volume {
    // SAFETY: per the caller, a SimpleFs of ours.
    unsafe { (*(iface as *const SimpleFs)).volume }
}
