//! lightbyte's virtual machine monitor.
//!
//! The boot path reads top to bottom in [`builder::start`]: KVM, guest memory, the VM, legacy
//! devices, ACPI tables, the kernel, vCPUs.

#![warn(missing_docs)]

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod control;
pub mod devices;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
