//! Runtime Services: the time from the CMOS RTC, reset and power-off, and variables kept in
//! memory while boot services run (loaders store their settings and boot data there; the OS
//! is told through the RT properties table that variables are not available at runtime).

use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::{self, Char16, Guid, Status};

use super::util::{put, read_ucs2};
use crate::io::{inb, outb};
use crate::racy::Racy;

/// Runtime services the OS may call after ExitBootServices (EFI_RT_SUPPORTED_* bits).
pub const RT_SUPPORTED: u32 = 0x0001 // GetTime
    | 0x0010 // SetVirtualAddressMap
    | 0x0020 // ConvertPointer
    | 0x0400; // ResetSystem

struct Variable {
    name: Vec<u16>,
    guid: Guid,
    attributes: u32,
    data: Vec<u8>,
}

static VARIABLES: Racy<Vec<Variable>> = Racy::new(Vec::new());
/// Set at ExitBootServices: the heap holding variables belongs to the OS from then on.
static BOOT_SERVICES_GONE: Racy<bool> = Racy::new(false);

const VAR_NON_VOLATILE: u32 = 0x1;
const VAR_BOOTSERVICE_ACCESS: u32 = 0x2;
const VAR_RUNTIME_ACCESS: u32 = 0x4;
const VAR_APPEND_WRITE: u32 = 0x40;
const VARIABLE_SPACE: u64 = 64 << 10;

/// Called at ExitBootServices.
pub fn boot_services_gone() {
    BOOT_SERVICES_GONE.set(true);
}

fn variables() -> Option<&'static mut Vec<Variable>> {
    if BOOT_SERVICES_GONE.get() {
        return None;
    }
    // SAFETY: variable services do not call foreign code while holding this borrow.
    Some(unsafe { VARIABLES.borrow() })
}

fn cmos(reg: u8) -> u8 {
    outb(0x70, reg);
    inb(0x71)
}

fn bcd(v: u8, binary: bool) -> u8 {
    if binary {
        v
    } else {
        (v & 0x0f) + (v >> 4) * 10
    }
}

extern "efiapi" fn get_time(t: *mut efi::Time, caps: *mut efi::TimeCapabilities) -> Status {
    if t.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // Wait out an update in progress so the fields agree with each other (bounded).
    for _ in 0..100_000 {
        if cmos(0x0a) & 0x80 == 0 {
            break;
        }
    }
    let b = cmos(0x0b);
    let binary = b & 0x04 != 0;
    let mut hour = cmos(0x04);
    let pm = hour & 0x80 != 0;
    hour = bcd(hour & 0x7f, binary);
    if b & 0x02 == 0 && pm {
        hour = (hour % 12) + 12;
    }
    let year = 2000 + u16::from(bcd(cmos(0x09), binary));
    let time = efi::Time {
        year,
        month: bcd(cmos(0x08), binary),
        day: bcd(cmos(0x07), binary),
        hour,
        minute: bcd(cmos(0x02), binary),
        second: bcd(cmos(0x00), binary),
        pad1: 0,
        nanosecond: 0,
        timezone: efi::UNSPECIFIED_TIMEZONE,
        daylight: 0,
        pad2: 0,
    };
    // SAFETY: checked non-null; the caller's buffers.
    unsafe {
        t.write_unaligned(time);
        put(
            caps,
            efi::TimeCapabilities {
                resolution: 1,
                accuracy: 50_000_000,
                sets_to_zero: efi::Boolean::FALSE,
            },
        );
    }
    Status::SUCCESS
}

extern "efiapi" fn set_time(_t: *mut efi::Time) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn get_wakeup_time(
    _e: *mut efi::Boolean,
    _p: *mut efi::Boolean,
    _t: *mut efi::Time,
) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn set_wakeup_time(_e: efi::Boolean, _t: *mut efi::Time) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn set_virtual_address_map(
    _size: usize,
    _dsize: usize,
    _ver: u32,
    _map: *mut efi::MemoryDescriptor,
) -> Status {
    // Our runtime code keeps no pointers that need converting: the OS keeps the identity
    // mapping of runtime regions alongside the new one.
    Status::SUCCESS
}

