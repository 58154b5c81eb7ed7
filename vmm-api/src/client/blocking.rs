//! The client for plain threads: each call runs the async [`super::Client`] on a small runtime
//! of its own. Not for use inside an async runtime (tokio refuses to block there): call the
//! async client, or this one through `tokio::task::spawn_blocking`.

use std::path::PathBuf;
use std::time::Duration;

use super::ClientError;
use crate::config::VmConfig;
use crate::types::{Ping, SnapshotType, VmInfo};

/// A blocking client of one `vmm`'s API socket.
#[derive(Clone, Debug)]
pub struct Client {
    inner: super::Client,
}

impl Client {
    /// A client of the API at `socket_path`; connects on each call.
    pub fn new(socket_path: impl Into<PathBuf>) -> Client {
        Client {
            inner: super::Client::new(socket_path),
        }
    }

    /// The same client, failing calls that take longer than `timeout`.
    pub fn with_timeout(self, timeout: Duration) -> Client {
        Client {
            inner: self.inner.with_timeout(timeout),
        }
    }

    /// The async client this one drives.
    pub fn as_async(&self) -> &super::Client {
        &self.inner
    }

    /// `GET /api/v1/vmm/ping`.
    pub fn ping(&self) -> Result<Ping, ClientError> {
        run(self.inner.ping())
    }

    /// `PUT /api/v1/vm/create`.
    pub fn create(&self, config: &VmConfig) -> Result<(), ClientError> {
        run(self.inner.create(config))
    }

    /// `PUT /api/v1/vm/boot`.
    pub fn boot(&self) -> Result<(), ClientError> {
        run(self.inner.boot())
    }

    /// `PUT /api/v1/vm/shutdown`; `timeout_ms` None means the server's default.
    pub fn shutdown(&self, timeout_ms: Option<u64>) -> Result<(), ClientError> {
        run(self.inner.shutdown(timeout_ms))
    }

    /// `PUT /api/v1/vm/reboot`.
    pub fn reboot(&self) -> Result<(), ClientError> {
        run(self.inner.reboot())
    }

    /// `PUT /api/v1/vm/pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        run(self.inner.pause())
    }

    /// `PUT /api/v1/vm/resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        run(self.inner.resume())
    }

    /// `GET /api/v1/vm/info`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        run(self.inner.info())
    }

    /// `PUT /api/v1/vm/snapshot`.
    pub fn snapshot(&self, destination_dir: impl Into<PathBuf>) -> Result<(), ClientError> {
        run(self.inner.snapshot(destination_dir))
    }

    /// `PUT /api/v1/vm/snapshot` of a given type.
    pub fn snapshot_of(
        &self,
        destination_dir: impl Into<PathBuf>,
        snapshot_type: SnapshotType,
    ) -> Result<(), ClientError> {
        run(self.inner.snapshot_of(destination_dir, snapshot_type))
    }

    /// `PUT /api/v1/vm/restore`.
    pub fn restore(&self, source_dir: impl Into<PathBuf>, resume: bool) -> Result<(), ClientError> {
        run(self.inner.restore(source_dir, resume))
    }
}

/// Runs one call to completion. A runtime per call costs microseconds, far less than the
/// request, and leaves the client free of threads between calls.
fn run<T>(
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?
        .block_on(call)
}
