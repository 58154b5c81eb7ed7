//! Request and response bodies of the VMM's HTTP API (besides the create body, which is a
//! [`VmConfig`]), and what `GET /api/v1/vm/info` reports. `docs/api/openapi.yaml` documents
//! them; a test in `vmm` keeps the two in step.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Default of `PUT /api/v1/vm/shutdown`'s `timeout_ms`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Longest `timeout_ms` accepted: an hour. Longer would hold an API request (and its caller)
/// for longer than any orderly guest shutdown takes.
pub const MAX_SHUTDOWN_TIMEOUT_MS: u64 = 3_600_000;

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

impl VmState {
    /// How error messages name the state.
    pub fn describe(self) -> &'static str {
        match self {
            VmState::NotCreated => "not created",
            VmState::Created => "created but not booted",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shut down",
        }
    }
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
    /// Why the VMM paused the VM itself (a disk's write failed on the host), in state `paused`;
    /// `resume` retries what waited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
}

/// `PUT /api/v1/vm/shutdown` (body optional).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownBody {
    /// How long the guest has to power off after the ACPI power button before it is stopped.
    #[serde(default = "default_shutdown_timeout")]
    pub timeout_ms: u64,
}

impl Default for ShutdownBody {
    fn default() -> Self {
        ShutdownBody {
            timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT_MS,
        }
    }
}

fn default_shutdown_timeout() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_MS
}

/// `PUT /api/v1/vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// Directory the snapshot is written to (created if missing, must be empty).
    pub destination_dir: PathBuf,
    /// Every page of guest memory, or only the pages written since the VM's last snapshot or
    /// restore.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// What a snapshot holds of guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotType {
    /// All of guest memory: restores on its own.
    #[default]
    Full,
    /// The pages written since the VM's last snapshot or restore (its base, which the diff
    /// names and which must stay where it is): restores on top of its base.
    Diff,
}

/// `PUT /api/v1/vm/restore`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreBody {
    /// Directory holding the snapshot.
    pub source_dir: PathBuf,
    /// Run the VM once restored (else it stays paused).
    #[serde(default)]
    pub resume: bool,
}

/// `GET /api/v1/vmm/ping`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {
    /// The `vmm` version.
    pub version: String,
    /// The API version, the path segment of every endpoint.
    pub api: String,
    /// Process ID of the `vmm`.
    pub pid: u32,
}

/// The API version this crate speaks: the path segment of every endpoint.
pub const API_VERSION: &str = "v1";

/// Every error response's body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the field or state at fault.
    pub error: String,
}
