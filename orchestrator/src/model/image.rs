//! `Image`: a base disk, by content (`digest`: a blob pushed to the control plane's image store,
//! which workers pull and verify) or, for trusted operators of a server started with
//! `--allow-host-path`, by a path every worker has.

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

/// How VMs of an image boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageBoot {
    /// The VMM loads a kernel (the image's or the worker's) directly.
    #[default]
    Direct,
    /// The worker's UEFI firmware boots the loader on the image's disk (its EFI system
    /// partition): the guest picks and upgrades its own kernels.
    Uefi,
}

impl ImageBoot {
    fn is_direct(&self) -> bool {
        *self == ImageBoot::Direct
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The disk in the image store: `sha256:<hex>` (`lightbyte image push`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Or: absolute path of the base image on every worker (refused unless the server allows
    /// host paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Stated, never probed: guessing a format from a file's header lets a guest that wrote a
    /// qcow2 header into a raw disk read host files through a forged backing file.
    #[serde(default)]
    pub format: DiskFormat,
    /// Virtual size, when known; volumes of this image must be at least this large.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
    /// Kernel VMs of this image boot directly (a digest in the image store, or an absolute path
    /// on every worker); when absent, the worker's `--kernel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initramfs loaded with the kernel; when absent, the worker's `--initramfs` (if the kernel
    /// is the worker's too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Kernel command line; the worker appends the network configuration (`ip=`). For a
    /// UEFI image, the load options of its boot loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// `uefi`: boot through the worker's firmware instead of a kernel.
    #[serde(default, skip_serializing_if = "ImageBoot::is_direct")]
    pub boot: ImageBoot,
}

/// A digest `sha256:<64 hex>`.
fn digest(field: &str, value: &str) -> Result<(), FieldError> {
    value
        .parse::<crate::images::Digest>()
        .map(|_| ())
        .map_err(|e| FieldError::new(field, e))
}

/// A boot file: a digest in the image store, or an absolute host path.
fn file_ref(field: &str, value: &str) -> Result<(), FieldError> {
    if crate::images::Digest::looks_like(value) {
        digest(field, value)
    } else {
        absolute_path(field, value)
    }
}

impl ImageSpec {
    /// The host paths it names (disk, kernel, initramfs): what a server without
    /// `--allow-host-path` refuses.
    pub fn host_paths(&self) -> Vec<(&'static str, &str)> {
        let mut v = Vec::new();
        if let Some(p) = &self.path {
            v.push(("spec.path", p.as_str()));
        }
        for (field, f) in [
            ("spec.kernel", &self.kernel),
            ("spec.initramfs", &self.initramfs),
        ] {
            if let Some(f) = f
                .as_deref()
                .filter(|f| !crate::images::Digest::looks_like(f))
            {
                v.push((field, f));
            }
        }
        v
    }

    /// The disk as a user reads it: its digest, or its path.
    pub fn source(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.path.as_deref())
            .unwrap_or("-")
    }
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
        match (&self.digest, &self.path) {
            (Some(d), None) => digest("spec.digest", d)?,
            (None, Some(p)) => absolute_path("spec.path", p)?,
            (Some(_), Some(_)) => {
                return Err(FieldError::new(
                    "spec.path",
                    "give spec.digest or spec.path, not both",
                ))
            }
            (None, None) => {
                return Err(FieldError::new(
                    "spec.digest",
                    "is required (push the image with `lightbyte image push`)",
                ))
            }
        }
        if self.size == Some(ByteSize(0)) {
            return Err(FieldError::new("spec.size", "must not be zero"));
        }
        if let Some(k) = &self.kernel {
            file_ref("spec.kernel", k)?;
        }
        if let Some(i) = &self.initramfs {
            file_ref("spec.initramfs", i)?;
            if self.kernel.is_none() {
                return Err(FieldError::new(
                    "spec.initramfs",
                    "needs spec.kernel: an initramfs belongs to the kernel it was built for",
                ));
            }
        }
        if self.boot == ImageBoot::Uefi && (self.kernel.is_some() || self.initramfs.is_some()) {
            return Err(FieldError::new(
                "spec.boot",
                "uefi images boot the loader on their disk: give no spec.kernel or spec.initramfs",
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> ImageSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn uefi_images_carry_no_kernel_and_direct_is_the_default() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let plain = parse(&format!(r#"{{"digest":"{digest}"}}"#));
        assert_eq!(plain.boot, ImageBoot::Direct);
        // The default stays out of the stored document, so existing images read back equal.
        assert!(!serde_json::to_string(&plain).unwrap().contains("boot"));
        let uefi = parse(&format!(
            r#"{{"digest":"{digest}","boot":"uefi","cmdline":"quiet"}}"#
        ));
        assert_eq!(uefi.boot, ImageBoot::Uefi);
        uefi.validate().unwrap();
        assert!(serde_json::to_string(&uefi)
            .unwrap()
            .contains(r#""boot":"uefi""#));
        let both = parse(&format!(
            r#"{{"digest":"{digest}","boot":"uefi","kernel":"/k"}}"#
        ));
        let e = both.validate().unwrap_err().to_string();
        assert!(
            e.contains("spec.boot") && e.contains("no spec.kernel"),
            "{e}"
        );
        assert!(serde_json::from_str::<ImageSpec>(&format!(
            r#"{{"digest":"{digest}","boot":"bios"}}"#
        ))
        .is_err());
    }
}
