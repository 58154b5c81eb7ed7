//! virtio-net on a host TAP interface: the device (features, configuration space, activation)
//! and its handler on the shared device worker, which serves one receive and one transmit queue
//! from the queues' kicks and the TAP's readiness.
//!
//! Frames move between guest memory and the TAP with one readv/writev each, virtio-net header
//! included: the TAP speaks the same header (IFF_VNET_HDR), so checksum offload and TSO need no
//! work here beyond telling the TAP what the driver accepted (TUNSETOFFLOAD).

pub mod rx;
pub mod tap;
pub mod tx;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use self::rx::{Received, RxBuffers};
use self::tap::FrameIo;
use self::tx::TxError;
use super::worker::{Ctx, DeviceWorker, EventHandler, Watch};
use super::{ActivateError, Activation, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::PauseError;

/// virtio device ID of a network device.
pub const VIRTIO_ID_NET: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
/// Frames moved per wakeup before the worker looks at its other events, so a flood in one
/// direction does not starve the other.
const BATCH: usize = 128;

/// Frame counters of one device.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Their bytes, without the virtio-net header.
    pub rx_bytes: AtomicU64,
    /// Frames for the guest that were lost (larger than its buffers, or unreadable).
    pub rx_dropped: AtomicU64,
    /// Frames the guest sent.
    pub tx_packets: AtomicU64,
    /// Their bytes, without the virtio-net header.
    pub tx_bytes: AtomicU64,
    /// Frames from the guest that were malformed or refused by the TAP.
    pub tx_dropped: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// State shared by the device and its [`NetHandle`].
struct Shared {
    /// The TAP; None once closed for good.
    tap: Mutex<Option<Arc<dyn FrameIo>>>,
    worker: DeviceWorker,
    /// Shared with the worker's handler (which must not hold `Shared`: the last holder of
    /// `Shared` stops the worker, and a thread cannot join itself).
    counters: Arc<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VMM's handle on a device it attached: counters, and closing the TAP when the VM ends
/// (the PCI device itself may outlive the VM).
#[derive(Clone)]
pub struct NetHandle(Arc<Shared>);

impl NetHandle {
    /// Frame counters.
    pub fn counters(&self) -> &Counters {
        &self.0.counters
    }

    /// Stops the worker and closes the TAP, so another VM can attach to it right away.
    pub fn close(&self) {
        self.0.worker.stop();
        lock(&self.0.tap).take();
    }
}

/// A virtio-net device.
pub struct Net {
    mac: [u8; 6],
    shared: Arc<Shared>,
}

/// `TUN_F_*` offloads for the features the driver accepted: the host may send what the guest
/// said it can receive.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // Segmentation offloads need checksum offload, in virtio as in the TAP.
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl Net {
    /// A device on `tap` whose guest sees `mac`.
    pub fn new(tap: Arc<dyn FrameIo>, mac: [u8; 6]) -> Self {
        Self {
            mac,
            shared: Arc::new(Shared {
                tap: Mutex::new(Some(tap)),
                worker: DeviceWorker::new("virtio-net"),
                counters: Arc::default(),
            }),
        }
    }

    /// The VMM's handle on this device.
    pub fn handle(&self) -> NetHandle {
        NetHandle(self.shared.clone())
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes()); // status
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.shared.worker.stop();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
        ]
        .iter()
        .fold(0, |f, bit| f | (1u64 << bit))
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.shared.worker.stop();
        let Some(tap) = lock(&self.shared.tap).clone() else {
            return Err(ActivateError::BadSetup("the TAP is closed".into()));
        };
        let [rxq, txq]: [ActiveQueue; 2] = activation
            .queues
            .try_into()
            .map_err(|_| ActivateError::BadSetup("virtio-net needs 2 queues".into()))?;
        tap.set_offload(tap_offloads(activation.acked_features))?;
        let watches = vec![
            (Watch::Kick(rxq.kick.try_clone()?), RX_TOKEN),
            (Watch::Kick(txq.kick.try_clone()?), TX_TOKEN),
        ];
        let handler = NetWorker {
            mem: activation.mem,
            rxq,
            txq,
            interrupt: activation.interrupt,
            tap,
            counters: self.shared.counters.clone(),
            mergeable: activation.acked_features & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx: RxBuffers::default(),
            rx_wants_tap: true,
            rx_notify: true,
            tx_blocked: false,
            interest: EventSet::empty(),
            rx_tap_failed: false,
        };
        self.shared.worker.start(watches, handler)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.worker.stop();
        // Frames queued from now on must not carry offloads the next driver may not accept.
        if let Some(tap) = lock(&self.shared.tap).as_ref() {
            if let Err(e) = tap.set_offload(0) {
                tracing::warn!("virtio-net: clearing TAP offloads: {e}");
            }
        }
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.shared.worker.pause()
    }

    /// Kicks that arrived while paused were consumed without serving, and the TAP was left
    /// unpolled: the worker looks at everything again.
    fn resume(&mut self) {
        self.shared.worker.resume()
    }
}

