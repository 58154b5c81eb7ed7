//! The protocol between a lightbyte host (the worker agent, `vmm agent`) and the guest agent
//! inside a VM, over a vsock stream. Both sides depend on this crate and nothing else of each
//! other.
//!
//! # Transport
//! The guest agent listens on vsock port [`DEFAULT_PORT`]. From the host, a client connects to
//! the VM's vsock Unix socket and writes `CONNECT <port>\n`; the VMM answers `OK <hostport>\n`
//! once the agent accepted, and the stream is the connection ([`client::connect`]).
//!
//! # Framing
//! Every message is one frame: a 4-byte big-endian length, then that many bytes of JSON
//! ([`frame`]). Frames longer than [`frame::MAX_FRAME`] are refused (the reader answers with an
//! error and closes: it cannot find the next frame).
//!
//! # Messages
//! The client sends `{"version": 1, "request": {...}}` ([`RequestFrame`]) and the agent answers
//! each request with one [`Response`], in order. Requests ([`Request`], tagged by `type`):
//! - `ping`: the agent's version, the guest's uptime, hostname and addresses;
//! - `apply-config`: atomically writes a named document into the guest with a revision;
//!   a revision not above the one applied is refused (`stale-revision`); optionally runs the
//!   named local service's `reload` and reports its exit code;
//! - `status`: the state of named local services;
//! - `shutdown`: the guest powers off after answering.
//!
//! A request the agent cannot parse or does not know gets an `error` response (`bad-request`,
//! `unsupported-version`, ...) and the connection stays usable.
//!
//! # Services
//! A service is an executable `<services dir>/<name>` (by default `/etc/lightbyte/services`)
//! taking one argument: `reload` (after a configuration is applied) or `status` (exit 0:
//! running, 3: stopped, anything else: failed), as LSB init scripts do.

pub mod client;
pub mod frame;
mod messages;
pub mod vsock;

pub use messages::*;

/// The vsock port the guest agent listens on unless told otherwise.
pub const DEFAULT_PORT: u32 = 1024;
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
