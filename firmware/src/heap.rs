//! The firmware's own heap (its handle database, buffers, file system state), in pages it takes
//! from RAM before the memory map exists and then marks as boot services data.

use linked_list_allocator::LockedHeap;

/// Size of the heap. Kernels and initramfs are read into pages allocated from the memory map,
/// not here, so this holds only bookkeeping and caches.
pub const HEAP_SIZE: u64 = 16 << 20;

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Hands `[start, start + HEAP_SIZE)` to the allocator.
///
/// # Safety
/// The range is RAM nobody else uses, for the firmware's whole life.
pub unsafe fn init(start: u64) {
    // SAFETY: per the caller, the range is ours.
    unsafe { ALLOCATOR.lock().init(start as *mut u8, HEAP_SIZE as usize) };
}
