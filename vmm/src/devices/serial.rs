//! The 16550 UART on COM1 (vm-superio), its interrupt delivered through an irqfd.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::persist::Persist;

/// COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// Registers of a 16550.
pub const PORT_COUNT: u64 = 8;

/// Raises the UART's interrupt by signalling an eventfd registered as an irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART raising `irq_evt` and writing to `out`.
    pub fn new(irq_evt: EventFd, out: SerialOut) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger::new(irq_evt), out),
        }
    }

    /// Feeds host input to the guest. Returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

/// vm-superio's own state type, serialized field for field (serde's remote derive: the type
/// has no serde support of its own).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART's registers and receive buffer, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UartState(#[serde(with = "SerialStateDef")] pub SerialState);

/// Why the UART could not take a saved state.
#[derive(Debug, thiserror::Error)]
pub enum UartStateError {
    /// The saved registers are not a state vm-superio accepts.
    #[error("serial state: {0}")]
    Invalid(String),
    /// The interrupt eventfd could not be duplicated or signalled.
    #[error("serial interrupt: {0}")]
    Interrupt(#[from] io::Error),
}

impl Persist for SerialDevice {
    type State = UartState;
    type Error = UartStateError;

    fn save(&self) -> Result<UartState, UartStateError> {
        Ok(UartState(self.serial.state()))
    }

    /// Takes over the registers and receive buffer, and raises the interrupt the saved
    /// identification register reports as pending: its edge was lost with the process that
    /// saved it.
    fn restore(&mut self, state: &UartState) -> Result<(), UartStateError> {
        let state = &state.0;
        let evt = || self.serial.interrupt_evt().0.try_clone();
        let placeholder = Serial::new(EventFdTrigger(evt()?), Box::new(io::sink()) as SerialOut);
        let trigger = EventFdTrigger(evt()?);
        let old = std::mem::replace(&mut self.serial, placeholder);
        let out = old.into_writer();
        self.serial = Serial::from_state(state, trigger, NoEvents, out)
            .map_err(|e| UartStateError::Invalid(format!("{e:?}")))?;
        // Bit 0 of the IIR is "no interrupt pending".
        if state.interrupt_identification & 1 == 0 {
            self.serial.interrupt_evt().trigger()?;
        }
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < PORT_COUNT {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < PORT_COUNT {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_raises_interrupt_on_input() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Enable the "received data available" interrupt, then feed input.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, Box::new(Shared::default()));
        let mut d = [0u8; 2];
        dev.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        dev.write(0, &[1, 2]);
    }
}
