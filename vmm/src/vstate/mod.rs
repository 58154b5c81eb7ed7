//! KVM objects: the VM and its vCPUs.

pub mod blob;
pub mod control;
pub mod irq_routing;
pub mod kvm_state;
pub mod pagemap;
pub mod prepared;
pub mod ram;
pub mod vcpu;
pub mod vm;
