//! virtio-blk: the device (features, configuration space, activation) and its worker thread,
//! which serves every queue's kicks through epoll and answers requests with [`request::handle`].

pub mod backend;
pub mod engine;
pub mod image;
pub mod open;
pub mod pool;
pub mod request;
pub mod uring;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use self::backend::DiskBackend;
use self::engine::Engine;
use self::pool::Pool;
use self::request::{complete, plan, Desc, DiskInfo, Plan, SECTOR_SIZE};
use self::uring::{merge_runs, Uring, MAX_IOVECS};
use super::{ActivateError, Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// Default queue size.
pub const QUEUE_SIZE: u16 = 256;
const STOP_TOKEN: u64 = u64::MAX;
const COMPLETION_TOKEN: u64 = u64::MAX - 1;
const CONFIG_SIZE: usize = 60;

/// How a block device is set up.
#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// Number of request queues.
    pub num_queues: u16,
}

struct Worker {
    stop: EventFd,
    thread: JoinHandle<()>,
    /// Clones of the queues' kick eventfds, to make the worker look at its queues again.
    kicks: Vec<EventFd>,
}

/// Lets the VMM hold the worker still (pause, snapshot) without tearing it down.
#[derive(Debug, Default)]
struct RunState {
    /// The worker takes no new requests.
    paused: AtomicBool,
    /// Requests taken from the queues and not yet answered, plus one while a queue is being
    /// served.
    busy: AtomicUsize,
}

/// How long a pause waits for requests in flight.
const QUIESCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A disk backend shared between its device and whoever closes it at the end.
pub type SharedDisk = Arc<Mutex<Box<dyn DiskBackend>>>;

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Mutex<Box<dyn DiskBackend>>>,
    info: DiskInfo,
    num_queues: u16,
    worker: Option<Worker>,
    run: Arc<RunState>,
}

impl Block {
    /// A device serving `disk`.
    pub fn new(disk: Box<dyn DiskBackend>, opts: &BlockOptions) -> Self {
        let info = DiskInfo {
            size: disk.size(),
            read_only: opts.read_only,
            serial: opts.serial.as_bytes().iter().take(20).copied().collect(),
            counters: Arc::default(),
        };
        Self {
            disk: Arc::new(Mutex::new(disk)),
            info,
            num_queues: opts.num_queues.max(1),
            worker: None,
            run: Arc::default(),
        }
    }

    /// Request counters.
    pub fn counters(&self) -> Arc<request::Counters> {
        self.info.counters.clone()
    }

