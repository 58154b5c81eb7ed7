//! What the API can ask of the VMM, independent of HTTP: the VM's lifecycle as a state machine.
//! The API server ([`crate::api`]) turns requests into these calls; the VMM implements them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Lifecycle state of the VM a `vmm` process manages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No configuration yet.
    NotCreated,
    /// Configured, not booted.
    Created,
    /// vCPUs running.
    Running,
    /// vCPUs and device queues stopped; can be resumed or snapshotted.
    Paused,
    /// The guest stopped (poweroff, reset, panic or error); the process exits shortly.
    Shutdown,
}

/// Counters of one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCounters {
    /// Image path.
    pub path: PathBuf,
    /// Completed read requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Completed write requests.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush requests.
    pub flush_ops: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// Counters of one network device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    /// Host TAP interface.
    pub tap: String,
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes of those frames (Ethernet header included, virtio-net header not).
    pub rx_bytes: u64,
    /// Frames for the guest that were lost: larger than its buffers, or unreadable.
    pub rx_dropped: u64,
    /// Frames the guest sent to the TAP.
    pub tx_packets: u64,
    /// Bytes of those frames.
    pub tx_bytes: u64,
    /// Frames from the guest that were malformed or refused by the TAP.
    pub tx_dropped: u64,
}

/// What `GET /api/v1/vm/info` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Lifecycle state.
    pub state: VmState,
    /// The configuration, once created.
    pub config: Option<VmConfig>,
    /// Per-disk counters, once booted.
    pub disks: Vec<DiskCounters>,
    /// Per-network-device counters, once booted.
    pub nets: Vec<NetCounters>,
    /// Why the VM stopped, in state `shutdown`.
    pub exit_reason: Option<String>,
}

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
    /// Writes a snapshot of the paused VM into `dir` (created if missing, must be empty).
    fn snapshot(&self, dir: PathBuf) -> Result<(), ControlError>;
    /// Restores the snapshot in `dir` into this process, which must not have a VM yet; the VM is
    /// left Paused, or Running when `resume`.
    fn restore(&self, dir: PathBuf, resume: bool) -> Result<(), ControlError>;
}
