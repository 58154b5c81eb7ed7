//! virtio-blk: the device (features, configuration space, activation) and its queue handler on
//! the shared device worker, which answers requests with [`request::plan`] and carries their
//! transfers out through the block layer's engine. Disks themselves are the `block` crate's.

pub mod request;
mod stall;

use std::sync::{Arc, Mutex};

use block::{merge_runs, DiskBackend, Done, Engine, Io, MAX_IOVECS};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use self::request::{complete, plan, Completion, Desc, DiskInfo, Plan, SECTOR_SIZE};
use self::stall::{Parked, Stalls, Work};
use super::worker::{Ctx, DeviceWorker, EventHandler, Watch};
use super::{ActivateError, Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::config::OnError;
use crate::devices::{ExitHandle, PauseError};

/// virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u16 = 2;
/// Default queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Worker token of the engine's completion eventfd; queues use their index.
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
    /// What a failed write does.
    pub on_error: OnError,
    /// How the disk is named in messages ("disk 0 (/path)").
    pub name: String,
    /// Where a stalled disk asks for the VM to pause.
    pub stall: ExitHandle,
}

/// A disk backend shared between its device and whoever closes it at the end.
pub type SharedDisk = Arc<Mutex<Box<dyn DiskBackend>>>;

/// A virtio-blk device.
pub struct Block {
    disk: SharedDisk,
    info: DiskInfo,
    num_queues: u16,
    worker: DeviceWorker,
    on_error: OnError,
    name: String,
    stall: ExitHandle,
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
            worker: DeviceWorker::batched("virtio-blk"),
            on_error: opts.on_error,
            name: opts.name.clone(),
            stall: opts.stall.clone(),
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
        self.worker.stop();
        let depth = u32::from(QUEUE_SIZE) * activation.queues.len() as u32;
        let engine = Engine::for_disk(
            self.disk.lock().unwrap_or_else(|e| e.into_inner()).as_ref(),
            depth,
        );
        let mut watches = Vec::with_capacity(activation.queues.len() + 1);
        for (i, q) in activation.queues.iter().enumerate() {
            watches.push((Watch::Kick(q.kick.try_clone()?), i as u64));
        }
        if let Some(fd) = engine.completion_fd() {
            watches.push((Watch::Always(fd), COMPLETION_TOKEN));
        }
        let handler = QueueHandler {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
            disk: self.disk.clone(),
            info: self.info.clone(),
            engine,
            stalls: Stalls::new(self.on_error, self.name.clone(), self.stall.clone()),
        };
        self.worker.start(watches, handler)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.worker.pause()
    }

    fn resume(&mut self) {
        self.worker.resume()
    }
}

/// Where an asynchronous transfer is answered: its queue, its chain's head, its status byte.
struct Pending {
    queue: usize,
    head: u16,
    status: GuestAddress,
}

/// The activated queues and everything needed to serve them.
struct QueueHandler {
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn Interrupt>,
    disk: SharedDisk,
    info: DiskInfo,
    engine: Engine<Pending>,
    stalls: Stalls,
}

impl EventHandler for QueueHandler {
    fn handle(&mut self, token: u64, _: EventSet, ctx: &Ctx<'_>) {
        match token {
            COMPLETION_TOKEN => self.complete_transfers(ctx),
            q if (q as usize) < self.queues.len() => self.serve_queue(q as usize, ctx),
            other => tracing::warn!("virtio-blk: event for unknown token {other}"),
        }
    }

    fn stop(&mut self) {
        // Nothing may still write into guest memory once the device is reset.
        self.engine.drain();
    }
}

impl QueueHandler {
    /// Posts the transfers the engine finished and interrupts the queues that need it.
    fn complete_transfers(&mut self, ctx: &Ctx<'_>) {
        let mut touched = vec![false; self.queues.len()];
        for Done { tag, io, result } in self.engine.reap() {
            ctx.release(1);
            let p = Parked {
                queue: tag.queue,
                head: tag.head,
                status: tag.status,
                work: Work::Transfer(io),
            };
            if let Some((p, result)) = self.stalls.settle(ctx, p, result) {
                let c = p.work.completion(p.status, result);
                if answer(&self.mem, &mut self.queues, &self.info, p.queue, p.head, &c) {
                    touched[p.queue] = true;
                }
            }
        }
        self.notify(&touched);
    }

