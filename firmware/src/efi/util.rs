//! Small helpers for the UEFI interfaces: UCS-2 strings and writing through out-pointers that
//! loaders hand us.

use alloc::string::String;
use alloc::vec::Vec;
use r_efi::efi::{Char16, Guid};

/// Reads a NUL-terminated UCS-2 string (bounded at 4096 characters).
///
/// # Safety
/// `p` is null or points at a NUL-terminated UCS-2 string.
pub unsafe fn read_ucs2(p: *const Char16) -> Option<Vec<u16>> {
    if p.is_null() {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..4096 {
        // SAFETY: the caller promises a terminated string; we stop at the NUL or the bound.
        let c = unsafe { p.add(i).read_unaligned() };
        if c == 0 {
            return Some(out);
        }
        out.push(c);
    }
    Some(out)
}

/// UCS-2 to a Rust string (unpaired surrogates become U+FFFD).
pub fn ucs2_to_string(s: &[u16]) -> String {
    char::decode_utf16(s.iter().copied())
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// A Rust string as NUL-terminated UCS-2.
pub fn to_ucs2(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(core::iter::once(0)).collect()
}

/// Stores `v` through an out-pointer; false if the pointer is null.
///
/// # Safety
/// `p` is null or valid for a write of `T`.
pub unsafe fn put<T>(p: *mut T, v: T) -> bool {
    if p.is_null() {
        return false;
    }
    // SAFETY: non-null, and valid per the caller.
    unsafe { p.write_unaligned(v) };
    true
}

/// Reads a GUID from a loader's pointer.
///
/// # Safety
/// `p` is null or points at a GUID.
pub unsafe fn guid(p: *const Guid) -> Option<Guid> {
    if p.is_null() {
        None
    } else {
        // SAFETY: non-null, valid per the caller.
        Some(unsafe { p.read_unaligned() })
    }
}

/// Leaks a value to get a stable address for a protocol structure.
pub fn leak<T>(v: T) -> *mut T {
    alloc::boxed::Box::into_raw(alloc::boxed::Box::new(v))
}
