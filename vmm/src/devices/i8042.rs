//! The part of the i8042 keyboard controller a VM needs: the CPU reset command (0xFE on port
//! 0x64), which Linux uses for `reboot=k`. No keyboard is attached; reads say "nothing pending".

use super::bus::BusDevice;
use super::{ExitHandle, VmEvent};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Ports covered, from [`DATA_PORT`] to the command port 0x64.
pub const PORT_COUNT: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 device.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// A controller reporting resets through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.send(VmEvent::Reset("i8042 reset"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn reset_command_only_on_the_command_port() {
        let (tx, rx) = channel();
        let mut dev = I8042::new(ExitHandle::new(tx));
        dev.write(0, &[CMD_RESET_CPU]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(matches!(rx.try_recv().unwrap(), VmEvent::Reset(_)));
    }
}
