//! The Boot Services table.

use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::{self, Event, EventNotify, Guid, Handle, Status, Tpl};
use r_efi::protocols::device_path;

use super::util::{guid, put};
use super::{device_path as dp, events, handles, image};
use crate::memmap::{kind, MapError, Placement, PAGE};
use crate::racy::Racy;

static TPL: Racy<usize> = Racy::new(efi::TPL_APPLICATION);
static MONOTONIC: Racy<u64> = Racy::new(0);
const POOL_MAGIC: u64 = 0x6c62_706f_6f6c_2121;
const POOL_HEADER: usize = 16;

fn memory() -> &'static mut crate::memmap::MemoryMap {
    // SAFETY: boot services never call foreign code while holding this borrow.
    unsafe { crate::MEMORY.borrow() }
}

fn map_err(e: MapError) -> Status {
    match e {
        MapError::OutOfResources => Status::OUT_OF_RESOURCES,
        MapError::NotFound => Status::NOT_FOUND,
        MapError::InvalidParameter => Status::INVALID_PARAMETER,
    }
}

extern "efiapi" fn raise_tpl(new: Tpl) -> Tpl {
    let old = TPL.get();
    TPL.set(new);
    old
}

extern "efiapi" fn restore_tpl(old: Tpl) {
    TPL.set(old);
}

extern "efiapi" fn allocate_pages(
    ty: efi::AllocateType,
    mem: efi::MemoryType,
    pages: usize,
    addr: *mut efi::PhysicalAddress,
) -> Status {
    if addr.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: checked non-null; the loader's in/out address.
    let requested = unsafe { addr.read_unaligned() };
    let placement = match ty {
        efi::ALLOCATE_ANY_PAGES => Placement::Any,
        efi::ALLOCATE_MAX_ADDRESS => Placement::Below(requested),
        efi::ALLOCATE_ADDRESS => Placement::At(requested),
        _ => return Status::INVALID_PARAMETER,
    };
    match memory().allocate(placement, mem, pages as u64) {
        Ok(a) => {
            // SAFETY: checked non-null.
            unsafe { addr.write_unaligned(a) };
            Status::SUCCESS
        }
        Err(e) => map_err(e),
    }
}

extern "efiapi" fn free_pages(addr: efi::PhysicalAddress, pages: usize) -> Status {
    match memory().free(addr, pages as u64) {
        Ok(()) => Status::SUCCESS,
        Err(e) => map_err(e),
    }
}

/// Writes the memory map into a loader's buffer (UEFI's GetMemoryMap contract).
extern "efiapi" fn get_memory_map(
    size: *mut usize,
    map: *mut efi::MemoryDescriptor,
    key: *mut usize,
    desc_size: *mut usize,
    version: *mut u32,
) -> Status {
    if size.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let m = memory();
    let d = core::mem::size_of::<efi::MemoryDescriptor>();
    let needed = m.regions().len() * d;
    // SAFETY: loader's out-pointers (checked for null by put, or above).
    unsafe {
        put(desc_size, d);
        put(version, efi::MEMORY_DESCRIPTOR_VERSION);
    }
    // SAFETY: checked non-null.
    let room = unsafe { size.read_unaligned() };
    // SAFETY: checked non-null.
    unsafe { size.write_unaligned(needed) };
    if room < needed {
        return Status::BUFFER_TOO_SMALL;
    }
    if map.is_null() {
        return Status::INVALID_PARAMETER;
    }
    for (i, r) in m.regions().iter().enumerate() {
        let desc = efi::MemoryDescriptor {
            r#type: r.kind,
            physical_start: r.start,
            virtual_start: 0,
            number_of_pages: r.pages,
            attribute: r.attributes(),
        };
        // SAFETY: the buffer holds `room` >= needed bytes.
        unsafe {
            (map as *mut u8)
                .add(i * d)
                .cast::<efi::MemoryDescriptor>()
                .write_unaligned(desc)
        };
    }
    // SAFETY: loader's out-pointer.
    unsafe { put(key, m.key()) };
    Status::SUCCESS
}

