//! Every image file a VM can have, raw or qcow2 (with its backing chain), served through the
//! `qcow` crate: one implementation of each format for the whole project. Every image call takes
//! `&self` and may run on many threads at once, so a qcow2 image also serves the thread-pool
//! engine's concurrent transfers ([`ConcurrentDisk`]); a raw image offers its file to io_uring.

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use qcow::{Format, Image, OpenOptions};
use vm_memory::VolatileSlice;

use crate::backend::{ConcurrentDisk, DiskBackend};

/// The block layer speaks io::Error; the message keeps the image's own explanation (which file
/// of the chain, what is wrong with it).
fn to_io(e: qcow::Error) -> io::Error {
    let kind = match &e {
        qcow::Error::Io { err, .. } => err.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

/// An image serving a disk device.
pub struct ImageDisk {
    image: Arc<Image>,
}

impl ImageDisk {
    /// Opens the image at `path` as `format` (probed from its header when None), writable
    /// unless `read_only`; `direct` bypasses the host page cache (O_DIRECT). A qcow2 image's
    /// backing chain is opened read-only.
    pub fn open(
        path: &Path,
        format: Option<Format>,
        read_only: bool,
        direct: bool,
    ) -> qcow::Result<Self> {
        let opts = OpenOptions {
            writable: !read_only,
            format,
            direct,
            hook: None,
        };
        Ok(Self::new(Arc::new(Image::open(path, &opts)?)))
    }

    /// Serves an image opened elsewhere.
    pub fn new(image: Arc<Image>) -> Self {
        Self { image }
    }

    /// The image's format.
    pub fn format(&self) -> Format {
        self.image.format()
    }
}

impl ConcurrentDisk for Image {
    fn read_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.read_vectored(offset, bufs).map_err(to_io)
    }

    fn write_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.write_vectored(offset, bufs).map_err(to_io)
    }
}

impl DiskBackend for ImageDisk {
    fn size(&self) -> u64 {
        self.image.size()
    }

    fn read_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        ConcurrentDisk::read_at(self.image.as_ref(), offset, bufs)
    }

    fn write_at(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        ConcurrentDisk::write_at(self.image.as_ref(), offset, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.flush().map_err(to_io)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len).map_err(to_io)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.image.write_zeroes(offset, len, unmap).map_err(to_io)
    }

    fn close(&mut self) -> io::Result<()> {
        self.image.release().map_err(to_io)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.image.raw_data_fd()
    }

    /// Only qcow2: a raw image's transfers go through io_uring on its file instead.
    fn concurrent(&self) -> Option<Arc<dyn ConcurrentDisk>> {
        match self.image.format() {
            Format::Qcow2 => Some(self.image.clone()),
            Format::Raw => None,
        }
    }
}

#[cfg(test)]
mod raw_tests {
    use super::*;
    use std::fs::File;
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
        let mut disk = ImageDisk::open(&p, Some(Format::Raw), false, false).unwrap();
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
        let mut disk = ImageDisk::open(&p, Some(Format::Raw), false, false).unwrap();
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
        let mut disk = ImageDisk::open(&p, Some(Format::Raw), true, false).unwrap();
        let s = mem.get_slice(GuestAddress(0), 512).unwrap();
        assert!(disk.read_at(768, &[s]).is_err());
        let s = mem.get_slice(GuestAddress(0), 512).unwrap();
        assert!(disk.write_at(0, &[s]).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), vec![1; 1024]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Io;
    use crate::pool::Pool;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn concurrent_writes_through_the_pool_land_and_leave_the_image_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        let opts = qcow::CreateOptions {
            size: Some(64 << 20),
            cluster_size: 4096,
            ..Default::default()
        };
        qcow::create(&path, &opts).unwrap();
        let disk = ImageDisk::open(&path, Some(Format::Qcow2), false, false).unwrap();
        let mut pool = Pool::new(disk.concurrent().unwrap(), 8).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        // 256 writes of 4 KiB, each from its own page with its own pattern, scattered so that
        // neighbours in time allocate clusters (and L2 tables) far apart on the disk.
        let offset = |i: u64| (i * 37 % 256) * (256 << 10) + (i % 3) * 4096;
        for i in 0..256u64 {
            mem.write_slice(&[i as u8; 4096], GuestAddress(i * 4096))
                .unwrap();
            let t = Io {
                write: true,
                offset: offset(i),
                segments: vec![(GuestAddress(i * 4096), 4096)],
                len: 4096,
            };
            pool.push_run(&mem, vec![(i as u16, t)]);
        }
        let done = pool.drain();
        assert_eq!(done.len(), 256);
        assert!(done.iter().all(|d| d.result.is_ok()));
        drop(pool);
        let image = Arc::try_unwrap(disk.image).ok().expect("the pool let go");
        image.close().unwrap();

        let report = qcow::check(&path, false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let image = Image::open(&path, &OpenOptions::default()).unwrap();
        let mut back = vec![0u8; 4096];
        for i in 0..256u64 {
            image.read_at(offset(i), &mut back).unwrap();
            assert!(back.iter().all(|b| *b == i as u8), "write {i}");
        }
    }

    #[test]
    fn concurrent_partial_writes_into_one_new_cluster_over_a_backing_file_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0xeeu8; 1 << 20]).unwrap();
        let path = dir.path().join("top.qcow2");
        let opts = qcow::CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        };
        qcow::create(&path, &opts).unwrap();
        let disk = ImageDisk::open(&path, Some(Format::Qcow2), false, false).unwrap();
        let mut pool = Pool::new(disk.concurrent().unwrap(), 8).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Every other sector of the first two 64 KiB clusters, each write racing the others to
        // allocate (and copy the backing data into) the same cluster.
        let sectors: Vec<u64> = (0..256).step_by(2).collect();
        for (i, s) in sectors.iter().enumerate() {
            mem.write_slice(&[i as u8; 512], GuestAddress(*s * 512))
                .unwrap();
            let t = Io {
                write: true,
                offset: s * 512,
                segments: vec![(GuestAddress(s * 512), 512)],
                len: 512,
            };
            pool.push_run(&mem, vec![(i as u16, t)]);
        }
        let done = pool.drain();
        assert!(done.len() == sectors.len() && done.iter().all(|d| d.result.is_ok()));
        drop(pool);
        let image = Arc::try_unwrap(disk.image).ok().expect("the pool let go");
        image.close().unwrap();

        let report = qcow::check(&path, false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let image = Image::open(&path, &OpenOptions::default()).unwrap();
        let mut back = vec![0u8; 128 << 10];
        image.read_at(0, &mut back).unwrap();
        for (n, sector) in back.chunks(512).enumerate() {
            let want = if n % 2 == 0 { (n / 2) as u8 } else { 0xee };
            assert!(sector.iter().all(|b| *b == want), "sector {n}");
        }
    }
}
