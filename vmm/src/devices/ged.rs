//! The ACPI power button, host side.
//!
//! A hardware-reduced ACPI platform has no PM1 event registers and no SCI, so there is no
//! fixed-feature power button. Instead the DSDT (see [`crate::arch::acpi`]) declares a Generic
//! Event Device (ACPI0013, Linux's evged driver) that owns an interrupt on [`POWER_BUTTON_GSI`];
//! when it fires, the GED's `_EVT` method notifies the power button device (PNP0C0C) with 0x80,
//! which Linux's button driver turns into a KEY_POWER input event for the guest's userspace.
//!
//! The GSI carries nothing but the power button, so no status register is needed to tell events
//! apart: raising the interrupt is the whole device.

use std::io;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// The GED's interrupt: an IOAPIC pin no other device uses (COM1 has 4, MSI routes start at 24).
/// Declared edge-triggered, active high: an irqfd write is a pulse on the pin.
pub const POWER_BUTTON_GSI: u32 = 10;

/// Error setting up or pressing the power button.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The eventfd could not be created.
    #[error("creating the power button eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// KVM refused the irqfd.
    #[error("registering the power button irqfd on GSI {POWER_BUTTON_GSI}: {0}")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// Signalling the eventfd failed.
    #[error("raising the power button interrupt: {0}")]
    Press(#[source] io::Error),
}

/// The power button: an eventfd registered as the irqfd of [`POWER_BUTTON_GSI`].
#[derive(Debug)]
pub struct PowerButton {
    irq: EventFd,
}

impl PowerButton {
    /// Wires a power button into `vm` (which must have its in-kernel irqchip).
    pub fn new(vm: &VmFd) -> Result<Self, Error> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        vm.register_irqfd(&irq, POWER_BUTTON_GSI)
            .map_err(Error::Irqfd)?;
        Ok(Self { irq })
    }

    /// Presses the button once. KVM delivers the interrupt even while the vCPUs are paused: the
    /// guest sees it when they run again. Whether the guest shuts down is up to the guest.
    pub fn press(&self) -> Result<(), Error> {
        self.irq.write(1).map_err(Error::Press)
    }
}