extern "efiapi" fn allocate_pool(
    mem: efi::MemoryType,
    size: usize,
    out: *mut *mut c_void,
) -> Status {
    if out.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let Some(total) = size.checked_add(POOL_HEADER) else {
        return Status::OUT_OF_RESOURCES;
    };
    let pages = (total as u64).div_ceil(PAGE);
    match memory().allocate(Placement::Any, mem, pages) {
        Ok(a) => {
            // SAFETY: the header sits in the pages just allocated.
            unsafe {
                (a as *mut u64).write(POOL_MAGIC);
                (a as *mut u64).add(1).write(pages);
                out.write_unaligned((a as usize + POOL_HEADER) as *mut c_void);
            }
            Status::SUCCESS
        }
        Err(e) => map_err(e),
    }
}

extern "efiapi" fn free_pool(p: *mut c_void) -> Status {
    if p.is_null() || (p as u64) < POOL_HEADER as u64 {
        return Status::INVALID_PARAMETER;
    }
    let base = p as u64 - POOL_HEADER as u64;
    if base % PAGE != 0 || !memory().is_ram(base, POOL_HEADER as u64) {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: a pool block's header (checked to lie in RAM and be page-aligned).
    let (magic, pages) = unsafe {
        (
            (base as *const u64).read(),
            (base as *const u64).add(1).read(),
        )
    };
    if magic != POOL_MAGIC {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: still our header; clear the magic so a double free is caught.
    unsafe { (base as *mut u64).write(0) };
    match memory().free(base, pages) {
        Ok(()) => Status::SUCCESS,
        Err(e) => map_err(e),
    }
}

extern "efiapi" fn create_event(
    ty: u32,
    _tpl: Tpl,
    notify: Option<EventNotify>,
    ctx: *mut c_void,
    out: *mut Event,
) -> Status {
    create_event_ex(ty, _tpl, notify, ctx, core::ptr::null(), out)
}

extern "efiapi" fn create_event_ex(
    ty: u32,
    _tpl: Tpl,
    notify: Option<EventNotify>,
    ctx: *const c_void,
    group: *const Guid,
    out: *mut Event,
) -> Status {
    if out.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's GUID pointer or null.
    let group = unsafe { guid(group) };
    match events::create(ty, notify, ctx as *mut c_void, group, events::Source::Plain) {
        // SAFETY: checked non-null.
        Ok(e) => unsafe {
            out.write_unaligned(e);
            Status::SUCCESS
        },
        Err(s) => s,
    }
}

extern "efiapi" fn set_timer(e: Event, ty: efi::TimerDelay, time: u64) -> Status {
    events::set_timer(e, ty, time)
}

extern "efiapi" fn wait_for_event(n: usize, list: *mut Event, index: *mut usize) -> Status {
    if n == 0 || list.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's array of `n` events.
    let list: Vec<Event> = unsafe { core::slice::from_raw_parts(list, n) }.to_vec();
    match events::wait(&list) {
        Ok(i) => {
            // SAFETY: loader's out-pointer.
            unsafe { put(index, i) };
            Status::SUCCESS
        }
        Err(s) => s,
    }
}

extern "efiapi" fn signal_event(e: Event) -> Status {
    events::signal(e)
}

extern "efiapi" fn close_event(e: Event) -> Status {
    events::close(e)
}

extern "efiapi" fn check_event(e: Event) -> Status {
    events::check(e)
}

extern "efiapi" fn install_protocol_interface(
    h: *mut Handle,
    g: *mut Guid,
    ty: efi::InterfaceType,
    iface: *mut c_void,
) -> Status {
    if h.is_null() || ty != efi::NATIVE_INTERFACE {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    // SAFETY: checked non-null.
    match handles::install(unsafe { h.read_unaligned() }, g, iface) {
        // SAFETY: checked non-null.
        Ok(new) => unsafe {
            h.write_unaligned(new);
            Status::SUCCESS
        },
        Err(s) => s,
    }
}

extern "efiapi" fn reinstall_protocol_interface(
    h: Handle,
    g: *mut Guid,
    old: *mut c_void,
    new: *mut c_void,
) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    match handles::reinstall(h, g, old, new) {
        Ok(()) => Status::SUCCESS,
        Err(s) => s,
    }
}

extern "efiapi" fn uninstall_protocol_interface(
    h: Handle,
    g: *mut Guid,
    iface: *mut c_void,
) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    match handles::uninstall(h, g, iface) {
        Ok(()) => Status::SUCCESS,
        Err(s) => s,
    }
}

extern "efiapi" fn handle_protocol(h: Handle, g: *mut Guid, out: *mut *mut c_void) -> Status {
    open_protocol(
        h,
        g,
        out,
        core::ptr::null_mut(),
        core::ptr::null_mut(),
        efi::OPEN_PROTOCOL_BY_HANDLE_PROTOCOL,
    )
}

extern "efiapi" fn register_protocol_notify(
    _g: *mut Guid,
    _e: Event,
    reg: *mut *mut c_void,
) -> Status {
    // Drivers are not loaded after boot starts, so no protocol appears that would fire it; the
    // registration still has to be a valid key.
    // SAFETY: loader's out-pointer.
    if unsafe { put(reg, core::ptr::dangling_mut::<c_void>()) } {
        Status::SUCCESS
    } else {
        Status::INVALID_PARAMETER
    }
}

fn search(ty: efi::LocateSearchType, g: *mut Guid) -> Result<Vec<Handle>, Status> {
    let found = match ty {
        efi::ALL_HANDLES => handles::with_protocol(None),
        efi::BY_PROTOCOL => {
            // SAFETY: the loader's GUID.
            let g = unsafe { guid(g) }.ok_or(Status::INVALID_PARAMETER)?;
            handles::with_protocol(Some(&g))
        }
        // No notifications are ever registered, so none has new handles.
        efi::BY_REGISTER_NOTIFY => Vec::new(),
        _ => return Err(Status::INVALID_PARAMETER),
    };
    if found.is_empty() {
        Err(Status::NOT_FOUND)
    } else {
        Ok(found)
    }
}

extern "efiapi" fn locate_handle(
    ty: efi::LocateSearchType,
    g: *mut Guid,
    _key: *mut c_void,
    size: *mut usize,
    buf: *mut Handle,
) -> Status {
    if size.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let found = match search(ty, g) {
        Ok(f) => f,
        Err(s) => return s,
    };
    let needed = found.len() * core::mem::size_of::<Handle>();
    // SAFETY: checked non-null.
    let room = unsafe { size.read_unaligned() };
    // SAFETY: checked non-null.
    unsafe { size.write_unaligned(needed) };
    if room < needed {
        return Status::BUFFER_TOO_SMALL;
    }
    if buf.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's buffer holds `room` bytes.
    unsafe { core::ptr::copy_nonoverlapping(found.as_ptr(), buf, found.len()) };
    Status::SUCCESS
}

/// The handle with `g` whose device path is the longest prefix of `path`, and the prefix's
/// length in bytes.
pub fn locate_device_path_bytes(g: &Guid, path: &[u8]) -> Option<(Handle, usize)> {
    handles::with_protocol(Some(g))
        .into_iter()
        .filter_map(|h| {
            let p = handles::get(h, &device_path::PROTOCOL_GUID)?;
            // SAFETY: a device path installed on a handle.
            let mine = unsafe { dp::nodes(p as *const device_path::Protocol) }?;
            dp::prefix_len(mine, path).map(|n| (h, n))
        })
        .max_by_key(|&(_, n)| n)
}

extern "efiapi" fn locate_device_path(
    g: *mut Guid,
    path: *mut *mut device_path::Protocol,
    out: *mut Handle,
) -> Status {
    if path.is_null() || out.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    // SAFETY: checked non-null; points at the loader's device path pointer.
    let p = unsafe { path.read_unaligned() };
    // SAFETY: the loader's device path.
    let Some(bytes) = (unsafe { dp::nodes(p) }) else {
        return Status::INVALID_PARAMETER;
    };
    match locate_device_path_bytes(&g, bytes) {
        Some((h, n)) => {
            // SAFETY: checked non-null; the remaining path starts `n` bytes in.
            unsafe {
                out.write_unaligned(h);
                path.write_unaligned((p as *mut u8).add(n) as *mut device_path::Protocol);
            }
            Status::SUCCESS
        }
        None => Status::NOT_FOUND,
    }
}

extern "efiapi" fn install_configuration_table(g: *mut Guid, table: *mut c_void) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    super::set_config_table(g, table)
}

