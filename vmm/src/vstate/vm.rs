//! The KVM VM: in-kernel interrupt controllers and PIT, guest memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use std::sync::Arc;

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::arch::memory::ram_ranges;
use crate::persist::Persist;
use crate::vstate::irq_routing::IrqRouter;
use crate::vstate::kvm_state::{StateError, VmState};
use crate::vstate::ram;

/// Error creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The VM made ahead of time could not be had ([`super::prepared`]).
    #[error("{0}")]
    Prepare(&'static str),
    /// Guest memory could not be allocated.
    #[error("allocating {size} bytes of guest memory: {source}")]
    Memory {
        /// Requested size.
        size: u64,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Allocates guest RAM for `mem_size` bytes following the layout in [`crate::arch::memory`].
/// Each range is a mapping of its own at a huge-page-aligned host address ([`ram`]); the
/// [`ram::Reclaim`] gives it back if the VM fails to build.
pub fn create_guest_memory(mem_size: u64) -> Result<(GuestMemoryMmap, ram::Reclaim), Error> {
    ram::guest_memory(ram_ranges(mem_size)).map_err(|source| Error::Memory {
        size: mem_size,
        source,
    })
}

/// A new KVM VM with its interrupt controllers (PIC, IOAPIC, local APICs) and PIT, no memory
/// and no vCPU yet.
pub fn create_fd(kvm: &Kvm) -> Result<VmFd, Error> {
    let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
    fd.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("set TSS address"))?;
    fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
    Ok(fd)
}

/// A KVM VM with its memory registered.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    irq_router: Arc<IrqRouter>,
}

impl Vm {
    /// The VM (the one made ahead of time, if any: [`super::prepared`]; else a new one, with
    /// its irqchip and PIT), with `memory` registered as KVM memory slots.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, Error> {
        let fd = match super::prepared::take() {
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                // Whatever failed there fails here too, with its error where it belongs.
                tracing::debug!(error = %e, "the VM made ahead of time failed; making it now");
                create_fd(kvm)?
            }
            None => create_fd(kvm)?,
        };
        for (slot, region) in memory.iter().enumerate() {
            let mr = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the host mapping behind `mr` belongs to `memory`, which `Vm` owns and keeps
            // alive (and never remaps) for as long as the VM file descriptor exists.
            unsafe { fd.set_user_memory_region(mr) }.map_err(kvm_err("set memory region"))?;
        }
        let fd = Arc::new(fd);
        let irq_router = Arc::new(IrqRouter::new(fd.clone()));
        Ok(Self {
            fd,
            memory,
            irq_router,
        })
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// MSI routing for devices.
    pub fn irq_router(&self) -> &Arc<IrqRouter> {
        &self.irq_router
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// The VM-wide state KVM keeps: interrupt controllers, PIT and clock.
impl Persist for Vm {
    type State = VmState;
    type Error = StateError;

    fn save(&self) -> Result<VmState, StateError> {
        VmState::save(&self.fd)
    }

    fn restore(&mut self, state: &VmState) -> Result<(), StateError> {
        state.restore(&self.fd)
    }
}
