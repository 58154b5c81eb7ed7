//! `Vm`: a virtual machine the user wants running somewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::validate::{dns_label, label, FieldError};
use super::{ByteSize, Reference, Spec};

/// The VMM's own vCPU limit.
pub const MAX_VM_CPUS: u32 = vmm_api::limits::MAX_CPUS as u32;
/// Less than this does not boot a useful Linux guest.
pub const MIN_VM_MEMORY: ByteSize = ByteSize(64 << 20);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory: ByteSize,
    /// The image its root volume overlays.
    pub image: String,
    /// Extra volumes, attached in order after the root disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// The network the worker attaches its TAP to.
    #[serde(default = "default_network")]
    pub network: String,
    /// The scale group whose members the scheduler spreads across workers; when absent, the
    /// name without a trailing `-<number>` (`web-1` and `web-2` are group `web`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Free-form labels (the load balancers of issue 14 select members by them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Appended to the image's kernel command line (before the worker's `ip=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Whether it should run: `lightbyte vm stop|start`. A guest that powers itself off sets it
    /// to Stopped, so that what is wanted matches what happened.
    #[serde(default, skip_serializing_if = "Power::is_running")]
    pub power: Power,
}

/// The power state a VM should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Power {
    #[default]
    Running,
    Stopped,
}

impl Power {
    pub fn is_running(&self) -> bool {
        *self == Power::Running
    }
}

/// Longest `spec.cmdline`: the VMM's whole command line is limited, and the image's part and the
/// worker's `ip=` come first.
pub const MAX_CMDLINE: usize = 1024;

fn default_network() -> String {
    "default".to_string()
}

/// The VM's life as controllers and its worker observe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum VmState {
    /// Waiting for the scheduler.
    #[default]
    Pending,
    /// Placed on a worker that has not started it yet.
    Scheduled,
    Starting,
    Running,
    /// Its `vmm` paused it because the host could not take a disk write (disk full): the
    /// message says which disk and why; it goes on once resumed through the vmm's API.
    Paused,
    Stopping,
    Stopped,
    /// Its worker stopped heartbeating: it may still run there, so it is not started elsewhere.
    /// When the worker comes back it re-adopts the VM; when an operator forgets the worker, a VM
    /// whose disks lived only there stays Lost until started on fresh disks or deleted.
    Lost,
    Failed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStatus {
    #[serde(default)]
    pub state: VmState,
    /// The worker it is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// RFC 3339, UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_time: Option<String>,
    /// Why it is in its state, when that is not obvious ("no Ready worker has 4 CPUs free").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The version of the guest agent, when it answered (a guest without one is known to be up
    /// by a TCP probe of its address instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// When it became Lost (RFC 3339, UTC): scale groups replace a member without volumes a
    /// grace period after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_since: Option<String>,
    /// A cold move to another worker under way (its worker is draining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<Move>,
    /// When its scale group let it go (RFC 3339, UTC): load balancers stop sending it requests
    /// at once, and the group deletes it once their drain grace has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_since: Option<String>,
}

/// A cold move: the source worker powers the VM off and checksums its disks, the target fetches
/// them from the source (authenticated by a per-move token kept in etcd, outside the API),
/// verifies them and takes the placement, then starts it; the source deletes its copy only once
/// the move is finished (the VM runs on the target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Move {
    pub from: String,
    pub to: String,
    pub phase: MovePhase,
    /// RFC 3339, UTC: when the phase was entered (a Failed move is retried a while after).
    pub since: String,
    /// The disks that travel, as the source found them once the VM was off.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<MovedDisk>,
    /// The last problem (a failed copy that is being retried, why the move failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MovePhase {
    /// The source powers the VM off and checksums its disks.
    Stopping,
    /// The target fetches the disks.
    Copying,
    /// The target holds the placement and starts the VM; the source still has its copy.
    Starting,
    /// Given up (the copy kept failing, the target went away): the VM runs on the source again.
    Failed,
}

/// One disk file of a moving VM: the root overlay (`volume` none) or a named volume's overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MovedDisk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the whole file.
    pub sha256: String,
}

impl Spec for VmSpec {
    type Status = VmStatus;
    const KIND: &'static str = "vm";
    const PLURAL: &'static str = "vms";

