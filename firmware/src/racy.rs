//! Global state of a single-threaded firmware.
//!
//! The firmware runs on one CPU with interrupts off, and UEFI forbids boot services from being
//! called on other CPUs, so there is never concurrent access. Re-entrancy is the real hazard: a
//! boot service may call into a loader (StartImage, event notifications) which calls boot
//! services again. Callers therefore never hold a borrow from [`Racy::borrow`] across a call into
//! foreign code.

use core::cell::UnsafeCell;

/// A value shared by the firmware's single thread.
pub struct Racy<T>(UnsafeCell<T>);

// SAFETY: see the module comment: one CPU, no interrupts, no concurrent access.
unsafe impl<T> Sync for Racy<T> {}

impl<T> Racy<T> {
    /// Wraps `v`.
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// A mutable borrow of the value.
    ///
    /// # Safety
    /// No other borrow of this value is alive, and this one is not held across calls that may
    /// re-enter the firmware.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn borrow(&self) -> &mut T {
        // SAFETY: per the caller's promise, this is the only borrow.
        unsafe { &mut *self.0.get() }
    }
}

impl<T: Copy> Racy<T> {
    /// The value.
    pub fn get(&self) -> T {
        // SAFETY: a copy out; no borrow outlives this statement.
        unsafe { *self.0.get() }
    }

    /// Replaces the value.
    pub fn set(&self, v: T) {
        // SAFETY: a write; no borrow outlives this statement.
        unsafe { *self.0.get() = v }
    }
}
