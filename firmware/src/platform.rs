//! Ending the VM: reset, power-off, and the failure path (a message and the pvpanic device, so
//! the VMM exits with an error instead of the VM hanging).

use crate::io::{halt_forever, outb};

const PVPANIC_PORT: u16 = 0x505;
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Prints why the boot failed, tells the VMM through pvpanic, and stops.
pub fn fail(why: &str) -> ! {
    crate::log!("boot failed: {why}");
    outb(PVPANIC_PORT, 1);
    halt_forever()
}

/// Resets the machine through the keyboard controller (what the VMM and QEMU both implement).
pub fn reset() -> ! {
    outb(I8042_COMMAND, I8042_RESET);
    halt_forever()
}

/// Powers off through the ACPI sleep control register the FADT names, if any.
pub fn shutdown() -> ! {
    if let Some((port, value)) = crate::acpi::sleep_control() {
        outb(port, value);
    }
    crate::log!("power-off did not take effect; halting");
    halt_forever()
}
