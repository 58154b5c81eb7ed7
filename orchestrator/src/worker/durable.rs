//! Renames that survive power loss: a rename is a change to the directories involved, which
//! stays in the page cache until those directories are synced. Without the sync, a record or
//! overlay written "atomically" can vanish (or reappear under its temporary name) after a crash
//! of the host, although the file's own data was synced.

use std::fs::File;
use std::io;
use std::path::Path;

/// `std::fs::rename`, then an fsync of the target's directory (and of the source's, when it is
/// another one).
pub fn rename(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    sync_parent(to)?;
    if from.parent() != to.parent() {
        sync_parent(from)?;
    }
    Ok(())
}

/// Fsyncs the directory holding `path`.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn renames_and_syncs() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.tmp");
        std::fs::write(&a, b"x").unwrap();
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let b = sub.join("b");
        super::rename(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"x");
        assert!(!a.exists());
        assert!(super::rename(&a, &b).is_err());
    }
}
