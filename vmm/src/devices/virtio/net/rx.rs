//! The receive queue: frames from the TAP are read straight into the buffers the driver made
//! available, with one readv each.
//!
//! A TAP read takes a whole frame and cuts what does not fit, and its size is unknown before the
//! read, so the device reads only when it holds room for the largest frame the guest may get,
//! and offers the TAP one spare byte past the guest's room: a frame that reaches it did not fit.
//! Chains are taken off the available ring as soon as they are seen and held, in ring order,
//! until frames fill them: that way the device knows how much room it has, and the driver (whose
//! `avail_event` follows what the device took) kicks when it adds more. Chains are completed in
//! the order they were taken, unusable ones included, so the used ring is always a prefix of
//! what was taken and a restored queue resumes at the used index.

use std::collections::VecDeque;
use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::tap::{FrameIo, MAX_IOVECS, VNET_HDR_LEN};

/// Room for the largest frame with mergeable buffers: the header and a 64 KiB GSO frame with
/// its Ethernet and VLAN headers.
pub const MAX_RX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// One chain taken from the available ring.
#[derive(Debug)]
struct RxChain {
    head: u16,
    /// Device-writable buffers, in order.
    segs: Vec<(GuestAddress, u32)>,
    capacity: usize,
    /// Host slices the buffers make up (a buffer may span memory regions).
    slices: usize,
    /// Descriptors the chain took from the ring.
    descs: usize,
    /// False when the chain cannot take a frame: it is completed empty when its turn comes.
    valid: bool,
}

/// What one read from the TAP gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A frame of `len` bytes (header included), spread over `buffers` chains.
    Frame {
        /// Header and frame.
        len: usize,
        /// Chains used (`num_buffers`).
        buffers: usize,
    },
    /// A frame larger than the room it was read into: dropped, and the chains stay for the next.
    Truncated {
        /// The frame's length, header included.
        len: usize,
    },
}

/// The chains at the front that the next frame is read into.
struct Gather {
    chains: usize,
    capacity: usize,
    slices: usize,
    /// Stopped before reaching the wanted room (an unusable chain, or the iovec limit).
    blocked: bool,
}

/// The receive chains the device holds.
#[derive(Debug, Default)]
pub struct RxBuffers {
    chains: VecDeque<RxChain>,
    held_descs: usize,
}

fn parse(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> RxChain {
    let mut c = RxChain {
        head: chain.head_index(),
        segs: Vec::new(),
        capacity: 0,
        slices: 0,
        descs: 0,
        valid: true,
    };
    for d in chain {
        c.descs += 1;
        if !d.is_write_only() {
            c.valid = false;
            continue;
        }
        if d.len() == 0 {
            continue;
        }
        let mut n = 0;
        for s in mem.get_slices(d.addr(), d.len() as usize) {
            if s.is_err() {
                c.valid = false;
                break;
            }
            n += 1;
        }
        c.slices += n;
        c.capacity += d.len() as usize;
        c.segs.push((d.addr(), d.len()));
    }
    if c.capacity < VNET_HDR_LEN || c.slices > MAX_IOVECS {
        c.valid = false;
    }
    c
}

/// Writes `data` at byte `offset` of the buffers `segs`.
fn write_at(mem: &GuestMemoryMmap, segs: &[(GuestAddress, u32)], mut offset: usize, data: &[u8]) {
    let mut data = data;
    for (addr, len) in segs {
        let len = *len as usize;
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = data.len().min(len - offset);
        let Some(at) = addr.checked_add(offset as u64) else {
            return;
        };
        if mem.write_slice(&data[..n], at).is_err() {
            return;
        }
        data = &data[n..];
        offset = 0;
        if data.is_empty() {
            return;
        }
    }
}

impl RxBuffers {
    /// Forgets every chain (device reset: the driver takes its buffers back).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.held_descs = 0;
    }

    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// True when no chain is held.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Takes every chain the driver has made available; returns how many.
    pub fn take_available(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> usize {
        let mut n = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let c = parse(mem, chain);
            self.held_descs += c.descs;
            self.chains.push_back(c);
            n += 1;
        }
        n
    }

    /// Completes, empty, the unusable chains at the front; true when there were any.
    pub fn return_invalid(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
        let mut any = false;
        while self.chains.front().is_some_and(|c| !c.valid) {
            if let Some(c) = self.chains.pop_front() {
                self.held_descs -= c.descs;
                if let Err(e) = queue.add_used(mem, c.head, 0) {
                    tracing::warn!("virtio-net rx: add_used: {e:?}");
                }
                any = true;
            }
        }
        any
    }

    fn gather(&self, mergeable: bool) -> Gather {
        let mut g = Gather {
            chains: 0,
            capacity: 0,
            slices: 0,
            blocked: false,
        };
        for c in &self.chains {
            // One iovec is the spare byte.
            if !c.valid || g.slices + c.slices > MAX_IOVECS - 1 {
                g.blocked = true;
                break;
            }
            g.chains += 1;
            g.capacity += c.capacity;
            g.slices += c.slices;
            // Without mergeable buffers a frame must fit one chain.
            if !mergeable || g.capacity >= MAX_RX_FRAME {
                break;
            }
        }
        g
    }

    /// Whether a frame can be read now. With mergeable buffers that needs room for the largest
    /// frame, unless the driver cannot give more: every descriptor of the ring is held already, or
    /// an unusable chain stands in the way.
    pub fn ready(&self, mergeable: bool, queue_size: u16) -> bool {
        let g = self.gather(mergeable);
        if g.chains == 0 {
            return false;
        }
        !mergeable
            || g.capacity >= MAX_RX_FRAME
            || g.blocked
            || self.held_descs >= usize::from(queue_size)
    }

    /// Reads one frame from `tap` into the chains at the front and completes those it filled.
    /// `WouldBlock` when the TAP has no frame.
    pub fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        tap: &dyn FrameIo,
        mergeable: bool,
    ) -> io::Result<Received> {
        let g = self.gather(mergeable);
        if g.chains == 0 {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        let mut spare = [0u8; 1];
        let mut slices: Vec<VolatileSlice<'_>> = Vec::with_capacity(g.slices + 1);
        for c in self.chains.iter().take(g.chains) {
            for (addr, len) in &c.segs {
                for s in mem.get_slices(*addr, *len as usize) {
                    slices.push(s.map_err(|e| io::Error::other(e.to_string()))?);
                }
            }
        }
        slices.push(VolatileSlice::from(&mut spare[..]));
        let n = tap.read_frame(&slices)?;
        drop(slices);
        if n < VNET_HDR_LEN || n > g.capacity {
            return Ok(Received::Truncated { len: n });
        }
        let mut lens = Vec::new();
        let mut left = n;
        for c in self.chains.iter().take(g.chains) {
            if left == 0 {
                break;
            }
            let take = left.min(c.capacity);
            lens.push(take);
            left -= take;
        }
        // The TAP skips num_buffers (it writes the 10-byte legacy header): ours to fill, before
        // the used ring publishes the buffers.
        let buffers = lens.len();
        write_at(
            mem,
            &self.chains[0].segs,
            NUM_BUFFERS_OFFSET,
            &(buffers as u16).to_le_bytes(),
        );
        for take in lens {
            if let Some(c) = self.chains.pop_front() {
                self.held_descs -= c.descs;
                if let Err(e) = queue.add_used(mem, c.head, take as u32) {
                    tracing::warn!("virtio-net rx: add_used: {e:?}");
                }
            }
        }
        Ok(Received::Frame { len: n, buffers })
    }
}
