//! Asynchronous data transfers through io_uring: reads and writes go straight between the image
//! file and guest memory (readv/writev on iovecs that point into guest RAM), many in flight,
//! and completions arrive on an eventfd the caller's epoll watches.
//!
//! io_uring operations run in the kernel outside a seccomp filter's view, so the ring is locked
//! down before first use: it serves readv and writev only, only on the disk's file (registered
//! as the ring's one fixed file; IOSQE_FIXED_FILE required), and takes no further registration.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::register::Restriction;
use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::engine::Done;
use crate::io::Io;

/// One operation on the ring: one transfer, or several that continue one another on disk.
struct InFlight<T> {
    members: Vec<(T, Io)>,
    len: u64,
    /// The kernel reads these while the operation runs; they live here until it completes.
    iovecs: Vec<libc::iovec>,
}

/// An io_uring instance serving one disk file.
pub struct Uring<T> {
    ring: IoUring,
    completions: EventFd,
    slots: Vec<Option<InFlight<T>>>,
    free: Vec<usize>,
    unsubmitted: usize,
}

// SAFETY: the iovec pointers refer to guest memory, which is mapped for the life of the VM and
// valid from any thread; the tags are Send; nothing else in `Uring` is tied to the creating
// thread.
unsafe impl<T: Send> Send for Uring<T> {}