extern "efiapi" fn convert_pointer(_pos: usize, _p: *mut *mut c_void) -> Status {
    Status::SUCCESS
}

extern "efiapi" fn get_variable(
    name: *mut Char16,
    g: *mut Guid,
    attrs: *mut u32,
    size: *mut usize,
    data: *mut c_void,
) -> Status {
    let Some(vars) = variables() else {
        return Status::UNSUPPORTED;
    };
    // SAFETY: the caller's name and GUID.
    let (Some(name), Some(g)) = (unsafe { read_ucs2(name) }, unsafe { super::util::guid(g) })
    else {
        return Status::INVALID_PARAMETER;
    };
    if size.is_null() {
        return Status::INVALID_PARAMETER;
    }
    let Some(v) = vars.iter().find(|v| v.name == name && v.guid == g) else {
        return Status::NOT_FOUND;
    };
    // SAFETY: checked non-null.
    let room = unsafe { size.read_unaligned() };
    // SAFETY: checked non-null; optional attributes out-pointer.
    unsafe {
        size.write_unaligned(v.data.len());
        put(attrs, v.attributes);
    }
    if room < v.data.len() {
        return Status::BUFFER_TOO_SMALL;
    }
    if data.is_null() && !v.data.is_empty() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the caller's buffer holds `room` bytes.
    unsafe { core::ptr::copy_nonoverlapping(v.data.as_ptr(), data as *mut u8, v.data.len()) };
    Status::SUCCESS
}

extern "efiapi" fn get_next_variable_name(
    size: *mut usize,
    name: *mut Char16,
    g: *mut Guid,
) -> Status {
    let Some(vars) = variables() else {
        return Status::UNSUPPORTED;
    };
    if size.is_null() || name.is_null() || g.is_null() {
        return Status::INVALID_PARAMETER;
    }
    // SAFETY: the caller's in/out name and GUID.
    let (Some(cur), Some(cur_guid)) = (unsafe { read_ucs2(name) }, unsafe { super::util::guid(g) })
    else {
        return Status::INVALID_PARAMETER;
    };
    let next = if cur.is_empty() {
        vars.first()
    } else {
        match vars
            .iter()
            .position(|v| v.name == cur && v.guid == cur_guid)
        {
            Some(i) => vars.get(i + 1),
            None => return Status::INVALID_PARAMETER,
        }
    };
    let Some(v) = next else {
        return Status::NOT_FOUND;
    };
    let needed = 2 * (v.name.len() + 1);
    // SAFETY: checked non-null.
    let room = unsafe { size.read_unaligned() };
    // SAFETY: checked non-null.
    unsafe { size.write_unaligned(needed) };
    if room < needed {
        return Status::BUFFER_TOO_SMALL;
    }
    // SAFETY: the caller's buffer holds `room` bytes; GUID checked non-null.
    unsafe {
        core::ptr::copy_nonoverlapping(v.name.as_ptr(), name, v.name.len());
        name.add(v.name.len()).write_unaligned(0);
        g.write_unaligned(v.guid);
    }
    Status::SUCCESS
}

