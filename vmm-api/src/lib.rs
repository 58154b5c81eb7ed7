//! The lightbyte VMM's API as its clients see it, with nothing of KVM: the plain configuration
//! of a VM ([`config`]) and how the command line spells it ([`parse`]), MAC addresses and
//! interface names, the limits a VM must respect ([`limits`]), the request and response bodies
//! of the HTTP API ([`types`]), its route table ([`routes`]) and a typed client ([`client`]).
//!
//! `vmm` builds its command line and API server on these types; the orchestrator's worker drives
//! `vmm` processes through the client. Rules that only the API server applies (defaults of a
//! create body, fields not available in a build) live in the server's conversion from request
//! bodies to [`config::VmConfig`], not here.

#![warn(missing_docs)]

pub mod client;
pub mod config;
pub mod ifname;
pub mod limits;
pub mod mac;
pub mod parse;
pub mod routes;
pub mod types;

pub use config::{DiskConfig, DiskFormat, NetConfig, OnError, SerialConfig, VmConfig, VsockConfig};
pub use mac::MacAddr;