extern "efiapi" fn load_image(
    _policy: efi::Boolean,
    parent: Handle,
    path: *mut device_path::Protocol,
    src: *mut c_void,
    size: usize,
    out: *mut Handle,
) -> Status {
    if out.is_null() || !handles::is_handle(parent) {
        return Status::INVALID_PARAMETER;
    }
    let result = if !src.is_null() {
        // SAFETY: the loader's buffer of `size` bytes.
        let file = unsafe { core::slice::from_raw_parts(src as *const u8, size) };
        // The device is whatever part of the path a file system claims, if any.
        // SAFETY: the loader's device path or null.
        let (device, file_path) = match unsafe { dp::nodes(path) } {
            Some(bytes) => match locate_device_path_bytes(
                &r_efi::protocols::simple_file_system::PROTOCOL_GUID,
                bytes,
            ) {
                Some((h, n)) => (h, dp::Path::default().append(&bytes[n..]).finish()),
                None => (
                    core::ptr::null_mut(),
                    dp::Path::default().append(bytes).finish(),
                ),
            },
            None => (core::ptr::null_mut(), core::ptr::null_mut()),
        };
        image::load(
            file,
            parent,
            image::Origin {
                device,
                file_path,
                full_path: path,
            },
        )
    } else if !path.is_null() {
        image::load_from_path(path, parent)
    } else {
        Err(Status::NOT_FOUND)
    };
    match result {
        // SAFETY: checked non-null.
        Ok(h) => unsafe {
            out.write_unaligned(h);
            Status::SUCCESS
        },
        Err(s) => s,
    }
}

