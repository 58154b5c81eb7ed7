//! Disk backends behind one trait: the block device calls these with guest memory slices and
//! byte offsets, and knows nothing of file formats. The raw-file backend is here; qcow2 plugs in
//! behind the same trait (`super::qcow`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vm_memory::VolatileSlice;

/// A disk image.
pub trait DiskBackend: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Drops the contents of a range (reads return zeroes afterwards).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Zeroes a range; `unmap` allows freeing the space instead of writing zeroes.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Called once when the VM ends: makes the image consistent for other tools (qcow2 hands
    /// back clusters reserved for writes that never came).
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// A file descriptor whose byte offsets are disk offsets, when there is one (raw images):
    /// the device may then run transfers on it asynchronously. Formats that map offsets
    /// (qcow2) return None and are served through the calls above.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
    /// A handle that serves reads and writes from many threads at once, when the disk has one:
    /// without a file descriptor for io_uring, this is how the device keeps more than one
    /// transfer in flight. Disks that return None serve transfers one at a time.
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentDisk>> {
        None
    }
}

/// Reads and writes that many threads may run at once on one disk (the counterpart of
/// [`DiskBackend::read_at`]/[`DiskBackend::write_at`] for the thread-pool engine).
pub trait ConcurrentDisk: Send + Sync {
    /// Fills `bufs`, in order, from the disk starting at `offset`.
    fn read_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes `bufs`, in order, to the disk starting at `offset`.
    fn write_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
}

/// A raw image file.
pub struct RawFile {
    file: File,
    size: u64,
}

impl RawFile {
    /// Opens `path`; `direct` bypasses the host page cache (O_DIRECT).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

/// Runs `op` (a pread or pwrite of `len` bytes at `ptr` and file offset `off`) until the whole
/// slice is done, retrying short transfers and EINTR.
fn transfer_all(
    mut ptr: *mut u8,
    mut len: usize,
    mut off: u64,
    op: impl Fn(*mut u8, usize, u64) -> isize,
) -> io::Result<()> {
    while len > 0 {
        let n = op(ptr, len, off);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer at end of file",
            ));
        }
        let n = n as usize;
        // SAFETY: n <= len, so the pointer stays inside the slice being transferred.
        ptr = unsafe { ptr.add(n) };
        len -= n;
        off += n as u64;
    }
    Ok(())
}

impl DiskBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, mut offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for buf in bufs {
            let guard = buf.ptr_guard_mut();
            transfer_all(guard.as_ptr(), buf.len(), offset, |p, l, o| {
                // SAFETY: `p..p+l` lies in the guest memory slice `buf`, kept mapped by `guard`
                // for the duration of the call; the kernel writes at most `l` bytes there.
                unsafe { libc::pread64(fd, p.cast(), l, o as i64) }
            })?;
            offset += buf.len() as u64;
        }
        Ok(())
    }

    fn write_at(&mut self, mut offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        for buf in bufs {
            let guard = buf.ptr_guard();
            transfer_all(guard.as_ptr() as *mut u8, buf.len(), offset, |p, l, o| {
                // SAFETY: `p..p+l` lies in the guest memory slice `buf`, kept mapped by `guard`;
                // the kernel only reads from it.
                unsafe { libc::pwrite64(fd, p.cast_const().cast(), l, o as i64) }
            })?;
            offset += buf.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE (or hole punching) still get zeroes, the slow way.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeroes = vec![0u8; 64 << 10];
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    transfer_all(zeroes.as_ptr() as *mut u8, n, offset + done, |p, l, o| {
                        // SAFETY: `p..p+l` lies in `zeroes`, which outlives the call; the kernel
                        // only reads from it.
                        unsafe {
                            libc::pwrite64(
                                self.file.as_raw_fd(),
                                p.cast_const().cast(),
                                l,
                                o as i64,
                            )
                        }
                    })?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// A disk held in memory: for tests and fuzzing of the layers above.
#[derive(Clone, Debug, Default)]
pub struct MemoryDisk {
    /// The disk's bytes.
    pub data: Vec<u8>,
    /// Whether a flush was requested.
    pub flushed: bool,
}

impl MemoryDisk {
    /// A disk with these contents.
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            flushed: false,
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.data.len() as u64)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the disk")
            })?;
        Ok(offset as usize..end as usize)
    }
}

impl DiskBackend for MemoryDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            let r = self.range(off, b.len() as u64)?;
            b.copy_from(&self.data[r]);
            off += b.len() as u64;
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            let r = self.range(off, b.len() as u64)?;
            b.copy_to(&mut self.data[r]);
            off += b.len() as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flushed = true;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.data[r].fill(0);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.discard(offset, len)
    }
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
    let r = unsafe { libc::fallocate64(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn image(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        File::create(&p).unwrap().write_all(bytes).unwrap();
        (dir, p)
    }

    #[test]
    fn scattered_reads_and_writes_round_trip() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let (_d, p) = image(&data);
        let mut disk = RawFile::open(&p, false, false).unwrap();
        assert_eq!(disk.size(), 8192);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let a = mem.get_slice(GuestAddress(0x1000), 100).unwrap();
        let b = mem.get_slice(GuestAddress(0x9000), 412).unwrap();
        disk.read_at(512, &[a, b]).unwrap();
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back[..100], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut back[100..], GuestAddress(0x9000))
            .unwrap();
        assert_eq!(back, data[512..1024]);

        mem.write_slice(&[0xab; 512], GuestAddress(0x2000)).unwrap();
        let s = mem.get_slice(GuestAddress(0x2000), 512).unwrap();
        disk.write_at(4096, &[s]).unwrap();
        disk.flush().unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert!(on_disk[4096..4608].iter().all(|b| *b == 0xab));
        assert_eq!(on_disk[..4096], data[..4096]);
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (_d, p) = image(&[0x5a; 1 << 16]);
        let mut disk = RawFile::open(&p, false, false).unwrap();
        disk.discard(4096, 4096).unwrap();
        disk.write_zeroes(16384, 8192, false).unwrap();
        disk.write_zeroes(32768, 4096, true).unwrap();
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(on_disk.len(), 1 << 16, "size is kept");
        assert!(on_disk[4096..8192].iter().all(|b| *b == 0));
        assert!(on_disk[16384..24576].iter().all(|b| *b == 0));
        assert!(on_disk[32768..36864].iter().all(|b| *b == 0));
        assert!(on_disk[..4096].iter().all(|b| *b == 0x5a));
        assert!(on_disk[24576..32768].iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn reads_past_the_end_fail_and_read_only_files_refuse_writes() {
        let (_d, p) = image(&[1; 1024]);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut disk = RawFile::open(&p, true, false).unwrap();
        let s = mem.get_slice(GuestAddress(0), 512).unwrap();
        assert!(disk.read_at(768, &[s]).is_err());
        let s = mem.get_slice(GuestAddress(0), 512).unwrap();
        assert!(disk.write_at(0, &[s]).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), vec![1; 1024]);
    }
}
