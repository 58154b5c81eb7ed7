//! Interactive console: host terminal input to the guest's serial port, through an event-manager
//! loop. Ctrl-A then `x` ends the VM (as on QEMU), since raw mode passes Ctrl-C to the guest.

use std::io::{self, IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

use crate::devices::serial::SerialDevice;
use crate::devices::{ExitHandle, VmEvent};

const CTRL_A: u8 = 0x01;

/// Puts the terminal on stdin into raw mode and restores it when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode, or returns None when stdin is not a terminal.
    pub fn enable() -> Option<Self> {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        stdin.lock().set_raw_mode().ok()?;
        Some(Self(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = io::stdin().lock().set_canon_mode();
    }
}

/// Copies stdin to the serial receive FIFO.
struct StdinInput {
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitHandle,
    escape: bool,
}

impl StdinInput {
    /// Applies the Ctrl-A escape and returns the bytes meant for the guest.
    fn filter(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.escape {
                self.escape = false;
                match b {
                    b'x' | b'X' => self.exit.send(VmEvent::PowerOff),
                    CTRL_A => out.push(CTRL_A),
                    _ => {}
                }
            } else if b == CTRL_A {
                self.escape = true;
            } else {
                out.push(b);
            }
        }
        out
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        match io::stdin().lock().read(&mut buf) {
            Ok(0) | Err(_) => {
                // EOF or a dead terminal: stop watching it, the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let bytes = self.filter(&buf[..n]);
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                serial.enqueue_input(&bytes);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin.as_raw_fd(), EventSet::IN)) {
            tracing::warn!("cannot watch stdin: {e:?}");
        }
    }
}

/// Starts the console thread feeding stdin to `serial`. Call only when stdin is a terminal.
pub fn spawn(serial: Arc<Mutex<SerialDevice>>, exit: ExitHandle) -> io::Result<()> {
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| io::Error::other(format!("{e:?}")))?;
    manager.add_subscriber(Arc::new(Mutex::new(StdinInput {
        serial,
        exit,
        escape: false,
    })));
    crate::threads::builder("console").spawn(move || loop {
        if let Err(e) = manager.run() {
            tracing::warn!("console event loop: {e:?}");
            return;
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn escape_sequence() {
        let (tx, rx) = channel();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(evt, Box::new(io::sink()))));
        let mut input = StdinInput {
            serial,
            exit: ExitHandle::new(tx),
            escape: false,
        };
        assert_eq!(input.filter(b"ls\r"), b"ls\r");
        assert_eq!(input.filter(&[CTRL_A, CTRL_A, b'a']), [CTRL_A, b'a']);
        assert!(rx.try_recv().is_err());
        assert_eq!(input.filter(&[b'q', CTRL_A]), b"q");
        assert_eq!(input.filter(b"x"), b"");
        assert_eq!(rx.try_recv().unwrap(), VmEvent::PowerOff);
    }
}