extern "efiapi" fn start_image(
    h: Handle,
    exit_size: *mut usize,
    exit_data: *mut *mut efi::Char16,
) -> Status {
    // SAFETY: loader's optional out-pointers.
    unsafe {
        put(exit_size, 0);
        put(exit_data, core::ptr::null_mut());
    }
    image::start(h)
}

extern "efiapi" fn exit(
    h: Handle,
    status: Status,
    _size: usize,
    _data: *mut efi::Char16,
) -> Status {
    image::exit(h, status)
}

extern "efiapi" fn unload_image(h: Handle) -> Status {
    image::unload(h)
}

extern "efiapi" fn exit_boot_services(_h: Handle, key: usize) -> Status {
    if key != memory().key() {
        return Status::INVALID_PARAMETER;
    }
    super::exit_boot_services();
    Status::SUCCESS
}

extern "efiapi" fn get_next_monotonic_count(out: *mut u64) -> Status {
    let v = MONOTONIC.get() + 1;
    MONOTONIC.set(v);
    // SAFETY: loader's out-pointer.
    if unsafe { put(out, v) } {
        Status::SUCCESS
    } else {
        Status::INVALID_PARAMETER
    }
}

extern "efiapi" fn stall(us: usize) -> Status {
    crate::timer::stall(us as u64);
    events::poll_timers();
    Status::SUCCESS
}

