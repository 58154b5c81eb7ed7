//! Scatter-gather buffers (guest memory as `VolatileSlice`s) and positioned vectored I/O on
//! them, so guest data moves between image files and guest RAM without bounce copies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::{Bytes, VolatileSlice};

/// Most iovecs one preadv/pwritev takes.
const IOV_MAX: usize = 1024;

/// A byte range over an ordered list of buffers.
#[derive(Clone, Copy)]
pub struct Bufs<'s, 'a> {
    slices: &'s [VolatileSlice<'a>],
}

impl<'s, 'a> Bufs<'s, 'a> {
    /// The buffers, in order.
    pub fn new(slices: &'s [VolatileSlice<'a>]) -> Self {
        Self { slices }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.slices.iter().map(|s| s.len() as u64).sum()
    }

    /// The slices covering bytes `off..off+len`.
    pub fn sub(&self, mut off: u64, mut len: u64) -> Vec<VolatileSlice<'a>> {
        let mut out = Vec::new();
        for s in self.slices {
            if len == 0 {
                break;
            }
            let sl = s.len() as u64;
            if off >= sl {
                off -= sl;
                continue;
            }
            let take = (sl - off).min(len);
            out.push(
                s.subslice(off as usize, take as usize)
                    .expect("range inside the slice"),
            );
            len -= take;
            off = 0;
        }
        out
    }

    /// Fills bytes `off..off+len` with zeroes.
    pub fn zero(&self, off: u64, len: u64) {
        const Z: [u8; 4096] = [0; 4096];
        for s in self.sub(off, len) {
            let mut done = 0;
            while done < s.len() {
                let n = (s.len() - done).min(Z.len());
                // The range is in bounds by construction.
                let _ = s.write_slice(&Z[..n], done);
                done += n;
            }
        }
    }

    /// Copies `data` into bytes `off..off+data.len()`.
    pub fn copy_in(&self, off: u64, data: &[u8]) {
        let mut done = 0;
        for s in self.sub(off, data.len() as u64) {
            let _ = s.write_slice(&data[done..done + s.len()], 0);
            done += s.len();
        }
    }

    /// Copies bytes `off..off+out.len()` into `out`.
    pub fn copy_out(&self, off: u64, out: &mut [u8]) {
        let mut done = 0;
        for s in self.sub(off, out.len() as u64) {
            let n = s.len();
            let _ = s.read_slice(&mut out[done..done + n], 0);
            done += n;
        }
    }
}

/// A `VolatileSlice` over a byte buffer we own.
pub fn slice_of(buf: &mut [u8]) -> VolatileSlice<'_> {
    VolatileSlice::from(buf)
}

/// A `VolatileSlice` over a byte buffer that will only be read from (written to a file).
pub fn slice_of_ro(buf: &[u8]) -> VolatileSlice<'_> {
    // SAFETY: the slice covers exactly `buf`, which outlives it; every user of the returned
    // slice in this crate only reads through it (it is the source of a write to a file).
    unsafe { VolatileSlice::new(buf.as_ptr() as *mut u8, buf.len()) }
}

