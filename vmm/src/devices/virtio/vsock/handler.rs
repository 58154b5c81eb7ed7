//! The device's queues on the shared device worker: guest packets from the transmit queue go to
//! the host side, packets for the guest go into the receive queue as it posts buffers, and the
//! event queue carries the transport reset after a restore.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::muxer::{FromGuest, Muxer, LISTENER_TOKEN};
use super::proto::{
    EVENT_TRANSPORT_RESET, HOST_CID, MAX_RX_DATA, MAX_TX_DATA, OP_RST, TYPE_STREAM,
};
use crate::devices::virtio::worker::{Ctx, EventHandler};
use crate::devices::virtio::{ActiveQueue, Interrupt};

/// Worker tokens of the queues: their indexes.
pub const RXQ: usize = 0;
/// Transmit queue.
pub const TXQ: usize = 1;
/// Event queue.
pub const EVQ: usize = 2;
/// Token of the deadline timer.
const TIMER_TOKEN: u64 = 9;
/// Packets moved per wakeup before the worker looks at its other events.
const BATCH: usize = 256;

/// The activated device.
pub struct VsockHandler {
    mem: GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    interrupt: Arc<dyn Interrupt>,
    cid: u64,
    muxer: Muxer,
    /// A transport reset event is owed (the device was restored from a snapshot).
    reset_pending: bool,
    timer: TimerFd,
    /// When the timer is set to fire, if it is.
    timer_at: Option<Instant>,
    timer_registered: bool,
}

