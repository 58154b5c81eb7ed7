//! `Volume`: a qcow2 overlay of an image with its own virtual size, created on the worker that
//! runs the VM using it.

use serde::{Deserialize, Serialize};

use super::validate::{dns_label, FieldError};
use super::{ByteSize, Reference, Spec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// The image it overlays.
    pub image: String,
    pub size: ByteSize,
}

/// Where the volume's data is. Its file lives on one worker, so a VM using it can only be placed
/// there (or moved there with a copy of the file).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStatus {
    /// The worker that holds its file (written by that worker before it makes the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Set when the worker holding it was forgotten: the data is gone, and a VM using the volume
    /// starts only when the loss is accepted (`lightbyte vm start NAME --fresh-disks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

/// The smallest volume: a qcow2 overlay's header and tables alone take a few clusters.
const MIN_VOLUME_SIZE: ByteSize = ByteSize(1 << 20);

impl Spec for VolumeSpec {
    type Status = VolumeStatus;
    const KIND: &'static str = "volume";
    const PLURAL: &'static str = "volumes";

    fn validate(&self) -> Result<(), FieldError> {
        dns_label("spec.image", &self.image)?;
        if self.size < MIN_VOLUME_SIZE {
            return Err(FieldError::new(
                "spec.size",
                format!(
                    "{} is smaller than the minimum {MIN_VOLUME_SIZE}",
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        vec![Reference {
            field: "spec.image".into(),
            kind: "image",
            name: self.image.clone(),
        }]
    }
}
