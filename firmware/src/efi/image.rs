//! Images: LoadImage (PE32+ from a buffer or a file device path), StartImage with an Exit that
//! unwinds back to it, UnloadImage, and the Loaded Image protocols.

use alloc::vec::Vec;
use core::arch::global_asm;
use core::ffi::c_void;
use r_efi::efi::{Handle, Status};
use r_efi::protocols::{device_path, loaded_image, loaded_image_device_path, simple_file_system};

use super::{device_path as dp, fs, handles};
use crate::memmap::{kind, Placement, PAGE};
use crate::pe;
use crate::racy::Racy;

global_asm!(
    // fn lb_enter_image(entry, handle, systab, saved_rsp: *mut u64) -> Status (sysv64)
    // Calls the image's MS-ABI entry point; lb_exit_image unwinds to here from Exit().
    ".pushsection .text",
    ".global lb_enter_image",
    "lb_enter_image:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "mov [rcx], rsp",
    "mov rax, rdi",
    "mov rcx, rsi",
    "sub rsp, 40",
    "call rax",
    "add rsp, 40",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    // fn lb_exit_image(saved_rsp: u64, status: u64) -> ! (sysv64)
    ".global lb_exit_image",
    "lb_exit_image:",
    "mov rsp, rdi",
    "mov rax, rsi",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".popsection",
);

extern "sysv64" {
    fn lb_enter_image(
        entry: u64,
        handle: Handle,
        systab: *mut c_void,
        saved_rsp: *mut u64,
    ) -> usize;
    fn lb_exit_image(saved_rsp: u64, status: usize) -> !;
}

struct Image {
    handle: Handle,
    base: u64,
    pages: u64,
    entry: u64,
    loaded: *mut loaded_image::Protocol,
    /// Stack pointer saved by StartImage while the image runs (0 when not started).
    saved_rsp: u64,
    started: bool,
}

static IMAGES: Racy<Vec<Image>> = Racy::new(Vec::new());

fn images() -> &'static mut Vec<Image> {
    // SAFETY: borrows end before any call into an image.
    unsafe { IMAGES.borrow() }
}

/// Where an image came from, for its Loaded Image protocol.
pub struct Origin {
    /// Handle of the device holding it (null for a buffer without a path).
    pub device: Handle,
    /// Path of the file relative to the device (the file-path nodes), if known.
    pub file_path: *mut device_path::Protocol,
    /// The whole device path, for the Loaded Image Device Path protocol.
    pub full_path: *mut device_path::Protocol,
}

/// Loads a PE32+ image from `file` and installs its handle.
pub fn load(file: &[u8], parent: Handle, origin: Origin) -> Result<Handle, Status> {
    let info = pe::parse(file).map_err(|e| {
        crate::log!("LoadImage: {e}");
        Status::LOAD_ERROR
    })?;
    if info.subsystem != 10 && info.subsystem != 11 && info.subsystem != 12 {
        crate::log!(
            "LoadImage: PE subsystem {} is not an EFI image",
            info.subsystem
        );
        return Err(Status::UNSUPPORTED);
    }
    let pages = info.size_of_image.div_ceil(PAGE);
    let (code, data) = if info.subsystem == 12 {
        (kind::RUNTIME_CODE, kind::RUNTIME_DATA)
    } else if info.subsystem == 11 {
        (kind::BOOT_CODE, kind::BOOT_DATA)
    } else {
        (kind::LOADER_CODE, kind::LOADER_DATA)
    };
    let alloc = |placement| {
        // SAFETY: no other borrow of the memory map is alive.
        unsafe { crate::MEMORY.borrow() }.allocate(placement, code, pages)
    };
    let base = alloc(Placement::Any).map_err(|_| Status::OUT_OF_RESOURCES)?;
    let dest = |base: u64| {
        // SAFETY: pages we just allocated for the image, `size_of_image` bytes.
        unsafe { core::slice::from_raw_parts_mut(base as *mut u8, info.size_of_image as usize) }
    };
    let base = match pe::load(file, &info, dest(base), base) {
        Ok(()) => base,
        Err(pe::PeError::NotRelocatable { .. }) => {
            // SAFETY: no other borrow of the memory map is alive.
            let _ = unsafe { crate::MEMORY.borrow() }.free(base, pages);
            let at = alloc(Placement::At(info.image_base)).map_err(|_| {
                crate::log!(
                    "LoadImage: image cannot move and its base {:#x} is not free",
                    info.image_base
                );
                Status::LOAD_ERROR
            })?;
            pe::load(file, &info, dest(at), at).map_err(|e| {
                crate::log!("LoadImage: {e}");
                Status::LOAD_ERROR
            })?;
            at
        }
        Err(e) => {
            crate::log!("LoadImage: {e}");
            // SAFETY: no other borrow of the memory map is alive.
            let _ = unsafe { crate::MEMORY.borrow() }.free(base, pages);
            return Err(Status::LOAD_ERROR);
        }
    };
    let loaded = super::util::leak(loaded_image::Protocol {
        revision: loaded_image::REVISION,
        parent_handle: parent,
        system_table: super::system_table(),
        device_handle: origin.device,
        file_path: origin.file_path,
        reserved: core::ptr::null_mut(),
        load_options_size: 0,
        load_options: core::ptr::null_mut(),
        image_base: base as *mut c_void,
        image_size: info.size_of_image,
        image_code_type: code,
        image_data_type: data,
        unload: None,
    });
    let handle = handles::install(
        core::ptr::null_mut(),
        loaded_image::PROTOCOL_GUID,
        loaded as *mut c_void,
    )?;
    if !origin.full_path.is_null() {
        handles::install(
            handle,
            loaded_image_device_path::PROTOCOL_GUID,
            origin.full_path as *mut c_void,
        )?;
    }
    images().push(Image {
        handle,
        base,
        pages,
        entry: base + u64::from(info.entry_rva),
        loaded,
        saved_rsp: 0,
        started: false,
    });
    Ok(handle)
}