extern "efiapi" fn set_watchdog_timer(
    _t: usize,
    _code: u64,
    _size: usize,
    _data: *mut efi::Char16,
) -> Status {
    // There is no watchdog to arm: a hung loader is caught by the VMM's caller's timeout.
    Status::SUCCESS
}

extern "efiapi" fn connect_controller(
    _h: Handle,
    _drv: *mut Handle,
    _path: *mut device_path::Protocol,
    _rec: efi::Boolean,
) -> Status {
    // Every driver is built in and connected at start.
    Status::SUCCESS
}

extern "efiapi" fn disconnect_controller(_h: Handle, _drv: Handle, _child: Handle) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn open_protocol(
    h: Handle,
    g: *mut Guid,
    out: *mut *mut c_void,
    _agent: Handle,
    _ctl: Handle,
    attrs: u32,
) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    if !handles::is_handle(h) {
        return Status::INVALID_PARAMETER;
    }
    match handles::get(h, &g) {
        Some(iface) => {
            if attrs & efi::OPEN_PROTOCOL_TEST_PROTOCOL == 0 {
                // SAFETY: loader's out-pointer.
                if !unsafe { put(out, iface) } {
                    return Status::INVALID_PARAMETER;
                }
            }
            Status::SUCCESS
        }
        None => {
            // SAFETY: loader's optional out-pointer.
            unsafe { put(out, core::ptr::null_mut()) };
            Status::UNSUPPORTED
        }
    }
}

extern "efiapi" fn close_protocol(h: Handle, g: *mut Guid, _agent: Handle, _ctl: Handle) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    if handles::get(h, &g).is_some() {
        Status::SUCCESS
    } else {
        Status::NOT_FOUND
    }
}

extern "efiapi" fn open_protocol_information(
    h: Handle,
    g: *mut Guid,
    buf: *mut *mut efi::OpenProtocolInformationEntry,
    count: *mut usize,
) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    if handles::get(h, &g).is_none() {
        return Status::NOT_FOUND;
    }
    // Opens are not tracked: nobody holds a protocol BY_DRIVER in this firmware.
    let mut p: *mut c_void = core::ptr::null_mut();
    let s = allocate_pool(kind::BOOT_DATA, 1, &mut p);
    if s != Status::SUCCESS {
        return s;
    }
    // SAFETY: loader's out-pointers.
    unsafe {
        put(buf, p as *mut efi::OpenProtocolInformationEntry);
        put(count, 0);
    }
    Status::SUCCESS
}

fn pool_copy<T: Copy>(items: &[T]) -> Result<*mut T, Status> {
    let mut p: *mut c_void = core::ptr::null_mut();
    let s = allocate_pool(
        kind::BOOT_DATA,
        core::mem::size_of_val(items).max(1),
        &mut p,
    );
    if s != Status::SUCCESS {
        return Err(s);
    }
    // SAFETY: a fresh pool block large enough for the items.
    unsafe { core::ptr::copy_nonoverlapping(items.as_ptr(), p as *mut T, items.len()) };
    Ok(p as *mut T)
}

extern "efiapi" fn protocols_per_handle(
    h: Handle,
    out: *mut *mut *mut Guid,
    count: *mut usize,
) -> Status {
    let Some(list) = handles::protocols(h) else {
        return Status::INVALID_PARAMETER;
    };
    let ptrs: Vec<*mut Guid> = list
        .iter()
        .map(|(g, _)| g as *const Guid as *mut Guid)
        .collect();
    match pool_copy(&ptrs) {
        Ok(p) => {
            // SAFETY: loader's out-pointers.
            unsafe {
                put(out, p);
                put(count, ptrs.len());
            }
            Status::SUCCESS
        }
        Err(s) => s,
    }
}