/// The worker's state: the activated queues and everything needed to serve them.
struct NetWorker {
    mem: GuestMemoryMmap,
    rxq: ActiveQueue,
    txq: ActiveQueue,
    interrupt: Arc<dyn Interrupt>,
    tap: Arc<dyn FrameIo>,
    counters: Arc<Counters>,
    mergeable: bool,
    rx: RxBuffers,
    /// Receiving can go on, so the TAP is polled for frames; false while the guest has no room.
    rx_wants_tap: bool,
    /// Whether the driver is asked to kick the receive queue.
    rx_notify: bool,
    /// The TAP refused a frame for now; polled for room before transmitting again.
    tx_blocked: bool,
    /// What the TAP is registered for in the epoll set (empty: not registered).
    interest: EventSet,
    /// The last TAP read failed (logged once until one succeeds).
    rx_tap_failed: bool,
}

impl EventHandler for NetWorker {
    fn handle(&mut self, token: u64, set: EventSet, _: &Ctx<'_>) {
        match token {
            RX_TOKEN => {
                // New buffers, or a resume: the TAP is worth another look either way.
                self.rx_wants_tap = true;
                self.process_rx();
            }
            TX_TOKEN => {
                // A TAP that failed a read gets another chance with any guest activity.
                if self.rx_tap_failed {
                    self.rx_wants_tap = true;
                }
                self.process_tx();
            }
            _ => {
                // An error also ends the wait for room: the next write reports it.
                let failed = set.intersects(EventSet::ERROR | EventSet::HANG_UP);
                if set.contains(EventSet::OUT) || (failed && self.tx_blocked) {
                    self.tx_blocked = false;
                    self.process_tx();
                }
                if set.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                    self.process_rx();
                }
            }
        }
    }

    fn prepare(&mut self, ctx: &Ctx<'_>) {
        self.update_tap_interest(ctx);
    }
}