impl VsockHandler {
    /// The handler of a device with context ID `cid`, serving `queues` (receive, transmit,
    /// event) and the host side `muxer`; `restored` owes the guest a transport reset.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: Vec<ActiveQueue>,
        interrupt: Arc<dyn Interrupt>,
        cid: u64,
        muxer: Muxer,
        restored: bool,
    ) -> std::io::Result<VsockHandler> {
        Ok(VsockHandler {
            mem,
            queues,
            interrupt,
            cid,
            muxer,
            reset_pending: restored,
            timer: TimerFd::new()?,
            timer_at: None,
            timer_registered: false,
        })
    }

    fn notify(&mut self, q: usize) {
        if self.queues[q]
            .queue
            .needs_notification(&self.mem)
            .unwrap_or(true)
        {
            self.interrupt.notify_queue(q as u16);
        }
    }

    /// Takes every packet the guest made available on the transmit queue.
    fn process_tx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        let mut n = 0;
        while let Some(mut chain) = self.queues[TXQ].queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match VsockPacket::from_tx_virtq_chain(&mem, &mut chain, MAX_TX_DATA) {
                Ok(pkt) => self.take_guest_packet(&pkt),
                Err(e) => tracing::debug!("vsock: dropped a malformed guest packet: {e}"),
            }
            if let Err(e) = self.queues[TXQ].queue.add_used(&mem, head, 0) {
                tracing::warn!("vsock tx: add_used: {e:?}");
            }
            used = true;
            n += 1;
            if n == BATCH {
                // Come back after the other events.
                let _ = self.queues[TXQ].kick.write(1);
                break;
            }
        }
        if used {
            self.notify(TXQ);
        }
    }

    fn take_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>) {
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID {
            tracing::debug!(
                src = pkt.src_cid(),
                dst = pkt.dst_cid(),
                "vsock: dropped a guest packet with foreign addresses"
            );
            return;
        }
        let p = FromGuest {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        if pkt.type_() != TYPE_STREAM {
            // Only streams: refuse anything else (seqpacket was never offered).
            if p.op != OP_RST {
                self.muxer.refuse(p.local_port, p.peer_port);
            }
            return;
        }
        let data = pkt.data_slice().filter(|_| !pkt.is_empty());
        let data = data.and_then(|d| d.subslice(0, (pkt.len() as usize).min(d.len())).ok());
        self.muxer.from_guest(p, data.as_ref());
    }

    /// Fills the guest's receive buffers with what the host side has for it.
    fn process_rx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        let mut n = 0;
        while self.muxer.has_rx_work() && n < BATCH {
            let Some(mut chain) = self.queues[RXQ].queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, MAX_RX_DATA) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("vsock: unusable receive buffer: {e}");
                    if let Err(e) = self.queues[RXQ].queue.add_used(&mem, head, 0) {
                        tracing::warn!("vsock rx: add_used: {e:?}");
                    }
                    used = true;
                    continue;
                }
            };
            let Some(out) = self.muxer.next_packet(pkt.data_slice()) else {
                // Nothing after all (a stream had no data): the buffer stays the guest's.
                self.queues[RXQ].queue.go_to_previous_position();
                break;
            };
            let header = [0u8; PKT_HEADER_SIZE];
            let written = pkt
                .set_header_from_raw(&header)
                .map(|_| {
                    pkt.set_src_cid(HOST_CID)
                        .set_dst_cid(self.cid)
                        .set_src_port(out.local_port)
                        .set_dst_port(out.peer_port)
                        .set_type(TYPE_STREAM)
                        .set_op(out.out.op)
                        .set_flags(out.out.flags)
                        .set_len(out.out.len)
                        .set_buf_alloc(out.out.buf_alloc)
                        .set_fwd_cnt(out.out.fwd_cnt);
                    PKT_HEADER_SIZE as u32 + out.out.len
                })
                .unwrap_or(0);
            if let Err(e) = self.queues[RXQ].queue.add_used(&mem, head, written) {
                tracing::warn!("vsock rx: add_used: {e:?}");
            }
            used = true;
            n += 1;
        }
        if n == BATCH && self.muxer.has_rx_work() {
            let _ = self.queues[RXQ].kick.write(1);
        }
        if used {
            self.notify(RXQ);
        }
    }

    /// Delivers the transport reset event once the guest has an event buffer.
    fn process_evq(&mut self) {
        if !self.reset_pending {
            return;
        }
        let mem = self.mem.clone();
        let Some(chain) = self.queues[EVQ].queue.pop_descriptor_chain(&mem) else {
            return;
        };
        let head = chain.head_index();
        let written = match chain.clone().find(|d| d.is_write_only() && d.len() >= 4) {
            Some(d) => mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), GuestAddress(d.addr().0))
                .map(|()| 4)
                .unwrap_or(0),
            None => 0,
        };
        if written == 4 {
            self.reset_pending = false;
            tracing::info!("vsock: transport reset sent to the guest");
        }
        if let Err(e) = self.queues[EVQ].queue.add_used(&mem, head, written) {
            tracing::warn!("vsock event queue: add_used: {e:?}");
        }
        self.notify(EVQ);
    }

    /// Arms the timer for the earliest deadline (or disarms it), and keeps it in the epoll set
    /// while armed and running.
    fn sync_timer(&mut self, ctx: &Ctx<'_>) {
        let next = if ctx.paused() {
            None
        } else {
            self.muxer.next_deadline()
        };
        if next != self.timer_at {
            let r = match next {
                Some(at) => {
                    let d = at.saturating_duration_since(Instant::now());
                    self.timer
                        .reset(d.max(std::time::Duration::from_millis(1)), None)
                }
                None => self.timer.clear(),
            };
            if let Err(e) = r {
                tracing::warn!("vsock: deadline timer: {e}");
            }
            self.timer_at = next;
        }
        let want = next.is_some();
        if want != self.timer_registered {
            let op = if want {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            let ev = EpollEvent::new(EventSet::IN, TIMER_TOKEN);
            if let Err(e) = ctx.epoll().ctl(op, self.timer.as_raw_fd(), ev) {
                tracing::warn!("vsock: polling the deadline timer: {e}");
            }
            self.timer_registered = want;
        }
    }
}

impl EventHandler for VsockHandler {
    fn handle(&mut self, token: u64, events: EventSet, _ctx: &Ctx<'_>) {
        match token {
            t if t == RXQ as u64 => {}
            t if t == TXQ as u64 => self.process_tx(),
            t if t == EVQ as u64 => self.process_evq(),
            TIMER_TOKEN => {
                let _ = self.timer.wait();
                self.timer_at = None;
                self.muxer.expire(Instant::now());
            }
            t if t == LISTENER_TOKEN || t >= super::muxer::STREAM_TOKEN_BASE => {
                self.muxer.on_event(t, events)
            }
            other => tracing::warn!("vsock: event for unknown token {other}"),
        }
        // Whatever happened may have given the guest something to receive.
        self.process_rx();
    }

    fn prepare(&mut self, ctx: &Ctx<'_>) {
        self.muxer.sync(ctx.epoll(), ctx.paused());
        self.sync_timer(ctx);
    }
}
