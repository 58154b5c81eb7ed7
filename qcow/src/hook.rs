//! A window on every change the qcow2 engine makes to its image file: each write, length change
//! and fdatasync passes through a [`FileHook`] when one is attached ([`crate::OpenOptions::hook`]).
//!
//! The crash-consistency harness records these operations and rebuilds the file as a power
//! loss could have left it (the page cache does not survive one, so any subset of the writes
//! since the last sync may be missing); fault-injection tests fail chosen operations. Reads do
//! not pass through: they change nothing.

use std::fmt;
use std::sync::Arc;

/// One change to the image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileOp {
    /// `data` written at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// The file's length set.
    SetLen(u64),
    /// fdatasync: everything before it is durable once it returns.
    Sync,
}

/// Sees the operations of one image file, in the order the engine issues them.
pub trait FileHook: Send + Sync {
    /// Before the operation; an error fails it without performing it (fault injection).
    fn before(&self, _op: &FileOp) -> std::io::Result<()> {
        Ok(())
    }

    /// After the operation succeeded.
    fn after(&self, _op: &FileOp) {}
}

/// A hook to attach to an image (the top file of its chain; backing files are never written).
#[derive(Clone)]
pub struct Hook(pub Arc<dyn FileHook>);

impl fmt::Debug for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Hook(..)")
    }
}
