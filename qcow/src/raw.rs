//! Raw image files: guest offsets are file offsets.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::VolatileSlice;

use crate::error::{Error, Result};
use crate::iov;

/// A raw image.
pub struct Raw {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    data: iov::DataFile,
    size: AtomicU64,
    writable: bool,
}

impl Raw {
    /// Wraps an open file.
    pub fn open(path: &Path, file: File, data: iov::DataFile, writable: bool) -> Result<Raw> {
        let size = file.metadata().map_err(Error::io(path))?.len();
        Ok(Raw {
            path: path.to_path_buf(),
            file,
            data,
            size: AtomicU64::new(size),
            writable,
        })
    }

    /// The descriptor guest data goes through: the O_DIRECT one when the image was opened
    /// direct, else the file itself. Its offsets are disk offsets.
    pub fn data_fd(&self) -> std::os::fd::RawFd {
        self.data.direct.as_ref().unwrap_or(&self.file).as_raw_fd()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Reads at `off`.
    pub fn read(&self, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.data
            .read(&self.file, bufs, off)
            .map_err(Error::io(&self.path))
    }

    /// Writes at `off`.
    pub fn write(&self, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        if !self.writable {
            return Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path.display()
            )));
        }
        self.data
            .write(&self.file, bufs, off)
            .map_err(Error::io(&self.path))
    }

    /// fdatasync.
    pub fn flush(&self) -> Result<()> {
        if self.writable {
            self.file.sync_data().map_err(Error::io(&self.path))?;
        }
        Ok(())
    }

    /// Zeroes (or deallocates, when `unmap`) a range; falls back to writing zeroes.
    pub fn zero(&self, off: u64, len: u64, unmap: bool) -> Result<()> {
        if !self.writable {
            return Err(Error::Invalid(format!(
                "{}: image is open read-only",
                self.path.display()
            )));
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(zeroes.len() as u64) as usize;
            iov::pwrite(&self.file, &zeroes[..n], off + pos).map_err(Error::io(&self.path))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Sets the file length.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.file.set_len(new_size).map_err(Error::io(&self.path))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Data (false) and hole (true = zero) extents of `off..off+len`, from SEEK_DATA/SEEK_HOLE.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let fd = self.file.as_raw_fd();
        let end = off + len;
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut pos = off;
        while pos < end {
            // SAFETY: plain lseek on an fd we own.
            let data = unsafe { libc::lseek64(fd, pos as i64, libc::SEEK_DATA) };
            let data = if data < 0 {
                end
            } else {
                (data as u64).min(end)
            };
            if data > pos {
                out.push((data - pos, true));
                pos = data;
                continue;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek64(fd, pos as i64, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let hole = hole.max(pos + 1).min(end);
            out.push((hole - pos, false));
            pos = hole;
        }
        Ok(out)
    }
}
