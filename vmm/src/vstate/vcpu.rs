//! vCPUs: per-CPU configuration (CPUID, MSRs, LAPIC, boot registers) and the KVM_RUN loop that
//! dispatches port I/O and MMIO exits to the buses.

use std::sync::Arc;

use kvm_bindings::{kvm_lapic_state, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::cpuid::{self, CpuidPolicy, Topology};
use crate::arch::msr::boot_msrs;
use crate::arch::regs::{self, BootMode};
use crate::devices::bus::Bus;
use crate::devices::{ExitHandle, VmEvent};
use crate::vstate::control::{Next, TlsVcpu, VcpuControl};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The reset reason of a triple fault (KVM_EXIT_SHUTDOWN): `vmm` exits with its own status.
pub const TRIPLE_FAULT: &str = "triple fault";

/// Error setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: KVM {what}: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// KVM did not accept all boot MSRs.
    #[error("vCPU {index}: KVM set {set} of {total} boot MSRs")]
    Msrs {
        /// vCPU index.
        index: u8,
        /// How many were set.
        set: usize,
        /// How many we asked for.
        total: usize,
    },
    /// Boot register setup failed.
    #[error("vCPU {0}: {1}")]
    Regs(u8, regs::Error),
}

/// The shared buses a vCPU dispatches exits to.
#[derive(Clone)]
pub struct Buses {
    /// Port I/O.
    pub pio: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
}

/// One vCPU, configured and ready to run.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    buses: Buses,
    exit: ExitHandle,
}

/// Sets the delivery mode of a LAPIC LVT register, keeping its other bits.
fn set_lvt_mode(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&lapic.regs[reg..reg + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (dst, src) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = src as _;
    }
}

/// KVM's supported CPUID, fetched once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

impl Vcpu {
    /// Creates vCPU `index` of `cpus` and programs CPUID, MSRs, FPU and LAPIC. The boot CPU also
    /// gets the registers for `boot`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &VmFd,
        kvm: &Kvm,
        supported: &CpuId,
        policy: &CpuidPolicy,
        index: u8,
        cpus: u8,
        boot: Option<(BootMode, &GuestMemoryMmap)>,
        buses: Buses,
        exit: ExitHandle,
    ) -> Result<Self, Error> {
        let k = |what| {
            move |source| Error::Kvm {
                index,
                what,
                source,
            }
        };
        let fd = vm.create_vcpu(u64::from(index)).map_err(k("create vCPU"))?;

        let mut entries = supported.as_slice().to_vec();
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        cpuid::apply(
            &mut entries,
            policy,
            Topology {
                cpu_index: index,
                cpus,
            },
            tsc_deadline,
        );
        let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::Kvm {
            index,
            what: "build CPUID",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid).map_err(k("set CPUID"))?;

        let msrs = boot_msrs();
        let total = msrs.len();
        let kvm_msrs = Msrs::from_entries(&msrs).map_err(|_| Error::Msrs {
            index,
            set: 0,
            total,
        })?;
        let set = fd.set_msrs(&kvm_msrs).map_err(k("set MSRs"))?;
        if set != total {
            return Err(Error::Msrs { index, set, total });
        }
        fd.set_fpu(&regs::boot_fpu()).map_err(k("set FPU"))?;

        let mut lapic = fd.get_lapic().map_err(k("get LAPIC"))?;
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        fd.set_lapic(&lapic).map_err(k("set LAPIC"))?;

        if let Some((mode, mem)) = boot {
            let mut sregs = fd.get_sregs().map_err(k("get sregs"))?;
            regs::setup_sregs(mem, mode, &mut sregs).map_err(|e| Error::Regs(index, e))?;
            fd.set_sregs(&sregs).map_err(k("set sregs"))?;
            fd.set_regs(&regs::boot_regs(mode)).map_err(k("set regs"))?;
        }
        Ok(Self {
            index,
            fd,
            buses,
            exit,
        })
    }

    /// Registers that say where and in which mode a vCPU crashed.
    fn crash_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}+{:#x}",
                r.rip, r.rsp, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
            ),
            _ => "unknown".into(),
        }
    }

    fn rip(&self) -> String {
        match self.fd.get_regs() {
            Ok(r) => format!("{:#x}", r.rip),
            Err(_) => "unknown".into(),
        }
    }

    /// Runs the vCPU until the guest stops it, it fails (the reason goes to the exit handle)
    /// or `control` stops it; parks while `control` says so.
    pub fn run(mut self, control: &VcpuControl) {
        let _tls = TlsVcpu::set(&mut self.fd);
        let event = loop {
            if let Next::Stop = control.next(self.index, &self.fd) {
                break None;
            }
            if let Some(event) = self.step() {
                break Some(event);
            }
        };
        tracing::debug!(vcpu = self.index, ?event, "vCPU stopped");
        if let Some(event) = event {
            self.exit.send(event);
        }
        control.exited();
    }

    /// One KVM_RUN and the handling of its exit; `Some` when the VM must stop.
    fn step(&mut self) -> Option<VmEvent> {
        let index = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.buses.pio.read(u64::from(port), data) {
                    tracing::trace!(port, len = data.len(), "unhandled port read");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if !self.buses.pio.write(u64::from(port), data) {
                    tracing::trace!(port, ?data, "unhandled port write");
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.buses.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.buses.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => {
                // What the guest's state was is the only clue to a crash it could not report.
                tracing::error!(vcpu = index, state = %self.crash_state(), "triple fault");
                Some(VmEvent::Reset(TRIPLE_FAULT))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VmEvent::Reset("KVM system reset"),
                KVM_SYSTEM_EVENT_CRASH => VmEvent::Panic,
                other => VmEvent::Error(format!(
                    "vCPU {index}: unknown KVM system event {other} at RIP {}",
                    self.rip()
                )),
            }),
            Ok(VcpuExit::InternalError) => Some(VmEvent::Error(format!(
                "vCPU {index}: KVM internal error (emulation failure) at RIP {}",
                self.rip()
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmEvent::Error(format!(
                "vCPU {index}: KVM entry failed, hardware reason {reason:#x} on host CPU {cpu}, RIP {}",
                self.rip()
            ))),
            Ok(other) => {
                let what = format!("{other:?}");
                Some(VmEvent::Error(format!(
                    "vCPU {index}: unexpected KVM exit {what} at RIP {}",
                    self.rip()
                )))
            }
            // Kicked out of KVM_RUN (pause, stop): clear the flag the kick set.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VmEvent::Error(format!(
                "vCPU {index}: KVM_RUN failed: {e} at RIP {}",
                self.rip()
            ))),
        }
    }

    /// The vCPU's file descriptor (state save and restore).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Index of this vCPU.
    pub fn index(&self) -> u8 {
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_replaces_only_the_delivery_mode() {
        let mut lapic = kvm_lapic_state::default();
        // Masked (bit 16), vector 0x31, delivery mode fixed.
        for (dst, src) in lapic.regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter_mut()
            .zip(0x0001_0031u32.to_le_bytes())
        {
            *dst = src as _;
        }
        set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        let bytes: Vec<u8> = lapic.regs[APIC_LVT0..APIC_LVT0 + 4]
            .iter()
            .map(|b| *b as u8)
            .collect();
        assert_eq!(u32::from_le_bytes(bytes.try_into().unwrap()), 0x0001_0731);
        assert!(lapic.regs[APIC_LVT1..APIC_LVT1 + 4].iter().all(|b| *b == 0));
    }
}
