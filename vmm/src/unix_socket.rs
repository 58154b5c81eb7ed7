//! Listening Unix socket files (the API's, the vsock device's): bound only where no live server
//! is, stale files from a crashed `vmm` replaced, and removed only while still the file this
//! process bound.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why a socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// A server answers on the socket.
    #[error("{}: another process is serving on it", .0.display())]
    InUse(PathBuf),
    /// The path is taken by something that is not a socket; it is left alone.
    #[error("{}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Creating or checking the socket failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Identity of the socket file this process bound, to avoid removing a later server's socket
/// that replaced ours at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> io::Result<FileId> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// A failure of the host at `path`.
fn io_at(path: &Path) -> impl Fn(io::Error) -> BindError + '_ {
    move |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Binds a listening socket at `path`. Refuses when a server answers there or when the path
/// is something other than a socket (never deletes a user's file); removes a socket nobody
/// listens on. The socket is made owner-only: whoever connects controls part of the VM.
pub fn bind(path: &Path) -> Result<(UnixListener, FileId), BindError> {
    let at = io_at(path);
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!("removing stale socket {}", path.display());
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(at(e)),
                }
            }
            Err(e) => return Err(at(e)),
        },
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(at(e)),
    }
    let listener = match bind_aside(path) {
        Ok(Some(listener)) => listener,
        Ok(None) => bind_in_place(path)?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Another server published its socket between our check and ours.
            return Err(BindError::InUse(path.to_path_buf()));
        }
        Err(e) => return Err(at(e)),
    };
    let id = file_id(path).map_err(at)?;
    Ok((listener, id))
}

/// Binds and listens on a name of its own beside `path`, makes it owner-only, then renames it
/// to `path` (never over an existing file): the socket file appears only once it listens. A
/// client that waits for the file to exist and connects at once (the benchmarks do, and so
/// would any script) otherwise lands between `bind` and `listen` now and then and is refused:
/// an `apibench` run in the test host ended that way. `None` where this cannot be done (the
/// name aside too long for a socket address, a file system without no-replace renames).
fn bind_aside(path: &Path) -> io::Result<Option<UnixListener>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(None);
    };
    let mut aside = std::ffi::OsString::from(".");
    aside.push(name);
    aside.push(format!(".{}", std::process::id()));
    let aside = dir.join(aside);
    // A leftover of an earlier process that had this pid and crashed here.
    let _ = std::fs::remove_file(&aside);
    let listener = match UnixListener::bind(&aside) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Ok(None),
        Err(e) => return Err(e),
    };
    let published = std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| rename_no_replace(&aside, path));
    match published {
        Ok(()) => Ok(Some(listener)),
        Err(e) => {
            let _ = std::fs::remove_file(&aside);
            match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::ENOSYS) => Ok(None),
                _ => Err(e),
            }
        }
    }
}

/// `renameat2(RENAME_NOREPLACE)`: fails with `AlreadyExists` rather than replace `to`.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a socket path"))
    };
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths that outlive the call; no memory is written.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The plain way, where [`bind_aside`] cannot be used: bound, then made owner-only.
fn bind_in_place(path: &Path) -> Result<UnixListener, BindError> {
    let at = io_at(path);
    let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
        // Another server bound it between our check and our bind.
        io::ErrorKind::AddrInUse => BindError::InUse(path.to_path_buf()),
        _ => at(e),
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
    Ok(listener)
}

/// Removes the socket file at `path` if it is still the one identified by `id`.
pub fn remove(path: &Path, id: FileId) {
    if file_id(path).is_ok_and(|now| now == id) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("removing socket {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_file_appears_listening_and_owner_only_with_nothing_left_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let (listener, id) = bind(&path).unwrap();
        assert_eq!(entries(dir.path()), ["api.sock"]);
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(file_id(&path).unwrap(), id);
        UnixStream::connect(&path).expect("listening as soon as it exists");
        listener.accept().unwrap();
    }

    #[test]
    fn a_live_server_is_refused_a_stale_file_replaced_and_a_plain_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let (live, _) = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(BindError::InUse(_))));
        drop(live); // the file stays, nobody listens: stale
        let (_again, _) = bind(&path).unwrap();
        assert_eq!(entries(dir.path()), ["s"]);

        let file = dir.path().join("notes.txt");
        std::fs::write(&file, b"mine").unwrap();
        assert!(matches!(bind(&file), Err(BindError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    }

    /// A path that fits a socket address while the name aside would not still binds.
    #[test]
    fn a_path_too_long_for_the_name_aside_binds_in_place() {
        let dir = tempfile::tempdir().unwrap();
        // sun_path holds 107 bytes and a NUL.
        let room = 107 - dir.path().as_os_str().len() - 1;
        let path = dir.path().join("x".repeat(room));
        let (_l, _) = bind(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(entries(dir.path()).len(), 1);
    }
}
