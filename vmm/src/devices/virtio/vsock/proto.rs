//! virtio-vsock on the wire (virtio 1.2, section 5.10): packet types, operations, flags and the
//! addresses of the host side. Packet headers are read and written through the `virtio-vsock`
//! crate; these are the values that go in them.

/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Stream sockets: the only type this device serves.
pub const TYPE_STREAM: u16 = 1;

/// A connection request.
pub const OP_REQUEST: u16 = 1;
/// The accepting side's answer to a request.
pub const OP_RESPONSE: u16 = 2;
/// A connection refused, aborted or finished.
pub const OP_RST: u16 = 3;
/// One direction (or both) will carry nothing more.
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// The sender's buffer space, unsolicited.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive nothing more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send nothing more.
pub const SHUTDOWN_SEND: u32 = 2;

/// The event the device puts on the event queue after the transport was reset (a snapshot
/// restored in another process): the guest drops every connection.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Largest payload the device takes in one guest packet (the Linux driver sends at most
/// 64 KiB).
pub const MAX_TX_DATA: u32 = 64 << 10;
/// Largest payload the device puts in one receive buffer (Linux posts 4 KiB buffers; others
/// may post larger).
pub const MAX_RX_DATA: u32 = 64 << 10;
