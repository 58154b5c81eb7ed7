//! KVM GSI routing for MSI: the VM's routing table (the in-kernel irqchip's default pins plus one
//! MSI route per allocated GSI) and the [`MsiSink`] that delivers a device's MSI-X vectors through
//! irqfds on those GSIs.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table is kept here and pushed whole on
//! every change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::pci::msix::{MsiMessage, MsiSink};

/// IOAPIC pins; GSIs below this are the irqchip's.
pub const IOAPIC_PINS: u32 = 24;

/// Error programming interrupts.
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
    /// An eventfd could not be created.
    #[error("creating an irqfd: {0}")]
    EventFd(std::io::Error),
    /// KVM's routing table is full.
    #[error("no free GSI for MSI routing")]
    NoGsi,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// The routing table, as plain data.
#[derive(Default)]
pub struct RouteTable {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

impl RouteTable {
    /// The default table: what KVM sets up with its in-kernel irqchip (GSI n → IOAPIC pin n, and
    /// GSIs 0-15 also to the PICs).
    pub fn new() -> Self {
        Self {
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
        }
    }

    /// A GSI for MSI use.
    pub fn allocate(&mut self) -> Result<u32, Error> {
        if self.next_gsi as usize >= kvm_bindings::KVM_MAX_IRQ_ROUTES {
            return Err(Error::NoGsi);
        }
        self.next_gsi += 1;
        Ok(self.next_gsi - 1)
    }

    /// Routes `gsi` to `message`, or removes its route.
    pub fn set(&mut self, gsi: u32, message: Option<MsiMessage>) {
        match message {
            Some(m) => self.msi.insert(gsi, m),
            None => self.msi.remove(&gsi),
        };
    }

    /// Every entry, irqchip pins first.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::with_capacity(40 + self.msi.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                v.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                v.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        v.extend(self.msi.iter().map(|(gsi, m)| msi(*gsi, *m)));
        v
    }
}

/// The VM's interrupt router: the route table and the VM to push it to.
pub struct IrqRouter {
    vm: Arc<VmFd>,
    table: Mutex<RouteTable>,
}

impl IrqRouter {
    /// A router for `vm`, with the default table.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(RouteTable::new()),
        }
    }

    /// Routes `gsi` to `message` (or removes its route) and pushes the table to KVM.
    pub fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), Error> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.set(gsi, message);
        let routing = KvmIrqRouting::from_entries(&table.entries()).map_err(|_| Error::NoGsi)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|source| Error::Kvm {
                what: "set GSI routing",
                source,
            })
    }

    /// An [`MsiSink`] with `vectors` vectors, each on its own GSI with an irqfd.
    pub fn msi_sink(self: &Arc<Self>, vectors: u16) -> Result<KvmMsiSink, Error> {
        let mut irqs = Vec::with_capacity(usize::from(vectors));
        for _ in 0..vectors {
            let gsi = self
                .table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .allocate()?;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
            self.vm
                .register_irqfd(&evt, gsi)
                .map_err(|source| Error::Kvm {
                    what: "register irqfd",
                    source,
                })?;
            irqs.push((gsi, evt));
        }
        Ok(KvmMsiSink {
            router: self.clone(),
            irqs,
        })
    }
}

/// Delivers MSI-X vectors through irqfds on routed GSIs.
pub struct KvmMsiSink {
    router: Arc<IrqRouter>,
    irqs: Vec<(u32, EventFd)>,
}

impl KvmMsiSink {
    /// The GSI serving `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.irqs.get(usize::from(vector)).map(|(gsi, _)| *gsi)
    }
}

impl MsiSink for KvmMsiSink {
    fn route(&self, vector: u16, message: Option<MsiMessage>) {
        let Some((gsi, _)) = self.irqs.get(usize::from(vector)) else {
            return;
        };
        if let Err(e) = self.router.set_route(*gsi, message) {
            tracing::error!("MSI-X vector {vector}: {e}");
        }
    }

    fn fire(&self, vector: u16) {
        if let Some((_, evt)) = self.irqs.get(usize::from(vector)) {
            if let Err(e) = evt.write(1) {
                tracing::error!("MSI-X vector {vector}: irqfd write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_kvm_and_msi_routes_follow() {
        let mut t = RouteTable::new();
        let e = t.entries();
        // 16 PIC pins (GSI 0-15) + 24 IOAPIC pins.
        assert_eq!(e.len(), 40);
        assert!(e.iter().all(|x| x.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        let gsi = t.allocate().unwrap();
        assert_eq!(gsi, IOAPIC_PINS);
        assert_eq!(t.allocate().unwrap(), IOAPIC_PINS + 1);
        t.set(
            gsi,
            Some(MsiMessage {
                address: 0x1_fee0_0000,
                data: 0x41,
            }),
        );
        let e = t.entries();
        assert_eq!(e.len(), 41);
        let last = e.last().unwrap();
        assert_eq!((last.gsi, last.type_), (gsi, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI route, so `msi` is the active union member.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_0000, 1, 0x41));
        t.set(gsi, None);
        assert_eq!(t.entries().len(), 40);
    }
}