extern "efiapi" fn locate_handle_buffer(
    ty: efi::LocateSearchType,
    g: *mut Guid,
    _key: *mut c_void,
    count: *mut usize,
    buf: *mut *mut Handle,
) -> Status {
    if count.is_null() || buf.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let found = match search(ty, g) {
        Ok(f) => f,
        Err(s) => return s,
    };
    match pool_copy(&found) {
        // SAFETY: checked non-null.
        Ok(p) => unsafe {
            count.write_unaligned(found.len());
            buf.write_unaligned(p);
            Status::SUCCESS
        },
        Err(s) => s,
    }
}

extern "efiapi" fn locate_protocol(
    g: *mut Guid,
    _reg: *mut c_void,
    out: *mut *mut c_void,
) -> Status {
    // SAFETY: the loader's GUID.
    let Some(g) = (unsafe { guid(g) }) else {
        return Status::INVALID_PARAMETER;
    };
    let found = handles::with_protocol(Some(&g))
        .first()
        .and_then(|&h| handles::get(h, &g));
    match found {
        Some(iface) => {
            // SAFETY: loader's out-pointer.
            unsafe { put(out, iface) };
            Status::SUCCESS
        }
        None => {
            // SAFETY: loader's out-pointer.
            unsafe { put(out, core::ptr::null_mut()) };
            Status::NOT_FOUND
        }
    }
}

/// How many (GUID, interface) pairs a variadic Install/UninstallMultipleProtocolInterfaces call
/// may carry here. Stable Rust cannot define C-variadic functions; under the UEFI (Microsoft
/// x64) convention a variadic call passes its arguments exactly like a fixed one, so taking
/// more parameters than the caller passed only reads stack slots we never use past the NULL
/// terminator.
const MAX_PAIRS: usize = 8;

type Pair = (*mut Guid, *mut c_void);

/// The (GUID, interface) pairs a variadic call passed: those before the NULL GUID.
fn pairs(all: [Pair; MAX_PAIRS]) -> Vec<Pair> {
    all.into_iter().take_while(|(g, _)| !g.is_null()).collect()
}

#[allow(clippy::too_many_arguments)]
extern "efiapi" fn install_multiple(
    h: *mut Handle,
    g1: *mut Guid,
    i1: *mut c_void,
    g2: *mut Guid,
    i2: *mut c_void,
    g3: *mut Guid,
    i3: *mut c_void,
    g4: *mut Guid,
    i4: *mut c_void,
    g5: *mut Guid,
    i5: *mut c_void,
    g6: *mut Guid,
    i6: *mut c_void,
    g7: *mut Guid,
    i7: *mut c_void,
    g8: *mut Guid,
    i8: *mut c_void,
    _end: *mut Guid,
) -> Status {
    let pairs = pairs([
        (g1, i1),
        (g2, i2),
        (g3, i3),
        (g4, i4),
        (g5, i5),
        (g6, i6),
        (g7, i7),
        (g8, i8),
    ]);
    if h.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // A device path already installed elsewhere must not be installed twice.
    for &(g, iface) in &pairs {
        // SAFETY: the loader's GUID.
        if unsafe { guid(g) } == Some(device_path::PROTOCOL_GUID) {
            // SAFETY: a device path from the loader.
            if let Some(bytes) = unsafe { dp::nodes(iface as *const device_path::Protocol) } {
                if let Some((_, n)) = locate_device_path_bytes(&device_path::PROTOCOL_GUID, bytes) {
                    if n == bytes.len() {
                        return Status::ALREADY_STARTED;
                    }
                }
            }
        }
    }
    // SAFETY: checked non-null.
    let mut handle = unsafe { h.read_unaligned() };
    let mut done: Vec<(Guid, *mut c_void)> = Vec::new();
    for &(g, iface) in &pairs {
        // SAFETY: the loader's GUID.
        let Some(g) = (unsafe { guid(g) }) else { break };
        match handles::install(handle, g, iface) {
            Ok(new) => {
                handle = new;
                done.push((g, iface));
            }
            Err(s) => {
                for (g, iface) in done {
                    let _ = handles::uninstall(handle, g, iface);
                }
                return s;
            }
        }
    }
    // SAFETY: checked non-null.
    unsafe { h.write_unaligned(handle) };
    Status::SUCCESS
}

