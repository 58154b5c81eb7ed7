//! Hardware-reduced ACPI power management: the sleep control/status registers (poweroff) and
//! the reset register, at the ports the FADT announces.

use super::bus::BusDevice;
use super::{ExitHandle, VmEvent};
use crate::arch::acpi::S5_SLEEP_TYPE;

/// Sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Reset register (FADT `RESET_REG`).
pub const RESET_PORT: u16 = 0x602;
/// Value the guest writes to the reset register to reset.
pub const RESET_VALUE: u8 = 0x6;
/// Ports covered by this device, starting at [`SLEEP_CONTROL_PORT`].
pub const PORT_COUNT: u64 = 3;

const SLP_EN: u8 = 1 << 5;

/// The ACPI PM device.
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    /// A device reporting poweroff and reset through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset + u64::from(SLEEP_CONTROL_PORT) {
            p if p == u64::from(SLEEP_CONTROL_PORT) => {
                let sleep_type = (value >> 2) & 0x7;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    self.exit.send(VmEvent::PowerOff);
                }
            }
            p if p == u64::from(RESET_PORT) && value == RESET_VALUE => {
                self.exit.send(VmEvent::Reset("ACPI reset register"));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn s5_with_slp_en_powers_off_and_reset_resets() {
        let (tx, rx) = channel();
        let mut pm = AcpiPm::new(ExitHandle::new(tx));
        pm.write(0, &[S5_SLEEP_TYPE << 2]);
        assert!(rx.try_recv().is_err(), "SLP_EN not set");
        pm.write(0, &[(3 << 2) | SLP_EN]);
        assert!(rx.try_recv().is_err(), "S3 is not poweroff");
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(rx.try_recv().unwrap(), VmEvent::PowerOff);
        pm.write(2, &[1]);
        assert!(rx.try_recv().is_err());
        pm.write(2, &[RESET_VALUE]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Reset(_)));
        let mut d = [0xffu8];
        pm.read(1, &mut d);
        assert_eq!(d[0], 0);
    }
}