/// Loads the file a device path names: the longest prefix with a Simple File System gives the
/// volume, the file-path nodes after it the file.
pub fn load_from_path(path: *mut device_path::Protocol, parent: Handle) -> Result<Handle, Status> {
    // SAFETY: a device path from the loader.
    let bytes = unsafe { dp::nodes(path) }.ok_or(Status::INVALID_PARAMETER)?;
    let (device, used) =
        super::boot_services::locate_device_path_bytes(&simple_file_system::PROTOCOL_GUID, bytes)
            .ok_or(Status::NOT_FOUND)?;
    let rest = &bytes[used..];
    let file = dp::file_path(rest).ok_or(Status::NOT_FOUND)?;
    let iface =
        handles::get(device, &simple_file_system::PROTOCOL_GUID).ok_or(Status::NOT_FOUND)?;
    // SAFETY: a Simple File System interface we installed.
    let volume = unsafe { fs::volume_of(iface) };
    let node = fs::find_file(volume, &file).map_err(|e| {
        crate::log!("LoadImage: {file}: {e}");
        Status::NOT_FOUND
    })?;
    let mut buf =
        crate::efi::pages::PageBuf::new(node.size as usize).ok_or(Status::OUT_OF_RESOURCES)?;
    fs::read_all(volume, &node, buf.as_mut_slice()).map_err(|e| {
        crate::log!("LoadImage: reading {file}: {e}");
        Status::DEVICE_ERROR
    })?;
    let origin = Origin {
        device,
        file_path: dp::Path::default().append(rest).finish(),
        full_path: dp::Path::default().append(bytes).finish(),
    };
    load(buf.as_slice(), parent, origin)
}

/// Runs a loaded image until it returns or calls Exit.
pub fn start(handle: Handle) -> Status {
    let Some(i) = images().iter().position(|im| im.handle == handle) else {
        return Status::INVALID_PARAMETER;
    };
    if images()[i].started {
        return Status::INVALID_PARAMETER;
    }
    images()[i].started = true;
    let entry = images()[i].entry;
    let saved: *mut u64 = &mut images()[i].saved_rsp;
    // SAFETY: the entry point of a PE image we loaded and relocated; it follows the UEFI calling
    // convention. `saved` stays valid: image records are only removed after they stop running.
    let status =
        unsafe { lb_enter_image(entry, handle, super::system_table() as *mut c_void, saved) };
    if let Some(i) = images().iter().position(|im| im.handle == handle) {
        images()[i].saved_rsp = 0;
    }
    Status::from_usize(status)
}

/// Exit: unwinds the running image `handle` back into its StartImage.
pub fn exit(handle: Handle, status: Status) -> Status {
    let Some(im) = images().iter().find(|im| im.handle == handle) else {
        return Status::INVALID_PARAMETER;
    };
    if !im.started {
        return unload(handle);
    }
    if im.saved_rsp == 0 {
        return Status::INVALID_PARAMETER;
    }
    let rsp = im.saved_rsp;
    // SAFETY: `rsp` is the stack of the StartImage call still below us on this stack; its
    // frame holds the registers lb_enter_image pushed.
    unsafe { lb_exit_image(rsp, status.as_usize()) }
}

/// Frees an image that is not running.
pub fn unload(handle: Handle) -> Status {
    let Some(i) = images().iter().position(|im| im.handle == handle) else {
        return Status::INVALID_PARAMETER;
    };
    if images()[i].saved_rsp != 0 {
        return Status::ACCESS_DENIED;
    }
    let im = images().remove(i);
    let _ = handles::uninstall(
        im.handle,
        loaded_image::PROTOCOL_GUID,
        im.loaded as *mut c_void,
    );
    if let Some(p) = handles::get(im.handle, &loaded_image_device_path::PROTOCOL_GUID) {
        let _ = handles::uninstall(im.handle, loaded_image_device_path::PROTOCOL_GUID, p);
    }
    // SAFETY: no other borrow of the memory map is alive.
    let _ = unsafe { crate::MEMORY.borrow() }.free(im.base, im.pages);
    Status::SUCCESS
}

/// The Loaded Image protocol of `handle`, to set load options.
pub fn loaded_image(handle: Handle) -> Option<*mut loaded_image::Protocol> {
    images()
        .iter()
        .find(|im| im.handle == handle)
        .map(|im| im.loaded)
}
