//! Opening any disk image: the one entry point devices use. Without an explicit format the
//! header decides, and a file with a qcow2 header is never served raw unless the caller asked
//! for raw: a guest given raw access to qcow2 metadata could rewrite the header, backing file
//! name included, and so read any file on the host.

use std::path::Path;

use qcow::Format;

use crate::backend::DiskBackend;
use crate::image::ImageDisk;

/// Error opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The image (or its backing chain) is unusable, or the host failed reading it.
    #[error(transparent)]
    Image(#[from] qcow::Error),
}

impl OpenError {
    /// True when the image itself is at fault (malformed, unsupported, broken backing chain, not
    /// the format asked for) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            OpenError::Image(e) => e.is_bad_input(),
        }
    }
}

/// Opens the image at `path` as `format`, or as what its header says when `format` is None.
pub fn open_disk(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    direct: bool,
) -> Result<Box<dyn DiskBackend>, OpenError> {
    Ok(Box::new(ImageDisk::open(path, format, read_only, direct)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    fn qcow2(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
        let path = dir.join(name);
        let opts = qcow::CreateOptions {
            size: Some(size),
            ..Default::default()
        };
        qcow::create(&path, &opts).unwrap();
        path
    }

    #[test]
    fn the_header_picks_the_backend_unless_a_format_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("d.raw");
        std::fs::write(&raw, vec![7u8; 1 << 16]).unwrap();
        let q = qcow2(dir.path(), "d.qcow2", 1 << 30);

        let disk = open_disk(&raw, None, false, false).unwrap();
        assert!(disk.raw_fd().is_some() && disk.concurrent().is_none());
        assert_eq!(disk.size(), 1 << 16);

        let disk = open_disk(&q, None, false, false).unwrap();
        assert!(disk.raw_fd().is_none() && disk.concurrent().is_some());
        assert_eq!(disk.size(), 1 << 30, "the virtual size, not the file's");

        // Asked for explicitly, a qcow2 file is served raw: its header is the first bytes. (The
        // writer above holds the image's lock until it is closed.)
        drop(disk);
        let mut disk = open_disk(&q, Some(Format::Raw), true, false).unwrap();
        assert!(disk.raw_fd().is_some());
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        disk.read_at(0, &[mem.get_slice(GuestAddress(0), 512).unwrap()])
            .unwrap();
        let mut magic = [0u8; 4];
        mem.read_slice(&mut magic, GuestAddress(0)).unwrap();
        assert_eq!(&magic, b"QFI\xfb");

        // A raw file is not a qcow2 image.
        let e = open_disk(&raw, Some(Format::Qcow2), false, false)
            .err()
            .expect("raw opened as qcow2");
        assert!(e.is_bad_input(), "{e}");
    }

    #[test]
    fn qcow2_reads_and_writes_round_trip_through_both_interfaces() {
        let dir = tempfile::tempdir().unwrap();
        let q = qcow2(dir.path(), "d.qcow2", 4 << 20);
        let mut disk = open_disk(&q, None, false, false).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let fresh = mem.get_slice(GuestAddress(0x1000), 4096).unwrap();
        mem.write_slice(&[0x55; 4096], GuestAddress(0x1000))
            .unwrap();
        disk.read_at(1 << 20, &[fresh]).unwrap();
        let mut back = vec![1u8; 4096];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert!(
            back.iter().all(|b| *b == 0),
            "unallocated clusters read as zeroes"
        );

        mem.write_slice(&[0xa5; 8192], GuestAddress(0x4000))
            .unwrap();
        let a = mem.get_slice(GuestAddress(0x4000), 4096).unwrap();
        let b = mem.get_slice(GuestAddress(0x5000), 4096).unwrap();
        disk.write_at(65536 - 4096, &[a, b]).unwrap();
        disk.flush().unwrap();
        let concurrent = disk.concurrent().unwrap();
        let out = mem.get_slice(GuestAddress(0x8000), 8192).unwrap();
        concurrent.read_at(65536 - 4096, &[out]).unwrap();
        let mut back = vec![0u8; 8192];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert!(back.iter().all(|b| *b == 0xa5));

        // Zeroes written into part of a cluster; a whole cluster discarded (qcow2 can only drop
        // whole clusters: a partial discard may leave the data, which virtio allows).
        disk.write_zeroes(65536 - 4096, 4096, false).unwrap();
        disk.discard(65536, 65536).unwrap();
        concurrent.read_at(65536 - 4096, &[out]).unwrap();
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        // Past the end: an error, not a panic.
        let s = mem.get_slice(GuestAddress(0), 512).unwrap();
        assert!(disk.read_at(4 << 20, &[s]).is_err());
    }
}