impl<T> Uring<T> {
    /// A ring with room for `depth` transfers in flight on `fd`, restricted to readv and writev
    /// on that file.
    pub fn new(fd: RawFd, depth: u32) -> io::Result<Self> {
        // Created disabled: restrictions can only be registered before the ring is enabled.
        let ring = IoUring::builder().setup_r_disabled().build(depth)?;
        let completions = EventFd::new(libc::EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_eventfd(completions.as_raw_fd())?;
        submitter.register_files(&[fd])?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            completions,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// The eventfd signalled when transfers complete.
    pub fn completion_fd(&self) -> RawFd {
        self.completions.as_raw_fd()
    }

    /// Number of operations in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues one transfer; it is handed back when the ring is full or a buffer cannot be
    /// mapped (the caller then runs it synchronously).
    pub fn push(&mut self, mem: &GuestMemoryMmap, tag: T, io: Io) -> Result<(), (T, Io)> {
        self.push_run(mem, vec![(tag, io)])
            .map_err(|mut run| run.pop().expect("one transfer"))
    }

    /// Queues a run from [`crate::merge_runs`] as one operation; the run is handed back when
    /// the ring is full or a buffer cannot be mapped.
    pub fn push_run(
        &mut self,
        mem: &GuestMemoryMmap,
        run: Vec<(T, Io)>,
    ) -> Result<(), Vec<(T, Io)>> {
        let Some(first) = run.first().map(|(_, io)| (io.write, io.offset)) else {
            return Ok(());
        };
        let Some(slot) = self.free.pop() else {
            return Err(run);
        };
        let mut iovecs = Vec::with_capacity(run.iter().map(|(_, io)| io.segments.len()).sum());
        for (addr, len) in run.iter().flat_map(|(_, io)| io.segments.iter()) {
            match mem.get_slice(*addr, *len as usize) {
                Ok(s) => iovecs.push(libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len(),
                }),
                Err(_) => {
                    self.free.push(slot);
                    return Err(run);
                }
            }
        }
        let (write, offset) = first;
        // The ring's one registered file: the disk's.
        let fd = types::Fixed(0);
        let entry = if write {
            opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the iovecs and the guest memory they point to stay valid until the completion
        // for `slot` is reaped: the iovecs are stored in the slot, guest memory lives as long as
        // the VM, and `drain` waits for every operation before the engine is dropped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err(run);
        }
        let len = run.iter().map(|(_, io)| u64::from(io.len)).sum();
        self.slots[slot] = Some(InFlight {
            members: run,
            len,
            iovecs,
        });
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands queued transfers to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Collects finished transfers. Short transfers are errors: the caller checked that each
    /// lies inside the disk, so a short count means the file shrank or the device failed.
    pub fn reap(&mut self) -> Vec<Done<T>> {
        let _ = self.completions.read();
        let mut done = Vec::new();
        let finished: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in finished {
            let Some(op) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot as usize);
            drop(op.iovecs);
            for (tag, io) in op.members {
                // A merged operation succeeds or fails as a whole.
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else if res as u64 != op.len {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {res} of {} bytes", op.len),
                    ))
                } else {
                    Ok(())
                };
                done.push(Done { tag, io, result });
            }
        }
        done
    }

    /// Waits for every transfer in flight and returns them.
    pub fn drain(&mut self) -> Vec<Done<T>> {
        let mut all = Vec::new();
        let _ = self.submit();
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("block: io_uring wait: {e}");
                    break;
                }
            }
            all.extend(self.reap());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::outcome;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reads_and_writes_complete_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut ring = Uring::new(file.as_raw_fd(), 8).expect("io_uring on this kernel");
        let t = |write: bool, offset: u64, addr: u64| Io {
            write,
            offset,
            segments: vec![
                (GuestAddress(addr), 512),
                (GuestAddress(addr + 0x1000), 512),
            ],
            len: 1024,
        };
        ring.push(&mem, (0, 7), t(false, 2048, 0x10000)).unwrap();
        mem.write_slice(&[0xcc; 512], GuestAddress(0x20000))
            .unwrap();
        mem.write_slice(&[0xdd; 512], GuestAddress(0x21000))
            .unwrap();
        ring.push(&mem, (1, 9), t(true, 8192, 0x20000)).unwrap();
        assert_eq!(ring.in_flight(), 2);
        let mut done: Vec<_> = ring.drain().iter().map(outcome).collect();
        done.sort_by_key(|d| d.1);
        assert_eq!(done, vec![(0, 7, 0, 1024), (1, 9, 0, 0)]);
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x11000)).unwrap();
        assert_eq!(back, data[2560..3072]);
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[8192..8704].iter().all(|b| *b == 0xcc));
        assert!(on_disk[8704..9216].iter().all(|b| *b == 0xdd));
        // Reading past the end of the file is a short transfer: an error status.
        ring.push(&mem, (0, 1), t(false, 16384 - 512, 0x10000))
            .unwrap();
        let done = ring.drain();
        assert_eq!(outcome(&done[0]).2, 1);
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn the_ring_serves_nothing_but_readv_and_writev_on_its_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = std::fs::File::create(dir.path().join("d.raw")).unwrap();
        let other = std::fs::File::create(dir.path().join("other")).unwrap();
        let mut ring: Uring<()> = Uring::new(disk.as_raw_fd(), 4).unwrap();
        let mut buf = [0u8; 16];
        let path = c"/etc/hostname";
        let refused = [
            // Another descriptor of the process, not the registered one.
            opcode::Write::new(types::Fd(other.as_raw_fd()), buf.as_ptr(), 16).build(),
            // Another operation on the registered file.
            opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 16).build(),
            // What a seccomp filter would have stopped: opening a file.
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build(),
        ];
        for (i, sqe) in refused.iter().enumerate() {
            // SAFETY: the buffers and path outlive the submission, which is waited for below.
            unsafe {
                ring.ring
                    .submission()
                    .push(&sqe.clone().user_data(i as u64))
            }
            .unwrap();
            ring.ring.submit_and_wait(1).unwrap();
            let cqe = ring.ring.completion().next().unwrap();
            assert_eq!(cqe.result(), -libc::EACCES, "operation {i} was not refused");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("other")).unwrap().len(),
            0
        );
    }

    #[test]
    fn a_merged_run_is_one_operation_with_one_completion_per_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut ring = Uring::new(file.as_raw_fd(), 4).expect("io_uring on this kernel");
        let t = |offset: u64, addr: u64| Io {
            write: false,
            offset,
            segments: vec![(GuestAddress(addr), 1024)],
            len: 1024,
        };
        let runs = crate::merge_runs(
            vec![((0, 5), t(1024, 0x10000)), ((0, 6), t(2048, 0x20000))],
            crate::MAX_IOVECS,
        );
        assert_eq!(runs.len(), 1);
        for run in runs {
            ring.push_run(&mem, run).unwrap();
        }
        assert_eq!(ring.in_flight(), 1);
        let done = ring.drain();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| {
            let (_, _, status, written) = outcome(d);
            status == 0 && written == 1024
        }));
        let mut a = vec![0u8; 1024];
        mem.read_slice(&mut a, GuestAddress(0x20000)).unwrap();
        assert_eq!(a, data[2048..3072]);
    }

    #[test]
    fn a_full_ring_hands_transfers_back() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        let mut ring = Uring::new(file.as_raw_fd(), 1).expect("io_uring on this kernel");
        let t = || Io {
            write: false,
            offset: 0,
            segments: vec![(GuestAddress(0), 512)],
            len: 512,
        };
        ring.push(&mem, (0, 0), t()).unwrap();
        assert!(ring.push(&mem, (0, 1), t()).is_err());
        assert_eq!(ring.drain().len(), 1);
        ring.push(&mem, (0, 1), t()).unwrap();
        assert_eq!(ring.drain().len(), 1);
    }
}
