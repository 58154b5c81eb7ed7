//! The handle database: handles and the protocol interfaces installed on them.

use alloc::vec::Vec;
use core::ffi::c_void;
use r_efi::efi::{Guid, Handle, Status};

use crate::racy::Racy;

/// One handle: the protocols installed on it, in installation order.
pub struct HandleEntry {
    /// (protocol GUID, interface).
    pub protocols: Vec<(Guid, *mut c_void)>,
}

static HANDLES: Racy<Vec<*mut HandleEntry>> = Racy::new(Vec::new());

fn handles() -> &'static mut Vec<*mut HandleEntry> {
    // SAFETY: the database functions below never call foreign code while this borrow lives.
    unsafe { HANDLES.borrow() }
}

fn entry(h: Handle) -> Option<&'static mut HandleEntry> {
    let p = h as *mut HandleEntry;
    if handles().contains(&p) {
        // SAFETY: `p` is one of our leaked entries, still registered.
        Some(unsafe { &mut *p })
    } else {
        None
    }
}

/// Whether `h` is a live handle.
pub fn is_handle(h: Handle) -> bool {
    entry(h).is_some()
}

/// Installs `iface` for `guid` on `h` (a new handle when `h` is null); returns the handle.
pub fn install(h: Handle, guid: Guid, iface: *mut c_void) -> Result<Handle, Status> {
    let h = if h.is_null() {
        let p = crate::efi::util::leak(HandleEntry {
            protocols: Vec::new(),
        });
        handles().push(p);
        p as Handle
    } else {
        h
    };
    let e = entry(h).ok_or(Status::INVALID_PARAMETER)?;
    if e.protocols.iter().any(|(g, _)| *g == guid) {
        return Err(Status::INVALID_PARAMETER);
    }
    e.protocols.push((guid, iface));
    Ok(h)
}

/// Removes `guid` (with interface `iface`) from `h`; the handle goes away with its last protocol.
pub fn uninstall(h: Handle, guid: Guid, iface: *mut c_void) -> Result<(), Status> {
    let e = entry(h).ok_or(Status::INVALID_PARAMETER)?;
    let i = e
        .protocols
        .iter()
        .position(|(g, p)| *g == guid && *p == iface)
        .ok_or(Status::NOT_FOUND)?;
    e.protocols.remove(i);
    if e.protocols.is_empty() {
        let p = h as *mut HandleEntry;
        handles().retain(|x| *x != p);
        // SAFETY: unregistered just now; nothing else refers to the entry.
        drop(unsafe { alloc::boxed::Box::from_raw(p) });
    }
    Ok(())
}

/// Replaces `old` with `new` for `guid` on `h`.
pub fn reinstall(h: Handle, guid: Guid, old: *mut c_void, new: *mut c_void) -> Result<(), Status> {
    let e = entry(h).ok_or(Status::INVALID_PARAMETER)?;
    let slot = e
        .protocols
        .iter_mut()
        .find(|(g, p)| *g == guid && *p == old)
        .ok_or(Status::NOT_FOUND)?;
    slot.1 = new;
    Ok(())
}

/// The interface of `guid` on `h`.
pub fn get(h: Handle, guid: &Guid) -> Option<*mut c_void> {
    entry(h)?
        .protocols
        .iter()
        .find(|(g, _)| g == guid)
        .map(|(_, p)| *p)
}

/// Every handle with `guid` installed (every handle for `None`), oldest first.
pub fn with_protocol(guid: Option<&Guid>) -> Vec<Handle> {
    handles()
        .iter()
        .filter(|&&p| {
            // SAFETY: registered entries are live.
            let e = unsafe { &*p };
            guid.is_none_or(|g| e.protocols.iter().any(|(x, _)| x == g))
        })
        .map(|&p| p as Handle)
        .collect()
}

/// The protocols on `h`.
pub fn protocols(h: Handle) -> Option<&'static [(Guid, *mut c_void)]> {
    entry(h).map(|e| &e.protocols[..])
}