    fn validate(&self) -> Result<(), FieldError> {
        if !(1..=MAX_VM_CPUS).contains(&self.cpus) {
            return Err(FieldError::new(
                "spec.cpus",
                format!("{} is out of range 1..={MAX_VM_CPUS}", self.cpus),
            ));
        }
        if self.memory < MIN_VM_MEMORY {
            return Err(FieldError::new(
                "spec.memory",
                format!("{} is less than the minimum {MIN_VM_MEMORY}", self.memory),
            ));
        }
        if self.memory.bytes() % ByteSize::MIB != 0 {
            return Err(FieldError::new(
                "spec.memory",
                format!("{} is not a whole number of MiB", self.memory),
            ));
        }
        dns_label("spec.image", &self.image)?;
        let mut seen = BTreeSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let field = format!("spec.volumes[{i}]");
            dns_label(&field, v)?;
            if !seen.insert(v) {
                return Err(FieldError::new(
                    field,
                    format!("volume {v:?} is listed twice"),
                ));
            }
        }
        dns_label("spec.network", &self.network)?;
        if let Some(g) = &self.group {
            dns_label("spec.group", g)?;
        }
        for (k, v) in &self.labels {
            label(&format!("spec.labels.{k}"), k, true)?;
            label(&format!("spec.labels.{k}"), v, false)?;
        }
        if let Some(c) = &self.cmdline {
            check_cmdline("spec.cmdline", c)?;
        }
        Ok(())
    }

    fn exclusive_references(&self) -> Vec<Reference> {
        self.references()
            .into_iter()
            .filter(|r| r.kind == "volume")
            .collect()
    }

    fn references(&self) -> Vec<Reference> {
        let image = Reference {
            field: "spec.image".into(),
            kind: "image",
            name: self.image.clone(),
        };
        let volumes = self.volumes.iter().enumerate().map(|(i, v)| Reference {
            field: format!("spec.volumes[{i}]"),
            kind: "volume",
            name: v.clone(),
        });
        std::iter::once(image).chain(volumes).collect()
    }
}

/// Kernel command line text: printable ASCII on one line, within [`MAX_CMDLINE`].
pub fn check_cmdline(field: &str, c: &str) -> Result<(), FieldError> {
    if c.len() > MAX_CMDLINE {
        return Err(FieldError::new(
            field,
            format!("is longer than {MAX_CMDLINE} bytes"),
        ));
    }
    if !c.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(FieldError::new(
            field,
            "may only contain printable ASCII on one line",
        ));
    }
    Ok(())
}

/// The group a VM's replicas share, for spreading.
pub fn scale_group<'a>(name: &'a str, spec: &'a VmSpec) -> &'a str {
    if let Some(g) = &spec.group {
        return g;
    }
    match name.rsplit_once('-') {
        Some((prefix, n)) if !prefix.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => prefix,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            cpus: 2,
            memory: ByteSize::mib(256),
            image: "base".into(),
            volumes: vec![],
            network: "default".into(),
            group: None,
            labels: BTreeMap::new(),
            cmdline: None,
            power: Power::Running,
        }
    }

    #[test]
    fn limits_name_the_field() {
        let mut s = spec();
        assert_eq!(s.validate(), Ok(()));
        s.cpus = 0;
        assert_eq!(s.validate().unwrap_err().field, "spec.cpus");
        s.cpus = 255;
        assert_eq!(s.validate().unwrap_err().field, "spec.cpus");
        s.cpus = 254;
        s.memory = ByteSize::mib(63);
        assert_eq!(s.validate().unwrap_err().field, "spec.memory");
        s.memory = ByteSize(64 * ByteSize::MIB + 1);
        assert_eq!(s.validate().unwrap_err().field, "spec.memory");
        s.memory = ByteSize::mib(64);
        s.volumes = vec!["a".into(), "a".into()];
        assert_eq!(s.validate().unwrap_err().field, "spec.volumes[1]");
        s.volumes = vec![];
        s.cmdline = Some("quiet\ninit=/bin/sh".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.cmdline");
        s.cmdline = Some("x".repeat(MAX_CMDLINE + 1));
        assert_eq!(s.validate().unwrap_err().field, "spec.cmdline");
        s.cmdline = Some("quiet loglevel=3".into());
        s.labels.insert("tier".into(), "front end".into());
        assert_eq!(s.validate().unwrap_err().field, "spec.labels.tier");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let r: Result<VmSpec, _> =
            serde_json::from_str(r#"{"cpus":1,"memory":"64M","image":"base","cpu":2}"#);
        assert!(r.unwrap_err().to_string().contains("unknown field `cpu`"));
    }

    #[test]
    fn groups_come_from_names_or_the_spec() {
        let mut s = spec();
        assert_eq!(scale_group("web-1", &s), "web");
        assert_eq!(scale_group("web-12", &s), "web");
        assert_eq!(scale_group("db", &s), "db");
        assert_eq!(scale_group("web-a", &s), "web-a");
        assert_eq!(scale_group("-1", &s), "-1");
        s.group = Some("front".into());
        assert_eq!(scale_group("web-1", &s), "front");
    }
}
