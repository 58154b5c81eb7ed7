//! vCPU and VM (interrupt controllers, PIT, clock) state as KVM reports it, saved for
//! snapshots and loaded back into a new VM.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::blob;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(with = "blob")]
    regs: kvm_regs,
    #[serde(with = "blob")]
    sregs: kvm_sregs,
    #[serde(with = "blob")]
    xsave: kvm_xsave,
    #[serde(with = "blob")]
    xcrs: kvm_xcrs,
    #[serde(with = "blob")]
    debugregs: kvm_debugregs,
    #[serde(with = "blob")]
    lapic: kvm_lapic_state,
    #[serde(with = "blob::list")]
    msrs: Vec<kvm_msr_entry>,
    #[serde(with = "blob")]
    events: kvm_vcpu_events,
    #[serde(with = "blob")]
    mp_state: kvm_mp_state,
}

/// A KVM state ioctl that failed, or state KVM would not take.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed.
    #[error("KVM {what}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Too many MSRs for one KVM call.
    #[error("MSR list of {0} entries is too long for KVM")]
    MsrList(usize),
    /// KVM stopped at an MSR it would not set.
    #[error("KVM took {taken} of {total} MSRs (MSR {refused:#x} refused)")]
    MsrRefused {
        /// MSRs set.
        taken: usize,
        /// MSRs given.
        total: usize,
        /// The first one refused.
        refused: u32,
    },
}

fn e(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// The MSRs KVM can save and restore.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(e("MSR index list"))?
        .as_slice()
        .to_vec())
}

/// Reads the MSRs of `indices` for `fd`, skipping the ones KVM refuses to read.
fn read_msrs(indices: &[u32], fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut indices: Vec<u32> = indices.to_vec();
    let mut out = Vec::new();
    while !indices.is_empty() {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|i| kvm_msr_entry {
                index: *i,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::MsrList(entries.len()))?;
        let n = fd.get_msrs(&mut msrs).map_err(e("get MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // KVM stops at the first MSR it cannot read: skip it and go on after it.
        indices.drain(..(n + 1).min(indices.len()));
    }
    Ok(out)
}

impl VcpuState {
    /// Saves a paused vCPU.
    pub fn save(msr_indices: &[u32], fd: &VcpuFd) -> Result<VcpuState, StateError> {
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(e("get MP state"))?,
            regs: fd.get_regs().map_err(e("get regs"))?,
            sregs: fd.get_sregs().map_err(e("get sregs"))?,
            xsave: fd.get_xsave().map_err(e("get XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(e("get XCRs"))?,
            debugregs: fd.get_debug_regs().map_err(e("get debug regs"))?,
            lapic: fd.get_lapic().map_err(e("get LAPIC"))?,
            msrs: read_msrs(msr_indices, fd)?,
            events: fd.get_vcpu_events().map_err(e("get vCPU events"))?,
        })
    }

    /// Loads the state into a freshly created vCPU (CPUID already set). The order follows KVM's
    /// dependencies: special registers (APIC base) before the LAPIC, MSRs before events.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        fd.set_mp_state(self.mp_state).map_err(e("set MP state"))?;
        fd.set_regs(&self.regs).map_err(e("set regs"))?;
        fd.set_sregs(&self.sregs).map_err(e("set sregs"))?;
        // SAFETY: the buffer is a kvm_xsave that KVM itself produced with get_xsave.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("set XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("set XCRs"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(e("set debug regs"))?;
        fd.set_lapic(&self.lapic).map_err(e("set LAPIC"))?;
        // The TSC first and the TSC deadline last: KVM arms the LAPIC timer against the TSC
        // it has when the deadline is written, so a deadline written before the TSC fires
        // as late as the saved TSC is large.
        let mut ordered = self.msrs.clone();
        ordered.sort_by_key(|m| match m.index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        let msrs = Msrs::from_entries(&ordered).map_err(|_| StateError::MsrList(ordered.len()))?;
        let n = fd.set_msrs(&msrs).map_err(e("set MSRs"))?;
        if n != ordered.len() {
            return Err(StateError::MsrRefused {
                taken: n,
                total: ordered.len(),
                refused: ordered[n].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(e("set vCPU events"))?;
        Ok(())
    }
}

/// In-kernel interrupt controllers, PIT and the KVM clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    #[serde(with = "blob")]
    pic_master: kvm_irqchip,
    #[serde(with = "blob")]
    pic_slave: kvm_irqchip,
    #[serde(with = "blob")]
    ioapic: kvm_irqchip,
    #[serde(with = "blob")]
    pit: kvm_pit_state2,
    #[serde(with = "blob")]
    clock: kvm_clock_data,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

impl VmState {
    /// Saves the VM-wide state of a paused VM.
    pub fn save(vm: &VmFd) -> Result<VmState, StateError> {
        let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
        let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
        let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
        vm.get_irqchip(&mut pic_master).map_err(e("get PIC"))?;
        vm.get_irqchip(&mut pic_slave).map_err(e("get PIC"))?;
        vm.get_irqchip(&mut ioapic).map_err(e("get IOAPIC"))?;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit: vm.get_pit2().map_err(e("get PIT"))?,
            clock: vm.get_clock().map_err(e("get clock"))?,
        })
    }

    /// Loads it into a new VM (irqchip and PIT created).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        vm.set_irqchip(&self.pic_master).map_err(e("set PIC"))?;
        vm.set_irqchip(&self.pic_slave).map_err(e("set PIC"))?;
        vm.set_irqchip(&self.ioapic).map_err(e("set IOAPIC"))?;
        vm.set_pit2(&self.pit).map_err(e("set PIT"))?;
        let mut clock = self.clock;
        // Continue the guest clock from the saved value: without the realtime and host-TSC
        // hints KVM does not add the time that passed while the VM was saved; the stable flag
        // is one KVM only reports.
        clock.flags &= !(KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC);
        clock.realtime = 0;
        clock.host_tsc = 0;
        vm.set_clock(&clock).map_err(e("set clock"))
    }
}