impl NetWorker {
    /// Polls the TAP for what the queues wait on: frames while the guest has room, room while a
    /// frame waits to be sent; nothing while paused (the TAP queues frames meanwhile).
    fn update_tap_interest(&mut self, ctx: &Ctx<'_>) {
        let mut want = EventSet::empty();
        if !ctx.paused() {
            if self.rx_wants_tap {
                want |= EventSet::IN;
            }
            if self.tx_blocked {
                want |= EventSet::OUT;
            }
        }
        if want == self.interest {
            return;
        }
        let fd = self.tap.as_raw_fd();
        // Deregistered rather than registered for nothing: epoll reports errors and hang-ups
        // regardless, and a TAP whose interface is gone would report them forever.
        let r = if want.is_empty() {
            ctx.epoll().ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::empty(), TAP_TOKEN),
            )
        } else {
            let op = if self.interest.is_empty() {
                ControlOperation::Add
            } else {
                ControlOperation::Modify
            };
            ctx.epoll().ctl(op, fd, EpollEvent::new(want, TAP_TOKEN))
        };
        match r {
            Ok(()) => self.interest = want,
            Err(e) => tracing::error!("virtio-net: polling the TAP: {e}"),
        }
    }

    fn notify(&mut self, q: usize) {
        let aq = if q == RX {
            &mut self.rxq
        } else {
            &mut self.txq
        };
        if aq.queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.notify_queue(q as u16);
        }
    }

    /// Asks the driver to kick the receive queue when it adds buffers. True when it added some
    /// before the request could take effect (look again).
    fn enable_rx_notify(&mut self) -> bool {
        self.rx_notify = true;
        self.rxq
            .queue
            .enable_notification(&self.mem)
            .unwrap_or_else(|e| {
                tracing::warn!("virtio-net rx: {e:?}");
                false
            })
    }

    fn disable_rx_notify(&mut self) {
        if self.rx_notify {
            self.rx_notify = false;
            if let Err(e) = self.rxq.queue.disable_notification(&self.mem) {
                tracing::warn!("virtio-net rx: {e:?}");
            }
        }
    }

    /// Moves frames from the TAP into the guest while it has room and the TAP has frames.
    fn process_rx(&mut self) {
        if !self.rxq.queue.ready() {
            self.rx_wants_tap = false;
            return;
        }
        let size = self.rxq.queue.size();
        let mut used = false;
        let mut frames = 0;
        while frames < BATCH {
            self.rx.take_available(&self.mem, &mut self.rxq.queue);
            used |= self.rx.return_invalid(&self.mem, &mut self.rxq.queue);
            if !self.rx.ready(self.mergeable, size) {
                // Out of room: stop reading the TAP (frames wait there) until the driver adds
                // buffers and kicks, unless it added some while notifications were off.
                if self.enable_rx_notify() {
                    continue;
                }
                self.rx_wants_tap = false;
                break;
            }
            // Room enough: no kicks needed while it lasts.
            self.disable_rx_notify();
            let received = self.rx.receive(
                &self.mem,
                &mut self.rxq.queue,
                self.tap.as_ref(),
                self.mergeable,
            );
            match received {
                Ok(Received::Frame { len, .. }) => {
                    let c = &self.counters;
                    add(&c.rx_packets, 1);
                    add(&c.rx_bytes, (len - tap::VNET_HDR_LEN) as u64);
                    used = true;
                    self.rx_tap_failed = false;
                }
                Ok(Received::Truncated { len }) => {
                    tracing::debug!("virtio-net rx: dropped a {len}-byte frame that did not fit");
                    add(&self.counters.rx_dropped, 1);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.rx_wants_tap = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.rx_tap_failed {
                        tracing::error!("virtio-net rx: reading the TAP: {e}");
                    }
                    add(&self.counters.rx_dropped, 1);
                    // Polling a broken TAP would spin; the next kick tries again.
                    self.rx_tap_failed = true;
                    self.rx_wants_tap = false;
                    break;
                }
            }
            frames += 1;
        }
        if used {
            self.notify(RX);
        }
    }

    /// Sends every frame the driver has made available, unless the TAP pushes back.
    fn process_tx(&mut self) {
        if self.tx_blocked || !self.txq.queue.ready() {
            return;
        }
        let mem = &self.mem;
        let queue = &mut self.txq.queue;
        let counters = &self.counters;
        let mut used = false;
        let mut frames = 0;
        'outer: loop {
            if let Err(e) = queue.disable_notification(mem) {
                tracing::warn!("virtio-net tx: {e:?}");
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match tx::transmit(mem, chain, self.tap.as_ref()) {
                    Ok(len) => {
                        add(&counters.tx_packets, 1);
                        add(&counters.tx_bytes, len as u64);
                    }
                    Err(TxError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Sent again once the TAP has room.
                        queue.go_to_previous_position();
                        self.tx_blocked = true;
                        break 'outer;
                    }
                    Err(e) => {
                        tracing::debug!("virtio-net tx: dropped a frame: {e}");
                        add(&counters.tx_dropped, 1);
                    }
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    tracing::warn!("virtio-net tx: add_used: {e:?}");
                }
                used = true;
                frames += 1;
                if frames == BATCH {
                    // Come back after the other events; no kick will come while notifications
                    // are off.
                    let _ = self.txq.kick.write(1);
                    break 'outer;
                }
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!("virtio-net tx: {e:?}");
                    break;
                }
            }
        }
        if used {
            self.notify(TX);
        }
    }
}
