//! The resources: plain serde data, one file per kind. Every resource is an [`Object`] of
//! metadata, a spec (what the user wants) and a status (what controllers and workers observed).

mod duration;
mod image;
mod load_balancer;
mod scale_group;
mod size;
pub mod validate;
mod vm;
mod volume;
mod worker;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use duration::Seconds;
pub use image::{DiskFormat, ImageBoot, ImageSpec, ImageStatus};
pub use load_balancer::{
    BackendStatus, HealthCheck, HealthKind, Listener, LoadBalancerSpec, LoadBalancerStatus,
    Placement, PlacementKind, ProxyState, Selection, Target, MAX_LISTENERS, MAX_PROXIES,
};
pub use scale_group::{
    member_volumes, Condition, ScaleGroupSpec, ScaleGroupStatus, UpdateStrategy, VmTemplate,
    VolumeTemplate, MAX_REPLICAS, SUFFIX_LEN,
};
pub use size::{ByteSize, SizeError};
pub use validate::FieldError;
pub use vm::{
    check_cmdline, scale_group, Move, MovePhase, MovedDisk, Power, VmSpec, VmState, VmStatus,
    MAX_VM_CPUS, MIN_VM_MEMORY,
};
pub use volume::{VolumeSpec, VolumeStatus};
pub use worker::{Capacity, WorkerSpec, WorkerState, WorkerStatus};

/// A kind of resource, named by its spec type.
pub trait Spec:
    Serialize + DeserializeOwned + Clone + PartialEq + fmt::Debug + Send + Sync + 'static
{
    /// What controllers and workers report back; written only by them, never by API clients.
    type Status: Serialize
        + DeserializeOwned
        + Clone
        + Default
        + PartialEq
        + fmt::Debug
        + Send
        + Sync
        + 'static;
    /// The key segment: objects live at `/lightbyte/<KIND>/<name>`.
    const KIND: &'static str;
    /// The API collection: `/api/v1/<PLURAL>`.
    const PLURAL: &'static str;

    /// Checks the spec on its own; [`Spec::references`] are checked against the store.
    fn validate(&self) -> Result<(), FieldError>;

    /// Checks the object's name against the spec, beyond being a DNS label.
    fn validate_name(&self, _name: &str) -> Result<(), FieldError> {
        Ok(())
    }

    /// References no other object of this kind may make (a volume is attached to one VM).
    fn exclusive_references(&self) -> Vec<Reference> {
        Vec::new()
    }

    /// Other objects this spec names, which must exist when it is written.
    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

/// A spec field naming another object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub field: String,
    pub kind: &'static str,
    pub name: String,
}

/// What every object carries besides its spec and status.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    /// Distinguishes this object from an earlier one of the same name.
    #[serde(default)]
    pub uid: String,
    /// Counts spec changes (status changes leave it alone), starting at 1.
    #[serde(default)]
    pub generation: i64,
    /// RFC 3339, UTC.
    #[serde(default)]
    pub creation_timestamp: String,
    /// The etcd mod revision of the key: filled on every read, never stored (it is only known
    /// once the write has happened), and compared on update for optimistic concurrency.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resource_version: i64,
    /// The object that made this one and deletes it with itself (a scale group's member VMs, a
    /// member's volumes). Set by controllers only: the API drops what a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerRef>,
}

/// Names an owner precisely: a new object under the old name is a different owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

impl OwnerRef {
    pub fn of<S: Spec>(obj: &Object<S>) -> OwnerRef {
        OwnerRef {
            kind: S::KIND.to_string(),
            name: obj.metadata.name.clone(),
            uid: obj.metadata.uid.clone(),
        }
    }
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A stored resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
pub struct Object<S: Spec> {
    pub metadata: Metadata,
    pub spec: S,
    #[serde(default)]
    pub status: S::Status,
}

impl<S: Spec> Object<S> {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// Validates the name and the spec (not the references).
    pub fn validate(&self) -> Result<(), FieldError> {
        validate::dns_label("metadata.name", &self.metadata.name)?;
        self.spec.validate()?;
        self.spec.validate_name(&self.metadata.name)
    }
}

/// An object as an API client sends it: metadata from the server (uid, generation, times) is
/// accepted and ignored, so a client can send back what it read; the status is ignored because
/// only controllers and workers write it.
#[derive(Debug, Clone, Deserialize)]
#[serde(bound = "", deny_unknown_fields)]
pub struct ObjectInput<S: Spec> {
    pub metadata: Metadata,
    pub spec: S,
    #[serde(default, rename = "status")]
    pub _status: Option<serde::de::IgnoredAny>,
}

pub type Image = Object<ImageSpec>;
pub type Volume = Object<VolumeSpec>;
pub type Vm = Object<VmSpec>;
pub type Worker = Object<WorkerSpec>;
pub type ScaleGroup = Object<ScaleGroupSpec>;
pub type LoadBalancer = Object<LoadBalancerSpec>;