fn iovecs(slices: &[VolatileSlice<'_>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Drops `n` transferred bytes from the front of `v`.
fn advance(v: &mut Vec<libc::iovec>, mut n: usize) {
    let mut drop = 0;
    for iov in v.iter_mut() {
        if n >= iov.iov_len {
            n -= iov.iov_len;
            drop += 1;
        } else {
            // SAFETY: n < iov_len, so the pointer stays inside the buffer.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
            iov.iov_len -= n;
            break;
        }
    }
    v.drain(..drop);
}

/// Reads `slices` from `file` at `off`. Bytes past the end of the file read as zeroes.
pub fn read_exact_at(file: &File, slices: &[VolatileSlice<'_>], mut off: u64) -> io::Result<()> {
    let mut v = iovecs(slices);
    while !v.is_empty() {
        let cnt = v.len().min(IOV_MAX);
        // SAFETY: every iovec points into a live VolatileSlice (guest memory or a buffer of
        // ours) of at least iov_len bytes, valid for writes for the duration of the call.
        let n = unsafe { libc::preadv64(file.as_raw_fd(), v.as_ptr(), cnt as i32, off as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // End of file: the rest reads as zeroes.
            for iov in &v {
                // SAFETY: as above; the buffer is iov_len bytes long.
                unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
            }
            return Ok(());
        }
        off += n as u64;
        advance(&mut v, n as usize);
    }
    Ok(())
}

/// Writes `slices` to `file` at `off`.
pub fn write_all_at(file: &File, slices: &[VolatileSlice<'_>], mut off: u64) -> io::Result<()> {
    let mut v = iovecs(slices);
    while !v.is_empty() {
        let cnt = v.len().min(IOV_MAX);
        // SAFETY: every iovec points into a live buffer of at least iov_len bytes; the kernel
        // only reads from them.
        let n = unsafe { libc::pwritev64(file.as_raw_fd(), v.as_ptr(), cnt as i32, off as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        off += n as u64;
        advance(&mut v, n as usize);
    }
    Ok(())
}

/// Where guest data goes: the image file, and optionally a second descriptor of it opened with
/// O_DIRECT (metadata always goes through the first: its small unaligned writes cannot be
/// O_DIRECT). Transfers the kernel refuses as unaligned fall back to the buffered descriptor.
pub struct DataFile {
    /// The O_DIRECT descriptor, when asked for.
    pub direct: Option<File>,
}

impl DataFile {
    fn run(&self, buffered: &File, op: impl Fn(&File) -> io::Result<()>) -> io::Result<()> {
        if let Some(d) = &self.direct {
            match op(d) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                other => return other,
            }
        }
        op(buffered)
    }

    /// Guest-data read.
    pub fn read(&self, buffered: &File, s: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        self.run(buffered, |f| read_exact_at(f, s, off))
    }

    /// Guest-data write.
    pub fn write(&self, buffered: &File, s: &[VolatileSlice<'_>], off: u64) -> io::Result<()> {
        self.run(buffered, |f| write_all_at(f, s, off))
    }
}

/// Reads into a byte buffer (zeroes past the end of the file).
pub fn pread(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    read_exact_at(file, &[slice_of(buf)], off)
}

/// Writes a byte buffer.
pub fn pwrite(file: &File, buf: &[u8], off: u64) -> io::Result<()> {
    write_all_at(file, &[slice_of_ro(buf)], off)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn vectored_io_spans_buffers_and_zero_fills_past_eof() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&(0..100u8).collect::<Vec<_>>()).unwrap();
        let mut a = [0u8; 30];
        let mut b = [0xffu8; 90];
        {
            let s = [slice_of(&mut a), slice_of(&mut b)];
            read_exact_at(&f, &s, 50).unwrap();
        }
        assert_eq!(a[0], 50);
        assert_eq!(b[0], 80);
        assert_eq!(b[19], 99);
        assert!(b[20..].iter().all(|x| *x == 0));
        let data = [7u8; 10];
        pwrite(&f, &data, 5).unwrap();
        let mut back = [0u8; 12];
        pread(&f, &mut back, 4).unwrap();
        assert_eq!(back, [4, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 15]);
    }

    #[test]
    fn sub_ranges_cross_slices() {
        let mut a = [1u8; 4];
        let mut b = [2u8; 4];
        let s = [slice_of(&mut a), slice_of(&mut b)];
        let bufs = Bufs::new(&s);
        assert_eq!(bufs.len(), 8);
        let sub = bufs.sub(3, 3);
        assert_eq!(sub.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 2]);
        bufs.zero(2, 4);
        let mut out = [9u8; 8];
        bufs.copy_out(0, &mut out);
        assert_eq!(out, [1, 1, 0, 0, 0, 0, 2, 2]);
        bufs.copy_in(1, &[5, 5]);
        bufs.copy_out(0, &mut out);
        assert_eq!(out, [1, 5, 5, 0, 0, 0, 2, 2]);
    }
}
