//! The serial console written to a file, capped: a guest prints whatever it likes, so the file
//! must not grow without bound. Past [`ROTATE_AT`] bytes the file becomes `PATH.1` (replacing
//! the previous part) and a fresh `PATH` starts, so at most twice that is kept per VM and the
//! latest output is always in `PATH`. Files are created 0600: a console shows what the guest
//! printed, which may be secret.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Size past which the console file is rotated.
pub const ROTATE_AT: u64 = 8 << 20;

/// An append-only console file rotated past a size.
pub struct SerialLog {
    path: PathBuf,
    file: File,
    written: u64,
    limit: u64,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl SerialLog {
    /// Opens (or continues) the console file at `path`, rotated past [`ROTATE_AT`].
    pub fn open(path: &Path) -> io::Result<SerialLog> {
        SerialLog::with_limit(path, ROTATE_AT)
    }

    /// As [`SerialLog::open`] with another rotation size.
    pub fn with_limit(path: &Path, limit: u64) -> io::Result<SerialLog> {
        let file = open(path)?;
        let written = file.metadata()?.len();
        Ok(SerialLog {
            path: path.to_path_buf(),
            file,
            written,
            limit,
        })
    }

    /// The previous part's path.
    pub fn rotated_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".1");
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> io::Result<()> {
        let old = SerialLog::rotated_path(&self.path);
        if let Err(e) = fs::rename(&self.path, &old) {
            // Cannot keep the previous part (the directory went read-only, the file was
            // removed): start the file over rather than let it grow.
            tracing::warn!(path = %self.path.display(), error = %e, "console log not rotated; truncating it");
            self.file.set_len(0)?;
            self.written = 0;
            return Ok(());
        }
        self.file = open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for SerialLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written >= self.limit {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn rotates_past_the_limit_keeping_the_latest_output_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = SerialLog::with_limit(&path, 100).unwrap();
        let mut all = Vec::new();
        for i in 0..1000u32 {
            let line = format!("line {i}\n");
            log.write_all(line.as_bytes()).unwrap();
            all.extend_from_slice(line.as_bytes());
        }
        let current = fs::read(&path).unwrap();
        let previous = fs::read(SerialLog::rotated_path(&path)).unwrap();
        assert!(current.len() <= 100 + 9, "{}", current.len());
        assert!(previous.len() <= 100 + 9, "{}", previous.len());
        // Nothing lost across the cut: the two parts are the end of what was written.
        let kept = [previous, current].concat();
        assert!(all.ends_with(&kept), "the parts are not the latest output");
        assert!(String::from_utf8(kept).unwrap().ends_with("line 999\n"));
        for p in [path.clone(), SerialLog::rotated_path(&path)] {
            let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    #[test]
    fn an_existing_file_counts_toward_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        fs::write(&path, vec![b'x'; 150]).unwrap();
        let mut log = SerialLog::with_limit(&path, 100).unwrap();
        log.write_all(b"new\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        assert_eq!(fs::read(SerialLog::rotated_path(&path)).unwrap().len(), 150);
    }

    #[test]
    fn a_part_that_cannot_be_kept_starts_the_file_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        // A directory where the previous part should go: the rename fails.
        fs::create_dir(SerialLog::rotated_path(&path)).unwrap();
        fs::write(SerialLog::rotated_path(&path).join("keep"), b"x").unwrap();
        let mut log = SerialLog::with_limit(&path, 10).unwrap();
        log.write_all(b"0123456789").unwrap();
        log.write_all(b"abc").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abc");
    }
}
