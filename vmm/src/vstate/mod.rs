//! KVM objects: the VM and its vCPUs.

pub mod irq_routing;
pub mod vcpu;
pub mod vm;
