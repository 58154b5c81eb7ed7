//! VM disks on a worker: the root volume is a qcow2 overlay of the VM's image, made when the VM
//! is first started here (a metadata-only operation, milliseconds whatever the image size) and
//! kept across restarts of the VM; named volumes are overlays too, kept until their Volume is
//! deleted.

use std::path::Path;

use qcow::{CreateOptions, Format};

use crate::model::{DiskFormat, ImageSpec};

/// Creates `path` as a qcow2 overlay of `image` of `size` bytes (the image's size when None),
/// unless it exists. Made under a temporary name and renamed, so a crash never leaves a
/// half-written overlay under the real name.
/// Why a VM's disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The qcow2 overlay could not be created.
    #[error("creating overlay {} of {image}: {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        image: String,
        source: qcow::Error,
    },
    /// The finished overlay could not be put in place.
    #[error("renaming {}: {source}", tmp.display())]
    Rename {
        tmp: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub fn ensure_overlay(
    path: &Path,
    image: &ImageSpec,
    size: Option<u64>,
) -> Result<(), OverlayError> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    let opts = CreateOptions {
        format: Format::Qcow2,
        size: size.or(image.size.map(|s| s.bytes())),
        backing_file: Some(image.path.clone()),
        backing_format: Some(match image.format {
            DiskFormat::Qcow2 => Format::Qcow2,
            DiskFormat::Raw => Format::Raw,
        }),
        ..CreateOptions::default()
    };
    qcow::create(&tmp, &opts).map_err(|source| OverlayError::Create {
        path: path.to_path_buf(),
        image: image.path.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| OverlayError::Rename { tmp, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_are_made_once_with_the_image_as_backing() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let image = ImageSpec {
            path: base.to_str().unwrap().into(),
            format: DiskFormat::Raw,
            size: None,
            kernel: None,
            initramfs: None,
            cmdline: None,
        };
        let root = dir.path().join("root.qcow2");
        ensure_overlay(&root, &image, None).unwrap();
        let img = qcow::Image::open(&root, &qcow::OpenOptions::default()).unwrap();
        assert_eq!(img.info().virtual_size, 1 << 20);
        let mut buf = [0u8; 4];
        img.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
        drop(img);
        let before = std::fs::metadata(&root).unwrap().modified().unwrap();
        ensure_overlay(&root, &image, Some(2 << 20)).unwrap();
        assert_eq!(
            std::fs::metadata(&root).unwrap().modified().unwrap(),
            before
        );

        let vol = dir.path().join("vol.qcow2");
        ensure_overlay(&vol, &image, Some(8 << 20)).unwrap();
        let img = qcow::Image::open(&vol, &qcow::OpenOptions::default()).unwrap();
        assert_eq!(img.info().virtual_size, 8 << 20);

        let missing = ImageSpec {
            path: "/nonexistent/base.qcow2".into(),
            ..image
        };
        let err = ensure_overlay(&dir.path().join("x.qcow2"), &missing, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/base.qcow2"), "{err}");
        assert!(!dir.path().join("x.qcow2").exists());
    }
}
