//! Transfers on a pool of threads, for disks that serve many requests at once but have no file
//! descriptor io_uring could use (qcow2 maps every offset through its metadata). As with the
//! io_uring engine, many transfers are in flight, and finished ones are collected once an
//! eventfd the caller's epoll watches fires.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::backend::ConcurrentDisk;
use crate::engine::Done;
use crate::io::{outside_memory, slices, Io};

/// Threads per disk: enough to keep a guest's queue depth busy on the host's storage, few enough
/// not to crowd a small host.
pub const DEFAULT_THREADS: usize = 8;

/// Stack of each transfer thread: under a huge page, so that a host with transparent huge
/// pages `always` cannot back an idle thread's stack with 2 MiB (as vmm's own threads, see its
/// `threads` module); qcow2 transfers, decompression included, need far less.
const STACK_SIZE: usize = 1 << 20;

/// Called first on every I/O thread (a jailed VMM adds its seccomp filter there).
static THREAD_HOOK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what every I/O thread started from now on runs first; set once per process.
pub fn set_thread_hook(hook: fn()) {
    let _ = THREAD_HOOK.set(hook);
}

/// One unit of work: a run of transfers that continue each other on disk, done in one call.
struct Job<T> {
    mem: GuestMemoryMmap,
    run: Vec<(T, Io)>,
}

struct State<T> {
    /// Unbounded, yet never longer than the device's queues: every transfer keeps its
    /// descriptor chain until it completes, so the driver cannot have more in flight.
    jobs: VecDeque<Job<T>>,
    done: Vec<Done<T>>,
    /// Jobs a thread has taken and not finished yet.
    running: usize,
    closed: bool,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            jobs: VecDeque::new(),
            done: Vec::new(),
            running: 0,
            closed: false,
        }
    }
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when jobs arrive or the pool closes.
    work: Condvar,
    /// Signalled when the last job finishes.
    idle: Condvar,
    completions: EventFd,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock (disk calls run outside it, under catch_unwind),
        // so a poisoned lock still guards consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of threads serving one disk.
pub struct Pool<T> {
    shared: Arc<Shared<T>>,
    threads: Vec<JoinHandle<()>>,
    /// Pushed but not yet handed to the threads (see [`Pool::submit`]).
    pending: Vec<Job<T>>,
    /// Transfers pushed and not yet reaped.
    in_flight: usize,
}

impl<T: Send + 'static> Pool<T> {
    /// Starts `threads` threads (at least one) serving transfers on `disk`.
    pub fn new(disk: Arc<dyn ConcurrentDisk>, threads: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            work: Condvar::new(),
            idle: Condvar::new(),
            completions: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
            pending: Vec::new(),
            in_flight: 0,
        };
        for i in 0..threads.max(1) {
            let shared = pool.shared.clone();
            let disk = disk.clone();
            // On failure, dropping `pool` stops the threads started so far.
            let thread = std::thread::Builder::new()
                .name(format!("blk-io{i}"))
                .stack_size(STACK_SIZE)
                .spawn(move || serve(&shared, disk.as_ref()))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// The eventfd signalled when transfers complete.
    pub fn completion_fd(&self) -> RawFd {
        self.shared.completions.as_raw_fd()
    }

    /// Number of transfers pushed and not reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues a run of transfers that continue each other on disk; one thread serves it with one
    /// call. Nothing starts before [`Pool::submit`].
    pub fn push_run(&mut self, mem: &GuestMemoryMmap, run: Vec<(T, Io)>) {
        if run.is_empty() {
            return;
        }
        self.in_flight += run.len();
        self.pending.push(Job {
            mem: mem.clone(),
            run,
        });
    }

    /// Hands the queued runs to the threads, taking the lock once per batch.
    pub fn submit(&mut self) {
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        self.shared.lock().jobs.extend(self.pending.drain(..));
        if n == 1 {
            self.shared.work.notify_one();
        } else {
            self.shared.work.notify_all();
        }
    }

    /// Collects finished transfers.
    pub fn reap(&mut self) -> Vec<Done<T>> {
        // Read before taking: a completion that lands after the take signals the eventfd again.
        let _ = self.shared.completions.read();
        let done = std::mem::take(&mut self.shared.lock().done);
        self.in_flight -= done.len();
        done
    }

    /// Waits for every transfer pushed so far and returns those not reaped yet. When it returns,
    /// no thread of the pool touches guest memory until more work is pushed.
    pub fn drain(&mut self) -> Vec<Done<T>> {
        self.submit();
        let mut state = self.shared.lock();
        while !state.jobs.is_empty() || state.running > 0 {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
        let done = std::mem::take(&mut state.done);
        drop(state);
        let _ = self.shared.completions.read();
        self.in_flight -= done.len();
        done
    }
}

impl<T> Drop for Pool<T> {
    /// Stops the threads: jobs not started yet are dropped unrun (they never touched guest
    /// memory), jobs running are finished, and every thread is joined before this returns.
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            state.jobs.clear();
        }
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("block: I/O thread panicked");
            }
        }
    }
}

