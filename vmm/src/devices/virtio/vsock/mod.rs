//! virtio-vsock with its host side on Unix sockets, in the VMM itself (no vhost): the device
//! (features, configuration space, activation on the shared device worker) and the handle the
//! VMM closes it with. The host-side protocol is Firecracker's and Cloud Hypervisor's (see
//! [`muxer`]), so their tools work unchanged.
//!
//! Across a snapshot restored in another process the host side's connections cannot survive:
//! the restored device owes the guest a transport reset event, which makes it drop them.

pub mod conn;
pub mod handler;
pub mod muxer;
pub mod proto;

#[cfg(test)]
mod tests;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use self::handler::VsockHandler;
use self::muxer::Muxer;
use super::worker::{DeviceWorker, Watch};
use super::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::PauseError;
use crate::unix_socket::{self, BindError, FileId};

/// virtio device ID of a socket device.
pub const VIRTIO_ID_VSOCK: u16 = 19;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// The listening socket and its file, shared by the device and its [`VsockHandle`].
struct Shared {
    listener: Mutex<Option<(UnixListener, FileId)>>,
    path: PathBuf,
    worker: DeviceWorker,
}

impl Shared {
    fn listener(&self) -> MutexGuard<'_, Option<(UnixListener, FileId)>> {
        self.listener.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The VMM's handle on a device it attached: closing it when the VM ends (the PCI device itself
/// may outlive the VM).
#[derive(Clone)]
pub struct VsockHandle(Arc<Shared>);

impl VsockHandle {
    /// Stops the worker (every connection is closed) and removes the listening socket, so that
    /// a VM built again can bind it.
    pub fn close(&self) {
        self.0.worker.stop();
        if let Some((listener, id)) = self.0.listener().take() {
            drop(listener);
            unix_socket::remove(&self.0.path, id);
        }
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    cid: u64,
    shared: Arc<Shared>,
}

impl Vsock {
    /// A device for the guest `cid`, its host side listening at `socket` (a stale socket file
    /// is replaced; a live one or any other file is refused).
    pub fn new(cid: u32, socket: &Path) -> Result<Vsock, BindError> {
        let (listener, id) = unix_socket::bind(socket)?;
        Ok(Vsock {
            cid: u64::from(cid),
            shared: Arc::new(Shared {
                listener: Mutex::new(Some((listener, id))),
                path: socket.to_path_buf(),
                worker: DeviceWorker::new("virtio-vsock"),
            }),
        })
    }

    /// The handle that closes the device when the VM ends.
    pub fn handle(&self) -> VsockHandle {
        VsockHandle(self.shared.clone())
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shared.worker.stop();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.shared.worker.stop();
        if activation.queues.len() != 3 {
            return Err(ActivateError::BadSetup(
                "virtio-vsock needs 3 queues".into(),
            ));
        }
        let listener = match self.shared.listener().as_ref() {
            Some((l, _)) => l.try_clone()?,
            None => return Err(ActivateError::BadSetup("the vsock socket is closed".into())),
        };
        let muxer = Muxer::new(listener, self.shared.path.clone())?;
        let watches = activation
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Ok((Watch::Kick(q.kick.try_clone()?), i as u64)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let handler = VsockHandler::new(
            activation.mem,
            activation.queues,
            activation.interrupt,
            self.cid,
            muxer,
            activation.restored,
        )?;
        self.shared.worker.start(watches, handler)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.shared.worker.pause()
    }

    fn resume(&mut self) {
        self.shared.worker.resume()
    }
}