    /// The backend, shared with the device, for closing it when the VM ends.
    pub fn backend(&self) -> SharedDisk {
        self.disk.clone()
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &(self.info.size / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &512u32.to_le_bytes()); // blk_size
        put(24, &[0, 0]); // physical_block_exp, alignment_offset
        put(26, &1u16.to_le_bytes()); // min_io_size (sectors)
        put(28, &0u32.to_le_bytes()); // opt_io_size
        put(34, &self.num_queues.to_le_bytes()); // num_queues
        put(36, &(u32::MAX >> 9).to_le_bytes()); // max_discard_sectors
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &8u32.to_le_bytes()); // discard_sector_alignment
        put(48, &(u32::MAX >> 9).to_le_bytes()); // max_write_zeroes_sectors
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// The transfer engine for this activation: io_uring on the disk's file when it has one and
    /// the kernel offers io_uring, else a thread pool when the disk serves concurrent calls, else
    /// transfers run synchronously on the worker thread.
    fn start_engine(&self, queues: usize) -> Engine {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = disk.raw_fd() {
            let depth = (u32::from(QUEUE_SIZE) * queues as u32).next_power_of_two();
            match Uring::new(fd, depth) {
                Ok(u) => return Engine::Uring(Box::new(u)),
                Err(e) => tracing::warn!("virtio-blk: io_uring unavailable ({e})"),
            }
        }
        if let Some(concurrent) = disk.concurrent() {
            match Pool::new(concurrent, pool::DEFAULT_THREADS) {
                Ok(p) => return Engine::Pool(p),
                Err(e) => tracing::warn!("virtio-blk: no I/O threads ({e})"),
            }
        }
        tracing::debug!("virtio-blk: serving transfers synchronously");
        Engine::Sync
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.stop.write(1);
            if w.thread.join().is_err() {
                tracing::error!("virtio-blk worker panicked");
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.info.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; usize::from(self.num_queues)]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop_worker();
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let kicks = activation
            .queues
            .iter()
            .map(|q| q.kick.try_clone())
            .collect::<Result<Vec<_>, _>>()?;
        let epoll = Epoll::new()?;
        for (i, q) in activation.queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                q.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        let engine = self.start_engine(activation.queues.len());
        if let Some(fd) = engine.completion_fd() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, COMPLETION_TOKEN),
            )?;
        }
        let mut worker = QueueWorker {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            disk: self.disk.clone(),
            info: self.info.clone(),
            run: self.run.clone(),
            engine,
        };
        let thread = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run(epoll))?;
        self.worker = Some(Worker {
            stop: stop.try_clone()?,
            thread,
            kicks,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Result<(), String> {
        self.run.paused.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + QUIESCE_TIMEOUT;
        while self.run.busy.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() > deadline {
                self.run.paused.store(false, Ordering::SeqCst);
                return Err(format!(
                    "virtio-blk: {} requests still in flight after {QUIESCE_TIMEOUT:?}",
                    self.run.busy.load(Ordering::SeqCst)
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    fn resume(&mut self) {
        self.run.paused.store(false, Ordering::SeqCst);
        // Kicks that arrived while paused were consumed without serving: look again.
        if let Some(w) = &self.worker {
            for k in &w.kicks {
                let _ = k.write(1);
            }
        }
    }
}

/// The worker's state: the activated queues and everything needed to serve them.
struct QueueWorker {
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn Interrupt>,
    disk: Arc<Mutex<Box<dyn DiskBackend>>>,
    info: DiskInfo,
    run: Arc<RunState>,
    engine: Engine,
}

impl QueueWorker {
    fn run(&mut self, epoll: Epoll) {
        let mut events = vec![EpollEvent::default(); self.queues.len() + 1];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP_TOKEN => {
                        // Nothing may still write into guest memory once the device is reset.
                        self.engine.drain();
                        return;
                    }
                    COMPLETION_TOKEN => self.complete_transfers(),
                    q => {
                        let q = q as usize;
                        let _ = self.queues[q].kick.read();
                        self.process_queue(q);
                    }
                }
            }
        }
    }

    /// Posts the transfers the engine finished and interrupts the queues that need it.
    fn complete_transfers(&mut self) {
        let mut touched = vec![false; self.queues.len()];
        for done in self.engine.reap() {
            self.run.busy.fetch_sub(1, Ordering::SeqCst);
            self.info.counters.completed(&done.completion);
            let used = complete(&self.mem, &done.completion).unwrap_or(0);
            if let Some(aq) = self.queues.get_mut(done.queue) {
                if let Err(e) = aq.queue.add_used(&self.mem, done.head, used) {
                    tracing::warn!("virtio-blk queue {}: add_used: {e:?}", done.queue);
                }
                touched[done.queue] = true;
            }
        }
        for (q, _) in touched.iter().enumerate().filter(|(_, t)| **t) {
            self.notify_if_needed(q);
        }
    }

    fn notify_if_needed(&mut self, q: usize) {
        if self.queues[q]
            .queue
            .needs_notification(&self.mem)
            .unwrap_or(true)
        {
            self.interrupt.notify_queue(q as u16);
        }
    }

    /// Serves every available request of queue `q`, then interrupts the driver if it asked to be.
    fn process_queue(&mut self, q: usize) {
        self.run.busy.fetch_add(1, Ordering::SeqCst);
        if !self.run.paused.load(Ordering::SeqCst) {
            self.serve_queue(q);
        }
        self.run.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn serve_queue(&mut self, q: usize) {
        let mem = &self.mem;
        let queue = &mut self.queues[q].queue;
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let mut served = false;
        // Transfers for the engine, merged and submitted once the available ring is drained.
        let mut transfers = Vec::new();
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("virtio-blk queue {q}: {e:?}");
                return;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs: Vec<Desc> = chain
                    .map(|d| Desc {
                        addr: d.addr(),
                        len: d.len(),
                        writable: d.is_write_only(),
                    })
                    .collect();
                let completion = match plan(mem, disk.as_mut(), &self.info, &descs) {
                    Ok(Plan::Complete(c)) => Some(c),
                    Ok(Plan::Transfer(t)) if self.engine.is_async() => {
                        transfers.push((head, t));
                        None
                    }
                    Ok(Plan::Transfer(t)) => Some(t.run_sync(mem, disk.as_mut())),
                    Err(_) => {
                        // No status byte to answer in: hand the chain back empty.
                        if let Err(e) = queue.add_used(mem, head, 0) {
                            tracing::warn!("virtio-blk queue {q}: add_used: {e:?}");
                        }
                        served = true;
                        None
                    }
                };
                if let Some(c) = completion {
                    self.info.counters.completed(&c);
                    let used = complete(mem, &c).unwrap_or(0);
                    if let Err(e) = queue.add_used(mem, head, used) {
                        tracing::warn!("virtio-blk queue {q}: add_used: {e:?}");
                    }
                    served = true;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("virtio-blk queue {q}: {e:?}");
                    break;
                }
            }
        }
        if self.engine.is_async() {
            for run in merge_runs(transfers, MAX_IOVECS) {
                let n = run.len();
                self.run.busy.fetch_add(n, Ordering::SeqCst);
                if let Err(run) = self.engine.push_run(mem, q, run) {
                    self.run.busy.fetch_sub(n, Ordering::SeqCst);
                    // The engine is full: serve these synchronously.
                    for (head, t) in run {
                        let c = t.run_sync(mem, disk.as_mut());
                        self.info.counters.completed(&c);
                        let used = complete(mem, &c).unwrap_or(0);
                        if let Err(e) = queue.add_used(mem, head, used) {
                            tracing::warn!("virtio-blk queue {q}: add_used: {e:?}");
                        }
                        served = true;
                    }
                }
            }
            if let Err(e) = self.engine.submit() {
                tracing::error!("virtio-blk: submitting transfers: {e}");
            }
        }
        drop(disk);
        if served {
            self.notify_if_needed(q);
        }
    }
}
