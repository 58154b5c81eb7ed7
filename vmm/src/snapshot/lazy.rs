//! Restoring guest memory while the guest runs: the restored VM starts at once and its memory
//! arrives behind it, a page the guest (or a device) touches first jumping the queue.
//!
//! Guest RAM is fresh anonymous memory registered with a userfaultfd in "missing" mode, and
//! brought in by aligned 2 MiB chunks. A chunk is read into a fresh huge-page mapping and moved
//! (`mremap`) over its place in guest RAM, so the guest runs on huge pages as after a boot
//! (`UFFDIO_COPY` would install 4 KiB pages, which cost a nested page fault each in the test
//! host: the first version did that, and the guest crawled until the loader was done). Chunks no
//! snapshot holds are left to the kernel: once every stored chunk is in, the memory is
//! unregistered.
//!
//! Two threads share the work. The fault server, at the VMM's normal priority, sleeps on the
//! descriptor and brings in the chunk of each fault at once; it alone moves chunks into guest
//! RAM. The prefetcher reads the other stored chunks in address order at idle priority
//! (`SCHED_IDLE`), so it runs when neither the guest nor the VMM wants the CPU, and hands each
//! to the server, which moves it in unless a fault brought it in first. One loader thread at
//! normal priority serving faults between chunks made a fault wait for the chunk in progress,
//! and on the test host's one CPU it took CPU time from the restore call that starts it and from
//! the guest. Nothing ever waits on the prefetcher: an idle-priority thread may get no CPU for
//! long on a busy host, and the kernel lets no unprivileged thread leave `SCHED_IDLE` again.
//!
//! That includes the kernel's own locks. A page fault holds the process's memory-map lock
//! (`mmap_lock`, shared) while it zeroes the new huge page, and may be preempted inside; the
//! server's `mremap` and every `mmap` or `munmap` of any thread take that lock exclusively, and
//! the faults that queue behind them, the vCPUs' included, wait too. So the prefetcher neither
//! maps nor unmaps, and reads only into buffers whose pages are in already: the server maps
//! them and writes every page once (at its priority) when the prefetcher asks for one, and
//! unmaps what the prefetcher did not use. With the prefetcher faulting its own buffers in, a
//! restore in the test host with one busy process beside it stalled in its vCPU step (KVM
//! writing the guest's clock page waits for the server, whose `mremap` waited for the starved
//! prefetcher to let go of the lock): 749 ms there and a 932 ms call (medians of 7), against
//! 24 and 198 ms now. The zeroing of those buffers now runs at the server's priority; without
//! the busy process the call and the guest's next tick stayed within their spread.
//!
//! Why not map the files: a private file mapping restores as fast, but the guest then runs on
//! 4 KiB copy-on-write pages faulted in one at a time from the files, for good (see `memory`).
//! Why not the `vm-memory` machinery: it has no notion of memory that fills in later.
//!
//! Snapshots of a VM still loading wait for the loader ([`Loader::wait`]): the page map would
//! not show pages that are not in yet.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::{self, Layer, MemoryError};
use super::plan::{self, Plan};
use crate::vstate::pagemap::PAGE;
use crate::vstate::ram;

/// Guest memory comes in by aligned huge pages: a fault brings its whole huge page in.
const CHUNK: u64 = ram::HUGE_PAGE as u64;

/// Chunks the prefetcher may have read ahead of the server: bounds the memory they hold.
const READ_AHEAD: usize = 8;

/// The end of a loader: `None` while it runs, then its outcome (faults served, or why it
/// failed).
type Outcome = Mutex<Option<Result<u64, String>>>;

/// A running loader.
#[derive(Debug, Clone)]
pub struct Loader {
    done: Arc<(Outcome, Condvar)>,
    /// While set, the prefetcher waits (tests hold it to see faults served).
    hold: Arc<AtomicBool>,
    /// Set by a waiter: the server then reads what is left itself, at its own priority.
    hurry: Arc<AtomicBool>,
    /// Set when the VM failed to build: the server lets go of guest memory and ends.
    cancel: Arc<AtomicBool>,
    /// Wakes the server.
    ready: Arc<EventFd>,
}

impl Loader {
    /// Blocks until every stored page is in guest memory; how many faults were served, or why
    /// loading failed. The rest is then read at the server's priority: on a busy host the
    /// idle-priority prefetcher could leave a waiter (a snapshot) waiting for good.
    pub fn wait(&self) -> Result<u64, String> {
        self.tell_and_wait(&self.hurry)
    }

