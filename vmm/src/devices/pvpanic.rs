//! pvpanic (QEMU's ISA panic device, ACPI ID QEMU0001): the guest kernel writes to it from its
//! panic notifier, so a panic ends the VM with an error instead of a silent reboot.

use super::bus::BusDevice;
use super::{ExitHandle, VmEvent};

/// The I/O port, as on QEMU.
pub const PVPANIC_PORT: u16 = 0x505;
const PVPANIC_PANICKED: u8 = 1 << 0;

/// The pvpanic device.
pub struct PvPanic {
    exit: ExitHandle,
}

impl PvPanic {
    /// A device reporting panics through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Capabilities: the guest only reports the events we list here.
        data.fill(0);
        data[0] = PVPANIC_PANICKED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & PVPANIC_PANICKED != 0) {
            self.exit.send(VmEvent::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn reports_panics_and_advertises_them() {
        let (tx, rx) = channel();
        let mut dev = PvPanic::new(ExitHandle::new(tx));
        let mut caps = [0u8];
        dev.read(0, &mut caps);
        assert_eq!(caps[0], PVPANIC_PANICKED);
        dev.write(0, &[2]);
        assert!(rx.try_recv().is_err());
        dev.write(0, &[1]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::Panic);
    }
}
