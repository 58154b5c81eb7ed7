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

/// Nothing is observed about volumes yet; the type keeps the document shape uniform.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStatus {}

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