#[allow(clippy::too_many_arguments)]
extern "efiapi" fn uninstall_multiple(
    h: Handle,
    g1: *mut Guid,
    i1: *mut c_void,
    g2: *mut Guid,
    i2: *mut c_void,
    g3: *mut Guid,
    i3: *mut c_void,
    g4: *mut Guid,
    i4: *mut c_void,
    g5: *mut Guid,
    i5: *mut c_void,
    g6: *mut Guid,
    i6: *mut c_void,
    g7: *mut Guid,
    i7: *mut c_void,
    g8: *mut Guid,
    i8: *mut c_void,
    _end: *mut Guid,
) -> Status {
    for (g, iface) in pairs([
        (g1, i1),
        (g2, i2),
        (g3, i3),
        (g4, i4),
        (g5, i5),
        (g6, i6),
        (g7, i7),
        (g8, i8),
    ]) {
        // SAFETY: the loader's GUID.
        let Some(g) = (unsafe { guid(g) }) else { break };
        if let Err(s) = handles::uninstall(h, g, iface) {
            return s;
        }
    }
    Status::SUCCESS
}

extern "efiapi" fn calculate_crc32(data: *mut c_void, size: usize, out: *mut u32) -> Status {
    if data.is_null() || size == 0 || out.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the loader's buffer of `size` bytes.
    let bytes = unsafe { core::slice::from_raw_parts(data as *const u8, size) };
    // SAFETY: checked non-null.
    unsafe { out.write_unaligned(crate::crc32::crc32(bytes)) };
    Status::SUCCESS
}

extern "efiapi" fn copy_mem(dst: *mut c_void, src: *mut c_void, n: usize) {
    // SAFETY: the loader's buffers; CopyMem allows overlap.
    unsafe { core::ptr::copy(src as *const u8, dst as *mut u8, n) };
}

extern "efiapi" fn set_mem(dst: *mut c_void, n: usize, v: u8) {
    // SAFETY: the loader's buffer.
    unsafe { core::ptr::write_bytes(dst as *mut u8, v, n) };
}

/// The Boot Services table.
pub fn table() -> efi::BootServices {
    efi::BootServices {
        hdr: super::header(
            efi::BOOT_SERVICES_SIGNATURE,
            core::mem::size_of::<efi::BootServices>(),
        ),
        raise_tpl,
        restore_tpl,
        allocate_pages,
        free_pages,
        get_memory_map,
        allocate_pool,
        free_pool,
        create_event,
        set_timer,
        wait_for_event,
        signal_event,
        close_event,
        check_event,
        install_protocol_interface,
        reinstall_protocol_interface,
        uninstall_protocol_interface,
        handle_protocol,
        reserved: core::ptr::null_mut(),
        register_protocol_notify,
        locate_handle,
        locate_device_path,
        install_configuration_table,
        load_image,
        start_image,
        exit,
        unload_image,
        exit_boot_services,
        get_next_monotonic_count,
        stall,
        set_watchdog_timer,
        connect_controller,
        disconnect_controller,
        open_protocol,
        close_protocol,
        open_protocol_information,
        protocols_per_handle,
        locate_handle_buffer,
        locate_protocol,
        // SAFETY: same calling convention; the callee reads more argument slots than the
        // variadic caller passes, which is harmless (see MAX_PAIRS).
        install_multiple_protocol_interfaces: unsafe {
            core::mem::transmute::<*const (), efi::BootInstallMultipleProtocolInterfaces>(
                install_multiple as *const (),
            )
        },
        // SAFETY: as above.
        uninstall_multiple_protocol_interfaces: unsafe {
            core::mem::transmute::<*const (), efi::BootUninstallMultipleProtocolInterfaces>(
                uninstall_multiple as *const (),
            )
        },
        calculate_crc32,
        copy_mem,
        set_mem,
        create_event_ex,
    }
}