/// A pool thread: takes jobs until the pool closes.
fn serve<T>(shared: &Shared<T>, disk: &dyn ConcurrentDisk) {
    if let Some(hook) = THREAD_HOOK.get() {
        hook();
    }
    let mut state = shared.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            state.running += 1;
            drop(state);
            let done = run_job(disk, job);
            state = shared.lock();
            state.running -= 1;
            // The worker empties `done` right after reading the eventfd, so only the first
            // completion after that needs to wake it.
            if state.done.is_empty() {
                let _ = shared.completions.write(1);
            }
            state.done.extend(done);
            if state.jobs.is_empty() && state.running == 0 {
                shared.idle.notify_all();
            }
        } else if state.closed {
            return;
        } else {
            state = shared.work.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Carries out one job; a run succeeds or fails as a whole, like a merged io_uring operation.
fn run_job<T>(disk: &dyn ConcurrentDisk, job: Job<T>) -> Vec<Done<T>> {
    let Job { mem, run } = job;
    // A backend bug must cost one request an error status, not the thread (which would leave
    // its job in flight forever and hang the next reset).
    let result = catch_unwind(AssertUnwindSafe(|| transfer(disk, &mem, &run)))
        .unwrap_or_else(|_| Err(io::Error::other("disk backend panicked")));
    run.into_iter()
        .map(|(tag, io)| Done {
            tag,
            io,
            result: match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            },
        })
        .collect()
}

