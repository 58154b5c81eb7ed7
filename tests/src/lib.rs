//! Test harness for lightbyte.
//!
//! - [`artifacts`]: guest kernels and initramfs, built by the scripts in `tests/guest` and cached
//!   outside the clone.
//! - [`testhost`]: where guests run. These build machines' own `/dev/kvm` cannot run Linux
//!   guests, so scenarios run inside a QEMU-TCG virtual machine with a real `kvm_amd`; on a host
//!   whose CPU has VMX/SVM they run directly, through the same interface.
//! - [`guest`]: composing `vmm` invocations for scenarios and reading what the guest printed.

pub mod artifacts;
pub mod data;
pub mod guest;
pub mod paths;
pub mod testhost;
