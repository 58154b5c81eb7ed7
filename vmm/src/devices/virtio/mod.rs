//! virtio devices (virtio 1.x, "modern" only) and their PCI transport.
//!
//! A device implements [`VirtioDevice`]: features, queue sizes, its config space and what to do
//! once the driver has set it up ([`VirtioDevice::activate`]). The transport
//! ([`pci::VirtioPciDevice`]) owns feature negotiation, queue configuration, device status, reset,
//! notifications (ioeventfds) and interrupts (MSI-X).

pub mod block;
pub mod net;
pub mod pci;
pub mod vsock;
pub mod wakeups;
pub mod worker;

#[cfg(test)]
pub(crate) mod sim;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::PauseError;

/// Device status: the driver found the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the driver knows how to drive it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
/// Device status: the driver gave up.
pub const STATUS_FAILED: u8 = 128;

/// Feature bit: virtio 1.0 or later (required: we are modern-only).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Raises a device's interrupts.
pub trait Interrupt: Send + Sync {
    /// Used buffers were added to `queue`.
    fn notify_queue(&self, queue: u16);
    /// The device configuration changed.
    fn notify_config(&self);
}

/// One queue handed to an activated device.
pub struct ActiveQueue {
    /// The queue, configured by the driver.
    pub queue: Queue,
    /// Signalled when the driver notifies (kicks) the queue.
    pub kick: EventFd,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queues, in order.
    pub queues: Vec<ActiveQueue>,
    /// How to interrupt the driver.
    pub interrupt: Arc<dyn Interrupt>,
    /// The activation replays a snapshot taken in another process: state the device kept on
    /// the host side (connections) is gone.
    pub restored: bool,
}

/// Error activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A host resource could not be set up.
    #[error("activating virtio device: {0}")]
    Io(#[from] std::io::Error),
    /// The driver's setup is unusable.
    #[error("activating virtio device: {0}")]
    BadSetup(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (1 = network, 2 = block).
    fn device_type(&self) -> u16;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving the queues and returns to the pre-activation state (device reset).
    fn reset(&mut self);
    /// Takes no new requests and waits for those in flight (VM pause, snapshot): afterwards
    /// every request the device took is answered in guest memory.
    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(())
    }
    /// Serves the queues again after [`VirtioDevice::pause`].
    fn resume(&mut self) {}
}

/// Copies `src[offset..offset + data.len()]` into `data`, zero-filling what lies outside `src`.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| src.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
