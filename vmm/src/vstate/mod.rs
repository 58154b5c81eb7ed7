//! KVM objects: the VM and its vCPUs.

pub mod control;
pub mod irq_routing;
pub mod vcpu;
pub mod vm;
