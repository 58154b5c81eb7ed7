//! `Image`: a base disk file that every worker has at the same path.

use serde::{Deserialize, Serialize};

use super::validate::{absolute_path, FieldError};
use super::{ByteSize, Spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The default: base images are shared read-only under qcow2 overlays.
    #[default]
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Absolute path of the base image on every worker.
    pub path: String,
    /// Stated, never probed: guessing a format from a file's header lets a guest that wrote a
    /// qcow2 header into a raw disk read host files through a forged backing file.
    #[serde(default)]
    pub format: DiskFormat,
    /// Virtual size, when known; volumes of this image must be at least this large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

/// Nothing is observed about images yet; the type keeps the document shape uniform.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageStatus {}

impl Spec for ImageSpec {
    type Status = ImageStatus;
    const KIND: &'static str = "image";
    const PLURAL: &'static str = "images";

    fn validate(&self) -> Result<(), FieldError> {
        absolute_path("spec.path", &self.path)?;
        if self.size == Some(ByteSize(0)) {
            return Err(FieldError::new("spec.size", "must not be zero"));
        }
        Ok(())
    }
}
