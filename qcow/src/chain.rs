//! Opening an image with its backing chain: backing paths resolved like QEMU does (relative to
//! the directory of the image naming them), every backing file read-only, loops and excessive
//! depth refused, formats taken from the header's backing-format extension when present.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::header;
use crate::layer::Layer;
use crate::qcow2::Qcow2;
use crate::raw::Raw;
use crate::Format;

/// Longest backing chain accepted (QEMU has no limit; ours bounds recursion and open files).
pub const MAX_CHAIN_DEPTH: usize = 32;

/// The path a backing file name refers to, seen from the image at `image`.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    image.parent().unwrap_or_else(|| Path::new(".")).join(p)
}

/// The format a file's contents announce: qcow2 by its magic, raw otherwise.
pub fn probe_file(file: &File, path: &Path) -> Result<Format> {
    let mut head = [0u8; 4];
    let len = file.metadata().map_err(Error::io(path))?.len();
    if len < 4 {
        return Ok(Format::Raw);
    }
    crate::iov::pread(file, &mut head, 0).map_err(Error::io(path))?;
    Ok(if header::looks_like_qcow2(&head) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

fn parse_backing_format(path: &Path, f: &str) -> Result<Format> {
    match f {
        "qcow2" => Ok(Format::Qcow2),
        "raw" | "file" => Ok(Format::Raw),
        other => Err(Error::Backing {
            path: path.to_path_buf(),
            reason: format!("backing format {other:?} is not supported (raw or qcow2)"),
        }),
    }
}

/// Takes a whole-file lock: exclusive for a writer, shared for readers, so two writers (or a
/// writer and a VM reading the file as its base) never use one image at once.
fn lock(file: &File, path: &Path, writable: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    let op = if writable {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // A lock can outlive its holder's close for a moment: a child process forked by another
    // thread keeps a copy of the descriptor until it execs. Retry briefly before giving up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            // Filesystems without locks (some network mounts) still get the image.
            tracing::warn!(path = %path.display(), "cannot lock image: {e}");
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "{}: image is in use by another process ({} lock held)",
                path.display(),
                if writable { "a" } else { "a write" }
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Opens `path` and its backing chain.
pub fn open(path: &Path, format: Option<Format>, writable: bool, direct: bool) -> Result<Layer> {
    open_at_depth(path, format, writable, direct, &mut Vec::new())
}

fn open_at_depth(
    path: &Path,
    format: Option<Format>,
    writable: bool,
    direct: bool,
    seen: &mut Vec<(u64, u64)>,
) -> Result<Layer> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(Error::io(path))?;
    let data = crate::iov::DataFile {
        direct: if direct {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .map_err(Error::io(path))?,
            )
        } else {
            None
        },
    };
    let meta = file.metadata().map_err(Error::io(path))?;
    if meta.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: is a directory",
            path.display()
        )));
    }
    let id = (meta.dev(), meta.ino());
    if seen.contains(&id) {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: "the backing chain loops back to this file".into(),
        });
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::Backing {
            path: path.to_path_buf(),
            reason: format!("the backing chain is deeper than {MAX_CHAIN_DEPTH} images"),
        });
    }
    seen.push(id);
    lock(&file, path, writable)?;
    let format = match format {
        Some(f) => f,
        None => probe_file(&file, path)?,
    };
    match format {
        Format::Raw => Ok(Layer::Raw(Raw::open(path, file, data, writable)?)),
        Format::Qcow2 => {
            let mut q = Qcow2::open(path, file, writable)?;
            q.set_data_file(data);
            let h = q.header().clone();
            if let Some(name) = &h.backing_file {
                let bpath = resolve_backing(path, name);
                let bformat = match &h.backing_format {
                    Some(f) => Some(parse_backing_format(path, f)?),
                    None => None,
                };
                if !bpath.exists() {
                    return Err(Error::Backing {
                        path: path.to_path_buf(),
                        reason: format!("backing file {} does not exist", bpath.display()),
                    });
                }
                let backing =
                    open_at_depth(&bpath, bformat, false, direct, seen).map_err(|e| match e {
                        e @ Error::Backing { .. } => e,
                        other => Error::Backing {
                            path: path.to_path_buf(),
                            reason: format!("backing file {}: {other}", bpath.display()),
                        },
                    })?;
                q.set_backing(Some(backing));
            }
            Ok(Layer::Qcow2(Box::new(q)))
        }
    }
}