extern "efiapi" fn set_variable(
    name: *mut Char16,
    g: *mut Guid,
    attrs: u32,
    size: usize,
    data: *mut c_void,
) -> Status {
    let Some(vars) = variables() else {
        return Status::UNSUPPORTED;
    };
    // SAFETY: the caller's name and GUID.
    let (Some(name), Some(g)) = (unsafe { read_ucs2(name) }, unsafe { super::util::guid(g) })
    else {
        return Status::INVALID_PARAMETER;
    };
    if name.is_empty() || (size != 0 && data.is_null()) {
        return Status::INVALID_PARAMETER;
    }
    if attrs & !(VAR_NON_VOLATILE | VAR_BOOTSERVICE_ACCESS | VAR_RUNTIME_ACCESS | VAR_APPEND_WRITE)
        != 0
    {
        // Authenticated and hardware-error variables are not kept here.
        return Status::UNSUPPORTED;
    }
    let bytes: &[u8] = if size == 0 {
        &[]
    } else {
        // SAFETY: the caller's buffer of `size` bytes.
        unsafe { core::slice::from_raw_parts(data as *const u8, size) }
    };
    let existing = vars.iter().position(|v| v.name == name && v.guid == g);
    let used: u64 = vars
        .iter()
        .map(|v| (v.data.len() + 2 * v.name.len()) as u64)
        .sum();
    if used + size as u64 > VARIABLE_SPACE {
        return Status::OUT_OF_RESOURCES;
    }
    match existing {
        Some(i) if attrs & VAR_APPEND_WRITE != 0 => vars[i].data.extend_from_slice(bytes),
        Some(i) if size == 0 || attrs & (VAR_BOOTSERVICE_ACCESS | VAR_RUNTIME_ACCESS) == 0 => {
            vars.remove(i);
        }
        Some(i) => {
            vars[i].attributes = attrs;
            vars[i].data = bytes.to_vec();
        }
        None if size == 0 || attrs & (VAR_BOOTSERVICE_ACCESS | VAR_RUNTIME_ACCESS) == 0 => {
            return Status::NOT_FOUND;
        }
        None => vars.push(Variable {
            name,
            guid: g,
            attributes: attrs & !VAR_APPEND_WRITE,
            data: bytes.to_vec(),
        }),
    }
    Status::SUCCESS
}

extern "efiapi" fn get_next_high_mono_count(_c: *mut u32) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn reset_system(
    ty: efi::ResetType,
    status: Status,
    _size: usize,
    _data: *mut c_void,
) {
    match ty {
        efi::RESET_SHUTDOWN => {
            crate::log!("ResetSystem: power-off (status {:#x})", status.as_usize());
            crate::platform::shutdown()
        }
        _ => crate::platform::reset(),
    }
}

extern "efiapi" fn update_capsule(
    _c: *mut *mut efi::CapsuleHeader,
    _n: usize,
    _sg: efi::PhysicalAddress,
) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn query_capsule_capabilities(
    _c: *mut *mut efi::CapsuleHeader,
    _n: usize,
    _max: *mut u64,
    _ty: *mut efi::ResetType,
) -> Status {
    Status::UNSUPPORTED
}

extern "efiapi" fn query_variable_info(
    _attrs: u32,
    max: *mut u64,
    remaining: *mut u64,
    max_var: *mut u64,
) -> Status {
    let Some(vars) = variables() else {
        return Status::UNSUPPORTED;
    };
    let used: u64 = vars
        .iter()
        .map(|v| (v.data.len() + 2 * v.name.len()) as u64)
        .sum();
    // SAFETY: the caller's out-pointers.
    unsafe {
        put(max, VARIABLE_SPACE);
        put(remaining, VARIABLE_SPACE.saturating_sub(used));
        put(max_var, VARIABLE_SPACE);
    }
    Status::SUCCESS
}

/// The Runtime Services table.
pub fn table() -> efi::RuntimeServices {
    efi::RuntimeServices {
        hdr: super::header(
            efi::RUNTIME_SERVICES_SIGNATURE,
            core::mem::size_of::<efi::RuntimeServices>(),
        ),
        get_time,
        set_time,
        get_wakeup_time,
        set_wakeup_time,
        set_virtual_address_map,
        convert_pointer,
        get_variable,
        get_next_variable_name,
        set_variable,
        get_next_high_mono_count,
        reset_system,
        update_capsule,
        query_capsule_capabilities,
        query_variable_info,
    }
}
