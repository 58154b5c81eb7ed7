//! Devices the guest reaches through port I/O and MMIO exits.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod ged;
pub mod i8042;
pub mod pci;
pub mod pvpanic;
pub mod serial;
pub mod serial_log;
pub mod virtio;

use std::sync::mpsc::Sender;
use std::time::Duration;

/// A device that did not come to rest when the VM paused.
#[derive(Debug, thiserror::Error)]
#[error("{device}: {busy} requests or events still in flight after {waited:?}")]
pub struct PauseError {
    /// Which device.
    pub device: &'static str,
    /// What was still going on.
    pub busy: usize,
    /// How long the pause waited.
    pub waited: Duration,
}

/// Why the VM stops: sent by devices and vCPU threads to the thread that owns the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, triple fault).
    Reset(&'static str),
    /// The guest reported a kernel panic through pvpanic.
    Panic,
    /// A vCPU hit an error it cannot continue from.
    Error(String),
    /// A device cannot go on until the host is fixed (a disk's write failed with
    /// `on-error=pause`): the VM pauses, and `resume` picks up where it stopped. Not an end.
    Stall(String),
}

/// Handle that devices use to ask for the VM to stop (or pause).
#[derive(Clone, Debug)]
pub struct ExitHandle(Sender<VmEvent>);

impl ExitHandle {
    /// Wraps the sending side of the VM's event channel.
    pub fn new(tx: Sender<VmEvent>) -> Self {
        Self(tx)
    }

    /// Reports `event`. The receiver only goes away when the VM is already stopping, so a failed
    /// send has nobody left to tell.
    pub fn send(&self, event: VmEvent) {
        tracing::debug!(?event, "VM event");
        let _ = self.0.send(event);
    }
}