fn transfer<T>(
    disk: &dyn ConcurrentDisk,
    mem: &GuestMemoryMmap,
    run: &[(T, Io)],
) -> io::Result<()> {
    let Some((_, first)) = run.first() else {
        return Ok(());
    };
    let bufs =
        slices(mem, run.iter().flat_map(|(_, io)| &io.segments)).ok_or_else(outside_memory)?;
    if first.write {
        disk.write_at(first.offset, &bufs)
    } else {
        disk.read_at(first.offset, &bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tests::{outcome, Tag};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::RwLock;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress, VolatileSlice};
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

    /// An in-memory disk that lets any number of calls run at once, each taking `delay`, and
    /// counts how many overlap.
    struct SlowDisk {
        data: RwLock<Vec<u8>>,
        delay: Duration,
        active: AtomicUsize,
        max_active: AtomicUsize,
        started: AtomicUsize,
        /// Calls at this offset panic (a backend bug).
        panic_at: Option<u64>,
    }

    impl SlowDisk {
        fn new(len: usize, delay: Duration) -> Self {
            Self {
                data: RwLock::new((0..len).map(|i| (i % 251) as u8).collect()),
                delay,
                active: AtomicUsize::new(0),
                max_active: AtomicUsize::new(0),
                started: AtomicUsize::new(0),
                panic_at: None,
            }
        }

        fn enter(&self, offset: u64) {
            assert_ne!(Some(offset), self.panic_at, "injected backend failure");
            self.started.fetch_add(1, Ordering::SeqCst);
            let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_active.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
        }

        fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
            let end = offset as usize + len;
            if end > self.data.read().unwrap().len() {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"));
            }
            Ok(offset as usize..end)
        }
    }

    impl ConcurrentDisk for SlowDisk {
        fn read_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            self.enter(offset);
            let mut off = offset;
            let result = bufs.iter().try_for_each(|b| {
                let r = self.range(off, b.len())?;
                b.copy_from(&self.data.read().unwrap()[r]);
                off += b.len() as u64;
                Ok(())
            });
            self.active.fetch_sub(1, Ordering::SeqCst);
            result
        }

        fn write_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            self.enter(offset);
            let mut off = offset;
            let result = bufs.iter().try_for_each(|b| {
                let r = self.range(off, b.len())?;
                b.copy_to(&mut self.data.write().unwrap()[r]);
                off += b.len() as u64;
                Ok(())
            });
            self.active.fetch_sub(1, Ordering::SeqCst);
            result
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 22)]).unwrap()
    }

    fn transfer(write: bool, offset: u64, addr: u64, len: u32) -> Io {
        Io {
            write,
            offset,
            segments: vec![(GuestAddress(addr), len)],
            len,
        }
    }

    /// Reaps after each completion signal until `n` transfers came back.
    fn collect(pool: &mut Pool<Tag>, n: usize) -> Vec<Done<Tag>> {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                pool.completion_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut all = Vec::new();
        while all.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions",
                all.len()
            );
            let mut events = [EpollEvent::default()];
            if epoll.wait(1000, &mut events).unwrap() == 1 {
                all.extend(pool.reap());
            }
        }
        all
    }

    #[test]
    fn many_transfers_in_flight_all_complete() {
        let disk = Arc::new(SlowDisk::new(1 << 20, Duration::from_millis(20)));
        let mut pool = Pool::new(disk.clone(), 8).unwrap();
        let mem = mem();
        // 64 reads of 4 KiB to distinct guest pages, and 16 writes from a filled page.
        for i in 0..64u64 {
            let t = transfer(false, i * 8192, 0x10_0000 + i * 4096, 4096);
            pool.push_run(&mem, vec![(((i % 2) as usize, i as u16), t)]);
        }
        mem.write_slice(&[0xab; 4096], GuestAddress(0x30_0000))
            .unwrap();
        for i in 0..16u64 {
            let t = transfer(true, (512 << 10) + i * 4096, 0x30_0000, 4096);
            pool.push_run(&mem, vec![((2, 100 + i as u16), t)]);
        }
        assert_eq!(pool.in_flight(), 80);
        pool.submit();
        let done = collect(&mut pool, 80);
        assert_eq!(done.len(), 80);
        assert_eq!(pool.in_flight(), 0);
        let mut heads: Vec<u16> = done.iter().map(|d| d.tag.1).collect();
        heads.sort_unstable();
        let expected: Vec<u16> = (0..64).chain(100..116).collect();
        assert_eq!(heads, expected);
        for d in &done {
            let (q, head, status, written) = outcome(d);
            assert_eq!(status, 0, "head {head}");
            let expected = if head < 100 {
                ((head % 2) as usize, 4096)
            } else {
                (2, 0)
            };
            assert_eq!((q, written), expected);
        }
        let data = disk.data.read().unwrap().clone();
        for i in 0..64u64 {
            let mut back = vec![0u8; 4096];
            mem.read_slice(&mut back, GuestAddress(0x10_0000 + i * 4096))
                .unwrap();
            let off = (i * 8192) as usize;
            assert_eq!(back, data[off..off + 4096], "read {i}");
        }
        assert!(data[512 << 10..(512 << 10) + 16 * 4096]
            .iter()
            .all(|b| *b == 0xab));
        let overlap = disk.max_active.load(Ordering::SeqCst);
        assert!(overlap > 1, "transfers ran one at a time ({overlap})");
    }

    #[test]
    fn a_merged_run_is_one_call_with_one_completion_per_request() {
        let disk = Arc::new(SlowDisk::new(1 << 16, Duration::ZERO));
        let mut pool = Pool::new(disk.clone(), 2).unwrap();
        let mem = mem();
        let run = vec![
            ((1, 5), transfer(false, 1024, 0x1000, 1024)),
            ((1, 6), transfer(false, 2048, 0x8000, 512)),
        ];
        pool.push_run(&mem, run);
        let done = pool.drain();
        assert_eq!(disk.started.load(Ordering::SeqCst), 1);
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|d| {
            let (q, _, status, _) = outcome(d);
            q == 1 && status == 0
        }));
        let mut back = vec![0u8; 512];
        mem.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, disk.data.read().unwrap()[2048..2560]);
    }

    #[test]
    fn failures_become_error_statuses_and_the_threads_keep_serving() {
        let mut disk = SlowDisk::new(1 << 16, Duration::ZERO);
        disk.panic_at = Some(4096);
        let mut pool = Pool::new(Arc::new(disk), 1).unwrap();
        let mem = mem();
        // Past the end of the disk, a guest buffer outside memory, a backend panic.
        pool.push_run(&mem, vec![((0, 1), transfer(false, 65024, 0x1000, 1024))]);
        pool.push_run(&mem, vec![((0, 2), transfer(false, 0, 1 << 30, 512))]);
        pool.push_run(&mem, vec![((0, 3), transfer(true, 4096, 0x1000, 512))]);
        pool.push_run(&mem, vec![((0, 4), transfer(false, 0, 0x1000, 512))]);
        let mut done: Vec<_> = pool.drain().iter().map(outcome).collect();
        done.sort_by_key(|d| d.1);
        let statuses: Vec<(u16, u8)> = done.iter().map(|d| (d.1, d.2)).collect();
        assert_eq!(statuses, vec![(1, 1), (2, 1), (3, 1), (4, 0)]);
        assert_eq!(pool.in_flight(), 0);
    }

    #[test]
    fn drain_waits_for_everything_and_nothing_runs_afterwards() {
        let disk = Arc::new(SlowDisk::new(1 << 20, Duration::from_millis(5)));
        let mut pool = Pool::new(disk.clone(), 4).unwrap();
        let mem = mem();
        for i in 0..40u64 {
            let t = transfer(false, i * 4096, 0x10_0000 + i * 4096, 4096);
            pool.push_run(&mem, vec![((0, i as u16), t)]);
        }
        pool.submit();
        // Some may have been reaped already; drain returns the rest.
        let mut n = pool.reap().len();
        n += pool.drain().len();
        assert_eq!(n, 40);
        assert_eq!(pool.in_flight(), 0);
        assert_eq!(disk.active.load(Ordering::SeqCst), 0);
        assert_eq!(disk.started.load(Ordering::SeqCst), 40);
        // The pool stays usable after a drain.
        pool.push_run(&mem, vec![((0, 0), transfer(false, 0, 0x1000, 512))]);
        assert_eq!(pool.drain().len(), 1);
    }

    #[test]
    fn dropping_the_pool_stops_it_before_returning() {
        let disk = Arc::new(SlowDisk::new(1 << 20, Duration::from_millis(10)));
        let mut pool = Pool::new(disk.clone(), 2).unwrap();
        let mem = mem();
        for i in 0..100u64 {
            let t = transfer(false, i * 4096, 0x10_0000 + i * 4096, 4096);
            pool.push_run(&mem, vec![((0, i as u16), t)]);
        }
        pool.submit();
        std::thread::sleep(Duration::from_millis(15));
        drop(pool);
        assert_eq!(disk.active.load(Ordering::SeqCst), 0);
        let started = disk.started.load(Ordering::SeqCst);
        assert!(started < 100, "queued jobs were run, not dropped");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(disk.started.load(Ordering::SeqCst), started);
        assert_eq!(
            Arc::strong_count(&disk),
            1,
            "every thread let go of the disk"
        );
    }
}
