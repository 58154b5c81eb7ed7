//! The 16550 UART at COM1: the firmware's console, and the loaders' Simple Text protocols.

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;

/// Programs 115200 8N1 with FIFOs on; the VMM's UART ignores the divisor but a real 16550
/// (QEMU's) needs it.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1: 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFOs on and cleared
    outb(COM1 + 4, 0x03); // DTR, RTS
}

/// Writes one byte, waiting for room (bounded: a UART that never drains must not hang us).
pub fn write_byte(b: u8) {
    for _ in 0..100_000 {
        if inb(COM1 + 5) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, b);
}

/// Writes bytes, turning "\n" into "\r\n" as a terminal expects.
pub fn write_bytes(s: &[u8]) {
    for &b in s {
        if b == b'\n' {
            write_byte(b'\r');
        }
        write_byte(b);
    }
}

/// A received byte, if one is waiting.
pub fn read_byte() -> Option<u8> {
    if inb(COM1 + 5) & LSR_DATA_READY != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

/// `core::fmt` sink for the firmware's own messages.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints a line prefixed with "lightbyte-firmware: ".
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, "lightbyte-firmware: ");
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
