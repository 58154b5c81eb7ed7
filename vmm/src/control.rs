//! What the API can ask of the VMM, independent of HTTP: the VM's lifecycle as a state machine.
//! The API server ([`crate::api`]) turns requests into these calls; the VMM implements them.

use std::path::PathBuf;

pub use vmm_api::types::{DiskCounters, NetCounters, SnapshotType, VmInfo, VmState};

use crate::config::VmConfig;

/// Why a control request failed; each kind maps to one HTTP status.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The request itself is wrong (bad config, missing file): 400.
    #[error("{0}")]
    BadRequest(String),
    /// Not possible in the current state (boot twice, pause a VM that is not running): 409.
    #[error("{0}")]
    Conflict(String),
    /// The host failed (KVM, I/O): 500.
    #[error("{0}")]
    Internal(String),
}

/// The VMM as the API sees it. Calls may come from several API connections at once.
pub trait VmControl: Send + Sync {
    /// Stores the configuration (state NotCreated → Created).
    fn create(&self, config: VmConfig) -> Result<(), ControlError>;
    /// Builds and starts the VM (Created → Running).
    fn boot(&self) -> Result<(), ControlError>;
    /// Asks the guest to power off through the ACPI power button; stops it hard when it has
    /// not within `timeout_ms` (Running/Paused → Shutdown).
    fn shutdown(&self, timeout_ms: u64) -> Result<(), ControlError>;
    /// Restarts the VM with the same configuration (Running/Paused → Running).
    fn reboot(&self) -> Result<(), ControlError>;
    /// Stops vCPUs and device queues (Running → Paused).
    fn pause(&self) -> Result<(), ControlError>;
    /// Restarts them (Paused → Running).
    fn resume(&self) -> Result<(), ControlError>;
    /// State, configuration and counters.
    fn info(&self) -> VmInfo;
    /// Writes a snapshot of the paused VM into `dir` (created if missing, must be empty): all of
    /// guest memory, or for a diff only what changed since the last snapshot or restore.
    fn snapshot(&self, dir: PathBuf, kind: SnapshotType) -> Result<(), ControlError>;
    /// Restores the snapshot in `dir` into this process, which must not have a VM yet; the VM is
    /// left Paused, or Running when `resume`.
    fn restore(&self, dir: PathBuf, resume: bool) -> Result<(), ControlError>;
}
