//! The transmit queue: each chain is one frame, virtio-net header first, written to the TAP as
//! it stands with one writev (the TAP understands the header's checksum and GSO requests).

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::tap::{FrameIo, MAX_IOVECS, VNET_HDR_LEN};

/// Largest chain accepted: the header and a 64 KiB GSO frame with its Ethernet and VLAN headers.
pub const MAX_TX_FRAME: usize = VNET_HDR_LEN + 65550;
/// Smallest: the header and an Ethernet header.
const MIN_TX_FRAME: usize = VNET_HDR_LEN + 14;

/// Why a frame was not sent.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The chain cannot be a frame; it is completed and dropped.
    #[error("malformed transmit chain: {0}")]
    Malformed(&'static str),
    /// The TAP refused the frame (`WouldBlock`: try again once it is writable).
    #[error("writing to the TAP: {0}")]
    Io(#[from] io::Error),
}

/// Writes the frame in `chain` to `tap`; returns the frame's length without the header.
pub fn transmit(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    tap: &dyn FrameIo,
) -> Result<usize, TxError> {
    let mut slices: Vec<VolatileSlice<'_>> = Vec::new();
    let mut total = 0usize;
    for d in chain {
        if d.is_write_only() {
            return Err(TxError::Malformed("device-writable buffer"));
        }
        total += d.len() as usize;
        if total > MAX_TX_FRAME {
            return Err(TxError::Malformed("longer than a 64 KiB frame"));
        }
        for s in mem.get_slices(d.addr(), d.len() as usize) {
            slices.push(s.map_err(|_| TxError::Malformed("buffer outside guest memory"))?);
        }
        if slices.len() > MAX_IOVECS {
            return Err(TxError::Malformed("too many buffers"));
        }
    }
    if total < MIN_TX_FRAME {
        return Err(TxError::Malformed(
            "shorter than the virtio-net and Ethernet headers",
        ));
    }
    tap.write_frame(&slices)?;
    Ok(total - VNET_HDR_LEN)
}
