//! `Worker`: a host that runs VMs. Its agent registers it with a lease; the worker-health
//! controller derives its state from that lease.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::validate::{label, FieldError};
use super::{ByteSize, Spec, MAX_VM_CPUS, MIN_VM_MEMORY};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub cpus: u32,
    pub memory: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// What VMs may be given in total.
    pub capacity: Capacity,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Set by an operator: no new VMs are placed here.
    #[serde(default)]
    pub drain: bool,
    /// Set by an operator (`lightbyte worker forget`) for a worker that is gone: its VMs are
    /// given up (see `VmState::Lost`). Its agent, if it ever comes back, stops and archives its old
    /// copies instead of re-adopting them, then clears this.
    #[serde(default, skip_serializing_if = "is_false")]
    pub forgotten: bool,
    /// Where the worker agent serves requests for its VMs (their guest agents), `HOST:PORT`;
    /// set by the agent when it registers with `--listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WorkerState {
    Ready,
    /// Its lease expired (or it never registered one).
    #[default]
    NotReady,
    /// Drain was asked and VMs are still placed on it.
    Draining,
    /// Drain was asked and no VM is placed on it any more.
    Drained,
    /// An operator gave it up while it was gone; nothing is placed on it until its agent comes
    /// back and clears the flag.
    Forgotten,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStatus {
    #[serde(default)]
    pub state: WorkerState,
    /// The etcd lease its agent keeps alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Spec for WorkerSpec {
    type Status = WorkerStatus;
    const KIND: &'static str = "worker";
    const PLURAL: &'static str = "workers";

    fn validate(&self) -> Result<(), FieldError> {
        // A worker that cannot hold the smallest VM is a typo, not a host.
        if !(1..=MAX_VM_CPUS * 64).contains(&self.capacity.cpus) {
            return Err(FieldError::new(
                "spec.capacity.cpus",
                format!(
                    "{} is out of range 1..={}",
                    self.capacity.cpus,
                    MAX_VM_CPUS * 64
                ),
            ));
        }
        if self.capacity.memory < MIN_VM_MEMORY {
            return Err(FieldError::new(
                "spec.capacity.memory",
                format!(
                    "{} is less than the smallest VM ({MIN_VM_MEMORY})",
                    self.capacity.memory
                ),
            ));
        }
        for (k, v) in &self.labels {
            label(&format!("spec.labels.{k}"), k, true)?;
            label(&format!("spec.labels.{k}"), v, false)?;
        }
        Ok(())
    }
}
