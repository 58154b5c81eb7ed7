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
    /// Kernel VMs of this image boot directly (absolute path on every worker); when absent, the
    /// worker's `--kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initramfs loaded with the kernel; when absent, the worker's `--initramfs` (if the kernel
    /// is the worker's too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Kernel command line; the worker appends the network configuration (`ip=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// Longest kernel command line the boot protocol carries (x86 `COMMAND_LINE_SIZE`), minus room
/// for the `ip=` parameter the worker appends.
pub const MAX_IMAGE_CMDLINE: usize = 2048 - 128;

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
        if let Some(k) = &self.kernel {
            absolute_path("spec.kernel", k)?;
        }
        if let Some(i) = &self.initramfs {
            absolute_path("spec.initramfs", i)?;
            if self.kernel.is_none() {
                return Err(FieldError::new(
                    "spec.initramfs",
                    "needs spec.kernel: an initramfs belongs to the kernel it was built for",
                ));
            }
        }
        if let Some(c) = &self.cmdline {
            if c.len() > MAX_IMAGE_CMDLINE || c.contains(['\0', '\n']) {
                return Err(FieldError::new(
                    "spec.cmdline",
                    format!("must be one line of at most {MAX_IMAGE_CMDLINE} bytes"),
                ));
            }
        }
        Ok(())
    }
}