    fn notify(&mut self, touched: &[bool]) {
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

    /// Retries the requests that waited for the VM to be resumed, in order. False when the
    /// disk is still stalled (a retry failed again: the VM pauses again).
    fn retry_parked(&mut self, ctx: &Ctx<'_>) -> bool {
        let mut touched = vec![false; self.queues.len()];
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let mut waiting = self.stalls.take().into_iter();
        for p in waiting.by_ref() {
            let result = p.work.run(&self.mem, disk.as_mut());
            let Some((p, result)) = self.stalls.settle(ctx, p, result) else {
                // It failed again: the rest wait behind it, in order.
                break;
            };
            let c = p.work.completion(p.status, result);
            if answer(&self.mem, &mut self.queues, &self.info, p.queue, p.head, &c) {
                touched[p.queue] = true;
            }
        }
        for p in waiting {
            self.stalls.keep(p);
        }
        drop(disk);
        self.notify(&touched);
        !self.stalls.stalled()
    }

    /// Serves every available request of queue `q`, then interrupts the driver if it asked to be.
    /// A stalled disk serves nothing until the VM was resumed and what waited went through.
    fn serve_queue(&mut self, q: usize, ctx: &Ctx<'_>) {
        if self.stalls.stalled() && (!self.stalls.due(ctx) || !self.retry_parked(ctx)) {
            // The kick comes again when the VM is resumed.
            return;
        }
        let QueueHandler {
            mem,
            queues,
            disk,
            info,
            engine,
            stalls,
            ..
        } = self;
        let mut disk = disk.lock().unwrap_or_else(|e| e.into_inner());
        let mut served = false;
        // Transfers for the engine, merged and submitted once the available ring is drained.
        let mut transfers: Vec<(Pending, Io)> = Vec::new();
        // Answers a request carried out synchronously, unless it waits (a stalled write).
        let settle = |stalls: &mut Stalls, queues: &mut [ActiveQueue], p: Parked, result| {
            if let Some((p, result)) = stalls.settle(ctx, p, result) {
                let c = p.work.completion(p.status, result);
                answer(mem, queues, info, p.queue, p.head, &c)
            } else {
                false
            }
        };
        'ring: loop {
            if let Err(e) = queues[q].queue.disable_notification(mem) {
                tracing::warn!("virtio-blk queue {q}: {e:?}");
                return;
            }
            while let Some(chain) = queues[q].queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let descs: Vec<Desc> = chain
                    .map(|d| Desc {
                        addr: d.addr(),
                        len: d.len(),
                        writable: d.is_write_only(),
                    })
                    .collect();
                let parked = |status, work| Parked {
                    queue: q,
                    head,
                    status,
                    work,
                };
                match plan(mem, info, &descs) {
                    Ok(Plan::Complete(c)) => served |= answer(mem, queues, info, q, head, &c),
                    Ok(Plan::Transfer(t)) if engine.is_async() => {
                        let pending = Pending {
                            queue: q,
                            head,
                            status: t.status,
                        };
                        transfers.push((pending, t.io));
                    }
                    Ok(Plan::Transfer(t)) => {
                        let work = Work::Transfer(t.io);
                        let result = work.run(mem, disk.as_mut());
                        served |= settle(stalls, queues, parked(t.status, work), result);
                    }
                    Ok(Plan::Disk { op, status }) => {
                        let result = op.run(disk.as_mut());
                        served |= settle(stalls, queues, parked(status, Work::Disk(op)), result);
                    }
                    Err(_) => {
                        // No status byte to answer in: hand the chain back empty.
                        if let Err(e) = queues[q].queue.add_used(mem, head, 0) {
                            tracing::warn!("virtio-blk queue {q}: add_used: {e:?}");
                        }
                        served = true;
                    }
                }
                if stalls.stalled() {
                    // Later requests wait in the ring until the VM is resumed.
                    break 'ring;
                }
            }
            match queues[q].queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("virtio-blk queue {q}: {e:?}");
                    break;
                }
            }
        }
        if engine.is_async() {
            for run in merge_runs(transfers, MAX_IOVECS) {
                let n = run.len();
                ctx.hold(n);
                if let Err(run) = engine.push_run(mem, run) {
                    ctx.release(n);
                    // The engine is full: serve these synchronously.
                    for (p, io) in run {
                        let work = Work::Transfer(io);
                        let result = work.run(mem, disk.as_mut());
                        let p = Parked {
                            queue: p.queue,
                            head: p.head,
                            status: p.status,
                            work,
                        };
                        served |= settle(stalls, queues, p, result);
                    }
                }
            }
            if let Err(e) = engine.submit() {
                tracing::error!("virtio-blk: submitting transfers: {e}");
            }
        }
        drop(disk);
        if served {
            self.notify_if_needed(q);
        }
    }
}

/// Writes a request's status and puts its chain in queue `q`'s used ring. False when there is
/// no such queue.
fn answer(
    mem: &GuestMemoryMmap,
    queues: &mut [ActiveQueue],
    info: &DiskInfo,
    q: usize,
    head: u16,
    c: &Completion,
) -> bool {
    let Some(aq) = queues.get_mut(q) else {
        return false;
    };
    info.counters.completed(c);
    let used = complete(mem, c).unwrap_or(0);
    if let Err(e) = aq.queue.add_used(mem, head, used) {
        tracing::warn!("virtio-blk queue {q}: add_used: {e:?}");
    }
    true
}
