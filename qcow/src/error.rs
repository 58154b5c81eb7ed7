//! Errors of image handling. Malformed images and bad arguments are told apart from host I/O
//! failures so callers can report "bad input" differently from "the host failed".

use std::io;
use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What went wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A host I/O call failed.
    // The OS error is part of the message and deliberately not the error's `source`: chains
    // printed by anyhow would otherwise repeat it.
    #[error("{path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        err: io::Error,
    },
    /// The image's metadata is malformed or unsafe to use.
    #[error("{path}: invalid qcow2 image: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image uses a feature this implementation does not handle in the requested mode.
    #[error("{path}: unsupported: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The backing chain cannot be opened as described.
    #[error("{path}: backing chain: {reason}")]
    Backing {
        /// The image naming the backing file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A request that cannot be carried out (out of range, read-only image, bad option).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// True for problems with the input (image contents, arguments) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Io { err, .. } => matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
            ),
            _ => true,
        }
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(io::Error) -> Error + '_ {
        move |err| Error::Io {
            path: path.to_path_buf(),
            err,
        }
    }

    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(path: &std::path::Path, reason: impl Into<String>) -> Error {
        Error::Unsupported {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        match e {
            Error::Io { err, .. } => err,
            other => io::Error::other(other.to_string()),
        }
    }
}
