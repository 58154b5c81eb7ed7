//! qcow2 images (with their backing chains), opened through the `qcow` crate, as a disk backend.
//! Every image call takes `&self` and may run on many threads at once, so the same image also
//! serves the thread-pool engine's concurrent transfers ([`ConcurrentDisk`]).

use std::io;
use std::path::Path;
use std::sync::Arc;

use qcow::{Format, Image, OpenOptions};
use vm_memory::VolatileSlice;

use super::backend::{ConcurrentDisk, DiskBackend};

/// The block layer speaks io::Error; the message keeps the image's own explanation (which file
/// of the chain, what is wrong with it).
fn to_io(e: qcow::Error) -> io::Error {
    let kind = match &e {
        qcow::Error::Io { err, .. } => err.kind(),
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e.to_string())
}

/// A qcow2 image (with its backing chain) serving a virtio-blk device.
pub struct ImageDisk {
    image: Arc<Image>,
}

impl ImageDisk {
    /// Opens the qcow2 image at `path`, writable unless `read_only`; `direct` bypasses the host
    /// page cache (O_DIRECT).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> qcow::Result<Self> {
        let opts = OpenOptions {
            writable: !read_only,
            format: Some(Format::Qcow2),
            direct,
        };
        Ok(Self::new(Arc::new(Image::open(path, &opts)?)))
    }

    /// Serves an image opened elsewhere.
    pub fn new(image: Arc<Image>) -> Self {
        Self { image }
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

    fn concurrent(&self) -> Option<Arc<dyn ConcurrentDisk>> {
        Some(self.image.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::pool::Pool;
    use crate::devices::virtio::block::request::Transfer;
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
        let disk = ImageDisk::open(&path, false, false).unwrap();
        let mut pool = Pool::new(disk.concurrent().unwrap(), 8).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        // 256 writes of 4 KiB, each from its own page with its own pattern, scattered so that
        // neighbours in time allocate clusters (and L2 tables) far apart on the disk.
        let offset = |i: u64| (i * 37 % 256) * (256 << 10) + (i % 3) * 4096;
        for i in 0..256u64 {
            mem.write_slice(&[i as u8; 4096], GuestAddress(i * 4096))
                .unwrap();
            let t = Transfer {
                write: true,
                offset: offset(i),
                segments: vec![(GuestAddress(i * 4096), 4096)],
                len: 4096,
                status: GuestAddress(0x10_0000),
            };
            pool.push_run(&mem, 0, vec![(i as u16, t)]);
        }
        let done = pool.drain();
        assert_eq!(done.len(), 256);
        assert!(done.iter().all(|d| d.completion.status == 0));
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
        let disk = ImageDisk::open(&path, false, false).unwrap();
        let mut pool = Pool::new(disk.concurrent().unwrap(), 8).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // Every other sector of the first two 64 KiB clusters, each write racing the others to
        // allocate (and copy the backing data into) the same cluster.
        let sectors: Vec<u64> = (0..256).step_by(2).collect();
        for (i, s) in sectors.iter().enumerate() {
            mem.write_slice(&[i as u8; 512], GuestAddress(*s * 512))
                .unwrap();
            let t = Transfer {
                write: true,
                offset: s * 512,
                segments: vec![(GuestAddress(s * 512), 512)],
                len: 512,
                status: GuestAddress(0xf_0000),
            };
            pool.push_run(&mem, 0, vec![(i as u16, t)]);
        }
        let done = pool.drain();
        assert!(done.len() == sectors.len() && done.iter().all(|d| d.completion.status == 0));
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
