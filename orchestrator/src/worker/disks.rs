//! VM disks on a worker: the root volume is a qcow2 overlay of the VM's image, made when the VM
//! is first started here (a metadata-only operation, milliseconds whatever the image size) and
//! kept across restarts of the VM; named volumes are overlays too, kept until their Volume is
//! deleted.

use std::path::{Component, Path, PathBuf};

use qcow::{CreateOptions, Format};

use crate::model::DiskFormat;

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

/// The base of an overlay: the file (a cached image, or a host path) and its stated format.
#[derive(Debug, Clone)]
pub struct Base {
    pub file: PathBuf,
    pub format: DiskFormat,
    /// The image's stated virtual size, used when the overlay's is not given.
    pub size: Option<u64>,
    /// The file is in this worker's image cache (named relative to the overlay), rather than
    /// a path every worker has (named as it is).
    pub cached: bool,
}

/// Creates `path` as a qcow2 overlay of `base` of `size` bytes (the base's size when None),
/// unless it exists. Made under a temporary name and renamed, so a crash never leaves a
/// half-written overlay under the real name. A cached base is named relative to the overlay,
/// so the overlay stays valid on any worker with the same layout (a moved disk).
pub fn ensure_overlay(path: &Path, base: &Base, size: Option<u64>) -> Result<(), OverlayError> {
    if path.exists() {
        return Ok(());
    }
    let tmp = path.with_extension("qcow2.tmp");
    let _ = std::fs::remove_file(&tmp);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = base
        .cached
        .then(|| relative_within(dir, &base.file))
        .flatten()
        .unwrap_or_else(|| base.file.clone());
    let opts = CreateOptions {
        format: Format::Qcow2,
        size: size.or(base.size),
        backing_file: Some(name.display().to_string()),
        backing_format: Some(match base.format {
            DiskFormat::Qcow2 => Format::Qcow2,
            DiskFormat::Raw => Format::Raw,
        }),
        ..CreateOptions::default()
    };
    qcow::create(&tmp, &opts).map_err(|source| OverlayError::Create {
        path: path.to_path_buf(),
        image: base.file.display().to_string(),
        source,
    })?;
    {
        // A VM's disk is its owner's only.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| OverlayError::Rename {
                tmp: tmp.clone(),
                source,
            },
        )?;
    }
    super::durable::rename(&tmp, path).map_err(|source| OverlayError::Rename { tmp, source })
}

/// `target` relative to directory `from` when both lie under one top-level directory of a
/// common root deeper than `/` (both absolute, no `..`); None otherwise.
fn relative_within(from: &Path, target: &Path) -> Option<PathBuf> {
    let plain = |p: &Path| {
        p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
    };
    if !plain(from) || !plain(target) {
        return None;
    }
    let a: Vec<_> = from.components().collect();
    let b: Vec<_> = target.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    // Only the root in common: keep the absolute path.
    if common < 2 {
        return None;
    }
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c);
    }
    Some(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_are_made_once_with_the_image_as_backing() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let image = Base {
            file: base.clone(),
            format: DiskFormat::Raw,
            size: None,
            cached: false,
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

        let missing = Base {
            file: "/nonexistent/base.qcow2".into(),
            ..image
        };
        let err = ensure_overlay(&dir.path().join("x.qcow2"), &missing, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/base.qcow2"), "{err}");
        assert!(!dir.path().join("x.qcow2").exists());
    }

    #[test]
    fn cached_bases_are_named_relative_to_their_overlays() {
        let r = |a: &str, b: &str| relative_within(Path::new(a), Path::new(b));
        assert_eq!(
            r("/var/lib/lb/vms/web", "/var/lib/lb/images/sha256/ab"),
            Some(PathBuf::from("../../images/sha256/ab"))
        );
        assert_eq!(r("/var/lib/lb/volumes", "/srv/base.raw"), None);
        assert_eq!(r("/a/b", "/a/../etc/passwd"), None);
        // The overlay resolves it through qcow2's relative backing rules.
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images/sha256");
        std::fs::create_dir_all(&images).unwrap();
        let cached = images.join("ab");
        std::fs::write(&cached, vec![9u8; 1 << 20]).unwrap();
        let vm = dir.path().join("vms/web");
        std::fs::create_dir_all(&vm).unwrap();
        let base = Base {
            file: cached,
            format: DiskFormat::Raw,
            size: None,
            cached: true,
        };
        let root = vm.join("root.qcow2");
        ensure_overlay(&root, &base, None).unwrap();
        let img = qcow::Image::open(&root, &qcow::OpenOptions::default()).unwrap();
        assert_eq!(
            img.info().backing_file.as_deref(),
            Some("../../images/sha256/ab")
        );
        let mut buf = [0u8; 2];
        img.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9, 9]);
    }
}
