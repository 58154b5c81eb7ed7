//! Port I/O, the TSC and other single instructions.

use core::arch::asm;

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port reads have no memory effects; every port we touch is a device we drive.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for `inb`; the devices we write do not touch memory we use (no DMA from ports).
    unsafe {
        asm!("out dx, al", in("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads a counter; no memory effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Stops the CPU for good (interrupts are off).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: with interrupts off, hlt just stops this CPU; nothing depends on it running.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Lets the CPU know we are spinning.
pub fn pause() {
    core::hint::spin_loop();
}
