//! lightbyte's virtual machine monitor.
//!
//! The boot path reads top to bottom in [`builder::build_for_boot`]: configuration and host
//! resources, guest memory, the VM, devices, ACPI tables and the kernel, vCPUs. A restore
//! ([`snapshot::restore`]) takes the same steps with saved state. The API's types and client
//! are in the `vmm_api` crate; disks are the `block` crate's.

#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
mod heap;
pub mod jail;
pub mod log_limit;
pub mod persist;
pub mod running;
pub mod snapshot;
mod threads;
pub mod unix_socket;
pub mod vmm;
pub mod vstate;