    /// Stops loading for a VM that failed to build, and returns once the server has let go of
    /// guest memory and ended: nothing moves pages into it afterwards, so it may be unmapped.
    /// Its userfaultfd goes back for the next restore to use ([`preopen`]): a jailed process
    /// cannot make another.
    pub fn cancel(&self) {
        let _ = self.tell_and_wait(&self.cancel);
    }

    /// Sets `flag` for the server unless loading has ended, and waits for the outcome, waking
    /// the server until it comes: a wake-up that failed to write would leave it asleep until
    /// its next fault or chunk, and a cancelled prefetcher sends none.
    fn tell_and_wait(&self, flag: &AtomicBool) -> Result<u64, String> {
        let (lock, cond) = &*self.done;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        if done.is_none() {
            flag.store(true, Ordering::Release);
        }
        loop {
            if let Some(outcome) = &*done {
                return outcome.clone();
            }
            let _ = self.ready.write(1);
            done = cond
                .wait_timeout(done, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn finish(&self, outcome: Result<u64, String>) {
        let (lock, cond) = &*self.done;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        cond.notify_all();
    }
}

/// Guest memory restored from `layers`: loading in the background when this process may use a
/// userfaultfd (with the loader), else read whole before returning. Should the VM fail to
/// build, the loader is cancelled ([`Loader::cancel`]) and the memory given back with the
/// [`ram::Reclaim`].
pub fn restore(
    layers: &[Layer],
) -> Result<(GuestMemoryMmap, ram::Reclaim, Option<Loader>), MemoryError> {
    restore_held(layers, false)
}

/// [`restore`], the prefetcher waiting until `hold` is released (tests).
fn restore_held(
    layers: &[Layer],
    hold: bool,
) -> Result<(GuestMemoryMmap, ram::Reclaim, Option<Loader>), MemoryError> {
    let plan = plan::resolve(layers)?;
    let (mem, reclaim) = memory::allocate(&plan)?;
    match start_loading(plan, &mem, hold) {
        Ok(loader) => Ok((mem, reclaim, loader)),
        Err(e) => {
            // No loader runs (the prefetcher, if started, ends without the server's go).
            drop(mem);
            reclaim.release();
            Err(e)
        }
    }
}

/// Starts loading `plan` into `mem` in the background (the loader), or reads it whole
/// (`None`).
fn start_loading(
    plan: Plan,
    mem: &GuestMemoryMmap,
    hold: bool,
) -> Result<Option<Loader>, MemoryError> {
    let uffd = match open_registered(mem) {
        Ok(uffd) => uffd,
        Err(why) => {
            tracing::debug!(%why, "guest memory read before the VM runs");
            memory::read_all(&plan, mem)?;
            return Ok(None);
        }
    };
    let ranges: Vec<Range> = mem
        .iter()
        .map(|r| Range {
            host: r.as_ptr() as u64,
            len: r.len(),
        })
        .collect();
    let shared = Arc::new(Shared::new(uffd, plan, ranges));
    let threads =
        |e: std::io::Error| MemoryError::Regions(format!("starting the memory loader: {e}"));
    let ready = Arc::new(EventFd::new(libc::EFD_CLOEXEC).map_err(threads)?);
    let (chunks_tx, chunks_rx) = mpsc::sync_channel(READ_AHEAD);
    let (buffer_requests, buffer_supply) = buffer_supply();
    let loader = Loader {
        done: Arc::new((Mutex::new(None), Condvar::new())),
        hold: Arc::new(AtomicBool::new(hold)),
        hurry: Arc::new(AtomicBool::new(false)),
        cancel: Arc::new(AtomicBool::new(false)),
        ready: ready.clone(),
    };
    // The prefetcher starts reading once the server runs: were the server not to start, the
    // restore fails and nothing may be left loading.
    let (go_tx, go_rx) = mpsc::channel::<()>();
    {
        let (shared, ready) = (shared.clone(), ready.clone());
        let (hold, cancel) = (loader.hold.clone(), loader.cancel.clone());
        crate::threads::builder("memory-prefetch")
            .spawn(move || {
                lower_priority();
                if go_rx.recv().is_ok() {
                    let prefetched =
                        shared.prefetch(&hold, &cancel, &chunks_tx, &buffer_supply, &ready);
                    if let Err(e) = prefetched {
                        // Once cancelled, nothing waits on the memory (its files may be gone).
                        if !cancel.load(Ordering::Acquire) {
                            fatal(&e);
                        }
                    }
                }
            })
            .map_err(threads)?;
    }
    let handle = loader.clone();
    crate::threads::builder("memory-faults")
        .spawn(move || {
            let started = std::time::Instant::now();
            let served = shared
                .serve(
                    &chunks_rx,
                    &buffer_requests,
                    &ready,
                    &handle.hurry,
                    &handle.cancel,
                )
                .unwrap_or_else(|e| fatal(&e));
            if handle.cancel.load(Ordering::Acquire) {
                tracing::info!("guest memory loading cancelled: the VM failed to build");
                handle.finish(Err("cancelled: the VM failed to build".into()));
                return;
            }
            tracing::info!(
                read_kib = shared.plan.bytes() >> 10,
                faults_served = served,
                ms = started.elapsed().as_millis() as u64,
                "guest memory loaded"
            );
            handle.finish(Ok(served));
        })
        .map_err(threads)?;
    // The prefetcher waits for this and nothing else.
    let _ = go_tx.send(());
    Ok(Some(loader))
}

/// The guest waits on pages that will never come: nothing can run it.
fn fatal(e: &str) -> ! {
    tracing::error!(error = %e, "restoring guest memory failed; the VM cannot go on");
    eprintln!("vmm: restoring guest memory failed: {e}");
    std::process::exit(1);
}

/// Puts the calling thread at idle priority; where the kernel refuses, it only loads sooner.
fn lower_priority() {
    if let Err(e) = crate::threads::set_policy(libc::SCHED_IDLE) {
        tracing::debug!(error = %e, "memory prefetcher left at normal priority");
    }
}

/// A userfaultfd made before a jail took this process's privileges ([`preopen`]).
static PREOPENED: Mutex<Option<Uffd>> = Mutex::new(None);

/// Makes the userfaultfd a later restore loads memory through, while this process may: a
/// jail's unprivileged ids may not make one that sees the kernel's faults, and its filters do
/// not allow the call. Without one, restores read memory whole.
pub fn preopen() {
    match create() {
        Ok(uffd) => *PREOPENED.lock().unwrap_or_else(|e| e.into_inner()) = Some(uffd),
        Err(why) => tracing::debug!(%why, "restores will read guest memory before the VM runs"),
    }
}

fn create() -> Result<Uffd, String> {
    // Faults raised by KVM for the guest happen in the kernel: the descriptor must see those
    // too (not "user mode only"), which takes privilege (CAP_SYS_PTRACE) or the
    // vm.unprivileged_userfaultfd sysctl.
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .create()
        .map_err(|e| format!("userfaultfd: {e}"))
}

/// A userfaultfd with every region of `mem` registered for missing-page faults.
fn open_registered(mem: &GuestMemoryMmap) -> Result<Uffd, String> {
    let preopened = PREOPENED.lock().unwrap_or_else(|e| e.into_inner()).take();
    let uffd = match preopened {
        Some(uffd) => uffd,
        None if crate::jail::seccomp::active() => {
            return Err("jailed without a userfaultfd made before the jail".into())
        }
        None => create()?,
    };
    for r in mem.iter() {
        let ioctls = uffd
            .register(r.as_ptr().cast(), r.len() as usize)
            .map_err(|e| format!("registering guest memory with userfaultfd: {e}"))?;
        // Chunks are moved in with mremap; waking the waiters is all the descriptor must do.
        if !ioctls.contains(userfaultfd::IoctlFlags::WAKE) {
            return Err(format!("userfaultfd offers {ioctls:?}, not wake"));
        }
    }
    Ok(uffd)
}

/// A registered host range (a guest RAM region).
#[derive(Clone, Copy, Debug)]
struct Range {
    host: u64,
    len: u64,
}

/// A mapping a chunk is read into; unmapped if it is dropped. Only the server may drop one
/// (see the module's notes on the prefetcher).
struct Buffer(MmapRegion);

impl Buffer {
    /// A fresh (huge-page) mapping of `len` bytes.
    fn new(len: u64) -> Result<Buffer, String> {
        ram::aligned_anonymous(len as usize)
            .map(Buffer)
            .map_err(|e| format!("mapping {len} bytes to load guest memory into: {e}"))
    }

    /// A fresh mapping of a chunk's size with every page in (zeroed), so that reading into it
    /// faults nothing.
    fn populated() -> Result<Buffer, String> {
        let buffer = Buffer::new(CHUNK)?;
        for offset in (0..buffer.0.size()).step_by(PAGE) {
            // SAFETY: inside the buffer's own private read-write mapping, which no one else
            // refers to yet; writing a zero keeps the fresh page's contents.
            unsafe { buffer.0.as_ptr().add(offset).write_volatile(0) };
        }
        Ok(buffer)
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the buffer's own mapping (an `MmapRegion` over a raw mapping never unmaps),
        // which nothing else refers to; a moved-in chunk's buffer is forgotten, not dropped.
        unsafe { libc::munmap(self.0.as_ptr().cast(), self.0.size()) };
    }
}

/// The server's end of the prefetcher's buffers.
struct BufferRequests {
    wants: Receiver<()>,
    spares: Sender<Buffer>,
}

impl BufferRequests {
    /// Makes a populated buffer for each request waiting.
    fn serve(&self) -> Result<(), String> {
        while self.wants.try_recv().is_ok() {
            // A prefetcher gone hands it back in the error, and it is unmapped here.
            let _ = self.spares.send(Buffer::populated()?);
        }
        Ok(())
    }
}

/// The prefetcher's end: asks the server for buffers and takes them.
struct BufferSupply {
    wants: Sender<()>,
    spares: Receiver<Buffer>,
}

impl BufferSupply {
    /// Asks the server for a buffer and wakes it; false once the server is gone.
    fn ask(&self, ready: &EventFd) -> Result<bool, String> {
        if self.wants.send(()).is_err() {
            return Ok(false);
        }
        ready
            .write(1)
            .map_err(|e| format!("waking the memory fault server: {e}"))?;
        Ok(true)
    }

    /// The buffer asked for, once the server made it; `None` once the server is gone.
    fn take(&self) -> Option<Buffer> {
        self.spares.recv().ok()
    }
}

/// The two ends of the buffer supply.
fn buffer_supply() -> (BufferRequests, BufferSupply) {
    let (wants_tx, wants_rx) = mpsc::channel();
    let (spares_tx, spares_rx) = mpsc::channel();
    (
        BufferRequests {
            wants: wants_rx,
            spares: spares_tx,
        },
        BufferSupply {
            wants: wants_tx,
            spares: spares_rx,
        },
    )
}

/// A chunk read for the server to move in.
struct Staged {
    region: usize,
    chunk: usize,
    bytes: Buffer,
}

/// The prefetcher's messages to the server.
enum Prefetched {
    /// A chunk read ahead.
    Chunk(Staged),
    /// Every stored chunk was read or already in; the buffers it had not used, for the server
    /// to unmap.
    Done(Vec<Buffer>),
}

/// What the fault server and the prefetcher share: the descriptor, where the stored pages are,
/// and which chunks are in.
struct Shared {
    uffd: Uffd,
    plan: Plan,
    ranges: Vec<Range>,
    /// Per region, per chunk: in guest RAM (set by the server only).
    loaded: Vec<Vec<AtomicBool>>,
}

impl Shared {
    fn new(uffd: Uffd, plan: Plan, ranges: Vec<Range>) -> Self {
        let loaded = ranges
            .iter()
            .map(|r| {
                (0..r.len.div_ceil(CHUNK))
                    .map(|_| AtomicBool::new(false))
                    .collect()
            })
            .collect();
        Shared {
            uffd,
            plan,
            ranges,
            loaded,
        }
    }

    fn is_loaded(&self, region: usize, chunk: usize) -> bool {
        self.loaded[region][chunk].load(Ordering::Acquire)
    }

    /// The server: moves in what the prefetcher read and serves faults as they come, until the
    /// prefetcher is done and every stored chunk is in (or, once `hurry` is set, until it has
    /// read the rest itself, serving faults between chunks); then lets go of guest memory.
    /// Once `cancel` is set it lets go at once, and gives its userfaultfd back ([`preopen`]).
    /// Returns how many faults it served.
    fn serve(
        &self,
        chunks: &Receiver<Prefetched>,
        buffers: &BufferRequests,
        ready: &EventFd,
        hurry: &AtomicBool,
        cancel: &AtomicBool,
    ) -> Result<u64, String> {
        let mut served = 0;
        let mut rest = self.stored_chunks();
        let mut fds = [self.uffd.as_raw_fd(), ready.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        loop {
            if cancel.load(Ordering::Acquire) {
                self.unregister()?;
                self.give_back();
                return Ok(served);
            }
            loop {
                match chunks.try_recv() {
                    Ok(Prefetched::Chunk(staged)) => self.install(staged)?,
                    Ok(Prefetched::Done(_unused)) => return self.finish(served),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return Err("the memory prefetcher ended early".into())
                    }
                }
            }
            self.serve_faults(&mut served)?;
            // After the faults: a waiting vCPU comes first.
            buffers.serve()?;
            if hurry.load(Ordering::Acquire) {
                match rest.find(|&(r, c)| !self.is_loaded(r, c)) {
                    Some((region, chunk)) => {
                        self.install(self.read(region, chunk, Buffer::new(CHUNK)?)?)?;
                        continue;
                    }
                    None => return self.finish(served),
                }
            }
            // SAFETY: `fds` is an array of two initialised pollfd this call may write.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(format!("waiting for guest memory faults: {e}"));
                }
            }
            if fds[1].revents != 0 {
                // Resets the count; the chunks themselves are in the channel.
                let _ = ready.read();
            }
        }
    }

    /// Every chunk holding stored pages, in address order.
    fn stored_chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.ranges.len())
            .flat_map(move |r| (0..self.loaded[r].len()).map(move |c| (r, c)))
            .filter(|&(r, c)| self.holds_data(r, c))
    }

    /// Every stored chunk is in: serves the faults still waiting and lets go of guest memory.
    fn finish(&self, mut served: u64) -> Result<u64, String> {
        self.serve_faults(&mut served)?;
        self.unregister()?;
        Ok(served)
    }

    /// Serves every fault waiting now, counting them in `served`.
    fn serve_faults(&self, served: &mut u64) -> Result<(), String> {
        while let Some(event) = self
            .uffd
            .read_event()
            .map_err(|e| format!("reading userfaultfd: {e}"))?
        {
            if let Event::Pagefault { addr, .. } = event {
                *served += 1;
                self.serve_fault(addr as u64)?;
            }
        }
        Ok(())
    }

    /// The prefetcher: reads every stored chunk not yet in, in address order, once `hold` is
    /// clear, and hands each to the server; stops once `cancel` is set.
    fn prefetch(
        &self,
        hold: &AtomicBool,
        cancel: &AtomicBool,
        chunks: &SyncSender<Prefetched>,
        buffers: &BufferSupply,
        ready: &EventFd,
    ) -> Result<(), String> {
        while hold.load(Ordering::Acquire) && !cancel.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // False once the server is gone: it ends early only when a waiter had it read the
        // rest itself or the loading was cancelled (on an error it ends the process).
        let send = |message| -> Result<bool, String> {
            if chunks.send(message).is_err() {
                return Ok(false);
            }
            ready
                .write(1)
                .map_err(|e| format!("waking the memory fault server: {e}"))?;
            Ok(true)
        };
        // A buffer is asked for one chunk ahead: the server fills it in while this thread
        // reads. Should the server be gone (a cancel, or a waiter had it read the rest), what
        // this thread holds is unmapped here: nothing waits on guest memory any more then.
        if !buffers.ask(ready)? {
            return Ok(());
        }
        let mut spare = None;
        for (region, chunk) in self.stored_chunks() {
            if cancel.load(Ordering::Acquire) {
                return Ok(());
            }
            if self.is_loaded(region, chunk) {
                continue;
            }
            let bytes = match spare.take() {
                Some(bytes) => bytes,
                None => match buffers.take() {
                    Some(bytes) if buffers.ask(ready)? => bytes,
                    _ => return Ok(()),
                },
            };
            // A fault may have brought it in meanwhile.
            if self.is_loaded(region, chunk) {
                spare = Some(bytes);
                continue;
            }
            if !send(Prefetched::Chunk(self.read(region, chunk, bytes)?))? {
                return Ok(());
            }
        }
        // The buffer asked for last, and any not used, go back to the server to unmap.
        let unused = spare.into_iter().chain(buffers.take()).collect();
        send(Prefetched::Done(unused)).map(drop)
    }

    /// Lets go of guest memory: whoever still waits on a chunk no snapshot holds is woken,
    /// and the kernel fills it with zeroes itself, on a huge page where it can.
    fn unregister(&self) -> Result<(), String> {
        for r in &self.ranges {
            self.uffd
                .unregister(r.host as *mut _, r.len as usize)
                .map_err(|e| format!("unregistering guest memory: {e}"))?;
        }
        Ok(())
    }

    /// Hands a copy of the descriptor (nothing registered on it any more) to the next restore.
    fn give_back(&self) {
        // SAFETY: duplicates a descriptor this process owns; the copy is owned by the `Uffd`
        // made from it below and nothing else.
        let fd = unsafe { libc::fcntl(self.uffd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "userfaultfd not kept for the next restore");
            return;
        }
        // SAFETY: `fd` is a fresh descriptor of a userfaultfd, owned by nothing else.
        let uffd = unsafe { <Uffd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        PREOPENED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(uffd);
    }

    fn serve_fault(&self, addr: u64) -> Result<(), String> {
        let Some(region) = self
            .ranges
            .iter()
            .position(|r| r.host <= addr && addr < r.host + r.len)
        else {
            return Err(format!("a fault at {addr:#x}, outside guest memory"));
        };
        let chunk = ((addr - self.ranges[region].host) / CHUNK) as usize;
        if self.is_loaded(region, chunk) {
            // Moved in after the fault was raised: the waiter only needs waking.
            let (host, len) = self.chunk_range(region, chunk);
            return self
                .uffd
                .wake(host as *mut _, len as usize)
                .map_err(|e| format!("waking a fault at {addr:#x}: {e}"));
        }
        self.install(self.read(region, chunk, Buffer::new(CHUNK)?)?)
    }

    /// Host address and length of a chunk (the last of a region may be short).
    fn chunk_range(&self, region: usize, chunk: usize) -> (u64, u64) {
        let r = self.ranges[region];
        let offset = chunk as u64 * CHUNK;
        (r.host + offset, CHUNK.min(r.len - offset))
    }

    /// Whether any stored page lies in the chunk.
    fn holds_data(&self, region: usize, chunk: usize) -> bool {
        let from = chunk as u64 * CHUNK;
        self.plan.regions[region]
            .segments_in(from, from + CHUNK)
            .next()
            .is_some()
    }

    /// The chunk read into `bytes`, a fresh mapping of a chunk's size: its stored bytes, zero
    /// elsewhere.
    fn read(&self, region: usize, chunk: usize, bytes: Buffer) -> Result<Staged, String> {
        let (_, len) = self.chunk_range(region, chunk);
        let staging = Staged {
            region,
            chunk,
            bytes,
        };
        // SAFETY: `staging.bytes` is a private read-write mapping of a chunk's size (at least
        // `len` bytes) that only this thread knows about.
        let dst = unsafe { std::slice::from_raw_parts_mut(staging.bytes.0.as_ptr(), len as usize) };
        self.plan
            .read_stored(region, chunk as u64 * CHUNK, dst)
            .map_err(|e| e.to_string())?;
        Ok(staging)
    }

    /// Moves a chunk read by [`Self::read`] over its place in guest RAM and wakes whoever waits
    /// there, unless the chunk is in already (then its copy is dropped). Moving keeps the huge
    /// page, which copying into registered memory (`UFFDIO_COPY`, 4 KiB pages only) would not;
    /// a chunk not yet in holds nothing, so nothing is lost. The server alone calls this.
    fn install(&self, staged: Staged) -> Result<(), String> {
        let (region, chunk) = (staged.region, staged.chunk);
        let (host, len) = self.chunk_range(region, chunk);
        if self.is_loaded(region, chunk) {
            // Dropping it unmaps the copy.
            return Ok(());
        }
        // SAFETY: moves the copy's private mapping over `len` bytes of guest RAM that hold no
        // page yet; the guest RAM mapping stays where vm-memory and KVM know it, its contents
        // now the chunk's.
        let moved = unsafe {
            libc::mremap(
                staged.bytes.0.as_ptr().cast(),
                len as usize,
                len as usize,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                host as *mut libc::c_void,
            )
        };
        if moved == libc::MAP_FAILED {
            return Err(format!(
                "moving loaded memory to guest address {:#x}: {}",
                self.plan.regions[region].guest_addr + chunk as u64 * CHUNK,
                std::io::Error::last_os_error()
            ));
        }
        // Its pages are guest RAM now: only what lies past the chunk (the last chunk of a
        // region may be short) is still the buffer's.
        let buffer = staged.bytes.0.size();
        if buffer > len as usize {
            // SAFETY: the rest of the buffer's own mapping, past the part just moved away.
            unsafe {
                libc::munmap(
                    staged.bytes.0.as_ptr().add(len as usize).cast(),
                    buffer - len as usize,
                )
            };
        }
        std::mem::forget(staged.bytes);
        self.loaded[region][chunk].store(true, Ordering::Release);
        self.uffd
            .wake(host as *mut _, len as usize)
            .map_err(|e| format!("waking faults at {host:#x}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::snapshot::memory::Region;

    const P: u64 = PAGE as u64;
    /// Two regions as below and above the PCI hole; the second spans several loader chunks.
    const REGIONS: [(u64, u64); 2] = [(0, 64 * P), (1 << 30, 4 * CHUNK / P * P)];

    fn page_byte(layer: u8, region: usize, page: u64) -> u8 {
        layer
            .wrapping_mul(100)
            .wrapping_add(region as u8 * 50)
            .wrapping_add(page as u8)
            | 1
    }

    /// A memory file for `runs` per region (the regions back to back), each stored page filled
    /// with its own byte; `zero_pages` are stored as zeroes.
    fn write_layer(
        dir: &Path,
        name: &str,
        layer: u8,
        runs: [&[[u64; 2]]; 2],
        zero: &[u64],
    ) -> Layer {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        let mut regions = Vec::new();
        let mut offset = 0;
        for (i, (&(guest_addr, size), runs)) in REGIONS.iter().zip(runs).enumerate() {
            for &[first, count] in runs {
                for page in first..first + count {
                    let byte = if zero.contains(&page) {
                        0
                    } else {
                        page_byte(layer, i, page)
                    };
                    file.write_all_at(&[byte; PAGE], offset + page * P).unwrap();
                }
            }
            regions.push(Region {
                guest_addr,
                size,
                file_offset: offset,
                pages: Some(runs.to_vec()),
            });
            offset += size;
        }
        file.set_len(offset).unwrap();
        Layer { path, regions }
    }

    /// A memory file storing every page of both regions.
    fn whole_layer(dir: &Path, layer: u8) -> Layer {
        let pages = REGIONS.map(|(_, size)| [[0, size / P]]);
        write_layer(dir, "base", layer, [&pages[0], &pages[1]], &[])
    }

    fn byte_at(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn expect_loader(loader: &Option<Loader>) {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                loader.is_some(),
                "root may use a userfaultfd: memory must load lazily"
            );
        }
    }

    /// Four threads, each reading every fourth page of the far region (backwards where
    /// `backwards` says so for it) and checking it holds layer `layer`'s bytes; with `mark`,
    /// each also writes its own mark on the pages it reads.
    fn walk_far_region(mem: &GuestMemoryMmap, layer: u8, backwards: fn(u64) -> bool, mark: bool) {
        let pages = REGIONS[1].1 / P;
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                scope.spawn(move || {
                    let mut walk: Vec<u64> = (0..pages).filter(|p| p % 4 == t).collect();
                    if backwards(t) {
                        walk.reverse();
                    }
                    for page in walk {
                        let at = REGIONS[1].0 + page * P;
                        assert_eq!(
                            byte_at(mem, at + 100),
                            page_byte(layer, 1, page),
                            "page {page}"
                        );
                        if mark {
                            mem.write_obj(0xa0 | t as u8, GuestAddress(at + 200))
                                .unwrap();
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn a_chain_arrives_whole_with_faults_served_before_the_ordered_copy() {
        let dir = tempfile::tempdir().unwrap();
        let last = REGIONS[1].1 / P - 1;
        let base = write_layer(
            dir.path(),
            "base",
            1,
            [&[[0, 40]], &[[0, 10], [300, last - 299]]],
            &[],
        );
        // The diff changes pages, zeroes one, adds one the base did not hold.
        let diff = write_layer(
            dir.path(),
            "diff",
            2,
            [&[[5, 2], [50, 1]], &[[400, 3]]],
            &[401],
        );
        let (mem, _, loader) = restore_held(&[base, diff], true).unwrap();
        expect_loader(&loader);
        let hi = REGIONS[1].0;
        // Far ahead of the ordered copy: the fault is served on the spot.
        assert_eq!(byte_at(&mem, hi + last * P + 7), page_byte(1, 1, last));
        // A page no snapshot holds reads zero; a write to a page still on its way lands on the
        // snapshot's page, not under it.
        assert_eq!(byte_at(&mem, hi + 200 * P), 0);
        mem.write_obj(0xeeu8, GuestAddress(hi + 900 * P + 1))
            .unwrap();
        if let Some(l) = &loader {
            l.hold.store(false, Ordering::Release);
            assert!(
                l.wait().unwrap() >= 3,
                "three faults served before the ordered copy"
            );
        }
        let expect = |region: usize, page: u64| -> u8 {
            match (region, page) {
                (0, 5..=6) | (0, 50) => page_byte(2, 0, page),
                (0, 0..=39) => page_byte(1, 0, page),
                (1, 401) => 0,
                (1, 400..=402) => page_byte(2, 1, page),
                (1, 0..=9) => page_byte(1, 1, page),
                (1, p) if p >= 300 => page_byte(1, 1, p),
                _ => 0,
            }
        };
        for (region, &(at, size)) in REGIONS.iter().enumerate() {
            for page in 0..size / P {
                let mut bytes = vec![0u8; PAGE];
                mem.read_slice(&mut bytes, GuestAddress(at + page * P))
                    .unwrap();
                let mut want = vec![expect(region, page); PAGE];
                if region == 1 && page == 900 {
                    want[1] = 0xee;
                }
                assert!(
                    bytes == want,
                    "region {region} page {page}: {:?}…",
                    &bytes[..4]
                );
            }
        }
        // Memory stays writable after the loader has let go of it.
        mem.write_obj(0x55u8, GuestAddress(hi + 250 * P)).unwrap();
        assert_eq!(byte_at(&mem, hi + 250 * P), 0x55);
    }

    #[test]
    fn faults_racing_the_prefetcher_each_get_the_snapshot_page_once() {
        let dir = tempfile::tempdir().unwrap();
        let base = whole_layer(dir.path(), 4);
        let pages = REGIONS[1].1 / P;
        // Races are timing: several rounds give them several chances.
        for _ in 0..48 {
            let (mem, _, loader) = restore_held(std::slice::from_ref(&base), false).unwrap();
            expect_loader(&loader);
            // Two threads walk the far region against the prefetcher, two with it; each
            // writes its mark on the pages it reads, which a chunk moved in twice would undo.
            walk_far_region(&mem, 4, |t| t % 2 == 0, true);
            if let Some(l) = &loader {
                l.wait().unwrap();
            }
            for page in 0..pages {
                let at = REGIONS[1].0 + page * P;
                assert_eq!(byte_at(&mem, at + 100), page_byte(4, 1, page));
                assert_eq!(
                    byte_at(&mem, at + 200),
                    0xa0 | (page % 4) as u8,
                    "page {page}"
                );
            }
        }
    }

    #[test]
    fn a_waiter_gets_every_page_though_the_prefetcher_never_runs() {
        let dir = tempfile::tempdir().unwrap();
        let base = whole_layer(dir.path(), 5);
        // Held for good: the prefetcher stands for one starved on a busy host.
        let (mem, _, loader) = restore_held(&[base], true).unwrap();
        expect_loader(&loader);
        if let Some(l) = loader {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || tx.send(l.wait()));
            let served = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the wait ends though the prefetcher never runs");
            assert_eq!(served.unwrap(), 0, "nothing touched the memory");
        }
        // Every page is there, read without a fault: the memory was let go.
        for (region, &(at, size)) in REGIONS.iter().enumerate() {
            for page in 0..size / P {
                assert_eq!(byte_at(&mem, at + page * P + 9), page_byte(5, region, page));
            }
        }
    }

    #[test]
    fn the_prefetchers_buffers_are_resident_and_zero_before_it_reads() {
        // The prefetcher reads into these at idle priority: a page not yet in would fault
        // there, holding the process's memory-map lock while it may get no CPU.
        let buffer = Buffer::populated().unwrap();
        let (ptr, len) = (buffer.0.as_ptr(), buffer.0.size());
        assert_eq!(len as u64, CHUNK);
        let mut resident = vec![0u8; len / PAGE];
        // SAFETY: `ptr..ptr + len` is the buffer's mapping; `resident` has a byte per page.
        let rc = unsafe { libc::mincore(ptr.cast(), len, resident.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let absent = resident.iter().filter(|r| **r & 1 == 0).count();
        assert_eq!(absent, 0, "{absent} of {} pages not in", resident.len());
        // SAFETY: the buffer's own mapping, read only here.
        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
        assert!(bytes.iter().all(|b| *b == 0));
    }

    #[test]
    fn a_cancelled_loader_lets_go_and_its_memory_can_be_unmapped() {
        let dir = tempfile::tempdir().unwrap();
        let base = whole_layer(dir.path(), 6);
        // The prefetcher is held: only what is touched comes in.
        let (mem, reclaim, loader) = restore_held(&[base], true).unwrap();
        expect_loader(&loader);
        let far = REGIONS[1].0;
        assert_eq!(byte_at(&mem, far + 9), page_byte(6, 1, 0), "a fault served");
        if let Some(l) = &loader {
            // Returns once the server has ended (a hang here fails the test by its timeout).
            l.cancel();
            assert!(l.wait().unwrap_err().contains("cancelled"));
            // Let go: a chunk never brought in reads as the kernel's zeroes, without waiting
            // on a server that is gone.
            assert_eq!(byte_at(&mem, far + 3 * CHUNK + 9), 0);
        }
        drop(mem);
        assert_eq!(reclaim.release(), REGIONS.len());
    }

    #[test]
    fn threads_faulting_together_all_get_their_pages() {
        let dir = tempfile::tempdir().unwrap();
        let base = whole_layer(dir.path(), 3);
        let (mem, _, loader) = restore_held(&[base], true).unwrap();
        expect_loader(&loader);
        // Every thread walks the far region backwards, against the ordered copy.
        walk_far_region(&mem, 3, |_| true, false);
        if let Some(l) = &loader {
            l.hold.store(false, Ordering::Release);
            assert!(l.wait().unwrap() > 0);
        }
    }
}
