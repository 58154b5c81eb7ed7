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

/// Binds a listening socket at `path`. Refuses when a server answers there or when the path
/// is something other than a socket (never deletes a user's file); removes a socket nobody
/// listens on. The socket is made owner-only: whoever connects controls part of the VM.
pub fn bind(path: &Path) -> Result<(UnixListener, FileId), BindError> {
    let at = |source: io::Error| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
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
    let listener = UnixListener::bind(path).map_err(|e| match e.kind() {
        // Another server bound it between our check and our bind.
        io::ErrorKind::AddrInUse => BindError::InUse(path.to_path_buf()),
        _ => at(e),
    })?;
    let id = file_id(path).map_err(at)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(at)?;
    Ok((listener, id))
}

/// Removes the socket file at `path` if it is still the one identified by `id`.
pub fn remove(path: &Path, id: FileId) {
    if file_id(path).is_ok_and(|now| now == id) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!("removing socket {}: {e}", path.display());
        }
    }
}
